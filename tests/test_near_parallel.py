"""Kernels of nearly parallel and nearly antiparallel inputs, against 60-digit recursions of the network.

The ReLU family's angle from the rounded kernels, ``s² = k11 k22 − k12²``, cancels where ``1 − |ρ|`` is
small: ``θ`` was ``ε/θ`` off and every NTK after it (float64 NTKs up to 4.6e7 units off at input
angles 1e-3 to 1e-7, float32 up to 3050). The first ``Dense`` layer now carries ``det`` and
``E|u1 − u2|²`` of those pairs from the inputs themselves (ntkgp/layers/near.py). References: the
recursion at 60 digits from the exact float inputs (tests/mpmath_kernels.py's pair formulas).

Measured maxima (2026-12-03; units of ``ε = 2⁻⁵²`` / ``2⁻²³`` times the magnitude of the recursion's terms,
as rounding the sums costs at the least) over the pairs below, ``d = 1`` and ``3``, with and without bias,
depth 2: NNGP 2.0 / 1.9, NTK 2.2 / 4.4 (Abs in float32); before, the NTKs were up to 4.6e7 / 3050 off.
The bound, 13, is about three times the largest.
"""

from __future__ import annotations

import mpmath as mp
import pytest
import torch
from mpmath import mpf
from mpmath_kernels import dense_pair, reference

from ntkgp.layers import Abs, Dense, LayerNorm, LeakyReLU, ReLU, serial

ULPS = 13
WEIGHT_VAR, BIAS_VAR = 2.0, 0.1


def _pairs(d: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs at angles 1e-3 to 1e-7, nearly parallel and nearly antiparallel, and ``x, c·x``."""
    g = torch.Generator().manual_seed(d)
    pairs = []
    for angle in (1e-3, 1e-5, 1e-7):
        x = torch.randn(d, generator=g, dtype=torch.float64)
        e = torch.randn(d, generator=g, dtype=torch.float64)
        step = angle * x.norm() / e.norm() * e
        pairs += [(x, x + step), (x, -x + step)]
    x = torch.randn(d, generator=g, dtype=torch.float64)
    pairs += [(x, 3 * x), (x, 1.0000001 * x)]
    return [(a.to(dtype), b.to(dtype)) for a, b in pairs]


def _reference(x: torch.Tensor, y: torch.Tensor, a: float, b: float, depth: int, bias: float | None):
    """NNGP and NTK of ``Dense → (ABReLU(a, b) → Dense) × depth`` (NTK parameterization) at 60 digits,
    each with the sum of the magnitudes of its terms (what rounding the sums costs at the least:
    ``K = w T + b`` and ``Θ = K + w Θ Ṫ`` cancel where ``T < 0``)."""
    with mp.workdps(60):
        f = reference("ABReLU", (a, b))
        xs, ys = [mpf(float(v)) for v in x], [mpf(float(v)) for v in y]
        w, c = mpf(WEIGHT_VAR), mpf(0) if bias is None else mpf(bias)
        k11, k12, k22, size = dense_pair(xs, ys, w, c)
        ntk, ntk_size = k12, size
        half = (mpf(a) ** 2 + mpf(b) ** 2) / 2
        for _ in range(depth):
            t, dot = f(k11, k12, k22)
            k11, k12, k22 = w * half * k11 + c, w * t + c, w * half * k22 + c
            size = w * abs(t) + c
            ntk, ntk_size = k12 + w * ntk * dot, size + w * ntk_size * abs(dot)
        return (k12, size), (ntk, ntk_size)


def _ulps(got: torch.Tensor, want, dtype: torch.dtype) -> float:
    """``|got − want|`` in units of ``ε`` times the magnitude of ``want``'s terms."""
    value, size = want
    if size == 0:
        return 0.0 if float(got.detach()) == 0 else float("inf")
    return float(abs(mpf(float(got.detach())) - value) / size) / torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("slopes", [(0.0, 1.0), (0.1, 1.0), (-1.0, 1.0)], ids=["ReLU", "LeakyReLU", "Abs"])
@pytest.mark.parametrize("bias", [BIAS_VAR, None], ids=["bias", "no_bias"])
def test_nearly_parallel_pairs_to_a_few_ulps(dtype, slopes, bias):
    a, b = slopes
    activation = {(0.0, 1.0): ReLU, (0.1, 1.0): lambda: LeakyReLU(0.1), (-1.0, 1.0): Abs}[slopes]
    depth = 2
    layers = [Dense(8, WEIGHT_VAR, bias)]
    for _ in range(depth):
        layers += [activation(), Dense(8, WEIGHT_VAR, bias)]
    net = serial(*layers).to(dtype)
    worst = {"nngp": 0.0, "ntk": 0.0}
    for d in (1, 3):
        for x, y in _pairs(d, dtype):
            kernels = net.kernel(torch.stack([x, y]))
            nngp, ntk = _reference(x, y, a, b, depth, bias)
            worst["nngp"] = max(worst["nngp"], _ulps(kernels.nngp[0, 1], nngp, dtype))
            worst["ntk"] = max(worst["ntk"], _ulps(kernels.ntk[0, 1], ntk, dtype))
    assert worst["nngp"] < ULPS and worst["ntk"] < ULPS, worst


def test_one_dimensional_relu_layernorm_without_bias():
    """``d = 1`` without bias: every pair is exactly parallel or antiparallel, and the rounded kernels'
    ``s ~ sqrt(ε) k`` made the ReLU → LayerNorm kernels of 12 points up to 3780 ulps off in float32 (now
    2.4: the bound is about three times that)."""
    net = serial(Dense(8, 2.0), ReLU(), LayerNorm(), Dense(1, 1.5))
    x = torch.randn(12, 1, generator=torch.Generator().manual_seed(0))
    got = net.kernel(x)
    worst = 0.0
    with mp.workdps(60):
        xs = [mpf(float(v)) for v in x.flatten()]
        # the centred variance of ReLU features, T − μ² = k (1/2 − 1/(2π)), plus LayerNorm's eps
        spread = [mpf("1e-12") + 2 * v * v * (mpf(1) / 2 - 1 / (2 * mp.pi)) for v in xs]
        for i, u in enumerate(xs):
            for j, v in enumerate(xs):
                p, k12 = 2 * abs(u * v), 2 * u * v
                # θ = 0 (T = p/2, Ṫ = 1/2) or π (T = Ṫ = 0); centred T − μ1μ2 = T − p/(2π)
                t, dot = (p / 2, mpf(1) / 2) if k12 > 0 else (mpf(0), mpf(0))
                scale = 1 / mp.sqrt(spread[i] * spread[j])
                nngp = mpf(1.5) * (t - p / (2 * mp.pi)) * scale
                ntk = nngp + mpf(1.5) * k12 * dot * scale
                worst = max(worst, _ulps(got.nngp[i, j], (nngp, abs(nngp)), torch.float32),
                            _ulps(got.ntk[i, j], (ntk, abs(ntk)), torch.float32))
    assert worst < 8


def _loss_reference(points, weights, w1):
    """``K.sum()/max|K| + Θ.sum()/max|Θ|`` (weighted) of ``Dense(8, w1, 0.1) → ReLU → Dense(1, 1.3, 0.1)``."""
    n, d = len(points), len(points[0])
    f = reference("ABReLU", (0.0, 1.0))
    k = [[w1 * sum(u * v for u, v in zip(points[i], points[j], strict=True)) / d + mpf("0.1") for j in range(n)]
         for i in range(n)]
    nngp, ntk = {}, {}
    for i in range(n):
        for j in range(n):
            t, dot = f(k[i][i], k[i][j], k[j][j])
            nngp[i, j] = mpf("1.3") * t + mpf("0.1")
            ntk[i, j] = nngp[i, j] + mpf("1.3") * k[i][j] * dot
    return sum(weights[i][j] * (nngp[i, j] / max(map(abs, nngp.values())) + ntk[i, j] / max(map(abs, ntk.values())))
               for i in range(n) for j in range(n))


@pytest.mark.parametrize("dtype, scale, bound", [
    (torch.float32, 1e-3, 3e-6), (torch.float32, 1e-4, 3e-6),
    (torch.float64, 1e-7, 5e-15), (torch.float64, 1e-8, 5e-15)])
def test_first_weight_gradient_of_inputs_tiny_beside_the_bias(dtype, scale, bound):
    """docs/numerics.md's case: the angle ``θ ≈ σ_w|x − x'|/(σ_b sqrt d)`` from the inputs, not from
    ``O(θ²)``-accurate Gram entries. Measured 7.4e-7 / 2.5e-7 (float32) and 1.1e-15 / 1.3e-15 (float64);
    before, 8.1e-4 / 54 % and 1.3e-4 / 1.8 %."""
    g = torch.Generator().manual_seed(0)
    points = torch.randn(3, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 3, generator=g, dtype=torch.float64)
    weights = weights + weights.T
    x, w = (points * scale).to(dtype), weights.to(dtype)
    net = serial(Dense(8, 1.5, 0.1), ReLU(), Dense(1, 1.3, 0.1)).to(dtype)
    kernels = net.kernel(x)
    loss = (w * kernels.nngp).sum() / kernels.nngp.abs().max() + (w * kernels.ntk).sum() / kernels.ntk.abs().max()
    loss.backward()
    got = float(net.layers[0].raw_weight_var.grad)
    with mp.workdps(60):
        xs = [[mpf(float(v)) for v in row] for row in x.double()]
        ws = [[mpf(float(v)) for v in row] for row in w.double()]
        w1 = mpf(float(net.layers[0].weight_var.detach().double()))
        # d/d raw of w = anchor·exp(raw) is w; a step far above the 50-digit pair formulas' rounding
        want = mp.diff(lambda v: _loss_reference(xs, ws, v), w1, h=mpf("1e-20")) * w1
        assert abs(got - want) / abs(want) < bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_near_pairs_keep_symmetry_diagonal_mode_and_row_blocks(dtype):
    """The carried pairs are chosen per pair: the matrix is exactly symmetric, ``diag=True`` gives its
    diagonal (to the rounding of its Gram entries, a sum in another order), row blocks (without autograd)
    the whole matrix's values, and gradients stay finite at ``x, −x`` and at duplicates."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x[1] = x[0] + 1e-6 * torch.randn(3, generator=g, dtype=torch.float64)
    x[3] = -x[2]
    x[5] = x[4]
    x = x.to(dtype)
    y = x.flip(0).contiguous()
    net = serial(Dense(8, 2.0, 0.1), ReLU(), Dense(8, 2.0, 0.1), LeakyReLU(0.2), Dense(1))
    full = net.kernel(x)
    assert torch.equal(full.nngp, full.nngp.mT) and torch.equal(full.ntk, full.ntk.mT)
    cross = net.kernel(x, y)
    diagonal = net.kernel(x, y, diag=True)
    eps = torch.finfo(dtype).eps
    for got, want in ((diagonal.nngp, cross.nngp.diagonal()), (diagonal.ntk, cross.ntk.diagonal())):
        torch.testing.assert_close(got, want, rtol=4 * eps, atol=0)
    with torch.no_grad():
        blocked = net.kernel(x, y)
    assert torch.equal(blocked.nngp, cross.nngp.detach()) and torch.equal(blocked.ntk, cross.ntk.detach())
    inputs = x.clone().requires_grad_(True)
    kernels = net.kernel(inputs)
    (kernels.nngp.sum() + kernels.ntk.sum()).backward()
    assert torch.isfinite(inputs.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_input_gradients_of_a_near_pair():
    """Derivatives in the inputs through the carried pairs agree with finite differences (float64)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x[1] = x[0] + 1e-3 * torch.randn(3, generator=g, dtype=torch.float64)
    x[2] = -x[0] + 1e-3 * torch.randn(3, generator=g, dtype=torch.float64)
    net = serial(Dense(8, 2.0, 0.1), ReLU(), Dense(8, 2.0, 0.1), Abs(), Dense(1)).double()
    y = x[:2].clone()

    def kernels(a):
        out = net.kernel(a, y)
        return out.nngp, out.ntk

    assert torch.autograd.gradcheck(kernels, (x.clone().requires_grad_(True),))


def test_chunked_pairs_give_the_same_values_and_gradients(monkeypatch):
    """The inputs of nearly parallel pairs are gathered a chunk at a time, with autograd checkpointed:
    chunks of one pair give the bits and gradients of one chunk for all."""
    import ntkgp.layers.near as near

    g = torch.Generator().manual_seed(6)
    base = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.cat([base, base + 1e-6 * torch.randn(4, 3, generator=g, dtype=torch.float64), -base[:2]])
    net = serial(Dense(8, 2.0, 0.1), ReLU(), Dense(8, 2.0, 0.1), ReLU(), Dense(1)).double()

    def run():
        inputs = x.clone().requires_grad_(True)
        kernels = net.kernel(inputs)
        net.zero_grad()
        (kernels.nngp.sum() + kernels.ntk.sum()).backward()
        return kernels.nngp.detach(), kernels.ntk.detach(), inputs.grad, [p.grad.clone() for p in net.parameters()]

    whole = run()
    monkeypatch.setattr(near, "_CHUNK_ENTRIES", 3)   # one pair (d = 3) per chunk
    chunked = run()
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-13, atol=0)
    for a, b in zip(chunked[3], whole[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype, depth", [(torch.float32, 70), (torch.float64, 520)])
def test_carried_pairs_whose_variances_outgrow_the_products_keep_finite_gradients(dtype, depth):
    """A ReLU net of weight variance 4 doubles the variances each layer, past sqrt(max) (float32 at depth
    ~64): the carried det = k11 k22 - k12^2 of a near pair overflowed and, masked out of the values,
    sent NaN into every gradient (0 * inf). Such pairs leave the carry before any arithmetic, and
    the kernels there are the formulas' own (finite, with finite gradients)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=dtype)
    x[1] = x[0] * (1 + 1e-3) + 1e-4
    x.requires_grad_(True)
    net = serial(Dense(8, 4.0, BIAS_VAR), *[layer for _ in range(depth) for layer in (ReLU(), Dense(8, 4.0, BIAS_VAR))])
    state = net.kernel(x)
    assert float(state.nngp.detach().abs().max()) > torch.finfo(dtype).max ** 0.5   # past the products' range
    loss = state.nngp.sum() / state.nngp.detach().abs().max() + state.ntk.sum() / state.ntk.detach().abs().max()
    loss.backward()
    for grad in [x.grad, *(p.grad for p in net.parameters())]:
        assert grad is not None and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-7), (torch.float32, 1e-4)])
def test_pairs_of_a_zero_input_are_carried(dtype, scale):
    """A zero input beside a small one and a bias: the pair is near (``ρ → 1``) and its Gram formulas are
    exact (``x·x' = 0``: ``det = w b |x'|²``). Such pairs were left out of the carry with the zero vector's
    undefined direction, and their NTK was 2.4e5 (float64, 1e-7) / 445 (float32, 1e-4) units off."""
    g = torch.Generator().manual_seed(7)
    x = torch.zeros(3, 3, dtype=torch.float64)
    x[1] = scale * torch.randn(3, generator=g, dtype=torch.float64)
    x[2] = -2 * x[1] + scale * 1e-3 * torch.randn(3, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    net = serial(Dense(8, WEIGHT_VAR, BIAS_VAR), ReLU(), Dense(8, WEIGHT_VAR, BIAS_VAR), ReLU(),
                 Dense(8, WEIGHT_VAR, BIAS_VAR)).to(dtype)
    kernels = net.kernel(x)
    worst = 0.0
    for i, j in ((0, 1), (1, 0), (0, 2)):
        nngp, ntk = _reference(x[i], x[j], 0.0, 1.0, 2, BIAS_VAR)
        worst = max(worst, _ulps(kernels.nngp[i, j], nngp, dtype), _ulps(kernels.ntk[i, j], ntk, dtype))
    assert worst < ULPS, worst


def test_input_gradients_at_a_zero_input():
    """Derivatives through a carried pair of a zero input agree with finite differences (float64): the
    zero input's own (``x·x'`` and ``|x|²`` have no kink there) and its partner's."""
    g = torch.Generator().manual_seed(8)
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1] = 1e-2 * torch.randn(3, generator=g, dtype=torch.float64)
    net = serial(Dense(8, 2.0, 0.1), ReLU(), Dense(8, 2.0, 0.1), Abs(), Dense(1)).double()
    y = torch.randn(2, 3, generator=g, dtype=torch.float64) * 1e-2

    def kernels(a):
        out = net.kernel(a, y)
        return out.nngp, out.ntk

    assert torch.autograd.gradcheck(kernels, (x.clone().requires_grad_(True),))
