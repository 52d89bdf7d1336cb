"""Every closed-form activation kernel against independent 2-D quadrature (float64, ≤ 1e-8)."""

from __future__ import annotations

import inspect
import math
import warnings

import gpytorch
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch

import ntkgp
from ntkgp.layers import gauss_hermite_expectation

from quadrature import cartesian, polar

pytestmark = pytest.mark.usefixtures("float64_default")

# (k11, k22, correlation): unit and unequal variances, strong/weak/negative correlation, exact
# ±1 (a point with itself, a reflected point), zero correlation.
TRIPLES = [
    (1.0, 1.0, 0.3), (0.7, 1.9, 0.8), (2.5, 0.4, -0.6), (1.3, 1.3, 1.0), (0.9, 2.2, -1.0),
    (0.05, 1.5, 0.0), (1.7, 0.6, 0.999), (0.3, 0.3, -0.2),
]


def _relu_like(a: float, b: float):
    return lambda x: a * np.minimum(x, 0) + b * np.maximum(x, 0), lambda x: np.where(x > 0, b, a)


def _erf(a, b, c):
    return (lambda x: a * scipy.special.erf(b * x) + c,
            lambda x: a * b * 2 / math.sqrt(math.pi) * np.exp(-(b * x) ** 2))


def _sin(a, b, c):
    return lambda x: a * np.sin(b * x + c), lambda x: a * b * np.cos(b * x + c)


def _gelu():
    pdf = lambda x: np.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + scipy.special.erf(x / math.sqrt(2)))  # noqa: E731
    return lambda x: x * cdf(x), lambda x: cdf(x) + x * pdf(x)


def _cartesian_fine(f, g, k11: float, k12: float, k22: float) -> float:
    """:func:`cartesian` at degree 400, for an integrand as narrow as Gabor's ``exp(−u²)`` against
    ``N(0, 3)`` (degree 160 is 2.7e-8 off there, degree 400 ≤ 2e-15)."""
    return cartesian(f, g, k11, k12, k22, degree=400)


# layer, (φ, φ'), quadrature rule, whether Ṫ is E[φ'φ'] (Sign uses the a.e. derivative 0)
CASES = {
    "relu": (ntkgp.ReLU(), _relu_like(0.0, 1.0), polar),
    "leaky_relu": (ntkgp.LeakyReLU(0.2), _relu_like(0.2, 1.0), polar),
    "abrelu": (ntkgp.ABReLU(-0.4, 1.3), _relu_like(-0.4, 1.3), polar),
    "abs": (ntkgp.Abs(), _relu_like(-1.0, 1.0), polar),
    "sign": (ntkgp.Sign(), (np.sign, lambda x: 0 * x), polar),
    "erf": (ntkgp.Erf(), _erf(1.0, 1.0, 0.0), cartesian),
    "erf_abc": (ntkgp.Erf(1.3, 0.7, 0.2), _erf(1.3, 0.7, 0.2), cartesian),
    "gelu": (ntkgp.GELU(), _gelu(), cartesian),
    "sin": (ntkgp.Sin(1.2, 0.8, 0.3), _sin(1.2, 0.8, 0.3), cartesian),
    "cos": (ntkgp.Cos(0.9, 1.1, -0.2), _sin(0.9, 1.1, -0.2 + math.pi / 2), cartesian),
    "exp": (ntkgp.Exp(1.3, 0.7), (lambda x: 1.3 * np.exp(0.7 * x), lambda x: 0.91 * np.exp(0.7 * x)), cartesian),
    "gaussian": (ntkgp.Gaussian(1.4, -0.6), (lambda x: 1.4 * np.exp(-0.6 * x * x),
                                             lambda x: -1.68 * x * np.exp(-0.6 * x * x)), cartesian),
    "polynomial": (ntkgp.Polynomial([0.3, -1.0, 0.5, 0.2]), (lambda x: 0.3 - x + 0.5 * x**2 + 0.2 * x**3,
                                                              lambda x: -1 + x + 0.6 * x**2), cartesian),
    "monomial": (ntkgp.Monomial(4), (lambda x: x**4, lambda x: 4 * x**3), cartesian),
    "rbf": (ntkgp.Rbf(0.7), _sin(math.sqrt(2), math.sqrt(1.4), math.pi / 4), cartesian),
    "gabor": (ntkgp.Gabor(), (lambda x: np.exp(-x * x) * np.sin(x),
                              lambda x: np.exp(-x * x) * (np.cos(x) - 2 * x * np.sin(x))), _cartesian_fine),
    "sigmoid_like": (ntkgp.SigmoidLike(), _erf(0.5, 1 / 2.4020563531719796, 0.5), cartesian),
    "hermite3": (ntkgp.Hermite(3), (lambda x: (x**3 - 3 * x) / math.sqrt(6), lambda x: (3 * x**2 - 3) / math.sqrt(6)),
                 cartesian),
    "hermite4": (ntkgp.Hermite(4), (lambda x: (x**4 - 6 * x**2 + 3) / math.sqrt(24),
                                    lambda x: (4 * x**3 - 12 * x) / math.sqrt(24)), cartesian),
    "step": (ntkgp.RectifiedMonomial(0), (lambda x: (x > 0) * 1.0, lambda x: 0 * x), polar),
    "requ": (ntkgp.RectifiedMonomial(2), (lambda x: np.maximum(x, 0) ** 2, lambda x: 2 * np.maximum(x, 0)), polar),
    "rectified_cube": (ntkgp.RectifiedMonomial(3), (lambda x: np.maximum(x, 0) ** 3,
                                                    lambda x: 3 * np.maximum(x, 0) ** 2), polar),
}


def _closed_form(layer, k11, k12, k22):
    t = lambda v: torch.tensor([v])  # noqa: E731
    value, dot = layer.pair_kernel(t(k11), t(k12), t(k22), True)
    return float(value), float(dot)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("triple", TRIPLES, ids=lambda t: f"{t[0]}-{t[1]}-{t[2]}")
def test_closed_form_matches_quadrature(name, triple):
    layer, (phi, dphi), rule = CASES[name]
    k11, k22, rho = triple
    k12 = rho * math.sqrt(k11 * k22)
    value, dot = _closed_form(layer, k11, k12, k22)
    expected = rule(phi, phi, k11, k12, k22)
    expected_dot = rule(dphi, dphi, k11, k12, k22)
    scale = math.sqrt(rule(phi, phi, k11, k11, k11) * rule(phi, phi, k22, k22, k22))
    assert abs(value - expected) <= 1e-8 * scale
    if name in ("sign", "step"):
        assert dot == 0.0  # neural-tangents' convention: φ' = 0 almost everywhere
    else:
        dot_scale = math.sqrt(rule(dphi, dphi, k11, k11, k11) * rule(dphi, dphi, k22, k22, k22))
        assert abs(dot - expected_dot) <= 1e-8 * dot_scale


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("k", [1e-3, 0.4, 1.0, 3.0])
def test_variance_matches_quadrature(name, k):
    layer, (phi, _), rule = CASES[name]
    value = float(layer.variance(torch.tensor([k])))
    expected = rule(phi, phi, k, k, k)
    assert abs(value - expected) <= 1e-8 * max(abs(expected), 1e-12)
    # The dedicated variance formula is the pair formula on the diagonal.
    assert abs(value - _closed_form(layer, k, k, k)[0]) <= 1e-13 * max(abs(value), 1e-12)


def test_relu_weight_var_2_is_cho_saul_arc_cosine_composition():
    """ReLU with σ_w² = 2, no bias: K_{l+1} = ‖x‖‖x'‖ J1(θ_l)/π with J1 = sin θ + (π − θ) cos θ."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    depth = 4
    net = ntkgp.serial(*[ntkgp.Dense(100, 2.0, None), ntkgp.ReLU()] * depth, ntkgp.Dense(1, 2.0, None))
    k = net.kernel(x).nngp.detach()
    norms = x.norm(dim=1)
    cos = (x @ x.T / torch.outer(norms, norms)).clamp(-1, 1)
    for _ in range(depth):
        theta = torch.arccos(cos)
        cos = ((torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / math.pi).clamp(-1, 1)
    expected = 2 * torch.outer(norms, norms) / x.shape[1] * cos
    torch.testing.assert_close(k, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("fn,closed", [
    (torch.erf, ntkgp.Erf()),
    (torch.sin, ntkgp.Sin()),
    (torch.nn.functional.gelu, ntkgp.GELU()),
])
def test_numerical_layer_matches_closed_forms(fn, closed):
    torch.manual_seed(1)
    x1, x2 = torch.randn(7, 3) / 2, torch.randn(5, 3) / 2
    make = lambda act: ntkgp.serial(ntkgp.Dense(8, 1.8, 0.1), act, ntkgp.Dense(8, 1.2, 0.2), act, ntkgp.Dense(1))  # noqa: E731
    numerical = ntkgp.Numerical(fn)
    with torch.no_grad():
        got, want = make(numerical).kernel(x1, x2), make(closed).kernel(x1, x2)
    for attr in ("nngp", "ntk"):
        a, b = getattr(got, attr), getattr(want, attr)
        assert float((a - b).norm() / b.norm()) < 1e-7
    assert numerical.last_degree is not None and numerical.last_degree >= 16


@pytest.mark.parametrize("fn,closed", [(torch.relu, ntkgp.ReLU()), (torch.abs, ntkgp.Abs())])
def test_numerical_does_not_settle_early_on_a_kink(fn, closed):
    """The adaptive degree was chosen from a point paired with itself, where any symmetric rule
    integrates relu(u)² exactly: it stopped at degree 24 without a warning, and off-diagonal NTK
    entries were 3 % (relu) and 6 % (abs) of the diagonal scale off. The off-diagonal correlations
    ±1/2 now show the kink: the rule runs to its cap, is 10× closer, and says it missed rtol."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    make = lambda act: ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), act, ntkgp.Dense(1, 1.0, 0.0))  # noqa: E731
    numerical = ntkgp.Numerical(fn)
    with pytest.warns(RuntimeWarning, match="did not reach rtol"), torch.no_grad():
        got = make(numerical).kernel(x)
    with torch.no_grad():
        want = make(closed).kernel(x)
    assert numerical.last_degree == numerical.max_degree
    for attr, bound in (("nngp", 1e-3), ("ntk", 1.2e-2)):
        a, b = getattr(got, attr), getattr(want, attr)
        scale = (b.diagonal()[:, None] * b.diagonal()[None, :]).sqrt()
        assert float(((a - b).abs() / scale).max()) < bound


def test_numerical_settles_at_zero_variance_in_float32():
    """The change between degrees was relative to max(|value|, 1e-300), and 1e-300 is 0 in
    float32: tanh at variance 0 gave 0/0, never settled, ran to degree 300 and warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, degrees = ntkgp.Numerical(torch.tanh).variance_degrees(torch.tensor([0.0, 1.0]))
    assert int(degrees[0]) <= 24


def test_numerical_fixed_degree_is_what_neural_tangents_uses_and_is_less_accurate():
    """degree=25 (neural-tangents' suggested start) is off by % for tanh at variance 4; adaptive is not."""
    k = torch.tensor([4.0])
    fixed = ntkgp.Numerical(torch.tanh, degree=25).pair_kernel(k, 0.9 * k, k, True)
    adaptive = ntkgp.Numerical(torch.tanh).pair_kernel(k, 0.9 * k, k, True)
    tanh_dot = lambda x: 1 / np.cosh(x) ** 2  # noqa: E731
    exact_dot = cartesian(tanh_dot, tanh_dot, 4.0, 3.6, 4.0, degree=600)
    assert abs(float(adaptive[1]) - exact_dot) < 1e-7 * exact_dot
    assert abs(float(fixed[1]) - exact_dot) > 1e-3 * exact_dot


class _Counting:
    """``fn``, counting the points it is evaluated at (the quadratures' cost)."""

    def __init__(self, fn):
        self.fn, self.points, self.__name__ = fn, 0, fn.__name__

    def __call__(self, x):
        self.points += x.numel()
        return self.fn(x)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 3e-6)])
