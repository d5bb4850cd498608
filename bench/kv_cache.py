"""KV cache precision on a built ONNX bundle: memory at a long context, decode speed, Δppl (docs/targets.md).

    python bench/kv_cache.py BUNDLE_DIR [--model smollm2-135m] [--target host] [--tokens 2048] [--rounds 3]
        > bench/results/kv_cache.json

Makes the bundle's model folder with each runtime.kv_cache the ONNX exporter offers on the CPU (fp32 as built;
int8 and int4 calibrated and written in by edgepack.backends.kv_cache, exactly as a build does), then for each:

- quality: the build's own gate (stages/validate.py) against the model's reference, Δppl and KL;
- memory and speed: fresh processes (`--probe`) that prefill the chat prompt and decode greedily until the sequence
  is `--tokens` long; the KV cache's memory is the peak RSS of that run less the peak of a 64-token run of the same
  folder, and decode speed is reported as a ratio to the fp32 KV cache in the same round (rounds alternate the
  order), early (the first 128 tokens) and late (the last 128 before `--tokens`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("fp32", "int8", "int4")


def probe(model_dir: str, length: int, threads: int) -> dict[str, float]:
    """One fresh process: chat prompt, greedy decode to `length` tokens in all; peak RSS and decode speeds."""
    import onnxruntime_genai as og
    from model_speed import peak_rss_mb

    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tok = og.Tokenizer(model)
    ids = list(tok.encode(tok.apply_chat_template(json.dumps([{"role": "user", "content": "Tell me a long story "
                                                               "about the sea."}]), add_generation_prompt=True)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    gen = og.Generator(model, params)
    rss_loaded = peak_rss_mb()
    gen.append_tokens(ids)
    stamps = [time.perf_counter()]
    while not gen.is_done():
        gen.generate_next_token()
        stamps.append(time.perf_counter())
    n = len(stamps) - 1
    window = min(128, n // 2)
    early = window / (stamps[window] - stamps[0])
    late = window / (stamps[-1] - stamps[-1 - window])
    return {"length": len(ids) + n, "new_tokens": n, "peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": rss_loaded,
            "early_tok_s": early, "late_tok_s": late}


def run_probe(model_dir: Path, length: int, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--probe", str(model_dir), "--tokens", str(length),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def variants(bundle: Path, hf_dir: Path, work: Path) -> dict[str, Path]:
    from edgepack.backends import kv_cache

    out = {}
    for dtype in DTYPES:
        folder = work / dtype
        shutil.copytree(bundle / "model", folder)
        if dtype in kv_cache.QUANTIZED:
            done = kv_cache.apply(folder, hf_dir, dtype, work / "calibration")
            print(f"{dtype}: {done.scheme}, {done.layers} layers, {done.seconds:.1f} s", file=sys.stderr)
        assert kv_cache.kv_dtype_of(folder) == dtype
        out[dtype] = folder
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="host")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe")
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.tokens, args.threads)))
        return 0

    from edgepack.models import resolve_model
    from edgepack.stages.validate import validate
    from edgepack.targets import load_target

    source = resolve_model(args.model)
    target = load_target(args.target)
    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "edgepack.json").read_text())
    with tempfile.TemporaryDirectory(prefix="edgepack-kv-") as tmp:
        folders = variants(bundle, source.hf_dir, Path(tmp))
        quality = {}
        for dtype, folder in folders.items():
            q = validate(source, folder, target, context=args.tokens)
            quality[dtype] = {"ppl": q.ppl_quantized, "ppl_reference": q.ppl_reference,
                              "ppl_delta_pct": q.ppl_delta_pct, "mean_kl": q.mean_kl,
                              "top1_agreement": q.top1_agreement, "greedy_match": q.greedy_match}
            print(f"{dtype}: {quality[dtype]}", file=sys.stderr)
        short = {d: run_probe(f, 64, args.threads) for d, f in folders.items()}
        rounds = []
        for r in range(args.rounds):
            order = DTYPES[r % 3:] + DTYPES[:r % 3]
            rounds.append({d: run_probe(folders[d], args.tokens, args.threads) for d in order})
            print(f"round {r + 1}: {rounds[-1]}", file=sys.stderr)
    result = {}
    for d in DTYPES:
        peak = statistics.median(x[d]["peak_rss_mb"] for x in rounds)
        result[d] = {
            **quality[d],
            "ppl_delta_vs_fp32_kv_pct": round((quality[d]["ppl"] / quality["fp32"]["ppl"] - 1) * 100, 2),
            "peak_rss_mb": round(peak, 1), "peak_rss_64_tokens_mb": round(short[d]["peak_rss_mb"], 1),
            "kv_mb": round(peak - short[d]["peak_rss_mb"], 1),
            "early_ratio_vs_fp32": round(statistics.median(x[d]["early_tok_s"] / x["fp32"]["early_tok_s"]
                                                           for x in rounds), 3),
            "late_ratio_vs_fp32": round(statistics.median(x[d]["late_tok_s"] / x["fp32"]["late_tok_s"]
                                                          for x in rounds), 3),
            "early_tok_s": round(statistics.median(x[d]["early_tok_s"] for x in rounds), 1),
            "late_tok_s": round(statistics.median(x[d]["late_tok_s"] for x in rounds), 1),
        }
    print(json.dumps({"bundle": manifest.get("bundle_id", bundle.name), "model": args.model, "target": args.target,
                      "reference": manifest.get("quality", {}).get("reference", ""),
                      "tokens": args.tokens, "threads": args.threads, "rounds": args.rounds,
                      "command": " ".join(sys.argv), "results": result, "raw_rounds": rounds, "raw_short": short},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
