"""Float32 predictions of a deep network: the rounding-error warning judged against float64 references.

A float32 kernel computed by a deep recursion carries more than its entries' rounding (``mlp(50, "erf",
2.25, 1)``'s NTK on 100 standard-normal points: 58 ulps at its worst entry, 8.3 ulps root mean square once
the part proportional to the kernel is taken out), and the estimate at ``ε`` read 3.8 to 13 times less than
the ``t = None`` errors: ``GradientFlow(..., factor_dtype=torch.float32)`` was 1.4e-2 off float64, silently.
The predictors that compute their kernels from the network measure that error against the float64 kernel
where it decides the warning (``ntkgp.predict.spectral.entry_error``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import ntkgp
from ntkgp.predict import GPPosterior, GradientFlow

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, x_test, y = (torch.randn(rows, cols, generator=generator, dtype=torch.float64)
                    for rows, cols in ((n, 3), (5, 3), (n, 2)))
    return x.float(), x_test.float(), y.float()


def _relative_error(mean: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest error of each output against its own size, as the warning judges them."""
    return float(((mean.double() - reference).abs().amax(0) / reference.abs().amax(0)).max())


def _messages(make) -> tuple[torch.Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean = make()
    return mean, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# The deep network's float32 flow at t = None is 1.4e-2 off float64 (above the 1 % line); the estimate at
# float32's ε read 3.7e-3 and was silent. With the entries' measured error it reads 2.2 %.
def test_a_deep_network_s_float32_flow_warns_where_its_kernel_s_own_error_moves_the_outputs():
    net = ntkgp.mlp(50, "erf", 2.25, 1.0)
    x, x_test, y = _data(100)
    reference = GradientFlow(net, x.double(), y.double()).predict(x_test.double()).mean
    mean, messages = _messages(lambda: GradientFlow(net, x, y, factor_dtype=torch.float32).predict(x_test).mean)
    assert _relative_error(mean, reference) > 1e-2
    assert len(messages) == 1 and "last digits" in messages[0] and "error against float64" in messages[0]


# The same network's NTK-GP posterior (noise 1e-3): 1.5e-2 off float64, estimated 0.29 % at ε (silent), now
# 1.7 % with the measured error; a two-layer ReLU network's stays quiet (its entries are rounded once)
@pytest.mark.parametrize(("depth", "activation", "weight_var", "bias_var", "warns"),
                         [(50, "erf", 2.25, 1.0, True), (1, "relu", 2.0, 0.01, False)])
def test_a_float32_posterior_counts_its_kernel_s_own_error(depth, activation, weight_var, bias_var, warns):
    net = ntkgp.mlp(depth, activation, weight_var, bias_var)
    x, x_test, y = _data(100, seed=1)
    reference = GPPosterior(net, x.double(), y.double(), kernel="ntkgp", noise=1e-3).predict(x_test.double()).mean
    mean, messages = _messages(lambda: GPPosterior(net, x, y, kernel="ntkgp", noise=1e-3, factor_dtype=torch.float32)
                               .predict(x_test).mean)
    error = _relative_error(mean, reference)
    if warns:
        assert error > 1e-2 and len(messages) == 1 and "error against float64" in messages[0]
        # a posterior's coefficients, not gradient flow's Θ⁻¹(I − e^{−Θτ})Y, which the message named before
        assert "coefficients (K + σ²I)⁻¹Y" in messages[0] and "Θτ" not in messages[0]
    else:
        assert error < 1e-3 and not messages


# The measure: a kernel off by a multiple of itself reads 0 (it moves the outputs by that multiple at most);
# rounding to float32 reads below float32's ε (the estimate keeps ε there); random errors their size
def test_entry_error_takes_out_the_proportional_part_and_averages():
    from ntkgp.predict.spectral import entry_error

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    exact = a @ a.mT + torch.eye(40)
    assert entry_error(exact * (1 + 1e-3), exact) < 1e-15
    assert entry_error(exact.float(), exact) < torch.finfo(torch.float32).eps / 2
    d = exact.diagonal().sqrt()
    noise = torch.randn(40, 40, generator=generator, dtype=torch.float64)
    noisy = exact + 1e-5 * (noise + noise.mT) / 2 ** 0.5 * d.unsqueeze(-1) * d.unsqueeze(-2)
    assert entry_error(noisy, exact) == pytest.approx(1e-5, rel=0.1)


# Above 256 training points the error is measured on 256 of them, evenly spaced (an N × N float64 kernel could be
# what a float32 user avoids): the mean square of 65 536 entries estimates all N²'s (measured 9.43e-7 against
# 9.26e-7 at N = 800 for the depth-50 network)
def test_the_sampled_entry_error_estimates_the_whole_kernel_s():
    from ntkgp.predict.spectral import ENTRY_POINTS, entry_error, sampled_entry_error

    net = ntkgp.mlp(20, "erf", 2.0, 1.0)
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        exact = net.kernel(x).ntk
        whole = entry_error(net.kernel(x.float()).ntk, exact)
        calls = []

        def kernel_of(points):
            calls.append(points.shape[0])
            return net.kernel(points).ntk

        sampled = sampled_entry_error(kernel_of, x.float(), exact.diagonal())
    assert calls == [ENTRY_POINTS, ENTRY_POINTS]
    assert whole > torch.finfo(torch.float32).eps and sampled == pytest.approx(whole, rel=0.1)


# A kernel's error grows with depth without limit: mlp(300, "relu", 2, 1)'s float32 NTK on 30 points is 7 500 ulps
# off (root mean square less the proportional part) and its flow (t = None, and t = 1 alike) and NTK-GP posterior
# 4.3e-2 off float64. An allowance of 100 ulps fixed beforehand never measured it (the estimate at ε read 1/450 of
# the line), and finite times were judged at ε: silent. A probe on 16 points (8 100 ulps) now says it can decide;
# measured, the estimate reads 11 %.
@pytest.mark.parametrize("predictor", ["flow", "flow at t = 1", "ntkgp"])
def test_a_very_deep_kernel_s_error_is_measured_whatever_the_estimate_at_eps(predictor):
    net = ntkgp.mlp(300, "relu", 2.0, 1.0)
    x, x_test, y = _data(30)

    def make(x, y):
        if predictor.startswith("flow"):
            t = 1.0 if predictor.endswith("1") else None
            return GradientFlow(net, x, y, factor_dtype=x.dtype).predict(x_test.to(x.dtype), t=t,
                                                                         compute_cov=False).mean
        return (GPPosterior(net, x, y, kernel="ntkgp", noise=1e-3, factor_dtype=x.dtype)
                .predict(x_test.to(x.dtype), compute_cov=False).mean)

    reference = make(x.double(), y.double())
    mean, messages = _messages(lambda: make(x, y))
    assert _relative_error(mean, reference) > 1e-2
    assert len(messages) == 1 and "error against float64" in messages[0]


# At finite times too: mlp(50, "erf", 2, 1)'s float32 flow with diag_reg=1e-3 on 30 points is 2.0e-2 off float64 at
# t = 1e4 and 2.3e-2 at 1e6, where the estimate at ε was silent and no direction counts as untrained; with the
# entries' measured error it warns from t = 1e4 on (2.8 %). At t = 1 (2.3e-5 off) it stays quiet.
def test_a_float32_flow_at_finite_times_counts_its_kernel_s_own_error():
    net = ntkgp.mlp(50, "erf", 2.0, 1.0)
    x, x_test, y = _data(30)
    times = [1.0, 1e4, 1e6]
    reference = GradientFlow(net, x.double(), y.double(), diag_reg=1e-3).predict(x_test.double(), t=times,
                                                                                 compute_cov=False).mean
    mean, messages = _messages(lambda: GradientFlow(net, x, y, diag_reg=1e-3, factor_dtype=torch.float32)
                               .predict(x_test, t=times, compute_cov=False).mean)
    errors = [_relative_error(m, r) for m, r in zip(mean, reference, strict=True)]
    assert errors[0] < 1e-4 and min(errors[1:]) > 1e-2
    assert len(messages) == 1 and messages[0].startswith("At t = 10000 and later")
    assert "error against float64" in messages[0]


def _network_gp(net, x: torch.Tensor, y: torch.Tensor, noise: float, kernel: str = "nngp"):
    from ntkgp.models import NetworkGP

    model = NetworkGP(x, y, net, kernel=kernel)
    model.likelihood.noise = noise
    return model.eval()


# A NetworkGP solves in its data's dtype (GPyTorch's Cholesky): the float32 NTK-GP of mlp(300, "relu", 2, 1) on 30
# points (noise 1e-3) predicts means 4.3e-2 off its float64 twin's (each of two outputs too), as
# GPPosterior(..., kernel="ntkgp", factor_dtype=torch.float32) does, which warned; the model said nothing. It now
# judges its first prediction after each training solve as GPPosterior judges its own (the estimate at ε is quiet;
# with the kernel's measured error, 7 500 ulps, it reads 6.4 %, 11 % for two outputs), and not the next.
@pytest.mark.parametrize("outputs", [None, 2])
def test_a_float32_network_gp_warns_once_per_training_solve_where_its_deep_kernel_moves_the_means(outputs):
    import copy

    x, x_test, y = _data(30)
    y = y[:, 0] if outputs is None else y
    model = _network_gp(ntkgp.mlp(300, "relu", 2.0, 1.0), x, y, 1e-3, kernel="ntk")
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        reference = twin(x_test.double()).mean.reshape(5, -1)
        mean, messages = _messages(lambda: model(x_test).mean.reshape(5, -1))
        assert _relative_error(mean, reference) > 3e-2
        assert len(messages) == 1 and "last digits" in messages[0] and "error against float64" in messages[0]
        assert "Predict in float64" in messages[0]
        assert "coefficients (K + σ²I)⁻¹Y" in messages[0] and "Θτ" not in messages[0]   # GPyTorch's solve's
        assert not _messages(lambda: model(x_test[:3]).mean)[1]   # the same training solve: judged once
        model.likelihood.noise = 2e-3                                # a new one: judged again
        assert len(_messages(lambda: model(x_test).mean)[1]) == 1


# Where float32 holds (shallow networks: means 8e-5 off float64's, relative) the model stays quiet; a float64 model
# computes nothing for the judgement (no probe of its kernel: the same kernel evaluations as GPyTorch's own), a float32
# one the training variances (a diagonal) and the probe's 16-point kernel in float64, no more: its float32 entries
# are those of GPyTorch's training kernel (formed again, they were a float32 kernel of their own, as costly)
@pytest.mark.parametrize(("depth", "activation"), [(1, "relu"), (3, "erf")])
def test_a_network_gp_judges_float32_alone_and_stays_quiet_where_it_holds(depth, activation):
    import copy

    x, x_test, y = _data(100)
    net = ntkgp.mlp(depth, activation)
    counts = []

    def counted(model):
        calls = []
        kernel = model.net.kernel

        def count(*args, **kwargs):
            calls.append((args[0].shape[-2], kwargs.get("diag", False), args[0].dtype))
            return kernel(*args, **kwargs)

        model.net.kernel = count
        counts.append(calls)
        return model

    model = counted(_network_gp(copy.deepcopy(net), x, y[:, 0], 1e-2))
    twin = counted(_network_gp(copy.deepcopy(net), x.double(), y[:, 0].double(), 1e-2))
    with torch.no_grad():
        reference, messages64 = _messages(lambda: twin(x_test.double()).mean)
        mean, messages = _messages(lambda: model(x_test).mean)
    assert _relative_error(mean.unsqueeze(-1), reference.unsqueeze(-1)) < 1e-3
    assert not messages and not messages64
    float32, float64 = counts
    assert [call[:2] for call in float32[:len(float64)]] == [call[:2] for call in float64]
    assert float32[len(float64):] == [(100, True, torch.float32), (16, False, torch.float64)]


def _feature_gp(x: torch.Tensor, y: torch.Tensor, net, scale: float, kernel: str):
    """A NetworkGP subclass as deep kernel learning writes one: a feature map (here a fixed scaling) before the
    kernel, in its own forward."""
    from ntkgp.models import NetworkGP

    class FeatureGP(NetworkGP):
        def forward(self, z):
            return super().forward(scale * z)

    return FeatureGP(x, y, net, kernel=kernel)


# The judgement measures the kernel the covariance was made of, at the inputs it saw: a subclass's forward that
# maps the inputs to features (deep kernel learning) was measured at the raw inputs. The NTK-GP of
# mlp(300, "relu", 2, 1) on inputs of scale 0.01 mapped 100-fold up: means 2.4e-2 off float64's, silent (the raw
# inputs' kernel measured 7.7e-7 of each entry, the features' 8.9e-4: 1.9 %); on standard-normal inputs mapped
# 100-fold down: 7.9e-5 off, but the raw inputs' measure (9.0e-4) read 25 % and warned
@pytest.mark.parametrize(("raw", "scale", "warns"), [(0.01, 100.0, True), (1.0, 0.01, False)])
def test_a_float32_network_gp_measures_its_kernel_at_the_features_a_subclass_gives_it(raw, scale, warns):
    import copy

    x, x_test, y = _data(30)
    x, x_test, y = raw * x, raw * x_test, torch.sin(x.sum(-1))
    model = _feature_gp(x, y, ntkgp.mlp(300, "relu", 2.0, 1.0), scale, "ntk")
    model.likelihood.noise = 1e-3
    model.eval()
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        reference = twin(x_test.double()).mean
        mean, messages = _messages(lambda: model(x_test).mean)
    error = _relative_error(mean.unsqueeze(-1), reference.unsqueeze(-1))
    assert (error > 2e-2) if warns else (error < 1e-3)
    assert len(messages) == int(warns)
    assert not messages or "error against float64" in messages[0]


# A subclass that wraps the network kernel in a ScaleKernel: its first float32 prediction failed with "object has
# no attribute 'net'" (the judgement read the kernel's network from covar_module). Its means are those of the plain
# model with the noise divided by the scale (s K* (s K + σ²)⁻¹ y = K* (K + σ²/s)⁻¹ y)
def test_a_float32_network_gp_with_a_scaled_kernel_predicts():
    import gpytorch

    from ntkgp.models import NetworkGP

    x, x_test, y = _data(30)
    model = NetworkGP(x, y[:, 0], ntkgp.mlp(1, "relu"))
    model.covar_module = gpytorch.kernels.ScaleKernel(model.covar_module).to(x)
    model.covar_module.outputscale = 4.0
    model.likelihood.noise = 4e-2
    plain = _network_gp(ntkgp.mlp(1, "relu"), x, y[:, 0], 1e-2)
    with torch.no_grad():
        mean, messages = _messages(lambda: model.eval()(x_test).mean)
        reference = plain(x_test).mean
    # float32 solves of a kernel of condition 2.8e3: 2.6e-5 of the means' size measured
    assert _relative_error(mean.unsqueeze(-1), reference.double().unsqueeze(-1)) < 1e-4 and not messages


# A deep kernel wrapped in a ScaleKernel was judged at ε alone (its error was measured only for a bare network
# kernel): the NTK-GP of mlp(300, "relu", 2, 1) scaled by 4 on 30 points (noise 1e-3) predicted means 4.3e-2 off
# the float64 model's, silently, as the unscaled one did before it was measured. Measured through the wrapper (s K's
# entries are s times K's, the training variances s K_ii + σ²) it reads 6.4 %, as the unscaled model's; formed in
# float64 alone (the float32 kernel is GPyTorch's). The shallow network's (1.7e-5 off) stays quiet.
@pytest.mark.parametrize(("depth", "warns"), [(300, True), (1, False)])
def test_a_float32_network_gp_measures_a_scaled_deep_kernel_through_its_wrapper(depth, warns):
    import copy

    import gpytorch

    from ntkgp.models import NetworkGP

    x, x_test, y = _data(30)
    model = NetworkGP(x, y[:, 0], ntkgp.mlp(depth, "relu", 2.0, 1.0), kernel="ntk")
    model.covar_module = gpytorch.kernels.ScaleKernel(model.covar_module).to(x)
    model.covar_module.outputscale, model.likelihood.noise = 4.0, 1e-3
    model.eval()
    twin = copy.deepcopy(model).double()
    calls = []
    net = model.covar_module.base_kernel.net
    kernel = net.kernel

    def count(*args, **kwargs):
        calls.append((args[0].shape[-2], kwargs.get("diag", False), args[0].dtype))
        return kernel(*args, **kwargs)

    with torch.no_grad():
        reference = twin(x_test.double()).mean
        net.kernel = count
        mean, messages = _messages(lambda: model(x_test).mean)
    error = _relative_error(mean.unsqueeze(-1), reference.unsqueeze(-1))
    assert (error > 3e-2) if warns else (error < 1e-4)
    assert len(messages) == int(warns)
    assert not messages or ("error against float64" in messages[0] and "Predict in float64" in messages[0])
    # beyond GPyTorch's float32 kernels (training, cross, test) and the training variances: float64 ones alone
    assert [call[:2] for call in calls if call[2] == torch.float64] == [(16, False)] + [(30, False)] * warns


class _InducingGP(ntkgp.models.NetworkGP):
    """SGPR (Titsias 2009) over the network kernel, on the first 3 of 4 features, every training point inducing."""

    def __init__(self, x, y, net, **kwargs):
        import gpytorch

        super().__init__(x, y, net, **kwargs)
        self.covar_module = gpytorch.kernels.InducingPointKernel(
            self.covar_module, x[:, :3].clone(), self.likelihood, active_dims=torch.tensor([0, 1, 2])).to(x)


# A subclass that wraps the network kernel in an InducingPointKernel: its first float32 prediction failed with
# "expected m1 and m2 to have the same dtype" (the wrapped kernel was evaluated in float64 for the judgement, where
# its float32 inducing points cannot enter), and, that failure caught, GPyTorch's evaluate_kernel left the
# kernel's active_dims at None (the next prediction fed it all 4 features: "x1 and x2 must have the same number of
# features, got 4 and 3"). Without a float64 reference it is judged at ε alone, as before the wrapped kernels were
# measured; with every training point inducing, its means are the exact GP's on the 3 features
@pytest.mark.parametrize("lazy", [True, False])
def test_a_float32_network_gp_with_an_inducing_point_kernel_predicts(lazy):
    import gpytorch

    from ntkgp.models import NetworkGP

    generator = torch.Generator().manual_seed(0)
    x, x_test = (torch.randn(rows, 4, generator=generator, dtype=torch.float64) for rows in (20, 5))
    y = torch.sin(x[:, :3].sum(-1))
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    model = _InducingGP(x.float(), y.float(), net, kernel="ntk").eval()
    exact = NetworkGP(x[:, :3], y, ntkgp.mlp(1, "erf", 2.0, 0.1), kernel="ntk").eval()
    for gp in (model, exact):
        gp.likelihood.noise = 1e-2
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(lazy):
        reference = exact(x_test[:, :3]).mean
        mean, messages = _messages(lambda: model(x_test.float()).mean)
        model.likelihood.noise = 2e-2   # a new training solve, judged again
        model.likelihood.noise = 1e-2
        again, more = _messages(lambda: model(x_test.float()).mean)
    # float32 solves of the rank-20 SGPR covariance: 3.3e-4 of the means' size measured
    assert _relative_error(mean.unsqueeze(-1), reference.unsqueeze(-1)) < 1e-3 and not messages + more
    assert torch.equal(again, mean) and torch.equal(model.covar_module.active_dims, torch.tensor([0, 1, 2]))
