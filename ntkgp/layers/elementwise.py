r"""Activations defined by the user: a given NNGP map, or any torch function by quadrature.

* :class:`Elementwise` takes ``φ`` and its Gaussian expectation ``T`` in closed form; the NTK
  factor follows from Price's theorem, ``Ṫ = ∂T/∂k12`` (Price 1958), by autograd.
* :class:`Numerical` takes only ``φ`` and integrates ``T = E[φ(u)φ(v)]`` and
  ``Ṫ = E[φ'(u)φ'(v)]`` by 2-D Gauss–Hermite quadrature (as neural-tangents'
  ``ElementwiseNumerical``; Han et al. 2022), vectorized over all pairs and chunked to bound
  memory. Gradients w.r.t. the kernels use Price's theorem as well::

      ∂T/∂k12 = E[φ'(u)φ'(v)],   ∂T/∂k11 = ½ E[φ''(u)φ(v)],   ∂T/∂k22 = ½ E[φ(u)φ''(v)]

  which stay exact where the covariance is singular (a point paired with itself), unlike
  differentiating through the Cholesky factor. Derivatives of ``φ`` come from autograd, which
  differentiates a kink piecewise and drops its delta term, so gradients need ``φ'`` continuous
  (NNGP) and ``φ''`` continuous too (NTK): tanh, softplus, SiLU, sigmoid, ... A gradient that
  would use the derivative of a jump (relu, abs, hardtanh, selu; ELU for the NTK) is refused
  (:meth:`Numerical.check_continuous`); for kinked activations use the closed forms.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import cast

import numpy as np
import scipy.special
import torch
from torch import Tensor

from ntkgp._checks import integer_at_least
from ntkgp._warnings import caller_stacklevel
from ntkgp.layers.activations import Activation
from ntkgp.layers.base import NonFiniteKernelError
from ntkgp.layers.numerics import (
    _is_compiling,
    _maybe_functorch_level,
    is_vmapped,
    safe_sqrt,
    transforms_active,
)
from ntkgp.layers.validation import broadcast_shapes, finite_number, has_non_finite


def _parameter_free(*functions: object) -> None:
    """``ValueError`` for a module with parameters among ``functions``: the kernels would not be
    differentiated through them, and every network built from the spec would share them."""
    for f in functions:
        if isinstance(f, torch.nn.Module) and any(True for _ in f.parameters()):
            raise ValueError(f"{type(f).__name__} has parameters, which an ntkgp activation cannot learn (its "
                             "kernel would not be differentiated through them, and every built network would "
                             "share them); give a fixed function, e.g. lambda x: F.leaky_relu(x, 0.25).")


def _check_map(value: object, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> Tensor:
    """``value``, a user map's output, must be a tensor of the kernels' broadcast ``shape`` and ``dtype``."""
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__)
        raise ValueError(f"Elementwise: {name} must return a tensor of the broadcast shape of its arguments and "
                         f"their dtype, {tuple(shape)} {dtype}; got {got} (a reduction such as .mean()?).")
    return value


#: Upper bound on ``pairs × degree²`` evaluated at once by :class:`Numerical`.
QUADRATURE_CHUNK = 1 << 22

#: Largest Gauss–Hermite degree taken: its ``degree²`` evaluations per entry fill one chunk
#: (``QUADRATURE_CHUNK``). A degree of 10⁵ asked for 80 GB per entry (a review): where that much
#: memory exists it would have run for hours.
MAX_QUADRATURE_DEGREE = math.isqrt(QUADRATURE_CHUNK)


class Elementwise(Activation):
    r"""An activation given by ``fn`` and its NNGP map ``nngp_fn(k12, k11, k22) = E[φ(u)φ(v)]``
    (neural-tangents' ``stax.Elementwise``,
    Han et al. 2022, *Fast neural kernel embeddings for general activations*, NeurIPS, arXiv:2209.04121).

    ``nngp_fn`` takes broadcastable tensors in neural-tangents' argument order (covariance,
    then the two variances). ``Ṫ = ∂ nngp_fn / ∂k12`` by autograd unless ``dot_fn`` (same
    signature, ``E[φ'(u)φ'(v)]``) is given; maps whose derivative along ``k12`` is infinite at
    ``k12² = k11·k22`` (those with ``sqrt(k11·k22 − k12²)``, e.g. the arc-cosine kernels of kinked
    activations) need ``dot_fn`` (without it, the NTK raises where autograd's derivative is not
    finite). ``fn`` may be ``None`` if no finite twin is needed; otherwise it must be an elementwise
    torch function (checked on a 2 × 2 probe, :func:`check_elementwise`).

    ``nngp_fn`` and ``dot_fn`` must return tensors of their arguments' broadcast shape and dtype,
    finite where the kernels are (checked on every call). For hyperparameter gradients they must
    also have finite derivatives where a point meets itself, ``k12² = k11·k22``: write
    ``sqrt(k11·k22 − k12²)`` with :func:`ntkgp.layers.numerics.safe_sqrt` (zero gradient at 0), as
    the built-in layers do, since ``torch.sqrt(torch.clamp(·, min=0))`` has an infinite one there and
    makes the gradients NaN whenever ``x2`` is ``x1`` (from torch 2.15, whose clamp has derivative 0 at
    its bound, a derivative of 0 there instead, and without ``dot_fn`` no error: ``Ṫ`` on the diagonal
    is then what autograd's other terms give, right for ReLU's arc-cosine map, whose infinite terms
    cancel, but finite for a step's, whose ``Ṫ`` is infinite there). ``fn`` and the maps may not be modules with
    parameters (e.g. ``nn.PReLU``): ntkgp activations have no learnable parameters.

    ``mean_fn(k) = E[φ(u)]`` for ``u ~ N(0, k)`` (optional) lets a :class:`~ntkgp.layers.LayerNorm`
    follow the layer (it subtracts the features' mean); without it, one is refused. The centred
    kernel is then ``nngp_fn − μ1μ2``, a difference that loses digits where both are close (at
    small variances when ``φ(0) ≠ 0``), which ``LayerNorm``'s ``1/eps`` magnifies: such maps are
    best written for ``φ − φ(0)``: a ``LayerNorm`` after it gives the same kernels (it removes
    constants).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor] | None = None,
                 nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
                 dot_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
                 mean_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if fn is None and nngp_fn is None:
            raise ValueError("Elementwise needs fn (finite width), nngp_fn (infinite width), or both.")
        for name, f in (("fn", fn), ("nngp_fn", nngp_fn), ("dot_fn", dot_fn), ("mean_fn", mean_fn)):
            if f is not None and not callable(f):   # nngp_fn=3 failed at kernel time, "'int' is not callable"
                raise ValueError(f"Elementwise: {name} must be callable (or None), got {f!r}.")
        _parameter_free(fn, nngp_fn, dot_fn, mean_fn)
        if fn is not None:
            check_elementwise(fn, "Elementwise")
        self._fn, self.nngp_fn, self.dot_fn, self.mean_fn = fn, nngp_fn, dot_fn, mean_fn

    def fn(self, x: Tensor) -> Tensor:
        if self._fn is None:
            raise ValueError("This Elementwise layer has no fn, so it has no finite-width twin.")
        return self._fn(x)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        if self._fn is None:
            raise ValueError("This Elementwise layer has no fn, so it has no finite-width twin.")
        return self._fn

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        if self.nngp_fn is None:
            raise ValueError("This Elementwise layer has no nngp_fn, so it has no infinite-width kernel.")
        # the checks are skipped while torch.compile traces (they would break its graph)
        compiling = _is_compiling()
        shape = None if compiling else broadcast_shapes(k11.shape, k12.shape, k22.shape)

        def check(value: Tensor, name: str) -> Tensor:
            if compiling:
                return value
            value = _check_map(value, cast(torch.Size, shape), k12.dtype, name)   # computed: not compiling
            # NaN (asin outside [-1, 1], say) passed on silently; one reduction, no boolean copy
            if has_non_finite(value) and bool(torch.isfinite(k12).all()):
                raise ValueError(f"Elementwise: {name} returned NaN or infinite values where the kernels are finite.")
            return value

        def checked(fn: Callable, name: str, *args: Tensor) -> Tensor:
            return check(fn(*args), name)

        if not want_dot:
            return checked(self.nngp_fn, "nngp_fn", k12, k11, k22), None
        if self.dot_fn is not None:
            return (checked(self.nngp_fn, "nngp_fn", k12, k11, k22),
                    checked(self.dot_fn, "dot_fn", k12, k11, k22))
        if _maybe_functorch_level() is not None:   # not plain forward_ad, which takes the path below
            # under vmap/jacfwd the leaf's requires_grad_() below is refused ("You are attempting to
            # call Tensor.requires_grad_() ... inside of a function being transformed"); a jvp along
            # k12 alone is the partial derivative of the entrywise map, and composes with them
            # (checked outside it: inside, a vmapped value is hidden in a dual tensor)
            nngp_fn = self.nngp_fn
            # torch.func.jvp is hinted a 2- or 3-tuple whatever has_aux; two without aux
            nngp, dot = cast("tuple[Tensor, Tensor]",
                             torch.func.jvp(lambda c: nngp_fn(c, k11, k22), (k12,), (torch.ones_like(k12),)))
            return check(nngp, "nngp_fn"), dot
        keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (k11, k12, k22))
        with torch.enable_grad():
            # a node of its own: in the symmetric diagonal k11, k12 and k22 are one tensor, and the
            # derivative must be the partial one along k12, not the total one
            leaf = k12.clone() if k12.requires_grad else k12.detach().requires_grad_()
            nngp = checked(self.nngp_fn, "nngp_fn", leaf, k11, k22)
            if not nngp.requires_grad and torch.is_inference_mode_enabled():
                raise ValueError("Elementwise: the NTK of a layer without dot_fn needs autograd, which "
                                 "torch.inference_mode() disables: pass dot_fn, or use torch.no_grad() instead.")
            if not nngp.requires_grad:   # torch's "element 0 of tensors does not require grad"
                raise ValueError("Elementwise: nngp_fn's output does not depend on k12 through autograd (a "
                                 "constant, or a computation outside torch), so its derivative, which the NTK "
                                 "needs, is unknown: pass dot_fn = E[φ'(u)φ'(v)] (0 for a constant φ).")
            (dot,) = torch.autograd.grad(nngp, leaf, torch.ones_like(nngp), create_graph=keep_graph,
                                         allow_unused=True)
            if dot is None:   # T independent of k12 (a constant φ): Ṫ = ∂T/∂k12 = 0, not torch's RuntimeError
                dot = torch.zeros_like(nngp)
        if (not is_vmapped(dot) and not bool(torch.isfinite(dot.sum()))  # one cheap pass in the usual case
                and bool(torch.isfinite(nngp).all()) and not bool(torch.isfinite(dot).all())):
            raise ValueError("Elementwise: autograd's derivative of nngp_fn along k12 is not finite at some "
                             "inputs (a map with sqrt(k11·k22 − k12²), as the arc-cosine kernels of kinked "
                             "activations, has an infinite one at k12² = k11·k22); pass dot_fn = E[φ'(u)φ'(v)].")
        if not keep_graph:
            nngp, dot = nngp.detach(), dot.detach()
        return nngp, dot

    def mean(self, k: Tensor) -> Tensor | None:
        if self.mean_fn is None:
            return None
        if _is_compiling():   # the checks would break torch.compile's graph, as in pair_kernel
            return self.mean_fn(k)
        value = _check_map(self.mean_fn(k), k.shape, k.dtype, "mean_fn")
        if has_non_finite(value) and bool(torch.isfinite(k).all()):
            raise ValueError("Elementwise: mean_fn returned NaN or infinite values where the variances are finite.")
        return value

    def extra_repr(self) -> str:
        name = getattr(self._fn, "__name__", None) or getattr(self.nngp_fn, "__name__", "")
        return cast(str, name)


