"""The one place that prints: human summaries on stdout, progress on stderr, or one --json envelope."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from edgepack.errors import EdgepackError, UserError
from edgepack.progress import ProgressEvent

ENVELOPE_VERSION = 1


def to_jsonable(obj: Any) -> Any:
    """Frozen dataclasses, paths and tuples → plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("json", True)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    return obj


def envelope(command: str, *, result: Any = None, error: EdgepackError | BaseException | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "edgepack": ENVELOPE_VERSION,
        "command": command,
        "ok": error is None,
        "result": to_jsonable(result) if error is None else None,
        "error": None,
    }
    if isinstance(error, EdgepackError):
        doc["error"] = to_jsonable(error.to_dict())
    elif error is not None:
        doc["error"] = {"kind": "internal", "message": f"{type(error).__name__}: {error}", "hint": None}
    return doc


class Output:
    """Human or JSON output for one CLI invocation."""

    def __init__(self, command: str, *, json_mode: bool, quiet: bool = False,
                 stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.command = command
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self._tty = self.err.isatty()
        self._last_stage: str | None = None
        self._t0 = time.monotonic()
        self._bar_open = False

    # -- progress (stderr) -------------------------------------------------
    def progress(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        if event.done is not None and event.total:
            if not self._tty:
                return  # bars only on a terminal; logs stay clean in CI
            frac = min(1.0, event.done / event.total)
            width = 28
            fill = int(frac * width)
            self.err.write(f"\r  [{'#' * fill}{'.' * (width - fill)}] {frac:4.0%} {event.message[:40]:<40}")
            self.err.flush()
            self._bar_open = True
            return
        if self._bar_open:
            self.err.write("\n")
            self._bar_open = False
        elapsed = time.monotonic() - self._t0
        self.err.write(f"[{elapsed:6.1f}s] {event.stage}: {event.message}\n")
        self.err.flush()

    def hint(self, text: str) -> None:
        if not self.quiet and not self.json_mode:
            self.err.write(text + "\n")

    # -- results (stdout) --------------------------------------------------
    def success(self, result: Any, human: str) -> None:
        if self._bar_open:
            self.err.write("\n")
            self._bar_open = False
        if self.json_mode:
            self.out.write(json.dumps(envelope(self.command, result=result), indent=2, sort_keys=True) + "\n")
        else:
            self.out.write(human.rstrip("\n") + "\n")
        self.out.flush()

    def failure(self, error: BaseException, *, traceback_text: str | None = None) -> int:
        if self._bar_open:
            self.err.write("\n")
            self._bar_open = False
        if self.json_mode:
            self.out.write(json.dumps(envelope(self.command, error=error), indent=2, sort_keys=True) + "\n")
            self.out.flush()
        if isinstance(error, UserError):  # exit 1, or 130 for an interrupted device operation
            if not self.json_mode or not self.quiet:
                self.err.write(f"error: {error.message}\n")
                if error.hint:
                    self.err.write(f"  hint: {error.hint}\n")
            return error.exit_code
        if traceback_text:
            self.err.write(traceback_text)
        if isinstance(error, EdgepackError):  # a tool crashed on checked input: say what, with its own log
            self.err.write(f"error: {error.message}\n")
            for line in error.fields.get("log_tail") or ():
                self.err.write(f"  | {line}\n")
        self.err.write(
            "error: internal error in edgepack (this is a bug). Please report it with the traceback above.\n"
        )
        return 2


KEEP_LOGS = 20


@contextlib.contextmanager
def tool_log(command: str) -> Iterator[tuple[TextIO, Path | None]]:
    """While a command runs, what the libraries it drives print (warnings, tqdm bars, C++ runtimes' own lines) goes
    to a log file under the cache dir, not to the terminal: yields (the real stderr for edgepack's own lines, the
    log's path). Only when stderr is the process's fd 2 (not under a test runner's capture); an empty log is
    removed, and the last KEEP_LOGS are kept."""
    try:
        real_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        real_fd = -1
    if real_fd != 2:
        yield sys.stderr, None
        return
    from edgepack.resources import cache_root

    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{command.replace(' ', '-')}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield real, path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        real.close()
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == 0:
                path.unlink(missing_ok=True)
        _rotate(logs)


def _rotate(logs: Path) -> None:
    """Keep the newest KEEP_LOGS logs; never the log of an edgepack that is still running (its pid ends the name):
    a long build writes nothing for minutes, and a shorter one finishing meanwhile must not delete its log."""
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def running(p: Path) -> bool:
        pid = p.stem.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    for old in sorted(logs.glob("*.log"), key=mtime)[:-KEEP_LOGS]:
        if not running(old):
            old.unlink(missing_ok=True)


# -- human summaries of results (what the CLI prints on stdout without --json) ----------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def plan_summary(plan: Any) -> str:
    """A few lines for people: the verdict, the parts of the total, and what to change when it does not fit."""
    p, w, kv = plan.params, plan.weights, plan.kv
    verdict = ("fits" if plan.fits else "does NOT fit") if plan.budget else "RAM unknown"
    ram = (f" of {plan.request.ram_mb:,} MiB ({_mib(plan.budget)} after {plan.request.headroom_pct:g} % headroom)"
           if plan.budget else "")
    lines = [
        f"{verdict}: ~{_mib(plan.total)} peak{ram}, {plan.request.fmt}/{plan.runtime}, context {kv.context} tokens",
        f"  parameters  {p.total / 1e6:,.1f} M ({p.embedding / 1e6:,.1f} M embedding"
        + (f", {p.head / 1e6:,.1f} M head" if p.head else ", tied head") + ")",
        f"  weights     {_mib(w.file)} on disk, {_mib(w.resident)} in RAM: {w.layout}",
        f"  KV cache    {_mib(kv.allocated)} ({kv.bytes_per_token:,} bytes/token, {kv.dtype}"
        + (", past and present apart" if kv.buffers > 1 else "") + ")",
    ]
    if plan.prompt_cache.slots:
        pc = plan.prompt_cache
        lines.append(f"  prompt cache {pc.slots} slot{'s' if pc.slots > 1 else ''} of {pc.tokens} tokens kept between "
                     f"requests ({_mib(pc.kept)}; one is the request's own KV cache)")
    if plan.prefill:
        lines.append(f"  prefill     {_mib(plan.prefill)} for a prompt that fills the context")
    lines.append(f"  runtime     {_mib(plan.runtime_overhead)}")
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.suggestion is not None:
        lines.append(f"  suggestion: {plan.suggestion.message}")
    if plan.context is not None and not plan.context.capped:
        lines.append(f"  context     {plan.context.tokens} tokens: {plan.context.reason}")
    if plan.build is not None:
        lines += _build_plan_lines(plan.build)
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _build_plan_lines(cost: Any) -> list[str]:
    """The build's own plan on this machine (build_memory.BuildCost), for `edgepack plan`'s summary."""
    where = (f"{_gib(cost.budget)} ({cost.bounded_by})" if cost.budget else
             f"nothing ({cost.bounded_by})" if "off" in cost.bounded_by else "nothing (memory unknown)")
    verdict = "fits" if cost.fits else "does NOT fit"
    took = f"{cost.seconds / 60:.0f} min" if cost.seconds >= 120 else f"{cost.seconds:.0f} s"
    lines = [f"build here  {verdict}: ~{_gib(cost.peak)} peak against {where}; ~{took} cold with the gate "
             f"on a 2-core runner (this machine has {cost.cores} cores)",
             f"  export    ~{_gib(cost.export_peak)} ({cost.tool}); gate ~{_gib(cost.gate_peak)} (fp32 reference layer "
             "by layer, then the bundle)"]
    if cost.suggestion:
        lines.append(f"  build suggestion: {cost.suggestion}")
    return lines


def build_summary(res: Any) -> str:
    q = res.quality
    lines = [f"built {res.bundle}  ({res.bytes / 1e6:.1f} MB, {res.scheme}, id {res.bundle_id})"]
    if res.tune:
        lines.append(f"{'candidate':<24} {'gate':<5} {'Δppl %':>8} {'KL':>7} {'top-1':>6} {'tok/s':>8} {'MB':>6}")
        for r in res.tune:
            lines.append(f"{('* ' if r.chosen else '  ') + r.name:<24} {'pass' if r.passed else 'FAIL':<5} "
                         f"{r.ppl_delta_pct:>+8.2f} {r.mean_kl:>7.3f} {r.top1_agreement:>6.3f} "
                         f"{r.decode_tok_s if r.decode_tok_s is not None else '-':>8} {r.bytes / 1e6:>6.1f}")
    if q.validated:
        lines.append(f"quality: ppl {q.ppl_reference} → {q.ppl_quantized} ({q.ppl_delta_pct:+.2f} %), "
                     f"KL {q.mean_kl}, top-1 {q.top1_agreement}, greedy {q.greedy_match}/{q.greedy_tokens}"
                     f"  [PASS within target '{res.target}' tolerances]")
        lines.append(f"  against {q.reference or 'the float model'}, on {q.text}")
    else:
        lines.append("quality: NOT VALIDATED (--skip-validation)")
    lines.append("stages: " + ", ".join(
        f"{s.name} {s.seconds:.1f}s" + (f" {s.peak_rss_mib / 1024:.1f} GiB" if s.peak_rss_mib else "")
        + (" (cached)" if s.detail.get("cached") else "") for s in res.stages))
    return "\n".join(lines)


def inspect_summary(res: Any) -> str:
    m = dict(res.manifest.doc)
    q = m["quality"]
    quality = (f"ppl {q['ppl_reference']} → {q['ppl_quantized']} ({q['ppl_delta_pct']:+.2f} %), "
               f"KL {q['mean_kl']}, top-1 {q['top1_agreement']}, against "
               f"{q.get('reference') or 'the float model'}, on {q['text']}" if q["validated"] else "NOT VALIDATED")
    total = sum(f["bytes"] for f in m["files"])
    return "\n".join([
        f"bundle   {m['name']}  (id {m['bundle_id']})",
        f"target   {m['target']['id']}  ({m['target']['arch']}, Python {m['target']['python']})",
        f"model    {m['model']['origin']}  sha256 {m['model']['weights_sha256'][:16]}…",
        f"export   {m['export']['format']} {m['export']['scheme']}  {m['export']['builder_options']}",
        f"quality  {quality}",
        f"runtime  {' '.join(m['runtime']['requirements'])}  ({len(m['runtime']['wheels'])} wheels)",
        f"files    {len(m['files'])}, {total / 1e6:.1f} MB, "
        + ("all match their sha256" if res.verified else "not verified"),
        f"trust    {res.signature}",
        "licenses " + ("; ".join(f"{lic}: {len(c)}" for lic, c in res.licenses.items()) if res.licenses
                       else "(no sbom.cdx.json: built by an older edgepack)"),
        *[f"adapter  {a['name']}  rank {a['rank']} {','.join(a['modules'])}  {a['bytes'] / 1e6:.1f} MB  "
          + (f"ppl {a['quality']['ppl_delta_pct']:+.2f} % vs its float merged model" if a["quality"]["validated"]
             else "NOT VALIDATED") for a in m.get("adapters", [])],
        *([f"pack     adapters for {m['base']['bundle_id']}: the base's files are listed, not carried"]
          if m.get("base") else []),
        *([_native_line(m["native"])] if m.get("native") else []),
    ])


def _native_line(n: dict[str, Any]) -> str:
    libs = f"{n['runtime']} {n['libraries'][0]['version']} for {n['arch']}, {n['bytes'] / 1e6:.1f} MB"
    if n.get("program"):
        return f"native   {n['program']} ({libs}; glibc >= {n['glibc_required']}): the model from C, no Python"
    return f"native   {libs}; edgepack-chat not compiled: {n['why_no_program']}"


def deploy_summary(res: Any) -> str:
    s = res.smoke
    lines = [f"deployed {res.bundle_id} to {res.host}:{res.release_dir}",
             f"current → releases/{res.release_folder} (was {res.previous or 'nothing'})",
             f"signature: {res.signature}",
             f"uploaded {res.uploaded_files} files ({res.uploaded_bytes / 1e6:.1f} MB), "
             f"{res.skipped_files} already there" + (f", re-sent {len(res.repaired_files)}" if res.repaired_files
                                                     else ""),
             f"smoke test on the device: golden {s.get('golden_match')}/{s.get('golden_required')}, "
             f"{s.get('tokens_per_s')} tok/s, prefill {s.get('prefill_ms')} ms, peak RSS {s.get('peak_rss_mb')} MB",
             f"service: {res.service}"]
    if res.wheels_fetched_for:
        lines.append(f"wheels: fetched for the device's Python {res.wheels_fetched_for} (the bundle's did not fit)")
    if res.pruned:
        lines.append(f"pruned: {', '.join(res.pruned)}")
    return "\n".join(lines)


def status_summary(st: dict[str, Any]) -> str:
    rows = [f"{'*' if r == st['current'] else ('<' if r == st['rollback_target'] else ' ')} {r}"
            for r in st["releases"]]
    svc = st.get("service") or {}
    rows.append(f"service: {'running' if svc.get('running') else 'not running'} ({svc.get('supervisor')}"
                f"{', pid ' + str(svc['pid']) if svc.get('pid') else ''}"
                f"{', ' + svc['addr'] if svc.get('addr') else ''})")
    if st.get("adapters"):
        rows.append(f"adapters of current: {', '.join(st['adapters'])}")
    if st.get("locked_by"):
        h = st["locked_by"]
        rows.append(f"locked by `{h.get('command')}` from {h.get('host')} since {h.get('since')}")
    return "\n".join([f"{st['host']}:{st['install_dir']}  current: {st['current'] or '(none)'}  "
                      f"(* current, < rollback target)", *rows])


def fleet_summary(rows: list[dict[str, Any]]) -> str:
    out = [f"{'HOST':<20} {'CURRENT':<40} SERVICE"]
    for r in rows:
        if not r["ok"]:
            out.append(f"{r['name']:<20} {'(unreachable)':<40} {r['error'].get('code')}: {r['error']['message']}")
            continue
        svc = r.get("service") or {}
        out.append(f"{r['name']:<20} {str(r.get('current') or '(none)'):<40} "
                   f"{'running' if svc.get('running') else 'not running'}")
    return "\n".join(out)


def rollout_summary(res: dict[str, Any]) -> str:
    """One line per host of a rollout (or fleet rollback): its batch, what happened, and what was sent."""
    out = [f"{'HOST':<16} {'BATCH':>5}  {'STATE':<12} {'CURRENT':<40} {'SENT':>10}  SMOKE"]
    for r in res["hosts"]:
        sent = f"{r['uploaded_bytes'] / 1e6:.2f} MB" if "uploaded_bytes" in r else "-"
        smoke = r.get("smoke") or {}
        speed = f"ok, {smoke['tokens_per_s']:.1f} tok/s" if smoke.get("ok") and smoke.get("tokens_per_s") else \
            "ok" if smoke.get("ok") else "-"
        line = f"{r['name']:<16} {r.get('batch') or '-':>5}  {r['state']:<12} {str(r.get('current') or '-'):<40} " \
               f"{sent:>10}  {speed}"
        if r.get("error"):
            line += f"\n{'':<16} {r['error'].get('code')}: {str(r['error'].get('message'))[:200]}"
        out.append(line)
    out.append(f"{len(res['batches'])} batch(es) (serial {res['serial']}, max_fail_percentage "
               f"{res['max_fail_percentage']}), {res['seconds']} s")
    return "\n".join(out)
