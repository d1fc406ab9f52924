"""Example-tied dropout (paper section 5) and the standard-dropout baselines.

In every layer the first ``floor(p_gen * units)`` units are generalization units
and are always on. Each remaining (memorization) unit ``u`` is kept for training
example ``i`` with probability ``p_mem``; the decision is a stateless 32-bit
integer hash of ``(seed, layer_id, i, u)``, so an example meets the same
sub-network in every epoch, nothing is stored per example, and no global RNG is
touched. At test time the memorization units are dropped ("drop"), or kept and
scaled by their training expectation ("eval").

A unit is one channel of a 4-D ``(N, C, H, W)`` activation (one decision for all
spatial positions) or one feature of a ``(N, F)`` / ``(N, T, F)`` activation
(one decision for all ``T`` positions). A 1-D conv net's ``(N, C, L)`` activations
are channels first: wrap the layer in :class:`memloc.tasks.classification.models.ChannelsLast` (as
``cnn1d`` does) for one decision per channel.

The layer does not change the host model's ``forward`` signature: the trainer
passes the batch's dataset indices with :func:`example_indices`::

    with example_indices(model, idx):   # idx: (N,) int64 dataset positions
        logits = model(x)

and picks the test-time behaviour with :func:`dropout_mode` (or
:func:`set_dropout_mode`)::

    model.eval()
    with dropout_mode(model, "drop"):
        logits = model(x)

The hash, with F a 32-bit avalanche finalizer (hash-prospector's
[16 21f0aaad 15 735a2d97 15]) and k.. 32-bit keys derived from the seed::

    a_i = F((i ^ (i >> 32)) mod 2**32  ^  k_seed)            # per example, (N,)
    b_u = F((u + 1) * 0x9E3779B9 mod 2**32  ^  k_seed,layer)  # per unit, cached
    keep(i, u) = F(a_i ^ b_u) < ceil(p_mem * 2**32)           # 32-bit resolution

It is pure integer arithmetic on int64 tensors whose intermediates stay below
2**63 (32-bit values times constants below 2**31, masked after each multiply),
so masks are bit-identical on CPU and CUDA and reproducible from the seed alone;
:func:`_hash_reference` is the plain-Python reference the tests compare against.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = [
    "MODES",
    "EVAL_MODES",
    "DROP_SCALES",
    "TIES",
    "num_generalization_units",
    "expected_active_fraction",
    "memorization_mask",
    "unit_hash",
    "example_tied_dropout",
    "ExampleTiedDropout",
    "find_example_tied_dropout",
    "example_indices",
    "set_dropout_mode",
    "dropout_mode",
    "insert_example_tied_dropout",
    "ChannelDropout",
    "FixedUnitMask",
]

MODES = ("train", "tied", "eval", "drop")
EVAL_MODES = ("tied", "eval", "drop")  # what an ExampleTiedDropout does when not training
DROP_SCALES = ("matched", "paper", "none")
TIES = ("document", "sequence")  # what a language model's example id names: a token's document, or its training row

# ---------------------------------------------------------------------------
# The hash. Everything is kept in [0, 2**32) inside int64 tensors.
# ---------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_TWO31 = 1 << 31
# Finalizer constants: Chris Wellons' hash-prospector 2-round 32-bit hash
# [16 21f0aaad 15 735a2d97 15] (bias ~0.108, better than murmur3's fmix32).
# Both constants are below 2**31, so x * c < 2**63 for any 32-bit x.
_F1 = 0x21F0AAAD
_F2 = 0x735A2D97
_GOLDEN = 0x9E3779B9  # 2**32 / phi, odd: a Weyl step
# Domain tags so that the per-example masks and the fixed-unit baseline masks
# drawn from the same (seed, layer_id) are unrelated.
_DOMAIN_EXAMPLE = 0x6D656D31  # "mem1"
_DOMAIN_LAYER = 0x6C617931  # "lay1"
_DOMAIN_FIXED = 0x66697831  # "fix1"
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _cached(fn):
    """lru_cache that torch.compile bypasses (it traces the pure function instead)."""
    cached = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args):
        return fn(*args) if _is_compiling() else cached(*args)

    return call


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``x`` in [0, 2**32) without signed int64 overflow.

    For ``c < 2**31`` the product is below 2**63. For larger ``c`` write
    ``c = c' + 2**31``; then ``x * 2**31 mod 2**32 == (x & 1) << 31``.
    """
    if c < _TWO31:
        return (x * c) & _M32
    return ((x * (c - _TWO31)) + ((x & 1) << 31)) & _M32


