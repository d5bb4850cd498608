"""Deploy stages over one SSH connection: preflight → upload → verify → install → smoke → switch → prune."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST
from edgepack.errors import RemoteError, UserError
from edgepack.progress import ProgressEvent, ProgressFn, StageRecord, StageRecorder, silent
from edgepack.remote import preflight
from edgepack.remote.ssh import CommandResult, Connection, quote

INSTALL_TIMEOUT = 900.0
SMOKE_TIMEOUT = 900.0


def _helper_source() -> str:
    return resources.files("edgepack.remote").joinpath("device_helper.py").read_text(encoding="utf-8")


class Device:
    """Structured operations on one device, each one remote command with JSON out."""

    def __init__(self, conn: Connection, install_dir: str) -> None:
        self.conn = conn
        self.install_dir = install_dir  # may start with ~ until facts() resolves it
        self._helper = _helper_source()

    def helper(self, *args: str, what: str, timeout: float | None = None, check: bool = True) -> dict[str, Any]:
        res = self.conn.run(["python3", "-", *args], stdin=self._helper, what=what, timeout=timeout, check=False)
        if res.exit_code == 127:
            raise UserError(f"{self.conn.hostname} has no python3.",
                            hint="Install Python 3 on the device (Debian: sudo apt install python3 python3-venv).",
                            host=self.conn.hostname)
        try:
            data: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            if not check:
                return {"ok": False, "error": "no JSON from the device helper"}
            raise RemoteError(f"{what} failed on {self.conn.hostname} (exit {res.exit_code}).",
                              hint="See the evidence.", evidence=res) from None
        return data

    def facts(self, provider: str = "cpu") -> dict[str, Any]:
        facts = self.helper("facts", self.install_dir, "cuda" if provider == "cuda" else "no", what="preflight")
        self.install_dir = facts["install_dir"]
        return facts

    def path(self, *parts: str) -> str:
        return posixpath.join(self.install_dir, *parts)


@dataclass(frozen=True)
class DeployOutcome:
    host: str
    bundle_id: str
    install_dir: str
    release_dir: str
    switched: bool
    previous: str | None
    smoke: dict[str, Any]
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int
    repaired_files: tuple[str, ...]
    service: str
    pruned: tuple[str, ...]
    wheels_fetched_for: str  # "" or the device's Python, when the vendored wheels did not fit it
    stages: tuple[StageRecord, ...]
    commands: tuple[CommandResult, ...]


def upload(dev: Device, bundle: Path, manifest: dict[str, Any], staging: str, progress: ProgressFn,
           only: set[str] | None = None) -> tuple[int, int, int]:
    """Send what is missing or wrong in `staging` (resumable); returns (files sent, bytes sent, files skipped)."""
    have = dev.helper("hashes", staging, what="list uploaded files")
    files = [f for f in manifest["files"] if only is None or f["path"] in only]
    todo = [f for f in files if have.get(f["path"]) != [f["bytes"], f["sha256"]]]
    total = sum(f["bytes"] for f in todo)
    dirs = sorted({posixpath.dirname(posixpath.join(staging, f["path"])) for f in manifest["files"]})
    dev.conn.run(["mkdir", "-p", *dirs], what="create the staging folder")
    sent = 0
    for f in todo:
        remote = posixpath.join(staging, f["path"])

        def cb(done: int, _size: int, base: int = sent, name: str = f["path"]) -> None:
            progress(ProgressEvent("upload", name, done=base + done, total=total or 1))

        dev.conn.put(bundle / f["path"], remote, progress=cb)
        sent += f["bytes"]
    dev.conn.put(bundle / MANIFEST, posixpath.join(staging, MANIFEST))
    return len(todo), sent, len(files) - len(todo)


def deploy(conn: Connection, bundle: Path, manifest: dict[str, Any], *, install_dir: str, allow_network: bool,
           keep: int, smoke_tokens: int, progress: ProgressFn = silent) -> DeployOutcome:
    t = StageRecorder(progress)
    dev = Device(conn, install_dir)
    bundle_id = manifest["bundle_id"]
    with t.stage("preflight", f"checking {conn.hostname} against {manifest['name']}") as d:
        facts = dev.facts(manifest["runtime"].get("execution_provider", "cpu"))
        problems = preflight.check(manifest, facts)
        refetch = any(p.check == "python" for p in problems) and not allow_network and bool(facts.get("glibc"))
        if allow_network or refetch:  # install.sh may use the index, or we bring wheels for this Python
            problems = [p for p in problems if p.check != "python"]
        d.update(facts=facts, problems=[p.__dict__ for p in problems])
        preflight.enforce(problems, conn.hostname)
    wheels_dir = ""
    if refetch:
        with t.stage("wheels", f"the bundle's wheels are for Python {manifest['target']['python']}; fetching "
                               f"them for the device's {facts['python']}") as d:
            wheels_dir = _fetch_wheels_for_device(dev, manifest, facts, progress)
            d.update(artifact=wheels_dir)
    release = dev.path("releases", bundle_id)
    staging = release + ".partial"
    present = dev.helper("verify", release, what="check an existing release", check=False) \
        if _exists(dev, release) else {"ok": False}
    sent = sent_bytes = skipped = 0
    repaired: list[str] = []
    if present.get("ok"):
        progress(ProgressEvent("upload", f"{bundle_id} is already on the device, verified; not sending it again"))
        skipped = len(manifest["files"])
    else:
        with t.stage("upload", f"to {staging}") as d:
            sent, sent_bytes, skipped = upload(dev, bundle, manifest, staging, progress)
            d.update(files=sent, bytes=sent_bytes, skipped=skipped)
        with t.stage("verify", "sha256 of every file on the device") as d:
            check = dev.helper("verify", staging, what="verify the upload")
            if not check["ok"]:
                # One repair round: resend exactly what the device has wrong, then verify again.
                bad = set(check["missing"]) | set(check["changed"])
                repaired = sorted(bad)
                progress(ProgressEvent("verify", f"re-sending {len(bad)} file(s) that arrived wrong: "
                                                 f"{', '.join(repaired[:3])}"))
                if check["extra"]:
                    conn.run(["rm", "-f", *[posixpath.join(staging, p) for p in check["extra"]]],
                             what="remove unexpected files")
                upload(dev, bundle, manifest, staging, progress, only=bad)
                check = dev.helper("verify", staging, what="verify the upload")
            d.update(repaired=repaired)
            if not check["ok"]:
                raise RemoteError(f"the upload to {conn.hostname} does not match the manifest after a retry: "
                                  f"missing {check['missing'][:3]}, changed {check['changed'][:3]}.",
                                  hint="The device's storage may be failing; nothing was switched.",
                                  host=conn.hostname, verify=check)
            conn.run(["rm", "-rf", release], what="clear a stale release")
            conn.run(["mv", staging, release], what="publish the release folder")
    with t.stage("install", "install.sh (offline, from wheels/)") as d:
        args = ["sh", posixpath.join(release, "install.sh")] + (["--allow-network"] if allow_network else [])
        env = [f"EDGEPACK_VENV={posixpath.join(release, '.venv')}"] + ([f"EDGEPACK_WHEELS={wheels_dir}"]
                                                                       if wheels_dir else [])
        res = conn.run(["env", *env, *args],
                       timeout=INSTALL_TIMEOUT, check=False, what="install")
        d.update(exit_code=res.exit_code)
        if not res.ok:
            raise RemoteError(f"install.sh failed on {conn.hostname} (exit {res.exit_code}); "
                              f"`current` was not changed.",
                              hint="See the evidence; exit 4 means the wheels do not fit this device's Python.",
                              evidence=res)
    with t.stage("smoke", "smoke_test.py on the device") as d:
        res = conn.run([posixpath.join(release, ".venv", "bin", "python"), posixpath.join(release, "smoke_test.py"),
                        "--tokens", str(smoke_tokens)], timeout=SMOKE_TIMEOUT, check=False, what="smoke test")
        smoke = _parse_smoke(res)
        d.update(smoke)
        if not (res.ok and smoke.get("ok")):
            raise RemoteError(f"the smoke test failed on {conn.hostname}: {smoke.get('error', 'no result')}; "
                              f"`current` was not changed.",
                              hint="The bundle loads or generates wrongly on this device; see the evidence.",
                              evidence=res, smoke=smoke)
    with t.stage("switch", f"current → releases/{bundle_id}") as d:
        sw = dev.helper("switch", dev.install_dir, bundle_id, what="switch current")
        d.update(sw)
    service = _service(conn, dev, manifest, facts)
    with t.stage("prune", f"keep the last {keep} releases") as d:
        pr = dev.helper("prune", dev.install_dir, str(keep), what="prune old releases")
        d.update(pr)
    return DeployOutcome(host=conn.hostname, bundle_id=bundle_id, install_dir=dev.install_dir, release_dir=release,
                         switched=True, previous=sw.get("previous"), smoke=smoke, uploaded_files=sent,
                         uploaded_bytes=sent_bytes, skipped_files=skipped, repaired_files=tuple(repaired),
                         service=service, pruned=tuple(pr.get("removed", [])),
                         wheels_fetched_for=facts["python"] if wheels_dir else "", stages=tuple(t.records),
                         commands=tuple(conn.records))


def _fetch_wheels_for_device(dev: Device, manifest: dict[str, Any], facts: dict[str, Any],
                             progress: ProgressFn) -> str:
    """Download the same pinned runtime for the device's Python and platform here; upload beside the releases."""
    from edgepack.stages.wheels import download_wheels, manylinux_tags

    py = ".".join(facts["python"].split(".")[:2])
    cache = download_wheels(list(manifest["runtime"]["requirements"]), py,
                            manylinux_tags(facts["arch"], facts["glibc"]), what=dev.conn.hostname, progress=progress)
    remote = dev.path("wheels", f"cp{py.replace('.', '')}-{facts['arch']}")
    dev.conn.run(["mkdir", "-p", remote], what="create the wheels folder")
    have = dev.helper("hashes", remote, what="list uploaded wheels")
    for whl in sorted(cache.glob("*.whl")):
        if have.get(whl.name, [None])[0] != whl.stat().st_size:
            dev.conn.put(whl, posixpath.join(remote, whl.name))
    return remote


