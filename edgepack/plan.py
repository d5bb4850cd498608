"""Fit before build: a model's memory on a target (weights, KV cache, runtime), estimated from config.json alone.

Every number comes from the Hugging Face config and the quantization knobs, so a plan costs milliseconds and needs
no torch, numpy or model weights. The byte layouts follow what edgepack's exporters write (the onnxruntime-genai
builder's MatMulNBits tensors, litert-torch's recipes); the runtime constants are fitted to peak RSS measured on
real bundles, and docs/plan.md records how far the estimate is from each measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from edgepack.context import DEFAULT_LITERT_CONTEXT, ContextChoice, choose_context, model_context
from edgepack.errors import UserError
from edgepack.shape import ModelShape, ParamCount, count_params
from edgepack.weights import WeightBytes, io_bytes, litert_recipe, litert_weights, onnx_weights

if TYPE_CHECKING:
    from edgepack.build_memory import BuildCost, MachineMemory
    from edgepack.targets import TargetProfile

Scheme = Literal["int4", "int8", "fp16", "fp32"]
MIB = 1 << 20

# --- Runtime constants, fitted to peak RSS (VmHWM) of the bundles' own run.py (docs/plan.md has the data) -------
# onnxruntime-genai on the CPU: the runner's Python and the runtime's libraries (~63 MiB with a 512-token
# vocabulary) plus about 1.1 KiB per vocabulary entry (the tokenizer's tables: 53 MiB more for SmolLM2's 49,152).
ORT_BASE_BYTES = 63 * MIB
ORT_BYTES_PER_VOCAB = 1126
# Prefill runs the whole prompt at once, and its arena grows linearly with the prompt: fp32 logits for every
# position (vocab × 4 bytes) plus ~80 bytes per hidden unit (measured 65-86 on hidden sizes 64, 576 and 1024).
ORT_PREFILL_BYTES_PER_HIDDEN = 80
# LiteRT-LM (litert-lm-api) on the CPU with a 1024-token KV cache, less weights and KV: fixed prefill buffers
# (prefill runs in chunks of 128 tokens), the runtime and Python (SmolLM2-135M dynamic int8: 356 MiB peak).
LITERT_BASE_BYTES = 175 * MIB


@dataclass(frozen=True)
class PlanRequest:
    """What to estimate: a config.json, the profile's quantization knobs, the context and the device's RAM."""

    config: Mapping[str, Any] = field(metadata={"json": False})
    fmt: Literal["onnx", "tflite"] = "onnx"
    scheme: Scheme = "int4"
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "default"  # quantize.algorithm; k_quant stores zero points even when symmetric
    head_precision: Literal["int4", "int8", "fp32", "same"] = "same"
    embedding_precision: Literal["fp32", "quantized"] = "fp32"
    sensitive_layers_int8: bool = False
    int8_layers: tuple[int, ...] = ()
    recipe: str | None = None  # tflite: a litert-torch recipe (LITERT_RECIPES); None = the scheme's own
    execution_provider: Literal["cpu", "cuda"] = "cpu"
    context: int = 0  # prompt + reply tokens; 0 = the model's max_position_embeddings (onnx) or 1024 (tflite)
    prompt_tokens: int = 0  # tokens prefilled at once; 0 = a prompt that fills the context (the worst case)
    ram_mb: int = 0  # the device's RAM in MiB; 0 = unknown (the plan then fits by definition)
    kv_cache: str = "auto"  # runtime.kv_cache: auto (the graph's own: fp32 on the CPU, fp16 on CUDA), fp32, fp16, int8
    headroom_pct: float = 10.0  # RAM kept free for the OS and the estimate's error
    prompt_cache_slots: int = 0  # runtime.prompt_cache_slots (ONNX): KV states the server keeps between requests
    prompt_cache_mb: int = 0  # runtime.prompt_cache_mb: what they may hold in all (0: each the whole context)

    @classmethod
    def for_target(cls, config: Mapping[str, Any], target: TargetProfile, *, context: int = 0,
                   fmt: str | None = None) -> PlanRequest:
        """The request a build with `target` would make; `context` 0 = the target's runtime.context_length."""
        q = target.quantize
        chosen = fmt or target.export.format
        if chosen not in ("onnx", "tflite"):
            raise UserError(f"a plan knows the onnx and tflite formats, not '{chosen}'.", field="export.format",
                            allowed=["onnx", "tflite"])
        recipe = "weight_only_int8" if chosen == "tflite" and q.algorithm == "weight_only" else None
        return cls(config=config, fmt=chosen, scheme=q.scheme,  # type: ignore[arg-type]
                   block_size=q.block_size, symmetric=q.symmetric, algorithm=q.algorithm,
                   head_precision=q.head_precision, embedding_precision=q.embedding_precision,
                   sensitive_layers_int8=q.sensitive_layers_int8, int8_layers=q.int8_layers, recipe=recipe,
                   execution_provider=target.export.execution_provider,
                   context=context or target.runtime.context_length, ram_mb=target.device.ram_mb,
                   kv_cache=target.runtime.kv_cache if chosen == "onnx" else "auto",
                   # litert-lm keeps no K/V between requests; the plain litert runner and onnxruntime-genai do
                   prompt_cache_slots=target.runtime.prompt_cache_slots
                   if chosen == "onnx" or target.runtime.template == "litert" else 0,
                   prompt_cache_mb=target.runtime.prompt_cache_mb)


