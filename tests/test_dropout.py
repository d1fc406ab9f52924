"""Tests for example-tied dropout and its baselines (memloc.core.dropout)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memloc.core.dropout import (
    ChannelDropout,
    ExampleTiedDropout,
    FixedUnitMask,
    _hash_reference,
    dropout_mode,
    example_indices,
    example_tied_dropout,
    expected_active_fraction,
    find_example_tied_dropout,
    insert_example_tied_dropout,
    memorization_mask,
    num_generalization_units,
    set_dropout_mode,
    unit_hash,
)
from memloc.core.errors import ConfigError

CUDA = torch.cuda.is_available()


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --- the hash and the mask ---------------------------------------------------


def test_tiny_hand_checked_case():
    # p_gen=0.5 on 4 units: units 0 and 1 are generalization units, always on.
    idx = torch.arange(1000)
    m = memorization_mask(idx, 4, p_gen=0.5, p_mem=0.5, seed=0)
    assert m.shape == (1000, 4) and m.dtype == torch.bool
    assert m[:, :2].all()
    assert 0 < m[:, 2:].sum() < 2000  # the two memorization units vary over examples
    # unit u of example i is on iff hash / 2**32 < p_mem, hash from the Python reference
    for i in (0, 1, 7, 999):
        for u in (2, 3):
            assert bool(m[i, u]) == (_hash_reference(0, 0, i, u) < 2**31)


def test_hash_matches_python_reference_bit_for_bit():
    # The int64 tensor path must equal exact big-int arithmetic, including indices
    # beyond 2**31 and 2**32 (no signed overflow anywhere).
    idx = torch.tensor([0, 1, 2, 10**6 + 3, 2**31 - 1, 2**31, 2**32 + 5, 2**62 + 11])
    for seed, layer_id in ((0, 0), (123456789, 3), (2**40 + 1, 7)):
        for p_mem in (0.3, 0.5, 0.9):
            m = memorization_mask(idx, 16, p_gen=0.25, p_mem=p_mem, seed=seed, layer_id=layer_id)
            thr = math.ceil(p_mem * 2**32)
            for r, i in enumerate(idx.tolist()):
                for u in range(4, 16):
                    assert bool(m[r, u]) == (_hash_reference(seed, layer_id, i, u) < thr)


def test_mask_deterministic_and_depends_on_seed_and_layer():
    idx = torch.randint(0, 50_000, (256,), generator=torch.Generator().manual_seed(0))
    kw = dict(p_gen=0.25, p_mem=0.5)
    a = memorization_mask(idx, 64, seed=1, **kw)
    assert torch.equal(a, memorization_mask(idx, 64, seed=1, **kw))
    assert torch.equal(a[::2], memorization_mask(idx[::2], 64, seed=1, **kw))  # per example, not per batch
    assert not torch.equal(a, memorization_mask(idx, 64, seed=2, **kw))
    assert not torch.equal(a, memorization_mask(idx, 64, seed=1, layer_id=1, **kw))
    # different seeds agree on about p^2 + (1-p)^2 = 1/2 of the memorization cells, not all
    b = memorization_mask(idx, 64, seed=2, **kw)
    agree = (a[:, 16:] == b[:, 16:]).float().mean().item()
    assert 0.45 < agree < 0.55


def test_kept_fraction_binomial_and_generalization_units_on():
    n, units, p_gen, p_mem = 20_000, 100, 0.2, 0.3
    m = memorization_mask(torch.arange(n), units, p_gen=p_gen, p_mem=p_mem, seed=5)
    assert m[:, :20].all()
    mem = m[:, 20:]
    assert _binomial_ok(int(mem.sum()), mem.numel(), p_mem)
    # every memorization unit and every example look like Bernoulli(p_mem) on their own
    per_unit = mem.sum(0)
    assert all(_binomial_ok(int(c), n, p_mem) for c in per_unit)
    # neighbouring units are uncorrelated across examples
    corr = torch.corrcoef(mem.T.float())
    off = corr[~torch.eye(80, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(n)


def test_large_indices_work_and_differ():
    big = torch.tensor([10**6, 10**6 + 1, 2**31 - 2, 2**31 - 1, 2**31])
    m = memorization_mask(big, 256, p_gen=0.1, p_mem=0.5, seed=0)
    rows = {tuple(r.tolist()) for r in m}
    assert len(rows) == len(big)
    near = memorization_mask(torch.arange(2**31 - 4000, 2**31), 50, p_gen=0.2, p_mem=0.4, seed=0)
    assert _binomial_ok(int(near[:, 10:].sum()), 4000 * 40, 0.4)


def test_global_rng_untouched():
    cuda_state = torch.cuda.get_rng_state() if CUDA else None
    x = torch.randn(8, 6, 3, 3)
    before = torch.get_rng_state()
    layer = ExampleTiedDropout(0.5, 0.5, seed=3)
    with example_indices(layer, torch.arange(8)):
        layer.train()(x)
    example_tied_dropout(x, torch.arange(8), p_gen=0.5, p_mem=0.5, seed=0, mode="tied")
    memorization_mask(torch.arange(100), 10, p_gen=0.5, p_mem=0.5, seed=0)
    FixedUnitMask(0.5, seed=1)(x)
    assert torch.equal(before, torch.get_rng_state())
    if CUDA:
        xc = x.cuda()
        with example_indices(layer, torch.arange(8, device="cuda")):
            layer.train()(xc)
        assert torch.equal(cuda_state, torch.cuda.get_rng_state())


@pytest.mark.gpu
@pytest.mark.gpu
def test_cpu_and_cuda_masks_identical():
    idx = torch.cat([torch.arange(5000), torch.tensor([2**31 - 1, 2**31, 2**33 + 7])])
    for seed, layer_id in ((0, 0), (99, 4)):
        cpu = memorization_mask(idx, 300, p_gen=0.3, p_mem=0.37, seed=seed, layer_id=layer_id)
        gpu = memorization_mask(idx.cuda(), 300, p_gen=0.3, p_mem=0.37, seed=seed, layer_id=layer_id)
        assert torch.equal(cpu, gpu.cpu())
        assert torch.equal(unit_hash(300, seed=seed, layer_id=layer_id),
                           unit_hash(300, seed=seed, layer_id=layer_id, device="cuda").cpu())



@pytest.mark.gpu
@pytest.mark.gpu
def test_cuda_layer_equals_cpu_layer_outputs_and_gradients():
    """The layer's output and gradient on CUDA equal the CPU ones for every activation shape."""
    g = torch.Generator().manual_seed(0)
    for shape in ((37, 48, 5, 5), (37, 130), (37, 3, 66)):
        idx = torch.randint(0, 2**31, (shape[0],), generator=g)
        x = torch.randn(*shape, generator=g)
        outs = []
        for dev in ("cpu", "cuda"):
            xd = x.detach().to(dev).requires_grad_(True)  # a fresh leaf on each device
            y = example_tied_dropout(xd, idx.to(dev), p_gen=0.3, p_mem=0.2, seed=5, mode="train", layer_id=2)
            y.sum().backward()
            outs.append((y.detach().cpu(), xd.grad.cpu()))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --- the four modes -------------------------------------------------------------


