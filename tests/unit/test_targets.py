from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.errors import TargetError, UnknownNameError
from edgepack.resources import shipped_dir
from edgepack.targets import list_targets, load_target

SHIPPED = sorted(p.stem for p in shipped_dir("targets").glob("*.toml"))


def test_the_four_documented_targets_ship() -> None:
    assert {"host", "rpi5", "jetson-orin-nano", "android-arm64"} <= set(SHIPPED)


@pytest.mark.parametrize("target_id", SHIPPED)
def test_every_shipped_target_validates(target_id: str) -> None:
    t = load_target(target_id)
    assert t.id == target_id
    assert t.export.format == ("tflite" if target_id == "android-arm64" else "onnx")
    assert t.runtime.template == {"onnx": "onnxruntime-genai", "tflite": "litert-lm"}[t.export.format]
    assert t.quality.max_ppl_increase_pct > 0
    assert t.resolved_arch()


def test_docs_explain_every_shipped_target() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "targets.md").read_text()
    for target_id in SHIPPED:
        assert f"`{target_id}`" in doc


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_target_file_by_path(tmp_path: Path) -> None:
    p = write(tmp_path, '[device]\narch = "aarch64"\n[quantize]\nscheme = "int8"\n')
    t = load_target(str(p))
    assert (t.id, t.device.arch, t.quantize.scheme) == ("board", "aarch64", "int8")


def test_typo_key_names_file_field_and_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, '[device]\narch = "aarch64"\n[quantize]\nschema = "int4"\n')
    with pytest.raises(TargetError) as err:
        load_target(str(p))
    e = err.value
    assert str(p) in e.message and "quantize.schema" in e.message
    assert e.fields["field"] == "quantize.schema"
    assert "scheme" in e.fields["allowed"]


def test_wrong_type_and_wrong_choice(tmp_path: Path) -> None:
    p = write(tmp_path, '[device]\narch = "aarch64"\n[quantize]\nblock_size = "32"\n')
    with pytest.raises(TargetError, match="quantize.block_size.*one of 16, 32, 64, 128, 256"):
        load_target(str(p))
    p = write(tmp_path, '[device]\narch = "aarch64"\n[quantize]\nscheme = "int3"\n')
    with pytest.raises(TargetError, match="'int3'.*one of 'int4', 'int8', 'fp16', 'fp32'"):
        load_target(str(p))
    p = write(tmp_path, '[device]\narch = "aarch64"\n[deploy]\nsystemd = "yes"\n')
    with pytest.raises(TargetError, match="deploy.systemd"):
        load_target(str(p))


def test_unknown_section_missing_device_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="unknown section or key 'quantise'"):
        load_target(str(write(tmp_path, '[device]\narch = "x"\n[quantise]\n')))
    with pytest.raises(TargetError, match=r"missing the \[device\] section"):
        load_target(str(write(tmp_path, '[quantize]\nscheme = "int8"\n')))
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(str(write(tmp_path, "[device\n")))
    with pytest.raises(TargetError, match="missing required field"):
        load_target(str(write(tmp_path, "[device]\nram_mb = 3\n")))


