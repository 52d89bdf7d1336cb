"""Exact values of predictors, training and metrics in cases the reference comparisons do not
reach: vector targets (log marginal likelihood, training), momentum, ties at the stability
limit, the singularity threshold, noisy duplicates at t = ∞, the divergence threshold, and
calibration gaps of both signs. Each test was written against a mutation the rest let through."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import scipy.stats
import torch

import ntkgp
from ntkgp import bayes, predict
from ntkgp.finite.train import readout_parameters, train_ensemble
from ntkgp.predict.spectral import cholesky

pytestmark = pytest.mark.usefixtures("float64_default")


def _x(n=6, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))

NET = ntkgp.mlp(2, "erf", 1.7, 0.1)

# log marginal likelihood of (N, k) targets = Σ over columns of the Gaussian log density
def test_log_marginal_likelihood_of_vector_targets():
    x, y = _x(7), _x(7, 3, seed=1)
    post = predict.GPPosterior(NET, x, y, kernel="nngp", noise=0.1)
    cov = (NET.kernel(x, ntk=False).nngp + 0.1 * torch.eye(7)).detach().numpy()
    ref = sum(scipy.stats.multivariate_normal(np.zeros(7), cov).logpdf(y[:, c].numpy()) for c in range(3))
    assert post.log_marginal_likelihood() == pytest.approx(ref, rel=1e-10)

# momentum enters as 2(1 + momentum) m / λ_max
def test_max_learning_rate_with_momentum():
    theta = torch.diag(torch.tensor([4.0, 1.0]))
    assert predict.max_learning_rate(theta) == 1.0
    assert predict.max_learning_rate(theta, 6, momentum=0.9) == pytest.approx(2 * 1.9 * 6 / 4)

# the warning fires exactly at the limit (exactly representable λ_max)
def test_warns_exactly_at_the_limit():
    theta, y = torch.diag(torch.tensor([2.0, 1.0])), torch.tensor([1.0, -1.0])
    assert predict.max_learning_rate(theta) == 2.0
    with pytest.warns(RuntimeWarning, match="stability limit"):
        predict.gradient_descent_mse(theta, y, steps=3, learning_rate=2.0)

# numpy's rank threshold N·ε·max diag: a pivot of 2ε in a 3x3 kernel counts as singular
def test_cholesky_rank_threshold():
    eps = torch.finfo(torch.float64).eps
    k = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0 + 2 * eps, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="singular"):
        cholesky(k, "kernel")

# NNGP training-set covariance at time t is V diag(λ e^{−2λτ}) Vᵀ
def test_nngp_training_covariance_closed_form():
    x, y = _x(5), _x(5, 1, seed=2)[:, 0]
    flow = predict.GradientFlow(NET, x, y, kernel="nngp", learning_rate=0.7)
    t = 2.0
    out = flow.predict(None, t=t)
    k = NET.kernel(x, ntk=False).nngp.detach()
    decay = torch.linalg.matrix_exp(-k * 0.7 * t / 5)
    torch.testing.assert_close(out.covariance, decay @ k @ decay, rtol=1e-9, atol=1e-12)

# duplicated training points with conflicting targets (singular kernel) at t = inf: the null
# directions never move, so the answer is the de-duplicated problem with averaged targets
def test_noisy_duplicates_at_infinite_time_match_averaged_targets():
    x, y = _x(6), _x(6, 1, seed=3)[:, 0]
    xt = _x(4, seed=4)
    y_avg = y.clone()
    y_avg[:3] += 0.25
    ref = predict.GradientFlow(NET, x, y_avg).predict(xt, t=math.inf)
    dup = predict.GradientFlow(NET, torch.cat([x, x[:3]]), torch.cat([y, y[:3] + 0.5])).predict(xt, t=math.inf)
    torch.testing.assert_close(dup.mean, ref.mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dup.covariance, ref.covariance, rtol=1e-9, atol=1e-10)

# GPPosterior noise is an absolute variance
def test_gp_posterior_noise_is_absolute():
    x, y, xt = _x(5), _x(5, 1, seed=5)[:, 0], _x(3, seed=6)
    out = predict.gp_posterior(NET, x, y, xt, kernel="nngp", noise=0.3)
    k = NET.kernel(torch.cat([x, xt]), ntk=False).nngp.detach()
    c = k[:5, :5] + 0.3 * torch.eye(5)
    torch.testing.assert_close(out.mean, k[5:, :5] @ torch.linalg.solve(c, y))

# the loss is normalized by m = number of target entries (also for vector targets)
def test_readout_only_training_with_vector_targets_is_the_linear_model():
    X = torch.linspace(-3, 3, 5).unsqueeze(-1)
    Y = torch.cat([torch.sin(X), torch.cos(X)], -1)
    net = ntkgp.serial(ntkgp.Dense(24, 2.25, 0.01), ntkgp.Erf(), ntkgp.Dense(2, 1.5, 0.01))
    steps, lr = [0, 3, 40], 0.3
    h = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=lr, record_steps=steps, readout_only=True,
                       dtype=torch.float64)
    model = net.build(in_features=1, seed=0, ensemble_size=2, dtype=torch.float64)
    readouts = readout_parameters(model)
    scales = {n: 1.0 if n in readouts else 0.0 for n in dict(model.named_parameters())}
    theta = ntkgp.finite.empirical_ntk(model, X, parameter_scales=scales)
    with torch.no_grad():
        f0 = model(X)
    for member in range(2):
        train = predict.gradient_descent_mse(theta[member], Y, fx_train_0=f0[member], steps=torch.tensor(steps),
                                             learning_rate=lr)
        torch.testing.assert_close(h.test_outputs[:, member], train, rtol=1e-10, atol=1e-11)

# divergence is declared at the first step whose loss exceeds 1e6 x the initial loss
def test_divergence_threshold():
    X = torch.linspace(-3, 3, 5).unsqueeze(-1)
    Y = torch.sin(X)
    net = ntkgp.mlp(1, "erf", 2.0, 0.1, width=64)
    flow = predict.GradientFlow(ntkgp.mlp(1, "erf", 2.0, 0.1), X, Y, kernel="nngp")
    # readout-only training is linear: above the limit the loss grows geometrically, no catapult
    h = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=3 * flow.max_learning_rate,
                       record_steps=list(range(400)), readout_only=True, dtype=torch.float64)
    assert h.diverged_at is not None
    assert float(h.train_loss.max() / h.train_loss[0].min()) <= 1e6 * 1.0001

# calibration error averages absolute gaps (gaps of opposite signs must not cancel)
def test_calibration_error_with_gaps_of_opposite_sign():
    mean, var = np.zeros(4), np.ones(4)
    y = np.array([0.1, 0.2, 2.0, 3.0])   # |z| ≤ 0.253 for 2 of 4, > 1.036 for 2 of 4
    # coverage 0.5 at both levels: gaps +0.3 and -0.2
    assert bayes.calibration_error(mean, var, y, levels=[0.2, 0.7]) == pytest.approx(0.25)

# the interval is closed: |y − μ| = z σ exactly counts as covered
def test_coverage_interval_is_closed():
    from scipy.special import ndtri
    half = float(ndtri(0.75))
    assert bayes.interval_coverage([0.0], [1.0], [half], levels=[0.5])[0.5] == 1.0


def test_invalid_tangent_kernels_and_rates_are_refused():
    """An asymmetric kernel had one triangle used silently, an indefinite one (−Θ) trained nothing
    (its eigenvalues were clamped to 0) and gave max_learning_rate = inf; momentum NaN or −1 and
    y_train_size 0 returned NaN or 0."""
    x = _x(5, 3)
    y = torch.sin(x.sum(-1))
    theta = NET.kernel(x).ntk.detach()
    asymmetric = theta + torch.triu(torch.ones(5, 5), 1)
    with pytest.raises(ValueError, match="symmetric"):
        predict.gradient_descent_mse(asymmetric, y, t=1.0)
    for call in (lambda: predict.gradient_descent_mse(-theta, y, t=1.0),
                 lambda: predict.gradient_descent_mse(-theta, y, steps=3),
                 lambda: predict.max_learning_rate(-theta)):
        with pytest.raises(ValueError, match="positive semi-definite"):
            call()
    for momentum in (math.nan, -1.0, 1.0, "x"):
        with pytest.raises(ValueError, match="momentum"):
            predict.max_learning_rate(theta, momentum=momentum)
    for size in (0, -3, 2.5):
        with pytest.raises(ValueError, match="y_train_size"):
            predict.max_learning_rate(theta, size)
    # rounding-level asymmetry and negative eigenvalues (a float32 empirical kernel) pass
    noisy = theta.float()
    noisy[0, 1] += 1e-6 * float(noisy.abs().max())
    predict.gradient_descent_mse(noisy, y.float(), t=1.0)
    assert predict.max_learning_rate(torch.zeros(3, 3)) == math.inf


def test_a_float32_kernel_cast_to_float64_is_told_how_to_symmetrize():
    """A float32 Gram matrix a @ a.T is not exactly symmetric on every BLAS (2.4e-7 apart for a of shape
    (7, 10) on an AMD EPYC); cast to float64 it exceeds float64's sqrt(ε) and is refused. The message
    said only that it must be symmetric; it now says how, and what it says is accepted."""
    x = _x(5, 3)
    y = torch.sin(x.sum(-1))
    theta = NET.kernel(x).ntk.detach()
    rounded = theta.clone()
    rounded[0, 1] += 2.4e-7 * float(theta.abs().max())
    with pytest.raises(ValueError, match=r"must be symmetric.*rounding.*pass \(k \+ k\.mT\) / 2"):
        predict.gradient_descent_mse(rounded, y, t=1.0)
    symmetrized = (rounded + rounded.mT) / 2
    torch.testing.assert_close(predict.gradient_descent_mse(symmetrized, y, t=1.0),
                               predict.gradient_descent_mse(theta, y, t=1.0), rtol=1e-6, atol=1e-6)


def test_a_full_kernel_is_told_how_to_symmetrize_it_as_a_full_kernel():
    """A full ``(N, N, k, k)`` kernel is symmetric as ``Θ_ij,ab = Θ_ji,ba``: the refusal of one off by
    rounding advised ``(k + k.mT) / 2``, which swaps its outputs alone, and that was refused again
    (asymmetry 2.2e-3 against 3.3e-3, scale 3.7), by gradient_descent_mse and gradient_descent alike.
    It now names the full kernel's transpose, which is accepted."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    model = ntkgp.serial(ntkgp.Dense(64, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(2, 1.5, 0.1)).build(
        in_features=3, seed=0, dtype=torch.float64)
    theta = ntkgp.finite.empirical_ntk(model, x, vector_output=True)
    rounded = theta + 1e-3 * torch.randn(theta.shape, generator=g, dtype=torch.float64)
    symmetrized = (rounded + rounded.permute(1, 0, 3, 2)) / 2
    calls = [lambda k: predict.gradient_descent_mse(k, y, t=1.0), lambda k: predict.gradient_descent_mse(k, y),
             lambda k: predict.gradient_descent(lambda f, y: 0.5 * (f - y).square().sum(), k, y, t=1.0)]
    for call in calls:
        with pytest.raises(ValueError, match=r"must be symmetric.*pass \(k \+ k\.permute\(1, 0, 3, 2\)\) / 2\.$"):
            call(rounded)
        assert torch.isfinite(call(symmetrized)).all()


def test_a_kernel_not_semi_definite_at_infinite_time_is_refused_as_no_tangent_kernel():
    """At t=None (gradient_descent_mse's default) a kernel that is not positive semi-definite failed the
    Cholesky factorization and was refused as "singular ... duplicate or nearly dependent training
    points", with the advice diag_reg=1e-6, which cannot make -Θ (eigenvalues -7.0 to -0.86) a kernel,
    where finite times say "not positive semi-definite". A singular kernel that is semi-definite up to
    rounding (a duplicated point, eigenvalue -2e-16) keeps the singular kernel's message and advice."""
    x = _x(5, 3)
    y = torch.sin(x.sum(-1))
    theta = NET.kernel(x).ntk.detach()
    x_test = _x(2, 3, seed=1)
    theta_test = NET.kernel(x_test, x).ntk.detach()
    for call in (lambda: predict.gradient_descent_mse(-theta, y),
                 lambda: predict.gradient_descent_mse(-theta, y, t=None, diag_reg=1e-6),
                 lambda: predict.gradient_descent_mse(-theta, y, ntk_test_train=theta_test, fx_test_0=0.0)):
        with pytest.raises(ValueError, match=r"not positive semi-definite.*Gram matrix of Jacobians"):
            call()
    duplicated = torch.cat([x, x[:1]])
    singular = NET.kernel(duplicated).ntk.detach()
    assert float(torch.linalg.eigvalsh(singular)[0].abs()) < 1e-12 * float(singular.diagonal().max())
    with pytest.raises(ValueError, match=r"singular or not positive definite.*diag_reg"):
        predict.gradient_descent_mse(singular, torch.sin(duplicated.sum(-1)))


def test_functions_of_kernel_matrices_say_what_to_pass_for_a_spec_or_its_kernel_state():
    """Every other function of ntkgp.predict takes the spec, so max_learning_rate(net) and
    gradient_descent_mse(net.kernel(x), y) are natural mistakes, refused with only "got Serial" or
    "got KernelState". The hint names the matrix to pass, and that matrix gives GradientFlow's limit."""
    x = _x(5, 3)
    y = torch.sin(x.sum(-1))
    state = NET.kernel(x)
    with pytest.raises(ValueError, match=r"got Serial\. .*GradientFlow\(net, x_train, y_train\)\.max_learning_rate"):
        predict.max_learning_rate(NET)
    with pytest.raises(ValueError, match=r"got Serial\. Pass a kernel matrix, such as net\.kernel\(x_train\)\.ntk; "
                                         r".*ntkgp\.predict\.gradient_flow"):
        predict.gradient_descent_mse(NET, y, t=1.0)

    def loss(f, target):
        return 0.5 * ((f - target) ** 2).sum()

    test_state = NET.kernel(x[:2], x)
    for call in (lambda: predict.max_learning_rate(state),
                 lambda: predict.gradient_descent_mse(state, y, t=1.0),
                 lambda: predict.gradient_descent_mse(state.ntk, y, ntk_test_train=test_state, fx_test_0=0.0, t=1.0),
                 lambda: predict.gradient_descent(loss, state, y, t=1.0),
                 lambda: predict.gradient_descent(loss, state.ntk, y, ntk_test_train=test_state, fx_test_0=0.0, t=1.0)):
        with pytest.raises(ValueError, match=r"got KernelState\. Pass one of its matrices: net\.kernel\(\.\.\.\)\.ntk"):
            call()
    # the matrix the hint names is the right one: one eigendecomposition of the same kernel, so to rounding
    assert predict.max_learning_rate(state.ntk) == pytest.approx(predict.GradientFlow(NET, x, y).max_learning_rate,
                                                                 rel=1e-12)


def test_variances_are_clamped_at_zero_where_the_data_pin_a_point():
    """At a test point that repeats a training point the t = ∞ variance is 0, which rounding left
    at −2e-15 K** (its square root NaN). The covariance itself is returned as computed."""
    x = _x(6, 2)
    y = torch.sin(x.sum(-1))
    out = predict.gradient_flow(NET, x, y, x[:3], t=math.inf)
    assert bool((out.variance >= 0).all())
    torch.testing.assert_close(out.variance, out.covariance.diagonal().clamp_min(0), rtol=0, atol=0)
    assert float(out.variance.max()) < 1e-12


