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


# -- signatures: checked here, by code that was on this side before the release arrived ------------------
# minisign's format (https://jedisct1.github.io/minisign/): a public key is base64("Ed" || key number[8] || key[32]);
# a signature file is an untrusted comment, base64(algorithm[2] || key number[8] || signature[64]), a trusted
# comment and base64(global signature[64]). "Ed" signs the message, "ED" its BLAKE2b-512; the global signature signs
# the signature followed by the trusted comment. Ed25519 (RFC 8032) is verified below in plain Python integers: no
# wheel, no library of the release's, is imported to decide whether the release may run.

TRUSTED_KEYS = "trusted_keys"
_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _ed_add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = 2 * _D * t1 * t2 % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _ed_mul(k, point):
    out = (0, 1, 1, 0)
    while k:
        if k & 1:
            out = _ed_add(out, point)
        point = _ed_add(point, point)
        k >>= 1
    return out


def _ed_decode(raw):
    """A point from its 32-byte encoding, or None when the bytes encode none."""
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    xx = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - xx) % _P or (x == 0 and sign):
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _ed_same(a, b):
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


_ED_BASE = _ed_decode(bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666"))


def ed25519_verify(public_key, message, signature):
    """RFC 8032 Ed25519 verification: [s]B == R + [SHA-512(R || A || M)]A, with s < L."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a, r = _ed_decode(public_key), _ed_decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    return _ed_same(_ed_mul(s, _ED_BASE), _ed_add(r, _ed_mul(h, a)))


def _key_number(raw):
    return format(int.from_bytes(raw, "little"), "X")  # as minisign prints it


def minisign_public_key(text):
    """(key id, 32-byte key) from a .pub file's text or its bare base64 line; Refused when it is not one."""
    import base64
    import binascii

    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    try:
        raw = base64.b64decode(line, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 42 or raw[:2] != b"Ed":
        raise Refused("%r is not a minisign public key (base64 \"RW...\", 56 characters)" % (line[:60],))
    return _key_number(raw[2:10]), raw[10:]


def trusted_keys(root):
    """{key id: key} of the install dir's trusted_keys/*.pub (edgepack trust, or put there by the device's owner)."""
    folder = os.path.join(root, TRUSTED_KEYS)
    keys = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".pub"):
            with open(os.path.join(folder, name)) as fh:
                kid, key = minisign_public_key(fh.read())
            keys[kid] = key
    return keys


def signature_check(directory, keys, bundle_id, sig_path=None):
    """Whether directory's edgepack.json is signed by one of `keys` over its exact bytes, naming `bundle_id`:
    {"signed": bool, "key_id": str|None, "error": str|None}. Sizes are bounded before anything is read whole.
    `sig_path`: another signature file to check (default: the folder's own)."""
    import base64
    import binascii

    manifest_path = os.path.join(directory, MANIFEST)
    sig_path = sig_path or os.path.join(directory, SIGNATURE)
    if os.path.islink(sig_path) or not os.path.isfile(sig_path):
        return {"signed": False, "key_id": None, "error": "the release is not signed (no %s)" % SIGNATURE}
    if os.path.getsize(sig_path) > 4096 or os.path.islink(manifest_path):
        return {"signed": False, "key_id": None, "error": "%s is not a minisign signature" % SIGNATURE}
    with open(sig_path, "rb") as fh:
        lines = fh.read().splitlines()
    with open(manifest_path, "rb") as fh:
        data = fh.read()
    try:
        sig = base64.b64decode(lines[1].strip(), validate=True)
        comment_line = lines[2].decode("utf-8")
        global_sig = base64.b64decode(lines[3].strip(), validate=True)
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        sig, comment_line, global_sig = b"", "", b""
    prefix = "trusted comment: "
    if len(sig) != 74 or sig[:2] not in (b"Ed", b"ED") or not comment_line.startswith(prefix) or len(global_sig) != 64:
        return {"signed": False, "key_id": None, "error": "%s is not a minisign signature" % SIGNATURE}
    kid = _key_number(sig[2:10])
    if kid not in keys:
        return {"signed": False, "key_id": kid, "error": "the release is signed by key %s, which this device does not "
                "trust (trusted: %s)" % (kid, ", ".join(sorted(keys)) or "none")}
    signed = hashlib.blake2b(data).digest() if sig[:2] == b"ED" else data
    comment = comment_line[len(prefix):]
    if not (ed25519_verify(keys[kid], signed, sig[10:])
            and ed25519_verify(keys[kid], sig[10:] + comment.encode("utf-8"), global_sig)):
        return {"signed": False, "key_id": kid, "error": "the signature does not match %s (key %s): the manifest or "
                "the signature was changed after signing" % (MANIFEST, kid)}
    expected = "edgepack bundle %s sha256:%s" % (bundle_id, hashlib.sha256(data).hexdigest())
    if comment != expected:
        return {"signed": False, "key_id": kid, "error": "the signature is valid but names another bundle (%r, "
                "expected %r)" % (comment[:200], expected)}
    return {"signed": True, "key_id": kid, "error": None}


def _admit(root, directory, require=False):
    """May this release folder be installed and run here? Every file against its manifest (nothing unlisted), the
    id its content gives, and, when the device trusts keys (or the deploying side requires it), a signature by one
    of them. Checked by this program before install.sh, before any wheel, and again at every switch."""
    check = _verify_dir(directory)
    keys = trusted_keys(root)
    out = dict(check, signed=False, key_id=None, signature_required=bool(keys) or bool(require))
    if not check["ok"]:
        return out
    if out["signature_required"]:
        if not keys:
            return dict(out, ok=False, code="signature_invalid", error="a signature is required but this device "
                        "trusts no key (%s/ is empty): pass the signer's key with --require-signature" % TRUSTED_KEYS)
        sig = signature_check(directory, keys, check["bundle_id"])
        out.update(signed=sig["signed"], key_id=sig["key_id"])
        if not sig["signed"]:
            return dict(out, ok=False, code="signature_invalid", error=sig["error"])
    elif os.path.isfile(os.path.join(directory, SIGNATURE)):
        out["signature"] = "present, not checked (this device trusts no key)"
    return out


def add_signature(install_dir, op, folder, sig_b64):
    """Give a release already on the device the signature its bundle now carries (signing does not change the id, so
    a redeploy of a bundle signed since reuses the release). Written only when it verifies against a key the device
    trusts: the files are untouched, and a signature is not one of them."""
    import base64
    import binascii

    root = _root(install_dir)
    _require_lock(root, op)
    directory = _inside(root, "releases", _folder(folder))
    try:
        data = base64.b64decode(sig_b64, validate=True)
    except (ValueError, binascii.Error):
        data = b""
    keys = trusted_keys(root)
    if not data or len(data) > 4096 or not keys:
        return {"ok": False, "written": False,
                "error": "no signature" if not data or len(data) > 4096 else "this device trusts no key to check it"}
    tmp = os.path.join(directory, "." + SIGNATURE + "." + op + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    check = signature_check(directory, keys, _verify_dir(directory)["bundle_id"], sig_path=tmp)
    if not check["signed"]:
        os.remove(tmp)
        return {"ok": False, "written": False, "error": check["error"]}
    os.replace(tmp, os.path.join(directory, SIGNATURE))
    return {"ok": True, "written": True, "key_id": check["key_id"]}


def admit(install_dir, rel, require="no"):
    """_admit for releases/<folder> (what `edgepack deploy` asks before it runs install.sh)."""
    root = _root(install_dir)
    rel = str(rel)
    if not rel.startswith("releases/"):
        raise Refused("not a release folder: %r" % (rel,))
    _folder(rel[len("releases/"):]) if not rel.endswith(".partial") else _bundle_id(rel[len("releases/"):-8])
    return _admit(root, _inside(root, rel), require == "yes")


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


OP_ENV = "EDGEPACK_OP"  # every process an operation starts carries it: how a leftover is told from a stranger


def _proc_start(pid):
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None when there is none."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _proc_marked(pid, op):
    """True when the process was started by operation `op` (its environment carries EDGEPACK_OP=op)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as fh:
            return ("%s=%s" % (OP_ENV, op)).encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _group_members(pgid):
    out = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _ours(op, pgid, start):
    """The pids of group `pgid` that operation `op` started and that still run: all of the group while its leader is
    the process recorded (same pid, same start time); else only members that carry the operation's mark. A pid a
    stranger now has is never signalled."""
    leader = _proc_start(pgid)
    if leader is not None and start is not None and leader == start:
        return [pgid] + [p for p in _group_members(pgid) if p != pgid]
    return [p for p in _group_members(pgid) if p != pgid and _proc_marked(p, op)]


def _record_pid(root, op, pid):
    with open(_pids_path(root, op), "a") as fh:
        fh.write("%d %s\n" % (pid, _proc_start(pid) or "?"))


def _kill_groups(root, op):
    """End every process an operation started (install.sh, the smoke test, a command over SSH) that still runs: only
    processes whose identity matches the record (see _ours), so a pid reused since is left alone."""
    path = _pids_path(root, op)
    try:
        with open(path) as fh:
            records = [line.split() for line in fh if line.split() and line.split()[0].isdigit()]
    except OSError:
        return []
    killed = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = sorted({p for rec in records for p in _ours(op, int(rec[0]), rec[1] if len(rec) > 1 else None)})
        for pid in targets:
            try:
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    killed.append(pid)
            except OSError:
                pass
        if sig == signal.SIGTERM and killed:
            deadline = time.time() + 5
            while time.time() < deadline and any(_proc_start(p) is not None for p in killed):
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


def _acquire(root, op, holder_json):
    """Take the install dir's flock for operation `op`, without waiting. Returns (the open lock file, None), after
    ending what a holder that died had left running; or (None, the holder's info) when another operation holds it."""
    _op(op)
    os.makedirs(os.path.join(root, ".ops"), exist_ok=True)
    fh = open(_lock_path(root), "a+")  # noqa: SIM115 (held open while the operation lives: that is the lock)
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
        fh.close()
        return None, current
    fh.seek(0)
    stale = fh.read()
    fh.seek(0)
    fh.truncate()
    info = json.loads(holder_json)
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
    return fh, previous


def _release(root, op, fh):
    """End the operation's remaining process groups, then unlock."""
    _kill_groups(root, op)
    fh.seek(0)
    fh.truncate()
    fh.flush()
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


def lock(install_dir, op, holder, ttl="60"):
    """Hold the install dir's lock while this process lives: stdin lines are heartbeats, "release" or EOF or
    `ttl` seconds of silence end it. The lock is an flock, so the kernel drops it if this process dies; on the
    way out, the operation's remaining process groups are ended, so nothing it started outlives it."""
    root = _root(install_dir)
    fh, other = _acquire(root, op, holder)
    if fh is None:
        print(json.dumps({"ok": False, "error": "locked", "holder": other}))
        return None
    print(json.dumps({"ok": True, "op": op, "stale": other}), flush=True)
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
        _release(root, op, fh)
    return None


# -- files -----------------------------------------------------------------------------------------------

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
    check = _admit(root, staging)
    if not check["ok"]:
        return {"ok": False, "code": check.get("code", "upload_mismatch"),
                "error": check.get("error") or "the staging folder does not verify", "verify": check}
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
    return {"ok": True, "folder": folder, "replaced_unused": folder == bundle_id and n > 1,
            "bundle_id": check["bundle_id"], "signed": check["signed"], "key_id": check["key_id"]}


def switch(install_dir, op, folder):
    root = _root(install_dir)
    _require_lock(root, op)
    _folder(folder)
    target = os.path.join("releases", folder)
    _inside(root, "releases", folder)
    check = _admit(root, os.path.join(root, target))
    if not check["ok"] or not check["installed"]:
        return {"ok": False, "code": check.get("code"), "verify": check,
                "error": "release %s is not complete, verified%s and installed%s"
                % (folder, ", signed by a trusted key" if check["signature_required"] else "",
                   ": " + check["error"] if check.get("error") else "")}
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
    """The supervisor's pid when the process of that pid is the one recorded (same start time), else None: after a
    crash or a reboot the pid may be a stranger's, and a stranger is never signalled."""
    try:
        with open(os.path.join(root, "service.pid")) as fh:
            record = fh.read().split()
        pid = int(record[0])
        with open("/proc/%d/stat" % pid) as fh:  # a zombie nobody reaped is not a running service
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        if len(record) > 2:
            return pid if _proc_start(pid) == record[2] else None
        with open("/proc/%d/cmdline" % pid, "rb") as fh:  # a pid file from before start times were recorded
            return pid if b"python" in fh.read() else None
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
        fh.write("%d %s %s\n" % (pid, addr, _proc_start(pid) or "?"))
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
    running = [0]
    stopping = []

    def on_term(signum, _frame):  # a plain `kill` of the supervisor stops its server too, never orphans it
        stopping.append(signum)
        if running[0]:
            with contextlib.suppress(OSError):
                os.kill(running[0], signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    while not stopping:
        child = os.fork()
        if child == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        running[0] = child
        _write_state(state, {"server_pid": child, "restarts": restarts, "last_exit": None})
        _, status = os.waitpid(child, 0)
        running[0] = 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        if code == 0 or code == -signal.SIGTERM or stopping:
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
    _write_state(state, {"server_pid": None, "restarts": restarts, "last_exit": -signal.SIGTERM})


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
    kid, _ = minisign_public_key(key_b64)
    if kid != name:
        raise Refused("trusted key %r is key %s" % (name, kid))
    d = os.path.join(root, TRUSTED_KEYS)
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


# -- a whole deploy in one process on the device: what the bundle's Ansible role runs ---------------------

INSTALL_WHY = {4: "the wheels do not fit this device's Python, or one does not match its pinned sha256",
               6: "the release does not match its manifest", 7: "the signature check failed"}
SMOKE_WHY = {1: "the model loads but misbehaves", 2: "the model does not load"}  # as bundle.SMOKE_EXIT


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
def _operation(root, kind, holder_json):
    """This process holds the install dir's lock for the block (yields the operation id); Busy if another does."""
    op = _op("%s-%s-%d-%s" % (kind, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), os.getpid(),
                             hashlib.sha256(os.urandom(8)).hexdigest()[:8]))
    fh, holder = _acquire(root, op, holder_json)
    if fh is None:
        raise Busy(root, holder)
    try:
        yield op
    finally:
        _release(root, op, fh)


def _locked_answer(root, holder):
    return {"ok": False, "code": "device_locked", "holder": holder, "current": _current(root), "switched": False,
            "error": "%s is locked by another edgepack operation: `%s` (since %s). Nothing was changed."
                     % (root, (holder or {}).get("command", "?"), (holder or {}).get("since", "?"))}


def _usable(root, bundle_id):
    """A verified copy of the release already on the device that may be used as it is, or None."""
    found = locate(root, bundle_id)["folders"]
    return next((f for f in found if f["ok"] and (f["installed"] or not f["in_use"])), None)


def stage(install_dir, bundle_id, files_json, holder_json='{"command": "stage"}'):
    """Ready releases/<id>.partial for an upload (the role's copy tasks): under the lock for a moment, create its
    folders and link in every file a release on the device already has (same sha256), then say which files are
    still to send (path, bytes). A verified copy of the release already on the device means nothing to send."""
    root = _root(install_dir)
    _bundle_id(bundle_id)
    files = [[f["path"], int(f["bytes"]), f["sha256"]] for f in json.loads(files_json)]  # the manifest's entries
    with _operation(root, "stage", holder_json) as op:
        present = _usable(root, bundle_id)
        out = {"ok": True, "install_dir": root, "bundle_id": bundle_id, "current": _current(root)}
        if present is not None:
            return dict(out, present=present["folder"], staging=None, missing=[], missing_bytes=0, reused=0,
                        reused_bytes=0, staged=len(files))
        rel = "releases/%s.partial" % bundle_id
        mkdirs(root, op, rel, *sorted({os.path.dirname(rel + "/" + f[0]) for f in files}))
        have = hashes(root, rel)
        todo = [f for f in files if have.get(f[0]) != [f[1], f[2]]]
        got = reuse(root, op, rel, json.dumps(todo)) if todo else {"reused": [], "bytes": 0}
        linked = set(got["reused"])
        missing = [{"path": f[0], "bytes": f[1]} for f in todo if f[0] not in linked]
        return dict(out, present=None, staging=os.path.join(root, rel), missing=missing,
                    missing_bytes=sum(m["bytes"] for m in missing), reused=len(linked), reused_bytes=got["bytes"],
                    staged=len(files) - len(todo))


UPLOAD_ARCHIVE = ".edgepack-upload.tar"  # the role's one transfer of a release's small files


def unpack(install_dir, bundle_id, holder_json='{"command": "unpack"}'):
    """Unpack the role's archive of small files into releases/<id>.partial, then delete it. Regular files at safe
    relative paths only; each lands under a temporary name and is renamed, so an interrupted unpack leaves whole
    files or none (apply's verify checks every byte against the manifest either way)."""
    import tarfile

    root = _root(install_dir)
    _bundle_id(bundle_id)
    rel = "releases/%s.partial" % bundle_id
    with _operation(root, "unpack", holder_json) as op:
        _require_lock(root, op)
        archive = _inside(root, rel, UPLOAD_ARCHIVE)
        if not os.path.isfile(archive):
            raise Refused("no upload archive in %s" % rel)
        done, size = 0, 0
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    raise Refused("the upload archive holds %r, which is not a regular file" % (member.name,))
                dest = _inside(root, rel, member.name)
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
    _record_pid(root, op, proc.pid)
    killed = False
    try:
        out, err = proc.communicate(timeout=float(timeout))
    except subprocess.TimeoutExpired:
        killed = True
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    text = out.decode("utf-8", "replace")
    return {"command": " ".join(argv), "exit_code": None if killed else proc.returncode, "killed": killed,
            "seconds": round(time.time() - t0, 2), "stdout": text[-20000:],
            "stderr_tail": err.decode("utf-8", "replace").splitlines()[-20:]}


def _smoke_doc(stdout, exit_code):
    """The smoke result by its contract (docs/bundle-format.md): the last JSON line with a boolean "ok"; ok only
    when it says so and the process exited 0."""
    doc = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            got = json.loads(line)
        except ValueError:
            continue
        if isinstance(got, dict) and isinstance(got.get("ok"), bool):
            doc = got
            break
    why = SMOKE_WHY.get(exit_code, "it was stopped or crashed")
    if doc is None:
        doc = {"schema": 1, "ok": False, "error": "smoke_test.py printed no result (exit %s: %s)" % (exit_code, why)}
    ok = doc["ok"] is True and exit_code == 0
    doc = dict(doc, ok=ok, exit_code=exit_code)
    if not ok and not doc.get("error"):
        doc["error"] = "smoke_test.py exited %s (%s)" % (exit_code, why)
    return doc


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
    usable = _usable(root, bundle_id)
    check_only = bool(usable and usable["in_use"])  # a live copy is never rewritten: only check its runtime
    if usable is not None:
        folder = usable["folder"]
        steps.append({"name": "verify", "reused": folder})
        if spec.get("signature"):  # a bundle signed since this copy was deployed: the copy gets its signature
            add_signature(root, op, folder, spec["signature"])
    else:
        rel = "releases/%s.partial" % bundle_id
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
    release = os.path.join(_releases_dir(root), folder) if folder else _inside(root, "releases",
                                                                               bundle_id + ".partial")
    admitted = _admit(root, release, require)
    steps.append({"name": "signature", "required": admitted["signature_required"], "signed": admitted["signed"],
                  "key_id": admitted["key_id"]})
    if not admitted["ok"]:
        raise Failed(admitted.get("code") or "upload_mismatch", "the device refused the release: %s"
                     % admitted.get("error"), verify=admitted)
    if admitted["bundle_id"] != bundle_id:
        raise Failed("upload_mismatch", "the release on the device is %s, not the %s that was asked for"
                     % (admitted["bundle_id"], bundle_id))
    if folder is None:
        pub = publish(root, op, bundle_id)
        if not pub.get("ok"):
            raise Failed(pub.get("code") or "device_refused", "could not publish the release: %s" % pub.get("error"),
                         publish=pub)
        folder = pub["folder"]
    release = os.path.join(_releases_dir(root), folder)
    argv = ["sh", os.path.join(release, "install.sh")] + (["--allow-network"] if spec.get("allow_network") else [])
    res = _run_step(root, op, argv, dict(env, EDGEPACK_VENV=os.path.join(release, ".venv"),
                                         **({"EDGEPACK_CHECK_ONLY": "1"} if check_only else {})), 900)
    steps.append({"name": "install", "exit_code": res["exit_code"], "seconds": res["seconds"]})
    if res["exit_code"] != 0:
        if check_only:
            raise Failed("install_failed", "the live copy releases/%s has no working runtime (exit %s) and no fresh "
                         "copy was uploaded" % (folder, res["exit_code"]), install=res)
        raise Failed("signature_invalid" if res["exit_code"] == 7 else "install_failed",
                     "install.sh failed (exit %s%s)" % (res["exit_code"], ": " + INSTALL_WHY[res["exit_code"]]
                                                        if res["exit_code"] in INSTALL_WHY else ""), install=res)
    res = _run_step(root, op, [os.path.join(release, ".venv", "bin", "python"), os.path.join(release, "smoke_test.py"),
                               "--tokens", str(int(spec.get("smoke_tokens", 16)))], {}, 900)
    smoke = _smoke_doc(res["stdout"], -1 if res["exit_code"] is None else res["exit_code"])
    steps.append({"name": "smoke", "ok": smoke["ok"], "seconds": res["seconds"]})
    if not smoke["ok"]:
        raise Failed("smoke_test_failed", "the smoke test failed: %s" % smoke.get("error"), smoke=smoke,
                     evidence={"command": res["command"], "exit_code": res["exit_code"],
                               "stderr_tail": res["stderr_tail"]})
    sw = switch(root, op, folder)
    if not sw.get("ok"):
        raise Failed("device_refused", "the device refused the switch: %s" % sw.get("error"), switch=sw)
    live["switched_to"] = folder
    steps.append({"name": "switch", "current": folder, "previous": sw.get("previous")})
    service, check = "none (the target runs no service)", None
    if spec.get("service"):
        service, check = _service(root, op, spec, live)
        steps.append({"name": "service", "how": service})
    pr = prune(root, op, spec.get("keep", 3))
    steps.append({"name": "prune", "removed": pr["removed"]})
    return {"ok": True, "bundle_id": bundle_id, "release_folder": folder, "smoke": smoke, "service": service,
            "service_check": check, "pruned": pr["removed"]}


def _live_sentence(root, live):
    if live["switched_to"]:
        return ("The switch was done: `current` points at releases/%s (it passed its smoke test); a rollback "
                "returns to %s." % (live["switched_to"], live["previous"] or "nothing (it was the first release)"))
    return "`current` was not changed: it still points at %s." % (
        "releases/" + live["previous"] if live["previous"] else "nothing (no release was live)")


def apply(install_dir, spec_json):
    """Everything after the upload, in this one process under the install dir's lock: verify every sha256 (or
    reuse a verified copy) → publish → install.sh (offline, hash-pinned, signature check) → smoke test → atomic
    switch → service restart and check (switch back on failure) → keep N. The same helper functions as `edgepack
    deploy` runs over SSH, so the same invariant: `current` names a complete, verified, installed release."""
    spec = json.loads(spec_json)
    root = _root(install_dir)
    bundle_id = _bundle_id(spec["bundle_id"])
    live = {"previous": _current(root), "switched_to": None}
    steps = []
    with _operation(root, "apply", json.dumps(spec.get("holder") or {"command": "apply " + bundle_id})) as op:
        live["previous"] = _current(root)
        try:
            out = _apply(root, op, bundle_id, spec, live, steps)
        except Failed as exc:
            out = dict(exc.evidence, ok=False, code=exc.code,
                       error="%s. %s" % (exc.message, _live_sentence(root, live)))
    return dict(out, install_dir=root, current=_current(root), previous=live["previous"],
                switched=bool(live["switched_to"]), steps=steps)


def rollback_now(install_dir, holder_json='{"command": "rollback"}'):
    """`rollback` under the install dir's lock, taken and released in this process (the role's rollback)."""
    root = _root(install_dir)
    with _operation(root, "rollback", holder_json) as op:
        res = rollback(root, op)
    return dict(res, code=None if res.get("ok") else "rollback_unavailable", install_dir=root)


COMMANDS = {"facts": facts, "lock": lock, "hashes": hashes, "admit": admit, "add_signature": add_signature,
            "mkdirs": mkdirs, "reuse": reuse,
            "verify": verify,
            "remove_extra": remove_extra, "locate": locate, "publish": publish, "switch": switch, "status": status,
            "rollback": rollback, "prune": prune, "install_unit": install_unit, "trust": trust,
            "service_start": service_start, "service_stop": service_stop, "service_check": service_check,
            "service_status": service_status, "stage": stage, "unpack": unpack, "apply": apply,
            "rollback_now": rollback_now}


def main(argv):
    cmd, args = argv[0], argv[1:]
    try:
        result = COMMANDS[cmd](*args)
    except Refused as exc:
        print(json.dumps({"ok": False, "refused": True, "error": str(exc)}))
        sys.exit(3)
    except Busy as exc:
        print(json.dumps(_locked_answer(exc.root, exc.holder)))
        sys.exit(1)
    if result is not None:
        print(json.dumps(result))
        if cmd in ("stage", "apply", "rollback_now") and not result.get("ok"):
            sys.exit(1)  # Ansible's task fails; the JSON says why


if __name__ == "__main__":
    main(sys.argv[1:])
