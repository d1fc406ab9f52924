"""Config fields that carry their own command-line flag: one table for defaults, help and parsing.

Every config of memloc is a dataclass; a field made with `option(...)` also
says how it appears on the command line (its help, and where the flag name or
parsing differ from the field's). `memloc.cli` builds every flag from these
fields, so a default or a help text exists in one place only, and
`settings(cfg)` is what of a config decides a result (the fields marked
`result=False` — device, batch sizes that only change speed — are left out).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, choices: tuple | None = None, metavar: str | None = None,
           negate: str | None = None, cli: bool = True,
           result: bool = True, spread: tuple[str, ...] | None = None, factory: Callable[[], Any] | None = None,
           aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its command-line flag.

    `flag`: the flag's name (default `--field-name`); `parse`: text -> value (default: the field's
    type); `negate`: for a True-by-default bool, the flag that sets it False (e.g. "--no-test-eval");
    `spread`: the flag's value is a tuple that sets these fields in turn (`--example-tied-dropout
    P_GEN,P_MEM`); `cli=False`: no flag; `result=False`: the field changes speed or placement, not the result;
    `aliases`: more names for the same flag.
    """
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar, "negate": negate,
            "cli": cli, "result": result, "spread": spread, "aliases": aliases}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings(cfg: Any) -> dict:
    """The fields of config `cfg` that decide its result, as a JSON-able dict."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("result", True):
            v = getattr(cfg, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def replaced(cls: type, cfg: Any = None, options: dict | None = None) -> Any:
    """`cfg` (a `cls`, or None for the defaults) with `options` applied over it; unknown names fail in one line."""
    from .errors import ConfigError
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no setting {unknown[0]!r}: choose from {', '.join(sorted(known))}")
    if cfg is not None and not isinstance(cfg, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(cfg).__name__}")
    try:
        if cfg is None:
            return cls(**options)
        return dataclasses.replace(cfg, **options) if options else cfg
    except ConfigError as err:  # called from Python: name the parameter the caller passed, with its flag
        raise ConfigError(api_names(cls, str(err))) from None


def api_names(cls: type, message: str) -> str:
    """`message` with each of `cls`'s flags (`--peak-epoch`) shown as its parameter too (`peak_epoch (--peak-epoch)`),
    for errors raised from the Python API; a flag already named with its parameter is left as it is."""
    import re
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        message = re.sub(rf"(?<![\w(-]){re.escape(flag)}(?![\w-])", f"{f.name} ({flag})", message)
    return message


# ----------------------------------------------------------------------------- parsing flag text

def names(text: str) -> tuple[str, ...]:
    """"a, b" -> ("a", "b")."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def ints(text: str) -> tuple[int, ...]:
    """"0,2,4" -> (0, 2, 4)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"takes comma-separated integers, e.g. 0,2,4, not {text!r}") from None


def floats(text: str, n: int | None = None) -> tuple[float, ...]:
    """"0.4,0.1" -> (0.4, 0.1); exactly `n` of them when given."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"takes comma-separated numbers, not {text!r}") from None
    if n is not None and len(vals) != n:
        raise ValueError(f"takes {n} comma-separated numbers, not {text!r}")
    return vals
