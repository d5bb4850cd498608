"""The fixed texts every build is scored on (shipped with edgepack, license-clean)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edgepack.resources import data_file

HELDOUT_FILE = "heldout-apache-2.0.txt"  # the Apache License 2.0 text: ~2,200 tokens, freely redistributable
GREEDY_PROMPT = "Write a haiku about the sea."
WINDOW = 512
GREEDY_TOKENS = 32
TOP_K = 64
DEVICE_CHECK_TOKENS = 128  # the start of the held-out text, re-scored on the device by its smoke test


@dataclass(frozen=True)
class EvalText:
    name: str
    text: str
    sha256: str


def heldout() -> EvalText:
    text = data_file(HELDOUT_FILE).read_text(encoding="utf-8")
    return EvalText(HELDOUT_FILE, text, hashlib.sha256(text.encode()).hexdigest())


MIN_EVAL_CHARS = 2000  # about 500 tokens: fewer make perplexity and KL too noisy to gate on


def for_target(eval_text: str, target_source: str) -> EvalText:
    """quality.eval_text (relative to the target file), else the shipped held-out text."""
    from pathlib import Path

    from edgepack.errors import UserError

    if not eval_text:
        return heldout()
    path = Path(eval_text).expanduser()
    if not path.is_absolute():
        path = Path(target_source).parent / path
    if not path.is_file():
        raise UserError(f"quality.eval_text {eval_text} does not exist (looked at {path}).",
                        hint="Give a UTF-8 text file of your domain (relative to the target file), or drop "
                             "--eval-text to score on the shipped text.", path=str(path), field="quality.eval_text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"quality.eval_text {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).",
                        hint="Convert it to UTF-8.", path=str(path), field="quality.eval_text") from exc
    if len(text.strip()) < MIN_EVAL_CHARS:
        raise UserError(f"quality.eval_text {path} holds {len(text.strip())} characters; the gate needs at least "
                        f"{MIN_EVAL_CHARS} (about 500 tokens) to measure perplexity and KL.",
                        hint="Add more text of your domain.", path=str(path), field="quality.eval_text")
    return EvalText(path.name, text, hashlib.sha256(text.encode()).hexdigest())


def windows(n: int, size: int = WINDOW) -> list[tuple[int, int]]:
    """Non-overlapping windows; each is scored from a fresh context, so both runtimes see the same thing."""
    return [(s, min(s + size, n)) for s in range(0, n, size) if min(s + size, n) - s >= 2]
