"""ntkgp.bayes: ArviZ export, metrics, classification as regression."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
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
ROOT = pathlib.Path(__file__).parents[1]


def _regression(n=40, noise=0.1, seed=0, k=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2
    f = torch.sin(x.sum(-1, keepdim=True) * torch.arange(1, (k or 1) + 1))
    y = f + math.sqrt(noise) * torch.randn(f.shape, generator=g)
    return x, (y if k else y[:, 0])


def _net():
    return ntkgp.mlp(2, "erf", 1.5, 0.1)


def _arviz():
    return bayes.inference_data.import_arviz()


def _arviz_1() -> bool:
    """ArviZ 1.x (Python >= 3.12): exports are ``xarray.DataTree``s, ``az.loo`` returns
    ``elpd``/``elpd_i``, and the plots are arviz-plots' (``plot_ppc_dist``, ``var_names=``)."""
    return bayes.arviz_major_version() >= 1


def _groups(data) -> list[str]:
    return list(data.children) if _arviz_1() else data.groups()


# ------------------------------------------------------------------------------ ArviZ export
def test_export_groups_dims_and_log_likelihood_match_scipy(tmp_path):
    x, y = _regression()
    noise = 0.1
    post = ntkgp.predict.gp_posterior(_net(), x, y, x[:15], noise=noise)
    data = bayes.gaussian_to_inference_data(post, y[:15], noise, num_draws=60, num_chains=3, seed=4)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert group in _groups(data)
    pp = data.posterior_predictive["y"]
    assert pp.dims == ("chain", "draw", "obs_id") and pp.shape == (3, 20, 15)
    assert data.observed_data["y"].dims == ("obs_id",)
    np.testing.assert_array_equal(data.observed_data["y"].values, y[:15].numpy())
    f = data.posterior["f"].values                                       # (3, 20, 15)
    expected = stats.norm.logpdf(y[:15].numpy(), loc=f, scale=math.sqrt(noise))
    np.testing.assert_allclose(data.log_likelihood["y"].values, expected, rtol=1e-12, atol=1e-12)
    assert data.log_likelihood.attrs["noise_variance"] == noise
    data.to_netcdf(str(tmp_path / "export.nc"))                         # attributes are netCDF-safe
    reread = _arviz().from_netcdf(str(tmp_path / "export.nc"))
    np.testing.assert_array_equal(reread.log_likelihood["y"].values, data.log_likelihood["y"].values)
    # Same seed, same draws; another seed, other draws.
    again = bayes.gaussian_to_inference_data(post, y[:15], noise, num_draws=60, num_chains=3, seed=4)
    other = bayes.gaussian_to_inference_data(post, y[:15], noise, num_draws=60, num_chains=3, seed=5)
    np.testing.assert_array_equal(again.posterior_predictive["y"].values, pp.values)
    assert not np.allclose(other.posterior["f"].values, f)


def test_posterior_predictive_moments_match_the_gaussian():
    """S = 20000 independent draws: every sample mean, variance and covariance entry is within
    5 Monte-Carlo standard errors of its target (SE of a mean sqrt(v/S); of a sample covariance
    sqrt((Σ_ii Σ_jj + Σ_ij²)/S)). Over ~100 checked numbers a 5-SE miss has probability ~1e-4."""
    x, y = _regression(n=10)
    noise = 0.05
    x_test = torch.linspace(-1, 1, 8).unsqueeze(-1) * torch.tensor([1.0, -0.5]) + 2.5   # beyond the data
    post = ntkgp.predict.gp_posterior(_net(), x, y, x_test, noise=noise)
    s = 20_000
    data = bayes.gaussian_to_inference_data(post, y[:8], noise, num_draws=s, seed=1)
    mean, cov = post.mean.numpy(), post.covariance.numpy()
    f = data.posterior["f"].values.reshape(s, 8)
    y_rep = data.posterior_predictive["y"].values.reshape(s, 8)
    pred_var = np.diag(cov) + noise
    assert np.all(np.abs(y_rep.mean(0) - mean) < 5 * np.sqrt(pred_var / s))
    assert np.all(np.abs(y_rep.var(0) - pred_var) < 5 * np.sqrt(2 / s) * pred_var)
    sample_cov = np.cov(f, rowvar=False)
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / s)
    assert np.all(np.abs(sample_cov - cov) < 5 * se)
    # The posterior is strongly correlated here, so a sampler ignoring correlations would fail.
    corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.abs(corr[np.triu_indices(8, 1)]).max() > 0.5
    # the closed-form predictive moments: diag Σ + σ², for a scalar and a per-point noise
    mu, var = bayes.predictive_moments(post, noise=noise)
    np.testing.assert_allclose(mu.numpy(), mean, rtol=0, atol=0)
    np.testing.assert_allclose(var.numpy(), pred_var, rtol=1e-15)
    per_point = torch.linspace(0.01, 0.08, 8, dtype=torch.float64)
    np.testing.assert_allclose(bayes.predictive_moments(post, noise=per_point)[1].numpy(),
                               np.diag(cov) + per_point.numpy(), rtol=1e-15)
    for bad in (torch.full((8, 1), 0.05), torch.full((7,), 0.05)):   # would broadcast to (8, 8) / fail
        with pytest.raises(ValueError, match="one variance per test point"):
            bayes.predictive_moments(post, noise=bad)
    # a learnable noise (a likelihood's) keeps its gradient: through numpy it came back None, silently
    learnable = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nor "Converting a tensor with requires_grad=True to a scalar"
        bayes.predictive_moments(post, noise=learnable)[1].sum().backward()
    assert float(learnable.grad) == 8.0


def test_predictive_moments_take_per_output_noise_as_the_export_does():
    """A multi-output posterior with one noise variance per output (a multitask likelihood's):
    gaussian_to_inference_data took a (1, k) noise, predictive_moments refused it ("one variance
    per test point"), so the metrics could not be given the variances the export's draws and log
    likelihood use. They are diag Σ + σ_j², (M, k), and the NLPD from them equals the export's
    pointwise log likelihood at the mean (the log density of the observations)."""
    x, y = _regression(n=12, k=2)
    post = ntkgp.predict.gp_posterior(_net(), x, y, x[:5], noise=0.1)
    diagonal = torch.diagonal(post.covariance).unsqueeze(-1)
    per_output = torch.tensor([[0.05, 0.2]], dtype=torch.float64)
    mean, var = bayes.predictive_moments(post, noise=per_output)
    assert var.shape == (5, 2)
    torch.testing.assert_close(var, diagonal + per_output, rtol=1e-15, atol=0)
    full = torch.linspace(0.01, 0.1, 10, dtype=torch.float64).reshape(5, 2)
    torch.testing.assert_close(bayes.predictive_moments(post, noise=full)[1], diagonal + full, rtol=1e-15, atol=0)
    per_point = full[:, :1]
    torch.testing.assert_close(bayes.predictive_moments(post, noise=per_point)[1],
                               (diagonal + per_point).expand(5, 2), rtol=1e-15, atol=0)
    # the (M,) and scalar forms keep their (M,) variance shared by the outputs
    assert bayes.predictive_moments(post, noise=0.1)[1].shape == (5,)
    nlpd = bayes.nlpd(mean, var, y[:5])
    expected = -stats.norm.logpdf(y[:5].numpy(), mean.numpy(), np.sqrt(var.numpy())).mean()
    assert nlpd == pytest.approx(expected, rel=1e-13)
    for bad in (torch.full((1, 3), 0.1), torch.full((2, 2), 0.1), torch.full((1, 1, 2), 0.1)):
        with pytest.raises(ValueError, match=r"per output"):
            bayes.predictive_moments(post, noise=bad)
    with pytest.raises(ValueError, match="one variance per test point"):
        bayes.predictive_moments(ntkgp.predict.gp_posterior(_net(), x, y[:, 0], x[:5], noise=0.1),
                                 noise=torch.full((1, 2), 0.1))


