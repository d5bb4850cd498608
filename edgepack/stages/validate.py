"""Validate stage: score the exported model through the bundle's runtime against the fp32 reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.backends import exporters
from edgepack.errors import BuilderCrashError, ModelError, QualityGateError
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.quality import checks as task_checks
from edgepack.quality import texts
from edgepack.quality.checks import ChecksReport
from edgepack.quality.metrics import common_prefix, compare_window, log_softmax, perplexity
from edgepack.quality.reference import score_reference
from edgepack.targets import QualitySpec, TargetProfile


@dataclass(frozen=True)
class QualityReport:
    validated: bool  # False only with --skip-validation
    passed: bool
    text: str
    text_sha256: str
    tokens_scored: int
    ppl_reference: float | None
    ppl_quantized: float | None
    ppl_delta_pct: float | None
    mean_kl: float | None
    top1_agreement: float | None
    greedy_match: int | None  # teacher-forced: positions of the reference's greedy reply the bundle also picks
    greedy_prefix: int | None  # free-running: tokens before the first divergence (brittle at near-ties)
    greedy_tokens: int
    tolerances: QualitySpec
    failures: tuple[str, ...]
    prompt_ids: tuple[int, ...]
    golden_tokens: tuple[int, ...]  # what the quantized model generates: the device must reproduce these
    golden_checked: tuple[bool, ...]  # positions whose top-1/top-2 margin is wide enough to demand on any CPU
    device_ids: tuple[int, ...]  # a short text the device re-scores in its smoke test...
    device_ppl: float | None  # ...whose perplexity on the build machine was this
    device_top1: tuple[int, ...]  # ...and whose next-token picks were these
    reference_cached: bool
    scored_on: str = "cpu"  # the execution provider the gate ran the bundle's graph with
    golden_logp: tuple[float, ...] = ()  # log p(golden token | prefix) at build: runtimes without logits compare these
    checks: ChecksReport | None = None  # the user's task checks (quality.checks), float vs quantized
    reference: str = ""  # what every delta is measured against (reference_of): says when that is already quantized


def reference_of(source: Any) -> str:
    """The float model the gate compares with, in words. A GGUF's "float" reference is its quantized weights
    dequantized, so every delta is against an already-quantized model, not the original checkpoint."""
    merged = " with its LoRA adapter merged" if getattr(source, "adapter", None) else ""
    if source.kind in ("pypi-gguf", "gguf"):
        return (f"{source.origin}{merged}: the GGUF's quantized weights dequantized to float32 (already quantized: "
                "deltas are against that model, not the original float checkpoint)")
    return f"{source.origin}{merged} at float32"


def unvalidated(target: TargetProfile) -> QualityReport:
    return QualityReport(False, False, "", "", 0, None, None, None, None, None, None, None, 0, target.quality,
                         (), (), (), (), (), None, (), False)


def judge(tol: QualitySpec, *, delta_pct: float, kl: float, top1: float, greedy: int) -> tuple[str, ...]:
    failures = []
    if delta_pct > tol.max_ppl_increase_pct:
        failures.append(f"perplexity +{delta_pct:.1f}% > allowed +{tol.max_ppl_increase_pct:.1f}%")
    if kl > tol.max_mean_kl:
        failures.append(f"mean KL {kl:.4f} > allowed {tol.max_mean_kl:.4f}")
    if top1 < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {top1:.3f} < required {tol.min_top1_agreement:.3f}")
    if greedy < tol.min_greedy_match:
        failures.append(f"greedy match {greedy} tokens < required {tol.min_greedy_match}")
    return tuple(failures)


def validate(source: ModelSource, model_dir: Path, target: TargetProfile, *, context: int = 0,
             progress: ProgressFn = silent, adapter: Path | None = None) -> QualityReport:
    """`context`: the bundle's context length; the gate never scores a window longer than it. With `adapter` (a
    runtime LoRA file for the graph's slots), `source` is the float merged model it is scored against."""
    text = texts.for_target(target.quality.eval_text, target.source)
    window = min(texts.WINDOW, context - 1) if context else texts.WINDOW  # the scorer asks for one more position
    ref = score_reference(source, text=text, window=window, progress=progress)
    exporter = exporters.get(target.export.format)
    progress(ProgressEvent("validate", f"scoring the {target.quantize.scheme} model through {exporter.runtime}"))
    try:
        return _score(source, model_dir, target, ref, exporter.scorer(model_dir, adapter), text, progress)
    except RuntimeError as exc:
        # The family and the profile were checked before export: a graph the runtime then refuses is a bug of
        # the exporter or the runtime, and no quantize setting is known to fix it (nothing was written).
        raise BuilderCrashError(f"the exported model does not run in {exporter.runtime} on this machine "
                                f"({source.architecture}); nothing was written.", tool=exporter.runtime,
                                log_tail=str(exc).splitlines()[:5]) from exc


