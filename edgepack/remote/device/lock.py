"""The install dir's lock: one operation at a time. An flock held by one process while it lives; every process
the operation starts is recorded, and the next holder ends what a holder that died had left running."""

import errno
import fcntl
import json
import os
import select
import signal
import time

from .rules import OP_RE, Refused, check_op, install_root


def lock_path(root):
    return os.path.join(root, ".lock")


def _pids_path(root, op):
    return os.path.join(root, ".ops", op + ".pids")


def _held_by(root, op):
    """True when operation `op` holds the install dir's lock right now."""
    path = lock_path(root)
    if not os.path.exists(path):
        return False
    with open(path, "r+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                return json.loads(fh.read() or "{}").get("op") == op
            except ValueError:
                return False
        fcntl.flock(fh, fcntl.LOCK_UN)  # nobody held it
        return False


def require_lock(root, op):
    if not _held_by(root, check_op(op)):
        raise Refused("operation %s does not hold the lock of %s" % (op, root))


OP_ENV = "EDGEPACK_OP"  # every process an operation starts carries it: how a leftover is told from a stranger


def proc_start(pid):
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None when there is none."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _proc_marked(pid, op):
    """True when the process was started by operation `op` (its environment carries EDGEPACK_OP=op)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as fh:
            return ("%s=%s" % (OP_ENV, op)).encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _group_members(pgid):
    out = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _ours(op, pgid, start):
    """The pids of group `pgid` that operation `op` started and that still run: all of the group while its leader is
    the process recorded (same pid, same start time); else only members that carry the operation's mark. A pid a
    stranger now has is never signalled."""
    leader = proc_start(pgid)
    if leader is not None and start is not None and leader == start:
        return [pgid] + [p for p in _group_members(pgid) if p != pgid]
    return [p for p in _group_members(pgid) if p != pgid and _proc_marked(p, op)]


def record_pid(root, op, pid):
    with open(_pids_path(root, op), "a") as fh:
        fh.write("%d %s\n" % (pid, proc_start(pid) or "?"))


def _kill_groups(root, op):
    """End every process an operation started (install.sh, the smoke test, a command over SSH) that still runs: only
    processes whose identity matches the record (see _ours), so a pid reused since is left alone."""
    path = _pids_path(root, op)
    try:
        with open(path) as fh:
            records = [line.split() for line in fh if line.split() and line.split()[0].isdigit()]
    except OSError:
        return []
    killed = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = sorted({p for rec in records for p in _ours(op, int(rec[0]), rec[1] if len(rec) > 1 else None)})
        for pid in targets:
            try:
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    killed.append(pid)
            except OSError:
                pass
        if sig == signal.SIGTERM and killed:
            deadline = time.time() + 5
            while time.time() < deadline and any(proc_start(p) is not None for p in killed):
                time.sleep(0.1)
    if os.path.exists(path):
        os.remove(path)
    return killed


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def acquire(root, op, holder_json):
    """Take the install dir's flock for operation `op`, without waiting. Returns (the open lock file, None), after
    ending what a holder that died had left running; or (None, the holder's info) when another operation holds it."""
    check_op(op)
    os.makedirs(os.path.join(root, ".ops"), exist_ok=True)
    fh = open(lock_path(root), "a+")  # noqa: SIM115 (held open while the operation lives: that is the lock)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        fh.seek(0)
        try:
            current = json.loads(fh.read() or "{}")
        except ValueError:
            current = {}
        fh.close()
        return None, current
    fh.seek(0)
    stale = fh.read()
    fh.seek(0)
    fh.truncate()
    info = json.loads(holder_json)
    info.update(op=op, device_pid=os.getpid(), since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    fh.write(json.dumps(info))
    fh.flush()
    previous = None
    if stale.strip():
        try:
            previous = json.loads(stale)
        except ValueError:
            previous = None
        if previous and previous.get("op"):  # a holder that died without releasing: end what it started
            _kill_groups(root, check_op(previous["op"]) if OP_RE.match(str(previous["op"])) else op)
    return fh, previous


def release_lock(root, op, fh):
    """End the operation's remaining process groups, then unlock."""
    _kill_groups(root, op)
    fh.seek(0)
    fh.truncate()
    fh.flush()
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


class _Link(object):
    """The session's stdin, read unbuffered (select + os.read), so that what select says and what has been read
    agree: a request is answered as soon as its line arrives, and a closed link is seen while a step runs."""

    def __init__(self):
        self.buf, self.eof = b"", False

    def _fill(self, timeout):
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            return False
        data = os.read(0, 65536)
        if data:
            self.buf += data
        else:
            self.eof = True
        return True

    def readline(self, timeout):
        """The next line (without its newline), "" at EOF, None after `timeout` seconds of silence."""
        while b"\n" not in self.buf:
            if self.eof:
                return ""
            if not self._fill(timeout):
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("utf-8", "replace").strip() or "\n"  # "\n": a heartbeat

    def lost(self):
        """True once the controller has gone (EOF) or asked to stop ("release"), without waiting."""
        while not self.eof and self._fill(0):
            pass
        return self.eof or b"release" in self.buf.split(b"\n")


LINK = []  # the session's link while one runs: steps that take long watch it (see `link_lost`)


def link_lost():
    """In a session, True when the controller is gone (Ctrl-C, a dropped connection): a running step is ended
    and nothing more is changed. Outside a session (one command per process, stdin read whole) always False."""
    return bool(LINK) and LINK[0].lost()


def lock(install_dir, op, holder, ttl="60", serve=None):
    """Hold the install dir's lock while this process lives: an empty stdin line is a heartbeat; "release", EOF or
    `ttl` seconds of silence end it; any other line is a request, handed to `serve` (a session: see main.py). The
    lock is an flock, so the kernel drops it if this process dies; on the way out, the operation's remaining
    process groups are ended, so nothing it started outlives it."""
    root = install_root(install_dir)
    fh, other = acquire(root, op, holder)
    if fh is None:
        print(json.dumps({"ok": False, "error": "locked", "holder": other}))
        return None
    print(json.dumps({"ok": True, "op": op, "stale": other}), flush=True)
    link = _Link()
    LINK.append(link)
    try:
        while True:
            line = link.readline(float(ttl))
            if not line or line == "release":
                break
            if line != "\n" and serve is not None:
                serve(line)
    finally:
        LINK.remove(link)
        release_lock(root, op, fh)
    return None
