"""The runner core's prompt cache (edgepack_runner.PromptCache) and what the server makes of it: which slot a
request gets and how much of its prompt it keeps, the replies settled while the server is idle, the /metrics
counters, and the `speculative` request field. The real runtime's reuse is proven on a real bundle in
tests/integration/test_prompt_cache.py; these drive the bookkeeping with a fake runtime."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

import pytest

from ..conftest import runner_core

runner = runner_core("edgepack_runner")
core = runner_core("edgepack_server")


def test_a_slot_keeps_the_longest_common_prefix_and_never_the_whole_prompt() -> None:
    cache = runner.PromptCache(2, 4096)
    slot, n = cache.take("k", [1, 2, 3], 10)
    assert n == 0 and slot is not None
    slot.state, slot.size = object(), 1024
    cache.done(slot, "k", [1, 2, 3], [7, 8])
    assert slot.exact == [1, 2, 3] and slot.pending == [7, 8]
    again, n = cache.take("k", [1, 2, 3, 7, 8, 9], 20)
    assert again is slot and n == 3  # only prefilled K/V is reused: the reply is pending until settled
    slot.exact, slot.pending = [1, 2, 3, 7, 8], []
    _, n = cache.take("k", [1, 2, 3, 7, 8], 20)
    assert n == 4  # an identical prompt still appends its last token, for the next logits


def test_another_kind_of_request_or_a_seeded_sample_does_not_reuse() -> None:
    cache = runner.PromptCache(1, 4096)
    slot, _ = cache.take("greedy", [1, 2, 3], 10)
    slot.state, slot.size = object(), 1024
    cache.done(slot, "greedy", [1, 2, 3], [])
    assert cache.take(("sample", 0.7), [1, 2, 3, 4], 10)[1] == 0
    assert cache.take("greedy", [1, 2, 3, 4], 10, reusable=False)[1] == 0
    assert cache.take("greedy", [1, 2, 3, 4], 10)[1] == 3


def test_a_request_longer_than_a_slot_frees_the_least_recently_used_one() -> None:
    cache = runner.PromptCache(2, 300)
    a, _ = cache.take("k", [1], 10)
    a.state, a.size = object(), 300
    b, _ = cache.take("k", [2], 10)
    assert b is not a  # an empty slot before evicting a kept one
    b.state, b.size = object(), 300
    cache.take("k", [1, 5], 10)  # touches a
    slot, n = cache.take("k", [9] * 200, 400)
    assert (slot, n) == (None, 0)
    assert b.state is None and a.state is not None  # memory stays what the plan counted: one slot's KV freed


def test_slot_allocations_double_from_a_page_up_to_the_slot_length() -> None:
    cache = runner.PromptCache(1, 4096)
    assert [cache.size_for(n) for n in (10, 1024, 1025, 3000, 5000)] == [1024, 1024, 2048, 4096, 4096]
    assert runner.PromptCache(1, 600).size_for(10) == 600


def test_pending_reply_tokens_stop_at_the_slot_allocation() -> None:
    cache = runner.PromptCache(1, 4096)
    slot, _ = cache.take("k", [1] * 1000, 1030)
    slot.state, slot.size = object(), 1024
    cache.done(slot, "k", [1] * 1000, list(range(30)))
    assert len(slot.pending) == 24 and cache.unsettled() is slot


class Settling:
    """A runtime whose generate leaves a reply to settle; settle() records each call and whether a request was
    generating meanwhile (it must never be)."""

    name, threads, max_new_tokens, context_length = "settling", 0, 4, 64
    speculative_modes = ("off", "ngram")

    def __init__(self) -> None:
        self.cache = runner.PromptCache(1, 64)
        self.generating = False
        self.settled: list[bool] = []
        self.pending = 0
        self.warmed: list[Any] = []
        self.asked: list[Any] = []

    def load(self, threads: int) -> None:
        pass

    def warm(self, system: Any) -> int:
        self.warmed.append(system)
        return 0

    def prepare(self, messages, text):  # type: ignore[no-untyped-def]
        return [1, 2, 3], 3

    def generate(self, prepared, n, max_new, sampling, on_text, **kw):  # type: ignore[no-untyped-def]
        self.asked.append(kw.get("speculative"))
        self.generating = True
        try:
            on_text(" hi")
            self.cache.count(2, 1)
        finally:
            self.generating = False
        self.pending = 3
        return {"new_tokens": 1, "stopped": "eos"}

    def settle(self) -> bool:
        self.settled.append(self.generating)
        time.sleep(0.01)
        self.pending -= 1
        return self.pending > 0


def _post(port: int, body: dict) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body))
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}")


@pytest.fixture()
def served() -> Any:
    rt = Settling()
    model = core.Model(rt, 8, system="Be brief.")
    model.load(0)
    listener = core.listen_tcp("127.0.0.1", 0)
    listener.listen(16)
    server = core.Server(listener, core.bind_handler(model, None, True))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield rt, listener.getsockname()[1]
    server.shutdown()
    server.close()


def test_the_server_warms_the_system_prompt_and_settles_replies_between_requests(served: Any) -> None:
    rt, port = served
    assert rt.warmed == ["Be brief."]
    for _ in range(2):
        assert _post(port, {"messages": [{"role": "user", "content": "x"}]})[0] == 200
        deadline = time.monotonic() + 10
        while rt.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.pending == 0
    assert len(rt.settled) == 6 and not any(rt.settled)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    assert "edgepack_prompt_tokens_reused_total 4" in text
    assert "edgepack_prompt_tokens_prefilled_total 2" in text
    assert "edgepack_prompt_cache_slots 1" in text


def test_speculative_is_a_request_option_the_bundle_must_have(served: Any) -> None:
    rt, port = served
    assert _post(port, {"messages": [{"role": "user", "content": "x"}], "speculative": "ngram"})[0] == 200
    assert rt.asked == ["ngram"]
    status, body = _post(port, {"messages": [{"role": "user", "content": "x"}], "speculative": "draft"})
    assert status == 400 and body["error"]["param"] == "speculative"
    assert "off, ngram" in body["error"]["message"]


def test_a_conversation_filling_its_slot_moves_to_a_larger_one_while_idle() -> None:
    cache = runner.PromptCache(1, 4096, reserve=384)
    slot, _ = cache.take("k", [1] * 600, 624)
    slot.state, slot.size = object(), cache.size_for(624)
    cache.done(slot, "k", [1] * 600, [2] * 24)
    assert not slot.grow  # 600 + 24 + 384 fit in 1024
    cache.done(slot, "k", [1] * 700, [2] * 24)
    assert slot.grow and cache.unsettled() is slot
    tokens = cache.regrow(slot)
    assert tokens == [1] * 700 + [2] * 24 and slot.pending == tokens and slot.exact == []
    assert slot.state is None and slot.size == 2048 and not slot.grow
    full = runner.PromptCache(1, 1024, reserve=384)
    s, _ = full.take("k", [1] * 700, 724)
    s.state, s.size = object(), 1024
    full.done(s, "k", [1] * 700, [2] * 24)
    assert not s.grow  # already the slot's whole length


def test_claim_goes_on_from_a_kept_state_or_empties_the_slot() -> None:
    cache = runner.PromptCache(1, 4096)
    slot, n, keep = cache.claim("k", [1, 2, 3], 10, seeded=False)
    assert (n, keep, slot.size) == (0, False, 1024)
    slot.state = object()
    cache.done(slot, "k", [1, 2, 3], [])
    assert cache.claim("k", [1, 2, 3, 4], 10, seeded=False)[1:] == (3, True)
    again, n, keep = cache.claim("k", [1, 2, 3, 4], 10, seeded=True)  # same seed, same text: a new state
    assert (again, n, keep) == (slot, 0, False) and slot.state is None
    assert runner.PromptCache(1, 600, page=600).claim("k", [1], 10, seeded=False)[0].size == 600
