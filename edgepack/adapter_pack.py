"""Adapter packs: new runtime adapters for a built base bundle, shipped without the base.

A pack is a folder holding a complete, signable manifest of the release it makes on the device (the base bundle's
files, every adapter, `base` naming the bundle it extends) and only the files the base does not have: the new
adapters' `.onnx_adapter` files and the SBOM that lists them. Deploying it sends those; the device links every
other file from the base release it already has (by sha256), checks all of them against the signed manifest, and
installs, smoke-tests and switches to it like any release (and rolls back the same way).

The pack's adapter set is the base bundle's adapters plus the ones given (a name given again replaces the old).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST, SIGNATURE, Manifest, verify_bundle, write_manifest
from edgepack.errors import UserError
from edgepack.fsutil import dir_bytes, staging_dir
from edgepack.output import to_jsonable
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.stages.sbom import SBOM


@dataclass(frozen=True)
class PackRequest:
    bundle: Path  # a built ONNX bundle with LoRA slots (--runtime-adapter or --lora-slots)
    adapters: tuple[tuple[str, Path], ...]  # (NAME, PEFT folder)
    out: Path | None = None  # default: <bundle>.adapters-<names> beside the bundle
    model: str | None = None  # the float base for the gate; default: where the bundle's model came from
    target: str | None = None  # the target profile for the gate's tolerances; default: the one the bundle records
    eval_text: Path | None = None  # the adapters' own task text and checks
    checks: Path | None = None
    skip_validation: bool = False
    sign: Path | None = None
    force: bool = False


@dataclass(frozen=True)
class PackResult:
    pack: Path
    bundle_id: str  # the release the pack makes on the device
    base_id: str
    adapters: tuple[str, ...]  # every adapter of that release
    added: tuple[str, ...]  # the ones this pack brings
    bytes: int  # what the pack holds (what a deploy sends at most)
    release_bytes: int  # the whole release on the device
    signed: bool


def pack(req: PackRequest, progress: ProgressFn = silent) -> PackResult:
    from edgepack.models import resolve_model
    from edgepack.stages import adapters as adapter_stage
    from edgepack.stages.resolve import built_with, profile, with_texts
    from edgepack.stages.sbom import build_sbom

    bundle = req.bundle.expanduser().resolve()
    base = verify_bundle(bundle)
    if base.base_id:
        raise UserError(f"{bundle} is an adapter pack; a pack extends a built bundle.",
                        hint=f"Pass the base bundle ({base.base_id}) and name every adapter the release should "
                             "have.", bundle=str(bundle))
    slots = adapter_stage.slots_in(bundle / "model") if base.format == "onnx" else ()
    if not slots:
        raise UserError(f"{bundle.name} has no LoRA slots, so no adapter can be added to it without a new base.",
                        hint="Build the base with --runtime-adapter NAME=DIR or --lora-slots all (`edgepack build "
                             "--lora-slots q_proj,v_proj,...`), deploy it once, then pack adapters for it.",
                        bundle=str(bundle))
    target = (profile(req.target, eval_text=req.eval_text, checks=req.checks) if req.target else
              with_texts(built_with(bundle / MANIFEST, dict(base.doc)), req.eval_text, req.checks))
    source = resolve_model(req.model or str(base.doc["model"]["origin"]), progress=progress)
    if source.weights_sha256 != base.doc["model"]["weights_sha256"]:
        raise UserError(f"{source.name} is not the model {bundle.name} was built from (weights sha256 "
                        f"{source.weights_sha256[:12]} vs {str(base.doc['model']['weights_sha256'])[:12]}).",
                        hint="Pass --model with the float model the bundle was built from (the gate scores each "
                             "adapter against it, merged).", bundle=str(bundle))
    adapter_stage.check_names(req.adapters, base.name)
    names = tuple(n for n, _ in req.adapters)
    out = (req.out or bundle.parent / f"{bundle.name}.adapters-{'-'.join(names)}").expanduser().resolve()
    with staging_dir(out, force=req.force) as tmp:
        progress(ProgressEvent("adapters", f"{', '.join(names)} for {base.bundle_id}'s slots ({', '.join(slots)})"))
        made = adapter_stage.adapters_for(source, target, req.adapters, bundle / "model", tmp,
                                          context=int(base.doc["runtime"]["context_length"]),
                                          gate=not req.skip_validation, progress=progress)
        doc = _release_doc(base, to_jsonable(made))
        (tmp / SBOM).write_text(build_sbom(doc, list(base.wheel_lock), bundle / "wheels", _epoch()),
                                encoding="utf-8")
        carried = {f"{adapter_stage.FOLDER}/{n}.onnx_adapter" for n in names} | {SBOM}
        inherited = tuple(f for f in base.files if f.path not in carried and f.path in _kept(base, doc))
        manifest = write_manifest(tmp, doc, inherited)
        if req.sign is not None:
            import os

            from edgepack.signing import sign

            sign(tmp, req.sign, password=os.environ.get("EDGEPACK_KEY_PASSWORD"))
        size = dir_bytes(tmp)
    progress(ProgressEvent("done", f"adapter pack at {out}: {size} bytes for a {manifest.bytes}-byte release"))
    return PackResult(pack=out, bundle_id=manifest.bundle_id, base_id=base.bundle_id, adapters=manifest.adapters,
                      added=names, bytes=size, release_bytes=manifest.bytes, signed=(out / SIGNATURE).is_file())


def _release_doc(base: Manifest, added: list[dict[str, Any]]) -> dict[str, Any]:
    """The base's manifest document with the adapter set replaced and `base` naming the bundle it extends."""
    doc = {k: v for k, v in json.loads(json.dumps(base.doc)).items()
           if k not in ("bundle_id", "files", "content_sha256", "schema")}
    names = {a["name"] for a in added}
    doc["adapters"] = sorted([a for a in doc.get("adapters", []) if a["name"] not in names] + added,
                             key=lambda a: a["name"])
    doc["base"] = {"bundle_id": base.bundle_id, "name": base.name}
    from edgepack.stages.adapters import with_memory

    return with_memory(doc)


def _kept(base: Manifest, doc: dict[str, Any]) -> set[str]:
    """The base's files the release keeps: all but the adapters it replaces."""
    keep = {a["file"] for a in doc["adapters"]}
    return {f.path for f in base.files if not f.path.startswith("adapters/") or f.path in keep}


def _epoch() -> int:
    from edgepack.stages.pack import source_date_epoch

    return source_date_epoch()

