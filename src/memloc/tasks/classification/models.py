"""The classification models memloc builds by name (ResNet-9, the small CNNs, the MLP, the paper's ViT,
torchvision's) and the default for a data shape. Layers and units of any model: `memloc.core.layers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.layers import (  # noqa: F401 - re-exported: memloc.models' old names, for one release
    ACT_TYPES,
    CONV_TYPES,
    LINEAR_TYPES,
    NORM_TYPES,
    Layer,
    check_input,
    count_parameters,
    layers,
    registry_name,
    select_layers,
)

# A factory for the module placed after each block, e.g. example-tied dropout:
# called with (position among the placed modules, number of units).
AfterBlock = Callable[[int, int], nn.Module]



# ----------------------------------------------------------------------------- building blocks

class Mul(nn.Module):
    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x * self.weight


class Residual(nn.Module):
    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.block = nn.Sequential(*blocks)

    def forward(self, x):
        return x + self.block(x)


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    """conv (no bias) -> BatchNorm -> ReLU, the FFCV ResNet-9 block."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def conv_bn1d(c_in: int, c_out: int, kernel_size: int = 3, padding: int = 1) -> nn.Sequential:
    """conv1d (no bias) -> BatchNorm1d -> ReLU: `conv_bn` over sequences (B, C, L)."""
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size=kernel_size, padding=padding, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


class ChannelsLast(nn.Module):
    """A per-unit module of token activations (B, T, F) applied to conv activations (B, C, L): channels moved last
    and back, so the module's unit is a channel at every position (example-tied dropout's one decision per
    channel, as for images)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)  # (B, C, L) -> (B, L, C) -> (B, C, L)


def _after(after_block: AfterBlock | None, position: int, units: int) -> nn.Module:
    return nn.Identity() if after_block is None else after_block(position, units)


def _after1d(after_block: AfterBlock | None, position: int, units: int) -> nn.Module:
    return nn.Identity() if after_block is None else ChannelsLast(after_block(position, units))


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


# ----------------------------------------------------------------------------- registry models

class ResNet9(nn.Module):
    """The paper's FFCV-style ResNet-9 (2.27M parameters at width 1, 10 classes).

    conv 64, conv 128 (k5, s2), res[128, 128], conv 256, maxpool, res[256, 256],
    conv 128 (padding 0), global max pool, linear without bias, output x 0.2.
    `after_block` modules (example-tied dropout) sit after each of the six blocks,
    where the published code put its dropout.
    """

    memloc_name = "resnet9"  # its registry name: what picks its training recipe

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 after_block: AfterBlock | None = None):
        super().__init__()
        c = [_ch(x, width) for x in (64, 128, 256, 128)]
        self.conv1 = conv_bn(in_channels, c[0])
        self.drop1 = _after(after_block, 0, c[0])
        self.conv2 = conv_bn(c[0], c[1], kernel_size=5, stride=2, padding=2)
        self.drop2 = _after(after_block, 1, c[1])
        self.res1 = Residual(conv_bn(c[1], c[1]), conv_bn(c[1], c[1]))
        self.drop3 = _after(after_block, 2, c[1])
        self.conv3 = conv_bn(c[1], c[2])
        self.drop4 = _after(after_block, 3, c[2])
        self.pool1 = nn.MaxPool2d(2)
        self.res2 = Residual(conv_bn(c[2], c[2]), conv_bn(c[2], c[2]))
        self.drop5 = _after(after_block, 4, c[2])
        self.conv4 = conv_bn(c[2], c[3], padding=0)
        self.drop6 = _after(after_block, 5, c[3])
        self.pool2 = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c[3], num_classes, bias=False)
        self.scale = Mul(0.2)

    def forward(self, x):
        x = self.drop1(self.conv1(x))
        x = self.drop2(self.conv2(x))
        x = self.drop3(self.res1(x))
        x = self.pool1(self.drop4(self.conv3(x)))
        x = self.drop5(self.res2(x))
        x = self.drop6(self.conv4(x))
        return self.scale(self.linear(self.flatten(self.pool2(x))))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 128 channels x width), two max pools, global average pool, linear."""

    memloc_name = "cnn"  # its registry name: what picks its training recipe

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 after_block: AfterBlock | None = None):
        super().__init__()
        c = [_ch(x, width) for x in (32, 64, 128)]
        self.block1 = conv_bn(in_channels, c[0])
        self.drop1 = _after(after_block, 0, c[0])
        self.block2 = conv_bn(c[0], c[1])
        self.drop2 = _after(after_block, 1, c[1])
        self.block3 = conv_bn(c[1], c[2])
        self.drop3 = _after(after_block, 2, c[2])
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(c[2], num_classes)

    def forward(self, x):
        x = self.pool(self.drop1(self.block1(x)))
        x = self.pool(self.drop2(self.block2(x)))
        x = self.drop3(self.block3(x))
        return self.linear(self.head(x))


