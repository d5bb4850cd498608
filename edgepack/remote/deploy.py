"""Deploy stages over one SSH connection: preflight → lock → upload → verify → install → smoke → switch → prune.

The device-side half (device_helper.py) keeps the invariant: `current` and the rollback target always name
complete, verified, installed releases, and a deploy either switches to a new one or leaves both as they were.
Every error says which release is live when it is raised."""

from __future__ import annotations

import base64
import json
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST, SIGNATURE, LockedWheel, Manifest, SmokeResult
from edgepack.errors import EdgepackError, RemoteError, UserError
from edgepack.progress import ProgressEvent, ProgressFn, StageRecord, StageRecorder, silent
from edgepack.remote import lock, preflight
from edgepack.remote.ssh import CommandResult, Connection

INSTALL_TIMEOUT = 900.0
SMOKE_TIMEOUT = 900.0


def helper_source() -> str:
    return resources.files("edgepack.remote").joinpath("device_helper.py").read_text(encoding="utf-8")


class Device:
    """Structured operations on one device, each one remote command with JSON out."""

    def __init__(self, conn: Connection, install_dir: str) -> None:
        self.conn = conn
        self.install_dir = install_dir  # may start with ~ until facts() resolves it
        self.source = helper_source()
        self.op = ""  # the operation holding the lock (set by `locked`)

    def helper(self, cmd: str, *args: str, what: str, timeout: float | None = None,
               check: bool = True) -> dict[str, Any]:
        """One helper command on the install dir; commands that change it carry the lock's operation id."""
        mutating = cmd in ("mkdirs", "reuse", "remove_extra", "publish", "switch", "rollback", "prune", "install_unit",
                           "trust", "service_start", "service_stop", "add_signature")
        argv = ["python3", "-", cmd, self.install_dir, *([self.op] if mutating else []), *args]
        res = self.conn.run(argv, stdin=self.source, what=what, timeout=timeout, check=False)
        if res.exit_code == 127:
            raise UserError(f"{self.conn.hostname} has no python3.",
                            hint="Install Python 3 on the device (Debian: sudo apt install python3 python3-venv).",
                            host=self.conn.hostname, code="device_unfit")
        try:
            data: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            if not check:
                return {"ok": False, "error": "no JSON from the device helper"}
            raise RemoteError(f"{what} failed on {self.conn.hostname} (exit {res.exit_code}).",
                              hint="See the evidence.", evidence=res) from None
        if data.get("refused"):
            raise RemoteError(f"the device refused to {what}: {data.get('error')}.",
                              hint="edgepack checks every device path and id; this is a bug or a tampered "
                                   "manifest. Nothing more was done.", evidence=res, code="device_refused")
        return data

    @contextmanager
    def locked(self, command: str) -> Iterator[str]:
        with lock.held(self.conn, self.source, self.install_dir, command) as op:
            self.op = op
            try:
                yield op
            finally:
                self.op = ""

    @property
    def pidfile(self) -> str:
        return self.path(".ops", f"{self.op}.pids")

    def facts(self, provider: str = "cpu") -> dict[str, Any]:
        facts = self.helper("facts", "cuda" if provider == "cuda" else "no", what="preflight")
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
    release_folder: str  # releases/<folder>: the bundle id, or <id>.N when a bad copy was still in use
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
    wheels_fetched: tuple[LockedWheel, ...]  # those wheels, pinned to the bundle's versions, with their sha256
    signature: str  # "verified (key …)", "not required", …
    stages: tuple[StageRecord, ...]
    commands: tuple[CommandResult, ...]