def test_numerical_quadrature_integrates_each_distinct_pair_once(dtype, rtol):
    """A symmetric kernel's two triangles were both integrated, a point with itself (``v`` a multiple
    of ``u``) took ``degree²`` evaluations of ``φ`` where ``degree`` do, and ``Ṫ`` evaluated ``φ`` again
    inside autograd: 5 points at degree 30 cost 46 500 evaluations for ``T`` and ``Ṫ``. Each
    distinct pair now costs ``degree² + degree``, a point with itself ``2 degree``, ``T`` and ``Ṫ``
    together, and the values are the tensor-product rule's."""
    n, degree = 5, 30
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k = (x @ x.T / 3 + 0.1).to(dtype)
    var = k.diagonal()
    tanh = _Counting(torch.tanh)
    layer = ntkgp.Numerical(tanh, degree=degree)
    tanh.points = 0
    nngp, dot = layer.pair_kernel(var[:, None], k, var[None, :], True)
    assert tanh.points <= n * (n - 1) // 2 * (degree**2 + degree) + n * 2 * degree
    sech2 = lambda t: 1 / np.cosh(t) ** 2  # noqa: E731
    kd, vd = k.double(), var.double()
    # the rule is not symmetric in the two variances at a finite degree: the smaller is taken as k11
    small, large = torch.minimum(vd[:, None], vd[None, :]), torch.maximum(vd[:, None], vd[None, :])
    for got, f in ((nngp, np.tanh), (dot, sech2)):
        want = torch.tensor([[cartesian(f, f, float(small[i, j]), float(kd[i, j]), float(large[i, j]), degree)
                              for j in range(n)] for i in range(n)], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
        assert torch.equal(got, got.T)


def test_numerical_gradients_take_the_derivatives_at_each_node_from_one_chain():
    """The gradients of ``T`` and ``Ṫ`` are six quadratures of ``φ``..``φ‴`` (Price's theorem), and
    ``derivative(r)`` evaluated ``φ`` and ``r`` backward passes afresh for each: the backward of 4
    points at degree 30 evaluated ``φ`` at 89 280 points. The derivatives at a set of nodes now come
    from one chain of passes (one for the symmetric orders, one for the others), with the same values."""
    n, degree = 4, 30
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    k = x @ x.T / 2 + 0.2
    softplus = _Counting(torch.nn.functional.softplus)
    layer = ntkgp.Numerical(softplus, degree=degree)
    k11, k12, k22 = (t.clone().requires_grad_() for t in (k.diagonal()[:, None], k, k.diagonal()[None, :]))

    def gradients():
        nngp, dot = layer.pair_kernel(k11, k12, k22, True)
        return torch.autograd.grad(nngp.sum() + dot.sum(), (k11, k12, k22))

    gradients()   # the first call checks φ's derivatives for jumps on a grid
    softplus.points = 0
    layer.pair_kernel(k11, k12, k22, True)
    forward, softplus.points = softplus.points, 0
    g11, g12, g22 = gradients()
    # φ on the nodes of each distinct entry twice (the two chains): ordered symmetric pairs, then all pairs
    assert softplus.points - forward <= 3 * n * (n - 1) // 2 * (degree**2 + degree) + 4 * n * degree

    def expect(i, j):
        return gauss_hermite_expectation(layer.derivative(i), layer.derivative(j), k11, k12, k22, degree)

    torch.testing.assert_close(g12, expect(1, 1) + expect(2, 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(g11, (0.5 * (expect(2, 0) + expect(3, 1))).sum(1, keepdim=True), rtol=1e-12, atol=0)
    torch.testing.assert_close(g22, (0.5 * (expect(0, 2) + expect(1, 3))).sum(0, keepdim=True), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:Numerical.tanh, degree=40.")   # the gradients' degree, as meant
def test_numerical_centred_gradients_order_the_variances_of_symmetric_quadratures():
    """The centred kernel's gradients (LayerNorm after a ``Numerical``) are ``E[φ''ψ]``, ``E[φ'φ']`` and
    ``E[ψφ'']`` in one quadrature; ``E[φ'φ']`` had lost the ordering of each entry's two variances that
    its own call gives, so a symmetric kernel's ``∂/∂k12`` was not symmetric and differed from
    ``E[φ'φ']`` by the rule's truncation (7.6e-5 relative here at degree 40, 1e-10 adaptive)."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    k = x @ x.T / 3 + 0.2
    layer = ntkgp.Numerical(torch.tanh, degree=40)
    k11, k12, k22 = (t.clone().requires_grad_() for t in (k.diagonal()[:, None], k, k.diagonal()[None, :]))
    centred = layer.centred_pair_kernel(k11, k12, k22, None)
    _, g12, _ = torch.autograd.grad(centred.sum(), (k11, k12, k22))
    assert torch.equal(g12, g12.T)
    d1 = layer.derivative(1)
    # the same quadrature on its own: only the summation's rounding apart
    torch.testing.assert_close(g12, gauss_hermite_expectation(d1, d1, k11, k12, k22, 40), rtol=1e-14, atol=0)


def test_gauss_hermite_expectation_merges_equal_entries_at_their_own_degrees_in_bfloat16():
    """Equal entries are integrated once, their degrees merged as floats beside the variances:
    bfloat16 rounds degree 257 to 256, and entries asking for 257 were integrated at 256 (0.00534
    where 257 gives 0.00507, 5 % apart). Each entry is now its own degree's rule, exactly."""
    f = lambda t: torch.sin(3 * t)  # noqa: E731
    k = torch.ones(3, dtype=torch.bfloat16)
    degrees = torch.tensor([257, 257, 300])
    got = gauss_hermite_expectation(f, f, k, 0.5 * k, k, degrees)
    for entry, degree in enumerate(degrees.tolist()):
        alone = gauss_hermite_expectation(f, f, k[:1], 0.5 * k[:1], k[:1], degree)
        assert torch.equal(got[entry:entry + 1], alone)


def test_numerical_kernels_in_checkpointed_row_blocks_have_the_same_gradients(monkeypatch):
    """Large kernels with autograd are formed in checkpointed row blocks (above ``CHECKPOINT_ENTRIES``,
    a million entries), recomputed in the backward pass. The recomputation read the layer's degree
    search back where the forward pass had run it, so it saved fewer tensors (the search's own
    autograd graph of ``φ'`` at the nodes) and checkpoint refused it ("Recomputed values ... have
    different metadata"). The gradients are now those of the whole kernel."""
    from ntkgp.layers import base

    def gradients():
        torch.manual_seed(0)
        net = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Numerical(torch.tanh), ntkgp.Dense(1, 1.1, 0.1))
        x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1)).requires_grad_()
        k = net.kernel(x)
        return torch.autograd.grad(k.nngp.sum() + k.ntk.sum(), [x, *net.parameters()])

    whole = gradients()
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 1)
    for got, want in zip(gradients(), whole, strict=True):
        # the same quadratures, summed over blocks of rows in another order
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_numerical_degree_search_is_not_repeated_for_the_same_variances():
    """A layer's kernel map searches the degrees of its pairs' variances for ``T`` and ``Ṫ``, then of
    the same variances for ``T`` alone (:meth:`Activation.variance`): the second search redid the
    first's quadratures. The degrees found are those of a fresh search, and a changed ``rtol``
    searches again."""
    variances = torch.tensor([0.3, 2.0, 7.5])
    softplus = _Counting(torch.nn.functional.softplus)
    layer = ntkgp.Numerical(softplus)

    def fresh(want_dot, rtol=1e-7):
        return ntkgp.Numerical(torch.nn.functional.softplus, rtol=rtol).variance_degrees(variances, want_dot)[1]

    _, both = layer.variance_degrees(variances, True)
    softplus.points = 0
    values, values_only = layer.variance_degrees(variances[1:], False)   # a subset, as map_covs asks for
    assert softplus.points == 0
    assert torch.equal(values, variances[1:])
    assert torch.equal(both, fresh(True)) and torch.equal(values_only, fresh(False)[1:])
    assert bool((values_only < both[1:]).all())   # T alone settles earlier: a different answer, not a copy
    layer.rtol = 1e-4
    _, loose = layer.variance_degrees(variances, False)
    assert softplus.points > 0 and torch.equal(loose, fresh(False, rtol=1e-4))
    capped = ntkgp.Numerical(torch.tanh, max_degree=24)
    for want_dot in (True, False, True):   # the last two read the first search back, and warn as it did
        with pytest.warns(RuntimeWarning, match="did not reach rtol=1e-07 by degree 24"):
            capped.variance_degrees(torch.tensor([40.0]), want_dot)


def test_elementwise_derives_ntk_factor_by_autograd():
    def erf_nngp(k12, k11, k22):
        return 2 / math.pi * torch.arcsin(2 * k12 / torch.sqrt((1 + 2 * k11) * (1 + 2 * k22)))

    layer = ntkgp.Elementwise(torch.erf, erf_nngp)
    k11, k22 = torch.tensor([[0.7], [1.4]]), torch.tensor([[1.1, 0.3, 2.0]])
    k12 = torch.tensor([[0.2, -0.3, 0.9], [0.5, 0.1, -1.2]])
    value, dot = layer.pair_kernel(k11, k12, k22, True)
    ref_value, ref_dot = ntkgp.Erf().pair_kernel(k11, k12, k22, True)
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=0)
    torch.testing.assert_close(dot, ref_dot, rtol=1e-12, atol=0)
    assert not value.requires_grad and not dot.requires_grad


@pytest.mark.parametrize("make_act", [ntkgp.ReLU, lambda: ntkgp.LeakyReLU(0.3), lambda: ntkgp.ABReLU(-0.2, 1.5),
                                      ntkgp.Abs, lambda: ntkgp.Erf(1.3, 0.7, 0.4), ntkgp.GELU,
                                      lambda: ntkgp.Sin(1.2, 2.0, 0.7), lambda: ntkgp.Cos(0.8, 0.5, 0.3), ntkgp.Sign,
                                      lambda: ntkgp.Exp(1.2, 0.6), lambda: ntkgp.Gaussian(1.3, -0.7),
                                      lambda: ntkgp.Polynomial([0.3, -1.0, 0.5, 0.2, -0.1]),
                                      lambda: ntkgp.RectifiedMonomial(0), lambda: ntkgp.RectifiedMonomial(3),
                                      lambda: ntkgp.Rbf(0.7), ntkgp.SigmoidLike, lambda: ntkgp.Hermite(4),
                                      lambda: ntkgp.Hermite(3), ntkgp.Gabor,
                                      lambda: ntkgp.Numerical(torch.nn.functional.softplus)],
                         ids=["relu", "leaky", "abrelu", "abs", "erf", "gelu", "sin", "cos", "sign", "exp", "gaussian",
                              "polynomial", "step", "rectified_cube", "rbf", "sigmoid_like", "hermite4", "hermite3",
                              "gabor", "numerical"])
def test_activation_means_match_one_dimensional_quadrature(make_act):
    """E[φ(u)], u ~ N(0, k), the mean a LayerNorm after the layer subtracts, against scipy's adaptive
    quadrature at variances from 1e-6 to 20 (closed forms measured ≤ 6.5e-16 relative to the larger of
    the mean and sqrt(k); Numerical's 1-D Gauss–Hermite ≤ 4.3e-10)."""
    act = make_act()
    k = torch.tensor([1e-6, 0.03, 1.0, 5.0, 20.0], dtype=torch.float64)
    with torch.no_grad():
        got = act.mean(k)
    def integrand(z: float, sd: float) -> float:   # φ(sd z) times the standard normal density
        return float(act.fn(torch.tensor(sd * z, dtype=torch.float64))) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    tol = 1e-8 if isinstance(act, ntkgp.Numerical) else 1e-11
    for value, var in zip(got.tolist(), k.tolist(), strict=True):
        sd = math.sqrt(var)
        exact = sum(scipy.integrate.quad(integrand, a, b, args=(sd,), epsabs=1e-14, epsrel=1e-12, limit=200)[0]
                    for a, b in ((-12.0, 0.0), (0.0, 12.0)))   # split at the kinks of the ReLU family and Sign
        assert abs(value - exact) <= tol * max(abs(exact), sd), (var, value, exact)


def _layernorm_net(act, x):
    return ntkgp.serial(ntkgp.Dense(1, 1.4, 0.2), act, ntkgp.LayerNorm(), ntkgp.Dense(1, 1.3, 0.1)).double()


def _kernels_and_gradients(act, x):
    net = _layernorm_net(act, x)
    k = net.kernel(x)
    grads = torch.autograd.grad(k.nngp.sum() + (k.ntk * k.ntk).sum(), list(net.parameters()))
    return k.nngp.detach(), k.ntk.detach(), grads


