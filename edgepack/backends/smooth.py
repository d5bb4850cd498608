"""SmoothQuant for LiteRT's dynamic int8: move activation outliers into the weights, exactly, before export.

Dynamic int8 quantizes each token's activations to int8 on the fly with one scale per row, so a few huge input
channels (SmolLM2's down_proj inputs reach 2,800 where the median channel peaks near 1) leave the other channels a
handful of levels. For every linear layer, input channel j is divided by s_j and the weight's column j multiplied
by s_j, with s_j = max|x_j|^α / max|W_j|^(1-α) (Xiao et al., SmoothQuant; α = 0.5) over a calibration sample. The
division is folded into what produces the input, so the float model computes the same function:

- the attention and MLP input norms' weights (q/k/v and gate/up read them; Gemma's norms scale by 1 + w);
- up_proj's rows for down_proj (down reads act(gate) * up, linear in up);
- v_proj's rows for o_proj (attention mixes positions, never channels; one s per kv-head channel, shared by the
  query heads of its group).

The graph, its kernels and its size are dynamic int8's own, so this costs nothing at run time. The checkpoint is
written to a work folder and converted from there; the original is untouched. The float logits of the smoothed
checkpoint are checked against the original's before anything is exported.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import ModelError, require
from edgepack.progress import ProgressEvent, ProgressFn
from edgepack.source import ModelSource

ALPHA = 0.5
# A block's input to a part is an outlier when its peak is this many times the median block's peak (SmolLM2's
# down_proj inputs: 2,824, 2,365 and 447 in blocks 11, 28 and 29, against a median of ~15).
OUTLIER_FACTOR = 10.0
# The parts of litert_recipe each calibrated input feeds.
_PARTS = {"attn": ("attention.qkv",), "mlp": ("feedforward.gate", "feedforward.up"), "o": ("attention.output",),
          "down": ("feedforward.down",)}
_CLAMP = (1e-2, 1e3)  # a channel that never fires must not become a huge weight column


@dataclass(frozen=True)
class Norms:
    """Which RMSNorm feeds attention and the MLP, and whether it scales by (1 + weight) (Gemma)."""

    attention: str = "input_layernorm"
    mlp: str = "post_attention_layernorm"
    plus_one: bool = False


NORMS: dict[str, Norms] = {
    "llama": Norms(), "mistral": Norms(), "qwen2": Norms(), "qwen3": Norms(), "phi3": Norms(),
    "gemma": Norms(plus_one=True),
    # Gemma 2/3 norm the attention output after o_proj (post_attention_layernorm) and the MLP input before it.
    "gemma2": Norms(mlp="pre_feedforward_layernorm", plus_one=True),
    "gemma3_text": Norms(mlp="pre_feedforward_layernorm", plus_one=True),
}


def _scale(act: Any, weight_cols: Any, alpha: float) -> Any:
    s = act.clamp(min=1e-5) ** alpha / weight_cols.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(*_CLAMP)


def _awq_scale(x: Any, weights: list[Any], block: int, tie: Any = None) -> Any:
    """AWQ's search (Lin et al.): s = mean|x|^a for a in 0..1, the one whose int4-RTN weights (W·s quantized, then
    ÷ s) reproduce x·Wᵀ best on the calibration rows. `tie` maps per-channel values to shared ones (GQA's o_proj)."""
    import torch

    from edgepack.backends.gptq import dequantize, rtn

    w = torch.cat(weights, 0)
    ref = x @ w.T
    mean = x.abs().mean(0)
    if tie is not None:
        mean = tie(mean)
    best, best_s = float("inf"), torch.ones_like(mean)
    for a in [i / 20 for i in range(21)]:
        s = mean.clamp(min=1e-4) ** a
        s = s / (s.max() * s.min()).sqrt()
        err = float(((x @ (dequantize(rtn(w * s, block), block) / s).T - ref) ** 2).mean())
        if err < best:
            best, best_s = err, s
    return best_s


def smooth(source: ModelSource, out_dir: Path, cal: Any, progress: ProgressFn, *,
           alpha: float = ALPHA, method: str = "smoothquant", block: int = 32) -> dict[str, Any]:
    """Write a smoothed copy of source's checkpoint to out_dir; returns what was done (for the manifest).
    method "smoothquant": s from activation and weight ranges (for int8 activations); "awq": s searched for int4
    weights (block `block`), the same folds."""
    torch = require("torch", "tflite", "SmoothQuant")
    transformers = require("transformers", "tflite", "SmoothQuant")
    from safetensors.torch import save_file

    from edgepack.backends.calibration import calibration_ids

    model = transformers.AutoModelForCausalLM.from_pretrained(str(source.hf_dir), dtype=torch.float32)
    model.eval()
    cfg = model.config
    model_type = str(getattr(cfg, "model_type", ""))
    norms = NORMS.get(model_type)
    if norms is None:
        raise ModelError(f"quantize.algorithm = \"smoothquant\" does not know where {model_type} normalises its "
                         "layer inputs.", hint="Use algorithm = \"default\" or \"weight_only\" for this model.",
                         model_type=model_type, supported=sorted(NORMS))
    ids = calibration_ids(model, source, cal, progress)
    layers = model.model.layers
    fused = hasattr(layers[0].self_attn, "qkv_proj")  # Phi-3: qkv_proj and gate_up_proj
    inputs = {"attn": "self_attn.qkv_proj" if fused else "self_attn.q_proj",
              "mlp": "mlp.gate_up_proj" if fused else "mlp.gate_proj",
              "o": "self_attn.o_proj", "down": "mlp.down_proj"}
    amax: dict[tuple[int, str], Any] = {}
    samples: dict[tuple[int, str], list[Any]] = {}
    handles = []
    for i, layer in enumerate(layers):
        for key, name in inputs.items():
            def hook(_m: Any, inp: tuple[Any, ...], _o: Any, k: tuple[int, str] = (i, key)) -> None:
                rows = inp[0].detach().reshape(-1, inp[0].shape[-1])
                x = rows.abs().amax(0)
                amax[k] = torch.maximum(amax[k], x) if k in amax else x
                if method == "awq":  # every 4th token is plenty for a 21-point search
                    samples.setdefault(k, []).append(rows[::4].clone())
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    progress(ProgressEvent("quantize", f"{method}: activation ranges over {ids.shape[0]}×{ids.shape[1]} tokens"))
    with torch.no_grad():
        for b in range(0, ids.shape[0], 4):
            model(ids[b:b + 4], use_cache=False)
        probe = ids[:1, :128]
        before = model(probe, use_cache=False).logits
    for h in handles:
        h.remove()

    outliers: dict[str, list[int]] = {}
    for key, parts in _PARTS.items():
        peaks = torch.stack([amax[(i, key)].max() for i in range(len(layers))])
        hot = [i for i in range(len(layers)) if float(peaks[i]) > OUTLIER_FACTOR * float(peaks.median())]
        outliers.update({part: hot for part in parts})
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    group = heads // kv_heads
    peak = 1.0
    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            q_in = [attn.qkv_proj] if fused else [attn.q_proj, attn.k_proj, attn.v_proj]
            mlp_in = [mlp.gate_up_proj] if fused else [mlp.gate_proj, mlp.up_proj]
            def scale(key: str, linears: list[Any], tie: Any = None, i: int = i) -> Any:
                if method == "awq":
                    return _awq_scale(torch.cat(samples[(i, key)], 0), [m.weight for m in linears], block, tie)
                a, cols = amax[(i, key)], torch.stack([m.weight.abs().amax(0) for m in linears]).amax(0)
                return _scale(tie(a) if tie else a, tie(cols) if tie else cols, alpha)

            for key, norm_name, linears in (("attn", norms.attention, q_in), ("mlp", norms.mlp, mlp_in)):
                s = scale(key, linears)
                norm = layer.get_submodule(norm_name)
                if norms.plus_one:
                    norm.weight.copy_((1.0 + norm.weight) / s - 1.0)
                else:
                    norm.weight.div_(s)
                for m in linears:
                    m.weight.mul_(s)
                peak = max(peak, float(s.max()))
            # down_proj reads act(gate) * up: divide up's rows.
            s = scale("down", [mlp.down_proj])
            up_rows = mlp.gate_up_proj.weight[-s.numel():] if fused else mlp.up_proj.weight
            up_rows.div_(s[:, None])
            if not fused and getattr(mlp.up_proj, "bias", None) is not None:
                mlp.up_proj.bias.div_(s)
            mlp.down_proj.weight.mul_(s)
            peak = max(peak, float(s.max()))
            # o_proj reads softmax(qk) v per head: one s per v channel, shared by the query heads of its group.
            def per_kv(v: Any) -> Any:  # o_proj input channel → its kv-head channel (the max over the group)
                return v.reshape(kv_heads, group, head_dim).amax(1).reshape(kv_heads, 1, head_dim).expand(
                    kv_heads, group, head_dim).reshape(-1)

            s = scale("o", [attn.o_proj], per_kv).reshape(kv_heads, group, head_dim)[:, 0].reshape(-1)
            v = attn.qkv_proj if fused else attn.v_proj
            v_rows = v.weight[-s.numel():] if fused else v.weight
            v_rows.div_(s[:, None])
            if getattr(v, "bias", None) is not None:
                (v.bias[-s.numel():] if fused else v.bias).div_(s)
            attn.o_proj.weight.mul_(s.reshape(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1))
            peak = max(peak, float(s.max()))
        after = model(probe, use_cache=False).logits
    drift = float((after - before).abs().max() / before.abs().max())
    if drift > 1e-3:
        raise ModelError(f"SmoothQuant changed the float model's logits by {drift:.1e} (relative): the folds do not "
                         f"hold for {model_type}.", hint="Use algorithm = \"default\" for this model and report it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in source.hf_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out_dir / f.name)
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return {"alpha": alpha, "layers": len(layers), "max_scale": round(peak, 2), "float_drift": float(f"{drift:.1e}"),
            "outliers": outliers}
