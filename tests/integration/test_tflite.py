"""LiteRT end to end on a tiny random Llama: real litert-torch conversion, .litertlm packaging, the gate through
LiteRT's Interpreter, the bundle's LiteRT-LM runner and smoke test, and deploy --via adb to a recording stand-in."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import FIXTURES, cli, envelope, needs_onnx, needs_tflite

pytestmark = [pytest.mark.integration, needs_tflite, needs_onnx]


@pytest.fixture(scope="module")
def tflite_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist-tflite")
    proc = cli("--json", "build", "--target", str(FIXTURES / "tiny-tflite.toml"), str(tiny_model), "--out", str(out),
               "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], proc.stderr[-2000:]
    return Path(doc["result"]["bundle"])


def test_bundle_is_one_litertlm_with_a_verified_int8_graph(tflite_bundle: Path) -> None:
    assert sorted(p.name for p in (tflite_bundle / "model").iterdir()) == ["model.litertlm"]
    m = json.loads((tflite_bundle / "edgepack.json").read_text())
    assert m["export"]["format"] == "tflite" and m["export"]["scheme"] == "int8"
    assert m["export"]["builder_options"]["recipe"] == "dynamic_int8"
    graph = m["export"]["graph"]
    assert graph["bits"] == [8] and graph["quantized_matmuls"] > 0 and graph["float_matmuls"] == 0
    assert m["runtime"]["template"] == "litert-lm"
    assert any(r.startswith("litert-lm-api==") for r in m["runtime"]["requirements"])
    assert m["quality"]["validated"] and m["quality"]["passed"] and m["quality"]["tokens_scored"] > 2000
    # The Kotlin integration sample names the LiteRT-LM release the gate ran with.
    version = next(r.split("==")[1] for r in m["runtime"]["requirements"] if r.startswith("litert-lm-api=="))
    gradle = (tflite_bundle / "android" / "build.gradle.kts.snippet").read_text()
    assert f"litertlm-android:{version}" in gradle
    assert "EngineConfig(" in (tflite_bundle / "android" / "EdgepackModel.kt").read_text()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_litert_lm_from_c_gives_run_pys_replies(tiny_model: Path, tmp_path: Path) -> None:
    """--native on a LiteRT-LM bundle (the same build, from the cache): liblitert-lm.so out of the wheel and
    edgepack-chat on LiteRT-LM's C API, answering as run.py does with no Python and no environment."""
    proc = cli("--json", "build", "--target", str(FIXTURES / "tiny-tflite.toml"), str(tiny_model), "--out",
               str(tmp_path), "--no-wheels", "--native")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = Path(envelope(proc)["result"]["bundle"])
    native = json.loads((bundle / "edgepack.json").read_text())["native"]
    assert native["runtime"] == "litert-lm" and native["program"] == "native/edgepack-chat", native
    assert [lib["file"] for lib in native["libraries"]] == ["native/liblitert-lm.so"]
    program = str(bundle / "native" / "edgepack-chat")
    for mode in (["--raw"], [], ["--system", "Be brief."]):
        args = ["--prompt", "The sea is", "--max-tokens", "6", *mode, "--json"]
        c = subprocess.run([program, *args], capture_output=True, text=True, env={}, cwd="/", timeout=300)
        py = subprocess.run([sys.executable, str(bundle / "run.py"), *args], capture_output=True, text=True,
                            timeout=300)
        assert c.returncode == 0 and py.returncode == 0, c.stderr[-1500:] + py.stderr[-1500:]
        got, want = json.loads(c.stdout), json.loads(py.stdout)
        assert got["text"] == want["text"] and got["new_tokens"] == want["new_tokens"] >= 1, (mode, got, want)
        assert got["prompt_tokens"] == want["prompt_tokens"] and set(want) <= set(got), (got, want)
    smoke = subprocess.run([program, "--smoke"], capture_output=True, text=True, env={}, timeout=300)
    res = json.loads(smoke.stdout)
    assert smoke.returncode == 0 and res["ok"] and res["greedy_text_prefix_ok"], smoke.stdout + smoke.stderr


