import numpy as np
import pytest
import torch

from memloc import ConfigError, DataError
from memloc.tasks.classification.data import (
    DataConfig,
    augment,
    batches,
    corrupt_labels,
    load,
    normalize,
    num_noisy,
    synthetic_images,
)


@pytest.mark.parametrize("n,f,expected", [(4000, 0.1, 400), (100, 0.29, 29), (10, 0.7, 7), (7, 0.5, 3), (50, 0.0, 0)])
def test_noise_count_is_exactly_floor(n, f, expected):
    assert num_noisy(n, f) == expected
    y = np.arange(n) % 10
    given, noisy = corrupt_labels(y, 10, f, seed=3)
    assert noisy.sum() == expected
    assert (given != y).sum() == expected  # every noisy label is wrong, every clean one untouched
    assert np.array_equal(given != y, noisy)


def test_noise_is_uniform_over_every_wrong_class():
    # the published code could never produce y-1 mod C; ours must produce every wrong class
    y = np.zeros(30000, dtype=np.int64)
    given, noisy = corrupt_labels(y, 3, 0.5, seed=0)
    counts = np.bincount(given[noisy], minlength=3)
    assert counts[0] == 0
    assert abs(counts[1] - counts[2]) < 5 * np.sqrt(15000 * 0.25)  # both wrong classes equally likely
    y10 = np.repeat(np.arange(10), 2000)
    g10, n10 = corrupt_labels(y10, 10, 0.5, seed=1)
    offsets = (g10[n10] - y10[n10]) % 10
    assert set(np.unique(offsets)) == set(range(1, 10))


def test_same_seed_same_mask_other_seed_other_mask():
    y = np.arange(1000) % 10
    a = corrupt_labels(y, 10, 0.1, seed=5)
    b = corrupt_labels(y, 10, 0.1, seed=5)
    c = corrupt_labels(y, 10, 0.1, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_pair_noise_flips_to_next_class():
    y = np.arange(100) % 10
    given, noisy = corrupt_labels(y, 10, 0.2, seed=0, kind="pairs")
    assert noisy.sum() == 20
    assert np.array_equal(given[noisy], (y[noisy] + 1) % 10)


def test_mnist5k_fixed_stratified_split_with_noise():
    ds = load(DataConfig(dataset="mnist5k", noise=0.1, seed=0))
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (1000, 1, 28, 28)
    assert np.array_equal(np.bincount(ds.y_true.numpy()), [400] * 10)
    assert np.array_equal(np.bincount(ds.y_test.numpy()), [100] * 10)
    assert int(ds.is_noisy.sum()) == 400
    assert bool((ds.y_train[ds.is_noisy] != ds.y_true[ds.is_noisy]).all())
    assert bool((ds.y_train[~ds.is_noisy] == ds.y_true[~ds.is_noisy]).all())
    again = load(DataConfig(dataset="mnist5k", noise=0.1, seed=0))
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.is_noisy, ds.is_noisy)


def test_digits_and_train_size_subset():
    ds = load(DataConfig(dataset="digits", noise=0.0, train_size=500))
    assert ds.x_train.shape == (500, 1, 8, 8) and ds.num_classes == 10
    assert len(np.unique(ds.y_train.numpy())) == 10  # stratified subset keeps every class
    assert int(ds.is_noisy.sum()) == 0


def test_synthetic_any_shape_and_seeded():
    x, y = synthetic_images(64, (3, 32, 32), 10, seed=1)
    x2, y2 = synthetic_images(64, (3, 32, 32), 10, seed=1)
    assert x.shape == (64, 3, 32, 32) and x.dtype == np.uint8
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    ds = load(DataConfig(dataset="synthetic", synthetic_train=300, synthetic_test=50, synthetic_shape=(1, 16, 12),
                         synthetic_classes=4))
    assert ds.x_train.shape == (300, 1, 16, 12) and ds.num_classes == 4 and int(ds.is_noisy.sum()) == 30


def test_user_npz_labels_mask_and_rare(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 10, 10, 3), dtype=np.uint8)
    y = np.arange(60) % 3
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    ds = load(DataConfig(dataset=str(path), holdout=0.25, noise=0.0))
    assert ds.x_train.shape == (45, 3, 10, 10) and ds.num_classes == 3
    assert not ds.noise_known  # a user's data with no mask: noise unknown
    n = ds.num_train
    labels = ds.y_true.numpy().copy()
    labels[:5] = (labels[:5] + 1) % 3
    np.save(tmp_path / "labels.npy", labels)
    ds2 = load(DataConfig(dataset=str(path), holdout=0.25, labels=str(tmp_path / "labels.npy")))
    assert ds2.noise_known and int(ds2.is_noisy.sum()) == 5 and torch.equal(ds2.y_train, torch.from_numpy(labels))
    mask = np.zeros(n, dtype=int)
    mask[[1, 2]] = 1
    (tmp_path / "mask.csv").write_text("noisy\n" + "\n".join(map(str, mask)) + "\n")
    scores = np.linspace(0, 1, n)
    np.save(tmp_path / "scores.npy", scores)
    ds3 = load(DataConfig(dataset=str(path), holdout=0.25, noise_mask=str(tmp_path / "mask.csv"),
                          rare_scores=str(tmp_path / "scores.npy"), rare_below=0.5))
    assert ds3.is_noisy.nonzero().flatten().tolist() == [1, 2]
    assert int(ds3.is_rare.sum()) == int((scores < 0.5).sum())


