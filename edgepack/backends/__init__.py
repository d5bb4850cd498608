"""Export formats, registered under the names target profiles use (`export.format`)."""

from __future__ import annotations

from dataclasses import replace

from edgepack.backends.base import Exporter
from edgepack.errors import TargetError
from edgepack.registry import Registry
from edgepack.targets import TargetProfile, check_rules

exporters: Registry[type[Exporter]] = Registry(
    "export format", hint="Set export.format in the target file to one of these.")

# Registration happens on import; the modules import nothing heavy at top level.
from edgepack.backends import onnx as _onnx  # noqa: E402,F401
from edgepack.backends import tflite as _tflite  # noqa: E402,F401


def check_profile(profile: TargetProfile) -> TargetProfile:
    """The profile checked by its format's exporter (targets.py checked the schema and the shared rules when it
    loaded it): what a build, a plan and `targets show` use."""
    exporters.get(profile.export.format).check_profile(profile)
    return profile


def check_candidates(profile: TargetProfile) -> None:
    """Check each [tune] candidate as a [quantize] of its own, naming it.

    Called before a tune starts (and by `targets show`), not on every load: a candidate inherits the target's
    [quantize], so a build that changes, say, the algorithm must not fail on a candidate it never builds."""
    for cand in profile.tune.candidates:
        candidate = replace(profile, quantize=cand.quantize)
        try:
            check_rules(candidate)
            check_profile(candidate)
        except TargetError as exc:
            raise TargetError(f"tune candidate '{cand.name}': {exc.message}", hint=exc.hint,
                              **{**exc.fields, "field": f"tune.candidates.{cand.name}"}) from exc