def test_max_learning_rate_of_a_full_kernel_is_that_of_the_flattened_outputs():
    """A full (N, N, k, k) kernel (as gradient_descent_mse takes it) is the (N k, N k) kernel of the
    flattened outputs, m = N k by default (neural-tangents flattens alike); it was read as N²
    separate (k, k) blocks, 4-5x too large a rate."""
    n, k = 6, 3
    a = _x(n * k, n * k, seed=3)
    flat = a @ a.T                                           # any PSD kernel on the N k outputs
    full = flat.reshape(n, k, n, k).permute(0, 2, 1, 3)
    top = float(torch.linalg.eigvalsh(flat)[-1])
    assert predict.max_learning_rate(full) == pytest.approx(2 * n * k / top, rel=1e-12)
    assert predict.max_learning_rate(full, 5, momentum=0.5) == pytest.approx(2 * 1.5 * 5 / top, rel=1e-12)
    # below it, discrete gradient descent on the full kernel stays bounded; above it, it diverges
    y = _x(n, k, seed=4)
    limit = predict.max_learning_rate(full)
    stable = predict.gradient_descent_mse(full, y, fx_train_0=0.0, steps=500, learning_rate=0.9 * limit)
    assert float((stable - y).abs().max()) <= float(y.abs().max())
    with pytest.warns(RuntimeWarning, match="stability limit"):
        unstable = predict.gradient_descent_mse(full, y, fx_train_0=0.0, steps=500, learning_rate=1.1 * limit)
    assert float((unstable - y).abs().max()) > 1e10
    with pytest.raises(ValueError, match=r"\(N, N, k, k\)"):
        predict.max_learning_rate(torch.ones(2, 3, 3))


def test_the_divergence_warning_says_when_the_values_overflow():
    """Above the stability limit the values grow by g = 2η/limit − 1 per step and end as inf and
    NaN (inf − inf in the covariance) with only "does not converge" said. The warning now gives the
    step counts, for the narrowest dtype the values pass through; both are checked here."""
    import re

    x, y, xt = _x(6), _x(6, 1, seed=15), _x(3, seed=16)
    for dtype in (torch.float64, torch.float32):
        xs, ys, xts = x.to(dtype), y.to(dtype), xt.to(dtype)
        limit = predict.GradientFlow(NET, xs, ys).max_learning_rate
        with pytest.warns(RuntimeWarning, match=f"grows by 1.4x per step: the covariance overflows {dtype}") as record:
            predict.gradient_flow(NET, xs, ys, xts, steps=1, learning_rate=1.2 * limit)
        cov_steps, mean_steps = (float(v) for v in re.findall(r"after about (\d+) steps", str(record[0].message)))
        assert abs(mean_steps - 2 * cov_steps) <= 1

        def at(fraction, steps, xs=xs, ys=ys, xts=xts, rate=1.2 * limit):
            with pytest.warns(RuntimeWarning, match="stability limit"):
                return predict.gradient_flow(NET, xs, ys, xts, steps=round(fraction * steps), learning_rate=rate)

        early, late = at(0.8, cov_steps), at(1.25, cov_steps)
        assert torch.isfinite(early.covariance).all() and not torch.isfinite(late.covariance).all()
        early, late = at(0.8, mean_steps), at(1.25, mean_steps)
        assert torch.isfinite(early.mean).all() and not torch.isfinite(late.mean).all()
    # one linearized network has outputs, no covariance: the warning spoke of both
    k = NET.kernel(x).ntk
    limit = predict.max_learning_rate(k, y.numel())
    overflow = r"the outputs overflow torch\.float64 \(inf, then NaN\) after about"
    with pytest.warns(RuntimeWarning, match=overflow) as record:
        predict.gradient_descent_mse(k, y, steps=1, learning_rate=1.2 * limit)
    assert "covariance" not in str(record[0].message)
    steps = float(re.findall(r"after about (\d+) steps", str(record[0].message))[0])
    for fraction, finite in ((0.8, True), (1.25, False)):
        with pytest.warns(RuntimeWarning, match="stability limit"):
            out = predict.gradient_descent_mse(k, y, steps=round(fraction * steps), learning_rate=1.2 * limit)
        assert bool(torch.isfinite(out).all()) is finite
    with warnings.catch_warnings(record=True) as record:         # at the limit itself nothing grows
        warnings.simplefilter("always")
        predict.gradient_flow(NET, x, y, xt, steps=3, learning_rate=predict.GradientFlow(NET, x, y).max_learning_rate)
    assert "stability limit" in str(record[0].message) and "grows" not in str(record[0].message)


def test_noise_free_posteriors_at_their_training_points_can_be_sampled():
    """Their covariance is rounding noise of both signs (eigenvalues ~±1e-15 for a prior variance
    ~2): draws equal the mean instead of a "not positive semi-definite" error."""
    x, y = _x(6), torch.sin(_x(6, 1, seed=5))
    for g in (predict.gp_posterior(NET, x, y, x, kernel="nngp", noise=0.0),
              predict.GradientFlow(NET, x, y).predict(x, t=math.inf)):
        draws = bayes.sample_outputs(g, 20)
        assert float((draws - g.mean).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="not positive semi-definite"):
        bayes.sample_outputs(predict.Gaussian(torch.ones(2), torch.tensor([[1.0, 0.0], [0.0, -1e-3]])))


def test_predictions_refuse_inputs_whose_kernels_overflow_and_empty_targets():
    x, y = _x(5), _x(5, 1, seed=6)
    big = x.clone()
    big[0] = 1e155                                           # |x|² overflows float64
    for make in (lambda: predict.GradientFlow(NET, big, y),
                 lambda: predict.GPPosterior(NET, big, y, kernel="nngp", noise=0.1)):
        with pytest.raises(ValueError, match="training kernel is not finite"):
            make()
    for predictor in (predict.GradientFlow(NET, x, y), predict.GPPosterior(NET, x, y, kernel="nngp", noise=0.1)):
        with pytest.raises(ValueError, match="test kernel is not finite"):
            predictor.predict(big[:2])
    for targets in (y[:, :0], y[:0]):
        with pytest.raises(ValueError, match="at least one target"):
            predict.GradientFlow(NET, x[: targets.shape[0]], targets)
        with pytest.raises(ValueError, match="at least one target"):
            predict.gradient_descent_mse(torch.eye(targets.shape[0]), targets, t=1.0)


def test_integer_targets_are_told_their_dtype_and_non_finite_ones_their_values():
    """Integer targets (wine quality's scores 3..8) were refused with "y_train must be a floating-point
    tensor without NaN or infinite values", which named neither their dtype nor the conversion that
    NetworkGP's message gives; NaN targets read the same."""
    x, y = _x(5), _x(5, 1, seed=6)
    for make in (lambda t: predict.GradientFlow(NET, x, t), lambda t: predict.gp_posterior(NET, x, t, x, noise=0.1)):
        with pytest.raises(ValueError, match=r"^y_train must be a floating-point tensor, got torch\.int64; convert it "
                                             r"with y_train\.double\(\) or y_train\.float\(\)\.$"):
            make(torch.arange(5)[:, None])
        with pytest.raises(ValueError, match=r"^y_train contains NaN or infinite values\.$"):
            make(torch.where(y > 0, math.nan, y))


def test_float32_inputs_whose_covariance_would_overflow_float32_keep_their_mean():
    # float32 inputs of ~1e20 have finite float64 kernels of ~1e40; a covariance of that size returned
    # in float32 was inf (gp_posterior's variance [inf, 2.4e38, inf, inf]) without a word. ReLU kernels
    # scale as |x|² (an erf network's saturate)
    net = ntkgp.mlp(2, "relu")
    x, y, xt = (1e20 * _x(6)).float(), _x(6, 1, seed=6).float(), (1e20 * _x(4, seed=7)).float()
    calls = [lambda x, y, xt, cov: predict.gradient_flow(net, x, y, xt, t=1.0, compute_cov=cov),
             lambda x, y, xt, cov: predict.gradient_flow(net, x, y, xt, compute_cov=cov),            # t=None
             lambda x, y, xt, cov: predict.GradientFlow(net, x, y).predict(None, t=1.0, compute_cov=cov),
             lambda x, y, xt, cov: predict.gp_posterior(net, x, y, xt, kernel="nngp", noise=1e-3, compute_cov=cov),
             lambda x, y, xt, cov: predict.gp_posterior(net, x, y, xt, kernel="ntkgp", noise=1e-3, compute_cov=cov)]
    for call in calls:
        with pytest.raises(ValueError, match=r"reaches \d.*e\+4\d, beyond the range of torch.float32.*compute_cov"):
            call(x, y, xt, True)
        mean = call(x, y, xt, False).mean
        assert mean.dtype == torch.float32 and torch.isfinite(mean).all()
        reference = call(x.double(), y.double(), xt.double(), False).mean
        torch.testing.assert_close(mean.double(), reference, rtol=1e-6, atol=1e-6)
        # in float64 the same inputs are in range
        assert torch.isfinite(call(x.double(), y.double(), xt.double(), True).covariance).all()


#: The predictors whose means come back in the dtype of x_train.
MEAN_CALLS = {
    "gradient_flow": lambda x, y, xt: predict.gradient_flow(NET, x, y, xt, t=1.0, compute_cov=False),
    "gradient_flow at t=inf": lambda x, y, xt: predict.gradient_flow(NET, x, y, xt, compute_cov=False),
    "GradientFlow": lambda x, y, xt: predict.GradientFlow(NET, x, y, kernel="nngp").predict(xt, t=2.0,
                                                                                          compute_cov=False),
    "gp_posterior": lambda x, y, xt: predict.gp_posterior(NET, x, y, xt, noise=1e-3, compute_cov=False),
    "GPPosterior": lambda x, y, xt: predict.GPPosterior(NET, x, y, kernel="ntkgp", noise=1e-3).predict(
        xt, compute_cov=False),
}


@pytest.mark.parametrize("call", MEAN_CALLS)
def test_float64_targets_beyond_the_range_of_float32_inputs_are_refused(call):
    """Float32 inputs and float64 targets of 1e39: the mean, returned in float32 and of the targets'
    size, was inf without a word. Targets in range keep the float64 answer to float32 rounding."""
    x, xt, y = _x(6).float(), _x(4, seed=7).float(), _x(6, 1, seed=6)
    with pytest.raises(ValueError, match=r"^y_train reaches 1\.\d+e\+39, beyond the range of torch\.float32, the "
                                         r"dtype of x_train"):
        MEAN_CALLS[call](x, 1e39 * y, xt)
    mean = MEAN_CALLS[call](x, 1e37 * y, xt).mean
    reference = MEAN_CALLS[call](x.double(), 1e37 * y, xt.double()).mean
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), reference, rtol=1e-5, atol=0)


def test_bad_test_inputs_are_refused_before_the_eigendecomposition():
    flow = predict.GradientFlow(NET, _x(5), _x(5, 1, seed=7), learning_rate=0.5)
    with pytest.raises(ValueError, match="x_test must have shape"):
        flow.predict(_x(3, 3), steps=4)
    assert "_eigensystem" not in flow.__dict__   # the cached eigendecomposition


def test_times_that_require_grad_differentiate_the_covariance():
    x, y = _x(6), _x(6, 1, seed=8)
    for kind in ("ntk", "nngp"):
        flow = predict.GradientFlow(NET, x, y, kernel=kind)
        for x_test in (_x(4, seed=9), None):
            t = torch.tensor([0.5, 3.0], requires_grad=True)
            grad = torch.autograd.grad(flow.predict(x_test, t=t).covariance.sum(), t)[0]
            h = 1e-6
            shifts = h * torch.eye(2)
            fd = torch.stack([(flow.predict(x_test, t=t.detach() + s).covariance.sum()
                               - flow.predict(x_test, t=t.detach() - s).covariance.sum()) / (2 * h) for s in shifts])
            torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)

# a float32 kernel factored in float64 keeps its float32 rounding: an empirical-NTK-like J Jᵀ of
# rank 10 on 40 points has 30 null eigenvalues of ±2e-6 (not ±1e-14). Taken for real and inverted
# they put test outputs 5.0 off the pseudo-inverse answer (|answer| 0.61) at t = ∞ and 2.0 off at
# t = 1e8; counted as null at float32's ε, the answer is that of the float64 kernel to float32
# rounding times the range's condition number (~5): 4e-8 measured, 1e-5 allowed
def test_float32_kernel_null_directions_use_float32_rounding():
    g = torch.Generator().manual_seed(0)
    j, js = torch.randn(40, 10, generator=g).float(), torch.randn(7, 10, generator=g).float()
    y = torch.randn(40, generator=g).float()
    k, ks = j @ j.T, js @ j.T
    jd, jsd = j.double(), js.double()
    ref = (jsd @ jd.T) @ torch.linalg.pinv(jd @ jd.T, hermitian=True) @ y.double()
    for t in (1e8, math.inf):
        _, test = predict.gradient_descent_mse(k, y, fx_train_0=0.0, ntk_test_train=ks, fx_test_0=0.0, t=t)
        assert test.dtype == torch.float32
        torch.testing.assert_close(test.double(), ref, rtol=0, atol=1e-5)


def test_float32_kernel_cast_to_float64_by_its_caller_keeps_float32_rounding():
    """The kernels of the test above cast to float64 before the call (``empirical_ntk(...).double()`` of a
    float32 network): refused as asymmetric (a float32 ``j @ j.T`` is not exactly symmetric on every
    BLAS, beyond float64's sqrt(ε)), and once symmetrized, as the refusal advised, their null
    directions' float32 rounding was taken for real at float64's thresholds (outputs ~5 off). A float64
    kernel whose every entry is a float32 number (not all whole) is read as the float32 kernel it was:
    the same answer as given in float32, to float64 rounding; an integer kernel keeps float64's."""
    g = torch.Generator().manual_seed(0)
    j, js = torch.randn(40, 10, generator=g).float(), torch.randn(7, 10, generator=g).float()
    y = torch.randn(40, generator=g).float()
    k, ks = j @ j.T, js @ j.T
    k = k.triu() + k.triu(1).mT   # exactly symmetric, whatever this machine's BLAS: the answer below is
    jd, jsd = j.double(), js.double()
    ref = (jsd @ jd.T) @ torch.linalg.pinv(jd @ jd.T, hermitian=True) @ y.double()
    for t in (1e8, math.inf):
        _, test = predict.gradient_descent_mse(k.double(), y.double(), fx_train_0=0.0, ntk_test_train=ks.double(),
                                               fx_test_0=0.0, t=t)
        torch.testing.assert_close(test, ref, rtol=0, atol=1e-5)
    # asymmetric by float32 rounding, as a Gram matrix on some BLAS: taken (it was refused)
    rounded = k.clone()
    rounded[0, 1] = torch.nextafter(rounded[0, 1], torch.tensor(math.inf))
    _, test = predict.gradient_descent_mse(rounded.double(), y.double(), fx_train_0=0.0,
                                           ntk_test_train=ks.double(), fx_test_0=0.0, t=math.inf)
    torch.testing.assert_close(test, ref, rtol=0, atol=1e-5)
    assert predict.spectral.carried_dtype(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))) == torch.float64
    assert predict.spectral.carried_dtype(k.double() + 1e-12) == torch.float64
    # max_learning_rate judges it as they do: its null eigenvalues, -2.2e-6 of 83, refused it as not semi-definite
    assert predict.max_learning_rate(rounded.double()) == predict.max_learning_rate(rounded)


