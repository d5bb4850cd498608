"""Sweep per-layer LiteRT recipes on one float .tflite: quality through the gate, decode speed and peak RSS.

    python bench/litert_recipes.py --float /tmp/lr/fp32 --work /tmp/lr/sweep --recipes dynamic,weight_only,...

Each recipe quantizes the same float file (edgepack.backends.litert_recipe), is scored by edgepack's own gate
(android-arm64's text, tolerances and reference) and timed in a fresh process with the LiteRT-LM on the
.litertlm the build would package (peak RSS is that process's VmHWM). One run, this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ATT = ["attention.qkv", "attention.output"]
FF = ["feedforward.gate", "feedforward.up", "feedforward.down"]
# name → (default mode, rules)
RECIPES: dict[str, tuple[str, list[dict]]] = {
    "dynamic": ("dynamic", []),
    "weight_only": ("weight_only", []),
    "dyn+down_wo": ("dynamic", [{"parts": ["feedforward.down"], "mode": "weight_only"}]),
    "dyn+qkv_wo": ("dynamic", [{"parts": ["attention.qkv"], "mode": "weight_only"}]),
    "dyn+out_wo": ("dynamic", [{"parts": ["attention.output"], "mode": "weight_only"}]),
    "dyn+gateup_wo": ("dynamic", [{"parts": ["feedforward.gate", "feedforward.up"], "mode": "weight_only"}]),
    "dyn+first2_wo": ("dynamic", [{"parts": ATT + FF, "blocks": [0, 1], "mode": "weight_only"}]),
    "dyn+last2_wo": ("dynamic", [{"parts": ATT + FF, "blocks": [28, 29], "mode": "weight_only"}]),
    "dyn+down_wo@11": ("dynamic", [{"parts": ["feedforward.down"], "blocks": [11], "mode": "weight_only"}]),
    "dyn+down_wo@11-28-29": ("dynamic", [{"parts": ["feedforward.down"], "blocks": [11, 28, 29],
                                           "mode": "weight_only"}]),
    "dyn+down_wo@2-9-11-27-28-29": ("dynamic", [{"parts": ["feedforward.down"], "blocks": [2, 9, 11, 27, 28, 29],
                                                  "mode": "weight_only"}]),
    "dyn+down_float@11-28-29": ("dynamic", [{"parts": ["feedforward.down"], "blocks": [11, 28, 29],
                                              "mode": "float"}]),
    "dyn+head_float": ("dynamic", [{"parts": ["embedding", "head"], "mode": "float"}]),
}


def speed(d: Path, source: object, tokens: int, threads: int) -> dict:
    """Package as .litertlm (as the build does) and time LiteRT-LM in a fresh process."""
    from edgepack.backends import tflite
    from edgepack.backends.litert_convert import _package

    spec = {"tokenizer_json": str(d / "tokenizer.json"), "stop_ids": sorted(set(tflite._stop_ids(source))),
            "bos_id": None, "chat_template": tflite._chat_template(source.hf_dir)}
    _package(spec, d / "model.tflite", d / "model.litertlm", 1024)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("model_speed.py")), str(d), "--tokens",
                          str(tokens), "--threads", str(threads)], capture_output=True, text=True, check=True)
    (d / "model.litertlm").unlink()
    return {k: v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()
            if k in ("decode_tok_s", "prefill_ms", "peak_rss_mb", "load_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_dir", type=Path, required=True,
                    help="folder with model.tflite + tokenizer.json")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="android-arm64")
    ap.add_argument("--eval-text", default=None, help="score on this text instead of the target's")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = ap.parse_args()

    from dataclasses import replace

    from edgepack.backends import litert_recipe as lr
    from edgepack.models import resolve_model
    from edgepack.stages.validate import validate
    from edgepack.targets import layer_rules, load_target

    source = resolve_model(args.model)
    target = load_target(args.target)
    if args.eval_text:
        target = replace(target, quality=replace(target.quality, eval_text=str(Path(args.eval_text).resolve())))
    for name in args.recipes.split(","):
        default, raw = RECIPES[name]
        d = args.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copy2(args.float_dir / "tokenizer.json", d / "tokenizer.json")
        t0 = time.perf_counter()
        summary = lr.quantize(args.float_dir / "model.tflite", d / "model.tflite", default, layer_rules(raw))
        q_s = time.perf_counter() - t0
        rep = validate(source, d, target, context=1024)
        row = {"recipe": name, "default": default, "rules": summary["rules"], "quantize_s": round(q_s, 1),
               "model_mb": round((d / "model.tflite").stat().st_size / 1e6, 1), "text": rep.text,
               "ppl_delta_pct": rep.ppl_delta_pct, "mean_kl": rep.mean_kl, "top1": rep.top1_agreement,
               "greedy": rep.greedy_match}
        row.update({k: round(v, 2) for k, v in speed(d, source, args.tokens, args.threads).items()})
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        (d / "model.tflite").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
