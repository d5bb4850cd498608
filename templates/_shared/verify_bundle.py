"""Check a bundle on the device: manifest, every file's size and sha256, its id and (with trusted keys) its signature.

Standalone: Python 3.8+ and the standard library, plus py-minisign (imported only when a signature must be checked;
install.sh puts it in the bundle's .venv from the vendored wheels). Prints exactly one JSON line:
{"ok", "bundle_id", "problems", "signed", "key_id", "error"}; exit 0 when ok, 1 when not.

    python verify_bundle.py [--bundle DIR] [--trusted-keys DIR] [--require-signature] [--files-only]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from typing import Any

sys.dont_write_bytecode = True  # a bundle holds its listed files only: no __pycache__ from this import
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bundle_format.py ships beside this file
from bundle_format import (  # noqa: E402  (the contract every reader shares: edgepack, the device program, this)
    LOCAL_ONLY,
    MANIFEST,
    NOT_LISTED,
    SCHEMA,
    SIGNATURE,
    id_problem,
    key_number,
    signed_comment,
    unsafe_path,
)

MAX_PROBLEMS = 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def on_disk(root: str) -> set[str]:
    """Every non-directory entry under root (symlinks included, not followed), minus what the device may add."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in dirnames:
            if not rel_dir and d in LOCAL_ONLY:
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                found.add(rel_dir + d)  # a link to a folder is a file as far as the manifest goes
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            rel = rel_dir + f
            if rel not in NOT_LISTED:
                found.add(rel)
    return found


def check_files(root: str, manifest: dict[str, Any], problems: list[str]) -> None:
    files = manifest.get("files")
    if not isinstance(files, list):
        problems.append("manifest has no 'files' list")
        return
    listed = set()
    for entry in files:
        if not isinstance(entry, dict):
            problems.append(f"manifest lists a file entry that is not an object: {entry!r}")
            continue
        rel, size, digest = entry.get("path"), entry.get("bytes"), entry.get("sha256")
        if not isinstance(rel, str) or unsafe_path(rel):
            problems.append(f"manifest lists an unsafe path {rel!r} (absolute, '..' or a backslash)")
            continue
        if rel in listed:
            problems.append(f"manifest lists {rel} twice")
            continue
        listed.add(rel)
        path = os.path.join(root, *rel.split("/"))
        if os.path.islink(path):
            problems.append(f"{rel} is a symlink; a bundle holds plain files only")
        elif not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes; the manifest says {size}")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} does not match its sha256 in the manifest (changed after the build)")
    for rel in sorted(on_disk(root) - listed):
        problems.append(f"{rel} is not listed in the manifest (unexpected file)")


def check_id(manifest: dict[str, Any], problems: list[str]) -> None:
    problem = id_problem(manifest)
    if problem:
        problems.append(problem)


