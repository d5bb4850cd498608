"""examples/image/: the Yocto recipe and the Buildroot package install a bundle's native/ and model from its packed
archive into an image root, with their own commands; what they install runs from there, and a tampered archive is
refused before anything is installed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import cli, envelope, needs_onnx
from ..image_recipes import BUILDROOT, YOCTO, Fatal, bitbake_variables, buildroot_install, yocto_install

pytestmark = [pytest.mark.integration, needs_onnx,
              pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                 reason="needs make and a C compiler")]


@pytest.fixture(scope="module")
def archive(native_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dl") / f"{native_bundle.name}.tar.gz"
    proc = cli("--json", "pack", str(native_bundle), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(envelope(proc)["result"]["archive"])


def _runs_from(root: Path, name: str) -> None:
    """The installed program answers --smoke from the image root, with its libraries and model where installed."""
    program = root / "opt" / "edgepack" / name / "native" / "edgepack-chat"
    proc = subprocess.run([str(program), "--smoke"], capture_output=True, text=True, env={}, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"], proc.stdout + proc.stderr


def test_buildroot_package_installs_the_archive(archive: Path, native_bundle: Path, tmp_path: Path) -> None:
    config = (BUILDROOT / "Config.in").read_text()
    mk = (BUILDROOT / "edgepack-model.mk").read_text()
    used = set(re.findall(r"BR2_PACKAGE_EDGEPACK_MODEL\w*", mk))
    assert used and used <= set(re.findall(r"^config (\w+)", config, re.M))  # every option the .mk reads exists
    assert re.search(r"^sha256\s+[0-9a-f]{64}\s+\S+\.tar\.gz$", (BUILDROOT / "edgepack-model.hash").read_text(), re.M)
    target, staging = tmp_path / "target", tmp_path / "staging"
    proc = buildroot_install(archive, native_bundle.name, tmp_path / "br", target, staging)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    installed = target / "opt" / "edgepack" / native_bundle.name
    assert sorted(p.name for p in (installed / "native").iterdir()) == [
        "edgepack-chat", "libonnxruntime-genai.so", "libonnxruntime.so.1"]
    assert (installed / "model" / "genai_config.json").is_file() and (installed / "edgepack.json").is_file()
    pc = (staging / "usr/lib/pkgconfig/edgepack-runtime.pc").read_text()
    assert f"prefix=/opt/edgepack/{native_bundle.name}/native" in pc
    assert (staging / "usr/include/edgepack_oga.h").is_file()
    _runs_from(target, native_bundle.name)


def test_buildroot_refuses_a_tampered_archive(archive: Path, native_bundle: Path, tmp_path: Path) -> None:
    work = tmp_path / "tampered"
    shutil.copytree(native_bundle, work / native_bundle.name)
    with (work / native_bundle.name / "model" / "genai_config.json").open("a") as fh:
        fh.write(" ")
    bad = tmp_path / archive.name
    subprocess.run(["tar", "-C", str(work), "-czf", str(bad), native_bundle.name], check=True)
    target = tmp_path / "target"
    proc = buildroot_install(bad, native_bundle.name, tmp_path / "br", target, tmp_path / "staging")
    assert proc.returncode != 0 and "files differ from edgepack.json: ['model/genai_config.json']" in proc.stderr
    assert not target.exists()  # nothing installed


def test_yocto_recipe_installs_the_archive(archive: Path, native_bundle: Path, tmp_path: Path) -> None:
    variables = bitbake_variables(YOCTO.read_text())
    assert variables["SRC_URI"] == "file://${EDGEPACK_BUNDLE}.tar.gz" and variables["LICENSE"]
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(Fatal, match="the recipe pins"):
        yocto_install(archive, native_bundle.name, "0" * 64, tmp_path / "pinned", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    image = tmp_path / "image"
    yocto_install(archive, native_bundle.name, sha, tmp_path / "y", image)
    installed = image / "opt" / "edgepack" / native_bundle.name
    assert (installed / "native" / "libonnxruntime.so.1").is_file() and (image / "usr/include/edgepack_oga.h").is_file()
    assert "prefix=/opt/edgepack/" in (image / "usr/lib/pkgconfig/edgepack-runtime.pc").read_text()
    _runs_from(image, native_bundle.name)
