"""Warnings that name the user's line, whatever path through the library raised them."""

from __future__ import annotations

import sys
from types import FrameType


def caller_stacklevel(skip: tuple[str, ...] = ("ntkgp.",)) -> int:
    """The ``stacklevel`` that points a warning raised by this function's caller at the first frame
    outside ntkgp (outside the modules named by the prefixes ``skip``: a backward pass also runs
    through torch's autograd). Public functions reach a warning through different numbers of frames (one-shot
    wrappers, the full-kernel path, kernels of nested layers), so any fixed level named a line of
    the library for some of them, where Python's default filters report it once and then hide it."""
    frame: FrameType | None
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
