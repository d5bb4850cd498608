"""Pack stage: a verified bundle folder -> one reproducible archive, and back (safely).

The archive holds `<name>/` and under it the manifest, its signature (if any) and exactly the files the manifest
lists, in sorted order. Every entry has mtime SOURCE_DATE_EPOCH (else 0), uid/gid 0 with no names, mode 0644 or
0755 (files executable in the bundle) and 0755 for folders. gzip gets no name and no timestamp. So the same bundle
gives the same bytes, wherever it was built or packed. zstd goes through the `zstandard` library.

Reading refuses anything but plain files and folders under that one top folder: no absolute paths, no `..`, no
links, no devices, before a single byte is written.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from edgepack.bundle import MANIFEST, SIGNATURE, Manifest, read_manifest, verify_bundle
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

def _open_tar(archive: Path, fmt: str) -> tarfile.TarFile:
    if fmt == "gz":
        return tarfile.open(archive, mode="r:gz")
    data = _zstd().ZstdDecompressor().stream_reader(archive.open("rb"))
    return tarfile.open(fileobj=data, mode="r|")


def check_members(members: list[tarfile.TarInfo], archive: Path) -> str:
    """The archive's one top folder, or an `archive_unsafe` error naming the first bad member."""
    tops = set()
    if len(members) > MAX_MEMBERS:
        raise BundleError(f"{archive} has {len(members)} entries (at most {MAX_MEMBERS}).", code="archive_unsafe",
                          member=None)
    for m in members:
        p = PurePosixPath(m.name)
        why = ("an absolute path" if m.name.startswith("/") or p.is_absolute() else
               "a '..' component" if ".." in p.parts else
               "a link" if m.issym() or m.islnk() else
               "a device or fifo" if not (m.isfile() or m.isdir()) else None)
        if why:
            raise BundleError(f"{archive} is unsafe: entry {m.name!r} is {why}. Nothing was extracted.",
                              hint="Only archives made by `edgepack pack` are accepted.", code="archive_unsafe",
                              member=m.name)
        tops.add(p.parts[0] if p.parts else "")
    if len(tops) != 1 or "" in tops:
        raise BundleError(f"{archive} must hold exactly one bundle folder (found {sorted(tops)}).",
                          hint="Only archives made by `edgepack pack` are accepted.", code="archive_unsafe",
                          member=None)
    return tops.pop()


def extract(archive: Path, dest: Path) -> Path:
    """Extract a packed bundle under `dest` after checking every entry; returns the bundle folder."""
    fmt = archive_format(archive)
    if fmt is None:
        raise BundleError(f"{archive} is not a bundle archive (.tar.gz or .tar.zst).")
    try:
        with _open_tar(archive, fmt) as tar:
            members = tar.getmembers()
        top = check_members(members, archive)
        with _open_tar(archive, fmt) as tar:
            for m in tar:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with target.open("wb") as fh:
                    while chunk := src.read(1 << 20):
                        fh.write(chunk)
                os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BundleError(f"{archive} is not a readable archive: {exc}.", hint="Pack it again.") from exc
    except Exception as exc:
        if type(exc).__name__ != "ZstdError":
            raise
        raise BundleError(f"{archive} is not a readable archive: {exc}.", hint="Pack it again.") from exc
    return dest / top


@contextmanager
def opened(path: Path) -> Iterator[Path]:
    """A bundle folder for `path`: the folder itself, or an archive extracted (checked) into a temp folder."""
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
