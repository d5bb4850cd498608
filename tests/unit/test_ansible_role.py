"""edgepack's own Ansible role (issue #20): written from the installed edgepack, never taken from a bundle; its
controller-side packer reads only manifest-listed regular files inside the bundle; a device's `stage` answer is
counted against the manifest, never trusted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from edgepack.bundle import safe_relpath
from edgepack.errors import BundleError, UserError
from edgepack.fleet import export_role, to_send, write_role
from edgepack.remote.program import device_program

ROOT = Path(__file__).resolve().parents[2]


def test_the_role_is_edgepacks_own_with_the_deploy_helper(tmp_path: Path) -> None:
    files = write_role(tmp_path / "r")
    role = "roles/edgepack_release/"
    assert set(files) == {"deploy.yml", "rollback.yml", role + "tasks/main.yml", role + "tasks/rollback.yml",
                          role + "defaults/main.yml", role + "vars/main.yml", role + "meta/main.yml",
                          role + "files/edgepack-device.py", role + "files/pack_upload.py"}
    # The same text `edgepack deploy --host` sends: the device program, assembled.
    assert (tmp_path / "r" / role / "files" / "edgepack-device.py").read_text() == device_program()
    # The bundle is named, never found next to the role (the role used to read role_path/../../..).
    defaults = yaml.safe_load((tmp_path / "r" / role / "defaults" / "main.yml").read_text())
    assert defaults["edgepack_release_bundle_dir"] == "{{ edgepack_bundle | default('') }}"


def test_ansible_role_command_writes_once_and_replaces_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "ops"
    out.mkdir()
    (out / "inventory.ini").write_text("[boards]\n")
    res = export_role(out)
    assert Path(res["deploy"]).is_file() and Path(res["rollback"]).is_file()
    stale = out / "roles" / "edgepack_release" / "tasks" / "stale.yml"
    stale.write_text("- ansible.builtin.debug: {}\n")
    with pytest.raises(UserError) as err:
        export_role(out)
    assert err.value.code == "output_exists" and "--force" in (err.value.hint or "")
    export_role(out, force=True)
    assert not stale.exists() and (out / "inventory.ini").read_text() == "[boards]\n"


SAFE = yaml.safe_load((ROOT / "templates/_shared/ansible/roles/edgepack_release/vars/main.yml").read_text())[
    "edgepack_release_safe_path"]


@pytest.mark.parametrize("path", ["a", "wheels/x-1.0-py3-none-any.whl", "model/.hidden", "a/b/c.onnx.data",
                                  "", "/etc/passwd", "..", "../x", "a/../b", "a/..", ".", "./a", "a/./b", "a//b",
                                  "a/", "a\\b", "..\\x", "a\nb"])
def test_the_roles_path_rule_refuses_whatever_edgepack_refuses(path: str) -> None:
    """One rule for what a manifest may name: the role's (it reads an unverified manifest under plain
    ansible-playbook) refuses every path edgepack's own safe_relpath refuses."""
    try:
        safe_relpath(path)
        edgepack_ok = "\n" not in path  # the role is stricter: no control characters
    except BundleError:
        edgepack_ok = False
    assert bool(re.match(SAFE, path)) == edgepack_ok


# -- the controller-side packer ---------------------------------------------------------------------------

PACKER = ROOT / "templates/_shared/ansible/roles/edgepack_release/files/pack_upload.py"


def bundle(where: Path, files: dict[str, bytes]) -> Path:
    b = where / "bundle"
    for rel, data in files.items():
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_bytes(data)
    listed = [{"path": rel, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()]
    (b / "edgepack.json").write_text(json.dumps({"bundle_id": "x-0123456789ab", "files": listed}))
    return b


def pack(b: Path, paths: list[str], archive: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PACKER), str(archive), str(b)], input=json.dumps(paths),
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_packer_packs_listed_regular_files(tmp_path: Path) -> None:
    b = bundle(tmp_path, {"a.txt": b"hello", "sub/run.sh": b"#!/bin/sh\n"})
    os.chmod(b / "sub" / "run.sh", 0o755)
    proc = pack(b, ["a.txt", "sub/run.sh"], tmp_path / "up.tar")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(tmp_path / "up.tar") as tar:
        members = {m.name: m for m in tar}
        assert set(members) == {"a.txt", "sub/run.sh"} and all(m.isreg() for m in members.values())
        assert members["sub/run.sh"].mode == 0o755 and members["a.txt"].mode == 0o644
        assert tar.extractfile("a.txt").read() == b"hello"  # type: ignore[union-attr]


