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
    address: str = "127.0.0.1"
    netns: str | None = None  # run inside this network namespace

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def host_key_line(self, host: str | None = None) -> str:
        kind, b64 = (self.host_key.with_suffix(".pub").read_text().split()[:2])
        name = host or self.address
        return f"{name if self.port == 22 else f'[{name}]:{self.port}'} {kind} {b64}\n"

    def start(self, deadline: float = 15.0) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
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
        cfg.write_text(f"Host {alias}\n  HostName {self.address}\n  Port {self.port}\n  User root\n"
                       f"  IdentityFile {self.user_key}\n")
        kh = where / "known_hosts"
        kh.write_text(self.host_key_line())
        return cfg, kh


def make_server(root: Path, address: str = "127.0.0.1", netns: str | None = None,
                env: dict[str, str] | None = None) -> SSHServer:
    """`env`: set in every session (sshd's SetEnv), e.g. to give one board a broken runtime."""
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = root / "ssh_host_ed25519_key", root / "id_ed25519"
    keygen(host_key)
    keygen(user_key)
    shutil.copy(user_key.with_suffix(".pub"), root / "authorized_keys")
    port = free_port() if netns is None else 22
    (root / "sshd_config").write_text(f"""Port {port}
ListenAddress {address}
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
""" + ("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()) + "\n" if env else ""))  # one line: sshd
    # takes the first SetEnv only
    return SSHServer(root, port, host_key, user_key, address=address, netns=netns)


class LanDevice:
    """A test host on its own network namespace, reached over a veth pair at 10.213.<n>.2 (the project's own
    addresses, inside this sandbox): a board on a LAN rather than a process on loopback."""

    def __init__(self, n: int) -> None:
        self.ns = f"edgepack-t{n}"
        self.host_if, self.dev_if = f"ept{n}h", f"ept{n}d"
        self.host_ip, self.dev_ip = f"10.213.{n}.1", f"10.213.{n}.2"

    def up(self) -> None:
        self.down()
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.dev_if],
                    ["ip", "link", "set", self.dev_if, "netns", self.ns],
                    ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
                    ["ip", "link", "set", self.host_if, "up"],
                    ["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.dev_ip}/30", "dev", self.dev_if],
                    ["ip", "netns", "exec", self.ns, "ip", "link", "set", self.dev_if, "up"],
                    ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True)

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)


def netns_available() -> bool:
    probe = subprocess.run(["ip", "netns", "add", "edgepack-probe"], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", "edgepack-probe"], capture_output=True, check=False)
    return probe.returncode == 0
