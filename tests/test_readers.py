"""Readers on tiny files written in exactly the real on-disk formats, plus the real MNIST test split."""

import gzip
import hashlib
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from memloc.core.errors import ConfigError, DataError
from memloc.core.example_files import read_vector
from memloc.tasks.classification.readers import (
    STANDARD_DATASETS,
    read_cifar,
    read_image_folder,
    read_mnist,
    read_npz,
    read_standard,
    read_svhn,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- MNIST IDX ---------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return struct.pack(">I", magic) + dims + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, *, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, data in (
        (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 0x803)),
        (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 0x801)),
    ):
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def tiny_digits(n=5, h=28, w=28):
    images = np.arange(n * h * w, dtype=np.int64).reshape(n, h, w) % 256
    return images.astype(np.uint8), np.arange(n, dtype=np.uint8) % 10


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    images, labels = tiny_digits()
    write_idx(tmp_path / "MNIST" / "raw", "t10k", images, labels, gz=gz)
    x, y = read_mnist(tmp_path, split="test")
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels)


def test_mnist_search_paths_and_fashion_layout(tmp_path):
    images, labels = tiny_digits(n=3, h=4, w=6)
    write_idx(tmp_path / "FashionMNIST" / "raw", "train", images, labels, gz=True)
    x, _ = read_mnist(tmp_path, split="train", variant="fashion-mnist")
    assert x.shape == (3, 1, 4, 6)
    write_idx(tmp_path / "flat", "train", images, labels, gz=False)
    x, _ = read_mnist(tmp_path / "flat", split="train")
    np.testing.assert_array_equal(x[:, 0], images)
    with pytest.raises(DataError, match="--data-root"):
        read_mnist(tmp_path, split="train")  # digits are not under FashionMNIST/


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file(tmp_path, gz):
    images, labels = tiny_digits()
    data = idx_bytes(images, 0x803)[:-100]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x801))
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    (tmp_path / name).write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="truncated"):
        read_mnist(tmp_path, split="test")


def test_mnist_truncated_gzip_stream(tmp_path):
    images, labels = tiny_digits()
    write_idx(tmp_path, "t10k", images, labels, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        read_mnist(tmp_path, split="test")


def test_mnist_bad_magic_count_mismatch_and_label_range(tmp_path):
    images, labels = tiny_digits()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x801 + 2 * 0x1000))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x801))
    with pytest.raises(DataError, match="magic"):
        read_mnist(tmp_path, split="test")
    write_idx(tmp_path, "t10k", images, labels[:4], gz=False)
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        read_mnist(tmp_path, split="test")
    write_idx(tmp_path, "t10k", images, np.array([0, 1, 2, 3, 12]), gz=False)
    with pytest.raises(DataError, match="label 12"):
        read_mnist(tmp_path, split="test")


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        read_mnist(tmp_path, split="val")
    with pytest.raises(ConfigError):
        read_mnist(tmp_path, split="test", variant="kmnist")
    with pytest.raises(ConfigError):
        read_cifar(tmp_path, split="test", num_classes=20)
    with pytest.raises(ConfigError):
        read_standard("imagenet", tmp_path, split="test")


# --- CIFAR -------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings, as cPickle did for the real CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("ascii")
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x, which wrote the real files, named the module numpy.core.multiarray.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(n, seed, *, label_key=b"labels", num_classes=10):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return {b"batch_label": b"batch", label_key: labels, b"data": data, b"filenames": [b"f.png"] * n}


def write_cifar10_python(folder: Path, *, style="py3"):
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(2 + i, seed=i)
        if style == "py3":
            with open(folder / name, "wb") as f:
                pickle.dump(batches[name], f, protocol=2)
        else:
            (folder / name).write_bytes(py2_pickle(batches[name]))
    return batches


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar10_python_batches(tmp_path, style):
    batches = write_cifar10_python(tmp_path / "cifar-10-batches-py", style=style)
    x, y = read_cifar(tmp_path, split="train")
    train = [batches[f"data_batch_{k}"] for k in range(1, 6)]
    assert x.shape == (sum(len(b[b"labels"]) for b in train), 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, np.concatenate([b[b"labels"] for b in train]))
    np.testing.assert_array_equal(x.reshape(len(x), -1), np.concatenate([b[b"data"] for b in train]))
    x, y = read_cifar(tmp_path, split="test")
    assert len(x) == len(batches["test_batch"][b"labels"]) and y.dtype == np.int64


