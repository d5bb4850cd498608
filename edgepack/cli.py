"""The click CLI: parse options, call one API function, hand the result to the output module."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgepack import __version__
from edgepack.errors import EdgepackError, UserError
from edgepack.output import Output, build_summary, deploy_summary, fleet_summary, inspect_summary, status_summary


class _State:
    def __init__(self, json_mode: bool, quiet: bool, verbose: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose


def _run(command: str, fn: Callable[[Output], tuple[Any, str]], *, tool_log: bool = False) -> None:
    """`tool_log`: the command drives converters and runtimes; what they print goes to a log file (output.tool_log)
    unless --verbose, and an error names the log."""
    import contextlib

    from edgepack.output import tool_log as capture

    state: _State = click.get_current_context().find_object(_State) or _State(False, False)
    with capture(command) if tool_log and not state.verbose else contextlib.nullcontext((sys.stderr, None)) as (
            err, log):
        _attempt(command, fn, state, err, log)


def _attempt(command: str, fn: Callable[[Output], tuple[Any, str]], state: _State, err: Any, log: Any) -> None:
    out = Output(command, json_mode=state.json_mode, quiet=state.quiet, stderr=err)
    try:
        result, human = fn(out)
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report short
        out.failure(UserError("interrupted; nothing was left half-written.", hint="Run the command again."))
        sys.exit(130)
    except EdgepackError as exc:
        if log is not None and log.exists() and log.stat().st_size:
            exc.fields.setdefault("log", str(log))
            exc.hint = (exc.hint + " " if exc.hint else "") + f"What the tools printed: {log}"
        code = out.failure(exc, traceback_text=None if isinstance(exc, UserError) else traceback.format_exc())
        sys.exit(code)
    except Exception as exc:  # a bug: show the traceback, exit 2
        if log is not None and log.exists() and log.stat().st_size:
            err.write(f"what the tools printed: {log}\n")
        sys.exit(out.failure(exc, traceback_text=traceback.format_exc()))
    out.success(result, human)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack")
@click.option("--json", "json_mode", is_flag=True, help="Print exactly one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Show what the converters and runtimes print (by default a build "
                                                    "sends it to a log file under the cache dir).")
@click.pass_context
def cli(ctx: click.Context, json_mode: bool, quiet: bool, verbose: bool) -> None:
    """Turn a small language model into a verified, quantized bundle for an edge device, and deploy it.

    \b
    edgepack build --target rpi5 smollm2-135m
    edgepack deploy --host pi.local dist/smollm2-135m-rpi5
    """
    ctx.obj = _State(json_mode, quiet, verbose)


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Let --json also follow the subcommand (`edgepack build --json ...`)."""

    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            state = ctx.find_object(_State)
            if state is None:
                ctx.obj = _State(True, False)
            else:
                state.json_mode = True

    return click.option("--json", "json_flag", is_flag=True, expose_value=False, callback=callback,
                        is_eager=True, help="Print exactly one JSON document on stdout.")(f)


