"""The audit's streaming scan of a token file too large to read: time and peak memory over N sequences.

Builds, under --out, a randomly initialized GPT-2 from a config (nothing downloaded) with a byte-level BPE trained
offline on a few words, and a nanoGPT-style token file: a raw uint16 stream of N x (prefix + suffix) random ids
with random member labels beside it (FILE.member.npy). Then runs `memloc audit MODEL --sequences FILE.bin
--sequence-length L --no-remove` in a child process and records its wall time and peak resident memory
(getrusage of the child), the scan's own time (from the run's stage record), and how many sequences the run kept,
in OUT/result.json. The point: memory stays flat in N (one chunk of sequences at a time, the per-sequence results
joined a column at a time), time grows linearly.

    python benchmarks/audit_stream.py --sequences 100000                 # ~ minutes on 2 CPU cores
    python benchmarks/audit_stream.py --sequences 1000000 --out runs/bench-audit-stream-1m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there all one their we been has when who will more no if out so said what up").split()


def build_model(folder: Path, *, layers: int, width: int, context: int) -> int:
    """A random-init GPT-2 and its tokenizer in `folder`; returns the vocabulary size."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    eos = tok.eos_token_id
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=context, n_layer=layers, n_head=max(1, width // 32),
                                  n_embd=width, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return len(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=100_000)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="the audit's --batch-size (default: its own, 16)")
    ap.add_argument("--threads", type=int, default=None, help="the audit's torch threads (OMP_NUM_THREADS; default: "
                    "torch's own): on a shared machine, 1 is several times faster than 2 contended ones")
    ap.add_argument("--out", default="runs/bench-audit-stream")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    length = args.prefix + args.suffix
    vocab = build_model(out / "model", layers=args.layers, width=args.width, context=max(64, length))
    tokens = out / "tokens.bin"
    rng = np.random.default_rng(0)
    with open(tokens, "wb") as f:  # written in blocks: the benchmark itself never holds the file either
        for lo in range(0, args.sequences, 100_000):
            n = min(100_000, args.sequences - lo)
            rng.integers(1, vocab, size=n * length, dtype=np.uint16).tofile(f)
    np.save(out / "tokens.member.npy", rng.integers(0, 2, size=args.sequences).astype(bool))
    run = out / "run"
    cmd = [sys.executable, "-m", "memloc", "audit", f"hf:{out / 'model'}", "--sequences", str(tokens),
           "--sequence-length", str(length), "--suffix-tokens", str(args.suffix), "--no-remove", "--out", str(run),
           "--overwrite", "--quiet", *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    rss = out / "rss.tsv"  # the child's resident memory every second: where the peak is
    with subprocess.Popen(cmd, env=env) as child, open(rss, "w") as trace:
        while child.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                kb = int(next(l for l in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                              if l.startswith("VmRSS")).split()[1])
                trace.write(f"{time.perf_counter() - t0:.1f}\t{kb / 1024:.1f}\n")
                trace.flush()
            time.sleep(1.0)
    if child.returncode:
        raise SystemExit(f"the audit failed (exit {child.returncode})")
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the child's peak
    stages = json.loads((run / "run.json").read_text())["stages"]
    summary = json.loads((run / "probes" / "scan" / "summary.json").read_text())
    result = {"command": " ".join(["python", "benchmarks/audit_stream.py", *sys.argv[1:]]),
              "audit": " ".join(["memloc", *cmd[3:]]), "sequences": args.sequences, "tokens_per_sequence": length,
              "model": {"layers": args.layers, "width": args.width, "vocab": vocab}, "threads": args.threads,
              "token_file_mb": round(tokens.stat().st_size / 2 ** 20, 1), "wall_s": round(wall, 1),
              "peak_rss_mb": round(peak / 1024, 1), "scan_stage": stages.get("scan"), "kept": summary["kept"],
              "extracted": summary["extracted"], "date": time.strftime("%Y-%m-%d")}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
