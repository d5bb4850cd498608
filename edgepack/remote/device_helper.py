# This file runs ON THE DEVICE, fed to `python3 - <command> <install_dir> ...` over SSH stdin: nothing is written
# to the device to run it. Standard library only; Python 3.7+. Every command prints exactly one JSON document.
#
# The invariant it keeps (docs/deploy.md): `current` and the rollback target always name complete, verified,
# installed releases. Releases are never rewritten: a bad copy of a release is replaced only when no pointer
# uses it, else the good copy goes to a fresh folder (<id>.2, <id>.3, ...). Every command that changes the
# install dir runs under the lock of one operation, and every path is checked to stay inside the install dir.
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import sys
import time

MANIFEST = "edgepack.json"
SIGNATURE = "edgepack.json.minisig"
LOCAL_ONLY = (".venv", "__pycache__", ".cache")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}-[0-9a-f]{12}$")
FOLDER_RE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,95}-[0-9a-f]{12})(\.[0-9]{1,4})?$")
OP_RE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
INSTALLED = os.path.join(".venv", ".edgepack-installed")


class Refused(Exception):
    pass


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _root(install_dir):
    return os.path.abspath(os.path.expanduser(install_dir))


def _inside(root, *parts):
    """root/parts..., refused unless it stays inside root once symlinks are resolved."""
    for p in parts:
        if not p or os.path.isabs(p) or "\\" in p or ".." in p.split("/"):
            raise Refused("unsafe path %r" % (p,))
    path = os.path.join(root, *parts)
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise Refused("%s leaves the install dir %s" % (path, root))
    return path


def _bundle_id(value):
    if not ID_RE.match(value) or ".." in value:
        raise Refused("bad bundle id %r" % (value,))
    return value


def _folder(value):
    m = FOLDER_RE.match(value)
    if not m or ".." in value:
        raise Refused("bad release folder %r" % (value,))
    return value


def _op(value):
    if not OP_RE.match(value):
        raise Refused("bad operation id %r" % (value,))
    return value


