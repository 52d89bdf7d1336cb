"""NetworkGP (ExactGP with network kernels), the fit helper, and BoTorch."""

from __future__ import annotations

import math
import re

import gpytorch
import pytest
import torch

import ntkgp
from ntkgp import predict
from ntkgp.models import NetworkGP, fit

pytestmark = pytest.mark.usefixtures("float64_default")


def _data(n=40, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2
    y = torch.sin(x.sum(-1, keepdim=True) * torch.arange(1, (k or 1) + 1)) + 0.05 * torch.randn(n, k or 1, generator=g)
    return x, (y if k else y[:, 0])


def test_fantasy_models_of_vector_targets_are_refused_by_name():
    """GPyTorch cannot fantasize multitask models (its own MultitaskKernel fails with a tensor-size
    error from inside its fantasy strategy); 1-D targets fantasize exactly."""
    x, y = _data(20, k=2)
    model = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf").eval()
    model(x[:3])
    with pytest.raises(NotImplementedError, match="1-D targets"):
        model.get_fantasy_model(x[:2] + 0.1, y[:2])
    x, y = _data(20)
    model = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf").eval()
    xt, xf, yf = x[:4] + 0.05, x[:2] + 0.1, y[:2]
    model(xt)
    fantasy = model.get_fantasy_model(xf, yf)
    refit = NetworkGP(torch.cat([x, xf]), torch.cat([y, yf]), kernel="ntk", depth=2, activation="erf").eval()
    refit.load_state_dict(model.state_dict())
    torch.testing.assert_close(fantasy(xt).mean, refit(xt).mean, rtol=1e-4, atol=1e-5)


def test_batched_fantasies_of_one_output_stay_single_output_models():
    """Fantasies with a batch of new targets (b, n) make train_targets (b, N + n): the model took
    them for vector targets and returned a multitask distribution of shape (b, M, 1), which its
    likelihood could not take, and refused to fantasize again (review). They give what a plain
    ExactGP with the same kernel gives, and fantasize again."""
    x, y = _data(15)
    model = NetworkGP(x, y, kernel="ntk", depth=1).eval()

    class Plain(gpytorch.models.ExactGP):
        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    plain = Plain(x, y, gpytorch.likelihoods.GaussianLikelihood()).eval()
    plain.mean_module, plain.covar_module = gpytorch.means.ZeroMean(), model.covar_module
    plain.likelihood.load_state_dict(model.likelihood.state_dict())
    g = torch.Generator().manual_seed(3)
    xf, yf, xt = torch.rand(3, 2, 2, generator=g), torch.randn(3, 2, generator=g), torch.rand(4, 2, generator=g)
    with torch.no_grad():
        model(x[:2]), plain(x[:2])
        fantasy, reference = model.get_fantasy_model(xf, yf), plain.get_fantasy_model(xf, yf)
        out, expected = fantasy.likelihood(fantasy(xt)), reference.likelihood(reference(xt))
        assert type(out) is gpytorch.distributions.MultivariateNormal and out.mean.shape == (3, 4)
        torch.testing.assert_close(out.mean, expected.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.variance, expected.variance, rtol=1e-10, atol=1e-12)
        again = fantasy.get_fantasy_model(torch.rand(3, 1, 2, generator=g), torch.randn(3, 1, generator=g))
        assert again(xt).mean.shape == (3, 4)


def test_fantasy_inputs_and_targets_are_checked_like_test_inputs_and_training_targets():
    """get_fantasy_model skipped the checks of __call__ and __init__: a float64 target of a float32
    model failed inside GPyTorch ("Expected b and A to have the same dtype"), inputs with another
    number of features inside its torch.cat, targets of another count with a tensor-size error, and
    NaN targets gave NaN predictions without a word. Targets are converted to the model's dtype, as
    train_y is when it is built."""
    x, y = _data(15)
    model = NetworkGP(x.float(), y.float(), depth=1).eval()
    xf, yf, xt = x[:2] + 0.1, y[:2] - 0.2, x[:3] + 0.05
    with torch.no_grad():
        model(xt.float())
        narrow = model.get_fantasy_model(xf.float(), yf.float())(xt.float())
        wide = model.get_fantasy_model(xf.float(), yf)(xt.float())   # float64 targets: the same float32 values
    assert wide.mean.dtype == torch.float32
    torch.testing.assert_close(wide.mean, narrow.mean, rtol=0, atol=0)
    torch.testing.assert_close(wide.variance, narrow.variance, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"inputs is torch\.float64 but the model.s training inputs are "
                                         r"torch\.float32"):
        model.get_fantasy_model(xf, yf.float())
    model = NetworkGP(x, y, depth=1).eval()
    with torch.no_grad():
        model(xt)
    with pytest.raises(ValueError, match="inputs must have 2 feature"):
        model.get_fantasy_model(torch.randn(2, 3), yf)
    with pytest.raises(ValueError, match="targets contains NaN"):
        model.get_fantasy_model(xf, torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="targets must be a floating-point tensor"):   # as train_y
        model.get_fantasy_model(xf, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"targets must have shape \(\.\.\., 2\)"):
        model.get_fantasy_model(xf, yf[:1])


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_fit_improves_the_marginal_likelihood_and_predicts_like_the_exact_posterior(kernel):
    x, y = _data()
    model = NetworkGP(x, y, kernel=kernel, depth=2, activation="erf", weight_var=1.5, bias_var=0.1)
    history = fit(model, steps=60, lr=0.05)
    assert history[-1] < history[0] - 0.2 and all(math.isfinite(v) for v in history)
    xt = torch.rand(7, 2) * 4 - 2
    with torch.no_grad():
        pred = model.likelihood(model(xt))
    noise = float(model.likelihood.noise.detach())
    post = ntkgp.predict.gp_posterior(model.net, x, y, xt, kernel="ntkgp" if kernel == "ntk" else "nngp",
                                      noise=noise)
    torch.testing.assert_close(pred.mean, post.mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pred.variance, post.variance + noise, rtol=1e-6, atol=1e-8)


def test_vector_targets_share_one_kernel_and_noise():
    """The (N, k) model's likelihood is the sum of k single-output likelihoods with the same kernel."""
    x, y = _data(k=3)
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    model = NetworkGP(x, y, net)
    model.likelihood.noise = 0.03
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    joint = float(mll(model(x), y).detach()) * y.numel()
    single_total = 0.0
    for c in range(3):
        single = NetworkGP(x, y[:, c], net)
        single.likelihood.noise = 0.03
        single.train()
        single_mll = gpytorch.mlls.ExactMarginalLogLikelihood(single.likelihood, single)
        single_total += float(single_mll(single(x), y[:, c]).detach()) * x.shape[0]
    assert abs(joint - single_total) < 1e-8 * abs(single_total)
    model.eval()
    xt = torch.rand(5, 2)
    with torch.no_grad():
        mean = model.likelihood(model(xt)).mean
    post = ntkgp.predict.gp_posterior(net, x, y, xt, noise=0.03)
    assert mean.shape == (5, 3)
    torch.testing.assert_close(mean, post.mean, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mean", ["zero", "constant"])
@pytest.mark.parametrize("k", [1, 3])
def test_vector_targets_predict_batched_test_inputs(mean, k):
    """Test inputs (b, n, d) give each batch the prediction of its own (n, d) set. With (N, k)
    targets the per-output means were aligned with the batch axes instead: k != b crashed in
    the mean's broadcast, and k = 1 made a (n, b) mean that did not fit the (b, ...) covariance."""
    x, y = _data(k=k)
    model = NetworkGP(x, y, ntkgp.mlp(2, "relu", 2.0, 0.1), kernel="ntk", mean=mean)
    if mean == "constant":
        with torch.no_grad():
            model.mean_module.constant.copy_(torch.linspace(-0.5, 0.5, k))
    model.likelihood.noise = 0.03
    model.eval()
    xt = torch.rand(4, 5, 2, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.no_grad():
        batched = model.likelihood(model(xt))
        single = [model.likelihood(model(xt[i])) for i in range(4)]
    assert batched.mean.shape == (4, 5, k)
    for i, one in enumerate(single):
        # the same solves on the same kernel entries, batched or not: rounding only
        torch.testing.assert_close(batched.mean[i], one.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched.covariance_matrix[i], one.covariance_matrix, rtol=1e-10, atol=1e-12)


def test_marginal_likelihood_recovers_the_prior_variances():
    """Data sampled from the NNGP prior: the fitted log-variances are within 4 standard errors
    (from the Fisher information, I_ij = k/2 tr(C⁻¹ ∂_i C C⁻¹ ∂_j C)) of the truth."""
    torch.manual_seed(3)
    n, k, noise = 120, 12, 0.01
    x = torch.randn(n, 3)
    truth = {"w1": 1.8, "b1": 0.3, "w2": 1.2, "b2": 0.4}

    def make(values):
        return ntkgp.serial(ntkgp.Dense(1, values["w1"], values["b1"]), ntkgp.Erf(),
                            ntkgp.Dense(1, values["w2"], values["b2"]))

    with torch.no_grad():
        cov = make(truth).kernel(x).nngp + noise * torch.eye(n)
    y = (torch.linalg.cholesky(cov) @ torch.randn(n, k))
    start = {"w1": 1.0, "b1": 0.1, "w2": 1.0, "b2": 0.1}
    model = NetworkGP(x, y, make(start))
    model.likelihood.noise = noise
    model.likelihood.raw_noise.requires_grad_(False)
    history = fit(model, steps=300, lr=0.05)
    assert all(math.isfinite(v) for v in history)
    layers = [model.net[0], model.net[2]]
    fitted = torch.stack([layers[0].weight_var, layers[0].bias_var, layers[1].weight_var, layers[1].bias_var])
    fitted = fitted.detach().log()
    # Fisher information of the log-variances at the fitted point: the raw parameters are
    # log-ratios to the anchors, so derivatives w.r.t. them are derivatives w.r.t. log-variances.
    net = make(dict(zip(("w1", "b1", "w2", "b2"), fitted.exp().tolist(), strict=True)))
    names = ["layers.0.raw_weight_var", "layers.0.raw_bias_var", "layers.2.raw_weight_var", "layers.2.raw_bias_var"]

    class Covariance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return self.net.kernel(inputs, ntk=False).nngp + noise * torch.eye(n)

    def covariance(delta):
        params = {f"net.{name}": delta[i] for i, name in enumerate(names)}
        return torch.func.functional_call(Covariance(), params, (x,))

    c = covariance(torch.zeros(4))
    jac = torch.autograd.functional.jacobian(covariance, torch.zeros(4), vectorize=True,
                                             strategy="forward-mode")  # (n, n, 4)
    c_inv = torch.linalg.inv(c)
    a = torch.einsum("ij,jkp->ikp", c_inv, jac)
    info = 0.5 * k * torch.einsum("ijp,jiq->pq", a, a)
    se = torch.linalg.inv(info).diagonal().sqrt()
    true = torch.tensor([truth[name] for name in ("w1", "b1", "w2", "b2")]).log()
    assert bool(((fitted - true).abs() <= 4 * se).all()), (fitted.exp(), se)
    assert bool((se < 0.5).all())  # the data do pin the variances down


def test_botorch_single_task_gp_with_network_kernel():
    botorch = pytest.importorskip("botorch")
    from botorch.acquisition import LogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf
    from botorch.test_functions import Branin

    torch.manual_seed(0)
    branin = Branin(negate=True)
    bounds = branin.bounds.to(torch.float64)
    unit = torch.rand(12, 2)
    train_x = bounds[0] + (bounds[1] - bounds[0]) * unit
    train_y = branin(train_x).unsqueeze(-1)
    kernel = ntkgp.NNGPKernel(ntkgp.mlp(2, "relu", 2.0, 0.1))
    model = SingleTaskGP(train_x, train_y, covar_module=kernel,
                         input_transform=botorch.models.transforms.Normalize(d=2))
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    fit_gpytorch_mll(mll)
    acq = LogExpectedImprovement(model, best_f=train_y.max())
    candidate, value = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=4, raw_samples=64)
    assert candidate.shape == (1, 2) and torch.isfinite(value).all()
    assert bool(((candidate >= bounds[0]) & (candidate <= bounds[1])).all())
    assert all(torch.isfinite(p).all() for p in model.parameters())



@pytest.mark.parametrize("ard", [False, True])
def test_botorch_subset_output_of_a_batched_network_kernel(ard):
    """``subset_output`` of a three-output ``SingleTaskGP`` whose ``covar_module`` is a batched network
    kernel: with ``subset_batch_dict`` the subset model's posterior is the full model's at those
    outputs (variances per output, ARD ones included). The kernel kept its full batch shape after
    BoTorch had indexed its variances, and the posterior failed with "x1 and x2 were not
    broadcastable with kernel of batch_shape torch.Size([3])"."""
    pytest.importorskip("botorch")
    from botorch.models import SingleTaskGP

    g = torch.Generator().manual_seed(0)
    x = torch.rand(15, 3, generator=g, dtype=torch.float64)
    y = torch.stack([x.sum(-1), torch.sin(3 * x[:, 0]), x.prod(-1)], -1)
    first = ntkgp.Dense(64, 1.5, 0.1, ard_num_dims=3 if ard else None)
    net = ntkgp.serial(first, ntkgp.ReLU(), ntkgp.Dense(1, 2.0, 0.05))
    model = SingleTaskGP(x, y, covar_module=ntkgp.NTKKernel(net, batch_shape=torch.Size([3])))
    with torch.no_grad():   # different variances per output, so that a wrong output's would show
        for p in model.covar_module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    entries = model.covar_module.subset_batch_dict("covar_module")
    assert entries["covar_module.net.layers.0.raw_weight_var"] == (-2 if ard else -1)
    assert entries["covar_module.net.layers.2.raw_bias_var_constraint.anchor"] == -1
    model._subset_batch_dict = {"mean_module.raw_constant": -1, "likelihood.noise_covar.raw_noise": -2, **entries}
    model.eval()
    test = torch.rand(6, 3, generator=g, dtype=torch.float64)
    full = model.posterior(test)
    for outputs in ([1], [2, 0]):
        sub = model.subset_output(outputs)
        assert sub.covar_module.batch_shape == (torch.Size([]) if len(outputs) == 1 else torch.Size([2]))
        part = sub.posterior(test)
        torch.testing.assert_close(part.mean.reshape(6, -1), full.mean[:, outputs], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part.variance.reshape(6, -1), full.variance[:, outputs], rtol=1e-12, atol=1e-14)
    assert ntkgp.NTKKernel(ntkgp.mlp(1)).subset_batch_dict() == {}   # nothing per output to subset


def test_botorch_fits_batched_kernels_and_variances_pinned_at_zero():
    """BoTorch's scipy optimizer asks every constraint for inverse_transform(lower/upper bound).
    The answer came in the anchor's shape, (2,) for a batch kernel, which BoTorch could not put
    in one slot ("could not broadcast (2,) into (1,)"), and a variance pinned at 0 raised on
    inverse_transform(inf): both stopped fit_gpytorch_mll."""
    pytest.importorskip("botorch")
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim.utils import get_parameters_and_bounds

    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 2, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(3 * x.sum(-1)), torch.cos(3 * x[:, 0])], -1)
    batched = ntkgp.NTKKernel(ntkgp.mlp(1, "relu", 2.0, 0.1), batch_shape=torch.Size([2]))
    _, bounds = get_parameters_and_bounds(batched)
    assert all(torch.as_tensor(b).dim() == 0 for pair in bounds.values() for b in pair)
    pinned = ntkgp.NNGPKernel(ntkgp.mlp(2, "relu", 2.0, 0.0))
    for kernel, targets in ((batched, y), (pinned, y[:, :1])):
        model = SingleTaskGP(x, targets, covar_module=kernel)
        fit_gpytorch_mll(gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(pinned.net.layers[0].bias_var.detach()) == 0.0                 # still pinned
    constraint = pinned.net.layers[0].raw_weight_var_constraint
    assert float(constraint.inverse_transform(torch.tensor(0.0))) == -math.inf
    assert float(constraint.inverse_transform(torch.tensor(math.inf))) == math.inf


# Adam at lr 0.05 overshoots at the end and fit says so; the test is about batches and noise bounds
@pytest.mark.filterwarnings("ignore:fit. the optimizer ended at a loss:RuntimeWarning")
def test_fit_takes_batched_botorch_models_and_keeps_their_noise_within_its_bounds():
    """fit documents BoTorch models: a multi-output SingleTaskGP (a batch of two GPs, one MLL per
    member) crashed in backward ("grad can be implicitly created only for scalar outputs"), and
    Adam drove BoTorch's noise, a bound without transform (GreaterThan(1e-4, transform=None)),
    to -0.01 (then "Matrix not positive definite")."""
    pytest.importorskip("botorch")
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Standardize

    g = torch.Generator().manual_seed(0)
    x = torch.rand(15, 2, generator=g)
    y = torch.sin(3 * x.sum(-1, keepdim=True))
    for targets in (y, torch.cat([y, torch.cos(3 * x[:, :1])], -1)):
        m = targets.shape[-1]
        kernel = ntkgp.NNGPKernel(ntkgp.mlp(2, "erf", 2.0, 0.1), batch_shape=torch.Size([m] if m > 1 else []))
        model = SingleTaskGP(x, targets, covar_module=kernel, outcome_transform=Standardize(m=m))
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        with torch.no_grad():
            start = -mll(model(*model.train_inputs), model.train_targets)        # (m,) for a batch
        history = fit(model, steps=100, lr=0.05)
        assert len(history) == 100 and all(math.isfinite(v) for v in history)
        assert abs(history[0] - float(start.mean())) < 1e-12               # per entry of all targets
        assert float(model.likelihood.noise.detach().min()) >= 1e-4
        assert min(history) < history[0] - 0.5


def test_fit_accepts_optimizers_that_need_a_closure():
    """torch.optim.LBFGS.step needs the loss closure (fit called step() without it: TypeError).
    With it, fit reaches a stationary point of the marginal likelihood."""
    x, y = _data()
    model = NetworkGP(x, y, ntkgp.mlp(2, "erf", 1.5, 0.1))
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=50, line_search_fn="strong_wolfe")
    history = fit(model, steps=5, optimizer=optimizer)
    model.train()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    loss.backward()
    assert history[-1] < history[0] - 1.0
    assert abs(history[-1] - float(loss.detach())) < 1e-8                            # converged within a step
    assert max(float(p.grad.abs().max()) for p in model.parameters()) < 1e-4