def test_train_mode_is_mask_times_x_and_tied_equals_train():
    x = torch.randn(32, 10)
    idx = torch.arange(100, 132)
    kw = dict(p_gen=0.3, p_mem=0.5, seed=7, layer_id=2)
    out = example_tied_dropout(x, idx, mode="train", **kw)
    m = memorization_mask(idx, 10, **kw)
    assert torch.equal(out, x * m)  # no rescaling
    assert torch.equal(out, example_tied_dropout(x, idx, mode="tied", **kw))


def test_eval_equals_expectation_of_train():
    n, units, p_gen, p_mem = 20_000, 40, 0.25, 0.4
    x = torch.ones(n, units)
    train = example_tied_dropout(x, torch.arange(n), p_gen=p_gen, p_mem=p_mem, seed=0, mode="train")
    ev = example_tied_dropout(x, None, p_gen=p_gen, p_mem=p_mem, seed=0, mode="eval")
    assert torch.equal(ev[0, :10], torch.ones(10))
    assert torch.allclose(ev[0, 10:], torch.full((30,), p_mem))
    bound = 5 * math.sqrt(p_mem * (1 - p_mem) / n)
    assert (train.mean(0) - ev[0]).abs().max() < bound


@pytest.mark.parametrize("drop_scale", ["matched", "paper", "none"])
def test_drop_mode_zeroes_memorization_units_and_scales_generalization(drop_scale):
    p_gen, p_mem = 0.25, 0.5
    x = torch.randn(5, 8, 3, 3)
    out = example_tied_dropout(x, None, p_gen=p_gen, p_mem=p_mem, seed=0, mode="drop", drop_scale=drop_scale)
    factor = {"matched": (p_gen + (1 - p_gen) * p_mem) / p_gen, "paper": (p_gen + p_mem) / p_gen,
              "none": 1.0}[drop_scale]
    assert torch.equal(out[:, 2:], torch.zeros_like(out[:, 2:]))
    assert torch.allclose(out[:, :2], x[:, :2] * factor)


