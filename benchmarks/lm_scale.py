"""Language models at the sizes people audit: time and peak memory of each stage of `memloc audit` and `memloc
localize` on a model built from a real configuration (GPT-2 small, Pythia 160M / 1B), random weights.

No weights can be downloaded here, and none are needed for speed and memory: a random model of the real shape does
the same arithmetic. (What it cannot say is how much a real model memorizes; RESULTS.md's audits say that.) The
script writes the model folder (safetensors, a word-level tokenizer whose token i is "t<i>", so token ids and text
map one to one), N sequences of P + S random tokens, half of them members, of which `--planted` have the model's own
greedy continuation as their suffix (extracted by definition: localization has something to work on), then runs
each stage in a fresh process and records its wall time and peak memory (the process's peak resident set; on a
GPU also torch's peak allocated):

- ``scan``: the audit's one teacher-forced pass (`memloc.tasks.lm.membership.token_logprobs`: extraction, loss and the
  membership scores' statistics from the same logits), batch chosen by `memloc.core.batching`;
- ``forward``: the bare forward pass (memloc's wrapper: the logits and nothing made of them) over the same rows at
  the scan's batch: the scan's ceiling (the issue's GPU goal: the scan at no less than 70% of its tokens per second);
- ``generate``: Hugging Face `generate`, greedy with its cache, on `--generate` of the sequences (the usual way to
  test extraction), to compare per sequence with the scan;
- ``audit``: the whole `memloc audit --no-remove` command (scan, k-extractability at the prefix lengths, held-out
  perplexity, report);
- ``localize:METHOD``: `memloc localize` on the audit's run, on the planted sequences (`--indices`), each method
  of `--methods` with the step count of `--steps` where given (the learned methods' defaults are 200-1000 steps,
  ig's 20 per layer: a step's time times theirs is the default's time). With `--by-extraction` the sequences are
  the ones the model extracts (the planted ones, found by a pass over every row: what the audit's removal does).
  With `--recompute off,on` each method runs once per setting (gradient checkpointing of the blocks, at the same
  `--batch-size`): the memory it saves and the time it costs.

Every stage computes in `--precision` (the audit's setting, which `localize` reads from the run): auto is bf16
autocast on a GPU, and on a CPU with native bf16 for a model at least 512 wide; run the script once per setting
(`--precision fp32`, `--precision bf16`, each with its `--out`) to compare them. The scan and `generate` say how
many of the planted sequences (the fp32 model's own greedy continuations) they extract: under bf16, a random model's
near-uniform logits let rounding move argmaxes, the worst case of what bf16 changes.

    python benchmarks/lm_scale.py --model gpt2                      # this CPU: GPT-2 small, 1,000 x (32 + 48)
    python benchmarks/lm_scale.py --model pythia-1b --device cuda --sequences 10000 --methods balanced-subnet

Writes runs/lm-scale/<model>-<device>/results.json and prints one line per stage; `--on-paper` prints the
per-token costs scaled to Pythia-6.9B from a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# The real configurations (Hugging Face's config.json of each model, the fields that set its size)
CONFIGS = {
    "tiny": ("gpt2", dict(vocab_size=500, n_positions=128, n_embd=64, n_layer=2, n_head=4)),  # the script's check
    "gpt2": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "pythia-160m": ("gpt_neox", dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25)),
    "pythia-1b": ("gpt_neox", dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                                   intermediate_size=8192, max_position_embeddings=2048, rotary_pct=0.25)),
    "pythia-6.9b": ("gpt_neox", dict(vocab_size=50432, hidden_size=4096, num_hidden_layers=32,
                                     num_attention_heads=32, intermediate_size=16384, max_position_embeddings=2048,
                                     rotary_pct=0.25)),
}


def build(name: str, folder: Path, seed: int = 0) -> int:
    """The model of `name` with random weights and a word-level tokenizer of its vocabulary, saved in `folder`;
    its parameter count."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    family, fields = CONFIGS[name]
    cls = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
           "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM)}[family]
    cfg = cls[0](**fields, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = cls[1](cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, cfg.vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>").save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def sequences(folder: Path, out: Path, *, n: int, prefix: int, suffix: int, planted: int, device: str,
              seed: int = 0) -> None:
    """`n` random sequences as prefix/suffix text (jsonl), the first half members; the first `planted` with the
    model's greedy continuation as suffix."""
    import torch

    from memloc.tasks.lm import measures
    from memloc.tasks.lm.hf import load_hf
    g = torch.Generator().manual_seed(seed)
    model = load_hf(folder).to(device)
    vocab = model.shape.vocab_size
    pre = torch.randint(1, vocab, (n, prefix), generator=g)
    suf = torch.randint(1, vocab, (n, suffix), generator=g)
    if planted:
        suf[:planted] = measures.greedy_generate(model, pre[:planted].tolist(), suffix).clamp_min(1)
    words = lambda row: " ".join(f"t{int(t)}" for t in row)  # noqa: E731
    with out.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prefix": words(pre[i]), "suffix": " " + words(suf[i]), "member": i < n // 2}) + "\n")


def _peak() -> dict:
    import torch
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def stage(args) -> dict:
    """One stage in this (fresh) process: {seconds, peak memory, what it found}."""
    import torch
    folder, seqs = Path(args.folder), Path(args.seqs)
    rows = [json.loads(line) for line in seqs.read_text().splitlines()]
    ids = [([int(t[1:]) for t in r["prefix"].split()], [int(t[1:]) for t in r["suffix"].split()]) for r in rows]
    found: dict = {}
    if args.stage in ("scan", "generate", "forward"):
        from memloc.core.batching import rows_that_fit
        from memloc.core.precision import arithmetic, autocast, choose
        from memloc.tasks.lm.hf import load_hf
        from memloc.tasks.lm.membership import token_logprobs
        model = load_hf(folder).to(args.device).eval()  # memloc's wrapper, as the audit loads it
        device = torch.device(args.device)
        arith = choose(args.precision, device, model)
        found["arithmetic"] = arith.name
        if args.stage == "generate":
            ids = ids[:args.generate]
        found["batch"] = rows_that_fit(model, length=len(ids[0][0]) + len(ids[0][1]))
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        planted = min(args.planted, len(ids))
        if args.stage == "scan":
            with arithmetic(arith):
                stats = token_logprobs(model, [p + s for p, s in ids])
            hit = [bool(st["hit"][len(p) - 1:].all()) for st, (p, _) in zip(stats, ids)]
            found["extracted"], found["planted_extracted"] = sum(hit), sum(hit[:planted])
        elif args.stage == "forward":  # the model's bare forward over the scan's rows at the scan's batch: its ceiling
            with torch.no_grad(), arithmetic(arith):
                for lo in range(0, len(ids), found["batch"]):
                    rows = torch.tensor([p + q for p, q in ids[lo:lo + found["batch"]]], device=args.device)
                    model(rows[:, :-1])
        else:
            hits, hit_planted = 0, 0
            with torch.no_grad(), arithmetic(arith), autocast(device):
                for lo in range(0, len(ids), found["batch"]):
                    p = torch.tensor([q for q, _ in ids[lo:lo + found["batch"]]], device=args.device)
                    s = torch.tensor([q for _, q in ids[lo:lo + found["batch"]]], device=args.device)
                    g = model.hf.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                                       max_new_tokens=s.shape[1], min_new_tokens=s.shape[1], pad_token_id=0)
                    same = (g[:, p.shape[1]:] == s).all(1)
                    hits += int(same.sum())
                    hit_planted += int(same[:max(0, planted - lo)].sum())
            found["extracted"], found["planted_extracted"] = hits, hit_planted
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        found["sequences"] = len(ids)
    else:
        from memloc.cli import main
        t0 = time.perf_counter()
        argv = args.argv.split("\x1f")
        code = main(argv)
        seconds = time.perf_counter() - t0
        found["exit"] = code
        if argv[0] == "localize" and code == 0:  # the method's own time, apart from the before/after extraction
            summary = json.loads((Path(argv[1]) / "probes" / "localize" / "summary.json").read_text())
            found["scoring_seconds"] = summary.get("scoring_s")
    return {"stage": args.stage, "seconds": round(seconds, 2), **found, **_peak()}