def test_exact_dyadic_float64_kernel_keeps_float64_rounding():
    """A float64 kernel of float32 numbers is not always a float32 kernel cast up: the linear kernel (bias 1)
    of the inputs (1, 0), (1, 2⁻¹¹), (0, 1) is exact in float64 (cond 1.6e8) and its entries are float32
    numbers, 1.5, 1.5 + 2⁻²³, 1 + 2⁻¹², but with few bits: the last 4 bits of float32's significand are zero
    in 8 of 9 (float32 rounding leaves them zero in 1 of 16). Read as float32, it was refused as singular at
    t = None ("compute it in float64"), and its smallest direction, 6.2e-9 of λ_max, was left untrained at
    t = ∞ (test outputs 0.50 off the exact answer, without a warning). Now float64's rounding, as before it
    was read as float32: 1.3e-8 and 3.0e-8 off, within cond · ε₆₄ ~ 4e-8 of its size-1 targets; 1e-6 allowed.
    A linear model's NTK of inputs in steps of 1/8 (x xᵀ + 1, all its significands' last 4 bits zero) too."""
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, 1.0))
    x = torch.tensor([[1.0, 0.0], [1.0, 2.0 ** -11], [0.0, 1.0]], dtype=torch.float64)
    x_test = torch.tensor([[1.0, 2.0 ** -12], [0.5, 0.5]], dtype=torch.float64)
    k, ks = net.kernel(x).ntk.detach(), net.kernel(x_test, x).ntk.detach()
    assert bool((k.float().double() == k).all())   # every entry a float32 number, not all whole
    y = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    ref = ks @ torch.linalg.solve(k, y)
    for t in (None, math.inf):
        _, test = predict.gradient_descent_mse(k, y, ntk_test_train=ks, fx_test_0=0.0, t=t)
        torch.testing.assert_close(test, ref, rtol=0, atol=1e-6)
    assert predict.spectral.carried_dtype(k) == torch.float64
    dyadic = torch.arange(-8, 8, dtype=torch.float64).reshape(4, 4) / 8
    assert predict.spectral.carried_dtype(dyadic @ dyadic.T + 1) == torch.float64


# the same at t = None: a singular float32 kernel (12 points, rank 11) whose null eigenvalue came
# out +6.9e-7 passed the float64 pivot threshold (N·ε₆₄·max diag ≈ 4e-14) and returned test outputs
# 0.25 off the pseudo-inverse answer; at float32's ε it is singular, and the error says why
def test_float32_kernel_singular_to_float32_rounding_raises():
    g = torch.Generator().manual_seed(1)
    j, js = torch.randn(12, 11, generator=g).float(), torch.randn(4, 11, generator=g).float()
    y = torch.randn(12, generator=g).float()
    with pytest.raises(ValueError, match=r"singular.*lower precision"):
        predict.gradient_descent_mse(j @ j.T, y, fx_train_0=0.0, ntk_test_train=js @ j.T, fx_test_0=0.0)
    # regularized above float32 rounding it factors
    _, test = predict.gradient_descent_mse(j @ j.T, y, fx_train_0=0.0, ntk_test_train=js @ j.T, fx_test_0=0.0,
                                           diag_reg=1e-3)
    assert bool(torch.isfinite(test).all())


# a singular kernel whose null vector barely touches the last row passes the pivot threshold: the
# last pivot is about λ_min / v_N² (1e-11 for a rounding-level λ_min). A linear network's NNGP of
# 6 points in R⁵ has rank 5; for this draw noise=0 gave a mean of [-4.0, 5.25, -4.0] (rounding
# noise times 1e15) where the pseudo-inverse answer is [-0.86, 0.14, -0.16]. Inverse iteration
# finds the rounding-level eigenvalue, and the posterior refuses the kernel as for duplicates.
def test_singular_kernel_with_small_last_pivot_component_raises():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    xt = torch.randn(3, 5, generator=g)
    net = ntkgp.serial(ntkgp.Dense(1, weight_var=1.0))
    with pytest.raises(ValueError, match="singular"):
        predict.GPPosterior(net, x, y, kernel="nngp").predict(xt)
    with pytest.raises(ValueError, match="singular"):
        predict.GradientFlow(net, x, y, kernel="nngp").predict(xt)
    # regular kernels still factor: the bound is ≥ λ_min, and with noise λ_min ≥ noise
    out = predict.GPPosterior(net, x, y, kernel="nngp", noise=1e-8).predict(xt)
    assert bool(torch.isfinite(out.mean).all())


# the singularity threshold is relative to each point's own variance (Cholesky's backward error is
# ~ε sqrt(k_ii k_jj)): a bias-free ReLU kernel of inputs whose norms span 1e-5..1e4 has cond 1e18
# from the scales alone, and the threshold N·ε·max diag refused it as "duplicate points", though
# scaled to unit diagonal its condition number is ~5e2 and a plain Cholesky solve is accurate
def test_training_inputs_of_very_different_norms_are_not_singular():
    g = torch.Generator().manual_seed(14)
    u = torch.randn(6, 3, generator=g)
    x = u / u.norm(dim=1, keepdim=True) * torch.tensor([1e-5, 1e-3, 1.0, 1.0, 1e3, 1e4])[:, None]
    y, xt = torch.randn(6, generator=g), torch.randn(3, 3, generator=g) * 1e-5
    net = ntkgp.serial(ntkgp.Dense(64, weight_var=2.0), ntkgp.ReLU(), ntkgp.Dense(1, weight_var=2.0))
    k, kt = net.kernel(x, ntk=False).nngp.detach().numpy(), net.kernel(xt, x, ntk=False).nngp.detach().numpy()
    d = np.sqrt(np.diag(k))
    scaled = k / np.outer(d, d)
    assert np.linalg.cond(k) > 1e17 and np.linalg.cond(scaled) < 1e3
    ref = kt @ (np.linalg.solve(scaled, y.numpy() / d) / d)
    post = predict.gp_posterior(net, x, y, xt, kernel="nngp", noise=0.0)
    np.testing.assert_allclose(post.mean.numpy(), ref, rtol=1e-10)
    flow = predict.gradient_flow(net, x, y, xt, t=None, kernel="nngp")
    np.testing.assert_allclose(flow.mean.numpy(), ref, rtol=1e-10)
    assert bool((torch.diagonal(post.covariance) >= 0).all())
    # a duplicate among them is still singular
    with pytest.raises(ValueError, match="singular"):
        predict.gp_posterior(net, torch.cat([x, x[:1]]), torch.cat([y, y[:1] + 1]), xt, kernel="nngp", noise=0.0)


# ... but relative rounding stops at the smallest normal number: a rank-10 float32 empirical NTK of
# 12 points whose 4 small Jacobian rows (norm 1e-21) give subnormal entries (~1e-40) rounds
# absolutely there, and scaled to unit diagonal it looked regular in some draws (test outputs
# of ~1e20, where the pseudo-inverse gives ~0.5)
def test_kernels_with_subnormal_diagonals_are_still_singular():
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        big, basis = torch.randn(8, 20, generator=g), torch.randn(2, 20, generator=g)
        j = torch.cat([big, (torch.randn(4, 2, generator=g) @ basis) * 1e-21]).float()   # rank 10
        k = j @ j.T
        y, kt = torch.randn(12, generator=g), (torch.randn(3, 20, generator=g) @ j.double().T).float()
        assert float(k.diagonal().min()) < torch.finfo(torch.float32).tiny
        with pytest.raises(ValueError, match="singular"):
            predict.gradient_descent_mse((k + k.T) / 2, y, fx_train_0=0.0, ntk_test_train=kt, fx_test_0=0.0)


# the same for a float64 J Jᵀ of rank 29 on 30 points (an empirical NTK of fewer parameters than
# points): 7 of these 40 draws passed the pivots, with test outputs 0.06 to 4.3 times the size of
# the pseudo-inverse answer off it
def test_rank_deficient_kernel_passing_pivots_raises_at_t_none():
    accepted = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        j, js, y = torch.randn(30, 29, generator=g), torch.randn(4, 29, generator=g), torch.randn(30, generator=g)
        try:
            predict.gradient_descent_mse(j @ j.T, y, fx_train_0=0.0, ntk_test_train=js @ j.T, fx_test_0=0.0)
            accepted += 1
        except ValueError:
            pass
    assert accepted == 0

def test_targets_and_test_points_on_another_device_are_a_clear_error_before_the_kernels():
    """y_train (or x_test) on another device than x_train failed only at the first product with the
    training kernel, after computing and factoring it, with torch's "Expected all tensors to be on
    the same device". The ``meta`` device stands in for a GPU: any second device takes this path."""
    net = ntkgp.mlp(1, "relu", width=4)
    x, y = _x(), torch.randn(6, dtype=torch.float64)
    elsewhere = torch.empty(6, device="meta", dtype=torch.float64)
    for make in (lambda yy: predict.GradientFlow(net, x, yy), lambda yy: predict.GPPosterior(net, x, yy),
                 lambda yy: predict.gradient_descent_mse(torch.eye(6, dtype=torch.float64), yy, t=1.0)):
        with pytest.raises(ValueError, match=r"y_train is on meta but (x_train|ntk_train_train) is on cpu"):
            make(elsewhere)
    x_test = torch.empty(3, x.shape[-1], device="meta", dtype=torch.float64)
    for model in (predict.GradientFlow(net, x, y, diag_reg=1e-6), predict.GPPosterior(net, x, y, noise=1e-6),
                  predict.GPPosterior(net, x, y, kernel="ntk", noise=1e-6)):
        with pytest.raises(ValueError, match="x_test is on meta but x_train is on cpu"):
            model.predict(x_test)
    with pytest.raises(ValueError, match="ntk_test_train is on meta but ntk_train_train is on cpu"):
        predict.gradient_descent_mse(torch.eye(6, dtype=torch.float64), y, fx_train_0=0.0,
                                     ntk_test_train=torch.empty(3, 6, device="meta", dtype=torch.float64),
                                     fx_test_0=0.0, t=1.0)


@pytest.mark.parametrize("kw", [{"t": True}, {"steps": True}, {"steps": [True, 3]}, {"t": (0.5, False)},
                                {"steps": [torch.tensor(True), 2]}, {"t": torch.tensor([1.0 + 1.0j])}, {"t": 1j},
                                {"steps": np.array([True, False])}, {"t": "1"}, {"t": [[1.0], [2.0, 3.0]]},
                                {"steps": 10**400}])
def test_times_that_are_not_real_numbers_are_refused(kw):
    """Cast to float64, booleans became times 1/0 and complex times their real part (t=1+1j
    trained as t=1, with only torch's one-time cast warning); strings and ragged lists raised
    torch's TypeError/ValueError ("new(): invalid data type 'str'")."""
    flow = predict.GradientFlow(NET, _x(5), _x(5, 1, seed=1)[:, 0])
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be a real number"):
        flow.predict(_x(3, seed=2), **kw)
    with pytest.raises(ValueError, match=f"{name} must be a real number"):
        predict.gradient_descent_mse(torch.eye(3), torch.ones(3), **kw)


def test_times_whose_tau_overflows_are_infinite_time_also_for_a_zero_kernel():
    """A zero training kernel never moves the outputs. At t = 1e300 with η = 1e10, τ = η t/m
    overflows to inf while t is finite: the null test τ·(N ε λ_max) was inf·0 = NaN, so the null
    directions counted as trained: training outputs jumped to Y (1.46 instead of f_0 = 0.5) and test
    outputs were 0·inf = NaN. Exact: f_0 unchanged."""
    y = torch.tensor([[1.0, -1.46], [0.3, 0.2], [-0.7, 1.1]])
    zero, cross = torch.zeros(3, 3), torch.zeros(2, 3)
    for kw in ({"t": [1.0, 1e300, math.inf]}, {"steps": [1, 10**300]}):
        train, test = predict.gradient_descent_mse(zero, y, fx_train_0=0.5, ntk_test_train=cross, fx_test_0=0.5,
                                                   learning_rate=1e10, **kw)
        assert torch.equal(train, torch.full_like(train, 0.5)) and torch.equal(test, torch.full_like(test, 0.5))


def test_kernels_with_gradients_train_without_torch_scalar_warnings():
    """``gradient_descent_mse`` differentiates through a kernel computed with gradients on; its
    checks read the eigenvalues as Python floats, which warned "Converting a tensor with
    requires_grad=True to a scalar may lead to unexpected behavior" (torch warns once per process,
    so the test turns that off)."""
    x, x_test = _x(5), _x(3, seed=2)
    y = _x(5, 1, seed=1)
    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        for kw in ({"t": [0.5, math.inf]}, {"steps": 3}, {"t": None}):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                _, test = predict.gradient_descent_mse(NET.kernel(x).ntk, y, fx_train_0=0.0,
                                                       ntk_test_train=NET.kernel(x_test, x).ntk, fx_test_0=0.0, **kw)
            assert test.requires_grad
    finally:
        torch.set_warn_always(previous)


def test_one_shot_predictions_check_their_arguments_before_the_training_kernel(monkeypatch):
    """gradient_flow and gp_posterior computed (and for gradient_flow factored) the training kernel
    before reading x_test and t: a wrong width, a NaN or a negative time failed only after it
    (4.6 s at N = 2500)."""
    net = ntkgp.mlp(1, "relu", width=4)

    def refuse(*args, **kwargs):
        raise AssertionError("the training kernel was computed before the arguments were checked")

    monkeypatch.setattr(net, "kernel", refuse)
    x, y, nan_test = _x(), _x(6, 1, seed=9), _x(3)
    nan_test[1, 0] = math.nan
    calls = [lambda: predict.gradient_flow(net, x, y, _x(3, 3), t=1.0),
             lambda: predict.gradient_flow(net, x, y, nan_test, t=1.0),
             lambda: predict.gradient_flow(net, x, y, _x(3), t=-1.0),
             lambda: predict.gradient_flow(net, x, y, _x(3), steps=-2),
             lambda: predict.gradient_flow(net, x, y, _x(3), t=1.0, learning_rate=-0.1),
             lambda: predict.gp_posterior(net, x, y, _x(3, 3)),
             lambda: predict.gp_posterior(net, x, y, nan_test)]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_cached_predictors_take_targets_that_require_grad_and_check_factor_dtype(monkeypatch):
    """Targets with requires_grad: GradientFlow cached their projection with its graph, and the
    backward of a second prediction ran through the graph freed by the first ("Trying to backward
    through the graph a second time"). factor_dtype was not checked: float16 failed in eigh after
    the kernels, an integer dtype named the internal "x1", a string was "Invalid device string".
    max_learning_rate read one triangle of an asymmetric matrix and failed on an empty one with an
    IndexError; an integer kernel's message named its type, not its dtype."""
    x, y, xt = _x(), _x(6, 1, seed=13)[:, 0].requires_grad_(), _x(3, seed=14)
    for predictor in (predict.GradientFlow(NET, x, y), predict.GPPosterior(NET, x, y, noise=0.1)):
        first = predictor.predict(xt) if isinstance(predictor, predict.GPPosterior) else predictor.predict(xt, t=2.0)
        second = predictor.predict(xt) if isinstance(predictor, predict.GPPosterior) else predictor.predict(xt, t=5.0)
        assert not first.mean.requires_grad and not second.mean.requires_grad     # as documented
    t = torch.tensor(2.0, requires_grad=True)
    flow = predict.GradientFlow(NET, x, y)
    for _ in range(2):                                  # the time derivative survives repeated predictions
        (grad,) = torch.autograd.grad(flow.predict(xt, t=t).mean.sum(), t)
        assert torch.isfinite(grad)

    def refuse(*args, **kwargs):
        raise AssertionError("the training kernel was computed before factor_dtype was checked")

    net = ntkgp.mlp(1, "relu", width=4)
    monkeypatch.setattr(net, "kernel", refuse)
    for bad in (torch.float16, torch.bfloat16, torch.int64, torch.complex128, "float64"):
        for make in (predict.GradientFlow, predict.GPPosterior):
            with pytest.raises(ValueError, match=r"factor_dtype must be torch\.float32 or torch\.float64"):
                make(net, x, y.detach(), factor_dtype=bad)
        with pytest.raises(ValueError, match="factor_dtype must"):
            predict.gradient_descent_mse(torch.eye(6), y.detach(), factor_dtype=bad)
    theta = NET.kernel(x).ntk.detach()
    asymmetric = theta.clone()
    asymmetric[0, 5] += 100.0
    with pytest.raises(ValueError, match="symmetric"):
        predict.max_learning_rate(asymmetric)
    with pytest.raises(ValueError, match="N >= 1"):
        predict.max_learning_rate(torch.zeros(0, 0))
    for call in (lambda k: predict.max_learning_rate(k), lambda k: predict.gradient_descent_mse(k, y.detach())):
        with pytest.raises(ValueError, match=r"got torch\.int64"):
            call(theta.long())


