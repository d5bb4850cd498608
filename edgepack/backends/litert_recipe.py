"""Per-layer LiteRT quantization: edgepack's own recipes, matched to the op names litert-torch really exports.

litert-torch 0.10's per-layer recipes translate to regexes (`transformer_blocks[i]/...attention`) that match no
op of what it exports (`TransformerBlock_i/...CausalSelfAttention_atten_func/...Linear_qkv_projection`), so they
quantize nothing differently and say nothing. Here every FULLY_CONNECTED and EMBEDDING_LOOKUP op of the float
.tflite is classified by its scope (ai-edge-quantizer's op scope: the op's output tensor names) into a part and
a block, each op gets one mode, and ai-edge-quantizer is given one exact, anchored regex per op. A rule that
selects no op is an error before anything is quantized, and `verify` reads the quantized file back: every op
must carry the weight type its mode promises.

Modes: `dynamic` (int8 weights per channel, activations quantized on the fly: XNNPACK's integer kernels),
`weight_only` (int8 weights, dequantized to float at load: accurate, ~21× the file in RAM), `fp16` (half weights,
dequantized at load), `float` (left as exported).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import TargetError, UserError
from edgepack.targets import LayerRule, TargetProfile

# litert-torch's layer names: GatedFeedForward computes w2(act(w1(x)) * w3(x)).
_LINEAR_PART = {"qkv_projection": "attention.qkv", "output_projection": "attention.output",
                "w1": "feedforward.gate", "w3": "feedforward.up", "w2": "feedforward.down"}
_BLOCK = re.compile(r"TransformerBlock_(\d+)/")
_LINEAR = re.compile(r"Linear_(\w+?);")


@dataclass(frozen=True)
class Op:
    subgraph: int
    index: int
    kind: str  # FULLY_CONNECTED or EMBEDDING_LOOKUP
    scope: str
    part: str
    block: int | None
    weight: int  # buffer index of the constant weight: tied tensors share one


def ops_of(model: Any) -> list[Op]:
    """Every quantizable weight op of a float .tflite (ai-edge-quantizer's ModelT), classified."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    found = []
    for sg_i, sg in enumerate(model.subgraphs):
        made = {t for op in sg.operators for t in op.outputs} | set(sg.inputs)
        for op_i, op in enumerate(sg.operators):
            kind = tfl.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
            if kind is None or str(kind.value) not in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP"):
                continue
            weight_t = op.inputs[1]  # FULLY_CONNECTED (input, weight, bias), EMBEDDING_LOOKUP (ids, table)
            if weight_t < 0 or weight_t in made:
                continue  # a product of two activations: nothing to quantize
            scope = tfl.get_op_scope(op, sg.tensors)
            part, block = classify(str(kind.value), scope)
            found.append(Op(sg_i, op_i, str(kind.value), scope, part, block, int(sg.tensors[weight_t].buffer)))
    return found


def classify(kind: str, scope: str) -> tuple[str, int | None]:
    """(part, block) of one op from its scope. The first tensor name is the op's own output; later names come
    from ops the converter fused into it (w3's scope also names w1), so the first name decides where it can."""
    if kind == "EMBEDDING_LOOKUP":
        return "embedding", None
    first = scope.split(";", 1)[0] + ";"
    block = _BLOCK.search(first)
    if block is None:
        return "head", None
    linear = _LINEAR.search(first) or _LINEAR.search(scope)
    part = _LINEAR_PART.get(linear.group(1)) if linear else None
    if part is None:
        raise UserError(f"a weight op of the exported model is not one edgepack knows: {scope[:200]}",
                        hint="Remove quantize.litert_layers (the whole-model recipes still work) and report it "
                             "with the model id.")
    return part, int(block.group(1))


def plan(ops: list[Op], default: str, rules: tuple[LayerRule, ...]) -> dict[Op, str]:
    """The mode of every op. Raises when a rule selects nothing, or when tied weights would get two modes."""
    blocks = sorted({o.block for o in ops if o.block is not None})
    modes = {o: default for o in ops}
    for rule in rules:
        if rule.blocks == "outliers":
            raise ValueError("outlier blocks are resolved by the exporter before planning")
        missing = sorted(set(rule.blocks or ()) - set(blocks))
        hit = [o for o in ops if o.part in rule.parts and (rule.blocks is None or o.block in rule.blocks)]
        if missing or not hit:
            raise UserError(f"quantize.litert_layers rule ({rule.describe()}) matches no op of this model"
                            + (f": it has no block {missing}" if missing else "") + ".",
                            hint=f"This model has blocks 0–{blocks[-1] if blocks else 0} and parts "
                                 f"{sorted({o.part for o in ops})}.", rule=rule.describe())
        for o in hit:
            modes[o] = rule.mode
    by_weight: dict[int, set[str]] = {}
    for o, m in modes.items():
        by_weight.setdefault(o.weight, set()).add(m)
    for weight, ms in by_weight.items():
        if len(ms) > 1:
            parts = sorted({o.part for o in ops if o.weight == weight})
            raise UserError(f"{' and '.join(parts)} share one weight tensor in this model (tied embeddings) but the "
                            f"rules give it {sorted(ms)}.", hint=f"Give {' and '.join(parts)} the same mode.")
    return modes


def quantize(float_path: Path, out_path: Path, default: str, rules: tuple[LayerRule, ...]) -> dict[str, Any]:
    """Quantize a float .tflite op by op; returns the plan's counts. The written file is verified."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    qt = quantizer.Quantizer(str(float_path))
    ops = ops_of(qt._float_model)  # noqa: SLF001 - the model it already parsed
    modes = plan(ops, default, rules)
    names = {"FULLY_CONNECTED": qtyping.TFLOperationName.FULLY_CONNECTED,
             "EMBEDDING_LOOKUP": qtyping.TFLOperationName.EMBEDDING_LOOKUP}
    done: set[tuple[str, str]] = set()
    for o, mode in modes.items():
        key = (o.scope, o.kind)
        if key in done or mode == "float":
            continue
        done.add(key)
        regex, op_name = "^" + re.escape(o.scope) + "$", names[o.kind]
        if mode == "dynamic" and o.kind == "FULLY_CONNECTED":
            qt.add_dynamic_config(regex, op_name, 8)
        elif mode == "fp16":
            qt.add_weight_only_config(regex, op_name, 16, algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
        else:  # weight_only, and dynamic for an embedding lookup (a table read: its weights are all it has)
            qt.add_weight_only_config(regex, op_name, 8)
    if done:
        qt.quantize().export_model(str(out_path), overwrite=True)
    else:
        import shutil

        shutil.copyfile(float_path, out_path)
    counts = Counter(f"{o.part}:{m}" for o, m in modes.items() if o.subgraph == 0)
    verify(out_path, {(o.subgraph, o.index): (o, m) for o, m in modes.items()})
    return {"default": default, "rules": [r.describe() for r in rules], "ops": dict(sorted(counts.items()))}


def verify(path: Path, expected: dict[tuple[int, int], tuple[Op, str]]) -> None:
    """Every op of the plan carries the weight its mode promises in the written file (ops keep their order:
    ai-edge-quantizer only inserts DEQUANTIZE ops, so ops are matched by scope within each subgraph)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = tfl.read_model(str(path))
    want: dict[tuple[int, str, str], str] = {(o.subgraph, o.kind, o.scope): m for o, m in expected.values()}
    wrong = []
    for sg_i, sg in enumerate(model.subgraphs):
        producers = {t: op for op in sg.operators for t in op.outputs}
        for op in sg.operators:
            kind = tfl.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
            if kind is None or str(kind.value) not in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP"):
                continue
            mode = want.get((sg_i, str(kind.value), tfl.get_op_scope(op, sg.tensors)))
            if mode is None:
                continue
            t = sg.tensors[op.inputs[1]]
            src = producers.get(op.inputs[1])
            if src is not None:  # weight-only / fp16: a DEQUANTIZE feeds the op with the stored weight
                t = sg.tensors[src.inputs[0]]
            got = {0: "float32", 1: "float16", 9: "int8"}.get(int(t.type), str(t.type))
            dequantized = src is not None
            ok = {"dynamic": got == "int8" and (not dequantized or str(kind.value) == "EMBEDDING_LOOKUP"),
                  "weight_only": got == "int8" and (dequantized or str(kind.value) == "EMBEDDING_LOOKUP"),
                  "fp16": got == "float16", "float": got == "float32" and not dequantized}[mode]
            if not ok:
                wrong.append(f"{mode} op stored {got}{' (dequantized)' if dequantized else ''}: "
                             f"{tfl.get_op_scope(op, sg.tensors)[:160]}")
    if wrong:
        raise UserError(f"the LiteRT recipe did not apply to {len(wrong)} op(s); first: {wrong[0]}",
                        hint="Report it with the model id and the target's quantize section.")


def check_litert_fields(p: TargetProfile) -> None:
    """The [quantize] fields that only LiteRT's int8 recipes read: refused on any other format or scheme (each
    exporter's check_profile calls this)."""
    q = p.quantize
    if q.algorithm == "weight_only" and (p.export.format != "tflite" or q.scheme != "int8"):
        raise TargetError(f"{p.source}: quantize.algorithm = \"weight_only\" is the TFLite int8 recipe with float "
                          "activations (export.format = \"tflite\", scheme = \"int8\").",
                          hint="ONNX int8 is weight-only already; remove the field.", path=p.source,
                          field="quantize.algorithm")
    if q.litert_layers and (p.export.format != "tflite" or q.scheme != "int8"):
        raise TargetError(f"{p.source}: quantize.litert_layers mixes LiteRT int8 recipes per layer (export.format = "
                          f"\"tflite\", scheme = \"int8\"; this target has {p.export.format}, {q.scheme}).",
                          hint="Remove it; on ONNX, int8_layers and head_precision set per-layer precision.",
                          path=p.source, field="quantize.litert_layers")
    if q.algorithm == "smoothquant" and (p.export.format != "tflite" or q.scheme != "int8"):
        raise TargetError(f"{p.source}: quantize.algorithm = \"smoothquant\" is the TFLite dynamic int8 recipe "
                          "(export.format = \"tflite\", scheme = \"int8\").",
                          hint="On ONNX int4, algorithm = \"imatrix\" is the activation-aware choice.", path=p.source,
                          field="quantize.algorithm")
    if any(r.blocks == "outliers" for r in q.litert_layers) and q.algorithm != "smoothquant":
        raise TargetError(f"{p.source}: quantize.litert_layers blocks = \"outliers\" are found by SmoothQuant's "
                          "calibration (algorithm = \"smoothquant\").",
                          hint="Set algorithm = \"smoothquant\", or list the blocks.", path=p.source,
                          field="quantize.litert_layers")