def test_layernorm_means_of_numerical_and_elementwise_layers_match_the_closed_forms():
    """The mean a LayerNorm subtracts, by 1-D quadrature (Numerical) or from mean_fn (Elementwise),
    gives the closed forms' kernels and hyperparameter gradients; Elementwise without mean_fn is
    refused, and a wrong mean_fn shape is named."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x[3] = 0.0
    relu_nngp = lambda k12, k11, k22: ntkgp.ReLU().pair_kernel(k11, k12, k22, False)[0]  # noqa: E731
    relu_dot = lambda k12, k11, k22: ntkgp.ReLU().pair_kernel(k11, k12, k22, True)[1]  # noqa: E731
    relu_mean = lambda k: torch.sqrt(k / (2 * math.pi))  # noqa: E731
    # Numerical's adaptive degree targets rtol = 1e-7 for T and Ṫ (measured: kernels ≤ 4e-11,
    # gradients, quadratures of higher derivatives at the same degree, ≤ 6e-8)
    pairs = [(ntkgp.Numerical(lambda t: torch.erf(t) + 0.3), ntkgp.Erf(c=0.3), 5e-7),
             (ntkgp.Numerical(torch.nn.functional.gelu), ntkgp.GELU(), 5e-7),
             (ntkgp.Elementwise(torch.relu, relu_nngp, relu_dot, mean_fn=relu_mean), ntkgp.ReLU(), 1e-13)]
    for layer, closed, rtol in pairs:
        got, want = _kernels_and_gradients(layer, x), _kernels_and_gradients(closed, x)
        for g, w in zip([*got[:2], *got[2]], [*want[:2], *want[2]], strict=True):
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()))
    with pytest.raises(ValueError, match="mean_fn"):
        _layernorm_net(ntkgp.Elementwise(torch.relu, relu_nngp, relu_dot), x).kernel(x)
    with pytest.raises(ValueError, match="mean_fn must return"):
        _layernorm_net(ntkgp.Elementwise(torch.relu, relu_nngp, relu_dot, mean_fn=lambda k: k.sum()), x).kernel(x)


def test_layernorm_after_an_activation_in_float32():
    """float32 kernels of ReLU → LayerNorm agree with float64 to float32 rounding."""
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    net = ntkgp.serial(ntkgp.Dense(1, 1.4, 0.2), ntkgp.ReLU(), ntkgp.LayerNorm(), ntkgp.Dense(1, 1.3, 0.1),
                       ntkgp.GELU(), ntkgp.Dense(1))
    with torch.no_grad():
        k64, k32 = net.kernel(x), net.kernel(x.float())
    for a, b in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("make_act", [lambda: ntkgp.Cos(c=0.3), lambda: ntkgp.Sin(c=1.0), lambda: ntkgp.Sin(c=0.3),
                                      lambda: ntkgp.Erf(c=0.4), ntkgp.Exp, ntkgp.Gaussian,
                                      lambda: ntkgp.Polynomial([0.5, 1.0, 0.3]), lambda: ntkgp.Rbf(0.7),
                                      ntkgp.SigmoidLike, lambda: ntkgp.Hermite(2),
                                      lambda: ntkgp.Numerical(torch.nn.functional.softplus)],
                         ids=["cos", "sin", "sin_cos2c_positive", "erf", "exp", "gaussian", "polynomial", "rbf",
                              "sigmoid_like", "hermite2", "numerical_softplus"])
def test_layernorm_after_an_activation_at_small_variances(make_act):
    """At small variances T and μ1μ2 agree to O(k) (Cos: both ≈ 1) and LayerNorm divides their
    difference by up to 1/eps = 1e12: computed as a difference, float32 kernels read −59604 for
    0.49 at inputs ~1e-4, and a zero input without bias (constant features, which the finite
    layer maps to exactly 0) read 0.99998. The centred forms keep float32 within 1e-6 of float64
    (1e-4 for Numerical: its float32 quadrature nodes) and the zero input at exactly 0."""
    x = 1e-4 * torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[3] = 0.0
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, None), make_act(), ntkgp.LayerNorm(), ntkgp.Dense(1, 1.0, 0.0))
    with torch.no_grad():
        k64, k32 = net.kernel(x).nngp, net.kernel(x.float()).nngp
    tol = 1e-4 if isinstance(net[1], ntkgp.Numerical) else 1e-6
    torch.testing.assert_close(k32.double(), k64, rtol=0, atol=tol)
    assert float(k64[3].abs().max()) == 0.0 and float(k32[3].abs().max()) == 0.0


def test_layernorm_after_an_activation_through_identity_and_twice():
    """An Identity between the activation and the LayerNorm passes the centred kernels on (equal
    bit for bit); a second LayerNorm normalizes the exactly centred output again, eps-close."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def kernel(*middle):
        return ntkgp.serial(ntkgp.Dense(1, 1.4, 0.2), ntkgp.GELU(), *middle, ntkgp.Dense(1, 1.3, 0.1)).kernel(x)

    with torch.no_grad():
        once, through, twice = (kernel(ntkgp.LayerNorm()), kernel(ntkgp.Identity(), ntkgp.LayerNorm()),
                                kernel(ntkgp.LayerNorm(), ntkgp.LayerNorm()))
    assert torch.equal(through.nngp, once.nngp) and torch.equal(through.ntk, once.ntk)
    # the second one divides by sqrt(eps + c), c = v/(eps + v) = 1 − eps/v (measured: 4e-11)
    torch.testing.assert_close(twice.nngp, once.nngp, rtol=1e-9, atol=0)
    torch.testing.assert_close(twice.ntk, once.ntk, rtol=1e-9, atol=0)


@pytest.mark.filterwarnings("ignore:Numerical.tanh, degree=40.")
def test_numerical_layers_pickled_before_new_attributes_still_differentiate():
    """A Numerical pickled by an earlier version lacks the attributes added since (the fixed-degree
    check's, the centred quadrature's): unpickled, it fills them in instead of failing in backward."""
    layer = ntkgp.Numerical(torch.tanh, degree=40)
    state = layer.__getstate__()
    for name in ("_warned_degree", "_degrees_checked", "_warned_rough", "_jumps"):
        state.pop(name)
    old = ntkgp.Numerical.__new__(ntkgp.Numerical)
    old.__setstate__(state)
    net = ntkgp.serial(ntkgp.Dense(1, 1.5, 0.1), old, ntkgp.LayerNorm(), ntkgp.Dense(1)).double()
    net.kernel(torch.randn(4, 2, dtype=torch.float64)).ntk.sum().backward()
    assert repr(ntkgp.Cos(c=1.4)).endswith("c=1.4)")   # the phase given, not Sin's c + π/2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layernorm_after_erf_does_not_depend_on_its_shift(dtype):
    """Erf(a, b, c) features minus their mean c are those of Erf(a, b, 0): T − c² formed as a
    difference lost every digit at c = 1e8 (float64) and c = 1e4 (float32)."""
    x = torch.randn(5, 3, dtype=dtype, generator=torch.Generator().manual_seed(2))

    def kernel(c):
        with torch.no_grad():
            return ntkgp.serial(ntkgp.Dense(1, 1.5, 0.1), ntkgp.Erf(1.0, 1.0, c), ntkgp.LayerNorm(),
                                ntkgp.Dense(1, 1.0, 0.1)).kernel(x)

    for c in (1e4, 1e8):
        shifted, plain = kernel(c), kernel(0.0)
        torch.testing.assert_close(shifted.nngp, plain.nngp, rtol=0, atol=0)
        torch.testing.assert_close(shifted.ntk, plain.ntk, rtol=0, atol=0)


def _pair_gradients(layer, var):
    ks = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (var, 0.3 * var, 1.2 * var)]
    nngp, dot = layer.pair_kernel(*ks, True)
    return torch.cat(torch.autograd.grad(nngp.sum() + dot.sum(), ks))


@pytest.mark.parametrize(("b", "degree", "var", "warns"), [(1.0, 12, 3.0, True), (1.0, 100, 0.5, False),
                                                        (3.0, 300, 3.0, True), (3.0, 60, 0.05, False)])
def test_a_fixed_degree_too_low_for_the_gradients_warns(b, degree, var, warns):
    """Gradients integrate higher derivatives than the values: with a fixed degree they were silently
    far off (tanh(10x) at degree 300: −4.8 for 0.027). A warning says so when the quadratures change
    by more than 1e-3 from degree to 1.5 degree; measured against erf(b x)'s closed form, the
    gradients are then more than 1e-3 off, and within 1e-6 where nothing is said."""
    layer = ntkgp.Numerical(lambda x: torch.erf(b * x), degree=degree)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixed = _pair_gradients(layer, var)
        _pair_gradients(layer, var)   # once per layer
    said = [w for w in caught if "far off" in str(w.message)]
    assert len(said) == (1 if warns else 0)
    exact = _pair_gradients(ntkgp.Erf(b=b), var)
    error = float((fixed - exact).abs().max() / exact.abs().max())
    assert error > 1e-3 if warns else error < 1e-6


def test_numerical_gradients_use_price_theorem():
    """Gradients of the quadrature w.r.t. the kernels equal E[φ'φ'] and ½E[φ''φ] (finite differences)."""
    layer = ntkgp.Numerical(torch.tanh, degree=80)
    k11 = torch.tensor([0.8], requires_grad=True)
    k12 = torch.tensor([0.3], requires_grad=True)
    k22 = torch.tensor([1.1], requires_grad=True)
    value, _ = layer.pair_kernel(k11, k12, k22, False)
    grads = torch.autograd.grad(value.sum(), (k11, k12, k22))
    eps = 1e-6
    for i, g in enumerate(grads):
        args = [k11.detach().clone(), k12.detach().clone(), k22.detach().clone()]
        args[i] += eps
        up = layer.pair_kernel(*args, False)[0]
        args[i] -= 2 * eps
        down = layer.pair_kernel(*args, False)[0]
        assert abs(float(g) - float((up - down) / (2 * eps))) < 1e-7


