"""Releases on devices: deploy, status and rollback, for one device over SSH (or adb) and for an Ansible fleet.

The library API for `edgepack deploy/status/rollback` (cli_device.py); `edgepack.api` re-exports it. The device
side is edgepack/remote (one device) and edgepack/fleet.py (ansible-runner)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle import read_once, verify_bundle
from edgepack.bundle_format import install_dir as install_dir_from
from edgepack.errors import UserError
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.remote.ssh import SSHOptions  # a plain dataclass: paramiko is imported only on connect


@dataclass(frozen=True)
class DeviceRequest(SSHOptions):
    """Which device, how to reach it (the SSH options), and where its releases live."""

    install_dir: str | None = None  # default: the bundle target's deploy.install_dir, else ~/edgepack
    target: str | None = None  # without a bundle (status, rollback, bench): the target whose deploy.install_dir applies


@dataclass(frozen=True)
class DeployRequest:
    device: DeviceRequest
    bundle: Path | None = None  # None: the newest bundle under dist/
    dist: Path = Path("dist")
    allow_network: bool = False
    keep: int | None = None
    via: str = "ssh"  # ssh | adb (push to an Android device; host = adb serial, optional)
    require_signature: tuple[str, ...] = ()  # minisign public keys (files or base64): refuse anything else
    serve_addr: str = ""  # the service's address on the device; "" = the target's deploy.serve_addr
    target: str | None = None  # this machine's target (id or file) whose [deploy] trusted_keys apply


def latest_bundle(dist: Path) -> Path:
    candidates = sorted((p.parent for p in dist.glob("*/edgepack.json")),
                        key=lambda p: (p / "edgepack.json").stat().st_mtime)
    if not candidates:
        raise UserError(f"no bundle given and none found in {dist}/.",
                        hint="Build one first (`edgepack build --target rpi5 smollm2-135m`) or pass its folder.",
                        code="bundle_not_found")
    return candidates[-1]


def deploy(req: DeployRequest, progress: ProgressFn = silent) -> Any:
    """verify locally (+ signature) → connect → preflight → lock → upload → verify → install → smoke → switch.
    A packed archive is unpacked (every entry checked) into a temp folder first."""
    from edgepack.stages.pack import opened

    given = req.bundle or latest_bundle(req.dist)
    if req.bundle is None:
        progress(ProgressEvent("bundle", f"no bundle given: deploying the newest in {req.dist}/: {given.name}"))
    with opened(given) as bundle:
        if bundle != given:
            progress(ProgressEvent("bundle", f"unpacked {given.name} (every entry checked) into a temp folder"))
        return _deploy_folder(req, bundle, progress)


def _deploy_folder(req: DeployRequest, bundle: Path, progress: ProgressFn) -> Any:
    from edgepack.remote.deploy import deploy as remote_deploy
    from edgepack.remote.ssh import Connection
    from edgepack.signing import deploy_policy

    progress(ProgressEvent("bundle", f"verifying {bundle} against its manifest"))
    manifest_bytes, manifest = read_once(bundle)
    verify_bundle(bundle, manifest)
    policy = deploy_policy(bundle, manifest_bytes, manifest, req.require_signature, req.target, progress)
    trusted, signature = policy.keys, policy.signature
    install_dir = install_dir_from(req.device.install_dir, manifest.deploy.install_dir)
    keep = req.keep or manifest.deploy.keep_releases
    device = dataclasses.replace(req.device, default_port=manifest.deploy.ssh_port)
    if req.via == "adb":
        from edgepack.remote.adb import deploy_adb

        if manifest.base_id:
            raise UserError(f"{bundle.name} is an adapter pack; over adb a phone gets whole bundles.",
                            hint="Build the bundle with all its adapters (edgepack build --runtime-adapter NAME=DIR "
                                 "...) and deploy that, or deploy the pack over SSH (--host).", code="invalid_input")

        return deploy_adb(bundle, manifest, manifest_bytes, serial=req.device.host or None, trusted=trusted,
                          signature=signature, progress=progress)
    with Connection(device) as conn:
        return remote_deploy(conn, bundle, manifest, install_dir=install_dir, allow_network=req.allow_network,
                             keep=keep, smoke_tokens=manifest.deploy.smoke_tokens, trusted=trusted,
                             signature=signature, serve_addr=req.serve_addr, progress=progress,
                             manifest_bytes=manifest_bytes)


def install_dir_of(device: DeviceRequest) -> str:
    """--install-dir, else the --target's deploy.install_dir, else ~/edgepack (the contract's one precedence)."""
    from edgepack.bundle_format import install_dir
    from edgepack.targets import load_target

    return install_dir(device.install_dir, load_target(device.target).deploy.install_dir if device.target else None)


def device_status(device: DeviceRequest) -> dict[str, Any]:
    from edgepack.remote.deploy import status
    from edgepack.remote.ssh import Connection

    with Connection(device) as conn:
        return status(conn, install_dir_of(device))


@dataclass(frozen=True)
class FleetRequest:
    inventory: Path
    limit: str | None = None  # an Ansible host pattern
    forks: int = 10  # hosts at once
    ssh: DeviceRequest = DeviceRequest(host="")  # options every host shares (known_hosts, ssh_config, timeouts)


def fleet_status(req: FleetRequest) -> dict[str, Any]:
    """`status` of every inventory host, `forks` at a time. A host that cannot be read is its own row; when any
    is, the result is an error (fleet_hosts_failed) that still carries every row."""
    from edgepack.fleet import each_host, load_inventory

    hosts = load_inventory(req.inventory, req.limit)

    def one(h: Any) -> dict[str, Any]:
        device = dataclasses.replace(req.ssh, host=h.host, port=h.port or req.ssh.port, user=h.user or req.ssh.user,
                                     identity=h.identity or req.ssh.identity,
                                     install_dir=h.install_dir or req.ssh.install_dir)
        return device_status(device)

    rows = each_host(hosts, one, req.forks)
    failed = [r["name"] for r in rows if not r["ok"]]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} hosts could not be read: {', '.join(failed[:5])}.",
                        hint="Each host's row has its error and code; the other rows are complete.",
                        code="fleet_hosts_failed", hosts=rows, failed=failed)
    return {"inventory": str(req.inventory), "hosts": rows}


@dataclass(frozen=True)
class FleetDeployRequest:
    fleet: FleetRequest
    bundle: Path | None = None  # None: the newest bundle under dist/
    dist: Path = Path("dist")
    batches: Any = None  # fleet.Batches (None: canary 1, then 10% batches, no failure tolerated)
    allow_network: bool = False
    keep: int | None = None
    require_signature: tuple[str, ...] = ()
    serve_addr: str = ""
    target: str | None = None  # this machine's target whose [deploy] trusted_keys apply (as DeployRequest.target)


def fleet_deploy(req: FleetDeployRequest, progress: ProgressFn = silent) -> dict[str, Any]:
    """edgepack's own playbook and role (never a bundle's ansible/ folder: the bundle is data, its manifest and the
    files it lists) on every inventory host through ansible-runner, in batches: canary first, halting as Ansible's
    max_fail_percentage says. Checked here first as for one device."""
    from edgepack.bundle import MANIFEST, SIGNATURE
    from edgepack.fleet import Batches, check_rollout, run_playbook
    from edgepack.signing import deploy_policy
    from edgepack.stages.pack import opened

    batches = req.batches or Batches()
    serial, max_fail = batches.serial(), batches.max_fail_percentage()
    given = req.bundle or latest_bundle(req.dist)
    with opened(given) as bundle:
        manifest_bytes, manifest = read_once(bundle)
        verify_bundle(bundle, manifest)
        policy = deploy_policy(bundle, manifest_bytes, manifest, req.require_signature, req.target, progress)
        trusted, signature = policy.keys, policy.signature
        extra: dict[str, Any] = {"edgepack_allow_network": req.allow_network,
                                 "edgepack_trusted_keys": [key for _, key in trusted],
                                 "edgepack_require_signature": bool(trusted)}
        extra |= {"edgepack_keep": req.keep} if req.keep else {}
        extra |= {"edgepack_serve_addr": req.serve_addr} if req.serve_addr else {}
        extra |= {"edgepack_default_install_dir": req.fleet.ssh.install_dir} if req.fleet.ssh.install_dir else {}
        sent = [p for p in (bundle / MANIFEST, bundle / SIGNATURE) if p.is_file()]
        out = run_playbook("deploy.yml", req.fleet.inventory, limit=req.fleet.limit, forks=req.fleet.forks,
                           serial=serial, max_fail=max_fail, extravars=extra, ssh=req.fleet.ssh, progress=progress,
                           always_sent=(len(sent), sum(p.stat().st_size for p in sent)), bundle=bundle,
                           files={f.path: f.bytes for f in manifest.files})
    out = {"inventory": str(req.fleet.inventory), "bundle_id": manifest.bundle_id, "signature": signature} | out
    return check_rollout(out, "rollout")


def fleet_rollback(req: FleetDeployRequest, progress: ProgressFn = silent) -> dict[str, Any]:
    """Every inventory host back to its previous release, in the same batches (edgepack's own role)."""
    from edgepack.fleet import Batches, check_rollout, run_playbook

    batches = req.batches or Batches()
    out = run_playbook("rollback.yml", req.fleet.inventory, limit=req.fleet.limit, forks=req.fleet.forks,
                       serial=batches.serial(), max_fail=batches.max_fail_percentage(),
                       extravars={"edgepack_default_install_dir": req.fleet.ssh.install_dir or "~/edgepack"},
                       ssh=req.fleet.ssh, progress=progress)
    return check_rollout({"inventory": str(req.fleet.inventory)} | out, "rollback")


def ansible_role(out: Path, force: bool = False) -> dict[str, Any]:
    """edgepack's Ansible role and playbooks written to `out`, for plain ansible-playbook (the ones `deploy
    --inventory` runs)."""
    from edgepack.fleet import export_role

    return export_role(out, force)


def rollback(device: DeviceRequest) -> dict[str, Any]:
    from edgepack.remote.deploy import rollback as remote_rollback
    from edgepack.remote.ssh import Connection

    with Connection(device) as conn:
        return remote_rollback(conn, install_dir_of(device))