def test_drop_matched_preserves_expected_total():
    n, units, p_gen, p_mem = 20_000, 20, 0.5, 0.3
    x = torch.ones(n, units)
    train_total = example_tied_dropout(x, torch.arange(n), p_gen=p_gen, p_mem=p_mem, seed=1, mode="train").sum(1).mean()
    drop_total = example_tied_dropout(x, None, p_gen=p_gen, p_mem=p_mem, seed=1, mode="drop").sum(1).mean()
    assert abs(train_total.item() - drop_total.item()) < 0.05


def test_four_d_is_per_channel():
    x = torch.randn(16, 12, 5, 7)
    idx = torch.arange(16) * 1000
    out = example_tied_dropout(x, idx, p_gen=0.25, p_mem=0.5, seed=0, mode="train")
    m = memorization_mask(idx, 12, p_gen=0.25, p_mem=0.5, seed=0)
    assert torch.equal(out, x * m[:, :, None, None])
    zero = out == 0
    assert torch.equal(zero.all(dim=(2, 3)), ~m)  # whole channels dropped, all spatial positions alike


def test_three_d_is_per_feature_for_all_positions():
    x = torch.randn(6, 9, 20)
    idx = torch.arange(6) + 2**31 - 10
    out = example_tied_dropout(x, idx, p_gen=0.2, p_mem=0.5, seed=4, mode="train")
    m = memorization_mask(idx, 20, p_gen=0.2, p_mem=0.5, seed=4)
    assert torch.equal(out, x * m[:, None, :])
    ev = example_tied_dropout(x, None, p_gen=0.2, p_mem=0.5, seed=4, mode="eval")
    assert torch.allclose(ev[..., :4], x[..., :4]) and torch.allclose(ev[..., 4:], 0.5 * x[..., 4:])


@pytest.mark.parametrize("mode", ["train", "eval", "drop"])
def test_dtype_and_memory_format_preserved(mode):
    x = torch.randn(4, 8, 3, 3).to(torch.bfloat16).to(memory_format=torch.channels_last)
    out = example_tied_dropout(x, torch.arange(4), p_gen=0.5, p_mem=0.5, seed=0, mode=mode)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_gradient_flows_through_kept_units_only():
    x = torch.randn(4, 6, requires_grad=True)
    idx = torch.arange(4)
    example_tied_dropout(x, idx, p_gen=0.5, p_mem=0.5, seed=0, mode="train").sum().backward()
    m = memorization_mask(idx, 6, p_gen=0.5, p_mem=0.5, seed=0)
    assert torch.equal(x.grad, m.float())


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize("name,value", [("p_gen", 0.0), ("p_gen", 1.5), ("p_mem", 0.0), ("p_mem", -0.1), ("p_mem", 2)])
def test_fraction_out_of_range(name, value):
    kw = {"p_gen": 0.5, "p_mem": 0.5, name: value}
    with pytest.raises(ConfigError, match=name):
        example_tied_dropout(torch.ones(2, 4), torch.arange(2), seed=0, mode="train", **kw)
    with pytest.raises(ConfigError, match=name):
        ExampleTiedDropout(kw["p_gen"], kw["p_mem"])


def test_missing_idx_unknown_mode_and_bad_shapes():
    x = torch.ones(2, 4)
    with pytest.raises(ConfigError, match="example_indices"):
        example_tied_dropout(x, None, p_gen=0.5, p_mem=0.5, seed=0, mode="train")
    with pytest.raises(ConfigError, match="tied mode"):
        example_tied_dropout(x, None, p_gen=0.5, p_mem=0.5, seed=0, mode="tied")
    with pytest.raises(ConfigError, match="unknown example-tied dropout mode"):
        example_tied_dropout(x, None, p_gen=0.5, p_mem=0.5, seed=0, mode="test")
    with pytest.raises(ConfigError, match="drop_scale"):
        example_tied_dropout(x, None, p_gen=0.5, p_mem=0.5, seed=0, mode="drop", drop_scale="exact")
    with pytest.raises(ConfigError, match="shape"):
        example_tied_dropout(x, torch.arange(3), p_gen=0.5, p_mem=0.5, seed=0, mode="train")
    with pytest.raises(ConfigError, match="shape"):
        example_tied_dropout(torch.ones(4), None, p_gen=0.5, p_mem=0.5, seed=0, mode="eval")
    with pytest.raises(ConfigError, match="integer"):
        memorization_mask(torch.ones(2), 4, p_gen=0.5, p_mem=0.5, seed=0)
    with pytest.raises(ConfigError, match="generalization units"):
        example_tied_dropout(torch.ones(2, 4), None, p_gen=0.2, p_mem=0.5, seed=0, mode="drop")
    layer = ExampleTiedDropout(0.5, 0.5).train()
    with pytest.raises(ConfigError, match="example_indices"):
        layer(x)
    with pytest.raises(ConfigError, match="eval mode"):
        layer.eval_mode = "train"


