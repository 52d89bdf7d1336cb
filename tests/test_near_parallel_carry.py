"""Kernels of ``Sin``, ``Cos``, ``Rbf`` and ``Sign`` networks at nearly parallel and antiparallel inputs,
against 60-digit recursions of the network from the exact float inputs (the carry of
ntkgp/layers/near.py beyond the ReLU family; tests/test_near_parallel.py has the ReLU family's).

These kernels depend on ``E|u1 ∓ u2|² = k11 + k22 ∓ 2k12`` through ``e^{−b²(k11 + k22 ∓ 2k12)/2}``. From the
rounded kernels each gap keeps ``k12``'s rounding, ``ε k`` absolute: at inputs of scale 1e3 a unit apart
(``k ≈ 1e6``, a gap of order one) float32 ``Sin`` kernels were 0.14 off (of the largest entry) where the
inputs' own rounding moves them by 4e-5. The first ``Dense`` layer's carried ``g`` and ``det``
(ntkgp/layers/near.py) now give both gaps (``carried_gaps``).

Errors are in units of ``ε`` times the magnitude of the recursion's terms (an exponent from the inputs
costs ``ε |X|`` of its ``e^X`` at the least) plus the inputs' own condition, ``Σ_i |∂K/∂x_i| |x_i|``, with
the dtype's smallest normal number as an absolute floor. Measured maxima (2026-12-05) over the pairs below
(``d = 1`` and ``3``, with and without bias, ``Sin``, ``Cos``, ``Rbf``): 0.10 (float64) and 0.18 (float32);
before, 1.66e3 and 455. The bound, 8, leaves room for another platform's ``exp`` and sums.
"""

from __future__ import annotations

import math
import random

import mpmath as mp
import pytest
import torch
from mpmath import mpf
from mpmath_kernels import dense_pair

from ntkgp.layers import Cos, Dense, Rbf, ReLU, Sign, Sin, serial
from ntkgp.layers.near import PairCarry

ULPS = 8
WEIGHT_VAR, BIAS_VAR = 1.0, 0.5
ACTIVATIONS = {"Sin": (Sin, (1.0, 1.0, 0.3)), "Cos": (Cos, (0.7, 0.5, 0.2)), "Rbf": (Rbf, (0.5,))}


