"""Runtime LoRA adapters for ONNX bundles: adapter slots in the quantized base graph, and `.onnx_adapter` files.

A slot is a float LoRA branch beside one quantized MatMul of the base graph: `y = x·W_q4 + (x·A)·B`, where A
[K, rank] and B [rank, N] are graph inputs whose default is a rank-0 pair (the base model, at no cost).
onnxruntime-genai overrides them per generator from an `.onnx_adapter` file (`og.Adapters`,
`Generator.set_active_adapter`), so one quantized base serves many fine-tunes, each a few megabytes, switched
without reloading. The rank is a symbolic dimension: any rank fits, and only the modules decide whether an
adapter fits a base.

Slots are per PEFT module. The builder packs q, k and v into one `attn/qkv_proj` MatMul: its slot is three
branches, one per module, whose outputs are concatenated onto the q, k and v columns (so a base with a slot for
one of them has all three; an adapter that leaves one out leaves its branch at rank 0). The LoRA scale
(lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into B; the file holds exactly the adapter's parameters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import ModelError, UserError

# A PEFT module name → the builder's MatMul it adds to (the path inside /model/layers.N/).
SLOT_OF = {"q_proj": "attn/qkv_proj", "k_proj": "attn/qkv_proj", "v_proj": "attn/qkv_proj",
           "o_proj": "attn/o_proj", "gate_proj": "mlp/gate_proj", "up_proj": "mlp/up_proj",
           "down_proj": "mlp/down_proj"}
PACKED = {"attn/qkv_proj": ("q_proj", "k_proj", "v_proj")}  # one MatMul, its modules in column order
# Modules fused in the Hugging Face model (Phi-3) that the builder splits or packs: a LoRA on one is a LoRA on each
# part with the same A and its rows of B (q, k, v by the attention shape; gate, up by halves, as Phi3MLP chunks).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUFFIX = ".onnx_adapter"
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True)
class AdapterSpec:
    """What a PEFT LoRA adapter folder says about itself (adapter_config.json), checked for runtime use."""

    name: str
    folder: Path
    rank: int
    scale: float  # lora_alpha / r, or / sqrt(r) with rsLoRA (adapter.lora_scale): folded into B
    modules: tuple[str, ...]

    @property
    def slots(self) -> tuple[str, ...]:
        """The slots (module names) a base needs for this adapter."""
        return slots_of(self.modules)


def read_spec(name: str, folder: Path) -> AdapterSpec:
    """A PEFT LoRA folder as a runtime adapter; a setting the slots cannot carry is a ModelError naming it."""
    from edgepack.adapter import lora_scale, read_adapter

    config, _ = read_adapter(folder)
    modules = config.get("target_modules") or ()
    mods = tuple(sorted(modules)) if isinstance(modules, list) else (str(modules),)
    unknown = [m for m in mods if m not in SLOT_OF and m not in FUSED]
    hint = "Pass it with --adapter to merge it into the base instead (a whole model, any LoRA setting)."
    if unknown:
        raise ModelError(f"the adapter {name} adapts {', '.join(unknown)}; a runtime adapter can adapt "
                         f"{', '.join([*SLOT_OF, *FUSED])}.", hint=hint, adapter=name, modules=list(mods))
    for key, bad, what in (("use_dora", True, "DoRA"), ("modules_to_save", None, "modules_to_save")):
        value = config.get(key)
        if value and (bad is None or value == bad):
            raise ModelError(f"the adapter {name} uses {what}, which a runtime adapter cannot carry.", hint=hint,
                             adapter=name)
    if config.get("bias", "none") != "none":
        raise ModelError(f"the adapter {name} trains biases (bias={config.get('bias')!r}); a runtime adapter "
                         "carries LoRA matrices only.", hint=hint, adapter=name)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelError(f"the adapter {name} has per-module ranks (rank_pattern/alpha_pattern).", hint=hint,
                         adapter=name)
    rank: Any = config.get("r") or 0
    return AdapterSpec(name=name, folder=folder, rank=int(rank), scale=lora_scale(config), modules=mods)


def slots_of(modules: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """PEFT module names (or "all") → the slots a base gets for them (q, k and v go together: one packed MatMul);
    an unknown name is a UserError listing the known."""
    if list(modules) == ["all"]:
        modules = list(SLOT_OF)
    modules = [part for m in modules for part in FUSED.get(m, (m,))]
    unknown = [m for m in modules if m not in SLOT_OF]
    if unknown:
        raise UserError(f"{', '.join(unknown)} is not a module a LoRA slot can adapt.",
                        hint=f"Name some of {', '.join(SLOT_OF)}, or all.", modules=list(modules))
    out = {m for m in modules}
    for members in PACKED.values():
        if out & set(members):
            out |= set(members)
    return tuple(m for m in SLOT_OF if m in out)


def slot_input(layer: int, module: str, which: str) -> str:
    return f"model.layers.{layer}.{SLOT_OF[module].split('/')[0]}.{module}.lora_{which}"


def add_slots(model_dir: Path, modules: tuple[str, ...]) -> int:
    """Adds a LoRA slot for each module (slots_of) beside its MatMul in every layer; returns how many MatMuls got
    one. Only model.onnx's graph changes: the weights file is untouched, the defaults are rank-0 (empty) tensors."""
    import onnx
    from onnx import helper

    path = model_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    dtype = graph.output[0].type.tensor_type.elem_type  # the graph's activations: float32 on CPU, float16 on CUDA
    width = _widths(graph)
    columns = _columns(model_dir)
    paths = sorted({SLOT_OF[m] for m in modules})
    pattern = re.compile(r"^/model/layers\.(\d+)/(" + "|".join(re.escape(p) for p in paths) + r")/MatMul")
    nodes: list[Any] = []
    count = 0
    for node in graph.node:
        nodes.append(node)
        hit = pattern.match(node.name) if node.op_type in ("MatMulNBits", "MatMul") else None
        if not hit:
            continue
        layer, where = int(hit.group(1)), hit.group(2)
        k, n = width(node)
        members = PACKED.get(where) or tuple(m for m in modules if SLOT_OF[m] == where)
        prefix = f"/model/layers.{layer}/{where}/lora"
        deltas = []
        for m in members:
            a, b = slot_input(layer, m, "A"), slot_input(layer, m, "B")
            n_m = columns[m][1] if m in columns and where in PACKED else n
            for name, shape in ((a, [k, 0]), (b, [0, n_m])):
                graph.initializer.append(helper.make_tensor(name, dtype, shape, []))
                graph.input.append(helper.make_tensor_value_info(name, dtype, [shape[0] or "lora_rank",
                                                                                shape[1] or "lora_rank"]))
            nodes += [helper.make_node("MatMul", [node.input[0], a], [f"{prefix}/{m}/xA"], name=f"{prefix}/{m}/A"),
                      helper.make_node("MatMul", [f"{prefix}/{m}/xA", b], [f"{prefix}/{m}/xAB"],
                                       name=f"{prefix}/{m}/B")]
            deltas.append(f"{prefix}/{m}/xAB")
        if len(deltas) > 1:
            nodes.append(helper.make_node("Concat", deltas, [f"{prefix}/delta"], name=f"{prefix}/Concat", axis=-1))
            delta = f"{prefix}/delta"
        else:
            delta = deltas[0]
        out = node.output[0]
        node.output[0] = f"{out}/base"
        nodes.append(helper.make_node("Add", [f"{out}/base", delta], [out], name=f"{prefix}/Add"))
        count += 1
    if count == 0:
        raise UserError(f"the exported graph has no MatMul at {', '.join(paths)} to give a LoRA slot.",
                        hint="This exporter's graph is not the onnxruntime-genai builder's; report it.")
    del graph.node[:]
    graph.node.extend(nodes)
    # A new file renamed over the old: model.onnx may be a hard link into the build cache (cache.get_export).
    tmp = path.with_name(path.name + ".slots")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return count


