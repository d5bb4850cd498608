"""Fast multi-turn chats on the real SmolLM2 `host` bundle: the server's prompt cache reuses each conversation's
KV state and gives the same greedy replies as a server without it (the official `openai` client, a 6-turn chat);
n-gram speculative decoding on a reply that copies its prompt; the bench scenarios that measure both.
Speeds are measured in bench/ and docs/performance.md, not asserted here."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import cli, envelope, has, runner_core
from .test_serve import free_port, wait_healthy

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not has("openai"), reason="needs the openai client (the [dev] extra)")]

scenarios = runner_core("edgepack_scenarios")


@contextlib.contextmanager
def serving(bundle: Path, *extra: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(bundle), "--addr", f"127.0.0.1:{port}",
                             "--metrics", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def metrics(port: int) -> dict[str, float]:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return {k: float(v) for k, v in re.findall(r"^(edgepack_prompt_\w+) (\S+)$", text, re.M)}


def chat(port: int, turns: int) -> list[str]:
    """A chat whose history grows with the server's own replies; even turns stream."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": scenarios.SYSTEM}]
    replies = []
    for t in range(turns):
        messages.append({"role": "user", "content": scenarios.QUESTION % scenarios.TOPICS[t]})
        if t % 2:
            stream = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0,
                                                    stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            text = client.chat.completions.create(model="m", messages=messages, max_tokens=24,
                                                  temperature=0).choices[0].message.content or ""
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
        time.sleep(0.5)  # a person reading: the server settles the reply meanwhile
    return replies


def test_a_kept_conversation_gives_the_replies_a_full_prefill_gives(smollm2_host_bundle: Path) -> None:
    with serving(smollm2_host_bundle, "--prompt-cache-slots", "0") as port:
        plain = chat(port, 6)
        none = metrics(port)
    with serving(smollm2_host_bundle, "--system", scenarios.SYSTEM) as port:
        kept = chat(port, 6)
        cache = metrics(port)
    assert kept == plain and len(set(plain)) == 6
    assert none["edgepack_prompt_tokens_reused_total"] == 0 and none["edgepack_prompt_cache_slots"] == 0
    # Turn 1 reuses the system prompt computed at load; every later turn its whole history.
    assert cache["edgepack_prompt_tokens_reused_total"] > 3 * cache["edgepack_prompt_tokens_prefilled_total"], cache
    assert cache["edgepack_prompt_cache_kept"] == 1


def test_ngram_speculative_decoding_copies_a_prompt_with_the_models_tokens(smollm2_host_bundle: Path) -> None:
    outs = {}
    for mode in ("off", "ngram"):
        proc = cli("--json", "run", str(smollm2_host_bundle), "-p", scenarios.EXTRACT, "--max-tokens", "48",
                   "--speculative", mode)
        doc = envelope(proc)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[mode] = doc["result"]
        assert doc["result"]["speculative"] == mode
    assert outs["ngram"]["tokens"] == outs["off"]["tokens"]
    assert "Ada Lovelace" in outs["off"]["text"]


def test_the_extraction_scenario_reports_both_arms(smollm2_host_bundle: Path) -> None:
    proc = cli("--json", "bench", str(smollm2_host_bundle), "--scenario", "extraction", "--reps", "1")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = doc["result"]["runs"][0]
    assert run["scenario"] == "extraction" and run["same_tokens"]["ngram"] and run["unsupported"] == []
    assert {"decode_tokens_per_s", "decode_tokens_per_s_ngram", "ngram_speedup"} <= set(doc["result"]["summary"])
    # The chat scenario is played on the tiny LiteRT bundle (test_tflite.py); its ONNX arms by the SmolLM2 runs of
    # bench/ (docs/performance.md).


