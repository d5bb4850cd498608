"""Resolve stage: what a build is about, decided once. The target profile (with the build's options applied in one
place), the model source, its exporter and family, the context it will hold, its fit on the device and the build's
cost on this machine. Every later stage reads these; none rewrites the profile."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.source import ModelSource
from edgepack.targets import TargetProfile


@dataclass(frozen=True)
class Resolved:
    target: TargetProfile  # the profile the build uses: format, user's texts and the context applied
    source: ModelSource
    exporter: Any  # the registered exporter of target.export.format
    family: Any  # the families.toml row the model matched (families.Family)
    context: Any  # context.ContextChoice: the tokens the bundle holds, where that came from and why
    fit: Any  # plan.Fit: the runtime's predicted peak on the device (recorded in the manifest, read by preflight)
    cost: Any  # build_memory.BuildCost: the build's planned peak on this machine

    def record(self) -> dict[str, Any]:
        """The resolve stage's record (what `--json` shows for it)."""
        return {"artifact": str(self.source.hf_dir), "origin": self.source.origin,
                "architecture": self.source.architecture, "family": self.family.id,
                "planned_peak_mib": round(self.fit.total / 2**20, 1), "context": self.context.tokens,
                "context_source": self.context.source, "planned_build_peak_mib": round(self.cost.peak / 2**20),
                "build_memory_mib": round(self.cost.budget / 2**20) if self.cost.budget else None}


def profile(target_ref: str, *, fmt: str | None = None, eval_text: Path | None = None,
            checks: Path | None = None, tune: bool = False) -> TargetProfile:
    """The target file, with the build's options applied: --format, the user's evaluation text and checks."""
    from edgepack.backends import check_candidates, check_profile
    from edgepack.stages.export import with_format
    from edgepack.targets import load_target

    target = check_profile(with_format(load_target(target_ref), fmt))
    if tune:
        check_candidates(target)  # every candidate now, not the fourth one an hour into the tune
    return with_texts(target, eval_text, checks)


def with_texts(target: TargetProfile, eval_text: Path | None, checks: Path | None) -> TargetProfile:
    """The user's evaluation text and task checks (--eval-text, --checks) in place of the target's."""
    if eval_text is not None or checks is not None:
        q = target.quality
        target = dataclasses.replace(target, quality=dataclasses.replace(
            q, eval_text=str(eval_text.expanduser().resolve()) if eval_text else q.eval_text,
            checks=str(checks.expanduser().resolve()) if checks else q.checks))
    return target


def built_with(manifest_path: Path, doc: dict[str, Any]) -> TargetProfile:
    """The target profile a bundle was built with, as its manifest records it (less the evaluation text and checks,
    which it names but does not carry)."""
    from edgepack.backends import check_profile
    from edgepack.targets import parse_target

    data = {k: v for k, v in doc["target"]["profile"].items() if k not in ("id", "source", "tune")}
    data["quality"] = {**data.get("quality", {}), "eval_text": "", "checks": ""}
    return check_profile(parse_target(data, target_id=str(doc["target"]["id"]), source=str(manifest_path)))


def resolve(model: str, target: TargetProfile, *, adapter: Path | None = None, context: int = 0,
            progress: ProgressFn = silent) -> Resolved:
    """The model (and a merged adapter), the context it holds on this target, its family, fit and build cost."""
    from edgepack.backends import exporters
    from edgepack.build_memory import build_cost, machine_memory
    from edgepack.context import choose_context
    from edgepack.models import resolve_model
    from edgepack.plan import check_fits

    exporter = exporters.get(target.export.format)
    source = resolve_model(model, progress=progress)
    if adapter is not None:
        from edgepack.adapter import merge_adapter

        source = merge_adapter(source, adapter, progress=progress)
    config = json.loads((source.hf_dir / "config.json").read_text(encoding="utf-8"))
    chosen = choose_context(config, target, context)
    target = chosen.apply(target)
    if chosen.capped:
        progress(ProgressEvent("resolve", f"context {chosen.tokens} tokens: {chosen.reason}"))
    family = exporter.check_supported(source, target)
    fit = check_fits(source, target)
    return Resolved(target, source, exporter, family, chosen, fit, build_cost(config, target, machine_memory()))
