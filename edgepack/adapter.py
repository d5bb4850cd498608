"""Fine-tunes: a PEFT LoRA adapter merged into its base at build time, cached, recorded with both sha256s."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

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


def lora_scale(config: dict[str, Any]) -> float:
    """What PEFT multiplies B·A by: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    rank = int(config.get("r") or 0) or 1
    alpha = float(config.get("lora_alpha") or rank)
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _merge(base_dir: Path, adapter_dir: Path, target: Path) -> None:
    """Streamed, one tensor resident (streamed_merge) for plain LoRA on linear layers; else through peft, the whole
    float model in memory (DoRA, trained biases, embeddings, modules_to_save, per-module ranks, Conv1D)."""
    config, weights = read_adapter(adapter_dir)
    if weights.suffix == ".safetensors" and not any(
            config.get(k) for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
    ) and config.get("bias", "none") == "none" and any(base_dir.glob("*.safetensors")):
        from safetensors.numpy import load_file

        tensors = load_file(str(weights))
        if tensors and all(_LORA_KEY.match(k) for k in tensors):
            streamed_merge(base_dir, adapter_dir, tensors, config, target)
            return
    _peft_merge(base_dir, adapter_dir, target)


def streamed_merge(base_dir: Path, adapter_dir: Path, tensors: dict[str, Any], config: dict[str, Any],
                   target: Path) -> None:
    """W + scale·B·A written tensor by tensor (float32 for the merged ones, the others' bytes copied as they are),
    so merging a 3.8B model holds one weight matrix, not the model; the same folder layout and tensor names."""
    import numpy as np

    from edgepack.checkpoint import Checkpoint

    torch = require("torch", "onnx", "Merging LoRA adapters")
    scale = lora_scale(config)
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        assert m is not None
        pairs.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = value
    ckpt = Checkpoint(base_dir)
    hint = ("Pass the base model the adapter was trained on (adapter_config.json's base_model_name_or_path "
            "names it).")
    unmatched = sorted(n for n in pairs if n not in ckpt)
    if unmatched:
        raise ModelError(f"the LoRA adapter {adapter_dir.name} has {2 * len(pairs)} weight tensors but only "
                         f"{2 * (len(pairs) - len(unmatched))} match modules of this base model (e.g. {unmatched[0]}).",
                         hint=hint, path=adapter_dir, adapter_tensors=2 * len(pairs),
                         matched=2 * (len(pairs) - len(unmatched)))
    for name, pair in pairs.items():
        shape = ckpt.entries[name][2]
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or (b.shape[0], a.shape[1]) != tuple(shape) or b.shape[1] != a.shape[0]:
            got = [b.shape[0], a.shape[1]] if a is not None and b is not None else "incomplete"
            raise ModelError(f"the LoRA adapter {adapter_dir.name} does not fit this base model: {name} is "
                             f"{list(shape)}, the adapter's is {got}.", hint=hint, path=adapter_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_entry(target) as tmp:
        by_file: dict[Path, list[str]] = {}
        for name, (path, *_rest) in sorted(ckpt.entries.items(), key=lambda e: (e[1][0], e[1][3])):
            by_file.setdefault(path, []).append(name)
        sizes = 0
        for path, names in by_file.items():
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for n in names:
                _, dtype, shape, _, nbytes = ckpt.entries[n]
                if n in pairs:
                    dtype, nbytes = "F32", 4 * int(np.prod(shape))
                header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            sizes += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with (tmp / path.name).open("wb") as out, path.open("rb") as src:
                out.write(struct.pack("<Q", len(raw)) + raw)
                for n in names:
                    _, _, _, start, nbytes = ckpt.entries[n]
                    if n in pairs:
                        w = ckpt.read(n).to(torch.float32)
                        w += scale * (torch.from_numpy(pairs[n]["B"].astype(np.float32))
                                      @ torch.from_numpy(pairs[n]["A"].astype(np.float32)))
                        out.write(w.numpy().tobytes())
                        del w
                        continue
                    src.seek(start)
                    left = nbytes
                    while left:
                        block = src.read(min(left, 1 << 24))
                        out.write(block)
                        left -= len(block)
        index = base_dir / "model.safetensors.index.json"
        if index.is_file():
            doc = json.loads(index.read_text(encoding="utf-8"))
            doc.setdefault("metadata", {})["total_size"] = sizes
            (tmp / index.name).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        # Read as float32 everywhere (the merged weights are float32; the others cast exactly), as peft's merge was.
        cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        cfg["dtype"] = "float32"
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        _copy_side_files(base_dir, adapter_dir, tmp)


def _copy_side_files(base_dir: Path, adapter_dir: Path, tmp: Path) -> None:
    for name in TOKENIZER_FILES:
        src = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if src.is_file():
            shutil.copy2(src, tmp / name)


def _peft_merge(base_dir: Path, adapter_dir: Path, target: Path) -> None:
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
        _copy_side_files(base_dir, adapter_dir, tmp)