def test_gradient_flow_time_axis_vector_outputs_and_independent_outputs():
    x, y = _regression(k=2)
    net = _net()
    times = torch.tensor([0.5, 5.0, 50.0])
    flow = ntkgp.predict.gradient_flow(net, x, y, x[:6], t=times, learning_rate=1.0)
    assert flow.mean.shape == (3, 6, 2) and flow.covariance.shape == (3, 6, 6)
    single = ntkgp.predict.gradient_flow(net, x, y, x[:6], t=5.0, learning_rate=1.0)
    picked = bayes.select_time(flow, 1)
    torch.testing.assert_close(picked.mean, single.mean)
    torch.testing.assert_close(picked.covariance, single.covariance)
    s = 8000
    data = bayes.gaussian_to_inference_data(flow, y[:6], 0.1, num_draws=s, num_chains=4, time_index=-2)
    f = data.posterior["f"]
    assert f.dims == ("chain", "draw", "obs_id", "output") and f.shape == (4, s // 4, 6, 2)
    assert data.observed_data["y"].dims == ("obs_id", "output")
    draws = f.values.reshape(s, 6, 2)
    np.testing.assert_allclose(draws.mean(0), single.mean.numpy(), atol=5 * math.sqrt(single.variance.max() / s))
    # Outputs get independent noise vectors z (covariance Σ ⊗ I): correlation ~ N(0, 1/S).
    corr = np.corrcoef(draws[:, 0, 0], draws[:, 0, 1])[0, 1]
    assert abs(corr) < 5 / math.sqrt(s)
    with pytest.raises(ValueError, match="time_index"):
        bayes.gaussian_to_inference_data(flow, y[:6], 0.1)
    with pytest.raises(ValueError, match="out of range"):
        bayes.select_time(flow, 3)
    torch.testing.assert_close(bayes.select_time(flow, np.int64(1)).mean, single.mean)
    with pytest.raises(ValueError, match="integer"):
        bayes.select_time(flow, 1.0)
    with pytest.raises(ValueError, match="integer"):
        bayes.select_time(flow, (1, 0))
    with pytest.raises(ValueError, match="no time axis"):
        bayes.select_time(single, 0)


def test_az_loo_matches_the_exact_gaussian_process_loo():
    """PSIS-LOO from posterior draws at the training inputs vs the closed form
    log p(y_i | y_-i) = log N(y_i | y_i − [C⁻¹y]_i/[C⁻¹]_ii, 1/[C⁻¹]_ii), C = K + σ²I
    (Rasmussen & Williams 2006, eq. 5.10–5.12). Measured over seeds 0..4 with 4000 draws:
    |elpd_loo − exact| ≤ 0.17 and pointwise ≤ 0.06; the in-sample lppd is ~6 nats higher, so the
    tolerances (0.5 and 0.2) do tell LOO from a plain in-sample score."""
    az = _arviz()
    x, y = _regression(noise=0.3)
    noise = 0.3
    net = _net()
    post = ntkgp.predict.gp_posterior(net, x, y, x, noise=noise)
    data = bayes.gaussian_to_inference_data(post, y, noise, num_draws=4000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(data, pointwise=True)
    with torch.no_grad():
        c = net.kernel(x, ntk=False).nngp + noise * torch.eye(len(y))
    c_inv = torch.linalg.inv(c)
    loo_var = 1 / c_inv.diagonal()
    loo_mean = y - (c_inv @ y) * loo_var
    exact = stats.norm.logpdf(y.numpy(), loo_mean.numpy(), loo_var.sqrt().numpy())
    elpd, pointwise = (loo.elpd, loo.elpd_i) if _arviz_1() else (loo.elpd_loo, loo.loo_i)
    assert abs(elpd - exact.sum()) < 0.5
    assert np.abs(pointwise.values - exact).max() < 0.2
    lppd = float(np.log(np.exp(data.log_likelihood["y"].values).mean(axis=(0, 1))).sum())
    assert lppd - exact.sum() > 3


def test_arviz_plots_run_on_the_export(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    az = _arviz()
    x, y = _regression()
    post = ntkgp.predict.gp_posterior(_net(), x, y, x, noise=0.1)
    data = bayes.gaussian_to_inference_data(post, y, 0.1, num_draws=200)
    # the plots draw what was exported: 20 predictive densities, the observed one (and, on 0.x,
    # their mean), all finite (a blank figure saves as ~2.4 kB, so the file's size said nothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _arviz_1():
            ppc = az.plot_ppc_dist(data, num_samples=20).viz
            ppc_lines = [*ppc["predictive_dist"]["y"].values.ravel(), ppc["observed_dist"]["y"].item()]
            assert len(ppc_lines) == 21
            pit_lines = az.plot_loo_pit(data, var_names="y").viz["figure"].item().axes[0].get_lines()
            pit_values = np.asarray(az.loo_pit(data, var_names="y")["y"])
        else:
            ppc_lines = [line for line in az.plot_ppc(data, num_pp_samples=20).get_lines()
                         if len(line.get_xdata())]
            assert len(ppc_lines) >= 22 and "Posterior predictive mean" in [line.get_label() for line in ppc_lines]
            pit_lines = az.plot_loo_pit(data, y="y").get_lines()
            pit_values = np.asarray(az.loo_pit(data, y="y"))
    assert pit_lines and all(np.isfinite(np.asarray(line.get_ydata(), float)).all() for line in ppc_lines + pit_lines)
    assert pit_values.shape == (len(y),) and ((pit_values >= 0) & (pit_values <= 1)).all()
    plt.close("all")


def test_ensemble_export_members_are_the_draws():
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(6, 10, generator=g)
    y = torch.randn(10, generator=g)
    noise = torch.tensor([[0.1], [0.2], [0.3], [0.1], [0.2], [0.3]])     # one per member
    data = bayes.ensemble_to_inference_data(preds, y, noise, num_chains=2)
    assert data.posterior["f"].shape == (2, 3, 10)
    np.testing.assert_array_equal(data.posterior["f"].values.reshape(6, 10), preds.numpy())
    expected = stats.norm.logpdf(y.numpy(), preds.numpy(), noise.sqrt().numpy())
    np.testing.assert_allclose(data.log_likelihood["y"].values.reshape(6, 10), expected, rtol=1e-12)
    # (M,) noise on (E, M, k) predictions is one variance per point, shared by the outputs.
    square = torch.randn(6, 3, 3, generator=g)
    per_point = torch.tensor([0.1, 0.2, 0.4])
    data_k = bayes.ensemble_to_inference_data(square, square[0], per_point)
    expected_k = stats.norm.logpdf(square[0].numpy(), square.numpy(), per_point.sqrt().numpy()[:, None])
    np.testing.assert_allclose(data_k.log_likelihood["y"].values.reshape(6, 3, 3), expected_k, rtol=1e-12)
    listed = bayes.ensemble_to_inference_data(list(preds), y, 0.2)
    assert listed.posterior_predictive["y"].shape == (1, 6, 10)
    # A finite ensemble from net.build: (E, n, 1) outputs squeezed to (E, n) for (n,) targets.
    x, yy = _regression(n=12)
    module = ntkgp.mlp(1, "relu", 2.0, 0.1, width=16).build(in_features=2, seed=0, ensemble_size=4)
    with torch.no_grad():
        out = module(x)[..., 0]
    assert bayes.ensemble_to_inference_data(out, yy, 0.5).log_likelihood["y"].shape == (1, 4, 12)
    with pytest.raises(ValueError, match="divide"):
        bayes.ensemble_to_inference_data(preds, y, 0.1, num_chains=4)
    with pytest.raises(ValueError, match="same shape"):
        bayes.ensemble_to_inference_data([preds[0], preds[1, :5]], y, 0.1)


def test_ensemble_moments_is_the_mixture():
    g = torch.Generator().manual_seed(1)
    preds = torch.randn(5, 7, generator=g)
    noise = torch.rand(5, 1, generator=g) + 0.1
    mean, var = bayes.ensemble_moments(preds, noise)
    mixture_second = (preds**2 + noise).mean(0)
    np.testing.assert_allclose(mean, preds.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, (mixture_second - preds.mean(0) ** 2).numpy(), rtol=1e-10)
    wide = torch.randn(5, 7, 3, generator=g)
    _, var_k = bayes.ensemble_moments(wide, torch.full((7,), 0.5))
    np.testing.assert_allclose(var_k, (wide.var(0, unbiased=False) + 0.5).numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="non-negative"):
        bayes.ensemble_moments(preds, -1.0)


def test_export_validates_inputs():
    x, y = _regression(n=10)
    post = ntkgp.predict.gp_posterior(_net(), x, y, x, noise=0.1)
    bad = y.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bayes.gaussian_to_inference_data(post, bad, 0.1)
    with pytest.raises(ValueError, match="shape"):
        bayes.gaussian_to_inference_data(post, y[:5], 0.1)
    with pytest.raises(ValueError, match="positive"):
        bayes.gaussian_to_inference_data(post, y, 0.0)
    with pytest.raises(ValueError, match="compute_cov"):
        bayes.gaussian_to_inference_data(Gaussian(post.mean), y, 0.1)
    with pytest.raises(ValueError, match="num_draws"):
        bayes.sample_outputs(post, 0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        bayes.sample_outputs(Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -0.5]])))
    with pytest.raises(ValueError, match=r"ntkgp\.predict\.Gaussian"):
        bayes.sample_outputs((post.mean, post.covariance))


def test_export_refuses_bad_arguments_before_sampling(monkeypatch):
    """y_obs, noise, num_chains and seed are checked before the eigendecomposition and the draws
    (they were checked after them: 4-25 s wasted at M = 2500); numpy integer seeds are taken (they
    raised a TypeError from torch), negative ones refused up front (numpy's SeedSequence refused
    them only after the draws)."""
    x, y = _regression(n=10)
    post = ntkgp.predict.gp_posterior(_net(), x, y, x, noise=0.1)

    def no_work(*args, **kwargs):
        raise AssertionError("the covariance was factored before the arguments were checked")

    monkeypatch.setattr(bayes.sampling, "_covariance_root", no_work)
    bad = y.clone()
    bad[3] = float("nan")
    for kwargs, message in ((dict(y_obs=y[:5], noise=0.1), "shape"), (dict(y_obs=bad, noise=0.1), "NaN"),
                            (dict(y_obs=y, noise=-1.0), "positive"),
                            (dict(y_obs=y, noise=torch.ones(3)), "noise of shape"),
                            (dict(y_obs=y, noise=0.1, num_chains=7), "divide"),
                            (dict(y_obs=y, noise=0.1, num_chains=0), "num_chains"),
                            (dict(y_obs=y, noise=0.1, seed=-1), "seed"), (dict(y_obs=y, noise=0.1, seed=1.5), "seed")):
        with pytest.raises(ValueError, match=message):
            bayes.gaussian_to_inference_data(post, num_draws=100, **kwargs)
    for seed in (-1, True, 2**64):
        with pytest.raises(ValueError, match="seed"):
            bayes.sample_outputs(post, 10, seed=seed)
    monkeypatch.undo()
    draws = bayes.sample_outputs(post, 10, seed=np.int64(3))
    torch.testing.assert_close(draws, bayes.sample_outputs(post, 10, seed=3), rtol=0, atol=0)
    idata = bayes.gaussian_to_inference_data(post, y, 0.1, num_draws=10, seed=np.int64(3))
    np.testing.assert_array_equal(idata.posterior["f"].values[0], draws.numpy())


def test_gaussian_draws_take_numpy_generators_as_the_other_exports_do():
    """draws_to_inference_data and ensemble_to_inference_data took a numpy Generator or SeedSequence,
    gaussian_to_inference_data and sample_outputs refused them ("seed must be a non-negative
    integer"), so one rng could not be threaded through a workflow. A SeedSequence gives the same
    draws each time, a Generator new ones (it advances); integer seeds keep their draws; the draws
    are those of the Gaussian (mean and covariance within Monte-Carlo error)."""
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6, 0.2], [0.6, 1.0, 0.3], [0.2, 0.3, 0.5]], dtype=torch.float64)
    g, y = Gaussian(mean, cov), np.array([1.2, -1.5, 0.0])

    def export(seed):
        data = bayes.gaussian_to_inference_data(g, y, 0.2, num_draws=4000, seed=seed)
        return data.posterior["f"].values[0], data.posterior_predictive["y"].values[0]

    f1, y1 = export(np.random.SeedSequence(11))
    f2, y2 = export(np.random.SeedSequence(11))
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(y1, y2)
    rng = np.random.default_rng(11)
    f3, _ = export(rng)
    f4, _ = export(rng)
    f5, _ = export(np.random.default_rng(11))
    np.testing.assert_array_equal(f3, f5)
    assert not np.array_equal(f3, f4)
    # 4000 draws: the mean's standard error is at most sqrt(1/4000) = 0.016, 5 of them 0.08; the
    # covariance entries' at most sqrt(2/4000) = 0.022, 5 of them 0.11
    for f in (f1, f3, f4):
        np.testing.assert_allclose(f.mean(0), mean.numpy(), atol=0.08)
        np.testing.assert_allclose(np.cov(f.T), cov.numpy(), atol=0.11)
    # the noise draws: y_rep - f ~ N(0, 0.2) independently of f (standard errors 0.0045 and 0.016)
    np.testing.assert_allclose((y1 - f1).var(0), 0.2, atol=0.03)
    assert abs(np.corrcoef((y1 - f1)[:, 0], f1[:, 0])[0, 1]) < 0.08
    torch.testing.assert_close(bayes.sample_outputs(g, 50, seed=np.random.SeedSequence(4)),
                               bayes.sample_outputs(g, 50, seed=np.random.SeedSequence(4)), rtol=0, atol=0)
    np.testing.assert_array_equal(export(3)[0], bayes.sample_outputs(g, 4000, seed=3).numpy())


def test_draws_too_many_to_hold_are_refused_before_the_eigendecomposition(monkeypatch):
    """num_draws=1e12 (three points, two outputs: 44 TiB of draws) failed in torch's allocator only
    after the eigendecomposition, O(M³) work for nothing (seconds at M ~ 2000); 2**62 draws, beyond
    what torch's sizes count, with its overflow errors. Both are refused first: beyond the machine's
    memory where it is known (also by the ArviZ export, before its own checks) and, where it is not,
    when the draws' standard normals fail to allocate."""
    g = Gaussian(torch.zeros(3, 2, dtype=torch.float64), torch.eye(3, dtype=torch.float64))

    def no_work(*args, **kwargs):
        raise AssertionError("the covariance was factored before num_draws was checked")

    monkeypatch.setattr(bayes.sampling, "_covariance_root", no_work)
    with pytest.raises(ValueError, match=r"^num_draws=1000000000000 draws of 3 x 2 outputs need 4\.47e\+04 GiB in "
                                         r"float64( \(2 arrays of that size at once: 8\.94e\+04 GiB\), more than this "
                                         r"machine's|, which cannot be allocated).* draw fewer"):
        bayes.sample_outputs(g, 10**12)
    if hasattr(os, "sysconf"):   # the export's noise check failed in numpy first: "Unable to allocate 2.73 TiB"
        with pytest.raises(ValueError, match=r"^num_draws=1000000000000 .* more than this machine's"):
            bayes.gaussian_to_inference_data(g, torch.zeros(3, 2, dtype=torch.float64), 0.1, num_draws=10**12)
    monkeypatch.setattr(bayes.sampling, "device_memory", lambda device: None)   # as on Windows
    with pytest.raises(ValueError, match=r"^num_draws=4611686018427387904 .* float64, which cannot be allocated"):
        bayes.sample_outputs(g, 2**62)
    monkeypatch.undo()
    assert bayes.sample_outputs(g, 5, seed=1).shape == (5, 3, 2)


