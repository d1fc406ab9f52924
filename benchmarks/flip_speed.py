"""Greedy unit removal: batched vs the paper-faithful sequential mode, same model and examples, one run.

CPU (2 cores, a few minutes):
    python benchmarks/flip_speed.py --dataset mnist5k --train-size 2000 --width 0.25 --epochs 15 \
        --examples 16 --others 128 --sequential-sample 4 --no-test-eval --compare-fp32

GPU (the paper's ResNet-9 on 50,000 CIFAR-shaped images; target >= 20x, 1000+1000 under 5 min, < 16 GB):
    python benchmarks/flip_speed.py --dataset synthetic --width 1 --epochs 15 --examples 256 \
        --others 512 --sequential-sample 8 --device cuda

Examples are chosen among those the model predicts as their given label (so every one needs a search),
N clean + N noisy. Each removal search is followed by the edited model's accuracy on the full training
and test sets (or --eval-subsample). The sequential mode runs on the first --sequential-sample examples
of each kind and is compared per example. Prints examples/s, the ratio, the extrapolated time for the
paper's 1000 clean + 1000 noisy examples and the peak device memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memloc.core.inference import predict
from memloc.core.training import TrainConfig, resolve_device, train
from memloc.probes.flipping import FlipConfig, _Flipper, flip_units
from memloc.tasks.classification.data import DataConfig
from memloc.tasks.experiment import ModelConfig, RunConfig, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--train-size", type=int)
    p.add_argument("--model", default="resnet9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=15, help="training epochs before probing (0: untrained)")
    p.add_argument("--batch-size", type=int, default=512, help="training batch size")
    p.add_argument("--examples", type=int, default=16, help="per kind (clean, noisy)")
    p.add_argument("--others", type=int, default=512)
    p.add_argument("--sequential-sample", type=int, default=4, help="per kind, for the sequential mode")
    p.add_argument("--eval-subsample", type=int)
    p.add_argument("--no-test-eval", action="store_true",
                   help="after removal, training-set accuracy only (as the paper)")
    p.add_argument("--batch-examples", type=int, default=16)
    p.add_argument("--eval-rows", type=int, help="default: 8192 on a GPU, 1024 on a CPU")
    p.add_argument("--max-rows", type=int, help="default: 4096 on a GPU, 1024 on a CPU")
    p.add_argument("--precision", default="auto", help="of the batched mode (the sequential one keeps its default)")
    p.add_argument("--compare-fp32", action="store_true",
                   help="also time the batched mode in fp32, to separate what bf16 buys from what batching buys")
    p.add_argument("--floor", action="store_true",
                   help="also time one plain forward pass of the search's model over the evaluation images: the "
                        "work each edited model's accuracy needs at the least, whatever the batching")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    device = resolve_device(a.device)
    data_cfg = DataConfig(dataset=a.dataset, train_size=a.train_size, noise=0.1, seed=a.seed)
    cfg = RunConfig(data=data_cfg, model=ModelConfig(name=a.model, width=a.width),
                    train=TrainConfig(epochs=max(1, a.epochs), lr=0.1, seed=a.seed, gradient_accounting=False,
                                      batch_size=a.batch_size,
                                      device=str(device)))
    data, model = build(cfg, device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    if a.epochs > 0:
        train(model, data, cfg.train)
    model.eval()
    print(f"{a.model} width {a.width:g} on {data.name}: {data.num_train} train / {len(data.y_test)} test, "
          f"device {device}, trained {a.epochs} epochs in {time.perf_counter() - t:.1f}s")
    pred = predict(model, data.x_train, device=device).argmax(1).to(data.y_train.device)
    ok = (pred == data.y_train).cpu().numpy()
    noisy = data.is_noisy.cpu().numpy()
    rng = np.random.default_rng(a.seed)
    picks = []
    for name, pool in (("clean", np.flatnonzero(ok & ~noisy)), ("noisy", np.flatnonzero(ok & noisy))):
        n = min(a.examples, len(pool))
        print(f"{name}: {len(pool)} predicted as labelled, taking {n}")
        picks.append(rng.choice(pool, size=n, replace=False))
    s = a.sequential_sample
    seq_idx = tuple(int(i) for part in picks for i in part[:s])
    all_idx = tuple(int(i) for part in picks for i in part)
    common = dict(others=a.others, eval_subsample=a.eval_subsample, eval_test=not a.no_test_eval, seed=a.seed,
                  device=str(device),
                  batch_examples=a.batch_examples, eval_rows=a.eval_rows, max_rows=a.max_rows)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    parts = {}  # seconds in the engine's two halves, per mode
    peaks = {}  # peak device memory in each half (GiB)

    def clocked(name, fn):
        def wrapper(self, *args, **kw):
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kw)
            finally:
                sync()
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        return wrapper

    def timed(idx, sequential, **kw):
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        parts.clear()
        orig = _Flipper.step, _Flipper.accuracies
        _Flipper.step, _Flipper.accuracies = clocked("score steps", orig[0]), clocked("accuracy after", orig[1])
        try:
            t0 = time.perf_counter()
            res = flip_units(model, data, FlipConfig(indices=idx, sequential=sequential, **{**common, **kw}))
            sync()
            return res, time.perf_counter() - t0, dict(parts)
        finally:
            _Flipper.step, _Flipper.accuracies = orig

    flip_units(model, data, FlipConfig(indices=all_idx[:2], **{**common, "eval_subsample": 64}))  # warm-up
    bat, t_bat, p_bat = timed(all_idx, False, precision=a.precision)
    mem = max(peaks.values()) if device.type == "cuda" else None
    mem_parts = dict(peaks)
    seq, t_seq, p_seq = timed(seq_idx, True)
    print(f"precision: batched {bat.summary['precision']}, sequential {seq.summary['precision']}")
    if a.compare_fp32 and bat.summary["precision"] != "fp32":
        b32, t_b32, _ = timed(all_idx, False, precision="fp32")
        same32 = sum(r["units"] == q["units"] for r, q in zip(bat.rows, b32.rows))
        print(f"batched fp32: {len(all_idx)} examples in {t_b32:.1f}s = {len(all_idx) / t_b32:.3f} examples/s "
              f"({t_b32 / t_bat:.2f}x the {bat.summary['precision']} time; same units for {same32}/{len(all_idx)})")
    same = {int(i): r["units"] for i, r in zip(seq.arrays["index"], seq.rows)}
    agree = sum(same[int(i)] == r["units"] for i, r in zip(bat.arrays["index"], bat.rows) if int(i) in same)
    rate_b, rate_s = len(all_idx) / t_bat, len(seq_idx) / t_seq
    for name, res in (("batched", bat), ("sequential", seq)):
        k = res.summary["kinds"]
        print(f"{name:10s}: " + ", ".join(f"{kind} mean {v['mean_units']:.2f} units" for kind, v in k.items()))
    print(f"batched   : {len(all_idx)} examples in {t_bat:.1f}s = {rate_b:.3f} examples/s")
    print(f"sequential: {len(seq_idx)} examples in {t_seq:.1f}s = {rate_s:.3f} examples/s")
    for name, p_, n in (("batched", p_bat, len(all_idx)), ("sequential", p_seq, len(seq_idx))):
        print(f"{name:10s}: per example " + ", ".join(f"{k} {v / n:.3f}s" for k, v in p_.items()))
    print(f"speed-up (per example): {rate_b / rate_s:.2f}x; same units for {agree}/{len(seq_idx)} examples")
    # the two samples need different numbers of removals; per score step (units + the final check) is fairer
    steps_b = int(bat.arrays["num_units"].sum()) + len(all_idx)
    steps_s = int(seq.arrays["num_units"].sum()) + len(seq_idx)
    sb, ss = p_bat.get("score steps", 0.0) / steps_b, p_seq.get("score steps", 0.0) / steps_s
    if sb > 0:
        acc_ratio = (p_seq.get('accuracy after', 0) / len(seq_idx)
                     / max(1e-9, p_bat.get('accuracy after', 0) / len(all_idx)))
        print(f"score steps: batched {1e3 * sb:.2f} ms, sequential {1e3 * ss:.2f} ms per example-step "
              f"= {ss / sb:.2f}x; accuracy after: {acc_ratio:.2f}x per example")
    if a.floor:
        floor(model, data, FlipConfig(indices=all_idx[:1], precision=a.precision, **common), sync,
              seq_per_example=t_seq / len(seq_idx), bat_acc=p_bat.get("accuracy after", 0.0) / len(all_idx))
    print(f"1000 clean + 1000 noisy, extrapolated: batched {2000 / rate_b / 60:.1f} min, "
          f"sequential {2000 / rate_s / 60:.1f} min")
    if mem is not None:
        print(f"peak device memory (batched): {mem:.2f} GiB ("
              + ", ".join(f"{k} {v:.2f}" for k, v in mem_parts.items()) + ")")
    return 0


def floor(model, data, cfg, sync, *, seq_per_example: float, bat_acc: float) -> None:
    """Time one unedited forward pass of the batched mode's own model (norms folded, its precision and
    layout) over the evaluation images, in its pass size: what any exact accuracy-after-removal costs per
    edited model, less only what a cached prefix saves. Prints the ratio to the sequential mode that the
    batched mode's own accuracy cost alone allows."""
    from memloc.probes.flipping import _plan
    cands, budget, _, _, others, ev_tr, ev_te = _plan(model, data, cfg)
    fl = _Flipper(model, data, cfg, cands, others, ev_tr, ev_te, budget)
    idx = torch.as_tensor(ev_tr, dtype=torch.long)
    rows = fl.eval_rows
    times = []
    with torch.no_grad():
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            for lo in range(0, len(idx), rows):
                x = fl._input(data.x_train[idx[lo:lo + rows].to(data.x_train.device)])
                with fl._autocast():
                    fl.model(x).argmax(1)
            sync()
            times.append(time.perf_counter() - t0)
    t = min(times)
    print(f"floor: one plain forward of the search's model over the {len(idx)} training images = {t:.4f}s "
          f"({'bf16' if fl.bf16 else 'fp32'}); the batched mode spends {bat_acc:.4f}s per example on the accuracy "
          f"after removal ({bat_acc / t:.2f} passes); the sequential mode {seq_per_example:.4f}s per example in all, "
          f"so a batched mode that did nothing per example but that accuracy would be at most "
          f"{seq_per_example / max(bat_acc, 1e-9):.1f}x faster "
          f"({seq_per_example / t:.1f}x at one full pass per example)")


if __name__ == "__main__":
    raise SystemExit(main())
