"""The `scale` tier: builds of random checkpoints with released models' exact shapes, inside a memory limit.

Outside the default run (pyproject's addopts deselect `scale`); `make test-scale` runs it. Each test makes its
checkpoint (edgepack.testing.make_real_shape: GBs on disk, a minute), then runs the real CLI inside a memory
cgroup of its own, so a build that needs more than the limit is killed by the kernel and the test fails. Needs a
cgroup it may create (root on cgroup v1 or v2); skipped otherwise. Timing is in docs/performance.md, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import FIXTURES, envelope, needs_onnx

pytestmark = [pytest.mark.scale, needs_onnx]

GIB = 1 << 30


class MemoryCgroup:
    """A memory cgroup of our own with a hard limit (v1 memory controller or v2 memory.max)."""

    def __init__(self, limit: int) -> None:
        name = f"edgepack-scale-{uuid.uuid4().hex[:8]}"
        v1 = Path("/sys/fs/cgroup/memory")
        if v1.is_dir():
            self.path, self.limit_file, self.peak_file = v1 / name, "memory.limit_in_bytes", "memory.max_usage_in_bytes"
        else:
            self.path, self.limit_file, self.peak_file = Path("/sys/fs/cgroup") / name, "memory.max", "memory.peak"
        try:
            self.path.mkdir()
            (self.path / self.limit_file).write_text(str(limit))
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup here ({exc}): run the scale tier as root")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        f = self.path / self.peak_file
        return int(f.read_text()) if f.is_file() else 0

    def remove(self) -> None:
        self.path.rmdir()


@pytest.fixture
def cgroup_4g() -> Iterator[MemoryCgroup]:
    cg = MemoryCgroup(4 * GIB)
    yield cg
    cg.remove()


@pytest.fixture(scope="module")
def tinyllama_shape(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.testing import make_real_shape

    return make_real_shape("tinyllama-1.1b", tmp_path_factory.mktemp("real") / "tinyllama-1.1b")


def test_tinyllama_shape_builds_inside_4_gb(tinyllama_shape: Path, cgroup_4g: MemoryCgroup, tmp_path: Path) -> None:
    # The builder alone measured 7.9 GB before streaming (docs/performance.md). The gate's fp32 reference is
    # not streamed yet (4.4 GB at 1.1B by itself), so the gate is off: this proves the export path.
    env = {**os.environ, "EDGEPACK_NO_CACHE": "1",
           # the build planner's cost of this exporter still says ~10 bytes per parameter (pre-streaming)
           "EDGEPACK_BUILD_MEMORY_MB": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgepack", "--json", "build", "--target", str(FIXTURES / "tiny-target.toml"),
         str(tinyllama_shape), "--out", str(tmp_path), "--skip-validation", "--no-wheels"],
        capture_output=True, text=True, env=env, preexec_fn=cgroup_4g.enter, timeout=1800, check=False)
    peak = cgroup_4g.peak()
    print(f"cgroup peak {peak / GIB:.2f} GiB")
    assert proc.returncode == 0, f"exit {proc.returncode}, cgroup peak {peak / GIB:.2f} GiB\n{proc.stderr[-3000:]}"
    doc = envelope(proc)
    assert doc["ok"]
    bundle = Path(doc["result"]["bundle"])
    manifest = json.loads((bundle / "edgepack.json").read_text())
    graph = manifest["export"]["graph"]
    # 22 layers × (packed qkv, o, gate, up, down) + the head, all int4: nothing was left float.
    assert graph["quantized_matmuls"] == 22 * 5 + 1 and graph["float_matmuls"] == 0, graph
    assert (bundle / "model" / "model.onnx.data").stat().st_size > 600 * 2**20
