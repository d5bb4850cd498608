"""Vendor the runtime's wheels for the target's platform and Python, so the device installs offline.

Downloads land in the wheel cache with the sha256 of every wheel recorded when they arrived (pip has checked each
against the sha256 the index publishes in its link, as PyPI does for every file); every reuse checks the wheels
against that record, and a folder that does not match is discarded and downloaded again.
"""

from __future__ import annotations

import hashlib
import json
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
RECORD = ".complete"  # in a wheel cache folder: what was asked, and every wheel's sha256 when it was downloaded


def requirements(target: TargetProfile, versions: dict[str, str]) -> list[str]:
    """The runtime packages, pinned to the versions the build validated with, and the signature verifier the
    device's install step runs (py-minisign, pinned to the version this edgepack signs with)."""
    from edgepack.versions import installed_versions

    reqs = [f"{pkg}=={versions[pkg]}" if pkg in versions else pkg for pkg in target.runtime.packages]
    verifier = installed_versions("py-minisign").get("py-minisign")
    return reqs + ([f"py-minisign=={verifier}"] if verifier else [])


_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def lock_entry_name(file: str, sha256: str = "") -> LockedWheel:
    """A lock entry from a wheel's file name and a sha256 taken elsewhere."""
    m = _WHEEL_RE.match(file)
    if m is None:
        raise UserError(f"{file} is not a wheel file name.", hint="Clear the wheel cache: edgepack cache clear "
                                                                  "--kind wheels.")
    return LockedWheel(file=file, name=m["name"].replace("_", "-").lower(), version=m["version"], sha256=sha256)


def lock_entry(whl: Path) -> LockedWheel:
    return lock_entry_name(whl.name, sha256_file(whl))


def write_lock(entries: list[LockedWheel], path: Path) -> None:
    """pip's hash-checking requirements format: install.sh runs `pip install --require-hashes -r` on it.
    Replaced in one rename: a deploy reading the lock of a shared cache folder never sees half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_text("".join(f"{e.name}=={e.version} --hash=sha256:{e.sha256}\n" for e in entries))
    os.replace(tmp, path)


def manylinux_tags(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag a device with this glibc accepts, newest first (pip matches tags exactly)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


def _recorded(folder: Path) -> dict[str, str] | None:
    try:
        files = json.loads((folder / RECORD).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) and files else None


def _check_folder(folder: Path) -> tuple[dict[str, str], str]:
    """(the wheels' recorded sha256 by file name, '' when the folder holds exactly those bytes, else why not)."""
    from edgepack.cache import mismatch

    recorded = _recorded(folder)
    if recorded is None:
        return {}, "it records no sha256 of its wheels"
    return recorded, mismatch(recorded, {w.name: sha256_file(w) for w in folder.glob("*.whl")})


def download_wheels(reqs: list[str], python: str, platforms: list[str], *, what: str,
                    progress: ProgressFn = silent, no_deps: bool = False) -> tuple[Path, dict[str, str]]:
    """pip download (binary only) into a cache folder keyed by what was asked; returns the folder and the sha256
    of each wheel in it, as recorded when they were downloaded and checked again now."""
    from edgepack.cache import discard

    key = hashlib.sha256(repr((sorted(reqs), python, platforms, platform.machine(), no_deps)).encode()).hexdigest()[:16]
    cache = cache_root() / "wheels" / key
    if (cache / RECORD).exists():
        recorded, why = _check_folder(cache)
        if not why:
            return cache, recorded
        progress(ProgressEvent("wheels", f"the wheel cache's copy of {', '.join(reqs)} was discarded: {why}; "
                                         "downloading them again"))
        discard(cache)
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
    hashes = {w.name: sha256_file(w) for w in sorted(tmp.glob("*.whl"))}
    (tmp / RECORD).write_text(json.dumps({"requested": reqs, "files": hashes}, indent=1, sort_keys=True) + "\n",
                              encoding="utf-8")
    try:
        tmp.rename(cache)
    except OSError:  # another build finished the same download first: keep theirs, drop ours
        shutil.rmtree(tmp, ignore_errors=True)
        theirs, why = _check_folder(cache)
        if why:
            raise UserError(f"the wheel cache's copy of {', '.join(reqs)} does not match what was downloaded: {why}.",
                            hint="Run the same command again (the folder is replaced).", path=cache) from None
        return cache, theirs
    return cache, hashes


def vendor_wheels(target: TargetProfile, reqs: list[str], dest: Path, *,
                  progress: ProgressFn = silent) -> list[LockedWheel]:
    """Copy the wheels for the target into `dest` and write their lock beside them."""
    if not reqs:
        return []
    cache, hashes = download_wheels(reqs, target.resolved_python(), list(target.device.wheel_platforms),
                                    what=f"target '{target.id}'", progress=progress)
    dest.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in sorted(hashes):
        shutil.copy2(cache / name, dest / name)
        entry = lock_entry(dest / name)  # the copy the bundle ships, hashed again: it must be the recorded bytes
        if entry.sha256 != hashes[name]:
            raise UserError(f"{name} changed in the wheel cache while it was copied into the bundle.",
                            hint="Run the build again.", path=cache / name)
        entries.append(entry)
    write_lock(entries, dest / LOCK)
    return entries


def wheels_for(lock: list[LockedWheel], reqs: list[str], python: str, platforms: list[str], *, what: str,
               progress: ProgressFn = silent) -> tuple[Path, list[LockedWheel], list[str]]:
    """The bundle's lock for another Python: the same version of every wheel where that Python has it, else
    (a dependency that dropped this Python, like numpy 2.3+ for 3.11) the top-level pins resolved again.
    Downloaded, hashed and locked here; returns (folder, lock, the versions that differ from the bundle's).

    `lock` is the bundle's signed lock: a wheel file it names (pure-Python and abi3 wheels are the same file for
    every Python) must be those very bytes, whatever the index serves. The other wheels are the files pip checked
    against the index's published sha256 when they were downloaded; the lock written here pins that sha256, so
    the device's `pip --require-hashes` installs exactly the files hashed here."""
    from edgepack.cache import discard

    try:
        cache, hashes = download_wheels([f"{e.name}=={e.version}" for e in lock], python, platforms, what=what,
                                        progress=progress, no_deps=True)
    except UserError:
        progress(ProgressEvent("wheels", f"not every locked version has a wheel for Python {python}; resolving "
                                         f"the pinned runtime ({', '.join(reqs)}) for it instead"))
        cache, hashes = download_wheels(reqs, python, platforms, what=what, progress=progress)
    signed = {e.file: e.sha256 for e in lock}
    for name, sha in sorted(hashes.items()):
        if name in signed and signed[name] != sha:
            discard(cache)
            raise UserError(f"the package index served {name} with sha256 {sha[:16]}…, but the bundle's signed lock "
                            f"pins that file at {signed[name][:16]}…; not sending it to {what}.",
                            hint="Check the index (PIP_INDEX_URL) or the mirror in between; or build the bundle "
                                 "for the device's Python.", path=name, expected=signed[name], found=sha)
    entries = [lock_entry_name(name, sha) for name, sha in sorted(hashes.items())]
    write_lock(entries, cache / LOCK)
    was = {e.name: e.version for e in lock}
    differ = [f"{e.name} {was[e.name]} -> {e.version}" for e in entries if was.get(e.name, e.version) != e.version]
    return cache, entries, differ
