"""The build machine planned like the device: a build the machine cannot hold is refused before exporting, and a
builder the kernel's OOM killer kills (inside a real memory cgroup) is exit 1 `build_out_of_memory`, not a bug."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli, envelope, needs_onnx

pytestmark = needs_onnx

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
# edgepack's own process holds ~280 MiB when the builder starts (measured: torch is imported for the export), and
# the builder ~470 MiB once torch and transformers are imported: at 700 MiB the builder is the larger process when
# the limit is reached, so the OOM killer picks it; the model below makes it need far more than that.
LIMIT_MIB = 700


def test_refused_before_exporting_when_the_machine_cannot_hold_it(tiny_model: Path, tiny_target: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli("--json", "build", "--target", str(tiny_target), str(tiny_model), "--out", str(out), "--no-wheels",
               "--no-cache", env={"EDGEPACK_BUILD_MEMORY_MB": "256"})
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and err["code"] == "build_out_of_memory", (err, proc.stderr[-2000:])
    assert err["stage"] == "plan" and err["limit_mib"] == 256 and err["planned_peak_mib"] > 256
    assert err["measured_peak_mib"] is None and "nothing was exported" in err["message"]
    assert "EDGEPACK_BUILD_MEMORY_MB=0" in err["hint"] and "at least" in err["hint"]
    assert "onnxruntime-genai builder" not in proc.stderr  # the builder never started
    assert not out.exists() or not any(out.rglob("model.onnx"))


@contextlib.contextmanager
def memory_cgroup(limit_mib: int) -> Iterator[Path]:
    """A child cgroup (v1 memory controller) with a hard limit, removed afterwards; skip when none can be made."""
    if not (CGROUP_V1 / "memory.limit_in_bytes").is_file():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = CGROUP_V1 / f"edgepack-test-oom-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot create a memory cgroup here ({exc}): needs root and a writable cgroup v1 tree")
    with contextlib.suppress(OSError):  # no swap to hide in, where the kernel accounts it
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mib << 20))
    try:
        yield group
    finally:
        deadline = time.monotonic() + 30
        while True:  # the group goes once its processes (all exited by now) are reaped
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_a_builder_killed_by_the_oom_killer_is_build_out_of_memory(tmp_path: Path, tiny_target: Path) -> None:
    from edgepack.testing import make_tiny

    # ~75M parameters: the builder needs ~1.2 GiB, far past the limit (at ~35M it sometimes fit: pages of shared
    # libraries already cached elsewhere are not charged to the group), while the build stays a small one.
    model = make_tiny("llama", tmp_path / "tiny-75m", hidden=1024, layers=8, tie_word_embeddings=True)
    # k-quant through the builder's own whole-model pass (EDGEPACK_STREAMING=0 below): streamed, it would fit
    target = tmp_path / "tiny-kquant.toml"
    target.write_text(tiny_target.read_text().replace('algorithm = "default"', 'algorithm = "k_quant"', 1))
    out = tmp_path / "out"
    with memory_cgroup(LIMIT_MIB) as group:
        # The CLI joins the cgroup before it starts, as a CI job would run inside its runner's limit.
        boot = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
                "os.execv(sys.executable, [sys.executable, '-m', 'edgepack', *sys.argv[2:]])")
        import subprocess

        proc = subprocess.run([sys.executable, "-c", boot, str(group / "cgroup.procs"), "--json", "build",
                               "--target", str(target), str(model), "--out", str(out), "--no-wheels",
                               "--no-cache"], capture_output=True, text=True, timeout=600, check=False,
                              env={**os.environ, "EDGEPACK_BUILD_MEMORY_MB": "0",  # the estimate off: the kernel
                                   "EDGEPACK_STREAMING": "0"})
        kills = int(next(line.split()[1] for line in (group / "memory.oom_control").read_text().splitlines()
                         if line.startswith("oom_kill ")))
    err = envelope(proc)["error"]
    assert proc.returncode == 1 and kills >= 1, (proc.returncode, err, proc.stderr[-2000:])
    assert err["code"] == "build_out_of_memory" and err["kind"] == "out-of-memory", err
    assert err["stage"] == "export" and err["exit_code"] == -9 and err["oom_kills"] >= 1, err
    assert err["limit_mib"] == LIMIT_MIB and "memory.limit_in_bytes" in err["limited_by"], err
    # The killed builder's own peak RSS (shared library pages count there, not always against the cgroup).
    assert err["measured_peak_mib"] > 100 and err["planned_peak_mib"] > LIMIT_MIB, err
    assert "OOM killer" in err["message"] and "this is a bug" not in (err["hint"] or ""), err
    assert "Traceback" not in proc.stderr
