"""The shared smoke test's checks and the SmokeResult contract, with stand-in runtimes (fast). The real runtimes run
it in tests/integration (test_build_tiny, test_litert_smollm2, test_finetunes, test_deploy)."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from edgepack.bundle import SmokeResult

from ..conftest import runner_core

smoke = runner_core("smoke_test")
VOCAB = 16


class Chain:
    """A runtime whose model always predicts token (t + 1) % VOCAB after t, with logits."""

    name, runtime, threads = "chain", "stand-in", 0

    def load(self, threads: int) -> None:
        self.loaded = True

    def from_ids(self, ids: list[int]) -> list[int]:
        return list(ids)

    def prepare(self, messages: Any, text: Any) -> tuple[list[int], int]:
        return [1], 1

    def logits(self, ids: list[int]) -> np.ndarray:
        out = np.zeros((len(ids), VOCAB), np.float32)
        for i, t in enumerate(ids):
            out[i, (t + 1) % VOCAB] = 5.0
        return out

    def generate(self, ids: list[int], n_prompt: int, max_new: int, sampling: dict, on_text: Any) -> dict:
        new = [(ids[-1] + 1 + i) % VOCAB for i in range(max_new)]
        return {"text": " ".join(map(str, new)), "new_tokens": len(new), "prefill_ms": 1.0,
                "decode_tokens_per_s": 100.0}


class Scorer(Chain):
    """The same model through a runtime that only scores (as LiteRT-LM): no logits."""

    def __getattribute__(self, name: str) -> Any:
        if name == "logits":
            raise AttributeError(name)
        return super().__getattribute__(name)

    def score(self, ids: list[int]) -> list[float]:
        lp = smoke.log_softmax(Chain.logits(self, ids))
        return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def spec(**kw: Any) -> dict[str, Any]:
    rt = Chain()
    check = [3, 4, 5, 6, 7, 8]
    lp = smoke.log_softmax(rt.logits(check))
    s = {"schema": 1, "tokens": 4, "prompt_ids": [1, 2], "golden_tokens": [3, 4, 5], "golden_checked": [True] * 3,
         "golden_logp": [float(lp[0, 4])] * 3, "golden_logp_tol": 0.5, "check_ids": check,
         "build_ppl": float(np.exp(-lp[np.arange(5), check[1:]].mean())),
         "build_top1": [4, 5, 6, 7, 8], "max_ppl_drift_pct": 3.0, "min_top1": 0.9, "task_checks": None}
    return {**s, **kw}


def run_with(rt: Any, s: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    sys.modules["run"] = types.SimpleNamespace(RUNTIME=rt)  # type: ignore[assignment]
    try:
        return smoke.check(s, None, None)  # type: ignore[no-any-return]
    finally:
        del sys.modules["run"]


@pytest.mark.parametrize("rt", [Chain(), Scorer()], ids=["logits", "scoring"])
def test_a_runtime_that_reproduces_the_build_passes(rt: Any) -> None:
    code, res = run_with(rt, spec())
    assert code == 0 and res["ok"] and res["problems"] == [], res
    assert res["golden_match"] == res["golden_required"] == 3 and abs(res["ppl_drift_pct"]) < 1e-6
    assert res["schema"] == 1 and res["runtime"] == "stand-in" and res["tokens"] >= 3
    assert ("top1_vs_build" in res) == (not isinstance(rt, Scorer))


def test_wrong_golden_tokens_fail_with_the_positions() -> None:
    code, res = run_with(Chain(), spec(golden_tokens=[3, 4, 9]))
    assert code == 1 and not res["ok"] and res["golden_match"] == 2
    assert "at golden positions [2] the device picked [5] but the build recorded [9]" in res["error"]


def test_scores_off_by_more_than_the_tolerance_fail() -> None:
    code, res = run_with(Scorer(), spec(golden_logp=[-3.0, -3.0, -3.0]))
    assert code == 1 and res["golden_match"] == 0 and "log-probabilities" in res["error"]


def test_perplexity_drift_and_top1_are_each_named() -> None:
    s = spec()
    code, res = run_with(Chain(), spec(build_ppl=s["build_ppl"] * 1.2, build_top1=[0, 0, 0, 0, 0]))
    assert code == 1 and len(res["problems"]) == 2
    assert "perplexity on the check text" in res["problems"][0] and "top-1 agreement" in res["problems"][1]


def test_task_checks_below_the_build_fail() -> None:
    checks = {"file": "c.jsonl", "build_passed": 2, "allowed_drop": 0, "items": [
        {"id": "yes", "kind": "contains", "value": "3 4", "prompt_ids": [2], "max_tokens": 3, "float_text": ""},
        {"id": "no", "kind": "regex", "value": "^9", "prompt_ids": [2], "max_tokens": 3, "float_text": ""}]}
    code, res = run_with(Chain(), spec(task_checks=checks))
    assert code == 1 and (res["checks_passed"], res["checks_failed"]) == (1, ["no"])
    assert "task checks: 1/2 passed here, 2 at build" in res["error"]


def test_an_unvalidated_bundle_checks_only_that_it_generates() -> None:
    code, res = run_with(Chain(), spec(prompt_ids=[], golden_tokens=[], golden_checked=[], check_ids=[],
                                       build_ppl=None))
    assert code == 0 and res["golden_required"] == 0 and res["tokens"] == 4


def test_a_model_that_does_not_load_exits_2_with_the_reason() -> None:
    class Broken(Chain):
        def load(self, threads: int) -> None:
            raise OSError("libonnxruntime.so: cannot open shared object file")

    code, res = run_with(Broken(), spec())
    assert code == 2 and not res["ok"] and "libonnxruntime.so" in res["error"]


def test_smoke_result_contract() -> None:
    ok = SmokeResult.parse('noise from the runtime\n{"schema": 1, "ok": true, "golden_match": 3, '
                           '"golden_required": 3, "tokens_per_s": 12.5}\n', 0)
    assert ok.ok and ok.golden_match == 3 and ok.tokens_per_s == 12.5 and ok.error == ""
    # The JSON says ok but the process failed afterwards: not ok.
    late = SmokeResult.parse('{"ok": true}', 1)
    assert not late.ok and "exited 1" in late.error and late.doc["ok"] is False
    crashed = SmokeResult.parse("Segmentation fault", -1)
    assert not crashed.ok and "printed no result" in crashed.error and crashed.doc["exit_code"] == -1
    bad = SmokeResult.parse('{"ok": false, "error": "generated nothing", "problems": ["generated nothing"]}', 1)
    assert bad.problems == ("generated nothing",) and bad.error == "generated nothing"


class Tuned(Chain):
    """A runtime that carries one runtime adapter, "plus2": with it the model predicts (t + 2) % VOCAB after t.
    Records the keywords of every logits/generate call, to tell base calls from adapter calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.loads = 0

    def load(self, threads: int) -> None:
        self.loads += 1

    def adapter_names(self) -> list[str]:
        return ["plus2"]

    def logits(self, ids: list[int], **kw: Any) -> np.ndarray:
        self.calls.append(("logits", kw))
        step = 2 if kw.get("adapter") == "plus2" else 1
        out = np.zeros((len(ids), VOCAB), np.float32)
        for i, t in enumerate(ids):
            out[i, (t + step) % VOCAB] = 5.0
        return out

    def generate(self, ids: list[int], n_prompt: int, max_new: int, sampling: dict, on_text: Any,
                 **kw: Any) -> dict:
        self.calls.append(("generate", kw))
        step = 2 if kw.get("adapter") == "plus2" else 1
        new = [(ids[-1] + step * (1 + i)) % VOCAB for i in range(max_new)]
        return {"text": " ".join(map(str, new)), "new_tokens": len(new), "prefill_ms": 1.0,
                "decode_tokens_per_s": 100.0}


