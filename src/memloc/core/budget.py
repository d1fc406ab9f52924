"""Memory a piece of work needs at its peak, counted from its config before anything is built, against the memory
the device has free: what cannot fit is refused in one line instead of failing (or swapping) minutes later.

`training_need` counts a training run (`memloc.tasks.experiment.run_training`), in bytes:

- model: per parameter 4 bytes of fp32 weights (in every arithmetic: bf16 autocast keeps fp32 weights, and adds
  the bf16 copy of each weight it caches during a forward: 2 more), 4 of gradients, 4 per moment of the
  optimizer's state (AdamW: two; SGD with momentum: one), `STEP_BYTES` of the optimizer step's and a checkpoint's
  temporaries, and `ACCOUNTING_BYTES` for gradient accounting's two per-epoch sums and the memorized share's
  gradients, when the run accounts;
- batches: the peak of the tensors one training step holds (the activations the forward keeps for backward, then
  the backward's gradients of them) and of those one evaluation batch holds (the end of every epoch), as the
  device's allocator keeps them (`HEAP_FACTOR`, `GPU_FACTOR`); bf16 autocast keeps most in bf16
  (`BF16_ACTIVATIONS`);
- records: the per-example records of every epoch (loss and margin in float16, correct: 5 bytes per example and
  epoch) and early-learning regularization's targets;
- runtime: on a CPU, what the first training steps add to the process besides tensors (kernels, thread pools;
  transformers' own for a Hugging Face model).

Both batches are simulated on the meta device: the model built there (shapes only: no memory, no time), one
training step and one evaluation batch run through it while a dispatch mode adds up the bytes of the tensors alive
(`_simulate`); attention without dropout as the device runs it (fused: no T x T matrix). A model whose forward
asks for data (Hugging Face models read their attention masks) is counted by its transformer shape instead
(`transformer_parameters`, `transformer_batches`), from its config or, for a saved folder, its config.json and
weight files (`folder_shape`). The data is loaded before the count and is already in use on the device.

The constants were fitted to the peak RSS growth of `memloc train` on a 2-core CPU from just before the model is
built to the end of its first epoch, over 29 configs (memloc's GPT, Hugging Face GPT-2, GPT-NeoX and Llama, MLP,
CNN, ResNet-9 and ViT classifiers; with and without gradient accounting, AdamW and SGD; 170 MB to 1.6 GB): the
estimate lies between 16% under and 22% over each; tests/test_memory_guard.py measures three of them again. The
GPU's factors are estimates, not measurements.

`exact_exposure_need` counts exposure's exact enumeration (`memloc.tasks.lm.measures.exposure`) on the host.
`free_memory` reads what a device has free; `check` refuses in one line naming both numbers and the flags to change.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import ConfigError

FP32 = 4
STEP_BYTES = 4  # per parameter: the optimizer step's foreach temporaries, a checkpoint's serialized copy
ACCOUNTING_BYTES = 14  # per parameter: two fp32 sums, the memorized share's fp32 gradients, closing temporaries
# a CPU's allocator (glibc) serves blocks of 32 MB and more from fresh pages and gives them back when freed; smaller
# ones come from a heap that keeps its high-water mark, fragmented: peak RSS / simulated peak of the small tensors,
# without and with gradient accounting's second backward pass (measured)
MMAP_BYTES = 32 << 20
HEAP_FACTOR = {False: 1.25, True: 1.9}
GPU_FACTOR = 1.25  # the caching allocator's rounding and fragmentation (not measured: no GPU)
BF16_ACTIVATIONS = 0.6  # bf16 autocast: matmul inputs in bf16, norms and the loss in fp32 (not measured: no GPU)
RUNTIME_BYTES = 170_000_000  # a CPU process's growth over its first training steps besides tensors (measured)
RECORD_BYTES = 5  # per example and epoch: loss and margin float16, correct bool


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


@dataclass(frozen=True)
class Need:
    """Bytes a piece of work needs at its peak, by part (the module docstring's)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


# ----------------------------------------------------------------------------- what a device has free

def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on `device`: a GPU's free memory (`torch.cuda.mem_get_info`), a CPU's available RAM
    (`available_memory`: MemAvailable) within the cgroup's limit where one is set. None where it
    cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    free, room = available_memory(), _cgroup_room()
    return free if room is None else min(free, room)


def _cgroup_room() -> int | None:
    """The cgroup's memory limit minus its use (cgroup v2, else v1); None without a limit."""
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):
        try:
            cap = Path("/sys/fs/cgroup", limit).read_text().strip()
            used = int(Path("/sys/fs/cgroup", usage).read_text().strip())
        except (OSError, ValueError):
            continue
        return None if not cap.isdigit() or int(cap) >= 1 << 60 else max(0, int(cap) - used)  # "max": none
    return None


