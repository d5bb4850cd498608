"""GPTQ for the onnxruntime-genai graph: error-compensating int4 weights in the builder's own MatMulNBits layout.

The builder quantizes round-to-nearest (RTN). GPTQ (Frantar et al., 2022) quantizes a weight matrix one input
column at a time and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's inputs (H = X^T X over calibration tokens). The result is written into the same
initializers the builder made, so the graph, the kernels and the speed are exactly those of RTN int4.

Calibration tokens: backends/calibration.py.

onnxruntime 1.32 has a GPTQ quantizer of its own; it produced a broken model for SmolLM2 without an error
(docs/targets.md), which is why this one exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

from edgepack.backends.calibration import Calibration, calibration_ids
from edgepack.backends.scale_search import Quantized, search_scales, search_scales_asymmetric
from edgepack.errors import ModelError, UserError, require
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn

log = logging.getLogger(__name__)

# builder MatMul name (inside /model/layers.{i}/) → the HF Linear modules it fuses, concatenated on the output axis
_FUSED = {
    "attn/qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn/o_proj": ("self_attn.o_proj",),
    "mlp/gate_proj": ("mlp.gate_proj",),
    "mlp/up_proj": ("mlp.up_proj",),
    "mlp/down_proj": ("mlp.down_proj",),
}

Part = tuple[str, int, int]  # an HF Linear module and the rows (output features) of it that a builder MatMul holds


def _parts(layer: Any) -> dict[str, list[Part]]:
    """Each builder MatMul of this decoder layer → its rows in the HF modules: separate q/k/v and gate/up modules
    (Llama, Qwen, Gemma…), or Phi-3's fused qkv_proj (the builder's qkv_proj as is) and gate_up_proj (split in
    halves into the builder's gate_proj and up_proj)."""
    names = {n for n, _ in layer.named_modules()}

    def rows(name: str) -> int:
        return int(layer.get_submodule(name).weight.shape[0])

    out: dict[str, list[Part]] = {}
    for fused, modules in _FUSED.items():
        if all(m in names for m in modules):
            out[fused] = [(m, 0, rows(m)) for m in modules]
    if "self_attn.qkv_proj" in names:
        out["attn/qkv_proj"] = [("self_attn.qkv_proj", 0, rows("self_attn.qkv_proj"))]
    if "mlp.gate_up_proj" in names:
        half = rows("mlp.gate_up_proj") // 2
        out["mlp/gate_proj"] = [("mlp.gate_up_proj", 0, half)]
        out["mlp/up_proj"] = [("mlp.gate_up_proj", half, 2 * half)]
    missing = [f for f in _FUSED if f not in out]
    if missing:
        raise ModelError(f"GPTQ/imatrix found no modules for {', '.join(missing)} in this model's decoder layers "
                         f"({type(layer).__name__}).",
                         hint="Use quantize.algorithm = \"k_quant\" or \"default\" for this architecture.")
    return {f: out[f] for f in _FUSED}


def quantize_symmetric(w: Any, scale: Any) -> Any:
    """The builder's symmetric int4 grid: q = round(w / scale) + 8 clamped to 0..15, with scale = m / -8 where m is
    the group's signed extreme, so the extreme lands exactly on code 0."""
    import torch

    return torch.clamp(torch.round(w / scale) + 8, 0, 15)


def group_scale(w: Any) -> Any:
    """Per-row scale of a [N, block] group, as the builder computes it (a zero group gets scale 1)."""
    import torch

    idx = torch.argmax(w.abs(), dim=1, keepdim=True)
    m = torch.gather(w, 1, idx).squeeze(1)
    return torch.where(m == 0, torch.ones_like(m), m / -8.0)


def gptq(weight: Any, hessian: Any, block: int, *, damp: float = 0.01, lazy: int = 128) -> Quantized:
    """Quantize weight [N, K] (rows = output features) against the input Hessian [K, K]."""
    import torch

    W = weight.detach().clone().double()
    H = hessian.detach().clone().double()
    n, k = W.shape
    if k % block:
        raise UserError(f"GPTQ block size {block} does not divide the input size {k} of a weight.",
                        hint="Use a quantize.block_size that divides every matmul's input size.")
    lazy = max(block, lazy // block * block)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // block, dtype=torch.float64)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        scale = torch.ones(n, dtype=W.dtype)
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                scale = group_scale(W1[:, i:i + block])
                scales[:, col // block] = scale
            w = W1[:, i]
            q = quantize_symmetric(w, scale)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - 8) * scale) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Quantized(codes=codes, scales=scales.float())


def rtn(weight: Any, block: int) -> Quantized:
    import torch

    W = weight.detach().double()
    n, k = W.shape
    g = W.reshape(n, k // block, block)
    idx = torch.argmax(g.abs(), dim=2, keepdim=True)
    m = torch.gather(g, 2, idx)
    s = torch.where(m == 0, torch.ones_like(m), m / -8.0)
    q = torch.clamp(torch.round(g / s) + 8, 0, 15)
    return Quantized(codes=q.reshape(n, k).to(torch.uint8), scales=s.squeeze(2).float())


def dequantize(q: Quantized, block: int) -> Any:
    import torch

    n, k = q.codes.shape
    zp = 8.0 if q.zero_points is None else q.zero_points.float().unsqueeze(2)
    g = (q.codes.reshape(n, k // block, block).float() - zp) * q.scales.unsqueeze(2)
    return g.reshape(n, k).to(torch.float32)


def pack(q: Quantized, block: int) -> tuple[Any, Any]:
    """→ (B uint8 [N, K/block, block/2], scales float32 [N, K/block]), MatMulNBits' layout (low nibble first)."""
    import numpy as np

    codes = q.codes.numpy().astype(np.uint8)
    n, k = codes.shape
    pairs = codes.reshape(n, k // block, block // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return packed, q.scales.numpy().astype(np.float32)


def pack_zero_points(q: Quantized) -> Any:
    """→ uint8 [N, ceil(blocks / 2)]: MatMulNBits' 4-bit zero points, two blocks of a row per byte (low first;
    checked against the builder's own asymmetric RTN: its codes, scales and these zero points dequantize to within
    half a step of the float weights)."""
    import numpy as np

    zp = q.zero_points.numpy().astype(np.uint8)
    n, blocks = zp.shape
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


class _Capture(Exception):
    pass


def _layer_inputs(model: Any, ids: Any) -> tuple[Any, dict[str, Any]]:
    """Hidden states and keyword arguments that the model passes to its first decoder layer."""
    import torch

    seen: dict[str, Any] = {}

    def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Capture

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    except _Capture:
        pass
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise ModelError("GPTQ could not capture the first decoder layer's inputs.")
    kwargs = seen["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return seen["hidden"], kwargs


def _hessians(layer: Any, hidden: Any, kwargs: dict[str, Any], names: list[str],
              diagonal: bool) -> tuple[dict[str, Any], Any]:
    """Each named module's input statistics over the calibration tokens: X^T X (GPTQ), or only its diagonal, each
    channel's sum of squares (imatrix: K times less memory, and no K x K product per token); and the layer's
    (float) output."""
    import torch

    hs: dict[str, Any] = {}
    handles = []
    for name in names:
        mod = layer.get_submodule(name)

        def hook(_m: Any, inp: tuple[Any, ...], _out: Any, name: str = name) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            hs[name] = hs.get(name, 0) + ((x * x).sum(0) if diagonal else x.T @ x)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return hs, out[0] if isinstance(out, tuple) else out


def _layer_out(layer: Any, hidden: Any, kwargs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


EMBEDDING = "/model/embed_tokens/Gather"  # the builder's embedding node (GatherBlockQuantized: + "_Q4")


def quantize_model(source: ModelSource, block: int, cal: Calibration, *, head: bool, progress: ProgressFn,
                   method: str = "gptq", symmetric: bool = True, embedding: bool = False,
                   ids: Any = None) -> Iterator[tuple[str, Quantized]]:
    """Yield (builder MatMul name, quantized weights) for every decoder matmul, and /lm_head/MatMul if head.
    method: "gptq" (error feedback through the inverse Hessian) or "imatrix" (search_scales on its diagonal;
    with symmetric=False, search_scales_asymmetric). GPTQ is symmetric only."""

    def quantize(weight: Any, hessian: Any) -> Quantized:
        if method == "imatrix":
            search = search_scales if symmetric else search_scales_asymmetric
            return search(weight, hessian, block)  # the diagonal only (_hessians)
        return gptq(weight, hessian, block, damp=cal.damp)

    import contextlib

    from edgepack.checkpoint import float_model

    torch = require("torch", "onnx", "GPTQ quantization")
    require("transformers", "onnx", "GPTQ quantization")
    model = float_model(source.hf_dir)  # one decoder layer in memory at a time where it can be
    if ids is None:
        ids = calibration_ids(model, source, cal, progress)
    hidden, kwargs = _layer_inputs(model, ids)
    layered = getattr(model, "edgepack_layers", None)
    if layered is not None:
        layered.auto = False  # each layer is held across its passes: its quantized weights feed the next layer
    layers = model.model.layers
    for i, layer in enumerate(layers):
        with layered.held(layer) if layered is not None else contextlib.nullcontext():
            out = yield from _quantize_layer(i, layer, len(layers), block, method, quantize, progress, hidden,
                                             kwargs)
            # GPTQ's next layer sees what the quantized layer computes (its error feedback needs it); imatrix's
            # sees the float layer's output, as llama.cpp's importance matrix does: one forward pass per layer.
            hidden = out if method == "imatrix" else _layer_out(layer, hidden, kwargs)
    if embedding and method == "imatrix":
        # An int4 table of its own (GatherBlockQuantized): each row is read as it is, so every weight counts alike.
        table = model.model.embed_tokens.weight.data
        progress(ProgressEvent("quantize", f"{method}: embedding table"))
        yield EMBEDDING, quantize(table, torch.ones(table.shape[1], dtype=torch.float64))
    if head:
        with torch.no_grad():
            normed = model.model.norm(hidden)
        x = normed.reshape(-1, normed.shape[-1]).double()
        progress(ProgressEvent("quantize", f"{method}: lm_head"))
        yield "/lm_head/MatMul", quantize(model.lm_head.weight.data, (x * x).sum(0) if method == "imatrix" else x.T @ x)


def _quantize_layer(i: int, layer: Any, count: int, block: int, method: str,
                    quantize: Callable[[Any, Any], Quantized], progress: ProgressFn, hidden: Any,
                    kwargs: dict[str, Any]) -> Generator[tuple[str, Quantized], None, Any]:
    """One decoder layer: its inputs' statistics, each (fused) matmul quantized, and the layer's weights replaced
    by the dequantized ones, so that the next layer can see what the quantized model computes. Returns the float
    layer's output."""
    import torch

    progress(ProgressEvent("quantize", f"{method}: layer {i + 1}/{count}"))
    parts = _parts(layer)
    first = {fused: p[0][0] for fused, p in parts.items()}  # the modules of one MatMul share their input
    hs, out = _hessians(layer, hidden, kwargs, sorted(set(first.values())), diagonal=method == "imatrix")
    for fused, held in parts.items():
        weight = torch.cat([layer.get_submodule(m).weight.data[a:b] for m, a, b in held], dim=0)
        q = quantize(weight, hs[first[fused]])
        deq = dequantize(q, block)
        row = 0
        for m, a, b in held:
            layer.get_submodule(m).weight.data[a:b].copy_(deq[row:row + b - a])
            row += b - a
        yield f"/model/layers.{i}/{fused}/MatMul", q
    return out


def _write_table(node: Any, inits: dict[str, Any], q: Quantized, block: int) -> None:
    """Searched codes, scales (and zero points) into an int4 GatherBlockQuantized table of its own, in the layout
    onnxruntime's quantize_gather writes: row-major codes two per byte, low nibble first; signed for INT4."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    attrs = {a.name: a.i for a in node.attribute}
    old = inits[node.input[0]]
    symmetric = old.data_type == onnx.TensorProto.INT4
    if attrs.get("block_size") != block or attrs.get("quantize_axis") != 1 or symmetric != (q.zero_points is None):
        raise ModelError(f"imatrix expected an int4 embedding table in blocks of {block} along its rows, found "
                         f"{attrs} ({onnx.TensorProto.DataType.Name(old.data_type)}).")

    def nibbles(values: Any) -> bytes:  # the packing the table was written with (streaming._quantize_gather)
        return DefaultWeightOnlyQuantizer.pack_int8_to_int4(values).tobytes()

    codes = q.codes.numpy().astype(np.int16) - (8 if symmetric else 0)  # INT4 stores the signed code
    old.CopyFrom(onnx.helper.make_tensor(old.name, old.data_type, list(old.dims), nibbles(codes), True))
    scales = inits[node.input[2]]
    scales.CopyFrom(numpy_helper.from_array(q.scales.numpy().astype(np.float32).reshape(tuple(scales.dims)),
                                            scales.name))
    if not symmetric:
        zp = inits[node.input[3]]
        zp.CopyFrom(onnx.helper.make_tensor(zp.name, zp.data_type, list(zp.dims), nibbles(q.zero_points.numpy()),
                                            True))


def apply(model_path: Path, source: ModelSource, block: int, cal: Calibration, *, head: bool,
          progress: ProgressFn, method: str = "gptq", symmetric: bool = True) -> int:
    """Replace the weights of the builder's symmetric int4 MatMulNBits nodes with GPTQ's (or imatrix's), in
    place. Returns the number of matmuls rewritten."""
    onnx = require("onnx", "onnx", "GPTQ quantization")
    import numpy as np
    from onnx import numpy_helper

    ids = calibration_ids(None, source, cal, progress, exported=model_path.parent)  # before anything is loaded
    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name.rsplit("_Q4", 1)[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    tables = {n.name.rsplit("_Q4", 1)[0]: n for n in model.graph.node if n.op_type == "GatherBlockQuantized"
              and n.input[0] in inits and n.input[0].startswith("model.embed_tokens.")}
    done = 0
    for name, q in quantize_model(source, block, cal, head=head, progress=progress, method=method,
                                  symmetric=symmetric, embedding=EMBEDDING in tables, ids=ids):
        if name == EMBEDDING:
            _write_table(tables[name], inits, q, block)
            done += 1
            continue
        node = nodes.get(name)
        if node is None:
            continue  # left at int8/float by a per-layer override or the head knob
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits") == 8:
            continue  # left at int8 by head_precision or int8_layers
        has_zp = len(node.input) > 3 and bool(node.input[3])
        if attrs.get("bits") != 4 or attrs.get("block_size") != block or has_zp != (q.zero_points is not None):
            kind = "symmetric" if q.zero_points is None else "asymmetric"
            raise ModelError(f"{method} expected a {kind} 4-bit MatMulNBits for {name}, found {attrs}"
                             f"{' with zero points' if has_zp else ''}.",
                             hint="The builder's int4 export and quantize.symmetric must agree.")
        packed, scales = pack(q, block)
        writes = [(node.input[1], packed), (node.input[2], scales)]
        if has_zp:
            writes.append((node.input[3], pack_zero_points(q)))
        for init_name, arr in writes:
            old = inits[init_name]
            if arr.size == int(np.prod(old.dims)) and arr.ndim != len(old.dims):
                arr = arr.reshape(tuple(old.dims))  # some builders keep zero points flat
            if tuple(old.dims) != arr.shape:
                raise ModelError(f"GPTQ weights for {name} have shape {arr.shape}, the graph has {tuple(old.dims)}.")
            new = numpy_helper.from_array(arr, init_name)
            old.CopyFrom(new)
        done += 1
    data = model_path.with_name(model_path.name + ".data")
    tmp = model_path.with_name(model_path.name + ".gptq")
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name + ".gptq", size_threshold=1024)
    mode = data.stat().st_mode & 0o777
    data.unlink()
    model_path.with_name(data.name + ".gptq").rename(data)
    data.chmod(mode)  # onnx writes external data owner-only (0600): the bundle's files keep the builder's mode
    # the graph file still names the temporary data file: point it at the final one
    fixed = onnx.load(str(tmp), load_external_data=False)
    for t in fixed.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = data.name
    tmp.write_bytes(fixed.SerializeToString(deterministic=True))
    tmp.replace(model_path)
    log.debug("GPTQ rewrote %d matmuls", done)
    return done
