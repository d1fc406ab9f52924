"""The (p_gen, p_mem) grid with its matched baselines: cells, the table, resuming, bad input."""

from __future__ import annotations

import csv
import json

import pytest

from memloc.cli import main
from memloc.core.dropout import ChannelDropout, ExampleTiedDropout, FixedUnitMask
from memloc.core.errors import ConfigError
from memloc.study.grid import DEFAULT_PAIRS, GRID_COLUMNS, grid_cells
from memloc.tasks.experiment import RunConfig, open_run


def test_default_cells_are_the_papers_twelve_pairs_and_matched_baselines():
    assert len(DEFAULT_PAIRS) == 12 and (0.2, 0.05) in DEFAULT_PAIRS and (0.5, 0.2) in DEFAULT_PAIRS
    cells = grid_cells()
    etd = [c for c in cells if c.method == "example_tied"]
    assert len(etd) == 12
    # a = p_gen + (1 - p_gen) p_mem, by hand for (0.4, 0.1): 0.4 + 0.6 * 0.1 = 0.46
    assert next(c for c in etd if (c.p_gen, c.p_mem) == (0.4, 0.1)).active_fraction == pytest.approx(0.46)
    fractions = {c.active_fraction for c in etd}
    for method in ("dropout", "sparse"):
        assert {c.active_fraction for c in cells if c.method == method} == fractions
    assert len({c.name for c in cells}) == len(cells)
    assert len(grid_cells([(0.4, 0.1)], baselines=False)) == 1


def test_bad_pairs():
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        grid_cells([(0.4, 1.5)])
    with pytest.raises(ConfigError, match="twice"):
        grid_cells([(0.4, 0.1), (0.4, 0.1)])
    with pytest.raises(ConfigError, match="no \\(p_gen, p_mem\\) pairs"):
        grid_cells([])


def test_grid_cli_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(["dropout-grid", "--preset", "smoke", "--pairs", "0.4,1.5", "--out", str(out), "--quiet"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["dropout-grid", "--preset", "smoke", "--model", "resnet50", "--pairs", "0.4,0.1",
                 "--out", str(out), "--quiet"]) == 2
    assert "no place for a per-block layer" in capsys.readouterr().err
    assert not out.exists()
    code = main(["dropout-grid", "--preset", "smoke", "--pairs", "0.4", "--out", str(out), "--quiet"])  # argparse's
    assert code == 2 and "--pairs takes 2" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "g"
    assert main(["dropout-grid", "--preset", "smoke", "--epochs", "1", "--no-gradient-accounting",
                 "--train-size", "256", "--pairs", "0.4,0.1", "--out", str(out), "--quiet"]) == 0
    return out


def test_grid_end_to_end(grid_dir):
    rows = list(csv.DictReader((grid_dir / "grid.csv").open()))
    assert tuple(rows[0]) == GRID_COLUMNS
    assert [r["method"] for r in rows] == ["example_tied", "dropout", "sparse"]
    assert {r["active_fraction"] for r in rows} == {"0.46"}
    # each cell is a run directory with the layer it names
    layer_type = {"example_tied": ExampleTiedDropout, "dropout": ChannelDropout, "sparse": FixedUnitMask}
    for r in rows:
        loaded = open_run(grid_dir / r["cell"], device="cpu")
        model = loaded.model()
        kinds = {type(m) for m in model.modules()} & set(layer_type.values())
        assert kinds == {layer_type[r["method"]]}
        if r["method"] != "example_tied":  # baselines: nothing to drop, after == before
            assert r["clean_before"] == r["clean_after"] and r["test_eval"] == r["test_drop"]
            assert loaded.config.model.active_fraction == pytest.approx(0.46)
    assert (grid_dir / "etd-0.4-0.1" / "probes" / "dropout" / "summary.json").exists()
    spec = json.loads((grid_dir / "grid.json").read_text())
    assert spec["cells"] == ["etd-0.4-0.1", "dropout-0.46", "sparse-0.46"]
    assert RunConfig.from_dict(spec["base"]).model.p_gen is None
    # the report's trade-off plot: one marker per cell, the baselines marked apart
    from memloc.report.sections.grid import grid_tradeoff_figure
    fig = grid_tradeoff_figure(rows)
    assert len(fig.axes[0].collections) == len(rows)
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"example-tied", "dropout", "sparse"}
    assert grid_tradeoff_figure([{"cell": "x", "method": "plain"}]) is None  # nothing measured: no figure


def test_grid_resumes_and_refuses_other_settings(grid_dir, capsys):
    before = (grid_dir / "grid.csv").read_text()
    stamp = (grid_dir / "dropout-0.46" / "cell.json").stat().st_mtime_ns
    assert main(["dropout-grid", "--preset", "smoke", "--epochs", "1", "--no-gradient-accounting",
                 "--train-size", "256", "--pairs", "0.4,0.1", "--out", str(grid_dir), "--quiet"]) == 0
    assert capsys.readouterr().out.count("read back") == 3
    assert (grid_dir / "grid.csv").read_text() == before
    assert (grid_dir / "dropout-0.46" / "cell.json").stat().st_mtime_ns == stamp
    assert main(["dropout-grid", "--preset", "smoke", "--epochs", "2", "--pairs", "0.4,0.1",
                 "--out", str(grid_dir), "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_grid_cells_take_the_baselines_named():
    names = lambda **kw: [c.name for c in grid_cells([(0.4, 0.1)], **kw)]  # noqa: E731
    assert names() == ["etd-0.4-0.1", "dropout-0.46", "sparse-0.46"]
    assert names(baselines=("sparse",)) == ["etd-0.4-0.1", "sparse-0.46"]
    assert names(baselines=False) == ["etd-0.4-0.1"]
    with pytest.raises(ConfigError, match="unknown baseline 'magic'"):
        grid_cells([(0.4, 0.1)], baselines=("magic",))