def upload(dev: Device, bundle: Path, manifest: Manifest, staging: str, progress: ProgressFn,
           only: set[str] | None = None, manifest_bytes: bytes | None = None) -> tuple[int, int, int]:
    """Send what is missing or wrong in `staging` (resumable); returns (files sent, bytes sent, files skipped). Each
    file is read once and hashed as it is sent; the manifest sent is `manifest_bytes`, the bytes that were checked."""
    rel = posixpath.relpath(staging, dev.install_dir)
    have = dev.helper("hashes", rel, what="list uploaded files")
    files = [f for f in manifest.files if only is None or f.path in only]
    todo = [f for f in files if have.get(f.path) != [f.bytes, f.sha256]]
    dirs = sorted({posixpath.dirname(posixpath.join(rel, f.path)) for f in manifest.files} | {rel})
    dev.helper("mkdirs", *dirs, what="create the staging folder")
    if todo and only is None:  # what a release on the device already has is linked there, not sent again
        got = dev.helper("reuse", rel, json.dumps([[f.path, f.bytes, f.sha256] for f in todo]),
                         what="reuse files of releases on the device")
        if got.get("reused"):
            progress(ProgressEvent("upload", f"{len(got['reused'])} files ({got['bytes'] / 1e6:.1f} MB) are already "
                                             "on the device in another release: linked there, not sent"))
            todo = [f for f in todo if f.path not in set(got["reused"])]
    total = sum(f.bytes for f in todo)
    sent = 0
    for f in todo:
        remote = posixpath.join(staging, f.path)

        def cb(done: int, _size: int, base: int = sent, name: str = f.path) -> None:
            progress(ProgressEvent("upload", name, done=base + done, total=total or 1))

        dev.conn.put(bundle / f.path, remote, progress=cb, sha256=f.sha256)
        sent += f.bytes
    dev.conn.put(manifest_bytes if manifest_bytes is not None else bundle / MANIFEST, posixpath.join(staging, MANIFEST))
    if (bundle / SIGNATURE).is_file():
        dev.conn.put(bundle / SIGNATURE, posixpath.join(staging, SIGNATURE))
    return len(todo), sent, len(files) - len(todo)


