"""An emulated Raspberry Pi: a Debian bookworm arm64 userland under qemu-user, with its own sshd.

Built once with debootstrap (~3 min) and cached as a tarball outside the checkout (EDGEPACK_PI_CACHE, default
/var/cache/edgepack-tests), unpacked per test session in ~2 s. Needs root, binfmt_misc and Debian's
qemu-user-static, binfmt-support and debootstrap (`.ci/run` installs them). Two traps handled here: qemu-user
shows the host's x86 /proc/cpuinfo, on which onnxruntime's CPU detection crashes at import, so an aarch64
(Cortex-A76) cpuinfo is bind-mounted over it; and emulation is ~30× slower, so tests generate few tokens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
PACKAGES = "python3,python3-venv,openssh-server,ca-certificates"
ROOTFS_VERSION = "v1"

CPUINFO_A76 = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    for i in range(4))


# A Raspberry Pi 4's kernel reports only these (no LSE atomics, no dotprod, no fp16 arithmetic).
CPUINFO_A72 = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
    for i in range(4))
CPUINFO = {"cortex-a76": CPUINFO_A76, "cortex-a72": CPUINFO_A72}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPACK_PI_CACHE", "/var/cache/edgepack-tests"))


def why_unavailable() -> str | None:
    """None when an emulated Pi can be made here; else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (chroot, mounts)"
    for tool in ("debootstrap", "chroot"):
        if not shutil.which(tool):
            return f"needs {tool} (apt install debootstrap qemu-user-static binfmt-support)"
    status = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not status.exists():
        subprocess.run(["mount", "binfmt_misc", "-t", "binfmt_misc", "/proc/sys/fs/binfmt_misc"],
                       capture_output=True, check=False)
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, check=False)
    if not status.exists() or "enabled" not in status.read_text():
        return "binfmt_misc for aarch64 cannot be enabled on this machine"
    return None


def rootfs_tarball() -> Path:
    tar = cache_dir() / f"rpi-bookworm-arm64-{ROOTFS_VERSION}.tar.gz"
    if tar.is_file():
        return tar
    cache_dir().mkdir(parents=True, exist_ok=True)
    work = cache_dir() / "rootfs.partial"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                    str(work), MIRROR], check=True, capture_output=True, timeout=1800)
    # pip inside the device verifies TLS with the host's CA bundle (only used with --allow-network).
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", work / "etc/ssl/certs/ca-certificates.crt")
    tmp = tar.with_suffix(".partial")
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tf:
        tf.add(work, arcname=".")
    tmp.rename(tar)
    shutil.rmtree(work, ignore_errors=True)
    return tar


def _with_qemu_cpu(sshd_extra: str, cpu: str) -> str:
    """sshd takes the first SetEnv line only: add QEMU_CPU to it, or make one."""
    if "SetEnv " in sshd_extra:
        return "".join(line.rstrip("\n") + f" QEMU_CPU={cpu}\n" if line.startswith("SetEnv ") else line
                       for line in sshd_extra.splitlines(keepends=True))
    return sshd_extra + f"SetEnv QEMU_CPU={cpu}\n"


def _kill_chrooted(root: Path) -> None:
    """Every process whose root is this device's rootfs (a supervised service outlives its SSH session)."""
    import signal

    real = os.path.realpath(root)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.path.realpath(f"/proc/{pid}/root") == real:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@contextlib.contextmanager
def emulated_pi(root: Path, user_pubkey: Path, host_key: Path, port: int, sshd_extra: str = "",
                cpu: str = "cortex-a76", python: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """Unpack the rootfs into `root`, mount what sshd and Python need, run sshd inside on 127.0.0.1:port.
    sshd_extra: more sshd_config lines (e.g. SetEnv to make sessions look like Termux's). cpu: the CPU qemu-user
    emulates for every process of the device (QEMU_CPU, also set in each SSH session, so AT_HWCAP and the
    instructions that trap are that CPU's; without it qemu emulates "max", which has every feature). python=False:
    the same userland with Python removed, as a firmware image without it."""
    subprocess.run(["tar", "xzf", str(rootfs_tarball()), "-C", str(root)], check=True)
    if not python:
        for p in [*(root / "usr" / "bin").glob("python3*"), *(root / "usr" / "lib").glob("python3*")]:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    mounts: list[Path] = []

    def bind(src: str, dst: Path, *extra: str) -> None:
        subprocess.run(["mount", *extra, "--bind", src, str(dst)], check=True)
        mounts.append(dst)

    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        mounts.append(root / "proc")
        (root / "cpuinfo.emulated").write_text(CPUINFO[cpu])
        bind(str(root / "cpuinfo.emulated"), root / "proc" / "cpuinfo")
        bind("/dev", root / "dev")
        # LiteRT-LM's tcmalloc counts CPUs from /sys and aborts without it (a real device has it).
        (root / "sys").mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "sysfs", "sysfs", str(root / "sys")], check=True)
        mounts.append(root / "sys")
        (root / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        ssh = root / "root" / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True)
        shutil.copy(user_pubkey, ssh / "authorized_keys")
        shutil.copy(host_key, root / "etc/ssh/edgepack_host_key")
        (root / "etc/ssh/edgepack_host_key").chmod(0o600)
        (root / "etc/ssh/sshd_edgepack").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/edgepack_host_key\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n" + _with_qemu_cpu(sshd_extra, cpu))
        proc = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_edgepack"],
                                stdout=(root / "sshd.log").open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "QEMU_CPU": cpu})
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait()
            subprocess.run(["pkill", "-9", "-f", "sshd_edgepack"], check=False)
            _kill_chrooted(root)  # what the device started in its own session: the model service, say
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], check=False)