def adapter_entry(name: str = "plus2", **kw: Any) -> dict[str, Any]:
    """A manifest "adapters" entry whose smoke section is what the "plus2" model reproduces (the base's schema)."""
    check = [3, 5, 7, 9, 11, 13]
    lp = smoke.log_softmax(Tuned().logits(check, adapter="plus2"))
    checks = {"file": "c.jsonl", "build_passed": 1, "allowed_drop": 0, "items": [
        {"id": "evens", "kind": "contains", "value": "4 6", "prompt_ids": [2], "max_tokens": 3, "float_text": ""}]}
    s = spec(golden_tokens=[4, 6, 8], check_ids=check, build_ppl=float(np.exp(-lp[np.arange(5), check[1:]].mean())),
             build_top1=[5, 7, 9, 11, 13], task_checks=checks)
    return {"name": name, "file": f"adapters/{name}.onnx_adapter", "sha256": "0" * 64, "bytes": 1, "rank": 8,
            "modules": ["q_proj"], "quality": {}, "smoke": {**s, **kw}}


def run_adapters(rt: Any, adapters: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    sys.modules["run"] = types.SimpleNamespace(RUNTIME=rt)  # type: ignore[assignment]
    try:
        return smoke.check(spec(), None, None, adapters)  # type: ignore[no-any-return]
    finally:
        del sys.modules["run"]


def test_each_adapter_is_checked_with_its_own_smoke_section_on_the_one_loaded_base() -> None:
    rt = Tuned()
    code, res = run_adapters(rt, [adapter_entry()])
    assert code == 0 and res["ok"] and res["problems"] == [], res
    got = res["adapters"]["plus2"]
    assert got["passed"] and got["problems"] == [] and got["golden_match"] == got["golden_required"] == 3
    assert abs(got["ppl_drift_pct"]) < 1e-6 and got["top1_vs_build"] == 1.0 and got["checks_passed"] == 1
    assert res["golden_match"] == 3 and "tokens_per_s" in res and "tokens_per_s" not in got  # speed: base only
    assert rt.loads == 1
    # golden + quality logits and the task check's generate with adapter=plus2; the base's calls pass no keyword.
    assert [c for c in rt.calls if c[1]] == [("logits", {"adapter": "plus2"})] * 2 + [("generate",
                                                                                        {"adapter": "plus2"})]
    assert sum(1 for c in rt.calls if not c[1]) == 3  # base: golden, quality, speed
    assert "adapters" not in run_with(Chain(), spec())[1]  # a bundle without adapters: the result is as before


def test_a_failing_adapter_fails_the_smoke_test_and_is_named() -> None:
    code, res = run_adapters(Tuned(), [adapter_entry(golden_tokens=[4, 6, 9]), adapter_entry("gone")])
    assert code == 1 and not res["ok"]
    assert res["golden_match"] == 3  # the base itself passed
    bad = res["adapters"]["plus2"]
    assert not bad["passed"] and bad["golden_match"] == 2
    assert "adapter plus2: at golden positions [2] the device picked [8] but the build recorded [9]" in res["error"]
    assert not res["adapters"]["gone"]["passed"]  # listed in the manifest, not carried by the runtime
    assert "adapter gone: not among the runtime's adapters (plus2)" in res["problems"]
