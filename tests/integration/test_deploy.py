"""Deploy against a real OpenSSH server on loopback: the 'device' is this machine, reached as pi.local."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import cli, envelope, needs_onnx, needs_sshd, with_smoke

pytestmark = [pytest.mark.integration, needs_onnx, needs_sshd]


def deploy(device: dict, *args: str, **kw: object) -> tuple[subprocess.CompletedProcess[str], dict]:
    proc = cli("--json", "deploy", *args, *device["args"], **kw)  # type: ignore[arg-type]
    return proc, envelope(proc)


def current(device: dict) -> str | None:
    link = Path(device["install_dir"]) / "current"
    return os.readlink(link) if link.is_symlink() else None


def test_deploy_status_redeploy_rollback(tiny_bundles: tuple[Path, Path], device: dict) -> None:
    a, b = tiny_bundles
    proc, doc = deploy(device, str(a))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = doc["result"]
    id_a = json.loads((a / "edgepack.json").read_text())["bundle_id"]
    assert res["bundle_id"] == id_a and res["switched"] and res["smoke"]["ok"]
    assert current(device) == f"releases/{id_a}"
    release = Path(device["install_dir"]) / "releases" / id_a
    assert (release / ".venv" / "bin" / "python").exists()
    # Every remote command is a structured record in the JSON document.
    cmds = res["commands"]
    assert cmds and all({"command", "exit_code", "seconds", "stdout_tail", "stderr_tail"} <= set(c) for c in cmds)
    assert any("smoke_test.py" in c["command"] for c in cmds)
    assert [s["name"] for s in res["stages"]] == ["preflight", "lock", "upload", "verify", "install", "smoke", "switch",
                                                  "prune"]
    # Second deploy of the same bundle: nothing is uploaded again, it still smoke-tests and stays current.
    proc, doc = deploy(device, str(a))
    assert proc.returncode == 0 and doc["result"]["uploaded_files"] == 0
    # A new bundle, then status, then rollback.
    proc, doc = deploy(device, str(b))
    id_b = doc["result"]["bundle_id"]
    assert proc.returncode == 0 and current(device) == f"releases/{id_b}" and doc["result"]["previous"] == id_a
    st = envelope(cli("--json", "status", *device["args"]))["result"]
    assert st["current"] == id_b and set(st["releases"]) == {id_a, id_b}
    rb = cli("--json", "rollback", *device["args"])
    assert rb.returncode == 0 and envelope(rb)["result"]["current"] == id_a
    assert current(device) == f"releases/{id_a}"
    human = cli("status", *device["args"])
    assert f"* {id_a}" in human.stdout
    # Benchmark the device's current release over SSH: repeated runs, medians and spread.
    dev_args = [a for a in device["args"] if a != "--accept-new-host-key"]
    b = cli("--json", "bench", "--reps", "2", "--tokens", "8", *dev_args)
    res = envelope(b)["result"]
    assert b.returncode == 0, b.stderr[-2000:]
    assert res["bundle"] == id_a and len(res["runs"]) == 2 and res["summary"]["decode_tokens_per_s"]["median"] > 0


def test_deploy_without_bundle_takes_newest_in_dist(tiny_bundles: tuple[Path, Path], device: dict,
                                                    tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    shutil.copytree(tiny_bundles[0], dist / tiny_bundles[0].name)
    proc = cli("deploy", "--dist", str(dist), *device["args"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"newest in {dist}" in proc.stderr and "deployed" in proc.stdout


def test_unknown_host_key_refused_then_accepted(tiny_bundles: tuple[Path, Path], device: dict) -> None:
    Path(device["known_hosts"]).write_text("")
    proc, doc = deploy(device, str(tiny_bundles[0]))
    assert proc.returncode == 1 and doc["error"]["code"] == "host_key_unknown"
    assert doc["error"]["fingerprint"].startswith("SHA256:") and "--accept-new-host-key" in doc["error"]["hint"]
    assert not Path(device["install_dir"]).exists()
    proc, doc = deploy(device, str(tiny_bundles[0]), "--accept-new-host-key")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ssh-ed25519" in Path(device["known_hosts"]).read_text()


def test_changed_host_key_always_refused(tiny_bundles: tuple[Path, Path], device: dict, tmp_path: Path) -> None:
    from ..sshd import keygen

    keygen(tmp_path / "other")
    kind, b64 = (tmp_path / "other.pub").read_text().split()[:2]
    port = Path(device["ssh_config"]).read_text().split("Port ")[1].split()[0]
    Path(device["known_hosts"]).write_text(f"[127.0.0.1]:{port} {kind} {b64}\n")
    proc, doc = deploy(device, str(tiny_bundles[0]), "--accept-new-host-key")
    assert proc.returncode == 1 and "CHANGED" in doc["error"]["message"] and doc["error"]["code"] == "host_key_changed"
    assert not Path(device["install_dir"]).exists()


def test_tampered_bundle_is_refused_before_connecting(tiny_bundles: tuple[Path, Path], device: dict,
                                                      tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundles[0], bad)
    (bad / "run.py").write_text((bad / "run.py").read_text() + "\nimport os; os.system('echo pwned')\n")
    proc, doc = deploy(device, str(bad))
    assert proc.returncode == 1 and "changed run.py" in doc["error"]["message"]
    assert not Path(device["install_dir"]).exists()


def test_wrong_arch_fails_preflight_and_writes_nothing(tiny_model: Path, device: dict, tmp_path: Path) -> None:
    from ..conftest import FIXTURES, tiny_bundle_for

    t = tmp_path / "arm.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text()
                 .replace('arch = "native"', 'arch = "aarch64"')
                 .replace('python = "native"', 'python = "3.11"\nwheel_platforms = ["manylinux_2_28_aarch64", '
                                               '"manylinux_2_27_aarch64", "manylinux2014_aarch64"]'))
    bundle = tiny_bundle_for(tiny_model, t, tmp_path / "dist")
    proc, doc = deploy(device, str(bundle), "--target", str(t))
    assert proc.returncode == 1
    problems = doc["error"]["problems"]
    assert problems[0]["check"] == "arch" and problems[0]["expected"] == "aarch64"
    assert "Nothing was written" in doc["error"]["message"]
    assert not Path(device["install_dir"]).exists()


def test_full_disk_fails_preflight(tiny_bundles: tuple[Path, Path], device: dict) -> None:
    mnt = Path(device["install_dir"]).parent
    mnt.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc, doc = deploy(device, str(tiny_bundles[0]))
        assert proc.returncode == 1
        assert doc["error"]["problems"][0]["check"] == "disk"
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_smoke_failure_keeps_previous_current(tiny_bundles: tuple[Path, Path], device: dict,
                                              tmp_path: Path) -> None:

    a, b = tiny_bundles
    proc, _ = deploy(device, str(a))
    assert proc.returncode == 0
    before = current(device)
    # A bundle that loads but whose output on this device differs from what the build recorded (as when a
    # kernel misbehaves on one instruction set): the recorded golden tokens are not what the model picks.
    golden = json.loads((a / "edgepack.json").read_text())["smoke"]["golden_tokens"]
    wrong = with_smoke(a, tmp_path / "wrong", golden_tokens=[(t + 1) % 500 for t in golden],
                       golden_checked=[True] * len(golden))
    proc, doc = deploy(device, str(wrong))
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = doc["error"]
    assert "smoke test failed" in err["message"] and err["smoke"]["ok"] is False and err["code"] == "smoke_test_failed"
    assert err["smoke"]["golden_match"] < err["smoke"]["golden_required"] == 8
    assert err["evidence"]["exit_code"] == 1 and err["evidence"]["stdout_tail"]
    assert current(device) == before


def test_corrupted_on_device_before_verify_is_resent(tiny_bundles: tuple[Path, Path], device: dict) -> None:
    from edgepack import api
    from edgepack.progress import ProgressEvent

    bundle = tiny_bundles[1]
    install = Path(device["install_dir"])
    bundle_id = json.loads((bundle / "edgepack.json").read_text())["bundle_id"]
    corrupted: list[str] = []

    def on_progress(e: ProgressEvent) -> None:
        if e.stage == "verify" and not corrupted:  # between upload and the device-side sha256 check
            f = next((install / ".staging").glob(f"{bundle_id}@*")) / "model" / "genai_config.json"
            f.write_text(f.read_text().replace("\"", "'", 2))
            corrupted.append("model/genai_config.json")

    req = api.DeployRequest(device=api.DeviceRequest(host="pi.local", ssh_config=Path(device["ssh_config"]),
                                                     known_hosts=Path(device["known_hosts"]),
                                                     install_dir=str(install)), bundle=bundle)
    res = api.deploy(req, progress=on_progress)
    assert corrupted and res.repaired_files == ("model/genai_config.json",)
    assert res.smoke["ok"] and current(device) == f"releases/{bundle_id}"
    assert (install / "releases" / bundle_id / "model" / "genai_config.json").read_bytes() == \
        (bundle / "model" / "genai_config.json").read_bytes()


def test_command_timeout_carries_evidence(ssh_server, device: dict) -> None:  # type: ignore[no-untyped-def]
    import time

    from edgepack.errors import RemoteError
    from edgepack.remote.ssh import Connection, SSHOptions

    opts = SSHOptions(host="pi.local", ssh_config=Path(device["ssh_config"]), known_hosts=Path(device["known_hosts"]))
    with Connection(opts) as conn:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="timed out after 1s") as err:
            conn.run(["sleep", "30"], timeout=1, what="a hanging command")
        assert time.monotonic() - t0 < 10
        ev = err.value.fields["evidence"]
        assert ev.exit_code is None and ev.command == "sleep 30" and ev.killed
        # The timed-out command was ended on the device, not left running.
        assert subprocess.run(["pgrep", "-x", "-f", "sleep 30"], capture_output=True).returncode == 1
        # Arguments are quoted: a hostile file name is data, not shell.
        res = conn.run(["echo", "a; touch /tmp/edgepack-pwned"])
        assert res.stdout.strip() == "a; touch /tmp/edgepack-pwned" and not Path("/tmp/edgepack-pwned").exists()


def test_link_drop_mid_upload_then_resume(smollm2_host_bundle: Path, tmp_path: Path) -> None:
    """sshd dies in the middle of the upload; the rerun sends only what is missing and completes."""
    import time

    from ..sshd import make_server

    server = make_server(tmp_path / "sshd2")
    server.start()
    cfg, kh = server.write_client_files(tmp_path)
    install = tmp_path / "home" / "edgepack"
    args = ["--json", "deploy", str(smollm2_host_bundle), "--host", "pi.local", "--ssh-config", str(cfg),
            "--known-hosts", str(kh), "--install-dir", str(install)]
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edgepack", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    data = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hits = list(install.glob(".staging/*/model/model.onnx.data"))
        if hits and hits[0].stat().st_size > 5_000_000:
            data = hits[0]
            break
        time.sleep(0.02)
    assert data is not None, "upload never started"
    server.stop()  # the link drops mid-file
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    doc = json.loads(out)
    assert doc["error"]["code"] == "ssh_connection_dropped" and "Run the same command again" in doc["error"]["hint"]
    assert not (install / "current").exists()
    server.start()
    try:
        done = cli(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        res = envelope(done)["result"]
        assert res["skipped_files"] > 0  # files that had arrived whole were not sent again
        assert res["smoke"]["ok"] and (install / "current").is_symlink()
    finally:
        server.stop()


def test_proxyjump_from_ssh_config(ssh_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A device behind a jump host, as ~/.ssh/config describes it (ProxyJump)."""
    from edgepack.remote.ssh import Connection, SSHOptions

    from ..sshd import make_server

    inner = make_server(tmp_path / "inner")
    inner.start()
    try:
        (inner.dir / "authorized_keys").write_text(ssh_server.user_key.with_suffix(".pub").read_text())
        cfg = tmp_path / "ssh_config"
        cfg.write_text(f"Host pi-behind\n  HostName 127.0.0.1\n  Port {inner.port}\n  User root\n"
                       f"  IdentityFile {ssh_server.user_key}\n  ProxyJump root@127.0.0.1:{ssh_server.port}\n")
        kh = tmp_path / "known_hosts"
        kh.write_text(ssh_server.host_key_line() + inner.host_key_line())
        before = (ssh_server.dir / "sshd.log").read_text().count("Accepted publickey")
        with Connection(SSHOptions(host="pi-behind", ssh_config=cfg, known_hosts=kh)) as conn:
            assert conn.run(["echo", "through the jump host"]).stdout.strip() == "through the jump host"
        # The jump host authenticated one more session (the hop); the device was reached through it.
        assert (ssh_server.dir / "sshd.log").read_text().count("Accepted publickey") == before + 1
    finally:
        inner.stop()


