"""The public Python API for your own model and data: thin entry points over the library.

Each probe is one function that takes either a run directory (made by `memloc
train` or :func:`memloc.run_training`) or your own trained ``nn.Module`` plus a
:class:`~memloc.data.Dataset`, and returns a :class:`~memloc.probes.base.ProbeResult`
(``result.save(memloc.RunDir.create(path))`` writes it; ``ProbeResult.load(run,
probe)`` reads it back).

What each probe needs beyond the trained model:

=============  ===================================================================
flip           nothing: works on any trained model
retrain        the initialisation (``init_state``: the state dict before training)
rewind         training history: per-epoch states (``states``: a RunDir that
               :func:`train` wrote checkpoints into, or ``{epoch: state_dict}``)
detect         nothing for the final loss and margin (one eval pass); training
               history (``history`` from :func:`train`, or a RunDir) for AUM,
               forgetting, first epoch learned and mean loss
=============  ===================================================================

Before any long work every entry point checks that the model has conv or linear
layers, that it takes the data's input shape, and that named layers exist; a
bad input raises a :class:`~memloc.errors.MemlocError` subclass with one line
naming the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import Dataset
from .errors import ConfigError, DataError, RunError
from .models import Layer, check_input, layers as find_layers, select_layers
from .probes.base import ProbeResult
from .runs import RunDir, exclusive
from .training import History, TrainConfig

ArrayLike = Any  # torch.Tensor or numpy array

__all__ = ["wrap_data", "from_torch_dataset", "prepare", "train", "flip", "rewind", "retrain", "detect", "build_report"]


# ----------------------------------------------------------------------------- data

def _as_tensor(a: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    try:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    except (TypeError, ValueError) as err:
        raise DataError(f"{what} is not an array or tensor ({err}): pass a numpy array or torch tensor") from None


def _images(x: ArrayLike, what: str) -> torch.Tensor:
    x = _as_tensor(x, what)
    if x.dim() < 2:
        raise DataError(f"{what} has shape {tuple(x.shape)}; expected (N, C, H, W) images or (N, F) features")
    if x.dtype == torch.uint8 or x.dtype == torch.bool:
        return x.to(torch.uint8).contiguous() if x.dtype == torch.uint8 else x.float().contiguous()
    if not x.is_floating_point():
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise DataError(f"{what} holds integers outside 0..255: pass uint8 images or floats in [0, 1]")
        return x.to(torch.uint8).contiguous()  # 8-bit intensities in a wider integer type
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} contains NaN or infinite values: clean the data first")
    # memloc normalises images itself (mean 0.5, std 0.5): already-normalised or 0..255 floats would be wrong
    if x.dim() == 4 and x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
        raise DataError(f"{what} float images range {float(x.min()):.3g}..{float(x.max()):.3g}: pass raw images, "
                        "floats in [0, 1] or uint8 0..255 (memloc normalises them itself)")
    return x.contiguous()


def _labels(y: ArrayLike, n: int, what: str) -> torch.Tensor:
    y = _as_tensor(y, what)
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{what} has shape {tuple(y.shape)} but there are {n} examples: pass one label per example")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise DataError(f"{what} holds non-integer values: pass class indices 0..K-1")
    return y.long()


def _mask(m: ArrayLike, n: int, what: str) -> torch.Tensor:
    m = _as_tensor(m, what)
    if m.dim() != 1 or len(m) != n:
        raise DataError(f"{what} has length {len(m) if m.dim() else 0} but there are {n} training examples: "
                        "pass one entry per training example, in the same order")
    if not bool(((m == 0) | (m == 1)).all()):
        raise DataError(f"{what} holds values other than 0/1 (True/False): pass a boolean mask")
    return m.bool()


def wrap_data(x_train: ArrayLike, y_train: ArrayLike, x_test: ArrayLike | None = None, y_test: ArrayLike | None = None,
              *, noise_mask: ArrayLike | None = None, true_labels: ArrayLike | None = None,
              rare_mask: ArrayLike | None = None, num_classes: int | None = None, name: str = "custom",
              device: torch.device | str = "cpu") -> Dataset:
    """Your tensors (or numpy arrays) as a memloc :class:`Dataset`.

    x_train: (N, C, H, W) images, uint8 in 0..255 or float in [0, 1] (memloc
    normalises them with mean 0.5, std 0.5), or (N, F) features for a model that
    takes vectors; y_train: (N,) the *given* labels (possibly noisy). x_test,
    y_test: (M, ...) and (M,), optional (empty when left out).

    The noise is known when `noise_mask` (N,) bool (1 = noisy) or `true_labels`
    (N,) is given (the mask is then ``true_labels != y_train``); otherwise the
    noisy examples are unknown (``noise_known`` False): detection then ranks
    only, and retraining (which trains on the clean examples) refuses.
    `rare_mask` (N,) marks rare examples. `num_classes` defaults to the largest
    label + 1.
    """
    x_tr = _images(x_train, "x_train")
    n = len(x_tr)
    if n == 0:
        raise DataError("x_train holds no examples")
    y_tr = _labels(y_train, n, "y_train")
    if (x_test is None) != (y_test is None):
        raise DataError("pass both x_test and y_test, or neither")
    if x_test is None:
        x_te, y_te = x_tr[:0].clone(), y_tr[:0].clone()
    else:
        x_te = _images(x_test, "x_test")
        y_te = _labels(y_test, len(x_te), "y_test")
        if tuple(x_te.shape[1:]) != tuple(x_tr.shape[1:]):
            raise DataError(f"x_test examples have shape {tuple(x_te.shape[1:])} but x_train examples "
                            f"{tuple(x_tr.shape[1:])}: both splits must have the same shape")
        if x_te.dtype != x_tr.dtype:  # one uint8 split and one float split: both to float in [0, 1]
            x_tr, x_te = (t.float() / 255.0 if t.dtype == torch.uint8 else t for t in (x_tr, x_te))
    y_true = y_tr.clone()
    if true_labels is not None:
        y_true = _labels(true_labels, n, "true_labels")
    top = int(max(y_tr.max(), y_true.max(), y_te.max() if len(y_te) else 0))
    if num_classes is None:
        num_classes = top + 1
    if num_classes < 2:
        raise DataError(f"num_classes is {num_classes}: a classification dataset needs at least 2 classes")
    low = int(min(y_tr.min(), y_true.min(), y_te.min() if len(y_te) else 0))
    if low < 0 or top >= num_classes:
        raise DataError(f"labels must lie in 0..{num_classes - 1} but range {low}..{top}: "
                        "fix the labels or num_classes")
    if noise_mask is not None:
        is_noisy = _mask(noise_mask, n, "noise_mask")
        if true_labels is not None and not bool((is_noisy == (y_true != y_tr)).all()):
            raise DataError("noise_mask disagrees with true_labels != y_train: pass one of them")
    else:
        is_noisy = y_true != y_tr
    noise_known = noise_mask is not None or true_labels is not None
    is_rare = _mask(rare_mask, n, "rare_mask") if rare_mask is not None else torch.zeros(n, dtype=torch.bool)
    ds = Dataset(name=name, x_train=x_tr, y_train=y_tr, y_true=y_true, is_noisy=is_noisy, is_rare=is_rare,
                 x_test=x_te, y_test=y_te, num_classes=int(num_classes), noise_known=noise_known,
                 class_names=[str(k) for k in range(num_classes)], source_index=np.arange(n))
    return ds.to(device)


def _materialize(ds: Any, what: str, max_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{what} has no length: pass a map-style torch Dataset "
                        "(with __len__ and __getitem__)") from None
    if n > max_examples:
        raise DataError(f"{what} has {n} examples, more than max_examples={max_examples}: memloc holds the data as "
                        "tensors, so pass a subset or raise max_examples")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{what}[{i}] is not an (input, label) pair: wrap the dataset so it returns (x, y)")
        x, y = item[0], item[1]
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
            # PIL images and HWC arrays come as (H, W[, C]) uint8: to (C, H, W)
            x = torch.from_numpy(np.ascontiguousarray(x[None] if x.ndim == 2 else x.transpose(2, 0, 1)))
        xs.append(x)
        ys.append(int(y))
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"{what} holds inputs of different shapes ({sorted(shapes)[:3]}): resize them to one shape")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def from_torch_dataset(train_set: Any, test_set: Any | None = None, *, noise_mask: ArrayLike | None = None,
                       true_labels: ArrayLike | None = None, num_classes: int | None = None,
                       max_examples: int = 200_000, name: str = "custom",
                       device: torch.device | str = "cpu") -> Dataset:
    """A map-style ``torch.utils.data.Dataset`` of (x, y) pairs, read once into tensors (see :func:`wrap_data`).

    Items may be tensors (C, H, W) (e.g. after ``ToTensor()``), or PIL images /
    arrays (H, W[, C]). More than `max_examples` examples in a split fail
    before anything is read.
    """
    x_tr, y_tr = _materialize(train_set, "the training dataset", max_examples)
    x_te = y_te = None
    if test_set is not None:
        x_te, y_te = _materialize(test_set, "the test dataset", max_examples)
    return wrap_data(x_tr, y_tr, x_te, y_te, noise_mask=noise_mask, true_labels=true_labels, num_classes=num_classes,
                     name=name, device=device)


# ----------------------------------------------------------------------------- models

def prepare(model: nn.Module, data: Dataset, *, layers: Sequence[str] | None = None) -> list[Layer]:
    """Check that `model` fits `data` and return its layers (or the named ones); quick, before any long work.

    Records the data's input shape on the model as ``model.input_shape`` (as
    memloc's own models carry it), so that :func:`memloc.layers` finds the
    layers by tracing a forward pass, in forward order, for any architecture.
    Raises ConfigError for a model without conv/linear layers, a model that
    cannot take the data's shape or class count, and unknown layer names.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch nn.Module, got {type(model).__name__}")
    if not isinstance(data, Dataset):
        raise DataError(f"expected a memloc Dataset, got {type(data).__name__}: "
                        "wrap your tensors with memloc.wrap_data")
    if not any(True for _ in model.parameters()):
        raise ConfigError("the model has no parameters, so no conv or linear layers: memloc probes units of conv "
                          "and linear layers")
    shape = tuple(data.input_shape)
    check_input(model, shape)
    model.input_shape = shape
    all_layers = find_layers(model)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, device=dev))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != data.num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model's output is {got} for a batch of 2, but the data has {data.num_classes} "
                          f"classes: the model must return logits of shape (batch, {data.num_classes})")
    return select_layers(all_layers, list(layers) if layers else None)


