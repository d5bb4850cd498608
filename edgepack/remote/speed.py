"""Timing tune candidates on the device itself (`build --tune --tune-on HOST`), over the deploy machinery."""

from __future__ import annotations

import contextlib
import json
import posixpath
from importlib import resources
from pathlib import Path
from typing import Any

from edgepack.errors import UserError
from edgepack.progress import ProgressFn, silent
from edgepack.remote.session import Device
from edgepack.remote.ssh import Connection, SSHOptions


class RemoteSpeedMeter:
    """Uploads a candidate model folder next to the device's releases and times it with the installed runtime."""

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
        self.arch = facts["arch"]
        self.python = posixpath.join(self.dev.install_dir, "current", ".venv", "bin", "python")
        if self.conn.run(["test", "-x", self.python], check=False, what="find the runtime").exit_code != 0:
            self._lock.close()
            self.conn.close()
            raise UserError(f"{self.conn.hostname} has no installed edgepack runtime under {self.dev.install_dir}.",
                            hint="Deploy any bundle of this target there once (edgepack deploy --host ...); "
                                 "--tune-on times candidates with that release's runtime.")
        self.root = posixpath.join(self.dev.install_dir, "tune")
        self.progress = progress
        self._speed_src = resources.files("edgepack.quality").joinpath("speed.py").read_text(encoding="utf-8")

    @property
    def where(self) -> str:
        return f"{self.conn.hostname} ({self.arch})"

    def __call__(self, model_dir: Path, *, tokens: int, reps: int, threads: int) -> list[dict[str, Any]]:
        remote = posixpath.join(self.root, model_dir.name)
        self.conn.run(["rm", "-rf", remote], what="clear the tune folder")
        self.conn.run(["mkdir", "-p", remote], what="create the tune folder")
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                self.conn.put(f, posixpath.join(remote, f.name))
        runs = []
        try:
            for _ in range(reps):
                res = self.conn.run([self.python, "-", remote, "--tokens", str(tokens), "--threads", str(threads)],
                                    stdin=self._speed_src, what=f"time {model_dir.name} on the device",
                                    pidfile=self.dev.pidfile)
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        finally:
            self.conn.run(["rm", "-rf", remote], check=False, what="remove the tune folder")
        return runs

    def close(self) -> None:
        try:
            self.conn.run(["rm", "-rf", self.root], check=False, what="remove the tune folder")
        finally:
            self._lock.close()
            self.conn.close()


def bench_current(conn: Connection, install_dir: str, args: list[str], reps: int, timeout: float,
                  progress: ProgressFn = silent) -> tuple[str, str, list[dict[str, Any]]]:
    """Run the device's current release's runner `reps` times in fresh processes, under the device lock so no
    deploy switches `current` meanwhile; returns (where, release folder, one JSON document per run)."""
    from edgepack.progress import ProgressEvent

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
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return conn.hostname, st["current"], runs
