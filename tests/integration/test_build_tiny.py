"""End to end on a tiny random Llama: real builder export, real onnxruntime-genai scoring, real bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import FIXTURES, cli, envelope, needs_onnx, with_smoke

pytestmark = [pytest.mark.integration, needs_onnx]


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model: Path, tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = cli("--json", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(out),
               "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], proc.stderr[-2000:]
    assert Path(doc["result"]["bundle"]) == out / "tiny-llama-tiny-target"
    return out / "tiny-llama-tiny-target"


def test_bundle_layout_and_manifest(tiny_bundle: Path) -> None:
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"edgepack.json", "model", "run.py", "smoke_test.py", "install.sh", "README.md"} <= names
    m = json.loads((tiny_bundle / "edgepack.json").read_text())
    assert m["schema"] == "edgepack.bundle/1" and m["validated"] is True
    assert m["export"]["scheme"] == "int4" and m["export"]["graph"]["quantized_matmuls"] > 0
    assert m["quality"]["passed"] and m["quality"]["tokens_scored"] > 2000
    assert {"model/model.onnx", "model/genai_config.json", "model/tokenizer.json"} <= {f["path"] for f in m["files"]}
    assert m["tools"]["onnxruntime-genai"] and m["model"]["weights_sha256"]
    assert "/" not in m["target"]["profile"]["source"]  # no build-machine paths in the manifest


def test_smoke_test_passes_and_reports_json(tiny_bundle: Path) -> None:
    proc = subprocess.run([sys.executable, str(tiny_bundle / "smoke_test.py")], capture_output=True, text=True)
    line = json.loads(proc.stdout.strip())
    assert proc.returncode == 0 and line["ok"] is True, proc.stdout + proc.stderr
    assert line["tokens"] == 8 and line["tokens_per_s"] > 0 and line["peak_rss_mb"] > 0


def test_runner_generates_tokens(tiny_bundle: Path) -> None:
    proc = cli("--json", "run", str(tiny_bundle), "--prompt", "Licensed under", "--max-tokens", "12")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr
    assert doc["result"]["new_tokens"] == 12 and doc["result"]["prefill_ms"] > 0


def test_inspect_verifies_and_detects_tampering(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = cli("inspect", str(tiny_bundle))
    assert proc.returncode == 0 and "all match their sha256" in proc.stdout
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with (copy / "model" / "model.onnx.data").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xff")
    proc = cli("--json", "inspect", str(copy))
    assert proc.returncode == 1 and "changed model/model.onnx.data" in envelope(proc)["error"]["message"]


def test_rebuild_is_reproducible(tiny_model: Path, tiny_target: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    proc = cli("-q", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(tmp_path), "--no-wheels")
    assert proc.returncode == 0, proc.stderr
    a = json.loads((tiny_bundle / "edgepack.json").read_text())
    b = json.loads((tmp_path / "tiny-llama-tiny-target" / "edgepack.json").read_text())
    assert a["content_sha256"] == b["content_sha256"]
    assert a == b  # the manifest itself too: no timestamps, no machine paths


def test_existing_output_needs_force(tiny_model: Path, tiny_target: Path, tiny_bundle: Path) -> None:
    before = (tiny_bundle / "edgepack.json").read_bytes()
    proc = cli("--json", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(tiny_bundle.parent),
               "--no-wheels")
    assert proc.returncode == 1
    assert envelope(proc)["error"]["kind"] == "output-exists" and "--force" in envelope(proc)["error"]["hint"]
    assert (tiny_bundle / "edgepack.json").read_bytes() == before


def test_quality_gate_failure_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        "max_ppl_increase_pct = 50.0", "max_ppl_increase_pct = 0.0").replace(
        "min_top1_agreement = 0.5", "min_top1_agreement = 1.0"))
    out = tmp_path / "dist"
    proc = cli("--json", "build", "--target", str(strict), str(tiny_model), "--out", str(out), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 1 and doc["error"]["kind"] == "quality-gate"
    assert doc["error"]["code"] == "quality_gate_failed"
    assert doc["error"]["report"]["ppl_delta_pct"] > 0.0
    assert list(out.iterdir()) == []  # no bundle, no partial folder


def test_skip_validation_is_recorded(tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    proc = cli("-q", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(tmp_path),
               "--no-wheels", "--skip-validation")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "tiny-llama-tiny-target" / "edgepack.json").read_text())
    assert m["validated"] is False and m["quality"]["validated"] is False
    assert "NOT VALIDATED" in cli("inspect", str(tmp_path / "tiny-llama-tiny-target")).stdout


@pytest.mark.parametrize("scheme", ["int8", "fp32"])
def test_other_schemes_build(tiny_model: Path, tmp_path: Path, scheme: str) -> None:
    t = tmp_path / f"t-{scheme}.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace('scheme = "int4"', f'scheme = "{scheme}"'))
    proc = cli("--json", "build", "--target", str(t), str(tiny_model), "--out", str(tmp_path), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert m["export"]["scheme"] == scheme
    if scheme == "fp32":
        assert m["export"]["graph"]["quantized_matmuls"] == 0 and m["quality"]["ppl_delta_pct"] == 0
    else:
        assert m["export"]["graph"]["bits"] == [8]


def test_smoke_test_checks_quality_against_the_build(tiny_bundle: Path, tmp_path: Path) -> None:
    """The device re-scores a short text: a perplexity that drifts from the build machine's fails the check."""
    m = json.loads((tiny_bundle / "edgepack.json").read_text())
    assert len(m["smoke"]["check_ids"]) == 128 and m["smoke"]["build_ppl"] > 1
    ok = subprocess.run([sys.executable, str(tiny_bundle / "smoke_test.py")], capture_output=True, text=True)
    line = json.loads(ok.stdout)
    assert abs(line["ppl_drift_pct"]) < 0.5 and line["top1_vs_build"] > 0.95
    copy = with_smoke(tiny_bundle, tmp_path / "drift", build_ppl=m["smoke"]["build_ppl"] * 0.9)
    bad = subprocess.run([sys.executable, str(copy / "smoke_test.py")], capture_output=True, text=True)
    line = json.loads(bad.stdout)
    assert bad.returncode == 1 and line["ok"] is False
    assert "perplexity on the check text" in line["error"] and line["ppl_drift_pct"] > 10


