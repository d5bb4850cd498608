"""Helpers for tests (ours and users'): tiny random checkpoints that build in seconds.

`make_tiny(family, folder)` saves a random model of one family (edgepack/data/families.toml) whose config has
that family's real shape (rope type and scaling, sliding-window layout, tied or untied embeddings, head_dim,
softcapping, norms), only with tiny widths, so a test proves the exporter handles what released models carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.errors import require

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Sliding window of the tiny windowed families: small enough that a test prompt runs past it.
TINY_WINDOW = 16
# Families whose ONNX bundles are capped at the window (backends/onnx.py WINDOW_AS_FULL) need room for the gate.
TINY_CAPPED_WINDOW = 256


def _longrope_factors(n: int, top: float) -> list[float]:
    return [round(1.0 + (top - 1.0) * i / max(n - 1, 1), 4) for i in range(n)]


# family id → (transformers config class, config fields). Widths are tiny; everything else is the family's
# released shape (comments name the model each one mirrors).
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # SmolLM2 / TinyLlama: plain RoPE, tied (SmolLM2) embeddings.
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    # Llama 3.2 1B: llama3 rope scaling (factor 32 over 8192 positions), tied embeddings. Scaled down like the
    # widths (factor 8 over 64) so that the scaled frequencies matter inside the gate's 512-token windows.
    "llama3": ("LlamaConfig", {
        "tie_word_embeddings": True, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    # Mistral 7B v0.3: no sliding window, untied.
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None, "head_dim": 16,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Mistral 7B v0.1: a sliding window on every layer.
    "mistral-window": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": TINY_CAPPED_WINDOW,
                                         "head_dim": 16}),
    # Qwen2.5 0.5B: qkv bias, tied, theta 1e6, no sliding window.
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "use_sliding_window": False,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Qwen3 0.6B: q/k RMSNorm, explicit head_dim with heads × head_dim ≠ hidden, tied.
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 32, "use_sliding_window": False,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Phi-3-mini-4k: fused qkv/gate_up, untied, max == original positions.
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "max_position_embeddings": 4096,
                            "original_max_position_embeddings": 4096, "sliding_window": None}),
    # Phi-3-mini-4k-instruct as released: sliding_window 2047 over 4096 positions.
    "phi3-window": ("Phi3Config", {"tie_word_embeddings": False, "max_position_embeddings": 4096,
                                   "original_max_position_embeddings": 4096,
                                   "sliding_window": TINY_CAPPED_WINDOW}),
    # Phi-3.5-mini / Phi-4-mini: LongRoPE (short/long factors, 4k → 128k).
    "phi3-longrope": ("Phi3Config", {
        "tie_word_embeddings": False, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "sliding_window": None,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                            "short_factor": _longrope_factors(8, 1.1), "long_factor": _longrope_factors(8, 4.0),
                            "original_max_position_embeddings": 4096}}),
    # Gemma 2B: head_dim independent of hidden, gelu-tanh MLP, tied, scaled embeddings.
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True, "head_dim": 32, "hidden_act": "gelu_pytorch_tanh"}),
    # Gemma 2 2B: alternating sliding/full layers, attention and final logit softcapping, tied.
    "gemma2": ("Gemma2Config", {
        "tie_word_embeddings": True, "head_dim": 32, "sliding_window": TINY_WINDOW, "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention"]}),
    # Gemma 3 270M/1B text: five sliding layers to one full, local/global rope bases, q/k norm, tied.
    "gemma3": ("Gemma3TextConfig", {
        "tie_word_embeddings": True, "head_dim": 32, "sliding_window": TINY_WINDOW, "query_pre_attn_scalar": 32,
        "num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    # SmolLM3 3B: every fourth layer without RoPE (NoPE), tied.
    "smollm3": ("SmolLM3Config", {"tie_word_embeddings": True, "num_hidden_layers": 4,
                                  "no_rope_layer_interval": 4, "use_sliding_window": False}),
    # Granite 3.x: embedding/residual/attention multipliers and logits scaling, tied.
    "granite": ("GraniteConfig", {"tie_word_embeddings": True, "embedding_multiplier": 12.0,
                                  "residual_multiplier": 0.22, "attention_multiplier": 0.0156,
                                  "logits_scaling": 8.0}),
}


# Qwen2/Qwen3's own pre-tokenizer: transformers 5 rebuilds their tokenizers with this split whatever the
# tokenizer.json says, so a tiny Qwen must use it too or the two disagree.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def _tokenizer(folder: Path, vocab: int, text: str | None, qwen: bool = False) -> int:
    """A small byte-level BPE tokenizer trained on the held-out text; returns its vocabulary size."""
    tokenizers = require("tokenizers", "onnx", "Making a tiny test model")
    from edgepack.quality.texts import heldout

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    pre = tokenizers.pre_tokenizers
    tok.pre_tokenizer = (pre.Sequence([pre.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
                                       pre.ByteLevel(add_prefix_space=False, use_regex=False)]) if qwen
                         else pre.ByteLevel(add_prefix_space=False))
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text or heldout().text], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE}, indent=2))
    return int(tok.get_vocab_size())


def make_tiny(family: str, folder: Path, *, vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0,
              text: str | None = None, **overrides: Any) -> Path:
    """A random model of `family` (a TINY_CONFIGS key) with its own tokenizer, saved as a Hugging Face folder."""
    torch = require("torch", "onnx", "Making a tiny test model")
    transformers = require("transformers", "onnx", "Making a tiny test model")
    cls_name, shape = TINY_CONFIGS[family]
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer(folder, vocab, text, qwen=cls_name in ("Qwen2Config", "Qwen3Config"))
    fields: dict[str, Any] = {
        "vocab_size": n_vocab, "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **shape, **overrides}
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path, *, vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0,
                    text: str | None = None, tie: bool = True) -> Path:
    """A random Llama with its own small byte-level BPE tokenizer, saved as a Hugging Face folder."""
    return make_tiny("llama", folder, vocab=vocab, hidden=hidden, layers=layers, seed=seed, text=text,
                     tie_word_embeddings=tie)


# Released models' exact shapes (config.json as on the hub, minus the weights), for the `scale` tests and
# bench/build_memory.py: random weights, so only memory, time and size mean anything, not quality.
REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": ("LlamaConfig", {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    # microsoft/Phi-3.5-mini-instruct: fused qkv/gate_up, LongRoPE 4k → 128k, untied
    "phi-3.5-mini": ("Phi3Config", {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "sliding_window": 262144,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                            "short_factor": _longrope_factors(48, 1.1), "long_factor": _longrope_factors(48, 4.0)}}),
    # Qwen/Qwen2.5-1.5B-Instruct: qkv biases, a 151,936-token vocabulary, tied
    "qwen2.5-1.5b": ("Qwen2Config", {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # google/gemma-3-1b-it: a 262,144-token vocabulary (30 % of the parameters), 5 sliding layers to 1 full, tied
    "gemma-3-1b": ("Gemma3TextConfig", {
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "sliding_window": 512, "query_pre_attn_scalar": 256,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    # meta-llama/Llama-3.2-3B-Instruct: llama3 rope scaling, a 128,256-token vocabulary, tied
    "llama-3.2-3b": ("LlamaConfig", {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
}

_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def make_real_shape(name: str, folder: Path, *, seed: int = 0, dtype: str = "bfloat16",
                    shard_bytes: int = 2 << 30) -> Path:
    """A random checkpoint with a released model's exact config (a REAL_SHAPES key) in the hub layout: sharded
    safetensors with an index, plus a small byte-level BPE tokenizer (its ids are a prefix of the vocabulary).

    Tensors are generated and written one at a time (the safetensors layout is written by hand), so making a
    3.8B checkpoint takes about one tensor of memory: the point of these checkpoints is measuring memory."""
    torch = require("torch", "onnx", "Making a real-shape test model")
    transformers = require("transformers", "onnx", "Making a real-shape test model")
    import struct

    cls_name, shape = REAL_SHAPES[name]
    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer(folder, 512, None)
    config = getattr(transformers, cls_name)(bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    config.dtype = dtype
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
    config.architectures = [type(skeleton).__name__]
    del skeleton
    torch_dtype = getattr(torch, dtype)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, dims in tensors:
        n = item * int(torch.Size(dims).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, dims))
        size += n
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dims in shard:
            n = item * int(torch.Size(dims).numel())
            header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(dims),
                           "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = fname
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with (folder / fname).open("wb") as fh:
            fh.write(struct.pack("<Q", len(head)) + head)
            for key, dims in shard:
                # Norm weights are ones (as initialised); everything else N(0, 0.02), as transformers inits.
                t = (torch.ones(dims, dtype=torch_dtype) if len(dims) == 1 and key.endswith("norm.weight")
                     else torch.randn(dims, generator=gen).mul_(0.02).to(torch_dtype))
                fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
                del t
        total += offset
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    return folder
