"""Signatures, checked on the device by code that was there before the release arrived: minisign keys and
signatures, Ed25519 in plain Python integers, the device's trusted keys, and the admission of a release folder."""

import hashlib
import os
import re

from edgepack.bundle_format import MANIFEST, SIGNATURE, key_number, signed_comment

from .files import verify_dir
from .lock import require_lock
from .rules import Refused, check_folder, inside, install_root, staging_id

# minisign's format (https://jedisct1.github.io/minisign/): a public key is base64("Ed" || key number[8] || key[32]);
# a signature file is an untrusted comment, base64(algorithm[2] || key number[8] || signature[64]), a trusted
# comment and base64(global signature[64]). "Ed" signs the message, "ED" its BLAKE2b-512; the global signature signs
# the signature followed by the trusted comment. Ed25519 (RFC 8032) is verified below in plain Python integers: no
# wheel, no library of the release's, is imported to decide whether the release may run.

TRUSTED_KEYS = "trusted_keys"
_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _ed_add(a, b):
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = 2 * _D * t1 * t2 % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _ed_mul(k, point):
    out = (0, 1, 1, 0)
    while k:
        if k & 1:
            out = _ed_add(out, point)
        point = _ed_add(point, point)
        k >>= 1
    return out


def _ed_decode(raw):
    """A point from its 32-byte encoding, or None when the bytes encode none."""
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    xx = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - xx) % _P or (x == 0 and sign):
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _ed_same(a, b):
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


