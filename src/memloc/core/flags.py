"""CLI flags made from config fields: a field's `option(...)` metadata (`memloc.core.options`) is its flag's name,
type, choices and help, once; `add_config_flags` puts a config class's fields on a parser, `given` reads back the
ones the user set, and `FlagParser` turns argparse's errors into memloc's one line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any, Callable, NoReturn

from .errors import MemlocError
from .options import floats, ints, names


def _parse(f: dataclasses.Field, flag: str, spread: tuple[dataclasses.Field, ...] = ()) -> Callable[[str], Any]:
    """text -> the field's value, refused in one line (naming `flag` and the range) when it is outside the field's
    declared range; a spread flag's numbers each against the range of the field it sets (`spread`), and each number
    of a flag of a fixed count (metavar LAMBDA,BETA) named by its part."""
    from .options import numeric, range_problem
    parse = f.metadata.get("parse")
    if parse is None:
        kind = str(f.type)
        parse = float if "float" in kind else int if "int" in kind else str
    metavar = f.metadata.get("metavar") or ""
    parts = metavar.split(",")
    parts = parts if len(parts) == len(spread) else [g.name for g in spread]
    fixed = (numeric(f) or (None, False))[1] and "," in metavar and "..." not in metavar  # C,H,W

    def checked(value: Any) -> Any:
        if spread:
            items = [(part, g, v, False) for part, g, v in zip(parts, spread, value)]
        elif fixed and isinstance(value, tuple) and len(value) == len(metavar.split(",")):
            items = [(part, f, v, True) for part, v in zip(metavar.split(","), value)]
        else:
            items = [(None, f, value, False)]
        for part, g, v, one in items:
            problem = range_problem(g, v, one=one)
            if problem:
                raise argparse.ArgumentTypeError(f"{flag} {part + ' ' if part else ''}{problem}")
        return value

    def convert(text: str) -> Any:
        try:
            return checked(parse(text))
        except MemlocError as err:  # a file named by the flag: its own one line
            raise argparse.ArgumentTypeError(str(err)) from None
        except ValueError as err:
            msg = str(err)
            if msg.startswith("takes"):
                raise argparse.ArgumentTypeError(f"{flag} {msg}") from None
            what = getattr(parse, "__name__", "value")
            raise argparse.ArgumentTypeError(
                f"{flag} takes {'a number' if what == 'float' else 'an integer' if what == 'int' else 'a value'}, "
                f"not {text!r}") from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type, *, exclude: tuple[str, ...] = (),
                     title: str | None = None, preset_set: frozenset[str] = frozenset()) -> None:
    """One flag per field of config dataclass `cls` made with `option(...)` (default None: "not given").

    The help names the field's default; for the fields in `preset_set`, that a --preset may set it."""
    group = parser.add_argument_group(title) if title else parser
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli", True) or f.name in exclude:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:  # a flag two configs share (--holdout): one flag sets both
            continue
        default = defaults.get(f.name)
        if meta.get("spread"):  # one flag for several fields: their defaults together
            default = tuple(defaults.get(n) for n in meta["spread"]) if default is not None else None
        help_ = meta.get("help", "").replace("%", "%%")  # argparse formats help with %: a "90%" is text
        note = " [--preset may set it]" if f.name in preset_set else ""
        if str(f.type) == "bool":
            if meta.get("negate"):  # its help says what the flag does
                group.add_argument(meta["negate"], dest=f.name, action="store_false", default=None,
                                   help=help_ + note)
            else:
                group.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_ + note)
            continue
        if default is not None and not isinstance(default, tuple):
            help_ = f"{help_} (default {default:g})" if isinstance(default, float) else f"{help_} (default {default})"
        elif isinstance(default, tuple):
            help_ = f"{help_} (default {','.join(map(str, default))})"
        help_ += note
        metavar = meta.get("metavar") or (None if meta.get("choices") else flag.lstrip("-").upper().replace("-", "_"))
        spread = tuple(by_name[n] for n in meta.get("spread") or ())
        group.add_argument(flag, *meta.get("aliases", ()), dest=f.name, type=_parse(f, flag, spread), default=None,
                           help=help_, choices=meta.get("choices"), metavar=metavar)


def given(args: argparse.Namespace, cls: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` whose flags were given, as {field: value} (a spread flag sets several fields)."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is None or not f.metadata.get("cli", True) or f.name in exclude:
            continue
        spread = f.metadata.get("spread")
        out.update(dict(zip(spread, v)) if spread else {f.name: v})
    return out


def as_typed(message: str, parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """`message` naming each flag of `parser` that has several spellings (--memorization-sinks is
    --example-tied-dropout) the way the user typed it in `argv`, where they typed one of them."""
    for action in parser._actions:
        names = [n for n in action.option_strings if n.startswith("--")]
        typed = {n for n in names for a in argv if a == n or a.startswith(n + "=")}
        if len(names) < 2 or len(typed) != 1:
            continue
        flag = typed.pop()
        message = message.replace("/".join(action.option_strings), flag)
        for other in names:
            message = re.sub(rf"(?<![\w-]){re.escape(other)}(?![\w-])", flag, message)
    return message


class FlagParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line `memloc: error: ...`, exit 2, no usage dump; a flag with
    several spellings is named as typed."""

    def parse_known_args(self, args=None, namespace=None):
        self._typed = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        message = as_typed(message, self, getattr(self, "_typed", []))
        m = re.match(r"argument (\S+): (\S+) ", message)  # "argument --x/--y: --x takes ..." says the flag once
        message = message[m.end(1) + 2:] if m and m.group(2) in m.group(1).split("/") else message
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f"`memloc {command} --help`" if command else "`memloc --help`"
        self.exit(2, f"memloc: error: {message.strip()} (see {hint})\n")


# ----------------------------------------------------------------------------- argparse types of list flags

def pairs_arg(text: str) -> tuple[tuple[float, float], ...]:
    pairs = []
    for part in text.split(";"):
        if part.strip():
            try:
                pairs.append(floats(part.strip(), 2))
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"--pairs {err}") from None
    if not pairs:
        raise argparse.ArgumentTypeError(f"--pairs takes P_GEN,P_MEM pairs separated by ';', not {text!r}")
    return tuple(pairs)  # type: ignore[return-value]


def names_arg(text: str) -> tuple[str, ...]:
    return names(text)


def ints_arg(text: str) -> tuple[int, ...]:
    try:
        return ints(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def floats_arg(text: str) -> tuple[float, ...]:
    try:
        return floats(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
