"""The CI recipes in examples/ci run as written: every script step of the GitHub Actions workflow and the GitLab CI
jobs, and both targets of the Makefile fragment, on this machine against the loopback sshd, with the tiny model
for the matrix's model and target. The steps that only exist on a CI service (`uses:` actions, installing
edgepack, which is the thing under test here) are skipped; artifacts stay in the shared work folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT, cli, envelope, needs_onnx, needs_sshd

pytestmark = [pytest.mark.integration, needs_onnx, needs_sshd]
RECIPES = ROOT / "examples" / "ci"


@pytest.fixture()
def secrets(ssh_server, tiny_model: Path, tiny_target: Path, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    key = tmp_path / "keys" / "release.key"
    key.parent.mkdir()
    proc = cli("keygen", "--out", str(key), "--password-env", "EDGEPACK_KEY_PASSWORD",
               env={"EDGEPACK_KEY_PASSWORD": "ci-secret"})
    assert proc.returncode == 0, proc.stderr
    shutil.copy(key.with_name("release.key.pub"), key.with_name("release.pub"))
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MODEL": str(tiny_model), "TARGET": str(tiny_target),
        "BUNDLE_NAME": f"{tiny_model.name}-{tiny_target.stem}",
        "EDGEPACK_SIGNING_KEY": key.read_text(), "EDGEPACK_KEY_PASSWORD": "ci-secret",
        "EDGEPACK_PUBLIC_KEY": key.with_name("release.pub").read_text(),
        "DEPLOY_SSH_KEY": Path(ssh_server.user_key).read_text(), "DEPLOY_KNOWN_HOSTS": ssh_server.host_key_line(),
        "BOARD": ssh_server.address, "BOARD_USER": "root", "BOARD_PORT": str(ssh_server.port),
        "INSTALL_DIR": str(tmp_path / "board" / "edgepack"), "GITHUB_ENV": str(tmp_path / "github_env"),
        "keys": str(key.parent),
    }


def run_script(script: str, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def deployed(env: dict[str, str], work: Path) -> None:
    import json

    res = json.loads((work / "deploy.json").read_text())["result"]
    assert res["smoke"]["ok"] and res["signature"].startswith("verified")
    assert (Path(env["INSTALL_DIR"]) / "current").is_symlink()
    assert (work / "artifacts" / f"{env['BUNDLE_NAME']}.sbom.cdx.json").is_file()


def test_github_actions_workflow_steps(secrets: dict[str, str], tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load((RECIPES / "github-actions.yml").read_text())
    assert set(doc["jobs"]) == {"bundle", "deploy"} and doc["jobs"]["deploy"]["needs"] == "bundle"
    assert doc["jobs"]["bundle"]["strategy"]["matrix"]["target"] == ["rpi5", "rpi4", "jetson-orin-nano"]
    work = tmp_path / "gh"
    work.mkdir()
    ran = []
    for job in ("bundle", "deploy"):
        for step in doc["jobs"][job]["steps"]:
            if "run" not in step or step.get("name") == "Install edgepack":
                continue
            run_script(step["run"], work, secrets)
            ran.append(step.get("name"))
            if step["run"].lstrip().startswith("echo") and "GITHUB_ENV" in step["run"]:
                for line in Path(secrets["GITHUB_ENV"]).read_text().splitlines():
                    k, _, v = line.partition("=")
                    secrets = {**secrets, k: v}
    assert len(ran) == 3, ran
    deployed(secrets, work)
    # The archive is the one `pack` makes from the bundle: rebuilding and packing gives the same bytes.
    assert (work / "artifacts" / f"{secrets['BUNDLE_NAME']}.tar.gz").is_file()


def test_gitlab_ci_jobs(secrets: dict[str, str], tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load((RECIPES / "gitlab-ci.yml").read_text())
    assert doc["stages"] == ["bundle", "deploy"]
    work = tmp_path / "gl"
    work.mkdir()
    env = {**secrets, "CI_PROJECT_DIR": str(work)}
    env |= {k: os.path.expandvars(v).replace("$CI_PROJECT_DIR", str(work)) for k, v in doc["variables"].items()}
    for job in ("bundle", "deploy-board"):
        run_script("\n".join(doc[job]["script"]), work, env)
    assert (work / ".cache" / "edgepack" / "exports").is_dir()  # the job's cache: path is where edgepack keeps it
    deployed(env, work)


def test_makefile_fragment(secrets: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    work = tmp_path / "fw"
    (work / "keys").mkdir(parents=True)
    for name in ("release.key", "release.pub"):
        shutil.copy(Path(secrets["keys"]) / name, work / "keys" / name)
    key = work / "id_board"
    key.write_text(secrets["DEPLOY_SSH_KEY"])
    key.chmod(0o600)
    (work / "known_hosts").write_text(secrets["DEPLOY_KNOWN_HOSTS"])
    proc = subprocess.run(
        ["make", "-f", str(RECIPES / "firmware.mk"), "model-deploy", f"EDGEPACK_MODEL={secrets['MODEL']}",
         f"EDGEPACK_TARGET={secrets['TARGET']}", f"BOARD={secrets['BOARD']}", f"BOARD_PORT={secrets['BOARD_PORT']}",
         "BOARD_USER=root", f"BOARD_IDENTITY={key}", f"KNOWN_HOSTS={work / 'known_hosts'}",
         f"INSTALL_DIR={secrets['INSTALL_DIR']}"],
        cwd=work, env={**os.environ, "PATH": secrets["PATH"], "EDGEPACK_KEY_PASSWORD": "ci-secret"},
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    archive = work / "build" / "edgepack" / f"{secrets['BUNDLE_NAME']}.tar.gz"
    assert envelope(cli("--json", "inspect", str(archive), "--trusted-key", str(work / "keys" / "release.pub"))
                    )["result"]["signature"].startswith("signed by key")
    assert (Path(secrets["INSTALL_DIR"]) / "current").is_symlink()