def test_fit_takes_the_optional_number_optimizer_step_returns():
    """``Optimizer.step(closure)`` returns an optional number: torch's own optimizers return the closure's
    loss tensor, others a Python float or None, where fit's ``loss.detach()`` raised an AttributeError
    ("'float' object has no attribute 'detach'", "'NoneType' ..."). The history is the same (the loss at
    the start of each step); a step that neither evaluates the closure nor returns a loss is refused."""

    class FloatSGD(torch.optim.SGD):
        def step(self, closure=None):
            loss = super().step(closure)
            return None if loss is None else loss.item()

    class NoneSGD(torch.optim.SGD):
        def step(self, closure=None):
            with torch.enable_grad():
                closure()
            super().step()

    class Lazy(torch.optim.SGD):
        def step(self, closure=None):
            return None

    x, y = _data()
    histories = []
    for optimizer_class in (torch.optim.SGD, FloatSGD, NoneSGD):
        model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 1.5, 0.1))
        histories.append(fit(model, steps=3, optimizer=optimizer_class(model.parameters(), lr=0.01)))
    assert histories[0][-1] < histories[0][0]
    assert histories[1] == histories[0] and histories[2] == histories[0]
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 1.5, 0.1))
    with pytest.raises(ValueError, match="neither evaluated the loss closure nor returned a loss"):
        fit(model, steps=2, optimizer=Lazy(model.parameters(), lr=0.01))
    assert not model.training


def test_network_gp_follows_the_dtype_of_its_data():
    """float64 data with float32 modules trained, but predicting (N, k) targets failed inside
    linear_operator ("expected scalar type Float but found Double")."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)          # modules are built in float32, as by default
    try:
        model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    fit(model, steps=3)
    model.eval()
    with torch.no_grad():
        mean = model.likelihood(model(x[:5])).mean
    assert mean.shape == (5, 4) and mean.dtype == torch.float64
    # the variances survive the conversion exactly (float64 anchors)
    net = ntkgp.mlp(1, "erf", 0.3, 0.01).float()
    NetworkGP(x, y, net)
    assert float(net.layers[0].weight_var.detach()) == 0.3 and float(net.layers[0].bias_var.detach()) == 0.01

def test_network_gp_counts_each_prior_once():
    """The kernel owns the network: registered twice, every prior entered the MLL twice."""
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    y = torch.sin(x.sum(-1))
    prior = gpytorch.priors.GammaPrior(20.0, 1.0)

    def mll(weight_prior):
        net = ntkgp.serial(ntkgp.Dense(10, 2.0, 0.1, weight_var_prior=weight_prior), ntkgp.ReLU(),
                           ntkgp.Dense(1, 1.0, 0.1))
        model = NetworkGP(x, y, net)
        model.train()
        objective = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        return float(objective(model(x), y).detach()) * len(y), model

    with_prior, model = mll(prior)
    without, _ = mll(None)
    assert abs((with_prior - without) - float(prior.log_prob(torch.tensor(2.0)))) < 1e-9
    assert len(list(model.named_priors())) == 1
    keys = list(model.state_dict())
    assert len(keys) == len(set(keys)) and not any(k.startswith("net.") for k in keys)
    assert model.net is model.covar_module.net


def test_a_layer_reused_in_two_containers_has_its_prior_counted_once():
    """GPyTorch reaches a module once per parent: a Dense reused inside two serial() blocks had its
    prior counted twice in NetworkGP's marginal likelihood (objective − log p(y) = 2 log p(σ_w²))."""
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.sin(x.sum(-1))
    prior = gpytorch.priors.GammaPrior(2.0, 1.0)
    log_prior = float(prior.log_prob(torch.tensor(1.7, dtype=torch.float64)))

    def specs(weight_prior):
        shared = ntkgp.Dense(4, 1.7, 0.1, weight_var_prior=weight_prior)
        return [ntkgp.serial(ntkgp.Dense(4, 1.0, 0.1), ntkgp.serial(ntkgp.ReLU(), shared),
                             ntkgp.serial(ntkgp.ReLU(), shared), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1)),
                ntkgp.serial(ntkgp.Dense(4, 1.0, 0.1), ntkgp.parallel(shared, ntkgp.serial(ntkgp.ReLU(), shared)),
                             ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))]

    for with_prior, without in zip(specs(prior), specs(None), strict=True):
        objective = []
        for net in (with_prior, without):
            model = NetworkGP(x, y, net)
            model.likelihood.noise = 0.05
            objective.append(fit(model, steps=1, lr=0.0)[0] * len(y))
        assert abs((objective[1] - objective[0]) - log_prior) < 1e-9
        assert len(list(model.named_priors())) == 0 and len(list(NetworkGP(x, y, with_prior).named_priors())) == 1