def test_linearized_outputs_of_an_empty_test_set():
    """A (0, N) test kernel gave 'cannot reshape tensor of 0 elements' at finite times."""
    kernel, y = torch.eye(6) + 0.1, _x(6, 2, seed=10)
    empty = torch.zeros(0, 6)
    for times in ({"t": 1.0}, {"t": torch.tensor([0.5, 2.0, 3.0])}, {"steps": 3}, {"t": None}):
        train, test = predict.gradient_descent_mse(kernel, y, fx_train_0=0.0, ntk_test_train=empty,
                                                   fx_test_0=0.0, **times)
        count = () if times.get("t") is None or isinstance(times.get("t"), float) else (3,)
        assert test.shape == (*count, 0, 2)
        full = predict.gradient_descent_mse(kernel, y, fx_train_0=0.0, ntk_test_train=torch.ones(1, 6),
                                            fx_test_0=0.0, **times)
        assert torch.equal(train, full[0])


def test_predictors_copy_their_training_data():
    """An in-place edit of x_train or y_train after construction changed some predictions (those that
    read the live tensors) but not others (the cached factorizations): the two were inconsistent."""
    x, y, xt = _x(), _x(6, 1, seed=11), _x(3, seed=12)
    predictors = [predict.GradientFlow(NET, x, y, diag_reg=1e-4), predict.GPPosterior(NET, x, y, noise=0.1),
                  predict.GPPosterior(NET, x, y, kernel="ntkgp", noise=0.1)]
    ask = [lambda p: [p.predict(xt, t=t).mean for t in (None, math.inf, 2.0)]] + [lambda p: [p.predict(xt).mean]] * 2
    before = [get(p) for get, p in zip(ask, predictors, strict=True)]
    x.add_(1.0)
    y.mul_(2.0)
    for get, p, means in zip(ask, predictors, before, strict=True):
        for new, old in zip(get(p), means, strict=True):
            assert torch.equal(new, old)


def test_directions_below_rounding_that_move_the_test_outputs_are_reported():
    """Two training points 3e-8 apart make a direction whose eigenvalue (~1e-16 λ_max) float64 does not
    resolve, but along which the test points have components of ~1e-8: once it counts as untrained the
    predictions leave the eigenbasis formula that keeps it (a review's 60-digit reference agreed with
    that formula to 4e-8 at t = 1e10 on a similar pair), silently before. An exact duplicate's
    direction is invisible to test points (6e-17 of the largest component) and stays quiet."""
    gen = torch.Generator().manual_seed(0)
    net = ntkgp.serial(ntkgp.Dense(16, weight_var=2.0, bias_var=0.1), ntkgp.Erf(),
                       ntkgp.Dense(1, weight_var=1.5, bias_var=0.05))
    x, y, xt = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 3), (6,), (3, 3)))
    near, exact = x.clone(), x.clone()
    near[4] = x[1] + 3e-8 * torch.randn(3, generator=gen, dtype=torch.float64)
    exact[4] = x[1]
    # (t, steps for the same τ at η = 1, how far from the formula at most / at least, warned)
    cases = {"near": [(1e6, 10**6, 1e-12, None, False), (1e8, 10**8, None, 1e-4, True),
                      (1e10, 10**10, None, 1e-2, True), (math.inf, 2**60, None, None, True)],
             "exact": [(t, s, 1e-8, None, False) for t, s in ((1e6, 10**6), (1e10, 10**10), (math.inf, 2**60))]}
    for name, points in (("near", near), ("exact", exact)):
        flow = predict.GradientFlow(net, points, y)
        with torch.no_grad():
            theta, cross = net.kernel(points).ntk, net.kernel(xt, points).ntk
        lam, vec = torch.linalg.eigh(theta)
        for t, steps, at_most, at_least, warned in cases[name]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mean = flow.predict(xt, t=t, compute_cov=False).mean
                from_kernels = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross,
                                                            fx_test_0=0.0, t=t)[1]
                flow.predict(xt, steps=steps, compute_cov=False)
            said = [w for w in caught if "count as untrained, but move the test outputs" in str(w.message)]
            assert len(said) == (3 if warned else 0), (name, t, [str(w.message) for w in caught])
            torch.testing.assert_close(from_kernels, mean, rtol=1e-12, atol=0)
            if math.isfinite(t):
                keep = cross @ vec @ (-torch.expm1(-lam * t / 6) / lam * (vec.mT @ y))
                off = float((mean - keep).norm() / keep.norm())
                assert (at_most is None or off < at_most) and (at_least is None or off > at_least), (name, t, off)


def test_dropped_directions_of_inputs_whose_norms_span_decades_are_reported():
    """Training inputs of norms 1e-6 and 1e6 (bias-free ReLU): the small point's eigenvalue (~1e-26
    λ_max) is below what the eigendecomposition resolves, so t = inf leaves it untrained and reads
    ~0.5 where the answer (t = None: the scaled Cholesky solve, exact here) is ~1e5. Its column of
    the test kernel (2e-7) fell under 100 N ε times the large point's (8e-7) and passed for a
    duplicate's rounding, silently (a review's 60-digit reference: 1.00 off at t = inf, 1.2 at t = 1e8).
    The kernel scaled to unit diagonal is nonsingular, so it has no exact null direction and the
    warning comes, from GradientFlow and gradient_descent_mse alike; an exact duplicate stays quiet."""
    gen = torch.Generator().manual_seed(0)
    net = ntkgp.mlp(2, "relu", weight_var=2.0, bias_var=None)
    x, y, xt = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 3), (6, 2), (4, 3)))
    duplicate = x.clone()
    duplicate[3] = duplicate[0]
    x[0] *= 1e6
    x[1] *= 1e-6
    flow = predict.GradientFlow(net, x, y)
    exact = flow.predict(xt, t=None, compute_cov=False).mean
    with torch.no_grad():
        theta, cross = net.kernel(x).ntk, net.kernel(xt, x).ntk
    for t in (math.inf, 1e8):
        with pytest.warns(RuntimeWarning, match="count as untrained, but move the test outputs"):
            late = flow.predict(xt, t=t, compute_cov=False).mean
        assert float((late - exact).abs().max()) > 0.5 * float(exact.abs().max())   # what the warning is about
        with pytest.warns(RuntimeWarning, match="count as untrained"):
            predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict.GradientFlow(net, duplicate, y).predict(xt, t=math.inf, compute_cov=False)
        predict.GradientFlow(net, duplicate, y, kernel="nngp").predict(xt, t=math.inf, compute_cov=False)


