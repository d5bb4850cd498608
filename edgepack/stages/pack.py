"""Pack stage: a verified bundle folder -> one reproducible archive, and back (safely).

The archive holds `<name>/` and under it the manifest, its signature (if any) and exactly the files the manifest
lists, in sorted order. Every entry has mtime SOURCE_DATE_EPOCH (else 0), uid/gid 0 with no names, mode 0644 or
0755 (files executable in the bundle) and 0755 for folders. gzip gets no name and no timestamp. So the same bundle
gives the same bytes, wherever it was built or packed. zstd goes through the `zstandard` library.

Reading is one streaming pass that checks each header before writing its data: plain files and folders under that
one top folder only (no absolute paths, no `..`, no links, devices or sparse files, no clashes), a bounded entry
count and size, and once the manifest is in, only the files it lists at their listed sizes.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from edgepack.bundle import MANIFEST, SIGNATURE, Manifest, check_name, read_manifest, scan, verify_bundle
from edgepack.errors import BundleError, UserError

FORMATS = {".tar.gz": "gz", ".tgz": "gz", ".tar.zst": "zst", ".tar.zstd": "zst"}
ZSTD_LEVEL = 10  # SmolLM2 host: 2.0 s, 155.3 MB; level 19 took 52 s for 0.5 % less; gzip -9 7.8 s, 155.7 MB
MAX_MEMBERS = 10_000


def archive_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise UserError(f"SOURCE_DATE_EPOCH must be a whole number of seconds (got {raw!r}).",
                        hint="Unset it, or set it to e.g. the commit time: git log -1 --format=%ct")
    return int(raw)


def _members(bundle: Path, manifest: Manifest) -> list[str]:
    paths = {f.path for f in manifest.files} | {MANIFEST} | ({SIGNATURE} if (bundle / SIGNATURE).is_file() else set())
    dirs = {str(p) for path in paths for p in PurePosixPath(path).parents if str(p) != "."}
    return sorted(paths | dirs)


def write_archive(bundle: Path, out: Path, fmt: str) -> tuple[int, int]:
    """Write `bundle` (already verified) to `out` atomically; returns (entries, bytes)."""
    manifest = read_manifest(bundle)
    epoch = source_date_epoch()
    top = manifest.name
    members = _members(bundle, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, _compressor(raw, fmt) as stream, \
                tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(top, tarfile.DIRTYPE, 0o755, 0, epoch))
            for rel in members:
                path = bundle / rel
                if path.is_dir():
                    tar.addfile(_info(f"{top}/{rel}", tarfile.DIRTYPE, 0o755, 0, epoch))
                    continue
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with path.open("rb") as fh:
                    tar.addfile(_info(f"{top}/{rel}", tarfile.REGTYPE, mode, path.stat().st_size, epoch), fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any file the user writes (mkstemp made it 0600)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(members) + 1, out.stat().st_size


def _info(name: str, kind: bytes, mode: int, size: int, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@contextmanager
def _compressor(raw: IO[bytes], fmt: str) -> Iterator[IO[bytes]]:
    if fmt == "gz":
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            yield gz  # type: ignore[misc]
    else:
        zstd = _zstd()
        with zstd.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False) as zw:
            yield zw


def _zstd() -> Any:
    from edgepack.errors import require

    return require("zstandard", "pack", "A .tar.zst archive")


# -- reading -----------------------------------------------------------------------------------------------
#
# One streaming pass. Each header is checked before its data is read or anything is written: its name (one top
# folder, no absolute path, no `..`, canonical), its type (plain files and folders only: no links, devices, sparse
# files), clashes (a duplicate, a file where a folder is, names that differ only by case), the entry count and the
# bytes so far. Until the manifest has come (it sorts after README.md, ansible/ and the unit file) at most
# PRE_MANIFEST_BYTES may be written; after it, every file must be listed in it with its exact size, the signature
# or the manifest itself. The whole stream is also capped at EDGEPACK_MAX_ARCHIVE_BYTES (default 64 GiB) of
# decompressed bytes, and the metadata of one entry (pax records, long names) at 1 MiB, so a bomb is refused
# after at most that much work. On any refusal the folder being extracted into is removed.

MAX_BYTES_ENV = "EDGEPACK_MAX_ARCHIVE_BYTES"
MAX_BYTES = 64 * 2**30
PRE_MANIFEST_BYTES = 64 * 2**20  # README.md, ansible/, the unit file: kilobytes in every bundle edgepack packs
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_ENTRY_META = 2**20  # tar header, pax records and long names of one entry
_CHUNK = 1 << 20


def max_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return MAX_BYTES
    if not raw.isdigit() or int(raw) <= 0:
        raise UserError(f"{MAX_BYTES_ENV} must be a positive whole number of bytes (got {raw!r}).",
                        hint=f"Unset it (default {MAX_BYTES} bytes), or set e.g. {MAX_BYTES_ENV}=200000000000.")
    return int(raw)


def _unsafe(archive: Path, why: str, member: str | None) -> BundleError:
    return BundleError(f"{archive} is unsafe: {why}. Nothing was extracted.",
                       hint="Only archives made by `edgepack pack` are accepted.", code="archive_unsafe",
                       member=member)


class _Capped(io.RawIOBase):
    """The decompressed tar stream, counting: refuses past `limit` bytes in all, and past MAX_ENTRY_META bytes read
    between two entries' data (tarfile reads a pax record or a long name whole, into memory)."""

    def __init__(self, raw: IO[bytes], limit: int, archive: Path) -> None:
        self.raw, self.limit, self.archive = raw, limit, archive
        self.total = 0
        self.meta = 0  # bytes read since the last file's data began
        self.in_data = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.total += n
        if not self.in_data:
            self.meta += n
            if self.meta > MAX_ENTRY_META + tarfile.RECORDSIZE:
                raise _unsafe(self.archive, f"an entry's header is over {MAX_ENTRY_META} bytes", None)
        if self.total > self.limit:
            raise _unsafe(self.archive, f"it unpacks to more than {self.limit} bytes ({MAX_BYTES_ENV})", None)
        return n


