"""Progress events the library emits; the CLI decides how (or whether) to show them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    message: str
    done: float | None = None  # units completed, for bars
    total: float | None = None


ProgressFn = Callable[[ProgressEvent], None]


def silent(_event: ProgressEvent) -> None:
    """The default sink: library code never prints."""
