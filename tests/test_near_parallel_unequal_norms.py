"""The first ``Dense`` layer's carried angle at nearly parallel and antiparallel inputs of unequal norms,
``x' = ±t·x + δ``, against 60-digit references from the exact float inputs (ntkgp/layers/near.py).

The carry takes ``|x|²|x'|² sin²α`` as the Gram determinant of ``x`` and ``e = x' ∓ q·x``. With ``q = 1``,
``e ≈ (t ∓ 1)·x`` is exact only for ``t ∈ [1/2, 2]`` (Sterbenz); at ``t = 1e-3`` it kept its rounding, ``ε|x|``,
and the angle was ``ε/t`` off absolutely, no better than the kernels' own, and ``fl(1e-3·x)`` (a rounded
multiple, counted as parallel) read at an angle of ~1250 ε. ``q`` is now the power of two nearest
``|x'|/|x|`` outside ``[1/2, 2]``.

The inputs fix the angle only to ``~ε`` absolutely (a relative change ``ε`` of an entry turns ``x'`` through
up to ``ε``), so the unit here is an angle ``ε`` off: ``2ε/π`` of ``Sign``'s ``T = 1 − 2θ/π``, and of the NTK of
``Dense → ReLU → Dense`` (``Θ = w T + w k12 Ṫ``, ``Ṫ = (π − θ)/(2π)``) ``ε w Σ|x_i x'_i|/d / (2π)``, plus
``ε`` times the magnitude of its terms. Measured maxima (2026-12-05) over ``t ∈ {1e-3, 0.3, 3, 1e4}``, both
orders of each pair, parallel and antiparallel, ``d = 3``: ``Sign`` 1.03 / 0.52 (float64 / float32; rounding
``T ≈ 1`` alone costs ``π/4``), ReLU 0.42 / 0.34; before, ``Sign`` 4248 / 5070 and ReLU 2981 / 5070 (at ratios
of norms ``1e-3`` and ``1e-4``; ``0.3`` to ``1e4`` were already within 1.1). The bound, 4.
"""

from __future__ import annotations

import mpmath as mp
import pytest
import torch
from mpmath import mpf
from mpmath_kernels import dense_pair, reference

from ntkgp.layers import Dense, Rbf, ReLU, Sign, serial

UNITS = 4
WEIGHT_VAR = 2.0


