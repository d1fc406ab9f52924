"""Post-hoc localization against memorization sinks on the same data: RESULTS.md, "Against post-hoc localization".

    python studies/posthoc_vs_sinks.py                          # trains the plain model, then every edit
    python studies/posthoc_vs_sinks.py --plain runs/lm-sinks-baselines/plain    # the sinks grid's plain cell instead

The plain model of the memorization-sinks baselines (no sinks: the `plain` cell of `memloc dropout-grid --task lm
--pairs '0.5,0.1' --out runs/lm-sinks-baselines`, the LM `default` preset: 2,000 King James windows of 128 bytes
with canaries repeated 1-32 times, GPT 4 x 96 with 384 MLP neurons per block, AdamW 1e-2, 12 epochs) is trained
into OUT/plain, or read from `--plain`. Its extracted canaries (as `memloc bench-localize --benchmark del` takes
them: the first training sequence of each trained canary, where the model extracts it in context) are localized
together by `memloc.localize` against `--others` corpus training sequences, over all MLP neurons, by each method;
the top fraction of the neurons by score is zeroed (ceil(fraction x 1,536): 8, 16, 31). Balanced-subnet learns its
mask for each size; zero-out and ig score once, and every fraction takes the top of the same scores.

Measured on the plain model and with each edit: in-context extraction of the canaries repeated >= 16 times, per
canary (its first training sequence, as the canaries are chosen) and over all the training sequences that hold
them (the sinks table's "extracted in context"); held-out perplexity over the held-out corpus rows (what
bench-localize's DEL reports) and over every held-out row, held-out canaries included (the sinks table's measure,
`memloc.probes.memorization.heldout_perplexity`, whose plain-model value the sinks rows are compared with).

Writes OUT/plain/ (the run, when trained here), OUT/study.json (the settings, first), OUT/results.json (a row per
edit, rewritten after each: a rerun with the same settings reads the finished rows back) and OUT/table.md, and
prints the table. CPU training is deterministic for a thread count, not across thread counts: `--threads 1` (the
default) is what RESULTS.md measured with: 26 min of training and 36 min for the nine edits on one thread
of a 2-core CPU shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import memloc
from memloc.probes.memorization import heldout_perplexity

# The sinks grid's plain cell, field for field (`memloc dropout-grid --task lm` with the `default` preset).
PLAIN = {"task": "lm",
         "data": {"sequences": 2000, "given": []},
         "model": {"name": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 96},
         "train": {"epochs": 12, "lr": 1e-2, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.1, "clip": 1.0,
                   "warmup": 0.05, "precision": "auto", "given": []}}
# --smoke: the LM smoke preset's data and model (1,200 sequences, 2 blocks of 64): the script checked in minutes
SMOKE = {"task": "lm",
         "data": {"sequences": 1200, "block_size": 64, "prefix_tokens": 16, "suffix_tokens": 32, "canaries": 1,
                  "repeats": [1, 8, 32], "canary_formats": ["secret", "random"], "secret_digits": 4, "given": []},
         "model": {"name": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64},
         "train": {"epochs": 12, "lr": 1e-2, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.1, "clip": 1.0,
                   "warmup": 0.05, "precision": "auto", "given": []}}
REPEATED = 16  # the headline canaries: repeated at least this many times (the sinks table's)


def plain_run(out: Path, config: dict, log) -> Path:
    """The plain model's run directory OUT/plain: read back when trained before, resumed, or trained."""
    path = out / "plain"
    if (path / "config.json").exists():
        if memloc.RunDir.open(path).stage("train").get("status") == "done":
            log(f"plain model: trained before, read back from {path}")
        else:
            memloc.resume_training(path, progress=False, log=log)
        return path
    memloc.run_training(memloc.RunConfig.from_dict(config), path, progress=False, log=log)
    return path


def first_rows(data) -> np.ndarray:
    """(C,) the first training sequence holding each canary, -1 for a held-out one."""
    owner = data.canary.cpu().numpy()  # (N,) the canary a training sequence holds, -1 none
    return np.array([int(np.flatnonzero(owner == c)[0]) if c in owner else -1 for c in range(len(data.canaries))])


def measure(model, data) -> dict:
    """A row's numbers: in-context extraction of the canaries repeated >= 16 times (per canary: its first training
    sequence; and over every training sequence holding one), held-out perplexity (corpus rows; every row); and the
    in-context hits (N,) of every training sequence."""
    hits = memloc.task_of(data).hits(model, "train").cpu().numpy()  # (N,) teacher-forced greedy = extraction
    headline = np.flatnonzero([c["trained"] and c["repeat_group"] >= REPEATED for c in data.canaries])
    rows = np.isin(data.canary.cpu().numpy(), headline)
    corpus = torch.as_tensor(data.canary_test.cpu().numpy() < 0)  # held-out rows without a canary
    held_corpus = SimpleNamespace(x_test=data.x_test[corpus], y_test=data.y_test[corpus])  # all it reads
    return {"in_context": float(hits[first_rows(data)[headline]].mean()), "canaries": len(headline),
            "in_context_rows": float(hits[rows].mean()), "rows": int(rows.sum()),
            "perplexity": float(heldout_perplexity(model, held_corpus)), "corpus_rows": int(corpus.sum()),
            "perplexity_all": float(heldout_perplexity(model, data)), "heldout_rows": len(data.x_test), "hits": hits}


def localized_rows(data, plain: dict) -> np.ndarray:
    """(S,) the first training sequence of every trained canary the plain model extracts there, in context."""
    first = first_rows(data)
    first = first[first >= 0]
    return np.sort(first[plain["hits"][first]])


