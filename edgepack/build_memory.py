"""The build machine planned like the device: what a build costs here (peak memory, rough time), what this machine
and the memory cgroup it runs under can hold, and a converter killed for memory told apart from a crash.

The costs are measured constants, one row per exporter (EXPORT_COSTS): change that row when an exporter changes.
docs/plan.md ("Build memory") records the measurements behind each number.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import BuildOutOfMemoryError, UserError
from edgepack.progress import note_converter_peak

if TYPE_CHECKING:
    from edgepack.targets import TargetProfile

MIB = 1 << 20
GIB = 1 << 30
MEMORY_ENV = "EDGEPACK_BUILD_MEMORY_MB"  # the memory a build may use, in MiB, instead of what is read; 0 = no check
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as 2^63 rounded down to a page


@dataclass(frozen=True)
class ExporterCost:
    """What one exporter's conversion costs at its peak: a fixed part (the converter's Python with torch and
    transformers imported) plus bytes per parameter; and its time, a fixed part plus seconds per billion
    parameters on 2 cores (its plain round-to-nearest pass; ALGORITHMS adds what other quantize.algorithm cost)."""

    tool: str
    base: int
    bytes_per_param: float
    seconds: float
    seconds_per_billion: float
    why: str


# The one place the exporters' build costs live; docs/plan.md ("Build memory") has the measurements.
EXPORT_COSTS: dict[str, ExporterCost] = {
    # onnxruntime-genai 0.18's model builder left alone (fp32/fp16 graphs, and any algorithm streaming.py does not
    # reproduce) loads the whole checkpoint, copies the graph to fp32 and then quantizes it. Measured (its own
    # peak RSS, wait4): 466 MiB for a 0.1M-parameter model (the imports), 1,803 MiB for SmolLM2-135M RTN int4 in
    # 22 s: 10.4 bytes per parameter beyond the imports; TinyLlama-1.1B shape with k_quant 12.3 GB for the whole
    # build; Phi-3.5-mini shape (3.8B) killed inside a 16 GB limit.
    "onnx": ExporterCost("onnxruntime-genai model builder", 500 * MIB, 10.0, 5.0, 130.0,
                         "loads the whole model and makes an fp32 copy: ~10 bytes per parameter"),
    # The same builder streaming (backends/streaming.py: int4/int8 with its default, rtn or k_quant algorithm):
    # weights read and quantized one decoder layer at a time, the same bytes written. Measured (bench/
    # build_memory.py, builder only, in a 14 GB cgroup): default, TinyLlama-1.1B shape 1,586 MB in 46 s,
    # Phi-3.5-mini shape (3.8B) 3,539 MB in 96 s: the imports (~600 MB) plus the quantized model held until the
    # save and one float layer, ~0.8-0.9 bytes/parameter. k_quant: ALGORITHMS.
    "onnx-streamed": ExporterCost("onnxruntime-genai model builder, streamed", 600 * MIB, 0.9, 20.0, 20.0,
                                  "reads and quantizes one decoder layer at a time: ~0.9 bytes per parameter"),
    # litert-torch documents at least 32 GB of RAM for converting; users report ~30 GiB for a 1B model. Measured
    # (bench/build_memory.py, whole build, --skip-validation, dynamic int8, 16 GB cgroup): Gemma-3-1B shape
    # (1.00 B parameters) 15,933 MB in 216 s of export, at the cgroup's limit (page cache given back): ~15 bytes
    # per parameter beyond the imports, one point.
    "tflite": ExporterCost("litert-torch converter", 1 * GIB, 15.0, 60.0, 160.0,
                           "traces and converts the whole model in float: ~15 bytes per parameter (Gemma-3-1B "
                           "shape: 15.9 GB)"),
}


FORMATS = ("onnx", "tflite")  # the export formats a refusal may suggest instead (`--format`)


@dataclass(frozen=True)
class AlgorithmCost:
    """What a quantize.algorithm adds to the exporter's own pass: memory inside the converter (`extra`); or, for
    edgepack's own passes after it (`after`), that pass's peak: the layered fp32 model (GATE_BYTES_PER_RESIDENT_
    PARAM per resident parameter), the exported graph it rewrites (`bytes_per_param`) and its statistics (`extra`);
    and seconds, fixed and per billion parameters on 2 cores."""

    extra: int
    bytes_per_param: float
    seconds: float
    seconds_per_billion: float
    after: bool = False


ALGORITHMS: dict[str, AlgorithmCost] = {
    # The k-quant search, streamed (numpy, on every core): TinyLlama-1.1B shape 1,774 MB in 223 s against the
    # default's 1,586 MB in 46 s (bench/build_memory.py, 2 cores); Phi-3.5-mini shape 4,157 MiB in 666 s (the
    # export stage of a whole build). Whole-graph it was 12.3 GB and 452 s at 1.1B.
    "k_quant": AlgorithmCost(256 * MIB, 0.0, 0.0, 160.0),
    # edgepack's own GPTQ/imatrix passes run after the (streamed) builder, in edgepack's process: the fp32 model
    # one decoder layer at a time (checkpoint.layered_model, the same codes as the whole model), the exported
    # ONNX graph whose initializers it rewrites (~0.7 bytes/parameter), and per layer the float64 input
    # statistics (GPTQ: intermediate² × 8 bytes for down_proj, 0.5 GB at 3.8B). GPTQ: computed, not measured at
    # scale. imatrix (the CPU targets' default) measured in the card's whole build, TinyLlama-1.1B shape: export
    # stage 279 s at 3,060 MiB, of which the streamed RTN export ~50 s; calibration sampled from that export
    # (~60 s), one float forward and the scale search per layer (docs/targets.md).
    "gptq": AlgorithmCost(1 * GIB, 1.0, 60.0, 300.0, after=True),
    "imatrix": AlgorithmCost(512 * MIB, 1.0, 30.0, 180.0, after=True),
}
# edgepack's own process while the converter runs: 282 MiB measured (torch is imported for the export).
EDGEPACK_BASE = 300 * MIB
# The quality gate, in two parts that never overlap. The float reference (checkpoint.layered_model): torch
# imported (333 MiB, docs/performance.md) plus, in fp32, what sits outside the decoder layers (embedding, head)
# and one layer, and the eval window's activations. Then the quantized bundle in its runtime, which holds about
# twice its files (MLAS repacks the int4 weights): measured in the whole build, Phi-3.5-mini shape (rpi5-8gb
# recipe, 3.1 GB of model files) 5,922 MiB; TinyLlama-1.1B shape (rpi5, 998 MB) ~2,000 MiB.
GATE_BASE = 500 * MIB
GATE_BYTES_PER_RESIDENT_PARAM = 4.5
RUNTIME_BASE = 300 * MIB
RUNTIME_BYTES_PER_PARAM = 1.55
# The gate's time: SmolLM2-135M ~118 s (2 shared cores); TinyLlama-1.1B shape ~100 s, Phi-3.5-mini shape 505 s
# (layered reference, then the bundle; 4,133 eval tokens with the real-shape checkpoints' small tokenizer).
GATE_SECONDS = 100.0
GATE_SECONDS_PER_BILLION = 100.0
FIXED_SECONDS = 10.0  # resolving, the tokenizer, writing the bundle
# Memory kept free for the estimate's error and the page cache the converter reads through (as the device plan's
# headroom): a build is refused when its planned peak is above 90 % of what the machine gives.
BUILD_HEADROOM_PCT = 10.0


def export_cost(exporter: str) -> ExporterCost:
    """The cost row of an exporter; an exporter without one is costed like the onnxruntime-genai builder."""
    return EXPORT_COSTS.get(exporter, EXPORT_COSTS["onnx"])


def export_peak(exporter: str, scheme: str, params: int, algorithm: str = "default",
                resident: int | None = None, sampling_kv: int = 0) -> int:
    """Bytes the export takes at its peak on the build machine: edgepack's process plus the converter's, or
    edgepack's own quantization pass after it (`resident`: gate_peak's), or that pass's calibration sample drawn
    from the int4 export in its runtime (`sampling_kv`: the KV cache of every sequence at once), whichever is
    larger."""
    row = export_cost(_row(exporter, scheme, algorithm))
    algo = ALGORITHMS.get(algorithm) if exporter == "onnx" else None
    if algo is None or not algo.after:
        return EDGEPACK_BASE + row.base + int(row.bytes_per_param * params) + (algo.extra if algo else 0)
    converter = EDGEPACK_BASE + row.base + int(row.bytes_per_param * params)
    layered = int(GATE_BYTES_PER_RESIDENT_PARAM * (params if resident is None else resident))
    # Measured, Phi-3.5-mini shape (rpi5-8gb's imatrix default): 7,416 MiB while sampling, the runtime's share
    # plus about 40 % of the nominal cache (32 full KV heads: 3,072 MiB for 16 × 256 tokens); charged at half.
    sampling = EDGEPACK_BASE + RUNTIME_BASE + int(RUNTIME_BYTES_PER_PARAM * params) + sampling_kv // 2
    return max(converter, sampling,
               EDGEPACK_BASE + GATE_BASE + algo.extra + int(algo.bytes_per_param * params) + layered)


def _row(exporter: str, scheme: str, algorithm: str) -> str:
    """Which EXPORT_COSTS row a build uses: the ONNX builder streams int4/int8 (streaming.streams)."""
    from edgepack.backends.streaming import streams

    return "onnx-streamed" if exporter == "onnx" and streams(scheme, algorithm) else exporter


def gate_peak(params: int, resident: int | None = None) -> int:
    """The quality gate's peak: the layered fp32 reference (`resident` parameters in memory at once: the
    embedding, head and one decoder layer; all of them when unknown), or the quantized bundle run after it."""
    reference = GATE_BASE + int(GATE_BYTES_PER_RESIDENT_PARAM * (params if resident is None else resident))
    return max(reference, RUNTIME_BASE + int(RUNTIME_BYTES_PER_PARAM * params))


def build_seconds(exporter: str, algorithm: str, params: int, *, gate: bool = True) -> float:
    """A rough wall time for a cold build on a 2-core runner (more cores shorten it, less than linearly)."""
    billions = params / 1e9
    row = export_cost(_row(exporter, "int4", algorithm))
    export_s = row.seconds + row.seconds_per_billion * billions
    algo = ALGORITHMS.get(algorithm) if exporter == "onnx" else None
    if algo is not None:
        export_s += algo.seconds + algo.seconds_per_billion * billions
    gate_s = GATE_SECONDS + GATE_SECONDS_PER_BILLION * billions if gate else 0.0
    return round(FIXED_SECONDS + export_s + gate_s, 1)


# -- what this machine holds ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup this process runs in, and the smallest limit on its way to the root."""

    version: int  # 1 or 2
    folder: Path  # the process's own cgroup folder
    folders: tuple[Path, ...]  # it and its ancestors up to the mount (their OOM counters count our kills)
    limit: int  # bytes; 0 = no limit
    limit_file: str  # the file that limit was read from ("" = none)