_ED_BASE = _ed_decode(bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666"))


def ed25519_verify(public_key, message, signature):
    """RFC 8032 Ed25519 verification: [s]B == R + [SHA-512(R || A || M)]A, with s < L."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a, r = _ed_decode(public_key), _ed_decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    return _ed_same(_ed_mul(s, _ED_BASE), _ed_add(r, _ed_mul(h, a)))


def minisign_public_key(text):
    """(key id, 32-byte key) from a .pub file's text or its bare base64 line; Refused when it is not one."""
    import base64
    import binascii

    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    try:
        raw = base64.b64decode(line, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 42 or raw[:2] != b"Ed":
        raise Refused("%r is not a minisign public key (base64 \"RW...\", 56 characters)" % (line[:60],))
    return key_number(raw[2:10]), raw[10:]


def trusted_keys(root):
    """{key id: key} of the install dir's trusted_keys/*.pub (edgepack trust, or put there by the device's owner)."""
    folder = os.path.join(root, TRUSTED_KEYS)
    keys = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".pub"):
            with open(os.path.join(folder, name)) as fh:
                kid, key = minisign_public_key(fh.read())
            keys[kid] = key
    return keys


def signature_check(directory, keys, bundle_id, sig_path=None):
    """Whether directory's edgepack.json is signed by one of `keys` over its exact bytes, naming `bundle_id`:
    {"signed": bool, "key_id": str|None, "error": str|None}. Sizes are bounded before anything is read whole.
    `sig_path`: another signature file to check (default: the folder's own)."""
    import base64
    import binascii

    manifest_path = os.path.join(directory, MANIFEST)
    sig_path = sig_path or os.path.join(directory, SIGNATURE)
    if os.path.islink(sig_path) or not os.path.isfile(sig_path):
        return {"signed": False, "key_id": None, "error": "the release is not signed (no %s)" % SIGNATURE}
    if os.path.getsize(sig_path) > 4096 or os.path.islink(manifest_path):
        return {"signed": False, "key_id": None, "error": "%s is not a minisign signature" % SIGNATURE}
    with open(sig_path, "rb") as fh:
        lines = fh.read().splitlines()
    with open(manifest_path, "rb") as fh:
        data = fh.read()
    try:
        sig = base64.b64decode(lines[1].strip(), validate=True)
        comment_line = lines[2].decode("utf-8")
        global_sig = base64.b64decode(lines[3].strip(), validate=True)
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        sig, comment_line, global_sig = b"", "", b""
    prefix = "trusted comment: "
    if len(sig) != 74 or sig[:2] not in (b"Ed", b"ED") or not comment_line.startswith(prefix) or len(global_sig) != 64:
        return {"signed": False, "key_id": None, "error": "%s is not a minisign signature" % SIGNATURE}
    kid = key_number(sig[2:10])
    if kid not in keys:
        return {"signed": False, "key_id": kid, "error": "the release is signed by key %s, which this device does not "
                "trust (trusted: %s)" % (kid, ", ".join(sorted(keys)) or "none")}
    signed = hashlib.blake2b(data).digest() if sig[:2] == b"ED" else data
    comment = comment_line[len(prefix):]
    if not (ed25519_verify(keys[kid], signed, sig[10:])
            and ed25519_verify(keys[kid], sig[10:] + comment.encode("utf-8"), global_sig)):
        return {"signed": False, "key_id": kid, "error": "the signature does not match %s (key %s): the manifest or "
                "the signature was changed after signing" % (MANIFEST, kid)}
    expected = signed_comment(bundle_id, data)
    if comment != expected:
        return {"signed": False, "key_id": kid, "error": "the signature is valid but names another bundle (%r, "
                "expected %r)" % (comment[:200], expected)}
    return {"signed": True, "key_id": kid, "error": None}


def check_release(root, directory, require=False):
    """May this release folder be installed and run here? Every file against its manifest (nothing unlisted), the
    id its content gives, and, when the device trusts keys (or the deploying side requires it), a signature by one
    of them. Checked by this program before install.sh, before any wheel, and again at every switch."""
    check = verify_dir(directory)
    keys = trusted_keys(root)
    out = dict(check, signed=False, key_id=None, signature_required=bool(keys) or bool(require))
    if not check["ok"]:
        return out
    if out["signature_required"]:
        if not keys:
            return dict(out, ok=False, code="signature_invalid", error="a signature is required but this device "
                        "trusts no key (%s/ is empty): pass the signer's key with --require-signature" % TRUSTED_KEYS)
        sig = signature_check(directory, keys, check["bundle_id"])
        out.update(signed=sig["signed"], key_id=sig["key_id"])
        if not sig["signed"]:
            return dict(out, ok=False, code="signature_invalid", error=sig["error"])
    elif os.path.isfile(os.path.join(directory, SIGNATURE)):
        out["signature"] = "present, not checked (this device trusts no key)"
    return out


def add_signature(install_dir, op, folder, sig_b64):
    """Give a release already on the device the signature its bundle now carries (signing does not change the id, so
    a redeploy of a bundle signed since reuses the release). Written only when it verifies against a key the device
    trusts: the files are untouched, and a signature is not one of them."""
    import base64
    import binascii

    root = install_root(install_dir)
    require_lock(root, op)
    directory = inside(root, "releases", check_folder(folder))
    try:
        data = base64.b64decode(sig_b64, validate=True)
    except (ValueError, binascii.Error):
        data = b""
    keys = trusted_keys(root)
    if not data or len(data) > 4096 or not keys:
        return {"ok": False, "written": False,
                "error": "no signature" if not data or len(data) > 4096 else "this device trusts no key to check it"}
    tmp = os.path.join(directory, "." + SIGNATURE + "." + op + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    check = signature_check(directory, keys, verify_dir(directory)["bundle_id"], sig_path=tmp)
    if not check["signed"]:
        os.remove(tmp)
        return {"ok": False, "written": False, "error": check["error"]}
    os.replace(tmp, os.path.join(directory, SIGNATURE))
    return {"ok": True, "written": True, "key_id": check["key_id"]}


def admit(install_dir, rel, require="no"):
    """check_release for releases/<folder> (what `edgepack deploy` asks before it runs install.sh)."""
    root = install_root(install_dir)
    rel = str(rel)
    if rel.startswith("releases/"):
        check_folder(rel[len("releases/"):])
    else:
        staging_id(rel)  # Refused unless it is a staging folder
    return check_release(root, inside(root, rel), require == "yes")




def trust(install_dir, op, name, key_b64):
    """Add a public key the device's install step checks signatures against (never removes one)."""
    root = install_root(install_dir)
    require_lock(root, op)
    if not re.match(r"^[A-Za-z0-9]{1,40}$", name) or not re.match(r"^[A-Za-z0-9+/=]{40,80}$", key_b64):
        raise Refused("bad trusted key %r" % (name,))
    kid, _ = minisign_public_key(key_b64)
    if kid != name:
        raise Refused("trusted key %r is key %s" % (name, kid))
    d = os.path.join(root, TRUSTED_KEYS)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name + ".pub")
    text = "untrusted comment: edgepack trusted key %s\n%s\n" % (name, key_b64)
    old = None
    if os.path.exists(path):
        with open(path) as fh:
            old = fh.read()
    if old != text:
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
    return {"ok": True, "trusted_keys": sorted(os.listdir(d))}
