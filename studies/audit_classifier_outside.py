"""A classifier trained outside memloc (a plain PyTorch loop), audited with `memloc audit --weights` (issue #31).

    python studies/audit_classifier_outside.py --out runs/audit-classifier [--noise 0.1] [--epochs 120]

Trains memloc's registry `mlp` with plain SGD (no memloc code but `memloc.tasks.classification.models.build_model`) on
scikit-learn's 8x8 digits (1,437 training / 360 test examples, features scaled to [0, 1]), a share of the training
labels flipped to another class (seeded), until it fits them; saves its weights as safetensors after epochs 10
and 40 and at the end; then runs

    memloc audit --weights OUT/model.safetensors --model mlp --dataset OUT/digits.npz --labels OUT/labels.npy
                 --normalize none --checkpoints OUT/epoch10.safetensors,OUT/epoch40.safetensors --out OUT/audit

twice: with the labels it saw and the true ones (the mislabeled examples known: detection's AUROC, the flipping
probe by kind), and with only the labels it saw (`--dataset OUT/as-trained.npz`: noise unknown, what a user
without ground truth gets). Prints the tables for RESULTS.md and writes OUT/audit_classifier.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def train_outside(out: Path, noise: float, epochs: int, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from memloc.tasks.classification.models import build_model
    digits = load_digits()
    rng = np.random.default_rng(seed)
    held = np.zeros(len(digits.target), dtype=bool)
    for c in range(10):  # a stratified 20% test split
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        held[idx[:round(0.2 * len(idx))]] = True
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    xtr, ytr, xte, yte = x[~held], y[~held], x[held], y[held]
    n = len(ytr)
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.choice(n, int(noise * n), replace=False)] = True
    given = ytr.copy()
    given[noisy] = (ytr[noisy] + rng.integers(1, 10, int(noisy.sum()))) % 10
    np.savez(out / "digits.npz", x=xtr, y=ytr, x_test=xte, y_test=yte)
    np.savez(out / "as-trained.npz", x=xtr, y=given, x_test=xte, y_test=yte)
    np.save(out / "labels.npy", given)
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=(64,), num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(given)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for b in torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[b]), Y[b]).backward()
            opt.step()
        if epoch in (10, 40):
            save_file(model.state_dict(), str(out / f"epoch{epoch}.safetensors"))
    save_file(model.state_dict(), str(out / "model.safetensors"))
    model.eval()
    with torch.no_grad():
        fit = (model(X).argmax(1) == Y).numpy()
        test = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    return {"train": n, "noisy": int(noisy.sum()), "epochs": epochs, "train_s": round(time.perf_counter() - t0, 1),
            "noisy_fit": float(fit[noisy].mean()), "clean_fit": float(fit[~noisy].mean()), "test": test}


def audit(out: Path, name: str, dataset: str, *more: str) -> dict:
    run = out / name
    cmd = [sys.executable, "-m", "memloc", "audit", "--weights", str(out / "model.safetensors"), "--model", "mlp",
           "--dataset", str(out / dataset), "--normalize", "none", "--checkpoints",
           f"{out / 'epoch10.safetensors'},{out / 'epoch40.safetensors'}", "--out", str(run), "--overwrite", *more]
    print("$ memloc " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}; see {out / f'{name}.log'}")
    det = json.loads((run / "probes" / "detection" / "summary.json").read_text())
    flip = json.loads((run / "probes" / "flipping" / "summary.json").read_text())
    depth = json.loads((run / "probes" / "depth" / "summary.json").read_text())
    rew = json.loads((run / "probes" / "rewinding" / "summary.json").read_text())
    arrays = np.load(run / "probes" / "detection" / "arrays.npz")
    return {"wall_s": round(wall, 1), "quality": det.get("quality"), "best": det.get("best"),
            "flip": flip["kinds"], "depth": depth.get("depth"), "rewinding": rew.get("final"),
            "ranking": [int(i) for i in arrays["ranking"]], "rank_by": det.get("rank_by")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/audit-classifier")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=120)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = train_outside(out, args.noise, args.epochs)
    print(json.dumps({"trained outside memloc": trained}))
    known = audit(out, "audit", "digits.npz", "--labels", str(out / "labels.npy"))
    unknown = audit(out, "audit-unknown", "as-trained.npz")
    result = {"trained": trained, "known": {k: v for k, v in known.items() if k != "ranking"},
              "unknown": {k: v for k, v in unknown.items() if k != "ranking"}}
    (out / "audit_classifier.json").write_text(json.dumps(result, indent=1))

    def f(v, pct=False):
        return "–" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")
    print(f"\nmlp trained outside memloc: {trained['train']} examples, {trained['noisy']} mislabeled, "
          f"{trained['epochs']} epochs ({trained['train_s']} s); fits {f(trained['noisy_fit'], True)} of the "
          "mislabeled, "
          f"{f(trained['clean_fit'], True)} of the clean; test {f(trained['test'], True)}")
    print(f"audit with the true labels known: {known['wall_s']} s; noise unknown: {unknown['wall_s']} s\n")
    print("| score | AUROC | average precision | precision at k |")
    print("|---|---|---|---|")
    for r in known["quality"] or []:
        print(f"| {r['score']} (n = {r['n']}) | {f(r['auroc'])} | {f(r['average_precision'])} "
              f"| {f(r['precision_at_k'])} |")
    print("\n| kind | searched | flipped | median units to flip | flipped with < 10 units |")
    print("|---|---|---|---|---|")
    for kind, k in known["flip"].items():
        print(f"| {kind} | {k['searched']} | {k['flipped']} | {k['median_units']} "
              f"| {f(k['share_flipped_under_10'], True)} |")
    print("\nprediction depth, median: " + ", ".join(f"{kd} {v.get('median')}" for kd, v in
                                                  (known["depth"] or {}).items() if isinstance(v, dict)))
    k = trained["noisy"]
    labels = np.load(out / "labels.npy")
    true = np.load(out / "digits.npz")["y"]
    top = np.asarray(unknown["ranking"][:k])
    hits = int((labels[top] != true[top]).sum())
    print(f"noise unknown ({unknown['rank_by']} ranking, no truth given): of its top {k}, {hits} are mislabeled")


if __name__ == "__main__":
    main()