def test_fit_reports_the_map_objective_when_priors_are_registered():
    """fit's docstring said it returns the negative marginal log likelihood; with a prior on a
    variance GPyTorch's objective adds its log density: the loss is −(log p(Y) + log p(σ_w²))/N."""
    x = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.sin(x.sum(-1))
    prior = gpytorch.priors.GammaPrior(3.0, 2.0)
    net = ntkgp.serial(ntkgp.Dense(10, 1.5, 0.1, weight_var_prior=prior), ntkgp.Erf(), ntkgp.Dense(1, 1.0, 0.1))
    model = NetworkGP(x, y, net)
    model.likelihood.noise = 0.05
    with torch.no_grad():
        cov = net.kernel(x).nngp + 0.05 * torch.eye(12, dtype=torch.float64)
    log_evidence = float(torch.distributions.MultivariateNormal(torch.zeros(12, dtype=torch.float64), cov).log_prob(y))
    log_prior = float(prior.log_prob(torch.tensor(1.5, dtype=torch.float64)))
    history = fit(model, steps=1, lr=0.0)
    assert abs(history[0] - (-(log_evidence + log_prior) / 12)) < 1e-10
    assert abs(log_prior) > 0.1   # the prior term is not negligible here


def test_network_gp_refuses_non_finite_or_integer_data():
    """A NaN target was accepted: every prediction came out NaN and fit only said "Non-finite
    marginal likelihood or gradient at step 0"."""
    x, y = _data()
    bad_y = y.clone()
    bad_y[3] = math.nan
    with pytest.raises(ValueError, match="train_y contains NaN"):
        NetworkGP(x, bad_y)
    with pytest.raises(ValueError, match="train_y contains NaN"):
        NetworkGP(x, torch.stack([y, bad_y], -1))
    with pytest.raises(ValueError, match="train_y must be a floating-point"):
        NetworkGP(x, torch.ones(len(x), dtype=torch.long))
    bad_x = x.clone()
    bad_x[0, 1] = math.inf
    with pytest.raises(ValueError, match="train_x contains NaN"):
        NetworkGP(bad_x, y)
    with pytest.raises(ValueError, match="train_x must be a floating-point"):
        NetworkGP(x.long(), y)


def test_non_finite_inputs_are_located_and_constant_columns_named():
    """Standardizing a constant feature (naval's column 8 of 16) by its standard deviation, 0, makes
    it NaN in every row; the error said only "train_x contains NaN or infinite values", naming
    neither the column nor the cause. It counts the entries, lists their columns and names the
    columns NaN throughout, for the training and test inputs of NetworkGP, gp_posterior and kernels."""
    x, y = _data(12)
    raw = torch.cat([x, torch.full((12, 1), 3.0), x[:, :1]], -1)     # column 2 constant
    with torch.no_grad():
        standardized = (raw - raw.mean(0)) / raw.std(0)
    standardized[4, 3] = math.inf
    where = (r"\(13 of 48 entries, in feature column\(s\) 2, 3; column\(s\) 2 NaN in every row, as a "
             r"constant feature divided by its standard deviation, 0, is: divide such columns by 1 instead\)\.$")
    with pytest.raises(ValueError, match=r"^train_x contains NaN or infinite values " + where):
        NetworkGP(standardized, y)
    net = ntkgp.mlp(1, ard_num_dims=4)
    with pytest.raises(ValueError, match=r"^x_train contains NaN or infinite values " + where):
        ntkgp.predict.gp_posterior(net, standardized, y, x[:2].repeat(1, 2), noise=0.1)
    with pytest.raises(ValueError, match=r"^x1 contains NaN or infinite values " + where):
        net.kernel(standardized)
    model = NetworkGP(raw, y).eval()
    test = raw[:3].clone()
    test[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"^x contains NaN or infinite values \(1 of 12 entries, in feature "
                                         r"column\(s\) 0\)\.$"):
        model(test)


def test_network_gp_refuses_batched_or_unusable_empty_training_data():
    """Batched train_x (b, N, d) was paired with the same targets in every batch, and with b == N a
    (b, N) target was silently read as N points with b outputs. Empty data: vector targets failed
    in GPyTorch (a division by zero, a reshape error) and fit with "Non-finite marginal
    likelihood"; without data, 1-D targets give the prior, which stays available."""
    x, y = _data()
    for bad_x in (x.expand(2, *x.shape), x[None]):
        with pytest.raises(ValueError, match=r"train_x must have shape \(N, d\)"):
            NetworkGP(bad_x, y)
    for bad_y in (y[:0, None].expand(0, 2), y[:, None][:, :0]):
        with pytest.raises(ValueError, match=r"N, k >= 1 for \(N, k\)"):
            NetworkGP(x[: len(bad_y)], bad_y)
    prior = NetworkGP(x[:0], y[:0], ntkgp.mlp(1, "erf", 2.0, 0.1))
    prior.eval()
    with torch.no_grad():
        out = prior(x[:5])
        k = prior.net.kernel(x[:5], ntk=False).nngp
    assert torch.equal(out.mean, torch.zeros(5))
    torch.testing.assert_close(out.covariance_matrix, k, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no training data"):
        fit(prior, steps=2)

    class Plain(gpytorch.models.ExactGP):   # built on None: an AttributeError on train_targets.numel()
        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(torch.zeros(x.shape[:-1]), self.covar(x))

    empty = Plain(None, None, gpytorch.likelihoods.GaussianLikelihood())
    empty.covar = ntkgp.NTKKernel(ntkgp.mlp())
    with pytest.raises(ValueError, match="no training data"):
        fit(empty, steps=2)


def test_network_gp_checks_test_inputs_before_gpytorch_concatenates_them(monkeypatch):
    """Test inputs with another number of features failed inside torch.cat in GPyTorch's
    prediction strategy ("Sizes of tensors must match except in dimension 0")."""
    x, y = _data()
    model = NetworkGP(x, y)
    model.eval()
    features = x.shape[-1]
    for bad in (torch.randn(4, features + 1), torch.randn(4), torch.randn(2, 4, features - 1)):
        with pytest.raises(ValueError, match=f"{features} feature"):
            model(bad)
    # before any kernel work (it came from inside the kernel, after the training kernel's, naming "x1")
    with monkeypatch.context() as patch:
        patch.setattr(type(model.covar_module), "forward",
                      lambda *a, **k: pytest.fail("the kernel ran on NaN test inputs"))
        with pytest.raises(ValueError, match=r"^x contains NaN"):
            model(torch.full((3, features), math.nan))
    # a wider float dtype than the model's: GPyTorch's "expected m1 and m2 to have the same dtype" from
    # deep inside; a narrower one is promoted (as integers are), with the same result
    narrow = NetworkGP(x.float(), y.float())
    narrow.eval()
    with pytest.raises(ValueError, match=r"x is torch\.float64 but the model.s training inputs are torch\.float32"):
        narrow(x[:3].double())
    with torch.no_grad():
        torch.testing.assert_close(model(x[:3].float()).mean, model(x[:3].float().double()).mean, rtol=0, atol=0)
    with torch.no_grad():   # integer test inputs: promoted by GPyTorch, as before the shape check
        assert model(torch.ones(3, features, dtype=torch.long)).mean.shape == (3,)
    with torch.no_grad():
        assert model(torch.randn(2, 4, features)).mean.shape == (2, 4)
    one = NetworkGP(x[:, :1], y)                # GPyTorch reads 1-D inputs as (M, 1)
    one.eval()
    with torch.no_grad():
        torch.testing.assert_close(one(x[:4, 0]).mean, one(x[:4, :1]).mean, rtol=0, atol=0)


def test_a_zero_dimensional_test_or_fantasy_input_is_refused_by_shape():
    """A 0-d tensor (one scalar point, say ``torch.tensor(0.5)`` for a one-feature model) failed in the
    input check itself with Python's "tuple index out of range"; it is told the shape it needs, at
    prediction and fantasizing alike, before any kernel work."""
    x, y = _data()
    model = NetworkGP(x[:, :1], y)
    model.eval()
    with pytest.raises(ValueError, match=r"^x must have 1 feature\(s\) like train_x, shape \(\.\.\., M, 1\); "
                                         r"got shape \(\)"):
        model(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"^inputs must have 1 feature\(s\) like train_x"):
        model.get_fantasy_model(torch.tensor(0.5), torch.tensor([0.1]))
    with torch.no_grad():   # the same point as (1,) and (1, 1) stays accepted
        torch.testing.assert_close(model(torch.tensor([0.5])).mean, model(torch.tensor([[0.5]])).mean, rtol=0, atol=0)


def test_fit_reports_a_step_that_overflows_a_variance():
    """A step so large that exp(raw) overflows made the kernel refuse its variance; fit says so
    with its documented FloatingPointError and the step."""
    x, y = _data()
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    raw = model.net.layers[0].raw_weight_var

    class Overshoot(torch.optim.SGD):   # a step far beyond what float32's exp can take
        def step(self, closure):
            loss = closure()
            with torch.no_grad():
                raw.fill_(1000.0)
            return loss

    with pytest.raises(FloatingPointError, match=r"Non-finite hyperparameters at step 1: Variance\(s\) "
                                                  r"\['layers.0.weight_var'\]"):
        fit(model, steps=3, optimizer=Overshoot(model.parameters(), lr=0.1))


def test_fit_reports_a_step_into_variances_whose_kernel_overflows():
    """Variances that are finite but whose product overflows float64 gave an infinite kernel and a
    NaN loss; the kernel now refuses it, and fit reports the step as it reports a variance that
    overflows."""
    x, y = _data()
    model = NetworkGP(x.double(), y.double(), ntkgp.mlp(1, "relu", 2.0, 0.1)).double()
    raws = [model.net.layers[0].raw_weight_var, model.net.layers[-1].raw_weight_var]

    class Overshoot(torch.optim.SGD):
        def step(self, closure):
            loss = closure()
            with torch.no_grad():
                for raw in raws:
                    raw.fill_(700.0)   # exp(700) = 1e304: finite, but not its square
            return loss

    with pytest.raises(FloatingPointError, match=r"Non-finite hyperparameters at step 1: The NNGP kernel overflows"):
        fit(model, steps=3, optimizer=Overshoot(model.parameters(), lr=0.1))


def test_network_gp_checks_that_the_likelihood_fits_the_targets():
    """A GaussianLikelihood for (N, k) targets, or a multitask one for 1-D targets or another k,
    failed only in the first fit step, deep inside GPyTorch ("Attempting to broadcast a dimension
    of length 2", "'MultivariateNormal' object has no attribute '_interleaved'")."""
    x, y = _data(k=2)
    likelihoods = gpytorch.likelihoods
    with pytest.raises(ValueError, match="multitask likelihood with num_tasks=2"):
        NetworkGP(x, y, likelihood=likelihoods.GaussianLikelihood())
    with pytest.raises(ValueError, match=r"num_tasks=2 .*got MultitaskGaussianLikelihood with num_tasks=3"):
        NetworkGP(x, y, likelihood=likelihoods.MultitaskGaussianLikelihood(num_tasks=3))
    with pytest.raises(ValueError, match="single-output likelihood"):
        NetworkGP(x, y[:, 0], likelihood=likelihoods.MultitaskGaussianLikelihood(num_tasks=1))
    # the ones that fit still work: a likelihood with a noise per output gives the sum of the
    # single-output likelihoods with those noises
    task = likelihoods.MultitaskGaussianLikelihood(num_tasks=2, rank=0, has_global_noise=False)
    task.task_noises = torch.tensor([0.01, 0.2])
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    model = NetworkGP(x, y, net, likelihood=task)
    model.train()
    joint = float(gpytorch.mlls.ExactMarginalLogLikelihood(task, model)(model(x), y).detach()) * y.numel()
    total = 0.0
    for c, noise in enumerate((0.01, 0.2)):
        single = NetworkGP(x, y[:, c], net, likelihood=likelihoods.GaussianLikelihood())
        single.likelihood.noise = noise
        single.train()
        total += float(gpytorch.mlls.ExactMarginalLogLikelihood(single.likelihood, single)(single(x), y[:, c]).detach())
    assert abs(joint - total * len(x)) < 1e-9 * abs(joint)


def test_network_gp_names_its_net_argument_when_given_something_else():
    """A kernel (or anything but a spec) passed as net was refused by the kernel NetworkGP builds from
    it, whose message named NNGPKernel, the default kernel=, even for an NTKKernel passed in:
    "NNGPKernel needs an ntkgp network (e.g. ntkgp.serial(...)), got NTKKernel"."""
    x, y = _data(10)
    with pytest.raises(ValueError, match=r"^net must be an ntkgp network spec .* got NTKKernel\. For a kernel, pass "
                                         r"its network and kind: NetworkGP\(train_x, train_y, kernel\.net, "
                                         r"kernel='ntk'\)"):
        NetworkGP(x, y, ntkgp.NTKKernel(ntkgp.mlp(depth=1)))
    with pytest.raises(ValueError, match=r"^net must be an ntkgp network spec .* got str\.$"):
        NetworkGP(x, y, "relu")


def test_network_gp_names_gp_posteriors_ntkgp_its_ntk():
    """gp_posterior calls the NTK-GP kernel='ntkgp', NetworkGP calls it kernel='ntk'; NetworkGP(kernel=
    'ntkgp') said only "must be one of ['nngp', 'ntk']". The two are the same posterior (mean and
    variance; the covariance of gp_posterior's 'ntk' differs), as the hint and the docstring say."""
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.sin(x[:, 0])
    with pytest.raises(ValueError, match=r"got 'ntkgp'\. The NTK-GP, gp_posterior's kernel='ntkgp', is kernel='ntk'"):
        NetworkGP(x, y, kernel="ntkgp")
    net = ntkgp.mlp(2, "erf", 2.0, 0.1)
    model = NetworkGP(x, y, net, kernel="ntk")
    model.likelihood.noise = 0.01
    model.eval()
    xt = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        latent = model(xt)
    noise = float(model.likelihood.noise.detach())   # the value the softplus round trip stored
    ntkgp_post = ntkgp.predict.gp_posterior(net, x, y, xt, kernel="ntkgp", noise=noise)
    converged = ntkgp.predict.gp_posterior(net, x, y, xt, kernel="ntk", noise=noise)
    # float64 Cholesky solves of one well-conditioned 8 x 8 matrix, two implementations
    torch.testing.assert_close(latent.mean, ntkgp_post.mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(latent.variance, ntkgp_post.variance, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(latent.mean, converged.mean, rtol=1e-9, atol=1e-9)
    assert float((latent.variance - converged.variance).abs().max()) > 1e-3


def test_kernel_level_ard_is_refused_in_favour_of_the_first_layer():
    with pytest.raises(ValueError, match="ard_num_dims"):
        ntkgp.NNGPKernel(ntkgp.mlp(1, "relu", 2.0, 0.1), ard_num_dims=3)


def test_kernel_level_priors_and_unknown_arguments_are_refused_not_dropped():
    """GPyTorch's Kernel drops unknown keywords: a prior given to the kernel, as GPyTorch's kernels
    take lengthscale_prior=, was no prior (named_priors empty) and the fit plain maximum likelihood."""
    prior = gpytorch.priors.GammaPrior(1.0, 1.0)
    for kernel in (ntkgp.NNGPKernel, ntkgp.NTKKernel):
        for name in ("weight_var_prior", "lengthscale_prior", "outputscale_constraint"):
            hint = r"the layers.*ntkgp\.Dense\(width, weight_var, bias_var, weight_var_prior"
            with pytest.raises(ValueError, match=rf"{kernel.__name__} got {name}=: priors and constraints belong to "
                                                 rf"{hint}"):
                kernel(ntkgp.mlp(1, "relu", 2.0, 0.1), **{name: prior})
        with pytest.raises(ValueError, match=r"unexpected keyword argument 'eps'"):
            kernel(ntkgp.mlp(1, "relu", 2.0, 0.1), eps=1e-6)
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1, weight_var_prior=prior), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))
    assert [name for name, *_ in ntkgp.NNGPKernel(net).named_priors()] == ["net.layers.0.weight_var_prior"]


