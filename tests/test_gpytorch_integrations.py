"""NNGPKernel and NTKKernel inside GPyTorch and BoTorch constructions that the other test files do not build:
GPyTorch's settings, SGPR, deep kernel learning, kernel algebra, Hadamard and Kronecker multitask models,
batched exact GPs, priors registered by hand, and BoTorch's multitask models and acquisition gradients.

Each model is checked against the same quantity written out densely in float64 from ``net.kernel``."""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch

import ntkgp

DT = torch.float64


def _data(n: int = 20, d: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=DT)
    return x, torch.sin(4 * x[:, 0]) + x[:, 1:].sum(-1)


def _net(activation: str = "relu") -> ntkgp.Layer:
    return ntkgp.mlp(2, activation, 1.8, 0.1).double()


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel, likelihood=None):
        super().__init__(x, y, likelihood if likelihood is not None else gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel
        self.double()   # the likelihood too: a float32 noise of 1e-2 is 1e-10 off

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _posterior(k, k_star, k_star_star_diag, y, noise):
    """The zero-mean GP posterior mean and marginal variances by a float64 Cholesky factor."""
    chol = torch.linalg.cholesky(k + noise * torch.eye(len(k), dtype=DT))
    mean = k_star @ torch.cholesky_solve(y[:, None], chol)[:, 0]
    var = k_star_star_diag - (k_star * torch.cholesky_solve(k_star.T, chol).T).sum(-1)
    return mean, var


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
@pytest.mark.parametrize("setting", ["debug", "lazily_evaluate_kernels", "fast_pred_var", "cg"])
def test_gpytorch_settings_leave_the_posterior_and_likelihood_exact(kernel_class, setting):
    """Under each setting the posterior is the dense one: exactly up to rounding (1e-10) where solves stay
    Cholesky; under ``max_cholesky_size(0)`` to 1e-4 (GPyTorch's preconditioned CG, at a tolerance of 1e-9 on its
    own residual, and its Lanczos variances were 1.1e-5 off at most)."""
    x, y = _data()
    x_test = _data(7, seed=1)[0]
    net = _net()
    kernel = kernel_class(net)
    noise = 1e-2
    model = _GP(x, y, kernel)
    model.likelihood.noise = torch.tensor(noise, dtype=DT)   # a float is set through float32
    with torch.no_grad():
        kd = getattr(net.kernel(torch.cat([x, x_test])), kernel_class.kind)
    mean_ref, var_ref = _posterior(kd[:20, :20], kd[20:, :20], kd[20:, 20:].diagonal(), y, noise)
    mll_ref = torch.distributions.MultivariateNormal(torch.zeros(20, dtype=DT),
                                                     kd[:20, :20] + noise * torch.eye(20, dtype=DT)).log_prob(y) / 20
    contexts = {"debug": [gpytorch.settings.debug(True)],
                "lazily_evaluate_kernels": [gpytorch.settings.lazily_evaluate_kernels(False)],
                "fast_pred_var": [gpytorch.settings.fast_pred_var()],
                "cg": [gpytorch.settings.max_cholesky_size(0), gpytorch.settings.cg_tolerance(1e-9),
                       gpytorch.settings.eval_cg_tolerance(1e-9), gpytorch.settings.max_cg_iterations(200),
                       gpytorch.settings.num_trace_samples(0), gpytorch.settings.skip_logdet_forward(False)]}
    tol = 1e-4 if setting == "cg" else 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # GPyTorch's note that fast_pred_var's Lanczos cache is approximate
        for ctx in contexts[setting]:
            ctx.__enter__()
        try:
            if setting != "cg" and setting != "fast_pred_var":
                model.train()
                mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
                assert float(mll(model(x), y)) == pytest.approx(float(mll_ref), abs=1e-12)
            model.eval()
            with torch.no_grad():
                out = model(x_test)
                mean, var = out.mean, out.variance
        finally:
            for ctx in reversed(contexts[setting]):
                ctx.__exit__(None, None, None)
    torch.testing.assert_close(mean, mean_ref, rtol=0, atol=tol)
    # fast_pred_var's Lanczos cache is exact here: 20 points are fewer than its rank (max_root_decomposition_size)
    torch.testing.assert_close(var, var_ref, rtol=0, atol=tol)


def test_sgpr_with_the_training_points_as_inducing_points_is_the_exact_gp():
    """``InducingPointKernel`` (SGPR, Titsias 2009) over an ntkgp kernel: with every training point an inducing
    point, ``Q = K_xz K_zz⁻¹ K_zx = K`` and its posterior is the exact one (1e-6: GPyTorch's jitter on ``K_zz``
    moved it 4.5e-8); with fewer, its marginal likelihood is the collapsed bound, below the exact one."""
    x, y = _data()
    x_test = _data(7, seed=1)[0]
    net = _net("erf")
    noise = 1e-2
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = torch.tensor(noise, dtype=DT)   # a float is set through float32
    sgpr = _GP(x, y, gpytorch.kernels.InducingPointKernel(ntkgp.NNGPKernel(net), x.clone(), likelihood), likelihood)
    sgpr.eval()
    with torch.no_grad():
        out = sgpr(x_test)
        kd = net.kernel(torch.cat([x, x_test])).nngp
    mean_ref, var_ref = _posterior(kd[:20, :20], kd[20:, :20], kd[20:, 20:].diagonal(), y, noise)
    torch.testing.assert_close(out.mean, mean_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.variance, var_ref, rtol=0, atol=1e-6)

    partial = _GP(x, y, gpytorch.kernels.InducingPointKernel(ntkgp.NNGPKernel(net), x[:6].clone(), likelihood),
                  likelihood)
    partial.train()
    bound = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, partial)(partial(x), y)
    bound.backward()
    exact = torch.distributions.MultivariateNormal(torch.zeros(20, dtype=DT),
                                                   kd[:20, :20] + noise * torch.eye(20, dtype=DT)).log_prob(y) / 20
    assert float(bound) < float(exact)
    assert net[0].raw_weight_var.grad is not None and torch.isfinite(net[0].raw_weight_var.grad).all()


