"""The bundle contract every reader shares: file names, the id grammar and how an id is derived from the manifest's
canonical JSON, the safe-path rule, the smoke result and the exit codes of a bundle's scripts, the signer's key id,
and where releases live on a device.

Read by edgepack here (bundle.py), by the device program (packed into it, edgepack/remote/program.py) and by the
bundle's own verify_bundle.py (shipped beside it as bundle_format.py). So it is the standard library only, and
runs on the device's oldest Python (3.7): no f-strings, no newer syntax (tests/unit/test_device_program.py)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

MANIFEST = "edgepack.json"
SIGNATURE = "edgepack.json.minisig"  # detached minisign signature of the manifest's bytes
SCHEMA = "edgepack.bundle/1"
NOT_LISTED = (MANIFEST, SIGNATURE)
# Made on the device inside an installed release (venv, bytecode, runtime caches): never listed in the manifest.
LOCAL_ONLY = (".venv", "__pycache__", ".cache")
INSTALLED = ".venv/.edgepack-installed"  # install.sh's stamp: the release's runtime is whole

# A bundle name becomes a folder, a systemd unit name and a Python string.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}-[0-9a-f]{12}$")
# A release folder on a device: the id, or id.N for a fresh copy of a release whose first copy went bad in use.
FOLDER_RE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,95}-[0-9a-f]{12})(\.[0-9]{1,4})?$")
# A runtime adapter's name: adapters/NAME.onnx_adapter and the server's model id.
ADAPTER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")

DEFAULT_INSTALL_DIR = "~/edgepack"


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The manifest without its id, as the id is computed."""
    return json.dumps({k: v for k, v in doc.items() if k != "bundle_id"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def derive_id(doc: Mapping[str, Any]) -> str:
    """`<name>-<12 hex>` of the whole manifest: any change to any field or file gives another id."""
    return "%s-%s" % (doc.get("name", ""), hashlib.sha256(canonical(doc)).hexdigest()[:12])


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value)) and ".." not in value


def id_problem(doc: Mapping[str, Any]) -> str | None:
    """None when the manifest's id is well formed and the one its content gives; else why not."""
    bundle_id = doc.get("bundle_id")
    if not valid_id(bundle_id):
        return "bundle_id %r is not a valid bundle id" % (bundle_id,)
    expected = derive_id(doc)
    if bundle_id != expected:
        return ("bundle_id %s does not match the manifest's content (%s): the manifest was edited after the build"
                % (bundle_id, expected))
    return None


def unsafe_path(rel: Any) -> bool:
    """A manifest path that is not a plain relative POSIX path inside the bundle (absolute, '..', '.', empty parts,
    a backslash): refused by every reader."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return True
    parts = rel.split("/")
    return ".." in parts or "" in parts or "." in parts


def key_number(raw: bytes) -> str:
    """A minisign key id as minisign prints it (the 8-byte key number, little-endian, hex, no leading zeros)."""
    return format(int.from_bytes(raw, "little"), "X")


def signed_comment(bundle_id: str, manifest_bytes: bytes) -> str:
    """The trusted comment of a bundle's signature: binds the signature to this id and these manifest bytes."""
    return "edgepack bundle %s sha256:%s" % (bundle_id, hashlib.sha256(manifest_bytes).hexdigest())


# -- what the bundle's scripts answer ------------------------------------------------------------------------

SMOKE_SCHEMA = 1
# smoke_test.py: 0 ok, 1 loads but misbehaves, 2 does not load (or no readable smoke section).
SMOKE_EXIT = {0: "passed", 1: "the model loads but misbehaves", 2: "the model does not load"}
# install.sh: what each exit means, and the error code a deploy reports for it.
INSTALL_EXIT = {3: "no usable Python or venv on the device",
                4: "the wheels do not fit this device's Python, or one does not match its pinned sha256",
                5: "the runtime does not import on this device",
                6: "the release does not match its manifest",
                7: "the signature check failed",
                8: "check-only: the live copy's runtime is not whole (it is never repaired in place)"}


def install_failure(exit_code: int | None) -> tuple[str, str]:
    """(error code, sentence) for install.sh's exit code (None: it was stopped)."""
    why = INSTALL_EXIT.get(exit_code) if exit_code is not None else "it was stopped (timed out or interrupted)"
    sentence = "install.sh failed (exit %s%s)" % (exit_code, ": " + why if why else "")
    return ("signature_invalid" if exit_code == 7 else "install_failed"), sentence


def smoke_result(stdout: str, exit_code: int) -> dict[str, Any]:
    """The smoke result by its contract (docs/bundle-format.md): the last JSON line with a boolean "ok" (runtimes
    may print their own lines first); ok only when it says so and the process exited 0. Always has "ok",
    "exit_code", and "error" when not ok."""
    doc: dict[str, Any] | None = None
    for line in reversed(stdout.strip().splitlines()):
        try:
            got = json.loads(line)
        except ValueError:
            continue
        if isinstance(got, dict) and isinstance(got.get("ok"), bool):
            doc = got
            break
    why = SMOKE_EXIT.get(exit_code, "it was stopped or crashed")
    if doc is None:
        doc = {"schema": SMOKE_SCHEMA, "ok": False,
               "error": "smoke_test.py printed no result (exit %s: %s)" % (exit_code, why)}
    ok = doc["ok"] is True and exit_code == 0
    doc = dict(doc, ok=ok, exit_code=exit_code)
    if not ok and not doc.get("error"):
        doc["error"] = "smoke_test.py exited %s (%s)" % (exit_code, why)
    return doc


def live_sentence(previous: str | None, switched_to: str | None, where: str = "") -> str:
    """What is live after a deploy step failed or was interrupted: every deploy error ends with it (the device
    program's and edgepack's). `where` names the device (" on HOST") when the reader is not on it."""
    if switched_to:
        return ("The switch was done: `current`%s points at releases/%s (it passed its smoke test); a rollback "
                "(`edgepack rollback`) returns to %s." % (where, switched_to,
                                                         previous or "nothing (it was the first release)"))
    return "`current`%s was not changed: it still points at %s." % (
        where, "releases/" + previous if previous else "nothing (no release was live)")


def install_dir(*choices: str | None) -> str:
    """Where releases live: the first choice given (a host's own setting, the command line, the target's
    deploy.install_dir), else ~/edgepack. Every command that reaches a device resolves it this one way."""
    return next((c for c in choices if c), DEFAULT_INSTALL_DIR)
