"""`edgepack deploy --via adb`: push a bundle to an Android device over adb, verify it, switch to it.

Android has no Python of its own: the bundle's model is meant to be loaded by the app (see the bundle's android/
folder). So adb deploys stage the files under /data/local/tmp/edgepack/releases/<id>, check every sha256 with
the device's toybox, and switch by atomically renaming a CURRENT file that names the release. The smoke test
runs only where a `python3` is on the adb shell's PATH; otherwise the result says it was skipped, and why.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from edgepack.bundle import Manifest
from edgepack.errors import RemoteError, UserError
from edgepack.progress import ProgressEvent, ProgressFn, StageRecorder
from edgepack.remote.deploy import DeployOutcome
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


def deploy_adb(bundle: Path, manifest: Manifest, *, serial: str | None,
               progress: ProgressFn) -> DeployOutcome:
    stages = StageRecorder(progress)
    adb = Adb(serial)
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
    with stages.stage("upload", f"{len(files)} files, {total / 1e6:.1f} MB to {release}") as info:
        adb.shell(f"rm -rf {shlex.quote(release)}.partial && mkdir -p {shlex.quote(release)}.partial")
        adb("push", f"{bundle}/.", f"{release}.partial")
        info.update(files=len(files), bytes=total)
    with stages.stage("verify", "sha256 of every file on the device") as info:
        paths = " ".join(shlex.quote(f"{release}.partial/{f.path}") for f in files)
        out = adb.shell(f"sha256sum {paths}")
        got = {line.split()[1][len(release) + len(".partial/"):]: line.split()[0]
               for line in out.splitlines() if len(line.split()) == 2}
        bad = [f.path for f in files if got.get(f.path) != f.sha256]
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
                         pruned=(), wheels_fetched_for="", wheels_fetched=(), signature="not checked on adb",
                         stages=tuple(stages.records),
                         commands=tuple(adb.records))

