r"""Elementwise nonlinearities with closed-form Gaussian expectations.

For an activation ``φ`` applied to centred Gaussian pre-activations ``(u, v)`` with covariance
``[[k11, k12], [k12, k22]]`` (the NNGP kernel of the previous ``Dense`` layer), the
infinite-width maps are (Lee et al. 2018; Jacot et al. 2018)::

    K ← T(k11, k12, k22) = E[φ(u) φ(v)]
    Θ ← Θ · Ṫ(k11, k12, k22),   Ṫ = E[φ'(u) φ'(v)]

Each class below carries ``T``, ``Ṫ`` and the variance ``T(k, k, k)`` in closed form, and its
finite twin ``φ``. Every formula is checked against 2-D Gauss–Hermite quadrature in the tests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from ntkgp._checks import neural_tangents_keywords
from ntkgp.layers.base import BuildContext, Layer
from ntkgp.layers.near import PairCarry, abrelu_carried, abrelu_dot, carried_gaps, patched, sign_carried
from ntkgp.layers.numerics import (
    _is_compiling,
    clamp_passing,
    gaussian_angle,
    gaussian_angles,
    gaussian_det,
    horner,
    needs_graph,
    overflow_scale,
    power_of_2,
    power_of_4_exponents,
    safe_sqrt,
    shifted_det,
    transforms_active,
)
from ntkgp.layers.state import KernelState, with_self_pairs, with_twin_derivatives
from ntkgp.layers.validation import finite_constants, refuse_non_float_inputs, refuse_overflow, squarable_constants


class ActivationModule(nn.Module):
    """Finite twin of an activation layer: ``φ`` applied elementwise."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        refuse_non_float_inputs(x)   # φ of integers came out float32 whatever the network's dtype
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class Activation(Layer):
    """Base class of elementwise nonlinearities acting on Gaussian pre-activations.

    A subclass gives ``φ`` (:meth:`fn`) and, in :meth:`pair_kernel`, the two Gaussian expectations
    ``T = E[φ(u)φ(v)]`` and ``Ṫ = E[φ'(u)φ'(v)]`` (module docstring); the kernel map is then
    ``K ← T``, ``Θ ← Θ · Ṫ`` (Lee et al. 2018; Jacot et al. 2018).
    """

    def fn(self, x: Tensor) -> Tensor:
        """The activation ``φ`` of the finite-width network."""
        raise NotImplementedError

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        """``T = E[φ(u)φ(v)]`` and (if ``want_dot``) ``Ṫ = E[φ'(u)φ'(v)]`` for
        ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``, elementwise over broadcast ``k11, k12, k22``
        (the NNGP and NTK maps of Lee et al. 2018 and Jacot et al. 2018)."""
        raise NotImplementedError

    def variance(self, k: Tensor) -> Tensor:
        """``T(k, k, k) = E[φ(u)²]`` for ``u ~ N(0, k)``."""
        return self.pair_kernel(k, k, k, False)[0]

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = E[φ'(u)²]`` for ``u ~ N(0, k)``: the NTK factor of a point with itself.

        Subclasses whose :meth:`pair_kernel` cancels there give it in closed form of the one variable
        ``k`` (Exp's does not cancel; the ReLU family's rounds a self pair by an ulp). Along ``k11 = k12 = k22 = k``
        the three partial derivatives of ``Ṫ`` are each ``O(k^{-1/2})`` (Erf) but cancel to a total
        of ``O(k^{-3/2})``: differentiated through :meth:`pair_kernel`, a self-pair's NTK factor lost
        ``ε·k`` of its gradient's digits (6 % of a hyperparameter gradient in float32 at inputs of
        ``10³``). :meth:`kernel_map` puts it on the diagonal of a symmetric kernel.
        """
        return cast(Tensor, self.pair_kernel(k, k, k, True)[1])   # Ṫ, asked for

    def mean(self, k: Tensor) -> Tensor | None:
        """``E[φ(u)]`` for ``u ~ N(0, k)``: the mean of the i.i.d. features after this layer, which a
        following :class:`~ntkgp.layers.LayerNorm` subtracts and whose products enter the kernel of a
        sum of branches (:class:`~ntkgp.layers.Parallel`); ``None`` where it is not known."""
        return None

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor | None:
        """``E[(φ(u) − μ1)(φ(v) − μ2)] = T − μ1 μ2`` (``nngp``: ``T`` at these arguments), the
        kernel a following :class:`~ntkgp.layers.LayerNorm` normalizes; ``None`` where the mean is
        not known. Activations whose ``T`` nearly equals ``μ1 μ2`` at small variances (``Cos``:
        both ``≈ 1``) compute it without that cancellation, which ``LayerNorm``'s ``1/eps``
        would magnify."""
        m1 = self.mean(k11)
        return None if m1 is None else nngp - m1 * cast(Tensor, self.mean(k22))   # known at k11: known

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        """A picklable callable for the finite twin (defaults to ``self.fn``)."""
        return self.fn

    def _pair_kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                      ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None]]:
        """:meth:`pair_kernel`'s ``T`` and ``Ṫ``, and a function of no arguments giving
        :meth:`centred_pair_kernel` at the same arguments (:meth:`kernel_map` calls it only when a
        ``LayerNorm`` follows). Layers whose centred form repeats the pair kernel's work (the ReLU
        family's angle, GELU's determinant and arctangent) hand that function the pieces instead."""
        nngp, dot = self.pair_kernel(k11, k12, k22, want_dot)
        return nngp, dot, lambda: self.centred_pair_kernel(k11, k12, k22, nngp)

    def _state_pair_kernels(self, state: KernelState, want_dot: bool
                            ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None], PairCarry | None]:
        """:meth:`_pair_kernels` of ``state``'s pairs, and the carry of the nearly (anti)parallel pairs
        after this layer (:mod:`ntkgp.layers.near`): ``None``, except in the ReLU family, whose kernels
        are not smooth in ``ρ`` at ``ρ = ±1``, ``Sign``, ``Sin``, ``Cos`` and ``Rbf``."""
        return (*self._pair_kernels(state.k11, state.nngp, state.k22, want_dot), None)

    def _replaced(self, cls: type) -> bool:
        """Whether :meth:`pair_kernel` or :meth:`centred_pair_kernel` is not ``cls``'s own (a subclass's,
        or one set on the instance): ``cls``'s :meth:`_pair_kernels` then defers to them."""
        return any(getattr(getattr(self, name), "__func__", None) is not getattr(cls, name)
                   for name in ("pair_kernel", "centred_pair_kernel"))

    @property
    def _exact_dot_variance(self) -> bool:
        """Whether :meth:`dot_variance` is a closed form of its own (not :meth:`pair_kernel`'s)."""
        return type(self).dot_variance is not Activation.dot_variance

    def kernel_map(self, state: KernelState) -> KernelState:
        if not state.is_gaussian:
            # "put a Dense layer before it" alone misled where one was there, before a join
            raise ValueError(f"{type(self).__name__} needs Gaussian inputs (its kernel is an expectation over "
                             "centred Gaussian pre-activations): a Dense layer's outputs, or a sum of such branches, "
                             "are; the raw inputs, an activation's outputs, a product of branches and a "
                             "concatenation of several branches are not. Put a Dense layer right before it.")
        want_ntk = state.ntk is not None
        carry = None
        if state.diag and state.symmetric:
            cov = self.variance(state.cov1)
            dot = self.dot_variance(state.cov1) if want_ntk else None
            nngp = cov1 = cov2 = cov
        else:
            nngp, dot, centred_pair, carry = self._state_pair_kernels(state, want_ntk)
            cov1, cov2 = state.map_covs(self.variance)
            if want_ntk and state.symmetric and self._exact_dot_variance:
                # a point with itself: Ṫ of its variance alone, whose gradient does not cancel (without
                # autograd in place, also in a Ṫ that centred_pair keeps: within an ulp of the formula's)
                dot = with_self_pairs(state, cast(Tensor, dot), self.dot_variance(state.cov1))   # asked for
            elif want_ntk and self._exact_dot_variance:
                dot = with_twin_derivatives(state, cast(Tensor, dot), self.dot_variance)
        ntk = cast(Tensor, state.ntk) * cast(Tensor, dot) if want_ntk else None   # both tensors with want_ntk

        def centred() -> tuple[Tensor, Tensor, Tensor] | None:
            # evaluated only when a LayerNorm follows (directly or after Identity layers)
            def centred_variance(k: Tensor, variance: Tensor) -> Tensor | None:
                return self.centred_pair_kernel(k, k, k, variance)

            if state.diag and state.symmetric:
                c = centred_variance(state.cov1, cov1)
                return None if c is None else (c, c, c)
            c = centred_pair()
            if c is None:
                return None
            c1 = centred_variance(state.cov1, cov1)
            # known means (centred_pair gave one): the variances' centred kernels are tensors too
            return c, cast(Tensor, c1), cast(Tensor, c1 if state.cov2 is state.cov1
                                             else centred_variance(state.cov2, cov2))

        def mean() -> tuple[Tensor, Tensor, bool] | None:
            # evaluated only when a sum or a LayerNorm needs it
            m1 = self.mean(state.cov1)
            if m1 is None:
                return None
            return m1, m1 if state.cov2 is state.cov1 else cast(Tensor, self.mean(state.cov2)), True   # known at cov1

        return state.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=self.preserves_gaussian,
                             mean=mean, centred=centred, carry=carry)

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        return ActivationModule(self.finite_fn(), type(self).__name__), in_width


# ---------------------------------------------------------------------------------- ReLU family
def _abrelu(x: Tensor, a: float, b: float) -> Tensor:
    # the slope at exactly 0 is (a + b)/2 (|x|' = 0 there), what the kernel's θ = π/2 at zero
    # variance stands for (Ṫ = (a + b)²/4); clamps gave a + b (ReLU'(0) = 1), and a zero input
    # through a zero but trainable standard-parameterized bias had an NTK of 1.0 for the kernel's
    # 0.25. ReLU's values are exact; other slopes can differ from a·x or b·x by an ulp, and an
    # infinite input (an overflow already) can give NaN. A nested torch.where, exact everywhere,
    # made a stacked ensemble's ReLU training 18 % slower (5-point sin data, E = 64, width 512)
    return (a + b) / 2 * x + (b - a) / 2 * x.abs()


