"""Datasets from their standard on-disk formats into numpy, offline and safely.

Every image reader returns ``x`` of shape (N, C, H, W) and ``y`` of shape (N,):

- ``x`` is uint8 when the source is 8-bit (IDX, CIFAR, SVHN, images), else
  float32 with values in [0, 1];
- ``y`` is int64 with labels 0..C-1.

A user's ``.npz`` (:func:`read_npz`) may also hold (N, F) features or (N, C, L)
sequences, any finite values, and its own test split.

Every problem with a file raises :class:`~memloc.core.errors.DataError` with one line
that names the path and the fix; bad arguments (an unknown dataset name, split
or kind) raise :class:`~memloc.core.errors.ConfigError`. User files are never
unpickled freely: CIFAR's python batches go through an unpickler that builds
numpy arrays and nothing else, and ``.npy``/``.npz`` load with
``allow_pickle=False``.

Search paths (first hit wins), matching what :func:`download` writes:

- MNIST: ``root/MNIST/raw/`` (``root/FashionMNIST/raw/``), ``root/raw/``, ``root/``;
  each file plain or ``.gz``.
- CIFAR: ``root/cifar-10-batches-py/`` then ``root/cifar-10-batches-bin/``
  (``cifar-100-python/``, ``cifar-100-binary/``), then ``root/`` itself.
- SVHN: ``root/`` then ``root/svhn/``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ...core.budget import available_memory  # noqa: F401 - read here, and by data.py as readers.available_memory
from ...core.errors import ConfigError, DataError
from ...core.example_files import check_labels, read_vector  # noqa: F401 - read_vector re-exported (a reader)

PathLike = str | os.PathLike

__all__ = [
    "STANDARD_DATASETS",
    "StandardDataset",
    "download",
    "read_cifar",
    "read_image_folder",
    "read_mnist",
    "NpzArrays",
    "read_npz",
    "read_standard",
    "read_svhn",
    "read_vector",
]

_SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")


def _reason(exc: BaseException) -> str:
    # Exception texts (scipy, zipfile) can span lines; the CLI prints one line.
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --- MNIST / Fashion-MNIST: IDX files ---------------------------------------

_IDX_IMAGES = 0x00000803  # unsigned byte, 3 dims (N, rows, cols)
_IDX_LABELS = 0x00000801  # unsigned byte, 1 dim (N,)
_MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        # Prefer the extracted file: torchvision keeps both, and it reads faster.
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _read_idx(path: Path, magic: int, fix: str) -> np.ndarray:
    """One IDX file of unsigned bytes -> array of the header's shape; validates length."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({_reason(e)}); {fix}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated ({len(raw)} bytes, shorter than its header); {fix}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path} is not an IDX {'image' if magic == _IDX_IMAGES else 'label'} file "
            f"(magic 0x{found:08x}, expected 0x{magic:08x}); {fix}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(f"{path} is truncated ({len(raw)} bytes, header says {expected}); {fix}")
    if len(raw) > expected:
        raise DataError(f"{path} has {len(raw) - expected} bytes after the data its header describes; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist(root: PathLike, *, split: str, variant: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST IDX files -> x (N, 1, 28, 28) uint8, y (N,) int64 in 0..9.

    ``variant`` is "mnist" or "fashion-mnist"; files are looked up in
    ``root/MNIST/raw`` (``root/FashionMNIST/raw``), ``root/raw``, ``root``.
    """
    _check_split(split)
    if variant not in _MNIST_FOLDERS:
        raise ConfigError(f"unknown MNIST variant {variant!r}; use 'mnist' or 'fashion-mnist'")
    root = Path(root)
    dirs = [root / _MNIST_FOLDERS[variant] / "raw", root / "raw", root]
    prefix = "train" if split == "train" else "t10k"
    fix = f"pass --data-root DIR pointing at the folder that holds {_MNIST_FOLDERS[variant]}/raw/, or --download"
    images_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    if images_path is None:
        raise DataError(
            f"no {prefix}-images-idx3-ubyte[.gz] in {', '.join(str(d) for d in dirs)}; {fix}"
        )
    labels_path = _find_idx([images_path.parent], f"{prefix}-labels-idx1-ubyte")
    if labels_path is None:
        raise DataError(f"no {prefix}-labels-idx1-ubyte[.gz] beside {images_path}; {fix}")
    fix = f"the file is damaged: delete it and {fix}"
    x = _read_idx(images_path, _IDX_IMAGES, fix)  # (N, rows, cols)
    y = _read_idx(labels_path, _IDX_LABELS, fix)  # (N,)
    if len(x) != len(y):
        raise DataError(f"{images_path} has {len(x)} images but {labels_path} has {len(y)} labels; {fix}")
    if len(y) and y.max() > 9:
        raise DataError(f"{labels_path} has label {int(y.max())}, outside 0..9; {fix}")
    return x[:, None].copy(), y.astype(np.int64)  # (N, 1, rows, cols)


# --- CIFAR-10 / CIFAR-100: python pickles and binary records ----------------


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 moved the core to numpy._core; old files still name numpy.core.
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes under protocol <= 2 as _codecs.encode(text, "latin1");
        # it only turns a string into bytes (torch's weights_only unpickler allows it too).
        ("_codecs", "encode"): __import__("_codecs").encode,
    }


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts, lists and numpy arrays, and refuses every other global."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _load_cifar_pickle(path: Path, label_key: str, num_classes: int, fix: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the files were written by Python 2, their str keys arrive as bytes.
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a CIFAR python batch ({_reason(e)}); {fix}") from None
    except Exception as e:  # a corrupt pickle can fail with almost any error type
        raise DataError(f"cannot read {path} as a CIFAR python batch ({_reason(e)}); {fix}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict; {fix}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path} lacks keys 'data' and {label_key!r} (found {sorted(map(str, batch))}); {fix}")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' is not a uint8 array of shape (N, 3072) (got {shape}); {fix}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: {label_key!r} is not a list of integers; {fix}") from None
    return _check_cifar(path, data, y, num_classes, fix)


def _load_cifar_binary(path: Path, label_bytes: int, num_classes: int, fix: str) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + 3072
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read {path} ({_reason(e)}); {fix}") from None
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path} is truncated ({raw.size} bytes, not a multiple of {record}-byte records); {fix}")
    rows = raw.reshape(-1, record)  # (N, label bytes + 3072)
    # CIFAR-100 records start with the coarse label, then the fine one; we use the fine one.
    return _check_cifar(path, rows[:, label_bytes:], rows[:, label_bytes - 1].astype(np.int64), num_classes, fix)


def _check_cifar(
    path: Path, data: np.ndarray, y: np.ndarray, num_classes: int, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    if y.shape != (len(data),):
        raise DataError(f"{path} has {len(data)} images but {y.size} labels; {fix}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}; {fix}")
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major 32 x 32.
    return data.reshape(-1, 3, 32, 32), y


def read_cifar(root: PathLike, *, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 (python pickles or binary records) -> x (N, 3, 32, 32) uint8, y (N,) int64.

    CIFAR-100 labels are the 100 fine labels. The python format is preferred
    when both are present.
    """
    _check_split(split)
    root = Path(root)
    if num_classes == 10:
        py_dir, bin_dir = "cifar-10-batches-py", "cifar-10-batches-bin"
        py_names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        bin_names = [n + ".bin" for n in py_names]
        label_key, label_bytes = "labels", 1
    elif num_classes == 100:
        py_dir, bin_dir = "cifar-100-python", "cifar-100-binary"
        py_names = [split]
        bin_names = [split + ".bin"]
        label_key, label_bytes = "fine_labels", 2
    else:
        raise ConfigError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    fix = f"pass --data-root DIR pointing at the folder that holds {py_dir}/ (or {bin_dir}/), or --download"

    def damaged(folder: str) -> str:  # names the format actually being read
        return (f"the download is damaged or incomplete: re-extract it or pass --data-root DIR pointing at the "
                f"folder that holds {folder}/, or --download")
    # the python format first, then the binary one; each in its own folder or right under the root
    formats = [(py_dir, py_names, lambda f, fix: _load_cifar_pickle(f, label_key, num_classes, fix)),
               (bin_dir, bin_names, lambda f, fix: _load_cifar_binary(f, label_bytes, num_classes, fix))]
    parts = None
    for folder, names, load in formats:
        d = next((d for d in (root / folder, root) if (d / names[0]).is_file()), None)
        if d is None:
            continue
        parts = []
        for name in names:
            if not (d / name).is_file():
                raise DataError(f"missing {d / name}; {damaged(folder)}")
            parts.append(load(d / name, damaged(folder)))
        break
    if parts is None:
        raise DataError(f"no CIFAR-{num_classes} {split} files under {root} "
                        f"(looked for {py_dir}/{py_names[0]} and {bin_dir}/{bin_names[0]}); {fix}")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return x, y


# --- SVHN: MATLAB v5 files ---------------------------------------------------


def read_svhn(root: PathLike, *, split: str) -> tuple[np.ndarray, np.ndarray]:
    """SVHN ``{split}_32x32.mat`` -> x (N, 3, 32, 32) uint8, y (N,) int64 in 0..9 (label 10 is digit 0)."""
    _check_split(split)
    import scipy.io

    root = Path(root)
    name = f"{split}_32x32.mat"
    fix = "pass --data-root DIR pointing at the folder that holds train_32x32.mat and test_32x32.mat, or --download"
    path = next((d / name for d in (root, root / "svhn") if (d / name).is_file()), None)
    if path is None:
        raise DataError(f"no {name} in {root} or {root / 'svhn'}; {fix}")
    fix = f"the file is damaged: delete it and {fix}"
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3), OSError...
        raise DataError(f"cannot read {path} as a MATLAB v5 file ({_reason(e)}); {fix}") from None
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} lacks variables 'X' and 'y' (found {found}); {fix}")
    xs, ys = mat["X"], mat["y"]
    if xs.ndim != 4 or xs.shape[:3] != (32, 32, 3) or xs.dtype != np.uint8:
        raise DataError(f"{path}: X is {xs.dtype} {xs.shape}, expected uint8 (32, 32, 3, N); {fix}")
    y = ys.reshape(-1)
    if y.shape != (xs.shape[3],):
        raise DataError(f"{path} has {xs.shape[3]} images but {y.size} labels; {fix}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path} has labels outside 1..10; {fix}")
    y[y == 10] = 0  # SVHN writes digit 0 as label 10
    x = np.ascontiguousarray(xs.transpose(3, 2, 0, 1))  # (32, 32, 3, N) -> (N, 3, 32, 32)
    return x, y


