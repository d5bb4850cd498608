from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgepack.errors import OutputExistsError, UserError
from edgepack.signing import SIGNATURE, SignatureError, keygen, load_public_keys, sign, verify

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "templates" / "_shared" / "verify_bundle.py"
MINISIGN = shutil.which("minisign") or "minisign"
needs_minisign = pytest.mark.skipif(shutil.which("minisign") is None, reason="the minisign tool is not installed")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def derive_id(doc: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in doc.items() if k != "bundle_id"}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True).encode()
    return f"{doc['name']}-{sha256(canonical)[:12]}"


def write_manifest(b: Path, name: str = "tiny-host", **extra: Any) -> dict[str, Any]:
    files = []
    for p in sorted(b.rglob("*")):
        rel = p.relative_to(b).as_posix()
        if p.is_dir() or rel in ("edgepack.json", SIGNATURE) or rel.split("/")[0] in (".venv", "__pycache__", ".cache"):
            continue
        files.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256(p.read_bytes())})
    doc: dict[str, Any] = {"schema": "edgepack.bundle/1", "name": name, "files": files, **extra}
    doc["bundle_id"] = derive_id(doc)
    (b / "edgepack.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def make_bundle(tmp_path: Path) -> Path:
    """A small bundle laid out as on a device: <install_dir>/releases/<id>/, keys in <install_dir>/trusted_keys/."""
    b = tmp_path / "releases" / "tiny"
    (b / "model").mkdir(parents=True)
    (b / "model" / "w.bin").write_bytes(bytes(range(256)) * 4)
    (b / "run.py").write_text("print('hi')\n")
    shutil.copy(SCRIPT, b / "verify_bundle.py")
    shutil.copy(ROOT / "edgepack" / "bundle_format.py", b / "bundle_format.py")  # shipped beside it
    write_manifest(b)
    return b


def pub_key_id(pub: Path) -> str:
    m = re.search(r"minisign public key ([0-9A-F]{1,16})", pub.read_text())
    assert m, pub.read_text()
    return m.group(1)


def run_script(b: Path, *args: str, stdlib_only: bool = False) -> tuple[int, dict[str, Any]]:
    # -S: no site-packages, so the script runs on the standard library alone (no py-minisign either).
    cmd = [sys.executable, *(["-S"] if stdlib_only else []), str(b / "verify_bundle.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=b.parent)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    out = json.loads(lines[0])
    assert set(out) == {"ok", "bundle_id", "problems", "signed", "key_id", "error"}
    assert out["ok"] == (proc.returncode == 0) and proc.returncode in (0, 1), (proc.returncode, out)
    assert out["error"] == (out["problems"][0] if out["problems"] else None)
    return proc.returncode, out


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys" / "signer")


# --- keys ---------------------------------------------------------------------------------------------------------


def test_keygen_writes_secret_0600_and_public_and_refuses_overwrite(tmp_path: Path) -> None:
    sk, pub = keygen(tmp_path / "a" / "b" / "k")
    assert sk == tmp_path / "a" / "b" / "k" and pub == tmp_path / "a" / "b" / "k.pub"
    assert sk.stat().st_mode & 0o777 == 0o600
    assert sk.read_text().startswith("untrusted comment: minisign secret key\nRW")
    assert pub.read_text().splitlines()[1].startswith("RW")
    old_id = pub_key_id(pub)
    with pytest.raises(OutputExistsError, match="already exists") as e:
        keygen(sk)
    assert e.value.hint and "--force" in e.value.hint
    assert pub_key_id(pub) == old_id
    pub.unlink()
    with pytest.raises(OutputExistsError):  # the secret key alone is enough to refuse
        keygen(sk)
    keygen(sk, force=True)
    assert pub_key_id(pub) != old_id


@needs_minisign
def test_minisign_tool_signs_with_our_key_and_we_sign_with_its_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    f = tmp_path / "f.txt"
    f.write_text("data\n")
    subprocess.run([MINISIGN, "-S", "-s", str(sk), "-m", str(f)], check=True, capture_output=True, timeout=60)
    subprocess.run([MINISIGN, "-V", "-p", str(pub), "-m", str(f)], check=True, capture_output=True, timeout=60)

    theirs_sk, theirs_pub = tmp_path / "m.sec", tmp_path / "m.pub"
    subprocess.run([MINISIGN, "-G", "-W", "-p", str(theirs_pub), "-s", str(theirs_sk)], check=True,
                   capture_output=True, timeout=60)
    b = make_bundle(tmp_path)
    info = sign(b, theirs_sk)
    assert info.key_id == pub_key_id(theirs_pub)
    assert verify(b, [theirs_pub]).key_id == info.key_id
    subprocess.run([MINISIGN, "-V", "-p", str(theirs_pub), "-m", str(b / "edgepack.json"), "-x", str(b / SIGNATURE)],
                   check=True, capture_output=True, timeout=60)


def test_encrypted_key_needs_the_right_password(tmp_path: Path) -> None:
    sk, pub = keygen(tmp_path / "enc", password="correct horse")
    assert "encrypted secret key" in sk.read_text()
    b = make_bundle(tmp_path)
    with pytest.raises(UserError, match="password-protected") as e:
        sign(b, sk)
    assert e.value.hint and "EDGEPACK_KEY_PASSWORD" in e.value.hint
    with pytest.raises(UserError, match="wrong password") as e:
        sign(b, sk, password="battery staple")
    assert e.value.hint and "EDGEPACK_KEY_PASSWORD" in e.value.hint
    assert not (b / SIGNATURE).exists()
    info = sign(b, sk, password="correct horse")
    assert verify(b, [pub]) == info


# --- sign and verify ----------------------------------------------------------------------------------------------


def test_sign_then_verify(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    manifest = (b / "edgepack.json").read_bytes()
    info = sign(b, sk)
    bundle_id = json.loads(manifest)["bundle_id"]
    assert info.trusted_comment == f"edgepack bundle {bundle_id} sha256:{sha256(manifest)}"
    assert info.key_id == pub_key_id(pub)
    assert info.signature_file == str(b / SIGNATURE)
    lines = (b / SIGNATURE).read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("untrusted comment: ")
    assert lines[2] == f"trusted comment: {info.trusted_comment}"
    assert (b / "edgepack.json").read_bytes() == manifest  # signing leaves the manifest alone
    assert verify(b, [pub]) == info
    assert verify(b, [str(pub)]) == info


def test_keys_pasted_through_a_ci_secret_store_still_load(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Secret stores add a trailing newline (printf '%s\\n' "$SECRET"), or CRs from a Windows clipboard."""
    sk, pub = keys
    pasted_sk, pasted_pub = tmp_path / "pasted.key", tmp_path / "pasted.pub"
    pasted_sk.write_bytes(sk.read_bytes() + b"\n\n")
    pasted_pub.write_bytes(pub.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    b = make_bundle(tmp_path)
    info = sign(b, pasted_sk)
    assert verify(b, [pasted_pub]) == info


@needs_minisign
def test_minisign_tool_verifies_our_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    info = sign(b, sk)
    proc = subprocess.run([MINISIGN, "-V", "-p", str(pub), "-m", str(b / "edgepack.json"), "-x", str(b / SIGNATURE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert info.trusted_comment in proc.stdout + proc.stderr


def test_base64_public_key_spec(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    sign(b, sk)
    line = pub.read_text().splitlines()[1]
    assert verify(b, [line]).key_id == pub_key_id(pub)
    assert len(load_public_keys([pub, line])) == 2


@pytest.mark.parametrize("spec", ["RWnot-base64!", "no/such/file.pub"])
def test_bad_public_key_spec_is_named(spec: str) -> None:
    with pytest.raises(SignatureError, match=re.escape(repr(spec))) as e:
        load_public_keys([spec])
    assert e.value.kind == "signature" and e.value.exit_code == 1


def test_secret_key_passed_as_public_key_is_refused(keys: tuple[Path, Path]) -> None:
    sk, _ = keys
    with pytest.raises(SignatureError, match="not a minisign public key"):
        load_public_keys([sk])


def test_unsigned_bundle_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = make_bundle(tmp_path)
    with pytest.raises(SignatureError, match="is not signed") as e:
        verify(b, [keys[1]])
    assert e.value.hint and "edgepack sign" in e.value.hint


def test_signature_by_untrusted_key_names_both_key_ids(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    _, other_pub = keygen(tmp_path / "other")
    b = make_bundle(tmp_path)
    sign(b, sk)
    with pytest.raises(SignatureError, match="not trusted") as e:
        verify(b, [other_pub])
    assert pub_key_id(pub) in e.value.message and pub_key_id(other_pub) in e.value.message
    assert e.value.fields["key_id"] == pub_key_id(pub)


def test_one_flipped_byte_in_the_manifest_breaks_the_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    sign(b, sk)
    data = bytearray((b / "edgepack.json").read_bytes())
    i = data.index(b"tiny-host")
    data[i] ^= 0x01
    (b / "edgepack.json").write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="does not match"):
        verify(b, [pub])


@needs_minisign
def test_valid_signature_with_a_foreign_trusted_comment_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    subprocess.run([MINISIGN, "-S", "-s", str(sk), "-m", str(b / "edgepack.json"), "-x", str(b / SIGNATURE),
                    "-t", "some other bundle"], check=True, capture_output=True, timeout=60)
    with pytest.raises(SignatureError, match="trusted comment"):
        verify(b, [pub])


# --- verify_bundle.py on the device -------------------------------------------------------------------------------


def test_script_ok_on_an_intact_bundle_with_the_standard_library_only(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    for local in (".venv/bin/python", "__pycache__/run.cpython-311.pyc", ".cache/litert-lm/x"):
        (b / local).parent.mkdir(parents=True, exist_ok=True)
        (b / local).write_text("made on the device")
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 0, out
    assert out["bundle_id"] == json.loads((b / "edgepack.json").read_text())["bundle_id"]
    assert out["signed"] is False and out["key_id"] is None and out["problems"] == []


def test_script_names_a_changed_file(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    data = bytearray((b / "model" / "w.bin").read_bytes())
    data[100] ^= 0xFF
    (b / "model" / "w.bin").write_bytes(bytes(data))
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 1
    assert len(out["problems"]) == 1 and "model/w.bin" in out["error"] and "sha256" in out["error"]


def test_script_reports_missing_and_unexpected_files(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    (b / "run.py").unlink()
    (b / "model" / "evil.sh").write_text("rm -rf ~\n")
    (b / "model" / "__pycache__").mkdir()  # only top-level __pycache__ is the device's
    (b / "model" / "__pycache__" / "x.pyc").write_text("")
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 1
    text = "\n".join(out["problems"])
    assert "run.py is missing" in text and "model/evil.sh is not listed" in text
    assert "model/__pycache__/x.pyc is not listed" in text


def test_script_refuses_a_manifest_edited_after_the_build(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    stale_id = json.loads((b / "edgepack.json").read_text())["bundle_id"]
    (b / "run.py").write_text("print('owned')\n")
    doc = write_manifest(b)  # file hashes recomputed, so only the id can give it away
    doc["bundle_id"] = stale_id
    (b / "edgepack.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 1
    assert out["problems"] == [p for p in out["problems"] if "bundle_id" in p] and len(out["problems"]) == 1
    assert stale_id in out["error"] and "does not match the manifest's content" in out["error"]


def test_script_refuses_a_bundle_id_with_dot_dot(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    doc = write_manifest(b, name="tiny..host")  # id matches its content; only the '..' rule can refuse it
    assert re.match(r"^[a-z0-9][a-z0-9._-]{0,95}-[0-9a-f]{12}$", doc["bundle_id"])
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 1 and "not a valid bundle id" in out["error"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "model/../../x", "model\\w.bin"])
def test_script_refuses_unsafe_paths(tmp_path: Path, bad: str) -> None:
    b = make_bundle(tmp_path)
    doc = json.loads((b / "edgepack.json").read_text())
    doc["files"].append({"path": bad, "bytes": 1, "sha256": "0" * 64})
    doc["bundle_id"] = derive_id(doc)
    (b / "edgepack.json").write_text(json.dumps(doc))
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 1 and "unsafe path" in out["error"] and repr(bad) in out["error"]


def test_script_refuses_a_wrong_schema(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    write_manifest(b, schema="edgepack.bundle/0")
    doc = json.loads((b / "edgepack.json").read_text())
    assert doc["schema"] == "edgepack.bundle/0"
    rc, out = run_script(b, stdlib_only=True)
    assert rc == 1 and "schema" in out["error"]


def test_script_verifies_the_signature_against_installed_keys(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    sign(b, sk)
    rc, out = run_script(b, stdlib_only=True)  # no trusted keys installed: reports, checks nothing
    assert rc == 0 and out["signed"] is True and out["key_id"] is None

    (tmp_path / "trusted_keys").mkdir()  # <install_dir>/trusted_keys/, the script's default
    shutil.copy(pub, tmp_path / "trusted_keys" / "ci.pub")
    rc, out = run_script(b)
    assert rc == 0, out
    assert out["signed"] is True and out["key_id"] == pub_key_id(pub)

    rc, out = run_script(b, stdlib_only=True)  # keys installed but no py-minisign: never a silent pass
    assert rc == 1 and "py-minisign" in out["error"]

    (b / SIGNATURE).write_text((b / SIGNATURE).read_text().replace("edgepack bundle", "edgepack bundlf"))
    rc, out = run_script(b)
    assert rc == 1 and out["signed"] is False and "does not match" in out["error"]


def test_script_refuses_a_signature_by_an_untrusted_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    _, other_pub = keygen(tmp_path / "elsewhere" / "other")
    b = make_bundle(tmp_path)
    sign(b, sk)
    rc, out = run_script(b, "--trusted-keys", str(other_pub.parent))
    assert rc == 1 and out["signed"] is False
    assert pub_key_id(pub) in out["error"] and pub_key_id(other_pub) in out["error"]


def test_script_refuses_a_changed_manifest_under_a_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    sk, pub = keys
    b = make_bundle(tmp_path)
    sign(b, sk)
    (b / "edgepack.json").write_text(json.dumps(json.loads((b / "edgepack.json").read_text())))  # same doc, new bytes
    rc, out = run_script(b, "--trusted-keys", str(pub.parent))
    assert rc == 1 and out["problems"] == [out["error"]] and "signature does not match" in out["error"]


def test_script_require_signature_refuses_an_unsigned_bundle(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = make_bundle(tmp_path)
    rc, out = run_script(b, "--require-signature")  # no keys anywhere
    assert rc == 1 and "no trusted keys" in out["error"]
    rc, out = run_script(b, "--require-signature", "--trusted-keys", str(keys[1].parent))
    assert rc == 1 and "not signed" in out["error"]


def test_script_never_trusts_keys_inside_the_bundle(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    attacker_sk, _ = keygen(tmp_path / "attacker")
    (b / "keys").mkdir()
    shutil.copy(Path(str(attacker_sk) + ".pub"), b / "keys" / "attacker.pub")
    write_manifest(b)  # the key is a listed file and the bundle is signed with it: only the folder rule refuses
    sign(b, attacker_sk)
    rc, out = run_script(b, "--require-signature", "--trusted-keys", str(b / "keys"))
    assert rc == 1 and "inside the bundle" in out["error"]
