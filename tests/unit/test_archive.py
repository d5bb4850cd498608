"""Hostile packed bundles (issue 20, finding 7): refused while streaming headers, in one pass, before their data is
written, as `archive_unsafe` (exit 1), with nothing left in the temp folder; a good archive still unpacks."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path

import pytest

from edgepack.bundle import read_manifest, write_manifest
from edgepack.errors import BundleError
from edgepack.stages.pack import MAX_MEMBERS, PRE_MANIFEST_BYTES, extract, write_archive

from ..conftest import cli, envelope


def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "src" / "m-t"
    (b / "model").mkdir(parents=True)
    (b / "model" / "w.bin").write_bytes(b"\x00" * 100)
    (b / "run.py").write_text("print('hi')\n")
    (b / "README.md").write_text("hello\n")
    write_manifest(b, {"name": "m-t"})
    return b


class Zeros(io.RawIOBase):
    """`n` zero bytes, made as they are read: a bomb's payload without holding it in memory."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def hostile(path: Path, src: Path, entries: list[tuple[str, bytes | int | None]], *, first: bool = False) -> Path:
    """The good bundle's entries (as `edgepack pack` writes them) plus `entries`: (name, data | size of zeros |
    None for a folder), appended, or put before everything with `first`."""
    good = path.with_name("good.tar.gz")
    write_archive(src, good, "gz")
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]
    extra = []
    for name, data in entries:
        info = tarfile.TarInfo(name)
        if data is None:
            info.type = tarfile.DIRTYPE
            extra.append((info, None))
        else:
            info.size = data if isinstance(data, int) else len(data)
            extra.append((info, Zeros(data) if isinstance(data, int) else io.BytesIO(data)))
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as out:
        for info, data in (extra + [(m, io.BytesIO(d) if d is not None else None) for m, d in members]
                           if first else [(m, io.BytesIO(d) if d is not None else None) for m, d in members] + extra):
            out.addfile(info, data)  # type: ignore[arg-type]
    return path


def refused(archive: Path, tmp_path: Path, why: str) -> dict:
    """`edgepack inspect ARCHIVE` as a user runs it: exit 1, archive_unsafe naming `why`, the temp folder empty."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    proc = cli("--json", "inspect", str(archive), env={"TMPDIR": str(tmp)}, timeout=120)
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["code"] == "archive_unsafe" and why in err["message"], (err, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert list(tmp.iterdir()) == [], list(tmp.rglob("*"))
    return err


def test_a_good_archive_unpacks_in_one_pass(tmp_path: Path) -> None:
    src = bundle(tmp_path)
    for fmt, name in (("gz", "a.tar.gz"), ("zst", "a.tar.zst")):
        pytest.importorskip("zstandard") if fmt == "zst" else None
        write_archive(src, tmp_path / name, fmt)
        got = extract(tmp_path / name, tmp_path / f"x-{fmt}")
        assert read_manifest(got).bundle_id == read_manifest(src).bundle_id
        assert (got / "model" / "w.bin").read_bytes() == b"\x00" * 100


def test_a_compression_bomb_is_refused_at_its_header(tmp_path: Path) -> None:
    """A listed file whose entry claims 256 MiB of zeros (about 250 KB compressed): its header disagrees with the
    manifest, so it is refused before one byte of it is written (before: written out, then refused)."""
    src = bundle(tmp_path)
    bomb = tmp_path / "bomb.tar.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for name in ("m-t/edgepack.json", "m-t/run.py", "m-t/README.md"):
            data = (src.parent / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("m-t/model/w.bin")
        info.size = 256 * 2**20
        tar.addfile(info, Zeros(info.size))
    assert bomb.stat().st_size < 2 * 2**20
    t0 = time.monotonic()
    err = refused(bomb, tmp_path, "its manifest lists 100")
    assert err["member"] == "m-t/model/w.bin" and time.monotonic() - t0 < 60


def test_a_bomb_before_the_manifest_is_refused_at_its_header(tmp_path: Path) -> None:
    """Before the manifest has come only small files may (README.md, ansible/): 64 MiB at most."""
    archive = hostile(tmp_path / "early.tar.gz", bundle(tmp_path), [("m-t/AAA.bin", PRE_MANIFEST_BYTES + 1)],
                      first=True)
    refused(archive, tmp_path, "before its manifest")


def test_the_total_is_capped_by_the_environment(tmp_path: Path) -> None:
    src = bundle(tmp_path)
    write_archive(src, tmp_path / "ok.tar.gz", "gz")
    proc = cli("--json", "inspect", str(tmp_path / "ok.tar.gz"), "--no-verify",
               env={"EDGEPACK_MAX_ARCHIVE_BYTES": "150", "TMPDIR": str(tmp_path)}, timeout=120)
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["code"] == "archive_unsafe" and "EDGEPACK_MAX_ARCHIVE_BYTES" in err["message"]


def test_too_many_entries_are_refused_while_streaming(tmp_path: Path) -> None:
    """Empty entries cost no bytes: the count stops them at MAX_MEMBERS + 1, not after reading them all."""
    src = bundle(tmp_path)
    many = [(f"m-t/e{i:06d}", b"") for i in range(MAX_MEMBERS + 50)]
    archive = hostile(tmp_path / "many.tar.gz", src, many, first=True)
    refused(archive, tmp_path, f"more than {MAX_MEMBERS} entries")


@pytest.mark.parametrize(("entries", "why"), [
    ([("m-t/run.py", b"print('evil')\n")], "listed twice"),
    ([("m-t/run.py", None)], "both a file and a folder"),
    ([("m-t/run.py/x", b"x")], "which is a file"),
    ([("m-t/model", b"x")], "both a file and a folder"),
    ([("m-t/RUN.py", b"print('hi')\n")], "differ only by case"),
    ([("m-t/m-t", None), ("other/x", b"x")], "exactly one bundle folder"),
])
def test_clashes_are_refused_as_archive_unsafe(tmp_path: Path, entries: list, why: str) -> None:
    refused(hostile(tmp_path / "clash.tar.gz", bundle(tmp_path), entries), tmp_path, why)


@pytest.mark.parametrize("entries", [
    [("m-t/__pycache__/run.cpython-312.pyc", b"\x00" * 16)],  # sorts before edgepack.json: checked when it comes
    [("m-t/zz/__pycache__/x.pyc", b"\x00" * 16)],
    [("m-t/.venv/bin/python", b"#!/bin/sh\n")],
    [("m-t/onnxruntime_genai", None)],  # an empty unlisted folder: a namespace package by that name
    [("m-t/evil.py", b"import os\n")],
])
def test_unlisted_entries_are_refused(tmp_path: Path, entries: list) -> None:
    err = refused(hostile(tmp_path / "extra.tar.gz", bundle(tmp_path), entries), tmp_path, "")
    assert "not listed" in err["message"] or "does not list" in err["message"], err


def test_a_sparse_entry_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "sparse.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("m-t/x")
        info.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(info)
    refused(archive, tmp_path, "a sparse file")


def test_extract_removes_what_it_wrote_on_refusal(tmp_path: Path) -> None:
    archive = hostile(tmp_path / "late.tar.gz", bundle(tmp_path), [("m-t/zz-evil.sh", b"rm -rf ~\n")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine").write_text("kept")
    with pytest.raises(BundleError) as caught:
        extract(archive, dest)
    assert caught.value.code == "archive_unsafe"
    assert [p.name for p in dest.iterdir()] == ["mine"]