def test_finite_twin_in_float64_uses_the_exact_variances():
    net = ntkgp.serial(ntkgp.Dense(4, 2.25, 0.01), ntkgp.ReLU(), ntkgp.Dense(1, 0.3, 0.01))
    model = net.build(in_features=3, dtype=torch.float64)
    assert model[0].bias_var == 0.01 and float(model[2].weight_var) == 0.3


def test_ard_dimension_is_checked_behind_pass_through_layers():
    net = ntkgp.serial(ntkgp.Identity(), ntkgp.Dense(3, ard_num_dims=4), ntkgp.ReLU(), ntkgp.Dense(1))
    with pytest.raises(ValueError, match="ard_num_dims=4"):
        net.kernel(torch.randn(5, 3))


def test_network_gp_refuses_an_ard_first_layer_for_other_features_when_it_gets_its_data():
    """NetworkGP(x, y, ard_num_dims=k) with k other than x's features was built (and its training-mode
    forward returned a lazy distribution): only the first fit or prediction said "Dense(ard_num_dims=2)
    got inputs with 3 features"."""
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    message = r"^train_x with 3 feature\(s\) cannot enter the network: Dense\(ard_num_dims=2\) got inputs with 3"
    for make in (lambda: NetworkGP(x, y, ard_num_dims=2),
                 lambda: NetworkGP(x, y, ntkgp.mlp(1, "relu", ard_num_dims=2), kernel="ntk"),
                 lambda: NetworkGP(x[:0], y[:0], ard_num_dims=2)):   # the prior of a cold start too
        with pytest.raises(ValueError, match=message):
            make()
    model = NetworkGP(x, y, ard_num_dims=3).eval()   # the matching number of features is taken
    with torch.no_grad():
        assert model(x[:2]).mean.shape == (2,)
    # set_train_data(strict=False), which takes data of another shape, checks them as __init__ does (the
    # next prediction failed); a network without ard_num_dims takes any number of features
    with pytest.raises(ValueError, match=r"^inputs with 2 feature\(s\) cannot enter the network: Dense\(ard_num_dims"):
        model.set_train_data(x[:, :2], y, strict=False)
    free = NetworkGP(x, y).eval()
    free.set_train_data(x[:, :2], y, strict=False)
    with torch.no_grad():
        assert free(x[:2, :2]).mean.shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_gp_follows_the_device_of_its_data():
    """CUDA data: the model moves there (the likelihood's noise, of shape (1,), stayed on the CPU,
    and the first forward failed with "Expected all tensors to be on the same device")."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    gpu = NetworkGP(x.cuda(), y.cuda(), ntkgp.mlp(1, "erf", 2.0, 0.1), kernel="ntk", mean="constant")
    assert all(t.device.type == "cuda" for t in (*gpu.parameters(), *gpu.buffers()))
    cpu = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1), kernel="ntk", mean="constant")
    losses = [fit(model, steps=3) for model in (gpu, cpu)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-7, atol=1e-10)   # float64, rounding apart
    with torch.no_grad():
        means = [model.likelihood(model(t[:5])).mean for model, t in ((gpu, x.cuda()), (cpu, x))]
    assert means[0].device.type == "cuda"
    torch.testing.assert_close(means[0].cpu(), means[1], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_fit_under_a_callers_no_grad_or_inference_mode(mode):
    # fit differentiates the likelihood itself: under inference_mode it failed ("does not require grad")
    x, y = _data(n=12)
    expected = fit(NetworkGP(x, y, ntkgp.mlp(1, "relu", 2.0, 0.1), kernel="ntk"), steps=4)
    model = NetworkGP(x, y, ntkgp.mlp(1, "relu", 2.0, 0.1), kernel="ntk")
    with mode():
        got = fit(model, steps=4)
    assert got == pytest.approx(expected, rel=1e-12)
    # its parameters are still normal tensors: fitting goes on outside the mode, from where it stopped
    assert not any(p.is_inference() for p in model.parameters())
    assert fit(model, steps=1)[0] < got[0]


def test_fit_refuses_a_model_with_every_parameter_frozen_and_leaves_it_in_eval_mode():
    """torch's "optimizer got an empty parameter list" came after the model was put in train
    mode, where the next prediction failed ("You must train on the training inputs!")."""
    x, y = _data(n=12)
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    model.eval()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="Every parameter of the model is frozen"):
        fit(model, steps=3)
    assert not model.training and not model.likelihood.training
    with torch.no_grad():
        assert model(x[:4]).mean.shape == (4,)
    with pytest.raises(ValueError, match="Every parameter of the model is frozen"):   # whatever the optimizer
        fit(model, steps=3, optimizer=torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
    model.likelihood.requires_grad_(True)     # one trainable parameter is enough
    assert len(fit(model, steps=2)) == 2


def test_fit_says_that_a_model_made_inside_inference_mode_cannot_be_trained():
    x, y = _data(n=12)
    with torch.inference_mode():
        model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    model.eval()
    with pytest.raises(ValueError, match=r"made inside torch\.inference_mode"):
        fit(model, steps=2)
    assert not model.training


def test_fit_refuses_non_finite_hyperparameters_before_the_first_step():
    """A NaN raw noise surfaced as linear_operator's NanError from inside the Cholesky, not as
    fit's documented error."""
    x, y = _data()
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    with torch.no_grad():
        model.likelihood.noise_covar.raw_noise.fill_(math.nan)
    with pytest.raises(ValueError, match=r"Parameters \['likelihood.noise_covar.raw_noise'\] are not finite: "
                                         r"nothing to fit from\.$"):
        fit(model, steps=2)


def test_fit_says_why_a_noise_set_at_its_bound_is_not_finite():
    """GPyTorch accepts likelihood.noise = 1e-4, its default constraint's bound, as raw_noise = -inf;
    fit then refused "Parameters [...raw_noise] are not finite" without saying how that came about."""
    x, y = _data()
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    model.likelihood.noise = 1e-4
    assert model.likelihood.noise_covar.raw_noise.item() == -math.inf
    with pytest.raises(ValueError, match=r"not finite: nothing to fit from\. \['likelihood.noise_covar.raw_noise'\] "
                                         r"are infinite: a value set exactly at its constraint's bound .* inside"):
        fit(model, steps=2)
    model.likelihood.noise = 1.1e-4
    fit(model, steps=2)


def test_fit_stops_at_a_non_finite_loss():
    """Targets of 1e200 make the quadratic form of the likelihood overflow float64: fit stops with
    its documented error (the loss and the gradients are checked together, once per step)."""
    x, y = _data()
    model = NetworkGP(x.double(), y.double() * 1e200, ntkgp.mlp(1, "erf", 2.0, 0.1))
    with pytest.raises(FloatingPointError, match="Non-finite marginal likelihood or gradient at step 0"):
        fit(model, steps=2)


