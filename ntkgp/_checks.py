"""Argument checks shared by every subpackage, free of torch imports (see ``ntkgp.bayes._arrays``)."""

from __future__ import annotations

import operator

import numpy as np


def integer_at_least(value: object, minimum: int, name: str) -> int:
    """``value`` as a Python int (ints, numpy integers, 0-d integer tensors), and ``>= minimum``;
    booleans are refused."""
    try:
        if isinstance(value, bool | np.bool_):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return number