def _columns(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(first column, width) of q, k and v in the packed qkv MatMul's output (genai_config's attention shape)."""
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    head, heads, kv = config["head_size"], config["num_attention_heads"], config["num_key_value_heads"]
    return {"q_proj": (0, heads * head), "k_proj": (heads * head, kv * head),
            "v_proj": ((heads + kv) * head, kv * head)}


def _widths(graph: Any) -> Any:
    """(K, N) of a MatMulNBits (its attributes) or a float MatMul (its weight's shape)."""
    shapes = {i.name: list(i.dims) for i in graph.initializer}

    def width(node: Any) -> tuple[int, int]:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            return attrs["K"], attrs["N"]
        k, n = shapes[node.input[1]]
        return int(k), int(n)

    return width


def base_slots(model_dir: Path) -> dict[str, list[int]]:
    """The slots a base graph has, as {input name: [K or 0, N or 0]} (rank-0 defaults)."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return {i.name: list(i.dims) for i in graph.initializer if re.search(r"\.lora_[AB]$", i.name)}


def slot_modules(model_dir: Path) -> tuple[str, ...]:
    """The modules a base graph has slots for, in SLOT_OF's order."""
    names = {re.sub(r"^model\.layers\.\d+\.\w+\.|\.lora_[AB]$", "", s) for s in base_slots(model_dir)}
    return tuple(m for m in SLOT_OF if m in names)


def write_adapter(spec: AdapterSpec, model_dir: Path, out: Path) -> dict[str, Any]:
    """The PEFT adapter as an `.onnx_adapter` for this base's slots; a module or layer the base has no slot for is
    a ModelError naming both. Returns what the manifest records of it."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from edgepack.adapter import read_adapter

    _, weights = read_adapter(spec.folder)
    if weights.suffix != ".safetensors":
        raise ModelError(f"the adapter {spec.name} is saved as {weights.name}; runtime adapters read safetensors.",
                         hint="Save it again with `model.save_pretrained(folder)` (safetensors is its default).",
                         adapter=spec.name)
    slots = base_slots(model_dir)
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in load_file(str(weights)).items():
        m = _KEY.search(key)
        if not m:
            raise ModelError(f"the adapter {spec.name} has a tensor {key} that is not a layer's LoRA matrix.",
                             hint="Runtime adapters carry q/k/v/o and MLP LoRA matrices only; merge it with "
                                  "--adapter instead.", adapter=spec.name)
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value.astype(np.float32)
    pairs = _unfused(pairs, _columns(model_dir))
    dtype = np.float16 if _float16(model_dir) else np.float32
    params: dict[str, Any] = {}
    for (layer, module), pair in sorted(pairs.items()):
        a_name, b_name = slot_input(layer, module, "A"), slot_input(layer, module, "B")
        if a_name not in slots:
            have = list(slot_modules(model_dir))
            raise ModelError(f"the adapter {spec.name} adapts {module} of layer {layer}, but this base has LoRA "
                             f"slots for {', '.join(have) or 'nothing'}.",
                             hint=f"Build the base again with --runtime-adapter {spec.name}=... among its adapters (or "
                                  "--lora-slots all), so the base gets slots for its modules.",
                             adapter=spec.name, adapter_modules=list(spec.modules), base_slots=have)
        if set(pair) != {"A", "B"}:
            raise ModelError(f"the adapter {spec.name} has only lora_{''.join(pair)} for {module} of layer {layer}.",
                             hint="The adapter folder is incomplete; save it again.", adapter=spec.name)
        a, b = pair["A"].T, pair["B"].T * spec.scale  # [K, r], [r, N]
        if a.shape[0] != slots[a_name][0] or b.shape[1] != slots[b_name][1]:
            raise ModelError(f"the adapter {spec.name}'s {module} of layer {layer} is {a.shape[0]}→{b.shape[1]}; "
                             f"the base's is {slots[a_name][0]}→{slots[b_name][1]}.",
                             hint="Pass the base model the adapter was trained on.", adapter=spec.name)
        params[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a.astype(dtype)))
        params[b_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b.astype(dtype)))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(out))
    return {"rank": spec.rank, "modules": list(spec.modules), "layers": len({layer for layer, _ in pairs}),
            "parameters": int(sum(np.prod(v.shape()) for v in params.values()))}


def _unfused(pairs: dict[tuple[int, str], dict[str, Any]], columns: dict[str, tuple[int, int]]
             ) -> dict[tuple[int, str], dict[str, Any]]:
    """A fused module's pair (FUSED) as one pair per part: the same A, each part's rows of B."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for (layer, module), pair in pairs.items():
        parts = FUSED.get(module)
        if parts is None or set(pair) != {"A", "B"}:
            out[(layer, module)] = pair
            continue
        rows = pair["B"].shape[0]
        spans = ([columns[p] for p in parts] if module == "qkv_proj" else
                 [(0, rows // 2), (rows // 2, rows - rows // 2)])
        if sum(width for _, width in spans) != rows:
            raise ModelError(f"the adapter's {module} of layer {layer} has {rows} output rows; this base's parts "
                             f"({', '.join(parts)}) have {sum(w for _, w in spans)}.",
                             hint="Pass the base model the adapter was trained on.")
        for part, (start, width) in zip(parts, spans, strict=True):
            out[(layer, part)] = {"A": pair["A"], "B": pair["B"][start:start + width]}
    return out


def _float16(model_dir: Path) -> bool:
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return bool(graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16)
