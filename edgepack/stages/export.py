"""Export stage (export + quantize through the target's exporter) and the quality gate's measurement, each served
from the build cache (cache.py) when the same inputs were built before."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgepack.backends import exporters
from edgepack.backends.base import ExportedModel
from edgepack.cache import Cache, export_key, exported_from, gate_key, report_from
from edgepack.cache import enabled as cache_enabled
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn
from edgepack.stages.validate import QualityReport, validate
from edgepack.targets import TargetProfile


def with_format(target: TargetProfile, fmt: str | None) -> TargetProfile:
    """`--format` overrides the target's export format, and with it the runtime template and packages."""
    if fmt is None or fmt == target.export.format:
        return target
    exporter = exporters.get(fmt)
    export = dataclasses.replace(target.export, format=fmt)
    runtime = dataclasses.replace(target.runtime, template=exporter.template, packages=exporter.packages)
    quantize = target.quantize
    if fmt == "onnx" and quantize.algorithm in ("weight_only", "smoothquant"):  # TFLite's int8 recipes; ONNX
        quantize = dataclasses.replace(quantize, algorithm="default")           # int8 is weight-only already
    if fmt == "onnx":
        quantize = dataclasses.replace(quantize, litert_layers=())
    return dataclasses.replace(target, export=export, runtime=runtime, quantize=quantize)


@dataclasses.dataclass
class Exported:
    """What the export stage made, and the cache key the gate's entry hangs off ({} with no cache)."""

    model: ExportedModel
    key: dict[str, Any]
    cached: bool
    cache: Cache | None


def export(source: ModelSource, target: TargetProfile, model_dir: Path, work: Path, progress: ProgressFn, *,
           use_cache: bool) -> Exported:
    cache = Cache() if use_cache and cache_enabled() else None
    key = export_key(source, target) if cache else {}
    hit = cache.get_export(key, model_dir) if cache else None
    if hit is not None:
        progress(ProgressEvent("export", "reused from the build cache (same model, profile and tools)"))
        return Exported(exported_from(hit, model_dir), key, True, cache)
    model = exporters.get(target.export.format).export(source, target, model_dir, work, progress)
    if cache:
        cache.put_export(key, model_dir, model, f"{source.name} for {target.id}: {model.scheme}")
    return Exported(model, key, False, cache)


def gate(source: ModelSource, target: TargetProfile, exp: Exported, progress: ProgressFn) -> tuple[QualityReport, bool]:
    """The gate's measurements (cached ones judged against this target's tolerances); (report, from the cache)."""
    model = exp.model
    gkey = _gate_key(exp.key, target, model.context_length) if exp.cache else {}
    measured = exp.cache.get_gate(gkey) if exp.cache else None
    if measured is not None:
        progress(ProgressEvent("validate", "measurements reused from the build cache; judged against this "
                                           "target's tolerances"))
        from edgepack.stages.validate import reference_of

        return dataclasses.replace(report_from(measured, target), reference=reference_of(source)), True
    report = validate(source, model.dir, target, context=model.context_length, progress=progress)
    if exp.cache:
        exp.cache.put_gate(gkey, report, f"{source.name} for {target.id}: {model.scheme}")
    return report, False


def _gate_key(export: dict[str, Any], target: TargetProfile, context: int) -> dict[str, Any]:
    from edgepack.quality import checks as task_checks
    from edgepack.quality import texts

    checks_sha = None
    if target.quality.checks:
        checks_sha = task_checks.load(task_checks.resolve_path(target.quality.checks, target.source))[1]
    return gate_key(export, target, texts.for_target(target.quality.eval_text, target.source).sha256, checks_sha,
                    context)