class SmallCNN1d(nn.Module):
    """`SmallCNN` over sequences (B, C, L): three conv1d-BN-ReLU blocks (32, 64, 128 channels x width), two max
    pools, global average pool, linear. Features (B, F) are read as one channel (B, 1, F)."""

    memloc_name = "cnn1d"  # its registry name: what picks its training recipe

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 after_block: AfterBlock | None = None):
        super().__init__()
        c = [_ch(x, width) for x in (32, 64, 128)]
        self.block1 = conv_bn1d(in_channels, c[0])
        self.drop1 = _after1d(after_block, 0, c[0])
        self.block2 = conv_bn1d(c[0], c[1])
        self.drop2 = _after1d(after_block, 1, c[1])
        self.block3 = conv_bn1d(c[1], c[2])
        self.drop3 = _after1d(after_block, 2, c[2])
        self.pool = nn.MaxPool1d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.linear = nn.Linear(c[2], num_classes)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, F) -> (B, 1, F)
        x = self.pool(self.drop1(self.block1(x)))
        x = self.pool(self.drop2(self.block2(x)))
        x = self.drop3(self.block3(x))
        return self.linear(self.head(x))


class MLP(nn.Module):
    """Flatten, two hidden layers of 512 x width with ReLU, linear head."""

    memloc_name = "mlp"  # its registry name: what picks its training recipe

    def __init__(self, *, in_features: int, num_classes: int = 10, width: float = 1.0,
                 after_block: AfterBlock | None = None):
        super().__init__()
        h = _ch(512, width)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Sequential(nn.Linear(in_features, h), nn.ReLU(inplace=True))
        self.drop1 = _after(after_block, 0, h)
        self.fc2 = nn.Sequential(nn.Linear(h, h), nn.ReLU(inplace=True))
        self.drop2 = _after(after_block, 1, h)
        self.head = nn.Linear(h, num_classes)

    def forward(self, x):
        return self.head(self.drop2(self.fc2(self.drop1(self.fc1(self.flatten(x))))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hs)
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, after: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.drop_mem = after  # example-tied dropout on the MLP's hidden units
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.dropout(self.attn(self.norm1(x)))
        h = self.drop_mem(self.act(self.fc1(self.norm2(x))))
        return x + self.dropout(self.fc2(self.dropout(h)))


class ViT(nn.Module):
    """The paper's small ViT: patch 2, dim 512, depth 6, 8 heads, MLP 512, dropout 0.1 (dims x width)."""

    memloc_name = "vit"  # its registry name: what picks its training recipe

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0,
                 patch_size: int = 2, depth: int = 6, heads: int = 8, dropout: float = 0.1,
                 after_block: AfterBlock | None = None):
        super().__init__()
        dim = max(heads, _ch(512, width) // heads * heads)
        mlp_dim = _ch(512, width)
        if image_size % patch_size:
            raise ConfigError(f"image size {image_size} is not a multiple of the ViT patch size {patch_size}")
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_dim, dropout, _after(after_block, i, mlp_dim))
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, T, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(self.emb_dropout(x))
        return self.head(self.norm(x[:, 0]))