def _pairs(d: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs of scale 1e3 at distances 0.3 to 3, nearly parallel and nearly antiparallel."""
    g = torch.Generator().manual_seed(10 + d)
    pairs = []
    for distance in (0.3, 1.0, 3.0):
        x = 1e3 * torch.randn(d, generator=g, dtype=torch.float64)
        e = torch.randn(d, generator=g, dtype=torch.float64)
        step = distance * e / e.norm()
        pairs += [(x, x + step), (x, -x + step)]
    return [(a.to(dtype), b.to(dtype)) for a, b in pairs]


def _terms(kind: str, params: tuple, k11, k12, k22):
    """``T``, ``Ṫ`` at 60 digits, and the magnitudes their rounding is measured against."""
    if kind == "Rbf":
        a2, b2, cos2c = mpf(2), 2 * mpf(params[0]), mpf(0)
    else:
        a, b, c = (mpf(p) for p in params)
        a2, b2, cos2c = a * a, b * b, mp.cos(2 * (c + (mp.pi / 2 if kind == "Cos" else 0)))
    big_a = -b2 * (k11 + k22 - 2 * k12) / 2
    big_b = -b2 * (k11 + k22 + 2 * k12) / 2
    plus, minus = mp.exp(big_a), mp.exp(big_b)
    size = a2 / 2 * (plus * (1 + abs(big_a)) + abs(cos2c) * minus * (1 + abs(big_b)))
    return a2 / 2 * (plus - cos2c * minus), a2 * b2 / 2 * (plus + cos2c * minus), size, b2 * size


def _kernels(kind: str, params: tuple, xs: list, ys: list, bias: float | None):
    """NNGP and NTK of ``Dense → activation → Dense`` (NTK parameterization) at the working precision,
    each with the magnitude of its terms."""
    w, c = mpf(WEIGHT_VAR), mpf(0) if bias is None else mpf(bias)
    k11, k12, k22, ntk_size = dense_pair(xs, ys, w, c)
    t, dot, t_size, dot_size = _terms(kind, params, k11, k12, k22)
    nngp = w * t + c
    return (nngp, w * t_size + c), (nngp + w * k12 * dot, w * t_size + c + w * ntk_size * dot_size)


def _reference(kind: str, params: tuple, x: torch.Tensor, y: torch.Tensor, bias: float | None):
    """:func:`_kernels` at 60 digits from the exact float inputs, each magnitude plus the inputs' own
    condition, ``Σ_i |∂K/∂x_i| |x_i|`` over both inputs (by central differences at 60 digits, steps of
    1e-25 of each entry): a gap from inputs of scale 1e3 a unit apart is itself conditioned to ``1e3 ε``."""
    with mp.workdps(60):
        xs, ys = [mpf(float(v)) for v in x], [mpf(float(v)) for v in y]
        base = _kernels(kind, params, xs, ys, bias)
        condition = [mpf(0), mpf(0)]
        entries = [(0, i) for i in range(len(xs))] + [(1, i) for i in range(len(ys))]
        for which, i in entries:
            pair = [list(xs), list(ys)]
            h = abs(pair[which][i]) * mpf(10) ** -25
            if h == 0:
                continue
            pair[which][i] += h
            up = _kernels(kind, params, *pair, bias)
            pair[which][i] -= 2 * h
            down = _kernels(kind, params, *pair, bias)
            for j in range(2):
                condition[j] += abs(up[j][0] - down[j][0]) / 2   # |∂K/∂x_i| |x_i| · 1e-25
        return [(base[j][0], base[j][1] + condition[j] * mpf(10) ** 25) for j in range(2)]


def _ulps(got: torch.Tensor, want, dtype: torch.dtype) -> float:
    """``|got − want|`` in units of ``ε`` times ``want``'s magnitude and condition, with the dtype's smallest
    normal number as an absolute floor (the kernels of the antiparallel pairs underflow)."""
    value, size = want
    info = torch.finfo(dtype)
    return float(abs(mpf(float(got.detach())) - value) / (size + mpf(info.tiny) / info.eps)) / info.eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [BIAS_VAR, None], ids=["bias", "no_bias"])
def test_large_nearly_parallel_inputs_to_their_conditioning(dtype, kind, bias):
    cls, params = ACTIVATIONS[kind]
    net = serial(Dense(8, WEIGHT_VAR, bias), cls(*params), Dense(1, WEIGHT_VAR, bias)).to(dtype)
    worst = {"nngp": 0.0, "ntk": 0.0}
    for d in (1, 3):
        for x, y in _pairs(d, dtype):
            kernels = net.kernel(torch.stack([x, y]))
            nngp, ntk = _reference(kind, params, x, y, bias)
            worst["nngp"] = max(worst["nngp"], _ulps(kernels.nngp[0, 1], nngp, dtype))
            worst["ntk"] = max(worst["ntk"], _ulps(kernels.ntk[0, 1], ntk, dtype))
    assert worst["nngp"] < ULPS and worst["ntk"] < ULPS, worst


@pytest.mark.parametrize("kind", [*ACTIVATIONS, "Sign"])
def test_carried_pairs_keep_symmetry_diagonal_mode_and_gradients(kind):
    """The carried pairs are patched per pair: the matrix stays exactly symmetric, ``diag=True`` gives the
    cross kernel's diagonal, and derivatives in the inputs through the carried values (two layers: each
    of them passes the carry on) agree with finite differences (float64)."""
    cls, params = ACTIVATIONS.get(kind, (Sign, ()))
    g = torch.Generator().manual_seed(5)
    x = 30 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    x[1] = x[0] + 0.05 * torch.randn(3, generator=g, dtype=torch.float64)
    x[2] = -x[0] + 0.05 * torch.randn(3, generator=g, dtype=torch.float64)
    net = serial(Dense(8, WEIGHT_VAR, BIAS_VAR), cls(*params), Dense(8, WEIGHT_VAR, BIAS_VAR), cls(*params),
                 Dense(1, WEIGHT_VAR, BIAS_VAR)).double()
    full = net.kernel(x)
    assert torch.equal(full.nngp, full.nngp.mT) and torch.equal(full.ntk, full.ntk.mT)
    y = x.flip(0).contiguous()
    cross, diagonal = net.kernel(x, y), net.kernel(x, y, diag=True)
    eps = torch.finfo(torch.float64).eps
    for got, want in ((diagonal.nngp, cross.nngp.diagonal()), (diagonal.ntk, cross.ntk.diagonal())):
        torch.testing.assert_close(got, want, rtol=64 * eps, atol=0)

    def kernels(a):
        out = net.kernel(a, x[:2])
        return out.nngp, out.ntk

    assert torch.autograd.gradcheck(kernels, (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("kind", ["Sin", "Cos"])
def test_gradients_with_an_antiparallel_pair_at_large_inputs(kind):
    """``e^{−b²(k11 + k22 + 2k12)/2}`` is at its maximum at an exactly antiparallel pair (``x``, ``−x``): from the
    rounded kernels its partial derivatives, of size ``b²k``, cancel in the chain rule's sum only to ``ε k``,
    and the float32 gradients (against float64, relative to the largest) of the first weight variance were
    0.22 / 1.0 / NaN (Sin) and 0.14 / 1.0 / NaN (Cos) at input scale 1e3 / 1e4 / 1e8, the input gradients
    0.85 and 0.19 at 1e3 (2026-12-05). Through the carried gap ``|x + x'|²`` (whose derivative is 0 there)
    they are within 2.6e-7 and 4.9e-7 from scale 1e2 to 1e8; the test allows 1e-5."""
    cls, params = ACTIVATIONS[kind]
    g = torch.Generator().manual_seed(0)
    points = torch.randn(3, 3, generator=g, dtype=torch.float64)
    points = torch.cat([points, -points[:1]])
    for scale in (1e3, 1e4, 1e8):
        grads = {}
        for dtype in (torch.float64, torch.float32):
            net = serial(Dense(8, 1.5), cls(*params), Dense(8, 1.5), cls(*params), Dense(1, 1.5)).to(dtype)
            x = (points * scale).float().to(dtype).requires_grad_(True)
            k = net.kernel(x)
            loss = k.nngp.sum() / k.nngp.detach().abs().max() + k.ntk.sum() / k.ntk.detach().abs().max()
            grads[dtype] = [t.double() for t in torch.autograd.grad(loss, [net[0].raw_weight_var, x])]
        for got, want in zip(grads[torch.float32], grads[torch.float64], strict=True):
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (scale, kind)


def _deep_reference(kind: str, x: torch.Tensor, y: torch.Tensor, depth: int):
    """NNGP of ``Dense → (activation → Dense) × depth`` (``σ_w² = 2``, no bias) at 60 digits from the exact
    float inputs, with its magnitude plus the inputs' condition (central differences, as :func:`_reference`)."""
    def nngp(xs, ys):
        w = mpf(2)
        k11, k12, k22, _ = dense_pair(xs, ys, w, 0)
        for _ in range(depth):
            if kind == "Sign":
                t = 2 / mp.pi * mp.asin(k12 / mp.sqrt(k11 * k22))
            else:
                t = mp.exp(-(k11 + k22 - 2 * k12))   # Rbf(1): T11 = T22 = 1
            k11, k12, k22 = w, w * t, w
        return k12

    with mp.workdps(60):
        xs, ys = [mpf(float(v)) for v in x], [mpf(float(v)) for v in y]
        value, condition = nngp(xs, ys), mpf(0)
        for which, i in [(0, i) for i in range(len(xs))] + [(1, i) for i in range(len(ys))]:
            pair = [list(xs), list(ys)]
            h = abs(pair[which][i]) * mpf(10) ** -25
            pair[which][i] += h
            up = nngp(*pair)
            pair[which][i] -= 2 * h
            condition += abs(up - nngp(*pair)) / 2 * mpf(10) ** 25
        return value, abs(value) + condition


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["Sign", "Rbf"])
def test_deep_chaotic_kernels_of_nearly_parallel_inputs(dtype, kind):
    """``Sign`` (which takes about a square root of the angle each layer) and ``Rbf(1)`` with ``σ_w² = 2``
    (``2σ_w²γ = 4``: small gaps grow fourfold a layer) expand the angle of nearly parallel inputs until it
    is of order one. From the rounded kernels ``1 − T12`` keeps ``T12``'s rounding: in float32 pairs 1e-5
    from parallel read ``T12 = 1`` (parallel) after the first layer, and the kernels at depth 10 (Sign) and
    15 (Rbf) were 0.93 and 0.12 off (of the largest entry) where the inputs' own rounding moves them by
    2.4e-5 and 6.3e-4. They now carry ``det`` and ``g`` through (ntkgp/layers/near.py). Measured maxima
    (2026-12-05, units as above, pairs 1e-3 to 1e-7 from parallel and antiparallel, depths 3, 10 and 15;
    float64 / float32): Sign 0.0073 / 0.010, Rbf 1.22 / 0.78; before, 7.2e6 / 2.2e5 and 6.0e6 / 1.3e4."""
    activation = {"Sign": Sign, "Rbf": lambda: Rbf(1.0)}[kind]
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for depth in (3, 10, 15):
        layers = [Dense(8, 2.0, None)]
        for _ in range(depth):
            layers += [activation(), Dense(8, 2.0, None)]
        net = serial(*layers).to(dtype)
        for angle in (1e-3, 1e-5, 1e-7):
            x = torch.randn(3, generator=g, dtype=torch.float64)
            e = torch.randn(3, generator=g, dtype=torch.float64)
            step = angle * x.norm() / e.norm() * e
            if angle < 4 * torch.finfo(dtype).eps:
                continue   # float32 inputs at an angle below 2ε count as parallel (docs/numerics.md)
            for a, b in ((x, x + step), (x, -x + step)):
                a, b = a.to(dtype), b.to(dtype)
                got = net.kernel(torch.stack([a, b]), ntk=False).nngp[0, 1]
                worst = max(worst, _ulps(got, _deep_reference(kind, a, b, depth), dtype))
    assert worst < ULPS, worst


