"""Export stage (export + quantize through the target's exporter) and the quality gate's measurement, each served
from the build cache (cache.py) when the same inputs were built before."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgepack.backends import exporters
from edgepack.backends.base import ExportedModel
from edgepack.build_memory import BuildCost, check_build_memory
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
    """What the export stage made, and the cache key the gate's entry hangs off ({} with no cache), with the
    content digest of the model files the gate will score ("" with no cache)."""

    model: ExportedModel
    key: dict[str, Any]
    cached: bool
    cache: Cache | None
    content: str = ""


def export(source: ModelSource, target: TargetProfile, model_dir: Path, work: Path, progress: ProgressFn, *,
           use_cache: bool, cost: BuildCost | None = None) -> Exported:
    """The target's export, from the cache when it has it; else, when `cost` (the build's plan on this machine)
    does not fit the machine's memory, refused before the converter starts (build_memory.check_build_memory)."""
    cache = Cache() if use_cache and cache_enabled() else None
    key = export_key(source, target) if cache else {}
    hit = cache.get_export(key, model_dir) if cache else None
    if hit is not None and hit.data is not None:
        progress(ProgressEvent("export", "reused from the build cache (same model, profile and tools; every file's "
                                         "sha256 checked)"))
        return Exported(exported_from(hit.data, model_dir), key, True, cache, hit.content)
    if hit is not None and hit.discarded:
        progress(ProgressEvent("export", f"the build cache's export for this build was discarded: {hit.discarded}; "
                                         "exporting again"))
    if cost is not None:
        check_build_memory(cost, source.name)
    model = exporters.get(target.export.format).export(source, target, model_dir, work, progress)
    content = ""
    if cache:
        content = cache.put_export(key, model_dir, model, f"{source.name} for {target.id}: {model.scheme}")
    return Exported(model, key, False, cache, content)


def gate(source: ModelSource, target: TargetProfile, exp: Exported, progress: ProgressFn, *,
         adapter: Path | None = None, slots: tuple[str, ...] = ()) -> tuple[QualityReport, bool]:
    """The gate's measurements (cached ones judged against this target's tolerances); (report, from the cache).
    With `adapter` (a runtime adapter file for the export's LoRA `slots`), `source` is its float merged model and
    the measurements are cached under the export's key, the slots and the adapter file's sha256."""
    model = exp.model
    gkey = _gate_key(exp.key, exp.content, target, model.context_length) if exp.cache else {}
    if exp.cache and adapter is not None:
        from edgepack.fsutil import sha256_file

        gkey |= {"adapter": sha256_file(adapter), "slots": list(slots)}
    measured = exp.cache.get_gate(gkey) if exp.cache else None
    if measured is not None and measured.data is not None:
        progress(ProgressEvent("validate", "measurements reused from the build cache (taken on these exact model "
                                           "files); judged against this target's tolerances"))
        from edgepack.stages.validate import reference_of

        return dataclasses.replace(report_from(measured.data, target), reference=reference_of(source)), True
    if measured is not None and measured.discarded:
        progress(ProgressEvent("validate", f"the build cache's measurements were discarded: {measured.discarded}; "
                                           "scoring again"))
    report = validate(source, model.dir, target, context=model.context_length, progress=progress, adapter=adapter)
    if exp.cache:
        exp.cache.put_gate(gkey, report, f"{source.name} for {target.id}: {model.scheme}")
    return report, False


def _gate_key(export: dict[str, Any], content: str, target: TargetProfile, context: int) -> dict[str, Any]:
    from edgepack.quality import checks as task_checks
    from edgepack.quality import texts

    checks_sha = None
    if target.quality.checks:
        checks_sha = task_checks.load(task_checks.resolve_path(target.quality.checks, target.source))[1]
    text_sha = texts.for_target(target.quality.eval_text, target.source).sha256
    return gate_key(export, content, target, text_sha, checks_sha, context)
