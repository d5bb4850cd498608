"""A real OpenSSH server on loopback for tests: fresh host and user keys, a free port, a deadline, teardown."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class SSHServer:
    dir: Path
    port: int
    host_key: Path
    user_key: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def host_key_line(self, host: str = "127.0.0.1") -> str:
        kind, b64 = (self.host_key.with_suffix(".pub").read_text().split()[:2])
        return f"[{host}]:{self.port} {kind} {b64}\n"

    def start(self, deadline: float = 15.0) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd not ready within {deadline}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Stop the server and every connection it serves: to a client, the link drops."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def write_client_files(self, where: Path, alias: str = "pi.local") -> tuple[Path, Path]:
        """An ssh_config with a LAN-like alias for this server, and a known_hosts that trusts it."""
        cfg = where / "ssh_config"
        cfg.write_text(f"Host {alias}\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n"
                       f"  IdentityFile {self.user_key}\n")
        kh = where / "known_hosts"
        kh.write_text(self.host_key_line())
        return cfg, kh


def make_server(root: Path) -> SSHServer:
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = root / "ssh_host_ed25519_key", root / "id_ed25519"
    keygen(host_key)
    keygen(user_key)
    shutil.copy(user_key.with_suffix(".pub"), root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
ClientAliveInterval 5
LogLevel VERBOSE
""")
    return SSHServer(root, port, host_key, user_key)
