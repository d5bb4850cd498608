"""History trimming of the server (`fit_messages`), the issue #20 chat: thousands of short turns that must be cut to
the newest context's worth. Compares a given revision's runner core (default HEAD, git show) with the working tree's,
with a stand-in runtime whose `prepare` does a real tokenizer's work: a ChatML template rendered and encoded by a
byte-level BPE (the `tokenizers` library, trained here on bench/texts, no download) into a 4096-token context.

    .venv/bin/python bench/bench_fit_messages.py [--turns 4000] [--rev HEAD]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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


def core(source: str, where: Path) -> Any:
    """The server module from `source`, imported beside the working tree's edgepack_runner.py."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "edgepack_server.py").write_text(source)
    sys.path.insert(0, str(ROOT / "templates" / "_shared"))
    spec = importlib.util.spec_from_file_location("server_" + where.name, where / "edgepack_server.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=4000)
    ap.add_argument("--rev", default="HEAD", help="the revision to compare with the working tree")
    args = ap.parse_args()
    tok = tokenizer()
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: shall we go on talking?"}
            for i in range(args.turns)]
    print(f"{args.turns} turns, {len(json.dumps(chat)) / 1000:.0f} KB of JSON, context 4096")
    old = subprocess.run(["git", "show", f"{args.rev}:templates/_shared/edgepack_server.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    new = (ROOT / "templates" / "_shared" / "edgepack_server.py").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for label, source in ((args.rev, old), ("working tree", new)):
            mod, rt = core(source, Path(tmp) / label.replace(" ", "_")), Runtime(tok)
            t0 = time.perf_counter()
            _kept, n, dropped = mod.fit_messages(rt, chat)
            s = time.perf_counter() - t0
            print(f"{label:>13}: {s:7.3f} s, {rt.calls:5d} prepare calls, {rt.chars / 1e6:8.1f} M chars tokenized, "
                  f"{dropped} turns dropped, {n} tokens kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
