"""What the device is: OS, architecture, CPU features (AT_HWCAP), Python and its venv, glibc, disk, memory,
systemd, CUDA; read only."""

import os
import platform
import shutil
import sys

from .rules import install_root


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
    install_dir = install_root(install_dir)
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
