"""The library API: build(), inspect(), run(); each takes one frozen request and returns one frozen result."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.bundle import LockedWheel, Manifest, check_name, read_manifest, verify_bundle, write_manifest
from edgepack.context import ContextChoice
from edgepack.errors import UserError
from edgepack.fsutil import check_writable_parent, dir_bytes, staging_dir
from edgepack.models import resolve_model
from edgepack.output import to_jsonable
from edgepack.progress import ProgressEvent, ProgressFn, StageRecord, StageRecorder, silent
from edgepack.releases import DeployRequest as DeployRequest  # re-exported: the API is edgepack.api
from edgepack.releases import DeviceRequest as DeviceRequest
from edgepack.releases import FleetDeployRequest as FleetDeployRequest
from edgepack.releases import FleetRequest as FleetRequest
from edgepack.releases import ansible_role as ansible_role
from edgepack.releases import deploy as deploy
from edgepack.releases import device_status as device_status
from edgepack.releases import fleet_deploy as fleet_deploy
from edgepack.releases import fleet_rollback as fleet_rollback
from edgepack.releases import fleet_status as fleet_status
from edgepack.releases import rollback as rollback
from edgepack.runs import BenchRequest as BenchRequest
from edgepack.runs import BenchResult as BenchResult
from edgepack.runs import RunRequest as RunRequest
from edgepack.runs import Sampling as Sampling
from edgepack.runs import ServeRequest as ServeRequest
from edgepack.runs import bench as bench
from edgepack.runs import bundle_python as bundle_python
from edgepack.runs import run as run
from edgepack.runs import runner_command as runner_command
from edgepack.runs import runner_flags as runner_flags
from edgepack.runs import serve as serve
from edgepack.stages.export import export as export_stage
from edgepack.stages.export import gate
from edgepack.stages.native import FOLDER as NATIVE_FOLDER
from edgepack.stages.native import applies, build_native
from edgepack.stages.render import bundle_context, manifest_for, render, smoke_spec
from edgepack.stages.resolve import profile, resolve
from edgepack.stages.sbom import license_summary
from edgepack.stages.sbom import write as write_sbom
from edgepack.stages.validate import QualityReport, enforce, unvalidated
from edgepack.stages.wheels import requirements, vendor_wheels


@dataclass(frozen=True)
class BuildRequest:
    model: str
    target: str = "host"
    out: Path = Path("dist")
    force: bool = False
    skip_validation: bool = False
    vendor_wheels: bool = True
    native: bool | None = None  # native/ (the runtime from C); None: with vendor_wheels, where the exporter's default
    tune: bool = False  # build the profile's [tune] candidates, keep the fastest that passes the gate
    plot: Path | None = None  # with tune: a PNG of speed vs quality
    tune_on: DeviceRequest | None = None  # with tune: time the candidates on this device, not here
    format: str | None = None  # override the target's export.format (onnx | tflite)
    eval_text: Path | None = None  # score this text of the user's domain instead of the shipped one
    adapter: Path | None = None  # a PEFT LoRA adapter folder, merged into the model before export
    checks: Path | None = None  # a JSONL file of task checks gated float vs quantized (quality.checks)
    sign: Path | None = None  # a minisign secret key: sign the manifest (edgepack.json.minisig) before publishing
    use_cache: bool = True  # reuse a cached export and gate measurements (cache.py); EDGEPACK_NO_CACHE=1 also off
    context: int = 0  # prompt + reply tokens; 0 = the target's runtime.context_length, the model's own if shorter
    runtime_adapters: tuple[tuple[str, Path], ...] = ()  # (NAME, PEFT folder): shipped as adapters on the base
    lora_slots: tuple[str, ...] = ()  # PEFT module names (or "all") to give LoRA slots for adapters packed later


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    bundle_id: str
    target: str
    model: str
    scheme: str
    bytes: int
    quality: QualityReport
    stages: tuple[StageRecord, ...]
    tune: tuple[Any, ...] = ()  # CandidateResult rows when built with tune
    context: ContextChoice | None = None  # the bundle's context, where it came from and why




def build(req: BuildRequest, progress: ProgressFn = silent) -> BuildResult:
    """resolve → export → quantize (checked) → validate → wheels → render → publish."""
    stages = StageRecorder(progress)
    with stages.stage("resolve", f"target {req.target}, model {req.model}") as info:
        r = resolve(req.model, profile(req.target, fmt=req.format, eval_text=req.eval_text, checks=req.checks,
                                       tune=req.tune), adapter=req.adapter, context=req.context, progress=progress)
        info.update(r.record())
    target, source, exporter, context = r.target, r.source, r.exporter, r.context
    with_adapters = bool(req.runtime_adapters or req.lora_slots)
    if with_adapters:
        from edgepack.stages import adapters as adapter_stage

        adapter_stage.check_target(target)
    final = req.out / f"{source.name}-{target.id}"
    check_name(final.name, f"model {source.name} + target {target.id}")
    if with_adapters:
        adapter_stage.check_names(req.runtime_adapters, final.name)
    if req.sign is not None:
        from edgepack.signing import check_key

        check_key(req.sign)  # a missing key or a wrong password fails now, not after the export
    check_writable_parent(req.out, need_bytes=dir_bytes(source.hf_dir))
    with tempfile.TemporaryDirectory(prefix="edgepack-work-") as work_s, staging_dir(final, force=req.force) as tmp:
        work = Path(work_s)
        model_dir = tmp / "model"
        model_dir.mkdir()
        tune_table: tuple[Any, ...] = ()
        tuned_on = ""
        speculative = None
        if req.tune:
            if req.skip_validation:
                raise UserError("--tune needs the quality gate; it cannot be combined with --skip-validation.")
            from edgepack.stages.tune import plot, tune_stage

            with stages.stage("tune", f"{len(target.tune.candidates)} candidates from target {target.id}") as info:
                outcome = tune_stage(r, work, model_dir, req.tune_on, use_cache=req.use_cache, progress=progress)
                exported, target, report, tune_table, tuned_on = (outcome.exported, outcome.target, outcome.report,
                                                                  outcome.table, outcome.speed_measured_on)
                speculative = outcome.speculative
                info.update(chosen=next(t.name for t in tune_table if t.chosen), artifact="model/",
                            bytes=exported.bytes,
                            **({"speculative": speculative.chosen} if speculative is not None else {}))
            if req.plot:
                plot(tune_table, req.plot, f"{source.name} for {target.id}: speed vs quality ({tuned_on})")
        else:
            with stages.stage("export", f"{target.export.format} via {exporter.runtime}") as info:
                made = export_stage(source, target, model_dir, work, progress, use_cache=req.use_cache, cost=r.cost)
                exported = made.model
                info.update(artifact="model/", bytes=exported.bytes, scheme=exported.scheme, cached=made.cached)
            with stages.stage("quantize", f"checking the {exported.scheme} graph") as info:
                info.update(bytes=exported.bytes, nodes=exported.stats.nodes,
                            quantized_matmuls=exported.stats.quantized_matmuls, bits=list(exported.stats.bits))
            if req.skip_validation:
                report = unvalidated(target)
                progress(ProgressEvent("validate", "SKIPPED (--skip-validation): the manifest records it"))
            else:
                with stages.stage("validate", "quality gate against the fp32 reference") as info:
                    report, cached = gate(source, target, made, progress)
                    info.update(passed=report.passed, ppl_delta_pct=report.ppl_delta_pct, cached=cached)
                enforce(report, target)
        adapters: list[Any] = []
        if with_adapters:
            with stages.stage("adapters", f"{len(req.runtime_adapters)} runtime LoRA adapters") as info:
                adapters = adapter_stage.build(source, target, req.runtime_adapters, model_dir, tmp,
                                               context=exported.context_length, gate=not req.skip_validation,
                                               slots=req.lora_slots, progress=progress,
                                               exported=None if req.tune else made)
                info.update(artifact=f"{adapter_stage.FOLDER}/", bytes=sum(a.bytes for a in adapters),
                            adapters=[a.name for a in adapters])
        reqs = requirements(target, exported.runtime_versions)
        lock: list[LockedWheel] = []
        if req.vendor_wheels and reqs:
            with stages.stage("wheels", f"vendoring runtime wheels for {target.resolved_arch()}") as info:
                lock = vendor_wheels(target, reqs, tmp / "wheels", progress=progress)
                info.update(artifact="wheels/", bytes=dir_bytes(tmp / "wheels"), wheels=[w.file for w in lock])
        name = final.name
        ctx = bundle_context(name, source, target, exported, report, reqs, fit=r.fit)
        pack = None
        native = req.vendor_wheels and exporter.native_default if req.native is None else req.native
        if native and applies(target, exporter.native_libraries):
            with stages.stage("native", f"the runtime from C for {target.resolved_arch()}") as info:
                pack = build_native(tmp, target, exporter.native_libraries, ctx.runtime, reqs, ctx,
                                    smoke_spec(report, target), progress=progress)
                info.update(artifact="native/", bytes=pack.bytes, program=pack.program,
                            **({"why_no_program": pack.why_no_program} if pack.program is None else {}))
            ctx = replace(ctx, native_program=pack.program or f"{NATIVE_FOLDER}/")
        with stages.stage("render", f"bundle from templates/{target.runtime.template}") as info:
            files = render(ctx, target.runtime.template, tmp, systemd=target.deploy.systemd,
                           android=target.runtime.android_sample)
            doc = manifest_for(name, source, target, exported, report, reqs, lock, r.family.id, context=context,
                               fit=r.fit)
            if pack is not None:
                doc["native"] = to_jsonable(pack)
            if with_adapters:
                doc["adapters"] = to_jsonable(adapters)
                doc["export"]["lora_slots"] = list(adapter_stage.slots_in(model_dir))
                adapter_stage.with_memory(doc)
            if req.tune:
                doc["tune"] = {"speed_measured_on": tuned_on, "candidates": to_jsonable(tune_table)}
                if speculative is not None:
                    doc["tune"]["speculative"] = to_jsonable(speculative)
            files.append(write_sbom(tmp, doc, lock, target))
            manifest = write_manifest(tmp, doc)
            info.update(artifact=str(final), files=files)
        if req.sign is not None:
            from edgepack.signing import sign

            with stages.stage("sign", f"edgepack.json with {req.sign}") as info:
                sig = sign(tmp, req.sign, password=os.environ.get("EDGEPACK_KEY_PASSWORD"))
                info.update(key_id=sig.key_id, artifact=sig.signature_file)
        bundle_bytes = dir_bytes(tmp)
    progress(ProgressEvent("done", f"bundle at {final}"))
    return BuildResult(bundle=final, bundle_id=manifest.bundle_id, target=target.id, model=source.name,
                       scheme=exported.scheme, bytes=bundle_bytes, quality=report, stages=tuple(stages.records),
                       tune=tune_table, context=context)


@dataclass(frozen=True)
class PlanRequest:
    model: str
    target: str = "host"
    context: int = 0  # --context; 0 = the target's runtime.context_length, the model's own when that is longer
    format: str | None = None


def plan(req: PlanRequest, progress: ProgressFn = silent) -> Any:
    """Fit before build: parameters, weights per scheme, KV cache at the context, runtime, against the RAM; and
    the build's own peak memory and time against this machine."""
    from edgepack.plan import plan_for_target

    target = profile(req.target, fmt=req.format)
    source = resolve_model(req.model, progress=progress)
    config = json.loads((source.hf_dir / "config.json").read_text(encoding="utf-8"))
    return plan_for_target(config, target, context=req.context)


