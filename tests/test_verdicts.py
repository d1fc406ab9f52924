"""The claims' decisions (memloc.report.verdicts) on constructed inputs: a clear effect holds, a null effect does not,
and too few examples give "not enough data" — cases the old lenient rules got wrong."""

import numpy as np
import pytest

from memloc.report import verdicts as V


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- fewer units, smaller drop

def test_fewer_units_holds_on_a_clear_effect():
    v = V.fewer_units([3, 4, 5, 5, 6, 4, 3, 5], [20, 30, 25, 40, 22, 35, 28, 31])
    assert v.verdict == V.HOLDS and v.p < 0.001 and v.effect == 1.0  # every noisy example needs fewer
    assert "Mann–Whitney" in v.test and v.threshold == "p < 0.05" and v.n == "8 noisy, 8 clean"
    assert "rank-biserial +1.00" in v.result


def test_a_median_tie_does_not_hold_and_states_its_p_value():
    # medians 1 vs 1: the old rule said a silent "no"; the test says why, with its p-value
    v = V.fewer_units([1, 1, 1, 1, 2, 1], [1, 1, 2, 1, 1, 3])
    assert v.verdict == V.FAILS and v.p == pytest.approx(0.2635, abs=1e-3)
    assert "medians 1 vs 1" in v.result and "p = 0.264" in v.result


def test_fewer_units_null_effect_and_the_wrong_direction_do_not_hold():
    x = _rng().integers(1, 20, 200)
    assert V.fewer_units(x[:100], x[100:]).verdict == V.FAILS
    assert V.fewer_units([20, 30, 25, 40, 22], [3, 4, 5, 5, 6]).verdict == V.FAILS  # noisy need MORE


def test_unflipped_examples_rank_above_every_flipped_one():
    inf = np.inf
    v = V.fewer_units([2, 3, 2, 4, 3], [inf, inf, inf, inf, 12])
    assert v.verdict == V.HOLDS and v.effect == 1.0


def test_too_few_examples_is_not_enough_data_however_large_the_effect():
    v = V.fewer_units([1, 1, 1, 1], [100, 200, 300, 400, 500, 600])
    assert v.verdict == "not enough data (n = 4 noisy, 6 clean; need 5 each)" and not v.measured
    v = V.smaller_drop([0.01, np.nan, np.nan, np.nan, np.nan], [0.3] * 10)  # NaN are dropped before counting
    assert v.verdict.startswith("not enough data (n = 1 noisy")


def test_smaller_drop():
    r = _rng(1)
    assert V.smaller_drop(r.normal(0.02, 0.01, 30), r.normal(0.12, 0.02, 30)).verdict == V.HOLDS
    x = r.normal(0.05, 0.02, 60)
    assert V.smaller_drop(x[:30], x[30:]).verdict == V.FAILS


# ----------------------------------------------------------------------------- share under 10 units

def test_share_under_ten_units():
    assert V.share_under([3] * 19 + [12], [True] * 20).verdict == V.HOLDS  # 95%
    v = V.share_under([3] * 17 + [12] * 3, [True] * 20)  # 85%
    assert v.verdict == V.FAILS and "17 of 20 = 85%" in v.result and v.interval[0] < 0.85 < v.interval[1]
    assert V.share_under([3] * 18 + [5] * 2, [True] * 18 + [False] * 2).verdict == V.FAILS  # unflipped don't count
    assert V.share_under([3, 3], [True, True]).verdict.startswith("not enough data (n = 2 examples")


# ----------------------------------------------------------------------------- spread over layers

def test_units_spread_over_layers_holds_when_each_example_spans_layers():
    c = np.array([[2, 1, 1, 0], [1, 2, 0, 1], [0, 1, 2, 2], [1, 1, 1, 1], [2, 0, 1, 1], [1, 0, 0, 0]])  # (E, L)
    v = V.spread_over_layers(c)
    assert v.verdict == V.HOLDS and v.value == pytest.approx(5 / 6) and "4 of 4 layers hold >= 10%" in v.result


def test_every_example_in_one_layer_does_not_hold_though_two_layers_are_used():
    # the old rule (layers_used > 1) said "holds" here: 2 layers used, but each example sits in one
    c = np.array([[3, 0, 0], [0, 4, 0]] * 5)
    v = V.spread_over_layers(c)
    assert v.verdict == V.FAILS and v.value == 0.0 and "0% span >= 2 layers" in v.result


