"""Fine-tunes as runtime adapters (issue 23): one quantized base, several PEFT LoRA adapters, each a small file,
chosen per request; packs of adapters deployed to a real sshd device without the base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import FIXTURES, cli, envelope, exact_fp32_target, has, needs_onnx, needs_sshd
from .test_finetunes import greedy

pytestmark = [pytest.mark.integration, needs_onnx]

PROMPT = "Licensed under the Apache License"


def lora(base: Path, out: Path, seed: int, modules: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
         rank: int = 4) -> Path:
    """A PEFT LoRA folder with random non-zero B matrices (it changes what the model says); nothing is trained."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=list(modules), init_lora_weights=False,
                             task_type="CAUSAL_LM")
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def merged(base: Path, adapter: Path):  # type: ignore[no-untyped-def]
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def runner(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-B", str(bundle / "run.py"), *args], capture_output=True, text=True,
                          timeout=300)


def tokens(bundle: Path, *args: str) -> list[int]:
    proc = runner(bundle, "--raw", "--prompt", PROMPT, "--max-tokens", "12", "--json", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return list(json.loads(proc.stdout)["tokens"])


@pytest.fixture(scope="module")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"one": lora(tiny_model, root / "one", 0), "two": lora(tiny_model, root / "two", 1),
            "wide": lora(tiny_model, root / "wide", 2, modules=("o_proj", "up_proj"))}