def test_cuda_bundle_preflight_names_what_to_install(tiny_model: Path, device: dict, tmp_path: Path) -> None:
    from ..conftest import FIXTURES, tiny_bundle_for

    t = tmp_path / "cuda.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        "[quantize]", '[export]\nexecution_provider = "cuda"\n\n[runtime]\npackages = []\n\n[quantize]'))
    bundle = tiny_bundle_for(tiny_model, t, tmp_path / "dist")
    m = json.loads((bundle / "edgepack.json").read_text())
    # Only the signature verifier's wheels: the CUDA runtime comes from the device's JetPack.
    assert not any("onnxruntime" in w for w in m["runtime"]["wheels"])
    assert m["quality"]["scored_on"].startswith("cpu (the target's cuda")
    proc, doc = deploy(device, str(bundle), "--target", str(t))
    assert proc.returncode == 1
    checks = [p["check"] for p in doc["error"]["problems"]]
    assert checks == ["jetpack", "cuda_runtime"] and "JetPack 6" in doc["error"]["hint"]
    assert not Path(device["install_dir"]).exists()


def test_tune_on_a_device_times_candidates_there(tiny_bundles: tuple[Path, Path], tiny_model: Path,
                                                 tiny_target: Path, device: dict, tmp_path: Path) -> None:
    ssh = ["--tune-on", "pi.local", "--ssh-config", device["ssh_config"], "--known-hosts", device["known_hosts"],
           "--install-dir", device["install_dir"]]
    args = ["--json", "build", str(tiny_model), "--target", str(tiny_target), "--out", str(tmp_path / "d"),
            "--no-wheels", "--tune", *ssh]
    # No runtime on the device yet: a clear error, nothing built.
    proc = cli(*args)
    assert proc.returncode == 1 and "no installed edgepack runtime" in envelope(proc)["error"]["message"]
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []
    assert deploy(device, str(tiny_bundles[0]))[0].returncode == 0
    proc = cli(*args)
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert m["tune"]["speed_measured_on"].startswith("127.0.0.1 (")
    assert all(c["decode_tok_s"] > 0 for c in m["tune"]["candidates"] if c["passed"])
    assert not (Path(device["install_dir"]) / "tune").exists()  # the device is left as it was


