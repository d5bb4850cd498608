"""The bundle from C: native/ of a tiny ONNX bundle, its edgepack-chat compiled here and run with no Python and no
environment, against run.py on the same bundle; CMake, pkg-config and the manifest's record of it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import cli, envelope, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx,
              pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (Debian: apt install gcc)")]

PROMPT = "The sea is"


def native(bundle: Path, *args: str, program: Path | None = None, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(program or bundle / "native" / "edgepack-chat"), *args], capture_output=True,
                          text=True, timeout=300, env=env or {}, cwd="/")


def run_py(bundle: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), *args, "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_edgepack_chat_answers_with_run_pys_tokens_and_json(native_bundle: Path) -> None:
    for mode in ([], ["--raw"], ["--system", 'Answer in "quotes"\n please.']):
        args = ["--prompt", PROMPT, "--max-tokens", "12", *mode]
        proc = native(native_bundle, *args, "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        got, want = json.loads(proc.stdout), run_py(native_bundle, *args)
        assert got["tokens"] == want["tokens"] and len(got["tokens"]) >= 1, mode
        assert got["text"] == want["text"] and got["prompt_tokens"] == want["prompt_tokens"], mode
        assert set(want) <= set(got) and got["program"] == "native/edgepack-chat"
        assert got["stopped"] == want["stopped"] and got["bundle"] == native_bundle.name
    streamed = native(native_bundle, "--prompt", PROMPT, "--max-tokens", "12", "--raw")
    raw = run_py(native_bundle, "--prompt", PROMPT, "--max-tokens", "12", "--raw")
    assert streamed.returncode == 0 and streamed.stdout == raw["text"] + "\n"
    assert "tok/s" in streamed.stderr
    # its libraries are the bundle's own, found beside it with no LD_LIBRARY_PATH
    ldd = subprocess.run(["ldd", str(native_bundle / "native" / "edgepack-chat")], capture_output=True, text=True)
    for lib in ("libonnxruntime-genai.so", "libonnxruntime.so.1"):
        assert f"{lib} => {native_bundle / 'native' / lib}" in ldd.stdout, ldd.stdout


def test_smoke_mode_checks_the_golden_tokens(native_bundle: Path, tmp_path: Path) -> None:
    spec = json.loads((native_bundle / "edgepack.json").read_text())["smoke"]
    proc = native(native_bundle, "--smoke")
    res = json.loads(proc.stdout)
    assert proc.returncode == 0 and res["ok"] and res["schema"] == 1, proc.stdout + proc.stderr
    # (random weights: every golden position of the tiny model is a near-tie, so none is required here)
    assert res["golden_match"] == res["golden_required"] == sum(map(bool, spec["golden_checked"]))
    assert res["tokens"] == max(spec["tokens"], len(spec["golden_tokens"]))
    # the same program against other golden tokens (rebuilt with CMake from the bundle's own native/) fails
    src = tmp_path / "native"
    shutil.copytree(native_bundle / "native", src)
    header = src / "edgepack_bundle.h"
    text = header.read_text()
    tokens = re.search(r"#define EDGEPACK_GOLDEN_TOKENS \{(.*)\}", text)
    assert tokens is not None
    wrong = ", ".join(str(int(t) + 1) for t in tokens.group(1).split(","))
    checked = ", ".join("1" for _ in spec["golden_tokens"])
    text = text.replace(tokens.group(0), f"#define EDGEPACK_GOLDEN_TOKENS {{{wrong}}}")
    every = f"#define EDGEPACK_GOLDEN_CHECKED {{{checked}}}"
    header.write_text(re.sub(r"#define EDGEPACK_GOLDEN_CHECKED \{.*\}", every, text))
    program = _cmake_install(src, tmp_path)
    bad = native(native_bundle, "--smoke", "--model", str(native_bundle / "model"), program=program)
    res = json.loads(bad.stdout)
    assert bad.returncode == 1 and not res["ok"], bad.stdout
    assert res["golden_match"] < res["golden_required"] == len(spec["golden_tokens"])
    assert res["problems"][0].startswith("at golden position 0 the device picked")


def _cmake_install(src: Path, tmp_path: Path) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake (Debian: apt install cmake)")
    build, prefix = tmp_path / "build", tmp_path / "installed"
    for cmd in (["cmake", "-S", str(src), "-B", str(build)], ["cmake", "--build", str(build)],
                ["cmake", "--install", str(build), "--prefix", str(prefix)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return prefix / "edgepack-chat"


def test_cmake_and_pkg_config_build_against_the_bundle(native_bundle: Path, tmp_path: Path) -> None:
    program = _cmake_install(native_bundle / "native", tmp_path)  # the program and its libraries, installed
    assert sorted(p.name for p in program.parent.iterdir()) == ["edgepack-chat", "libonnxruntime-genai.so",
                                                                 "libonnxruntime.so.1"]
    proc = native(native_bundle, "--prompt", PROMPT, "--max-tokens", "6", "--raw", "--json", "--model",
                  str(native_bundle / "model"), program=program)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == run_py(native_bundle, "--prompt", PROMPT, "--max-tokens", "6",
                                                       "--raw")["tokens"]
    if shutil.which("pkg-config") is None:
        pytest.skip("needs pkg-config")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "edgepack-runtime"], capture_output=True, text=True,
                           env={**os.environ, "PKG_CONFIG_PATH": str(native_bundle / "native")})
    assert flags.returncode == 0, flags.stderr
    out = tmp_path / "by-pkg-config"
    source = native_bundle / "native" / "edgepack-chat.c"
    cc = subprocess.run(["cc", "-o", str(out), str(source), *flags.stdout.split()], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    ran = native(native_bundle, "--prompt", PROMPT, "--max-tokens", "6", "--raw", "--json", "--model",
                 str(native_bundle / "model"), program=out,
                 env={"LD_LIBRARY_PATH": str(native_bundle / "native")})
    assert ran.returncode == 0 and json.loads(ran.stdout)["tokens"] == json.loads(proc.stdout)["tokens"]


def test_bad_input_gets_a_clear_error_and_exit_code(native_bundle: Path, tmp_path: Path) -> None:
    proc = native(native_bundle, "--prompt", PROMPT, "--max-token", "3")
    assert proc.returncode == 2 and "unknown option --max-token" in proc.stderr and "usage:" in proc.stderr
    proc = native(native_bundle, "--max-tokens", "3")
    assert proc.returncode == 2 and "--prompt is required" in proc.stderr
    proc = native(native_bundle, "--prompt", PROMPT, "--max-tokens", "x")
    assert proc.returncode == 2 and "whole number" in proc.stderr
    context = json.loads((native_bundle / "edgepack.json").read_text())["runtime"]["context_length"]
    proc = native(native_bundle, "--prompt", "the sea " * context, "--raw")
    assert proc.returncode == 1 and f"this bundle's context holds {context}" in proc.stderr, proc.stderr
    proc = native(native_bundle, "--prompt", PROMPT, "--model", str(tmp_path / "nowhere"))
    assert proc.returncode == 1 and "--model DIR" in proc.stderr
    assert native(native_bundle, "--smoke", "--model", str(tmp_path / "nowhere")).returncode == 2  # smoke_test's 2


def test_the_manifest_and_sbom_record_native(native_bundle: Path) -> None:
    doc = json.loads((native_bundle / "edgepack.json").read_text())
    n = doc["native"]
    assert n["program"] == "native/edgepack-chat" and n["runtime"] == "onnxruntime-genai" and n["compiler"]
    listed = {f["path"]: f["sha256"] for f in doc["files"]}
    assert set(n["files"]) <= set(listed) and "native/edgepack-chat" in listed
    for lib in n["libraries"]:
        data = (native_bundle / lib["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == lib["sha256"] == listed[lib["file"]]
        assert lib["wheel"].startswith(lib["package"].replace("-", "_") + "-" + lib["version"]) and lib["license"]
    sbom = json.loads((native_bundle / "sbom.cdx.json").read_text())
    refs = {c["bom-ref"]: c for c in sbom["components"]}
    genai = refs["native:native/libonnxruntime-genai.so"]
    assert genai["hashes"][0]["content"] == n["libraries"][0]["sha256"] and genai["version"] == n["libraries"][0][
        "version"]
    assert "native:program" in refs
    # the header says which release's C API it declares: the libraries' own
    header = (native_bundle / "native" / "edgepack_oga.h").read_text()
    match = re.search(r'#define EDGEPACK_OGA_VERSION "([0-9.]+)"', header)
    assert match and n["libraries"][0]["version"].startswith(match.group(1) + ".")
    proc = cli("--json", "inspect", str(native_bundle))
    assert proc.returncode == 0 and envelope(proc)["result"]["verified"] is True
    human = cli("inspect", str(native_bundle)).stdout
    assert "native   native/edgepack-chat (onnxruntime-genai 0.18" in human and "no Python" in human


def test_without_a_compiler_the_program_is_left_out_and_the_manifest_says_why(
        tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    import platform

    env = {f"EDGEPACK_CC_{platform.machine().upper()}": "no-such-cc"}
    proc = cli("build", "--target", str(tiny_target), str(tiny_model), "--out", str(tmp_path), "--no-wheels",
               "--native", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "edgepack-chat was not compiled: no C compiler" in proc.stderr
    bundle = next(tmp_path.iterdir())
    n = json.loads((bundle / "edgepack.json").read_text())["native"]
    assert n["program"] is None and "no C compiler" in n["why_no_program"] and n["libraries"]
    assert not (bundle / "native" / "edgepack-chat").exists() and (bundle / "native" / "CMakeLists.txt").is_file()
    assert "was not compiled by this build" in (bundle / "README.md").read_text()


def test_a_rebuild_gives_the_same_program_and_bundle_id(native_bundle: Path, tiny_model: Path, tiny_target: Path,
                                                        tmp_path: Path) -> None:
    """Reproducible: the same inputs and compiler give the same program bytes (no paths, no debug info)."""
    proc = cli("--json", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(tmp_path), "--no-wheels",
               "--native", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = Path(envelope(proc)["result"]["bundle"])
    program = Path("native") / "edgepack-chat"
    assert (again / program).read_bytes() == (native_bundle / program).read_bytes()
    first = json.loads((native_bundle / "edgepack.json").read_text())["bundle_id"]
    assert envelope(proc)["result"]["bundle_id"] == first
