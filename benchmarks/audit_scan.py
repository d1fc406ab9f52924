"""The audit's extraction scan against Hugging Face `generate` greedy decoding, on the same model and sequences.

The usual way to ask "does the model reproduce this suffix?" is `model.generate(prefix, do_sample=False,
max_new_tokens=S)` per batch of prefixes: S decoding steps (with a key/value cache). memloc's scan
(`memloc.tasks.lm.measures.extractable`) runs one teacher-forced forward over prefix + suffix per batch and is exactly
equivalent (its docstring proves it). This script builds a randomly initialized GPT-2 of a given size with plain
transformers, plants a share of sequences that it is then made to reproduce exactly (the suffix is set to the
model's own greedy continuation, so both answers must agree on "extracted" for those and on "not" for the rest),
times both ways over several repeats, checks that the answers are the same sequence by sequence, and writes
runs/bench-audit-scan/<device>.json.

    python benchmarks/audit_scan.py                          # CPU: GPT-2 2 x 256, 256 sequences of 64 + 32 tokens
    python benchmarks/audit_scan.py --device cuda --layers 12 --width 768 --sequences 2048   # a GPU: GPT-2 small
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_extractable(model, prefixes: torch.Tensor, suffixes: torch.Tensor, batch: int) -> torch.Tensor:
    """Greedy `generate` from each prefix; extracted when its continuation equals the suffix."""
    out = []
    for s in range(0, len(prefixes), batch):
        p = prefixes[s:s + batch]
        g = model.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=suffixes.shape[1],
                           min_new_tokens=suffixes.shape[1], pad_token_id=0)
        out.append((g[:, p.shape[1]:] == suffixes[s:s + batch]).all(1).cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers

    from memloc.tasks.lm import measures
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.prefix + args.suffix, n_layer=args.layers,
                                  n_head=max(1, args.width // 64), n_embd=args.width, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    prefixes = torch.randint(1, args.vocab, (args.sequences, args.prefix), device=device)
    suffixes = torch.randint(1, args.vocab, (args.sequences, args.suffix), device=device)
    half = args.sequences // 2  # the first half: the model's own greedy continuation, so extracted by definition
    suffixes[:half] = measures.greedy_generate(model, prefixes[:half].tolist(), args.suffix,
                                               batch_size=args.batch).to(device)
    pre, suf = prefixes.tolist(), suffixes.tolist()
    times = {"memloc_scan": [], "hf_generate": []}
    answers = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            answers["memloc_scan"] = measures.extractable(model, pre, suf, batch_size=args.batch)
            sync(device)
            times["memloc_scan"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            answers["hf_generate"] = generate_extractable(model, prefixes, suffixes, args.batch)
            sync(device)
            times["hf_generate"].append(time.perf_counter() - t0)
    same = bool(torch.equal(answers["memloc_scan"], answers["hf_generate"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "transformers": transformers.__version__, "config": vars(args),
              "parameters": sum(p.numel() for p in model.parameters()), "same_answers": same,
              "extracted": int(answers["memloc_scan"].sum()), "planted": half,
              "seconds_median": med, "seconds_all": times, "speedup": med["hf_generate"] / med["memloc_scan"]}
    out = Path("runs") / "bench-audit-scan" / f"{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['parameters']:,} parameters, {args.sequences} sequences of {args.prefix} + {args.suffix} tokens on "
          f"{device}: memloc scan {med['memloc_scan']:.2f} s, generate {med['hf_generate']:.2f} s "
          f"({result['speedup']:.1f}x); same answers: {same} ({result['extracted']} extracted, {half} planted)")


if __name__ == "__main__":
    main()
