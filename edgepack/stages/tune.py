"""Tune stage: build every candidate the profile names, gate each, time each, keep the fastest that passes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgepack.backends import exporters
from edgepack.backends.base import ExportedModel
from edgepack.errors import QualityGateError, UserError
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.stages.validate import QualityReport, validate
from edgepack.targets import TargetProfile


@dataclass(frozen=True)
class CandidateResult:
    name: str
    options: dict[str, str]
    bytes: int
    passed: bool
    failures: tuple[str, ...]
    ppl_delta_pct: float | None
    mean_kl: float | None
    top1_agreement: float | None
    greedy_match: int | None
    decode_tok_s: float | None  # median of `reps` fresh processes
    decode_tok_s_spread: tuple[float, float] | None
    prefill_ms: float | None
    peak_rss_mb: float | None
    export_s: float
    chosen: bool = False


@dataclass(frozen=True)
class TuneOutcome:
    target: TargetProfile  # with the chosen candidate's [quantize]
    exported: ExportedModel
    report: QualityReport
    table: tuple[CandidateResult, ...]
    speed_measured_on: str


def measure_speed(model_dir: Path, *, tokens: int, reps: int, threads: int) -> list[dict[str, float]]:
    runs = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-m", "edgepack.quality.speed", str(model_dir), "--tokens",
                               str(tokens), "--threads", str(threads)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UserError(f"timing {model_dir.name} failed: {proc.stderr.strip().splitlines()[-1:]}",
                            hint="The candidate does not run in the runtime on this machine.")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


class SpeedMeter(Protocol):
    def __call__(self, model_dir: Path, *, tokens: int, reps: int, threads: int) -> list[dict[str, float]]: ...


def tune(source: ModelSource, target: TargetProfile, work: Path, *, progress: ProgressFn = silent,
         meter: SpeedMeter | None = None, meter_where: str | None = None) -> TuneOutcome:
    import platform

    if not target.tune.candidates:
        raise UserError(f"target '{target.id}' names no [tune] candidates.",
                        hint="Add [tune] candidates = [{name = \"...\", scheme = \"int4\", ...}, ...] to the target.")
    exporter = exporters.get(target.export.format)
    results: list[CandidateResult] = []
    built: dict[str, tuple[ExportedModel, QualityReport, TargetProfile]] = {}
    for i, cand in enumerate(target.tune.candidates):
        progress(ProgressEvent("tune", f"candidate {i + 1}/{len(target.tune.candidates)}: {cand.name}"))
        cand_target = dataclasses.replace(target, quantize=cand.quantize)
        out = work / f"cand-{i}"
        out.mkdir(parents=True)
        t0 = time.monotonic()
        exported = exporter.export(source, cand_target, out, work, progress)
        export_s = round(time.monotonic() - t0, 2)
        report = validate(source, out, cand_target, context=exported.context_length, progress=progress)
        speed: dict[str, float | None] = {"decode_tok_s": None, "prefill_ms": None, "peak_rss_mb": None}
        spread = None
        if report.passed:  # time only what could ship
            runs = (meter or measure_speed)(out, tokens=target.tune.speed_tokens, reps=target.tune.reps,
                                            threads=target.runtime.threads)
            dec = [r["decode_tok_s"] for r in runs]
            speed = {"decode_tok_s": round(statistics.median(dec), 2),
                     "prefill_ms": round(statistics.median(r["prefill_ms"] for r in runs), 2),
                     "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1)}
            spread = (round(min(dec), 2), round(max(dec), 2))
        results.append(CandidateResult(
            name=cand.name, options=exported.options, bytes=exported.bytes, passed=report.passed,
            failures=report.failures, ppl_delta_pct=report.ppl_delta_pct, mean_kl=report.mean_kl,
            top1_agreement=report.top1_agreement, greedy_match=report.greedy_match,
            decode_tok_s=speed["decode_tok_s"], decode_tok_s_spread=spread, prefill_ms=speed["prefill_ms"],
            peak_rss_mb=speed["peak_rss_mb"], export_s=export_s))
        built[cand.name] = (exported, report, cand_target)
    passing = [r for r in results if r.passed]
    if not passing:
        raise QualityGateError(
            f"no tune candidate of target '{target.id}' passes its quality gate: "
            + "; ".join(f"{r.name}: {r.failures[0]}" for r in results),
            hint="Add gentler candidates (int8, block_size 16, head_precision int8) or loosen [quality].",
            candidates=[dataclasses.asdict(r) for r in results])
    best = max(passing, key=lambda r: r.decode_tok_s or 0.0)
    table = tuple(dataclasses.replace(r, chosen=r.name == best.name) for r in results)
    for i, r in enumerate(results):  # keep only the winner's files
        if r.name != best.name:
            shutil.rmtree(work / f"cand-{i}", ignore_errors=True)
    exported, report, cand_target = built[best.name]
    where = meter_where or (f"this machine ({platform.machine()})" + ("" if target.is_native else
                                                                      f", not the {target.resolved_arch()} device"))
    return TuneOutcome(cand_target, exported, report, table, where)


def plot(table: tuple[CandidateResult, ...], path: Path, title: str) -> None:
    """Speed vs quality, one point per candidate that passed (failures on the axis), the chosen one marked."""
    from edgepack.errors import require

    matplotlib = require("matplotlib", "tune", "--plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "tune", "--plot")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in table:
        x = r.ppl_delta_pct or 0.0
        y = r.decode_tok_s or 0.0
        if r.chosen:
            style = {"marker": "*", "s": 260, "color": "tab:green"}
        else:
            style = {"marker": "o", "s": 60, "color": "tab:blue" if r.passed else "tab:red"}
        ax.scatter([x], [y], zorder=3, **style)
        ax.annotate(r.name + ("" if r.passed else " (failed gate)"), (x, y), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.set_xlabel("perplexity increase vs fp32 reference (%)")
    ax.set_ylabel("decode tokens/s (median; 0 = not timed)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


@contextmanager
def speed_meter(device: Any, target: TargetProfile, progress: ProgressFn) -> Iterator[Any]:
    """With --tune-on: a meter that times candidates on that device; else None (timed here)."""
    if device is None:
        yield None
        return
    from edgepack.remote.speed import RemoteSpeedMeter

    meter = RemoteSpeedMeter(device, device.install_dir or target.deploy.install_dir, progress)
    try:
        yield meter
    finally:
        meter.close()
