"""Peak memory of merging a LoRA adapter into a real-size base: edgepack's streamed merge against peft's
`merge_and_unload` (what `--adapter` did before, and still does for DoRA, biases, embeddings, Conv1D).

    python bench/merge_memory.py [--shape tinyllama-1.1b] [--rank 16] [--out bench/results/merge_memory.json]

Makes a random checkpoint with the released model's shapes (bf16, hub layout; edgepack.testing.make_real_shape)
and a random rank-`rank` adapter on all seven projection modules (written directly as PEFT saves one), then runs
each merge in a fresh process and reports its peak RSS (VmHWM) and time; the two merged checkpoints are compared
tensor by tensor."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter(base: Path, out: Path, rank: int) -> Path:
    """A PEFT LoRA folder for `base` (adapter_config.json + adapter_model.safetensors), random A and B."""
    import numpy as np
    from safetensors.numpy import save_file

    from edgepack.checkpoint import Checkpoint

    rng = np.random.default_rng(0)
    tensors = {}
    for name, (_, _, shape, _, _) in Checkpoint(base).entries.items():
        parts = name.split(".")
        if len(shape) == 2 and parts[-2] in MODULES:
            stem = "base_model.model." + name[: -len(".weight")]
            tensors[f"{stem}.lora_A.weight"] = (rng.standard_normal((rank, shape[1])) * 0.02).astype(np.float32)
            tensors[f"{stem}.lora_B.weight"] = (rng.standard_normal((shape[0], rank)) * 0.02).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": MODULES, "bias": "none",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}))
    return out


def one(kind: str, base: Path, lora: Path, out: Path) -> None:
    from edgepack import adapter as merge

    (merge._peft_merge if kind == "peft" else merge._merge)(base, lora, out)


def peak(kind: str, base: Path, lora: Path, out: Path) -> dict[str, Any]:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.merge_memory import one; from pathlib import "
            f"Path; one({kind!r}, Path({str(base)!r}), Path({str(lora)!r}), Path({str(out)!r}));"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"peak_rss_mb": round(int(proc.stdout.strip().splitlines()[-1]) / 1024), "seconds":
            round(time.perf_counter() - t0, 1), "bytes_on_disk": sum(f.stat().st_size for f in out.rglob("*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import torch

    from edgepack.checkpoint import Checkpoint
    from edgepack.testing import make_real_shape

    with tempfile.TemporaryDirectory(prefix="edgepack-merge-") as tmp_s:
        tmp = Path(tmp_s)
        base = make_real_shape(a.shape, tmp / "base")
        lora = adapter(base, tmp / "lora", a.rank)
        runs = {"streamed (edgepack)": peak("streamed", base, lora, tmp / "streamed"),
                "peft merge_and_unload": peak("peft", base, lora, tmp / "peft")}
        s, p = Checkpoint(tmp / "streamed"), Checkpoint(tmp / "peft")
        worst = 0.0
        for name in s.entries:
            if name in p:
                worst = max(worst, float((s.read(name).to(torch.float32) - p.read(name).to(torch.float32))
                                         .abs().max()))
        base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    result = {"command": " ".join(sys.argv), "shape": a.shape, "rank": a.rank, "modules": MODULES,
              "base_checkpoint_bytes": base_bytes, "runs": runs, "max_abs_difference": worst}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