# --- a user's .npz -----------------------------------------------------------

_CHANNELS = (1, 3, 4)
LAYOUTS = ("images", "sequences")  # how a 3-D x is read: (N, H, W) or (N, C, L)
_SHAPES = "give (N, F) features, (N, C, L) sequences, or (N, H, W), (N, H, W, C) or (N, C, H, W) images"


class NpzArrays(NamedTuple):
    """A user's ``.npz``: x (N, ...) and y (N,), and its own test split x_test / y_test (None without one).

    `layout` says how x was read: "features" (N, F), "sequences" (N, C, L) or "images" (N, C, H, W);
    `guessed`: a 3-D x's layout was inferred (no `layout` given).
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    layout: str
    guessed: bool = False


def _channels_last(x: np.ndarray, path: Path) -> bool:
    """Whether 4-D x is (N, H, W, C); see :func:`read_npz` for the rule."""
    first, last = x.shape[1] in _CHANNELS, x.shape[3] in _CHANNELS
    if first and last:
        # Both ends could be channels (tiny images): square H x W decides, else channels-first.
        return x.shape[1] == x.shape[2] and x.shape[2] != x.shape[3]
    if first or last:
        return last
    raise DataError(f"{path}: x has shape {x.shape} and neither dim 1 nor the last dim is a channel count "
                    f"(1, 3 or 4); {_SHAPES}")


def _layout_of(x: np.ndarray, path: Path, layout: str | None) -> str:
    """"features", "sequences" or "images" for x of this shape (a 3-D x: `layout`, else images when square or
    uint8)."""
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: x has shape {x.shape}; {_SHAPES}")
    if layout is not None and layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}: choose {' or '.join(LAYOUTS)}")
    if x.ndim == 3:
        if layout is not None:
            return layout
        return "images" if x.shape[1] == x.shape[2] or x.dtype == np.uint8 else "sequences"
    found = "features" if x.ndim == 2 else "images"
    if layout is not None and layout != found:
        raise DataError(f"{path}: --layout {layout} reads a 3-D x, but x has shape {x.shape} ({found}): "
                        "drop --layout")
    return found


def _arrange(x: np.ndarray, layout: str, channels_last: bool) -> np.ndarray:
    """x as stored -> (N, F), (N, C, L) or (N, C, H, W)."""
    if layout == "images" and x.ndim == 3:
        return x[:, None]  # (N, 1, H, W)
    if x.ndim == 4 and channels_last:
        return x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return x


def _values(x: np.ndarray, path: Path, name: str) -> np.ndarray:
    """uint8 as it is, any other number type as float32; NaN and inf refused."""
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
        raise DataError(f"{path}: {name} contains NaN or inf in {bad} example(s); clean or drop those examples "
                        "first")
    return x


def read_npz(path: PathLike, *, layout: str | None = None) -> NpzArrays:
    """A ``.npz`` with arrays ``x`` and ``y`` (and optionally ``x_test`` and ``y_test``) -> :class:`NpzArrays`.

    Layout: 2-D x is (N, F) features. 3-D x is (N, C, L) sequences or (N, H, W)
    images (C=1 is added): `layout` ("images" / "sequences") decides, else images
    when H == W or x is uint8, sequences otherwise. 4-D x is images,
    channels-first when dim 1 is 1, 3 or 4 and the last dim is not,
    channels-last in the opposite case; when both are, channels-last only if
    dims 1 and 2 are equal and dim 3 differs (square images), else
    channels-first. ``x_test`` is read the same way as ``x`` and must have its
    example shape.

    Values: uint8 stays uint8; any other numeric x becomes float32, as it is
    (memloc.tasks.classification.data decides how it is normalized); NaN or inf are an error.
    y: int64 >= 0.
    """
    path = Path(path)
    fix = "save it with np.savez(path, x=examples, y=labels[, x_test=..., y_test=...])"
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass the path of an .npz with arrays x and y")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # not a numpy file, a pickle (refused), a truncated zip...
        raise DataError(f"cannot read {path} as an .npz without pickles ({_reason(e)}); {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive; {fix}")
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise DataError(f"{path} has no array {missing[0]!r} (found {sorted(archive.files)}); {fix}")
        test = [k for k in ("x_test", "y_test") if k in archive.files]
        if len(test) == 1:
            other = "y_test" if test[0] == "x_test" else "x_test"
            raise DataError(f"{path} has {test[0]} but no {other}: save both (the test split) or neither; {fix}")
        names = ("x", "y", *test)
        _check_npz_sizes(path, names, fix)
        try:
            arrays = {k: archive[k] for k in names}
        except Exception as e:  # object arrays (pickles refused), corrupt members...
            raise DataError(f"cannot read arrays {', '.join(names)} from {path} ({_reason(e)}); {fix}") from None
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "uifb" or len(x) == 0:
        raise DataError(f"{path}: x is {x.dtype} with shape {x.shape}; give a non-empty numeric array")
    found = _layout_of(x, path, layout)
    last = x.ndim == 4 and _channels_last(x, path)
    x = np.ascontiguousarray(_values(_arrange(x, found, last), path, "x"))
    y = check_labels(y, len(x), f"{path}: y")
    guessed = arrays["x"].ndim == 3 and layout is None
    if not test:
        return NpzArrays(x, y, None, None, found, guessed)
    xt = arrays["x_test"]
    if xt.dtype.kind not in "uifb" or xt.ndim != arrays["x"].ndim or len(xt) == 0:
        raise DataError(f"{path}: x_test is {xt.dtype} with shape {xt.shape} but x has shape {arrays['x'].shape}; "
                        "give a non-empty x_test shaped like x")
    xt = np.ascontiguousarray(_values(_arrange(xt, found, last), path, "x_test"))
    if xt.shape[1:] != x.shape[1:]:
        raise DataError(f"{path}: x_test examples have shape {xt.shape[1:]} but x examples {x.shape[1:]}; "
                        "give both splits the same example shape")
    if (xt.dtype == np.uint8) != (x.dtype == np.uint8):  # one split 8-bit, the other not: both as float32
        x, xt = x.astype(np.float32), xt.astype(np.float32)
    return NpzArrays(x, y, xt, check_labels(arrays["y_test"], len(xt), f"{path}: y_test"), found, guessed)


def _check_npz_sizes(path: Path, names: tuple[str, ...], fix: str) -> None:
    """Refuse members whose header promises more data than the archive holds or the machine has,
    before numpy allocates an array of the promised size."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            for name in names:
                info = z.getinfo(f"{name}.npy")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        continue
                    shape, _, dtype = read_header(f)  # the header only: nothing allocated yet
                    header = f.tell()
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > max(0, info.file_size - header):
                    raise DataError(f"{path}: the header of {name!r} claims shape {tuple(shape)} "
                                    f"({nbytes:,} bytes) but the archive holds {info.file_size:,} bytes: the file "
                                    f"is damaged; {fix}")
                if nbytes > available_memory():
                    raise DataError(f"{path}: {name!r} needs {nbytes / 2**30:.1f} GiB, more than this machine's "
                                    f"free memory ({available_memory() / 2**30:.1f} GiB): use a smaller subset")
    except (KeyError, zipfile.BadZipFile, ValueError, OSError, EOFError):
        return  # np.load's own reading reports these with its one line




