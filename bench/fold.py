"""Write a float-equivalent copy of a model with SmoothQuant's or AWQ's scales folded in, to build from.

    python bench/fold.py smollm2-135m /tmp/hf-awq --method awq [--alpha 0.5 --block 32]
    edgepack build --target <host variant> /tmp/hf-awq --eval-text bench/texts/python-reference.txt

How docs/targets.md measured AWQ on ONNX int4 (not a quantize.algorithm: it did not beat imatrix alone).
The calibration is the model's own seeded sample (edgepack's GPTQ/imatrix sample), never the gate's text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--method", choices=("smoothquant", "awq"), default="awq")
    ap.add_argument("--alpha", type=float, default=0.5, help="smoothquant's migration strength")
    ap.add_argument("--block", type=int, default=32, help="awq: the int4 block size its search quantizes with")
    args = ap.parse_args()

    from edgepack.backends import calibration, smooth
    from edgepack.models import resolve_model
    from edgepack.progress import silent

    info = smooth.smooth(resolve_model(args.model), args.out, calibration.Calibration(), silent, alpha=args.alpha,
                         method=args.method, block=args.block)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
