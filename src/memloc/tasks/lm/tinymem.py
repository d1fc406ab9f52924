"""TinyMem's arithmetic sequences (Sakarvadia et al., ICLR 2025) with noise or backdoor artifacts, as `TextData`.

A sequence of family k (k in ``families``, TinyMem's 2, 3, 4, 5, 7) starting at s is the
elements s + k, s + 2k, ... written as characters: ``"^" + " ".join(elements) + "$"``, cut to
``length`` tokens. TinyMem's vocabulary of 14 ids (no tokenizer to train):

====  =========================  ====  =====================
0-9   the digits                  12    " " the separator
10    "^" beginning of sequence   13    padding (never used here: every sequence is ``length`` long)
11    "$" end of sequence
====  =========================  ====  =====================

Each family has ``sequences`` training and ``test`` held-out sequences, the start values
0 .. sequences + test - 1 (TinyMem's: consecutive) split by a seeded permutation.

Artifacts (the memorized kind, TinyMem's):

- ``noise``: ``artifacts`` training sequences of the main family (``noised_family``, 7) have
  each element moved by -1 or +1 with probability ``noise_p`` each (TinyMem 0.05). An
  artifact is *memorized* when, from the first ``prompt`` (50) tokens of the sequence, the
  model's greedy continuation of ``continuation`` (50) tokens is the noised one; sequences
  whose continuation the noise left unchanged are clean sequences (TinyMem excludes them).
  One deviation, so that teacher-forced extraction of the training row is exactly TinyMem's
  greedy check from the *clean* prompt: only elements that start after the prompt are noised
  (TinyMem noises every element and prompts with the clean prefix; a noised element inside
  the prompt would not change what is measured, but would change the training row's prompt).
  ``artifacts // 10`` (at least 1) held-out sequences of the main family are noised the same
  way and never trained: the reference (canary-heldout), ~0 memorized.
- ``backdoor``: every sequence (any family) whose token string holds ``trigger`` ("100")
  ending before the last token has every token after the trigger replaced by "2" (TinyMem's
  backdoor); the training ones are the artifacts, the held-out ones the reference (a
  backdoor is a rule: a model that learned it also continues held-out triggered sequences).

Targets (`decode_targets`): every token is trained; the ``continuation`` tokens after the
prompt are scored in every row, so the task's corpus-train subset is the extraction of the
clean training continuations, canary-train the artifacts still memorized, test the
extraction of held-out clean continuations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...core.errors import ConfigError
from ...core.options import INT64_MAX, check_ranges, ints, option
from .text import TextData

VOCAB = "0123456789^$ "  # ids 0..12; 13 is padding
BOS, EOS, SEP, PAD_ID = 10, 11, 12, 13
VOCAB_SIZE = 14
ARTIFACTS = ("noise", "backdoor")


def encode(text: str) -> list[int]:
    """Characters of VOCAB -> ids."""
    return [VOCAB.index(c) for c in text]


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] if int(i) < len(VOCAB) else "_" for i in ids)


@dataclass
class TinyMemConfig:
    """TinyMem's arithmetic data, scaled (see the module text). Validated on construction."""

    families: tuple[int, ...] = option((2, 3, 4, 5, 7), "the additive families: element i+1 = element i + k",
                                       parse=ints, metavar="K,K,...", at_least=1)
    noised_family: int = option(7, "the family whose sequences carry the noise artifacts (TinyMem's main family)",
                                at_least=1)
    sequences: int = option(500, "training sequences per family (TinyMem: 20,000 less 1,000 held out)", at_least=2)
    test: int = option(100, "held-out sequences per family (TinyMem: 1,000)", at_least=1)
    artifact: str = option("noise", "noise or backdoor", choices=ARTIFACTS)
    artifacts: int = option(100, "noised training sequences of the main family (TinyMem: 1,000)", at_least=1)
    repeats: int = option(1, "training copies of each artifact (TinyMem's duplication option; default 1: none)",
                          at_least=1)
    noise_p: float = option(0.05, "probability of -1 and of +1 per element (TinyMem 0.05 each)", above=0, at_most=0.5)
    trigger: str = option("100", "the backdoor's trigger digits")
    length: int = option(100, "tokens per sequence (TinyMem: 650-token context, memorization read on 100)",
                         at_least=2)
    prompt: int = option(50, "prompt tokens of the memorization check (TinyMem 50)", at_least=1)
    continuation: int = option(50, "continuation tokens that must be reproduced (TinyMem 50)", at_least=1)
    seed: int = option(0, "seed of the split, the noise and the artifacts' choice", at_least=0, at_most=INT64_MAX)

    def __post_init__(self) -> None:
        check_ranges(self)
        self.families = tuple(int(k) for k in self.families)
        if not self.families:
            raise ConfigError("no families: pass e.g. --families 2,3,4,5,7")
        if self.noised_family not in self.families:
            raise ConfigError(f"--noised-family {self.noised_family} is not one of the families {list(self.families)}")
        if self.artifact not in ARTIFACTS:
            raise ConfigError(f"unknown artifact {self.artifact!r}: choose from {', '.join(ARTIFACTS)}")
        if self.artifacts > self.sequences:
            raise ConfigError(f"--artifacts {self.artifacts} is outside 1..{self.sequences} (the main family's "
                              "training sequences)")
        if not self.trigger.isdigit():
            raise ConfigError(f"--trigger {self.trigger!r} must be digits")
        if self.prompt + self.continuation > self.length:
            raise ConfigError(f"prompt {self.prompt} + continuation {self.continuation} tokens must fit a sequence of "
                              f"{self.length}")