@cli.command()
@click.argument("model")
@click.option("-t", "--target", default="host", show_default=True,
              help="A target id (`edgepack targets list`) or a path to your own .toml.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Parent folder; the bundle lands in OUT/<model>-<target>/.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]),
              help="Override the target's export format (and with it the runtime).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("--skip-validation", is_flag=True, help="Skip the quality gate (recorded in the manifest).")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="A PEFT LoRA adapter folder: merged into MODEL (its base) before export.")
@click.option("--eval-text", type=click.Path(path_type=Path),
              help="Gate on this UTF-8 text of your domain instead of the shipped one.")
@click.option("--checks", "checks_file", type=click.Path(path_type=Path),
              help="A JSONL file of task checks (prompt + what must come back), gated and re-run on the device.")
@click.option("--no-wheels", is_flag=True, help="Do not vendor runtime wheels (the device needs an index).")
@click.option("--tune", is_flag=True, help="Build the target's [tune] candidates; keep the fastest that passes.")
@click.option("--plot", type=click.Path(path_type=Path), help="With --tune: write speed vs quality as a PNG.")
@click.option("--tune-on", metavar="HOST", help="With --tune: time the candidates on this device (over SSH).")
@click.option("--ssh-config", type=click.Path(path_type=Path), help="With --tune-on: ssh_config file.")
@click.option("--known-hosts", type=click.Path(path_type=Path), help="With --tune-on: known_hosts file.")
@click.option("--install-dir", help="With --tune-on: where the device's releases live.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), metavar="KEY",
              help="Sign the manifest with this minisign secret key (password: $EDGEPACK_KEY_PASSWORD).")
@click.option("--no-cache", is_flag=True, help="Export and score again even when the build cache has this build "
                                               "(also EDGEPACK_NO_CACHE=1).")
@_json_option
def build(model: str, target: str, out: Path, fmt: str | None, force: bool, skip_validation: bool,
          adapter: Path | None, eval_text: Path | None, checks_file: Path | None, no_wheels: bool, tune: bool,
          plot: Path | None, tune_on: str | None, ssh_config: Path | None, known_hosts: Path | None,
          install_dir: str | None, sign_key: Path | None, no_cache: bool) -> None:
    """Export MODEL, quantize it for TARGET, check its quality, and write a bundle.

    MODEL is an alias (smollm2-135m, tinyllama, ...), a hub id (org/name[@revision]), a local Hugging Face
    folder, or a .gguf file.
    """
    from edgepack import api

    def go(o: Output) -> tuple[Any, str]:
        res = api.build(api.BuildRequest(model=model, target=target, out=out, force=force, format=fmt,
                                         eval_text=eval_text, adapter=adapter, checks=checks_file,
                                         skip_validation=skip_validation, vendor_wheels=not no_wheels,
                                         tune=tune, plot=plot, sign=sign_key, use_cache=not no_cache,
                                         tune_on=api.DeviceRequest(host=tune_on, ssh_config=ssh_config,
                                                                   known_hosts=known_hosts, install_dir=install_dir)
                                         if tune_on else None), progress=o.progress)
        return res, build_summary(res)

    _run("build", go, tool_log=True)


@cli.group()
def cache() -> None:
    """The build cache: exports, gate measurements, model checkpoints, reference scores, wheels
    ($EDGEPACK_CACHE, else $XDG_CACHE_HOME/edgepack, else ~/.cache/edgepack)."""


_KIND = click.option("--kind", type=click.Choice(["exports", "gates", "checkpoints", "reference", "wheels"]),
                     help="Only this kind of entry.")


@cache.command("ls")
@_KIND
@_json_option
def cache_ls(kind: str | None) -> None:
    """List the cache's entries."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.cache_ls(kind)
        rows = [f"{e['kind']:<12} {e['key'][:24]:<24} {e['bytes'] / 1e6:>9.1f} MB  {e['what']}" for e in res["entries"]]
        return res, "\n".join([f"{res['root']}:", *rows] if rows else [f"{res['root']}: empty"])

    _run("cache ls", go)


@cache.command("du")
@_json_option
def cache_du() -> None:
    """Bytes the cache holds, by kind."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.cache_du()
        return res, "\n".join([f"{res['root']}: {res['bytes'] / 1e6:.1f} MB",
                               *(f"  {k:<12} {v / 1e6:>9.1f} MB" for k, v in res["by_kind"].items())])

    _run("cache du", go)


@cache.command("clear")
@_KIND
@_json_option
def cache_clear(kind: str | None) -> None:
    """Remove the cache's entries (a build that is reading one keeps its copy)."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.cache_clear(kind)
        return res, f"removed {len(res['removed'])} entries, {res['bytes_freed'] / 1e6:.1f} MB from {res['root']}"

    _run("cache clear", go)


@cli.group()
def targets() -> None:
    """List and show target profiles."""


@targets.command("list")
@_json_option
def targets_list() -> None:
    """The shipped targets."""
    from edgepack.targets import list_targets

    def go(_o: Output) -> tuple[Any, str]:
        items = list_targets()
        rows = [f"{t.id:<18} {t.resolved_arch():<8} {t.export.format:<5} {t.quantize.scheme:<5} "
                f"{t.device.description}" for t in items]
        data = [{"id": t.id, "arch": t.resolved_arch(), "format": t.export.format, "scheme": t.quantize.scheme,
                 "execution_provider": t.export.execution_provider, "description": t.device.description,
                 "source": t.source} for t in items]
        return data, "\n".join([f"{'ID':<18} {'ARCH':<8} {'FMT':<5} {'QUANT':<5} DESCRIPTION", *rows])

    _run("targets list", go)


@cli.group()
def models() -> None:
    """Model aliases and the families each export format takes."""


@models.command("list")
@_json_option
def models_list() -> None:
    """The model aliases (`edgepack build --target T ALIAS`)."""
    from edgepack.models import load_aliases

    def go(_o: Output) -> tuple[Any, str]:
        items = load_aliases().values()
        data = [{"name": a.name, "description": a.description, "hub_id": a.hub_id, "license": a.license,
                 "offline": a.prefer == "pypi"} for a in items]
        return data, "\n".join(f"{a.name:<16} {a.description}" for a in items)

    _run("models list", go)


@models.command("families")
@_json_option
def models_families() -> None:
    """Families per export format: architecture, rope, attention, and the test that proves each."""
    from edgepack.families import families
    from edgepack.output import to_jsonable

    def go(_o: Output) -> tuple[Any, str]:
        rows = families()
        lines = [f"{'FAMILY':<15} {'ARCHITECTURE':<20} {'ROPE':<9} {'FORMATS':<12} {'PROVEN':<7} ATTENTION"]
        for f in rows:
            lines.append(f"{f.id:<15} {f.architecture.removesuffix('ForCausalLM'):<20} {'/'.join(f.rope):<9} "
                         f"{','.join(f.formats):<12} {'yes' if f.proof else 'no':<7} {f.attention}")
        lines.append("PROVEN: a tiny checkpoint of that shape is built with the quality gate on in the tests "
                     "(docs/models.md).")
        return to_jsonable(list(rows)), "\n".join(lines)

    _run("models families", go)


@targets.command("show")
@click.argument("target")
@_json_option
def targets_show(target: str) -> None:
    """One target profile, every field resolved (an id or a path to a .toml)."""
    import json

    from edgepack.targets import load_target, profile_to_dict

    def go(_o: Output) -> tuple[Any, str]:
        data = profile_to_dict(load_target(target))
        return data, json.dumps(data, indent=2)

    _run("targets show", go)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Do not re-hash the files.")
@_json_option
def inspect(bundle: Path, no_verify: bool) -> None:
    """Show a bundle's manifest and check every file against it."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.inspect(bundle, verify=not no_verify)
        return {**res.manifest.doc, "verified": res.verified, "signature": res.signature,
                "licenses": res.licenses}, inspect_summary(res)

    _run("inspect", go)


@cli.command("plan")
@click.argument("model")
@click.option("-t", "--target", default="host", show_default=True, help="A target id or a path to your own .toml.")
@click.option("--context", type=click.IntRange(min=0), default=0,
              help="Prompt + reply tokens (0 = the target's runtime.context_length, else the model's own).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), help="Plan for the other export format.")
@_json_option
def plan_cmd(model: str, target: str, context: int, fmt: str | None) -> None:
    """Will MODEL fit TARGET? Parameters, weights, KV cache and runtime against the device's RAM (nothing built)."""
    from edgepack import api
    from edgepack.plan import summary

    def go(o: Output) -> tuple[Any, str]:
        res = api.plan(api.PlanRequest(model=model, target=target, context=context, format=fmt), progress=o.progress)
        return res, summary(res)

    _run("plan", go)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True)
@click.option("--max-tokens", type=click.IntRange(min=1), help="New tokens, up to the bundle's context.")
@click.option("--raw", is_flag=True, help="No chat template: continue the prompt text (base models).")
@click.option("--system", help="A system message (chat models).")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=click.FloatRange(min=0.0), help="With --sample.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), help="With --sample.")
@click.option("--top-k", type=click.IntRange(min=1), help="With --sample.")
@click.option("--seed", type=int, help="With --sample: a fixed seed gives the same reply.")
@_json_option
def run(bundle: Path, prompt: str, max_tokens: int | None, raw: bool, system: str | None, sample: bool,
        temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None) -> None:
    """Run a bundle's own runner on this machine (when its arch matches)."""
    import json

    from edgepack import api

    state = click.get_current_context().find_object(_State)
    json_mode = bool(state and state.json_mode)

    def go(_o: Output) -> tuple[Any, str]:
        _code, stdout = api.run(api.RunRequest(
            bundle=bundle, prompt=prompt, max_tokens=max_tokens, json_output=True, raw=raw, system=system,
            sampling=api.Sampling(sample=sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)))
        data = json.loads(stdout.strip().splitlines()[-1])
        return data, data["text"] if not json_mode else ""

    _run("run", go)


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


def _device(kw: dict[str, Any]) -> Any:
    from edgepack import api

    if kw["host"] is None:  # "" is a template for fleet hosts
        return None
    return api.DeviceRequest(host=kw["host"], user=kw["user"], port=kw["port"], identity=kw["identity"],
                             accept_new_host_key=kw["accept_new_host_key"], known_hosts=kw["known_hosts"],
                             ssh_config=kw["ssh_config"], install_dir=kw["install_dir"],
                             connect_timeout=kw["connect_timeout"], command_timeout=kw["command_timeout"])


@cli.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@_device_options(required=False)
@click.option("--dist", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Where to look for the newest bundle when BUNDLE is not given.")
@click.option("--allow-network", is_flag=True, help="Let the device's pip use a package index if wheels/ does not fit.")
@click.option("--keep", type=int, help="Releases to keep on the device (default: the target's).")
@click.option("--via", type=click.Choice(["ssh", "adb"]), default="ssh", show_default=True,
              help="ssh: install and smoke-test over SSH. adb: push to an Android phone (no --host needed).")
@click.option("--serial", help="With --via adb: the device serial (`adb devices`), when several are connected.")
@click.option("--require-signature", "pubkeys", multiple=True, metavar="PUBKEY",
              help="Refuse a bundle not signed by this minisign public key (a .pub file or its base64 line); the "
                   "device records the key and its install step checks the signature again. Repeatable.")
@click.option("--serve-addr", default="", help="Where the device's service serves the API (HOST:PORT or unix:PATH; "
                                                "default: the target's deploy.serve_addr).")
@_json_option
def deploy(bundle: Path | None, dist: Path, allow_network: bool, keep: int | None, via: str, serial: str | None,
           pubkeys: tuple[str, ...], serve_addr: str, **kw: Any) -> None:
    """Upload BUNDLE to a device, install it offline, smoke-test it, then switch `current` to it."""
    from edgepack import api
    from edgepack.errors import UserError

    if via == "ssh" and kw["host"] is None:
        raise click.UsageError("--host is required (or --via adb for an Android phone over USB).")
    if via == "adb" and kw["host"] is not None:
        raise click.UsageError("--via adb takes --serial, not --host.")

    def go(o: Output) -> tuple[Any, str]:
        device = _device(kw) if via == "ssh" else api.DeviceRequest(host=serial or "")
        if device is None:
            raise UserError("no device given.", hint="Pass --host.")
        res = api.deploy(api.DeployRequest(device=device, bundle=bundle, dist=dist, allow_network=allow_network,
                                           keep=keep, via=via, require_signature=pubkeys,
                                           serve_addr=serve_addr), progress=o.progress)
        return res, deploy_summary(res)

    _run("deploy", go)


@cli.command()
@_device_options(required=False)
@click.option("--inventory", type=click.Path(path_type=Path), help="An Ansible inventory (INI or YAML): every host's "
              "status (ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file, edgepack_install_dir).")
@click.option("--limit", help="With --inventory: an Ansible host pattern.")
@click.option("--forks", type=click.IntRange(min=1), default=10, show_default=True,
              help="With --inventory: hosts read at once.")
@_json_option
def status(inventory: Path | None, limit: str | None, forks: int, **kw: Any) -> None:
    """Releases on a device (or every device of an inventory) and which one is current."""
    from edgepack import api

    if (inventory is None) == (kw["host"] is None):
        raise click.UsageError("pass --host for one device or --inventory for a fleet.")

    def go(_o: Output) -> tuple[Any, str]:
        if inventory is not None:
            res = api.fleet_status(api.FleetRequest(inventory=inventory, limit=limit, forks=forks,
                                                    ssh=_device({**kw, "host": ""})))
            return res, fleet_summary(res["hosts"])
        st = api.device_status(_device(kw))
        return st, status_summary(st)

    _run("status", go)


@cli.command()
@_device_options()
@_json_option
def rollback(**kw: Any) -> None:
    """Switch a device back to its previous release."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.rollback(_device(kw))
        return res, f"{res['host']}: current → {res['current']} (was {res['previous']})"

    _run("rollback", go)


@cli.command("bench")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@_device_options(required=False)
@click.option("--reps", type=int, default=5, show_default=True, help="Fresh-process runs; the median is reported.")
@click.option("--tokens", type=int, default=64, show_default=True, help="New tokens per run.")
@click.option("--threads", type=int, default=0, help="0 = the bundle's default.")
@_json_option
def bench_cmd(bundle: Path | None, reps: int, tokens: int, threads: int, **kw: Any) -> None:
    """Prefill, decode speed, peak RSS and load time of a bundle, here or on a device's current release (--host)."""
    from edgepack import api

    device = _device(kw)

    def go(o: Output) -> tuple[Any, str]:
        res = api.bench(api.BenchRequest(bundle=bundle, device=device, reps=reps, max_tokens=tokens,
                                         threads=threads), progress=o.progress)
        rows = [f"{res.bundle} on {res.where}, {res.reps} runs (median, min–max)"]
        for key, v in res.summary.items():
            rows.append(f"  {key:<20} {v['median']:>10}   ({v['min']} – {v['max']})")
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
def serve(bundle: Path, addr: str, api_key_file: Path | None, insecure_no_auth: bool, metrics: bool,
          threads: int) -> None:
    """Serve BUNDLE's OpenAI-compatible API here (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from edgepack import api

    try:
        code = api.serve(api.ServeRequest(bundle=bundle, addr=addr, api_key_file=api_key_file,
                                          insecure_no_auth=insecure_no_auth, metrics=metrics, threads=threads))
    except KeyboardInterrupt:
        code = 130
    except UserError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        code = 1
    sys.exit(code)


@cli.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), metavar="KEY",
              help="Write the secret key here and the public key to KEY.pub.")
@click.option("--password-env", metavar="VAR",
              help="Encrypt the secret key with the password in this environment variable (default: unencrypted, "
                   "as `minisign -W`; keep it in your CI's secret store).")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@_json_option
def keygen(out: Path, password_env: str | None, force: bool) -> None:
    """Make an Ed25519 signing key pair in minisign's format (checkable with the `minisign` tool)."""
    import os

    from edgepack import signing

    def go(_o: Output) -> tuple[Any, str]:
        password = None
        if password_env:
            password = os.environ.get(password_env)
            if not password:
                raise UserError(f"${password_env} is empty or not set.", hint=f"export {password_env}=...")
        sec, pub = signing.keygen(out, password=password, force=force)
        key = signing.load_public_keys([pub])[0]
        kid = signing.key_id(key)
        return {"secret_key": str(sec), "public_key": str(pub), "key_id": kid,
                "public_key_base64": key.to_base64().decode()}, (
            f"secret key {sec} (keep it secret)\npublic key {pub} (key id {kid})\n"
            f"sign: edgepack sign BUNDLE --key {sec}\ndeploy: edgepack deploy --require-signature {pub} ...")

    _run("keygen", go)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="The archive: NAME.tar.gz or NAME.tar.zst (default: <bundle id>.tar.gz beside the bundle).")
@click.option("--format", "fmt", type=click.Choice(["gz", "zst"]), help="With no --out: gz (default) or zst.")
@_json_option
def pack(bundle: Path, out: Path | None, fmt: str | None) -> None:
    """Pack a verified BUNDLE into one reproducible archive (same bundle, same bytes; SOURCE_DATE_EPOCH sets the
    entries' time). deploy, inspect, run and sign take the archive wherever they take the folder."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.pack(bundle, out, fmt)
        return res, (f"packed {res.bundle_id}: {res.archive} ({res.bytes / 1e6:.1f} MB, {res.entries} entries)\n"
                     f"sha256 {res.sha256}")

    _run("pack", go)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="minisign secret key "
              "(password: $EDGEPACK_KEY_PASSWORD).")
@_json_option
def sign(bundle: Path, key: Path) -> None:
    """Sign BUNDLE's manifest (edgepack.json, which lists every file's sha256): writes edgepack.json.minisig."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.sign(bundle, key)
        return res, f"signed {bundle} with key {res.key_id}: {res.signature_file}"

    _run("sign", go)


