"""A user's own model: a LoRA fine-tune merged at build time, and the gate scored on the user's own text."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import FIXTURES, ROOT, cli, envelope, needs_onnx, with_smoke

pytestmark = [pytest.mark.integration, needs_onnx]

PROMPT = "Licensed under the Apache License"


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter with random (non-zero) B matrices: it changes what the model says. Nothing is trained."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")
    peft.get_peft_model(model, lora).save_pretrained(out)
    return out


def greedy(model_or_dir, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    import torch
    import transformers

    model = (transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
             if isinstance(model_or_dir, Path) else model_or_dir).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0][len(ids):]]


@pytest.fixture(scope="module")
def fp32_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = tmp_path_factory.mktemp("ft") / "tiny-fp32.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace('scheme = "int4"', 'scheme = "fp32"'))
    return t


def test_adapter_is_merged_and_the_bundle_says_what_the_merged_model_says(tiny_model: Path, fp32_target: Path,
                                                                          tmp_path: Path) -> None:
    import peft
    import tokenizers
    import torch
    import transformers

    adapter = make_adapter(tiny_model, tmp_path / "my-lora")
    proc = cli("--json", "build", str(tiny_model), "--adapter", str(adapter), "--target", str(fp32_target),
               "--out", str(tmp_path / "dist"), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, (doc["error"], proc.stderr[-2000:])
    bundle = Path(doc["result"]["bundle"])
    assert bundle.name == "tiny-llama-my-lora-tiny-fp32"
    m = json.loads((bundle / "edgepack.json").read_text())
    a = m["model"]["adapter"]
    assert a["name"] == "my-lora" and a["rank"] == 4 and len(a["sha256"]) == 64
    assert a["base_weights_sha256"] != m["model"]["weights_sha256"] and m["quality"]["passed"]
    # The float merged model, built here with peft from the same two folders.
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    ids = tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(PROMPT).ids
    run = subprocess.run([sys.executable, str(bundle / "run.py"), "--raw", "--prompt", PROMPT, "--max-tokens", "16",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tokens = json.loads(run.stdout)["tokens"]
    assert tokens == greedy(merged, ids, 16)
    assert tokens != greedy(tiny_model, ids, 16)  # the adapter changed the model


def test_adapter_for_another_base_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from edgepack.testing import make_tiny_llama

    deeper = make_tiny_llama(tmp_path / "deeper", layers=3)
    adapter = make_adapter(deeper, tmp_path / "lora-for-3-layers")
    out = tmp_path / "dist"
    proc = cli("--json", "build", str(tiny_model), "--adapter", str(adapter), "--target",
               str(FIXTURES / "tiny-target.toml"), "--out", str(out), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "match modules of this base model" in err["message"], err
    assert not out.exists() or not list(out.iterdir())


def test_malformed_adapter_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"junk")
    proc = cli("--json", "build", str(tiny_model), "--adapter", str(bad), "--target",
               str(FIXTURES / "tiny-target.toml"), "--out", str(tmp_path / "dist"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "adapter_config.json" in err["message"], err


def test_gate_scores_the_users_own_text(tiny_model: Path, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "design.md").read_text()  # a text of another genre than the shipped licence
    eval_file = tmp_path / "field-notes.txt"
    eval_file.write_text(text)
    proc = cli("--json", "build", str(tiny_model), "--eval-text", str(eval_file), "--target",
               str(FIXTURES / "tiny-target.toml"), "--out", str(tmp_path / "dist"), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, (doc["error"], proc.stderr[-2000:])
    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert m["quality"]["text"] == "field-notes.txt"
    assert m["quality"]["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert str(eval_file) not in json.dumps(m)  # the text's name and sha256, not the build machine's path
    short = tmp_path / "short.txt"
    short.write_text("too short")
    proc = cli("--json", "build", str(tiny_model), "--eval-text", str(short), "--target",
               str(FIXTURES / "tiny-target.toml"), "--out", str(tmp_path / "dist2"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["field"] == "quality.eval_text" and "2000" in err["message"], err


def write_checks(path: Path, lines: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_task_checks_are_gated_and_rerun_by_the_smoke_test(tiny_model: Path, fp32_target: Path,
                                                           tmp_path: Path) -> None:
    checks = write_checks(tmp_path / "checks.jsonl", [
        {"id": "same", "prompt": "Write a haiku about the sea.", "same_as_float": True},
        {"id": "any", "prompt": "Licensed under", "raw": True, "regex": ".", "max_tokens": 8},
        {"id": "never", "prompt": "Say zebra", "contains": "zzzz-not-a-token", "max_tokens": 8},
    ])
    proc = cli("--json", "build", str(tiny_model), "--checks", str(checks), "--target", str(fp32_target),
               "--out", str(tmp_path / "dist"), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, (doc["error"], proc.stderr[-2000:])
    bundle = Path(doc["result"]["bundle"])
    c = json.loads((bundle / "edgepack.json").read_text())["quality"]["checks"]
    assert (c["file"], c["total"], c["float_passed"], c["quantized_passed"]) == ("checks.jsonl", 3, 2, 2)
    smoke = subprocess.run([sys.executable, str(bundle / "smoke_test.py")], capture_output=True, text=True)
    line = json.loads(smoke.stdout)
    assert smoke.returncode == 0 and line["checks_passed"] == 2 and line["checks_failed"] == ["never"], line
    # A device that passes fewer checks than the build did fails its smoke test.
    checks = json.loads((bundle / "edgepack.json").read_text())["smoke"]["task_checks"]
    strict = with_smoke(bundle, tmp_path / "strict", task_checks={**checks, "build_passed": 3})
    bad = subprocess.run([sys.executable, str(strict / "smoke_test.py")], capture_output=True, text=True)
    assert bad.returncode == 1 and "task checks: 2/3 passed here, 3 at build" in json.loads(bad.stdout)["error"]


def test_task_checks_the_quantized_model_loses_fail_the_gate(tmp_path: Path) -> None:
    from edgepack.testing import make_tiny

    # A tiny Mistral's greedy replies vary token to token (the tiny Llama's repeat one token), so int4 noise
    # changes them: "same reply as the float model" is lost although perplexity passes the loose tiny gate.
    model = make_tiny("mistral", tmp_path / "tiny-mistral")
    prompts = ["Write a haiku about the sea.", "Tell me a story.", "What is a license?", "Name three colours."]
    checks = write_checks(tmp_path / "checks.jsonl", [{"prompt": p, "same_as_float": True} for p in prompts])
    out = tmp_path / "dist"
    proc = cli("--json", "build", str(model), "--checks", str(checks), "--target",
               str(FIXTURES / "tiny-target.toml"), "--out", str(out), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["kind"] == "quality-gate", err
    assert "task checks: quantized passes" in err["message"] and "float 4/4" in err["message"]
    assert not out.exists() or not list(out.iterdir())


def test_malformed_checks_name_the_line(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "contains": "x"}\n{"prompt": "two rules", "contains": "a", "regex": "b"}\n')
    proc = cli("--json", "build", str(tiny_model), "--checks", str(bad), "--target",
               str(FIXTURES / "tiny-target.toml"), "--out", str(tmp_path / "dist"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["line"] == 2 and "exactly one of" in err["message"], err


def test_the_streamed_merge_is_peft_merge_bit_for_bit(tiny_model: Path, tmp_path: Path) -> None:
    """--adapter merges one tensor at a time (bench/merge_memory.py: 545 MB peak instead of 6.7 GB at 1.1B); what
    it writes is exactly what peft's merge_and_unload writes, and the config reads it as float32."""
    import torch

    from edgepack.adapter import _merge, _peft_merge
    from edgepack.checkpoint import Checkpoint

    adapter = make_adapter(tiny_model, tmp_path / "lora", seed=5)
    _merge(tiny_model, adapter, tmp_path / "streamed")
    _peft_merge(tiny_model, adapter, tmp_path / "peft")
    s, p = Checkpoint(tmp_path / "streamed"), Checkpoint(tmp_path / "peft")
    changed = 0
    for name in p.entries:
        a, b = s.read(name).to(torch.float32), p.read(name).to(torch.float32)
        assert torch.equal(a, b), name
        changed += int(not torch.equal(a, Checkpoint(tiny_model).read(name).to(torch.float32)))
    assert changed == 3 * 2  # q_proj, v_proj, down_proj in each of the two layers
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == "float32"