@contextmanager
def _decompressed(archive: Path, fmt: str) -> Iterator[IO[bytes]]:
    with archive.open("rb") as fh:
        if fmt == "gz":
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            with _zstd().ZstdDecompressor().stream_reader(fh, closefd=False) as zr:
                yield zr


class _Extraction:
    """The state of one pass: what was written, the manifest once read, and the checks on the next header."""

    def __init__(self, archive: Path, dest: Path, limit: int) -> None:
        self.archive, self.dest, self.limit = archive, dest, limit
        self.top: str | None = None
        self.kinds: dict[str, str] = {}  # path under the top folder -> "file" | "dir" (folders implied too)
        self.folded: dict[str, str] = {}  # casefolded path -> path: `Run.py` and `run.py` clash on macOS
        self.entries = 0
        self.written = 0
        self.manifest: Manifest | None = None
        self.manifest_error: BundleError | None = None
        self.early: dict[str, int] = {}  # files written before the manifest came: checked against it then

    def admit(self, m: tarfile.TarInfo) -> str:
        """Check one header; return its path under the top folder ("" for the top folder itself)."""
        self.entries += 1
        if self.entries > MAX_MEMBERS:
            raise _unsafe(self.archive, f"it has more than {MAX_MEMBERS} entries", None)
        name = m.name[:-1] if m.isdir() and m.name.endswith("/") and len(m.name) > 1 else m.name
        p = PurePosixPath(name)
        why = ("an absolute path" if name.startswith("/") or p.is_absolute() else
               "a '..' component" if ".." in p.parts else
               "a link" if m.issym() or m.islnk() else
               "a device or fifo" if not (m.isfile() or m.isdir()) else
               "a sparse file" if m.sparse is not None or m.type == tarfile.GNUTYPE_SPARSE else
               "not a plain file" if m.isfile() and m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) else
               "not a canonical name" if not name or name != p.as_posix() or "\\" in name else None)
        if why:
            raise _unsafe(self.archive, f"entry {m.name!r} is {why}", m.name)
        if self.top is None:
            self.top = p.parts[0]
            try:
                check_name(self.top, self.archive)
            except BundleError:
                raise _unsafe(self.archive, f"its top folder {self.top!r} is not a bundle name", m.name) from None
        if p.parts[0] != self.top:
            raise _unsafe(self.archive, f"it must hold exactly one bundle folder (found {self.top!r} and "
                                        f"{p.parts[0]!r})", m.name)
        rel = "/".join(p.parts[1:])
        if not rel:
            if m.isfile() or self.entries > 1:
                raise _unsafe(self.archive, f"entry {m.name!r} clashes with the bundle folder", m.name)
            return rel
        kind = "dir" if m.isdir() else "file"
        if rel in self.kinds:
            clash = "is listed twice" if self.kinds[rel] == kind else "is both a file and a folder"
            raise _unsafe(self.archive, f"entry {m.name!r} {clash}", m.name)
        for parent in PurePosixPath(rel).parents:
            if self.kinds.get(str(parent)) == "file":
                raise _unsafe(self.archive, f"entry {m.name!r} is under {parent}, which is a file", m.name)
        folded = rel.casefold()
        if self.folded.get(folded, rel) != rel:
            raise _unsafe(self.archive, f"entries {self.folded[folded]!r} and {rel!r} differ only by case", m.name)
        if m.isfile():
            self.check_size(rel, m.size, m.name)
        for parent in PurePosixPath(rel).parents:
            if str(parent) != ".":
                self.kinds.setdefault(str(parent), "dir")
                self.folded.setdefault(str(parent).casefold(), str(parent))
        self.kinds[rel] = kind
        self.folded[folded] = rel
        return rel

    def check_size(self, rel: str, size: int, member: str) -> None:
        if rel == MANIFEST and size > MAX_MANIFEST_BYTES:
            raise _unsafe(self.archive, f"its manifest is {size} bytes (at most {MAX_MANIFEST_BYTES})", member)
        if self.manifest is not None and rel != SIGNATURE:
            want = {f.path: f.bytes for f in self.manifest.files}.get(rel)
            if want is None:
                raise _unsafe(self.archive, f"entry {member!r} is not listed in its manifest", member)
            if size != want:
                raise _unsafe(self.archive, f"entry {member!r} has {size} bytes; its manifest lists {want}", member)
        budget = PRE_MANIFEST_BYTES if self.manifest is None else self.limit
        if self.written + size > min(budget, self.limit):
            raise _unsafe(self.archive, f"entry {member!r} would bring it to {self.written + size} bytes, over "
                                        + (f"{budget} before its manifest" if budget < self.limit else
                                           f"{self.limit} ({MAX_BYTES_ENV})"), member)

    def read_manifest(self, folder: Path) -> None:
        try:
            self.manifest = read_manifest(folder)
        except BundleError as exc:
            self.manifest_error = exc  # raised after the pass, unless the archive is unsafe too
            return
        for rel, size in self.early.items():
            self.check_size(rel, size, f"{self.top}/{rel}")
        self.early.clear()
        need, free = self.manifest.bytes - self.written, shutil.disk_usage(self.dest).free
        if need > free:
            raise BundleError(f"{self.archive} needs {need} more bytes to unpack; {self.dest} has {free} free.",
                              hint="Free space there, or point TMPDIR at a bigger disk.", path=self.archive)


