"""Analytic kernels against Monte-Carlo averages of wide finite networks (width 1024)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_cpu_half_products

import ntkgp
from ntkgp.finite import monte_carlo_kernel

WIDTH = 1024


def _net(act, out_dim):
    return ntkgp.serial(ntkgp.Dense(WIDTH, 2.0, 0.1), act, ntkgp.Dense(WIDTH, 2.0, 0.1), act,
                        ntkgp.Dense(out_dim, 1.5, 0.1))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# Exp's b = 0.3 and a quadratic polynomial: two exp layers at b = 0.5, or cubic ones, put the
# large-norm point's K 70 % (5 %) above the limit at width 1024, a 1/width bias (heavy-tailed
# features approach their Gaussian limit slowly: the cubic's 21 % at width 256); a network with
# one such layer matches at b = 0.5 too (z ≤ 2)
@pytest.mark.parametrize("make_act", [ntkgp.ReLU, ntkgp.Erf, lambda: ntkgp.Exp(0.8, 0.3),
                                      lambda: ntkgp.Gaussian(1.5, -0.8), lambda: ntkgp.RectifiedMonomial(2),
                                      lambda: ntkgp.Polynomial([0.1, 0.8, 0.2]),
                                      lambda: ntkgp.Rbf(0.4), lambda: ntkgp.Hermite(2), ntkgp.Gabor,
                                      lambda: ntkgp.Numerical(torch.tanh)],
                         ids=["relu", "erf", "exp", "gaussian", "requ", "polynomial", "rbf", "hermite2", "gabor",
                              "numerical_tanh"])
def test_monte_carlo_converges_to_analytic_kernels(make_act):
    """Relative Frobenius error ≤ 0.05.

    NNGP: 128 networks x 256 output units (the outputs are conditionally independent given the
    last hidden layer, so each network gives 256 draws): the sampling error is about
    sqrt(2 / 32768) ≈ 0.008 per entry, 0.01–0.03 in Frobenius norm for these 8 points. Each network's
    average is one sample of the standard error, which so includes the last hidden layer's
    fluctuation from network to network: for ReLU 0.16 over 128 x 128, 0.14 over the 512 x 32 used
    before, 0.13 over 128 x 256, which takes a third of the weight draws of 512 x 32, the time
    (ReLU's NNGP estimate: 28 s → 9 s).
    NTK: 128 networks with one output; the empirical NTK concentrates (O(1/sqrt(width))
    fluctuations), so the average is within 0.01.
    """
    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64)
    act = make_act()
    wide = _net(act, 256)
    with torch.no_grad():
        exact = wide.kernel(x)
    nngp = monte_carlo_kernel(wide, x, n_samples=128, ntk=False, seed=1)
    assert _rel(nngp.nngp, exact.nngp) <= 0.05
    # The error is what the sampling noise predicts (not a bias): within 4 standard errors.
    assert float((nngp.nngp - exact.nngp).norm()) <= 4 * float(nngp.nngp_sem.norm())

    ntk = monte_carlo_kernel(_net(act, 1), x, n_samples=128, ntk=True, seed=2)
    assert _rel(ntk.ntk, exact.ntk) <= 0.05
    assert ntk.nngp.shape == ntk.ntk.shape == (8, 8)


def test_monte_carlo_cross_kernels_and_standard_parameterization():
    """The standard NTK depends on the finite widths exactly as neural-tangents says."""
    torch.manual_seed(1)
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(512, 2.0, 0.1, "standard"), ntkgp.Erf(), ntkgp.Dense(1, 1.0, 0.1, "standard"))
    with torch.no_grad():
        exact = net.kernel(x1, x2)
    est = monte_carlo_kernel(net, x1, x2, n_samples=128, seed=3)
    assert _rel(est.ntk, exact.ntk) <= 0.05
    assert est.ntk.shape == (5, 4)


def test_nearby_seeds_give_independent_estimates_and_bad_arguments_raise():
    """Batch b of seed s used to be batch b − 1 of seed s + 1: estimates of nearby seeds shared
    half their samples."""
    net = ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.5, 0.1))
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    both = monte_carlo_kernel(net, x, n_samples=8, seed=0, ntk=False, ensemble_batch=4)
    first = monte_carlo_kernel(net, x, n_samples=4, seed=0, ntk=False, ensemble_batch=4)
    neighbour = monte_carlo_kernel(net, x, n_samples=4, seed=1, ntk=False, ensemble_batch=4)
    torch.testing.assert_close(both.nngp, (first.nngp + monte_carlo_kernel(
        net, x, n_samples=4, seed=1_000_003, ntk=False, ensemble_batch=4).nngp) / 2)   # batch 1's seed
    assert float((2 * both.nngp - first.nngp - neighbour.nngp).abs().max()) > 1e-3
    single = monte_carlo_kernel(net, x, n_samples=1)
    assert bool(single.nngp_sem.isnan().all()) and bool(single.ntk_sem.isnan().all())  # not an exact 0
    for kwargs in (dict(ensemble_batch=0), dict(ensemble_batch=1.5), dict(n_samples=0)):
        with pytest.raises(ValueError):
            monte_carlo_kernel(net, x, **kwargs)
    with pytest.raises(ValueError, match=r"\(n, d\)"):   # a leading axis would pair points with members
        monte_carlo_kernel(net, x.expand(2, 4, 3), n_samples=2)
    for get in ("nngp", ("nngp",)):   # neural-tangents' get ran the whole NTK estimate (a string is true)
        with pytest.raises(ValueError, match=r"^ntk must be True or False, got .*nngp.*get argument"):
            monte_carlo_kernel(net, x, n_samples=2, ntk=get)
    assert monte_carlo_kernel(net, x, n_samples=2, ntk=np.bool_(False)).ntk is None


def test_monte_carlo_kernel_checks_the_seed_first():
    """seed=True was accepted (True + 1_000_003 b is an int); a seed whose last batch leaves
    torch's range failed only at that batch, after the earlier ones were computed."""
    net, x = ntkgp.mlp(depth=1, width=4), torch.randn(3, 2)
    for bad in (True, 1.5, "0"):
        with pytest.raises(ValueError, match="seed must be an integer"):
            monte_carlo_kernel(net, x, n_samples=2, seed=bad)
    with pytest.raises(ValueError, match=r"seed \+ 1_000_003 \* 1 \(the seed of the last batch\)"):
        monte_carlo_kernel(net, x, n_samples=4, ensemble_batch=2, seed=2**64 - 2)
    assert monte_carlo_kernel(net, x, n_samples=2, seed=2**64 - 2).n_samples == 2



def test_monte_carlo_kernel_refuses_kernels_that_overflow_as_the_analytic_one_does():
    """float32 inputs of magnitude 1e20 overflow the kernels (squared norms near 1e40 > 3.4e38):
    net.kernel raised NonFiniteKernelError, and the Monte-Carlo check of it returned inf and NaN
    estimates, silently. At 1e15 (kernels near 1e30) the estimate is finite, and 1e30 times the
    kernel of the unscaled inputs (a ReLU network without biases is homogeneous) to the 5 % that
    64 networks at width 256 give."""
    from ntkgp.layers.base import NonFiniteKernelError

    net = ntkgp.serial(ntkgp.Dense(256, 2.0), ntkgp.ReLU(), ntkgp.Dense(1, 1.5))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteKernelError, match=r"overflow torch\.float32"):
        net.kernel(x * 1e20)
    for ntk in (True, False):
        with pytest.raises(NonFiniteKernelError, match=r"^The empirical NNGP kernel is not finite in "
                                                       r"torch\.float32: .*or use float64"):
            monte_carlo_kernel(net, x * 1e20, n_samples=2, ntk=ntk)
    est = monte_carlo_kernel(net, x * 1e15, n_samples=64, seed=1)
    with torch.no_grad():
        exact = net.kernel(x.double()).ntk
    assert _rel(est.ntk.double() / 1e30, exact) <= 0.05