def test_bench_here_reports_medians_and_spread(tiny_bundle: Path) -> None:
    proc = cli("--json", "bench", str(tiny_bundle), "--reps", "3", "--tokens", "8")
    res = envelope(proc)["result"]
    assert proc.returncode == 0, proc.stderr
    assert res["reps"] == 3 and len(res["runs"]) == 3
    d = res["summary"]["decode_tokens_per_s"]
    assert d["min"] <= d["median"] <= d["max"] and res["summary"]["new_tokens"]["median"] == 8


def corrupt_scales(model_dir: Path, factor: float = 3.0) -> int:
    """A deliberately broken quantization: every int4 block scale multiplied by `factor`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))
    n = 0
    for init in model.graph.initializer:
        if init.name.endswith("_scales"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
            n += 1
    (model_dir / "model.onnx.data").unlink()
    onnx.save_model(model, str(model_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    return n


def test_corrupted_scales_are_caught_by_the_gate_and_by_the_device_check(tiny_bundle: Path, tiny_model: Path,
                                                                          tiny_target: Path, tmp_path: Path) -> None:
    from edgepack.bundle import write_manifest
    from edgepack.models import resolve_model
    from edgepack.stages.validate import validate
    from edgepack.targets import load_target

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    assert corrupt_scales(bad / "model") > 0
    # 1. The build-time gate refuses it.
    report = validate(resolve_model(str(tiny_model)), bad / "model", load_target(str(tiny_target)))
    assert not report.passed and any("top-1" in f for f in report.failures)
    # 2. Had it shipped anyway (manifest rewritten to match), the device's smoke test refuses it.
    write_manifest(bad, {k: v for k, v in json.loads((tiny_bundle / "edgepack.json").read_text()).items()
                         if k not in ("files", "content_sha256", "bundle_id", "schema")})
    proc = subprocess.run([sys.executable, str(bad / "smoke_test.py")], capture_output=True, text=True)
    line = json.loads(proc.stdout)
    assert proc.returncode == 1 and not line["ok"]
    assert line["top1_vs_build"] < 0.9 and "top-1 agreement with the build machine" in line["error"]


def test_per_layer_int8_override(tiny_model: Path, tmp_path: Path) -> None:
    t = tmp_path / "ovr.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        'algorithm = "default"', 'algorithm = "default"\nint8_layers = [-1]'))
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import onnx

    model = onnx.load(str(Path(doc["result"]["bundle"]) / "model" / "model.onnx"), load_external_data=False)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits"}
    assert {b for name, b in bits.items() if name.startswith("/model/layers.1/")} == {8}  # -1 = the last of 2
    assert {b for name, b in bits.items() if name.startswith("/model/layers.0/")} == {4}
    assert not any(n.op_type == "MatMul" for n in model.graph.node)
    assert "INFO" not in proc.stderr  # onnxruntime's quantizer logging stays out of the progress stream


def test_gptq_rewrites_the_rtn_weights_in_the_same_graph(tiny_model: Path, tiny_bundle: Path,
                                                         tmp_path: Path) -> None:
    cal = tmp_path / "calibration.txt"
    cal.write_text("The quick brown fox jumps over the lazy dog. 0123456789 sensor reading ok.\n" * 60)
    t = tmp_path / "gptq.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        'algorithm = "default"', 'algorithm = "gptq"\ncalibration_text = "calibration.txt"'))
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gptq: layer 1/2" in proc.stderr and "×256 tokens from calibration.txt" in proc.stderr
    import onnx
    from onnx import numpy_helper

    def weights(bundle: Path) -> tuple[dict[str, int], dict[str, object]]:
        model = onnx.load(str(bundle / "model" / "model.onnx"))
        ops: dict[str, int] = {}
        for n in model.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return ops, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_Q4")}

    new_ops, new = weights(Path(doc["result"]["bundle"]))
    rtn_ops, rtn = weights(tiny_bundle)
    assert new_ops == rtn_ops  # the same graph and kernels as RTN: the speed of RTN
    layers = [k for k in rtn if k.startswith("model.layers.")]
    assert layers and all(not (new[k] == rtn[k]).all() for k in layers)  # type: ignore[attr-defined]
    assert (new["lm_head.MatMul.weight_Q4"] == rtn["lm_head.MatMul.weight_Q4"]).all()  # type: ignore[attr-defined]
    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert m["quality"]["passed"] is True


def test_imatrix_searches_asymmetric_codes_scales_and_zero_points_in_rtns_graph(tiny_model: Path,
                                                                                tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    def build(name: str, algorithm: str) -> Path:
        t = tmp_path / f"{name}.toml"
        t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
            'algorithm = "default"', f'algorithm = "{algorithm}"\nsymmetric = false\nembedding_precision = "fp32"'))
        proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path / name),
                   "--no-wheels")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return Path(envelope(proc)["result"]["bundle"])

    def graph(bundle: Path) -> tuple[list[tuple[str, int]], dict[str, object]]:
        model = onnx.load(str(bundle / "model" / "model.onnx"))
        nodes = [(n.op_type, len(n.input)) for n in model.graph.node]
        return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    rtn_nodes, rtn = graph(build("rtn", "default"))
    im_bundle = build("imatrix", "imatrix")
    im_nodes, im = graph(im_bundle)
    assert im_nodes == rtn_nodes  # node for node, input for input: the builder's asymmetric RTN graph and speed
    zps = [k for k in rtn if k.startswith("model.layers.") and k.endswith("_zero_points")]
    assert zps and all(rtn[k].shape == im[k].shape for k in zps)  # type: ignore[attr-defined]
    assert any(not (im[k] == rtn[k]).all() for k in zps)  # type: ignore[attr-defined]  # zero points searched
    assert json.loads((im_bundle / "edgepack.json").read_text())["quality"]["passed"] is True


def test_gptq_calibration_text_must_exist(tiny_model: Path, tmp_path: Path) -> None:
    t = tmp_path / "gptq.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        'algorithm = "default"', 'algorithm = "gptq"\ncalibration_text = "missing.txt"'))
    out = tmp_path / "dist"
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(out), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 1 and doc["error"]["field"] == "quantize.calibration_text"
    assert "missing.txt" in doc["error"]["message"] and not list(out.glob("*"))