def resnet50(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-50 as the paper used it: torchvision stem, N-way head."""
    import torchvision
    model = torchvision.models.resnet50(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


@dataclass(frozen=True)
class ModelSpec:
    """A registry model: how to build it for an input shape, which input shapes it takes (`fits`, and in words,
    `shapes`), and whether it has a place for a per-block layer such as example-tied dropout."""

    description: str
    build: Callable[..., nn.Module]  # (input_shape, num_classes, width, after_block) -> nn.Module
    takes_after_block: bool = True
    shapes: str = "any input shape"
    fits: Callable[[tuple[int, ...]], bool] = lambda shape: True


def _image(shape: tuple[int, ...], side: int = 1) -> bool:
    return len(shape) == 3 and min(shape[1:]) >= side


def _sequence(shape: tuple[int, ...]) -> bool:
    return len(shape) in (1, 2) and shape[-1] >= 4


def _build_resnet9(shape, k, width, after):
    return ResNet9(in_channels=shape[0], num_classes=k, width=width, after_block=after)


def _build_cnn(shape, k, width, after):
    if len(shape) < 3:  # sequences or features: its 1-D form
        return _build_cnn1d(shape, k, width, after)
    return SmallCNN(in_channels=shape[0], num_classes=k, width=width, after_block=after)


def _build_cnn1d(shape, k, width, after):
    return SmallCNN1d(in_channels=shape[0] if len(shape) == 2 else 1, num_classes=k, width=width, after_block=after)


def _build_mlp(shape, k, width, after):
    return MLP(in_features=math.prod(shape), num_classes=k, width=width, after_block=after)


def _build_vit(shape, k, width, after):
    c, h, w = shape
    if h != w:
        raise ConfigError(f"the ViT takes square images, not {h}x{w}: choose another --model")
    return ViT(in_channels=c, num_classes=k, image_size=h, width=width, after_block=after)


def _build_resnet50(shape, k, width, after):
    if width != 1.0:
        raise ConfigError("resnet50 has no width multiplier: leave --width at 1")
    return resnet50(in_channels=shape[0], num_classes=k)


MODELS: dict[str, ModelSpec] = {
    "resnet9": ModelSpec("the paper's FFCV ResNet-9 (2.27M parameters at width 1); --width scales channels",
                         _build_resnet9, shapes="images (C, H, W) of at least 11x11",
                         fits=lambda s: _image(s, 11)),
    "resnet50": ModelSpec("torchvision ResNet-50 with the paper's (torchvision) stem and an N-way head",
                          _build_resnet50, False, shapes="images (C, H, W); made for 32x32 and larger",
                          fits=_image),
    "vit": ModelSpec("the paper's small ViT: patch 2, dim 512, depth 6, 8 heads, MLP 512, dropout 0.1", _build_vit,
                     shapes="square images (C, S, S), S even",
                     fits=lambda s: len(s) == 3 and s[1] == s[2] and s[1] % 2 == 0),
    "cnn": ModelSpec("small 3-block conv net (32/64/128 channels x width); fast on CPU", _build_cnn,
                     shapes="images (C, H, W) of at least 4x4; sequences and features as cnn1d",
                     fits=lambda s: _image(s, 4) or _sequence(s)),
    "cnn1d": ModelSpec("the small conv net over sequences: 3 conv1d blocks (32/64/128 channels x width)", _build_cnn1d,
                       shapes="sequences (C, L), or features (F,) as one channel; length at least 4",
                       fits=_sequence),
    "mlp": ModelSpec("2 hidden layers of 512 x width; fastest on CPU", _build_mlp,
                     shapes="any shape (flattened)"),
}

# The CPU default, chosen by measurement (README, "Choosing the CPU default"):
# the paper's architecture at a quarter of its width memorizes 10% noise on
# mnist5k in a few minutes on 2 cores.
CPU_DEFAULT_MODEL = ("resnet9", 0.25)
GPU_DEFAULT_MODEL = ("resnet9", 1.0)
# What an input shape gets when no model is named, by its rank: the first that fits, else the MLP.
DEFAULT_MODELS = {3: ("resnet9", "cnn"), 2: ("cnn1d",), 1: ()}


def shape_words(shape: tuple[int, ...]) -> str:
    """"1x8x8 images", "2x40 sequences", "40 features": an input shape in words."""
    kind = {3: "images", 2: "sequences", 1: "features"}.get(len(shape), "inputs")
    return f"{'x'.join(str(int(v)) for v in shape)} {kind}"


def default_model(input_shape: tuple[int, ...], *, device_type: str = "cpu") -> tuple[str, float]:
    """(name, width) of the model for inputs of `input_shape` when none is named: the paper's ResNet-9 for
    images it takes (width 0.25 on a CPU, 1 on a GPU), the small CNN for smaller images, the 1-D CNN for
    sequences (C, L), the MLP for features (F,) and anything else (width 1)."""
    shape = tuple(input_shape)
    for name in DEFAULT_MODELS.get(len(shape), ()):
        if MODELS[name].fits(shape):
            if name == CPU_DEFAULT_MODEL[0]:
                return GPU_DEFAULT_MODEL if device_type == "cuda" else CPU_DEFAULT_MODEL
            return name, 1.0
    return "mlp", 1.0


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
                after_block: AfterBlock | None = None) -> nn.Module:
    """A registry model for inputs of `input_shape` ((C, H, W) images, (C, L) sequences, (F,) features) and
    `num_classes` classes."""
    if name.startswith(TORCHVISION):
        return _torchvision(name, tuple(int(v) for v in input_shape), num_classes, width, after_block)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or torchvision:NAME")
    if not (0 < width <= 16):
        raise ConfigError(f"width {width} is out of range: pass a multiplier in (0, 16], e.g. --width 0.25")
    spec = MODELS[name]
    if after_block is not None and not spec.takes_after_block:
        raise ConfigError(f"model {name!r} has no place for a per-block layer such as example-tied dropout: "
                          "choose resnet9, cnn, cnn1d, mlp or vit")
    shape = tuple(int(v) for v in input_shape)
    if not spec.fits(shape):
        others = [n for n, sp in MODELS.items() if sp.fits(shape)]
        what = "images" if len(shape) == 3 else "inputs"
        raise ConfigError(f"{name} cannot take {what} of shape {shape}: it takes {spec.shapes}; leave --model out "
                          f"(memloc then chooses {default_model(shape)[0]}) or choose one of {', '.join(others)}")
    model = spec.build(shape, num_classes, width, after_block)
    model.input_shape = shape  # lets layers() trace the model without an example input
    check_input(model, shape)
    return model


TORCHVISION = "torchvision:"  # --model torchvision:NAME: a torchvision classification model, randomly initialized


def _torchvision(name: str, shape: tuple[int, ...], num_classes: int, width: float,
                 after_block: AfterBlock | None) -> nn.Module:
    """torchvision's classification model NAME (`torchvision.models.list_models`), built by torchvision itself
    with `num_classes` outputs and no pretrained weights (nothing is downloaded): what a user who trained one audits
    (`memloc audit --weights FILE --model torchvision:NAME`). Its layers are torchvision's own: no --width, no
    per-block layer."""
    try:
        import torchvision
    except ImportError:
        raise ConfigError(f"--model {name} needs torchvision: pip install torchvision") from None
    arch = name[len(TORCHVISION):]
    known = torchvision.models.list_models(module=torchvision.models)  # the classification models
    if arch not in known:
        close = [k for k in known if k.startswith(arch[:4])][:6] or known[:6]
        raise ConfigError(f"torchvision has no classification model {arch!r}: pass --model torchvision:NAME with "
                          f"NAME one of torchvision.models.list_models(), e.g. {', '.join(close)}")
    if width != 1.0:
        raise ConfigError(f"--width scales memloc's own models, not torchvision's {arch}: drop --width")
    if after_block is not None:
        raise ConfigError(f"torchvision's {arch} has no place for a per-block layer such as example-tied dropout: "
                          "choose resnet9, cnn, cnn1d, mlp or vit")
    if len(shape) != 3 or shape[0] != 3:
        raise ConfigError(f"torchvision's {arch} takes 3-channel images (3, H, W), not inputs of shape {shape}: "
                          "choose a memloc model (memloc models lists them)")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    model.input_shape = shape
    check_input(model, shape)
    return model








# ----------------------------------------------------------------------------- layers and units