def test_num_generalization_units_and_active_fraction():
    assert num_generalization_units(4, 0.5) == 2
    assert num_generalization_units(100, 0.29) == 29  # not 28 from float rounding
    assert num_generalization_units(10, 0.05) == 0
    assert num_generalization_units(64, 1.0) == 64
    assert expected_active_fraction(0.4, 0.5) == pytest.approx(0.7)


# --- the module and its context managers --------------------------------------


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        ExampleTiedDropout(0.5, 0.5, seed=1, layer_id=0),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 8),
        ExampleTiedDropout(0.5, 0.5, seed=1, layer_id=1),
        nn.Linear(8, 3),
    )


def test_module_train_and_eval_modes_and_repr():
    layer = ExampleTiedDropout(0.25, 0.5, seed=2, layer_id=3)
    assert "p_gen=0.25" in repr(layer) and "p_mem=0.5" in repr(layer)
    x = torch.randn(6, 8)
    idx = torch.arange(6)
    with example_indices(layer, idx):
        out = layer.train()(x)
    kw = dict(p_gen=0.25, p_mem=0.5, seed=2, layer_id=3)
    assert torch.equal(out, example_tied_dropout(x, idx, mode="train", **kw))
    layer.eval()
    assert torch.equal(layer(x), example_tied_dropout(x, None, mode="eval", **kw))
    for mode in ("drop", "tied"):
        with dropout_mode(layer, mode), example_indices(layer, idx):
            assert torch.equal(layer(x), example_tied_dropout(x, idx, mode=mode, **kw))


def test_two_layers_of_same_width_get_different_masks():
    a, b = ExampleTiedDropout(0.25, 0.5, layer_id=0), ExampleTiedDropout(0.25, 0.5, layer_id=1)
    x = torch.ones(64, 32)
    model = nn.ModuleList([a, b])
    with example_indices(model, torch.arange(64)):
        assert not torch.equal(a(x), b(x))


def test_example_indices_clears_even_when_body_raises():
    model = _net()
    layers = find_example_tied_dropout(model)
    assert len(layers) == 2
    idx = torch.arange(2)
    with pytest.raises(RuntimeError, match="boom"):
        with example_indices(model, idx):
            assert all(m.idx is idx for m in layers)
            raise RuntimeError("boom")
    assert all(m.idx is None for m in layers)
    with example_indices(model, idx):
        out = model.train()(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 3) and all(m.idx is None for m in layers)


def test_dropout_mode_restores_and_set_dropout_mode_returns_previous():
    model = _net()
    layers = find_example_tied_dropout(model)
    layers[1].eval_mode = "tied"
    with pytest.raises(RuntimeError):
        with dropout_mode(model, "drop"):
            assert [m.eval_mode for m in layers] == ["drop", "drop"]
            raise RuntimeError
    assert [m.eval_mode for m in layers] == ["eval", "tied"]
    prev = set_dropout_mode(model, "drop")
    assert prev == {"1": "eval", "5": "tied"}
    assert [m.eval_mode for m in layers] == ["drop", "drop"]
    with pytest.raises(ConfigError):
        set_dropout_mode(model, "train")


def test_eval_drop_mode_needs_no_indices():
    model = _net().eval()
    x = torch.randn(3, 3, 4, 4)
    with dropout_mode(model, "drop"):
        assert model(x).shape == (3, 3)
    assert model(x).shape == (3, 3)


# --- inserting into an existing model --------------------------------------------


def test_insert_into_sequential():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    insert_example_tied_dropout(model, ["1", "3"], p_gen=0.5, p_mem=0.5, seed=9)
    layers = find_example_tied_dropout(model)
    assert [m.layer_id for m in layers] == [0, 1] and all(m.seed == 9 for m in layers)
    assert isinstance(model[1], nn.Sequential) and isinstance(model[1][0], nn.ReLU)
    with example_indices(model, torch.arange(5)):
        assert model.train()(torch.randn(5, 4)).shape == (5, 2)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.bn(self.conv(x)))


