"""Vendor the runtime's wheels for the target's platform and Python, so the device installs offline."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from edgepack.bundle import LockedWheel
from edgepack.errors import UserError
from edgepack.fsutil import sha256_file
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.resources import cache_root
from edgepack.targets import TargetProfile

LOCK = "requirements.lock"  # in wheels/: every vendored wheel, name==version --hash=sha256:..., for pip


def requirements(target: TargetProfile, versions: dict[str, str]) -> list[str]:
    """The runtime packages, pinned to the versions the build validated with, and the signature verifier the
    device's install step runs (py-minisign, pinned to the version this edgepack signs with)."""
    from edgepack.versions import installed_versions

    reqs = [f"{pkg}=={versions[pkg]}" if pkg in versions else pkg for pkg in target.runtime.packages]
    verifier = installed_versions("py-minisign").get("py-minisign")
    return reqs + ([f"py-minisign=={verifier}"] if verifier else [])


_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def lock_entry(whl: Path) -> LockedWheel:
    m = _WHEEL_RE.match(whl.name)
    if m is None:
        raise UserError(f"{whl.name} is not a wheel file name.", hint="Clear the wheel cache: edgepack's cache "
                                                                       "dir, wheels/.")
    return LockedWheel(file=whl.name, name=m["name"].replace("_", "-").lower(), version=m["version"],
                       sha256=sha256_file(whl))


def write_lock(entries: list[LockedWheel], path: Path) -> None:
    """pip's hash-checking requirements format: install.sh runs `pip install --require-hashes -r` on it."""
    path.write_text("".join(f"{e.name}=={e.version} --hash=sha256:{e.sha256}\n" for e in entries))


def manylinux_tags(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag a device with this glibc accepts, newest first (pip matches tags exactly)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


def download_wheels(reqs: list[str], python: str, platforms: list[str], *, what: str,
                    progress: ProgressFn = silent, no_deps: bool = False) -> Path:
    """pip download (binary only) into a cache folder keyed by what was asked; returns the folder."""
    key = hashlib.sha256(repr((sorted(reqs), python, platforms, platform.machine(), no_deps)).encode()).hexdigest()[:16]
    cache = cache_root() / "wheels" / key
    if (cache / ".complete").is_file():
        return cache
    progress(ProgressEvent("wheels", f"downloading {', '.join(reqs)} for "
                                     f"{platforms[0] if platforms else 'this machine'}, Python {python}"))
    # A folder of our own: parallel builds never share (or publish) each other's half-downloads.
    tmp = cache.with_name(f"{cache.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--only-binary=:all:", "--dest", str(tmp)] + (["--no-deps"] if no_deps else [])
    if platforms:
        abi = "cp" + python.replace(".", "")
        cmd += ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
        for tag in platforms:
            cmd += ["--platform", tag]
    cmd += reqs
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not download the runtime wheels for {what} (Python {python}, "
            f"{platforms[0] if platforms else 'native'}).",
            hint="Check that this machine reaches the package index (or a mirror via PIP_INDEX_URL), and that "
                 "the runtime publishes wheels for that Python; or build with --no-wheels.",
            command=" ".join(cmd), stderr_tail=proc.stderr.splitlines()[-8:])
    (tmp / ".complete").write_text("\n".join(reqs) + "\n")
    try:
        tmp.rename(cache)
    except OSError:  # another build finished the same download first: keep theirs, drop ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / ".complete").is_file():
            raise
    return cache


def vendor_wheels(target: TargetProfile, reqs: list[str], dest: Path, *,
                  progress: ProgressFn = silent) -> list[LockedWheel]:
    """Copy the wheels for the target into `dest` and write their lock beside them."""
    if not reqs:
        return []
    cache = download_wheels(reqs, target.resolved_python(), list(target.device.wheel_platforms),
                            what=f"target '{target.id}'", progress=progress)
    dest.mkdir(parents=True, exist_ok=True)
    entries = []
    for whl in sorted(cache.glob("*.whl")):
        shutil.copy2(whl, dest / whl.name)
        entries.append(lock_entry(dest / whl.name))
    write_lock(entries, dest / LOCK)
    return entries


def wheels_for(lock: list[LockedWheel], reqs: list[str], python: str, platforms: list[str], *, what: str,
               progress: ProgressFn = silent) -> tuple[Path, list[LockedWheel], list[str]]:
    """The bundle's lock for another Python: the same version of every wheel where that Python has it, else
    (a dependency that dropped this Python, like numpy 2.3+ for 3.11) the top-level pins resolved again.
    Downloaded, hashed and locked here; returns (folder, lock, the versions that differ from the bundle's)."""
    try:
        cache = download_wheels([f"{e.name}=={e.version}" for e in lock], python, platforms, what=what,
                                progress=progress, no_deps=True)
    except UserError:
        progress(ProgressEvent("wheels", f"not every locked version has a wheel for Python {python}; resolving "
                                         f"the pinned runtime ({', '.join(reqs)}) for it instead"))
        cache = download_wheels(reqs, python, platforms, what=what, progress=progress)
    entries = [lock_entry(w) for w in sorted(cache.glob("*.whl"))]
    write_lock(entries, cache / LOCK)
    was = {e.name: e.version for e in lock}
    differ = [f"{e.name} {was[e.name]} -> {e.version}" for e in entries if was.get(e.name, e.version) != e.version]
    return cache, entries, differ
