"""Export a model trained with example-tied dropout with its memorization units removed for good.

Each :class:`~memloc.core.dropout.ExampleTiedDropout` is replaced by a
:class:`UnitScale`: a plain module holding one fixed factor per unit in a
buffer (0 for memorization units, the drop-mode factor for generalization
units). No example indices, no randomness, no mode: the exported model's
outputs equal the trained model's "drop" mode, and it is a standard
``nn.Module`` a user can deploy.

Why a scale module and not folding the factors into the weights: in the
conv-BN-ReLU blocks the factor could go into BatchNorm's affine weight and bias
(ReLU is positively homogeneous), but in ResNet-9 the layer also sits after the
residual sums ``x + f(x)``, where ``x`` feeds ``f`` too, so no single
BatchNorm can carry it. One exact mechanism everywhere beats two.

The file is safetensors: the state dict, plus metadata ``memloc`` (JSON: model
name, width, input shape, number of classes, p_gen, p_mem, drop scale) from
which :func:`load_exported` rebuilds the architecture.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.dropout import (
    DROP_SCALES,
    ExampleTiedDropout,
    dropout_mode,
    example_tied_dropout,
    find_example_tied_dropout,
)
from ..core.errors import ConfigError, RunError
from ..core.files import save_state
from ..tasks.classification.models import build_model
from ..tasks.experiment import AUDIT_FILE, LoadedRun

__all__ = ["UnitScale", "remove_memorization", "fold_sinks", "export_dropped", "export_localized", "load_exported",
           "EXPORT_FORMAT"]

EXPORT_FORMAT = "memloc-export-1"


class UnitScale(nn.Module):
    """Multiply each unit by a fixed factor: x (N, C, H, W) per channel, (N, F) / (N, T, F) per feature."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(units))  # (units,)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return x * self.scale.to(x.dtype).view(1, -1, 1, 1)
        return x * self.scale.to(x.dtype)  # the last dimension is the unit dimension

    def extra_repr(self) -> str:
        return f"units={self.scale.numel()}, zeroed={int((self.scale == 0).sum())}"


def _unit_counts(model: nn.Module, input_shape: tuple[int, ...]) -> dict[int, int]:
    """id(layer) -> number of units, read off one tiny forward pass."""
    counts: dict[int, int] = {}

    def hook(module, inputs, output):
        x = inputs[0]
        counts[id(module)] = x.shape[1] if x.dim() == 4 else x.shape[-1]

    handles = [m.register_forward_hook(hook) for m in find_example_tied_dropout(model)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), dropout_mode(model, "eval"):  # "eval" needs no example indices
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


def remove_memorization(model: nn.Module, input_shape: tuple[int, ...], *, scale: str = "matched") -> nn.Module:
    """Replace every example-tied dropout layer by its fixed drop-mode :class:`UnitScale`, in place; returns model.

    input_shape: (C, H, W) of one input, for the forward pass that reads each layer's unit count.
    """
    if scale not in DROP_SCALES:
        raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
    found = find_example_tied_dropout(model)
    if not found:
        raise RunError("the model has no example-tied dropout layers: there are no memorization units to remove; "
                       "train one with `memloc train --example-tied-dropout P_GEN,P_MEM`")
    counts = _unit_counts(model, input_shape)
    for name, module in list(model.named_modules()):
        if not isinstance(module, ExampleTiedDropout):
            continue
        units = counts.get(id(module))
        if units is None:
            raise RunError(f"example-tied dropout layer {name!r} is not used in the forward pass: cannot export it")
        ones = torch.ones(1, units)
        # The drop-mode factors, computed by the very function drop mode uses.
        factors = example_tied_dropout(ones, None, p_gen=module.p_gen, p_mem=module.p_mem, seed=module.seed,
                                       layer_id=module.layer_id, mode="drop", drop_scale=scale)[0]  # (units,)
        replacement = UnitScale(units)
        replacement.scale.copy_(factors)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement.to(next(model.parameters()).device)
        setattr(parent, attr, replacement)
    return model


def _drop_factors(module: ExampleTiedDropout, units: int, scale: str) -> Tensor:
    """(units,) the drop-mode factors of an example-tied layer, computed by the very function drop mode uses."""
    return example_tied_dropout(torch.ones(1, units), None, p_gen=module.p_gen, p_mem=module.p_mem, seed=module.seed,
                                layer_id=module.layer_id, mode="drop", drop_scale=scale)[0]