def train(model: nn.Module, data: Dataset, cfg: TrainConfig | None = None, *, run: RunDir | str | Path | None = None,
          progress: bool = False, log: Callable[[str], None] | None = None, **options: Any) -> History:
    """Train `model` on `data` with the paper's recipe (see :class:`TrainConfig`; `options` override it).

    Returns the :class:`History`: ``metrics`` (one dict per epoch), ``records``
    (loss, margin (E, N) float16, correct (E, N) bool: training history for
    :func:`detect`) and ``gradients`` (gradient accounting, (layers, epochs)).
    With `run` (a RunDir, or a path for a new one), every epoch's checkpoint
    (epoch 0 = initialisation) and the records are written there: what
    :func:`rewind` and :func:`retrain` need. The model is moved to the device.
    """
    from . import training
    cfg = _config(TrainConfig, cfg, options)
    prepare(model, data)
    if run is None:
        return training.train(model, data, cfg, progress=progress, log=log)
    with exclusive(run.path if isinstance(run, RunDir) else run):  # one writer per run for the whole training
        if not isinstance(run, RunDir):
            run = RunDir.create(run)
        if not run.has("config.json"):  # a run of memloc's own (run_training) keeps its files
            run.save_arrays("data.npz", **data.arrays())
            run.write_json("config.json", {"data": {"dataset": data.name, "noise": None},
                                           "model": {"name": type(model).__name__, "width": None},
                                           "train": {k: v for k, v in vars(cfg).items()}, "source": "python api"})
        with run.working("train"):
            return training.train(model, data, cfg, run=run, progress=progress, log=log)


