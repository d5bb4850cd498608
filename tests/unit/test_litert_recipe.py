"""LiteRT per-layer rules: op scopes as litert-torch 0.10 really exports them, rules that must match."""

from __future__ import annotations

import re

import pytest

from edgepack.backends import check_profile
from edgepack.backends.litert_recipe import Op, classify, plan
from edgepack.errors import TargetError, UserError
from edgepack.targets import LayerRule, layer_rules

M = "litert_torch.generative.utilities.converter.ExportableModule/__main__._decoder_class.<locals>.Decoder_module/"
L = "litert_torch.generative.layers."


def block(i: int) -> str:
    return f"{M}{L}attention.TransformerBlock_{i}/"


# Scopes copied from SmolLM2-135M's float .tflite: w3's scope also names w1 (a fused tensor name), qkv's own first
# name is the attention function, not its Linear.
SCOPES = {
    ("EMBEDDING_LOOKUP", f"{M}torch.nn.modules.sparse.Embedding_tok_embedding;2;"): ("embedding", None),
    ("FULLY_CONNECTED", f"{block(0)}{L}attention.CausalSelfAttention_atten_func;;{block(0)}{L}attention."
                        "CausalSelfAttention_atten_func/torch.nn.modules.linear.Linear_qkv_projection;1;"):
        ("attention.qkv", 0),
    ("FULLY_CONNECTED", f"{block(12)}{L}attention.CausalSelfAttention_atten_func/torch.nn.modules.linear."
                        "Linear_output_projection;2;"): ("attention.output", 12),
    ("FULLY_CONNECTED", f"{block(3)}{L}feed_forward.GatedFeedForward_ff/torch.nn.modules.linear.Linear_w1;1;"):
        ("feedforward.gate", 3),
    ("FULLY_CONNECTED", f"{block(3)}{L}feed_forward.GatedFeedForward_ff/torch.nn.modules.linear.Linear_w3;;"
                        f"{block(3)}{L}feed_forward.GatedFeedForward_ff/torch.nn.modules.linear.Linear_w1;1;"):
        ("feedforward.up", 3),
    ("FULLY_CONNECTED", f"{block(29)}{L}feed_forward.GatedFeedForward_ff/torch.nn.modules.linear.Linear_w2;1;"):
        ("feedforward.down", 29),
    ("FULLY_CONNECTED", "prefill_128_logits_output;"): ("head", None),
}


@pytest.mark.parametrize(("kind", "scope"), list(SCOPES))
def test_every_exported_weight_op_has_its_part_and_block(kind: str, scope: str) -> None:
    assert classify(kind, scope) == SCOPES[(kind, scope)]


def test_litert_torch_own_per_layer_regexes_match_none_of_these_scopes() -> None:
    """What edgepack works around: litert-torch 0.10's translate_recipe regexes (transformer_blocks[i])."""
    theirs = [r"transformer_blocks\[3\]/litert_torch.generative.layers.feed_forward",
              "transformer_block/litert_torch.generative.layers.attention"]
    assert not any(re.search(r, s) for r in theirs for _, s in SCOPES)


def ops(blocks: int = 2, tied: bool = True) -> list[Op]:
    out = [Op(0, 0, "EMBEDDING_LOOKUP", "emb", "embedding", None, 1),
           Op(0, 99, "FULLY_CONNECTED", "head", "head", None, 1 if tied else 2)]
    for b in range(blocks):
        for j, part in enumerate(("attention.qkv", "attention.output", "feedforward.gate", "feedforward.up",
                                  "feedforward.down")):
            out.append(Op(0, 1 + b * 5 + j, "FULLY_CONNECTED", f"b{b}-{part}", part, b, 10 + b * 5 + j))
    return out


