"""The speed-ups change nothing they should not: the run's arithmetic is chosen as documented and recorded,
retraining from cached activations gives the accuracies of retraining through the whole model."""

import json

import numpy as np
import pytest
import torch
from conftest import copy_of
from torch import nn
from toys import assert_one_line_error

from memloc.cli import main
from memloc.core import precision
from memloc.core.precision import Arithmetic, arithmetic, autocast, channels_last, choose, current, native_bf16
from memloc.probes.retraining import RetrainConfig, retrain_model
from memloc.probes.sweep import PrefixCache
from memloc.tasks import task_of
from memloc.tasks.classification.models import build_model, layers
from memloc.tasks.classification.wrap import wrap_data
from memloc.tasks.lm.gpt import GPT, GPTShape

CPU = torch.device("cpu")
GPU = torch.device("cuda")  # only its type is read: no GPU is needed


class ViewsConvOutput(nn.Module):
    """A user's model that calls .view on a convolution's output: it cannot take channels_last batches."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # one input channel: only channels_last weights make the output so
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


def test_precision_rule(monkeypatch):
    cnn = build_model("cnn", input_shape=(1, 8, 8), num_classes=3, width=0.25)
    mlp = build_model("mlp", input_shape=(16,), num_classes=3, width=0.25)
    gpt = GPT(GPTShape(32, 8, n_layer=1, n_head=1, n_embd=8))
    x = torch.zeros(2, 1, 8, 8)
    # fp32 keeps the default layout on a CPU: exactly what memloc computed before bf16 on CPUs
    assert choose("fp32", CPU, cnn, x) == Arithmetic(bf16=False, channels_last=False)
    # bf16 asked for: bf16 on any device, channels_last for images the model can take
    assert choose("bf16", CPU, cnn, x) == Arithmetic(bf16=True, channels_last=True)
    assert choose("bf16", CPU, ViewsConvOutput(), x) == Arithmetic(bf16=True, channels_last=False)
    # auto: bf16 only for convolutional models and language models at least 512 wide, only where the CPU has it
    # natively
    wide = GPT(GPTShape(32, 8, n_layer=1, n_head=8, n_embd=precision.BF16_WIDTH))
    narrow = GPT(GPTShape(32, 8, n_layer=1, n_head=8, n_embd=precision.BF16_WIDTH - 8))
    for model in (mlp, gpt, narrow):
        assert choose("auto", CPU, model) == Arithmetic(bf16=False, channels_last=False)
    assert choose("auto", CPU, cnn, x).bf16 == native_bf16(CPU)
    assert choose("auto", CPU, wide) == Arithmetic(bf16=native_bf16(CPU), channels_last=False)
    assert choose("auto", GPU, narrow).bf16 and choose("fp32", GPU, wide) == Arithmetic(bf16=False, channels_last=True)
    monkeypatch.setenv("MEMLOC_CPU_BF16", "0")
    assert not native_bf16(CPU)
    assert choose("auto", CPU, cnn, x) == Arithmetic(bf16=False, channels_last=False)
    assert choose("auto", CPU, wide) == Arithmetic(bf16=False, channels_last=False)
    with pytest.raises(Exception, match="unknown precision"):
        choose("fp16", CPU, cnn, x)


def test_arithmetic_scopes_autocast_and_layout():
    assert current(CPU) == Arithmetic(bf16=False, channels_last=False)  # outside a run: fp32 on a CPU, as before
    with arithmetic(Arithmetic(bf16=True, channels_last=True)):
        assert channels_last(CPU)
        with autocast(CPU):
            y = nn.Linear(4, 4)(torch.ones(2, 4))
        assert y.dtype == torch.bfloat16
    with autocast(CPU):
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32
    assert not channels_last(CPU)


def _resnet_case(n=96, seed=0):
    """A ResNet-9 at width 1/16 on random 1x16x16 images (its residual branches cross the cut) with 20% noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
    y_true = torch.randint(0, 4, (n,), generator=g)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[: n // 5] = True
    y = torch.where(noisy, (y_true + 1) % 4, y_true)
    data = wrap_data(x[: n - 32], y[: n - 32], x_test=x[n - 32:], y_test=y_true[n - 32:], noise_mask=noisy[: n - 32],
                     true_labels=y_true[: n - 32], num_classes=4)
    torch.manual_seed(seed)
    model = build_model("resnet9", input_shape=(1, 16, 16), num_classes=4, width=1 / 16)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # a "trained" model: the initialization moved
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), data, init


