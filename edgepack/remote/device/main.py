"""The device program's entry. Two ways to run a command:

- one command per process: `python3 - COMMAND INSTALL_DIR ARGS...` prints exactly one JSON document (apply prints
  its progress lines first); the Ansible role's way;
- a session: `session INSTALL_DIR OP HOLDER TTL` takes the install dir's lock for operation OP and answers
  requests, one per stdin line: a JSON list, the same argv as above, answered by one JSON line (after any progress
  lines). Empty lines are heartbeats; "release", EOF or TTL seconds of silence end it, and the lock with it.
  `edgepack deploy --host` runs one session per deploy, so the program is sent once."""

import json
import sys
import traceback

from .apply import Busy, apply, locked_answer, rollback_now, stage, unpack
from .facts import facts
from .files import hashes, mkdirs, remove_extra, reuse, verify
from .lock import lock
from .releases import locate, prune, publish, rollback, status, switch
from .rules import Refused
from .service import install_unit, service_check, service_start, service_status, service_stop
from .signature import add_signature, admit, trust

COMMANDS = {"facts": facts, "hashes": hashes, "admit": admit, "add_signature": add_signature, "mkdirs": mkdirs,
            "reuse": reuse, "verify": verify, "remove_extra": remove_extra, "locate": locate, "publish": publish,
            "switch": switch, "status": status, "rollback": rollback, "prune": prune, "install_unit": install_unit,
            "trust": trust, "service_start": service_start, "service_stop": service_stop,
            "service_check": service_check, "service_status": service_status, "stage": stage, "unpack": unpack,
            "apply": apply, "rollback_now": rollback_now}
FAILS = ("stage", "apply", "rollback_now")  # a failed answer exits 1 (Ansible's task fails; the JSON says why)


def answer(cmd, args):
    """One command's JSON answer and the exit code a process running only it has."""
    if cmd not in COMMANDS:
        return {"ok": False, "refused": True, "error": "unknown command %r" % (cmd,)}, 3
    try:
        result = COMMANDS[cmd](*args)
    except Refused as exc:
        return {"ok": False, "refused": True, "error": str(exc)}, 3
    except Busy as exc:
        return locked_answer(exc.root, exc.holder), 1
    except TypeError as exc:  # wrong arguments: a controller of another version
        return {"ok": False, "refused": True, "error": "%s: %s" % (cmd, exc)}, 3
    return result, 1 if cmd in FAILS and not result.get("ok") else 0


def serve(line):
    """A session's request: one JSON argv in, one JSON line out."""
    try:
        argv = json.loads(line)
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("not a list of strings")
    except ValueError as exc:
        print(json.dumps({"ok": False, "refused": True, "error": "bad request: %s" % exc}), flush=True)
        return
    try:
        result, _ = answer(argv[0], argv[1:])
    except Exception as exc:  # a bug: the answer says so, the session (and the lock) go on
        result = {"ok": False, "error": "the device program failed: %s: %s" % (type(exc).__name__, exc),
                  "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(result), flush=True)


def session(install_dir, op, holder, ttl="60"):
    return lock(install_dir, op, holder, ttl, serve=serve)


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd in ("session", "lock"):  # `lock` is a session that is sent no requests
        session(*args)
        return
    result, code = answer(cmd, args)
    if result is not None:
        print(json.dumps(result))
    if code:
        sys.exit(code)
