"""The streamed export (backends/streaming.py) writes the very bytes the builder's whole-graph pass writes, for
each of its algorithms (default, rtn, k_quant).

Each case runs the real builder twice on a tiny random model of a family, without and with streaming, and
compares model.onnx and model.onnx.data byte for byte: the streamed path is a memory change, never a model change.
The 1.1B and 3.8B shapes are measured in tests/scale and docs/performance.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.backends.streaming import STREAMING_FLAG

from ..conftest import needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]

RTN = ["block_size=32", "is_symmetric=true", "accuracy_level=4"]


def build(model: Path, out: Path, extra: list[str], *, stream: bool, precision: str = "int4") -> str:
    cmd = [sys.executable, "-m", "edgepack.backends.genai_builder", *([STREAMING_FLAG] if stream else []),
           "-i", str(model), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache"),
           "--extra_options", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize(("family", "extra", "precision"), [
    # tied embeddings kept as an fp32 table, int4 everywhere (the tiny test target's scheme)
    ("llama", [*RTN, "shared_embeddings=false"], "int4"),
    # fused qkv/gate_up split by the builder, LongRoPE's rope-cache If node, untied head
    ("phi3-longrope", RTN, "int4"),
    # int8 head and sensitive layers, a float (excluded) MatMul, the embedding reading the quantized head
    ("llama", [*RTN, "shared_embeddings=true", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",
               "nodes_to_exclude=/model/layers.1/mlp/down_proj/MatMul"], "int4"),
    ("qwen2", RTN, "int8"),
    # the rpi5/host recipe: k_quant body, int8 head and sensitive layers, the embedding reading the int8 head
    ("llama", [*RTN, "shared_embeddings=true", "algo_config=k_quant",
               "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"], "int4"),
    # k_quant through the fused-weight split and LongRoPE; asymmetric RTN with its zero points
    ("phi3-longrope", [*RTN, "algo_config=k_quant"], "int4"),
    ("qwen2", ["block_size=32", "is_symmetric=false", "accuracy_level=4", "algo_config=rtn"], "int4"),
    # an untied embedding table quantized to int4 GatherBlockQuantized (embedding_precision = "quantized")
    ("phi3-longrope", [*RTN, "op_types_to_quantize=MatMul/Gather"], "int4"),
])
def test_streamed_export_is_byte_identical(family: str, extra: list[str], precision: str, tmp_path: Path) -> None:
    from edgepack.testing import make_tiny

    model = make_tiny(family, tmp_path / family)
    build(model, tmp_path / "whole", extra, stream=False, precision=precision)
    log = build(model, tmp_path / "streamed", extra, stream=True, precision=precision)
    assert "streaming: reading" in log  # the lazy loader took the model, not the builder's fallback
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_k_quant_quantizes_an_untied_embedding_table_as_the_default_pass_does(tmp_path: Path) -> None:
    """The builder's rtn/k_quant passes leave an untied table float (4 bytes a weight); streamed, it is the int4
    table the builder's default pass makes, and the runtime reads it."""
    import onnx
    from onnx import numpy_helper

    from edgepack.testing import make_tiny

    model = make_tiny("phi3-longrope", tmp_path / "phi3")
    gather = [*RTN, "op_types_to_quantize=MatMul/Gather"]
    build(model, tmp_path / "default", gather, stream=False)
    build(model, tmp_path / "k_quant", [*gather, "algo_config=k_quant"], stream=True)
    build(model, tmp_path / "whole", [*gather, "algo_config=k_quant"], stream=False)

    def tables(out: Path) -> dict[str, object]:
        m = onnx.load(str(out / "model.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.startswith("model.embed_")}

    default, streamed = tables(tmp_path / "default"), tables(tmp_path / "k_quant")
    assert set(streamed) == {"model.embed_tokens.weight_Q4", "model.embed_tokens.weight_scales"}
    assert all((default[k] == streamed[k]).all() for k in streamed)  # type: ignore[attr-defined]
    assert set(tables(tmp_path / "whole")) == {"model.embed_tokens.weight"}  # the builder's own pass: fp32
    assert ((tmp_path / "k_quant" / "model.onnx.data").stat().st_size
            < (tmp_path / "whole" / "model.onnx.data").stat().st_size)
    import onnxruntime_genai as og

    gen_model = og.Model(str(tmp_path / "k_quant"))
    params = og.GeneratorParams(gen_model)
    params.set_search_options(max_length=8, do_sample=False)
    generator = og.Generator(gen_model, params)
    generator.append_tokens([[1, 2, 3]])
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 8
