"""What an export backend provides: export+quantize, a scorer on the bundle's runtime, its runtime wheels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgepack.families import Family
from edgepack.models import ModelSource
from edgepack.progress import ProgressFn
from edgepack.targets import TargetProfile


@dataclass(frozen=True)
class GraphStats:
    nodes: int
    quantized_matmuls: int
    float_matmuls: int
    bits: tuple[int, ...]
    op_types: dict[str, int]


@dataclass(frozen=True)
class NativeLibrary:
    """One shared library of a runtime for a bundle's native/ (stages/native.py): the distribution whose wheel
    carries it, the member's pattern (a regex) in the wheel, and its name in native/ (its soname)."""

    package: str
    member: str
    name: str


@dataclass(frozen=True)
class ExportedModel:
    dir: Path
    format: str
    scheme: str
    options: dict[str, Any]
    bytes: int
    stats: GraphStats
    runtime_versions: dict[str, str]
    context_length: int = 0  # prompt + reply tokens the exported model holds (its KV cache length)


class Scorer(Protocol):
    """The bundle's runtime, driven from the build machine to score the model it will ship."""

    def encode(self, text: str) -> list[int]: ...

    def logits(self, ids: list[int]) -> Any: ...  # numpy [len(ids), vocab]

    def greedy(self, ids: list[int], n: int) -> list[int]: ...


class Exporter(Protocol):
    format: str
    runtime: str
    template: str  # the runtime template a target gets when --format picks this exporter
    packages: tuple[str, ...]  # the runtime distributions to vendor with it
    native_libraries: tuple[NativeLibrary, ...]  # its shared libraries for native/ (stages/native.py); () = none
    native_default: bool  # native/ unless --no-native (else only with --native)

    @staticmethod
    def check_profile(p: TargetProfile) -> None: ...  # this format's rules for a target profile | TargetError

    @staticmethod
    def check_supported(source: ModelSource, target: TargetProfile) -> Family: ...  # families.toml row | ModelError

    @staticmethod
    def export(source: ModelSource, target: TargetProfile, out_dir: Path, work_dir: Path,
               progress: ProgressFn) -> ExportedModel: ...

    @staticmethod
    def scorer(model_dir: Path, adapter: Path | None = None) -> Scorer: ...  # adapter: a runtime LoRA (onnx)


def run_logged(cmd: list[str], log: Path, **env: str) -> tuple[int, list[str]]:
    """Run a converter process with its output in `log` (offline hub); returns (exit code, last 15 lines)."""
    import os
    import subprocess

    with log.open("wb") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **env})
    return proc.returncode, log.read_text(errors="replace").splitlines()[-15:]
