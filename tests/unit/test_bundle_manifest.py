from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.bundle import read_manifest, safe_relpath, verify_bundle, write_manifest
from edgepack.errors import BundleError


def make(tmp_path: Path) -> Path:
    b = tmp_path / "b"
    (b / "model").mkdir(parents=True)
    (b / "model" / "w.bin").write_bytes(b"\x00" * 100)
    (b / "run.py").write_text("print('hi')\n")
    write_manifest(b, {"name": "m-t"})
    return b


def test_manifest_lists_every_file_with_sha256(tmp_path: Path) -> None:
    b = make(tmp_path)
    m = read_manifest(b)
    assert [f.path for f in m.files] == ["model/w.bin", "run.py"]
    assert m.files[0].bytes == 100 and len(m.files[0].sha256) == 64
    assert m.bundle_id.startswith("m-t-")
    verify_bundle(b)


def test_same_content_same_id_different_content_different_id(tmp_path: Path) -> None:
    a = read_manifest(make(tmp_path / "1"))
    b = read_manifest(make(tmp_path / "2"))
    assert a.bundle_id == b.bundle_id
    (tmp_path / "2" / "b" / "run.py").write_text("print('other')\n")
    c = write_manifest(tmp_path / "2" / "b", {"name": "m-t"})
    assert c.bundle_id != a.bundle_id


@pytest.mark.parametrize("tamper", ["modify", "delete", "add"])
def test_tampered_bundle_is_refused(tmp_path: Path, tamper: str) -> None:
    b = make(tmp_path)
    if tamper == "modify":
        (b / "model" / "w.bin").write_bytes(b"\x01" * 100)
    elif tamper == "delete":
        (b / "run.py").unlink()
    else:
        (b / "evil.sh").write_text("rm -rf /\n")
    with pytest.raises(BundleError, match="does not match its manifest"):
        verify_bundle(b)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "model/../../x", ""])
def test_unsafe_manifest_paths_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(BundleError, match="unsafe path"):
        safe_relpath(bad)
    b = make(tmp_path)
    m = json.loads((b / "edgepack.json").read_text())
    m["files"].append({"path": bad, "bytes": 1, "sha256": "0" * 64})
    (b / "edgepack.json").write_text(json.dumps(m))
    with pytest.raises(BundleError):
        read_manifest(b)


def test_the_id_is_derived_from_the_whole_manifest_and_checked_on_read(tmp_path: Path) -> None:
    """A manifest edited by hand (any field) or claiming another bundle's id is refused."""
    b = make(tmp_path)
    doc = json.loads((b / "edgepack.json").read_text())
    other = write_manifest(make(tmp_path / "o"), {"name": "m-t", "runtime": {"requirements": ["x==1"]}})
    assert other.bundle_id != doc["bundle_id"]
    for edit in ({"bundle_id": other.bundle_id}, {"runtime": {"requirements": ["evil==6.6.6"]}}):
        (b / "edgepack.json").write_text(json.dumps(doc | edit))
        with pytest.raises(BundleError, match="claims bundle id"):
            read_manifest(b)


@pytest.mark.parametrize("bad", ["x/../../../canary", "..", "/etc", "a b", "../releases", "A-UPPER"])
def test_ids_and_names_that_are_paths_are_refused(tmp_path: Path, bad: str) -> None:
    from edgepack.bundle import check_name, derive_id

    with pytest.raises(BundleError, match="not allowed"):
        check_name(bad)
    b = make(tmp_path)
    doc = json.loads((b / "edgepack.json").read_text())
    doc["name"] = bad
    doc["bundle_id"] = derive_id(doc)  # even a consistent id: the grammar refuses it
    (b / "edgepack.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError):
        read_manifest(b)
