"""Progress events the library emits; the CLI decides how (or whether) to show them."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


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
    # The largest resident memory of edgepack's process, or of a converter it ran (whichever is larger), during
    # this stage; None where the system does not say (not Linux).
    peak_rss_mib: float | None = None


def _own_peak_kib() -> int | None:
    """This process's peak RSS since the last reset (VmHWM)."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_own_peak() -> None:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")  # Linux >= 4.0: VmHWM starts again from the current RSS


_converter_peak_kib = 0  # the largest converter peak reported (note_converter_peak) since the stage began


def note_converter_peak(kib: int) -> None:
    """A converter edgepack ran (wait4) peaked at `kib`: the stage it ran in records it, whatever ran before it
    (the children's rusage below only shows a child that beat every earlier one)."""
    global _converter_peak_kib
    _converter_peak_kib = max(_converter_peak_kib, kib)


def _children_peak_kib() -> int:
    """The largest peak RSS of any child waited for so far (it only grows)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


class StageRecorder:
    """Announces each stage on the progress sink, times it and keeps its record."""

    def __init__(self, progress: ProgressFn) -> None:
        self.records: list[StageRecord] = []
        self.progress = progress

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[dict[str, Any]]:
        self.progress(ProgressEvent(name, message))
        global _converter_peak_kib
        _reset_own_peak()
        _converter_peak_kib = 0
        children = _children_peak_kib()
        t0 = time.monotonic()
        info: dict[str, Any] = {}
        yield info
        seconds = round(time.monotonic() - t0, 3)
        own, child = _own_peak_kib(), _children_peak_kib()
        # Another child's peak shows only when it beat every earlier child's: then it was this stage's.
        peak = max(own or 0, _converter_peak_kib, child if child > children else 0)
        self.records.append(StageRecord(name, seconds, info.pop("artifact", None), info.pop("bytes", None), info,
                                        round(peak / 1024, 1) if own is not None else None))
