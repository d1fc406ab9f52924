import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memloc import DataConfig, RunDir, TrainConfig, build_model, layers, load_data
from memloc.core.training import Trainer, epoch_seed, learning_rate, seeded
from memloc.tasks.classification.data import normalize
from memloc.tasks.experiment import ModelConfig, RunConfig, resume_training, run_training


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(DataConfig(dataset="digits", noise=0.2, train_size=96, seed=1))


def tiny_model(data, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", input_shape=data.input_shape, num_classes=10, width=0.25)


def test_schedules():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup=0.1)
    lrs = [learning_rate(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decays monotonically after warm-up
    one = TrainConfig(lr=0.1, schedule="onecycle", warmup=0.5)
    l1 = [learning_rate(s, 20, one) for s in range(20)]
    assert max(l1) == pytest.approx(0.1) and l1.index(max(l1)) == 9 and l1[-1] < 0.011


def test_gradient_accounting_equals_brute_force_masked_gradients(tiny_data):
    """Per layer: |sum clean grad| / sqrt(P), |sum noisy grad| / sqrt(P), cosine — against separate passes."""
    data = tiny_data
    # fp32: the brute force below computes in fp32 (auto would train this CNN in bf16 on a CPU with native bf16)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, schedule="constant", device="cpu", seed=4, precision="fp32")
    model = tiny_model(data)
    reference = copy.deepcopy(model)
    trainer = Trainer(model, data, cfg, progress=False)
    hist = trainer.fit()

    # brute force: replay the same steps; each share from its own forward/backward on the full batch
    ls = layers(reference)
    params = dict(reference.named_parameters())
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sums_c = {n: torch.zeros_like(p) for n, p in params.items()}
    sums_n = {n: torch.zeros_like(p) for n, p in params.items()}
    reference.train()
    with seeded(epoch_seed(4, 1), torch.device("cpu")):
        order = torch.randperm(data.num_train)
    for s in range(0, data.num_train, 32):
        idx = order[s:s + 32]
        x, y = normalize(data.x_train[idx]), data.y_train[idx]
        noisy = data.is_noisy[idx].float()
        grads = {}
        for name, w in (("clean", 1 - noisy), ("noisy", noisy)):
            reference.zero_grad()
            (F.cross_entropy(reference(x), y, reduction="none") * w / len(idx)).sum().backward()
            grads[name] = {n: p.grad.clone() for n, p in params.items()}
        for n, p in params.items():
            sums_c[n] += grads["clean"][n]
            sums_n[n] += grads["noisy"][n]
            p.grad = grads["clean"][n] + grads["noisy"][n]
        opt.step()
    g = hist.gradients
    for li, layer in enumerate(ls):
        c = torch.cat([sums_c[p].flatten() for p in layer.params])
        n = torch.cat([sums_n[p].flatten() for p in layer.params])
        assert g["clean_norm"][li, 0] == pytest.approx(float(c.norm() / math.sqrt(layer.num_params)), rel=1e-4)
        assert g["noisy_norm"][li, 0] == pytest.approx(float(n.norm() / math.sqrt(layer.num_params)), rel=1e-4)
        assert g["cosine"][li, 0] == pytest.approx(float(F.cosine_similarity(c, n, dim=0)), abs=1e-4)
    # and the trained weights are those of the replay: clean + noisy is exactly the step's gradient
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), n1


def test_records_and_training_is_deterministic(tiny_data):
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu", gradient_accounting=False)
    h1 = Trainer(tiny_model(tiny_data), tiny_data, cfg, progress=False).fit()
    state = torch.get_rng_state()
    h2 = Trainer(tiny_model(tiny_data), tiny_data, cfg, progress=False).fit()
    assert torch.equal(state, torch.get_rng_state())  # training leaves the caller's RNG alone
    assert h1.records["loss"].shape == (2, 96) and h1.records["correct"].dtype == bool
    assert np.array_equal(h1.records["loss"], h2.records["loss"])
    assert h1.metrics[-1]["clean_train_acc"] == h2.metrics[-1]["clean_train_acc"]
    assert h1.gradients is None
    m = h1.records["margin"][1]
    assert np.array_equal(m > 0, h1.records["correct"][1])  # positive margin <=> correct (no ties in float)


def _config(**train):
    return RunConfig(data=DataConfig(dataset="digits", noise=0.1, train_size=128, seed=0),
                     model=ModelConfig(name="cnn", width=0.25),
                     train=TrainConfig(epochs=3, batch_size=32, device="cpu", **train))


def test_run_directory_contents(tmp_path):
    run = run_training(_config(), tmp_path / "run", progress=False)
    assert run.saved_epochs() == [0, 1, 2, 3]
    for f in ("run.json", "config.json", "env.json", "metrics.jsonl", "data.npz", "examples.npz", "gradients.npz"):
        assert (run.path / f).exists(), f
    assert run.stage("train")["status"] == "done"
    assert len(run.read_metrics()) == 3
    ex = run.load_arrays("examples.npz")
    assert ex["loss"].shape == (3, 128) and ex["loss"].dtype == np.float16
    assert np.unpackbits(ex["correct_bits"], axis=1, count=128).shape == (3, 128)
    g = run.load_arrays("gradients.npz")
    assert g["clean_norm"].shape == (4, 3) and np.all(g["cosine"] >= -1) and np.all(g["cosine"] <= 1)
    state = run.load_checkpoint(3)
    assert "block1.1.running_mean" in state  # BatchNorm statistics are saved
    d = run.load_arrays("data.npz")
    assert d["is_noisy"].sum() == 12


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    full = run_training(_config(checkpoint_every=2), tmp_path / "full", progress=False)

    def die_in_epoch_3(line: str):
        if line.startswith("epoch   3"):  # epoch 3 trained but not saved: its work is lost
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(_config(checkpoint_every=2), tmp_path / "cut", progress=False, log=die_in_epoch_3)
    cut = RunDir.open(tmp_path / "cut")
    assert cut.stage("train")["last_checkpoint"] == 2
    resume_training(tmp_path / "cut", progress=False)
    a, b = full.load_checkpoint(3), cut.load_checkpoint(3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.read_metrics()[-1]["clean_train_acc"] == cut.read_metrics()[-1]["clean_train_acc"]
    assert [m["epoch"] for m in cut.read_metrics()] == [1, 2, 3]
    ga, gb = full.load_arrays("gradients.npz"), cut.load_arrays("gradients.npz")
    assert np.allclose(ga["cosine"], gb["cosine"])
    ea, eb = full.load_arrays("examples.npz"), cut.load_arrays("examples.npz")
    assert np.array_equal(ea["loss"], eb["loss"]) and np.array_equal(ea["correct_bits"], eb["correct_bits"])


def test_predict_restores_each_modules_own_mode(tiny_data):
    from memloc.core.inference import predict
    model = tiny_model(tiny_data)
    model.train()
    model.block1[1].eval()  # a frozen BatchNorm inside a training model
    predict(model, tiny_data.x_train[:8])
    assert model.training and not model.block1[1].training and model.block2[1].training
