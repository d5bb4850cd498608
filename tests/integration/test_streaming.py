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
])
def test_streamed_export_is_byte_identical(family: str, extra: list[str], precision: str, tmp_path: Path) -> None:
    from edgepack.testing import make_tiny

    model = make_tiny(family, tmp_path / family)
    build(model, tmp_path / "whole", extra, stream=False, precision=precision)
    log = build(model, tmp_path / "streamed", extra, stream=True, precision=precision)
    assert "streaming: reading" in log  # the lazy loader took the model, not the builder's fallback
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
