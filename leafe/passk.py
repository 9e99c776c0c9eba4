"""Unbiased Pass@k from n samples with c successes, averaged over tasks, with bootstrap intervals.

pass@k for one task is the probability that at least one of k samples drawn without replacement
from the n recorded ones succeeds: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021). Computed as a
running product so it stays exact in floating point for n in the thousands, where the binomials
themselves overflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that k samples out of n (c of them correct) contain at least one correct one."""
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample (got n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"successes must be within 0..n (got c={c}, n={n})")
    if not 1 <= k <= n:
        raise ValueError(f"k must be within 1..n: pass@k draws k of the n samples (got k={k}, n={n})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over tasks given each task's (n, c)."""
    if not counts:
        raise ValueError("pass@k over an empty task list is undefined")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def default_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, plus n itself when n is not a power of two."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k for each k (default: powers of two up to the smallest n)."""
    ks = list(ks) if ks is not None else default_ks(min(n for n, _ in counts))
    return {k: mean_pass_at_k(counts, k) for k in ks}


def bootstrap_ci(
    counts: Sequence[tuple[int, int]],
    k: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean pass@k, resampling tasks with replacement."""
    per_task = np.array([pass_at_k(n, c, k) for n, c in counts])
    if len(per_task) == 0:
        raise ValueError("a bootstrap interval over an empty task list is undefined")
    return _bootstrap_mean(per_task, resamples, level, seed)


def _bootstrap_mean(per_task: np.ndarray, resamples: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of per-task values, resampling tasks with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_task), size=(resamples, len(per_task)))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(per_task[idx].mean(axis=1), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None, seed: int = 0) -> dict:
    """`{"pass_at_k": {k: mean}, "ci95": {k: [lo, hi]}}` with string keys, ready for JSON."""
    curve = pass_at_k_curve(counts, ks)
    return {
        "pass_at_k": {str(k): v for k, v in curve.items()},
        "ci95": {str(k): list(bootstrap_ci(counts, k, seed=seed)) for k in curve},
    }


def paired_difference(
    base: Sequence[tuple[int, int]],
    other: Sequence[tuple[int, int]],
    k: int,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean pass@k of `other` minus `base` over the same tasks (`base[i]` and `other[i]` are one
    task), with a percentile bootstrap interval that resamples tasks and keeps each task's pair.

    Why paired: most of the spread of a Pass@k estimate over a few tasks is which tasks were drawn
    (some levels are easy for every method), and that spread cancels in a per-task difference, so
    two methods whose own intervals overlap almost entirely can still differ clearly.
    """
    if len(base) != len(other):
        raise ValueError(f"a paired difference needs the same tasks (got {len(base)} and {len(other)})")
    if not base:
        raise ValueError("a paired difference over an empty task list is undefined")
    diff = np.array([pass_at_k(n2, c2, k) - pass_at_k(n1, c1, k) for (n1, c1), (n2, c2) in zip(base, other)])
    return (float(diff.mean()), *_bootstrap_mean(diff, resamples, level, seed))


def compare_tasks(base: Sequence[dict], other: Sequence[dict], ks: Sequence[int], seed: int = 0) -> dict:
    """`{k: {"diff", "ci95"}}` of `other` minus `base` from two evaluations' per-task records
    (eval.json's `tasks`: task_id, n, c), paired on task_id; both must cover the same tasks."""
    by_id = {r["task_id"]: (r["n"], r["c"]) for r in base}
    missing = [r["task_id"] for r in other if r["task_id"] not in by_id]
    if missing or len(by_id) != len(other):
        raise ValueError(f"the two evaluations cover different tasks (e.g. {(missing or sorted(by_id))[:3]}); "
                         "a paired comparison needs evaluations of the same tasks")
    pairs = [(by_id[r["task_id"]], (r["n"], r["c"])) for r in other]
    out = {}
    for k in ks:
        diff, lo, hi = paired_difference([a for a, _ in pairs], [b for _, b in pairs], int(k), seed=seed)
        out[str(k)] = {"diff": diff, "ci95": [lo, hi]}
    return out
