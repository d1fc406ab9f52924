"""A small GPT in plain PyTorch (pre-LayerNorm, causal `scaled_dot_product_attention`, GELU MLP 4x, or ReLU with
``activation="relu"``: TinyMem's) that names its own layers for memloc's probes.

Layers (`GPT.memloc_layers()`, what `memloc.layers(model)` returns), in forward order:

- ``embed``: token and position embeddings; units are the residual features (output: ``embed_out``);
- ``blocks.{i}.attn``: block i's LayerNorm and attention; a unit is one head (output:
  ``blocks.{i}.attn.heads``, the heads' outputs (B, T, heads, head_size) before the projection mixes them);
- ``blocks.{i}.mlp``: block i's LayerNorm and MLP; a unit is one hidden neuron after the GELU (or ReLU)
  (output: ``blocks.{i}.mlp.act``, (B, T, 4 x n_embd));
- ``head``: the final LayerNorm and the unembedding; units are vocabulary logits.

Zeroing a unit zeroes that activation for every position; rewinding a layer restores all its
parameters (its LayerNorm included). Input: token ids (B, T) int64; output: logits (B, T, vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from ...core.layers import Layer

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


@dataclass(frozen=True)
class GPTShape:
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    activation: str = "gelu"  # the MLP's: "gelu" (GPT-2's) or "relu" (TinyMem's)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-embd {self.n_embd} is not a multiple of --n-head {self.n_head}: "
                              "each head takes n_embd / n_head features")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout {self.dropout} is outside [0, 1)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}: choose from {', '.join(ACTIVATIONS)}")


class SelfAttention(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.n_head = s.n_head
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd)
        self.heads = nn.Identity()  # its output (B, T, heads, head_size) holds the units: one per head
        self.proj = nn.Linear(s.n_embd, s.n_embd)
        self.dropout = s.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = self.heads(y.transpose(1, 2))  # (B, T, h, hs)
        return self.proj(y.reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, s: GPTShape, after: nn.Module | None = None):
        super().__init__()
        self.fc = nn.Linear(s.n_embd, 4 * s.n_embd)
        self.act = ACTIVATIONS[s.activation]()  # its output (B, T, 4 n_embd) holds the units: one per hidden neuron
        self.sink = after if after is not None else nn.Identity()  # a per-neuron layer (memorization sinks)
        self.proj = nn.Linear(4 * s.n_embd, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.sink(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, s: GPTShape, after: nn.Module | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(s.n_embd)
        self.attn = SelfAttention(s)
        self.ln_2 = nn.LayerNorm(s.n_embd)
        self.mlp = MLP(s, after)
        self.drop = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """nanoGPT's architecture without weight tying (the embedding and the unembedding are separate layers)."""

    def __init__(self, shape: GPTShape, *, after_block=None):
        super().__init__()
        s = self.shape = shape
        self.wte = nn.Embedding(s.vocab_size, s.n_embd)
        self.wpe = nn.Embedding(s.block_size, s.n_embd)
        self.embed_out = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList([Block(s, after_block(i, 4 * s.n_embd) if after_block else None)
                                     for i in range(s.n_layer)])
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        self.input_shape = (s.block_size,)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * s.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)  # longer than block_size: an index error (no branch: fx)
        x = self.embed_out(self.wte(ids) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def memloc_layers(self) -> list[Layer]:
        s = self.shape
        specs: list[tuple[str, str, int, tuple[str, ...], str]] = [("embed", "embedding", s.n_embd,
                                                                    ("wte", "wpe"), "embed_out")]
        for i in range(s.n_layer):
            p = f"blocks.{i}"
            specs.append((f"{p}.attn", "attention", s.n_head, (f"{p}.ln_1", f"{p}.attn"), f"{p}.attn.heads"))
            specs.append((f"{p}.mlp", "mlp", 4 * s.n_embd, (f"{p}.ln_2", f"{p}.mlp"), f"{p}.mlp.act"))
        specs.append(("head", "unembedding", s.vocab_size, ("ln_f", "lm_head"), "lm_head"))
        return layers_from_modules(self, specs)


def layers_from_modules(model: nn.Module, specs) -> list[Layer]:
    """Layers from (name, kind, units, modules, output) rows: params and buffers are every tensor of the modules."""
    modules = dict(model.named_modules())
    out = []
    for i, (name, kind, units, mods, output) in enumerate(specs):
        params = tuple(f"{m}.{p}" for m in mods for p, _ in modules[m].named_parameters())
        buffers = tuple(f"{m}.{b}" for m in mods for b, _ in modules[m].named_buffers()
                        if not b.endswith("num_batches_tracked"))
        num = sum(t.numel() for m in mods for t in modules[m].parameters())
        out.append(Layer(i, name, kind, units, tuple(mods), output, params, buffers, num))
    return out


def count_non_embedding(model: GPT) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe")))