def test_bad_data_inputs_raise_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match=r"noise \(--noise\) takes a number in \[0, 1\), not 1.0"):
        DataConfig(noise=1.0)
    with pytest.raises(ConfigError, match=r"noise \(--noise\) takes a number in \[0, 1\)"):
        DataConfig(noise=-0.1)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load(DataConfig(dataset="imagenet"))
    with pytest.raises(DataError, match="--data-root"):
        load(DataConfig(dataset="cifar10"))
    with pytest.raises(DataError, match="does not exist"):
        load(DataConfig(dataset="cifar10", data_root=str(tmp_path / "nowhere")))
    x = np.zeros((20, 1, 4, 4), dtype=np.float32)
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(20) % 2)
    with pytest.raises(DataError, match="NaN"):
        load(DataConfig(dataset=str(tmp_path / "nan.npz")))
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="3 values"):
        load(DataConfig(dataset="digits", labels=str(tmp_path / "short.npy")))
    with pytest.raises(DataError, match="3 values"):
        load(DataConfig(dataset="digits", noise_mask=str(tmp_path / "short.npy")))
    n = load(DataConfig(dataset="digits", noise=0.0)).num_train
    np.save(tmp_path / "big.npy", np.full(n, 12))
    with pytest.raises(DataError, match="outside 0..9"):
        load(DataConfig(dataset="digits", labels=str(tmp_path / "big.npy")))
    for msg in ("split", "holdout"):
        with pytest.raises(ConfigError):
            DataConfig(**({"split": "val"} if msg == "split" else {"holdout": 1.5}))


def test_normalize_and_batches_and_augment():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.equal(normalize(x), torch.tensor([[[[-1.0, 1.0]]]]))
    xs = torch.arange(10 * 4).reshape(10, 1, 2, 2).to(torch.uint8)
    ys = torch.arange(10)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    got = list(batches(xs, ys, batch_size=4, order=order))
    assert [len(b[2]) for b in got] == [4, 4, 2]
    idx = torch.cat([b[2] for b in got])
    assert torch.equal(idx, order) and torch.equal(torch.cat([b[1] for b in got]), ys[order])
    img = torch.rand(8, 3, 32, 32)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = augment(img, generator=g1), augment(img, generator=g2)
    assert a.shape == img.shape and torch.equal(a, b)
    # with zero offset (pad 0) the crop is the image itself, possibly flipped
    c = augment(img, pad=0, generator=torch.Generator().manual_seed(0))
    for i in range(8):
        assert torch.equal(c[i], img[i]) or torch.equal(c[i], img[i].flip(2))


def test_normalize_never_changes_its_input():
    x = torch.rand(2, 1, 3, 3)
    before = x.clone()
    out = normalize(x)
    assert torch.equal(x, before) and torch.allclose(out, (before - 0.5) / 0.5)


def test_images_keep_the_pixel_normalization(tmp_path):
    """Images in pixel ranges are read and normalized as memloc always did; the choice is recorded in the config."""
    cfg = DataConfig(dataset="digits")
    ds = load(cfg)
    assert cfg.normalize == "pixels" and ds.normalization.kind == "pixels" and cfg.norm_mean is None
    expected = ds.x_train[:4].float() / 255 * 2 - 1
    assert torch.allclose(normalize(ds.x_train[:4], ds.normalization), expected) and torch.equal(
        normalize(ds.x_train[:4], ds.normalization), normalize(ds.x_train[:4]))
    np.savez(tmp_path / "f.npz", x=np.full((10, 3, 4, 4), 51.0), y=np.arange(10) % 2)  # floats in [0, 255]
    f = load(DataConfig(dataset=str(tmp_path / "f.npz")))
    assert f.normalization.kind == "pixels" and torch.allclose(f.x_train, torch.tensor(0.2))


def test_batches_over_a_subset_end_with_the_subset():
    """An order of 45 of 64 positions in batches of 16: 3 batches (16, 16, 13), never an empty fourth one (which
    once gave retraining an extra optimizer step of momentum and weight decay alone per epoch)."""
    x, y = torch.arange(64).float()[:, None], torch.arange(64)
    order = torch.arange(63, 18, -1)  # 45 positions, in their own order
    got = [idx.tolist() for _, _, idx in batches(x, y, batch_size=16, order=order)]
    assert [len(i) for i in got] == [16, 16, 13] and sum(got, []) == order.tolist()
    assert [len(i) for _, _, i in batches(x, y, batch_size=16)] == [16] * 4