def _pairs(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, ±t·x + δ)`` at angles of about 1e-5 and in both orders (the carry takes ``q`` from the second
    input's norm over the first's), for ``t`` from 1e-3 to 1e4."""
    g = torch.Generator().manual_seed(51)
    pairs = []
    for t in (1e-3, 0.3, 3.0, 1e4):
        x = torch.randn(3, generator=g, dtype=torch.float64)
        step = torch.randn(3, generator=g, dtype=torch.float64)
        step = 1e-5 * t * x.norm() / step.norm() * step
        for sign in (1.0, -1.0):
            y = sign * t * x + step
            pairs += [(x, y), (y, x)]
    return [(a.to(dtype), b.to(dtype)) for a, b in pairs]


def _reference(kind: str, x: torch.Tensor, y: torch.Tensor):
    """``Sign``'s ``T`` with the unit ``2/π`` (an angle 1 off), or the NTK of ``Dense → ReLU → Dense`` with the
    magnitude of its terms plus ``w Σ|x_i y_i|/d / (2π)``, at 60 digits from the exact float inputs."""
    with mp.workdps(60):
        xs, ys = [mpf(float(v)) for v in x], [mpf(float(v)) for v in y]
        if kind == "Sign":
            k11, k12, k22, _ = dense_pair(xs, ys, 1, 0)
            return reference("Sign", ())(k11, k12, k22)[0], 2 / mp.pi
        w = mpf(WEIGHT_VAR)
        k11, k12, k22, size = dense_pair(xs, ys, w, 0)
        t, dot = reference("ABReLU", (0.0, 1.0))(k11, k12, k22)
        return w * t + w * k12 * dot, w * abs(t) + w * size * (abs(dot) + 1 / (2 * mp.pi))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["Sign", "ReLU"])
def test_unequal_norms_to_an_angle_of_a_few_ulps(dtype, kind):
    net = (serial(Dense(2, 1.0), Sign()) if kind == "Sign"
           else serial(Dense(8, WEIGHT_VAR), ReLU(), Dense(1, WEIGHT_VAR))).to(dtype)
    eps = torch.finfo(dtype).eps
    worst = 0.0
    for x, y in _pairs(dtype):
        kernels = net.kernel(torch.stack([x, y]))
        got = (kernels.nngp if kind == "Sign" else kernels.ntk)[0, 1].detach()
        value, unit = _reference(kind, x, y)
        worst = max(worst, float(abs(mpf(float(got)) - value) / unit) / eps)
    assert worst < UNITS, worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rounded_multiples_of_unequal_norms_count_as_parallel(dtype):
    """``x' = fl(c·x)`` is at an angle below ``ε/2`` from ``±x``; the carry counts it as parallel
    (antiparallel), ``T = ±1`` exactly, as the kernels' own angle does. With ``e = x' ∓ x`` the angle of
    ``c = 1e-3`` read up to ~1250 ε (``1 − |T|`` 799 ε), past the ``2ε`` below which it counts as parallel."""
    net = serial(Dense(2, 1.0), Sign()).to(dtype)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        x = torch.randn(3, generator=g, dtype=torch.float64).to(dtype)
        for c in (1e-3, -1e-3, 0.3, 3.0, 1e4, -1e4):
            k = net.kernel(torch.stack([x, c * x])).nngp.detach()
            assert float(k[0, 1]) == (1.0 if c > 0 else -1.0), (x, c)


def test_input_gradients_of_pairs_of_unequal_norms():
    """The power of two is a constant of each pair (the Gram determinant of ``x`` and ``x' ∓ q·x`` is the same
    for every ``q``): derivatives in both inputs through the carried values agree with finite differences."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x[1] = 1e-3 * x[0] + 1e-6 * torch.randn(3, generator=g, dtype=torch.float64)
    x[2] = -1e4 * x[0] + 1e-1 * torch.randn(3, generator=g, dtype=torch.float64)
    net = serial(Dense(8, WEIGHT_VAR, 0.1), ReLU(), Dense(8, WEIGHT_VAR, 0.1), Sign(), Dense(1, WEIGHT_VAR)).double()

    def kernels(a):
        out = net.kernel(a, x[:3])
        return out.nngp, out.ntk

    assert torch.autograd.gradcheck(kernels, (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_distance_of_parallel_pairs_of_unequal_norms(dtype):
    """``g = w |x − x'|²`` of nearly parallel pairs whose norms are more than a factor 2 apart, through ``Rbf``
    (``T = exp(−γ w |x − x'|²)``, ``γ w |x − x'|² = 1`` here: its relative error is ``g``'s), against 60 digits.
    ``|x − x'|²`` as ``|x|² + |x'|² − 2x·x'`` cancels up to 9× the rounding of three sums of ``d`` products:
    measured (2026-12-05, ``d = 100``) 14.4 / 10.0 ε (float64 / float32); from the difference ``x' − x`` itself
    1.43 / 1.15 ε. The bound, 4."""
    eps = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for _ in range(10):
        for t in (0.3, 0.49, 2.1, 3.0):
            x = torch.randn(100, generator=g, dtype=torch.float64)
            step = torch.randn(100, generator=g, dtype=torch.float64)
            y = (t * x + 1e-5 * t * x.norm() / step.norm() * step).to(dtype)
            x = x.to(dtype)
            distance = float(torch.sum((x.double() - y.double()) ** 2)) / 100
            net = serial(Dense(1, 1.0), Rbf(1.0 / distance)).to(dtype)
            got = float(net.kernel(torch.stack([x, y])).nngp[0, 1].detach())
            with mp.workdps(60):
                exact = sum((mpf(float(a)) - mpf(float(b))) ** 2 for a, b in zip(x, y, strict=True)) / 100
                value = mp.exp(-mpf(1.0 / distance) * exact)
            worst = max(worst, float(abs(mpf(got) - value) / value) / eps)
    assert worst < UNITS, worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multiples_of_many_entries_count_as_parallel(dtype):
    """``x' = c·x`` of 1000 entries, exact for ``c = ±1/2, ±2``: ``T = ±1`` exactly and a zero derivative (the
    mean of the one-sided slopes at the kink). Kahan's ``sin β`` took ``x̂`` from the Gram entry ``|x|²`` (summed
    in another order than ``|e|²``): ``ê = ±x̂`` was off in its last bits, 16 of 120 pairs ``(x, c x)`` (float64; 8
    in float32) read 1.5–3 ε from parallel, their derivatives ``|∂T/∂x| |x|`` up to 0.22 instead of 0."""
    net = serial(Dense(2, 1.0), Sign()).to(dtype)
    g = torch.Generator().manual_seed(3)
    multiples = torch.tensor([1.0, 0.5, 2.0, -0.5, -2.0, 0.7, 1.5], dtype=dtype)
    signs = torch.outer(multiples.sign(), multiples.sign())
    for _ in range(20):   # every pair of the seven multiples of x in one kernel, 21 pairs a draw
        x = torch.randn(1000, generator=g, dtype=torch.float64).to(dtype)
        points = (multiples.unsqueeze(-1) * x).requires_grad_(True)
        k = net.kernel(points).nngp
        (grad,) = torch.autograd.grad(k.sum(), points)
        assert torch.equal(k.detach(), signs)
        assert float(grad.abs().max()) == 0.0
