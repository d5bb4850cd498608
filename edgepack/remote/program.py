"""The device program as one text: the modules of `edgepack.remote.device` packed with a tiny importer, the way
Ansible packs a module with its helpers, so that one `python3` on the device runs it from stdin and nothing is
written to the device to run it.

Two ways to start it, both with the text on stdin:
- `python3 - COMMAND ARGS...`: the text is all of stdin (one command; the Ansible role's way);
- `python3 -c LAUNCHER BYTES COMMAND ARGS...`: the launcher reads exactly BYTES of program from stdin, and the rest of
  stdin stays the command's (the lock's heartbeats, a session's requests). No argument carries the program, so
  there is no ceiling on its size (Linux caps one argument at 128 KiB)."""

from __future__ import annotations

import shlex
from functools import cache
from importlib import resources

PACKAGE = "edgepack.remote.device"
# In import order (a module after those it imports); `__init__` is the package itself.
MODULES = ("rules", "lock", "files", "signature", "facts", "releases", "service", "apply", "main", "__init__")

_BOOT = '''
import importlib.abc
import importlib.util
import sys


class _Packed(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the packed modules by name; the packages above them are empty."""

    def find_spec(self, name, path=None, target=None):
        if name in SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=name in PACKAGES)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        exec(compile(SOURCES[name], "<edgepack-device>/" + name.replace(".", "/") + ".py", "exec"), module.__dict__)


sys.meta_path.insert(0, _Packed())
from edgepack.remote.device.main import main  # noqa: E402

main(sys.argv[1:])
'''

LAUNCHER = ("import os,sys\nn=int(sys.argv.pop(1));b=b''\nwhile len(b)<n:\n c=os.read(0,n-len(b))\n if not c:break\n"
            " b+=c\nexec(compile(b,'<edgepack-device>','exec'))")


@cache
def device_program() -> str:
    """The one text of the device program (standard library only, Python 3.7+)."""
    pkg = resources.files(PACKAGE)
    sources = {"edgepack": "", "edgepack.remote": "",
               "edgepack.bundle_format": resources.files("edgepack").joinpath("bundle_format.py").read_text("utf-8")}
    for mod in MODULES:
        name = PACKAGE if mod == "__init__" else f"{PACKAGE}.{mod}"
        sources[name] = pkg.joinpath(f"{mod}.py").read_text(encoding="utf-8")
    packages = ("edgepack", "edgepack.remote", PACKAGE)
    return ("# edgepack's device program, assembled from the package edgepack.remote.device:\n"
            "# it runs on the device from stdin, standard library only, Python 3.7+. Do not edit: edit the package.\n"
            f"SOURCES = {sources!r}\nPACKAGES = {packages!r}\n{_BOOT}")


def launch(*args: str) -> tuple[str, bytes]:
    """The command line that runs the device program with `args`, and the stdin that starts with the program (the
    caller may send more after it)."""
    program = device_program().encode("utf-8")
    argv = ["python3", "-c", LAUNCHER, str(len(program)), *args]
    return " ".join(shlex.quote(a) for a in argv), program