def _fmix32_(h: Tensor) -> Tensor:
    """32-bit avalanche finalizer (a bijection of [0, 2**32)), in place on a fresh int64 tensor."""
    h ^= h >> 16
    h *= _F1  # < 2**63: h < 2**32 and _F1 < 2**31
    h &= _M32
    h ^= h >> 15
    h *= _F2
    h &= _M32
    h ^= h >> 15
    return h


def _fmix32_py(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * _F1) & _M32
    h ^= h >> 15
    h = (h * _F2) & _M32
    return h ^ (h >> 15)


def _words(v: int) -> tuple[int, int]:
    """Low and high 32-bit words of a Python int taken modulo 2**64."""
    v &= (1 << 64) - 1
    return v & _M32, v >> 32


@_cached
def _stream_key(domain: int, *values: int) -> int:
    """One 32-bit key per (domain, values...), computed on the host."""
    h = domain
    for k, v in enumerate(w for value in values for w in _words(value)):
        h = _fmix32_py(h ^ _fmix32_py(v + _GOLDEN * (k + 1)))
    return h


def _example_words(idx: Tensor, seed: int) -> Tensor:
    """(N,) int64 dataset indices -> (N,) well-mixed 32-bit words, one per example.

    The high word is folded in so every int64 index is defined (it is zero for
    any real dataset, leaving the low word, hence distinct words for distinct
    indices below 2**32).
    """
    h = (idx ^ (idx >> 32)) & _M32
    h ^= _stream_key(_DOMAIN_EXAMPLE, seed)
    return _fmix32_(h)


# The per-example words depend on (idx, seed) only, so every layer of one forward
# pass shares them: remembering the last batch saves ~14 kernel launches per layer.
# Holds one (N,) index tensor and one (N,) word tensor; keyed on the index tensor's
# identity and version counter, so a new or modified batch is always recomputed.
_last_example_words: tuple | None = None


def _example_words_memo(idx: Tensor, seed: int, device: torch.device) -> Tensor:
    global _last_example_words
    # Inference tensors have no version counter; under torch.compile the kernels fuse anyway.
    memo = not (_is_compiling() or idx.is_inference())
    if memo:
        last = _last_example_words
        if last is not None and last[0] is idx and last[1] == idx._version and last[2:4] == (seed, device):
            return last[4]
    a = _example_words(idx.to(device=device, dtype=torch.int64, non_blocking=True), seed)
    if memo:
        _last_example_words = (idx, idx._version, seed, device, a)
    return a