class ABReLU(Activation):
    r"""``φ(x) = a·min(x, 0) + b·max(x, 0)`` (Cho & Saul 2009; Tsuchida et al. 2018).

    With ``s = sqrt(k11 k22 − k12²)`` and ``θ = atan2(s, k12)``::

        Ṫ = (a² + b²)/2 − (a − b)² θ / (2π) = ab + (a − b)² (π − θ) / (2π)
          = (a + b)²/4 + (a − b)² (π/2 − θ) / (2π)   (the form taken for ab < 0 and k12 ≥ 0)
        T = (a − b)² s / (2π) + Ṫ · k12
        T(k, k, k) = (a² + b²) k / 2,   E[φ(u)] = (b − a) sqrt(k / (2π))

    ``θ = π/2`` where both ``s`` and ``k12`` vanish (a zero input without bias), and the finite
    twin's slope at exactly 0 is the matching ``(a + b)/2``.
    """

    carries_pairs = True

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = squarable_constants(a=a, b=b)
        squarable_constants(**{"a - b": self.a - self.b})   # (a − b)² in the kernel

    def fn(self, x: Tensor) -> Tensor:
        return _abrelu(x, self.a, self.b)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_abrelu, a=self.a, b=self.b)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        s, dot = self._dot_kernel(k11, k12, k22)
        return self._from_dot(s, dot, k12), (dot if want_dot else None)

    def _from_dot(self, s: Tensor, dot: Tensor, k12: Tensor) -> Tensor:
        """``T = (a − b)² s / (2π) + Ṫ · k12``."""
        factor = (self.a - self.b) ** 2 / (2 * math.pi)
        return torch.addcmul(s * factor, dot, k12) if factor else dot * k12

    def _pair_kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                      ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None]]:
        if self._replaced(ABReLU):
            return super()._pair_kernels(k11, k12, k22, want_dot)
        # the centred form from the same s and Ṫ, not the angle again: 6-15 ms per 1e6 pairs for 25-47
        # (one thread, a loaded machine), bit for bit. The function keeps both alive as long as the
        # layer's state: two row blocks without autograd (+7.5 MiB at the peak, N = 3000); with it the
        # graph holds Ṫ anyway, and the peak fell (N = 1000 before a LayerNorm: 441 → 340 MiB, no second
        # angle recorded; without one 246 both)
        s, dot = self._dot_kernel(k11, k12, k22)
        return (self._from_dot(s, dot, k12), (dot if want_dot else None),
                lambda: self._centred(k11, k12, k22, s, dot))

    def _state_pair_kernels(self, state: KernelState, want_dot: bool
                            ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None], PairCarry | None]:
        carry = state.carry
        if carry is None or self._replaced(ABReLU):
            return super()._state_pair_kernels(state, want_dot)
        # the kernels' own s and Ṫ, then at the carried pairs that are near those from the carried det
        # (ntkgp/layers/near.py): the other pairs keep every bit
        k11, k12, k22 = state.k11, state.nngp, state.k22
        # the pairs whose variances, before and after this layer, keep their products normal numbers
        kept = carry.kept_pairs(state.nngp, state.cov1, state.cov2, (self.a**2 + self.b**2) / 2)
        if kept is None:
            return super()._state_pair_kernels(state, want_dot)
        carry, pair11, pair12, pair22 = kept
        s, dot = self._dot_kernel(k11, k12, k22)
        near, s_near, dot_near, nngp_near, after = abrelu_carried(self.a, self.b, carry, pair11, pair12, pair22)
        s = patched(s.expand_as(k12), carry.index, near, s_near)
        dot = patched(dot.expand_as(k12), carry.index, near, dot_near)
        # T = ab k12 + (a − b)² p J/(2π): its other form s + (π − θ) k12 cancels near θ = π
        nngp = patched(self._from_dot(s, dot, k12), carry.index, near, nngp_near)
        return nngp, (dot if want_dot else None), lambda: self._centred(k11, k12, k22, s, dot), after

    def _dot_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor) -> tuple[Tensor, Tensor]:
        """``s = sqrt(k11 k22 − k12²)`` and ``Ṫ``."""
        # Ṫ as ab + (a − b)²(π − θ)/(2π) with π − θ taken by atan2 (gaussian_angle): ReLU's kernel
        # vanishes at θ = π, and (a² + b²)/2 − (a − b)²θ/(2π) lost its digits there. At a self pair
        # this rounds to (a² + b²)/2 within an ulp (exactly for ReLU and Abs); the diagonal takes
        # dot_variance's closed form instead (choosing the form by the sign of k12 here kept every bit
        # too, but made a 3-layer ReLU kernel 10-20 % slower)
        if self.a * self.b < 0:
            # slopes of opposite signs: ab + (a − b)²(π − θ)/(2π) is a difference, whose rounding of ab
            # (ε|ab|) is the whole of Ṫ where it is small: Abs's Ṫ = (2/π) arcsin ρ was 1.5e-7 off at
            # ρ = 1e-9, ABReLU(−0.4, 1.3)'s 4 ulps at ρ = 0. As (a + b)²/4 + (a − b)²/4 · (π/2 − θ)/(π/2),
            # with π/2 − θ = atan2(k12, s), it is a sum for k12 ≥ 0, and Abs's (a + b = 0) a product
            # everywhere. For k12 < 0 and a + b ≠ 0 the supplement's form stays: near θ = π the
            # complement's rounded (a + b)²/4 − (a − b)²/4 = ab was 3 ulps off for ABReLU(−0.05, 1)
            if self.a + self.b:
                # π − θ too, from the same scaled s and k12 (gaussian_angles: atan2 of the unscaled ones
                # gave NaN gradients beside variances of 1e20 in float32)
                s, complement, supplement = gaussian_angles(k11, k12, k22)
                return s, abrelu_dot(self.a, self.b, k12, complement, supplement)
            s, complement = gaussian_angle(k11, k12, k22, complement=True)
            return s, abrelu_dot(self.a, self.b, k12, complement, None)
        s, supplement = gaussian_angle(k11, k12, k22, supplement=True)
        return s, abrelu_dot(self.a, self.b, k12, None, supplement)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        """``T − μ1μ2 = k12 (Ṫ − (a − b)²/(2π) · k12/(p + s))``, ``p = sqrt(k11 k22)``: from ``T`` and
        ``μ1μ2 = (a − b)² p/(2π)`` with ``s − p = −k12²/(p + s)``. ``T − μ1μ2`` itself vanishes at
        ``ρ = 0`` (independent inputs) and as a difference kept ``T``'s rounding, ``ε/|ρ|`` of it
        (ReLU at ``ρ = 1e-9``: 4e-8 off, relative, 1e8 inherent errors; the rounding of ``T`` at
        ``ρ = 0`` where the kernel is exactly 0). Here ``Ṫ`` and the correction differ by a factor
        of at least ``π/2`` for ``k12 > 0``, and add for ``k12 < 0`` where ``Ṫ ≥ 0`` (always for
        ``ab ≥ 0``); for ``ab < 0`` and ``Ṫ < 0`` they cancel only as far as the covariance itself
        does (Abs: ``(2/π)(arcsin ρ − ρ/(1 + sqrt(1 − ρ²)))``, at most a half), with ``Ṫ`` itself a
        difference there (ABReLU(−0.4, 1.3) at ``ρ ≈ −1/3``: 4.4 inherent errors). 0 where a
        variance is 0 (``p + s = 0``)."""
        return self._centred(k11, k12, k22, *self._dot_kernel(k11, k12, k22))

    def _centred(self, k11: Tensor, k12: Tensor, k22: Tensor, s: Tensor, dot: Tensor) -> Tensor:
        """:meth:`centred_pair_kernel` from :meth:`_dot_kernel`'s ``s`` and ``Ṫ``, which it leaves as they are."""
        if not (self.a - self.b):
            return dot * k12
        factor = (self.a - self.b) ** 2 / (2 * math.pi)
        # k12/(p + s) as ρ/(1 + s/p), p = sqrt(k11) sqrt(k22): k11 k22 and p + s overflowed float32 from
        # variances of ~1.7e38. p is 0 only with a zero variance, where k12 = s = 0: there 0/1, with a
        # gradient by p of 0 (a clamped p's, −k12/p², was 0/0)
        if needs_graph(k11, k12, k22):
            p = safe_sqrt(k11) * safe_sqrt(k22)
            p = torch.where(p == 0, torch.ones_like(p), p)
            return k12 * (dot - factor * ((k12 / p) / (1 + s / p)))
        # in place (1e6 pairs: 2 ms a pass); p = 0 (a zero variance: k12 = s = 0) read as 1 makes it 0/1
        p = torch.mul(torch.sqrt(k11), torch.sqrt(k22))
        p.masked_fill_(p == 0, 1)   # as the graph path: a clamp to the smallest normal number changed ρ for p below it
        slope = torch.div(k12, p).div_(torch.div(s, p).add_(1))
        return slope.mul_(-factor).add_(dot).mul_(k12)

    def variance(self, k: Tensor) -> Tensor:
        return (self.a**2 + self.b**2) / 2 * k

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = (a² + b²)/2`` (``θ = 0``), and ``(a + b)²/4`` at ``k = 0`` (``θ = π/2``),
        exactly: the pair formula's ``ab + (a − b)²/2`` is an ulp off for slopes of opposite signs
        (``ABReLU(−0.4, 1.3)``; 4.7e-16 at most over 10⁴ random pairs)."""
        # in k's dtype from the start: where() of two Python floats is float32 (0.52 came out 1e-8 off)
        return torch.where(k == 0, torch.full_like(k, (self.a + self.b) ** 2 / 4),
                           torch.full_like(k, (self.a**2 + self.b**2) / 2))

    def mean(self, k: Tensor) -> Tensor:
        return (self.b - self.a) * safe_sqrt(k / (2 * math.pi))

    def extra_repr(self) -> str:
        return f"a={self.a:g}, b={self.b:g}"


class ReLU(ABReLU):
    r"""``φ(x) = max(x, 0)``: the arc-cosine kernel of degree 1 (Cho & Saul 2009)::

        T = (s + (π − θ) k12) / (2π),   Ṫ = (π − θ) / (2π),   T(k, k, k) = k / 2

    with ``s`` and ``θ`` as in :class:`ABReLU`.
    """

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def extra_repr(self) -> str:
        return ""


class LeakyReLU(ABReLU):
    """``φ(x) = max(x, 0) + negative_slope · min(x, 0)``: :class:`ABReLU` with ``a = slope, b = 1``
    (Tsuchida et al. 2018)."""

    @neural_tangents_keywords(alpha="pass negative_slope=alpha (neural-tangents' LeakyRelu(alpha)).")
    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__(negative_slope, 1.0)

    def extra_repr(self) -> str:
        return f"negative_slope={self.a:g}"


class Abs(ABReLU):
    """``φ(x) = |x|``: :class:`ABReLU` with ``a = −1, b = 1`` (neural-tangents' ``stax.Abs``, Novak et
    al. 2020)."""

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)

    def extra_repr(self) -> str:
        return ""


# ---------------------------------------------------------------------------------- smooth
def _erf(x: Tensor, a: float, b: float, c: float) -> Tensor:
    return a * torch.erf(b * x) + c


class Erf(Activation):
    r"""``φ(x) = a·erf(b x) + c`` (Williams 1997).

    With ``q_ii = 1 + 2 b² k_ii`` and ``r = 2 b² k12``::

        T = a² (2/π) arcsin(r / sqrt(q11 q22)) + c²  = a² (2/π) atan2(r, sqrt(q11 q22 − r²)) + c²
        Ṫ = a² b² (4/π) / sqrt(q11 q22 − r²),   E[φ(u)] = c

    ``q11 q22 − r² = 1 + 2b²(k11 + k22) + 4b⁴(k11 k22 − k12²) ≥ 1`` always, so both are smooth
    everywhere. It is computed in that form: as a difference of products it loses every digit
    at large variances (a point with itself at ``k ~ 10⁷`` in float32).
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        super().__init__()
        self.a, self.b, self.c = squarable_constants(a=a, b=b, c=c)

    def fn(self, x: Tensor) -> Tensor:
        return _erf(x, self.a, self.b, self.c)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_erf, a=self.a, b=self.b, c=self.c)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        centred, dot = self._centred_kernels(k11, k12, k22, want_dot)
        return centred + self.c**2, dot

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        # T − c² without adding c² first (which lost every digit of T − c² for c² ≫ a²)
        return self._centred_kernels(k11, k12, k22, False)[0]

    def _pair_kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                      ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None]]:
        if self._replaced(Erf):
            return super()._pair_kernels(k11, k12, k22, want_dot)
        centred, dot = self._centred_kernels(k11, k12, k22, want_dot)   # T − c², kept rather than recomputed
        return centred + self.c**2, dot, lambda: centred

    def _centred_kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        """``T − c²`` and ``Ṫ``."""
        b2 = self.b**2
        # c·sqrt(q11 q22 − r²) from the variances scaled by c (1 unless k² could overflow)
        graph = needs_graph(k11, k12, k22)
        c, _, k12, _, det = shifted_det(k11, k12, k22, 2 * b2)
        if not graph:
            # the same operations as below, in place on fresh temporaries (bit for bit; a fresh matrix
            # per pass took about twice as long): 1/root is torch's scalar / tensor, reciprocal() · 1
            root = det.sqrt_()
            dot = None
            if want_dot:
                dot = torch.reciprocal(root) if isinstance(c, float) and c == 1 else torch.div(c, root)
                dot = dot.mul_(self.a**2 * b2 * (4 / math.pi))
            ratio = torch.mul(k12, 2 * b2)
            # (in place only into the quotient's shape and dtype: a narrower k12 rounded it to its own)
            ratio = ratio.div_(root) if (ratio.shape, ratio.dtype) == (root.shape, root.dtype) else ratio / root
            return ratio.atan_().mul_(self.a**2 * (2 / math.pi)), dot
        root = torch.sqrt(det)
        # atan of the ratio, not atan2: atan2's derivative squares both arguments, inf in float32
        centred = self.a**2 * (2 / math.pi) * torch.atan(2 * b2 * k12 / root)
        # c/root first: (constant · c)/root rounds once where c is a tensor of ones (a huge input elsewhere)
        # and constant · (1/root) twice where c is the float 1 (torch's scalar / tensor): an ulp apart
        dot = self.a**2 * b2 * (4 / math.pi) * (c / root) if want_dot else None
        return centred, dot

    def variance(self, k: Tensor) -> Tensor:
        # 2q/sqrt(1 + 4q) as q/sqrt(q + 1/4): 1 + 4q overflowed float32 from q ~ 8.5e37 (the variance read 0,
        # then NaN, for a²)
        q = self.b**2 * k
        return self.a**2 * (2 / math.pi) * torch.atan(q / torch.sqrt(q + 0.25)) + self.c**2

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = a² b² (4/π) / sqrt(1 + 4b²k) = a² b² (2/π) / sqrt(b²k + 1/4)``."""
        # the right form: 1 + 4b²k overflowed float32 from b²k ~ 8.5e37 (Ṫ read 0, and Θ lost its k Ṫ ~ sqrt(k))
        b2 = self.b**2
        return self.a**2 * b2 * (2 / math.pi) / torch.sqrt(b2 * k + 0.25)

    def mean(self, k: Tensor) -> Tensor:
        return torch.full_like(k, self.c)

    def extra_repr(self) -> str:
        return f"a={self.a:g}, b={self.b:g}, c={self.c:g}"


class SigmoidLike(Erf):
    """``φ(x) = erf(x / 2.4020563531719796)/2 + 1/2``, a sigmoid with closed-form kernels: :class:`Erf`
    with ``a = 1/2``, ``b = 1/2.4020563531719796``, ``c = 1/2`` (neural-tangents' ``stax.Sigmoid_like``,
    whose constant minimizes the squared distance to the logistic sigmoid on ``[−5, 5]``; Han et al.
    2022, *Fast neural kernel embeddings for general activations*, NeurIPS, arXiv:2209.04121)."""

    SCALE = 2.4020563531719796

    def __init__(self) -> None:
        super().__init__(0.5, 1 / self.SCALE, 0.5)

    def extra_repr(self) -> str:
        return ""


def _gelu(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x)


#: ``(z − atan z)/z³ = Σ_{n≥1} (−1)^{n+1} z^{2n−2}/(2n+1)``, in powers of ``z²``.
_ATAN_TAIL = tuple((-1) ** (n + 1) / (2 * n + 1) for n in range(1, 13))


def _z_minus_atan(z: Tensor) -> Tensor:
    """``z − atan z`` for ``0 ≤ z ≤ 1`` as a sum of positive terms (the difference loses ``~3/z²``
    ulps): with ``h(x) = x/(1 + sqrt(1 + x²))`` (``atan x = 2 atan h(x)``) and ``x − 2h(x) =
    x³/(1 + sqrt(1 + x²))²``, two halvings ``v = h(z)``, ``w = h(v) ≤ tan(π/16) < 0.2`` give
    ``(z − 2v) + 2(v − 2w) + 4(w − atan w)``, the last by its series ``w³ Σ_{n≥1} (−1)^{n+1}
    w^{2n−2}/(2n+1)`` to 12 terms (the next is below ``ε/3``)."""
    def halve(x: Tensor) -> tuple[Tensor, Tensor]:
        root = 1 + torch.sqrt(1 + x * x)
        return x / root, x * (x / root).square()

    v, first = halve(z)
    w, second = halve(v)
    w2 = w * w
    return first + 2 * second + 4 * w * w2 * horner(w2, _ATAN_TAIL)


class GELU(Activation):
    r"""``φ(x) = x Φ(x)`` (Hendrycks & Gimpel 2016); kernel from Tsuchida et al. 2020.

    With ``P = (1 + k11)(1 + k22)``, ``δ = sqrt(P − k12²)`` and ``α = atan2(k12, δ)``::

        T = k12/4 + (k12 α + (k12² + k11 k22 δ²) / (P δ)) / (2π)
        Ṫ = 1/4 + α/(2π) + k12 (1/δ² + (1 − k11 k22)/P + 1) / (2π δ)
        E[φ(u)] = k / sqrt(2π (1 + k))

    Near opposite inputs (``k12 < −δ``) ``T`` is evaluated as the equal
    ``(1/δ − δ (2 + k11 + k22)/P + |k12| (z − atan z)) / (2π)``, ``z = δ/|k12|``, whose terms do not
    cancel (docs/numerics.md), and ``Ṫ`` with ``1/4 + α/(2π) = atan(z)/(2π)``.
    """

    @neural_tangents_keywords(approximate="ntkgp.GELU is the exact GELU, neural-tangents' approximate=False; the "
                                          "tanh approximation has no counterpart.")
    def __init__(self) -> None:
        super().__init__()

    def fn(self, x: Tensor) -> Tensor:
        return _gelu(x)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return _gelu

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        nngp, dot, _, _ = self._kernels(k11, k12, k22, want_dot)
        return nngp, dot

    def _pair_kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                      ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None]]:
        if self._replaced(GELU):
            return super()._pair_kernels(k11, k12, k22, want_dot)
        # the centred form from the same δ and β, not the determinant and arctangent again: 20 ms per 1e6
        # pairs for 39-70 (one thread, a loaded machine), bit for bit; with autograd the peak fell (N =
        # 1000 before a LayerNorm: 644 → 545 MiB), without it no change (row blocks)
        nngp, dot, delta, beta = self._kernels(k11, k12, k22, want_dot)
        return nngp, dot, lambda: self._centred(k11, k12, k22, nngp, delta, beta)

    def _kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                 ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """``T``, ``Ṫ``, ``δ`` and ``β = π/2 + α`` (``atan z`` near opposite inputs, ``k12 < −δ``)."""
        # δ² = P − k12² = 1 + k11 + k22 + (k11 k22 − k12²), without the cancellation; formed of the
        # variances scaled by c where k11 k22 ~ k² could overflow
        c, _, _, _, det = shifted_det(k11, k12, k22)
        delta = torch.sqrt(det) / c
        # (2 + k11 + k22)/P as a sum: no O(k²) product, and 2 + k11 + k22 overflowed float32 from k ~ 1.7e38
        spread = torch.reciprocal(1 + k11) + torch.reciprocal(1 + k22)
        # β = π/2 + α. Near opposite inputs (k12 < −δ) α → −π/2 and π/2 + α kept α's absolute rounding
        # (ReLU's problem near θ = π): there β = atan(z), z = δ/|k12| < 1. atan of a quotient, not atan2,
        # whose derivative would square k12 (inf in float32)
        near = delta < -k12
        # (k12² + k11 k22 δ²)/(P δ), regrouped so that no O(k³)–O(k⁴) product overflows float32
        r11, r22 = k11 / (1 + k11), k22 / (1 + k22)
        rest = (k12 / (1 + k11)) * (k12 / (1 + k22)) / delta + r11 * r22 * delta
        # the near form costs 1.75× the pair kernel: under transforms and compile everywhere, without a
        # branch; otherwise only at the near pairs, when there are any (a host synchronization, and a second
        # for the pairs' indices where there are)
        if not (transforms_active() or _is_compiling()):
            beta = math.pi / 2 + torch.atan(k12 / delta)
            nngp = k12 * (beta / (2 * math.pi)) + rest / (2 * math.pi)
            if bool(near.any()):
                beta, nngp = _near_opposite(near, k12, delta, spread, beta, nngp)
        else:
            z = delta / torch.where(near, -k12, delta)              # 1 where not near: no 0 or inf
            angle = torch.atan(torch.where(near, z, k12 / delta))   # atan z near, else α
            beta = torch.where(near, angle, math.pi / 2 + angle)
            # near: k12 = −|k12| and k12² = P − δ² turn k12 β + rest into 1/δ − δ (2 + k11 + k22)/P +
            # |k12| (z − atan z), terms of the result's size (before, O(sqrt k) terms cancelled to
            # O(1/sqrt k): 1e-8 off at k = 1e6); z − atan z as a difference lost ~3/z² ulps, which T's own
            # conditioning hides for k11 ≈ k22 but not for unequal variances (float32, k11 = 1e10,
            # k22 = 1e7, ρ = −1: 0.5 off)
            near_sum = torch.reciprocal(delta) - delta * spread - k12 * _z_minus_atan(z)
            # k12 β / (2π) with β/(2π) ≤ 1/2 first: k12 β overflowed float32 from k12 ~ 1.1e38
            nngp = torch.where(near, near_sum / (2 * math.pi), k12 * (beta / (2 * math.pi)) + rest / (2 * math.pi))
        dot = None
        if want_dot:
            # (1 − k11 k22)/P + 1 = (2 + k11 + k22)/P: the left form cancels at large variances; 1/δ²
            # as (1/δ)², since δ² itself (and its derivative's δ⁴) overflows float32 at k ~ 1e19
            dot = (beta + k12 * (torch.reciprocal(delta).square() + spread) / delta) / (2 * math.pi)
        return nngp, dot, delta, beta

    def variance(self, k: Tensor) -> Tensor:
        root = _root_one_plus_twice(k)
        return k * (0.25 + (k / (k + 1) / root + torch.atan(k / root) / 2) / math.pi)

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = 1/4 + (atan(k/δ) + k (1/δ² + 2/(1 + k)) / δ) / (2π)``, ``δ = sqrt(1 + 2k)``
        (``P = (1 + k)²``, ``δ² = 1 + 2k``, ``(2 + 2k)/P = 2/(1 + k)``)."""
        delta = _root_one_plus_twice(k)   # no k², so no scaling
        alpha = torch.atan(k / delta)
        inverse = torch.reciprocal(delta)
        # k/δ³ as ((k/δ)/δ)/δ: as k·(1/δ)²/δ the gradient reaching (1/δ)² was (its own, ~k) · k/δ, inf in
        # float32 from k ~ 1e26
        return 0.25 + alpha / (2 * math.pi) + ((k * inverse) * inverse + 2 * (k / (1 + k))) * inverse / (
            2 * math.pi)

    def mean(self, k: Tensor) -> Tensor:
        # E[u Φ(u)] = k E[ϕ(u)] (Stein's lemma); 2π(1 + k) overflowed float32 from k ~ 5.4e37
        return k * torch.rsqrt(1 + k) / math.sqrt(2 * math.pi)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        """``T − μ1μ2``; for ``|ρ| ≤ 1/2`` as ``(k12 β + k12²/(P δ) − k12² r11 r22/(δ + sqrt P))/(2π)``
        (``β = π/2 + α``, ``r_ii = k_ii/(1 + k_ii)``): ``μ1μ2 = r11 r22 sqrt(P)/(2π)`` and
        ``δ − sqrt(P) = −k12²/(δ + sqrt P)`` take the ``k12 = 0`` part out of ``T``, where ``T − μ1μ2``
        (0 at ``ρ = 0``, independent inputs) kept ``T``'s rounding, ``ε/|ρ|`` of the result (1e8
        inherent errors at ``ρ = 1e-9``). ``k12 β`` dominates there (``β > 1``, the other terms
        ``≤ |k12|/2``); beyond, the difference loses at most a factor of 2."""
        c, _, _, _, det = shifted_det(k11, k12, k22)
        delta = torch.sqrt(det) / c
        return self._centred(k11, k12, k22, nngp, delta, math.pi / 2 + torch.atan(k12 / delta))

    def _centred(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor, delta: Tensor, beta: Tensor) -> Tensor:
        """:meth:`centred_pair_kernel` from ``δ`` and ``β`` (:meth:`_kernels`': ``π/2 + α`` wherever
        ``|ρ| ≤ 1/2``, which is not near opposite inputs)."""
        # δ ≥ 1: the form is smooth for every ρ, so no mask. k12 (β/2π), not (k12 β)/2π: k12 β overflowed
        # float32 from k12 ~ 1.1e38
        beta = beta / (2 * math.pi)
        # k12² r11 r22/(δ + √P) as (k12 r11 r22/2)(k12/((δ + √P)/2)): δ + √P overflowed float32, and as
        # k12 (k12 ratio) the gradient reaching the ratio, k12², overflowed from k12 ~ 2e19 (NaN gradients)
        half_sum = torch.sqrt(1 + k11) * torch.sqrt(1 + k22) / 2 + delta / 2
        # quotients, not products with 1/(1 + k): the gradient reaching 1/(1 + k) was k12 k ~ k², inf in float32
        half_r = k11 / (1 + k11) * (k22 / (1 + k22)) / 2
        near = k12 * beta + ((k12 / (1 + k11)) * (k12 / (1 + k22)) / delta
                             - (k12 * half_r) * (k12 / half_sum)) / (2 * math.pi)
        small = 2 * k12.abs() <= torch.sqrt(k11) * torch.sqrt(k22)
        return torch.where(small, near, nngp - self.mean(k11) * self.mean(k22))


