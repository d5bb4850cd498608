"""The device program's own trust decisions (issue #20): its stdlib Ed25519/minisign verifier against the reference
implementations, the release it admits, and the processes it will signal. Real files, real processes, real keys."""

from __future__ import annotations

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
from edgepack.remote.device import lock as device_lock
from edgepack.remote.device import service as device_service
from edgepack.remote.device import signature as device_signature

from .test_device_helper import holding, release

minisign = pytest.importorskip("minisign")


def keypair(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A key made by edgepack keygen's library: (secret key, public key file, key id)."""
    from edgepack.signing import key_id, keygen

    sk, pub = keygen(tmp_path / name)
    return sk, pub, key_id(minisign.PublicKey.from_file(pub))


def sign(bundle: Path, sk: Path) -> None:
    from edgepack.signing import sign as do_sign

    do_sign(bundle, sk)


def test_ed25519_agrees_with_the_reference_on_valid_and_altered_signatures() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    # RFC 8032, 7.1, test 1
    pk = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
                        "6bd25bf5f0595bbe24655141438e7a100b")
    assert h.ed25519_verify(pk, b"", sig) and not h.ed25519_verify(pk, b"\0", sig)
    for i in range(12):
        key = ed25519.Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        msg = os.urandom(i * 37)
        good = key.sign(msg)
        assert h.ed25519_verify(pub, msg, good)
        bad = bytearray(good)
        bad[(i * 11) % 64] ^= 1 << (i % 8)
        assert not h.ed25519_verify(pub, msg, bytes(bad))
        assert not h.ed25519_verify(pub, msg + b"x", good)
    # s >= L (a malleated signature) is refused, as RFC 8032 requires
    s = int.from_bytes(good[32:], "little") + device_signature._L
    assert not h.ed25519_verify(pub, msg, good[:32] + s.to_bytes(32, "little"))


def test_the_device_checks_a_real_minisign_signature_and_names_what_is_wrong(tmp_path: Path) -> None:
    sk, pub, kid = keypair(tmp_path, "ci.key")
    _, other_pub, other_id = keypair(tmp_path, "other.key")
    bundle_id, staging = release(tmp_path / "dev", "a")
    keys = dict([h.minisign_public_key(pub.read_text())])
    assert list(keys) == [kid]
    assert h.signature_check(str(staging), keys, bundle_id)["error"].startswith("the release is not signed")
    sign(staging, sk)
    assert h.signature_check(str(staging), keys, bundle_id) == {"signed": True, "key_id": kid, "error": None}
    # not a trusted key
    got = h.signature_check(str(staging), dict([h.minisign_public_key(other_pub.read_text())]), bundle_id)
    assert not got["signed"] and "not trust" in got["error"] and other_id in got["error"]
    # the manifest changed after signing (one byte)
    manifest = staging / "edgepack.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b"\n", b" \n", 1))
    assert "does not match" in h.signature_check(str(staging), keys, bundle_id)["error"]
    manifest.write_bytes(original)
    # the trusted comment rewritten (the global signature covers it)
    sig = staging / "edgepack.json.minisig"
    lines = sig.read_text().splitlines()
    sig.write_text("\n".join([lines[0], lines[1], lines[2] + "x", lines[3]]) + "\n")
    assert "does not match" in h.signature_check(str(staging), keys, bundle_id)["error"]
    # a valid signature of another bundle's manifest
    other_id_, other = release(tmp_path / "dev2", "b")
    sign(other, sk)
    shutil.copy(other / "edgepack.json.minisig", sig)
    assert not h.signature_check(str(staging), keys, bundle_id)["signed"]
    # garbage
    sig.write_bytes(os.urandom(300))
    assert "not a minisign signature" in h.signature_check(str(staging), keys, bundle_id)["error"]


@pytest.mark.skipif(shutil.which("minisign") is None,
                    reason="the minisign tool is not installed (apt install minisign)")
def test_signatures_made_by_the_minisign_tool_itself_verify_on_the_device(tmp_path: Path) -> None:
    """Both of minisign's algorithms: legacy "Ed" (-l, the message itself) and the default "ED" (BLAKE2b-512)."""
    subprocess.run(["minisign", "-G", "-W", "-p", str(tmp_path / "k.pub"), "-s", str(tmp_path / "k.key")],
                   check=True, capture_output=True)
    bundle_id, staging = release(tmp_path / "dev", "a")
    data = (staging / "edgepack.json").read_bytes()
    import hashlib

    comment = f"edgepack bundle {bundle_id} sha256:{hashlib.sha256(data).hexdigest()}"
    keys = dict([h.minisign_public_key((tmp_path / "k.pub").read_text())])
    for legacy in ([], ["-l"]):
        subprocess.run(["minisign", "-S", *legacy, "-s", str(tmp_path / "k.key"), "-m", str(staging / "edgepack.json"),
                        "-x", str(staging / "edgepack.json.minisig"), "-t", comment], check=True, capture_output=True)
        assert h.signature_check(str(staging), keys, bundle_id)["signed"], legacy


