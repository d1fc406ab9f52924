"""Every numeric setting has a range, declared once on its config field and checked before any work.

The cases are generated from the config fields themselves: a numeric field added later is swept too (and one
without a declared range fails `test_every_numeric_field_declares_a_range`). A bad flag gives one line naming the
flag and the range, exit 2, and nothing written; the same value from Python raises ConfigError naming the parameter
and its flag. Also: `--indices` files with indices outside int64, negative, or past the run's training sequences.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import numpy as np
import pytest
from toys import assert_one_line_error

import memloc
from memloc.cli import main
from memloc.core.errors import ConfigError, DataError
from memloc.core.example_files import Indices, check_indices, read_indices
from memloc.core.options import flag_of, numeric, range_problem, range_words

NOT_YET: set[str] = set()  # configs left without ranges (none)


def _config_classes() -> list[type]:
    """Every dataclass of memloc with a field made by `options.option` (whose metadata has a range entry)."""
    found = {}
    for info in pkgutil.walk_packages(memloc.__path__, "memloc."):
        if info.name.endswith("__main__"):  # the command itself
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (ray, ...): its configs, if any, are not built here
            continue
        for obj in vars(module).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
                    and any("range" in f.metadata for f in dataclasses.fields(obj))):
                found[obj.__qualname__] = obj
    return [found[k] for k in sorted(found) if k not in NOT_YET]


CONFIGS = _config_classes()


def _bounds(f: dataclasses.Field) -> tuple:
    return f.metadata.get("range", (None,) * 4)


def _bad(f: dataclasses.Field):
    """A value just outside the field's range (nan for a float field without bounds)."""
    word, _ = numeric(f)
    at_least, above, at_most, below = _bounds(f)
    step = 1 if word == "int" else 0.5
    if at_least is not None:
        return at_least - step
    if above is not None:
        return above
    if at_most is not None:
        return at_most + step
    if below is not None:
        return below
    assert word == "float", f"{f.name}: an integer field without a declared range"
    return float("nan")


def _good(f: dataclasses.Field):
    at_least, above, at_most, below = _bounds(f)
    lo, hi = (at_least if above is None else above), (at_most if below is None else below)
    if lo is not None and hi is not None:
        return (lo + hi) / 2
    return lo + 1 if lo is not None else hi - 1 if hi is not None else 0


def _numeric_fields(cls: type, *, cli: bool) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if numeric(f) and (f.metadata.get("cli", True) or not cli)]


def _flag_value(cls: type, f: dataclasses.Field, tmp_path) -> str:
    """The flag text of a bad value of `f`: each part of a tuple flag bad (C,H,W: three), a spread flag's own part
    bad and the others good, an --indices file holding it."""
    if f.metadata.get("parse") is read_indices:
        path = tmp_path / "bad.txt"
        path.write_text(f"{_bad(f)}\n")
        return str(path)
    spread = f.metadata.get("spread")
    if spread:
        fields = {g.name: g for g in dataclasses.fields(cls)}
        return ",".join(str(_bad(fields[n]) if n == f.name else _good(fields[n])) for n in spread)
    metavar = f.metadata.get("metavar") or ""
    parts = metavar.count(",") + 1 if metavar and "..." not in metavar else 1
    return ",".join([str(_bad(f))] * parts)


