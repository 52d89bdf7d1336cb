"""ntkgp.bayes with the inputs a GPyTorch / BoTorch user brings: batched predictions, likelihood outputs,
BoTorch posteriors, float32, non-contiguous and expanded tensors, Gaussians of marginal variances alone, and
the memory check of draws made on a GPU."""

from __future__ import annotations

import math
import warnings

import gpytorch
import numpy as np
import pytest
import torch
from scipy import stats

import ntkgp
from ntkgp import bayes
from ntkgp.predict import Gaussian

pytestmark = pytest.mark.usefixtures("float64_default")


class _BatchGP(gpytorch.models.ExactGP):
    """A plain GPyTorch exact GP with an RBF kernel, batched by ``batch`` (independent models)."""

    def __init__(self, x, y, likelihood, batch=torch.Size()):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(batch_shape=batch),
                                                         batch_shape=batch)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _batched_prediction(b=3, n=10, m=4, dtype=torch.float64):
    """``model(x_test)``, ``likelihood(model(x_test))``, the likelihood's noises ``(b,)`` and the scale of a
    batch of ``b`` GPs fitted to nothing (their initial hyperparameters, noises set apart)."""
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(n, 2, generator=g), torch.randn(m, 2, generator=g)
    y = torch.randn(b, n, generator=g)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([b]))
    model = _BatchGP(x, y, likelihood, torch.Size([b]))
    likelihood.noise = torch.tensor([0.05, 0.2, 0.5]).unsqueeze(-1)[:b]
    model, likelihood = model.to(dtype).eval(), likelihood.to(dtype).eval()
    with torch.no_grad():
        pred = model(xt.to(dtype))
        scale = float(model.covar_module(xt.to(dtype), diag=True).max())
        return pred, likelihood(pred), likelihood.noise.detach(), scale


def test_a_batch_of_gpytorch_predictions_is_taken_one_at_a_time_and_the_refusal_says_so():
    """A batched model's ``model(x)`` (mean ``(b, M)``, covariance ``(b, M, M)``), wrapped as the docs say, has
    the shapes of a Gaussian at ``b`` times. Read with ``time_index=i`` it is the batch's ``pred[i]`` exactly;
    without one the refusal spoke of gradient flow alone, and the hint for the MultivariateNormal itself said
    nothing of batches nor of ``likelihood(model(x))``, whose variances already hold the noise. Both name the
    other reading of a batch of independent models, its members as outputs with a covariance each (tested in
    the next test), which they left out."""
    pred, predictive, noise, scale = _batched_prediction()
    g = Gaussian(pred.mean, pred.covariance_matrix, scale)
    y = torch.linspace(-1, 1, 4)
    for call in (lambda: bayes.sample_outputs(g, 10), lambda: bayes.predictive_moments(g, 0.1),
                 lambda: bayes.gaussian_to_inference_data(g, y, 0.1, num_draws=10)):
        with pytest.raises(ValueError, match=r"leading axes of shape \(3,\): times \(gradient flow at several times\) "
                                             r"or a batch of GPyTorch predictions .* \(time_index=i is the batch's "
                                             r"pred\[i\]\); a batch of b independent models is also taken whole, "
                                             r"as b outputs .*Gaussian\(pred\.mean\.mT, pred\.covariance_matrix"
                                             r"\.permute\(1, 2, 0\), scale=\.\.\., per_output=True\)"):
            call()
    for i in range(3):
        mean, variance = bayes.predictive_moments(g, noise[i], time_index=i)
        # GPyTorch's own predictive moments of batch member i: the same additions, so equal to rounding
        torch.testing.assert_close(mean, predictive.mean[i], rtol=0, atol=0)
        torch.testing.assert_close(variance, predictive.variance[i], rtol=1e-15, atol=0)
        one = Gaussian(pred[i].mean, pred[i].covariance_matrix, scale)
        torch.testing.assert_close(bayes.sample_outputs(g, 50, time_index=i, seed=3),
                                   bayes.sample_outputs(one, 50, seed=3), rtol=0, atol=0)
        reference = -stats.norm(predictive.mean[i].numpy(), predictive.variance[i].sqrt().numpy()).logpdf(y.numpy())
        assert bayes.nlpd(mean, variance, y) == pytest.approx(reference.mean(), rel=1e-13)
    for value in (pred, predictive):
        with pytest.raises(ValueError, match=r"got MultivariateNormal\. .*not likelihood\(model\(x_test\)\), which "
                                             r"holds the noise the exports add; a batch, mean \(b, M\), is taken one "
                                             r"prediction at a time with time_index=i, or, for b independent "
                                             r"models, all at once as b outputs: Gaussian\(pred\.mean\.mT, "
                                             r"pred\.covariance_matrix\.permute\(1, 2, 0\), scale=\.\.\., "
                                             r"per_output=True\)\)"):
            bayes.sample_outputs(value, 10)