def test_device_python_differs_wheels_are_fetched_for_it(tiny_model: Path, device: dict, tmp_path: Path) -> None:
    """A bundle vendored for Python 3.12 goes to a device with 3.11: edgepack brings the same pinned runtime for
    the device's Python and platform, and the device still installs offline."""
    import platform

    from ..conftest import FIXTURES, tiny_bundle_for

    t = tmp_path / "py312.toml"
    arch = platform.machine()
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        'python = "native"', f'python = "3.12"\nglibc = "2.28"\nwheel_platforms = ["manylinux_2_28_{arch}", '
                             f'"manylinux_2_27_{arch}", "manylinux2014_{arch}"]'))
    bundle = tiny_bundle_for(tiny_model, t, tmp_path / "dist")
    wheels = json.loads((bundle / "edgepack.json").read_text())["runtime"]["wheels"]
    assert any("cp312" in w for w in wheels)
    proc, doc = deploy(device, str(bundle), "--target", str(t))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = doc["result"]
    assert res["wheels_fetched_for"].startswith("3.11") and res["smoke"]["ok"]
    fetched = list((Path(device["install_dir"]) / "wheels").glob("cp311-*/onnxruntime_genai-*cp311*.whl"))
    assert fetched, "the device's wheels folder should hold cp311 wheels"
    assert any(r["name"] == "wheels" for r in res["stages"])


