"""The CLI's device commands: deploy, status, rollback, bench, serve, and the SSH options they share."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgepack.console import _json_option, _run, cli
from edgepack.errors import UserError
from edgepack.output import Output, deploy_summary, fleet_summary, rollout_summary, status_summary


def _device_options(*, required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The SSH options every device command takes; without `required`, no --host means 'here'."""
    opts = [
        click.option("--host", required=required, help="Device host name or ~/.ssh/config alias."),
        click.option("--user", help="SSH user (default: ~/.ssh/config, then $USER)."),
        click.option("--port", type=int, help="SSH port (default: ~/.ssh/config, then 22)."),
        click.option("--identity", type=click.Path(path_type=Path), help="Private key file."),
        click.option("--accept-new-host-key", is_flag=True,
                     help="Trust and save an unknown host key (a changed key is always refused)."),
        click.option("--known-hosts", type=click.Path(path_type=Path), help="known_hosts file to check and update."),
        click.option("--ssh-config", type=click.Path(path_type=Path), help="ssh_config file (default ~/.ssh/config)."),
        click.option("--install-dir", help="Where releases live on the device (default: the target's)."),
        click.option("--connect-timeout", type=float, default=15.0, show_default=True),
        click.option("--command-timeout", type=float, default=300.0, show_default=True),
    ]

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


_DEVICE_TARGET = click.option("--target", "device_target", metavar="TARGET",
                              help="With --host and no --install-dir: the target (an id, or a .toml file) whose "
                                   "deploy.install_dir the releases live in (default ~/edgepack).")


def _device(kw: dict[str, Any]) -> Any:
    from edgepack import api

    if kw["host"] is None:  # "" is a template for fleet hosts
        return None
    return api.DeviceRequest(host=kw["host"], user=kw["user"], port=kw["port"], identity=kw["identity"],
                             accept_new_host_key=kw["accept_new_host_key"], known_hosts=kw["known_hosts"],
                             ssh_config=kw["ssh_config"], install_dir=kw["install_dir"], target=kw.get("device_target"),
                             connect_timeout=kw["connect_timeout"], command_timeout=kw["command_timeout"])


