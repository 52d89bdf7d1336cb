"""Type aliases of the public signatures (torch-free at run time, like ``ntkgp.bayes._arrays``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex, TypeVar, Union

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

#: Numbers as the numpy-level helpers take them: a tensor (any device), a numpy array, nested
#: sequences of numbers, or a scalar.
ArrayLike = Union["Tensor", np.ndarray, Sequence, float]

#: Times of a prediction: ``None`` (infinite time), one number, or several (a leading output axis).
Times = Union[float, "Tensor", np.ndarray, Sequence[float], None]

#: A diagonal added to a training kernel (``noise``, ``diag_reg``): one number for every training point,
#: or one per point, ``(N,)``.
Diagonal = Union[float, "Tensor", np.ndarray, Sequence[float]]

#: Discrete gradient-descent step counts: one, several (a leading output axis), or ``None``.
Steps = Union[SupportsIndex, "Tensor", np.ndarray, Sequence[SupportsIndex], None]

#: A time of a Gaussian with time axes (``ntkgp.bayes``' ``time_index``): an integer (numpy and 0-d
#: tensor integers too), one per time axis, or ``None`` for a Gaussian without time axes.
TimeIndex = SupportsIndex | Sequence[SupportsIndex] | None

#: A function passed through a decorator that keeps its signature (for type checkers).
Function = TypeVar("Function", bound=Callable[..., Any])
