"""Run the image recipes in examples/image/ as their build systems would, without the build systems: Buildroot's
package .mk through GNU make (its real `define` blocks, with the few Buildroot functions it calls), and the Yocto
recipe's tasks (its python task with a stand-in datastore, its shell task with bitbake's ${VAR} expansion)."""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from .conftest import ROOT

BUILDROOT = ROOT / "examples" / "image" / "buildroot" / "edgepack-model"
YOCTO = ROOT / "examples" / "image" / "yocto" / "edgepack-model.bb"


def buildroot_install(archive: Path, name: str, work: Path, target_dir: Path, staging_dir: Path
                      ) -> subprocess.CompletedProcess[str]:
    """Extract as Buildroot does (the top folder stripped), then the post-extract hook and the install commands."""
    build = work / "build" / "edgepack-model-1"
    build.mkdir(parents=True)
    subprocess.run(["tar", "--strip-components=1", "-C", str(build), "-xzf", str(archive)], check=True)
    makefile = work / "Makefile"
    makefile.write_text(
        'qstrip = $(strip $(subst ",,$(1)))\n'
        "generic-package =\n"
        f'BR2_PACKAGE_EDGEPACK_MODEL_BUNDLE = "{name}"\n'
        f'BR2_PACKAGE_EDGEPACK_MODEL_SITE = "{archive.parent}"\n'
        f"INSTALL = install\nTARGET_DIR = {target_dir}\nSTAGING_DIR = {staging_dir}\n"
        f"include {BUILDROOT / 'edgepack-model.mk'}\n"
        f"{build}/.stamp_installed:\n"
        "\t$(call $(strip $(EDGEPACK_MODEL_POST_EXTRACT_HOOKS)))\n"
        "\t$(EDGEPACK_MODEL_INSTALL_TARGET_CMDS)\n"
        "\t$(EDGEPACK_MODEL_INSTALL_STAGING_CMDS)\n")
    return subprocess.run(["make", "-f", str(makefile), f"{build}/.stamp_installed"], capture_output=True, text=True,
                          timeout=300)


def bitbake_variables(text: str) -> dict[str, str]:
    """The recipe's plain assignments (NAME = "v", NAME ?= "v"), outside its functions."""
    out: dict[str, str] = {}
    for m in re.finditer(r'^([A-Z][A-Z0-9_]*)\s*(\?=|=)\s*"(.*)"\s*$', text, re.M):
        if m.group(2) == "=" or m.group(1) not in out:
            out[m.group(1)] = m.group(3)
    return out


def expand(value: str, variables: dict[str, str]) -> str:
    for _ in range(10):
        new = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: variables[m.group(1)], value)
        if new == value:
            return new
        value = new
    return value


def bitbake_function(text: str, name: str) -> str:
    m = re.search(rf"^(?:python )?{name}\(\) \{{\n(.*?)^\}}", text, re.M | re.S)
    assert m is not None, f"{name} is not in the recipe"
    return m.group(1)


class Fatal(Exception):
    pass


def yocto_install(archive: Path, name: str, sha256: str, work: Path, image: Path) -> None:
    """do_unpack (tar into WORKDIR), the recipe's do_verify_bundle and do_install, into the image root `image`."""
    text = YOCTO.read_text()
    workdir = work / "work"
    workdir.mkdir(parents=True)
    (workdir / archive.name).write_bytes(archive.read_bytes())
    subprocess.run(["tar", "-C", str(workdir), "-xzf", str(archive)], check=True)
    variables = {**bitbake_variables(text), "EDGEPACK_BUNDLE": name, "EDGEPACK_ARCHIVE_SHA256": sha256,
                 "WORKDIR": str(workdir), "D": str(image), "includedir": "/usr/include", "libdir": "/usr/lib"}
    variables["S"] = expand(variables["S"], variables)

    class Datastore:
        def getVar(self, key: str) -> Any:  # noqa: N802 (bitbake's name)
            return expand(variables[key], variables)

    class Bitbake:
        @staticmethod
        def fatal(msg: str) -> None:
            raise Fatal(msg)

    exec(textwrap.dedent(bitbake_function(text, "do_verify_bundle")), {"d": Datastore(), "bb": Bitbake()})
    script = expand(bitbake_function(text, "do_install"), variables)
    subprocess.run(["sh", "-e", "-c", script], check=True, capture_output=True, text=True)