def _near_opposite(near: Tensor, k12: Tensor, delta: Tensor, spread: Tensor, beta: Tensor, nngp: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """GELU's ``β`` and ``T`` with the pairs where ``near`` holds (``k12 < −δ``) in their near form,
    ``β = atan z`` and ``T = (1/δ − δ (2 + k11 + k22)/P − k12 (z − atan z))/(2π)``, ``z = δ/|k12|``.

    Computed on those pairs alone: the near form over whole blocks (``torch.where``) took 1.75× the
    pair kernel in every block with one near pair, which inputs of scale 2–10 in 10 dimensions put
    in every block of the first layer (0.07–0.35 % of the pairs). The same arithmetic for each pair:
    ``T`` bitwise as the whole-block form, ``β`` (and so ``Ṫ``) there within an ulp of it (``atan``
    rounds a tensor's vectorized part and its tail differently)."""
    pairs = near.reshape(-1).nonzero().squeeze(-1)

    def at(t: Tensor) -> Tensor:
        return t.expand(near.shape).reshape(-1)[pairs]

    d, k = at(delta), at(k12)
    z = d / -k
    near_nngp = (torch.reciprocal(d) - d * at(spread) - k * _z_minus_atan(z)) / (2 * math.pi)
    near_beta = torch.atan(z)
    if needs_graph(beta, nngp, near_nngp):
        return beta.masked_scatter(near, near_beta), nngp.masked_scatter(near, near_nngp)
    return beta.masked_scatter_(near, near_beta), nngp.masked_scatter_(near, near_nngp)


def _root_one_plus_twice(k: Tensor) -> Tensor:
    """``sqrt(1 + 2k)`` as ``sqrt(2) sqrt(k + 1/2)``: ``1 + 2k`` overflows float32 from ``k ~ 1.7e38``."""
    return torch.sqrt(k + 0.5) * math.sqrt(2)


#: What a layer makes of the carried pairs (``carry`` and its gathered ``k11, k12, k22``; ``want_dot``): their
#: ``T``, ``Ṫ`` (``None`` where the layer's own stands) and the carry after the layer.
CarriedValues = Callable[[PairCarry, Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor | None, PairCarry | None]]


def _with_carried_pairs(layer: Activation, state: KernelState, want_dot: bool, at_carried: CarriedValues
                        ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None], PairCarry | None]:
    """:meth:`~Activation._state_pair_kernels` of a layer that takes every carried pair (nearly parallel or
    antiparallel, :mod:`ntkgp.layers.near`) from the carry, as accurate there as its own kernels elsewhere
    (``Sign``, ``Sin``, ``Cos``, ``Rbf``): the kernels of all pairs, those of the carried pairs by
    ``at_carried`` in their place, and the carry it passes on."""
    k11, k12, k22 = state.k11, state.nngp, state.k22
    nngp, dot = layer.pair_kernel(k11, k12, k22, want_dot)
    kept = cast(PairCarry, state.carry).kept_pairs(state.nngp, state.cov1, state.cov2)   # (k11 − k22)² normal
    carried = None
    if kept is not None:
        carry, pair11, pair12, pair22 = kept
        nngp_near, dot_near, carried = at_carried(carry, pair11, pair12, pair22, want_dot)
        everywhere = torch.ones_like(pair12, dtype=torch.bool)
        nngp = patched(nngp, carry.index, everywhere, nngp_near)
        if dot is not None and dot_near is not None:
            dot = patched(dot, carry.index, everywhere, dot_near)
    final = nngp
    return nngp, dot, lambda: layer.centred_pair_kernel(k11, k12, k22, final), carried


