"""runtime.kv_cache on a tiny random Llama: the graph edgepack writes is the builder's own, and bundles built with
each supported value carry it and run; an unsupported value is a target error naming the allowed ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import FIXTURES, cli, envelope, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]


def _builder(hf_dir: Path, out: Path, cache: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "edgepack.backends.genai_builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(cache)]
    if extra:
        cmd += ["--extra_options", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _decode_logits(model_dir: Path) -> list[list[float]]:
    """Logits of a 40-token prefill and 20 greedy steps: every step reads the past back from the cache."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(range(5, 45)))
    rows = [np.array(gen.get_output("logits"))[0, -1]]
    for _ in range(20):
        gen.generate_next_token()
        rows.append(np.array(gen.get_output("logits"))[0, -1])
    return np.stack(rows).tolist()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_the_rewritten_graph_is_the_builders_own(dtype: str, tiny_model: Path, tmp_path: Path) -> None:
    from edgepack.backends import kv_cache

    base = _builder(tiny_model, tmp_path / "base", tmp_path / "cache")
    scales = kv_cache.calibrate(base, tiny_model, tmp_path / "scales.json", dtype)
    scheme = kv_cache.QUANTIZED[dtype][0]
    theirs = _builder(tiny_model, tmp_path / "builder", tmp_path / "cache", f"kv_cache_quant_scheme={scheme}",
                      f"kv_cache_scale_file={scales}")
    ours = tmp_path / "ours"
    shutil.copytree(base, ours)
    assert kv_cache.quantize_graph(ours, dtype, scales) == 2
    assert kv_cache.kv_dtype_of(ours) == kv_cache.kv_dtype_of(theirs) == dtype
    config = "genai_config.json"
    assert json.loads((ours / config).read_text()) == json.loads((theirs / config).read_text())
    assert _decode_logits(ours) == _decode_logits(theirs)  # bit for bit
    assert _decode_logits(ours) != _decode_logits(base)  # and the cache really is quantized


def _target(tmp_path: Path, kv: str) -> Path:
    text = (FIXTURES / "tiny-target.toml").read_text()
    board = tmp_path / f"tiny-kv-{kv}.toml"
    board.write_text(text + f'\n[runtime]\nkv_cache = "{kv}"\n')
    return board


@pytest.mark.parametrize(("kv", "dtype"), [("auto", "fp32"), ("int8", "int8")])
def test_a_bundle_carries_its_kv_cache_and_runs(kv: str, dtype: str, tiny_model: Path, tmp_path: Path) -> None:
    from edgepack.backends.kv_cache import kv_dtype_of

    proc = cli("--json", "build", "--target", str(_target(tmp_path, kv)), str(tiny_model), "--out",
               str(tmp_path / "dist"), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], proc.stderr[-2000:]
    bundle = Path(doc["result"]["bundle"])
    assert kv_dtype_of(bundle / "model") == dtype
    config = json.loads((bundle / "model" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is (dtype == "fp32")
    manifest = json.loads((bundle / "edgepack.json").read_text())
    assert manifest["target"]["profile"]["runtime"]["kv_cache"] == kv
    assert manifest["quality"]["passed"]
    smoke = subprocess.run([sys.executable, str(bundle / "smoke_test.py")], capture_output=True, text=True)
    line = json.loads(smoke.stdout.strip())
    assert smoke.returncode == 0 and line["ok"] is True and line["tokens"] == 8, smoke.stdout + smoke.stderr


def test_fp16_on_the_cpu_is_a_target_error_naming_the_allowed_values(tiny_model: Path, tmp_path: Path) -> None:
    board = _target(tmp_path, "fp16")
    proc = cli("--json", "build", "--target", str(board), str(tiny_model), "--out", str(tmp_path / "dist"),
               "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 1 and not doc["ok"]
    err = doc["error"]
    assert err["kind"] == "target" and err["field"] == "runtime.kv_cache" and err["path"] == str(board)
    assert err["allowed"] == ["auto", "fp32", "int8"]
    assert "Shape mismatch attempting to re-use buffer" in err["message"]
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