@pytest.fixture(scope="module")
def two_adapter_bundle(tiny_model: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fp32 base (so "the same model" means the same tokens) with two runtime adapters."""
    root = tmp_path_factory.mktemp("rt")
    target = exact_fp32_target(FIXTURES / "tiny-target.toml", root / "tiny-fp32.toml")
    proc = cli("--json", "build", str(tiny_model), "--target", str(target), "--out", str(root / "dist"),
               "--no-wheels", "--runtime-adapter", f"one={adapters['one']}", "--runtime-adapter",
               f"two={adapters['two']}")
    doc = envelope(proc)
    assert proc.returncode == 0, (doc["error"], proc.stderr[-2000:])
    return Path(doc["result"]["bundle"])


def test_two_adapters_on_one_base_say_what_their_merged_models_say(two_adapter_bundle: Path, tiny_model: Path,
                                                                   adapters: dict[str, Path]) -> None:
    import tokenizers

    b = two_adapter_bundle
    m = json.loads((b / "edgepack.json").read_text())
    assert [a["name"] for a in m["adapters"]] == ["one", "two"]
    memory = m["runtime"]["memory"]  # deploy's preflight counts the adapters the runner loads
    assert memory["adapters_bytes"] == sum(a["bytes"] for a in m["adapters"]) > 0
    for a in m["adapters"]:
        assert a["file"] == f"adapters/{a['name']}.onnx_adapter" and a["quality"]["passed"] and a["rank"] == 4
        assert (b / a["file"]).stat().st_size < 0.2 * (b / "model" / "model.onnx.data").stat().st_size
    ids = tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(PROMPT).ids
    base, one, two = tokens(b), tokens(b, "--adapter", "one"), tokens(b, "--adapter", "two")
    assert base == greedy(tiny_model, ids, 12)
    assert one == greedy(merged(tiny_model, adapters["one"]), ids, 12)
    assert two == greedy(merged(tiny_model, adapters["two"]), ids, 12)
    assert len({tuple(base), tuple(one), tuple(two)}) == 3  # each adapter changes the model, differently
    bad = runner(b, "--raw", "--prompt", PROMPT, "--adapter", "three")
    assert bad.returncode == 1 and "has no adapter 'three'" in bad.stderr and "one, two" in bad.stderr
    # The SBOM lists the base and both adapters with their sha256; the smoke test checks all three.
    sbom = json.loads((b / "sbom.cdx.json").read_text())
    shas = {c["name"]: c["hashes"][0]["content"] for c in sbom["components"] if c.get("hashes")}
    assert shas["one"] == m["adapters"][0]["sha256"] and shas["two"] == m["adapters"][1]["sha256"]
    smoke = subprocess.run([sys.executable, "-B", str(b / "smoke_test.py")], capture_output=True, text=True,
                           timeout=300)
    result = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert smoke.returncode == 0 and result["ok"] and set(result["adapters"]) == {"one", "two"}


@pytest.fixture
def served(two_adapter_bundle: Path) -> Iterator[str]:
    from .test_serve import free_port, wait_healthy

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-B", str(two_adapter_bundle / "run.py"), "--serve",
                             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(port, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not has("openai"), reason="needs the openai client (the [dev] extra)")
def test_the_server_serves_each_adapter_by_model_id_without_reloading(served: str, two_adapter_bundle: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=served, api_key="none", max_retries=0, timeout=120)
    base = two_adapter_bundle.name
    assert [m.id for m in client.models.list().data] == [base, "one", "two"]
    texts = {}
    for model in (base, "one", "two", "one"):  # back to "one": the switch is per request
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        assert r.model == model
        texts.setdefault(model, set()).add(r.choices[0].text)
    for name in ("one", "two"):
        want = runner(two_adapter_bundle, "--raw", "--prompt", PROMPT, "--max-tokens", "12", "--json",
                      "--adapter", name)
        assert texts[name] == {json.loads(want.stdout)["text"]}
    assert len({next(iter(t)) for t in texts.values()}) == 3
    chat = client.chat.completions.create(model="two", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "two"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="three", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_a_phi3_adapter_on_its_fused_modules_is_its_merged_model(tmp_path: Path) -> None:
    """Phi-3's qkv_proj and gate_up_proj are one module each in transformers; the builder packs q, k and v and
    splits gate and up: the adapter's B is split onto them."""
    import tokenizers

    from edgepack.testing import make_tiny

    base = make_tiny("phi3", tmp_path / "tiny-phi3")
    adapter = lora(base, tmp_path / "phi-lora", 3, modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    target = exact_fp32_target(FIXTURES / "tiny-target.toml", tmp_path / "tiny-fp32.toml")
    proc = cli("--json", "build", str(base), "--target", str(target), "--out", str(tmp_path / "dist"), "--no-wheels",
               "--runtime-adapter", f"task={adapter}")
    doc = envelope(proc)
    assert proc.returncode == 0, (doc["error"], proc.stderr[-2000:])
    bundle = Path(doc["result"]["bundle"])
    ids = tokenizers.Tokenizer.from_file(str(base / "tokenizer.json")).encode(PROMPT).ids
    got = tokens(bundle, "--adapter", "task")
    assert got == greedy(merged(base, adapter), ids, 12) and got != tokens(bundle)


def test_an_adapter_the_base_has_no_slots_for_is_refused_naming_both(two_adapter_bundle: Path, tiny_model: Path,
                                                                     adapters: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    proc = cli("--json", "adapter", "pack", str(two_adapter_bundle), f"wide={adapters['wide']}", "--out",
               str(tmp_path / "pack"))  # the gate's model and target: those the bundle records
    doc = envelope(proc)
    assert proc.returncode == 1, proc.stderr[-2000:]
    msg = doc["error"]["message"]
    assert "wide" in msg and "adapts o_proj" in msg and "slots for q_proj, k_proj, v_proj, down_proj" in msg
    assert "--runtime-adapter" in doc["error"]["hint"] and not (tmp_path / "pack").exists()


def test_a_litert_target_refuses_runtime_adapters_and_offers_the_merged_build(tiny_model: Path,
                                                                              adapters: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    proc = cli("--json", "build", str(tiny_model), "--target", str(FIXTURES / "tiny-tflite.toml"), "--out",
               str(tmp_path), "--no-wheels", "--runtime-adapter", f"one={adapters['one']}")
    doc = envelope(proc)
    assert proc.returncode == 1 and "LiteRT-LM" in doc["error"]["message"] and "--adapter DIR" in doc["error"]["hint"]
    assert not any(tmp_path.iterdir())


# -- packs to a device ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed_base_and_pack(tiny_model: Path, tiny_target: Path, adapters: dict[str, Path],
                         tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An int4 base with adapter "one" and vendored wheels, and a pack that adds "two"; both signed."""
    from .test_signatures_hold import keypair

    root = tmp_path_factory.mktemp("packs")
    key, pub = keypair(root)
    proc = cli("--json", "build", str(tiny_model), "--target", str(tiny_target), "--out", str(root / "dist"),
               "--runtime-adapter", f"one={adapters['one']}", "--sign", str(key))
    doc = envelope(proc)
    assert proc.returncode == 0, (doc["error"], proc.stderr[-2000:])
    base = Path(doc["result"]["bundle"])
    proc = cli("--json", "adapter", "pack", str(base), f"two={adapters['two']}", "--sign", str(key), "--out",
               str(root / "pack-two"))
    made = envelope(proc)
    assert proc.returncode == 0, (made["error"], proc.stderr[-2000:])
    assert made["result"]["adapters"] == ["one", "two"] and made["result"]["base_id"] == doc["result"]["bundle_id"]
    return {"base": base, "base_id": doc["result"]["bundle_id"], "pack": Path(made["result"]["pack"]),
            "pack_id": made["result"]["bundle_id"], "key": key, "pub": pub, "root": root}


def test_a_pack_is_inspected_and_signed_like_a_bundle_but_never_run_or_archived_here(signed_base_and_pack: dict
                                                                                     ) -> None:
    pack = signed_base_and_pack["pack"]
    shown = cli("inspect", str(pack), "--trusted-key", signed_base_and_pack["pub"])
    assert shown.returncode == 0, shown.stderr
    assert "adapter  two" in shown.stdout and "adapter  one" in shown.stdout and "pack     adapters for" in shown.stdout
    for args in (("run", str(pack), "--prompt", "hi"), ("pack", str(pack))):
        proc = cli("--json", *args)
        assert proc.returncode == 1 and "adapter pack" in envelope(proc)["error"]["message"], proc.stderr[-800:]


@needs_sshd
def test_a_second_adapter_ships_in_a_small_signed_pack_and_keeps_the_first(signed_base_and_pack: dict,
                                                                           device: dict, tmp_path: Path) -> None:
    from .test_device_safety import current, deploy, rewritten

    s = signed_base_and_pack
    base, pack, pub = s["base"], s["pack"], s["pub"]
    proc, out = deploy(device, "--require-signature", pub, str(pack))  # no base there yet: refused, nothing sent
    assert proc.returncode == 1 and out["error"]["code"] == "base_missing", out["error"]
    assert s["base_id"] in out["error"]["message"] and not (Path(device["install_dir"]) / "current").exists()
    first, doc = deploy(device, "--require-signature", pub, str(base))
    assert first.returncode == 0, (doc["error"], first.stderr[-2000:])
    base_bytes = sum(f["bytes"] for f in json.loads((base / "edgepack.json").read_text())["files"])
    # Tampered (the adapter changed, the manifest rewritten to match, so unsigned): refused, nothing changes.
    evil = rewritten(pack, tmp_path / "evil", lambda d: (d / "adapters" / "two.onnx_adapter").write_bytes(
        (d / "adapters" / "two.onnx_adapter").read_bytes()[:-8] + b"\0" * 8))
    proc, out = deploy(device, "--require-signature", pub, str(evil))
    assert proc.returncode == 1 and out["error"]["code"].startswith("signature"), out["error"]
    assert current(device).endswith(s["base_id"])

    second, out = deploy(device, "--require-signature", pub, str(pack))
    assert second.returncode == 0, (out["error"], second.stderr[-2000:])
    res = out["result"]
    assert res["bundle_id"] == s["pack_id"] and res["uploaded_bytes"] < 0.05 * base_bytes
    assert res["smoke"]["ok"] and set(res["smoke"]["adapters"]) == {"one", "two"}
    status = envelope(cli("--json", "status", *device["args"]))["result"]
    assert status["adapters"] == ["one", "two"] and status["current"] == res["bundle_id"]
    live = Path(device["install_dir"]) / current(device)
    py = str(live / ".venv" / "bin" / "python")
    for name in ("one", "two"):
        r = subprocess.run([py, "-B", str(live / "run.py"), "--raw", "--prompt", PROMPT, "--max-tokens", "4",
                            "--adapter", name, "--json"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert r.returncode == 0 and json.loads(r.stdout)["adapter"] == name, r.stderr[-1000:]
    # Rolled back like a release: the base with its first adapter is live again.
    back = envelope(cli("--json", "rollback", *device["args"]))
    assert back["ok"] and current(device).endswith(s["base_id"])


@needs_sshd
@pytest.mark.skipif(not has("ansible"), reason="needs the [fleet] extra (ansible-core)")
def test_a_fleet_rolls_a_pack_out_to_boards_with_its_base_and_stops_on_one_without(signed_base_and_pack: dict,
                                                                                  tmp_path: Path) -> None:
    from ..sshd import make_server
    from .test_fleet import rollout, rows
    from .test_fleet_as_one_deploy import current, inventory_line, one_deploy

    s = signed_base_and_pack
    boards = [make_server(tmp_path / f"sshd{i}") for i in range(2)]
    for b in boards:
        b.start()
    try:
        kh = tmp_path / "known_hosts"
        kh.write_text("".join(b.host_key_line() for b in boards))
        installs = [tmp_path / f"board{i}" / "edgepack" for i in range(2)]
        proc = one_deploy(boards[0], s["base"], installs[0], "--known-hosts", str(kh))
        assert proc.returncode == 0, envelope(proc)["error"]
        inv = tmp_path / "inventory.ini"
        inv.write_text("[boards]\n" + "".join(inventory_line(b, i).replace("board ", f"board{n} ", 1) + "\n"
                                              for n, (b, i) in enumerate(zip(boards, installs, strict=True))))
        proc, doc = rollout(inv, kh, s["pack"], "--canary", "0", "--batch", "100%", "--max-fail", "50%",
                            "--require-signature", s["pub"])
        got = rows(doc)
        assert got["board0"]["state"] == "done" and current(installs[0]) == s["pack_id"], got
        assert got["board1"]["state"] == "failed" and got["board1"]["error"]["code"] == "base_missing"
        assert not (installs[1] / "current").exists()
    finally:
        for b in boards:
            b.stop()
