"""edgepack's packing of a release's small files on the Ansible controller (the role's one command there).

    python3 pack_upload.py ARCHIVE BUNDLE < ["path", ...]

Writes an uncompressed tar of the given paths of BUNDLE, each a file its edgepack.json lists. It reads nothing
else: each path is checked against the manifest and opened one folder at a time from BUNDLE, never following a link
(O_NOFOLLOW), so no path, symlink or swap during the run takes it outside the bundle; anything but a regular file
is refused. Standard library only; exit 1 with the reason on stderr.
"""

import json
import os
import stat
import sys
import tarfile

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO never blocks us


class Refused(Exception):
    pass


def _parts(rel):
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or "\\" in rel or any(p in ("", ".", "..") or any(ord(c) < 32 for c in p) for p in parts):
        raise Refused(f"unsafe path {rel!r} (absolute, empty, with '.' or '..', or a backslash)")
    return parts


def open_inside(root_fd, rel):
    """A read-only fd of the regular file `rel` under the folder `root_fd`, and its stat; no link followed."""
    parts = _parts(rel)
    fd = os.dup(root_fd)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                raise Refused(f"{rel}: {name} is not a folder of the bundle ({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        try:
            out = os.open(parts[-1], _FILE, dir_fd=fd)
        except OSError as exc:
            raise Refused(f"{rel} is not a regular file of the bundle ({exc.strerror})") from None
    finally:
        os.close(fd)
    st = os.fstat(out)
    if not stat.S_ISREG(st.st_mode):
        os.close(out)
        raise Refused(f"{rel} is not a regular file")
    return out, st


def _read_manifest(root_fd):
    fd, _ = open_inside(root_fd, "edgepack.json")
    with os.fdopen(fd, "rb") as fh:
        doc = json.loads(fh.read().decode("utf-8"))
    return {f["path"] for f in doc["files"]}


def pack(archive, bundle, paths):
    root_fd = os.open(bundle, _DIR & ~os.O_NOFOLLOW)  # the bundle folder itself may be reached through a link
    try:
        listed = _read_manifest(root_fd)
        unlisted = [p for p in paths if p not in listed]
        if unlisted:
            raise Refused("not in the bundle's manifest: " + ", ".join(repr(p) for p in unlisted[:5]))
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in paths:
                fd, st = open_inside(root_fd, rel)
                with os.fdopen(fd, "rb") as fh:
                    info = tarfile.TarInfo(rel)
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    tar.addfile(info, fh)
    finally:
        os.close(root_fd)
    return len(paths)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    try:
        paths = json.load(sys.stdin)
        if not isinstance(paths, list):
            raise Refused("stdin is not a JSON list of paths")
        n = pack(argv[1], argv[2], paths)
    except (Refused, OSError, ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"bundle_invalid: {exc}\n")
        return 1
    sys.stdout.write(json.dumps({"ok": True, "packed": n}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