def test_network_gp_and_fit_are_exact_above_gpytorchs_cholesky_size():
    """GPyTorch switches to conjugate gradients and stochastic Lanczos above 800 points: fit's
    loss at fixed parameters varied by ±0.09 per point between calls (2.898, 2.997, 3.014 for an
    exact 2.983) and eval-mode means were 1.4 % off."""
    g = torch.Generator().manual_seed(0)
    n = 850
    x = torch.rand(n, 3, generator=g) * 4 - 2
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g)
    x_test = torch.rand(5, 3, generator=g) * 4 - 2
    net = ntkgp.mlp(2, "erf", 1.5, 0.1)
    model = NetworkGP(x, y, net)
    model.likelihood.noise = 1e-3
    with torch.no_grad():
        factor = torch.linalg.cholesky(net.kernel(x).nngp + 1e-3 * torch.eye(n))
        exact = -float(torch.distributions.MultivariateNormal(torch.zeros(n), scale_tril=factor).log_prob(y)) / n
        mean = (net.kernel(x_test, x).nngp @ torch.cholesky_solve(y[:, None], factor))[:, 0]
    # GPyTorch's default limit: importing BoTorch (another test) raises it to 4096, above these 850 points
    with gpytorch.settings.max_cholesky_size(800):
        assert fit(model, steps=1, lr=0.0)[0] == pytest.approx(exact, rel=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(model(x_test).mean, mean, rtol=1e-10, atol=1e-12)


def _small_model(seed=0, n=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    return NetworkGP(x, torch.sin(3 * x.sum(-1)), ntkgp.mlp(2, "erf", 1.5, 0.1))


# the steps it takes are meant to break the kernel: linear_operator's jitter retries say so on the way
@pytest.mark.filterwarnings("ignore:A not p.d., added jitter")
def test_fit_that_fails_leaves_the_best_parameters_seen_in_eval_mode():
    # the last step's overflow (weight_var = inf) returned normally, and the model then refused to predict
    model = _small_model()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="after the last step"):
        fit(model, steps=1, optimizer=torch.optim.SGD(model.parameters(), lr=1e6))
    assert not model.training
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name], rtol=0, atol=0)
    # a step into a non-positive-definite kernel: linear_operator's NotPSDError escaped, parameters left broken
    model = _small_model()
    seen = []
    with pytest.raises(FloatingPointError, match="not positive definite"):
        fit(model, steps=40, optimizer=torch.optim.SGD(model.parameters(), lr=1e3),
            callback=lambda step, loss: seen.append(loss))
    assert fit(model, steps=1, lr=0.0)[0] == pytest.approx(min(seen), rel=1e-12)


def test_fit_keeps_the_lowest_loss_when_the_optimizer_ends_above_it():
    # default L-BFGS (no line search) stepped into 1e203 variances: history 0.949 → 2735, no warning
    g = torch.Generator().manual_seed(2)
    x = torch.rand(40, 2, generator=g) * 4 - 2
    y = torch.sin(x.sum(-1)) + 0.05 * torch.randn(40, generator=g)
    model = NetworkGP(x, y, ntkgp.mlp(2, "erf", 1.5, 0.1))
    losses = []
    optimizer = torch.optim.LBFGS(model.parameters())
    original = optimizer.step

    def step(closure):
        def recorded():
            loss = closure()
            losses.append(float(loss.detach()))
            return loss
        return original(recorded)

    optimizer.step = step
    with pytest.warns(RuntimeWarning, match="keeps the parameters of the lowest loss"):
        history = fit(model, steps=5, optimizer=optimizer)
    assert max(history) > 100 * min(losses)
    assert fit(model, steps=1, lr=0.0)[0] == pytest.approx(min(losses), rel=1e-12)
    assert all(math.isfinite(float(p.detach())) for p in model.net.parameters())


def test_fit_names_non_finite_data_set_after_construction():
    """set_train_data refuses them itself; fit names data assigned past it (model.train_targets = ...)."""
    model = _small_model()
    y = model.train_targets.clone()
    y[3] = math.nan
    with pytest.raises(ValueError, match="targets contains NaN"):
        model.set_train_data(targets=y, strict=False)
    model.train_targets = y
    with pytest.raises(ValueError, match="contain NaN or infinite values"):
        fit(model, steps=2)


def test_fit_names_data_of_different_lengths_set_after_construction():
    """set_train_data(..., strict=False) checks nothing: torch's "The size of tensor a (5) must
    match the size of tensor b (20)" came from inside GPyTorch."""
    model = _small_model()
    x, _ = _data(n=model.train_targets.shape[-1] + 3)
    model.set_train_data(inputs=x, strict=False)
    with pytest.raises(ValueError, match=r"do not hold the same number of points"):
        fit(model, steps=2)
    vector = NetworkGP(*_data(n=12, k=2), ntkgp.mlp(1, "erf", 2.0, 0.1))
    vector.set_train_data(inputs=_data(n=10)[0], strict=False)
    with pytest.raises(ValueError, match=r"\(10, 2\).*\(12, 2\)"):
        fit(vector, steps=2)
    vector.set_train_data(inputs=_data(n=12)[0], strict=False)   # (N, k) targets hold N second last
    assert len(fit(vector, steps=1)) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_data_is_refused_when_the_model_is_built(dtype):
    """The marginal likelihood's Cholesky has no half-precision kernel: fit failed with
    '"cholesky_cpu" not implemented for 'Half'' after the model had been built."""
    x, y = _data()
    with pytest.raises(ValueError, match=rf"train_x is {dtype}.*\.float\(\) or \.double\(\)"):
        NetworkGP(x.to(dtype), y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    with pytest.raises(ValueError, match=rf"train_y is {dtype}"):
        NetworkGP(x, y.to(dtype), ntkgp.mlp(1, "erf", 2.0, 0.1))


def test_fit_lifts_the_cholesky_limit_for_network_kernels_only():
    # a structured model (SKI) relies on GPyTorch's iterative solves: dense Cholesky made it 40x slower
    seen = {}

    class Plain(gpytorch.models.ExactGP):
        def __init__(self, x, y, kernel):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module, self.covar_module = gpytorch.means.ZeroMean(), kernel

        def forward(self, x):
            seen[type(self.covar_module).__name__] = gpytorch.settings.max_cholesky_size.value()
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    x = torch.randn(900, 2, generator=torch.Generator().manual_seed(0))
    # GPyTorch's default (importing BoTorch raises the global value to 4096)
    with gpytorch.settings.max_cholesky_size(800):
        for kernel in (gpytorch.kernels.RBFKernel(), ntkgp.NNGPKernel(ntkgp.mlp(1, width=8))):
            fit(Plain(x, x.sum(-1), kernel), steps=1)
    assert seen == {"RBFKernel": 800, "NNGPKernel": 900}


def test_vector_targets_keep_linear_operators_exact_kronecker_solves(monkeypatch):
    # raising the limit past N k made K ⊗ I_k a dense (N k)² Cholesky: examples/03 took 352 s, not 11 s
    seen = []
    original = NetworkGP.forward

    def forward(self, x):
        seen.append(gpytorch.settings.max_cholesky_size.value())
        return original(self, x)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 2, generator=g)
    model = NetworkGP(x, torch.randn(120, 8, generator=g), ntkgp.mlp(1, width=8))
    monkeypatch.setattr(NetworkGP, "forward", forward)
    with gpytorch.settings.max_cholesky_size(800):   # GPyTorch's default (BoTorch's import sets 4096)
        fit(model, steps=1)
    assert seen and max(seen) < 120 * 8


def test_fit_length_check_reads_the_points_on_the_targets_axis_of_their_likelihood():
    """(N, k) targets hold the points on their second last axis only for a multitask likelihood: the
    check first accepted inputs whose count matched either of the last two sizes (5 points against
    (20, 5) targets passed, and fit ran on mismatched data)."""
    vector = NetworkGP(*_data(n=20, k=5), ntkgp.mlp(1, "erf", 2.0, 0.1))
    vector.set_train_data(inputs=_data(n=5)[0], strict=False)
    with pytest.raises(ValueError, match="do not hold the same number of points"):
        fit(vector, steps=1)


