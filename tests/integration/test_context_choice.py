"""A target written for a device, built with a model that holds less: the model's own context is used and said so
(progress, result, manifest); --context sets it; a --context longer than the model's is refused, naming it.
(The card's `edgepack build --target rpi5 tinyllama`: rpi5 asks 4096, TinyLlama holds 2048.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, cli, envelope, needs_onnx

pytestmark = needs_onnx

MODEL_CONTEXT = 512


@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.testing import make_tiny

    return make_tiny("llama", tmp_path_factory.mktemp("short") / "tiny-512", max_position_embeddings=MODEL_CONTEXT,
                     tie_word_embeddings=True)


@pytest.fixture(scope="module")
def long_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test target asking for twice the model's context, as rpi5's 4096 asks of TinyLlama's 2048."""
    path = tmp_path_factory.mktemp("targets") / "long-context.toml"
    path.write_text((FIXTURES / "tiny-target.toml").read_text().replace(
        "[deploy]", f"[runtime]\ncontext_length = {2 * MODEL_CONTEXT}\n\n[deploy]"))
    return path


def test_a_target_longer_than_the_model_builds_at_the_models_context(short_model: Path, long_target: Path,
                                                                      tmp_path: Path) -> None:
    proc = cli("--json", "build", "--target", str(long_target), str(short_model), "--out", str(tmp_path),
               "--no-wheels", "--no-cache")
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], (doc["error"], proc.stderr[-2000:])
    # progress says so, before exporting
    said = [line for line in proc.stderr.splitlines() if "runtime.context_length (1024) is longer" in line]
    assert said and "resolve" in said[0] and f"{MODEL_CONTEXT} tokens" in said[0], proc.stderr
    res = doc["result"]
    assert res["context"]["tokens"] == MODEL_CONTEXT and res["context"]["source"] == "model"
    assert res["context"]["requested"] == 2 * MODEL_CONTEXT and res["context"]["model_context"] == MODEL_CONTEXT
    resolve = next(s for s in res["stages"] if s["name"] == "resolve")
    assert resolve["detail"]["context"] == MODEL_CONTEXT and resolve["detail"]["planned_build_peak_mib"] > 0
    bundle = Path(res["bundle"])
    m = json.loads((bundle / "edgepack.json").read_text())
    assert m["runtime"]["context_length"] == MODEL_CONTEXT
    assert m["runtime"]["context"]["source"] == "model" and m["runtime"]["context"]["requested"] == 1024
    assert "max_position_embeddings" in m["runtime"]["context"]["reason"]
    genai = json.loads((bundle / "model" / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == MODEL_CONTEXT and genai["search"]["max_length"] == MODEL_CONTEXT


def test_context_option_sets_it(short_model: Path, long_target: Path, tmp_path: Path) -> None:
    proc = cli("--json", "build", "--target", str(long_target), str(short_model), "--out", str(tmp_path),
               "--no-wheels", "--no-cache", "--skip-validation", "--context", "384")
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], (doc["error"], proc.stderr[-2000:])
    assert doc["result"]["context"]["tokens"] == 384 and doc["result"]["context"]["source"] == "option"
    bundle = Path(doc["result"]["bundle"])
    m = json.loads((bundle / "edgepack.json").read_text())
    assert m["runtime"]["context_length"] == 384 and m["runtime"]["context"]["reason"] == "--context 384"
    assert json.loads((bundle / "model" / "genai_config.json").read_text())["model"]["context_length"] == 384


def test_context_option_longer_than_the_model_is_refused_naming_its_context(short_model: Path, long_target: Path,
                                                                            tmp_path: Path) -> None:
    for command in (["build", "--out", str(tmp_path / "out"), "--no-wheels"], ["plan"]):
        proc = cli("--json", *command, "--target", str(long_target), str(short_model), "--context", "1024")
        err = envelope(proc)["error"]
        assert proc.returncode == 1 and err["field"] == "context" and err["model_context"] == MODEL_CONTEXT, err
        assert f"{MODEL_CONTEXT} tokens" in err["message"] and f"--context {MODEL_CONTEXT}" in err["hint"], err
    assert not (tmp_path / "out").exists()


def test_plan_uses_the_models_context_and_says_why(short_model: Path, long_target: Path) -> None:
    proc = cli("plan", "--target", str(long_target), str(short_model))
    assert proc.returncode == 0, proc.stderr
    assert f"context {MODEL_CONTEXT} tokens" in proc.stdout and "is longer than this model's own" in proc.stdout
    assert "build here" in proc.stdout and "peak" in proc.stdout
    doc = envelope(cli("--json", "plan", "--target", str(long_target), str(short_model)))
    assert doc["result"]["kv"]["context"] == MODEL_CONTEXT and doc["result"]["context"]["source"] == "model"
    assert doc["result"]["build"]["peak"] > doc["result"]["build"]["params"]
