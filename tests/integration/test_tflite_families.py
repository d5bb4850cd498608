"""Every TFLite family row of edgepack/data/families.toml, proven on a tiny random checkpoint of its real shape.

For each family: an fp32 build whose gate demands that LiteRT reproduce torch (q/k norms, fused projections,
rope scaling, LongRoPE, sliding windows, softcaps), the bundle's LiteRT-LM runner decoding past the sliding
window to torch's greedy text, and a build of the tiny target's own scheme (int8) with the gate on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.families import families

from ..conftest import FIXTURES, LONG_PROMPT, build_ok, cli, envelope, exact_fp32_target, needs_onnx, needs_tflite

pytestmark = [pytest.mark.integration, needs_tflite, needs_onnx]

# llama is proven by test_tflite.py (tiny Llama and SmolLM2).
TFLITE_FAMILIES = [f.proof for f in families() if "tflite" in f.formats and f.proof not in ("", "llama")]

LONG = LONG_PROMPT


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tflite-families")


@pytest.fixture(scope="module")
def targets(work: Path) -> dict[str, Path]:
    exact = exact_fp32_target(FIXTURES / "tiny-tflite.toml", work / "tiny-tflite-fp32.toml")
    return {"fp32": exact, "int8": FIXTURES / "tiny-tflite.toml"}


def tiny(family: str, work: Path) -> Path:
    from edgepack.testing import TINY_CONFIGS, TINY_WINDOW, make_tiny

    folder = work / "models" / f"tiny-{family}"
    if not folder.is_dir():
        # One seed per family, so that families of the same shape are different models here too. The ONNX tiny
        # windowed Mistral has a 256-token window (its ONNX context is capped there); LiteRT applies windows
        # in the graph, so its test prompt runs past a 16-token one.
        window = {"sliding_window": TINY_WINDOW} if family == "mistral-window" else {}
        # Weights at 5x the default init, as in test_families.py: so that a family feature exported wrongly
        # (rope scaling, a window, a softcap) shows in the exact test instead of vanishing in near-uniform logits.
        make_tiny(family, folder, seed=1000 + sorted(TINY_CONFIGS).index(family), initializer_range=0.1, **window)
    return folder


def build(family: str, scheme: str, work: Path, targets: dict[str, Path]) -> Path:
    return build_ok(tiny(family, work), targets[scheme], work / f"dist-{scheme}")


def runner(bundle: Path, prompt: str, n: int) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run([sys.executable, str(bundle / "run.py"), "--raw", "--prompt", prompt, "--max-tokens",
                           str(n), "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def torch_greedy_text(folder: Path, prompt: str, n: int) -> str:
    import tokenizers
    import torch
    import transformers

    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stop = model.generation_config.eos_token_id  # the bundle's stop token (edgepack.testing sets one)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=0)
    new = [int(t) for t in out[0][len(ids):]]
    new = new[:new.index(stop)] if stop in new else new  # LiteRT-LM stops there without printing it
    # LiteRT-LM prints the other special tokens it generates; keep them here too.
    return str(tok.decode(new, skip_special_tokens=False))


def _visible(text: str) -> str:
    return "".join(c for c in text if c != "\ufffd" and c.isprintable() and not c.isspace())


@pytest.mark.parametrize("family", TFLITE_FAMILIES)
def test_family_converts_to_litert_exactly_and_runs(family: str, work: Path, targets: dict[str, Path]) -> None:
    from edgepack.testing import TINY_WINDOW

    exact = build(family, "fp32", work, targets)
    m = json.loads((exact / "edgepack.json").read_text())
    q = m["quality"]
    assert (m["export"]["format"], m["export"]["scheme"]) == ("tflite", "fp32")
    assert m["model"]["family"] in {f.id for f in families() if f.proof == family}
    assert q["validated"] and q["passed"], q["failures"]
    assert abs(q["ppl_delta_pct"]) <= 0.5 and q["top1_agreement"] >= 0.99, q
    # LiteRT-LM decoding one token at a time, past the sliding window: torch's greedy text.
    long = runner(exact, LONG, 24)
    assert long["new_tokens"] >= 1 and long["prompt_tokens"] > TINY_WINDOW
    # Compared as text (LiteRT-LM reports no token ids). Random weights emit lone UTF-8 byte tokens, which a
    # streaming decoder and a whole-sequence decode render differently around replacement characters (seen:
    # "( \ufffd" vs "(\ufffd\x0c"), so those, control characters and whitespace are left out of the comparison.
    assert _visible(long["text"]) == _visible(torch_greedy_text(tiny(family, work), LONG, 24)), long

    quantized = build(family, "int8", work, targets)
    m = json.loads((quantized / "edgepack.json").read_text())
    assert m["export"]["scheme"] == "int8" and m["export"]["graph"]["quantized_matmuls"] > 0
    assert m["quality"]["validated"] and m["quality"]["passed"], m["quality"]["failures"]
    assert runner(quantized, LONG, 5)["new_tokens"] >= 1  # a random model may pick its stop token early


def test_longrope_past_its_original_context_is_refused(work: Path, tmp_path: Path) -> None:
    """Past original_max_position_embeddings LongRoPE switches to its long factors; one LiteRT rope table
    cannot, so a KV cache longer than that is refused before converting, naming the limit."""
    t = tmp_path / "long.toml"
    t.write_text((FIXTURES / "tiny-tflite.toml").read_text().replace("[runtime]", "[runtime]\ncontext_length = 8192"))
    out = tmp_path / "out"
    proc = cli("--json", "build", "--target", str(t), str(tiny("phi3-longrope", work)), "--out", str(out),
               "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "LongRoPE" in err["message"] and "4096" in err["message"], err
    assert err["kv_cache_len"] == 8192 and "--format onnx" in err["hint"]
    assert not out.exists() or not any(out.rglob("*.litertlm"))