def test_cifar_pixel_layout(tmp_path):
    # Row: 1024 red, 1024 green, 1024 blue; each plane row-major. Encode (channel, row, col) in the values.
    c, r, k = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([c * 1024 + r * 32 + k]).reshape(1, 3072) % 251
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": image.astype(np.uint8), b"labels": [7]}, f, protocol=2)
    x, y = read_cifar(tmp_path, split="test")
    assert y.tolist() == [7]
    for ch, row, col in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 5, 9)]:
        assert x[0, ch, row, col] == (ch * 1024 + row * 32 + col) % 251


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "hacked"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refused global") as info:
        read_cifar(tmp_path, split="test")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_cifar_missing_and_incomplete(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py/.*--download"):
        read_cifar(tmp_path, split="train")
    batches = write_cifar10_python(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar(tmp_path, split="train")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batches["test_batch"])[:50])
    with pytest.raises(DataError, match="test_batch"):
        read_cifar(tmp_path, split="test")


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, size=3, dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        expected[name] = (pixels, labels)
    x, y = read_cifar(tmp_path, split="test")
    np.testing.assert_array_equal(x, expected["test_batch.bin"][0].reshape(3, 3, 32, 32))
    np.testing.assert_array_equal(y, expected["test_batch.bin"][1])
    x, y = read_cifar(tmp_path, split="train")
    assert x.shape == (15, 3, 32, 32)
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_cifar(tmp_path, split="test")


def test_cifar100_python_and_binary(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = cifar_batch(4, seed=3, label_key=b"fine_labels", num_classes=100)
    batch[b"coarse_labels"] = [0, 1, 2, 3]
    (folder / "test").write_bytes(py2_pickle(batch))
    x, y = read_cifar(tmp_path, split="test", num_classes=100)
    np.testing.assert_array_equal(y, batch[b"fine_labels"])
    np.testing.assert_array_equal(x.reshape(4, -1), batch[b"data"])

    folder = tmp_path / "bin" / "cifar-100-binary"
    folder.mkdir(parents=True)
    coarse, fine = np.array([[1], [19]], dtype=np.uint8), np.array([[42], [99]], dtype=np.uint8)
    pixels = np.full((2, 3072), 9, dtype=np.uint8)
    (folder / "train.bin").write_bytes(np.concatenate([coarse, fine, pixels], axis=1).tobytes())
    x, y = read_cifar(tmp_path / "bin", split="train", num_classes=100)
    assert y.tolist() == [42, 99] and x.shape == (2, 3, 32, 32) and (x == 9).all()


# --- SVHN --------------------------------------------------------------------


def test_svhn_mat(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    labels = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": labels})
    x, y = read_svhn(tmp_path, split="test")
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [0, 1, 9, 0] and y.dtype == np.int64
    with pytest.raises(DataError, match="train_32x32.mat"):
        read_svhn(tmp_path, split="train")
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="MATLAB"):
        read_svhn(tmp_path, split="train")


# --- npz ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, c",
    [("nhw", 1), ("nhwc", 3), ("nchw", 3), ("nhwc", 1), ("nchw", 1), ("nchw", 4)],
)
def test_npz_layouts(tmp_path, layout, c):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, size=(5, c, 6, 7), dtype=np.uint8)
    stored = {"nhw": nchw[:, 0], "nhwc": nchw.transpose(0, 2, 3, 1), "nchw": nchw}[layout]
    np.savez(tmp_path / "d.npz", x=stored, y=np.arange(5))
    x, y = read_npz(tmp_path / "d.npz")[:2]
    np.testing.assert_array_equal(x, nchw)
    assert x.dtype == np.uint8 and y.dtype == np.int64


