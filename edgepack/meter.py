"""The one speed meter: a bundle's own runner (`run.py --json`, the runner core every bundle ships) in fresh
processes, here or on a device. `build --tune` ranks candidates by it, `edgepack bench` reports it, and the smoke
test's speed comes from the same runner core (`Runtime.generate`): the numbers a user sees are the ones tune ranked.

A candidate that is not a bundle yet is timed through a runner folder: the bundle's runner files rendered for it
(`runner_folder`) beside its model, exactly what its bundle will hold."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from edgepack.errors import UserError
from edgepack.progress import ProgressEvent, ProgressFn, silent

PROMPT = "Write a haiku about the sea."
METRICS = ("load_s", "prefill_ms", "decode_tokens_per_s", "peak_rss_mb", "new_tokens")


def runner_args(tokens: int, threads: int = 0, prompt: str = PROMPT) -> list[str]:
    """`run.py` arguments of one timed run: a chat prompt, greedy, `tokens` new tokens, one JSON document out."""
    return ["--prompt", prompt, "--json", "--max-tokens", str(tokens),
            *(["--threads", str(threads)] if threads else [])]


SCENARIOS = ("chat", "extraction")  # the runner core's edgepack_scenarios.py


def scenario_args(scenario: str, threads: int = 0) -> list[str]:
    """`run.py` arguments that play a bench scenario (one JSON document: every arm, per turn)."""
    return ["--scenario", scenario, "--json", *(["--threads", str(threads)] if threads else [])]


def result(stdout: str, what: str) -> dict[str, Any]:
    """The runner's JSON document (its last line), without the text and tokens."""
    try:
        doc = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise UserError(f"{what}: the runner printed no result.", hint="See stderr_tail.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("decode_tokens_per_s"), (int, float)):
        raise UserError(f"{what}: the runner's result has no decode_tokens_per_s.", hint="See stderr_tail.")
    doc.pop("text", None)
    doc.pop("tokens", None)
    return doc


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """metric → median, min, max over the runs (a scenario's: every number at its top level)."""
    out = {}
    keys = METRICS if not runs or "scenario" not in runs[0] else [
        k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for key in keys:
        vals = [float(r[key]) for r in runs if r.get(key) is not None]
        if vals:
            out[key] = {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3),
                        "max": round(max(vals), 3)}
    return out


def time_here(cmd: list[str], env: dict[str, str] | None, reps: int, what: str,
              progress: ProgressFn = silent) -> list[dict[str, Any]]:
    """`reps` fresh processes of the runner command on this machine."""
    runs = []
    for i in range(reps):
        progress(ProgressEvent("bench", f"{what}: run {i + 1}/{reps} here"))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise UserError(f"{what}: the runner failed (exit {proc.returncode}).",
                            hint="See stderr_tail.", stderr_tail=proc.stderr.splitlines()[-10:])
        runs.append(result(proc.stdout, what))
    return runs


class Meter(Protocol):
    """Times a runner folder (run.py, the runner core, model/): one runner JSON document per fresh process."""

    where: str

    def __call__(self, runner: Path, *, tokens: int, reps: int, threads: int,
                 args: list[str] | None = None) -> list[dict[str, Any]]: ...


class HereMeter:
    """The runner folder on this machine, with this Python (the one the build exported and scored with)."""

    def __init__(self, where: str, progress: ProgressFn = silent) -> None:
        self.where, self.progress = where, progress

    def __call__(self, runner: Path, *, tokens: int, reps: int, threads: int,
                 args: list[str] | None = None) -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="edgepack-nopyc-") as nopyc:
            cmd = [sys.executable, "-B", "-X", f"pycache_prefix={nopyc}", str(runner / "run.py"),
                   *(args if args is not None else runner_args(tokens, threads))]
            return time_here(cmd, None, reps, f"timing {runner.name}", self.progress)


@contextmanager
def runner_folder(ctx: Any, template: str, model_dir: Path, work: Path) -> Iterator[Path]:
    """The bundle's runner files rendered for a candidate (`ctx`, the bundle context it would ship with) beside a
    link to its model folder: what `run.py` of its bundle will run."""
    import shutil

    from edgepack.stages.render import render

    folder = Path(tempfile.mkdtemp(prefix="runner-", dir=work))
    try:
        render(ctx, template, folder, systemd=False)
        (folder / "model").symlink_to(model_dir.resolve(), target_is_directory=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
