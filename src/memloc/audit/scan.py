"""An audit's streaming scan of a token file: every sequence measured a chunk at a time, resumable, then the few
that matter kept as the run's sequences.

`memloc audit MODEL --sequences FILE.npy` (or nanoGPT's FILE.bin with FILE.idx.npy, or windows of
`--sequence-length`: `memloc.tasks.lm.sequences.open_tokens`) cannot make a million sequences the canaries of a
TextData: each canary holds its ids and text in memory and in data.npz. So the audit first scans the file (`scan_file`):
`--chunk` sequences at a time, read from the memory map, measured exactly as the memorization probe measures
canaries (`probes.memorization.canary_measures`: extraction, k-extractability, suffix accuracy, loss, the
membership scores), each finished chunk saved atomically as RUN/probes/scan/parts/NNNNNN.npz, so that a killed
scan resumes at its first missing chunk. The chunks are then joined a column at a time into RUN/probes/scan/
(arrays.npz and scan.csv: one row per sequence of the file; summary.json: extraction and each membership score's
AUROC over the whole file), and the run keeps as its sequences every extracted one and a seeded sample of `--keep`
others (`select`), written with their ids, labels and positions in the file to RUN/sequences.jsonl: a small
TextData on which the audit's other stages (memorization, history, removal, report) run unchanged.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import RunError
from ..tasks.lm.sequences import TokenFile, canary, fit, open_tokens, prefix_length

SCAN = "scan"  # the stage, and its folder RUN/probes/scan/
SELECTED = "sequences.jsonl"  # the sequences a token file's audit keeps, in the run directory
BOOTSTRAP_WORK = 10_000_000  # resamples x sequences of a membership score's bootstrap interval (at least 100)


@dataclass
class Chunk:
    """What `canary_measures` reads of a TextData: a chunk's sequences as canaries, and their tokenizer."""

    canaries: list[dict]
    tokenizer: Any
    vocab_size: int


def open_file(cfg, text, tok) -> tuple[TokenFile, dict[str, str]]:
    """The token file of audit config `cfg`, checked (ids against `tok`, lengths against `text`'s context, and
    `--heldout` as the audit will read it), and the sha256 of each of its files: one DataError for a bad file,
    before anything is written."""
    from ..tasks.experiment import file_sha256
    from ..tasks.lm.sequences import check_heldout
    tokens = open_tokens(cfg.sequences, vocab_size=tok.vocab_size, sequence_length=cfg.sequence_length,
                         block=text.block_size, truncate=text.truncate)
    check_heldout(text, tok)
    return tokens, {p.name: file_sha256(p, fix="check the token file") for p in tokens.files}


def measure_chunk(model, tokens: TokenFile, lo: int, hi: int, tok, mcfg, *, suffix_tokens: int, block: int,
                  truncate: bool = True, reference=None) -> dict[str, np.ndarray]:
    """Sequences lo..hi-1 of `tokens`, each split and cut as the audit splits a sequence of ids, measured by
    `canary_measures` (`mcfg`; `reference`: its reference model, loaded once): per sequence (hi - lo,) index,
    member (1 / 0 / -1 unknown), tokens (after a cut to the context), prefix_tokens, extracted, extracted_kK,
    suffix_accuracy, loss and mi_<score>."""
    from ..probes.memorization import canary_measures
    from ..tasks.lm.membership import ORIENT
    members = tokens.members(lo, hi)
    cans = []
    for i, (ids, member) in enumerate(zip(tokens.sequences(lo, hi), members)):
        ids, plen, _ = fit(ids, prefix_length(len(ids), suffix_tokens), block, truncate,
                           f"{tokens.path}, sequence {lo + i}")
        cans.append(canary(i, ids, plen, member, tok, index=lo + i))
    m = canary_measures(model, Chunk(cans, tok, tok.vocab_size), mcfg, reference=reference)
    return {"index": np.arange(lo, hi, dtype=np.int64),
            "member": np.array([-1 if v is None else int(v) for v in members], dtype=np.int8),
            "tokens": np.array([len(c["prefix_ids"]) + len(c["secret_ids"]) for c in cans], dtype=np.int32),
            "prefix_tokens": np.array([len(c["prefix_ids"]) for c in cans], dtype=np.int32),
            "extracted": m["extracted"], **{k: v for k, v in m.items() if k.startswith("extracted_k")},
            "suffix_accuracy": m["suffix_accuracy"], "loss": m["loss"],
            **{f"mi_{name}": m[name] for name in ORIENT}}


def select(extracted: np.ndarray, keep: int, seed: int) -> np.ndarray:
    """Which sequences a token file's audit keeps, (N,) bool: every extracted one, and a seeded sample of `keep`
    of the others (all of them where there are fewer)."""
    kept = np.asarray(extracted, dtype=bool).copy()
    others = np.flatnonzero(~kept)
    if len(others) > keep:
        others = np.random.default_rng(seed).choice(others, keep, replace=False)
    kept[others] = True
    return kept