@needs_cpu_half_products
def test_half_precision_standard_errors_do_not_overflow():
    """The sum of squared deviations was accumulated in the samples' dtype: in float16 (largest value
    65504) it overflowed for NNGP values near 35 (64 samples), and the standard errors of finite
    estimates came back inf. The same networks are drawn in either dtype, so float16's estimate and
    standard errors are float64's to float16 rounding through the network: about 1e-3 of the largest
    entries (entries near 0 inherit their absolute error), so 1e-2 relative plus 1e-3 of the largest."""
    net = ntkgp.serial(ntkgp.Dense(256, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.5))
    x = 3 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    half = monte_carlo_kernel(net, x.half(), n_samples=64, seed=0, ensemble_batch=16)
    full = monte_carlo_kernel(net, x, n_samples=64, seed=0, ensemble_batch=16)
    assert float(full.nngp.abs().max()) > 30
    for name in ("nngp", "nngp_sem", "ntk", "ntk_sem"):
        value = getattr(half, name)
        assert value.dtype == torch.float16
        expected = getattr(full, name)
        torch.testing.assert_close(value.double(), expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()))

def test_specs_without_a_closed_form_kernel_build_and_have_monte_carlo_estimates():
    """build() and monte_carlo_kernel take every spec, as build's docstring says, also those whose
    kernel() is refused; the estimate of x + x is 4 K of x, which the closed form would have given."""
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    specs = [ntkgp.serial(ntkgp.parallel(ntkgp.Identity(), ntkgp.Dense(64), join="concat"), ntkgp.LayerNorm(),
                          ntkgp.Dense(1)),
             ntkgp.serial(ntkgp.Dense(8), ntkgp.ReLU(), ntkgp.Dense(4, ard_num_dims=8), ntkgp.ReLU(), ntkgp.Dense(1)),
             ntkgp.serial(ntkgp.Dense(8), ntkgp.parallel(ntkgp.Dense(4), ntkgp.Dense(4), join="concat"), ntkgp.ReLU(),
                          ntkgp.Dense(1))]
    for net in specs:
        with pytest.raises(ValueError):
            net.kernel(x)
        assert torch.isfinite(monte_carlo_kernel(net, x, n_samples=4).nngp).all()
    doubled = ntkgp.serial(ntkgp.Dense(512, 1.5, 0.1), ntkgp.parallel(ntkgp.Identity(), ntkgp.Identity()))
    with pytest.raises(ValueError, match="sum of branches"):
        doubled.kernel(x)
    estimate = monte_carlo_kernel(doubled, x, n_samples=64, ntk=False).nngp
    single = ntkgp.Dense(512, 1.5, 0.1).kernel(x, ntk=False).nngp.detach()
    torch.testing.assert_close(estimate, 4 * single, rtol=0, atol=0.05 * float(4 * single.diagonal().max()))