def test_deep_kernel_learning_gradients_reach_the_feature_extractor():
    """A torch extractor in front of the kernel (deep kernel learning, Wilson et al. 2016): the marginal
    likelihood's gradients in the extractor's weights and the kernel's variances are those of the dense
    float64 log density of ``net.kernel(extractor(x))`` (1e-10: two factorizations of one matrix)."""
    x, y = _data(15, 3)
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    net = _net()
    noise = 0.05

    class DKL(_GP):
        def __init__(self):
            super().__init__(x, y, ntkgp.NTKKernel(net))
            self.extractor = extractor

        def forward(self, inputs):
            return super().forward(self.extractor(inputs))

    model = DKL()
    model.likelihood.noise = torch.tensor(noise, dtype=DT)   # a float is set through float32
    model.train()
    loss = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    params = [extractor[0].weight, extractor[2].bias, net[0].raw_weight_var, net[4].raw_bias_var]
    grads = torch.autograd.grad(loss, params)
    k = net.kernel(extractor(x)).ntk + noise * torch.eye(15, dtype=DT)
    ref = torch.distributions.MultivariateNormal(torch.zeros(15, dtype=DT), k).log_prob(y) / 15
    ref_grads = torch.autograd.grad(ref, params)
    assert float(loss) == pytest.approx(float(ref), abs=1e-12)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert float(grad.abs().max()) > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_kernel_algebra_with_gpytorch_kernels_and_their_diagonals():
    """``ScaleKernel``, ``+``/``*``, ``AdditiveKernel``, ``ProductKernel`` with an ``RBFKernel`` on other
    ``active_dims``: each entry is the formula's (exactly), and ``diag=True`` is the dense diagonal."""
    x = _data(9, 3)[0]
    x2 = _data(5, 3, seed=1)[0]
    net = _net("erf")
    kernel = ntkgp.NTKKernel(net, active_dims=[0, 1])
    rbf = gpytorch.kernels.RBFKernel(active_dims=[2]).double()
    scale = gpytorch.kernels.ScaleKernel(kernel).double()
    scale.outputscale = torch.tensor(1.7, dtype=DT)
    with torch.no_grad():
        k = net.kernel(x[:, :2], x2[:, :2]).ntk
        r = torch.exp(-0.5 * (x[:, 2:] - x2[:, 2:].T) ** 2 / rbf.lengthscale.item() ** 2)
        cases = {"scale": (scale, 1.7 * k), "sum": (kernel + rbf, k + r), "product": (kernel * rbf, k * r),
                 "AdditiveKernel": (gpytorch.kernels.AdditiveKernel(kernel, rbf), k + r),
                 "ProductKernel": (gpytorch.kernels.ProductKernel(kernel, rbf), k * r)}
        for name, (composite, expected) in cases.items():
            torch.testing.assert_close(composite(x, x2).to_dense(), expected, rtol=1e-14, atol=0, msg=name)
            torch.testing.assert_close(composite(x, diag=True), composite(x).to_dense().diagonal(),
                                       rtol=1e-14, atol=0, msg=name)


