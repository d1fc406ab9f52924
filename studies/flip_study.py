"""Probe 4 at full size: greedy unit removal on 200 clean + 200 noisy examples, 512 others, full-data accuracy.

    python studies/flip_study.py RUN [--examples 200] [--others 512] [--eval-subsample K] [--sequential]

RUN is a trained run directory (e.g. the default `memloc train --out RUN`).
Resumable (rerun the same command). Prints the paper's four claims next to what
the data says, as a Markdown table for RESULTS.md; the full result stays in
RUN/probes/flipping/.
"""

from __future__ import annotations

import argparse
import json
import sys

from memloc.probes.flipping import FlipConfig, flip


def claims(summary: dict, arrays: dict) -> str:
    c, n = summary["kinds"]["clean"], summary["kinds"]["noisy"]
    names = [l["name"] for l in summary["layers"]]

    def fmt(v, pct=False):
        return "n/a" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:g}")

    def share(kind):
        return ", ".join(f"{nm} {100 * s:.0f}%" for nm, s in zip(names, summary["kinds"][kind]["layer_share"]) if s > 0)
    lines = [
        "| claim (paper, probe 4) | clean | noisy | agrees? |", "|---|---|---|---|",
        f"| noisy examples need far fewer units (paper: ~5 for noisy) — median units | {fmt(c['median_units'])} "
        f"(mean {c['mean_units']:.2f}) | {fmt(n['median_units'])} (mean {n['mean_units']:.2f}) | "
        f"{'yes' if n['median_units'] < c['median_units'] else 'no'} |",
        f"| over 90% of noisy examples flip with < 10 units | {fmt(c['share_flipped_under_10'], True)} | "
        f"{fmt(n['share_flipped_under_10'], True)} | {'yes' if n['share_flipped_under_10'] > 0.9 else 'no'}"
        f"{' (higher than clean)' if n['share_flipped_under_10'] > c['share_flipped_under_10'] else ''} |",
        f"| removal costs less training accuracy for noisy (paper: ~10 points less drop) — mean train-acc drop | "
        f"{fmt(c['mean_train_acc_drop'], True)} | {fmt(n['mean_train_acc_drop'], True)} | "
        f"{'yes' if n['mean_train_acc_drop'] < c['mean_train_acc_drop'] else 'no'} "
        f"({100 * (c['mean_train_acc_drop'] - n['mean_train_acc_drop']):.1f} points less) |",
        f"| critical units spread over many layers — layers used (of {len(names)}); mean layers per example | "
        f"{c['layers_used']}; {c['mean_layers_per_example']:.2f} | {n['layers_used']}; "
        f"{n['mean_layers_per_example']:.2f} | {'yes' if min(c['layers_used'], n['layers_used']) > 1 else 'no'} |",
        "", f"flipped within the cap ({summary['budget_units']} of {summary['candidate_units']} units): "
        f"clean {fmt(c['flipped_share'], True)}, noisy {fmt(n['flipped_share'], True)}; already wrong: "
        f"clean {c['already_wrong']}, noisy {n['already_wrong']}",
        f"accuracy before removal: "
        f"{json.dumps({k: (None if v is None else round(v, 4)) for k, v in summary['accuracy_before'].items()})}",
        f"layer share of removed units — clean: {share('clean')}; noisy: {share('noisy')}",
        f"mean clean-train accuracy drop: clean {fmt(c['mean_clean_train_acc_drop'], True)}, "
        f"noisy {fmt(n['mean_clean_train_acc_drop'], True)}; test drop: clean {fmt(c['mean_test_acc_drop'], True)}, "
        f"noisy {fmt(n['mean_test_acc_drop'], True)}",
        f"{summary['examples']} examples, {summary['others']} others, accuracy on {summary['eval_train_examples']} "
        f"train + {summary['eval_test_examples']} test examples; {summary['elapsed_s']} s this session "
        f"({summary['mode']})",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--others", type=int, default=512)
    p.add_argument("--eval-subsample", type=int)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cfg = FlipConfig(examples=a.examples, kinds=("clean", "noisy"), others=a.others, eval_subsample=a.eval_subsample,
                     sequential=a.sequential, seed=a.seed)
    res = flip(a.run, cfg=cfg, progress=not a.quiet, log=lambda s: print(s, flush=True))
    print(claims(res.summary, res.arrays))
    return 0


if __name__ == "__main__":
    sys.exit(main())
