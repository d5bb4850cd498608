"""The bundle manifest (edgepack.json): the typed Manifest, its schema, content-derived ids, write, read, verify."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

from edgepack.bundle_format import (
    DEFAULT_INSTALL_DIR,
    ID_RE,
    LOCAL_ONLY,
    MANIFEST,
    NAME_RE,
    NOT_LISTED,
    SCHEMA,
    SIGNATURE,
    derive_id,
    smoke_result,
    unsafe_path,
)
from edgepack.errors import BundleError
from edgepack.fsutil import sha256_file

# The contract every reader shares (names, id grammar, canonical JSON, the smoke result): edgepack/bundle_format.py.
# What a local folder may hold beside its files: the venv its install.sh made, LiteRT-LM's XNNPACK cache. Never in
# an archive, never a link; bytecode caches are refused everywhere (runs write none: runs.runner_command).
LOCAL_MADE = (".venv", ".cache")


class ManifestDoc(TypedDict, total=False):
    """edgepack.json as the build writes it (docs/bundle-format.md), section by section; write_manifest adds
    `schema`, `files`, `content_sha256` and `bundle_id` (derived from all the rest)."""

    name: str
    edgepack_version: str
    target: dict[str, Any]  # id, arch, python, wheel_platforms, cpu_features, profile, profile_sha256
    model: dict[str, Any]  # the ModelSource (less build-machine paths) and its family
    export: dict[str, Any]  # format, scheme, builder_options, graph
    quality: dict[str, Any]  # the QualityReport
    runtime: dict[str, Any]  # template, requirements, wheels, wheel_lock, execution_provider, context, memory
    smoke: dict[str, Any]  # what smoke_test.py re-checks on the device
    tools: dict[str, str]
    validated: bool
    tune: dict[str, Any]  # with --tune: where the speeds were measured and every candidate's row
    adapters: list[dict[str, Any]]  # runtime LoRA adapters (stages/adapters.AdapterEntry): file, gate, smoke
    base: dict[str, Any]  # an adapter pack's release: the bundle id and name it adds adapters to
    native: dict[str, Any]  # native/ (stages/native.NativePack): libraries, the C program, why it is absent


@dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class LockedWheel:
    """One vendored wheel, pinned by name, version and sha256 (install.sh installs with --require-hashes)."""

    file: str
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class DeploySettings:
    install_dir: str
    keep_releases: int
    smoke_tokens: int
    systemd: bool
    ssh_port: int
    trusted_keys: tuple[str, ...]
    serve_addr: str


@dataclass(frozen=True)
class Manifest:
    """What deploy, inspect and run may trust about a bundle; `doc` is the whole JSON document as written."""

    name: str
    bundle_id: str
    files: tuple[FileEntry, ...]
    content_sha256: str
    target_id: str
    arch: str
    python: str
    format: str
    recipe: str  # litert-torch recipe, "" for ONNX
    template: str
    requirements: tuple[str, ...]
    wheels: tuple[str, ...]
    wheel_lock: tuple[LockedWheel, ...]
    execution_provider: str
    cpu_features: tuple[str, ...]  # what the vendored runtime needs of the device's CPU (target device.cpu_features)
    deploy: DeploySettings
    doc: Mapping[str, Any]
    memory_peak_bytes: int | None = None  # the build's memory plan of the runtime on the device (runtime.memory)
    base_id: str = ""  # an adapter pack: the bundle whose files it lists but does not carry ("" for a bundle)
    native_program: str = ""  # the C program that runs the model without Python (native/edgepack-chat), or ""

    @property
    def adapters(self) -> tuple[str, ...]:
        """The runtime LoRA adapters' names (edgepack.json "adapters")."""
        return tuple(str(a.get("name", "")) for a in self.doc.get("adapters", ()) if isinstance(a, Mapping))

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def model_bytes(self) -> int:
        return sum(f.bytes for f in self.files if f.path.startswith("model/"))

    @property
    def unit_file(self) -> str:
        """The unit template in the bundle (deploy installs it under a name of the install dir)."""
        return f"edgepack-{self.name}.service"

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], where: Path | str = MANIFEST) -> Manifest:
        """Parse and check: schema, safe paths, name and id grammar, id recomputed from the content."""
        if doc.get("schema") != SCHEMA:
            raise BundleError(f"{where} has schema {doc.get('schema')!r}; this edgepack reads {SCHEMA!r}.",
                              hint="Rebuild the bundle with this edgepack version.", path=str(where))
        name, bundle_id = str(doc.get("name", "")), str(doc.get("bundle_id", ""))
        check_name(name, where)
        if not ID_RE.match(bundle_id) or bundle_id != derive_id(doc):
            raise BundleError(f"{where} claims bundle id {bundle_id!r}, but its content gives "
                              f"{derive_id(doc) if NAME_RE.match(name) else '(no valid name)'!r}.",
                              hint="The manifest was edited or tampered with; rebuild the bundle with "
                                   "`edgepack build`.", path=str(where), bundle_id=bundle_id)
        files = tuple(FileEntry(str(f["path"]), int(f["bytes"]), str(f["sha256"])) for f in doc.get("files", []))
        for f in files:
            safe_relpath(f.path)
            parts = f.path.split("/")
            if f.path in NOT_LISTED or parts[0] in LOCAL_ONLY or "__pycache__" in parts:
                raise BundleError(f"{where} lists {f.path!r}, a name edgepack reserves.",
                                  hint="The manifest was tampered with; rebuild the bundle.", file=f.path)
        target, runtime, export = doc.get("target", {}), doc.get("runtime", {}), doc.get("export", {})
        dep = target.get("profile", {}).get("deploy", {})
        return cls(
            name=name, bundle_id=bundle_id, files=files, content_sha256=str(doc.get("content_sha256", "")),
            target_id=str(target.get("id", "")), arch=str(target.get("arch", "")),
            python=str(target.get("python", "")), format=str(export.get("format", "")),
            recipe=str(export.get("builder_options", {}).get("recipe", "")),
            template=str(runtime.get("template", "")), requirements=tuple(runtime.get("requirements", ())),
            wheels=tuple(runtime.get("wheels", ())),
            wheel_lock=tuple(LockedWheel(**w) for w in runtime.get("wheel_lock", ())),
            execution_provider=str(runtime.get("execution_provider", "cpu")),
            cpu_features=tuple(target.get("cpu_features", ())),
            deploy=DeploySettings(install_dir=str(dep.get("install_dir", DEFAULT_INSTALL_DIR)),
                                  keep_releases=int(dep.get("keep_releases", 3)),
                                  smoke_tokens=int(dep.get("smoke_tokens", 16)), systemd=bool(dep.get("systemd")),
                                  ssh_port=int(dep.get("ssh_port", 22)),
                                  trusted_keys=tuple(dep.get("trusted_keys", ())),
                                  serve_addr=str(dep.get("serve_addr", "127.0.0.1:8089"))),
            doc=doc, memory_peak_bytes=_int_or_none(runtime.get("memory", {}).get("peak_bytes")),
            base_id=str(doc.get("base", {}).get("bundle_id", "")) if isinstance(doc.get("base"), Mapping) else "",
            native_program=str((doc.get("native") or {}).get("program") or "")
            if isinstance(doc.get("native"), Mapping) else "")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_name(name: str, where: Path | str = "bundle") -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise BundleError(f"bundle name {name!r} (in {where}) is not allowed: use lower-case letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit, at most 96 characters.",
                          hint="Rename the output folder (--out) or the target file; names become folders and "
                               "service names on the device.", name=name)
    return name


