"""One bundle contract, every reader: edgepack here, the device program, and the bundle's own verify_bundle.py
accept the same good bundle and refuse the same tampered ones; the smoke result reads the same everywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgepack.bundle import SmokeResult, verify_bundle, write_manifest
from edgepack.bundle_format import derive_id, smoke_result
from edgepack.errors import BundleError
from edgepack.remote.program import device_program

ROOT = Path(__file__).resolve().parents[2]


def good_bundle(root: Path) -> Path:
    b = root / "bundle"
    (b / "model").mkdir(parents=True)
    (b / "model" / "w.bin").write_bytes(b"w" * 1000)
    (b / "run.py").write_text("print('hi')\n")
    shutil.copy(ROOT / "templates" / "_shared" / "verify_bundle.py", b / "verify_bundle.py")
    shutil.copy(ROOT / "edgepack" / "bundle_format.py", b / "bundle_format.py")
    write_manifest(b, {"name": "tiny-host", "target": {"id": "host"}})
    return b


def _edit(field: str, value: object) -> Callable[[Path], None]:
    def do(b: Path) -> None:
        doc = json.loads((b / "edgepack.json").read_text())
        doc[field] = value
        (b / "edgepack.json").write_text(json.dumps(doc))
    return do


def _edit_keeping_id(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """An edit whose id is re-derived: only the contract's other rules can refuse it."""
    def do(b: Path) -> None:
        doc = json.loads((b / "edgepack.json").read_text())
        fn(doc)
        doc["bundle_id"] = derive_id(doc)
        (b / "edgepack.json").write_text(json.dumps(doc))
    return do


TAMPERED: dict[str, Callable[[Path], None]] = {
    "a file changed after the build": lambda b: (b / "model" / "w.bin").write_bytes(b"x" * 1000),
    "a file added": lambda b: (b / "model" / "extra.bin").write_bytes(b"e"),
    "a file removed": lambda b: (b / "run.py").unlink(),
    "the manifest edited, its id kept": _edit("target", {"id": "rpi5"}),
    "an id that is not the grammar's": _edit("bundle_id", "tiny..host-000000000000"),
    "a path out of the bundle": _edit_keeping_id(lambda d: d["files"].append(
        {"path": "../outside", "bytes": 1, "sha256": "0" * 64})),
}


def readers(b: Path, device_root: Path) -> dict[str, bool]:
    """Whether each reader accepts the bundle at `b`."""
    try:
        verify_bundle(b)
        here = True
    except BundleError:
        here = False
    script = subprocess.run([sys.executable, "-S", str(b / "verify_bundle.py"), "--bundle", str(b), "--files-only"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert script.stdout.strip(), script.stderr
    doc = json.loads(script.stdout)
    assert (script.returncode == 0) == doc["ok"]
    assert not (b / "__pycache__").exists()  # its import of bundle_format.py leaves no bytecode in the bundle
    # The device program checks a release folder inside its install dir (the one deploy is about to run).
    release = device_root / "releases" / "r"
    shutil.rmtree(device_root, ignore_errors=True)
    shutil.copytree(b, release)
    dev = subprocess.run([sys.executable, "-", "verify", str(device_root), "releases/r"], input=device_program(),
                         capture_output=True, text=True, timeout=60, check=False)
    return {"edgepack": here, "verify_bundle.py": doc["ok"], "device program": json.loads(dev.stdout)["ok"]}


def test_a_good_bundle_is_accepted_by_every_reader(tmp_path: Path) -> None:
    assert readers(good_bundle(tmp_path), tmp_path / "device") == dict.fromkeys(
        ("edgepack", "verify_bundle.py", "device program"), True)


@pytest.mark.parametrize("how", sorted(TAMPERED))
def test_a_tampered_bundle_is_refused_by_every_reader(tmp_path: Path, how: str) -> None:
    b = good_bundle(tmp_path)
    TAMPERED[how](b)
    assert readers(b, tmp_path / "device") == dict.fromkeys(("edgepack", "verify_bundle.py", "device program"), False)


@pytest.mark.parametrize(("stdout", "code"), [
    ('{"ok": true, "tokens_per_s": 12.5}', 0),
    ('runtime noise\n{"ok": true}\n', 1),  # says ok, exited 1: not ok
    ('{"ok": false, "error": "golden tokens differ"}', 1),
    ("Segmentation fault", -11),
    ("", 2),
])
def test_the_smoke_result_reads_the_same_here_and_on_the_device(stdout: str, code: int) -> None:
    doc = smoke_result(stdout, code)
    assert SmokeResult.parse(stdout, code).doc == doc  # edgepack's typed reading is the contract's
    assert doc["ok"] is (code == 0 and '"ok": true' in stdout) and doc["exit_code"] == code
    assert doc["ok"] or doc["error"]
