"""Issue #22, part 6: the fleet path sees a device as `edgepack deploy --host` does: the same known_hosts file
(--known-hosts, else the same default, whatever $HOME is) handed to Ansible's OpenSSH, and Ansible's modules on the
same `python3` (not one interpreter discovery picks), unless the inventory says otherwise."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ansible")

from edgepack.api import DeviceRequest  # noqa: E402
from edgepack.fleet import FleetHost, ansible_env, known_hosts_files, write_role  # noqa: E402
from edgepack.remote.ssh import Connection, SSHOptions  # noqa: E402


def host(name: str, addr: str = "10.0.0.1") -> FleetHost:
    return FleetHost(name=name, host=addr, port=None, user=None, identity=None, install_dir=None)


def ssh_args(env: dict[str, str]) -> list[str]:
    return shlex.split(env["ANSIBLE_SSH_COMMON_ARGS"])


def test_without_known_hosts_the_fleet_uses_homes_file_as_one_deploy_does(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "ci-home"  # not the passwd entry's home, which is what OpenSSH would read by itself
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    hosts = [host("a"), host("b", "10.0.0.2")]
    one = Connection(SSHOptions(host="10.0.0.1")).known_hosts  # what `edgepack deploy --host` checks
    assert one == home / ".ssh" / "known_hosts"
    assert known_hosts_files(hosts, DeviceRequest(host="")) == [one]
    args = ssh_args(ansible_env(DeviceRequest(host=""), hosts))
    assert f"UserKnownHostsFile={one}" in args and "StrictHostKeyChecking=yes" in args

    given = tmp_path / "kh"
    assert known_hosts_files(hosts, DeviceRequest(host="", known_hosts=given)) == [given.resolve()]
    assert Connection(SSHOptions(host="10.0.0.1", known_hosts=given)).known_hosts == given


def test_an_ssh_configs_user_known_hosts_file_is_read_per_host_as_one_deploy_reads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("paramiko")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host 10.0.0.2\n  UserKnownHostsFile ~/lab_hosts\n")
    hosts = [host("a"), host("b", "10.0.0.2"), host("c", "10.0.0.3")]
    singles = [Connection(SSHOptions(host=h.host)).known_hosts for h in hosts]
    assert singles == [tmp_path / ".ssh" / "known_hosts", tmp_path / "lab_hosts", tmp_path / ".ssh" / "known_hosts"]
    files = known_hosts_files(hosts, DeviceRequest(host=""))
    assert files == [tmp_path / ".ssh" / "known_hosts", tmp_path / "lab_hosts"]
    args = ssh_args(ansible_env(DeviceRequest(host="", accept_new_host_key=True), hosts))
    assert f"UserKnownHostsFile={files[0]} {files[1]}" in args and "StrictHostKeyChecking=accept-new" in args
    assert (tmp_path / ".ssh").is_dir()


def test_ansible_runs_modules_on_the_python3_the_helper_runs_on_unless_the_inventory_says(tmp_path: Path) -> None:
    """The role's default (the lowest precedence Ansible has): an inventory's host or group variable wins. Asked of
    ansible-playbook itself, with a task added to a copy of the role (debug connects to nothing)."""
    write_role(tmp_path / "ops")
    role = tmp_path / "ops" / "roles" / "edgepack_release"
    assert "argv:\n      - python3\n      - \"-\"" in (role / "tasks" / "main.yml").read_text()  # the helper's own
    (role / "tasks" / "show.yml").write_text(
        "- name: Show\n  ansible.builtin.debug:\n"
        "    msg: \"@ {{ inventory_hostname }} {{ ansible_python_interpreter }}\"\n")
    (tmp_path / "ops" / "show.yml").write_text(
        "- name: Show\n  hosts: all\n  gather_facts: false\n  tasks:\n    - name: Role\n"
        "      ansible.builtin.import_role:\n        name: edgepack_release\n        tasks_from: show\n")
    inv = tmp_path / "inventory.ini"
    inv.write_text("[boards]\nplain\npinned ansible_python_interpreter=/opt/py/bin/python3\n[lab]\ngrouped\n"
                   "[lab:vars]\nansible_python_interpreter=/usr/bin/python3.11\n")
    playbook = shutil.which("ansible-playbook") or str(Path(sys.executable).parent / "ansible-playbook")
    proc = subprocess.run([playbook, "-i", str(inv), str(tmp_path / "ops" / "show.yml")], capture_output=True,
                          text=True, check=False, timeout=120, env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = dict(m.groups() for m in re.finditer(r'"msg": "@ (\S+) (\S+)"', proc.stdout))
    assert got == {"plain": "python3", "pinned": "/opt/py/bin/python3", "grouped": "/usr/bin/python3.11"}
