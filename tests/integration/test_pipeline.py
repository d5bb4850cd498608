"""For build pipelines (issue #13): one reproducible archive, the SBOM, denied licenses, archives deployed and
refused, on real builds of the tiny Llama and the loopback sshd."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from ..conftest import cli, envelope, needs_onnx, needs_sshd

pytestmark = [pytest.mark.integration, needs_onnx]


def sha256(path: Path) -> str:
    from edgepack.fsutil import sha256_file

    return sha256_file(path)


def test_the_same_inputs_give_byte_identical_archives(tiny_model: Path, tiny_target: Path, tmp_path: Path) -> None:
    """The same model and target built into different folders, packed in other folders: the same bytes."""
    bundles = []
    for i in range(2):
        proc = cli("-q", "--json", "build", "--target", str(tiny_target), str(tiny_model), "--out",
                   str(tmp_path / f"build{i}"), "--no-wheels")
        assert proc.returncode == 0, proc.stderr[-2000:]
        bundles.append(Path(envelope(proc)["result"]["bundle"]))
    a, again = bundles
    shas = set()
    for i, bundle in enumerate((a, again, a)):
        out = tmp_path / f"out{i}" / "bundle.tar.gz"
        res = envelope(cli("--json", "pack", str(bundle), "--out", str(out)))["result"]
        assert res["sha256"] == sha256(out) and res["bundle_id"] == json.loads(
            (a / "edgepack.json").read_text())["bundle_id"]
        shas.add(res["sha256"])
    assert len(shas) == 1
    zst = [envelope(cli("--json", "pack", str(b), "--out", str(tmp_path / f"z{i}.tar.zst")))["result"]["sha256"]
           for i, b in enumerate((a, again))]
    assert zst[0] == zst[1]
    with tarfile.open(tmp_path / "out0" / "bundle.tar.gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)  # sorted, one top folder
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 0)}
    assert not any(".venv" in m.name or "__pycache__" in m.name for m in members)
    raw = (tmp_path / "out0" / "bundle.tar.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # no gzip header timestamp
    epoch = envelope(cli("--json", "pack", str(a), "--out", str(tmp_path / "e.tar.gz"),
                         env={"SOURCE_DATE_EPOCH": "1700000000"}))["result"]
    with tarfile.open(epoch["archive"]) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}


def test_sbom_validates_and_lists_model_wheels_and_licenses(tiny_bundles: tuple[Path, Path]) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    bundle = tiny_bundles[0]
    text = (bundle / "sbom.cdx.json").read_text()
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert errors is None, errors
    bom = json.loads(text)
    m = json.loads((bundle / "edgepack.json").read_text())
    by_type: dict[str, list[dict]] = {}
    for c in bom["components"]:
        by_type.setdefault(c["type"], []).append(c)
    (model,) = by_type["machine-learning-model"]
    assert model["hashes"][0]["content"] == m["model"]["weights_sha256"]
    assert {p["name"]: p["value"] for p in model["properties"]}["edgepack:scheme"] == m["export"]["scheme"]
    libs = {c["name"]: c for c in by_type["library"]}
    lock = {w["name"].lower().replace("_", "-"): w for w in m["runtime"]["wheel_lock"]}
    assert set(libs) == set(lock) and all(libs[n]["hashes"][0]["content"] == w["sha256"] for n, w in lock.items())
    assert libs["onnxruntime-genai"]["licenses"] == [{"license": {"id": "MIT"}}]
    assert any(f["path"] == "sbom.cdx.json" for f in m["files"])  # listed, hashed and signed like every file
    shown = envelope(cli("--json", "inspect", str(bundle)))["result"]["licenses"]
    assert "onnxruntime-genai 0.18.0" in shown["MIT"]


def test_a_denied_license_fails_the_build_naming_the_component(tiny_model: Path, tiny_target: Path,
                                                               tmp_path: Path) -> None:
    target = tmp_path / "strict.toml"
    target.write_text(tiny_target.read_text() + '\n[bundle]\ndeny_licenses = ["MIT"]\n')
    proc = cli("--json", "build", "--target", str(target), str(tiny_model), "--out", str(tmp_path / "dist"))
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["code"] == "license_denied", err
    assert "MIT" in err["license"].split() and err["component"] in err["components"]
    assert "deny_licenses has MIT" in err["message"]
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def evil_archive(path: Path, name: str, kind: bytes = tarfile.REGTYPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("b/edgepack.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        bad = tarfile.TarInfo(name)
        bad.type = kind
        if kind == tarfile.SYMTYPE:
            bad.linkname = "/etc/passwd"
        else:
            bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(("name", "kind", "why"), [
    ("b/../../evil", tarfile.REGTYPE, "'..'"), ("/tmp/evil-abs", tarfile.REGTYPE, "absolute"),
    ("b/link", tarfile.SYMTYPE, "a link"), ("b/dev", tarfile.CHRTYPE, "a device"),
])
def test_an_unsafe_archive_is_refused_before_anything_is_written(tmp_path: Path, name: str, kind: bytes,
                                                                 why: str) -> None:
    archive = evil_archive(tmp_path / "x" / "evil.tar.gz", name, kind)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args in (["inspect", str(archive)], ["run", str(archive), "--prompt", "hi"]):
        proc = cli("--json", *args)
        err = envelope(proc)["error"]
        assert proc.returncode == 1 and err["code"] == "archive_unsafe" and why in err["message"], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and not Path("/tmp/evil-abs").exists()


@needs_sshd
def test_a_packed_archive_deploys_as_the_folder_does(tiny_bundles: tuple[Path, Path], device: dict,
                                                     tmp_path: Path) -> None:
    a = tiny_bundles[0]
    archive = Path(envelope(cli("--json", "pack", str(a), "--out", str(tmp_path / "a.tar.zst")))["result"]["archive"])
    proc = cli("--json", "deploy", str(archive), *device["args"])
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = doc["result"]
    assert res["bundle_id"] == json.loads((a / "edgepack.json").read_text())["bundle_id"] and res["smoke"]["ok"]
    assert (Path(device["install_dir"]) / "current").is_symlink()
    # Signed as an archive: packed again with its signature, and deploy --require-signature takes it.
    key = tmp_path / "k"
    assert cli("keygen", "--out", str(key)).returncode == 0
    signed = envelope(cli("--json", "sign", str(archive), "--key", str(key)))
    assert signed["ok"], signed
    shown = envelope(cli("--json", "inspect", str(archive), "--trusted-key", f"{key}.pub"))["result"]
    assert shown["signature"].startswith("signed by key " + signed["result"]["key_id"])
    proc = cli("--json", "deploy", str(archive), *device["args"], "--require-signature", f"{key}.pub")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cold_twice_in_parallel_then_warm_give_one_archive_and_the_cache_says_so(tiny_model: Path, tiny_target: Path,
                                                                                 tmp_path: Path) -> None:
    """Two builds race on an empty cache (both publish the same entries; neither sees half of one), a third reuses
    them: three output folders, one archive sha256. A changed tolerance re-judges without exporting again."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = {**os.environ, "EDGEPACK_CACHE": str(cache)}

    def build(out: str, *extra: str, target: Path = tiny_target) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "edgepack", "-q", "--json", "build", "--target", str(target),
                                 str(tiny_model), "--out", str(tmp_path / out), "--no-wheels", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def done(p: subprocess.Popen[str]) -> dict:
        stdout, stderr = p.communicate(timeout=900)
        doc = json.loads(stdout)
        assert p.returncode == 0 or doc["error"], stderr[-2000:]
        return doc

    def cached(doc: dict) -> dict[str, bool]:
        return {s["name"]: bool(s["detail"].get("cached")) for s in doc["result"]["stages"]}

    racers = [done(p) for p in [build("cold1"), build("cold2")]]
    assert all(d["ok"] for d in racers), racers
    warm = done(build("warm"))
    assert cached(warm)["export"] and cached(warm)["validate"], warm["result"]["stages"]
    shas = {envelope(cli("--json", "pack", d["result"]["bundle"], "--out", str(tmp_path / f"{i}.tar.gz")))["result"]
            ["sha256"] for i, d in enumerate([*racers, warm])}
    assert len(shas) == 1
    assert not list((cache / "exports").glob(".*")) and len(list((cache / "exports").iterdir())) == 1
    # A tolerance changed: the cached measurements are judged again, nothing is exported or scored again.
    strict = tmp_path / "strict.toml"
    strict.write_text(tiny_target.read_text().replace("max_ppl_increase_pct = 50.0", "max_ppl_increase_pct = 0.001"))
    refused = done(build("strict", target=strict))
    assert refused["error"]["code"] == "quality_gate_failed" and "perplexity" in refused["error"]["message"]
    assert "> allowed +0.0%" in refused["error"]["message"]
    fresh = done(build("fresh", "--no-cache"))
    assert not any(cached(fresh).values())
    listed = envelope(cli("--json", "cache", "ls", "--kind", "exports", env={"EDGEPACK_CACHE": str(cache)}))
    assert [e["kind"] for e in listed["result"]["entries"]] == ["exports"]
    cleared = envelope(cli("--json", "cache", "clear", "--kind", "exports", env={"EDGEPACK_CACHE": str(cache)}))
    assert len(cleared["result"]["removed"]) == 1 and cleared["result"]["bytes_freed"] > 0
    assert not any((cache / "exports").iterdir()) and any((cache / "gates").iterdir())


def test_a_build_prints_only_its_own_progress_and_logs_the_tools(tiny_model: Path, tiny_target: Path,
                                                                 tmp_path: Path) -> None:
    """A cold build imports torch and transformers and runs the builder: their warnings and bars go to a log under
    the cache dir, stderr has edgepack's stage lines only (and --verbose shows the tools' output)."""
    import re

    env = {"EDGEPACK_CACHE": str(tmp_path / "cache")}
    proc = cli("build", "--target", str(tiny_target), str(tiny_model), "--out", str(tmp_path / "d"), "--no-wheels",
               env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines and all(re.match(r"^\[ *\d+\.\ds\] [a-z-]+: ", line) for line in lines), lines
    logs = list((tmp_path / "cache" / "logs").glob("build-*.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    loud = cli("-v", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(tmp_path / "v"),
               "--no-wheels", "--no-cache", env={"EDGEPACK_CACHE": str(tmp_path / "cache2")})
    assert loud.returncode == 0 and any(not re.match(r"^\[ *\d+\.\ds\] ", line) for line in loud.stderr.splitlines())
