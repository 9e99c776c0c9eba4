"""Pass@k: the unbiased estimator against brute force, curves and intervals."""

from itertools import combinations

import numpy as np
import pytest

from leafe.passk import bootstrap_ci, default_ks, mean_pass_at_k, pass_at_k, pass_at_k_curve, summarize


def brute_force(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_matches_a_count_over_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 8) == 1.0  # fewer than k failures: every k-subset has a success


def test_k_larger_than_n_is_a_clear_error():
    with pytest.raises(ValueError, match=r"--samples must be >= max k \(got k=8, n=4\)"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_stable_for_large_n():
    # C(1024, 512) overflows floats; the product form does not.
    value = pass_at_k(1024, 1, 512)
    assert value == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1024, 3, 1) < 0.01


def test_mean_and_curve():
    counts = [(4, 0), (4, 1), (4, 4)]
    assert mean_pass_at_k(counts, 1) == pytest.approx((0 + 0.25 + 1) / 3)
    curve = pass_at_k_curve(counts)
    assert list(curve) == [1, 2, 4]
    assert curve[4] == pytest.approx(2 / 3)
    values = list(curve.values())
    assert values == sorted(values)  # pass@k never decreases in k


def test_default_ks_are_powers_of_two_up_to_n():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]
    assert default_ks(1) == [1]


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_tasks():
    rng = np.random.default_rng(0)
    few = [(8, int(c)) for c in rng.integers(0, 9, size=10)]
    many = [(8, int(c)) for c in rng.integers(0, 9, size=400)]
    lo, hi = bootstrap_ci(few, 1)
    assert lo <= mean_pass_at_k(few, 1) <= hi
    lo2, hi2 = bootstrap_ci(many, 1)
    assert (hi2 - lo2) < (hi - lo)
    assert bootstrap_ci(few, 1, seed=3) == bootstrap_ci(few, 1, seed=3)


def test_summarize_is_json_ready():
    result = summarize([(4, 1), (4, 2)], ks=[1, 4])
    assert set(result["pass_at_k"]) == {"1", "4"}
    assert result["ci95"]["1"][0] <= result["pass_at_k"]["1"] <= result["ci95"]["1"][1]
