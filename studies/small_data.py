"""Does the bare `memloc run --dataset FILE.npz --noise F` memorize small tabular sets and 1-D signals? (issue #35)

    python studies/small_data.py --out runs/small-data [--sets wine,cancer,digits1d,waves]

Writes four data sets as .npz under OUT/data/ (scikit-learn's bundled tables and 8x8 digits, and generated
waveforms: nothing is downloaded), runs the bare study command on each (no flag but --dataset, --noise and --out:
the model, its recipe and `--epochs auto` are memloc's defaults), times it, and prints one row per set for
RESULTS.md: the model chosen, the epochs `--epochs auto` trained, noisy-train / clean-train / test accuracy at the
end, the paper's claims that hold, do not hold or stay undecided, and the wall time; and, as the control, the
noisy-train accuracy of the recipe before issue #35 (`memloc train` for a fixed 40 epochs with the paper's weight
decay 5e-4 and batch 512, or the whole set when smaller). OUT/small_data.json holds the same. A set already
studied in OUT is read again, not rerun (delete its folder to rerun it).

- wine: 178 wines, 13 chemical features, 3 cultivars; 142 train / 36 test (stratified), 20% noise;
- cancer: 569 breast-cancer biopsies, 30 features, 2 classes; 455 / 114, 10% noise;
- digits1d: scikit-learn's 1,797 8x8 digits read as 1-D signals (one channel, 64 samples, row by row);
  1,437 / 360, 10% noise;
- waves: 5,000 generated one-channel signals of 128 samples (sine, square, sawtooth or triangle waves of random
  frequency and phase in Gaussian noise, 4 classes by shape); 4,000 / 1,000, 20% noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETS = {"wine": 0.2, "cancer": 0.1, "digits1d": 0.1, "waves": 0.2}


def _split(x: np.ndarray, y: np.ndarray, test: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A stratified split: `test` of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        held[idx[:round(test * len(idx))]] = True
    return {"x": x[~held], "y": y[~held], "x_test": x[held], "y_test": y[held]}


def waves(n: int = 5000, length: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, length) float32 signals and their labels: 0 sine, 1 square, 2 sawtooth, 3 triangle, each of 1.5 to
    6 cycles per window at a random phase and amplitude, in Gaussian noise of std 1 (the wave's amplitude 1-2)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    t = np.arange(length) / length
    phase = rng.uniform(0, 1, (n, 1)) + rng.uniform(1.5, 6, (n, 1)) * t  # cycles elapsed
    frac = phase % 1.0
    shapes = np.stack([np.sin(2 * np.pi * phase), np.sign(np.sin(2 * np.pi * phase)), 2 * frac - 1,
                       1 - 4 * np.abs(frac - 0.5)])  # (4, n, length)
    x = shapes[y, np.arange(n)] * rng.uniform(1, 2, (n, 1)) + rng.normal(0, 1, (n, length))
    return x[:, None, :].astype(np.float32), y.astype(np.int64)


def make(name: str) -> dict[str, np.ndarray]:
    from sklearn import datasets
    if name == "wine":
        d = datasets.load_wine()
        return _split(d.data.astype(np.float32), d.target.astype(np.int64), 0.2)
    if name == "cancer":
        d = datasets.load_breast_cancer()
        return _split(d.data.astype(np.float32), d.target.astype(np.int64), 0.2)
    if name == "digits1d":
        d = datasets.load_digits()
        return _split(d.data.astype(np.float32)[:, None, :], d.target.astype(np.int64), 0.2)
    if name == "waves":
        x, y = waves()
        return {"x": x[:4000], "y": y[:4000], "x_test": x[4000:], "y_test": y[4000:]}
    raise SystemExit(f"unknown set {name!r}: choose from {', '.join(SETS)}")


def _trained(run: Path) -> bool:
    from memloc.core.runs import RunDir
    return RunDir.open(run).stage("train").get("status") == "done"


def _finished(study: Path) -> bool:
    from memloc.core.runs import RunDir
    return (study / "study.json").exists() and bool(RunDir.open(study).info.get("finished"))


def summarize(study: Path) -> dict:
    """The study's end of training and its claims, from its files."""
    from memloc.core.runs import RunDir, study_cells
    from memloc.report.paper_claims import claims
    _, _, _, base_dir, drop_dir = study_cells(RunDir.open(study))[0]
    base = RunDir.open(base_dir)
    drop = RunDir.open(drop_dir) if (drop_dir / "run.json").exists() else None
    m = base.read_metrics()
    cfg = base.config
    rows = claims(base, drop)
    verdicts = [str(r["verdict"]) for r in rows]
    train_s = sum((r.get("epoch_time_s") or 0) + (r.get("eval_time_s") or 0) for r in m)
    return {"model": cfg["model"]["name"], "epochs": len(m), "train_s": round(train_s, 1), "lr": cfg["train"]["lr"],
            "batch_size": cfg["train"]["batch_size"], "weight_decay": cfg["train"]["weight_decay"],
            "noisy_train": m[-1].get("noisy_train_acc"), "clean_train": m[-1].get("clean_train_acc"),
            "test_acc": m[-1].get("test_acc"), "claims": len(rows), "hold": verdicts.count("holds"),
            "do_not_hold": verdicts.count("does not hold"),
            "undecided": sum(v not in ("holds", "does not hold") for v in verdicts),
            "not_measured": sum(v.startswith("not measured") for v in verdicts),
            "skipped": sorted(k for k, s in RunDir.open(study).info.get("stages", {}).items()
                              if s.get("status") == "skipped"),
            "failed": sorted(k for k, s in RunDir.open(study).info.get("stages", {}).items()
                             if s.get("status") == "failed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/small-data")
    ap.add_argument("--sets", default=",".join(SETS))
    args = ap.parse_args()
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.sets.split(","):
        data, study = out / "data" / f"{name}.npz", out / name
        arrays = make(name)
        np.savez(data, **arrays)
        cmd = [sys.executable, "-m", "memloc", "run", "--dataset", str(data), "--noise", f"{SETS[name]:g}",
               "--out", str(study)]
        if (study / "study.json").exists():  # interrupted: finish it
            cmd = [sys.executable, "-m", "memloc", "run", "--resume", str(study)]
        wall = None
        if not _finished(study):
            print("$ memloc " + " ".join(cmd[3:]), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                print(f"{name}: exit {proc.returncode}; see {out / f'{name}.log'}", file=sys.stderr)
                continue
        control = out / f"{name}-paper-recipe"
        if not (control / "run.json").exists() or not _trained(control):
            # the control: the recipe before issue #35 (the paper's weight decay and batch, 40 fixed epochs)
            subprocess.run([sys.executable, "-m", "memloc", "train", "--dataset", str(data), "--noise",
                            f"{SETS[name]:g}", "--epochs", "40", "--lr", "0.1", "--weight-decay", "5e-4",
                            "--batch-size", str(min(512, len(arrays["y"]))), "--out", str(control), "--overwrite",
                            "--quiet"], capture_output=True, text=True, check=True)
        row = {"train": len(arrays["y"]), "test": len(arrays["y_test"]), "shape": list(arrays["x"].shape[1:]),
               "classes": int(arrays["y"].max()) + 1, "noise": SETS[name], **summarize(study)}
        if wall is None:
            wall = (json.loads((out / "small_data.json").read_text()).get(name, {}).get("wall_s")
                    if (out / "small_data.json").exists() else None)
        row["wall_s"] = None if wall is None else round(wall, 1)
        from memloc.core.runs import RunDir
        row["paper_recipe_noisy_train"] = RunDir.open(control).read_metrics()[-1].get("noisy_train_acc")
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    old = json.loads((out / "small_data.json").read_text()) if (out / "small_data.json").exists() else {}
    (out / "small_data.json").write_text(json.dumps({**old, **results}, indent=1))

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}%"

    print("\n| data | train / test | x | classes | noise | model | epochs (auto) | noisy-train | clean-train | test "
          "| claims hold / not / undecided | training | whole study | noisy-train, the paper's recipe, 40 epochs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        wall = "–" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        print(f"| {name} | {r['train']} / {r['test']} | {'x'.join(map(str, r['shape']))} | {r['classes']} "
              f"| {100 * r['noise']:g}% | {r['model']} | {r['epochs']} | {pct(r['noisy_train'])} "
              f"| {pct(r['clean_train'])} | {pct(r['test_acc'])} | {r['hold']} / {r['do_not_hold']} / {r['undecided']} "
              f"| {r['train_s']:.0f} s | {wall} | {pct(r['paper_recipe_noisy_train'])} |")


if __name__ == "__main__":
    main()
