"""Mislabeled-example detection on a trained run: every score's AUROC, AP and precision at k, for RESULTS.md.

    python studies/detection_study.py RUN [--cv 4 --cv-epochs 10] [--flip-progress OTHER_RUN]

RUN is a trained run directory (e.g. the default `memloc train --out RUN`:
resnet9 width 0.25, mnist5k, 10% noise, 40 epochs). Runs `memloc detect`
(results in RUN/probes/detection/, ROC figure in RUN/probes/detection/roc.png)
and prints the quality table as Markdown.

The paper's units-to-flip detector comes from RUN's flipping probe when it has
finished. `--flip-progress OTHER_RUN` takes the records of a flipping probe
still running (its partial.npz) on a copy of the same run (same config and
data, checked) and adds the units-to-flip row on the examples covered so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from memloc.probes.detection import DetectConfig, detect, format_table, plot_gallery, plot_roc, quality_table


def partial_flip_row(run: Path, other: Path, result) -> dict | None:
    """The units-to-flip quality row from OTHER's unfinished flipping probe (same run config and noise mask)."""
    if json.loads((run / "config.json").read_text()) != json.loads((other / "config.json").read_text()):
        sys.exit(f"{other} is not a copy of {run}: their config.json differ")
    with np.load(run / "data.npz") as a, np.load(other / "data.npz") as b:
        if not np.array_equal(a["is_noisy"], b["is_noisy"]):
            sys.exit(f"{other} has another noise mask than {run}")
    p = other / "probes" / "flipping" / "partial.npz"  # the engine's progress of the flipping probe
    if not p.exists():
        return None
    with np.load(p) as z:
        records = json.loads(str(z["__state__"]))["records"]
    n = result.summary["num_examples"]
    units = np.full(n, np.nan)
    for r in records:
        units[r["index"]] = len(r["units"])
    susp = -units[:, None]
    rows, _ = quality_table(susp, ["units_to_flip"], result.arrays["is_noisy"])
    row = rows[0]
    row["score"] = f"units_to_flip (partial: {len(records)} examples)"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--cv", type=int, default=0)
    ap.add_argument("--cv-epochs", type=int)
    ap.add_argument("--flip-progress", metavar="OTHER_RUN")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = detect(args.run, cfg=DetectConfig(cv=args.cv, cv_epochs=args.cv_epochs), progress=False,
                 log=lambda s: print(s, flush=True))
    s = res.summary
    if args.flip_progress and "units_to_flip" not in s["scores"]:
        row = partial_flip_row(Path(args.run), Path(args.flip_progress), res)
        if row:
            s["quality"].append(row)
    plot_roc(res, Path(args.run) / "probes" / "detection" / "roc.png")
    plot_gallery(res, Path(args.run) / "probes" / "detection" / "suspects.png")
    print(f"\n{s['run']}: {s['num_examples']} training examples, {s.get('num_noisy')} noisy, {s['epochs']} epochs "
          f"({time.perf_counter() - t0:.0f} s)\n")
    print(format_table(s))
    if s.get("cleanlab"):
        c = s["cleanlab"]
        print(f"\ncleanlab: {c['folds']} folds x {c['epochs']} epochs, "
              f"out-of-fold accuracy {c['out_of_fold_accuracy']:.3f}; "
              f"find_label_issues flags {c['label_issues']} ({c.get('label_issues_noisy')} noisy: precision "
              f"{c.get('label_issues_precision', 0):.3f}, recall {c.get('label_issues_recall', 0):.3f})")
    if s.get("flipping"):
        print(f"\nunits_to_flip: {s['flipping']['covered']} examples covered by the flipping probe")
    print(f"best: {s.get('best')}")


if __name__ == "__main__":
    main()