def test_runner_and_smoke_test_run_on_litert_lm_without_torch(tflite_bundle: Path) -> None:
    smoke = subprocess.run([sys.executable, str(tflite_bundle / "smoke_test.py")], capture_output=True, text=True,
                           check=False)
    line = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert smoke.returncode == 0 and line["ok"], line
    assert abs(line["ppl_drift_pct"]) < 0.5 and line["tokens"] == 8
    assert (tflite_bundle / ".cache" / "litert-lm").is_dir()  # the XNNPACK cache stays inside the bundle
    code = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); " \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    run = subprocess.run([sys.executable, "-c", code, str(tflite_bundle / "run.py"), "--prompt", "hi", "--json",
                          "--max-tokens", "5"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-1500:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["new_tokens"] == 5 and out["prompt_tokens"] > 0
    assert "all match" in cli("inspect", str(tflite_bundle)).stdout  # the device-made cache is not "extra"


def test_rebuild_is_byte_identical(tiny_model: Path, tflite_bundle: Path, tmp_path: Path) -> None:
    proc = cli("--json", "build", "--target", str(FIXTURES / "tiny-tflite.toml"), str(tiny_model), "--out",
               str(tmp_path), "--no-wheels")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / tflite_bundle.name / "edgepack.json").read_text())
    first = json.loads((tflite_bundle / "edgepack.json").read_text())
    assert again["bundle_id"] == first["bundle_id"]


