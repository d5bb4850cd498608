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
from pathlib import Path

import pytest

from ..conftest import envelope, needs_onnx

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


KQUANT = ('[quantize]\nscheme = "int4"\nblock_size = 32\nsymmetric = true\naccuracy_level = 4\nalgorithm = "k_quant"\n'
          'head_precision = "int8"\nembedding_precision = "quantized"\nsensitive_layers_int8 = true\n\n')


def random_weights_target(name: str, folder: Path, quantize: str = "") -> Path:
    """A shipped target with its [quality] opened up: random weights are nothing to hold a quantized model to, but
    the gate still runs in full (the reference is scored, the bundle is run), which is what costs memory.
    `quantize`: a [quantize] table to use instead of the target's."""
    text = (Path(__file__).parents[2] / "targets" / f"{name}.toml").read_text()
    if quantize:
        text = text[:text.index("[quantize]")] + quantize + text[text.index("[quality]"):]
    start, end = text.index("[quality]"), text.index("[runtime]")
    loose = ("[quality]\nmax_ppl_increase_pct = 1000000.0\nmax_mean_kl = 1000.0\nmin_top1_agreement = 0.0\n"
             "min_greedy_match = 0\ngolden_tokens = 16\n\n")
    path = folder / f"{name}.toml"
    path.write_text(text[:start] + loose + text[end:])
    return path


def hub_cache(root: Path, repo: str, revision: str, checkpoint: Path) -> Path:
    """huggingface_hub's cache layout (models--org--name/snapshots/<revision>, refs/main), its files linked to the
    checkpoint as the hub links them to blobs."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in checkpoint.iterdir():
        (snap / f.name).symlink_to(f)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    return root


def build_in(cgroup: MemoryCgroup, args: list[str], env: dict[str, str]) -> tuple[dict, int]:
    proc = subprocess.run([sys.executable, "-m", "edgepack", "--json", "build", *args, "--no-wheels"],
                          capture_output=True, text=True, env={**os.environ, "EDGEPACK_NO_CACHE": "1", **env},
                          preexec_fn=cgroup.enter, timeout=3600, check=False)
    peak = cgroup.peak()
    print(f"cgroup peak {peak / GIB:.2f} GiB")
    assert proc.returncode == 0, f"exit {proc.returncode}, cgroup peak {peak / GIB:.2f} GiB\n{proc.stderr[-3000:]}"
    doc = envelope(proc)
    assert doc["ok"]
    for stage in doc["result"]["stages"]:
        print(f"  {stage['name']}: {stage['seconds']:.0f} s, peak {stage['peak_rss_mib']} MiB")
    return doc["result"], peak


@pytest.fixture(scope="module")
def tinyllama_shape(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.testing import make_real_shape

    return make_real_shape("tinyllama-1.1b", tmp_path_factory.mktemp("real") / "tinyllama-1.1b")


def test_the_cards_command_builds_tinyllama_inside_4_gb_with_the_gate(tinyllama_shape: Path,
                                                                     tmp_path: Path) -> None:
    """`edgepack build --target rpi5 tinyllama`, TinyLlama-1.1B-Chat's shape in the hub cache at the alias's pinned
    revision, offline, gate on, inside a 4 GB memory limit (a 2-core private runner has 7 GB). Before issue 21:
    exit 1 (context) and then 12.3 GB."""
    from edgepack.models import load_aliases

    alias = load_aliases()["tinyllama"]
    cache = hub_cache(tmp_path / "hub", alias.hub_id, alias.revision, tinyllama_shape)
    cgroup = MemoryCgroup(4 * GIB)
    try:
        result, _ = build_in(cgroup, ["--target", str(random_weights_target("rpi5", tmp_path)), "tinyllama",
                                      "--out", str(tmp_path / "out")],
                             {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    finally:
        cgroup.remove()
    assert result["context"]["source"] == "model" and result["context"]["tokens"] == 2048
    assert result["quality"]["validated"]
    manifest = json.loads((Path(result["bundle"]) / "edgepack.json").read_text())
    graph = manifest["export"]["graph"]
    # 22 layers × (packed qkv, o, gate, up, down) + the head, all quantized (imatrix int4, asymmetric, head
    # included): nothing was left float, and the untied embedding is an int4 table (GatherBlockQuantized).
    assert graph["quantized_matmuls"] == 22 * 5 + 1 and graph["float_matmuls"] == 0, graph
    assert graph["bits"] == [4] and graph["op_types"].get("GatherBlockQuantized") == 1, graph
    assert all(s["peak_rss_mib"] < 4096 for s in result["stages"])


def test_phi35_mini_shape_builds_inside_8_gb_with_the_gate(tmp_path_factory: pytest.TempPathFactory,
                                                            tmp_path: Path) -> None:
    """Phi-3.5-mini's shape (3.8B: fused qkv/gate_up, LongRoPE), rpi5-8gb with the k-quant recipe (its tune
    candidate int4-kq-head8-mixed) at 2,048 tokens, gate on, inside 8 GB (the issue's goal; 16 GB, a hosted runner,
    is the must). Before issue 21: killed inside 16 GB. The imatrix default measured 7,416 MiB (its calibration
    sample's KV cache): above 90 % of 8 GB, so the plan refuses it there, before exporting."""
    from edgepack.testing import make_real_shape

    model = make_real_shape("phi-3.5-mini", tmp_path_factory.mktemp("real") / "phi-3.5-mini")
    cgroup = MemoryCgroup(8 * GIB)
    try:
        target = random_weights_target("rpi5-8gb", tmp_path, KQUANT)
        result, _ = build_in(cgroup, ["--target", str(target), str(model), "--context", "2048",
                                      "--out", str(tmp_path / "out")], {})
    finally:
        cgroup.remove()
    assert result["quality"]["validated"]
    assert all(s["peak_rss_mib"] < 8192 for s in result["stages"])