def _deep_erf_kernels(seed: int = 0):
    """A depth-50 erf network in the ordered phase (σ_w² = 1, σ_b² = 0.1), 30 training and 5 test points
    in d = 3: its training NTK has λ_max = 57 (all points alike) and the rest from 3e-3 down to 2e-6."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(35, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(-1))[:30]
    net = ntkgp.mlp(50, "erf", 1.0, 0.1)
    with torch.no_grad():
        return net, x, y, net.kernel(x).ntk, net.kernel(x.float()).ntk


def test_float32_kernels_whose_rounding_swamps_real_directions_warn():
    """The deep erf NTK in float32 (its entries within 4e-7 of float64's): the test kernel's columns
    along the small directions are ~1e-6 beside 10, rounding noise, and those below N ε λ_max = 2e-4
    count as untrained from t ≈ 50. Read as a duplicate's directions, they were dropped without a word:
    gradient_descent_mse's test outputs 0.68 off float64's (|outputs| 0.82) at t = 1e6, and
    GradientFlow(factor_dtype=float32) 0.98 off at t = inf. Their eigenvalues (to 50 sqrt(N) ε λ_max)
    are resolved in float32, so they are real directions whose test columns the rounding swamped: a
    warning naming float64. The float64 kernels' predictions (what the warning points to) stay quiet."""
    net, x, y, k64, k32 = _deep_erf_kernels()
    for t in (1e4, 1e6):
        kwargs = dict(fx_train_0=0.0, fx_test_0=0.0, t=t)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, exact = predict.gradient_descent_mse(k64[:30, :30], y, ntk_test_train=k64[30:, :30], **kwargs)
        with (pytest.warns(RuntimeWarning, match=r"count as untrained, but move the training outputs.*in float64"),
              pytest.warns(RuntimeWarning, match=r"count as untrained, but move the test outputs.*in float64")):
            _, test = predict.gradient_descent_mse(k32[:30, :30], y.float(), ntk_test_train=k32[30:, :30], **kwargs)
        assert float((test.double() - exact).abs().max()) > 0.1 * float(exact.abs().max())   # what it is about
    exact = predict.gradient_flow(net, x[:30], y, x[30:], t=math.inf, kernel="nngp", compute_cov=False).mean
    with pytest.warns(RuntimeWarning, match="count as untrained.*factor_dtype=torch.float64"):
        mean = predict.gradient_flow(net, x[:30].float(), y.float(), x[30:].float(), t=math.inf, kernel="nngp",
                                     compute_cov=False, factor_dtype=torch.float32).mean
    assert float((mean.double() - exact).abs().max()) > 0.1 * float(exact.abs().max())


def test_float32_posteriors_whose_dual_coefficients_amplify_rounding_warn():
    """The deep erf network's NNGP posterior with noise = 1e-4 and float32 factors: the kernel
    (λ_max = 12, the rest below 3e-5, variances 0.39) is nonsingular with the noise, but its dual
    coefficients (K + σ²I)⁻¹ Y (norm 3.6e4) carry the entries' rounding, ε s ‖c‖ = 1.9e-2 of the
    mean's size, into the test means, which were 2.4e-2 off float64's (relative) without a word. With float64
    factors (the default factor_dtype), for float32 inputs too, it says nothing and is right."""
    net, x, y, _, _ = _deep_erf_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = predict.gp_posterior(net, x[:30], y, x[30:], kernel="nngp", noise=1e-4, compute_cov=False).mean
        # float32 inputs, float64 factors (the default): the inputs' rounding alone (1.7e-9 measured)
        default = predict.gp_posterior(net, x[:30].float(), y.float(), x[30:].float(), kernel="nngp", noise=1e-4,
                                       compute_cov=False).mean
        torch.testing.assert_close(default.double(), exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    post = predict.GPPosterior(net, x[:30].float(), y.float(), kernel="nngp", noise=1e-4, factor_dtype=torch.float32)
    for compute_cov in (True, "diag", False):
        with pytest.warns(RuntimeWarning, match=r"test outputs depend on the kernels' last digits.*float64") as said:
            mean = post.predict(x[30:].float(), compute_cov=compute_cov).mean
        assert [w.filename for w in said] == [__file__]   # once, at the caller's line
        # what it is about: an error beyond the one-term estimate
    assert float((mean.double() - exact).abs().max()) > 6e-3 * float(exact.abs().max())


def test_flat_float64_kernels_take_the_ordinary_rule():
    """The flat-kernel rule is for kernels carrying a coarser rounding than float64's: the float64
    NNGP of the depth-120 ordered-phase erf network holds entries an ulp or so apart, which move its
    outputs by about ε λ_max t / N (4.5e-8 of them at t = 1e8), and gradient_descent_mse warned there
    (a review's finding). It is quiet, and as the ordinary rule has it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x[:30].sum(-1, keepdim=True))
    with torch.no_grad():
        k = ntkgp.mlp(120, "erf", 1.76, 1.0).kernel(x).nngp
    assert predict.spectral.is_flat(k[:30, :30], torch.finfo(torch.float64).eps)   # what the test is about
    assert not predict.spectral.Eigensystem.of(k[:30, :30]).flat
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (1e8, 1e12):
            predict.gradient_descent_mse(k[:30, :30], y, ntk_test_train=k[30:, :30], fx_train_0=0.0, fx_test_0=0.0,
                                         t=t)


def test_float32_kernels_whose_entries_differ_only_in_their_last_digits_warn():
    """The float32 NNGP of the depth-50 erf network at (1.76, 1) holds two values among its 900 entries
    (3 ulps apart; its float64 entries are 1e-7 apart): to its digits its 30 distinct points are copies of
    one point, every direction but the mean is rounding and counts as untrained, and the test columns
    along them, rounded too, look like duplicates'. The t = inf outputs were 0.99 off float64's (of size
    0.90) without a word, from GradientFlow(kernel="nngp", factor_dtype=float32) and gradient_descent_mse
    with that NNGP, whose training outputs were 1.09 off. The dual coefficients such a flat kernel would
    take with these directions trained (flow ≤ min(τ, 1/λ)) now enter the rounding estimate, and its
    dropped directions count as real for the training outputs: warnings at t = inf, none at t = 1e2
    (outputs 1.3e-5 off). A kernel of copies of one point (all its entries equal) stays quiet: its answer, the
    targets' mean, is exact."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(35, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(-1))[:30]
    net = ntkgp.mlp(50, "erf", 1.76, 1.0)
    with torch.no_grad():
        k64, k32 = net.kernel(x).nngp, net.kernel(x.float()).nngp
    assert k32[:30, :30].unique().numel() == 2   # what the test is about: a float32 kernel rounded flat
    said = r"test outputs depend on the kernels' last digits.*copies of one point.*float64"
    said_training = r"move the training outputs \(a kernel whose entries differ only in their last digits"
    for t, warns in ((1e2, False), (math.inf, True)):
        kwargs = dict(fx_train_0=0.0, fx_test_0=0.0, t=t)
        exact = predict.gradient_descent_mse(k64[:30, :30], y, ntk_test_train=k64[30:, :30], **kwargs)
        flow_exact = predict.gradient_flow(net, x[:30], y, x[30:], t=t, kernel="nngp", compute_cov=False).mean
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            single = predict.gradient_descent_mse(k32[:30, :30], y.float(), ntk_test_train=k32[30:, :30], **kwargs)
        with warnings.catch_warnings(record=True) as caught_flow:
            warnings.simplefilter("always")
            flow = predict.gradient_flow(net, x[:30].float(), y.float(), x[30:].float(), t=t, kernel="nngp",
                                         compute_cov=False, factor_dtype=torch.float32).mean
        messages = [str(w.message) for w in caught]
        flow_messages = [str(w.message) for w in caught_flow]
        if warns:   # the test outputs by the rounding estimate, gradient_descent_mse's training outputs too
            assert [bool(re.search(said, m, re.DOTALL)) for m in flow_messages] == [True], flow_messages
            assert sorted(bool(re.search(said, m, re.DOTALL)) for m in messages) == [False, True], messages
            assert any(re.search(said_training, m) for m in messages), messages
        else:
            assert messages == flow_messages == []
        for got, want in ((single[0], exact[0]), (single[1], exact[1]), (flow, flow_exact)):
            error = float((got.double() - want).abs().max()) / float(want.abs().max())
            assert (error > 0.5) if warns else (error < 1e-3), (t, error)   # measured 1.1 and <= 1.3e-5
    copies = x[:1].expand(30, 3)   # copies of one point: a constant float32 kernel, whose answer is exact
    with torch.no_grad():
        c64, c32 = net.kernel(torch.cat([copies, x[30:]])).nngp, net.kernel(torch.cat([copies, x[30:]]).float()).nngp
    assert c32[:30, :30].unique().numel() == 1
    kwargs = dict(fx_train_0=0.0, fx_test_0=0.0, t=math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = predict.gradient_descent_mse(c32[:30, :30], y.float(), ntk_test_train=c32[30:, :30], **kwargs)[1]
    exact = predict.gradient_descent_mse(c64[:30, :30], y, ntk_test_train=c64[30:, :30], **kwargs)[1]
    torch.testing.assert_close(test.double(), exact, rtol=1e-5, atol=0)   # the mean of y, to float32 rounding


def test_float32_ntk_gp_posterior_of_the_ordered_phase_warns():
    """The NTK-GP posterior of mlp(50, "erf", 1, 0.1) on 30 points, noise = 1e-4, float32 factors: its mean
    is 1.9e-2 off float64's (relative; 9.8e-3 with another machine's float32 rounding), but the rounding
    estimate counted one term, ε max(d) ‖d ∘ c‖ = 5.8e-3, and stayed quiet. The first-order error has
    three such terms (the test kernel's rounding, the training kernel's, and the float32 Cholesky
    factorization's backward error ~ε d_i d_j), measured
    1.2e-3 (rounding alone), 1.1e-2 (with the float32 factorization) and 1.3e-2 (with the float32
    kernel's 3.6-ulp entries); their sum, 1.7e-2, warns."""
    net, x, y, _, _ = _deep_erf_kernels()
    exact = predict.gp_posterior(net, x[:30], y, x[30:], kernel="ntkgp", noise=1e-4, compute_cov=False).mean
    post = predict.GPPosterior(net, x[:30].float(), y.float(), kernel="ntkgp", noise=1e-4, factor_dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"test outputs depend on the kernels' last digits.*float64"):
        mean = post.predict(x[30:].float(), compute_cov=False).mean
    # what it is about: an error beyond the one-term estimate
    assert float((mean.double() - exact).abs().max()) > 6e-3 * float(exact.abs().max())


def test_float32_kernels_with_duplicate_points_stay_quiet_at_t_inf():
    """Exact duplicates in an ordinary float32 kernel (a two-layer ReLU network, 40 points of which 4 repeat
    others) are not flat: their null directions are dropped as duplicates', with no warning, and the t = inf
    outputs match float64's (measured 2e-6 relative; 1e-3 allowed)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(45, 3, generator=gen, dtype=torch.float64)
    x[36:40] = x[:4]
    y = torch.sin(x.sum(-1))[:40]
    net = ntkgp.mlp(2, "relu")
    with torch.no_grad():
        k64, k32 = net.kernel(x).ntk, net.kernel(x.float()).ntk
    kwargs = dict(fx_train_0=0.0, fx_test_0=0.0, t=math.inf)
    exact = predict.gradient_descent_mse(k64[:40, :40], y, ntk_test_train=k64[40:, :40], **kwargs)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = predict.gradient_descent_mse(k32[:40, :40], y.float(), ntk_test_train=k32[40:, :40], **kwargs)[1]
        flow = predict.gradient_flow(net, x[:40].float(), y.float(), x[40:].float(), t=math.inf,
                                     compute_cov=False, factor_dtype=torch.float32).mean
    for single in (test, flow):
        assert float((single.double() - exact).abs().max()) < 1e-3 * float(exact.abs().max())


def test_float32_flow_warns_where_directions_read_as_duplicates_are_real():
    """A smooth kernel of distinct inputs (mlp(2, "erf", 2, 0), 30 points of scale 0.1 in d = 1, noisy
    targets) has eigenvalues from 1e-16 of λ_max up, which float64 resolves and trains at t = inf, quietly;
    factored in float32, the directions below N ε λ_max are dropped, with test columns at float32's rounding
    level, as a duplicate's would be: 0.83 off float64's outputs, silently. The float64 kernel on their span
    shows real eigenvalues (above 100 N ε² λ_max), and the flow warns."""
    gen = torch.Generator().manual_seed(0)
    x = (0.1 * torch.randn(30, 1, generator=gen, dtype=torch.float64)).float()
    x_test = (0.1 * torch.randn(10, 1, generator=gen, dtype=torch.float64)).float()
    y = (torch.sin(10 * x.double()) + 0.1 * torch.randn(30, 1, generator=gen, dtype=torch.float64)).float()
    net = ntkgp.mlp(2, "erf", 2.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the float64 answer is resolved
        exact = predict.GradientFlow(net, x.double(), y.double()).predict(x_test.double(), t=math.inf,
                                                                          compute_cov=False).mean
    flow = predict.GradientFlow(net, x, y, factor_dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"At t = inf, \d+ direction\(s\).*count as untrained.*float64"):
        mean = flow.predict(x_test, t=math.inf, compute_cov=False).mean
    assert float((mean.double() - exact).abs().max()) > 0.1 * float(exact.abs().max())   # what it is about


def test_float32_flow_of_a_rank_two_kernel_of_distinct_inputs_stays_quiet():
    """A bias-free ReLU network in d = 1 has a kernel of rank 2 exactly (the inputs of one sign are parallel
    and the activation is homogeneous): its other directions are true null directions, though no two inputs
    are equal, and its float32 flow at t = inf matches float64's (measured 1.7e-7 relative; 1e-5 allowed).
    The float64 kernel on their span shows rounding alone (μ ≈ 5e-8 N ε² λ_max here): no warning, where
    taking distinct inputs as proof of real directions warned."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, generator=gen, dtype=torch.float64).float()
    x_test = torch.randn(5, 1, generator=gen, dtype=torch.float64).float()
    y = torch.sin(3 * x) + 0.1 * torch.randn(10, 1, generator=gen, dtype=torch.float64).float()
    net = ntkgp.mlp(1, "relu", 2.0, 0.0)
    exact = predict.GradientFlow(net, x.double(), y.double(), kernel="nngp").predict(
        x_test.double(), t=math.inf, compute_cov=False).mean
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = predict.GradientFlow(net, x, y, kernel="nngp", factor_dtype=torch.float32).predict(
            x_test, t=math.inf, compute_cov=False).mean
    assert float((mean.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max())


def test_ordinary_float32_kernels_predict_without_warnings():
    """A two-layer ReLU network on 50 points (cond Θ ≈ 2e3): float32 kernels and float32 factors give
    the float64 predictions to ~cond · ε (≤ 1.2e-3 of their size measured over three draws, 1e-2 allowed) at
    every time, and for the GP posteriors; no direction is dropped that the kernel resolves, and the
    dual coefficients' rounding estimate stays ≤ 1.0e-3 of the outputs (three terms: the test and training
    kernels' rounding and the float32 factorization's): no warning."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(55, 3, generator=gen, dtype=torch.float64)
        y = torch.sin(x.sum(-1))[:50]
        net = ntkgp.mlp(2, "relu")
        with torch.no_grad():
            k64, k32 = net.kernel(x).ntk, net.kernel(x.float()).ntk
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for t in (1.0, 1e2, 1e4, 1e6, math.inf, None):
                kwargs = dict(fx_train_0=0.0, fx_test_0=0.0, t=t)
                exact = predict.gradient_descent_mse(k64[:50, :50], y, ntk_test_train=k64[50:, :50], **kwargs)
                single = predict.gradient_descent_mse(k32[:50, :50], y.float(), ntk_test_train=k32[50:, :50],
                                                      **kwargs)
                for a, b in zip(exact, single, strict=True):
                    assert float((b.double() - a).abs().max()) < 1e-2 * float(a.abs().max()), (seed, t)
            for kernel in ("ntk", "nngp"):
                for t in (1e2, 1e6, math.inf):
                    exact = predict.gradient_flow(net, x[:50], y, x[50:], t=t, kernel=kernel, compute_cov=False).mean
                    single = predict.gradient_flow(net, x[:50].float(), y.float(), x[50:].float(), t=t,
                                                   kernel=kernel, compute_cov=False, factor_dtype=torch.float32).mean
                    assert float((single.double() - exact).abs().max()) < 1e-2 * float(exact.abs().max())
            for kernel in ("nngp", "ntkgp"):
                for noise in (0.0, 1e-4):
                    exact = predict.gp_posterior(net, x[:50], y, x[50:], kernel=kernel, noise=noise,
                                                 compute_cov=False).mean
                    single = predict.gp_posterior(net, x[:50].float(), y.float(), x[50:].float(), kernel=kernel,
                                                  noise=noise, compute_cov=False, factor_dtype=torch.float32).mean
                    assert float((single.double() - exact).abs().max()) < 1e-2 * float(exact.abs().max())


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp"])
def test_posteriors_other_than_ntk_say_why_they_refuse_x_test_none(kernel):
    """kernel='ntk' predicts the training points for x_test=None; the others said only "x_test must
    be a torch.Tensor of shape (..., n, d), got NoneType"."""
    x, y = _x(5), _x(5, 1, seed=13)
    for call in (lambda: predict.GPPosterior(NET, x, y, kernel=kernel, noise=0.1).predict(None),
                 lambda: predict.gp_posterior(NET, x, y, None, kernel=kernel, noise=0.1)):
        with pytest.raises(ValueError, match=r"x_test=None .* is for kernel='ntk' only; .* pass them as x_test"):
            call()


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp"])
def test_gp_posterior_refuses_x_test_none_before_the_training_kernel(kernel, monkeypatch):
    """gp_posterior built the GPPosterior, computing the training kernel (0.34 s at N = 4000), for its
    predict to refuse x_test=None; the cheap arguments are checked first elsewhere."""
    net = ntkgp.mlp(2, "erf", 1.7, 0.1)
    monkeypatch.setattr(net, "kernel", lambda *args, **kwargs: pytest.fail("the training kernel was computed"))
    with pytest.raises(ValueError, match=r"x_test=None .* is for kernel='ntk' only; .* pass them as x_test"):
        predict.gp_posterior(net, _x(5), _x(5, 1, seed=13), None, kernel=kernel, noise=0.1)


def test_training_outputs_warn_where_an_unresolved_direction_leaves_them_unfitted():
    """A duplicated input with two targets, regularized by diag_reg = 1e-14 (nonsingular to working
    precision, so t = None fits both targets): t = inf dropped the regularized direction and left
    the training outputs 0.83 off Y without a word, while the same predictor at x_test = x_train
    warned (a predictor-options fuzz review). The training outputs now warn as the test outputs do,
    at the caller's line; an unregularized exact duplicate (whose least-squares fit is the answer)
    stays quiet."""
    gen = torch.Generator().manual_seed(0)
    net = ntkgp.mlp(1, "relu")
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    x[1] = x[0]
    y = torch.randn(12, generator=gen, dtype=torch.float64)
    flow = predict.GradientFlow(net, x, y, diag_reg=1e-14)
    torch.testing.assert_close(flow.predict(None, compute_cov=False).mean, y, rtol=0, atol=1e-6)
    with torch.no_grad():
        theta = net.kernel(x).ntk
    calls = [lambda t: flow.predict(None, t=t, compute_cov=False).mean,
             lambda t: predict.gradient_flow(net, x, y, None, t=t, compute_cov=False, diag_reg=1e-14).mean,
             lambda t: predict.gradient_descent_mse(theta, y, t=t, diag_reg=1e-14)]
    for call in calls:
        for t in (math.inf, 1e30):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                late = call(t)
            assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)[:60]) for w in caught]
            assert "count as untrained, but move the training outputs" in str(caught[0].message)
            assert float((late - y).abs().max()) > 0.5   # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict.GradientFlow(net, x, y).predict(None, t=math.inf, compute_cov=False)
        predict.gradient_descent_mse(theta, y, t=math.inf)


def test_the_unresolved_direction_warning_names_the_callers_line_and_takes_times_with_gradients():
    """The warning pointed at library lines where the call went through a one-shot wrapper or the
    full-kernel path (a fixed stacklevel), and a time that requires grad raised torch's
    scalar-conversion warning inside it."""
    gen = torch.Generator().manual_seed(0)
    net = ntkgp.mlp(1, "erf", 2.0, 0.1, width=8)
    x, y, xt = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 3), (6,), (3, 3)))
    x[4] = x[1] + 3e-8 * torch.randn(3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        theta, cross = net.kernel(x).ntk, net.kernel(xt, x).ntk
    full_theta = theta[:, :, None, None] * torch.eye(2, dtype=torch.float64)
    full_cross = cross[:, :, None, None] * torch.eye(2, dtype=torch.float64)
    t = torch.tensor(1e10, dtype=torch.float64, requires_grad=True)
    calls = [lambda: predict.gradient_flow(net, x, y, xt, t=1e10, compute_cov=False),
             lambda: predict.GradientFlow(net, x, y).predict(xt, steps=10**10, compute_cov=False),
             lambda: predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=t),
             lambda: predict.gradient_descent_mse(full_theta, torch.stack([y, -y], -1), fx_train_0=0.0,
                                                  ntk_test_train=full_cross, fx_test_0=0.0, t=1e10)]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)[:60]) for w in caught]
        assert "count as untrained" in str(caught[0].message)


def test_gp_posterior_of_the_converged_ntk_predicts_the_training_points_for_no_test_points():
    x, y = _x(5), _x(5, 1, seed=13)
    torch.testing.assert_close(predict.gp_posterior(NET, x, y, None, kernel="ntk", noise=1e-3).mean,
                               predict.GPPosterior(NET, x, y, kernel="ntk", noise=1e-3).predict(None).mean)


def _reference_dynamics(theta, y, f0, theta_td, ft0, tau=None, steps=None, rate=None):
    """Training and test outputs from matrix exponentials / matrix powers (no eigendecomposition)."""
    n = theta.shape[0]
    eye = torch.eye(n)
    if steps is None and tau is None:                        # t = ∞, nonsingular Θ
        decay, flow = torch.zeros_like(theta), torch.linalg.inv(theta)
    elif steps is None:
        # exp([[−Θτ, Iτ], [0, 0]]) holds e^{−Θτ} and Θ⁻¹(I − e^{−Θτ}) (Higham 2008, eq. 10.40)
        block = torch.zeros(2 * n, 2 * n)
        block[:n, :n], block[:n, n:] = -theta * tau, eye * tau
        e = torch.linalg.matrix_exp(block)
        decay, flow = e[:n, :n], e[:n, n:]
    else:                                                    # Θ⁻¹(I − (I − rΘ)^s) = r Σ_{j<s} (I − rΘ)^j
        step, power, flow = eye - rate * theta, eye, torch.zeros_like(theta)
        for _ in range(steps):
            flow, power = flow + rate * power, power @ step
        decay = power
    residual = f0 - y
    return y + decay @ residual, ft0 - theta_td @ flow @ residual


