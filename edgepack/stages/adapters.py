"""Runtime adapters stage: LoRA slots in the exported base, one `.onnx_adapter` per fine-tune, each gated as
quantized base + adapter against its float merged model (the adapter's own task: --eval-text, --checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle_format import ADAPTER_RE
from edgepack.errors import ModelError, UserError
from edgepack.fsutil import sha256_file
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.source import ModelSource
from edgepack.stages.validate import QualityReport
from edgepack.targets import TargetProfile

FOLDER = "adapters"
LITERT_REFUSAL = ("LiteRT-LM documents runtime LoRA for its GPU backend; on CPU (measured with litert-lm 0.18.1, "
                  "docs/models.md) it applies one only to a model whose signatures and adapter file are rewritten "
                  "by hand, at ranks 16 and 32, attention only, and litert-torch cannot export it for grouped-query "
                  "attention")


@dataclass(frozen=True)
class AdapterEntry:
    """One runtime adapter of a bundle: its file, where it came from, its gate and its smoke checks."""

    name: str
    file: str  # adapters/NAME.onnx_adapter, relative to the bundle
    sha256: str
    bytes: int
    rank: int
    modules: tuple[str, ...]
    parameters: int
    source_sha256: str  # of the PEFT folder's adapter_config.json + weights (adapter.merge_adapter)
    base_model: str  # what adapter_config.json says it was trained on
    license: str
    quality: QualityReport
    smoke: dict[str, Any]


def parse(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, Path], ...]:
    """NAME=DIR items (--runtime-adapter, `adapter pack`) → ((name, folder), ...); a bad one is a UserError."""
    out: list[tuple[str, Path]] = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise UserError(f"{item!r} is not NAME=DIR.", hint="Pass --runtime-adapter summarize=./my-lora: a name "
                                                                "for the adapter and its PEFT folder.")
        check_name(name)
        if name in {n for n, _ in out}:
            raise UserError(f"the adapter name {name!r} is given twice.", hint="Give each adapter its own name.")
        out.append((name, Path(folder).expanduser().resolve()))
    return tuple(out)


def check_name(name: str) -> str:
    if not ADAPTER_RE.match(name):
        raise UserError(f"{name!r} is not a usable adapter name.",
                        hint="Use 1-48 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit "
                             "(it becomes a file name and the server's model id).", adapter=name)
    return name


def check_names(adapters: tuple[tuple[str, Path], ...], bundle_name: str) -> None:
    """An adapter may not be called what the bundle is: the server's model ids are the bundle's name and theirs."""
    if any(name == bundle_name for name, _ in adapters):
        raise UserError(f"the adapter name {bundle_name!r} is the bundle's own name (the server's id for the base).",
                        hint="Give the adapter another name.", adapter=bundle_name)


def check_target(target: TargetProfile) -> None:
    """Before any export: runtime adapters and LoRA slots need an ONNX bundle (onnxruntime-genai's adapter
    inputs)."""
    if target.export.format != "onnx":
        raise UserError(f"target {target.id} builds a {target.export.format} bundle: {LITERT_REFUSAL}.",
                        hint="Build each fine-tune as its own merged model with --adapter DIR, or use an ONNX "
                             "target (--format onnx) to ship runtime adapters.", target=target.id)


def build(base: ModelSource, target: TargetProfile, adapters: tuple[tuple[str, Path], ...], model_dir: Path,
          bundle_dir: Path, *, context: int, gate: bool, slots: tuple[str, ...] = (), exported: Any = None,
          progress: ProgressFn = silent) -> list[AdapterEntry]:
    """Adds the slots the adapters need (and those `slots` names, for adapters packed later) to the base graph in
    `model_dir`, then writes and gates each adapter (adapters_for)."""
    from edgepack.backends import lora

    specs = [lora.read_spec(name, folder) for name, folder in adapters]
    modules = lora.slots_of([m for spec in specs for m in spec.modules] + list(slots))
    n = lora.add_slots(model_dir, modules)
    progress(ProgressEvent("adapters", f"LoRA slots for {', '.join(modules)} at {n} MatMuls of the base graph"))
    return adapters_for(base, target, adapters, model_dir, bundle_dir, context=context, gate=gate,
                        exported=exported, progress=progress)


def slots_in(model_dir: Path) -> tuple[str, ...]:
    """The modules a base graph has LoRA slots for (q_proj, ...)."""
    from edgepack.backends import lora

    return lora.slot_modules(model_dir)


def adapters_for(base: ModelSource, target: TargetProfile, adapters: tuple[tuple[str, Path], ...],
                 model_dir: Path, bundle_dir: Path, *, context: int, gate: bool, exported: Any = None,
                 progress: ProgressFn = silent) -> list[AdapterEntry]:
    """Each adapter written under `bundle_dir`/adapters for the slots of the base graph in `model_dir`, and gated
    (unless `gate` is off) against its float merged model; a failing adapter is a QualityGateError naming it.
    `exported` (stages.export.Exported, the base's export in `model_dir`): the gate's measurements are cached."""
    from edgepack.adapter import merge_adapter
    from edgepack.backends import lora
    from edgepack.stages.render import smoke_spec
    from edgepack.stages.validate import enforce, unvalidated, validate

    out = []
    for spec in (lora.read_spec(name, folder) for name, folder in adapters):
        rel = f"{FOLDER}/{spec.name}{lora.SUFFIX}"
        facts = lora.write_adapter(spec, model_dir, bundle_dir / rel)
        merged = merge_adapter(base, spec.folder, progress=progress)
        if gate:
            progress(ProgressEvent("adapters", f"gating {spec.name}: quantized base + adapter vs the float merged "
                                               "model"))
            if exported is not None:
                from edgepack.stages.export import gate as cached_gate

                report, _ = cached_gate(merged, target, exported, progress, adapter=bundle_dir / rel,
                                        slots=slots_in(model_dir))
            else:
                report = validate(merged, model_dir, target, context=context, progress=progress,
                                  adapter=bundle_dir / rel)
            enforce(report, target, subject=f"runtime adapter '{spec.name}'")
        else:
            report = unvalidated(target)
        info = merged.adapter
        if info is None:  # merge_adapter always records it
            raise ModelError(f"the adapter {spec.name} was merged without its record.")
        out.append(AdapterEntry(
            name=spec.name, file=rel, sha256=sha256_file(bundle_dir / rel), bytes=(bundle_dir / rel).stat().st_size,
            rank=spec.rank, modules=spec.modules, parameters=int(facts["parameters"]), source_sha256=info.sha256,
            base_model=info.base_model, license=adapter_license(spec.folder, base), quality=report,
            smoke=smoke_spec(report, target)))
    return out


def with_memory(doc: Any) -> Any:
    """The manifest's runtime memory plan with its adapters: the runner loads every adapter file at start, each
    resident at its size (bench/adapters.py: +18.6 MB RSS for a 19.6 MB file), so deploy's preflight counts them."""
    memory = doc.get("runtime", {}).get("memory")
    if isinstance(memory, dict) and "peak_bytes" in memory:
        now = sum(int(a["bytes"]) for a in doc.get("adapters", []))
        memory["peak_bytes"] = int(memory["peak_bytes"]) - int(memory.get("adapters_bytes", 0)) + now
        memory["adapters_bytes"] = now
    return doc


def adapter_license(folder: Path, base: ModelSource) -> str:
    """The license the adapter's model card (README.md front matter, as PEFT writes it) names; else the base's."""
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip().strip("'\"")
    return base.license or ""