@dataclass(frozen=True)
class KvCache:
    """The KV cache at `context` tokens, as edgepack allocates it, and what a window-sized cache would take."""

    context: int
    element_bytes: float  # 4: fp32 K/V (onnxruntime-genai on the CPU, LiteRT); 2 on CUDA; 1 int8; 0.5 int4
    bytes_per_token: int  # all layers
    window: int
    sliding_layers: int
    allocated: int  # full length on every layer (the builder's windowed_kv_cache=false; LiteRT's masks)
    windowed: int  # sliding layers holding only `window` tokens
    dtype: str = "fp32"  # fp32, fp16, int8, int4 (runtime.kv_cache)
    # 1: past and present share one buffer of `context` tokens; 2: a quantized cache on the CPU, where the runtime
    # keeps the past and the present (one token longer) as separate tensors (the builder's past_present_share_buffer)
    buffers: int = 1


@dataclass(frozen=True)
class PromptCacheSize:
    """The KV states the server keeps between requests (prefix reuse): `slots` of `tokens` each, `kept` bytes."""

    slots: int = 0
    tokens: int = 0
    kept: int = 0


@dataclass(frozen=True)
class Suggestion:
    """What would fit when the plan does not: a shorter context and/or a smaller scheme."""

    max_context: int  # the largest context (a multiple of 64, at least 64) that fits as requested; 0 = none
    scheme: str | None  # the most precise scheme no larger on disk that fits the requested context; None = none
    recipe: str | None  # tflite: the recipe of `scheme`
    total: int  # bytes that scheme takes at the requested context (0 when scheme is None)
    message: str
    # the most precise runtime.kv_cache that fits the requested context with the requested scheme; None = none
    kv_cache: str | None = None
    kv_max_context: int = 0  # the largest context that fits with the most compact runtime.kv_cache offered


@dataclass(frozen=True)
class Plan:
    """Whether a model fits a device, with the parts that add up to the estimated peak RSS."""

    request: PlanRequest
    runtime: str
    shape: ModelShape
    params: ParamCount
    weights: WeightBytes
    kv: KvCache
    prefill: int  # activations of prefilling the prompt at once (ONNX): the whole context unless prompt_tokens
    runtime_overhead: int  # the runtime, its tokenizer and Python, with no model weights
    total: int  # estimated peak RSS
    budget: int  # the device's RAM less the headroom; 0 = unknown
    fits: bool
    suggestion: Suggestion | None
    notes: tuple[str, ...]
    context: ContextChoice | None = None  # how the context was chosen (plan_for_target)
    build: BuildCost | None = None  # the build's own peak memory and time on this machine (plan_for_target)
    prompt_cache: PromptCacheSize = PromptCacheSize()  # counted in `total` beyond the one request's KV cache


KV_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
KV_QUANTIZED = ("int8", "int4")  # backends/kv_cache.py QUANTIZED (int8 is what runtime.kv_cache offers)


def _kv_dtype(req: PlanRequest) -> str:
    """The K/V precision a bundle from `req` has: runtime.kv_cache, `auto` being the graph's own I/O precision."""
    if req.fmt != "onnx" or req.kv_cache == "auto":
        return "fp32" if req.fmt != "onnx" or io_bytes(req) == 4 else "fp16"
    if req.kv_cache not in KV_BITS:
        raise UserError(f"unknown KV cache precision '{req.kv_cache}'.", field="runtime.kv_cache",
                        allowed=["auto", *KV_BITS])
    return req.kv_cache