def _erf_gelu_reference(name: str, k11: float, k12: float, k22: float) -> tuple[float, float]:
    """The textbook difference-of-products forms, evaluated with 60 digits (mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    k11, k12, k22 = (mpmath.mpf(v) for v in (k11, k12, k22))
    if name == "erf":
        root = mpmath.sqrt((1 + 2 * k11) * (1 + 2 * k22) - (2 * k12) ** 2)
        return float(2 / mpmath.pi * mpmath.atan2(2 * k12, root)), float(4 / mpmath.pi / root)
    big = (1 + k11) * (1 + k22)
    delta = mpmath.sqrt(big - k12**2)
    alpha = mpmath.atan2(k12, delta)
    nngp = k12 / 4 + (k12 * alpha + (k12**2 + k11 * k22 * delta**2) / (big * delta)) / (2 * mpmath.pi)
    dot = mpmath.mpf(1) / 4 + alpha / (2 * mpmath.pi) + k12 * (1 / delta**2 + (1 - k11 * k22) / big + 1) / (
        2 * mpmath.pi * delta)
    return float(nngp), float(dot)


@pytest.mark.parametrize("name", ["erf", "gelu"])
@pytest.mark.parametrize("dtype,k", [(torch.float32, 1e3), (torch.float32, 1e7), (torch.float32, 4e10),
                                     (torch.float64, 1e7), (torch.float64, 2e16)])
def test_erf_and_gelu_keep_their_digits_at_large_variances(name, dtype, k):
    """``(1 + k11)(1 + k22) − k12²`` as a difference of products lost every digit where a point meets
    itself at large variance (inf NTK factors at k = 1e7 in float32); float32 must stay within
    a few float32 epsilons of the 60-digit value, on and off the diagonal."""
    layer = ntkgp.Erf() if name == "erf" else ntkgp.GELU()
    eps = torch.finfo(dtype).eps
    for k12 in (k, 0.3 * k, -0.999 * k):
        t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
        nngp, dot = layer.pair_kernel(t(k), t(k12), t(k), True)
        ref_nngp, ref_dot = _erf_gelu_reference(name, k, k12, k)
        for got, ref in ((nngp, ref_nngp), (dot, ref_dot)):
            assert math.isfinite(float(got))
            assert abs(float(got) - ref) <= 64 * eps * (abs(ref) + (k if got is nngp and name == "gelu" else 1)), (
                k12, float(got), ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gelu_near_opposite_inputs_keeps_its_relative_accuracy(dtype):
    """Near k12 = −sqrt(k11 k22) at large variance GELU's T is O(1/sqrt k), but k12/4 + k12 α/(2π) and
    the rest are O(sqrt k) each: with α → −π/2 from atan, T was 1.4e-8 off (relative) at k = 1e6 and
    ρ = −1 in float64, 0.24 at k = 1e10, and 59× off in float32; with z − atan z (z = δ/|k12|) taken as
    a difference, 0.5 off in float32 at k = 1e10 with k22 = 1e-3 k11. It must stay within a few ε of
    the 60-digit value times the condition number in k12 (1 + |k12 Ṫ/T|: the inputs' own rounding)."""
    eps = torch.finfo(dtype).eps
    grid = []
    for k in (1e-3, 1.0, 1e2, 1e4, 1e6, 1e10):
        for ratio in (1.0, 0.5, 1e-3):   # unequal variances: T well conditioned, z − atan z small
            for rho in (-1.0, -1 + 1e-8, -1 + 1e-4, -0.99, -0.5):
                t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
                k11, k12, k22 = t(k), t(rho * k * math.sqrt(ratio)), t(ratio * k)
                nngp, dot = ntkgp.GELU().pair_kernel(k11, k12, k22, True)
                ref_nngp, ref_dot = _erf_gelu_reference("gelu", float(k11), float(k12), float(k22))
                condition = 1 + abs(float(k12) * ref_dot / ref_nngp)
                assert abs(float(nngp) - ref_nngp) <= 4 * eps * condition * abs(ref_nngp), (k, ratio, rho)
                grid.append((k11, k12, k22, nngp, dot))
    # all at once (the near form where some pair needs it, the plain one elsewhere): the same bits
    k11, k12, k22, nngp, dot = (torch.cat(column) for column in zip(*grid, strict=True))
    together = ntkgp.GELU().pair_kernel(k11, k12, k22, True)
    assert torch.equal(together[0], nngp) and torch.equal(together[1], dot)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gelu_near_form_on_the_near_pairs_alone_matches_the_whole_block_form(dtype, monkeypatch):
    """GELU's near-opposite form is computed on the pairs that need it alone (a block with one such
    pair paid 1.75× the pair kernel for all of it); torch.func transforms and torch.compile keep the
    whole-block torch.where form. T must be bitwise that form's, Ṫ within 2 ulps (atan rounds a
    tensor's vectorized part and its tail differently), and the first derivatives in k11, k12 and
    k22 within rounding of theirs (autograd sums the same terms in another order)."""
    g = torch.Generator().manual_seed(0)
    k11 = (10 ** (4 * torch.rand(40, 1, generator=g, dtype=torch.float64) - 1)).to(dtype)
    k22 = (10 ** (4 * torch.rand(1, 50, generator=g, dtype=torch.float64) - 1)).to(dtype)
    rho = (2 * torch.rand(40, 50, generator=g, dtype=torch.float64) - 1).to(dtype)
    rho[::3, ::4] = -1 + torch.rand(14, 13, generator=g).to(dtype) * 1e-3   # near opposite
    k12 = rho * torch.sqrt(k11) * torch.sqrt(k22)

    def kernels(leaves: tuple) -> tuple:
        nngp, dot = ntkgp.GELU().pair_kernel(*leaves, True)
        grads = torch.autograd.grad((nngp * 1.3 + dot * 0.7).sum(), leaves)
        return nngp.detach(), dot.detach(), grads

    def leaves() -> tuple:
        return tuple(t.clone().requires_grad_() for t in (k11, k12, k22))

    delta = torch.sqrt(ntkgp.layers.numerics.shifted_det(k11, k12, k22)[4])
    near = delta < -k12
    assert 40 < int(near.sum()) < near.numel() // 4   # both forms present, the near one a minority
    nngp, dot, grads = kernels(leaves())
    with torch.no_grad():
        assert torch.equal(ntkgp.GELU().pair_kernel(k11, k12, k22, True)[0], nngp)   # in place, no graph
    monkeypatch.setattr(ntkgp.layers.activations, "transforms_active", lambda: True)
    ref_nngp, ref_dot, ref_grads = kernels(leaves())
    assert torch.equal(nngp, ref_nngp)
    eps = torch.finfo(dtype).eps
    assert torch.allclose(dot, ref_dot, rtol=2 * eps, atol=0)
    assert torch.equal(dot[~near], ref_dot[~near])
    for got, ref in zip(grads, ref_grads, strict=True):
        # measured: k12's up to 8.1 ε apart (its terms cancel in part), k11's and k22's (sums over a
        # row or column) 0.9 ε
        assert torch.allclose(got, ref, rtol=16 * eps, atol=0), float(((got - ref).abs() / ref.abs()).max())


def test_elementwise_diagonal_is_the_partial_derivative_with_autograd_on():
    """In the symmetric diagonal k11, k12 and k22 are one tensor; with gradients recorded the NTK
    factor must still be ∂T/∂k12, not the total derivative: diag=True = diagonal of the matrix."""
    def erf_nngp(k12, k11, k22):
        return 2 / math.pi * torch.arcsin(2 * k12 / torch.sqrt((1 + 2 * k11) * (1 + 2 * k22)))

    net = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Elementwise(torch.erf, erf_nngp), ntkgp.Dense(1, 1.0, 0.1))
    reference = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(1, 1.0, 0.1))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    kernel = ntkgp.NTKKernel(net)
    assert any(p.requires_grad for p in kernel.parameters())
    diag = kernel(x, diag=True)
    assert diag.requires_grad
    torch.testing.assert_close(diag, kernel(x).to_dense().diagonal(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diag, ntkgp.NTKKernel(reference)(x, diag=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: ntkgp.Erf(a=math.nan), lambda: ntkgp.Sin(b=math.inf),
                                  lambda: ntkgp.LeakyReLU(math.nan), lambda: ntkgp.ABReLU(math.inf, 1.0),
                                  lambda: ntkgp.Cos(c="x"), lambda: ntkgp.LayerNorm(eps=0.0),
                                  lambda: ntkgp.Exp(b=math.nan), lambda: ntkgp.Gaussian(b=0.5),
                                  lambda: ntkgp.Polynomial([]), lambda: ntkgp.Polynomial([1.0, math.inf]),
                                  lambda: ntkgp.Polynomial(2.0), lambda: ntkgp.Monomial(-1),
                                  lambda: ntkgp.RectifiedMonomial(1.5), lambda: ntkgp.Rbf(0.0),
                                  lambda: ntkgp.Rbf(-1.0), lambda: ntkgp.Rbf(math.nan), lambda: ntkgp.Hermite(-1),
                                  lambda: ntkgp.Hermite(2.5), lambda: ntkgp.Hermite(True), lambda: ntkgp.Hermite(3000),
                                  lambda: ntkgp.parallel(torch.nn.ReLU())])
def test_layers_refuse_constants_that_would_give_nan_kernels(make):
    with pytest.raises(ValueError):
        make()


def test_numerical_second_derivatives_follow_prices_theorem():
    """Double backward through Numerical (Hessian-vector products of a marginal likelihood): the
    backward is made of higher-order expectations, not a once-differentiable black box (which
    silently dropped its dependence on the kernels: 0.154 for 0.0996). Second derivatives are
    quadratures of fourth derivatives of tanh, hence the high degree (120: 0.149 for 0.091;
    300: 3e-5 off; 500: 3e-7)."""
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Numerical(torch.tanh, degree=500), ntkgp.Dense(1, 1.2, 0.1))
    raw = net.layers[0].raw_weight_var

    def first(value):
        with torch.no_grad():
            raw.fill_(value)
        (g,) = torch.autograd.grad(net.kernel(x).nngp.sum(), raw, create_graph=True)
        return g

    g = first(0.0)
    (second,) = torch.autograd.grad(g, raw)
    h = 1e-4
    fd = (first(h).detach() - first(-h).detach()) / (2 * h)
    with torch.no_grad():
        raw.zero_()
    assert abs(float(second) - float(fd)) <= 1e-5 * abs(float(fd)), (float(second), float(fd))


