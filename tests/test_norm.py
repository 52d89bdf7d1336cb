"""LayerNorm kernels against independent quadrature (found missing by mutation testing).

After an activation φ, LayerNorm's kernel is the correlation of the *centred* features,
``C12 / sqrt((eps + C11)(eps + C22))`` with ``C_ij = E[(φ(u_i) − μ_i)(φ(u_j) − μ_j)]``; after a
concatenation it subtracts the width-weighted average of the branches' means. The other tests
check ``T``/``Ṫ`` by quadrature and LayerNorm at small variances as float32 against float64 of the
same formulas, so a wrong coefficient in a centred form (Sin's ``|b²k12| ≤ 1`` series branch,
Exp's, Rbf's) or uniform weights of unequal branches went unnoticed. Here ``C`` comes from numpy
Gauss–Hermite quadrature (tests/quadrature.py), independent of the library.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

import ntkgp

from quadrature import cartesian, polar


def _mean(f, k: float, degree: int = 120) -> float:
    z, w = scipy.special.roots_hermite(degree)
    return float(np.sum(w / math.sqrt(math.pi) * f(math.sqrt(2 * k) * z)))


CASES = {
    # (layer, φ in numpy)
    "sin_cos2c_positive": (lambda: ntkgp.Sin(1.2, 0.8, 0.3), lambda x: 1.2 * np.sin(0.8 * x + 0.3)),
    "sin_cos2c_negative": (lambda: ntkgp.Sin(1.0, 1.1, 1.0), lambda x: np.sin(1.1 * x + 1.0)),
    "cos": (lambda: ntkgp.Cos(0.9, 1.1, 0.3), lambda x: 0.9 * np.cos(1.1 * x + 0.3)),
    "rbf": (lambda: ntkgp.Rbf(0.7), lambda x: math.sqrt(2) * np.sin(math.sqrt(1.4) * x + math.pi / 4)),
    "erf": (lambda: ntkgp.Erf(1.3, 0.7, 0.4), lambda x: 1.3 * scipy.special.erf(0.7 * x) + 0.4),
    "gaussian": (lambda: ntkgp.Gaussian(1.4, -0.6), lambda x: 1.4 * np.exp(-0.6 * x * x)),
    "exp": (lambda: ntkgp.Exp(1.3, 0.7), lambda x: 1.3 * np.exp(0.7 * x)),
    "gabor": (ntkgp.Gabor, lambda x: np.exp(-x * x) * np.sin(x)),
}
#: Gauss–Hermite degrees where 80 is not converged: Gabor's exp(−u²) is narrow against N(0, 1.5)
#: (degree 80 is 3e-5 off, 400 ~1e-15)
DEGREES = {"gabor": 400}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layernorm_kernel_is_the_correlation_of_centred_features(name):
    make, phi = CASES[name]
    # K = x·x'/d after a bias-free Dense(weight_var=1): variances 0.2-1.5, so |b²k12| ≤ 1 (the
    # series branches of the centred forms) for most pairs and beyond it for some
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 1.3
    x[4] = -x[0]   # an exactly opposite pair
    eps = 1e-12
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, None), make(), ntkgp.LayerNorm(eps))
    with torch.no_grad():
        got = net.kernel(x).nngp
    gram = (x @ x.T / x.shape[1]).numpy()
    n = gram.shape[0]
    means = [_mean(phi, gram[i, i]) for i in range(n)]
    cent = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            cent[i, j] = cartesian(lambda u, i=i: phi(u) - means[i], lambda v, j=j: phi(v) - means[j],
                                   gram[i, i], gram[i, j], gram[j, j], degree=DEGREES.get(name, 80))
    want = cent / np.sqrt(np.outer(eps + np.diag(cent), eps + np.diag(cent)))
    # 80-node Gauss–Hermite on these entire integrands (400 on Gabor's) is converged to ~1e-14; 1e-9 leaves room
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-9, atol=1e-9)


# LayerNorm after a concatenation of branches of unequal widths and different feature means.
#
# Over the ``n = n_a + n_b`` concatenated features the LayerNorm subtracts their average
# ``m(x) = p μ_a(x) + (1 − p) μ_b(x)``, ``p = n_a / n``, and divides by their spread, so at
# infinite width its kernel is
#
#     (p T_a + (1 − p) T_b − m(x) m(x')) / sqrt((ε + C(x, x)) (ε + C(x', x')))
#
# with ``C`` the numerator at ``x' = x``. The wide-network test of this case concatenates two
# activations of one Dense layer (equal widths, ``p = 1/2``), where weighting the branches' means
# by their widths or uniformly gives the same kernel; here ``p = 3/4``. ``T_a``, ``T_b`` come from numpy
# quadrature (tests/quadrature.py), the means in closed form, independent of the library.


def test_layernorm_after_a_concatenation_of_unequal_widths():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (wa, ba), (wb, bb), eps = (1.4, 0.2), (0.8, 0.3), 1e-12
    net = ntkgp.serial(ntkgp.parallel(ntkgp.serial(ntkgp.Dense(300, wa, ba), ntkgp.ReLU()),
                                      ntkgp.serial(ntkgp.Dense(100, wb, bb), ntkgp.Erf(c=0.7)), join="concat"),
                       ntkgp.LayerNorm(eps))
    with torch.no_grad():
        got = net.kernel(x).nngp
    gram = (x @ x.T / x.shape[1]).numpy()
    ka, kb = wa * gram + ba, wb * gram + bb
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    erf = lambda t: scipy.special.erf(t) + 0.7  # noqa: E731
    p, n = 0.75, gram.shape[0]
    # E[max(u, 0)] = sqrt(k / 2π) (half-normal mean); E[erf(u) + c] = c (erf is odd)
    m = np.array([p * math.sqrt(ka[i, i] / (2 * math.pi)) + (1 - p) * 0.7 for i in range(n)])
    num = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            ta = polar(relu, relu, ka[i, i], ka[i, j], ka[j, j])
            tb = cartesian(erf, erf, kb[i, i], kb[i, j], kb[j, j], degree=80)
            num[i, j] = p * ta + (1 - p) * tb - m[i] * m[j]
    want = num / np.sqrt(np.outer(eps + np.diag(num), eps + np.diag(num)))
    # polar quadrature is exact up to rounding for ReLU (positively homogeneous), 80-node
    # Gauss–Hermite for the entire erf integrand converged to ~1e-14 (measured agreement 6e-14)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


def test_nested_concatenations_of_one_input_ask_for_its_mean_once(monkeypatch):
    """A state's mean and centred kernels are computed once, however many consumers ask: each
    concatenation asked both of its branches, and two branches passing one input through
    (``parallel(Identity(), Identity(), join="concat")`` repeated L times, then a LayerNorm) asked
    the ReLU for its mean 2^L times (9 s at L = 12 on 6 points); the values are unchanged (the
    LayerNorm of copies of one ReLU layer's features is that layer's)."""
    calls = []
    mean = ntkgp.ReLU.mean
    monkeypatch.setattr(ntkgp.ReLU, "mean", lambda self, k: calls.append(1) or mean(self, k))
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    head = [ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU()]
    tail = [ntkgp.LayerNorm(), ntkgp.Dense(1, 1.5, 0.1)]
    copies = ntkgp.repeat(ntkgp.parallel(ntkgp.Identity(), ntkgp.Identity(), join="concat"), 10)
    got = ntkgp.serial(*head, copies, *tail).kernel(x)
    assert len(calls) == 1, len(calls)
    want = ntkgp.serial(*head, *tail).kernel(x)
    torch.testing.assert_close(got.nngp, want.nngp, rtol=1e-14, atol=0)
    torch.testing.assert_close(got.ntk, want.ntk, rtol=1e-14, atol=0)


# ``kernel_map`` takes the centred kernel of the ReLU family, GELU and Erf from the pieces their pair
# kernel computed (``Activation._pair_kernels``) instead of calling ``centred_pair_kernel``, which
# repeats that work: both must give the same bits, and a user's own ``pair_kernel`` or
# ``centred_pair_kernel`` (on a subclass or an instance) must still be the one used.
SHARED = {"relu": ntkgp.ReLU, "abs": ntkgp.Abs, "abrelu": lambda: ntkgp.ABReLU(-0.4, 1.3),
          "abrelu_linear": lambda: ntkgp.ABReLU(0.5, 0.5), "gelu": ntkgp.GELU, "erf": lambda: ntkgp.Erf(1.3, 0.7, 0.4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(SHARED))
def test_centred_kernel_from_the_pair_kernels_pieces_is_centred_pair_kernels(name, grad, dtype):
    layer = SHARED[name]()
    # near-parallel, near-opposite (GELU's near form, the ReLU family's supplement), nearly independent
    # pairs and zero, tiny and huge variances (gaussian_angle's rescaling)
    grid = [(a, b, r) for a in (0.0, 1e-30, 0.7, 1e30) for b in (1e-30, 2.0, 1e30)
            for r in (1 - 1e-8, -(1 - 1e-8), 1e-9, -0.3, 0.6, -1.0)]
    k11, k22, rho = (torch.tensor(column, dtype=torch.float64) for column in zip(*grid, strict=True))
    k12 = (rho * k11.sqrt() * k22.sqrt()).to(dtype)
    k11, k22 = k11.to(dtype).requires_grad_(grad), k22.to(dtype).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        nngp, dot, centred = layer._pair_kernels(k11, k12, k22, True)
        got = centred()
        want = layer.centred_pair_kernel(k11, k12, k22, nngp)
        pair = layer.pair_kernel(k11, k12, k22, True)
        assert torch.equal(nngp, pair[0]) and torch.equal(dot, pair[1]) and torch.equal(got, want)
        assert torch.equal(centred(), want)   # the pieces are left as they were: a second call agrees
    if grad:   # summed in another order
        for a, b in zip(torch.autograd.grad(got.sum(), (k11, k22), retain_graph=True),
                        torch.autograd.grad(want.sum(), (k11, k22)), strict=True):
            torch.testing.assert_close(a, b, rtol=8 * torch.finfo(dtype).eps, atol=0)


def test_a_layers_own_centred_or_pair_kernel_is_used_after_it():
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    class Shifted(ntkgp.ReLU):   # a centred kernel of its own: the pieces of ReLU's would bypass it
        def centred_pair_kernel(self, k11, k12, k22, nngp):
            return super().centred_pair_kernel(k11, k12, k22, nngp) + 0.01

    class Scaled(ntkgp.GELU):
        def pair_kernel(self, k11, k12, k22, want_dot):
            nngp, dot = super().pair_kernel(k11, k12, k22, want_dot)
            return 2 * nngp, dot

    def centred(layer):
        state = ntkgp.serial(ntkgp.Dense(1, 1.5, 0.1), layer).kernel_map(ntkgp.layers.state.KernelState.from_inputs(x))
        return state.centred()

    def same(got, want, want_diagonal):
        # bitwise: off the diagonal against the pair formulas on the matrix, on it against the same
        # formulas on the vector of variances, as the layer computes its diagonal (torch's vectorized
        # functions round a 4-vector and a 4 × 4 matrix an ulp apart on some CPUs: 3.5e-16 measured)
        off = ~torch.eye(4, dtype=torch.bool)
        torch.testing.assert_close(got[off], want[off], rtol=0, atol=0)
        torch.testing.assert_close(got.diagonal(), want_diagonal, rtol=0, atol=0)

    torch.testing.assert_close(centred(Shifted())[0], centred(ntkgp.ReLU())[0] + 0.01, rtol=0, atol=0)
    state = ntkgp.Dense(1, 1.5, 0.1).kernel_map(ntkgp.layers.state.KernelState.from_inputs(x))
    k11, k12, k22, k = state.k11, state.nngp, state.k22, state.cov1
    scaled = Scaled()   # GELU's centred kernel takes T where |ρ| > 1/2: the scaled one
    want = ntkgp.GELU().centred_pair_kernel(k11, k12, k22, scaled.pair_kernel(k11, k12, k22, False)[0])
    same(centred(scaled)[0], want, ntkgp.GELU().centred_pair_kernel(k, k, k, scaled.pair_kernel(k, k, k, False)[0]))
    relu = ntkgp.ReLU()   # set on the instance (benchmarks/layernorm.py's baseline)
    relu.centred_pair_kernel = lambda k11, k12, k22, nngp: nngp - relu.mean(k11) * relu.mean(k22)
    want = relu.pair_kernel(k11, k12, k22, False)[0] - relu.mean(k11) * relu.mean(k22)
    # (ReLU's own centred kernel is 2e-16–6e-16 off this one, off the diagonal too)
    same(centred(relu)[0], want, relu.variance(k) - relu.mean(k) * relu.mean(k))


# (activation, weight variance): odd activations whose LayerNorm stacks expand correlations near ρ = −1
@pytest.mark.parametrize(("make", "weight_var"),
                         [(ntkgp.Gabor, 1.0), (ntkgp.Erf, 20.0), (lambda: ntkgp.Hermite(3), 1.0)],
                         ids=["gabor", "erf", "hermite3"])
def test_opposite_inputs_stay_opposite_through_a_deep_layernorm_stack(make, weight_var):
    """``x2 = −x1`` through 30 blocks ``Dense → odd φ → LayerNorm``: ``K12 = −K11`` and ``Θ12 = −Θ11``
    exactly in exact arithmetic. ``LayerNorm`` normalized the variances as ``k/(eps + k)`` and the pairs
    by ``rsqrt(eps + k11)·rsqrt(eps + k22)``, an ulp apart at ``k11 = k22``; these layers expand
    correlations near ``ρ = −1`` (chaotic phase), which grew that ulp each block: ``K12/K11 + 1`` was
    0.917 (Gabor), 0.049 (Erf, σ_w² = 20) and 0.019 (Hermite(3), the kernel indefinite) at depth 30.
    Now the variances take the pairs' ``rsqrt(eps + k)²``: ``K`` within 4 ulps (measured ≤ 1), ``Θ``,
    which accumulates each block's rounding without feeding back, within 4 ulps per block (measured 23
    ulps over 30 blocks), and no eigenvalue below ``−4ε`` of the largest."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, dtype=torch.float64)
    x[1] = -x[0]
    net = ntkgp.serial(*[m for _ in range(30) for m in (ntkgp.Dense(4, weight_var, None), make(), ntkgp.LayerNorm())],
                       ntkgp.Dense(1, 1.0, None))
    with torch.no_grad():
        k = net.kernel(3 * x)
    eps = torch.finfo(torch.float64).eps
    assert float(abs(k.nngp[0, 1] + k.nngp[0, 0])) <= 4 * eps * float(k.nngp[0, 0])
    assert float(abs(k.ntk[0, 1] + k.ntk[0, 0])) <= 30 * 4 * eps * float(k.ntk[0, 0])
    eigenvalues = torch.linalg.eigvalsh(k.nngp)
    assert float(eigenvalues.min()) >= -4 * eps * float(eigenvalues.max())


def test_layernorm_diagonal_kernels_equal_the_full_kernels_diagonal():
    """``kernel(x, diag=True)`` normalized ``Θ`` by ``1/(eps + k)`` and the full kernel's diagonal by
    ``rsqrt(eps + k)²``: up to 5.7e-14 apart (Gabor, two LayerNorms). Both take the latter now, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64) * 2
    for act in (ntkgp.Erf(), ntkgp.Gabor(), ntkgp.GELU()):
        net = ntkgp.serial(ntkgp.Dense(4, 2.0, 0.1), act, ntkgp.LayerNorm(), ntkgp.Dense(4), act, ntkgp.LayerNorm(),
                           ntkgp.Dense(1))
        with torch.no_grad():
            full, diag = net.kernel(x), net.kernel(x, diag=True)
        assert torch.equal(full.nngp.diagonal(), diag.nngp)
        assert torch.equal(full.ntk.diagonal(), diag.ntk)
