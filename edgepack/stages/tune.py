"""Tune stage: build every candidate the profile names, gate each, time each, keep the fastest that passes."""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgepack.backends.base import ExportedModel
from edgepack.errors import QualityGateError, UserError
from edgepack.meter import HereMeter, Meter, runner_folder, scenario_args
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.stages.export import export as export_stage
from edgepack.stages.export import gate
from edgepack.stages.validate import QualityReport
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
    cached: bool = False  # the export came from the build cache
    chosen: bool = False


# n-gram speculative decoding is switched on by --tune only where it decodes at least this much faster on the
# extraction scenario and no slower on the chat scenario (edgepack_scenarios.py), on the meter's machine.
SPECULATIVE_MIN_GAIN = 1.05


@dataclass(frozen=True)
class SpeculativeChoice:
    """`runtime.speculative = "auto"` under --tune: what the A/B measured and what the bundle got."""

    chosen: Literal["ngram", "off"]
    extraction_speedup: float | None  # n-gram decode tok/s over plain, the reply copying the prompt
    chat_speedup: float | None  # the same in the 10-turn chat (prompt cache on in both arms)
    same_tokens: bool  # n-gram's greedy tokens were the plain arm's in both scenarios
    reason: str


@dataclass(frozen=True)
class TuneOutcome:
    target: TargetProfile  # with the chosen candidate's [quantize]
    exported: ExportedModel
    report: QualityReport
    table: tuple[CandidateResult, ...]
    speed_measured_on: str
    speculative: SpeculativeChoice | None = None  # with runtime.speculative = "auto" (ONNX)


def tune_stage(r: Any, work: Path, model_dir: Path, device: Any, *, use_cache: bool,
               progress: ProgressFn = silent) -> TuneOutcome:
    """`build --tune`: the candidates of the resolved build (stages.resolve.Resolved) tuned, timed here or on
    `device` (--tune-on); the winner's files end up in `model_dir`."""
    with speed_meter(device, r.target, progress) as meter:
        outcome = tune(r.source, r.target, work, progress=progress, meter=meter, use_cache=use_cache, cost=r.cost)
    model_dir.rmdir()
    shutil.move(str(outcome.exported.dir), model_dir)
    return dataclasses.replace(outcome, exported=dataclasses.replace(outcome.exported, dir=model_dir))


