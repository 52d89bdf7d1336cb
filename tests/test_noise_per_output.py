"""Observation noise per training point and output, ``(N, k)`` for ``(N, k)`` targets: output ``j`` is
an independent GP with ``K + diag(σ²[:, j])``, checked against the dense formulas in numpy/scipy,
against GPyTorch's batch of ``k`` independent exact GPs with ``FixedNoiseGaussianLikelihood``, and
against refits with a point left out."""

from __future__ import annotations

import copy
import warnings

import gpytorch
import numpy as np
import pytest
import scipy.stats
import torch

import ntkgp
from ntkgp import bayes, predict

N, M, K = 12, 7, 3


def _data(k: int = K, n: int = N):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(M, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    # levels 0.01, 0.1, 1 (times 1 to 2 per point): each output's posterior far from the others'
    noise = torch.logspace(-2, 0, k, dtype=torch.float64) * (1 + torch.rand(n, k, generator=g, dtype=torch.float64))
    return x, y, xt, noise


def _net():
    return ntkgp.mlp(2, "erf", weight_var=2.0, bias_var=0.1)


def _dense(net, x, xt, kernel):
    with torch.no_grad():
        pick = (lambda s: s.ntk.numpy()) if kernel == "ntkgp" else (lambda s: s.nngp.numpy())
        return (pick(net.kernel(x, ntk=True)), pick(net.kernel(xt, x, ntk=True)), pick(net.kernel(xt, ntk=True)))


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp"])
def test_each_output_is_the_dense_formula_with_its_own_noise(kernel):
    """``μ_j = K*d (K + diag σ²_j)⁻¹ y_j``, ``Σ_j = K** − K*d (K + diag σ²_j)⁻¹ Kd*`` by numpy's solve,
    covariances ``(M, M, k)`` (output axis last, as the mean's), marginal variances ``(M, k)``."""
    x, y, xt, noise = _data()
    net = _net()
    kdd, ktd, ktt = _dense(net, x, xt, kernel)
    out = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=noise)
    diag = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=noise, compute_cov="diag")
    assert out.per_output and diag.per_output
    assert out.mean.shape == (M, K) and out.covariance.shape == (M, M, K) and diag.marginal.shape == (M, K)
    for j in range(K):
        c = kdd + np.diag(noise[:, j].numpy())
        cov = ktt - ktd @ np.linalg.solve(c, ktd.T)
        np.testing.assert_allclose(out.mean[:, j].numpy(), ktd @ np.linalg.solve(c, y[:, j].numpy()),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.covariance[..., j].numpy(), cov, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(diag.variance[:, j].numpy(), np.diag(cov), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.variance, diag.variance, rtol=1e-12, atol=1e-14)
    # the levels differ by 10x between outputs: one shared covariance could not be within 1e-3 of all
    spread = (out.covariance[..., 0] - out.covariance[..., -1]).abs().max()
    assert float(spread) > 1e-2
    low, high = out.interval()
    torch.testing.assert_close(high - low, 4 * out.variance.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.mean.shape, low.shape)


def test_agrees_with_gpytorch_batch_independent_exact_gps():
    """GPyTorch's batch of ``k`` independent exact GPs (``batch_shape=[k]``), each with
    ``FixedNoiseGaussianLikelihood`` of its own column of noise and ntkgp's ``NNGPKernel``: its own
    solves give the same means and covariances (``covariance.permute(2, 0, 1)``)."""
    x, y, xt, noise = _data()
    net = _net()
    batch = torch.Size([K])

    class Independent(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise.mT.contiguous(), batch_shape=batch)
            super().__init__(x.expand(K, N, 3), y.mT.contiguous(), likelihood)
            self.mean_module = gpytorch.means.ZeroMean(batch_shape=batch)
            self.covar_module = ntkgp.NNGPKernel(copy.deepcopy(net), batch_shape=batch)

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(inputs), self.covar_module(inputs))

    model = Independent().double().eval()
    with torch.no_grad(), gpytorch.settings.fast_computations(False, False, False):
        theirs = model(xt.expand(K, M, 3))
    ours = predict.gp_posterior(net, x, y, xt, kernel="nngp", noise=noise)
    torch.testing.assert_close(ours.mean.mT, theirs.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.covariance.permute(2, 0, 1), theirs.covariance_matrix, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.variance.mT, theirs.variance, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp"])
def test_evidence_and_leave_one_out_per_output(kernel):
    """``log p(Y) = Σ_j log N(y_j; 0, K + diag σ²_j)`` by scipy; leaving point ``i`` out of output
    ``j`` is a refit on the others, predicting ``y_ij`` with its noise ``σ²_ij`` added."""
    x, y, _, noise = _data()
    net = _net()
    post = predict.GPPosterior(net, x, y, kernel=kernel, noise=noise)
    kdd, _, _ = _dense(net, x, x, kernel)
    expected = sum(scipy.stats.multivariate_normal(np.zeros(N), kdd + np.diag(noise[:, j].numpy())).logpdf(
        y[:, j].numpy()) for j in range(K))
    assert post.log_marginal_likelihood() == pytest.approx(expected, rel=1e-12)
    mean, variance = post.leave_one_out()
    assert mean.shape == variance.shape == (N, K)
    density = 0.0
    for i in range(N):
        keep = torch.arange(N) != i
        refit = predict.gp_posterior(net, x[keep], y[keep], x[i:i + 1], kernel=kernel, noise=noise[keep])
        torch.testing.assert_close(mean[i], refit.mean[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(variance[i], refit.covariance[0, 0] + noise[i], rtol=1e-9, atol=0)
        density += float(scipy.stats.norm(refit.mean[0], (refit.covariance[0, 0] + noise[i]).sqrt()).logpdf(y[i]).sum())
    assert post.leave_one_out_log_density() == pytest.approx(density, rel=1e-10)


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp", "ntk"])
def test_equal_columns_are_the_noise_per_point_bit_for_bit(kernel):
    """``noise[:, None].expand(N, k)`` (and a per-output constant of one level) is the single
    factorization of the ``(N,)`` noise (``"ntk"`` included): the same numbers, bit for bit, and a
    covariance shared by the outputs."""
    x, y, xt, noise = _data()
    net = _net()
    per_point = noise[:, 0]
    constant = torch.full((N, K), 0.3, dtype=torch.float64)
    for given, same in [(per_point[:, None].expand(N, K), per_point), (constant, 0.3)]:
        ours = predict.GPPosterior(net, x, y, kernel=kernel, noise=given)
        theirs = predict.GPPosterior(net, x, y, kernel=kernel, noise=same)
        a, b = ours.predict(xt), theirs.predict(xt)
        assert not a.per_output and a.covariance.shape == (M, M)
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.covariance, b.covariance, rtol=0, atol=0)
        if kernel != "ntk":
            assert ours.log_marginal_likelihood() == theirs.log_marginal_likelihood()


def test_noise_per_output_as_a_list_or_array_or_integers():
    """The same float64 values, bit for bit, from nested lists, an array (a transposed one, which
    torch would not wrap as it is, included) and integers (converted as for ``(N,)`` noise)."""
    x, y, xt, noise = _data()
    net = _net()
    reference = predict.gp_posterior(net, x, y, xt, noise=noise)
    for given in (noise.tolist(), noise.numpy(), np.asfortranarray(noise.numpy())):
        got = predict.gp_posterior(net, x, y, xt, noise=given)
        torch.testing.assert_close(got.mean, reference.mean, rtol=0, atol=0)
        torch.testing.assert_close(got.covariance, reference.covariance, rtol=0, atol=0)
    counts = torch.arange(1, N * K + 1, dtype=torch.float64).reshape(N, K)
    torch.testing.assert_close(predict.gp_posterior(net, x, y, xt, noise=counts.long()).mean,
                               predict.gp_posterior(net, x, y, xt, noise=counts).mean, rtol=0, atol=0)


def test_a_level_per_output_is_spelled_expand():
    """One variance per output is ``torch.tensor(levels, dtype=torch.float64).expand(N, k)``: each
    output is the ``(N, 1)`` posterior of its own scalar noise."""
    x, y, xt, _ = _data()
    net = _net()
    levels = [0.01, 0.1, 1.0]
    out = predict.gp_posterior(net, x, y, xt, noise=torch.tensor(levels, dtype=torch.float64).expand(N, K))
    for j, level in enumerate(levels):
        alone = predict.gp_posterior(net, x, y[:, j:j + 1], xt, noise=level)
        torch.testing.assert_close(out.mean[:, j], alone.mean[:, 0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.covariance[..., j], alone.covariance, rtol=1e-12, atol=1e-14)


def test_a_vector_is_always_one_noise_per_point_even_where_n_equals_k():
    """With ``N == k`` a vector is one variance per point (never per output, unguessed): it equals
    ``noise[:, None].expand(N, k)``, not ``noise.expand(N, k)``."""
    x, y, xt, noise = _data(k=N)
    net = _net()
    vector = noise[:, 0]
    got = predict.gp_posterior(net, x, y, xt, noise=vector)
    per_point = predict.gp_posterior(net, x, y, xt, noise=vector[:, None].expand(N, N))
    per_output = predict.gp_posterior(net, x, y, xt, noise=vector.expand(N, N))
    torch.testing.assert_close(got.mean, per_point.mean, rtol=0, atol=0)
    assert float((got.mean - per_output.mean).abs().max()) > 1e-3


def test_bad_noise_per_output_is_refused_before_the_kernels(monkeypatch):
    x, y, _, noise = _data()
    net = _net()

    def fail(*args, **kwargs):
        raise AssertionError("the kernel was computed before the noise was checked")

    monkeypatch.setattr(net, "kernel", fail)
    expected = rf"^noise must be a number, one value per training point, shape \({N},\), or one per training " \
               rf"point and output, shape \({N}, {K}\), got shape "
    bad_nan = noise.clone()
    bad_nan[4, 2] = float("nan")
    bad_negative = noise.clone()
    bad_negative[3, 1] = -0.5
    hint = rf"For one variance per output pass noise=torch\.tensor\(levels, dtype=torch\.float64\)\.expand\({N}, {K}\)"
    for bad, message in [(torch.ones(K), expected + rf"\({K},\)\. {hint}\.$"),
                         # one level per output as bayes.predictive_moments takes it: told the spelling too
                         (torch.ones(1, K), expected + rf"\(1, {K}\)\. {hint}\.$"),
                         (noise.mT, expected + rf"\({K}, {N}\)\.$"),
                         (torch.ones(N, K + 1), expected + rf"\({N}, {K + 1}\)\.$"),
                         (torch.ones(N, K, 1), expected + rf"\({N}, {K}, 1\)\.$"),
                         (bad_nan, r"entry \(4, 2\) is nan\.$"),
                         (bad_negative, r"entry \(3, 1\) is -0\.5\.$"),
                         (torch.ones(N, K, dtype=torch.complex128), "must be real"),
                         (torch.ones(N, K, dtype=torch.bool), "must be real"),
                         (noise.numpy().astype(str), "got text")]:
        with pytest.raises(ValueError, match=message):
            predict.GPPosterior(net, x, y, kernel="nngp", noise=bad)
    with pytest.raises(ValueError, match=r"got shape \(12, 3\)"):   # 1-D targets: (N,) only
        predict.GPPosterior(net, x, y[:, 0], kernel="nngp", noise=noise)
    with pytest.raises(ValueError, match=r"^noise of one value per training point and output.*kernel='nngp' and "
                                         r"'ntkgp'"):
        predict.GPPosterior(net, x, y, kernel="ntk", noise=noise)
    with pytest.raises(ValueError, match="read as a number and gets no gradient"):
        predict.GPPosterior(net, x, y, kernel="nngp", noise=noise.clone().requires_grad_())


def test_output_picks_one_output_of_a_per_output_gaussian():
    """``output(j)`` is output ``j``'s Gaussian: its own covariance, or marginal variances."""
    x, y, xt, noise = _data(k=M)
    out = predict.gp_posterior(_net(), x, y, xt, noise=noise)
    one = out.output(2)
    assert not one.per_output
    torch.testing.assert_close(one.covariance, out.covariance[..., 2], rtol=0, atol=0)
    _, variance = bayes.predictive_moments(one, noise=0.5)
    torch.testing.assert_close(variance, out.variance[:, 2] + 0.5, rtol=1e-12, atol=0)
    diag = predict.gp_posterior(_net(), x, y, xt, noise=noise, compute_cov="diag").output(-1)
    torch.testing.assert_close(diag.marginal, out.variance[:, -1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"j must be an integer in \[-7, 7\)"):
        out.output(7)
    # a mean alone is told so (it was sent to output(j), whose Gaussian has no covariance either)
    mean_alone = predict.gp_posterior(_net(), x, y, xt, noise=noise, compute_cov=False)
    with pytest.raises(ValueError, match=r"^This Gaussian has no covariance: predict with compute_cov=True"):
        bayes.predictive_moments(mean_alone)


def _roots(out):
    """Each output's symmetric root ``V diag(√max(λ, 0)) Vᵀ`` by numpy, ``(k, M, M)``."""
    roots = []
    for j in range(out.covariance.shape[-1]):
        lam, v = np.linalg.eigh(out.covariance[..., j].numpy())
        roots.append((v * np.sqrt(np.clip(lam, 0, None))) @ v.T)
    return np.stack(roots)


@pytest.mark.parametrize("num_draws", [4, 20000])   # fewer draws than points (V (√λ ⊙ Vᵀz)) and more (R z)
def test_sample_outputs_draws_each_output_from_its_own_covariance(num_draws):
    """Draws ``(S, M, k)``, output ``j``'s ``μ_j + R_j z_j`` with ``R_j`` the symmetric root of its own
    covariance and ``z_j`` the normals a shared covariance gives output ``j`` (``z[:, j]`` of numpy's
    ``default_rng(seed).standard_normal((S, k, M))``): checked against numpy's roots, and, by moments, against the
    analytic ``N(μ_j, Σ_j)`` of each output. It refused such a Gaussian, one output at a time by ``output(j)``."""
    x, y, xt, noise = _data()
    out = predict.gp_posterior(_net(), x, y, xt, noise=noise)
    draws = bayes.sample_outputs(out, num_draws, seed=3)
    assert draws.shape == (num_draws, M, K) and draws.dtype == torch.float64
    torch.testing.assert_close(bayes.sample_outputs(out, num_draws, seed=3), draws, rtol=0, atol=0)   # reproducible
    assert not torch.equal(bayes.sample_outputs(out, num_draws, seed=4), draws)
    z = np.random.default_rng(3).standard_normal((num_draws, K, M))   # draw-major: (S, k, M)
    expected = np.einsum("jab,sjb->saj", _roots(out), z) + out.mean.numpy()
    # eigenvectors of 7 x 7 covariances (entries <= 0.7) in float64, and one product: rounding ~1e-15
    np.testing.assert_allclose(draws.numpy(), expected, rtol=0, atol=1e-12)
    if num_draws < 1000:
        return
    s, d = num_draws, draws.numpy()
    mu, cov = out.mean.numpy(), out.covariance.numpy()
    var = np.einsum("iij->ij", cov)                                         # (M, k)
    # sample mean of S draws: z-scores N(0, 1); all 21 below 4.5 except with probability 21 · 6.8e-6 = 1.4e-4
    z_mean = (d.mean(0) - mu) / np.sqrt(var / s)
    assert np.abs(z_mean).max() < 4.5
    for j in range(K):
        empirical = np.cov(d[..., j].T)
        # Var(Σ̂_ab) = (Σ_ab² + Σ_aa Σ_bb) / S for Gaussian draws; 49 z-scores per output (dependent), each
        # beyond 5 with probability 5.7e-7
        sd = np.sqrt((cov[..., j] ** 2 + np.outer(var[:, j], var[:, j])) / s)
        assert np.abs((empirical - cov[..., j]) / sd).max() < 5
    # independent outputs: the correlation of two outputs' draws at a point is ~N(0, 1/S)
    for j, l in ((0, 1), (1, 2), (0, 2)):
        assert abs(np.corrcoef(d[:, 0, j], d[:, 0, l])[0, 1]) < 5 / np.sqrt(s)
    # outputs' covariances differ here (noise 0.01 to 1): output 0's variances below half output 2's (0.05 to
    # 0.38 of them), far beyond the moments' tolerances, so a shared root would have failed above
    assert (var[:, 0] < 0.5 * var[:, 2]).all()


def test_per_output_draws_of_equal_covariances_are_the_shared_draws():
    """A covariance per output whose columns are equal is drawn as the shared covariance is: the same
    normals, and (with ``S >= M``, the root formed) the same products, bit for bit; with ``S < M`` the
    products' order differs, by rounding (~1e-16 of entries ~1). A covariance ``(M, M, 1)`` is drawn as
    a shared one too."""
    x, y, xt, _ = _data()
    shared = predict.gp_posterior(_net(), x, y, xt, noise=0.1)
    assert not shared.per_output
    copies = predict.Gaussian(shared.mean, shared.covariance.unsqueeze(-1).expand(M, M, K).contiguous(),
                              shared.scale, per_output=True)
    for num_draws, tolerance in ((50, 0.0), (3, 1e-14)):
        torch.testing.assert_close(bayes.sample_outputs(copies, num_draws, seed=9),
                                   bayes.sample_outputs(shared, num_draws, seed=9), rtol=0, atol=tolerance)
    one = predict.Gaussian(shared.mean[:, :1], shared.covariance.unsqueeze(-1), shared.scale, per_output=True)
    as_shared = predict.Gaussian(shared.mean[:, :1], shared.covariance, shared.scale)
    torch.testing.assert_close(bayes.sample_outputs(one, 5, seed=2), bayes.sample_outputs(as_shared, 5, seed=2),
                               rtol=0, atol=0)


def test_per_output_covariances_are_checked_and_named_each():
    """Each output's covariance is checked as ``output(j)``'s is (symmetric, positive semi-definite up to
    ``√ε`` of its scale), and a refusal names the output; mismatched shapes and a ``time_index`` (a
    per-output Gaussian has no time axis) are refused."""
    x, y, xt, noise = _data()
    out = predict.gp_posterior(_net(), x, y, xt, noise=noise)
    asymmetric = out.covariance.clone()
    asymmetric[0, 1, 1] += 1e-3
    with pytest.raises(ValueError, match=r"^The covariance of output 1 must be symmetric"):
        bayes.sample_outputs(predict.Gaussian(out.mean, asymmetric, out.scale, per_output=True), 5)
    indefinite = out.covariance.clone()
    indefinite[..., 2] -= 0.1 * torch.eye(M, dtype=torch.float64)   # eigenvalues down to ~ -0.1
    bad = predict.Gaussian(out.mean, indefinite, out.scale, per_output=True)
    with pytest.raises(ValueError, match=r"^Output 2: covariance is not positive semi-definite"):
        bayes.sample_outputs(bad, 5)
    with pytest.raises(ValueError, match=r"^Output 2: covariance is not positive semi-definite"):
        bayes.gaussian_to_inference_data(bad, y[:M], 0.1, num_draws=5)
    diagonal = out.covariance.clone()
    diagonal[..., 2] -= torch.diag(torch.diagonal(diagonal[..., 2]) + 0.1)   # diagonal entries -0.1 in output 2
    with pytest.raises(ValueError, match=r"^covariance of output 2 is not positive semi-definite: a diagonal entry"):
        bayes.predictive_moments(predict.Gaussian(out.mean, diagonal, out.scale, per_output=True))
    with pytest.raises(ValueError, match=r"no time axis.*got time_index=0: pass time_index=None"):
        bayes.select_time(out, 0)
    with pytest.raises(ValueError, match=r"no time axis.*got time_index=-1"):
        bayes.gaussian_to_inference_data(out, y[:M], 0.1, num_draws=5, time_index=-1)
    assert bayes.select_time(out) is out
    with pytest.raises(ValueError, match=r"^A Gaussian with a covariance per output has mean \(M, k\) and covariance "
                                         r"\(M, M, k\), got mean \(7, 3\) and covariance \(7, 7\)"):
        bayes.sample_outputs(predict.Gaussian(out.mean, out.covariance[..., 0], per_output=True), 5)
    with pytest.raises(ValueError, match=r"marginal variances \(M, k\), got mean \(7,\) and marginal"):
        bayes.predictive_moments(predict.Gaussian(out.mean[:, 0], None, None, out.variance, per_output=True))


def test_predictive_moments_of_a_per_output_gaussian():
    """Mean ``(M, k)`` and variances ``diag Σ_j + σ²`` ``(M, k)``, each output its own, for every noise the
    shared path takes (scalar, ``(M,)`` per point, ``(1, k)``, ``(M, 1)``, ``(M, k)``); the marginal
    variances alone (``compute_cov="diag"``) give the same; the metrics score them entrywise."""
    x, y, xt, noise = _data()
    out = predict.gp_posterior(_net(), x, y, xt, noise=noise)
    diag = predict.gp_posterior(_net(), x, y, xt, noise=noise, compute_cov="diag")
    latent = np.stack([np.diag(out.covariance[..., j].numpy()) for j in range(K)], -1)   # (M, k)
    per_point = torch.linspace(0.1, 0.7, M, dtype=torch.float64)
    per_output = torch.tensor([[0.05, 0.2, 0.4]], dtype=torch.float64)
    full = torch.rand(M, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for value, added in ((0.5, 0.5), (per_point, per_point[:, None]), (per_output, per_output),
                         (per_point[:, None], per_point[:, None]), (full, full)):
        for g, rtol in ((out, 0.0), (diag, 1e-10)):   # the diagonal of the covariance, or sums over the data
            mean, variance = bayes.predictive_moments(g, noise=value)
            assert mean.shape == variance.shape == (M, K)
            torch.testing.assert_close(mean, out.mean, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(variance.numpy(), latent + np.asarray(added), rtol=rtol, atol=1e-14)
    with pytest.raises(ValueError, match=r"noise of shape \(3,\) does not fit 7 points of 3 outputs: pass a scalar, "
                                         r"\(7,\) per point, \(1, 3\) per output or \(7, 3\)"):
        bayes.predictive_moments(out, noise=per_output[0])
    with pytest.raises(ValueError, match="does not fit"):
        bayes.predictive_moments(out, noise=full[None])
    mean, variance = bayes.predictive_moments(out, noise=per_output)
    # NLPD of (M, k) entries: the mean of the per-entry log densities, each with its own output's variance
    expected = -scipy.stats.norm.logpdf(y[:M].numpy(), mean.numpy(), np.sqrt(latent + per_output.numpy())).mean()
    assert bayes.nlpd(mean, variance, y[:M]) == pytest.approx(expected, rel=1e-12)


def test_gaussian_to_inference_data_of_a_per_output_gaussian():
    """The export draws each output from its own covariance (:func:`bayes.sample_outputs`' draws for the
    seed), adds the noise per output, and stores the log likelihood per point and output, dims as for
    shared-covariance vector targets."""
    x, y, xt, noise = _data()
    out = predict.gp_posterior(_net(), x, y, xt, noise=noise)
    y_obs = y[:M]
    levels = np.array([[0.01, 0.1, 1.0]])
    s = 4000
    data = bayes.gaussian_to_inference_data(out, y_obs, levels, num_draws=s, num_chains=2, seed=11)
    f = data.posterior["f"]
    assert f.dims == ("chain", "draw", "obs_id", "output") and f.shape == (2, s // 2, M, K)
    assert data.log_likelihood["y"].dims == ("chain", "draw", "obs_id", "output")
    assert data.observed_data["y"].dims == ("obs_id", "output")
    draws = f.values.reshape(s, M, K)
    np.testing.assert_array_equal(draws, bayes.sample_outputs(out, s, seed=11).numpy())
    expected = scipy.stats.norm.logpdf(y_obs.numpy(), draws, np.sqrt(levels))
    np.testing.assert_allclose(data.log_likelihood["y"].values.reshape(s, M, K), expected, rtol=1e-12, atol=1e-12)
    # y_rep - f ~ N(0, σ_j²): the sample variance of S M = 28 000 normals per output, relative sd √(2 / 28 000)
    # = 0.0085, within 5 of them
    residual = data.posterior_predictive["y"].values.reshape(s, M, K) - draws
    np.testing.assert_allclose(residual.var(axis=(0, 1)) / levels[0], 1.0, rtol=5 * np.sqrt(2 / (s * M)))
    again = bayes.gaussian_to_inference_data(out, y_obs, levels, num_draws=s, num_chains=2, seed=11)
    np.testing.assert_array_equal(again.posterior_predictive["y"].values, data.posterior_predictive["y"].values)


def test_output_of_shared_and_time_gaussians():
    """``output(j)`` of a covariance shared by the outputs keeps it, time axes included; a mean of
    1-D targets at several times ``(T, M)`` has no output axis (it is refused, not read as ``k = M``)."""
    x, y, xt, _ = _data()
    net = _net()
    times = torch.tensor([1.0, 10.0], dtype=torch.float64)
    flow = predict.gradient_flow(net, x, y, xt, t=times)
    one = flow.output(1)
    torch.testing.assert_close(one.mean, flow.mean[..., 1], rtol=0, atol=0)
    assert one.covariance is flow.covariance
    diag = predict.gradient_flow(net, x, y, xt, t=times, compute_cov="diag").output(np.int64(-1))
    torch.testing.assert_close(diag.mean, flow.mean[..., -1], rtol=0, atol=0)
    torch.testing.assert_close(diag.marginal, flow.variance, rtol=1e-10, atol=1e-12)
    scalar = predict.gradient_flow(net, x, y[:, 0], xt[:2], t=times)   # mean (2, 2): T == M
    with pytest.raises(ValueError, match=r"got mean \(2, 2\) \(1-D targets\)"):
        scalar.output(0)
    with pytest.raises(ValueError, match="has a mean alone"):
        predict.gradient_flow(net, x, y, xt, t=times, compute_cov=False).output(0)
    with pytest.raises(ValueError, match=r"j must be an integer in \[-3, 3\) for 3 outputs, got True"):
        flow.output(True)


def test_a_singular_output_is_named():
    """A duplicated point with no noise in one output: the refusal names that output's kernel, and
    the output with noise alone (its column as ``(N,)`` noise) is regular."""
    x, y, xt, noise = _data()
    x[5] = x[0]
    noise[:, 1] = 0.0
    with pytest.raises(ValueError, match=r"^The training NNGP kernel with the noise of output 1 is singular"):
        predict.gp_posterior(_net(), x, y, xt, noise=noise)
    predict.gp_posterior(_net(), x, y, xt, noise=noise[:, 2])


def test_float32_outputs_are_judged_each_by_its_own_rounding():
    """The deep erf NNGP (tests/test_edge_predict.py's, σ_w² = 1, σ_b² = 0.1, 30 points) in float32 with
    float32 factors: output 0, ``sin`` with noise 1e-4, is 2.5e-2 off float64's (relative), and alone it
    warns (estimate 5.9 %); beside output 1, 100 times its size with noise 1 (2e-7 off), it was judged by
    the larger output's size and the larger variances, and was silent. Each output is now judged as the
    GP it is: the warning, with output 1 alone still quiet."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(35, 3, generator=gen, dtype=torch.float64)
    net = ntkgp.mlp(50, "erf", 1.0, 0.1)
    y = torch.stack([torch.sin(x[:30].sum(-1)), 100 * torch.cos(x[:30, 0])], -1)
    noise = torch.tensor([1e-4, 1.0], dtype=torch.float64).expand(30, 2)
    exact = predict.gp_posterior(net, x[:30], y, x[30:], noise=noise, compute_cov=False).mean
    said = r"test outputs depend on the kernels' last digits.*float64"
    for compute_cov in (True, "diag", False):
        with pytest.warns(RuntimeWarning, match=said) as warned:
            mean = predict.gp_posterior(net, x[:30].float(), y.float(), x[30:].float(), noise=noise,
                                        compute_cov=compute_cov, factor_dtype=torch.float32).mean
        assert [w.filename for w in warned] == [__file__]   # once, at the caller's line
    error = (mean.double() - exact).abs().amax(0) / exact.abs().amax(0)
    assert float(error[0]) > 1e-2 and float(error[1]) < 1e-5   # what it is about: measured 2.5e-2 and 4e-7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict.gp_posterior(net, x[:30].float(), y[:, 1:].float(), x[30:].float(), noise=1.0, compute_cov=False,
                             factor_dtype=torch.float32)


def test_gp_posterior_refuses_covariances_per_output_beyond_the_memory_before_the_kernels(monkeypatch):
    """gp_posterior checks that the covariance fits before the training kernel; with a noise per
    output it is ``k`` covariances ``(M, M, k)``, which it counted as one: a request of ``k`` times
    the memory went on to the training kernel (minutes at large ``N``) before predict refused it.
    Ten test points: the kernels' own check (Layer.kernel) refuses a training kernel above the memory, and
    with ``M = 7`` the ``N × N`` one (``N = 12``) exceeded two covariances."""
    x, y, _, noise = _data()
    m = 10
    xt = torch.randn(m, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    net = _net()
    one = m * m * 8   # bytes of one (M, M) float64 covariance
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2 * one)   # one fits, K = 3 not
    predict.gp_posterior(net, x, y, xt, noise=noise[:, 0])
    predict.gp_posterior(net, x, y, xt, noise=noise, compute_cov="diag")

    def fail(*args, **kwargs):
        raise AssertionError("the kernel was computed before the memory was checked")

    monkeypatch.setattr(net, "kernel", fail)
    with pytest.raises(ValueError, match=rf"^The \({K} x {m} x {m}\) covariance of {m} test points needs"):
        predict.gp_posterior(net, x, y, xt, noise=noise)


def test_float32_outputs_sharing_a_noise_are_judged_each_by_its_own_size():
    """The same two outputs with one noise, 1e-4: output 0 is 2.7e-2 off float64's (relative), but judged
    together (the largest coefficients against the largest output, output 1's, 100 times its size) the
    estimate read under 1 % and nothing was said. warn_if_imprecise judges each output against its own size
    wherever the outputs' last axis is the coefficients' (every predictor's (..., M, k) outputs)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(35, 3, generator=gen, dtype=torch.float64)
    net = ntkgp.mlp(50, "erf", 1.0, 0.1)
    y = torch.stack([torch.sin(x[:30].sum(-1)), 100 * torch.cos(x[:30, 0])], -1)
    exact = predict.gp_posterior(net, x[:30], y, x[30:], noise=1e-4, compute_cov=False).mean
    with pytest.warns(RuntimeWarning, match=r"test outputs depend on the kernels' last digits.*float64") as warned:
        mean = predict.gp_posterior(net, x[:30].float(), y.float(), x[30:].float(), noise=1e-4, compute_cov=False,
                                    factor_dtype=torch.float32).mean
    assert [w.filename for w in warned] == [__file__]
    error = (mean.double() - exact).abs().amax(0) / exact.abs().amax(0)
    assert float(error[0]) > 1e-2   # what it is about: measured 2.7e-2 (output 1: 3.3e-3)
