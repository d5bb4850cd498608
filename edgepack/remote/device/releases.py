"""Releases and the pointers to them: locate, publish (the staging folder becomes an immutable release), switch
and rollback by rename(2), status, prune. `current` and the rollback target always name complete, verified,
installed releases."""

import fcntl
import json
import os
import shutil
import time

from edgepack.bundle_format import FOLDER_RE, LOCAL_ONLY

from .files import verify_dir
from .lock import lock_path, require_lock
from .rules import (
    STAGING,
    STALE_S,
    Refused,
    check_bundle_id,
    check_folder,
    inside,
    install_root,
    staging_id,
    staging_rel,
)
from .signature import check_release


def releases_dir(root):
    return os.path.join(root, "releases")


def _folders(root):
    rel = releases_dir(root)
    if not os.path.isdir(rel):
        return []
    names = [n for n in os.listdir(rel) if FOLDER_RE.match(n) and os.path.isdir(os.path.join(rel, n))]
    return sorted(names, key=lambda n: os.path.getmtime(os.path.join(rel, n)))


def current_folder(root):
    link = os.path.join(root, "current")
    if os.path.islink(link):
        return os.path.basename(os.readlink(link))
    return None


def _history(root):
    path = os.path.join(root, "history")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [line.strip() for line in fh if FOLDER_RE.match(line.strip())]


def _rollback_target(root):
    """The release a rollback would switch to: the newest earlier history entry still on the device."""
    current = current_folder(root)
    present = set(_folders(root))
    for folder in reversed(_history(root)):
        if folder != current and folder in present:
            return folder
    return None


def _pointers(root):
    return {f for f in (current_folder(root), _rollback_target(root)) if f}


def locate(install_dir, bundle_id):
    """Folders holding this bundle: which verify, which are installed, which a pointer uses."""
    root = install_root(install_dir)
    check_bundle_id(bundle_id)
    pointed = _pointers(root)
    out = []
    for folder in _folders(root):
        if FOLDER_RE.match(folder).group(1) == bundle_id:
            check = verify_dir(os.path.join(releases_dir(root), folder))
            out.append({"folder": folder, "ok": check["ok"], "installed": check["installed"],
                        "in_use": folder in pointed, "problems": (check["missing"] + check["changed"] +
                                                                  check["extra"])[:5]})
    return {"ok": True, "folders": out, "in_use": sorted(pointed)}


def _fsync_tree(directory):
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not (root == directory and d in LOCAL_ONLY)]
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _executables(folder):
    """Uploads arrive 0644: the C program a verified manifest names (its "native" program) gets its execute bit."""
    try:
        with open(os.path.join(folder, "edgepack.json"), encoding="utf-8") as fh:
            program = (json.load(fh).get("native") or {}).get("program")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(program, str) and program:
        path = inside(folder, program)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o755)


def publish(install_dir, op, bundle_id, staging=""):
    """Move a verified staging folder (default: this operation's, .staging/<id>@<op>) to its release folder. A bad
    folder of the same id is replaced only when no pointer uses it; otherwise the release gets a fresh folder."""
    root = install_root(install_dir)
    require_lock(root, op)
    check_bundle_id(bundle_id)
    rels = releases_dir(root)
    staging = staging or staging_rel(bundle_id, op)
    if staging_id(staging) != bundle_id:
        raise Refused("%s is not a staging folder of %s" % (staging, bundle_id))
    staging = inside(root, staging)
    if not os.path.isdir(rels):
        os.makedirs(rels)
    check = check_release(root, staging)
    if not check["ok"]:
        return {"ok": False, "code": check.get("code", "upload_mismatch"),
                "error": check.get("error") or "the staging folder does not verify", "verify": check}
    _executables(staging)
    _fsync_tree(staging)
    pointed = _pointers(root)
    folder = bundle_id
    n = 1
    while os.path.lexists(os.path.join(rels, folder)):
        if folder not in pointed:  # a bad, unused copy: set it aside, then delete it
            trash = os.path.join(rels, ".trash-" + op + "-" + str(n))
            os.rename(os.path.join(rels, folder), trash)
            shutil.rmtree(trash, ignore_errors=True)
            break
        n += 1
        folder = "%s.%d" % (bundle_id, n)
    os.rename(staging, os.path.join(rels, check_folder(folder)))
    _fsync_dir(rels)
    return {"ok": True, "folder": folder, "replaced_unused": folder == bundle_id and n > 1,
            "bundle_id": check["bundle_id"], "signed": check["signed"], "key_id": check["key_id"]}