@pytest.mark.parametrize("arith", [Arithmetic(False, False), Arithmetic(True, True)], ids=["fp32", "bf16"])
def test_retraining_from_cached_activations_equals_the_whole_model(arith, one_thread, monkeypatch):
    model, data, init = _resnet_case()
    cfg = RetrainConfig(epochs=2, lr=0.05, batch_size=16, eval_batch_size=32)
    steps = []  # training steps fed from the cache: every layer's, or the comparison would prove nothing
    forward = PrefixCache.forward
    monkeypatch.setattr(PrefixCache, "forward", lambda self, idx, split="train": (
        steps.append("step" if torch.is_grad_enabled() else "eval"), forward(self, idx, split))[1])
    with arithmetic(arith):
        if arith.channels_last:
            model = model.to(memory_format=torch.channels_last)
        cached = retrain_model(model, data, init, cfg).arrays["accuracy"]
        n_cached = steps.count("step")
        whole = retrain_model(model, data, init, RetrainConfig(**{**vars(cfg), "cache": False})).arrays["accuracy"]
    # the clean training examples in batches of 16, 2 epochs, every layer; none without the cache
    task = task_of(data)
    per_epoch = -(-int(task.kind_mask(task.reference_kind).sum()) // 16)
    assert n_cached == len(layers(model)) * 2 * per_epoch > 0 and steps.count("step") == n_cached
    np.testing.assert_array_equal(cached, whole)
    assert cached.shape == (len(layers(model)), 3, 4)
    assert np.nanmax(np.abs(cached[:, 0] - cached[:, -1])) > 0  # retraining moved something: a real comparison


def test_prefix_cache_is_skipped_when_it_does_not_fit(one_thread):
    model, data, init = _resnet_case()
    task = task_of(data)
    layer = layers(model)[3]
    assert PrefixCache.build(model, task, layer, budget=1) is None
    cache = PrefixCache.build(model, task, layer, batch_size=32)
    assert cache is not None and len(cache.train) >= 1 and cache.train[0].shape[0] == task.num_train
    assert len(cache.train) == 2  # the layer's input and the residual branch around its block both cross the cut
    from memloc.probes.sweep import evaluate_subsets
    np.testing.assert_array_equal(cache.accuracy(), evaluate_subsets(model, task, batch_size=32))


def test_retraining_a_language_model_from_cached_activations(tiny_lm_master):
    """A GPT's cut carries its positions (the same for every batch) beside the per-sequence activations."""
    from memloc.probes.retraining import retrain
    cached = retrain(tiny_lm_master, save=False, epochs=1, batch_size=16)
    whole = retrain(tiny_lm_master, save=False, epochs=1, batch_size=16, cache=False)
    np.testing.assert_array_equal(cached.arrays["accuracy"], whole.arrays["accuracy"])
    from memloc.tasks.experiment import open_run
    loaded = open_run(tiny_lm_master)
    model = loaded.model()
    layer = layers(model)[0]  # the embedding: its cut carries the token ids (per sequence) and the positions
    cache = PrefixCache.build(model, task_of(loaded.data), layer, batch_size=16)
    assert cache is not None and not all(cache.per_example) and any(cache.per_example)


@pytest.fixture(scope="module")
def smoke_run(smoke_master, tmp_path_factory):
    return copy_of(smoke_master, tmp_path_factory.mktemp("speed") / "run")


def test_precision_is_recorded_and_resume_refuses_a_change(smoke_run, capsys):
    cfg = json.loads((smoke_run / "config.json").read_text())
    assert cfg["train"]["precision"] == "auto"
    # a run made before the setting existed keeps computing as it did: bf16 on a GPU, fp32 on a CPU
    from memloc.tasks.experiment import RunConfig
    cfg["train"].pop("precision")
    old = RunConfig.from_dict(cfg)
    assert old.train.precision == "gpu"
    cnn = build_model("cnn", input_shape=(1, 8, 8), num_classes=3, width=0.25)
    assert choose(old.train.precision, CPU, cnn, torch.zeros(2, 1, 8, 8)) == Arithmetic(bf16=False, channels_last=False)
    code = main(["train", "--resume", str(smoke_run), "--precision", "fp32", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "precision")
