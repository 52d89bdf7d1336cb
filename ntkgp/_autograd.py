"""Autograd inside functions that differentiate on their own, whatever the caller's mode."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from ntkgp._warnings import cuda_context_notice_hidden

_F = TypeVar("_F", bound=Callable)


def _normal(value):
    """A tensor made under inference mode as a normal one (autograd cannot save inference tensors)."""
    return value.clone() if isinstance(value, Tensor) and value.is_inference() else value


def outside_inference_mode(fn: _F) -> _F:
    """Run ``fn`` outside a caller's ``torch.inference_mode()``, its tensor arguments made normal:
    for functions that make parameters (variances set inside the mode were inference tensors, and
    every later build and gradient failed with "Inference tensors cannot be saved for backward").
    The caller's grad mode is kept (``inference_mode(False)`` alone turns autograd on)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        grad = torch.is_grad_enabled()   # read before inference_mode(False) sets it
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return fn(*map(_normal, args), **{k: _normal(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def differentiates(fn: _F) -> _F:
    """Run ``fn`` with autograd on, whatever the caller's mode, for functions that differentiate
    a network or a likelihood themselves (training, empirical NTKs, marginal-likelihood fits): under
    a caller's ``torch.no_grad()`` training failed with "`inputs` argument to `grad()` cannot be
    empty", under ``torch.inference_mode()`` the empirical NTK and ``fit`` with "element 0 of
    tensors does not require grad". Tensor arguments made under inference mode are copied to
    normal tensors (autograd cannot save inference tensors for the backward pass). On a machine with
    CUDA, torch's notice that autograd's GPU thread had no CUDA context yet (harmless, once per
    process) is hidden from the caller (:func:`ntkgp._warnings.cuda_context_notice_hidden`): these
    functions run the backward passes the caller did not write."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad(), cuda_context_notice_hidden():
            return fn(*map(_normal, args), **{k: _normal(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