#: the kinds of :func:`_mixed_terms` with parameters: ``Sin0`` is ``Sin(1, 1, 0)``, whose ``cos 2c = 1``
_MIXED = {"Sin": ACTIVATIONS["Sin"], "Cos": ACTIVATIONS["Cos"], "Sin0": (Sin, (1.0, 1.0, 0.0))}


def _mixed_terms(kind: str, k11, k12, k22):
    """``T`` and ``Ṫ`` of ``kind`` at 60 digits (``Sin(1, 1, 0.3)``, ``Cos(0.7, 0.5, 0.2)``, ``Sin0``, ``Rbf(1)``,
    ``Sign``, ``ReLU``)."""
    if kind in _MIXED:
        cls, (a, b, c) = _MIXED[kind]
        a, b, c = mpf(a), mpf(b), mpf(c)
        cos2c = -mp.cos(2 * c) if cls is Cos else mp.cos(2 * c)
        gap_minus, gap_plus = k11 + k22 - 2 * k12, k11 + k22 + 2 * k12
        plus, minus = mp.exp(-b * b * gap_minus / 2), mp.exp(-b * b * gap_plus / 2)
        return a * a / 2 * (plus - cos2c * minus), a * a * b * b / 2 * (plus + cos2c * minus)
    if kind == "Rbf":
        t = mp.exp(-(k11 + k22 - 2 * k12))
        return t, 2 * t
    p = mp.sqrt(k11 * k22)
    theta = mp.acos(max(min(k12 / p, mpf(1)), mpf(-1)))
    if kind == "Sign":
        return 1 - 2 * theta / mp.pi, mpf(0)
    return p * (mp.sin(theta) + (mp.pi - theta) * mp.cos(theta)) / (2 * mp.pi), (mp.pi - theta) / (2 * mp.pi)


