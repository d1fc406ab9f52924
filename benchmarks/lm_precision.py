"""Where bf16 pays for a language model on this device: a forward pass, and a forward and backward pass, of Hugging
Face GPT-2 models of several widths, fp32 against bf16 autocast (the weights float32, as memloc runs them), on the
same batch. The rule `precision.choose` follows on a CPU with native bf16 (`BF16_WIDTH`) comes from this table.

    python benchmarks/lm_precision.py [--rows 32] [--tokens 80] [--repeats 3] [--out runs/lm-precision]

The backward pass is taken with respect to the token embeddings' output only (the weights frozen), as the
localization methods backpropagate to masks, not to weights. Random weights: the arithmetic, not what is computed,
sets the time. Each time is the best of `--repeats` after one warm-up. Writes OUT/results.json, prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

# (width, blocks, vocabulary): small to GPT-2 small's shape
SIZES = ((128, 2, 4096), (256, 4, 8192), (384, 6, 50257), (512, 6, 50257), (768, 12, 50257))


def best(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(width: int, blocks: int, vocab: int, *, rows: int, tokens: int, repeats: int) -> dict:
    import transformers
    cfg = transformers.GPT2Config(n_embd=width, n_layer=blocks, n_head=max(1, width // 64), vocab_size=vocab,
                                  bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0))

    def forward(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids).logits.float()

    def backward(bf16: bool):
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs_embeds=emb).logits
        out.float().logsumexp(-1).sum().backward()

    got = {"width": width, "blocks": blocks, "vocab": vocab,
           "parameters": sum(p.numel() for p in model.parameters())}
    for name, f in (("forward", forward), ("forward_backward", backward)):
        fp32, bf16 = best(lambda: f(False), repeats), best(lambda: f(True), repeats)
        got[name] = {"fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4), "speedup": round(fp32 / bf16, 2)}
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/lm-precision")
    args = ap.parse_args()
    from memloc.core.precision import native_bf16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu", "native_bf16": native_bf16(torch.device("cpu")), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": args.rows,
              "tokens": args.tokens, "date": time.strftime("%Y-%m-%d"), "sizes": []}
    print("| width | blocks | vocabulary | parameters | forward fp32 / bf16 | speed-up | forward+backward fp32 / bf16 "
          "| speed-up |\n|---|---|---|---|---|---|---|---|", flush=True)
    for width, blocks, vocab in SIZES:
        r = measure(width, blocks, vocab, rows=args.rows, tokens=args.tokens, repeats=args.repeats)
        result["sizes"].append(r)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        f, b = r["forward"], r["forward_backward"]
        print(f"| {width} | {blocks} | {vocab:,} | {r['parameters'] / 1e6:.1f} M | {f['fp32_s']:.3f} / "
              f"{f['bf16_s']:.3f} s | {f['speedup']:.2f}x | {b['fp32_s']:.3f} / {b['bf16_s']:.3f} s | "
              f"{b['speedup']:.2f}x |", flush=True)
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
