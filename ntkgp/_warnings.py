"""Warnings that name the user's line, whatever path through the library raised them."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch


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


_HIDING = threading.local()   # set while a thread is inside cuda_context_notice_hidden


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, one name for tests to replace: replacing torch's own made torch
    itself take CUDA as present (a CUDA build of torch without a GPU then failed in Adam's step, which
    asks for the current CUDA stream where CUDA is available)."""
    return torch.cuda.is_available()


@contextmanager
def cuda_context_notice_hidden() -> Iterator[None]:
    """Hide torch's "Attempting to run cuBLAS, but there was no current CUDA context!" notice.

    torch prints it (once per process) when autograd's CUDA worker thread makes its first cuBLAS
    call before any CUDA context is current on that thread, and then sets the primary context
    itself (pytorch/pytorch#120131): nothing is wrong, but training on a GPU printed it into the
    output of ``ntkgp compare`` and failed code that runs with warnings as errors. The worker's
    warnings are raised again in the calling thread when its backward pass ends, where this
    filter applies.

    Only where CUDA is available (torch prints it nowhere else), and only at the outermost of nested
    calls: ``warnings.catch_warnings`` swaps the process's filter list and makes every module forget
    which warnings it has shown, and before Python 3.14 threads that enter and leave it out of order
    restore each other's filters (the worst left behind is this one filter).
    """
    if getattr(_HIDING, "active", False) or not _cuda_available():
        yield
        return
    _HIDING.active = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA "
                                    "context", category=UserWarning)
            yield
    finally:
        _HIDING.active = False
