"""Fleets: devices from an Ansible inventory (INI or YAML, read by ansible-core itself), read-only operations on
all of them at once (`edgepack status --inventory`), and rollouts with edgepack's own Ansible role and playbooks
(never a bundle's: a bundle is data, a device's answer is checked against its manifest).

Each host's connection comes from the usual Ansible variables: `ansible_host`, `ansible_port`, `ansible_user`,
`ansible_ssh_private_key_file`, and `edgepack_install_dir` for where its releases live. Host keys are checked as
strictly as for one device, against the same known_hosts file, and Ansible's modules run on the same `python3`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError, UserError, require
from edgepack.progress import ProgressEvent, ProgressFn


@dataclasses.dataclass(frozen=True)
class FleetHost:
    name: str  # the inventory name
    host: str  # ansible_host, else the name
    port: int | None
    user: str | None
    identity: Path | None
    install_dir: str | None


def load_inventory(path: Path, limit: str | None = None) -> list[FleetHost]:
    """The inventory's hosts in inventory order (the canary is the first), narrowed by an Ansible host pattern."""
    if not path.is_file():
        raise UserError(f"inventory {path} does not exist.", hint="Pass an Ansible inventory file (INI or YAML).",
                        code="invalid_input")
    require("ansible", "fleet", "Reading an Ansible inventory")
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(path)])
    variables = VariableManager(loader=loader, inventory=inventory)
    hosts = inventory.get_hosts(limit or "all")
    if not hosts:
        raise UserError(f"no hosts in {path}" + (f" match --limit {limit!r}" if limit else "") + ".",
                        hint="`ansible-inventory -i FILE --list` shows what Ansible reads from it.",
                        code="invalid_input")
    out = []
    for h in hosts:
        v = variables.get_vars(host=h)
        key = v.get("ansible_ssh_private_key_file") or v.get("ansible_private_key_file")
        port = v.get("ansible_port") or v.get("ansible_ssh_port")
        out.append(FleetHost(name=h.name, host=str(v.get("ansible_host") or h.name),
                             port=int(port) if port else None, user=v.get("ansible_user"),
                             identity=Path(str(key)).expanduser() if key else None,
                             install_dir=v.get("edgepack_install_dir")))
    return out


def each_host(hosts: list[FleetHost], fn: Callable[[FleetHost], dict[str, Any]], forks: int) -> list[dict[str, Any]]:
    """fn on every host, `forks` at a time; a host's failure is its row (`ok: false` and the error), not the end."""

    def one(h: FleetHost) -> dict[str, Any]:
        try:
            return {"name": h.name, "ok": True, **fn(h)}
        except EdgepackError as exc:
            return {"name": h.name, "ok": False, "host": h.host, "error": exc.to_dict()}

    with ThreadPoolExecutor(max_workers=max(1, forks)) as pool:
        return list(pool.map(one, hosts))


# -- edgepack's own role and playbooks ------------------------------------------------------------------------

ROLE_PLAYBOOKS = ("deploy.yml", "rollback.yml")
ROLE = "roles/edgepack_release"


def write_role(out: Path) -> list[str]:
    """edgepack's Ansible role and playbooks (templates/_shared/ansible, plain files: Ansible templates them itself)
    with the device program `edgepack deploy` runs as the role's files/edgepack-device.py, into `out`: deploy.yml,
    rollback.yml, roles/edgepack_release/. Rollouts run these, never anything that came inside a bundle."""
    import os
    import shutil

    from edgepack.remote.program import device_program
    from edgepack.resources import shipped_dir

    shutil.copytree(shipped_dir("templates") / "_shared" / "ansible", out, dirs_exist_ok=True)
    files = out / ROLE / "files"
    files.mkdir(exist_ok=True)
    (files / "edgepack-device.py").write_text(device_program(), encoding="utf-8")
    written = [out / n for n in ROLE_PLAYBOOKS] + list((out / ROLE).rglob("*"))
    for p in [out / ROLE, *written]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return sorted(p.relative_to(out).as_posix() for p in written if p.is_file())


def export_role(out: Path, force: bool = False) -> dict[str, Any]:
    """`edgepack ansible-role --out DIR`: the role and playbooks for plain ansible-playbook. Other files in DIR are
    left alone; an earlier copy of the role is replaced only with `force`."""
    import shutil

    from edgepack.fsutil import check_writable_parent

    there = [n for n in (*ROLE_PLAYBOOKS, ROLE) if (out / n).exists() or (out / n).is_symlink()]
    if there and not force:
        raise UserError(f"{out} already has {', '.join(there)}.", hint="Pass --force to replace them with this "
                        "edgepack's copy, or choose another --out.", code="output_exists", path=str(out))
    check_writable_parent(out)
    for n in there:
        p = out / n
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    files = write_role(out)
    return {"out": str(out), "files": files, "deploy": str(out / "deploy.yml"), "rollback": str(out / "rollback.yml")}


