"""Does an audit in bf16 find what an audit in fp32 finds? `memloc audit --precision bf16` against `--precision fp32`
on the same model: a GPT-2 512 wide (where `auto` chooses bf16 on a CPU with native bf16), trained by a plain
`transformers` loop (under bf16 autocast, as a user with bf16 hardware would) on King James verses, some written
1, 8 or 32 times into the training text; never-written verses are the non-members.

    python studies/bf16_audit.py [--out runs/bf16-audit] [--width 512] [--layers 2] [--epochs 16]

Both audits read the same folder, verses and held-out verses, removal included (integrated gradients, the edit grown
until at most 10% of the extracted verses are extracted within +5% perplexity). Compared: which verses each
extracts (the last half of each verse from its first half), their losses, the membership scores' AUROC, the
removal's edit and its verification, and each audit's wall time. Writes OUT/model/, OUT/verses.jsonl,
OUT/heldout.txt, OUT/audit-fp32/, OUT/audit-bf16/ and OUT/tables.md (printed too).
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

REPEATS = (1, 8, 32)


def build(out: Path, *, width: int, layers: int, epochs: int, filler: int, per_group: int, seed: int) -> dict:
    """The model and its tokenizer in OUT/model, OUT/verses.jsonl (members with their repeat count, non-members),
    OUT/heldout.txt; returns what was trained."""
    import transformers

    from memloc.tasks.lm.sources import bible_verses
    rng = random.Random(seed)
    verses = [v for v in bible_verses() if 60 <= len(v) <= 160]  # a prefix and a suffix of a few words each
    rng.shuffle(verses)
    groups = {r: verses[g * per_group:(g + 1) * per_group] for g, r in enumerate(REPEATS)}
    rest = verses[len(REPEATS) * per_group:]
    non_members, held, fill = rest[:2 * per_group], rest[2 * per_group:2 * per_group + 300], \
        rest[2 * per_group + 300:2 * per_group + 300 + filler]
    corpus = fill + [v for r, vs in groups.items() for v in vs for _ in range(r)]
    tok = bpe_tokenizer(verses[:len(REPEATS) * per_group + 2 * per_group + 300 + filler])
    eos = tok.eos_token_id
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_layer=layers, n_head=max(1, width // 64),
                                  n_embd=width, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    seconds = train_plainly(model, tok, corpus, epochs=epochs, lr=1e-3, rng=rng, bf16=True)
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    with (out / "verses.jsonl").open("w") as f:
        for r, vs in groups.items():
            for v in vs:
                f.write(json.dumps({"text": v, "member": True, "repeats": r}) + "\n")
        for v in non_members:
            f.write(json.dumps({"text": v, "member": False}) + "\n")
    (out / "heldout.txt").write_text("\n".join(held) + "\n")
    return {"train_seconds": round(seconds, 1), "examples": len(corpus),
            "parameters": sum(p.numel() for p in model.parameters())}


PRECISIONS = ("fp32", "bf16")


def _rows(run: Path, probe: str, name: str) -> list[dict]:
    return list(csv.DictReader((run / "probes" / probe / f"{name}.csv").open()))


def tables(out: Path, info: dict, repeats: tuple[int, ...]) -> str:
    from memloc.tasks.lm.membership import _auroc
    recs = [json.loads(line) for line in (out / "verses.jsonl").read_text().splitlines()]
    rep = np.array([r.get("repeats", 0) for r in recs])
    sign = {"loss": -1, "zlib": -1, "min_k": 1, "min_k_pp": 1}
    got = {}
    for prec in PRECISIONS:
        run = out / f"audit-{prec}"
        rows = _rows(run, "memorization", "memorization")
        removal = run / "probes" / "removal" / "summary.json"
        got[prec] = {"extracted": np.array([r["extracted"] == "True" for r in rows]),
                     "loss": np.array([float(r["loss"]) for r in rows]),
                     "accuracy": np.array([float(r["suffix_accuracy"]) for r in rows]),
                     "scores": {k: np.array([float(r[f"mi_{k}"]) for r in rows]) for k in sign},
                     "removal": json.loads(removal.read_text()) if removal.exists() else None}
    how = "bf16 autocast" if info["bf16_train"] else "fp32"
    lines = [f"GPT-2 {info['width']} wide, {info['layers']} blocks ({info['parameters']:,} parameters), trained by "
             f"plain transformers ({how}, {info['epochs']} epochs of {info['examples']:,} verses, "
             f"{info['train_seconds']:.0f} s); audited twice by `memloc audit`, "
             "removal included.", "",
             "| precision | audit seconds | " + " | ".join(f"extracted, {r}x" for r in repeats)
             + " | extracted, non-members | AUROC loss | AUROC zlib | AUROC Min-K% | AUROC Min-K%++ | removal: "
             "units zeroed | targeted extracted after | perplexity cost |",
             "|---|---|" + "---|" * len(repeats) + "---|---|---|---|---|---|---|---|"]
    for prec in PRECISIONS:
        g, members = got[prec], rep > 0
        aur = [f"{_auroc(sign[k] * v[members], sign[k] * v[~members]):.3f}" for k, v in g["scores"].items()]
        r = g["removal"]
        rem = ["–"] * 3 if r is None else [f"{r['zeroed']} of {r['units']}",
                                           f"{100 * r['targeted_extracted_after']:.0f}% of {r['targeted']}",
                                           f"{100 * r['perplexity_cost']:+.2f}%"]
        lines.append(f"| {prec} | {info['audit_seconds'][prec]:.0f} | "
                     + " | ".join(f"{100 * g['extracted'][rep == n].mean():.0f}%" for n in (*repeats, 0)) + " | "
                     + " | ".join(aur) + " | " + " | ".join(rem) + " |")
    a, b = got["fp32"], got["bf16"]
    differ = int((a["extracted"] != b["extracted"]).sum())
    dl = np.abs(a["loss"] - b["loss"])
    spread = {k: np.abs(a["scores"][k] - b["scores"][k]).max() / max(np.ptp(a["scores"][k]), 1e-12) for k in sign}
    moved = np.abs(a["accuracy"] - b["accuracy"]) > 1e-9
    lines += ["", f"Verses whose extraction differs between the two: {differ} of {len(rep)}; whose suffix accuracy "
              f"(the share of suffix tokens that are the argmax) differs: {int(moved.sum())} of {len(rep)} "
              f"(mean |bf16 - fp32| {np.abs(a['accuracy'] - b['accuracy']).mean():.4f}). Suffix loss, |bf16 - "
              f"fp32|: mean {dl.mean():.4f}, max {dl.max():.4f} nats per token (mean loss {a['loss'].mean():.3f}). "
              "Membership scores, largest |bf16 - fp32| relative to the score's spread across records: "
              + ", ".join(f"{k} {v:.4f}" for k, v in spread.items()) + "."]
    if a["removal"] and b["removal"]:
        lines += ["Removal: sizes tried, fp32 " + "; ".join(f"{s['k']}: {100 * s['extracted']:.0f}%"
                                                            for s in a["removal"]["sweep"])
                  + " / bf16 " + "; ".join(f"{s['k']}: {100 * s['extracted']:.0f}%" for s in b["removal"]["sweep"])
                  + "."]
    text = "\n".join(lines) + "\n"
    (out / "tables.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bf16-audit")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--filler", type=int, default=600, help="verses written once that are not audited")
    ap.add_argument("--per-group", type=int, default=16, help="verses per repeat count (and twice as many "
                    "non-members)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tables", action="store_true", help="only write the tables again from OUT's audits")
    args = ap.parse_args()
    out = Path(args.out)
    if args.tables:
        print(tables(out, json.loads((out / "info.json").read_text()), REPEATS))
        return
    out.mkdir(parents=True, exist_ok=True)
    info = build(out, width=args.width, layers=args.layers, epochs=args.epochs, filler=args.filler,
                 per_group=args.per_group, seed=args.seed)
    info.update(width=args.width, layers=args.layers, epochs=args.epochs, bf16_train=True, audit_seconds={})
    from memloc.cli import main as memloc
    for prec in PRECISIONS:
        t0 = time.perf_counter()
        code = memloc(["audit", f"hf:{out / 'model'}", "--sequences", str(out / "verses.jsonl"), "--heldout",
                       str(out / "heldout.txt"), "--precision", prec, "--out", str(out / f"audit-{prec}"),
                       "--overwrite", "--quiet"])
        if code:
            raise SystemExit(code)
        info["audit_seconds"][prec] = round(time.perf_counter() - t0, 1)
        print(f"audit in {prec}: {info['audit_seconds'][prec]:.0f} s", flush=True)
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(tables(out, info, REPEATS))


if __name__ == "__main__":
    main()
