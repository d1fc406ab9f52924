"""Wall time of the whole study: `memloc run --preset smoke` (and, with --default, the default preset).

    python benchmarks/study_speed.py               # smoke only (target: within 2 minutes on a 2-core CPU)
    python benchmarks/study_speed.py --default     # also the default study (target: within 20 minutes on a 2-core CPU)
    python benchmarks/study_speed.py --paper --dataset synthetic   # on a GPU (target: within 10 minutes on one H100)

Each study runs in a fresh temporary directory as a separate process; prints the
seconds per preset and the seconds per stage from study.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(preset: str, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "study"
        cmd = [sys.executable, "-m", "memloc.cli", "run", "--preset", preset, "--out", str(out), "--quiet", *extra]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stdout[-2000:], res.stderr[-2000:])
            raise SystemExit(f"{preset} study failed (exit {res.returncode})")
        stages = json.loads((out / "study.json").read_text())["stages"]
        per = ", ".join(f"{k} {v.get('seconds', 0):.0f}s" for k, v in stages.items() if "seconds" in v)
        print(f"preset {preset}: {wall:.1f} s in all ({per})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--default", action="store_true", help="also time the default study")
    p.add_argument("--paper", action="store_true", help="time the paper preset instead (GPU)")
    p.add_argument("--dataset", help="dataset for the paper preset, e.g. synthetic")
    args = p.parse_args()
    if args.paper:
        run("paper", ["--dataset", args.dataset] if args.dataset else [])
        return
    run("smoke", [])
    if args.default:
        run("default", [])


if __name__ == "__main__":
    main()
