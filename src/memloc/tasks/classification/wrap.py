"""Your own arrays, tensors or torch datasets as a memloc :class:`~memloc.tasks.classification.data.Dataset`.

`wrap_data(x_train, y_train, x_test, y_test, noise_mask=...)` checks shapes,
labels and values (one clear line for each problem) and keeps everything as
tensors; `from_torch_dataset(train_set, test_set)` reads a map-style
``torch.utils.data.Dataset`` of (x, y) pairs once into tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...core.errors import DataError, warn
from ...core.examples import Normalization
from .data import Dataset, standardize_stats

ArrayLike = Any  # torch.Tensor or numpy array

__all__ = ["wrap_data", "from_torch_dataset"]


def _as_tensor(a: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    try:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    except (TypeError, ValueError) as err:
        raise DataError(f"{what} is not an array or tensor ({err}): pass a numpy array or torch tensor") from None


def _examples(x: ArrayLike, what: str) -> torch.Tensor:
    x = _as_tensor(x, what)
    if x.dim() < 2:
        raise DataError(f"{what} has shape {tuple(x.shape)}; expected (N, C, H, W) images, (N, C, L) sequences or "
                        "(N, F) features")
    if x.dtype == torch.uint8 or x.dtype == torch.bool:
        return x.to(torch.uint8).contiguous() if x.dtype == torch.uint8 else x.float().contiguous()
    if not x.is_floating_point():
        if x.numel() and int(x.min()) >= 0 and int(x.max()) <= 255:
            return x.to(torch.uint8).contiguous()  # 8-bit intensities in a wider integer type
        return x.to(torch.float32).contiguous()
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} contains NaN or infinite values: clean the data first")
    return x.contiguous()


def _normalization(normalize: str | None, x_tr: torch.Tensor, x_te: torch.Tensor) -> Normalization:
    """`normalize` (inferred when None: pixels for uint8 or [0, 1] float images, else standardize) over x_train.
    Images inferred as pixels whose range fits neither pixel scale (8-bit values 0..16) warn in one line."""
    from ...core.examples import NORMALIZATIONS, PIXELS
    from .data import pixel_scale_warning
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise DataError(f"unknown normalize {normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
    both = [t for t in (x_tr, x_te) if t.numel()]
    pixels = all(t.dtype == torch.uint8 or (float(t.min()) >= -1e-3 and float(t.max()) <= 1 + 1e-3) for t in both)
    if normalize is None:
        normalize = "pixels" if x_tr.dim() == 4 and pixels else "standardize"
        uint8 = all(t.dtype == torch.uint8 for t in both)
        line = pixel_scale_warning(min(float(t.min()) for t in both), max(float(t.max()) for t in both),
                                   uint8=uint8, what="uint8 images" if uint8 else "images") \
            if normalize == "pixels" and both else None
        if line:
            warn(line.removeprefix("warning: ").replace("--normalize standardize", "normalize='standardize'"))
    if normalize == "pixels":
        if not pixels:
            raise DataError("normalize='pixels' takes uint8 images or floats in [0, 1]: scale the data, or pass "
                            "normalize='standardize' (or 'none')")
        return PIXELS
    if normalize == "none":
        return Normalization("none")
    return standardize_stats(x_tr.numpy())


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
              normalize: str | None = None, device: torch.device | str = "cpu") -> Dataset:
    """Your tensors (or numpy arrays) as a memloc :class:`Dataset`.

    x_train: (N, C, H, W) images, (N, C, L) sequences or (N, F) features, any
    finite numbers; y_train: (N,) the *given* labels (possibly noisy). x_test,
    y_test: (M, ...) and (M,), optional (empty when left out).

    `normalize` says how examples become model input: "pixels" (uint8 0..255 or
    floats in [0, 1], with the paper's mean 0.5 and std 0.5), "standardize" (each
    channel, or feature, by x_train's mean and std) or "none"; by default pixels
    for images in those ranges, standardize for anything else.

    The noise is known when `noise_mask` (N,) bool (1 = noisy) or `true_labels`
    (N,) is given (the mask is then ``true_labels != y_train``); otherwise the
    noisy examples are unknown (``noise_known`` False): detection then ranks
    only, and retraining (which trains on the clean examples) refuses.
    `rare_mask` (N,) marks rare examples. `num_classes` defaults to the largest
    label + 1.
    """
    x_tr = _examples(x_train, "x_train")
    n = len(x_tr)
    if n == 0:
        raise DataError("x_train holds no examples")
    y_tr = _labels(y_train, n, "y_train")
    if (x_test is None) != (y_test is None):
        raise DataError("pass both x_test and y_test, or neither")
    if x_test is None:
        x_te, y_te = x_tr[:0].clone(), y_tr[:0].clone()
    else:
        x_te = _examples(x_test, "x_test")
        y_te = _labels(y_test, len(x_te), "y_test")
        if tuple(x_te.shape[1:]) != tuple(x_tr.shape[1:]):
            raise DataError(f"x_test examples have shape {tuple(x_te.shape[1:])} but x_train examples "
                            f"{tuple(x_tr.shape[1:])}: both splits must have the same shape")
        if x_te.dtype != x_tr.dtype:  # one uint8 split and one float split: both float (pixels: in [0, 1])
            floats = [t for t in (x_tr, x_te) if t.dtype != torch.uint8 and t.numel()]
            unit = all(float(t.min()) >= -1e-3 and float(t.max()) <= 1 + 1e-3 for t in floats)
            x_tr, x_te = (t.float() / 255.0 if t.dtype == torch.uint8 and unit else t.float() for t in (x_tr, x_te))
    norm = _normalization(normalize, x_tr, x_te)
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
                 class_names=[str(k) for k in range(num_classes)], source_index=np.arange(n), normalization=norm)
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
