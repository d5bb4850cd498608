"""Preflight: does this device fit this bundle? Checked before anything is written to it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgepack.bundle import Manifest
from edgepack.errors import NoPythonError, UserError


@dataclass(frozen=True)
class Problem:
    check: str
    found: str
    expected: str
    fix: str


def required_glibc(wheels: list[str]) -> tuple[int, int] | None:
    """The newest manylinux glibc any vendored wheel needs (manylinux2014 = 2.17)."""
    need: tuple[int, int] | None = None
    for w in wheels:
        versions = [(int(a), int(b)) for a, b in re.findall(r"manylinux_(\d+)_(\d+)_", w)]
        if "manylinux2014" in w:
            versions.append((2, 17))
        if versions:
            lowest = min(versions)  # a wheel tagged for several is usable from its lowest tag up
            need = lowest if need is None else max(need, lowest)
    return need


# Peak RSS ÷ model file size, measured on SmolLM2-135M (docs/performance.md): onnxruntime-genai int4 2.2×,
# LiteRT-LM dynamic int8 2.5×, LiteRT-LM weight-only int8 20.7× (XNNPACK unpacks the weights to float at load).
_LITERT_MEMORY_FACTOR = {"weight_only_int8": 21.0, "dynamic_int8": 2.6}


def memory_needed(manifest: Manifest) -> int:
    """Bytes of RAM the bundle's runtime is expected to need on the device: the build's memory plan (edgepack
    plan's model, recorded in the manifest), else, for a bundle built before it was recorded, a factor of the
    model's size."""
    if manifest.memory_peak_bytes:
        return manifest.memory_peak_bytes
    factor = 1.3
    if manifest.format == "tflite":
        recipe = manifest.recipe
        factor = _LITERT_MEMORY_FACTOR.get(recipe, 2.6 if recipe.startswith("dynamic") else 4.0)
    return int(manifest.model_bytes * factor) + 150_000_000


# Target files may name a feature as Arm's documents do; Linux's AT_HWCAP / cpuinfo name is on the right.
_CPU_ALIASES = {"neon": "asimd", "lse": "atomics", "dotprod": "asimddp", "fp16": "fphp"}


def check(manifest: Manifest, facts: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    arch = manifest.arch
    if facts["arch"] != arch:
        problems.append(Problem("arch", facts["arch"], arch,
                                f"build for this device's architecture (a target with arch = \"{facts['arch']}\")"))
    wheels = list(manifest.wheels)
    py_major_minor = ".".join(facts["python"].split(".")[:2])
    if wheels and py_major_minor != manifest.python:
        problems.append(Problem("python", facts["python"], f"{manifest.python}.x (the vendored wheels)",
                                "build with a target whose device.python matches (deploy fetches and pins wheels for "
                                "another Python only on glibc devices)"))
    need = required_glibc(wheels)
    if need and facts.get("glibc"):
        have = tuple(int(x) for x in facts["glibc"].split(".")[:2])
        if have < need:
            problems.append(Problem("glibc", facts["glibc"], f">= {need[0]}.{need[1]}",
                                    "use an OS release with a newer glibc, or older runtime wheels"))
    elif need and not facts.get("glibc") and facts.get("termux"):
        problems.append(Problem("libc", "bionic (plain Termux)", f"glibc >= {need[0]}.{need[1]}",
                                "run the bundle in a glibc userland inside Termux: `pkg install proot-distro && "
                                "proot-distro install debian`, start sshd there, and deploy to it (the app "
                                "route needs no Python: see the bundle's android/README.md)"))
    elif need and not facts.get("glibc"):
        problems.append(Problem("libc", str(facts.get("libc")), f"glibc >= {need[0]}.{need[1]}",
                                "manylinux wheels need glibc; musl/bionic devices need their own runtime build"))
    if not facts.get("has_venv"):
        problems.append(Problem("venv", "python3 without venv/ensurepip", "python3 -m venv",
                                "install it on the device (Debian/Raspberry Pi OS: sudo apt install python3-venv)"))
    bundle_bytes = manifest.bytes
    if facts["free_bytes"] < 2 * bundle_bytes:
        problems.append(Problem("disk", f"{facts['free_bytes'] / 1e6:.0f} MB free under {facts['install_dir']}",
                                f">= {2 * bundle_bytes / 1e6:.0f} MB (2x the bundle)",
                                "free space on the device or choose another --install-dir"))
    need_ram = memory_needed(manifest)
    mem = facts.get("mem_available_bytes")
    if mem is not None and mem < need_ram:
        recipe = manifest.recipe
        fix = ("build with android-arm64's default, dynamic int8 with SmoothQuant (algorithm = \"smoothquant\": "
               "1/4 of the memory, +1.7 % perplexity on SmolLM2 against weight-only's +1.0 %), or a smaller model"
               if recipe == "weight_only_int8"
               else "stop other services, or build a smaller variant (int4, a smaller model)")
        problems.append(Problem("memory", f"{mem / 1e6:.0f} MB available", f">= {need_ram / 1e6:.0f} MB", fix))
    have_cpu = facts.get("cpu_features")
    need_cpu = [f for f in manifest.cpu_features if have_cpu is not None
                and _CPU_ALIASES.get(f, f) not in have_cpu and f not in have_cpu]
    if need_cpu:
        problems.append(Problem("cpu", f"a CPU without {', '.join(need_cpu)} ({', '.join(facts['cpu_features'])})",
                                f"CPU features {', '.join(manifest.cpu_features)} (the vendored runtime's build)",
                                "use a device with a newer CPU (Raspberry Pi 5: Cortex-A76), or a target whose "
                                "runtime is built for this one (docs/targets.md, `cpu_features`)"))
    if manifest.execution_provider == "cuda":
        if not facts.get("nv_tegra_release"):
            problems.append(Problem("jetpack", "no /etc/nv_tegra_release (not a Jetson, or L4T missing)",
                                    "NVIDIA JetPack 6 (L4T R36)", "flash JetPack 6 with NVIDIA's SDK Manager"))
        if facts.get("genai_cuda") is not True:
            found = ("no onnxruntime_genai in the system python3" if facts.get("genai_cuda") is None
                     else "onnxruntime_genai without the CUDA provider")
            problems.append(Problem(
                "cuda_runtime", found, "onnxruntime-genai with CUDA in the system python3",
                "install NVIDIA's CUDA build of onnxruntime-genai for JetPack 6 into the system python3 "
                "(PyPI has no aarch64 CUDA wheel, so edgepack vendors none); the bundle's venv sees system packages"))
    if not facts.get("writable"):
        problems.append(Problem("install_dir", f"{facts['install_dir']} not writable", "writable by the SSH user",
                                "choose --install-dir under the user's home, or fix its owner"))
    return problems


def enforce(problems: list[Problem], host: str) -> None:
    if problems:
        first = problems[0]
        raise UserError(
            f"preflight on {host} failed: " + "; ".join(f"{p.check}: found {p.found}, expected {p.expected}"
                                                        for p in problems) + ". Nothing was written.",
            hint=first.fix[0].upper() + first.fix[1:] + ".",
            host=host, problems=[p.__dict__ for p in problems], code="device_unfit")


def without_python(manifest: Manifest, host: str) -> NoPythonError:
    """The refusal for a device with no python3, before anything is written: deploy's device program (its own
    signature check, the atomic switch, rollback) runs on Python, so such a device takes the bundle in its image."""
    native = (f"this bundle's {manifest.native_program} runs the model there without Python" if manifest.native_program
              else "a bundle built with native/ (ONNX targets; `edgepack build --native`) runs the model there without "
                   "Python")
    problem = Problem("python", "no python3 on the device", "python3 with venv (deploy's device program: signature "
                      "check, atomic switch, rollback)",
                      f"put the bundle into the device's image instead: {native}; examples/image/ has a Yocto recipe "
                      "and a Buildroot package that install it from the packed archive (docs/native.md). Or install "
                      "Python on the device (Debian: sudo apt install python3 python3-venv)")
    return NoPythonError(f"preflight on {host} failed: python: found {problem.found}, expected {problem.expected}. "
                         "Nothing was written.", hint=problem.fix[0].upper() + problem.fix[1:] + ".", host=host,
                         problems=[problem.__dict__])