MAX_CLASSES = 100_000


def class_count(y: np.ndarray, where: str, num_classes: int | None = None) -> int:
    """How many classes the labels `y` ask for, checked before anything is allocated per class.

    Labels that look like ids rather than classes (a maximum of 100,000 or more, or at least ten
    times the number of distinct labels) are refused unless `num_classes` (--num-classes) says so.
    """
    top = int(y.max()) if y.size else 0
    if num_classes is not None:
        if top >= num_classes:
            raise DataError(f"{where} has label {top}, outside 0..{num_classes - 1} (--num-classes {num_classes}): "
                            "fix the labels or raise --num-classes")
        return num_classes
    distinct = len(np.unique(y))
    if top >= MAX_CLASSES or top >= 10 * max(distinct, 1):
        raise DataError(f"{where} has label {top} but only {distinct} distinct labels, which would make a "
                        f"{top + 1:,}-class model: number the classes 0..{distinct - 1}, or pass --num-classes N "
                        "if the model really needs N outputs")
    return top + 1




# --- an image folder ---------------------------------------------------------

_GRAY_MODES = {"1", "L", "LA"}


def read_image_folder(path: PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sub-folder per class -> x (N, C, H, W) uint8, y (N,) int64, class names.

    Classes are the sub-folders in sorted order (label i is ``class_names[i]``);
    images within a class are taken in sorted file order. Hidden entries
    (names starting with ".") and files directly in ``path`` are ignored.
    C is 1 when every image is grayscale, else every image is converted to RGB
    (alpha and palettes are dropped). All images must have the same size.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; pass a folder with one sub-folder of images per class")
    class_names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DataError(f"image folder {path} has no class sub-folders; put each class's images in path/CLASS/")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        members = sorted(p for p in (path / name).iterdir() if p.is_file() and not p.name.startswith("."))
        if not members:
            raise DataError(f"class folder {path / name} has no images; remove it or add images")
        files += [(p, label) for p in members]

    unreadable = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
    # First pass reads headers only: sizes must agree and modes decide C before decoding.
    size0, modes = None, set()
    for file, _ in files:
        try:
            with Image.open(file) as img:
                size, mode = img.size, img.mode
        except unreadable as e:
            raise DataError(f"cannot read image {file} ({_reason(e)}); remove or fix it") from None
        if size0 is None:
            size0, first = size, file
        elif size != size0:
            raise DataError(
                f"image {file} is {size[0]}x{size[1]} but {first} is {size0[0]}x{size0[1]}; "
                f"resize all images to one size first"
            )
        modes.add(mode)
    target = "L" if modes <= _GRAY_MODES else "RGB"
    x = np.empty((len(files), 1 if target == "L" else 3, size0[1], size0[0]), dtype=np.uint8)  # (N, C, H, W)
    for i, (file, _) in enumerate(files):
        try:
            with Image.open(file) as img:
                pixels = np.asarray(img.convert(target))  # (H, W) or (H, W, 3)
        except unreadable as e:
            raise DataError(f"cannot read image {file} ({_reason(e)}); remove or fix it") from None
        x[i] = pixels[None] if target == "L" else pixels.transpose(2, 0, 1)
    y = np.array([label for _, label in files], dtype=np.int64)
    return x, y, class_names


# --- standard datasets: table, dispatch, download ----------------------------


class StandardDataset(NamedTuple):
    reader: Callable[[PathLike, str], tuple[np.ndarray, np.ndarray]]  # (root, split) -> (x, y)
    num_classes: int
    description: str


def _mnist(root: PathLike, split: str):
    return read_mnist(root, split=split, variant="mnist")


def _fashion_mnist(root: PathLike, split: str):
    return read_mnist(root, split=split, variant="fashion-mnist")


def _cifar10(root: PathLike, split: str):
    return read_cifar(root, split=split, num_classes=10)


def _cifar100(root: PathLike, split: str):
    return read_cifar(root, split=split, num_classes=100)


def _svhn(root: PathLike, split: str):
    return read_svhn(root, split=split)


STANDARD_DATASETS: dict[str, StandardDataset] = {
    "mnist": StandardDataset(_mnist, 10, "MNIST handwritten digits, 1x28x28, 60k train / 10k test"),
    "fashion-mnist": StandardDataset(_fashion_mnist, 10, "Fashion-MNIST clothing, 1x28x28, 60k train / 10k test"),
    "cifar10": StandardDataset(_cifar10, 10, "CIFAR-10 natural images, 3x32x32, 50k train / 10k test"),
    "cifar100": StandardDataset(_cifar100, 100, "CIFAR-100 natural images (fine labels), 3x32x32, 50k / 10k"),
    "svhn": StandardDataset(_svhn, 10, "SVHN house-number digits, 3x32x32, 73k train / 26k test"),
}


def _standard(name: str) -> StandardDataset:
    if name not in STANDARD_DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(STANDARD_DATASETS)}")
    return STANDARD_DATASETS[name]