def test_hadamard_multitask_model_with_an_index_kernel_is_the_dense_product():
    """Multitask by a Hadamard product (GPyTorch's ``IndexKernel`` on a task column, ``active_dims``
    separating it from the features): the posterior is the dense ``K(x, x') B[t, t']`` one (1e-10)."""
    x, y = _data(16, 2)
    tasks = (torch.arange(16) % 2).to(DT)[:, None]
    inputs = torch.cat([x, tasks], -1)
    test = torch.cat([_data(5, 2, seed=1)[0], torch.tensor([[0.], [1.], [1.], [0.], [1.]], dtype=DT)], -1)
    net = _net()
    index = gpytorch.kernels.IndexKernel(num_tasks=2, rank=1, active_dims=[2]).double()
    index.covar_factor.data = torch.tensor([[0.8], [-0.5]], dtype=DT)
    noise = 0.02
    model = _GP(inputs, y, ntkgp.NNGPKernel(net, active_dims=[0, 1]) * index)
    model.likelihood.noise = torch.tensor(noise, dtype=DT)   # a float is set through float32
    model.eval()
    with torch.no_grad():
        out = model(test)
        every = torch.cat([inputs, test])
        b = index.covar_matrix.to_dense()
        t = every[:, 2].long()
        kd = net.kernel(every[:, :2]).nngp * b[t][:, t]
    mean_ref, var_ref = _posterior(kd[:16, :16], kd[16:, :16], kd[16:, 16:].diagonal(), y, noise)
    torch.testing.assert_close(out.mean, mean_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.variance, var_ref, rtol=0, atol=1e-10)


def test_multitask_kernel_is_the_kronecker_product_with_the_task_covariance():
    """``MultitaskKernel(NNGPKernel(net), num_tasks)``: ``K ⊗ B`` with tasks interleaved, exactly, and
    a ``MultitaskGaussianLikelihood`` model's posterior mean is the dense one (1e-10)."""
    x, y1 = _data(12, 2)
    y = torch.stack([y1, y1 ** 2 - 0.5], -1)
    x_test = _data(4, 2, seed=1)[0]
    net = _net()
    kernel = gpytorch.kernels.MultitaskKernel(ntkgp.NNGPKernel(net), num_tasks=2, rank=1).double()
    kernel.task_covar_module.covar_factor.data = torch.tensor([[0.9], [0.4]], dtype=DT)

    class MT(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0))
            self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ZeroMean(), num_tasks=2)
            self.covar_module = kernel

        def forward(self, inputs):
            return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(inputs),
                                                                      self.covar_module(inputs))

    model = MT().double()
    model.likelihood.noise = torch.tensor(0.03, dtype=DT)
    model.likelihood.task_noises = torch.tensor([0.01, 0.02], dtype=DT)
    model.eval()
    with torch.no_grad():
        b = kernel.task_covar_module.covar_matrix.to_dense()
        every = torch.cat([x, x_test])
        kd = torch.kron(net.kernel(every).nngp, b)
        torch.testing.assert_close(kernel(x, x_test).to_dense(), kd[:24, 24:], rtol=1e-14, atol=0)
        noise = torch.diag((torch.tensor([0.01, 0.02], dtype=DT) + 0.03).repeat(12))
        k = kd[:24, :24] + noise
        mean_ref = kd[24:, :24] @ torch.linalg.solve(k, y.reshape(-1))
        out = model(x_test)
    torch.testing.assert_close(out.mean.reshape(-1), mean_ref, rtol=0, atol=1e-10)


