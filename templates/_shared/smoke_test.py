#!/usr/bin/env python3
"""On-device check of this bundle, the same file in every bundle (the runner core; copied as is, not a template).

Loads the model through the bundle's own runtime (run.py's Runtime) and re-checks what the build recorded in the
"smoke" section of edgepack.json:
  1. golden: after the recorded prompt, the device picks the recorded tokens at every clearly-decided position
     (teacher-forced argmax where the runtime exposes logits; where it exposes only scoring, as LiteRT-LM does, each
     golden token's log-probability within golden_logp_tol nats of the build's, and the free-running greedy reply
     starting with the golden text up to the first near-tie);
  2. quality: the check text's perplexity within max_ppl_drift_pct of the build's, and (with logits) top-1 agreement
     with the build machine's picks of at least min_top1;
  3. task checks: the user's quality.checks pass as often as the build allowed;
  4. speed: a free-running greedy reply of --tokens tokens;
  5. adapters: for each runtime LoRA adapter in edgepack.json's "adapters", checks 1-3 against that adapter's own
     "smoke" section, through the same loaded base (adapter=NAME); speed is measured for the base only.

Prints exactly one JSON line, the smoke result (docs/bundle-format.md, "The smoke result"): {"schema": 1, "ok": ...,
"golden_match": ..., "tokens_per_s": ..., "problems": [...], ...}, plus "adapters": {NAME: {..., "passed": ...}}
when the bundle carries adapters. Exit 0 when ok (every adapter included), 1 when the model loads but misbehaves,
2 when it cannot load at all. Standard library, plus numpy for runtimes that hand back logits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SCHEMA = 1


def _ignore(piece: str) -> None:
    pass


def _with(adapter: Optional[str]) -> Dict[str, Any]:
    """The keyword that selects a runtime adapter, passed only when one is selected: runtimes without adapters
    (LiteRT) do not take it."""
    return {"adapter": adapter} if adapter else {}


def log_softmax(rows: Any) -> Any:
    import numpy as np

    z = rows.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Scores:
    """What the runtime says of a recorded token sequence: log p(ids[i] | ids[:i]) for i >= 1, and the argmax at each
    position where it exposes logits (None where it does not)."""

    def __init__(self, rt: Any, ids: List[int], adapter: Optional[str] = None) -> None:
        self.top1: Optional[List[int]] = None
        self.logp: Optional[List[float]] = None
        extra = _with(adapter)
        if hasattr(rt, "logits"):
            import numpy as np

            lp = log_softmax(rt.logits(ids, **extra))
            self.top1 = [int(t) for t in lp.argmax(axis=-1)]
            self.logp = [float(x) for x in lp[np.arange(len(ids) - 1), np.array(ids[1:])]]
        else:
            got = rt.score(ids, **extra)
            self.logp = None if got is None else [float(x) for x in got]


def golden(rt: Any, spec: Dict[str, Any], problems: List[str], adapter: Optional[str] = None) -> Dict[str, Any]:
    prompt, gold, checked = spec["prompt_ids"], spec["golden_tokens"], spec["golden_checked"]
    required = [i for i, c in enumerate(checked) if c]
    if not prompt or not gold:  # an unvalidated build (--skip-validation) recorded nothing to reproduce
        return {"golden_match": 0, "golden_required": 0}
    s = Scores(rt, prompt + gold, adapter)
    if s.top1 is not None:
        picked = [s.top1[len(prompt) - 1 + i] for i in range(len(gold))]
        wrong = [i for i in required if picked[i] != gold[i]]
        if wrong:
            problems.append("at golden positions %s the device picked %s but the build recorded %s"
                            % (wrong, [picked[i] for i in wrong], [gold[i] for i in wrong]))
    elif s.logp is not None and spec.get("golden_logp"):
        got, want, tol = s.logp[-len(gold):], spec["golden_logp"], spec["golden_logp_tol"]
        wrong = [i for i in required if abs(got[i] - want[i]) > tol]
        if wrong:
            problems.append("at golden positions %s the device gives log-probabilities %s where the build had %s "
                            "(tolerance %s)" % (wrong, [round(got[i], 3) for i in wrong], [want[i] for i in wrong],
                                                tol))
    else:
        wrong = []
        problems.append("cannot score the golden reply teacher-forced (the device tokenizer does not round-trip the "
                        "recorded tokens, or the build recorded no log-probabilities)")
    return {"golden_match": len(required) - len(wrong), "golden_required": len(required)}


def quality(rt: Any, spec: Dict[str, Any], problems: List[str], adapter: Optional[str] = None) -> Dict[str, Any]:
    ids, build_ppl = spec["check_ids"], spec["build_ppl"]
    if not ids or build_ppl is None:
        return {}
    s = Scores(rt, ids, adapter)
    if s.logp is None:
        problems.append("cannot score the check text (the device tokenizer does not round-trip it)")
        return {}
    ppl = math.exp(-sum(s.logp) / len(s.logp))
    out: Dict[str, Any] = {"device_ppl": round(ppl, 4), "build_ppl": build_ppl,
                           "ppl_drift_pct": round((ppl / build_ppl - 1) * 100, 3)}
    if abs(out["ppl_drift_pct"]) > spec["max_ppl_drift_pct"]:
        problems.append("perplexity on the check text is %s here vs %s at build (%+.2f %%, allowed ±%s %%)"
                        % (out["device_ppl"], build_ppl, out["ppl_drift_pct"], spec["max_ppl_drift_pct"]))
    if s.top1 is not None and spec.get("build_top1"):
        picks = s.top1[:-1]
        agree = sum(a == b for a, b in zip(picks, spec["build_top1"])) / max(len(picks), 1)
        out["top1_vs_build"] = round(agree, 4)
        if agree < spec["min_top1"]:
            problems.append("top-1 agreement with the build machine is %s (required %s)"
                            % (out["top1_vs_build"], spec["min_top1"]))
    return out


def task_checks(rt: Any, spec: Dict[str, Any], problems: List[str], adapter: Optional[str] = None) -> Dict[str, Any]:
    from edgepack_runner import GREEDY

    checks = spec.get("task_checks")
    if not checks:
        return {}
    passed, failed = 0, []
    for c in checks["items"]:
        text = rt.generate(rt.from_ids(c["prompt_ids"]), len(c["prompt_ids"]), c["max_tokens"], GREEDY,
                           _ignore, **_with(adapter))["text"]
        if c["kind"] == "contains":
            ok = c["value"] in text
        elif c["kind"] == "regex":
            ok = re.search(c["value"], text) is not None
        else:
            ok = text.strip() == c["float_text"].strip()
        passed += ok
        if not ok:
            failed.append(c["id"])
    if passed < checks["build_passed"] - checks["allowed_drop"]:
        problems.append("task checks: %d/%d passed here, %d at build (failed: %s)"
                        % (passed, len(checks["items"]), checks["build_passed"], ", ".join(failed)))
    return {"checks_passed": passed, "checks_total": len(checks["items"]), "checks_failed": failed}


def speed(rt: Any, spec: Dict[str, Any], tokens: int, logits: bool, problems: List[str]) -> Dict[str, Any]:
    from edgepack_runner import GREEDY, peak_rss_mb

    prompt, gold, checked = spec["prompt_ids"], spec["golden_tokens"], spec["golden_checked"]
    n = tokens if logits else max(tokens, len(gold))  # without logits this reply is also the golden text check
    if prompt:
        gen = rt.generate(rt.from_ids(prompt), len(prompt), n, GREEDY, _ignore)
    else:  # an unvalidated build: any prompt, for speed
        from edgepack_runner import chat_messages

        gen = rt.generate(*rt.prepare(chat_messages("Hello.", None), None), n, GREEDY, _ignore)
    out = {"tokens": gen["new_tokens"], "prefill_ms": gen["prefill_ms"], "tokens_per_s": gen["decode_tokens_per_s"],
           "text": gen["text"]}
    if not gen["new_tokens"]:
        problems.append("generated nothing")
    if not logits and gold:
        prefix = len(checked) if all(checked) else checked.index(False)
        expected = rt.detokenize(gold[:prefix])
        text = gen["text"]
        out["greedy_text_prefix_ok"] = text.startswith(expected)
        if not out["greedy_text_prefix_ok"]:
            at = next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
            problems.append("the greedy reply differs from the build's after %d characters: %r vs %r"
                            % (at, text[:at + 20], expected[:at + 20]))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def adapter_checks(rt: Any, entry: Any, label: str, problems: List[str]) -> Dict[str, Any]:
    """Checks 1-3 for one runtime adapter (a manifest "adapters" entry), against its own smoke section. Its
    problems also go to `problems`, named by the adapter (`label`), so any adapter failing fails the smoke test."""
    from edgepack_runner import adapter_names

    name = entry.get("name") if isinstance(entry, dict) else None
    mine: List[str] = []
    out: Dict[str, Any] = {}
    spec = entry.get("smoke") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name:
        mine.append("the entry has no name")
    elif name not in adapter_names(rt):
        mine.append("not among the runtime's adapters (%s)" % (", ".join(adapter_names(rt)) or "none"))
    elif not isinstance(spec, dict) or spec.get("schema") != SCHEMA:
        mine.append("no smoke section this file can read (schema %r, this smoke_test.py reads %d)"
                    % (spec.get("schema") if isinstance(spec, dict) else None, SCHEMA))
    else:
        try:
            out.update(golden(rt, spec, mine, name))
            out.update(quality(rt, spec, mine, name))
            out.update(task_checks(rt, spec, mine, name))
        except Exception as exc:  # one adapter's failure is reported; the others are still checked
            mine.append("the runtime failed: %s: %s" % (type(exc).__name__, exc))
    out.update(passed=not mine, problems=mine)
    problems.extend("adapter %s: %s" % (label, p) for p in mine)
    return out


def check(spec: Dict[str, Any], tokens: Optional[int], threads: Optional[int],
          adapters: Optional[List[Any]] = None) -> tuple:
    """(exit code, the smoke result). `adapters`: the manifest's "adapters" entries, each checked after the base on
    the model loaded once."""
    result: Dict[str, Any] = {"schema": SCHEMA, "ok": False, "bundle": None, "runtime": None}
    problems: List[str] = []
    try:
        t0 = time.perf_counter()
        from run import RUNTIME as rt

        result.update(bundle=rt.name, runtime=rt.runtime)
        rt.load(rt.threads if threads is None else threads)
        result["load_s"] = round(time.perf_counter() - t0, 3)
    except Exception as exc:  # report, never traceback: the caller parses one JSON line
        result["error"] = "the model does not load: %s: %s" % (type(exc).__name__, exc)
        result["problems"] = [result["error"]]
        return 2, result
    try:
        result.update(golden(rt, spec, problems))
        result.update(quality(rt, spec, problems))
        result.update(task_checks(rt, spec, problems))
        result.update(speed(rt, spec, spec["tokens"] if tokens is None else tokens, hasattr(rt, "logits"),
                            problems))
    except Exception as exc:
        problems.append("the runtime failed: %s: %s" % (type(exc).__name__, exc))
    if adapters:  # the key only for bundles with adapters: the results of the others are unchanged
        result["adapters"] = {}
        for i, entry in enumerate(adapters):
            name = entry.get("name") if isinstance(entry, dict) else None
            label = name if isinstance(name, str) and name else "#%d" % i  # a nameless entry, by its position
            result["adapters"][label] = adapter_checks(rt, entry, label, problems)
    result.update(ok=not problems, problems=problems)
    if problems:
        result["error"] = "; ".join(problems)
    return (0 if result["ok"] else 1), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, help="new tokens to generate for the speed figure (default: the bundle's)")
    ap.add_argument("--threads", type=int, help="0 = the runtime's default (default: the bundle's)")
    args = ap.parse_args()
    try:
        with open(os.path.join(HERE, "edgepack.json")) as fh:
            manifest = json.load(fh)
        spec = manifest["smoke"]
        adapters = manifest.get("adapters") or []
        if not isinstance(adapters, list):
            raise ValueError("adapters is not a list")
        if spec.get("schema") != SCHEMA:
            raise ValueError("smoke schema %r, this smoke_test.py reads %d" % (spec.get("schema"), SCHEMA))
    except (OSError, ValueError, KeyError) as exc:
        error = "edgepack.json has no smoke section this file can read (%s): rebuild the bundle" % exc
        print(json.dumps({"schema": SCHEMA, "ok": False, "bundle": None, "runtime": None, "error": error,
                          "problems": [error]}))
        return 2
    code, result = check(spec, args.tokens, args.threads, adapters)
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
