"""One measurement in a fresh process: load, prefill a chat prompt, decode N tokens greedily.

    python bench/decode.py genai  MODEL_DIR   [--threads 2 --new 128]
    python bench/decode.py bundle BUNDLE_DIR  (the bundle's own run.py, as a user runs it)
    python bench/decode.py llama  FILE.gguf
    python bench/decode.py litertlm FILE.litertlm   (bare LiteRT-LM: Engine + conversation, greedy)

Prints one JSON line: load_s, prompt_tokens, prefill_ms, decode_tok_s, new_tokens, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPT = "Write a haiku about the sea."


def rss_mb() -> float:
    """This process's own peak RSS (VmHWM); ru_maxrss would include the parent's pages at fork time."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def genai(path: str, threads: int, new: int) -> dict:
    # The same measurement `edgepack build --tune` uses for its candidates.
    from model_speed import measure

    return measure(path, new, threads)


def llama(path: str, threads: int, new: int, mmap: bool = True) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                use_mmap=mmap)
    load_s = time.perf_counter() - t0
    # Same chat prompt, rendered by the GGUF's own template.
    text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    t1 = time.perf_counter()
    llm.eval(ids)
    tok = llm.sample(temp=0.0)
    t2 = time.perf_counter()
    n = 1
    while n < new:
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
        n += 1
    t3 = time.perf_counter()
    return {"load_s": load_s, "prompt_tokens": len(ids), "prefill_ms": (t2 - t1) * 1000,
            "decode_tok_s": (n - 1) / (t3 - t2), "new_tokens": n, "peak_rss_mb": rss_mb()}


def litertlm(path: str, threads: int, new: int) -> dict:
    # Bare LiteRT-LM on a .litertlm (Engine + conversation, greedy): the same measurement --tune uses.
    from model_speed import measure_litertlm

    return measure_litertlm(path, new, threads)


def bundle(path: str, threads: int, new: int) -> dict:
    # The bundle's own runner in its own process: what a user on the device gets. --raw off: chat template.
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, f"{path}/run.py", "--prompt", PROMPT, "--json", "--threads",
                          str(threads), "--max-tokens", str(new)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load_s": d["load_s"], "prompt_tokens": d["prompt_tokens"], "prefill_ms": d["prefill_ms"],
            "decode_tok_s": d["decode_tokens_per_s"], "new_tokens": d["new_tokens"],
            "peak_rss_mb": d["peak_rss_mb"], "wall_s": wall}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["genai", "llama", "bundle", "litertlm"])
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--no-mmap", action="store_true", help="llama: read the weights into memory (peak RSS)")
    a = ap.parse_args()
    if a.kind == "llama":
        res = llama(a.path, a.threads, a.new, mmap=not a.no_mmap)
    else:
        res = {"genai": genai, "bundle": bundle, "litertlm": litertlm}[a.kind](a.path, a.threads, a.new)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