def test_quadrature_benchmark_runs():
    """benchmarks/quadrature.py (the figures in docs/benchmarks.md) at toy size: one row, both
    rules agree to the quadrature's tolerance."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quadrature.py"
    out = subprocess.run([sys.executable, str(script), "--sizes", "12"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["12"]]
    assert len(row) == 1 and row[0][4].endswith("x"), out.stdout
    assert float(row[0][5]) < 1e-6, out.stdout


def test_user_activations_are_checked_where_they_were_trusted():
    """A module with parameters (nn.PReLU) was taken as an activation: its kernel gradient was dropped
    and every built network shared the spec's parameter. A wrongly shaped or typed nngp_fn output
    ((1, 1) for 5 x 4 points after a .mean(), float32 for float64 kernels) or a NaN one was passed on;
    a map or activation without an autograd graph gave torch's "element 0 of tensors does not require
    grad"; max_degree below 16 was exceeded and rtol=inf accepted; mlp named "width" for a bad out_dim
    and took a Dense layer as its activation."""
    x1, x2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)

    def net(act):
        return ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), act, ntkgp.Dense(1, 1.0, 0.05))

    with pytest.raises(ValueError, match="PReLU has parameters"):
        ntkgp.Numerical(torch.nn.PReLU(init=0.25))
    with pytest.raises(ValueError, match="PReLU has parameters"):
        ntkgp.Elementwise(torch.nn.PReLU(), lambda k12, k11, k22: k12)
    assert ntkgp.Numerical(torch.nn.Tanh()).fn(torch.zeros(1)) == 0      # parameter-free modules are fine

    def arcsin(k12, k11, k22):   # erf's map, asin outside [-1, 1] for the scaled-up correlation below
        return 2 / math.pi * torch.asin(2 * k12 / torch.sqrt((1 + 2 * k11) * (1 + 2 * k22)))

    erf = ntkgp.Elementwise(torch.erf, arcsin)
    torch.testing.assert_close(net(erf).kernel(x1, x2).ntk, net(ntkgp.Erf()).kernel(x1, x2).ntk, rtol=1e-13, atol=0)
    for bad, message in ((lambda k12, k11, k22: arcsin(k12, k11, k22).mean(), r"\(5, 4\) torch.float64; got \(\)"),
                         (lambda k12, k11, k22: arcsin(k12, k11, k22).float(), "got .* torch.float32"),
                         (lambda k12, k11, k22: 1.0, "got float"),
                         (lambda k12, k11, k22: torch.asin(3 * k12 / torch.sqrt(k11 * k22)), "NaN"),
                         (lambda k12, k11, k22: torch.ones_like(k12.detach()), "does not depend on k12")):
        with pytest.raises(ValueError, match=message):
            net(ntkgp.Elementwise(torch.erf, bad)).kernel(x1, x2)
    with pytest.raises(ValueError, match="dot_fn must return"):
        net(ntkgp.Elementwise(torch.erf, arcsin, lambda k12, k11, k22: k12.sum())).kernel(x1, x2)
    constant = ntkgp.Numerical(lambda x: torch.ones_like(x.detach()))
    assert torch.isfinite(net(constant).kernel(x1, x2, ntk=False).nngp).all()
    with pytest.raises(ValueError, match="does not depend on its input through autograd"):
        net(constant).kernel(x1, x2)
    # φ' without a graph (piecewise-linear φ): zeros for φ'' would drop the kinks and give wrong gradients
    # (abs: 45.2 against the closed form's 64.3), so the gradients are refused and the values kept
    for fn in (torch.abs, lambda x: 2 * x):
        piecewise = net(ntkgp.Numerical(fn, degree=40))
        with torch.no_grad():
            assert torch.isfinite(piecewise.kernel(x1).ntk).all()
        with pytest.raises(ValueError, match=r"second derivative|jumps"):
            piecewise.kernel(x1).ntk.sum().backward()
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        net(ntkgp.Elementwise(torch.erf, arcsin)).kernel(x1, x2)
    with torch.no_grad():   # no_grad leaves the derivative to autograd
        torch.testing.assert_close(net(erf).kernel(x1, x2).ntk, net(ntkgp.Erf()).kernel(x1, x2).ntk, rtol=1e-13, atol=0)
    capped = ntkgp.Numerical(torch.tanh, max_degree=8)
    with pytest.warns(RuntimeWarning, match="by degree 8"):
        net(capped).kernel(x1, x2)
    assert capped.last_degree == 8
    for rtol in (math.inf, math.nan, 0.0, True):
        with pytest.raises(ValueError, match="rtol must be a finite positive number"):
            ntkgp.Numerical(torch.tanh, rtol=rtol)
    with pytest.raises(ValueError, match="out_dim must be a positive integer"):
        ntkgp.mlp(2, out_dim=0)
    with pytest.raises(ValueError, match=r"activation must be an activation layer .*\(Dense\)"):
        ntkgp.mlp(2, ntkgp.Dense(4))
    assert isinstance(ntkgp.mlp(1, ntkgp.Identity())[1], ntkgp.Identity)
    ntkgp.mlp(2, ntkgp.serial(ntkgp.LayerNorm(), ntkgp.ReLU())).kernel(x1)   # a composite without Dense layers


@pytest.mark.parametrize(("fn", "refused"), [
    (torch.relu, {"nngp", "ntk"}),                                   # φ' jumps at 0: φ'' = 0 dropped the delta
    (torch.nn.functional.hardtanh, {"nngp", "ntk"}),
    (torch.nn.functional.selu, {"nngp", "ntk"}),
    (torch.nn.functional.hardswish, {"nngp", "ntk"}),
    (torch.nn.functional.elu, {"ntk"}),                              # C¹: φ'' jumps, so only φ‴ (NTK) is wrong
    (torch.nn.functional.softplus, set()),
    (torch.tanh, set()),
])
def test_numerical_refuses_gradients_through_kinks_autograd_cannot_see(fn, refused):
    """relu's φ' has an autograd graph, so the refusal for graph-free φ' missed it: its NNGP
    gradient was 9.85 where finite differences (and the closed form) give 15.06, hardtanh's 8.41
    against 0.228, ELU's NTK gradient 37.3 against 23.3. Smooth ones must still match finite
    differences of the same quadrature (small variances, ~0.3, where degree 100 resolves φ‴)."""
    net = ntkgp.serial(ntkgp.Dense(8, 0.8, 0.1), ntkgp.Numerical(fn, degree=100), ntkgp.Dense(1, 1.3, 0.1))
    x = 0.5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw = net[0].raw_weight_var
    for kind in ("nngp", "ntk"):
        value = getattr(net.kernel(x, ntk=kind == "ntk"), kind).sum()
        if kind in refused:
            with pytest.raises(ValueError, match="jumps"):
                torch.autograd.grad(value, raw)
            continue
        if fn is torch.nn.functional.elu:   # φ'' jumps: no delta missing, but a rough integrand
            with pytest.warns(RuntimeWarning, match="converges slowly"), \
                    pytest.warns(RuntimeWarning, match="gradients may be up to about that far off"):
                (grad,) = torch.autograd.grad(value, raw)
        else:
            (grad,) = torch.autograd.grad(value, raw)
        h = 1e-5
        with torch.no_grad():
            raw.add_(h)
            up = getattr(net.kernel(x, ntk=kind == "ntk"), kind).sum()
            raw.sub_(2 * h)
            down = getattr(net.kernel(x, ntk=kind == "ntk"), kind).sum()
            raw.add_(h)
        # ELU's NNGP gradient quadratures a jump in φ'' (slow convergence); smooth φ: FD error ~1e-9
        assert float(grad) == pytest.approx(float(up - down) / (2 * h), rel=3e-2 if fn is torch.nn.functional.elu
                                            else 1e-7)


def test_numerical_refuses_functions_it_cannot_integrate_and_works_where_it_can():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def net(fn):
        return ntkgp.serial(ntkgp.Dense(8), ntkgp.Numerical(fn, degree=30), ntkgp.Dense(1))

    # NaN at the nodes: was an all-NaN kernel with only the rtol warning
    with pytest.raises(ValueError, match="NaN or infinite values at the quadrature nodes"):
        net(torch.log).kernel(x)
    # a reduction gave every entry the readout bias (0.1) silently (now refused when the layer is
    # built); a cast failed inside einsum
    for fn in (lambda t: torch.tanh(t).mean(-1, keepdim=True), lambda t: torch.tanh(t).float()):
        with pytest.raises(ValueError, match="must act elementwise"):
            net(fn).kernel(x)
    reference = net(torch.tanh).kernel(x)
    # in-place functions and inference mode: the NTK failed ("leaf Variable ... in-place";
    # "does not depend on its input")
    in_place = net(lambda t: t.tanh_()).kernel(x)
    torch.testing.assert_close(in_place.ntk, reference.ntk, rtol=1e-14, atol=0)
    with torch.inference_mode():
        inside = net(torch.tanh).kernel(x)
    torch.testing.assert_close(inside.ntk, reference.ntk, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("fn", "order", "scale", "kink"), [
    (torch.sin, 3, 100.0, False),                       # the trapezoid's own error was read as a jump
    (torch.nn.functional.mish, 3, 100.0, False),        # autograd's derivatives overflow beyond x ≈ 709
    (torch.exp, 2, 100.0, False),
    (torch.nn.functional.softsign, 2, 10.0, False),     # φ'' jumps (a finite jump): φ' is continuous
    (torch.nn.functional.softsign, 3, 10.0, True),
    (lambda x: torch.nn.functional.leaky_relu(x, 0.99), 2, 100.0, True),
    (lambda x: torch.relu(x - 1.5), 2, 1.0, True),
    (lambda x: torch.relu(x - 1.5), 2, 1e-4, False),    # the kink is where no node lies
    # a tolerance growing with the scale missed these (SELU's NNGP gradient 1.43e6 for 2.82e6)
    (torch.nn.functional.selu, 2, 1e3, True),
    (torch.nn.functional.elu, 3, 1e4, True),
    (lambda x: torch.relu(x) + 0.1 * torch.exp(x), 2, 100.0, True),   # large derivatives far out
    (lambda x: torch.sqrt(x * x), 2, 1e3, True),                      # autograd's NaN at 0 emptied the grid
    (lambda x: torch.nn.functional.softplus(x, beta=100), 3, 1.0, False),
    (lambda x: torch.nn.functional.gelu(x, approximate="tanh"), 3, 100.0, False),
    (lambda x: torch.tanh(x) + 0.5 * torch.sign(x), 1, 1.0, True),   # φ itself jumps: −0.72 for 1.43
])
def test_the_continuity_check_tells_kinks_from_smooth_activations(fn, order, scale, kink):
    layer = ntkgp.Numerical(fn)
    if kink:
        with pytest.raises(ValueError, match="jumps"):
            layer.check_continuous(order, scale)
    else:
        layer.check_continuous(order, scale)


def test_the_continuity_check_is_not_skipped_at_a_scale_smaller_than_one_checked_before():
    # only the largest scale was remembered: SELU checked (and passed) far out, then 4 % off near 0
    layer = ntkgp.Numerical(torch.nn.functional.selu)
    with pytest.raises(ValueError, match="jumps"):
        layer.check_continuous(2, 1e4)
    with pytest.raises(ValueError, match="jumps"):
        layer.check_continuous(2, 1.0)


def test_numerical_gradients_warn_on_a_rough_integrand_and_name_what_autograd_cannot_do():
    # softsign's φ'' jumps (no delta is missing), but Gauss–Hermite converges slowly: 17 % off at degree 100
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def gradient(fn):
        net = ntkgp.serial(ntkgp.Dense(8, 1.0, 0.1), ntkgp.Numerical(fn, degree=100), ntkgp.Dense(1))
        return torch.autograd.grad(net.kernel(x, ntk=False).nngp.sum(), net[0].raw_weight_var)

    with pytest.warns(RuntimeWarning, match="converges slowly"), \
            pytest.warns(RuntimeWarning, match="gradients may be up to about that far off"):
        gradient(torch.nn.functional.softsign)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient(torch.tanh)
    # hardsigmoid's second derivative: autograd's own "not implemented" from inside the check
    with pytest.raises(ValueError, match="which autograd cannot compute"):
        gradient(torch.nn.functional.hardsigmoid)


@pytest.mark.parametrize("dtype,k", [(torch.float32, 1e3), (torch.float32, 1e7), (torch.float32, 4e10),
                                     (torch.float64, 1e7), (torch.float64, 2e16)])
def test_gaussian_keeps_its_digits_at_large_variances(dtype, k):
    """``D = (1 + 2βk11)(1 + 2βk22) − 4β²k12²`` as a difference of products loses every digit where a
    point meets itself at large variance; from the determinant of Σ (and scaled variances) T, Ṫ and
    the centred kernel T − μ1μ2 (which a LayerNorm needs: through log1p(−x) it was inf in float32
    from k = 1e8 on the diagonal) stay within 8 epsilons of the 50-digit values (measured ≤ 3.6)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    a, beta = 1.4, 0.6
    layer, eps = ntkgp.Gaussian(a, -beta), torch.finfo(dtype).eps
    for k12 in (k, 0.999999 * k, 0.3 * k, -0.999 * k):
        t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
        nngp, dot = layer.pair_kernel(t(k), t(k12), t(k), True)
        centred = layer.centred_pair_kernel(t(k), t(k12), t(k), nngp)
        kk, c, b, aa = (mpmath.mpf(float(v)) for v in (t(k), t(k12), beta, a))
        det = (1 + 2 * b * kk) ** 2 - 4 * b**2 * c**2
        for got, ref in ((nngp, aa**2 / mpmath.sqrt(det)), (dot, 4 * aa**2 * b**2 * c / det**1.5),
                         (centred, aa**2 / mpmath.sqrt(det) - aa**2 / (1 + 2 * b * kk))):
            assert math.isfinite(float(got))
            assert abs(float(got) - float(ref)) <= 8 * eps * abs(float(ref)), (k12, float(got), float(ref))


def test_power_kernels_refuse_to_overflow_and_large_coefficients_are_named():
    """Polynomial and rectified-monomial kernels grow as k^n: where that overflows float32 (finite in
    float64) a clear error, not an inf that a LayerNorm turned into NaN; coefficients whose
    kernel terms overflow a float are refused when the layer is made."""
    x = 1e8 * torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for act in (ntkgp.RectifiedMonomial(3), ntkgp.Polynomial([0.1, 1.0, 0.0, 0.5])):
        net = ntkgp.serial(ntkgp.Dense(1, 1.0, None), act, ntkgp.LayerNorm(), ntkgp.Dense(1))
        assert torch.isfinite(net.kernel(x).nngp).all()
        with pytest.raises(ValueError, match=r"overflows torch\.float32"):
            net.kernel(x.float())
    for make in (lambda: ntkgp.Polynomial([1.0, 1e200]), lambda: ntkgp.Monomial(200)):
        with pytest.raises(ValueError, match="overflow a float"):
            make()
    # the diagonal alone (variance(), not pair_kernel), and Exp's a² and Ṫ = b² T, were inf silently
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, None), ntkgp.RectifiedMonomial(3), ntkgp.Dense(1))
    with pytest.raises(ValueError, match="grows as k\\^3"):
        net.kernel(x.float(), diag=True, ntk=False)
    small = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    for act in (ntkgp.Exp(a=1e20), ntkgp.Exp(b=20.0)):
        with pytest.raises(ValueError, match=r"Exp: the kernel, which grows as exp\(b²k\), overflows"):
            ntkgp.serial(ntkgp.Dense(1, 1.0, None), act, ntkgp.Dense(1)).kernel(small)
    # in float64 already, the message does not suggest float64
    with pytest.raises(ValueError, match=r"overflows torch\.float64; scale the inputs down\.$"):
        ntkgp.serial(ntkgp.Dense(1, 1.0, None), ntkgp.Exp(b=20.0), ntkgp.Dense(1)).kernel(1e3 * small.double())


def test_layernorm_after_gaussian_at_large_variances_in_float32():
    """Gaussian → LayerNorm at inputs ~1e4 (variances ~1e8): float32 was NaN everywhere (the centred
    kernel's log1p(−x) at x → 1); it now agrees with float64 to float32 rounding."""
    x = 1e4 * torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    net = ntkgp.serial(ntkgp.Dense(1, 1.3, 0.1), ntkgp.Gaussian(1.5, -0.8), ntkgp.LayerNorm(),
                       ntkgp.Dense(1, 1.1, 0.1), ntkgp.Gaussian(1.5, -0.8), ntkgp.LayerNorm(),
                       ntkgp.Dense(1, 1.2, 0.05))
    with torch.no_grad():
        k64, k32 = net.kernel(x), net.kernel(x.float())
    for a, b in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_exp_refuses_a_kernel_that_overflows():
    """T = a² exp(b²(k11 + 2k12 + k22)/2) is finite in float64 where float32 overflows (b²k > 88/2):
    a clear error instead of an infinite kernel."""
    x = torch.full((2, 3), 5.0, dtype=torch.float32)     # k = 50: b²(k11 + 2k12 + k22)/2 = 100
    net = ntkgp.serial(ntkgp.Dense(1, 2.0, None), ntkgp.Exp(), ntkgp.Dense(1))
    assert torch.isfinite(net.kernel(x.double()).nngp).all()
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        net.kernel(x)