def _kv(s: ModelShape, context: int, dtype: str = "fp32") -> KvCache:
    bits = KV_BITS[dtype]
    per_layer_token = 2 * s.kv_heads * math.ceil(s.head_dim * bits / 8)  # int4 packs two values a byte
    # A quantized cache on the CPU is not shared between past and present: measured, the peak holds both.
    buffers = 2 if dtype in KV_QUANTIZED else 1
    full_layers = s.layers - s.sliding_layers
    windowed = buffers * per_layer_token * (full_layers * context + s.sliding_layers * min(s.window, context))
    return KvCache(context, bits / 8, per_layer_token * s.layers, s.window, s.sliding_layers,
                   buffers * per_layer_token * s.layers * context, windowed, dtype, buffers)


def _context(s: ModelShape, req: PlanRequest) -> int:
    if req.context < 0:
        raise UserError(f"context must be 0 (the model's own) or a positive token count, not {req.context}.",
                        field="context")
    own = model_context(s, req.fmt)
    if req.context:
        if req.fmt == "onnx" and req.context > own:
            raise UserError(f"context {req.context} is longer than this model's bundles hold ({own} tokens).",
                            hint=f"Pass --context {own} or less (0 = the model's own), or set "
                                 f"runtime.context_length to at most {own} in the target.",
                            field="context", model_context=own)
        return req.context
    return own if req.fmt == "onnx" else min(DEFAULT_LITERT_CONTEXT, own)


MIN_SLOT_TOKENS = 256  # a kept slot shorter than this would hold no chat worth reusing


def prompt_cache_size(req: PlanRequest, kv: KvCache) -> PromptCacheSize:
    """The slots' size: each holds the context, or runtime.prompt_cache_mb shared out, at the KV's bytes/token."""
    if not req.prompt_cache_slots:
        return PromptCacheSize()
    per_token = kv.allocated / kv.context
    tokens = kv.context
    if req.prompt_cache_mb:
        tokens = min(tokens, int(req.prompt_cache_mb * MIB / req.prompt_cache_slots / per_token))
        if tokens < min(MIN_SLOT_TOKENS, kv.context):
            raise UserError(f"runtime.prompt_cache_mb = {req.prompt_cache_mb} gives each of "
                            f"{req.prompt_cache_slots} prompt cache slots {tokens} tokens "
                            f"({per_token / 1024:.0f} KiB of K/V a token); a slot needs {MIN_SLOT_TOKENS} at least.",
                            hint=f"Raise runtime.prompt_cache_mb to "
                                 f"{math.ceil(MIN_SLOT_TOKENS * per_token * req.prompt_cache_slots / MIB)} or more, "
                                 "use fewer slots, or set runtime.prompt_cache_slots = 0 (no reuse).",
                            field="runtime.prompt_cache_mb")
    return PromptCacheSize(req.prompt_cache_slots, tokens, req.prompt_cache_slots * math.ceil(tokens * per_token))


def _bare(req: PlanRequest, s: ModelShape) -> tuple[WeightBytes, KvCache, int, int, int, str]:
    """(weights, kv, prefill, runtime overhead, total, runtime) for one request, without a suggestion. The total
    counts the prompt cache's other slots: a request uses one slot, or frees one for a KV of its own."""
    context = _context(s, req)
    if req.fmt == "onnx":
        weights = onnx_weights(s, req, context)
        kv = _kv(s, context, _kv_dtype(req))
        prompt = min(req.prompt_tokens or context, context)
        prefill = prompt * (ORT_PREFILL_BYTES_PER_HIDDEN * s.hidden
                             + s.vocab * io_bytes(req))
        overhead = ORT_BASE_BYTES + ORT_BYTES_PER_VOCAB * s.vocab
        runtime = "onnxruntime-genai"
    elif req.fmt == "tflite":
        weights = litert_weights(s, req)
        kv = _kv(s, context, "fp32")
        prefill = 0  # fixed 128-token prefill chunks: inside LITERT_BASE_BYTES
        overhead = LITERT_BASE_BYTES
        runtime = "litert-lm"
    else:
        raise UserError(f"a plan knows the onnx and tflite formats, not '{req.fmt}'.", field="fmt",
                        allowed=["onnx", "tflite"])
    loaded = weights.resident + overhead
    cache = prompt_cache_size(req, kv)
    others = cache.kept // cache.slots * (cache.slots - 1) if cache.slots else 0
    total = max(loaded + weights.load_transient, loaded + kv.allocated + prefill + others)
    return weights, kv, prefill, overhead, total, runtime


