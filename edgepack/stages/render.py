"""Render stage: Jinja templates (StrictUndefined) + one typed context → runner, smoke test, installer, docs."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import UnknownNameError
from edgepack.resources import shipped_dir
from edgepack.stages.validate import QualityReport


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
    smoke_tokens: int
    prompt_ids: tuple[int, ...]
    golden_tokens: tuple[int, ...]
    golden_checked: tuple[bool, ...]
    device_ids: tuple[int, ...]
    device_ppl: float | None
    device_top1: tuple[int, ...]
    device_max_ppl_drift_pct: float
    device_min_top1: float
    requirements: tuple[str, ...]
    import_check: str
    system_site_packages: bool
    service_dir: str
    serve_addr: str
    quality: QualityReport
    android_litertlm_version: str = ""  # the LiteRT-LM release the bundle was scored with (android/ sample)
    model_mb: float = 0.0
    golden_logp: tuple[float, ...] = ()
    context_length: int = 0  # prompt + reply tokens the bundle holds; the runner enforces it
    checks_json: str = "null"  # the task checks the smoke test re-runs (see device_checks())


# runtime template folder → files it renders (template name → output name, executable?)
_SHARED = {"install.sh.j2": ("install.sh", True), "README.md.j2": ("README.md", False)}
_RUNTIME = {"run.py.j2": ("run.py", True), "smoke_test.py.j2": ("smoke_test.py", True)}
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
