"""`edgepack deploy --host`: facts → preflight → a session on the device (its lock) → stage → upload what is missing
→ apply, the same device program steps the bundle's Ansible role runs (device/apply.py: verify → signature →
publish → install → smoke → switch → service → prune), streamed back as progress and stage records.

The device program keeps the invariant: `current` and the rollback target always name complete, verified, installed
releases, and a deploy either switches to a new one or leaves both as they were. Every error says which release is
live when it is raised."""

from __future__ import annotations

import base64
import contextlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST, SIGNATURE, LockedWheel, Manifest
from edgepack.bundle_format import ADAPTER_RE, live_sentence
from edgepack.errors import DeviceLocked, EdgepackError, Interrupted, NoPythonError, RemoteError, UserError
from edgepack.progress import ProgressEvent, ProgressFn, StageRecord, StageRecorder, silent
from edgepack.remote import preflight
from edgepack.remote.session import Device
from edgepack.remote.ssh import CommandResult, Connection

APPLY_TIMEOUT = 3600.0  # the device bounds each step itself (install and smoke 900 s, the service check 120 s)


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


class _Live:
    """What is live on the device, for error messages that tell the truth about it."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.previous: str | None = None
        self.switched_to: str | None = None

    def sentence(self) -> str:
        return live_sentence(self.previous, self.switched_to, f" on {self.host}")


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
        raise Interrupted(f"interrupted. {live.sentence()}", hint="Run the same command again.",
                               host=conn.hostname) from None
    except EdgepackError as exc:
        if isinstance(exc, DeviceLocked) or "Nothing was written" in exc.message:
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
        try:
            facts = dev.facts(manifest.execution_provider)
        except NoPythonError:
            raise preflight.without_python(manifest, conn.hostname) from None
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
                d.update(artifact=dev.path(wheels_dir), wheels=[w.file for w in fetched])
        sig = bundle / SIGNATURE
        spec = {"bundle_id": bundle_id, "trusted": [key for _kid, key in trusted], "require_signature": bool(trusted),
                "signature": base64.b64encode(sig.read_bytes()).decode() if sig.is_file() else "",
                "allow_network": allow_network, "wheels_dir": wheels_dir, "smoke_tokens": smoke_tokens, "keep": keep,
                "service": manifest.deploy.systemd, "unit_file": manifest.unit_file,
                "serve_addr": serve_addr or manifest.deploy.serve_addr}
        up = _Upload(dev, bundle, manifest, manifest_bytes, progress, t)
        up.stage(fresh=False)
        answer = _apply(dev, spec, up, live, progress)
        if not answer["ok"] and answer.get("code") == "upload_mismatch" and up.staging:
            check: dict[str, Any] = answer["verify"] if isinstance(answer.get("verify"), dict) else {}
            listed = {f.path for f in manifest.files}  # the device's answer is data: only the manifest's paths
            bad = sorted((set(check.get("missing", [])) | set(check.get("changed", []))) & listed)
            if bad:  # one repair round: resend exactly what the device has wrong, then apply again
                progress(ProgressEvent("verify", f"re-sending {len(bad)} file(s) that arrived wrong: "
                                                 f"{', '.join(bad[:3])}"))
                up.send(set(bad), repair=True)
                answer = _apply(dev, spec, up, live, progress)
        if not answer["ok"] and answer.get("fresh_copy_needed") and not up.staging:
            progress(ProgressEvent("install", f"the live copy of {bundle_id} has no working runtime; sending a fresh "
                                              "copy instead of repairing it in place"))
            up.stage(fresh=True)
            answer = _apply(dev, spec, up, live, progress)
        if not answer["ok"]:
            raise _failure(conn.hostname, answer)
    folder = answer["release_folder"]
    return DeployOutcome(host=conn.hostname, bundle_id=bundle_id, install_dir=dev.install_dir,
                         release_dir=dev.path("releases", folder), release_folder=folder, switched=True,
                         previous=answer.get("previous"), smoke=answer["smoke"], uploaded_files=up.sent,
                         uploaded_bytes=up.sent_bytes, skipped_files=up.skipped, repaired_files=tuple(up.repaired),
                         service=answer["service"], pruned=tuple(answer.get("pruned", [])),
                         wheels_fetched_for=facts["python"] if wheels_dir else "", wheels_fetched=tuple(fetched),
                         signature=signature, stages=tuple(t.records), commands=tuple(conn.records) + up.commands)


class _Upload:
    """This operation's staging folder on the device and what was sent into it."""

    def __init__(self, dev: Device, bundle: Path, manifest: Manifest, manifest_bytes: bytes, progress: ProgressFn,
                 t: StageRecorder) -> None:
        self.dev, self.bundle, self.manifest, self.manifest_bytes = dev, bundle, manifest, manifest_bytes
        self.progress, self.t = progress, t
        self.staging = ""  # relative to the install dir; "" while the release on the device is used as it is
        self.sent = self.sent_bytes = self.skipped = 0
        self.repaired: list[str] = []
        self.commands: tuple[CommandResult, ...] = ()  # what the device program ran for us (install, smoke)

    def stage(self, *, fresh: bool) -> None:
        """The device links in what it already has (releases, an interrupted upload of this release) and says
        what is missing; that is sent."""
        m = self.manifest
        files = json.dumps([{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in m.files])
        got = self.dev.helper("stage", m.bundle_id, files, json.dumps({"command": f"edgepack deploy {m.bundle_id}"}),
                              self.dev.op, "yes" if fresh else "no", what="stage the upload")
        if not got.get("ok"):
            raise RemoteError(f"could not stage the upload on {self.dev.conn.hostname}: {got.get('error')}.",
                              hint="Run the same command again.", host=self.dev.conn.hostname, stage=got,
                              code="device_refused")
        if got.get("present"):
            self.progress(ProgressEvent("upload", f"{m.bundle_id} is already on the device (releases/"
                                                  f"{got['present']}), verified; not sending it again"))
            self.skipped = len(m.files)
            return
        self.staging = str(got["staging_rel"])
        missing = {str(f["path"]) for f in got["missing"]}
        absent = sorted(p for p in missing if not (self.bundle / p).is_file())
        if absent and m.base_id:  # an adapter pack carries only its own files; the device must have the base's
            raise UserError(f"{self.dev.conn.hostname} does not have the base bundle {m.base_id} this adapter pack "
                            f"extends ({len(absent)} of its files are missing there, e.g. {absent[0]}). Nothing "
                            "was written.", hint=f"Deploy the base bundle ({m.base_id}) to the device first, then "
                                                 "the pack.", host=self.dev.conn.hostname, base=m.base_id,
                            code="base_missing", missing=absent[:20])
        if got.get("reused"):
            self.progress(ProgressEvent("upload", f"{got['reused']} files ({got['reused_bytes'] / 1e6:.1f} MB) are "
                                                  "already on the device in another release: linked there, not sent"))
        with self.t.stage("upload", f"to {self.dev.path(self.staging)}") as d:
            self.send(missing)
            self.skipped = len(m.files) - len(missing)
            d.update(files=self.sent, bytes=self.sent_bytes, skipped=self.skipped)

    def send(self, paths: set[str], *, repair: bool = False) -> None:
        """Each file is read once and hashed as it is sent; the manifest sent is the bytes that were checked."""
        todo = [f for f in self.manifest.files if f.path in paths]
        total, done = sum(f.bytes for f in todo), 0
        conn, root = self.dev.conn, self.dev.path(self.staging)
        for f in todo:
            def cb(n: int, _size: int, base: int = done, name: str = f.path) -> None:
                self.progress(ProgressEvent("upload", name, done=base + n, total=total or 1))

            conn.put(self.bundle / f.path, posixpath.join(root, f.path), progress=cb, sha256=f.sha256)
            done += f.bytes
        conn.put(self.manifest_bytes, posixpath.join(root, MANIFEST))
        if (self.bundle / SIGNATURE).is_file():
            conn.put(self.bundle / SIGNATURE, posixpath.join(root, SIGNATURE))
        if repair:
            self.repaired = sorted(paths)
        else:
            self.sent, self.sent_bytes = len(todo), done


# The device's steps, as the stages a deploy reports (the signature check is part of the install stage).
_STAGES = {"verify": "sha256 of every file on the device", "install": "install.sh (offline, hash-pinned wheels), "
           "after the device's own check", "smoke": "smoke_test.py on the device", "switch": "current → the release",
           "service": "restart, wait for /health, one completion", "prune": "keep the last releases"}


def _apply(dev: Device, spec: dict[str, Any], up: _Upload, live: _Live, progress: ProgressFn) -> dict[str, Any]:
    """The device program's `apply` in the session: its steps stream back as progress and stage records."""
    held: dict[str, Any] = {}

    def step(s: dict[str, Any]) -> None:
        name = str(s.get("name"))
        if s.get("begin"):
            if name in _STAGES:
                progress(ProgressEvent(name, _STAGES[name]))
            return
        if name == "signature":
            held.update(signed=s.get("signed"), key_id=s.get("key_id"))
            return
        if name == "switch":
            live.switched_to = str(s.get("current"))
        run = s.get("run")
        if isinstance(run, dict):
            up.commands += (_command(run),)
        if name == "verify" and s.get("reused"):
            return
        detail = {k: v for k, v in s.items() if k not in ("name", "seconds", "run")}
        if name == "install":
            detail.update(held)
        if name == "smoke":
            detail = dict(s.get("smoke") or {})
        up.t.records.append(StageRecord(name, float(s.get("seconds", 0.0)), detail=detail))

    if up.staging:
        progress(ProgressEvent("verify", _STAGES["verify"]))
    try:
        line = dev.session.request(["apply", dev.install_dir, json.dumps(dict(spec, staging=up.staging)), dev.op],
                                   timeout=APPLY_TIMEOUT, progress=step) if dev.session else ""
    except KeyboardInterrupt:
        _stop(dev, live)
        raise
    try:
        answer: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        raise RemoteError(f"the device program on {dev.conn.hostname} gave no answer to `apply`: {line[-300:]}.",
                          hint="Run the same command again.", host=dev.conn.hostname) from None
    live.switched_to = answer.get("current") if answer.get("switched") else None
    return answer


def _stop(dev: Device, live: _Live) -> None:
    """Ctrl-C during `apply`: the device ends the running step and changes nothing more; its answer says what is
    live (waited for a short while, so the interrupted error tells the truth)."""
    session = dev.session
    if session is None:
        return
    with contextlib.suppress(Exception):
        session.write(b"release\n")
        while True:
            line = session.line(60.0)
            if not line or not line.startswith('{"progress": '):
                break
        answer = json.loads(line)
        live.switched_to = answer.get("current") if answer.get("switched") else None


def _command(run: dict[str, Any]) -> CommandResult:
    """A command the device program ran for us (install.sh, the smoke test), as edgepack records commands."""
    tail = run.get("stdout_tail") or (run.get("stdout") or "").splitlines()[-20:]
    return CommandResult(str(run.get("command")), run.get("exit_code"), float(run.get("seconds", 0)), tuple(tail),
                         tuple(run.get("stderr_tail") or ()), killed=bool(run.get("killed")))


def _failure(host: str, a: dict[str, Any]) -> EdgepackError:
    """The device's failed `apply`, as the error edgepack raises for it (its message; the live sentence follows)."""
    code, msg = str(a.get("code") or "device_refused"), str(a.get("message") or a.get("error"))
    run = a.get("install") or (a.get("evidence") if code == "smoke_test_failed" else None)
    evidence = {"evidence": _command(run)} if isinstance(run, dict) else {}
    if code == "interrupted":
        return Interrupted(f"interrupted on {host}: {msg}.", hint="Run the same command again.", host=host)
    hints = {"upload_mismatch": "Run the same command again: the upload resumes with what is missing or wrong; if it "
                                "fails again, the device's storage may be failing.",
             "signature_invalid": "Sign the bundle with a key the device trusts (`edgepack sign BUNDLE --key KEY`).",
             "install_failed": "See the evidence (the installer's last lines).",
             "smoke_test_failed": "The bundle loads or generates wrongly on this device; see the evidence.",
             "service_check_failed": "See log_tail (the service's own log on the device)."}
    fields = {k: a[k] for k in ("verify", "smoke", "service", "log_tail", "publish", "switch") if k in a}
    return RemoteError(f"On {host}, {msg}.", hint=hints.get(code, "Run the same command again."), host=host,
                       code=code, **fields, **evidence)


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
    return rel, tuple(entries)


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
    # The device's answer is data: only names an adapter may have are shown.
    adapters = [a for a in st.get("adapters") or [] if isinstance(a, str) and ADAPTER_RE.match(a)]
    return st | {"host": conn.hostname, "service": service, "adapters": adapters}


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
