from __future__ import annotations

import pytest

from edgepack.bundle import SCHEMA, Manifest, derive_id
from edgepack.errors import UserError
from edgepack.remote.preflight import check, enforce, required_glibc

WHEELS = ["numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
          "onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl",
          "protobuf-7.36.2-cp310-abi3-manylinux2014_aarch64.whl", "packaging-26.3-py3-none-any.whl"]


def manifest(**kw: object) -> Manifest:
    m = {"schema": SCHEMA, "name": "m-rpi5", "target": {"arch": "aarch64", "python": "3.11"},
         "runtime": {"wheels": WHEELS},
         "files": [{"path": "model/model.onnx.data", "bytes": 100_000_000, "sha256": "0" * 64},
                   {"path": "run.py", "bytes": 1000, "sha256": "0" * 64}]}
    m.update(kw)
    m["bundle_id"] = derive_id(m)
    return Manifest.from_doc(m)


def facts(**kw: object) -> dict:
    f = {"arch": "aarch64", "python": "3.11.2", "glibc": "2.36", "libc": "glibc", "has_venv": True,
         "free_bytes": 10_000_000_000, "mem_available_bytes": 4_000_000_000, "writable": True,
         "install_dir": "/home/pi/edgepack", "termux": False}
    f.update(kw)
    return f


def test_required_glibc_is_the_newest_lowest_tag() -> None:
    assert required_glibc(WHEELS) == (2, 28)
    assert required_glibc(["x-py3-none-any.whl"]) is None


def test_a_fitting_pi_passes() -> None:
    assert check(manifest(), facts()) == []


@pytest.mark.parametrize(("fact", "value", "name"), [
    ("arch", "x86_64", "arch"), ("python", "3.9.2", "python"), ("glibc", "2.24", "glibc"),
    ("has_venv", False, "venv"), ("free_bytes", 150_000_000, "disk"), ("mem_available_bytes", 100_000_000, "memory"),
    ("writable", False, "install_dir"),
])
def test_each_misfit_is_named_with_found_and_expected(fact: str, value: object, name: str) -> None:
    problems = check(manifest(), facts(**{fact: value}))
    assert [p.check for p in problems] == [name]
    with pytest.raises(UserError) as err:
        enforce(problems, "pi.local")
    assert "found" in err.value.message and "expected" in err.value.message and err.value.hint
    assert "Nothing was written" in err.value.message


def test_cuda_bundle_needs_jetpack_and_a_cuda_runtime_on_the_device() -> None:
    m = manifest(runtime={"wheels": [], "execution_provider": "cuda"})
    problems = check(m, facts(genai_cuda=None, nv_tegra_release=None))
    assert [p.check for p in problems] == ["jetpack", "cuda_runtime"]
    assert "no onnxruntime_genai" in problems[1].found and "JetPack 6" in problems[1].fix
    assert [p.check for p in check(m, facts(genai_cuda=False, nv_tegra_release="# R36 (release)"))] == \
        ["cuda_runtime"]
    assert check(m, facts(genai_cuda=True, nv_tegra_release="# R36 (release), REVISION: 4.0")) == []


def test_plain_termux_is_told_to_use_a_glibc_userland() -> None:
    problems = check(manifest(), facts(termux=True, glibc=None, libc=""))
    assert [p.check for p in problems] == ["libc"]
    assert "proot-distro" in problems[0].fix and "bionic" in problems[0].found
    assert check(manifest(), facts(termux=True)) == []  # Termux with a glibc userland (proot-distro Debian)


def test_litert_weight_only_needs_the_memory_it_unpacks_to() -> None:
    m = manifest(export={"format": "tflite", "builder_options": {"recipe": "weight_only_int8"}},
                 files=[{"path": "model/model.litertlm", "bytes": 142_000_000, "sha256": "0" * 64}])
    problems = check(m, facts(mem_available_bytes=2_000_000_000))
    assert [p.check for p in problems] == ["memory"] and "3132 MB" in problems[0].expected
    dynamic = manifest(export={"format": "tflite", "builder_options": {"recipe": "dynamic_int8"}},
                       files=[{"path": "model/model.litertlm", "bytes": 142_000_000, "sha256": "0" * 64}])
    assert check(dynamic, facts(mem_available_bytes=2_000_000_000)) == []


def test_a_runtime_needing_lse_atomics_is_refused_on_a_cortex_a72() -> None:
    """Pi 4 (Cortex-A72) has no LSE atomics; LiteRT-LM's aarch64 build dies with SIGILL there (issue #11)."""
    m = manifest(target={"arch": "aarch64", "python": "3.11", "cpu_features": ["neon", "atomics"]})
    a72 = ["aes", "asimd", "crc32", "fp"]
    problems = check(m, facts(cpu_features=a72))
    assert [p.check for p in problems] == ["cpu"] and "atomics" in problems[0].found
    assert check(m, facts(cpu_features=[*a72, "atomics"])) == []
    assert check(m, facts(cpu_features=None)) == []  # unknown: not refused on a guess


def test_the_memory_check_is_the_builds_plan_when_the_manifest_records_one() -> None:
    """One memory model: the build's plan (runtime.memory.peak_bytes, what `edgepack plan` prints) is what the
    device must have available; a bundle from before it was recorded keeps the old estimate."""
    planned = manifest(runtime={"wheels": WHEELS, "memory": {"peak_bytes": 3_000_000_000}})
    assert not check(planned, facts(mem_available_bytes=3_100_000_000))
    (problem,) = check(planned, facts(mem_available_bytes=2_900_000_000))
    assert problem.check == "memory" and ">= 3000 MB" in problem.expected
    assert not check(manifest(), facts(mem_available_bytes=400_000_000))  # 100 MB of weights: the old factor


def test_where_releases_live_is_one_rule(tmp_path: object) -> None:
    """--install-dir, else the --target's deploy.install_dir, else ~/edgepack (status, rollback, bench --host)."""
    from pathlib import Path

    from edgepack.releases import DeviceRequest, install_dir_of

    target = Path(str(tmp_path)) / "board.toml"
    target.write_text('[device]\narch = "aarch64"\n[deploy]\ninstall_dir = "/opt/models"\n')
    assert install_dir_of(DeviceRequest(host="pi", target=str(target))) == "/opt/models"
    assert install_dir_of(DeviceRequest(host="pi", target=str(target), install_dir="/srv/x")) == "/srv/x"
    assert install_dir_of(DeviceRequest(host="pi")) == "~/edgepack"
