"""The device program as it is sent: one assembled text, the standard library only, at the device's oldest Python."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from edgepack.remote.program import LAUNCHER, MODULES, PACKAGE, device_program, launch

DEVICE = Path(__file__).resolve().parents[2] / "edgepack" / "remote" / "device"
CONTRACT = DEVICE.parents[1] / "bundle_format.py"  # the bundle contract, packed with them
OLDEST = (3, 7)  # the oldest Python a supported device image ships (Debian 10 / Raspberry Pi OS buster)
# Standard-library modules that are newer than OLDEST (none may be imported on the device).
NEWER = {"graphlib", "tomllib", "zoneinfo", "_zoneinfo"}
PROBED = {"onnxruntime_genai"}  # facts asks whether the device's Python has it (inside try): never required


def test_every_module_is_in_the_text_and_nothing_else_is() -> None:
    on_disk = {p.stem for p in DEVICE.glob("*.py")}
    assert on_disk == set(MODULES), "a device module is not assembled (add it to program.MODULES), or one is gone"


def test_the_program_uses_the_standard_library_only_and_the_oldest_pythons_syntax() -> None:
    for path in [*DEVICE.glob("*.py"), CONTRACT]:
        tree = ast.parse(path.read_text(), feature_version=OLDEST)  # a newer construct is a SyntaxError here
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                if name == "edgepack.bundle_format":  # packed into the text with the device modules
                    continue
                top = name.split(".")[0]
                assert top in PROBED or (top in sys.stdlib_module_names and top not in NEWER), f"{path.name}: {name}"
            assert not isinstance(node, ast.JoinedStr), f"{path.name}:{node.lineno}: an f-string (keep % formatting)"


def test_the_assembled_text_runs_from_stdin(tmp_path: Path) -> None:
    """`python3 - COMMAND ...` with the text on stdin, as the Ansible role and every one-shot call run it."""
    proc = subprocess.run([sys.executable, "-", "status", str(tmp_path)], input=device_program(), text=True,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["install_dir"] == str(tmp_path) and doc["current"] is None and doc["releases"] == []
    # A refusal is an answer with exit 3, not a traceback.
    proc = subprocess.run([sys.executable, "-", "switch", str(tmp_path), "op-1", "../etc"], input=device_program(),
                          text=True, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 3 and json.loads(proc.stdout)["refused"]


def test_a_session_gets_the_program_and_its_requests_on_one_stdin(tmp_path: Path) -> None:
    """The launcher reads exactly the program's bytes; the rest of stdin is the session's: the lock is taken,
    requests are answered in order, a refused one does not end it, and "release" frees the lock."""
    line, program = launch("session", str(tmp_path), "op-1", json.dumps({"command": "test"}), "30")
    assert len(line.encode()) < 4096  # no argument carries the program: its size has no ceiling
    argv = [sys.executable, "-c", LAUNCHER, str(len(program)), "session", str(tmp_path), "op-1", '{"command": "t"}',
            "30"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(program)
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"ok": True, "op": "op-1", "stale": None}

    def ask(*args: str) -> dict:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(list(args)).encode() + b"\n\n")  # a request, then a heartbeat
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    assert ask("status", str(tmp_path))["locked_by"]["op"] == "op-1"
    assert ask("mkdirs", str(tmp_path), "op-1", "releases")["ok"]
    assert ask("mkdirs", str(tmp_path), "op-2", "releases")["refused"]  # another operation's: refused
    assert ask("no-such-command")["refused"]
    proc.stdin.write(b"release\n")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    free = subprocess.run([sys.executable, "-", "status", str(tmp_path)], input=device_program(), text=True,
                          capture_output=True, timeout=60, check=False)
    assert json.loads(free.stdout)["locked_by"] is None


def test_the_package_is_the_text(tmp_path: Path) -> None:
    """What runs on the device is the package's own source, module by module (no copy to drift)."""
    text = device_program()
    sources = eval(text.split("\n")[2].split(" = ", 1)[1])
    for mod in MODULES:
        assert sources[PACKAGE if mod == "__init__" else f"{PACKAGE}.{mod}"] == (DEVICE / f"{mod}.py").read_text()
    assert sources["edgepack.bundle_format"] == CONTRACT.read_text()
    assert f"{PACKAGE}.main" in text
