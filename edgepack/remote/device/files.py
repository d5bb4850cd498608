"""A release's files: their hashes, staging folders, reuse of identical files already on the device (hard links),
and the check of a folder against its manifest."""

import json
import os
import shutil

from edgepack.bundle_format import ID_RE, INSTALLED, LOCAL_ONLY, MANIFEST, SIGNATURE, derive_id

from .lock import require_lock
from .rules import STAGING, inside, install_root, sha256_file, staging_id


def _staged_before(root, bundle_id, rel):
    """Earlier uploads of the same release (an interrupted deploy's): their files may be linked, once hashed."""
    top = os.path.join(root, STAGING)
    names = sorted(os.listdir(top)) if os.path.isdir(top) else []
    return [os.path.join(top, n) for n in names if n.startswith(bundle_id + "@") and STAGING + "/" + n != rel]


def _hashes(directory):
    out = {}
    if os.path.isdir(directory):
        for root, dirs, files in os.walk(directory):
            dirs[:] = [d for d in dirs if not (root == directory and d in LOCAL_ONLY)]
            for name in [d for d in dirs if os.path.islink(os.path.join(root, d))]:  # never followed: an entry
                dirs.remove(name)
                files.append(name)
            for name in files:
                p = os.path.join(root, name)
                rel = os.path.relpath(p, directory).replace(os.sep, "/")
                out[rel] = [os.path.getsize(p), sha256_file(p)] if not os.path.islink(p) else [-1, "symlink"]
    return out


def hashes(install_dir, rel):
    return _hashes(inside(install_root(install_dir), rel))


def mkdirs(install_dir, op, *rels):
    root = install_root(install_dir)
    require_lock(root, op)
    for rel in rels:
        os.makedirs(inside(root, rel), exist_ok=True)
    return {"ok": True}


def reuse(install_dir, op, rel, wanted_json):
    """Put into the staging folder `rel` every wanted file (path, bytes, sha256) that a release already on the device,
    or an earlier upload of the same release, has with the same sha256: hard-linked (releases are never rewritten,
    and an upload rewrites no file that is already right), else copied. Only what no release has is
    left to upload; the verify step checks every file afterwards either way."""
    root = install_root(install_dir)
    require_lock(root, op)
    inside(root, rel)
    wanted = json.loads(wanted_json)
    have = {}  # sha256 -> a file of an existing release
    releases = os.path.join(root, "releases")
    for name in sorted(os.listdir(releases)) if os.path.isdir(releases) else []:
        folder = os.path.join(releases, name)
        if name.startswith(".") or name.endswith(".partial") or not os.path.isdir(folder):
            continue
        try:
            with open(os.path.join(folder, MANIFEST)) as fh:
                files = json.load(fh).get("files", [])
        except (OSError, ValueError):
            continue
        for f in files:
            src = os.path.join(folder, f["path"])
            if f["sha256"] not in have and os.path.isfile(src) and os.path.getsize(src) == f["bytes"]:
                have[f["sha256"]] = inside(root, "releases", name, f["path"])
    bundle_id = staging_id(rel) if rel.startswith(STAGING + "/") else None
    for folder in _staged_before(root, bundle_id, rel) if bundle_id else []:
        for path, size, sha in wanted:
            src = inside(root, os.path.relpath(folder, root), path)
            if sha not in have and os.path.isfile(src) and not os.path.islink(src) \
                    and os.path.getsize(src) == size and sha256_file(src) == sha:
                have[sha] = src
    reused, linked, copied = [], 0, 0
    for path, _size, sha in wanted:
        src = have.get(sha)
        if not src:
            continue
        dst = inside(root, rel, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + "." + op + ".tmp"
        try:
            os.link(src, tmp)
            linked += 1
        except OSError:
            shutil.copyfile(src, tmp)
            copied += 1
        os.replace(tmp, dst)
        reused.append(path)
    return {"ok": True, "reused": reused, "linked": linked, "copied": copied,
            "bytes": sum(size for path, size, sha in wanted if path in set(reused))}


def verify_dir(directory):
    try:
        with open(os.path.join(directory, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        return {"ok": False, "missing": [], "changed": [], "extra": [], "error": "no readable manifest: %s" % exc,
                "bundle_id": None}
    have = _hashes(directory)
    have.pop(MANIFEST, None)
    have.pop(SIGNATURE, None)
    listed = {f["path"]: f for f in manifest.get("files", [])}
    missing = sorted(p for p in listed if p not in have)
    changed = sorted(p for p, f in listed.items() if p in have and have[p] != [f["bytes"], f["sha256"]])
    extra = sorted(p for p in have if p not in listed)
    bundle_id = manifest.get("bundle_id")
    error = None
    if bundle_id != derive_id(manifest) or not ID_RE.match(str(bundle_id)):
        error = "the manifest's id %r is not the one its content gives (%s)" % (bundle_id, derive_id(manifest))
    return {"ok": not (missing or changed or extra or error), "missing": missing, "changed": changed,
            "extra": extra, "bundle_id": bundle_id, "error": error,
            "installed": os.path.isfile(os.path.join(directory, INSTALLED))}


def verify(install_dir, rel):
    return verify_dir(inside(install_root(install_dir), rel))


def remove_extra(install_dir, op, rel, *files):
    root = install_root(install_dir)
    require_lock(root, op)
    for f in files:
        path = inside(root, rel, f)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
    return {"ok": True}
