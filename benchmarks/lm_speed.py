"""Language-model speed: our trainer against a plain nanoGPT loop, gradient accounting, and batched against
sequential unit removal, each a ratio measured in one run.

1. Training throughput (tokens/s): our `Trainer` (gradient accounting off) against a plain nanoGPT-style
   loop on the same model (a deepcopy of one initialization), the same data, batch order, batch size and
   learning-rate schedule; AdamW betas (0.9, 0.95) with weight decay on the 2-D tensors, gradient clipping at
   1.0, cross-entropy over the trained tokens. Ours also records every sequence's loss, margin and
   extraction at each step: that is what the product does, so it is in our time.
   Target: plain time / our time >= 0.9.
2. Gradient accounting: our epoch with accounting on against off (same model and data). Target <= 1.7x.
3. Greedy unit removal on the canary sequences a trained model extracts: batched (the default) against the
   paper-faithful sequential mode, same examples, examples per second.

Epochs of the three training variants are interleaved (plain, ours, ours with accounting, plain, ...) and so
are the removal runs (batched, sequential, ...), so that load changes on a shared machine hit every variant;
the first epoch and a short removal run are warm-up. Medians over the timed repeats.

    python benchmarks/lm_speed.py                                  # CPU: a few minutes on 2 cores
    python benchmarks/lm_speed.py --sequences 20000 --block-size 256 --n-layer 6 --n-embd 384 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memloc.core.training import TrainConfig, Trainer, epoch_seed, learning_rate, prepare, resolve_device
from memloc.probes.flipping import FlipConfig, flip_units
from memloc.tasks import task_of
from memloc.tasks.lm.gpt import GPT, GPTShape
from memloc.tasks.lm.text import TextConfig, TextData, decode_targets, load_text

IGNORE = -1  # cross-entropy's ignore_index for untrained target positions (padding)


def make_data(args, device: torch.device) -> TextData:
    cfg = TextConfig(sequences=args.sequences, block_size=args.block_size, prefix_tokens=16, suffix_tokens=32,
                     canaries=2, repeats=(4, 16), canary_formats=("secret", "random"))
    return load_text(cfg, device=device)


def make_model(args, data: TextData) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTShape(data.vocab_size, data.block_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd))


def train_config(args, device: torch.device, *, epochs: int, accounting: bool) -> TrainConfig:
    return TrainConfig(optimizer="adamw", lr=1e-2, batch_size=args.batch_size, weight_decay=0.1, clip=1.0,
                       gradient_accounting=accounting, device=str(device), epochs=epochs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """nanoGPT's training loop: forward, token-mean cross-entropy, backward, clip, AdamW step; nothing else."""

    def __init__(self, model: nn.Module, data: TextData, cfg: TrainConfig, device: torch.device):
        self.model, self.cfg, self.device = model.to(device), cfg, device
        tokens, trained, _ = decode_targets(data.y_train)
        self.x = data.x_train.to(device)
        self.y = torch.where(trained, tokens, IGNORE).to(device)  # (N, T): targets ready, as nanoGPT's loader has them
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                     fused=device.type == "cuda" or None)
        self.steps_per_epoch = -(-len(self.x) // cfg.batch_size)

    def epoch(self, epoch: int) -> float:
        cfg, model, dev, n, b = self.cfg, self.model, self.device, len(self.x), self.cfg.batch_size
        total = self.steps_per_epoch * cfg.epochs
        model.train()
        sync(dev)
        t0 = time.perf_counter()
        # the trainer's order: randperm on the CPU from the epoch's seed
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
        order = order.to(self.x.device)
        for step, start in enumerate(range(0, n, b)):
            lr = learning_rate((epoch - 1) * self.steps_per_epoch + step, total, cfg)
            for group in self.opt.param_groups:
                group["lr"] = lr
            idx = order[start:start + b]
            xb, yb = self.x[idx], self.y[idx]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(xb)  # (B, T, vocab)
                loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), ignore_index=IGNORE)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            self.opt.step()
        sync(dev)
        return time.perf_counter() - t0


def ours_epoch(trainer: Trainer) -> Callable[[int], float]:
    """One epoch of `trainer`: `Trainer._epoch` is exactly what `fit()` times as epoch_time_s (without the
    evaluation that follows it), called here directly so that the variants' epochs can alternate."""
    def run(epoch: int) -> float:
        sync(trainer.device)
        t0 = time.perf_counter()
        trainer._epoch(epoch, None)
        sync(trainer.device)
        return time.perf_counter() - t0
    return run


