"""The user's own task checks (JSONL): prompts with what must come back, run on the float and quantized models.

One JSON object per line:
  {"prompt": "What is 2+2?", "contains": "4"}
  {"prompt": "Reply with a date", "regex": "\\d{4}-\\d{2}-\\d{2}", "max_tokens": 24}
  {"prompt": "Summarize: ...", "same_as_float": true, "raw": false, "id": "summary-1"}
Exactly one of contains / regex / same_as_float per line; `raw` skips the chat template; `max_tokens` defaults
to 32. The gate compares the pass rate of the quantized model with the float model's; the device's smoke test
runs the same prompts again (edgepack.json `quality.checks` carries what it needs).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import UserError

KINDS = ("contains", "regex", "same_as_float")
DEFAULT_MAX_TOKENS = 32
MAX_CHECKS = 64


@dataclass(frozen=True)
class Check:
    id: str
    prompt: str
    kind: str  # one of KINDS
    value: str  # the substring or pattern ("" for same_as_float)
    raw: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class CheckResult:
    id: str
    kind: str
    value: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    float_text: str
    quantized_text: str
    float_passed: bool
    quantized_passed: bool


@dataclass(frozen=True)
class ChecksReport:
    file: str
    sha256: str
    total: int
    float_passed: int
    quantized_passed: int
    allowed_drop: int  # checks the quantized model may fail beyond the float model's failures
    results: tuple[CheckResult, ...]


def resolve_path(ref: str, target_source: str) -> Path:
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(target_source).parent / path
    if not path.is_file():
        raise UserError(f"quality.checks {ref} does not exist (looked at {path}).",
                        hint="Give a JSONL file of checks (docs/models.md), relative to the target file.",
                        path=str(path), field="quality.checks")
    return path


def load(path: Path) -> tuple[tuple[Check, ...], str]:
    """Parse the JSONL file; any bad line is a user error naming the line. Returns (checks, sha256)."""
    data = path.read_bytes()
    checks: list[Check] = []

    def bad(n: int, why: str) -> UserError:
        return UserError(f"{path.name} line {n}: {why}.", hint='Each line: {"prompt": "...", "contains": "..."} '
                         '(or "regex": "...", or "same_as_float": true); see docs/models.md.',
                         path=str(path), line=n, field="quality.checks")

    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(n, f"not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise bad(n, "needs a non-empty string \"prompt\"")
        kinds = [k for k in KINDS if k in obj]
        if len(kinds) != 1:
            raise bad(n, f"needs exactly one of {', '.join(KINDS)} (found {kinds or 'none'})")
        kind = kinds[0]
        value = obj[kind]
        if kind == "same_as_float":
            if value is not True:
                raise bad(n, "\"same_as_float\" must be true")
            value = ""
        elif not isinstance(value, str) or not value:
            raise bad(n, f"\"{kind}\" must be a non-empty string")
        elif kind == "regex":
            try:
                re.compile(value)
            except re.error as exc:
                raise bad(n, f"invalid regex ({exc})") from exc
        max_tokens = obj.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 256:
            raise bad(n, "\"max_tokens\" must be an integer from 1 to 256")
        unknown = sorted(set(obj) - {"prompt", "raw", "max_tokens", "id", *KINDS})
        if unknown:
            raise bad(n, f"unknown key {unknown[0]!r}")
        checks.append(Check(id=str(obj.get("id", f"line-{n}")), prompt=obj["prompt"], kind=kind, value=value,
                            raw=bool(obj.get("raw", False)), max_tokens=max_tokens))
    if not checks:
        raise UserError(f"{path.name} holds no checks.", hint="Add one JSON object per line.", path=str(path),
                        field="quality.checks")
    if len(checks) > MAX_CHECKS:
        raise UserError(f"{path.name} holds {len(checks)} checks; at most {MAX_CHECKS} run in the gate and on the "
                        "device.", hint="Keep the checks that matter most.", path=str(path), field="quality.checks")
    return tuple(checks), hashlib.sha256(data).hexdigest()


def passes(kind: str, value: str, text: str, float_text: str) -> bool:
    if kind == "contains":
        return value in text
    if kind == "regex":
        return re.search(value, text) is not None
    return text.strip() == float_text.strip()


def _prompt_ids(tokenizer: Any, check: Check) -> list[int]:
    if check.raw or not getattr(tokenizer, "chat_template", None):
        return [int(i) for i in tokenizer(check.prompt).input_ids]
    out = tokenizer.apply_chat_template([{"role": "user", "content": check.prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(i) for i in out]


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def run(checks: tuple[Check, ...], sha256: str, name: str, source: Any, scorer: Any,
        max_drop: float) -> ChecksReport:
    """Greedy replies of the float model (torch) and of the quantized one (the bundle's runtime)."""
    import torch
    import transformers

    from edgepack.checkpoint import float_model

    tok = transformers.AutoTokenizer.from_pretrained(source.hf_dir)
    model = float_model(source.hf_dir)
    eos = {t for t in (source.tokenizer.eos_token_id, tok.eos_token_id) if t is not None}
    results = []
    with torch.inference_mode():
        for c in checks:
            ids = _prompt_ids(tok, c)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=c.max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
            float_ids = _until_eos([int(t) for t in out[0][len(ids):]], eos)
            quant_ids = _until_eos(scorer.greedy(ids, c.max_tokens), eos)
            ftext = str(tok.decode(float_ids, skip_special_tokens=True))
            qtext = str(tok.decode(quant_ids, skip_special_tokens=True))
            results.append(CheckResult(id=c.id, kind=c.kind, value=c.value, prompt_ids=tuple(ids),
                                       max_tokens=c.max_tokens, float_text=ftext, quantized_text=qtext,
                                       float_passed=passes(c.kind, c.value, ftext, ftext),
                                       quantized_passed=passes(c.kind, c.value, qtext, ftext)))
    total = len(results)
    return ChecksReport(file=name, sha256=sha256, total=total, float_passed=sum(r.float_passed for r in results),
                        quantized_passed=sum(r.quantized_passed for r in results),
                        allowed_drop=int(max_drop * total), results=tuple(results))


def failures(report: ChecksReport) -> tuple[str, ...]:
    if report.quantized_passed >= report.float_passed - report.allowed_drop:
        return ()
    lost = [r.id for r in report.results if r.float_passed and not r.quantized_passed]
    return (f"task checks: quantized passes {report.quantized_passed}/{report.total}, float "
            f"{report.float_passed}/{report.total} (allowed drop {report.allowed_drop}; lost: {', '.join(lost)})",)


def report_from(fields: dict[str, Any], max_drop: float) -> ChecksReport:
    """A cached ChecksReport (its JSON), with the allowed drop of today's target."""
    results = tuple(CheckResult(**{**r, "prompt_ids": tuple(r["prompt_ids"])}) for r in fields["results"])
    return ChecksReport(**{**fields, "results": results, "allowed_drop": int(max_drop * fields["total"])})
