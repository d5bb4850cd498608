"""Fleets (issue #14, started): several real sshd "devices" on loopback, an Ansible inventory read by ansible-core,
`status --inventory` across them; host keys as strict as for one device."""

from __future__ import annotations

import json
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
