"""The price of runtime LoRA adapters against merged fine-tunes: build time, bytes, decode speed, memory per loaded
adapter, and the cost of switching adapters between requests, through onnxruntime-genai as the bundle runs it.

    python bench/adapters.py [--model smollm2-135m] [--target host] [--rank 16] [--adapters 4] [--reps 5]
                             [--rounds 3] [--out bench/results/adapters.json]

Makes `--adapters` random PEFT LoRA adapters (rank `--rank`, all seven projection modules, nothing trained) and
builds, with the CLI, a base with all of them as runtime adapters, the first one merged (`--adapter`), and the plain
base. Each measurement runs in a fresh process, on one thread, `--rounds` times interleaved (the median is kept):
decode tokens/s of the plain base,
the base with slots and no adapter, the base with adapter 0 active, and the merged build; RSS after loading the base
and after each adapter; the time to the first token of a request with and without an adapter, alternating adapters.
Speeds are ratios against the plain base measured in the same run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "The history of the printing press begins in"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def measure(bundle: Path, adapter: str | None, reps: int, tokens: int, load_all: bool) -> dict[str, Any]:
    """One fresh process: load the bundle's model (and its adapters), then time greedy decodes."""
    import onnxruntime_genai as og

    before = rss_mb()
    config = og.Config(str(bundle / "model"))  # one thread: a 2-core machine's timings are steadier
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                          "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tok = og.Tokenizer(model)
    loaded = rss_mb()
    adapters, per_adapter = None, []
    names = sorted(p.stem for p in (bundle / "adapters").glob("*.onnx_adapter")) if (bundle / "adapters").is_dir() \
        else []
    if names and (adapter or load_all):
        adapters = og.Adapters(model)
        for n in names:
            t0 = time.perf_counter()
            adapters.load(str(bundle / "adapters" / f"{n}.onnx_adapter"), n)
            per_adapter.append({"name": n, "load_ms": round((time.perf_counter() - t0) * 1000, 2),
                                "rss_mb": round(rss_mb(), 1)})
    ids = list(tok.encode(PROMPT))

    def run(name: str | None, n: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        if name:
            gen.set_active_adapter(adapters, name)
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        got = 1
        while got < n and not gen.is_done():
            gen.generate_next_token()
            got += 1
        t2 = time.perf_counter()
        return t1 - t0, (got - 1) / (t2 - t1) if got > 1 else 0.0

    run(adapter, 8)  # warm-up
    speeds = [run(adapter, tokens)[1] for _ in range(reps)]
    out: dict[str, Any] = {"rss_before_mb": round(before, 1), "rss_loaded_mb": round(loaded, 1),
                           "adapters": per_adapter, "decode_tokens_per_s": round(statistics.median(speeds), 2)}
    if load_all and len(names) > 1:  # first token of a 1-token request: base, then adapters in turn (a switch each)
        firsts: dict[str, list[float]] = {"base": [], "adapter_switching": [], "adapter_same": []}
        for i in range(reps * 2):
            firsts["base"].append(run(None, 1)[0])
            firsts["adapter_switching"].append(run(names[i % len(names)], 1)[0])
            firsts["adapter_same"].append(run(names[0], 1)[0])
        out["first_token_ms"] = {k: round(statistics.median(v) * 1000, 2) for k, v in firsts.items()}
    return out


def lora(base: Path, out: Path, seed: int, rank: int) -> Path:
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=MODULES, init_lora_weights="gaussian",
                             task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # a trained adapter's B is not zero; small, as fine-tunes are
        for name, p in wrapped.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.02)
    wrapped.save_pretrained(out)
    return out


def cli(*args: str) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgepack", "-q", "--json", *args], capture_output=True, text=True,
                          check=False)
    doc = json.loads(proc.stdout)
    if not doc["ok"]:
        raise SystemExit(f"edgepack {' '.join(args[:2])} failed: {doc['error']}")
    return doc["result"], round(time.perf_counter() - t0, 1)


def in_fresh_process(bundle: Path, adapter: str | None, reps: int, tokens: int, load_all: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", str(bundle), "--reps", str(reps), "--tokens", str(tokens)]
    cmd += (["--adapter", adapter] if adapter else []) + (["--load-all"] if load_all else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="host")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration, interleaved")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--load-all", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.adapter, a.reps, a.tokens, a.load_all)))
        return
    from edgepack.models import resolve_model

    source = resolve_model(a.model)
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-adapters-") as tmp_s:
        tmp = Path(tmp_s)
        loras = [lora(source.hf_dir, tmp / f"a{i}", i, a.rank) for i in range(a.adapters)]
        flags = [x for i, p in enumerate(loras) for x in ("--runtime-adapter", f"a{i}={p}")]
        plain, plain_s = cli("build", a.model, "--target", a.target, "--out", str(tmp / "plain"), "--no-wheels")
        slots, slots_s = cli("build", a.model, "--target", a.target, "--out", str(tmp / "slots"), "--no-wheels",
                             *flags)
        merged, merged_s = cli("build", a.model, "--target", a.target, "--out", str(tmp / "merged"), "--no-wheels",
                               "--adapter", str(loras[0]))
        b_plain, b_slots, b_merged = (Path(r["bundle"]) for r in (plain, slots, merged))
        configs = {"plain base": (b_plain, None, False), "base with slots, no adapter": (b_slots, None, False),
                   "base with slots, adapter a0": (b_slots, "a0", False), "merged a0": (b_merged, None, False),
                   "all adapters loaded": (b_slots, None, True)}
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
        for _ in range(a.rounds):  # interleaved, each in a fresh process: drift hits every configuration alike
            for k, (b, adapter, load_all) in configs.items():
                rounds[k].append(in_fresh_process(b, adapter, a.reps, a.tokens, load_all))
        runs = {k: v[-1] | {"decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in v),
                            "decode_tokens_per_s_rounds": [r["decode_tokens_per_s"] for r in v]}
                for k, v in rounds.items()}
        ref = runs["plain base"]["decode_tokens_per_s"]
        manifest = json.loads((b_slots / "edgepack.json").read_text())
        result = {
            "command": " ".join(sys.argv), "model": a.model, "target": a.target, "rank": a.rank,
            "modules": MODULES, "note": "SmolLM2's float reference is its Q4_1 GGUF dequantized" if "smollm2" in
            a.model else "",
            "build_s": {"plain": plain_s, "with adapters": slots_s, "merged": merged_s},
            "bytes": {"plain bundle": plain["bytes"], "merged bundle": merged["bytes"],
                      "adapter file": [x["bytes"] for x in manifest["adapters"]],
                      "base with slots, model/model.onnx": (b_slots / "model" / "model.onnx").stat().st_size,
                      "plain base, model/model.onnx": (b_plain / "model" / "model.onnx").stat().st_size},
            "gate": {x["name"]: {"ppl_delta_pct": x["quality"]["ppl_delta_pct"], "mean_kl": x["quality"]["mean_kl"],
                                 "top1": x["quality"]["top1_agreement"]} for x in manifest["adapters"]},
            "runs": runs,
            "decode_vs_plain_base": {k: round(v["decode_tokens_per_s"] / ref, 3) for k, v in runs.items()},
        }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
