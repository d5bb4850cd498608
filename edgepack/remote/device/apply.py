"""A whole deploy after the upload, in one process under the lock: verify → signature → publish → install →
smoke → switch → service → prune, and the staging before it (stage, unpack). Every deploy path runs it."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time

from edgepack.bundle_format import install_failure, live_sentence, smoke_result

from .facts import facts
from .files import hashes, mkdirs, remove_extra, reuse, verify
from .lock import OP_ENV, acquire, link_lost, record_pid, release_lock, require_lock
from .releases import current_folder, locate, prune, publish, releases_dir, rollback, switch
from .rules import Refused, check_bundle_id, check_op, inside, install_root, staging_id, staging_rel
from .service import install_unit, service_check, service_start
from .signature import TRUSTED_KEYS, add_signature, check_release, minisign_public_key, trust, trusted_keys


class Failed(Exception):
    """A step of `apply` failed: a stable code (as edgepack's own errors), a sentence and the evidence."""

    def __init__(self, code, message, **evidence):
        Exception.__init__(self, message)
        self.code, self.message, self.evidence = code, message, evidence


class Busy(Exception):
    """Another operation holds the install dir's lock: answered as `device_locked`, nothing changed."""

    def __init__(self, root, holder):
        Exception.__init__(self, "locked")
        self.root, self.holder = root, holder


@contextlib.contextmanager
def operation(root, kind, holder_json, op=""):
    """This process holds the install dir's lock for the block (yields the operation id); Busy if another does.
    With `op`, the caller is a session that already holds the lock for that operation: it is checked, not taken."""
    if op:
        require_lock(root, check_op(op))
        yield op
        return
    op = check_op("%s-%s-%d-%s" % (kind, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), os.getpid(),
                             hashlib.sha256(os.urandom(8)).hexdigest()[:8]))
    fh, holder = acquire(root, op, holder_json)
    if fh is None:
        raise Busy(root, holder)
    try:
        yield op
    finally:
        release_lock(root, op, fh)


def locked_answer(root, holder):
    return {"ok": False, "code": "device_locked", "holder": holder, "current": current_folder(root), "switched": False,
            "error": "%s is locked by another edgepack operation: `%s` (since %s). Nothing was changed."
                     % (root, (holder or {}).get("command", "?"), (holder or {}).get("since", "?"))}


def _usable(root, bundle_id):
    """A verified copy of the release already on the device that may be used as it is, or None."""
    found = locate(root, bundle_id)["folders"]
    return next((f for f in found if f["ok"] and (f["installed"] or not f["in_use"])), None)


def stage(install_dir, bundle_id, files_json, holder_json='{"command": "stage"}', op="", fresh="no"):
    """Ready this operation's staging folder (.staging/<id>@<op>) for an upload: under the lock, create its
    folders and link in every file a release on the device, or an earlier upload of this release, already has
    (same sha256), then say which files are still to send (path, bytes). A verified copy of the release already
    on the device means nothing to send, unless `fresh` asks for a new copy (a live copy whose runtime is broken)."""
    root = install_root(install_dir)
    check_bundle_id(bundle_id)
    files = [[f["path"], int(f["bytes"]), f["sha256"]] for f in json.loads(files_json)]  # the manifest's entries
    with operation(root, "stage", holder_json, op) as op:
        present = None if fresh == "yes" else _usable(root, bundle_id)
        out = {"ok": True, "install_dir": root, "bundle_id": bundle_id, "current": current_folder(root)}
        if present is not None:
            return dict(out, present=present["folder"], staging=None, staging_rel=None, missing=[], missing_bytes=0,
                        reused=0, reused_bytes=0, staged=len(files))
        rel = staging_rel(bundle_id, op)
        mkdirs(root, op, rel, *sorted({os.path.dirname(rel + "/" + f[0]) for f in files}))
        have = hashes(root, rel)
        todo = [f for f in files if have.get(f[0]) != [f[1], f[2]]]
        got = reuse(root, op, rel, json.dumps(todo)) if todo else {"reused": [], "bytes": 0}
        linked = set(got["reused"])
        missing = [{"path": f[0], "bytes": f[1]} for f in todo if f[0] not in linked]
        return dict(out, present=None, staging=os.path.join(root, rel), staging_rel=rel, missing=missing,
                    missing_bytes=sum(m["bytes"] for m in missing), reused=len(linked), reused_bytes=got["bytes"],
                    staged=len(files) - len(todo))


