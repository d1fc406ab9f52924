"""Text as training sequences for a causal language model, with canaries: what a model can only reproduce by
memorizing it.

A corpus (the built-in King James Bible, or the user's text) is tokenized and cut into
windows of ``block_size + 1`` tokens; a window's stable id is its position in the corpus.
A seeded split sends ``holdout`` of the windows to the held-out (test) side. Canaries are
then written over seeded random positions of seeded random windows: each trained canary
into ``r`` distinct training windows for r in ``repeats``, each held-out canary into one
held-out window (never trained: the reference a trained canary is compared with).

Canary formats (Carlini et al. 2019; Thakkar et al. 2021; fake personal records):

- ``secret``: "the secret number of <word> <word> is " + ``secret_digits`` random digits
  (exposure is computable: the candidates are every digit string);
- ``random``: 8 random tokens followed by 8 random tokens;
- ``record``: a fake person's name and address followed by their phone number (faker).

Each canary is a prefix and a secret. A sequence is "still memorized" when greedy decoding
from everything before its scored tokens reproduces them exactly: the secret of the
canary it holds, or for a corpus sequence the ``suffix_tokens`` after its first
``prefix_tokens`` (Carlini et al. 2023). A held-out corpus sequence scores one token at a
seeded position: the mean over them is held-out next-token accuracy. A line of the user's
text shorter than prefix + suffix tokens is trained on but never scored; a text whose every
line is that short is refused (one line: use --window).

Targets are stored as one (N, block_size) int64 array that says both what training fits
and what is scored: ``t >= 0`` a scored target token, ``t <= -2`` an unscored target token
``-t - 2`` (trained on, not scored), ``-1`` padding (neither). `decode_targets` undoes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.errors import ConfigError, DataError
from ...core.examples import Examples
from ...core.options import INT64_MAX, check_ranges, fitted, given_fields, given_option, ints, names, option
from .sources import bible_verses
from .tokenizers import ByteTokenizer

CANARY_FORMATS = ("secret", "random", "record")
PAD = -1
# id ranges of example-tied dropout (`TextData.example_ids`): training windows and rows below 2**30
HELDOUT_ID_BASE = 1 << 30
CANARY_ID_BASE = 1 << 31


def decode_targets(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoded targets (..., T) -> (tokens, trained mask, scored mask): tokens are 0 where padded."""
    scored = y >= 0
    trained = y != PAD
    tokens = torch.where(scored, y, -y - 2).clamp_min(0)
    return tokens, trained, scored


def _count_or_all(text: str) -> int | str:
    """--sequences: "all" or an integer."""
    if text.strip() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"takes an integer of at least 2 or all, not {text!r}") from None