def _controller_lines(proc_cgroup: Path) -> list[tuple[str, str, str]]:
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return []
    return [tuple(line.split(":", 2)) for line in text.splitlines() if line.count(":") >= 2]  # type: ignore[misc]


def _read_limit(path: Path) -> int:
    try:
        raw = path.read_text().strip()
    except OSError:
        return 0
    if raw in ("", "max") or not raw.isdigit():
        return 0
    value = int(raw)
    return 0 if value >= _UNLIMITED else value


def find_cgroup(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> Cgroup | None:
    """The memory cgroup of this process (cgroup v1's memory controller, else v2's unified tree), read from
    `proc_cgroup` under the mount `root`; None when there is none to read."""
    lines = _controller_lines(proc_cgroup)
    v1 = next((rel for _h, ctl, rel in lines if "memory" in ctl.split(",")), None)
    v2 = next((rel for h, ctl, rel in lines if h == "0" and ctl == ""), None)
    if v1 is not None and (root / "memory").is_dir():
        version, mount, rel, limit_name = 1, root / "memory", v1, "memory.limit_in_bytes"
    elif v2 is not None and (root / "cgroup.controllers").is_file():
        version, mount, rel, limit_name = 2, root, v2, "memory.max"
    else:
        return None
    folder = mount / rel.lstrip("/")
    if not folder.is_dir():  # inside a cgroup namespace the path may not match the mount: its root is ours
        folder = mount
    chain = [folder, *[p for p in folder.parents if p == mount or mount in p.parents]]
    limits = [(lim, p / limit_name) for p in chain if (lim := _read_limit(p / limit_name))]
    limit, where = min(limits, key=lambda x: x[0]) if limits else (0, None)
    return Cgroup(version, folder, tuple(chain), limit, str(where) if where else "")


def oom_kills(cg: Cgroup | None) -> int | None:
    """OOM kills the kernel counted in this cgroup and its ancestors (v1 memory.oom_control, v2 memory.events);
    None when nothing can be read."""
    if cg is None:
        return None
    name = "memory.oom_control" if cg.version == 1 else "memory.events"
    total, seen = 0, False
    for folder in cg.folders:
        try:
            m = re.search(r"^oom_kill (\d+)$", (folder / name).read_text(), re.M)
        except OSError:
            continue
        if m:
            total, seen = total + int(m.group(1)), True
    return total if seen else None


def _meminfo(path: Path = MEMINFO) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _own_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class MachineMemory:
    """What this machine can give a build: its available memory, the memory cgroup's limit, or an override."""

    total: int  # MemTotal
    available: int  # MemAvailable plus what edgepack's own process holds (counted in the estimate)
    cgroup: Cgroup | None
    override: int | None  # EDGEPACK_BUILD_MEMORY_MB in bytes; 0 = the check is off
    cores: int

    @property
    def budget(self) -> int:
        """Bytes a build may use here; 0 = unknown or the check is off."""
        if self.override is not None:
            return self.override
        limits = [x for x in (self.available, self.cgroup.limit if self.cgroup else 0) if x]
        return min(limits) if limits else 0

    @property
    def hard_limit(self) -> tuple[int, str]:
        """(bytes, what sets them): the memory cgroup's limit, else the machine's memory: what the kernel enforces,
        whatever the override says."""
        if self.cgroup and self.cgroup.limit and (not self.total or self.cgroup.limit < self.total):
            return self.cgroup.limit, f"the memory cgroup limit in {self.cgroup.limit_file}"
        return self.total, "this machine's memory, MemTotal"

    @property
    def bounded_by(self) -> str:
        if self.override is not None:
            return f"${MEMORY_ENV}" + (" = 0: the check is off" if not self.override else "")
        if self.cgroup and self.cgroup.limit and self.cgroup.limit <= (self.available or self.cgroup.limit):
            return f"the memory cgroup limit in {self.cgroup.limit_file}"
        return "this machine's available memory, MemAvailable"


def machine_memory(*, proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT,
                   meminfo: Path = MEMINFO, env: Mapping[str, str] | None = None) -> MachineMemory:
    """This machine's memory as a build sees it (the paths and environment are parameters for tests)."""
    env = os.environ if env is None else env
    override: int | None = None
    raw = env.get(MEMORY_ENV, "").strip()
    if raw:
        if not raw.isdigit():
            raise UserError(f"${MEMORY_ENV} must be a whole number of MiB (0 turns the build memory check off), "
                            f"not {raw!r}.", hint=f"export {MEMORY_ENV}=16384", field=MEMORY_ENV)
        override = int(raw) * MIB
    info = _meminfo(meminfo)
    available = info.get("MemAvailable", 0)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return MachineMemory(total=info.get("MemTotal", 0), available=available + _own_rss() if available else 0,
                         cgroup=find_cgroup(proc_cgroup, root), override=override, cores=cores)


# -- the plan of one build ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildCost:
    """What building this model for this target costs on the build machine, and whether the machine holds it."""

    exporter: str  # the export format whose converter runs
    tool: str
    params: int
    export_peak: int  # edgepack's process plus the converter's, at the converter's peak
    gate_peak: int  # the quality gate's fp32 reference
    peak: int  # the larger of the two: the build's planned peak
    seconds: float  # rough, cold, gate on, on a 2-core runner
    cores: int  # this machine's
    budget: int  # what this machine (or its memory cgroup) can give; 0 = unknown or the check is off
    bounded_by: str
    fits: bool
    suggestion: str  # what would hold it, when it does not fit
    basis: str  # the constants, in words


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f} GiB"


