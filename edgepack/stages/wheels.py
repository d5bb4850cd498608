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


def vendor_wheels(target: TargetProfile, reqs: list[str], dest: Path, *,
                  progress: ProgressFn = silent) -> list[str]:
    if not reqs:
        return []
    py = target.resolved_python()
    platforms = list(target.device.wheel_platforms)
    key = hashlib.sha256(repr((sorted(reqs), py, platforms, platform.machine())).encode()).hexdigest()[:16]
    cache = cache_root() / "wheels" / key
    if not (cache / ".complete").is_file():
        progress(ProgressEvent("wheels", f"downloading {', '.join(reqs)} for "
                                         f"{platforms[0] if platforms else 'this machine'}, Python {py}"))
        tmp = cache.with_name(cache.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
               "--only-binary=:all:", "--dest", str(tmp)]
        if platforms:
            abi = "cp" + py.replace(".", "")
            cmd += ["--python-version", py, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                    "--abi", "none"]
            for tag in platforms:
                cmd += ["--platform", tag]
        cmd += reqs
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"could not download the runtime wheels for target '{target.id}' "
                f"(Python {py}, {platforms[0] if platforms else 'native'}).",
                hint="Check that the build machine reaches the package index (or a mirror via PIP_INDEX_URL), "
                     "or build with --no-wheels and let the device install from its own index.",
                command=" ".join(cmd), stderr_tail=proc.stderr.splitlines()[-8:])
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for whl in sorted(cache.glob("*.whl")):
        shutil.copy2(whl, dest / whl.name)
        names.append(whl.name)
    return names