def test_hand_built_gaussians_are_checked_by_every_consumer():
    """The draws read one triangle of Σ: an asymmetric covariance gave draws of the wrong
    correlation (0 instead of 0.99) without a word. predictive_moments clamped a negative
    variance to 0 and passed a NaN mean through, where sample_outputs refused both. The
    ensemble and draw exports took seeds the Gaussian export refuses (True, 2**70) or failed on
    them with numpy's own messages (-1, 1.5)."""
    asymmetric = Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.99], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        bayes.sample_outputs(asymmetric, 10)
    with pytest.raises(ValueError, match="symmetric"):
        bayes.predictive_moments(asymmetric, 0.1)
    with pytest.raises(ValueError, match="positive semi-definite"):
        bayes.predictive_moments(Gaussian(torch.zeros(1), torch.tensor([[-4.0]])), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        bayes.predictive_moments(Gaussian(torch.tensor([0.5, math.nan]), torch.eye(2)), 0.1)
    # a float32 posterior near its data: entries ~1e-4, asymmetry ~3e-7 from rounding, prior ~1: accepted
    cov = torch.tensor([[1e-4, 2e-5 + 3e-7], [2e-5, 1e-4]], dtype=torch.float32)
    bayes.sample_outputs(Gaussian(torch.zeros(2, dtype=torch.float32), cov, scale=1.0), 10)
    bayes.predictive_moments(Gaussian(torch.zeros(2, dtype=torch.float32), cov, scale=1.0), 0.1)
    # rounding below zero on a pinned point is still a variance of 0 (plus the noise)
    _, var = bayes.predictive_moments(Gaussian(torch.ones(2), torch.diag(torch.tensor([1.0, -1e-16]))), 0.1)
    torch.testing.assert_close(var, torch.tensor([1.1, 0.1]), rtol=0, atol=1e-15)
    draws, y = np.zeros((4, 3)), np.zeros(3)
    for seed in (True, -1, 1.5):
        for export in (bayes.draws_to_inference_data, bayes.ensemble_to_inference_data):
            with pytest.raises(ValueError, match="seed must"):
                export(draws, y, 1.0, seed=seed)
    for seed in (2**70, np.random.default_rng(1), np.random.SeedSequence(1)):   # what numpy takes
        bayes.draws_to_inference_data(draws, y, 1.0, seed=seed)
    with pytest.raises(ValueError, match="non-negative"):
        bayes.misclassification_auroc(np.eye(3)[[0, 1, 2, 0]], -np.ones(4), [0, 1, 2, 1])


def test_a_network_gp_prediction_is_refused_with_the_way_to_export_it():
    """A fitted NetworkGP predicts a GPyTorch MultivariateNormal; the exports said only "Expected an
    ntkgp.predict.Gaussian, got MultivariateNormal", and gp_posterior refused the model's noise
    (it requires grad) without saying how to pass its value. Followed, both hints give the same
    predictive moments."""
    x, y = _regression(12)
    model = ntkgp.models.NetworkGP(x, y, _net())
    model.likelihood.noise = 0.05
    model.eval()
    with torch.no_grad():
        pred = model(x[:5])
    hint = r"got MultivariateNormal\. For a NetworkGP pass model\.gaussian\(x_test\)"
    for call in (lambda: bayes.gaussian_to_inference_data(pred, y[:5], 0.05),
                 lambda: bayes.sample_outputs(pred, 10), lambda: bayes.predictive_moments(pred, 0.05)):
        with pytest.raises(ValueError, match=hint):
            call()
    with pytest.raises(ValueError, match=r"for its value pass noise\.detach\(\)"):
        ntkgp.predict.gp_posterior(model.net, x, y, x[:5], noise=model.likelihood.noise)
    noise = model.likelihood.noise.detach()
    exported = bayes.predictive_moments(model.gaussian(x[:5]), noise)
    wrapped = bayes.predictive_moments(Gaussian(pred.mean, pred.covariance_matrix), noise)
    ours = bayes.predictive_moments(ntkgp.predict.gp_posterior(model.net, x, y, x[:5], noise=noise), noise)
    # two float64 Cholesky solves of one 12 x 12 system (GPyTorch's and ntkgp's)
    for a, b, c in zip(exported, wrapped, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


def _multitask_model(kernel="nngp", task_noises=None):
    """A fitted-looking two-output NetworkGP with constants 3 and -2, and test points near and far (20, 20)
    from its 12 training points, where a mean left out is off by about c."""
    x, y = (t.double() for t in _regression(12, k=2))
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0,
                                                                  has_task_noise=task_noises is not None)
    model = ntkgp.models.NetworkGP(x, y, _net(), kernel=kernel, likelihood=likelihood, mean="constant")
    model.likelihood.noise = 0.05
    if task_noises is not None:
        model.likelihood.task_noises = torch.tensor(task_noises, dtype=torch.float64)
    with torch.no_grad():
        model.mean_module.raw_constant.copy_(torch.tensor([3.0, -2.0], dtype=torch.float64))
    model.eval()
    return model, x, y, torch.cat([x[:3], torch.full((2, 2), 20.0, dtype=torch.float64)])


@pytest.mark.parametrize("kernel, task_noises", [("nngp", None), ("ntk", None), ("nngp", [0.01, 0.5])])
def test_a_multi_output_network_gp_exports_its_own_posterior(kernel, task_noises):
    """A multitask prediction is refused by name and sent to model.gaussian(x_test), which is the model's
    posterior: GPyTorch's prediction's blocks, and independently gp_posterior with the model's kernel kind
    (NetworkGP's "ntk" is its "ntkgp"), noises (task noises added to output j's) and constants (regressing
    y - c). The recipe that said to rebuild it by hand left these out, each silently another posterior:
    0.56 (constants), 2.1 and 15 (kernel), 0.55 and 0.14 (task noises) off."""
    model, x, y, x_test = _multitask_model(kernel, task_noises)
    with torch.no_grad():
        pred = model(x_test)
    with pytest.raises(ValueError, match=r"For a NetworkGP pass model\.gaussian\(x_test\)"):
        bayes.sample_outputs(pred, 10)
    g = model.gaussian(x_test)
    n, k = y.shape
    c = model.mean_module.constant.detach()
    noise = model.likelihood.noise.detach()
    if task_noises is not None:
        noise = (noise + model.likelihood.task_noises.detach()).expand(n, k)
    post = ntkgp.predict.gp_posterior(model.net, x, y - c, x_test, kernel="ntkgp" if kernel == "ntk" else "nngp",
                                      noise=noise)
    assert g.per_output == (task_noises is not None) == post.per_output
    assert g.scale == pytest.approx(post.scale, rel=1e-12)   # max diag K** by the same kernel
    # two float64 Cholesky solves of 12 x 12 systems (GPyTorch's and ntkgp's); the NTK-GP's entries are ~30
    torch.testing.assert_close(g.mean, post.mean + c, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g.covariance, post.covariance, rtol=1e-9, atol=1e-10)
    for j in range(k):   # output j's rows and columns of GPyTorch's interleaved multitask covariance
        one = g.output(j)
        torch.testing.assert_close(one.mean, pred.mean[:, j], rtol=0, atol=0)
        torch.testing.assert_close(one.covariance, pred.covariance_matrix[j::k, j::k], rtol=1e-12, atol=1e-14)
        bayes.sample_outputs(one, 10)
    # taken whole, each output with its own covariance (it was refused where task noises differ): GPyTorch's
    # marginal variances (M, k) (one per point (M,) where the outputs share the covariance), and draws (S, M, k)
    mean, variance = bayes.predictive_moments(g)
    assert variance.shape == ((len(x_test), k) if g.per_output else (len(x_test),))
    torch.testing.assert_close(variance.reshape(len(x_test), -1).expand(-1, k), pred.variance, rtol=1e-12, atol=1e-14)
    assert bayes.sample_outputs(g, 10).shape == (10, *mean.shape)
    zero_mean = ntkgp.predict.gp_posterior(model.net, x, y, x_test, noise=model.likelihood.noise.detach())
    assert (g.mean[3:] - zero_mean.mean[3:]).abs().max() > 0.5   # the constants matter here


def test_the_documented_noise_of_a_multitask_export_is_the_likelihoods():
    """docs/api/bayes.md: with equal task noises the outputs share one covariance and the k sums of global and
    task noise go in as (1, k) (a (k,) one is per test point, refused here at M = 5 with that spelling); with
    different ones output j's Gaussian takes sum j. Both give GPyTorch's own predictive variances."""
    model, _, _, x_test = _multitask_model(task_noises=[0.2, 0.2])
    g = model.gaussian(x_test)
    assert not g.per_output
    sums = (model.likelihood.noise + model.likelihood.task_noises).detach()   # (k,), 0.25 each
    with torch.no_grad():
        target = model.likelihood(model(x_test)).variance        # (M, k): latent variance + 0.05 + 0.2
    with pytest.raises(ValueError, match=r"\(1, 2\) per output"):
        bayes.predictive_moments(g, sums)
    _, var = bayes.predictive_moments(g, sums.unsqueeze(0))
    torch.testing.assert_close(var, target, rtol=1e-9, atol=1e-12)   # two 12 x 12 float64 solves
    model.likelihood.task_noises = torch.tensor([0.01, 0.5], dtype=torch.float64)
    _, var = bayes.predictive_moments(model.gaussian(x_test).output(1), float(0.05 + 0.5))
    with torch.no_grad():
        torch.testing.assert_close(var, model.likelihood(model(x_test)).variance[:, 1], rtol=1e-9, atol=1e-12)


def test_network_gp_gaussian_refuses_what_it_cannot_represent():
    """Training mode (GPyTorch's prior), batched or 1-D inputs, inputs of other features or NaN (named x_test;
    model(x_test)'s checks called them x), and a likelihood of correlated task noises (rank 1: outputs
    correlated in the posterior, 0.1 here) are refused by name."""
    model, x, y, x_test = _multitask_model()
    model.train()
    with pytest.raises(ValueError, match=r"call model\.eval\(\) first"):
        model.gaussian(x_test)
    model.eval()
    for bad in (x_test[None], x_test[0]):
        with pytest.raises(ValueError, match=r"x_test must be a tensor of shape \(M, d\)"):
            model.gaussian(bad)
    # refused by model(x_test)'s checks, which named it x
    for bad, refusal in ((x_test[:, :1], r"^x_test must have 2 feature\(s\)"),
                         (x_test.clone().fill_(math.nan), r"^x_test contains NaN")):
        with pytest.raises(ValueError, match=refusal):
            model.gaussian(bad)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=1)
    model = ntkgp.models.NetworkGP(x, y, _net(), likelihood=likelihood)
    with torch.no_grad():
        likelihood.task_noise_covar_factor.fill_(0.7)
    model.eval()
    with pytest.raises(ValueError, match="outputs are correlated in its posterior"):
        model.gaussian(x_test)
    assert model.gaussian(x_test[:0]).mean.shape == (0, 2)


def test_network_gp_gaussian_reads_the_noises_of_a_rank_one_likelihood():
    """A MultitaskGaussianLikelihood of rank r > 0 adds F Fᵀ (F its (k, r) task_noise_covar_factor) to the
    global noise. With F = (0.7, 0)ᵀ the outputs stay independent but their noises differ (0.05 + 0.49 and
    0.05): gaussian read task noises at rank 0 only and averaged the two blocks, 0.081 off each output's
    covariance here. Now each output has its own block, GPyTorch's, which is gp_posterior's with its noise."""
    x, y = (t.double() for t in _regression(12, k=2))
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=1)
    model = ntkgp.models.NetworkGP(x, y, _net(), likelihood=likelihood)
    model.likelihood.noise = 0.05
    with torch.no_grad():
        likelihood.task_noise_covar_factor.copy_(torch.tensor([[0.7], [0.0]], dtype=torch.float64))
    model.eval()
    x_test = torch.cat([x[:3], torch.full((2, 2), 20.0, dtype=torch.float64)])
    with torch.no_grad():
        pred = model(x_test)
    g = model.gaussian(x_test)
    assert g.per_output
    noise = (0.05 + torch.tensor([0.49, 0.0], dtype=torch.float64)).expand(12, 2)
    post = ntkgp.predict.gp_posterior(model.net, x, y, x_test, noise=noise)
    # two float64 Cholesky solves of 12 x 12 systems (GPyTorch's and ntkgp's)
    torch.testing.assert_close(g.mean, post.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g.covariance, post.covariance, rtol=1e-9, atol=1e-12)
    for j in range(2):
        torch.testing.assert_close(g.output(j).covariance, pred.covariance_matrix[j::2, j::2], rtol=1e-12,
                                   atol=1e-14)
    averaged = (post.covariance[..., 0] + post.covariance[..., 1]) / 2   # what it gave
    assert float((averaged - post.covariance[..., 0]).abs().max()) > 0.05