def _budget(req: PlanRequest) -> int:
    return int(req.ram_mb * MIB * (1 - req.headroom_pct / 100)) if req.ram_mb else 0


def _candidates(req: PlanRequest) -> list[PlanRequest]:
    """Variants of a request, most precise first (`_suggest` keeps those no larger on disk)."""
    if req.fmt == "tflite":
        recipes = ["none", "fp16", "dynamic_int8", f"dynamic_int4_block{req.block_size}"]
        schemes: dict[str, Scheme] = {"none": "fp32", "fp16": "fp16", "dynamic_int8": "int8"}
        return [replace(req, recipe=r, scheme=schemes.get(r, "int4")) for r in recipes]
    schemes_onnx: list[Scheme] = ["fp32", "int8", "int4"]
    if req.execution_provider == "cuda":
        schemes_onnx.insert(1, "fp16")
    out = [replace(req, scheme=sc) for sc in schemes_onnx]
    # The smallest int4: every matmul int4 and the tied embedding shared with the head.
    out.append(replace(req, scheme="int4", head_precision="same", sensitive_layers_int8=False, int8_layers=(),
                       embedding_precision="quantized"))
    return out


def _describe(r: PlanRequest) -> str:
    if r.fmt == "tflite":
        return f"recipe {litert_recipe(r)}"
    extras = [x for x, on in (("int8 head", r.scheme == "int4" and r.head_precision == "int8"),
                              ("int8 sensitive layers", r.scheme == "int4" and r.sensitive_layers_int8),
                              ("quantized embedding", r.embedding_precision == "quantized")) if on]
    return f"scheme {r.scheme}" + (f" ({', '.join(extras)})" if extras else "")


def _max_context(req: PlanRequest, s: ModelShape, budget: int) -> int:
    """The largest context (a multiple of 64) at which `req` fits `budget`; 0 = not even 64 tokens."""
    lo, hi = 0, _context(s, req) // 64  # multiples of 64: the smallest runtime.context_length is 64
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _bare(replace(req, context=mid * 64), s)[4] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * 64


def _kv_options(req: PlanRequest) -> list[PlanRequest]:
    """`req` with each smaller runtime.kv_cache the ONNX exporter makes for it (backends/kv_cache.py), most
    precise first."""
    if req.fmt != "onnx":
        return []
    from edgepack.backends.kv_cache import supported

    now = KV_BITS[_kv_dtype(req)]
    return [replace(req, kv_cache=v) for v in supported(req.execution_provider, req.scheme)
            if v in KV_BITS and KV_BITS[v] < now]


def _suggest(req: PlanRequest, s: ModelShape, budget: int) -> Suggestion:
    context = _context(s, req)
    max_context = _max_context(req, s, budget)
    # The KV cache: the most precise smaller precision that fits the whole context, else how far the most
    # compact one stretches it.
    kv_fit: PlanRequest | None = None
    kv_total = 0
    for cand in _kv_options(req):
        total = _bare(cand, s)[4]
        if total <= budget:
            kv_fit, kv_total = cand, total
            break
    kv_options = _kv_options(req)
    kv_max = 0 if kv_fit is not None or not kv_options else _max_context(kv_options[-1], s, budget)
    best: PlanRequest | None = None
    best_total = 0
    file = _bare(req, s)[0].file
    for cand in _candidates(req):
        if cand == req:
            continue
        weights, *_, total, _runtime = _bare(cand, s)
        if weights.file <= file and total <= budget:  # the most precise of the no larger files
            best, best_total = cand, total
            break
    parts = []
    if max_context:
        parts.append(f"a context of {max_context} tokens fits ({_describe(req)}: --context {max_context}, or "
                     "runtime.context_length in the target)")
    if kv_fit is not None:
        kv_now, kv_then = _bare(req, s)[1], _bare(kv_fit, s)[1]
        parts.append(f"runtime.kv_cache = \"{kv_fit.kv_cache}\" in the target fits the full {context} tokens "
                     f"({kv_total / MIB:.0f} MiB; KV cache {kv_then.allocated / MIB:.0f} MiB instead of "
                     f"{kv_now.allocated / MIB:.0f})")
    elif kv_max > max_context:
        parts.append(f"with runtime.kv_cache = \"{kv_options[-1].kv_cache}\" in the target, a context of {kv_max} "
                     f"tokens fits (--context {kv_max})")
    if best is not None:
        where = ("quantize.scheme in the target" if best.fmt == "onnx" else
                 "quantize.scheme/algorithm in the target")
        parts.append(f"{_describe(best)} fits the full {context} tokens ({best_total / MIB:.0f} MiB; {where})")
    if not parts:
        parts.append("no context of 64 tokens or more fits, at any scheme: choose a smaller model or a device "
                     "with more RAM")
    recipe = litert_recipe(best) if best is not None and best.fmt == "tflite" else None
    return Suggestion(max_context, best.scheme if best is not None else None, recipe, best_total,
                      "; or ".join(parts) + ".", kv_fit.kv_cache if kv_fit is not None else None, kv_max)


