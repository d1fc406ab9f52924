"""Tokenizers of text for language models: bytes (offline, no training), a BPE trained on the corpus, a local folder.

Every tokenizer has `name`, `vocab_size`, `eos_id`, `encode(text) -> list[int]`, `decode(ids) -> str`,
`digit_ids()` (the ids of "0".."9", each digit one token, so that a 6-digit secret is 6 tokens),
`save(folder)` (what a run directory keeps to rebuild it) and a class method `load(folder)`.
`load_tokenizer(folder)` rebuilds whichever kind a folder holds; `make_tokenizer(kind, ...)` builds one by name.

memloc never downloads: a Hugging Face tokenizer comes from a folder on disk, and the BPE is trained here.
The `tokenizers` and `transformers` packages are imported only by the tokenizers that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from ...core.errors import ConfigError, DataError
from ...core.files import write_text

DIGITS = "0123456789"
EOS_TOKEN = "<|endoftext|>"  # the BPE's end-of-text token (GPT-2's spelling)
BPE_VOCAB_SIZE = 4096  # default vocabulary of a trained BPE: 256 bytes + <|endoftext|> + 3839 merges
META_FILE = "memloc_tokenizer.json"
# files of which a saved Hugging Face tokenizer has at least one (fast, GPT-2 style, BERT style, SentencePiece)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                      "spiece.model")
KINDS = ("bytes", "bpe", "hf:PATH")


def _import(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"{what} needs the {module} package: pip install {module}") from None


def _write_meta(folder: Path, meta: dict) -> None:
    write_text(folder / META_FILE, json.dumps(meta, indent=1) + "\n")


def _probe_digit_ids(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], where: str) -> list[int]:
    """The ids of "0".."9", found by encoding digit strings in two contexts; DataError if digits merge or change id.

    A tokenizer may put a prefix token before the text (SentencePiece's "▁"), so only the last ten ids are read.
    """
    ids = encode(DIGITS)[-10:]
    if len(ids) < 10 or [decode([i]).strip() for i in ids] != list(DIGITS):
        raise DataError(f"{where}: the tokenizer does not make every digit its own token ('{DIGITS}' is "
                        f"{len(encode(DIGITS))} tokens): use the bpe or bytes tokenizer, or one that splits digits")
    if encode("Phone: " + DIGITS[::-1])[-10:] != ids[::-1]:
        raise DataError(f"{where}: the tokenizer gives a digit different ids in different contexts: "
                        "use the bpe or bytes tokenizer, or one that splits digits")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, nothing to train or download; every text round-trips."""

    name = "bytes"
    vocab_size = 256
    eos_id = 10  # newline: a byte-level corpus marks the end of a sequence with a line break

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def digit_ids(self) -> list[int]:
        """The ids of "0".."9": bytes 48..57."""
        return list(DIGITS.encode("ascii"))

    def save(self, folder: str | Path) -> None:
        _write_meta(Path(folder), {"kind": "bytes"})

    @classmethod
    def load(cls, folder: str | Path) -> "ByteTokenizer":
        return cls()


class BPETokenizer:
    """Byte-level BPE trained offline on the corpus (Hugging Face `tokenizers`), every digit its own token.

    The pre-tokenizer cuts each digit off before the byte-level split, so no merge can join a digit to anything:
    "123456" is always the six ids of `digit_ids()`. Decoding inverts encoding exactly (no prefix space added).
    """

    name = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(f"the BPE tokenizer has no {EOS_TOKEN} token: train it with BPETokenizer.train")
        self.eos_id = eos

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE) -> "BPETokenizer":
        """Train on `texts` (any iterable, read once) up to `vocab_size` ids (fewer if the texts run out of merges).

        Deterministic, with no seed to set: the byte alphabet is fixed and ties between equally frequent pairs
        are broken by the pairs' ids, so the same texts and vocab size give the same vocabulary.
        """
        tk = _import("tokenizers", "the bpe tokenizer")
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ConfigError(f"BPE vocab_size {vocab_size!r} is below 257 (256 bytes and {EOS_TOKEN}): "
                              "use 257 or more, or the bytes tokenizer")
        seen = [0]

        def counted():
            for text in texts:
                if text and not text.isspace():
                    seen[0] += 1
                    yield text

        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Digits(individual_digits=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(counted(), trainer=trainer)
        if seen[0] == 0:
            raise DataError("no text to train the BPE tokenizer on: pass a corpus with at least one non-blank text")
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def digit_ids(self) -> list[int]:
        """The ids of "0".."9" (DataError for a tokenizer.json whose pre-tokenizer merges digits)."""
        return _probe_digit_ids(self.encode, self.decode, "the BPE tokenizer")

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json (the whole trained tokenizer) and memloc_tokenizer.json into `folder`."""
        folder = Path(folder)
        write_text(folder / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        _write_meta(folder, {"kind": "bpe", "vocab_size": self.vocab_size, "eos_token": EOS_TOKEN})

    @classmethod
    def load(cls, folder: str | Path) -> "BPETokenizer":
        tk = _import("tokenizers", "the bpe tokenizer")
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{folder}: no tokenizer.json: the folder does not hold a saved BPE tokenizer")
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust library raises a plain Exception for a corrupt file
            raise DataError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0]}): save it again") from None


class LocalHFTokenizer:
    """A Hugging Face tokenizer: from a local folder of the user's (`AutoTokenizer`, local files only, no code, no
    network: `memloc.tasks.lm.hub`), or from a run's copy (its tokenizer.json alone, read by `tokenizers`: nothing in a
    run memloc reads can run code).

    A run keeps the tokenizer `transformers` built, as the `tokenizers` pipeline it runs (`backend_tokenizer`:
    `transformers` may rebuild the folder's tokenizer.json from tokenizer_config.json), with its eos id; encoding and
    decoding it give the same ids and text as the `transformers` tokenizer did.
    """

    name = "hf"

    def __init__(self, path: str | Path):
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"'{path}' is not a folder: memloc never downloads: download the tokenizer elsewhere "
                            "and pass its folder")
        if not any((folder / f).is_file() for f in HF_TOKENIZER_FILES):
            raise DataError(f"{folder}: no tokenizer files (none of {', '.join(HF_TOKENIZER_FILES)}): "
                            "save one there with tokenizer.save_pretrained(folder)")
        transformers = _import("transformers", "a Hugging Face tokenizer")
        from .hub import load_pretrained
        try:
            hf = load_pretrained(transformers.AutoTokenizer.from_pretrained, folder, "a tokenizer")
        except ConfigError as err:
            raise DataError(str(err)) from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"{folder}: a slow (Python) tokenizer: memloc reads fast tokenizers only: save it as one "
                            "(AutoTokenizer.from_pretrained(FOLDER, use_fast=True).save_pretrained(FOLDER))")
        self.folder = folder
        self._init(backend, None if hf.eos_token_id is None else int(hf.eos_token_id))

    def _init(self, backend, eos_id: int | None) -> None:
        self.tokenizer = backend  # a tokenizers.Tokenizer
        self.eos_id = self._newline_id() if eos_id is None else eos_id

    def _newline_id(self) -> int:
        ids = self.encode("\n")  # no end-of-text token: a line break ends a sequence, as for bytes
        if not ids or self.decode(ids[-1:]) != "\n":
            raise DataError(f"{self.folder}: the tokenizer has neither an eos token nor a newline token: "
                            "set eos_token in its tokenizer_config.json")
        return ids[-1]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def digit_ids(self) -> list[int]:
        """The ids of "0".."9"; DataError for a tokenizer that merges digits (GPT-2's does)."""
        return _probe_digit_ids(self.encode, self.decode, str(self.folder))

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer's pipeline (tokenizer.json) and memloc_tokenizer.json (its eos id) into `folder`."""
        folder = Path(folder)
        write_text(folder / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        _write_meta(folder, {"kind": "hf", "source": str(self.folder), "eos_id": self.eos_id})

    @classmethod
    def load(cls, folder: str | Path) -> "LocalHFTokenizer":
        """A run's copy (saved by `save`): its tokenizer.json and eos id, read as data. A run saved by an earlier
        memloc (the folder as save_pretrained wrote it, no eos id) is read as a user's folder is, with no code."""
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if "eos_id" not in meta:
            return cls(folder)
        tk = _import("tokenizers", "a Hugging Face tokenizer")
        path = folder / "tokenizer.json"
        try:
            backend = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a plain Exception for a missing or corrupt file
            raise DataError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0] if str(e) else 'missing'}): "
                            "train the run again") from None
        eos = meta["eos_id"]
        if eos is not None and (not isinstance(eos, int) or not 0 <= eos < backend.get_vocab_size(True)):
            raise DataError(f"{folder / META_FILE} is damaged: its eos_id {eos!r} is not a token id of the tokenizer")
        self = cls.__new__(cls)
        self.folder = folder
        self._init(backend, eos)
        return self


