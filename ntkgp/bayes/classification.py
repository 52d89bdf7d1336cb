r"""Classification as regression on one-hot targets (Lee et al. 2018, "Deep neural networks as
Gaussian processes", §2.4 and §3).

The ``C`` classes are regressed as ``C`` outputs of one GP (or gradient-flow ensemble) with
targets ``y_i = e_{c_i} − 1/C``: one-hot vectors shifted to have zero mean over classes, which
matches the zero prior mean (Lee et al. use ``0.9`` for the true class and ``−0.1`` for the
others with ``C = 10``). The predicted class is the argmax of the posterior mean. Because the
outputs share one kernel, every test point has one predictive variance, which ranks how much the
posterior is unsure about that input; :func:`misclassification_auroc` measures how well it
flags the points the mean gets wrong (the misclassification-detection task of Hendrycks & Gimpel
2017, with the variance as score).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from ntkgp._typing import ArrayLike
from ntkgp.bayes._arrays import LEADING_AXIS_HINT, finite, integer_at_least, labels_array
from ntkgp.bayes.metrics import auroc
from ntkgp.layers.validation import finite_number

#: One-hot targets whose ``num_classes`` is inferred from the largest label are refused beyond this
#: many entries (32 MiB in float64) when they have more classes than labels (:func:`one_hot_targets`).
INFERRED_TARGET_ENTRIES = 1 << 22


def one_hot_targets(labels: ArrayLike, num_classes: int | None = None, offset: float | None = None,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Regression targets ``Y_ic = 1[c = c_i] − offset``, shape ``(N, C)``.

    Args:
        labels: ``(N,)`` integer labels in ``0 … C−1`` (tensor, array or list).
        num_classes: ``C``; default ``max(labels) + 1``. Inferred, it is refused where the targets
            would have more classes than labels (most classes without an example: labels that are
            ids, not indices ``0 … C−1``) and more than ``INFERRED_TARGET_ENTRIES`` entries; pass
            it to allow that.
        offset: subtracted from every entry; default ``1/C``, which makes every row sum to zero
            (``e_c − 0.1`` for ten classes, Lee et al. 2018).
        dtype: of the returned tensor, a floating-point ``torch.dtype``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        # the offset makes the targets fractional: an integer dtype came back as float32
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    y = labels_array(labels)
    if y.size == 0:
        raise ValueError("labels is empty.")
    if (y < 0).any():
        raise ValueError(f"labels must be non-negative class indices, got minimum {y.min()}.")
    if num_classes is None:
        num_classes = int(y.max()) + 1
        if num_classes < 2:
            raise ValueError("labels hold only class 0: pass num_classes (at least 2) to say how many classes "
                             "there are.")
        # a label of 1e9 made targets of N x (1e9 + 1) entries: 24 GB for three labels, allocated and
        # failed (or killed the process) in torch; the N x N kernel the targets are regressed with is smaller
        if num_classes > y.size and y.size * num_classes > INFERRED_TARGET_ENTRIES:
            mib = y.size * num_classes * torch.finfo(dtype).bits / 8 / 2**20
            size = f"{mib:.3g} MiB" if mib < 1024 else f"{mib / 1024:.3g} GiB"
            raise ValueError(f"labels go up to {y.max()}, so num_classes would be {num_classes}: targets of "
                             f"{y.size} x {num_classes} entries ({size} in {dtype}), more classes "
                             f"than the {y.size} labels. Labels are class indices 0 … C−1: remap ids to them "
                             "(np.unique(labels, return_inverse=True)[1]), or pass num_classes if there are that "
                             "many classes.")
    num_classes = integer_at_least(num_classes, 2, "num_classes")
    if y.max() >= num_classes:
        raise ValueError(f"labels go up to {y.max()} but num_classes={num_classes}.")
    # a number, as the noises and levels are: float() read "0.1" as 0.1 and True as 1 (the true class
    # became 0, the others -1), and raised a TypeError for a 1-element array
    offset = 1.0 / num_classes if offset is None else finite_number(offset, "offset")
    device = labels.device if isinstance(labels, Tensor) else None   # a tensor's own; arrays: torch's default
    targets = torch.nn.functional.one_hot(torch.as_tensor(y, device=device), num_classes).to(dtype)
    return targets - offset


def _class_scores(mean) -> np.ndarray:
    scores = finite(mean, "mean")
    if scores.ndim != 2 or scores.shape[1] < 2 or scores.shape[0] == 0:
        raise ValueError(f"mean must have shape (M, C) with M >= 1 points and C >= 2 classes, got {scores.shape}.")
    return scores


def _class_labels(labels: ArrayLike, scores: np.ndarray) -> np.ndarray:
    """Labels ``(M,)`` for ``(M, C)`` class scores, each in ``0 … C−1``: any other label can never be
    the argmax, and would count as an error silently (e.g. labels ``1 … C`` instead of ``0 … C−1``)."""
    truth = labels_array(labels)
    if truth.shape != (scores.shape[0],):
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {truth.shape}.")
    if truth.min() < 0 or truth.max() >= scores.shape[1]:
        raise ValueError(f"labels must be class indices 0 … {scores.shape[1] - 1} of the {scores.shape[1]} "
                         f"outputs of mean, got labels from {truth.min()} to {truth.max()}.")
    return truth


@overload
def predict_classes(mean: Tensor) -> Tensor: ...


@overload
def predict_classes(mean: np.ndarray | Sequence[Any]) -> np.ndarray: ...


def predict_classes(mean: ArrayLike) -> Tensor | np.ndarray:
    """Predicted classes ``argmax_c μ_ic``: ``(M,)``; a tensor for tensor input, else numpy."""
    scores = _class_scores(mean)
    if isinstance(mean, Tensor):
        return mean.detach().argmax(-1)
    return scores.argmax(-1)


def accuracy(mean_or_predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of correct predictions: ``(1/M) Σ_i 1[ĉ_i = c_i]``.

    ``mean_or_predictions`` is either the ``(M, C)`` posterior mean (classes by argmax; then
    ``labels`` must lie in ``0 … C−1``) or ``(M,)`` predicted labels.
    """
    raw = finite(mean_or_predictions, "mean_or_predictions")
    if raw.ndim not in (1, 2):   # labels_array's "must have shape (M,)" left out the (M, C) mean
        raise ValueError(f"mean_or_predictions must be the (M, C) mean or (M,) predicted labels, got shape "
                         f"{raw.shape}.{LEADING_AXIS_HINT if raw.ndim == 3 else ''}")
    if raw.ndim == 2:
        scores = _class_scores(raw)
        return float(np.mean(scores.argmax(-1) == _class_labels(labels, scores)))
    predicted = labels_array(raw, "mean_or_predictions")
    truth = labels_array(labels)
    if truth.shape != predicted.shape:
        raise ValueError(f"labels must have shape {predicted.shape}, got {truth.shape}.")
    if predicted.size == 0:   # the fraction of nothing: NaN with numpy's warnings
        raise ValueError("accuracy needs at least one prediction, got none.")
    return float(np.mean(predicted == truth))


def misclassification_auroc(mean: ArrayLike, variance: ArrayLike, labels: ArrayLike) -> float:
    r"""AUROC of the predictive variance as a detector of misclassified points.

    Positives are the points with ``argmax_c μ_ic ≠ c_i``; the score is the variance
    ``σ_i²`` (for ``(M, C)`` variances, the mean over classes). 0.5 means the variance carries
    no information about errors, 1 that every error has a larger variance than every correct
    prediction. This is the misclassification-detection AUROC of Hendrycks & Gimpel (2017, *A
    baseline for detecting misclassified and out-of-distribution examples in neural networks*),
    with the predictive variance as the score in place of their maximum softmax probability. See
    :func:`ntkgp.bayes.metrics.auroc`.

    Raises:
        ValueError: if a label is not one of the ``C`` classes ``0 … C−1``, or every point is
            classified correctly (or every one wrongly), so the AUROC is undefined.
    """
    scores = _class_scores(mean)
    var = finite(variance, "variance", booleans=False)
    if var.shape not in ((scores.shape[0],), scores.shape):
        raise ValueError(f"variance must have shape ({scores.shape[0]},) or {scores.shape}, got {var.shape}.")
    if (var < 0).any():   # before the mean over classes, where a negative entry can hide
        raise ValueError(f"variance must be non-negative, got minimum {var.min():g}.")
    if var.ndim == 2:
        var = var.mean(-1)
    wrong = scores.argmax(-1) != _class_labels(labels, scores)
    if wrong.all() or not wrong.any():
        raise ValueError(f"{int(wrong.sum())} of {wrong.size} points are misclassified: the AUROC of "
                         "flagging errors needs both correct and wrong predictions.")
    return auroc(var, wrong)
