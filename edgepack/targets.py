"""Target profiles: one TOML per device, validated by one schema that rejects unknown keys."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import tomllib

from edgepack.errors import TargetError, UnknownNameError
from edgepack.resources import shipped_dir

Scheme = Literal["int4", "int8", "fp16", "fp32"]
Precision = Literal["int4", "int8", "fp32", "same"]
# quantize.litert_layers: the parts of a LiteRT decoder a rule can name, and what it can make of them
# (edgepack/backends/litert_recipe.py matches them to the exported op names).
LITERT_PARTS = ("embedding", "attention.qkv", "attention.output", "feedforward.gate", "feedforward.up",
                "feedforward.down", "head")
LITERT_MODES = ("dynamic", "weight_only", "fp16", "float")


@dataclass(frozen=True)
class LayerRule:
    """quantize.litert_layers entry: `mode` for `parts` in `blocks` (None: every block; "outliers": the blocks
    where SmoothQuant's calibration found the part's input an outlier, resolved at build time); later rules win."""

    parts: tuple[str, ...]
    mode: str
    blocks: tuple[int, ...] | Literal["outliers"] | None = None

    def describe(self) -> str:
        where = ("every block" if self.blocks is None else "the outlier blocks" if self.blocks == "outliers"
                 else f"blocks {list(self.blocks)}")
        return f"{', '.join(self.parts)} in {where} → {self.mode}"


@dataclass(frozen=True)
class DeviceSpec:
    """Facts about the device; `arch = "native"` means the build machine itself."""

    arch: str
    description: str = ""
    cpu_features: tuple[str, ...] = ()
    ram_mb: int = 0
    accelerator: Literal["none", "cuda", "npu", "gpu"] = "none"
    os: str = "linux"
    python: str = "3.11"  # "native" = the build machine's
    glibc: str = "2.31"
    wheel_platforms: tuple[str, ...] = ()  # pip --platform tags; empty = the build machine's own


@dataclass(frozen=True)
class ExportSpec:
    format: str = "onnx"  # one of EXPORT_FORMATS
    execution_provider: Literal["cpu", "cuda"] = "cpu"


@dataclass(frozen=True)
class QuantizeSpec:
    scheme: Scheme = "int4"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    # default/rtn/k_quant: the builder's; gptq, imatrix: edgepack's, rewriting the builder's symmetric int4 weights
    # (imatrix: activation-weighted scale search, the same graph and speed as RTN); weight_only: TFLite's int8
    # recipe with int8 weights and float activations; smoothquant: TFLite dynamic int8 with activation outliers
    # migrated into the weights before export (edgepack/backends/smooth.py; dynamic int8's graph and speed)
    algorithm: Literal["default", "rtn", "k_quant", "gptq", "imatrix", "weight_only", "smoothquant"] = "default"
    # gptq, imatrix, smoothquant: a UTF-8 text of the device's domain; empty = sampled from the model
    calibration_text: str = ""
    head_precision: Precision = "same"  # lm_head MatMul: int8 keeps the tied head accurate
    embedding_precision: Literal["fp32", "quantized"] = "fp32"
    sensitive_layers_int8: bool = False  # first/last eighth + every third block's qkv/v/down at int8
    int8_layers: tuple[int, ...] = ()  # per-layer override: these decoder blocks' matmuls at int8 (-1 = last)
    # TFLite int8: per-part, per-block modes over the whole-model recipe (algorithm), e.g.
    # [{ parts = ["feedforward.down"], blocks = [0, 29], mode = "weight_only" }]
    litert_layers: tuple[LayerRule, ...] = ()


@dataclass(frozen=True)
class QualitySpec:
    max_ppl_increase_pct: float = 10.0
    max_mean_kl: float = 0.2
    min_top1_agreement: float = 0.8
    min_greedy_match: int = 24  # of 32 reference greedy tokens, teacher-forced
    golden_tokens: int = 16  # greedy tokens the device must reproduce in its smoke test
    device_max_ppl_drift_pct: float = 3.0  # on-device perplexity of a short text vs the build machine's
    device_min_top1: float = 0.9  # on-device top-1 agreement with the build machine's picks on that text
    # A UTF-8 text of the device's own domain to score instead of the shipped one (relative to the target file;
    # `build --eval-text FILE` sets it). Perplexity, KL, top-1 and the device's check text all come from it.
    eval_text: str = ""
    # A JSONL file of task checks (edgepack/quality/checks.py; `build --checks FILE` sets it): the quantized
    # model may fail at most checks_max_drop (a fraction of the checks) more of them than the float model.
    checks: str = ""
    checks_max_drop: float = 0.0


MAX_PROMPT_CACHE_SLOTS = 8
MIN_CONTEXT = 256  # tokens: the quality gate's chat prompt + 32-token reply and the 128-token device check fit


@dataclass(frozen=True)
class RuntimeSpec:
    template: str = "onnxruntime-genai"
    threads: int = 0  # 0 = runtime default
    packages: tuple[str, ...] = ("onnxruntime-genai", "onnxruntime")  # versions pinned to the build's
    max_new_tokens: int = 128
    # Tokens of prompt + reply the bundle holds (KV cache length); 0 = the model's own max_position_embeddings
    # (ONNX) or 1024 (LiteRT, whose KV cache is allocated at this length). Recorded in the manifest; the runner
    # refuses longer prompts and stops generation there.
    context_length: int = 0
    # K/V precision: auto = the graph's own (fp32 on the CPU, fp16 on CUDA); int8: calibrated per-channel K/V in
    # onnxruntime's GroupQueryAttention, a quarter of fp32 per token. Each exporter says which it supports
    # (backends/kv_cache.py for ONNX; docs/targets.md has the measurements, and why not int4).
    kv_cache: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    # Prefix reuse (ONNX): conversations whose KV state the server keeps for their next request (0 = none), and
    # the MiB those kept states may take in all (0 = each holds the whole context). `edgepack plan` counts them;
    # docs/serve.md ("Prompt cache") has the measurements.
    prompt_cache_slots: int = 1
    prompt_cache_mb: int = 0
    # Speculative decoding by default (ONNX): "ngram" (prompt lookup: drafts copied from the tokens seen, checked
    # by one batched pass), "off", or "auto": off, unless `build --tune` measured n-gram faster on the device
    # (its extraction and chat scenarios; docs/performance.md). A request may choose either.
    speculative: Literal["auto", "off", "ngram"] = "auto"
    android_sample: bool = False  # render android/ (Kotlin + Gradle integration sample) into the bundle


@dataclass(frozen=True)
class DeploySpec:
    method: str = "ssh"
    install_dir: str = "~/edgepack"
    keep_releases: int = 3
    systemd: bool = False
    smoke_tokens: int = 16
    ssh_port: int = 22  # when neither --port nor ~/.ssh/config names one (Termux's sshd listens on 8022)
    # minisign public keys (base64 "RW...", or .pub files relative to the target file): deploy refuses a bundle
    # not signed by one of them, and the device's install step checks the signature again.
    trusted_keys: tuple[str, ...] = ()
    # Where the service serves the OpenAI-compatible API (HOST:PORT or unix:PATH); deploy --serve-addr overrides.
    serve_addr: str = "127.0.0.1:8089"


@dataclass(frozen=True)
class BundleSpec:
    # SPDX license ids this team refuses to ship (e.g. ["GPL-3.0-only", "AGPL-3.0-only"]; "UNKNOWN" refuses
    # components whose license cannot be read): a build with one fails, naming the component (the SBOM lists all).
    deny_licenses: tuple[str, ...] = ()


@dataclass(frozen=True)
class TuneCandidate:
    name: str
    quantize: QuantizeSpec


@dataclass(frozen=True)
class TuneSpec:
    """`edgepack build --tune`: each candidate overrides [quantize]; the fastest that passes the gate wins."""

    candidates: tuple[TuneCandidate, ...] = ()
    speed_tokens: int = 64
    reps: int = 3


@dataclass(frozen=True)
class TargetProfile:
    id: str
    source: str  # the file it came from
    device: DeviceSpec
    export: ExportSpec = field(default_factory=ExportSpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    deploy: DeploySpec = field(default_factory=DeploySpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    bundle: BundleSpec = field(default_factory=BundleSpec)

    @property
    def speculative(self) -> str:
        """runtime.speculative as the bundle's runner has it: `auto` that no tune measured is off."""
        return "off" if self.runtime.speculative == "auto" or self.export.format != "onnx" else self.runtime.speculative

    def resolved_arch(self) -> str:
        return platform.machine() if self.device.arch == "native" else self.device.arch

    def resolved_python(self) -> str:
        if self.device.python == "native":
            return f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.device.python

    @property
    def is_native(self) -> bool:
        return self.resolved_arch() == platform.machine()