UPLOAD_ARCHIVE = ".edgepack-upload.tar"  # the role's one transfer of a release's small files


def unpack(install_dir, staging, holder_json='{"command": "unpack"}', op=""):
    """Unpack the role's archive of small files into its staging folder, then delete it. Regular files at safe
    relative paths only; each lands under a temporary name and is renamed, so an interrupted unpack leaves whole
    files or none (apply's verify checks every byte against the manifest either way)."""
    import tarfile

    root = install_root(install_dir)
    staging_id(staging)
    rel = staging
    with operation(root, "unpack", holder_json, op) as op:
        require_lock(root, op)
        archive = inside(root, rel, UPLOAD_ARCHIVE)
        if not os.path.isfile(archive):
            raise Refused("no upload archive in %s" % rel)
        done, size = 0, 0
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    raise Refused("the upload archive holds %r, which is not a regular file" % (member.name,))
                dest = inside(root, rel, member.name)
                parent = os.path.dirname(dest)
                if not os.path.isdir(parent):
                    os.makedirs(parent)
                src = tar.extractfile(member)
                with open(dest + ".part", "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(dest + ".part", 0o755 if member.mode & 0o111 else 0o644)
                os.replace(dest + ".part", dest)
                done, size = done + 1, size + member.size
        os.remove(archive)
    return {"ok": True, "unpacked": done, "bytes": size}


def _run_step(root, op, argv, env, timeout):
    """Run one step (install.sh, the smoke test) in its own process group, recorded for the lock: if this
    process dies, the next holder ends it. Returns its exit code and the tails of its output."""
    import subprocess

    t0 = time.time()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, **dict(env, **{OP_ENV: op})), start_new_session=True)
    record_pid(root, op, proc.pid)
    killed, lost = False, False
    while True:
        try:
            out, err = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            lost = link_lost()
            if lost or time.time() - t0 > float(timeout):
                killed = True
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                break
    if lost:
        raise Failed("interrupted", "the controller went away while `%s` ran: it was ended" % " ".join(argv[:2]))
    text = out.decode("utf-8", "replace")
    return {"command": " ".join(argv), "exit_code": None if killed else proc.returncode, "killed": killed,
            "seconds": round(time.time() - t0, 2), "stdout": text[-20000:],
            "stderr_tail": err.decode("utf-8", "replace").splitlines()[-20:]}


def _brief(res):
    """A step's command for the controller's records: its output's last lines, not all of it."""
    return dict(res, stdout=None, stdout_tail=res["stdout"].splitlines()[-20:])


