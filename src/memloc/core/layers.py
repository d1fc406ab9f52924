"""`layers(model)`: the layers and units of any nn.Module, the unit every probe and method works on.

A *layer* is one conv or linear module together with the normalization and the
nonlinearity that directly consume its output; its *units* are its output
channels (conv) or output features (linear), and a unit's activation is the
output of the last module of that chain. `layers()` finds the chains by
running one forward pass and following which tensor each module consumes, so
a user's own model works without registration; a model that knows its layers
(the language models) says so with `memloc_layers()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


LINEAR_TYPES = (nn.Linear,)


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
              *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
             nn.Mish, nn.SELU, nn.CELU, nn.Softplus, nn.PReLU)


def check_input(model: nn.Module, input_shape: tuple[int, ...], *, example: torch.Tensor | None = None) -> None:
    """Run one tiny forward pass (on `example`, default zeros of `input_shape`); a model that cannot take this
    input fails with one clear line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example if example is not None else torch.zeros(2, *input_shape, device=_device_of(model)))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        what = "images" if len(input_shape) == 3 else "inputs"
        raise ConfigError(f"the model cannot take {what} of shape {tuple(input_shape)} ({first}): "
                          "choose another --model or resize the data") from None
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Layer:
    """One parametrized layer in forward order.

    `modules` are the qualified names of the chain (conv/linear, then the norm
    and activation that consume its output); `output` is the module whose
    output holds the units' activations; `params` / `buffers` the state-dict
    names of the layer and its norm (what rewinding restores).
    """

    index: int
    name: str
    kind: str  # "conv" or "linear"; a model's own layers (`memloc_layers`) may also be "embedding", "attention",
    # "mlp" or "unembedding" (a transformer block's parts: see memloc.tasks.lm.gpt)
    units: int
    modules: tuple[str, ...]
    output: str
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    num_params: int

    @property
    def unit_dim(self) -> int:
        """The dimension of the activation that indexes units: 1 for conv (N, C, ...), -2 for attention heads
        (B, T, heads, head_size), -1 otherwise (..., F)."""
        return 1 if self.kind == "conv" else -2 if self.kind == "attention" else -1


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES + LINEAR_TYPES)


def layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[Layer]:
    """The parametrized layers of `model` in forward order, with their units.

    A model that knows its own layers says so with a method `memloc_layers()`
    returning them (transformer language models: one layer per block's attention
    and MLP, see `memloc.tasks.lm`); it is used as it is. Otherwise traces one forward
    pass on `example_input` (default: zeros of
    `model.input_shape`, which registry models carry). Without either, falls
    back to registration order, pairing a layer with a norm registered right
    after it. Modules called only through functional code (e.g. inside
    nn.MultiheadAttention) are not seen by the trace and are not listed.
    """
    if callable(getattr(model, "memloc_layers", None)):
        return list(model.memloc_layers())
    if example_input is None and hasattr(model, "input_shape"):
        example_input = torch.zeros(2, *model.input_shape, device=_device_of(model))
    names = {m: n for n, m in model.named_modules()}
    chains = (_trace_chains(model, example_input, names) if example_input is not None
              else _registration_chains(model, names))
    if not chains:
        raise ConfigError("the model has no conv or linear layers: memloc probes units of conv and linear layers")
    modules = dict(model.named_modules())
    out = []
    for i, chain in enumerate(chains):
        head = modules[chain[0]]
        params = tuple(f"{n}.{p}" if n else p for n in chain for p, _ in modules[n].named_parameters(recurse=False))
        buffers = tuple(f"{n}.{b}" if n else b for n in chain for b, _ in modules[n].named_buffers(recurse=False)
                        if b != "num_batches_tracked")
        num = sum(t.numel() for n in chain for t in modules[n].parameters(recurse=False))
        kind = "conv" if isinstance(head, CONV_TYPES) else "linear"
        units = head.out_channels if kind == "conv" else head.out_features
        out.append(Layer(i, chain[0], kind, units, tuple(chain), chain[-1], params, buffers, num))
    return out


def _trace_chains(model, example_input, names) -> list[list[str]]:
    calls: list[tuple[nn.Module, object, object]] = []  # (module, first input, output) in call order
    seen: set[nn.Module] = set()

    times: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        times[module] = times.get(module, 0) + 1
        if module not in seen:
            seen.add(module)
            calls.append((module, inputs[0] if inputs else None, output))

    leaves = [m for m in model.modules() if _is_layer(m) or isinstance(m, NORM_TYPES + ACT_TYPES)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"the model cannot take the example input of shape {tuple(example_input.shape)} "
                          f"({first})") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    chains = []
    consumed: set[int] = set()
    by_input: dict[int, list[int]] = {}
    for j, (_, inp, _) in enumerate(calls):
        if isinstance(inp, torch.Tensor):
            by_input.setdefault(id(inp), []).append(j)
    for j, (m, _, out) in enumerate(calls):
        if not _is_layer(m):
            continue
        chain, current, has_norm, has_act = [names[m]], out, False, False
        # extend through at most one norm and one activation, each consuming the previous output
        while True:
            # the first module to consume this very tensor (an in-place ReLU passes the same
            # tensor on, so later consumers of it are the next block's, not this chain's)
            nxt = [k for k in by_input.get(id(current), []) if k > j and calls[k][1] is current and k not in consumed]
            if not nxt:
                break
            k = min(nxt)
            mod = calls[k][0]
            if times[mod] > 1:  # a module called at several places (torchvision's shared ReLU) is no one's unit output
                break
            if isinstance(mod, NORM_TYPES) and not has_norm:
                has_norm = True
            elif isinstance(mod, ACT_TYPES) and not has_act:
                has_act = True
            else:
                break
            consumed.add(k)
            chain.append(names[mod])
            current = calls[k][2]
        chains.append(chain)
    return chains


def _registration_chains(model, names) -> list[list[str]]:
    mods = list(model.named_modules())
    chains = []
    for i, (n, m) in enumerate(mods):
        if not _is_layer(m):
            continue
        chain = [n]
        units = m.out_channels if isinstance(m, CONV_TYPES) else m.out_features
        if i + 1 < len(mods):
            nn_, nxt = mods[i + 1]
            feats = getattr(nxt, "num_features", None) or getattr(nxt, "num_channels", None)
            if isinstance(nxt, NORM_TYPES) and feats == units:
                chain.append(nn_)
        chains.append(chain)
    return chains


def select_layers(all_layers: list[Layer], names: list[str] | None) -> list[Layer]:
    """The layers named in `names` (by name or 0-based index), or all; unknown names fail clearly."""
    if not names:
        return all_layers
    by_name = {l.name: l for l in all_layers}
    picked = []
    for n in names:
        if n in by_name:
            picked.append(by_name[n])
        elif str(n).isdigit() and int(n) < len(all_layers):
            picked.append(all_layers[int(n)])
        else:
            raise ConfigError(f"unknown layer {n!r}: the model's layers are {', '.join(by_name)}")
    return picked


def registry_name(model: nn.Module) -> str | None:
    """The registry name of a model memloc builds ("cnn1d" for `SmallCNN1d`, which `cnn` on sequences is too), as
    its class says (`memloc_name`); None for any other model: what picks its training recipe
    (`memloc.core.training.RECIPES`)."""
    return getattr(type(model), "memloc_name", None)