def test_spread_needs_three_layers_each_holding_a_tenth():
    c = np.array([[5, 5, 0, 0, 1]] * 10)  # every example spans 3 layers, but 2 layers hold 10/11 of the units
    assert V.spread_over_layers(c).verdict == V.FAILS


def test_spread_with_too_few_examples_or_layers():
    assert V.spread_over_layers(np.array([[1, 1, 1]] * 4)).verdict.startswith("not enough data (n = 4 examples")
    assert V.spread_over_layers(np.array([[1, 1]] * 10)).verdict.startswith("not enough data (n = 10 examples over 2")
    assert V.spread_over_layers(np.array([[0, 0, 0]] * 10)).verdict.startswith("not enough data (n = 0 examples")


def test_all_of_groups():
    h = V.spread_over_layers(np.array([[1, 1, 1]] * 6))
    f = V.spread_over_layers(np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3]] * 2))
    few = V.spread_over_layers(np.array([[1, 1, 1]] * 2))
    assert V.all_of({"noisy": h, "clean": h}).verdict == V.HOLDS
    assert V.all_of({"noisy": h, "clean": f}).verdict == V.FAILS
    assert V.all_of({"noisy": few, "clean": f}).verdict == V.FAILS  # a measured failure decides
    assert V.all_of({"noisy": few, "clean": h}).verdict.startswith("not enough data (n = noisy: 2 examples")


# ----------------------------------------------------------------------------- detection

def _scores(n_pos, n_neg, shift, seed=0):
    r = _rng(seed)
    return np.r_[r.normal(shift, 1, n_pos), r.normal(0, 1, n_neg)], np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]


def test_detection_holds_when_the_interval_is_above_0_7():
    s, y = _scores(50, 150, 2.0)
    v = V.detects(s, y)
    assert v.verdict == V.HOLDS and v.value > 0.85 and v.interval[0] > 0.7
    assert v.interval[0] < v.value < v.interval[1]
    assert v == V.detects(s, y)  # seeded: the same interval every time


def test_an_auroc_of_0_64_on_200_examples_does_not_hold():
    # the old rule (AUROC > 0.5) said "holds"
    s, y = _scores(100, 100, 0.5)
    v = V.detects(s, y)
    assert 0.6 < v.value < 0.7 and v.verdict == V.FAILS and v.interval[0] < 0.7
    assert "AUROC 0.6" in v.result and "95% CI" in v.result and v.threshold == "interval's lower end > 0.7"


def test_detection_auroc_is_scikit_learns_and_skips_uncovered_examples():
    from sklearn.metrics import roc_auc_score
    s, y = _scores(30, 30, 1.0)
    s[::7] = np.nan
    keep = np.isfinite(s)
    assert V.detects(s, y).value == pytest.approx(roc_auc_score(y[keep], s[keep]))


def test_detection_with_too_few_positives_is_not_enough_data():
    s, y = _scores(8, 500, 5.0)  # a perfect separation on 8 positives still says nothing
    assert V.detects(s, y).verdict == "not enough data (n = 8 noisy, 500 clean; need 10 each)"


# ----------------------------------------------------------------------------- gradients

def test_gradient_norms_comparable_in_most_layers():
    assert V.comparable_norms([0.8, 1.1, 1.9, 0.6]).verdict == V.HOLDS
    assert V.comparable_norms([0.8, 1.1, 1.9, 0.6, 3.0]).verdict == V.HOLDS  # 4 of 5 = 80%
    v = V.comparable_norms([0.8, 1.1, 3.0, 0.2])
    assert v.verdict == V.FAILS and "2 of 4 layers within" in v.result
    assert V.comparable_norms([1.0]).verdict == "not enough data (n = 1 layers; need 2)"


def test_cosine_opposed_most_of_the_time():
    assert V.opposed_cosine(np.full((3, 4), -0.9)).verdict == V.HOLDS
    c = np.full((3, 4), -0.9)
    c[:2] = -0.5  # 4 of 12 cells below -0.75
    v = V.opposed_cosine(c)
    assert v.verdict == V.FAILS and v.value == pytest.approx(1 / 3)
    assert V.opposed_cosine(np.full((1, 3), -0.99)).verdict == "not enough data (n = 3 cells; need 4)"


# ----------------------------------------------------------------------------- several seeds

def _v(verdict, value):
    return V.Verdict(verdict, "m", "t", "th", value=value)