def test_unknown_export_format_lists_known(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown export format 'coreml'. Known: onnx"):
        load_target(str(write(tmp_path, '[device]\narch = "x"\n[export]\nformat = "coreml"\n')))


def test_unknown_target_lists_known() -> None:
    with pytest.raises(UnknownNameError) as err:
        load_target("rpi6")
    assert "rpi5" in err.value.message and "host" in err.value.message
    assert err.value.exit_code == 1


def test_list_targets_matches_files() -> None:
    assert [t.id for t in list_targets()] == SHIPPED


def test_fp16_on_cpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    p = write(tmp_path, '[device]\narch = "x86_64"\n[quantize]\nscheme = "fp16"\n')
    from edgepack.backends import check_profile  # the ONNX exporter's rule

    with pytest.raises(TargetError, match="execution_provider = \"cuda\"") as err:
        check_profile(load_target(str(p)))
    assert err.value.fields["allowed"] == ["int4", "int8", "fp32"]
    cuda = '[device]\narch = "aarch64"\n[export]\nexecution_provider = "cuda"\n[quantize]\nscheme = "fp16"\n'
    p = write(tmp_path, cuda)
    assert check_profile(load_target(str(p))).quantize.scheme == "fp16"


def test_example_target_files_validate() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "targets"
    files = sorted(examples.glob("*.toml"))
    assert files
    for f in files:
        t = load_target(str(f))
        assert t.id == f.stem and t.quantize.scheme in ("int4", "int8", "fp32")


def test_gptq_needs_symmetric_int4_imatrix_int4_and_calibration_text_needs_them(tmp_path: Path) -> None:
    p = write(tmp_path, '[device]\narch = "x"\n[quantize]\nalgorithm = "gptq"\nsymmetric = false\n')
    with pytest.raises(TargetError, match='"gptq" works on symmetric int4 weights only') as err:
        load_target(str(p))
    assert err.value.fields["field"] == "quantize.algorithm"
    p = write(tmp_path, '[device]\narch = "x"\n[quantize]\nalgorithm = "imatrix"\nscheme = "int8"\n')
    with pytest.raises(TargetError, match='"imatrix" works on int4 weights only'):
        load_target(str(p))
    p = write(tmp_path, '[device]\narch = "x"\n[quantize]\nalgorithm = "imatrix"\nsymmetric = false\n'
                        'embedding_precision = "fp32"\n')
    assert not load_target(str(p)).quantize.symmetric  # imatrix searches zero points too
    p = write(tmp_path, '[device]\narch = "x"\n[quantize]\ncalibration_text = "c.txt"\n')
    with pytest.raises(TargetError, match="read by algorithm = \"gptq\", \"imatrix\" or \"smoothquant\" only"):
        load_target(str(p))
    p = write(tmp_path, '[device]\narch = "x"\n[quantize]\nalgorithm = "k_quant_mixed"\n')
    with pytest.raises(TargetError, match="'default', 'rtn', 'k_quant', 'gptq'"):
        load_target(str(p))


def test_format_override_switches_runtime_and_drops_knobs_the_other_format_lacks() -> None:
    from edgepack.stages.export import with_format

    onnx = with_format(load_target("android-arm64"), "onnx")
    assert (onnx.export.format, onnx.runtime.template, onnx.quantize.algorithm) == (
        "onnx", "onnxruntime-genai", "default")
    assert onnx.runtime.packages == ("onnxruntime-genai", "onnxruntime")
    lite = with_format(load_target("rpi5"), "tflite")
    assert (lite.export.format, lite.runtime.template, lite.runtime.packages) == ("tflite", "litert-lm",
                                                                                   ("litert-lm-api",))
    assert with_format(load_target("rpi5"), None) == load_target("rpi5")


def test_the_export_formats_profiles_may_name_are_the_registered_exporters() -> None:
    from edgepack.backends import exporters
    from edgepack.targets import EXPORT_FORMATS

    assert sorted(EXPORT_FORMATS) == exporters.names()


def test_each_exporter_checks_its_own_profile_rules(tmp_path: Path) -> None:
    """A profile's format rules live with its exporter (backends.check_profile, which builds, plans and `targets
    show` apply): fp16 on the CPU is the ONNX exporter's refusal; LiteRT-only fields are refused on ONNX and need
    int8 on TFLite. An unknown format is refused on load, naming the registered ones."""
    from edgepack.backends import check_profile, exporters
    from edgepack.errors import TargetError, UnknownNameError

    with pytest.raises(UnknownNameError) as err:
        load_target(str(write(tmp_path, '[device]\narch = "x"\n[export]\nformat = "gguf"\n')))
    assert sorted(err.value.fields["known"]) == exporters.names()
    with pytest.raises(TargetError, match="needs export.execution_provider"):
        check_profile(load_target(str(write(tmp_path, '[device]\narch = "x"\n[quantize]\nscheme = "fp16"\n'))))
    for fmt, scheme in (("onnx", "int8"), ("tflite", "int4")):
        with pytest.raises(TargetError, match="smoothquant"):
            check_profile(load_target(str(write(tmp_path, f'[device]\narch = "x"\n[export]\nformat = "{fmt}"\n'
                                                          f'[quantize]\nscheme = "{scheme}"\nalgorithm = '
                                                          '"smoothquant"\n'))))
    ok = check_profile(load_target(str(write(tmp_path, '[device]\narch = "x"\n[export]\nformat = "tflite"\n'
                                                       '[quantize]\nscheme = "int8"\nalgorithm = "smoothquant"\n'))))
    assert ok.quantize.algorithm == "smoothquant"


def test_a_quantized_embedding_is_int4_whether_the_table_is_tied_or_not(tmp_path: Path) -> None:
    """embedding_precision = "quantized": a tied symmetric table is the head's; an untied one, or a tied one with
    asymmetric int4 (the builder's shared asymmetric table is an invalid graph), is an int4 table of its own."""
    from edgepack.backends.onnx import builder_options

    def opts(body: str, tied: bool) -> dict[str, str]:
        p = write(tmp_path, '[device]\narch = "x"\n[quantize]\n' + body)
        return builder_options(load_target(str(p)).quantize, tied=tied)[1]

    sym = 'embedding_precision = "quantized"\n'
    assert opts(sym, tied=True)["shared_embeddings"] == "true" and "op_types_to_quantize" not in opts(sym, tied=True)
    assert opts(sym, tied=False)["op_types_to_quantize"] == "MatMul/Gather"
    asym = opts('symmetric = false\nembedding_precision = "quantized"\n', tied=True)
    assert asym["shared_embeddings"] == "false" and asym["op_types_to_quantize"] == "MatMul/Gather"
    assert "op_types_to_quantize" not in opts('embedding_precision = "fp32"\n', tied=False)
    assert "op_types_to_quantize" not in opts('scheme = "int8"\nembedding_precision = "quantized"\n', tied=False)


def test_the_exporter_and_the_plan_read_one_embedding_rule() -> None:
    from edgepack.backends.onnx import embedding_table

    def table(tied: bool, scheme: str, symmetric: bool = True, precision: str = "quantized") -> str:
        return embedding_table(tied=tied, scheme=scheme, symmetric=symmetric, precision=precision)

    assert table(True, "int4") == "shared" and table(True, "int4", symmetric=False) == "int4"
    assert table(False, "int4") == "int4" and table(False, "int4", precision="fp32") == "float"
    assert table(True, "int8") == "float"  # the builder writes a float table at int8 even when asked to share
    assert table(True, "fp32", symmetric=False) == "shared"  # symmetry means nothing to a float graph


def test_prompt_cache_and_speculative_fields(tmp_path: Path) -> None:
    t = load_target(str(write(tmp_path, '[device]\narch = "aarch64"\n')))
    assert (t.runtime.prompt_cache_slots, t.runtime.prompt_cache_mb, t.runtime.speculative) == (1, 0, "auto")
    assert t.speculative == "off"  # auto is off until build --tune measures n-gram faster
    p = write(tmp_path, '[device]\narch = "aarch64"\n[runtime]\nspeculative = "ngram"\n')
    assert load_target(str(p)).speculative == "ngram"
    p = write(tmp_path, '[device]\narch = "aarch64"\n[runtime]\nprompt_cache_slots = 9\n')
    with pytest.raises(TargetError, match="prompt_cache_slots must be 0 \\(off\\) to 8"):
        load_target(str(p))
    p = write(tmp_path, '[device]\narch = "aarch64"\n[export]\nformat = "tflite"\n[runtime]\ntemplate = "litert-lm"\n'
                        'speculative = "ngram"\n')
    with pytest.raises(TargetError, match="needs onnxruntime-genai") as err:
        load_target(str(p))
    assert err.value.fields["allowed"] == ["auto", "off"]