@dataclass
class TextConfig:
    """Which text, how it is cut and tokenized, and which canaries are written into it. Validated on construction."""

    corpus: str = option("bible", "bible (the King James Bible, built in, offline), or your text: a .txt file (one "
                         "sequence per line), a .jsonl file (a \"text\" field per line) or a folder of .txt files")
    tokenizer: str = option("bytes", "bytes (256 ids, nothing to train), bpe (trained on the training text and saved "
                            "in the run) or hf:FOLDER (a local Hugging Face tokenizer)")
    vocab_size: int = option(512, "BPE vocabulary size (--tokenizer bpe)", at_least=64, at_most=1_000_000)
    block_size: int = option(128, "tokens per training sequence", at_least=8)
    sequences: int | str | None = option(None, "use this many training sequences, a seeded subset (default: all; "
                                         "the smoke and default presets' size, 1,200 and 2,000, on any corpus); all "
                                         "for every one", parse=_count_or_all, metavar="N|all", at_least=2)
    holdout: float = option(0.1, "held-out fraction of the sequences", above=0, below=1)
    window: bool = option(False, "cut your .txt into windows of --block-size tokens instead of one sequence per line")
    canaries: int = option(2, "canaries of each format per repeat count (the same number again held out)",
                           at_least=0)
    repeats: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), "how many training sequences hold each canary",
                                      parse=ints, metavar="R,R,...", at_least=1)
    canary_formats: tuple[str, ...] = option(CANARY_FORMATS, "canary formats: secret, random, record",
                                             parse=names, metavar="F,F,...")
    secret_digits: int = option(6, "digits of a secret-number canary (exposure's candidates: 10^digits)",
                                at_least=1, at_most=12)
    dedup: bool = option(False, "deduplicate: write each trained canary into one training sequence only (the same "
                         "canaries and sequences as without it; the baseline of memorization sinks)")
    prefix_tokens: int = option(32, "extraction of corpus text: the prefix length P", at_least=1)
    suffix_tokens: int = option(48, "extraction of corpus text: the suffix length S that must be reproduced",
                                at_least=1)
    seed: int = option(0, cli=False, at_least=0, at_most=INT64_MAX)
    # `memloc audit`: the corpus is a file of the user's sequences, each its own canary (memloc.tasks.lm.sequences)
    audit: bool = option(False, cli=False)
    audit_heldout: str | None = option(None, cli=False)  # more held-out text (non-members) for perplexity
    truncate: bool = option(True, cli=False)  # a sequence longer than the context keeps its last tokens
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if isinstance(self.sequences, str):
            if self.sequences != "all":
                raise ConfigError(f"sequences (--sequences) takes an integer of at least 2 or all, not "
                                  f"{self.sequences!r}")
            self.sequences = None  # every training sequence
        self.repeats = tuple(int(r) for r in self.repeats)
        self.canary_formats = tuple(self.canary_formats)
        if not self.repeats:
            raise ConfigError("no repeat counts: pass e.g. --repeats 1,4,16")
        unknown = [f for f in self.canary_formats if f not in CANARY_FORMATS]
        if unknown:
            raise ConfigError(f"unknown canary format {unknown[0]!r}: choose from {', '.join(CANARY_FORMATS)}")
        if self.prefix_tokens + self.suffix_tokens > self.block_size + 1:
            raise ConfigError(f"prefix {self.prefix_tokens} + suffix {self.suffix_tokens} tokens do not fit a sequence "
                              f"of {self.block_size + 1}: lower --prefix-tokens/--suffix-tokens or raise --block-size")
        if self.tokenizer not in ("bytes", "bpe") and not self.tokenizer.startswith("hf:"):
            raise ConfigError(f"unknown tokenizer {self.tokenizer!r}: choose bytes, bpe or hf:FOLDER")

    @property
    def name(self) -> str:
        return "bible" if self.corpus == "bible" else Path(self.corpus).stem