def fold_sinks(model: nn.Module, *, scale: str = "matched") -> nn.Module:
    """Fold every memorization-sink layer of a language model into the projection after it, in place.

    A sink layer sits in a `.sink` slot followed by a `.proj` (memloc's GPT MLP; a Hugging Face MLP's down
    projection tap); `proj(x * f) == proj'(x)` with the projection's input columns scaled by f, exactly, so
    the model keeps its architecture (no extra module) and computes what drop mode computes.
    """
    if scale not in DROP_SCALES:
        raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
    owners = [m for m in model.modules() if isinstance(getattr(m, "sink", None), ExampleTiedDropout)]
    if not owners:
        raise RunError("the model has no memorization sinks: there is nothing to remove; train one with "
                       "`memloc train --task lm --memorization-sinks P_GEN,P_MEM`")
    with torch.no_grad():
        for m in owners:
            proj = m.proj
            w = proj.weight  # nn.Linear: (out, in); GPT-2's Conv1D: (in, out)
            linear = isinstance(proj, nn.Linear)
            units = w.shape[1] if linear else w.shape[0]
            f = _drop_factors(m.sink, units, scale).to(w.device, w.dtype)
            w.mul_(f[None, :] if linear else f[:, None])
            m.sink = nn.Identity()
    return model


def _export_lm(loaded: LoadedRun, out: Path, *, epoch: int | None, scale: str, overwrite: bool) -> Path:
    """A language model without its sinks: memloc's GPT as one .safetensors file, a Hugging Face model as a
    save_pretrained folder (loadable by transformers and by `--model hf:FOLDER`)."""
    model = loaded.model(epoch)
    fold_sinks(model, scale=scale)
    ep = loaded.run.saved_epochs()[-1] if epoch is None else epoch
    meta = {"format": EXPORT_FORMAT, "task": "lm", "drop_scale": scale, "epoch": ep, "source_run": str(loaded.run.path),
            "p_gen": loaded.config.model.p_gen, "p_mem": loaded.config.model.p_mem,
            "tokenizer": loaded.config.data.tokenizer}
    tokenizer = None
    if loaded.run.has(AUDIT_FILE):  # the audited model's own tokenizer goes with it: the folder is usable as it is
        tok = loaded.config.data.tokenizer
        tokenizer = Path(tok[3:] if tok.startswith("hf:") else tok)
    return _write_lm(model, out, meta, overwrite=overwrite, tokenizer=tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")  # what save_pretrained writes of a tokenizer


def _write_lm(model: nn.Module, out: Path, meta: dict, *, overwrite: bool, tokenizer: Path | None = None) -> Path:
    """memloc's GPT as one .safetensors file (its shape in the metadata), a Hugging Face model as a save_pretrained
    folder written atomically and marked as ours (with `tokenizer`'s tokenizer files, copied, when given)."""
    from ..core.files import atomic_folder
    from ..tasks.lm.gpt import GPT
    if isinstance(model, GPT):
        if out.suffix != ".safetensors":
            raise ConfigError(f"export file {out} should end in .safetensors: pass e.g. --out model.safetensors")
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
        meta = dict(meta, model="gpt", shape=dataclasses.asdict(model.shape))
        save_state(out, model.state_dict(), metadata={"memloc": json.dumps(meta)})
        return out
    # a Hugging Face model: a folder, as save_pretrained writes it
    if out.suffix == ".safetensors":
        raise ConfigError(f"a Hugging Face model is exported as a folder, not {out.name}: pass e.g. --out exported/")
    if out.exists() and not (out / EXPORT_MARKER).is_file():
        raise ConfigError(f"{out} exists and was not written by `memloc export`: choose another --out "
                          "(memloc replaces only its own exports)")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    from ..tasks.lm.hf import _transformers
    from ..tasks.lm.hub import offline, quiet
    t = _transformers()
    with offline(), quiet():
        plain = t.AutoModelForCausalLM.from_config(model.hf.config)
    plain.load_state_dict(model.inner_state_dict())
    with atomic_folder(out) as tmp, quiet():
        plain.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES if tokenizer is not None else ():
            src = tokenizer / name
            if src.is_file() and not src.is_symlink():
                (tmp / name).write_bytes(src.read_bytes())
        (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=1))
    return out


