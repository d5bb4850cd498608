"""Runtime LoRA adapters without a model: the slot graph's arithmetic (q/k/v packed into one MatMul), what a PEFT
folder may carry, NAME=DIR, and an adapter pack's manifest that lists files it does not carry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import ModelError, UserError

K, HEAD, HEADS, KV = 8, 2, 2, 1  # q: 4 columns, k: 2, v: 2


def peft_folder(folder: Path, tensors: dict[str, np.ndarray], **config: object) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(doc | config))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def qkv_graph(folder: Path, w: np.ndarray) -> Path:
    """The builder's shape of it: one float MatMul for q, k and v at /model/layers.0/attn/qkv_proj."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = w.shape[1]
    out = "/model/layers.0/attn/qkv_proj/MatMul/output_0"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "model.layers.0.attn.qkv_proj.MatMul.weight"], [out],
                          name="/model/layers.0/attn/qkv_proj/MatMul"),
         helper.make_node("Identity", [out], ["logits"], name="/out")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", n])],
        [numpy_helper.from_array(w.astype(np.float32), "model.layers.0.attn.qkv_proj.MatMul.weight")])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {
        "head_size": HEAD, "num_attention_heads": HEADS, "num_key_value_heads": KV}}}))
    return folder


def test_q_and_v_adapters_packed_into_one_slot_add_exactly_their_two_branches(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgepack.backends import lora

    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, 8))
    model = qkv_graph(tmp_path / "m", w)
    prefix = "base_model.model.model.layers.0.self_attn"
    a_q, b_q, a_v, b_v = (rng.standard_normal(s) for s in ((2, K), (4, 2), (2, K), (2, 2)))
    folder = peft_folder(tmp_path / "ad", {
        f"{prefix}.q_proj.lora_A.weight": a_q, f"{prefix}.q_proj.lora_B.weight": b_q,
        f"{prefix}.v_proj.lora_A.weight": a_v, f"{prefix}.v_proj.lora_B.weight": b_v})
    spec = lora.read_spec("ad", folder)
    assert spec.slots == ("q_proj", "k_proj", "v_proj") and spec.scale == 2.0
    assert lora.add_slots(model, spec.slots) == 1
    facts = lora.write_adapter(spec, model, tmp_path / "ad.onnx_adapter")
    assert facts["parameters"] == (K * 2 + 2 * 4) + (K * 2 + 2 * 2)  # exactly q's and v's pairs, nothing padded

    x = rng.standard_normal((1, 3, K)).astype(np.float32)
    session = ort.InferenceSession(str(model / "model.onnx"))
    base = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(base, x @ w, rtol=1e-5, atol=1e-5)  # rank-0 defaults: the base, unchanged
    params = ort.AdapterFormat.read_adapter(str(tmp_path / "ad.onnx_adapter")).get_parameters()
    feeds = {"x": x} | {name: v.numpy() for name, v in params.items()}
    got = session.run(None, feeds)[0]
    want = x @ w
    want[..., 0:4] += 2.0 * (x @ a_q.T @ b_q.T)  # q's columns
    want[..., 6:8] += 2.0 * (x @ a_v.T @ b_v.T)  # v's columns (after k's two)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_an_adapter_for_a_module_the_base_has_no_slot_for_names_both(tmp_path: Path) -> None:
    from edgepack.backends import lora

    model = qkv_graph(tmp_path / "m", np.ones((K, 8)))
    lora.add_slots(model, lora.slots_of(["q_proj"]))
    folder = peft_folder(tmp_path / "ad", {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight":
                                           np.ones((2, K)),
                                           "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight":
                                           np.ones((8, 2))}, target_modules=["o_proj"])
    with pytest.raises(ModelError) as err:
        lora.write_adapter(lora.read_spec("ad", folder), model, tmp_path / "ad.onnx_adapter")
    assert "adapts o_proj" in err.value.message and "slots for q_proj, k_proj, v_proj" in err.value.message
    assert not (tmp_path / "ad.onnx_adapter").exists()


@pytest.mark.parametrize(("config", "words"), [
    ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "biases"), ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")])
def test_what_a_runtime_adapter_cannot_carry_is_refused_with_the_merge_offered(tmp_path: Path, config: dict,
                                                                                words: str) -> None:
    from edgepack.backends import lora

    with pytest.raises(ModelError) as err:
        lora.read_spec("x", peft_folder(tmp_path / "ad", {}, **config))
    assert words in err.value.message and "--adapter" in (err.value.hint or "")


def test_names_and_folders_on_the_command_line(tmp_path: Path) -> None:
    from edgepack.backends.lora import slots_of
    from edgepack.stages.adapters import parse

    assert parse(["a=./x", "b.v2=/y"]) == (("a", Path("./x").resolve()), ("b.v2", Path("/y")))
    for bad in (["nodir"], ["=x"], ["A=x"], ["a=x", "a=y"], ["../a=x"]):
        with pytest.raises(UserError):
            parse(bad)
    assert slots_of(["all"]) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert slots_of(["down_proj", "v_proj"]) == ("q_proj", "k_proj", "v_proj", "down_proj")  # q, k, v: one MatMul
    with pytest.raises(UserError):
        slots_of(["lm_head"])


def test_a_packs_manifest_lists_its_bases_files_and_only_a_pack_may_lack_them(tmp_path: Path) -> None:
    from edgepack.bundle import FileEntry, list_files, read_manifest, verify_bundle, write_manifest
    from edgepack.errors import BundleError

    base = tmp_path / "base"
    (base / "model").mkdir(parents=True)
    (base / "model" / "model.onnx").write_bytes(b"weights")
    doc = {"name": "b", "target": {"id": "t"}}
    write_manifest(base, doc)
    pack = tmp_path / "pack"
    (pack / "adapters").mkdir(parents=True)
    (pack / "adapters" / "a.onnx_adapter").write_bytes(b"lora")
    inherited = tuple(f for f in list_files(base) if f.path != "edgepack.json")
    m = write_manifest(pack, doc | {"base": {"bundle_id": read_manifest(base).bundle_id, "name": "b"}}, inherited)
    assert [f.path for f in m.files] == ["adapters/a.onnx_adapter", "model/model.onnx"] and m.base_id
    verify_bundle(pack)  # the base's file is not here: the device links it from the base release
    (pack / "adapters" / "a.onnx_adapter").write_bytes(b"LORA")
    with pytest.raises(BundleError):
        verify_bundle(pack)  # what a pack carries is still checked
    plain = write_manifest(tmp_path / "pack", doc, (FileEntry("model/model.onnx", 7, "0" * 64),))
    assert not plain.base_id
    with pytest.raises(BundleError):
        verify_bundle(tmp_path / "pack")  # without `base`, a listed file that is not there is missing
