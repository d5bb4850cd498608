"""Quality and speed of quantization variants of one model, each scored by edgepack's own gate.

    python bench/variants.py [--model smollm2-135m] [--target host] [--reps 3] [--out bench/results/variants]

Reproduces the table in docs/targets.md: for each variant (overrides of the target's [quantize] table),
export with the onnxruntime-genai builder, score against the fp32 reference, and time decoding in fresh
processes (bench/decode.py). Prints one JSON line per variant and a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS: dict[str, dict[str, object]] = {
    "fp32": {"scheme": "fp32"},
    "int8": {"scheme": "int8", "algorithm": "default", "head_precision": "same", "sensitive_layers_int8": False},
    "int4-rtn": {"scheme": "int4", "algorithm": "default", "head_precision": "same", "sensitive_layers_int8": False},
    "int4-rtn-head8": {"scheme": "int4", "algorithm": "rtn", "head_precision": "int8",
                       "sensitive_layers_int8": False},
    "int4-gptq": {"scheme": "int4", "algorithm": "gptq", "head_precision": "same", "sensitive_layers_int8": False},
    "int4-kq-head8": {"scheme": "int4", "algorithm": "k_quant", "head_precision": "int8",
                      "sensitive_layers_int8": False},
    "int4-kq-head8-mixed": {"scheme": "int4", "algorithm": "k_quant", "head_precision": "int8",
                            "sensitive_layers_int8": True},
    "int4-kq-head8-mixed-fp32emb": {"scheme": "int4", "algorithm": "k_quant", "head_precision": "int8",
                                    "sensitive_layers_int8": True, "embedding_precision": "fp32"},
    "int4-kq-head8-int8-ends": {"scheme": "int4", "algorithm": "k_quant", "head_precision": "int8",
                                "sensitive_layers_int8": False, "int8_layers": (0, 1, -2, -1)},
    "int4-kq-head8-mixed-int8-ends": {"scheme": "int4", "algorithm": "k_quant", "head_precision": "int8",
                                      "sensitive_layers_int8": True, "int8_layers": (0, 1, -2, -1)},
    # issue 21's default candidate: imatrix asymmetric int4 everywhere, the embedding an int4 table of its own
    "int4-imatrix-asym": {"scheme": "int4", "algorithm": "imatrix", "symmetric": False, "head_precision": "same",
                          "sensitive_layers_int8": False, "embedding_precision": "fp32"},
    "int4-imatrix-asym-q4emb": {"scheme": "int4", "algorithm": "imatrix", "symmetric": False,
                                "head_precision": "same", "sensitive_layers_int8": False,
                                "embedding_precision": "quantized"},
    "int4-kq-head8-mixed-b16": {"scheme": "int4", "algorithm": "k_quant", "head_precision": "int8",
                                "sensitive_layers_int8": True, "block_size": 16},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="host")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "variants")
    ap.add_argument("--eval-text", type=Path, help="score on this text instead of the target's")
    args = ap.parse_args()

    from edgepack.backends import exporters
    from edgepack.fsutil import dir_bytes
    from edgepack.models import resolve_model
    from edgepack.stages.validate import validate
    from edgepack.targets import load_target

    source = resolve_model(args.model)
    base = load_target(args.target)
    rows = []
    for name in args.only or list(VARIANTS):
        target = dataclasses.replace(base, quantize=dataclasses.replace(base.quantize, **VARIANTS[name]))
        out = args.out / name
        if not (out / "genai_config.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as work:
                t0 = time.perf_counter()
                exporters.get(base.export.format).export(source, target, out, Path(work), lambda e: None)
                export_s = time.perf_counter() - t0
        else:
            export_s = None
        scored = target if args.eval_text is None else dataclasses.replace(
            target, quality=dataclasses.replace(target.quality, eval_text=str(args.eval_text.resolve())))
        q = validate(source, out, scored)
        speeds = []
        if name != "fp32":
            for _ in range(args.reps):
                p = subprocess.run([sys.executable, str(HERE / "decode.py"), "genai", str(out)],
                                   capture_output=True, text=True, check=True)
                speeds.append(json.loads(p.stdout.strip().splitlines()[-1])["decode_tok_s"])
        row = {"variant": name, "size_mb": round(dir_bytes(out) / 1e6, 1), "export_s": export_s,
               "ppl_delta_pct": q.ppl_delta_pct, "mean_kl": q.mean_kl, "top1": q.top1_agreement,
               "greedy": q.greedy_match, "decode_tok_s": round(statistics.median(speeds), 1) if speeds else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | size MB | Δppl | mean KL | top-1 | greedy /32 | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['size_mb']} | {r['ppl_delta_pct']:+.2f} % | {r['mean_kl']} | {r['top1']} | "
              f"{r['greedy']} | {r['decode_tok_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
