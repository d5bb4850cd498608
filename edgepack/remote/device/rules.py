"""The device program's ground rules: ids, operation names and paths are checked before any is used, and every
path stays inside the install dir once symlinks are resolved."""

import hashlib
import os
import re

from edgepack.bundle_format import FOLDER_RE, ID_RE

OP_RE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")


class Refused(Exception):
    pass


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_root(install_dir):
    return os.path.abspath(os.path.expanduser(install_dir))


def inside(root, *parts):
    """root/parts..., refused unless it stays inside root once symlinks are resolved."""
    for p in parts:
        if not p or os.path.isabs(p) or "\\" in p or ".." in p.split("/"):
            raise Refused("unsafe path %r" % (p,))
    path = os.path.join(root, *parts)
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise Refused("%s leaves the install dir %s" % (path, root))
    return path


def check_bundle_id(value):
    if not ID_RE.match(value) or ".." in value:
        raise Refused("bad bundle id %r" % (value,))
    return value


def check_folder(value):
    m = FOLDER_RE.match(value)
    if not m or ".." in value:
        raise Refused("bad release folder %r" % (value,))
    return value


def check_op(value):
    if not OP_RE.match(value):
        raise Refused("bad operation id %r" % (value,))
    return value


STAGING = ".staging"  # <install_dir>/.staging/<bundle id>@<operation>: one upload's folder, owned by the operation that
STALE_S = 24 * 3600   # staged it (never another's to prune); one older than this is an abandoned upload


def staging_rel(bundle_id, op):
    return "%s/%s@%s" % (STAGING, check_bundle_id(bundle_id), check_op(op))


def staging_id(rel):
    """The bundle id a staging folder (`.staging/<id>@<op>`) is for; Refused unless `rel` is one."""
    rel = str(rel)
    head, _, name = rel.partition("/")
    bundle_id, at, op = name.partition("@")
    if head != STAGING or not at:
        raise Refused("not a staging folder: %r" % (rel,))
    check_op(op)
    return check_bundle_id(bundle_id)