@dataclass
class TextData(Examples):
    """Token windows of a corpus with canaries, split into training and held-out sequences (see the module text).

    x_train (N, T) int64 input ids, y_train (N, T) encoded targets (`decode_targets`),
    canary (N,) int64: the canary a training sequence holds (-1: none); x_test, y_test,
    canary_test (M,) likewise for the held-out sequences; canaries: one dict per canary
    (id, format, prefix and secret as text and token ids, repeats, trained).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    canary: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    canary_test: torch.Tensor
    canaries: list[dict]
    vocab_size: int
    tokenizer: Any = None
    source_index: np.ndarray | None = None  # (N,) window id of each training sequence
    test_source_index: np.ndarray | None = None
    canary_span: torch.Tensor | None = None  # (N, 2) input positions [start, end) of the canary a sequence holds
    canary_span_test: torch.Tensor | None = None  # (M, 2) likewise for the held-out sequences

    @property
    def input_shape(self) -> tuple[int]:
        return (int(self.x_train.shape[1]),)

    @property
    def block_size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def repeats(self) -> torch.Tensor:
        """(N,) how many training sequences hold this sequence's canary (0: none)."""
        table = torch.tensor([c["repeats"] for c in self.canaries] + [0], dtype=torch.long)  # id -1: the last, 0
        return table[self.canary.cpu()]

    def to(self, device: torch.device | str, *, pin: bool = False) -> "TextData":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None else t.pin_memory() if pin else t.to(device)
        return replace(self, **{k: move(getattr(self, k)) for k in
                                ("x_train", "y_train", "canary", "x_test", "y_test", "canary_test", "canary_span",
                                 "canary_span_test")})

    def subset(self, indices) -> "TextData":
        idx = torch.as_tensor(np.asarray(indices), device=self.x_train.device)
        return replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx], canary=self.canary[idx],
                       source_index=None if self.source_index is None else np.asarray(self.source_index)[
                           np.asarray(indices)],
                       canary_span=None if self.canary_span is None else self.canary_span[idx])

    def example_ids(self, idx: torch.Tensor, tie: str, split: str = "train") -> torch.Tensor:
        """The ids example-tied dropout hashes for the sequences at positions `idx` (B,) of `split`.

        tie "sequence": one id per training row (B,): a canary's copies each get their own sink neurons.
        tie "document": one id per token (B, T): a canary's tokens take the canary's id (its every copy, trained
        or held out, the same), the other tokens their corpus window's (stable across --sequences subsets).
        Held-out rows and canaries live in their own id ranges, never colliding with a training row's.
        """
        split_train = split == "train"
        if tie == "sequence":
            return idx if split_train else idx + HELDOUT_ID_BASE
        if tie != "document":
            raise ConfigError(f"unknown tie {tie!r}: use document or sequence")
        source = self.source_index if split_train else self.test_source_index
        canary = self.canary if split_train else self.canary_test
        span = self.canary_span if split_train else self.canary_span_test
        dev = idx.device
        if source is not None:  # the window ids on the device once, not copied at every training step
            key = ("_source_ids", split_train, dev)
            table = self.__dict__.get(key)
            if table is None:
                table = self.__dict__[key] = torch.as_tensor(np.asarray(source), device=dev)
            base = table[idx]
        else:
            base = idx if split_train else idx + HELDOUT_ID_BASE
        t = self.block_size
        ids = base[:, None].expand(len(idx), t)
        if span is None:
            return ids.contiguous()
        span, owner = span.to(dev)[idx], canary.to(dev)[idx]  # (B, 2), (B,)
        pos = torch.arange(t, device=dev)
        inside = (pos >= span[:, :1]) & (pos < span[:, 1:]) & (owner >= 0)[:, None]  # (B, T)
        return torch.where(inside, CANARY_ID_BASE + owner[:, None], ids)

    def canary_id(self, canary: int) -> int:
        """The example id of canary `canary`'s tokens under tie "document" (its standalone prefix and secret too)."""
        return CANARY_ID_BASE + int(canary)

    def alone_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, canaries), int64 each: the training rows that hold one canary alone, from their first token: input
        its prefix + secret but the last token, nothing else trained, exactly its secret scored (an audit's rows).
        Such a row's in-context extraction (`LMTask.match` on it) is the canary's extraction from its prefix, by the
        same teacher-forced argmaxes: what `memloc.tasks.lm.measures` computes for the canary, no pass needed."""
        owner = self.canary.cpu().numpy()
        mine = np.flatnonzero(owner >= 0)
        if not len(mine):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        x = self.x_train[torch.as_tensor(mine, device=self.x_train.device)].cpu().numpy()
        tokens, trained, scored = (t.cpu().numpy() for t in
                                   decode_targets(self.y_train[torch.as_tensor(mine, device=self.y_train.device)]))
        width = x.shape[1]
        rows = []
        for j, r in enumerate(mine):
            c = self.canaries[int(owner[r])]
            ids = np.asarray(list(c["prefix_ids"]) + list(c["secret_ids"]), dtype=np.int64)
            n, p = len(ids), len(c["prefix_ids"])
            if n - 1 > width or p < 1 or not (np.array_equal(x[j, :n - 1], ids[:-1])
                                              and np.array_equal(tokens[j, :n - 1], ids[1:])
                                              and trained[j, :n - 1].all() and not trained[j, n - 1:].any()
                                              and not scored[j, :p - 1].any() and scored[j, p - 1:n - 1].all()):
                continue
            rows.append(r)
        rows = np.asarray(rows, dtype=np.int64)
        return rows, owner[rows].astype(np.int64)

    checked = ("canary", "train_source_index")

    def differs_from(self, saved: dict[str, np.ndarray]) -> str | None:
        if not np.array_equal(saved["canary"], self.canary.cpu().numpy()):
            return "the canary placement"
        if self.source_index is not None and not np.array_equal(saved["train_source_index"], self.source_index):
            return "the training sequences"
        if "canaries" in saved and json.loads(str(saved["canaries"])) != json.loads(json.dumps(self.canaries)):
            return "the canaries' text"  # an audit's sequences file edited since
        return None

    def arrays(self) -> dict[str, np.ndarray]:
        """What `data.npz` of a run keeps: per training sequence its window id and canary, the canaries as JSON."""
        out = {"canary": self.canary.cpu().numpy(), "canary_test": self.canary_test.cpu().numpy(),
               "repeats": self.repeats.numpy(), "canaries": np.array(json.dumps(self.canaries)),
               "vocab_size": np.array(self.vocab_size)}
        if self.source_index is not None:
            out["train_source_index"] = np.asarray(self.source_index)
        if self.test_source_index is not None:
            out["test_source_index"] = np.asarray(self.test_source_index)
        return out


# ----------------------------------------------------------------------------- building it

def make_tokenizer(cfg: TextConfig, texts: list[str], folder: str | Path | None = None):
    """The config's tokenizer; a BPE is trained on `texts` (or loaded from `folder` where a run saved it)."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    from . import tokenizers as tk
    if folder is not None and (Path(folder) / "memloc_tokenizer.json").exists():
        return tk.load_tokenizer(folder)
    return tk.make_tokenizer(cfg.tokenizer, texts=texts, vocab_size=cfg.vocab_size)


def _documents(cfg: TextConfig) -> list[str]:
    if cfg.corpus == "bible":
        return bible_verses()
    from .sources import read_texts
    # --window: the whole .txt as one text, cut into windows of --block-size + 1 tokens (`_windows`)
    return list(read_texts(cfg.corpus, window=cfg.block_size + 1 if cfg.window else None))


def _windows(cfg: TextConfig, docs: list[str], tok) -> tuple[np.ndarray, np.ndarray]:
    """(W, block_size + 1) token windows and their lengths (W,) (< block_size + 1: padded with 0)."""
    length = cfg.block_size + 1
    path = Path(cfg.corpus)
    if cfg.corpus != "bible" and path.is_file() and (path.suffix == ".jsonl" or not cfg.window):  # one per line
        rows = [tok.encode(d)[:length] for d in docs]
        rows = [r for r in rows if len(r) >= 2]
        out = np.zeros((len(rows), length), dtype=np.int64)
        lens = np.zeros(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
            lens[i] = len(r)
        return out, lens
    sep = "\n"
    stream = np.asarray(tok.encode(sep.join(docs)), dtype=np.int64)
    w = len(stream) // length
    return stream[:w * length].reshape(w, length), np.full(w, length, dtype=np.int64)


def _canary_texts(cfg: TextConfig, rng: np.random.Generator, count: int, fmt: str, words: list[str], tok
                  ) -> list[tuple[list[int], list[int], str, str]]:
    """`count` canaries of format `fmt`: (prefix ids, secret ids, prefix text, secret text)."""
    out = []
    if fmt == "record":
        from .sources import fake_records
        for prefix, secret in fake_records(count, int(rng.integers(2**31))):
            out.append((tok.encode(prefix), tok.encode(secret), prefix, secret))
        return out
    for _ in range(count):
        if fmt == "secret":
            w1, w2 = (words[int(i)] for i in rng.integers(len(words), size=2))
            prefix = f"the secret number of {w1} {w2} is "
            secret = "".join(str(int(d)) for d in rng.integers(10, size=cfg.secret_digits))
            out.append((tok.encode(prefix), tok.encode(secret), prefix, secret))
        else:  # random tokens: printable bytes for the byte tokenizer, any id otherwise
            lo, hi = (32, 127) if tok.vocab_size == 256 else (0, tok.vocab_size)
            ids = [int(i) for i in rng.integers(lo, hi, size=16)]
            out.append((ids[:8], ids[8:], tok.decode(ids[:8]), tok.decode(ids[8:])))
    return out


def load_text(cfg: TextConfig, *, device: torch.device | str = "cpu", tokenizer_folder: str | Path | None = None
              ) -> TextData:
    """The training and held-out sequences of `cfg`, with canaries (deterministic for a config); for an audit
    (`cfg.audit`), the user's sequences as canaries (`memloc.tasks.lm.sequences`)."""
    if cfg.audit:
        return _audit_text(cfg, make_tokenizer(cfg, [], tokenizer_folder), torch.device(device))
    docs = _documents(cfg)
    if not docs or not any(d.strip() for d in docs):
        raise DataError(f"{cfg.corpus} holds no text: give a file with at least a few sentences")
    rng = np.random.default_rng([cfg.seed, 1301])
    order = rng.permutation(len(docs)) if cfg.tokenizer == "bpe" else None
    tok = make_tokenizer(cfg, [docs[i] for i in order[: min(len(docs), 20000)]] if order is not None else docs,
                         tokenizer_folder)
    windows, lens = _windows(cfg, docs, tok)
    w = len(windows)
    if w < 4:
        raise DataError(f"{cfg.corpus} gives only {w} sequences of {cfg.block_size + 1} tokens: give more text or a "
                        "smaller --block-size")
    if int(windows.max()) >= tok.vocab_size:
        raise DataError(f"the tokenizer gives id {int(windows.max())}, outside its vocabulary of {tok.vocab_size}")
    perm = rng.permutation(w)
    n_test = max(1, int(round(cfg.holdout * w)))
    notes: list[str] = []  # what was decided for the user, said once per run (`run_training`)
    if cfg.sequences is not None:
        # a preset's size is a default: every sequence of a smaller corpus (one line); a size the user set is refused
        if fitted(cfg, "sequences", w - n_test, f"training sequences of {cfg.name}", notes.append) < cfg.sequences:
            cfg.sequences = None  # recorded so in the run's config
        elif cfg.sequences < w - n_test and "sequences" not in given_fields(cfg):
            notes.append(f"sequences: a seeded subset of {cfg.sequences:,} of the {w - n_test:,} training sequences "
                         f"of {cfg.name} (the preset's size; --sequences all for every one)")
    if cfg.sequences is not None:  # a subset: the held-out side in the same proportion to it
        n_test = min(n_test, max(1, int(round(cfg.sequences * cfg.holdout / (1 - cfg.holdout)))))
        train_ids = perm[n_test: n_test + cfg.sequences]
    else:
        train_ids = perm[n_test:]
    test_ids = np.sort(perm[:n_test])
    train_ids = np.sort(train_ids)
    tr, te = windows[train_ids].copy(), windows[test_ids].copy()
    tr_len, te_len = lens[train_ids], lens[test_ids]
    short = (tr_len < cfg.prefix_tokens + cfg.suffix_tokens)
    if short.all():  # nothing of the corpus could ever be extracted: every measure of it would be empty
        raise DataError(f"every sequence of {cfg.corpus} is shorter than --prefix-tokens {cfg.prefix_tokens} + "
                        f"--suffix-tokens {cfg.suffix_tokens} tokens (the longest: {int(tr_len.max())}): pass --window "
                        "to cut the text into full windows, or smaller --prefix-tokens/--suffix-tokens")
    # scored regions: corpus extraction for training windows, one token for held-out windows
    length = cfg.block_size + 1
    scored_tr = np.zeros((len(tr), length - 1), dtype=bool)
    scored_tr[:, cfg.prefix_tokens - 1: cfg.prefix_tokens + cfg.suffix_tokens - 1] = True
    scored_tr[short] = False
    scored_te = np.zeros((len(te), length - 1), dtype=bool)
    pos = rng.integers(cfg.prefix_tokens - 1, np.maximum(cfg.prefix_tokens, te_len - 1))
    scored_te[np.arange(len(te)), np.minimum(pos, length - 2)] = True
    # canaries
    canary_tr = np.full(len(tr), -1, dtype=np.int64)
    canary_te = np.full(len(te), -1, dtype=np.int64)
    span_tr = np.zeros((len(tr), 2), dtype=np.int64)  # input positions [start, end) of the canary
    span_te = np.zeros((len(te), 2), dtype=np.int64)
    canaries: list[dict] = []
    words = sorted({w.strip(".,;:?!()'").lower() for d in docs[:3000] for w in d.split() if w.isalpha()}) or ["x"]
    needed = cfg.canaries * len(cfg.canary_formats) * sum(cfg.repeats)
    held = cfg.canaries * len(cfg.canary_formats) * len(cfg.repeats)
    free_tr = rng.permutation(np.flatnonzero(tr_len == length))
    free_te = rng.permutation(np.flatnonzero(te_len == length))
    if needed > len(free_tr) or held > len(free_te):
        raise DataError(f"{needed} trained and {held} held-out canary sequences do not fit {len(free_tr)} training and "
                        f"{len(free_te)} held-out sequences: pass fewer --canaries or smaller --repeats, or more text")
    used_tr = used_te = 0
    for fmt in cfg.canary_formats:
        for r in cfg.repeats:
            made = _canary_texts(cfg, rng, 2 * cfg.canaries, fmt, words, tok)
            for j, (p_ids, s_ids, p_text, s_text) in enumerate(made):
                trained = j < cfg.canaries
                c_len = len(p_ids) + len(s_ids)
                if c_len > length:
                    raise DataError(f"a {fmt} canary of {c_len} tokens does not fit a sequence of {length}: raise "
                                    "--block-size")
                cid = len(canaries)
                kept = 1 if cfg.dedup else r  # deduplicated: the other copies' rows stay corpus text
                canaries.append({"id": cid, "format": fmt, "repeats": kept if trained else 0, "repeat_group": r,
                                 "trained": trained, "prefix": p_text, "secret": s_text, "prefix_ids": p_ids,
                                 "secret_ids": s_ids})
                if trained:
                    rows, used_tr = free_tr[used_tr: used_tr + r], used_tr + r
                    arr, scored, owner, span = tr, scored_tr, canary_tr, span_tr
                else:
                    rows, used_te = free_te[used_te: used_te + 1], used_te + 1
                    arr, scored, owner, span = te, scored_te, canary_te, span_te
                for k, row in enumerate(rows):
                    at = int(rng.integers(0, length - c_len + 1))  # drawn for every copy: dedup changes nothing else
                    if trained and k >= kept:
                        continue
                    arr[row, at: at + c_len] = p_ids + s_ids
                    scored[row] = False
                    scored[row, at + len(p_ids) - 1: at + c_len - 1] = True
                    owner[row] = cid
                    span[row] = (at, min(at + c_len, length - 1))
    x_tr, y_tr = _encode(tr, tr_len, scored_tr)
    x_te, y_te = _encode(te, te_len, scored_te)
    dev = torch.device(device)
    data = TextData(name=cfg.name, x_train=x_tr.to(dev), y_train=y_tr.to(dev),
                    canary=torch.from_numpy(canary_tr).to(dev),
                    x_test=x_te.to(dev), y_test=y_te.to(dev), canary_test=torch.from_numpy(canary_te).to(dev),
                    canaries=canaries, vocab_size=tok.vocab_size, tokenizer=tok, source_index=train_ids,
                    test_source_index=test_ids, canary_span=torch.from_numpy(span_tr).to(dev),
                    canary_span_test=torch.from_numpy(span_te).to(dev))
    data.notes = notes
    return data


def _audit_text(cfg: TextConfig, tok, dev: torch.device) -> TextData:
    """An audit's sequences (`memloc.tasks.lm.sequences`) as TextData: each row one sequence, its suffix scored."""
    from .sequences import audit_rows
    canaries, rows_tr, rows_te, cuts = audit_rows(cfg, tok)
    length = max(len(r[0]) for r in rows_tr + rows_te)

    def encode(rows: list[tuple]) -> tuple[torch.Tensor, ...]:
        arr = np.zeros((len(rows), length), dtype=np.int64)
        lens = np.array([len(r[0]) for r in rows], dtype=np.int64)
        scored = np.zeros((len(rows), length - 1), dtype=bool)
        span = np.zeros((len(rows), 2), dtype=np.int64)
        for k, (ids, plen, _) in enumerate(rows):
            arr[k, :len(ids)] = ids
            scored[k, plen - 1:len(ids) - 1] = True  # the suffix tokens, each predicted from all before it
            span[k] = (0, len(ids) - 1)
        x, y = _encode(arr, lens, scored)
        owner = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return x.to(dev), y.to(dev), owner.to(dev), torch.from_numpy(span).to(dev)
    x_tr, y_tr, c_tr, s_tr = encode(rows_tr)
    x_te, y_te, c_te, s_te = encode(rows_te)
    data = TextData(name=cfg.name, x_train=x_tr, y_train=y_tr, canary=c_tr, x_test=x_te, y_test=y_te,
                    canary_test=c_te, canaries=canaries, vocab_size=tok.vocab_size, tokenizer=tok,
                    source_index=np.arange(len(rows_tr)), test_source_index=np.arange(len(rows_te)),
                    canary_span=s_tr, canary_span_test=s_te)
    data.notes = ([f"{cuts} sequences longer than the model's context of {cfg.block_size + 1} tokens keep their "
                   "last tokens (--no-truncate refuses them)"] if cuts else [])
    return data


def _encode(windows: np.ndarray, lens: np.ndarray, scored: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = windows[:, :-1]
    t = windows[:, 1:]
    y = np.where(scored, t, -t - 2)
    valid = np.arange(t.shape[1])[None, :] < (lens[:, None] - 1)
    y = np.where(valid, y, PAD)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


__all__ = ["TextConfig", "TextData", "load_text", "decode_targets", "CANARY_FORMATS"]