def test_later_rules_win_and_the_rest_keeps_the_default() -> None:
    rules = (LayerRule(("feedforward.down",), "weight_only"), LayerRule(("feedforward.down",), "float", (1,)))
    modes = {o.scope: m for o, m in plan(ops(), "dynamic", rules).items()}
    assert modes["b0-feedforward.down"] == "weight_only" and modes["b1-feedforward.down"] == "float"
    assert modes["b0-attention.qkv"] == "dynamic" and modes["head"] == "dynamic"


def test_a_rule_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(UserError, match=r"matches no op of this model: it has no block \[7\]"):
        plan(ops(), "dynamic", (LayerRule(("feedforward.down",), "weight_only", (1, 7)),))
    with pytest.raises(UserError, match="matches no op"):  # a part this model does not have
        plan([o for o in ops() if o.part != "head"], "dynamic", (LayerRule(("head",), "float"),))


def test_tied_embedding_and_head_need_one_mode() -> None:
    with pytest.raises(UserError, match="share one weight tensor"):
        plan(ops(tied=True), "dynamic", (LayerRule(("head",), "float"),))
    modes = plan(ops(tied=False), "dynamic", (LayerRule(("head",), "float"),))
    assert {o.part: m for o, m in modes.items()}["head"] == "float"


@pytest.mark.parametrize(("raw", "message"), [
    ([{"parts": ["mlp.down"], "mode": "float"}], "unknown parts ['mlp.down']"),
    ([{"parts": ["head"], "mode": "int4"}], "mode 'int4' is not one of"),
    ([{"parts": ["head"], "mode": "float", "blocks": [-1]}], "blocks must be a list"),
    ([{"parts": ["head"], "mode": "float", "layers": [1]}], "unknown keys ['layers']"),
    ([{"mode": "float"}], "needs parts"),
])
def test_bad_rules_name_the_entry(raw: list, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TargetError, match=r"quantize.litert_layers\[0\]") as err:
        layer_rules(raw)
    assert message in str(err.value)


def test_a_target_file_carries_rules_and_they_need_tflite_int8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgepack.targets import load_target, shipped_dir

    shipped = (shipped_dir("targets") / "android-arm64.toml").read_text()
    assert load_target("android-arm64").quantize.litert_layers == (
        LayerRule(("feedforward.down",), "weight_only", "outliers"),)
    text = re.sub(r"(?m)^litert_layers = .*$",
                  'litert_layers = [{ parts = ["feedforward.down"], blocks = [0], mode = "weight_only" }]', shipped)
    good = tmp_path / "a.toml"
    good.write_text(text)
    assert load_target(str(good)).quantize.litert_layers == (LayerRule(("feedforward.down",), "weight_only", (0,)),)
    bad = tmp_path / "b.toml"
    bad.write_text(re.sub(r'scheme = "int8"\nalgorithm = "\w+"', 'scheme = "int4"', text))
    with pytest.raises(TargetError, match="litert_layers"):
        check_profile(load_target(str(bad)))  # LiteRT's fields: the exporter's rules
    bad.write_text(shipped.replace('algorithm = "smoothquant"', 'algorithm = "default"'))
    with pytest.raises(TargetError, match='"outliers" are found by SmoothQuant'):
        check_profile(load_target(str(bad)))


def test_a_tune_candidate_that_inherits_rules_it_cannot_use_is_refused_before_a_tune(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgepack.backends import check_candidates
    from edgepack.targets import load_target, shipped_dir

    text = (shipped_dir("targets") / "android-arm64.toml").read_text().replace(
        '  { name = "int4-b32", scheme = "int4", algorithm = "default", block_size = 32, litert_layers = [] },',
        '  { name = "int4-b32", scheme = "int4", algorithm = "default", block_size = 32 },')
    t = tmp_path / "t.toml"
    t.write_text(text)
    profile = load_target(str(t))  # a plain build never builds the candidates: loading stays fine
    with pytest.raises(TargetError, match="tune candidate 'int4-b32'") as err:
        check_candidates(profile)
    assert err.value.fields["field"] == "tune.candidates.int4-b32"