@pytest.mark.parametrize("time", [{"t": 0.7}, {"t": 40.0}, {"t": math.inf}, {"steps": 7}])
@pytest.mark.parametrize("gap", [0.0, 1e-13, 1e-9, 6.5e-6, 1e-3])
def test_gradient_descent_mse_gradients_at_repeated_and_close_eigenvalues(time, gap):
    # Θ = Q diag(λ) Qᵀ with λ₂ = λ₃(1 + gap): autograd through eigh divided by λ₂ − λ₃ (NaN at
    # gap 0, one-hot inputs; digits lost near it). The matrix exponential's gradient is exact.
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    lam = torch.tensor([3.0, 1.0, 1.0 * (1 + gap), 0.4, 0.2])
    base = q @ torch.diag(lam) @ q.mT
    y, f0 = torch.randn(5, 2, generator=g), 0.3 * torch.randn(5, 2, generator=g)
    theta_td, ft0 = torch.randn(3, 5, generator=g), 0.3 * torch.randn(3, 2, generator=g)
    w_train, w_test = torch.randn(5, 2, generator=g), torch.randn(3, 2, generator=g)
    rate = 0.5
    m = y.numel()

    def loss(perturbation, td, ours):
        theta = base + perturbation + perturbation.mT
        if ours:
            train, test = predict.gradient_descent_mse(theta, y, fx_train_0=f0, ntk_test_train=td, fx_test_0=ft0,
                                                       learning_rate=rate, **time)
        else:
            t = time.get("t")
            tau = None if t is None or math.isinf(t) else rate * t / m
            train, test = _reference_dynamics(theta, y, f0, td, ft0, tau, time.get("steps"), rate / m)
        return (train * w_train).sum() + (test * w_test).sum()

    grads = []
    for ours in (True, False):
        a = torch.zeros(5, 5, requires_grad=True)
        td = theta_td.clone().requires_grad_(True)
        value = loss(a, td, ours)
        grads.append((value.detach(), *torch.autograd.grad(value, (a, td))))
    (v, ga, gtd), (v_ref, ga_ref, gtd_ref) = grads
    assert torch.isfinite(ga).all()
    assert float(v) == pytest.approx(float(v_ref), rel=1e-12)
    # divided differences are accurate to ~ε^(2/3) of the gradient's scale at worst (just outside
    # the closeness threshold, gap 6.5e-6); measured ≤ 7e-13
    assert float((ga - ga_ref).abs().max()) <= 1e-10 * float(ga_ref.abs().max())
    assert float((gtd - gtd_ref).abs().max()) <= 1e-12 * float(gtd_ref.abs().max())


def test_gradient_descent_mse_hyperparameter_gradients_with_one_hot_inputs():
    # one-hot inputs: Θ = a I + b 11ᵀ, the eigenvalue a three times (NaN gradients before)
    net = ntkgp.mlp(1, "relu", 2.0, 0.1)
    x, xt = torch.eye(4), torch.tensor([[0.3, 0.2, -0.1, 0.5]])
    y = torch.tensor([1.0, -1.0, 0.5, 0.0])
    k, kc = net.kernel(x), net.kernel(xt, x)
    _, test = predict.gradient_descent_mse(k.ntk, y, fx_train_0=0.0, ntk_test_train=kc.ntk, fx_test_0=0.0, t=1.0)
    ours = torch.autograd.grad(test.sum(), list(net.parameters()))
    k, kc = net.kernel(x), net.kernel(xt, x)
    _, test_ref = _reference_dynamics(k.ntk, y, torch.zeros(4), kc.ntk, torch.zeros(1), tau=1.0 / 4)
    ref = torch.autograd.grad(test_ref.sum(), list(net.parameters()))
    for a, b in zip(ours, ref, strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("t", [1.0, math.inf, None])
def test_gradient_descent_mse_differentiates_diag_reg_and_refuses_a_learning_rate_to_differentiate(t):
    # both were read as numbers: autograd then said only "element 0 of tensors does not require grad"
    g = torch.Generator().manual_seed(4)
    x, x_test, y = torch.randn(6, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(6, generator=g)
    with torch.no_grad():
        theta, cross = NET.kernel(x).ntk, NET.kernel(x_test, x).ntk

    def test_outputs(reg):
        return predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=t,
                                            diag_reg=reg)[1].sum()

    reg = torch.tensor(0.1, requires_grad=True)
    (grad,) = torch.autograd.grad(test_outputs(reg), reg)
    h = 1e-6
    assert float(grad) == pytest.approx(float(test_outputs(0.1 + h) - test_outputs(0.1 - h)) / (2 * h), rel=1e-7)
    zero = torch.tensor(0.0, requires_grad=True)   # lost its graph: regularize returned the kernel unchanged
    (grad,) = torch.autograd.grad(test_outputs(zero), zero)
    assert float(grad) == pytest.approx(float(test_outputs(h) - test_outputs(0.0)) / h, rel=1e-4)
    with pytest.raises(ValueError, match="differentiate with respect to the time t"):
        predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=t,
                                     learning_rate=torch.tensor(0.5, requires_grad=True))


def test_gradient_flow_refuses_a_learning_rate_or_diag_reg_to_differentiate():
    """GradientFlow and gradient_flow read both as numbers before make_schedule's check saw them: the
    predictions came back without a gradient, and a backward said only "element 0 of tensors does not
    require grad" (with t requiring grad, learning_rate.grad stayed None without a word)."""
    x, y, x_test = _x(), _x(6, 1, seed=1)[:, 0], _x(3, seed=2)
    rate, reg = torch.tensor(0.5, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match="differentiate with respect to the time t"):
        predict.GradientFlow(NET, x, y, learning_rate=rate)
    with pytest.raises(ValueError, match="differentiate with respect to the time t"):
        predict.gradient_flow(NET, x, y, x_test, t=1.0, learning_rate=rate)
    with pytest.raises(ValueError, match="diag_reg is read as a number"):
        predict.GradientFlow(NET, x, y, diag_reg=reg)
    with pytest.raises(ValueError, match="diag_reg is read as a number"):
        predict.gradient_flow(NET, x, y, x_test, t=1.0, diag_reg=reg)
    for kind in ("nngp", "ntkgp", "ntk"):   # GPPosterior's noise likewise
        with pytest.raises(ValueError, match="noise is read as a number and gets no gradient here"):
            predict.GPPosterior(NET, x, y, kernel=kind, noise=reg)
        with pytest.raises(ValueError, match="noise is read as a number and gets no gradient here"):
            predict.gp_posterior(NET, x, y, x_test, kernel=kind, noise=reg)
        assert torch.equal(predict.gp_posterior(NET, x, y, x_test, kernel=kind, noise=reg.detach()).mean,
                           predict.gp_posterior(NET, x, y, x_test, kernel=kind, noise=0.1).mean)
    # plain tensors are numbers as before
    flow = predict.GradientFlow(NET, x, y, learning_rate=rate.detach(), diag_reg=reg.detach())
    ref = predict.GradientFlow(NET, x, y, learning_rate=0.5, diag_reg=0.1)
    assert torch.equal(flow.predict(x_test, t=2.0).mean, ref.predict(x_test, t=2.0).mean)


def test_gradient_descent_mse_second_derivatives_and_extreme_schedules():
    """The Daleckii–Krein backward is not itself differentiable: with create_graph=True it gave wrong
    second derivatives silently (d²L/dℓ² 0.388 for 0.344); its slopes were NaN at a step of exactly
    ηλ/m = 1 with a step count of 0 ((1 − a)^(−1)), and for τ ≳ 1e154 (τ² overflowed)."""
    g = torch.Generator().manual_seed(5)
    x, x_test = torch.randn(5, 2, generator=g), torch.randn(3, 2, generator=g)
    y = torch.randn(5, generator=g)

    def rbf(a, b, scale):
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * scale ** 2))

    def loss(scale, **time):
        theta = rbf(x, x, scale) + 0.1 * torch.eye(5)
        return predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=rbf(x_test, x, scale),
                                            fx_test_0=0.0, **time)[1].pow(2).sum()

    scale = torch.tensor(0.8, requires_grad=True)
    (first,) = torch.autograd.grad(loss(scale, t=3.0), scale, create_graph=True)
    (second,) = torch.autograd.grad(first, scale)
    h = 1e-5
    up, down = (torch.tensor(0.8 + s, requires_grad=True) for s in (h, -h))
    fd = (torch.autograd.grad(loss(up, t=3.0), up)[0] - torch.autograd.grad(loss(down, t=3.0), down)[0]) / (2 * h)
    assert float(second) == pytest.approx(float(fd), rel=1e-6)
    # the mixed time–hyperparameter block: the weights' λ-derivative carried no graph of t (0.36 off)
    t = torch.tensor(3.0, requires_grad=True)
    (d_t,) = torch.autograd.grad(loss(scale, t=t), t, create_graph=True)
    (mixed,) = torch.autograd.grad(d_t, scale)

    def d_dt(value):
        time = torch.tensor(3.0, requires_grad=True)
        return torch.autograd.grad(loss(torch.tensor(value), t=time), time)[0]

    assert float(mixed) == pytest.approx(float(d_dt(0.8 + h) - d_dt(0.8 - h)) / (2 * h), rel=1e-6)
    # η = m / λ_max (a = 1 for the top eigenvalue) with a step count of 0, and absurdly late times
    theta = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5])).requires_grad_(True)
    y4 = torch.tensor([1.0, -1.0, 0.5, 0.2])
    for time in ({"steps": torch.arange(5)}, {"t": 1e200}):
        out = predict.gradient_descent_mse(theta, y4, fx_train_0=0.3, learning_rate=1.0, **time)
        (grad,) = torch.autograd.grad(out.sum(), theta)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("time", [{"t": 0.5}, {"t": torch.tensor([0.5, 5.0])}, {"t": math.inf},
                                  {"steps": torch.tensor([3, 40])}], ids=["t", "times", "inf", "steps"])
def test_second_derivatives_at_tied_eigenvalues_are_exact(time):
    """Through eigh, second derivatives divide by eigenvalue gaps: with inputs ±e_i (the NTK's
    eigenvalues tie to 4e-16) they were off by 1e14, and at a gap of 3e-7 by 3 %, silently.
    Where eigenvalues tie they go through matrix_exp / matrix_power / inv of the kernel instead;
    checked against central differences of the first derivatives (exact, Daleckii–Krein), whose
    own error is ~1e-8 here."""
    net = ntkgp.serial(ntkgp.Dense(1, weight_var=2.25, bias_var=0.01), ntkgp.Erf(),
                       ntkgp.Dense(1, weight_var=2.25, bias_var=0.01))
    x_test = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.1, -0.4]])

    def loss(x):
        k = net.kernel(torch.cat([x, x_test])).ntk
        train, test = predict.gradient_descent_mse(k[:6, :6], torch.arange(1.0, 7.0), fx_train_0=0.0,
                                                   ntk_test_train=k[6:, :6], fx_test_0=0.0, **time)
        return train.pow(2).sum() + test.pow(2).sum()

    def gradient(x):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(loss(x), x)[0]

    g = torch.Generator().manual_seed(0)
    symmetric = torch.cat([torch.eye(3), -torch.eye(3)])
    for x0 in (symmetric, symmetric + 1e-7 * torch.randn(6, 3, generator=g)):
        x = x0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (first,) = torch.autograd.grad(loss(x), x, create_graph=True)
        u = torch.randn(6, 3, generator=g)
        (second,) = torch.autograd.grad((first * u).sum(), x)
        h = 1e-5
        expected = (gradient(x0 + h * u) - gradient(x0 - h * u)) / (2 * h)
        assert float((second - expected).norm() / expected.norm()) < 1e-6


def test_second_derivatives_at_tied_eigenvalues_with_null_directions_warn():
    """Where the kernel also has null directions at the requested times (a duplicated point at
    t = ∞), the eigendecomposition-free form does not apply (it does not zero them as the
    predictions do): the eigh path stays, and says so; first derivatives do not warn."""
    net = ntkgp.serial(ntkgp.Dense(1, weight_var=2.25, bias_var=0.01), ntkgp.Erf(),
                       ntkgp.Dense(1, weight_var=2.25, bias_var=0.01))

    def first_derivative(create_graph):
        x = torch.cat([torch.eye(3), -torch.eye(3), torch.eye(3)[:1]]).requires_grad_()
        out = predict.gradient_descent_mse(net.kernel(x).ntk, torch.arange(1.0, 8.0), fx_train_0=0.0, t=math.inf)
        return torch.autograd.grad(out.pow(2).sum(), x, create_graph=create_graph)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first_derivative(create_graph=False)
    with pytest.warns(RuntimeWarning, match=r"eigenvalues 3\.94919 and 3\.94919 .*null directions") as seen:
        first_derivative(create_graph=True)
    assert seen[0].filename == __file__


