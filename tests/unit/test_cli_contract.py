"""The CLI's promises to build pipelines: exit codes, one JSON envelope, errors with hints, fast start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgepack.cli import cli

from ..conftest import FIXTURES


def invoke(*args: str) -> tuple[int, dict | str, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    out = res.stdout
    try:
        return res.exit_code, json.loads(out), res.stderr
    except json.JSONDecodeError:
        return res.exit_code, out, res.stderr


def test_targets_list_json_envelope_is_pinned() -> None:
    code, doc, _ = invoke("--json", "targets", "list")
    assert code == 0
    assert isinstance(doc, dict)
    assert doc["edgepack"] == 1 and doc["command"] == "targets list" and doc["ok"] is True
    assert doc["error"] is None
    ids = [t["id"] for t in doc["result"]]
    assert "rpi5" in ids and "host" in ids


def test_json_flag_after_subcommand_too() -> None:
    code, doc, _ = invoke("targets", "show", "rpi5", "--json")
    assert code == 0 and isinstance(doc, dict)
    assert doc["result"]["device"]["arch"] == "aarch64"


def test_user_error_exits_1_with_message_and_hint() -> None:
    code, out, err = invoke("targets", "show", "nope")
    assert code == 1
    assert "unknown target 'nope'" in err and "rpi5" in err and "hint:" in err
    assert out == ""  # stdout is data only


def test_user_error_in_json_mode_is_one_envelope() -> None:
    code, doc, _ = invoke("--json", "build", "--target", "rpi6", "smollm2-135m")
    assert code == 1
    assert isinstance(doc, dict)
    assert doc["ok"] is False and doc["result"] is None
    assert doc["error"]["kind"] == "unknown-name" and "rpi5" in doc["error"]["known"]
    assert doc["error"]["hint"]


def test_unknown_model_lists_aliases() -> None:
    code, doc, _ = invoke("--json", "build", "--target", "host", "gpt-17")
    assert code == 1 and isinstance(doc, dict)
    assert {"smollm2-135m", "tinyllama", "qwen2.5-0.5b"} <= set(doc["error"]["known"])


def test_bad_gguf_files_are_user_errors(tmp_path: Path) -> None:
    missing = invoke("build", str(tmp_path / "none.gguf"))
    assert missing[0] == 1 and "does not exist" in missing[2]
    notgguf = tmp_path / "model.gguf"
    notgguf.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    code, _, err = invoke("build", str(notgguf), "--out", str(tmp_path / "dist"))
    assert code == 1 and "not a GGUF file" in err
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_inspect_non_bundle(tmp_path: Path) -> None:
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == 1 and "not an edgepack bundle" in err


def test_internal_error_exits_2_with_traceback(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import edgepack.targets as targets

    def boom() -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(targets, "list_targets", boom)
    res = CliRunner().invoke(cli, ["--json", "targets", "list"])
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["error"]["kind"] == "internal" and "kaboom" in doc["error"]["message"]
    assert "Traceback" in res.stderr and "please report" in res.stderr.lower()


def test_cli_starts_without_heavy_imports() -> None:
    code = ("import sys; from click.testing import CliRunner; from edgepack.cli import cli;"
            "r = CliRunner().invoke(cli, ['targets', 'list']); assert r.exit_code == 0, r.output;"
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0;"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'onnxruntime_genai', 'paramiko')"
            " if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_missing_extra_names_the_install_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import builtins

    from edgepack.errors import MissingExtraError, require

    real_import = builtins.__import__

    def fake_import(name, *a, **k):  # type: ignore[no-untyped-def]
        if name == "onnxruntime_genai":
            raise ImportError("no")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, "onnxruntime_genai", raising=False)
    try:
        require("onnxruntime_genai", "onnx", "ONNX export")
    except MissingExtraError as e:
        assert e.hint == "pip install 'edgepack[onnx]'" and e.exit_code == 1
    else:
        raise AssertionError("expected MissingExtraError")


def test_fixture_target_is_valid() -> None:
    from edgepack.targets import load_target

    assert load_target(str(FIXTURES / "tiny-target.toml")).id == "tiny-target"


def test_cli_reference_in_docs_is_current() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "docs" / "gen_cli.py")], capture_output=True, text=True,
                          check=True)
    assert proc.stdout == (root / "docs" / "cli.md").read_text(), "regenerate: make docs/cli.md"
