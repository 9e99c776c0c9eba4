"""Pass@k: the unbiased estimator against brute force, curves and intervals."""

from itertools import combinations

import numpy as np
import pytest

from leafe.passk import (
    bootstrap_ci,
    compare_tasks,
    default_ks,
    mean_pass_at_k,
    paired_difference,
    pass_at_k,
    pass_at_k_curve,
    summarize,
)


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
    with pytest.raises(ValueError, match=r"k must be within 1..n: pass@k draws k of the n samples \(got k=8, n=4\)"):
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


def test_a_paired_difference_sees_a_gain_that_overlapping_intervals_hide():
    # Ten levels of very different difficulty; the other method solves two more of 32 on every one.
    base = [(32, c) for c in (0, 2, 5, 9, 14, 18, 22, 25, 28, 30)]
    other = [(32, c + 2) for _, c in base]
    lo_a, hi_a = bootstrap_ci(base, 1)
    lo_b, hi_b = bootstrap_ci(other, 1)
    assert lo_b < hi_a  # each method's own interval: they overlap almost entirely
    diff, lo, hi = paired_difference(base, other, 1)
    assert diff == pytest.approx(2 / 32)
    assert lo == pytest.approx(2 / 32) and hi == pytest.approx(2 / 32)  # the same gain on every task
    # Gains and losses that cancel: the interval straddles zero.
    mixed = [(32, c + (3 if i % 2 else -3) if 3 <= c <= 29 else c) for i, (_, c) in enumerate(base)]
    diff, lo, hi = paired_difference(base, mixed, 1)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="the same tasks"):
        paired_difference(base, other[:3], 1)


def test_compare_tasks_pairs_on_task_id_and_refuses_different_tasks():
    base = [{"task_id": "a", "n": 4, "c": 0}, {"task_id": "b", "n": 4, "c": 4}]
    other = [{"task_id": "b", "n": 4, "c": 4}, {"task_id": "a", "n": 4, "c": 2}]  # other order
    result = compare_tasks(base, other, [1, 4])
    assert result["1"]["diff"] == pytest.approx(0.25)  # (0.5 - 0 + 1 - 1) / 2
    assert result["4"]["diff"] == pytest.approx(0.5)
    assert set(result) == {"1", "4"} and len(result["1"]["ci95"]) == 2
    with pytest.raises(ValueError, match="different tasks"):
        compare_tasks(base, [{"task_id": "a", "n": 4, "c": 1}, {"task_id": "z", "n": 4, "c": 1}], [1])
    with pytest.raises(ValueError, match="different tasks"):
        compare_tasks(base, base[:1], [1])