def size_words(n: float) -> str:
    """Bytes as "121.3 GB", "850 MB" or "42.0 TB" (decimal units)."""
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def device_words(device: torch.device | str) -> str:
    """"the CPU", "the GPU cuda:0"."""
    device = torch.device(device)
    return {"cpu": "the CPU", "cuda": f"the GPU {device}"}.get(device.type, str(device))


# ----------------------------------------------------------------------------- the guard

_forced: contextvars.ContextVar[bool] = contextvars.ContextVar("memloc_budget_forced", default=False)


@contextlib.contextmanager
def forced(on: bool = True) -> Iterator[None]:
    """Inside (with `on`), `check` lets everything through: `--force`, the user knows better than the estimate."""
    token = _forced.set(bool(on) or _forced.get())
    try:
        yield
    finally:
        _forced.reset(token)


def is_forced() -> bool:
    """Inside `forced()`?"""
    return _forced.get()


def check(need: Need, device: torch.device | str, *, what: str, model_flags: str | None = None,
          batch_flags: str | None = None, force: str | None = "--force", free: int | None = None) -> None:
    """Raise ConfigError in one line when `need` is more than `device` has free (`free`, when already read):
    `what` ("training this model needs") "about 121.3 GB, the CPU has 21.0 GB free: lower --n-embd / --n-layer, or
    pass --force". It names `model_flags` (which shrink everything), `batch_flags` while the need's "model" part
    (all of it, without one) alone fits, first where the rest weighs more, and `force` (None: no such flag).
    Nothing is refused where the free memory cannot be read, or inside `forced()`."""
    if _forced.get():
        return
    free = free_memory(device) if free is None else free
    if free is None or need.total <= free:
        return
    model = need.parts.get("model", need.total)  # what a smaller batch does not shrink
    flags = [model_flags] if model_flags else []
    if batch_flags and model < free:  # a smaller batch helps while the model alone fits: first where it weighs more
        flags.insert(len(flags) if model >= need.total / 2 else 0, batch_flags)
    fix = f"lower {' or '.join(flags)}" if flags else "choose a smaller model"
    raise ConfigError(f"{what} about {size_words(need.total)}, {device_words(device)} has {size_words(free)} "
                      f"free: {fix}{f', or pass {force}' if force else ''}")


# ----------------------------------------------------------------------------- a training run

