"""The llama.cpp peer of a build: llama.cpp's own converter (convert_hf_to_gguf.py from llama-cpp-python's
source distribution, vendor/llama.cpp) and quantizer (llama_model_quantize through llama-cpp-python) on the
same checkpoint, for decode-speed and size comparisons at scale (docs/performance.md).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llsrc && tar xzf ... -C /tmp/llsrc
    .venv/bin/python bench/llama_cpp_peer.py /tmp/llsrc/llama_cpp_python-0.3.36 /tmp/tinyllama /tmp/tl --type Q4_K_M

Random real-shape checkpoints carry a small test tokenizer whose BPE pre-tokenizer llama.cpp does not know;
its hash check is answered with "default" here. That changes what the tokenizer metadata says, not a weight, so
decode speed and file size are llama.cpp's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18}


def convert(source: Path, model: Path, out: Path) -> None:
    vendor = source / "vendor" / "llama.cpp"
    sys.path[:0] = [str(vendor), str(vendor / "gguf-py")]
    import convert_hf_to_gguf  # type: ignore[import-not-found]
    from conversion import base  # type: ignore[import-not-found]

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = ["convert_hf_to_gguf.py", str(model), "--outfile", str(out), "--outtype", "f16"]
    convert_hf_to_gguf.main()


def quantize(f16: Path, out: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 0
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="llama-cpp-python's unpacked source distribution")
    ap.add_argument("model", type=Path, help="a Hugging Face checkpoint folder")
    ap.add_argument("out", type=Path, help="folder for model-f16.gguf and model-<type>.gguf")
    ap.add_argument("--type", default="Q4_K_M", choices=sorted(FTYPES))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / "model-f16.gguf"
    if not f16.is_file():
        convert(args.source, args.model, f16)
    quantize(f16, args.out / f"model-{args.type}.gguf", args.type)
    print(args.out / f"model-{args.type}.gguf")


if __name__ == "__main__":
    main()
