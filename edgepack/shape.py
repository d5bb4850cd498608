"""A decoder-only model's dimensions and parameter count, read from its config.json (no weights, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgepack.errors import ModelError
from edgepack.families import rope_type, sliding_window

# Per model_type layout facts config.json does not spell out (data, not branches).
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3": 4, "gemma3_text": 4}  # pre/post attention and pre/post MLP
_QK_NORM = frozenset({"qwen3", "gemma3", "gemma3_text"})  # RMSNorm of head_dim on q and k
_QKV_BIAS = frozenset({"qwen2"})  # bias on q/k/v whatever attention_bias says
_UNGATED_MLP = frozenset({"gpt2", "gpt_neox", "gpt_bigcode", "opt", "phi", "falcon", "starcoder2"})
_WINDOW_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6}  # every Nth layer full when layer_types is absent


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only model, read from its config.json."""

    model_type: str
    architecture: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    gated_mlp: bool
    qkv_bias: bool
    mlp_bias: bool
    norms_per_layer: int
    qk_norm: bool
    max_positions: int
    rope_dim: int  # rotary dimensions per head
    rope_tables: int  # cos/sin tables the ONNX graph carries: 2 for LongRoPE (short/long) or local/global bases
    window: int  # active sliding window in tokens, 0 = none
    sliding_layers: int  # layers that attend within the window

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        cfg = dict(config.get("text_config") or config)  # multimodal wrappers keep the decoder under text_config

        def num(key: str, default: int | None = None) -> int:
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"config.json has {key} = {value!r}; a plan needs a positive integer.",
                                 hint="Pass the model's own config.json (decoder-only causal LMs).", field=key)
            return value

        model_type = str(cfg.get("model_type", "?"))
        hidden, heads, layers = num("hidden_size"), num("num_attention_heads"), num("num_hidden_layers")
        head_dim = cfg.get("head_dim") or hidden // heads
        rope = rope_type(cfg)
        window = sliding_window(cfg)
        types = cfg.get("layer_types")
        if not window:
            sliding = 0
        elif isinstance(types, list) and types:
            sliding = sum(1 for t in types if t == "sliding_attention")
        elif model_type in _WINDOW_PATTERN:
            pattern = int(cfg.get("sliding_window_pattern") or _WINDOW_PATTERN[model_type])
            sliding = sum(1 for i in range(layers) if (i + 1) % pattern)
        else:  # Mistral-style: the window applies to every layer
            sliding = layers
        partial = float(cfg.get("partial_rotary_factor") or 1.0)
        per_type_rope = isinstance(cfg.get("rope_parameters"), dict) and "full_attention" in cfg["rope_parameters"]
        return cls(
            model_type=model_type, architecture=str((cfg.get("architectures") or ["?"])[0]),
            vocab=num("vocab_size"), hidden=hidden, layers=layers, heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            intermediate=num("intermediate_size"), tied=bool(cfg.get("tie_word_embeddings", False)),
            gated_mlp=model_type not in _UNGATED_MLP,
            qkv_bias=model_type in _QKV_BIAS or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), norms_per_layer=_NORMS_PER_LAYER.get(model_type, 2),
            qk_norm=model_type in _QK_NORM, max_positions=int(cfg.get("max_position_embeddings") or 2048),
            rope_dim=int(head_dim * partial),
            rope_tables=2 if rope == "longrope" or per_type_rope or "rope_local_base_freq" in cfg else 1,
            window=window, sliding_layers=sliding)

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Elements of K and V one token adds to one layer's cache (multiply by the element size)."""
        return 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class ParamCount:
    """Parameters by part; `total` is what `model.num_parameters()` reports (a tied head counted once)."""

    embedding: int
    attention: int  # q/k/v/o (+ biases, q/k norms), all layers
    mlp: int  # gate/up/down (+ biases), all layers
    norms: int  # per-layer and final norms
    head: int  # 0 when tied to the embedding
    total: int


@dataclass(frozen=True)
class Matmul:
    layer: int  # -1 = the lm_head
    role: str  # qkv, o, gate_up, down, head
    k: int  # input features
    n: int  # output features


def matmuls(s: ModelShape) -> list[Matmul]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    up = s.intermediate * (2 if s.gated_mlp else 1)
    out: list[Matmul] = []
    for i in range(s.layers):
        out += [Matmul(i, "qkv", s.hidden, q + 2 * kv), Matmul(i, "o", q, s.hidden),
                Matmul(i, "gate_up", s.hidden, up), Matmul(i, "down", s.intermediate, s.hidden)]
    return out + [Matmul(-1, "head", s.hidden, s.vocab)]


def count_params(s: ModelShape) -> ParamCount:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    body = [m for m in matmuls(s) if m.layer >= 0]
    attn = sum(m.k * m.n for m in body if m.role in ("qkv", "o"))
    attn += s.layers * ((q + 2 * kv if s.qkv_bias else 0) + (2 * s.head_dim if s.qk_norm else 0))
    mlp = sum(m.k * m.n for m in body if m.role in ("gate_up", "down"))
    if s.mlp_bias:
        mlp += s.layers * (s.intermediate * (2 if s.gated_mlp else 1) + s.hidden)
    norms = (s.layers * s.norms_per_layer + 1) * s.hidden
    embedding = s.vocab * s.hidden
    head = 0 if s.tied else embedding
    return ParamCount(embedding, attn, mlp, norms, head, embedding + attn + mlp + norms + head)
