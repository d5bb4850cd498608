"""Peak memory and time of a build (or of one exporter run), per phase, optionally inside a memory cgroup.

Runs COMMAND, sums the resident memory of its whole process tree every 0.2 s (the builder runs in a child
process), and splits the run into phases at output lines that match --mark (by default the builder's own
"Reading layer N" / "Saving ONNX model" lines and edgepack's stage progress), so a table can say where the
memory goes. With --limit the command runs in its own cgroup-v1 memory cgroup (as root), so an experiment that
grows past the limit is killed by the kernel instead of taking the machine down.

    .venv/bin/python bench/build_memory.py --limit 14G --json out.json -- \\
        .venv/bin/python -m edgepack build --target tests/fixtures/tiny-target.toml MODEL --no-wheels
    .venv/bin/python bench/build_memory.py --real-shape tinyllama-1.1b /tmp/tinyllama   # make the checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
DEFAULT_MARKS = (r"^Reading (embedding|layer 0$|final norm|LM head)|^Saving ONNX model|^streaming: |"
                 r"^\[edgepack\] |^(resolve|export|quantize|validate|render)\b")


def tree_rss_kb(root: int) -> tuple[int, int]:
    """The resident memory of `root` and all its descendants (kB): all of it, and its anonymous part (what
    is not a file mapped in, e.g. memory-mapped weights, which the kernel can drop and read again)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        m = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
        a = re.search(r"^RssAnon:\s+(\d+)", text, re.M)
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = (int(m.group(1)) if m else 0, int(a.group(1)) if a else 0)
    total, anon, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, (0, 0))[0]
        anon += rss.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return total, anon


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_cgroup(limit: int) -> Path:
    group = CGROUP_ROOT / f"ep-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


def run(cmd: list[str], marks: str, limit: int | None) -> dict[str, Any]:
    group = make_cgroup(limit) if limit else None

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=enter, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    phases: list[dict[str, Any]] = [{"phase": "start", "at_s": 0.0, "peak_mb": 0.0, "peak_anon_mb": 0.0}]
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            kb, anon = tree_rss_kb(proc.pid)
            peak[0], peak[1] = max(peak[0], kb), max(peak[1], anon)
            phases[-1]["peak_mb"] = max(phases[-1]["peak_mb"], round(kb / 1024, 1))
            phases[-1]["peak_anon_mb"] = max(phases[-1]["peak_anon_mb"], round(anon / 1024, 1))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail: list[str] = []
    lines: list[str] = []
    pattern = re.compile(marks)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        lines.append(line)
        for part in line.split("\r"):
            if pattern.search(part.strip()):
                phases.append({"phase": part.strip()[:100], "at_s": round(time.monotonic() - start, 1),
                               "peak_mb": 0.0, "peak_anon_mb": 0.0})
                print(f"[{time.monotonic() - start:7.1f}s] {part.strip()[:100]}", file=sys.stderr)
    code = proc.wait()
    done.set()
    sampler.join()
    wall = time.monotonic() - start
    result: dict[str, Any] = {"command": cmd, "exit": code, "wall_s": round(wall, 1),
                              "peak_rss_mb": round(peak[0] / 1024, 1),
                              "peak_anon_mb": round(peak[1] / 1024, 1), "phases": phases, "tail": tail[-15:]}
    stages = _stages(lines)
    if stages:
        result["stages"] = stages
    if group is not None:
        result["limit_mb"] = round((limit or 0) / (1 << 20))
        result["cgroup_max_usage_mb"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / (1 << 20))
        result["oom_killed"] = code == -signal.SIGKILL or "oom_kill 1" in (group / "memory.oom_control").read_text()
        group.rmdir()
    return result


def _stages(lines: list[str]) -> list[dict[str, Any]]:
    """The stages (name, seconds, peak_rss_mib) of an `edgepack --json build` envelope in the output, if any."""
    starts = [i for i, line in enumerate(lines) if line == "{"]
    for start in reversed(starts):
        end = next((j for j in range(start, len(lines)) if lines[j] == "}"), None)
        if end is None:
            continue
        try:
            doc = json.loads("\n".join(lines[start:end + 1]))
        except ValueError:
            continue
        result = doc.get("result") or {}
        return [{k: s.get(k) for k in ("name", "seconds", "peak_rss_mib")} for s in result.get("stages", [])]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", help="memory limit of the command's own cgroup, e.g. 14G (needs root)")
    ap.add_argument("--mark", default=DEFAULT_MARKS, help="regex: output lines that start a phase")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--real-shape", nargs=2, metavar=("NAME", "FOLDER"),
                    help="make a random checkpoint with a released model's shape (edgepack.testing.REAL_SHAPES)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.real_shape:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from edgepack.testing import make_real_shape

        print(make_real_shape(args.real_shape[0], Path(args.real_shape[1])))
        return
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = run(cmd, args.mark, parse_size(args.limit) if args.limit else None)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    sys.exit(0 if result["exit"] == 0 else 1)


if __name__ == "__main__":
    main()