@pytest.mark.parametrize("attack", ["unlisted", "dotdot", "absolute", "file_link", "folder_link", "fifo"])
def test_the_packer_never_reads_outside_the_bundle(tmp_path: Path, attack: str) -> None:
    """Each way a path could reach the controller's secret key: refused, and the key is in no archive."""
    secret = tmp_path / "keys" / "minisign.key"
    secret.parent.mkdir()
    secret.write_bytes(b"UNTRUSTED-COMMENT-SECRET")
    b = bundle(tmp_path, {"a.txt": b"hello", "model/w.bin": b"weights"})
    manifest = json.loads((b / "edgepack.json").read_text())
    ask = {"unlisted": "../keys/minisign.key", "dotdot": "../keys/minisign.key", "absolute": str(secret),
           "file_link": "a.txt", "folder_link": "model/minisign.key", "fifo": "a.txt"}[attack]
    if attack in ("dotdot", "absolute", "folder_link"):  # the manifest itself names it (an unverified manifest)
        manifest["files"].append({"path": ask, "bytes": 10, "sha256": "0" * 64})
        (b / "edgepack.json").write_text(json.dumps(manifest))
    if attack == "file_link":
        (b / "a.txt").unlink()
        (b / "a.txt").symlink_to(secret)
    if attack == "folder_link":
        (b / "model" / "w.bin").unlink()
        (b / "model").rmdir()
        (b / "model").symlink_to(secret.parent)
    if attack == "fifo":
        (b / "a.txt").unlink()
        os.mkfifo(b / "a.txt")
    proc = pack(b, [ask], tmp_path / "up.tar")
    assert proc.returncode == 1 and proc.stderr.startswith("bundle_invalid: "), proc.stderr
    archive = tmp_path / "up.tar"
    assert not archive.exists() or b"SECRET" not in archive.read_bytes()


# -- a device's stage answer, counted against the manifest --------------------------------------------------

FILES = {"a.txt": 5, "model/w.bin": 9_000_000}


def test_what_is_sent_is_chosen_from_the_manifest() -> None:
    answer = {"staging": "/x/releases/id.partial", "missing": [{"path": "model/w.bin", "bytes": 1}],
              "missing_bytes": 1}
    assert to_send(answer, FILES) == {"model/w.bin": 9_000_000}  # the manifest's size, not the device's
    assert to_send({"staging": None, "missing": []}, FILES) == {}


@pytest.mark.parametrize("missing", [[{"path": "../../.minisign/minisign.key", "bytes": 10}], [{"bytes": 10}],
                                     ["a.txt"], "a.txt", None, [{"path": ["a.txt"]}]])
def test_a_hostile_stage_answer_is_refused(missing: object) -> None:
    with pytest.raises(UserError) as err:
        to_send({"staging": "/x/releases/id.partial", "missing": missing}, FILES)
    assert err.value.code == "device_answer_invalid" and "does not list" in err.value.message


def test_nothing_in_the_role_reads_a_path_from_the_device() -> None:
    """The role's controller-side sources (copy src, the packer's input) name the manifest's entries only, and the
    one command it runs on the controller is edgepack's packer."""
    path = ROOT / "templates/_shared/ansible/roles/edgepack_release/tasks/main.yml"
    tasks = path.read_text()
    assert "stage.missing" not in tasks.split("- name: Check that each file to send is a regular file")[1]

    def walk(items: list[dict]) -> list[dict]:
        return [x for t in items for x in [t, *walk(t.get("block", []) + t.get("always", []))]]

    every = walk(yaml.safe_load(tasks))
    for t in every:
        if "ansible.builtin.copy" in t:
            assert "edgepack_release_stage" not in t["ansible.builtin.copy"]["src"], t["name"]
    local = [t for t in every if t.get("delegate_to") == "localhost" and "ansible.builtin.command" in t]
    assert len(local) == 1 and "pack_upload.py" in json.dumps(local[0]["ansible.builtin.command"]["argv"])
    assert "edgepack_release_small" in local[0]["ansible.builtin.command"]["stdin"]
