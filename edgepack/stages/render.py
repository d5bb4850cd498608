"""Render stage: Jinja templates (StrictUndefined) + one typed context → runner, smoke test, installer, docs."""

from __future__ import annotations

import os
import platform
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack import __version__, bundle_format
from edgepack.bundle import LockedWheel, ManifestDoc
from edgepack.errors import UnknownNameError
from edgepack.output import to_jsonable
from edgepack.resources import shipped_dir
from edgepack.source import ModelSource
from edgepack.stages.validate import QualityReport
from edgepack.targets import TargetProfile
from edgepack.versions import installed_versions

# runtime name (Exporter.runtime) → the module a bundle's Python must import
RUNTIME_MODULES = {"onnxruntime-genai": "onnxruntime_genai", "litert-lm": "litert_lm", "litert": "ai_edge_litert"}


def runtime_name(default: str, template: str) -> str:
    """The runtime a bundle uses: its template's, where that is a known runtime (tflite: litert-lm or litert)."""
    return template if template in RUNTIME_MODULES else default


@dataclass(frozen=True)
class BundleContext:
    name: str
    edgepack_version: str
    target_id: str
    target_description: str
    arch: str
    python: str
    format: str
    runtime: str
    execution_provider: str
    scheme_summary: str
    model_origin: str
    model_revision: str | None
    weights_sha256: str
    architecture: str
    threads: int
    max_new_tokens: int
    requirements: tuple[str, ...]
    import_check: str
    system_site_packages: bool
    serve_addr: str
    quality: QualityReport
    android_litertlm_version: str = ""  # the LiteRT-LM release the bundle was scored with (android/ sample)
    model_mb: float = 0.0
    context_length: int = 0  # prompt + reply tokens the bundle holds; the runner enforces it
    prompt_cache_slots: int = 0  # KV states the server keeps between requests (plan.PromptCacheSize)
    prompt_cache_tokens: int = 0  # tokens each holds (0: the context)
    speculative: str = "off"  # runtime.speculative: the requests' default
    native_program: str = ""  # native/edgepack-chat (or native/ where it was not compiled); "" = no native pack


# runtime template folder → files it renders (template name → output name, executable?)
_SHARED = {"install.sh.j2": ("install.sh", True), "README.md.j2": ("README.md", False)}
# the runner core (the same files in every bundle): command line, server, smoke test; and the manifest check
_PLAIN = ("edgepack_runner.py", "edgepack_cli.py", "edgepack_server.py", "edgepack_scenarios.py", "smoke_test.py",
          "verify_bundle.py")
_RUNTIME = {"run.py.j2": ("run.py", True)}
_ANDROID = {"README.md.j2": "android/README.md", "EdgepackModel.kt.j2": "android/EdgepackModel.kt",
            "build.gradle.kts.snippet.j2": "android/build.gradle.kts.snippet"}


def environment(template: str):  # type: ignore[no-untyped-def]
    import jinja2

    root = shipped_dir("templates")
    if not (root / template).is_dir():
        known = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")]
        raise UnknownNameError("runtime template", template, known, hint="Set runtime.template in the target.")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(root / template), str(root / "_shared")]),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def render(ctx: BundleContext, template: str, out: Path, *, systemd: bool, android: bool = False) -> list[str]:
    env = environment(template)
    files = {**_RUNTIME, **_SHARED}
    if systemd:
        files["edgepack.service.j2"] = (f"edgepack-{ctx.name}.service", False)
    written = []
    for src, (dst, executable) in files.items():
        text = env.get_template(src).render(ctx=ctx)
        path = out / dst
        path.write_text(text, encoding="utf-8")
        mode = 0o755 if executable else 0o644
        os.chmod(path, mode | stat.S_IRUSR)
        written.append(dst)
    import shutil

    # Plain files every bundle ships as they are (no template): the device-side manifest/signature check.
    for plain in _PLAIN:
        shutil.copyfile(shipped_dir("templates") / "_shared" / plain, out / plain)
        os.chmod(out / plain, 0o755)
        written.append(plain)
    # The bundle contract verify_bundle.py reads the manifest by: edgepack's own module, the same bytes.
    shutil.copyfile(Path(bundle_format.__file__), out / "bundle_format.py")
    os.chmod(out / "bundle_format.py", 0o644)
    written.append("bundle_format.py")
    if android:
        import jinja2

        root = shipped_dir("templates") / "_android"
        aenv = jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), undefined=jinja2.StrictUndefined,
                                  keep_trailing_newline=True, autoescape=False)
        (out / "android").mkdir(exist_ok=True)
        for src, dst in _ANDROID.items():
            (out / dst).write_text(aenv.get_template(src).render(ctx=ctx), encoding="utf-8")
            written.append(dst)
    return written