def test_rectified_monomials_and_monomials_against_their_own_closed_forms():
    """Degree 1 is ReLU's kernel (to rounding); the arc-cosine recursion reproduces Cho & Saul's J_2
    (3 sin θ cos θ + (π − θ)(1 + 2 cos²θ)); Monomial(2) is k11 k22 + 2 k12² with Ṫ = 4 k12; the
    step is 1/2 at 0, as its kernel's θ = π/2 at zero variance (T = 1/4)."""
    g = torch.Generator().manual_seed(0)
    k11, k22 = torch.rand(50, generator=g) + 0.1, torch.rand(50, generator=g) + 0.1
    k12 = (2 * torch.rand(50, generator=g) - 1) * torch.sqrt(k11 * k22)
    got = ntkgp.RectifiedMonomial(1).pair_kernel(k11, k12, k22, True)
    ref = ntkgp.ReLU().pair_kernel(k11, k12, k22, True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    theta = torch.atan2(torch.sqrt(k11 * k22 - k12**2), k12)
    c = torch.cos(theta)
    j2 = 3 * torch.sin(theta) * c + (math.pi - theta) * (1 + 2 * c * c)
    # near θ = π both forms are differences of O(k11 k22) terms: absolute rounding there
    torch.testing.assert_close(ntkgp.RectifiedMonomial(2).pair_kernel(k11, k12, k22, False)[0],
                               k11 * k22 * j2 / (2 * math.pi), rtol=1e-13, atol=1e-15)
    nngp, dot = ntkgp.Monomial(2).pair_kernel(k11, k12, k22, True)
    torch.testing.assert_close(nngp, k11 * k22 + 2 * k12**2, rtol=1e-15, atol=0)
    torch.testing.assert_close(dot, 4 * k12, rtol=1e-15, atol=0)
    zero = torch.zeros(1)
    step = ntkgp.RectifiedMonomial(0)
    assert float(step.fn(zero)) == 0.5
    assert float(step.pair_kernel(zero, zero, torch.ones(1), False)[0]) == 0.25
    assert float(step.variance(zero)) == 0.25 == float(step.pair_kernel(zero, zero, zero, False)[0])


def test_arc_cosine_kernels_near_opposite_inputs_keep_their_relative_accuracy():
    """Near θ = π the arc-cosine kernels vanish like δ^{2n+1} (δ = π − θ). With δ taken as π − θ
    after atan2, θ's absolute rounding (4e-16) was amplified by 1/δ²: ReLU's kernel at a
    correlation of −1 + 1e-8 was 3e-4 off (relative), degree 2 came out negative (−9e-17 for
    2e-21). From atan2(s, −k12) ReLU keeps ε/δ² (the inputs' own rounding) and the higher degrees
    stay non-negative. Reference: Cho & Saul's J_1..J_3 with 50 digits."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def j(n, t):
        c, s = mpmath.cos(t), mpmath.sin(t)
        return [mpmath.pi - t, s + (mpmath.pi - t) * c, 3 * s * c + (mpmath.pi - t) * (1 + 2 * c * c),
                4 * s**3 + 15 * s * c * c + (mpmath.pi - t) * (9 * c + 6 * c**3)][n]

    k11, k22 = torch.tensor([1.3]), torch.tensor([0.7])
    for gap, relu_rtol, degree2_rtol in ((1e-8, 5e-8, None), (1e-4, 1e-11, 1e-6)):
        k12 = (gap - 1) * torch.sqrt(k11 * k22)
        a, b, c = (mpmath.mpf(float(v)) for v in (k11, k12, k22))
        theta = mpmath.acos(b / mpmath.sqrt(a * c))
        for n in (1, 2, 3):
            nngp, dot = ntkgp.RectifiedMonomial(n).pair_kernel(k11, k12, k22, True)
            ref = (a * c) ** (mpmath.mpf(n) / 2) * j(n, theta) / (2 * mpmath.pi)
            ref_dot = n * n * (a * c) ** (mpmath.mpf(n - 1) / 2) * j(n - 1, theta) / (2 * mpmath.pi)
            assert float(nngp) >= 0 and float(dot) >= 0
            assert abs(float(nngp) - ref) <= 1e-16 * float(k11 * k22) ** (n / 2)   # rounding of the scale
            # Ṫ = n² T_{n−1}: degree 0 is δ/(2π), which keeps the inputs' ε/δ² (1e-8 relative at δ² = 2e-8)
            assert abs(float(dot) - ref_dot) <= 1e-8 * ref_dot + 1e-16 * n * n * float(k11 * k22) ** ((n - 1) / 2)
            rtol = {1: relu_rtol, 2: degree2_rtol}.get(n)
            if rtol is not None:
                assert abs(float(nngp) - ref) <= rtol * ref
        relu, relu_dot = ntkgp.ReLU().pair_kernel(k11, k12, k22, True)
        assert abs(float(relu) - (a * c) ** 0.5 * j(1, theta) / (2 * mpmath.pi)) <= relu_rtol * float(relu)
        assert abs(float(relu_dot) - j(0, theta) / (2 * mpmath.pi)) <= 1e-8 * float(relu_dot)


def test_hermite_is_normalized_and_its_kernel_is_neural_tangents_on_unit_variances():
    """``φ = He_n/sqrt(n!)`` (numpy's probabilists' Hermite series, n = 0..8, to rounding; the
    recurrence is normalized as it goes, so degree 200 stays finite where He_200 overflows), with
    ``E[φ(z)²] = 1`` (Gauss–Hermite, exact for polynomials). On unit variances the kernel is
    neural-tangents' ``k12^n`` and ``Ṫ = n k12^{n−1}`` bit for bit (the other terms carry
    ``(k11 − 1)(k22 − 1) = 0`` exactly); elsewhere it is the exact expectation (quadrature: CASES)."""
    x = torch.linspace(-4, 4, 41)
    z, w = np.polynomial.hermite_e.hermegauss(30)
    for n in range(9):
        layer = ntkgp.Hermite(n)
        coefficients = [0.0] * n + [1.0 / math.sqrt(math.factorial(n))]
        expected = torch.from_numpy(np.polynomial.hermite_e.hermeval(x.numpy(), coefficients))
        torch.testing.assert_close(layer.fn(x), expected, rtol=1e-13, atol=1e-13)
        second_moment = float(np.sum(w * layer.fn(torch.from_numpy(z)).numpy() ** 2) / math.sqrt(2 * math.pi))
        assert second_moment == pytest.approx(1.0, rel=1e-12)
        one, k12 = torch.ones(7), torch.linspace(-1, 1, 7)
        nngp, dot = layer.pair_kernel(one, k12, one, True)
        assert torch.equal(nngp, k12**n)
        assert torch.equal(dot, n * k12 ** (n - 1) if n else torch.zeros(7))
        assert torch.equal(layer.variance(one), one)
    assert torch.isfinite(ntkgp.Hermite(200).fn(torch.tensor([30.0]))).all()
    # from degree 85 the coefficients C(n, 2m) C(2m, m) exceed float32: the sum runs in float64 (it
    # was NaN, inf · 0, for every float32 input); beyond 652 they exceed float64 and are refused
    one, k12 = torch.ones(5, dtype=torch.float32), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float32)
    for n in (85, 120, 652):
        nngp, dot = ntkgp.Hermite(n).pair_kernel(one, k12, one, True)
        assert nngp.dtype == dot.dtype == torch.float32
        torch.testing.assert_close(nngp, (k12.double() ** n).float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(dot, (n * k12.double() ** (n - 1)).float(), rtol=1e-6, atol=0)
    mean = ntkgp.Hermite(652).mean(torch.tensor([1.0, 0.5, 1.5], dtype=torch.float32))   # sqrt(C(652, 326)) > 3e38
    assert mean.dtype == torch.float32 and mean[0] == 0 and torch.isfinite(mean).all()
    with pytest.raises(ValueError, match="overflow a float at degree 653"):
        ntkgp.Hermite(653)


def test_rbf_after_a_bias_free_dense_layer_is_the_gaussian_kernel():
    """NNGP of ``Dense(weight_var=σ², bias_var=None) → Rbf(γ)`` is ``exp(−γσ²‖x − x'‖²/d)`` and its
    NTK ``(1 + 2γ σ² x·x'/d)`` times it (Θ¹ = K¹ = σ² x·x'/d times Ṫ = 2γT, plus the last layer's K);
    the readout adds nothing but its variance: ``K = σ_out² T``, ``Θ = σ_out² (T + Ṫ Θ¹)``."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    sigma2, gamma = 1.7, 0.6
    net = ntkgp.serial(ntkgp.Dense(8, sigma2, None), ntkgp.Rbf(gamma), ntkgp.Dense(1, 1.0, None))
    with torch.no_grad():
        k = net.kernel(x)
    rbf = torch.exp(-gamma * sigma2 * torch.cdist(x, x) ** 2 / 3)
    torch.testing.assert_close(k.nngp, rbf, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(k.ntk, rbf * (1 + 2 * gamma * sigma2 * x @ x.T / 3), rtol=1e-13, atol=1e-15)
    assert torch.equal(k.nngp.diagonal(), torch.ones(6))
    # as a GPyTorch kernel: GPyTorch's own RBFKernel of length scale ℓ² = d/(2γσ²)
    reference = gpytorch.kernels.RBFKernel().double()
    reference.lengthscale = math.sqrt(3 / (2 * gamma * sigma2))
    x2 = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ntkgp.NNGPKernel(net)(x, x2).to_dense(), reference(x, x2).to_dense(),
                                   rtol=1e-12, atol=1e-14)


def test_polynomial_centred_kernel_has_no_cancellation():
    """φ = 1000 + x: T − μ1μ2 = k12 exactly, where the difference T − μ1μ2 = (10⁶ + k12) − 10⁶
    keeps only ~1e-10 of float64 for k12 ~ 1e-6."""
    layer = ntkgp.Polynomial([1000.0, 1.0])
    k = torch.tensor([1e-6, 3e-6])
    centred = layer.centred_pair_kernel(k[:1], k[1:] / 3, k[1:], layer.pair_kernel(k[:1], k[1:] / 3, k[1:], False)[0])
    assert float(centred) == float(k[1] / 3)


# ------------------------------------------------------------------ NTK factor of a point with itself
DOT_VARIANCE_CASES = ["erf", "erf_abc", "gelu", "sin", "cos", "exp", "gaussian", "rbf", "gabor", "sigmoid_like", "relu",
                      "leaky_relu", "abrelu", "abs"]


@pytest.mark.parametrize("name", DOT_VARIANCE_CASES)
def test_dot_variance_is_the_self_pair_ntk_factor_in_closed_form(name):
    """``dot_variance(k) = Ṫ(k, k, k) = E[φ'(u)²]``: the pair formula at ``k11 = k12 = k22`` (to 1e-14
    over ``k`` in 1e-6..1e6) and 1-D Gauss–Hermite quadrature of ``φ'²`` (smooth activations)."""
    layer, (_, dphi), rule = CASES[name]
    k = torch.tensor(10.0 ** np.arange(-6.0, 6.5, 0.5))
    if name == "exp":
        k = k[k < 100]   # exp(2b²k) overflows beyond
    got = layer.dot_variance(k)
    assert got.dtype == k.dtype and got.shape == k.shape
    pair = layer.pair_kernel(k, k, k, True)[1]
    assert torch.allclose(got, pair, rtol=1e-14, atol=0)
    if rule is not polar:
        z, w = scipy.special.roots_hermite(400)
        for kk in (1e-3, 0.3, 1.0, 2.5):
            expected = float(np.sum(w * dphi(math.sqrt(2 * kk) * z) ** 2) / math.sqrt(math.pi))
            assert abs(float(layer.dot_variance(torch.tensor([kk]))) - expected) <= 1e-10 * abs(expected)
    else:   # the ReLU family: (a² + b²)/2, and (a + b)²/4 (the twin's slope at 0 squared) at k = 0
        a, b = layer.a, layer.b
        assert torch.equal(got, torch.full_like(k, (a**2 + b**2) / 2))
        # under torch's usual float32 default too: where() of two Python floats made float32 constants,
        # and LeakyReLU's float64 NTK diagonal came out 1e-8 off (0.52 rounded)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            assert torch.equal(layer.dot_variance(k), got)
        finally:
            torch.set_default_dtype(previous)
        assert float(layer.dot_variance(torch.zeros(1))) == pytest.approx((a + b) ** 2 / 4, rel=1e-15)


def _hyperparameter_gradients(act, x, dtype, diag):
    net = ntkgp.serial(ntkgp.Dense(3, weight_var=1.5, bias_var=0.1), act(),
                       ntkgp.Dense(3, weight_var=1.2, bias_var=0.1), act(), ntkgp.Dense(1)).to(dtype)
    x = x.to(dtype).requires_grad_(True)
    k = net.kernel(x, diag=diag)
    first, second = net.layers[0], net.layers[2]
    params = [x, first.raw_weight_var, first.raw_bias_var, second.raw_weight_var, second.raw_bias_var]
    grads = torch.autograd.grad(k.nngp.sum() + k.ntk.sum(), params)
    return [g.double() for g in grads]


@pytest.mark.parametrize("name,diag", [("erf", False), ("erf", True), ("gaussian", False), ("gaussian", True),
                                       ("sin", True), ("cos", True)])
def test_self_pair_ntk_gradients_keep_their_digits_in_float32(name, diag):
    """Along ``k11 = k12 = k22`` the partial derivatives of the pair formula's ``Ṫ`` cancel (each
    ``O(k^{-1/2})``, their sum ``O(k^{-3/2})`` for erf): through it, float32 gradients at inputs of
    ``10³`` lost ``ε·k`` of their digits: the hyperparameters' 6 % (erf), 14 % (Gaussian), 0.3 % (Sin,
    diagonal mode), the inputs' up to 54 %. From ``dot_variance`` they stay within 3e-4 of float64
    (measured ≤ 4e-5), the inputs' within 1e-3 (measured ≤ 1e-5)."""
    act = {"erf": ntkgp.Erf, "gaussian": ntkgp.Gaussian, "sin": ntkgp.Sin, "cos": ntkgp.Cos}[name]
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e3
    single = _hyperparameter_gradients(act, x, torch.float32, diag)
    double = _hyperparameter_gradients(act, x, torch.float64, diag)
    inputs = (single[0] - double[0]).norm() / double[0].norm()
    assert inputs <= 1e-3, float(inputs)
    for got, expected in zip(single[1:], double[1:], strict=True):
        assert torch.isfinite(got).all()
        assert ((got - expected).abs() <= 3e-4 * expected.abs()).all(), (got, expected)


@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("scale", [1e13, 1e17])
def test_gelu_gradients_stay_finite_at_large_float32_inputs(scale, diag):
    """GELU's NTK factor of a point with itself, ``k·((1/δ)² + …)/δ`` with ``δ = sqrt(1 + 2k)``, passed
    its incoming gradient (``~k``: the NTK before it) times ``k/δ`` to ``(1/δ)²``: inf in float32 from
    inputs of ``10¹³`` (variances ``10²⁶``), NaN gradients where float64's are finite.
    ``dot_variance`` multiplies by ``1/δ`` one factor at a time."""
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    for g in _hyperparameter_gradients(ntkgp.GELU, x, torch.float32, diag):
        assert torch.isfinite(g).all()


def test_gauss_hermite_expectation_against_the_independent_quadrature_and_closed_forms():
    """The public 2-D rule had no test of its own: against tests/quadrature.py's cartesian rule
    (smooth functions) and E[u v] = k12, per-entry degrees included."""
    k11 = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    k22 = torch.tensor([1.5, 2.0, 0.25, 3.0], dtype=torch.float64)
    k12 = torch.tensor([0.3, -1.9, 0.0, 3.0], dtype=torch.float64)   # the last pair: a point with itself
    # the same rule (160 points per dimension) written independently: equal to rounding; tanh at
    # variance 3 needs that many (degree 80 is 2e-6 off there)
    got = gauss_hermite_expectation(torch.tanh, torch.sin, k11, k12, k22, 160)
    expected = [cartesian(np.tanh, np.sin, *map(float, k), degree=160) for k in zip(k11, k12, k22, strict=True)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-15)
    # float32 variances with a float64 covariance, rounded apart: judged at float32's rounding
    var = torch.tensor([0.7])
    assert gauss_hermite_expectation(torch.tanh, torch.tanh, var, var.double(), var, 8).shape == (1,)
    identity = lambda t: t   # noqa: E731
    torch.testing.assert_close(gauss_hermite_expectation(identity, identity, k11, k12, k22,
                                                         torch.tensor([2, 3, 4, 5])), k12, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("args", "match"), [
    (dict(k11=-torch.ones(2)), "non-negative"),
    (dict(k11=torch.tensor([1.0, math.nan])), "finite"),
    (dict(k12=torch.tensor([5.0, 0.0])), r"\|k12\| exceeds"),
    (dict(k22=torch.ones(3)), "broadcast"),
    (dict(k11=torch.ones(2, dtype=torch.int64)), "floating-point tensor"),
    (dict(k12=0.5), "floating-point tensor"),
    (dict(degree=True), "degree must be a positive integer"),      # read as degree 1: the result was 0
    (dict(degree=0), "degree must be a positive integer"),
    (dict(degree=2.5), "degree must be a positive integer"),
    (dict(degree=10**6), "at most 2048"),                          # 8 TB asked for after 6.5 s
    (dict(degree=torch.tensor([4.0, 4.0])), "integer tensor"),
    (dict(degree=torch.tensor([4, 0])), r"in \[1, 2048\]"),
    (dict(f=3), "f must be callable"),
])
def test_gauss_hermite_expectation_refuses_bad_arguments_before_any_quadrature(args, match):
    """It checked nothing: a negative or NaN variance gave NaN, |k12| > sqrt(k11 k22) a number for a
    covariance that does not exist (5.0 for E[u v]), and degree=True the value of degree 1."""
    call = dict(f=torch.tanh, g=torch.tanh, k11=torch.ones(2), k12=torch.full((2,), 0.5), k22=torch.ones(2),
                degree=10) | args
    with pytest.raises(ValueError, match=match):
        gauss_hermite_expectation(**call)


def test_numerical_degrees_are_capped_where_one_entry_fills_a_quadrature_chunk():
    with pytest.raises(ValueError, match="degree must be at most 2048"):
        ntkgp.Numerical(torch.tanh, degree=10**5)     # 80 GB per entry, found only at kernel time
    with pytest.raises(ValueError, match="max_degree must be at most 2048"):
        ntkgp.Numerical(torch.tanh, max_degree=4096)
    assert ntkgp.Numerical(torch.tanh, degree=2048, max_degree=2048).degree == 2048


@pytest.mark.parametrize("name", ["fn", "nngp_fn", "dot_fn", "mean_fn"])
def test_elementwise_refuses_maps_that_are_not_callable(name):
    """nngp_fn=3 was accepted and failed at kernel time with "'int' object is not callable"."""
    args = dict(nngp_fn=lambda a, c, b: c) | {name: 3}
    with pytest.raises(ValueError, match=f"{name} must be callable"):
        ntkgp.Elementwise(**args)


def test_gabor_float32_kernels_beside_a_huge_input_match_float64():
    """Gabor's ``D = det(I + 2Σ)`` holds ``k11 k22``, which overflows float32 above variances of
    ~1.8e19: each pair is then taken in units of its own larger variance. With one scale for all
    points (as Gaussian and GELU had, before they took one per pair too) an input of variance 1e38 made the scale's
    square subnormal, and the pairs of ordinary inputs, taken in its units, lost 30 times float32's
    rounding (3.8e-6 relative). Per pair, float32 agrees with float64 to 1e-6 relative among the
    ordinary inputs (measured 1e-7) and on the huge one's diagonal; their cross entries are below
    1e-36 (within 1000 float32 ``tiny``)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    x = x * torch.tensor([0.0, 1e-3, 1.0, 3.0, 0.0], dtype=torch.float64)[:, None]
    x[4] = torch.tensor([1e19, -1e19, 0.0])   # variance 1.3e38, near float32's largest (3.4e38)
    net = ntkgp.serial(ntkgp.Dense(1, 2.0, None), ntkgp.Gabor())
    with torch.no_grad():
        k64, k32 = net.kernel(x), net.kernel(x.float())
    for a, b in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):
        a = a.double()
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a[:4, :4], b[:4, :4], rtol=1e-6, atol=0)
        torch.testing.assert_close(a[4, 4], b[4, 4], rtol=1e-6, atol=0)
        torch.testing.assert_close(a[4, :4], b[4, :4], rtol=0, atol=1000 * torch.finfo(torch.float32).tiny)
    assert float(k32.nngp[0, 0]) == 0.0 and float(k32.ntk[0, 0]) == 0.0   # a zero input: φ(0) = 0


def test_gelu_float32_kernels_of_variances_near_float32s_largest_match_float64():
    """GELU's forms summed ``2 + k11 + k22``, ``1 + 2k``, ``k12 β`` (``β ≤ π``) and ``2π(1 + k)``, which
    overflow float32 from variances of 1.7e38, 1.7e38, 1.1e38 and 5.4e37: at ``k = 3e38`` the variance
    read half its value, ``Ṫ`` 0.25 for 0.5, ``E[φ(u)]`` 0 for 6.9e18, and the pair kernels ``inf``.
    Taken as ``1/(1 + k11) + 1/(1 + k22)``, ``sqrt(2) sqrt(k + 1/2)``, ``k12 (β/2π)`` and
    ``k rsqrt(1 + k)/sqrt(2π)``, float32 agrees with float64 at the same inputs: the layer's
    methods to 1e-6 relative (measured 1e-7), the huge inputs' rows of a network's kernels to 2e-6
    (measured 4.9e-7, which includes the first layer's float32 rounding), and the NNGP's gradients
    stay finite. (Ordinary pairs, covered elsewhere, carry the first layer's rounding times their
    condition: up to 1e-5 for the NTK here. The gradient of this NTK's sum, 2.7e38, is NaN: the
    chain rule's factors, ``Θ_prev ∂Ṫ/∂(1/(1 + k)) ~ 1e57`` times ``∂(1/(1 + k))/∂k ~ 1e-76``,
    leave float32's range though their product does not; docs/numerics.md.)"""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g)
    x[3] = torch.tensor([1.3e19, 1.1e19, 0.0])    # variances 2.9e38, 2.4e38 and 1.2e38, with
    x[4] = torch.tensor([1.1e19, 1.1e19, 0.1])    # correlations 0.997 and 0.76 among them
    x[5] = torch.tensor([0.2e19, 1.1e19, -0.2e19])
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, None), ntkgp.GELU())
    x32 = x.float().requires_grad_()
    k64, k32 = net.kernel(x.float().double()), net.kernel(x32)   # at the same (float32) inputs
    for a, b in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):   # the huge inputs' rows
        torch.testing.assert_close(a.detach().double()[3:], b[3:], rtol=2e-6, atol=0)
    k32.nngp.sum().backward()
    assert bool(torch.isfinite(x32.grad).all())


NEAR_FLOAT32_MAX = {
    "relu": ntkgp.ReLU, "abs": ntkgp.Abs, "sign": ntkgp.Sign, "erf": ntkgp.Erf,
    "erf_shifted": lambda: ntkgp.Erf(1.3, 0.7, 0.2), "sigmoid_like": ntkgp.SigmoidLike, "gelu": ntkgp.GELU,
    "sin": ntkgp.Sin, "cos": ntkgp.Cos, "rbf": ntkgp.Rbf, "gabor": ntkgp.Gabor, "gaussian": ntkgp.Gaussian,
    "gaussian_ab": lambda: ntkgp.Gaussian(1.4, -0.6),
}


@pytest.mark.parametrize("name", NEAR_FLOAT32_MAX)
def test_float32_self_pairs_and_pairs_up_to_float32s_largest_variance(name):
    """Sums of ``1`` and a multiple of the variance overflowed float32 near its largest value:
    erf's ``1 + 4b²k`` from 8.5e37 (the variance read 0, then NaN, for ``a²``; ``Ṫ`` 0, which took
    ``k Ṫ ~ sqrt(k)`` out of Θ), the Gaussian's ``1 + 4βk`` and ``1 + 2βk`` (variance, ``Ṫ`` and mean
    0), GELU's ``1 + 2k``, ``2 + k11 + k22``, ``k12 β`` and ``2π(1 + k)`` (variance half, ``Ṫ`` 0.25
    for 0.5, mean 0, pair kernels ``inf``), and the RBF's ``k11 + k22`` (``inf − inf``: NaN for
    nearly parallel inputs). Now, at variances 1e30 to 3.4e38, ``variance``, ``dot_variance``, ``mean``
    and pairs at ``ρ = ±1/2`` in float32 agree with float64 at the same inputs to 1e-6 relative
    (measured 4e-7), values below float32's smallest normal number up to 1000 times it, and their
    gradients are finite; so do the centred kernels ``T − μ1μ2``, to 1e-5 (measured 3e-7). Pairs
    at ``ρ = ±0.999`` are only required finite: their condition
    (``~1/(1 − |ρ|)``) makes float32 up to 1e-4 off."""
    layer = NEAR_FLOAT32_MAX[name]()
    k = torch.tensor([1e30, 8e37, 1e38, 2e38, 3.4e38], dtype=torch.float32)
    atol = 1000 * torch.finfo(torch.float32).tiny
    for method in (layer.variance, layer.dot_variance, layer.mean):
        k32 = k.clone().requires_grad_()
        got = method(k32)
        torch.testing.assert_close(got.detach().double(), method(k.double()), rtol=1e-6, atol=atol)
        if got.requires_grad:   # not the constants (ReLU's Ṫ, Sign's mean)
            got.sum().backward()
            assert bool(torch.isfinite(k32.grad).all()), method.__name__
    for rho in (0.5, -0.5, 0.999, -0.999):
        k22, k12 = k * 0.7, rho * (k * 0.7**0.5)
        t32 = layer.pair_kernel(k, k12, k22, True)
        assert all(bool(torch.isfinite(t).all()) for t in t32), rho
        if abs(rho) == 0.5:
            t64 = layer.pair_kernel(k.double(), k12.double(), k22.double(), True)
            for a, b in zip(t32, t64, strict=True):
                torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=atol)
            centred32 = layer.centred_pair_kernel(k, k12, k22, t32[0])
            centred64 = layer.centred_pair_kernel(k.double(), k12.double(), k22.double(), t64[0])
            torch.testing.assert_close(centred32.double(), centred64, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("layer", [ntkgp.Polynomial([0.3, -1.0, 0.5, 0.2, 0.1]), ntkgp.Monomial(4), ntkgp.Hermite(4),
                                   ntkgp.RectifiedMonomial(3)], ids=["polynomial", "monomial", "hermite", "requ"])
def test_a_mean_beyond_the_dtype_is_refused_as_the_kernel_is(layer):
    """``E[φ(u)]`` of a polynomial-growth activation beyond the dtype read ``inf`` (Hermite(4) at a
    float32 variance of 1e30, 3e60; RectifiedMonomial(3), 1e45) where its kernels raise the
    ``ValueError`` that says to scale the inputs, as an exponential's mean does; representable
    means are unchanged (a cubic's ``0.3 + 0.5 k`` at 1e30 is 5e29)."""
    k = torch.tensor([1.0, 1e30], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        layer.mean(k)
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        layer.variance(k)
    assert bool(torch.isfinite(layer.mean(k.double())).all())
    cubic = ntkgp.Polynomial([0.3, -1.0, 0.5, 0.2]).mean(k)
    torch.testing.assert_close(cubic, torch.tensor([0.8, 5e29], dtype=torch.float32))


def _centred_both_paths(layer, k11, k12, k22, graph):
    k = [t.clone().requires_grad_(graph) for t in (k11, k12, k22)]
    return layer.centred_pair_kernel(*k, layer.pair_kernel(*k, False)[0]), k


# variances of a smaller shape than k12: shared by all pairs (0-d), one side shared, and a batch of
# k12 over unbatched variances. Networks pass (n, 1) and (1, m); direct calls need not.
BROADCAST_SHAPES = {"0-d": ((), (4, 5), ()), "(4, 1) and 0-d": ((4, 1), (4, 5), ()),
                    "batched k12": ((4, 1), (2, 4, 5), (1, 5))}


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES.values(), ids=BROADCAST_SHAPES.keys())
@pytest.mark.parametrize("name", sorted(CASES))
def test_pair_and_centred_kernels_broadcast_variances_smaller_than_k12(name, shapes):
    """``pair_kernel`` and ``centred_pair_kernel``, with and without a graph, equal their values at
    variances expanded to ``k12``'s shape. Without a graph the ReLU family, ``Sign`` and
    ``RectifiedMonomial`` raised ``output with shape [] doesn't match the broadcast shape [4, 5]``
    (``gaussian_angle``'s in-place ``p.add_(k12)``), as GELU's centred kernel had."""
    layer = CASES[name][0]
    generator = torch.Generator().manual_seed(3)
    k11 = 0.5 + torch.rand(shapes[0], generator=generator, dtype=torch.float64)
    k22 = 0.5 + torch.rand(shapes[2], generator=generator, dtype=torch.float64)
    rho = 2 * torch.rand(shapes[1], generator=generator, dtype=torch.float64) - 1
    k12 = rho * (k11 * k22).sqrt()
    full = torch.broadcast_shapes(k11.shape, k12.shape, k22.shape)
    expanded = [t.expand(full).clone() for t in (k11, k12, k22)]
    for graph in (False, True):
        with torch.set_grad_enabled(graph):
            k = [t.clone().requires_grad_(graph) for t in (k11, k12, k22)]
            value, dot = layer.pair_kernel(*k, True)
            centred = layer.centred_pair_kernel(*k, value)
            value_full, dot_full = layer.pair_kernel(*expanded, True)
            centred_full = layer.centred_pair_kernel(*expanded, value_full)
        torch.testing.assert_close(value.detach().expand(full), value_full, rtol=1e-15, atol=0)
        torch.testing.assert_close(dot.detach().expand(full), dot_full, rtol=1e-15, atol=0)
        if centred_full is not None:
            torch.testing.assert_close(centred.detach().expand(full), centred_full, rtol=1e-15, atol=0)


def test_abrelu_centred_kernel_in_place_matches_graph_below_smallest_normal():
    """float32 variances of 1e-38 (``p = sqrt(k11 k22)`` below float32's smallest normal number): the
    in-place path clamped ``p`` to 1.18e-38, which scaled ``ρ`` by 0.85 (Abs 8 % off the graph path's
    value, ReLU 0.7 %); the graph path and float64 agree."""
    k11, k12, k22 = (torch.tensor([v], dtype=torch.float32) for v in (1e-38, 3e-39, 1e-38))
    for layer in (ntkgp.ReLU(), ntkgp.LeakyReLU(0.1), ntkgp.Abs(), ntkgp.ABReLU(-0.4, 1.3)):
        with torch.no_grad():
            fast, _ = _centred_both_paths(layer, k11, k12, k22, graph=False)
        slow, _ = _centred_both_paths(layer, k11, k12, k22, graph=True)
        wide, _ = _centred_both_paths(layer, *(t.double() for t in (k11, k12, k22)), graph=False)
        # the results are subnormal (~1e-40): a few units of 1.4e-45 apart at most
        assert abs(float(fast) - float(slow.detach())) <= 1e-44, type(layer).__name__
        assert abs(float(fast) - float(wide)) <= 1e-44, type(layer).__name__


def test_gelu_centred_kernel_gradients_finite_at_large_float32_variances():
    """Near independent inputs (``|ρ| ≤ 1/2``, the series' side) of float32 variance 1e22 to 3e38 the
    gradient of ``k12 (k12 ratio)`` reaching ``ratio`` was ``k12²`` (inf), times ``ratio``'s
    derivative (0 in float32): NaN for all three arguments from ``k ~ 2e19``."""
    gelu = ntkgp.GELU()
    for k in (1e22, 1e30, 1e36, 3e38):
        for rho in (0.3, -0.3):
            triple = (torch.tensor([v], dtype=torch.float32) for v in (k, rho * k, k))
            value, args = _centred_both_paths(gelu, *triple, graph=True)
            grads = torch.autograd.grad(value.sum(), args)
            assert torch.isfinite(value).all()
            assert all(torch.isfinite(g).all() for g in grads), (k, rho, grads)
            # ∂/∂k12 at ρ = ±0.3 and large variances: β/(2π) + O(ρ) terms, between 0 and 1
            assert 0 < float(grads[1]) < 1 and math.isfinite(float(grads[0]))


@pytest.mark.parametrize("name, args, kwargs, given", [("Gabor", (-1.0,), {}, "1 positional"),
                                                       ("Sign", (1,), {}, "1 positional"),
                                                       ("Identity", (3,), {}, "1 positional"),
                                                       ("Gabor", (), {"a": 1.0}, r"keyword argument\(s\) \['a'\]")])
def test_layers_without_arguments_refuse_them_by_name(name, args, kwargs, given):
    """Gabor(-1.0), Sign(1) and Identity(3), layers without an ``__init__`` of their own, met
    GPyTorch's "Module.__init__() takes 1 positional argument but 2 were given", which named neither
    the layer nor what it takes; their signatures still show no parameters."""
    layer = getattr(ntkgp, name)
    with pytest.raises(TypeError, match=rf"^{name}\(\) takes no arguments, got {given}"):
        layer(*args, **kwargs)
    assert not inspect.signature(layer).parameters and isinstance(layer(), ntkgp.Layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", [ntkgp.Erf(), ntkgp.Erf(1.3, 0.7, 0.2), ntkgp.SigmoidLike(), ntkgp.GELU(),
                                   ntkgp.Gaussian(), ntkgp.Gabor()], ids=lambda layer: repr(layer))
