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


def windows(n: int, size: int = WINDOW) -> list[tuple[int, int]]:
    """Non-overlapping windows; each is scored from a fresh context, so both runtimes see the same thing."""
    return [(s, min(s + size, n)) for s in range(0, n, size) if min(s + size, n) - s >= 2]