def _fleet_options(*, rollout: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--inventory, --limit, --forks; with `rollout`, the batches: --canary, --batch, --max-fail."""
    opts = [
        click.option("--inventory", type=click.Path(path_type=Path),
                     help="An Ansible inventory (INI or YAML) instead of --host: every host (ansible_host, "
                          "ansible_port, ansible_user, ansible_ssh_private_key_file, edgepack_install_dir)."),
        click.option("--limit", help="With --inventory: an Ansible host pattern."),
        click.option("--forks", type=click.IntRange(min=1), default=10, show_default=True,
                     help="With --inventory: hosts worked on at once."),
    ]
    if rollout:
        opts += [
            click.option("--canary", type=click.IntRange(min=0), default=1, show_default=True,
                         help="With --inventory: hosts in the first batch (the first in inventory order)."),
            click.option("--batch", default="10%", show_default=True,
                         help="With --inventory: hosts per later batch, a count or a percentage of the hosts."),
            click.option("--max-fail", default="0%", show_default=True,
                         help="With --inventory: a batch with MORE failed hosts than this percentage of it ends "
                              "the rollout (Ansible's max_fail_percentage: per batch, exceeded, not reached)."),
        ]

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


def _with_table(o: Output, go: Callable[[], Any]) -> tuple[Any, str]:
    """A rollout's result and its table; when it fails, the table of every host still goes to stderr (humans)."""
    try:
        res = go()
    except UserError as exc:
        if "batches" in exc.fields and not o.json_mode:
            o.err.write(rollout_summary(exc.fields) + "\n")
        raise
    return res, rollout_summary(res)


def _host_or_inventory(inventory: Path | None, kw: dict[str, Any]) -> None:
    if (inventory is None) == (kw["host"] is None):
        raise click.UsageError("pass --host for one device or --inventory for a fleet.")


def _fleet(kw: dict[str, Any], inventory: Path) -> Any:
    from edgepack import api
    from edgepack.fleet import Batches

    fleet = api.FleetRequest(inventory=inventory, limit=kw.pop("limit"), forks=kw.pop("forks"),
                             ssh=_device({**kw, "host": ""}))
    return fleet, Batches(canary=kw.get("canary", 1), batch=kw.get("batch", "10%"), max_fail=kw.get("max_fail", "0%"))


@cli.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@_device_options(required=False)
@_fleet_options(rollout=True)
@click.option("--dist", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Where to look for the newest bundle when BUNDLE is not given.")
@click.option("--allow-network", is_flag=True,
              help="Let the device's pip also take the locked wheels from a package index (same sha256 only).")
@click.option("--keep", type=int, help="Releases to keep on the device (default: the target's).")
@click.option("--via", type=click.Choice(["ssh", "adb"]), default="ssh", show_default=True,
              help="ssh: install and smoke-test over SSH. adb: push to an Android phone (no --host needed).")
@click.option("--serial", help="With --via adb: the device serial (`adb devices`), when several are connected.")
@click.option("--require-signature", "pubkeys", multiple=True, metavar="PUBKEY", envvar="EDGEPACK_REQUIRE_SIGNATURE",
              help="Refuse a bundle not signed by this minisign public key (a .pub file or its base64 line); the "
                   "device records the key and, from then on, refuses anything not signed by a key it trusts, "
                   "checked by edgepack's device program before any of the bundle's code runs. Repeatable; "
                   "$EDGEPACK_REQUIRE_SIGNATURE (space-separated) sets it in CI.")
@click.option("--target", "target", metavar="TARGET",
              help="This machine's target (an id, or a .toml file) whose [deploy] trusted_keys apply; the bundle "
                   "must have been built for it. Default: this machine's file for the bundle's target id (shipped, "
                   "or in $EDGEPACK_TARGET_PATH); a target it cannot find is an error, never 'not required'.")
@click.option("--serve-addr", default="", help="Where the device's service serves the API (HOST:PORT or unix:PATH; "
                                                "default: the target's deploy.serve_addr).")
@_json_option
def deploy(bundle: Path | None, dist: Path, allow_network: bool, keep: int | None, via: str, serial: str | None,
           pubkeys: tuple[str, ...], target: str | None, serve_addr: str, inventory: Path | None, **kw: Any) -> None:
    """Upload BUNDLE to a device, install it offline, smoke-test it, then switch `current` to it; with --inventory,
    to every host of an Ansible inventory in batches (edgepack's own playbook, through ansible-runner)."""
    from edgepack import api
    from edgepack.errors import UserError

    if inventory is not None:
        if kw["host"] is not None or via != "ssh":
            raise click.UsageError("--inventory replaces --host (and works over SSH only).")
        fleet, batches = _fleet(kw, inventory)

        def rollout(o: Output) -> tuple[Any, str]:
            return _with_table(o, lambda: api.fleet_deploy(api.FleetDeployRequest(
                fleet=fleet, bundle=bundle, dist=dist, batches=batches, allow_network=allow_network, keep=keep,
                require_signature=pubkeys, serve_addr=serve_addr, target=target), progress=o.progress))

        _run("deploy", rollout)
        return
    if via == "ssh" and kw["host"] is None:
        raise click.UsageError("--host is required (or --via adb for an Android phone over USB).")
    if via == "adb" and kw["host"] is not None:
        raise click.UsageError("--via adb takes --serial, not --host.")

    def go(o: Output) -> tuple[Any, str]:
        device = _device(kw) if via == "ssh" else api.DeviceRequest(host=serial or "")
        if device is None:
            raise UserError("no device given.", hint="Pass --host.")
        res = api.deploy(api.DeployRequest(device=device, bundle=bundle, dist=dist, allow_network=allow_network,
                                           keep=keep, via=via, require_signature=pubkeys, target=target,
                                           serve_addr=serve_addr), progress=o.progress)
        return res, deploy_summary(res)

    _run("deploy", go)


@cli.command()
@_DEVICE_TARGET
@_device_options(required=False)
@_fleet_options(rollout=False)
@_json_option
def status(inventory: Path | None, **kw: Any) -> None:
    """Releases on a device (or every device of an inventory) and which one is current."""
    from edgepack import api

    _host_or_inventory(inventory, kw)

    def go(_o: Output) -> tuple[Any, str]:
        if inventory is not None:
            res = api.fleet_status(_fleet(kw, inventory)[0])
            return res, fleet_summary(res["hosts"])
        st = api.device_status(_device(kw))
        return st, status_summary(st)

    _run("status", go)


@cli.command()
@_DEVICE_TARGET
@_device_options(required=False)
@_fleet_options(rollout=True)
@_json_option
def rollback(inventory: Path | None, **kw: Any) -> None:
    """Switch a device (or, with --inventory, every host in batches) back to its previous release."""
    from edgepack import api

    _host_or_inventory(inventory, kw)
    if inventory is not None:
        fleet, batches = _fleet(kw, inventory)

        def rollout(o: Output) -> tuple[Any, str]:
            return _with_table(o, lambda: api.fleet_rollback(api.FleetDeployRequest(fleet=fleet, batches=batches),
                                                             progress=o.progress))

        _run("rollback", rollout)
        return

    def go(_o: Output) -> tuple[Any, str]:
        res = api.rollback(_device(kw))
        return res, f"{res['host']}: current → {res['current']} (was {res['previous']})"

    _run("rollback", go)


@cli.command("ansible-role")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Write deploy.yml, rollback.yml and roles/edgepack_release/ here (other files are left alone).")
@click.option("--force", is_flag=True, help="Replace an earlier copy of them.")
@_json_option
def ansible_role(out: Path, force: bool) -> None:
    """Write edgepack's Ansible role and playbooks (the ones `deploy --inventory` runs) for plain ansible-playbook.
    Bundles carry no playbooks: give the role the bundle with -e edgepack_bundle=BUNDLE."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.ansible_role(out, force)
        return res, (f"wrote edgepack's Ansible role and playbooks to {out}\n"
                     f"roll out: ansible-playbook -i INVENTORY {res['deploy']} -e edgepack_bundle=BUNDLE\n"
                     f"roll back: ansible-playbook -i INVENTORY {res['rollback']}")

    _run("ansible-role", go)


@cli.command("bench")
@_DEVICE_TARGET
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@_device_options(required=False)
@click.option("--reps", type=int, default=5, show_default=True, help="Fresh-process runs; the median is reported.")
@click.option("--tokens", type=int, default=64, show_default=True, help="New tokens per run.")
@click.option("--threads", type=int, default=0, help="0 = the bundle's default.")
@click.option("--scenario", type=click.Choice(["chat", "extraction"]),
              help="Instead of one prompt: a 10-turn chat (time to first token per turn, prompt cache off and on) "
                   "or an extraction (decode speed, speculative decoding off and on); each run plays every arm.")
@_json_option
def bench_cmd(bundle: Path | None, reps: int, tokens: int, threads: int, scenario: str | None, **kw: Any) -> None:
    """Prefill, decode speed, peak RSS and load time of a bundle, here or on a device's current release (--host)."""
    from edgepack import api

    device = _device(kw)

    def go(o: Output) -> tuple[Any, str]:
        res = api.bench(api.BenchRequest(bundle=bundle, device=device, reps=reps, max_tokens=tokens,
                                         threads=threads, scenario=scenario), progress=o.progress)
        rows = [f"{res.bundle} on {res.where}, {res.reps} runs (median, min–max)"]
        for key, v in res.summary.items():
            rows.append(f"  {key:<{max(20, *map(len, res.summary))}} {v['median']:>10}   ({v['min']} – {v['max']})")
        if scenario == "chat" and res.runs:  # the first run's turns: what the history costs, arm by arm
            arms = list(res.runs[0]["turns"][0]["ttft_ms"])
            rows.append("  time to first token (ms), first run: turn, prompt tokens, " + ", ".join(arms))
            rows += [f"  {t['turn']:>4} {t['prompt_tokens']:>6} " + " ".join(f"{t['ttft_ms'][a]:>10}" for a in arms)
                     for t in res.runs[0]["turns"]]
        return res, "\n".join(rows)

    _run("bench", go)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--addr", default="127.0.0.1:8089", show_default=True, help="HOST:PORT, or unix:PATH for a socket.")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Require this bearer token (needed to bind beyond loopback; or set EDGEPACK_API_KEY).")
@click.option("--insecure-no-auth", is_flag=True, help="Bind beyond loopback without an API key.")
@click.option("--metrics", is_flag=True, help="Serve GET /metrics (Prometheus text format).")
@click.option("--threads", type=int, default=0, help="0 = the bundle's default.")
@click.option("--system", help="The system prompt clients send: its KV is computed at load (prompt cache).")
@click.option("--prompt-cache-slots", type=click.IntRange(min=0),
              help="Conversations whose KV is kept for their next request (default: the bundle's; 0 = none).")
def serve(bundle: Path, addr: str, api_key_file: Path | None, insecure_no_auth: bool, metrics: bool,
          threads: int, system: str | None, prompt_cache_slots: int | None) -> None:
    """Serve BUNDLE's OpenAI-compatible API here (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from edgepack import api

    try:
        code = api.serve(api.ServeRequest(bundle=bundle, addr=addr, api_key_file=api_key_file,
                                          insecure_no_auth=insecure_no_auth, metrics=metrics, threads=threads,
                                          system=system, prompt_cache_slots=prompt_cache_slots))
    except KeyboardInterrupt:
        code = 130
    except UserError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        code = 1
    sys.exit(code)