def _mixed_reference(kinds: list[str], bias: float | None, x: list, y: list) -> tuple:
    """NNGP and NTK of ``Dense → (activation → Dense)*`` (``σ_w² = 2``, NTK parameterization) at 60 digits."""
    w, c = mpf(2), mpf(0) if bias is None else mpf(bias)
    k11, k12, k22, _ = dense_pair(x, y, w, c)
    ntk = k12
    for kind in kinds:
        t, dot = _mixed_terms(kind, k11, k12, k22)
        t11, t22 = _mixed_terms(kind, k11, k11, k11)[0], _mixed_terms(kind, k22, k22, k22)[0]
        k11, k12, k22 = w * t11 + c, w * t + c, w * t22 + c
        ntk = k12 + w * ntk * dot
    return k12, ntk


def _mixed_net(kinds: list[str], bias: float | None):
    """``Dense → (activation → Dense)*`` as :func:`_mixed_reference` has it."""
    layers: list = [Dense(8, 2.0, bias)]
    for kind in kinds:
        make = {"Rbf": lambda: Rbf(1.0), "Sign": Sign, "ReLU": ReLU}.get(kind)
        layers += [make() if make else _MIXED[kind][0](*_MIXED[kind][1]), Dense(8, 2.0, bias)]
    return serial(*layers)