class _TinyResNet(nn.Module):  # torchvision-like nesting: layer1.0.bn
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(_Block(8), _Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(self.stem(x))).flatten(1))


def test_insert_into_nested_model_and_unknown_name():
    model = _TinyResNet()
    insert_example_tied_dropout(model, ["layer1.0.act", "layer1", "layer1.1.bn"], p_gen=0.5, p_mem=0.5)
    # names resolved before wrapping: the wrapped layer1 still holds both inner dropouts
    assert isinstance(model.layer1, nn.Sequential) and isinstance(model.layer1[1], ExampleTiedDropout)
    assert isinstance(model.layer1[0][0].act[1], ExampleTiedDropout)
    assert isinstance(model.layer1[0][1].bn, nn.Sequential)
    assert sorted(m.layer_id for m in find_example_tied_dropout(model)) == [0, 1, 2]
    with example_indices(model, torch.arange(2)):
        assert model.train()(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="valid names include"):
        insert_example_tied_dropout(_TinyResNet(), ["layer1.0.relu"], p_gen=0.5, p_mem=0.5)
    with pytest.raises(ConfigError, match="twice"):
        insert_example_tied_dropout(_TinyResNet(), ["fc", "fc"], p_gen=0.5, p_mem=0.5)


# --- baselines --------------------------------------------------------------------


def test_channel_dropout_identity_in_eval_and_mean_preserving_in_train():
    layer = ChannelDropout(0.6)
    x = torch.randn(4, 5, 3, 3)
    assert layer.eval()(x) is x
    layer.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = layer(torch.ones(20_000, 10, 2, 2))
    assert ((out == 0) | torch.isclose(out, torch.tensor(1 / 0.6))).all()
    assert torch.equal(out.amin(dim=(2, 3)), out.amax(dim=(2, 3)))  # per channel
    kept = (out[:, :, 0, 0] > 0).sum().item()
    assert _binomial_ok(kept, 200_000, 0.6)
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt(0.4 / 0.6 / 200_000)
    out3 = layer(torch.ones(8, 7, 6))
    assert torch.equal(out3.amin(1), out3.amax(1))  # 3-D: per feature over all positions
    assert layer(torch.ones(8, 6)).shape == (8, 6)


def test_fixed_unit_mask_same_everywhere():
    a = expected_active_fraction(0.4, 0.5)
    layer = FixedUnitMask(a, seed=3, layer_id=1)
    x = torch.ones(10, 200, 2, 2)
    train_out, eval_out = layer.train()(x), layer.eval()(x)
    assert torch.equal(train_out, eval_out)
    kept = train_out[:, :, 0, 0]
    assert (kept == kept[0]).all()  # same units for every example
    assert kept[0].sum().item() == round(a * 200)
    assert not torch.equal(layer.unit_mask(200), FixedUnitMask(a, seed=3, layer_id=2).unit_mask(200))
    assert layer(torch.ones(3, 200)).sum().item() == 3 * round(a * 200)
    assert layer(torch.ones(3, 4, 200)).sum().item() == 12 * round(a * 200)


def test_layer_constants_cached_under_inference_mode_work_in_training():
    layer = ExampleTiedDropout(0.5, 0.5, seed=11, layer_id=5)
    idx = torch.arange(4)
    with torch.inference_mode(), example_indices(layer, idx):
        first = layer.train()(torch.ones(4, 6))
    x = torch.ones(4, 6, requires_grad=True)
    with example_indices(layer, idx):
        out = layer(x)
    out.sum().backward()
    assert torch.equal(out.detach(), first) and torch.equal(x.grad, first)


def test_batch_memo_recomputes_for_new_or_modified_indices():
    kw = dict(p_gen=0.25, p_mem=0.5)
    idx = torch.arange(64)
    first = memorization_mask(idx, 32, seed=0, **kw)
    assert torch.equal(first, memorization_mask(idx, 32, seed=0, **kw))
    assert torch.equal(memorization_mask(idx, 32, seed=1, **kw), memorization_mask(idx.clone(), 32, seed=1, **kw))
    idx.add_(1000)  # same tensor object, new contents
    assert torch.equal(memorization_mask(idx, 32, seed=0, **kw),
                       memorization_mask(torch.arange(1000, 1064), 32, seed=0, **kw))
    with torch.inference_mode():
        inf_idx = torch.arange(64)
        assert torch.equal(memorization_mask(inf_idx, 32, seed=0, **kw), first)
