"""SSH to a device: the only module that imports paramiko. Strict host keys, timeouts, quoted arguments."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import posixpath
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import RemoteError, UserError, require

DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_COMMAND_TIMEOUT = 300.0
TAIL_LINES = 20


@dataclass(frozen=True)
class SSHOptions:
    """Where and how to connect; unset fields come from ~/.ssh/config, then OpenSSH's defaults."""

    host: str
    user: str | None = None
    port: int | None = None
    default_port: int = 22  # used when neither port nor ~/.ssh/config gives one (a target's deploy.ssh_port)
    identity: Path | None = None
    accept_new_host_key: bool = False
    known_hosts: Path | None = None  # default: ~/.ssh/known_hosts (and UserKnownHostsFile from the config)
    ssh_config: Path | None = None  # default: ~/.ssh/config
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT


@dataclass(frozen=True)
class CommandResult:
    """One remote command and its evidence."""

    command: str
    exit_code: int | None  # None: killed by our timeout
    seconds: float
    stdout_tail: tuple[str, ...] = ()
    stderr_tail: tuple[str, ...] = ()
    stdout: str = field(default="", repr=False, compare=False, metadata={"json": False})
    killed: bool = False  # timed out or interrupted: its process group on the device was ended

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def fingerprint(key: Any) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def quote(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


PGID_MARK = "@edgepack-pgid "


def _strip_mark(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(PGID_MARK))


def _tail(text: str) -> tuple[str, ...]:
    return tuple(text.splitlines()[-TAIL_LINES:])


def ssh_config_entry(host: str, ssh_config: Path | None = None) -> dict[str, Any]:
    """What an ssh_config says for `host` (--ssh-config, else ~/.ssh/config; ~ is $HOME): {} without one."""
    path = ssh_config or Path("~/.ssh/config").expanduser()
    if not path.is_file():
        return {}
    entry: dict[str, Any] = require("paramiko", "ssh", "Reading ssh_config").SSHConfig.from_path(str(path)).lookup(host)
    return entry


def known_hosts_file(known_hosts: Path | None, conf: dict[str, Any]) -> Path:
    """The one known_hosts file a host's key is checked against (and, with --accept-new-host-key, saved to), for
    `deploy --host` and `deploy --inventory` alike: --known-hosts, else the host's ssh_config UserKnownHostsFile,
    else ~/.ssh/known_hosts, where ~ is $HOME (OpenSSH's own ~ is the passwd entry's home, so the fleet path hands
    this file to Ansible's ssh by name)."""
    return known_hosts or Path(os.path.expanduser((conf.get("userknownhostsfile") or "~/.ssh/known_hosts").split()[0]))


class Connection:
    """An open SSH session to one device."""

    def __init__(self, opts: SSHOptions, *, log: Callable[[CommandResult], None] | None = None) -> None:
        self.opts = opts
        self.records: list[CommandResult] = []
        self._log = log
        self._client: Any = None
        self._jump: Any = None
        self._sftp: Any = None
        self.hostname, self.user, self.port, self.key_files, self.known_hosts, self.proxy_jump = \
            self._resolve_config()

    # -- connection ------------------------------------------------------------------------------
    def _resolve_config(self) -> tuple[str, str, int, list[str], Path, str | None]:
        conf = ssh_config_entry(self.opts.host, self.opts.ssh_config)
        hostname = conf.get("hostname", self.opts.host)
        user = self.opts.user or conf.get("user") or os.environ.get("USER") or "root"
        port = self.opts.port or int(conf.get("port", self.opts.default_port))
        keys = [str(self.opts.identity)] if self.opts.identity else [
            os.path.expanduser(k) for k in conf.get("identityfile", [])]
        return hostname, user, port, keys, known_hosts_file(self.opts.known_hosts, conf), conf.get("proxyjump")

    def __enter__(self) -> Connection:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        paramiko = require("paramiko", "ssh", "Deploying over SSH")
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_HostKeyPolicy(self))
        sock = None
        if self.proxy_jump:
            sock = self._open_jump(paramiko)
        try:
            client.connect(
                self.hostname, port=self.port, username=self.user, key_filename=self.key_files or None,
                timeout=self.opts.connect_timeout, banner_timeout=self.opts.connect_timeout,
                auth_timeout=self.opts.connect_timeout, allow_agent=True, look_for_keys=not self.key_files,
                sock=sock)
        except paramiko.BadHostKeyException as exc:
            raise UserError(
                f"the host key of {self.hostname}:{self.port} has CHANGED (now {fingerprint(exc.key)}, "
                f"known_hosts has {fingerprint(exc.expected_key)}). Refusing to connect.",
                hint=f"If the device was reinstalled, remove its old key: ssh-keygen -R '[{self.hostname}]:{self.port}'"
                     f" -f {self.known_hosts}; otherwise someone may be intercepting the connection.",
                host=self.hostname, port=self.port, fingerprint=fingerprint(exc.key), code="host_key_changed") from exc
        except paramiko.AuthenticationException as exc:
            raise UserError(f"SSH authentication to {self.user}@{self.hostname}:{self.port} failed.",
                            hint="Check --user and --identity (or your ssh-agent and ~/.ssh/config).",
                            host=self.hostname, user=self.user, code="ssh_auth_failed") from exc
        except TimeoutError as exc:
            raise UserError(f"timed out connecting to {self.hostname}:{self.port} after "
                            f"{self.opts.connect_timeout:.0f}s.", hint="Is the device on and reachable?",
                            host=self.hostname, code="ssh_unreachable") from exc
        except (OSError, paramiko.SSHException) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"cannot connect to {self.hostname}:{self.port}: {exc}.",
                            hint="Check the host name, port and that sshd runs on the device.",
                            host=self.hostname, port=self.port, code="ssh_unreachable") from exc
        self._client = client

    def _open_jump(self, paramiko: Any) -> Any:
        assert self.proxy_jump
        jump_host = self.proxy_jump.split(",")[0]
        juser, _, jhost = jump_host.rpartition("@")
        jhost, _, jport = jhost.partition(":")
        self._jump = Connection(SSHOptions(host=jhost, user=juser or None, port=int(jport) if jport else None,
                                           identity=Path(self.key_files[0]) if self.key_files else None,
                                           accept_new_host_key=self.opts.accept_new_host_key,
                                           known_hosts=self.opts.known_hosts, ssh_config=self.opts.ssh_config,
                                           connect_timeout=self.opts.connect_timeout))
        self._jump.connect()
        transport = self._jump._client.get_transport()
        return transport.open_channel("direct-tcpip", (self.hostname, self.port), ("127.0.0.1", 0),
                                      timeout=self.opts.connect_timeout)

    def close(self) -> None:
        """Best effort: after a dropped link, closing the SFTP channel raises (EOFError); that must not hide
        the error that is already on its way to the user."""
        for thing in (self._sftp, self._client, self._jump):
            if thing is not None:
                with contextlib.suppress(Exception):  # paramiko raises EOFError, OSError, SSHException here
                    thing.close()
        self._sftp = self._client = self._jump = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("not connected")
        return self._client

    # -- commands --------------------------------------------------------------------------------
    def run(self, args: Sequence[str] | str, *, timeout: float | None = None, check: bool = True,
            what: str | None = None, stdin: str | None = None, pidfile: str | None = None) -> CommandResult:
        """Run a command; `args` as a list is shell-quoted one by one, a string is sent as is (trusted).
        On timeout or Ctrl-C the command's process group on the device is ended, not left running; `pidfile`
        (a device path) also records the group, so the lock holder ends it if this connection dies."""
        command = args if isinstance(args, str) else quote(args)
        timeout = timeout or self.opts.command_timeout
        t0 = time.monotonic()
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise self._dropped(f"running {command[:60]}", ConnectionError("not connected"))
        try:
            return self._run(transport, command, timeout, check, what, stdin, t0, pidfile)
        except (OSError, EOFError) as exc:
            raise self._dropped(f"running {what or command[:60]}", exc) from exc
        except Exception as exc:
            if type(exc).__module__.startswith("paramiko"):
                raise self._dropped(f"running {what or command[:60]}", exc) from exc
            raise

    def _run(self, transport: Any, command: str, timeout: float, check: bool, what: str | None,
             stdin: str | None, t0: float, pidfile: str | None) -> CommandResult:
        chan = transport.open_session(timeout=self.opts.connect_timeout)
        chan.settimeout(1.0)
        # sshd starts each command's shell with setsid(): its pid is the process group of all the command runs.
        prefix = f"echo {PGID_MARK}$$ >&2; "
        if pidfile:  # recorded with its start time, and every process it starts marked with the operation's id:
            # a later lock holder ends only processes whose identity matches (device_helper._ours)
            op = posixpath.basename(pidfile).removesuffix(".pids")
            prefix += (f"export EDGEPACK_OP={shlex.quote(op)}; {{ read -r _s < /proc/$$/stat; set -- $_s; "
                       f"echo \"$$ ${{22}}\"; }} >> {shlex.quote(pidfile)} 2>/dev/null || echo $$ >> "
                       f"{shlex.quote(pidfile)}; ")
        chan.exec_command(prefix + command)
        if stdin is not None:
            chan.sendall(stdin.encode())
            chan.shutdown_write()
        out, err = bytearray(), bytearray()
        exit_code: int | None = None
        killed = False
        try:
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    exit_code = chan.recv_exit_status()
                    break
                if time.monotonic() - t0 > timeout:
                    killed = self._end_group(err)
                    chan.close()
                    break
                if not transport.is_active():
                    raise ConnectionError("connection closed by the device")
                time.sleep(0.01)
        except KeyboardInterrupt:
            self._end_group(err)
            chan.close()
            raise
        chan.close()
        seconds = round(time.monotonic() - t0, 3)
        so, se = out.decode("utf-8", "replace"), _strip_mark(err.decode("utf-8", "replace"))
        result = CommandResult(command, exit_code, seconds, _tail(so), _tail(se), so, killed)
        self.records.append(result)
        if self._log:
            self._log(result)
        if exit_code is None and check:
            raise RemoteError(f"{what or 'remote command'} timed out after {timeout:.0f}s on {self.hostname}; "
                              f"it was stopped there ({'its processes were ended' if killed else 'it may still run'}).",
                              hint="The device may be overloaded or the command hangs; see the evidence.",
                              evidence=result, code="remote_timeout")
        if check and exit_code != 0:
            raise RemoteError(f"{what or 'remote command'} failed on {self.hostname} (exit {exit_code}).",
                              hint="See the evidence: the command, its exit code and the last lines of its output.",
                              evidence=result)
        return result

    def _end_group(self, err: bytearray) -> bool:
        """TERM, then KILL, the process group a timed-out or interrupted command runs in. True if it was sent."""
        m = re.search(rb"^" + PGID_MARK.encode() + rb"(\d+)$", bytes(err), re.M)
        transport = self._client.get_transport() if self._client is not None else None
        if m is None or transport is None or not transport.is_active():
            return False
        pgid = int(m.group(1))
        script = (f"kill -TERM -- -{pgid} 2>/dev/null || kill -TERM {pgid} 2>/dev/null; i=0; "
                  f"while kill -0 -- -{pgid} 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; "
                  f"kill -KILL -- -{pgid} 2>/dev/null; true")
        try:
            chan = transport.open_session(timeout=self.opts.connect_timeout)
            chan.settimeout(15.0)
            chan.exec_command(script)
            chan.recv_exit_status()
            chan.close()
        except Exception:  # best effort: the lock holder ends the group when this connection goes
            return False
        return True

    def start(self, command: str) -> Any:
        """A long-running command whose stdin stays open (the device lock); returns its paramiko channel."""
        transport = self.client.get_transport()
        chan = transport.open_session(timeout=self.opts.connect_timeout)
        chan.exec_command(command)
        return chan

    # -- files -----------------------------------------------------------------------------------
    @property
    def sftp(self) -> Any:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
            self._sftp.get_channel().settimeout(self.opts.command_timeout)
        return self._sftp

    def put(self, local: Path | bytes, remote: str, *, progress: Callable[[int, int], None] | None = None,
            sha256: str | None = None) -> str:
        """Send a file (read once, hashed while it is sent) or bytes; returns the sha256 of what was sent. With
        `sha256`, what was sent must have that hash: a file that changed since it was checked is an error."""
        import io

        name = "manifest" if isinstance(local, bytes) else local.name
        try:
            with (io.BytesIO(local) if isinstance(local, bytes) else open(local, "rb")) as raw:  # noqa: SIM115
                reader = _Hashing(raw)
                size = len(local) if isinstance(local, bytes) else os.fstat(raw.fileno()).st_size
                self.sftp.putfo(reader, remote, file_size=size, callback=progress, confirm=True)
        except (OSError, EOFError) as exc:
            raise self._dropped(f"uploading {name}", exc) from exc
        except Exception as exc:  # paramiko.SSHException and friends
            if type(exc).__module__.startswith("paramiko"):
                raise self._dropped(f"uploading {name}", exc) from exc
            raise
        digest = reader.hexdigest()
        if sha256 is not None and digest != sha256:
            raise RemoteError(f"{name} changed while it was being sent to {self.hostname}: its sha256 is now "
                              f"{digest[:16]}…, the manifest checked before the deploy says {sha256[:16]}….",
                              hint="Something rewrote the bundle during the deploy. Rebuild (or re-copy) it and "
                                   "deploy again; nothing unverified is installed.", host=self.hostname,
                              path=name, code="bundle_changed")
        return digest

    def _dropped(self, doing: str, exc: BaseException) -> RemoteError:
        return RemoteError(f"the connection to {self.hostname} failed while {doing}: {exc or type(exc).__name__}.",
                           hint="Run the same command again: an upload resumes with what is missing or wrong.",
                           host=self.hostname, code="ssh_connection_dropped")


class _Hashing:
    """A reader that hashes what passes through it: each byte is read from disk once, sent and hashed."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.h.update(data)
        return data

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class _HostKeyPolicy:
    """Unknown host key: refuse with the fingerprint, or accept-and-save when the user said so."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        fp = fingerprint(key)
        if not self.conn.opts.accept_new_host_key:
            raise UserError(
                f"{hostname} is not in {self.conn.known_hosts}: its {key.get_name()} key is {fp}.",
                hint="Check the fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_*.pub), then rerun "
                     "with --accept-new-host-key to trust it and save it to known_hosts.",
                host=hostname, fingerprint=fp, key_type=key.get_name(), code="host_key_unknown")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.conn.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.conn.known_hosts.open("a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
