"""Fleets (issue #14): real sshd "devices" on loopback, an Ansible inventory read by ansible-core, `status
--inventory` across them, rollouts of edgepack's own playbook through ansible-runner and by plain ansible-playbook,
canary halts and --max-fail, rollback in batches; host keys as strict as for one device. Issue #20: the controller
runs nothing that came in a bundle, and sends nothing a device names that its manifest does not list."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import cli, envelope, has, needs_onnx, needs_sshd

pytestmark = [pytest.mark.integration, needs_onnx, needs_sshd,
              pytest.mark.skipif(not has("ansible"), reason="needs the [fleet] extra (ansible-core)")]


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    from ..sshd import make_server

    servers = [make_server(tmp_path_factory.mktemp(f"board{i}")) for i in range(3)]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


def inventory(boards: list, tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    lines = ["[boards]"]
    for i, s in enumerate(boards):
        lines.append(f"board{i} ansible_host={s.address} ansible_port={s.port} ansible_user=root "
                     f"ansible_ssh_private_key_file={s.user_key} edgepack_install_dir={tmp_path}/home{i}/edgepack")
    inv = tmp_path / "inventory.ini"
    inv.write_text("\n".join(lines) + "\n" + extra)
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(s.host_key_line() for s in boards))
    return inv, kh


def test_status_of_every_inventory_host_in_order(boards: list, tiny_bundles: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    inv, kh = inventory(boards, tmp_path)
    a = tiny_bundles[0]
    for i in (0, 1):  # two boards run the bundle, the third has nothing yet
        s = boards[i]
        proc = cli("--json", "deploy", str(a), "--host", s.address, "--port", str(s.port), "--user", "root",
                   "--identity", str(s.user_key), "--known-hosts", str(kh),
                   "--install-dir", f"{tmp_path}/home{i}/edgepack")
        assert proc.returncode == 0, proc.stderr[-2000:]
    bundle_id = json.loads((a / "edgepack.json").read_text())["bundle_id"]
    proc = cli("--json", "status", "--inventory", str(inv), "--known-hosts", str(kh))
    doc = envelope(proc)
    assert proc.returncode == 0, doc["error"]
    rows = doc["result"]["hosts"]
    assert [r["name"] for r in rows] == ["board0", "board1", "board2"]
    assert [r["current"] for r in rows] == [bundle_id] * 2 + [None]
    assert all(r["ok"] for r in rows)
    human = cli("status", "--inventory", str(inv), "--known-hosts", str(kh), "--limit", "board1:board2")
    assert human.returncode == 0 and "board1" in human.stdout and "board0" not in human.stdout


def test_an_unreachable_or_unknown_host_is_its_own_row_and_fails_the_command(boards: list, tmp_path: Path) -> None:
    from ..sshd import make_server

    stranger = make_server(tmp_path / "stranger")  # a board whose host key nobody checked
    stranger.start()
    try:
        inv, kh = inventory(boards, tmp_path, extra=(
            f"ghost ansible_host=127.0.0.1 ansible_port=1 ansible_user=root\n"
            f"stranger ansible_host=127.0.0.1 ansible_port={stranger.port} ansible_user=root "
            f"ansible_ssh_private_key_file={stranger.user_key}\n"))
        proc = cli("--json", "status", "--inventory", str(inv), "--known-hosts", str(kh), "--connect-timeout", "5")
        err = envelope(proc)["error"]
        assert proc.returncode == 1 and err["code"] == "fleet_hosts_failed" and set(err["failed"]) == {"ghost",
                                                                                                      "stranger"}
        by = {r["name"]: r for r in err["hosts"]}
        assert by["ghost"]["error"]["code"] == "ssh_unreachable"
        assert by["stranger"]["error"]["code"] == "host_key_unknown"  # never accepted silently
        assert all(by[f"board{i}"]["ok"] for i in range(3))
        assert f"[127.0.0.1]:{stranger.port}" not in kh.read_text()
    finally:
        stranger.stop()


def test_inventory_errors_are_clear(tmp_path: Path) -> None:
    proc = cli("--json", "status", "--inventory", str(tmp_path / "nope.ini"))
    assert proc.returncode == 1 and "does not exist" in envelope(proc)["error"]["message"]
    proc = cli("--json", "status")
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "usage"


# -- rollouts ---------------------------------------------------------------------------------------------

# One board's runtime dies running one bundle's smoke test, as on a CPU that lacks an instruction the runtime
# uses: its sshd sessions import this sitecustomize (PYTHONPATH, set by the server), nothing else differs.
BROKEN_RUNTIME = """import os, sys
if sys.argv and sys.argv[0].endswith("smoke_test.py") and os.environ.get("EDGEPACK_TEST_BROKEN", "?") in sys.argv[0]:
    sys.stderr.write("Illegal instruction (core dumped)\\n")
    sys.stderr.flush()
    os._exit(132)
