"""The release's service: a systemd unit (system or user scope) or, without systemd, a supervised process with
a pid file; its health check and status."""

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time

from .lock import group_alive, proc_start, require_lock
from .rules import Refused, inside, install_root


def unit_name(root):
    return "edgepack-%s.service" % hashlib.sha256(root.encode()).hexdigest()[:8]


def _check_addr(addr):
    if not re.match(r"^(unix:/[A-Za-z0-9._/-]{1,200}|\[?[0-9A-Za-z.:-]{1,100}\]?:[0-9]{1,5})$", addr):
        raise Refused("bad serve address %r" % (addr,))
    return addr


UNIT_DIRS = {"user": "~/.config/systemd/user", "system": "/etc/systemd/system"}
# A system unit runs as root: it gets what a model server needs and no more (the release is read-only to it, its
# install dir writable for LiteRT-LM's cache; no new privileges, a private /tmp).
SYSTEM_HARDENING = ("NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=full\nProtectKernelTunables=yes\n"
                    "ProtectControlGroups=yes\n")


def install_unit(install_dir, op, unit_file, scope, addr):
    """Install the current release's unit as this install dir's unit (one per install dir, whatever the bundle),
    with the install dir and address filled in: a user unit, or (root on a systemd device) a system unit."""
    root = install_root(install_dir)
    require_lock(root, op)
    if not re.match(r"^edgepack-[a-z0-9][a-z0-9._-]{0,95}\.service$", unit_file):
        raise Refused("bad unit name %r" % (unit_file,))
    if scope not in UNIT_DIRS and not scope.startswith("/"):  # an absolute folder: the tests' stand-in
        raise Refused("bad unit scope %r" % (scope,))
    src = inside(root, "current", unit_file)
    with open(src) as fh:
        text = fh.read().replace("@EDGEPACK_CURRENT@", os.path.join(root, "current"))
    text = text.replace("@EDGEPACK_SERVE@", _check_addr(addr))
    if scope == "system":
        text = text.replace("WantedBy=default.target", "WantedBy=multi-user.target")
        text = text.replace("\n[Install]", SYSTEM_HARDENING + "\n[Install]", 1)
    dest_dir = os.path.expanduser(UNIT_DIRS.get(scope, scope))
    os.makedirs(dest_dir, exist_ok=True)
    unit = unit_name(root)
    tmp = os.path.join(dest_dir, "." + unit + "." + op + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(dest_dir, unit))
    return {"ok": True, "unit": unit, "path": os.path.join(dest_dir, unit), "scope": scope}


def unit_scope(root):
    """Which systemd manager has this install dir's unit: "system", "user" or None."""
    unit = unit_name(root)
    for scope in ("system", "user"):
        if os.path.exists(os.path.join(os.path.expanduser(UNIT_DIRS[scope]), unit)):
            return scope
    return None


# -- the service without systemd: a supervised process with a pid file ----------------------------------

def _service_pid(root):
    """The supervisor's pid when the process of that pid is the one recorded (same start time), else None: after a
    crash or a reboot the pid may be a stranger's, and a stranger is never signalled."""
    try:
        with open(os.path.join(root, "service.pid")) as fh:
            record = fh.read().split()
        pid = int(record[0])
        with open("/proc/%d/stat" % pid) as fh:  # a zombie nobody reaped is not a running service
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
        if len(record) > 2:
            return pid if proc_start(pid) == record[2] else None
        with open("/proc/%d/cmdline" % pid, "rb") as fh:  # a pid file from before start times were recorded
            return pid if b"python" in fh.read() else None
    except (OSError, ValueError, IndexError):
        return None


def service_stop(install_dir, op):
    root = install_root(install_dir)
    require_lock(root, op)
    pid = _service_pid(root)
    if pid:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and group_alive(pid):
            time.sleep(0.1)
        if group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
    return {"ok": True, "stopped": pid}


def service_start(install_dir, op, addr):
    """(Re)start `current`'s server in its own session (it outlives this operation), logging to service.log."""
    root = install_root(install_dir)
    require_lock(root, op)
    _check_addr(addr)
    service_stop(install_dir, op)
    current = os.path.join(root, "current")
    python = os.path.join(current, ".venv", "bin", "python")
    log = open(os.path.join(root, "service.log"), "ab")  # noqa: SIM115 (handed to the child)
    state = os.path.join(root, "service.state")
    with contextlib.suppress(OSError):
        os.remove(state)
    pid = os.fork()
    if pid == 0:  # child: a new session, detached from this SSH command, that supervises the server
        try:
            os.setsid()
            os.chdir(current)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            _supervise([python, os.path.join(current, "run.py"), "--serve", addr], state)
        finally:
            os._exit(0)
    log.close()
    with open(os.path.join(root, "service.pid.tmp"), "w") as fh:
        fh.write("%d %s %s\n" % (pid, addr, proc_start(pid) or "?"))
    os.replace(os.path.join(root, "service.pid.tmp"), os.path.join(root, "service.pid"))
    return {"ok": True, "pid": pid, "addr": addr}


