"""onnxruntime session knobs on one ONNX bundle: decode speed, peak RSS, and whether the greedy tokens change.

    python bench/session_knobs.py BUNDLE_OR_MODEL_DIR [--reps 3 --threads 2 --tokens 128 --out results.json]

Each variant is a genai_config overlay (the same mechanism the bundle's run.py uses for threads), measured in a
fresh process by bench/model_speed.py (a bare loop; `build --tune` times the bundle's runner). Rounds alternate the
variants, so that drift on a shared machine spreads over all of them. Speed is quoted as a ratio to the bundle's own
settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "bundle": {},
    "spin_off": {"model": {"decoder": {"session_options": {"config_entries": {
        "session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}}}}},
    "no_arena": {"model": {"decoder": {"session_options": {"enable_cpu_mem_arena": False}}}},
    "no_mem_pattern": {"model": {"decoder": {"session_options": {"enable_mem_pattern": False}}}},
    "opt_basic": {"model": {"decoder": {"session_options": {"graph_optimization_level": "ORT_ENABLE_BASIC"}}}},
    "opt_extended": {"model": {"decoder": {"session_options": {
        "graph_optimization_level": "ORT_ENABLE_EXTENDED"}}}},
    "kv_not_shared": {"search": {"past_present_share_buffer": False}},
}



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model_dir = args.path / "model" if (args.path / "model" / "genai_config.json").is_file() else args.path
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for _ in range(args.reps):
        for name in names:
            if name in errors:
                continue
            proc = subprocess.run([sys.executable, str(Path(__file__).with_name("model_speed.py")), str(model_dir),
                                   "--tokens", str(args.tokens), "--threads", str(args.threads), "--overlay",
                                   json.dumps(VARIANTS[name])], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                errors[name] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                continue
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["decode_tok_s"] for r in runs["bundle"])
    rows = []
    for name in names:
        if name in errors:
            rows.append({"variant": name, "error": errors[name]})
            continue
        tok_s = [round(r["decode_tok_s"], 1) for r in runs[name]]
        rows.append({"variant": name, "overlay": VARIANTS[name], "decode_tok_s": tok_s,
                     "ratio_to_bundle": round(statistics.median(tok_s) / base, 3),
                     "prefill_ms": round(statistics.median(r["prefill_ms"] for r in runs[name]), 1),
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[name]), 1),
                     "same_tokens": len({r["tokens_crc"] for r in runs[name] + runs["bundle"]}) == 1})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "tokens": args.tokens, "reps": args.reps,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
