"""`memloc audit --weights FILE.safetensors --dataset DATA`: a classifier memloc did not train, on its training data.

The user's trained classifier (a memloc registry model: `--model`, `--width`; its state dict saved with safetensors)
and the data it trained on (`--dataset` and the data flags of `memloc train`: `--labels` for the labels it saw,
`--noise-mask` for the examples known to be mislabeled). Weights are data, never code: only .safetensors is read
(a pickle, .pt / .pth / .bin / .ckpt, is refused with the line that converts it), and no code of the user's runs.

The audit writes a run directory like `memloc train`'s, so every probe command and the report work on it: the
weights are copied in as its checkpoints (a classifier's weights are small; the run is then whole on its own and
audit.json keeps each file's path and sha256), earlier training states from `--checkpoints A,B,...` (oldest first)
as epochs 1..K-1 and the audited model as epoch K, each evaluated (metrics.jsonl) and its per-example loss, margin
and correctness recorded (examples.npz: what detection's scores read, from eval-mode passes of the states given
rather than from training passes). Then the stages, each kept when done (`--resume`):

- depth: each example's prediction depth (Baldock et al.), the layer from which the model has decided it;
- flipping: units removed until each of a seeded sample of examples flips (clean and noisy where the noise is
  known; otherwise a sample of all);
- detection: every example ranked as a suspected mislabel (final loss and margin, with the checkpoints also mean
  loss, AUM and forgetting; units to flip; prediction depth), with AUROC where the noise is known;
- rewinding (with checkpoints): each layer back to each earlier state;
- the report, whose first screen says which examples the model memorizes and where.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.errors import ConfigError, RunError
from ..tasks.experiment import AUDIT_FILE, file_sha256

CLASSIFIER = "classifier"  # audit.json's "kind" of a classifier audit (an LM audit has none)
STAGES = ("depth", "flipping", "detection", "rewinding")
PICKLES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel's and torch.compile's wrappers


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A classifier's state dict from a .safetensors file (never a pickle), the wrapper prefixes DDP and
    torch.compile add removed; one line (ConfigError) for anything else."""
    p = Path(path)
    if p.suffix.lower() in PICKLES:
        raise ConfigError(f"{p} is a pickle, which can run code when read, and memloc never unpickles a file: save "
                          "the weights with safetensors (safetensors.torch.save_file(model.state_dict(), "
                          "'model.safetensors')) and pass that file")
    if not p.is_file():
        raise ConfigError(f"{p} is not a file: pass the classifier's weights as a .safetensors file (--weights)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{p} is not a readable .safetensors file ({str(err).splitlines()[0][:120]}): save the "
                          "weights with safetensors.torch.save_file(model.state_dict(), FILE)") from None
    if not state:
        raise ConfigError(f"{p} holds no tensors: pass the classifier's state dict saved with safetensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _fit(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, model_words: str) -> None:
    """Load `state` into `model`, or one line naming the first difference and the flags that choose the model."""
    from ..core.files import state_mismatch
    detail = state_mismatch(model, state)
    if detail:
        raise ConfigError(f"{path} does not hold the weights of {model_words} ({detail}): pass the --model and "
                          "--width it was trained as (memloc models lists them), and the --dataset it trained on "
                          "(its input shape and classes decide the layers)")
    model.load_state_dict(state, strict=False)


def _records(model: torch.nn.Module, data, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each training example's loss, margin and correctness against its given label: one eval-mode pass."""
    from ..core.inference import predict
    from ..core.tasks import task_of
    task = task_of(data)
    out = predict(model, data.x_train, inputs=task.inputs, batch_size=batch_size)
    y = task.targets("given").to(out.device)
    return (task.loss(out, y).float().cpu().numpy(), task.margin(out, y).float().cpu().numpy(),
            task.match(task.predict(out), y).cpu().numpy())


def run_classifier_audit(cfg, run_cfg, out: str | Path | None = None, *, overwrite: bool = False,
                         resume: bool = False, progress: bool = True,
                         log: Callable[[str], None] | None = None) -> Path:
    """Audit the classifier in `cfg.weights` (an `audit.AuditConfig`) on `run_cfg`'s data (a classification
    `RunConfig`: its data and model sections) into a new run directory, or finish the one in `out` (`resume`)."""
    import time

    from ..core.runs import RunDir, exclusive
    from ..core.tasks import task_of
    from ..core.training import evaluate, resolve_device
    from ..study.run import headline
    from ..tasks.experiment import _choose_model, _create_run, _fresh_model, load_data, open_run
    log = log or (lambda s: None)
    device = resolve_device(cfg.device)
    paths = [Path(c) for c in cfg.checkpoints or ()] + [Path(cfg.weights)]
    if not resume:
        states = [read_weights(p) for p in paths]  # a pickle, a missing or unreadable file: one line, nothing written
        run_cfg.model = run_cfg.model.resolved(device, run_cfg.task)
        data = load_data(run_cfg, device)  # bad data: one line, nothing written
        # what was chosen for the model (not its training recipe: nothing trains here)
        chosen = [line for line in _choose_model(run_cfg, data, device) if not line.startswith("training:")]
        run_cfg.train = replace(run_cfg.train, epochs=len(paths), gradient_accounting=False)
        model = _fresh_model(run_cfg, data)
        words = f"{run_cfg.model.name} (width {run_cfg.model.width:g}) for {data.name}"
        for p, state in zip(paths, states):  # another architecture: one line, nothing written
            _fit(model, state, p, words)
        out = Path(out) if out else Path("runs") / f"audit-{Path(cfg.weights).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    with exclusive(out):
        if resume:
            run = RunDir.open(out)
            if run.stage("train").get("status") != "done":
                raise RunError(f"{run.path} was stopped before the model's states were copied in: start the audit "
                               f"again (the same command with --out {run.path} --overwrite)")
            log(f"resuming the audit {run.path}")
        else:
            run = _create_run(run_cfg, out, data, device, overwrite=overwrite, log=log)
            for line in (*getattr(data, "notes", ()), *chosen):
                log(line)
            fix = "check the weight files"
            run.write_json(AUDIT_FILE, {"kind": CLASSIFIER, "model": str(Path(cfg.weights).resolve()),
                                        "sha256": file_sha256(Path(cfg.weights), fix=fix), "copied": True,
                                        "config": asdict(cfg),
                                        "checkpoints": [{"model": str(p.resolve()), "sha256": file_sha256(p, fix=fix)}
                                                        for p in paths[:-1]]})
            metrics, loss, margin, correct = [], [], [], []
            for epoch, (p, state) in enumerate(zip(paths, states), start=1):
                model.load_state_dict(state, strict=False)  # each fitted above
                model = model.to(device).eval()
                run.save_checkpoint(epoch, model)
                metrics.append({"epoch": epoch, "source": str(p), **evaluate(model, data)})
                ls, mg, ok = _records(model, data, run_cfg.train.eval_batch_size)
                loss.append(ls), margin.append(mg), correct.append(ok)
            run.write_metrics(metrics)
            run.save_arrays("examples.npz", loss=np.stack(loss).astype(np.float16),
                            margin=np.stack(margin).astype(np.float16),
                            correct_bits=np.packbits(np.stack(correct), axis=1),
                            num_examples=np.array(len(correct[0])))
            run.set_stage("train", "done", epochs=len(paths), last_checkpoint=len(paths),
                          reason="an audit: the model was trained elsewhere; its states were copied in")
        loaded = open_run(run.path, device=cfg.device)
        task = task_of(loaded.data)
        mask = task.kind_mask(task.memorized_kind)  # None: the noise is unknown
        noisy = None if mask is None else int(mask.sum())
        m = run.read_metrics()[-1]
        log(f"run directory {run.path}: auditing {cfg.weights} ({loaded.config.model.name}) on {loaded.data.name}, "
            f"{loaded.data.num_train} training examples (" + ("noise unknown" if noisy is None else
                                                           f"{noisy} known noisy") + f"), device {device}")
        if noisy is None:
            log(f"the audited model: {100 * m['clean_train_acc']:.1f}% of the training examples predicted as labelled "
                f"(nothing is known to be mislabeled), test {100 * (m.get('test_acc') or 0):.1f}%")
        else:
            log(headline("train", m).replace("train: the model ends at", "the audited model: at", 1))
        for stage in STAGES:
            if stage == "rewinding" and len(loaded.epochs()) < 2:
                continue
            if resume and run.stage(stage).get("status") == "done":
                log(f"stage {stage}: done, kept")
                continue
            result = _stage(stage, loaded, cfg, bool(noisy), progress=progress, log=log)
            line = headline(stage, result)
            if line:
                log(line)
        from ..report.page import build_report
        build_report(run.path)
    return run.path


def _stage(stage: str, loaded, cfg, noisy: bool, *, progress: bool, log: Callable[[str], None]):
    """One stage of the audit (`noisy`: some examples are known to be mislabeled)."""
    from .. import probes
    if stage == "depth":
        return probes.prediction_depth(loaded, cfg=probes.DepthConfig(seed=cfg.seed, device=cfg.device),
                                       progress=progress, log=log)
    if stage == "flipping":
        n = loaded.data.num_train
        if noisy:
            fc = probes.FlipConfig(examples=cfg.flip_examples, kinds=("clean", "noisy"), seed=cfg.seed,
                                   device=cfg.device, given=())
        else:  # nothing known to be noisy: a seeded sample of every example
            pick = np.random.default_rng(cfg.seed).choice(n, size=min(cfg.flip_examples, n), replace=False)
            fc = probes.FlipConfig(indices=tuple(sorted(int(i) for i in pick)), kinds=(), seed=cfg.seed,
                                   device=cfg.device, given=())
        return probes.flip(loaded, cfg=fc, overwrite=True, progress=progress, log=log)
    if stage == "detection":
        return probes.detect(loaded, cfg=probes.DetectConfig(device=cfg.device),
                             overwrite=True, progress=progress, log=log)
    if stage == "rewinding":
        return probes.rewind(loaded, cfg=probes.RewindConfig(device=cfg.device), progress=progress, log=log)
    raise ValueError(f"unknown audit stage {stage!r}")
