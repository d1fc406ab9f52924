"""Language models by name: our GPT, Hugging Face families built from a config, a local Hugging Face folder.

`--model gpt` (default), `hf-gpt2`, `hf-gpt_neox`, `hf-llama` (random initialization from a
config of --n-layer/--n-head/--n-embd, trained by memloc) or `hf:FOLDER` (a model saved with
`save_pretrained`, loaded with local files only; memloc never downloads).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ...core.errors import ConfigError

LM_MODELS = {
    "gpt": "memloc's small GPT (pre-LayerNorm, GELU MLP 4x, causal attention; plain PyTorch)",
    "hf-gpt2": "GPT-2 from a config (transformers), random initialization",
    "hf-gpt_neox": "GPT-NeoX / Pythia from a config (transformers), random initialization",
    "hf-llama": "Llama from a config (transformers; SwiGLU MLP), random initialization",
    "hf:FOLDER": "a Hugging Face causal LM saved in a local folder (never downloaded)",
}

# The presets of `memloc train/run --task lm`: sections data (TextConfig), model, train, study.
LM_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # what the end-to-end tests run: 1,200 sequences of any corpus, a 2-block GPT, about 30 s of training on 2 idle
    # CPU cores. Sized so that its probes have memorized canaries on any text, not only the Bible: 8 epochs and
    # repeats up to 16 memorized none on generated English (RESULTS.md, LM smoke); 12 epochs and 32 repeats do
    "smoke": {"data": {"sequences": 1200, "block_size": 64, "prefix_tokens": 16, "suffix_tokens": 32, "canaries": 1,
                       "repeats": (1, 8, 32), "canary_formats": ("secret", "random"), "secret_digits": 4},
              "model": {"name": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64},
              "train": {"epochs": 12, "lr": 1e-2, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.1,
                        "clip": 1.0, "warmup": 0.05},
              "study": {"retrain_epochs": 2, "flip_examples": 6, "flip_others": 32, "rewind_every": 3}},
    # the CPU default: a 4-block GPT (0.5 M parameters) on 2,000 Bible sequences of 128 bytes, 2 canaries per
    # format and repeat count; the whole study about 12 minutes on 2 idle cores (RESULTS.md)
    "default": {"data": {"sequences": 2000},
                "model": {"name": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 96},
                "train": {"epochs": 12, "lr": 1e-2, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.1,
                          "clip": 1.0, "warmup": 0.05},
                "study": {"retrain_epochs": 2, "flip_examples": 30, "flip_others": 128, "rewind_every": 3}},
    # a GPU: a larger GPT on the whole corpus
    "paper": {"data": {"block_size": 128},
              "model": {"name": "gpt", "n_layer": 8, "n_head": 8, "n_embd": 512},
              "train": {"epochs": 20, "lr": 3e-4, "batch_size": 64, "optimizer": "adamw", "weight_decay": 0.1,
                        "clip": 1.0, "warmup": 0.05},
              "study": {"retrain_epochs": 4, "flip_examples": 200, "flip_others": 256, "rewind_every": 2}},
}


def resolved_lm(cfg):
    """A model config for a language model with its defaults filled in (gpt, 4 blocks of 4 heads, width 128)."""
    name = cfg.name or "gpt"
    if name not in LM_MODELS and not name.startswith("hf:"):
        raise ConfigError(f"unknown language model {name!r}: choose one of {', '.join(LM_MODELS)}")
    return replace(cfg, name=name, n_layer=cfg.n_layer or 4, n_head=cfg.n_head or 4, n_embd=cfg.n_embd or 128)


def build_lm(cfg, data, *, after_block=None) -> nn.Module:
    """The language model of a (resolved) model config for text data (its vocabulary and block size).

    `after_block(position, units)`: the module put in each block's MLP hidden layer (memorization sinks), if any.
    """
    cfg = resolved_lm(cfg)
    if cfg.name == "gpt":
        from .gpt import GPT, GPTShape
        return GPT(GPTShape(vocab_size=data.vocab_size, block_size=data.block_size, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd), after_block=after_block)
    model = _build_hf(cfg, data)
    if after_block is not None:
        model.place_sinks(after_block)
    return model


def _build_hf(cfg, data) -> nn.Module:
    from . import hf
    if cfg.name.startswith("hf:"):
        model = hf.load_hf(cfg.name[3:])
        if model.shape.vocab_size < data.vocab_size:
            raise ConfigError(f"the model {cfg.name} has {model.shape.vocab_size} token ids, the tokenizer "
                              f"{data.vocab_size}: use the model's own tokenizer (--tokenizer hf:FOLDER)")
        if model.shape.block_size < data.block_size:
            raise ConfigError(f"the model {cfg.name} takes {model.shape.block_size} tokens, the sequences are "
                              f"{data.block_size}: pass --block-size {model.shape.block_size} or less")
        return model
    return hf.build_hf(cfg.name[3:], vocab_size=data.vocab_size, block_size=data.block_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, seed=0)


def lm_shape(cfg, data) -> dict | None:
    """The transformer shape (`memloc.core.budget.transformer_parameters`) of a (resolved) model config for text data,
    from the config alone: what the memory guard counts a model by where it cannot run on the meta device (a
    folder's is read from its files: None where they cannot be read)."""
    from ...core import budget
    cfg = resolved_lm(cfg)
    if cfg.name.startswith("hf:"):
        return budget.folder_shape(cfg.name[3:], block=data.block_size)
    c = cfg.n_embd
    gated = cfg.name == "hf-llama"
    return {"vocab": data.vocab_size, "block": data.block_size, "layers": cfg.n_layer, "width": c,
            "heads": cfg.n_head, "hidden": -(-8 * c // 3 // 8) * 8 if gated else 4 * c, "gated": gated,
            "positions": cfg.name in ("gpt", "hf-gpt2"), "tanh_gelu": cfg.name == "hf-gpt2",  # GPT-2's gelu_new
            "transformers": cfg.name.startswith("hf-")}
