"""runtime.kv_cache: the schema field, the ONNX exporter's rule, and the planner's KV sizes and suggestions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgepack.backends.onnx import builder_options
from edgepack.errors import TargetError
from edgepack.output import plan_summary
from edgepack.plan import MIB, estimate, plan_for_target
from edgepack.targets import QuantizeSpec, load_target
from edgepack.testing import REAL_SHAPES

from .test_plan import HOST_INT4

PHI35: dict[str, Any] = {**REAL_SHAPES["phi-3.5-mini"][1], "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}


def test_kv_bytes_per_precision_at_2048_tokens() -> None:
    fp32, int8, int4 = (estimate(replace(HOST_INT4, kv_cache=v)).kv for v in ("auto", "int8", "int4"))
    # SmolLM2-135M: 30 layers × K and V × 3 KV heads × 64 channels
    assert (fp32.dtype, fp32.bytes_per_token, fp32.buffers) == ("fp32", 30 * 2 * 3 * 64 * 4, 1)
    assert (int8.dtype, int8.bytes_per_token, int8.buffers) == ("int8", 30 * 2 * 3 * 64, 2)
    assert (int4.dtype, int4.bytes_per_token, int4.element_bytes) == ("int4", 30 * 2 * 3 * 32, 0.5)
    assert fp32.allocated == 2048 * 46_080 == 90 * MIB
    # A quantized cache keeps past and present apart on the CPU: int8 is half of fp32, int4 a quarter.
    assert int8.allocated == 2 * 2048 * 11_520 == fp32.allocated // 2
    assert int4.allocated == fp32.allocated // 4
    assert "int8, past and present apart" in plan_summary(estimate(replace(HOST_INT4, kv_cache="int8")))


def test_auto_is_the_graphs_own_precision() -> None:
    assert estimate(HOST_INT4).kv.dtype == "fp32"
    assert estimate(replace(HOST_INT4, execution_provider="cuda")).kv.dtype == "fp16"
    # LiteRT's cache is fp32 whatever the ONNX field says.
    lite = estimate(replace(HOST_INT4, fmt="tflite", kv_cache="int8", context=1024)).kv
    assert lite.dtype == "fp32" and lite.element_bytes == 4


def test_target_field_reaches_the_plan(tmp_path: Path) -> None:
    text = Path(load_target("rpi5-8gb").source).read_text().replace(
        "context_length = 4096\n", "context_length = 4096\nkv_cache = \"int8\"\n")
    board = tmp_path / "pi8.toml"
    board.write_text(text)
    target = load_target(str(board))
    assert target.runtime.kv_cache == "int8" and target.device.ram_mb == 8192
    plan = plan_for_target(PHI35, target, context=4096)
    assert plan.kv.dtype == "int8" and plan.kv.allocated == 2 * 4096 * 32 * 2 * 32 * 96


def test_rpi5_is_the_4gb_board_and_rpi5_8gb_the_8gb_one() -> None:
    four, eight = load_target("rpi5"), load_target("rpi5-8gb")
    assert (four.device.ram_mb, eight.device.ram_mb) == (4096, 8192)
    assert replace(eight, id="rpi5", source=four.source, device=four.device) == four  # nothing else differs


def _heavier(name: str) -> Any:
    """The target with the recipe it shipped before issue 21 (k-quant int4, int8 head and sensitive layers)."""
    t = load_target(name)
    return replace(t, quantize=replace(t.quantize, algorithm="k_quant", symmetric=True, head_precision="int8",
                                       sensitive_layers_int8=True))


def test_phi35_at_4096_on_an_8gb_pi_is_told_to_use_an_int8_kv_cache() -> None:
    heavier = _heavier("rpi5-8gb")
    plan = plan_for_target(PHI35, heavier, context=4096)
    assert not plan.fits and plan.kv.allocated == 3072 * MIB  # fp32: 4096 × 32 layers × 2 × 32 heads × 96 × 4
    s = plan.suggestion
    assert s is not None and s.kv_cache == "int8"
    assert 'runtime.kv_cache = "int8" in the target fits the full 4096 tokens' in s.message
    # What it suggests is real: the same target with that field fits.
    fixed = replace(heavier, runtime=replace(heavier.runtime, kv_cache="int8"))
    assert plan_for_target(PHI35, fixed, context=4096).fits
    # The shipped recipe (imatrix int4 everywhere, an int4 embedding table) leaves room for the fp32 cache.
    assert plan_for_target(PHI35, load_target("rpi5-8gb"), context=4096).fits


def test_phi35_at_4096_on_a_4gb_pi_gets_a_longer_context_from_a_smaller_kv_cache() -> None:
    plan = plan_for_target(PHI35, load_target("rpi5"), context=4096)
    s = plan.suggestion
    assert s is not None and s.kv_cache is None  # no KV precision fits all 4096 tokens in 4 GB
    assert s.kv_max_context > s.max_context > 0
    assert f'with runtime.kv_cache = "int8" in the target, a context of {s.kv_max_context} tokens fits' in s.message
    fixed = load_target("rpi5")
    fixed = replace(fixed, runtime=replace(fixed.runtime, kv_cache="int8"))
    assert plan_for_target(PHI35, fixed, context=s.kv_max_context).fits
    assert not plan_for_target(PHI35, fixed, context=s.kv_max_context + 64).fits


def test_no_kv_suggestion_when_the_weights_are_what_does_not_fit() -> None:
    tiny_ram = replace(HOST_INT4, ram_mb=120)  # SmolLM2's weights and runtime alone are more than 108 MiB
    s = estimate(tiny_ram).suggestion
    assert s is not None and s.kv_cache is None and "kv_cache" not in s.message


def test_schema_rejects_an_unknown_precision_naming_the_allowed_ones(tmp_path: Path) -> None:
    board = tmp_path / "board.toml"
    for value in ("int2", "int4"):  # int4 runs, but is not offered (backends/kv_cache.py OFFERED)
        board.write_text(f'[device]\narch = "native"\n[runtime]\nkv_cache = "{value}"\n')
        with pytest.raises(TargetError) as err:
            load_target(str(board))
        assert err.value.fields["field"] == "runtime.kv_cache"
        assert "'auto', 'fp32', 'fp16', 'int8'" in err.value.message


@pytest.mark.parametrize(("kv", "ep", "scheme"), [("fp16", "cpu", "int4"), ("int8", "cuda", "int4"),
                                                  ("fp32", "cuda", "int4"), ("fp16", "cuda", "fp32")])
def test_the_onnx_exporter_refuses_what_it_cannot_make(kv: str, ep: str, scheme: str) -> None:
    with pytest.raises(TargetError) as err:
        builder_options(QuantizeSpec(scheme=scheme), tied=True, kv_cache=kv,  # type: ignore[arg-type]
                        execution_provider=ep, source="board.toml")
    assert err.value.fields["field"] == "runtime.kv_cache" and err.value.fields["path"] == "board.toml"
    allowed = err.value.fields["allowed"]
    assert allowed == (["auto", "fp32", "int8"] if ep == "cpu" else
                       ["auto", "fp16"] if scheme == "int4" else ["auto", "fp32"])
    assert all(repr(v) in err.value.hint for v in allowed)
    if kv == "fp16" and ep == "cpu":
        assert "Shape mismatch attempting to re-use buffer" in err.value.message


@pytest.mark.parametrize("kv", ["auto", "fp32", "int8"])
def test_the_onnx_exporter_asks_the_builder_for_its_float_cache(kv: str) -> None:
    plain = builder_options(QuantizeSpec(), tied=True)
    assert builder_options(QuantizeSpec(), tied=True, kv_cache=kv) == plain
    assert not any(k.startswith("kv_cache") for k in plain[1])
