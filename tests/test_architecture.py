"""The architecture's promises, checked: no import cycle, label noise known to one task, a probe added in one module.

A new probe is its own module plus one registration line; the engine, the CLI and
the report find it through the registry with no edit anywhere else. The probe used
here is the one docs/architecture.md shows, read from that page and run for real.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import types
from pathlib import Path

import pytest

from memloc.cli import main
from memloc.probes import base as probes_base

SRC = Path(__file__).parent.parent / "src" / "memloc"
DOC = Path(__file__).parent.parent / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = ("memloc",) + f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The memloc modules `name` imports anywhere in its file (inside functions too)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                for cand in (f"{base}.{alias.name}", base):
                    if cand in mods:
                        found.add(cand)
                        break
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
    return found - {name}


def test_no_import_cycle_in_the_package():
    """Every import of every module, at the top or inside a function; a package's __init__ (the re-exports) aside."""
    mods = _modules()
    graph = {m: {d for d in _imports(m, p, mods) if mods[d].name != "__init__.py"} for m, p in mods.items()
             if p.name != "__init__.py"}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 25  # the walk saw the package


def test_only_the_classification_task_reads_label_noise():
    """The noise mask, the true labels and the rare marks are read in the classification task alone (its package:
    data, readers, wrapper and task); probes, training, the engine ask the task."""
    pattern = re.compile(r"\.(is_noisy|y_true|noise_known|is_rare)\b")
    readers = {str(f.relative_to(SRC).as_posix()) for f in SRC.rglob("*.py") if pattern.search(f.read_text())}
    assert all(r.startswith("tasks/classification/") for r in readers), sorted(readers)
    assert "tasks/classification/task.py" in readers


def test_the_core_never_asks_which_task_it_has():
    """Training, the budget, the engine's core parts ask the task what it can do (`class_labels`, `kinds`, ...),
    never its name: a new task gets ELR or --epochs auto by saying so, not by an edit in the core."""
    pattern = re.compile(r"\b(task|self\.task)\.name\s*(==|!=|in)\s*")
    asking = sorted(str(f.relative_to(SRC).as_posix()) for f in (SRC / "core").rglob("*.py")
                    if pattern.search(f.read_text()))
    assert not asking, asking


# The layers, bottom to top, by package: a module may import its own layer or a lower one, never a higher one.
# Everything not named here (the package's __init__, cli, __main__, the old-path table) is the top.
LAYERS = {"memloc.core": 0, "memloc._version": 0, "memloc.tasks": 1, "memloc.probes": 2, "memloc.methods": 2,
          "memloc.report": 3, "memloc.study": 3, "memloc.audit": 3, "memloc.bench": 3}
TOP = 4


def _layer(module: str) -> int:
    for package, level in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == package or module.startswith(package + "."):
            return level
    return TOP


def test_imports_run_down_the_layers_never_up():
    """core <- tasks <- probes / methods <- report / study / audit / bench <- cli: every import of every module
    (inside functions too) goes to its own layer or below; a new module is held by its package's place."""
    mods = _modules()
    up = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
          for m, p in sorted(mods.items()) for d in sorted(_imports(m, p, mods)) if _layer(d) > _layer(m)]
    assert not up, "\n".join(up)
    top_level = {m for m, p in mods.items() if p.parent == SRC and p.name != "__init__.py"}
    # the package's top holds its entry points alone: every other module sits in a layer's package
    assert top_level <= {"memloc.cli", "memloc.__main__", "memloc._version", "memloc._moved"}, sorted(top_level)
    assert {_layer(m) for m in mods} == {0, 1, 2, 3, TOP}


def test_no_module_over_800_lines():
    """A module is one concept a reader can hold; past 800 lines it is two (split it by concept)."""
    long = {str(f.relative_to(SRC).as_posix()): n for f in SRC.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 800}
    assert not long, long