def _mixed_error(net, kinds: list[str], bias: float | None, points: torch.Tensor) -> float:
    """The largest error of ``net``'s NNGP and NTK at ``points`` against :func:`_mixed_reference` from the same
    float inputs, in ``ε`` (of ``points``' dtype) of the largest entry."""
    kernels = net.kernel(points)
    n, eps = len(points), torch.finfo(points.dtype).eps
    worst = 0.0
    with mp.workdps(60):
        exact = [[mpf(float(v)) for v in p] for p in points]
        want = [[_mixed_reference(kinds, bias, a, b) for b in exact] for a in exact]
        for which, got in enumerate((kernels.nngp, kernels.ntk)):
            largest = max(abs(row[j][which]) for row in want for j in range(n))
            error = max(abs(mpf(float(got[i, j].detach())) - want[i][j][which]) for i in range(n) for j in range(n))
            worst = max(worst, float(error / largest) / eps)
    return worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("kinds", "bias"), [(["Sign", "ReLU"], 0.1), (["Rbf", "ReLU"], None), (["ReLU", "Rbf"], None),
                                             (["ReLU", "Sin"], 0.1), (["Rbf", "Sign", "Sin"], 0.1),
                                             (["Sin", "ReLU"], 0.1), (["Cos", "ReLU"], None), (["Sin", "Sign"], 0.1),
                                             (["Cos", "Sin", "ReLU"], None)],
                         ids=["sign-relu", "rbf-relu", "relu-rbf", "relu-sin", "rbf-sign-sin", "sin-relu", "cos-relu",
                              "sin-sign", "cos-sin-relu"])
def test_the_carry_passes_between_kinds_of_layer(dtype, kinds, bias):
    """A carry made by ``Sign``, ``Rbf`` (``T11 = T22 = 1``), ``Sin`` or ``Cos`` means to a ReLU after them what
    the ReLU family's own does, and ReLU's ``g'`` (before only a ``det'`` term beside a bias) gives ``Rbf`` and
    ``Sin`` their gaps. Inputs of scale 1 and 30 in d = 3, one 1e-3 to 1e-7 from parallel and one from antiparallel
    to the first (float32: 1e-5 at the least, below which its inputs count as parallel), against a
    60-digit recursion from the float inputs, in ``ε`` of the largest entry (the inputs' own condition is
    benign at these scales). Measured (2026-12-05): at most 1.1 (float64) and 1.7 (float32), where before
    Sin, Rbf and Sign used the carry (58c1dbf) they were up to 2.4e9 and 7.7e3. ``Sin`` and ``Cos`` pass the
    carry on (``Sin._carried_after``): before, a ReLU or ``Sign`` after them took the kernels' own angle, and
    the cases from ``sin-relu`` on were 1.9e5 to 2.2e6 (float64) and 146 to 397 (float32) off; now at most
    1.6 (2026-12-05)."""
    net = _mixed_net(kinds, bias).to(dtype)
    eps = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for scale in (1.0, 30.0):
        for angle in (1e-3, 1e-5, 1e-7):
            if angle < 50 * eps:
                continue
            x = scale * torch.randn(3, generator=g, dtype=torch.float64)
            e = torch.randn(3, generator=g, dtype=torch.float64)
            step = angle * x.norm() / e.norm() * e
            points = torch.stack([x, x + step, -x + step, scale * torch.randn(3, generator=g, dtype=torch.float64)])
            worst = max(worst, _mixed_error(net, kinds, bias, points.to(dtype)))
    assert worst < ULPS, worst


