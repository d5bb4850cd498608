"""Shared fixtures: an isolated edgepack cache, a tiny random Llama, the real SmolLM2 bundle (built once)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    # Heavy artifacts (GGUF conversion, fp32 reference scores, wheels) are cached for the whole run; a
    # developer's Makefile run keeps them in .cache/ between runs, a bare pytest run uses a temp dir.
    if "EDGEPACK_CACHE" not in os.environ:
        import tempfile

        os.environ["EDGEPACK_CACHE"] = tempfile.mkdtemp(prefix="edgepack-test-cache-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_onnx = pytest.mark.skipif(not (has("onnxruntime_genai") and has("torch") and has("transformers")),
                                reason="needs the [onnx] extra: pip install -e '.[onnx]'")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a build pipeline would."""
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout, check=False)


def envelope(proc: subprocess.CompletedProcess[str]) -> dict:
    doc = json.loads(proc.stdout)
    assert set(doc) == {"edgepack", "command", "ok", "result", "error"}, doc.keys()
    return doc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_target() -> Path:
    return FIXTURES / "tiny-target.toml"


@pytest.fixture(scope="session")
def smollm2_host_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real shipped model built for `host` once per run (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    proc = cli("build", "--target", "host", "smollm2-135m", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "smollm2-135m-host"
