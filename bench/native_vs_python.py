"""The price of Python on the device: the same bundle answered by run.py (CPython + the wheels' venv) and by
native/edgepack-chat (C, the same onnxruntime-genai libraries), on the same prompt, greedy. Rounds alternate the
two programs (the machine is noisy); medians of decode tok/s, load time, whole-process wall time and peak RSS
(VmHWM, both report it the same way), and the bytes each route puts on the device.

    python bench/native_vs_python.py [--bundle dist/smollm2-135m-host] [--tokens 128] [--rounds 5] [--threads 0]

One machine, one run: quote the ratios. Writes bench/results/native_vs_python.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a story about a lighthouse keeper who finds a message in a bottle."


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def venv_bytes(bundle: Path) -> int:
    """What install.sh puts on the device for Python: a venv with the bundle's wheels installed (offline)."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--no-deps", "--require-hashes",
                        "--find-links", str(bundle / "wheels"),
                        "-r", str(bundle / "wheels" / "requirements.lock")], check=True, cwd=bundle / "wheels")
        return folder_bytes(venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("dist/smollm2-135m-host"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/native_vs_python.json"))
    args = ap.parse_args()
    b = args.bundle.resolve()
    program = b / "native" / "edgepack-chat"
    if not program.is_file():
        sys.exit(f"{b} has no native/edgepack-chat: build it with runtime binaries (edgepack build, not --no-wheels)")
    ask = ["--prompt", PROMPT, "--max-tokens", str(args.tokens), "--threads", str(args.threads), "--json"]
    routes = {"python": ([sys.executable, str(b / "run.py"), *ask], None), "native": ([str(program), *ask], {})}
    rows: dict[str, list[dict]] = {k: [] for k in routes}
    for i in range(args.rounds):
        for name in (list(routes) if i % 2 == 0 else list(reversed(routes))):
            cmd, env = routes[name]
            doc, wall = run(cmd, env)
            rows[name].append({"decode_tokens_per_s": doc["decode_tokens_per_s"], "load_s": doc["load_s"],
                               "prefill_ms": doc["prefill_ms"], "peak_rss_mb": doc["peak_rss_mb"], "wall_s": wall,
                               "tokens": doc["tokens"]})
    med = {name: {k: round(statistics.median(r[k] for r in rs), 3)
                  for k in ("decode_tokens_per_s", "load_s", "prefill_ms", "peak_rss_mb", "wall_s")}
           for name, rs in rows.items()}
    same = all(r["tokens"] == rows["python"][0]["tokens"] for rs in rows.values() for r in rs)
    manifest = json.loads((b / "edgepack.json").read_text())
    sizes = {"native_bytes": folder_bytes(b / "native"), "wheels_bytes": folder_bytes(b / "wheels"),
             "model_bytes": folder_bytes(b / "model"), "bundle_bytes": folder_bytes(b),
             "native_libraries_bytes": sum(lib["bytes"] for lib in manifest["native"]["libraries"]),
             "native_program_bytes": (program.stat().st_size)}
    if (b / "wheels" / "requirements.lock").is_file():
        sizes["python_venv_bytes"] = venv_bytes(b)
    out = {"bundle": b.name, "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads, "same_tokens": same,
           "median": med, "sizes": sizes,
           "ratio_native_over_python": {k: round(med["native"][k] / med["python"][k], 3)
                                        for k in ("decode_tokens_per_s", "peak_rss_mb", "load_s", "wall_s")}}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
