"""The build cache: exported (and quantized) models and the gate's measurements, under the user cache dir.

An export is keyed by everything it depends on: the model's weights sha256 and its other files (config, tokenizer),
the target's [export] and [quantize] sections with the context length and template, the calibration text, and the
versions of edgepack and of every exporter tool. The gate's measurements are keyed by the export's key, the
held-out text, the task checks and the golden length. Tolerances are not in it, so changing one re-judges the
cached numbers at once, with no re-export and no re-scoring.

Entries are folders published by one rename, so parallel builds never see half an entry: the loser of a race
keeps its own copy for its build and throws it away. `edgepack cache ls|du|clear` (kinds: exports, gates, and the
model checkpoints, reference scores and wheels other stages keep here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.fsutil import dir_bytes, sha256_file
from edgepack.resources import cache_root
from edgepack.versions import installed_versions

KINDS = ("exports", "gates", "checkpoints", "reference", "wheels")
ENTRY = "entry.json"
TOOLS = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx_ir", "onnx-ir", "transformers", "torch", "gguf",
         "litert-torch", "ai-edge-litert", "litert-lm-builder", "litert-lm-api", "peft", "accelerate")


def enabled() -> bool:
    return os.environ.get("EDGEPACK_NO_CACHE", "") in ("", "0")


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_files_sha(hf_dir: Path, weights_sha256: str) -> str:
    """The model's identity: its weights' sha256 and every other file's content (config, tokenizer, template)."""
    small = {p.relative_to(hf_dir).as_posix(): sha256_file(p) for p in sorted(hf_dir.rglob("*"))
             if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".gguf"))}
    return _digest({"weights": weights_sha256, "files": small})


def export_key(source: Any, target: Any) -> dict[str, Any]:
    from edgepack.output import to_jsonable

    calibration = target.quantize.calibration_text
    cal_sha = None
    if calibration:
        from edgepack.errors import UserError
        from edgepack.quality import texts

        try:
            cal_sha = texts.for_target(calibration, target.source).sha256
        except UserError:  # the exporter says what is wrong with it, naming quantize.calibration_text
            cal_sha = f"unreadable:{calibration}"
    return {"edgepack": __version__, "model": model_files_sha(source.hf_dir, source.weights_sha256),
            "export": to_jsonable(target.export),
            "quantize": to_jsonable(target.quantize) | {"calibration_text": cal_sha},
            "context_length": target.runtime.context_length, "template": target.runtime.template,
            "tools": installed_versions(*TOOLS)}


def gate_key(export: dict[str, Any], target: Any, text_sha256: str, checks_sha256: str | None,
             context: int) -> dict[str, Any]:
    return {"export": _digest(export), "text": text_sha256, "checks": checks_sha256,
            "golden_tokens": target.quality.golden_tokens, "context": context}


class Cache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def _dir(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / _digest(key)

    # -- exports ---------------------------------------------------------------------------------------
    def get_export(self, key: dict[str, Any], into: Path) -> dict[str, Any] | None:
        """Copy a cached export's model files into `into`; its ExportedModel fields, or None on a miss."""
        entry = self._dir("exports", key)
        try:
            meta = json.loads((entry / ENTRY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        for src in sorted((entry / "model").rglob("*")):
            dst = into / src.relative_to(entry / "model")
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        os.utime(entry)  # last used
        data: dict[str, Any] = meta["exported"]
        return data

    def put_export(self, key: dict[str, Any], model_dir: Path, exported: Any, what: str) -> None:
        from edgepack.output import to_jsonable

        fields = {k: v for k, v in to_jsonable(exported).items() if k != "dir"}
        with self._publishing("exports", key) as tmp:
            shutil.copytree(model_dir, tmp / "model")
            (tmp / ENTRY).write_text(json.dumps({"what": what, "key": key, "exported": fields,
                                                 "created": int(time.time())}, sort_keys=True), encoding="utf-8")

    # -- gate results ----------------------------------------------------------------------------------
    def get_gate(self, key: dict[str, Any]) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self._dir("gates", key) / ENTRY).read_text(encoding="utf-8"))
            return data["report"]
        except (OSError, ValueError, KeyError):
            return None

    def put_gate(self, key: dict[str, Any], report: Any, what: str) -> None:
        from edgepack.output import to_jsonable

        with self._publishing("gates", key) as tmp:
            (tmp / ENTRY).write_text(json.dumps({"what": what, "key": key, "report": to_jsonable(report),
                                                 "created": int(time.time())}, sort_keys=True), encoding="utf-8")

    @contextmanager
    def _publishing(self, kind: str, key: dict[str, Any]) -> Iterator[Path]:
        final = self._dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{os.getpid()}.{time.monotonic_ns()}.partial"
        tmp.mkdir()
        try:
            yield tmp
            try:
                os.rename(tmp, final)  # atomic; fails if another build published the same entry first
            except OSError:
                if not (final / ENTRY).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- ls, du, clear ---------------------------------------------------------------------------------
    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for k in (kind,) if kind else KINDS:
            folder = self.root / k
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.name.startswith("."):
                    continue
                meta: dict[str, Any] = {}
                if (p / ENTRY).is_file():
                    with suppress(OSError, ValueError):
                        meta = json.loads((p / ENTRY).read_text(encoding="utf-8"))
                out.append({"kind": k, "key": p.name, "bytes": dir_bytes(p) if p.is_dir() else p.stat().st_size,
                            "created": meta.get("created", int(p.stat().st_mtime)), "what": meta.get("what", "")})
        return out

    def usage(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for e in self.entries():
            by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + e["bytes"]
        return {"root": str(self.root), "bytes": sum(by_kind.values()), "by_kind": by_kind}

    def clear(self, kind: str | None = None) -> tuple[list[str], int]:
        """Remove every entry (of one kind): renamed aside first, so a build that is reading one keeps its copy."""
        removed, freed = [], 0
        for e in self.entries(kind):
            path = self.root / e["kind"] / e["key"]
            trash = path.parent / f".{path.name}.{os.getpid()}.trash"
            try:
                os.rename(path, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
            removed.append(f"{e['kind']}/{e['key']}")
            freed += e["bytes"]
        return removed, freed


def exported_from(fields: dict[str, Any], model_dir: Path) -> Any:
    from edgepack.backends.base import ExportedModel, GraphStats

    stats = GraphStats(**{**fields["stats"], "bits": tuple(fields["stats"]["bits"])})
    return ExportedModel(**{**fields, "dir": model_dir, "stats": stats})


def report_from(fields: dict[str, Any], target: Any) -> Any:
    """A cached gate report judged again against this target's tolerances."""
    from edgepack.quality import checks as task_checks
    from edgepack.stages.validate import QualityReport, judge

    c = fields.get("checks")
    checks = None
    if c is not None:
        checks = task_checks.report_from(c, target.quality.checks_max_drop)
    failures = judge(target.quality, delta_pct=fields["ppl_delta_pct"], kl=fields["mean_kl"],
                     top1=fields["top1_agreement"], greedy=fields["greedy_match"])
    if checks is not None:
        failures += task_checks.failures(checks)
    tuples = {f.name for f in dataclasses.fields(QualityReport) if "tuple" in str(f.type)}
    kw: dict[str, Any] = {k: (tuple(v) if k in tuples and isinstance(v, list) else v) for k, v in fields.items()
                          if k in {f.name for f in dataclasses.fields(QualityReport)}}
    kw.update(tolerances=target.quality, failures=failures, passed=not failures, checks=checks, reference_cached=True)
    return QualityReport(**kw)
