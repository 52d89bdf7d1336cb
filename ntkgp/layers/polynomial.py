r"""Polynomial and rectified-monomial activations, whose Gaussian expectations are polynomials in
the kernel entries (times the arc-cosine terms for the rectified ones)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence, Set
from fractions import Fraction

import numpy as np
import torch
from numpy.polynomial import Polynomial as _NumpyPolynomial
from torch import Tensor

from ntkgp._checks import integer_at_least
from ntkgp.layers.activations import Activation, _abrelu
from ntkgp.layers.numerics import _is_compiling, clamp_passing, gaussian_angle, horner, safe_sqrt, transforms_active
from ntkgp.layers.validation import all_finite, finite_constants, has_non_finite, refuse_overflow


def _hermite_coefficients(i: int) -> dict[int, int]:
    """``z^i = Σ_a C(i, a) He_a(z)`` (probabilists' Hermite): ``C(i, a) = i! / (a! m! 2^m)``,
    ``m = (i − a)/2``, for ``a ≡ i (mod 2)``."""
    return {i - 2 * m: math.factorial(i) // (math.factorial(i - 2 * m) * math.factorial(m) * 2**m)
            for m in range(i // 2 + 1)}


def _moment_terms(coefficients: Sequence[float]) -> list[tuple[float, int, int, int]]:
    r"""``E[φ(u)φ(v)]`` for ``φ(x) = Σ_i c_i x^i`` as ``Σ w · k12^a (k11^p k22^q + k11^q k22^p)``:
    the terms ``(w, a, p, q)`` with ``p ≤ q`` (halved where ``p = q``).

    From ``E[He_a(z1) He_b(z2)] = δ_ab a! ρ^a`` for standard normals of correlation ρ (Mehler),
    ``E[u^i v^j] = Σ_a C(i, a) C(j, a) a! k12^a k11^{(i−a)/2} k22^{(j−a)/2}``.
    """
    weights: dict[tuple[int, int, int], Fraction] = {}
    expansions = [_hermite_coefficients(i) for i in range(len(coefficients))]
    for i, ci in enumerate(coefficients):
        for j, cj in enumerate(coefficients):
            if ci == 0 or cj == 0:
                continue
            for a, hi in expansions[i].items():
                hj = expansions[j].get(a)
                if hj is not None:
                    key = (a, (i - a) // 2, (j - a) // 2)
                    term = Fraction(ci) * Fraction(cj) * hi * hj * math.factorial(a)
                    weights[key] = weights.get(key, Fraction(0)) + term
    terms = []
    for (a, p, q), w in sorted(weights.items()):
        if p < q:
            terms.append((float(w), a, p, q))   # (a, q, p) carries the same weight: summed together
        elif p == q:
            terms.append((float(w) / 2, a, p, q))
    return [term for term in terms if term[0] != 0.0]


def _evaluate(terms: list[tuple[float, int, int, int]], k11: Tensor, k12: Tensor, k22: Tensor,
              skip_constant_pairs: bool = False) -> Tensor:
    """``Σ w · k12^a (k11^p k22^q + k11^q k22^p)``, bitwise symmetric in ``k11 ↔ k22``; with
    ``skip_constant_pairs`` the ``a = 0`` terms (``E[φ(u)] E[φ(v)]``) are left out."""
    out = torch.zeros(torch.broadcast_shapes(k11.shape, k12.shape, k22.shape), dtype=k12.dtype, device=k12.device)
    for w, a, p, q in terms:
        if skip_constant_pairs and a == 0:
            continue
        pair = k11**p * k22**q + k11**q * k22**p
        out = out + w * (pair if a == 0 else k12**a * pair)
    return out


def _polynomial(x: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    return horner(x, coefficients)


class Polynomial(Activation):
    r"""``φ(x) = Σ_i c_i x^i`` (neural-tangents' ``stax.Polynomial``;
    Han et al. 2022, *Fast neural kernel embeddings for general activations*, NeurIPS, arXiv:2209.04121).

    Expanding ``x^i = Σ_a C(i, a) He_a(x)`` in Hermite polynomials, ``C(i, a) = i!/(a! m! 2^m)``
    with ``m = (i − a)/2``, and using ``E[He_a(z1) He_b(z2)] = δ_ab a! ρ^a`` (Mehler)::

        T = Σ_ij c_i c_j Σ_a C(i, a) C(j, a) a! k12^a k11^{(i−a)/2} k22^{(j−a)/2}
        Ṫ = T of φ' = Σ_i i c_i x^{i−1},   E[φ(u)] = Σ_{i even} c_i (i − 1)!! k^{i/2}

    a polynomial in the kernel entries, exact (no quadrature), evaluated symmetrically in
    ``k11 ↔ k22``. The ``a = 0`` terms are ``E[φ(u)] E[φ(v)]``: the centred kernel
    (:meth:`centred_pair_kernel`) leaves them out instead of subtracting them.

    Args:
        coefficients: ``c_0, c_1, …``, lowest degree first: a sequence of numbers, a numpy array
            or a 1-D tensor (read as Python floats).
    """

    def __init__(self, coefficients: Sequence[float] | np.ndarray | Tensor) -> None:
        super().__init__()
        if isinstance(coefficients, (Mapping, Set)):   # a dict's keys, or a set in arbitrary order
            raise ValueError(f"Polynomial needs a sequence of coefficients c_0, c_1, ..., got a "
                             f"{type(coefficients).__name__}; for sparse terms write them out, e.g. [0, 0, 1].")
        try:
            coefficients = tuple(coefficients)
        except TypeError:
            raise ValueError(f"Polynomial needs a sequence of coefficients c_0, c_1, ..., got "
                             f"{coefficients!r}.") from None
        if not coefficients:
            raise ValueError("Polynomial needs at least one coefficient.")
        self.coefficients = finite_constants(**{f"c_{i}": c for i, c in enumerate(coefficients)})
        try:
            self._terms = _moment_terms(self.coefficients)
            self._dot_terms = _moment_terms([i * c for i, c in enumerate(self.coefficients)][1:] or [0.0])
        except OverflowError:   # E[u^i v^j] ~ (i!)² c_i c_j beyond a float
            raise ValueError(f"Polynomial: the kernel's coefficients (products c_i c_j i! j! ...) overflow a float "
                             f"for degree {len(self.coefficients) - 1} and coefficients up to "
                             f"{max(map(abs, self.coefficients)):g}.") from None
        self._mean_terms = [(c * math.prod(range(i - 1, 0, -2)), i // 2)
                            for i, c in enumerate(self.coefficients) if i % 2 == 0 and c != 0]

    def fn(self, x: Tensor) -> Tensor:
        return _polynomial(x, self.coefficients)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_polynomial, coefficients=self.coefficients)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        nngp = self._checked(_evaluate(self._terms, k11, k12, k22), k11, k12, k22)
        return nngp, (self._checked(_evaluate(self._dot_terms, k11, k12, k22), k11, k12, k22) if want_dot else None)

    def _checked(self, value: Tensor, *inputs: Tensor) -> Tensor:
        return refuse_overflow(value, type(self).__name__, "a power of the variance", inputs)

    def mean(self, k: Tensor) -> Tensor:
        out = torch.zeros_like(k)
        for c, power in self._mean_terms:
            out = out + c * k**power
        return self._checked(out, k)   # as the kernels: an error, not inf (an exponential's mean raises too)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        return _evaluate(self._terms, k11, k12, k22, skip_constant_pairs=True)

    def extra_repr(self) -> str:
        return f"coefficients={list(self.coefficients)}"


class Monomial(Polynomial):
    r"""``φ(x) = x^n`` (neural-tangents' ``stax.Monomial``, Han et al. 2022): :class:`Polynomial` with one term, e.g.
    ``T = k11 k22 + 2 k12²`` for ``n = 2`` and ``Ṫ = 4 k12``."""

    def __init__(self, degree: int) -> None:
        degree = integer_at_least(degree, 0, "degree")
        super().__init__([0.0] * degree + [1.0])
        self.degree = degree

    def extra_repr(self) -> str:
        return f"degree={self.degree}"


def _normalized_hermite(x: Tensor, degree: int) -> Tensor:
    # h_{k+1} = (x h_k − √k h_{k−1})/√(k + 1), normalized as it goes: He_n itself overflows first
    previous, current = torch.ones_like(x), x
    if degree == 0:
        return previous
    for k in range(1, degree):
        previous, current = current, (x * current - math.sqrt(k) * previous) / math.sqrt(k + 1)
    return current


def _hermite_terms(degree: int) -> list[tuple[float, int, int]]:
    """``(c_m, n − 2m, m)`` with ``c_m = C(n, 2m) C(2m, m)``, ``m = 0 .. n/2``."""
    try:
        return [(float(math.comb(degree, 2 * m) * math.comb(2 * m, m)), degree - 2 * m, m)
                for m in range(degree // 2 + 1)]
    except OverflowError:   # C(n, 2m) C(2m, m) beyond a float
        raise ValueError(f"Hermite: the kernel's coefficients overflow a float at degree {degree}.") from None


class Hermite(Activation):
    r"""``φ(x) = He_n(x)/sqrt(n!)``, the probabilists' Hermite polynomial normalized to
    ``E[φ(z)²] = 1`` for ``z ~ N(0, 1)`` (neural-tangents' ``stax.Hermite``, Han et al. 2022).

    Writing ``u = sqrt(k11) z1`` and expanding ``He_n(γz) = Σ_m n!/(m!(n − 2m)!) γ^{n−2m}
    ((γ² − 1)/2)^m He_{n−2m}(z)`` (the multiplication theorem), Mehler's
    ``E[He_a(z1) He_b(z2)] = δ_ab a! ρ^a`` gives, for any variances::

        T = Σ_{m=0}^{⌊n/2⌋} C(n, 2m) C(2m, m) k12^{n−2m} ((k11 − 1)(k22 − 1)/4)^m
        Ṫ = n · T_{n−1},   E[φ(u)] = sqrt(C(n, n/2)) ((k − 1)/2)^{n/2} for even n (else 0)

    On unit variances (``k11 = k22 = 1``, e.g. after :class:`~ntkgp.layers.LayerNorm` and a
    bias-free ``Dense(weight_var=1)``) every term but the first vanishes exactly: ``T = k12^n`` and
    ``Ṫ = n k12^{n−1}``, neural-tangents' formulas, which assume unit variances for every input.
    Elsewhere these are the exact expectations. The centred kernel leaves out the ``m = n/2``
    term, ``μ1 μ2``. Degrees go to 652, where ``C(n, 2m) C(2m, m)`` still fits a float64 (in
    float32 the sums run in float64 from degree 85).
    """

    def __init__(self, degree: int) -> None:
        super().__init__()
        self.degree = integer_at_least(degree, 0, "degree")
        self._terms = _hermite_terms(self.degree)
        self._dot_terms = _hermite_terms(self.degree - 1) if self.degree else []
        self._mean_scale = math.sqrt(self._terms[-1][0]) if self.degree % 2 == 0 else 0.0
        self._largest_coefficient = max(c for c, _, _ in self._terms)

    def fn(self, x: Tensor) -> Tensor:
        return _normalized_hermite(x, self.degree)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_normalized_hermite, degree=self.degree)

    def _series(self, terms: list[tuple[float, int, int]], k11: Tensor, k12: Tensor, k22: Tensor,
                skip_constant: bool = False) -> Tensor:
        dtype = k12.dtype
        if dtype != torch.float64 and self._largest_coefficient > torch.finfo(dtype).max:
            # C(n, 2m) C(2m, m) beyond float32 (degree ≥ 85) became inf, and inf · 0 NaN where the
            # term vanishes (unit variances): the sum in float64, whose terms are finite
            return self._series(terms, k11.double(), k12.double(), k22.double(), skip_constant).to(dtype)
        g = (k11 - 1) * (k22 - 1) / 4
        out = torch.zeros(torch.broadcast_shapes(k11.shape, k12.shape, k22.shape), dtype=k12.dtype, device=k12.device)
        for c, j, m in terms:
            if skip_constant and j == 0:
                continue
            out = out + c * (k12**j if m == 0 else k12**j * g**m)
        return out

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        nngp = self._checked(self._series(self._terms, k11, k12, k22), k11, k12, k22)
        if not want_dot:
            return nngp, None
        if not self.degree:
            return nngp, torch.zeros_like(nngp)
        return nngp, self._checked(self.degree * self._series(self._dot_terms, k11, k12, k22), k11, k12, k22)

    def mean(self, k: Tensor) -> Tensor:
        if self.degree % 2:
            return torch.zeros_like(k)
        if k.dtype != torch.float64 and self._mean_scale > torch.finfo(k.dtype).max:   # as in _series
            return self.mean(k.double()).to(k.dtype)
        return self._checked(self._mean_scale * ((k - 1) / 2) ** (self.degree // 2), k)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        return self._series(self._terms, k11, k12, k22, skip_constant=True)

    def _checked(self, value: Tensor, *inputs: Tensor) -> Tensor:
        return refuse_overflow(value, "Hermite", "the variance to the degree", inputs)

    def extra_repr(self) -> str:
        return f"degree={self.degree}"


def _arc_cosine_polynomials(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (in ``c = cos θ``, lowest first) of ``A_n`` and ``B_n`` in
    ``J_n(θ) = (π − θ) A_n(c) + sin θ · B_n(c)``, from ``J_{n+1} = (2n + 1) cos θ J_n − sin θ J_n'``:
    ``A_{n+1} = (2n + 1) c A_n + (1 − c²) A_n'``, ``B_{n+1} = 2n c B_n + A_n + (1 − c²) B_n'``."""
    c, one_minus_c2 = _NumpyPolynomial([0, 1]), _NumpyPolynomial([1, 0, -1])
    a, b = _NumpyPolynomial([1]), _NumpyPolynomial([0])
    for m in range(n):
        a, b = (2 * m + 1) * c * a + one_minus_c2 * a.deriv(), 2 * m * c * b + a + one_minus_c2 * b.deriv()
    return a.coef, b.coef


def _arc_cosine_terms(n: int) -> tuple[list[tuple[float, int, int]], list[tuple[float, int, int]]]:
    """``(v, j, p)`` of ``(k11 k22)^{n/2} A_n = Σ v k12^j (k11 k22)^p`` and likewise of
    ``(k11 k22)^{(n−1)/2} B_n`` (``(k11 k22)^{n/2} c^j = k12^j (k11 k22)^{(n − j)/2}``; only
    ``j ≡ n (mod 2)`` appear in ``A_n``, ``j ≢ n`` in ``B_n``)."""
    a, b = _arc_cosine_polynomials(n)
    return ([(float(v), j, (n - j) // 2) for j, v in enumerate(a) if v],
            [(float(v), j, (n - 1 - j) // 2) for j, v in enumerate(b) if v])


def _arc_cosine_sum(terms: tuple[list, list], s: Tensor, supplement: Tensor, k12: Tensor, product: Tensor
                    ) -> Tensor:
    """``((π − θ) Σ_A + s Σ_B)/(2π)`` of :func:`_arc_cosine_terms`, not yet clamped at 0 (:func:`_arc_cosine`)."""
    along = sum(v * k12**j * product**p for v, j, p in terms[0])
    across = sum(v * k12**j * product**p for v, j, p in terms[1]) if terms[1] else 0.0
    return (supplement * along + s * across) / (2 * math.pi)


#: Terms of the series below: ``b_k y^{2k} ≤ b_0 a_k 2^{−k} < b_0 ε/20`` from ``k = 48`` on (``y² ≤ 1/2``).
_ARC_COSINE_SERIES_TERMS = 48


def _arc_cosine_series(n: int) -> list[float]:
    r"""``b_k/π``, ``k < 48``, of ``J_n(θ)/(2π) = (2y²)^n y Σ_k b_k y^{2k} / π`` with ``y = sin((π − θ)/2)``
    and ``b_k = a_k Π_{j=1}^{n} j²/(k + j + 1/2)``, ``a_k = C(2k, k)/(4^k (2k + 1))``.

    ``J̃_n(ρ) = J_n(θ)/(2π) = E[max(z1, 0)^n max(z2, 0)^n]`` at unit variances and correlation
    ``ρ = cos θ`` has ``dJ̃_n/dρ = n² J̃_{n−1}`` (Price's theorem) and ``J̃_n = 0`` at ``ρ = −1``
    (``n ≥ 1``); from ``J̃_0 = (π − θ)/(2π) = arcsin(y)/π = Σ a_k y^{2k+1}/π`` and
    ``1 + ρ = 2y²``, integrating term by term ``n`` times gives the series, of positive terms."""
    out = []
    for k in range(_ARC_COSINE_SERIES_TERMS):
        b = math.comb(2 * k, k) / 4**k / (2 * k + 1) / math.pi
        for j in range(1, n + 1):
            b *= j * j / (k + j + 0.5)
        out.append(b)
    return out


def _arc_cosine(terms: tuple[list, list], s: Tensor, supplement: Tensor, k12: Tensor, product: Tensor,
                series: list[float] | None = None, n: int = 0) -> Tensor:
    """``(k11 k22)^{n/2} J_n(θ) / (2π)`` from :func:`_arc_cosine_terms`, given ``π − θ``.

    Near ``θ = π``, where ``J_n ≈ δ^{2n+1}`` (``δ = π − θ``), the two terms cancel to ``~ε/δ^{2n}``
    of the result, which ``T``'s own conditioning (``~ε/δ²``) does not excuse from degree 2 on
    (degree 2 at a correlation of ``−0.999999``: 3e-4 off, relative; degree 3 at ``−1 + 1e-12``: 0
    for 1e-41). With ``series`` (:func:`_arc_cosine_series`, degree ``n``), where ``y² = sin²(δ/2) ≤
    1/2`` (``k12 ≤ 0``) it is ``(2 p y²)^n y Σ b_k y^{2k}/π``, ``p = sqrt(k11 k22)``, a sum of positive
    terms (``2py² = p + k12``, from the angle: no cancellation either). The switch at ``ρ = 0``, not
    ``−1/2``: the arc-cosine form just above ``ρ = −1/2`` is still 9 (degree 5) to 70 (degree 8)
    inherent errors off; from ``ρ = 0`` up, within 1.2 to degree 12. Degree 1 (ReLU) keeps the
    arc-cosine form: its ``ε/δ²`` is the kernel's own conditioning. Elsewhere the terms are
    clamped at 0, as ``E[φ(u)φ(v)]`` of ``φ ≥ 0`` is (a cancellation could make it negative by an
    ulp of the kernel's scale)."""
    direct = _arc_cosine_sum(terms, s, supplement, k12, product)
    if series is None:
        return clamp_passing(direct, min=0)
    y = torch.sin(supplement / 2)
    y2 = y * y
    near = y2 <= 0.5
    # only where some pair has k12 ≤ 0 (one host synchronization, as GELU's near form); under
    # transforms and compile always, without a branch
    eager = not (transforms_active() or _is_compiling())
    if eager and not bool(near.any()):
        return clamp_passing(direct, min=0)
    if eager and has_non_finite(direct):   # before the clamp, which turns −inf into 0
        # the direct form's terms overflow before T does (S·p^n, T ≪ p^n near θ = π), and where's zero
        # gradient times their inf made the gradient NaN at the near pairs, where that form is discarded
        # (degree 3, float64, k ≈ 2.6e102 at ρ = −0.95: T = 2.9e302, ∂T/∂k NaN): there it is formed at
        # θ = π/2 and unit variances instead. Only then, as the extra nodes change the order in which
        # autograd sums the gradients' parts (by an ulp)
        direct = _arc_cosine_sum(terms, torch.where(near, 1.0, s), torch.where(near, math.pi / 2, supplement),
                                 torch.where(near, 0.0, k12), torch.where(near, 1.0, product))
    direct = clamp_passing(direct, min=0)
    y2 = torch.where(near, y2, 0.5)   # the series where it converges (its gradient too)
    near_value = (2 * safe_sqrt(product) * y2) ** n * y * horner(y2, series)
    return torch.where(near, near_value, direct)


#: Terms of the series below: at ``|ρ| ≤ 1/(n + 1)`` (``1/2`` for ``n ≤ 1``) the rest is below ``2^{−53}``
#: of the sum, to degree 150 (against 400 terms).
_CENTRED_SERIES_TERMS = 64


def _centred_series(n: int) -> list[float]:
    r"""``c_j``, ``j = 1 .. 64``, of the centred arc-cosine kernel at unit variances,
    ``J̃_n(ρ) − J̃_n(0) = Σ_{j≥1} c_j ρ^j`` (Mehler: ``c_j = h_j²/j!``, ``h_j = E[max(z, 0)^n He_j(z)]``,
    all ``c_j ≥ 0``), exact fractions rounded once (``π`` aside).

    ``h_j = E[φ^{(j)}(z)]`` (Gaussian integration by parts): ``n!/(n − j)! · m_{n−j}`` for ``j ≤ n``,
    ``m_i = E[max(z, 0)^i]``, with ``m_i² = ((i − 1)!!)²/4`` (``i`` even) or ``2^i ((i−1)/2)!²/(4π)``
    (``i`` odd); beyond, ``φ^{(n)} = n! H(z)`` and ``E[δ^{(i)}(z)] = He_i(0)/sqrt(2π)``, so
    ``h_{n+1+i}² = n!² ((i − 1)!!)²/(2π)`` for even ``i`` and 0 for odd."""
    out = []
    for j in range(1, _CENTRED_SERIES_TERMS + 1):
        if j <= n:
            i = n - j
            square = Fraction(math.factorial(n) // math.factorial(i)) ** 2
            if i % 2:
                square, over_pi = square * 2**i * math.factorial((i - 1) // 2) ** 2 / 4, True
            else:
                square, over_pi = square * math.prod(range(i - 1, 0, -2)) ** 2 / 4, False
        else:
            i = j - n - 1
            if i % 2:
                out.append(0.0)
                continue
            square, over_pi = Fraction(math.factorial(n) * math.prod(range(i - 1, 0, -2))) ** 2 / 2, True
        value = float(square / math.factorial(j))
        out.append(value / math.pi if over_pi else value)
    return out


def _split_centred_series(n: int, reach: float) -> tuple[list[float], list[float]]:
    """:func:`_centred_series` as ``Σ_{j ≤ n} c_j ρ^j = ρ Σ head_j ρ^j`` and ``ρ^{n+1} Σ_m tail_m ρ^{2m}``
    (beyond ``j = n`` every other ``c_j`` is 0), cut where the rest at ``|ρ| = reach`` is below ``2^{−54}``
    of ``c_1 ρ``, the sum's size there: 40 terms for degree 1 (21 not 0), 23 for degree 2, 13 to 17
    from degree 5 up, where Horner's rule over all 64 took 128 passes over the pairs."""
    c = _centred_series(n)
    cut = next((j for j in range(len(c)) if sum(c[i] * reach ** i for i in range(j, len(c))) < 2.0**-54 * c[0]),
               len(c))
    return c[:min(n, cut)], c[n:cut:2]


def _log_size(terms: tuple[list, list], factor: int) -> float:
    """``log(factor · (π Σ|v_A| + Σ|v_B|))`` over :func:`_arc_cosine_terms`' terms, summed in logarithms
    (the sum overflows a float from degree ~140, where each coefficient does not)."""
    logs = [math.log(math.pi * abs(v)) for v, _, _ in terms[0]] + [math.log(abs(v)) for v, _, _ in terms[1]]
    top = max(logs)
    return math.log(factor) + top + math.log(math.fsum(math.exp(x - top) for x in logs))


def _log_sizes(terms: tuple[list, list], dot_terms: tuple[list, list] | None, n: int) -> list[tuple[float, int]]:
    """``(log S, d)`` of ``T`` (degree ``d = n``) and of ``Ṫ`` (``n²`` times its terms, ``d = n − 1``), for
    :meth:`RectifiedMonomial._reach`; none of degree 0 (those terms do not grow)."""
    return [(_log_size(t, factor), degree) for t, degree, factor in ((terms, n, 1), (dot_terms, n - 1, n * n))
            if t is not None and degree]


def _unscaled(value: Tensor, c: Tensor | None, degree: int) -> Tensor:
    """``value / c^degree`` for a kernel homogeneous of ``degree`` evaluated at ``c·k``: one division by the
    power of 4 ``c`` at a time (exact), as ``c^degree`` itself may overflow where the result does not."""
    if c is not None:
        for _ in range(degree):
            value = value / c
    return value


def _rectified_monomial(x: Tensor, degree: int) -> Tensor:
    if degree == 0:
        return (torch.sign(x) + 1) / 2   # H(0) = 1/2, as the kernel's θ = π/2 at zero variance
    if degree == 1:
        return _abrelu(x, 0.0, 1.0)
    return torch.relu(x) ** degree


class RectifiedMonomial(Activation):
    r"""``φ(x) = max(x, 0)^n``: the arc-cosine kernel of degree ``n`` (Cho & Saul 2009;
    neural-tangents' ``stax.RectifiedMonomial``). With ``s = sqrt(k11 k22 − k12²)``,
    ``θ = atan2(s, k12)``::

        T = (k11 k22)^{n/2} J_n(θ) / (2π),   J_n(θ) = (π − θ) A_n(cos θ) + sin θ · B_n(cos θ)
        Ṫ = n² T_{n−1}   (n ≥ 1; 0 for the step n = 0, its derivative being 0 almost everywhere)
        E[φ(u)] = k^{n/2} 2^{n/2} Γ((n + 1)/2) / (2 sqrt(π)),   T(k, k, k) = (2n − 1)!! k^n / 2

    with ``J_{n+1} = (2n + 1) cos θ J_n − sin θ J_n'`` from Cho & Saul's
    ``J_n = (−1)^n sin^{2n+1}θ ((1/sin θ) ∂/∂θ)^n ((π − θ)/sin θ)``, starting at ``J_0 = π − θ``
    (``n = 1`` is :class:`ReLU`). ``(k11 k22)^{n/2} A_n`` and ``(k11 k22)^{n/2} sin θ B_n`` are
    polynomials in ``k12``, ``k11 k22`` and ``s``. The step ``n = 0`` is ``1/2`` at 0, which the
    kernel's ``θ = π/2`` at zero variance stands for (``T = 1/4``). For ``k12 ≤ 0``, where the two
    terms of ``J_n`` cancel (to ``ε/δ^{2n}`` of ``T`` near ``θ = π``, ``δ = π − θ``), ``T`` is summed from
    its series in ``sin²(δ/2)`` instead from degree 2 on (:func:`_arc_cosine`).
    """

    def __init__(self, degree: int) -> None:
        super().__init__()
        self.degree = integer_at_least(degree, 0, "degree")
        n = self.degree
        try:
            with np.errstate(over="raise", invalid="raise"):   # numpy's inf coefficients: FloatingPointError
                self._terms = _arc_cosine_terms(n)
                self._dot_terms = _arc_cosine_terms(n - 1) if n >= 1 else None
            self._log_sizes = _log_sizes(self._terms, self._dot_terms, n)
            # for k12 ≤ 0, from degree 2 (J_0 = π − θ has no cancellation, and J_1's, ε/δ², is ReLU's own
            # conditioning: the arc-cosine form stays, as in ReLU)
            self._series = _arc_cosine_series(n) if n >= 2 else None
            self._dot_series = _arc_cosine_series(n - 1) if n >= 3 else None
            self._centred_reach = 1 / (max(n, 1) + 1)   # of the series, in |ρ| (centred_pair_kernel)
            self._centred_head, self._centred_tail = _split_centred_series(n, self._centred_reach)
            self._mean = 2 ** (n / 2) * math.gamma((n + 1) / 2) / (2 * math.sqrt(math.pi))
            self._variance = math.prod(range(2 * n - 1, 0, -2)) / 2
        except (OverflowError, FloatingPointError):   # inf coefficients or T(k, k, k) (n ≥ 151), or "math range error"
            raise ValueError(f"RectifiedMonomial: the coefficients of the degree-{n} arc-cosine kernel ((2n − 1)!! "
                             "and the like) overflow a float; the largest degree whose coefficients are finite "
                             "is 150.") from None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # a layer pickled before _log_sizes existed (torch.save of a network): _rescue_scale's
        # "'RectifiedMonomial' object has no attribute '_log_sizes'" where its terms overflowed
        if "_log_sizes" not in self.__dict__:
            self.__dict__["_log_sizes"] = _log_sizes(self._terms, self._dot_terms, self.degree)

    def fn(self, x: Tensor) -> Tensor:
        return _rectified_monomial(x, self.degree)

    def finite_fn(self) -> Callable[[Tensor], Tensor]:
        return functools.partial(_rectified_monomial, degree=self.degree)

    def pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        nngp, dot = self._kernels(k11, k12, k22, want_dot, None)
        c = self._rescue_scale(k11, k12, k22, nngp, dot)
        if c is not None:   # some pair's terms overflowed: those pairs again, scaled
            nngp, dot = self._kernels(k11, k12, k22, want_dot, c)
        return self._checked(nngp, k11, k12, k22), (None if dot is None else self._checked(dot, k11, k12, k22))

    def _kernels(self, k11: Tensor, k12: Tensor, k22: Tensor, want_dot: bool, c: Tensor | None
                 ) -> tuple[Tensor, Tensor | None]:
        """``T`` and ``Ṫ``, homogeneous of degrees ``n`` and ``n − 1`` in ``(k11, k12, k22)``: with ``c`` (a power
        of 4 per pair, :meth:`_rescue_scale`) evaluated at ``c·k`` and divided by ``c`` as often."""
        if c is not None:
            k11, k12, k22 = k11 * c, k12 * c, k22 * c
        # steep from degree 2: the gradient reaching the angle grows as k^n (inf in float32 from k ≈ 4e9, n = 3)
        s, supplement = gaussian_angle(k11, k12, k22, supplement=True, steep=self.degree >= 2)
        product = k11 * k22
        n = self.degree
        nngp = _unscaled(_arc_cosine(self._terms, s, supplement, k12, product, self._series, n), c, n)
        dot = None
        if want_dot:
            dot = (torch.zeros_like(nngp) if self._dot_terms is None else _unscaled(
                n**2 * _arc_cosine(self._dot_terms, s, supplement, k12, product, self._dot_series, n - 1), c, n - 1))
        return nngp, dot

    def _rescue_scale(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor, dot: Tensor | None
                      ) -> Tensor | None:
        """``None``, or where a pair of finite kernels gave a non-finite ``T`` or ``Ṫ``, a power of 4 per
        pair: ``4^{−e}``, ``e`` the least with ``4^{−e} sqrt(k11 k22)`` at most :meth:`_reach`, at those pairs
        and 1 (their bits kept) elsewhere. The arc-cosine terms and their sums grow to ``S·sqrt(k11 k22)^n``
        before ``(π − θ)`` and ``s`` cancel them down to ``T``: ``RectifiedMonomial(1)`` refused its
        ``T ≤ k/2`` in float32 from ``k ≈ 1.1e38`` (``(π − θ)·k12 + s``, up to ``π k``, passed the largest
        float). Only there, not for every pair above the reach: a scaled pair's small terms underflow
        (degree 150 at unit variances and ``ρ = −0.99``, where ``T`` is 9e-41, would read 0). Not under
        ``torch.compile`` or functorch transforms, which skip the overflow check as well."""
        if transforms_active() or _is_compiling() or not self.degree:
            return None
        if not (has_non_finite(nngp) or (dot is not None and has_non_finite(dot))) or not all(
                all_finite(t) for t in (k11, k12, k22)):
            return None
        overflowed = ~torch.isfinite(nngp.detach())
        if dot is not None:
            overflowed = overflowed | ~torch.isfinite(dot.detach())
        reach = self._reach(nngp.dtype)
        p = (safe_sqrt(k11.detach()) * safe_sqrt(k22.detach())).expand_as(overflowed)   # sqrt(k11 k22) overflows first
        # as numerics.scaled_for_products: a logarithm rounded the wrong way leaves c·p below 4·reach
        c = torch.pow(4.0, -torch.ceil(torch.log(p.clamp(min=reach) / reach) / math.log(4.0)))
        return torch.where(overflowed, c, torch.ones_like(c))

    def _reach(self, dtype: torch.dtype) -> float:
        """The largest ``sqrt(k11 k22)`` whose arc-cosine terms cannot overflow ``dtype``:
        ``(max/(64 S))^{1/d}``, ``S`` the sum of the coefficients' sizes (``π`` times those of ``π − θ``)
        of ``T`` (``d = n``) and of ``Ṫ`` (``d = n − 1``), the 64 for the logarithm's rounding and the
        partial sums'."""
        top = math.log(torch.finfo(dtype).max / 64)
        return math.exp(min((top - log_size) / degree for log_size, degree in self._log_sizes))

    def variance(self, k: Tensor) -> Tensor:
        if self.degree == 0:
            return torch.where(k > 0, 0.5, 0.25).to(k.dtype)   # H(0)² = 1/4 at zero variance
        return self._checked(self._variance * k**self.degree, k)

    def _checked(self, value: Tensor, *inputs: Tensor) -> Tensor:
        return refuse_overflow(value, "RectifiedMonomial", f"k^{self.degree}", inputs)

    def mean(self, k: Tensor) -> Tensor:
        if self.degree == 0:
            return torch.full_like(k, 0.5)
        return self._checked(self._mean * safe_sqrt(k) ** self.degree, k)

    def centred_pair_kernel(self, k11: Tensor, k12: Tensor, k22: Tensor, nngp: Tensor) -> Tensor:
        """``T − μ1μ2``; for ``|ρ| ≤ 1/(n + 1)`` (``1/2`` for ``n = 1``) as ``p^n Σ_{j≥1} c_j ρ^j``
        (:func:`_centred_series`, ``p = sqrt(k11 k22)``, ``ρ = k12/p``). ``T − μ1μ2`` vanishes at ``ρ = 0``
        (independent inputs), and as a difference kept ``T``'s rounding, ``ε/|ρ|`` of the result (1e8
        inherent errors at ``ρ = 1e-9``). The series' terms are positive for ``ρ > 0``; for ``ρ < 0``
        they alternate, and the reach ``1/(n + 1)`` bounds their cancellation (the sum of their sizes
        over the sum) by 2.7 to degree 150 (at ``ρ = −1/2`` it is 31 for degree 8, 4e3 for 20), where
        the difference beyond loses at most 2.2 (3.2 for ``n = 1`` at ``ρ = 1/2``); the terms kept leave
        less than ``2^{-54}`` of the sum there (:func:`_split_centred_series`). The step's is
        ``arcsin(ρ)/(2π)`` (:func:`gaussian_angle`'s complement) everywhere, 0 where a variance is 0
        (``φ`` constant). Where the result overflows (``−μ1μ2`` near opposite inputs) a ``ValueError``,
        as ``T``'s, not ``−inf``."""
        if not self.degree:
            return gaussian_angle(k11, k12, k22, complement=True)[1] / (2 * math.pi)
        p = safe_sqrt(k11) * safe_sqrt(k22)
        small = k12.abs() <= self._centred_reach * p
        rho = torch.where(small, k12 / torch.where(small & (p > 0), p, torch.ones_like(p)), torch.zeros_like(k12))
        head, tail = self._centred_head, self._centred_tail
        near = rho * horner(rho, head)
        if tail:
            near = near + rho ** (len(head) + 1) * horner(rho * rho, tail)
        # μ1μ2 = μ(1)² p^n: μ(k11) μ(k22) overflowed float32 for unequal variances where the product
        # does not (k11 = 1e-30, k22 = 1e30: inf · 1e-45, −inf for a covariance of 1)
        scale = p**self.degree
        return self._checked(torch.where(small, scale * near, nngp - self._mean**2 * scale), k11, k12, k22)

    def extra_repr(self) -> str:
        return f"degree={self.degree}"