_SECTIONS: dict[str, type] = {
    "device": DeviceSpec,
    "export": ExportSpec,
    "quantize": QuantizeSpec,
    "quality": QualitySpec,
    "runtime": RuntimeSpec,
    "deploy": DeploySpec,
    "bundle": BundleSpec,
}


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {get_args(tp)[0].__name__}s"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, src: str) -> Any:
    def bad() -> TargetError:
        return TargetError(
            f"{src}: field '{where}' is {value!r}, expected {_describe(tp)}.",
            hint="Fix the value in the target file; `edgepack targets show <id>` prints a valid example.",
            path=src,
            field=where,
            allowed=_describe(tp),
        )

    origin = get_origin(tp)
    if origin is tuple and get_args(tp)[0] is LayerRule:
        if not isinstance(value, list):
            raise bad()
        return layer_rules(value, where, src)
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool) != isinstance(get_args(tp)[0], bool):
            raise bad()
        return value
    if origin is tuple:
        item = get_args(tp)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise bad()
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"schema type {tp!r} not handled")


def layer_rules(raw: list[Any], where: str = "quantize.litert_layers", src: str = "") -> tuple[LayerRule, ...]:
    """[{parts = [...], mode = "...", blocks = [...]}, ...] → rules, each checked with the field it came from."""
    rules = []
    for i, item in enumerate(raw):
        field_ = f"{where}[{i}]"
        item = item if isinstance(item, dict) else {"": item}
        unknown = sorted(set(item) - {"parts", "mode", "blocks"})
        parts = item.get("parts")
        parts = [parts] if isinstance(parts, str) else parts
        bad_parts = [p for p in parts or [] if p not in LITERT_PARTS]
        mode, blocks = item.get("mode"), item.get("blocks")
        problem = (f"unknown keys {unknown} (allowed: parts, mode, blocks)" if unknown else
                   "needs parts = [...]" if not parts or not isinstance(parts, list) else
                   f"unknown parts {bad_parts}; parts are {list(LITERT_PARTS)}" if bad_parts else
                   f"mode {mode!r} is not one of {list(LITERT_MODES)}" if mode not in LITERT_MODES else
                   'blocks must be a list of block numbers (0 is the first) or "outliers"' if blocks is not None
                   and blocks != "outliers" and not (isinstance(blocks, list) and blocks and all(
                       isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)) else None)
        if problem:
            raise TargetError(f"{src + ': ' if src else ''}{field_}: {problem}.", path=src or None, field=field_,
                              hint='Example: { parts = ["feedforward.down"], blocks = [0, 29], mode = "weight_only" }.')
        rules.append(LayerRule(tuple(str(p) for p in parts or ()), str(mode),
                               "outliers" if blocks == "outliers" else tuple(blocks) if blocks is not None else None))
    return tuple(rules)


