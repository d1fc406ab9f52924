"""An audit of a model memloc did not train (issue #31): a GPT-2 trained by a plain `transformers` loop on King James
verses into which fake personal records are written 1, 4, 16 or 32 times, then `memloc audit` on the records.

    python studies/audit_outside.py [--out runs/audit-outside] [--epochs 12] [--verses 2000] [--width 128]
                                    [--per-group 16] [--repeats 1,4,16,32]

Everything memloc reads is what a user would hand it: the model folder `save_pretrained` wrote (with its
tokenizer), earlier states of the same training (`--checkpoints`), a sequences file (`records.jsonl`: each record
with its membership label, the suffix to extract its phone number) and held-out text (`heldout.txt`: verses the
model never saw). Writes OUT/model/, OUT/step*/, OUT/records.jsonl, OUT/heldout.txt, the audit in OUT/audit/ and the
tables in OUT/tables.md (printed too). About 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from plain_hf import bpe_tokenizer, train_plainly

REPEATS = (1, 4, 16, 32)


def build(out: Path, *, epochs: int, verses: int, width: int, layers: int, per_group: int, seed: int,
          repeats: tuple[int, ...]) -> dict:
    import transformers

    from memloc.tasks.lm.sources import bible_verses, fake_records
    rng = random.Random(seed)
    allv = bible_verses()
    order = list(range(len(allv)))
    rng.shuffle(order)
    train_v = [allv[i] for i in order[:verses]]
    held_v = [allv[i] for i in order[verses:verses + 400]]
    records = fake_records(per_group * len(repeats) + 4 * per_group, seed)
    members = {r: records[g * per_group:(g + 1) * per_group] for g, r in enumerate(repeats)}
    non_members = records[len(repeats) * per_group:]
    docs = [" ".join(train_v[i:i + 3]) for i in range(0, len(train_v), 3)]
    corpus = docs + [p + s for r, recs in members.items() for p, s in recs for _ in range(r)]
    tok = bpe_tokenizer(docs + [p + s for p, s in records])
    eos = tok.eos_token_id
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_layer=layers, n_head=4, n_embd=width,
                                  bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    saved = []

    def keep(epoch: int) -> None:  # two earlier states, as a Pythia-style suite keeps them
        if epoch in (epochs // 4, epochs // 2) and epoch < epochs:
            model.save_pretrained(str(out / f"step{epoch}"))
            saved.append(out / f"step{epoch}")
    seconds = train_plainly(model, tok, corpus, epochs=epochs, lr=2e-3, rng=rng, after_epoch=keep)
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    with (out / "records.jsonl").open("w") as f:
        for r, recs in members.items():
            for p, s in recs:
                f.write(json.dumps({"prefix": p, "suffix": s, "member": True, "repeats": r}) + "\n")
        for p, s in non_members:
            f.write(json.dumps({"prefix": p, "suffix": s, "member": False}) + "\n")
    (out / "heldout.txt").write_text("\n".join(held_v) + "\n")
    return {"train_seconds": round(seconds, 1), "checkpoints": [str(p) for p in saved],
            "parameters": sum(p.numel() for p in model.parameters()), "examples": len(corpus)}


def tables(out: Path, info: dict, repeats: tuple[int, ...] = REPEATS) -> str:
    from memloc.tasks.lm.membership import _auroc
    run = out / "audit"
    rows = list(csv.DictReader((run / "probes" / "memorization" / "memorization.csv").open()))
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    rep = np.array([r.get("repeats", 0) for r in recs])
    ext = np.array([r["extracted"] == "True" for r in rows])
    scores = {k: np.array([float(r[f"mi_{k}"]) for r in rows]) for k in ("loss", "zlib", "min_k", "min_k_pp")}
    sign = {"loss": -1, "zlib": -1, "min_k": 1, "min_k_pp": 1}
    removed = (run / "probes" / "removal" / "summary.json").exists()  # skipped when nothing is extracted
    removal = json.loads((run / "probes" / "removal" / "summary.json").read_text()) if removed else None
    after = list(csv.DictReader((run / "probes" / "removal" / "removal.csv").open())) if removed else []
    ext_after = np.array([r["extracted_after"] == "True" for r in after]) if removed else np.full(len(rows), np.nan)
    hist = json.loads((run / "probes" / "history" / "summary.json").read_text())
    hist_rows = list(csv.DictReader((run / "probes" / "history" / "history.csv").open()))
    n_ck = len(hist["checkpoints"])
    lines = [f"GPT-2 ({info['parameters']:,} parameters) trained by plain transformers on {info['examples']:,} "
             f"examples per epoch ({info['train_seconds']:.0f} s); audited by `memloc audit`.", "",
             "| records | n | extracted | " + " | ".join(f"at {Path(c['folder']).name}" for c in hist["checkpoints"])
             + " | AUROC loss | AUROC zlib | AUROC Min-K% | AUROC Min-K%++ | extracted after the edit |",
             "|---|---|---|" + "---|" * n_ck + "---|---|---|---|---|"]
    for r in (*repeats, 0):
        sel = rep == r
        hist_ext = [np.mean([hist_rows[i][f"extracted_{e + 1}"] == "True" for i in np.flatnonzero(sel)])
                    for e in range(n_ck)]
        aur = ["–"] * 4 if r == 0 else [f"{_auroc(sign[k] * scores[k][sel], sign[k] * scores[k][rep == 0]):.2f}"
                                        for k in scores]
        lines.append(f"| {'non-members' if r == 0 else f'members, {r}x'} | {int(sel.sum())} | "
                     f"{100 * ext[sel].mean():.0f}% | " + " | ".join(f"{100 * v:.0f}%" for v in hist_ext) + " | "
                     + " | ".join(aur) + f" | {100 * ext_after[sel].mean():.0f}% |")
    loss = np.array([float(r["loss"]) for r in rows])
    lines += ["", "Mean suffix loss (nats per token): " + ", ".join(
        f"{'non-members' if r == 0 else f'{r}x'} {loss[rep == r].mean():.2f}" for r in (*repeats, 0)) + "."]
    if removal is None:
        lines += ["", "Removal: skipped, the model extracts none of the records."]
        text = "\n".join(lines) + "\n"
        (out / "tables.md").write_text(text)
        return text
    m = removal["membership"]
    lines += ["", f"Removal ({removal['method']}, the edit grown from 1% of the MLP neurons): "
              f"{removal['zeroed']} of {removal['units']} units zeroed; the {removal['targeted']} extracted records "
              f"{100 * removal['targeted_extracted_before']:.0f}% -> {100 * removal['targeted_extracted_after']:.0f}% "
              f"extracted; held-out perplexity {removal['heldout_perplexity_before']:.2f} -> "
              f"{removal['heldout_perplexity_after']:.2f} ({100 * removal['perplexity_cost']:+.2f}%); goal reached: "
              f"{removal['reached']}. Membership AUROC, all members against non-members, before -> after: "
              + ", ".join(f"{k} {v['auroc_before']:.2f} -> {v['auroc_after']:.2f}" for k, v in m.items()) + ".",
              "", "Sizes tried: " + "; ".join(
                  f"{s['k']} units: {100 * s['extracted']:.0f}% extracted"
                  + ("" if s.get("cost") is None else f", perplexity {100 * s['cost']:+.2f}%")
                  for s in removal["sweep"])]
    text = "\n".join(lines) + "\n"
    (out / "tables.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/audit-outside")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--verses", type=int, default=2000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", default=",".join(map(str, REPEATS)), help="how often each group of records is "
                    "written into the training text")
    args = ap.parse_args()
    repeats = tuple(int(r) for r in args.repeats.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    info = build(out, epochs=args.epochs, verses=args.verses, width=args.width, layers=args.layers,
                 per_group=args.per_group, seed=args.seed, repeats=repeats)
    from memloc.cli import main as memloc
    t0 = time.perf_counter()
    code = memloc(["audit", f"hf:{out / 'model'}", "--sequences", str(out / "records.jsonl"), "--heldout",
                   str(out / "heldout.txt"), "--checkpoints", ",".join(info["checkpoints"]), "--out",
                   str(out / "audit"), "--overwrite", "--quiet"])
    if code:
        raise SystemExit(code)
    info["audit_seconds"] = round(time.perf_counter() - t0, 1)
    print(tables(out, info, repeats))
    print(f"audit: {info['audit_seconds']:.0f} s")


if __name__ == "__main__":
    main()
