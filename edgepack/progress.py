"""Progress events the library emits; the CLI decides how (or whether) to show them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    message: str
    done: float | None = None  # units completed, for bars
    total: float | None = None


ProgressFn = Callable[[ProgressEvent], None]


def silent(_event: ProgressEvent) -> None:
    """The default sink: library code never prints."""


@dataclass(frozen=True)
class StageRecord:
    """One stage a build or deploy ran: how long it took and what it made."""

    name: str
    seconds: float
    artifact: str | None = None
    bytes: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class StageRecorder:
    """Announces each stage on the progress sink, times it and keeps its record."""

    def __init__(self, progress: ProgressFn) -> None:
        self.records: list[StageRecord] = []
        self.progress = progress

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[dict[str, Any]]:
        self.progress(ProgressEvent(name, message))
        t0 = time.monotonic()
        info: dict[str, Any] = {}
        yield info
        self.records.append(StageRecord(name, round(time.monotonic() - t0, 3), info.pop("artifact", None),
                                        info.pop("bytes", None), info))