def test_second_derivatives_at_tied_eigenvalues_keep_eigh_where_the_exact_form_does_not_apply(monkeypatch):
    """The eigendecomposition-free form takes step counts as integers (a steps gradient came back
    None, and the mixed derivative in steps was silently wrong) and costs ~1000x eigh: step counts
    that require grad, and problems above EXACT_TIES_BUDGET, keep eigh and say so."""
    import ntkgp.predict.spectral as spectral

    theta = torch.diag(torch.tensor([1.0, 2.0, 2.0, 3.0])).requires_grad_()
    y = torch.tensor([1.0, -1.0, 0.5, 0.2])
    steps = torch.tensor([3.0, 40.0], requires_grad=True)
    out = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, steps=steps, learning_rate=0.5)
    with pytest.warns(RuntimeWarning, match="step counts that require grad"):
        d_theta, d_steps = torch.autograd.grad(out.pow(2).sum(), [theta, steps], create_graph=True)
    plain = torch.autograd.grad(predict.gradient_descent_mse(theta, y, fx_train_0=0.0, steps=steps, learning_rate=0.5)
                                .pow(2).sum(), [theta, steps])
    # the first derivatives' values are Daleckii–Krein's there (through eigh d_theta was NaN at the tie)
    torch.testing.assert_close(d_theta, plain[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(d_steps, plain[1], rtol=1e-12, atol=0)
    monkeypatch.setattr(spectral, "EXACT_TIES_BUDGET", 4**3 - 1)   # one time of N = 4 is over it
    out = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, t=0.5)
    with pytest.warns(RuntimeWarning, match="EXACT_TIES_BUDGET"):
        torch.autograd.grad(out.pow(2).sum(), theta, create_graph=True)
    monkeypatch.setattr(spectral, "EXACT_TIES_BUDGET", 4**3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad(predict.gradient_descent_mse(theta, y, fx_train_0=0.0, t=0.5).pow(2).sum(), theta,
                                                         create_graph=True)


def test_step_count_gradients_between_the_contraction_and_the_stability_limits():
    """Where ``1 < ηλ/m < 2`` (stable, oscillating) the base ``b = 1 − ηλ/m`` of ``b^s`` is negative, and the
    gradient with respect to a step count that requires grad was NaN (torch.pow's ``b^s log b``). For whole
    ``s`` the real continuation is ``(−1)^s |b|^s``, the sign constant in ``s``: ``d/ds = b^s log|b|``, here
    against the closed form on a diagonal kernel (``f_s = (1 − b^s) y`` per direction)."""
    lam = torch.tensor([1.0, 3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.5], dtype=torch.float64)
    b = 1 - lam / 2                                       # learning rate 1, m = 2: b = 0.5 and -0.5
    for s in (3.0, 4.0):
        steps = torch.tensor([s], dtype=torch.float64, requires_grad=True)
        out = predict.gradient_descent_mse(torch.diag(lam), y, fx_train_0=0.0, steps=steps, learning_rate=1.0)
        torch.testing.assert_close(out[0], (1 - b ** s) * y, rtol=1e-14, atol=0)
        grad = torch.autograd.grad(out.sum(), steps)[0]
        expected = -(b ** s * torch.log(b.abs()) * y).sum()
        torch.testing.assert_close(grad[0], expected, rtol=1e-12, atol=0)
    # the ensemble's flow takes the same functions: its mean's step gradient is finite too
    x = _x(4, 2)
    flow = predict.GradientFlow(NET, x, torch.sin(x.sum(-1)), learning_rate=1.0)
    flow = predict.GradientFlow(NET, x, torch.sin(x.sum(-1)), learning_rate=0.9 * flow.max_learning_rate)
    steps = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(flow.predict(x[:2], steps=steps).mean.sum(), steps)[0]
    assert bool(torch.isfinite(grad).all())


def test_gradient_descent_mse_absolute_diag_reg_matches_the_regularized_closed_form():
    """diag_reg_absolute_scale=True adds r·I, not r·trace/N·I (no test set it before: reading it as
    relative went unnoticed). The kernel's trace/N is 0.84, so the two differ."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 5, generator=g)
    theta = a @ a.T / 5 + 0.2 * torch.eye(5)
    cross, y = torch.randn(3, 5, generator=g), torch.randn(5, generator=g)
    assert abs(float(theta.trace() / 5) - 1) > 0.1
    r, tau = 0.3, 2.0
    reg = theta + r * torch.eye(5)
    expected = cross @ torch.linalg.solve(reg, (torch.eye(5) - torch.linalg.matrix_exp(-reg * tau)) @ y)
    out = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=tau * 5,
                                       diag_reg=r, diag_reg_absolute_scale=True)
    torch.testing.assert_close(out[1], expected, rtol=1e-12, atol=1e-13)
    converged = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=None,
                                             diag_reg=r, diag_reg_absolute_scale=True)
    torch.testing.assert_close(converged[1], cross @ torch.linalg.solve(reg, y), rtol=1e-12, atol=1e-13)
    relative = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0, t=tau * 5,
                                            diag_reg=r)
    assert (relative[1] - expected).abs().max() > 1e-3


def test_converged_ntk_ensemble_at_its_training_points_is_the_targets_with_no_spread():
    """At t = ∞ the trained outputs on the training inputs are Y exactly, with zero covariance; the
    test before compared two calls of the same code."""
    x, y = _x(5), _x(5, 1, seed=13)
    flow = predict.GradientFlow(NET, x, y, kernel="ntk")
    for t in (None, math.inf):
        out = flow.predict(None, t=t)
        torch.testing.assert_close(out.mean, y, rtol=1e-12, atol=1e-12)
        assert out.covariance.abs().max() < 1e-12
    post = predict.gp_posterior(NET, x, y, None, kernel="ntk", noise=0.0)
    torch.testing.assert_close(post.mean, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.5, 0.75, 1.3])
def test_kernel_gradient_of_large_discrete_steps_matches_autograd_through_matrix_powers(fraction):
    """η at 0.5, 0.75 and 1.3 times max_learning_rate: ηλ_max/m = 1 (to rounding), 1.5 (stable, the
    top mode overshoots) and 2.6 (diverging). Beyond 1 the slopes take their own branch, which was
    checked for finiteness only: a sign error there went unnoticed. A full kernel Θ ⊗ I of two
    outputs has every eigenvalue twice (tied)."""
    g = torch.Generator().manual_seed(5)
    x, x_test = torch.randn(5, 2, generator=g), torch.randn(3, 2, generator=g)
    y = torch.randn(5, 2, generator=g)
    eye2 = torch.eye(2)

    def rbf(a, b, scale):
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * scale ** 2))

    def kernels(scale):
        theta = rbf(x, x, scale) + 0.1 * torch.eye(5)
        return theta[:, :, None, None] * eye2, rbf(x_test, x, scale)[:, :, None, None] * eye2

    with torch.no_grad():
        rate = fraction * predict.max_learning_rate(kernels(torch.tensor(0.8))[0])
    steps, m = 5, 10

    def library(scale):
        full, cross = kernels(scale)
        with warnings.catch_warnings():   # 1.3: above the stability limit, which it warns about
            warnings.simplefilter("ignore" if fraction > 1 else "error")
            return predict.gradient_descent_mse(full, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0,
                                                steps=steps, learning_rate=rate)[1]

    def reference(scale):
        full, cross = kernels(scale)
        theta = full.permute(0, 2, 1, 3).reshape(m, m)
        cross = cross.permute(0, 2, 1, 3).reshape(6, m)
        step = torch.linalg.matrix_power(torch.eye(m) - rate * theta / m, steps)
        return (cross @ torch.linalg.solve(theta, (torch.eye(m) - step) @ y.reshape(m))).reshape(3, 2)

    scale = torch.tensor(0.8, requires_grad=True)
    torch.testing.assert_close(library(scale), reference(scale), rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(library(scale).pow(2).sum(), scale)
    (want,) = torch.autograd.grad(reference(scale).pow(2).sum(), scale)
    assert float(got) == pytest.approx(float(want), rel=1e-9)


def test_predictors_refuse_to_mix_the_cached_training_kernel_with_changed_hyperparameters():
    """The training kernel and its factorization are cached at construction, the test kernels computed
    at each predict: after ``net[0].weight_var = 5.0`` (or an optimizer step on a raw parameter) a
    review's posterior mean moved by 3.9 and matched neither model (3.8 off a rebuilt posterior),
    silently. Now predict refuses; put back, the values predict as before, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x, y, xt = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 3), (6,), (4, 3)))
    makers = {"GPPosterior": lambda net: predict.GPPosterior(net, x, y, noise=0.01),
              "GPPosterior(ntk)": lambda net: predict.GPPosterior(net, x, y, kernel="ntk", noise=0.01),
              "GradientFlow": lambda net: predict.GradientFlow(net, x, y)}
    for name, make in makers.items():
        net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.Rbf(0.5), ntkgp.Dense(1, 1.5, 0.1))
        predictor = make(net)
        call = (lambda p=predictor: p.predict(xt, t=10.0).mean) if name == "GradientFlow" else \
            (lambda p=predictor: p.predict(xt).mean)
        before = call()
        net[0].weight_var = 5.0
        with pytest.raises(ValueError, match="changed since this predictor"):
            call()
        net[0].weight_var = 2.0
        raw = net[2].raw_weight_var
        with torch.no_grad():
            raw.add_(0.1)   # what an optimizer step does
        with pytest.raises(ValueError, match="build a new"):
            call()
        with torch.no_grad():
            raw.sub_(0.1)
        assert torch.equal(call(), before), name
        net[1].gamma = 3.0   # not a parameter: the Rbf layer's constant, which the printed network shows
        with pytest.raises(ValueError, match="build a new"):
            call()



def test_posterior_evidence_and_leave_one_out_refuse_changed_hyperparameters():
    """``log_marginal_likelihood`` and the leave-one-out values read the factor cached at construction:
    a grid search that set ``net[0].weight_var = w`` and asked the same posterior gave -10.163 for every
    ``w`` (0.5, 1, 4), where rebuilt posteriors give -9.763, -9.683, -11.151. They refuse, as predict
    does; put back, the values are as before, bit for bit, and equal R&W eq. 2.30 from scipy."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 2, generator=gen, dtype=torch.float64), torch.randn(10, generator=gen, dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 2.0, 0.1))
    post = predict.GPPosterior(net, x, y, noise=0.1)
    reads = {"log_marginal_likelihood": post.log_marginal_likelihood,
             "leave_one_out": lambda: post.leave_one_out()[0],
             "leave_one_out_log_density": post.leave_one_out_log_density}
    before = {name: read() for name, read in reads.items()}
    with torch.no_grad():
        c = (net.kernel(x, ntk=False).nngp + 0.1 * torch.eye(10)).numpy()
    assert before["log_marginal_likelihood"] == pytest.approx(
        scipy.stats.multivariate_normal(np.zeros(10), c).logpdf(y.numpy()), rel=1e-12)
    net[0].weight_var = 4.0
    for read in reads.values():
        with pytest.raises(ValueError, match="changed since this predictor"):
            read()
    net[0].weight_var = 2.0
    for name, read in reads.items():
        after = read()
        assert torch.equal(after, before[name]) if isinstance(after, torch.Tensor) else after == before[name], name


def test_boolean_flags_refuse_strings():
    """``diag_reg_absolute_scale="False"`` read as true (a review measured the absolute-scale mean), as did
    ``compute_cov="no"`` and ``train_ensemble(readout_only="no")`` (which trained the readout only);
    ``Layer.kernel``, ``monte_carlo_kernel`` and ``CompareConfig`` already refused such values."""
    x, y = _x(5), _x(5, 1, seed=13)
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    model = net.build(in_features=3, seed=0, dtype=torch.float64)
    theta = net.kernel(x).ntk.detach()
    calls = {"diag_reg_absolute_scale": [
                 lambda v: predict.GradientFlow(net, x, y, diag_reg_absolute_scale=v),
                 lambda v: predict.gradient_flow(net, x, y, x, t=1.0, diag_reg_absolute_scale=v),
                 lambda v: predict.gradient_descent_mse(theta, y, t=1.0, diag_reg_absolute_scale=v)],
             "compute_cov": [lambda v: predict.GradientFlow(net, x, y).predict(x, t=1.0, compute_cov=v),
                             lambda v: predict.gradient_flow(net, x, y, x, t=1.0, compute_cov=v),
                             lambda v: predict.GPPosterior(net, x, y, noise=0.1).predict(x, compute_cov=v),
                             lambda v: predict.gp_posterior(net, x, y, x, noise=0.1, compute_cov=v)],
             "vector_output": [lambda v: ntkgp.finite.empirical_ntk(model, x, vector_output=v),
                               lambda v: ntkgp.finite.empirical_nngp(model, x, vector_output=v)],
             "readout_only": [lambda v: ntkgp.finite.train_ensemble(net, x, y[:, 0], ensemble_size=2, learning_rate=0.1,
                                                                    record_steps=[0, 1], readout_only=v)]}
    for name, makers in calls.items():
        for make in makers:
            for value in ("False", "no", ("nngp",)):
                # compute_cov has a third choice, "diag", which its message names
                choices = "True, False or 'diag'" if name == "compute_cov" else "True or False"
                with pytest.raises(ValueError, match=f"{name} must be {choices}"):
                    make(value)


def test_boolean_flags_refuse_none_and_numbers():
    """``net.kernel(x, diag=None)`` (read as false), ``diag=2``, ``compute_cov=2`` or ``readout_only=2.5``
    (read as true) ran on with a setting nobody asked for; like torch's own boolean arguments
    (``keepdim=1`` is a TypeError) and CompareConfig's flags, every flag takes booleans alone: Python's,
    numpy's, and boolean arrays or tensors of one element."""
    x, y = _x(5).double(), _x(5, 1, seed=13).double()
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    model = net.build(in_features=2, seed=0, dtype=torch.float64)
    theta = net.kernel(x).ntk
    calls = {
        "diag": lambda v: net.kernel(x, diag=v),
        "ntk": lambda v: net.kernel(x, ntk=v),
        "compile": lambda v: net.kernel(x, compile=v),
        "diag_reg_absolute_scale": lambda v: predict.gradient_descent_mse(theta, y, t=1.0, diag_reg_absolute_scale=v),
        "compute_cov": lambda v: predict.gp_posterior(net, x, y, x, noise=0.1, compute_cov=v),
        "vector_output": lambda v: ntkgp.finite.empirical_ntk(model, x, vector_output=v),
        "readout_only": lambda v: train_ensemble(net, x, y[:, 0], ensemble_size=2, learning_rate=0.1,
                                                 record_steps=[0, 1], readout_only=v),
        "progress": lambda v: train_ensemble(net, x, y[:, 0], ensemble_size=2, learning_rate=0.1,
                                             record_steps=[0, 1], progress=v),
    }
    mc = {"ntk": lambda v: ntkgp.finite.monte_carlo_kernel(net, x, n_samples=2, ntk=v)}
    for name, call in [*calls.items(), *mc.items()]:
        for value in (None, 0, 1, 2, 2.5, np.int64(1), torch.tensor(1), torch.tensor([0.0])):
            with pytest.raises(ValueError, match=f"^{name} must be True(, False or 'diag'.*| or False), got "):
                call(value)
    # what is taken: numpy's and one-element booleans, with the meaning of the Python boolean
    assert torch.equal(net.kernel(x, diag=np.bool_(True)).nngp, net.kernel(x, diag=True).nngp)
    assert net.kernel(x, ntk=torch.tensor([False])).ntk is None
    assert predict.gp_posterior(net, x, y, x, noise=0.1, compute_cov=np.False_).covariance is None


@pytest.mark.parametrize("built_inside", [False, True])
def test_predictors_used_under_inference_mode_keep_their_gradients_in_t_afterwards(built_inside):
    """A GradientFlow built, or first asked, under ``torch.inference_mode()`` cached inference
    tensors (the training kernel, its eigensystem): every later prediction differentiated in
    ``t`` failed with "Inference tensors cannot be saved for backward"."""
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(12, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.sin(x.sum(-1))
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(1, 1.5, 0.05))

    def mean_and_slope(flow):
        t = torch.tensor(2.0, requires_grad=True)
        mean = flow.predict(xt, t=t).mean
        mean.sum().backward()
        return mean.detach(), t.grad

    expected = mean_and_slope(predict.GradientFlow(net, x, y, learning_rate=0.5))
    posterior = predict.GPPosterior(net, x, y, noise=1e-2).predict(xt)
    with torch.inference_mode():
        flow = predict.GradientFlow(net, x, y, learning_rate=0.5) if built_inside else None
        inside = predict.GPPosterior(net, x, y, noise=1e-2) if built_inside else None
    if not built_inside:
        flow, inside = predict.GradientFlow(net, x, y, learning_rate=0.5), predict.GPPosterior(net, x, y, noise=1e-2)
    with torch.inference_mode():   # a preview prediction fills the caches
        flow.predict(xt, t=1.0)
        inside.predict(xt)
    got = mean_and_slope(flow)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(inside.predict(xt).mean, posterior.mean)
    assert not flow.eigensystem.values.is_inference() and not inside._cholesky.is_inference()
    # no graph of training inputs that require grad is kept, in either grad mode (leaving inference
    # mode keeps the caller's: inference_mode(False) alone turns it on)
    with torch.no_grad():
        assert not predict.GradientFlow(net, x.clone().requires_grad_(), y).x_factor.requires_grad
    assert not predict.GradientFlow(net, x.clone().requires_grad_(), y).x_factor.requires_grad
    assert not predict.GPPosterior(net, x.clone().requires_grad_(), y).x_factor.requires_grad


