"""Issue #20, findings 9 and 10: the build cache hands out only what it recorded when it published (a zeroed export,
edited measurements or a swapped wheel are discarded and made again, never shipped), and wheels that come from a
package index (install.sh --allow-network, wheels re-fetched for another device Python) stay pinned by sha256.

The index is a real one on 127.0.0.1 serving a hostile mirror's files (tests/package_index.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgepack.bundle import LockedWheel
from edgepack.errors import UserError
from edgepack.progress import ProgressEvent

from ..conftest import build_ok, cli, envelope, needs_onnx
from ..package_index import make_wheel, package_index, publish

pytestmark = [pytest.mark.integration]

GENUINE = "VALUE = 'genuine'\n"
EVIL = "VALUE = 'evil'\n"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(model: Path, target: Path, out: Path, cache: Path) -> tuple[dict, str]:
    """One real `edgepack build` (no wheels) on `cache`: (the --json document, stderr with the progress lines)."""
    proc = cli("--json", "build", "--target", str(target), str(model), "--out", str(out), "--no-wheels",
               env={"EDGEPACK_CACHE": str(cache)})
    return envelope(proc), proc.stderr


def _cached(doc: dict) -> dict[str, bool]:
    return {s["name"]: bool(s["detail"].get("cached")) for s in doc["result"]["stages"]}


def _quality(doc: dict) -> tuple:
    q = doc["result"]["quality"]
    return q["ppl_quantized"], q["mean_kl"], q["top1_agreement"], q["greedy_match"]


@pytest.fixture(scope="module")
def cold(tiny_model: Path, tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One cold build into an empty cache: (the cache, the bundle, its --json document). Tests mutate copies."""
    root = tmp_path_factory.mktemp("cold")
    doc, err = _build(tiny_model, tiny_target, root / "dist", root / "cache")
    assert doc["ok"], err[-3000:]
    assert not any(_cached(doc).values())
    return root / "cache", Path(doc["result"]["bundle"]), doc