def test_a_batched_exact_gp_is_one_dense_gp_per_batch_with_its_own_variances():
    """A kernel of ``batch_shape=(3,)`` in an ``ExactGP`` on ``(3, n, d)`` inputs: batch ``b``'s posterior
    and marginal likelihood are those of the network holding the variances at index ``b`` (1e-10)."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 10, 2, generator=g, dtype=DT)
    y = torch.sin(3 * x.sum(-1))
    x_test = torch.rand(3, 4, 2, generator=g, dtype=DT)
    weight_vars = torch.tensor([0.8, 1.5, 2.5], dtype=DT)
    net = _net("erf")
    kernel = ntkgp.NTKKernel(net, batch_shape=torch.Size([3]))
    net[2].weight_var = weight_vars
    noise = torch.tensor([0.01, 0.05, 0.1], dtype=DT)
    model = _GP(x, y, kernel, gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([3])))
    model.likelihood.noise = noise[:, None]
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    model.eval()
    with torch.no_grad():
        out = model(x_test)
    assert out.mean.shape == (3, 4)
    for b in range(3):
        single = _net("erf")
        single[2].weight_var = weight_vars[b]
        with torch.no_grad():
            kd = single.kernel(torch.cat([x[b], x_test[b]])).ntk
        mean_ref, var_ref = _posterior(kd[:10, :10], kd[10:, :10], kd[10:, 10:].diagonal(), y[b], noise[b])
        torch.testing.assert_close(out.mean[b], mean_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.variance[b], var_ref, rtol=0, atol=1e-10)
        ref = torch.distributions.MultivariateNormal(torch.zeros(10, dtype=DT),
                                                     kd[:10, :10] + noise[b] * torch.eye(10, dtype=DT))
        assert float(mll[b]) == pytest.approx(float(ref.log_prob(y[b])) / 10, abs=1e-12)


def test_priors_registered_on_a_layer_by_hand_are_sampled_and_counted():
    """GPyTorch's ``register_prior`` on a layer by the variance's name: ``sample_from_prior`` sets the
    variance, BoTorch's ``sample_all_priors`` (its fit's retry) samples every one, and the marginal
    likelihood adds each log prior once, over ``n`` (exactly the dense sum)."""
    from botorch.optim.utils import sample_all_priors

    x, y = _data(10)
    net = _net()
    net[0].register_prior("weight_var_gamma", gpytorch.priors.GammaPrior(3.0, 2.0), "weight_var")
    net[4].register_prior("bias_var_lognormal", gpytorch.priors.LogNormalPrior(-2.0, 0.5), "bias_var")
    kernel = ntkgp.NNGPKernel(net)
    assert [name for name, *_ in kernel.named_priors()] == ["net.layers.0.weight_var_gamma",
                                                           "net.layers.4.bias_var_lognormal"]
    torch.manual_seed(0)
    net[0].sample_from_prior("weight_var_gamma")
    first = float(net[0].weight_var)
    assert first != 1.8 and first > 0
    model = _GP(x, y, kernel)
    model.likelihood.noise = torch.tensor(0.05, dtype=DT)
    sample_all_priors(model)
    assert float(net[0].weight_var) != first and float(net[4].bias_var) != 0.1
    model.train()
    value = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    with torch.no_grad():
        k = net.kernel(x).nngp + 0.05 * torch.eye(10, dtype=DT)
        gamma = gpytorch.priors.GammaPrior(3.0, 2.0).double()   # lgamma of a float32 concentration: 1e-8 off
        lognormal = gpytorch.priors.LogNormalPrior(-2.0, 0.5).double()
        log_prior = gamma.log_prob(net[0].weight_var) + lognormal.log_prob(net[4].bias_var)
        ref = (torch.distributions.MultivariateNormal(torch.zeros(10, dtype=DT), k).log_prob(y) + log_prior) / 10
    assert float(value) == pytest.approx(float(ref), abs=1e-12)


def test_botorch_resampling_of_the_priors_leaves_frozen_variances_as_they_were():
    """BoTorch's ``fit_gpytorch_mll`` resamples every prior between attempts (``sample_all_priors``) inside
    ``parameter_rollback_ctx`` over the frozen parameters, which restores their raw values alone. A sample
    installed as the setter installs a value (a new anchor, raw = 0) left a frozen readout ``weight_var`` at
    ``sample · exp(raw)`` (1.93 came back as 1.69 here), where an ``RBFKernel``'s frozen lengthscale comes back as it
    was. The free variance holds its sample (to a few ulp: anchor · exp(log(sample) − log(anchor)))."""
    from botorch.optim.utils import get_parameters, sample_all_priors
    from botorch.utils.context_managers import parameter_rollback_ctx

    gamma = gpytorch.priors.GammaPrior
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1, weight_var_prior=gamma(2.0, 1.0)), ntkgp.ReLU(),
                       ntkgp.Dense(1, 1.5, 0.2, weight_var_prior=gamma(2.0, 1.0))).double()
    with torch.no_grad():
        net[2].raw_weight_var.fill_(0.25)   # a fitted value, 1.5 e^0.25
    net[2].requires_grad_(False)            # a readout frozen (under a ScaleKernel, docs/api/kernels.md)
    frozen = net[2].weight_var.detach().clone()
    x, y = _data(10)
    model = _GP(x, y, ntkgp.NTKKernel(net))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    torch.manual_seed(0)
    expected = [net[0].weight_var_prior.sample(), net[2].weight_var_prior.sample()]   # sample_all_priors' order
    torch.manual_seed(0)
    with parameter_rollback_ctx(get_parameters(mll, requires_grad=False)):
        sample_all_priors(model)
        assert float(net[2].weight_var) == pytest.approx(float(expected[1]), rel=1e-15)   # sampled, then
    assert torch.equal(net[2].weight_var.detach(), frozen)                                 # rolled back
    assert float(net[0].weight_var) == pytest.approx(float(expected[0]), rel=1e-15)
    assert float(expected[0]) != 2.0


def test_a_prior_sample_of_zero_leaves_frozen_variances_to_botorchs_rollback():
    """A sample of exactly 0 (a wide LogNormal prior's underflows: 3e-4 of LogNormalPrior(0, 30)'s in float32)
    was installed as the setter installs a value, as the anchor: BoTorch's rollback of the frozen raw
    parameters then brought a frozen readout ``weight_var`` of 1.5 e^0.25 back as 0 (0 · e^0.25). The sample
    now underflows ``raw`` instead, beside the anchor; the free variance sampled 0 acts as one set to 0,
    which pins it (the same kernel, bit for bit, and a gradient of exactly 0 with respect to ``raw``)."""
    import copy

    from botorch.optim.utils import get_parameters
    from botorch.utils.context_managers import parameter_rollback_ctx

    gamma = gpytorch.priors.GammaPrior
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1, weight_var_prior=gamma(2.0, 1.0)), ntkgp.ReLU(),
                       ntkgp.Dense(1, 1.5, 0.2, weight_var_prior=gamma(2.0, 1.0))).double()
    with torch.no_grad():
        net[2].raw_weight_var.fill_(0.25)
    net[2].requires_grad_(False)
    frozen = net[2].weight_var.detach().clone()
    x, y = _data(10)
    model = _GP(x, y, ntkgp.NTKKernel(net))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    zero = torch.tensor(0.0, dtype=DT)
    with parameter_rollback_ctx(get_parameters(mll, requires_grad=False)):
        for _, module, _, _, setting_closure in model.named_priors():   # sample_all_priors, drawing 0s
            setting_closure(module, zero)
        assert float(net[2].weight_var.detach()) == 0.0 and float(net[0].weight_var.detach()) == 0.0
    assert torch.equal(net[2].weight_var.detach(), frozen)
    pinned = copy.deepcopy(net)
    pinned[0].weight_var = 0.0
    value = ntkgp.NTKKernel(net)(x).to_dense()
    assert torch.equal(value, ntkgp.NTKKernel(pinned)(x).to_dense())
    (gradient,) = torch.autograd.grad(value.sum(), net[0].raw_weight_var)
    assert float(gradient) == 0.0


def test_botorch_multitask_gp_uses_the_kernel_on_the_features_alone():
    """BoTorch's ``MultiTaskGP(covar_module=...)`` gives a kernel without ``active_dims`` the non-task
    columns; the posterior is the dense ``K(x, x') B[t, t']`` one (1e-9, BoTorch's float64 Cholesky)."""
    from botorch.models import MultiTaskGP

    x, y = _data(14, 2)
    tasks = (torch.arange(14) % 2).to(DT)[:, None]
    net = _net()
    model = MultiTaskGP(torch.cat([x, tasks], -1), y[:, None], task_feature=-1, covar_module=ntkgp.NTKKernel(net),
                        mean_module=gpytorch.means.ZeroMean(), outcome_transform=None)
    model.likelihood.noise = torch.tensor(0.02, dtype=DT)
    x_test = _data(3, 2, seed=1)[0]
    post = model.posterior(x_test)   # every task at each point: (3, 2)
    with torch.no_grad():
        task_covar = model.covar_module.kernels[1]
        b = task_covar(torch.tensor([[0., 0., 0.], [0., 0., 1.]], dtype=DT)).to_dense()   # its active_dims: [2]
        kd = net.kernel(torch.cat([x, x_test])).ntk
        t = tasks[:, 0].long()
        k = kd[:14, :14] * b[t][:, t] + 0.02 * torch.eye(14, dtype=DT)
        for task in range(2):
            k_star = kd[14:, :14] * b[task][t]
            mean = k_star @ torch.linalg.solve(k, y)
            torch.testing.assert_close(post.mean[:, task].detach(), mean, rtol=0, atol=1e-9)


def test_botorch_kronecker_multitask_gp_posterior_is_the_dense_kronecker_gp():
    """``KroneckerMultiTaskGP(data_covar_module=NTKKernel(net))``: the posterior mean and variances are those of
    the dense GP with covariance ``K ⊗ B`` and noise ``I ⊗ (diag(task noises) + noise)`` (1e-9)."""
    from botorch.models import KroneckerMultiTaskGP

    x, y1 = _data(12, 2)
    y = torch.stack([y1, 2 * x[:, 0] - 1, x.sum(-1)], -1)
    x_test = _data(4, 2, seed=1)[0]
    net = _net("erf")
    model = KroneckerMultiTaskGP(x, y, data_covar_module=ntkgp.NTKKernel(net), outcome_transform=None)
    post = model.posterior(x_test)
    with torch.no_grad():
        b = model.covar_module.task_covar_module.covar_matrix.to_dense()
        noise = model.likelihood.task_noises.reshape(-1) + model.likelihood.noise.reshape(-1)
        kd = net.kernel(torch.cat([x, x_test])).ntk
        k = torch.kron(kd[:12, :12], b) + torch.diag(noise.repeat(12))
        k_star = torch.kron(kd[12:, :12], b)
        means = torch.stack([m.constant for m in model.mean_module.base_means]).reshape(-1)
        mean = means.repeat(4) + k_star @ torch.linalg.solve(k, (y - means).reshape(-1))
        cov = torch.kron(kd[12:, 12:], b) - k_star @ torch.linalg.solve(k, k_star.T)
        torch.testing.assert_close(post.mean.reshape(-1), mean, rtol=0, atol=1e-9)
        torch.testing.assert_close(post.variance.reshape(-1), cov.diagonal(), rtol=0, atol=1e-9)


def test_q_log_expected_improvement_gradients_in_the_candidates_match_finite_differences():
    """``qLogExpectedImprovement`` on a ``SingleTaskGP(covar_module=NTKKernel(net))`` with fixed base samples:
    its autograd gradient in the candidates is the central difference's (step 1e-6: error ~1e-9 relative)."""
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.models import SingleTaskGP
    from botorch.sampling import SobolQMCNormalSampler

    x, y = _data(12, 2)
    model = SingleTaskGP(x, y[:, None], covar_module=ntkgp.NTKKernel(_net("erf")))
    model.likelihood.noise = torch.tensor(1e-2, dtype=DT)
    acq = qLogExpectedImprovement(model, best_f=y.max(), sampler=SobolQMCNormalSampler(torch.Size([64]), seed=0))
    candidates = torch.tensor([[[0.3, 0.7], [0.8, 0.2]]], dtype=DT, requires_grad=True)
    grad, = torch.autograd.grad(acq(candidates).sum(), candidates)
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                step = torch.zeros_like(candidates)
                step[0, i, j] = 1e-6
                numeric = (acq(candidates + step) - acq(candidates - step)) / 2e-6
                assert float(grad[0, i, j]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-8)
    assert float(grad.abs().max()) > 1e-3 and math.isfinite(float(grad.abs().max()))


class _Outputs(torch.nn.Module):
    """A model's predictive mean and variance as a module's outputs, what ``torch.jit.trace`` takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        out = self.model(inputs)
        return out.mean, out.variance


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")   # GPyTorch's own, on the RBF trace
def test_tracing_a_model_is_refused_by_name():
    """GPyTorch's recipe for exporting a model (``fast_pred_var``, ``trace_mode``, ``torch.jit.trace``) works for
    an ``RBFKernel``; the network kernels branch on the inputs' values, which a trace freezes, and failed with
    "x1 and x2 must have the same number of features, got 2 and 2": now a ``NotImplementedError`` that says why."""
    x, y = _data(10)

    for kernel in (gpytorch.kernels.RBFKernel(), ntkgp.NTKKernel(_net("erf"))):
        model = _GP(x, y, kernel)
        model.eval()
        x_test = _data(4, seed=1)[0]
        with gpytorch.settings.fast_pred_var(), gpytorch.settings.trace_mode(), torch.no_grad():
            model(x_test)
            if isinstance(kernel, gpytorch.kernels.RBFKernel):
                traced = torch.jit.trace(_Outputs(model), x_test)
                torch.testing.assert_close(traced(x)[0], model(x).mean, rtol=1e-12, atol=1e-12)
            else:
                with pytest.raises(NotImplementedError, match=r"cannot be traced by torch\.jit\.trace"):
                    torch.jit.trace(_Outputs(model), x_test)


def test_tracing_is_refused_on_every_way_into_the_kernels():
    """``ScaleKernel`` calls its base kernel's ``forward``, not ``__call__``, and ``net.kernel`` is no GPyTorch
    kernel at all: traced, both failed inside torch ("We don't have an op for aten::view but it isn't a special
    case"). Outside a trace the same calls run: ``trace_mode`` without ``torch.jit``, ``torch.func``'s ``jacrev``
    in the inputs (checked against central differences of the kernel's sum: 1e-6 of its scale, the steps' error)."""
    x, y = _data(10)
    x_test = _data(4, seed=1)[0]
    net = _net("erf")

    class Kernel(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return self.net.kernel(inputs, x).ntk

    model = _GP(x, y, gpytorch.kernels.ScaleKernel(ntkgp.NTKKernel(net)))
    model.eval()
    with gpytorch.settings.fast_pred_var(), gpytorch.settings.trace_mode(), torch.no_grad():
        mean = model(x_test).mean
        assert mean.shape == (4,) and bool(torch.isfinite(mean).all())
        with pytest.raises(NotImplementedError, match=r"^NTKKernel cannot be traced by torch\.jit\.trace"):
            torch.jit.trace(_Outputs(model), x_test)
        with pytest.raises(NotImplementedError, match=r"^Serial\.kernel cannot be traced by torch\.jit\.trace.*"
                                                      r"Call net\.kernel itself\.$"):
            torch.jit.trace(Kernel(net), x_test)

    def total(points):
        return net.kernel(points, x).ntk.sum()

    grad = torch.func.jacrev(total)(x_test)
    with torch.no_grad():
        for i, j in ((0, 0), (3, 1)):
            step = torch.zeros_like(x_test)
            step[i, j] = 1e-5
            numeric = (total(x_test + step) - total(x_test - step)) / 2e-5
            assert float(grad[i, j]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-8)


def test_kernels_whose_active_dims_are_inference_tensors_are_read_at_each_call():
    """A kernel given ``active_dims`` inside ``torch.inference_mode()`` (built there, unpickled there, or BoTorch's
    ``MultiTaskGP`` built there, which sets them) holds an inference tensor, which keeps no version counter: every
    call failed with "Inference tensors do not track version counter". Such models predict as those built
    outside (exactly), and an in-place change of those ``active_dims`` is seen, there being no version to cache by."""
    import pickle

    from botorch.models import MultiTaskGP, SingleTaskGP

    x, y = _data(12, 2)
    tasks = (torch.arange(12) % 2).to(DT)[:, None]
    x_test = _data(3, 2, seed=1)[0]

    def multitask():
        torch.manual_seed(0)   # MultiTaskGP draws its task covariance factor
        model = MultiTaskGP(torch.cat([x, tasks], -1), y[:, None], task_feature=-1,
                            covar_module=ntkgp.NTKKernel(_net()), outcome_transform=None)
        return model.eval()

    single = SingleTaskGP(torch.cat([x, tasks], -1), y[:, None], covar_module=ntkgp.NNGPKernel(_net(), active_dims=[1]),
                          outcome_transform=None).eval()
    blob = pickle.dumps(single)
    x_single = torch.cat([x_test, torch.ones(3, 1, dtype=DT)], -1)
    with torch.no_grad():
        expected, expected_single = multitask().posterior(x_test).mean, single.posterior(x_single).mean
    with torch.inference_mode():
        model = multitask()
        assert model.covar_module.kernels[0].active_dims.is_inference()
        torch.testing.assert_close(model.posterior(x_test).mean, expected, rtol=0, atol=0)
        loaded = pickle.loads(blob)
        torch.testing.assert_close(loaded.posterior(x_single).mean, expected_single, rtol=0, atol=0)
        kernel = ntkgp.NTKKernel(_net(), active_dims=[0, 1])
        points = _data(5, 3)[0]
        torch.testing.assert_close(kernel(points).to_dense(), kernel.net.kernel(points[:, :2]).ntk, rtol=0, atol=0)
        kernel.active_dims[1] = 3   # changed in place: read again, and refused
        with pytest.raises(ValueError, match="active_dims selects feature 3, but x1 has 3 feature"):
            kernel(points)


def test_inputs_expanded_over_a_batch_get_the_kernel_of_their_one_matrix(monkeypatch):
    """BoTorch's multi-output ``SingleTaskGP`` expands its training inputs over the outputs, ``x.expand(m, n, d)``
    (stride 0). The kernel was computed once per output, and batched inputs drop the near-parallel carry
    (docs/numerics.md): an ``mlp(3, "sign")`` training NNGP with a pair 1e-9 from parallel was 2.9e-3 (relative)
    off the same points' unbatched kernel. Now it is computed once, on ``(n, d)``, bitwise that kernel; the
    log likelihood of each output is the dense one (1e-12; it measured 0 at values of -9.9 and -8.7), and each
    output's kernel is its own memory. (Inputs that take part in autograd keep their batch: below.)"""
    from botorch.models import SingleTaskGP

    x, y = _data(8, 3)
    x = torch.cat([x, x[:1] * (1 + 1e-9)])
    y = torch.stack([torch.cat([y, y[:1]]), x[:, 0]], -1)
    net = ntkgp.mlp(3, "sign", 2.0, 0.1).double()
    model = SingleTaskGP(x, y, covar_module=ntkgp.NNGPKernel(net), outcome_transform=None)
    train = model.train_inputs[0]
    assert train.shape == (2, 9, 3) and train.stride()[0] == 0
    shapes = []
    kernel = net.kernel
    monkeypatch.setattr(net, "kernel", lambda x1, *a, **k: shapes.append(tuple(x1.shape)) or kernel(x1, *a, **k))
    with torch.no_grad():
        expected = kernel(x).nngp
        k = model.covar_module(train).to_dense()
    assert k.shape == (2, 9, 9) and torch.equal(k, expected.expand(2, 9, 9))
    assert shapes == [(9, 3)]
    k[0].add_(1.0)   # each batch's kernel its own: an expanded view (stride 0) changed the other batch's too
    assert torch.equal(k[1], expected)
    model.likelihood.noise = torch.tensor(0.01, dtype=DT)
    model.train()
    value = model.likelihood(model(*model.train_inputs)).log_prob(model.train_targets)   # without the noise prior
    means = model.mean_module.constant.detach().reshape(2, 1).expand(2, 9)
    ref = torch.distributions.MultivariateNormal(means, expected + 0.01 * torch.eye(9, dtype=DT))
    torch.testing.assert_close(value, ref.log_prob(y.T), rtol=0, atol=1e-12)   # per output

    # inputs whose batch does not broadcast with the hyperparameters' are still refused by name
    with pytest.raises(ValueError, match=r"inputs' batch shapes \[\(3,\)\] do not broadcast with the hyperparameters'"):
        ntkgp.NTKKernel(_net(), batch_shape=torch.Size([2]))(x.expand(3, 9, 3)).to_dense()


@pytest.mark.parametrize("leaf", [True, False])
def test_inputs_expanded_over_a_batch_get_each_copy_its_own_gradient(leaf):
    """Autograd gives each copy of an expanded input its own gradient, that of its batch's kernel. Computed on the
    one matrix and expanded, copy 0 took the gradients of all copies and the others none (15.6 off, for gradients
    of at most 9.4), whether the expanded tensor is a leaf (``x.expand(3, n, d).requires_grad_()``) or a view of
    one (``torch.autograd.grad(k, expanded)``). Each copy's gradient is checked against ``net.kernel`` on that copy
    alone, with a different weighting per copy (1e-12 of gradients of order 10: the same operations batched), and
    the base tensor's gradient, their sum, as before. (Such inputs are a batch again, computed per copy: here,
    with no near-parallel pair, bitwise the one matrix's values.)"""
    x = _data(6, 2)[0]
    net = _net()
    kernel = ntkgp.NTKKernel(net)
    weights = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=DT)
    base = x.clone().requires_grad_(not leaf)
    expanded = x.expand(3, 6, 2).requires_grad_(True) if leaf else base.expand(3, 6, 2)
    k = kernel(expanded).to_dense()
    with torch.no_grad():
        torch.testing.assert_close(k, kernel(x.expand(3, 6, 2)).to_dense(), rtol=0, atol=0)
    grad, = torch.autograd.grad((k * weights).sum(), expanded, retain_graph=not leaf)
    each = []
    for b in range(3):
        copy = x.clone().requires_grad_(True)
        each.append(torch.autograd.grad((net.kernel(copy, ntk=True).ntk * weights[b]).sum(), copy)[0])
    expected = torch.stack(each)
    assert float(expected.abs().max()) > 1 and float((expected[0] - expected[1]).abs().max()) > 0.1
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    if not leaf:
        total, = torch.autograd.grad((k * weights).sum(), base)
        torch.testing.assert_close(total, expected.sum(0), rtol=1e-12, atol=1e-12)
