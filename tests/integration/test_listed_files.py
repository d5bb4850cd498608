"""Only listed files run (issue 20, finding 5): a bytecode cache or a symlinked folder planted in a real tiny bundle,
as a folder and as a packed archive, is refused by inspect, run and bench, and nothing of it runs; runs write no
bytecode into the bundle; inspect says "signed" only after checking the signature against a key it was given."""

from __future__ import annotations

import base64
import io
import py_compile
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ..conftest import cli, envelope, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef main(*a, **k):\n    return 0\n"


@pytest.fixture
def copy(tiny_bundles: tuple[Path, Path], tmp_path: Path) -> Path:
    dest = tmp_path / tiny_bundles[0].name
    shutil.copytree(tiny_bundles[0], dest, ignore=shutil.ignore_patterns("__pycache__", ".venv", ".cache"))
    return dest


def plant_pyc(bundle: Path, marker: Path) -> Path:
    """A cached edgepack_cli that run.py would import instead of the listed edgepack_cli.py (an unchecked-hash .pyc
    is used whatever the source says)."""
    src = bundle.parent / "evil_src.py"
    src.write_text(EVIL.format(marker=str(marker)))
    pyc = bundle / "__pycache__" / f"edgepack_cli.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(src), cfile=str(pyc), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return pyc


def imports_edgepack_cli(bundle: Path, *flags: str) -> None:
    subprocess.run([sys.executable, *flags, "-c", f"import sys; sys.path.insert(0, {str(bundle)!r}); "
                    "import edgepack_cli"], check=False, capture_output=True)


def refused_everywhere(bundle: Path, why: str, marker: Path, code: str = "bundle_invalid") -> None:
    for args in (["inspect", str(bundle)], ["run", str(bundle), "--prompt", "hi", "--max-tokens", "2"],
                 ["bench", str(bundle), "--reps", "1", "--tokens", "2"]):
        proc = cli("--json", *args, timeout=300)
        err = envelope(proc)["error"]
        assert proc.returncode == 1 and err["code"] == code and why in err["message"], (args, err)
    assert not marker.exists(), "the planted code ran"


def test_a_planted_bytecode_cache_is_refused_and_never_loaded(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plant_pyc(copy, marker)
    imports_edgepack_cli(copy)  # the attack is real: plain Python runs the cached bytecode, not the listed source
    assert marker.exists()
    marker.unlink()
    empty = tmp_path / "empty-prefix"
    imports_edgepack_cli(copy, "-B", "-X", f"pycache_prefix={empty}")  # how edgepack starts a runner
    assert not marker.exists() and not empty.exists()
    refused_everywhere(copy, "bytecode cache __pycache__", marker)


def test_a_symlinked_folder_is_refused(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_pkg"
    evil.mkdir()
    (evil / "__init__.py").write_text(EVIL.format(marker=str(marker)))
    (copy / "onnxruntime_genai").symlink_to(evil, target_is_directory=True)  # shadows the runtime for run.py
    refused_everywhere(copy, "symlink onnxruntime_genai", marker)
    (copy / "onnxruntime_genai").unlink()
    model = copy / "model"
    model.rename(tmp_path / "model-elsewhere")
    model.symlink_to(tmp_path / "model-elsewhere", target_is_directory=True)  # listed files, reached through a link
    refused_everywhere(copy, "symlink model", marker)


def test_an_archive_with_a_bytecode_cache_is_refused(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = Path(envelope(cli("--json", "pack", str(copy), "--out", str(tmp_path / "good.tar.gz")))["result"]["archive"])
    pyc = plant_pyc(copy, marker).read_bytes()
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(good) as src, tarfile.open(archive, "w:gz") as out:
        for m in src.getmembers():
            out.addfile(m, src.extractfile(m) if m.isfile() else None)
            if m.name == copy.name:
                info = tarfile.TarInfo(f"{copy.name}/__pycache__/edgepack_cli.{sys.implementation.cache_tag}.pyc")
                info.size = len(pyc)
                out.addfile(info, io.BytesIO(pyc))
    refused_everywhere(archive, "not listed", marker, code="archive_unsafe")


def test_a_run_writes_no_bytecode_into_the_bundle(copy: Path) -> None:
    for _ in range(2):  # the second run verifies what the first left
        proc = cli("--json", "run", str(copy), "--prompt", "Licensed under", "--max-tokens", "4", timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(copy.rglob("__pycache__")) and not list(copy.rglob("*.pyc"))


def test_inspect_says_signed_only_after_verifying(copy: Path, tmp_path: Path) -> None:
    keys = {}
    for name in ("a", "b"):
        assert cli("keygen", "--out", str(tmp_path / name)).returncode == 0
        keys[name] = tmp_path / f"{name}.pub"
    signed = envelope(cli("--json", "sign", str(copy), "--key", str(tmp_path / "a")))["result"]
    shown = envelope(cli("--json", "inspect", str(copy)))["result"]
    assert shown["signature_key_id"] == signed["key_id"] and shown["signature_verified"] is False
    assert "not verified" in shown["signature"] and not shown["signature"].startswith("signed")
    human = cli("inspect", str(copy)).stdout
    assert "not verified" in human and "signed by" not in human
    ok = envelope(cli("--json", "inspect", str(copy), "--trusted-key", str(keys["a"])))["result"]
    assert ok["signature_verified"] is True and ok["signature"].startswith(f"signed by key {signed['key_id']}")
    # signed by a key that is not trusted, and a signature that does not match the manifest: refused, never "signed"
    proc = cli("--json", "inspect", str(copy), "--trusted-key", str(keys["b"]))
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "signature_invalid"
    sig = copy / "edgepack.json.minisig"
    lines = sig.read_bytes().splitlines()
    raw = bytearray(base64.b64decode(lines[1]))
    raw[-1] ^= 1  # the signature bytes, not the key id: still names key a
    sig.write_bytes(b"\n".join([lines[0], base64.b64encode(bytes(raw)), *lines[2:]]) + b"\n")
    proc = cli("--json", "inspect", str(copy), "--trusted-key", str(keys["a"]))
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["code"] == "signature_invalid" and "does not match" in err["message"], err
    shown = envelope(cli("--json", "inspect", str(copy)))["result"]
    assert shown["signature_verified"] is False and "not verified" in shown["signature"]