def test_a_runtime_without_the_features_plays_the_plain_arm_only() -> None:
    class Plain:
        def prepare(self, messages, text):  # type: ignore[no-untyped-def]
            return [len(m["content"]) for m in messages], len(messages)

        def generate(self, ids, n, max_new, sampling, on_text):  # type: ignore[no-untyped-def]
            return {"tokens": [1, 2], "text": "ok", "prefill_ms": 1.0 * n, "decode_tokens_per_s": 10.0}

    doc = scenarios.chat(Plain(), turns=3)
    assert doc["unsupported"] == ["prompt_cache", "ngram"] and list(doc["turns"][0]["ttft_ms"]) == ["plain"]
    assert doc["ttft_growth_plain"] == 3.0
    assert json.loads(json.dumps(doc)) == doc


def bundle_runtime(bundle: Path) -> Any:
    """The bundle's own run.py Runtime, loaded in this process (its runtime is this Python's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bundle_run_{id(bundle)}_{time.monotonic_ns()}", bundle / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.RUNTIME.load(2)
    return mod.RUNTIME


def test_a_conversation_outgrowing_its_slot_keeps_its_history(smollm2_host_bundle: Path) -> None:
    """The bundle's own Runtime in this process: a 700-token conversation fills its 1,024-token slot; while idle
    it moves to 2,048 tokens, and the next turn reuses all of it with the tokens a full prefill gives."""
    rt = bundle_runtime(smollm2_host_bundle)
    greedy = runner_core("edgepack_runner").GREEDY
    text = (Path(__file__).resolve().parents[2] / "edgepack" / "data").glob("*.txt")
    words = " ".join(next(iter(sorted(text))).read_text().split()[:2000])
    ids = rt.prepare(None, words)[0][:700]
    first = rt.generate(ids, len(ids), 24, greedy, lambda piece: None)
    slot = next(s for s in rt.cache.slots if s.state is not None)
    assert slot.size == 1024 and slot.grow
    steps = 0
    while rt.settle():
        steps += 1
    assert slot.size == 2048 and len(slot.exact) == 724 and not slot.pending and steps > 700 // 16
    more = ids + first["tokens"] + rt.prepare(None, " And then, in the second part of the text,")[0]
    kept = rt.generate(more, len(more), 24, greedy, lambda piece: None)
    assert kept["reused_tokens"] == 724
    rt.cache = type(rt.cache)(0, rt.cache.length)
    assert rt.generate(more, len(more), 24, greedy, lambda piece: None)["tokens"] == kept["tokens"]


class NoContinuation:
    """An onnxruntime-genai generator on an execution provider without continuous decoding (DirectML, some NPUs):
    appending to a sequence that is not empty fails as onnxruntime-genai fails there."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    def append_tokens(self, ids: Any) -> None:
        if self.gen.token_count():
            raise RuntimeError("Continuous decoding is not supported on the selected device type (test)")
        self.gen.append_tokens(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gen, name)


@pytest.mark.parametrize("where", ["request", "idle"])
def test_a_runtime_that_cannot_continue_a_sequence_answers_without_the_cache(smollm2_host_bundle: Path,
                                                                            where: str) -> None:
    rt = bundle_runtime(smollm2_host_bundle)
    greedy = runner_core("edgepack_runner").GREEDY
    make = rt._generator
    rt._generator = lambda params, adapter: NoContinuation(make(params, adapter))
    history = [{"role": "user", "content": scenarios.QUESTION % "depth"}]
    ids, n = rt.prepare(history, None)
    first = rt.generate(ids, n, 16, greedy, lambda piece: None)
    if where == "idle":
        assert rt.settle() is False  # the reply could not be appended: the cache is off, nothing is lost
    history += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And the salt?"}]
    ids, n = rt.prepare(history, None)
    second = rt.generate(ids, n, 16, greedy, lambda piece: None)
    assert second["reused_tokens"] == 0 and rt.cache.slots == []
    assert rt.cache.prefilled == len(ids) + first["prompt_tokens"]  # the counters carried over
    rt._generator = make
    assert rt.generate(ids, n, 16, greedy, lambda piece: None)["tokens"] == second["tokens"]