# -- rollouts: edgepack's own playbooks, driven through ansible-runner ----------------------------------------

@dataclasses.dataclass(frozen=True)
class Batches:
    """Ansible's `serial` and `max_fail_percentage` as `--canary`, `--batch`, `--max-fail` give them."""

    canary: int = 1
    batch: str = "10%"  # hosts per batch after the canary: a count or a percentage of the hosts in the play
    max_fail: str = "0%"  # a batch with MORE failures than this (per batch; exceeded, not reached) ends the rollout

    def serial(self) -> list[int | str]:
        batch = self.batch.strip()
        if not (batch.rstrip("%").isdigit() and int(batch.rstrip("%")) > 0):
            raise UserError(f"--batch {self.batch!r} is not a host count or a percentage.",
                            hint="e.g. --batch 10 or --batch 10%", code="invalid_input")
        if self.canary < 0:
            raise UserError("--canary must be 0 (no canary batch) or more hosts.", code="invalid_input")
        rest: int | str = batch if batch.endswith("%") else int(batch)
        return ([self.canary] if self.canary else []) + [rest]

    def max_fail_percentage(self) -> float:
        text = self.max_fail.strip().rstrip("%")
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 100:
            raise UserError(f"--max-fail {self.max_fail!r} is not a percentage from 0 to 100.",
                            hint="e.g. --max-fail 5%", code="invalid_input")
        return value


def plan_batches(names: list[str], serial: list[int | str]) -> list[list[str]]:
    """The batches Ansible makes of the play's hosts (its PlaybookExecutor._get_serialized_batches)."""
    from ansible.utils.helpers import pct_to_int

    out: list[list[str]] = []
    rest, i = list(names), 0
    while rest:
        n = pct_to_int(serial[min(i, len(serial) - 1)], len(names))
        n = len(rest) if n <= 0 else n
        out.append(rest[:n])
        rest, i = rest[n:], i + 1
    return out


def known_hosts_files(hosts: list[FleetHost], ssh: Any) -> list[Path]:
    """The known_hosts file each host's key is checked against, as `edgepack deploy --host` picks it (the one rule,
    remote.ssh.known_hosts_file: --known-hosts, else the host's ssh_config UserKnownHostsFile, else
    $HOME/.ssh/known_hosts), each file once, in inventory order."""
    from edgepack.remote.ssh import known_hosts_file, ssh_config_entry

    config = Path(ssh.ssh_config) if ssh.ssh_config else None
    files = [known_hosts_file(Path(ssh.known_hosts) if ssh.known_hosts else None,
                              {} if ssh.known_hosts else ssh_config_entry(h.host, config)) for h in hosts]
    return list(dict.fromkeys(f.resolve() for f in files))


def ansible_env(ssh: Any, hosts: list[FleetHost]) -> dict[str, str]:
    """Ansible's OpenSSH as strict as edgepack's own connection: known_hosts checked, nothing accepted silently
    (ansible-runner turns host key checking OFF unless it is set), against the known_hosts file edgepack's own
    connection uses: OpenSSH would read the passwd entry's home, not $HOME (they differ in CI containers). Ansible's
    modules run on the device's `python3`, as edgepack's helper does: the role's defaults say so (an inventory's
    ansible_python_interpreter wins)."""
    import shlex

    files = known_hosts_files(hosts, ssh)
    if ssh.accept_new_host_key and files:  # OpenSSH saves a new key to the first file; paramiko makes its folder
        files[0].parent.mkdir(parents=True, exist_ok=True)
    args = ["-o", "StrictHostKeyChecking=" + ("accept-new" if ssh.accept_new_host_key else "yes")]
    if files:  # OpenSSH splits the value on spaces: a path with one is quoted
        args += ["-o", "UserKnownHostsFile=" + " ".join(f'"{f}"' if " " in str(f) else str(f) for f in files)]
    if ssh.ssh_config:
        args += ["-F", str(Path(ssh.ssh_config).resolve())]
    return {"ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_SSH_COMMON_ARGS": shlex.join(args),
            "ANSIBLE_TIMEOUT": str(int(ssh.connect_timeout)), "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOLOR": "1"}


def _unreachable_code(msg: str) -> str:
    return "host_key_unknown" if "Host key verification failed" in msg else \
        "host_key_changed" if "REMOTE HOST IDENTIFICATION HAS CHANGED" in msg else "ssh_unreachable"


