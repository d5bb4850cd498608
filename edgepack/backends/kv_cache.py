"""KV cache precision of an exported onnxruntime-genai graph: calibrated int8/int4 K/V written into the graph.

The 0.18 model builder makes a quantized KV cache only from a file of calibrated per-layer scales
(`kv_cache_scale_file`), and its calibration tool runs a model already built with a float cache. So edgepack builds
once, calibrates on that graph (the builder's own `calibrate_kv_scales`: per-channel symmetric scales, K on the
rotation-invariant envelope so the scales hold past the calibration length), and then makes in place the same
changes the builder's `kv_cache_quant_scheme` makes (builders/base.py `make_kv_cache_init` and
`make_group_query_attention`; a test checks the logits equal the builder's own graph's): int8 (or packed uint8
int4) past/present tensors, the GroupQueryAttention quantization attributes and scale inputs, and no past/present
buffer sharing on the CPU. The weights file is untouched: a second builder run would cost the whole export again
(7.5 minutes at 1.1B) for the same graph.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import TargetError, UserError, require

# Precision → the builder's scheme and bit width. Per channel: one scale per K/V channel per layer.
QUANTIZED: dict[str, tuple[str, int]] = {"int8": ("int8_per_channel", 8), "int4": ("int4_per_channel", 4)}
# What runtime.kv_cache offers on the CPU. int4 runs, but costs SmolLM2-135M +76.5 % ppl (KL 0.73) where int8 costs
# nothing measurable (docs/targets.md): no gate this project ships would pass it, so it is not offered.
OFFERED = ("int8",)
# Calibration: sequences × tokens of the builder's built-in corpus (general English, not the gate's eval text).
CALIBRATION_SEQS = 8
CALIBRATION_TOKENS = 512


FP16_ON_CPU = ("the builder makes an fp16 KV cache on the CPU only with fp16 model I/O, a MultiHeadAttention graph "
               "that onnxruntime-genai 0.18 fails to decode (\"Shape mismatch attempting to re-use buffer\" at the "
               "first generated token)")


def supported(execution_provider: str, scheme: str) -> tuple[str, ...]:
    """The runtime.kv_cache values an ONNX bundle for this provider and scheme can have, `auto` first."""
    own = "fp32" if execution_provider == "cpu" or scheme == "fp32" else "fp16"
    # Quantized K/V: GroupQueryAttention's CPU kernel, measured here; on CUDA the builder has it too but nothing
    # here has run it, so it is not offered.
    return ("auto", own, *(OFFERED if execution_provider == "cpu" else ()))


def resolve(kv_cache: str, *, execution_provider: str, scheme: str, source: str = "") -> str:
    """runtime.kv_cache → the precision the bundle's K/V will have; a TargetError naming what is allowed."""
    allowed = supported(execution_provider, scheme)
    if kv_cache not in allowed:
        why = (FP16_ON_CPU if kv_cache == "fp16" else
               f"a {scheme} graph on {execution_provider} has {allowed[1]} K/V I/O" if kv_cache in ("fp16", "fp32")
               else f"a quantized KV cache on {execution_provider} has not been measured with onnxruntime-genai 0.18")
        raise TargetError(f"{source + ': ' if source else ''}runtime.kv_cache = \"{kv_cache}\" is not supported by "
                          f"the ONNX exporter on {execution_provider}: {why}.",
                          hint=f"Use one of {', '.join(repr(v) for v in allowed)} (docs/targets.md, KV cache).",
                          path=source or None, field="runtime.kv_cache", allowed=list(allowed))
    return allowed[1] if kv_cache == "auto" else kv_cache


@dataclass(frozen=True)
class KvQuantized:
    """What `apply` did: the precision, the builder scheme it mirrors, and the scales file kept in the work dir."""

    dtype: str
    scheme: str
    layers: int
    scales: Path
    seconds: float


def calibrate(model_dir: Path, tokenizer_dir: Path, out_json: Path, dtype: str,
              context: int = CALIBRATION_TOKENS) -> Path:
    """Per-layer, per-channel K/V scales from the float-KV graph in `model_dir` (the builder's calibration)."""
    import logging

    require("transformers", "onnx", "KV cache calibration")
    from onnxruntime_genai.models.quantization.kv_cache_calibration import calibrate_kv_scales

    logging.getLogger("onnxruntime_genai.models.quantization.kv_cache_calibration").setLevel(logging.WARNING)
    scheme, _bits = QUANTIZED[dtype]
    calibrate_kv_scales(str(model_dir / "model.onnx"), str(tokenizer_dir), str(out_json), quant_type=scheme,
                        num_seqs=CALIBRATION_SEQS, target_seq=min(CALIBRATION_TOKENS, context))
    return out_json


