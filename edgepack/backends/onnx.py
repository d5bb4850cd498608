"""ONNX export through the onnxruntime-genai model builder (fused decoder, KV cache, MatMulNBits)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from edgepack.backends import exporters, kv_cache, streaming
from edgepack.backends.base import ExportedModel, GraphStats, NativeLibrary
from edgepack.build_memory import out_of_memory, run_converter
from edgepack.errors import BuilderCrashError, ModelError, TargetError, UserError, require
from edgepack.families import ConfigShape, Family, shape_of
from edgepack.families import check as check_family
from edgepack.fsutil import dir_bytes
from edgepack.models import ModelSource
from edgepack.progress import ProgressEvent, ProgressFn
from edgepack.targets import MIN_CONTEXT, QuantizeSpec, TargetProfile
from edgepack.versions import installed_versions

# Architectures whose sliding window the 0.18 builder exports as full attention (local_window_size -1): the same
# model up to the window, a different one past it (measured on tiny Mistral and Phi-3 checkpoints). Their
# bundles' context is capped at the window (Phi-3-mini-4k: 2047 of 4096).
WINDOW_AS_FULL = ("MistralForCausalLM", "Phi3ForCausalLM")


def window_cap(shape: ConfigShape) -> int:
    """The context a bundle of this model may have on ONNX because of WINDOW_AS_FULL; 0 = no cap."""
    return shape.sliding_window if shape.windowed and shape.architecture in WINDOW_AS_FULL else 0


LAYER_MATMULS = ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def layer_indices(q: QuantizeSpec, num_layers: int) -> list[int]:
    out = []
    for i in q.int8_layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise UserError(f"quantize.int8_layers has {i}, but the model has {num_layers} layers.",
                            hint=f"Use indices 0..{num_layers - 1} (or -1..-{num_layers} from the end).",
                            field="quantize.int8_layers")
        out.append(j)
    return sorted(set(out))


def builder_options(q: QuantizeSpec, *, tied: bool, num_layers: int = 0, windowed: bool = False,
                    kv_cache: str = "auto", execution_provider: str = "cpu",
                    source: str = "") -> tuple[str, dict[str, str]]:
    """Profile quantization knobs → (builder precision, builder extra_options).

    `kv_cache` (runtime.kv_cache) is checked here, before the builder runs: a value this exporter cannot make is a
    TargetError naming the allowed ones. The builder itself is always asked for its float KV cache: its quantized
    cache needs scales calibrated on that graph, which kv_cache.apply computes and writes in afterwards."""
    from edgepack.backends import kv_cache as kv_rule

    kv_rule.resolve(kv_cache, execution_provider=execution_provider, scheme=q.scheme, source=source)
    opts: dict[str, str] = {}
    if windowed:
        # The builder's window-sized KV cache for sliding layers (its default) fails in onnxruntime-genai 0.18
        # whenever the KV capacity is below the window ("KV cache capacity (39) must be at least
        # local_window_size (4096)") and when an all-sliding model prefills past the window; full-length
        # caches on every layer work for every length (docs/models.md: what this costs).
        opts["windowed_kv_cache"] = "false"
    if q.scheme in ("int4", "int8"):
        opts["block_size"] = str(q.block_size)
        opts["is_symmetric"] = "true" if q.symmetric else "false"
        opts["accuracy_level"] = str(q.accuracy_level)
        if q.algorithm not in ("default", "gptq", "imatrix"):  # those rewrite the builder's RTN weights afterwards
            opts["algo_config"] = q.algorithm
        mixed = []
        if q.scheme == "int4" and q.head_precision == "int8":
            mixed.append("last_matmul:int8")
        if q.scheme == "int4" and q.sensitive_layers_int8:
            mixed.append("mixed_layers:int8")
        if mixed:
            opts["matmul_mixed_precision"] = ",".join(mixed)
        exclude = ["/lm_head/MatMul"] if q.head_precision == "fp32" else []
        if q.scheme == "int4":  # left float by the builder, then quantized to int8 by _int8_overrides
            exclude += [f"/model/layers.{i}/{m}/MatMul" for i in layer_indices(q, num_layers) for m in LAYER_MATMULS]
        if exclude:
            opts["nodes_to_exclude"] = ",".join(exclude)
    table = embedding_table(tied=tied, scheme=q.scheme, symmetric=q.symmetric, precision=q.embedding_precision)
    if tied:
        # The builder is asked to share whenever the table is quantized and not int4 of its own (at int8 it then
        # writes a float table anyway); else the embedding Gather has a table of its own.
        opts["shared_embeddings"] = "true" if q.embedding_precision == "quantized" and table != "int4" else "false"
    if table == "int4":
        opts["op_types_to_quantize"] = "MatMul/Gather"
    return q.scheme, opts


def embedding_table(*, tied: bool, scheme: str, symmetric: bool, precision: str) -> str:
    """What the exported graph's embedding reads: "shared" (the head's quantized tensor, or its float one at
    fp16/fp32), "int4" (a GatherBlockQuantized table of its own: round-to-nearest, the body's block and symmetry,
    1/6.4 of fp32; untied, or asymmetric int4, whose shared table the builder writes as an invalid graph) or
    "float" (a table of its own; at int8 the builder writes one even when asked to share, measured on SmolLM2)."""
    quantized = precision == "quantized"
    if tied and quantized and (scheme != "int4" or symmetric):
        return "float" if scheme == "int8" else "shared"
    return "int4" if quantized and scheme == "int4" else "float"


def _graph_stats(model_path: Path) -> GraphStats:
    onnx = require("onnx", "onnx", "Inspecting ONNX models")
    model = onnx.load(str(model_path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    bits = sorted({a.i for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
                   for a in n.attribute if a.name == "bits"})
    return GraphStats(nodes=len(model.graph.node), quantized_matmuls=ops.get("MatMulNBits", 0),
                      float_matmuls=ops.get("MatMul", 0), bits=tuple(bits), op_types=dict(sorted(ops.items())))


def _int8_overrides(model_path: Path, q: QuantizeSpec, layers: list[int]) -> None:
    """Quantize the matmuls the builder left float (the per-layer overrides) to int8, blockwise, in place."""
    import logging

    onnx = require("onnx", "onnx", "Per-layer int8 overrides")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    model = onnx.load(str(model_path))
    prefixes = tuple(f"/model/layers.{i}/" for i in layers)
    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith(prefixes)]
    if not names:
        raise UserError("quantize.int8_layers matched no float MatMul in the exported graph.",
                        hint="This architecture's layer names differ; remove int8_layers for it.")
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=q.block_size, is_symmetric=True,
                                     accuracy_level=q.accuracy_level, nodes_to_include=names)
    quantizer.process()
    data = model_path.with_name(model_path.name + ".data")
    data.unlink()
    quantizer.model.save_model_to_file(str(model_path), use_external_data_format=True)
    if not data.is_file():
        raise UserError("int8 overrides wrote the weights under an unexpected name.", path=str(model_path))


def _make_reproducible(model_path: Path) -> None:
    """The builder stamps a per-run suffix into producer_version ('0.18.0+473b322'); drop it so the same
    inputs give the same bytes (reproducible bundles). The weights file is untouched."""
    onnx = require("onnx", "onnx", "Inspecting ONNX models")
    model = onnx.load(str(model_path), load_external_data=False)
    base = model.producer_version.split("+", 1)[0]
    if base != model.producer_version:
        model.producer_version = base
        tmp = model_path.with_name(model_path.name + ".tmp")
        tmp.write_bytes(model.SerializeToString(deterministic=True))
        tmp.replace(model_path)


def set_context_length(genai_config: Path, wanted: int) -> int:
    """Bound the bundle's context: genai_config's context_length and default max_length (the model's own
    max_position_embeddings unless the target asks for less)."""
    import json

    cfg = json.loads(genai_config.read_text())
    own = int(cfg["model"]["context_length"])
    if wanted > own:
        # api.build chooses the context first (context.choose_context): this is reached only by other callers.
        raise UserError(f"runtime.context_length = {wanted} is longer than the model's own context ({own} tokens).",
                        hint=f"Pass --context {own} or less, or set runtime.context_length to at most {own} in the "
                             "target (0 = the model's own).", field="runtime.context_length", model_context=own)
    context = wanted or own
    cfg["model"]["context_length"] = context
    cfg["search"]["max_length"] = context
    genai_config.write_text(json.dumps(cfg, indent=4) + "\n")
    return context


def runtime_versions() -> dict[str, str]:
    return installed_versions("onnxruntime-genai", "onnxruntime", "numpy")


@exporters.register("onnx")
class OnnxExporter:
    format = "onnx"
    runtime = "onnxruntime-genai"
    template = "onnxruntime-genai"
    packages: tuple[str, ...] = ("onnxruntime-genai", "onnxruntime")
    # native/ (stages/native.py): the C API library and the onnxruntime it loads, out of their wheels, by soname
    native_libraries: tuple[NativeLibrary, ...] = (
        NativeLibrary("onnxruntime-genai", r"onnxruntime_genai/libonnxruntime-genai\.so", "libonnxruntime-genai.so"),
        NativeLibrary("onnxruntime", r"onnxruntime/capi/libonnxruntime\.so\.1\.[0-9.]+", "libonnxruntime.so.1"),
    )
    native_default = True  # in every bundle built with runtime binaries

    @staticmethod
    def check_profile(p: TargetProfile) -> None:
        """This format's rules for a target profile (targets.py checks the rest when it loads one)."""
        from edgepack.backends.litert_recipe import check_litert_fields

        if p.quantize.scheme == "fp16" and p.export.execution_provider == "cpu":
            raise TargetError(
                f"{p.source}: quantize.scheme = \"fp16\" needs export.execution_provider = \"cuda\": the builder's "
                "fp16 CPU graph fails to decode in onnxruntime-genai 0.18 (\"Shape mismatch attempting to re-use "
                "buffer\").",
                hint="On the CPU use int4, int8 or fp32.", path=p.source, field="quantize.scheme",
                allowed=["int4", "int8", "fp32"])
        check_litert_fields(p)

    @staticmethod
    def check_supported(source: ModelSource, target: TargetProfile) -> Family:
        import json

        config = json.loads((source.hf_dir / "config.json").read_text())
        shape = shape_of(source.hf_dir / "config.json")
        original = config.get("original_max_position_embeddings")
        if (shape.architecture == "Phi3ForCausalLM" and shape.rope_type == "default"
                and original not in (None, config.get("max_position_embeddings"))):
            raise ModelError(
                f"{source.name}'s config.json has max_position_embeddings {config.get('max_position_embeddings')} "
                f"but original_max_position_embeddings {original}, and no "
                "LongRoPE rope_scaling: the builder takes its LongRoPE path for that and needs the long/short "
                "factors.",
                hint="For a 4k model set original_max_position_embeddings equal to max_position_embeddings in "
                     "config.json; for a LongRoPE model (Phi-3.5, Phi-4-mini) restore rope_scaling (type longrope, "
                     "long_factor, short_factor) from the original config.", path=source.hf_dir / "config.json",
                field="original_max_position_embeddings")
        cap = window_cap(shape)
        if cap and cap < MIN_CONTEXT:
            raise ModelError(f"{source.name}'s sliding window is {cap} tokens: the onnxruntime-genai 0.18 builder "
                             f"exports {shape.architecture}'s window as full attention, so the bundle's context "
                             f"would be capped at {cap}, below the {MIN_CONTEXT} the quality gate needs.",
                             hint="Use --format tflite where the family table lists it.", window=cap)
        if cap and target.runtime.context_length > cap:
            raise ModelError(
                f"runtime.context_length = {target.runtime.context_length} is past {source.name}'s sliding window "
                f"({cap}): the onnxruntime-genai 0.18 builder exports {shape.architecture}'s window as full "
                "attention, which is the same model only up to the window.",
                hint=f"Set runtime.context_length to at most {cap} (0 caps it there by itself), or use --format "
                     "tflite where the family table lists it.", field="runtime.context_length", window=cap)
        return check_family(shape, "onnx", "ONNX")

    @staticmethod
    def export(source: ModelSource, target: TargetProfile, out_dir: Path, work_dir: Path,
               progress: ProgressFn) -> ExportedModel:
        require("onnxruntime_genai", "onnx", "ONNX export")
        require("onnx_ir", "onnx", "ONNX export")
        require("torch", "onnx", "ONNX export")
        import json

        config = json.loads((source.hf_dir / "config.json").read_text())
        tied = bool(config.get("tie_word_embeddings", False))
        precision, opts = builder_options(target.quantize, tied=tied,
                                          num_layers=int(config.get("num_hidden_layers", 0)),
                                          windowed=shape_of(source.hf_dir / "config.json").windowed,
                                          kv_cache=target.runtime.kv_cache,
                                          execution_provider=target.export.execution_provider, source=target.source)
        # The builder, with the fixes its 0.18 release needs for current checkpoints (genai_builder.py), reading
        # and quantizing layer by layer where edgepack can (streaming.py: the same bytes, a layer's memory).
        cmd = [sys.executable, "-m", "edgepack.backends.genai_builder", *streaming.flag(target.quantize),
               "-i", str(source.hf_dir),
               "-o", str(out_dir), "-p", precision, "-e", target.export.execution_provider,
               "-c", str(work_dir / "builder-cache")]
        if opts:
            cmd += ["--extra_options", *[f"{k}={v}" for k, v in opts.items()]]
        progress(ProgressEvent("export", f"onnxruntime-genai builder: {precision} on "
                                         f"{target.export.execution_provider}, {opts}"))
        run = run_converter(cmd, work_dir / "builder.log")
        code, tail = run.code, run.tail
        if code != 0 or not (out_dir / "genai_config.json").is_file():
            # Killed for memory (the OOM killer's SIGKILL, a MemoryError) is the machine's size, not a bug.
            oom = out_of_memory(run, tool="onnxruntime-genai model builder", model=source.name,
                                config=config, target=target)
            if oom is not None:
                raise oom
            # The profile and the family were checked before: a crash here is the builder's (or ours).
            raise BuilderCrashError(
                f"the onnxruntime-genai model builder crashed (exit {code}) exporting {source.name} "
                f"({source.architecture}).", tool="onnxruntime-genai builder", command=" ".join(cmd),
                log_tail=tail)
        progress(ProgressEvent("export", f"builder done in {run.seconds:.0f} s, its peak RSS "
                                         f"{run.peak_rss / 2**20:,.0f} MiB"))
        # The builder writes the tokenizer too; keep only what the runtime reads.
        for junk in ("builder-cache",):
            p = out_dir / junk
            if p.exists():
                import shutil

                shutil.rmtree(p)
        if target.quantize.scheme == "int4" and target.quantize.int8_layers:
            _int8_overrides(out_dir / "model.onnx", target.quantize,
                            layer_indices(target.quantize, int(config.get("num_hidden_layers", 0))))
        if target.quantize.algorithm in ("gptq", "imatrix"):
            from edgepack.backends import calibration, gptq

            cal = calibration.Calibration(text=calibration.calibration_path(target))
            # GPTQ leaves the tied head RTN: it is also the embedding table, and GPTQ on it measured worse.
            gptq.apply(out_dir / "model.onnx", source, target.quantize.block_size, cal,
                       head=target.quantize.algorithm == "imatrix", progress=progress,
                       method=target.quantize.algorithm, symmetric=target.quantize.symmetric)
        if target.runtime.kv_cache in kv_cache.QUANTIZED:
            # Calibrated on this graph, final weights included (after GPTQ/imatrix), then written into it.
            kv = kv_cache.apply(out_dir, source.hf_dir, target.runtime.kv_cache, work_dir / "kv-cache",
                                context=target.runtime.context_length or kv_cache.CALIBRATION_TOKENS,
                                execution_provider=target.export.execution_provider)
            progress(ProgressEvent("export", f"KV cache {kv.dtype} ({kv.scheme}): scales calibrated on "
                                             f"{kv.layers} layers in {kv.seconds:.0f} s"))
        _make_reproducible(out_dir / "model.onnx")
        cap = window_cap(shape_of(source.hf_dir / "config.json"))
        context = set_context_length(out_dir / "genai_config.json", target.runtime.context_length or cap)
        if cap and not target.runtime.context_length:
            progress(ProgressEvent("export", f"context capped at the sliding window ({cap} tokens): the builder "
                                             "exports this architecture's window as full attention"))
        stats = _graph_stats(out_dir / "model.onnx")
        if precision in ("int4", "int8") and stats.quantized_matmuls == 0:
            raise UserError(f"scheme {precision} produced no quantized MatMul: the weights stayed float.",
                            hint="This is a builder problem; try another quantize.algorithm.")
        return ExportedModel(dir=out_dir, format="onnx", scheme=precision, options=opts,
                             bytes=dir_bytes(out_dir), stats=stats, runtime_versions=runtime_versions(),
                             context_length=context)

    @staticmethod
    def scorer(model_dir: Path, adapter: Path | None = None) -> GenaiScorer:
        return GenaiScorer(model_dir, adapter)