def test_fit_names_a_bad_learning_rate_or_model():
    """A string lr failed inside Adam ("'<=' not supported"), an infinite one after the first step, and
    a network spec given for the model with "'Serial' object has no attribute 'train_targets'"."""
    model = NetworkGP(*_data(n=6), ntkgp.mlp(1, "erf", 2.0, 0.1))
    for lr in ("0.1", -1.0, math.nan, math.inf, True, None):
        with pytest.raises(ValueError, match="lr must be a finite non-negative number"):
            fit(model, steps=1, lr=lr)
    assert len(fit(model, steps=1, lr=0)) == 1   # the objective, evaluated without a step
    for wrong in (ntkgp.mlp(1), None):
        with pytest.raises(ValueError, match="model must be a GPyTorch ExactGP"):
            fit(wrong, steps=1)
    # an optimizer's name failed with an AttributeError, a callback that is not callable after the first step
    with pytest.raises(ValueError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        fit(model, steps=1, optimizer="adam")

    class Wrapper:   # an optimizer wrapper that is not a subclass (Lightning's LightningOptimizer)
        def __init__(self, inner):
            self.inner = inner

        def step(self, closure=None):
            return self.inner.step(closure)

        def zero_grad(self):
            self.inner.zero_grad()

    assert len(fit(model, steps=2, optimizer=Wrapper(torch.optim.Adam(model.parameters(), lr=0.01)))) == 2
    with pytest.raises(ValueError, match="callback must be callable"):
        fit(model, steps=1, callback=3)
    with pytest.raises(ValueError, match=r"NetworkGP\(train_x, train_y, net\)"):
        fit(ntkgp.mlp(1), steps=1)


def test_exact_solves_raises_the_cholesky_limit_to_the_most_training_points_of_a_model_or_a_model_list():
    """A model list (BoTorch's ModelListGP, whose train_inputs is a list of tuples) crashed with
    "'tuple' object has no attribute 'shape'"."""
    botorch = pytest.importorskip("botorch")
    x, y = _data(n=900)
    models = [botorch.models.SingleTaskGP(x[:n], y[:n, None], covar_module=ntkgp.NTKKernel(ntkgp.mlp(1, "relu")))
              for n in (850, 900)]
    with gpytorch.settings.max_cholesky_size(100):   # BoTorch's import raises GPyTorch's default of 800
        with ntkgp.models.exact_solves(NetworkGP(x, y, ntkgp.mlp(1, "relu", 2.0, 0.1))):
            assert gpytorch.settings.max_cholesky_size.value() == 900
        with ntkgp.models.exact_solves(botorch.models.ModelListGP(*models)):
            assert gpytorch.settings.max_cholesky_size.value() == 900
        with ntkgp.models.exact_solves(NetworkGP(x[:10], y[:10], ntkgp.mlp(1, "relu"))):
            assert gpytorch.settings.max_cholesky_size.value() == 100   # never lowered
    with pytest.raises(ValueError, match="needs a model with training inputs"):
        ntkgp.models.exact_solves(ntkgp.NTKKernel(ntkgp.mlp(1, "relu")))
    untrained = gpytorch.models.ExactGP(None, None, gpytorch.likelihoods.GaussianLikelihood())
    with pytest.raises(ValueError, match="one of the list has none"):
        ntkgp.models.exact_solves(gpytorch.models.IndependentModelList(models[0], untrained))


def _change_weight_var(model):
    model.net[0].weight_var = 5.0


def _initialize(model):
    model.covar_module.initialize(**{"net.layers.2.raw_weight_var": torch.tensor(0.7)})


def _optimizer_step(model):
    with torch.no_grad():
        model.net[0].raw_bias_var.add_(0.3)


def _noise(model):
    model.likelihood.noise = 0.5


@pytest.mark.parametrize("change", [_change_weight_var, _initialize, _optimizer_step, _noise])
def test_eval_predictions_follow_hyperparameters_changed_in_place(change):
    """GPyTorch caches the training solve at the first eval-mode prediction and kept it after the
    hyperparameters changed in place: the next prediction came from neither model (0.59 off a
    rebuilt one; for the noise, exactly the old prediction). The predictors refuse such a change;
    NetworkGP rebuilds its solve."""
    x, y = _data(30)
    x_test = torch.linspace(-2, 2, 7, dtype=torch.float64).unsqueeze(-1).expand(7, x.shape[-1]).contiguous()
    model = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf")
    model.eval()
    with torch.no_grad():
        before = model(x_test)
        change(model)
        after = model(x_test)
        model.train()
        model.eval()
        rebuilt = model(x_test)
    assert float((before.mean - rebuilt.mean).abs().max()) > 1e-3   # the change matters
    torch.testing.assert_close(after.mean, rebuilt.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.covariance_matrix, rebuilt.covariance_matrix, rtol=1e-12, atol=1e-12)


def test_eval_predictions_follow_a_change_of_the_models_dtype():
    """``.double()`` and ``.float()`` convert GPyTorch's training data and parameters but not its cached
    training solve, whose hyperparameters still compare equal across dtypes: the next prediction (or
    fantasy) failed with "expected m1 and m2 to have the same dtype". The converted model predicts as one
    built in the new dtype (float32 data are exact in float64, and so are the variances' anchors and the
    noise); its fantasy as one refitted with the fantasy points (to the rounding of the updated solve)."""
    x, y = _data(30)
    x, y = x.float(), y.float()
    x_test = x[:5] + 0.05
    model = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf").eval()
    with torch.no_grad():
        model(x_test)
        model.double()
        xf, yf = x[:2].double() + 0.1, y[:2].double()
        fantasy = model.get_fantasy_model(xf, yf)   # from a float64 solve, rebuilt
        refit = NetworkGP(torch.cat([x.double(), xf]), torch.cat([y.double(), yf]), kernel="ntk", depth=2,
                          activation="erf").eval()
        torch.testing.assert_close(fantasy(x_test.double()).mean, refit(x_test.double()).mean, rtol=1e-8, atol=1e-10)
        got = model(x_test.double())
        built = NetworkGP(x.double(), y.double(), kernel="ntk", depth=2, activation="erf").eval()(x_test.double())
        assert got.mean.dtype == torch.float64
        torch.testing.assert_close(got.mean, built.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.covariance_matrix, built.covariance_matrix, rtol=1e-12, atol=1e-12)
        model.float()   # and back: the float64 solve is dropped too
        got = model(x_test)
        built = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf").eval()(x_test)
        assert got.mean.dtype == torch.float32
        torch.testing.assert_close(got.mean, built.mean, rtol=0, atol=0)


def test_fantasies_follow_hyperparameters_changed_in_place():
    """get_fantasy_model updates GPyTorch's cached training solve, which was the one from before an
    in-place change of the hyperparameters: the fantasy's predictions came from neither model."""
    x, y = _data(20)
    xt, xf, yf = x[:4] + 0.05, x[:2] + 0.1, y[:2]
    model = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf").eval()
    with torch.no_grad():
        model(xt)
        model.net[0].weight_var = 5.0
        fantasy = model.get_fantasy_model(xf, yf)
        refit = NetworkGP(torch.cat([x, xf]), torch.cat([y, yf]), kernel="ntk", depth=2, activation="erf").eval()
        refit.load_state_dict(model.state_dict())
        torch.testing.assert_close(fantasy(xt).mean, refit(xt).mean, rtol=1e-8, atol=1e-10)


def test_an_unchanged_model_keeps_its_cached_solve_and_a_fixed_noise_is_followed():
    """The check that rebuilds a stale solve must keep a valid one (a check that always rebuilt
    passed the tests above), and a FixedNoiseGaussianLikelihood keeps its noise as a plain tensor,
    which the parameters and buffers do not show (0.40 off a rebuilt model)."""
    x, y = _data(25)
    x_test = x[:5] + 0.05
    noise = torch.full((25,), 0.01)
    model = NetworkGP(x, y, kernel="nngp", depth=2, activation="erf",
                      likelihood=gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)).eval()
    with torch.no_grad():
        model(x_test)
        strategy = model.prediction_strategy
        model(x_test)
        assert model.prediction_strategy is strategy
        model.likelihood.noise = torch.full((25,), 0.5)
        after = model(x_test)
        model.train()
        model.eval()
        rebuilt = model(x_test)
        torch.testing.assert_close(after.mean, rebuilt.mean, rtol=1e-12, atol=1e-12)
        # a fantasy's solve is the updated one: kept, and equal to a model refitted with the new point
        fantasy = model.get_fantasy_model(x[:1] + 0.1, y[:1], noise=torch.full((1,), 0.5))
        fantasy(x_test)
        strategy = fantasy.prediction_strategy
        out = fantasy(x_test)
        assert fantasy.prediction_strategy is strategy
        refit = NetworkGP(torch.cat([x, x[:1] + 0.1]), torch.cat([y, y[:1]]), kernel="nngp", depth=2,
                          activation="erf",
                          likelihood=gpytorch.likelihoods.FixedNoiseGaussianLikelihood(torch.full((26,), 0.5)))
        refit.covar_module.load_state_dict(model.covar_module.state_dict())
        torch.testing.assert_close(out.mean, refit.eval()(x_test).mean, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(7,), (9,), (1,), (), (2, 8)], ids=["short", "long", "one", "0-d", "batch"])
def test_a_fixed_noise_of_another_length_is_refused(shape):
    """GPyTorch leaves a FixedNoiseGaussianLikelihood's noise out when its length is not the number of
    training points, with only a warning ("... treated as a no-op"): 7 noises of 0.3 for 8 points (or one,
    meant as a shared variance) gave the noise-free posterior, and fit maximized the noise-free evidence.
    A 0-d noise failed at the first prediction with "tuple index out of range", a batch of them with "mat2
    must be a matrix". Refused when the model is built, and when data set later left the noise behind
    (set_train_data), at the next prediction or fit; with one noise per point it is the noisy posterior."""
    x, y = _data(n=8)
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    fixed = gpytorch.likelihoods.FixedNoiseGaussianLikelihood

    refused = rf"noise of shape {re.escape(str(shape))} for 8 training points.*shape \(8,\)"
    with pytest.raises(ValueError, match=refused):
        NetworkGP(x, y, net, likelihood=fixed(torch.full(shape, 0.3)))
    model = NetworkGP(x, y, net, likelihood=fixed(torch.full((8,), 0.3))).eval()
    with torch.no_grad():
        expected = predict.GPPosterior(net, x, y, noise=0.3).predict(x[:3] + 0.1)
        got = model(x[:3] + 0.1)
    # one posterior from two factorizations of the same float64 matrix (entries of order 1)
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-10, atol=1e-10)
    model.set_train_data(torch.cat([x, x[:2] + 0.2]), torch.cat([y, y[:2]]), strict=False)
    with pytest.raises(ValueError, match=r"noise of shape \(8,\) for 10 training points.*set likelihood.noise"):
        model(x[:3])
    with pytest.raises(ValueError, match=r"noise of shape \(8,\) for 10 training points"):
        fit(model, steps=1)
    model.likelihood.noise = torch.full((10,), 0.3)
    with torch.no_grad():
        expected = predict.GPPosterior(net, model.train_inputs[0], model.train_targets, noise=0.3).predict(x[:3] + 0.1)
        torch.testing.assert_close(model.eval()(x[:3] + 0.1).mean, expected.mean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [None, 2], ids=["1-D targets", "vector targets"])
def test_predictions_with_gradients_after_one_under_inference_mode(k):
    """A prediction under torch.inference_mode() cached its training solve as inference tensors, and
    the next one with autograd on (input gradients, as an acquisition function's optimizer takes)
    failed with "Inference tensors cannot be saved for backward" (GPyTorch's ExactGP with an
    RBFKernel fails alike): the model rebuilds that solve outside the mode, and keeps it there."""
    x, y = _data(15, k=k)
    x_test = x[:4] + 0.05
    model = NetworkGP(x, y, kernel="ntk", depth=2, activation="erf").eval()
    expected = model(x_test)
    model.train()
    model.eval()
    for fast in (False, True):   # LOVE's covariance cache is made at the first prediction too
        with gpytorch.settings.fast_pred_var(fast):
            with torch.inference_mode():
                model(x_test)
            inputs = x_test.clone().requires_grad_(True)
            got = model(inputs)
            (got.mean.sum() + got.variance.sum()).backward()
            # the same solve rebuilt: float64 rounding apart (LOVE's low-rank variances to 1e-10)
            torch.testing.assert_close(got.mean, expected.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got.variance, expected.variance, rtol=1e-10, atol=1e-10)
            assert inputs.grad is not None and bool(torch.isfinite(inputs.grad).all())
            strategy = model.prediction_strategy
            model(x_test)
            assert model.prediction_strategy is strategy   # rebuilt once, not at every call
    if k is None:   # a fantasy made under the mode predicts with gradients too
        with torch.inference_mode():
            fantasy = model.get_fantasy_model(x[:2] + 0.1, y[:2])
            before = fantasy(x_test).mean.clone()
        inputs = x_test.clone().requires_grad_(True)
        got = fantasy(inputs).mean
        got.sum().backward()
        torch.testing.assert_close(got, before, rtol=1e-12, atol=1e-12)


