"""Where attribution patching agrees with exact ablation (issue #32): `attribution` against `zero-out` on TinyMem.

    # the smoke preset's data and model (2 layers, n_embd 64), and the same data at 4 layers: ~2 min on a CPU
    python studies/attribution_vs_zero_out.py --preset smoke --layers 2,4
    # the full preset's data with every artifact 4 times (RESULTS.md's CPU tables), 2 layers: ~15 min on a CPU
    python studies/attribution_vs_zero_out.py --preset full --layers 2 --repeats 4

Each model is trained as `memloc bench-localize --benchmark tinymem` trains it (`BenchConfig` of the preset,
`trained_model`: kept in OUT/models and reused). The localized sequences are bench-localize's: the memorized
artifacts (the first training row of each, its 50-token continuation reproduced), at most `--examples` (32), the
same seeded choice. Both methods score every MLP neuron on them (`memloc.localize`, the model's own data, one
thread by default), and the study reports:

- agreement: Spearman rank correlation of the two score vectors over all neurons and within each layer, and the
  overlap of their top-k sets at the full bench's fractions (k = ceil(fraction x neurons): 1%, 2%, 5%);
  where the top of zero-out sits in attribution's ranking;
- cost: each method's time (the localize call's `elapsed_s` on the localized rows alone: the scoring and its
  extraction passes over those rows before and with the edit, as bench-localize's scoring column);
- the edit: with each method's top k zeroed, the share of all trained artifacts still memorized, the share of the
  memorized ones removed, held-out clean perplexity (bench-localize's `removed` and perplexity columns).

Writes OUT/<preset>-<layers>l.json per model (and its two score vectors, -scores.npz) and OUT/results.md (every
model measured so far); OUT defaults to runs/attribution-vs-zero-out, relative to where it is run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from memloc.bench.benchmarks import BenchConfig, artifact_rows, clean_quality, trained_model
from memloc.probes import localization as loc
from memloc.tasks import task_of
from memloc.tasks.lm.text import TextData
from memloc.tasks.lm.tinymem import tinymem_data

METHODS = ("zero-out", "attribution")
FRACTIONS = (0.01, 0.02, 0.05)  # bench-localize's full preset: the top 1%, 2%, 5% of the neurons zeroed


@torch.no_grad()
def memorized(model, data, rows: np.ndarray) -> np.ndarray:
    """(R,) bool: the training rows whose every scored token is the argmax (teacher-forced = greedy extraction)."""
    task = task_of(data)
    idx = torch.as_tensor(rows)
    x, y = data.x_train[idx], data.y_train[idx]
    out = [task.match(task.predict(model(x[i:i + 256])), y[i:i + 256]) for i in range(0, len(x), 256)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=bool)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int, candidates) -> float:
    """|top k of a  ∩  top k of b| / k."""
    return len(np.intersect1d(loc.top_units(a, candidates, k), loc.top_units(b, candidates, k))) / k


def measure(n_layer: int, cfg: BenchConfig, out: Path, log) -> dict:
    data = tinymem_data(cfg.data)
    model, train_s = trained_model(data, n_layer, cfg, out / "models", log=log)
    candidates = loc.candidate_layers(model, loc.LocalizeConfig())
    units = sum(l.units for l in candidates)
    art = artifact_rows(data)
    mem = art[memorized(model, data, art)]
    rng = np.random.default_rng([cfg.seed, n_layer])  # bench-localize's choice of the localized artifacts
    chosen = np.sort(rng.choice(mem, size=min(cfg.examples, len(mem)), replace=False))
    clean_test = torch.as_tensor(np.flatnonzero((data.canary_test < 0).numpy()))
    x_q, y_q = data.x_test[clean_test], data.y_test[clean_test]
    ppl_before = clean_quality(model, x_q, y_q)["ppl"]
    log(f"{n_layer} layers: {len(mem)} of {len(art)} artifacts memorized, {len(chosen)} localized, {units} neurons, "
        f"perplexity {ppl_before:.4f}")
    # the localized rows alone (and 64 held-out ones), as bench-localize localizes: localize's elapsed_s counts its
    # extraction passes before and with the edit too, which over all the training rows would outweigh attribution
    ci, ti = torch.as_tensor(chosen), clean_test[:64]
    small = TextData(data.name, data.x_train[ci], data.y_train[ci], data.canary[ci], data.x_test[ti],
                     data.y_test[ti], data.canary_test[ti], data.canaries, data.vocab_size)
    scores, seconds = {}, {}
    for method in METHODS:
        res = loc.localize(model, small, method=method, indices=tuple(range(len(chosen))), k=1, seed=cfg.seed,
                           device="cpu", save=False)
        scores[method], seconds[method] = res.arrays["scores"].astype(np.float64), res.summary["elapsed_s"]
        log(f"  {method}: {seconds[method]:.2f}s")
    a, z = scores["attribution"], scores["zero-out"]
    per_layer, lo = [], 0
    for layer in candidates:
        part = slice(lo, lo + layer.units)
        per_layer.append({"layer": layer.name, "spearman": float(spearmanr(a[part], z[part])[0])})
        lo += layer.units
    order = np.lexsort((np.arange(units), -a))
    rank_a = np.empty(units, dtype=np.int64)
    rank_a[order] = np.arange(units)
    k1 = max(1, math.ceil(0.01 * units))
    top_z = loc.top_units(z, candidates, k1)
    edits = []
    for fraction in FRACTIONS:
        k = max(1, math.ceil(fraction * units))
        row = {"fraction": fraction, "k": k, "top_overlap": top_overlap(a, z, k, candidates)}
        for method in METHODS:
            mask = np.ones(units, dtype=np.float32)
            mask[loc.top_units(scores[method], candidates, k)] = 0.0
            with loc.zeroed(model, candidates, mask):
                after = memorized(model, data, art)
                ppl = clean_quality(model, x_q, y_q)["ppl"]
            removed = 1.0 - after[np.isin(art, mem)].mean()  # of the artifacts memorized before
            row[method] = {"memorized_after": float(after.mean()), "removed": float(removed), "ppl_after": ppl,
                           "rel_ppl_change": ppl / ppl_before - 1.0}
        edits.append(row)
    result = {
        "study": "attribution-vs-zero-out", "preset": cfg.preset, "n_layer": n_layer, "units": units,
        "artifacts": len(art), "memorized": len(mem), "localized": len(chosen), "train_s": train_s,
        "ppl_before": ppl_before, "spearman": float(spearmanr(a, z)[0]), "pearson": float(np.corrcoef(a, z)[0, 1]),
        "spearman_per_layer": per_layer, "seconds": seconds,
        "zero_out_top1_ranks_in_attribution": sorted(int(r) for r in rank_a[top_z]),
        "zero_out_top1": [{"unit": int(u), "zero_out": float(z[u]), "attribution": float(a[u]),
                           "attribution_rank": int(rank_a[u])} for u in top_z],
        "sign_agreement": float(np.mean(np.sign(a) == np.sign(z))), "edits": edits,
        "scores": scores, "settings": cfg.settings(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    layers = ", ".join(f"{p['spearman']:.3f}" for p in per_layer)
    log(f"  spearman {result['spearman']:.3f} (per layer {layers}), top-1% overlap {edits[0]['top_overlap']:.2f}, "
        f"zero-out's top 1% at attribution ranks {result['zero_out_top1_ranks_in_attribution']}")
    return result


def table(results: list[dict]) -> str:
    head = ("| model | neurons | localized | Spearman (all; per layer) | top-k overlap (1 / 2 / 5%) | zero-out s | "
            "attribution s | k | memorized after: zero-out / attribution | perplexity: zero-out / attribution |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        over = " / ".join(f"{e['top_overlap']:.2f}" for e in r["edits"])
        layers = ", ".join(f"{p['spearman']:.3f}" for p in r["spearman_per_layer"])
        for e in r["edits"]:
            z, a = e["zero-out"], e["attribution"]
            lines.append(f"| {r['preset']} {r['n_layer']}l | {r['units']} | {r['localized']} of {r['memorized']} | "
                         f"{r['spearman']:.3f}; {layers} | {over} | {r['seconds']['zero-out']:.1f} | "
                         f"{r['seconds']['attribution']:.2f} | "
                         f"{e['k']} ({100 * e['fraction']:g}%) | {100 * z['memorized_after']:.1f}% / "
                         f"{100 * a['memorized_after']:.1f}% | {100 * z['rel_ppl_change']:+.2f}% / "
                         f"{100 * a['rel_ppl_change']:+.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke", choices=("smoke", "full"))
    p.add_argument("--layers", default="2", help="depths, comma-separated")
    p.add_argument("--repeats", type=int, help="copies of each artifact (default: the preset's)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--examples", type=int, default=32, help="localize at most N memorized artifacts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (RESULTS.md's timings: 1)")
    p.add_argument("--out", default="runs/attribution-vs-zero-out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in (int(v) for v in args.layers.split(",")):
        cfg = BenchConfig(benchmark="tinymem", preset=args.preset, n_layers=(n,), examples=args.examples,
                          methods=METHODS, **({"epochs": args.epochs} if args.epochs else {}))
        if args.repeats is not None:
            from dataclasses import replace
            cfg.data = replace(cfg.data, repeats=args.repeats)
        result = measure(n, cfg, out, print)
        scores = result.pop("scores")
        (out / f"{args.preset}-{n}l.json").write_text(json.dumps(result, indent=1))
        np.savez(out / f"{args.preset}-{n}l-scores.npz", **{m.replace("-", "_"): v for m, v in scores.items()})
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*-*l.json"))]
    (out / "results.md").write_text("# attribution against zero-out on TinyMem\n\n" + table(results))
    print(f"done: {out / 'results.md'}")


if __name__ == "__main__":
    main()