def _exists(dev: Device, path: str) -> bool:
    return dev.conn.run(["test", "-d", path], check=False, what="look for a release").exit_code == 0


def _parse_smoke(res: CommandResult) -> dict[str, Any]:
    for line in reversed(res.stdout.strip().splitlines()):
        try:
            data: dict[str, Any] = json.loads(line)
            return data
        except json.JSONDecodeError:
            continue
    return {"ok": False, "error": f"no JSON from smoke_test.py (exit {res.exit_code})"}


def _service(conn: Connection, dev: Device, manifest: dict[str, Any], facts: dict[str, Any]) -> str:
    if not manifest["target"]["profile"]["deploy"]["systemd"]:
        return "none (target installs no unit)"
    unit = f"edgepack-{manifest['name']}.service"
    if not facts.get("systemd_user"):
        return f"not installed: no systemd user session on the device ({unit} is in the release folder)"
    unit_dir = "~/.config/systemd/user"
    conn.run(f"mkdir -p {unit_dir} && cp {quote([posixpath.join(dev.install_dir, 'current', unit)])} {unit_dir}/ "
             f"&& systemctl --user daemon-reload && systemctl --user enable --now {quote([unit])} "
             f"&& systemctl --user restart {quote([unit])}", what="restart the service")
    return f"restarted {unit}"