def read_standard(name: str, root: PathLike, *, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` of standard dataset ``name`` (a key of STANDARD_DATASETS) from ``root``."""
    entry = _standard(name)
    _check_split(split)
    if not Path(root).is_dir():
        raise DataError(
            f"data folder {root} does not exist; pass --data-root DIR pointing at the folder "
            f"that holds the {name} files, or --download"
        )
    return entry.reader(root, split)


def download(name: str, root: PathLike) -> None:
    """Download both splits of standard dataset ``name`` into ``root`` with torchvision (needs internet)."""
    _standard(name)
    from torchvision import datasets

    root = str(root)
    getters = {
        "mnist": lambda split: datasets.MNIST(root, train=split == "train", download=True),
        "fashion-mnist": lambda split: datasets.FashionMNIST(root, train=split == "train", download=True),
        "cifar10": lambda split: datasets.CIFAR10(root, train=split == "train", download=True),
        "cifar100": lambda split: datasets.CIFAR100(root, train=split == "train", download=True),
        "svhn": lambda split: datasets.SVHN(root, split=split, download=True),
    }
    try:
        for split in _SPLITS:
            getters[name](split)
    except Exception as e:  # URLError, HTTP errors, checksum RuntimeError, disk full...
        raise DataError(
            f"could not download {name} into {root}: {_reason(e)}; "
            f"check your connection or place the files there yourself"
        ) from None
