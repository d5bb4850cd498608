"""docs/json.md is the contract pipelines code against: pinned here against the code."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "json.md").read_text()


def raised_codes() -> set[str]:
    """Every error code in edgepack/: class-level `code = "..."`, every string in a `code=...` argument, and the
    device program's (`Failed("...")`, `"code": "..."`)."""
    codes: set[str] = set()
    for path in (ROOT / "edgepack").rglob("*.py"):
        on_device = path.parent.name == "device"  # the device program: its codes are data in its JSON answers
        for node in ast.walk(ast.parse(path.read_text())):
            if on_device and isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Failed":
                codes |= _outcomes(node.args[0])
            if on_device and isinstance(node, ast.Dict):
                codes |= {v.value for k, v in zip(node.keys, node.values, strict=True)
                          if isinstance(k, ast.Constant) and k.value == "code" and isinstance(v, ast.Constant)
                          and isinstance(v.value, str)}
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["code"]
                            and isinstance(stmt.value, ast.Constant)):
                        codes.add(stmt.value.value)
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "code":
                        codes |= _outcomes(kw.value) if on_device else {
                            c.value for c in ast.walk(kw.value)
                            if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return codes


def _outcomes(node: ast.expr) -> set[str]:
    """The strings an expression can evaluate to (`a or "x"`, `"x" if c else "y"`), not those it looks up."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.BoolOp):
        return set().union(*(_outcomes(v) for v in node.values))
    if isinstance(node, ast.IfExp):
        return _outcomes(node.body) | _outcomes(node.orelse)
    return set()


def documented_codes() -> set[str]:
    table = DOC.split("## Error codes", 1)[1].split("## Results", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))


def documented_keys(command: str) -> list[str]:
    row = re.search(rf"^\| `{re.escape(command)}` \| (.*) \|$", DOC, re.M)
    assert row, command
    return re.findall(r"`([a-z_0-9]+)`", re.sub(r"\([^)]*\)\)?", "", row.group(1)))


def test_every_raised_code_is_documented_and_every_documented_code_is_raised() -> None:
    raised, documented = raised_codes(), documented_codes()
    assert raised - documented == set(), "raised but not in docs/json.md"
    assert documented - raised == set(), "documented but never raised"


def test_result_keys_are_the_result_types_fields() -> None:
    from edgepack import api
    from edgepack.remote.deploy import DeployOutcome
    from edgepack.signing import SignatureInfo

    types = {"build": api.BuildResult, "deploy": DeployOutcome,
             "bench": api.BenchResult, "sign": SignatureInfo, "pack": api.PackResult}
    for command, cls in types.items():
        fields = [f.name for f in dataclasses.fields(cls) if f.metadata.get("json", True)]
        assert documented_keys(command) == fields, command


def test_error_envelope_carries_code_and_kind() -> None:
    from edgepack.errors import QualityGateError, UserError
    from edgepack.output import envelope

    doc = envelope("build", error=QualityGateError("perplexity +30 %", hint="loosen it"))
    assert doc["error"]["code"] == "quality_gate_failed" and doc["error"]["kind"] == "quality-gate"
    assert envelope("deploy", error=UserError("x", code="host_key_unknown"))["error"]["code"] == "host_key_unknown"
