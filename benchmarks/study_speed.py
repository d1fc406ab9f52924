"""The whole study, stage by stage, against an earlier version of the code in the same run on the same machine.

    python benchmarks/study_speed.py                      # smoke: this code and the baseline (target: <= 30 s)
    python benchmarks/study_speed.py --default            # also the default study (target: <= 8 min, >= 1.9x)
    python benchmarks/study_speed.py --default --no-base  # only this code
    python benchmarks/study_speed.py --preset paper --dataset synthetic --no-base   # on a GPU (target: <= 5 min)

The baseline is `--base REF` (default: the last commit before issue #18's speed work) checked out
with `git archive` into a temporary folder and run from there (`PYTHONPATH=<folder>/src`) with the
same interpreter and packages. Each study runs as its own process in a fresh temporary directory, the
baseline first, then this code. Printed: wall time and seconds per stage (from study.json) of each,
the ratio baseline / ours per stage and overall, and the claims table's verdicts side by side
(`report/tables/summary_claims.csv`). `--json FILE` writes all of it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "827fcc7"  # the last commit before the speed work of issue #18 (fp32 on CPUs, no retraining cache)


def checkout(ref: str, into: Path) -> Path:
    """`ref`'s src/ tree under `into` (git archive: no working tree of the repository is touched)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def study(preset: str, extra: list[str], out: Path, src: Path) -> dict:
    """Run `memloc run --preset` with the code in `src`; wall time, stage seconds and claims."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    where = subprocess.run([sys.executable, "-c", "import memloc; print(memloc.__file__)"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"PYTHONPATH={src} imports memloc from {where}: install memloc as a plain editable package")
    cmd = [sys.executable, "-m", "memloc.cli", "run", "--preset", preset, "--out", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-2000:])
        raise SystemExit(f"{preset} study with {src} failed (exit {res.returncode})")
    stages = json.loads((out / "study.json").read_text())["stages"]
    seconds = {k.split("/")[-1]: v["seconds"] for k, v in stages.items() if v.get("seconds") is not None}
    claims_csv = out / "report" / "tables" / "summary_claims.csv"
    claims = list(csv.DictReader(claims_csv.open())) if claims_csv.exists() else []
    return {"wall_s": round(wall, 1), "stages": seconds,
            "claims": [{"claim": c["claim"], "ours": c["ours"], "verdict": c["verdict"]} for c in claims]}


def compare(preset: str, base: dict | None, ours: dict) -> None:
    print(f"\npreset {preset}")
    print(f"  {'stage':16s} {'baseline':>10s} {'ours':>8s} {'ratio':>7s}")
    stages = list(dict.fromkeys([*(base or {}).get("stages", {}), *ours["stages"]]))
    rows = [(s, (base or {}).get("stages", {}).get(s), ours["stages"].get(s)) for s in stages]
    rows.append(("wall time", base["wall_s"] if base else None, ours["wall_s"]))
    for name, b, o in rows:
        ratio = f"{b / o:6.2f}x" if b and o else "      -"
        print(f"  {name:16s} {(f'{b:9.1f}s' if b is not None else '         -'):>10s} "
              f"{(f'{o:7.1f}s' if o is not None else '       -'):>8s} {ratio}")
    if base:
        print("  claims (baseline -> ours):")
        theirs = {c["claim"]: c for c in base["claims"]}
        for c in ours["claims"]:
            b = theirs.get(c["claim"], {"ours": "-", "verdict": "-"})
            mark = "  " if b["verdict"] == c["verdict"] else "!!"
            print(f"  {mark} {c['claim'][:70]:70s} {b['verdict'][:24]:24s} -> {c['verdict'][:24]}")
            if b["ours"] != c["ours"]:
                print(f"       {b['ours'][:60]}  ->  {c['ours'][:60]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--default", action="store_true", help="also time the default study")
    p.add_argument("--preset", help="time only this preset (e.g. paper on a GPU)")
    p.add_argument("--dataset", help="dataset for the preset, e.g. synthetic for the paper preset")
    p.add_argument("--base", default=BASELINE, help=f"the baseline commit (default {BASELINE})")
    p.add_argument("--no-base", action="store_true", help="time only this code")
    p.add_argument("--keep", type=Path, help="keep the studies' folders under this directory")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args()
    presets = [args.preset] if args.preset else ["smoke"] + (["default"] if args.default else [])
    extra = ["--dataset", args.dataset] if args.dataset else []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        base_src = None if args.no_base else checkout(args.base, Path(tmp) / "baseline")
        for preset in presets:
            base = study(preset, extra, work / f"{preset}-baseline", base_src) if base_src else None
            ours = study(preset, extra, work / f"{preset}-ours", ROOT / "src")
            compare(preset, base, ours)
            results[preset] = {"baseline": base, "ours": ours, "base_ref": None if args.no_base else args.base}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