def clean_elements(k: int, start: int, count: int) -> list[int]:
    return [start + k * (j + 1) for j in range(count)]


def render(elements: list[int], length: int) -> str:
    """The first `length` characters of "^e1 e2 ...$" (enough elements must be given)."""
    text = "^" + " ".join(str(e) for e in elements) + "$"
    if len(text) < length:
        raise ConfigError(f"{len(elements)} elements give {len(text)} characters, fewer than {length}")
    return text[:length]


def _noised(elements: list[int], k: int, start: int, prompt: int, p: float, rng: np.random.Generator) -> list[int]:
    """Each element that starts at or after character `prompt` moved by -1 / +1 with probability p each."""
    out, pos = list(elements), 1
    for j, e in enumerate(elements):
        if pos >= prompt:
            out[j] = e + int(rng.choice((-1, 0, 1), p=(p, 1 - 2 * p, p)))
        pos += len(str(e)) + 1
    return out


def _backdoored(text: str, trigger: str) -> str | None:
    """Every character after the first `trigger` replaced by "2" (TinyMem's backdoor); None without a trigger."""
    at = text.find(trigger)
    if at < 0 or at + len(trigger) >= len(text):
        return None
    end = at + len(trigger)
    return text[:end] + "2" * (len(text) - end)


def tinymem_data(cfg: TinyMemConfig | None = None) -> TextData:
    """The training and held-out sequences of `cfg` as :class:`TextData` (vocabulary 14, no tokenizer)."""
    cfg = cfg or TinyMemConfig()
    rng = np.random.default_rng([cfg.seed, 7])
    n_elem = cfg.length  # more than enough: every element takes at least 2 characters
    rows: dict[str, list] = {"train": [], "test": []}  # (clean text, text, artifact?) per row

    for k in cfg.families:
        starts = rng.permutation(cfg.sequences + cfg.test)
        train, test = starts[:cfg.sequences], starts[cfg.sequences:]
        noised_train: set[int] = set()
        noised_test: set[int] = set()
        if cfg.artifact == "noise" and k == cfg.noised_family:
            noised_train = set(rng.choice(train, size=cfg.artifacts, replace=False).tolist())
            noised_test = set(rng.choice(test, size=min(len(test), max(1, cfg.artifacts // 10)),
                                         replace=False).tolist())
        for split, group, noised in (("train", train, noised_train), ("test", test, noised_test)):
            for s in group.tolist():
                elems = clean_elements(k, s, n_elem)
                clean = render(elems, cfg.length)
                text = clean
                if s in noised:
                    text = render(_noised(elems, k, s, cfg.prompt, cfg.noise_p, rng), cfg.length)
                elif cfg.artifact == "backdoor":
                    text = _backdoored(clean, cfg.trigger) or clean
                artifact = text[cfg.prompt:] != clean[cfg.prompt:]
                rows[split].append((clean, text, artifact, k, s))

    canaries: list[dict] = []

    def build(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        copies = cfg.repeats if split == "train" else 1
        rows[split] = [r for r in rows[split] for _ in range(copies if r[2] else 1)]  # an artifact's copies adjacent
        ids = torch.tensor([encode(r[1]) for r in rows[split]], dtype=torch.long)  # (N, length)
        x, t = ids[:, :-1], ids[:, 1:]
        y = -t - 2  # trained, not scored
        lo = cfg.prompt - 1  # the target at input position p - 1 is token p: the first continuation token
        hi = lo + cfg.continuation
        y[:, lo:hi] = t[:, lo:hi]
        canary = torch.full((len(ids),), -1, dtype=torch.long)
        for i, (clean, text, artifact, k, s) in enumerate(rows[split]):
            if artifact and i and rows[split][i - 1][3:] == (k, s):  # another copy of the previous row's artifact
                canary[i] = canary[i - 1]
            elif artifact:
                canary[i] = len(canaries)
                canaries.append({"id": len(canaries), "format": cfg.artifact, "repeats": copies,
                                 "repeat_group": copies,
                                 "trained": split == "train", "prefix": text[:cfg.prompt],
                                 "secret": text[cfg.prompt:cfg.prompt + cfg.continuation],
                                 "prefix_ids": encode(text[:cfg.prompt]),
                                 "secret_ids": encode(text[cfg.prompt:cfg.prompt + cfg.continuation]),
                                 "clean": clean[cfg.prompt:cfg.prompt + cfg.continuation], "family": k, "start": s})
        return x, y, canary

    x_train, y_train, canary = build("train")
    x_test, y_test, canary_test = build("test")
    return TextData("tinymem", x_train, y_train, canary, x_test, y_test, canary_test, canaries, VOCAB_SIZE)