# -- what goes into a bundle: the template context and the manifest ------------------------------------

def tool_versions() -> dict[str, str]:
    return {"edgepack": __version__, "python": platform.python_version(),
            **installed_versions("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch")}


def scheme_summary(target: TargetProfile, options: dict[str, Any]) -> str:
    q = target.quantize
    if "recipe" in options:  # litert-torch
        return f"litert-torch recipe {options['recipe']}, KV cache {options['kv_cache_len']}"
    if q.scheme in ("fp32", "fp16"):
        return q.scheme
    parts = [f"{q.scheme} block {q.block_size}", "symmetric" if q.symmetric else "asymmetric",
             f"algorithm {q.algorithm}", f"accuracy level {q.accuracy_level}"]
    if "matmul_mixed_precision" in options:
        parts.append(f"int8 for {options['matmul_mixed_precision'].replace(':int8', '')}")
    parts.append(f"embedding {q.embedding_precision}")
    return ", ".join(parts)


GOLDEN_LOGP_TOL = 0.5  # nats, for runtimes without logits: dynamic int8 on ARM vs x86 moved some by 0.35 (measured)


def smoke_spec(report: QualityReport, target: TargetProfile) -> dict[str, Any]:
    """The manifest's "smoke" section: everything the bundle's smoke_test.py re-checks on the device
    (docs/bundle-format.md, "The smoke test")."""
    c = report.checks
    checks = None if c is None else {
        "file": c.file, "build_passed": c.quantized_passed, "allowed_drop": c.allowed_drop,
        "items": [{"id": r.id, "kind": r.kind, "value": r.value, "prompt_ids": list(r.prompt_ids),
                   "max_tokens": r.max_tokens, "float_text": r.float_text} for r in c.results]}
    return {"schema": 1, "tokens": target.deploy.smoke_tokens,
            "prompt_ids": list(report.prompt_ids), "golden_tokens": list(report.golden_tokens),
            "golden_checked": list(report.golden_checked), "golden_logp": list(report.golden_logp),
            "golden_logp_tol": GOLDEN_LOGP_TOL,
            "check_ids": list(report.device_ids), "build_ppl": report.device_ppl,
            "build_top1": list(report.device_top1),
            "max_ppl_drift_pct": target.quality.device_max_ppl_drift_pct, "min_top1": target.quality.device_min_top1,
            "task_checks": checks}


