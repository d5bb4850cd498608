"""Files on disk: sha256, atomic directory publication, free-space checks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgepack.errors import OutputExistsError, UserError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_writable_parent(parent: Path, need_bytes: int = 0) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {parent}: {exc.strerror}.",
                        hint="Choose another --out folder you can write to.", path=parent) from exc
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable.",
                        hint="Choose another --out folder, or fix its permissions.", path=parent)
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise UserError(
                f"not enough free disk in {parent}: {free / 1e6:.0f} MB free, about {need_bytes / 1e6:.0f} MB needed.",
                hint="Free some space or choose another --out folder.", path=parent, free=free, need=need_bytes)


@contextlib.contextmanager
def staging_dir(final: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` by rename, on any failure it vanishes.

    The temp dir lives in the same parent so the last step is a rename on one filesystem: a reader sees
    either no bundle or a whole one, never half of one (Ctrl-C included).
    """
    if final.exists() and not force:
        raise OutputExistsError(f"output {final} already exists.",
                                hint="Pass --force to replace it, or choose another --out.", path=final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a bundle is meant to be read by others
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
            raise UserError(f"disk full while writing {final}.", hint="Free some space and run again.",
                            path=final) from exc
        raise


@contextlib.contextmanager
def cache_entry(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`, published by one rename when the block succeeds. Made for caches that
    parallel builds share: when another build published `final` first, its copy stays (a build may be reading it)
    and this one is dropped. The contents are the same either way."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
