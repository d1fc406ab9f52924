"""Per-example files a user gives: a vector over the training examples (labels, a mask, scores) as .npy, .csv or
.txt, and example indices (which examples a probe works on). Read offline, checked line by line: every problem is
one DataError line naming the file and the fix.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .options import INT64_MAX

PathLike = str | os.PathLike


def _reason(exc: BaseException) -> str:
    # Exception texts can span lines; the CLI prints one line.
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """`y` as int64 labels, one per example of `n`, each 0 or more; any other is one DataError line (`where`)."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where} has shape {y.shape} but x has {n} examples; give one integer label per example")
    if y.dtype.kind not in "uif":
        raise DataError(f"{where} is {y.dtype}; give integer labels")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"{where} has non-integer labels; give integer labels 0..C-1")
    if y.size and y.min() < 0:
        raise DataError(f"{where} has negative label {y.min():g}; give labels 0..C-1")
    return y.astype(np.int64)


# --- per-example vectors (labels, masks, scores) -----------------------------

_KINDS = ("labels", "mask", "scores")
_TRUE, _FALSE = {"1", "true"}, {"0", "false"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_text_column(path: Path, what: str, kind: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path} ({_reason(e)}); give a .npy or a UTF-8 text file") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip().strip("\"'") for f in re.split(r"[,;\t ]+", line.strip()) if f]
        if not fields:
            continue  # blank lines, e.g. a trailing newline
        if len(fields) > 1:
            raise DataError(
                f"{what} {path} line {lineno} has {len(fields)} columns; give one value per line"
            )
        rows.append((lineno, fields[0]))
    # One optional header: a first line that is neither a number nor (for masks) true/false.
    if rows and not _is_number(rows[0][1]) and not (kind == "mask" and rows[0][1].lower() in _TRUE | _FALSE):
        rows = rows[1:]
    return rows


def read_vector(path: PathLike, *, length: int | None, what: str, kind: str) -> np.ndarray:
    """A per-example ``.npy`` or one-column text/CSV file -> (N,) array, checked against ``length``.

    ``kind`` is "labels" (int64, integers >= 0), "mask" (bool, from 0/1 or
    true/false) or "scores" (float64, finite). A text file has one value per
    line and may start with one non-numeric header line. ``what`` names the file
    in messages, e.g. "--labels file". ``length=None`` skips the length check.
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown vector kind {kind!r}; use one of {', '.join(_KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; pass the path of a .npy or a one-column text file")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except Exception as e:  # bad header, object array (pickles refused), truncated data...
            raise DataError(f"cannot read {what} {path} as a .npy without pickles ({_reason(e)})") from None
        if not isinstance(values, np.ndarray) or values.ndim != 1:
            shape = getattr(values, "shape", None)
            raise DataError(f"{what} {path} has shape {shape}; save a 1-D array with one value per example")
        if values.dtype.kind not in "buif":
            raise DataError(f"{what} {path} is {values.dtype}; save a numeric array")
        out = _npy_vector(values, path, what, kind)
    else:
        out = _text_vector(_read_text_column(path, what, kind), path, what, kind)
    if length is not None and len(out) != length:
        raise DataError(
            f"{what} {path} has {len(out)} values but the training set has {length} examples; "
            f"give one value per training example, in training-set order"
        )
    return out


def _npy_vector(values: np.ndarray, path: Path, what: str, kind: str) -> np.ndarray:
    if kind == "mask":
        if values.dtype.kind != "b" and not np.isin(values, (0, 1)).all():
            raise DataError(f"{what} {path} has values other than 0/1; give a boolean mask")
        return values.astype(bool)
    if kind == "scores":
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"{what} {path} contains NaN or inf; give finite scores")
        return values
    if values.dtype.kind == "b":
        raise DataError(f"{what} {path} is boolean; give integer labels")
    return check_labels(values, len(values), f"{what} {path}")


def _text_vector(rows: list[tuple[int, str]], path: Path, what: str, kind: str) -> np.ndarray:
    out = []
    for lineno, text in rows:
        if kind == "mask":
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise DataError(f"{what} {path} line {lineno} is {text!r}; give 0/1 or true/false")
            out.append(low in _TRUE)
            continue
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{what} {path} line {lineno} is {text!r}, not a number") from None
        if not np.isfinite(value):
            raise DataError(f"{what} {path} line {lineno} is {text!r}; give finite values")
        if kind == "labels" and (value != int(value) or value < 0):
            raise DataError(f"{what} {path} line {lineno} is {text!r}; give integer labels 0..C-1")
        out.append(int(value) if kind == "labels" else value)
    dtype = {"labels": np.int64, "mask": bool, "scores": np.float64}[kind]
    return np.array(out, dtype=dtype)


# --- example indices ---------------------------------------------------------

class Indices(tuple):
    """Training-example indices read from a file, each remembering where it stands there (`where`), so that an
    index found out of range later (past the run's examples) is reported with its file and line."""

    def __new__(cls, values=(), source: str | None = None, lines: list[int] | None = None):
        obj = super().__new__(cls, values)
        obj.source, obj.lines = source, lines
        return obj

    def where(self, i: int) -> str:
        """"--indices file F, line L" (a text file) or "..., position P" (a .npy) of the `i`-th index; "" unknown."""
        if getattr(self, "source", None) is None:
            return ""
        return f"--indices file {self.source}, {f'line {self.lines[i]}' if self.lines else f'position {i}'}"


def indices_of(values) -> tuple[int, ...]:
    """Example indices as a tuple of ints; those read by `read_indices` keep where they came from."""
    return values if isinstance(values, Indices) else tuple(int(i) for i in values)


def read_indices(path: str | Path) -> Indices:
    """A file of training-example indices: .npy, or text with one index (or comma-separated ones) per line ('#'
    starts a comment line). Each must be an integer in 0..2^63 - 1 (an int64); a bad one is refused in one line
    naming the file and its line (a .npy: its position)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--indices file {p} does not exist: pass a .npy or text file of example indices")
    lines: list[int] | None = None
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.dtype.kind not in "iuf":
                raise ValueError(f"it holds {arr.dtype} values")
            raw = arr.ravel().tolist()  # exact Python ints (uint64 too) or floats
        else:
            raw, lines = [], []
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    for v in line.replace(",", " ").split():
                        raw.append(v)
                        lines.append(n)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--indices file {p} is not a list of integers ({err})") from None
    values = []
    for i, v in enumerate(raw):
        index = _index(v)
        if index is None or not 0 <= index <= INT64_MAX:
            where = f"line {lines[i]}" if lines is not None else f"position {i}"
            what = f"{v!r} is not an integer" if index is None else \
                f"{v} is outside 0..2^63 - 1 (an example index counts from 0)"
            raise ConfigError(f"--indices file {p}, {where}: {what}: list training-example indices, e.g. 0, 17")
        values.append(index)
    return Indices(values, source=str(p), lines=lines)



def _index(v: str | int | float) -> int | None:
    """An index written as text or held by a .npy -> int; None when it is not an integer (3.0 and 1e3 are)."""
    if isinstance(v, int):
        return v
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def check_indices(indices, n: int, what: str = "example") -> None:
    """Refuse (DataError, one line) the first of `indices` outside 0..n-1, naming its file and line when it was
    read from one (`read_indices`)."""
    bad = next((i for i, v in enumerate(indices) if not 0 <= int(v) < n), None)
    if bad is None:
        return
    where = indices.where(bad) if isinstance(indices, Indices) else ""
    raise DataError(f"{where + ': ' if where else ''}{what} index {indices[bad]} is outside 0..{n - 1}: the run has "
                    f"{n} training {what}s")
