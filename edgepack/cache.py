"""The build cache: exported (and quantized) models and the gate's measurements, under the user cache dir.

An export is keyed by everything it depends on: the model's weights sha256 and its other files (config, tokenizer),
the target's [export] and [quantize] sections with the context length and template, the calibration text, and the
versions of edgepack and of every exporter tool. The gate's measurements are keyed by the export's key, the
held-out text, the task checks and the golden length. Tolerances are not in it, so changing one re-judges the
cached numbers at once, with no re-export and no re-scoring.

Entries are folders published by one rename, so parallel builds never see half an entry: the loser of a race
keeps its own copy for its build and throws it away. Each entry records the sha256 of what it holds when it is
published (every model file of an export, the measurements of a gate) and is checked against them each time it is
handed out: an entry that does not match (a zeroed file, a disk error, an edit) is discarded and rebuilt, never
used. A gate's key holds the sha256 of the exported files it measured, so measurements are only ever reused for
the very bytes they were taken on. `edgepack cache ls|du|clear` (kinds: exports, gates, and the model
checkpoints, reference scores and wheels other stages keep here).
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
            # the KV cache precision is written into the graph; "auto" adds nothing, so older keys stay valid
            **({"kv_cache": target.runtime.kv_cache} if target.runtime.kv_cache != "auto" else {}),
            "tools": installed_versions(*TOOLS)}


def gate_key(export: dict[str, Any], model_files: str, target: Any, text_sha256: str, checks_sha256: str | None,
             context: int) -> dict[str, Any]:
    """`model_files`: content_digest of the exported files the gate scores (measurements belong to those bytes)."""
    return {"export": _digest(export), "model_files": model_files, "text": text_sha256, "checks": checks_sha256,
            "golden_tokens": target.quality.golden_tokens, "context": context}


def content_digest(hashes: dict[str, str]) -> str:
    """One digest for a folder's {relative path: sha256}."""
    return _digest(hashes)


def _copy_hashing(src: Path, dst: Path, chunk: int = 1 << 20) -> str:
    """Copy one file and return the sha256 of the bytes copied: what is checked is what was handed out."""
    h = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while block := fin.read(chunk):
            h.update(block)
            fout.write(block)
    shutil.copystat(src, dst)
    return h.hexdigest()


def _copy_tree_hashing(src: Path, dst: Path) -> dict[str, str]:
    """Copy `src`'s files and folders into `dst` (symlinks refused); {relative path: sha256} of what was copied."""
    got: dict[str, str] = {}
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_symlink():
            raise OSError(f"{rel} is a symbolic link")
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            got[rel] = _copy_hashing(p, dst / rel)
    return got


def mismatch(recorded: dict[str, str], got: dict[str, str]) -> str:
    """'' when `got` is exactly `recorded`, else the first difference in words."""
    for rel in sorted(set(recorded) | set(got)):
        if rel not in got:
            return f"{rel} is missing"
        if rel not in recorded:
            return f"{rel} was not in it when it was published"
        if recorded[rel] != got[rel]:
            return f"{rel} does not match the sha256 recorded when it was published"
    return ""


def discard(entry: Path) -> None:
    """Move a bad entry aside and delete it (a build still copying from it keeps its open files)."""
    trash = entry.parent / f".{entry.name}.{os.getpid()}.{time.monotonic_ns()}.trash"
    with suppress(OSError):  # another build may have discarded it first
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Lookup:
    """What a cache lookup found: the entry's fields on a hit (None on a miss); `discarded` says why an entry
    that was there was thrown away instead of used; `content` is the content_digest of a hit's files."""

    data: dict[str, Any] | None
    discarded: str = ""
    content: str = ""


class Cache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def _dir(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / _digest(key)

    # -- exports ---------------------------------------------------------------------------------------
    def get_export(self, key: dict[str, Any], into: Path) -> Lookup:
        """Copy a cached export's model files into `into`, hashing each as it is copied; a hit only when every
        file is there with the sha256 recorded at publish and nothing else is. Otherwise the entry is discarded,
        `into` is left as it was, and the Lookup says why."""
        entry = self._dir("exports", key)
        try:
            meta = json.loads((entry / ENTRY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return Lookup(None)
        recorded = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(recorded, dict) or not recorded or not isinstance(meta.get("exported"), dict):
            return self._discard(entry, "it records no sha256 of its files")
        before = set(into.iterdir())
        try:
            why = mismatch(recorded, _copy_tree_hashing(entry / "model", into))
        except OSError as exc:
            why = f"it could not be read ({exc})"
        if why:
            for p in set(into.iterdir()) - before:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            return self._discard(entry, why)
        with suppress(OSError):
            os.utime(entry)  # last used
        return Lookup(meta["exported"], content=content_digest(recorded))

    def put_export(self, key: dict[str, Any], model_dir: Path, exported: Any, what: str) -> str:
        """Publish `model_dir` with the sha256 of every file (read once: the bytes hashed are the bytes cached and
        the bytes the bundle ships); returns their content_digest."""
        from edgepack.output import to_jsonable

        fields = {k: v for k, v in to_jsonable(exported).items() if k != "dir"}
        with self._publishing("exports", key) as tmp:
            (tmp / "model").mkdir()
            files = _copy_tree_hashing(model_dir, tmp / "model")
            (tmp / ENTRY).write_text(json.dumps({"what": what, "key": key, "exported": fields, "files": files,
                                                 "created": int(time.time())}, sort_keys=True), encoding="utf-8")
        return content_digest(files)

    # -- gate results ----------------------------------------------------------------------------------
    def get_gate(self, key: dict[str, Any]) -> Lookup:
        """The gate's measurements, when their sha256 matches the one recorded at publish (else discarded)."""
        entry = self._dir("gates", key)
        try:
            data = json.loads((entry / ENTRY).read_text(encoding="utf-8"))
        except OSError:
            return Lookup(None)
        except ValueError:
            return self._discard(entry, "its entry.json is not JSON")
        report = data.get("report") if isinstance(data, dict) else None
        if not isinstance(report, dict) or data.get("report_sha256") != _report_sha(report):
            return self._discard(entry, "its measurements do not match the sha256 recorded when they were published")
        return Lookup(report)

    def put_gate(self, key: dict[str, Any], report: Any, what: str) -> None:
        from edgepack.output import to_jsonable

        doc = to_jsonable(report)
        with self._publishing("gates", key) as tmp:
            (tmp / ENTRY).write_text(json.dumps({"what": what, "key": key, "report": doc,
                                                 "report_sha256": _report_sha(doc), "created": int(time.time())},
                                                sort_keys=True), encoding="utf-8")

    def _discard(self, entry: Path, why: str) -> Lookup:
        discard(entry)
        return Lookup(None, discarded=why)

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


def _report_sha(report: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()


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
