"""onnxruntime session knobs on one ONNX bundle: decode speed, peak RSS, and whether the greedy tokens change.

    python bench/session_knobs.py BUNDLE_OR_MODEL_DIR [--reps 3 --threads 2 --tokens 128 --out results.json]

Each variant is a genai_config overlay (the same mechanism the bundle's run.py uses for threads), measured in a
fresh process; rounds alternate the variants so that drift on a shared machine spreads over all of them. Speed
is quoted as a ratio to the bundle's own settings in the same round.
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

CHILD = r"""
import hashlib, json, sys, time
import onnxruntime_genai as og
from edgepack.quality.speed import peak_rss_mb
model_dir, overlay, threads, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
config = og.Config(model_dir)
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
if overlay:
    config.overlay(json.dumps(overlay))
model = og.Model(config)
tok = og.Tokenizer(model)
load_s = time.perf_counter() - t0
ids = list(tok.encode(tok.apply_chat_template(json.dumps([{"role": "user", "content": "Write a haiku about the sea."}]),
                                              add_generation_prompt=True)))
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens, do_sample=False)
gen = og.Generator(model, params)
t1 = time.perf_counter()
gen.append_tokens(ids)
gen.generate_next_token()
t2 = time.perf_counter()
n = 1
while not gen.is_done() and n < tokens:
    gen.generate_next_token()
    n += 1
t3 = time.perf_counter()
out = [int(t) for t in gen.get_sequence(0)][len(ids):]
print(json.dumps({"load_s": load_s, "prefill_ms": (t2 - t1) * 1000, "decode_tok_s": (n - 1) / (t3 - t2),
                  "peak_rss_mb": peak_rss_mb(), "tokens_sha": hashlib.sha256(str(out).encode()).hexdigest()[:12]}))
"""


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
            proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), json.dumps(VARIANTS[name]),
                                   str(args.threads), str(args.tokens)], capture_output=True, text=True, check=False)
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
                     "same_tokens": len({r["tokens_sha"] for r in runs[name] + runs["bundle"]}) == 1})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "tokens": args.tokens, "reps": args.reps,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