def switch(install_dir, op, folder):
    root = install_root(install_dir)
    require_lock(root, op)
    check_folder(folder)
    target = os.path.join("releases", folder)
    inside(root, "releases", folder)
    check = check_release(root, os.path.join(root, target))
    if not check["ok"] or not check["installed"]:
        return {"ok": False, "code": check.get("code"), "verify": check,
                "error": "release %s is not complete, verified%s and installed%s"
                % (folder, ", signed by a trusted key" if check["signature_required"] else "",
                   ": " + check["error"] if check.get("error") else "")}
    previous = current_folder(root)
    tmp = os.path.join(root, ".current." + op + ".tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, os.path.join(root, "current"))  # rename(2): atomic, `current` is never missing
    hist = _history(root)
    if not hist or hist[-1] != folder:
        hist.append(folder)
    _write_history(root, op, hist[-50:])
    _fsync_dir(root)
    return {"ok": True, "current": folder, "bundle_id": FOLDER_RE.match(folder).group(1), "previous": previous}


def _write_history(root, op, hist):
    tmp = os.path.join(root, ".history." + op + ".tmp")
    with open(tmp, "w") as fh:
        fh.write("\n".join(hist) + ("\n" if hist else ""))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, "history"))


def _staged(root):
    """The uploads on the device that are not (yet) releases, by staging folder."""
    top = os.path.join(root, STAGING)
    rels = releases_dir(root)
    old = [n for n in os.listdir(rels) if n.endswith(".partial")] if os.path.isdir(rels) else []
    return sorted([STAGING + "/" + n for n in os.listdir(top)] if os.path.isdir(top) else []) + sorted(old)


def status(install_dir):
    root = install_root(install_dir)
    holder = None
    if os.path.exists(lock_path(root)):
        with open(lock_path(root)) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except OSError:
                try:
                    holder = json.loads(fh.read() or "{}")
                except ValueError:
                    holder = {}
    current = current_folder(root)
    return {"install_dir": root, "current": current, "rollback_target": _rollback_target(root),
            "releases": _folders(root), "history": _history(root)[-10:], "locked_by": holder,
            "partial": _staged(root), "adapters": _adapters(root, current)}


def _adapters(root, folder):
    """The runtime adapters of a release, by name, as its (verified at install) manifest lists them."""
    if not folder:
        return []
    try:
        with open(os.path.join(releases_dir(root), folder, "edgepack.json")) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return []
    return sorted(str(a.get("name")) for a in doc.get("adapters") or [] if isinstance(a, dict))


def rollback(install_dir, op):
    root = install_root(install_dir)
    require_lock(root, op)
    current = current_folder(root)
    target = _rollback_target(root)
    if target is None:
        return {"ok": False, "error": "no earlier release on the device to roll back to", "current": current}
    result = switch(install_dir, op, target)
    if not result.get("ok"):
        return {"ok": False, "error": "the rollback target %s does not verify, so `current` stays %s: %s"
                % (target, current, result.get("error")), "current": current}
    # Drop the rolled-back release from history so a second rollback goes further back.
    _write_history(root, op, [h for h in _history(root) if h != current])
    return result


def prune(install_dir, op, keep):
    root = install_root(install_dir)
    require_lock(root, op)
    keep = max(int(keep), 1)
    protected = _pointers(root)
    removed = []
    folders = _folders(root)
    for name in folders[: max(len(folders) - keep, 0)]:
        if name not in protected:
            shutil.rmtree(os.path.join(releases_dir(root), name), ignore_errors=True)
            removed.append(name)
    rels = releases_dir(root)
    stale = []
    if os.path.isdir(rels):  # a publish interrupted while it set a bad copy aside; an older edgepack's staging
        for n in os.listdir(rels):
            if n.endswith(".partial") or n.startswith(".trash-"):
                shutil.rmtree(os.path.join(rels, n), ignore_errors=True)
                stale.append(n)
    top = os.path.join(root, STAGING)  # uploads: each belongs to the operation that staged it, which may still be
    for n in os.listdir(top) if os.path.isdir(top) else []:  # sending (the role copies outside the lock): only
        path = os.path.join(top, n)  # its own, and those abandoned long ago, are removed
        if n.endswith("@" + op) or time.time() - os.stat(path).st_mtime > STALE_S:
            shutil.rmtree(path, ignore_errors=True)
            stale.append(STAGING + "/" + n)
    for n in os.listdir(root):
        if n.startswith((".current.", ".history.")) and n.endswith(".tmp"):
            os.remove(os.path.join(root, n))
    return {"ok": True, "removed": removed, "stale_removed": stale, "kept": [r for r in folders if r not in removed]}