def _build(cls: type, data: dict[str, Any], prefix: str, src: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TargetError(
            f"{src}: unknown key '{prefix}{unknown[0]}'. Allowed in [{prefix.rstrip('.')}]: "
            f"{', '.join(sorted(known))}.",
            hint="Check the spelling; docs/targets.md lists every field.",
            path=src,
            field=prefix + unknown[0],
            allowed=sorted(known),
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k, src) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [f.name for f in fields(cls) if f.name not in data]
        raise TargetError(
            f"{src}: [{prefix.rstrip('.')}] is missing required field(s): {', '.join(missing)}.",
            hint="Add them; docs/targets.md lists every field.",
            path=src,
            field=prefix + (missing[0] if missing else ""),
        ) from exc


def parse_target(data: dict[str, Any], *, target_id: str, source: str) -> TargetProfile:
    unknown = sorted(set(data) - set(_SECTIONS) - {"tune"})
    if unknown:
        raise TargetError(
            f"{source}: unknown section or key '{unknown[0]}'. Allowed sections: {', '.join(_SECTIONS)}, tune.",
            hint="Check the spelling; docs/targets.md lists every field.",
            path=source,
            field=unknown[0],
            allowed=list(_SECTIONS),
        )
    if "device" not in data:
        raise TargetError(f"{source}: missing the [device] section.", hint="Add [device] with at least `arch`.",
                          path=source, field="device")
    parts: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise TargetError(f"{source}: '{name}' must be a [table].", path=source, field=name)
        parts[name] = _build(cls, section, f"{name}.", source)
    parts["tune"] = _parse_tune(data.get("tune", {}), data.get("quantize", {}), source)
    profile = TargetProfile(id=target_id, source=source, **parts)
    check_rules(profile)
    return profile


def _parse_tune(section: Any, base_quantize: dict[str, Any], source: str) -> TuneSpec:
    if not isinstance(section, dict):
        raise TargetError(f"{source}: 'tune' must be a [table].", path=source, field="tune")
    unknown = sorted(set(section) - {"candidates", "speed_tokens", "reps"})
    if unknown:
        raise TargetError(f"{source}: unknown key 'tune.{unknown[0]}'. Allowed in [tune]: candidates, reps, "
                          "speed_tokens.", path=source, field=f"tune.{unknown[0]}",
                          allowed=["candidates", "reps", "speed_tokens"])
    raw = section.get("candidates", [])
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise TargetError(f"{source}: tune.candidates must be a list of inline tables of [quantize] fields.",
                          path=source, field="tune.candidates")
    candidates = []
    for i, cand in enumerate(raw):
        fields_ = dict(cand)
        name = str(fields_.pop("name", f"candidate-{i + 1}"))
        q = _build(QuantizeSpec, {**base_quantize, **fields_}, f"tune.candidates[{i}].", source)
        candidates.append(TuneCandidate(name, q))
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise TargetError(f"{source}: tune.candidates names must be unique ({names}).", path=source,
                          field="tune.candidates")
    speed_tokens = _coerce(section.get("speed_tokens", 64), int, "tune.speed_tokens", source)
    reps = _coerce(section.get("reps", 3), int, "tune.reps", source)
    return TuneSpec(tuple(candidates), speed_tokens, reps)


# The export formats a profile may name: the exporters registered in edgepack/backends under these names (a unit
# test keeps the two equal). Data here, so that the schema is checked without importing the exporters; each
# exporter checks its own format's rules (`backends.check_profile`) before a build or plan uses the profile.
EXPORT_FORMATS = ("onnx", "tflite")


def check_rules(p: TargetProfile) -> None:
    """The rules every format shares (its exporter checks its own: backends.check_profile)."""
    if p.export.format not in EXPORT_FORMATS:
        raise UnknownNameError("export format", p.export.format, EXPORT_FORMATS,
                               hint=f"Fix export.format in {p.source}.")
    q = p.quantize
    # imatrix searches asymmetric (integer zero point) grids too; GPTQ's error feedback is symmetric only.
    if q.algorithm in ("gptq", "imatrix") and (q.scheme != "int4" or q.sensitive_layers_int8
                                               or (q.algorithm == "gptq" and not q.symmetric)):
        what = "symmetric int4" if q.algorithm == "gptq" else "int4"
        raise TargetError(
            f"{p.source}: quantize.algorithm = \"{q.algorithm}\" works on {what} weights only "
            f"(scheme={q.scheme}, symmetric={q.symmetric}, sensitive_layers_int8={q.sensitive_layers_int8}).",
            hint=f"Use scheme = \"int4\"{', symmetric = true' if q.algorithm == 'gptq' else ''}, "
                 "sensitive_layers_int8 = false (int8_layers and head_precision still apply).",
            path=p.source, field="quantize.algorithm")
    if q.calibration_text and q.algorithm not in ("gptq", "imatrix", "smoothquant"):
        raise TargetError(f"{p.source}: quantize.calibration_text is read by algorithm = \"gptq\", \"imatrix\" or "
                          "\"smoothquant\" only.", hint="Remove it, or set one of those algorithms.", path=p.source,
                          field="quantize.calibration_text")
    if not 0 <= p.quality.min_greedy_match <= 32:
        raise TargetError(f"{p.source}: quality.min_greedy_match must be between 0 and 32 (of 32 greedy tokens).",
                          path=p.source, field="quality.min_greedy_match", allowed="0..32")
    if p.runtime.context_length < 0 or 0 < p.runtime.context_length < MIN_CONTEXT:
        raise TargetError(f"{p.source}: runtime.context_length must be 0 (the model's own) or at least "
                          f"{MIN_CONTEXT} tokens (the gate's prompt and reply, and the device's 128-token check text, "
                          "must fit).", path=p.source, field="runtime.context_length", allowed=f"0 or >= {MIN_CONTEXT}")
    if p.runtime.context_length and p.runtime.max_new_tokens >= p.runtime.context_length:
        raise TargetError(f"{p.source}: runtime.max_new_tokens ({p.runtime.max_new_tokens}) must be below "
                          f"runtime.context_length ({p.runtime.context_length}): the prompt needs room too.",
                          path=p.source, field="runtime.max_new_tokens")
    if not 0 <= p.runtime.prompt_cache_slots <= MAX_PROMPT_CACHE_SLOTS or p.runtime.prompt_cache_mb < 0:
        raise TargetError(f"{p.source}: runtime.prompt_cache_slots must be 0 (off) to {MAX_PROMPT_CACHE_SLOTS}, and "
                          "runtime.prompt_cache_mb 0 (each slot holds the whole context) or more.", path=p.source,
                          field="runtime.prompt_cache_slots", allowed=f"0..{MAX_PROMPT_CACHE_SLOTS}")
    if p.runtime.prompt_cache_mb and p.export.format != "onnx":
        raise TargetError(f"{p.source}: runtime.prompt_cache_mb sizes ONNX bundles' prompt cache slots; a LiteRT "
                          "runner allocates each slot's K/V at the whole context.",
                          hint="Remove it; runtime.prompt_cache_slots sets how many (each one context's K/V).",
                          path=p.source, field="runtime.prompt_cache_mb")
    if p.runtime.speculative == "ngram" and p.export.format != "onnx":
        raise TargetError(f"{p.source}: runtime.speculative = \"{p.runtime.speculative}\" needs onnxruntime-genai "
                          f"(export.format = \"onnx\"); the {p.export.format} runners decode one token at a time.",
                          hint="Set runtime.speculative = \"off\" for this target.", path=p.source,
                          field="runtime.speculative", allowed=["auto", "off"])
    if not 1 <= p.quality.golden_tokens <= 32:
        raise TargetError(f"{p.source}: quality.golden_tokens must be between 1 and 32.",
                          path=p.source, field="quality.golden_tokens", allowed="1..32")


def _shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(shipped_dir("targets").glob("*.toml"), key=lambda p: p.stem)}  # id order