def test_npz_ambiguous_square_images_are_channels_last(tmp_path):
    nhwc = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    nhwc[..., 2] = 1  # blue plane
    np.savez(tmp_path / "d.npz", x=nhwc, y=[0, 1])
    x = read_npz(tmp_path / "d.npz").x
    assert x.shape == (2, 3, 4, 4) and (x[:, 2] == 1).all() and (x[:, :2] == 0).all()


def test_npz_float_values_and_nan(tmp_path):
    # values come as they are (float32); memloc.tasks.classification.data decides the normalization (pixels divide
    # [0, 255] by 255)
    np.savez(tmp_path / "a.npz", x=np.full((2, 3, 4, 4), 0.5), y=[0, 1])
    x = read_npz(tmp_path / "a.npz").x
    assert x.dtype == np.float32 and np.allclose(x, 0.5)
    np.savez(tmp_path / "b.npz", x=np.full((2, 4, 4), 255, dtype=np.int64), y=[0, 1])
    x = read_npz(tmp_path / "b.npz").x
    assert x.dtype == np.float32 and x.shape == (2, 1, 4, 4) and np.allclose(x, 255.0)
    bad = np.zeros((2, 1, 4, 4))
    bad[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "c.npz", x=bad, y=[0, 1])
    with pytest.raises(DataError, match="NaN"):
        read_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=np.full((2, 1, 4, 4), -300.0), y=[0, 1])
    assert np.allclose(read_npz(tmp_path / "d.npz").x, -300.0)  # any finite range is data (standardized later)


def test_npz_bad_contents(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4)), y=[0, 1])
    with pytest.raises(DataError, match=r"no array 'x' \(found \['images', 'y'\]\)"):
        read_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 4, 4), np.uint8), y=[0, 1])
    with pytest.raises(DataError, match="3 examples"):
        read_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4, 4), np.uint8), y=[0.5, 1])
    with pytest.raises(DataError, match="non-integer"):
        read_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([{}, {}], dtype=object))
    with pytest.raises(DataError, match="d.npz"):
        read_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=np.zeros((2, 5, 6, 7), np.uint8), y=[0, 1])
    with pytest.raises(DataError, match="channel"):
        read_npz(tmp_path / "e.npz")
    with pytest.raises(DataError, match="does not exist"):
        read_npz(tmp_path / "missing.npz")


# --- image folder ------------------------------------------------------------