class _Tracker:
    """Turns ansible-runner's events into one row per host, and progress lines."""

    def __init__(self, hosts: list[FleetHost], batches: list[list[str]], progress: ProgressFn,
                 always_sent: tuple[int, int], files: dict[str, int]) -> None:
        self.progress = progress
        self.always_sent = always_sent  # (files, bytes) sent with every upload: the manifest and its signature
        self.files = files  # the manifest's path → bytes: what a device's answer is counted against
        self.batch_of = {name: i + 1 for i, batch in enumerate(batches) for name in batch}
        self.batches = batches
        self.rows: dict[str, dict[str, Any]] = {
            h.name: {"name": h.name, "host": h.host, "batch": self.batch_of.get(h.name), "state": "not_started",
                     "ok": False} for h in hosts}
        self.plays = 0
        self.t0 = time.monotonic()

    def __call__(self, event: dict[str, Any]) -> bool:
        kind, data = event.get("event", ""), event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            self.plays += 1
            names = self.batches[self.plays - 1] if self.plays <= len(self.batches) else []
            self.progress(ProgressEvent("rollout", f"batch {self.plays} of {len(self.batches)}: {', '.join(names)}"))
        row = self.rows.get(str(data.get("host")))
        if row is None or kind not in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable"):
            return True
        res = data.get("res") or {}
        if row["state"] == "not_started":
            row.update(state="running", started_s=round(time.monotonic() - self.t0, 1))
        if kind == "runner_on_unreachable":
            msg = str(res.get("msg", "unreachable"))
            row.update(state="unreachable", error={"code": _unreachable_code(msg), "message": msg.strip()})
            self.progress(ProgressEvent("rollout", f"{row['name']}: unreachable ({row['error']['code']})"))
            return True
        cmd: list[Any] = res["cmd"] if isinstance(res.get("cmd"), list) else []
        step = cmd[2] if len(cmd) > 2 and cmd[:2] == ["python3", "-"] else None
        doc = _last_json(str(res.get("stdout", ""))) if step else None
        if step == "stage" and doc and doc.get("ok"):
            try:
                send = to_send(doc, self.files)
            except UserError as exc:  # the role refuses it too, before anything is sent
                row.update(state="failed", error={"code": exc.code, "message": exc.message})
                self.progress(ProgressEvent("rollout", f"{row['name']}: FAILED {exc.code}: {exc.message}"))
                return True
            extra_files, extra_bytes = self.always_sent if doc.get("staging") else (0, 0)
            reused = doc.get("reused") if isinstance(doc.get("reused"), int) else None  # reported, never used
            reused_bytes = doc.get("reused_bytes") if isinstance(doc.get("reused_bytes"), int) else None
            row.update(uploaded_files=len(send) + extra_files, uploaded_bytes=sum(send.values()) + extra_bytes,
                       reused_files=reused, reused_bytes=reused_bytes,
                       already_there=doc.get("present") if isinstance(doc.get("present"), str) else None)
            self.progress(ProgressEvent("rollout", f"{row['name']}: {row['uploaded_files']} files "
                                                   f"({row['uploaded_bytes'] / 1e6:.2f} MB) to send, "
                                                   f"{reused} linked from releases on the device"))
        elif step in ("apply", "rollback_now") and doc is not None:
            keep = ("release_folder", "bundle_id", "previous", "current", "switched", "smoke", "service", "pruned",
                    "steps", "install", "verify", "log_tail", "evidence")
            row.update({k: doc[k] for k in keep if k in doc})
            if doc.get("ok"):
                row.update(state="done", ok=True, seconds=round(time.monotonic() - self.t0 - row["started_s"], 1))
                self.progress(ProgressEvent("rollout", f"{row['name']}: current → releases/{doc.get('current')}"))
            else:
                row.update(state="failed", error={"code": doc.get("code") or "remote_failed",
                                                  "message": doc.get("error")})
                self.progress(ProgressEvent("rollout", f"{row['name']}: FAILED {row['error']['code']}: "
                                                       f"{doc.get('error')}"))
        elif kind == "runner_on_failed" and row["state"] != "failed":
            msg = str(res.get("msg", ""))
            code, _, rest = msg.partition(": ")
            row.update(state="failed", error={"code": code if code.isidentifier() else "remote_failed",
                                              "message": rest if code.isidentifier() else msg})
            self.progress(ProgressEvent("rollout", f"{row['name']}: FAILED {msg[:300]}"))
        return True


def to_send(stage: dict[str, Any], files: dict[str, int]) -> dict[str, int]:
    """The manifest's files (path → bytes, as the manifest says) that a device's `stage` answer names as missing.
    The answer is data: a name the manifest does not list is refused (device_answer_invalid), as the role does."""
    missing = stage.get("missing")
    asked = [m.get("path") if isinstance(m, dict) else None for m in
             (missing if isinstance(missing, list) else [missing])]
    unlisted = [p for p in asked if not isinstance(p, str) or p not in files]
    if unlisted:
        raise UserError(f"the device asked for files the manifest does not list: {unlisted[:5]!r:.600}. Nothing was "
                        "sent.", hint="Check the device: edgepack's own helper only names files of the manifest.",
                        code="device_answer_invalid", unlisted=unlisted[:20])
    return {p: files[p] for p in asked if isinstance(p, str)} if stage.get("staging") else {}