def bundle_context(name: str, source: ModelSource, target: TargetProfile, exported: Any, report: QualityReport,
                   reqs: list[str], fit: Any = None) -> BundleContext:
    """What the templates render a bundle's runner from: the same for the bundle and for a tune candidate's
    runner folder (meter.runner_folder), so the candidate is timed with the runner its bundle ships. `fit`
    (plan.Plan) sizes the prompt cache's slots; without it each holds the context."""
    from edgepack.backends import exporters

    runtime = runtime_name(exporters.get(target.export.format).runtime, target.runtime.template)
    return BundleContext(
        name=name, edgepack_version=__version__, target_id=target.id,
        target_description=target.device.description or target.id, arch=target.resolved_arch(),
        python=target.resolved_python(), format=target.export.format, runtime=runtime,
        execution_provider=target.export.execution_provider, scheme_summary=scheme_summary(target, exported.options),
        model_origin=source.origin, model_revision=source.revision, weights_sha256=source.weights_sha256,
        architecture=source.architecture, threads=target.runtime.threads,
        max_new_tokens=target.runtime.max_new_tokens, requirements=tuple(reqs),
        import_check=RUNTIME_MODULES.get(runtime, runtime), system_site_packages=not target.runtime.packages,
        serve_addr="127.0.0.1:8089", quality=report, model_mb=round(exported.bytes / 1e6, 1),
        context_length=exported.context_length,
        prompt_cache_slots=fit.prompt_cache.slots if fit is not None else target.runtime.prompt_cache_slots,
        prompt_cache_tokens=fit.prompt_cache.tokens if fit is not None else 0,
        speculative=target.speculative,
        android_litertlm_version=exported.runtime_versions.get("litert-lm-api", ""))


def manifest_for(name: str, source: ModelSource, target: TargetProfile, exported: Any, report: QualityReport,
              reqs: list[str], lock: list[LockedWheel], family: str, *, context: Any = None,
              fit: Any = None) -> ManifestDoc:
    """The manifest's document (less files and id); `context` (plan.ContextChoice) records why the bundle holds
    runtime.context_length tokens; `fit` (plan.Plan) is the runtime's memory plan, which deploy's preflight reads."""
    import hashlib


    # No absolute paths of the build machine in the manifest: the same inputs give the same edgepack.json.
    model = {k: v for k, v in to_jsonable(source).items() if k != "hf_dir"} | {"family": family}
    profile = to_jsonable(target)
    profile["source"] = Path(target.source).name
    quality = {k: v for k, v in to_jsonable(report).items() if k != "reference_cached"}
    for key in ("eval_text", "checks"):  # their names and sha256 are in "quality"; no build-machine paths here
        if getattr(target.quality, key):
            profile["quality"][key] = quality["tolerances"][key] = Path(getattr(target.quality, key)).name
    profile_sha = hashlib.sha256(Path(target.source).read_bytes()).hexdigest()
    return {
        "name": name,
        "edgepack_version": __version__,
        "target": {"id": target.id, "arch": target.resolved_arch(), "python": target.resolved_python(),
                   "wheel_platforms": list(target.device.wheel_platforms),
                   "cpu_features": list(target.device.cpu_features), "profile": profile,
                   "profile_sha256": profile_sha},
        "model": model,
        "export": {"format": exported.format, "scheme": exported.scheme, "builder_options": exported.options,
                   "graph": to_jsonable(exported.stats)},
        "quality": quality,
        "runtime": {"template": target.runtime.template, "requirements": reqs, "wheels": [w.file for w in lock],
                    "wheel_lock": to_jsonable(lock),
                    "execution_provider": target.export.execution_provider,
                    "context_length": exported.context_length,
                    "prompt_cache": {"slots": fit.prompt_cache.slots if fit is not None else 0,
                                     "tokens": fit.prompt_cache.tokens if fit is not None else 0},
                    "speculative": target.speculative,
                    **({"context": {"source": context.source, "requested": context.requested,
                                    "model_context": context.model_context, "reason": context.reason}}
                       if context is not None else {}),
                    **({"memory": {"peak_bytes": fit.total, "weights_bytes": fit.weights.resident,
                                   "kv_cache_bytes": fit.kv.allocated, "prefill_bytes": fit.prefill,
                                   "runtime_bytes": fit.runtime_overhead, "context": fit.kv.context,
                                   "prompt_cache_bytes": fit.prompt_cache.kept}}
                       if fit is not None else {})},
        "smoke": smoke_spec(report, target),
        "tools": tool_versions(),
        "validated": report.validated,
    }