class Numerical(Activation):
    r"""Any elementwise torch activation ``fn``, its kernels by 2-D Gauss–Hermite quadrature.

    With ``L`` the Cholesky factor of ``[[k11, k12], [k12, k22]]`` and ``(z_a, w_a)`` the
    probabilists' Gauss–Hermite nodes and weights::

        T ≈ Σ_ab w_a w_b φ(u_ab) φ(v_ab),   Ṫ ≈ Σ_ab w_a w_b φ'(u_ab) φ'(v_ab),   (u_ab, v_ab) = L (z_a, z_b)

    (``φ'`` by autograd; as neural-tangents' ``stax.ElementwiseNumerical``, Han et
    al. 2022).

    The error falls exponentially with the degree, but the degree needed grows with the
    pre-activation variance (the nodes spread as ``sqrt(k)`` while ``φ`` varies on a fixed
    scale): for ``tanh``, degree 25 gives ``T`` to 5e-7 (``Ṫ`` to 6e-6) at variance 0.5 but only to
    1.5e-2 (``Ṫ`` to 0.16) at variance 5, where degree 200 reaches 1e-7 (1e-5). So by default the
    degree is chosen per kernel entry: for each variance present it grows (16, 24, 36, ... up to
    ``max_degree``) until ``T`` and ``Ṫ`` at that variance (a point with itself, and correlations
    ±1/2) change by less than ``rtol`` between successive degrees, the larger being used, and an
    entry takes the larger degree of its two variances. An entry's value thus depends on its own
    two points only, not on the others in the call, and entries of small variance do not pay the
    degree the largest needs. The largest degree used in the last call is kept in
    ``last_degree``. The work: ``degree²`` evaluations of ``φ`` per distinct entry (a symmetric
    kernel's two triangles are one), with ``φ'`` for ``Ṫ`` from the same autograd pass, and
    ``degree`` for a point with itself (``k12² = k11 k22``: a 1-D integral); the search of a
    kernel map's variances serves its pairs and the variances alike (the last search is kept).
    Kinked activations (relu, abs) converge slowly: they reach ``max_degree`` and warn; use their
    closed forms.

    Args:
        fn: the activation (``torch.tanh``, ``torch.nn.functional.softplus``, ...): an elementwise
            torch function, which construction checks on a 2 × 2 float64 probe
            (:func:`check_elementwise`).
        degree: a fixed number of points per dimension (``degree²`` evaluations per entry), or
            ``None`` for the adaptive choice. Gradients, quadratures of higher derivatives of
            ``fn``, need a larger degree than the values (docs/numerics.md). At most 2048
            (``ntkgp.layers.elementwise.MAX_QUADRATURE_DEGREE``), as is ``max_degree``.
        rtol: target relative accuracy of the adaptive choice (at least 64 machine epsilons of
            the input dtype, since float32 rounding caps what the check can see).
        max_degree: cap of the adaptive choice (a warning says when ``rtol`` was not reached).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], degree: int | None = None, rtol: float = 1e-7,
                 max_degree: int = 300) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"Numerical needs a callable activation, got {fn!r}.")
        _parameter_free(fn)
        check_elementwise(fn, "Numerical")
        degree = None if degree is None else _quadrature_degree(degree, "degree")
        max_degree = _quadrature_degree(max_degree, "max_degree")
        kind = "a finite positive number"
        if not finite_number(rtol, "rtol", kind) > 0:   # inf had fixed the degree at 24
            raise ValueError(f"rtol must be {kind}, got {rtol!r}.")
        self._fn = fn
        self.degree, self.rtol, self.max_degree = degree, float(rtol), max_degree
        self.last_degree: int | None = degree
        self._derivatives: list[Callable[[Tensor], Tensor]] = [_elementwise(fn)]
        # derivative order -> {power of two of the scale: the largest jump found there, or None}
        self._jumps: dict[int, dict[int, tuple[float, float] | None]] = {}
        self._warned_rough = self._warned_degree = False
        self._degrees_checked: set[tuple] = set()
        # the last adaptive search: (key, sorted variances, {want_dot: (degrees, warning) or None})
        self._degree_cache: tuple[tuple, Tensor, dict[bool, tuple[Tensor, str | None] | None]] | None = None

    def fn(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return self._fn

    def derivative(self, order: int) -> Callable[[Tensor], Tensor]:
        """The ``order``-th derivative of ``fn`` (elementwise, by autograd)."""
        while len(self._derivatives) <= order:
            self._derivatives.append(_differentiate(self._derivatives[-1], of_activation=len(self._derivatives) == 1))
        return self._derivatives[order]

    def check_continuous(self, order: int, scale: float) -> None:
        """``ValueError`` unless ``φ^(order−1)`` is continuous on ``[−10 s, 10 s]`` (and ``[−10,
        10]``), ``s`` the power of two at or above ``scale``, so that autograd's ``φ^(order)`` is its
        whole derivative (``order = 1``: ``φ`` itself, whose jumps ``φ'`` would miss).

        Autograd differentiates a kink piecewise: ``relu'' = 0`` drops the delta at 0, and
        Price's-theorem gradients built on it were wrong (the NNGP gradient of ``Numerical(relu)``
        9.9 instead of 15.1, ``hardtanh`` 8.4 instead of 0.23; ELU's NTK gradients, from ``φ‴``,
        60 % off; ``tanh + 0.5 sign`` −0.72 instead of 1.43). On a grid of 40001 points per range, an
        interval over which ``φ^(order−1)`` changes by more than twice what ``φ^(order)`` at its
        ends can explain (``2 h max |φ^(order)|``, which a finite jump of ``φ^(order)`` itself,
        softsign's ``φ''``, stays within) and by more than 10⁻³ of its own size there (and 10⁻⁶ of
        its size on ``[−10, 10]``: underflowing tails change by rounding) is a jump. The test is
        local, so large derivatives elsewhere (``exp``) or a coarse grid far out do not hide a kink
        near 0; points where autograd's derivatives are not finite are left out. Checked once per
        power of two of the scale.
        """
        try:
            jump = self._jump(order, scale)
        except RuntimeError as error:   # autograd cannot go that far (hardsigmoid's second derivative)
            raise ValueError(f"Numerical: the kernels' gradients need derivative {order} of the activation, "
                             f"which autograd cannot compute ({error}).") from None
        if jump is not None:
            where, size = jump
            raise ValueError(
                f"Numerical: the kernels' gradients need derivative {order} of the activation, but "
                f"{'the activation' if order == 1 else f'derivative {order - 1}'} jumps (near x = {where:.3g}, "
                f"by {size:.3g}): autograd drops the jump's delta term, which would give wrong gradients. Kinked "
                "activations (relu, abs, leaky relu, hardtanh, relu6, hardswish, selu; ELU and CELU for NTK "
                "gradients) need their closed forms (ntkgp.ReLU, Abs, LeakyReLU, ...), a smooth stand-in "
                "(softplus, GELU), or no gradients.")

    def warn_if_rough(self, order: int, scale: float) -> None:
        """Warn (once per layer) when ``φ^(order)``, integrated by a gradient, jumps: no delta is
        missing, but Gauss–Hermite converges only slowly on a discontinuous integrand (softsign's
        NNGP gradient was 17 % off at degree 100 and 10 % at 300; ELU's 0.6 %)."""
        if self._warned_rough:
            return
        try:
            jump = self._jump(order + 1, scale)
        except (RuntimeError, ValueError):   # no derivative beyond: nothing to say
            return
        if jump is not None:
            self._warned_rough = True
            warnings.warn(f"Numerical({self._name}): the kernels' gradients integrate derivative {order} of the "
                          f"activation, which jumps (near x = {jump[0]:.3g}); quadrature converges slowly on it, "
                          "so these gradients may be percents off (softsign's 17 % at degree 100). Prefer a smooth "
                          "activation or a closed form.", RuntimeWarning, stacklevel=caller_stacklevel())

    def warn_if_degree_too_low(self, orders: list[tuple[int, int]], variance: float, degree: int) -> None:
        """With a fixed ``degree``, warn (once per layer) when the quadratures a gradient needs change
        by more than 10⁻³ from ``degree`` to ``1.5 · degree`` at the largest ``variance`` (a point
        with itself and correlations ±1/2, as :meth:`variance_degrees`): gradients integrate higher
        derivatives, which need more points than the values (``tanh(10x)`` at degree 300: −4.8 for
        0.027, silently). The largest change over the quadratures bounds the gradients' error
        from above (a review measured 2–300× below it). Checked once per degree, orders and
        quarter octave of the variance."""
        if self._warned_degree or not variance > 0:
            return
        key = (degree, tuple(orders), math.ceil(4 * math.log2(variance)))
        if key in self._degrees_checked:
            return
        self._degrees_checked.add(key)
        k = torch.tensor([variance] * 3, dtype=torch.float64)
        pairs = k * torch.tensor([1.0, 0.5, -0.5], dtype=torch.float64)
        with torch.inference_mode(False), torch.no_grad():
            change = 0.0
            for i, j in orders:
                f, g = self.derivative(i), self.derivative(j)
                low = _gauss_hermite(f, g, k, pairs, k, degree)
                high = _gauss_hermite(f, g, k, pairs, k, round(1.5 * degree))
                scale = max(float(high.abs().max()), torch.finfo(torch.float64).tiny)
                change = max(change, float((low - high).abs().max()) / scale)
        if not change <= 1e-3:   # NaN too: a quadrature that overflows is no accurate one
            self._warned_degree = True
            warnings.warn(f"Numerical({self._name}, degree={degree}): the quadratures of the kernels' gradients "
                          f"change by {change:.2g} (relative) from degree {degree} to {round(1.5 * degree)} at "
                          f"variance {variance:.3g}, so the gradients may be up to about that far off; use a larger "
                          "degree, or degree=None (chosen per entry to rtol).", RuntimeWarning,
                          stacklevel=caller_stacklevel())

    def _jump(self, order: int, scale: float) -> tuple[float, float] | None:
        """Where and by how much ``φ^(order−1)`` jumps most (:meth:`check_continuous`), or ``None``."""
        if order < 1 or not scale > 0:
            return None
        octave = math.ceil(math.log2(scale))
        checked = self._jumps.setdefault(order, {})
        if octave in checked:
            return checked[octave]
        top = 2.0 ** octave
        with torch.inference_mode(False):
            ranges = [torch.linspace(-10 * top, 10 * top, 40001, dtype=torch.float64)]
            if top > 1e-3:
                ranges.append(torch.linspace(-10.0, 10.0, 40001, dtype=torch.float64))
            grid = torch.unique(torch.cat(ranges))
            lower, upper = self.derivative(order - 1)(grid).detach(), self.derivative(order)(grid).detach()
        finite = torch.isfinite(lower) & torch.isfinite(upper)
        grid, lower, upper = grid[finite], lower[finite], upper[finite]
        change = torch.diff(lower).abs()
        explained = 2 * torch.diff(grid) * torch.maximum(upper[1:].abs(), upper[:-1].abs())
        size = torch.maximum(lower[1:].abs(), lower[:-1].abs())
        # changes below 1e-6 of the derivative's size on [−10, 10] are rounding (underflowing tails) or
        # jumps too small to matter (softplus(β = 100) switches to x at βx > 20: φ'' drops by 2e-7)
        unit = lower[grid.abs() <= 10].abs().max() if bool((grid.abs() <= 10).any()) else lower.abs().max()
        jumps = (change > explained) & (change > 1e-3 * size) & (change > 1e-6 * unit)
        found = None
        if bool(jumps.any()):
            i = int(torch.where(jumps, change, 0.0).argmax())
            found = (float(grid[i]), float(change[i]))
        checked[octave] = found
        return found

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        if transforms_active():
            # torch's own errors named its internals: "vmap: We do not support batching operators that
            # can output dynamic shape", "autograd.Function ... must override setup_context", "You must
            # implement the jvp function"
            raise ValueError("Numerical layers work with reverse-mode autograd only (torch.autograd.grad, "
                             ".backward()), not under forward-mode AD or torch.func transforms (jacfwd, jacrev, "
                             "vmap): their quadrature is an autograd.Function with a backward alone. Use a "
                             "closed-form activation, or Elementwise(fn, nngp_fn), there.")
        degree = self.degree or self.entry_degrees(k11, k22, want_dot)
        if isinstance(degree, int):
            self.last_degree = degree
        elif degree.numel():
            self.last_degree = int(degree.max())
        # T and Ṫ in one quadrature: φ and φ' at its nodes from one autograd pass
        values = _Expectation.apply(k11, k12, k22, self, ((0, 0), (1, 1)) if want_dot else ((0, 0),), degree)
        nngp, dot = values[0], values[1] if want_dot else None
        for name, value in (("activation", nngp), ("activation's derivative", dot)):
            # NaN (log or sqrt of negative nodes) came back as a NaN kernel with only the rtol warning
            if value is not None and not _is_compiling() and has_non_finite(value):
                self._refuse_overflowed(k11, k12, k22)   # the kernels it was given, not the activation
                raise ValueError(f"Numerical: the {name} gave NaN or infinite values at the quadrature nodes (a "
                                 "function undefined for some real inputs, such as log or sqrt?), or its Gaussian "
                                 "expectation overflows.")
        return nngp, dot

    def mean(self, k: Tensor) -> Tensor:
        """``E[φ(u)] ≈ Σ_a w_a φ(sqrt(k) z_a)``, 1-D Gauss–Hermite at the degree the variance ``k``
        takes for ``T`` (differentiable by autograd through ``φ``, which at first order is exact
        for kinked ``φ`` too)."""
        return self._mean(k, self.derivative(0))

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        """``T − μ1μ2`` as ``E[ψ(u)ψ(v)] − E[ψ(u)]E[ψ(v)]`` with ``ψ = φ − φ(0)``: equal, but at small
        variances ``T ≈ μ1μ2 ≈ φ(0)²`` cancel, while the ``ψ`` terms are ``O(k)`` and ``O(k²)``."""
        degree = self.degree or self.entry_degrees(k11, k22, want_dot=False)
        (centred,) = _Expectation.apply(k11, k12, k22, self, ((0, 0),), degree, True)
        return centred - self._mean(k11, self._shifted) * self._mean(k22, self._shifted)

    def _mean(self, k: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        degree = self.degree or self.entry_degrees(k, k, want_dot=False)
        root = safe_sqrt(k)
        if isinstance(degree, int):
            return _mean_rule(fn, root, degree)
        out = torch.zeros_like(k)
        for d in torch.unique(degree).tolist():
            out = torch.where(degree == d, _mean_rule(fn, root, int(d)), out)
        return out

    def _shifted(self, x: Tensor) -> Tensor:
        """``ψ(x) = φ(x) − φ(0)``."""
        phi = self.derivative(0)
        return phi(x) - phi(torch.zeros_like(x[..., :1]))

    def function(self, order: int, centred: bool = False) -> Callable[[Tensor], Tensor]:
        """``φ^(order)``, or ``ψ = φ − φ(0)`` for ``order = 0`` when ``centred``."""
        return self._shifted if centred and order == 0 else self.derivative(order)

    def expectations(self, orders: list[tuple[int, int]], k11: Tensor, k12: Tensor, k22: Tensor,
                     degree: int | Tensor, centred: bool = False) -> list[Tensor]:
        """``E[φ^(i)(u) φ^(j)(v)]`` for each ``(i, j)`` in ``orders`` (``ψ`` for ``φ`` if ``centred``), by
        quadrature at ``degree`` without a graph. The derivatives up to the highest order asked for
        come from one chain of autograd passes at each node (:meth:`derivatives_at`): ``T`` and
        ``Ṫ`` together cost one evaluation of ``φ`` and one backward pass, not two and one."""
        # E[φ^(i)(u) φ^(i)(v)] orders each entry's variances (exactly symmetric kernels), the others may not;
        # so in the centred backward too, whose (1, 1) had come with (2, 0) and (0, 2) unordered (∂/∂k12 of a
        # symmetric kernel not symmetric: 7.6e-5 relative at a fixed degree 40, 1e-10 at the adaptive one)
        groups = [[pair for pair in orders if (pair[0] == pair[1]) == symmetric] for symmetric in (True, False)]
        values: dict[tuple[int, int], Tensor] = {}
        for group, symmetric in zip(groups, (True, False), strict=True):
            if not group:
                continue
            if centred and any(0 in pair for pair in group):   # ψ, not in the chain
                found = self._shifted_expectations(group, k11, k12, k22, degree, symmetric)
            else:
                found = self._chained(group, k11, k12, k22, degree, symmetric)
            values.update(zip(group, found, strict=True))
        return [values[pair] for pair in orders]

    def _shifted_expectations(self, orders: list[tuple[int, int]], k11: Tensor, k12: Tensor, k22: Tensor,
                              degree: int | Tensor, symmetric: bool) -> list[Tensor]:
        """:meth:`expectations` of centred ``orders`` (``ψ`` for order 0), each function on its own."""
        fs = [self.function(i, True) for i, _ in orders]
        gs = [self.function(j, True) for _, j in orders]
        return _gauss_hermite_many(lambda x: [f(x) for f in fs], lambda x: [g(x) for g in gs], k11, k12, k22,
                                   degree, symmetric)

    def _chained(self, orders: list[tuple[int, int]], k11: Tensor, k12: Tensor, k22: Tensor, degree: int | Tensor,
                 symmetric: bool) -> list[Tensor]:
        """:meth:`expectations` of non-centred ``orders``, their derivatives from one chain per node set."""
        top = max(max(pair) for pair in orders)

        def left(x: Tensor) -> list[Tensor]:
            values = self.derivatives_at(x, top)
            return [values[i] for i, _ in orders]

        def right(x: Tensor) -> list[Tensor]:
            values = self.derivatives_at(x, top)
            return [values[j] for _, j in orders]

        return _gauss_hermite_many(left, right, k11, k12, k22, degree, symmetric)

    def derivatives_at(self, x: Tensor, top: int) -> list[Tensor]:
        """``[φ(x), φ'(x), ..., φ^(top)(x)]`` (as :meth:`derivative` gives each) from one chain of
        autograd passes, without a graph: ``derivative(top)`` alone repeats the passes below it."""
        phi = self.derivative(0)
        if top == 0:
            return [phi(x)]
        # autograd records nothing under a caller's inference mode (closed-form Erf's NTK works there); the
        # graph is ours, freed here: a caller's saved-tensor hooks must not see it, or a checkpointed kernel
        # (whose recomputation reads the degree search back rather than redoing it) saves fewer tensors in
        # its recomputation than in its forward pass, which checkpoint refuses
        with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            leaf = (x.clone() if x.is_inference() else x).detach().requires_grad_()
            values = [phi(leaf.clone())]   # an in-place fn (t.tanh_()) would modify the leaf
            for order in range(1, top + 1):
                values.append(_derivative_of(values[-1], leaf, of_activation=order == 1, create_graph=order < top))
        return [value.detach() for value in values]

    def entry_degrees(self, k11: Tensor, k22: Tensor, want_dot: bool = True) -> Tensor:
        """Per kernel entry (the broadcast shape of ``k11`` and ``k22``), the larger of the degrees
        its two variances need (:meth:`variance_degrees`)."""
        self._refuse_overflowed(k11, k22)
        values, degrees = self.variance_degrees(torch.cat([k11.reshape(-1), k22.reshape(-1)]), want_dot)

        def lookup(k: Tensor) -> Tensor:   # values is sorted and holds every variance present
            return degrees[torch.searchsorted(values, k.detach().contiguous())]

        return torch.maximum(lookup(k11), lookup(k22))

    def variance_degrees(self, variances: Tensor, want_dot: bool = True) -> tuple[Tensor, Tensor]:
        """The distinct ``variances`` (sorted) and, for each, the smallest degree in 16, 24, 36, ...
        whose predecessor agrees with it to ``rtol`` on ``T`` (and ``Ṫ``) at ``(k, ρk, k)`` for
        ``ρ = 1`` and ``ρ = ±1/2``, relative to the value at ``ρ = 1`` (which bounds the others).

        The off-diagonal correlations matter for activations with a kink: any symmetric rule
        integrates ``relu(u)²`` exactly, so the diagonal alone settled at degree 24 while
        off-diagonal ``Ṫ`` entries were 12 % off; such activations now run to ``max_degree`` and warn.
        """
        c = torch.unique(variances.detach())
        found = self._cached_degrees(c, want_dot)
        if found is None:
            values_only, degrees, unsettled = self._search_degrees(c, want_dot)
            if not _is_compiling():
                kinds = {False: (values_only.clone(), unsettled[0]),
                         True: (degrees.clone(), unsettled[1]) if want_dot else None}
                self._degree_cache = (self._degree_key(c), c, kinds)
            found = (degrees if want_dot else values_only), unsettled[want_dot]
        degrees, unsettled_message = found
        if unsettled_message is not None:   # a search read back warns again: each call that misses rtol says so
            warnings.warn(unsettled_message, RuntimeWarning, stacklevel=caller_stacklevel())
        return c, degrees

    def _refuse_overflowed(self, *kernels: Tensor) -> None:
        """:class:`~ntkgp.layers.base.NonFiniteKernelError` where the kernels reaching this layer have
        already overflowed (a product of kernels of inputs of norm 1e150, ``inf``, then a ``LayerNorm``:
        NaN), as the kernel's final check raises for the closed-form activations: a NaN variance was
        looked up past the end of the degree table (``IndexError: index 8 is out of bounds``), and a
        fixed degree's NaN blamed the activation. Skipped while torch.compile traces."""
        if _is_compiling() or not any(has_non_finite(k) for k in kernels):
            return
        raise NonFiniteKernelError(f"The kernels reaching Numerical({self._name}) overflow {kernels[0].dtype} (NaN or "
                                   "infinite variances): rescale the inputs or the variances"
                                   + ("" if kernels[0].dtype == torch.float64 else ", or use float64") + ".")

    def _degree_key(self, c: Tensor) -> tuple:
        return (self.rtol, self.max_degree, c.dtype, c.device)

    def _cached_degrees(self, c: Tensor, want_dot: bool) -> tuple[Tensor, str | None] | None:
        """The degrees of the last search for the sorted variances ``c`` and its warning, where that
        search covered all of them (with ``Ṫ`` if ``want_dot``), else ``None``. A layer's kernel map
        asks twice for the same variances (its pairs' ``T`` and ``Ṫ``, then the variances' ``T``): the
        second search would redo the first one's quadratures of ``T``."""
        if self._degree_cache is None or not c.numel():
            return None
        key, known, kinds = self._degree_cache
        kind = kinds[want_dot]
        if kind is None or key != self._degree_key(c):
            return None
        where = torch.searchsorted(known, c).clamp_max(known.numel() - 1)
        return (kind[0][where], kind[1]) if bool((known[where] == c).all()) else None

    def _search_degrees(self, c: Tensor, want_dot: bool) -> tuple[Tensor, Tensor, tuple[str | None, str | None]]:
        """:meth:`variance_degrees` of the sorted distinct variances ``c``: the degrees at which ``T``
        settles, those at which ``T`` and ``Ṫ`` settle together (the same without ``want_dot``), and
        the warnings for each where some did not settle by ``max_degree``. The first come free with
        the second: ``T`` is evaluated at every degree the second tries."""
        degrees = torch.zeros(c.shape, dtype=torch.int64, device=c.device)   # 0: not settled yet
        values_only = degrees.clone()
        if c.numel() == 0:
            return values_only, degrees, (None, None)
        orders = [(0, 0), (1, 1)] if want_dot else [(0, 0)]
        rtol = max(self.rtol, 64 * torch.finfo(c.dtype).eps)  # float32 rounding caps the reachable accuracy
        degree, previous = min(16, self.max_degree), None   # a cap below 16 was exceeded
        while True:
            pending = (degrees == 0).nonzero().squeeze(-1)     # each degree is evaluated where still needed
            cp = c[pending]
            pairs = torch.stack([cp, 0.5 * cp, -0.5 * cp])   # (3, P): ρ = 1, 1/2, −1/2
            kk = cp.expand(3, -1)
            current = self.expectations(orders, kk, pairs, kk, degree)
            change = None
            if previous is not None:
                # tiny, not 1e-300 (0 in float32): tanh at variance 0 was 0/0 there, and never settled
                tiny = torch.finfo(c.dtype).tiny
                changes = torch.stack([((a[:, pending] - b).abs() / b[0].abs().clamp_min(tiny)).amax(0)
                                       for a, b in zip(previous, current, strict=True)])
                change = changes.amax(0)
                values_only[pending[(changes[0] <= rtol) & (values_only[pending] == 0)]] = degree
                degrees[pending[change <= rtol]] = degree
                if not bool((degrees == 0).any()):
                    return values_only, degrees, (None, None)
            if degree >= self.max_degree:
                unsettled = degrees == 0
                both = self._unsettled_warning(rtol, degree, c[unsettled], change)
                values = both if not want_dot else None
                if want_dot and bool((values_only == 0).any()):
                    moved: Tensor | None = None if change is None else changes[0][values_only[pending] == 0]
                    values = self._unsettled_warning(rtol, degree, c[values_only == 0], moved)
                degrees[unsettled] = degree
                values_only[values_only == 0] = degree
                return values_only, degrees, (values, both)
            if previous is None:
                previous = [c.new_empty(3, c.numel()) for _ in orders]
            for full, part in zip(previous, current, strict=True):
                full[:, pending] = part
            degree = min(self.max_degree, round(degree * 1.5))

    def _unsettled_warning(self, rtol: float, degree: int, variances: Tensor, change: Tensor | None) -> str:
        """The warning for ``variances`` whose quadratures had not settled to ``rtol`` by ``degree``,
        the cap, where the last step moved them by ``change``."""
        # the last step's change only hints at the error: tanh at variance 1e3 moved its kernels
        # by up to 49 % from degree 274 to 300, and E[tanh'(u)] was 93 % off at 300
        moved = ("" if change is None or not change.numel()
                 else f", where the last step moved them by up to {float(change.max()):.2g}")
        return (f"Numerical({self._name}): quadrature did not reach rtol={rtol:g} by degree "
                f"{degree} (variances up to {float(variances.max()):.3g}{moved}); using degree "
                f"{degree} there, whose error may exceed that change, and the kernels' gradients "
                "(quadratures of higher derivatives of the activation) are further off still. "
                "Gauss-Hermite nodes spread as sqrt(variance) and miss features of the activation "
                "narrower than that: scale the inputs down, or use a closed-form activation.")

    @property
    def _name(self) -> str:
        return getattr(self._fn, "__name__", repr(self._fn))

    def extra_repr(self) -> str:
        return f"{self._name}, degree={self.degree or 'adaptive'}"

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # the output check, which pickling cannot carry (a closure): without it a copy's fn returning
        # (n, 1) was broadcast by einsum into a wrong kernel
        self.__dict__["_derivatives"] = [_elementwise(self._fn)]
        # a layer pickled before these attributes existed
        for name, default in (("_warned_rough", False), ("_warned_degree", False), ("_jumps", {}),
                              ("_degrees_checked", set()), ("_degree_cache", None)):
            if name not in self.__dict__:
                self.__dict__[name] = default

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_derivatives", None)   # a closure, rebuilt by __setstate__
        state["_degree_cache"] = None      # a memo of the last call, not part of the layer
        return state


def check_elementwise(fn: Callable[[Tensor], Tensor], layer: str) -> None:
    """A ``ValueError`` unless ``fn`` maps a float64 tensor to one of its shape entry by entry: ``fn``
    on a 2 × 2 probe equals ``fn`` on each entry alone. A function outside torch (``math.sin``) failed
    inside the kernel with torch's message, and one that mixes entries but keeps the shape
    (``t - t.mean(-1, keepdim=True)``) gave a wrong kernel with only a quadrature warning."""
    # with gradients on, as training and the NTK call it (np.sin works on tensors only without them)
    probe = torch.tensor([[-1.5, 0.25], [0.75, 2.0]], dtype=torch.float64, requires_grad=True)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # math.sin warns of float() of a tensor that requires grad, then fails
            whole = fn(probe.clone())
            alone = [fn(probe[i:i + 1, j:j + 1].clone()) for i in range(2) for j in range(2)]
    except Exception as err:
        raise ValueError(f"{layer}: the activation fails on a float64 tensor ({type(err).__name__}: {err}); it must "
                         "be a torch function of a tensor, such as torch.tanh.") from err
    tensors = isinstance(whole, Tensor) and all(isinstance(a, Tensor) and a.numel() == 1 for a in alone)
    if not (tensors and whole.shape == probe.shape and torch.allclose(
            whole.detach().double(), torch.cat([a.detach().reshape(1) for a in alone]).double().reshape(2, 2),
            rtol=1e-12, atol=1e-12, equal_nan=True)):
        raise ValueError(f"{layer}: the activation must act elementwise (each output entry a function of the "
                         "same input entry alone, the shape kept); a reduction such as t - t.mean(-1) mixes "
                         "the features.")


def _elementwise(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn``, refusing outputs that are not a tensor of its input's shape and dtype (a reduction,
    ``.float()``) with a clear error instead of a wrong kernel or one from inside ``einsum``."""
    def checked(x: Tensor) -> Tensor:
        value = fn(x)
        if not isinstance(value, Tensor) or value.shape != x.shape or value.dtype != x.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"Numerical: the activation must act elementwise and keep the dtype, returning "
                             f"{tuple(x.shape)} {x.dtype} for such an input; got {got} (a reduction such as "
                             ".mean(), or a cast?).")
        return value

    return checked


def _differentiate(fn: Callable[[Tensor], Tensor], of_activation: bool = True) -> Callable[[Tensor], Tensor]:
    def derivative(x: Tensor) -> Tensor:
        # autograd records nothing under a caller's inference mode (closed-form Erf's NTK works there)
        with torch.inference_mode(False), torch.enable_grad():
            if x.is_inference():
                x = x.clone()
            leaf = x if x.requires_grad else x.detach().requires_grad_()
            # an in-place fn (t.tanh_()) would modify a leaf that requires grad
            return _derivative_of(fn(leaf.clone()), leaf, of_activation, create_graph=True)

    return derivative


def _same(tensor: Tensor) -> Tensor:
    """The identity, as both saved-tensor hooks: tensors saved as autograd would without hooks."""
    return tensor


def _derivative_of(y: Tensor, leaf: Tensor, of_activation: bool, create_graph: bool) -> Tensor:
    """``dy/d leaf`` of an elementwise ``y``, by autograd (grad mode on); ``of_activation``: ``y`` is
    ``φ`` itself, not one of its derivatives (for the message where autograd cannot go on)."""
    if not y.requires_grad:   # torch's "element 0 of tensors does not require grad"
        if not of_activation:
            # φ' without a graph: φ is piecewise linear (abs, leaky relu, clamp; zeros for φ'' would
            # drop the kinks' delta terms and give wrong gradients) or linear
            raise ValueError("Numerical: the kernels' gradients need the activation's second derivative, "
                             "which autograd cannot give for a piecewise-linear activation: use its closed "
                             "form (ntkgp.ReLU, Abs, LeakyReLU, Identity), or no gradients.")
        raise ValueError("Numerical: the activation's output does not depend on its input through "
                         "autograd (a constant, or a computation outside torch), so its derivative, which "
                         "the NTK and the kernels' gradients need, is unknown; use Elementwise with "
                         "dot_fn, or ntk=False.")
    (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y), create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(leaf) if grad is None else grad


@lru_cache(maxsize=32)
def _hermite_rule(degree: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = scipy.special.roots_hermite(degree)  # stable for large degrees too
    return nodes, weights


def _mean_rule(f: Callable[[Tensor], Tensor], root: Tensor, degree: int) -> Tensor:
    """``Σ_a w_a f(root · z_a)``: ``E[f(u)]`` for ``u ~ N(0, root²)`` by the 1-D rule of ``degree`` points."""
    nodes_np, weights_np = _hermite_rule(degree)
    nodes = torch.as_tensor(nodes_np, dtype=root.dtype, device=root.device) * math.sqrt(2.0)
    weights = torch.as_tensor(weights_np, dtype=root.dtype, device=root.device) / math.sqrt(math.pi)
    return f(root.unsqueeze(-1) * nodes) @ weights


def _quadrature_degree(value: object, name: str) -> int:
    degree = integer_at_least(value, 1, name)
    if degree > MAX_QUADRATURE_DEGREE:
        raise ValueError(f"{name} must be at most {MAX_QUADRATURE_DEGREE} ({name}² evaluations per kernel entry), "
                         f"got {degree}.")
    return degree


def gauss_hermite_expectation(f: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor],
                              k11: Tensor, k12: Tensor, k22: Tensor, degree: int | Tensor) -> Tensor:
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``, elementwise.

    Writes ``u = sqrt(k11) z1``, ``v = (k12/sqrt(k11)) z1 + sqrt((k11 k22 − k12²)/k11) z2`` and
    applies the tensor-product Gauss–Hermite rule of ``degree`` points per dimension (one number,
    or one per entry: an integer tensor that broadcasts with the kernels; at most 2048,
    ``ntkgp.layers.elementwise.MAX_QUADRATURE_DEGREE``); ``k11 k22 − k12²`` is formed so it is
    exactly 0 for a point paired with itself. No autograd graph is recorded.

    The variances must be finite and non-negative, and ``|k12| ≤ sqrt(k11 k22)`` (to 100 units of
    rounding): a ``ValueError`` otherwise, before any quadrature.
    """
    for name, fn in (("f", f), ("g", g)):
        if not callable(fn):
            raise ValueError(f"gauss_hermite_expectation: {name} must be callable, got {fn!r}.")
    for name, k in (("k11", k11), ("k12", k12), ("k22", k22)):
        if not isinstance(k, Tensor) or not k.is_floating_point():
            got = k.dtype if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"gauss_hermite_expectation: {name} must be a floating-point tensor, got {got}.")
    if isinstance(degree, Tensor):
        if degree.is_floating_point() or degree.is_complex() or degree.dtype == torch.bool:
            raise ValueError("gauss_hermite_expectation: a per-entry degree must be an integer tensor, got "
                             f"{degree.dtype}.")
        if degree.numel() and not (int(degree.min()) >= 1 and int(degree.max()) <= MAX_QUADRATURE_DEGREE):
            raise ValueError(f"gauss_hermite_expectation: degree must be in [1, {MAX_QUADRATURE_DEGREE}], got values "
                             f"from {int(degree.min())} to {int(degree.max())}.")
    else:
        degree = _quadrature_degree(degree, "degree")
    shapes = [tuple(t.shape) for t in (k11, k12, k22, *([degree] if isinstance(degree, Tensor) else []))]
    try:
        broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"gauss_hermite_expectation: k11, k12, k22 (and a per-entry degree) must broadcast, got "
                         f"shapes {shapes}.") from None
    a, c, b = (t.detach() for t in (k11, k12, k22))
    if has_non_finite(a) or has_non_finite(c) or has_non_finite(b):
        raise ValueError("gauss_hermite_expectation: k11, k12 and k22 must be finite (NaN or inf found).")
    if bool((a < 0).any()) or bool((b < 0).any()):
        raise ValueError("gauss_hermite_expectation: the variances k11 and k22 must be non-negative.")
    slack = 1 + 100 * max(torch.finfo(t.dtype).eps for t in (a, b, c))   # the coarsest: float32 variances, float64 k12
    if bool((c.abs() > (a.sqrt() * b.sqrt()) * slack).any()):
        raise ValueError("gauss_hermite_expectation: |k12| exceeds sqrt(k11 k22), which no covariance matrix has.")
    return _gauss_hermite(f, g, k11, k12, k22, degree)


