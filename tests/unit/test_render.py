"""Template rendering: StrictUndefined, valid Python and shell, and goldens that pin the installer."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from edgepack.stages.render import BundleContext, render
from edgepack.stages.validate import QualityReport
from edgepack.targets import QualitySpec

from ..conftest import FIXTURES

GOLDEN = FIXTURES / "golden"


def context(**kw: object) -> BundleContext:
    q = QualityReport(True, True, "heldout.txt", "ab" * 32, 2044, 16.77, 20.11, 19.93, 0.279, 0.707, 25, 1, 32,
                      QualitySpec(), (), (1, 2, 3), (10, 11, 12, 13), (True, False, True, True), (5, 6, 7), 12.5,
                      (6, 7), False)
    ctx = BundleContext(
        name="demo-rpi5", edgepack_version="0.1.0", target_id="rpi5", target_description="Raspberry Pi 5",
        arch="aarch64", python="3.11", format="onnx", runtime="onnxruntime-genai", execution_provider="cpu",
        scheme_summary="int4 block 32", model_origin="hf:org/demo", model_revision="abc", weights_sha256="0" * 64,
        architecture="LlamaForCausalLM", threads=4, max_new_tokens=128,
        requirements=("onnxruntime-genai==0.18.0", "onnxruntime==1.32.0"), import_check="onnxruntime_genai",
        system_site_packages=False, serve_addr="127.0.0.1:8089", quality=q)
    return dataclasses.replace(ctx, **kw)  # type: ignore[arg-type]


def test_render_writes_valid_python_and_shell(tmp_path: Path) -> None:
    files = render(context(), "onnxruntime-genai", tmp_path, systemd=True)
    # No playbooks or roles: a fleet runs edgepack's own (tests/unit/test_ansible_role.py), the bundle is data.
    assert set(files) == {"run.py", "smoke_test.py", "install.sh", "README.md", "edgepack-demo-rpi5.service",
                          "verify_bundle.py", "bundle_format.py", "edgepack_runner.py", "edgepack_cli.py",
                          "edgepack_server.py", "edgepack_scenarios.py"}
    assert not (tmp_path / "ansible").exists()
    for py in ("run.py", "smoke_test.py", "edgepack_runner.py", "edgepack_cli.py", "edgepack_server.py",
               "edgepack_scenarios.py"):
        compile((tmp_path / py).read_text(), py, "exec")
        assert os.access(tmp_path / py, os.X_OK)
    assert subprocess.run(["sh", "-n", str(tmp_path / "install.sh")]).returncode == 0
    # One runner core: the smoke test is the same file in every bundle (its numbers are in edgepack.json).
    core = Path(__file__).resolve().parents[2] / "templates" / "_shared" / "smoke_test.py"
    assert (tmp_path / "smoke_test.py").read_bytes() == core.read_bytes()
    readme = (tmp_path / "README.md").read_text()
    assert "+19.93 %" in readme and "≤ +10.0 %" in readme


@pytest.mark.parametrize("name", ["install.sh", "edgepack-demo-rpi5.service"])
def test_goldens(tmp_path: Path, name: str) -> None:
    render(context(), "onnxruntime-genai", tmp_path, systemd=True)
    golden = GOLDEN / name
    if os.environ.get("EDGEPACK_UPDATE_GOLDENS"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text((tmp_path / name).read_text())
    assert (tmp_path / name).read_text() == golden.read_text(), "rerun with EDGEPACK_UPDATE_GOLDENS=1 if intended"


def test_unvalidated_bundle_says_so_and_unknown_template_lists_known(tmp_path: Path) -> None:
    from edgepack.errors import UnknownNameError
    from edgepack.stages.validate import unvalidated
    from edgepack.targets import load_target

    render(context(quality=unvalidated(load_target("rpi5"))), "onnxruntime-genai", tmp_path, systemd=False)
    assert "Not validated" in (tmp_path / "README.md").read_text()
    with pytest.raises(UnknownNameError, match="Known: .*onnxruntime-genai"):
        render(context(), "llamacpp", tmp_path, systemd=False)


def test_strict_undefined_catches_a_missing_context_field(tmp_path: Path) -> None:
    import jinja2

    from edgepack.stages.render import environment

    env = environment("onnxruntime-genai")
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ ctx.no_such_field }}").render(ctx=context())
