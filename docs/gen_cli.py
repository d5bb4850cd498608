"""Write docs/cli.md from the CLI's own --help texts:  python docs/gen_cli.py > docs/cli.md"""

from __future__ import annotations

import click

from edgepack.cli import cli


def walk(cmd: click.Command, path: list[str]) -> None:
    ctx = click.Context(cmd, info_name=" ".join(path))
    print(f"## `{' '.join(path)}`\n\n```\n{cmd.get_help(ctx)}\n```\n")
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                walk(sub, [*path, name])


if __name__ == "__main__":
    print("# CLI reference\n\nGenerated from `--help` by `docs/gen_cli.py`; do not edit by hand.\n")
    walk(cli, ["edgepack"])
