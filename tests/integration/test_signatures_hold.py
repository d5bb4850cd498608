"""Issue #20's attacks on signatures, replayed against a real sshd on loopback: each must now fail.

1. An unsigned bundle with its own install.sh, on a device that trusts a key: plain deploy and the device's `apply`
   (what the Ansible role runs) refuse it before any of its code runs.
3. The signing policy comes from the deploying machine and fails closed.
4. What is checked is what is sent: a swap during the deploy is caught, nothing unverified runs.
8. The lock on adb deploys."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.remote.program import device_program

from ..conftest import FIXTURES, cli, envelope, needs_onnx, needs_sshd
from .test_device_safety import bundle_id, current, deploy, rewritten
from .test_tflite import FAKE_ADB

pytestmark = [pytest.mark.integration, needs_onnx, needs_sshd]


def keypair(tmp_path: Path, name: str = "ci.key") -> tuple[Path, str]:
    key = tmp_path / "keys" / name
    proc = cli("--json", "keygen", "--out", str(key))
    assert proc.returncode == 0, proc.stderr
    return key, f"{key}.pub"


def signed_copy(src: Path, dest: Path, key: Path) -> Path:
    shutil.copytree(src, dest)
    proc = cli("sign", str(dest), "--key", str(key))
    assert proc.returncode == 0, proc.stderr
    return dest


def evil_copy(src: Path, dest: Path, marker: Path) -> Path:
    """The attack: the bundle's install.sh first writes `marker`, its manifest rewritten to match, no signature."""
    def edit(d: Path) -> None:
        sh = d / "install.sh"
        text = sh.read_text()
        first, rest = text.split("\n", 1)
        sh.write_text(f"{first}\ntouch {marker}\n{rest}")
        (d / "edgepack.json.minisig").unlink(missing_ok=True)

    return rewritten(src, dest, edit)


def test_a_device_that_trusts_a_key_never_runs_an_unsigned_bundles_code(tiny_bundles: tuple[Path, Path],
                                                                       device: dict, tmp_path: Path) -> None:
    a, b = tiny_bundles
    install = Path(device["install_dir"])
    key, pub = keypair(tmp_path)
    good = signed_copy(a, tmp_path / "good", key)
    proc, out = deploy(device, str(good), "--require-signature", pub)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = tmp_path / "PWNED"
    evil = evil_copy(b, tmp_path / "evil", marker)
    # Plain deploy: nothing on this machine asks for a signature, the device does, with its own code.
    proc, out = deploy(device, str(evil))
    assert proc.returncode == 1 and out["error"]["code"] == "signature_invalid", out["error"]
    assert "not signed" in out["error"]["message"] and not marker.exists()
    assert current(device) == f"releases/{bundle_id(good)}"
    # The device's `apply` (the Ansible role's one step) on the same files staged by hand, as a role would stage
    # them, whatever the role passes: it never runs install.sh.
    staging = install / ".staging" / f"{bundle_id(evil)}@op-1"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(evil, staging)
    staging_rel = f".staging/{bundle_id(evil)}@op-1"
    for spec in ({}, {"require_signature": False, "trusted": []}, {"require_signature": True}):
        r = subprocess.run([sys.executable, "-", "apply", str(install),
                            json.dumps({"bundle_id": bundle_id(evil), "staging": staging_rel, **spec})],
                           input=device_program(), capture_output=True, text=True, timeout=300)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert r.returncode == 1 and res["code"] == "signature_invalid" and not res["switched"], res
        assert [s["name"] for s in res["steps"]] == ["verify", "signature"] and not marker.exists()
    assert current(device) == f"releases/{bundle_id(good)}"