def cost_of(exporter: str, scheme: str, algorithm: str, params: int, machine: MachineMemory, *,
            resident: int | None = None, sampling_kv: int = 0) -> BuildCost:
    """`resident`: the parameters the layered float reference holds at once (gate_peak); all when unknown.
    `sampling_kv`: the calibration sample's KV cache (export_peak)."""
    row = export_cost(_row(exporter, scheme, algorithm))
    export_b = export_peak(exporter, scheme, params, algorithm, resident, sampling_kv)
    gate_b = gate_peak(params, resident)
    peak = max(export_b, gate_b)
    budget = machine.budget
    fits = not budget or peak <= budget * (100 - BUILD_HEADROOM_PCT) / 100
    suggestion = ""
    if not fits:
        usable = budget * (100 - BUILD_HEADROOM_PCT) / 100
        others = [f"--format {name} (~{_gib(max(export_peak(name, scheme, params, algorithm, resident), gate_b))})"
                  for name in FORMATS if name != exporter
                  and max(export_peak(name, scheme, params, algorithm, resident), gate_b) <= usable]
        plain = max(export_peak(exporter, scheme, params), gate_b)
        if algorithm in ALGORITHMS and export_b > plain and plain <= usable:
            others.append(f'quantize.algorithm = "default" in the target (~{_gib(plain)}, without the {algorithm} '
                          "pass)")
        need = int(peak * 100 / (100 - BUILD_HEADROOM_PCT))
        suggestion = ("; ".join([*others, f"a build machine (or runner) with at least {_gib(need)} of memory"])
                      + (f". The {row.tool} {row.why}. " if "streamed" in row.tool else
                         f". Another quantize.scheme does not help: the {row.tool} {row.why}. ")
                      + f"{MEMORY_ENV}=0 builds anyway (the converter may then be killed for memory).")
    basis = (f"{row.tool}: {_gib(row.base)} + {row.bytes_per_param:g} bytes/parameter; gate: fp32 reference "
             f"one decoder layer at a time, {_gib(GATE_BASE)} + {GATE_BYTES_PER_RESIDENT_PARAM:g} bytes per resident "
             f"parameter, then the bundle in its runtime, {_gib(RUNTIME_BASE)} + {RUNTIME_BYTES_PER_PARAM:g} "
             "bytes/parameter")
    return BuildCost(exporter, row.tool, params, export_b, gate_b, peak,
                     build_seconds(exporter, algorithm, params), machine.cores, budget, machine.bounded_by, fits,
                     suggestion, basis)


