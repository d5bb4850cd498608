"""Bounded-memory export: the onnxruntime-genai builder, made to read and quantize one decoder layer at a time.

Left alone, the 0.18 builder holds the whole model three times over at its peak (docs/design.md, "Build
memory"): the transformers model (bf16, memory-mapped), the float graph turned into one ONNX protobuf with every
MatMul weight cast to fp32 (`to_nbits` → `ir.to_proto`) and the quantizer's output beside it: ~7 bytes per
parameter measured at 1.1B, and past 16 GB at 3.8B. Installed into the builder's process (genai_builder.py,
`--edgepack-streaming`), this module changes two things and nothing about the graph:

- **Weights are read lazily.** The model is built on the meta device (no memory, no random init), and each
  decoder layer's tensors are read from the safetensors files (plain reads, no mmap, so nothing stays mapped)
  just before the builder turns that layer into nodes, and dropped right after. Tensors outside the decoder
  layers (embedding, final norm, head) are read up front.
- **Each MatMul weight is quantized when the builder makes it**, with the very quantizer the builder's
  `to_nbits` pass would have run later over the whole fp32 graph (onnxruntime's MLAS blockwise kernel, the
  `default` algorithm), under the same initializer and node names, so the saved model is the same bytes
  (tests/scale, tests/integration/test_build_tiny.py). The float weight is never kept, and since nothing is
  left to quantize, the whole-graph pass is skipped.

So the peak is about one layer in float plus the quantized model being assembled (~0.6 bytes per parameter).
Anything this does not know how to stream (another algorithm, a builder subclass with its own loader, an
adapter, a checkpoint whose tensor names the model does not use) falls back to the builder's own path for that
part, which is correct and only as big as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.checkpoint import Checkpoint, LazyWeights, return_freed_memory

if TYPE_CHECKING:
    from edgepack.targets import QuantizeSpec

_SLAB = 4096  # output columns quantized at once

def log(message: str) -> None:
    # The builder's own progress goes to stdout; ours goes beside it (bench/build_memory.py splits phases on it).
    print(f"streaming: {message}", flush=True)


def _layer_done(layer: int) -> None:
    if layer % 4 == 0:
        log(f"layer {layer} read, quantized and released")


def _lazy_model(builder: Any, input_path: str, load_config: Callable[..., Any]) -> Any:
    """The builder's model, with lazily read weights; None where only the builder's own loader will do."""
    import torch
    import transformers

    if (input_path.endswith(".gguf") or builder.quant_type is not None or "adapter_path" in builder.extra_options
            or builder.hf_remote or "num_hidden_layers" in builder.extra_options):
        return None
    # The builder's own class map: anything but a plain *ForCausalLM loads another class.
    if any(k in builder.model_type for k in ("gemma3_vl_text", "lfm2_vl", "mistral3_text", "Mistral3", "qwen2_5_vl",
                                             "Qwen2_5_VL", "qwen3_vl", "Qwen3VL", "qwen3_5", "Whisper")):
        return None
    folder = Path(builder.model_name_or_path)
    if not folder.is_dir():
        return None
    checkpoint = Checkpoint(folder)
    if not checkpoint.entries:
        return None
    config = load_config(str(folder))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    weights = LazyWeights(model, checkpoint, dtype if isinstance(dtype, torch.dtype) else None)
    missing = weights.missing()
    if missing:
        log(f"checkpoint lacks {missing[:3]} (names the model does not use): loading it whole")
        return None
    # Everything outside the decoder layers (embedding, final norm, head) is read now, as the builder may reach
    # it from anywhere; the layers are read one by one as the builder walks the model.
    layer_params = {id(p) for m in model.modules() if builder.is_layer(m) for p in m.parameters()}
    for slots in weights.groups.values():
        module, pname, _ = slots[0]
        if id(getattr(module, pname)) not in layer_params:
            weights.load(module)
    model.modules = lambda: weights.modules(builder.is_layer, _layer_done)
    log(f"reading {len(checkpoint.entries)} tensors lazily from {folder}")
    return model


def _algorithm(builder: Any) -> str | None:
    """The builder's whole-graph quantizer this module reproduces per MatMul: `default` (MLAS), `rtn` or `k_quant`
    (onnxruntime's neural-compressor port); None for any other (a legacy alias, a mixed-precision recipe)."""
    algo = getattr(builder, "quantization_algo", "default")
    return algo if algo in ("default", "rtn", "k_quant") else None


def _stream_bits(builder: Any, matmul: Any, name: str) -> int | None:
    """The bits this MatMul is quantized to now, or None to leave it to the builder's own path."""
    import onnx_ir as ir

    qa = builder.quant_attrs
    algo = _algorithm(builder)
    if (builder.onnx_dtype not in {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
            or qa.get("use_qdq") or algo is None
            or (algo != "default" and builder.io_dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16))
            or "MatMul" not in qa["op_types_to_quantize"] or name in qa["nodes_to_exclude"]
            or name in getattr(builder, "exact_quant_override_names", set())
            or (builder.ep == "cuda" and builder.matmul_attrs.get("weights_prepacked", 0) > 0)
            or getattr(matmul, "weight", None) is None or matmul.weight.dim() != 2):
        return None
    if _weight_shared(builder, name[1:].replace("/", ".") + ".weight"):
        return None
    custom = (getattr(builder, "int4_customized_weight_config", {}) or {}).get(name)
    return int(custom["bits"]) if custom else int(qa["bits"])


def _quantize_matmul(builder: Any, matmul: Any, name: str, root_input: str, bits: int, **kwargs: Any) -> str:
    """What `to_nbits` would have made of this MatMul (onnxruntime's DEFAULT quantizer), made now."""
    import ml_dtypes
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import to_torch_dtype
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    qa = builder.quant_attrs
    config = DefaultWeightOnlyQuantConfig(block_size=qa["matmul_block_size"], is_symmetric=qa["is_symmetric"],
                                          accuracy_level=qa["accuracy_level"], quant_format=QuantFormat.QOperator,
                                          op_types_to_quantize=tuple(qa["op_types_to_quantize"]), bits=bits)
    quantizer = DefaultWeightOnlyQuantizer(config)
    dtype = to_torch_dtype(builder.io_dtype)
    bf16 = builder.io_dtype == ir.DataType.BFLOAT16
    weight_nk = matmul.weight.detach()
    n, k = weight_nk.shape
    parts: list[tuple[Any, Any, Any]] = []
    # Each output column is quantized on its own (blocks run along K), so the matrix is done a slab of columns
    # at a time: the fp32 copy the kernel needs is one slab (the head's alone is 0.4 GB at 3.8B), not the matrix.
    # The values are those the float path would have stored: weight.T cast to the graph's io type, [K, N].
    for start in range(0, n, _SLAB):
        slab = weight_nk[start:start + _SLAB].to(dtype)
        array = (slab.float() if bf16 else slab).T.contiguous().numpy()
        parts.append(quantizer.qbits_block_quant(array))
        del slab, array
    packed, scales, zero_points = _joined(parts)
    del parts
    if bf16:
        scales = scales.astype(ml_dtypes.bfloat16)
    weight = name[1:].replace("/", ".") + ".weight"
    builder.make_initializer(packed, weight + f"_Q{bits}")
    builder.make_initializer(scales, weight + "_scales")
    inputs = [root_input, weight + f"_Q{bits}", weight + "_scales"]
    if not qa["is_symmetric"]:
        builder.make_initializer(zero_points, weight + "_zero_points")
        inputs.append(weight + "_zero_points")
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": qa["matmul_block_size"]}
    if qa["accuracy_level"]:
        attrs["accuracy_level"] = qa["accuracy_level"]
    custom = name in (getattr(builder, "int4_customized_weight_config", {}) or {})
    _emit(builder, name + f"_Q{bits}", inputs, _output(name, kwargs), dict(sorted(attrs.items())), n, kwargs,
          (custom, bits, inputs[1:]))
    return name


def _joined(parts: list[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """The slabs' (codes, scales, zero points), each concatenated along the output columns."""
    import numpy as np

    if len(parts) == 1:
        return parts[0]
    first, second, third = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return first, second, third


def _output(name: str, kwargs: dict[str, Any]) -> str:
    return "logits" if kwargs.get("logits", False) else f"{name}/output_0"


def _emit(builder: Any, node_name: str, inputs: list[str], output: str, attrs: dict[str, Any], n: int,
          kwargs: dict[str, Any], record: tuple[bool, int, list[str]]) -> None:
    """The MatMulNBits node and its output value, as make_matmul_float would have named them; `record` (custom
    placement?, bits, initializer names) tells to_nbits what was quantized here."""
    builder.make_node("MatMulNBits", inputs=inputs, outputs=[output], name=node_name, domain="com.microsoft", **attrs)
    seq_dim = kwargs.get("seq_dim", "sequence_length")
    builder.make_value(output, builder.io_dtype, shape=builder.make_hidden_state_shape(seq_dim=seq_dim, last_dim=n))
    builder._edgepack_streamed = [*getattr(builder, "_edgepack_streamed", []), record]


_NC_SLAB_ELEMENTS = 1 << 22  # weights per rtn/k-quant slab (16 MB in fp32): its search keeps ~15 copies of one
_NC_THREADS = 4


class _NodeLike:
    """What onnxruntime's `make_matmul_weight_only_node` reads of the MatMul it replaces."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str]) -> None:
        self.name, self.input, self.output = name, inputs, outputs


def _quantize_matmul_nc(builder: Any, matmul: Any, name: str, root_input: str, bits: int, **kwargs: Any) -> str:
    """What the builder's `rtn` / `k_quant` whole-graph pass (onnxruntime's `rtn_quantize`) would have made of this
    MatMul, made now: the same per-node settings, quantizer functions, packing and initializer names."""
    import numpy as np
    import onnx
    from onnx_ir.tensor_adapters import to_torch_dtype
    from onnxruntime.quantization.neural_compressor import weight_only as nc

    qa = builder.quant_attrs
    algo = _algorithm(builder)
    settings = {"bits": bits, "group_size": qa["matmul_block_size"],
                "scheme": "sym" if qa["is_symmetric"] else "asym"}
    settings.update({k: v for k, v in ((getattr(builder, "int4_customized_weight_config", {}) or {}).get(name)
                                       or {}).items() if k in settings})
    bits, scheme = int(settings["bits"]), str(settings["scheme"])
    weight_nk = matmul.weight.detach()
    n, k = weight_nk.shape
    group = int(settings["group_size"]) if int(settings["group_size"]) != -1 else k
    k_blocks = (k - 1) // group + 1
    dtype = to_torch_dtype(builder.io_dtype)
    rows = max(64, _NC_SLAB_ELEMENTS // k)

    def quantize(start: int) -> tuple[Any, Any, Any]:
        # rtn_quantize quantizes weight.T ([N, K], padded along K to whole blocks) one group of K at a time, so a
        # slab of output columns is quantized exactly as it would be inside the whole matrix.
        slab = weight_nk[start:start + rows].to(dtype).numpy()  # [n', K]: weight.T's rows, as stored
        if k_blocks * group != k:
            slab = np.pad(slab, ((0, 0), (0, k_blocks * group - k)), "constant")
        if algo == "k_quant":
            q, scale, zp = nc.quant_tensor_k_quant_cpu(slab, bits, group)
        else:
            q, scale, zp = nc.quant_tensor(slab, bits, group, scheme, "uint", 1)
        return q.astype("uint8").reshape(slab.shape[0], -1), scale.astype(slab.dtype), zp

    # numpy's ufuncs let go of the GIL: slabs on every core (the k-quant search is ~95 % of a 1B export's time).
    with ThreadPoolExecutor(max_workers=min(_NC_THREADS, len(os.sched_getaffinity(0)))) as pool:
        parts = list(pool.map(quantize, range(0, n, rows)))
    q_weight, scale, zero = _joined(parts)
    del parts
    if not (scheme == "asym" or algo == "k_quant"):
        zero = None
    weight = name[1:].replace("/", ".") + ".weight"
    output = _output(name, kwargs)
    node, inits = nc.make_matmul_weight_only_node(
        node=_NodeLike(name, [root_input, weight], [output]), weight_shape=(k, n), num_bits=bits, group_size=group,
        k_blocks=k_blocks, q_weight=q_weight.reshape(n * k_blocks, group), scale=scale, zero_point=zero,
        accuracy_level=qa["accuracy_level"] or 0)
    del q_weight
    names = []
    for tensor in inits:  # scale, zero points, codes: the order rtn_quantize adds them in
        builder.make_initializer(onnx.numpy_helper.to_array(tensor), tensor.name)
        names.append(tensor.name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    _emit(builder, node.name, list(node.input), output, attrs, n, kwargs, (False, bits, names))
    return name


def _left_to_quantize(builder: Any) -> list[str]:
    """The nodes the whole-graph pass would still quantize: eligible, not excluded, with a constant weight."""
    qa = builder.quant_attrs
    exclude = set(qa["nodes_to_exclude"])
    left = []
    for node in builder.model.graph:
        if node.op_type not in qa["op_types_to_quantize"] or node.name in exclude:
            continue
        i = 0 if node.op_type == "Gather" else 1
        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].const_value is not None:
            left.append(node.name)
    return left


def _quantize_gather(builder: Any, node: Any) -> None:
    """The embedding table as int4 GatherBlockQuantized, in place: what the builder's `default` whole-graph pass makes
    of it (onnxruntime's `DefaultWeightOnlyQuantizer.quantize_gather`: round-to-nearest, blocks of the row), for
    every algorithm; the builder's rtn and k_quant passes leave an untied table float (4 bytes a weight)."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    qa = builder.quant_attrs
    table = node.inputs[0]
    data = table.const_value.numpy()
    symmetric = bool(qa["is_symmetric"])
    block = int(qa["matmul_block_size"])
    codes, scales, zero = DefaultWeightOnlyQuantizer.quantize_ndarray(data, 1, block, symmetric)
    kind = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    tensors = [onnx.helper.make_tensor(table.name + "_Q4", kind, data.shape, codes.tobytes(), True),
               onnx.numpy_helper.from_array(scales, table.name + "_scales")]
    if zero is not None:
        tensors.append(onnx.helper.make_tensor(table.name + "_zero_points", kind, scales.shape, zero.tobytes(), True))
    del data, codes
    values = []
    for tensor in tensors:
        builder.make_initializer(ir.serde.deserialize_tensor(tensor), tensor.name)
        values.append(builder.model.graph.initializers[tensor.name])
    gather_axis = node.attributes["axis"].value if "axis" in node.attributes else 0
    old = node.outputs[0]
    new = ir.Node("com.microsoft", "GatherBlockQuantized", [values[0], node.inputs[1], *values[1:]],
                  attributes=[ir.AttrInt64("block_size", block), ir.AttrInt64("gather_axis", gather_axis),
                              ir.AttrInt64("quantize_axis", 1)],  # make_node's order: by name
                  outputs=[ir.Value(name=old.name, shape=old.shape, type=old.type)], name=node.name + "_Q4")
    builder.model.graph.insert_before(node, new)
    ir.convenience.replace_all_uses_with(old, new.outputs[0])
    builder.model.graph.remove(node, safe=True)
    if not table.uses():
        builder.model.graph.initializers.pop(table.name)


def _attributes_as_rebuilt(graph: Any) -> None:
    """The whole-graph pass rebuilds every node that holds a subgraph (If) with onnx.helper.make_node, which sorts
    its attributes by name: the same here, for the same model.onnx bytes (LongRoPE's rope-cache If)."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(graph):
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            ordered = sorted(node.attributes.items())
            node.attributes.clear()
            node.attributes.update(ordered)


def _ordered_as_rtn_quantize(graph: Any, streamed: set[str]) -> None:
    """Put the graph's nodes in the order onnxruntime's `rtn_quantize` leaves them, for the same model.onnx bytes
    (the builder's final stable sort starts from that order): it drops each quantized MatMul, appends its
    MatMulNBits after every other node, then runs its ONNXModel's breadth-first topological sort, replayed here."""
    from collections import deque

    def names(values: Any) -> list[str]:
        return [v.name if v is not None and v.name else "" for v in values]

    nodes = list(graph)
    nodes = [n for n in nodes if n.name not in streamed] + [n for n in nodes if n.name in streamed]
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in nodes:
        for name in names(node.inputs):
            if name.strip():
                consumers.setdefault(name, []).append(node)
        for name in names(node.outputs):
            if name.strip():
                producers[name] = node
    inputs = [v.name for v in graph.inputs]
    queue: deque[Any] = deque()
    wait: deque[Any] = deque()
    for name in inputs:
        queue.extend(consumers.get(name, ()))
    queue.extend(n for n in nodes if all(i not in producers and i not in inputs for i in names(n.inputs)))
    done: dict[str, Any] = {}
    while queue:
        node = queue.popleft()
        if not all(producers[i].name in done for i in names(node.inputs) if i in producers):
            if not any(w is node for w in wait):
                wait.append(node)
            continue
        done[node.name] = node
        for out in names(node.outputs):
            queue.extend(c for c in consumers.get(out, ()) if c.name not in done and not any(c is x for x in queue))
        if not queue and wait:
            queue, wait = deque(wait), deque()
    if len(done) != len(nodes):  # not what rtn_quantize would sort: leave the order alone rather than drop nodes
        return
    graph.remove(nodes, safe=False)
    graph.extend(done.values())


def _weight_shared(builder: Any, weight: str) -> bool:
    """Whether a node made earlier reads this MatMul's float weight (a tied embedding that the whole-graph pass
    quantizes on its own, asymmetric): then the float weight must exist, as the builder made it."""
    return any(v is not None and v.name == weight for node in builder.model.graph for v in node.inputs)


def install(load_config: Callable[..., Any]) -> None:
    """Patch the builder's Model class (imported as the builder imports it) to stream."""
    import importlib

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as it expects)

    return_freed_memory()
    base = importlib.import_module("builders.base")
    Model = base.Model
    original_load, original_float, original_nbits = Model.load_weights, Model.make_matmul_float, Model.to_nbits

    def load_weights(self: Any, input_path: str) -> Any:
        model = _lazy_model(self, input_path, load_config) if type(self).load_weights is load_weights else None
        return model if model is not None else original_load(self, input_path)

    def make_matmul_float(self: Any, matmul: Any, name: str, root_input: str, **kwargs: Any) -> str:
        bits = _stream_bits(self, matmul, name)
        if bits is None:
            return original_float(self, matmul, name, root_input, **kwargs)
        if _algorithm(self) == "default":
            return _quantize_matmul(self, matmul, name, root_input, bits, **kwargs)
        return _quantize_matmul_nc(self, matmul, name, root_input, bits, **kwargs)

    def to_nbits(self: Any) -> Any:
        streamed = getattr(self, "_edgepack_streamed", [])
        if streamed and self.quant_attrs["bits"] == 4:
            # An untied embedding table asked for (op_types_to_quantize has Gather): int4, first in node order.
            gathers = set(_left_to_quantize(self))
            for node in [n for n in self.model.graph if n.op_type == "Gather" and n.name in gathers]:
                _quantize_gather(self, node)
        if streamed:
            # The whole-graph pass appends the quantized weights after every other initializer, in node order:
            # the int4 body first, then one pass per bit width of the nodes placed at another (int8 head,
            # sensitive layers). The same order here gives the same bytes in model.onnx.data.
            # rtn/k_quant: one pass over every node whatever its bits, adding each node's scale, zero points and codes.
            custom = (getattr(self, "int4_customized_weight_config", {}) or {}) if _algorithm(self) == "default" else {}
            passes = [(False, None), *((True, b) for b in dict.fromkeys(int(c["bits"]) for c in custom.values()))]
            inits = self.model.graph.initializers
            for is_custom, width in passes:
                for name in (n for c, b, names in streamed if c == is_custom and width in (None, b) for n in names):
                    inits[name] = inits.pop(name)
        left = _left_to_quantize(self)
        if streamed and not left:
            log(f"{len(streamed)} MatMuls were quantized as the graph was made: skipping the whole-graph pass")
            self.model.opset_imports.setdefault("com.microsoft", 1)
            if _algorithm(self) == "default":
                _attributes_as_rebuilt(self.model.graph)
            else:
                _ordered_as_rtn_quantize(self.model.graph, {n.name for n in self.model.graph
                                                            if n.op_type == "MatMulNBits"})
            return self.model
        if streamed:
            # Correct, and as big as the builder's own pass (the quantized weights are copied, not re-made).
            log(f"{len(left)} nodes left for the builder's whole-graph pass: {left[:3]}")
        return original_nbits(self)

    Model.load_weights = load_weights
    Model.make_matmul_float = make_matmul_float
    Model.to_nbits = to_nbits


STREAMING_FLAG = "--edgepack-streaming"  # genai_builder's first argument that installs this module


STREAMING_ENV = "EDGEPACK_STREAMING"  # "0": the builder's own whole-model path (a fallback; ~10 bytes/parameter)


def streams(scheme: str, algorithm: str) -> bool:
    """Whether the build streams: int4/int8 with the builder's own algorithms (`default`, MLAS round-to-nearest;
    `rtn`; `k_quant`). gptq and imatrix rewrite a `default` export afterwards, so their export streams too.
    $EDGEPACK_STREAMING=0 turns it off (the same bytes, the builder's own memory)."""
    if os.environ.get(STREAMING_ENV, "").strip() == "0":
        return False
    return scheme in ("int4", "int8") and algorithm in ("default", "rtn", "k_quant", "gptq", "imatrix")


def flag(q: QuantizeSpec) -> list[str]:
    """The genai_builder argument that turns streaming on, for the quantize specs it builds unchanged."""
    return [STREAMING_FLAG] if streams(q.scheme, q.algorithm) else []