def run_stage(name: str, args, folder: Path, seqs: Path, argv: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--folder", str(folder), "--seqs", str(seqs), "--device",
           args.device, "--generate", str(args.generate), "--precision", args.precision, "--planted",
           str(args.planted)]
    if argv is not None:
        cmd += ["--argv", "\x1f".join(argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MEMLOC_PROGRESS": "0"})
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    try:
        return json.loads(last)
    except ValueError:
        return {"stage": name, "failed": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sequences", type=int, default=1000)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--suffix", type=int, default=48)
    ap.add_argument("--planted", type=int, default=16)
    ap.add_argument("--generate", type=int, default=128, help="sequences `generate` decodes (0: not timed)")
    ap.add_argument("--methods", default="attribution,ig,hard-concrete,balanced-subnet")
    ap.add_argument("--steps", type=int, default=None, help="the learned methods' steps and ig's (default: theirs: "
                    "slimming and hard-concrete 1000, balanced-subnet 200, ig 20 per layer)")
    ap.add_argument("--stages", default="forward,scan,generate,audit,localize")
    ap.add_argument("--by-extraction", action="store_true", help="localize the sequences the model extracts (found "
                    "by a pass over every row, as the audit's removal does) instead of --indices of the planted ones")
    ap.add_argument("--recompute", default=None, help="localize each method once per setting of this comma-separated "
                    "list of `--recompute` values (e.g. off,on: the memory gradient checkpointing saves)")
    ap.add_argument("--batch-size", type=int, default=None, help="localize's --batch-size (default: its choice)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="the audit's --precision "
                    "(auto: bf16 on a GPU and on a native-bf16 CPU for models at least 512 wide)")
    ap.add_argument("--out", default=None)
    # one stage, in a fresh process (internal)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--seqs", help=argparse.SUPPRESS)
    ap.add_argument("--argv", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(stage(args)))
        return
    out = Path(args.out or Path("runs") / "lm-scale" / f"{args.model}-{args.device}")
    out.mkdir(parents=True, exist_ok=True)
    folder, seqs = out / "model", out / "sequences.jsonl"
    import torch
    import transformers
    params = build(args.model, folder)
    sequences(folder, seqs, n=args.sequences, prefix=args.prefix, suffix=args.suffix, planted=args.planted,
              device=args.device)
    result = {"model": args.model, "parameters": params, "model_bytes_fp32": 4 * params, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
              "config": {k: v for k, v in vars(args).items() if k not in ("stage", "folder", "seqs", "argv")},
              "date": time.strftime("%Y-%m-%d"), "stages": []}
    stages = args.stages.split(",")

    def record(r: dict) -> None:
        result["stages"].append(r)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        mem = f"{r.get('peak_rss_bytes', 0) / 2**30:.2f} GiB RSS" + (
            f", {r['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if "peak_gpu_bytes" in r else "")
        found = {k: v for k, v in r.items() if k in ("arithmetic", "batch", "extracted", "planted_extracted",
                                                      "sequences", "exit", "failed", "scoring_seconds")}
        print(f"{r['stage']}: {r.get('seconds', '-')} s, {mem}  {found}", flush=True)
    for name in ("forward", "scan", "generate"):
        if name in stages and (name != "generate" or args.generate):
            record(run_stage(name, args, folder, seqs))
    done = {r["stage"]: r for r in result["stages"] if "seconds" in r}
    if "forward" in done and "scan" in done:
        result["scan_share_of_bare_forward"] = round(done["forward"]["seconds"] / done["scan"]["seconds"], 3)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"the scan runs at {100 * result['scan_share_of_bare_forward']:.0f}% of a bare forward's tokens per "
              "second", flush=True)
    run = out / "audit"
    if "audit" in stages or "localize" in stages:
        record(run_stage("audit", args, folder, seqs, ["audit", f"hf:{folder}", "--sequences", str(seqs), "--out",
                                                       str(run), "--overwrite", "--no-remove", "--quiet",
                                                       "--device", args.device, "--precision", args.precision]))
    if "localize" in stages:
        (out / "planted.txt").write_text("".join(f"{i}\n" for i in range(args.planted)))
        for method in args.methods.split(","):
            chosen = [] if args.by_extraction else ["--indices", str(out / "planted.txt")]
            argv = ["localize", str(run), "--method", method, *chosen, "--quiet", "--device", args.device]
            if args.steps and method in ("slimming", "hard-concrete", "balanced-subnet"):
                argv += ["--steps", str(args.steps)]
            elif args.steps and method == "ig":
                argv += ["--ig-steps", str(args.steps)]
            if args.batch_size:
                argv += ["--batch-size", str(args.batch_size)]
            for setting in args.recompute.split(",") if args.recompute else [None]:
                extra, tag = ([], "") if setting is None else (["--recompute", setting], f":recompute-{setting}")
                record(run_stage(f"localize:{method}{tag}", args, folder, seqs, argv + extra))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
