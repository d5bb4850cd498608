"""The shared runner core's request rules, with a stand-in runtime (the real ones: tests/integration/test_serve.py)."""

from __future__ import annotations

import pytest

from ..conftest import runner_core

core = runner_core("edgepack_server")


class Words:
    """One token per word, 2 per message of markup; a context of 32."""

    name, threads, max_new_tokens, context_length = "w", 0, 8, 32

    def prepare(self, messages, text):  # type: ignore[no-untyped-def]
        if messages is None:
            return text, len(text.split())
        return messages, sum(len(m["content"].split()) + 2 for m in messages)


def turn(role: str, words: int) -> dict[str, str]:
    return {"role": role, "content": " ".join(["w"] * words)}


def test_old_turns_are_dropped_but_the_system_prompt_and_the_last_turn_stay() -> None:
    msgs = [turn("system", 4), turn("user", 10), turn("assistant", 10), turn("user", 6)]
    kept, n, dropped = core.fit_messages(Words(), msgs)
    assert dropped == 1 and kept == [msgs[0], msgs[2], msgs[3]] and n == 26
    kept, n, dropped = core.fit_messages(Words(), [*msgs[:3], turn("user", 16)])
    assert dropped == 2 and kept == [msgs[0], turn("user", 16)] and n == 24


def one_at_a_time(rt: Words, msgs: list[dict[str, str]]) -> tuple[list[dict[str, str]], int, int]:
    """The rule as written: drop the oldest turn after the system prompt until the chat fits (the old code)."""
    msgs, dropped = list(msgs), 0
    while True:
        kept, n = rt.prepare(msgs, None)
        if n < rt.context_length or len(msgs) - (msgs[0]["role"] == "system") <= 1:
            return kept, n, dropped
        del msgs[1 if msgs[0]["role"] == "system" else 0]
        dropped += 1


def test_trimming_keeps_what_dropping_one_turn_at_a_time_keeps() -> None:
    import random

    rng = random.Random(7)
    for _ in range(300):
        msgs = ([turn("system", rng.randint(0, 6))] if rng.random() < 0.5 else []) + \
            [turn(rng.choice(["user", "assistant"]), rng.randint(0, 12)) for _ in range(rng.randint(1, 12))]
        want = one_at_a_time(Words(), msgs)
        if want[1] >= Words.context_length:
            with pytest.raises(core.ApiError):
                core.fit_messages(Words(), msgs)
        else:
            assert core.fit_messages(Words(), msgs) == want, msgs


class Counting(Words):
    context_length = 4096

    def __init__(self) -> None:
        self.calls, self.words = 0, 0

    def prepare(self, messages, text):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.words += sum(len(m["content"].split()) for m in messages)
        return super().prepare(messages, text)


def test_a_chat_of_4000_turns_is_tokenized_about_once() -> None:
    """The issue's chat: 4,000 short turns. Dropping one turn per re-tokenization read ~8 million words (quadratic);
    now the whole chat once, then tries of at most twice the context."""
    msgs = [turn("system", 5)] + [turn("user" if i % 2 else "assistant", 8) for i in range(4000)]
    rt = Counting()
    kept, n, dropped = core.fit_messages(rt, msgs)
    assert n < rt.context_length and kept[0] == msgs[0] and kept[-1] is msgs[-1] and dropped == len(msgs) - len(kept)
    one_more = msgs[:1] + msgs[len(msgs) - len(kept):]
    assert Words().prepare(one_more, None)[1] >= rt.context_length  # as few turns dropped as possible
    chat_words = sum(len(m["content"].split()) for m in msgs)
    assert rt.words <= chat_words + 30 * rt.context_length and rt.calls <= 30, (rt.calls, rt.words)


def test_trimming_stops_when_the_client_has_gone() -> None:
    rt = Counting()
    msgs = [turn("user", 8) for _ in range(4000)]
    with pytest.raises(core._Gone):
        core.fit_messages(rt, msgs, gone=lambda: True)
    assert rt.calls == 1  # the whole chat, then nothing more


def test_a_last_turn_that_alone_does_not_fit_is_a_400() -> None:
    with pytest.raises(core.ApiError) as err:
        core.fit_messages(Words(), [turn("system", 2), turn("user", 40)])
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [turn("user", 1)], "max_tokens": 0}, "max_tokens"),
    ({"messages": [turn("user", 1)], "max_tokens": 33}, "max_tokens"),
    ({"messages": [turn("user", 1)], "temperature": 3}, "temperature"),
    ({"messages": [turn("user", 1)], "n": 2}, "n"), ({"messages": [turn("user", 1)], "stop": ["a"] * 5}, "stop"),
    ({"prompt": 3}, "prompt"),
])
def test_bad_fields_name_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(core.ApiError) as err:
        core.Request(body, "messages" in body, Words())
    assert err.value.status == 400 and err.value.param == param


def test_greedy_unless_a_temperature_is_asked_for() -> None:
    assert core.Request({"messages": [turn("user", 1)]}, True, Words()).sampling == core.GREEDY
    assert core.Request({"messages": [turn("user", 1)], "temperature": 0}, True, Words()).sampling == core.GREEDY
    s = core.Request({"messages": [turn("user", 1)], "temperature": 0.8, "seed": 3}, True, Words()).sampling
    assert s["sample"] and s["temperature"] == 0.8 and s["seed"] == 3


def test_pick_token_greedy_top_k_top_p_and_seed() -> None:
    import numpy as np

    runner = runner_core("edgepack_runner")
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0], np.float32)
    rng = np.random.default_rng(0)
    assert runner.pick_token(logits, runner.GREEDY, rng) == 1
    sample = {"sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 2, "seed": 7}
    picks = {runner.pick_token(logits, sample, rng) for _ in range(200)}
    assert picks == {1, 2}  # top-k 2: only the two best, both drawn
    narrow = {**sample, "top_k": 0, "top_p": 0.01}
    assert {runner.pick_token(logits, narrow, rng) for _ in range(50)} == {1}  # nucleus of one token
    hot = {**sample, "top_k": 0, "temperature": 2.0}
    a = [runner.pick_token(logits, hot, np.random.default_rng(42)) for _ in range(1)]
    runs = [[runner.pick_token(logits, hot, g) for _ in range(30)] for g in (np.random.default_rng(42),
                                                                             np.random.default_rng(42))]
    assert runs[0] == runs[1] and len(set(runs[0])) >= 3 and a[0] == runs[0][0]  # a seed reproduces the draw
