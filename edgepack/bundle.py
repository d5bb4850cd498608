"""The bundle manifest (edgepack.json): schema, per-file sha256, write, read and verify."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.errors import BundleError
from edgepack.fsutil import sha256_file

MANIFEST = "edgepack.json"
SCHEMA = "edgepack.bundle/1"
# Files a device may create inside an installed bundle; they are not part of the manifest.
LOCAL_ONLY = (".venv", "__pycache__", ".cache")  # made on the device: venv, bytecode, XNNPACK cache


@dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int
    sha256: str


def list_files(root: Path) -> list[FileEntry]:
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() or rel == MANIFEST or rel.split("/")[0] in LOCAL_ONLY:
            continue
        entries.append(FileEntry(rel, p.stat().st_size, sha256_file(p)))
    return entries


def content_id(files: list[FileEntry]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return h.hexdigest()


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    files = list_files(root)
    manifest = {**manifest, "schema": SCHEMA,
                "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files],
                "content_sha256": content_id(files)}
    manifest["bundle_id"] = f"{manifest['name']}-{manifest['content_sha256'][:12]}"
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def safe_relpath(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise BundleError(f"manifest lists an unsafe path {rel!r} (absolute or with '..').",
                          hint="The bundle is corrupt or was tampered with; rebuild it.", file=rel)
    return p


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not an edgepack bundle (no {MANIFEST}).",
                          hint="Pass a folder made by `edgepack build`.", path=bundle)
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}).", hint="Rebuild the bundle.", path=path) from exc
    if data.get("schema") != SCHEMA:
        raise BundleError(f"{path} has schema {data.get('schema')!r}; this edgepack reads {SCHEMA!r}.",
                          hint="Rebuild the bundle with this edgepack version.", path=path)
    for f in data.get("files", []):
        safe_relpath(f["path"])
    return data


def verify_bundle(bundle: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every listed file present with its size and sha256, and nothing extra: else a BundleError."""
    manifest = manifest or read_manifest(bundle)
    listed = {f["path"]: f for f in manifest["files"]}
    problems: list[str] = []
    for rel, f in listed.items():
        p = bundle / safe_relpath(rel)
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            problems.append(f"changed {rel}")
    extra = [e.path for e in list_files(bundle) if e.path not in listed]
    problems += [f"unexpected {rel}" for rel in extra]
    if problems:
        raise BundleError(f"bundle {bundle} does not match its manifest: {', '.join(problems[:5])}"
                          + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "") + ".",
                          hint="Rebuild it with `edgepack build`; do not edit a built bundle.",
                          path=bundle, problems=problems)
    return manifest
