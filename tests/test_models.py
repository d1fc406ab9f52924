import pytest
import torch
from torch import nn

from memloc import ConfigError, build_model, layers
from memloc.tasks.classification.models import MODELS, count_parameters, select_layers


def test_resnet9_is_the_papers():
    m = build_model("resnet9", input_shape=(3, 32, 32), num_classes=10)
    assert abs(count_parameters(m) - 2.27e6) < 0.01e6
    ls = layers(m)
    assert len(ls) == 9
    assert [l.units for l in ls] == [64, 128, 128, 128, 256, 256, 256, 128, 10]
    assert [l.kind for l in ls] == ["conv"] * 8 + ["linear"]
    # each conv is paired with its BatchNorm (params and running statistics) and its ReLU
    assert all(len(l.modules) == 3 and len(l.buffers) == 2 for l in ls[:8])
    assert ls[1].params == ("conv2.0.weight", "conv2.1.weight", "conv2.1.bias")
    assert sum(l.num_params for l in ls) == count_parameters(m)
    out = m(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_width_multiplier_scales_units():
    m = build_model("resnet9", input_shape=(1, 28, 28), num_classes=10, width=0.25)
    assert [l.units for l in layers(m)] == [16, 32, 32, 32, 64, 64, 64, 32, 10]


@pytest.mark.parametrize("name", list(MODELS))
def test_layers_on_every_registry_model(name):
    shape = (3, 32, 32) if name in ("resnet50", "vit") else (2, 40) if name == "cnn1d" else (1, 28, 28)
    width = 1.0 if name == "resnet50" else 0.25
    m = build_model(name, input_shape=shape, num_classes=7, width=width)
    ls = layers(m)
    assert ls[-1].units == 7 and ls[-1].kind == "linear"
    assert [l.index for l in ls] == list(range(len(ls)))
    assert len({l.name for l in ls}) == len(ls)
    mods = dict(m.named_modules())
    for l in ls:
        assert l.output in mods and l.units > 0
    if name == "resnet50":
        assert len(ls) == 54  # 49 convs + 4 shortcut convs + fc
        assert any("downsample" in l.name for l in ls)
        # torchvision reuses one ReLU per bottleneck: it must not be claimed as one layer's unit output
        assert all(not l.output.endswith(".relu") for l in ls[1:])
    if name == "vit":
        names = [l.name for l in ls]
        assert "blocks.0.attn.qkv" in names and "blocks.0.attn.proj" in names and "blocks.0.fc1" in names


class UserNet(nn.Module):
    """A model memloc has never seen: residual, LayerNorm, functional activation, shared module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.body(x)
        x = x.mean((2, 3))
        h = self.ln(x.new_zeros(()) + self.proj(x))  # LayerNorm of a *new* tensor: not proj's own output
        return self.out(h)


def test_layers_on_a_model_defined_here():
    m = UserNet()
    ls = layers(m, torch.zeros(2, 1, 8, 8))
    assert [l.name for l in ls] == ["stem", "body", "proj", "out"]
    assert ls[0].modules == ("stem", "bn") and ls[0].buffers == ("bn.running_mean", "bn.running_var")
    assert ls[2].modules == ("proj",)  # the LayerNorm consumes a sum, not proj's output
    assert [l.units for l in ls] == [8, 8, 16, 3]
    # without an example input: registration order, norm paired by adjacency
    ls2 = layers(m)
    assert [l.name for l in ls2] == ["stem", "body", "proj", "out"] and ls2[0].modules == ("stem", "bn")


def test_select_layers_and_errors():
    m = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, width=0.25)
    ls = layers(m)
    assert [l.name for l in select_layers(ls, ["block2.0", "0"])] == ["block2.0", "block1.0"]
    with pytest.raises(ConfigError, match="unknown layer"):
        select_layers(ls, ["nope"])
    with pytest.raises(ConfigError, match="no conv or linear"):
        layers(nn.Sequential(nn.ReLU()), torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("vgg", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ConfigError, match="cannot take images"):
        build_model("resnet9", input_shape=(1, 2, 2), num_classes=10)
    with pytest.raises(ConfigError, match="square"):
        build_model("vit", input_shape=(1, 28, 20), num_classes=10)


def test_models_take_the_shapes_they_say():
    """`memloc models`' shapes are what build_model accepts; a model that cannot take a shape says which can."""
    for name, spec in MODELS.items():
        for shape in [(1, 28, 28), (3, 32, 32), (1, 8, 8), (2, 40), (40,)]:
            if spec.fits(shape) and name != "resnet50":
                build_model(name, input_shape=shape, num_classes=3, width=0.25)
    with pytest.raises(ConfigError, match=r"resnet9 cannot take images of shape \(1, 8, 8\).*chooses cnn\)"):
        build_model("resnet9", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match=r"vit cannot take inputs of shape \(2, 40\)"):
        build_model("vit", input_shape=(2, 40), num_classes=10)
