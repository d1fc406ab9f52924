"""Hugging Face folders read as data: no code from them runs, no request leaves the machine.

Every `from_pretrained` memloc makes goes through `load_pretrained`, which
- first reads the folder's JSON files itself (`check_folder`) and refuses, in one line naming the file, what would
  make `transformers` run code or reach the network: an ``auto_map`` (the folder's own Python classes), an attention
  implementation that names a hub repository (a kernel `transformers` would download), a PEFT adapter (its base
  model comes from the hub), a quantization config (its kernels may come from the hub);
- then calls `from_pretrained` with ``trust_remote_code=False`` and ``local_files_only=True`` (so `transformers`
  never asks "run the custom code? [y/N]" on the terminal), with the hub's offline mode on for the duration
  (`offline`): any request `huggingface_hub` would send is refused before it is sent;
- and turns any failure into one line naming the folder (a pickle `torch.load(weights_only=True)` refuses, a
  damaged file, a missing one).

The `memloc` command also sets ``HF_HUB_OFFLINE=1`` for its whole process (`memloc.cli.main`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from ...core.errors import ConfigError

# the JSON files of a model or tokenizer folder that `transformers` reads, and may take code or a hub name from
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                "preprocessor_config.json", "processor_config.json")
_JSON_MAX = 32 << 20  # bytes: a config is kilobytes; a larger one is not read
_ATTN_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
ATTENTION = "sdpa"  # the attention memloc loads every model with (PyTorch's; never a kernel from the hub)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub's offline mode on while inside (environment and `huggingface_hub`'s flag), as it was after."""
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # read at every request (the flag was read from the environment at import)
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = flag
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' progress bars and warnings off while inside (a load is one step of memloc's, which reports
    its own progress and turns any failure into one line), as they were after."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        yield
        return
    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _read(path: Path) -> Any:
    try:
        if path.stat().st_size > _JSON_MAX:
            raise ConfigError(f"{path} is {path.stat().st_size >> 20} MB, too large for a config: "
                              "memloc refuses to read it")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({type(err).__name__}): save the folder again "
                          "with save_pretrained") from None


def _walk(obj: Any, trail: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every entry of a JSON object, nested ones included."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{trail}{k}", v
            yield from _walk(v, f"{trail}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{trail}{i}.")


def check_folder(folder: str | Path) -> None:
    """Refuse, in one line naming the file, a model or tokenizer folder whose files would make `transformers` run
    code or reach the network (see the module docstring)."""
    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).exists():
            raise ConfigError(f"{folder / name}: the folder holds a PEFT adapter, whose base model `transformers` "
                              "would fetch from the hub: merge it first (model.merge_and_unload().save_pretrained("
                              "FOLDER)) and pass that folder")
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        for key, value in _walk(_read(path)):
            leaf = key.rsplit(".", 1)[-1]
            if leaf in ("auto_map", "custom_pipelines") and value:
                raise ConfigError(f"{path} asks to run the folder's own Python code ({key}): memloc never runs code "
                                  f"from a file it reads: remove '{leaf}' if the model is one of transformers' own "
                                  "families, or convert it to one")
            if leaf in _ATTN_KEYS and isinstance(value, str) and "/" in value:
                raise ConfigError(f"{path} names the attention kernel {value!r} from the hub ({key}): memloc never "
                                  f"downloads: remove '{leaf}' (memloc loads the model with {ATTENTION} attention)")
            if leaf == "quantization_config" and value:
                raise ConfigError(f"{path} describes a quantized model ({key}): memloc reads full-precision weights "
                                  "only: save the model unquantized and pass that folder")


def load_pretrained(load: Callable[..., Any], folder: str | Path, what: str, **kwargs: Any) -> Any:
    """`load(str(folder), **kwargs)` (a `from_pretrained`) with no code, no network and one line for any failure.

    `what` names the thing in errors ("a Hugging Face causal LM", "a tokenizer").
    """
    folder = Path(folder)
    check_folder(folder)
    try:
        with offline(), quiet():
            return load(str(folder), local_files_only=True, trust_remote_code=False, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # any failure of a folder memloc reads is one line naming it
        raise ConfigError(f"{folder}: not readable as {what} ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """The first line of an error, and what to do about a pickle `torch.load(weights_only=True)` refused."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "weights_only" in text or "Unpickl" in type(err).__name__ or "Unpickl" in text:
        return ("its .bin weights are a pickle holding more than plain tensors, refused unread (it could run "
                "code); only if you trust it, convert it to safetensors: transformers.AutoModelForCausalLM."
                "from_pretrained(FOLDER, weights_only=False).save_pretrained(NEW_FOLDER) and pass NEW_FOLDER")
    return first[:300]
