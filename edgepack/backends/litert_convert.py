"""Convert a Llama-family HF checkpoint to a LiteRT decoder (.tflite) with litert-torch, then package it.

Run as `python -m edgepack.backends.litert_convert SPEC.json` by the tflite exporter: conversion takes ~3.5 GB
for a 135M model and puts a stub `tensorflow` package into sys.modules (below), so it lives in its own process.
Writes RESULT.json (path given in the spec) with what it produced.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

# quantize scheme (+ block) → litert-torch recipe name
RECIPES = {"int8": "dynamic_int8", "fp16": "fp16", "fp32": "none"}


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


def model_config(hf: dict[str, Any], max_seq_len: int) -> Any:
    from litert_torch.generative.layers import model_config as cfg

    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    rope = (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta", 10000.0)
    qwen = hf["architectures"][0] == "Qwen2ForCausalLM"
    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=float(hf.get("rms_norm_eps", 1e-5)))
    block = cfg.TransformerBlockConfig(
        attn_config=cfg.AttentionConfig(
            num_heads=heads, head_dim=head_dim, num_query_groups=int(hf.get("num_key_value_heads", heads)),
            rotary_base=int(rope), rotary_percentage=1.0,
            qkv_use_bias=qwen or bool(hf.get("attention_bias", False)),
            output_proj_use_bias=bool(hf.get("attention_bias", False))),
        ff_config=cfg.FeedForwardConfig(
            type=cfg.FeedForwardType.GATED, activation=cfg.ActivationConfig(cfg.ActivationType.SILU),
            intermediate_size=int(hf["intermediate_size"]), use_bias=bool(hf.get("mlp_bias", False))),
        pre_attention_norm_config=norm, post_attention_norm_config=norm)
    return cfg.ModelConfig(
        vocab_size=int(hf["vocab_size"]), num_layers=int(hf["num_hidden_layers"]), max_seq_len=max_seq_len,
        embedding_dim=int(hf["hidden_size"]), block_configs=block, final_norm_config=norm,
        lm_head_share_weight_with_embedding=bool(hf.get("tie_word_embeddings", True)))


def convert(spec: dict[str, Any]) -> dict[str, Any]:
    _tf_schema_shim()
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import converter, model_builder
    from litert_torch.generative.utilities import export_config as export_config_lib

    torch.manual_seed(0)
    hf_dir, out_dir = Path(spec["hf_dir"]), Path(spec["out_dir"])
    hf = json.loads((hf_dir / "config.json").read_text())
    kv_len, prefill = int(spec["kv_cache_len"]), int(spec["prefill_len"])
    config = model_config(hf, max_seq_len=max(kv_len, int(hf.get("max_position_embeddings", kv_len))))
    names = (model_builder.TENSOR_NAMES if config.lm_head_share_weight_with_embedding
             else model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD)
    t0 = time.perf_counter()
    model = model_builder.build_decoder_only_model(str(hf_dir), config, names, mask_cache_size=0)
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
    elif scheme == "int8" and spec.get("weight_only"):
        quantize = "weight_only_int8"  # int8 weights, float activations
    else:
        quantize = RECIPES[scheme]
    work = out_dir / "convert"
    work.mkdir(parents=True, exist_ok=True)
    path = converter.convert_to_tflite(model, output_path=str(work), output_name_prefix="model",
                                       prefill_seq_len=[prefill], kv_cache_max_len=kv_len, quantize=quantize,
                                       export_config=ec)
    convert_s = time.perf_counter() - t0
    tflite = out_dir / "model.tflite"
    Path(path).replace(tflite)
    work.rmdir()
    result: dict[str, Any] = {"tflite": tflite.name, "recipe": quantize, "convert_s": round(convert_s, 1),
                              "kv_cache_len": kv_len, "prefill_len": prefill}
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
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = convert(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
