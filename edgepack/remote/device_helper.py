# This file runs ON THE DEVICE, fed to `python3 - <command> ...` over SSH stdin: nothing is written to the
# device to run it. Standard library only; Python 3.7+. Every command prints exactly one JSON document.
import hashlib
import json
import os
import platform
import shutil
import sys

MANIFEST = "edgepack.json"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def facts(install_dir, check_cuda="no"):
    install_dir = os.path.abspath(os.path.expanduser(install_dir))
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
        "free_bytes": st.f_bavail * st.f_frsize,
        "mem_available_bytes": mem,
        "writable": os.access(parent, os.W_OK),
        "systemd_user": bool(shutil.which("systemctl")) and bool(os.environ.get("XDG_RUNTIME_DIR")),
        "termux": "com.termux" in prefix or bool(os.environ.get("TERMUX_VERSION")),
        "nv_tegra_release": _first_line("/etc/nv_tegra_release"),
        "genai_cuda": _genai_cuda() if check_cuda == "cuda" else None,
    }


def _has_venv():
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return False
    return True


def hashes(directory):
    out = {}
    if os.path.isdir(directory):
        for root, dirs, files in os.walk(directory):
            dirs[:] = [d for d in dirs if d not in (".venv", "__pycache__", ".cache")]
            for name in files:
                p = os.path.join(root, name)
                rel = os.path.relpath(p, directory).replace(os.sep, "/")
                out[rel] = [os.path.getsize(p), _sha256(p)]
    return out


def verify(directory):
    with open(os.path.join(directory, MANIFEST)) as fh:
        manifest = json.load(fh)
    have = hashes(directory)
    have.pop(MANIFEST, None)
    listed = {f["path"]: f for f in manifest["files"]}
    missing = sorted(p for p in listed if p not in have)
    changed = sorted(p for p, f in listed.items() if p in have and have[p] != [f["bytes"], f["sha256"]])
    extra = sorted(p for p in have if p not in listed)
    return {"ok": not (missing or changed or extra), "missing": missing, "changed": changed, "extra": extra,
            "bundle_id": manifest.get("bundle_id")}


def _releases(install_dir):
    rel = os.path.join(install_dir, "releases")
    if not os.path.isdir(rel):
        return []
    names = [n for n in os.listdir(rel) if not n.endswith(".partial") and not n.startswith(".")]
    return sorted(names, key=lambda n: os.path.getmtime(os.path.join(rel, n)))


def _current(install_dir):
    link = os.path.join(install_dir, "current")
    if os.path.islink(link):
        return os.path.basename(os.readlink(link))
    return None


def _history(install_dir):
    path = os.path.join(install_dir, "history")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [line.strip() for line in fh if line.strip()]


def switch(install_dir, bundle_id):
    install_dir = os.path.abspath(os.path.expanduser(install_dir))
    target = os.path.join("releases", bundle_id)
    if not os.path.isdir(os.path.join(install_dir, target)):
        raise SystemExit(json.dumps({"ok": False, "error": "no release %s" % bundle_id}))
    previous = _current(install_dir)
    tmp = os.path.join(install_dir, ".current.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, os.path.join(install_dir, "current"))  # rename(2): atomic, `current` is never missing
    hist = _history(install_dir)
    if not hist or hist[-1] != bundle_id:
        hist.append(bundle_id)
    with open(os.path.join(install_dir, "history.tmp"), "w") as fh:
        fh.write("\n".join(hist[-50:]) + "\n")
    os.replace(os.path.join(install_dir, "history.tmp"), os.path.join(install_dir, "history"))
    return {"ok": True, "current": bundle_id, "previous": previous}


def status(install_dir):
    install_dir = os.path.abspath(os.path.expanduser(install_dir))
    return {"install_dir": install_dir, "current": _current(install_dir), "releases": _releases(install_dir),
            "history": _history(install_dir)[-10:],
            "partial": sorted(n for n in os.listdir(os.path.join(install_dir, "releases"))
                              if n.endswith(".partial")) if os.path.isdir(os.path.join(install_dir, "releases"))
            else []}


def rollback(install_dir):
    install_dir = os.path.abspath(os.path.expanduser(install_dir))
    current = _current(install_dir)
    present = set(_releases(install_dir))
    for bundle_id in reversed(_history(install_dir)):
        if bundle_id != current and bundle_id in present:
            result = switch(install_dir, bundle_id)
            # Drop the rolled-back release from the tail of history so a second rollback goes further back.
            hist = [h for h in _history(install_dir) if h != current] if current else _history(install_dir)
            with open(os.path.join(install_dir, "history"), "w") as fh:
                fh.write("\n".join(hist) + "\n")
            return result
    return {"ok": False, "error": "no earlier release on the device to roll back to", "current": current}


def prune(install_dir, keep):
    install_dir = os.path.abspath(os.path.expanduser(install_dir))
    keep = max(int(keep), 1)
    current = _current(install_dir)
    hist = _history(install_dir)
    protected = {current, hist[-2] if len(hist) > 1 else None}
    removed = []
    releases = _releases(install_dir)
    for name in releases[: max(len(releases) - keep, 0)]:
        if name not in protected:
            shutil.rmtree(os.path.join(install_dir, "releases", name), ignore_errors=True)
            removed.append(name)
    return {"ok": True, "removed": removed, "kept": [r for r in releases if r not in removed]}


def main(argv):
    cmd, args = argv[0], argv[1:]
    fn = {"facts": facts, "hashes": hashes, "verify": verify, "switch": switch, "status": status,
          "rollback": rollback, "prune": prune}[cmd]
    print(json.dumps(fn(*args)))


if __name__ == "__main__":
    main(sys.argv[1:])