def list_files(root: Path) -> list[FileEntry]:
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir() or rel in NOT_LISTED or rel.split("/")[0] in LOCAL_ONLY:
            continue
        entries.append(FileEntry(rel, p.stat().st_size, sha256_file(p)))
    return entries


def content_id(files: list[FileEntry]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return h.hexdigest()


def write_manifest(root: Path, doc: ManifestDoc | Mapping[str, Any], inherited: tuple[FileEntry, ...] = ()
                   ) -> Manifest:
    """`inherited`: files an adapter pack lists but does not carry (its base bundle's, already on the device)."""
    check_name(str(doc.get("name", "")), root)
    files = sorted(list_files(root) + list(inherited), key=lambda f: f.path)
    out = {k: v for k, v in doc.items() if k not in ("bundle_id", "files", "content_sha256", "schema")}
    out |= {"schema": SCHEMA, "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files],
            "content_sha256": content_id(files)}
    out["bundle_id"] = derive_id(out)
    (root / MANIFEST).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (root / SIGNATURE).unlink(missing_ok=True)  # a signature of the previous manifest is no longer true
    return Manifest.from_doc(out, root / MANIFEST)


def safe_relpath(rel: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if unsafe_path(rel) or rel != p.as_posix():
        raise BundleError(f"manifest lists an unsafe path {rel!r} (absolute or with '..').",
                          hint="The bundle is corrupt or was tampered with; rebuild it.", file=rel)
    return p


def read_manifest(bundle: Path) -> Manifest:
    return read_once(bundle)[1]


def read_once(bundle: Path) -> tuple[bytes, Manifest]:
    """The manifest's bytes, read once, and the Manifest they say: a deploy checks the signature over these bytes,
    the files against this Manifest, and sends these bytes to the device."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not an edgepack bundle (no {MANIFEST}).",
                          hint="Pass a folder made by `edgepack build`.", path=bundle)
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}).", hint="Rebuild the bundle.", path=path) from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a manifest (a JSON object).", hint="Rebuild the bundle.", path=path)
    try:
        return raw, Manifest.from_doc(data, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path} is malformed ({type(exc).__name__}: {exc}).", hint="Rebuild the bundle.",
                          path=path) from exc


def scan(bundle: Path, manifest: Manifest, *, local: bool = True) -> list[str]:
    """What is on disk that the manifest does not account for, without following a single link: symlinks
    (files or folders, anywhere), bytecode caches (`__pycache__`, anywhere: Python would load cached bytecode
    instead of the listed .py), fifos and devices, unlisted files and folders. `local`: a folder on this machine
    may also hold what its own install.sh and runtime made there (`.venv/`, `.cache/`: real folders, not
    descended into); an extracted archive may not."""
    listed = {f.path for f in manifest.files} | set(NOT_LISTED)
    folders = {str(p) for f in manifest.files for p in PurePosixPath(f.path).parents if str(p) != "."}
    problems: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                rel = prefix + e.name
                if e.is_symlink():
                    problems.append(f"symlink {rel} (a bundle holds plain files and folders only)")
                elif e.name == "__pycache__" or e.name.endswith((".pyc", ".pyo")) and rel not in listed:
                    problems.append(f"bytecode cache {rel} (Python would run it instead of the listed source)")
                elif e.is_dir(follow_symlinks=False):
                    if rel in folders:
                        walk(Path(e.path), rel + "/")
                    elif not (local and not prefix and e.name in LOCAL_MADE):
                        problems.append(f"unexpected folder {rel}/")
                elif not e.is_file(follow_symlinks=False):
                    problems.append(f"unexpected {rel} (not a plain file: a fifo, socket or device)")
                elif rel not in listed:
                    problems.append(f"unexpected {rel}")

    walk(bundle, "")
    return problems


def verify_bundle(bundle: Path, manifest: Manifest | None = None, *, local: bool = True) -> Manifest:
    """Every listed file present as a plain file with its size and sha256, and nothing else that could run: no
    unlisted file or folder, no symlink, no bytecode cache (`scan`); else a BundleError naming each problem.
    An adapter pack (`base_id`) may lack its base's files: the device links them from the base release, and
    checks every file against the signed manifest before anything runs."""
    manifest = manifest or read_manifest(bundle)
    problems = scan(bundle, manifest, local=local)
    for f in manifest.files:
        p = bundle / safe_relpath(f.path)
        try:
            st = p.lstat()
        except OSError:
            if not manifest.base_id:
                problems.append(f"missing {f.path}")
            continue
        if stat.S_ISLNK(st.st_mode):
            continue  # scan named it
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"missing {f.path} (not a plain file)")
        elif st.st_size != f.bytes or sha256_file(p) != f.sha256:
            problems.append(f"changed {f.path}")
    if problems:
        caches = [p for p in problems if p.startswith("bytecode cache ")]
        hint = ("Delete the bytecode cache (e.g. `find BUNDLE -name __pycache__ -prune -exec rm -rf {} +`): older "
                "edgepack versions let a local run write one; nothing runs from it now."
                if caches and len(caches) == len(problems) else
                "Rebuild it with `edgepack build`; do not edit a built bundle.")
        raise BundleError(f"bundle {bundle} does not match its manifest: {', '.join(problems[:5])}"
                          + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "") + ".",
                          hint=hint, path=bundle, problems=problems)
    return manifest


# -- what a bundle's smoke_test.py prints -----------------------------------------------------------------

@dataclass(frozen=True)
class SmokeResult:
    """One smoke test's result, read by the contract in docs/bundle-format.md ("The smoke result"): `ok` only when
    the JSON says so and the process exited 0. `doc` is every key as printed (deploy's JSON output carries it)."""

    ok: bool
    exit_code: int
    error: str
    problems: tuple[str, ...]
    golden_match: int | None
    golden_required: int | None
    tokens_per_s: float | None
    peak_rss_mb: float | None
    doc: dict[str, Any]

    @classmethod
    def parse(cls, stdout: str, exit_code: int) -> SmokeResult:
        """The last JSON object line of stdout (runtimes may print their own lines first)."""
        doc = smoke_result(stdout, exit_code)
        ok, error = bool(doc["ok"]), str(doc.get("error") or "")

        def num(key: str) -> Any:
            v = doc.get(key)
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return cls(ok=ok, exit_code=exit_code, error=error, problems=tuple(str(p) for p in doc.get("problems", ())),
                   golden_match=num("golden_match"), golden_required=num("golden_required"),
                   tokens_per_s=num("tokens_per_s"), peak_rss_mb=num("peak_rss_mb"), doc=doc)