def extract(archive: Path, dest: Path) -> Path:
    """Extract a packed bundle into `dest` (a new or empty folder) in one checked pass; returns the bundle folder.
    On any refusal nothing is left in `dest`."""
    fmt = archive_format(archive)
    if fmt is None:
        raise BundleError(f"{archive} is not a bundle archive (.tar.gz or .tar.zst).")
    dest.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(dest))
    state = _Extraction(archive, dest, max_bytes())
    try:
        with _decompressed(archive, fmt) as raw:
            # headers and padding: 1.5 KiB an entry as `edgepack pack` writes them; 8 KiB leaves room for pax names
            capped = _Capped(raw, state.limit + (MAX_MEMBERS + 2) * 8192, archive)
            with tarfile.open(fileobj=io.BufferedReader(capped, tarfile.RECORDSIZE), mode="r|") as tar:
                for m in tar:
                    rel = state.admit(m)
                    capped.meta = 0
                    target = dest / m.name.rstrip("/")
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _write_member(tar, m, target, capped)
                    state.written += m.size
                    if state.manifest is None and rel != MANIFEST:
                        state.early[rel] = m.size
                    if rel == MANIFEST:
                        state.read_manifest(dest / str(state.top))
        if state.top is None:
            raise _unsafe(archive, "it holds no bundle folder", None)
        if state.manifest_error is not None:
            raise state.manifest_error
        if state.manifest is None:
            raise BundleError(f"{archive} holds no {MANIFEST}: not an edgepack bundle.",
                              hint="Pack a folder made by `edgepack build` with `edgepack pack`.", path=archive)
        if state.manifest.name != state.top:
            raise _unsafe(archive, f"its folder {state.top!r} is not the bundle's name {state.manifest.name!r}",
                          state.top)
        extra = scan(dest / state.top, state.manifest, local=False)  # e.g. an unlisted empty folder
        if extra:
            raise _unsafe(archive, f"it holds what its manifest does not list: {', '.join(extra[:5])}", None)
    except BaseException as exc:
        for name in set(os.listdir(dest)) - before:
            shutil.rmtree(dest / name, ignore_errors=True)
        if isinstance(exc, (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)) or \
                type(exc).__name__ == "ZstdError":
            raise BundleError(f"{archive} is not a readable archive: {exc}.", hint="Pack it again.") from exc
        if isinstance(exc, FileExistsError):  # O_EXCL: a clash admit() did not foresee; never overwrite
            raise _unsafe(archive, f"two entries write {exc.filename}", None) from exc
        if isinstance(exc, OSError):
            raise BundleError(f"cannot extract {archive} into {dest}: {exc.strerror or exc}.",
                              hint="Free space in the temp folder, or point TMPDIR at a bigger disk.",
                              path=archive) from exc
        raise
    return dest / state.top


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path, capped: _Capped) -> None:
    """Copy one file's data: a new file (never through a link, never over an existing one), exactly m.size bytes."""
    src = tar.extractfile(m)
    assert src is not None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    capped.in_data = True
    try:
        with os.fdopen(fd, "wb") as fh:
            left = m.size
            while left > 0:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise EOFError(f"entry {m.name!r} is cut short")
                fh.write(chunk)
                left -= len(chunk)
    finally:
        capped.in_data = False
        capped.meta = 0
    os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)