"""
ANSIBLE_PYTHON = os.path.realpath(sys.executable)  # a Python that runs Ansible's modules and edgepack's helper


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_bundles: tuple[Path, Path]) -> Iterator[list]:
    """Five boards; dev4's runtime dies on bundle B's smoke test (and passes A's)."""
    from ..sshd import make_server

    root = tmp_path_factory.mktemp("fleet")
    broken = root / "broken-runtime"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(BROKEN_RUNTIME)
    b_id = json.loads((tiny_bundles[1] / "edgepack.json").read_text())["bundle_id"]
    servers = [make_server(root / f"dev{i}", env={"PYTHONPATH": str(broken), "EDGEPACK_TEST_BROKEN": b_id}
                           if i == 4 else None) for i in range(5)]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


def fleet_inventory(servers: list, order: list[int], where: Path, name: str = "inventory.ini") -> tuple[Path, Path]:
    """An INI inventory of the boards in `order` (the first is the canary), install dirs under `where`."""
    lines = ["[boards]"] + [
        f"dev{i} ansible_host={servers[i].address} ansible_port={servers[i].port} ansible_user=root "
        f"ansible_ssh_private_key_file={servers[i].user_key} edgepack_install_dir={where}/dev{i}/edgepack"
        for i in order]  # no ansible_python_interpreter: the role's python3, as for one deploy
    inv = where / name
    inv.write_text("\n".join(lines) + "\n")
    kh = where / "known_hosts"
    kh.write_text("".join(s.host_key_line() for s in servers))
    return inv, kh


def rollout(inv: Path, kh: Path, bundle: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    proc = cli("--json", "deploy", "--inventory", str(inv), "--known-hosts", str(kh), str(bundle), *args)
    return proc, envelope(proc)


def rows(doc: dict) -> dict[str, dict]:
    body = doc["result"] if doc["ok"] else doc["error"]
    return {r["name"]: r for r in body["hosts"]}


def current_of(where: Path, i: int) -> str | None:
    link = where / f"dev{i}" / "edgepack" / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def bundle_id(bundle: Path) -> str:
    return str(json.loads((bundle / "edgepack.json").read_text())["bundle_id"])


def test_a_failing_canary_halts_the_rollout_and_a_later_failure_within_max_fail_does_not(
        fleet: list, tiny_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = tiny_bundles
    inv, kh = fleet_inventory(fleet, [4, 0, 1, 2, 3], tmp_path)
    proc, doc = rollout(inv, kh, a, "--canary", "0", "--batch", "100%", "--forks", "5")  # one batch, all at once
    assert proc.returncode == 0, doc["error"]
    assert [r["state"] for r in rows(doc).values()] == ["done"] * 5 and doc["result"]["batches"] == [
        ["dev4", "dev0", "dev1", "dev2", "dev3"]]
    assert all(current_of(tmp_path, i) == bundle_id(a) for i in range(5))
    assert "batch 1 of 1: dev4, dev0" in proc.stderr and "dev4: current → releases/" in proc.stderr

    # B's canary (dev4) fails its smoke test: the rollout halts, dev4 keeps A, nobody else is touched.
    proc, doc = rollout(inv, kh, b, "--canary", "1", "--batch", "2")
    err = doc["error"]
    assert proc.returncode == 1 and err["code"] == "fleet_rollout_halted" and err["halted"] is True
    assert "dev4 failed" in err["message"] and err["failed"] == ["dev4"]
    dev4 = rows(doc)["dev4"]
    assert dev4["state"] == "failed" and dev4["error"]["code"] == "smoke_test_failed"
    assert "Illegal instruction" in json.dumps(dev4["evidence"])  # the device's own evidence
    assert dev4["current"] == bundle_id(a) and dev4["switched"] is False
    assert [rows(doc)[f"dev{i}"]["state"] for i in range(4)] == ["not_started"] * 4
    assert all(current_of(tmp_path, i) == bundle_id(a) for i in range(5))
    assert not any((tmp_path / f"dev{i}" / "edgepack" / "releases" / bundle_id(b)).exists() for i in range(4))

    # dev4 in the second batch of two, --max-fail 50%: one failure of two is 50%, not more, so the rollout goes
    # on through the last batch and ends non-zero, naming dev4.
    inv2, _ = fleet_inventory(fleet, [0, 4, 1, 2, 3], tmp_path, name="inventory2.ini")
    proc, doc = rollout(inv2, kh, b, "--canary", "1", "--batch", "2", "--max-fail", "50%")
    err = doc["error"]
    assert proc.returncode == 1 and err["code"] == "fleet_hosts_failed" and err["halted"] is False, err["message"]
    assert err["failed"] == ["dev4"] and rows(doc)["dev4"]["batch"] == 2
    assert [current_of(tmp_path, i) for i in range(5)] == [bundle_id(b)] * 4 + [bundle_id(a)]
    assert all(r["smoke"]["ok"] for n, r in rows(doc).items() if n != "dev4")
    # B shares its wheels with A: only its model and the files that differ went over the link
    sent = rows(doc)["dev0"]["uploaded_bytes"]
    assert 0 < sent < 0.1 * sum(f["bytes"] for f in json.loads((b / "edgepack.json").read_text())["files"])

    # Roll the four back in batches: A again; dev4 (on A, with nothing before it) has nothing to go back to.
    proc = cli("--json", "rollback", "--inventory", str(inv2), "--known-hosts", str(kh),
               "--limit", "dev0:dev1:dev2:dev3", "--batch", "3")
    doc = envelope(proc)
    assert proc.returncode == 0, doc["error"]
    assert [current_of(tmp_path, i) for i in range(5)] == [bundle_id(a)] * 5
    st = envelope(cli("--json", "status", "--inventory", str(inv2), "--known-hosts", str(kh)))
    assert [r["current"] for r in st["result"]["hosts"]] == [bundle_id(a)] * 5


def device_state(install: Path) -> dict:
    """What a deploy leaves on a device, comparable across install dirs: pointers, history, releases and the
    sha256 of every file of the current release (its venv's own files aside)."""
    cur = install / "current"
    files = {}
    for f in sorted(cur.resolve().rglob("*")):
        rel = f.relative_to(cur.resolve()).as_posix()
        if f.is_file() and not rel.startswith((".venv/", ".cache/")) and "__pycache__" not in rel:
            files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return {"current": os.readlink(cur), "history": (install / "history").read_text(),
            "releases": sorted(p.name for p in (install / "releases").iterdir()),
            "installed": (cur / ".venv" / ".edgepack-installed").is_file(), "files": files}


def ansible_playbook(inv: Path, kh: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_SSH_COMMON_ARGS": f"-o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes"}
    playbook = shutil.which("ansible-playbook") or str(Path(sys.executable).parent / "ansible-playbook")
    return subprocess.run([playbook, "-i", str(inv), *map(str, args)], capture_output=True, text=True, env=env,
                          check=False, timeout=900)


def test_plain_ansible_playbook_leaves_the_same_state_and_a_runner_change_sends_under_one_percent(
        fleet: list, tiny_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    a = tiny_bundles[0]
    inv, kh = fleet_inventory(fleet, [0, 1, 2, 3], tmp_path)
    # edgepack's own role, written once (`edgepack ansible-role`); then the operator's own ansible-playbook and flags,
    # the bundle given as data.
    role = tmp_path / "ops"
    assert cli("ansible-role", "--out", str(role)).returncode == 0
    plain = ansible_playbook(inv, kh, role / "deploy.yml", "--limit", "dev0:dev1", "-e", f"edgepack_bundle={a}",
                             "-e", '{"edgepack_serial": [1, "50%"]}')
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert "smoke test passed" in plain.stdout
    proc, doc = rollout(inv, kh, a, "--limit", "dev2:dev3")
    assert proc.returncode == 0, doc["error"]
    states = [device_state(tmp_path / f"dev{i}" / "edgepack") for i in range(4)]
    assert states[0]["installed"] and states[0]["files"]
    assert all(s == states[0] for s in states), "plain ansible-playbook and edgepack left different devices"

    # A release whose runner changed and nothing else: what the devices have is linked, not sent.
    a2 = tmp_path / "a2"
    shutil.copytree(a, a2)
    runner = a2 / "edgepack_runner.py"
    runner.write_text(runner.read_text() + "\n# a runner fix\n")
    from edgepack.bundle import write_manifest

    write_manifest(a2, json.loads((a / "edgepack.json").read_text()))
    proc, doc = rollout(inv, kh, a2, "--limit", "dev2:dev3", "--batch", "100%")
    assert proc.returncode == 0, doc["error"]
    total = sum(f["bytes"] for f in json.loads((a2 / "edgepack.json").read_text())["files"])
    for r in doc["result"]["hosts"]:
        assert r["current"] == bundle_id(a2) and r["uploaded_files"] == 2  # the runner and the manifest
        assert r["uploaded_bytes"] < 0.01 * total, (r["uploaded_bytes"], total)
    human = cli("deploy", "--inventory", str(inv), "--known-hosts", str(kh), str(a2), "--limit", "dev3")
    assert human.returncode == 0 and "dev3" in human.stdout and "done" in human.stdout


def test_a_rollout_never_accepts_an_unknown_host_key(fleet: list, tiny_bundles: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    from ..sshd import make_server

    stranger = make_server(tmp_path / "stranger")
    stranger.start()
    try:
        inv, kh = fleet_inventory(fleet, [0], tmp_path)
        inv.write_text(inv.read_text().replace("[boards]\n", f"[boards]\nstranger ansible_host=127.0.0.1 "
                                                              f"ansible_port={stranger.port} ansible_user=root "
                                                              f"ansible_ssh_private_key_file={stranger.user_key}\n"))
        before = kh.read_text()
        proc, doc = rollout(inv, kh, tiny_bundles[0])
        err = doc["error"]
        assert proc.returncode == 1 and err["code"] == "fleet_rollout_halted"
        assert rows(doc)["stranger"]["state"] == "unreachable"
        assert rows(doc)["stranger"]["error"]["code"] == "host_key_unknown"
        assert rows(doc)["dev0"]["state"] == "not_started" and current_of(tmp_path, 0) is None
        assert kh.read_text() == before
        human = cli("deploy", "--inventory", str(inv), "--known-hosts", str(kh), str(tiny_bundles[0]))
        assert human.returncode == 1 and "halted in batch 1" in human.stderr
        table = {line.split()[0]: line.split()[2] for line in human.stderr.splitlines()
                 if line.startswith(("stranger ", "dev0 "))}
        assert table == {"stranger": "unreachable", "dev0": "not_started"}  # every host's row, for people too
    finally:
        stranger.stop()


ANSIBLE_LINT = shutil.which("ansible-lint") or str(Path(sys.executable).parent / "ansible-lint")


@pytest.mark.skipif(not Path(ANSIBLE_LINT).exists(), reason="needs ansible-lint ([dev] extra)")
def test_edgepacks_role_passes_ansible_lint(tmp_path: Path) -> None:
    assert cli("ansible-role", "--out", str(tmp_path / "ansible")).returncode == 0
    proc = subprocess.run([ANSIBLE_LINT, "--profile", "production", "--offline", "ansible"], cwd=tmp_path,
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# A compromised device: its Python (every session imports this sitecustomize, as for BROKEN_RUNTIME) runs
# edgepack's helper for `stage`, then answers with a forged document instead.
FORGING_DEVICE = """import io, os, sys
if sys.argv[:2] == ["-", "stage"] and os.environ.get("EDGEPACK_TEST_FORGED"):
    helper, real = sys.stdin.read(), sys.stdout
    sys.stdout = io.StringIO()
    try:
        exec(compile(helper, "device_helper", "exec"), {"__name__": "__main__"})
    except SystemExit:
        pass
    with open(os.environ["EDGEPACK_TEST_FORGED"]) as fh:
        real.write(fh.read().replace("@DIR@", sys.argv[2]).replace("@ID@", sys.argv[3]) + "\\n")
    real.flush()
    os._exit(0)
"""


def test_a_device_that_names_the_controllers_files_gets_none_of_them(fleet: list, tiny_bundles: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """Issue #20, finding 2: a device answered `stage` with `../..` paths and the controller sent its minisign
    secret key (one `copy` each for large files, its own tar for small ones). The files sent are chosen from the
    manifest and the device's folders are checked: the host fails before anything is sent."""
    from ..sshd import make_server

    ctl = tmp_path / "ctl"  # the controller: a bundle, and a secret two folders above it
    shutil.copytree(tiny_bundles[0], ctl / "dist" / "a")
    secret = ctl / "minisign.key"
    secret.write_text("untrusted comment: minisign encrypted secret key\nRWRTY0IyCONTROLLER-SECRET\n")
    dev = tmp_path / "dev"
    forged, site = dev / "forged.json", dev / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(FORGING_DEVICE)
    evil = make_server(dev / "sshd", env={"PYTHONPATH": str(site), "EDGEPACK_TEST_FORGED": str(forged)})
    evil.start()
    try:
        inv, kh = fleet_inventory(fleet, [0], tmp_path)
        inv.write_text(inv.read_text().replace("[boards]\n", f"[boards]\nevil ansible_host=127.0.0.1 "
                                               f"ansible_port={evil.port} ansible_user=root "
                                               f"ansible_ssh_private_key_file={evil.user_key} "
                                               f"ansible_python_interpreter={ANSIBLE_PYTHON} "
                                               f"edgepack_install_dir={dev}/edgepack\n"))
        kh.write_text(kh.read_text() + evil.host_key_line())
        answer = {"ok": True, "install_dir": "@DIR@", "bundle_id": "@ID@", "current": None, "present": None,
                  "staging": "@DIR@/.staging/@ID@@op-1", "staging_rel": ".staging/@ID@@op-1", "missing_bytes": 10,
                  "reused": 0, "reused_bytes": 0, "staged": 0,
                  "missing": [{"path": "../../minisign.key", "bytes": 10},  # into the controller's tar
                              {"path": "../../minisign.key", "bytes": 1 << 30}]}  # its own copy
        forged.write_text(json.dumps(answer))
        proc, doc = rollout(inv, kh, ctl / "dist" / "a", "--batch", "100%")
        err = doc["error"]
        assert proc.returncode == 1 and err["code"] == "fleet_rollout_halted", err
        row = rows(doc)["evil"]
        assert row["state"] == "failed" and row["error"]["code"] == "device_answer_invalid", row
        assert "../../minisign.key" in row["error"]["message"] and "does not list" in row["error"]["message"]
        assert rows(doc)["dev0"]["state"] == "not_started"

        # A staging folder outside the install dir, asking for a file the manifest does list: refused too.
        answer |= {"staging": f"{dev}/elsewhere", "missing": [{"path": "edgepack_runner.py", "bytes": 10}]}
        forged.write_text(json.dumps(answer))
        proc, doc = rollout(inv, kh, ctl / "dist" / "a", "--batch", "100%")
        row = rows(doc)["evil"]
        assert proc.returncode == 1 and row["error"]["code"] == "device_answer_invalid", row
        assert f"{dev}/elsewhere" in row["error"]["message"] and not (dev / "elsewhere").exists()

        # Plain ansible-playbook with edgepack's role: the same refusal, in Ansible's own words.
        forged.write_text(json.dumps(answer | {"staging": "@DIR@/.staging/@ID@@op-1",
                                               "staging_rel": ".staging/@ID@@op-1",
                                               "missing": [{"path": "../../minisign.key", "bytes": 10}]}))
        assert cli("ansible-role", "--out", str(tmp_path / "ops")).returncode == 0
        plain = ansible_playbook(inv, kh, tmp_path / "ops" / "deploy.yml", "--limit", "evil",
                                 "-e", f"edgepack_bundle={ctl / 'dist' / 'a'}")
        assert plain.returncode != 0 and "device_answer_invalid" in plain.stdout, plain.stdout[-3000:]

        leaked = [p for p in dev.rglob("*") if p.is_file() and b"CONTROLLER-SECRET" in p.read_bytes()]
        assert leaked == [], "the controller's secret key reached the device"
        assert current_of(tmp_path, 0) is None and not (dev / "edgepack" / "current").exists()
    finally:
        evil.stop()


def test_a_bundles_own_playbooks_never_run_on_the_controller(fleet: list, tiny_bundles: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    """Issue #20: `deploy --inventory` ran the bundle's ansible/deploy.yml, so a `delegate_to: localhost` task in an
    unsigned bundle ran on the controller. Bundles ship no playbooks now; one that brings its own (listed in its
    manifest, so it verifies) deploys with edgepack's role, and its tasks are only files on the device."""
    from edgepack.bundle import write_manifest

    marker = tmp_path / "ran-on-the-controller"
    evil = tmp_path / "evil"
    shutil.copytree(tiny_bundles[0], evil)
    task = [{"name": "Run on the controller", "ansible.builtin.command": f"touch {marker}",
             "delegate_to": "localhost"}]
    play = [{"name": "A bundle's own play", "hosts": "all", "gather_facts": False, "tasks": task,
             "roles": ["edgepack_release"]}]
    (evil / "ansible" / "roles" / "edgepack_release" / "tasks").mkdir(parents=True)
    (evil / "ansible" / "deploy.yml").write_text(json.dumps(play))
    (evil / "ansible" / "roles" / "edgepack_release" / "tasks" / "main.yml").write_text(json.dumps(task))
    write_manifest(evil, json.loads((tiny_bundles[0] / "edgepack.json").read_text()))
    inv, kh = fleet_inventory(fleet, [0], tmp_path)
    proc, doc = rollout(inv, kh, evil)
    assert proc.returncode == 0, doc["error"]
    assert not marker.exists(), "a task that came in the bundle ran on the controller"
    assert current_of(tmp_path, 0) == bundle_id(evil)
    release = tmp_path / "dev0" / "edgepack" / "current"
    assert (release / "ansible" / "deploy.yml").read_text() == (evil / "ansible" / "deploy.yml").read_text()


def test_rollout_options_are_checked_before_anything_connects(tiny_bundles: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    inv = tmp_path / "inventory.ini"
    inv.write_text("[boards]\nghost ansible_host=127.0.0.1 ansible_port=1\n")
    for args, what in ((["--batch", "ten"], "--batch"), (["--max-fail", "150%"], "--max-fail")):
        proc = cli("--json", "deploy", "--inventory", str(inv), str(tiny_bundles[0]), *args)
        err = envelope(proc)["error"]
        assert proc.returncode == 1 and err["code"] == "invalid_input" and what in err["message"]
    proc = cli("--json", "deploy", "--inventory", str(inv), "--host", "x", str(tiny_bundles[0]))
    assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "usage"


def test_a_yaml_inventory_with_groups_reads_like_the_ini_one(boards: list, tmp_path: Path) -> None:
    """The same boards as YAML, in two groups with a group variable: ansible-core reads it, inventory order holds."""
    import yaml

    hosts = {f"board{i}": {"ansible_host": s.address, "ansible_port": s.port,
                           "ansible_ssh_private_key_file": str(s.user_key),
                           "edgepack_install_dir": f"{tmp_path}/home{i}/edgepack"} for i, s in enumerate(boards)}
    doc = {"all": {"children": {
        "lab": {"hosts": {"board0": hosts["board0"]}, "vars": {"ansible_user": "root"}},
        "field": {"hosts": {n: hosts[n] for n in ("board1", "board2")}, "vars": {"ansible_user": "root"}}}}}
    inv = tmp_path / "inventory.yml"
    inv.write_text(yaml.safe_dump(doc, sort_keys=False))
    kh = tmp_path / "known_hosts"
    kh.write_text("".join(s.host_key_line() for s in boards))
    proc = cli("--json", "status", "--inventory", str(inv), "--known-hosts", str(kh), "--limit", "field")
    doc = envelope(proc)
    assert proc.returncode == 0, doc["error"]
    assert [r["name"] for r in doc["result"]["hosts"]] == ["board1", "board2"]
    assert all(r["ok"] and r["current"] is None for r in doc["result"]["hosts"])