#: Several functions evaluated at once: a node tensor to one value tensor per function.
Many = Callable[[Tensor], "list[Tensor]"]


def _gauss_hermite(f: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor],
                   k11: Tensor, k12: Tensor, k22: Tensor, degree: int | Tensor) -> Tensor:
    """:func:`gauss_hermite_expectation` of arguments that are valid (the kernels' own)."""
    # E[f(u) f(v)] is symmetric: one ordering makes kernel matrices exactly symmetric
    return _gauss_hermite_many(lambda x: [f(x)], lambda x: [g(x)], k11, k12, k22, degree, f is g)[0]


def _gauss_hermite_many(f: Many, g: Many, k11: Tensor, k12: Tensor, k22: Tensor, degree: int | Tensor,
                        symmetric: bool) -> list[Tensor]:
    """``E[f_m(u) g_m(v)]`` for each of the ``M`` functions ``f`` and ``g`` give, all at the same nodes:
    functions that share work (``φ`` and ``φ'`` from one autograd pass) evaluate it once.
    ``symmetric``: ``f_m`` is ``g_m`` for every ``m``, so an entry may swap ``k11`` and ``k22``."""
    per_entry = isinstance(degree, Tensor)
    shape = torch.broadcast_shapes(k11.shape, k12.shape, k22.shape,
                                   *([cast(Tensor, degree).shape] if per_entry else []))
    a, c, b = (t.detach().expand(shape).reshape(-1) for t in (k11, k12, k22))
    if symmetric:
        a, b = torch.minimum(a, b), torch.maximum(a, b)
    degrees = cast(Tensor, degree).expand(shape).reshape(-1) if per_entry else None
    # equal entries (the two triangles of a symmetric kernel, once ordered) are integrated once
    a, c, b, degrees, inverse = _distinct_entries(a, c, b, degrees)
    if degrees is None:
        out = _expectations(f, g, a, c, b, cast(int, degree))
    else:
        where = [(degrees == d).nonzero().squeeze(-1) for d in torch.unique(degrees).tolist()]
        parts = [_expectations(f, g, a[w], c[w], b[w], int(degrees[w[0]])) for w in where]
        if not parts:   # no entries: (M, 0), M told by f on no nodes
            parts, where = [_expectations(f, g, a, c, b, 1)], [degrees]
        out = torch.cat(parts, dim=1)[:, torch.argsort(torch.cat(where))]   # back in the entries' order
    return list(out[:, inverse].reshape(-1, *shape))