RESTART_S = 5  # as the unit's RestartSec
RESTART_BURST = (5, 60.0)  # more restarts than this in that many seconds: give up (systemd's StartLimitBurst)


def _write_state(path, doc):
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh)
    os.replace(path + ".tmp", path)


def _supervise(argv, state):
    """Run the server; when it fails (not a clean exit, not our SIGTERM), restart it after RESTART_S, as the systemd
    unit's Restart=on-failure does. The state file says how often and why."""
    restarts, recent = 0, []
    running = [0]
    stopping = []

    def on_term(signum, _frame):  # a plain `kill` of the supervisor stops its server too, never orphans it
        stopping.append(signum)
        if running[0]:
            with contextlib.suppress(OSError):
                os.kill(running[0], signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    while not stopping:
        child = os.fork()
        if child == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        running[0] = child
        _write_state(state, {"server_pid": child, "restarts": restarts, "last_exit": None})
        _, status = os.waitpid(child, 0)
        running[0] = 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        if code == 0 or code == -signal.SIGTERM or stopping:
            _write_state(state, {"server_pid": None, "restarts": restarts, "last_exit": code})
            return
        now = time.time()
        recent = [t for t in recent if now - t < RESTART_BURST[1]] + [now]
        gave_up = len(recent) > RESTART_BURST[0]
        _write_state(state, {"server_pid": None, "restarts": restarts, "last_exit": code, "gave_up": gave_up})
        sys.stderr.write("edgepack supervisor: the server exited with %d; %s\n"
                         % (code, "restarted too often, giving up" if gave_up else
                            "restarting in %d s" % RESTART_S))
        sys.stderr.flush()
        if gave_up:
            return
        time.sleep(RESTART_S)
        restarts += 1
    _write_state(state, {"server_pid": None, "restarts": restarts, "last_exit": -signal.SIGTERM})


def _service_state(root):
    try:
        with open(os.path.join(root, "service.state")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _http(addr, method, path, body=None, timeout=10.0):
    import http.client

    if addr.startswith("unix:"):
        class UnixConnection(http.client.HTTPConnection):
            def connect(self):
                import socket

                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(addr[5:])

        conn = UnixConnection("localhost", timeout=timeout)
    else:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        conn = http.client.HTTPConnection("127.0.0.1" if host in ("0.0.0.0", "") else host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("EDGEPACK_API_KEY")
    if key:
        headers["Authorization"] = "Bearer " + key
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    data = r.read().decode("utf-8", "replace")
    conn.close()
    return r.status, data


def service_check(install_dir, addr, wait_s="120"):
    """Wait for GET /health to say ok, then run one short completion through the service."""
    root = install_root(install_dir)
    _check_addr(addr)
    deadline = time.time() + float(wait_s)
    last = None
    supervised = os.path.exists(os.path.join(root, "service.pid"))
    while time.time() < deadline:
        st = _service_state(root) if supervised else {}
        if supervised and (_service_pid(root) is None or st.get("last_exit") is not None):
            return {"ok": False, "error": "the service exited on start (exit %s)" % st.get("last_exit"),
                    "log_tail": _log_tail(root)}
        try:
            status, data = _http(addr, "GET", "/health", timeout=5)
            last = "GET /health: %d %s" % (status, data.strip()[:200])
            if status == 200:
                break
        except OSError as exc:
            last = "GET /health: %s" % exc
        time.sleep(0.5)
    else:
        return {"ok": False, "error": "the service did not become healthy in %s s (%s)" % (wait_s, last),
                "log_tail": _log_tail(root)}
    try:
        status, data = _http(addr, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4}, timeout=120)
    except OSError as exc:
        return {"ok": False, "error": "POST /v1/completions: %s" % exc, "log_tail": _log_tail(root)}
    if status != 200:
        return {"ok": False, "error": "POST /v1/completions: %d %s" % (status, data.strip()[:300]),
                "log_tail": _log_tail(root)}
    reply = json.loads(data)
    return {"ok": True, "health": last, "completion_tokens": reply.get("usage", {}).get("completion_tokens")}


def _log_tail(root):
    try:
        with open(os.path.join(root, "service.log"), "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - 4000, 0))
            return fh.read().decode("utf-8", "replace").splitlines()[-15:]
    except OSError:
        return []


def service_status(install_dir):
    root = install_root(install_dir)
    pid = _service_pid(root)
    addr = None
    try:
        with open(os.path.join(root, "service.pid")) as fh:
            addr = fh.read().split()[1]
    except (OSError, IndexError):
        pass
    st = _service_state(root) if pid else {}
    return {"supervisor": "pidfile", "running": pid is not None and bool(st.get("server_pid")), "pid": pid,
            "server_pid": st.get("server_pid"), "restarts": st.get("restarts", 0), "last_exit": st.get("last_exit"),
            "addr": addr, "unit": unit_name(root), "unit_scope": unit_scope(root)}
