"""Fleets: devices from an Ansible inventory (INI or YAML, read by ansible-core itself), and read-only operations on
all of them at once (`edgepack status --inventory`).

Each host's connection comes from the usual Ansible variables: `ansible_host`, `ansible_port`, `ansible_user`,
`ansible_ssh_private_key_file`, and `edgepack_install_dir` for where its releases live. Host keys are checked as
strictly as for one device: known_hosts, nothing accepted silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgepack.errors import EdgepackError, UserError, require


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
