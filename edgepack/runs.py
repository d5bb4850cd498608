"""Running a bundle on this machine: run, serve and bench of a folder or a packed archive, with only its listed
files (the library API re-exports these from edgepack.api)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack import meter
from edgepack.backends import exporters
from edgepack.bundle import read_manifest, verify_bundle
from edgepack.errors import UserError
from edgepack.progress import ProgressFn, silent
from edgepack.releases import DeviceRequest, install_dir_of, latest_bundle
from edgepack.stages.render import RUNTIME_MODULES, runtime_name


@dataclass(frozen=True)
class Sampling:
    """The runner's decoding options: greedy unless `sample`."""

    sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def args(self) -> list[str]:
        return runner_flags(("--sample", self.sample), ("--temperature", self.temperature), ("--top-p", self.top_p),
                            ("--top-k", self.top_k), ("--seed", self.seed))


def runner_flags(*pairs: tuple[str, object]) -> list[str]:
    """A bundle runner's options: True gives the bare flag, None or False nothing, anything else flag + value."""
    out: list[str] = []
    for flag, value in pairs:
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


@dataclass(frozen=True)
class RunRequest:
    bundle: Path
    prompt: str
    max_tokens: int | None = None  # up to the bundle's context (the runner stops there and says so)
    json_output: bool = False
    raw: bool = False  # no chat template: continue the prompt text (base models)
    system: str | None = None
    sampling: Sampling = Sampling()
    extra_args: tuple[str, ...] = ()
    adapter: str | None = None  # a runtime LoRA adapter the bundle carries (its name); None = the base
    speculative: str | None = None  # "ngram" or "off"; None = the bundle's runtime.speculative


def bundle_python(bundle: Path) -> str:
    """The Python that runs a local bundle, after every file was checked against the manifest: this one when it
    has the runtime, else the venv the bundle's own install.sh made (.venv is outside the manifest, so it is
    only used when this Python cannot run the bundle)."""
    manifest = verify_bundle(bundle)
    if manifest.base_id:
        raise UserError(f"{bundle.name} is an adapter pack: it runs on a device that has its base bundle "
                        f"({manifest.base_id}).", hint="Run the base bundle here with --adapter NAME, or deploy the "
                        "pack (edgepack deploy --host H PACK).", code="invalid_input")
    if manifest.arch != platform.machine():
        raise UserError(f"bundle {bundle.name} is for {manifest.arch}; this machine is {platform.machine()}.",
                        hint="Deploy it with `edgepack deploy --host <device>` (or `edgepack bench --host`), "
                             "or build for `--target host`.")
    module = RUNTIME_MODULES[runtime_name(exporters.get(manifest.format).runtime, manifest.template)]
    if _has_module(module):
        return sys.executable
    venv_py = bundle / ".venv" / "bin" / "python"
    if venv_py.is_file() and (bundle / ".venv" / ".edgepack-installed").is_file():
        return str(venv_py)
    raise UserError(f"this Python has no {module} to run the bundle with.",
                    hint=f"Run `sh {bundle}/install.sh` first, or pip install 'edgepack[{manifest.format}]'.")


def run(req: RunRequest) -> tuple[int, str]:
    """Run the bundle's own runner here (same arch only); a packed archive is unpacked (checked) into a temp dir."""
    from edgepack.stages.pack import opened

    with opened(req.bundle) as folder:
        return _run_folder(dataclasses.replace(req, bundle=folder))


@contextlib.contextmanager
def runner_command(bundle: Path, *args: str) -> Iterator[tuple[list[str], dict[str, str]]]:
    """(command, environment) that run a bundle's run.py, after verify_bundle, with nothing but its listed files:
    bytecode is neither written into the bundle (-B) nor read from any `__pycache__` there, because the bytecode
    cache prefix is a fresh, empty, private folder (for the runner's own child processes too), so Python compiles
    the listed .py files it was given. verify_bundle has already refused caches, links and unlisted files."""
    py = bundle_python(bundle)
    with tempfile.TemporaryDirectory(prefix="edgepack-nopyc-") as nopyc:
        env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": nopyc}
        yield [py, "-B", "-X", f"pycache_prefix={nopyc}", str(bundle / "run.py"), *args], env