def scan_file(run, cfg, tokens: TokenFile | None = None, *, device, progress: bool = True,
              log: Callable[[str], None]) -> None:
    """The audit's scan stage on run directory `run` (see the module text): measure every sequence of the token
    file `cfg.sequences` (`tokens`, already opened; None on --resume: opened again and checked against the hashes
    in audit.json), write RUN/probes/scan/, RUN/sequences.jsonl and the run's data.npz and tokenizer/."""
    from ..core.precision import arithmetic, choose
    from ..probes.memorization import MemorizationConfig, load_reference
    from ..tasks.experiment import AUDIT_FILE, RunConfig, reference_check
    from ..tasks.lm.hf import load_hf
    from ..tasks.lm.text import load_text, make_tokenizer
    text = RunConfig.from_dict(run.config, source=run.path / "config.json").data
    tok = make_tokenizer(text, [])
    if tokens is None:
        reference_check(run)
        tokens, hashes = open_file(cfg, text, tok)
        if hashes != run.read_json(AUDIT_FILE).get("sequences_sha256"):
            raise RunError(f"{cfg.sequences} is not the token file this audit started on (its files' hashes "
                           f"differ): put it back, or audit it into a new --out")
    d = run.probe_dir(SCAN)
    start = time.perf_counter()
    with run.working(SCAN, file=str(tokens.path), sequences=len(tokens)):
        if (d / "summary.json").exists():
            log(f"the scan of {tokens.path} is done: kept")
        else:
            model = load_hf(cfg.folder).to(device).eval()
            mcfg = MemorizationConfig(exposure=False, prefix_lengths=cfg.prefix_lengths, reference=cfg.reference,
                                      batch_size=cfg.batch_size, device=cfg.device)
            reference = load_reference(mcfg, device) if cfg.reference else None
            with arithmetic(choose(cfg.precision, device, model)):  # what the run's probes will compute in
                _measure(model, tokens, tok, mcfg, cfg, text, d / "parts", reference=reference, progress=progress,
                         log=log)
            del model, reference
            summary = _join(tokens, cfg, d)
            _say(summary, log)
        with np.load(d / "arrays.npz", allow_pickle=False) as z:
            kept = np.flatnonzero(z["kept"])
        _write_selected(run.path / SELECTED, tokens, kept)
        shutil.rmtree(d / "parts", ignore_errors=True)  # joined into arrays.npz
        data = load_text(text)  # the kept sequences, as `memloc audit` reads a .jsonl of ids
        run.save_arrays("data.npz", **data.arrays())
        data.tokenizer.save(run.path / "tokenizer")
        run.set_stage(SCAN, "done", file=str(tokens.path), sequences=len(tokens), kept=int(len(kept)),
                      seconds=round(time.perf_counter() - start, 1))  # this call's (a resumed scan: its rest)


def _measure(model, tokens: TokenFile, tok, mcfg, cfg, text, parts: Path, *, reference, progress: bool,
             log: Callable[[str], None]) -> None:
    """Every chunk of `cfg.chunk` sequences not already in `parts` measured and saved there atomically."""
    n, size = len(tokens), cfg.chunk
    chunks = math.ceil(n / size)
    todo = [k for k in range(chunks) if not _has_part(parts, k, k * size, min(n, (k + 1) * size))]
    if len(todo) < chunks:
        log(f"the scan of {tokens.path}: {chunks - len(todo)} of {chunks} chunks done, kept")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=n - sum(min(n, (k + 1) * size) - k * size for k in todo), desc="scan",
                   unit="seq", dynamic_ncols=True, leave=False)
    try:
        for k in todo:
            lo, hi = k * size, min(n, (k + 1) * size)
            arrays = measure_chunk(model, tokens, lo, hi, tok, mcfg, suffix_tokens=text.suffix_tokens,
                                   block=text.block_size, truncate=text.truncate, reference=reference)
            _save_part(parts, k, arrays)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()


def _save_part(parts: Path, k: int, arrays: dict[str, np.ndarray]) -> None:
    """Chunk k's results, atomically: a kill leaves the chunk whole or absent."""
    from ..core.files import save_npz
    save_npz(parts / f"{k:06d}.npz", **arrays)


