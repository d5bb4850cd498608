"""The device lock: one operation at a time per install dir, held by a helper process on the device."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from edgepack.errors import RemoteError, UserError
from edgepack.remote.ssh import Connection

HEARTBEAT_S = 10.0
TTL_S = 60  # the device frees the lock after this long without a heartbeat (a link that died silently)


def new_op_id() -> str:
    """Unique per operation: names the lock holder and every temp name the operation uses on the device."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-{secrets.token_hex(4)}"


class DeviceLocked(UserError):
    kind = "device-locked"
    code = "device_locked"


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


@contextmanager
def held(conn: Connection, helper_source: str, install_dir: str, command: str) -> Iterator[str]:
    """Take the install dir's lock for the duration of the block; yields the operation id.

    The helper holds an flock while it lives, so a crashed or disconnected holder never leaves a lock behind;
    the loser gets a DeviceLocked error (exit 1) naming the holder, and nothing is changed."""
    op = new_op_id()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    chan = conn.start(f"python3 -c {shlex.quote(helper_source)} lock {shlex.quote(install_dir)} {op} "
                      f"{shlex.quote(json.dumps(holder))} {TTL_S}")
    line = _first_line(chan, conn.opts.command_timeout)
    try:
        answer: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        chan.close()
        raise RemoteError(f"could not take the lock of {install_dir} on {conn.hostname}: {line[-300:] or 'no answer'}.",
                          hint="Check that python3 runs on the device and the install dir is writable.",
                          host=conn.hostname) from None
    if not answer.get("ok"):
        chan.close()
        h = answer.get("holder") or {}
        raise DeviceLocked(
            f"{install_dir} on {conn.hostname} is locked by another edgepack operation: "
            f"`{h.get('command', '?')}` from {h.get('host', '?')} (pid {h.get('pid', '?')}), since "
            f"{h.get('since', '?')}. Nothing was changed.",
            hint="Wait for it to finish and run again. A holder that died frees the lock by itself (at once if "
                 f"its connection closed, else after {TTL_S} s).", host=conn.hostname, holder=h)
    try:
        with heartbeat(lambda: chan.sendall(b"\n"), HEARTBEAT_S, "edgepack-lock-heartbeat"):
            yield op
    finally:
        try:
            chan.sendall(b"release\n")
            chan.shutdown_write()
            chan.recv_exit_status()  # the helper ends the operation's leftovers, then unlocks
        except Exception:
            pass
        chan.close()


def _first_line(chan: Any, timeout: float) -> str:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    chan.settimeout(1.0)
    while b"\n" not in buf and time.monotonic() < deadline:
        try:
            data = chan.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        buf += data
    if b"\n" not in buf:
        with contextlib.suppress(Exception):
            buf += chan.recv_stderr(4096) if chan.recv_stderr_ready() else b""
    return buf.decode("utf-8", "replace").strip().splitlines()[0] if buf.strip() else ""


class Interrupted(UserError):
    """Ctrl-C or a cancelled CI job during a device operation (exit 1: the device is in a stated, safe state)."""

    kind = "interrupted"
    code = "interrupted"
    exit_code = 130