def tune(source: ModelSource, target: TargetProfile, work: Path, *, progress: ProgressFn = silent,
         meter: Meter | None = None, use_cache: bool = True, cost: Any = None) -> TuneOutcome:
    """Each candidate through the export stage and the gate (both from the build cache when it has them), then,
    when it passes, timed by `meter` running the bundle's own runner for it (default: here)."""
    import platform

    if not target.tune.candidates:
        raise UserError(f"target '{target.id}' names no [tune] candidates.",
                        hint="Add [tune] candidates = [{name = \"...\", scheme = \"int4\", ...}, ...] to the target.")
    if meter is None:
        meter = HereMeter(f"this machine ({platform.machine()})" + ("" if target.is_native else
                                                                   f", not the {target.resolved_arch()} device"),
                          progress)
    results: list[CandidateResult] = []
    built: dict[str, tuple[ExportedModel, QualityReport, TargetProfile]] = {}
    for i, cand in enumerate(target.tune.candidates):
        progress(ProgressEvent("tune", f"candidate {i + 1}/{len(target.tune.candidates)}: {cand.name}"))
        cand_target = dataclasses.replace(target, quantize=cand.quantize)
        out = work / f"cand-{i}"
        out.mkdir(parents=True)
        t0 = time.monotonic()
        made = export_stage(source, cand_target, out, work, progress, use_cache=use_cache, cost=cost)
        exported = made.model
        export_s = round(time.monotonic() - t0, 2)
        report, _ = gate(source, cand_target, made, progress)
        speed: dict[str, float | None] = {"decode_tok_s": None, "prefill_ms": None, "peak_rss_mb": None}
        spread = None
        if report.passed:  # time only what could ship, with the runner its bundle will ship
            with runner_folder(_context(source, cand_target, exported, report), cand_target.runtime.template,
                               out, work) as runner:
                runs = meter(runner, tokens=target.tune.speed_tokens, reps=target.tune.reps,
                             threads=target.runtime.threads)
            dec = [float(r["decode_tokens_per_s"]) for r in runs]
            speed = {"decode_tok_s": round(statistics.median(dec), 2),
                     "prefill_ms": round(statistics.median(float(r["prefill_ms"]) for r in runs), 2),
                     "peak_rss_mb": round(statistics.median(float(r["peak_rss_mb"]) for r in runs), 1)}
            spread = (round(min(dec), 2), round(max(dec), 2))
        results.append(CandidateResult(
            name=cand.name, options=exported.options, bytes=exported.bytes, passed=report.passed,
            failures=report.failures, ppl_delta_pct=report.ppl_delta_pct, mean_kl=report.mean_kl,
            top1_agreement=report.top1_agreement, greedy_match=report.greedy_match,
            decode_tok_s=speed["decode_tok_s"], decode_tok_s_spread=spread, prefill_ms=speed["prefill_ms"],
            peak_rss_mb=speed["peak_rss_mb"], export_s=export_s, cached=made.cached))
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
    choice = None
    if cand_target.export.format == "onnx" and cand_target.runtime.speculative == "auto":
        progress(ProgressEvent("tune", f"speculative decoding: n-gram against plain, on {meter.where}"))
        with runner_folder(_context(source, cand_target, exported, report), cand_target.runtime.template,
                           exported.dir, work) as runner:
            choice = choose_speculative(meter, runner, target.runtime.threads)
        cand_target = dataclasses.replace(cand_target, runtime=dataclasses.replace(cand_target.runtime,
                                                                                   speculative=choice.chosen))
    return TuneOutcome(cand_target, exported, report, table, meter.where, choice)


def choose_speculative(meter: Meter, runner: Path, threads: int) -> SpeculativeChoice:
    """A/B n-gram speculative decoding with the bundle's own runner: on only where it measured faster."""
    ext = meter(runner, tokens=0, reps=1, threads=threads, args=scenario_args("extraction", threads))[0]
    chat = meter(runner, tokens=0, reps=1, threads=threads, args=scenario_args("chat", threads))[0]
    ex = ext.get("ngram_speedup")
    plain, ngram = chat.get("decode_tokens_per_s_prompt_cache"), chat.get("decode_tokens_per_s_prompt_cache_ngram")
    cx = round(ngram / plain, 3) if plain and ngram else None
    same = bool((ext.get("same_tokens") or {}).get("ngram")) and bool(
        (chat.get("same_tokens") or {}).get("prompt_cache+ngram"))
    on = ex is not None and cx is not None and ex >= SPECULATIVE_MIN_GAIN and cx >= 1.0
    reason = (f"n-gram decoded {ex}x plain on the extraction scenario and {cx}x in the chat"
              + ("" if on else f"; it is switched on at >= {SPECULATIVE_MIN_GAIN}x and >= 1.0x"))
    return SpeculativeChoice("ngram" if on else "off", ex, cx, same, reason)


def _context(source: ModelSource, target: TargetProfile, exported: ExportedModel, report: QualityReport) -> Any:
    """The bundle context the candidate would ship with (its runner is rendered from it)."""
    from edgepack.stages.render import bundle_context
    from edgepack.stages.wheels import requirements

    return bundle_context(f"{source.name}-{target.id}", source, target, exported, report,
                          requirements(target, exported.runtime_versions))


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
def speed_meter(device: Any, target: TargetProfile, progress: ProgressFn) -> Iterator[Meter | None]:
    """With --tune-on: a meter that times candidates on that device; else None (timed here)."""
    if device is None:
        yield None
        return
    from edgepack.bundle_format import install_dir
    from edgepack.remote.speed import RemoteSpeedMeter

    meter = RemoteSpeedMeter(device, install_dir(device.install_dir, target.deploy.install_dir), progress)
    try:
        yield meter
    finally:
        meter.close()