def _from_carried_gaps(from_gaps: Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor | None]],
                       after: Callable[[PairCarry, Tensor, Tensor, Tensor, Tensor, Tensor], PairCarry]
                       ) -> CarriedValues:
    """:func:`_with_carried_pairs`'s ``at_carried`` of the Gaussian-kernel activations (``Sin``, ``Cos``, ``Rbf``),
    whose kernels depend on ``k11 + k22 ∓ 2k12`` through ``e^{−b²(k11 + k22 ∓ 2k12)/2}``: ``from_gaps`` of the
    carried gaps (:func:`~ntkgp.layers.near.carried_gaps`), and ``after`` of the carried pairs, their gaps and
    their ``k11``, ``k12``, ``k22``. From the kernels the gaps keep ``k12``'s rounding, ``ε k`` absolute, which at
    large variances is all of a small gap: float32 ``Sin`` kernels of inputs of scale 1e3 a unit apart were 0.14
    off (of the largest entry), where the inputs' own rounding moves them by 4e-5."""

    def at_carried(carry: PairCarry, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                   ) -> tuple[Tensor, Tensor | None, PairCarry | None]:
        gap_minus, gap_plus = carried_gaps(carry, k11, k12, k22)
        return (*from_gaps(k12, gap_minus, gap_plus, want_dot), after(carry, gap_minus, gap_plus, k11, k12, k22))

    return at_carried