def _own_cache(cold: tuple[Path, Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the cold build's cache, and its one export entry."""
    cache = tmp_path / "cache"
    shutil.copytree(cold[0], cache)
    (entry,) = (cache / "exports").iterdir()
    return cache, entry


def _model_shas(bundle: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted((bundle / "model").iterdir())}


@needs_onnx
def test_a_zeroed_cached_export_is_exported_again_not_shipped(cold: tuple[Path, Path, dict], tiny_model: Path,
                                                              tiny_target: Path, tmp_path: Path) -> None:
    """The finding: zeroed cached weights were built into a bundle reported "validate: passed (cached)"."""
    cache, entry = _own_cache(cold, tmp_path)
    weights = entry / "model" / "model.onnx.data"
    weights.write_bytes(bytes(weights.stat().st_size))
    doc, err = _build(tiny_model, tiny_target, tmp_path / "again", cache)
    assert doc["ok"], err[-3000:]
    assert not _cached(doc)["export"], doc["result"]["stages"]
    assert ("export: the build cache's export for this build was discarded: model.onnx.data does not match the "
            "sha256 recorded when it was published; exporting again") in err
    bundle = Path(doc["result"]["bundle"])
    # The model is the first build's, byte for byte, and scores like it (the measurements reused are the ones
    # taken on these same bytes: the gate's key holds their sha256).
    assert _model_shas(bundle) == _model_shas(cold[1])
    assert _quality(doc) == _quality(cold[2])
    # The entry was published again, whole: the next build reuses it.
    doc3, err3 = _build(tiny_model, tiny_target, tmp_path / "third", cache)
    assert doc3["ok"] and _cached(doc3)["export"] and _cached(doc3)["validate"], err3[-3000:]
    assert "every file's sha256 checked" in err3


@needs_onnx
def test_a_missing_or_extra_file_in_a_cached_export_is_discarded(cold: tuple[Path, Path, dict], tiny_model: Path,
                                                                 tiny_target: Path, tmp_path: Path) -> None:
    cache, entry = _own_cache(cold, tmp_path)
    (entry / "model" / "genai_config.json").unlink()
    doc, err = _build(tiny_model, tiny_target, tmp_path / "missing", cache)
    assert doc["ok"] and not _cached(doc)["export"], err[-3000:]
    assert "genai_config.json is missing" in err
    (entry,) = (cache / "exports").iterdir()
    (entry / "model" / "sitecustomize.py").write_text("import os\n")
    doc, err = _build(tiny_model, tiny_target, tmp_path / "extra", cache)
    assert doc["ok"] and not _cached(doc)["export"], err[-3000:]
    assert "sitecustomize.py was not in it when it was published" in err
    assert not (Path(doc["result"]["bundle"]) / "model" / "sitecustomize.py").exists()
    assert _model_shas(Path(doc["result"]["bundle"])) == _model_shas(cold[1])


@needs_onnx
def test_zeroed_weights_with_a_rewritten_record_are_scored_again_and_refused(cold: tuple[Path, Path, dict],
                                                                              tiny_model: Path, tiny_target: Path,
                                                                              tmp_path: Path) -> None:
    """Whoever also rewrites the recorded sha256 gets the export reused, but never the measurements: those belong
    to the bytes they were taken on, so the zeroed model is scored again and the gate refuses it."""
    cache, entry = _own_cache(cold, tmp_path)
    weights = entry / "model" / "model.onnx.data"
    weights.write_bytes(bytes(weights.stat().st_size))
    meta = json.loads((entry / "entry.json").read_text())
    meta["files"]["model.onnx.data"] = _sha(weights)
    (entry / "entry.json").write_text(json.dumps(meta))
    doc, err = _build(tiny_model, tiny_target, tmp_path / "zeroed", cache)
    assert not doc["ok"] and doc["error"]["code"] == "quality_gate_failed", err[-3000:]
    assert "measurements reused" not in err and "scoring the int4 model" in err
    assert not (tmp_path / "zeroed").exists() or not any((tmp_path / "zeroed").iterdir())


@needs_onnx
def test_edited_gate_measurements_are_discarded_and_scored_again(cold: tuple[Path, Path, dict], tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    """A strict target the model fails; its cached measurements edited to pass: they are not believed."""
    cache, _ = _own_cache(cold, tmp_path)
    strict = tmp_path / "strict.toml"
    strict.write_text((Path(__file__).parents[1] / "fixtures" / "tiny-target.toml").read_text()
                      .replace("max_ppl_increase_pct = 50.0", "max_ppl_increase_pct = 0.001"))
    first, err = _build(tiny_model, strict, tmp_path / "strict1", cache)
    assert not first["ok"] and first["error"]["code"] == "quality_gate_failed", err[-3000:]
    (gate,) = (cache / "gates").iterdir()
    doc = json.loads((gate / "entry.json").read_text())
    assert doc["report"]["ppl_delta_pct"] > 0.001
    doc["report"]["ppl_delta_pct"] = 0.0
    (gate / "entry.json").write_text(json.dumps(doc))
    again, err = _build(tiny_model, strict, tmp_path / "strict2", cache)
    assert not again["ok"] and again["error"]["code"] == "quality_gate_failed", err[-3000:]
    assert again["error"]["message"] == first["error"]["message"]
    assert ("validate: the build cache's measurements were discarded: its measurements do not match the sha256 "
            "recorded when they were published; scoring again") in err


# -- wheels ---------------------------------------------------------------------------------------------------

@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A local index as the only one pip sees, and an empty edgepack cache; yields (index root, served paths)."""
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with package_index(tmp_path / "index") as (url, served):
        monkeypatch.setenv("PIP_INDEX_URL", url)
        yield tmp_path / "index", served


def test_a_tampered_wheel_in_the_cache_is_downloaded_again(index: tuple[Path, list[str]], tmp_path: Path) -> None:
    from edgepack.stages.wheels import download_wheels

    root, served = index
    genuine = make_wheel(tmp_path / "genuine", "probe", "1.0", GENUINE)
    publish(root, genuine)
    seen: list[ProgressEvent] = []
    folder, hashes = download_wheels(["probe==1.0"], "3.11", [], what="test", progress=seen.append)
    assert hashes == {genuine.name: _sha(genuine)}
    cached = folder / genuine.name
    cached.write_bytes(cached.read_bytes() + b"\0")  # the cache's copy changed after it was recorded
    seen.clear()
    again, hashes2 = download_wheels(["probe==1.0"], "3.11", [], what="test", progress=seen.append)
    assert again == folder and hashes2 == hashes and _sha(again / genuine.name) == _sha(genuine)
    assert any("was discarded: " + genuine.name + " does not match the sha256 recorded" in e.message for e in seen)
    assert sum(p.endswith(genuine.name) for p in served) == 2
    # An intact entry is used as it is: nothing downloaded.
    download_wheels(["probe==1.0"], "3.11", [], what="test")
    assert sum(p.endswith(genuine.name) for p in served) == 2


def test_refetched_wheels_are_the_files_the_signed_lock_pins(index: tuple[Path, list[str]], tmp_path: Path) -> None:
    """deploy re-fetches the bundle's locked versions for the device's Python (wheels_for): a file the signed lock
    names must be those bytes, whatever the index says; the lock the device installs with pins what was checked."""
    from edgepack.stages.wheels import LOCK, wheels_for

    root, _ = index
    genuine = make_wheel(tmp_path / "genuine", "probe", "1.0", GENUINE)
    evil = make_wheel(tmp_path / "evil", "probe", "1.0", EVIL)
    assert genuine.name == evil.name and _sha(genuine) != _sha(evil)
    signed = [LockedWheel(file=genuine.name, name="probe", version="1.0", sha256=_sha(genuine))]
    publish(root, evil)  # a mirror serving other bytes under the signed file name, with a matching hash fragment
    with pytest.raises(UserError, match="signed lock pins that file") as err:
        wheels_for(signed, ["probe==1.0"], "3.11", [], what="pi.local")
    assert err.value.fields["found"] == _sha(evil)
    assert not [p for p in (tmp_path / "cache" / "wheels").iterdir() if not p.name.startswith(".")]
    publish(root, genuine)
    folder, entries, differ = wheels_for(signed, ["probe==1.0"], "3.11", [], what="pi.local")
    assert [e.sha256 for e in entries] == [_sha(genuine)] and differ == []
    assert (folder / LOCK).read_text() == f"probe==1.0 --hash=sha256:{_sha(genuine)}\n"
    # A wheel the signed lock does not name (the other Python's binary build) is pinned to the hash taken here.
    other = [LockedWheel(file="probe-1.0-cp39-cp39-manylinux_2_17_x86_64.whl", name="probe", version="1.0",
                         sha256="0" * 64)]
    _, entries, _ = wheels_for(other, ["probe==1.0"], "3.11", [], what="pi.local")
    assert [(e.file, e.sha256) for e in entries] == [(genuine.name, _sha(genuine))]


@needs_onnx
def test_install_allow_network_takes_only_the_pinned_bytes_from_the_index(tiny_model: Path, tiny_target: Path,
                                                                          tmp_path: Path) -> None:
    """install.sh --allow-network used to strip the lock's hashes and install whatever the index served."""
    bundle = build_ok(tiny_model, tiny_target, tmp_path / "dist")
    genuine = make_wheel(tmp_path / "genuine", "probe", "1.0", GENUINE)
    evil = make_wheel(tmp_path / "evil", "probe", "1.0", EVIL)
    lock_only = tmp_path / "wheels-for-device"  # as deploy points EDGEPACK_WHEELS: a lock, the files from the index
    lock_only.mkdir()
    (lock_only / "requirements.lock").write_text(f"probe==1.0 --hash=sha256:{_sha(genuine)}\n")
    venv = tmp_path / "venv"

    def install(url: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "EDGEPACK_VENV": str(venv), "EDGEPACK_WHEELS": str(lock_only), "PIP_INDEX_URL": url,
               "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}
        return subprocess.run(["sh", str(bundle / "install.sh"), "--allow-network"], capture_output=True, text=True,
                              timeout=600, env=env)

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(venv / "bin" / "python"), "-c", "import probe; print(probe.VALUE)"],
                              capture_output=True, text=True)

    with package_index(tmp_path / "index") as (url, served):
        publish(tmp_path / "index", evil)
        r = install(url)
        assert any(p.endswith(evil.name) for p in served), served  # the index was asked
        assert r.returncode == 4, r.stderr[-3000:]
        assert "DO NOT MATCH THE HASHES" in r.stderr and "probe" in r.stderr
        assert probe().returncode != 0
        publish(tmp_path / "index", genuine)
        r = install(url)
        # pip took the genuine file from the index (the bundle's runtime itself is not in this lock, so the import
        # check after pip may fail: that is exit 5, not the hash refusal).
        assert r.returncode != 4 and "DO NOT MATCH" not in r.stderr, r.stderr[-3000:]
        assert probe().stdout.strip() == "genuine"

