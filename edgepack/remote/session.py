"""The controller's handle on the device program: one command per process, or a session that holds the install
dir's lock for one operation and answers every request of it (the program is sent once per operation)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from edgepack.errors import DeviceLocked, NoPythonError, RemoteError
from edgepack.remote.program import device_program, launch
from edgepack.remote.ssh import CommandResult, Connection

HEARTBEAT_S = 10.0
TTL_S = 60  # the device frees the lock after this long without a heartbeat (a link that died silently)
# Commands that change the install dir carry the operation holding its lock (the device checks it).
MUTATING = frozenset({"mkdirs", "reuse", "remove_extra", "publish", "switch", "rollback", "prune", "install_unit",
                      "trust", "service_start", "service_stop", "add_signature"})
Progress = Callable[[dict[str, Any]], None]


def new_op_id() -> str:
    """Unique per operation: names the lock holder and every temp name the operation uses on the device."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def heartbeat(beat: Callable[[], object], every: float, name: str) -> Iterator[None]:
    """Call `beat` every `every` seconds in a thread while the block runs; the first failure ends the beats (the
    link is gone, and the device frees the lock by itself)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            try:
                beat()
            except Exception:
                return

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=15)


class Session:
    """One device program process holding the install dir's lock: requests are JSON lines, answered in order."""

    def __init__(self, conn: Connection, chan: Any, op: str) -> None:
        self.conn, self.chan, self.op = conn, chan, op
        self._send = threading.Lock()  # the heartbeat thread writes to the same channel
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        with self._send:
            self.chan.sendall(data)

    def line(self, timeout: float) -> str:
        """The next line the device program prints; "" when it ended (its stderr is then in the error)."""
        deadline = time.monotonic() + timeout
        self.chan.settimeout(1.0)
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise RemoteError(f"the device program on {self.conn.hostname} did not answer in {timeout:.0f} s.",
                                  hint="The device may be overloaded; run the same command again.",
                                  host=self.conn.hostname, code="remote_timeout")
            try:
                data = self.chan.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                return ""
            self._buf += data
        raw, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return raw.decode("utf-8", "replace").strip()

    def request(self, argv: list[str], *, timeout: float, progress: Progress | None = None) -> str:
        """Send one request; returns its answer line (progress lines before it go to `progress`)."""
        self.write(json.dumps(argv).encode() + b"\n")
        while True:
            line = self.line(timeout)
            if not line.startswith('{"progress": '):
                return line
            if progress is not None:
                progress(json.loads(line)["progress"])

    def stderr(self) -> str:
        with contextlib.suppress(Exception):
            if self.chan.recv_stderr_ready():
                return self.chan.recv_stderr(65536).decode("utf-8", "replace")
        return ""

    def close(self) -> None:
        """Release: the device program ends what the operation left running, then unlocks."""
        try:
            self.write(b"release\n")
            self.chan.shutdown_write()
            self.chan.recv_exit_status()
        except Exception:
            pass
        self.chan.close()