def _has_part(parts: Path, k: int, lo: int, hi: int) -> bool:
    """Whether chunk k (sequences lo..hi-1) is saved: its file holds their indices (a foreign or torn one is
    measured again)."""
    try:
        with np.load(parts / f"{k:06d}.npz", allow_pickle=False) as z:
            idx = z["index"]
            return len(idx) == hi - lo and (hi == lo or (int(idx[0]) == lo and int(idx[-1]) == hi - 1))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def _join(tokens: TokenFile, cfg, d: Path) -> dict:
    """The chunks in d/parts joined a column at a time (never all columns at once) into d/arrays.npz and d/scan.csv,
    with `kept` (`select`); d/summary.json last. Returns the summary."""
    from ..core.files import atomic_write, write_json
    from ..tasks.lm.membership import ORIENT, attack_quality
    parts = [d / "parts" / f"{k:06d}.npz" for k in range(math.ceil(len(tokens) / cfg.chunk))]
    with np.load(parts[0], allow_pickle=False) as z:
        names = list(z.files)

    def column(name: str) -> np.ndarray:
        out = []
        for p in parts:
            with np.load(p, allow_pickle=False) as z:
                out.append(z[name])
        return np.concatenate(out)
    extracted, member = column("extracted"), column("member")
    kept = select(extracted, cfg.keep, cfg.seed)

    def write_arrays(p: Path) -> None:
        with zipfile.ZipFile(p, "w", allowZip64=True) as zf:  # np.savez's layout, one column in memory at a time
            for name in [*names, "kept"]:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, kept if name == "kept" else column(name), allow_pickle=False)
    atomic_write(d / "arrays.npz", write_arrays)
    atomic_write(d / f"{SCAN}.csv", lambda p: _write_csv(p, parts, names, kept))
    trained = member != 0  # members and sequences of unknown membership
    known = member >= 0
    quality = {}
    resamples = max(100, min(1000, BOOTSTRAP_WORK // max(1, int(known.sum()))))
    for name, sign in ORIENT.items():
        score = column(f"mi_{name}")
        if np.isfinite(score).any():  # ref_ratio only with a reference model
            quality[name] = attack_quality(sign * score[known], member[known] == 1, resamples=resamples)
    share = float(extracted[trained].mean()) if trained.any() else None
    summary = {"probe": SCAN, "file": str(tokens.path), "sequences": len(tokens), "members": int((member == 1).sum()),
               "non_members": int((member == 0).sum()), "unknown": int((member < 0).sum()),
               "extracted": int((extracted & trained).sum()), "extracted_share": share,
               "extracted_non_members": int((extracted & ~trained).sum()),
               "k_extractable": {}, "membership": quality, "bootstrap_resamples": resamples,
               "kept": int(kept.sum()), "keep": cfg.keep, "chunk": cfg.chunk}
    for name in names:
        if name.startswith("extracted_k"):
            v = column(name)
            sel = trained & ~np.isnan(v)
            summary["k_extractable"][name[len("extracted_k"):]] = round(float(v[sel].mean()), 6) if sel.any() \
                else None
    write_json(d / "summary.json", summary)  # last: its presence means the scan is joined
    return summary


def _write_csv(path: Path, parts: list[Path], names: list[str], kept: np.ndarray) -> None:
    """One row per sequence, a chunk at a time, rounded as the memorization probe's rows are (`canary_rows`)."""
    digits = {"suffix_accuracy": 4, "loss": 5}

    def text(name: str, v: np.ndarray) -> list:
        if name == "member":
            return ["" if x < 0 else x == 1 for x in v.tolist()]
        if name.startswith("extracted_k"):
            return ["" if x != x else x == 1 for x in v.tolist()]  # NaN: the prefix is shorter than K
        if v.dtype.kind == "f":
            return [round(x, digits.get(name, 6)) if math.isfinite(x) else "" for x in v.tolist()]
        return v.tolist()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, "kept"])
        for p in parts:
            with np.load(p, allow_pickle=False) as z:
                cols = [text(n, z[n]) for n in names]
                cols.append(kept[z["index"]].tolist())
            w.writerows(zip(*cols))


def _write_selected(path: Path, tokens: TokenFile, kept: np.ndarray) -> None:
    """RUN/sequences.jsonl: the kept sequences' ids, labels and positions in the file, atomically."""
    import json

    from ..core.files import atomic_write

    def write(p: Path) -> None:
        with open(p, "w") as f:
            for i in kept.tolist():
                member = tokens.members(i, i + 1)[0]
                f.write(json.dumps({"ids": tokens.sequences(i, i + 1)[0], "index": i,
                                    **({} if member is None else {"member": member})}) + "\n")
    atomic_write(path, write)


def _say(s: dict, log: Callable[[str], None]) -> None:
    share = "-" if s["extracted_share"] is None else f"{100 * s['extracted_share']:.2f}%"
    q = s["membership"]
    aurocs = ", ".join(f"{n} {v['auroc']:.3f}" for n, v in q.items() if v.get("auroc") is not None)
    first = next(iter(q.values()), {})
    others = s["kept"] - s["extracted"] - s["extracted_non_members"]
    log(f"scanned {s['sequences']:,} sequences of {s['file']}: {s['extracted']:,} extracted ({share} of the "
        f"{s['members'] + s['unknown']:,} members and of unknown membership); membership AUROC: "
        f"{aurocs or first.get('reason', 'not enough data')}; the run keeps the extracted ones and {others:,} others")