def test_deploy_to_a_board_on_its_own_network(tiny_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    """The device lives in its own network namespace at 10.213.<n>.2, reached over a veth 'LAN' as pi.lan."""
    from ..sshd import LanDevice, make_server, netns_available

    if shutil.which("ip") is None or not netns_available():
        pytest.skip("cannot create network namespaces here (needs root and iproute2)")
    lan = LanDevice(os.getpid() % 200 + 20)
    lan.up()
    server = make_server(tmp_path / "sshd-lan", address=lan.dev_ip, netns=lan.ns)
    try:
        server.start()
        cfg, kh = server.write_client_files(tmp_path, alias="pi.lan")
        install = tmp_path / "board" / "edgepack"
        proc = cli("--json", "deploy", str(tiny_bundles[0]), "--host", "pi.lan", "--ssh-config", str(cfg),
                   "--known-hosts", str(kh), "--install-dir", str(install))
        res = envelope(proc)["result"]
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert res["host"] == lan.dev_ip and res["smoke"]["ok"] and (install / "current").is_symlink()
    finally:
        server.stop()
        lan.down()


def test_a_release_that_changes_only_the_runner_sends_kilobytes(tiny_bundles: tuple[Path, Path], device: dict,
                                                                 tmp_path: Path) -> None:
    """Boards on metered links: files a release on the device already has (same sha256) are linked there from it,
    not sent again; the device still verifies every file of the new release."""
    from edgepack.bundle import write_manifest

    a = tiny_bundles[0]
    proc, doc = deploy(device, str(a))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = doc["result"]["uploaded_bytes"]
    patched = tmp_path / "patched"
    shutil.copytree(a, patched)
    run = patched / "run.py"
    run.write_text(run.read_text().replace('"""Run ', '"""(patched runner) Run ', 1))
    write_manifest(patched, {k: v for k, v in json.loads((a / "edgepack.json").read_text()).items()
                             if k not in ("files", "content_sha256", "bundle_id", "schema")})
    total = sum(f["bytes"] for f in json.loads((patched / "edgepack.json").read_text())["files"])
    proc, doc = deploy(device, str(patched))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = doc["result"]
    assert res["smoke"]["ok"] and current(device) == f"releases/{res['release_folder']}"
    assert res["uploaded_files"] == 1 and res["uploaded_bytes"] < 0.01 * total, (res["uploaded_bytes"], total)
    assert first > 0.5 * total
    new = Path(device["install_dir"]) / "releases" / res["release_folder"]
    old = Path(device["install_dir"]) / "releases" / json.loads((a / "edgepack.json").read_text())["bundle_id"]
    weights = next(p.relative_to(new) for p in (new / "model").iterdir() if p.name.endswith(".data"))
    assert os.path.samefile(new / weights, old / weights)  # linked, not copied
