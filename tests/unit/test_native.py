"""native/ pieces that need no runtime: the glibc a program needs, the compiler lookup, the header a bundle
renders, deploy's refusal of a device without Python, and the device marking the manifest's program executable."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from edgepack.remote.device.releases import _executables
from edgepack.remote.device.rules import Refused
from edgepack.remote.preflight import without_python
from edgepack.stages.native import glibc_required, too_new, toolchain

from .test_preflight import manifest


def test_glibc_required_is_the_newest_symbol_version(tmp_path: Path) -> None:
    f = tmp_path / "prog"
    f.write_bytes(b"\x7fELF...GLIBC_2.17\x00GLIBC_2.34\x00GLIBC_2.4\x00")
    assert glibc_required(f) == "2.34"
    f.write_bytes(b"\x7fELF static")
    assert glibc_required(f) == ""
    # Debian 12's cross glibc gives programs __libc_start_main@GLIBC_2.34: fine on bookworm and Ubuntu 22.04, not on
    # android-arm64's declared 2.27 (the build leaves the program out there and says why)
    assert too_new("2.34", "2.27") and not too_new("2.34", "2.36") and not too_new("2.34", "2.34")
    assert not too_new("", "2.27") and not too_new("2.34", "")


def test_toolchain_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    arch = platform.machine()
    monkeypatch.setenv(f"EDGEPACK_CC_{arch.upper()}", "no-such-cc")
    assert toolchain(arch) is None  # an explicit choice that is missing is not replaced by another compiler
    monkeypatch.delenv(f"EDGEPACK_CC_{arch.upper()}")
    if shutil.which("cc"):
        cc = toolchain(arch)
        assert cc is not None and cc.version
    monkeypatch.setenv("PATH", "/nonexistent")
    assert toolchain("riscv64") is None  # riscv64-linux-gnu-gcc: not here


def test_the_bundle_header_renders_valid_c_without_golden_tokens(tmp_path: Path) -> None:
    """An unvalidated build records no golden reply: the header still compiles (C has no empty initializers)."""
    import jinja2

    from edgepack.resources import shipped_dir

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(shipped_dir("templates") / "_native" / "_shared")),
                             undefined=jinja2.StrictUndefined)

    class Ctx:
        name, edgepack_version, max_new_tokens, threads, context_length = "m-host", "0", 64, 0, 2048

    native = {"smoke_tokens": 8, "golden_prompt": [], "golden_tokens": [], "golden_checked": []}
    text = env.get_template("edgepack_bundle.h.j2").render(ctx=Ctx, native=native)
    assert "#define EDGEPACK_GOLDEN_PROMPT {0}" in text and "#define EDGEPACK_GOLDEN_PROMPT_COUNT 0" in text
    if shutil.which("cc"):
        (tmp_path / "edgepack_bundle.h").write_text(text)
        (tmp_path / "t.c").write_text('#include <stdint.h>\n#include "edgepack_bundle.h"\n'
                                      "static const int32_t p[] = EDGEPACK_GOLDEN_PROMPT;\n"
                                      "int main(void) { return (int)p[0] + EDGEPACK_GOLDEN_PROMPT_COUNT; }\n")
        proc = subprocess.run(["cc", "-Wall", "-Werror", "-c", "t.c"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_deploy_refuses_a_device_without_python_with_the_image_route() -> None:
    native = {"program": "native/edgepack-chat", "libraries": []}
    err = without_python(manifest(native=native), "pi.local")
    assert err.code == "device_unfit" and err.fields["problems"][0]["check"] == "python"
    assert "Nothing was written" in err.message and "native/edgepack-chat runs the model there" in err.hint
    assert "examples/image/" in err.hint and "apt install python3" in err.hint
    plain = without_python(manifest(), "pi.local")
    assert "edgepack build --native" in plain.hint


def test_the_device_marks_the_manifests_program_executable(tmp_path: Path) -> None:
    (tmp_path / "native").mkdir()
    prog = tmp_path / "native" / "edgepack-chat"
    prog.write_bytes(b"\x7fELF")
    prog.chmod(0o644)
    (tmp_path / "edgepack.json").write_text(json.dumps({"native": {"program": "native/edgepack-chat"}}))
    _executables(str(tmp_path))
    assert os.stat(prog).st_mode & 0o777 == 0o755
    (tmp_path / "edgepack.json").write_text(json.dumps({"native": {"program": "../outside"}}))
    with pytest.raises(Refused):
        _executables(str(tmp_path))
    (tmp_path / "edgepack.json").write_text(json.dumps({"native": None}))
    _executables(str(tmp_path))  # a bundle without native/: nothing to do


def test_native_is_for_runtimes_edgepack_vendors() -> None:
    from edgepack.backends.onnx import OnnxExporter
    from edgepack.backends.tflite import TfliteExporter
    from edgepack.stages.native import applies
    from edgepack.targets import load_target

    libs = OnnxExporter.native_libraries
    assert applies(load_target("rpi5"), libs) and applies(load_target("host"), libs)
    assert not applies(load_target("jetson-orin-nano"), libs)  # JetPack's CUDA runtime: nothing vendored to take
    # LiteRT-LM: its wheel's library serves glibc userlands only, so a bundle has it when asked (--native)
    assert applies(load_target("android-arm64"), TfliteExporter.native_libraries)
    assert OnnxExporter.native_default and not TfliteExporter.native_default