def test_sin_passes_the_carry_at_parallel_inputs_of_unequal_norms():
    """``Sin``'s ``det' = a⁴/4 · ((1 − e^{−2x})(1 − C² e^{−2y}) − C D²)`` (``Sin._carried_after``) is a difference
    for ``C = cos 2c > 0``: at nearly parallel (antiparallel) inputs of unequal norms and small ``b²k`` its
    ``C D²`` cancels the first term's variance part to ``6/(b²k)²`` of it, and the angle after is ``~ε r/(b²k)``
    off (``r`` the norms' relative difference). ``Sin(1, 1, 0) → ReLU``, no bias, inputs ``x`` and
    ``±ratio · x`` 1e-5 to 1e-9 from parallel, ``x`` of scale 1e-2 to 1, float64, against a 60-digit recursion
    in ``ε`` of the largest entry. Measured (2026-12-05): with that difference 3.4e3, with the variance part by
    its series (``_sinh_excess``) 1.14; before ``Sin`` passed the carry on, 5.4e6."""
    net = _mixed_net(["Sin0", "ReLU"], None).double()
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for scale in (1e-2, 0.1, 1.0):
        for ratio in (1.001, 1.1, 1.5):
            for angle in (1e-5, 1e-7, 1e-9):
                x = scale * torch.randn(3, generator=g, dtype=torch.float64)
                e = torch.randn(3, generator=g, dtype=torch.float64)
                step = angle * x.norm() / e.norm() * e
                points = torch.stack([x, ratio * x + step, -ratio * x + step])
                worst = max(worst, _mixed_error(net, ["Sin0", "ReLU"], None, points))
    assert worst < ULPS, worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sin_passes_the_carry_at_parallel_inputs_of_very_unequal_norms(dtype):
    """Where ``b²k22 ≪ 1`` the two gaps ``x ≈ y`` (``k12`` is small beside ``k11 + k22``) and ``Sin``'s
    ``det'`` for ``C = cos 2c > 0`` cancels in its variance part ``(1 − e^{−2x})(1 − e^{−2y}) − D²``, to
    ``1/(2b²k22)`` of it (``Sin._carried_after`` takes ``(1 − e^{−2b²k11})(1 − e^{−2b²k22}) − (e^{−x} − e^{−y})²``
    there), and its series at ``x, y < 1`` took ``y − x`` from the rounded gaps (now ``2b²k12``). A ``Sign``
    after it reads its angle from ``det'`` at every carried pair: ``Sin(1, 1, 0) → Sign``, no bias, inputs ``x``
    of ``b²k11 ≈ 0.5, 2, 8`` (both sides of the series' switch) and ``2^−7 x``, ``−2^−10 x``, ``2^−13 x`` (exact
    multiples, whose carried ``det = 0`` is exact: the first layer's carried angle of a pair ``(x, t x + e)`` of
    ``t`` far from 1 is ``ε/t`` off absolutely), against a 60-digit recursion in ``ε`` of the largest entry.
    Measured (2026-12-05): at most 0.67 (float64) and 3.0 (float32); before, 3.8e4 and 861."""
    net = _mixed_net(["Sin0", "Sign"], None).to(dtype)
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for scale in (0.5, 1.0, 2.0):
        z = torch.randn(3, generator=g, dtype=torch.float64)
        # b²k11 ≈ 2 scale², of 8 significant bits: x − 2^−13 x is exact in float32, so the first layer's carried
        # det is 0 (of an x of 24 bits, ε/t of the angle, t = 2^−13: 3.6e-7 of k11 k22 in float32)
        x = torch.round(64 * scale * 3**0.5 * z / z.norm()) / 64
        points = torch.stack([x, x / 2**7, -x / 2**10, x / 2**13]).to(dtype)
        worst = max(worst, _mixed_error(net, ["Sin0", "Sign"], None, points))
    assert worst < ULPS, worst


