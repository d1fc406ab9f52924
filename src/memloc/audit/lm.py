"""`memloc audit`: a model memloc did not train, and the user's sequences: which does it memorize, and how strongly.

The audit writes a run directory like any other (memloc's probes, `--resume`, the report work on it), whose model
is *referenced*, not copied: config.json names the folder (``--model hf:FOLDER``) and audit.json records the
content hash of its files, checked whenever the run is opened (`experiment.reference_check`). Its data are the user's
sequences, each a canary of its own (`memloc.tasks.lm.sequences`), tokenized by the model's tokenizer and kept in
data.npz. The scan is the memorization probe: per sequence, greedy extraction of its suffix (one teacher-forced
pass, exactly equivalent), k-extractability at several prefix lengths, suffix accuracy, loss, and the membership
scores (loss, zlib, Min-K%, Min-K%++, a reference model's ratio), with AUROC and TPR at 1% FPR against the
sequences' member labels. Then the removal, verified (`remove`): the extracted sequences localized with an edit
grown until they are no longer extracted at a bounded perplexity cost, the edited model exported as a plain
Hugging Face folder (RUN/edited/), and that folder, read back, scanned again (RUN/probes/removal/).
`memloc localize RUN` and `memloc export RUN --localized` work on the run like on any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import ConfigError
from ..core.options import check_ranges, ints, names, option
from ..core.precision import PRECISIONS
from ..probes.localization import METHODS
from ..tasks.experiment import AUDIT_FILE, HISTORY, REMOVAL, content_hash
from ..tasks.lm.sequences import is_token_file
from .scan import SCAN, SELECTED, scan_file


@dataclass
class AuditConfig:
    """What `memloc audit` reads and how it splits and scores the sequences."""

    model: str = option("", "the model: hf:FOLDER (a causal LM saved with save_pretrained; or just FOLDER)",
                        cli=False)
    weights: str | None = option(None, "a trained classifier's weights (.safetensors: a state dict of --model, "
                                 "--width): audit it on --dataset, the data it trained on (docs/audit.md)",
                                 metavar="FILE")
    flip_examples: int = option(50, "a classifier: examples (per kind where the noise is known) whose units are "
                                "removed until they flip", metavar="N", at_least=1)
    sequences: str = option("", "the sequences: .jsonl ({\"text\"} or {\"ids\"} or {\"prefix\", \"suffix\"}, optional "
                            "\"member\": true/false), .txt (one a line), or token ids too many to read: a .npy (N, L), "
                            "or a 1-D .npy or nanoGPT .bin with FILE.idx.npy (N + 1 offsets), scanned streaming "
                            "(docs/audit.md)", metavar="FILE")
    sequence_length: int | None = option(None, "a 1-D token file without an index: its sequences are consecutive "
                                         "windows of L tokens", metavar="L", at_least=2)
    keep: int = option(1000, "a token file: the run keeps its extracted sequences and a seeded sample of N others "
                       "(what removal, localize and the report work on)", metavar="N", at_least=0)
    chunk: int = option(4096, "a token file: sequences measured and saved at a time (a killed scan resumes from its "
                        "last saved chunk)", metavar="N", at_least=1)
    heldout: str | None = option(None, "more text the model did not train on (.jsonl or .txt): perplexity and "
                                 "non-members (default: the sequences marked \"member\": false)", metavar="FILE")
    tokenizer: str | None = option(None, "the tokenizer (hf:FOLDER; default: the model's folder)", metavar="hf:FOLDER")
    reference: str | None = option(None, "a reference model with the same tokenizer (hf:FOLDER): the membership "
                                   "score loss / reference loss", metavar="hf:FOLDER")
    suffix_tokens: int = option(50, "the suffix to extract: the last half of a sequence, at most this many tokens "
                                "(Carlini et al. 2022)", at_least=1)
    prefix_lengths: tuple[int, ...] = option((8, 16, 32), "k-extractability: the suffix from only the last K prefix "
                                             "tokens, for each K", parse=ints, metavar="K,K,...", at_least=1)
    truncate: bool = option(True, "refuse sequences longer than the model's context (default: keep their last "
                            "tokens, with a line saying how many)", negate="--no-truncate")
    checkpoints: tuple[str, ...] | None = option(None, "earlier training states of the same model, oldest first "
                                                 "(hf:FOLDER or FOLDER each; a classifier's: .safetensors files): "
                                                 "every sequence's extraction at each, and each layer rewound to each",
                                                 parse=names, metavar="DIR,DIR,...")
    remove: bool = option(True, "skip the removal stage (default: localize the extracted sequences, export the "
                          "edited model to RUN/edited/ and scan it again)", negate="--no-remove")
    method: str = option("ig", "how the removal localizes: a `memloc localize` method (integrated gradients: "
                         "one pass per layer and step, whatever the number of units)", choices=METHODS)
    until: float = option(0.1, "the removal grows its edit (units doubled from 1%) until at most this share of the "
                          "targeted sequences is extracted", metavar="SHARE", at_least=0, at_most=1)
    max_cost: float = option(0.05, "...but never past a held-out perplexity this much above the model's (relative)",
                             metavar="SHARE", above=0)
    examples: int | None = option(None, "target at most N of the extracted sequences, a seeded choice (the rest "
                                  "measure what else the edit removes; default: all)", metavar="N", at_least=1)
    seed: int = option(0, "seed of the targeted sequences' choice and the localization", at_least=0)
    precision: str = option("auto", "the arithmetic of the scan and the removal: auto (bf16 autocast on a GPU, and on "
                            "a CPU with native bf16 for models at least 512 wide; fp32 elsewhere), fp32 or bf16; the "
                            "weights stay float32, the edit and the exported folder exact (docs/audit.md); a "
                            "classifier's probes: as memloc train --precision",
                            choices=PRECISIONS)
    batch_size: int | None = option(None, "rows per pass of the scan and the removal (default: what fits the free "
                                    "memory, at most 256 on a CPU, 2048 on a GPU)", result=False, at_least=1)
    device: str = option("auto", "auto, cpu or cuda", result=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        self.prefix_lengths = tuple(sorted(set(int(k) for k in self.prefix_lengths)))

    @property
    def folder(self) -> Path:
        return _folder(self.model)

    @property
    def checkpoint_folders(self) -> list[Path]:
        return [_folder(c) for c in self.checkpoints or ()]


def _folder(name: str) -> Path:
    return Path(name[3:] if name.startswith("hf:") else name)


class Checkpoints(Mapping):
    """The audited model's training states as rewinding reads them: {1..n: checkpoint i's state dict, n + 1: the
    audited model's}, each read from its folder when asked (its files' hashes checked against the audit's record),
    the last one kept."""

    def __init__(self, folders: list[Path], hashes: list[dict], final: Path):
        self.folders, self.hashes = [*folders, final], hashes
        self._last: tuple[int, dict] | None = None

    def folder(self, epoch: int) -> Path:
        """Checkpoint `epoch`'s folder, its files checked against the audit's hashes."""
        from ..core.errors import RunError
        if not 1 <= int(epoch) <= len(self.folders):
            raise KeyError(epoch)
        folder = self.folders[int(epoch) - 1]
        if int(epoch) <= len(self.hashes) and content_hash(folder) != self.hashes[int(epoch) - 1]:
            raise RunError(f"{folder} no longer holds the checkpoint the audit hashed: audit again (--out NEW)")
        return folder

    def __getitem__(self, epoch: int) -> dict:
        from ..tasks.lm.hf import load_hf
        if self._last is None or self._last[0] != epoch:
            self._last = (epoch, load_hf(self.folder(epoch)).state_dict())
        return self._last[1]

    def __iter__(self):
        return iter(range(1, len(self.folders) + 1))

    def __len__(self) -> int:
        return len(self.folders)


def _check_memory(cfg: AuditConfig, length: int, device) -> None:
    """Refuse in one line an audit of sequences of `length` tokens that cannot fit the device's free memory
    (`memloc.core.budget.audit_need`), before anything is written."""
    from ..core import budget
    shape = budget.folder_shape(cfg.folder, block=length)
    if shape is None:
        return  # the model's own load names what is wrong with its config
    reference = budget.folder_shape(_folder(cfg.reference), block=length) if cfg.reference else None
    need = budget.audit_need(shape, batch=cfg.batch_size or 1, length=length, reference=reference,
                             checkpoints=len(cfg.checkpoints or ()), remove=cfg.remove)
    budget.check(need, device, what="this audit needs", batch_flags="--batch-size",
                 model_flags="--checkpoints (fewer)" if cfg.checkpoints else None)


def _context(folder: Path) -> int:
    """The model's context length from its config.json (max_position_embeddings or n_positions)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        n = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("n_ctx")
        return int(n) if n else 1024
    except (OSError, ValueError, TypeError, AttributeError):
        return 1024  # load_hf names what is wrong with the folder