def test_constant_means_follow_their_output_columns():
    """NetworkGP(mean="constant") with (N, k) targets: each output column has its own constant mean.
    The prior (train mode) mean of column j is the j-th constant, and the posterior mean satisfies the
    GP formula m_j + K*d (K + σ²I)⁻¹ (y_j − m_j) per column (written out densely)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 2, generator=g, dtype=torch.float64)
    net = ntkgp.mlp(2, "erf", 1.7, 0.1)
    model = NetworkGP(x, y, net, kernel="nngp", mean="constant")
    consts = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    with torch.no_grad():
        model.mean_module.constant.copy_(consts.reshape(model.mean_module.constant.shape))
        model.likelihood.noise = 0.1
    model.train()
    with torch.no_grad():
        prior = model(x)                     # train mode: the prior at the training inputs
    torch.testing.assert_close(prior.mean, consts.expand(8, 3), rtol=0, atol=1e-12)   # constants, exactly
    model.eval()
    with torch.no_grad():
        post = model(xt).mean
        k = net.kernel(torch.cat([x, xt]), ntk=False).nngp
        noise = float(model.likelihood.noise)
    c = k[:8, :8] + noise * torch.eye(8, dtype=torch.float64)
    expected = consts + k[8:, :8] @ torch.linalg.solve(c, y - consts)
    # exact Cholesky solves of an 8×8 well-conditioned system (noise 0.1): rounding ~1e-14
    torch.testing.assert_close(post, expected, rtol=1e-9, atol=1e-10)


def test_weight_and_bias_priors_of_one_layer_both_count():
    """A layer with priors on both its weight and its bias variance contributes both log densities to
    NetworkGP's marginal-likelihood objective (NetworkGP.named_priors counts each prior once, but not
    one per module): objective(with priors) − objective(without) = log p_w(σ_w²) + log p_b(σ_b²) (times N),
    the prior densities evaluated directly."""
    x = torch.randn(15, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    w_prior, b_prior = gpytorch.priors.GammaPrior(3.0, 1.5), gpytorch.priors.GammaPrior(2.0, 10.0)

    def objective(with_priors):
        priors = {"weight_var_prior": w_prior, "bias_var_prior": b_prior} if with_priors else {}
        net = ntkgp.serial(ntkgp.Dense(10, 2.0, 0.1, **priors), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))
        model = NetworkGP(x, y, net)
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        with torch.no_grad():
            return float(mll(model(x), y)) * len(y), model

    with_priors, model = objective(True)
    without, _ = objective(False)
    expected = float(w_prior.log_prob(torch.tensor(2.0, dtype=torch.float64))
                     + b_prior.log_prob(torch.tensor(0.1, dtype=torch.float64)))
    # same kernel and data in both: the difference is the log priors up to rounding of the MLL (~1e-13)
    assert abs((with_priors - without) - expected) < 1e-9
    assert len(list(model.named_priors())) == 2


@pytest.mark.parametrize("call", [lambda model, x: model(x, x), lambda model, x: model(x=x), lambda model, x: model()],
                         ids=["two", "keyword", "none"])
@pytest.mark.parametrize("training", [False, True])
def test_network_gp_names_a_call_on_other_than_one_input_tensor(call, training):
    """GPyTorch pairs the inputs with the training inputs by zip(strict=True): model(x, x), model(x=x)
    and model() failed with "zip() argument 2 is longer (shorter) than argument 1"."""
    x, y = _data(n=6)
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1)).train(training)
    with pytest.raises(ValueError, match=r"one positional tensor of inputs, model\(x\)"):
        call(model, x)


@pytest.mark.parametrize("change", [
    dict(inputs="nan", match="inputs contains NaN"),
    dict(targets="nan", match="targets contains NaN"),
    dict(inputs="float32", match="inputs are torch.float32 on cpu, the model is torch.float64"),
    dict(targets="float32", match="targets are torch.float32 on cpu, the model is torch.float64"),
    dict(targets="list", match="targets must be a tensor"),
], ids=["nan-inputs", "nan-targets", "float32-inputs", "float32-targets", "list-targets"])
def test_set_train_data_checks_what_strict_false_lets_through(change):
    """``set_train_data(..., strict=False)`` skipped the constructor's checks: NaN targets gave NaN
    predictions without a word, NaN inputs failed at the next prediction as "x2", and float32 data in a
    float64 model trained but predicted with GPyTorch's "Expected b and A to have the same dtype". The
    model keeps its data; a float32 model takes float32 data."""
    x, y = _data(n=8)
    new_x, new_y = _data(n=5, seed=1)
    edit = {"nan": lambda v: v.clone().fill_(math.nan), "float32": lambda v: v.float(), "list": lambda v: v.tolist()}
    inputs = edit[change["inputs"]](new_x) if "inputs" in change else new_x
    targets = edit[change["targets"]](new_y) if "targets" in change else new_y
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1)).eval()
    with pytest.raises(ValueError, match=change["match"]):
        model.set_train_data(inputs, targets, strict=False)
    assert model.train_inputs[0] is x and model.train_targets is y
    float32 = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1)).float().eval()
    float32.set_train_data(new_x.float(), new_y.float(), strict=False)
    reference = NetworkGP(new_x.float(), new_y.float(), ntkgp.mlp(1, "erf", 2.0, 0.1)).eval()
    assert torch.equal(float32(x.float()).mean, reference(x.float()).mean)


@pytest.mark.parametrize("k, targets, match", [
    (2, lambda y: y[:, 0], r"\(\.\.\., N, 2\) for this model of 2 outputs, got \(5,\)"),
    (2, lambda y: torch.cat([y, y[:, :1]], -1), r"\(\.\.\., N, 2\) for this model of 2 outputs, got \(5, 3\)"),
    (2, lambda y: y[:4], r"\(\.\.\., 5, 2\) for inputs of 5 points, got \(4, 2\)"),
    (None, lambda y: y[:, None], r"\(\.\.\., 5\) for inputs of 5 points, got \(5, 1\) \(a model built on 1-D"),
    (None, lambda y: y[:4], r"\(\.\.\., 5\) for inputs of 5 points, got \(4,\)"),
    (None, lambda y: y[0], r"\(\.\.\., N\), one per training point, got a 0-d tensor"),
], ids=["1d-into-vector", "3-outputs-into-2", "vector-fewer-points", "n1-into-1d", "1d-fewer-points", "0-d"])
def test_set_train_data_refuses_targets_of_another_shape(k, targets, match):
    """``strict=False`` took targets of another kind than the model's: (N,) or (N, 3) targets of a
    2-output model failed later inside GPyTorch (fit: "The size of tensor a (8) must match the size of
    tensor b (16)"; a prediction: "Flattening the training labels failed"), and (N, 1) targets of a
    single-output model predicted with "You must train on the training inputs!". Refused when set; the
    model keeps its data, and targets of its kind for new points are still taken."""
    x, y = _data(n=8, k=k)
    new_x, new_y = _data(n=5, k=k, seed=1)
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1)).eval()
    with pytest.raises(ValueError, match=match):
        model.set_train_data(new_x, targets(new_y), strict=False)
    assert model.train_inputs[0] is x and model.train_targets is y
    model.set_train_data(new_x, new_y, strict=False)
    reference = NetworkGP(new_x, new_y, ntkgp.mlp(1, "erf", 2.0, 0.1)).eval()
    assert torch.equal(model(x).mean, reference(x).mean)


def test_fit_names_an_optimizer_class_or_one_over_other_parameters():
    """An optimizer class (not an instance) failed with "'function' object has no attribute
    '_optimizer_step_pre_hooks'"; one made over another model's parameters (a copy's) left this model
    unchanged with a flat history, without a word."""
    x, y = _data(n=8)
    model = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    with pytest.raises(ValueError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        fit(model, steps=1, optimizer=torch.optim.Adam)
    other = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1))
    with pytest.raises(ValueError, match="holds none of the model's trainable parameters"):
        fit(model, steps=1, optimizer=torch.optim.Adam(other.parameters(), lr=0.1))
    model.likelihood.requires_grad_(False)   # its frozen noise alone: nothing the fit could move
    with pytest.raises(ValueError, match="holds none of the model's trainable parameters"):
        fit(model, steps=1, optimizer=torch.optim.Adam(model.likelihood.parameters(), lr=0.1))
    history = fit(model, steps=2, optimizer=torch.optim.Adam(model.parameters(), lr=0.1))
    assert history[1] < history[0]



class _CountingAdam(torch.optim.Adam):
    """Adam that notes torch's default device where its step makes its own tensors (torch 2.11, not 2.13, made its
    step counters there, with ``torch.tensor(0.0)``)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen: list[str] = []

    def step(self, closure):
        loss = super().step(closure)
        self.seen.append(torch.tensor(0.0).device.type)
        return loss


@pytest.mark.filterwarnings("ignore:Numerical.erf_noting_the_default_device:RuntimeWarning")   # its gradient quadrature
def test_fit_makes_the_optimizers_own_tensors_on_the_cpu_and_evaluates_the_model_as_called():
    """torch 2.11, not 2.13, made Adam's step counters on torch's default device (a meta default failed fit with
    "Tensor.item() cannot be called on meta tensors"): the first step makes them on the CPU, where torch
    means them to be (the parameters' device put a CUDA model's counters on the GPU under the usual CPU
    default: a host synchronization per parameter and step). The model's forward pass runs under the
    caller's default device at every step: the first step ran it under the parameters' device."""
    evaluated: list[str] = []

    def erf_noting_the_default_device(z):
        evaluated.append(torch.tensor(0.0).device.type)
        return torch.erf(z)

    def model():
        net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.Numerical(erf_noting_the_default_device, degree=40),
                           ntkgp.Dense(1, 1.5, 0.1)).double()
        return NetworkGP(x, y, net, kernel="nngp")

    x, y = _data(n=6)
    plain = model()
    expected = fit(plain, steps=3, optimizer=torch.optim.Adam(plain.parameters(), lr=0.05))
    noted = model()
    optimizer = _CountingAdam(noted.parameters(), lr=0.05)
    evaluated.clear()
    with torch.device("meta"):
        history = fit(noted, steps=3, optimizer=optimizer, callback=lambda step, loss: evaluated.append("|"))
    assert optimizer.seen[0] == "cpu"                            # the first step's counters
    per_step = [set(part) for part in "".join(e[0] for e in evaluated).split("|")[:3]]
    assert all("m" in seen for seen in per_step), per_step      # m: meta, the caller's default device
    assert history == expected                                   # the same steps, bitwise, as under the CPU default


def test_missing_targets_are_refused_with_the_advice_to_drop_their_points():
    """NaN targets (missing values) are refused with advice: GPyTorch's observation_nan_policy("mask")
    masks them out of the posterior mean only, its covariance still conditions on their inputs (0.10
    off a model of the other points, measured below as > 1e-2), so NetworkGP does not take that policy's
    route. Infinite targets get no such advice."""
    x, y = _data(12)
    y = y.double()
    x = x.double()
    missing = y.clone()
    missing[3] = float("nan")
    keep = ~missing.isnan()
    with pytest.raises(ValueError, match=r"train_y contains NaN or infinite values\. For missing targets, drop "
                                         r"their points \(x\[~y\.isnan\(\)\], y\[~y\.isnan\(\)\]\)"):
        NetworkGP(x, missing, kernel="nngp", depth=2, activation="relu")
    with pytest.raises(ValueError, match=r"train_y contains NaN or infinite values\.$"):
        NetworkGP(x, torch.where(keep, y, torch.inf), kernel="nngp", depth=2, activation="relu")
    model = NetworkGP(x, y, kernel="nngp", depth=2, activation="relu")
    with pytest.raises(ValueError, match=r"^targets contains NaN .* drop their points"):
        model.set_train_data(x, missing, strict=False)
    with pytest.raises(ValueError, match=r"^targets contains NaN .* drop their points"):
        model.eval().get_fantasy_model(x[:1] + 0.1, missing[3:4])
    # the premise: GPyTorch's own ExactGP under the mask policy, the same kernel, against the other points
    class Plain(gpytorch.models.ExactGP):
        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    def plain(inputs, targets):
        out = Plain(inputs, targets, gpytorch.likelihoods.GaussianLikelihood().double()).eval()
        out.mean_module, out.covar_module = gpytorch.means.ZeroMean(), model.covar_module
        return out

    xt = x[:4] + 0.3
    with torch.no_grad(), gpytorch.settings.observation_nan_policy("mask"):
        masked, dropped = plain(x, missing)(xt), plain(x[keep], y[keep])(xt)
    torch.testing.assert_close(masked.mean, dropped.mean, rtol=1e-9, atol=1e-12)
    assert float((masked.covariance_matrix - dropped.covariance_matrix).abs().max()) > 1e-2


def test_fit_takes_missing_targets_of_a_plain_exact_gp_under_the_mask_policy():
    """ntkgp's fit refused a GPyTorch ExactGP's NaN targets even under observation_nan_policy("mask"),
    whose marginal likelihood leaves them out: its objective (per target, all N counted) times N is the
    other points' times their number; without the policy NaN is refused as before."""
    x, y = _data(12)
    x, y = x.double(), y.double()
    missing = y.clone()
    missing[[2, 7]] = float("nan")
    keep = ~missing.isnan()
    kernel = ntkgp.NNGPKernel(ntkgp.mlp(2, "erf"))

    class Plain(gpytorch.models.ExactGP):
        def __init__(self, inputs, targets):
            super().__init__(inputs, targets, gpytorch.likelihoods.GaussianLikelihood().double())
            self.mean_module, self.covar_module = gpytorch.means.ZeroMean(), kernel

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    with pytest.raises(ValueError, match="contain NaN or infinite values"):
        fit(Plain(x, missing), steps=1, lr=0.0)
    with gpytorch.settings.observation_nan_policy("mask"):
        masked = fit(Plain(x, missing), steps=1, lr=0.0)
    reference = fit(Plain(x[keep], y[keep]), steps=1, lr=0.0)
    assert masked[0] * 12 == pytest.approx(reference[0] * 10, rel=1e-10)


