"""`memloc audit`: a model memloc did not train, and the user's sequences: which does it memorize, and how strongly.

The audit writes a run directory like any other (memloc's probes, `--resume`, the report work on it), whose model
is *referenced*, not copied: config.json names the folder (``--model hf:FOLDER``) and audit.json records the
content hash of its files, checked whenever the run is opened (`experiment.reference_check`). Its data are the user's
sequences, each a canary of its own (`memloc.lm.sequences`), tokenized by the model's tokenizer and kept in
data.npz. The scan is the memorization probe: per sequence, greedy extraction of its suffix (one teacher-forced
pass, exactly equivalent), k-extractability at several prefix lengths, suffix accuracy, loss, and the membership
scores (loss, zlib, Min-K%, Min-K%++, a reference model's ratio), with AUROC and TPR at 1% FPR against the
sequences' member labels. `memloc localize RUN` and `memloc export RUN --localized` then find and remove where.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .experiment import AUDIT_FILE, content_hash
from .options import check_ranges, ints, option


@dataclass
class AuditConfig:
    """What `memloc audit` reads and how it splits and scores the sequences."""

    model: str = option("", "the model: hf:FOLDER (a causal LM saved with save_pretrained; or just FOLDER)",
                        cli=False)
    sequences: str = option("", "the sequences: .jsonl ({\"text\"} or {\"ids\"} or {\"prefix\", \"suffix\"}, optional "
                            "\"member\": true/false) or .txt (one a line)", metavar="FILE")
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
    batch_size: int = option(16, "scan batch size", result=False, at_least=1)
    device: str = option("auto", "auto, cpu or cuda", result=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        self.prefix_lengths = tuple(sorted(set(int(k) for k in self.prefix_lengths)))

    @property
    def folder(self) -> Path:
        return Path(self.model[3:] if self.model.startswith("hf:") else self.model)


def _context(folder: Path) -> int:
    """The model's context length from its config.json (max_position_embeddings or n_positions)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        n = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("n_ctx")
        return int(n) if n else 1024
    except (OSError, ValueError, TypeError, AttributeError):
        return 1024  # load_hf names what is wrong with the folder


def run_audit(cfg: AuditConfig, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None) -> Path:
    """Audit `cfg.model` on `cfg.sequences` into a new run directory (see the module docstring); returns it."""
    import time

    from . import probes
    from .experiment import ModelConfig, RunConfig, environment, open_run
    from .lm.hf import load_hf
    from .lm.text import TextConfig, load_text
    from .runs import RunDir, exclusive
    from .training import TrainConfig, resolve_device
    log = log or (lambda s: None)
    if not cfg.sequences:
        raise ConfigError("an audit needs --sequences FILE: the sequences to look for in the model")
    folder = cfg.folder
    model = load_hf(folder)  # a folder that is no model, or asks for code or the hub: one line, nothing written
    tok = cfg.tokenizer or f"hf:{folder}"
    block = max(8, _context(folder) - 1)  # a row is block + 1 tokens: the whole context
    text = TextConfig(corpus=cfg.sequences, tokenizer=tok, audit=True, audit_heldout=cfg.heldout,
                      truncate=cfg.truncate, suffix_tokens=min(cfg.suffix_tokens, block), prefix_tokens=1,
                      block_size=block, canaries=0)
    run_cfg = RunConfig(data=text, model=ModelConfig(name=f"hf:{folder}"), train=TrainConfig(), task="lm")
    device = resolve_device(cfg.device)
    data = load_text(text, device=device)  # unreadable sequences: one line with the line number, nothing written
    if model.shape.vocab_size < data.vocab_size:
        raise ConfigError(f"the model {folder} has {model.shape.vocab_size} token ids, the tokenizer "
                          f"{data.vocab_size}: pass the model's own tokenizer (--tokenizer hf:FOLDER)")
    del model
    for line in getattr(data, "notes", ()):
        log(line)
    out = Path(out) if out else Path("runs") / f"audit-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with exclusive(out):
        run = RunDir.create(out, overwrite=overwrite, log=log)
        run.write_json("config.json", run_cfg.to_dict())
        run.write_json(AUDIT_FILE, {"model": str(folder.resolve()), "sha256": content_hash(folder),
                                    "config": asdict(cfg)})
        run.write_json("env.json", environment(device))
        run.save_arrays("data.npz", **data.arrays())
        data.tokenizer.save(run.path / "tokenizer")
        run.set_stage("train", "skipped", reason="an audit: the model was trained elsewhere")
        members = sum(c["member"] is True for c in data.canaries)
        non = sum(c["member"] is False for c in data.canaries)
        log(f"run directory {run.path}: auditing {folder} on {len(data.canaries)} sequences ({members} members, "
            f"{non} non-members, {len(data.canaries) - members - non} unknown), device {device}")
        loaded = open_run(run.path, device=cfg.device)
        mcfg = probes.MemorizationConfig(exposure=False, prefix_lengths=cfg.prefix_lengths,
                                         reference=cfg.reference, batch_size=cfg.batch_size, device=cfg.device)
        probe = probes.registered()["memorization"]
        result = probes.run_probe(probe, loaded, cfg=mcfg, progress=progress, log=log)
        for line in probe.describe(result) if probe.describe else []:
            log(line)
        from .report import build_report
        build_report(run.path)
    return run.path
