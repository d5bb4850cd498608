"""Model families per export format (edgepack/data/families.toml): which config shapes each exporter takes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tomllib

from edgepack.errors import ModelError
from edgepack.resources import data_file


@dataclass(frozen=True)
class Family:
    id: str
    architecture: str
    model_type: str
    examples: tuple[str, ...]
    rope: tuple[str, ...]
    attention: str
    sliding_window: bool
    formats: tuple[str, ...]
    proof: str  # the edgepack.testing.TINY_CONFIGS key whose build proves this row; "" = not proven here
    notes: str = ""


@cache
def families() -> tuple[Family, ...]:
    data = tomllib.loads(data_file("families.toml").read_text(encoding="utf-8"))
    return tuple(Family(id=k, architecture=v["architecture"], model_type=v["model_type"],
                        examples=tuple(v.get("examples", ())), rope=tuple(v["rope"]), attention=v["attention"],
                        sliding_window=bool(v["sliding_window"]), formats=tuple(v["formats"]), proof=v["proof"],
                        notes=v.get("notes", "")) for k, v in data.items())


@dataclass(frozen=True)
class ConfigShape:
    """What a config.json says about the things families differ in."""

    architecture: str
    model_type: str
    rope_type: str
    sliding_window: int  # 0 = none (or not active)

    @property
    def windowed(self) -> bool:
        return self.sliding_window > 0


def rope_type(config: dict[str, Any]) -> str:
    """The rope type, from transformers 5's `rope_parameters` (flat or per layer type) or the hub's `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"] or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    return str(kind or "default")


def sliding_window(config: dict[str, Any]) -> int:
    """The active sliding window in tokens, 0 when the model attends fully on every layer."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return 0
    if "use_sliding_window" in config and not config["use_sliding_window"]:  # Qwen2/Qwen3/SmolLM3 flag
        return 0
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and window >= positions:  # Phi-3.5's 262144 over 131072 positions: none
        return 0
    types = config.get("layer_types")
    if isinstance(types, list) and types and "sliding_attention" not in types:
        return 0
    return window


def shape_of(config_path: Path) -> ConfigShape:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    archs = config.get("architectures") or ["?"]
    return ConfigShape(architecture=str(archs[0]), model_type=str(config.get("model_type", "?")),
                       rope_type=rope_type(config), sliding_window=sliding_window(config))


def match(shape: ConfigShape, fmt: str) -> Family | None:
    for f in families():
        if (fmt in f.formats and f.architecture == shape.architecture and shape.rope_type in f.rope
                and f.sliding_window == shape.windowed):
            return f
    return None


def check(shape: ConfigShape, fmt: str, exporter: str) -> Family:
    """The family row this config matches for `fmt`, or a user error listing what the format does take."""
    found = match(shape, fmt)
    if found is not None:
        return found
    others = sorted({o for f in families() for o in f.formats if o != fmt and match(shape, o) is not None})
    elsewhere = f" The {', '.join(others)} format takes it: pass --format {others[0]}." if others else ""
    same_arch = [f for f in families() if f.architecture == shape.architecture and fmt in f.formats]
    window = f"sliding window {shape.sliding_window}" if shape.windowed else "no sliding window"
    if same_arch:
        what = (f"the {exporter} exporter takes {shape.architecture} only with "
                + "; ".join(f"rope {'/'.join(f.rope)} and {'a' if f.sliding_window else 'no'} sliding window"
                            for f in same_arch)
                + f", and this model has rope '{shape.rope_type}' and {window}.")
    else:
        what = (f"the {exporter} exporter does not support architecture '{shape.architecture}' "
                f"(model type '{shape.model_type}').")
    supported = sorted({f.architecture for f in families() if fmt in f.formats})
    raise ModelError(what + elsewhere, hint="Supported: " + ", ".join(supported)
                     + ". `edgepack models families` shows every family and format.",
                     architecture=shape.architecture, rope_type=shape.rope_type,
                     sliding_window=shape.sliding_window, supported=supported, other_formats=others)