def test_retraining_counts_only_the_layers_the_reset_erased():
    # after the reset -> after retraining, noisy-train: a erased and back, b erased and not back, c never lost
    v = V.recovery([0.1, 0.2, 0.95], [0.97, 0.5, 1.0], ["a", "b", "c"])
    assert v.verdict == V.FAILS and v.value == 0.5  # 1 of 2 erased: not more than half; c is not counted
    assert v.n == "2 erased, 1 never lost, of 3 layers"
    assert "back: a;" in v.result and "not back: b;" in v.result and "not counted): c" in v.result
    v = V.recovery([0.1, 0.2, 0.3, 0.95], [0.97, 0.9, 0.5, 1.0])
    assert v.verdict == V.HOLDS and abs(v.value - 2 / 3) < 1e-12  # exactly 90% is back
    # a layer kept at >= 90% by its reset is never counted as recovered, however many there are
    v = V.recovery([0.95, 0.99, 1.0, 0.2], [0.95, 0.99, 1.0, 0.3])
    assert v.verdict == V.FAILS and v.value == 0.0
    nothing = V.recovery([0.95, 1.0], [1.0, 1.0])
    assert nothing.verdict.startswith(V.NOT_ENOUGH) and not nothing.measured and nothing.value is None
    # NaN (not measured) layers are dropped
    assert V.recovery([np.nan, 0.1], [1.0, 1.0]).n == "1 erased, 0 never lost, of 1 layers"


def test_over_seeds():
    few = V.not_enough("3 noisy, 5 clean; need 5 each")
    o = V.over_seeds([_v(V.HOLDS, 0.8), _v(V.HOLDS, 0.9), _v(V.HOLDS, 0.85)])
    assert (o.verdict, o.agree, o.mean) == (V.HOLDS, 3, pytest.approx(0.85))
    # the mean's 95% t interval over the seeds: 0.85 -+ t(0.975, 2 df) 4.303 x sd 0.05 / sqrt 3 = 0.85 -+ 0.124
    assert o.interval == (pytest.approx(0.72579, abs=1e-5), pytest.approx(0.97421, abs=1e-5))
    assert o.summary() == ("mean 0.85, 95% t interval [0.726, 0.974] (n = 3 seeds, sd 0.05); 3 of 3 seeds agree "
                           "(holds 3)")
    o = V.over_seeds([_v(V.HOLDS, 0.8), _v(V.HOLDS, 0.9), _v(few, None)])
    # two values: 0.85 -+ t(0.975, 1 df) 12.706 x 0.0707 / sqrt 2 = 0.85 -+ 0.635, n = 2 (the seed without a value)
    assert (o.verdict, o.agree) == (V.HOLDS, 2)
    assert "mean 0.85, 95% t interval [0.215, 1.49] (n = 2 seeds, sd 0.071)" in o.summary()
    assert V.over_seeds([_v(V.HOLDS, 0.8)]).summary().startswith("0.8 (one value)")
    o = V.over_seeds([_v(V.HOLDS, 0.8), _v(V.HOLDS, 0.9), _v(V.FAILS, 0.3)])  # one failing seed: not robust
    assert (o.verdict, o.agree) == (V.FAILS, 1)
    o = V.over_seeds([_v(V.HOLDS, 0.8), _v(few, None), _v("not measured: did not memorize", None)])
    assert o.verdict == "not enough data (n = 1 of 3 seeds measured)" and o.agree == 2
    assert V.over_seeds([_v(V.FAILS, 0.1)]).verdict == V.FAILS  # one seed: its own verdict


def test_the_study_seed_table_combines_each_claim_over_seeds(smoke_study_master):
    from memloc.core.runs import RunDir
    from memloc.report.study_page import _seed_table
    b, d = RunDir.open(smoke_study_master / "base"), RunDir.open(smoke_study_master / "dropout")
    table = _seed_table([("seed 0, noise 0.1", b, d), ("seed 1, noise 0.1", b, d)])
    rows = {r["claim"]: r for r in table.rows}
    assert list(next(iter(rows.values()))) == ["claim", "noise", "threshold", "over seeds", "verdict", "per seed"]
    row = rows["mislabeled examples are memorized (noisy-train accuracy at the end)"]  # the smoke model does not
    assert row["verdict"] == V.FAILS and "2 of 2 seeds agree" in row["over seeds"] and row["threshold"] == ">= 90%"
    assert row["per seed"].startswith("seed 0: ") and " | seed 1: " in row["per seed"]
    unit = rows["noisy examples need far fewer units zeroed to flip"]  # nothing memorized: no seed measured
    assert unit["verdict"].startswith("not measured: the model did not memorize")