def test_other_gpytorch_and_botorch_predictions_are_read_as_they_are_or_refused_by_shape():
    """A BoTorch ``GPyTorchPosterior`` (mean ``(M, 1)``) wraps as one output; a batch of ``k`` independent GPs
    as a covariance per output (``permute(1, 2, 0)``, non-contiguous), its moments GPyTorch's; a
    ``MultitaskMultivariateNormal``'s ``(M k, M k)`` covariance is no ntkgp covariance and is refused by shape,
    interleaved or not, not read."""
    from botorch.posteriors import GPyTorchPosterior

    pred, predictive, noise, scale = _batched_prediction()
    posterior = GPyTorchPosterior(pred[0])
    assert posterior.mean.shape == (4, 1)
    wrapped = Gaussian(posterior.mean, posterior.distribution.covariance_matrix, scale)
    torch.testing.assert_close(bayes.sample_outputs(wrapped, 20, seed=1)[..., 0],
                               bayes.sample_outputs(Gaussian(pred[0].mean, pred[0].covariance_matrix, scale), 20,
                                                    seed=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"got GPyTorchPosterior\. For a NetworkGP"):
        bayes.predictive_moments(posterior)
    per_output = Gaussian(pred.mean.mT, pred.covariance_matrix.permute(1, 2, 0), scale, per_output=True)
    assert not per_output.covariance.is_contiguous()
    mean, variance = bayes.predictive_moments(per_output, noise.mT)   # (b, 1) noises as (1, k), one per output
    torch.testing.assert_close(mean, predictive.mean.mT, rtol=0, atol=0)
    torch.testing.assert_close(variance, predictive.variance.mT, rtol=1e-15, atol=0)
    draws = bayes.sample_outputs(per_output, 30, seed=2)
    for j in range(3):   # output j as batch member j alone, drawn from the normals output j gets
        z = torch.as_tensor(np.random.default_rng(2).standard_normal((30, 3, 4)))   # draw-major: (S, k, M)
        values, vectors = torch.linalg.eigh(pred.covariance_matrix[j])
        root = (vectors * values.clamp_min(0).sqrt()) @ vectors.mT
        expected = (root @ z[:, j].mT).mT + pred.mean[j]
        torch.testing.assert_close(draws[..., j], expected, rtol=0, atol=1e-13 * scale)
    blocks = torch.block_diag(*pred[:2].covariance_matrix)   # task-major: entry (j M + i, j' M + i')
    order = torch.arange(8).view(2, 4).mT.reshape(-1)          # point-major: entry (i k + j, i' k + j')
    for interleaved, cov in ((False, blocks), (True, blocks[order][:, order])):
        tasks = gpytorch.distributions.MultitaskMultivariateNormal(pred[:2].mean.mT, cov, interleaved=interleaved)
        torch.testing.assert_close(tasks.variance, pred[:2].variance.mT, rtol=1e-15, atol=0)   # its layout
        with pytest.raises(ValueError, match=r"mean \(4, 2\) does not match covariance \(8, 8\)"):
            bayes.sample_outputs(Gaussian(tasks.mean, tasks.covariance_matrix), 10)
        with pytest.raises(ValueError, match=r"got MultitaskMultivariateNormal\. For a NetworkGP"):
            bayes.sample_outputs(tasks, 10)


def test_float32_non_contiguous_and_expanded_gaussians_draw_as_their_float64_contiguous_copies():
    """Draws are made in float64 whatever the Gaussian's dtype and layout: a float32 GPyTorch prediction draws as
    its float64 copy up to float32's rounding of the covariance, a sliced covariance and an expanded mean as
    their contiguous copies exactly; predictive moments keep the Gaussian's dtype."""
    pred, _, _, scale = _batched_prediction()
    mean, cov = pred.mean[1], pred.covariance_matrix[1]
    reference = bayes.sample_outputs(Gaussian(mean, cov, scale), 400, seed=5)
    single = bayes.sample_outputs(Gaussian(mean.float(), cov.float(), scale), 400, seed=5)
    assert single.dtype == torch.float64
    # the root of a covariance rounded by ~eps32 * scale moves by ~sqrt(eps32 * scale) at most where it is
    # singular; here (smallest eigenvalue ~1e-3 of a scale ~0.7) by ~1e-6, times normals up to ~4
    assert float((single - reference).abs().max()) < 1e-4
    moments = bayes.predictive_moments(Gaussian(mean.float(), cov.float(), scale), 0.1)
    assert moments[0].dtype == moments[1].dtype == torch.float32
    wide = torch.zeros(8, 8, dtype=torch.float64)
    wide[::2, ::2] = cov
    sliced = Gaussian(torch.stack([mean, -mean], 1)[:, 0], wide[::2, ::2], scale)
    assert not sliced.mean.is_contiguous() and not sliced.covariance.is_contiguous()
    torch.testing.assert_close(bayes.sample_outputs(sliced, 400, seed=5), reference, rtol=0, atol=0)
    flat = torch.full((1,), 0.3, dtype=torch.float64)
    expanded = bayes.sample_outputs(Gaussian(flat.expand(4), cov.mT, scale), 400, seed=5)
    # the same R z, plus another mean: two roundings of draws of size ~5, ~1e-15 each
    torch.testing.assert_close(expanded, reference - mean + 0.3, rtol=0, atol=1e-14)
    diag = Gaussian(mean.unsqueeze(-1).expand(4, 2), None, scale, torch.diagonal(cov))
    got_mean, got_var = bayes.predictive_moments(diag, torch.tensor([[0.1, 0.2]]))
    torch.testing.assert_close(got_mean, diag.mean, rtol=0, atol=0)
    torch.testing.assert_close(got_var, torch.diagonal(cov).unsqueeze(-1) + torch.tensor([[0.1, 0.2]]), rtol=0,
                               atol=0)


def test_draws_on_another_device_are_checked_against_its_memory(monkeypatch):
    """The memory check of the draws counted this machine's memory alone, also for a CUDA covariance, where the
    draws are made (two arrays of their size; the normals are drawn on the CPU, one array there): a request
    that fits in 128 GiB of RAM but not in an 80 GiB card passed it, to fail in torch's allocator after the
    eigendecomposition. There is no GPU here: the check is called with the device a CUDA covariance has."""
    size = 1000 * 4 * 2 * 8   # bytes of 1000 draws of 4 x 2 outputs
    memories = {"cpu": 100 * size, "cuda": int(1.5 * size)}
    asked = []

    def memory(device):
        asked.append(device.type)
        return memories[device.type]

    monkeypatch.setattr(bayes.sampling, "device_memory", memory)
    shape, cuda = torch.Size([4, 2]), torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^num_draws=1000 draws of 4 x 2 outputs need 5\.96e-05 GiB in float64 \(2 "
                                         r"arrays of that size at once: 0\.000119 GiB\), more than the 8\.94e-05 GiB "
                                         r"of cuda:0, where the covariance is and the draws are made"):
        bayes.sampling._check_draws_fit(1000, shape, 1, cuda)
    memories["cuda"] = 2 * size
    bayes.sampling._check_draws_fit(1000, shape, 1, cuda)   # exactly enough
    memories["cpu"] = 3 * size - 1   # the export's three arrays on the CPU, whatever the device
    with pytest.raises(ValueError, match=r"more than this machine's"):
        bayes.sampling._check_draws_fit(1000, shape, bayes.sampling.EXPORT_ARRAYS, cuda)
    asked.clear()
    memories["cpu"] = 2 * size   # a CPU covariance: two arrays there, no other device asked
    g = Gaussian(torch.zeros(4, 2), torch.eye(4))
    assert bayes.sample_outputs(g, 1000).shape == (1000, 4, 2)
    assert set(asked) == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_covariance_is_refused_beyond_the_card(monkeypatch):   # pragma: no cover - no GPU in CI
    g = Gaussian(torch.zeros(4, 2, device="cuda"), torch.eye(4, device="cuda"))
    size = 1000 * 4 * 2 * 8
    monkeypatch.setattr(bayes.sampling, "device_memory",
                        lambda device: int(1.5 * size) if device.type == "cuda" else 100 * size)
    with pytest.raises(ValueError, match="of cuda:0, where the covariance is"):
        bayes.sample_outputs(g, 1000)
    assert bayes.sample_outputs(g, 500).device.type == "cuda"


def _gp(k=None, noise=0.5, n=30):
    """The depth-2 erf mlp's NNGP posterior at ``n`` standard-normal points in 2-D (torch seed 0) with
    ``y = sin(2 x₁) + x₂²/2`` plus noise (``k`` columns, each a noise of its own, for ``k``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    f = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2 / 2
    if k is None:
        y = f + math.sqrt(noise) * torch.randn(n, generator=g)
    else:
        noise = torch.linspace(0.2, noise, k).expand(n, k)
        y = f.unsqueeze(-1) + noise.sqrt() * torch.randn(n, k, generator=g)
    return ntkgp.predict.GPPosterior(ntkgp.mlp(2, "erf", 2.0, 0.1), x, y, noise=noise), x, y, noise


def test_marginal_variances_export_draws_independent_across_points():
    """Exports of a Gaussian with marginal variances alone (compute_cov="diag") were refused, though PSIS-LOO,
    WAIC and LOO-PIT read one point's draws at a time, whose distribution the marginals give. They are drawn
    as the same seed draws Gaussian(mean, diag(σ²)); the log likelihood is scipy's; PSIS-LOO agrees with the
    joint draws' and the exact value within its Monte Carlo and importance-sampling error."""
    post, x, y, noise = _gp()
    full, diag = post.predict(x), post.predict(x, compute_cov="diag")
    az = bayes.inference_data.import_arviz()
    data = bayes.gaussian_to_inference_data(diag, y, noise, num_draws=20000, seed=0)
    assert data.log_likelihood.attrs["draws"] == "independent across points (marginal variances alone)"
    f = data.posterior["f"].values.reshape(20000, 30)
    as_diagonal = bayes.sample_outputs(Gaussian(diag.mean, torch.diag_embed(diag.marginal), diag.scale), 20000,
                                       seed=0)
    np.testing.assert_allclose(f, as_diagonal.numpy(), rtol=0, atol=1e-14 * full.scale)
    log_lik = data.log_likelihood["y"].values.reshape(20000, 30)
    np.testing.assert_allclose(log_lik, stats.norm(f, math.sqrt(noise)).logpdf(y.numpy()), rtol=1e-12, atol=0)
    # each point's draws N(μ_i, σ_i²): the sample moments within ~5 standard errors of 20 000 draws
    np.testing.assert_allclose(f.mean(0), diag.mean.numpy(), atol=5 * float(diag.marginal.max()) ** 0.5 / 141)
    np.testing.assert_allclose(f.var(0), diag.marginal.numpy(), rtol=5 * math.sqrt(2 / 20000))
    joint = bayes.gaussian_to_inference_data(full, y, noise, num_draws=20000, seed=0)
    assert "draws" not in joint.log_likelihood.attrs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Pareto k above 0.7 at a few points: the estimate is still compared
        marginal_loo, joint_loo = az.loo(data).elpd_loo, az.loo(joint).elpd_loo
    # measured: −66.33 (marginal) and −66.47 (joint), seeds 1 and 2: −66.26 / −66.57, −65.63 / −65.96; the
    # exact value −67.17. Draws of the same seed differ (R z against σ z), so the two differ by Monte Carlo
    # error alone (±0.4 across seeds); both lie within PSIS's ~1 of the exact value
    assert abs(marginal_loo - joint_loo) < 1.0
    exact = post.leave_one_out_log_density()
    assert exact == pytest.approx(-67.1697, abs=1e-3)
    assert abs(marginal_loo - exact) < 1.5
    with pytest.raises(ValueError, match=r"joint draws need the covariance, predict with compute_cov=True\. "
                                         r"\(gaussian_to_inference_data takes the marginal variances"):
        bayes.sample_outputs(diag, 10)



def test_the_psis_loo_figures_of_the_export_docstring():
    """gaussian_to_inference_data's docstring quoted −166.5 against an exact −356.3 (noise 0.01) and −64.50 against
    −64.62 (noise 0.5) for a setup that, as it was stated, gives exact values of −250.8 and −67.17 (the docs page
    showed both −64.62 and −67.17 for it): the figures are those of this setup, ``_gp``'s. The estimates are of
    seeded draws; PSIS is a smooth function of them, so they are pinned to their quoted digits."""
    az = bayes.inference_data.import_arviz()
    for noise, estimate, exact, k_max, bad in ((0.01, -112.4, -250.80, 2.76, 18), (0.5, -66.47, -67.17, None, None)):
        post, x, y, _ = _gp(noise=noise)
        assert post.leave_one_out_log_density() == pytest.approx(exact, abs=0.005)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the Pareto k warning, which the docstring quotes
            loo = az.loo(bayes.gaussian_to_inference_data(post.predict(x), y, noise, num_draws=20000, seed=0))
        assert loo.elpd_loo == pytest.approx(estimate, abs=0.05 if noise == 0.01 else 0.005)
        if k_max is not None:
            assert float(loo.pareto_k.max()) == pytest.approx(k_max, abs=0.005)
            assert int((loo.pareto_k > 0.7).sum()) == bad

def test_marginal_variances_export_per_output_with_times_and_refusals():
    """A covariance per output's marginal variances (M, k) draw each output with its own; gradient flow's marginal
    variances at several times export at one time as the full covariance's diagonal does; marginal variances
    below the rounding allowance are refused as the covariance's diagonal is; the memory check counts the
    export's three arrays."""
    post, x, y, noise = _gp(k=3, n=12)
    diag = post.predict(x[:5], compute_cov="diag")
    assert diag.per_output and diag.marginal.shape == (5, 3)
    data = bayes.gaussian_to_inference_data(diag, y[:5], noise[:5], num_draws=200, seed=4)
    f = data.posterior["f"].values.reshape(200, 5, 3)
    dense = torch.stack([torch.diag(diag.marginal[:, j]) for j in range(3)], -1)
    expected = bayes.sample_outputs(Gaussian(diag.mean, dense, diag.scale, per_output=True), 200, seed=4)
    np.testing.assert_allclose(f, expected.numpy(), rtol=0, atol=1e-14 * diag.scale)
    np.testing.assert_allclose(data.log_likelihood["y"].values.reshape(200, 5, 3),
                               stats.norm(f, noise[:5].sqrt().numpy()).logpdf(y[:5].numpy()), rtol=1e-12)

    torch.manual_seed(1)
    xs, ys, xt = torch.randn(10, 2), torch.randn(10), torch.randn(6, 2)
    flow = ntkgp.predict.GradientFlow(ntkgp.mlp(1, "erf", 2.0, 0.1, width=8), xs, ys)
    times = torch.tensor([0.5, 3.0])
    marginal = flow.predict(xt, t=times, compute_cov="diag")
    data = bayes.gaussian_to_inference_data(marginal, torch.zeros(6), 0.1, num_draws=50, time_index=-1, seed=2)
    assert data.log_likelihood.attrs["time_index"] == "1"
    at = flow.predict(xt, t=3.0)
    expected = bayes.sample_outputs(Gaussian(at.mean, torch.diag_embed(at.variance), at.scale), 50, seed=2)
    np.testing.assert_allclose(data.posterior["f"].values.reshape(50, 6), expected.numpy(), rtol=0,
                               atol=1e-12 * at.scale)

    bad = Gaussian(torch.zeros(3), None, 1.0, torch.tensor([1.0, -1e-3, 1.0]))
    with pytest.raises(ValueError, match=r"covariance is not positive semi-definite: a diagonal entry is -0\.001"):
        bayes.gaussian_to_inference_data(bad, torch.zeros(3), 0.1, num_draws=10)
    rounding = Gaussian(torch.zeros(3), None, 1.0, torch.tensor([1.0, -1e-12, 1.0]))   # clamped to 0: f_1 = μ_1
    data = bayes.gaussian_to_inference_data(rounding, torch.zeros(3), 0.1, num_draws=10)
    assert np.all(data.posterior["f"].values[..., 1] == 0)
    with pytest.raises(ValueError, match="mean or marginal variances contain NaN"):
        bayes.gaussian_to_inference_data(Gaussian(torch.zeros(2), None, 1.0, torch.tensor([1.0, math.nan])),
                                         torch.zeros(2), 0.1, num_draws=10)


def test_marginal_export_is_refused_beyond_the_memory(monkeypatch):
    size = 1000 * 4 * 8
    monkeypatch.setattr(bayes.sampling, "device_memory", lambda device: 3 * size - 1)
    g = Gaussian(torch.zeros(4), None, 1.0, torch.ones(4))
    with pytest.raises(ValueError, match=r"\(3 arrays of that size at once"):
        bayes.gaussian_to_inference_data(g, torch.zeros(4), 0.1, num_draws=1000)
    monkeypatch.setattr(bayes.sampling, "device_memory", lambda device: 3 * size)
    assert bayes.gaussian_to_inference_data(g, torch.zeros(4), 0.1, num_draws=1000).posterior["f"].shape == (1, 1000,
                                                                                                             4)


def test_more_draws_of_a_seed_begin_with_the_fewer_draws():
    """sample_outputs(g, 100, seed=0)[:50] was no prefix of sample_outputs(g, 50, seed=0) (1.7 apart at unit
    scale): torch.randn(M, S k) gave each point a run of S k normals, so every draw's normals moved with S.
    Drawn draw by draw now, more draws extend fewer, to the rounding of the products (the root is applied in
    factors for fewer draws than points, formed for more): joint, per output, marginal, and exported."""
    post, x, y, noise = _gp(k=2, n=9)
    shared = post.predict(x[:6])
    assert shared.per_output and shared.mean.shape == (6, 2)
    one = Gaussian(shared.mean[:, 0], shared.covariance[..., 0], shared.scale)
    two = Gaussian(shared.mean, shared.covariance[..., 1], shared.scale)
    for g in (one, two, shared):
        few, many = bayes.sample_outputs(g, 4, seed=7), bayes.sample_outputs(g, 50, seed=7)
        torch.testing.assert_close(many[:4], few, rtol=0, atol=1e-12 * shared.scale)
        torch.testing.assert_close(bayes.sample_outputs(g, 30, seed=7), many[:30], rtol=0, atol=1e-12 * shared.scale)
    diag = post.predict(x[:6], compute_cov="diag")
    for g in (shared, diag):   # f, its noise y_rep and the log likelihood: each (chain, draw, M, k)
        few = bayes.gaussian_to_inference_data(g, y[:6], noise[:6], num_draws=4, seed=3)
        many = bayes.gaussian_to_inference_data(g, y[:6], noise[:6], num_draws=40, seed=3)
        for group, name in (("posterior", "f"), ("posterior_predictive", "y"), ("log_likelihood", "y")):
            np.testing.assert_allclose(many[group][name].values[:, :4], few[group][name].values, rtol=1e-10,
                                       atol=1e-12 * shared.scale)


@pytest.mark.parametrize("flags", [torch.tensor([True, False, True]), np.array([True, False, True]),
                                   [True, False, True], [1.0, np.bool_(False), 1.0]])
def test_boolean_targets_are_refused_with_the_conversion_to_make(flags):
    """Boolean targets were read as 1 and 0 by every metric and export: nlpd(mean, var, y == 1) of a mean
    regressed on ±0.5 targets scored residuals of 0.5 that are none (rmse 0.5 for a perfect mean), where
    NetworkGP refuses boolean train_y and names the conversion. Refused here too, with the fix."""
    g = Gaussian(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    mean = np.array([0.5, -0.5, 0.5])
    fix = r"\.double\(\)" if isinstance(flags, torch.Tensor) else r"np\.asarray\((y|y_obs|mean), dtype=float\)"
    calls = [lambda: bayes.rmse(mean, flags), lambda: bayes.nlpd(mean, 1.0, flags),
             lambda: bayes.crps(mean, 1.0, flags), lambda: bayes.regression_metrics(mean, 1.0, flags),
             lambda: bayes.gaussian_log_density(flags, mean, 1.0),
             lambda: bayes.gaussian_to_inference_data(g, flags, 0.1, num_draws=4),
             lambda: bayes.ensemble_to_inference_data(torch.zeros(2, 3), flags, 0.1)]
    for call in calls:
        with pytest.raises(ValueError, match=rf"got booleans .* convert with [^ ]*{fix}.*one_hot_targets"):
            call()
    with pytest.raises(ValueError, match=rf"got booleans .* convert with [^ ]*{fix} if those are the values meant\.$"):
        bayes.rmse(flags, mean)   # a boolean mean: the conversion alone (no targets of classes to name)
    # integers are numbers: taken as they are (an int64 tensor, not the float one that [1, 0, 1] − 0.5 is)
    assert bayes.rmse(mean + 0.5, torch.tensor([1, 0, 1])) == 0.0 and bayes.rmse(mean + 0.5, np.array([1, 0, 1])) == 0.0


def test_the_boolean_refusal_names_targets_of_classes_that_fit_the_flags_shape():
    """The refusal named one_hot_targets(labels) and accuracy(mean, labels) for booleans of every shape. For the
    usual case, (M,) flags against an (M,) mean, neither works as written: one_hot_targets gives (M, 2) targets
    ("y must have the shape of mean, (4,); got (4, 2)") and accuracy reads a 1-D mean as labels ("must hold
    integer class labels"); ±1 targets were not named. Each recipe now fits its shape, and runs as written."""
    mean = np.array([0.4, -0.3, 0.6, -0.2])   # a one-output mean of ±1 targets: the flags' classes by its sign
    two = np.stack([-mean, mean], 1)           # the mean of one_hot_targets(flags), two outputs
    flags = np.array([True, False, True, False])
    one_hot = np.stack([~flags, flags], 1)
    with pytest.raises(ValueError, match="integer class labels"):
        bayes.accuracy(mean, flags)   # the old recipe, for an (M,) mean
    with pytest.raises(ValueError, match=r"np\.asarray\(y, dtype=float\) \* 2 - 1 for ±1 targets; for two classes "
                                         r"regressed on ntkgp\.bayes\.one_hot_targets\(y\) \(a mean \(M, 2\)\).*"
                                         r"accuracy\(mean, y\)\.$"):
        bayes.rmse(mean, flags)
    with pytest.raises(ValueError, match=r"y\.double\(\) \* 2 - 1 for ±1 targets"):
        bayes.nlpd(mean, 1.0, torch.tensor(flags))
    y = flags   # the recipes, as written: residuals 0.6, 0.7, 0.4, 0.8 against ±1
    assert bayes.rmse(mean, np.asarray(y, dtype=float) * 2 - 1) == pytest.approx(math.sqrt(1.65 / 4), rel=1e-15)
    assert bayes.rmse(mean, torch.tensor(y).double() * 2 - 1) == pytest.approx(math.sqrt(1.65 / 4), rel=1e-15)
    # e_c − 1/2 against ∓(0.4, 0.3, 0.6, 0.2): residuals 0.1, 0.2, 0.1, 0.3 in both columns
    assert bayes.rmse(two, bayes.one_hot_targets(y)) == pytest.approx(math.sqrt(0.15 / 4), rel=1e-14)
    assert bayes.accuracy(two, y) == 1.0
    for y, labels in ((one_hot, r"np\.argmax\(y, -1\)"), (torch.tensor(one_hot), r"y\.int\(\)\.argmax\(-1\)")):
        with pytest.raises(ValueError, match=rf"one-hot classes, .*one_hot_targets\(labels, 2\) .* labels = {labels}, "
                                             r"or use ntkgp\.bayes\.accuracy\(mean, labels\)\.$"):
            bayes.rmse(two, y)
        labels = np.argmax(y, -1) if isinstance(y, np.ndarray) else y.int().argmax(-1)
        assert bayes.rmse(two, bayes.one_hot_targets(labels, 2)) == pytest.approx(math.sqrt(0.15 / 4), rel=1e-14)
        assert bayes.accuracy(two, labels) == 1.0
    with pytest.raises(ValueError, match=r"dtype=float\) \* 2 - 1 for ±1 targets\.$"):   # (M, 1): no one-hot matrix
        bayes.rmse(mean[:, None], flags[:, None])


def test_boolean_draws_and_members_are_refused_and_boolean_labels_stay_accepted():
    """Boolean draws (f_draws, y_draws) and ensemble members were read as 1 and 0 by the exports and by
    ensemble_moments, where a boolean mean is refused by every metric. Class labels, where booleans are the two
    classes, stay accepted."""
    f, y = np.zeros((4, 3)), np.array([0.5, -0.5, 0.5])
    flags = np.array([[True, False, True]] * 4)
    calls = {"f_draws": lambda: bayes.draws_to_inference_data(flags, y, 0.1),
             "y_draws": lambda: bayes.draws_to_inference_data(f, y, 0.1, y_draws=flags),
             "predictions": lambda: bayes.ensemble_to_inference_data(flags, y, 0.1),
             r"predictions\[1\]": lambda: bayes.ensemble_moments([torch.zeros(3), torch.tensor(flags[0])])}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name} must be numbers, got booleans .*values meant\.$"):
            call()
    mean, _ = bayes.ensemble_moments(np.where(flags, 1.0, 0.0))   # the conversion, accepted
    np.testing.assert_array_equal(mean, [1.0, 0.0, 1.0])
    labels = np.array([True, False, True, False])
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert bayes.accuracy(scores, labels) == 0.75
    assert bayes.auroc(scores[:, 1], labels) == 1.0
    torch.testing.assert_close(bayes.one_hot_targets(labels)[:, 1], torch.tensor([0.5, -0.5, 0.5, -0.5],
                                                                                 dtype=torch.float64))
