"""`edgepack deploy --via adb`: push a bundle to an Android device over adb, verify it, switch to it.

Android has no Python of its own: the bundle's model is meant to be loaded by the app (see the bundle's android/
folder). So adb deploys stage the files under /data/local/tmp/edgepack/releases/<id>, check every sha256 with
the device's toybox, and switch by atomically renaming a CURRENT file that names the release. The smoke test
runs only where a `python3` is on the adb shell's PATH; otherwise the result says it was skipped, and why.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST, SIGNATURE, Manifest
from edgepack.errors import DeviceLocked, RemoteError, UserError
from edgepack.progress import ProgressEvent, ProgressFn, StageRecorder
from edgepack.remote.deploy import DeployOutcome
from edgepack.remote.session import heartbeat, new_op_id
from edgepack.remote.ssh import CommandResult

ROOT = "/data/local/tmp/edgepack"
ABIS = {"aarch64": "arm64-v8a", "armv7l": "armeabi-v7a", "x86_64": "x86_64"}


class Adb:
    def __init__(self, serial: str | None, timeout: float = 300.0) -> None:
        exe = shutil.which("adb")
        if exe is None:
            raise UserError("adb is not on PATH.",
                            hint="Install Android platform-tools (apt install adb, or the SDK's platform-tools) "
                                 "and enable USB debugging on the phone.", code="adb_missing")
        self.base = [exe] + (["-s", serial] if serial else [])
        self.serial = serial or "(default device)"
        self.timeout = timeout
        self.records: list[CommandResult] = []

    def __call__(self, *args: str, check: bool = True) -> str:
        t0 = time.monotonic()
        try:
            proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise RemoteError(f"adb {' '.join(args[:2])} timed out after {self.timeout:.0f} s.",
                              hint="Check the USB connection (`adb devices`).") from exc
        self.records.append(CommandResult(command="adb " + " ".join(args), exit_code=proc.returncode,
                                          seconds=round(time.monotonic() - t0, 3),
                                          stdout_tail=tuple(proc.stdout.splitlines()[-10:]),
                                          stderr_tail=tuple(proc.stderr.splitlines()[-10:])))
        if check and proc.returncode != 0:
            raise RemoteError(f"adb {' '.join(args[:2])} failed on {self.serial} (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-300:]}",
                              hint="`adb devices` lists what is connected; pass --serial to pick one.")
        return proc.stdout

    def shell(self, script: str, check: bool = True) -> str:
        return self("shell", script, check=check)


LOCK = f"{ROOT}/.lock"  # a folder: mkdir(2) is atomic on every Android filesystem
LOCK_STALE_S = 120  # a holder that has not touched its lock for this long died (it touches it every 10 s)


@contextmanager
def _locked(adb: Adb, command: str) -> Iterator[str]:
    """One edgepack operation at a time on the phone, as over SSH: mkdir of the lock folder wins; a lock whose holder
    stopped touching it long ago is taken over; the loser gets device_locked and nothing is changed."""
    op = new_op_id()
    holder = shlex.quote(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                                     "op": op, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    take = (f"mkdir -p {ROOT} && if mkdir {LOCK} 2>/dev/null; then echo {holder} > {LOCK}/holder; echo @took; "
            f"elif [ -n \"$(find {LOCK}/holder -mmin -{LOCK_STALE_S // 60} 2>/dev/null)\" ]; then "
            f"echo @held; cat {LOCK}/holder; else rm -rf {LOCK}.stale && mv {LOCK} {LOCK}.stale 2>/dev/null && "
            f"mkdir {LOCK} && echo {holder} > {LOCK}/holder && echo @took; fi")
    out = adb.shell(take, check=False)
    if "@took" not in out:
        try:
            h = json.loads(out.split("@held", 1)[1].strip() or "{}") if "@held" in out else {}
        except ValueError:
            h = {}
        raise DeviceLocked(f"{ROOT} on {adb.serial} is locked by another edgepack operation: `{h.get('command', '?')}`"
                           f" from {h.get('host', '?')} (pid {h.get('pid', '?')}), since {h.get('since', '?')}. "
                           "Nothing was changed.",
                           hint=f"Wait for it to finish and run again (a holder that died frees it after "
                                f"{LOCK_STALE_S} s).", host=adb.serial, holder=h)
    def touch() -> None:
        with contextlib.suppress(Exception):  # a slow adb call is not the end of the lock: the next beat retries
            adb.shell(f"touch {LOCK}/holder", check=False)

    try:
        with heartbeat(touch, 10.0, "edgepack-adb-lock"):
            yield op
    finally:
        adb.shell(f"grep -q {shlex.quote(op)} {LOCK}/holder 2>/dev/null && rm -rf {LOCK}", check=False)


def deploy_adb(bundle: Path, manifest: Manifest, manifest_bytes: bytes, *, serial: str | None,
               trusted: tuple[tuple[str, str], ...] = (), signature: str = "not required",
               progress: ProgressFn) -> DeployOutcome:
    """Under the phone's lock: push only the manifest's files, check every sha256 and that nothing else arrived,
    check the signature against the keys the phone trusts, smoke-test where it has python3, switch."""
    adb = Adb(serial)
    with _locked(adb, f"edgepack deploy --via adb {manifest.bundle_id}"):
        return _deploy_adb(adb, bundle, manifest, manifest_bytes, trusted, signature, progress)


def _phone_keys(adb: Adb, trusted: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Record `trusted` on the phone (ROOT/trusted_keys/<id>.pub), then read every key it trusts: {id: base64}."""
    for kid, key in trusted:
        if not (kid.isalnum() and key.replace("+", "").replace("/", "").replace("=", "").isalnum()):
            raise UserError(f"bad trusted key {kid!r}.", hint="Pass a minisign public key.", code="invalid_input")
        adb.shell(f"mkdir -p {ROOT}/trusted_keys && echo 'untrusted comment: edgepack trusted key {kid}' > "
                  f"{ROOT}/trusted_keys/{kid}.pub && echo {key} >> {ROOT}/trusted_keys/{kid}.pub")
    out = adb.shell(f"for f in {ROOT}/trusted_keys/*.pub; do [ -f \"$f\" ] && tail -n 1 \"$f\"; done; true",
                    check=False)
    keys = {}
    for line in out.split():
        try:
            raw = base64.b64decode(line, validate=True)
        except ValueError:
            continue
        if len(raw) == 42 and raw[:2] == b"Ed":
            keys[format(int.from_bytes(raw[2:10], "little"), "X")] = line
    return keys


