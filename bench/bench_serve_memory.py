"""Peak memory of a bundle's server under load vs after one request: glibc's default per-thread malloc arenas, the
same capped by MALLOC_ARENA_MAX=2 in the environment, and the runner core's own cap (mallopt at server start, what
every bundle does). One generation runs at a time, so growth under load is the allocator's, not KV caches.

    .venv/bin/python bench/bench_serve_memory.py dist/smollm2-135m-host [--clients 16 --requests 4]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, wait_ready  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def post(port: int, body: dict) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def one(bundle: Path, env: dict[str, str], clients: int, requests: int, *flags: str) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(bundle / "run.py"), "--serve", f"127.0.0.1:{port}", *flags],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, "/health", proc)
        post(port, {"messages": QUESTION, "max_tokens": 48})
        single = status_mb(proc.pid, "VmHWM")
        codes: list[int] = []

        def worker(i: int) -> None:
            for j in range(requests):
                if (i + j) % 3 == 0:  # stream and hang up after the first chunk
                    s = socket.create_connection(("127.0.0.1", port), timeout=600)
                    body = json.dumps({"messages": QUESTION, "max_tokens": 48, "stream": True}).encode()
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                              % len(body) + body)
                    s.recv(4096)
                    s.close()
                    codes.append(200)
                else:
                    codes.append(post(port, {"messages": QUESTION, "max_tokens": 16}))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(2)
        return {"after_one_mb": round(single, 1), "after_load_mb": round(status_mb(proc.pid, "VmHWM"), 1),
                "rss_settled_mb": round(status_mb(proc.pid, "VmRSS"), 1),
                "growth": round(status_mb(proc.pid, "VmHWM") / single, 3), "answered": codes.count(200),
                "requests": len(codes)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--prompt-cache", action="store_true",
                    help="compare the server without its prompt cache (--prompt-cache-slots 0) and with it (issue 24)")
    args = ap.parse_args()
    variants: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
        "glibc default": ({"EDGEPACK_MALLOC_ARENA_MAX": "0"}, ()),
        "MALLOC_ARENA_MAX=2 (env)": ({"EDGEPACK_MALLOC_ARENA_MAX": "0", "MALLOC_ARENA_MAX": "2"}, ()),
        "runner core (mallopt, 2 arenas)": ({}, ())}
    if args.prompt_cache:
        variants = {"no prompt cache": ({}, ("--prompt-cache-slots", "0")), "prompt cache (1 slot)": ({}, ())}
    out = {}
    for _ in range(args.reps):  # interleaved: the machine's noise falls on every variant alike
        for name, (env, flags) in variants.items():
            out.setdefault(name, []).append(one(args.bundle, env, args.clients, args.requests, *flags))
            print(name, out[name][-1], flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
