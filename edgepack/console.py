"""The CLI's plumbing: the `edgepack` group and its global options, `_run` (one API call, its output and its exit
code), --json after a subcommand, and `main` (bad command lines as user errors). The commands are in cli.py
(models and bundles) and cli_device.py (devices)."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from edgepack import __version__
from edgepack.errors import EdgepackError, UserError
from edgepack.output import Output


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
