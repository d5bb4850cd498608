"""Convert a HF decoder checkpoint to a LiteRT decoder (.tflite) with litert-torch's layers, then package it.

Run as `python -m edgepack.backends.litert_convert SPEC.json` by the tflite exporter: conversion takes ~3.5 GB
for a 135M model and puts a stub `tensorflow` package into sys.modules (below), so it lives in its own process.
Writes RESULT.json (path given in the spec) with what it produced.

The decoder is read off the checkpoint, not picked from a list of architectures: the tensor names say whether
q/k/v and gate/up are fused (Phi-3), whether there are q/k norms (Qwen3, Gemma 3) and Gemma 2/3's norms around
the MLP; config.json gives widths, softcaps, layer types and the sliding window; transformers' own rope functions
give each layer type's rope table (plain, Llama 3 scaling, LongRoPE), so the tables are HF's to the bit. What
a model_type means beyond that (Gemma's (1 + w) norms and scaled embeddings) is the LAYOUTS registry.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# quantize scheme → litert-torch recipe name (int8 is edgepack's own recipe, int4 litert-torch's blockwise one)
RECIPES = {"fp16": "fp16", "fp32": "none"}


@dataclass(frozen=True)
class Layout:
    """What a HF model_type means for litert-torch's layers beyond config.json and the tensor names."""

    gemma_norms: bool = False  # RMSNorm scales by (1 + weight) and embeddings by sqrt(hidden_size)


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(), "mistral": Layout(), "qwen2": Layout(), "qwen3": Layout(), "phi3": Layout(),
    "gemma": Layout(gemma_norms=True), "gemma2": Layout(gemma_norms=True), "gemma3_text": Layout(gemma_norms=True),
}
# Rope types whose table is fixed for every position the KV cache holds (transformers computes them once).
ROPE_TYPES = ("default", "llama3", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope_params(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rope parameter set of a config.json: one, or one per layer type (Gemma 3)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    legacy = config.get("rope_scaling") or {}  # hub configs written before transformers 5
    return [{**legacy, **(params or {})}]


def problem(config: dict[str, Any], kv_len: int) -> str | None:
    """Why this config.json cannot become an exact LiteRT decoder with a `kv_len` KV cache; None when it can."""
    kind = str(config.get("model_type", "?"))
    if kind not in LAYOUTS:
        return (f"litert-torch's decoder layers have no mapping for model type '{kind}' "
                f"(mapped: {', '.join(sorted(LAYOUTS))})")
    for params in _rope_params(config):
        rope = str(params.get("rope_type") or params.get("type") or "default")
        if rope not in ROPE_TYPES:
            return f"rope type '{rope}' has no LiteRT rope table here (supported: {', '.join(ROPE_TYPES)})"
        original = params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
        if rope == "longrope" and (not original or kv_len > int(original)):
            return (f"LongRoPE switches from its short to its long factors past {original} positions, and a LiteRT "
                    f"decoder holds one rope table: the KV cache ({kv_len}) must not exceed {original}")
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        return f"MLP activation '{act}' is not mapped (mapped: {', '.join(ACTIVATIONS)})"
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != head_dim:
        return (f"attention scales by query_pre_attn_scalar {scalar}^-0.5; litert-torch's attention scales by "
                f"head_dim {head_dim}^-0.5")
    odd = sorted(set(config.get("layer_types") or ()) - set(LAYER_TYPES))
    if odd:
        return f"layer types {odd} are not mapped (mapped: {', '.join(LAYER_TYPES)})"
    if config.get("use_bidirectional_attention"):
        return "bidirectional attention (an encoder, not a decoder)"
    return None


def _tf_schema_shim() -> None:
    """litert-torch imports `tensorflow.lite.python.schema_py_generated` without depending on tensorflow;
    ai-edge-litert ships the same flatbuffer schema module. Alias it unless a real tensorflow is installed."""
    name = "tensorflow.lite.python.schema_py_generated"
    if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        return
    from ai_edge_litert import schema_py_generated

    for pkg in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        mod = types.ModuleType(pkg)
        mod.__path__ = []
        mod.__spec__ = importlib.machinery.ModuleSpec(pkg, None, is_package=True)
        sys.modules[pkg] = mod
    sys.modules[name] = schema_py_generated
    sys.modules["tensorflow"].lite = sys.modules["tensorflow.lite"]  # type: ignore[attr-defined]
    sys.modules["tensorflow.lite"].python = sys.modules["tensorflow.lite.python"]  # type: ignore[attr-defined]
    sys.modules["tensorflow.lite.python"].schema_py_generated = schema_py_generated  # type: ignore[attr-defined]


def _state_dict(hf_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    for f in [] if files else sorted(hf_dir.glob("pytorch_model*.bin")):
        state.update(torch.load(str(f), weights_only=True, map_location="cpu"))
    return state


def _tensor_names(keys: set[str]) -> Any:
    """litert-torch's tensor-name map for this checkpoint, from which of HF's names it holds."""
    from litert_torch.generative.utilities import loader as loading_utils

    layer = "model.layers.{}."

    def name(*options: str) -> str | None:
        return next((layer + o for o in options if f"model.layers.0.{o}.weight" in keys), None)

    fused_mlp = name("mlp.gate_up_proj")
    return loading_utils.ModelLoader.TensorNames(
        attn_fused_qkv_proj=name("self_attn.qkv_proj"), attn_query_proj=name("self_attn.q_proj"),
        attn_key_proj=name("self_attn.k_proj"), attn_value_proj=name("self_attn.v_proj"),
        attn_output_proj=name("self_attn.o_proj"), attn_query_norm=name("self_attn.q_norm"),
        attn_key_norm=name("self_attn.k_norm"),
        ff_up_proj=fused_mlp or name("mlp.up_proj"), ff_gate_proj=None if fused_mlp else name("mlp.gate_proj"),
        ff_down_proj=name("mlp.down_proj"),
        pre_attn_norm=name("input_layernorm"), post_attn_norm=name("post_attention_layernorm"),
        pre_ff_norm=name("pre_feedforward_layernorm"), post_ff_norm=name("post_feedforward_layernorm"),
        embedding="model.embed_tokens", final_norm="model.norm",
        lm_head="lm_head" if "lm_head.weight" in keys else None)


def _rope_tables(hf: Any, head_dim: int) -> dict[str | None, tuple[Any, float]]:
    """Layer type (None: every layer) → (inverse frequencies, cos/sin scale), computed by transformers itself.
    LongRoPE gets its short factors: `problem` keeps the KV cache within the original context."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = hf.rope_parameters
    per_type = all(isinstance(v, dict) for v in params.values())
    tables: dict[str | None, tuple[Any, float]] = {}
    for layer_type in sorted(params) if per_type else [None]:
        p = params[layer_type] if layer_type else params
        kind = p.get("rope_type", "default")
        if kind == "default":
            dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
            inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            tables[layer_type] = (inv, 1.0)
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[kind](hf, None, layer_type=layer_type)
            tables[layer_type] = (inv.float(), float(scale))
    return tables


def build_decoder(hf_dir: Path, kv_len: int) -> Any:
    """The checkpoint as a litert-torch decoder (see the module docstring for how its layout is read)."""
    import transformers
    from litert_torch.generative.layers import model_config as cfg
    from litert_torch.generative.utilities import loader as loading_utils

    raw = json.loads((hf_dir / "config.json").read_text())
    why = problem(raw, kv_len)
    if why:
        raise SystemExit(f"edgepack: cannot convert: {why}")
    hf = transformers.AutoConfig.from_pretrained(str(hf_dir))
    layout = LAYOUTS[hf.model_type]
    state = _state_dict(hf_dir)
    keys = set(state)
    names = _tensor_names(keys)
    heads, layers = int(hf.num_attention_heads), int(hf.num_hidden_layers)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)
    act = getattr(hf, "hidden_activation", None) or hf.hidden_act
    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=float(hf.rms_norm_eps),
                                   zero_centered=layout.gemma_norms)
    none = cfg.NormalizationConfig()
    sandwich = names.pre_ff_norm is not None  # Gemma 2/3: norms on the attention output and around the MLP
    qkv = names.attn_fused_qkv_proj or names.attn_query_proj
    ff = cfg.FeedForwardConfig(
        # Phi-3's fused gate_up: one matmul, then silu(gate) * up on its two halves (gate first, as HF splits it)
        type=cfg.FeedForwardType.SEQUENTIAL if names.ff_gate_proj is None else cfg.FeedForwardType.GATED,
        activation=cfg.ActivationConfig(cfg.ActivationType.SILU_GLU if names.ff_gate_proj is None
                                        else {"silu": cfg.ActivationType.SILU,
                                              "gelu_pytorch_tanh": cfg.ActivationType.GELU_TANH}[act]),
        intermediate_size=int(hf.intermediate_size), use_bias=f"{names.ff_down_proj.format(0)}.bias" in keys,
        pre_ff_norm_config=norm if sandwich else none, post_ff_norm_config=norm if sandwich else none)
    if names.ff_gate_proj is None and act != "silu":
        raise SystemExit(f"edgepack: cannot convert: a fused gate_up MLP with activation '{act}'")
    layer_types = list(getattr(hf, "layer_types", None) or ["full_attention"] * layers)
    window, typed = int(getattr(hf, "sliding_window", None) or 0), bool(getattr(hf, "layer_types", None))
    # Mistral-style configs window every layer; typed ones (Gemma 2/3, Qwen2) only their sliding layers
    windows = [window if t == "sliding_attention" or not typed else 0 for t in layer_types]
    windows = [w if w < kv_len else 0 for w in windows]  # a window the cache never outgrows is plain attention

    def block(i: int) -> Any:
        attn = cfg.AttentionConfig(
            num_heads=heads, head_dim=head_dim, num_query_groups=int(getattr(hf, "num_key_value_heads", heads)),
            rotary_percentage=1.0,
            # q, k, v as HF stacks them ([all q; all k; all v]), split per head: what per-head q/k norms need
            qkv_transpose_before_split=True, qkv_fused_interleaved=False,
            qkv_use_bias=f"{qkv.format(0)}.bias" in keys,
            output_proj_use_bias=f"{names.attn_output_proj.format(0)}.bias" in keys,
            query_norm_config=norm if names.attn_query_norm else none,
            key_norm_config=norm if names.attn_key_norm else none,
            logit_softcap=getattr(hf, "attn_logit_softcapping", None),
            attn_type=cfg.AttentionType.LOCAL_SLIDING if windows[i] else cfg.AttentionType.GLOBAL,
            sliding_window_size=windows[i] or None)
        return cfg.TransformerBlockConfig(attn_config=attn, ff_config=ff, pre_attention_norm_config=norm,
                                          post_attention_norm_config=norm)

    tied = names.lm_head is None
    config = cfg.ModelConfig(
        vocab_size=int(hf.vocab_size), num_layers=layers, max_seq_len=kv_len, embedding_dim=int(hf.hidden_size),
        block_configs=[block(i) for i in range(layers)], final_norm_config=norm,
        embedding_scale=float(hf.hidden_size) ** 0.5 if layout.gemma_norms else None,
        lm_head_share_weight_with_embedding=tied,
        final_logit_softcap=getattr(hf, "final_logit_softcapping", None))
    tables = _rope_tables(hf, head_dim)
    rope_of = [t if t in tables else None for t in layer_types]
    model = _decoder_class()(config, tables, rope_of, windows, sandwich)
    loader = loading_utils.ModelLoader(str(hf_dir), names, custom_loader=lambda _path: state)
    missing, unexpected = loader.load(model, strict=False)
    # strict=False only for a tied head; anything else left over or missing is a mapping bug, not a model.
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if state or missing or unexpected:
        raise SystemExit(f"edgepack: checkpoint does not map onto the decoder: unused {sorted(state)[:8]}, "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.eval()
    return model


def _decoder_class() -> Any:
    """litert-torch's DecoderOnlyModel with what the HF families add: one rope table per layer type, in-graph
    sliding-window masks on top of the causal mask the runtime passes, Gemma 2/3 blocks, final logit softcap."""
    import torch
    from litert_torch.generative.examples.gemma3.decoder import DecoderBlock
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import model_builder

    class Decoder(model_builder.DecoderOnlyModel):
        def __init__(self, config: Any, tables: dict[str | None, tuple[Any, float]], rope_of: list[str | None],
                     windows: list[int], sandwich: bool) -> None:
            super().__init__(config)
            if sandwich:
                self.transformer_blocks = torch.nn.ModuleList(
                    DecoderBlock(config.block_config(i), config) for i in range(config.num_layers))
            order = list(tables)
            for k, key in enumerate(order):
                self.register_buffer(f"rope_inv_freq_{k}", tables[key][0], persistent=False)
            self.rope_scales = [tables[key][1] for key in order]
            self.rope_of = [order.index(t) for t in rope_of]
            self.windows = windows

        @torch.inference_mode()
        def forward(self, tokens: Any, input_pos: Any, kv_cache: Any, mask: Any = None, lora: Any = None,
                    export_config: Any = None) -> dict[str, Any]:
            assert mask is not None, "the edgepack decoder takes its causal mask as an input"
            x = self.tok_embedding(tokens)
            if self.config.embedding_scale is not None:
                x = x * self.config.embedding_scale
            ropes = []
            for k, scale in enumerate(self.rope_scales):
                angles = input_pos.float()[:, None] * getattr(self, f"rope_inv_freq_{k}")[None, :]
                cos, sin = torch.cos(angles), torch.sin(angles)
                ropes.append((cos, sin) if scale == 1.0 else (cos * scale, sin * scale))
            masks = {0: mask}
            cache_pos = torch.arange(mask.shape[-1], dtype=torch.int32)[None, :]
            for w in set(self.windows) - {0}:  # HF's sliding window: keys newer than q - w
                masks[w] = torch.where(cache_pos > input_pos[:, None] - w, mask, self.config.causal_mask_value)
            entries = []
            for i, block in enumerate(self.transformer_blocks):
                x, entry = block(x, ropes[self.rope_of[i]], masks[self.windows[i]], input_pos, kv_cache.caches[i])
                entries.append(entry)
            cache = kv_utils.KVCache(tuple(entries))
            if export_config is not None and torch.numel(input_pos) > 1 and not export_config.output_logits_on_prefill:
                return {"kv_cache": cache}
            logits = self.lm_head(self.final_norm(x))
            cap = self.config.final_logit_softcap
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            return {"logits": logits, "kv_cache": cache}

    return Decoder


def convert(spec: dict[str, Any]) -> dict[str, Any]:
    _tf_schema_shim()
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import converter
    from litert_torch.generative.utilities import export_config as export_config_lib

    torch.manual_seed(0)
    hf_dir, out_dir = Path(spec["hf_dir"]), Path(spec["out_dir"])
    kv_len, prefill = int(spec["kv_cache_len"]), int(spec["prefill_len"])
    t0 = time.perf_counter()
    model = build_decoder(hf_dir, kv_len)
    # mask as an input + transposed KV cache: what LiteRT-LM's runtime expects; logits on prefill let the
    # quality gate score 128 tokens per call (LiteRT-LM runs the same file unchanged).
    ec = export_config_lib.ExportConfig(mask_as_input=True, kvcache_layout=kv_utils.KV_LAYOUT_TRANSPOSED,
                                        output_logits_on_prefill=True)
    scheme, block = spec["scheme"], int(spec["block_size"])
    if scheme == "int4":
        from litert_torch.generative.quantize import quant_attrs, quant_recipes

        recipe = quant_recipes.full_dynamic_recipe(
            mcfg=model.config, weight_dtype=quant_attrs.Dtype.INT4,
            granularity=getattr(quant_attrs.Granularity, f"BLOCKWISE_{block}"))
        converter.get_quant_recipe_from_flag = lambda _q, _mcfg: recipe
        quantize = f"dynamic_int4_block{block}"
    elif scheme == "int8":
        # edgepack's recipe (litert_recipe): the same whole-model result as litert-torch's dynamic_int8 and
        # weight_only_int8 (the same ai-edge-quantizer, the same numbers), plus per-layer rules that match.
        quantize = "none"
    else:
        quantize = RECIPES[scheme]
    work = out_dir / "convert"
    work.mkdir(parents=True, exist_ok=True)
    path = converter.convert_to_tflite(model, output_path=str(work), output_name_prefix="model",
                                       prefill_seq_len=[prefill], kv_cache_max_len=kv_len, quantize=quantize,
                                       export_config=ec)
    tflite = out_dir / "model.tflite"
    result: dict[str, Any] = {"tflite": tflite.name, "recipe": quantize, "kv_cache_len": kv_len,
                              "prefill_len": prefill}
    if scheme == "int8":
        from edgepack.backends import litert_recipe
        from edgepack.targets import layer_rules

        mode = "weight_only" if spec.get("weight_only") else "dynamic"
        rules = layer_rules(spec.get("layers", []))
        result["layers"] = litert_recipe.quantize(Path(path), tflite, mode, rules)
        result["recipe"] = f"{mode}_int8" + (f" + {len(rules)} layer rule(s)" if rules else "")
        Path(path).unlink()
    else:
        Path(path).replace(tflite)
    work.rmdir()
    result["convert_s"] = round(time.perf_counter() - t0, 1)
    if spec["package"] == "litertlm":
        result["litertlm"] = _package(spec, tflite, out_dir / "model.litertlm", kv_len).name
        tflite.unlink()
        result.pop("tflite")
    return result


def _package(spec: dict[str, Any], tflite: Path, out: Path, kv_len: int) -> Path:
    from litert_lm_builder import litertlm_builder as lb
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    md = llm_metadata_pb2.LlmMetadata()
    if spec.get("bos_id") is not None:
        md.start_token.token_ids.ids.append(int(spec["bos_id"]))
    for t in spec["stop_ids"]:
        md.stop_tokens.add().token_ids.ids.append(int(t))
    md.max_num_tokens = kv_len
    md.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    if spec.get("chat_template"):
        md.jinja_prompt_template = spec["chat_template"]
    md_path = out.with_name("llm_metadata.pb")
    md_path.write_bytes(md.SerializeToString(deterministic=True))
    # Reproducible bundles: the builder stamps a random uuid and the wall-clock time into every file.
    import datetime
    import hashlib
    import os
    import uuid

    digest = hashlib.sha256(tflite.read_bytes()).hexdigest()
    stamp = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))  # 1980-01-01, as reproducible wheels do
    when = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat()

    def fixed(entries: list[Any]) -> list[Any]:
        kept = [m for m in entries if m.key not in ("uuid", "creation_timestamp")]
        return kept + [lb.Metadata(key="uuid", value=str(uuid.uuid5(uuid.NAMESPACE_OID, digest)),
                                   dtype=lb.DType.STRING),
                       lb.Metadata(key="creation_timestamp", value=when, dtype=lb.DType.STRING)]

    lb.populate_system_metadata = fixed
    builder = lb.LitertLmFileBuilder()
    builder.add_system_metadata(lb.Metadata(key="Authors", value="edgepack", dtype=lb.DType.STRING))
    builder.add_llm_metadata(str(md_path))
    builder.add_hf_tokenizer(spec["tokenizer_json"])
    builder.add_tflite_model(str(tflite), lb.TfLiteModelType.PREFILL_DECODE)
    tmp = out.with_suffix(".partial")
    with tmp.open("wb") as fh:
        builder.build(fh)
    tmp.replace(out)
    md_path.unlink()
    return out


def main() -> int:
    from edgepack.errors import UserError

    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = convert(spec)
    except UserError as exc:  # the parent raises it again as it is (a rule that matches nothing, ...)
        Path(spec["result"]).write_text(json.dumps({"error": {**exc.fields, "message": exc.message,
                                                              "hint": exc.hint, "code": exc.code}}))
        return 3
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