def test_pair_kernels_without_autograd_equal_the_graph_paths_bitwise(layer, dtype):
    """Without autograd the erf kernel and the determinant of GELU, Gaussian and Gabor
    (``gaussian_det``, ``shifted_det``) run in place on their own temporaries: the same operations, so
    the same bits as the graph path, and the caller's tensors untouched. Variances as the blocked
    kernel passes them (``(r, 1)`` against ``(1, n)``), of a smaller shape than ``k12`` (a batch on
    ``k12`` alone), of ``k12``'s shape (``diag``), with a zero variance, and large enough in float32
    that the products are rescaled (``scaled_for_products``)."""
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 1e20 if dtype == torch.float32 else 1e160):
        k11 = torch.rand(6, 1, generator=g, dtype=dtype) * 2 * scale
        k22 = torch.rand(1, 9, generator=g, dtype=dtype) * 2 * scale
        k11[2] = 0.0
        rho = torch.rand(2, 6, 9, generator=g, dtype=dtype) * 2 - 1
        rho[:, 0, 0] = 1.0
        for args in ((k11, (rho[0] * (k11 * k22).sqrt()), k22),
                     (k11, (rho * (k11 * k22).sqrt()), k22),                            # k12 of a larger shape
                     (k11.expand(6, 9).clone(), (rho[1] * (k11 * k22).sqrt()), k22.expand(6, 9).clone())):
            kept = [t.clone() for t in args]
            with torch.no_grad():
                fast = layer.pair_kernel(*args, True)
            assert all(torch.equal(a, b) for a, b in zip(args, kept, strict=True))
            graph = [t.clone().requires_grad_(True) for t in args]
            slow = layer.pair_kernel(*graph, True)
            for f, s in zip(fast, slow, strict=True):
                assert f.shape == s.shape
                assert torch.equal(f.view(-1).view(torch.int32 if dtype == torch.float32 else torch.int64),
                                   s.detach().reshape(-1).view(torch.int32 if dtype == torch.float32 else torch.int64))