def _score(source: ModelSource, model_dir: Path, target: TargetProfile, ref: Any, scorer: Any,
           text: texts.EvalText, progress: ProgressFn) -> QualityReport:
    runtime_ids = scorer.encode(text.text)
    if runtime_ids != ref.ids:
        at = common_prefix(runtime_ids, ref.ids)
        raise ModelError(
            f"the bundle's tokenizer disagrees with the reference tokenizer at token {at} of the held-out text "
            f"({runtime_ids[at:at + 3]} vs {ref.ids[at:at + 3]}).",
            hint="The exported tokenizer files are wrong for this model; report it with the model id.")
    nll = kl = 0.0
    agree = count = 0
    for i, ((s, e), w) in enumerate(zip(ref.windows, ref.scored, strict=True)):
        progress(ProgressEvent("validate", "quantized", done=i, total=len(ref.windows)))
        c = compare_window(w, scorer.logits(ref.ids[s:e]))
        nll, kl, agree, count = nll + c.nll_sum, kl + c.kl_sum, agree + c.top1_agree, count + c.count
    n_prompt = len(ref.prompt_ids)
    forced = scorer.logits(ref.prompt_ids + ref.greedy)[n_prompt - 1:-1].argmax(axis=-1)
    match = int(sum(int(a) == b for a, b in zip(forced, ref.greedy, strict=True)))
    greedy_q = scorer.greedy(ref.prompt_ids, texts.GREEDY_TOKENS)
    golden = greedy_q[: target.quality.golden_tokens]
    golden_logits = scorer.logits(ref.prompt_ids + golden)[n_prompt - 1:-1]
    checked = golden_margins(golden_logits, golden)
    golden_lp = log_softmax(golden_logits)[range(len(golden)), golden]
    dev_ids = ref.ids[: texts.DEVICE_CHECK_TOKENS]
    dev_lp = log_softmax(scorer.logits(dev_ids)[:-1])
    dev_nll = -dev_lp[range(len(dev_ids) - 1), dev_ids[1:]]
    ppl_r, ppl_q = perplexity(ref.nll_sum, ref.count), perplexity(nll, count)
    delta = (ppl_q / ppl_r - 1.0) * 100.0
    mean_kl, top1 = kl / count, agree / count
    failures = judge(target.quality, delta_pct=delta, kl=mean_kl, top1=top1, greedy=match)
    checks = None
    if target.quality.checks:
        path = task_checks.resolve_path(target.quality.checks, target.source)
        items, sha = task_checks.load(path)
        progress(ProgressEvent("validate", f"{len(items)} task checks from {path.name}: float vs quantized"))
        checks = task_checks.run(items, sha, path.name, source, scorer, target.quality.checks_max_drop)
        failures += task_checks.failures(checks)
    report = QualityReport(
        validated=True, passed=not failures, text=text.name, text_sha256=text.sha256, tokens_scored=count,
        ppl_reference=round(ppl_r, 4), ppl_quantized=round(ppl_q, 4), ppl_delta_pct=round(delta, 2),
        mean_kl=round(mean_kl, 5), top1_agreement=round(top1, 4), greedy_match=match,
        greedy_prefix=common_prefix(greedy_q, ref.greedy),
        greedy_tokens=texts.GREEDY_TOKENS, tolerances=target.quality, failures=failures,
        prompt_ids=tuple(ref.prompt_ids), golden_tokens=tuple(golden), golden_checked=checked,
        device_ids=tuple(dev_ids), device_ppl=round(perplexity(float(dev_nll.sum()), len(dev_nll)), 4),
        device_top1=tuple(int(t) for t in dev_lp.argmax(axis=-1)), scored_on=getattr(scorer, "scored_on", "cpu"),
        reference_cached=ref.cached, golden_logp=tuple(round(float(x), 4) for x in golden_lp), checks=checks,
        reference=reference_of(source))
    return report


GOLDEN_MARGIN = 0.05  # probability gap between the top two tokens below which a position is a near-tie


def golden_margins(logits: Any, golden: list[int]) -> tuple[bool, ...]:
    """Which golden positions a device must reproduce: those the build machine picked with a clear margin."""
    import numpy as np

    lp = log_softmax(logits)
    top2 = np.sort(lp, axis=-1)[:, -2:]
    margin = np.exp(top2[:, 1]) - np.exp(top2[:, 0])
    return tuple(bool(m >= GOLDEN_MARGIN and int(a) == g)
                 for m, a, g in zip(margin, lp.argmax(axis=-1), golden, strict=True))


def enforce(report: QualityReport, target: TargetProfile, subject: str = "") -> None:
    """`subject`: what was scored when it is not the bundle's model itself ("runtime adapter 'x'")."""
    if report.validated and not report.passed:
        raise QualityGateError(
            f"quality gate failed for {subject + ' on ' if subject else ''}target '{target.id}': "
            + "; ".join(report.failures)
            + f" (ppl {report.ppl_reference} → {report.ppl_quantized}, KL {report.mean_kl}, "
              f"top-1 {report.top1_agreement}, greedy {report.greedy_match}/{report.greedy_tokens}; against "
              f"{report.reference or 'the float model'}, on {report.text}).",
            hint="No bundle was written. Use a gentler quantize scheme in the target (algorithm = \"imatrix\", "
                 "int8, head_precision = \"int8\", block_size = 16), or loosen [quality] if you accept the loss.",
            report={"ppl_reference": report.ppl_reference, "ppl_quantized": report.ppl_quantized,
                    "ppl_delta_pct": report.ppl_delta_pct, "mean_kl": report.mean_kl,
                    "top1_agreement": report.top1_agreement, "greedy_match": report.greedy_match,
                    "failures": list(report.failures), "reference": report.reference, "text": report.text})
