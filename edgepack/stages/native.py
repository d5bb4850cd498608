"""Native stage: the bundle's runtime from C (`native/`), for firmware that links the model into its own program.

The runtime's shared libraries come out of the same pinned wheels the build validated with (for the target's
platform), beside a C header written for this project, `edgepack-chat` (a small C program: run.py's command line
and JSON, and the golden smoke check) compiled for the target's ISA, its source, a CMakeLists.txt and a pkg-config
file. Where no C compiler for the target is found, or the one found needs a newer glibc than the target's, the
program is left out (the rest stays, the manifest says why, and CMake builds it in the firmware's own toolchain).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.backends.base import NativeLibrary
from edgepack.errors import UserError
from edgepack.fsutil import sha256_file
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.resources import shipped_dir
from edgepack.targets import TargetProfile

FOLDER = "native"
PROGRAM = "edgepack-chat"
PKG_CONFIG = "edgepack-runtime.pc"
# templates/_native/<runtime>/ holds the runtime's C sources (copied as they are); _shared/ what is rendered
RENDERED = {"edgepack_bundle.h.j2": "edgepack_bundle.h", "CMakeLists.txt.j2": "CMakeLists.txt",
            "edgepack-runtime.pc.j2": PKG_CONFIG, "README.md.j2": "README.md"}
# The flags the build compiles with, and CMakeLists.txt too: the program finds its libraries beside itself
# ($ORIGIN) and links libonnxruntime.so.1 even though it calls none of it, so onnxruntime-genai, which dlopens
# onnxruntime, finds the copy already loaded (no ORT_LIB_PATH, no LD_LIBRARY_PATH).
CFLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra")
LDFLAGS = ("-Wl,-rpath,$ORIGIN", "-Wl,--allow-shlib-undefined", "-pthread", "-s")


@dataclass(frozen=True)
class Toolchain:
    cc: str
    version: str  # the first line of `cc --version`


@dataclass(frozen=True)
class NativePack:
    """The manifest's "native" section (docs/bundle-format.md)."""

    runtime: str
    arch: str
    libraries: list[dict[str, Any]]
    program: str | None = None  # native/edgepack-chat, None where it could not be compiled here
    why_no_program: str = ""
    compiler: str = ""
    glibc_required: str = ""  # the newest GLIBC_x.y symbol version the program needs
    files: list[str] = field(default_factory=list)
    bytes: int = 0


def applies(target: TargetProfile, libs: tuple[NativeLibrary, ...]) -> bool:
    """native/ is taken from the wheels edgepack vendors: not for a runtime the device brings itself (the Jetson
    profile's CUDA onnxruntime-genai from JetPack: runtime.packages is empty)."""
    vendored = {p.split("==")[0].strip().lower().replace("_", "-") for p in target.runtime.packages}
    return bool(libs) and {lib.package for lib in libs} <= vendored


def toolchain(arch: str) -> Toolchain | None:
    """A C compiler that makes programs for `arch`: EDGEPACK_CC_<ARCH> if set; else, for this machine's arch, CC,
    cc or gcc; else the GNU cross compiler `<arch>-linux-gnu-gcc` (Debian: apt install gcc-<arch>-linux-gnu)."""
    explicit = os.environ.get(f"EDGEPACK_CC_{arch.upper()}")
    if explicit:
        names = [explicit]
    elif arch == platform.machine():
        names = [n for n in (os.environ.get("CC"), "cc", "gcc") if n]
    else:
        names = [f"{arch}-linux-gnu-gcc"]
    for name in names:
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
            return Toolchain(path, (out.splitlines() or [name])[0].strip())
    return None


def _extract(lock_dir: Path, wheels: dict[str, str], lib: NativeLibrary, dest: Path) -> dict[str, Any]:
    """Copy `lib` out of its wheel in `lock_dir` into dest/lib.name; its manifest entry."""
    from edgepack.stages.sbom import wheel_license
    from edgepack.stages.wheels import lock_entry_name

    whl = next((w for w in sorted(wheels) if lock_entry_name(w).name == lib.package), None)
    if whl is None:
        raise UserError(f"the wheels for this target have no {lib.package}, whose {lib.name} native/ needs.",
                        hint="Add it to runtime.packages, or build with --no-native.", package=lib.package)
    pattern = re.compile(lib.member)
    with zipfile.ZipFile(lock_dir / whl) as zf:
        member = next((n for n in sorted(zf.namelist()) if pattern.fullmatch(n)), None)
        if member is None:
            raise UserError(f"{whl} carries no file matching {lib.member}; native/ cannot take {lib.name} from it.",
                            hint="This runtime release packs its library elsewhere: build with --no-native and "
                                 "report it.", wheel=whl)
        with zf.open(member) as src, (dest / lib.name).open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    os.chmod(dest / lib.name, 0o755)
    version = lock_entry_name(whl).version
    return {"file": f"{FOLDER}/{lib.name}", "package": lib.package, "version": version, "wheel": whl,
            "wheel_sha256": wheels[whl], "member": member, "sha256": sha256_file(dest / lib.name),
            "bytes": (dest / lib.name).stat().st_size, "license": wheel_license(lock_dir / whl)}


