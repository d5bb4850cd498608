"""The context a build uses: --context, else the target's runtime.context_length, else (or when the target's is
longer) the model's own; every refusal names the model's context and an option that exists."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgepack.context import choose_context
from edgepack.errors import UserError
from edgepack.plan import plan_for_target
from edgepack.targets import load_target

TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def test_the_cards_command_plans_at_the_models_context() -> None:
    """`edgepack build --target rpi5 tinyllama`: rpi5 asks 4096 tokens, TinyLlama holds 2048."""
    rpi5 = load_target("rpi5")
    choice = choose_context(TINYLLAMA, rpi5)
    assert (choice.tokens, choice.source, choice.requested, choice.model_context) == (2048, "model", 4096, 2048)
    assert choice.capped and "runtime.context_length (4096) is longer" in choice.reason
    assert choice.apply(rpi5).runtime.context_length == 2048
    plan = plan_for_target(TINYLLAMA, rpi5)
    assert plan.kv.context == 2048 and any("4096" in n for n in plan.notes) and plan.build is not None


def test_context_option_and_its_refusals() -> None:
    rpi5 = load_target("rpi5")
    choice = choose_context(TINYLLAMA, rpi5, 1024)
    assert (choice.tokens, choice.source) == (1024, "option") and choice.apply(rpi5).runtime.context_length == 1024
    with pytest.raises(UserError) as exc:
        choose_context(TINYLLAMA, rpi5, 4096)
    assert exc.value.fields["model_context"] == 2048 and "2048 tokens" in exc.value.message
    assert exc.value.hint is not None and "--context 2048" in exc.value.hint
    with pytest.raises(UserError, match="below 256"):
        choose_context(TINYLLAMA, rpi5, 64)


def test_a_target_that_fits_the_model_is_left_as_it_is() -> None:
    rpi5 = load_target("rpi5")
    short = replace(rpi5, runtime=replace(rpi5.runtime, context_length=1024))
    choice = choose_context(TINYLLAMA, short)
    assert (choice.tokens, choice.source) == (1024, "target") and choice.apply(short) is short
    own = replace(rpi5, runtime=replace(rpi5.runtime, context_length=0))
    choice = choose_context(TINYLLAMA, own)
    assert (choice.tokens, choice.source) == (2048, "model") and not choice.capped and choice.apply(own) is own
    # LiteRT: 0 is its 1024-token default KV cache, left as 0 (same manifest, same cache keys)
    android = load_target("android-arm64")
    lite = choose_context(TINYLLAMA, replace(android, runtime=replace(android.runtime, context_length=0)))
    assert (lite.tokens, lite.source) == (1024, "default")