def test_missing_targets_advice_keeps_whole_points_of_vector_and_batched_targets():
    """The advice to drop NaN targets' points read x[~y.isnan()] for every shape: for (N, k) targets a mask of
    y's shape picks single entries of x (an IndexError for d != k; for d == k a flat tensor of the other
    entries, refused as train_x). A point goes with any of its outputs missing, and a batch of fantasies
    (b, M) keeps the points none of its members misses: the advice given is taken as written."""
    x, y = _data(10, k=2)
    x, y = x.double(), y.double()
    y[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"drop their points \(keep = ~y\.isnan\(\)\.any\(-1\); "
                                         r"x\[keep\], y\[keep\]\)"):
        NetworkGP(x, y, kernel="nngp", depth=2, activation="relu")
    keep = ~y.isnan().any(-1)
    model = NetworkGP(x[keep], y[keep], kernel="nngp", depth=2, activation="relu")
    assert model.train_targets.shape == (9, 2)
    with pytest.raises(ValueError, match=r"keep = ~y\.isnan\(\)\.any\(-1\)"):
        model.set_train_data(x, y, strict=False)
    x, y = _data(8)
    x, y = x.double(), y.double()
    model = NetworkGP(x, y, kernel="nngp", depth=2, activation="relu").eval()
    with torch.no_grad():
        model(x[:1])   # GPyTorch fantasizes from a prediction's caches
    x_new, y_new = x[:3] + 0.1, torch.stack([y[:3], y[:3] + 1])
    y_new[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"drop their points \(keep = ~y\.isnan\(\)\.flatten\(0, -2\)\.any\(0\); "
                                         r"x\[keep\], y\[\.\.\., keep\]\)"):
        model.get_fantasy_model(x_new, y_new)
    keep = ~y_new.isnan().flatten(0, -2).any(0)
    assert model.get_fantasy_model(x_new[keep], y_new[..., keep]).train_targets.shape == (2, 10)


def test_fit_refuses_targets_that_are_all_missing_under_the_mask_policy():
    """Under observation_nan_policy("mask") targets all NaN (or each missing in some member of a batched model,
    which GPyTorch masks in all of them) leave no data: the masked marginal likelihood is 0 at any
    hyperparameters, and fit returned a history of -0.0 with nothing moved. Refused as the empty data set is."""
    x, y = _data(6)
    x, y = x.double(), y.double()

    class Plain(gpytorch.models.ExactGP):
        def __init__(self, targets, batch=torch.Size()):
            super().__init__(x, targets, gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch).double())
            self.mean_module = gpytorch.means.ZeroMean(batch_shape=batch)
            self.covar_module = gpytorch.kernels.RBFKernel(batch_shape=batch).double()

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    batched = torch.stack([y, y]).clone()
    batched[0, :3], batched[1, 3:] = float("nan"), float("nan")
    with gpytorch.settings.observation_nan_policy("mask"):
        for model in (Plain(torch.full_like(y, float("nan"))), Plain(batched, torch.Size([2]))):
            with pytest.raises(ValueError, match="no training data to fit to: every target is missing"):
                fit(model, steps=2)
        batched[1, 3] = 1.0   # one point observed in both members: fitted
        assert len(fit(Plain(batched, torch.Size([2])), steps=2)) == 2


def test_vector_target_predictions_do_not_warn_about_linear_operators_sparse_matrices():
    """GPyTorch's multitask prediction sums with a sparse matrix built inside linear_operator, and
    torch 2.13 warned at a NetworkGP's first prediction for vector targets "Sparse invariant checks
    are implicitly disabled. Memory errors (e.g. SEGFAULT) will occur ...", which a user cannot act
    on. A fresh interpreter (torch warns once per process), UserWarnings as errors, predicts quietly,
    and a user's own setting of the checks is kept."""
    import subprocess
    import sys

    code = ("import warnings, torch\nfrom ntkgp.models import NetworkGP\n"
            "warnings.simplefilter('error', UserWarning)\n"
            "x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(12, 2)\n"
            "model = NetworkGP(x, torch.stack([x.sum(-1), x.prod(-1)], -1)).eval()\n"
            "pred = model.likelihood(model(x[:5] + 0.1)); pred.variance; pred.covariance_matrix\n"
            "assert not torch.sparse.check_sparse_tensor_invariants.is_enabled()\n"
            "torch.sparse.check_sparse_tensor_invariants.enable()\n"
            "model(x[:3] - 0.1).variance\n"
            "assert torch.sparse.check_sparse_tensor_invariants.is_enabled()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


class _ScaledGP(NetworkGP):
    """A subclass that wraps the network kernel in a ScaleKernel (a learnable output scale)."""

    def __init__(self, x, y, net, **kwargs):
        super().__init__(x, y, net, **kwargs)
        self.covar_module = gpytorch.kernels.ScaleKernel(self.covar_module).to(x)


def test_a_scaled_network_kernel_keeps_the_model_s_network_and_its_data_checks():
    """With covar_module = ScaleKernel(NTKKernel(net)), model.net and set_train_data failed with "object has no
    attribute 'net'" (read from covar_module itself). The network is the wrapped kernel's, new data are checked
    against its first layer as the plain model's are, and the posterior on them is the plain model's with the
    noise divided by the scale: s K* (s K + σ²I)⁻¹ y = K* (K + σ²/s I)⁻¹ y."""
    x, y = (v.double() for v in _data(20))
    net = ntkgp.mlp(1, "erf", 2.0, 0.1, ard_num_dims=2)
    model = _ScaledGP(x[:10], y[:10], net, kernel="ntk").eval()
    model.covar_module.outputscale, model.likelihood.noise = 4.0, 4e-2
    assert model.net is net
    model.set_train_data(x, y, strict=False)
    plain = NetworkGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1, ard_num_dims=2), kernel="ntk").eval()
    plain.likelihood.noise = 1e-2
    with torch.no_grad():
        torch.testing.assert_close(model(x[:5] + 0.1).mean, plain(x[:5] + 0.1).mean, rtol=1e-10, atol=1e-12)
        # the scaled kernel's prior variance is 4 times the plain one's: the Gaussian's scale
        assert model.gaussian(x[:5]).scale == pytest.approx(4 * plain.gaussian(x[:5]).scale, rel=1e-12)
    with pytest.raises(ValueError, match=r"^inputs with 3 feature\(s\) cannot enter the network: Dense\(ard_num_dims"):
        model.set_train_data(torch.randn(20, 3, dtype=torch.float64), y, strict=False)


def test_a_model_with_several_network_kernels_names_them_for_its_net():
    """model.net of a covar_module holding two network kernels has no one answer: it says so (torch's
    "object has no attribute 'net'" said nothing), and the model still takes new data. It is an AttributeError,
    as for any attribute a model lacks: as a ValueError it broke hasattr(model, "net"),
    getattr(model, "net", None) and inspect.getmembers(model) (which raised it)."""
    import inspect

    x, y = (v.double() for v in _data(8))
    model = NetworkGP(x, y, ntkgp.mlp(1, "relu"))
    model.covar_module = model.covar_module + ntkgp.NTKKernel(ntkgp.mlp(2, "erf")).double()
    with pytest.raises(AttributeError, match=r"covar_module \(AdditiveKernel\) holds 2 network kernels of different "
                                             r"networks: read the network from the kernel meant"):
        _ = model.net
    assert not hasattr(model, "net") and getattr(model, "net", None) is None
    model.set_train_data(x[:4], y[:4], strict=False)
    with torch.no_grad():
        assert model.eval()(x[:2]).mean.shape == (2,)
    # two kernels of one network (its NNGP plus its NTK) have one answer
    shared = NetworkGP(x, y, ntkgp.mlp(1, "relu"))
    shared.covar_module = shared.covar_module + ntkgp.NTKKernel(shared.net)
    assert shared.net is shared.covar_module.kernels[0].net
    shared.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    with pytest.raises(AttributeError, match=r"^model.net is the network of covar_module's network kernel, but "
                                             r"covar_module \(ScaleKernel\) holds no network kernel\.$"):
        _ = shared.net
    assert "net" not in dict(inspect.getmembers(shared)) and "covar_module" in dict(inspect.getmembers(shared))
    with pytest.raises(AttributeError, match=r"^'NetworkGP' object has no attribute 'nett'$"):
        _ = shared.nett   # other names as torch says them


class _FeatureGP(NetworkGP):
    """Deep kernel learning: a feature map (here a fixed linear one, 2 features to 3) before the network kernel."""

    def __init__(self, x, y, net, **kwargs):
        super().__init__(x, y, net, **kwargs)
        self.features = torch.nn.Linear(2, 3).to(x)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.25, 0.25]]))
            self.features.bias.fill_(0.1)

    def forward(self, x):
        return super().forward(self.features(x))


def test_a_deep_kernel_subclass_gives_its_first_layer_the_features():
    """A subclass whose forward maps the inputs to features was refused when built (and by set_train_data): the
    raw inputs' 2 features were checked against a first layer made for the 3 features ("train_x with 2
    feature(s) cannot enter the network: Dense(ard_num_dims=3) got inputs with 2 features"), and gaussian
    evaluated covar_module at the raw inputs. Its predictions are those of the plain model on the features,
    Gaussian and scale included; a first layer made for another number of features is refused by the kernel
    where it first sees them."""
    x, y = (v.double() for v in _data(20))
    model = _FeatureGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1, ard_num_dims=3), kernel="ntk").eval()
    with torch.no_grad():
        features = model.features(x)
        plain = NetworkGP(features, y, ntkgp.mlp(1, "erf", 2.0, 0.1, ard_num_dims=3), kernel="ntk").eval()
        got, expected = model.gaussian(x[:5] + 0.1), plain.gaussian(model.features(x[:5] + 0.1))
        torch.testing.assert_close(got.mean, expected.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.covariance, expected.covariance, rtol=1e-10, atol=1e-12)
        assert got.scale == pytest.approx(expected.scale, rel=1e-12)
        model.set_train_data(x[:10], y[:10], strict=False)
        assert model(x[:2]).mean.shape == (2,)
    wrong = _FeatureGP(x, y, ntkgp.mlp(1, "erf", 2.0, 0.1, ard_num_dims=2)).eval()
    with pytest.raises(ValueError, match=r"Dense\(ard_num_dims=2\) got inputs with 3 features"):
        wrong(x[:2])


@pytest.mark.parametrize("targets", [None, 2])
def test_gaussian_reads_the_prior_variances_alone_where_kernels_are_evaluated_eagerly(targets):
    """gaussian's scale is the largest prior variance at the test points, read from the prior forward: under
    gpytorch.settings.lazily_evaluate_kernels(False) that forward formed the (M, M) prior kernel beside GPyTorch's
    joint (N + M) one, for its diagonal. The kernels are GPyTorch's and the M variances, the Gaussian the lazy one's."""
    x, y = (v.double() for v in _data(20, k=targets))
    x_test = torch.linspace(-1, 1, 14, dtype=torch.float64).reshape(7, 2)
    model = NetworkGP(x, y, ntkgp.mlp(2, "relu"), kernel="ntk").eval()
    net, calls = model.net, []
    kernel = net.kernel

    def count(*args, **kwargs):
        calls.append((args[0].shape[-2], kwargs.get("diag", False)))
        return kernel(*args, **kwargs)

    with torch.no_grad():
        expected = model.gaussian(x_test)
        net.kernel = count
        with gpytorch.settings.lazily_evaluate_kernels(False):
            model(x_test)   # GPyTorch's own kernels for a prediction in this mode
            own = len(calls)
            got = model.gaussian(x_test)
    assert calls[own:] == [*calls[:own], (7, True)] and (27, False) in calls[:own]
    assert got.scale == expected.scale
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.covariance, expected.covariance, rtol=1e-10, atol=1e-12)
