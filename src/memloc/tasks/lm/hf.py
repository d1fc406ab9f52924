"""Hugging Face causal language models with memloc's layers: built from a config, or read from a local folder.

`HFCausalLM` wraps a transformers causal LM so that it looks like `memloc.tasks.lm.gpt.GPT`: ids (B, T) int64 ->
logits (B, T, V), a `.shape`, an `input_shape`, and `memloc_layers()` with the same names and kinds:

- ``embed``: the token (and learned position) embeddings; units are the residual features
  (output: ``embed_out``, an identity applied to the first block's input);
- ``blocks.{i}.attn``: block i's pre-norm and attention; a unit is one head (output: the ``tap`` of the
  attention's output projection, the heads' outputs (B, T, heads, head_dim) before the projection mixes them);
- ``blocks.{i}.mlp``: block i's pre-norm and MLP; a unit is one hidden neuron (output: the ``tap`` of the
  MLP's down projection: its input, act(fc(x)) for GELU MLPs and the gated product act(gate(x)) * up(x) for
  SwiGLU; the width is read from the tensors, never assumed 4 x n_embd);
- ``head``: the final norm and the unembedding; units are vocabulary logits.

Nothing is looked up per family. One forward pass at wrap time finds the parts: the decoder blocks are the
largest `nn.ModuleList` of one class; inside a block, the two children that hold parametrized submodules are
the attention and the MLP (in call order), each norm goes with the part it feeds (a NeoX block's
input_layernorm with its attention, post_attention_layernorm with its MLP, parallel residual or not); the
output projection of each part is the last parametrized 2-D-weight module it calls (GPT-2's Conv1D `c_proj`,
NeoX `dense` / `dense_4h_to_h`, Llama `o_proj` / `down_proj`), whose input width gives the heads' size and the
MLP's width; what the model calls before the first block is the embedding, after the last block the head.
Head counts come from the config's standard `num_attention_heads`.

Each output projection is replaced by a `Tap` holding it as ``.proj``, so its state-dict names gain ``.proj``
(``transformer.h.0.mlp.c_proj.weight`` -> ``hf.transformer.h.0.mlp.c_proj.proj.weight``; the wrapper holds the
model as ``hf``). A state dict of the wrapper loads into a wrapper of the same model as it is;
`load_inner_state_dict` takes the original Hugging Face names and `inner_state_dict` gives them back.

Tied weights are untied when wrapping (a documented choice, recorded in `tied_keys`): GPT-2 ties its
unembedding to the token embedding, which would make ``embed`` and ``head`` share a tensor (rewinding one
would rewind the other), and safetensors refuses to save shared tensors. The untied copy starts equal, so the
wrapped model computes exactly what the original does; from then on the two are trained separately, like
memloc's own GPT, which never ties.

The wrapper computes in the arithmetic in force (`memloc.core.precision`: a run's `precision`, an audit's
``--precision``): under bf16 its forward pass runs under bf16 autocast, the weights kept in float32 (so an edit and
an exported folder are exact) and the logits bf16 (the measures upcast them to float32 a chunk of positions at a
time, the losses whole); under fp32 it computes exactly what the plain model computes.

memloc never downloads and never runs a folder's code: `load_hf` reads a local folder only, as data
(`memloc.tasks.lm.hub`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.layers import Layer
from ...core.precision import autocast
from .gpt import layers_from_modules
from .hub import ATTENTION, load_pretrained, offline

FAMILIES = ("gpt2", "gpt_neox", "llama")
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face models need the transformers package: pip install transformers") from None
    return transformers


# ----------------------------------------------------------------------------- taps

class Tap(nn.Module):
    """`proj` with an identity `.tap` on its input, so a forward hook on `.tap` sees (and may edit) that input.

    With `heads`, the tap sees the input as (..., heads, head_dim): one unit per head.
    """

    def __init__(self, proj: nn.Module, *, heads: int | None = None):
        super().__init__()
        self.tap = nn.Identity()
        self.sink = nn.Identity()  # a per-unit layer after the tap (memorization sinks on an MLP's hidden units)
        self.proj = proj
        self.heads = heads

    @property
    def weight(self) -> torch.Tensor:  # model code that reads the projection's tensors still finds them
        return self.proj.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.proj, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.heads is None:
            return self.proj(self.sink(self.tap(x)), *args, **kwargs)  # (B, T, hidden)
        h = self.tap(x.unflatten(-1, (self.heads, -1)))  # (B, T, heads, head_dim)
        return self.proj(h.flatten(-2), *args, **kwargs)  # (B, T, heads * head_dim)


@dataclass(frozen=True)
class HFShape:
    """What memloc reads of a wrapped model's size (block_size: the most positions it takes)."""

    family: str  # the config's model_type
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    intermediate: int  # MLP hidden units per block


