"""Helpers for tests (ours and users'): tiny random checkpoints that build in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.errors import require

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_llama(folder: Path, *, vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0,
                    text: str | None = None, tie: bool = True) -> Path:
    """A random Llama with its own small byte-level BPE tokenizer, saved as a Hugging Face folder."""
    tokenizers = require("tokenizers", "onnx", "Making a tiny test model")
    torch = require("torch", "onnx", "Making a tiny test model")
    transformers = require("transformers", "onnx", "Making a tiny test model")
    from edgepack.quality.texts import heldout

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text or heldout().text], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_bos_token": False,
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE}, indent=2))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder
