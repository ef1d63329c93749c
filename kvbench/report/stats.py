"""Confidence intervals: a seeded percentile bootstrap over contexts (cluster bootstrap), and mean +- std over seeds.

Questions that share one context are not independent: under the query-agnostic protocol (and in LongConvQA or
the multi-query suite) every question of a context is answered over the same compressed cache, so one bad
compression fails them together. Resampling questions independently then gives an interval that is too narrow.
:func:`bootstrap_ci` therefore resamples *contexts* (``clusters``: the record's ``sample_id``) with replacement and
takes the mean over all questions of the drawn contexts (the ratio estimator sum / count); where every context holds
one question this is exactly the ordinary bootstrap over questions.

``scipy.stats.bootstrap`` does the resampling (``N_RESAMPLES`` = 1000 resamples, ``numpy.random.default_rng(SEED)``,
95 % percentile interval), so the same predictions always give the same interval. lm-eval reports a bootstrap
*standard error* instead (100k resamples, questions independent); a percentile interval is what the tables and
error bars here need. With fewer than two contexts there is nothing to resample and the interval is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
CLUSTER = "sample_id"  # the per-question column naming the shared context
MAX_BATCH_CELLS = 2_000_000  # bounded memory: at most ~2M resampled indices at once


def _ratio_of_sums(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def cluster_totals(values: np.ndarray, clusters: Sequence | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) of the values of each cluster (each value its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return values, np.ones_like(values)
    codes, _ = pd.factorize(pd.Series(np.asarray(clusters, dtype=object)), sort=True)
    return np.bincount(codes, weights=values), np.bincount(codes).astype(float)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL, clusters: Sequence | np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped), resampling ``clusters`` (one label
    per value, e.g. the context id) with replacement, or the values themselves; (nan, nan) below two clusters."""
    x = np.asarray(values, dtype=float)
    keep = ~np.isnan(x)
    groups = None if clusters is None else np.asarray(clusters, dtype=object)[keep]
    sums, counts = cluster_totals(x[keep], groups)
    if sums.size < 2:
        return float("nan"), float("nan")
    from scipy.stats import bootstrap  # scipy.stats takes a second to import: only when an interval is computed

    means = sums / counts
    if np.ptp(means) == 0:  # every context has the same mean: every resample does too
        return float(means[0]), float(means[0])
    res = bootstrap((sums, counts), _ratio_of_sums, paired=True, vectorized=True, n_resamples=n_resamples,
                    batch=max(1, MAX_BATCH_CELLS // sums.size), confidence_level=level, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def question_ci(grp: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL
                ) -> tuple[float, float]:
    """The interval of the mean ``main_score`` of per-question rows, clustered by context where the rows name one."""
    clusters = grp[CLUSTER].to_numpy() if CLUSTER in grp else None
    return bootstrap_ci(grp["main_score"].to_numpy(), n_resamples, seed, level, clusters)


def run_intervals(samples: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> pd.DataFrame:
    """Per run (``run_dir``): questions, contexts, mean ``main_score`` and its (context-clustered) interval."""
    rows = []
    for run_dir, grp in samples.groupby("run_dir", sort=True):
        lo, hi = question_ci(grp, n_resamples, seed, level)
        rows.append({"run_dir": run_dir, "n_questions": len(grp), "n_contexts": _n_contexts(grp),
                     "sample_mean": grp["main_score"].mean(), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["run_dir", "n_questions", "n_contexts", "sample_mean", "ci_low", "ci_high"])


def _n_contexts(grp: pd.DataFrame) -> int:
    return int(grp[CLUSTER].nunique()) if CLUSTER in grp else len(grp)
