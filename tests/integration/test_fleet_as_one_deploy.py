"""Issue #22, part 6: a rollout sees a board as `edgepack deploy --host` does: the same known_hosts file (whatever
HOME is) and the same Python on the board. Real sshd boards on loopback, real Ansible; test_fleet.py's helpers and
the session's tiny bundles."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import cli, envelope, has, needs_onnx, needs_sshd
from ..sshd import SSHServer, make_server
from .test_fleet import ANSIBLE_PYTHON, bundle_id, rollout, rows

pytestmark = [pytest.mark.integration, needs_onnx, needs_sshd,
              pytest.mark.skipif(not has("ansible"), reason="needs the [fleet] extra (ansible-core)")]


def one_deploy(board: SSHServer, bundle: Path, install: Path, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edgepack deploy --host` to one board: what a rollout must see the board as."""
    return cli("--json", "deploy", str(bundle), "--host", board.address, "--port", str(board.port), "--user", "root",
               "--identity", str(board.user_key), "--install-dir", str(install), *args, env=env)


def inventory_line(board: SSHServer, install: Path) -> str:
    return (f"board ansible_host={board.address} ansible_port={board.port} ansible_user=root "
            f"ansible_ssh_private_key_file={board.user_key} edgepack_install_dir={install}")


def current(install: Path) -> str:
    return os.readlink(install / "current").split("/")[-1]


def test_a_rollout_checks_host_keys_in_the_known_hosts_one_deploy_reads_whatever_home_is(
        tiny_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    """A CI job's HOME is not the passwd entry's home. `deploy --host` reads $HOME/.ssh/known_hosts and Ansible's
    OpenSSH read the passwd home's, so a board one deploy accepted failed host_key_unknown in a rollout. Both read
    the same file now, without --known-hosts, and both stay strict."""
    import pwd
    import tempfile

    a, b = tiny_bundles
    board = make_server(tmp_path / "sshd")
    board.start()
    install = tmp_path / "board" / "edgepack"
    inv = tmp_path / "inventory.ini"
    inv.write_text(f"[boards]\n{inventory_line(board, install)}\n")
    # HOMEs of a CI job's length: Ansible's ssh ControlPath (~/.ansible/cp/...) must fit a Unix socket's name
    try:
        with tempfile.TemporaryDirectory(prefix="ci-home-") as h, tempfile.TemporaryDirectory(prefix="ci-home-") as o:
            home, other = Path(h), Path(o)
            assert home != Path(pwd.getpwuid(os.getuid()).pw_dir)
            (home / ".ssh").mkdir()
            (home / ".ssh" / "known_hosts").write_text(board.host_key_line())
            proc = one_deploy(board, a, install, env={"HOME": str(home)})
            assert proc.returncode == 0, envelope(proc)["error"]
            proc = cli("--json", "deploy", "--inventory", str(inv), str(b), env={"HOME": str(home)})
            doc = envelope(proc)
            assert proc.returncode == 0, doc["error"]
            assert rows(doc)["board"]["state"] == "done" and current(install) == bundle_id(b)
            assert (home / ".ssh" / "known_hosts").read_text() == board.host_key_line()

            # A HOME whose known_hosts does not have the board: both refuse it, and neither adds it.
            (other / ".ssh").mkdir()
            proc = one_deploy(board, a, install, env={"HOME": str(other)})
            assert proc.returncode == 1 and envelope(proc)["error"]["code"] == "host_key_unknown"
            proc = cli("--json", "deploy", "--inventory", str(inv), str(a), env={"HOME": str(other)})
            doc = envelope(proc)
            assert proc.returncode == 1 and rows(doc)["board"]["error"]["code"] == "host_key_unknown", doc["error"]
            assert current(install) == bundle_id(b) and not (other / ".ssh" / "known_hosts").exists()
    finally:
        board.stop()


# A pyenv shim of a Python that is not installed, as pyenv writes it: found on PATH, fails when run.
PYENV_SHIM = '#!/bin/sh\necho "pyenv: $(basename "$0"): command not found" >&2\nexit 127\n'


def test_ansibles_modules_run_on_the_python_one_deploy_uses(tiny_bundles: tuple[Path, Path], tmp_path: Path) -> None:
    """On a board with pyenv, Ansible's interpreter discovery picked a `python3.13` shim of a Python that was not
    installed (stage_failed: "No start of json char found pyenv: python3.13: command not found") where `deploy
    --host` worked. The role runs Ansible's modules on the `python3` the helper runs on; an inventory's
    ansible_python_interpreter still wins. The board: its own home (no shell rc) and a PATH that starts with
    pyenv-style shims, `python3` a working one."""
    a, b = tiny_bundles
    home = tmp_path / "board-home"
    shims = home / ".pyenv" / "shims"
    shims.mkdir(parents=True)
    (shims / "python3.13").write_text(PYENV_SHIM)
    (shims / "python3").write_text(f'#!/bin/sh\nexec {ANSIBLE_PYTHON} "$@"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    board = make_server(tmp_path / "sshd", env={"HOME": str(home), "PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin"})
    board.start()
    try:
        kh = tmp_path / "known_hosts"
        kh.write_text(board.host_key_line())
        install = tmp_path / "board" / "edgepack"
        proc = one_deploy(board, a, install, "--known-hosts", str(kh))
        assert proc.returncode == 0, envelope(proc)["error"]
        inv = tmp_path / "inventory.ini"
        # Discovery, as before (the inventory's value wins over the role's): the shim, and the board's failure.
        inv.write_text(f"[boards]\n{inventory_line(board, install)} ansible_python_interpreter=auto_silent\n")
        proc, doc = rollout(inv, kh, b)
        row = rows(doc)["board"]
        assert proc.returncode == 1 and row["error"]["code"] == "stage_failed", doc["error"]
        assert "python3.13: command not found" in row["error"]["message"]
        inv.write_text(f"[boards]\n{inventory_line(board, install)}\n")  # the role's default: the helper's python3
        proc, doc = rollout(inv, kh, b)
        assert proc.returncode == 0, doc["error"]
        assert rows(doc)["board"]["state"] == "done" and current(install) == bundle_id(b)
    finally:
        board.stop()
