import numpy as np
import pytest

from mixcpt.data.mixture import plan_mixture
from mixcpt.errors import ConfigError


def lengths(rng, n, lo=5, hi=50):
    return rng.integers(lo, hi, size=n)


def shares(plan, lens):
    drawn = np.asarray(plan.drawn_tokens(lens), dtype=float)
    return drawn / drawn.sum()


def test_token_shares_follow_weights_and_scarcest_source_bounds_total():
    rng = np.random.default_rng(0)
    lens = [lengths(rng, 5000), lengths(rng, 3000), lengths(rng, 400)]
    plan = plan_mixture(lens, [0.5, 0.3, 0.2], seed=1)
    np.testing.assert_allclose(shares(plan, lens), [0.5, 0.3, 0.2], atol=0.01)
    scarce = plan.order[plan.order[:, 0] == 2, 1]
    assert len(np.unique(scarce)) == len(scarce) == 400  # used entirely, never repeated


def test_oversampling_repeats_a_small_source_to_reach_its_share():
    rng = np.random.default_rng(0)
    lens = [lengths(rng, 2000), lengths(rng, 50)]
    plan = plan_mixture(lens, [0.5, 0.5], seed=0, oversample=True)
    np.testing.assert_allclose(shares(plan, lens), [0.5, 0.5], atol=0.01)
    small = plan.order[plan.order[:, 0] == 1, 1]
    assert len(small) > 50 and len(np.unique(small)) == 50
    assert len(np.unique(plan.order[plan.order[:, 0] == 0, 1])) == 2000  # every large document used


def test_total_tokens_beyond_a_source_without_oversampling_is_a_config_error():
    lens = [np.full(10, 10), np.full(10, 10)]
    with pytest.raises(ConfigError, match="oversample"):
        plan_mixture(lens, [0.5, 0.5], seed=0, total_tokens=1000, labels=["a", "b"])


def test_zero_weight_source_contributes_nothing():
    lens = [np.full(100, 10), np.full(100, 10)]
    plan = plan_mixture(lens, [1.0, 0.0], seed=0)
    assert set(plan.order[:, 0].tolist()) == {0}


def test_plan_is_a_pure_function_of_the_seed():
    rng = np.random.default_rng(0)
    lens = [lengths(rng, 300), lengths(rng, 200)]
    a, b, c = (plan_mixture(lens, [0.7, 0.3], seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.order, b.order) and not np.array_equal(a.order, c.order)