def _derive_id(manifest):
    body = json.dumps({k: v for k, v in manifest.items() if k != "bundle_id"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()
    return "%s-%s" % (manifest.get("name", ""), hashlib.sha256(body).hexdigest()[:12])


# -- facts -----------------------------------------------------------------------------------------------

def _existing_parent(path):
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "/"


def _genai_cuda():
    """None: no onnxruntime_genai in this Python; else whether it has the CUDA provider."""
    try:
        import onnxruntime_genai as og
    except Exception:
        return None
    try:
        return bool(og.is_cuda_available())
    except Exception:
        return False


def _first_line(path):
    try:
        with open(path) as fh:
            return fh.readline().strip() or None
    except OSError:
        return None


def _hwcap():
    """AT_HWCAP from /proc/self/auxv (what the kernel, or qemu-user, says this CPU does), or None."""
    try:
        with open("/proc/self/auxv", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    import struct

    size = struct.calcsize("L")
    for i in range(0, len(data) - 2 * size + 1, 2 * size):
        key, value = struct.unpack_from("LL", data, i)
        if key == 16:  # AT_HWCAP
            return value
        if key == 0:
            break
    return None


# aarch64 AT_HWCAP bits (linux/arch/arm64/include/uapi/asm/hwcap.h) the runtimes care about
_ARM64_HWCAP = {"fp": 0, "asimd": 1, "aes": 3, "crc32": 7, "atomics": 8, "fphp": 9, "asimdhp": 10,
                "asimdrdm": 12, "lrcpc": 15, "dcpop": 16, "asimddp": 20, "sve": 22}


def _cpu_features():
    """The CPU's feature flags: from AT_HWCAP on aarch64 (what the CPU does), else /proc/cpuinfo's line."""
    hwcap = _hwcap()
    if platform.machine() == "aarch64" and hwcap is not None:
        return sorted(name for name, bit in _ARM64_HWCAP.items() if hwcap & (1 << bit))
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("Features", "flags"):
                    return sorted(set(value.split()))
    except OSError:
        pass
    return None


def facts(install_dir, check_cuda="no"):
    install_dir = _root(install_dir)
    osr = {}
    for f in ("/etc/os-release", "/usr/lib/os-release"):
        if os.path.exists(f):
            with open(f) as fh:
                for line in fh:
                    k, _, v = line.strip().partition("=")
                    osr[k] = v.strip('"')
            break
    libc, libc_version = platform.libc_ver()
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    parent = _existing_parent(install_dir)
    st = os.statvfs(parent)
    prefix = os.environ.get("PREFIX", "")
    return {
        "arch": platform.machine(),
        "os_id": osr.get("ID", "android" if "com.termux" in prefix else platform.system().lower()),
        "os_version": osr.get("VERSION_ID", platform.release()),
        "libc": libc or None,
        "glibc": libc_version if libc == "glibc" else None,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "python_executable": sys.executable,
        "has_venv": _has_venv(),
        "install_dir": install_dir,
        "home": os.path.expanduser("~"),
        "free_bytes": st.f_bavail * st.f_frsize,
        "mem_available_bytes": mem,
        "writable": os.access(parent, os.W_OK),
        "systemd_user": bool(shutil.which("systemctl")) and bool(os.environ.get("XDG_RUNTIME_DIR")),
        # root on a systemd-booted device: a system unit (starts at boot, no user session or lingering needed)
        "systemd_system": (os.getuid() == 0 and bool(shutil.which("systemctl"))
                           and os.path.isdir("/run/systemd/system")),
        "termux": "com.termux" in prefix or bool(os.environ.get("TERMUX_VERSION")),
        "nv_tegra_release": _first_line("/etc/nv_tegra_release"),
        "genai_cuda": _genai_cuda() if check_cuda == "cuda" else None,
        "cpu_features": _cpu_features(),
    }


def _has_venv():
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return False
    return True


# -- the lock --------------------------------------------------------------------------------------------

def _lock_path(root):
    return os.path.join(root, ".lock")


def _pids_path(root, op):
    return os.path.join(root, ".ops", op + ".pids")


def _held_by(root, op):
    """True when operation `op` holds the install dir's lock right now."""
    path = _lock_path(root)
    if not os.path.exists(path):
        return False
    with open(path, "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                return json.loads(fh.read() or "{}").get("op") == op
            except ValueError:
                return False
        fcntl.flock(fh, fcntl.LOCK_UN)  # nobody held it
        return False


def _require_lock(root, op):
    if not _held_by(root, _op(op)):
        raise Refused("operation %s does not hold the lock of %s" % (op, root))


def _kill_groups(root, op):
    """End every process group an operation started (install.sh, the smoke test) that is still running."""
    path = _pids_path(root, op)
    try:
        with open(path) as fh:
            pgids = [int(x) for x in fh.read().split() if x.isdigit()]
    except OSError:
        return []
    killed = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
                if sig == signal.SIGTERM:
                    killed.append(pgid)
            except OSError:
                pass
        if sig == signal.SIGTERM and killed:
            deadline = time.time() + 5
            while time.time() < deadline and any(_alive(p) for p in pgids):
                time.sleep(0.1)
    if os.path.exists(path):
        os.remove(path)
    return killed


def _alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def lock(install_dir, op, holder, ttl="60"):
    """Hold the install dir's lock while this process lives: stdin lines are heartbeats, "release" or EOF or
    `ttl` seconds of silence end it. The lock is an flock, so the kernel drops it if this process dies; on the
    way out, the operation's remaining process groups are ended, so nothing it started outlives it."""
    root = _root(install_dir)
    _op(op)
    os.makedirs(os.path.join(root, ".ops"), exist_ok=True)
    fh = open(_lock_path(root), "a+")  # noqa: SIM115 (held open for the life of the process: that is the lock)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        fh.seek(0)
        try:
            current = json.loads(fh.read() or "{}")
        except ValueError:
            current = {}
        print(json.dumps({"ok": False, "error": "locked", "holder": current}))
        return None
    fh.seek(0)
    stale = fh.read()
    fh.seek(0)
    fh.truncate()
    info = json.loads(holder)
    info.update(op=op, device_pid=os.getpid(), since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    fh.write(json.dumps(info))
    fh.flush()
    previous = None
    if stale.strip():
        try:
            previous = json.loads(stale)
        except ValueError:
            previous = None
        if previous and previous.get("op"):  # a holder that died without releasing: end what it started
            _kill_groups(root, _op(previous["op"]) if OP_RE.match(str(previous["op"])) else op)
    print(json.dumps({"ok": True, "op": op, "stale": previous}), flush=True)
    ttl_s = float(ttl)
    try:
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], ttl_s)
            if not ready:
                break
            line = sys.stdin.readline()
            if not line or line.strip() == "release":
                break
    finally:
        _kill_groups(root, op)
        fh.seek(0)
        fh.truncate()
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
    return None


# -- files -----------------------------------------------------------------------------------------------

def _hashes(directory):
    out = {}
    if os.path.isdir(directory):
        for root, dirs, files in os.walk(directory):
            dirs[:] = [d for d in dirs if not (root == directory and d in LOCAL_ONLY)]
            for name in files:
                p = os.path.join(root, name)
                rel = os.path.relpath(p, directory).replace(os.sep, "/")
                out[rel] = [os.path.getsize(p), _sha256(p)] if not os.path.islink(p) else [-1, "symlink"]
    return out


def hashes(install_dir, rel):
    return _hashes(_inside(_root(install_dir), rel))


def mkdirs(install_dir, op, *rels):
    root = _root(install_dir)
    _require_lock(root, op)
    for rel in rels:
        os.makedirs(_inside(root, rel), exist_ok=True)
    return {"ok": True}


def reuse(install_dir, op, rel, wanted_json):
    """Put into the staging folder `rel` every wanted file (path, bytes, sha256) that a release already on the device
    has with the same sha256: hard-linked (releases are never rewritten), else copied. Only what no release has is
    left to upload; the verify step checks every file afterwards either way."""
    root = _root(install_dir)
    _require_lock(root, op)
    _inside(root, rel)
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
                have[f["sha256"]] = _inside(root, "releases", name, f["path"])
    reused, linked, copied = [], 0, 0
    for path, _size, sha in wanted:
        src = have.get(sha)
        if not src:
            continue
        dst = _inside(root, rel, path)
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


def _verify_dir(directory):
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
    if bundle_id != _derive_id(manifest) or not ID_RE.match(str(bundle_id)):
        error = "the manifest's id %r is not the one its content gives (%s)" % (bundle_id, _derive_id(manifest))
    return {"ok": not (missing or changed or extra or error), "missing": missing, "changed": changed,
            "extra": extra, "bundle_id": bundle_id, "error": error,
            "installed": os.path.isfile(os.path.join(directory, INSTALLED))}


def verify(install_dir, rel):
    return _verify_dir(_inside(_root(install_dir), rel))


def remove_extra(install_dir, op, rel, *files):
    root = _root(install_dir)
    _require_lock(root, op)
    for f in files:
        path = _inside(root, rel, f)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
    return {"ok": True}


def _releases_dir(root):
    return os.path.join(root, "releases")


def _folders(root):
    rel = _releases_dir(root)
    if not os.path.isdir(rel):
        return []
    names = [n for n in os.listdir(rel) if FOLDER_RE.match(n) and os.path.isdir(os.path.join(rel, n))]
    return sorted(names, key=lambda n: os.path.getmtime(os.path.join(rel, n)))


def _current(root):
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
    current = _current(root)
    present = set(_folders(root))
    for folder in reversed(_history(root)):
        if folder != current and folder in present:
            return folder
    return None


def _pointers(root):
    return {f for f in (_current(root), _rollback_target(root)) if f}


def locate(install_dir, bundle_id):
    """Folders holding this bundle: which verify, which are installed, which a pointer uses."""
    root = _root(install_dir)
    _bundle_id(bundle_id)
    pointed = _pointers(root)
    out = []
    for folder in _folders(root):
        if FOLDER_RE.match(folder).group(1) == bundle_id:
            check = _verify_dir(os.path.join(_releases_dir(root), folder))
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


def publish(install_dir, op, bundle_id):
    """Move a verified staging folder to its release folder. A bad folder of the same id is replaced only when
    no pointer uses it; otherwise the release gets a fresh folder."""
    root = _root(install_dir)
    _require_lock(root, op)
    _bundle_id(bundle_id)
    rels = _releases_dir(root)
    staging = _inside(root, "releases", bundle_id + ".partial")
    check = _verify_dir(staging)
    if not check["ok"]:
        return {"ok": False, "error": "the staging folder does not verify", "verify": check}
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
    os.rename(staging, os.path.join(rels, _folder(folder)))
    _fsync_dir(rels)
    return {"ok": True, "folder": folder, "replaced_unused": folder == bundle_id and n > 1}


def switch(install_dir, op, folder):
    root = _root(install_dir)
    _require_lock(root, op)
    _folder(folder)
    target = os.path.join("releases", folder)
    _inside(root, "releases", folder)
    check = _verify_dir(os.path.join(root, target))
    if not check["ok"] or not check["installed"]:
        return {"ok": False, "error": "release %s is not complete, verified and installed" % folder,
                "verify": check}
    previous = _current(root)
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


def status(install_dir):
    root = _root(install_dir)
    rels = _releases_dir(root)
    holder = None
    if os.path.exists(_lock_path(root)):
        with open(_lock_path(root)) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except OSError:
                try:
                    holder = json.loads(fh.read() or "{}")
                except ValueError:
                    holder = {}
    return {"install_dir": root, "current": _current(root), "rollback_target": _rollback_target(root),
            "releases": _folders(root), "history": _history(root)[-10:], "locked_by": holder,
            "partial": sorted(n for n in os.listdir(rels) if n.endswith(".partial")) if os.path.isdir(rels)
            else []}


def rollback(install_dir, op):
    root = _root(install_dir)
    _require_lock(root, op)
    current = _current(root)
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
    root = _root(install_dir)
    _require_lock(root, op)
    keep = max(int(keep), 1)
    protected = _pointers(root)
    removed = []
    folders = _folders(root)
    for name in folders[: max(len(folders) - keep, 0)]:
        if name not in protected:
            shutil.rmtree(os.path.join(_releases_dir(root), name), ignore_errors=True)
            removed.append(name)
    rels = _releases_dir(root)
    stale = []
    if os.path.isdir(rels):  # under the lock no other operation is staging: leftovers are stale
        for n in os.listdir(rels):
            if n.endswith(".partial") or n.startswith(".trash-"):
                shutil.rmtree(os.path.join(rels, n), ignore_errors=True)
                stale.append(n)
    for n in os.listdir(root):
        if n.startswith((".current.", ".history.")) and n.endswith(".tmp"):
            os.remove(os.path.join(root, n))
    return {"ok": True, "removed": removed, "stale_removed": stale, "kept": [r for r in folders if r not in removed]}


def unit_name(root):
    return "edgepack-%s.service" % hashlib.sha256(root.encode()).hexdigest()[:8]


def _check_addr(addr):
    if not re.match(r"^(unix:/[A-Za-z0-9._/-]{1,200}|\[?[0-9A-Za-z.:-]{1,100}\]?:[0-9]{1,5})$", addr):
        raise Refused("bad serve address %r" % (addr,))
    return addr


UNIT_DIRS = {"user": "~/.config/systemd/user", "system": "/etc/systemd/system"}
# A system unit runs as root: it gets what a model server needs and no more (the release is read-only to it, its
# install dir writable for LiteRT-LM's cache; no new privileges, a private /tmp).
SYSTEM_HARDENING = ("NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=full\nProtectKernelTunables=yes\n"
                    "ProtectControlGroups=yes\n")


def install_unit(install_dir, op, unit_file, scope, addr):
    """Install the current release's unit as this install dir's unit (one per install dir, whatever the bundle),
    with the install dir and address filled in: a user unit, or (root on a systemd device) a system unit."""
    root = _root(install_dir)
    _require_lock(root, op)
    if not re.match(r"^edgepack-[a-z0-9][a-z0-9._-]{0,95}\.service$", unit_file):
        raise Refused("bad unit name %r" % (unit_file,))
    if scope not in UNIT_DIRS and not scope.startswith("/"):  # an absolute folder: the tests' stand-in
        raise Refused("bad unit scope %r" % (scope,))
    src = _inside(root, "current", unit_file)
    with open(src) as fh:
        text = fh.read().replace("@EDGEPACK_CURRENT@", os.path.join(root, "current"))
    text = text.replace("@EDGEPACK_SERVE@", _check_addr(addr))
    if scope == "system":
        text = text.replace("WantedBy=default.target", "WantedBy=multi-user.target")
        text = text.replace("\n[Install]", SYSTEM_HARDENING + "\n[Install]", 1)
    dest_dir = os.path.expanduser(UNIT_DIRS.get(scope, scope))
    os.makedirs(dest_dir, exist_ok=True)
    unit = unit_name(root)
    tmp = os.path.join(dest_dir, "." + unit + "." + op + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(dest_dir, unit))
    return {"ok": True, "unit": unit, "path": os.path.join(dest_dir, unit), "scope": scope}


def unit_scope(root):
    """Which systemd manager has this install dir's unit: "system", "user" or None."""
    unit = unit_name(root)
    for scope in ("system", "user"):
        if os.path.exists(os.path.join(os.path.expanduser(UNIT_DIRS[scope]), unit)):
            return scope
    return None


# -- the service without systemd: a supervised process with a pid file ----------------------------------

def _service_pid(root):
    try:
        with open(os.path.join(root, "service.pid")) as fh:
            pid = int(fh.read().split()[0])
        os.kill(pid, 0)
        with open("/proc/%d/stat" % pid) as fh:  # a zombie nobody reaped is not a running service
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        return pid
    except (OSError, ValueError, IndexError):
        return None


def service_stop(install_dir, op):
    root = _root(install_dir)
    _require_lock(root, op)
    pid = _service_pid(root)
    if pid:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    return {"ok": True, "stopped": pid}


def service_start(install_dir, op, addr):
    """(Re)start `current`'s server in its own session (it outlives this operation), logging to service.log."""
    root = _root(install_dir)
    _require_lock(root, op)
    _check_addr(addr)
    service_stop(install_dir, op)
    current = os.path.join(root, "current")
    python = os.path.join(current, ".venv", "bin", "python")
    log = open(os.path.join(root, "service.log"), "ab")  # noqa: SIM115 (handed to the child)
    state = os.path.join(root, "service.state")
    with contextlib.suppress(OSError):
        os.remove(state)
    pid = os.fork()
    if pid == 0:  # child: a new session, detached from this SSH command, that supervises the server
        try:
            os.setsid()
            os.chdir(current)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            _supervise([python, os.path.join(current, "run.py"), "--serve", addr], state)
        finally:
            os._exit(0)
    log.close()
    with open(os.path.join(root, "service.pid.tmp"), "w") as fh:
        fh.write("%d %s\n" % (pid, addr))
    os.replace(os.path.join(root, "service.pid.tmp"), os.path.join(root, "service.pid"))
    return {"ok": True, "pid": pid, "addr": addr}


RESTART_S = 5  # as the unit's RestartSec
RESTART_BURST = (5, 60.0)  # more restarts than this in that many seconds: give up (systemd's StartLimitBurst)


def _write_state(path, doc):
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh)
    os.replace(path + ".tmp", path)


def _supervise(argv, state):
    """Run the server; when it fails (not a clean exit, not our SIGTERM), restart it after RESTART_S, as the systemd
    unit's Restart=on-failure does. The state file says how often and why."""
    restarts, recent = 0, []
    while True:
        child = os.fork()
        if child == 0:
            try:
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        _write_state(state, {"server_pid": child, "restarts": restarts, "last_exit": None})
        _, status = os.waitpid(child, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        if code == 0 or code == -signal.SIGTERM:
            _write_state(state, {"server_pid": None, "restarts": restarts, "last_exit": code})
            return
        now = time.time()
        recent = [t for t in recent if now - t < RESTART_BURST[1]] + [now]
        gave_up = len(recent) > RESTART_BURST[0]
        _write_state(state, {"server_pid": None, "restarts": restarts, "last_exit": code, "gave_up": gave_up})
        sys.stderr.write("edgepack supervisor: the server exited with %d; %s\n"
                         % (code, "restarted too often, giving up" if gave_up else
                            "restarting in %d s" % RESTART_S))
        sys.stderr.flush()
        if gave_up:
            return
        time.sleep(RESTART_S)
        restarts += 1


def _service_state(root):
    try:
        with open(os.path.join(root, "service.state")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _http(addr, method, path, body=None, timeout=10.0):
    import http.client

    if addr.startswith("unix:"):
        class UnixConnection(http.client.HTTPConnection):
            def connect(self):
                import socket

                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(addr[5:])

        conn = UnixConnection("localhost", timeout=timeout)
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        conn = http.client.HTTPConnection("127.0.0.1" if host in ("0.0.0.0", "") else host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("EDGEPACK_API_KEY")
    if key:
        headers["Authorization"] = "Bearer " + key
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    data = r.read().decode("utf-8", "replace")
    conn.close()
    return r.status, data


def service_check(install_dir, addr, wait_s="120"):
    """Wait for GET /health to say ok, then run one short completion through the service."""
    root = _root(install_dir)
    _check_addr(addr)
    deadline = time.time() + float(wait_s)
    last = None
    supervised = os.path.exists(os.path.join(root, "service.pid"))
    while time.time() < deadline:
        st = _service_state(root) if supervised else {}
        if supervised and (_service_pid(root) is None or st.get("last_exit") is not None):
            return {"ok": False, "error": "the service exited on start (exit %s)" % st.get("last_exit"),
                    "log_tail": _log_tail(root)}
        try:
            status, data = _http(addr, "GET", "/health", timeout=5)
            last = "GET /health: %d %s" % (status, data.strip()[:200])
            if status == 200:
                break
        except OSError as exc:
            last = "GET /health: %s" % exc
        time.sleep(0.5)
    else:
        return {"ok": False, "error": "the service did not become healthy in %s s (%s)" % (wait_s, last),
                "log_tail": _log_tail(root)}
    try:
        status, data = _http(addr, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4}, timeout=120)
    except OSError as exc:
        return {"ok": False, "error": "POST /v1/completions: %s" % exc, "log_tail": _log_tail(root)}
    if status != 200:
        return {"ok": False, "error": "POST /v1/completions: %d %s" % (status, data.strip()[:300]),
                "log_tail": _log_tail(root)}
    reply = json.loads(data)
    return {"ok": True, "health": last, "completion_tokens": reply.get("usage", {}).get("completion_tokens")}


def _log_tail(root):
    try:
        with open(os.path.join(root, "service.log"), "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - 4000, 0))
            return fh.read().decode("utf-8", "replace").splitlines()[-15:]
    except OSError:
        return []


def service_status(install_dir):
    root = _root(install_dir)
    pid = _service_pid(root)
    addr = None
    try:
        with open(os.path.join(root, "service.pid")) as fh:
            addr = fh.read().split()[1]
    except (OSError, IndexError):
        pass
    st = _service_state(root) if pid else {}
    return {"supervisor": "pidfile", "running": pid is not None and bool(st.get("server_pid")), "pid": pid,
            "server_pid": st.get("server_pid"), "restarts": st.get("restarts", 0), "last_exit": st.get("last_exit"),
            "addr": addr, "unit": unit_name(root), "unit_scope": unit_scope(root)}


def trust(install_dir, op, name, key_b64):
    """Add a public key the device's install step checks signatures against (never removes one)."""
    root = _root(install_dir)
    _require_lock(root, op)
    if not re.match(r"^[A-Za-z0-9]{1,40}$", name) or not re.match(r"^[A-Za-z0-9+/=]{40,80}$", key_b64):
        raise Refused("bad trusted key %r" % (name,))
    d = os.path.join(root, "trusted_keys")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name + ".pub")
    text = "untrusted comment: edgepack trusted key %s\n%s\n" % (name, key_b64)
    old = None
    if os.path.exists(path):
        with open(path) as fh:
            old = fh.read()
    if old != text:
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
    return {"ok": True, "trusted_keys": sorted(os.listdir(d))}


COMMANDS = {"facts": facts, "lock": lock, "hashes": hashes, "mkdirs": mkdirs, "reuse": reuse, "verify": verify,
            "remove_extra": remove_extra, "locate": locate, "publish": publish, "switch": switch, "status": status,
            "rollback": rollback, "prune": prune, "install_unit": install_unit, "trust": trust,
            "service_start": service_start, "service_stop": service_stop, "service_check": service_check,
            "service_status": service_status}


def main(argv):
    cmd, args = argv[0], argv[1:]
    try:
        result = COMMANDS[cmd](*args)
    except Refused as exc:
        print(json.dumps({"ok": False, "refused": True, "error": str(exc)}))
        sys.exit(3)
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
