"""History trimming of the server (`fit_messages`), the issue #20 chat: thousands of short turns that must be cut to
the newest context's worth. Compares the runner core's `fit_messages` with the rule it replaced (drop the oldest turn,
re-tokenize the whole chat, repeat), with a stand-in runtime whose `prepare` does a real tokenizer's work: a ChatML
template rendered and encoded by a byte-level BPE (the `tokenizers` library, trained here on bench/texts, no download)
into a 4096-token context.

    .venv/bin/python bench/bench_fit_messages.py [--turns 4000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "templates" / "_shared"))
import edgepack_server  # noqa: E402


class Runtime:
    name, threads, max_new_tokens, context_length = "bench", 0, 64, 4096

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.calls, self.chars = tokenizer, 0, 0

    def prepare(self, messages: Any, text: Any) -> tuple[Any, int]:
        prompt = text if messages is None else "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"
        self.calls += 1
        self.chars += len(prompt)
        ids = self.tokenizer.encode(prompt).ids
        return ids, len(ids)


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(p) for p in (ROOT / "bench" / "texts").glob("*.txt")],
              trainers.BpeTrainer(vocab_size=8000, show_progress=False))
    return tok


def one_at_a_time(rt: Runtime, messages: list[dict[str, str]]) -> tuple[Any, int, int]:
    """The rule before issue #20 (quadratic): drop the oldest turn after the system prompt, re-tokenize, repeat."""
    msgs, dropped = list(messages), 0
    while True:
        prepared, n = rt.prepare(msgs, None)
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if n < rt.context_length or len(msgs) - first <= 1:
            return prepared, n, dropped
        del msgs[first]
        dropped += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=4000)
    args = ap.parse_args()
    tok = tokenizer()
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: shall we go on talking?"}
            for i in range(args.turns)]
    print(f"{args.turns} turns, {len(json.dumps(chat)) / 1000:.0f} KB of JSON, context 4096")
    for label, fit in (("one at a time", one_at_a_time), ("fit_messages", edgepack_server.fit_messages)):
        rt = Runtime(tok)
        t0 = time.perf_counter()
        _kept, n, dropped = fit(rt, chat)
        s = time.perf_counter() - t0
        print(f"{label:>13}: {s:7.3f} s, {rt.calls:5d} prepare calls, {rt.chars / 1e6:8.1f} M chars tokenized, "
              f"{dropped} turns dropped, {n} tokens kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