def check_signature(root: str, manifest_bytes: bytes, bundle_id: Any, keys_dir: str, required: bool,
                    problems: list[str]) -> dict[str, Any]:
    sig_path = os.path.join(root, SIGNATURE)
    signed = os.path.isfile(sig_path)
    pub_files = sorted(os.path.join(keys_dir, f) for f in os.listdir(keys_dir)
                       if f.endswith(".pub")) if os.path.isdir(keys_dir) else []
    real_root, real_keys = os.path.realpath(root), os.path.realpath(keys_dir)
    if pub_files and (real_keys == real_root or real_keys.startswith(real_root + os.sep)):
        problems.append(f"the trusted keys folder {keys_dir} is inside the bundle; a bundle cannot vouch for itself")
        return {"signed": False, "key_id": None}
    if not pub_files and not required:
        return {"signed": signed, "key_id": None}
    if not pub_files:
        problems.append(f"a signature is required but there are no trusted keys (*.pub) in {keys_dir}")
        return {"signed": False, "key_id": None}
    if not signed:
        problems.append(f"the bundle is not signed (no {SIGNATURE}) but {len(pub_files)} trusted key(s) are "
                        f"installed in {keys_dir}")
        return {"signed": False, "key_id": None}
    try:
        import minisign  # only needed when a signature is checked
    except ImportError:
        problems.append(f"cannot check the signature: this Python ({sys.executable}) lacks py-minisign; run this "
                        "script with the bundle's .venv/bin/python after install.sh")
        return {"signed": False, "key_id": None}
    keys = {}
    for pub in pub_files:
        try:
            pk = minisign.PublicKey.from_file(pub)
            keys[key_number(base64.b64decode(pk.to_base64())[2:10])] = pk
        except (OSError, ValueError) as exc:
            problems.append(f"trusted key {pub} is not a minisign public key ({exc})")
    try:
        with open(sig_path, "rb") as fh:
            sig_bytes = fh.read()
        sig = minisign.Signature.from_bytes(sig_bytes)
        sig_id = key_number(base64.b64decode(sig_bytes.splitlines()[1])[2:10])
    except (OSError, ValueError, IndexError) as exc:
        problems.append(f"{SIGNATURE} is not a minisign signature ({exc})")
        return {"signed": False, "key_id": None}
    if sig_id not in keys:
        listing = ", ".join(sorted(keys)) or "none readable"
        problems.append(f"the bundle is signed by key {sig_id}, which is not trusted (trusted: {listing})")
        return {"signed": False, "key_id": None}
    try:
        keys[sig_id].verify(manifest_bytes, sig)
    except ValueError:
        problems.append(f"the signature does not match {MANIFEST} (key {sig_id}): the manifest or the signature "
                        "was changed after signing")
        return {"signed": False, "key_id": None}
    expected = signed_comment(str(bundle_id), manifest_bytes)
    if sig.trusted_comment != expected:
        problems.append(f"the signature's trusted comment {sig.trusted_comment!r} does not name this bundle "
                        f"(expected {expected!r})")
        return {"signed": False, "key_id": None}
    return {"signed": True, "key_id": sig_id}


def verify(root: str, keys_dir: str, required: bool, files_only: bool = False) -> dict[str, Any]:
    problems: list[str] = []
    result: dict[str, Any] = {"ok": False, "bundle_id": None, "problems": problems, "signed": False, "key_id": None,
                              "error": None}
    try:
        with open(os.path.join(root, MANIFEST), "rb") as fh:
            manifest_bytes = fh.read()
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"cannot read {MANIFEST} in {root}: {exc}")
        return result
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        problems.append(f"{MANIFEST} has schema {got!r}; this script reads {SCHEMA!r}")
        return result
    bundle_id = manifest.get("bundle_id")
    result["bundle_id"] = bundle_id if isinstance(bundle_id, str) else None
    check_files(root, manifest, problems)
    check_id(manifest, problems)
    if not files_only:
        result.update(check_signature(root, manifest_bytes, bundle_id, keys_dir, required, problems))
    return result


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    # Installed as <install_dir>/releases/<id>/verify_bundle.py; the keys live in <install_dir>/trusted_keys/.
    # Never the bundle's own folder: a key shipped inside a bundle would vouch for that bundle.
    default_keys = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(here))), "trusted_keys")
    ap = argparse.ArgumentParser(description="Verify an edgepack bundle; prints one JSON line.")
    ap.add_argument("--bundle", default=here, help="bundle folder (default: this script's folder)")
    ap.add_argument("--trusted-keys", default=default_keys,
                    help="folder of trusted minisign *.pub keys (default: ../../trusted_keys from this script's "
                         "real folder, i.e. <install_dir>/trusted_keys/ in an installed release)")
    ap.add_argument("--require-signature", action="store_true", help="fail when the bundle is not signed by a "
                                                                      "trusted key")
    ap.add_argument("--files-only", action="store_true", help="check the files and the id, not the signature "
                                                               "(install.sh, before the venv has py-minisign)")
    args = ap.parse_args(argv)
    try:
        result = verify(args.bundle, args.trusted_keys, args.require_signature, args.files_only)
    except Exception as exc:  # one JSON line whatever happens: the caller parses it
        result = {"ok": False, "bundle_id": None, "problems": [f"internal error: {exc!r}"],
                  "signed": False, "key_id": None, "error": None}
    problems = result["problems"]
    result["ok"] = not problems
    result["error"] = problems[0] if problems else None
    if len(problems) > MAX_PROBLEMS:
        result["problems"] = problems[:MAX_PROBLEMS - 1] + [f"... and {len(problems) - MAX_PROBLEMS + 1} more"]
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