def build_cost(config: Mapping[str, Any], target: TargetProfile, machine: MachineMemory) -> BuildCost:
    """The cost of building the model of `config` for `target` (its export format, scheme and algorithm)."""
    from edgepack.shape import ModelShape, count_params

    shape = ModelShape.from_config(config)
    count = count_params(shape)
    per_layer = (count.attention + count.mlp + count.norms) // max(1, shape.layers)
    resident = count.embedding + count.head + per_layer
    from edgepack.backends.calibration import Calibration

    cal = Calibration()
    sampling_kv = shape.layers * 2 * shape.kv_heads * shape.head_dim * 4 * cal.samples * cal.tokens  # fp32, CPU
    q = target.quantize
    return cost_of(target.export.format, q.scheme, q.algorithm, count.total, machine, resident=resident,
                   sampling_kv=sampling_kv)


def check_build_memory(cost: BuildCost, model: str) -> None:
    """Refuse a build this machine cannot hold, before the converter starts."""
    if cost.fits:
        return
    raise BuildOutOfMemoryError(
        f"building {model} needs about {_gib(cost.peak)} of memory at its peak ({cost.tool}: "
        f"{_gib(cost.export_peak)}; quality gate: {_gib(cost.gate_peak)}), but {cost.bounded_by} gives "
        f"{_gib(cost.budget)} (a build keeps {BUILD_HEADROOM_PCT:g} % free); nothing was exported.",
        hint="Use " + cost.suggestion + " `edgepack plan` shows the estimate.",
        stage="plan", planned_peak_mib=round(cost.peak / MIB), measured_peak_mib=None,
        limit_mib=round(cost.budget / MIB), limited_by=cost.bounded_by, tool=cost.tool)


