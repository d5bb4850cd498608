"""The device helper's safety rules, run here in-process and as a real lock-holding process (it is stdlib only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgepack.bundle import write_manifest
from edgepack.remote import device as h
from edgepack.remote.device import lock as device_lock
from edgepack.remote.program import device_program

# The device program as it is sent: the assembled text, run as `python3 FILE` (as `python3 -` with it on stdin).
HELPER = Path(tempfile.mkdtemp(prefix="edgepack-device-")) / "edgepack-device.py"
HELPER.write_text(device_program())


def release(root: Path, tag: str, installed: bool = True) -> tuple[str, Path]:
    """A staged release of a tiny bundle named `tag`; returns (bundle id, staging folder)."""
    src = root / f"src-{tag}"
    src.mkdir(parents=True)
    (src / "run.py").write_text(f"print({tag!r})\n")
    bundle_id = write_manifest(src, {"name": f"b-{tag}"}).bundle_id
    staging = root / ".staging" / f"{bundle_id}@op-1"
    staging.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, staging)
    if installed:
        (staging / ".venv").mkdir()
        (staging / ".venv" / ".edgepack-installed").write_text("x")
    return bundle_id, staging


@contextmanager
def holding(root: Path, op: str = "op-1") -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, str(HELPER), "lock", str(root), op, json.dumps({"command": "test"}),
                             "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert json.loads(proc.stdout.readline())["ok"]
    try:
        yield proc
    finally:
        proc.stdin.write("release\n")
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_second_operation_is_refused_while_the_lock_is_held(tmp_path: Path) -> None:
    with holding(tmp_path, "op-a"):
        other = subprocess.run([sys.executable, str(HELPER), "lock", str(tmp_path), "op-b", "{}", "5"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
        answer = json.loads(other.stdout)
        assert answer == {"ok": False, "error": "locked", "holder": answer["holder"]}
        assert answer["holder"]["op"] == "op-a" and answer["holder"]["command"] == "test"
        assert device_lock._held_by(str(tmp_path), "op-a") and not device_lock._held_by(str(tmp_path), "op-b")
    assert not device_lock._held_by(str(tmp_path), "op-a")  # released


def test_a_dead_holder_frees_the_lock_and_its_processes_end(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(HELPER), "lock", str(tmp_path), "op-dead", "{}", "30"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert json.loads(proc.stdout.readline())["ok"]
    # The operation started a long command in its own process group and recorded it (as deploy does).
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    device_lock.record_pid(str(tmp_path), "op-dead", child.pid)  # its pid and start time
    proc.stdin.close()  # the SSH channel closes: the link dropped or the local edgepack died
    proc.wait(timeout=30)
    assert child.wait(timeout=10) != 0  # ended with its holder, not left running
    with holding(tmp_path, "op-next"):
        assert device_lock._held_by(str(tmp_path), "op-next")


def test_changes_need_the_lock(tmp_path: Path) -> None:
    bundle_id, _ = release(tmp_path, "a")
    with pytest.raises(h.Refused, match="does not hold the lock"):
        h.publish(str(tmp_path), "op-1", bundle_id)
    with holding(tmp_path, "op-1"):
        assert h.publish(str(tmp_path), "op-1", bundle_id)["folder"] == bundle_id


def test_a_bad_copy_in_use_is_never_replaced_a_fresh_folder_is_used(tmp_path: Path) -> None:
    root = str(tmp_path)
    bundle_id, _ = release(tmp_path, "a")
    with holding(tmp_path, "op-1"):
        h.publish(root, "op-1", bundle_id)
        assert h.switch(root, "op-1", bundle_id)["ok"]
        live = tmp_path / "releases" / bundle_id
        (live / "run.py").write_text("print('changed on the device')\n")  # one changed byte, or slow storage
        assert not h.locate(root, bundle_id)["folders"][0]["ok"]
        # The redeploy's good copy must not replace the folder `current` points at.
        _, staging = release(tmp_path / "again", "a")
        os.rename(staging, tmp_path / ".staging" / f"{bundle_id}@op-1")
        pub = h.publish(root, "op-1", bundle_id)
        assert pub["folder"] == f"{bundle_id}.2" and (live / ".venv").is_dir()
        assert os.readlink(tmp_path / "current") == f"releases/{bundle_id}"
        assert h.switch(root, "op-1", pub["folder"])["ok"]
        # Now the bad copy is only the rollback target... still in use, so a third copy goes to .3.
        _, staging = release(tmp_path / "third", "a")
        os.rename(staging, tmp_path / ".staging" / f"{bundle_id}@op-1")
        assert h.publish(root, "op-1", bundle_id)["folder"] == f"{bundle_id}.3"


def test_switch_refuses_a_release_that_is_not_verified_and_installed(tmp_path: Path) -> None:
    root = str(tmp_path)
    bundle_id, _ = release(tmp_path, "a", installed=False)
    with holding(tmp_path, "op-1"):
        h.publish(root, "op-1", bundle_id)
        res = h.switch(root, "op-1", bundle_id)
        assert not res["ok"] and "not complete, verified and installed" in res["error"]
        assert not (tmp_path / "current").exists()


@pytest.mark.parametrize("bad", ["x/../../../canary", "..", "/etc", "a b", "../releases"])
def test_ids_and_paths_that_leave_the_install_dir_are_refused(tmp_path: Path, bad: str) -> None:
    (tmp_path / "canary").mkdir()
    root = tmp_path / "edgepack"
    with holding(root, "op-1"):
        calls = [lambda: h.publish(str(root), "op-1", bad), lambda: h.switch(str(root), "op-1", bad),
                 lambda: h.locate(str(root), bad)]
        if ".." in bad or bad.startswith("/"):  # "a b" is a fine file name inside; never a bundle id
            calls += [lambda: h.hashes(str(root), bad), lambda: h.mkdirs(str(root), "op-1", bad)]
        for call in calls:
            with pytest.raises(h.Refused):
                call()
    assert (tmp_path / "canary").is_dir()


def test_a_symlink_out_of_the_install_dir_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "edgepack"
    (root / "releases").mkdir(parents=True)
    (root / "releases" / "escape").symlink_to(tmp_path)
    with pytest.raises(h.Refused, match="leaves the install dir"):
        h.hashes(str(root), "releases/escape")


def test_prune_keeps_both_pointers_and_removes_stale_partials(tmp_path: Path) -> None:
    root = str(tmp_path)
    with holding(tmp_path, "op-1"):
        ids = []
        for tag in "abcd":
            bundle_id, _ = release(tmp_path, tag)
            h.publish(root, "op-1", bundle_id)
            h.switch(root, "op-1", bundle_id)
            ids.append(bundle_id)
            time.sleep(0.02)  # distinct mtimes: prune keeps the newest
        h.rollback(root, "op-1")  # current = c, rollback target = b; d is the newest
        (tmp_path / "releases" / "b-x-000000000000.partial").mkdir()
        res = h.prune(root, "op-1", "1")
        assert res["removed"] == [ids[0]] and set(res["kept"]) == set(ids[1:])
        assert res["stale_removed"] == ["b-x-000000000000.partial"]


def test_prune_never_removes_another_operations_upload(tmp_path: Path) -> None:
    """An upload in progress (Ansible copies into its staging folder outside the lock) survives another
    operation's prune; an upload abandoned for a day, and the pruning operation's own leftovers, do not."""
    root = str(tmp_path)
    staging = tmp_path / ".staging"
    (staging / "b-x-000000000000@op-ansible").mkdir(parents=True)  # being copied into right now
    (staging / "b-x-000000000000@op-ansible" / "w.bin").write_bytes(b"w")
    (staging / "b-y-000000000000@op-1").mkdir()  # this operation's own
    old = staging / "b-z-000000000000@op-gone"
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    with holding(tmp_path, "op-1"):
        res = h.prune(root, "op-1", "3")
    assert sorted(res["stale_removed"]) == [".staging/b-y-000000000000@op-1", ".staging/b-z-000000000000@op-gone"]
    assert (staging / "b-x-000000000000@op-ansible" / "w.bin").read_bytes() == b"w"


def test_an_interrupted_upload_is_resumed_by_the_next_operation(tmp_path: Path) -> None:
    """The next operation's staging links what the interrupted one received whole (hashed, as nothing verified
    it); a file that arrived cut short is asked for again."""
    root = tmp_path / "device"
    a_id, a = fake_bundle(tmp_path, "a")
    files = json.loads((a / "edgepack.json").read_text())["files"]
    first = h.stage(str(root), a_id, json.dumps(files))
    (Path(first["staging"]) / "weights.bin").write_bytes((a / "weights.bin").read_bytes())
    (Path(first["staging"]) / "install.sh").write_bytes((a / "install.sh").read_bytes()[:5])  # cut short
    second = h.stage(str(root), a_id, json.dumps(files))
    assert second["staging"] != first["staging"]
    assert {m["path"] for m in second["missing"]} == {"install.sh", "smoke_test.py"} and second["reused"] == 1
    linked = (Path(second["staging"]) / "weights.bin").stat().st_ino
    assert linked == (Path(first["staging"]) / "weights.bin").stat().st_ino


def test_the_unit_serves_the_install_dir_it_was_deployed_to(tmp_path: Path) -> None:
    """The bundle's unit has a placeholder, not the target's default install dir: --install-dir deploys work."""
    root = tmp_path / "opt" / "models"
    bundle_id, staging = release(root, "a")
    unit = "edgepack-b-a.service"
    (staging / unit).write_text("ExecStart=@EDGEPACK_CURRENT@/.venv/bin/python @EDGEPACK_CURRENT@/run.py "
                                "--serve @EDGEPACK_SERVE@\n")
    os.remove(staging / "edgepack.json")
    write_manifest(staging, {"name": "b-a"})
    bundle_id = json.loads((staging / "edgepack.json").read_text())["bundle_id"]
    os.rename(staging, root / ".staging" / f"{bundle_id}@op-1")
    with holding(root, "op-1"):
        h.publish(str(root), "op-1", bundle_id)
        h.switch(str(root), "op-1", bundle_id)
        out = h.install_unit(str(root), "op-1", unit, str(tmp_path / "units"), "127.0.0.1:8090")
        with pytest.raises(h.Refused, match="bad serve address"):
            h.install_unit(str(root), "op-1", unit, str(tmp_path / "units"), "127.0.0.1:8090; rm -rf ~")
    text = Path(out["path"]).read_text()
    assert text == f"ExecStart={root}/current/.venv/bin/python {root}/current/run.py --serve 127.0.0.1:8090\n"
    assert out["unit"] == h.unit_name(str(root))  # one unit per install dir, whatever the bundle's name


def test_root_on_a_systemd_device_gets_a_hardened_system_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.bundle import write_manifest
    from edgepack.stages.render import shipped_dir

    monkeypatch.setitem(h.UNIT_DIRS, "system", str(tmp_path / "etc-systemd"))
    monkeypatch.setitem(h.UNIT_DIRS, "user", str(tmp_path / "user-units"))
    root = tmp_path / "edgepack"
    bundle_id, staging = release(root, "a")
    unit = "edgepack-b-a.service"
    (staging / unit).write_text((shipped_dir("templates") / "_shared" / "edgepack.service.j2").read_text()
                                .replace("{{ ctx.name }}", "b-a"))
    os.remove(staging / "edgepack.json")
    write_manifest(staging, {"name": "b-a"})
    bundle_id = json.loads((staging / "edgepack.json").read_text())["bundle_id"]
    os.rename(staging, root / ".staging" / f"{bundle_id}@op-1")
    assert h.service_status(str(root))["unit_scope"] is None
    with holding(root, "op-1"):
        h.publish(str(root), "op-1", bundle_id)
        h.switch(str(root), "op-1", bundle_id)
        out = h.install_unit(str(root), "op-1", unit, "system", "127.0.0.1:8090")
        with pytest.raises(h.Refused, match="bad unit scope"):
            h.install_unit(str(root), "op-1", unit, "../etc", "127.0.0.1:8090")
    text = Path(out["path"]).read_text()
    assert Path(out["path"]).parent == tmp_path / "etc-systemd" and out["scope"] == "system"
    assert "WantedBy=multi-user.target" in text and "default.target" not in text
    assert "NoNewPrivileges=yes" in text and text.index("ProtectSystem=full") < text.index("[Install]")
    assert f"ExecStart={root}/current/.venv/bin/python {root}/current/run.py --serve 127.0.0.1:8090" in text
    assert h.service_status(str(root))["unit_scope"] == "system"


def fake_bundle(root: Path, tag: str, smoke_ok: bool = True) -> tuple[str, Path]:
    """A bundle whose install.sh makes a venv pointing at this Python and whose smoke test passes or fails."""
    src = root / f"bundle-{tag}"
    src.mkdir(parents=True)
    (src / "install.sh").write_text(f'set -e\nmkdir -p "$EDGEPACK_VENV/bin"\nln -sf {sys.executable} '
                                    f'"$EDGEPACK_VENV/bin/python"\ntouch "$EDGEPACK_VENV/.edgepack-installed"\n')
    (src / "smoke_test.py").write_text(f"import json, sys\nprint(json.dumps({{'ok': {smoke_ok}, 'tag': {tag!r}}}))\n"
                                       f"sys.exit({0 if smoke_ok else 1})\n")
    (src / "weights.bin").write_bytes(b"w" * 4096)  # the same in every tag: a second release links it
    return write_manifest(src, {"name": f"b-{tag}"}).bundle_id, src


def stage_and_copy(root: Path, bundle: Path, bundle_id: str) -> dict:
    """What the Ansible role does before `apply`: stage, then send what the device said it lacks."""
    manifest = json.loads((bundle / "edgepack.json").read_text())
    staged = h.stage(str(root), bundle_id, json.dumps(manifest["files"]))
    assert staged["ok"], staged
    for m in staged["missing"]:
        (Path(staged["staging"]) / m["path"]).write_bytes((bundle / m["path"]).read_bytes())
    if staged["staging"]:
        (Path(staged["staging"]) / "edgepack.json").write_bytes((bundle / "edgepack.json").read_bytes())
    return staged


def apply_cli(root: Path, bundle_id: str, **spec: object) -> tuple[int, dict]:
    """The role's `apply`, on the latest upload staged for the release (none: the copy already on the device)."""
    staged = sorted((root / ".staging").glob(f"{bundle_id}@*"), key=lambda p: p.stat().st_mtime_ns)
    spec = {"staging": f".staging/{staged[-1].name}" if staged else None, **spec}
    proc = subprocess.run([sys.executable, str(HELPER), "apply", str(root),
                           json.dumps({"bundle_id": bundle_id, "keep": 3, "smoke_tokens": 4, **spec})],
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_apply_switches_only_to_a_release_that_passes_and_stage_sends_only_what_is_new(tmp_path: Path) -> None:
    root = tmp_path / "device"
    a_id, a = fake_bundle(tmp_path, "a")
    staged = stage_and_copy(root, a, a_id)
    assert {m["path"] for m in staged["missing"]} == {"install.sh", "smoke_test.py", "weights.bin"}
    code, res = apply_cli(root, a_id)
    assert code == 0 and res["ok"] and res["current"] == a_id and res["switched"] and res["smoke"]["tag"] == "a"
    assert [s["name"] for s in res["steps"]] == ["verify", "signature", "install", "smoke", "switch", "prune"]

    b_id, b = fake_bundle(tmp_path, "b", smoke_ok=False)
    staged = stage_and_copy(root, b, b_id)
    assert {m["path"] for m in staged["missing"]} == {"smoke_test.py"}  # the rest is linked from releases/<a>
    assert staged["reused"] == 2 and staged["reused_bytes"] == 4096 + (b / "install.sh").stat().st_size
    code, res = apply_cli(root, b_id)
    assert code == 1 and res["code"] == "smoke_test_failed" and res["switched"] is False
    assert res["current"] == a_id and f"still points at releases/{a_id}" in res["error"]
    assert os.readlink(root / "current") == f"releases/{a_id}"

    again = stage_and_copy(root, a, a_id)  # a verified copy is there: nothing to send
    assert again["present"] == a_id and again["missing"] == [] and again["staging"] is None
    code, res = apply_cli(root, a_id)
    assert code == 0 and res["current"] == a_id


def test_apply_refuses_a_wrong_upload_and_a_held_lock_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "device"
    a_id, a = fake_bundle(tmp_path, "a")
    staged = stage_and_copy(root, a, a_id)
    (Path(staged["staging"]) / "weights.bin").write_bytes(b"x" * 4096)  # arrived wrong
    code, res = apply_cli(root, a_id)
    assert code == 1 and res["code"] == "upload_mismatch" and "weights.bin" in res["error"]
    assert res["current"] is None and not (root / "current").exists()
    stage_and_copy(root, a, a_id)  # the rerun sends what is wrong again
    with holding(root, "op-x"):
        code, res = apply_cli(root, a_id)
        assert code == 1 and res["code"] == "device_locked" and res["holder"]["op"] == "op-x"
    code, res = apply_cli(root, a_id)
    assert code == 0 and res["current"] == a_id
    code, res = apply_cli(root, a_id, trusted=["not-a-key"])
    assert code == 1 and res["code"] == "invalid_input" and res["current"] == a_id


FAKE_SERVER = """import http.server, json, sys
if {broken}:
    sys.exit("libfoo.so.1: cannot open shared object file")
addr = sys.argv[sys.argv.index("--serve") + 1]
host, port = addr.rsplit(":", 1)

class H(http.server.BaseHTTPRequestHandler):
    def reply(self, doc):
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply({{"status": "ok", "tag": {tag!r}}})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.reply({{"usage": {{"completion_tokens": 4}}}})

http.server.HTTPServer((host, int(port)), H).serve_forever()
"""


def test_apply_restarts_the_service_and_switches_back_when_the_new_one_fails(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)  # no systemd user manager: the supervised process
    root = tmp_path / "device"
    ids = []
    for tag, broken in (("a", False), ("b", True)):
        bundle_id, src = fake_bundle(tmp_path, tag)
        (src / "run.py").write_text(FAKE_SERVER.format(broken=broken, tag=tag))
        (src / "edgepack-b.service").write_text("[Service]\nExecStart=@EDGEPACK_CURRENT@/run.py\n[Install]\n")
        bundle_id = write_manifest(src, {"name": f"b-{tag}"}).bundle_id
        ids.append(bundle_id)
        stage_and_copy(root, src, bundle_id)
        code, res = apply_cli(root, bundle_id, service=True, serve_addr=addr, unit_file="edgepack-b.service")
        if not broken:
            assert code == 0 and res["service"].startswith("supervised process") and "healthy" in res["service"]
    try:
        assert code == 1 and res["code"] == "service_check_failed", res
        assert f"switched back to releases/{ids[0]}" in res["error"] and res["switched"] is False
        assert any("libfoo.so.1" in line for line in res["log_tail"])
        assert os.readlink(root / "current") == f"releases/{ids[0]}" and res["previous_check"]["ok"]
        with urllib.request.urlopen(f"http://{addr}/health", timeout=10) as r:
            assert json.loads(r.read())["tag"] == "a"  # the previous release serves again
    finally:
        pid = (root / "service.pid").read_text().split()[0]
        subprocess.run(["kill", "--", f"-{pid}"], check=False)


def test_unpack_takes_the_roles_archive_of_regular_files_and_refuses_anything_else(tmp_path: Path) -> None:
    import io
    import tarfile

    root = tmp_path / "device"
    a_id, a = fake_bundle(tmp_path, "a")
    manifest = json.loads((a / "edgepack.json").read_text())
    staged = h.stage(str(root), a_id, json.dumps(manifest["files"]))
    archive = Path(staged["staging"]) / h.UPLOAD_ARCHIVE
    with tarfile.open(archive, "w") as t:  # what the role's controller-side `python -m tarfile -c` writes
        for m in staged["missing"]:
            t.add(str(a / m["path"]), arcname=m["path"])
    (Path(staged["staging"]) / "edgepack.json").write_bytes((a / "edgepack.json").read_bytes())
    proc = subprocess.run([sys.executable, str(HELPER), "unpack", str(root), staged["staging_rel"]],
                          capture_output=True, text=True, check=False)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and doc["unpacked"] == 3 and not archive.exists()
    code, res = apply_cli(root, a_id)  # every byte checked against the manifest, then installed and switched
    assert code == 0 and res["current"] == a_id

    b_id, b = fake_bundle(tmp_path, "b")
    staged = h.stage(str(root), b_id, json.dumps(json.loads((b / "edgepack.json").read_text())["files"]))
    evil = Path(staged["staging"]) / h.UPLOAD_ARCHIVE
    for name, kind in (("../../escape.txt", tarfile.REGTYPE), ("smoke_test.py", tarfile.SYMTYPE)):
        with tarfile.open(evil, "w") as t:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            info.size = 0 if kind == tarfile.SYMTYPE else 4
            t.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
        proc = subprocess.run([sys.executable, str(HELPER), "unpack", str(root), staged["staging_rel"]],
                              capture_output=True, text=True, check=False)
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode == 3 and doc["refused"], doc
    assert not (tmp_path / "escape.txt").exists() and not (root / "escape.txt").exists()
    assert not (Path(staged["staging"]) / "smoke_test.py").is_symlink()


def test_a_live_copy_whose_runtime_broke_is_not_repaired_in_place_a_fresh_copy_is_asked_for(tmp_path: Path) -> None:
    """`apply` of a release that is live but whose venv broke: check-only install fails, nothing is touched, and
    the answer asks for a fresh copy; staged fresh (stage ... fresh=yes), it goes to releases/<id>.2."""
    root = tmp_path / "device"
    a_id, a = fake_bundle(tmp_path, "a")
    check_only = 'if [ -n "${EDGEPACK_CHECK_ONLY:-}" ]; then [ -x "$EDGEPACK_VENV/bin/python" ] || exit 8; exit 0; fi\n'
    (a / "install.sh").write_text("set -e\n" + check_only + (a / "install.sh").read_text())
    a_id = write_manifest(a, {"name": "b-a"}).bundle_id
    stage_and_copy(root, a, a_id)
    assert apply_cli(root, a_id)[0] == 0
    (root / "releases" / a_id / ".venv" / "bin" / "python").unlink()  # the live runtime broke
    code, res = apply_cli(root, a_id)
    assert code == 1 and res["code"] == "install_failed" and res["fresh_copy_needed"] and res["current"] == a_id
    files = json.loads((a / "edgepack.json").read_text())["files"]
    staged = h.stage(str(root), a_id, json.dumps(files), '{"command": "t"}', "", "yes")
    assert staged["present"] is None and staged["missing"] == []  # every file linked from the live copy
    (Path(staged["staging"]) / "edgepack.json").write_bytes((a / "edgepack.json").read_bytes())
    code, res = apply_cli(root, a_id)
    assert code == 0 and res["release_folder"] == f"{a_id}.2" and os.readlink(root / "current") == f"releases/{a_id}.2"


def test_apply_streams_one_progress_line_per_step_before_its_answer(tmp_path: Path) -> None:
    """What `edgepack deploy --host` shows as it happens: each step announced when it starts (the long ones) and
    reported when it ends, then the answer, whose steps are the reported ones."""
    root = tmp_path / "device"
    a_id, a = fake_bundle(tmp_path, "a")
    staged = stage_and_copy(root, a, a_id)
    proc = subprocess.run([sys.executable, str(HELPER), "apply", str(root),
                           json.dumps({"bundle_id": a_id, "staging": staged["staging_rel"], "smoke_tokens": 4})],
                          capture_output=True, text=True, timeout=60, check=False)
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    *progress, answer = lines
    assert proc.returncode == 0 and answer["ok"] and all(set(p) == {"progress"} for p in progress)
    done = [p["progress"] for p in progress if not p["progress"].get("begin")]
    begun = [p["progress"]["name"] for p in progress if p["progress"].get("begin")]
    assert done == answer["steps"] and all(isinstance(s["seconds"], float | int) for s in done)
    assert begun == ["verify", "install", "smoke"]
