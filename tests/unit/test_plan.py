"""edgepack.plan: memory estimates from config dicts alone (no model files), checked against measured bundles."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from edgepack.errors import UserError
from edgepack.output import plan_summary
from edgepack.plan import MIB, PlanRequest, estimate, litert_recipe, plan_for_target
from edgepack.shape import ModelShape
from edgepack.targets import load_target

# SmolLM2-135M-Instruct's config.json (the fields a plan reads).
SMOLLM2: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
    "mlp_bias": False, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}

# edgepack.testing.make_tiny("gemma3", ...)'s config: five sliding layers to one full, window 16.
TINY_GEMMA3: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 2048, "tie_word_embeddings": True, "sliding_window": 16,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
}

HOST_INT4 = PlanRequest(config=SMOLLM2, scheme="int4", block_size=32, algorithm="k_quant", head_precision="int8",
                        embedding_precision="quantized", sensitive_layers_int8=True, context=2048, ram_mb=2048)


def test_smollm2_parameter_count_is_134_5_million() -> None:
    p = estimate(HOST_INT4).params
    assert p.total == 134_515_008  # model.num_parameters() of SmolLM2-135M
    assert p.embedding == 49152 * 576 and p.head == 0  # tied


def test_untied_head_and_gqa_dims_are_counted() -> None:
    cfg = {**SMOLLM2, "tie_word_embeddings": False}
    p = estimate(replace(HOST_INT4, config=cfg)).params
    assert p.head == 49152 * 576
    # q/o: 576x576 each; k/v: 576 x (3 kv heads x 64) each
    assert p.attention == 30 * (2 * 576 * 576 + 2 * 576 * 192)
    assert p.mlp == 30 * 3 * 576 * 1536  # gated: gate, up, down


def test_weight_bytes_equal_the_builders_model_onnx_data() -> None:
    # model.onnx.data sizes of the three SmolLM2 bundles built for docs/plan.md (host.toml, scheme int8, fp32)
    assert estimate(HOST_INT4).weights.file == 113_365_376
    assert estimate(replace(HOST_INT4, scheme="int8")).weights.file == 270_976_256
    assert estimate(replace(HOST_INT4, scheme="fp32")).weights.file == 540_157_184


def test_symmetric_rtn_int4_has_no_zero_points_and_k_quant_has() -> None:
    rtn = estimate(replace(HOST_INT4, algorithm="default")).weights
    kq = estimate(HOST_INT4).weights
    assert "zero points" in kq.layout and "zero points" not in rtn.layout
    assert kq.file - rtn.file == 1_973_376 + 884_736  # body + head zero points, as measured


def test_tiny_gemma3_layout_matches_the_built_file() -> None:
    # make_tiny("gemma3") built with tests/fixtures/tiny-target.toml: model.onnx.data is 868,096 bytes
    # (four norms and q/k norms per layer, local and global rotary tables, a separate fp32 embedding).
    assert estimate(PlanRequest(config=TINY_GEMMA3, scheme="int4", context=2048)).weights.file == 868_096


def test_kv_bytes_are_fp32_k_and_v_per_layer_per_token() -> None:
    kv = estimate(HOST_INT4).kv
    assert kv.bytes_per_token == 30 * 2 * 3 * 64 * 4
    assert kv.allocated == 2048 * kv.bytes_per_token
    cuda = estimate(replace(HOST_INT4, execution_provider="cuda")).kv
    assert cuda.element_bytes == 2


def test_window_layers_get_full_caches_and_the_saving_is_reported() -> None:
    plan = estimate(PlanRequest(config=TINY_GEMMA3, scheme="int4", context=1024))
    kv = plan.kv
    per_layer_token = 2 * 2 * 32 * 4
    assert (kv.window, kv.sliding_layers) == (16, 5)
    assert kv.allocated == 6 * 1024 * per_layer_token  # what edgepack allocates (windowed_kv_cache=false)
    assert kv.windowed == (1 * 1024 + 5 * 16) * per_layer_token
    assert any("window" in n and "less" in n for n in plan.notes)


def test_inactive_window_counts_as_full_attention() -> None:
    qwen = {**SMOLLM2, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    kv = estimate(replace(HOST_INT4, config=qwen)).kv
    assert kv.sliding_layers == 0 and kv.windowed == kv.allocated


def test_mistral_style_window_caps_the_onnx_context_and_is_windowed_on_litert() -> None:
    cfg = {**SMOLLM2, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 256}
    assert estimate(replace(HOST_INT4, config=cfg, context=0)).kv.context == 256  # the ONNX bundle stops there
    with pytest.raises(UserError, match="bundles hold \\(256 tokens\\)"):
        estimate(replace(HOST_INT4, config=cfg, context=1024))
    kv = estimate(replace(HOST_INT4, config=cfg, fmt="tflite", scheme="int8", context=1024)).kv
    assert kv.sliding_layers == 30 and kv.windowed == 30 * 256 * 2 * 3 * 64 * 4


def test_the_total_grows_with_the_context_by_kv_and_prefill() -> None:
    short, long = estimate(replace(HOST_INT4, context=1024)), estimate(replace(HOST_INT4, context=2048))
    per_token = long.kv.bytes_per_token + (long.prefill - short.prefill) // 1024
    assert long.total - short.total == pytest.approx(1024 * per_token, rel=1e-3)
    # measured: 0.278 MiB more peak RSS per prompt token on the SmolLM2 host bundle
    assert per_token / MIB == pytest.approx(0.278, rel=0.05)


def test_a_short_prompt_prefills_less_than_a_full_one() -> None:
    full = estimate(HOST_INT4)
    short = estimate(replace(HOST_INT4, prompt_tokens=16))
    assert short.prefill < full.prefill and short.kv == full.kv


def test_model_that_does_not_fit_gets_a_suggestion_that_fits() -> None:
    plan = estimate(replace(HOST_INT4, context=8192, ram_mb=1024))
    assert not plan.fits and plan.suggestion is not None
    s = plan.suggestion
    assert 64 <= s.max_context < 8192 and s.max_context % 64 == 0
    assert estimate(replace(HOST_INT4, context=s.max_context, ram_mb=1024)).fits
    assert not estimate(replace(HOST_INT4, context=s.max_context + 64, ram_mb=1024)).fits
    assert "fits" in s.message and "does NOT fit" in plan_summary(plan)


def test_suggested_scheme_fits_at_the_requested_context() -> None:
    fp32 = replace(HOST_INT4, scheme="fp32", context=512, ram_mb=768)
    plan = estimate(fp32)
    assert not plan.fits and plan.suggestion is not None and plan.suggestion.scheme is not None
    assert plan.suggestion.scheme in ("int8", "int4")
    assert estimate(replace(fp32, scheme=plan.suggestion.scheme)).fits


def test_nothing_fits_says_so() -> None:
    plan = estimate(replace(HOST_INT4, ram_mb=64))
    assert plan.suggestion is not None
    assert (plan.suggestion.max_context, plan.suggestion.scheme) == (0, None)
    assert "smaller model" in plan.suggestion.message


def test_litert_weight_only_int8_peaks_near_its_measured_2943_mib() -> None:
    req = PlanRequest(config=SMOLLM2, fmt="tflite", scheme="int8", recipe="weight_only_int8", context=1024,
                      ram_mb=4096)
    plan = estimate(req)
    assert plan.total / MIB == pytest.approx(2943, rel=0.1)  # docs/performance.md
    dynamic = estimate(replace(req, recipe="dynamic_int8"))
    assert dynamic.total / MIB == pytest.approx(356, rel=0.1)
    assert not estimate(replace(req, ram_mb=2048)).fits
    suggestion = estimate(replace(req, ram_mb=2048)).suggestion
    assert suggestion is not None and suggestion.recipe == "dynamic_int8"


def test_plan_for_a_shipped_target_reads_its_profile() -> None:
    rpi5 = load_target("rpi5")
    plan = plan_for_target(SMOLLM2, rpi5, context=2048)
    assert plan.request.ram_mb == 4096 and plan.request.algorithm == "imatrix" and not plan.request.symmetric
    assert plan.fits and plan.weights.file == 106_525_952  # measured: the host/rpi5 recipe's model.onnx.data
    assert "embedding int4 table" in plan.weights.layout  # its own table: asymmetric int4 cannot share the head's
    android = plan_for_target(SMOLLM2, load_target("android-arm64"))
    assert android.runtime == "litert-lm" and litert_recipe(android.request) == "dynamic_int8"
    assert android.kv.context == 1024


def test_bad_inputs_are_user_errors() -> None:
    with pytest.raises(UserError, match="longer than this model's bundles hold"):
        estimate(replace(HOST_INT4, context=10_000))
    with pytest.raises(UserError, match="hidden_size"):
        estimate(replace(HOST_INT4, config={**SMOLLM2, "hidden_size": None}))
    with pytest.raises(UserError, match="recipe"):
        estimate(replace(HOST_INT4, fmt="tflite", recipe="nope"))


def test_shape_reads_head_dim_and_kv_heads_defaults() -> None:
    cfg = {k: v for k, v in SMOLLM2.items() if k not in ("head_dim", "num_key_value_heads")}
    s = ModelShape.from_config(cfg)
    assert (s.head_dim, s.kv_heads) == (64, 9)


# TinyLlama-1.1B-Chat's config.json (the fields a plan reads): an untied embedding table.
TINYLLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}


def test_an_untied_quantized_embedding_is_an_int4_table_of_its_own() -> None:
    """rpi5's recipe on TinyLlama-1.1B's shape: the file the card's command writes (measured model.onnx.data,
    docs/performance.md), of which the int4 table 41 MB where the fp32 table was 262 MB."""
    rpi5 = replace(HOST_INT4, config=TINYLLAMA)
    w = estimate(rpi5).weights
    assert w.file == 824_827_904
    assert w.embedding == 32000 * 2048 // 2 + 32000 * 64 * 4  # codes + fp32 scales, symmetric: no zero points
    assert estimate(replace(rpi5, embedding_precision="fp32")).weights.embedding == 32000 * 2048 * 4
    assert estimate(replace(rpi5, symmetric=False)).weights.embedding == w.embedding + 32000 * 64 // 2
    assert "embedding int4 table" in w.layout


def test_prompt_cache_slots_are_counted_beyond_the_requests_own_kv() -> None:
    one = estimate(replace(HOST_INT4, prompt_cache_slots=1))
    assert one.total == estimate(HOST_INT4).total  # one slot is the request's own KV cache, already counted
    assert (one.prompt_cache.slots, one.prompt_cache.tokens, one.prompt_cache.kept) == (1, 2048, one.kv.allocated)
    three = estimate(replace(HOST_INT4, prompt_cache_slots=3))
    assert three.total - one.total == 2 * one.kv.allocated
    capped = estimate(replace(HOST_INT4, prompt_cache_slots=3, prompt_cache_mb=90))
    per_token = one.kv.bytes_per_token
    assert capped.prompt_cache.tokens == int(90 * MIB / 3 / per_token) < 2048
    assert capped.total - one.total == 2 * capped.prompt_cache.kept // 3
    assert "prompt cache 3 slots of" in plan_summary(capped)
    with pytest.raises(UserError, match="a slot needs 256 at least") as err:
        estimate(replace(HOST_INT4, prompt_cache_slots=4, prompt_cache_mb=10))
    assert err.value.fields["field"] == "runtime.prompt_cache_mb"