def _cli_cases() -> list:
    """(command, leading args, config class, field) for every numeric flag of `memloc train` (both tasks) and of the
    probe commands."""
    from memloc.core.training import TrainConfig
    from memloc.probes import registered
    from memloc.tasks.classification.data import DataConfig
    from memloc.tasks.experiment import ModelConfig
    from memloc.tasks.lm.text import TextConfig
    cases = []
    for task, data in (("classification", DataConfig), ("lm", TextConfig)):
        for cls in (data, ModelConfig, TrainConfig):
            cases += [pytest.param("train", ["--task", task], cls, f, id=f"train-{task}-{flag_of(f)}")
                      for f in _numeric_fields(cls, cli=True)]
    for probe in registered().values():
        cases += [pytest.param(probe.command, ["RUN"], probe.config, f, id=f"{probe.command}-{flag_of(f)}")
                  for f in _numeric_fields(probe.config, cli=True)]
    return cases


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("flag, value, words", [
    ("--n-embd", "0", "--n-embd takes an integer of at least 1, not 0"),
    ("--n-head", "0", "--n-head takes an integer of at least 1, not 0"),
    ("--n-layer", "0", "--n-layer takes an integer of at least 1, not 0"),
    ("--weight-decay", "nan", "--weight-decay takes a finite number of at least 0, not nan"),
])
def test_lm_model_flags_out_of_range_stop_before_any_work(tmp_path, capsys, flag, value, words):
    out = tmp_path / "run"
    code = main(["train", "--task", "lm", "--preset", "smoke", "--out", str(out), flag, value, "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, words)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command, lead, cls, f", _cli_cases())
def test_every_numeric_flag_refuses_a_value_outside_its_range(tmp_path, capsys, command, lead, cls, f):
    run = tmp_path / "run"
    argv = [command] + [str(run) if a == "RUN" else a for a in lead] + [flag_of(f), _flag_value(cls, f, tmp_path)]
    if command == "train":
        argv += ["--out", str(run)]
    code = main(argv)
    metavar = f.metadata.get("metavar") or ""
    fixed = "," in metavar and "..." not in metavar  # C,H,W: the first part is named, with one number's range
    words = [flag_of(f)] + ([] if f.metadata.get("parse") is read_indices or f.metadata.get("spread")
                            else [f"{metavar.split(',')[0]} takes {range_words(f, one=True)}" if fixed
                                  else range_words(f)])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not run.exists()


def test_a_spread_flag_names_its_part(capsys):
    code = main(["train", "--example-tied-dropout", "0.4,1.5", "--out", "unused"])
    assert_one_line_error(code, capsys.readouterr().err, "--example-tied-dropout P_MEM takes a number in (0, 1], "
                                                         "not 1.5")
    code = main(["train", "--memorization-sinks", "nan,0.1", "--out", "unused"])  # the alias: named as typed, once
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "memloc: error: --memorization-sinks P_GEN takes a number in (0, 1], not nan")
    assert "--example-tied-dropout" not in err