# neural-tangents' trace_axes (and gp_inference's diag_reg_absolute_scale, max_learning_rate's eps) met
# Python's bare "unexpected keyword argument" in every predictor, where get= and diag_reg= had a hint
_THETA = torch.tensor([[2.0, 0.5], [0.5, 1.0]])


@pytest.mark.parametrize(("call", "keyword", "hint"), [
    (lambda **kw: predict.gradient_descent_mse(_THETA, torch.ones(2), **kw), "trace_axes", r"full \(N, N, k, k\)"),
    (lambda **kw: predict.gradient_descent(lambda f, y: ((f - y) ** 2).mean(), _THETA, torch.ones(2), t=1.0, **kw),
     "trace_axes", r"full \(N, N, k, k\)"),
    (lambda **kw: predict.gradient_flow(NET, _x(), torch.ones(6), **kw), "trace_axes", "same for every output"),
    (lambda **kw: predict.GradientFlow(NET, _x(), torch.ones(6), **kw), "trace_axes", "same for every output"),
    (lambda **kw: predict.gp_posterior(NET, _x(), torch.ones(6), _x(), **kw), "trace_axes", "same for every output"),
    (lambda **kw: predict.GPPosterior(NET, _x(), torch.ones(6), **kw), "trace_axes", "same for every output"),
    (lambda **kw: predict.gp_posterior(NET, _x(), torch.ones(6), _x(), **kw), "diag_reg_absolute_scale",
     "pass noise=diag_reg"),
    (lambda **kw: predict.GPPosterior(NET, _x(), torch.ones(6), **kw), "diag_reg_absolute_scale",
     "pass noise=diag_reg"),
    (lambda **kw: predict.max_learning_rate(_THETA, **kw), "eps", "its limit is inf"),
], ids=["gradient_descent_mse", "gradient_descent", "gradient_flow", "GradientFlow", "gp_posterior", "GPPosterior",
        "gp_posterior-absolute", "GPPosterior-absolute", "max_learning_rate"])
def test_neural_tangents_keywords_of_the_predictors_have_hints(call, keyword, hint):
    with pytest.raises(TypeError, match=rf"got an unexpected keyword argument '{keyword}': .*{hint}"):
        call(**{keyword: ()})


# a tensor momentum came back in the limit: a 0-d tensor where a float is promised
@pytest.mark.parametrize("momentum", [0.5, torch.tensor(0.5), np.float64(0.5)])
def test_max_learning_rate_is_a_float_for_any_momentum(momentum):
    limit = predict.max_learning_rate(torch.diag(torch.tensor([4.0, 1.0])), momentum=momentum)
    assert type(limit) is float and limit == 1.5


# the generated __eq__ compared the fields' tensors, and bool() of their elementwise result raised
# "Boolean value of Tensor with more than one value is ambiguous" (also for `result in results`)
def test_gaussians_compare_by_identity():
    first, second = (predict.gradient_flow(NET, _x(), _x(6, 1)[:, 0], _x(3, seed=1), t=1.0) for _ in range(2))
    assert first == first and first != second and second not in [first] and first in [first]
    assert len({first, second}) == 2


# an (N, 1) initial output stretched over the k outputs with an (N, N) kernel and in gradient_descent,
# but was refused with a full (N, N, k, k) kernel
@pytest.mark.parametrize("solver", ["mse", "descent"])
def test_full_kernel_initial_outputs_broadcast_size_one_axes(solver):
    n, m, k = 4, 3, 2
    features = torch.randn(n + m, 5, k, generator=torch.Generator().manual_seed(3))
    full = torch.einsum("api,bpj->abij", features, features) / 5
    y = _x(n, k, seed=4)
    f0, g0 = torch.tensor([[0.3], [-0.2], [0.1], [0.5]]), torch.tensor([[1.0], [-1.0], [0.25]])
    if solver == "mse":
        def run(a, b):
            return predict.gradient_descent_mse(full[:n, :n], y, fx_train_0=a, ntk_test_train=full[n:, :n],
                                                fx_test_0=b, t=[0.5, 2.0])
    else:
        def run(a, b):
            return predict.gradient_descent(lambda f, t: ((f - t) ** 2).mean(), full[:n, :n], y, fx_train_0=a,
                                            ntk_test_train=full[n:, :n], fx_test_0=b, steps=[1, 3])
    stretched = run(f0, g0)
    for got, want in zip(stretched, run(f0.expand(n, k), g0.expand(m, k)), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"fx_train_0 must be a number or have shape \(4, 2\)"):
        run(f0[:, 0], g0)


# with a full (N, N, k, k) kernel an (N, k) numpy array or list of initial outputs (what a port from
# neural-tangents holds) was refused as "fx_train_0 must be ... shape (8,) ..., got (4, 2)", while the
# (N, N) kernel and gradient_descent take arrays
def test_full_kernel_initial_outputs_may_be_arrays():
    n, m, k = 4, 3, 2
    features = torch.randn(n + m, 5, k, generator=torch.Generator().manual_seed(5))
    full = torch.einsum("api,bpj->abij", features, features) / 5
    y, f0, g0 = _x(n, k, seed=6), _x(n, k, seed=7), _x(m, k, seed=8)

    def run(a, b):
        return predict.gradient_descent_mse(full[:n, :n], y, fx_train_0=a, ntk_test_train=full[n:, :n],
                                            fx_test_0=b, t=[0.5, 2.0], learning_rate=1.5)

    reference = run(f0, g0)
    for a, b in ((f0.numpy(), g0.numpy()), (f0.tolist(), g0.tolist()), (f0.numpy()[:, :1], g0[:, :1].tolist())):
        want = reference if np.shape(a) == (n, k) else run(f0[:, :1].expand(n, k), g0[:, :1].expand(m, k))
        for got, expected in zip(run(a, b), want, strict=True):
            assert torch.equal(got, expected)
    # the closed form of the flattened outputs: f_t(x*) = f_0* − Θ*d Θ⁻¹(I − e^{−Θτ})(f_0 − Y), τ = η t/(N k)
    flat, cross = full[:n, :n].permute(0, 2, 1, 3).reshape(n * k, n * k), full[n:, :n].permute(0, 2, 1, 3)
    values, vectors = torch.linalg.eigh(flat)
    tau = 1.5 * 2.0 / (n * k)
    coefficient = vectors @ (-torch.expm1(-values * tau) / values * (vectors.mT @ (f0 - y).reshape(-1)))
    expected = g0.reshape(-1) - cross.reshape(m * k, n * k) @ coefficient
    assert torch.allclose(run(f0.numpy(), g0.numpy())[1][1].reshape(-1), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"fx_test_0 must be a number or have shape \(3, 2\) \(size-1 axes "
                                         r"broadcast\), got \(2, 3\)"):
        run(f0.numpy(), g0.numpy().T[:, :3].copy())


# neural-tangents' predict_fn(t, None, fx_test_0, k_test_train) (test outputs alone, trained from zero
# training outputs), ported, met "fx_train_0 must be a number or a tensor of shape (4,), got None" alone
@pytest.mark.parametrize("solver", ["mse", "descent"])
def test_initial_outputs_none_names_the_neural_tangents_equivalent(solver):
    n, m = 4, 2
    features = _x(n + m, 6, seed=9)
    kernel = features @ features.mT / 6
    y, g0 = _x(n, 1, seed=10)[:, 0], _x(m, 1, seed=11)[:, 0]

    def run(f0):
        options = dict(fx_train_0=f0, ntk_test_train=kernel[n:, :n], fx_test_0=g0, t=2.0, learning_rate=1.2)
        if solver == "mse":
            return predict.gradient_descent_mse(kernel[:n, :n], y, **options)
        return predict.gradient_descent(lambda f, t: 0.5 * ((f - t) ** 2).mean(), kernel[:n, :n], y,
                                        rtol=1e-11, atol=1e-11, **options)

    with pytest.raises(ValueError, match=r"got None: neural-tangents' fx_train_0=None .* is fx_train_0=0\.0 here"):
        run(None)
    # what neural-tangents computes for None: f_t(x*) = f_0* + Θ*d Θ⁻¹(I − e^{−Θτ}) Y, τ = η t / N
    values, vectors = torch.linalg.eigh(kernel[:n, :n])
    flow = vectors @ (-torch.expm1(-values * 1.2 * 2.0 / n) / values * (vectors.mT @ y))
    tolerance = 1e-12 if solver == "mse" else 1e-9   # the ODE solver's at 1e-11
    assert torch.allclose(run(0.0)[1], g0 + kernel[n:, :n] @ flow, rtol=0, atol=tolerance)


# times given as a list holding a tensor that requires grad were read as numbers (torch's UserWarning
# alone): the outputs carried no gradient, where torch.stack of the same times gets it
@pytest.mark.parametrize("call", [
    lambda k, y, t: predict.gradient_descent_mse(k, y, fx_train_0=0.5, t=t, learning_rate=0.8),
    lambda k, y, t: predict.gradient_flow(NET, _x(3), y, None, t=t, learning_rate=0.8).mean,
    lambda k, y, t: predict.GradientFlow(NET, _x(3), y, learning_rate=0.8).predict(_x(2, seed=1), t=t).covariance,
    lambda k, y, t: predict.gradient_descent(lambda f, u: ((f - u) ** 2).mean(), k, y, t=t),
    lambda k, y, t: predict.gradient_descent_mse(k, y, steps=t),
], ids=["gradient_descent_mse", "gradient_flow", "GradientFlow", "gradient_descent", "steps"])
def test_times_in_a_list_that_require_grad_are_refused(call):
    kernel, y = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.5]]), _x(3, 1, seed=2)[:, 0]
    time = torch.tensor(1.0, requires_grad=True)
    for times in ([time, 2.0], [[2.0], (time,)]):
        with pytest.raises(ValueError, match=r"a sequence holding tensors that require grad, .*torch\.stack"):
            call(kernel, y, times)
    with torch.no_grad():   # nothing to lose: read as numbers, as before
        assert torch.equal(call(kernel, y, [time.detach(), 2.0]), call(kernel, y, [time, 2.0]))


# the one-shot functions lacked their classes' factor_dtype: "unexpected keyword argument 'factor_dtype'"
@pytest.mark.parametrize(("one_shot", "build"), [
    (lambda x, y, xt, **kw: predict.gradient_flow(NET, x, y, xt, t=[0.5, 2.0], **kw),
     lambda x, y, xt, **kw: predict.GradientFlow(NET, x, y, **kw).predict(xt, t=[0.5, 2.0])),
    (lambda x, y, xt, **kw: predict.gp_posterior(NET, x, y, xt, kernel="ntkgp", noise=0.1, **kw),
     lambda x, y, xt, **kw: predict.GPPosterior(NET, x, y, kernel="ntkgp", noise=0.1, **kw).predict(xt)),
    (lambda x, y, xt, **kw: predict.gp_posterior(NET, x, y, xt, kernel="ntk", **kw),
     lambda x, y, xt, **kw: predict.GPPosterior(NET, x, y, kernel="ntk", **kw).predict(xt)),
], ids=["gradient_flow", "gp_posterior", "gp_posterior_ntk"])
def test_one_shot_predictors_take_factor_dtype(one_shot, build):
    x, y, xt = _x(), _x(6, 2, seed=1), _x(3, seed=2)
    single, reference = one_shot(x, y, xt, factor_dtype=torch.float32), build(x, y, xt, factor_dtype=torch.float32)
    assert torch.equal(single.mean, reference.mean) and torch.equal(single.covariance, reference.covariance)
    assert not torch.equal(single.mean, one_shot(x, y, xt).mean)   # float32 factors: rounded differently
    with pytest.raises(ValueError, match=r"factor_dtype must be torch\.float32 or torch\.float64"):
        one_shot(x, y, xt, factor_dtype=torch.float16)


def test_gradient_flow_predict_takes_times_by_keyword_only():
    """neural-tangents' predict_fn(t, x_test), ported as flow.predict(None, x_test): the test points were
    read as a (M, d) grid of times and the training points predicted at them, without an error."""
    flow = predict.GradientFlow(NET, _x(), _x(6, 1)[:, 0])
    x_test = _x(3, seed=2).abs()
    with pytest.raises(TypeError, match="positional argument"):
        flow.predict(None, x_test)
    with pytest.raises(TypeError, match="positional argument"):
        flow.predict(x_test, 1.0)
    assert flow.predict(x_test, t=1.0).mean.shape == (3,)


def test_the_unresolved_direction_warning_names_a_diag_reg_that_resolves_them():
    """The warning said "Add diag_reg (e.g. 1e-6)" whatever the kernel: a float32-factored erf kernel of
    300 points, which already had diag_reg=1e-3, still dropped 173 directions at t = inf and was 5 % off
    float64. It now names the diag_reg that lifts every eigenvalue to twice the null tolerance N ε λ_max
    (8e-3 here, relative to trace/N; absolute with diag_reg_absolute_scale=True), and taking it silences
    the warning and gives the float64 answer at that diag_reg to 1e-3 (measured 8e-5 at 1e-2)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(305, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(-1))[:300]
    net = ntkgp.mlp(3, "erf", 1.0, 0.1)
    kwargs = dict(t=math.inf, compute_cov=False)
    with pytest.warns(RuntimeWarning, match="count as untrained") as said:
        predict.GradientFlow(net, x[:300].float(), y.float(), diag_reg=1e-3,
                             factor_dtype=torch.float32).predict(x[300:].float(), **kwargs)
    found = re.search(r"raise it, to about (\S+) or more \(relative to trace/N, the default scale; (\S+) with "
                      r"diag_reg_absolute_scale=True\)", str(said[0].message))
    assert found is not None, str(said[0].message)
    relative, absolute = float(found.group(1)), float(found.group(2))
    assert 1e-3 < relative < 1e-1   # the 1e-3 given fell short, and the advice is not a sledgehammer
    for reg, is_absolute in ((relative, False), (absolute, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mean = predict.GradientFlow(net, x[:300].float(), y.float(), diag_reg=reg,
                                        diag_reg_absolute_scale=is_absolute,
                                        factor_dtype=torch.float32).predict(x[300:].float(), **kwargs).mean
        exact = predict.gradient_flow(net, x[:300], y, x[300:], diag_reg=reg, diag_reg_absolute_scale=is_absolute,
                                      **kwargs).mean
        assert float((mean.double() - exact).abs().max()) < 1e-3 * float(exact.abs().max())


def test_gradient_flow_s_learning_rate_and_eigensystem_refuse_changed_hyperparameters():
    """``GradientFlow.max_learning_rate`` and ``eigensystem`` come from the training kernel cached at
    construction; after ``net[0].weight_var = 8`` they still gave the old model's (0.902 where a new flow
    gives 0.238: training at it diverges), while ``predict`` refuses. Both refuse too, and give the same
    values again once the variance is put back."""
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 2.0, 0.1))
    x = _x(10, 2)
    y = torch.sin(x.sum(-1))
    flow = predict.GradientFlow(net, x, y)
    rate, values = flow.max_learning_rate, flow.eigensystem.values.clone()
    net[0].weight_var = 8.0
    assert predict.GradientFlow(net, x, y).max_learning_rate < 0.5 * rate   # what the stale value hid
    for read in (lambda: flow.max_learning_rate, lambda: flow.eigensystem):
        with pytest.raises(ValueError, match="hyperparameters changed"):
            read()
    net[0].weight_var = 2.0
    assert flow.max_learning_rate == rate and torch.equal(flow.eigensystem.values, values)