class _Live:
    """What is live on the device, for error messages that tell the truth about it."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.previous: str | None = None
        self.switched_to: str | None = None

    def sentence(self) -> str:
        if self.switched_to:
            return (f"The switch was done: `current` on {self.host} points at releases/{self.switched_to} "
                    f"(it passed its smoke test); `edgepack rollback` returns to "
                    f"{self.previous or 'nothing (it was the first release)'}.")
        return (f"`current` on {self.host} was not changed: it still points at "
                f"{'releases/' + self.previous if self.previous else 'nothing (no release was live)'}.")


def deploy(conn: Connection, bundle: Path, manifest: Manifest, *, install_dir: str, allow_network: bool,
           keep: int, smoke_tokens: int, trusted: tuple[tuple[str, str], ...] = (), signature: str = "not checked",
           serve_addr: str = "", progress: ProgressFn = silent, manifest_bytes: bytes | None = None) -> DeployOutcome:
    """`trusted`: (key id, base64 key) pairs the device must find a signature by (it checks with its own code before
    install.sh runs). `manifest_bytes`: the exact manifest that was checked here (default: read it now)."""
    live = _Live(conn.hostname)
    if manifest_bytes is None:
        manifest_bytes = (bundle / MANIFEST).read_bytes()
    try:
        return _deploy(conn, bundle, manifest, install_dir=install_dir, allow_network=allow_network, keep=keep,
                       smoke_tokens=smoke_tokens, trusted=trusted, signature=signature, serve_addr=serve_addr,
                       progress=progress, live=live, manifest_bytes=manifest_bytes)
    except KeyboardInterrupt:
        raise lock.Interrupted(f"interrupted. {live.sentence()}", hint="Run the same command again.",
                               host=conn.hostname) from None
    except EdgepackError as exc:
        if isinstance(exc, lock.DeviceLocked) or "Nothing was written" in exc.message:
            raise
        exc.message = f"{exc.message} {live.sentence()}"
        exc.args = (exc.message,)
        exc.fields.update(current=live.switched_to or live.previous, switched=bool(live.switched_to))
        raise


def _deploy(conn: Connection, bundle: Path, manifest: Manifest, *, install_dir: str, allow_network: bool,
            keep: int, smoke_tokens: int, trusted: tuple[tuple[str, str], ...], signature: str, serve_addr: str,
            progress: ProgressFn, live: _Live, manifest_bytes: bytes) -> DeployOutcome:
    t = StageRecorder(progress)
    dev = Device(conn, install_dir)
    bundle_id = manifest.bundle_id
    with t.stage("preflight", f"checking {conn.hostname} against {manifest.name}") as d:
        facts = dev.facts(manifest.execution_provider)
        problems = preflight.check(manifest, facts)
        refetch = any(p.check == "python" for p in problems) and bool(facts.get("glibc"))
        if refetch:  # we bring wheels for this Python, hashed here and pinned in their lock (so does --allow-network)
            problems = [p for p in problems if p.check != "python"]
        d.update(facts=facts, problems=[p.__dict__ for p in problems])
        preflight.enforce(problems, conn.hostname)
    with dev.locked(f"edgepack deploy {bundle_id}") as op:
        with t.stage("lock", f"{dev.install_dir} on {conn.hostname}") as d:
            before = dev.helper("status", what="read the device's releases")
            live.previous = before.get("current")
            d.update(op=op, current=live.previous)
        wheels_dir = ""
        fetched: tuple[LockedWheel, ...] = ()
        if refetch:
            with t.stage("wheels", f"the bundle's wheels are for Python {manifest.python}; fetching "
                                   f"the same pinned versions for the device's {facts['python']}") as d:
                wheels_dir, fetched = _fetch_wheels_for_device(dev, manifest, facts, progress)
                d.update(artifact=wheels_dir, wheels=[w.file for w in fetched])
        for key_id, key_b64 in trusted:
            dev.helper("trust", key_id, key_b64, what="record a trusted signing key")
        found = dev.helper("locate", bundle_id, what="look for this release on the device")
        reuse = next((f for f in found["folders"] if f["ok"] and (f["installed"] or not f["in_use"])), None)
        if reuse is not None:  # the device's own check (files, id, signature by a key it trusts) comes first
            if (bundle / SIGNATURE).is_file():  # signed since that copy was deployed: the copy gets the signature
                dev.helper("add_signature", reuse["folder"], base64.b64encode((bundle / SIGNATURE).read_bytes())
                           .decode(), what="give the release on the device its signature")
            admit(dev, f"releases/{reuse['folder']}", bundle_id, require=bool(trusted))
        if reuse is not None and reuse["in_use"]:
            # A live copy is never rewritten: only check that its runtime is whole, else send a fresh copy.
            res = _install(conn, dev, dev.path("releases", reuse["folder"]), allow_network, wheels_dir, trusted,
                           check_only=True)
            if not res.ok:
                progress(ProgressEvent("install", f"the live copy releases/{reuse['folder']} has no working runtime "
                                                  f"(exit {res.exit_code}); sending a fresh copy instead of "
                                                  "repairing it in place"))
                reuse = None
        sent = sent_bytes = skipped = 0
        repaired: list[str] = []
        if reuse is not None:
            folder = reuse["folder"]
            progress(ProgressEvent("upload", f"{bundle_id} is already on the device (releases/{folder}), verified; "
                                             "not sending it again"))
            skipped = len(manifest.files)
        else:
            staging = dev.path("releases", bundle_id + ".partial")
            with t.stage("upload", f"to {staging}") as d:
                sent, sent_bytes, skipped = upload(dev, bundle, manifest, staging, progress,
                                                   manifest_bytes=manifest_bytes)
                d.update(files=sent, bytes=sent_bytes, skipped=skipped)
            with t.stage("verify", "sha256 of every file on the device") as d:
                rel = posixpath.relpath(staging, dev.install_dir)
                check = dev.helper("verify", rel, what="verify the upload")
                if not check["ok"]:
                    # One repair round: resend exactly what the device has wrong, then verify again.
                    bad = set(check["missing"]) | set(check["changed"])
                    repaired = sorted(bad)
                    progress(ProgressEvent("verify", f"re-sending {len(bad)} file(s) that arrived wrong: "
                                                     f"{', '.join(repaired[:3])}"))
                    if check["extra"]:
                        dev.helper("remove_extra", rel, *check["extra"], what="remove unexpected files")
                    upload(dev, bundle, manifest, staging, progress, only=bad, manifest_bytes=manifest_bytes)
                    check = dev.helper("verify", rel, what="verify the upload")
                d.update(repaired=repaired)
                if not check["ok"]:
                    raise RemoteError(f"the upload to {conn.hostname} does not match the manifest after a retry: "
                                      f"missing {check['missing'][:3]}, changed {check['changed'][:3]}"
                                      f"{', ' + check['error'] if check.get('error') else ''}.",
                                      hint="The device's storage may be failing.", host=conn.hostname, verify=check,
                                      code="upload_mismatch")
                pub = dev.helper("publish", bundle_id, what="publish the release folder")
                if not pub.get("ok"):
                    refused = "signature_invalid" if pub.get("code") == "signature_invalid" else "device_refused"
                    raise RemoteError(f"could not publish the release on {conn.hostname}: {pub.get('error')}.",
                                      hint="Run the same command again.", host=conn.hostname, publish=pub,
                                      code=refused)
                if pub.get("bundle_id") != bundle_id:
                    raise RemoteError(f"{conn.hostname} published {pub.get('bundle_id')!r}, not {bundle_id}.",
                                      hint="The device answered something other than what was sent; nothing was "
                                           "installed.", host=conn.hostname, publish=pub, code="device_refused")
                folder = pub["folder"]
                d.update(folder=folder)
        release = dev.path("releases", folder)
        with t.stage("install", "install.sh (offline, hash-pinned wheels), after the device's own check") as d:
            admitted = admit(dev, f"releases/{folder}", bundle_id, require=bool(trusted))
            d.update(signed=admitted.get("signed"), key_id=admitted.get("key_id"))
            res = _install(conn, dev, release, allow_network, wheels_dir, trusted,
                           check_only=reuse is not None and reuse["in_use"])
            d.update(exit_code=res.exit_code, killed=res.killed)
            if not res.ok:
                why = {4: "the wheels do not fit this device's Python, or one does not match its pinned sha256",
                       6: "the release does not match its manifest", 7: "the signature check failed"}
                raise RemoteError(f"install.sh failed on {conn.hostname} (exit {res.exit_code}"
                                  f"{': ' + why[res.exit_code] if res.exit_code in why else ''}).",
                                  hint="See the evidence (the installer's last lines).", evidence=res,
                                  code={7: "signature_invalid"}.get(res.exit_code or 0, "install_failed"))
        with t.stage("smoke", "smoke_test.py on the device") as d:
            res = conn.run([posixpath.join(release, ".venv", "bin", "python"), posixpath.join(release, "smoke_test.py"),
                            "--tokens", str(smoke_tokens)], timeout=SMOKE_TIMEOUT, check=False, what="smoke test",
                           pidfile=dev.pidfile)
            result = SmokeResult.parse(res.stdout, -1 if res.exit_code is None else res.exit_code)
            smoke = result.doc
            d.update(smoke)
            if not result.ok:
                raise RemoteError(f"the smoke test failed on {conn.hostname}: {result.error}.",
                                  hint="The bundle loads or generates wrongly on this device; see the evidence.",
                                  evidence=res, smoke=smoke, code="smoke_test_failed")
        with t.stage("switch", f"current → releases/{folder}") as d:
            sw = dev.helper("switch", folder, what="switch current")
            if not sw.get("ok"):
                raise RemoteError(f"the device refused the switch: {sw.get('error')}.",
                                  hint="Run the same command again.", host=conn.hostname, switch=sw,
                                  code="device_refused")
            live.switched_to = folder
            d.update(sw)
        service = _service(conn, dev, manifest, facts, serve_addr or manifest.deploy.serve_addr, live, t)
        with t.stage("prune", f"keep the last {keep} releases") as d:
            pr = dev.helper("prune", str(keep), what="prune old releases")
            d.update(pr)
    return DeployOutcome(host=conn.hostname, bundle_id=bundle_id, install_dir=dev.install_dir, release_dir=release,
                         release_folder=folder, switched=True, previous=sw.get("previous"), smoke=smoke,
                         uploaded_files=sent, uploaded_bytes=sent_bytes, skipped_files=skipped,
                         repaired_files=tuple(repaired), service=service, pruned=tuple(pr.get("removed", [])),
                         wheels_fetched_for=facts["python"] if wheels_dir else "", wheels_fetched=tuple(fetched),
                         signature=signature, stages=tuple(t.records), commands=tuple(conn.records))


def admit(dev: Device, rel: str, bundle_id: str, *, require: bool) -> dict[str, Any]:
    """The device's own check of a release folder before any of its code runs: every file against the manifest, the
    id its content gives, and a signature by a key the device trusts (when it trusts any, or `require`). The id the
    device confirms must be the one checked here."""
    res = dev.helper("admit", rel, "yes" if require else "no", what="check the release on the device")
    if not res.get("ok"):
        if res.get("code") == "signature_invalid":
            raise RemoteError(f"{dev.conn.hostname} refused {rel}: {res.get('error')}.",
                              hint="Sign the bundle with a key the device trusts (`edgepack sign BUNDLE --key KEY`).",
                              host=dev.conn.hostname, verify=res, code="signature_invalid")
        raise RemoteError(f"{dev.conn.hostname} refused {rel}: {res.get('error') or 'it does not match its manifest'}.",
                          hint="Run the same command again: the upload resumes with what is missing or wrong.",
                          host=dev.conn.hostname, verify=res, code="upload_mismatch")
    if res.get("bundle_id") != bundle_id:
        raise RemoteError(f"{dev.conn.hostname} holds {res.get('bundle_id')!r} in {rel}, not {bundle_id}.",
                          hint="The device answered something other than what was sent; nothing was installed.",
                          host=dev.conn.hostname, verify=res, code="device_refused")
    return res


def _install(conn: Connection, dev: Device, release: str, allow_network: bool, wheels_dir: str,
             trusted: tuple[tuple[str, str], ...], *, check_only: bool) -> CommandResult:
    args = ["sh", posixpath.join(release, "install.sh")] + (["--allow-network"] if allow_network else [])
    env = [f"EDGEPACK_VENV={posixpath.join(release, '.venv')}", f"EDGEPACK_TRUSTED_KEYS={dev.path('trusted_keys')}"]
    env += [f"EDGEPACK_WHEELS={wheels_dir}"] if wheels_dir else []
    env += ["EDGEPACK_REQUIRE_SIGNATURE=1"] if trusted else []
    env += ["EDGEPACK_CHECK_ONLY=1"] if check_only else []
    return conn.run(["env", *env, *args], timeout=INSTALL_TIMEOUT, check=False, what="install", pidfile=dev.pidfile)


def _fetch_wheels_for_device(dev: Device, manifest: Manifest, facts: dict[str, Any],
                             progress: ProgressFn) -> tuple[str, tuple[LockedWheel, ...]]:
    """The bundle's locked versions for the device's Python and platform, hashed here, uploaded with their lock
    beside the releases (install.sh installs them with --require-hashes)."""
    from edgepack.stages.wheels import LOCK, manylinux_tags, wheels_for

    py = ".".join(facts["python"].split(".")[:2])
    cache, entries, differ = wheels_for(list(manifest.wheel_lock), list(manifest.requirements), py,
                                        manylinux_tags(facts["arch"], facts["glibc"]), what=dev.conn.hostname,
                                        progress=progress)
    if differ:
        progress(ProgressEvent("wheels", f"for Python {py}, these differ from the bundle's lock: {', '.join(differ)}"))
    rel = posixpath.join("wheels", f"cp{py.replace('.', '')}-{facts['arch']}")
    remote = dev.path(rel)
    dev.helper("mkdirs", rel, what="create the wheels folder")
    have = dev.helper("hashes", rel, what="list uploaded wheels")
    for e in entries:
        if have.get(e.file) != [(cache / e.file).stat().st_size, e.sha256]:
            dev.conn.put(cache / e.file, posixpath.join(remote, e.file))
    dev.conn.put(cache / LOCK, posixpath.join(remote, LOCK))
    return remote, tuple(entries)


def _restart(conn: Connection, dev: Device, manifest: Manifest, facts: dict[str, Any], addr: str) -> str:
    """(Re)start the install dir's service on `current`: a system unit when deploying as root to a systemd-booted
    device; systemd's user manager where the session has one (with lingering, so it outlives the login); else a
    supervised process with a pid file (what a device without systemd, or an emulated one, has)."""
    scope = "system" if facts.get("systemd_system") else "user" if facts.get("systemd_user") else None
    if scope:
        unit = dev.helper("install_unit", manifest.unit_file, scope, addr, what="install the service unit")["unit"]
        ctl = ["systemctl"] + (["--user"] if scope == "user" else [])
        conn.run([*ctl, "daemon-reload"], what="reload systemd")
        conn.run([*ctl, "enable", unit], what="enable the service")
        conn.run([*ctl, "restart", unit], what="restart the service")
        if scope == "system":
            return f"systemd system unit {unit}"
        # Without lingering, a user unit stops at logout; some images forbid it, and then the result says so.
        linger = conn.run("loginctl enable-linger \"$(id -un)\" && loginctl show-user \"$(id -un)\" -p Linger",
                          check=False, what="enable lingering")
        lingering = linger.ok and "Linger=yes" in linger.stdout
        return f"systemd user unit {unit}" + ("" if lingering else " (lingering could not be enabled: it stops when "
                                                                   "the user's last session ends)")
    started = dev.helper("service_start", addr, what="start the service")
    return f"supervised process (pid {started['pid']}; no systemd user session on the device)"


def _service(conn: Connection, dev: Device, manifest: Manifest, facts: dict[str, Any], addr: str,
             live: _Live, t: StageRecorder) -> str:
    """Restart the service on the new release, wait for /health, run one completion through it; if that fails,
    switch back to the previous release and restart it there, and say so with the evidence."""
    if not manifest.deploy.systemd:
        return "none (the target runs no service)"
    with t.stage("service", f"restart on {addr}, wait for /health, one completion") as d:
        how = _restart(conn, dev, manifest, facts, addr)
        check = dev.helper("service_check", addr, "120", what="check the service", timeout=200)
        d.update(how=how, check=check)
        if check.get("ok"):
            return f"{how}, healthy on {addr}"
        back = live.previous
        if back:
            sw = dev.helper("switch", back, what="switch back to the previous release")
            if sw.get("ok"):
                live.switched_to, live.previous = None, back
                _restart(conn, dev, manifest, facts, addr)
                again = dev.helper("service_check", addr, "120", what="check the previous release's service",
                                   timeout=200)
                d.update(switched_back=back, previous_check=again)
        raise RemoteError(f"the new release's service failed its check on {conn.hostname}: {check.get('error')}"
                          + (f"; switched back to releases/{back}" if back and not live.switched_to else "") + ".",
                          hint="See log_tail (the service's own log on the device).", host=conn.hostname,
                          service=check, log_tail=check.get("log_tail"), code="service_check_failed")


def status(conn: Connection, install_dir: str) -> dict[str, Any]:
    """Releases, pointers, the lock's holder and the service, read from the device (nothing is changed)."""
    dev = Device(conn, install_dir)
    st = dev.helper("status", what="status")
    service = dev.helper("service_status", what="service status")
    if service.get("unit_scope") and not service["running"]:
        ctl = ["systemctl"] + (["--user"] if service["unit_scope"] == "user" else [])
        res = conn.run([*ctl, "is-active", service["unit"]], check=False, what="unit state")
        if res.stdout.strip() in ("active", "activating", "failed", "inactive") and res.exit_code != 127:
            service = {"supervisor": f"systemd ({service['unit_scope']})", "unit": service["unit"],
                       "state": res.stdout.strip(), "running": res.stdout.strip() == "active"}
    return st | {"host": conn.hostname, "service": service}


def rollback(conn: Connection, install_dir: str) -> dict[str, Any]:
    """Switch `current` to the rollback target, under the device lock; the target is verified first."""
    dev = Device(conn, install_dir)
    dev.facts()  # resolves ~ in the install dir
    with dev.locked("edgepack rollback"):
        res = dev.helper("rollback", what="rollback")
    if not res.get("ok"):
        raise UserError(f"cannot roll back on {conn.hostname}: {res.get('error')}.",
                        hint="`edgepack status --host ...` lists the releases on the device.", host=conn.hostname,
                        code="rollback_unavailable")
    return res | {"host": conn.hostname}