@pytest.mark.parametrize("layer", [ntkgp.Erf(), ntkgp.Erf(1.3, 0.7, 0.2), ntkgp.GELU(), ntkgp.Gaussian(),
                                   ntkgp.Gabor()], ids=lambda layer: repr(layer))
def test_pair_kernels_of_mixed_dtypes_without_autograd_equal_the_graph_paths_bitwise(layer):
    """The in-place passes without autograd wrote ``p + k12`` into ``p`` (``gaussian_det``) and the
    erf kernel's ``k12/root`` into ``k12``'s temporary: a float64 ``k12`` with float32 variances (or the
    other way round) rounded that intermediate to float32, and the float64 kernels of the public
    ``pair_kernel`` came out off the graph path's (Erf's NNGP 2.1e-9 with float32 variances, 5.4e-8
    with a float32 ``k12``; Gaussian's 2.8e-9), where the two are bitwise equal in every single dtype."""
    g = torch.Generator().manual_seed(4)
    k11 = torch.rand(6, 1, generator=g, dtype=torch.float64) * 2
    k22 = torch.rand(1, 9, generator=g, dtype=torch.float64) * 2
    k12 = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1) * (k11 * k22).sqrt()
    for args in ((k11.float(), k12, k22.float()), (k11, k12.float(), k22), (k11.expand(6, 9).float(), k12,
                                                                           k22.expand(6, 9).float())):
        with torch.no_grad():
            fast = layer.pair_kernel(*args, True)
        slow = layer.pair_kernel(*[t.clone().requires_grad_(True) for t in args], True)
        for f, s in zip(fast, slow, strict=True):
            assert f.dtype == s.dtype == torch.float64
            assert torch.equal(f.view(torch.int64), s.detach().view(torch.int64))
