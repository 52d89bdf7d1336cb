"""The closed-form activation kernels in float32, and the means and centred kernels in float32 and
float64, to within their condition numbers of rounding (tests/test_accuracy.py's measure).

Each value is compared with a 50-digit mpmath reference (tests/mpmath_kernels.py) at the exact
float32 (float64) inputs, and its error with the inherent error of the function in that dtype,
``ε|f| + Σ_i max_± |f(k ± ε|k_i| e_i) − f(k)|`` with ``ε = 2⁻²³`` (``2⁻⁵²``): the condition from
secants over each input's own rounding in that dtype. Two additions to test_accuracy.py's measure:

* an absolute floor of the dtype's smallest normal number (``1.2e-38`` in float32), so that
  results below it (Rbf and Sin at variances of 50, ``e^{−100}``; monomials at ``1e-19``) may be
  subnormal or 0: a relative measure means nothing there;
* a move that would leave the Gaussian domain (``k12² > k11 k22``) stops at its edge (``k12 =
  ±sqrt(k11 k22)``, or ``k11 = k12²/k22``). At ``ρ = ±1`` with unequal variances whose product is beyond float32
  (``1e12`` and ``1e30``) the float32 inputs are an ulp inside the edge, ``k11 k22 − k12²`` there
  is ``~ε k12²`` and dominates ``det(I + 2Σ)`` (Erf's ``Ṫ``, Gaussian, Gabor); the kernel at the
  edge, which the library returns, is within the inputs' rounding, but the one-sided secant did
  not see it (those points read 451 to 9e9 without the clamp, 1.4 with it).

The grid points are the float32 roundings of test_accuracy.py's (``k12`` rounded towards 0 where
it fell outside the domain), plus variances of ``1e-19`` and ``1e30`` (products beyond float32's
range: the scaled paths) and 50 (underflowing exponentials). Variances at which a kernel
overflows its dtype are skipped where the layer refuses them (``ValueError``) or the reference
itself is beyond the dtype.

Measured over the full grid (``k11, k22 ∈ {1e-30, 1e-19, 1e-12, 1e-6, 1e-3, 0.1, 1, 7.3, 50, 100,
1e3, 1e6, 1e12, 1e18, 1e30}``, ten correlations, the self pairs; the 30 activations of
test_accuracy.py):

* float32 ``T``, ``Ṫ``, ``variance``, ``dot_variance``: at most 1.38 (Gaussian(1.4, −0.6)'s ``Ṫ``);
  no change to the library was needed.
* ``mean`` (``k`` from 0 to ``1e30``): at most 0.96 in float64 (RectifiedMonomial(2)) and 1.15 in
  float32 (Exp(1.3, 0.7)); no change was needed.
* ``centred_pair_kernel`` (``T − μ1μ2``, the covariance that :class:`~ntkgp.layers.LayerNorm`
  normalizes; the centred variance is it at ``(k, k, k)``), with the condition of ``T − μ1μ2``
  itself, over the full grid and, for test_accuracy.py's 45 pairs of variances, 19 more
  correlations around the centred forms' switches (``±0.05`` to ``±0.51``): at most 4.41 in
  float64 (ABReLU(−0.4, 1.3) at ``ρ ≈ −1/3``, where ``Ṫ = ab + (a − b)²(π − θ)/(2π)`` is itself a
  difference, ``−0.52 + 0.57``) and 1.64 in float32. Before the centred forms of ABReLU (and its
  subclasses), GELU and RectifiedMonomial these subtracted
  ``μ1μ2`` from ``T``, which agree at ``ρ = 0`` (independent inputs): the difference kept ``T``'s
  rounding, 1e8 to 2e9 inherent errors at ``ρ = 1e-9`` in either dtype (Abs, whose covariance is
  ``ρ² p/π``: 3e17), and 1e24 (float64) to 1e33 (float32) at ``ρ = 0``, where it is exactly 0.
  RectifiedMonomial's also overflowed float32 for unequal variances (``μ(1e-30) μ(1e30)``: ``−inf``
  for a covariance of 1). Exp's came back ``−inf`` where ``T − μ1μ2`` overflows (``μ1μ2`` beyond the
  dtype at ``ρ ≈ −1``, ``T`` not); it now refuses them, as ``T`` and the mean do.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from mpmath import mpf
from mpmath_kernels import DPS, centred_reference, mean_reference, phi, reference
from test_accuracy import CASES

import ntkgp

EPS = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}
NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
#: float32 ``T``/``Ṫ``: 3× the largest ratio measured over the full grid (1.38)
C_KERNEL = 4.5
#: means: 3× the largest measured (1.15, either dtype)
C_MEAN = 3.5
#: centred kernels: 3× the largest measured (4.41, ABReLU(−0.4, 1.3) at ρ ≈ −1/3 in float64)
C_CENTRED = 13.5

# a subset of the full grid: test_accuracy.py's pairs, and the scaled (1e-19, 1e30) and
# underflowing (50) ones
PAIRS = [(1e-12, 1e-12), (1.0, 1.0), (1e12, 1e12), (1e-3, 7.3), (1.0, 1e6), (1e-12, 1e12), (1e-19, 1e-19),
         (50.0, 50.0), (1e12, 1e30)]
CORRELATIONS = [-1.0, -1 + 1e-12, -0.999999, -0.5, 0.0, 1e-9, 0.3, 0.999999, 1 - 1e-12, 1.0]
SELF = [1e-19, 1e-12, 1e-3, 1.0, 7.3, 50.0, 1e6, 1e12, 1e30]
# the centred kernels cancel near ρ = 0 and at small variances
CENTRED_PAIRS = [(1e-12, 1e-12), (1.0, 1.0), (1e-3, 7.3), (1e12, 1e12), (1e-12, 1e12)]
CENTRED_CORRELATIONS = [-1.0, -0.999999, -0.5, 0.0, 1e-9, 0.3, 1.0]
CENTRED_SELF = [1e-12, 1.0, 7.3, 1e6]
MEANS = [0.0, 1e-30, 1e-12, 1e-3, 1.0, 7.3, 50.0, 100.0, 1e3, 1e6, 1e12, 1e30]


def _round(x: float, dtype: torch.dtype) -> float:
    return float(NUMPY[dtype](x))


def _triples(pairs, correlations, dtype):
    """The grid's ``(k11, k12, k22)`` in ``dtype``, each once; ``k12`` rounded towards 0 where its
    rounding left the domain (``k12² > k11 k22``, unequal variances at ``ρ = ±1``)."""
    points = {}
    for a, b in pairs:
        k11, k22 = _round(a, dtype), _round(b, dtype)
        for rho in correlations:
            k12 = NUMPY[dtype](rho * k11 if k11 == k22 else rho * math.sqrt(k11 * k22))
            while mpf(float(k12)) ** 2 > mpf(k11) * mpf(k22):
                k12 = np.nextafter(k12, NUMPY[dtype](0))
            points[k11, float(k12), k22] = None
    return list(points)


def _ratio(f, k: list, computed: float, idx: int, dtype: torch.dtype) -> float | None:
    """test_accuracy.py's ``_ratio`` in ``dtype``: ``|computed − f|`` over ``ε|f| + Σ_i max_± |f(k ±
    ε|k_i| e_i) − f(k)|``, plus ``10⁻⁴⁰`` of the natural scale and the smallest normal number of
    ``dtype`` (an absolute floor: results below it may be subnormal). ``k`` has 3 entries
    ``(k11, k12, k22)``, whose ``k12`` moves stop at the domain's edge, or 1 (a mean's variance).
    ``None`` where the exact value is beyond ``dtype``."""
    eps, info = EPS[dtype], torch.finfo(dtype)
    base = f(*k)[idx]
    if abs(base) > info.max:
        return None
    bound = eps * abs(base)
    for i in range(len(k)):
        h = eps * abs(k[i])
        if not h:
            continue
        moved = [[*k[:i], k[i] + sign * h, *k[i + 1:]] for sign in (1, -1)]
        if len(k) == 3:   # a move out of the domain stops at its edge, k12² = k11 k22
            edge = mp.sqrt(k[0] * k[2])
            if i == 1:
                moved = [[m[0], max(min(m[1], edge), -edge), m[2]] for m in moved]
            else:
                moved = [[*m[:i], max(m[i], k[1] ** 2 / k[2 - i]), *m[i + 1:]] for m in moved]
        bound += max(abs(f(*m)[idx] - base) for m in moved if (len(k) == 3 and i == 1) or m[i] >= 0)
    scale = mp.sqrt(abs(f(k[0], k[0], k[0])[idx] * f(k[2], k[2], k[2])[idx])) if len(k) == 3 else abs(base)
    bound += mpf(10) ** -40 * scale + mpf(info.tiny)
    error = abs(mpf(computed) - base) if math.isfinite(computed) else mp.inf
    return float(error / bound)


def _tensors(dtype, *values):
    return [torch.tensor([v], dtype=dtype) for v in values]


def _worst(points, evaluate, f, dtype, skip=()) -> tuple[float, str]:
    """The largest ratio over ``points`` (labels and ``k``) of ``evaluate(labels, k)`` (one value a
    label; a ``ValueError`` where the layer refuses), and where."""
    worst, where = 0.0, ""
    with mp.workdps(DPS):
        for label, k in points:
            try:
                values = evaluate(label, k)
            except ValueError:   # overflow refused (Exp, polynomials at large variances)
                continue
            for idx, value in enumerate(values):
                if idx in skip:
                    continue
                r = _ratio(f, [mpf(x) for x in k], float(value), idx, dtype)
                if r is not None and r > worst:
                    worst, where = r, f"{label[idx]} at k = {k}"
    return worst, where


@pytest.mark.parametrize("name", list(CASES))
def test_float32_kernel_is_within_its_condition_number_of_rounding(name):
    """Each activation's float32 ``T`` and ``Ṫ`` (and ``variance``/``dot_variance`` at the self
    pairs) within ``C_KERNEL = 4.5`` float32 inherent errors, over 81 points from ``k = 1e-19`` to
    ``1e30`` (``ρ = ±(1 − 1e-12)`` round to ``±1``). Measured over the full grid (120 pairs of variances,
    960 distinct points, and 15 self pairs; 17 of the 30 have values below float32's smallest normal
    in the subset): at most 1.38 (Gaussian(1.4, −0.6)'s ``Ṫ``), no change to the library needed."""
    worst, where = _kernel_worst(name)
    assert worst <= C_KERNEL, f"{name}: {worst:.3g} inherent errors off, {where}"


def _kernel_worst(name):
    layer, kind, params = CASES[name]
    dtype = torch.float32
    points = [(("T", "Ṫ"), k) for k in _triples(PAIRS, CORRELATIONS, dtype)]
    points += [(("variance", "dot_variance"), (k, k, k)) for k in (_round(x, dtype) for x in SELF)]

    def evaluate(label, k):
        if label[0] == "variance":   # the layer's own closed forms
            kt = _tensors(dtype, k[0])[0]
            return layer.variance(kt), layer.dot_variance(kt)
        return layer.pair_kernel(*_tensors(dtype, *k), True)

    return _worst(points, evaluate, reference(kind, params), dtype, skip=(1,) if kind == "Sign" else ())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_mean_is_within_its_condition_number_of_rounding(name, dtype):
    """``mean(k) = E[φ(u)]`` within ``C_MEAN = 3.5`` inherent errors for ``k`` from 0 to ``1e30``
    (measured: at most 1.15, Hermite(4) in float64 and Exp(1.3, 0.7) in float32)."""
    worst, where = _mean_worst(name, dtype)
    assert worst <= C_MEAN, f"{name}: {worst:.3g} inherent errors off, {where}"


def _mean_worst(name, dtype):
    layer, kind, params = CASES[name]
    m = mean_reference(kind, params)
    points = [(("mean",), (_round(k, dtype),)) for k in MEANS]
    return _worst(points, lambda _, k: [layer.mean(_tensors(dtype, *k)[0])], lambda k: (m(k),), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_centred_kernel_is_within_its_condition_number_of_rounding(name, dtype):
    """``centred_pair_kernel`` (``T − μ1μ2``, given the layer's own ``T``, as ``kernel_map`` does) and
    the centred variance (at ``(k, k, k)`` given ``variance(k)``) within ``C_CENTRED = 13.5``
    inherent errors of ``T − μ1μ2`` itself, over 39 points. Measured over the full grid: at most
    4.41 (ABReLU(−0.4, 1.3) at ``ρ ≈ −1/3``), most below 1.5. Fails on the code before this file
    for the ReLU family, GELU and RectifiedMonomial near ``ρ = 0`` (1e8 to 2e9 at ``ρ = 1e-9``,
    Abs 3e17; 1e24 to 1e33 at ``ρ = 0``)."""
    worst, where = _centred_worst(name, dtype)
    assert worst <= C_CENTRED, f"{name}: {worst:.3g} inherent errors off, {where}"


def _centred_worst(name, dtype):
    layer, kind, params = CASES[name]
    points = [(("T − μ1μ2",), k) for k in _triples(CENTRED_PAIRS, CENTRED_CORRELATIONS, dtype)]
    points += [(("centred variance",), (k, k, k)) for k in (_round(x, dtype) for x in CENTRED_SELF)]

    def evaluate(label, k):
        k11, k12, k22 = _tensors(dtype, *k)
        if label[0] == "centred variance":
            return [layer.centred_pair_kernel(k11, k11, k11, layer.variance(k11))]
        return [layer.centred_pair_kernel(k11, k12, k22, layer.pair_kernel(k11, k12, k22, False)[0])]

    return _worst(points, evaluate, centred_reference(kind, params), dtype)


@pytest.mark.parametrize("name", ["relu", "gelu", "rectified_monomial2"])
def test_centred_kernel_keeps_its_digits_near_independent_inputs(name):
    """``T − μ1μ2`` at ``ρ = 1e-9`` (``k11 = 1e-3``, ``k22 = 7.3``), float64: as the difference it was
    ``ε/ρ`` off, relative (ReLU 2e-8, 1e8 inherent errors); now within 2 ulps, and exactly 0 at
    ``ρ = 0``."""
    layer, kind, params = CASES[name]
    k11, k22 = 1e-3, 7.3
    for k12, tolerance in ((1e-9 * math.sqrt(k11 * k22), 2), (0.0, 0)):
        k = _tensors(torch.float64, k11, k12, k22)
        value = layer.centred_pair_kernel(*k, layer.pair_kernel(*k, False)[0])
        with mp.workdps(DPS):
            exact = centred_reference(kind, params)(mpf(k11), mpf(k12), mpf(k22))[0]
            assert abs(mpf(float(value)) - exact) <= tolerance * EPS[torch.float64] * abs(exact)


def test_exp_centred_kernel_refuses_overflow():
    """Exp's ``T − μ1μ2 ≈ −μ1μ2`` near opposite inputs of large variance is beyond the dtype where
    ``T`` is not: it came back ``−inf`` (NaN after ``LayerNorm``); now a ``ValueError``, as ``T``'s
    and the mean's. Where ``μ1μ2`` alone overflows but the product with ``expm1(b²k12)`` does not
    (float32, ``k = 95``, ``ρ = 1e-7``: ``1.7e36``) it is finite, from two halves of the exponent."""
    exp = ntkgp.Exp()
    k11, k12, k22 = _tensors(torch.float64, 1e3, -1e3, 1e3)
    with pytest.raises(ValueError, match="overflows"):
        exp.centred_pair_kernel(k11, k12, k22, exp.pair_kernel(k11, k12, k22, False)[0])
    k11, k12, k22 = _tensors(torch.float32, 95.0, 9.5e-6, 95.0)
    value = exp.centred_pair_kernel(k11, k12, k22, torch.zeros(1))
    with mp.workdps(DPS):
        exact = centred_reference("Exp", (1.0, 1.0))(*(mpf(float(t)) for t in (k11, k12, k22)))[0]
        assert abs(mpf(float(value)) - exact) <= 200 * EPS[torch.float32] * exact   # cond ≈ b²k = 95


# ------------------------------------------------------------------ the mean references themselves
_MEAN_CHECKED = ["abrelu", "erf_abc", "gelu", "sin_abc", "cos_abc", "rbf_0.3", "gabor", "exp_ab", "gaussian_ab",
                 "sign", "polynomial", "hermite4", "rectified_monomial0", "rectified_monomial3"]


@pytest.mark.parametrize("name", _MEAN_CHECKED)
def test_mean_reference_matches_mpmath_quadrature(name):
    """The mean references against ``mp.quad`` of ``φ(sqrt(k) z) ϕ(z)`` over ``z ∈ [−12, 12]``,
    split at 0 (the kinks), at 30 digits and ``k = 0.7``: agree to 1e-25."""
    _, kind, params = CASES[name]
    with mp.workdps(DPS):
        exact = mean_reference(kind, params)(mpf(0.7))
    with mp.workdps(30):
        g, _ = phi(kind, params)   # its constants (Hermite's, Cos's phase) at 30 digits too
        root = mp.sqrt(mpf(0.7))
        quad = mp.quad(lambda z: g(root * z) * mp.npdf(z), [-12, 0, 12])
        assert abs(exact - quad) <= mpf(10) ** -25 * max(abs(quad), 1), (name, exact, quad)