def _deploy_adb(adb: Adb, bundle: Path, manifest: Manifest, manifest_bytes: bytes,
                trusted: tuple[tuple[str, str], ...], signature: str, progress: ProgressFn) -> DeployOutcome:
    stages = StageRecorder(progress)
    bundle_id = manifest.bundle_id  # checked against ID_RE and recomputed from the content on read
    release = f"{ROOT}/releases/{bundle_id}"
    release_staging = f"{release}.partial"
    with stages.stage("preflight", f"adb device {adb.serial}") as info:
        state = adb("get-state", check=False).strip()
        if state != "device":
            raise UserError(f"adb sees no ready device ({state or 'none'}).",
                            hint="Connect the phone, enable USB debugging and accept the prompt; `adb devices`.",
                            code="device_unreachable")
        abi = adb.shell("getprop ro.product.cpu.abi").strip()
        want = ABIS.get(manifest.arch, manifest.arch)
        if abi != want:
            raise UserError(f"the device's ABI is {abi}; bundle {bundle.name} is for {want}.",
                            hint="Build for a target with the phone's architecture.", abi=abi, code="device_unfit")
        info.update(abi=abi)
    files = list(manifest.files)
    total = manifest.bytes
    with stages.stage("signature", "the keys the phone trusts") as info:
        keys = _phone_keys(adb, trusted)
        if keys and not trusted:  # the phone's own policy: a signature by one of its keys, checked here
            from edgepack.signing import verify_bytes

            signature = f"verified (key {verify_bytes(bundle, manifest_bytes, list(keys.values())).key_id}, a key the "
            signature += "phone trusts)"
        info.update(phone_keys=sorted(keys), signature=signature)
    with stages.stage("upload", f"{len(files)} files, {total / 1e6:.1f} MB to {release}") as info:
        adb.shell(f"rm -rf {shlex.quote(release)}.partial && mkdir -p {shlex.quote(release)}.partial")
        with tempfile.TemporaryDirectory(prefix="edgepack-adb-") as tmp:  # only what the manifest lists is sent
            stage_dir = Path(tmp) / "release"
            for f in files:
                dest = stage_dir / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(bundle / f.path, dest)
                except OSError:
                    shutil.copyfile(bundle / f.path, dest)
            (stage_dir / MANIFEST).write_bytes(manifest_bytes)
            if (bundle / SIGNATURE).is_file():
                shutil.copyfile(bundle / SIGNATURE, stage_dir / SIGNATURE)
            adb("push", f"{stage_dir}/.", f"{release}.partial")
        info.update(files=len(files), bytes=total)
    with stages.stage("verify", "sha256 of every file on the device, and nothing else") as info:
        paths = " ".join(shlex.quote(f"{release}.partial/{f.path}") for f in files)
        out = adb.shell(f"sha256sum {paths} {shlex.quote(f'{release}.partial/{MANIFEST}')}")
        got = {line.split()[1][len(release) + len(".partial/"):]: line.split()[0]
               for line in out.splitlines() if len(line.split()) == 2}
        bad = [f.path for f in files if got.get(f.path) != f.sha256]
        if got.get(MANIFEST) != hashlib.sha256(manifest_bytes).hexdigest():
            bad.append(MANIFEST)
        present = adb.shell(f"cd {shlex.quote(release)}.partial && find . ! -type d", check=False).split()
        extra = sorted({p.removeprefix("./") for p in present} - {f.path for f in files} - {MANIFEST, SIGNATURE})
        if extra:
            adb.shell(f"rm -rf {shlex.quote(release)}.partial", check=False)
            raise RemoteError(f"{len(extra)} files the manifest does not list arrived on the device: {extra[:5]}",
                              hint="Nothing was switched; re-run the deploy.", files=extra, code="upload_mismatch")
        if bad:
            raise RemoteError(f"{len(bad)} files differ on the device after adb push: {bad[:5]}",
                              hint="Re-run the deploy; if it repeats, check the device's storage.", files=bad,
                              code="upload_mismatch")
        info.update(verified=len(files))
    with stages.stage("smoke", "smoke test where the device has a python3") as info:
        has_py = adb.shell("command -v python3 || true").strip()
        if has_py:
            from edgepack.bundle import SmokeResult

            out = adb.shell(f"cd {shlex.quote(release)}.partial && python3 smoke_test.py; echo \"@exit $?\"",
                            check=False)
            code = int(out.rsplit("@exit ", 1)[1].split()[0]) if "@exit " in out else 1
            result = SmokeResult.parse(out.rsplit("@exit ", 1)[0], code)
            smoke: dict[str, Any] = result.doc
            if not result.ok:
                adb.shell(f"rm -rf {shlex.quote(release)}.partial", check=False)
                raise RemoteError(f"the smoke test failed on the device: {result.error}",
                                  hint="CURRENT still names the previous release.", smoke=smoke,
                                  code="smoke_test_failed")
        else:
            smoke = {"ok": None, "skipped": "no python3 on the device's adb shell: the app in android/ loads "
                                            "the model; run its smoke test through Termux over SSH instead"}
        info.update(smoke=smoke)
    with stages.stage("switch", "CURRENT → this release (atomic rename)") as info:
        previous = adb.shell(f"cat {ROOT}/CURRENT 2>/dev/null || true").strip() or None
        # The release CURRENT names is never deleted or rewritten: a redeploy of it goes to a fresh folder.
        folder, n = bundle_id, 1
        while adb.shell(f"test -e {shlex.quote(f'{ROOT}/releases/{folder}')} && echo yes || true").strip() == "yes":
            n += 1
            folder = f"{bundle_id}.{n}"
        release = f"{ROOT}/releases/{folder}"
        adb.shell(f"mv {shlex.quote(release_staging)} {shlex.quote(release)} && "
                  f"echo {shlex.quote(folder)} > {ROOT}/CURRENT.new && mv -f {ROOT}/CURRENT.new {ROOT}/CURRENT")
        info.update(previous=previous, folder=folder)
    progress(ProgressEvent("done", f"{bundle_id} is current on {adb.serial}"))
    return DeployOutcome(host=f"adb:{adb.serial}", bundle_id=bundle_id, install_dir=ROOT, release_dir=release,
                         release_folder=folder, switched=True, previous=previous, smoke=smoke,
                         uploaded_files=len(files),
                         uploaded_bytes=total, skipped_files=0, repaired_files=(), service="none (adb)",
                         pruned=(), wheels_fetched_for="", wheels_fetched=(), signature=signature,
                         stages=tuple(stages.records),
                         commands=tuple(adb.records))