def test_network_gp_gaussian_refuses_float32_outputs_correlated_by_their_noise():
    """A float32 rank-1 likelihood with F = (0.01, 0.01)ᵀ beside a global noise of 1e-4 correlates the
    outputs at the training points by up to 0.50 (their covariance 9.7e-5 beside variances of 2e-4); the
    check by value, against sqrt(ε) max diag K** = 2.9e-4, took them as independent, silently. A
    task-noise covariance with off-diagonal entries is refused whatever its size."""
    x, y = (t.float() for t in _regression(12, k=2))
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=1)
    model = ntkgp.models.NetworkGP(x, y, _net(), likelihood=likelihood)
    model.likelihood.noise = 1e-4
    with torch.no_grad():
        likelihood.task_noise_covar_factor.fill_(0.01)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # GPyTorch's "the input matches the stored training data"
        cov = model(x).covariance_matrix
    assert cov.dtype == torch.float32   # the test module's default dtype is float64
    cov = cov.double()
    correlation = cov[0::2, 1::2].diagonal() / (cov[0::2, 0::2].diagonal() * cov[1::2, 1::2].diagonal()).sqrt()
    assert float(correlation.max()) > 0.4   # what it is about: measured 0.50
    with pytest.raises(ValueError, match="outputs are correlated in its posterior"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gaussian(x)


def test_a_float32_network_gp_prediction_near_its_data_is_exported_with_the_prior_scale():
    """A float32 NetworkGP's covariance near its data (noise 1e-4, GPyTorch's floor) has entries ~1e-4 and
    rounding ~1e-6 of its prior variances (~7): wrapped as Gaussian(pred.mean, pred.covariance_matrix), it
    was refused as asymmetric, and symmetrized as indefinite (eigenvalue -1.2e-6 against -6.9e-8 allowed),
    by messages that did not name the scale that tells rounding from indefiniteness. They name it now, and
    with it the draws have the prediction's moments."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(50, 2, generator=gen) * 4 - 2
    y = torch.sin(x.sum(-1))
    x_test = torch.cat([x, x[:5] + 1e-3])
    preds, models = {}, {}
    for dtype in (torch.float64, torch.float32):
        model = ntkgp.models.NetworkGP(x.to(dtype), y.to(dtype), depth=3, activation="relu", weight_var=2.0,
                                       bias_var=0.1)
        model.likelihood.noise = 1e-4
        models[dtype] = model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # GPyTorch's float32 warnings
            preds[dtype] = model(x_test.to(dtype))
            scale = float(model.covar_module(x_test.to(dtype), diag=True).max())   # the float32 model's, last
    pred = preds[torch.float32]
    cov = pred.covariance_matrix
    hint = r"Gaussian\(mean, covariance, scale=\.\.\.\): a NetworkGP's model\.gaussian\(x_test\) has it"
    as_wrapped, symmetrized = Gaussian(pred.mean, cov), Gaussian(pred.mean, (cov + cov.mT) / 2)
    for call, refusal in ((lambda: bayes.sample_outputs(as_wrapped, 10), "must be symmetric"),
                          (lambda: bayes.predictive_moments(as_wrapped, 1e-4), "must be symmetric"),
                          (lambda: bayes.sample_outputs(symmetrized, 10), "not positive semi-definite")):
        with pytest.raises(ValueError, match=f"{refusal}.*{hint}"):
            call()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gaussian = models[torch.float32].gaussian(x_test.float())   # as wrapped above, with the scale
    assert torch.equal(gaussian.covariance, cov) and torch.equal(gaussian.mean, pred.mean)
    assert gaussian.scale == scale
    draws = bayes.sample_outputs(gaussian, 20000, seed=0)
    # z-scores of the sample mean and covariance against the float32 moments, over 55 and 1540 entries:
    # measured max 2.3-3.3 and 3.4-4.6 over seeds 0-7 (the clamped eigenvalues, down to -1.2e-6, move
    # entries by about one standard error, sqrt(2 / 20000) Σ_max = 1e-6); the float64 model's moments
    # differ from these by float32's solve error (2e-4 in the mean, 2e-6 in the covariance)
    sigma = ((cov + cov.mT) / 2).double()
    var = sigma.diagonal().clamp_min(0)
    assert ((draws.mean(0) - pred.mean.double()) / (var / 20000).sqrt()).abs().max() < 5
    standard_errors = ((var[:, None] * var[None, :] + sigma**2) / 20000).sqrt()
    assert ((torch.cov(draws.T) - sigma) / standard_errors).abs().max() < 6
    assert (draws.mean(0) - preds[torch.float64].mean).abs().max() < 1e-3


def test_sampling_a_singular_covariance():
    """Rank-one covariance (a Cholesky factorization would fail): draws lie on its range."""
    v = torch.tensor([1.0, 2.0, -1.0])
    draws = bayes.sample_outputs(Gaussian(torch.ones(3), torch.outer(v, v)), 50)
    residual = draws - 1
    ratio = residual / v
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 3))


def test_pinned_posteriors_sample_whatever_the_targets_and_kernel_scale():
    """Noise-free posteriors at their training points have covariances of pure rounding, ~±ε·K**.
    The PSD tolerance scaled with the mean only, so zero targets (eigenvalues ±4e-15, tolerance
    5e-23) or a kernel scale ~2e6 with targets ~0.01 (±9e-10 against 1.2e-11) were refused as
    "not positive semi-definite". The predictors now record K**'s scale in the Gaussian."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    for net, y in ((ntkgp.mlp(3, "relu", 2.0, 0.1), torch.zeros(40)),
                   (ntkgp.mlp(3, "relu", 50.0, 0.1), 0.01 * torch.randn(40, 2, generator=g))):
        scale = float(net.kernel(x, diag=True).nngp.detach().max())
        flow = ntkgp.predict.GradientFlow(net, x, y)
        pinned = [ntkgp.predict.gp_posterior(net, x, y, x, kernel=kind, noise=0.0) for kind in ("nngp", "ntk")]
        pinned += [flow.predict(x, t=None), bayes.select_time(flow.predict(x, t=torch.tensor([1.0, 1e6])), -1)]
        for gaussian in pinned:
            assert gaussian.scale == pytest.approx(scale, rel=1e-12)
            draws = bayes.sample_outputs(gaussian, 20)
            # draws of a pinned posterior stay within √(rounding) ~ √(1e-14 K**) of the mean
            assert float((draws - gaussian.mean).abs().max()) < 1e-5 * math.sqrt(scale)
        assert flow.predict(None, t=1.0).scale == pytest.approx(scale, rel=1e-12)
    # a Gaussian built by hand has no scale: an indefinite covariance is still refused
    with pytest.raises(ValueError, match="not positive semi-definite"):
        bayes.sample_outputs(Gaussian(torch.zeros(2), torch.tensor([[1e-12, 0.0], [0.0, -1e-12]])))
    assert bayes.sample_outputs(Gaussian(torch.zeros(2), torch.tensor([[1e-12, 0.0], [0.0, -1e-12]]), 1.0), 5).shape \
        == (5, 2)
    # the mean's scale does not widen the allowance: a covariance does not depend on the targets (with
    # μ² in it a mean of 1e4 let eigenvalue −1 of 3 through, and the draws' variances came out 49 % off)
    for mean, cov in ((torch.full((2,), 1e4, dtype=torch.float64), torch.tensor([[1.0, 2.0], [2.0, 1.0]])),
                      (torch.full((2,), 30.0), torch.tensor([[1.0, 0.0], [0.0, -1e-3]]))):
        with pytest.raises(ValueError, match="not positive semi-definite"):
            bayes.sample_outputs(Gaussian(mean, cov.to(mean.dtype)), 5)


