"""`build --tune`: every candidate built, gated and timed; the fastest that passes is the bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ..conftest import FIXTURES, cli, envelope, has, needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]


def target_with(tmp_path: Path, **quality: float) -> Path:
    text = (FIXTURES / "tiny-target.toml").read_text()
    for key, value in quality.items():
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines())
    p = tmp_path / "tune-target.toml"
    p.write_text(text + "\n")
    return p


def test_tune_picks_the_only_candidate_within_tolerance(tiny_model: Path, tmp_path: Path) -> None:
    # Near-exact tolerances: only the fp32 candidate (Δppl ~0) can pass, whatever the speeds are.
    t = target_with(tmp_path, max_ppl_increase_pct=0.001, max_mean_kl=0.00001, min_top1_agreement=1.0)
    plot = tmp_path / "tune.png"
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path / "d"), "--no-wheels",
               "--tune", *(["--plot", str(plot)] if has("matplotlib") else []))
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in doc["result"]["tune"]}
    assert set(rows) == {"int4", "int8", "fp32"}
    assert rows["fp32"]["chosen"] and rows["fp32"]["passed"] and rows["fp32"]["decode_tok_s"] > 0
    assert not rows["int4"]["passed"] and rows["int4"]["decode_tok_s"] is None and rows["int4"]["failures"]
    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert m["export"]["scheme"] == "fp32" and m["target"]["profile"]["quantize"]["scheme"] == "fp32"
    assert [c["name"] for c in m["tune"]["candidates"]] == ["int4", "int8", "fp32"]
    assert "this machine" in m["tune"]["speed_measured_on"]
    # runtime.speculative = "auto": n-gram decoding was A/B'd with the winner's own runner, and the bundle got what
    # that measured (a tiny random model copies little, so usually off; either way the reason has the numbers)
    spec = m["tune"]["speculative"]
    assert spec["chosen"] in ("ngram", "off") and m["runtime"]["speculative"] == spec["chosen"]
    assert spec["extraction_speedup"] > 0 and spec["chat_speedup"] > 0 and "x plain" in spec["reason"]
    if has("matplotlib"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_with_no_passing_candidate_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    t = target_with(tmp_path, min_greedy_match=33)
    out = tmp_path / "d"
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(out), "--no-wheels", "--tune")
    err = envelope(proc)["error"]
    assert proc.returncode == 1
    if err["kind"] == "target":  # 33 > 32 is itself refused by the schema: also a clear exit 1
        assert "min_greedy_match" in err["message"]
        t = target_with(tmp_path, max_ppl_increase_pct=-1.0)
        proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(out), "--no-wheels", "--tune")
        err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["kind"] == "quality-gate", err
    assert len(err["candidates"]) == 3 and all(not c["passed"] for c in err["candidates"])
    assert not out.exists() or list(out.iterdir()) == []


def test_tune_candidates_are_schema_checked(tmp_path: Path) -> None:
    from edgepack.errors import TargetError
    from edgepack.targets import load_target

    p = tmp_path / "bad.toml"
    p.write_text('[device]\narch = "x"\n[tune]\ncandidates = [{ name = "a", blocksize = 16 }]\n')
    with pytest.raises(TargetError, match=r"tune.candidates\[0\].blocksize"):
        load_target(str(p))
    assert [c.name for c in load_target("rpi5").tune.candidates][:1] == ["int4-rtn"]


def test_tune_times_each_candidate_with_the_runner_its_bundle_ships_and_reuses_the_cache(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The meter gets the candidate's runner folder: the bundle's own run.py and runner core beside its model, run
    in a fresh process (the numbers `edgepack bench` reports for the bundle). A second tune exports nothing."""
    from edgepack.meter import HereMeter
    from edgepack.models import resolve_model
    from edgepack.stages.tune import tune
    from edgepack.targets import load_target

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))  # this test's own: the first tune exports
    t = target_with(tmp_path, max_ppl_increase_pct=0.001, max_mean_kl=0.00001, min_top1_agreement=1.0)
    seen: dict[str, set[str]] = {}
    played: list[str] = []

    class Recording(HereMeter):
        def __call__(self, runner: Path, **kw: Any) -> list[dict]:  # type: ignore[override]
            if kw.get("args"):  # runtime.speculative = "auto": the winner's scenarios, n-gram against plain
                played.append(kw["args"][kw["args"].index("--scenario") + 1])
                return super().__call__(runner, **kw)
            seen[runner.name] = {(Path(d) / f).relative_to(runner).as_posix()
                                 for d, _, names in os.walk(runner, followlinks=True) for f in names}
            assert (runner / "model").resolve() != runner / "model"  # the candidate's export, not a copy
            return super().__call__(runner, **kw)

    source, target = resolve_model(str(tiny_model)), load_target(str(t))
    first = tune(source, target, tmp_path / "w1", meter=Recording("here"))
    (files,) = seen.values()  # only fp32 passes: only it is timed
    assert played == ["extraction", "chat"] and first.speculative is not None
    assert played == ["extraction", "chat"] and first.speculative is not None
    assert {"run.py", "edgepack_runner.py", "edgepack_cli.py", "smoke_test.py", "model/genai_config.json"} <= files
    row = next(r for r in first.table if r.chosen)
    assert row.name == "fp32" and row.decode_tok_s and row.peak_rss_mb and not row.cached
    again = tune(source, target, tmp_path / "w2", meter=Recording("here"))
    assert all(r.cached for r in again.table), [(r.name, r.cached) for r in again.table]
    assert [r.passed for r in again.table] == [r.passed for r in first.table]
