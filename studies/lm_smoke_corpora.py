"""The language-model smoke preset on corpora that are not the built-in Bible: does it memorize canaries?

    python studies/lm_smoke_corpora.py --out runs/lm-smoke-corpora [--corpora english,code,german]

Writes each corpus (seeded, generated here: nothing is downloaded) as a folder of .txt files under OUT/corpora/,
trains `memloc train --task lm --preset smoke --corpus FOLDER` on it, and prints the share of the trained canary
sequences the model extracts in their training context, by repeat count (what `memloc localize`, `memloc flip` and
`memloc bench-localize --benchmark del` work on). `write_corpus` is also what the tests write their corpus with.

- english: English words from a word list (faker's en_US lorem), in sentences and paragraphs;
- german: the same from faker's de_DE word list (a different language; umlauts are two bytes each);
- code: Python-like source, generated from templates with random identifiers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

KINDS = ("english", "german", "code")


def _prose(locale: str, rng: np.random.Generator, chars: int) -> str:
    from faker import Faker
    fake = Faker(locale)
    fake.seed_instance(int(rng.integers(2**31)))
    out, size = [], 0
    while size < chars:
        para = fake.paragraph(nb_sentences=int(rng.integers(3, 9)))
        out.append(para)
        size += len(para) + 1
    return "\n".join(out)


_VERBS = ("load", "save", "read", "write", "parse", "build", "check", "merge", "split", "count", "find", "sort",
          "open", "close", "update", "render", "fetch", "apply")
_NOUNS = ("config", "path", "items", "rows", "name", "value", "index", "table", "record", "token", "model", "batch",
          "cache", "result", "header", "block", "field", "layer", "state", "offset")


def _code(rng: np.random.Generator, chars: int) -> str:
    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))]

    def ident() -> str:
        return f"{pick(_NOUNS)}_{pick(_NOUNS)}" if rng.random() < 0.4 else pick(_NOUNS)

    out, size = [], 0
    while size < chars:
        fn, a, b, c = f"{pick(_VERBS)}_{pick(_NOUNS)}", ident(), ident(), ident()
        n = int(rng.integers(1, 100))
        body = [f"def {fn}({a}, {b}={n}):",
                f'    """{pick(_VERBS).capitalize()} the {pick(_NOUNS)} of {a}."""',
                f"    {c} = []"]
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.random()
            if kind < 0.4:
                body += [f"    for {pick(_NOUNS)} in {a}.{pick(_NOUNS)}:",
                         f"        if {pick(_NOUNS)} > {b}:",
                         f"            {c}.append({pick(_VERBS)}({pick(_NOUNS)}, {int(rng.integers(10))}))"]
            elif kind < 0.7:
                body += [f"    if {a} is None:", f"        raise ValueError(\"no {pick(_NOUNS)} given\")"]
            else:
                body += [f"    {c} = {pick(_VERBS)}_{pick(_NOUNS)}({c}, {b} + {int(rng.integers(1, 10))})"]
        body += [f"    return {c}", ""]
        text = "\n".join(body) + "\n"
        out.append(text)
        size += len(text)
    return "".join(out)


def write_corpus(folder: str | Path, kind: str = "english", *, files: int = 8, chars: int = 40_000,
                 seed: int = 0) -> Path:
    """A seeded corpus of `kind` (english, german, code) as `files` .txt files of about `chars` characters each in
    `folder` (created); returns the folder."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}: choose from {', '.join(KINDS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    for i in range(files):
        text = _code(rng, chars) if kind == "code" else _prose("en_US" if kind == "english" else "de_DE", rng, chars)
        (folder / f"{kind}_{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def extraction_by_repeats(run: Path) -> dict[int, float]:
    """The share of a run's trained canary sequences extracted in their training context, by repeat count."""
    import memloc
    loaded = memloc.open_run(run, device="cpu")
    hit = memloc.task_of(loaded.data).hits(loaded.model()).cpu().numpy()  # (N,) extracted in context
    repeats = loaded.data.repeats.numpy()
    return {int(r): float(hit[repeats == r].mean()) for r in np.unique(repeats) if r > 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/lm-smoke-corpora")
    p.add_argument("--corpora", default="english,code", help="comma-separated kinds: english, german, code")
    p.add_argument("--files", type=int, default=25, help="files per corpus")
    p.add_argument("--chars", type=int, default=40_000, help="characters per file")
    p.add_argument("--flags", default="", help="more `memloc train` flags, e.g. '--tokenizer bpe --model hf-gpt2'")
    args = p.parse_args(argv)
    from memloc.cli import main as memloc
    out = Path(args.out)
    rows = []
    for kind in args.corpora.split(","):
        corpus = write_corpus(out / "corpora" / kind, kind, files=args.files, chars=args.chars)
        run = out / f"{kind}{'-' + '_'.join(args.flags.replace('--', '').split()) if args.flags else ''}"
        started = time.perf_counter()
        code = memloc(["train", "--task", "lm", "--preset", "smoke", "--corpus", str(corpus), "--out", str(run),
                       "--overwrite", "--quiet", *args.flags.split()])
        if code:
            return code
        seconds = time.perf_counter() - started
        by_repeats = extraction_by_repeats(run)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append((kind, last["canary_train_acc"], by_repeats, seconds))
        print(f"{kind}: canary sequences extracted in context {100 * last['canary_train_acc']:.1f}% "
              f"(by repeats: {', '.join(f'{r}: {100 * v:.0f}%' for r, v in by_repeats.items())}), "
              f"held-out token accuracy {100 * last['test_acc']:.1f}%, {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