@pytest.mark.parametrize(("make_act", "deep"), [
    (ntkgp.ReLU, True), (ntkgp.GELU, False), (ntkgp.Cos, False), (lambda: ntkgp.Erf(c=0.3), False),
    (lambda: ntkgp.Gaussian(1.5, -0.8), False), (lambda: ntkgp.RectifiedMonomial(0), False),
    (lambda: ntkgp.Monomial(2), False), (lambda: ntkgp.Rbf(0.5), False), (ntkgp.SigmoidLike, False),
    (lambda: ntkgp.Hermite(3), False), (ntkgp.Gabor, False),
    (lambda: ntkgp.Numerical(torch.nn.functional.softplus), False)],
    ids=["relu_deep", "gelu", "cos", "erf_shifted", "gaussian", "step", "monomial", "rbf", "sigmoid_like", "hermite3",
         "gabor",
         "numerical_softplus"])
def test_layernorm_after_an_activation_subtracts_the_features_mean(make_act, deep):
    """LayerNorm after an activation: K ← (T − μ1μ2)/sqrt((ε + T11 − μ1²)(ε + T22 − μ2²)), Θ over
    the same root (then, for one case, a Dense and an Erf layer more). The NNGP estimate (256
    networks × 16 outputs) is within 4 standard errors in Frobenius norm; the NTK (128 networks)
    within 0.05 (its O(1/width) bias measured 0.4–1.6 % at width 1024)."""
    torch.manual_seed(4)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[5] = -x[0]
    act = make_act()
    width = 512

    def net(out_dim):
        tail = [ntkgp.Dense(width, 1.5, 0.1), ntkgp.Erf()] if deep else []
        return ntkgp.serial(ntkgp.Dense(width, 1.7, 0.2), act, ntkgp.LayerNorm(), *tail, ntkgp.Dense(out_dim, 1.3, 0.1))

    with torch.no_grad():
        exact = net(1).kernel(x)
    nngp = monte_carlo_kernel(net(16), x, n_samples=256, ntk=False, seed=5)
    assert float((nngp.nngp - exact.nngp).norm()) <= 4 * float(nngp.nngp_sem.norm())
    ntk = monte_carlo_kernel(net(1), x, n_samples=128, seed=6)
    assert _rel(ntk.ntk, exact.ntk) <= 0.05