def top_edit(result: memloc.ProbeResult, k: int) -> memloc.ProbeResult:
    """The same scores' edit of the top k units (rank 0 = best, ties the earlier unit, as localize ranks them)."""
    arrays = dict(result.arrays)
    arrays["edit_mask"] = (np.asarray(arrays["rank"]) >= k).astype(np.float32)
    return memloc.ProbeResult(result.probe, dict(result.summary), arrays)


def row_of(name: str, method: str, fraction: float | None, k: int, m: dict, seconds: float | None) -> dict:
    return {"edit": name, "method": method, "fraction": fraction, "neurons": k,
            **{key: m[key] for key in ("in_context", "in_context_rows", "perplexity", "perplexity_all")},
            "seconds": seconds}


def table(rows: list[dict], base: dict, n_units: int) -> str:
    lines = [f"| edit of the plain model | neurons zeroed (of {n_units:,}) | >= {REPEATED}x canaries extracted in "
             f"context ({base['canaries']}, first sequence each) | all their {base['rows']} training sequences | "
             f"perplexity, {base['corpus_rows']} held-out corpus rows | vs plain | perplexity, all "
             f"{base['heldout_rows']} held-out rows, vs plain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rise = r["perplexity"] / base["perplexity"] - 1
        rise_all = r["perplexity_all"] / base["perplexity_all"] - 1
        lines.append(f"| {r['edit']} | {r['neurons']} | {100 * r['in_context']:.1f}% | "
                     f"{100 * r['in_context_rows']:.1f}% | {r['perplexity']:.3f} | {100 * rise:+.1f}% | "
                     f"{r['perplexity_all']:.3f} ({100 * rise_all:+.1f}%) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="output folder (default: runs/posthoc-vs-sinks, with --smoke "
                    "runs/posthoc-vs-sinks-smoke)")
    ap.add_argument("--plain", type=Path, help="a trained plain model's run (default: train one into OUT/plain)")
    ap.add_argument("--methods", default="balanced-subnet,zero-out,ig", help="comma-separated localize methods")
    ap.add_argument("--fractions", default="0.005,0.01,0.02", help="comma-separated fractions of the MLP neurons")
    ap.add_argument("--steps", type=int, default=200, help="balanced-subnet's optimization steps")
    ap.add_argument("--others", type=int, default=128, help="corpus training sequences whose loss is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the RESULTS numbers: 1)")
    ap.add_argument("--smoke", action="store_true", help="the LM smoke preset's model, 5 steps: a check in minutes")
    args = ap.parse_args()
    args.out = args.out or Path("runs/posthoc-vs-sinks-smoke" if args.smoke else "runs/posthoc-vs-sinks")
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    fractions = [float(f) for f in args.fractions.split(",")]
    steps = 5 if args.smoke else args.steps
    t0 = time.time()

    def log(s: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {s}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"plain": str(args.plain) if args.plain else "OUT/plain", "smoke": args.smoke, "methods": methods,
                "fractions": fractions, "steps": steps, "others": args.others, "threads": args.threads,
                "repeated": REPEATED}
    (args.out / "study.json").write_text(json.dumps(settings, indent=1) + "\n")
    run = args.plain or plain_run(args.out, SMOKE if args.smoke else PLAIN, log)
    loaded = memloc.open_run(run, device="cpu")
    model, data = loaded.model(), loaded.data
    model.eval()

    results_path = args.out / "results.json"
    done = {}
    if results_path.exists():
        old = json.loads(results_path.read_text())
        if old.get("settings") == settings:
            done = {r["edit"]: r for r in old["rows"]}
    base = measure(model, data)
    seqs = localized_rows(data, base)
    n_units = sum(layer.units for layer in memloc.layers(model) if layer.kind == "mlp")
    log(f"plain model: {100 * base['in_context']:.1f}% of the {base['canaries']} canaries repeated >= {REPEATED}x "
        f"extracted in context ({100 * base['in_context_rows']:.1f}% of their {base['rows']} sequences); held-out "
        f"perplexity {base['perplexity']:.4f} (corpus), {base['perplexity_all']:.4f} (all); {len(seqs)} extracted "
        f"canaries localized; {n_units} MLP neurons")
    rows = [row_of("none (the plain model)", "none", None, 0, base, None)]

    def save() -> None:
        results_path.write_text(json.dumps({"settings": settings, "localized": seqs.tolist(), "rows": rows},
                                           indent=1) + "\n")

    for method in methods:
        scored = None  # zero-out and ig: one scoring, every fraction from its ranks
        for fraction in fractions:
            name = f"{method} {100 * fraction:g}%"
            if name in done:
                rows.append(done[name])
                log(f"{name}: done before, read back")
                continue
            k = max(1, math.ceil(fraction * n_units))
            started = time.time()
            if method == "balanced-subnet" or scored is None:
                options = {"steps": steps} if method == "balanced-subnet" else {}
                res = memloc.localize(model, data, method=method, fraction=fraction, indices=tuple(seqs.tolist()),
                                      others=args.others, seed=0, save=False, **options)
                if method != "balanced-subnet":
                    scored = res
            res = top_edit(scored, k) if scored is not None else res
            assert int((np.asarray(res.arrays["edit_mask"]) == 0).sum()) == k
            with memloc.edited(model, res):
                m = measure(model, data)
            rows.append(row_of(name, method, fraction, k, m, round(time.time() - started, 1)))
            save()
            log(f"{name}: {k} neurons, in context {100 * m['in_context']:.1f}% ({100 * m['in_context_rows']:.1f}% "
                f"of the sequences), perplexity {m['perplexity']:.4f} / {m['perplexity_all']:.4f} "
                f"({time.time() - started:.0f} s)")
    save()
    text = table(rows, base, n_units)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    log(f"done: {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
