"""A user's sequences to audit, as the text data memloc's probes read: each sequence is a canary of its own.

`read_sequences(path)` reads a file of sequences:

- ``.jsonl``: one JSON object a line with ``text`` (or ``ids``: token ids), optionally ``member`` (true: known to
  be in the model's training data, false: known not to be) and ``prefix`` / ``suffix`` (the text split where
  extraction starts; then no ``text``);
- ``.txt``: one sequence a line (blank lines skipped), membership unknown.

`open_tokens(path)` opens a file of token ids too large to read, memory-mapped (`TokenFile`; numpy never unpickles):

- a 2-D ``.npy`` (N, L): N sequences of L tokens;
- a 1-D ``.npy``, or nanoGPT's ``.bin`` (a raw stream of uint16 ids), cut into sequences by an index beside it,
  ``FILE.idx.npy`` (the name with ``.idx.npy`` for its suffix): N + 1 increasing offsets, sequence i the tokens
  ``off[i]:off[i + 1]``; or without an index into consecutive windows of ``sequence_length`` tokens (Carlini et
  al. 2021's samples of the Pile);
- membership labels, optional, beside it: ``FILE.member.npy``, (N,) bool (true: member) or integers (1 member,
  0 non-member, -1 unknown).

Every check (dtype, shape, offsets, labels, ids against the vocabulary, lengths against the context) reads the
file in blocks, so a bad file is one DataError naming the file and the first bad sequence, before anything is
written.

`audit_rows(cfg, tok)` tokenizes them into the rows of a `TextData` whose canaries are the sequences: a
sequence's secret is its suffix (given, or its last half, at most ``cfg.suffix_tokens`` tokens: Carlini et al.
2022's 50 by default), its prefix the tokens before. Members and sequences of unknown membership are the
canaries' training rows (what localization and unit removal search); known non-members, and the lines of
``cfg.audit_heldout`` when given, are split in turn (first, third, ...: second, fourth, ...) into the held-out rows
(perplexity) and training rows of no canary: the general text an edit must keep (localization's "others"), so
that an edit is never judged on the text it was fitted to keep. The non-members' membership scores use all of
them (they are computed per sequence, not per row). A sequence longer than the
model's context (``cfg.block_size`` + 1 tokens) keeps its last ``block_size + 1`` tokens (``cfg.truncate``), or
is refused. A ``.jsonl`` line may carry ``index``: the sequence's position in a token file (what the streaming scan
of one keeps, `memloc.audit.scan`), carried to its canary instead of the line number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...core.errors import DataError

MAX_FILE = 1 << 30  # bytes of a sequences file memloc reads (1 GiB)
FORMAT = "audit"  # the canary format of an audited sequence
TOKEN_FILES = (".npy", ".bin")  # token ids, memory-mapped (`open_tokens`)
INDEX, MEMBER = ".idx.npy", ".member.npy"  # a token file's index and membership labels: FILE.idx.npy, FILE.member.npy
BLOCK = 1 << 22  # elements per step of a token file's checks: memory bounded whatever the file's size


def read_sequences(path: str | Path, *, what: str = "--sequences") -> list[dict]:
    """The sequences of a .jsonl or .txt file: [{"text", "ids", "prefix", "suffix", "member", "line"}] (absent
    fields None); a bad line is one DataError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file: give a .jsonl (one {{\"text\": ...}} a line) or a .txt file")
    if path.stat().st_size > MAX_FILE:
        raise DataError(f"{what} {path} is {path.stat().st_size >> 20} MB: memloc reads at most "
                        f"{MAX_FILE >> 20} MB of sequences; split it")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    jsonl = path.suffix.lower() == ".jsonl"
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{what} {path}, line {n}"
        if not jsonl:
            out.append({"text": line, "ids": None, "prefix": None, "suffix": None, "member": None, "line": n,
                        "index": None})
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(f"{where}: not JSON: write one object a line, e.g. {{\"text\": \"...\"}}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object with \"text\"")
        rec = {"text": obj.get("text"), "ids": obj.get("ids"), "prefix": obj.get("prefix"),
               "suffix": obj.get("suffix"), "member": obj.get("member"), "line": n, "index": obj.get("index")}
        given = [k for k in ("text", "ids") if rec[k] is not None] + (["prefix/suffix"] if rec["suffix"] is not None
                                                                      or rec["prefix"] is not None else [])
        if len(given) != 1:
            raise DataError(f"{where}: give exactly one of \"text\", \"ids\" or \"prefix\" + \"suffix\""
                            + (f" (it has {', '.join(given)})" if given else ""))
        for k in ("text", "prefix", "suffix"):
            if rec[k] is not None and not isinstance(rec[k], str):
                raise DataError(f"{where}: \"{k}\" is a {type(rec[k]).__name__}, not a string")
        if rec["suffix"] is not None and (rec["prefix"] is None or not rec["suffix"] or not rec["prefix"]):
            raise DataError(f"{where}: \"prefix\" and \"suffix\" go together, both non-empty")
        if rec["ids"] is not None and not (isinstance(rec["ids"], list) and len(rec["ids"]) >= 2 and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2 ** 31 for t in rec["ids"])):
            raise DataError(f"{where}: \"ids\" must be a list of at least 2 non-negative token ids")
        if rec["member"] is not None and not isinstance(rec["member"], bool):
            raise DataError(f"{where}: \"member\" is {rec['member']!r}: true, false, or leave it out (unknown)")
        if rec["index"] is not None and not (isinstance(rec["index"], int) and not isinstance(rec["index"], bool)
                                             and rec["index"] >= 0):
            raise DataError(f"{where}: \"index\" is {rec['index']!r}: a sequence's position in a token file (an "
                            "integer from 0), or leave it out")
        out.append(rec)
    if not out:
        raise DataError(f"{what} {path} holds no sequence: give one a line")
    return out


def prefix_length(n: int, suffix_tokens: int) -> int:
    """Where a sequence of n tokens splits: its suffix is its last half, at most `suffix_tokens` tokens."""
    return n - min(suffix_tokens, n // 2)


def fit(ids: list[int], plen: int, block: int, truncate: bool, where: str) -> tuple[list[int], int, bool]:
    """(token ids, prefix length, cut?) of one sequence within the model's context of `block` + 1 tokens: a longer
    one keeps its last tokens (`truncate`) or is refused."""
    if len(ids) < 2 or plen < 1 or plen >= len(ids):
        raise DataError(f"{where}: {len(ids)} token(s): a sequence needs a prefix and a suffix of at least one "
                        "token each")
    cut = len(ids) > block + 1
    if cut:
        if not truncate:
            raise DataError(f"{where}: {len(ids)} tokens, more than the model's context of {block + 1}: shorten it, "
                            "or drop --no-truncate to keep its last tokens")
        drop = len(ids) - (block + 1)
        if drop >= plen:
            raise DataError(f"{where}: its suffix alone is longer than the model's context of {block + 1} tokens")
        ids, plen = ids[drop:], plen - drop
    return ids, plen, cut


def _split(rec: dict, tok, suffix_tokens: int, block: int, truncate: bool, where: str
           ) -> tuple[list[int], int, bool]:
    """(token ids, prefix length, cut?) of one sequence."""
    if rec["suffix"] is not None:
        pre, suf = tok.encode(rec["prefix"]), tok.encode(rec["suffix"])
        ids, plen = pre + suf, len(pre)
    else:
        ids = list(rec["ids"]) if rec["ids"] is not None else tok.encode(rec["text"])
        plen = prefix_length(len(ids), suffix_tokens)
    return fit(ids, plen, block, truncate, where)


def canary(cid: int, ids: list[int], plen: int, member: bool | None, tok, *, line: int | None = None,
           index: int | None = None) -> dict:
    """An audited sequence as a canary: its prefix and secret (the suffix), ids and text, its member label and
    where it came from (a line of a sequences file, or a token file's `index`)."""
    where = {"index": index} if index is not None else {"line": line}
    return {"id": cid, "format": FORMAT, "member": member, "trained": member is not False,
            "repeats": 1 if member is not False else 0, "repeat_group": 1, **where,
            "prefix": tok.decode(ids[:plen]), "secret": tok.decode(ids[plen:]),
            "prefix_ids": ids[:plen], "secret_ids": ids[plen:]}


def _tokenized(rec: dict, cfg, tok, what: str, src) -> tuple[list[int], int, bool]:
    """`_split` of a line of file `src` (given as `what`), its ids checked against the tokenizer's vocabulary."""
    ids, plen, cut = _split(rec, tok, cfg.suffix_tokens, cfg.block_size, cfg.truncate,
                            f"{what} {src}, line {rec['line']}")
    if max(ids) >= tok.vocab_size:
        raise DataError(f"{src}, line {rec['line']}: token id {max(ids)} is outside the tokenizer's vocabulary "
                        f"of {tok.vocab_size}")
    return ids, plen, cut


def check_heldout(cfg, tok) -> None:
    """The lines of `cfg.audit_heldout` as `audit_rows` reads them (one DataError in the same words), before an
    audit of a token file writes anything."""
    for rec in read_sequences(cfg.audit_heldout, what="--heldout") if cfg.audit_heldout else []:
        _tokenized(rec, cfg, tok, "--heldout", cfg.audit_heldout)


def audit_rows(cfg, tok) -> tuple[list[dict], list[tuple], list[tuple], int]:
    """The audited sequences of `cfg` (a TextConfig with `audit`), tokenized with `tok`: (canaries, training rows,
    held-out rows, how many were cut); a row is (token ids, prefix length, canary id or -1). `text.load_text`
    makes them TextData."""
    recs = read_sequences(cfg.corpus)
    held = read_sequences(cfg.audit_heldout, what="--heldout") if cfg.audit_heldout else []
    for r in held:
        r["member"] = False
    canaries, rows_tr, rows_te, rows_tr_other, cuts, held_out = [], [], [], [], 0, 0
    for i, rec in enumerate(recs + held):
        mine = i < len(recs)
        ids, plen, cut = _tokenized(rec, cfg, tok, *(("--sequences", cfg.corpus) if mine else
                                                     ("--heldout", cfg.audit_heldout)))
        cuts += cut
        row = (ids, plen, len(canaries) if mine else -1)
        if mine:
            canaries.append(canary(len(canaries), ids, plen, rec["member"], tok, line=rec["line"],
                                   index=rec["index"]))
        if mine and rec["member"] is not False:
            rows_tr.append(row)
        elif held_out % 2 == 0:  # held out: perplexity (and the non-members' rows)
            rows_te.append(row)
            held_out += 1
        else:  # general text an edit must keep (never also the text it is judged on)
            rows_tr_other.append((ids, plen, -1))
            held_out += 1
    if not rows_tr:
        raise DataError(f"every sequence of {cfg.corpus} is a known non-member: audit at least one member or one of "
                        "unknown membership")
    return canaries, rows_tr + rows_tr_other, rows_te, cuts


# --- token files: sequences of token ids too many to read, memory-mapped --------------------------------------------

def is_token_file(path: str | Path) -> bool:
    """Whether `path` names a token file (`open_tokens`) rather than text (`read_sequences`)."""
    return Path(path).suffix.lower() in TOKEN_FILES


def beside(path: str | Path, suffix: str) -> Path:
    """A token file's index (`INDEX`) or labels (`MEMBER`): its name with `suffix` for its own (train.bin ->
    train.idx.npy)."""
    return Path(path).with_suffix(suffix)


class TokenFile:
    """Sequences of token ids in a memory-mapped file (`open_tokens` makes one): only what is asked is read.

    `tokens`: (N, L) or a 1-D stream (T,); `offsets`: (N + 1,) into the stream, or None; `length`: the windows'
    length of a stream without offsets; `member`: (N,) labels (bool, or int 1 / 0 / -1) or None."""

    def __init__(self, path: Path, tokens: np.ndarray, *, offsets: np.ndarray | None = None,
                 length: int | None = None, member: np.ndarray | None = None):
        self.path, self.tokens, self.offsets, self.length, self.member = path, tokens, offsets, length, member
        if tokens.ndim == 2:
            self.n = tokens.shape[0]
        elif offsets is not None:
            self.n = len(offsets) - 1
        else:
            self.n = len(tokens) // length
        self.notes: list[str] = []  # lines for the user: windows' leftover tokens, sequences cut to the context
        self.longest = 0  # the longest sequence (tokens)

    def __len__(self) -> int:
        return self.n

    @property
    def files(self) -> list[Path]:
        """The files it reads: the tokens, then the index and the labels where given."""
        return [self.path] + [beside(self.path, s) for s, a in ((INDEX, self.offsets), (MEMBER, self.member))
                              if a is not None]

    def lengths(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo,) int64: the tokens of sequences lo..hi-1."""
        if self.offsets is None:
            return np.full(hi - lo, self.tokens.shape[1] if self.tokens.ndim == 2 else self.length, dtype=np.int64)
        return np.diff(np.asarray(self.offsets[lo:hi + 1], dtype=np.int64))

    def sequences(self, lo: int, hi: int) -> list[list[int]]:
        """Sequences lo..hi-1 as lists of ids: only their tokens are read."""
        if self.tokens.ndim == 2:
            return np.asarray(self.tokens[lo:hi], dtype=np.int64).tolist()
        if self.offsets is None:
            n = self.length
            return np.asarray(self.tokens[lo * n:hi * n], dtype=np.int64).reshape(hi - lo, n).tolist()  # (k, L)
        off = np.asarray(self.offsets[lo:hi + 1], dtype=np.int64)
        flat = np.asarray(self.tokens[off[0]:off[-1]], dtype=np.int64)
        return [part.tolist() for part in np.split(flat, off[1:-1] - off[0])]

    def members(self, lo: int, hi: int) -> list[bool | None]:
        """The labels of sequences lo..hi-1: True (member), False (non-member), None (unknown)."""
        if self.member is None:
            return [None] * (hi - lo)
        lab = np.asarray(self.member[lo:hi])
        if lab.dtype == bool:
            return lab.tolist()
        return [None if v < 0 else bool(v) for v in lab.tolist()]

    def sequence_at(self, position: int) -> int:
        """The sequence that holds token `position` of a stream."""
        if self.offsets is None:
            return position // self.length
        return int(np.searchsorted(self.offsets, position, side="right")) - 1


def _load_npy(path: Path, where: str) -> np.ndarray:
    """A .npy memory-mapped, never unpickled; anything else is one DataError."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:
        raise DataError(f"{where}: the file is empty: write it with numpy.save") from None
    except (ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise DataError(f"{where}: not a .npy array memloc can memory-map ({first}): write integer token ids with "
                        "numpy.save") from None
    if not isinstance(arr, np.ndarray):  # an .npz under a .npy name
        arr.close()
        raise DataError(f"{where}: a .npz archive, not a .npy array: write one array with numpy.save")
    return arr


def _integers(arr: np.ndarray, where: str, what: str) -> None:
    if arr.dtype.kind not in "iu":
        raise DataError(f"{where}: dtype {arr.dtype}: {what}")


def _blocks(n: int, step: int = BLOCK):
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def open_tokens(path: str | Path, *, vocab_size: int, sequence_length: int | None = None, block: int | None = None,
                truncate: bool = True, what: str = "--sequences") -> TokenFile:
    """The sequences of a token file (the module text says which), memory-mapped and checked in blocks: a bad file
    is one DataError naming it and the problem. `vocab_size`: every id must be below it; `block`: the model's
    context is `block` + 1 tokens, a longer sequence is cut (a note) or, without `truncate`, refused."""
    path = Path(path)
    where = f"{what} {path}"
    if not path.is_file():
        raise DataError(f"{where} is not a file: give a .npy of token ids ((N, L), or a 1-D stream with {path.stem}"
                        f"{INDEX}) or a nanoGPT .bin")
    index, labels = beside(path, INDEX), beside(path, MEMBER)
    if path.suffix.lower() == ".bin":
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{where}: the file is empty: it holds no token")
        if size % 2:
            raise DataError(f"{where}: {size} bytes, not a whole number of uint16 token ids (nanoGPT's .bin): write "
                            "other dtypes as a .npy")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
    else:
        tokens = _load_npy(path, where)
        _integers(tokens, where, "token ids are integers (uint16 as nanoGPT writes them, int32, int64)")
    if tokens.ndim not in (1, 2):
        raise DataError(f"{where}: an array of shape {tokens.shape}: give (N, L) sequences or a 1-D stream of ids")
    offsets = None
    if tokens.ndim == 2:
        if sequence_length is not None or index.exists():
            given = "--sequence-length" if sequence_length is not None else str(index)
            raise DataError(f"{where}: an (N, L) array is N sequences already: drop {given}")
        if tokens.shape[1] < 2:
            raise DataError(f"{where}: sequences of {tokens.shape[1]} token(s): each needs a prefix and a suffix of "
                            "at least one token")
    elif index.exists() and sequence_length is not None:
        raise DataError(f"{where}: both an index {index} and --sequence-length: give one")
    elif index.exists():
        offsets = _load_npy(index, f"{what} index {index}")
        _check_offsets(offsets, len(tokens), f"{what} index {index}")
    elif sequence_length is None:
        raise DataError(f"{where}: a 1-D stream of {len(tokens)} token ids needs its sequences: an index "
                        f"{index.name} beside it (N + 1 offsets) or --sequence-length L (consecutive windows)")
    elif int(sequence_length) < 2:
        raise DataError(f"{where}: --sequence-length {sequence_length}: a sequence needs at least 2 tokens")
    tf = TokenFile(path, tokens, offsets=offsets, length=None if sequence_length is None else int(sequence_length))
    if len(tf) == 0:
        raise DataError(f"{where}: holds no sequence" + (f" ({len(tokens)} tokens, fewer than one window of "
                                                         f"{sequence_length})" if tf.length else ""))
    if tf.length and len(tokens) % tf.length:
        tf.notes.append(f"{path.name}: the last {len(tokens) % tf.length} tokens, less than a window of "
                        f"{tf.length}, are not audited")
    if labels.exists():
        tf.member = _load_npy(labels, f"{what} labels {labels}")
        _check_labels(tf.member, len(tf), f"{what} labels {labels}")
    _check_ids(tf, vocab_size, where)
    _check_lengths(tf, block, truncate, where)
    return tf


def _check_offsets(off: np.ndarray, total: int, where: str) -> None:
    _integers(off, where, "offsets are integers (int64)")
    if off.ndim != 1 or len(off) < 2:
        raise DataError(f"{where}: shape {off.shape}: give N + 1 offsets, a 1-D array of at least 2")
    if int(off[0]) < 0:
        raise DataError(f"{where}: offset {int(off[0])} of sequence 0 is negative")
    for lo, hi in _blocks(len(off) - 1):
        part = np.asarray(off[lo:hi + 1], dtype=np.int64)
        step = np.diff(part)
        if (step < 2).any():
            i = int(np.argmax(step < 2))
            what = "not increasing" if step[i] < 1 else "a sequence of 1 token (a prefix and a suffix need 2)"
            raise DataError(f"{where}: offsets {part[i]}, {part[i + 1]} of sequence {lo + i}: {what}")
    if int(off[-1]) > total:
        raise DataError(f"{where}: the last offset {int(off[-1])} is past the {total} tokens of the stream")


def _check_labels(lab: np.ndarray, n: int, where: str) -> None:
    if lab.dtype != bool:
        _integers(lab, where, "labels are bool (true: member) or integers (1 member, 0 non-member, -1 unknown)")
    if lab.shape != (n,):
        raise DataError(f"{where}: shape {lab.shape} for {n} sequences: give one label per sequence")
    some = False  # a member, or one of unknown membership
    for lo, hi in _blocks(n):
        part = np.asarray(lab[lo:hi])
        if part.dtype != bool:
            bad = (part < -1) | (part > 1)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"{where}: label {part[i]} of sequence {lo + i}: 1 member, 0 non-member, -1 unknown")
        some = some or bool((part != 0).any())
    if not some:
        raise DataError(f"{where}: every sequence is a known non-member: audit at least one member or one of unknown "
                        "membership")


def _check_ids(tf: TokenFile, vocab_size: int, where: str) -> None:
    """Every id of every sequence in [0, vocab_size), a block of the file at a time (rows of an (N, L) array, in
    whatever order it is stored)."""
    t = tf.tokens
    if t.dtype.kind == "u" and np.iinfo(t.dtype).max < vocab_size:
        return  # no id of this dtype can be outside the vocabulary
    if t.ndim == 2:
        start, stop, step = 0, len(tf), max(1, BLOCK // t.shape[1])  # rows
    elif tf.offsets is not None:
        start, stop, step = int(tf.offsets[0]), int(tf.offsets[-1]), BLOCK
    else:  # the whole windows of a stream
        start, stop, step = 0, len(tf) * tf.length, BLOCK
    for lo, hi in _blocks(stop - start, step):
        part = np.asarray(t[start + lo:start + hi])
        if int(part.min()) >= 0 and int(part.max()) < vocab_size:
            continue
        first = int(np.argmax(((part < 0) | (part >= vocab_size)).reshape(-1)))  # row-major
        v = int(part.reshape(-1)[first])
        seq = lo + first // t.shape[1] if t.ndim == 2 else tf.sequence_at(start + lo + first)
        why = "negative" if v < 0 else f"outside the vocabulary of {vocab_size} (the model's tokenizer)"
        raise DataError(f"{where}: token id {v} of sequence {seq} is {why}")


def _check_lengths(tf: TokenFile, block: int | None, truncate: bool, where: str) -> None:
    """The longest sequence; those longer than the model's context of `block` + 1 tokens cut (a note) or refused."""
    cut = 0
    for lo, hi in _blocks(len(tf)):
        n = tf.lengths(lo, hi)
        tf.longest = max(tf.longest, int(n.max()))
        if block is None:
            continue
        long = n > block + 1
        if long.any() and not truncate:
            i = int(np.argmax(long))
            raise DataError(f"{where}: sequence {lo + i} has {n[i]} tokens, more than the model's context of "
                            f"{block + 1}: drop --no-truncate to keep their last tokens")
        cut += int(long.sum())
    if cut:
        tf.notes.append(f"{cut} sequences longer than the model's context of {block + 1} tokens keep their last "
                        "tokens (--no-truncate refuses them)")
    if block is not None:
        tf.longest = min(tf.longest, block + 1)