# -- running a converter ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConverterRun:
    """A converter process that ran: its exit code (negative: the signal that ended it), the tail of its log,
    its peak RSS, its time, and the OOM kills its cgroup counted while it ran (None: not readable)."""

    code: int
    tail: list[str]
    peak_rss: int
    seconds: float
    oom_kills: int | None


def run_converter(cmd: list[str], log: Path, **env: str) -> ConverterRun:
    """Run a converter with its output in `log` (offline hub), measuring its peak RSS (wait4's ru_maxrss)."""
    import subprocess

    cg = find_cgroup()
    before = oom_kills(cg)
    t0 = time.monotonic()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **env})
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    after = oom_kills(cg)
    note_converter_peak(usage.ru_maxrss)
    return ConverterRun(code, log.read_text(errors="replace").splitlines()[-15:], usage.ru_maxrss * 1024,
                        round(time.monotonic() - t0, 2),
                        after - before if after is not None and before is not None else None)


_OOM_TEXT = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


def out_of_memory(run: ConverterRun, *, tool: str, model: str, config: Mapping[str, Any] | None = None,
                  target: TargetProfile | None = None,
                  machine: MachineMemory | None = None) -> BuildOutOfMemoryError | None:
    """The error for a converter that died for lack of memory (killed by the kernel's OOM killer, or its own
    allocation failed), with the planned peak when `config` and `target` are given; None for any other failure."""
    killed = run.code in (-signal.SIGKILL, 128 + signal.SIGKILL)
    said = next((line for line in reversed(run.tail) if any(t in line for t in _OOM_TEXT)), None)
    if not killed and said is None:
        return None
    try:
        machine = machine or machine_memory()
    except UserError:  # a bad override was refused before the export; read the machine itself
        machine = machine_memory(env={})
    cost = build_cost(config, target, machine) if config is not None and target is not None else None
    limit, limited_by = machine.hard_limit
    if killed and run.oom_kills:
        how = f"killed by the kernel's OOM killer (its memory cgroup counted {run.oom_kills} OOM kill(s))"
    elif killed:
        how = "killed by SIGKILL, which is the kernel's OOM killer unless someone killed it"
    else:
        how = f"out of memory ({said.strip() if said else ''})"
    planned = f"; edgepack plans about {_gib(cost.peak)} for this build" if cost else ""
    need = f"at least {_gib(cost.peak)}" if cost else "more"
    return BuildOutOfMemoryError(
        f"the {tool} was {how} converting {model}, after {run.seconds:.0f} s at {_gib(run.peak_rss)} of RSS; "
        f"{limited_by} is {_gib(limit)}{planned}.",
        hint=f"Build on a machine (or runner) with {need} of memory; `edgepack plan` shows the estimate.",
        stage="export", planned_peak_mib=round(cost.peak / MIB) if cost else None,
        measured_peak_mib=round(run.peak_rss / MIB), limit_mib=round(limit / MIB) if limit else None,
        limited_by=limited_by, tool=tool, exit_code=run.code, oom_kills=run.oom_kills, log_tail=run.tail)