def test_draws_are_refused_where_the_arrays_held_at_once_would_not_fit(monkeypatch):
    """The memory check counted the draws once, while sampling holds two arrays of their size (z and
    R z) and the ArviZ export three (latent draws, predictive draws, log likelihood): requests of up
    to 5x the machine's memory passed it, to be killed by the operating system (or swapped)."""
    g = Gaussian(torch.zeros(4, 2, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    size = 1000 * 4 * 2 * 8   # bytes of 1000 draws
    monkeypatch.setattr(bayes.sampling, "device_memory", lambda device: int(2.5 * size))
    assert bayes.sample_outputs(g, 1000).shape == (1000, 4, 2)   # two arrays: 2 x size fits
    with pytest.raises(ValueError, match=r"^num_draws=1000 draws of 4 x 2 outputs need 5\.96e-05 GiB in float64 "
                                         r"\(3 arrays of that size at once: 0\.000179 GiB\), more than this machine's"):
        bayes.gaussian_to_inference_data(g, torch.zeros(4, 2, dtype=torch.float64), 0.1, num_draws=1000)
    monkeypatch.setattr(bayes.sampling, "device_memory", lambda device: int(1.5 * size))
    with pytest.raises(ValueError, match=r"\(2 arrays of that size at once"):
        bayes.sample_outputs(g, 1000)


def test_export_allocates_two_arrays_of_the_draws_size():
    """draws_to_inference_data peaked at 4x the draws' size in numpy temporaries (sqrt of the broadcast
    noise, sigma eps, the sum; five in the log density) beside the two arrays it keeps, y_rep and the
    log likelihood; now it allocates those two and little else (tracemalloc counts numpy's memory
    exactly). The values are those of the formulas."""
    import tracemalloc

    rng = np.random.default_rng(0)
    for shape, noise, chains in (((2000, 60), np.full(60, 0.3), 1), ((1200, 20, 5), np.full((1200, 1, 1), 0.2), 4)):
        f, y = rng.normal(size=shape), rng.normal(size=shape[1:])
        bayes.draws_to_inference_data(f[:4], y, noise[:4] if noise.ndim == 3 else noise)   # imports ArviZ's parts
        tracemalloc.start()
        try:
            data = bayes.draws_to_inference_data(f, y, noise, num_chains=chains, seed=7)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # 2 arrays + xarray's indexes and numpy's isfinite masks (1/8 each): 2.25 at most; 4.0 before
        assert peak < 2.25 * f.nbytes, peak / f.nbytes
        sd = np.sqrt(noise if noise.ndim == 3 else noise[:, None] if len(shape) == 3 else noise)
        eps = np.random.default_rng(7).standard_normal(shape)
        pp, ll = data.posterior_predictive["y"].values, data.log_likelihood["y"].values
        np.testing.assert_allclose(pp.reshape(shape), f + sd * eps, rtol=1e-15, atol=0)
        np.testing.assert_allclose(ll.reshape(shape), stats.norm.logpdf(y, f, sd), rtol=1e-13, atol=0)


@pytest.mark.fresh_process
def test_sampling_holds_two_arrays_of_the_draws_size():
    """sample_outputs held three arrays of the draws' size at once (z, R z and R z + mu), now two (z is
    freed and the mean added in place). Torch's memory is not traced: the peak resident memory of a
    fresh process (conftest.py), 3.0x the draws before, 2.0x after (80 MB of draws)."""
    from conftest import peak_above_current

    g = Gaussian(torch.zeros(100, dtype=torch.float64), torch.eye(100, dtype=torch.float64) + 1.0)
    bayes.sample_outputs(g, 10)
    peak = peak_above_current(lambda: bayes.sample_outputs(g, 100_000))
    assert peak < 2.5 * 100_000 * 100 * 8 / 2**20, peak


def test_numpy_level_export_without_torch():
    """The numpy-level modules load and export without torch (as on ArviZ 1.x / Python 3.12+).

    Set NTKGP_ARVIZ1_PYTHON to an interpreter with ArviZ >= 1 (no torch needed) to run the same
    check against the 1.x line."""
    script = ROOT / "tests" / "arviz_export_check.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok arviz")
    other = os.environ.get("NTKGP_ARVIZ1_PYTHON")
    if other:
        out = subprocess.run([other, str(script)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "(major 1)" in out.stdout and "DataTree" in out.stdout


# ------------------------------------------------------------------------------ metrics
def test_metrics_against_hand_computed_values():
    mean = np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([1.0, 1.0, 0.0, 3.5])
    var = np.array([1.0, 4.0, 1.0, 0.25])
    assert bayes.rmse(mean, y) == pytest.approx(math.sqrt((1 + 0 + 4 + 0.25) / 4))
    terms = [0.5 * math.log(2 * math.pi * v) + 0.5 * (t - m) ** 2 / v for m, t, v in zip(mean, y, var, strict=True)]
    assert bayes.nlpd(mean, var, y) == pytest.approx(sum(terms) / 4)
    # |z| = 1, 0, 2, 1: the 50% interval (±0.674σ) holds only z = 0; 90% (±1.645σ) three; 95% (±1.96σ)
    # three as well.
    cov = bayes.interval_coverage(torch.tensor(mean), torch.tensor(var), torch.tensor(y))
    assert cov == {0.5: 0.25, 0.9: 0.75, 0.95: 0.75}
    # Grid 0.2, 0.7: half-widths 0.253 and 1.036 → coverages 1/4 and 3/4 → |0.25-0.2|, |0.75-0.7|.
    assert bayes.calibration_error(mean, var, y, levels=[0.2, 0.7]) == pytest.approx(0.05)
    metrics = bayes.regression_metrics(mean, var, y)
    assert set(metrics) == {"rmse", "nlpd", "crps", "coverage_50", "coverage_90", "coverage_95", "calibration_error"}
    assert metrics["crps"] == bayes.crps(mean, var, y)
    # levels 3e-7 apart kept apart, and 0.9999999 not called 100 % ("{:g}" merged and rounded them)
    close = bayes.regression_metrics(mean, var, y, levels=[0.1234561, 0.1234564, 0.9999999])
    assert {"coverage_12.34561", "coverage_12.34564", "coverage_99.99999"} <= set(close)
    # Scaling y, mean by s and variances by s² adds log s to the NLPD.
    assert bayes.nlpd(3 * mean, 9 * var, 3 * y) == pytest.approx(bayes.nlpd(mean, var, y) + math.log(3))


def test_crps_against_its_defining_integral_and_limits():
    """The Gaussian CRPS against ∫ (F(x) − 1[x ≥ y])² dx by quadrature (scipy.integrate.quad, split
    at y, where the integrand jumps; its error estimates are below 1e-9), per point and as the mean
    over (M, k) entries with (M,) variances; sigma -> 0 gives the absolute error, scaling y, mean and
    sigma by s scales it by s, and a residual beyond sigma * 1e308 stays finite (sigma z overflowed)."""
    from scipy import integrate

    def by_quadrature(m: float, v: float, t: float) -> float:
        sd = math.sqrt(v)
        below = integrate.quad(lambda x: stats.norm.cdf(x, m, sd) ** 2, -np.inf, t, epsabs=1e-12)[0]
        above = integrate.quad(lambda x: stats.norm.sf(x, m, sd) ** 2, t, np.inf, epsabs=1e-12)[0]
        return below + above

    mean = np.array([[0.0, 1.0], [2.0, -3.0], [0.5, 0.5]])
    y = np.array([[1.0, 1.0], [0.0, 4.0], [0.5, 0.4]])
    var = np.array([1.0, 4.0, 0.01])
    expected = np.mean([by_quadrature(m, v, t) for row_m, row_y, v in zip(mean, y, var, strict=True)
                        for m, t in zip(row_m, row_y, strict=True)])
    assert bayes.crps(mean, var, y) == pytest.approx(expected, rel=1e-9)
    assert bayes.crps(torch.tensor(mean), torch.tensor(var), torch.tensor(y)) == bayes.crps(mean, var, y)
    # z = 0: σ (√(2/π) − 1/√π) = 0.2336 σ exactly
    assert bayes.crps([0.0], [4.0], [0.0]) == pytest.approx(2 * (math.sqrt(2 / math.pi) - 1 / math.sqrt(math.pi)),
                                                           rel=1e-15)
    assert bayes.crps(mean, 1e-30, y) == pytest.approx(np.abs(y - mean).mean(), rel=1e-14)
    assert bayes.crps(3 * mean, 9 * var, 3 * y) == pytest.approx(3 * bayes.crps(mean, var, y), rel=1e-14)
    assert bayes.crps([0.0], [1e-320], [1e300]) == pytest.approx(1e300, rel=1e-15)   # z = inf
    for bad in ({"variance": [0.0, 1.0, 1.0]}, {"y": y[:2]}):
        with pytest.raises(ValueError):
            bayes.crps(**{"mean": mean, "variance": var, "y": y, **bad})


def test_coverage_of_a_calibrated_and_an_overdispersed_predictor():
    """20000 targets drawn from the predictive: coverage within 4 binomial SEs (≤ 0.0143) of the
    level, calibration error below 0.01 (expected ~0.8·SE ≈ 0.0025); doubling σ raises the 50%
    coverage to 2Φ(0.674·2) − 1 = 0.82 and the calibration error to ~0.2."""
    rng = np.random.default_rng(0)
    m = 20_000
    mean = rng.normal(size=(m // 2, 2))
    var = rng.uniform(0.1, 2.0, size=m // 2)                           # (M,) shared by 2 outputs
    y = mean + np.sqrt(var)[:, None] * rng.normal(size=(m // 2, 2))
    for level, c in bayes.interval_coverage(mean, var, y).items():
        assert abs(c - level) < 4 * math.sqrt(level * (1 - level) / m)
    assert bayes.calibration_error(mean, var, y) < 0.01
    wide = bayes.interval_coverage(mean, 4 * var, y, levels=[0.5])[0.5]
    assert wide == pytest.approx(2 * stats.norm.cdf(2 * stats.norm.ppf(0.75)) - 1, abs=0.015)
    assert bayes.calibration_error(mean, 4 * var, y) > 0.15


def test_metrics_validate_inputs():
    with pytest.raises(ValueError, match="NaN"):
        bayes.rmse([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        bayes.rmse([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        bayes.nlpd([0.0, 1.0], [1.0, 0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="one value per point"):
        bayes.nlpd(np.zeros((3, 2)), np.ones(4), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        bayes.nlpd(np.zeros((3, 2)), np.ones((4, 2)), np.zeros((3, 2)))
    # a (k,) variance read per output when M != k but per point when M == k: refused, (1, k) says it
    with pytest.raises(ValueError, match=r"pass shape \(1, 2\)"):
        bayes.nlpd(np.zeros((3, 2)), np.ones(2), np.zeros((3, 2)))
    # (1, k) is one variance per output, (M,) one per point: with residuals that differ per entry
    # the two orientations give different scores (zero residuals gave the same four densities)
    residual = np.array([[0.0, 1.0], [0.0, 0.0]])   # entry (0, 1): variance 4 per output, 1 per point
    per_output = bayes.nlpd(np.zeros((2, 2)), np.array([[1.0, 4.0]]), residual)
    per_point = bayes.nlpd(np.zeros((2, 2)), np.array([1.0, 4.0]), residual)
    log_terms = 0.5 * math.log(2 * math.pi) + 0.5 * math.log(4) / 2        # two of the four variances are 4
    assert per_output == pytest.approx(log_terms + 0.5 * (1 / 4) / 4)
    assert per_point == pytest.approx(log_terms + 0.5 * (1 / 1) / 4)
    with pytest.raises(ValueError, match="between 0 and 1"):
        bayes.interval_coverage([0.0], [1.0], [0.0], levels=[1.0])
    # zero outputs, (M, 0): every metric was a mean of nothing (NaN with numpy's warnings), and the
    # exports failed with an IndexError
    none = np.zeros((5, 0))
    for metric in (lambda: bayes.rmse(none, none), lambda: bayes.nlpd(none, 1.0, none),
                   lambda: bayes.calibration_error(none, 1.0, none),
                   lambda: bayes.ensemble_to_inference_data(np.zeros((3, 5, 0)), none, 0.1)):
        with pytest.raises(ValueError, match=r"with M, k >= 1, got \(5, 0\)"):
            metric()


def test_auroc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        if labels.all() or not labels.any():
            continue
        scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), int(trial % 3))   # many ties
        assert bayes.auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert bayes.auroc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == 0.5
    assert bayes.auroc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 0, 1])) == 1.0
    assert bayes.auroc([3.0, 2.0, 1.0], [1, 0, 0]) == 1.0 and bayes.auroc([1.0, 2.0, 3.0], [1, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        bayes.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="binary"):
        bayes.auroc([0.1, 0.2], [0, 2])


# ------------------------------------------------------------------------------ classification
def test_one_hot_targets():
    t = bayes.one_hot_targets(torch.tensor([2, 0, 1, 2]))
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64) - 1 / 3
    torch.testing.assert_close(t, expected)
    ten = bayes.one_hot_targets(np.array([3, 9]), num_classes=10)
    assert ten.shape == (2, 10) and ten[0, 3] == pytest.approx(0.9) and ten[0, 0] == pytest.approx(-0.1)
    torch.testing.assert_close(ten.sum(-1), torch.zeros(2, dtype=torch.float64))
    assert bayes.one_hot_targets([1, 0], offset=0.0, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="integer"):
        bayes.one_hot_targets([0.5, 1.0])
    with pytest.raises(ValueError, match="num_classes"):
        bayes.one_hot_targets([0, 5], num_classes=3)
    with pytest.raises(ValueError, match="non-negative"):
        bayes.one_hot_targets([-1, 1])


def test_accuracy_and_misclassification_auroc_by_hand():
    mean = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 0])                                  # points 2 and 3 are wrong
    assert bayes.predict_classes(mean).tolist() == [0, 1, 0, 1]
    assert bayes.accuracy(mean, labels) == 0.5
    assert bayes.accuracy(np.array([0, 1, 1, 1]), labels) == 0.75
    assert bayes.misclassification_auroc(mean, torch.tensor([0.1, 0.2, 0.5, 0.3]), labels) == 1.0
    # Ties between one error and one correct point count one half: (1 + 0.5 + 1 + 1) / 4.
    assert bayes.misclassification_auroc(mean, [0.1, 0.3, 0.5, 0.3], labels) == 0.875
    with pytest.raises(ValueError, match="misclassified"):
        bayes.misclassification_auroc(mean, [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="shape"):
        bayes.accuracy(mean, [0, 1])


def test_labels_outside_the_classes_of_the_mean_are_refused():
    """A label >= C (or < 0) can never be the argmax of (M, C) scores; it was counted as an error
    silently (1-based labels 1 … C scored accuracy 0 here instead of raising)."""
    mean = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.7]])
    assert bayes.accuracy(mean, [0, 1, 2]) == 1.0
    for labels in ([1, 2, 3], [0, 1, -1]):
        with pytest.raises(ValueError, match=r"class indices 0 … 2"):
            bayes.accuracy(mean, labels)
        with pytest.raises(ValueError, match=r"class indices 0 … 2"):
            bayes.misclassification_auroc(mean, torch.tensor([0.1, 0.2, 0.3]), labels)
    assert bayes.accuracy(torch.tensor([1, 2, 3]), [1, 2, 3]) == 1.0       # predicted labels: any integers
    assert bayes.misclassification_auroc(mean, torch.tensor([0.1, 0.2, 0.3]), [0, 1, 1]) == 1.0


def test_empty_predictions_and_integer_gaussians_are_refused_by_name():
    """accuracy of no predictions returned NaN with numpy's 'Mean of empty slice' (review), where
    rmse and nlpd raise; an integer-dtype Gaussian failed inside torch.finfo with a TypeError."""
    for predictions in ([], np.array([]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="at least one prediction"):
            bayes.accuracy(predictions, [])
    with pytest.raises(ValueError, match="M >= 1 points"):
        bayes.predict_classes(np.zeros((0, 3)))
    integer = Gaussian(torch.zeros(2, dtype=torch.long), torch.eye(2, dtype=torch.long))
    for call in (lambda: bayes.sample_outputs(integer, 5), lambda: bayes.predictive_moments(integer, 0.1),
                 lambda: bayes.gaussian_to_inference_data(integer, np.zeros(2), 0.1)):
        with pytest.raises(ValueError, match=r"floating-point tensors, got torch\.int64"):
            call()


def test_one_hot_targets_refuse_integer_dtypes_and_huge_labels():
    """dtype=torch.int64 returned float32 targets (the offset is fractional); a label of 1e19 wrapped
    to int64's minimum and was reported as "non-negative ... got minimum -9223372036854775808"."""
    assert bayes.one_hot_targets([0, 1], dtype=torch.float32).dtype == torch.float32
    for dtype in (torch.int64, torch.bool, "float32"):
        with pytest.raises(ValueError, match=r"floating-point torch\.dtype"):
            bayes.one_hot_targets([0, 1], dtype=dtype)
    with pytest.raises(ValueError, match=r"below 2\*\*53, got 1e\+19"):
        bayes.one_hot_targets([0.0, 1e19])


def test_one_hot_targets_refuse_an_inferred_number_of_classes_far_beyond_the_labels():
    """num_classes inferred from a label of 1e9 made 3 x (1e9 + 1) targets: torch tried to allocate
    24 GB ("DefaultCPUAllocator: can't allocate memory", or the process was killed); 2**21 took 48 MiB
    (three times over) for three labels. Inferred classes beyond the labels' count and 2**22 entries
    are refused before any allocation; given, or below either bound, they are made."""
    for labels in ([0, 1, 2**21], torch.tensor([0, 1, 2**21])):   # (1e9 itself would allocate 24 GB unfixed)
        with pytest.raises(ValueError, match=r"num_classes would be 2097153: targets of 3 x 2097153 entries "
                                             r"\(48 MiB in torch\.float64\), more classes than the 3 labels\. .*"
                                             r"np\.unique\(labels, return_inverse=True\)\[1\]\), or pass num_classes"):
            bayes.one_hot_targets(labels)
    wide = bayes.one_hot_targets([0, 1, 2**21], num_classes=2**21 + 1, offset=0.0)
    assert wide.shape == (3, 2**21 + 1) and wide[2, -1] == 1.0 and wide.sum() == 3.0
    assert bayes.one_hot_targets([0, 5, 9]).shape == (3, 10)              # few labels, few classes: inferred
    assert bayes.one_hot_targets(np.arange(2100)).shape == (2100, 2100)   # as many classes as labels


@pytest.mark.parametrize("bad", ["0.1", b"0.1", True, np.bool_(True), torch.tensor(True), float("nan")])
def test_one_hot_offset_is_a_finite_number_not_text_or_a_boolean(bad):
    """float(offset) read "0.1" as 0.1 and True as 1 (targets 0 and -1 instead of e_c - 1/C), as the
    noises and levels no longer are; a 1-element array raised a TypeError, a tensor that requires
    grad warned."""
    with pytest.raises(ValueError, match="offset must be a finite real number"):
        bayes.one_hot_targets([0, 1, 2], offset=bad)
    expected = torch.tensor([[0.8, -0.2, -0.2], [-0.2, 0.8, -0.2]], dtype=torch.float64)
    for good in (0.2, np.float32(0.2), np.array([0.2]), torch.tensor(0.2, requires_grad=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # no "Converting a tensor with requires_grad=True to a scalar"
            torch.testing.assert_close(bayes.one_hot_targets([0, 1], num_classes=3, offset=good), expected,
                                       rtol=0, atol=1e-8)   # float32's 0.2 is 0.2 + 3e-9


def test_digits_classification_as_regression():
    """NNGP and converged-NTK ensemble (depth-2 ReLU, σ_w² = 2, σ_b² = 0.01, noise 0.01) on
    sklearn's load_digits: train on images 0..999, test on 1000..1796 (797), one-hot targets
    minus 0.1. Measured: accuracy 0.971 (NNGP) and 0.974 (NTK), with 23 / 21 errors; AUROC of the
    predictive variance for flagging errors 0.849 / 0.866 (1-nearest-neighbour: 0.962).
    Floors: accuracy 0.95, ~4 binomial SEs (0.006) below the measurement; AUROC 0.75, ~4 SEs
    (0.062 with 22 errors among 797) above chance and ~2.5 SEs below the measurement."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, labels = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0)
    labels = torch.tensor(labels)
    x_train, y_train, x_test, y_test = x[:1000], labels[:1000], x[1000:], labels[1000:]
    targets = bayes.one_hot_targets(y_train, num_classes=10)
    assert targets[0].max() == pytest.approx(0.9) and targets[0].min() == pytest.approx(-0.1)
    net = ntkgp.mlp(2, "relu", 2.0, 0.01)
    for kernel in ("nngp", "ntk"):
        post = ntkgp.predict.gp_posterior(net, x_train, targets, x_test, kernel=kernel, noise=1e-2)
        mean, var = bayes.predictive_moments(post)
        assert mean.shape == (797, 10) and var.shape == (797,)
        acc = bayes.accuracy(mean, y_test)
        assert acc > 0.95, (kernel, acc)
        assert bayes.misclassification_auroc(mean, var, y_test) > 0.75, kernel


def test_integer_arguments_accept_numpy_and_tensor_integers_only():
    targets = bayes.one_hot_targets([0, 2, 1], num_classes=np.int64(3))
    assert targets.shape == (3, 3)
    assert bayes.one_hot_targets([0, 1], num_classes=torch.tensor(4)).shape == (2, 4)
    for bad in (True, 2.0, 1, "3"):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
            bayes.one_hot_targets([0, 1], num_classes=bad)


def test_metrics_take_low_precision_tensors_and_reject_complex_ones():
    y = torch.tensor([0.0, 1.0, 2.0])
    assert bayes.rmse(y.to(torch.bfloat16), y) == 0.0
    assert bayes.rmse(y.half(), y) == 0.0
    with pytest.raises(ValueError, match="must be real"):
        bayes.rmse(y.to(torch.complex64), y)
    with pytest.raises(ValueError, match="must be real"):
        bayes.rmse(np.array([1j, 0, 0]), y)


def test_per_member_noise_of_vector_outputs_is_not_read_per_point():
    # (E, 1) noise beside (E, M, k) members right-aligns to (1, E, 1): one value per *point* when E == M
    rng = np.random.default_rng(0)
    members, y = rng.normal(size=(4, 4, 3)), rng.normal(size=(4, 3))
    noise = np.array([0.1, 0.2, 0.3, 0.4])
    for call in (lambda n: bayes.ensemble_moments(members, noise=n),
                 lambda n: bayes.ensemble_to_inference_data(members, y, noise=n),
                 lambda n: bayes.draws_to_inference_data(members, y, noise=n)):
        with pytest.raises(ValueError, match=r"shape \(4, 1\) with 4 draws of 4 points is ambiguous: pass "
                                             r"shape \(4, 1, 1\) for one value per draw or member, or \(4,\)"):
            call(noise[:, None])
        # (E, k) likewise: numpy reads it per point and output (review)
        with pytest.raises(ValueError, match=r"shape \(4, 3\) with 4 draws of 4 points is ambiguous: pass "
                                             r"shape \(4, 1, 3\) for one value per draw or member and output, or "
                                             r"\(1, 4, 3\)"):
            call(np.ones((4, 3)))
    _, var = bayes.ensemble_moments(members, noise=np.ones((1, 4, 3)))
    np.testing.assert_allclose(var, members.var(0) + 1.0, rtol=1e-15)
    _, var = bayes.ensemble_moments(members, noise=noise[:, None, None])
    np.testing.assert_allclose(var, members.var(0) + noise.mean(), rtol=1e-15)
    _, var = bayes.ensemble_moments(members, noise=noise)            # (M,): per point
    np.testing.assert_allclose(var, members.var(0) + noise[:, None], rtol=1e-15)
    # unambiguous shapes keep numpy's reading: (M, 1) per point where E != M, (E, 1) per member for (E, M)
    _, var = bayes.ensemble_moments(members[:3], noise=noise[:, None])
    np.testing.assert_allclose(var, members[:3].var(0) + noise[:, None], rtol=1e-15)
    _, var = bayes.ensemble_moments(members[..., 0], noise=noise[:, None])
    np.testing.assert_allclose(var, members[..., 0].var(0) + noise.mean(), rtol=1e-15)



def test_one_noise_per_member_as_a_list_is_told_its_shape():
    """One fitted noise per member, ``[σ_1², …, σ_E²]``, is a 1-D value, which is always per point: with
    E != M numpy's refusal named no shape to pass ("noise of shape (5,) does not fit (broadcast to) shape
    (5, 30)"), and beside (E, M, 1) members the hint named the outputs' (1, 1) alone. The refusal now
    names (E, 1), or (E, 1, 1); passed so, the variance is the members' spread plus the mean noise."""
    rng = np.random.default_rng(0)
    members, y, noise = rng.normal(size=(5, 30)), rng.normal(size=30), np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    for call in (lambda n: bayes.ensemble_moments(members, noise=n),
                 lambda n: bayes.ensemble_to_inference_data(members, y, noise=n),
                 lambda n: bayes.draws_to_inference_data(members, y, noise=n)):
        with pytest.raises(ValueError, match=r"length 30; got length 5\. For one value per draw or member pass "
                                             r"shape \(5, 1\)\.$"):
            call(noise)
    for call in (lambda n: bayes.ensemble_moments(members[..., None], noise=n),
                 lambda n: bayes.ensemble_to_inference_data(members[..., None], y[:, None], noise=n)):
        with pytest.raises(ValueError, match=r"For one value per draw or member pass shape \(5, 1, 1\); for one "
                                             r"value per output pass shape \(1, 1\)\.$"):
            call(noise)
    _, var = bayes.ensemble_moments(members, noise=noise[:, None])
    np.testing.assert_allclose(var, members.var(0) + 0.3, rtol=1e-15)
    data = bayes.ensemble_to_inference_data(members, y, noise=noise[:, None])
    np.testing.assert_allclose(data.log_likelihood["y"].values[0],
                               stats.norm.logpdf(y, members, np.sqrt(noise)[:, None]), rtol=1e-13,
                               atol=1e-13)   # a sum of terms up to ~20: ~1e-14 absolute where it cancels to ~0
    # scores have no draws axis: a 1-D variance of another length is refused as before
    with pytest.raises(ValueError, match=r"variance of shape \(5,\) does not fit \(broadcast to\) shape \(30,\)\.$"):
        bayes.nlpd(members[0], noise, y)


def test_scores_stay_finite_at_the_ends_of_float64():
    # 2π σ² overflowed beyond σ² ~ 3e307 and residual² beyond ~1e154 (or vanished below 1e-162),
    # where the density and the error are finite: nlpd was inf, rmse inf or 0
    assert bayes.nlpd([0.0], [1e308], [0.0]) == pytest.approx(0.5 * (math.log(2 * math.pi) + 308 * math.log(10)))
    assert bayes.gaussian_log_density(0.0, 0.0, 1e308) == pytest.approx(-bayes.nlpd([0.0], [1e308], [0.0]))
    assert isinstance(bayes.gaussian_log_density(0.5, 0.0, 2.0), np.float64)   # as documented, not a 0-d array
    assert bayes.nlpd([0.0], [1e300], [1e155]) == pytest.approx(
        0.5 * math.log(2 * math.pi) + 150 * math.log(10) + 0.5 * 1e10)
    assert bayes.rmse([0.0, 0.0], [1e200, -1e200]) == pytest.approx(1e200)
    assert bayes.rmse([0.0, 0.0], [3e-200, 4e-200]) == pytest.approx(math.sqrt(12.5) * 1e-200)
    with pytest.raises(ValueError, match="overflows"):
        bayes.rmse([-1e308], [1e308])


def test_meta_tensors_and_negative_class_variances_are_refused_by_name():
    meta = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="mean is on the meta device"):
        bayes.rmse(meta, meta)
    with pytest.raises(ValueError, match="meta device"):
        bayes.sample_outputs(ntkgp.predict.Gaussian(meta, torch.eye(3, device="meta")), 5)
    with pytest.raises(ValueError, match="must be torch tensors"):   # an AttributeError on .device before
        bayes.sample_outputs(ntkgp.predict.Gaussian(np.zeros(3), np.eye(3)), 5)
    with pytest.raises(ValueError, match="noise is on the meta device"):
        bayes.predictive_moments(ntkgp.predict.Gaussian(torch.zeros(3), torch.eye(3)),
                                 noise=torch.zeros((), device="meta"))
    # an (M, C) variance was averaged over classes before the sign check: -5 and 7 read as 1
    with pytest.raises(ValueError, match="non-negative"):
        bayes.misclassification_auroc(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                                      np.array([[-5.0, 7.0], [1.0, 1.0], [0.5, 0.5]]), [0, 0, 0])


def test_float32_levels_zero_outputs_and_lists_of_grad_tensors():
    """Review: float32 levels named their coverages by their rounding (``coverage_89.9999976158``,
    so ``metrics["coverage_90"]`` was a KeyError); a Gaussian of k = 0 outputs failed inside
    torch's reshape after the eigendecomposition; a list of tensors that require grad reached
    torch's "Can't call numpy() on Tensor that requires grad" from numpy."""
    mean, var, y = np.zeros(4), np.ones(4), np.array([0.1, -2.0, 0.5, 1.0])
    for levels in (torch.tensor([0.5, 0.9]), np.array([0.5, 0.9], dtype=np.float32),
                   torch.tensor([0.5, 0.9], dtype=torch.float16), [np.float32(0.5), np.float32(0.9)]):
        metrics = bayes.regression_metrics(mean, var, y, levels=levels)
        assert metrics["coverage_50"] == 0.5 and metrics["coverage_90"] == 0.75
    assert bayes.interval_coverage(mean, var, y, levels=np.float32(0.9)) == {0.9: 0.75}
    no_outputs = Gaussian(torch.zeros(3, 0), torch.eye(3))
    for call in (lambda: bayes.sample_outputs(no_outputs, 5), lambda: bayes.predictive_moments(no_outputs, 0.1)):
        with pytest.raises(ValueError, match="k >= 1 outputs"):
            call()
    w = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match="mean holds tensors that require grad"):
        bayes.rmse([w * 1, w * 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="noise holds tensors that require grad"):
        bayes.ensemble_to_inference_data(torch.zeros(2, 3), torch.zeros(3), [w, w, w])
    assert bayes.rmse(w * torch.tensor([1.0, 2.0]), [1.0, 2.0]) == 0.0   # one tensor is detached


def test_predictive_moments_take_the_marginal_variances_alone():
    """compute_cov="diag" exists for many test points, where the NLPD and calibration need the
    marginal variances only; predictive_moments and select_time refused it as having "no
    covariance ... to sample from it". Joint draws still need the covariance, and say so."""
    torch.manual_seed(0)
    x, y, xt = (torch.randn(*shape, dtype=torch.float64) for shape in ((10, 2), (10,), (7, 2)))
    net = ntkgp.mlp(1, "erf", 2.0, 0.1, width=8)
    flow = ntkgp.predict.GradientFlow(net, x, y)
    times = torch.tensor([[0.5, 2.0], [10.0, math.inf]])
    full, diag = flow.predict(xt, t=times), flow.predict(xt, t=times, compute_cov="diag")
    for index in ((0, 1), (1, 1), (-1, 0)):
        for noise in (0.0, 0.1, torch.full((7,), 0.2, dtype=torch.float64)):
            mean, variance = bayes.predictive_moments(diag, noise, time_index=index)
            reference = bayes.predictive_moments(full, noise, time_index=index)
            assert torch.equal(mean, reference[0])
            torch.testing.assert_close(variance, reference[1], rtol=0, atol=1e-14 * full.scale)
        one = bayes.select_time(diag, index)
        assert one.covariance is None and one.marginal.shape == (7,) and one.mean.shape == (7,)
    with pytest.raises(ValueError, match=r"marginal variances alone \(compute_cov='diag'\): joint draws need the "
                                         r"covariance, predict with compute_cov=True"):
        bayes.sample_outputs(diag, 10, time_index=(0, 0))
    with pytest.raises(ValueError, match=r"no covariance: predict with compute_cov=True \(or 'diag'"):
        bayes.predictive_moments(flow.predict(xt, t=1.0, compute_cov=False))
    with pytest.raises(ValueError, match=r"marginal must have shape \(\*time, M\)"):
        bayes.select_time(ntkgp.predict.Gaussian(torch.zeros(()), None, None, torch.zeros(())))
    with pytest.raises(ValueError, match="mean or marginal variances contain NaN"):
        bayes.predictive_moments(ntkgp.predict.Gaussian(torch.zeros(3), None, 1.0, torch.tensor([1.0, math.nan, 1.0])))


def test_exports_name_the_time_they_picked_one_way_however_it_was_given():
    """time_index was stored as str() of the argument: 2, -1, (np.int64(2),) and tensor(2) pick one
    time but were written '2', '-1', '(np.int64(2),)' and 'tensor(2)'."""
    x, y = _regression()
    times = torch.tensor([[0.5, 5.0], [50.0, 500.0]])
    flat = ntkgp.predict.gradient_flow(_net(), x, y, x[:4], t=times[0])
    grid = ntkgp.predict.gradient_flow(_net(), x, y, x[:4], t=times)
    for flow, picks, label in ((flat, (1, -1, (np.int64(1),), torch.tensor(1)), "1"),
                               (grid, ((1, 0), (-1, -2), (np.int64(1), torch.tensor(0))), "(1, 0)")):
        for pick in picks:
            data = bayes.gaussian_to_inference_data(flow, y[:4], 0.1, num_draws=4, time_index=pick)
            assert data.log_likelihood.attrs["time_index"] == label, pick
    single = ntkgp.predict.gradient_flow(_net(), x, y, x[:4], t=5.0)
    data = bayes.gaussian_to_inference_data(single, y[:4], 0.1, num_draws=4)
    assert data.log_likelihood.attrs["time_index"] == "None"


@pytest.mark.parametrize("attrs, message", [
    ({"converged": True}, "must be a str, int or float"), ({"note": None}, "must be a str, int or float"),
    ({"nested": {"a": 1}}, "must be a str, int or float"), ({1: "x"}, "keys must be strings"),
    ({"noise_variance": 99.0}, "may not set 'noise_variance'"), ({"source": "mine"}, "may not set 'source'"),
    ([("a", 1)], "must be a dict")])
def test_draws_export_refuses_attributes_netcdf_cannot_store_or_that_overwrite_its_own(attrs, message, tmp_path):
    """A bool or None was accepted and failed only in to_netcdf (h5netcdf's CompatibilityError),
    and attrs={'noise_variance': 99.0} replaced the noise the log likelihood used (0.3), silently."""
    f = np.zeros((4, 3))
    with pytest.raises(ValueError, match=message):
        bayes.draws_to_inference_data(f, np.zeros(3), 0.3, attrs=attrs)
    data = bayes.draws_to_inference_data(f, np.zeros(3), 0.3, attrs={"run": "a", "seed": np.int64(3), "lr": 0.5})
    assert data.log_likelihood.attrs["noise_variance"] == 0.3 and data.log_likelihood.attrs["run"] == "a"
    if hasattr(data, "to_netcdf"):   # ArviZ 0.x: what the accepted attributes are for
        data.to_netcdf(str(tmp_path / "export.nc"))


@pytest.mark.parametrize("bad", [True, np.bool_(False), [0.1, True], torch.tensor([True, False, True]), "0.1",
                                 ["0.1", "0.2", "0.3"], np.array(["0.1", 0.2, 0.3], dtype=object),
                                 np.array([True, 0.2, 0.3], dtype=object), [np.float64(0.1), np.bool_(True), 0.3]])
def test_noises_variances_and_levels_refuse_booleans_and_text(bad):
    """numpy reads True as 1 and "0.1" as 0.1: predictive_moments(g, True) added a noise of 1 and
    nlpd(variance="1.0") scored, where ntkgp.predict refuses both (a review)."""
    g = Gaussian(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    zeros, ones = torch.zeros(3), torch.ones(3)
    calls = [lambda: bayes.predictive_moments(g, bad), lambda: bayes.ensemble_moments(torch.randn(4, 3), bad),
             lambda: bayes.nlpd(zeros, bad, ones), lambda: bayes.gaussian_log_density(ones, zeros, bad),
             lambda: bayes.interval_coverage(zeros, ones, ones, levels=bad),
             lambda: bayes.gaussian_to_inference_data(g, ones, bad, num_draws=4)]
    for call in calls:
        with pytest.raises(ValueError, match=r"must be (a number or numbers, got booleans|numeric, got text)"):
            call()


@pytest.mark.parametrize("bad, message", [
    (None, "numeric, got None"), ([0.1, None, 0.3], "numeric, got None"),
    (np.ma.masked_array([0.1, 100.0, 0.3], mask=[False, True, False]), "masked entries"),
    (np.array([1, 2, 3], dtype="timedelta64[D]"), "numeric, got dates or durations"),
    (np.ones(3, dtype=[("a", float)]), "numeric, got records"),
])
def test_none_masks_dates_and_records_are_refused_not_read_as_numbers(bad, message):
    """numpy's float conversion reads None as NaN (nlpd(mean, post.variance, y) of a posterior without
    covariance said "variance contains NaN"), drops a mask (the hidden values were scored), and reads
    durations as days and a structured array as its field."""
    g = Gaussian(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    zeros, ones = torch.zeros(3), torch.ones(3)
    calls = [lambda: bayes.rmse(bad, ones), lambda: bayes.nlpd(zeros, bad, ones),
             lambda: bayes.predictive_moments(g, bad), lambda: bayes.one_hot_targets(bad, num_classes=4),
             lambda: bayes.gaussian_to_inference_data(g, ones, bad, num_draws=4)]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    assert bayes.rmse(np.ma.masked_array([1.0, 2.0]), [1.0, 2.0]) == 0.0   # a mask hiding nothing is no loss


@pytest.mark.parametrize("mean, y, hint", [
    (np.zeros((2, 5)), np.zeros(5), "first axis is times"),
    (np.zeros((2, 5, 3)), np.zeros((5, 3)), "first axis is times"),
    (np.zeros((5, 1)), np.zeros(5), "Squeeze the axis of size 1"), (np.zeros(5), np.zeros((5, 1)), "Squeeze"),
    (np.zeros(5), np.float64(0.0), r"got \(\)\.$"),   # no hint, and no IndexError looking for one
])
def test_shape_mismatches_name_a_time_axis_or_an_axis_of_size_one(mean, y, hint):
    """gradient_flow(..., t=[1, 10])'s (T, M) mean against (M,) targets, and ensemble_moments' (M, 1)
    mean of (E, M, 1) outputs, were refused by their shapes alone."""
    for call in (lambda: bayes.rmse(mean, y), lambda: bayes.nlpd(mean, 1.0, y)):
        with pytest.raises(ValueError, match=hint):
            call()


def test_a_time_axis_of_gradient_flow_is_named_by_metrics_and_accuracy():
    x, labels = torch.rand(8, 2, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    flow = ntkgp.predict.gradient_flow(_net(), x, bayes.one_hot_targets(labels), x, t=[1.0, 10.0])
    assert flow.mean.shape == (2, 8, 3)
    for call in (lambda: bayes.rmse(flow.mean[..., 0], labels), lambda: bayes.accuracy(flow.mean, labels)):
        with pytest.raises(ValueError, match="first axis is times"):
            call()
    with pytest.raises(ValueError, match=r"the \(M, C\) mean or \(M,\) predicted labels"):
        bayes.accuracy(np.zeros((2, 2, 8, 3)), labels)   # it said "must have shape (M,)"


def test_labels_may_be_booleans_and_log_densities_name_shapes_that_do_not_broadcast():
    # numbers in any container still pass as noise: object arrays, numpy scalars, 0-d tensors
    g = Gaussian(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    for noise in (np.array([0.1, 0.2, 0.3], dtype=object), [np.float64(0.1), 0.2, torch.tensor(0.3)], 0.2):
        assert bayes.predictive_moments(g, noise)[1].shape == (3,)
    assert bayes.auroc(torch.tensor([-1.0, 2.0, 1.0]), torch.tensor([False, True, True])) == 1.0
    with pytest.raises(ValueError, match=r"must broadcast against each other, got shapes \(3,\), \(2,\)"):
        bayes.gaussian_log_density(np.zeros(3), np.zeros(2), 1.0)   # numpy's "operands could not be broadcast"


def test_log_densities_refuse_a_per_point_variance_read_per_output_when_points_equal_outputs():
    """predictive_moments' (M,) variance with (M, k) targets: nlpd reads it per point, and
    gaussian_log_density refused it for M != k, but for M == k == 3 numpy read it per output and the
    log densities summed to -17.95 instead of -12.93, silently. Refused there, with the two shapes that
    say which is meant; (M, 1) and (1, k) are scipy's densities of those variances."""
    y = np.array([[0.1, 0.2, 0.3], [1.0, 1.1, 1.2], [2.0, 2.1, 2.2]])
    mean, var = np.zeros((3, 3)), np.array([0.5, 1.0, 4.0])
    for args in ((y, mean, var), (y, mean[0], var[:, None]), (y[0], mean, var[:, None])):
        with pytest.raises(ValueError, match=r"ambiguous: pass shape \(3, 1\) for one value per point, or \(1, 3\)"):
            bayes.gaussian_log_density(*args)
    with pytest.raises(ValueError, match="ambiguous"):   # draws ahead: (S, M, k) with M == k
        bayes.gaussian_log_density(np.stack([y, y]), 0.0, var)
    per_point = bayes.gaussian_log_density(y, mean, var[:, None])
    # the same formula, evaluated by scipy: agreement to rounding
    np.testing.assert_allclose(per_point, stats.norm.logpdf(y, 0.0, np.sqrt(var)[:, None]), rtol=1e-14)
    np.testing.assert_allclose(per_point.mean(), -bayes.nlpd(mean, var, y), rtol=1e-14)
    np.testing.assert_allclose(bayes.gaussian_log_density(y, mean, var[None, :]),
                               stats.norm.logpdf(y, 0.0, np.sqrt(var)[None, :]), rtol=1e-14)
    # no ambiguity: 1-D values of (M,) points, or of k != M outputs (numpy's rules, as documented)
    np.testing.assert_allclose(bayes.gaussian_log_density(y[:, 0], 0.0, var),
                               stats.norm.logpdf(y[:, 0], 0.0, np.sqrt(var)), rtol=1e-14)
    np.testing.assert_allclose(bayes.gaussian_log_density(y[:2], mean[:2], var),
                               stats.norm.logpdf(y[:2], 0.0, np.sqrt(var)), rtol=1e-14)


def test_log_densities_keep_the_axes_of_a_broadcast_variance():
    """A variance made by np.broadcast_to (stride 0) over axes that y and mean lack: log_density
    compacts such a variance to its own values (not to work at the broadcast size) and took the
    result's shape from the compacted one, so 5 log densities came back as 1 and (4, 2) as (1, 2),
    silently. The shape is numpy's broadcast of the three, and the values are scipy's."""
    cases = ((0.0, 0.0, np.broadcast_to(2.0, (5,))),
             (np.zeros(1), 0.5, np.broadcast_to(np.array([2.0, 3.0]), (4, 2))),
             (np.zeros((3, 1)), 0.0, np.broadcast_to(np.array([[1.0], [2.0], [3.0]]), (3, 4))))
    for y, mean, var in cases:
        shape = np.broadcast_shapes(np.shape(y), np.shape(mean), var.shape)
        density = bayes.gaussian_log_density(y, mean, var)
        assert density.shape == shape
        np.testing.assert_allclose(density, stats.norm.logpdf(y, mean, np.sqrt(var)), rtol=1e-14)


def test_a_whole_ensemble_history_is_refused_with_the_record_to_pass():
    """train_ensemble's result where a record's member outputs go was refused as 'must be a numeric
    array or tensor, got EnsembleHistory', without saying which part to pass."""
    from ntkgp.bayes import ensemble_moments, ensemble_to_inference_data
    from ntkgp.finite import train_ensemble

    net = ntkgp.serial(ntkgp.Dense(8), ntkgp.Erf(), ntkgp.Dense(1))
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).unsqueeze(-1)
    history = train_ensemble(net, x, torch.sin(x), x_test=x, ensemble_size=4, learning_rate=0.5,
                             record_steps=[0, 2], dtype=torch.float64)
    for call in (lambda: ensemble_to_inference_data(history, torch.sin(x[:, 0]), noise=0.01),
                 lambda: ensemble_moments(history)):
        with pytest.raises(ValueError, match=r"history\.test_outputs\[i\]"):
            call()
    mean, variance = ensemble_moments(history.test_outputs[-1].squeeze(-1))   # what the message says works
    assert mean.shape == variance.shape == (5,)


# regression_metrics' calibration error and misclassification_auroc with per-class variances,
# against formulas written out here with scipy/numpy.


def test_regression_metrics_calibration_error_always_averages_over_0_05_to_0_95():
    # documented: `levels` only chooses the coverages reported; CE = mean_l |cov(p_l) - p_l| over
    # p_l = 0.05, 0.10, ..., 0.95, cov(p) the fraction with |y - mu| <= Phi^{-1}((1+p)/2) sigma
    rng = np.random.default_rng(0)
    mean = rng.normal(size=200)
    var = rng.uniform(0.2, 2.0, size=200)
    y = mean + rng.normal(size=200) * np.sqrt(var) * 1.7                 # miscalibrated: CE well above 0
    z = np.abs(y - mean) / np.sqrt(var)
    grid = np.arange(1, 20) * 0.05
    expected = np.mean([abs(np.mean(z <= stats.norm.ppf(0.5 + p / 2)) - p) for p in grid])
    for levels in ([0.5], [0.9, 0.95], (0.5, 0.9, 0.95)):
        got = bayes.regression_metrics(mean, var, y, levels=levels)["calibration_error"]
        assert abs(got - expected) <= 1e-12, (levels, got, expected)


def _mann_whitney(scores, positive):
    """P(score of a positive > score of a negative) + 0.5 P(tie), by counting all pairs."""
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_misclassification_auroc_scores_points_by_the_mean_variance_over_classes():
    # (M, C) variances: the score is the mean over classes (docstring). The variances are built so
    # that the mean and, e.g., the largest class variance rank the points differently.
    mean = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1, 1, 2, 1])                                 # points 2 and 3 misclassified
    var = np.array([[0.9, 0.0, 0.0],                                   # mean 0.30, max 0.9
                    [0.35, 0.35, 0.35],                                # mean 0.35, max 0.35
                    [0.4, 0.4, 0.4],                                   # wrong: mean 0.40, max 0.4
                    [0.32, 0.32, 0.32],                                # wrong: mean 0.32, max 0.32
                    [0.1, 0.1, 0.1]])                                  # mean 0.10
    wrong = mean.argmax(-1) != labels
    expected = _mann_whitney(var.mean(-1), wrong)
    assert expected != _mann_whitney(var.max(-1), wrong)               # the choice of reduction matters here
    assert abs(bayes.misclassification_auroc(mean, var, labels) - expected) <= 1e-12


def test_draws_of_different_outputs_are_independent_with_covariance_sigma_each():
    """sample_outputs draws the k outputs independently: the joint covariance is Sigma (x) I_k (docstring,
    "each of the k outputs gets its own z"). Statistical check with S = 20000 draws in float64: the
    sample covariance of each output is Sigma to within a few standard errors, and the cross-covariance
    between outputs is 0. Tolerances: an entry of a sample covariance of S draws has standard error at
    most sqrt((Sigma_aa Sigma_bb + Sigma_ab^2) / S) <= sqrt(2/S) * max diag = 0.01 * max diag; 6 standard
    errors (0.06) is a false-alarm rate far below 1e-6 per entry (the seed is fixed anyway)."""
    sigma = torch.tensor([[1.0, 0.6, 0.2], [0.6, 1.2, 0.5], [0.2, 0.5, 0.8]], dtype=torch.float64)
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], dtype=torch.float64)   # (M=3, k=2)
    draws = bayes.sample_outputs(Gaussian(mean, sigma), 20000, seed=3)              # (S, 3, 2)
    assert draws.shape == (20000, 3, 2)
    centred = (draws - mean).reshape(20000, 6)                                      # columns (point, output)
    cov = centred.T @ centred / 20000
    expected = torch.kron(sigma, torch.eye(2, dtype=torch.float64))                  # Sigma (x) I_k
    assert float((cov - expected).abs().max()) < 0.06 * float(sigma.diagonal().max())
    # independent continuous draws: no two coincide (with probability 1)
    flat = draws.reshape(20000, 6)
    assert torch.unique(flat, dim=0).shape[0] == 20000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ArviZ's daily stamp lives in XDG_CACHE_HOME on Linux")
def test_arviz_refactor_announcement_is_silenced(tmp_path):
    """ArviZ 0.2x announces its 1.0 refactor once a day (a stamp file in the user's cache). import_arviz
    meant to silence it, but its filter's pattern did not match the message, which starts with a
    newline: the first export of each day printed the FutureWarning (in CI's summary too). A fresh
    interpreter with an empty cache, FutureWarnings as errors, imports ArviZ through ntkgp quietly."""
    import subprocess

    code = ("import warnings\nfrom ntkgp.bayes.inference_data import import_arviz\n"
            "warnings.simplefilter('error', FutureWarning)\nimport_arviz()\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_the_same_seed_draws_the_same_samples_wherever_the_covariance_agrees_to_rounding(monkeypatch):
    """sample_outputs mapped its standard normals by ``V diag(√λ)``, which follows the eigenvectors'
    signs and the basis eigh picks in a degenerate eigenspace: a 1e-13 change of Σ (another BLAS,
    version or device) drew other samples (up to 1.2 × their largest magnitude apart). An RBF kernel on
    points evenly spaced on a circle has its eigenvalues in equal pairs; perturbed by 1e-13, and with
    eigh's vectors flipped and rotated in a pair, the draws move by rounding only."""
    m = 30
    theta = torch.arange(m, dtype=torch.float64) * 2 * math.pi / m
    cov = torch.exp(-(2 - 2 * (theta[:, None] - theta[None, :]).cos()) / 0.5)
    noise = torch.randn(m, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perturbed = cov * (1 + 1e-13 * (noise + noise.T) / 2)
    draws = (50, 20)   # as many columns as points or more (the root formed), and fewer (applied in factors)
    base = [bayes.sample_outputs(Gaussian(torch.zeros(m, dtype=torch.float64), cov), s, seed=0) for s in draws]
    moved = [bayes.sample_outputs(Gaussian(torch.zeros(m, dtype=torch.float64), perturbed), s, seed=0) for s in draws]
    scale = float(base[0].abs().max())
    for a, b in zip(base, moved, strict=True):
        assert float((a - b).abs().max()) < 1e-6 * scale

    eigh = torch.linalg.eigh

    def other_vectors(a):
        values, vectors = eigh(a)
        vectors = vectors.clone()
        vectors[:, ::3] *= -1                                 # signs
        c, s = math.cos(0.7), math.sin(0.7)                   # a rotation inside the top (degenerate) pair
        top = vectors[:, -3:-1].clone()
        vectors[:, -3], vectors[:, -2] = c * top[:, 0] - s * top[:, 1], s * top[:, 0] + c * top[:, 1]
        return values, vectors

    pair = torch.linalg.eigvalsh(cov)[-3:-1]
    assert float((pair[1] - pair[0]) / pair[1]) < 1e-10      # the rotated pair is degenerate
    monkeypatch.setattr(torch.linalg, "eigh", other_vectors)
    rotated = [bayes.sample_outputs(Gaussian(torch.zeros(m, dtype=torch.float64), cov), s, seed=0) for s in draws]
    for a, b in zip(base, rotated, strict=True):
        assert float((a - b).abs().max()) < 1e-10 * scale
    # and the draws still follow N(0, Σ), in both forms: the sample covariance of 20000 draws
    gaussian = Gaussian(torch.zeros(m, dtype=torch.float64), cov)
    for many in (bayes.sample_outputs(gaussian, 20000, seed=1),
                 torch.cat([bayes.sample_outputs(gaussian, 20, seed=s) for s in range(1000)])):
        torch.testing.assert_close(many.T.cov(), cov, rtol=0, atol=0.06)


def test_network_gp_gaussian_takes_each_output_block_without_the_dense_multitask_covariance(monkeypatch):
    """Its k blocks come from GPyTorch's lazy covariance: the dense (M k, M k) one peaked at ~5.5 such
    matrices (1.9 GB of process memory at M = 1500, k = 4, against 0.75 GB for the blocks), for one
    output's block each, k M² entries in all."""
    model, _, _, x_test = _multitask_model(task_noises=[0.01, 0.5])
    with torch.no_grad():
        dense = model(x_test).covariance_matrix

    def refused(self):
        raise AssertionError("the dense multitask covariance was formed")

    monkeypatch.setattr(gpytorch.distributions.MultitaskMultivariateNormal, "covariance_matrix", property(refused))
    g = model.gaussian(x_test)
    for j in range(2):   # the same blocks, by another route through the same solves
        torch.testing.assert_close(g.covariance[..., j], dense[j::2, j::2], rtol=1e-12, atol=1e-14)
