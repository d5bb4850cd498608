"""Issue #11's proofs against a real sshd on loopback: the live release survives everything, one operation at a time,
ids are never paths, signatures are checked before upload and again on the device, wheels are hash-pinned."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepack.remote import device as h
from edgepack.remote.device import files as device_files

from ..conftest import cli, envelope, interruptible, needs_onnx, needs_sshd

pytestmark = [pytest.mark.integration, needs_onnx, needs_sshd]


def deploy(device: dict, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    proc = cli("--json", "deploy", *args, *device["args"])
    return proc, envelope(proc)


def bundle_id(bundle: Path) -> str:
    return str(json.loads((bundle / "edgepack.json").read_text())["bundle_id"])


def current(device: dict) -> str:
    return os.readlink(Path(device["install_dir"]) / "current")


def live_smoke_ok(device: dict) -> bool:
    """The release `current` points at still runs its own smoke test with its own venv."""
    rel = Path(device["install_dir"]) / current(device)
    proc = subprocess.run([str(rel / ".venv" / "bin" / "python"), str(rel / "smoke_test.py"), "--tokens", "4"],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["ok"]


def process_under(path: Path, timeout: float = 120) -> bool:
    """True as soon as a process runs with `path` in its command line (polled, not guessed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", str(path)], capture_output=True).returncode == 0:
            return True
        time.sleep(0.05)
    return False


def no_process_under(path: Path) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", str(path)], capture_output=True).returncode == 1:
            return True
        time.sleep(0.2)
    return False


def rewritten(src: Path, dest: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of a bundle with `edit(dest)` applied and its manifest rewritten to match (as an attacker would)."""
    from edgepack.bundle import write_manifest

    shutil.copytree(src, dest)
    edit(dest)
    write_manifest(dest, json.loads((src / "edgepack.json").read_text()))
    return dest


def test_a_bad_live_copy_is_never_rewritten_whatever_interrupts_the_redeploy(tiny_bundles: tuple[Path, Path],
                                                                             device: dict, tmp_path: Path) -> None:
    a, b = tiny_bundles
    assert deploy(device, str(a))[0].returncode == 0
    install = Path(device["install_dir"])
    live = install / "releases" / bundle_id(a)
    assert current(device) == f"releases/{bundle_id(a)}"
    with (live / "README.md").open("a") as fh:  # one changed byte in the live release
        fh.write("x")
    # Redeploy A and press Ctrl-C while the device installs the fresh copy.
    proc = subprocess.Popen(interruptible("--json", "deploy", str(a), *device["args"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "] install:" in line:
            # Wait for the event itself, a process running from the fresh folder's venv (pip), not a guess at
            # its timing: a fixed sleep raced with the install on a loaded 2-core machine.
            assert process_under(install / "releases" / f"{bundle_id(a)}.2" / ".venv"), "".join(seen)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    doc = json.loads(out)
    assert proc.returncode == 130, "".join(seen) + err
    assert doc["error"]["code"] == "interrupted" and "was not changed" in doc["error"]["message"]
    assert f"releases/{bundle_id(a)}" in doc["error"]["message"]
    assert current(device) == f"releases/{bundle_id(a)}" and (live / ".venv" / "bin" / "python").exists()
    assert no_process_under(install / "releases" / f"{bundle_id(a)}.2")  # its pip was ended with it
    assert live_smoke_ok(device)
    # A failing install of another bundle: `current` stays, and the error says so.
    failing = rewritten(b, tmp_path / "failing", lambda d: (d / "install.sh").write_text(
        (d / "install.sh").read_text().replace("set -eu\n", "set -eu\necho 'disk on fire' >&2; exit 9\n", 1)))
    proc, doc = deploy(device, str(failing))
    assert proc.returncode == 1 and "install.sh failed" in doc["error"]["message"]
    assert f"still points at releases/{bundle_id(a)}" in doc["error"]["message"]
    assert doc["error"]["evidence"]["stderr_tail"][-1] == "disk on fire"
    assert current(device) == f"releases/{bundle_id(a)}" and live_smoke_ok(device)
    # The interrupted redeploy, run again, completes into the fresh folder; the bad copy was never touched.
    proc, doc = deploy(device, str(a))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert doc["result"]["release_folder"] == f"{bundle_id(a)}.2" and current(device).endswith(".2")
    assert (live / "README.md").read_text().endswith("x")


def test_parallel_deploys_one_at_a_time(tiny_bundles: tuple[Path, Path], device: dict) -> None:
    a, b = tiny_bundles
    install = Path(device["install_dir"])
    assert deploy(device, str(a))[0].returncode == 0
    pairs = [(a, a), (a, b), (b, b), (b, a)] * 2 + [(a, a), (a, b)]
    locked_out = 0
    for round_, (x, y) in enumerate(pairs):
        procs = [subprocess.Popen([sys.executable, "-m", "edgepack", "--json", "deploy", str(p), *device["args"]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (x, y)]
        results = [(p.wait(timeout=600), json.loads(p.communicate()[0])) for p in procs]
        assert any(code == 0 for code, _ in results), results
        for code, doc in results:
            assert code in (0, 1), doc
            if code == 1:  # the loser changed nothing and names the holder
                assert doc["error"]["code"] == "device_locked", doc["error"]
                assert doc["error"]["holder"]["command"].startswith("edgepack deploy ")
                locked_out += 1
        folder = current(device).removeprefix("releases/")
        check = device_files.verify_dir(str(install / "releases" / folder))
        assert check["ok"] and check["installed"], (round_, check)
        hist = (install / "history").read_text().split()
        assert hist[-1] == folder and all(h.FOLDER_RE.match(x) for x in hist)
        winners = {d["result"]["release_folder"] for c, d in results if c == 0}
        assert folder in winners
    assert locked_out > 0, "the two deploys never overlapped: the lock was not exercised"
    assert not list(install.glob(".current.*.tmp")) and not list(install.glob(".history.*.tmp"))
    assert live_smoke_ok(device)


@pytest.mark.parametrize("bad", ["x/../../../canary", "..", "/etc", "a b"])
def test_ids_that_are_paths_are_refused_before_connecting(tiny_bundles: tuple[Path, Path], device: dict,
                                                          tmp_path: Path, bad: str) -> None:
    install = Path(device["install_dir"])
    canary = install.parent / "canary"
    canary.mkdir(parents=True)
    evil = tmp_path / "evil"
    shutil.copytree(tiny_bundles[0], evil)
    doc = json.loads((evil / "edgepack.json").read_text())
    (evil / "edgepack.json").write_text(json.dumps(doc | {"bundle_id": bad}))
    proc, out = deploy(device, str(evil))
    assert proc.returncode == 1 and out["error"]["kind"] == "bundle" and "claims bundle id" in out["error"]["message"]
    assert canary.is_dir() and not install.exists()


def test_signatures_checked_before_upload_and_again_on_the_device(tiny_bundles: tuple[Path, Path], device: dict,
                                                                  tmp_path: Path) -> None:
    a, b = tiny_bundles
    install = Path(device["install_dir"])
    key, other = tmp_path / "keys" / "ci.key", tmp_path / "keys" / "other.key"
    for k in (key, other):
        assert cli("keygen", "--out", str(k)).returncode == 0
    pub = f"{key}.pub"
    signed = tmp_path / "signed"
    shutil.copytree(a, signed)
    proc = cli("--json", "sign", str(signed), "--key", str(key))
    assert proc.returncode == 0, proc.stderr
    key_id = envelope(proc)["result"]["key_id"]
    # Unsigned, signed by another key, altered after signing: refused here, nothing reaches the device.
    wrong = tmp_path / "wrong"
    shutil.copytree(a, wrong)
    assert cli("sign", str(wrong), "--key", str(other)).returncode == 0
    altered = tmp_path / "altered"
    shutil.copytree(signed, altered)
    from edgepack.bundle import derive_id

    doc = json.loads((altered / "edgepack.json").read_text())
    doc["smoke"]["tokens"] = 1  # a consistent manifest (its id recomputed), but not the one that was signed
    doc["bundle_id"] = derive_id(doc)
    (altered / "edgepack.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    for bundle, says in ((a, "not signed"), (wrong, "not trusted"), (altered, "does not match")):
        proc, out = deploy(device, str(bundle), "--require-signature", pub)
        assert proc.returncode == 1 and out["error"]["code"] == "signature_invalid", out["error"]
        assert says in out["error"]["message"] and not install.exists()
    # Signed: deploys, and the device now trusts the key.
    proc, out = deploy(device, str(signed), "--require-signature", pub)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out["result"]["signature"] == f"verified (key {key_id})"
    assert (install / "trusted_keys" / f"{key_id}.pub").is_file()
    # The device itself now refuses unsigned code, even from a deploy that did not ask for a signature.
    proc, out = deploy(device, str(b))
    assert proc.returncode == 1 and out["error"]["code"] == "signature_invalid", out["error"]
    assert "not signed" in out["error"]["message"], out["error"]
    assert current(device) == f"releases/{bundle_id(signed)}"
    # A tampered release copied onto the device by hand is refused by its own install step.
    by_hand = install / "releases" / "by-hand"
    shutil.copytree(install / current(device), by_hand, ignore=shutil.ignore_patterns(".venv"))
    (by_hand / "run.py").write_text((by_hand / "run.py").read_text() + "\nprint('pwned')\n")
    env = {**os.environ, "EDGEPACK_TRUSTED_KEYS": str(install / "trusted_keys")}
    r = subprocess.run(["sh", str(by_hand / "install.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 6 and "does not match its manifest" in r.stderr and "run.py" in r.stderr
    from edgepack.bundle import write_manifest

    write_manifest(by_hand, json.loads((signed / "edgepack.json").read_text()))  # consistent, but unsigned now
    shutil.copy(signed / "edgepack.json.minisig", by_hand / "edgepack.json.minisig")  # an old signature
    r = subprocess.run(["sh", str(by_hand / "install.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 7 and "signature" in r.stderr, r.stderr[-2000:]
    assert not (by_hand / ".venv" / ".edgepack-installed").exists()
    if shutil.which("minisign"):  # anyone can check a bundle by hand with the minisign tool
        m = subprocess.run(["minisign", "-V", "-p", pub, "-m", str(signed / "edgepack.json")], capture_output=True,
                           text=True)
        assert m.returncode == 0 and bundle_id(signed) in m.stdout


def test_install_refuses_a_swapped_wheel(tiny_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    """Same file name, other bytes, manifest rewritten to match: pip's --require-hashes stops it."""
    def swap(d: Path) -> None:
        whl = next((d / "wheels").glob("packaging-*.whl"))
        whl.write_bytes(whl.read_bytes() + b"\0")

    bad = rewritten(tiny_bundles[0], tmp_path / "swapped", swap)
    r = subprocess.run(["sh", str(bad / "install.sh")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EDGEPACK_VENV": str(tmp_path / "venv")})
    assert r.returncode == 4, r.stderr[-2000:]
    assert "DO NOT MATCH THE HASHES" in r.stderr and "packaging" in r.stderr


def test_the_service_serves_current_and_a_failing_one_is_switched_back(tiny_model: Path, device: dict,
                                                                       tmp_path: Path) -> None:
    """No systemd user session over this SSH: the same restart → /health → one completion → switch back logic runs
    with the supervisor the device has (a supervised process with a pid file)."""
    import http.client
    import socket as sock_mod

    from ..conftest import FIXTURES, tiny_bundle_for

    with sock_mod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = tmp_path / "svc.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        "[deploy]", f'[deploy]\nsystemd = true\nserve_addr = "127.0.0.1:{port}"'))
    good = tiny_bundle_for(tiny_model, t, tmp_path / "dist")
    install = Path(device["install_dir"])
    try:
        proc, doc = deploy(device, str(good), "--target", str(t))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "supervised process" in doc["result"]["service"] and "healthy" in doc["result"]["service"]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hi", "max_tokens": 3}),
                  headers={"Content-Type": "application/json"})
        assert c.getresponse().status == 200
        st = envelope(cli("--json", "status", *device["args"]))["result"]
        assert st["service"]["running"] and st["service"]["addr"] == f"127.0.0.1:{port}"
        # The server dies (OOM killer, say): its supervisor restarts it after 5 s, as the unit's Restart= would.
        os.kill(st["service"]["server_pid"], signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline:
            again = envelope(cli("--json", "status", *device["args"]))["result"]["service"]
            if again["running"] and again["server_pid"] != st["service"]["server_pid"]:
                break
            time.sleep(1)
        assert again["restarts"] == 1 and again["last_exit"] is None and again["pid"] == st["service"]["pid"], again
        for _ in range(120):  # the restarted server loads the model again: 503, then 200
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            c.close()
            time.sleep(0.5)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hi", "max_tokens": 3}),
                  headers={"Content-Type": "application/json"})
        assert c.getresponse().status == 200
        # A release that passes its smoke test but whose server dies on start (a missing system library, say).
        def break_server(d: Path) -> None:
            core = d / "edgepack_server.py"
            core.write_text(core.read_text().replace("def serve(rt: Any, args: Any) -> int:\n",
                                                     "def serve(rt: Any, args: Any) -> int:\n"
                                                     "    raise SystemExit('libfoo.so.1: cannot open')\n", 1))

        bad = rewritten(good, tmp_path / "bad-server", break_server)
        proc, doc = deploy(device, str(bad), "--target", str(t))
        err = doc["error"]
        assert proc.returncode == 1 and "failed its check" in err["message"], err
        assert f"switched back to releases/{bundle_id(good)}" in err["message"]
        assert any("libfoo.so.1" in line for line in err["log_tail"])
        assert current(device) == f"releases/{bundle_id(good)}" and err["switched"] is False
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/health")
        assert c.getresponse().status == 200  # the previous release serves again
        # A plain `kill` of the service's pid (what a user or a shutdown sends) stops its server too.
        svc = envelope(cli("--json", "status", *device["args"]))["result"]["service"]
        os.kill(svc["pid"], signal.SIGTERM)
        deadline = time.time() + 30
        while time.time() < deadline and Path(f"/proc/{svc['server_pid']}").exists():
            time.sleep(0.2)
        assert not Path(f"/proc/{svc['server_pid']}").exists(), "the server outlived its supervisor"
    finally:
        pid = (install / "service.pid").read_text().split()[0] if (install / "service.pid").exists() else None
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(int(pid), signal.SIGKILL)  # the supervisor's session: the server with it