def _restart_service(root, op, unit_file, addr, log):
    """(Re)start the install dir's service on `current`, as `edgepack deploy` does: a system unit for root on a
    systemd-booted device, systemd's user manager where the session has one, else a supervised process."""
    import subprocess

    f = facts(root)
    scope = "system" if f["systemd_system"] else "user" if f["systemd_user"] else None
    if not scope:
        return "supervised process (pid %d; no systemd on the device)" % service_start(root, op, addr)["pid"]
    unit = install_unit(root, op, unit_file, scope, addr)["unit"]
    ctl = ["systemctl"] + (["--user"] if scope == "user" else [])
    for args in (["daemon-reload"], ["enable", unit], ["restart", unit]):
        res = subprocess.run(ctl + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        log.append({"command": " ".join(ctl + args), "exit_code": res.returncode,
                    "output": res.stdout.decode("utf-8", "replace")[-2000:]})
        if res.returncode != 0:
            raise Failed("service_check_failed", "`%s` failed (exit %d)" % (" ".join(ctl + args), res.returncode),
                         commands=log)
    if scope == "user":
        res = subprocess.run('loginctl enable-linger "$(id -un)" && loginctl show-user "$(id -un)" -p Linger',
                             shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if b"Linger=yes" not in res.stdout:
            return ("systemd user unit %s (lingering could not be enabled: it stops when the user's last session "
                    "ends)" % unit)
    return "systemd %s unit %s" % (scope, unit)


def _service(root, op, spec, live):
    """Restart the service on the new release and check it (/health, one completion); when the check fails,
    switch back to the previous release, restart it there, and fail with the service's log."""
    addr, log = spec["serve_addr"], []
    how = _restart_service(root, op, spec["unit_file"], addr, log)
    check = service_check(root, addr, "120")
    if check.get("ok"):
        return "%s, healthy on %s" % (how, addr), check
    back, again = live["previous"], None
    if back and switch(root, op, back).get("ok"):
        live["switched_to"] = None
        _restart_service(root, op, spec["unit_file"], addr, log)
        again = service_check(root, addr, "120")
    raise Failed("service_check_failed", "the new release's service failed its check: %s%s"
                 % (check.get("error"), "; switched back to releases/%s" % back if live["switched_to"] is None
                    and back else ""), service=check, log_tail=check.get("log_tail"), previous_check=again)


def _apply(root, op, bundle_id, spec, live, steps):
    for key_b64 in spec.get("trusted", []):  # minisign public keys ("RW..."); the id is minisign's key number
        try:
            kid, _ = minisign_public_key(str(key_b64))
        except Refused as exc:
            raise Failed("invalid_input", str(exc)) from None
        trust(root, op, kid, key_b64)
    require = bool(spec.get("require_signature") or spec.get("trusted"))
    env = {"EDGEPACK_TRUSTED_KEYS": os.path.join(root, TRUSTED_KEYS)}
    if require or trusted_keys(root):
        env["EDGEPACK_REQUIRE_SIGNATURE"] = "1"
    staged = spec.get("staging")
    if staged and staging_id(staged) != bundle_id:
        raise Failed("invalid_input", "the staging folder %s is not for %s" % (staged, bundle_id))
    usable = None if staged else _usable(root, bundle_id)
    check_only = bool(usable and usable["in_use"])  # a live copy is never rewritten: only check its runtime
    if usable is None and not staged:
        raise Failed("upload_mismatch", "%s is not on the device and nothing was staged for it" % bundle_id)
    if usable is not None:
        folder = usable["folder"]
        steps.append({"name": "verify", "reused": folder})
        if spec.get("signature"):  # a bundle signed since this copy was deployed: the copy gets its signature
            add_signature(root, op, folder, spec["signature"])
    else:
        steps.begin("verify")
        rel = staged
        check = verify(root, rel)
        if check["extra"] and not (check["missing"] or check["changed"] or check["error"]):
            remove_extra(root, op, rel, *check["extra"])  # an interrupted copy's temp files
            check = verify(root, rel)
        steps.append({"name": "verify", "ok": check["ok"]})
        if not check["ok"]:
            raise Failed("upload_mismatch", "the upload does not match the manifest: missing %s, changed %s%s"
                         % (check["missing"][:3], check["changed"][:3],
                            ", " + check["error"] if check.get("error") else ""), verify=check)
        folder = None
    # The signature (and every file, again) is checked by this program before any of the release's code runs.
    release = os.path.join(releases_dir(root), folder) if folder else inside(root, staged)
    admitted = check_release(root, release, require)
    steps.append({"name": "signature", "required": admitted["signature_required"], "signed": admitted["signed"],
                  "key_id": admitted["key_id"]})
    if not admitted["ok"]:
        raise Failed(admitted.get("code") or "upload_mismatch", "the device refused the release: %s"
                     % admitted.get("error"), verify=admitted)
    if admitted["bundle_id"] != bundle_id:
        raise Failed("upload_mismatch", "the release on the device is %s, not the %s that was asked for"
                     % (admitted["bundle_id"], bundle_id))
    if folder is None:
        pub = publish(root, op, bundle_id, staged)
        if not pub.get("ok"):
            raise Failed(pub.get("code") or "device_refused", "could not publish the release: %s" % pub.get("error"),
                         publish=pub)
        folder = pub["folder"]
    release = os.path.join(releases_dir(root), folder)
    argv = ["sh", os.path.join(release, "install.sh")] + (["--allow-network"] if spec.get("allow_network") else [])
    steps.begin("install")
    if spec.get("wheels_dir"):  # the bundle's pinned versions for this device's Python, sent beside the releases
        env["EDGEPACK_WHEELS"] = inside(root, spec["wheels_dir"])
    res = _run_step(root, op, argv, dict(env, EDGEPACK_VENV=os.path.join(release, ".venv"),
                                         **({"EDGEPACK_CHECK_ONLY": "1"} if check_only else {})), 900)
    steps.append({"name": "install", "exit_code": res["exit_code"], "seconds": res["seconds"], "folder": folder,
                  "check_only": check_only, "run": _brief(res)})
    if res["exit_code"] != 0:
        if check_only:
            raise Failed("install_failed", "the live copy releases/%s has no working runtime (exit %s) and no fresh "
                         "copy was uploaded" % (folder, res["exit_code"]), install=res, fresh_copy_needed=True)
        raise Failed(*install_failure(res["exit_code"]), install=res)
    steps.begin("smoke")
    res = _run_step(root, op, [os.path.join(release, ".venv", "bin", "python"), os.path.join(release, "smoke_test.py"),
                               "--tokens", str(int(spec.get("smoke_tokens", 16)))], {}, 900)
    smoke = smoke_result(res["stdout"], -1 if res["exit_code"] is None else res["exit_code"])
    steps.append({"name": "smoke", "ok": smoke["ok"], "seconds": res["seconds"], "smoke": smoke, "run": _brief(res)})
    if not smoke["ok"]:
        raise Failed("smoke_test_failed", "the smoke test failed: %s" % smoke.get("error"), smoke=smoke,
                     evidence=_brief(res))
    if link_lost():
        raise Failed("interrupted", "the controller went away before the switch")
    sw = switch(root, op, folder)
    if not sw.get("ok"):
        raise Failed("device_refused", "the device refused the switch: %s" % sw.get("error"), switch=sw)
    live["switched_to"] = folder
    steps.append(dict(sw, name="switch", current=folder))
    service, check = "none (the target runs no service)", None
    if spec.get("service"):
        steps.begin("service")
        service, check = _service(root, op, spec, live)
        steps.append({"name": "service", "how": service, "check": check})
    pr = prune(root, op, spec.get("keep", 3))
    steps.append(dict(pr, name="prune"))
    return {"ok": True, "bundle_id": bundle_id, "release_folder": folder, "smoke": smoke, "service": service,
            "service_check": check, "pruned": pr["removed"]}


class _Steps(list):
    """The steps `apply` ran, each also printed at once as one progress line ({"progress": step}) with the seconds
    since the one before, so the controller shows progress as it happens; the answer is the last line."""

    def __init__(self):
        list.__init__(self)
        self.t = time.time()

    def begin(self, name):
        print(json.dumps({"progress": {"name": name, "begin": True}}), flush=True)
        self.t = time.time()

    def append(self, step):
        now = time.time()
        step = dict(step, seconds=step.get("seconds", round(now - self.t, 3)))
        self.t = now
        list.append(self, step)
        print(json.dumps({"progress": step}), flush=True)


def apply(install_dir, spec_json, op=""):
    """Everything after the upload, in this one process under the install dir's lock: verify every sha256 (or
    reuse a verified copy) → publish → install.sh (offline, hash-pinned, signature check) → smoke test → atomic
    switch → service restart and check (switch back on failure) → keep N. The same helper functions as `edgepack
    deploy` runs over SSH, so the same invariant: `current` names a complete, verified, installed release."""
    spec = json.loads(spec_json)
    root = install_root(install_dir)
    bundle_id = check_bundle_id(spec["bundle_id"])
    live = {"previous": current_folder(root), "switched_to": None}
    steps = _Steps()
    with operation(root, "apply", json.dumps(spec.get("holder") or {"command": "apply " + bundle_id}), op) as op:
        live["previous"] = current_folder(root)
        try:
            out = _apply(root, op, bundle_id, spec, live, steps)
        except Failed as exc:
            out = dict(exc.evidence, ok=False, code=exc.code, message=exc.message,
                       error="%s. %s" % (exc.message, live_sentence(live["previous"], live["switched_to"])))
    return dict(out, install_dir=root, current=current_folder(root), previous=live["previous"],
                switched=bool(live["switched_to"]), steps=list(steps))


def rollback_now(install_dir, holder_json='{"command": "rollback"}', op=""):
    """`rollback` under the install dir's lock (the role's and `edgepack rollback`'s)."""
    root = install_root(install_dir)
    with operation(root, "rollback", holder_json, op) as op:
        res = rollback(root, op)
    return dict(res, code=None if res.get("ok") else "rollback_unavailable", install_dir=root)