def save_png(path: Path, array: np.ndarray, mode: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    cats = rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    dog = rng.integers(0, 256, size=(5, 6), dtype=np.uint8)
    save_png(tmp_path / "cat" / "a.png", cats[0], "RGB")
    save_png(tmp_path / "cat" / "b.png", cats[1], "RGB")
    save_png(tmp_path / "dog" / "a.png", dog, "L")  # mixed modes -> everything RGB
    (tmp_path / "README.txt").write_text("ignored")
    x, y, names = read_image_folder(tmp_path)
    assert names == ["cat", "dog"] and y.tolist() == [0, 0, 1]
    assert x.shape == (3, 3, 5, 6) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], cats[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(x[2], np.stack([dog] * 3))


def test_image_folder_grayscale_sizes_and_unreadable(tmp_path):
    save_png(tmp_path / "zero" / "a.png", np.zeros((4, 4), np.uint8), "L")
    save_png(tmp_path / "one" / "a.png", np.full((4, 4), 200, np.uint8), "L")
    x, y, names = read_image_folder(tmp_path)
    assert x.shape == (2, 1, 4, 4) and names == ["one", "zero"] and x[0].max() == 200
    save_png(tmp_path / "zero" / "b.png", np.zeros((4, 5), np.uint8), "L")
    with pytest.raises(DataError, match=r"zero/b.png is 5x4 but .*one/a.png is 4x4"):
        read_image_folder(tmp_path)
    (tmp_path / "zero" / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="zero/b.png"):
        read_image_folder(tmp_path)


# --- per-example vectors -----------------------------------------------------


def test_vector_npy_and_csv(tmp_path):
    np.save(tmp_path / "labels.npy", np.array([3, 1, 2]))
    y = read_vector(tmp_path / "labels.npy", length=3, what="--labels file", kind="labels")
    assert y.dtype == np.int64 and y.tolist() == [3, 1, 2]
    (tmp_path / "labels.csv").write_text("label\n3\n1\n2.0\n\n")
    assert read_vector(tmp_path / "labels.csv", length=3, what="--labels file", kind="labels").tolist() == [3, 1, 2]
    (tmp_path / "mask.csv").write_text("noisy\ntrue\n0\nFalse\n1\n")
    mask = read_vector(tmp_path / "mask.csv", length=4, what="--noise-mask file", kind="mask")
    assert mask.dtype == bool and mask.tolist() == [True, False, False, True]
    np.save(tmp_path / "mask.npy", np.array([0, 1]))
    assert read_vector(tmp_path / "mask.npy", length=2, what="m", kind="mask").tolist() == [False, True]
    (tmp_path / "scores.txt").write_text("0.5\n-1e-3\n2\n")
    scores = read_vector(tmp_path / "scores.txt", length=None, what="--rare-scores file", kind="scores")
    assert scores.dtype == np.float64 and scores.tolist() == [0.5, -1e-3, 2.0]


def test_vector_errors(tmp_path):
    np.save(tmp_path / "labels.npy", np.arange(123))
    with pytest.raises(DataError, match="labels.npy has 123 values but the training set has 4000 examples"):
        read_vector(tmp_path / "labels.npy", length=4000, what="--labels file", kind="labels")
    np.save(tmp_path / "frac.npy", np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="non-integer"):
        read_vector(tmp_path / "frac.npy", length=2, what="--labels file", kind="labels")
    (tmp_path / "frac.csv").write_text("1\n2.5\n")
    with pytest.raises(DataError, match="line 2"):
        read_vector(tmp_path / "frac.csv", length=2, what="--labels file", kind="labels")
    (tmp_path / "mask.csv").write_text("1\n2\n")
    with pytest.raises(DataError, match="--noise-mask file .* line 2 is '2'"):
        read_vector(tmp_path / "mask.csv", length=2, what="--noise-mask file", kind="mask")
    np.save(tmp_path / "mask.npy", np.array([0, 2]))
    with pytest.raises(DataError, match="0/1"):
        read_vector(tmp_path / "mask.npy", length=2, what="--noise-mask file", kind="mask")
    (tmp_path / "two.csv").write_text("idx,label\n0,1\n1,2\n")
    with pytest.raises(DataError, match="2 columns"):
        read_vector(tmp_path / "two.csv", length=2, what="--labels file", kind="labels")
    np.save(tmp_path / "nan.npy", np.array([0.1, np.nan]))
    with pytest.raises(DataError, match="NaN"):
        read_vector(tmp_path / "nan.npy", length=2, what="--rare-scores file", kind="scores")
    np.save(tmp_path / "obj.npy", np.array([{}, {}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="without pickles"):
        read_vector(tmp_path / "obj.npy", length=2, what="--labels file", kind="labels")
    with pytest.raises(DataError, match="does not exist"):
        read_vector(tmp_path / "none.csv", length=2, what="--labels file", kind="labels")


# --- dispatch ----------------------------------------------------------------


def test_read_standard(tmp_path):
    assert set(STANDARD_DATASETS) == {"mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"}
    assert STANDARD_DATASETS["cifar100"].num_classes == 100
    with pytest.raises(DataError, match="does not exist.*--download"):
        read_standard("cifar10", tmp_path / "nowhere", split="train")
    images, labels = tiny_digits(n=2)
    write_idx(tmp_path / "MNIST" / "raw", "train", images, labels, gz=True)
    x, y = read_standard("mnist", tmp_path, split="train")
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [0, 1]


# --- the real MNIST test split -----------------------------------------------

MNIST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def test_real_mnist_test_split():
    raw = SHARED_DATA / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in MNIST_MD5):
        pytest.skip(f"real MNIST test files not found in {raw}")
    for name, md5 in MNIST_MD5.items():
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5, name
    x, y = read_mnist(SHARED_DATA, split="test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == 10000 and len(counts) == 10 and (counts > 0).all()
