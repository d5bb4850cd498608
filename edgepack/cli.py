"""The click CLI: parse options, call one API function, hand the result to the output module. The commands on
models and bundles are here; those on devices in cli_device.py; the group and its plumbing in console.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgepack import cli_adapter, cli_device  # noqa: F401  (register adapter; deploy, status, rollback, bench, serve)
from edgepack.console import _json_option, _run, _State, cli, main  # noqa: F401  (main: the console script)
from edgepack.errors import UserError
from edgepack.output import Output, build_summary, inspect_summary


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
@click.option("--runtime-adapter", "runtime_adapters", multiple=True, metavar="NAME=DIR",
              help="A PEFT LoRA folder shipped as adapter NAME beside the quantized base, chosen per request "
                   "(repeatable; ONNX targets).")
@click.option("--lora-slots", metavar="MODULES",
              help="Give the base LoRA slots for these modules (q_proj,v_proj,... or all), for adapters packed "
                   "later with `edgepack adapter pack`.")
@click.option("--eval-text", type=click.Path(path_type=Path),
              help="Gate on this UTF-8 text of your domain instead of the shipped one.")
@click.option("--checks", "checks_file", type=click.Path(path_type=Path),
              help="A JSONL file of task checks (prompt + what must come back), gated and re-run on the device.")
@click.option("--no-wheels", is_flag=True, help="Do not vendor runtime wheels (the device needs an index).")
@click.option("--native/--no-native", "native", default=None,
              help="native/: the runtime's libraries, a C header and edgepack-chat compiled for the target, to use "
                   "the model from C without Python (default: on for ONNX, off with --no-wheels; LiteRT-LM: "
                   "only with --native).")
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
@click.option("--context", type=click.IntRange(min=0), default=0, metavar="N",
              help="Prompt + reply tokens the bundle holds, at most the model's own (0 = the target's "
                   "runtime.context_length, or the model's own when that is longer). With --tune too.")
@_json_option
def build(model: str, target: str, out: Path, fmt: str | None, force: bool, skip_validation: bool,
          adapter: Path | None, eval_text: Path | None, checks_file: Path | None, no_wheels: bool, tune: bool,
          plot: Path | None, tune_on: str | None, ssh_config: Path | None, known_hosts: Path | None,
          install_dir: str | None, sign_key: Path | None, no_cache: bool, context: int,
          runtime_adapters: tuple[str, ...], lora_slots: str | None, native: bool | None) -> None:
    """Export MODEL, quantize it for TARGET, check its quality, and write a bundle.

    MODEL is an alias (smollm2-135m, tinyllama, ...), a hub id (org/name[@revision]), a local Hugging Face
    folder, or a .gguf file.
    """
    from edgepack import api

    def go(o: Output) -> tuple[Any, str]:
        from edgepack.stages.adapters import parse

        slots = tuple(m.strip() for m in lora_slots.split(",") if m.strip()) if lora_slots else ()
        res = api.build(api.BuildRequest(model=model, target=target, out=out, force=force, format=fmt,
                                         runtime_adapters=parse(runtime_adapters), lora_slots=slots,
                                         eval_text=eval_text, adapter=adapter, checks=checks_file,
                                         skip_validation=skip_validation, vendor_wheels=not no_wheels,
                                         native=native,
                                         tune=tune, plot=plot, sign=sign_key, use_cache=not no_cache,
                                         context=context,
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

    from edgepack.backends import check_candidates, check_profile
    from edgepack.targets import load_target, profile_to_dict

    def go(_o: Output) -> tuple[Any, str]:
        profile = check_profile(load_target(target))
        check_candidates(profile)  # showing a target is how a user checks one: its tune candidates too
        data = profile_to_dict(profile)
        return data, json.dumps(data, indent=2)

    _run("targets show", go)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Do not re-hash the files.")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="PUBKEY",
              help="Verify the signature against this minisign public key (.pub file or RW... base64; repeatable). "
                   "Without one, a signature is shown but not verified.")
@_json_option
def inspect(bundle: Path, no_verify: bool, trusted_keys: tuple[str, ...]) -> None:
    """Show a bundle's manifest and check every file against it (and its signature against --trusted-key)."""
    from edgepack import api

    def go(_o: Output) -> tuple[Any, str]:
        res = api.inspect(bundle, verify=not no_verify, trusted_keys=trusted_keys)
        return {**res.manifest.doc, "verified": res.verified, "signature": res.signature,
                "signature_key_id": res.signature_key_id, "signature_verified": res.signature_verified,
                "licenses": res.licenses}, inspect_summary(res)

    _run("inspect", go)


@cli.command("plan")
@click.argument("model")
@click.option("-t", "--target", default="host", show_default=True, help="A target id or a path to your own .toml.")
@click.option("--context", type=click.IntRange(min=0), default=0, metavar="N",
              help="Prompt + reply tokens, at most the model's own (0 = the target's runtime.context_length, or the "
                   "model's own when that is longer or 0).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), help="Plan for the other export format.")
@_json_option
def plan_cmd(model: str, target: str, context: int, fmt: str | None) -> None:
    """Will MODEL fit TARGET? Parameters, weights, KV cache and runtime against the device's RAM, and the build's
    own peak memory and time against this machine (nothing built)."""
    from edgepack import api
    from edgepack.output import plan_summary

    def go(o: Output) -> tuple[Any, str]:
        res = api.plan(api.PlanRequest(model=model, target=target, context=context, format=fmt), progress=o.progress)
        return res, plan_summary(res)

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
@click.option("--adapter", metavar="NAME", help="Answer with the bundle's runtime adapter NAME (default: the base).")
@click.option("--speculative", type=click.Choice(["off", "ngram"]),
              help="Speculative decoding (ONNX bundles): ngram (prompt lookup) or off (default: the bundle's).")
@_json_option
def run(bundle: Path, prompt: str, max_tokens: int | None, raw: bool, system: str | None, sample: bool,
        temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
        adapter: str | None, speculative: str | None) -> None:
    """Run a bundle's own runner on this machine (when its arch matches)."""
    import json

    from edgepack import api

    state = click.get_current_context().find_object(_State)
    json_mode = bool(state and state.json_mode)

    def go(_o: Output) -> tuple[Any, str]:
        _code, stdout = api.run(api.RunRequest(
            bundle=bundle, prompt=prompt, max_tokens=max_tokens, json_output=True, raw=raw, system=system,
            adapter=adapter, speculative=speculative,
            sampling=api.Sampling(sample=sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)))
        data = json.loads(stdout.strip().splitlines()[-1])
        return data, data["text"] if not json_mode else ""

    _run("run", go)


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
