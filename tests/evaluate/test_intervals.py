import math

import numpy as np
import pytest

from mixcpt.evaluate.intervals import RESAMPLES, Bootstrap, interval, summarise

SCORE = ("scores", "dom")


def _table(per_item: dict) -> dict:
    """An eval table of rows whose only column is "dom", with these per-item values."""
    rows = [
        {
            "arm": arm,
            "stage": stage,
            "status": "ok",
            "scores": {"dom": {"acc_norm": 0.0}},  # unused: the items decide
            "items": {"scores": {"dom": values}},
        }
        for (arm, stage), values in per_item.items()
    ]
    return {"rows": rows, "benchmarks": {"dom": {"tag": "domain", "main_metric": "acc_norm"}}}


def test_one_seed_interval_is_over_items_and_matches_the_normal_approximation():
    values = [1, 0] * 200  # p = 0.5 over 400 items: standard error 0.025
    boot = Bootstrap([_table({("a", "cpt"): values})], [0])
    point, replicates = boot.column("a", "cpt", SCORE, (0,))
    assert point == 0.5 and replicates.shape == (RESAMPLES,)
    low, high = interval(replicates)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half, abs=0.006) and high == pytest.approx(
        0.5 + half, abs=0.006
    )
    # seeded: the same results give the same interval, in a new Bootstrap too
    again = Bootstrap([_table({("a", "cpt"): values})], [0]).column("a", "cpt", SCORE, (0,))
    assert np.array_equal(again[1], replicates)


def test_seeds_are_resampled_as_well_as_items():
    # every item of seed 0 is wrong and every item of seed 1 right: items alone vary nothing, so
    # the replicates are the means of two seeds drawn with replacement: 0, 0.5 or 1
    tables = [_table({("a", "cpt"): [0] * 30}), _table({("a", "cpt"): [1] * 30})]
    point, replicates = Bootstrap(tables, [7, 8]).column("a", "cpt", SCORE, (0, 1))
    assert point == 0.5
    assert set(np.unique(replicates)) == {0.0, 0.5, 1.0}
    assert np.mean(replicates == 0.5) == pytest.approx(0.5, abs=0.05)
    assert interval(replicates) == [0.0, 1.0]


def test_ratio_items_pool_sums_and_counts():
    # bits per byte: (bits, bytes) per text; the statistic is sum / sum, not a mean of ratios
    table = _table({("a", "cpt"): {"sum": [1.0, 9.0], "count": [1, 3]}})
    point, _ = Bootstrap([table], [0]).column("a", "cpt", SCORE, (0,))
    assert point == 10.0 / 4


def test_differences_are_paired_on_the_same_items():
    a = [1, 0] * 50
    b = a[:-1] + [1]  # the same answers but the last
    boot = Bootstrap([_table({("a", "sft"): a, ("b", "sft"): b})], [0])
    diff = boot.column("a", "sft", SCORE, (0,))[1] - boot.column("b", "sft", SCORE, (0,))[1]
    # in every resample A - B is -0.01 times how often that last item was drawn
    assert np.all(diff <= 0) and np.allclose(np.round(diff * 100), diff * 100)
    low, high = interval(diff)
    assert -0.05 <= low < 0 and high == 0
    # unpaired, the two intervals overlap almost entirely
    low_a, high_a = interval(boot.column("a", "sft", SCORE, (0,))[1])
    assert high_a - low_a > 0.15


def test_a_column_without_items_has_no_interval_with_one_seed():
    table = _table({("a", "cpt"): [1]})
    del table["rows"][0]["items"]  # an lm-eval task: a score, no items
    table["rows"][0]["scores"]["dom"]["acc_norm"] = 1.0
    point, replicates = Bootstrap([table], [0]).column("a", "cpt", SCORE, (0,))
    assert point == 1.0 and replicates is None and interval(replicates) is None


def test_summarise_averages_seeds_and_adds_intervals(fake_eval_table):
    cells = {
        ("base", "base"): {"domain": 0.25, "general": 0.8},
        ("mixcpt", "cpt"): {"domain": 0.5, "general": 0.7, "kl": 0.1},
    }
    other = {**cells, ("mixcpt", "cpt"): {"domain": 0.7, "general": 0.7, "kl": 0.3}}
    table = summarise([fake_eval_table(cells), fake_eval_table(other)], [0, 1])
    row = next(r for r in table["rows"] if r["stage"] == "cpt")
    assert row["seeds"] == [0, 1] and "items" not in row
    assert row["scores"]["dom"]["acc_norm"] == pytest.approx(0.6)
    assert row["retention"]["kl_to_base"] == pytest.approx(0.2)
    low, high = row["intervals"]["scores"]["dom"]
    assert low < 0.6 < high
    # the retention delta is paired with the base: the stage lost 4 of the base's 32 right
    # answers and gained none, so every resample of the delta is a loss
    low, high = row["intervals"]["delta"]["gen"]
    assert row["retention"]["delta"]["gen"] == pytest.approx(-0.1)
    assert low < -0.1 < high < 0
    assert row["intervals"]["axes"]["domain"]["mean"] == pytest.approx(0.6)
    assert table["bootstrap"]["resamples"] == RESAMPLES and table["bootstrap"]["seeds"] == [0, 1]