def training(args, device: torch.device, data: TextData) -> dict:
    """Measurements 1 and 2: median epoch seconds of the plain loop, ours, ours with accounting."""
    epochs = args.repeats + 1  # one warm-up epoch
    init = make_model(args, data)
    prepare(init, data)
    variants = {
        "plain": PlainLoop(copy.deepcopy(init), data, train_config(args, device, epochs=epochs, accounting=False),
                           device).epoch,
        "ours": ours_epoch(Trainer(copy.deepcopy(init), data,
                                   train_config(args, device, epochs=epochs, accounting=False), progress=False)),
        "accounting": ours_epoch(Trainer(copy.deepcopy(init), data,
                                         train_config(args, device, epochs=epochs, accounting=True), progress=False)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for epoch in range(1, epochs + 1):
        for name, run in variants.items():
            times[name].append(run(epoch))
    return {k: statistics.median(v[1:]) for k, v in times.items()} | {"epoch_times_s": times}


def removal(args, device: torch.device, data: TextData) -> dict:
    """Measurement 3: train, then time greedy removal on the extractable canary sequences in both modes."""
    model = make_model(args, data)
    t0 = time.perf_counter()
    Trainer(model, data, train_config(args, device, epochs=args.epochs, accounting=False), progress=False).fit()
    trained_s = time.perf_counter() - t0
    model.eval()
    task = task_of(data)
    hits = task.hits(model, "train").cpu()
    canary = task.kind_mask("canary").cpu()
    pool = torch.nonzero(hits & canary).flatten().numpy()
    if len(pool) == 0:
        raise SystemExit(f"no canary sequence is extractable after {args.epochs} epochs: pass more --epochs")
    rng = np.random.default_rng(0)
    idx = tuple(int(i) for i in np.sort(rng.choice(pool, size=min(args.flip_examples, len(pool)), replace=False)))
    common = dict(others=args.others, copies=1, input_noise=0.0, eval_subsample=args.eval_subsample,
                  device=str(device))
    modes = {"batched": dict(sequential=False, precision=args.flip_precision), "sequential": dict(sequential=True)}
    flip_units(model, data, FlipConfig(indices=idx[:2], **{**common, "eval_subsample": 32}))  # warm-up
    runs: dict[str, list] = {k: [] for k in modes}
    for _ in range(args.flip_repeats):
        for name, kw in modes.items():
            runs[name].append(flip_units(model, data, FlipConfig(indices=idx, **common, **kw)))
    rates = {k: statistics.median(r.summary["examples_per_s"] for r in v) for k, v in runs.items()}
    b, s = runs["batched"][0], runs["sequential"][0]
    return {"trained_s": round(trained_s, 2), "extractable_canaries": int(len(pool)),
            "canary_sequences": int(canary.sum()), "examples": len(idx), "rates": rates,
            "precision": {k: v[0].summary["precision"] for k, v in runs.items()},
            "mean_units": {k: float(v[0].arrays["num_units"].mean()) for k, v in runs.items()},
            "same_units": int(sum(p["units"] == q["units"] for p, q in zip(b.rows, s.rows))),
            "elapsed_s": {k: [r.summary["elapsed_s"] for r in v] for k, v in runs.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=1200, help="training sequences")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the model whose units are removed")
    p.add_argument("--repeats", type=int, default=5, help="timed training epochs per variant (after one warm-up)")
    p.add_argument("--flip-repeats", type=int, default=3, help="timed removal runs per mode")
    p.add_argument("--flip-examples", type=int, default=16, help="extractable canary sequences searched")
    p.add_argument("--others", type=int, default=64)
    p.add_argument("--eval-subsample", type=int, default=256, help="accuracy after removal on K train and test")
    p.add_argument("--flip-precision", default="auto", help="of the batched mode: auto, fp32 or bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)

    device = resolve_device(a.device)
    load_before = os.getloadavg()[0]
    data = make_data(a, device)
    tokens = int((data.y_train != -1).sum())  # trained target tokens per epoch
    tr = training(a, device, data)
    rm = removal(a, device, data)
    load_after = os.getloadavg()[0]

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)")
    plain_tps, ours_tps = tokens / tr["plain"], tokens / tr["ours"]
    speed = tr["plain"] / tr["ours"]
    acct = tr["accounting"] / tr["ours"]
    flip = rm["rates"]["batched"] / rm["rates"]["sequential"]
    print(f"device {name}; GPT {a.n_layer} layers x {a.n_embd}, {a.n_head} heads; {data.num_train} sequences x "
          f"{data.block_size} tokens, batch {a.batch_size}; 1-min load {load_before:.2f} before, "
          f"{load_after:.2f} after")
    rows = [("1. training, tokens/s", f"plain {plain_tps:,.0f}", f"trainer {ours_tps:,.0f}", f"{speed:.2f}",
             ">= 0.90 (plain time / ours)"),
            ("2. gradient accounting, s/epoch", f"off {tr['ours']:.3f}", f"on {tr['accounting']:.3f}",
             f"{acct:.2f}x", "<= 1.7x"),
            ("3. unit removal, examples/s", f"sequential {rm['rates']['sequential']:.3f}",
             f"batched {rm['rates']['batched']:.3f}", f"{flip:.2f}x", "(batched / sequential)")]
    print(f"{'measurement':32s} {'baseline':>20s} {'ours':>20s} {'ratio':>7s}  target")
    for label, base, ours, ratio, target in rows:
        print(f"{label:32s} {base:>20s} {ours:>20s} {ratio:>7s}  {target}")
    print(f"   removal: {rm['examples']} of {rm['extractable_canaries']} extractable canary sequences "
          f"(of {rm['canary_sequences']}) after {a.epochs} epochs ({rm['trained_s']:.0f}s); precision batched "
          f"{rm['precision']['batched']}, sequential {rm['precision']['sequential']}; mean units "
          f"{rm['mean_units']['batched']:.2f} / {rm['mean_units']['sequential']:.2f}; same units for "
          f"{rm['same_units']}/{rm['examples']}; runs {rm['elapsed_s']} s")
    if a.json:
        res = {"device": name, "sequences": data.num_train, "block_size": data.block_size, "n_layer": a.n_layer,
               "n_head": a.n_head, "n_embd": a.n_embd, "batch_size": a.batch_size, "repeats": a.repeats,
               "load_1min_before": load_before, "load_1min_after": load_after, "tokens_per_epoch": tokens,
               "plain_epoch_s": round(tr["plain"], 4), "ours_epoch_s": round(tr["ours"], 4),
               "accounting_epoch_s": round(tr["accounting"], 4),
               "plain_tokens_per_s": round(plain_tps), "ours_tokens_per_s": round(ours_tps),
               "plain_over_ours": round(speed, 3), "accounting_over_ours": round(acct, 3),
               "epoch_times_s": {k: [round(t, 4) for t in v] for k, v in tr["epoch_times_s"].items()},
               "flip": rm, "flip_batched_over_sequential": round(flip, 3)}
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