# memloc.__all__ as it stood before the package was arranged by task (commit 442d789): the layout moved modules,
# not the public API
PUBLIC_API = [
    "ConfigError", "DataError", "MemlocError", "RunError",
    "DataConfig", "Dataset", "corrupt_labels", "load_data", "wrap_data", "from_torch_dataset",
    "Task", "task_of",
    "Layer", "build_model", "layers",
    "RunDir",
    "TrainConfig", "History", "train", "evaluate", "predict", "prepare",
    "ModelConfig", "RunConfig", "open_run", "resume_training", "run_training",
    "ProbeResult", "run_probe",
    "RewindConfig", "rewind", "RetrainConfig", "retrain", "FlipConfig", "flip",
    "DropoutConfig", "evaluate_dropout", "DetectConfig", "detect", "detect_scores", "plot_roc",
    "DepthConfig", "prediction_depth",
    "LocalizeConfig", "localize", "edited", "BenchConfig", "bench_localize", "TinyMemConfig", "tinymem_data",
    "export_dropped", "export_localized", "load_exported", "remove_memorization",
    "DEFAULT_PAIRS", "dropout_grid",
    "dropout_mode", "example_indices", "insert_example_tied_dropout",
    "build_report",
]


def test_the_public_api_is_what_it_was_before_the_layout():
    import memloc
    assert memloc.__all__ == PUBLIC_API
    assert all(getattr(memloc, n) is not None for n in PUBLIC_API)


def test_the_old_import_paths_are_the_new_modules():
    """`memloc.models`, `memloc.data`, `memloc.lm.measures` (and every other moved path) give the module at its new
    place, itself, with a DeprecationWarning: one release for users' imports to follow."""
    import importlib

    from memloc._moved import MOVED
    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=re.escape(new)):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new) and module.__name__ == new and module.__spec__.name == new
    import memloc
    from memloc.lm.measures import causal_lm  # noqa: F401 - the old `from` form
    assert memloc.models is importlib.import_module("memloc.tasks.classification.models")
    assert memloc.data.Dataset is memloc.Dataset


def _doc_probe() -> str:
    """The probe module docs/architecture.md shows (its first python block under "Adding a probe")."""
    text = DOC.read_text()
    section = text[text.index("## Adding a probe"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def doc_probe():
    """The documented probe, imported as its own module (which registers it), and unregistered afterwards."""
    module = types.ModuleType("memloc_doc_probe")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    try:
        exec(compile(_doc_probe(), "docs/architecture.md", "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(module.__name__, None)
        probes_base._REGISTRY.pop(getattr(getattr(module, "PROBE", None), "name", ""), None)


def test_a_probe_is_one_module_and_one_registration(doc_probe, smoke_master, tmp_path, capsys):
    from conftest import copy_of
    probe = doc_probe.PROBE
    run = copy_of(smoke_master, tmp_path / "run")
    # the CLI has its command, with the flags of its config, and runs it through the engine
    assert main([probe.command, "--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out
    assert main([probe.command, str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "done:" in out
    d = run / "probes" / probe.name
    summary = json.loads((d / "summary.json").read_text())
    assert summary["settings"]["epoch"] == 6 and json.loads((run / "run.json").read_text())["stages"][probe.name][
        "status"] == "done"
    rows = (d / f"{probe.name}.csv").read_text().splitlines()
    assert rows[0] == "kind,examples,mean_loss" and len(rows) == 3  # clean and noisy (no rare examples here)
    clean, noisy = (float(r.split(",")[2]) for r in rows[1:])
    assert noisy > clean  # the smoke model has not memorized its noisy labels: they cost more
    # the report shows it without a section written for it
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    html = (run / "report" / "report.html").read_text()
    assert probe.help[1:] in html and "mean loss" in html  # the CSV column, as a header people read
    # and the Python API takes the model in hand too, through the same engine
    from memloc import open_run, run_probe
    loaded = open_run(run)
    res = run_probe(probe, loaded.model(), loaded.data)
    assert [r["mean_loss"] for r in res.rows] == pytest.approx([clean, noisy], rel=1e-4)
