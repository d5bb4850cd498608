"""Build a bundle from Python (what the CLI does), then read its quality report.

    python examples/build_with_api.py [MODEL] [TARGET]
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgepack import api
from edgepack.progress import ProgressEvent


def show(event: ProgressEvent) -> None:
    if event.total is None:
        print(f"  {event.stage}: {event.message}", file=sys.stderr)


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    target = sys.argv[2] if len(sys.argv) > 2 else "host"
    result = api.build(api.BuildRequest(model=model, target=target, out=Path("dist"), force=True), progress=show)
    q = result.quality
    print(f"{result.bundle}: {result.bytes / 1e6:.1f} MB, perplexity {q.ppl_reference} -> {q.ppl_quantized} "
          f"({q.ppl_delta_pct:+.2f} %), passed={q.passed}")
    for stage in result.stages:
        print(f"  {stage.name:<9} {stage.seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