def test_numbers_in_range_still_parse(tmp_path, capsys):
    """The boundaries that are in range pass (warm-up 0, noise 0, canaries 0, p_gen 1): the run trains."""
    out = tmp_path / "run"
    code = main(["train", "--preset", "smoke", "--dataset", "digits", "--train-size", "200", "--epochs", "1",
                 "--warmup", "0", "--noise", "0", "--weight-decay", "0", "--example-tied-dropout", "1,0.5",
                 "--no-gradient-accounting", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- from Python

def test_every_numeric_field_declares_a_range():
    """An integer field needs a declared range (a float field is at least finite); the sweep covers them all."""
    assert len(CONFIGS) >= 12, [c.__name__ for c in CONFIGS]
    for cls in CONFIGS:
        for f in _numeric_fields(cls, cli=False):
            if numeric(f)[0] == "int":
                assert any(b is not None for b in _bounds(f)), f"{cls.__name__}.{f.name} has no range"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_field_refuses_a_value_outside_its_range_from_python(cls):
    spread_by = {n: flag_of(f) for f in dataclasses.fields(cls) for n in (f.metadata.get("spread") or ())}
    for f in _numeric_fields(cls, cli=False):
        bad = _bad(f)
        value = (bad,) * (3 if f.name == "synthetic_shape" else 2 if "float, float" in str(f.type) else 1) \
            if numeric(f)[1] else bad
        flag = flag_of(f) if f.metadata.get("cli", True) else spread_by.get(f.name)
        with pytest.raises(ConfigError) as err:
            cls(**{f.name: value})
        assert str(err.value).startswith(f"{f.name} ({flag}) " if flag else f"{f.name} "), str(err.value)
        assert range_words(f) in str(err.value)


def test_python_errors_name_the_parameter_and_its_flag():
    from memloc.core.training import TrainConfig
    from memloc.tasks.experiment import ModelConfig
    with pytest.raises(ConfigError, match=r"^lr \(--lr\) takes a finite number above 0, not -1$"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^n_embd \(--n-embd\) takes an integer of at least 1, not 0$"):
        ModelConfig(n_embd=0)
    with pytest.raises(ConfigError, match=r"^weight_decay \(--weight-decay\) takes a finite number of at least 0"):
        TrainConfig(weight_decay=float("nan"))
    with pytest.raises(ConfigError, match=r"^epochs \(--epochs\) takes an integer of at least 1, not 2\.5$"):
        TrainConfig(epochs=2.5)
    with pytest.raises(ConfigError, match=r"^epochs \(--epochs\) .* not None$"):  # None is "not given" only where
        TrainConfig(epochs=None)                                                # the type allows it
    with pytest.raises(ConfigError, match=r"^p_mem \(--example-tied-dropout\) takes a number in \(0, 1\]"):
        ModelConfig(p_gen=0.4, p_mem=0.0)
    with pytest.raises(ConfigError, match=r"^momentum takes a number in \[0, 1\), not inf$"):
        TrainConfig(momentum=float("inf"))
    with pytest.raises(ConfigError, match=r"^lr \(--lr\) takes a finite number above 0, not '0.1'$"):
        TrainConfig(lr="0.1")
    with pytest.raises(ConfigError, match=r"^k \(--k\)"):
        memloc.prediction_depth("no-such-run", k=0)  # the API checks before it opens the run
    assert TrainConfig(epochs=np.int64(3), lr=np.float32(0.5)).epochs == 3  # numpy numbers are numbers
    # None means "not given" where the type allows it
    assert ModelConfig(n_embd=None, width=None).n_embd is None


def test_presets_and_defaults_pass_their_ranges():
    from memloc.core.training import TrainConfig
    from memloc.probes import RetrainConfig
    from memloc.study.run import study_config
    from memloc.tasks.experiment import PRESETS, TASK_DATA, ModelConfig, RunConfig
    from memloc.tasks.lm.models import LM_PRESETS, resolved_lm
    for cls in CONFIGS:
        cls()
    for task, table in (("classification", PRESETS), ("lm", LM_PRESETS)):
        for name, p in table.items():
            cfg = RunConfig(data=TASK_DATA[task]()(**p.get("data", {})), model=ModelConfig(**p.get("model", {})),
                            train=TrainConfig(**p.get("train", {})), task=task)
            if task == "lm":
                resolved_lm(cfg.model)
            else:
                study_config(name)
    RetrainConfig().schedule()
    RetrainConfig(epochs=3, peak_epoch=0).schedule()


def test_a_saved_config_out_of_range_is_a_damaged_run(tmp_path):
    from memloc.core.errors import RunError
    from memloc.tasks.experiment import RunConfig
    d = RunConfig().to_dict()
    d["train"]["lr"] = -1.0
    with pytest.raises(RunError, match=r"damaged.*lr \(--lr\)"):
        RunConfig.from_dict(d)


# ----------------------------------------------------------------------------- --indices files

def test_read_indices_refuses_what_is_not_an_int64_index_naming_file_and_line(tmp_path):
    text = tmp_path / "idx.txt"
    text.write_text(f"# chosen by hand\n0\n\n3, 7\n{2**63}\n")
    with pytest.raises(ConfigError, match=rf"^--indices file {text}, line 5: {2**63} is outside 0\.\.2\^63 - 1"):
        read_indices(text)
    text.write_text("0\n-1\n")
    with pytest.raises(ConfigError, match=rf"^--indices file {text}, line 2: -1 is outside"):
        read_indices(text)
    text.write_text("0\n2.5\n")
    with pytest.raises(ConfigError, match=rf"^--indices file {text}, line 2: '2.5' is not an integer"):
        read_indices(text)
    text.write_text("4\nnan\n")
    with pytest.raises(ConfigError, match="line 2: 'nan' is not an integer"):
        read_indices(text)
    npy = tmp_path / "idx.npy"
    np.save(npy, np.array([1, 2, -4]))
    with pytest.raises(ConfigError, match=rf"^--indices file {npy}, position 2: -4 is outside"):
        read_indices(npy)
    np.save(npy, np.array([1, 2**63], dtype=np.uint64))
    with pytest.raises(ConfigError, match=rf"position 1: {2**63} is outside"):
        read_indices(npy)
    np.save(npy, np.array([1.0, np.inf]))
    with pytest.raises(ConfigError, match="position 1: inf is not an integer"):
        read_indices(npy)
    np.save(npy, np.array(["a"]))
    with pytest.raises(ConfigError, match="is not a list of integers"):
        read_indices(npy)
    # in range: exact (no float rounding), and where each came from
    text.write_text(f"# chosen\n3, 7\n{2**63 - 1}\n1e3\n")
    got = read_indices(text)
    assert got == (3, 7, 2**63 - 1, 1000) and isinstance(got, Indices)
    assert [got.where(i) for i in range(4)] == [f"--indices file {text}, line {n}" for n in (2, 2, 3, 4)]
    np.save(npy, np.array([5, 9], dtype=np.uint64))
    assert read_indices(npy) == (5, 9) and read_indices(npy).where(1) == f"--indices file {npy}, position 1"


def test_an_index_past_the_run_names_its_file_and_line(tmp_path):
    text = tmp_path / "idx.txt"
    text.write_text("0\n\n70\n")
    with pytest.raises(DataError, match=rf"^--indices file {text}, line 3: sequence index 70 is outside 0\.\.63: "
                                        "the run has 64 training sequences"):
        check_indices(read_indices(text), 64, "sequence")
    with pytest.raises(DataError, match=r"^example index 70 is outside 0\.\.9"):  # from Python: no file to name
        check_indices((1, 70), 10)
    check_indices(read_indices(text), 71)
    # a config keeps where its indices came from (and equals the plain tuple)
    from memloc import FlipConfig, LocalizeConfig
    cfg = LocalizeConfig(indices=read_indices(text))
    assert cfg.indices == (0, 70) and cfg.indices.where(1).endswith("line 3")
    assert dataclasses.replace(cfg, k=3).indices.where(1).endswith("line 3")
    assert FlipConfig(indices=[np.int64(4)]).indices == (4,)


@pytest.fixture(scope="module")
def lm_run(tiny_lm_master, tmp_path_factory):
    """The shared 1-epoch LM run of 64 training sequences (this module's own copy)."""
    from conftest import copy_of
    return copy_of(tiny_lm_master, tmp_path_factory.mktemp("ranges") / "run")


@pytest.mark.parametrize("command", ["localize", "flip"])
@pytest.mark.parametrize("lines, words", [
    (f"0\n{2**63}\n", ["line 2", f"{2**63} is outside 0..2^63 - 1"]),
    (f"0\n{2**64 + 5}\n", ["line 2", "is outside 0..2^63 - 1"]),
    ("3\n-1\n", ["line 2", "-1 is outside"]),
    ("0\n1\n\n64\n", ["line 4", "index 64 is outside 0..63", "64 training"]),
])
def test_indices_outside_the_range_or_the_run_are_one_line(lm_run, tmp_path, capsys, command, lines, words):
    idx = tmp_path / "idx.txt"
    idx.write_text(lines)
    argv = [command, str(lm_run), "--indices", str(idx), "--quiet"]
    code = main(argv + (["--method", "zero-out", "--k", "2"] if command == "localize" else ["--others", "8"]))
    assert_one_line_error(code, capsys.readouterr().err, f"--indices file {idx}", *words)
    assert not (lm_run / "probes" / ("localize" if command == "localize" else "flipping")).exists()


def test_npy_indices_name_the_position(lm_run, tmp_path, capsys):
    idx = tmp_path / "idx.npy"
    np.save(idx, np.array([0, 1, 99]))
    code = main(["localize", str(lm_run), "--indices", str(idx), "--method", "zero-out", "--k", "2", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, f"--indices file {idx}, position 2", "index 99 is outside")
    np.save(idx, np.array([0, -3]))
    code = main(["localize", str(lm_run), "--indices", str(idx), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, f"--indices file {idx}, position 1: -3 is outside")


def test_range_problem_is_none_inside_the_range():
    from memloc.core.training import TrainConfig
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert range_problem(fields["warmup"], 0.0) is None and range_problem(fields["warmup"], 0.999) is None
    assert range_problem(fields["warmup"], 1.0) == "takes a number in [0, 1), not 1.0"
    assert range_problem(fields["clip"], None) is None  # optional: not given
    assert range_problem(fields["optimizer"], "anything") is None  # not numeric