def export_localized(loaded: LoadedRun, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the run's model with the edit of its saved `memloc localize` result folded into the weights (the
    zeroed MLP neurons' and heads' columns of their output projections set to 0, `fold_edit`; a weight edit's
    weights set to 0, `memloc.core.weights.fold`): a plain language model that computes what the scoped edit computed,
    at the epoch the localization probed."""
    from ..probes.base import ProbeResult
    from ..probes.localization import PROBE_NAME, edit_of, fold_units
    out = Path(out)
    if loaded.config.task != "lm":
        raise ConfigError("--localized exports a language model's localize edit (MLP neurons and heads folded into "
                          "their projections); a classification run's edit is applied with memloc.edited(...)")
    result = ProbeResult.load(loaded.run, PROBE_NAME)
    epoch = result.summary.get("epoch")
    model = loaded.model(epoch)
    try:
        units, mask = edit_of(model, result)
    except ConfigError:
        raise RunError(f"the localize result of {loaded.run.path} names layers or weights its model does not have: "
                       f"rerun `memloc localize {loaded.run.path}`") from None
    fold_units(model, units, mask)
    ep = loaded.run.saved_epochs()[-1] if epoch is None else epoch
    meta = {"format": EXPORT_FORMAT, "task": "lm", "edit": "localize", "method": result.summary.get("method"),
            "units": (result.summary.get("settings") or {}).get("units", "neurons"),
            "zeroed": int(result.summary.get("zeroed", 0)), "epoch": ep, "source_run": str(loaded.run.path),
            "tokenizer": loaded.config.data.tokenizer}
    tokenizer = None
    if loaded.run.has(AUDIT_FILE):  # the audited model's own tokenizer goes with it: the folder is usable as it is
        tok = loaded.config.data.tokenizer
        tokenizer = Path(tok[3:] if tok.startswith("hf:") else tok)
    return _write_lm(model, out, meta, overwrite=overwrite, tokenizer=tokenizer)


EXPORT_MARKER = "memloc_export.json"


def export_dropped(loaded: LoadedRun, out: str | Path, *, epoch: int | None = None, scale: str = "matched",
                   overwrite: bool = False) -> Path:
    """Write the run's model (final epoch by default) without memorization units to `out` (.safetensors; a
    Hugging Face language model: a folder)."""
    out = Path(out)
    if loaded.config.task == "lm":
        if scale not in DROP_SCALES:
            raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
        if not loaded.config.model.example_tied:
            raise RunError(f"{loaded.run.path} was trained without memorization sinks, so there is nothing to remove: "
                           "train one with `memloc train --task lm --memorization-sinks P_GEN,P_MEM` (e.g. 0.5,0.1)")
        return _export_lm(loaded, out, epoch=epoch, scale=scale, overwrite=overwrite)
    if out.suffix != ".safetensors":
        raise ConfigError(f"export file {out} should end in .safetensors: pass e.g. --out model.safetensors")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    if scale not in DROP_SCALES:
        raise ConfigError(f"unknown drop scale {scale!r}: use one of {', '.join(DROP_SCALES)}")
    model = loaded.model(epoch)
    found = find_example_tied_dropout(model)
    if not found:
        raise RunError(f"{loaded.run.path} was trained without example-tied dropout, so it has no memorization units "
                       "to remove: train one with `memloc train --example-tied-dropout P_GEN,P_MEM` (e.g. 0.4,0.1)")
    cfg, data = loaded.config.model, loaded.data
    remove_memorization(model, data.input_shape, scale=scale)
    meta = {"format": EXPORT_FORMAT, "model": cfg.name, "width": cfg.width, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "p_gen": found[0].p_gen, "p_mem": found[0].p_mem, "drop_scale": scale,
            "epoch": loaded.run.saved_epochs()[-1] if epoch is None else epoch, "source_run": str(loaded.run.path),
            **input_record(data.normalization)}
    save_state(out, model.state_dict(), metadata={"memloc": json.dumps(meta)})
    return out


def input_record(norm) -> dict:
    """What an exported model's metadata says of its inputs: the run's normalization
    (`memloc.core.examples.Normalization`: its kind and, for "standardize", the training split's per-channel mean
    and std) and the same in words."""
    words = {"pixels": "uint8 images scaled to [0, 1] (floats in [0, 1] as they are), then normalized with mean 0.5, "
                       "std 0.5",
             "standardize": "each channel (a feature) minus its mean, divided by its std: the training split's, "
                            "in normalization.mean / normalization.std",
             "none": "the values as they are, as float32"}[norm.kind]
    return {"normalization": {"kind": norm.kind, "mean": None if norm.mean is None else list(norm.mean),
                              "std": None if norm.std is None else list(norm.std)},
            "inputs": f"{words} (memloc.study.export.exported_normalization(path) applies it)"}


def exported_normalization(path: str | Path):
    """The `memloc.core.examples.Normalization` an exported model's inputs need (call it on a batch of raw examples);
    files written before the normalization was recorded get the paper's pixel normalization, as they assumed."""
    from safetensors import safe_open

    from ..core.examples import PIXELS, Normalization
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("memloc", "null"))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise RunError(f"{path} is not a readable safetensors file ({err})") from None
    norm = meta.get("normalization") if isinstance(meta, dict) else None
    if not norm:
        return PIXELS
    mean, std = norm.get("mean"), norm.get("std")
    return Normalization(norm["kind"], None if mean is None else tuple(mean), None if std is None else tuple(std))


def load_exported(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`export_dropped` (eval mode). Feed it raw examples normalized as the run
    was (`exported_normalization(path)(x)`; its metadata records the normalization)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"exported model {path} does not exist: "
                          f"write it with `memloc export RUN --drop-memorization --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("memloc", "null"))
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise RunError(f"{path} is not a readable safetensors file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise RunError(f"{path} was not written by `memloc export` (no {EXPORT_FORMAT} metadata)")
    from ..core.files import load_into
    if meta.get("task") == "lm":  # memloc's GPT, its sinks folded into the MLP projections
        from ..tasks.lm.gpt import GPT, GPTShape
        model = GPT(GPTShape(**meta["shape"]))
        load_into(model, state, source=str(path))
        return model.to(device).eval()
    model = build_model(meta["model"], input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"],
                        width=meta["width"], after_block=lambda pos, units: UnitScale(units))
    load_into(model, state, source=str(path))
    return model.to(device).eval()
