"""Confidence intervals: a seeded percentile bootstrap over questions, and mean +- std over seeds.

Each run's interval resamples its scored questions with replacement (``N_RESAMPLES`` = 1000 resamples, numpy
``default_rng(SEED)``, 95 % percentile interval of the mean), so the same predictions always give the same interval.
lm-eval reports a bootstrap *standard error* instead (100k resamples by default); a percentile interval is what the
tables and error bars here need. Questions of one context are resampled independently (no cluster bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped); (nan, nan) if empty."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 2_000_000 // x.size)  # bounded memory: at most ~2M indices at once
    for start in range(0, n_resamples, step):
        n = min(step, n_resamples - start)
        means[start : start + n] = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def run_intervals(samples: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> pd.DataFrame:
    """Per run (``run_dir``): number of questions, mean ``main_score`` and its bootstrap interval."""
    rows = []
    for run_dir, grp in samples.groupby("run_dir", sort=True):
        lo, hi = bootstrap_ci(grp["main_score"].to_numpy(), n_resamples, seed, level)
        rows.append({"run_dir": run_dir, "n_questions": len(grp), "sample_mean": grp["main_score"].mean(),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["run_dir", "n_questions", "sample_mean", "ci_low", "ci_high"])