def _last_json(text: str) -> dict[str, Any] | None:
    import json

    for line in reversed(text.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


def run_playbook(playbook: str, inventory: Path, *, limit: str | None, forks: int, serial: list[int | str],
                 max_fail: float, extravars: dict[str, Any], ssh: Any, progress: ProgressFn,
                 always_sent: tuple[int, int] = (0, 0), files: dict[str, int] | None = None,
                 bundle: Path | None = None) -> dict[str, Any]:
    """Run one of edgepack's own playbooks (deploy.yml, rollback.yml: written from this edgepack into a temporary
    folder, never a bundle's) on the inventory with ansible-runner; one row per host in inventory order: state done,
    failed, unreachable or not_started (the rollout halted before its batch). `bundle`: the folder the role reads
    as data (edgepack_bundle); `files`: its manifest's path → bytes, what the devices' answers are counted against."""
    import os
    import shutil
    import sys
    import tempfile

    require("ansible_runner", "fleet", "Rolling out to an inventory")
    import ansible_runner

    hosts = load_inventory(inventory, limit)
    batches = plan_batches([h.name for h in hosts], serial)
    track = _Tracker(hosts, batches, progress, always_sent, files or {})
    env = ansible_env(ssh, hosts)
    if not shutil.which("ansible-playbook"):  # a venv's edgepack run without activating the venv
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if playbook not in ROLE_PLAYBOOKS:
        raise ValueError(playbook)
    with tempfile.TemporaryDirectory(prefix="edgepack-ansible-") as tmp:
        write_role(Path(tmp) / "project")
        if bundle is not None:  # reached through a name of ours: a folder name is never read as a Jinja template
            os.symlink(bundle.resolve(), Path(tmp) / "bundle")
            extravars = {**extravars, "edgepack_bundle": str(Path(tmp) / "bundle")}
        runner = ansible_runner.run(
            private_data_dir=tmp, playbook=str(Path(tmp) / "project" / playbook), inventory=str(inventory.resolve()),
            limit=limit, forks=forks, quiet=True, event_handler=track, envvars=env,
            extravars={**extravars, "edgepack_serial": serial, "edgepack_max_fail_percentage": max_fail})
        stdout = runner.stdout.read() if runner.stdout else ""
    rows = [track.rows[h.name] for h in hosts]
    for r in rows:
        if r["state"] == "running":  # the host ran some tasks and then the play ended for it
            r.update(state="failed", error={"code": "remote_failed", "message": "stopped before the release step"})
    halted = any(r["state"] == "not_started" for r in rows)
    started = [r for r in rows if r["state"] != "not_started"]
    if runner.status not in ("successful", "failed") or (runner.status == "failed" and (
            not started or all(r["state"] == "done" for r in rows))):
        raise UserError(f"ansible-playbook ended with {runner.status} (exit {runner.rc}).",
                        hint="See log_tail (Ansible's own output).", code="fleet_ansible_failed",
                        hosts=rows, log_tail=stdout.splitlines()[-30:])
    return {"hosts": rows, "batches": batches, "halted": halted, "ansible_rc": runner.rc,
            "seconds": round(time.monotonic() - track.t0, 1), "serial": serial, "max_fail_percentage": max_fail}


def check_rollout(out: dict[str, Any], what: str) -> dict[str, Any]:
    """A rollout where every host is done passes through; else an error carrying every row: halted (hosts were
    left unstarted) or completed with failures within --max-fail."""
    rows = out["hosts"]
    failed = [r for r in rows if r["state"] in ("failed", "unreachable")]
    if not failed and not out["halted"]:
        return out
    waiting = [r["name"] for r in rows if r["state"] == "not_started"]
    first = failed[0] if failed else None
    why = f"{', '.join(r['name'] for r in failed[:5])} failed" + (
        f" ({first['error']['code']}: {str(first['error']['message'])[:300]})" if first else "")
    at, halted = max((r["batch"] or 0 for r in failed), default=0), bool(out["halted"])
    message = (f"the {what} halted in batch {at} of {len(out['batches'])}: {why}. {len(waiting)} host(s) were not "
               f"started and keep the release they had: {', '.join(waiting[:5])}." if halted else
               f"the {what} went through every batch, but {len(failed)} of {len(rows)} host(s) failed: {why}.")
    raise UserError(message, hint="Each host's row has its state and evidence. A failed host is on the release it "
                                  "had, never half-updated. Fix it and run the same command again: hosts already "
                                  "on the release are checked, not sent it again.",
                    code="fleet_rollout_halted" if halted else "fleet_hosts_failed",
                    failed=[r["name"] for r in failed], not_started=waiting, **out)