@pytest.mark.parametrize("layer", [Sin(1.0, 1.0, 0.0), Sin(1.3, 0.7, 0.3), Sin(1.0, 1.0, 1e-3), Cos(0.7, 0.5, 0.2),
                                   Cos(1.0, 1.0, math.pi / 2)],
                         ids=["sin0", "sin", "sin-small-c", "cos", "cos-half-pi"])
def test_sin_carry_after_against_60_digits(layer):
    """``Sin._carried_after``'s ``g' = T11 + T22 − 2T12`` and ``det' = T11 T22 − T12²`` against 60 digits, relative,
    from the correctly rounded carried ``det`` and gaps and the rounded ``k12`` of random nearly (anti)parallel pairs:
    ``k11`` 1e-4 to 1e3, norms 1 to 1e5 apart, angles 1e-9 to 0.1. ``C = cos 2c`` at 1 (``Sin(1, 1, 0)``,
    ``Cos(1, 1, π/2)``), near 1, 0.83 and −0.92. The variance part of ``det'`` is taken from the one of its two
    forms that cancels less, at most 9.3 times where ``max(x, y) ≥ 1``; below, a sum of nonnegative terms.
    Measured (2026-12-05): ``g'`` within 2.2 ``ε`` and ``det'`` within 3.5; before the second form and ``y − x``
    from ``k12``, ``det'`` was 1.6e8 ``ε`` off (``Sin(1, 1, 0)``, ``Cos(1, 1, π/2)``) and 3.1e5 (``c = 10⁻³``)."""
    rng = random.Random(5)
    rows = []
    with mp.workdps(60):
        b2, half = mpf(layer.b) ** 2, mpf(layer.a) ** 2 / 2
        cos2c = -mp.cos(2 * mpf(layer._phase)) if isinstance(layer, Cos) else mp.cos(2 * mpf(layer.c))
        for _ in range(200):
            k11 = mpf(10 ** rng.uniform(-4, 3))
            k22 = mpf(float(k11 / 10 ** rng.uniform(0, 10)))
            k12 = rng.choice((1, -1)) * mp.sqrt(k11 * k22) * mp.cos(mpf(10 ** rng.uniform(-9, -1)))
            if rng.random() < 0.5:
                k11, k22 = k22, k11
            k11, k22 = mpf(float(k11)), mpf(float(k22))   # exact floats; k12 rounded below, as the kernels' own
            x, y = b2 * (k11 + k22 - 2 * k12) / 2, b2 * (k11 + k22 + 2 * k12) / 2
            t12 = half * (mp.exp(-x) - cos2c * mp.exp(-y))
            t11, t22 = (half * (1 - cos2c * mp.exp(-2 * b2 * k)) for k in (k11, k22))
            rows.append((k11, k12, k22, k11 * k22 - k12 * k12, 2 * x / b2, 2 * y / b2, t11 + t22 - 2 * t12,
                         t11 * t22 - t12 * t12))
        var1, cross, var2, det, gap_minus, gap_plus = (torch.tensor([float(r[i]) for r in rows], dtype=torch.float64)
                                                       for i in range(6))
    index = torch.arange(len(rows))
    after = layer._carried_after(PairCarry((index, index), det, gap_minus), gap_minus, gap_plus, var1, cross, var2)
    eps = torch.finfo(torch.float64).eps
    with mp.workdps(60):
        worst_g = max(abs(mpf(float(after.g[i])) / r[6] - 1) for i, r in enumerate(rows)) / eps
        worst_det = max(abs(mpf(float(after.det[i])) / r[7] - 1) for i, r in enumerate(rows)) / eps
    assert worst_g < ULPS and worst_det < 2 * ULPS, (float(worst_g), float(worst_det))
