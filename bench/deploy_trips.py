"""What one `edgepack deploy --host` costs on the wire: remote processes started, device-program round trips (a process,
or a request in a session), bytes of their command lines and stdin (the program itself, mostly), SFTP uploads, and
the wall time, against a real sshd on loopback.

    python bench/deploy_trips.py BUNDLE [--reps 3]

Runs a first deploy into a fresh install dir, then a redeploy of the same bundle (nothing to send), `reps` times
each; prints one JSON document with the medians. Run it in two checkouts to compare them (the same bundle)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _count() -> dict[str, int]:
    """Patch paramiko's channel so every process started and every stdin byte is counted."""
    import paramiko

    counts = {"processes": 0, "command_bytes": 0, "stdin_bytes": 0, "requests": 0, "sftp_files": 0}
    exec_command, sendall = paramiko.Channel.exec_command, paramiko.Channel.sendall

    def counted_exec(self: Any, command: str) -> Any:
        counts["processes"] += 1
        counts["command_bytes"] += len(command.encode() if isinstance(command, str) else command)
        self._edgepack_exec = True
        return exec_command(self, command)

    def counted_send(self: Any, data: bytes) -> Any:
        if getattr(self, "_edgepack_exec", False):
            counts["stdin_bytes"] += len(data)
            counts["requests"] += data.count(b"\n") if data.startswith(b"[") else 0
        return sendall(self, data)

    paramiko.Channel.exec_command, paramiko.Channel.sendall = counted_exec, counted_send
    put = paramiko.SFTPClient.putfo

    def counted_put(self: Any, *a: Any, **k: Any) -> Any:
        counts["sftp_files"] += 1
        return put(self, *a, **k)

    paramiko.SFTPClient.putfo = counted_put
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from edgepack import api
    from tests.sshd import make_server

    counts = _count()
    rows: dict[str, list[dict[str, float]]] = {"first": [], "again": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = make_server(Path(tmp) / "sshd")
        server.start()
        try:
            cfg, kh = server.write_client_files(Path(tmp))
            for rep in range(args.reps):
                install = Path(tmp) / f"home-{rep}" / "edgepack"
                req = api.DeployRequest(device=api.DeviceRequest(host="pi.local", ssh_config=cfg, known_hosts=kh,
                                                                 install_dir=str(install)), bundle=args.bundle)
                for kind in ("first", "again"):
                    before = dict(counts)
                    t0 = time.monotonic()
                    res = api.deploy(req)
                    assert res.smoke["ok"]
                    row = {k: counts[k] - before[k] for k in counts}
                    row["round_trips"] = row["processes"] + row["requests"]
                    row["program_bytes"] = row["command_bytes"] + row["stdin_bytes"]
                    rows[kind].append(dict(row, seconds=round(time.monotonic() - t0, 2)))
        finally:
            server.stop()
    print(json.dumps({kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in rows.items()},
                     indent=1))


if __name__ == "__main__":
    main()