class Device:
    """The device program on one device: each call is one JSON answer, from a session while one is open (`locked`),
    else from a process of its own (the program on its stdin)."""

    def __init__(self, conn: Connection, install_dir: str) -> None:
        self.conn = conn
        self.install_dir = install_dir  # may start with ~ until facts() resolves it
        self.session: Session | None = None

    @property
    def op(self) -> str:
        return self.session.op if self.session else ""

    def call(self, cmd: str, *args: str, what: str, timeout: float | None = None,
             progress: Progress | None = None) -> tuple[dict[str, Any] | None, str, CommandResult | None]:
        """(the JSON answer or None, the raw output, the process's record when it ran in one of its own)."""
        argv = [cmd, self.install_dir, *([self.op] if cmd in MUTATING else []), *args]
        timeout = timeout or self.conn.opts.command_timeout
        if self.session is not None:
            out = self.session.request(argv, timeout=timeout, progress=progress)
            if not out:
                raise RemoteError(f"the device program on {self.conn.hostname} ended while it was asked to {what}: "
                                  f"{self.session.stderr()[-500:] or 'no output'}.",
                                  hint="Run the same command again.", host=self.conn.hostname)
            res = None
        else:
            res = self.conn.run(["python3", "-", *argv], stdin=device_program(), what=what, timeout=timeout,
                                check=False)
            if res.exit_code == 127:
                raise NoPythonError(f"{self.conn.hostname} has no python3.",
                                    hint="Install Python 3 on the device (Debian: sudo apt install python3 "
                                         "python3-venv), or put the bundle into the device's image instead "
                                         "(docs/native.md).", host=self.conn.hostname)
            out = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            data = None
        return (data if isinstance(data, dict) else None), out, res

    def helper(self, cmd: str, *args: str, what: str, timeout: float | None = None, check: bool = True,
               progress: Progress | None = None) -> dict[str, Any]:
        """One device program command on the install dir; its JSON answer. A refusal (a bad path or id) is an
        error: edgepack never asks for one, so the manifest or the device is not what it claims."""
        data, out, res = self.call(cmd, *args, what=what, timeout=timeout, progress=progress)
        if data is None:
            if not check:
                return {"ok": False, "error": "no JSON from the device program"}
            raise RemoteError(f"{what} failed on {self.conn.hostname}"
                              f"{f' (exit {res.exit_code})' if res else ''}: {out[-300:] or 'no answer'}.",
                              hint="See the evidence.", host=self.conn.hostname, evidence=res)
        if data.get("refused"):
            raise RemoteError(f"the device refused to {what}: {data.get('error')}.",
                              hint="edgepack checks every device path and id; this is a bug or a tampered "
                                   "manifest. Nothing more was done.", host=self.conn.hostname,
                              code="device_refused", evidence=res)
        return data

    @contextmanager
    def locked(self, command: str) -> Iterator[str]:
        """Open a session: the install dir's lock for the block (yields the operation id). The loser gets a
        DeviceLocked error (exit 1) naming the holder, and nothing is changed; a holder that dies frees the lock
        (the kernel drops its flock), and its leftovers are ended by the next holder."""
        op = new_op_id()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        line, program = launch("session", self.install_dir, op, json.dumps(holder), str(TTL_S))
        session = Session(self.conn, self.conn.start(line), op)
        session.write(program)
        first = session.line(self.conn.opts.command_timeout)
        try:
            answer: dict[str, Any] = json.loads(first)
        except json.JSONDecodeError:
            err = session.stderr()
            session.chan.close()
            raise RemoteError(f"could not take the lock of {self.install_dir} on {self.conn.hostname}: "
                              f"{(first or err)[-300:] or 'no answer'}.",
                              hint="Check that python3 runs on the device and the install dir is writable.",
                              host=self.conn.hostname) from None
        if not answer.get("ok"):
            session.chan.close()
            h = answer.get("holder") or {}
            raise DeviceLocked(
                f"{self.install_dir} on {self.conn.hostname} is locked by another edgepack operation: "
                f"`{h.get('command', '?')}` from {h.get('host', '?')} (pid {h.get('pid', '?')}), since "
                f"{h.get('since', '?')}. Nothing was changed.",
                hint="Wait for it to finish and run again. A holder that died frees the lock by itself (at once if "
                     f"its connection closed, else after {TTL_S} s).", host=self.conn.hostname, holder=h)
        self.session = session
        try:
            with heartbeat(lambda: session.write(b"\n"), HEARTBEAT_S, "edgepack-device-heartbeat"):
                yield op
        finally:
            self.session = None
            session.close()

    @property
    def pidfile(self) -> str:
        return self.path(".ops", f"{self.op}.pids")

    def facts(self, provider: str = "cpu") -> dict[str, Any]:
        facts = self.helper("facts", "cuda" if provider == "cuda" else "no", what="preflight")
        self.install_dir = facts["install_dir"]
        return facts

    def path(self, *parts: str) -> str:
        return posixpath.join(self.install_dir, *parts)