def _sin(x: Tensor, a: float, b: float, c: float) -> Tensor:
    return a * torch.sin(b * x + c)


#: ``sinh t / t = Σ_n c_n t^{2n}``, ``c_n = 1/(2n+1)!``, to ``n = 9``: the first term left off is 2e-20 at ``t = 1``.
_SINH_TERMS = [1 / math.factorial(2 * n + 1) for n in range(10)]
#: :func:`_sinh_excess`'s coefficients of ``(y^j − x^j)² (xy)^{2m}``, ``c_m c_{m+j}``, by ``j = 1, 2, ...``.
_SINH_EXCESS = [[_SINH_TERMS[m] * _SINH_TERMS[m + j] for m in range(len(_SINH_TERMS) - j)]
                for j in range(1, len(_SINH_TERMS))]


def _sinh_excess(x: Tensor, y: Tensor, difference: Tensor) -> Tensor:
    """``sinh x sinh y − sinh²√(xy) ≥ 0`` for ``0 ≤ x, y < 1`` (where ten terms reach ``ε``), a sum of squares:
    with ``sinh t = t Σ c_n t^{2n}`` it is ``xy Σ_{m<n} c_m c_n (x^m y^n − x^n y^m)²`` (the terms ``m = n`` cancel),
    ``xy Σ_j (y^j − x^j)² Σ_m c_m c_{m+j} (xy)^{2m}``. As a difference it loses ``6/max(x, y)²`` of its terms.
    ``difference``: ``y − x``, given, and ``y^j − x^j = (y − x) Σ_i x^i y^{j−1−i}``: from the rounded ``x`` and
    ``y`` it lost ``ε max(x, y)/|y − x|`` of itself where ``x ≈ y`` (a pair of very unequal norms)."""
    product = x * y
    square = product * product
    total = torch.zeros_like(product)
    power_x, homogeneous = x, torch.ones_like(x)   # x^j and (y^j − x^j)/(y − x)
    for coefficients in _SINH_EXCESS:
        spread = difference * homogeneous
        total = total + spread * spread * horner(square, coefficients)
        homogeneous = y * homogeneous + power_x
        power_x = power_x * x
    return product * total