def training_need(build: Callable[[], nn.Module] | None, data: Any, train: Any, device: torch.device | str, *,
                  shape: dict | None = None, processes: int = 1) -> Need | None:
    """What training the model `build()` makes on `data`, as the TrainConfig `train` says, needs at its peak on
    `device` (the module docstring's parts); None where it cannot be counted.

    `build()` is called on the meta device (nothing is allocated); `shape` (a transformer's, see
    `transformer_parameters`) counts a model whose forward cannot run there, or that is not built at all
    (`build` None: a saved folder, with its `params` counted from the files). `processes`: torchrun's, each
    training its part of the batch (on a CPU they share the memory).
    """
    from .tasks import task_of
    device = torch.device(device)
    task = task_of(data)
    train = train.with_recipe(None, task.num_train)  # settings left to a recipe: counted as the paper's
    batch = min(-(-int(train.batch_size) // processes), task.num_train)
    num_test = len(getattr(task.data, "x_test", ()))
    evaluated = min(int(train.eval_batch_size), getattr(task, "eval_batch_cap", None) or 1 << 62,
                    max(task.num_train, num_test))
    counted = _simulate(build, task, batch, evaluated) if build is not None else None
    if counted is None or counted[1] is None:
        if shape is None:
            return None
        params = (counted[0] if counted else None) or shape.get("params") or transformer_parameters(shape)
        step, evaluation = transformer_batches(shape, batch, evaluated)
        counted = (params, [[step, 0], [evaluation, 0]], False)
    params, ((step_small, step_big), (eval_small, eval_big)), convolutional = counted
    bf16 = _bf16(train.precision, device, convolutional)
    memorized = task.kind_mask(task.memorized_kind)
    accounts = bool(train.gradient_accounting) and memorized is not None and bool(memorized.any()) \
        and bool((~memorized).any())
    moments = 2 if train.optimizer == "adamw" else 1 if train.momentum else 0
    per_param = FP32 * (2 + moments) + (2 if bf16 else 0) + STEP_BYTES + (ACCOUNTING_BYTES if accounts else 0)
    if device.type == "cpu":  # the heap keeps its high-water mark over both; large blocks come and go
        batches = HEAP_FACTOR[accounts] * max(step_small, eval_small) + max(step_big, eval_big)
    else:
        batches = GPU_FACTOR * max(step_small + step_big, eval_small + eval_big)
    elr = task.num_train * getattr(task.data, "num_classes", 0) * FP32 if train.elr is not None else 0
    parts = {"model": params * per_param, "batches": int(batches * (BF16_ACTIVATIONS if bf16 else 1.0)),
             "records": task.num_train * train.epoch_cap * RECORD_BYTES + elr,  # auto: its cap
             "runtime": (RUNTIME_BYTES if device.type == "cpu" else 0)
             + (HF_RUNTIME_BYTES if shape and shape.get("transformers") else 0)}
    if device.type == "cpu" and processes > 1:  # the processes share the machine's memory
        parts = {k: v * processes for k, v in parts.items()}
    return Need(parts)


def _bf16(precision: str, device: torch.device, convolutional: bool) -> bool:
    """Does the run compute in bf16 autocast (`memloc.core.precision.choose`, from the config alone)? `convolutional`:
    whether the model has 2-D convolutions ("auto" on a CPU with native bf16 takes bf16 for those)."""
    from .precision import LEGACY, native_bf16
    gpu = device.type == "cuda"
    if precision == "fp32" or (precision == LEGACY and not gpu):
        return False
    return precision == "bf16" or gpu or (convolutional and native_bf16(device))


class _Alive(TorchDispatchMode):
    """Adds up the bytes of the tensors alive (each storage once, until its last tensor is gone) and their peaks,
    apart for storages under `big` bytes and from `big` up (the two a CPU's allocator treats differently); the
    storages of `own` (the model's parameters and buffers) are not counted."""

    def __init__(self, own: set[int], big: int):
        super().__init__()
        self.own, self.big, self.refs, self.size = own, big, {}, {}
        self.now, self.peak = [0, 0], [0, 0]  # [small, big]

    def _gone(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            n = self.size.pop(key)
            self.now[n >= self.big] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self.own:
                continue
            if key not in self.refs:
                n = self.size[key] = t.untyped_storage().nbytes()
                self.refs[key] = 0
                self.now[n >= self.big] += n
                self.peak[n >= self.big] = max(self.peak[n >= self.big], self.now[n >= self.big])
            self.refs[key] += 1
            weakref.finalize(t, self._gone, key)
        return out


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """scaled_dot_product_attention without dropout as a CPU or GPU runs it (a fused kernel: no T x T matrix; the
    meta device would decompose it into the matrix), while inside."""
    f = nn.functional
    plain = f.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if dropout_p or kw or q.device.type != "meta" or q.shape[-3] != k.shape[-3]:
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]
    f.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        f.scaled_dot_product_attention = plain


def _simulate(build: Callable[[], nn.Module], task: Any, batch: int, evaluated: int
              ) -> tuple[int, list[list[int]] | None, bool] | None:
    """(parameters, [[small, big] peak bytes of one training step's tensors, [small, big] of one evaluation
    batch's], whether it has 2-D convolutions) of the model `build()` makes, run on the meta device (small:
    storages under `MMAP_BYTES`); the peaks None where its forward cannot run there; None where it cannot be built
    there. The training step runs with the
    parameters frozen (their gradients are the model's part) and the first activation requiring a gradient."""
    from .inference import indices_context
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            model = build()
    except Exception:  # noqa: BLE001 - a model that needs data to be built: counted by its shape
        return None
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    example = task.example_input(1, torch.device("cpu"))
    targets = task.targets("given")
    own = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    for p in model.parameters():
        p.requires_grad_(False)

    def differentiable(module, args, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad \
                and torch.is_grad_enabled():
            out.requires_grad_()
    hooks = [m.register_forward_hook(differentiable) for m in model.modules()]
    dtype = torch.float32 if example.is_floating_point() else example.dtype
    peaks = []
    try:
        with _fused_attention():
            for n, training in ((batch, True), (evaluated, False)):
                model.train(training)
                x = torch.zeros((n, *example.shape[1:]), dtype=dtype, device="meta")
                alive = _Alive(own, MMAP_BYTES)
                with torch.set_grad_enabled(training), alive, \
                        indices_context(model, task)(model, torch.zeros(n, dtype=torch.long, device="meta")):
                    out = model(x).float()
                    if training:
                        y = torch.zeros((n, *targets.shape[1:]), dtype=targets.dtype, device="meta")
                        task.loss(out, y).mean().backward()
                    else:
                        task.predict(out)
                    del out
                peaks.append(alive.peak)
    except Exception:  # noqa: BLE001 - a forward that asks for data: counted by its shape
        return params, None, convolutional
    finally:
        for h in hooks:
            h.remove()
    return params, peaks, convolutional


# ----------------------------------------------------------------------------- transformers by their shape

def transformer_parameters(shape: dict) -> int:
    """A decoder-only transformer's parameters from its shape {vocab, block, layers, width, hidden, gated,
    positions}: per block attention 4 C^2 and an MLP of 2 C I (gated: 3 C I), the token embedding and an untied
    head (V C each), learned positions (T C) where the family has them; norms and biases left out (under 1%)."""
    c, i, v = shape["width"], shape["hidden"], shape["vocab"]
    mlp = (3 if shape.get("gated") else 2) * c * i
    return int(shape["layers"] * (4 * c * c + mlp) + 2 * v * c + (shape["block"] * c if shape.get("positions")
                                                                  else 0))


# fp32 values per token alive at the peak (memloc's GPT simulated on the meta device, fitted): a training step
# holds per block 8 C + 2 I (+ I gated; + heads x T attention weights with attention dropout), 2 C for the
# embeddings and 2 V for the logits and the loss; an evaluation batch at most its logits or one MLP hidden layer
_STEP_C, _STEP_I, _STEP_EMBED, _STEP_V, _EVAL = 8, 2, 2, 2, 2
_TANH_GELU_I = 3  # GPT-2's gelu_new, composed of elementwise operations, keeps 3 more hidden layers (measured)
HF_RUNTIME_BYTES = 100_000_000  # what transformers adds to a process's growth over its first steps (measured)


def transformer_batches(shape: dict, batch: int, evaluated: int) -> tuple[int, int]:
    """(bytes of one training step's tensors at their peak, of one evaluation batch's) for a transformer of
    `shape` (see `transformer_parameters`; `heads` and `attention_dropout` too) on sequences of its block."""
    c, i, v, t = shape["width"], shape["hidden"], shape["vocab"], shape["block"]
    block = _STEP_C * c + (_STEP_I + shape.get("gated", 0) + shape.get("tanh_gelu", 0) * _TANH_GELU_I) * i \
        + (shape.get("heads", 1) * t if shape.get("attention_dropout") else 0)
    step = FP32 * batch * t * (shape["layers"] * block + _STEP_EMBED * c + _STEP_V * v)
    return int(step), int(FP32 * evaluated * t * _EVAL * max(v, i + c))


def activation_extras(get: Callable[[str], Any]) -> dict:
    """{gated, tanh_gelu} of a Hugging Face config read through `get` (a config.json dict's `get`, or an attribute
    getter of a loaded config): a gated MLP (SwiGLU, hidden_act silu) keeps one more hidden layer in a training step,
    GPT-2's composed gelu_new three (`transformer_batches`)."""
    return {"gated": get("hidden_act") == "silu",
            "tanh_gelu": (get("activation_function") or get("hidden_act")) == "gelu_new"}


def folder_shape(folder: str | Path, *, block: int) -> dict | None:
    """The shape (see `transformer_parameters`) of the Hugging Face causal LM saved in `folder`, from its
    config.json, with `params`: its parameter count from the safetensors headers (else the weight files' size
    in the config's dtype), plus the head memloc unties. None where config.json cannot be read as one (the
    model's own load then says why, in one line)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None

    def first(*keys: str) -> Any:
        return next((cfg[k] for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg[k], bool)), None)
    width, layers, vocab = first("hidden_size", "n_embd", "d_model"), first("num_hidden_layers", "n_layer"), \
        first("vocab_size")
    if not (width and layers and vocab):
        return None
    dropout = next((cfg[k] for k in ("attention_dropout", "attn_pdrop") if isinstance(cfg.get(k), (int, float))), 0)
    shape = {"width": width, "layers": layers, "vocab": vocab, "block": block, "hidden": first(
        "intermediate_size", "n_inner") or 4 * width, "heads": first("num_attention_heads", "n_head") or 1,
        "attention_dropout": bool(dropout), "transformers": True, **activation_extras(cfg.get)}
    params = _stored_parameters(folder, cfg)
    if params is not None and cfg.get("tie_word_embeddings", True):
        params += vocab * width  # memloc unties the head (memloc.tasks.lm.hf)
    shape["params"] = params
    return shape


def _stored_parameters(folder: Path, cfg: dict) -> int | None:
    """The parameters stored in a folder's weights: counted from the safetensors headers, else the .bin files'
    size in the config's dtype."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        total = 0
        for f in files:
            try:
                with open(f, "rb") as fh:
                    header = json.loads(fh.read(min(int.from_bytes(fh.read(8), "little"), 100 << 20)))
                total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
        return total
    size = {"float16": 2, "bfloat16": 2, "float64": 8}.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), 4)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in bins) // size if bins else None