@dataclass(frozen=True)
class _Plan:
    """Where the parts are, found by `_find_parts` (module names relative to the inner model)."""

    blocks: str  # the ModuleList of decoder blocks
    n_layer: int
    attn: tuple[str, ...]  # per block, relative to it: the attention's norms then the attention, in call order
    mlp: tuple[str, ...]
    attn_proj: str  # per block, relative to it: the attention's output projection
    mlp_proj: str
    heads: int
    head_dim: int
    intermediate: int
    n_embd: int
    embed: tuple[str, ...]  # called before the first block
    head: tuple[str, ...]  # called after the last block, the unembedding last
    vocab_size: int


def _same_class_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]


def _find_parts(model: nn.Module, heads: int) -> _Plan:
    """Where `model`'s embedding, blocks (attention, MLP, their norms and output projections) and head are,
    from one forward pass of two tokens that records which module runs when (see the module docstring)."""
    lists = _same_class_lists(model)
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of decoder blocks (an nn.ModuleList of one class): "
                          "memloc cannot find its layers")
    blocks_name, blocks = max(lists, key=lambda nm: len(nm[1]))  # max keeps the first (outermost) of equal lists
    names = {m: n for n, m in model.named_modules()}
    events: list[tuple[str, str, tuple | None]] = []  # ("pre" | "post", module, input / output shape), call order

    def shape_of(x) -> tuple | None:
        return tuple(x.shape) if isinstance(x, torch.Tensor) else None

    def pre(m, args, kwargs):
        events.append(("pre", names[m], shape_of(args[0] if args else next(iter(kwargs.values()), None))))

    def post(m, args, out):
        events.append(("post", names[m], shape_of(out)))

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for m in model.modules():
            handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.tensor([[0, 1]], device=device), use_cache=False)  # (1, 2)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.train(t)

    first: dict[str, int] = {}  # module -> index of its first "pre" event
    last_pre: dict[str, int] = {}
    last_post: dict[str, int] = {}
    shapes_in: dict[str, tuple | None] = {}  # module -> its first input's shape
    shapes_out: dict[str, tuple | None] = {}
    for k, (kind, n, s) in enumerate(events):
        if kind == "pre":
            first.setdefault(n, k)
            shapes_in.setdefault(n, s)
            last_pre[n] = k
        else:
            last_post[n] = k
            shapes_out[n] = s
    mods = dict(model.named_modules())
    b0, bl = f"{blocks_name}.0", f"{blocks_name}.{len(blocks) - 1}"
    if b0 not in first:
        raise ConfigError(f"{type(model).__name__}: its blocks {blocks_name!r} did not run in a forward pass")

    def own_params(n: str) -> bool:
        return any(True for _ in mods[n].parameters(recurse=False))

    def holders(called: list[str]) -> tuple[str, ...]:
        """Modules with tensors of their own among `called`, outside the blocks and without a listed ancestor."""
        keep = [n for n in called if n and own_params(n) and not blocks_name.startswith(n + ".")
                and not n.startswith(blocks_name + ".")]
        return tuple(n for n in keep if not any(n.startswith(a + ".") for a in keep))

    embed = holders(sorted((n for n, k in first.items() if k < first[b0]), key=first.get))
    head = holders(sorted((n for n, k in first.items() if k > last_post[bl]), key=first.get))
    out_emb = names.get(model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    if not head or (out_emb is not None and head[-1] != out_emb):
        raise ConfigError(f"{type(model).__name__}: the unembedding is not the last module called: "
                          "memloc cannot find its head")

    # the block's children, in call order: those holding parametrized submodules are parts, the rest their norms
    block = mods[b0]
    children = sorted((f"{b0}.{c}" for c, _ in block.named_children() if f"{b0}.{c}" in first), key=first.get)
    parts = [c for c in children if any(own_params(f"{c}.{s}") for s, _ in mods[c].named_modules() if s)]
    if len(parts) != 2:
        raise ConfigError(f"{type(block).__name__} has {len(parts)} parts holding layers ({parts}), not an attention "
                          "and an MLP: memloc cannot split its blocks")
    groups: list[list[str]] = [[], []]
    for c in children:
        if c in parts or own_params(c):
            j = next((i for i, p in enumerate(parts) if first[p] >= first[c]), 1)  # a norm goes to the part it feeds
            groups[j].append(c)

    def proj_of(part: str) -> tuple[str, int]:
        """The last module with a 2-D weight that `part` calls (its output projection) and its input width."""
        called = [n for n, k in first.items() if n.startswith(part + ".") and k < last_post[part]
                  and isinstance(getattr(mods[n], "weight", None), torch.Tensor) and mods[n].weight.dim() == 2]
        if not called:
            raise ConfigError(f"{part} calls no linear module: memloc cannot find its output projection")
        proj = max(called, key=last_pre.get)  # the last call, should a module be called twice
        return proj, int(shapes_in[proj][-1])

    attn_proj, attn_width = proj_of(parts[0])
    mlp_proj, intermediate = proj_of(parts[1])
    if attn_width % heads:
        raise ConfigError(f"{attn_proj} takes {attn_width} features, not a multiple of {heads} heads")
    rel = len(b0) + 1
    return _Plan(blocks=blocks_name, n_layer=len(blocks),
                 attn=tuple(n[rel:] for n in groups[0]), mlp=tuple(n[rel:] for n in groups[1]),
                 attn_proj=attn_proj[rel:], mlp_proj=mlp_proj[rel:], heads=heads, head_dim=attn_width // heads,
                 intermediate=intermediate, n_embd=int(shapes_in[b0][-1]), embed=embed, head=head,
                 vocab_size=int(shapes_out[head[-1]][-1]))


def _untie(model: nn.Module) -> dict[str, str]:
    """Give every parameter registered under several names its own copy: {copy's name: source name}."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    for name, source in tied.items():
        owner, attr = name.rsplit(".", 1)
        src = model.get_parameter(source)
        setattr(model.get_submodule(owner), attr, nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad))
    if tied:  # so that transformers does not tie them again (tie_weights, save_pretrained)
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}
    return tied


def _rename(key: str, mapping: Mapping[str, str]) -> str:
    """`key` with its longest module prefix found in `mapping` replaced."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return ".".join([mapping[prefix], *parts[i:]])
    return key


# ----------------------------------------------------------------------------- the wrapper

class HFCausalLM(nn.Module):
    """A transformers causal LM with memloc's layers (see the module docstring); ids (B, T) -> logits (B, T, V).

    `model` is changed in place: its output projections are wrapped in `Tap`s and tied weights are untied
    (`tied_keys`: {untied copy: source}, Hugging Face names). `block_size` overrides the config's
    `max_position_embeddings`.
    """

    def __init__(self, model: nn.Module, *, block_size: int | None = None):
        super().__init__()
        cfg = model.config
        block_size = block_size or getattr(cfg, "max_position_embeddings", None)
        if not block_size:
            raise ConfigError(f"{type(model).__name__}'s config has no max_position_embeddings: pass block_size")
        self.tied_keys = _untie(model)
        plan = self.plan = _find_parts(model, int(cfg.num_attention_heads))
        self.shape = HFShape(family=str(getattr(cfg, "model_type", type(model).__name__)),
                             vocab_size=plan.vocab_size, block_size=int(block_size), n_layer=plan.n_layer,
                             n_head=plan.heads, n_embd=plan.n_embd, intermediate=plan.intermediate)
        self.input_shape = (self.shape.block_size,)
        self.taps: dict[str, str] = {}  # module: original name -> its Tap's name (inner model names)
        for i in range(plan.n_layer):
            for rel, heads in ((plan.attn_proj, plan.heads), (plan.mlp_proj, None)):
                name = f"{plan.blocks}.{i}.{rel}"
                owner, attr = name.rsplit(".", 1)
                setattr(model.get_submodule(owner), attr, Tap(model.get_submodule(name), heads=heads))
                self.taps[name] = f"{name}.proj"
        self.hf = model
        self.embed_out = nn.Identity()  # its output (B, T, n_embd), the first block's input, holds the embed units
        model.get_submodule(f"{plan.blocks}.0").register_forward_pre_hook(self._tap_embedding, with_kwargs=True)

    def _tap_embedding(self, module, args, kwargs):
        if args:
            return (self.embed_out(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.embed_out(kwargs["hidden_states"])}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.shape.block_size:
            raise ConfigError(f"a sequence of {ids.shape[1]} tokens is longer than the model's block size "
                              f"{self.shape.block_size}")
        # a context per pass, nothing cached: an edit between two passes changes the weights in place
        with autocast(ids.device, cache=False):
            return self.hf(input_ids=ids, use_cache=False).logits  # (B, T, V); bf16 under bf16 arithmetic

    def memloc_layers(self) -> list[Layer]:
        p, s = self.plan, self.shape
        specs = [("embed", "embedding", s.n_embd, tuple(f"hf.{n}" for n in p.embed), "embed_out")]
        for i in range(p.n_layer):
            b = f"hf.{p.blocks}.{i}"
            specs.append((f"blocks.{i}.attn", "attention", s.n_head, tuple(f"{b}.{n}" for n in p.attn),
                          f"{b}.{p.attn_proj}.tap"))
            specs.append((f"blocks.{i}.mlp", "mlp", s.intermediate, tuple(f"{b}.{n}" for n in p.mlp),
                          f"{b}.{p.mlp_proj}.tap"))
        specs.append(("head", "unembedding", s.vocab_size, tuple(f"hf.{n}" for n in p.head), f"hf.{p.head[-1]}"))
        saved = set(self.state_dict())  # non-persistent buffers (rotary tables) are not part of a layer's state
        return [dataclasses.replace(l, buffers=tuple(b for b in l.buffers if b in saved))
                for l in layers_from_modules(self, specs)]

    def place_sinks(self, after_block) -> None:
        """Put `after_block(i, units)` on the hidden units of block i's MLP (before its down projection)."""
        p = self.plan
        for i in range(p.n_layer):
            self.hf.get_submodule(f"{p.blocks}.{i}.{p.mlp_proj}").sink = after_block(i, p.intermediate)

    def mlp_down(self, i: int) -> nn.Module:
        """Block i's MLP down projection (nn.Linear, or GPT-2's Conv1D whose weight is (in, out))."""
        return self.hf.get_submodule(f"{self.plan.blocks}.{i}.{self.plan.mlp_proj}").proj

    def inner_state_dict(self) -> dict[str, torch.Tensor]:
        """The inner model's state under its original Hugging Face names (no ``hf.``, no ``.proj``)."""
        back = {v: k for k, v in self.taps.items()}
        return {_rename(k, back): v for k, v in self.hf.state_dict().items()}

    def load_inner_state_dict(self, state: Mapping[str, torch.Tensor], *, strict: bool = True):
        """Load a state under the original module names (`state_dict()` of the plain transformers model).

        An untied copy missing from `state` (tied models store only the source) takes the source. A checkpoint
        folder is read with `load_hf` instead: transformers renames legacy keys on the way in (a GPT-NeoX file
        stores ``lm_head`` as ``embed_out``), which a plain state-dict load would not.
        """
        state = dict(state)
        for copy, source in self.tied_keys.items():
            if copy not in state and source in state:
                state[copy] = state[source]
        return self.hf.load_state_dict({_rename(k, self.taps): v for k, v in state.items()}, strict=strict)


# ----------------------------------------------------------------------------- builders

def build_hf(family: str, *, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
             intermediate: int | None = None, n_kv_head: int | None = None, dropout: float = 0.0, seed: int = 0,
             attn_implementation: str = ATTENTION) -> HFCausalLM:
    """A randomly initialized Hugging Face model of `family` (gpt2, gpt_neox, llama), wrapped.

    `intermediate`: MLP width (default 4 x n_embd; llama: 8/3 x n_embd rounded up to a multiple of 8, the
    SwiGLU width of the same parameter count); `n_kv_head`: llama's key/value heads (default n_head).
    Initialized under `seed` without touching the caller's random state.
    """
    t = _transformers()
    if family not in FAMILIES:
        raise ConfigError(f"unknown Hugging Face family {family!r}: choose one of {', '.join(FAMILIES)}")
    if n_embd % n_head:
        raise ConfigError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    if family == "llama":
        width = intermediate or -(-8 * n_embd // 3 // 8) * 8
        cfg = t.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=block_size, num_hidden_layers=n_layer,
                            num_attention_heads=n_head, num_key_value_heads=n_kv_head or n_head, hidden_size=n_embd,
                            intermediate_size=width, attention_dropout=dropout, tie_word_embeddings=False)
    elif family == "gpt_neox":
        cfg = t.GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=block_size, num_hidden_layers=n_layer,
                              num_attention_heads=n_head, hidden_size=n_embd,
                              intermediate_size=intermediate or 4 * n_embd, attention_dropout=dropout,
                              hidden_dropout=dropout, tie_word_embeddings=False)
    else:  # GPT-2's end-of-text id is its last one; defaults (50256) would lie outside a small vocabulary
        cfg = t.GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, n_inner=intermediate, resid_pdrop=dropout, embd_pdrop=dropout,
                           attn_pdrop=dropout, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]), offline():
        torch.manual_seed(seed)
        model = t.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return HFCausalLM(model)


def load_hf(path: str | Path, *, attn_implementation: str = ATTENTION) -> HFCausalLM:
    """The Hugging Face causal LM saved in the local folder `path` (save_pretrained), in float32, wrapped.

    memloc never downloads and never runs a folder's code: a name that is not a folder (a hub name) is a
    ConfigError, and so is a folder whose files ask for code or the hub (`memloc.tasks.lm.hub`); pickled weights are
    read with `weights_only=True`. The attention is memloc's choice (`attn_implementation`), whatever config.json names.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"'{path}' is not a folder: memloc never downloads: download the model elsewhere and pass "
                          "its folder (--model hf:PATH)")
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder}: no {CONFIG_FILE}: save the model there with model.save_pretrained(folder)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{folder}: no weights (none of {', '.join(WEIGHT_FILES)}): "
                          "save the model there with model.save_pretrained(folder)")
    t = _transformers()
    model = load_pretrained(t.AutoModelForCausalLM.from_pretrained, folder, "a Hugging Face causal LM",
                            dtype=torch.float32, weights_only=True, attn_implementation=attn_implementation)
    return HFCausalLM(model)