class Sin(Activation):
    r"""``φ(x) = a·sin(b x + c)`` (neural-tangents' ``stax.Sin``, Han et al. 2022; with a uniformly
    random phase in place of ``c`` the second term below averages out, leaving the Gaussian kernel
    of random Fourier features, Rahimi & Recht 2007). From
    ``sin A sin B = (cos(A−B) − cos(A+B))/2`` and ``E[e^{i(bu − bv)}] = e^{−b²(k11 + k22 − 2k12)/2}``::

        T = a²/2 · (e^{b²(k12 − (k11+k22)/2)} − cos(2c) e^{−b²(k12 + (k11+k22)/2)})
        Ṫ = a²b²/2 · (e^{b²(k12 − (k11+k22)/2)} + cos(2c) e^{−b²(k12 + (k11+k22)/2)})
        E[φ(u)] = a sin(c) e^{−b²k/2}

    The exponents are combined before ``exp`` so nothing overflows (``|k12| ≤ (k11+k22)/2``), from
    the differences ``(k11 ∓ k12) + (k22 ∓ k12)`` as :class:`Rbf`'s (exact for nearly (anti)parallel
    inputs), and clamped at 0: for such inputs of large variance rounding of the kernels can make
    them positive by ``ulp(k)``, which ``exp`` turned into ``inf``.

    Where ``cos 2c ≈ ±1`` one of the two is a difference of nearly equal exponentials at small
    variances (``T ≈ a² b² k12`` for ``c = 0``): ``e^A − e^B`` (``A − B = 2b²k12``) is taken as
    ``−e^A expm1(−2b²k12)`` (``k12 ≥ 0``) or ``e^B expm1(2b²k12)``, and the rest as
    ``(1 ∓ cos 2c) e^B`` with ``1 − cos 2c = 2 sin²c``, ``1 + cos 2c = 2 cos²c``. As a plain
    difference ``T`` lost ``ε/(b²k)`` of its digits: at float32 input scale ``10⁻³`` it was 8 % off.
    """

    carries_pairs = True

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        super().__init__()
        (self.c,) = finite_constants(c=c)   # a phase: never squared
        self.a, self.b = squarable_constants(a=a, b=b)
        # cos 2c, 1 − cos 2c and 1 + cos 2c, the latter two without cancellation
        self._cos2c, self._one_minus, self._one_plus = math.cos(2 * c), 2 * math.sin(c) ** 2, 2 * math.cos(c) ** 2
        self._sin_c = math.sin(c)

    def fn(self, x: Tensor) -> Tensor:
        return _sin(x, self.a, self.b, self.c)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_sin, a=self.a, b=self.b, c=self.c)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        # A = −b²((k11 − k12) + (k22 − k12))/2 and B = −b²((k11 + k12) + (k22 + k12))/2, as Rbf's exponent:
        # each difference is exact where it is small (Sterbenz), and k12 − (k11/2 + k22/2) kept the sum's
        # rounding, ulp(k) in the exponent: near-duplicate (A) or near-opposite (B) inputs of float32 variance
        # 1e8 read e^{−8} for e^{−4}. An overflow (variances beyond 8.5e37 in float32, A or B far below 0
        # then) is e^{−∞} = 0, the limit; a point with itself keeps A = 0 and B = −2b²k, bit for bit
        return self._from_gaps(k12, (k11 - k12) + (k22 - k12), (k11 + k12) + (k22 + k12), want_dot)

    def _from_gaps(self, k12: Tensor, gap_minus: Tensor, gap_plus: Tensor, want_dot: bool
                   ) -> tuple[Tensor, Tensor | None]:
        """``T`` and ``Ṫ`` from ``k11 + k22 ∓ 2k12`` (``A = −b² gap_minus/2``, ``B = −b² gap_plus/2``)."""
        b2 = self.b**2
        plus = torch.exp(clamp_passing(-b2 / 2 * gap_minus, max=0))    # e^A
        minus = torch.exp(clamp_passing(-b2 / 2 * gap_plus, max=0))    # e^B
        # e^A − e^B from the larger exponential and expm1 of the clamped gap: no cancellation, no
        # overflow in the branch torch.where discards (its gradient would be NaN)
        difference = torch.where(k12 >= 0, -plus * torch.expm1(-2 * b2 * clamp_passing(k12, min=0)),
                                 minus * torch.expm1(2 * b2 * clamp_passing(k12, max=0)))
        cos2c = self._cos2c
        if cos2c > 0:
            nngp = self.a**2 / 2 * (difference + self._one_minus * minus)
        else:
            nngp = self.a**2 / 2 * (plus - cos2c * minus)
        dot = None
        if want_dot:
            if cos2c < 0:
                dot = self.a**2 * b2 / 2 * (difference + self._one_plus * minus)
            else:
                dot = self.a**2 * b2 / 2 * (plus + cos2c * minus)
        return nngp, dot

    def _state_pair_kernels(self, state: KernelState, want_dot: bool
                            ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None], PairCarry | None]:
        if state.carry is None or self._replaced(Sin):
            return super()._state_pair_kernels(state, want_dot)
        return _with_carried_pairs(self, state, want_dot, _from_carried_gaps(self._from_gaps, self._carried_after))

    def _carried_after(self, carry: PairCarry, gap_minus: Tensor, gap_plus: Tensor, k11: Tensor, k12: Tensor,
                       k22: Tensor) -> PairCarry:
        r"""The carry after the layer. With ``x = b² gap_minus/2``, ``y = b² gap_plus/2`` (``T12 = a²/2 ·
        (e^{−x} − C e^{−y})``, ``C = cos 2c``), ``Tii = a²/2 · (1 − C e^{−2b²kii})`` and
        ``D = e^{−b²k11} − e^{−b²k22}`` (so ``e^{−2b²k11} + e^{−2b²k22} − 2e^{−x−y} = D²``)::

            g'   = a²/2 · (2 (1 − e^{−x}) (1 + C e^{−y}) − C D²)
            det' = a⁴/4 · ((1 − e^{−2x}) (1 − C² e^{−2y}) − C D²)

        with ``1 − e^{−x} = −expm1(−x)``, ``1 − C² e^{−2y} = (1 − C)(1 + C) − C² expm1(−2y)``, ``1 + C e^{−y} =
        (1 + C) + C expm1(−y)`` for ``C < 0`` and ``|D| = e^{−b² min(k11, k22)} · (−expm1(−b²|k11 − k22|))``:
        sums of products, exact where a gap is small. For ``C < 0`` every term is nonnegative. For ``C > 0``
        ``D²`` is subtracted: in ``g'`` a fraction of the first term, but in ``det'`` it cancels the first
        term's variance part for unequal variances of a nearly parallel (antiparallel) pair at small ``b²k``,
        ``6/(b²k)²`` of it (``Sin(1, 1, 0) → ReLU``, inputs of scale 1e-2 at ratio 1.1: 3.4e3 ``ε`` off), and where
        ``b²k22 ≪ 1 ≤ b²k11`` (``x ≈ y``) ``1/(2b²k22)`` of it (a pair ``(u, 1e-4 u)``, ``b²k11 = 2``: 2.6e7 ``ε``).
        So ``det' = a⁴/4 · ((1 − C)((1 + C)(1 − e^{−2x}) − C D²) + C² B)`` (the first a difference of at most half
        its first term) with ``B = (1 − e^{−2x}) (1 − e^{−2y}) − D² = 4 e^{−x−y} (sinh x sinh y − sinh² δ)``,
        ``δ = b²|k11 − k22|/2``, equal to ``(1 − e^{−2b²k11})(1 − e^{−2b²k22}) − (e^{−x} − e^{−y})²`` (``4 e^{−x−y}
        (sinh b²k11 sinh b²k22 − sinh² b²k12)``), which cancels where ``k11 ≈ k22`` instead: of the two the one
        whose first term is smaller (where ``max(x, y) ≥ 1`` at most 9.3 times ``B``). Where ``x, y < 1``, since
        ``xy − δ² = b⁴ det``: ``sinh x sinh y − sinh² δ = (sinh x sinh y − sinh²√(xy)) + sinh(√(xy) − δ)
        sinh(√(xy) + δ)``, ``√(xy) − δ = b⁴ det/(√(xy) + δ)``, the first by its series (:func:`_sinh_excess`).
        From the rounded kernels ``T11 + T22 − 2T12`` and ``T11 T22 − T12²`` keep ``T12``'s rounding, and a ReLU
        after a ``Sin`` took ``ε/θ`` of the angle again (its NTK 1.5e6 ``ε`` off at inputs 1e-7 from parallel)."""
        b2, cos2c, half = self.b**2, self._cos2c, self.a**2 / 2
        x = clamp_passing(b2 / 2 * gap_minus, min=0)
        y = clamp_passing(b2 / 2 * gap_plus, min=0)
        # D² from the smaller variance and the difference, exact (Sterbenz) where they are close: as
        # e^{−b²k11} − e^{−b²k22} it kept the exponentials' rounding, all of D where k11 ≈ k22
        spread = -torch.expm1(-b2 * (k11 - k22).abs())
        spread_sq = torch.exp(-2 * b2 * torch.minimum(k11, k22)) * spread * spread
        if cos2c < 0:
            upper = self._one_plus + cos2c * torch.expm1(-y)   # 1 + C e^{−y}, two nonnegative terms
        else:
            upper = 1 + cos2c * torch.exp(-y)
        g = half * (-2 * torch.expm1(-x) * upper - cos2c * spread_sq)
        twice = -torch.expm1(-2 * x)   # 1 − e^{−2x}
        det = twice
        if cos2c < 0:
            det = twice * (self._one_minus * self._one_plus - cos2c**2 * torch.expm1(-2 * y)) - cos2c * spread_sq
        elif cos2c > 0:
            first = twice * -torch.expm1(-2 * y)
            first_kernels = torch.expm1(-2 * b2 * k11) * torch.expm1(-2 * b2 * k22)
            across = torch.exp(-2 * torch.minimum(x, y)) * torch.expm1(-2 * b2 * k12.abs()) ** 2   # (e^{−x} − e^{−y})²
            variance_part = torch.where(first_kernels < first, first_kernels - across, first - spread_sq)   # B
            with torch.no_grad():
                small = torch.nonzero(torch.maximum(x, y) < 1).flatten()
            if small.numel():
                # at those pairs alone: the series at every carried pair was half the time of a d = 1 kernel
                at = (small,)
                variance_part = variance_part.index_put(at, self._small_gaps_variance(
                    carry.det[at], x[at], y[at], k11[at] - k22[at], 2 * b2 * k12[at]))
            det = self._one_minus * (self._one_plus * twice - cos2c * spread_sq) + cos2c**2 * variance_part
            g, det = clamp_passing(g, min=0), clamp_passing(det, min=0)
        return PairCarry(carry.index, half * (half * det), g)

    def _small_gaps_variance(self, det: Tensor, x: Tensor, y: Tensor, difference: Tensor, across: Tensor
                             ) -> Tensor:
        """:meth:`_carried_after`'s variance part ``B = 4 e^{−x−y} (sinh x sinh y − sinh² δ)`` at pairs with
        ``x, y < 1`` by its series (``det``: the carried one, ``difference``: ``k11 − k22``, ``across``: ``y − x
        = 2b²k12``)."""
        b2 = self.b**2
        product = x * y
        root = safe_sqrt(product)   # 0 at an exactly antiparallel pair (y = 0): a zero derivative, not 0 · inf
        spread = b2 / 2 * difference.abs()   # δ ≤ √(xy) < 1
        angle = torch.minimum(b2 * b2 * clamp_passing(det, min=0), product)   # b⁴ det = xy − δ², ≤ xy rounded
        total = root + spread
        inner = (_sinh_excess(x, y, across)
                 + torch.sinh(angle / torch.where(total > 0, total, 1.0)) * torch.sinh(total))
        return 4 * torch.exp(-(x + y)) * inner

    def variance(self, k: Tensor) -> Tensor:
        decay = torch.exp(-2 * self.b**2 * k)
        if self._cos2c > 0:   # 1 − cos 2c · e^{−2b²k} = −expm1(−2b²k) + (1 − cos 2c) e^{−2b²k}
            return self.a**2 / 2 * (self._one_minus * decay - torch.expm1(-2 * self.b**2 * k))
        return self.a**2 / 2 * (1 - self._cos2c * decay)

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = a²b²/2 · (1 + cos(2c) e^{−2b²k})``, for ``cos 2c < 0`` as
        ``(1 + cos 2c) e^{−2b²k} − expm1(−2b²k)`` (no cancellation at small ``k``)."""
        b2 = self.b**2
        decay = torch.exp(-b2 * (k + k))
        if self._cos2c < 0:
            return self.a**2 * b2 / 2 * (-torch.expm1(-2 * b2 * k) + self._one_plus * decay)
        return self.a**2 * b2 / 2 * (1 + self._cos2c * decay)

    def mean(self, k: Tensor) -> Tensor:
        return self.a * self._sin_c * torch.exp(-self.b**2 / 2 * k)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        r"""``T − μ1μ2 = a²/2 · e^{−b²(k11+k22)/2} (expm1(y) − cos 2c · expm1(−y))``, ``y = b²k12``.

        ``T`` and ``μ1μ2`` agree to ``O(b²k)`` at small variances (``Cos``: both ``≈ a²``), and
        ``LayerNorm`` divides their difference by up to ``1/eps``: for ``|y| ≤ 1`` the bracket is
        ``2 sinh y + (1 − cos 2c) expm1(−y)`` (``cos 2c > 0``) or ``4 sinh²(y/2) − (1 + cos 2c)
        expm1(−y)``, without cancellation; beyond, ``T − μ1μ2`` loses no digits.
        """
        y = self.b**2 * k12
        small = y.abs() <= 1
        ys = torch.where(small, y, torch.zeros_like(y))
        if self._cos2c > 0:
            bracket = 2 * torch.sinh(ys) + self._one_minus * torch.expm1(-ys)
        else:
            bracket = 4 * torch.sinh(ys / 2).square() - self._one_plus * torch.expm1(-ys)
        near = self.a**2 / 2 * torch.exp(-self.b**2 * (k11 + k22) / 2) * bracket
        return torch.where(small, near, nngp - self.mean(k11) * self.mean(k22))

    def extra_repr(self) -> str:
        return f"a={self.a:g}, b={self.b:g}, c={self.c:g}"


class Cos(Sin):
    """``φ(x) = a·cos(b x + c) = a·sin(b x + c + π/2)``: the kernels of :class:`Sin` at ``c + π/2``
    (neural-tangents' ``stax.Cos``, Han et al. 2022)."""

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        (c,) = finite_constants(c=c)
        super().__init__(a, b, c + math.pi / 2)
        # from c itself: c + π/2 is rounded, and 1 + cos(2c + π) = 2 sin²c must be 0 exactly at c = 0
        self._cos2c, self._one_minus, self._one_plus = -math.cos(2 * c), 2 * math.cos(c) ** 2, 2 * math.sin(c) ** 2
        self._sin_c = math.cos(c)
        self._phase = c

    def extra_repr(self) -> str:   # the phase given, not Sin's c + π/2
        return f"a={self.a:g}, b={self.b:g}, c={self._phase:g}"


def _rbf(x: Tensor, gamma: float) -> Tensor:
    return math.sqrt(2) * torch.sin(math.sqrt(2 * gamma) * x + math.pi / 4)


class Rbf(Activation):
    r"""``φ(x) = √2 sin(√(2γ) x + π/4)``, whose NNGP kernel is the Gaussian (RBF) kernel of the
    pre-activations (neural-tangents' ``stax.Rbf``; random Fourier features, Rahimi & Recht 2007)::

        T = exp(−γ (k11 + k22 − 2 k12)),   Ṫ = 2γ T,   T(k, k, k) = 1,   E[φ(u)] = e^{−γk}

    :class:`Sin` with ``a = √2``, ``b = √(2γ)``, ``c = π/4``, where ``cos 2c = 0`` removes the
    second exponential; written out so that ``cos(π/2)``'s rounding (6e-17) and ``a² = 2(1 + ε)``
    do not reach the values. After ``Dense(weight_var=σ², bias_var=0)`` on inputs of dimension
    ``d`` the NNGP kernel is ``exp(−γσ² ‖x − x'‖²/d)``: ``γ = 1/(2ℓ²)`` for a length scale ``ℓ``
    in units of ``σ sqrt(‖x − x'‖²/d)``. The exponent is clamped at 0, which rounding of nearly
    equal inputs could exceed by an ulp.
    """

    carries_pairs = True

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        (self.gamma,) = squarable_constants(gamma=gamma)
        if self.gamma <= 0:
            raise ValueError(f"Rbf: gamma must be positive (γ = 1/(2ℓ²) for a length scale ℓ), got {gamma!r}.")

    def fn(self, x: Tensor) -> Tensor:
        return _rbf(x, self.gamma)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_rbf, gamma=self.gamma)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        # (k11 − k12) + (k22 − k12): k11 + k22 overflowed float32 from variances of 1.7e38 and made
        # inf − inf = NaN of nearly parallel inputs; each difference is exact for them (Sterbenz)
        return self._from_gaps(k12, (k11 - k12) + (k22 - k12), k12, want_dot)

    def _from_gaps(self, k12: Tensor, gap_minus: Tensor, gap_plus: Tensor, want_dot: bool
                   ) -> tuple[Tensor, Tensor | None]:
        """``T = e^{−γ gap_minus}`` and ``Ṫ = 2γ T`` (``gap_minus = k11 + k22 − 2k12``; ``gap_plus`` unused)."""
        nngp = torch.exp(clamp_passing(-self.gamma * gap_minus, max=0))
        return nngp, (2 * self.gamma * nngp if want_dot else None)

    def _state_pair_kernels(self, state: KernelState, want_dot: bool
                            ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None], PairCarry | None]:
        if state.carry is None or self._replaced(Rbf):
            return super()._state_pair_kernels(state, want_dot)
        return _with_carried_pairs(self, state, want_dot, _from_carried_gaps(self._from_gaps, self._carried_after))

    def _carried_after(self, carry: PairCarry, gap: Tensor, gap_plus: Tensor, k11: Tensor, k12: Tensor,
                       k22: Tensor) -> PairCarry:
        """The carry after the layer (``T11 = T22 = 1``, ``T12 = e^{−γ gap}``; the other arguments unused):
        ``g' = 2 − 2T12 = −2 expm1(−γ gap)`` and ``det' = 1 − T12² = −expm1(−2γ gap)``, without the cancellation of
        ``1 − T12`` that loses ``ε/(γ gap)`` of them: where the layers after expand small gaps (chaotic
        ``2σ_w²γ > 1``) that lost every digit (float32 ``Rbf(1)``, ``σ_w² = 2``, inputs 1e-5 from parallel:
        0.12 off at depth 15, of the largest entry)."""
        exponent = clamp_passing(-self.gamma * gap, max=0)
        return PairCarry(carry.index, -torch.expm1(2 * exponent), -2 * torch.expm1(exponent))

    def variance(self, k: Tensor) -> Tensor:
        return torch.ones_like(k)

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = 2γ``."""
        return torch.full_like(k, 2 * self.gamma)

    def mean(self, k: Tensor) -> Tensor:
        return torch.exp(-self.gamma * k)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        """``T − μ1μ2 = e^{−γ(k11 + k22)} expm1(2γ k12)`` where ``|2γ k12| ≤ 1``, without the
        cancellation of the difference at small variances; beyond, the difference loses no digits
        (and the product would be ``0 · inf`` at large variances)."""
        y = 2 * self.gamma * k12
        small = y.abs() <= 1
        near = torch.exp(-self.gamma * (k11 + k22)) * torch.expm1(torch.where(small, y, torch.zeros_like(y)))
        return torch.where(small, near, nngp - self.mean(k11) * self.mean(k22))

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}"


# ---------------------------------------------------------------------------------- Gabor
def _gabor(x: Tensor) -> Tensor:
    return torch.exp(-x * x) * torch.sin(x)


class Gabor(Activation):
    r"""``φ(x) = exp(−x²) sin(x)``, a Gabor wavelet (neural-tangents' ``stax.Gabor``). With
    ``sin u sin v = (cos(u − v) − cos(u + v))/2`` and the Gaussian integral
    ``E[exp(−zᵀz + i aᵀz)] = D^{−1/2} exp(−aᵀΣ(I + 2Σ)⁻¹a/2)`` over ``z = (u, v) ~ N(0, Σ)``, where
    ``D = det(I + 2Σ) = 1 + 2(k11 + k22) + 4(k11 k22 − k12²)``::

        T = D^{−1/2} e^{−g} sinh(h),   g = (k11 + k22 + 4(k11 k22 − k12²))/(2D),   h = k12/D
        Ṫ = D^{−1/2} e^{−g} (4 k12 sinh(h) (D + 1 + k11 + k22) + cosh(h) (D + 8 k12²)) / D²
        E[φ(u)] = 0   (φ is odd)

    ``Ṫ = ∂T/∂k12`` (Price's theorem); both agree with neural-tangents' forms. ``k12 sinh(h) ≥ 0``,
    so ``Ṫ`` is a sum of positive terms and ``T`` has no difference of nearly equal exponentials;
    ``|h| ≤ 1/4`` and ``0 ≤ g ≤ 1/2``. ``k11 k22 − k12²`` is formed without cancellation
    (:func:`~ntkgp.layers.numerics.gaussian_det`) and, where ``k²`` could overflow, in units of each
    pair's larger variance (a power of 4), in which ``D`` and ``1/D`` stay representable. A point with itself
    (``D = 1 + 4k``, ``r = k/D``) has ``T = D^{−1/2} e^{−r} sinh(r)`` and
    ``Ṫ = D^{−1/2} e^{−r}(4r sinh(r)(2/D + 6r) + cosh(r)(1/D + 8r²))``.
    """

    def fn(self, x: Tensor) -> Tensor:
        return _gabor(x)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return _gabor

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        # in units of m = 1/q: 1, or where k² could overflow each pair's power of 4 above its larger
        # variance (one scale for all made 1/m² subnormal beside a variance of 1e38 in float32, and
        # the other pairs lost digits); E = D/m² and q/E = m/D keep every ratio O(1)
        q = self._pair_scale(k11, k22)
        if q is not None:
            k11, k12, k22 = k11 * q, k12 * q, k22 * q
        one = 1.0 if q is None else q
        spread = k11 + k22
        det = gaussian_det(k11, k12, k22)
        e = one * one + 2 * one * spread + 4 * det            # D/m²
        ratio = one / e                                         # m/D
        h = k12 * ratio                                         # k12/D, |h| ≤ 1/4
        g = (one * spread + 4 * det) / e / 2                    # (k11 + k22 + 4 det)/(2D) ≤ 1/2
        # D^{-1/2} e^{-g} = sqrt(1/m) sqrt(m/D) e^{-g} (sqrt(1/m) exact, a power of 2): as one·rsqrt(e) its
        # derivative, e^{-3/2} with e ~ 2/m between a huge and an ordinary input, overflowed float32 from
        # variances of ~1e30, and that pair's inf (times a zero upstream gradient) made every input's
        # gradient NaN. m/D ≥ 1/(16m) (scaled variances below 2), so sqrt(m/D) and its derivative stay in
        # range, where the product 1/m · m/D, ~1/m² for two huge inputs, would underflow
        envelope = (1.0 if q is None else torch.sqrt(cast(Tensor, one))) * torch.sqrt(ratio) * torch.exp(-g)
        nngp = envelope * torch.sinh(h)
        if not want_dot:
            return nngp, None
        growth = 4 * h * (1 + ratio * (one + spread))           # 4k12(D + 1 + k11 + k22)/D²
        bend = ratio * one + 8 * h * h                          # (D + 8k12²)/D² = 1/D + 8h²
        return nngp, envelope * (torch.sinh(h) * growth + torch.cosh(h) * bend)

    @staticmethod
    def _pair_scale(k11: Tensor, k22: Tensor) -> Tensor | None:
        """``4^{−e}``, ``e ≥ 0`` the power of 4 of each pair's larger variance, or ``None`` where
        no product of two variances can overflow."""
        if overflow_scale(k11, k22) is None:
            return None
        e = torch.maximum(power_of_4_exponents(k11), power_of_4_exponents(k22)).clamp(min=0)
        return power_of_2(-2 * e, k11.dtype)

    def variance(self, k: Tensor) -> Tensor:
        _, r, root = self._self_pair(k)
        return root * torch.exp(-r) * torch.sinh(r)

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = D^{−1/2} e^{−r}(4r sinh(r)(2/D + 6r) + cosh(r)(1/D + 8r²))``."""
        inverse, r, root = self._self_pair(k)
        return (root * torch.exp(-r)
                * (4 * r * torch.sinh(r) * (2 * inverse + 6 * r) + torch.cosh(r) * (inverse + 8 * r * r)))

    @staticmethod
    def _self_pair(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``1/D``, ``r = k/D`` and ``D^{−1/2}`` for ``D = 1 + 4k``, finite for variances up to the
        dtype's largest."""
        big = k > 1
        safe = torch.where(big, k, torch.ones_like(k))   # 1/k without 1/0 (nor its infinite derivative)
        inverse = torch.where(big, (1 / safe) / (4 + 1 / safe), 1 / (1 + 4 * k))
        # D^{-1/2} = k^{-1/2} (4 + 1/k)^{-1/2} for big k, not sqrt(1/D): that one's derivative, ~sqrt(k), times
        # the NTK's upstream Θ ~ k overflowed float32 from k ~ 1e26, and times 1/D's derivative (0) made NaN
        root = torch.where(big, torch.rsqrt(safe) * torch.rsqrt(4 + 1 / safe), torch.rsqrt(1 + 4 * k))
        return inverse, torch.where(big, 1 / (4 + 1 / safe), k * inverse), root

    def mean(self, k: Tensor) -> Tensor:
        return torch.zeros_like(k)


# ---------------------------------------------------------------------------------- exponential
def _exp(x: Tensor, a: float, b: float) -> Tensor:
    return a * torch.exp(b * x)


class Exp(Activation):
    r"""``φ(x) = a·exp(b x)`` (neural-tangents' ``stax.Exp``, Han et al. 2022). ``b(u + v)``
    is Gaussian, of mean 0 and variance ``b²(k11 + 2k12 + k22)``, so ``T = a² E[e^{b(u + v)}]`` is::

        T = a² exp(b²(k11 + 2k12 + k22)/2),   Ṫ = b² T,   E[φ(u)] = a exp(b²k/2)

    (normalized by the means, ``T/(μ1μ2) = exp(b²k12)``: the exponential kernel of the
    pre-activations). The centred kernel is ``μ1μ2 expm1(b²k12)``, without the cancellation of
    ``T − μ1μ2`` at small variances. ``T`` grows as ``exp(b²k)``: where it (or ``Ṫ``) overflows the
    dtype a ``ValueError`` says so rather than return ``inf`` (scale the inputs or ``b`` down).
    """

    def __init__(self, a: float = 1.0, b: float = 1.0) -> None:
        super().__init__()
        self.a, self.b = squarable_constants(a=a, b=b)

    def fn(self, x: Tensor) -> Tensor:
        return _exp(x, self.a, self.b)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_exp, a=self.a, b=self.b)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        nngp = self._checked(self.a**2 * torch.exp(self.b**2 * (k11 + 2 * k12 + k22) / 2), k11, k12, k22)
        return nngp, (self._checked(self.b**2 * nngp, k11, k12, k22) if want_dot else None)

    def variance(self, k: Tensor) -> Tensor:
        return self._checked(self.a**2 * torch.exp(2 * self.b**2 * k), k)

    def mean(self, k: Tensor) -> Tensor:
        return self._checked(self.a * torch.exp(self.b**2 / 2 * k), k)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        """``μ1μ2 expm1(b²k12)``, with ``μ1μ2/a² = exp(b²(k11 + k22)/2)`` in two halves (one could
        overflow where the product with ``expm1`` does not), and a ``ValueError`` where the result
        overflows, as ``T``'s and the mean's: near opposite inputs of large variance ``T`` is
        representable but ``T − μ1μ2 ≈ −μ1μ2`` is not, and came back as ``−inf`` (a NaN after
        ``LayerNorm``)."""
        half = torch.exp(self.b**2 * (k11 + k22) / 4)
        return self._checked(self.a**2 * half * (half * torch.expm1(self.b**2 * k12)), k11, k12, k22)

    @staticmethod
    def _checked(value: Tensor, *inputs: Tensor) -> Tensor:
        return refuse_overflow(value, "Exp", "exp(b²k)", inputs)

    def extra_repr(self) -> str:
        return f"a={self.a:g}, b={self.b:g}"


def _gaussian(x: Tensor, a: float, b: float) -> Tensor:
    return a * torch.exp(b * x * x)


class Gaussian(Activation):
    r"""``φ(x) = a·exp(b x²)`` with ``b ≤ 0``, a Gaussian bump of the pre-activation (neural-tangents'
    ``stax.Gaussian``, Han et al. 2022; not the Gaussian hidden units of Williams 1997, radial
    functions ``exp(−‖x − u‖²/(2σ_g²))`` of the input around random centres ``u``, whose kernel
    differs). With ``β = −b``, ``P_i = 1 + 2β k_ii`` and
    ``D = det(I + 2βΣ) = 1 + 2β(k11 + k22) + 4β²(k11 k22 − k12²)``::

        T = a² / sqrt(D),   Ṫ = 4 a² β² k12 / D^{3/2},   E[φ(u)] = a / sqrt(P)

    (``E[e^{−β(u² + v²)}] = det(I + 2βΣ)^{−1/2}``; ``Ṫ`` from the tilted Gaussian's covariance
    ``(Σ⁻¹ + 2βI)⁻¹``, whose off-diagonal entry is ``k12/D``). ``D`` is formed from the
    determinant of ``Σ`` (no cancellation for a point with itself) and of scaled variances where
    ``k²`` could overflow. The centred kernel ``T − μ1μ2 = a² (P1P2)^{−1/2} ((1 − x)^{−1/2} − 1)``,
    ``x = 4β²k12²/(P1P2)``, is taken through ``expm1`` and ``log1p``: both terms are ``≈ a²`` at small
    variances; near ``x = 1`` (nearly parallel points of large variance) through
    ``1 − x = D/(P1P2)``. ``b > 0`` is refused: ``E[φ(u)²]`` is infinite once ``4bk ≥ 1``.
    """

    def __init__(self, a: float = 1.0, b: float = -1.0) -> None:
        super().__init__()
        self.a, self.b = squarable_constants(a=a, b=b)
        if self.b > 0:
            raise ValueError(f"Gaussian needs b ≤ 0 (φ(x) = a·exp(b x²) has no Gaussian second moment once "
                             f"4bk ≥ 1), got b={b!r}.")
        self._beta = -self.b

    def fn(self, x: Tensor) -> Tensor:
        return _gaussian(x, self.a, self.b)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_gaussian, a=self.a, b=self.b)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        beta = self._beta
        c, _, s12, _, det = shifted_det(k11, k12, k22, 2 * beta)
        root = torch.sqrt(det)   # c·sqrt(D)
        inverse = c / root
        nngp = self.a**2 * inverse
        dot = 4 * self.a**2 * beta**2 * (s12 / root) * inverse * inverse if want_dot else None
        return nngp, dot

    # 1 + 4βk and 1 + 2βk as 4(βk + 1/4) and 2(βk + 1/2), whose square roots are taken apart: the sums
    # overflowed float32 from βk ~ 8.5e37 and 1.7e38 (the variance, Ṫ and the mean read 0)
    def variance(self, k: Tensor) -> Tensor:
        return self.a**2 * torch.rsqrt(self._beta * k + 0.25) / 2

    def dot_variance(self, k: Tensor) -> Tensor:
        """``Ṫ(k, k, k) = 4a²β² k / (1 + 4βk)^{3/2}``."""
        beta = self._beta
        root = 2 * torch.sqrt(beta * k + 0.25)   # sqrt(D), D = 1 + 4βk; no k², so no scaling
        inverse = 1 / root
        return 4 * self.a**2 * beta**2 * (k / root) * inverse * inverse

    def mean(self, k: Tensor) -> Tensor:
        return self.a * torch.rsqrt(self._beta * k + 0.5) / math.sqrt(2)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        beta = self._beta
        c, s11, s12, s22, det = shifted_det(k11, k12, k22, 2 * beta)   # det: c²·D
        q11, q22 = c + 2 * beta * s11, c + 2 * beta * s22          # c·P1, c·P2
        r = 2 * beta * s12
        x = (r / q11) * (r / q22)      # < 1: 4β²k12² ≤ 4β²k11k22 < P1P2
        # log(1 − x): log1p(−x) for small x, where T ≈ μ1μ2; near x = 1 (nearly parallel points of large
        # variance) 1 − x = D/(P1P2) from the determinant, as log1p(−x) lost every digit there (inf in float32)
        log_rest = torch.where(x < 0.5, torch.log1p(-x.clamp(max=0.5)), torch.log(det / q11 / q22))
        return self.a**2 * torch.rsqrt(q11 / c) * torch.rsqrt(q22 / c) * torch.expm1(-0.5 * log_rest)

    def extra_repr(self) -> str:
        return f"a={self.a:g}, b={self.b:g}"


# ---------------------------------------------------------------------------------- step
class Sign(Activation):
    r"""``φ(x) = sign(x)`` (a ±1 step). ``sign = 2H − 1`` with the Heaviside step ``H``, whose
    kernel is the arc-cosine kernel of degree 0, ``E[H(u)H(v)] = (π − θ)/(2π)`` (Cho & Saul 2009;
    ``θ`` the angle of the covariance)::

        T = 1 − 2θ/π = (2/π) arcsin(k12 / sqrt(k11 k22)) = (π/2 − θ)/(π/2),   T(k, k, k) = 1[k > 0]
        Ṫ = 0   (φ' = 0 almost everywhere; as in neural-tangents),   E[φ(u)] = 0

    ``T = 0`` when either input has zero variance (``sign(0) = 0``).
    """

    carries_pairs = True

    def fn(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return torch.sign

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        # (π/2 − θ)/(π/2) with π/2 − θ = atan2(k12, s) (gaussian_angle's complement): 1 − 2θ/π
        # vanishes at θ = π/2 and kept θ's absolute rounding, ε/|ρ| relative (2e-7 off at ρ = 1e-9);
        # 0 at a zero variance (atan2(0, 0)), and ±1 exactly at ρ = ±1
        _, complement = gaussian_angle(k11, k12, k22, complement=True)
        nngp = complement / (math.pi / 2)
        return nngp, (torch.zeros_like(nngp) if want_dot else None)

    def _state_pair_kernels(self, state: KernelState, want_dot: bool
                            ) -> tuple[Tensor, Tensor | None, Callable[[], Tensor | None], PairCarry | None]:
        # at the nearly (anti)parallel pairs a first Dense layer carries, the angle from the carried det, and
        # the carry on (ntkgp/layers/near.py's sign_carried): the kernels' own angle is ε/θ off, and each Sign
        # layer takes about a square root of it, so deep networks lost every digit of such pairs
        if state.carry is None or self._replaced(Sign):
            return super()._state_pair_kernels(state, want_dot)
        return _with_carried_pairs(self, state, want_dot, self._at_carried)

    @staticmethod
    def _at_carried(carry: PairCarry, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool
                    ) -> tuple[Tensor, Tensor | None, PairCarry | None]:
        nngp, after = sign_carried(carry, k12)
        return nngp, None, after   # Ṫ = 0 everywhere: the layer's own stands

    def variance(self, k: Tensor) -> Tensor:
        return (k > 0).to(k.dtype)

    def mean(self, k: Tensor) -> Tensor:
        return torch.zeros_like(k)


# ---------------------------------------------------------------------------------- identity
class Identity(Layer):
    """``φ(x) = x``: kernels pass through unchanged (also on raw inputs); neural-tangents'
    ``stax.Identity`` (Novak et al. 2020)."""

    preserves_gaussian = True

    def kernel_map(self, state: KernelState) -> KernelState:
        return state

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        return nn.Identity(), in_width
