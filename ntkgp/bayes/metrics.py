r"""Scores of Gaussian predictive distributions, and the AUROC.

All functions take torch tensors or numpy arrays and return Python floats (or a dict of them).
Predictions are ``mean`` ``μ_i`` and *predictive* variance ``σ_i²`` (latent variance plus
observation noise) for targets ``y_i``; ``(M, k)`` arrays are scored over all ``M · k`` entries.
Only numpy and scipy are used (no torch import).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import erf, ndtri

from ntkgp._typing import ArrayLike
from ntkgp.bayes._arrays import finite, narrow_float_type, observations, variances
from ntkgp.bayes.inference_data import log_density

#: Central-interval levels of :func:`interval_coverage`'s default.
COVERAGE_LEVELS = (0.5, 0.9, 0.95)
#: Levels over which :func:`calibration_error` averages by default: 0.05, 0.10, …, 0.95.
CALIBRATION_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def rmse(mean: ArrayLike, y: ArrayLike) -> float:
    r"""Root mean squared error ``sqrt( (1/M) Σ_i (y_i − μ_i)² )``."""
    mean, y = observations(mean, y)
    with np.errstate(over="ignore"):   # reported below as a ValueError
        residual = y - mean
    # scaled by the largest residual: squares of residuals beyond 1e154 overflow, below 1e-162 vanish
    scale = np.abs(residual).max()
    if not np.isfinite(scale):   # two finite values ~1e308 apart
        raise ValueError("y - mean overflows float64; rescale the targets.")
    if scale == 0:
        return 0.0
    return float(scale * np.sqrt(np.mean((residual / scale) ** 2)))


def nlpd(mean: ArrayLike, variance: ArrayLike, y: ArrayLike) -> float:
    r"""Mean negative log predictive density of ``y`` under ``N(μ_i, σ_i²)``::

        NLPD = (1/M) Σ_i [ ½ log(2π σ_i²) + (y_i − μ_i)² / (2 σ_i²) ]

    Lower is better; it is a strictly proper scoring rule (the logarithmic score, Gneiting &
    Raftery 2007) and the "test log-likelihood" of the UCI protocol (Hernández-Lobato & Adams
    2015) with the sign flipped. It changes with the units of ``y``: scaling ``y`` by ``s``
    adds ``log s``.
    """
    mean, y = observations(mean, y)
    var = variances(variance, mean.shape)
    return float(-np.mean(log_density(y, mean, var)))   # observations and variances checked them


def crps(mean: ArrayLike, variance: ArrayLike, y: ArrayLike) -> float:
    r"""Mean continuous ranked probability score of ``y`` under ``N(μ_i, σ_i²)``.

    ``CRPS(F, y) = ∫ (F(x) − 1[x ≥ y])² dx``, which for a Gaussian is, with ``z_i = (y_i − μ_i)/σ_i``
    (Gneiting, Raftery, Westveld & Goldman 2005, eq. 5)::

        CRPS_i = σ_i [ z_i (2Φ(z_i) − 1) + 2φ(z_i) − 1/√π ]
               = (y_i − μ_i) erf(z_i/√2) + σ_i [ √(2/π) exp(−z_i²/2) − 1/√π ]

    averaged over the points. Lower is better; it is strictly proper (Gneiting & Raftery 2007),
    in the units of ``y`` (scaling ``y`` by ``s`` scales it by ``s``), and reduces to the absolute
    error ``|y_i − μ_i|`` as ``σ_i → 0``. Unlike the NLPD it grows linearly, not quadratically,
    with a residual far out in the tails. The second form is computed: ``σ z`` overflowed where
    ``σ`` is tiny beside the residual.
    """
    mean, y = observations(mean, y)
    var = variances(variance, mean.shape)
    sd = np.sqrt(var)
    with np.errstate(over="ignore"):   # reported below as a ValueError
        residual = y - mean
    if not np.isfinite(residual).all():   # two finite values ~1e308 apart
        raise ValueError("y - mean overflows float64; rescale the targets.")
    with np.errstate(over="ignore", under="ignore"):   # z = ±inf: erf ±1 and exp 0, the limits
        z = residual / sd
        scores = residual * erf(z / math.sqrt(2)) + sd * (math.sqrt(2 / math.pi) * np.exp(-0.5 * z * z)
                                                        - 1 / math.sqrt(math.pi))
    return float(np.mean(scores))


def _levels(levels: Sequence[float] | float, name: str = "levels") -> np.ndarray:
    array = finite(levels, name, booleans=False).reshape(-1)
    narrow = narrow_float_type(levels)
    if narrow is not None:   # float32 0.9 is 0.89999998: its key must be coverage_90, as typed
        array = np.array([float(str(narrow(p))) for p in array])
    if array.size == 0 or not ((array > 0) & (array < 1)).all():
        raise ValueError(f"{name} must be probabilities strictly between 0 and 1, got {array.tolist()}.")
    return array


def _coverage(mean: np.ndarray, var: np.ndarray, y: np.ndarray, levels: np.ndarray) -> np.ndarray:
    z = np.abs(y - mean) / np.sqrt(var)
    half_widths = ndtri(0.5 + levels / 2)                               # z_{(1+p)/2}
    return (z.reshape(-1)[None, :] <= half_widths[:, None]).mean(axis=1)


def interval_coverage(mean: ArrayLike, variance: ArrayLike, y: ArrayLike,
                      levels: Sequence[float] = COVERAGE_LEVELS) -> dict[float, float]:
    r"""Empirical coverage of central predictive intervals.

    For level ``p`` the central interval is ``μ_i ± z_{(1+p)/2} σ_i`` with ``z_q = Φ⁻¹(q)`` the
    standard normal quantile, and the coverage is the fraction of targets inside it::

        cov(p) = (1/M) Σ_i 1[ |y_i − μ_i| ≤ z_{(1+p)/2} σ_i ]

    A calibrated predictor has ``cov(p) ≈ p`` (Gneiting, Balabdaoui & Raftery 2007).

    Returns:
        ``{p: cov(p)}`` for every level.
    """
    mean, y = observations(mean, y)
    var = variances(variance, mean.shape)
    grid = _levels(levels)
    return {float(p): float(c) for p, c in zip(grid, _coverage(mean, var, y, grid), strict=True)}


def calibration_error(mean: ArrayLike, variance: ArrayLike, y: ArrayLike,
                      levels: Sequence[float] = CALIBRATION_LEVELS) -> float:
    r"""Mean absolute gap between nominal and empirical central-interval coverage::

        CE = (1/L) Σ_{l=1}^{L} | cov(p_l) − p_l |

    over the levels ``p_l`` (default 0.05, 0.10, …, 0.95), with ``cov`` as in
    :func:`interval_coverage`. This is the interval (two-sided) version of the calibration
    error of Kuleshov, Fenner & Ermon (2018, "Accurate uncertainties for deep learning using
    calibrated regression"), with absolute instead of squared gaps. 0 is perfect; with ``M``
    test points even a calibrated model scores about ``0.8 · sqrt(p(1−p)/M)`` per level from
    sampling noise alone.
    """
    mean, y = observations(mean, y)
    var = variances(variance, mean.shape)
    grid = _levels(levels)
    return float(np.mean(np.abs(_coverage(mean, var, y, grid) - grid)))


def regression_metrics(mean: ArrayLike, variance: ArrayLike, y: ArrayLike,
                       levels: Sequence[float] = COVERAGE_LEVELS) -> dict[str, float]:
    """RMSE, NLPD, CRPS, coverage at ``levels`` (keys ``"coverage_50"`` …) and calibration error.

    The calibration error always averages over :data:`CALIBRATION_LEVELS` (``levels`` only
    chooses the coverages reported).
    """
    out = {"rmse": rmse(mean, y), "nlpd": nlpd(mean, variance, y), "crps": crps(mean, variance, y)}
    for p, c in interval_coverage(mean, variance, y, levels).items():
        # 12 digits: "{:g}" (6) named 0.9999999 "coverage_100" and merged levels 1e-7 apart
        out[f"coverage_{100 * p:.12g}"] = c
    out["calibration_error"] = calibration_error(mean, variance, y)
    return out


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    r"""Area under the ROC curve of ``scores`` for detecting ``labels == 1`` (positives).

    Computed as the Mann–Whitney statistic (Hanley & McNeil 1982): with ``R_i`` the rank of
    score ``i`` among all ``n = n₊ + n₋`` scores (ties get their average rank)::

        AUROC = ( Σ_{i positive} R_i − n₊(n₊ + 1)/2 ) / (n₊ n₋)

    i.e. the probability that a random positive scores higher than a random negative, ties
    counting one half. Equals ``sklearn.metrics.roc_auc_score``.

    Args:
        scores: ``(M,)`` real scores (higher means "more likely positive").
        labels: ``(M,)`` binary labels (bool, or 0/1).

    Raises:
        ValueError: if labels are not binary or only one class is present (AUROC undefined).
    """
    scores = finite(scores, "scores")
    labels = finite(labels, "labels")
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both have shape (M,), got {scores.shape} and {labels.shape}.")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be binary (0/1 or bool).")
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positives and {n_neg} negatives.")
    from scipy.stats import rankdata  # scipy.stats takes ~0.8 s to import, a fifth of `import ntkgp`

    ranks = rankdata(scores, method="average")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
