"""TFLite/LiteRT export through litert-torch: a KV-cache decoder packed as .litertlm (LiteRT-LM) or plain .tflite.

Why not `tflite-runtime` (the package the card names): its last release (2.14) cannot load what current
litert-torch writes ("Op builtin_code out of range: 206", STABLEHLO_COMPOSITE). The maintained runtimes are
ai-edge-litert (the Interpreter) and LiteRT-LM (`litert-lm-api`); docs/design.md has the measurements.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from edgepack.backends import exporters
from edgepack.backends.base import ExportedModel, GraphStats, NativeLibrary
from edgepack.backends.litert_convert import problem as litert_problem
from edgepack.build_memory import out_of_memory, run_converter
from edgepack.errors import ModelError, UserError, require
from edgepack.families import Family, shape_of
from edgepack.families import check as check_family
from edgepack.fsutil import dir_bytes
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn
from edgepack.targets import LayerRule, TargetProfile
from edgepack.versions import installed_versions

BLOCK_SIZES = (32, 64, 128, 256)  # litert-torch's blockwise int4 granularities
KV_CACHE_LEN = 1024
PREFILL_LEN = 128

# LiteRT-LM hands templates message['content'] as a list of {"type": "text", "text": ...} parts; HF chat
# templates expect a string. This preamble turns the parts back into a string before the model's template runs.
_TEMPLATE_PREAMBLE = (
    "{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set c = m['content'] -%}{%- else -%}"
    "{%- set t = namespace(v='') -%}{%- for p in m['content'] -%}{%- if p['type'] == 'text' -%}"
    "{%- set t.v = t.v + p['text'] -%}{%- endif -%}{%- endfor -%}{%- set c = t.v -%}{%- endif -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': c}] -%}{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


def block_problem(config: dict[str, Any], block: int) -> str | None:
    """Blockwise int4 quantizes along each weight's input dimension: every one must be a multiple of the block."""
    heads = int(config["num_attention_heads"])
    dims = {"hidden_size": int(config["hidden_size"]),
            "num_attention_heads × head_dim": heads * int(config.get("head_dim") or config["hidden_size"] // heads),
            "intermediate_size": int(config["intermediate_size"])}
    bad = {k: v for k, v in dims.items() if v % block}
    if not bad:
        return None
    valid = [b for b in BLOCK_SIZES if all(v % b == 0 for v in dims.values())]
    name, dim = next(iter(bad.items()))
    return (f"quantize.block_size = {block} does not divide the model's {name} ({dim}); "
            f"block sizes that divide every weight of this model: {valid or 'none'}")


def _chat_template(hf_dir: Path) -> str | None:
    path = hf_dir / "chat_template.jinja"
    if path.is_file():
        text: str | None = path.read_text(encoding="utf-8")
    else:
        cfg = json.loads((hf_dir / "tokenizer_config.json").read_text()) if (
            hf_dir / "tokenizer_config.json").is_file() else {}
        text = cfg["chat_template"] if isinstance(cfg.get("chat_template"), str) else None
    return _TEMPLATE_PREAMBLE + text if text else None


def tflite_stats(path: Path) -> GraphStats:
    """Op counts and which constant 2-D weights are quantized, read from the flatbuffer."""
    from ai_edge_litert import schema_py_generated as fb

    buf = path.read_bytes()
    model = fb.Model.GetRootAsModel(buf, 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    ops: Counter[str] = Counter()
    weights: Counter[str] = Counter()
    seen: set[int] = set()
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        scales = set()  # blockwise int4 keeps a float [N, K/block] scale table per weight: not a float weight
        for i in range(sg.TensorsLength()):
            q = sg.Tensors(i).Quantization()
            if q is not None and q.DetailsType() == fb.QuantizationDetails.BlockwiseQuantization:
                table = q.Details()
                bq = fb.BlockwiseQuantization()
                bq.Init(table.Bytes, table.Pos)
                scales.add(bq.Scales())
        for i in range(sg.OperatorsLength()):
            code = model.OperatorCodes(sg.Operators(i).OpcodeIndex())
            ops[names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")] += 1
        for i in range(sg.TensorsLength()):
            t = sg.Tensors(i)
            b = t.Buffer()
            if i in scales or b in seen or t.ShapeLength() != 2 or t.ShapeAsNumpy().prod() < 1024:
                continue
            buffer = model.Buffers(b)
            if buffer is None or (buffer.DataLength() == 0 and buffer.Size() == 0):
                continue  # not a constant
            seen.add(b)
            weights[types.get(t.Type(), str(t.Type()))] += 1
    quantized = sum(n for k, n in weights.items() if k.startswith(("INT", "UINT")))
    floats = weights.get("FLOAT32", 0) + weights.get("FLOAT16", 0)
    bits = sorted({8 if k in ("INT8", "UINT8") else 4 for k in weights if k in ("INT8", "UINT8", "INT4")})
    return GraphStats(nodes=sum(ops.values()), quantized_matmuls=quantized, float_matmuls=floats,
                      bits=tuple(bits), op_types=dict(sorted(ops.items())))


def runtime_versions() -> dict[str, str]:
    return installed_versions("litert-lm-api", "ai-edge-litert", "numpy")


@exporters.register("tflite")
class TfliteExporter:
    format = "tflite"
    runtime = "litert-lm"
    template = "litert-lm"
    packages: tuple[str, ...] = ("litert-lm-api",)
    # native/ with --native (docs/native.md): the wheel's liblitert-lm.so is a glibc build (133 MB on aarch64), for
    # glibc userlands, not an NDK app: not in a bundle unless asked for
    native_libraries: tuple[NativeLibrary, ...] = (
        NativeLibrary("litert-lm-api", r"litert_lm/liblitert-lm\.so", "liblitert-lm.so"),)
    native_default = False

    @staticmethod
    def check_profile(p: TargetProfile) -> None:
        """This format's rules for a target profile (targets.py checks the rest when it loads one)."""
        from edgepack.backends.litert_recipe import check_litert_fields

        check_litert_fields(p)

    @staticmethod
    def check_supported(source: ModelSource, target: TargetProfile) -> Family:
        # Which families (architecture, rope type, sliding window) convert: edgepack/data/families.toml.
        return check_family(shape_of(source.hf_dir / "config.json"), "tflite", "TFLite")

    @staticmethod
    def export(source: ModelSource, target: TargetProfile, out_dir: Path, work_dir: Path,
               progress: ProgressFn) -> ExportedModel:
        _installed("litert_torch", "TFLite export")  # imported by the converter process only: it is heavy
        _installed("ai_edge_litert", "TFLite export")
        q = target.quantize
        kv_len = target.runtime.context_length or KV_CACHE_LEN  # LiteRT allocates its KV cache at this
        config = json.loads((source.hf_dir / "config.json").read_text())
        refusal = litert_problem(config, kv_len)
        if refusal:
            raise ModelError(f"litert-torch cannot convert {source.name} exactly: {refusal}.",
                             hint="Use --format onnx for this model (where a length is named, a smaller "
                                  "runtime.context_length in the target also does).",
                             model_type=config.get("model_type"), kv_cache_len=kv_len)
        if q.scheme == "int4":
            problem = block_problem(config, q.block_size)
            if q.block_size not in BLOCK_SIZES:
                problem = (f"quantize.block_size = {q.block_size} is not a litert-torch int4 granularity; "
                           f"it offers {list(BLOCK_SIZES)}")
            if problem:
                raise UserError(problem + ".", hint="Set quantize.block_size in the target to one of those.",
                                field="quantize.block_size", block_size=q.block_size)
        too_far = sorted({b for r in q.litert_layers if isinstance(r.blocks, tuple) for b in r.blocks
                          if b >= config["num_hidden_layers"]})
        if too_far:
            raise UserError(f"quantize.litert_layers names block(s) {too_far}, but {source.name} has "
                            f"{config['num_hidden_layers']} blocks (0–{config['num_hidden_layers'] - 1}).",
                            hint="Fix the blocks in the target's rules.", field="quantize.litert_layers")
        package = "litertlm" if target.runtime.template == "litert-lm" else "tflite"
        if package == "litertlm":
            _installed("litert_lm_builder", "Packaging .litertlm files")
        facts = source.tokenizer
        stop = sorted({int(t) for t in _stop_ids(source)})
        result_path = work_dir / "litert-result.json"
        hf_dir, smoothed = source.hf_dir, None
        if q.algorithm == "smoothquant":
            from edgepack.backends import calibration, smooth

            cal = calibration.Calibration(text=calibration.calibration_path(target))
            hf_dir = work_dir / "smoothed"
            smoothed = {**smooth.smooth(source, hf_dir, cal, progress),
                        "calibration": cal.text.name if cal.text else
                        f"sampled from the model: {cal.samples}×{cal.tokens} tokens, seed {cal.seed}"}
        rules = _resolved(q.litert_layers, smoothed)
        spec = {"hf_dir": str(hf_dir), "out_dir": str(out_dir), "scheme": q.scheme,
                "weight_only": q.algorithm == "weight_only", "block_size": q.block_size,
                "kv_cache_len": kv_len, "prefill_len": PREFILL_LEN,
                "layers": [{k: v for k, v in asdict(r).items() if v is not None} for r in rules],
                "package": package, "tokenizer_json": str(source.hf_dir / "tokenizer.json"),
                "stop_ids": stop, "bos_id": facts.bos_token_id if facts.add_bos_token else None,
                "chat_template": _chat_template(source.hf_dir), "result": str(result_path)}
        ignored = [k for k, v in (("algorithm", q.algorithm not in ("default", "weight_only", "smoothquant")),
                                  ("head_precision", q.head_precision != "same"),
                                  ("sensitive_layers_int8", q.sensitive_layers_int8),
                                  ("int8_layers", bool(q.int8_layers))) if v]
        spec_path = work_dir / "litert-spec.json"
        spec_path.write_text(json.dumps(spec))
        progress(ProgressEvent("export", f"litert-torch: {q.scheme}"
                               + (f" block {q.block_size}" if q.scheme == "int4" else "")
                               + f", KV cache {kv_len}, prefill {PREFILL_LEN}, packaged as .{package}"
                               + (f" (ONNX-only knobs ignored: {', '.join(ignored)})" if ignored else "")))
        run = run_converter([sys.executable, "-m", "edgepack.backends.litert_convert", str(spec_path)],
                            work_dir / "litert-convert.log", TF_CPP_MIN_LOG_LEVEL="2")
        code, tail = run.code, run.tail
        if code == 3 and result_path.is_file():
            raise UserError(**json.loads(result_path.read_text())["error"])
        oom = out_of_memory(run, tool="litert-torch converter", model=source.name, config=config,
                            target=target) if code != 0 else None
        if oom is not None:  # killed for memory: the machine's size, not the model's fault
            raise oom
        if code != 0:
            raise UserError(f"litert-torch failed to convert {source.name} (exit {code}).",
                            hint="Its last lines are in the error's 'log_tail'.", log_tail=tail)
        result = json.loads(result_path.read_text())
        if package == "tflite":  # the plain runner reads these beside the model
            import shutil

            shutil.copy2(source.hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
            template = _chat_template(source.hf_dir)
            (out_dir / "generation.json").write_text(json.dumps({
                "stop_ids": stop, "bos_id": spec["bos_id"], "kv_cache_len": kv_len,
                "chat_template": template[len(_TEMPLATE_PREAMBLE):] if template else None}, indent=1) + "\n")
        with _tflite_file(out_dir) as tflite:
            stats = tflite_stats(tflite)
        kept_float = any(r.mode in ("float", "fp16") for r in q.litert_layers)  # litert_recipe verified each op
        if q.scheme in ("int4", "int8") and (stats.quantized_matmuls == 0 or (stats.float_matmuls > 2
                                                                             and not kept_float)):
            raise UserError(f"scheme {q.scheme} left weights in float: {stats.quantized_matmuls} quantized and "
                            f"{stats.float_matmuls} float 2-D weight tensors in the .tflite.",
                            hint="The litert-torch recipe did not apply; report it with the model id.")
        options = {"recipe": result["recipe"], "layers": result.get("layers"), "smoothquant": smoothed,
                   "kv_cache_len": kv_len,
                   "prefill_len": PREFILL_LEN,
                   "package": package, "ignored": ignored}  # no timings: the manifest (and so the id) is reproducible
        return ExportedModel(dir=out_dir, format="tflite", scheme=q.scheme, options=options,
                             bytes=dir_bytes(out_dir), stats=stats, runtime_versions=runtime_versions(),
                             context_length=kv_len)

    @staticmethod
    def scorer(model_dir: Path, adapter: Path | None = None) -> LiteRTScorer:
        if adapter is not None:  # resolve refuses runtime adapters for LiteRT targets before any export
            raise UserError("LiteRT bundles carry no runtime adapters.")
        return LiteRTScorer(model_dir)


def _resolved(rules: tuple[LayerRule, ...], smoothed: dict[str, Any] | None) -> tuple[LayerRule, ...]:
    """blocks = "outliers" → the blocks SmoothQuant's calibration found for the rule's parts (a rule that finds
    none is dropped: the model has no outliers there)."""
    out = []
    for r in rules:
        if r.blocks == "outliers":
            found = sorted({b for part in r.parts for b in (smoothed or {}).get("outliers", {}).get(part, [])})
            if not found:
                continue
            r = replace(r, blocks=tuple(found))
        out.append(r)
    return tuple(out)


def _installed(module: str, purpose: str) -> None:
    import importlib.util

    from edgepack.errors import MissingExtraError

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(module, "tflite", purpose=purpose)


def _stop_ids(source: ModelSource) -> list[int]:
    ids = [source.tokenizer.eos_token_id] if source.tokenizer.eos_token_id is not None else []
    gen = source.hf_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids


class _tflite_file:
    """The .tflite inside a model folder: the plain file, or unpacked from the .litertlm."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        plain = self.model_dir / "model.tflite"
        if plain.is_file():
            return plain
        self._tmp = tempfile.TemporaryDirectory(prefix="edgepack-litertlm-")
        return unpack_tflite(self.model_dir / "model.litertlm", Path(self._tmp.name))

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def unpack_tflite(litertlm: Path, into: Path) -> Path:
    import io

    from litert_lm_builder import litertlm_peek

    litertlm_peek.peek_litertlm_file(str(litertlm), str(into), io.StringIO())
    found = sorted(into.rglob("*.tflite"))
    if not found:
        raise ModelError(f"{litertlm} holds no TFLite model section.")
    return found[0]


class LiteRTScorer:
    """The bundle's model through LiteRT's Interpreter (ai-edge-litert), teacher-forced, full logits.
    LiteRT-LM itself exposes only the target token's log-probability; the Interpreter runs the same file
    with the same XNNPACK kernels (their per-token log-probs agree to 2e-4, tested)."""

    scored_on = "cpu (the LiteRT Interpreter on the .tflite inside the bundle's .litertlm)"

    def __init__(self, model_dir: Path) -> None:
        require("ai_edge_litert", "tflite", "Scoring LiteRT models")
        from ai_edge_litert.interpreter import Interpreter

        # One thread: the numbers the gate records must be the same every run (reproducible manifests).
        with _tflite_file(model_dir) as path:
            self.it = Interpreter(model_path=str(path), num_threads=1)
        sigs = self.it.get_signature_list()
        self.decode = self.it.get_signature_runner("decode")
        d = self.decode.get_input_details()
        self.kv_names = [k for k in d if k.startswith("kv_cache_")]
        self.kv_shapes = {k: tuple(int(s) for s in d[k]["shape"]) for k in self.kv_names}
        self.kv_len = int(d["mask"]["shape"][-1])
        self.prefill: tuple[int, Any] | None = None
        for name in sigs:
            if name.startswith("prefill_"):
                r = self.it.get_signature_runner(name)
                if "logits" in r.get_output_details():
                    self.prefill = (int(r.get_input_details()["tokens"]["shape"][1]), r)
        from tokenizers import Tokenizer

        tok_json = model_dir / "tokenizer.json"
        if tok_json.is_file():
            self.tokenizer = Tokenizer.from_file(str(tok_json))
        else:
            self.tokenizer = Tokenizer.from_str(litertlm_tokenizer(model_dir / "model.litertlm"))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _mask(self, start: int, n: int) -> Any:
        import numpy as np

        m = np.full((1, 1, n, self.kv_len), -np.inf, np.float32)
        for r in range(n):
            m[0, 0, r, : start + r + 1] = 0.0
        return m

    def _fresh(self) -> dict[str, Any]:
        import numpy as np

        return {k: np.zeros(s, np.float32) for k, s in self.kv_shapes.items()}

    def _run(self, ids: list[int], pos: int, cache: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Feed ids at positions pos.. (prefill chunks with logits where they fit, else decode steps)."""
        import numpy as np

        if pos + len(ids) > self.kv_len:
            raise ModelError(f"LiteRT scoring needs {pos + len(ids)} positions; the KV cache holds {self.kv_len}.")
        out, i = [], 0
        while i < len(ids):
            if self.prefill and len(ids) - i >= self.prefill[0]:
                n, runner = self.prefill
            else:
                n, runner = 1, self.decode
            p = pos + i
            res = runner(tokens=np.array([ids[i:i + n]], np.int32), input_pos=np.arange(p, p + n, dtype=np.int32),
                         mask=self._mask(p, n), **cache)
            out.append(res["logits"][0])
            cache = {k: res[k] for k in self.kv_names}
            i += n
        return np.concatenate(out, 0), cache

    def logits(self, ids: list[int]) -> Any:
        return self._run(ids, 0, self._fresh())[0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        import numpy as np

        logits, cache = self._run(ids, 0, self._fresh())
        out = [int(np.argmax(logits[-1]))]
        while len(out) < n:
            logits, cache = self._run(out[-1:], len(ids) + len(out) - 1, cache)
            out.append(int(np.argmax(logits[-1])))
        return out


def litertlm_tokenizer(litertlm: Path) -> str:
    """The HF tokenizer.json stored in a .litertlm (8-byte little-endian size, then zlib)."""
    import io
    import zlib

    from litert_lm_builder import litertlm_peek

    with tempfile.TemporaryDirectory() as tmp:
        litertlm_peek.peek_litertlm_file(str(litertlm), tmp, io.StringIO())
        found = sorted(Path(tmp).glob("*HF_Tokenizer*"))
        if not found:
            raise ModelError(f"{litertlm} holds no HF tokenizer section.")
        data = found[0].read_bytes()
        return (zlib.decompress(data[8:]) if found[0].suffix == ".zlib" else data).decode("utf-8")
