"""The device helper's safety rules, run here in-process and as a real lock-holding process (it is stdlib only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgepack.bundle import write_manifest
from edgepack.remote import device_helper as h

HELPER = Path(h.__file__)


def release(root: Path, tag: str, installed: bool = True) -> tuple[str, Path]:
    """A staged release of a tiny bundle named `tag`; returns (bundle id, staging folder)."""
    src = root / f"src-{tag}"
    src.mkdir(parents=True)
    (src / "run.py").write_text(f"print({tag!r})\n")
    bundle_id = write_manifest(src, {"name": f"b-{tag}"}).bundle_id
    staging = root / "releases" / f"{bundle_id}.partial"
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
        assert h._held_by(str(tmp_path), "op-a") and not h._held_by(str(tmp_path), "op-b")
    assert not h._held_by(str(tmp_path), "op-a")  # released


def test_a_dead_holder_frees_the_lock_and_its_processes_end(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(HELPER), "lock", str(tmp_path), "op-dead", "{}", "30"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert json.loads(proc.stdout.readline())["ok"]
    # The operation started a long command in its own process group and recorded it (as deploy does).
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (tmp_path / ".ops" / "op-dead.pids").write_text(f"{child.pid}\n")
    proc.stdin.close()  # the SSH channel closes: the link dropped or the local edgepack died
    proc.wait(timeout=30)
    assert child.wait(timeout=10) != 0  # ended with its holder, not left running
    with holding(tmp_path, "op-next"):
        assert h._held_by(str(tmp_path), "op-next")


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
        os.rename(staging, tmp_path / "releases" / f"{bundle_id}.partial")
        pub = h.publish(root, "op-1", bundle_id)
        assert pub["folder"] == f"{bundle_id}.2" and (live / ".venv").is_dir()
        assert os.readlink(tmp_path / "current") == f"releases/{bundle_id}"
        assert h.switch(root, "op-1", pub["folder"])["ok"]
        # Now the bad copy is only the rollback target... still in use, so a third copy goes to .3.
        _, staging = release(tmp_path / "third", "a")
        os.rename(staging, tmp_path / "releases" / f"{bundle_id}.partial")
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
    os.rename(staging, root / "releases" / f"{bundle_id}.partial")
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
    os.rename(staging, root / "releases" / f"{bundle_id}.partial")
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