def test_a_device_that_trusts_a_key_admits_publishes_and_switches_only_signed_releases(tmp_path: Path) -> None:
    root = str(tmp_path)
    sk, pub, kid = keypair(tmp_path / "keys", "ci.key")
    with holding(tmp_path, "op-1"):
        unsigned_id, _ = release(tmp_path, "a")
        assert h.publish(root, "op-1", unsigned_id)["ok"]  # no trusted key yet: the device's policy allows it
        h.trust(root, "op-1", kid, pub.read_text().splitlines()[-1])
        with pytest.raises(h.Refused):
            h.trust(root, "op-1", "ABC", pub.read_text().splitlines()[-1])  # a name that is not the key's id
        # now nothing unsigned is switched to, even a release already on the device
        sw = h.switch(root, "op-1", unsigned_id)
        assert not sw["ok"] and sw["code"] == "signature_invalid" and "not signed" in sw["error"]
        signed_id, staging = release(tmp_path, "b")
        assert h.admit(root, f".staging/{signed_id}@op-1")["code"] == "signature_invalid"
        refused = h.publish(root, "op-1", signed_id)
        assert not refused["ok"] and refused["code"] == "signature_invalid"
        sign(staging, sk)
        got = h.admit(root, f".staging/{signed_id}@op-1")
        assert got["ok"] and got["signed"] and got["key_id"] == kid and got["bundle_id"] == signed_id
        assert h.publish(root, "op-1", signed_id)["signed"]
    # the deploying side may require a signature of a device that trusts nothing: refused, with what to do
    bare = tmp_path / "bare"
    bid, _ = release(bare, "c")
    got = h.admit(str(bare), f".staging/{bid}@op-1", "yes")
    assert not got["ok"] and "trusts no key" in got["error"]


def test_a_symlinked_folder_in_a_release_is_an_entry_and_refused(tmp_path: Path) -> None:
    bundle_id, staging = release(tmp_path, "a")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "evil.py").write_text("print('not listed')\n")
    os.symlink(tmp_path / "elsewhere", staging / "lib")
    got = h.admit(str(tmp_path), f".staging/{bundle_id}@op-1")
    assert not got["ok"] and got["extra"] == ["lib"]


def _sleeper(op: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **({h.OP_ENV: op} if op else {}))
    return subprocess.Popen(["sleep", "300"], start_new_session=True, env=env)


def test_a_stale_pid_record_never_kills_a_stranger_that_has_the_pid_now(tmp_path: Path) -> None:
    root = str(tmp_path)
    os.makedirs(tmp_path / ".ops")
    stranger = _sleeper()
    try:
        # A crashed operation recorded this pid with another start time (the process it meant is long gone).
        (tmp_path / ".ops" / "op-old.pids").write_text(f"{stranger.pid} 1\n")
        (tmp_path / ".lock").write_text(json.dumps({"op": "op-old"}))  # and died holding the lock
        with holding(tmp_path, "op-new"):
            pass
        assert stranger.poll() is None  # still running
        # The same for the service's pid file after a crash or a reboot.
        (tmp_path / "service.pid").write_text(f"{stranger.pid} 127.0.0.1:1 1\n")
        assert device_service._service_pid(root) is None
        with holding(tmp_path, "op-2"):
            assert h.service_stop(root, "op-2")["stopped"] is None
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_what_an_operation_started_is_ended_when_its_identity_matches(tmp_path: Path) -> None:
    root = str(tmp_path)
    os.makedirs(tmp_path / ".ops")
    ours = _sleeper()
    device_lock.record_pid(root, "op-1", ours.pid)
    # A leftover whose group leader is gone but which carries the operation's mark is ours too.
    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(['sleep', '300']);"
                               " print(p.pid, flush=True)"], stdout=subprocess.PIPE, start_new_session=True,
                              env=dict(os.environ, **{h.OP_ENV: "op-1"}))
    assert leader.stdout is not None
    orphan = int(leader.stdout.readline())
    device_lock.record_pid(root, "op-1", leader.pid)
    leader.wait()
    try:
        killed = device_lock._kill_groups(root, "op-1")
        assert ours.wait(timeout=10) == -signal.SIGTERM and ours.pid in killed and orphan in killed
        deadline = time.time() + 10
        while time.time() < deadline and device_lock.proc_start(orphan) is not None:
            time.sleep(0.05)
        gone = device_lock.proc_start(orphan) is None
        assert gone or Path(f"/proc/{orphan}/stat").read_text().split(")")[1].split()[0] == "Z"  # ended, not reaped
    finally:
        ours.kill()
        with __import__("contextlib").suppress(OSError):
            os.kill(orphan, signal.SIGKILL)


def test_a_release_on_the_device_gets_its_bundles_later_signature_only_when_it_verifies(tmp_path: Path) -> None:
    """Signing does not change the id: a redeploy of a bundle signed since reuses the release already there."""
    import base64

    root = str(tmp_path)
    sk, pub, kid = keypair(tmp_path / "keys", "ci.key")
    _, _, other_id = keypair(tmp_path / "keys", "other.key")
    with holding(tmp_path, "op-1"):
        bundle_id, staging = release(tmp_path, "a")
        assert h.publish(root, "op-1", bundle_id)["ok"]
        h.trust(root, "op-1", kid, pub.read_text().splitlines()[-1])
        assert not h.switch(root, "op-1", bundle_id)["ok"]  # unsigned, and the device now trusts a key
        signed = tmp_path / "signed"
        shutil.copytree(tmp_path / "releases" / bundle_id, signed, ignore=shutil.ignore_patterns(".venv"))
        wrong = tmp_path / "wrong"
        shutil.copytree(signed, wrong)
        sign(signed, sk)
        sign(wrong, tmp_path / "keys" / "other.key")
        bad = base64.b64encode((wrong / "edgepack.json.minisig").read_bytes()).decode()
        got = h.add_signature(root, "op-1", bundle_id, bad)
        assert not got["written"] and other_id in got["error"]
        assert not (tmp_path / "releases" / bundle_id / "edgepack.json.minisig").exists()
        good = base64.b64encode((signed / "edgepack.json.minisig").read_bytes()).decode()
        assert h.add_signature(root, "op-1", bundle_id, good) == {"ok": True, "written": True, "key_id": kid}
        assert h.switch(root, "op-1", bundle_id)["ok"]
