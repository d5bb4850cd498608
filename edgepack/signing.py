"""Bundle signatures: minisign keys, a detached signature of edgepack.json, and its verification."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST, Manifest
from edgepack.bundle_format import key_number, signed_comment
from edgepack.errors import OutputExistsError, UserError, require
from edgepack.progress import ProgressEvent, ProgressFn, silent

SIGNATURE = "edgepack.json.minisig"  # detached, next to edgepack.json; the same format `minisign -S` writes
PASSWORD_ENV = "EDGEPACK_KEY_PASSWORD"
SIGN_HINT = "Sign it with `edgepack sign BUNDLE --key KEY` (or build with `edgepack build ... --sign KEY`)."


class SignatureError(UserError):
    kind = "signature"
    code = "signature_invalid"


@dataclass(frozen=True)
class SignatureInfo:
    key_id: str  # upper-case hex, as `minisign` prints it
    trusted_comment: str
    signature_file: str


def _minisign() -> Any:
    return require("minisign", "core", "Signing and verifying bundles")


def key_id(pubkey: Any) -> str:
    """The key id of a py-minisign PublicKey, as `minisign` prints it (e.g. in `minisign -G` and key comments)."""
    return key_number(base64.b64decode(pubkey.to_base64())[2:10])


def _signature_key_id(sig: Any) -> str:
    return key_number(base64.b64decode(bytes(sig).splitlines()[1])[2:10])


def signature_key_id(path: Path) -> str:
    """The key id a signature file names (without checking it): what `inspect` shows."""
    try:
        return key_number(base64.b64decode(path.read_bytes().splitlines()[1])[2:10])
    except (OSError, IndexError, ValueError):
        return "(unreadable signature file)"


def trusted_comment(bundle_id: str, manifest_bytes: bytes) -> str:
    """What a bundle's signature vouches for (its trusted comment): this id and these manifest bytes."""
    return signed_comment(bundle_id, manifest_bytes)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed it; a public key should stay readable
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keygen(out: Path, *, password: str | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write a new minisign secret key to `out` (0600) and its public key to `out.pub`; return both paths.

    Without a password the secret key is unencrypted, like `minisign -G -W`.
    """
    ms = _minisign()
    pub = Path(str(out) + ".pub")
    for p in (out, pub):
        if p.exists() and not force:
            raise OutputExistsError(f"key file {p} already exists.",
                                    hint="Pass --force to replace the key pair (bundles signed with the old key "
                                         "will no longer verify against the new one), or choose another path.",
                                    path=p)
    if password == "":
        raise UserError("an empty key password is not allowed.",
                        hint=f"Set {PASSWORD_ENV} to a non-empty password, or unset it for an unencrypted key.")
    out.parent.mkdir(parents=True, exist_ok=True)
    pair = ms.KeyPair.generate()
    with pair.secret_key as sk:
        if password is not None:
            sk.encrypt(password)
        _write_atomic(out, bytes(sk) + b"\n", 0o600)
    kid = key_id(pair.public_key)
    pair.public_key.untrusted_comment = f"minisign public key {kid}"
    _write_atomic(pub, bytes(pair.public_key) + b"\n", 0o644)
    return out, pub


def _read_manifest_bytes(bundle: Path) -> tuple[bytes, str]:
    path = bundle / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise SignatureError(f"{bundle} is not an edgepack bundle (no {MANIFEST}).",
                             hint="Pass a folder made by `edgepack build`.", path=bundle) from exc
    try:
        bundle_id = json.loads(data)["bundle_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path} is not a bundle manifest with a bundle_id ({exc}).",
                             hint="Rebuild the bundle with `edgepack build`.", path=path) from exc
    if not isinstance(bundle_id, str):
        raise SignatureError(f"{path} has a bundle_id that is not a string.",
                             hint="Rebuild the bundle with `edgepack build`.", path=path)
    return data, bundle_id


def _key_bytes(path: Path) -> bytes:
    """A key file's two lines, whatever surrounds them: CI secret stores add or strip newlines and CRs."""
    lines = [ln.strip() for ln in path.read_bytes().splitlines() if ln.strip()]
    return b"\n".join(lines) + b"\n"


def _load_secret_key(key: Path, password: str | None) -> Any:
    ms = _minisign()
    try:
        sk = ms.SecretKey.from_bytes(_key_bytes(key))
    except OSError as exc:
        raise SignatureError(f"cannot read secret key {key}: {exc.strerror}.",
                             hint="Make one with `edgepack keygen KEY`.", path=key) from exc
    except ms.Error as exc:
        raise SignatureError(f"{key} is not a minisign secret key ({exc}).",
                             hint="Pass the secret key file made by `edgepack keygen` or `minisign -G`, not the .pub.",
                             path=key) from exc
    if sk.is_encrypted():
        if password is None:
            sk.wipe()
            raise SignatureError(f"secret key {key} is password-protected and no password was given.",
                                 hint=f"Set {PASSWORD_ENV} to the key's password.", path=key)
        try:
            sk.decrypt(password)
        except ms.Error as exc:
            sk.wipe()
            raise SignatureError(f"wrong password for secret key {key}.",
                                 hint=f"Set {PASSWORD_ENV} to the password the key was made with.",
                                 path=key) from exc
    return sk


def check_key(key: Path, *, password: str | None = None) -> None:
    """Fail now (missing file, not a key, password missing or wrong) rather than after a long build."""
    import os

    _load_secret_key(key, password if password is not None else os.environ.get(PASSWORD_ENV)).wipe()


def sign(bundle: Path, key: Path, *, password: str | None = None) -> SignatureInfo:
    """Sign the exact bytes of `bundle/edgepack.json` with a minisign secret key; write `bundle/SIGNATURE`."""
    data, bundle_id = _read_manifest_bytes(bundle)
    comment = trusted_comment(bundle_id, data)
    ms = _minisign()
    with _load_secret_key(key, password) as sk:
        try:
            sig = sk.sign(data, trusted_comment=comment)
        except ms.Error as exc:
            raise SignatureError(f"bundle id {bundle_id!r} cannot go into a signature comment ({exc}).",
                                 hint="Rebuild the bundle with `edgepack build`.", path=bundle) from exc
        pk = sk.get_public_key()
    try:
        pk.verify(data, sig)
    except ms.Error as exc:
        # The key file's public half does not belong to its secret half: a corrupt or hand-edited key.
        raise SignatureError(f"secret key {key} is corrupt: its signature does not verify with its own public key.",
                             hint="Make a new key pair with `edgepack keygen`.", path=key) from exc
    out = bundle / SIGNATURE
    _write_atomic(out, bytes(sig) + b"\n", 0o644)
    return SignatureInfo(key_id=key_id(pk), trusted_comment=comment, signature_file=str(out))


def load_public_keys(specs: Sequence[str | Path]) -> list[Any]:
    """Each spec is a minisign .pub file or a bare base64 public key (as `minisign -P` takes, "RW...")."""
    ms = _minisign()
    keys = []
    for spec in specs:
        text = str(spec)
        try:
            if isinstance(spec, str) and text.startswith("RW") and not Path(text).exists():
                keys.append(ms.PublicKey.from_base64(text.strip()))
            else:
                keys.append(ms.PublicKey.from_bytes(_key_bytes(Path(text))))
        except OSError as exc:
            raise SignatureError(f"trusted key {text!r} is neither a readable .pub file nor a base64 public key "
                                 f"({exc.strerror}).",
                                 hint="Pass the .pub file made by `edgepack keygen`, or the 'RW...' line in it.",
                                 spec=text) from exc
        except (ms.Error, binascii.Error) as exc:
            raise SignatureError(f"trusted key {text!r} is not a minisign public key ({exc}).",
                                 hint="Pass the .pub file made by `edgepack keygen`, or the 'RW...' line in it.",
                                 spec=text) from exc
    return keys


def verify(bundle: Path, trusted: Sequence[str | Path]) -> SignatureInfo:
    """Check `bundle`'s signature against the trusted public keys: signed by one of them, over these exact bytes."""
    data, _ = _read_manifest_bytes(bundle)
    return verify_bytes(bundle, data, trusted)


def verify_bytes(bundle: Path, data: bytes, trusted: Sequence[str | Path]) -> SignatureInfo:
    """`verify` of manifest bytes already read (the bytes a deploy then sends, so what is checked is what is sent)."""
    ms = _minisign()
    try:
        bundle_id = json.loads(data)["bundle_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{bundle / MANIFEST} is not a bundle manifest with a bundle_id ({exc}).",
                             hint="Rebuild the bundle with `edgepack build`.", path=bundle) from exc
    sig_path = bundle / SIGNATURE
    if not sig_path.is_file():
        raise SignatureError(f"bundle {bundle} is not signed (no {SIGNATURE}).", hint=SIGN_HINT, path=bundle)
    keys = load_public_keys(trusted)
    if not keys:
        raise SignatureError("no trusted public keys to check the signature against.",
                             hint="Pass the signer's .pub file (--require-signature PUBKEY, or [deploy] trusted_keys).",
                             path=bundle)
    try:
        sig = ms.Signature.from_file(sig_path)
    except ms.Error as exc:
        raise SignatureError(f"{sig_path} is not a minisign signature ({exc}).", hint=SIGN_HINT, path=sig_path) from exc
    sig_id = _signature_key_id(sig)
    trusted_ids = [key_id(k) for k in keys]
    matching = [k for k, kid in zip(keys, trusted_ids, strict=True) if kid == sig_id]
    if not matching:
        raise SignatureError(f"bundle {bundle} is signed by key {sig_id}, which is not trusted "
                             f"(trusted: {', '.join(trusted_ids)}).",
                             hint="Pass the signer's public key, or re-sign the bundle with a trusted key.",
                             path=bundle, key_id=sig_id, trusted_key_ids=trusted_ids)
    try:
        matching[0].verify(data, sig)
    except ms.Error as exc:
        raise SignatureError(f"the signature {sig_path} does not match {MANIFEST} (key {sig_id}): the manifest or "
                             "the signature was changed after signing.",
                             hint="Rebuild and re-sign the bundle; do not edit a signed bundle.",
                             path=bundle, key_id=sig_id) from exc
    expected = trusted_comment(bundle_id, data)
    if sig.trusted_comment != expected:
        raise SignatureError(f"the signature {sig_path} is valid but its trusted comment does not name this bundle: "
                             f"it says {sig.trusted_comment!r}, expected {expected!r}.",
                             hint=SIGN_HINT, path=bundle, key_id=sig_id)
    return SignatureInfo(key_id=sig_id, trusted_comment=sig.trusted_comment, signature_file=str(sig_path))


@dataclass(frozen=True)
class DeployPolicy:
    """What a deploy requires, decided on the deploying machine, and what was checked against it."""

    keys: tuple[tuple[str, str], ...]  # (key id, base64) the device is told to trust and to require
    signature: str  # "verified (key …)" or "not required (…)": what the result says
    source: str  # where the policy came from: flags, the named target file, the bundle's target on this machine


def deploy_policy(bundle: Path, manifest_bytes: bytes, manifest: Manifest, required: Sequence[str],
                  target: str | None = None, progress: ProgressFn = silent) -> DeployPolicy:
    """The keys a deploy requires, from the deploying side only: --require-signature (or $EDGEPACK_REQUIRE_SIGNATURE),
    and the `[deploy] trusted_keys` of this machine's target file: the one --target names (the bundle must have been
    built for it), else the file this machine has for the bundle's target id (a shipped target, or one in
    $EDGEPACK_TARGET_PATH). Never the bundle's own copy of its target: whoever can rewrite a bundle can rewrite that.
    A policy that cannot be resolved is an error, never "not required". Verifies `manifest_bytes` (the bytes that
    will be sent) before anything connects."""
    from edgepack.targets import TARGET_PATH_ENV, TargetProfile, find_target, load_target

    specs: list[str] = list(required)
    sources = ["--require-signature"] if specs else []
    local: TargetProfile | None = None
    if target is not None:
        local = load_target(target)
        if manifest.target_id != local.id:
            raise UserError(f"bundle {bundle.name} was built for target {manifest.target_id!r}, not {local.id!r} "
                            f"(--target {target}).",
                            hint="Deploy a bundle built for that target, or name the target it was built for.",
                            code="target_mismatch", path=bundle, target=local.id, bundle_target=manifest.target_id)
        sources.append(f"target file {local.source}")
    else:
        found = find_target(manifest.target_id) if manifest.target_id else None
        if found is None and not specs:
            raise UserError(f"cannot tell whether bundle {bundle.name} must be signed: it was built for target "
                            f"{manifest.target_id!r}, and this machine has no target file of that id (not shipped, "
                            f"not in ${TARGET_PATH_ENV}).",
                            hint=f"Pass --target PATH/TO/{manifest.target_id or 'TARGET'}.toml (its [deploy] "
                                 f"trusted_keys apply), put its folder in ${TARGET_PATH_ENV}, or pass "
                                 "--require-signature PUBKEY.",
                            code="signature_policy_unresolved", path=bundle, target=manifest.target_id)
        local = load_target(str(found)) if found is not None else None
        if local is not None:
            sources.append(f"target file {local.source}")
    if local is not None:
        base = Path(local.source).parent
        specs += [str(base / Path(k).expanduser()) if (base / Path(k).expanduser()).is_file() else k
                  for k in local.deploy.trusted_keys]
    source = " + ".join(sources)
    if not specs:
        return DeployPolicy((), f"not required ({source} lists no trusted_keys)", source)
    keys = load_public_keys(specs)
    info = verify_bytes(bundle, manifest_bytes, specs)  # unsigned, wrong key or altered: an error before connecting
    progress(ProgressEvent("bundle", f"signature verified: key {info.key_id} ({source})"))
    return DeployPolicy(tuple(sorted({(key_id(k), k.to_base64().decode()) for k in keys})),
                        f"verified (key {info.key_id})", source)