def test_layernorm_after_a_sum_with_an_activation_branch():
    """Dense(z) + ReLU(z) has the mean of its ReLU branch and the sum of the branches' centred
    kernels (the Dense branch is centred and independent). 256 networks × 16 outputs within 4
    standard errors (measured 0.8–1.0); the NTK of 64 networks within 0.05 (measured 0.013)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[5] = -x[0]

    def net(out_dim):
        return ntkgp.serial(ntkgp.Dense(256, 1.7, 0.2), ntkgp.parallel(ntkgp.Dense(256, 0.8, 0.1), ntkgp.ReLU()),
                            ntkgp.LayerNorm(), ntkgp.Dense(out_dim, 1.3, 0.1))

    with torch.no_grad():
        exact = net(1).kernel(x)
    nngp = monte_carlo_kernel(net(16), x, n_samples=256, ntk=False, seed=1)
    assert float((nngp.nngp - exact.nngp).norm()) <= 4 * float(nngp.nngp_sem.norm())
    assert _rel(monte_carlo_kernel(net(1), x, n_samples=64, seed=2).ntk, exact.ntk) <= 0.05


def test_layernorm_after_relu_is_not_the_uncentred_form():
    """The Dense-layer form applied there, K / sqrt(T11 T22) without the mean (neural-tangents 0.6.5
    refuses LayerNorm after an activation), is many standard errors off wide networks (the check
    above can tell the two apart)."""
    torch.manual_seed(4)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        t = ntkgp.serial(ntkgp.Dense(1, 1.7, 0.2), ntkgp.ReLU()).kernel(x, ntk=False).nngp
    uncentred = 1.3 * t / torch.outer(t.diagonal(), t.diagonal()).sqrt() + 0.1
    net = ntkgp.serial(ntkgp.Dense(WIDTH, 1.7, 0.2), ntkgp.ReLU(), ntkgp.LayerNorm(), ntkgp.Dense(16, 1.3, 0.1))
    est = monte_carlo_kernel(net, x, n_samples=256, ntk=False, seed=5)
    assert float((est.nngp - uncentred).norm()) > 8 * float(est.nngp_sem.norm())
    assert float((est.nngp - net.kernel(x, ntk=False).nngp.detach()).norm()) <= 4 * float(est.nngp_sem.norm())


@pytest.mark.parametrize("make_act", [ntkgp.ReLU, lambda: ntkgp.LeakyReLU(0.3), lambda: ntkgp.ABReLU(-0.2, 1.5)],
                         ids=["relu", "leaky", "abrelu"])
def test_relu_family_networks_at_exactly_zero_pre_activations(make_act):
    """A zero input through a standard-parameterized layer with a zero (but trainable) bias: every
    pre-activation is exactly 0, where the kernel's θ = π/2 means the slope (a + b)/2. The finite
    twins' clamps had a + b there: NTK(0, 0) 1.0 against the kernel's 0.25 for ReLU, z = −214 at
    width 2048. 32 networks of width 512; the tolerance is 5 standard errors + 1 %."""
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 2.0]], dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(512, 2.0, 0.0, "standard"), make_act(), ntkgp.Dense(1, 1.0, 0.1, "standard"))
    with torch.no_grad():
        exact = net.kernel(x)
    est = monte_carlo_kernel(net, x, n_samples=32, seed=7)
    assert bool(((est.ntk - exact.ntk).abs() <= 5 * est.ntk_sem + 0.01 * exact.ntk.abs()).all())
    u = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    act = make_act()
    (slope,) = torch.autograd.grad(act.fn(u).sum(), u)
    torch.testing.assert_close(slope, torch.full_like(u, (act.a + act.b) / 2), rtol=0, atol=0)


def _sums_with_means(width: int) -> dict[str, tuple[ntkgp.Serial, list[ntkgp.Serial]]]:
    """Specs whose kernels need the branches' means, each with its branches as networks of their
    own where the sum's kernel would be the sum of theirs if the means were ignored."""
    def head():
        return [ntkgp.Dense(width, 1.5, 0.1), ntkgp.ReLU()]

    def readout():
        return ntkgp.Dense(16, 1.0, None)

    relu_branch = [ntkgp.Dense(width, 2.0, 0.1), ntkgp.ReLU()]
    erf_branch = [ntkgp.Dense(width, 1.0, 0.3), ntkgp.Erf(c=0.5)]
    return {
        # x + ReLU(D(x)) after a ReLU: both branches have non-zero means
        "post_activation_residual": (
            ntkgp.serial(*head(), ntkgp.residual(*relu_branch), readout()),
            [ntkgp.serial(*head(), readout()), ntkgp.serial(*head(), *relu_branch, readout())]),
        # ReLU(D(x)) + erf(D'(x)) + c
        "activation_branches": (
            ntkgp.serial(*head(), ntkgp.parallel(ntkgp.serial(*relu_branch), ntkgp.serial(*erf_branch)), readout()),
            [ntkgp.serial(*head(), *relu_branch, readout()), ntkgp.serial(*head(), *erf_branch, readout())]),
        # two concatenations whose features all have one mean (copies of ReLU(D(x))): pairwise, as any
        "sum_of_concatenations": (
            ntkgp.serial(*head(), ntkgp.parallel(*[ntkgp.parallel(
                ntkgp.serial(*relu_branch), ntkgp.serial(*relu_branch), join="concat")] * 2), readout()),
            [ntkgp.serial(*head(), ntkgp.parallel(ntkgp.serial(*relu_branch), ntkgp.serial(*relu_branch),
                                                  join="concat"), readout())] * 2),
        # a LayerNorm after concatenated ReLU and erf + c features subtracts their common mean
        # (the part: the concatenation without it, to be normalized as if centred)
        "layernorm_after_concatenation": (
            ntkgp.serial(ntkgp.Dense(width, 1.5, 0.1), ntkgp.parallel(ntkgp.ReLU(), ntkgp.Erf(c=0.7), join="concat"),
                         ntkgp.LayerNorm(), readout()),
            [ntkgp.serial(ntkgp.Dense(width, 1.5, 0.1), ntkgp.parallel(ntkgp.ReLU(), ntkgp.Erf(c=0.7), join="concat"),
                          readout())]),
    }


