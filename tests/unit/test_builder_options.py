"""Profile knobs → onnxruntime-genai builder options (no export needed)."""

from __future__ import annotations

import dataclasses

import pytest

from edgepack.backends.onnx import builder_options
from edgepack.errors import UserError
from edgepack.targets import QuantizeSpec


def test_default_profile_maps_to_kquant_with_int8_head_and_sensitive_layers() -> None:
    q = QuantizeSpec(scheme="int4", algorithm="k_quant", head_precision="int8", sensitive_layers_int8=True,
                     embedding_precision="quantized")
    precision, opts = builder_options(q, tied=True, num_layers=30)
    assert precision == "int4"
    assert opts == {"block_size": "32", "is_symmetric": "true", "accuracy_level": "4", "algo_config": "k_quant",
                    "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8", "shared_embeddings": "true"}


def test_head_fp32_and_per_layer_int8_are_excluded_from_int4() -> None:
    q = QuantizeSpec(scheme="int4", head_precision="fp32", int8_layers=(0, -1))
    _, opts = builder_options(q, tied=False, num_layers=30)
    excluded = opts["nodes_to_exclude"].split(",")
    assert excluded[0] == "/lm_head/MatMul"
    assert "/model/layers.0/attn/qkv_proj/MatMul" in excluded and "/model/layers.29/mlp/down_proj/MatMul" in excluded
    assert not any("layers.1/" in e for e in excluded) and "shared_embeddings" not in opts


def test_out_of_range_layer_is_a_user_error() -> None:
    with pytest.raises(UserError, match="has 30, but the model has 30 layers"):
        builder_options(QuantizeSpec(int8_layers=(30,)), tied=True, num_layers=30)


def test_float_schemes_take_no_quant_options() -> None:
    precision, opts = builder_options(dataclasses.replace(QuantizeSpec(), scheme="fp32"), tied=True, num_layers=2)
    assert precision == "fp32" and opts == {"shared_embeddings": "false"}