def quantize_graph(model_dir: Path, dtype: str, scales_json: Path, execution_provider: str = "cpu") -> int:
    """Rewrite model.onnx (graph only) and genai_config.json for a `dtype` KV cache; returns the layers changed."""
    onnx = require("onnx", "onnx", "Quantizing the KV cache")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    scheme, bits = QUANTIZED[dtype]
    model_path = model_dir / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    data = json.loads(scales_json.read_text())
    layer_ids = data.get("layer_ids") or list(range(len(data["scales"]["k_scales"])))
    scales = {lid: (data["scales"]["k_scales"][i], data["scales"]["v_scales"][i]) for i, lid in enumerate(layer_ids)}
    elem = TensorProto.INT8 if bits == 8 else TensorProto.UINT8

    def layer_of(name: str) -> int:  # past_key_values.3.key / present.3.value
        return int(name.split(".")[1])

    head_size = int(json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]["head_size"])
    for value in list(graph.input) + list(graph.output):
        if value.name.startswith(("past_key_values.", "present.")) and value.name.endswith((".key", ".value")):
            t = value.type.tensor_type
            if t.elem_type != TensorProto.FLOAT:
                raise UserError(f"{value.name} is not float in {model_path}: the KV cache is quantized already "
                                "or the graph's I/O is not fp32.", path=str(model_path))
            t.elem_type = elem
            if bits == 4:  # two 4-bit values a byte, as the builder declares them
                last = t.shape.dim[-1]
                last.Clear()
                last.dim_value = (head_size + 1) // 2

    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not attention:
        raise UserError(f"{model_path} has no GroupQueryAttention node: onnxruntime's quantized KV cache is a "
                        "GroupQueryAttention feature.", hint="Use runtime.kv_cache = \"auto\" for this model.",
                        field="runtime.kv_cache", path=str(model_path))
    for node in attention:
        lid = layer_of(node.input[3])
        if lid not in scales:
            raise UserError(f"the KV scales in {scales_json} have no entry for layer {lid}.", path=str(scales_json))
        k_name, v_name = f"model.layers.{lid}.attn.k_scale", f"model.layers.{lid}.attn.v_scale"
        for name, value in zip((k_name, v_name), scales[lid], strict=True):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32).reshape(-1), name))
        inputs = list(node.input) + [""] * max(0, 12 - len(node.input))
        inputs[12:14] = [k_name, v_name]
        del node.input[:]
        node.input.extend(inputs)
        mode = "PER_CHANNEL" if scheme.endswith("per_channel") else "PER_TENSOR"
        node.attribute.extend([helper.make_attribute("k_quant_type", mode),
                               helper.make_attribute("v_quant_type", mode),
                               helper.make_attribute("kv_cache_bit_width", bits)])
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString(deterministic=True))
    tmp.replace(model_path)

    config_path = model_dir / "genai_config.json"
    cfg = json.loads(config_path.read_text())
    # The builder shares past/present buffers with a quantized cache on CUDA only.
    cfg["search"]["past_present_share_buffer"] = execution_provider == "cuda"
    config_path.write_text(json.dumps(cfg, indent=4) + "\n")
    return len(attention)


def apply(model_dir: Path, tokenizer_dir: Path, dtype: str, work_dir: Path, *, context: int = CALIBRATION_TOKENS,
          execution_provider: str = "cpu") -> KvQuantized:
    """Calibrate on the float-KV graph in `model_dir`, then quantize its KV cache to `dtype` (a QUANTIZED key)."""
    start = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    scales = calibrate(model_dir, tokenizer_dir, work_dir / f"kv-scales-{dtype}.json", dtype, context)
    layers = quantize_graph(model_dir, dtype, scales, execution_provider)
    return KvQuantized(dtype, QUANTIZED[dtype][0], layers, scales, time.perf_counter() - start)


def kv_dtype_of(model_dir: Path) -> str:
    """The KV cache precision a bundle's graph has: fp32, fp16, int8 or int4 (packed uint8)."""
    onnx = require("onnx", "onnx", "Inspecting ONNX models")
    from onnx import TensorProto

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    past = next(i for i in model.graph.input if i.name.startswith("past_key_values."))
    return {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.INT8: "int8",
            TensorProto.UINT8: "int4"}[past.type.tensor_type.elem_type]