@pytest.mark.parametrize("name", sorted(_sums_with_means(1)))
def test_branches_with_non_zero_means_match_wide_networks(name):
    """Independent branches (all but one contain a Dense layer of their own) whose features have
    non-zero means: the sum's kernel gains Σ_{a≠b} μ_a μ_b', and a LayerNorm after a
    concatenation subtracts the mean Σ_b w_b μ_b. These were refused. Width 512, 256 networks ×
    16 outputs: every NNGP entry within 4.5 standard errors (measured ≤ 2.4), while the kernel
    with the means ignored (the sum of the branches' own kernels; the concatenation normalized
    as if centred) is rejected at ≥ 10 (measured 13-14 and 34); the NTK, which gains no cross
    terms, within 3 % over 64 networks (measured ≤ 0.9 %)."""
    spec, parts = _sums_with_means(512)[name]
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = spec.kernel(x)
    est = monte_carlo_kernel(spec, x, n_samples=256, ntk=False)
    z = (est.nngp - exact.nngp.detach()) / est.nngp_sem
    assert float(z.abs().max()) < 4.5, z
    ignored = sum(part.kernel(x, ntk=False).nngp.detach() for part in parts)
    if name == "layernorm_after_concatenation":
        scale = ignored.diagonal().rsqrt()
        ignored = ignored * scale[:, None] * scale[None, :]
    assert float(((est.nngp - ignored) / est.nngp_sem).abs().max()) > 10
    ntk = monte_carlo_kernel(spec, x, n_samples=64).ntk
    error = float((ntk - exact.ntk.detach()).norm() / exact.ntk.detach().norm())
    assert error < 0.03, error