def test_a_fresh_device_asked_for_a_signature_with_no_key_refuses(tiny_bundles: tuple[Path, Path],
                                                                  device: dict, tmp_path: Path) -> None:
    """`ansible-playbook ... -e edgepack_require_signature=true` with no key: the device trusts nothing, so it refuses
    rather than installing unsigned code."""
    install = Path(device["install_dir"])
    marker = tmp_path / "PWNED"
    evil = evil_copy(tiny_bundles[0], tmp_path / "evil", marker)
    staging = install / ".staging" / f"{bundle_id(evil)}@op-1"
    staging.parent.mkdir(parents=True)
    shutil.copytree(evil, staging)
    r = subprocess.run([sys.executable, "-", "apply", str(install),
                        json.dumps({"bundle_id": bundle_id(evil), "staging": f".staging/{bundle_id(evil)}@op-1",
                                    "require_signature": True})],
                       input=device_program(), capture_output=True, text=True, timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["code"] == "signature_invalid" and "trusts no key" in res["error"] and not marker.exists()


def claiming(src: Path, dest: Path, target_id: str) -> Path:
    """A copy of a bundle whose manifest says it was built for `target_id` (its id recomputed)."""
    from edgepack.bundle import write_manifest

    shutil.copytree(src, dest)
    doc = json.loads((src / "edgepack.json").read_text())
    doc["target"]["id"] = target_id
    write_manifest(dest, doc)
    return dest


def test_the_signing_policy_comes_from_the_deploying_side_and_fails_closed(tiny_bundles: tuple[Path, Path],
                                                                          device: dict, tmp_path: Path) -> None:
    install = Path(device["install_dir"])
    key, pub = keypair(tmp_path)
    boards = tmp_path / "boards"
    boards.mkdir()
    board = boards / "my-board.toml"
    board.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        "[deploy]", f'[deploy]\ntrusted_keys = ["{pub}"]', 1))
    mine = claiming(tiny_bundles[0], tmp_path / "mine", "my-board")
    # The user's own target is not shipped and not on $EDGEPACK_TARGET_PATH: an error, never "not required".
    proc, out = deploy(device, str(mine))
    assert proc.returncode == 1 and out["error"]["code"] == "signature_policy_unresolved", out["error"]
    assert "--target" in out["error"]["hint"] and not install.exists()
    # Named with --target, or found on $EDGEPACK_TARGET_PATH: its trusted_keys apply, unsigned is refused.
    proc, out = deploy(device, str(mine), "--target", str(board))
    assert proc.returncode == 1 and out["error"]["code"] == "signature_invalid" and not install.exists()
    proc = cli("--json", "deploy", str(mine), *device["args"],
               env={"EDGEPACK_TARGET_PATH": os.pathsep.join([str(boards), str(FIXTURES)])})
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "signature_invalid"
    # A bundle that claims a target without keys does not escape the one this machine names.
    host = claiming(tiny_bundles[0], tmp_path / "claims-host", "host")
    proc, out = deploy(device, str(host), "--target", str(board))
    assert proc.returncode == 1 and out["error"]["code"] == "target_mismatch" and not install.exists()
    # The policy set in CI's environment is the flag's.
    proc = cli("--json", "deploy", str(tiny_bundles[0]), *device["args"], env={"EDGEPACK_REQUIRE_SIGNATURE": pub})
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "signature_invalid" and not install.exists()
    # Signed for that target: deploys, signature verified.
    ok = signed_copy(mine, tmp_path / "mine-signed", key)
    proc, out = deploy(device, str(ok), "--target", str(board))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out["result"]["signature"].startswith("verified (key ")


def test_a_swap_during_the_deploy_installs_nothing_unverified(tiny_bundles: tuple[Path, Path], device: dict,
                                                              tmp_path: Path) -> None:
    """The bundle is rewritten (consistently, unsigned) right after its signature was checked, before the upload:
    each file is hashed as it is sent and the device checks the signature with its own code."""
    from edgepack import api
    from edgepack.errors import EdgepackError
    from edgepack.progress import ProgressEvent

    key, pub = keypair(tmp_path)
    bundle = signed_copy(tiny_bundles[0], tmp_path / "signed", key)
    marker = tmp_path / "PWNED"
    attacker = evil_copy(tiny_bundles[0], tmp_path / "attacker", marker)

    def swap(event: ProgressEvent) -> None:
        if event.stage == "bundle" and "signature verified" in event.message:
            for name in ("install.sh", "edgepack.json"):
                shutil.copy(attacker / name, bundle / name)

    req = api.DeployRequest(device=api.DeviceRequest(host="pi.local", ssh_config=Path(device["ssh_config"]),
                                                     known_hosts=Path(device["known_hosts"]),
                                                     install_dir=device["install_dir"]),
                            bundle=bundle, require_signature=(pub,))
    with pytest.raises(EdgepackError) as caught:
        api.deploy(req, progress=swap)
    assert caught.value.code == "bundle_changed" and "install.sh" in caught.value.message
    assert not marker.exists() and not (Path(device["install_dir"]) / "current").exists()


def test_adb_deploys_take_the_lock_and_honour_the_phones_keys(tiny_bundles: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    import platform

    bindir, phone, log = tmp_path / "bin", tmp_path / "phone", tmp_path / "adb.log"
    bindir.mkdir()
    (bindir / "adb").write_text(FAKE_ADB)
    (bindir / "adb").chmod(stat.S_IRWXU)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_PHONE": str(phone), "FAKE_ADB_LOG": str(log),
           "FAKE_PYTHON": "", "FAKE_ABI": {"x86_64": "x86_64", "aarch64": "arm64-v8a"}[platform.machine()]}
    root = phone / "data/local/tmp/edgepack"
    # Another operation holds the phone's lock (touched just now): refused, nothing pushed.
    (root / ".lock").mkdir(parents=True)
    (root / ".lock" / "holder").write_text(json.dumps({"command": "edgepack deploy other", "host": "ci-7"}))
    proc = cli("--json", "deploy", str(tiny_bundles[0]), "--via", "adb", env=env)
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "device_locked", proc.stderr[-2000:]
    assert "ci-7" in envelope(proc)["error"]["message"] and " push " not in log.read_text()
    shutil.rmtree(root / ".lock")
    # A phone that trusts a key: an unsigned bundle is refused before anything is pushed; a signed one deploys.
    key, pub = keypair(tmp_path)
    proc = cli("--json", "deploy", str(signed_copy(tiny_bundles[0], tmp_path / "s", key)), "--via", "adb",
               "--require-signature", pub, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert envelope(proc)["result"]["signature"].startswith("verified")
    assert list((root / "trusted_keys").glob("*.pub")) and not (root / ".lock").exists()
    log.unlink()
    proc = cli("--json", "deploy", str(tiny_bundles[1]), "--via", "adb", env=env)
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "signature_invalid", proc.stderr[-2000:]
    assert " push " not in log.read_text() and not (root / ".lock").exists()
