"""What memorization sinks cost a training step: the same GPT with the sink layer in every MLP against the plain
one (and standard dropout in the same slot), one ratio per variant measured in one run.

Each variant is a deepcopy of one initialization (the sink layer holds no parameters and no buffers: no memory
per sequence, checked below); every step takes the same batch, its per-token document ids
(`TextData.example_ids`, what the trainer hands the layer) included in the sinks' time. A step is forward,
cross-entropy over the trained tokens, backward and an AdamW step. Steps are interleaved (plain, sinks, dropout,
plain, ...) so that load changes on a shared machine hit every variant; the first `--warmup` rounds are not
timed (with --compile they are the compilation). Medians over the timed rounds.

Target (issue #15): sinks time / plain time <= 1.10 on a GPU under --compile.

    python benchmarks/sinks_speed.py                                   # CPU, eager: about a minute on 2 cores
    python benchmarks/sinks_speed.py --device cuda --compile --n-layer 8 --n-embd 512 --batch-size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from memloc.core.dropout import ChannelDropout, ExampleTiedDropout, example_indices
from memloc.core.training import resolve_device
from memloc.tasks.lm.gpt import GPT, GPTShape
from memloc.tasks.lm.text import TextConfig, decode_targets, load_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile each variant")
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--p-gen", type=float, default=0.5)
    ap.add_argument("--p-mem", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    device = resolve_device(args.device)
    data = load_text(TextConfig(sequences=args.sequences, block_size=args.block_size, prefix_tokens=16,
                                suffix_tokens=32, canaries=2, repeats=(4, 16)), device=device)
    shape = GPTShape(data.vocab_size, data.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    a = args.p_gen + (1 - args.p_gen) * args.p_mem
    torch.manual_seed(0)
    base = GPT(shape)
    variants = {
        "plain": base,
        "sinks": GPT(shape, after_block=lambda i, u: ExampleTiedDropout(args.p_gen, args.p_mem, layer_id=i,
                                                                        tie="document")),
        "dropout": GPT(shape, after_block=lambda i, u: ChannelDropout(a)),
    }
    for name in ("sinks", "dropout"):
        variants[name].load_state_dict(base.state_dict())
        extra = sum(t.numel() for m in variants[name].modules() if isinstance(m, (ExampleTiedDropout, ChannelDropout))
                    for t in [*m.parameters(), *m.buffers()])
        assert extra == 0, f"{name}: the layer holds {extra} numbers"
    states = {}
    for name, model in variants.items():
        model = copy.deepcopy(model).to(device).train()
        fwd = torch.compile(model) if args.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda" or None)
        states[name] = (model, fwd, opt)
    g = torch.Generator().manual_seed(0)
    n = data.num_train

    def step(name: str, idx: torch.Tensor) -> float:
        model, fwd, opt = states[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        tokens, trained, _ = decode_targets(y)
        if name == "sinks":
            with example_indices(model, data.example_ids(idx.to(device), "document")):
                logits = fwd(x)
        else:
            logits = fwd(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
        loss = (ce * trained.flatten()).sum() / trained.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        for name in variants:
            t = step(name, idx)
            if r >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
           "compile": args.compile, "shape": vars(args), "threads": torch.get_num_threads(),
           "median_step_s": {k: round(v, 5) for k, v in med.items()},
           "sinks_over_plain": round(med["sinks"] / med["plain"], 3),
           "dropout_over_plain": round(med["dropout"] / med["plain"], 3), "layer_state_numbers": 0}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