# -- read-only helpers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class InspectResult:
    bundle: Path
    manifest: Manifest
    verified: bool
    signature: str  # "unsigned", "signed by key <id> (verified against ...)", or "carries a signature ... not verified"
    licenses: dict[str, list[str]]  # license -> the components under it (from the SBOM)
    signature_key_id: str | None = None  # the key id the signature file names (None: unsigned)
    signature_verified: bool = False  # checked against a trusted key given to inspect


def inspect(bundle: Path, *, verify: bool = True, trusted_keys: tuple[str, ...] = ()) -> InspectResult:
    """A bundle folder or its packed archive: the manifest, whether its files verify, its signature (checked
    against `trusted_keys` when given: an unsigned, untrusted or altered bundle is then a SignatureError)."""
    from edgepack.bundle import SIGNATURE
    from edgepack.stages.pack import opened

    with opened(bundle) as folder:
        manifest = verify_bundle(folder) if verify else read_manifest(folder)
        sig = folder / SIGNATURE
        key_id: str | None = None
        verified = False
        signature = "unsigned"
        if trusted_keys:
            from edgepack.signing import verify as verify_signature

            info = verify_signature(folder, trusted_keys)
            key_id, verified = info.key_id, True
            signature = f"signed by key {key_id} (verified against the trusted key given)"
        elif sig.is_file():
            from edgepack.signing import signature_key_id

            key_id = signature_key_id(sig)
            signature = (f"carries a signature by key {key_id}, not verified (no trusted key given: "
                         "pass --trusted-key PUBKEY)")
        licenses = license_summary(folder)
    return InspectResult(bundle=bundle, manifest=manifest, verified=verify, signature=signature, licenses=licenses,
                         signature_key_id=key_id, signature_verified=verified)


