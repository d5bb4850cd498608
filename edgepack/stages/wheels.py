"""Vendor the runtime's wheels for the target's platform and Python, so the device installs offline."""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from edgepack.errors import UserError
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.resources import cache_root
from edgepack.targets import TargetProfile


def requirements(target: TargetProfile, versions: dict[str, str]) -> list[str]:
    """The runtime packages, pinned to the versions the build validated with."""
    return [f"{pkg}=={versions[pkg]}" if pkg in versions else pkg for pkg in target.runtime.packages]


def manylinux_tags(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag a device with this glibc accepts, newest first (pip matches tags exactly)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


def download_wheels(reqs: list[str], python: str, platforms: list[str], *, what: str,
                    progress: ProgressFn = silent) -> Path:
    """pip download (binary only) into a cache folder keyed by what was asked; returns the folder."""
    key = hashlib.sha256(repr((sorted(reqs), python, platforms, platform.machine())).encode()).hexdigest()[:16]
    cache = cache_root() / "wheels" / key
    if (cache / ".complete").is_file():
        return cache
    progress(ProgressEvent("wheels", f"downloading {', '.join(reqs)} for "
                                     f"{platforms[0] if platforms else 'this machine'}, Python {python}"))
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--only-binary=:all:", "--dest", str(tmp)]
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
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache


def vendor_wheels(target: TargetProfile, reqs: list[str], dest: Path, *,
                  progress: ProgressFn = silent) -> list[str]:
    if not reqs:
        return []
    cache = download_wheels(reqs, target.resolved_python(), list(target.device.wheel_platforms),
                            what=f"target '{target.id}'", progress=progress)
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for whl in sorted(cache.glob("*.whl")):
        shutil.copy2(whl, dest / whl.name)
        names.append(whl.name)
    return names