def _provider(model_dir: Path) -> str:
    import json

    cfg = json.loads((model_dir / "genai_config.json").read_text())
    opts = cfg["model"]["decoder"]["session_options"].get("provider_options", [])
    return next(iter(opts[0]), "cpu") if opts else "cpu"


class GenaiScorer:
    """Drives onnxruntime-genai exactly as the bundle's runner does, but returns full logits; with `adapter` (an
    .onnx_adapter file for this graph's LoRA slots), every generator runs with it active, as the runner does."""

    def __init__(self, model_dir: Path, adapter: Path | None = None) -> None:
        import json

        og = require("onnxruntime_genai", "onnx", "Scoring ONNX models")
        self._og = og
        config = og.Config(str(model_dir))
        # One thread: multi-threaded reductions can change the last digits between runs, and the numbers
        # the gate records must be the same every time (reproducible manifests).
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": 1, "inter_op_num_threads": 1}}}}))
        provider = _provider(model_dir)
        self.scored_on = provider
        if provider == "cuda" and not og.is_cuda_available():
            # A CUDA bundle built on a machine without CUDA: score the same graph on the CPU, and say so.
            config.clear_providers()
            self.scored_on = "cpu (the target's cuda provider is not available on the build machine)"
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = None
        if adapter is not None:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), "scored")

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _generator(self, max_length: int) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        gen = self._og.Generator(self.model, params)
        if self.adapters is not None:
            gen.set_active_adapter(self.adapters, "scored")
        return gen

    def logits(self, ids: list[int]) -> Any:
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(ids)
        return gen.get_output("logits")[0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        gen = self._generator(len(ids) + n)
        gen.append_tokens(ids)
        out: list[int] = []
        while len(out) < n and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out