def main() -> None:
    """Bad command lines get the same treatment as any user error: a message and hint on stderr (and the --json
    envelope on stdout when --json is anywhere on the line), exit 1. Exit 2 stays for bugs."""
    try:
        code = cli.main(prog_name="edgepack", standalone_mode=False)
    except click.exceptions.Abort:
        sys.stderr.write("interrupted.\n")
        sys.exit(130)
    except click.UsageError as exc:
        from edgepack.errors import UsageError

        sub = exc.ctx.command_path.split(" ", 1)[1] if exc.ctx and " " in exc.ctx.command_path else "edgepack"
        usage = exc.ctx.get_usage() if exc.ctx else ""
        path = exc.ctx.command_path if exc.ctx else "edgepack"
        hint = (f"{usage.strip()}  (`{path} --help` for more)" if usage else f"Run `{path} --help`.")
        out = Output(sub, json_mode="--json" in sys.argv[1:], quiet=False)
        sys.exit(out.failure(UsageError(exc.format_message(), hint=hint)))
    except click.ClickException as exc:  # e.g. a file argument that does not exist
        from edgepack.errors import UsageError

        out = Output("edgepack", json_mode="--json" in sys.argv[1:], quiet=False)
        sys.exit(out.failure(UsageError(exc.format_message(), hint="Run `edgepack --help`.")))
    sys.exit(code if isinstance(code, int) else 0)