def cache_ls(kind: str | None = None) -> dict[str, Any]:
    from edgepack.cache import Cache

    c = Cache()
    return {"root": str(c.root), "entries": c.entries(kind)}


def cache_du() -> dict[str, Any]:
    from edgepack.cache import Cache

    return Cache().usage()


def cache_clear(kind: str | None = None) -> dict[str, Any]:
    from edgepack.cache import Cache

    c = Cache()
    removed, freed = c.clear(kind)
    return {"root": str(c.root), "removed": removed, "bytes_freed": freed}


def sign(bundle: Path, key: Path) -> Any:
    """Sign a built bundle (folder or archive): the files are checked against the manifest first, then the
    manifest is signed; an archive is packed again with the signature in it."""
    from edgepack.signing import sign as sign_manifest
    from edgepack.stages.pack import archive_format, opened, write_archive

    with opened(bundle) as folder:
        verify_bundle(folder)
        info = sign_manifest(folder, key, password=os.environ.get("EDGEPACK_KEY_PASSWORD"))
        fmt = archive_format(bundle)
        if fmt and bundle.is_file():
            write_archive(folder, bundle, fmt)
    return info


@dataclass(frozen=True)
class PackResult:
    archive: Path
    bundle_id: str
    bytes: int
    sha256: str
    format: str  # "gz" or "zst"
    entries: int


def pack(bundle: Path, out: Path | None = None, fmt: str | None = None) -> PackResult:
    """One reproducible archive of a verified bundle (stages/pack.py)."""
    from edgepack.fsutil import sha256_file
    from edgepack.stages.pack import pack as pack_bundle

    archive, manifest, entries, size, got = pack_bundle(bundle, out, fmt)
    return PackResult(archive=archive, bundle_id=manifest.bundle_id, bytes=size, sha256=sha256_file(archive),
                      format=got, entries=entries)