def _run_folder(req: RunRequest) -> tuple[int, str]:
    import subprocess

    args = ["--prompt", req.prompt, *runner_flags(("--max-tokens", req.max_tokens), ("--json", req.json_output),
                                                   ("--raw", req.raw), ("--system", req.system),
                                                   ("--adapter", req.adapter), ("--speculative", req.speculative)),
            *req.sampling.args(), *req.extra_args]
    with runner_command(req.bundle, *args) as (cmd, env):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.splitlines()[-10:]
        said = next((line[len("error: "):] for line in reversed(tail) if line.startswith("error: ")), None)
        raise UserError(f"the bundle's runner refused: {said}" if said else
                        f"the bundle's runner failed (exit {proc.returncode}).",
                        hint="See stderr_tail; `edgepack inspect` checks the bundle's files.",
                        command=" ".join(cmd), stderr_tail=tail)
    return proc.returncode, proc.stdout


@dataclass(frozen=True)
class ServeRequest:
    bundle: Path
    addr: str = "127.0.0.1:8089"  # HOST:PORT or unix:PATH
    api_key_file: Path | None = None
    insecure_no_auth: bool = False
    metrics: bool = False
    threads: int = 0
    system: str | None = None  # the system prompt clients send: prefilled at load
    prompt_cache_slots: int | None = None  # None: the bundle's runtime.prompt_cache_slots


def serve(req: ServeRequest) -> int:
    """The bundle's own OpenAI-compatible server (its runner core) on this machine, until it is stopped; a packed
    archive is unpacked (checked) into a temp dir that lives as long as the server."""
    import subprocess

    from edgepack.stages.pack import opened

    args = ["--serve", req.addr, *runner_flags(("--api-key-file", req.api_key_file),
                                               ("--insecure-no-auth", req.insecure_no_auth),
                                               ("--metrics", req.metrics), ("--threads", req.threads or None),
                                               ("--system", req.system),
                                               ("--prompt-cache-slots", req.prompt_cache_slots))]
    with opened(req.bundle) as folder, runner_command(folder, *args) as (cmd, env):
        return _serve(subprocess.Popen(cmd, env=env))


def _serve(proc: Any) -> int:
    import signal
    import threading

    old = None
    if threading.current_thread() is threading.main_thread():
        # `kill`, `docker stop`, a unit's stop: the server stops with edgepack, never left running as an orphan
        old = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- bench ------------------------------------------------------------------------------------------

BENCH_PROMPT = meter.PROMPT


@dataclass(frozen=True)
class BenchRequest:
    bundle: Path | None = None  # local bundle; with a device: ignored, the device's `current` is measured
    device: DeviceRequest | None = None
    reps: int = 5
    max_tokens: int = 64
    threads: int = 0  # 0 = the bundle's default
    prompt: str = BENCH_PROMPT
    scenario: str | None = None  # a runner-core scenario (meter.SCENARIOS): every arm of it, per run


@dataclass(frozen=True)
class BenchResult:
    where: str
    bundle: str
    reps: int
    summary: dict[str, dict[str, float]]  # metric → median, min, max
    runs: tuple[dict[str, Any], ...]


def bench(req: BenchRequest, progress: ProgressFn = silent) -> BenchResult:
    """Run the bundle's own runner `reps` times in fresh processes (here or on the device); medians + spread
    (the speed meter tune ranks candidates with, edgepack.meter)."""
    if req.scenario is not None and req.scenario not in meter.SCENARIOS:
        raise UserError(f"no bench scenario '{req.scenario}'.", hint=f"Use one of: {', '.join(meter.SCENARIOS)}.",
                        allowed=list(meter.SCENARIOS))
    args = (meter.scenario_args(req.scenario, req.threads) if req.scenario
            else meter.runner_args(req.max_tokens, req.threads, req.prompt))
    runs: list[dict[str, Any]] = []
    if req.device is not None:
        from edgepack.remote.speed import bench_current
        from edgepack.remote.ssh import Connection

        with Connection(req.device) as conn:
            where, name, remote_runs = bench_current(conn, install_dir_of(req.device), args, req.reps,
                                                     req.device.command_timeout, progress)
            runs += remote_runs
    else:
        from edgepack.stages.pack import opened

        with opened(req.bundle or latest_bundle(Path("dist"))) as bundle, runner_command(bundle, *args) as (cmd, env):
            manifest = read_manifest(bundle)
            runs += meter.time_here(cmd, env, req.reps, f"bench {manifest.bundle_id}", progress)
        where, name = f"this machine ({platform.machine()})", manifest.bundle_id
    return BenchResult(where=where, bundle=name, reps=req.reps, summary=meter.summarize(runs), runs=tuple(runs))
