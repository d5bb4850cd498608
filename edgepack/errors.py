"""The one error tree: user errors (message + hint, exit 1) versus bugs (traceback, exit 2).

Every error has a stable `code` a pipeline can branch on (docs/json.md lists them all; a test pins the list):
the class's own, or a more specific one given where it is raised (`code="host_key_unknown"`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class EdgepackError(Exception):
    """Base of every error edgepack raises on purpose."""

    exit_code = 2
    kind = "internal"
    code = "internal"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code
        self.fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "code": self.code, "message": self.message, "hint": self.hint, **self.fields}


class UserError(EdgepackError):
    """Something the user can fix: bad input, missing extra, unreachable host, failed gate."""

    exit_code = 1
    kind = "user"
    code = "invalid_input"


class TargetError(UserError):
    kind = "target"
    code = "target_invalid"


class ModelError(UserError):
    kind = "model"
    code = "model_invalid"


class DeviceLocked(UserError):
    """Another edgepack operation holds the device's install dir (nothing was changed)."""

    kind = "device-locked"
    code = "device_locked"


class NoPythonError(UserError):
    """The device has no python3, which the device program (signature check, atomic switch, rollback) needs."""

    code = "device_unfit"


class Interrupted(UserError):
    """Ctrl-C or a cancelled CI job during a device operation (exit 130: the device is in a stated, safe state)."""

    kind = "interrupted"
    code = "interrupted"
    exit_code = 130


class MissingExtraError(UserError):
    kind = "missing-extra"
    code = "missing_extra"

    def __init__(self, module: str, extra: str, *, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed.",
            hint=f"pip install 'edgepack[{extra}]'",
            module=module,
            extra=extra,
        )


class OutputExistsError(UserError):
    kind = "output-exists"
    code = "output_exists"


class QualityGateError(UserError):
    kind = "quality-gate"
    code = "quality_gate_failed"


class BundleError(UserError):
    kind = "bundle"
    code = "bundle_invalid"


class UnknownNameError(UserError):
    """A registry or alias miss: lists the names that do exist."""

    kind = "unknown-name"
    code = "unknown_name"

    def __init__(self, what: str, name: str, known: Sequence[str], *, hint: str | None = None) -> None:
        listing = ", ".join(sorted(known)) or "(none)"
        super().__init__(
            f"unknown {what} '{name}'. Known: {listing}.",
            hint=hint,
            what=what,
            name=name,
            known=sorted(known),
        )


class BuildOutOfMemoryError(UserError):
    """The build does not fit the build machine's memory: refused before exporting (`stage` "plan"), or a converter
    was killed for memory (`stage` "export"). Not a bug: a larger machine, or another exporter, builds it."""

    kind = "out-of-memory"
    code = "build_out_of_memory"


class BuilderCrashError(EdgepackError):
    """A converter or builder crashed on input edgepack had already checked: a bug (ours or the tool's), exit 2."""

    kind = "internal"
    code = "builder_crashed"

    def __init__(self, message: str, *, tool: str, log_tail: list[str], **fields: Any) -> None:
        super().__init__(message, hint=f"This is a bug, not a problem with your input: please report it with the "
                                       f"log tail below and the model's config.json. ({tool})",
                         tool=tool, log_tail=log_tail, **fields)


class UsageError(UserError):
    """A bad command line (unknown option, missing argument): exit 1 with the --json envelope like any user error."""

    kind = "usage"
    code = "usage"


class RemoteError(UserError):
    """A command on a device failed: carries the evidence."""

    kind = "remote"
    code = "remote_failed"


def require(module: str, extra: str, purpose: str) -> Any:
    """Import a heavy optional module or raise a MissingExtraError naming the install line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra, purpose=purpose) from exc