def glibc_required(binary: Path) -> str:
    """The newest GLIBC_x.y symbol version an ELF file references ('' for none)."""
    versions = {(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", binary.read_bytes())}
    return f"{max(versions)[0]}.{max(versions)[1]}" if versions else ""


def compile_program(dest: Path, libs: list[NativeLibrary], cc: Toolchain) -> tuple[bool, str]:
    """Compile native/edgepack-chat in `dest`; (made, why not)."""
    cmd = [cc.cc, *CFLAGS, "-o", PROGRAM, "edgepack-chat.c", "-L.", "-Wl,--no-as-needed",
           *[f"-l:{lib.name}" for lib in libs], "-Wl,--as-needed", *LDFLAGS]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False,
                          env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        (dest / PROGRAM).unlink(missing_ok=True)
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
        return False, f"{Path(cc.cc).name} failed: {tail}"
    return True, ""


def build_native(folder: Path, target: TargetProfile, libs: tuple[NativeLibrary, ...], runtime: str,
                 reqs: list[str], ctx: Any, smoke: dict[str, Any], *, progress: ProgressFn = silent) -> NativePack:
    """native/ in the bundle being built at `folder`: the libraries out of the target's pinned wheels `reqs` (the
    wheel cache's copy, which the wheels stage shares), `ctx` (render.BundleContext), `smoke` (the manifest's)."""
    import jinja2

    from edgepack.stages.wheels import download_wheels

    wheel_dir, wheels = download_wheels(reqs, target.resolved_python(), list(target.device.wheel_platforms),
                                        what=f"target '{target.id}'", progress=progress)
    dest = folder / FOLDER
    dest.mkdir()
    libraries = [_extract(wheel_dir, wheels, lib, dest) for lib in libs]
    src = shipped_dir("templates") / "_native"
    plain = {p.name: p for folder in (src / "_shared", src / runtime) for p in folder.iterdir()
             if p.suffix in (".c", ".h")}
    for name, path in plain.items():
        shutil.copyfile(path, dest / name)
        os.chmod(dest / name, 0o644)
    checked = [int(bool(c)) for c in smoke.get("golden_checked") or []]
    native = {"smoke_tokens": int(smoke.get("tokens") or 16), "golden_prompt": list(smoke.get("prompt_ids") or []),
              "golden_tokens": list(smoke.get("golden_tokens") or []), "golden_checked": checked,
              "libraries": [lib.name for lib in libs], "runtime": runtime, "program": PROGRAM,
              "version": libraries[0]["version"], "api": f"{runtime} {libraries[0]['version']}",
              "header": next(p.name for p in sorted((src / runtime).glob("*.h"))), "arch": target.resolved_arch()}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(src / "_shared")), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    for tpl, name in RENDERED.items():
        (dest / name).write_text(env.get_template(tpl).render(ctx=ctx, native=native), encoding="utf-8")
    made, why, glibc, compiler = _program(dest, target, libs, progress)
    if not made:
        progress(ProgressEvent("native", f"WARNING: {FOLDER}/{PROGRAM} was not compiled: {why}"))
    files = sorted(p.name for p in dest.iterdir())
    return NativePack(runtime=runtime, arch=target.resolved_arch(), libraries=libraries,
                      program=f"{FOLDER}/{PROGRAM}" if made else None, why_no_program=why, compiler=compiler,
                      glibc_required=glibc, files=[f"{FOLDER}/{f}" for f in files],
                      bytes=sum((dest / f).stat().st_size for f in files))


def _program(dest: Path, target: TargetProfile, libs: tuple[NativeLibrary, ...], progress: ProgressFn
             ) -> tuple[bool, str, str, str]:
    """Compile edgepack-chat for the target in `dest`, kept only where it runs there: (made, why not, the glibc it
    needs, the compiler)."""
    arch = target.resolved_arch()
    cc = toolchain(arch)
    if cc is None:
        return False, (f"no C compiler for {arch} here (Debian: apt install gcc-{arch}-linux-gnu; or set "
                       f"EDGEPACK_CC_{arch.upper()}); build it from native/ with CMake in the firmware's toolchain"), \
            "", ""
    progress(ProgressEvent("native", f"compiling {PROGRAM} for {arch} with {cc.version}"))
    made, why = compile_program(dest, list(libs), cc)
    if not made:
        return False, why, "", ""
    glibc, have = glibc_required(dest / PROGRAM), target.device.glibc
    if target.device.arch != "native" and too_new(glibc, have):  # a `native` target's device is this machine
        (dest / PROGRAM).unlink()
        return False, (f"{Path(cc.cc).name} links against glibc {glibc}, newer than the target's {have}; build it "
                       "from native/ with CMake against the device's sysroot"), glibc, ""
    return True, "", glibc, cc.version


def too_new(needed: str, have: str) -> bool:
    """Does a program needing glibc `needed` fail on a device with glibc `have` ('' = unknown: no)?"""
    def v(version: str) -> tuple[int, ...]:
        return tuple(int(x) for x in version.split(".")[:2])

    return bool(needed and have) and v(needed) > v(have)