def resumed_config(run: str | Path, **unrecorded) -> AuditConfig:
    """The settings an audit in `run` started with (its audit.json), with `unrecorded` ones (batch size, device)."""
    from ..core.runs import RunDir
    rd = RunDir.open(run)
    if not rd.has(AUDIT_FILE):
        raise ConfigError(f"{run} is not an audit (it has no {AUDIT_FILE}): --resume finishes what `memloc audit` "
                          "started; use `memloc run --resume` for a study")
    stored = rd.read_json(AUDIT_FILE).get("config")
    try:
        return AuditConfig(**{**stored, **unrecorded})
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"{rd.path / AUDIT_FILE} does not hold settings this memloc reads ({err}): start the "
                          "audit again (--out NEW)") from None


def run_audit(cfg: AuditConfig, out: str | Path | None = None, *, overwrite: bool = False, resume: bool = False,
              progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Audit `cfg.model` on `cfg.sequences` into a new run directory (see the module docstring); returns it.
    `resume`: finish the audit in `out`, its finished stages kept."""
    import time

    from .. import probes
    from ..core.runs import RunDir, exclusive
    from ..core.training import TrainConfig, resolve_device
    from ..probes.base import ProbeResult
    from ..tasks.experiment import ModelConfig, RunConfig, environment, open_run
    from ..tasks.lm.hf import load_hf
    from ..tasks.lm.text import TextConfig, load_text
    log = log or (lambda s: None)
    if not cfg.sequences:
        raise ConfigError("an audit needs --sequences FILE: the sequences to look for in the model")
    folder = cfg.folder
    device = resolve_device(cfg.device)
    stream = is_token_file(cfg.sequences)  # too many to read: scanned streaming, the few that matter kept
    if cfg.sequence_length is not None and not stream:
        raise ConfigError(f"--sequence-length cuts a 1-D token file (.npy, .bin) into windows, not {cfg.sequences}: "
                          "drop it")
    if not resume:
        model = load_hf(folder)  # a folder that is no model, or asks for code or the hub: one line, nothing written
        tok = cfg.tokenizer or f"hf:{folder}"
        block = max(8, _context(folder) - 1)  # a row is block + 1 tokens: the whole context
        out = Path(out) if out else Path("runs") / f"audit-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        corpus = str((out / SELECTED).absolute()) if stream else cfg.sequences  # a token file's: what the scan keeps
        text = TextConfig(corpus=corpus, tokenizer=tok, audit=True, audit_heldout=cfg.heldout,
                          truncate=cfg.truncate, suffix_tokens=min(cfg.suffix_tokens, block), prefix_tokens=1,
                          block_size=block, canaries=0)
        run_cfg = RunConfig(data=text, model=ModelConfig(name=f"hf:{folder}"),
                            train=TrainConfig(precision=cfg.precision), task="lm")
        if stream:  # a bad file: one line naming it and the first bad sequence, nothing written
            from ..tasks.lm.text import make_tokenizer
            from .scan import open_file
            tokenizer = make_tokenizer(text, [])
            _check_vocabulary(model, folder, tokenizer.vocab_size)
            tokens, sequences_sha256 = open_file(cfg, text, tokenizer)
            length, notes = tokens.longest - 1, tokens.notes
        else:
            data = load_text(text, device=device)  # unreadable sequences: one line naming the line, nothing written
            _check_vocabulary(model, folder, data.vocab_size)
            length, notes = int(data.x_train.shape[1]), getattr(data, "notes", ())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        del model
        _check_memory(cfg, length, device)
        for ckpt in cfg.checkpoint_folders:  # another architecture, or no model: one line, nothing written
            theirs = {k: tuple(v.shape) for k, v in load_hf(ckpt).state_dict().items()}
            if theirs != shapes:
                differ = sorted(set(theirs) ^ set(shapes)) or [k for k in shapes if theirs[k] != shapes[k]]
                raise ConfigError(f"checkpoint {ckpt} is not the audited model's architecture "
                                  f"({differ[0].removeprefix('hf.')} differs): "
                                  "pass earlier states of the same model to --checkpoints")
        for line in notes:
            log(line)
    with exclusive(out):
        if resume:
            run = RunDir.open(out)
            log(f"resuming the audit {run.path}")
        else:
            run = RunDir.create(out, overwrite=overwrite, log=log)
            run.write_json("config.json", run_cfg.to_dict())
            run.write_json(AUDIT_FILE, {"model": str(folder.resolve()), "sha256": content_hash(folder),
                                        "config": asdict(cfg),
                                        "checkpoints": [{"model": str(c.resolve()), "sha256": content_hash(c)}
                                                        for c in cfg.checkpoint_folders],
                                        **({"sequences_sha256": sequences_sha256} if stream else {})})
            run.write_json("env.json", environment(device))
            if not stream:  # a token file's: written by its scan, from the sequences it keeps
                run.save_arrays("data.npz", **data.arrays())
                data.tokenizer.save(run.path / "tokenizer")
            run.set_stage("train", "skipped", reason="an audit: the model was trained elsewhere")
        if stream and resume and run.stage(SCAN).get("status") == "done":
            log(f"the scan of {cfg.sequences} is done: kept")
        elif stream:
            scan_file(run, cfg, None if resume else tokens, device=device, progress=progress, log=log)
        loaded = open_run(run.path, device=cfg.device)
        cans = loaded.data.canaries
        members = sum(c["member"] is True for c in cans)
        non = sum(c["member"] is False for c in cans)
        log(f"run directory {run.path}: auditing {folder} on {len(cans)} sequences ({members} members, "
            f"{non} non-members, {len(cans) - members - non} unknown), device {device}")
        probe = probes.registered()["memorization"]
        if resume and (run.path / "probes" / probe.name / "summary.json").exists():
            result = ProbeResult.load(run, probe.name)
            log("the scan is done: kept")
        else:
            mcfg = probes.MemorizationConfig(exposure=False, prefix_lengths=cfg.prefix_lengths,
                                             reference=cfg.reference, batch_size=cfg.batch_size, device=cfg.device)
            result = probes.run_probe(probe, loaded, cfg=mcfg, progress=progress, log=log)
            for line in probe.describe(result) if probe.describe else []:
                log(line)
        if cfg.checkpoints and resume and run.stage(HISTORY).get("status") == "done":
            log("the checkpoints' history is done: kept")
        elif cfg.checkpoints:
            history(loaded, cfg, result, progress=progress, log=log)
        if cfg.remove and resume and run.stage(REMOVAL).get("status") in ("done", "skipped"):
            log("the removal is done: kept")
        elif cfg.remove:
            remove(loaded, cfg, result, progress=progress, log=log)
        from ..report.page import build_report
        build_report(run.path)
    return run.path




def _check_vocabulary(model, folder: Path, vocab_size: int) -> None:
    if model.shape.vocab_size < vocab_size:
        raise ConfigError(f"the model {folder} has {model.shape.vocab_size} token ids, the tokenizer "
                          f"{vocab_size}: pass the model's own tokenizer (--tokenizer hf:FOLDER)")


def _where(c: dict) -> dict:
    """Where an audited sequence came from: its position in a token file, or its line of a sequences file."""
    return {"index": c["index"]} if "index" in c else {"line": c.get("line")}


def history(loaded, cfg: AuditConfig, scan, *, progress: bool = True, log: Callable[[str], None]) -> None:
    """The audit's checkpoints stage: every sequence's extraction and loss at each checkpoint (when it became
    extractable, and whether it was forgotten) into RUN/probes/history/, then the rewinding probe (each layer of the
    audited model back to each checkpoint) into RUN/probes/rewind/."""
    import numpy as np

    from .. import probes
    from ..core.precision import arithmetic
    from ..probes.base import ProbeResult
    from ..probes.memorization import canary_measures
    from ..probes.rewinding import PROBE as REWIND
    from ..tasks.lm.hf import load_hf
    run = loaded.run
    info = run.read_json(AUDIT_FILE)
    hashes = [c["sha256"] for c in info.get("checkpoints", [])]
    folders = cfg.checkpoint_folders
    states = Checkpoints(folders, hashes, cfg.folder)
    mcfg = probes.MemorizationConfig(exposure=False, prefix_lengths=(), batch_size=cfg.batch_size, device=cfg.device)
    cans = loaded.data.canaries
    extracted = np.zeros((len(cans), len(folders) + 1), dtype=bool)
    loss = np.zeros((len(cans), len(folders) + 1))
    for i, folder in enumerate(folders):
        model = load_hf(states.folder(i + 1)).to(loaded.device).eval()
        with arithmetic(loaded.arithmetic(model)):  # the audited model's scan's
            m = canary_measures(model, loaded.data, mcfg, membership=False)
        extracted[:, i], loss[:, i] = m["extracted"], m["loss"]
        log(f"checkpoint {i + 1} ({folder}): {int(m['extracted'].sum())} of {len(cans)} sequences extracted")
    extracted[:, -1], loss[:, -1] = scan.arrays["extracted"], scan.arrays["loss"]
    trained = np.asarray(scan.arrays["trained"], dtype=bool)
    first = [int(np.argmax(row)) + 1 if row.any() else None for row in extracted]
    forgotten = extracted[:, :-1].any(1) & ~extracted[:, -1]
    labels = [str(f) for f in folders] + [str(cfg.folder)]
    rows = [{"canary": c["id"], **_where(c), "member": c.get("member"),
             **{f"extracted_{e + 1}": bool(extracted[i, e]) for e in range(len(labels))},
             "first_extracted": first[i], "forgotten": bool(forgotten[i])} for i, c in enumerate(cans)]
    summary = {"probe": HISTORY, "checkpoints": [{"epoch": e + 1, "folder": f} for e, f in enumerate(labels)],
               "extracted": [float(extracted[trained, e].mean()) if trained.any() else None
                             for e in range(len(labels))],
               "forgotten": int((forgotten & trained).sum())}
    ProbeResult(HISTORY, summary, {"extracted": extracted, "loss": loss, "trained": trained}, rows).save(run)
    run.set_stage(HISTORY, "done")
    shares = ", ".join("-" if v is None else f"{100 * v:.0f}%" for v in summary["extracted"])
    log(f"extracted at each checkpoint (the audited model last): {shares}; forgotten since: {summary['forgotten']}")
    probes.run_probe(REWIND, loaded, sources={"states": states}, overwrite=True, progress=progress, log=log)


def remove(loaded, cfg: AuditConfig, scan, *, progress: bool = True, log: Callable[[str], None]) -> None:
    """The audit's removal stage: localize the extracted sequences with `cfg.method`, the edit grown until at
    most `cfg.until` of them are extracted within `cfg.max_cost` of held-out perplexity; export the edited model to
    RUN/edited/ (a plain Hugging Face folder with the model's tokenizer); read that folder back and scan it again
    with the same measures (`scan`: the memorization result before). Writes RUN/probes/removal/."""
    import numpy as np

    from .. import probes
    from ..core.precision import arithmetic
    from ..probes.localization import PROBE as LOCALIZE
    from ..probes.localization import LocalizeConfig
    from ..study.export import export_localized
    from ..tasks.lm.hf import load_hf
    run = loaded.run
    extracted = np.asarray(scan.arrays["extracted"], dtype=bool)
    trained = np.asarray(scan.arrays["trained"], dtype=bool)
    if not (extracted & trained).any():
        log("removal: the model extracts none of the sequences: nothing to remove")
        run.set_stage(REMOVAL, "skipped", reason="no sequence is extracted")
        return
    if loaded.data.x_test.shape[0] == 0:
        log("removal: no held-out text, so the edit's perplexity cost is not measured: pass --heldout FILE (text "
            "the model did not train on) to bound it")
    lcfg = LocalizeConfig(method=cfg.method, until=cfg.until, max_cost=cfg.max_cost, examples=cfg.examples,
                          seed=cfg.seed, device=cfg.device, batch_size=cfg.batch_size)
    loc = probes.run_probe(LOCALIZE, loaded, cfg=lcfg, overwrite=True, progress=progress, log=log)
    edited_dir = export_localized(loaded, run.path / "edited", overwrite=True)
    model = load_hf(edited_dir).to(loaded.device).eval()  # what the user gets, read back from disk
    mcfg = probes.MemorizationConfig(exposure=False, prefix_lengths=cfg.prefix_lengths, reference=cfg.reference,
                                     batch_size=cfg.batch_size, device=cfg.device)
    with arithmetic(loaded.arithmetic(model)):  # the scan before's, whatever "auto" would choose for this model
        after = probes.run_probe(probes.registered()["memorization"], model, loaded.data, cfg=mcfg)
    result = removal_result(loaded.data, scan, after, loc)
    result.save(run)
    run.set_stage(REMOVAL, "done")
    from ..report.sections.audit import describe_removal
    for line in describe_removal(result):
        log(line)


def removal_result(data, before, after, loc):
    """The removal's verification: per sequence, the measures before and after the edit; in summary, the targeted
    sequences' extraction, the other memorized ones', held-out perplexity and each membership score's AUROC, before
    and after."""
    import numpy as np

    from ..probes.base import ProbeResult
    cans = data.canaries
    targeted = np.zeros(len(cans), dtype=bool)
    canary_of = data.canary.cpu().numpy()
    targeted[canary_of[np.asarray(loc.arrays["sequences"], dtype=np.int64)]] = True
    ext_b = np.asarray(before.arrays["extracted"], dtype=bool)
    ext_a = np.asarray(after.arrays["extracted"], dtype=bool)
    trained = np.asarray(before.arrays["trained"], dtype=bool)
    others = ext_b & trained & ~targeted

    def share(v, sel):
        return float(v[sel].mean()) if sel.any() else None
    ppl_b, ppl_a = before.summary.get("heldout_perplexity"), after.summary.get("heldout_perplexity")
    mem_b, mem_a = before.summary.get("membership") or {}, after.summary.get("membership") or {}
    details = loc.summary.get("details") or {}
    summary = {
        "probe": REMOVAL, "method": loc.summary["method"], "units": loc.summary["units"],
        "zeroed": loc.summary["zeroed"], "until": details.get("until"), "max_cost": details.get("max_cost"),
        "reached": details.get("reached"), "sweep": details.get("sweep"), "edited": "edited",
        "targeted": int(targeted.sum()), "targeted_extracted_before": share(ext_b, targeted),
        "targeted_extracted_after": share(ext_a, targeted),
        "other_memorized": int(others.sum()), "other_memorized_extracted_after": share(ext_a, others),
        "not_extracted_now_extracted": int((ext_a & ~ext_b).sum()),
        "heldout_perplexity_before": ppl_b, "heldout_perplexity_after": ppl_a,
        "perplexity_cost": None if not (ppl_b and ppl_a) else round(ppl_a / ppl_b - 1.0, 6),
        "membership": {name: {"auroc_before": q.get("auroc"), "auroc_after": (mem_a.get(name) or {}).get("auroc"),
                              "ci_after": (mem_a.get(name) or {}).get("auroc_ci")}
                       for name, q in mem_b.items()},
    }
    rows = []
    for i, c in enumerate(cans):
        rows.append({"canary": c["id"], **_where(c), "member": c.get("member"), "targeted": bool(targeted[i]),
                     "extracted_before": bool(ext_b[i]), "extracted_after": bool(ext_a[i]),
                     "suffix_accuracy_before": round(float(before.arrays["suffix_accuracy"][i]), 4),
                     "suffix_accuracy_after": round(float(after.arrays["suffix_accuracy"][i]), 4),
                     "loss_before": round(float(before.arrays["loss"][i]), 5),
                     "loss_after": round(float(after.arrays["loss"][i]), 5)})
    arrays = {"targeted": targeted, "extracted_before": ext_b, "extracted_after": ext_a,
              **{f"{k}_after": np.asarray(v) for k, v in after.arrays.items()
                 if k.startswith("mi_") or k in ("loss", "suffix_accuracy")}}
    return ProbeResult(REMOVAL, summary, arrays, rows)
