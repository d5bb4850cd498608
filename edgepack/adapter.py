"""Fine-tunes: a PEFT LoRA adapter merged into its base at build time, cached, recorded with both sha256s."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from edgepack.errors import ModelError, require
from edgepack.fsutil import cache_entry, sha256_file
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.resources import cache_root
from edgepack.source import AdapterInfo, ModelSource, slug

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def read_adapter(folder: Path) -> tuple[dict[str, object], Path]:
    config_path = folder / "adapter_config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise ModelError(f"{folder} is not a PEFT adapter folder (no adapter_config.json).",
                         hint="Pass the folder `model.save_pretrained()` of a PeftModel wrote.", path=folder)
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise ModelError(f"{folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).",
                         hint="Save the adapter again with `model.save_pretrained(folder)`.", path=folder)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}.", path=config_path) from exc
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{folder} is a {config.get('peft_type')!r} adapter; edgepack merges LoRA adapters only.",
                         hint="Merge it into the base yourself and pass the merged folder.", path=folder,
                         peft_type=config.get("peft_type"))
    return config, weights


def merge_adapter(base: ModelSource, folder: Path, *, progress: ProgressFn = silent) -> ModelSource:
    """The base with the LoRA adapter merged in (float weights), as a cached HF folder of its own."""
    folder = folder.expanduser().resolve()
    config, weights = read_adapter(folder)
    h = hashlib.sha256()
    for p in (folder / "adapter_config.json", weights):
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    adapter_sha = h.hexdigest()
    merged_sha = hashlib.sha256(f"{base.weights_sha256}+lora:{adapter_sha}".encode()).hexdigest()
    target = cache_root() / "checkpoints" / f"merged-{merged_sha[:20]}"
    if not (target / "config.json").is_file():
        progress(ProgressEvent("resolve", f"merging LoRA adapter {folder.name} into {base.name} (once; cached)"))
        _merge(base.hf_dir, folder, target)
    modules = config.get("target_modules") or ()
    info = AdapterInfo(name=folder.name, sha256=adapter_sha, peft_type="LORA", rank=int(config.get("r") or 0),  # type: ignore[call-overload]
                       target_modules=tuple(sorted(modules)) if isinstance(modules, list) else (str(modules),),
                       base_model=str(config.get("base_model_name_or_path") or ""),
                       base_weights_sha256=base.weights_sha256)
    return dataclasses.replace(base, name=f"{base.name}-{slug(folder.name)}", hf_dir=target,
                               weights_sha256=merged_sha, adapter=info)


def _merge(base_dir: Path, adapter_dir: Path, target: Path) -> None:
    torch = require("torch", "onnx", "Merging LoRA adapters")
    transformers = require("transformers", "onnx", "Merging LoRA adapters")
    peft = require("peft", "onnx", "Merging LoRA adapters")
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    hint = ("Pass the base model the adapter was trained on (adapter_config.json's base_model_name_or_path "
            "names it).")
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch, missing target modules
        first = str(exc).strip().splitlines()[0][:400]
        raise ModelError(f"the LoRA adapter {adapter_dir.name} does not fit this base model: {first}",
                         hint=hint, path=adapter_dir) from exc
    # peft only warns about adapter tensors that match no module (an adapter for a deeper model): refuse.
    saved = len(peft.utils.load_peft_weights(str(adapter_dir)))
    loaded = sum(1 for n, _ in wrapped.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    if saved != loaded:
        raise ModelError(f"the LoRA adapter {adapter_dir.name} has {saved} weight tensors but only {loaded} "
                         "match modules of this base model.", hint=hint, path=adapter_dir,
                         adapter_tensors=saved, matched=loaded)
    merged = wrapped.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_entry(target) as tmp:
        merged.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            src = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