@contextmanager
def opened(path: Path) -> Iterator[Path]:
    """A bundle folder for `path`: the folder itself, or an archive extracted (checked) into a private temp folder
    that is removed afterwards."""
    if path.is_dir() or archive_format(path) is None:
        yield path
        return
    if not path.is_file():
        raise BundleError(f"{path} does not exist.", hint="Check the path.")
    with tempfile.TemporaryDirectory(prefix="edgepack-archive-") as tmp:
        yield extract(path, Path(tmp))


def pack(bundle: Path, out: Path | None, fmt: str | None) -> tuple[Path, Manifest, int, int, str]:
    """Verify `bundle` and write its archive; returns (archive, manifest, entries, bytes, format)."""
    manifest = verify_bundle(bundle)
    if manifest.base_id:
        raise UserError(f"{bundle.name} is an adapter pack: it lists its base's files without carrying them, and an "
                        "archive holds every file it lists.", hint="Deploy the pack folder as it is (edgepack deploy "
                        "--host H PACK); archive the base bundle.", code="invalid_input")
    if out is None:
        out = bundle.parent / f"{manifest.bundle_id}.tar.{'zst' if fmt == 'zst' else 'gz'}"
    got = archive_format(out)
    if got is None:
        raise UserError(f"{out}: the archive name must end in .tar.gz or .tar.zst.",
                        hint="Pass --out NAME.tar.gz (or .tar.zst).")
    if fmt and fmt != got:
        raise UserError(f"--format {fmt} does not match the name {out.name}.", hint="Drop --format or rename.")
    entries, size = write_archive(bundle, out, got)
    return out, manifest, entries, size, got