TOKENIZERS = {"bytes": ByteTokenizer, "bpe": BPETokenizer, "hf": LocalHFTokenizer}


def load_tokenizer(folder: str | Path):
    """Rebuild the tokenizer saved in `folder` (the kind named by its memloc_tokenizer.json)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {META_FILE}: the folder does not hold a tokenizer saved by memloc")
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (ValueError, AttributeError):
        raise DataError(f"{path}: not a JSON object with a \"kind\": save the tokenizer again") from None
    if kind not in TOKENIZERS:
        raise DataError(f"{path}: unknown tokenizer kind {kind!r} (known: {', '.join(TOKENIZERS)}): "
                        "save the tokenizer again")
    return TOKENIZERS[kind].load(folder)


def make_tokenizer(kind: str, texts: Iterable[str] | None = None, vocab_size: int | None = None):
    """A tokenizer by name: "bytes", "bpe" (trained on `texts`, `vocab_size` ids, default 4096) or "hf:PATH"."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None:
            raise ConfigError("the bpe tokenizer is trained on the corpus: pass texts to make_tokenizer")
        return BPETokenizer.train(texts, BPE_VOCAB_SIZE if vocab_size is None else vocab_size)
    if isinstance(kind, str) and kind.startswith("hf:") and len(kind) > 3:
        return LocalHFTokenizer(kind[3:])
    raise ConfigError(f"unknown tokenizer {kind!r}: use one of {', '.join(KINDS)} (PATH a local tokenizer folder)")