def estimate(req: PlanRequest) -> Plan:
    """The memory a bundle built from `req` would take on the device, and whether it fits."""
    s = ModelShape.from_config(req.config)
    weights, kv, prefill, overhead, total, runtime = _bare(req, s)
    budget = _budget(req)
    fits = not budget or total <= budget
    notes: list[str] = []
    if s.window and kv.windowed < kv.allocated:
        notes.append(f"{s.sliding_layers} of {s.layers} layers use a {s.window}-token window, but edgepack "
                     f"allocates full-length KV caches on every layer ({kv.allocated / MIB:.0f} MiB); a windowed "
                     f"cache would take {kv.windowed / MIB:.0f} MiB ({(kv.allocated - kv.windowed) / MIB:.0f} MiB "
                     "less).")
    if req.fmt == "onnx" and prefill:
        notes.append(f"a prompt that fills the context is prefilled at once: {prefill / MIB:.0f} MiB of activations "
                     f"(fp32 logits for every position are {kv.context * s.vocab * io_bytes(req) / MIB:.0f} MiB "
                     "of it); shorter prompts take proportionally less.")
    if req.fmt == "tflite" and litert_recipe(req) == "weight_only_int8":
        notes.append("LiteRT weight-only int8 peaks at ~20x its model file in RAM (XNNPACK unpacks the weights "
                     "to float); recipe dynamic_int8 keeps them int8.")
    if not req.ram_mb:
        notes.append("the device's RAM is unknown (ram_mb = 0): nothing to compare against.")
    suggestion = None if fits else _suggest(req, s, budget)
    return Plan(req, runtime, s, count_params(s), weights, kv, prefill, overhead, total, budget, fits, suggestion,
                tuple(notes), prompt_cache=prompt_cache_size(req, kv))


def plan_for_target(config: Mapping[str, Any], target: TargetProfile, *, context: int = 0,
                    fmt: str | None = None, machine: MachineMemory | None = None) -> Plan:
    """`estimate` for what `edgepack build --target` would make from this config: the context chosen as a build
    chooses it (`context` is --context, 0 = the target's, else the model's own), and what the build itself costs
    on `machine` (None: this machine, read now)."""
    from edgepack.build_memory import build_cost, machine_memory

    choice = choose_context(config, target, context, fmt)
    plan = estimate(PlanRequest.for_target(config, target, context=choice.tokens, fmt=fmt))
    notes = plan.notes + ((f"context {choice.tokens} tokens: {choice.reason}.",) if choice.capped else ())
    cost = build_cost(config, with_format_of(target, fmt), machine or machine_memory())
    return replace(plan, notes=notes, context=choice, build=cost)


def with_format_of(target: TargetProfile, fmt: str | None) -> TargetProfile:
    if fmt is None or fmt == target.export.format:
        return target
    return replace(target, export=replace(target.export, format=fmt))


def check_fits(source: Any, target: Any, context: int = 0) -> Any:
    """The memory plan of what this build would make; refused before exporting when it cannot fit."""
    import json

    from edgepack.errors import UserError
    from edgepack.output import plan_summary

    config = json.loads((source.hf_dir / "config.json").read_text(encoding="utf-8"))
    fit = plan_for_target(config, target, context=context)
    if not fit.fits:
        raise UserError(
            f"{source.name} would not fit target '{target.id}': about {fit.total / 2**20:,.0f} MiB at its peak "
            f"against {target.device.ram_mb:,} MiB of RAM ({fit.kv.context}-token context); nothing was exported.",
            hint=(fit.suggestion.message if fit.suggestion else "Pick a smaller model or scheme.")
            + " `edgepack plan` shows the parts; device.ram_mb = 0 in the target turns the check off.",
            planned_peak_mib=round(fit.total / 2**20, 1), ram_mb=target.device.ram_mb, plan=plan_summary(fit))
    return fit
