"""A user's sequences to audit, as the text data memloc's probes read: each sequence is a canary of its own.

`read_sequences(path)` reads a file of sequences:

- ``.jsonl``: one JSON object a line with ``text`` (or ``ids``: token ids), optionally ``member`` (true: known to
  be in the model's training data, false: known not to be) and ``prefix`` / ``suffix`` (the text split where
  extraction starts; then no ``text``);
- ``.txt``: one sequence a line (blank lines skipped), membership unknown.

`audit_rows(cfg, tok)` tokenizes them into the rows of a `TextData` whose canaries are the sequences: a
sequence's secret is its suffix (given, or its last half, at most ``cfg.suffix_tokens`` tokens: Carlini et al.
2022's 50 by default), its prefix the tokens before. Members and sequences of unknown membership are the
canaries' training rows (what localization and unit removal search); known non-members, and the lines of
``cfg.audit_heldout`` when given, are split in turn (first, third, ...: second, fourth, ...) into the held-out rows
(perplexity) and training rows of no canary: the general text an edit must keep (localization's "others"), so
that an edit is never judged on the text it was fitted to keep. The non-members' membership scores use all of
them (they are computed per sequence, not per row). A sequence longer than the
model's context (``cfg.block_size`` + 1 tokens) keeps its last ``block_size + 1`` tokens (``cfg.truncate``), or
is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError

MAX_FILE = 1 << 30  # bytes of a sequences file memloc reads (1 GiB)
FORMAT = "audit"  # the canary format of an audited sequence


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
            out.append({"text": line, "ids": None, "prefix": None, "suffix": None, "member": None, "line": n})
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(f"{where}: not JSON: write one object a line, e.g. {{\"text\": \"...\"}}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object with \"text\"")
        rec = {"text": obj.get("text"), "ids": obj.get("ids"), "prefix": obj.get("prefix"),
               "suffix": obj.get("suffix"), "member": obj.get("member"), "line": n}
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
        out.append(rec)
    if not out:
        raise DataError(f"{what} {path} holds no sequence: give one a line")
    return out


def _split(rec: dict, tok, suffix_tokens: int, block: int, truncate: bool, where: str
           ) -> tuple[list[int], int, bool]:
    """(token ids, prefix length, cut?) of one sequence."""
    if rec["suffix"] is not None:
        pre, suf = tok.encode(rec["prefix"]), tok.encode(rec["suffix"])
        ids, plen = pre + suf, len(pre)
    else:
        ids = list(rec["ids"]) if rec["ids"] is not None else tok.encode(rec["text"])
        s = min(suffix_tokens, len(ids) // 2)
        plen = len(ids) - s
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
        src = cfg.corpus if mine else cfg.audit_heldout
        ids, plen, cut = _split(rec, tok, cfg.suffix_tokens, cfg.block_size, cfg.truncate,
                                f"{'--sequences' if mine else '--heldout'} {src}, line {rec['line']}")
        if max(ids) >= tok.vocab_size:
            raise DataError(f"{src}, line {rec['line']}: token id {max(ids)} is outside the tokenizer's vocabulary "
                            f"of {tok.vocab_size}")
        cuts += cut
        row = (ids, plen, len(canaries) if mine else -1)
        if mine:
            member = rec["member"]
            canaries.append({"id": len(canaries), "format": FORMAT, "member": member, "trained": member is not False,
                             "repeats": 1 if member is not False else 0, "repeat_group": 1, "line": rec["line"],
                             "prefix": tok.decode(ids[:plen]), "secret": tok.decode(ids[plen:]),
                             "prefix_ids": ids[:plen], "secret_ids": ids[plen:]})
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
