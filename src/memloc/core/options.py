"""Config fields that carry their own command-line flag: one table for defaults, help and parsing.

Every config of memloc is a dataclass; a field made with `option(...)` also
says how it appears on the command line (its help, and where the flag name or
parsing differ from the field's). `memloc.cli` builds every flag from these
fields, so a default or a help text exists in one place only, and
`settings(cfg)` is what of a config decides a result (the fields marked
`result=False` — device, batch sizes that only change speed — are left out).

A numeric field also declares its valid range there (`at_least`, `above`,
`at_most`, `below`; a float field is always finite): the command line checks a
flag's value against it while parsing, before any work, and each config's
`__post_init__` calls `check_ranges(self)`, so a config built from Python is
held to the same range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable

_MISSING = dataclasses.MISSING
INT64_MAX = 2**63 - 1  # the largest index or seed: what an int64 tensor and torch.manual_seed take


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, choices: tuple | None = None, metavar: str | None = None,
           negate: str | None = None, cli: bool = True,
           result: bool = True, spread: tuple[str, ...] | None = None, factory: Callable[[], Any] | None = None,
           aliases: tuple[str, ...] = (), at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with its command-line flag.

    `flag`: the flag's name (default `--field-name`); `parse`: text -> value (default: the field's
    type); `negate`: for a True-by-default bool, the flag that sets it False (e.g. "--no-test-eval");
    `spread`: the flag's value is a tuple that sets these fields in turn (`--example-tied-dropout
    P_GEN,P_MEM`); `cli=False`: no flag; `result=False`: the field changes speed or placement, not the result;
    `aliases`: more names for the same flag. A numeric field's range: `at_least` / `above` (>= / >) and `at_most` /
    `below` (<= / <), for each number of a tuple field; None (where the type allows it) is always "not given".
    """
    if at_least is not None and above is not None or at_most is not None and below is not None:
        raise TypeError("a range takes one lower bound (at_least or above) and one upper (at_most or below)")
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar, "negate": negate,
            "cli": cli, "result": result, "spread": spread, "aliases": aliases,
            "range": (at_least, above, at_most, below)}
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
    if "given" in known and options and "given" not in options:  # the arguments are what the caller set
        before = () if cfg is None else (cfg.given if cfg.given is not None else given_fields(cfg))
        options["given"] = tuple(sorted(set(before) | set(options)))
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


# ----------------------------------------------------------------------------- ranges

def numeric(f: dataclasses.Field) -> tuple[str, bool] | None:
    """("int" or "float", whether a tuple of them) of a numeric field; None for any other (bool, str, ...)."""
    kind = str(f.type)
    word = "float" if re.search(r"\bfloat\b", kind) else "int" if re.search(r"\bint\b", kind) else None
    return None if word is None else (word, kind.lstrip().startswith("tuple"))


def _show(v: float) -> str:
    if v == INT64_MAX:
        return "2^63 - 1"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def range_words(f: dataclasses.Field, *, one: bool = False) -> str:
    """The range of numeric field `f` in words: "an integer of at least 1", "a number in (0, 1]", "integers ..."
    (`one`: of one number of a tuple field)."""
    word, many = numeric(f)
    many = many and not one
    at_least, above, at_most, below = f.metadata.get("range", (None,) * 4)
    lo, hi = (at_least if above is None else above), (at_most if below is None else below)
    noun = {("int", False): "an integer", ("int", True): "integers", ("float", False): "a number",
            ("float", True): "numbers"}[word, many]
    if word == "float" and hi is None:  # no upper bound says it: inf and nan are refused too
        noun = "finite numbers" if many else "a finite number"
    if lo is not None and hi is not None:
        if word == "int" and above is None and below is None:
            return f"{noun} from {_show(lo)} to {_show(hi)}"
        return f"{noun} in {'[' if above is None else '('}{_show(lo)}, {_show(hi)}{']' if below is None else ')'}"
    if lo is not None:
        return f"{noun} {'of at least' if above is None else 'above'} {_show(lo)}"
    if hi is not None:
        return f"{noun} {'of at most' if below is None else 'below'} {_show(hi)}"
    return noun