TARGET_PATH_ENV = "EDGEPACK_TARGET_PATH"  # folders (os.pathsep-separated) of this machine's own target files


def find_target(target_id: str) -> Path | None:
    """This machine's file for a target id: a shipped one, else `<folder>/<id>.toml` in $EDGEPACK_TARGET_PATH.
    What deploy uses to learn a bundle's signing policy: the deploying machine's copy, never the bundle's."""
    import os

    shipped = _shipped()
    if target_id in shipped:
        return shipped[target_id]
    if not target_id or "/" in target_id or "\\" in target_id or target_id.startswith("."):
        return None
    for folder in filter(None, os.environ.get(TARGET_PATH_ENV, "").split(os.pathsep)):
        path = Path(folder).expanduser() / f"{target_id}.toml"
        if path.is_file():
            return path
    return None


def list_targets() -> list[TargetProfile]:
    return [load_target(str(path)) for path in _shipped().values()]


def load_target(ref: str) -> TargetProfile:
    """A shipped target id (`rpi5`) or a path to a user's TOML (`./my-board.toml`)."""
    path = Path(ref)
    if ref.endswith(".toml") or path.exists():
        if not path.is_file():
            raise TargetError(f"target file {ref} does not exist.", hint="Check the path.", path=ref)
        target_id = path.stem
    else:
        shipped = _shipped()
        if ref not in shipped:
            raise UnknownNameError("target", ref, list(shipped),
                                   hint="`edgepack targets list` shows them; or pass a path to your own .toml.")
        path = shipped[ref]
        target_id = ref
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML ({exc}).", hint="Fix the syntax.", path=str(path)) from exc
    return parse_target(data, target_id=target_id, source=str(path))


def profile_to_dict(p: TargetProfile) -> dict[str, Any]:
    from edgepack.output import to_jsonable

    assert is_dataclass(p)
    return to_jsonable(p)