def _distinct_entries(a: Tensor, c: Tensor, b: Tensor, degrees: Tensor | None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """The distinct rows of ``(a, c, b, degrees)`` and the index of each original row among them,
    so that ``distinct[inverse]`` restores the rows. A sort costs ``O(N log N)`` against the
    quadrature's ``degree²`` evaluations per entry, and halves the work of a symmetric kernel."""
    # the degrees (up to MAX_QUADRATURE_DEGREE = 2048) ride along as floats of float32 at least: bfloat16
    # rounds 257 to 256 (merged entries of degrees 256 and 257 took 256)
    dtype = torch.promote_types(a.dtype, torch.float32)
    columns = [a, c, b] if degrees is None else [a, c, b, degrees]
    rows, inverse = torch.unique(torch.stack([t.to(dtype) for t in columns], dim=1), dim=0, return_inverse=True)
    if rows.shape[0] == a.shape[0]:   # nothing to merge: keep the rows as they were
        return a, c, b, degrees, torch.arange(a.shape[0], device=a.device)
    distinct_degrees = None if degrees is None else rows[:, 3].round().to(degrees.dtype)
    a, c, b = (rows[:, n].to(a.dtype) for n in range(3))   # exact: they were a's dtype
    return a, c, b, distinct_degrees, inverse


def _expectation(f: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor],
                 a: Tensor, c: Tensor, b: Tensor, degree: int) -> Tensor:
    """:func:`gauss_hermite_expectation` of flat variances ``a``, ``b`` and covariances ``c``."""
    return _expectations(lambda x: [f(x)], lambda x: [g(x)], a, c, b, degree)[0]