def _fits(v: Any, word: str, bounds: tuple) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    if word == "int" and not isinstance(v, numbers.Integral):
        return False
    if word == "float" and not math.isfinite(v):
        return False
    at_least, above, at_most, below = bounds
    return ((at_least is None or v >= at_least) and (above is None or v > above)
            and (at_most is None or v <= at_most) and (below is None or v < below))


def _given(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else repr(v)


def range_problem(f: dataclasses.Field, value: Any, *, one: bool = False) -> str | None:
    """What is wrong with `value` for numeric field `f`, as "takes an integer of at least 1, not 0"; None when it
    fits (or `f` is not numeric). None is "not given" where the field's type allows it. `one`: `value` is one number
    of a tuple field."""
    kind = numeric(f)
    if kind is None or (value is None and "None" in str(f.type) and not one):
        return None
    if isinstance(value, str) and re.search(r"\bstr\b", str(f.type)):  # a word the field also takes ("all")
        return None
    word, many = kind
    bounds = f.metadata.get("range", (None,) * 4)
    if one:
        return None if _fits(value, word, bounds) else f"takes {range_words(f, one=True)}, not {_given(value)}"
    if many:
        if not isinstance(value, (tuple, list)):
            return f"takes {range_words(f)}, not {_given(value)}"
        bad = next((v for v in value if not _fits(v, word, bounds)), _MISSING)
        return None if bad is _MISSING else f"takes {range_words(f)}, not {_given(bad)}"
    return None if _fits(value, word, bounds) else f"takes {range_words(f)}, not {_given(value)}"


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of field `f` (`--n-embd`)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_ranges(cfg: Any) -> None:
    """Raise ConfigError for the first numeric field of config `cfg` outside its declared range, naming the
    parameter and its flag: "n_embd (--n-embd) takes an integer of at least 1, not 0". Called first by every
    config's `__post_init__`."""
    from .errors import ConfigError
    fields = dataclasses.fields(cfg)
    spread_by = {n: flag_of(f) for f in fields for n in (f.metadata.get("spread") or ())}
    for f in fields:
        problem = range_problem(f, getattr(cfg, f.name))
        if problem:
            flag = flag_of(f) if f.metadata.get("cli", True) else spread_by.get(f.name)
            raise ConfigError(f"{f.name} ({flag}) {problem}" if flag else f"{f.name} {problem}")


# ----------------------------------------------------------------------------- counts that fit the data

def given_option() -> Any:
    """The `given` field of a config whose counts fit the data (`fitted`): the names of the fields the user set, as
    the command line and the API record them; None (a config built in Python) infers them (`given_fields`)."""
    return option(None, cli=False, result=False)


def given_fields(cfg: Any) -> frozenset[str]:
    """The fields of config `cfg` the user set: its `given` field where the caller recorded them (the command line,
    a study), else every field whose value differs from its default (a config built in Python: `FlipConfig(others=
    300)` sets others, `FlipConfig()` nothing). A preset's values are defaults, not given."""
    recorded = getattr(cfg, "given", None)
    if recorded is not None:
        return frozenset(recorded)
    out = set()
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else _MISSING)
        if default is _MISSING or getattr(cfg, f.name) != default:
            out.add(f.name)
    return frozenset(out - {"given"})


def fitted(cfg: Any, name: str, available: int, what: str, log: Callable[[str], None] | None = None) -> int:
    """Count field `name` of config `cfg` fitted to the `available` items of the data (`what`, e.g. "training
    examples"): its value where it fits. Larger, a count the user set (`given_fields`) is refused in one line
    (DataError) naming its flag and the fix; a default (the field's, or a preset's) shrinks to `available` with one
    line to `log` (a Python warning without one)."""
    from .errors import DataError, warn
    value = getattr(cfg, name)
    if value is None or value <= available:
        return value
    flag = flag_of(next(f for f in dataclasses.fields(cfg) if f.name == name))
    if name in given_fields(cfg):
        raise DataError(f"{flag} {value} is more than the {available:,} {what}: pass {flag} {available} or fewer")
    line = f"{flag[2:]}: {available:,} (the default {value:,} is more than the {available:,} {what}; {flag} to choose)"
    if log is not None:
        log(line)
    else:
        warn(line)
    return available



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
