"""A safetensors checkpoint read one tensor at a time, and transformers models whose weights come from it on demand.

Two users: the ONNX export (backends/streaming.py), where the builder walks a model on the meta device and each
decoder layer is read just before it becomes nodes; and the quality gate's float reference (quality/reference.py),
where each decoder layer is read, cast to fp32, run and dropped again on every forward pass. Either way one layer
is resident, never the whole model: 4 bytes per parameter in fp32 is 15 GB at 3.8B.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or sharded with an index), read one at a time."""

    def __init__(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors"))
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for path in files:
            with path.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            base = 8 + size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[name] = (path, info["dtype"], tuple(info["shape"]), base + start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, into: Any = None) -> Any:
        """The tensor, in anonymous memory of its own (freed with it), or in the front of `into` (a uint8 tensor at
        least as large, reused by the caller: no new pages to fault in)."""
        import torch

        path, dtype, shape, offset, nbytes = self.entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
        with path.open("rb", buffering=0) as fh:
            fh.seek(offset)
            view = buf.numpy().data
            got = 0
            while got < nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise OSError(f"{path} ends before tensor {name}")
                got += n
        return buf.view(getattr(torch, _ST_DTYPES[dtype])).reshape(shape)


class LazyWeights:
    """A transformers model on the meta device whose parameters are read from the checkpoint on demand."""

    def __init__(self, model: Any, checkpoint: Checkpoint, dtype: Any, *, reuse: bool = False) -> None:
        """`reuse`: a released layer's tensors are kept and the next layer of the same shapes is read into them
        (through one staging buffer), for a caller that loads layers over and over (the layered reference: every
        forward pass, every greedy token). Only where nothing else holds the tensors after release: not the
        ONNX builder, whose graph keeps some of them."""
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.reuse = reuse
        self.pool: dict[tuple[tuple[int, ...], Any], list[Any]] = {}
        self.staging: Any = None
        # Tied parameters are one Parameter under several names: group the slots, read the tensor once.
        self.groups: dict[int, list[tuple[Any, str, str]]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for pname, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{pname}" if mod_name else pname
                self.groups.setdefault(id(param), []).append((module, pname, full))

    def missing(self) -> list[str]:
        return [slots[0][2] for slots in self.groups.values()
                if not any(full in self.checkpoint for _, _, full in slots)]

    def _params_under(self, root: Any) -> list[list[tuple[Any, str, str]]]:
        # By module, not by parameter: release() puts new meta Parameters in the slots, so ids do not last.
        under = {id(m) for m in root.modules()}
        return [slots for slots in self.groups.values() if any(id(m) in under for m, _, _ in slots)]

    def load(self, root: Any) -> None:
        import torch

        for slots in self._params_under(root):
            module, pname, _ = slots[0]
            if not getattr(module, pname).is_meta:
                continue
            name = next(full for _, _, full in slots if full in self.checkpoint)
            tensor = self._read_reused(name) if self.reuse else None
            if tensor is None:
                tensor = self.checkpoint.read(name)
                if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
                    tensor = tensor.to(self.dtype)
            param = torch.nn.Parameter(tensor, requires_grad=False)
            for m, p, _ in slots:
                m._parameters[p] = param

    def _read_reused(self, name: str) -> Any:
        """The tensor read into a pooled one of its shape (cast in place), or None when the pool has none."""
        import torch

        _, dtype, shape, _, nbytes = self.checkpoint.entries[name]
        source = getattr(torch, _ST_DTYPES[dtype])
        target = self.dtype if self.dtype is not None and source.is_floating_point else source
        free = self.pool.get((shape, target))
        if not free:
            return None
        out = free.pop()
        if self.staging is None or self.staging.numel() < nbytes:
            self.staging = torch.empty(nbytes, dtype=torch.uint8)
        out.copy_(self.checkpoint.read(name, into=self.staging))
        return out

    def release(self, root: Any) -> None:
        """Every parameter under `root` back to meta, including those the builder hung on the layer itself (it
        splits fused qkv/gate_up weights into new Linear modules whose weights are views of the fused one).
        What the graph still references (norm weights, float MatMuls) stays alive there."""
        import torch

        pooled: set[int] = set()
        for module in root.modules():
            for pname, old in list(module._parameters.items()):
                if old is not None and not old.is_meta:
                    if self.reuse and id(old) not in pooled:
                        pooled.add(id(old))
                        self.pool.setdefault((tuple(old.shape), old.dtype), []).append(old.data)
                    module._parameters[pname] = torch.nn.Parameter(
                        torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False)

    def modules(self, is_layer: Callable[[Any], bool], on_layer: Callable[[int], None]) -> Iterator[Any]:
        """model.modules(), with each decoder layer loaded while the caller (the ONNX builder) works on it."""
        import torch

        layer = 0
        for module in torch.nn.Module.modules(self.model):  # the class's: the instance's own is this method
            if is_layer(module):
                self.load(module)
                yield module  # the builder makes this whole layer before asking for the next module
                self.release(module)
                on_layer(layer)
                layer += 1
            else:
                yield module


def return_freed_memory() -> None:
    """Serve large allocations from mmap at a fixed threshold, so that a released layer goes back to the system.
    glibc raises the threshold after each large free (up to 32 MB), after which a layer's tensors come from the
    heap and freed layers stay in the process: measured at 1.1B (the streamed builder), 1.8 GB peak with this and
    2.7 GB without."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules made inside get their parameters on the meta device and keep real buffers (rotary inv_freq and
    the like, computed at construction): what a forward pass needs besides the weights."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _decoder_layers(model: Any, count: int) -> list[Any]:
    """The decoder blocks: the ModuleList of `num_hidden_layers` modules (model.model.layers and its kin)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return list(lists[0]) if len(lists) == 1 else []


def layered_model(folder: Path, dtype: Any = None) -> Any:
    """The checkpoint in `folder` as a transformers causal LM in `dtype` (fp32 by default) of which only the
    parts outside the decoder layers (embedding, final norm, head: read now) and the layer being run are in
    memory: each layer is read from the safetensors files and cast when its forward pass starts, and dropped
    when it ends. Its outputs are the whole fp32 model's, bit for bit (the same tensors and kernels). None where
    this cannot hold (no safetensors, tensor names the model does not use, an unrecognised layer list): the
    caller loads the model whole."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    checkpoint = Checkpoint(folder)
    if not checkpoint.entries or any(name.endswith((".qweight", ".absmax")) for name in checkpoint.entries):
        return None  # nothing to read lazily, or weights stored pre-quantized
    # Reusing a layer's tensors (reuse=True below) makes a greedy token 2.7x faster at 1.1B (no fresh pages to
    # zero: 5.4 s against 14.8 s for 8 tokens); serving large blocks from mmap gives the activations' back too:
    # 1,242 MB peak against 1,648 at the same speed (bench/layered_reference.py, docs/performance.md).
    return_freed_memory()
    config = transformers.AutoConfig.from_pretrained(folder)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    layers = _decoder_layers(model, int(getattr(config.get_text_config(), "num_hidden_layers", 0) or 0))
    weights = LazyWeights(model, checkpoint, dtype, reuse=True)
    if not layers or weights.missing():
        return None
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    for slots in weights.groups.values():
        module, pname, _ = slots[0]
        if id(getattr(module, pname)) not in in_layers:
            weights.load(module)
    handle = Layers(weights, layers)
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, _args: weights.load(module) if handle.auto else None)
        layer.register_forward_hook(lambda module, _args, _out: weights.release(module) if handle.auto else None)
    model.edgepack_layers = handle
    return model


class Layers:
    """A layered model's decoder layers (`model.edgepack_layers`). Each forward pass reads its layer and drops it
    again (`auto`); a caller that works on one layer across several passes (GPTQ writes its quantized weights
    into the layer, then runs it) turns `auto` off and holds the layer itself."""

    def __init__(self, weights: LazyWeights, layers: list[Any]) -> None:
        self.weights, self.layers, self.auto = weights, layers, True

    @contextlib.contextmanager
    def held(self, layer: Any) -> Iterator[Any]:
        self.weights.load(layer)
        try:
            yield layer
        finally:
            self.weights.release(layer)


def float_model(folder: Path) -> Any:
    """The fp32 float model the quality gate compares against: layered (one decoder layer resident) where it
    can be, else the whole model."""
    import torch
    import transformers

    model = layered_model(folder)
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()
