"""A 10-turn streamed chat through OpenAI-compatible servers: time to first token per turn, with the history
growing, for the bundle's server with its prompt cache, the same server without it (`--prompt-cache-slots 0`),
and llama-cpp-python's server on the very GGUF the bundle was built from (it reuses the longest common prefix of
the tokens in its context, its prompt cache). One run, one machine: quote ratios.

    python bench/chat_turns.py [--bundle dist/smollm2-135m-host] [--threads 2] [--think 0.5] [--chats 2]

The chat is the scenario of `run.py --scenario chat` (edgepack_scenarios.py): a system prompt, ~40-token questions,
24-token greedy replies; each server's own replies go back into the history, as a client's would. `--think` is the
pause before the next question (a person reads the reply): the bundle's server settles the reply's KV then, and
moves a conversation that fills its slot to a larger one. `--between` is the pause before each chat. Each
server plays `--chats` chats, each from another topic (only the system prompt repeats between chats); per turn the
best TTFT is kept (the issue's method).
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import re
import sys
import time
from pathlib import Path

from bench_serve import free_port, llama_server, started

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "templates" / "_shared"))
from edgepack_scenarios import QUESTION, REPLY_TOKENS, SYSTEM, TOPICS  # noqa: E402


def turn(port: int, messages: list[dict], tokens: int) -> tuple[float, str]:
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first, text = None, []
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        piece = d.get("choices") and d["choices"][0].get("delta", {}).get("content")
        if piece:
            if first is None:
                first = time.perf_counter()
            text.append(piece)
    c.close()
    return ((first or time.perf_counter()) - t0) * 1000, "".join(text)


def chat(port: int, turns: int, think: float, first: int = 0) -> tuple[list[float], list[str]]:
    """One chat from topic `first` on: a second chat asks other questions, so only the system prompt repeats."""
    messages = [{"role": "system", "content": SYSTEM}]
    ttft, replies = [], []
    for t in range(turns):
        messages.append({"role": "user", "content": QUESTION % TOPICS[(first + t) % len(TOPICS)]})
        ms, text = turn(port, messages, REPLY_TOKENS)
        ttft.append(round(ms, 1))
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
        time.sleep(think)
    return ttft, replies


def metrics(port: int) -> dict[str, float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return {k: float(v) for k, v in re.findall(r"^(edgepack_prompt_\w+) (\S+)$", text, re.M)}


def server(name: str, cmd: list[str], port: int, ready: str, args: argparse.Namespace) -> dict:
    with started(cmd, port, ready):
        turn(port, [{"role": "user", "content": "Hello."}], 4)  # warm-up
        runs = []
        for c in range(args.chats):
            time.sleep(args.between)  # another user, later: the server has settled the last chat
            runs.append(chat(port, args.turns, args.think, 3 * c))
        best = [min(r[0][t] for r in runs) for t in range(args.turns)]
        row = {"server": name, "ttft_ms": best, "ttft_ms_chats": [r[0] for r in runs],
               "turn_last_over_first": round(best[-1] / best[0], 2), "replies": runs[0][1]}
        if "--metrics" in cmd:
            row["metrics"] = metrics(port)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("dist/smollm2-135m-host"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--chats", type=int, default=2)
    ap.add_argument("--think", type=float, default=0.5, help="seconds between a reply and the next question")
    ap.add_argument("--between", type=float, default=3.0, help="seconds before each chat starts")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    run_py = [sys.executable, str(args.bundle / "run.py"), "--threads", str(args.threads), "--metrics", "--serve"]
    rows = []
    p = free_port()
    rows.append(server("edgepack bundle, prompt cache", [*run_py, f"127.0.0.1:{p}", "--system", SYSTEM], p,
                       "/health", args))
    p = free_port()
    rows.append(server("edgepack bundle, --prompt-cache-slots 0", [*run_py, f"127.0.0.1:{p}",
                                                                   "--prompt-cache-slots", "0"], p, "/health", args))
    peer = llama_server(args.threads)  # it reuses the longest common prefix of its context by itself
    if peer:
        rows.append(server("llama-cpp-python server (Q4_1 GGUF)", *peer, "/v1/models", args))
    else:
        print("llama-cpp-python's server is not installed: its row is skipped", file=sys.stderr)
    same = rows[0]["replies"] == rows[1]["replies"]
    doc = {"bench": "chat_turns", "machine": platform.machine(), "threads": args.threads, "turns": args.turns,
           "think_s": args.think, "between_s": args.between, "chats": args.chats, "bundle": str(args.bundle),
           "same_replies_with_and_without_cache": same, "rows": rows}
    for r in rows:
        print(f"{r['server']:<45} " + " ".join(f"{v:7.0f}" for v in r["ttft_ms"])
              + f"   last/first {r['turn_last_over_first']}")
    print(f"the bundle's replies with and without the prompt cache are the same: {same}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"chat_turns{'' if args.think else '_nothink'}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