def _products(width: int) -> dict[str, ntkgp.Serial]:
    def readout():
        return ntkgp.Dense(16, 1.0, None)

    return {
        # two centred Gaussian branches after a ReLU: K = K_1 K_2
        "dense_times_dense": ntkgp.serial(ntkgp.Dense(width, 1.5, 0.1), ntkgp.ReLU(), ntkgp.parallel(
            ntkgp.Dense(width, 1.2, 0.1), ntkgp.Dense(width, 0.8, 0.3), join="prod"), readout()),
        # a gate: x ⊙ (erf(D(x)) + 1)/2
        "gate": ntkgp.serial(ntkgp.Dense(width, 1.5, 0.1), ntkgp.parallel(
            ntkgp.Identity(), ntkgp.serial(ntkgp.Dense(width, 2.0, 0.1), ntkgp.Erf(0.5, 1.0, 0.5)), join="prod"),
            readout()),
        # branches of non-zero means, then a LayerNorm (the product's centred kernel)
        "means_then_layernorm": ntkgp.serial(ntkgp.Dense(width, 1.5, 0.1), ntkgp.parallel(
            ntkgp.serial(ntkgp.Dense(width, 2.0, 0.1), ntkgp.ReLU()),
            ntkgp.serial(ntkgp.Dense(width, 1.0, 0.3), ntkgp.Erf(c=0.5)), join="prod"), ntkgp.LayerNorm(), readout()),
        # one concatenation times identical features: the average of products is the product of averages
        "concatenation_times_relu": ntkgp.serial(ntkgp.Dense(width, 1.5, 0.1), ntkgp.parallel(
            ntkgp.parallel(ntkgp.serial(ntkgp.Dense(width // 2, 2.0, 0.1), ntkgp.ReLU()),
                           ntkgp.Dense(width // 2, 1.0, 0.2), join="concat"),
            ntkgp.serial(ntkgp.Dense(width, 1.0, 0.3), ntkgp.ReLU()), join="prod"), readout()),
    }


@pytest.mark.parametrize("name", sorted(_products(2)))
def test_products_of_branches_match_wide_networks(name):
    """join="prod" (neural-tangents' FanInProd): K = Π_b K_b, Θ = Σ_b Θ_b Π_{c≠b} K_c for independent
    branches. Width 512, 256 networks × 16 outputs: every NNGP entry within 4.5 standard errors
    (measured ≤ 2.9); the NTK over 64 networks within 4 % (measured 0.6-2.3 %; with the LayerNorm
    1.8 % → 0.9 % from width 256 to 1024, mean signed z ±0.3: a 1/width bias, no cross term)."""
    spec = _products(512)[name]
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = spec.kernel(x)
    est = monte_carlo_kernel(spec, x, n_samples=256, ntk=False)
    z = (est.nngp - exact.nngp.detach()) / est.nngp_sem
    assert float(z.abs().max()) < 4.5, z
    ntk = monte_carlo_kernel(spec, x, n_samples=64).ntk
    error = float((ntk - exact.ntk.detach()).norm() / exact.ntk.detach().norm())
    assert error < 0.04, error


def test_a_concatenation_of_one_branch_is_that_branch():
    """One branch concatenated is the branch itself: an activation after it was refused ("needs
    Gaussian inputs: put a Dense layer before it", with a Dense already there), while one-branch
    sums and products were taken. Its kernels are the plain network's, and so are its finite
    networks' (same draws from the same seed)."""
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def network(wrap):
        return ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), wrap(ntkgp.Dense(8, 1.3, 0.2)), ntkgp.ReLU(), ntkgp.Dense(1))

    plain = network(lambda layer: layer)
    for join in ("concat", "sum", "prod"):
        wrapped = network(lambda layer, join=join: ntkgp.parallel(layer, join=join))
        for ntk in (True, False):
            ours, theirs = wrapped.kernel(x, ntk=ntk), plain.kernel(x, ntk=ntk)
            torch.testing.assert_close(ours.nngp, theirs.nngp, rtol=1e-15, atol=0)
            if ntk:
                torch.testing.assert_close(ours.ntk, theirs.ntk, rtol=1e-15, atol=0)
        estimate = monte_carlo_kernel(wrapped, x, n_samples=8, seed=3)
        torch.testing.assert_close(estimate.nngp, monte_carlo_kernel(plain, x, n_samples=8, seed=3).nngp,
                                   rtol=1e-14, atol=0)


@pytest.mark.fresh_process
def test_a_batch_s_kernels_are_formed_a_block_of_rows_at_a_time(monkeypatch):
    """A batch of 64 members held its 64 NNGP and 64 NTK matrices whole (and the NTK's layer-by-layer
    sum two more of that size), where the estimates are four matrices: 700 points in float64, 3.7 MiB
    a matrix, peaked at 739 MiB above the start. Formed KERNEL_BYTES (here 1 MiB) of rows at a time,
    the peak is the four estimates, the outputs and layer signals of the points (64 members x 700
    points x 8 features, 2.7 MiB per layer) and a few blocks: 34 MiB."""
    from conftest import peak_above_current

    from ntkgp.finite import monte_carlo as mc

    monkeypatch.setattr(mc, "KERNEL_BYTES", 1 << 20, raising=False)
    net = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8)
    x = torch.randn(700, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    monte_carlo_kernel(net, x[:5], n_samples=2)   # one-time buffers
    result = []
    peak = peak_above_current(lambda: result.append(monte_carlo_kernel(net, x, n_samples=128, ensemble_batch=64)))
    assert peak < 60, peak
    assert result[0].ntk.shape == (700, 700)


@pytest.mark.parametrize("cross", [False, True])
def test_kernels_in_blocks_of_rows_are_the_whole_batch_s(monkeypatch, cross):
    """Blocks of 2 rows (7 points: a shorter last block), batches of unequal size (5 + 5 + 3 members):
    the estimates are those of the stacked empirical kernels of the same networks, to rounding."""
    from ntkgp.finite import monte_carlo as mc

    net = ntkgp.serial(ntkgp.Dense(16, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(16, 1.5, 0.1), ntkgp.GELU(),
                       ntkgp.Dense(2, 1.0, 0.1, "standard"))
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    x2 = torch.randn(4, 3, generator=g, dtype=torch.float64) if cross else None
    n2 = 4 if cross else 7
    monkeypatch.setattr(mc, "KERNEL_BYTES", 2 * 5 * n2 * 8, raising=False)   # 2 rows of a batch of 5
    est = monte_carlo_kernel(net, x1, x2, n_samples=13, seed=7, ensemble_batch=5)
    nngps, ntks = [], []
    for b, size in enumerate((5, 5, 3)):
        model = net.build(3, seed=7 + 1_000_003 * b, ensemble_size=size, dtype=torch.float64)
        nngps.append(ntkgp.finite.empirical_nngp(model, x1, x2))
        ntks.append(ntkgp.finite.empirical_ntk(model, x1, x2))
    for samples, mean, sem in ((nngps, est.nngp, est.nngp_sem), (ntks, est.ntk, est.ntk_sem)):
        stacked = torch.cat(samples)
        torch.testing.assert_close(mean, stacked.mean(0), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(sem, stacked.std(0) / 13**0.5, rtol=1e-10, atol=1e-15)


def test_estimates_larger_than_the_memory_are_refused_before_any_network_is_drawn(monkeypatch):
    """The estimates alone (a mean and a sum of squares per kernel) beyond the device's memory: refused
    up front with the sizes, not by torch's allocator once the first batch's networks ran (or by the
    operating system, for a request just above the free memory). A batch's kernels, formed in blocks
    of rows, need not fit whole."""

    net = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    # 4 matrices of 300 x 300 float64 values: 2.75 MiB; NNGP alone 1.4 MiB
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2 << 20)
    monkeypatch.setattr(ntkgp.Serial, "build", lambda *args, **kwargs: pytest.fail("a network was drawn"))
    message = r"Estimating 2 kernel\(s\) of 300 x 300 points \(a mean and a sum of squares each\) needs 0.00268 GiB"
    with pytest.raises(torch.cuda.OutOfMemoryError, match=message):
        monte_carlo_kernel(net, x, n_samples=4)
    monkeypatch.undo()
    # the batch's 4 kernels (2.75 MiB) need not fit: they are formed a block of rows at a time
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2 << 20)
    assert monte_carlo_kernel(net, x, n_samples=4, ntk=False).nngp.shape == (300, 300)