def _expectations(f: Many, g: Many, a: Tensor, c: Tensor, b: Tensor, degree: int) -> Tensor:
    """:func:`_gauss_hermite_many` of flat variances ``a``, ``b`` and covariances ``c``: ``(M, N)``."""
    nodes_np, weights_np = _hermite_rule(degree)
    nodes = torch.as_tensor(nodes_np, dtype=a.dtype, device=a.device) * math.sqrt(2.0)
    weights = torch.as_tensor(weights_np, dtype=a.dtype, device=a.device) / math.sqrt(math.pi)
    parts = []
    chunk = max(1, QUADRATURE_CHUNK // (degree * degree))
    with torch.no_grad():
        for start in range(0, max(a.numel(), 1), chunk):   # one chunk for no entries: M is f's to tell
            sl = slice(start, start + chunk)
            k11_, k12_, k22_ = a[sl], c[sl], b[sl]
            sd1 = torch.sqrt(k11_)
            positive = sd1 > 0
            q = _product_scale(k11_, k22_)   # k11 k22 and the determinant are O(k²): formed of scaled variances
            p = torch.sqrt((q * k11_) * (q * k22_))
            det = torch.clamp((p - q * k12_) * (p + q * k12_), min=0)                 # q² (k11 k22 − k12²)
            safe_k11 = torch.where(positive, q * k11_, torch.ones_like(k11_))
            along = torch.where(positive, k12_ / torch.where(positive, sd1, torch.ones_like(sd1)), 0)
            # sqrt(det / k11) = sqrt(q² det / (q k11)) / sqrt(q), sqrt(q) exact for a power of 4
            across = torch.where(positive, torch.sqrt(det / safe_k11) / torch.sqrt(q),
                                 torch.sqrt(torch.clamp(k22_, min=0)))
            fu = torch.stack(f(sd1[:, None] * nodes))                            # (M, N, deg)
            parts.append(_inner_sums(g, fu, along, across, nodes, weights))
    return torch.cat(parts, dim=1)


def _product_scale(k11: Tensor, k22: Tensor) -> Tensor:
    """Per entry, a power of 4, ``q``, near ``1/sqrt(k11 k22)``: ``q·k11 · q·k22`` is in ``[1, 16)`` and
    ``q·k11 = O(sqrt(k11/k22))`` a normal number, so neither the products nor ``q·k11`` over- or
    underflow. A power of 4 scales every product, square root and quotient of the determinant's
    formula exactly, so the entries whose unscaled intermediates are normal numbers keep their bits
    (measured: ``Numerical`` kernels and their gradients bitwise unchanged in float32 and float64 for
    inputs of scale 1e-15 to 3, and in float64 at variances down to 1e-120).

    One scale for all points, sized by the largest variance, underflowed ``q·k11`` to 0 for a pair of a
    tiny and a huge variance (inputs of norms 1e-150 and 1e150 together): ``det / (q k11)`` was
    ``0/0``, and ``Numerical`` blamed the activation for NaN values."""
    tiny = torch.finfo(k11.dtype).tiny   # log2(0) is -inf: a zero variance takes the smallest normal one's
    logs = torch.log2(torch.clamp(k11, min=tiny)) + torch.log2(torch.clamp(k22, min=tiny))
    return torch.pow(2.0, -2 * torch.floor(logs / 4))


def _inner_sums(g: Many, fu: Tensor, along: Tensor, across: Tensor, nodes: Tensor, weights: Tensor) -> Tensor:
    """``Σ_ab w_a w_b fu_ma g_m(along z_a + across z_b)`` per function ``m`` and entry. Where
    ``across = 0`` (a point with itself, ``k12² = k11 k22``) ``v`` does not depend on ``b`` and the
    sum is the 1-D ``Σ_a w_a fu_ma g_m(along z_a) · Σ_b w_b``: ``degree`` evaluations of ``g``
    instead of ``degree²``."""
    flat = across == 0
    if not bool(flat.any()):
        return _tensor_sums(g, fu, along, across, nodes, weights)
    out = fu.new_empty(fu.shape[:2])
    line = flat.nonzero().squeeze(-1)
    out[:, line] = (fu[:, line] * torch.stack(g(along[line, None] * nodes))) @ weights * weights.sum()
    if not bool(flat.all()):
        plane = (~flat).nonzero().squeeze(-1)
        out[:, plane] = _tensor_sums(g, fu[:, plane], along[plane], across[plane], nodes, weights)
    return out


def _tensor_sums(g: Many, fu: Tensor, along: Tensor, across: Tensor, nodes: Tensor, weights: Tensor) -> Tensor:
    """:func:`_inner_sums` by the full tensor-product rule, ``degree²`` evaluations per entry."""
    v = along[:, None, None] * nodes[None, :, None] + across[:, None, None] * nodes[None, None, :]
    return torch.stack([torch.einsum("ni,i,nij,j->n", fu_m, weights, gv, weights)      # gv: (N, deg, deg)
                        for fu_m, gv in zip(fu, g(v), strict=True)])


class _Expectation(torch.autograd.Function):
    """``E[φ^(i)(u) φ^(j)(v)]`` for each ``(i, j)`` in ``orders`` (one output each) with
    Price's-theorem gradients (see the module docstring); with ``centred``, ``ψ = φ − φ(0)`` in
    place of ``φ`` (the derivatives are the same). Orders asked together share the quadrature's
    work (:meth:`Numerical.expectations`).

    The backward is itself made of ``_Expectation``s of higher orders, so derivatives of any
    order (double backward, Hessian-vector products) follow Price's theorem again.
    """

    @staticmethod
    def forward(ctx, k11, k12, k22, layer: Numerical, orders: tuple[tuple[int, int], ...], degree: int | Tensor,
                centred: bool = False):
        ctx.save_for_backward(k11, k12, k22)
        ctx.layer, ctx.orders, ctx.degree, ctx.centred = layer, orders, degree, centred
        ctx.set_materialize_grads(False)   # an output without a gradient costs its backward nothing
        return tuple(layer.expectations(list(orders), k11, k12, k22, degree, centred))

    @staticmethod
    def backward(ctx, *grads):
        kernels = ctx.saved_tensors   # once: checkpointing refuses a second unpacking
        asked = [(i, j, grad) for (i, j), grad in zip(ctx.orders, grads, strict=True) if grad is not None]
        # Price's theorem: ∂/∂k11 = ½ E[φ^(i+2) φ^(j)], ∂/∂k12 = E[φ^(i+1) φ^(j+1)], ∂/∂k22 = ½ E[φ^(i) φ^(j+2)]
        steps = [(n, di, dj, factor) for n, di, dj, factor in ((0, 2, 0, 0.5), (1, 1, 1, 1.0), (2, 0, 2, 0.5))
                 if ctx.needs_input_grad[n]]
        for i, j, _ in asked:
            _check_price_orders(ctx, kernels, i, j)
        # all of them in one quadrature: the derivatives at each node from one chain of autograd passes
        orders = tuple(dict.fromkeys((i + di, j + dj) for i, j, _ in asked for _, di, dj, _ in steps))
        values = dict(zip(orders, _Expectation.apply(*kernels, ctx.layer, orders, ctx.degree, ctx.centred),
                          strict=True)) if orders else {}
        total: list[Tensor | None] = [None, None, None]
        for i, j, grad in asked:
            for n, di, dj, factor in steps:
                part = (grad * factor * values[(i + di, j + dj)]).sum_to_size(kernels[n].shape)
                previous = total[n]
                total[n] = part if previous is None else previous + part
        return *total, None, None, None, None


def _check_price_orders(ctx, kernels: tuple[Tensor, ...], i: int, j: int) -> None:
    """Before the gradients of :class:`_Expectation`'s output ``E[φ^(i)(u) φ^(j)(v)]``: Price's
    theorem needs each derivative used to be the whole derivative (no kinks); warn where the
    integrand is rough, or a fixed degree too low for the gradients' quadratures."""
    k11, _, k22 = kernels
    layer = ctx.layer
    scale = math.sqrt(float(torch.maximum(k11.detach().max(), k22.detach().max()))) if k11.numel() else 0.0
    top = max(i, j) + (2 if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] else 1)
    for order in range(1, top + 1):
        layer.check_continuous(order, scale)
    layer.warn_if_rough(top, scale)
    if isinstance(ctx.degree, int):   # a fixed degree: the adaptive one was chosen for the values
        wanted = [(i + 1, j + 1)] if ctx.needs_input_grad[1] else []
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            wanted += [(i + 2, j), (i, j + 2)]
        layer.warn_if_degree_too_low(wanted, scale * scale, ctx.degree)
