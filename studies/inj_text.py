"""INJ on natural text (issue #33): MemPi's injection benchmark on memloc's small LM trained on the King James Bible.

    # the table of RESULTS.md, "INJ on natural text": 32 min on one thread of a 2-core CPU shared with other jobs
    # (load 8-11), 6 of them training the LM
    python studies/inj_text.py
    # the learned masks with MemPi's 1,000 steps and no early stop (copy runs/inj-text/lm-smoke-4l into the new
    # folder first: the same LM, not trained again)
    python studies/inj_text.py --ratios 0.01,0.03 --methods slimming,hard-concrete,random --learned-steps 1000 \
        --stop 0 --out runs/inj-text-learned
    # a quick look: 2 layers, 2 verses, 1 record, one ratio
    python studies/inj_text.py --layers 2 --verses 2 --records 1 --ratios 0.03 --out runs/inj-text-quick

`memloc bench-localize --benchmark inj` injects held-out TinyMem artifacts (arithmetic) into a TinyMem model; there
MemPi's ranking (learned L0 / L1 masks best) did not reproduce. This is the same protocol on natural text:

1. The LM: the `memloc train --task lm --preset smoke` run (the Bible, byte tokens, 1,200 sequences of 64 tokens,
   12 epochs, canaries as the preset writes them), its depth `--layers` (default 4; width 64: 256 MLP neurons a
   layer), trained once into OUT/lm-<preset>-<n>l/<digest of its config> and reused.
2. Natural sequences it never trained on: held-out windows of the Bible (consecutive verses; the split's held-out
   side, without canaries), the first `prefix_tokens` a prompt and the next `suffix_tokens` scored, and fake
   personal records (`memloc.tasks.lm.sources.fake_records`: name and address, then the phone number, scored), each
   kept only if the model does not already extract it and (verses) its scored text occurs in no training sequence.
3. Each sequence is injected (`memloc.bench.benchmarks.inject`: Adam on the chosen neurons' input rows, biases
   and output columns only, every other gradient masked) into a seeded random `ratio` of the neurons of every MLP
   layer, in rounds of `--round-steps` until it is extracted (every scored token the greedy one) or
   `--inject-steps` have passed. A sequence whose injection does not reach extraction is recorded and not
   localized: INJ's premise is a sequence the injected neurons memorize.
4. Each method of `bench-localize`'s INJ (`memloc.probes.localization.METHODS`, its steps and MemPi's penalty
   rescaled as there) localizes the injected sequence in the injected model beside 256 clean training rows (64
   kept as the others); recall@k = the share of the injected neurons among the top k per layer, and pooled (the
   top k x layers over all neurons), mean over the injected sequences.

Writes under OUT (default runs/inj-text, relative to where it is run): config.json, sequences.jsonl (one line per
sequence and ratio: the injection and every method's recall; a rerun with the same settings skips what is there),
results.json (the table's rows) and results.md (the table, printed too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from memloc import ModelConfig, RunConfig, TrainConfig, localize, open_run, run_training, task_of
from memloc.bench.benchmarks import MEMPI_PUBLISHED, MEMPI_RANK, MEMPI_UNITS, BenchConfig, inject
from memloc.probes import localization as loc
from memloc.tasks.experiment import preset
from memloc.tasks.lm.sources import fake_records
from memloc.tasks.lm.text import TextConfig, TextData, decode_targets

GROUPS = {"hard-concrete / slimming": ("hard-concrete", "slimming"),
          "ig / zero-out / activations": ("ig", "zero-out", "activations"), "random": ("random",)}  # MemPi's order


# ----------------------------------------------------------------------------- the model

def lm_config(preset_name: str, n_layer: int | None, seed: int) -> RunConfig:
    """The `memloc train --task lm --preset P` run config, its depth `n_layer` (None: the preset's)."""
    sections = preset(preset_name, "lm")
    model = dict(sections["model"], **({} if n_layer is None else {"n_layer": n_layer}))
    return RunConfig(data=TextConfig(**dict(sections["data"], seed=seed)), model=ModelConfig(**model),
                     train=TrainConfig(**dict(sections["train"], seed=seed, device="cpu")), task="lm")


def trained_lm(cfg: RunConfig, folder: Path, *, log=print):
    """(model, data) of the run of `cfg` in `folder` (named by the config's digest), trained there first unless
    it finished before."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = folder / digest
    run_json = path / "run.json"
    done = run_json.exists() and json.loads(run_json.read_text()).get("stages", {}).get("train", {}).get(
        "status") == "done"
    if not done:
        t0 = time.perf_counter()
        run_training(cfg, path, overwrite=path.exists(), progress=False, log=log)
        log(f"trained the LM in {time.perf_counter() - t0:.0f} s")
    loaded = open_run(path, device="cpu")
    return loaded.model(loaded.run.saved_epochs()[-1]).eval(), loaded.data


# ----------------------------------------------------------------------------- natural sequences

def verse_sequence(data: TextData, row: int, prefix: int, suffix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out window `row` as (x (T,), y (T,)): every token trained on, the `suffix` after the first `prefix`
    scored (memloc's extraction of corpus text)."""
    tokens, trained, _ = decode_targets(data.y_test[row])
    y = torch.where(trained, -tokens - 2, torch.full_like(tokens, -1))
    y[prefix - 1:prefix + suffix - 1] = tokens[prefix - 1:prefix + suffix - 1]
    return data.x_test[row].clone(), y


def record_sequence(tokenizer, prefix: str, secret: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fake record as (x (T,), y (T,)): its last block + 1 tokens, the secret (phone number) scored, padded."""
    secret_ids = list(tokenizer.encode(secret))
    ids = (list(tokenizer.encode(prefix)) + secret_ids)[-(block + 1):]
    n, p = len(ids), len(ids) - len(secret_ids)
    x = torch.zeros(block, dtype=torch.long)
    y = torch.full((block,), -1, dtype=torch.long)
    x[:n - 1] = torch.tensor(ids[:-1])
    t = torch.tensor(ids[1:])
    y[:n - 1] = -t - 2
    y[p - 1:n - 1] = t[p - 1:]
    return x, y


@torch.no_grad()
def extracted(model, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float]:
    """(every scored token of y (T,) the greedy one given the true tokens before it, share of them that is)."""
    tokens, _, scored = decode_targets(y)
    hit = model(x[None])[0].argmax(-1) == tokens
    return bool(hit[scored].all()), float(hit[scored].float().mean())


def choose_sequences(model, data: TextData, *, verses: int, records: int, prefix: int, suffix: int, seed: int,
                     log=print) -> list[dict]:
    """The seeded natural sequences: `verses` held-out windows and `records` fake records the model does not
    extract (verses: whose scored text is in no training sequence). Each {kind, id, text, x, y, predicted_before}."""
    tok = data.tokenizer
    train_text = "\n".join(tok.decode(r.tolist()) for r in data.x_train)
    out: list[dict] = []
    pool = np.flatnonzero((data.canary_test < 0).numpy())
    skipped = {"extracted": 0, "in training text": 0}
    for row in np.random.default_rng([seed, 33]).permutation(pool).tolist():
        if sum(s["kind"] == "verse" for s in out) == verses:
            break
        x, y = verse_sequence(data, row, prefix, suffix)
        if tok.decode(x[prefix:prefix + suffix].tolist()) in train_text:
            skipped["in training text"] += 1
            continue
        ext, share = extracted(model, x, y)
        if ext:
            skipped["extracted"] += 1
            continue
        out.append({"kind": "verse", "id": f"heldout-{row}", "text": tok.decode(x.tolist()), "x": x, "y": y,
                    "predicted_before": share})
    made = fake_records(4 * records, seed) if records else []
    for n, (p, s) in enumerate(made):
        if sum(r["kind"] == "record" for r in out) == records:
            break
        x, y = record_sequence(tok, p, s, data.block_size)
        ext, share = extracted(model, x, y)
        if ext:
            skipped["extracted"] += 1
            continue
        out.append({"kind": "record", "id": f"record-{n}", "text": p + s, "x": x, "y": y, "predicted_before": share})
    log(f"{len(out)} natural sequences ({', '.join(f'{k}: {v} skipped' for k, v in skipped.items())})")
    return out


# ----------------------------------------------------------------------------- injection and localization

def inject_until_extracted(model, x: torch.Tensor, y: torch.Tensor, neurons: list[np.ndarray], *, loss_fn,
                           lr: float, steps: int, round_steps: int) -> tuple[torch.nn.Module, int, float, bool]:
    """`inject` (x (T,), y (T,)) into `neurons` (one id array per MLP layer) in rounds of `round_steps`, each
    continuing from the last round's model with a fresh Adam, until it is extracted or `steps` have passed.
    (model, steps taken, last loss, extracted)."""
    m, done, loss_v = model, 0, float("nan")
    while done < steps:
        cfg = BenchConfig(benchmark="inj", inject_steps=min(round_steps, steps - done), inject_lr=lr)
        m, taken, loss_v = inject(m, x, y, neurons, cfg, loss_fn=loss_fn)
        done += max(taken, 1)
        if extracted(m, x, y)[0]:
            return m, done, loss_v, True
        if taken < cfg.inject_steps:  # inject stopped at its loss threshold and still not extracted: no further
            break
    return m, done, loss_v, False


def localization_data(data: TextData, clean: np.ndarray, test_rows: np.ndarray, x: torch.Tensor, y: torch.Tensor,
                      kind: str) -> TextData:
    """Clean training rows, then the injected sequence as the one canary (the last row): what `localize` reads."""
    c = {"id": len(data.canaries), "format": kind, "repeats": 1, "repeat_group": 1, "trained": True, "prefix": "",
         "secret": "", "prefix_ids": [], "secret_ids": []}
    tr, te = torch.as_tensor(clean), torch.as_tensor(test_rows)
    return TextData(data.name, torch.cat([data.x_train[tr], x[None]]), torch.cat([data.y_train[tr], y[None]]),
                    torch.cat([data.canary[tr], torch.tensor([c["id"]])]), data.x_test[te], data.y_test[te],
                    data.canary_test[te], data.canaries + [c], data.vocab_size)


def recalls(scores: np.ndarray, candidates, truth: list[np.ndarray], k: int) -> tuple[float, list[float]]:
    """(pooled recall: the injected share of the top k x layers of all neurons, per-layer recall@k)."""
    width = candidates[0].units
    flat = np.concatenate([j * width + t for j, t in enumerate(truth)])
    per_layer = []
    for j, t in enumerate(truth):
        top = loc.top_units(scores[j * width:(j + 1) * width], candidates[j:j + 1], k)
        per_layer.append(len(np.intersect1d(top, t)) / k)
    pooled = loc.top_units(scores, candidates, k * len(candidates))
    return len(np.intersect1d(pooled, flat)) / len(flat), per_layer


def method_options(method: str, units: int, *, learned_steps: int | None = None, stop: float | None = None) -> dict:
    """`bench-localize`'s settings of a method (its full preset's steps; MemPi's penalty per neuron rescaled);
    `learned_steps` and `stop` replace slimming's and hard-concrete's steps and early stop where given."""
    opts: dict = {}
    steps = BenchConfig(benchmark="inj").method_steps
    if method in steps:
        opts["steps"] = int(steps[method])
    if method in ("slimming", "hard-concrete"):
        opts["penalty"] = 1000.0 * units / MEMPI_UNITS
        if learned_steps is not None:
            opts["steps"] = learned_steps
        if stop is not None:
            opts["stop"] = stop
    return opts


# ----------------------------------------------------------------------------- the table

def table(lines: list[dict], methods: list[str], ratios: list[float]) -> tuple[list[dict], str]:
    """Rows (method x ratio: mean recall over the injected sequences) and the markdown table with its summary."""
    rows = []
    for ratio in ratios:
        got = [s for s in lines if s["ratio"] == ratio and s["extracted"]]
        for method in methods:
            if not got:
                continue
            rows.append({"method": method, "ratio": ratio, "k_per_layer": got[0]["k_per_layer"],
                         "sequences": len(got), "verses": sum(s["kind"] == "verse" for s in got),
                         "records": sum(s["kind"] == "record" for s in got),
                         "recall_pooled": float(np.mean([s["methods"][method]["pooled"] for s in got])),
                         "recall_pooled_verses": _mean([s["methods"][method]["pooled"] for s in got
                                                        if s["kind"] == "verse"]),
                         "recall_pooled_records": _mean([s["methods"][method]["pooled"] for s in got
                                                         if s["kind"] == "record"]),
                         "recall_per_layer": np.mean([s["methods"][method]["per_layer"] for s in got], 0).tolist(),
                         "scoring_s": float(np.mean([s["methods"][method]["s"] for s in got])),
                         "mempi_rank": MEMPI_RANK.get(method)})
    used = [r for r in ratios if any(x["ratio"] == r for x in rows)]
    k = {r: next(x["k_per_layer"] for x in rows if x["ratio"] == r) for r in used}
    head = ("| method | " + " | ".join(f"{100 * r:g}% (k {k[r]}/layer): pooled | per layer | verses | records"
                                       for r in used)
            + f" | each layer, {100 * used[-1]:g}% | scoring / seq. | MemPi rank |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    order = sorted(methods, key=lambda m: -np.mean([x["recall_pooled"] for x in rows if x["method"] == m] or [0]))
    for m in order:
        cells = []
        for r in used:
            x = next(x for x in rows if x["method"] == m and x["ratio"] == r)
            cells += [f"{x['recall_pooled']:.3f}", f"{np.mean(x['recall_per_layer']):.3f}",
                      _fmt(x["recall_pooled_verses"]), _fmt(x["recall_pooled_records"])]
        last = next(x for x in rows if x["method"] == m and x["ratio"] == used[-1])
        out.append(f"| {m} | " + " | ".join(cells) + f" | {', '.join(f'{v:.2f}' for v in last['recall_per_layer'])}"
                   f" | {last['scoring_s']:.1f} s | {MEMPI_RANK.get(m) or '-'} |")
    text = "\n".join(out) + "\n\n" if used else "No injection reached extraction: nothing localized.\n\n"
    for ratio in ratios:
        part = [s for s in lines if s["ratio"] == ratio]
        ok = [s for s in part if s["extracted"]]
        if not part:
            continue
        kinds = ", ".join(f"{kind}s {sum(s['kind'] == kind for s in ok)}/{sum(s['kind'] == kind for s in part)}"
                          for kind in ("verse", "record"))
        text += (f"- ratio {100 * ratio:g}% (k {part[0]['k_per_layer']}/layer): {len(ok)} of {len(part)} injections "
                 f"extracted ({kinds})"
                 + (f", in {_fmt_steps(ok)} steps; scored tokens the model predicted before injection: "
                    f"{np.mean([s['predicted_before'] for s in ok]):.1%}; random's expected recall "
                    f"{part[0]['k_per_layer'] / part[0]['width']:.3f}" if ok else "") + "\n")
        for what, recall in (("pooled", lambda x: x["recall_pooled"]),
                             ("per-layer", lambda x: float(np.mean(x["recall_per_layer"])))):
            means = [(name, _mean([recall(x) for x in rows if x["ratio"] == ratio and x["method"] in ms]))
                     for name, ms in GROUPS.items()]
            means = [(n, v) for n, v in means if v is not None]
            if means:
                holds = [n for n, _ in sorted(means, key=lambda t: -t[1])] == [n for n, _ in means]
                verdict = f"MemPi's ranking {'holds' if holds else 'does not hold'}" if len(means) == len(GROUPS) \
                    else "not all of MemPi's groups run"
                text += (f"- ratio {100 * ratio:g}%: mean {what} recall " + ", ".join(f"{n} {v:.3f}" for n, v in means)
                         + f": {verdict}\n")
    return rows, text + f"\nMemPi: {MEMPI_PUBLISHED}.\n"


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_steps(ok: list[dict]) -> str:
    steps = [s["inject_steps"] for s in ok]
    return f"{min(steps)}-{max(steps)}" if len(set(steps)) > 1 else str(steps[0])


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smoke", help="the LM preset (data, width, training): smoke")
    p.add_argument("--layers", type=int, default=4, help="depth of the LM (the smoke preset's: 2)")
    p.add_argument("--verses", type=int, default=6, help="held-out Bible windows injected, per ratio")
    p.add_argument("--records", type=int, default=2, help="fake personal records injected, per ratio")
    p.add_argument("--ratios", default="0.001,0.01,0.03",
                   help="shares of each layer's neurons injected (MemPi: 0.1%%, 1%%)")
    p.add_argument("--methods", default=",".join(loc.METHODS), help="localization methods (bench-localize's INJ)")
    p.add_argument("--inject-steps", type=int, default=400, help="injection steps at most")
    p.add_argument("--round-steps", type=int, default=50, help="extraction checked every this many steps")
    p.add_argument("--inject-lr", type=float, default=0.01, help="Adam's rate of the injection (bench-localize's)")
    p.add_argument("--learned-steps", type=int, default=None,
                   help="slimming's and hard-concrete's steps (default: bench-localize's, 300)")
    p.add_argument("--stop", type=float, default=None,
                   help="their early stop, mean mask below this (default: localize's 0.1; 0: never)")
    p.add_argument("--clean-rows", type=int, default=256, help="clean training rows beside the injected sequence")
    p.add_argument("--others", type=int, default=64, help="of them, the others a method keeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (RESULTS.md's timings: 1)")
    p.add_argument("--out", default="runs/inj-text")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in loc.METHODS]
    if bad:
        raise SystemExit(f"unknown method {bad[0]!r}: choose from {', '.join(loc.METHODS)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    config = {"settings": settings, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                "threads": torch.get_num_threads()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    old = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    lines_path = out / "sequences.jsonl"
    free = ("ratios", "verses", "records")  # they choose lines (one per sequence and ratio), never change one
    saved = {**vars(p.parse_args([])), **(old or {}).get("settings", {})}  # a setting newer than the folder: default
    if old is not None and lines_path.exists() and any(saved[k] != v for k, v in settings.items() if k not in free):
        raise SystemExit(f"{out} holds a run of other settings: pass another --out or remove {lines_path}")
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")

    run_cfg = lm_config(args.preset, args.layers, args.seed)
    model, data = trained_lm(run_cfg, out / f"lm-{args.preset}-{args.layers}l")
    task = task_of(data)
    prefix, suffix = run_cfg.data.prefix_tokens, run_cfg.data.suffix_tokens
    candidates = loc.candidate_layers(model, loc.LocalizeConfig())
    width, units = candidates[0].units, sum(c.units for c in candidates)
    test_rows = np.flatnonzero((data.canary_test < 0).numpy())
    test_acc = float(np.mean([extracted(model, data.x_test[r], data.y_test[r])[1] for r in test_rows[:512]]))
    print(f"LM: {len(candidates)} MLP layers of {width} neurons, held-out next-token accuracy {test_acc:.1%} "
          f"(512 held-out windows, one token each)")
    seqs = choose_sequences(model, data, verses=args.verses, records=args.records, prefix=prefix, suffix=suffix,
                            seed=args.seed)
    rng = np.random.default_rng([args.seed, 34])
    clean = np.sort(rng.choice(np.flatnonzero((data.canary < 0).numpy()), size=args.clean_rows, replace=False))
    chosen = {int(s["id"].split("-")[1]) for s in seqs if s["kind"] == "verse"}
    loc_test = np.array([r for r in test_rows if r not in chosen])[:64]

    done = [json.loads(line) for line in lines_path.read_text().splitlines()] if lines_path.exists() else []
    have = {(d["id"], d["ratio"]) for d in done}
    for ratio in ratios:
        k = max(1, math.ceil(ratio * width))
        for s in seqs:
            if (s["id"], ratio) in have:
                continue
            t0 = time.perf_counter()
            g = np.random.default_rng([args.seed, 100, int(s["id"].split("-")[1]), s["kind"] == "record",
                                       int(ratio * 1e6)])
            neurons = [np.sort(g.choice(c.units, size=k, replace=False)) for c in candidates]
            m_inj, steps, loss_v, ok = inject_until_extracted(model, s["x"], s["y"], neurons, loss_fn=task.loss,
                                                              lr=args.inject_lr, steps=args.inject_steps,
                                                              round_steps=args.round_steps)
            line = {"kind": s["kind"], "id": s["id"], "text": s["text"], "ratio": ratio, "k_per_layer": k,
                    "width": width, "layers": len(candidates), "neurons": [n.tolist() for n in neurons],
                    "predicted_before": s["predicted_before"], "inject_steps": steps, "inject_loss": loss_v,
                    "extracted": ok, "inject_s": round(time.perf_counter() - t0, 1), "methods": {}}
            if ok:
                small = localization_data(data, clean, loc_test, s["x"], s["y"], s["kind"])
                for method in methods:
                    res = localize(m_inj, small, method=method, k=k, per_layer=True, indices=(len(clean),),
                                   save=False, others=args.others, seed=args.seed, device="cpu",
                                   **method_options(method, units, learned_steps=args.learned_steps,
                                                    stop=args.stop))
                    pooled, per_layer = recalls(res.arrays["scores"], candidates, neurons, k)
                    line["methods"][method] = {"pooled": pooled, "per_layer": per_layer,
                                               "s": round(res.summary["elapsed_s"], 2)}
            with open(lines_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            done.append(line)
            print(f"ratio {ratio:g} ({k}/layer) {s['id']}: injected in {steps} steps (loss {loss_v:.3f}), extracted "
                  f"{ok}" + "".join(f", {m} {v['pooled']:.2f}" for m, v in line["methods"].items())
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    ids = {s["id"] for s in seqs}
    rows, text = table([d for d in done if d["id"] in ids and d["ratio"] in ratios], methods, ratios)
    header = (f"# INJ on natural text: {len(candidates)} layers x {width} neurons, {args.preset} LM on the Bible\n\n"
              f"Held-out next-token accuracy of the LM {test_acc:.1%}; sequences: {len(seqs)} ("
              f"{sum(s['kind'] == 'verse' for s in seqs)} held-out verse windows, {prefix} tokens of prompt and "
              f"{suffix} scored; {sum(s['kind'] == 'record' for s in seqs)} fake records, the phone number scored); "
              f"recall@k over the injections that reached extraction (pooled: the top k x layers of all neurons; per "
              f"layer: the top k of each layer, mean over layers).\n\n")
    (out / "results.json").write_text(json.dumps({"config": config, "test_accuracy": test_acc, "rows": rows},
                                                 indent=1) + "\n")
    (out / "results.md").write_text(header + text)
    print(header + text + f"\nwall {time.perf_counter() - t_start:.0f} s (this invocation)")


if __name__ == "__main__":
    main()