# ----------------------------------------------------------------------------- an audit

def audit_need(shape: dict, *, batch: int, length: int, reference: dict | None = None, checkpoints: int = 0,
               remove: bool = True) -> Need:
    """What `memloc audit` holds at its peak for a Hugging Face model of `shape` (`folder_shape`) on sequences of at
    most `length` tokens, `batch` rows at a time: the model's fp32 weights (and a `reference` model's); with
    `checkpoints`, the state of every checkpoint and of the model that layer rewinding reads at once (fp32); the
    larger of a scan batch (its logits) and, with `remove`, the localization's forward and backward through every
    layer (a training step's tensors, `transformer_batches`); the process's runtime."""
    params = shape.get("params") or transformer_parameters(shape)
    model = FP32 * params + (FP32 * (reference.get("params") or transformer_parameters(reference)) if reference
                             else 0)
    states = FP32 * params * (checkpoints + 1) if checkpoints else 0
    step, evaluated = transformer_batches({**shape, "block": length, "attention_dropout": False}, batch, batch)
    parts = {"model": model, "batches": int(HEAP_FACTOR[False] * (max(step, evaluated) if remove else evaluated)),
             "runtime": RUNTIME_BYTES + HF_RUNTIME_BYTES}
    if states:
        parts["checkpoints"] = states
    return Need(parts)


# ----------------------------------------------------------------------------- exposure's exact enumeration

def exact_exposure_need(candidates: int, length: int, alphabet: int) -> Need:
    """What exposure's exact enumeration (`memloc.tasks.lm.measures.exposure`) of `candidates` = `alphabet`^`length`
    candidate secrets holds on the host at its last level: per candidate, its float64 loss, its child loss and
    their sum (24 bytes), and the trie's deepest rows of length - 1 int64 tokens, made twice while built (one row
    per `alphabet` candidates)."""
    per = 3 * 8 + 2 * 8 * max(0, length - 1) / max(1, alphabet)
    return Need({"candidates": int(candidates * per)})