def _config(cls, cfg, options: dict):
    """`cfg` with `options` applied over it, or a fresh `cls(**options)` when no config is given."""
    from dataclasses import replace
    if cfg is None:
        return cls(**options)
    return replace(cfg, **options) if options else cfg


def _is_run(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and (isinstance(obj, (str, Path, RunDir)) or hasattr(obj, "run"))


def _run_path(obj: Any) -> Any:
    return obj.path if isinstance(obj, RunDir) else obj


def _need_data(data: Any, probe: str) -> Dataset:
    if data is None:
        raise DataError(f"{probe} on a model needs its data: pass the Dataset the model was trained on "
                        "(memloc.wrap_data(...) or memloc.load_data(...))")
    return data


# ----------------------------------------------------------------------------- probes

def flip(model: nn.Module | str | Path | RunDir, data: Dataset | None = None, cfg: Any = None, *,
         progress: bool = False, log: Callable[[str], None] | None = None, **options: Any) -> ProbeResult:
    """Greedy unit removal (the paper's neuron flipping) on any trained model, or on a run directory.

    With a model: `data` is its training data; `cfg` a :class:`FlipConfig` or
    `options` its fields (e.g. ``examples=20, kinds=("noisy",), layers=[...]``).
    Result arrays (E examples): ``index`` (E,), ``num_units`` (E,), ``flipped``
    (E,), ``unit_layer`` / ``unit_index`` (E, cap), ``layer_counts`` (E, L).
    With a run directory: the same as ``memloc flip RUN`` (saves into the run).
    """
    from .probes import flipping
    cfg = _config(flipping.FlipConfig, cfg, options)
    if _is_run(model):
        return flipping.flip(_run_path(model), cfg, progress=progress, log=log)
    data = _need_data(data, "flip")
    prepare(model, data, layers=cfg.layers)
    return flipping.flip_units(model, data, cfg, progress=progress, log=log)


def _states_of(states: Any) -> tuple[Any, list[int]]:
    if isinstance(states, (str, Path)):
        states = RunDir.open(states)
    if isinstance(states, RunDir):
        saved = states.saved_epochs()
        if len(saved) < 2:
            raise RunError(f"rewinding needs per-epoch checkpoints and {states.path} has {len(saved)}: "
                           "train with memloc.train(..., run=PATH)")
        return states.load_checkpoint, saved
    if isinstance(states, Mapping):
        if not states:
            raise ConfigError("states holds no epochs: pass {epoch: state_dict} with at least one epoch")
        return states, sorted(int(e) for e in states)
    raise ConfigError(f"states must be a RunDir, a run path or {{epoch: state_dict}}, not {type(states).__name__}")


def rewind(model: nn.Module | str | Path | RunDir, data: Dataset | None = None, states: Any = None, *,
           epochs: Sequence[int] | None = None, layers: Sequence[str] | None = None, keep_bn_stats: bool = False,
           batch_size: int = 1024, progress: bool = False, **run_options: Any) -> ProbeResult:
    """Layer rewinding: each layer back to each earlier epoch inside the final model. Needs training history.

    With a model: `states` is the history, a RunDir (or path) that
    :func:`train` wrote checkpoints into, or ``{epoch: state_dict}``; `epochs`
    picks some of them (default all). Result arrays: ``accuracy`` (layers,
    epochs, subsets) with subsets train/clean/noisy/rare/test, ``layer_names``,
    ``epochs``. With a run directory made by ``memloc train``: the same as
    ``memloc rewind RUN`` (saves into the run; `run_options` e.g. ``every=2``).
    """
    from .probes import rewinding
    if _is_run(model):
        return rewinding.rewind(_run_path(model), layers=layers, epochs=epochs, keep_bn_stats=keep_bn_stats,
                                batch_size=batch_size, progress=progress, **run_options)
    data = _need_data(data, "rewind")
    if states is None:
        raise RunError("rewinding needs training history: pass states= a RunDir that memloc.train(..., run=PATH) "
                       "wrote per-epoch checkpoints into, or {epoch: state_dict}")
    get, saved = _states_of(states)
    prepare(model, data, layers=layers)
    if epochs is not None:
        missing = [e for e in epochs if e not in saved]
        if missing:
            raise RunError(f"epoch {missing[0]} is not in the states: they hold epochs {saved}")
    return rewinding.rewind_model(model, data, get, epochs=list(epochs) if epochs is not None else saved,
                                  layers=layers, keep_bn_stats=keep_bn_stats, batch_size=batch_size,
                                  progress=progress)


def retrain(model: nn.Module | str | Path | RunDir, data: Dataset | None = None, init_state: Any = None,
            cfg: Any = None, *, layers: Sequence[str] | None = None, progress: bool = False,
            **options: Any) -> ProbeResult:
    """Layer retraining: each layer reset to its initialisation and trained alone on the clean examples.

    With a model: `init_state` is the initialisation, the state dict before
    training (``copy.deepcopy(model.state_dict())`` before :func:`train`) or a
    RunDir holding the epoch-0 checkpoint; `cfg` a :class:`RetrainConfig` or
    `options` its fields (e.g. ``epochs=20``). Needs the noisy examples known
    (``data.noise_known``). Result arrays: ``accuracy`` (layers, epochs + 1,
    subsets). With a run directory: the same as ``memloc retrain RUN``.
    """
    from .probes import retraining
    cfg = _config(retraining.RetrainConfig, cfg, options)
    if _is_run(model):
        return retraining.retrain(_run_path(model), cfg, layers=layers, progress=progress)
    data = _need_data(data, "retrain")
    if init_state is None:
        raise RunError("retraining needs the initialisation: pass init_state= the model's state dict before "
                       "training (copy.deepcopy(model.state_dict())), or the RunDir memloc.train wrote (epoch 0)")
    if isinstance(init_state, (str, Path)):
        init_state = RunDir.open(init_state)
    if isinstance(init_state, RunDir):
        init_state = init_state.load_checkpoint(0)
    if not data.noise_known:
        raise DataError("retraining trains on the clean examples only and the data's noisy examples are not "
                        "known: pass noise_mask= (or true_labels=) to memloc.wrap_data")
    prepare(model, data, layers=layers)
    return retraining.retrain_model(model, data, init_state, cfg, layers=layers, progress=progress)


def detect(model: nn.Module | str | Path | RunDir, data: Dataset | None = None, cfg: Any = None, *,
           history: History | RunDir | str | Path | None = None, rank_by: str | None = None,
           batch_size: int = 1024, progress: bool = False, log: Callable[[str], None] | None = None) -> ProbeResult:
    """Score every training example as a suspected mislabel; rank them; judge the scores when noise is known.

    With a model and no `history`: one eval-mode pass of the final model gives
    ``final_loss`` and ``aum`` (over one pass, the margin: given-label logit
    minus the largest other). With `history` (the :class:`History` that
    :func:`train` returned, or the RunDir it wrote): the training records give
    ``aum``, ``final_loss``, ``mean_loss``, ``forgetting`` and
    ``first_learned``. Higher suspicion = more likely mislabeled. Result
    arrays: ``raw`` and ``scores`` (N, S), ``score_names`` (S,), ``ranking``
    (N,) most suspicious first. With a run directory: ``memloc detect RUN``.
    """
    from . import detection
    from .inference import predict
    if _is_run(model):
        cfg = cfg or detection.DetectConfig(**({"rank_by": rank_by} if rank_by else {}))
        return detection.detect(_run_path(model), cfg, progress=progress, log=log)
    data = _need_data(data, "detect")
    prepare(model, data)
    rank_by = rank_by or "aum"
    n = data.num_train
    if history is not None:
        if isinstance(history, History):
            rec = history.records
            loss, margin, correct = rec["loss"], rec["margin"], rec["correct"]
        else:
            run = history if isinstance(history, RunDir) else RunDir.open(history)
            loss, margin, correct = detection.read_records(run)
        if loss.shape[1] != n:
            raise DataError(f"the training history covers {loss.shape[1]} examples but the data has {n}: "
                            "pass the history of training on this data")
        raw = detection.record_scores(loss, margin, correct)
        never = raw.pop("_never_learned")
        epochs = int(loss.shape[0])
        source = "training history: per-example records of each epoch's training pass"
    else:
        never, epochs = None, 1
        source = "one eval-mode pass of the final model (no training history): final_loss and aum = final margin"
    logits = predict(model, data.x_train, batch_size=batch_size).cpu()  # (N, K)
    y = data.y_train.cpu()
    predicted = logits.argmax(1).numpy()
    if history is None:
        given_logit = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
        raw = {"aum": (given_logit - other).double().numpy(),
               "final_loss": torch.nn.functional.cross_entropy(logits, y, reduction="none").double().numpy()}
    is_noisy = data.is_noisy.cpu().numpy() if data.noise_known else None
    is_rare = data.is_rare.cpu().numpy() if bool(data.is_rare.any()) else None
    return detection.detect_scores(raw, given=y.numpy(), is_noisy=is_noisy, is_rare=is_rare, rank_by=rank_by,
                                   epochs=epochs, predicted=predicted,
                                   true_labels=data.y_true.cpu().numpy() if data.noise_known else None,
                                   never_learned=never, extra_summary={"records": source})


def build_report(run_dir: str | Path | RunDir) -> Path:
    """Build RUN/report/report.html from a run or study directory's files alone; returns its path.

    (Named build_report, not report: ``memloc.report`` is the module that draws it.)
    """
    from .report import build_report
    return build_report(_run_path(run_dir))
