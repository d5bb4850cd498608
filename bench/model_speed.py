"""(Research tool, not edgepack: `build --tune` and `bench` time the bundle's own runner, edgepack/meter.py.)
Decode speed of a model folder (onnxruntime-genai, or a LiteRT-LM .litertlm), measured in its own process.

    python bench/model_speed.py MODEL_DIR [--tokens 64] [--threads 0] [--overlay JSON]   → one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from typing import Any


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


PROMPT = "Write a haiku about the sea."


def measure_litertlm(path: str, tokens: int, threads: int) -> dict[str, float]:
    import os
    import tempfile

    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgepack-speed-") as cache:
        t0 = time.perf_counter()
        engine = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(
            thread_count=threads if threads > 0 else min(4, os.cpu_count() or 1)), cache_dir=cache)
        load_s = time.perf_counter() - t0
        conv = engine.create_conversation(max_output_tokens=tokens, sampler_config=litert_lm.SamplerConfig(top_k=1))
        t1 = time.perf_counter()
        n, t2 = 0, None
        for _ in conv.send_message_async(PROMPT):
            n += 1
            if t2 is None:
                t2 = time.perf_counter()
        t3 = time.perf_counter()
        conv.close()
    t2 = t2 or t3
    return {"load_s": load_s, "prompt_tokens": len(engine.tokenize(PROMPT)), "prefill_ms": (t2 - t1) * 1000,
            "decode_tok_s": (n - 1) / max(t3 - t2, 1e-9), "new_tokens": n, "peak_rss_mb": peak_rss_mb()}


def measure(model_dir: str, tokens: int, threads: int, overlay: dict[str, Any] | None = None) -> dict[str, float]:
    """One fresh-process measurement. `overlay`: a genai_config overlay applied after the thread count (ONNX);
    `tokens_crc` is a checksum of the greedy tokens, so that settings can be compared for identical output."""
    import os

    litertlm = os.path.join(model_dir, "model.litertlm")
    if os.path.isfile(litertlm):
        return measure_litertlm(litertlm, tokens, threads)
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(model_dir)
    if threads > 0:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    if overlay:
        config.overlay(json.dumps(overlay))
    model = og.Model(config)
    tok = og.Tokenizer(model)
    load_s = time.perf_counter() - t0
    ids = list(tok.encode(tok.apply_chat_template(json.dumps([{"role": "user", "content": "Write a haiku about "
                                                               "the sea."}]), add_generation_prompt=True)))
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
    return {"load_s": load_s, "prompt_tokens": len(ids), "prefill_ms": (t2 - t1) * 1000,
            "decode_tok_s": (n - 1) / max(t3 - t2, 1e-9), "new_tokens": n, "peak_rss_mb": peak_rss_mb(),
            "tokens_crc": float(zlib.crc32(json.dumps(out).encode()))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--overlay", default="", help="a genai_config overlay, as JSON (ONNX)")
    a = ap.parse_args()
    print(json.dumps(measure(a.model_dir, a.tokens, a.threads, json.loads(a.overlay) if a.overlay else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