def test_bad_block_size_names_the_dimension_and_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    t = tmp_path / "b128.toml"
    t.write_text((FIXTURES / "tiny-tflite.toml").read_text().replace(
        'scheme = "int8"\nblock_size = 32', 'scheme = "int4"\nblock_size = 128'))
    proc = cli("--json", "build", "--target", str(t), str(tiny_model), "--out", str(tmp_path / "out"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["field"] == "quantize.block_size"
    assert "hidden_size (64)" in err["message"] and "[32, 64]" in err["message"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unsupported_architecture_lists_the_supported(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "phi"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GraniteForCausalLM"]  # a family only the ONNX exporter takes (families.toml)
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = cli("--json", "build", str(bad), "--target", str(FIXTURES / "tiny-target.toml"), "--format", "tflite",
               "--out", str(tmp_path / "out"))
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "GraniteForCausalLM" in err["message"] and "--format onnx" in err["message"]
    assert "LlamaForCausalLM" in err["supported"] and "GraniteForCausalLM" not in err["supported"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_format_flag_switches_an_onnx_target_to_litert(tiny_model: Path, tmp_path: Path) -> None:
    t = tmp_path / "int8.toml"
    t.write_text((FIXTURES / "tiny-target.toml").read_text().replace('scheme = "int4"', 'scheme = "int8"'))
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--format", "tflite", "--out", str(tmp_path),
               "--no-wheels", "--skip-validation")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((Path(doc["result"]["bundle"]) / "edgepack.json").read_text())
    assert (m["export"]["format"], m["runtime"]["template"]) == ("tflite", "litert-lm")


FAKE_ADB = r'''#!/bin/sh
# A recording stand-in for adb: logs every call, keeps the "phone" under $FAKE_PHONE.
echo "$*" >> "$FAKE_ADB_LOG"
[ "$1" = "-s" ] && shift 2
map() { printf '%s' "$1" | sed "s#/data/local/tmp#$FAKE_PHONE/data/local/tmp#g"; }
case "$1" in
  get-state) echo device ;;
  push) mkdir -p "$(map "$3")" && cp -r "$2" "$(map "$3")" ;;
  shell)
    case "$2" in
      "getprop ro.product.cpu.abi") echo "$FAKE_ABI" ;;
      "command -v python3 || true") if [ -n "$FAKE_PYTHON" ]; then echo /usr/bin/python3; fi ;;
      *) sh -c "$(map "$2")" | sed "s#$FAKE_PHONE##g" ;;
    esac ;;
  *) echo "fake adb: unsupported $1" >&2; exit 1 ;;
esac
'''


def test_deploy_via_adb_pushes_verifies_and_switches(tflite_bundle: Path, tmp_path: Path) -> None:
    bindir, phone, log = tmp_path / "bin", tmp_path / "phone", tmp_path / "adb.log"
    bindir.mkdir()
    (bindir / "adb").write_text(FAKE_ADB)
    (bindir / "adb").chmod(stat.S_IRWXU)
    import platform

    abi = {"x86_64": "x86_64", "aarch64": "arm64-v8a"}[platform.machine()]
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_PHONE": str(phone),
           "FAKE_ADB_LOG": str(log), "FAKE_ABI": abi, "FAKE_PYTHON": ""}
    proc = subprocess.run([sys.executable, "-m", "edgepack", "--json", "deploy", str(tflite_bundle), "--via", "adb",
                           "--serial", "emulator-5554"], capture_output=True, text=True, env=env, check=False)
    doc = envelope(proc)
    assert proc.returncode == 0 and doc["ok"], proc.stderr[-2000:]
    res = doc["result"]
    bundle_id = json.loads((tflite_bundle / "edgepack.json").read_text())["bundle_id"]
    root = phone / "data/local/tmp/edgepack"
    assert (root / "CURRENT").read_text().strip() == bundle_id
    assert (root / "releases" / bundle_id / "model" / "model.litertlm").is_file()
    assert res["smoke"]["ok"] is None and "no python3" in res["smoke"]["skipped"]
    calls = log.read_text().splitlines()
    assert all(c.startswith("-s emulator-5554 ") for c in calls)
    assert any(" push " in c for c in calls) and any("sha256sum" in c for c in calls)
    # A phone with the wrong ABI is refused before anything is pushed.
    log.unlink()
    env["FAKE_ABI"] = "armeabi-v7a"
    proc = subprocess.run([sys.executable, "-m", "edgepack", "--json", "deploy", str(tflite_bundle), "--via", "adb"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 1 and "armeabi-v7a" in envelope(proc)["error"]["message"]
    assert not any(" push " in c for c in log.read_text().splitlines())


def test_unvalidated_android_bundle_says_so(tiny_model: Path, tmp_path: Path) -> None:
    proc = cli("--json", "build", str(tiny_model), "--target", str(FIXTURES / "tiny-tflite.toml"), "--out",
               str(tmp_path), "--no-wheels", "--skip-validation")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Not validated" in (Path(doc["result"]["bundle"]) / "android" / "README.md").read_text()


def test_tune_times_litert_candidates_and_keeps_the_fastest_passing(tiny_model: Path, tmp_path: Path) -> None:
    t = tmp_path / "tune.toml"
    src = (FIXTURES / "tiny-tflite.toml").read_text()
    t.write_text(src[:src.index("[tune]")] + '[tune]\nreps = 1\nspeed_tokens = 8\ncandidates = [\n'
                 '  { name = "int8", scheme = "int8" },\n  { name = "fp32", scheme = "fp32" },\n]\n')
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--tune", "--out", str(tmp_path),
               "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = doc["result"]["tune"]
    assert [r["name"] for r in rows] == ["int8", "fp32"] and all(r["decode_tok_s"] for r in rows)
    assert sum(r["chosen"] for r in rows) == 1


def test_plain_tflite_bundle_runs_on_the_litert_interpreter(tiny_model: Path, tmp_path: Path) -> None:
    t = tmp_path / "plain.toml"
    t.write_text((FIXTURES / "tiny-tflite.toml").read_text()
                 .replace('template = "litert-lm"', 'template = "litert"')
                 .replace('packages = ["litert-lm-api"]', 'packages = ["ai-edge-litert", "tokenizers", "jinja2"]'))
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = Path(doc["result"]["bundle"])
    assert sorted(p.name for p in (bundle / "model").iterdir()) == ["generation.json", "model.tflite",
                                                                    "tokenizer.json"]
    m = json.loads((bundle / "edgepack.json").read_text())
    assert m["runtime"]["template"] == "litert" and m["export"]["builder_options"]["package"] == "tflite"
    smoke = subprocess.run([sys.executable, str(bundle / "smoke_test.py")], capture_output=True, text=True,
                           check=False)
    line = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert smoke.returncode == 0 and line["ok"] and line["top1_vs_build"] == 1.0, line
    run = cli("--json", "run", str(bundle), "--prompt", "hi", "--max-tokens", "4")
    assert run.returncode == 0, run.stderr[-1500:]
    # The prompt cache on the Interpreter runner: K/V reused at whole prefill chunks, so every turn gives the tokens a
    # full prefill gives; LiteRT has no speculative decoding.
    play = cli("--json", "bench", str(bundle), "--scenario", "chat", "--reps", "1")
    assert play.returncode == 0, play.stderr[-2000:]
    chat = envelope(play)["result"]["runs"][0]
    assert chat["unsupported"] == ["ngram"] and chat["same_tokens"] == {"plain": True, "prompt_cache": True}
    reused = [t["reused_tokens"]["prompt_cache"] for t in chat["turns"]]
    assert chat["turns_played"] >= 3 and reused[-1] >= 128 and all(r % 128 == 0 for r in reused), reused
    table = cli("bench", str(bundle), "--scenario", "chat", "--reps", "1")
    assert table.returncode == 0 and "time to first token (ms), first run: turn, prompt tokens, plain, prompt_cache" \
        in table.stdout, table.stdout
    assert re.search(rf"^\s+{chat['turns_played']}\s+\d+\s", table.stdout, re.M), table.stdout  # the last turn


def _mixed_target(tmp_path: Path, rule: str) -> Path:
    t = tmp_path / "mixed.toml"
    t.write_text((FIXTURES / "tiny-tflite.toml").read_text()
                 .replace('algorithm = "default"', f'algorithm = "smoothquant"\nlitert_layers = [{rule}]')
                 .replace('template = "litert-lm"', 'template = "litert"')
                 .replace('packages = ["litert-lm-api"]', 'packages = ["ai-edge-litert", "tokenizers", "jinja2"]'))
    return t


def test_smoothquant_with_a_layer_rule_writes_the_mixed_graph_it_reports(tiny_model: Path, tmp_path: Path) -> None:
    t = _mixed_target(tmp_path, '{ parts = ["feedforward.down"], blocks = [1], mode = "weight_only" }, '
                                '{ parts = ["attention.output"], blocks = [0], mode = "fp16" }, '
                                '{ parts = ["feedforward.gate"], blocks = [1], mode = "float" }')
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path / "d"), "--no-wheels")
    doc = envelope(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = Path(doc["result"]["bundle"])
    opts = json.loads((bundle / "edgepack.json").read_text())["export"]["builder_options"]
    assert opts["recipe"] == "dynamic_int8 + 3 layer rule(s)"
    ops = opts["layers"]["ops"]  # every mode landed where its rule said (litert_recipe.verify read the file back)
    assert ops["feedforward.down:weight_only"] == ops["feedforward.down:dynamic"] == 1
    assert ops["attention.output:fp16"] == ops["feedforward.gate:float"] == 1 and ops["attention.qkv:dynamic"] == 2
    assert opts["smoothquant"]["alpha"] == 0.5 and opts["smoothquant"]["float_drift"] < 1e-3
    # Read the written graph itself: block 1's down projection is dequantized from int8 (weight-only), block 0's
    # runs on int8 weights directly (dynamic).
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = tfl.read_model(str(bundle / "model" / "model.tflite"))
    sg = model.subgraphs[0]
    made = {t: op for op in sg.operators for t in op.outputs}
    seen = {}
    for op in sg.operators:
        scope = tfl.get_op_scope(op, sg.tensors)
        if str(tfl.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)).endswith(
                "FULLY_CONNECTED") and scope.split(";")[0].endswith("Linear_w2"):
            block = int(scope.split("TransformerBlock_")[1].split("/")[0])
            seen[block] = op.inputs[1] in made
    assert seen == {0: False, 1: True}
    smoke = subprocess.run([sys.executable, str(bundle / "smoke_test.py")], capture_output=True, text=True,
                           check=False)
    assert smoke.returncode == 0, smoke.stdout[-1000:]


def test_a_layer_rule_that_cannot_apply_fails_the_build_and_says_why(tiny_model: Path, tmp_path: Path) -> None:
    # A block the model does not have: refused from config.json, before converting.
    t = _mixed_target(tmp_path, '{ parts = ["feedforward.down"], blocks = [5], mode = "weight_only" }')
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path / "d"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "names block(s) [5], but tiny-llama has 2 blocks" in err["message"], err
    # The tiny Llama ties its head to the embedding: one tensor cannot be both float and int8. Found on the
    # exported ops, in the converter process; the error reaches the user as it was raised there.
    t = _mixed_target(tmp_path, '{ parts = ["head"], mode = "float" }')
    proc = cli("--json", "build", str(tiny_model), "--target", str(t), "--out", str(tmp_path / "d"), "--no-wheels")
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and "embedding and head share one weight tensor" in err["message"], err
    assert "same mode" in err["hint"]
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
