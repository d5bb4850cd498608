"""`edgepack adapter`: runtime LoRA adapters for a built base bundle (adapter_pack.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgepack.console import _json_option, _run, cli
from edgepack.output import Output


@cli.group()
def adapter() -> None:
    """Runtime LoRA adapters: ship fine-tunes for a base bundle already on the device, in megabytes."""


@adapter.command("pack")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, metavar="NAME=DIR...")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="The pack folder (default: <bundle>.adapters-<names> beside the bundle).")
@click.option("--model", help="The float model the bundle was built from, for the gate (default: the bundle's "
                              "model origin).")
@click.option("--target", help="Target id or .toml for the gate's tolerances (default: the profile the bundle "
                               "records).")
@click.option("--eval-text", type=click.Path(path_type=Path), help="Gate the adapters on this text of their task.")
@click.option("--checks", "checks_file", type=click.Path(path_type=Path),
              help="A JSONL file of the adapters' task checks, gated and re-run on the device.")
@click.option("--skip-validation", is_flag=True, help="Skip the adapters' quality gate (recorded).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), metavar="KEY",
              help="Sign the pack's manifest with this minisign secret key.")
@click.option("--force", is_flag=True, help="Replace an existing pack at the output path.")
@_json_option
def pack(bundle: Path, adapters: tuple[str, ...], out: Path | None, model: str | None, target: str | None,
         eval_text: Path | None, checks_file: Path | None, skip_validation: bool, sign_key: Path | None,
         force: bool) -> None:
    """A small, signable pack of PEFT LoRA adapters (NAME=DIR) for BUNDLE's base, each gated as base + adapter.

    `edgepack deploy --host H PACK` sends only the pack to a device that has BUNDLE (or an earlier pack of it);
    the release it makes has BUNDLE's adapters and these."""
    from edgepack.adapter_pack import PackRequest
    from edgepack.adapter_pack import pack as make_pack
    from edgepack.stages.adapters import parse

    def go(o: Output) -> tuple[Any, str]:
        res = make_pack(PackRequest(bundle=bundle, adapters=parse(adapters), out=out, model=model, target=target,
                                    eval_text=eval_text, checks=checks_file, skip_validation=skip_validation,
                                    sign=sign_key, force=force), progress=o.progress)
        return res, (f"adapter pack {res.pack}: {', '.join(res.added)} for base {res.base_id}\n"
                     f"  {res.bytes / 1e6:.2f} MB to send for a {res.release_bytes / 1e6:.1f} MB release "
                     f"({res.bundle_id}; adapters {', '.join(res.adapters)}){'; signed' if res.signed else ''}\n"
                     f"  deploy: edgepack deploy --host HOST {res.pack}")

    _run("adapter pack", go)
