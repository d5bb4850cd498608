"""The gate's layered fp32 reference (edgepack.checkpoint.layered_model): time and peak memory of one 512-token
window and a few greedy tokens, on a checkpoint folder (e.g. a real-shape one from bench/build_memory.py).

    .venv/bin/python bench/layered_reference.py /tmp/tinyllama --tokens 8
    .venv/bin/python bench/layered_reference.py /tmp/tinyllama --tokens 8 --allocate   # without tensor reuse
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--allocate", action="store_true", help="allocate each layer anew (reuse=False)")
    args = ap.parse_args()

    import torch

    from edgepack import checkpoint

    if args.allocate:
        init = checkpoint.LazyWeights.__init__

        def no_reuse(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **{**k, "reuse": False})

        checkpoint.LazyWeights.__init__ = no_reuse  # type: ignore[method-assign]
    model = checkpoint.layered_model(args.model)
    if model is None:
        raise SystemExit(f"{args.model}: not a checkpoint the layered loader takes")
    ids = torch.randint(0, 500, (1, args.window))
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    with torch.inference_mode():
        model(ids)
        t1 = time.time()
        model.generate(ids[:, :16], attention_mask=torch.ones(1, 16, dtype=torch.long), max_new_tokens=args.tokens,
                       do_sample=False, pad_token_id=0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"window {t1 - t0:.1f} s; {args.tokens} greedy tokens {time.time() - t1:.1f} s; "
          f"user {r1.ru_utime - r0.ru_utime:.1f} s, system {r1.ru_stime - r0.ru_stime:.1f} s; "
          f"peak RSS {r1.ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main()