@_cached
def _layer_tables(
    seed: int, layer_id: int, units: int, n_gen: int, threshold: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-unit words (units,) int64 of (seed, layer_id, unit) and keep thresholds (units,).

    Constants of the layer, cached per device: a few hundred bytes, not a mask table.
    Generalization units get threshold 2**32, above every hash, so they are always on.
    """
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any later mode
        u = torch.arange(units, dtype=torch.int64, device=device)
        b = _fmix32_(_mul32(u + 1, _GOLDEN) ^ _stream_key(_DOMAIN_LAYER, seed, layer_id))
        thr = torch.full((units,), threshold, dtype=torch.int64, device=device)
        thr[:n_gen] = 1 << 32
    return b, thr


def _hash_reference(seed: int, layer_id: int, i: int, u: int) -> int:
    """Plain-Python value of the example-tied hash of (seed, layer_id, i, u); for tests."""
    i &= (1 << 64) - 1
    a = _fmix32_py(((i ^ (i >> 32)) & _M32) ^ _stream_key(_DOMAIN_EXAMPLE, seed))
    b = _fmix32_py((((u + 1) * _GOLDEN) & _M32) ^ _stream_key(_DOMAIN_LAYER, seed, layer_id))
    return _fmix32_py(a ^ b)


def _keep_threshold(p: float) -> int:
    # keep iff hash / 2**32 < p  <=>  hash < ceil(p * 2**32); exact (power-of-two scaling).
    return math.ceil(p * 2**32)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}; pass e.g. {name}=0.5")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {value}; pass a fraction such as {name}=0.5")
    return value


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, choices))}")
    return value


def _check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    return value


def _unit_shapes(x: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Units of ``x`` and the views that broadcast an (N, units) mask / a (units,) scale."""
    n = x.shape[0] if x.dim() else 0
    if x.dim() == 4:  # (N, C, H, W): one decision per channel
        c = x.shape[1]
        return c, (n, c, 1, 1), (1, c, 1, 1)
    if x.dim() == 2:  # (N, F)
        f = x.shape[1]
        return f, (n, f), (1, f)
    if x.dim() == 3:  # (N, T, F): one decision per feature for all T
        f = x.shape[2]
        return f, (n, 1, f), (1, 1, f)
    raise ConfigError(
        f"example-tied dropout takes (N, C, H, W), (N, F) or (N, T, F) activations, got shape {tuple(x.shape)}; "
        "insert it after a conv, linear or token-wise layer"
    )


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def num_generalization_units(units: int, p_gen: float) -> int:
    """Number of always-on units of a layer: ``floor(p_gen * units)``.

    A tiny tolerance keeps products such as ``0.29 * 100`` from rounding down
    to 28.
    """
    units = _check_int("units", units)
    p_gen = _check_fraction("p_gen", p_gen)
    return min(units, math.floor(p_gen * units + 1e-9))


def expected_active_fraction(p_gen: float, p_mem: float) -> float:
    """Expected fraction of a layer's units active for one training example.

    ``a = p_gen + (1 - p_gen) * p_mem``: the sparsity the standard-dropout and
    fixed-sparse-network baselines are matched to.
    """
    p_gen = _check_fraction("p_gen", p_gen)
    p_mem = _check_fraction("p_mem", p_mem)
    return p_gen + (1.0 - p_gen) * p_mem


def memorization_mask(
    idx: Tensor,
    units: int,
    *,
    p_gen: float,
    p_mem: float,
    seed: int,
    layer_id: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which units are on for each example: (N,) int indices -> (N, units) bool.

    Units ``[0, floor(p_gen * units))`` are on for everyone; unit ``u`` beyond
    them is on for example ``i`` iff ``hash(seed, layer_id, i, u) / 2**32 <
    p_mem``. Stateless (no table, no RNG), identical on every device, defined
    for any int64 index. ``device`` defaults to ``idx.device``.
    """
    p_gen = _check_fraction("p_gen", p_gen)
    p_mem = _check_fraction("p_mem", p_mem)
    units = _check_int("units", units)
    seed = _check_int("seed", seed)
    layer_id = _check_int("layer_id", layer_id)
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ConfigError(
            "example indices must be a 1-D integer tensor of dataset positions, "
            f"got {type(idx).__name__} {getattr(idx, 'dtype', '')} {tuple(getattr(idx, 'shape', ()))}"
        )
    device = idx.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    n_gen = num_generalization_units(units, p_gen)
    b, thr = _layer_tables(seed, layer_id, units, n_gen, _keep_threshold(p_mem), device)  # (units,), (units,)
    a = _example_words_memo(idx, seed, device)  # (N,)
    h = _fmix32_(a[:, None] ^ b)  # (N, units)
    return h < thr


def unit_hash(units: int, *, seed: int, layer_id: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(units,) int64 hash in [0, 2**32) of (seed, layer_id, unit), the same for every example."""
    units = _check_int("units", units)
    key = _stream_key(_DOMAIN_FIXED, _check_int("seed", seed), _check_int("layer_id", layer_id))
    u = torch.arange(units, dtype=torch.int64, device=device)
    return _fmix32_(_fmix32_(_mul32(u + 1, _GOLDEN) ^ key))


def _drop_factor(units: int, n_gen: int, p_gen: float, p_mem: float, drop_scale: str) -> float:
    if drop_scale == "none":
        return 1.0
    if drop_scale == "paper":  # the published code's factor
        return (p_gen + p_mem) / p_gen
    # "matched": units * a / n_gen with a the expected active fraction at training,
    # computed from the realized generalization fraction g = n_gen / units (== p_gen
    # whenever p_gen * units is whole), so the expected layer total is preserved.
    g = n_gen / units
    return (g + (1.0 - g) * p_mem) / g


def example_tied_dropout(
    x: Tensor,
    idx: Tensor | None,
    *,
    p_gen: float,
    p_mem: float,
    seed: int,
    mode: str,
    layer_id: int = 0,
    drop_scale: str = "matched",
) -> Tensor:
    """Example-tied dropout of ``x``; returns a tensor of ``x``'s shape and dtype.

    x: (N, C, H, W) (a unit is a channel), (N, F) or (N, T, F) (a unit is a
    feature). idx: (N,) int dataset indices of the examples in ``x``; needed in
    "train" and "tied" modes only.

    Modes:
      "train"  x * mask, the example's own mask, no rescaling (as in the paper).
      "tied"   the same computation, meant for evaluating training examples
               through their training masks with the model in eval mode.
      "eval"   every unit on; memorization units times p_mem (their
               training-time expectation).
      "drop"   memorization units zeroed; generalization units times a factor
               chosen by ``drop_scale``: "matched" (g + (1 - g) p_mem) / g with
               g = floor(p_gen * units) / units, which keeps the layer's expected
               total as at training; "paper" (p_gen + p_mem) / p_gen, the
               published code's; "none" 1.
    """
    p_gen = _check_fraction("p_gen", p_gen)
    p_mem = _check_fraction("p_mem", p_mem)
    _check_choice("example-tied dropout mode", mode, MODES)
    _check_choice("drop_scale", drop_scale, DROP_SCALES)
    return _example_tied_dropout(x, idx, p_gen=p_gen, p_mem=p_mem, seed=seed, mode=mode, layer_id=layer_id,
                                 drop_scale=drop_scale)


def _example_tied_dropout(x: Tensor, idx: Tensor | None, *, p_gen: float, p_mem: float, seed: int, mode: str,
                          layer_id: int, drop_scale: str) -> Tensor:
    """`example_tied_dropout` with its arguments already checked (the module checks them once, when built)."""
    units, mask_view, scale_view = _unit_shapes(x)
    n_gen = num_generalization_units(units, p_gen)

    if mode in ("train", "tied"):
        if idx is None:
            raise ConfigError(
                f"example-tied dropout in {mode} mode needs example indices: "
                "call the model inside memloc.example_indices(model, idx)"
            )
        kw = dict(p_gen=p_gen, p_mem=p_mem, seed=seed, layer_id=layer_id, device=x.device)
        per_token = isinstance(idx, Tensor) and idx.dim() == 2 and x.dim() == 3 and idx.shape == x.shape[:2]
        if per_token:  # (N, T) ids, one per token (packed sequences: each token's own document)
            return x * _token_mask(idx, units, x.dtype, **kw)
        if isinstance(idx, Tensor) and idx.dim() == 0:  # one id for the whole batch
            return x * memorization_mask(idx.view(1), units, **kw).to(x.dtype).view(scale_view)
        if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.shape[0] != x.shape[0]:
            tokens = f" or one per token, shape {tuple(x.shape[:2])}" if x.dim() == 3 else ""
            raise ConfigError(
                f"example indices have shape {tuple(getattr(idx, 'shape', ()))} but the batch has "
                f"{x.shape[0]} examples; pass one dataset index per example, shape ({x.shape[0]},){tokens}"
            )
        mask = memorization_mask(idx, units, **kw)  # (N, units)
        # cast the small (N, units) mask first: a same-dtype multiply, not a bool one promoted element by element
        return x * mask.to(x.dtype).view(mask_view)

    if mode == "eval":
        scale = _scale_table(units, n_gen, 1.0, p_mem, x.dtype, x.device)  # (units,)
        return x * scale.view(scale_view)

    # mode == "drop"
    if n_gen == 0:
        raise ConfigError(
            f"dropping memorization units leaves nothing: p_gen={p_gen} gives 0 of {units} units as "
            "generalization units; raise p_gen or widen the layer"
        )
    factor = _drop_factor(units, n_gen, p_gen, p_mem, drop_scale)
    scale = _scale_table(units, n_gen, factor, 0.0, x.dtype, x.device)  # (units,)
    return x * scale.view(scale_view)


# The per-token ids of one batch are shared by every layer: its distinct ids and their positions are found once.
_last_unique: tuple | None = None


def _token_mask(idx: Tensor, units: int, dtype: torch.dtype, **kw) -> Tensor:
    """(N, T) int ids -> (N, T, units) 0/1 of `dtype`: each token's own mask (`memorization_mask` of its id).

    A batch holds few distinct ids (one or two documents per row), so the masks are hashed once per distinct id
    and gathered; compiled code hashes every token instead (no data-dependent shapes).
    """
    global _last_unique
    if _is_compiling():
        return memorization_mask(idx.flatten(), units, **kw).view(*idx.shape, units).to(dtype)
    memo = not idx.is_inference()
    last = _last_unique
    if memo and last is not None and last[0] is idx and last[1] == idx._version:
        distinct, where = last[2], last[3]
    else:
        distinct, where = torch.unique(idx, return_inverse=True)  # (U,), (N, T)
        if memo:
            _last_unique = (idx, idx._version, distinct, where)
    table = memorization_mask(distinct, units, **kw).to(dtype)  # (U, units), cast while small
    return table[where.to(table.device)]  # (N, T, units): one gather


@_cached
def _scale_table(
    units: int, n_gen: int, gen_value: float, mem_value: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(units,) per-unit factors: ``gen_value`` for generalization units, ``mem_value`` for the rest."""
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.full((units,), mem_value, dtype=dtype, device=device)
        scale[:n_gen] = gen_value
    return scale


# ---------------------------------------------------------------------------
# Module and the helpers that drive it from outside the host model
# ---------------------------------------------------------------------------


class ExampleTiedDropout(nn.Module):
    """Thin module around :func:`example_tied_dropout`.

    In training mode it uses mode "train" with the indices set by
    :func:`example_indices`; otherwise ``eval_mode`` ("eval" by default,
    "tied" or "drop"). ``layer_id`` gives each layer of a model its own mask
    stream: the hash key is (seed, layer_id, example index, unit).

    The indices are (N,) one per example, (N, T) one per token of a (N, T, F)
    activation, or a 0-d tensor for the whole batch. ``tie`` (language models:
    "document" or "sequence") records what an id names; the task that feeds the
    layer reads it (`Task.example_ids`), the layer itself hashes whatever it gets.
    """

    def __init__(
        self,
        p_gen: float,
        p_mem: float,
        *,
        seed: int = 0,
        layer_id: int = 0,
        drop_scale: str = "matched",
        tie: str | None = None,
    ) -> None:
        super().__init__()
        self.tie = None if tie is None else _check_choice("tie", tie, TIES)
        self.p_gen = _check_fraction("p_gen", p_gen)
        self.p_mem = _check_fraction("p_mem", p_mem)
        self.seed = _check_int("seed", seed)
        self.layer_id = _check_int("layer_id", layer_id)
        self.drop_scale = _check_choice("drop_scale", drop_scale, DROP_SCALES)
        self.eval_mode = "eval"
        self.idx: Tensor | None = None  # (N,) set by example_indices() for one forward pass

    @property
    def eval_mode(self) -> str:
        return self._eval_mode

    @eval_mode.setter
    def eval_mode(self, mode: str) -> None:
        self._eval_mode = _check_choice("dropout eval mode", mode, EVAL_MODES)

    def forward(self, x: Tensor) -> Tensor:
        return _example_tied_dropout(
            x,
            self.idx,
            p_gen=self.p_gen,
            p_mem=self.p_mem,
            seed=self.seed,
            layer_id=self.layer_id,
            mode="train" if self.training else self.eval_mode,
            drop_scale=self.drop_scale,
        )

    def extra_repr(self) -> str:
        tie = "" if self.tie is None else f", tie={self.tie!r}"
        return (
            f"p_gen={self.p_gen}, p_mem={self.p_mem}, seed={self.seed}, layer_id={self.layer_id}, "
            f"eval_mode={self.eval_mode!r}{tie}"
        )


def find_example_tied_dropout(model: nn.Module) -> list[ExampleTiedDropout]:
    """Every :class:`ExampleTiedDropout` inside ``model``, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, ExampleTiedDropout)]


@contextlib.contextmanager
def layer_setting(model: nn.Module, attr: str, value) -> Iterator[nn.Module]:
    """Set `attr` to `value` on every example-tied dropout layer inside; each layer's own value restored after."""
    layers = find_example_tied_dropout(model)
    previous = [getattr(m, attr) for m in layers]
    try:
        for m in layers:
            setattr(m, attr, value)
        yield model
    finally:
        for m, old in zip(layers, previous):
            setattr(m, attr, old)


def example_indices(model: nn.Module, idx: Tensor):
    """Give every example-tied dropout layer in ``model`` the batch's indices (a context manager).

    idx: (N,) int64 dataset positions of the batch, ideally already on the
    model's device (a CPU tensor is copied per layer). The previous value
    (None outside any such block) is restored on exit, even if the body raises.
    """
    return layer_setting(model, "idx", idx)


def set_dropout_mode(model: nn.Module, mode: str) -> dict[str, str]:
    """Set ``eval_mode`` ("tied", "eval" or "drop") on every example-tied dropout layer.

    Returns the previous modes keyed by module name (as in ``named_modules``).
    """
    _check_choice("dropout eval mode", mode, EVAL_MODES)
    previous = {}
    for name, m in model.named_modules():
        if isinstance(m, ExampleTiedDropout):
            previous[name] = m.eval_mode
            m.eval_mode = mode
    return previous


def dropout_mode(model: nn.Module, mode: str):
    """Context manager: :func:`set_dropout_mode` for the block, previous modes restored after."""
    _check_choice("dropout eval mode", mode, EVAL_MODES)
    return layer_setting(model, "eval_mode", mode)


def insert_example_tied_dropout(
    model: nn.Module,
    after: Sequence[str],
    *,
    p_gen: float,
    p_mem: float,
    seed: int = 0,
    drop_scale: str = "matched",
) -> nn.Module:
    """Put an :class:`ExampleTiedDropout` after each named submodule, in place.

    Each ``after[k]`` (a dotted path from ``named_modules``, e.g.
    "layer1.0.bn2" or "features.3") is replaced by
    ``nn.Sequential(original, ExampleTiedDropout(..., layer_id=k))``. Names are
    resolved before anything is changed. Beware modules called more than once
    in ``forward`` (torchvision's BasicBlock reuses ``relu``): the dropout then
    runs at every call. Returns ``model``.
    """
    _check_fraction("p_gen", p_gen)
    _check_fraction("p_mem", p_mem)
    _check_choice("drop_scale", drop_scale, DROP_SCALES)
    if isinstance(after, str):
        raise ConfigError(f"after must be a list of module names, got the string {after!r}; pass [{after!r}]")
    names = dict(model.named_modules())
    valid = [n for n in names if n]
    seen: set[str] = set()
    targets = []
    for name in after:
        if name in seen:
            raise ConfigError(f"module {name!r} is listed twice in after; list each module once")
        seen.add(name)
        if not name or name not in names:
            near = difflib.get_close_matches(str(name), valid, n=5) or valid[:5]
            raise ConfigError(f"no submodule named {name!r} in the model; valid names include {', '.join(near)}")
        parent_name, _, attr = name.rpartition(".")
        targets.append((names[parent_name], attr, names[name]))
    for layer_id, (parent, attr, original) in enumerate(targets):
        dropout = ExampleTiedDropout(p_gen, p_mem, seed=seed, layer_id=layer_id, drop_scale=drop_scale)
        setattr(parent, attr, nn.Sequential(original, dropout))
    return model


# ---------------------------------------------------------------------------
# Baselines at the same expected active fraction
# ---------------------------------------------------------------------------


class ChannelDropout(nn.Module):
    """Standard (inverted) dropout over units: the paper's dropout baseline.

    At training each unit (a channel of (N, C, H, W), a feature of (N, F) or
    (N, T, F)) is kept independently per example with probability
    ``active_fraction`` from torch's global RNG and scaled by its inverse; at
    test it is the identity. Match the example-tied layer with
    ``active_fraction = expected_active_fraction(p_gen, p_mem)``.
    """

    def __init__(self, active_fraction: float) -> None:
        super().__init__()
        self.active_fraction = _check_fraction("active_fraction", active_fraction)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.active_fraction == 1.0:
            return x
        _, mask_view, _ = _unit_shapes(x)
        keep = torch.rand(mask_view, device=x.device) < self.active_fraction  # (N, C, 1, 1) / (N, F) / (N, 1, F)
        return x * (keep.to(x.dtype) * (1.0 / self.active_fraction))

    def extra_repr(self) -> str:
        return f"active_fraction={self.active_fraction}"


class FixedUnitMask(nn.Module):
    """A fixed sparse network: the same units on for every example, at training and test.

    Keeps ``max(1, round(active_fraction * units))`` units of each layer, those with
    the smallest stateless hash of (seed, layer_id, unit); no rescaling, since
    the mask never changes. The paper's fixed-sparsity baseline.
    """

    def __init__(self, active_fraction: float, *, seed: int = 0, layer_id: int = 0) -> None:
        super().__init__()
        self.active_fraction = _check_fraction("active_fraction", active_fraction)
        self.seed = _check_int("seed", seed)
        self.layer_id = _check_int("layer_id", layer_id)

    def unit_mask(self, units: int, device: torch.device | str | None = None) -> Tensor:
        """(units,) bool, True for the kept units."""
        k = max(1, min(units, round(self.active_fraction * units)))
        h = unit_hash(units, seed=self.seed, layer_id=self.layer_id, device=device)
        mask = torch.zeros(units, dtype=torch.bool, device=device)
        # Hash values of distinct units are distinct (bijective mixing), so the choice is unambiguous.
        mask[torch.topk(h, k, largest=False).indices] = True
        return mask

    def forward(self, x: Tensor) -> Tensor:
        units, _, scale_view = _unit_shapes(x)
        return x * self.unit_mask(units, x.device).to(x.dtype).view(scale_view)

    def extra_repr(self) -> str:
        return f"active_fraction={self.active_fraction}, seed={self.seed}, layer_id={self.layer_id}"
