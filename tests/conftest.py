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
_OWN_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Heavy artifacts (GGUF conversion, fp32 reference scores, wheels) are cached for the whole run; a
    # developer's Makefile run keeps them in .cache/ between runs, a bare pytest run uses a temp dir.
    if "EDGEPACK_CACHE" not in os.environ:
        import tempfile

        os.environ["EDGEPACK_CACHE"] = tempfile.mkdtemp(prefix="edgepack-test-cache-")
        config.stash[_OWN_CACHE] = os.environ["EDGEPACK_CACHE"]
    # Tests run bundles' scripts directly (smoke_test.py); Python would leave __pycache__/ in the bundle, which
    # verification refuses (a planted cache would run instead of the listed .py), as it would for a user.
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The test targets are this machine's own target files: deploy learns a bundle's signing policy from them.
    os.environ.setdefault("EDGEPACK_TARGET_PATH", str(FIXTURES))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_unconfigure(config: pytest.Config) -> None:
    # A bare pytest run's cache is ~1 GB of GGUF conversions and wheels: it goes with the run.
    own = config.stash.get(_OWN_CACHE, None)
    if own:
        import shutil

        shutil.rmtree(own, ignore_errors=True)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_tflite = pytest.mark.skipif(not (has("litert_torch") and has("litert_lm") and has("ai_edge_litert")),
                                  reason="needs the [tflite] extra: pip install -e '.[tflite]'")
needs_onnx = pytest.mark.skipif(not (has("onnxruntime_genai") and has("torch") and has("transformers")),
                                reason="needs the [onnx] extra: pip install -e '.[onnx]'")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a build pipeline would."""
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout, check=False)


def interruptible(*args: str) -> list[str]:
    """`python -m edgepack ARGS` for a test that sends it SIGINT (Ctrl-C). A job a non-interactive shell starts in
    the background (`.ci/run ... &`) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt
    handler, so the signal would do nothing. The wrapper restores the default before exec'ing edgepack."""
    boot = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.executable, [sys.executable, '-m', 'edgepack', *sys.argv[1:]])")
    return [sys.executable, "-c", boot, *args]


def envelope(proc: subprocess.CompletedProcess[str]) -> dict:
    doc = json.loads(proc.stdout)
    assert set(doc) == {"edgepack", "command", "ok", "result", "error"}, doc.keys()
    return doc


def runner_core(module: str):  # type: ignore[no-untyped-def]
    """A module of the runner core every bundle ships (templates/_shared), imported as a bundle's run.py would."""
    import importlib

    shared = str(ROOT / "templates" / "_shared")
    if shared not in sys.path:
        sys.path.insert(0, shared)
    return importlib.import_module(module)


def with_smoke(bundle: Path, dest: Path, **changes: object) -> Path:
    """A copy of `bundle` whose manifest's smoke section (what the device re-checks) has `changes`, the manifest
    rewritten to stay consistent: as if the build machine had recorded other numbers than this machine reproduces."""
    import shutil

    from edgepack.bundle import write_manifest

    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns(".cache"))
    doc = json.loads((bundle / "edgepack.json").read_text())
    doc["smoke"].update(changes)
    write_manifest(dest, {k: v for k, v in doc.items() if k not in ("files", "content_sha256", "bundle_id", "schema")})
    return dest


def smoke_line(proc: subprocess.CompletedProcess[str]) -> dict:
    """The smoke result: the last line of smoke_test.py's stdout."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_smollm2(target: str, out: Path) -> Path:
    proc = cli("build", "--target", target, "smollm2-135m", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / f"smollm2-135m-{target}"


@pytest.fixture(scope="session")
def smollm2_rpi5_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_smollm2("rpi5", tmp_path_factory.mktemp("dist-rpi5"))


@pytest.fixture(scope="session")
def smollm2_android_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M for android-arm64 (LiteRT-LM), built once per run (~1.5 min: conversion is most of it)."""
    return build_smollm2("android-arm64", tmp_path_factory.mktemp("dist-android"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_target() -> Path:
    return FIXTURES / "tiny-target.toml"


@pytest.fixture(scope="session")
def native_bundle(tiny_model: Path, tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with native/ (edgepack-chat compiled here) and no wheels, as a device without Python takes
    it, moved after the build: the program finds its libraries and model relative to itself."""
    import shutil

    out = tmp_path_factory.mktemp("dist-native")
    proc = cli("--json", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(out), "--no-wheels",
               "--native")
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = Path(envelope(proc)["result"]["bundle"])
    moved = tmp_path_factory.mktemp("elsewhere") / built.name
    shutil.copytree(built, moved)
    shutil.rmtree(built)
    return moved


@pytest.fixture(scope="session")
def smollm2_host_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real shipped model built for `host` once per run (about a minute on 2 cores)."""
    return build_smollm2("host", tmp_path_factory.mktemp("dist"))


needs_sshd = pytest.mark.skipif(not Path("/usr/sbin/sshd").exists() and not __import__("shutil").which("sshd"),
                                reason="needs OpenSSH's sshd (Debian: apt install openssh-server; .ci/run does)")


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from .sshd import make_server

    server = make_server(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def device(ssh_server, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """CLI arguments that reach the loopback 'device' as `pi.local`, with a fresh install dir."""
    cfg, kh = ssh_server.write_client_files(tmp_path)
    install = tmp_path / "device-home" / "edgepack"
    return {"args": ["--host", "pi.local", "--ssh-config", str(cfg), "--known-hosts", str(kh),
                     "--install-dir", str(install)], "install_dir": str(install), "ssh_config": str(cfg),
            "known_hosts": str(kh)}


# A fp32 build of a tiny family checkpoint must be torch's model, not only close to it.
EXACT_QUALITY = """[quality]
max_ppl_increase_pct = 0.5
max_mean_kl = 0.001
min_top1_agreement = 0.99
min_greedy_match = 30
golden_tokens = 8

"""
# A prompt longer than the tiny families' 16-token sliding window.
LONG_PROMPT = "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file except"


def exact_fp32_target(fixture: Path, out: Path) -> Path:
    """`fixture` with scheme fp32 and the [quality] section replaced by EXACT_QUALITY."""
    import re

    text = re.sub(r'scheme = "int[48]"', 'scheme = "fp32"', fixture.read_text(), count=1)
    text = re.sub(r"\[quality\]\n.*?(?=^\[)", EXACT_QUALITY, text, count=1, flags=re.S | re.M)
    out.write_text(text)
    return out


def build_ok(model: Path, target: Path, out: Path) -> Path:
    """`edgepack build` (no wheels, --force) that must succeed; returns the bundle."""
    proc = cli("--json", "build", "--target", str(target), str(model), "--out", str(out), "--no-wheels", "--force")
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], (doc["error"] or {}).get("message") or proc.stderr[-3000:]
    return Path(doc["result"]["bundle"])


def tiny_bundle_for(tiny_dir: Path, target: Path, out: Path, *extra: str) -> Path:
    proc = cli("-q", "--json", "build", "--target", str(target), str(tiny_dir), "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(json.loads(proc.stdout)["result"]["bundle"])


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_target: Path) -> tuple[Path, Path]:
    """Two different deployable tiny bundles (different random weights), with vendored wheels."""
    from edgepack.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("tinyb")
    a = tiny_bundle_for(make_tiny_llama(root / "a" / "tiny-a", seed=0), tiny_target, root / "dist-a")
    b = tiny_bundle_for(make_tiny_llama(root / "b" / "tiny-b", seed=1), tiny_target, root / "dist-b")
    return a, b
