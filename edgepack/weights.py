"""A bundle's weight storage per export format: the bytes of its model file and what stays resident once the
runtime has loaded it, computed from the model's shape and the quantize settings (the plan's weights term)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from edgepack.backends.onnx import embedding_table
from edgepack.errors import UserError
from edgepack.shape import Matmul, ModelShape, matmuls


class Quantization(Protocol):
    """The quantize settings weight storage depends on (plan.PlanRequest has them)."""

    @property
    def scheme(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def symmetric(self) -> bool: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def head_precision(self) -> str: ...
    @property
    def embedding_precision(self) -> str: ...
    @property
    def sensitive_layers_int8(self) -> bool: ...
    @property
    def int8_layers(self) -> tuple[int, ...]: ...
    @property
    def recipe(self) -> str | None: ...
    @property
    def execution_provider(self) -> str: ...

MIB = 1 << 20

# Weight-only int8 keeps float activations, and XNNPACK unpacks those weights to float at load: the measured peak
# is 2,943 MiB for a 136 MiB file (docs/performance.md), i.e. ~20× the file beyond the base and KV cache.
LITERT_WEIGHT_ONLY_RESIDENT = 20.0

LITERT_RECIPES = ("none", "fp16", "dynamic_int8", "weight_only_int8", "dynamic_int4_block32",
                  "dynamic_int4_block64", "dynamic_int4_block128", "dynamic_int4_block256")


@dataclass(frozen=True)
class WeightBytes:
    """Weight storage: on disk (the model file) and resident in RAM once the runtime has loaded it."""

    embedding: int  # a separate embedding table; 0 when it shares the head's tensor
    body: int  # every decoder layer's matmuls with their scales and zero points
    head: int
    other: int  # norms, biases, rotary tables
    file: int  # the model file's weights (model.onnx.data; the .litertlm less its tokenizer)
    resident: int  # after load: ONNX keeps a shared table twice, maps a separate float embedding from disk
    load_transient: int  # extra at load (the largest float matrix, copied while the runtime prepacks it)
    layout: str  # in words: bits, block, which parts are at which precision


def io_bytes(req: Quantization) -> int:
    if req.scheme == "fp32":
        return 4
    return 2 if req.scheme == "fp16" or req.execution_provider == "cuda" else 4


def _nbits_bytes(m: Matmul, bits: int, block: int, scale_bytes: int, zero_points: bool) -> int:
    """MatMulNBits storage: packed [N, blocks, block·bits/8] + a scale per block + packed zero points."""
    blocks = math.ceil(m.k / block)
    data = m.n * blocks * block * bits // 8
    scales = m.n * blocks * scale_bytes
    zp = (m.n * math.ceil(blocks / 2) if bits == 4 else m.n * blocks) if zero_points else 0
    return data + scales + zp


def _mixed_layers(layers: int) -> set[int]:
    """The builder's `mixed_layers` (llama.cpp's choice): first/last eighth and every third layer."""
    return {i for i in range(layers) if i < layers / 8 or i >= 7 * layers / 8 or (i - round(layers / 8)) % 3 == 2}


def onnx_weights(s: ModelShape, req: Quantization, context: int) -> WeightBytes:
    io = io_bytes(req)
    quantized = req.scheme in ("int4", "int8")
    base_bits = 4 if req.scheme == "int4" else 8
    zp = not req.symmetric or req.algorithm == "k_quant"
    upgraded = _mixed_layers(s.layers) if req.scheme == "int4" and req.sensitive_layers_int8 else set()
    overrides = {i + s.layers if i < 0 else i for i in req.int8_layers} if req.scheme == "int4" else set()

    def bits_of(m: Matmul) -> int:  # 0 = float
        if not quantized:
            return 0
        if m.role == "head":
            if req.head_precision == "fp32":
                return 0
            return 8 if req.head_precision == "int8" else base_bits
        if m.layer in overrides or (m.layer in upgraded and m.role in ("qkv", "down")):
            return 8
        return base_bits

    def size(m: Matmul) -> int:
        bits = bits_of(m)
        if not bits:
            return m.k * m.n * io
        # Per-layer overrides are quantized by edgepack itself, symmetric: no zero points.
        return _nbits_bytes(m, bits, req.block_size, io, zp and m.layer not in overrides)

    mats = matmuls(s)
    body = sum(size(m) for m in mats if m.layer >= 0)
    head_m = mats[-1]
    head = size(head_m)
    # A table of its own is int4 GatherBlockQuantized (codes, a scale per block of the row, zero points when
    # asymmetric) or float; a shared one is the head's tensor (backends/onnx.py: embedding_table).
    table = embedding_table(tied=s.tied, scheme=req.scheme, symmetric=req.symmetric,
                            precision=req.embedding_precision)
    quantized_table, shared = table == "int4", table == "shared"
    row_blocks = math.ceil(s.hidden / req.block_size)
    embedding = (0 if shared else
                 (s.vocab * s.hidden + 1) // 2 + s.vocab * row_blocks * io
                 + (0 if req.symmetric else (s.vocab * row_blocks + 1) // 2) if quantized_table else
                 s.vocab * s.hidden * io)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    biases = s.layers * ((q + 2 * kv if s.qkv_bias else 0)
                         + ((s.intermediate * (2 if s.gated_mlp else 1) + s.hidden) if s.mlp_bias else 0))
    norms = (s.layers * s.norms_per_layer + 1) * s.hidden + (s.layers * 2 * s.head_dim if s.qk_norm else 0)
    rope = s.rope_tables * 2 * s.max_positions * (s.rope_dim // 2) * io  # cos and sin caches
    other = (biases + norms) * io + rope
    file = embedding + body + head + other
    # Resident: prepacked matmul weights replace their file copies, but a table the embedding shares stays once
    # more. Tensors nothing prepacks (a separate float embedding table, the rotary tables) stay mapped from the
    # file and only the rows read become resident (the measured int8 and llama3 RSS lack them).
    rope_rows = min(context, s.max_positions)
    resident = file - embedding - rope + rope * rope_rows // s.max_positions + (head if shared else 0)
    floats = [m.k * m.n * io for m in mats if not bits_of(m)]
    transient = max(floats) if floats else 0
    parts = [f"{req.scheme}" + (f" block {req.block_size}" if quantized else "")]
    if quantized:
        parts.append(f"{'fp32' if io == 4 else 'fp16'} scales" + (", zero points" if zp else ""))
        hb = bits_of(head_m)
        parts.append(f"head {'int' + str(hb) if hb else 'float'}")
    if upgraded:
        parts.append(f"qkv/down of {len(upgraded)} of {s.layers} layers int8")
    if overrides:
        parts.append(f"{len(overrides)} layers int8")
    parts.append("embedding shares the head" if shared else "embedding int4 table" if quantized_table
                 else f"embedding {'fp32' if io == 4 else 'fp16'} table")
    return WeightBytes(embedding, body, head, other, file, resident, transient, ", ".join(parts))


def litert_recipe(req: Quantization) -> str:
    """The litert-torch recipe a tflite build uses (edgepack.backends.litert_convert)."""
    if req.recipe:
        if req.recipe not in LITERT_RECIPES:
            raise UserError(f"unknown LiteRT recipe '{req.recipe}'.", field="recipe", allowed=list(LITERT_RECIPES))
        return req.recipe
    return {"int8": "dynamic_int8", "fp16": "fp16", "fp32": "none"}.get(
        req.scheme, f"dynamic_int4_block{req.block_size}")


def litert_weights(s: ModelShape, req: Quantization) -> WeightBytes:
    recipe = litert_recipe(req)
    mats = matmuls(s)

    def size(m: Matmul) -> int:
        if recipe == "none":
            return m.k * m.n * 4
        if recipe == "fp16":
            return m.k * m.n * 2
        if recipe.startswith("dynamic_int4"):  # blockwise: a float scale per block
            block = int(recipe.rsplit("block", 1)[1])
            return m.k * m.n // 2 + m.n * math.ceil(m.k / block) * 4
        return m.k * m.n + m.n * 4  # int8 per output channel

    body = sum(size(m) for m in mats if m.layer >= 0)
    head = size(mats[-1])
    # litert-torch's decoders read a tied embedding from the head's tensor; an untied one is its own table.
    embedding = 0 if s.tied else size(Matmul(-1, "embedding", s.hidden, s.vocab))
    norms = (s.layers * s.norms_per_layer + 1) * s.hidden + (s.layers * 2 * s.head_dim if s.qk_norm else 0)
    other = norms * 4
    file = embedding + body + head + other
    resident = int(file * LITERT_WEIGHT_ONLY_RESIDENT) if recipe == "weight_only_int8" else file
    layout = recipe + (" (XNNPACK unpacks the int8 weights to float: ~20x the file in RAM)"
                       if recipe == "weight_only_int8" else "")
    return WeightBytes(embedding, body, head, other, file, resident, 0, layout)
