"""The speed meter on a device (`build --tune --tune-on HOST`, `bench --host`): the bundle's own runner, run by
the device's installed runtime, over the deploy machinery and under the device lock."""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import Any

from edgepack.errors import UserError
from edgepack.meter import result, runner_args
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.remote.session import Device
from edgepack.remote.ssh import Connection, SSHOptions


class RemoteSpeedMeter:
    """Uploads a candidate's runner folder (run.py, the runner core, model/) next to the device's releases and
    runs it with the Python of the device's current release (its installed runtime)."""

    def __init__(self, opts: SSHOptions, install_dir: str, progress: ProgressFn = silent) -> None:
        self.conn = Connection(opts)
        self.conn.connect()
        self.dev = Device(self.conn, install_dir)
        facts = self.dev.facts()
        # Under the device lock for the whole tune: no deploy switches `current` (whose runtime times the candidates)
        # or prunes while it runs, and what it starts is ended with it.
        self._lock = contextlib.ExitStack()
        try:
            self._lock.enter_context(self.dev.locked("edgepack build --tune-on"))
        except BaseException:
            self.conn.close()
            raise
        self.where = f"{self.conn.hostname} ({facts['arch']})"
        self.python = posixpath.join(self.dev.install_dir, "current", ".venv", "bin", "python")
        if self.conn.run(["test", "-x", self.python], check=False, what="find the runtime").exit_code != 0:
            self.close()
            raise UserError(f"{self.conn.hostname} has no installed edgepack runtime under {self.dev.install_dir}.",
                            hint="Deploy any bundle of this target there once (edgepack deploy --host ...); "
                                 "--tune-on times candidates with that release's runtime.")
        self.root = posixpath.join(self.dev.install_dir, "tune")
        self.progress = progress

    def __call__(self, runner: Path, *, tokens: int, reps: int, threads: int,
                 args: list[str] | None = None) -> list[dict[str, Any]]:
        remote = posixpath.join(self.root, runner.name)
        self.conn.run(["rm", "-rf", remote], what="clear the tune folder")
        files = sorted(Path(d) / f for d, _, names in os.walk(runner, followlinks=True) for f in names)  # model/ too
        dirs = sorted({posixpath.join(remote, p.parent.relative_to(runner).as_posix()) for p in files})
        self.conn.run(["mkdir", "-p", *dirs], what="create the tune folder")
        for f in files:
            self.conn.put(f, posixpath.join(remote, f.relative_to(runner).as_posix()))
        runs = []
        try:
            for i in range(reps):
                self.progress(ProgressEvent("tune", f"timing {runner.name} on {self.where}: run {i + 1}/{reps}"))
                cmd = [self.python, "-B", posixpath.join(remote, "run.py"),
                       *(args if args is not None else runner_args(tokens, threads))]
                res = self.conn.run(cmd, what=f"time {runner.name} on the device", pidfile=self.dev.pidfile)
                runs.append(result(res.stdout, f"timing {runner.name} on {self.conn.hostname}"))
        finally:
            self.conn.run(["rm", "-rf", remote], check=False, what="remove the tune folder")
        return runs

    def close(self) -> None:
        try:
            self.conn.run(["rm", "-rf", posixpath.join(self.dev.install_dir, "tune")], check=False,
                          what="remove the tune folder")
        finally:
            self._lock.close()
            self.conn.close()


def bench_current(conn: Connection, install_dir: str, args: list[str], reps: int, timeout: float,
                  progress: ProgressFn = silent) -> tuple[str, str, list[dict[str, Any]]]:
    """Run the device's current release's runner `reps` times in fresh processes, under the device lock so no
    deploy switches `current` meanwhile; returns (where, release folder, one JSON document per run)."""
    dev = Device(conn, install_dir)
    dev.facts()  # the install dir, resolved on the device: no shell expansion of `~` here
    st = dev.helper("status", what="find the current release")
    if not st.get("current"):
        raise UserError(f"no current release under {dev.install_dir} on {conn.hostname}.",
                        hint="Deploy one first: edgepack deploy --host ...", host=conn.hostname)
    runs = []
    with dev.locked("edgepack bench"):
        base = dev.path("releases", st["current"])
        for i in range(reps):
            progress(ProgressEvent("bench", f"run {i + 1}/{reps} on {conn.hostname}"))
            res = conn.run([f"{base}/.venv/bin/python", f"{base}/run.py", *args], what="benchmark run",
                           timeout=timeout, pidfile=dev.pidfile)
            runs.append(result(res.stdout, f"benchmark run on {conn.hostname}"))
    return conn.hostname, st["current"], runs
