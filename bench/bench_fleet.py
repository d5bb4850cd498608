"""Rollout time from 1 to N local devices (real sshd boards on loopback, each its own install dir), with
`edgepack deploy --inventory` in one batch (--canary 0 --batch 100%), forks 1 and forks N; then the same bundle
again (nothing to send or install: Ansible's and the device helper's own cost per host).

    .venv/bin/python bench/bench_fleet.py BUNDLE [--sizes 1,2,4,8] [--out bench/results/fleet.json]

Every board shares this machine's cores, so this measures edgepack's and Ansible's overhead and how forks
overlap the devices' own work (venv + offline pip install + smoke test), not a real fleet's network.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.sshd import make_server  # noqa: E402


def rollout(inv: Path, kh: Path, bundle: Path, forks: int) -> tuple[float, dict]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edgepack", "--json", "deploy", "--inventory", str(inv),
                           "--known-hosts", str(kh), str(bundle), "--canary", "0", "--batch", "100%",
                           "--forks", str(forks)], capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    doc = json.loads(proc.stdout)
    if not doc["ok"]:
        raise SystemExit(f"rollout failed: {doc['error']['message']}")
    return seconds, doc["result"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--forks", default="1,n", help="forks to try per size: numbers, and n for the size itself")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-fleet-") as tmp:
        root = Path(tmp)
        servers = [make_server(root / f"board{i}") for i in range(max(sizes))]
        for s in servers:
            s.start()
        try:
            kh = root / "known_hosts"
            kh.write_text("".join(s.host_key_line() for s in servers))
            python = os.path.realpath(sys.executable)
            for n in sizes:
                for forks in sorted({n if f == "n" else int(f) for f in args.forks.split(",")}):
                    where = root / f"n{n}-f{forks}"
                    inv = where / "inventory.ini"
                    where.mkdir()
                    inv.write_text("[boards]\n" + "".join(
                        f"board{i} ansible_host={s.address} ansible_port={s.port} ansible_user=root "
                        f"ansible_ssh_private_key_file={s.user_key} ansible_python_interpreter={python} "
                        f"edgepack_install_dir={where}/board{i}\n" for i, s in enumerate(servers[:n])))
                    first, res = rollout(inv, kh, args.bundle, forks)
                    again, _ = rollout(inv, kh, args.bundle, forks)
                    row = {"devices": n, "forks": forks, "first_s": round(first, 1), "again_s": round(again, 1),
                           "first_per_device_s": round(first / n, 1), "again_per_device_s": round(again / n, 1),
                           "uploaded_mb_per_device": round(res["hosts"][0]["uploaded_bytes"] / 1e6, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            for s in servers:
                s.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []  # other sizes' rows stay
    keep = [r for r in old if (r["devices"], r["forks"]) not in {(r2["devices"], r2["forks"]) for r2 in rows}]
    rows = sorted(keep + rows, key=lambda r: (r["devices"], r["forks"]))
    args.out.write_text(json.dumps({"bundle": args.bundle.name, "cpus": os.cpu_count(), "rows": rows}, indent=2)
                        + "\n")


if __name__ == "__main__":
    main()
