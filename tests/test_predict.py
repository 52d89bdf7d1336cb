"""Gradient-flow predictions and exact posteriors (ntkgp.predict)."""

from __future__ import annotations

import math
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.integrate
import torch

import ntkgp
from ntkgp import predict
from ntkgp.layers.base import NonFiniteKernelError

from nt_specs import FIXTURES, build

pytestmark = pytest.mark.usefixtures("float64_default")

DATA = np.load(FIXTURES / "nt_predict.npz")
NET = build(eval(str(DATA["spec"])))
X_TRAIN, X_TEST = torch.tensor(DATA["x_train"]), torch.tensor(DATA["x_test"])
Y_TRAIN = torch.tensor(DATA["y_train"])
LR, TIMES = float(DATA["learning_rate"]), torch.tensor(DATA["times"])


class FixedKernels:
    """Serves neural-tangents' own kernel matrices, to compare the prediction formulas alone."""

    def kernel(self, x1, x2=None, diag=False, ntk=True):
        name = ("dd" if torch.equal(x1, X_TRAIN) else "tt") if x2 is None else "td"
        return SimpleNamespace(nngp=torch.tensor(DATA[f"nngp_{name}"]), ntk=torch.tensor(DATA[f"ntk_{name}"]))


def _rel(a: torch.Tensor, b) -> float:
    b = np.asarray(b)
    return float(np.linalg.norm(a.numpy() - b) / max(np.linalg.norm(b), 1e-300))


ENSEMBLE_CASES = [(g, where, tname, reg) for g in ("nngp", "ntk") for where in ("test", "train")
                  for tname in ("times", "scalar", "inf", "none") for reg in (0.0, 0.01)
                  if not (where == "train" and tname == "none")]
T_VALUES = {"times": TIMES, "scalar": 3.3, "inf": math.inf, "none": None}


@pytest.mark.parametrize("case", ENSEMBLE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradient_flow_matches_neural_tangents(case):
    get, where, tname, reg = case
    flow = predict.GradientFlow(FixedKernels(), X_TRAIN, Y_TRAIN, kernel=get, learning_rate=LR, diag_reg=reg)
    out = flow.predict(X_TEST if where == "test" else None, t=T_VALUES[tname])
    key = f"ensemble/{get}/{where}/{tname}/reg{reg}"
    assert out.mean.shape == DATA[key + "/mean"].shape and out.covariance.shape == DATA[key + "/cov"].shape
    assert _rel(out.mean, DATA[key + "/mean"]) <= 1e-10
    assert _rel(out.covariance, DATA[key + "/cov"]) <= 1e-10


def test_gradient_flow_with_own_kernels_matches_neural_tangents_end_to_end():
    """With ntkgp's kernels: NNGP to 1e-13; NTK to 2e-8, because neural-tangents' NTK matrix has
    a diagonal entry off by 6.3e-9 (ntkgp's is exact to 1e-16, see test_numerics) that the solve
    passes on: the mean differs by 8.8e-9 and the covariance by 1.7e-10, fixed numbers of the
    fixture (the tolerance was 1e-7)."""
    for get, tol in (("nngp", 1e-13), ("ntk", 2e-8)):
        out = predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=TIMES, learning_rate=LR, kernel=get)
        key = f"ensemble/{get}/test/times/reg0.0"
        assert _rel(out.mean, DATA[key + "/mean"]) <= tol and _rel(out.covariance, DATA[key + "/cov"]) <= tol


@pytest.mark.parametrize("get", ["nngp", "ntk", "ntkgp"])
@pytest.mark.parametrize("scale", ["rel", "abs"])
def test_gp_posterior_matches_neural_tangents_gp_inference(get, scale):
    key = f"gp/{get}/{scale}"
    reg = float(DATA[key + "/diag_reg"])
    prior = DATA["nngp_dd" if get == "nngp" else "ntk_dd"]
    noise = reg if scale == "abs" else reg * np.trace(prior) / prior.shape[0]
    out = predict.GPPosterior(FixedKernels(), X_TRAIN, Y_TRAIN, kernel=get, noise=noise).predict(X_TEST)
    assert _rel(out.mean, DATA[key + "/mean"]) <= 1e-10
    assert _rel(out.covariance, DATA[key + "/cov"]) <= 1e-10


def test_single_network_matches_neural_tangents():
    f0, ft0 = torch.tensor(DATA["fx_train_0"]), torch.tensor(DATA["fx_test_0"])
    ntk_dd, ntk_td = torch.tensor(DATA["ntk_dd"]), torch.tensor(DATA["ntk_td"])
    for tname, t in (("times", TIMES), ("none", None)):
        train, test = predict.gradient_descent_mse(ntk_dd, Y_TRAIN, fx_train_0=f0, ntk_test_train=ntk_td,
                                                   fx_test_0=ft0, t=t, learning_rate=LR)
        assert _rel(train, DATA[f"single/{tname}/train"]) <= 1e-12
        assert _rel(test, DATA[f"single/{tname}/test"]) <= 1e-12
    assert abs(predict.max_learning_rate(ntk_dd, Y_TRAIN.numel()) / float(DATA["max_learning_rate"]) - 1) < 1e-12



def test_single_network_with_full_output_kernels():
    """A full (N, N, k, k) kernel (empirical_ntk(..., vector_output=True), neural-tangents'
    trace_axes=()) trains the N·k outputs jointly: equal to iterating the linear model step by
    step (rounding level), and to the per-output kernel when the full one is K ⊗ I_k. (Against
    neural-tangents 0.6.5's gradient_descent_mse(trace_axes=()) on this kernel, with relative
    diag_reg 0 and 0.05 and t = 0.5, 4, None: 2.9e-15, measured once.)"""
    g = torch.Generator().manual_seed(0)
    n, m, k = 6, 4, 3
    features = torch.randn(n + m, 20, k, generator=g, dtype=torch.float64)
    full = torch.einsum("api,bpj->abij", features, features) / 20   # outputs coupled: not K ⊗ I
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    f0 = 0.1 * torch.randn(n + m, k, generator=g, dtype=torch.float64)
    lr, steps = 0.3, 37
    train, test = predict.gradient_descent_mse(full[:n, :n], y, fx_train_0=f0[:n], ntk_test_train=full[n:, :n],
                                               fx_test_0=f0[n:],
                                               steps=torch.tensor(steps), learning_rate=lr)
    flat = full.permute(0, 2, 1, 3).reshape((n + m) * k, (n + m) * k)
    f = f0.reshape(-1).clone()
    for _ in range(steps):
        f = f - lr / y.numel() * flat[:, : n * k] @ (f[: n * k] - y.reshape(-1))
    torch.testing.assert_close(train, f[: n * k].reshape(n, k), rtol=0, atol=1e-13)
    torch.testing.assert_close(test, f[n * k:].reshape(m, k), rtol=0, atol=1e-13)
    gram = features[..., 0] @ features[..., 0].T / 20
    separable = torch.einsum("ab,ij->abij", gram, torch.eye(k, dtype=torch.float64))
    for t in (0.7, None):
        a = predict.gradient_descent_mse(separable[:n, :n], y, fx_train_0=f0[:n], ntk_test_train=separable[n:, :n],
                                         fx_test_0=f0[n:], t=t,
                                         learning_rate=lr, diag_reg=1e-2)
        b = predict.gradient_descent_mse(gram[:n, :n], y, fx_train_0=f0[:n], ntk_test_train=gram[n:, :n],
                                         fx_test_0=f0[n:], t=t, learning_rate=lr,
                                         diag_reg=1e-2)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert predict.gradient_descent_mse(full[:n, :n], y, fx_train_0=0.0, t=torch.tensor([1.0, 2.0])).shape == (2, n, k)
    with pytest.raises(ValueError, match=r"must be \(N, k\)"):
        predict.gradient_descent_mse(full[:n, :n], y[:, 0])
    with pytest.raises(ValueError, match="ntk_test_train must be"):
        predict.gradient_descent_mse(full[:n, :n], y, fx_train_0=0.0, ntk_test_train=full[n:, :n, 0, 0],
                                     fx_test_0=f0[n:])

def test_gp_posterior_is_the_infinite_time_limit_of_gradient_flow():
    for kernel in ("nngp", "ntk"):
        limit = predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=math.inf, kernel=kernel)
        post = predict.gp_posterior(NET, X_TRAIN, Y_TRAIN, X_TEST, kernel=kernel)
        torch.testing.assert_close(post.mean, limit.mean, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(post.covariance, limit.covariance, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_closed_form_matches_integrating_the_ode(kernel):
    """dF/dt = −(η/m) G (F_d − Y) for [train; test] outputs; dC/dt = A C + C Aᵀ for their covariance."""
    with torch.no_grad():
        k_all = NET.kernel(torch.cat([X_TRAIN, X_TEST]))
    n = X_TRAIN.shape[0]
    g = (k_all.ntk if kernel == "ntk" else k_all.nngp)[:, :n].numpy()      # (N+M, N)
    c0 = k_all.nngp.numpy()
    y = Y_TRAIN.numpy()
    rate = LR / Y_TRAIN.numel()
    a = np.zeros((len(c0), len(c0)))
    a[:, :n] = -rate * g

    def rhs(_, z):
        f = z[: len(c0) * 2].reshape(len(c0), 2)
        c = z[len(c0) * 2:].reshape(c0.shape)
        df = -rate * g @ (f[:n] - y)
        return np.concatenate([df.ravel(), (a @ c + c @ a.T).ravel()])

    t_end = 7.0
    z0 = np.concatenate([np.zeros(len(c0) * 2), c0.ravel()])
    sol = scipy.integrate.solve_ivp(rhs, (0, t_end), z0, method="DOP853", rtol=1e-12, atol=1e-12)
    f_t = sol.y[: len(c0) * 2, -1].reshape(len(c0), 2)
    c_t = sol.y[len(c0) * 2:, -1].reshape(c0.shape)
    flow = predict.GradientFlow(NET, X_TRAIN, Y_TRAIN, kernel=kernel, learning_rate=LR)
    test, train = flow.predict(X_TEST, t=t_end), flow.predict(None, t=t_end)
    assert np.abs(test.mean.numpy() - f_t[n:]).max() < 1e-6
    assert np.abs(train.mean.numpy() - f_t[:n]).max() < 1e-6
    assert np.abs(test.covariance.numpy() - c_t[n:, n:]).max() < 1e-6
    assert np.abs(train.covariance.numpy() - c_t[:n, :n]).max() < 1e-6


def test_linearized_network_trained_by_gradient_descent_matches_exactly():
    """A first-order Taylor expansion of a finite network around its initialization, trained by
    full-batch GD: its outputs equal the discrete-time single-network formula with its empirical NTK."""
    torch.manual_seed(0)
    net = ntkgp.mlp(2, "erf", 1.6, 0.1, width=64)
    model = net.build(in_features=3, seed=1)
    params0 = {k: v.detach() for k, v in model.named_parameters()}
    x, xt, y = X_TRAIN, X_TEST, Y_TRAIN[:, :1]

    def f(params, inputs):
        return torch.func.functional_call(model, params, (inputs,))

    def f_lin(params, inputs):
        delta = {k: params[k] - params0[k] for k in params}
        out, tangent = torch.func.jvp(lambda p: f(p, inputs), (params0,), (delta,))
        return out + tangent

    lr, steps = 0.5, 300
    params = {k: v.clone() for k, v in params0.items()}
    for _ in range(steps):
        loss = lambda p: 0.5 * ((f_lin(p, x) - y) ** 2).sum() / y.numel()  # noqa: E731
        grads = torch.func.grad(loss)(params)
        params = {k: params[k] - lr * grads[k] for k in params}
    theta_dd = ntkgp.finite.empirical_ntk(model, x)
    theta_td = ntkgp.finite.empirical_ntk(model, xt, x)
    with torch.no_grad():
        f0, ft0 = f(params0, x), f(params0, xt)
    train, test = predict.gradient_descent_mse(theta_dd, y, fx_train_0=f0, ntk_test_train=theta_td, fx_test_0=ft0,
                                               steps=steps, learning_rate=lr)
    torch.testing.assert_close(f_lin(params, x).detach(), train, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_lin(params, xt).detach(), test, rtol=0, atol=1e-10)


def test_wide_network_trained_by_gradient_descent_follows_its_linearization():
    """Width 1024, a few hundred small steps: the real network is within 1% of the prediction (measured
    0.29 % on the training and 0.81 % on the test points; width 2048, ten times slower as its float64
    weights leave the cache, 0.05 % and 0.93 %; half the learning rate or steps predicted: 7.7 % and 10 %)."""
    net = ntkgp.mlp(2, "erf", 1.6, 0.1, width=1024)
    model = net.build(in_features=3, seed=2)
    x, xt, y = X_TRAIN, X_TEST, Y_TRAIN[:, :1]
    theta_dd = ntkgp.finite.empirical_ntk(model, x)
    theta_td = ntkgp.finite.empirical_ntk(model, xt, x)
    with torch.no_grad():
        f0, ft0 = model(x), model(xt)
    lr, steps = 0.5, 300
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum() / y.numel()).backward()
        opt.step()
    train, test = predict.gradient_descent_mse(theta_dd, y, fx_train_0=f0, ntk_test_train=theta_td, fx_test_0=ft0,
                                               steps=steps, learning_rate=lr)
    with torch.no_grad():
        assert float((model(x) - train).norm() / train.norm()) < 0.01
        assert float((model(xt) - test).norm() / test.norm()) < 0.01


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_covariances_are_symmetric_psd_at_all_times(kernel):
    flow = predict.GradientFlow(NET, X_TRAIN, Y_TRAIN, kernel=kernel, learning_rate=LR)
    times = torch.logspace(-3, 3, 25)
    for x in (X_TEST, None):
        cov = flow.predict(x, t=times).covariance
        assert torch.equal(cov, cov.mT)
        eig = torch.linalg.eigvalsh(cov)
        assert bool((eig.min(-1).values >= -1e-8 * eig.max(-1).values).all())


def test_functional_gradient_descent_exercise():
    """Θ = I: f(x_a, t) = y_a + e^{−ηt/m} (f(x_a, 0) − y_a)."""
    n, lr, t = 6, 0.7, torch.tensor([0.0, 1.0, 5.0, 30.0])
    y, f0 = torch.randn(n), torch.randn(n)
    out = predict.gradient_descent_mse(torch.eye(n), y, fx_train_0=f0, t=t, learning_rate=lr)
    expected = y + torch.exp(-lr * t / n)[:, None] * (f0 - y)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_loss_decreases_as_gradient_times_kernel_times_gradient():
    """dL/dt = −∇L · Θ ∇L along the flow (with ∇L = (f − Y)/m and t in units of η)."""
    with torch.no_grad():
        theta = NET.kernel(X_TRAIN).ntk
    y, f0 = Y_TRAIN, torch.zeros_like(Y_TRAIN)
    m = y.numel()
    t, h = 2.0, 1e-5
    f = lambda s: predict.gradient_descent_mse(theta, y, fx_train_0=f0, t=s)  # noqa: E731
    loss = lambda s: 0.5 * ((f(s) - y) ** 2).sum() / m  # noqa: E731
    numeric = (loss(t + h) - loss(t - h)) / (2 * h)
    grad = (f(t) - y) / m
    assert abs(float(numeric + (grad * (theta @ grad)).sum())) < 1e-9


def test_singular_kernels_never_give_nan():
    x = torch.cat([X_TRAIN, X_TRAIN[:3]])        # duplicated points: a singular kernel
    y = torch.cat([Y_TRAIN, Y_TRAIN[:3]])
    flow = predict.GradientFlow(NET, x, y, learning_rate=LR)
    for t in (0.5, 100.0, math.inf, torch.logspace(-2, 4, 7)):
        out = flow.predict(X_TEST, t=t)
        assert torch.isfinite(out.mean).all() and torch.isfinite(out.covariance).all()
    assert torch.isfinite(flow.predict(None, t=1e3).mean).all()
    with pytest.raises(ValueError, match="diag_reg"):
        flow.predict(X_TEST, t=None)
    # also on the training points: a singular kernel cannot be said to fit Y exactly (with equal
    # inputs and different targets it cannot); t=inf gives the pseudo-inverse answer there
    with pytest.raises(ValueError, match="diag_reg"):
        flow.predict(None, t=None)
    with pytest.raises(ValueError, match="singular"):
        predict.gradient_descent_mse(NET.kernel(x).ntk.detach(), y)
    with pytest.raises(ValueError, match="noise"):
        predict.gp_posterior(NET, x, y, X_TEST)
    reg = predict.gradient_flow(NET, x, y, X_TEST, t=None, diag_reg=1e-6, learning_rate=LR)
    assert torch.isfinite(reg.mean).all()


def test_zero_eigenvalues_give_exact_finite_values():
    """An exactly singular kernel (eigenvalues 0 and 2) gives finite values without 0/0: the null
    direction never moves, and a valid (positive semi-definite) joint kernel has no test
    component along it; the rest follows (1 − e^{−λτ})/λ."""
    theta = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    y, t = torch.tensor([2.0, 0.0], dtype=torch.float64), 3.0          # [1, 1] + [1, −1] (null)
    cross = torch.tensor([[0.5, 0.5]], dtype=torch.float64)            # in the range of Θ
    train, test = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross,
                                               fx_test_0=torch.zeros(1, dtype=torch.float64), t=t)
    growth = -math.expm1(-2 * t / 2)                                   # λ = 2, τ = η t/m = 1.5
    torch.testing.assert_close(train, growth * torch.ones(2, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(test, growth / 2 * torch.ones(1, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_huge_times_converge_to_the_infinite_time_answer_with_duplicates():
    """A repeated measurement (equal inputs, different targets) makes the kernel singular. Finite
    times must approach t = ∞ (the pseudo-inverse answer, the mean of the two targets); before,
    eigh's rounding-level components along the null direction were multiplied by flow ≈ τ, and
    t = 1e16 (or 1e16 steps) drifted from it by 7 % of max|y|, t = 1e20 by 140 %."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    x[7], y[7] = x[6], y[6] + 0.5
    x_test = torch.cat([torch.randn(4, 3, generator=g, dtype=torch.float64), x[6:7]])
    net = ntkgp.serial(ntkgp.Dense(64, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(64, 2.0, 0.1), ntkgp.Erf(),
                       ntkgp.Dense(1, 1.0, 0.1))
    for kind in ("ntk", "nngp"):
        flow = predict.GradientFlow(net, x, y, kernel=kind)
        limit = flow.predict(x_test, t=math.inf, compute_cov=False).mean
        assert abs(float(limit[-1]) - float(y[6] + 0.25)) < 1e-9          # the mean of the two targets
        for out in (flow.predict(x_test, t=torch.tensor([1e8, 1e12, 1e16, 1e20]), compute_cov=False),
                    flow.predict(x_test, steps=torch.tensor([10**8, 10**12, 10**16]), compute_cov=False)):
            assert float((out.mean - limit).abs().max()) < 1e-9, kind


def test_training_outputs_at_tiny_times_keep_their_relative_accuracy():
    """(I − e^{−Θτ}) Y at τ ~ 1e-13 is ~1e-13·ΘY: forming 1 − e^{−λτ} instead of −expm1(−λτ)
    lost its leading digits (relative error 9e-5 at t = 1e-12, 4e-3 at 1e-14); now ~1e-15."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    theta = NET.kernel(x).ntk.detach()
    flow = predict.GradientFlow(NET, x, y)
    for t in (1e-14, 1e-12):
        tau = t / 8                                           # continuous: τΘY − τ²Θ²Y/2 + O(τ³)
        second_order = tau * theta @ y - tau**2 / 2 * theta @ (theta @ y)
        one_step = tau * theta @ y                            # one step of rate t: exactly ηΘY/m
        for mean, reference in ((flow.predict(None, t=t, compute_cov=False).mean, second_order),
                                (predict.gradient_descent_mse(theta, y, fx_train_0=0.0, t=t), second_order),
                                (predict.gradient_descent_mse(theta, y, fx_train_0=0.0, steps=1,
                                                              learning_rate=t), one_step)):
            assert float((mean - reference).norm() / reference.norm()) < 1e-13


def test_float32_kernels_are_factored_in_float64():
    """2000 points of a 1-D sine with diag_reg 1e-4 (neural-tangents issues #128, #198)."""
    x = torch.linspace(-math.pi, math.pi, 2000).unsqueeze(-1)
    y = torch.sin(x)
    net = ntkgp.mlp(2, "relu", 2.0, 0.05)
    xt = torch.linspace(-3, 3, 37).unsqueeze(-1)
    out32 = predict.gradient_flow(net, x.float(), y.float(), xt.float(), t=None, diag_reg=1e-4)
    out64 = predict.gradient_flow(net, x, y, xt, t=None, diag_reg=1e-4)
    assert out32.mean.dtype == torch.float32 and torch.isfinite(out32.mean).all()
    assert float((out32.mean.double() - out64.mean).abs().max()) < 1e-3
    assert float((out64.mean - torch.sin(xt)).abs().max()) < 0.02


def test_time_shapes_and_fit_once_predict_many():
    flow = predict.GradientFlow(NET, X_TRAIN, Y_TRAIN, learning_rate=LR)
    t = torch.rand(2, 3) * 10
    out = flow.predict(X_TEST, t=t)
    assert out.mean.shape == (2, 3, 5, 2) and out.covariance.shape == (2, 3, 5, 5)
    eig = flow.eigensystem
    again = flow.predict(X_TEST[:2], t=t[0, 1])
    assert flow.eigensystem is eig                                   # cached, not recomputed
    torch.testing.assert_close(again.mean, out.mean[0, 1, :2], rtol=1e-12, atol=1e-13)
    one_d = predict.gradient_flow(NET, X_TRAIN, Y_TRAIN[:, 0], X_TEST, t=2.0, compute_cov=False)
    assert one_d.mean.shape == (5,) and one_d.covariance is None


def test_discrete_steps_match_continuous_time_for_small_steps():
    flow = predict.GradientFlow(NET, X_TRAIN, Y_TRAIN, learning_rate=1e-3)
    steps = torch.tensor([0, 1000, 20000])
    discrete = flow.predict(X_TEST, steps=steps)
    continuous = flow.predict(X_TEST, t=steps.double())
    torch.testing.assert_close(discrete.mean, continuous.mean, rtol=1e-3, atol=1e-4)
    # half the stability limit: a few large steps converge to the infinite-time answer
    big = predict.GradientFlow(NET, X_TRAIN, Y_TRAIN, learning_rate=0.5 * flow.max_learning_rate)
    late = big.predict(X_TEST, steps=2000, compute_cov=False).mean
    torch.testing.assert_close(late, big.predict(X_TEST, t=math.inf, compute_cov=False).mean, rtol=1e-6, atol=1e-8)
    with pytest.warns(RuntimeWarning, match="stability limit"):
        predict.GradientFlow(NET, X_TRAIN, Y_TRAIN, learning_rate=3 * flow.max_learning_rate).predict(
            X_TEST, steps=10)


@pytest.mark.parametrize("call,message", [
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN[:5], X_TEST, t=1.0), "rows"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN[None], X_TEST, t=1.0), "shape"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=-1.0), "non-negative"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=float("nan")), "NaN"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=1.0, diag_reg=-1e-3), "diag_reg"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=1.0, learning_rate=0.0), "learning_rate"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=1.0, kernel="gp"), "kernel"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, t=1.0, steps=3), "not both"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST, steps=2.5), "integers"),
    (lambda: predict.gradient_flow(NET, X_TRAIN, Y_TRAIN, X_TEST[:, :2], t=1.0), "x_test"),
    (lambda: predict.gp_posterior(NET, X_TRAIN, Y_TRAIN, X_TEST, noise=-1.0), "noise"),
])
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call", [
    lambda net, x, y, xt: predict.GradientFlow(net, x, y),
    lambda net, x, y, xt: predict.gradient_flow(net, x, y, xt, t=1.0),
    lambda net, x, y, xt: predict.GPPosterior(net, x, y, noise=1e-3),
    lambda net, x, y, xt: predict.GPPosterior(net, x, y, kernel="ntk"),
    lambda net, x, y, xt: predict.gp_posterior(net, x, y, xt, kernel="ntkgp", noise=1e-3),
])
def test_predictors_refuse_a_batch_of_hyperparameters(call, monkeypatch):
    """A spec with a GPyTorch batch_shape is a batch of models: the predictors factor one kernel
    and return numbers, and took it half-way (batched means, but a marginal likelihood of inf from
    the batched factor's diagonal, one leave-one-out density for both models, and a crash inside
    the matrix functions at a finite t). Refused before any kernel is computed."""
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.5, 0.1))
    net.expand_batch(torch.Size([2]))
    monkeypatch.setattr(type(net), "kernel", lambda *a, **k: pytest.fail("computed a kernel"))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"batch shape \(2,\): the predictors take one network"):
        call(net, x, y, torch.randn(4, 3))


def test_a_diag_reg_that_requires_grad_gets_its_gradient_without_a_warning():
    """The documented use: torch warned 'Converting a tensor with requires_grad=True to a scalar'
    from the validation's float()."""
    reg = torch.tensor(1e-2, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict.gradient_descent_mse(_kernels()[0], torch.randn(4), fx_train_0=0.0, t=1.0,
                                     diag_reg=reg).sum().backward()
    assert reg.grad is not None and torch.isfinite(reg.grad)


def _kernels(n=4, m=3, seed=0):
    a = torch.randn(n + m, 10, generator=torch.Generator().manual_seed(seed))
    theta = a @ a.T / 10
    # exactly symmetric, as a kernel is: a float32 a @ a.T is not on every BLAS (2.4e-7 apart on an AMD EPYC's,
    # which the float64 symmetry check of the tests that cast it refused)
    theta = (theta + theta.T) / 2
    return theta[:n, :n], theta[n:, :n]


_DD, _TD = _kernels()
_Y2 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("call,message", [
    (lambda: predict.gradient_descent_mse(_DD, torch.tensor([1, 0, 2, 1]), t=1.0), "floating-point"),
    (lambda: predict.gradient_descent_mse(_DD, torch.tensor([1.0, math.nan, 0.0, 0.0]), t=1.0), "NaN"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2[:, 0], fx_train_0=torch.tensor([0.0, math.inf, 0, 0]),
                                          t=1.0), "fx_train_0"),
    (lambda: predict.gradient_descent_mse(_DD * math.nan, _Y2, t=1.0), "ntk_train_train contains NaN"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2[:3], t=1.0), "rows"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=torch.zeros(4), t=1.0), "fx_train_0"),
    # the imaginary part was dropped with only torch's warning, while complex targets are refused
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=torch.zeros(4, 2, dtype=torch.complex128), t=1.0),
     "fx_train_0 must hold real numbers"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=0.0, ntk_test_train=_TD, fx_test_0=torch.zeros(3, 2,
                                          dtype=torch.complex64), t=1.0),
     "fx_test_0 must hold real numbers"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=0.0, ntk_test_train=_TD, fx_test_0=torch.zeros(3),
                                          t=1.0), "fx_test_0"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0="0",
                                          t=1.0), "fx_train_0 must be a number"),   # torch's TypeError
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=None, t=1.0), "fx_train_0 must be a number"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=True, t=1.0), "fx_train_0 must hold real numbers"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2[:2, :2].repeat(2, 1), fx_train_0=0.0, ntk_test_train=_TD[:2],
                                          fx_test_0=torch.zeros(2), t=1.0),
     "fx_test_0"),                                      # (M,) against (M, k) with M == k is refused too
    (lambda: predict.gradient_descent_mse(_DD, _Y2, fx_train_0=0.0, ntk_test_train=_TD, fx_test_0=torch.zeros(2, 3),
                                          t=None), "fx_test_0"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, t=torch.tensor([])), "empty"),
    (lambda: predict.gradient_descent_mse(_DD, _Y2, t=1.0, learning_rate=True), "learning_rate"),
    (lambda: predict.max_learning_rate(torch.ones(3)), "square"),
])
def test_gradient_descent_mse_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gradient_descent_mse_accepts_what_neural_tangents_accepts():
    """Numbers for initial outputs, numpy/tensor learning rates, size-1 broadcasting."""
    ref_train, ref_test = predict.gradient_descent_mse(_DD, _Y2, fx_train_0=torch.zeros(4, 2), ntk_test_train=_TD,
                                                       fx_test_0=torch.zeros(3, 2), t=2.0,
                                                       learning_rate=0.5)
    for lr in (np.float32(0.5), torch.tensor(0.5), 0.5):
        train, test = predict.gradient_descent_mse(_DD, _Y2, fx_train_0=0.0, ntk_test_train=_TD, fx_test_0=0.0, t=2.0,
                                                   learning_rate=lr)
        torch.testing.assert_close(train, ref_train, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(test, ref_test, rtol=1e-7, atol=1e-9)
    _, test = predict.gradient_descent_mse(_DD, _Y2, fx_train_0=torch.zeros(1, 2), ntk_test_train=_TD,
                                           fx_test_0=torch.zeros(3, 1), t=2.0,
                                           learning_rate=0.5)
    assert test.shape == (3, 2)
    torch.testing.assert_close(test, ref_test)


def test_zero_kernel_is_stable_at_every_learning_rate():
    """A zero training kernel (zero inputs, no bias) never moves the outputs: no division by λ_max = 0."""
    assert predict.max_learning_rate(torch.zeros(3, 3)) == math.inf
    y, f0 = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.2, 0.1, -0.3])
    train, test = predict.gradient_descent_mse(torch.zeros(3, 3), y, fx_train_0=f0, ntk_test_train=torch.zeros(2, 3),
                                               fx_test_0=torch.ones(2), steps=5)
    assert torch.equal(train, f0) and torch.equal(test, torch.ones(2))
    net = ntkgp.serial(ntkgp.Dense(8, 1.0, None), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, None))
    flow = predict.GradientFlow(net, torch.zeros(3, 2), y)
    assert flow.max_learning_rate == math.inf
    out = flow.predict(torch.zeros(2, 2), steps=5)
    assert torch.equal(out.mean, torch.zeros(2)) and bool(torch.isfinite(out.covariance).all())


def test_warns_at_the_stability_limit_where_the_top_mode_oscillates_forever():
    # the limit up to rounding: max_learning_rate's eigenvalues and the predictor's need not agree in the last ulp
    # (with float32 kernels, one platform's rounding put the limit just above the predictor's and it did not warn)
    theta = _DD.double()
    limit = predict.max_learning_rate(theta, 4) * (1 + 1e-12)
    with pytest.warns(RuntimeWarning, match="stability limit"):
        train = predict.gradient_descent_mse(theta, _Y2[:, 0].double(), steps=torch.tensor([1000, 1001]),
                                             learning_rate=limit)
    assert float((train[0] - train[1]).abs().max()) > 1e-3      # it has not converged


@pytest.mark.parametrize("kernel, noise, outputs", [("nngp", 0.05, 1), ("ntkgp", 0.01, 3), ("nngp", 0.0, 2)])
def test_leave_one_out_equals_refitting_without_each_point(kernel, noise, outputs):
    """Rasmussen & Williams eq. 5.12 from one factorization, against N posteriors refitted on the
    other N − 1 points (their predictive at the left-out input, plus the noise)."""
    import scipy.stats

    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 3, generator=g)
    y = torch.randn(12, outputs, generator=g) if outputs > 1 else torch.randn(12, generator=g)
    net = ntkgp.mlp(2, "erf", 2.0, 0.1)
    post = predict.GPPosterior(net, x, y, kernel=kernel, noise=noise)
    mean, var = post.leave_one_out()
    assert mean.shape == y.shape and var.shape == (12,)
    density = 0.0
    for i in range(12):
        keep = torch.arange(12) != i
        refit = predict.gp_posterior(net, x[keep], y[keep], x[i:i + 1], kernel=kernel, noise=noise)
        torch.testing.assert_close(mean[i], refit.mean[0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(var[i], refit.covariance[0, 0] + noise, rtol=1e-9, atol=1e-12)
        density += scipy.stats.norm(refit.mean[0].numpy(), math.sqrt(var[i])).logpdf(y[i].numpy()).sum()
    assert post.leave_one_out_log_density() == pytest.approx(density, rel=1e-10)
    with pytest.raises(ValueError, match="not a GP posterior"):
        predict.GPPosterior(net, x, y, kernel="ntk", noise=noise).leave_one_out()


def test_interval_is_shaped_like_the_mean_for_vector_targets():
    """variance is one per test point, (M,), also for (N, 1) targets whose mean is (M, 1): a
    review's mean ± 2·variance.sqrt() broadcast to (M, M) and read a coverage of 1.0."""
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    x = torch.linspace(-2, 2, 8, dtype=torch.float64)[:, None]
    xt = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]
    for y in (torch.sin(x), torch.sin(x)[:, 0], torch.cat([torch.sin(x), torch.cos(x)], -1)):
        post = predict.gp_posterior(net, x, y, xt, kernel="nngp", noise=1e-2)
        lower, upper = post.interval(1.5)
        assert lower.shape == upper.shape == post.mean.shape
        sd = post.covariance.diagonal().sqrt()
        torch.testing.assert_close(upper - post.mean, (1.5 * sd).reshape(-1, *[1] * (y.dim() - 1)).expand_as(upper),
                                   rtol=1e-15, atol=4e-16)   # (mean + w σ) − mean rounds at the mean's scale
    lower, upper = post.interval(0.0)   # width 0 is allowed (">= 0"): the band collapses onto the mean
    assert torch.equal(lower, post.mean) and torch.equal(upper, post.mean)
    with pytest.raises(ValueError, match="width must be a finite number >= 0"):
        post.interval(-1.0)
    with pytest.raises(ValueError, match="no variances"):
        predict.gp_posterior(net, x, y, xt, kernel="nngp", noise=1e-2, compute_cov=False).interval()


def test_interval_takes_a_coverage_level_by_name_and_width_stays_in_standard_deviations():
    """interval(width) is a half-width in standard deviations, which scipy's norm.interval(0.95) reader took
    for a probability: interval(0.95) is mean ∓ 0.95 σ, a 65.8 % band, with nothing to say so. level= gives
    the band of a probability (scipy's), and passing both is refused; width keeps its meaning."""
    import scipy.stats

    mean = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    g = predict.Gaussian(mean, torch.tensor([[4.0, 1.0], [1.0, 9.0]], dtype=torch.float64))
    for level in (0.5, 0.9, 0.95, 0.999):
        lower, upper = g.interval(level=level)
        low, high = scipy.stats.norm.interval(level, mean.numpy(), np.array([[2.0], [3.0]]))
        np.testing.assert_allclose(lower.numpy(), low, rtol=1e-14, atol=1e-14)   # Φ⁻¹ to float64 rounding
        # scipy's upper end is Φ⁻¹((1 + p)/2), whose rounding of 1 + p is large beside the tail 1 − p: 6e-14 at
        # p = 0.999 (the band is taken from the tail, −Φ⁻¹((1 − p)/2), exact; next test)
        np.testing.assert_allclose(upper.numpy(), high, rtol=0, atol=1e-12)
    lower, upper = g.interval(0.95)   # still standard deviations: 0.95 σ, not the 95 % band
    torch.testing.assert_close(upper - mean, torch.tensor([[1.9], [2.85]], dtype=torch.float64).expand(2, 2),
                               rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(g.interval()[1], mean + torch.tensor([[4.0], [6.0]], dtype=torch.float64))
    for kwargs, message in (({"width": 2.0, "level": 0.95}, "not both"), ({"level": 95}, r"\(0, 1\), got 95"),
                            ({"level": 0.0}, r"\(0, 1\), got 0"), ({"level": 1.0}, r"\(0, 1\), got 1"),
                            ({"level": True}, "a probability in")):
        with pytest.raises(ValueError, match=message):
            g.interval(**kwargs)


def test_interval_level_near_one_is_taken_from_the_tail():
    """width = Φ⁻¹((1 + p)/2) rounded (1 + p)/2 to 1 for p = 1 − 2⁻⁵³, a probability in (0, 1), and raised
    statistics' "p must be in the range 0.0 < p < 1.0" of a p never passed; nearer 1 it lost the tail's digits
    (2e-6 relative at p = 1 − 1e-12). −Φ⁻¹((1 − p)/2) is exact there: 1 − p has no rounding for p >= 1/2.
    Reference half-widths √2 erf⁻¹(p) of the float64 p, by mpmath at 40 digits."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = predict.Gaussian(mean, torch.tensor([[4.0, 1.0], [1.0, 9.0]], dtype=torch.float64))
    sd = torch.tensor([2.0, 3.0], dtype=torch.float64)
    for level, width in ((1 - 2**-53, 8.292361075813595), (1 - 1e-12, 7.130509892879273),
                         (1 - 1e-9, 6.109410209383449), (0.999, 3.2905267314918945)):
        lower, upper = g.interval(level=level)
        # Φ⁻¹ of the tail to a few float64 roundings (NormalDist's rational approximation, 1e-16)
        torch.testing.assert_close(upper, mean + width * sd, rtol=1e-15, atol=0)
        torch.testing.assert_close(lower, mean - width * sd, rtol=1e-15, atol=0)


_DIAG_NET = ntkgp.mlp(2, "erf", 2.25, 0.05, width=16)
_FLOW_MODULE = sys.modules["ntkgp.predict.gradient_flow"]   # ntkgp.predict.gradient_flow is the function
_DIAG_TIMES = (dict(t=None), dict(t=torch.tensor([[0.5, 3.0], [math.inf, 20.0]])),
               dict(steps=torch.tensor([1, 10, 100])))


def _diagonal(g: predict.Gaussian) -> torch.Tensor:
    return torch.diagonal(g.covariance, dim1=-2, dim2=-1)


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_marginal_variances_alone_are_the_diagonal_of_the_covariance(kernel):
    """compute_cov="diag" sums the formulas' diagonals over the training points (O(M N) memory)
    instead of forming (M, M): equal to the covariance's diagonal to rounding of the prior's scale,
    for test and training points, continuous and discrete times, and t = None; float32 inputs too."""
    torch.manual_seed(0)
    x, y, xt = (torch.randn(n, c, dtype=torch.float64) for n, c in ((12, 3), (12, 2), (9, 3)))
    flow = predict.GradientFlow(_DIAG_NET, x, y, kernel=kernel, learning_rate=0.7, diag_reg=1e-3)
    for points in (xt, None):
        for when in _DIAG_TIMES:
            full, diag = flow.predict(points, **when), flow.predict(points, compute_cov="diag", **when)
            assert diag.covariance is None and diag.marginal.shape == full.covariance.shape[:-1]
            assert torch.equal(diag.mean, full.mean) and diag.scale == full.scale
            torch.testing.assert_close(diag.marginal, _diagonal(full), rtol=0, atol=1e-14 * full.scale)
            assert torch.equal(diag.variance, diag.marginal.clamp_min(0))
    low = predict.GradientFlow(_DIAG_NET, x.float(), y.float(), kernel=kernel, learning_rate=0.7, diag_reg=1e-3)
    marginal = low.predict(xt.float(), t=torch.tensor([1.0, math.inf]), compute_cov="diag").marginal
    exact = flow.predict(xt, t=torch.tensor([1.0, math.inf]), compute_cov="diag").marginal
    assert marginal.dtype == torch.float32
    torch.testing.assert_close(marginal.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))


def test_posterior_marginal_variances_alone_are_the_diagonal_of_the_covariance():
    torch.manual_seed(1)
    x, y, xt = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, dtype=torch.float64), torch.randn(9, 3).double()
    for kernel in ("nngp", "ntkgp", "ntk"):
        posterior = predict.GPPosterior(_DIAG_NET, x, y, kernel=kernel, noise=1e-2)
        full, diag = posterior.predict(xt), posterior.predict(xt, compute_cov="diag")
        assert diag.covariance is None and diag.marginal.shape == (9,) and torch.equal(diag.mean, full.mean)
        torch.testing.assert_close(diag.marginal, _diagonal(full), rtol=0, atol=1e-14 * full.scale)
        low, high = diag.interval()
        assert low.shape == (9,)
        torch.testing.assert_close(high - low, 4 * _diagonal(full).sqrt(), rtol=1e-12, atol=0)
        one_shot = predict.gp_posterior(_DIAG_NET, x, y, xt, kernel=kernel, noise=1e-2, compute_cov="diag")
        torch.testing.assert_close(one_shot.marginal, diag.marginal, rtol=1e-14, atol=0)
    flow = predict.gradient_flow(_DIAG_NET, x, y, xt, t=2.0, compute_cov="diag")
    torch.testing.assert_close(flow.marginal, _diagonal(predict.gradient_flow(_DIAG_NET, x, y, xt, t=2.0)),
                               rtol=1e-12, atol=0)


def test_marginal_variances_never_form_a_test_by_test_matrix(monkeypatch):
    """The point of compute_cov="diag": a review ran out of memory asking for the covariance of
    50 000 test points (20 GB); every matrix the diagonal path forms is (M, N), (N, N) or smaller."""
    torch.manual_seed(2)
    x, y, xt = torch.randn(12, 3), torch.randn(12), torch.randn(40, 3)
    shapes = []
    real_kernel, real_symmetrize = type(_DIAG_NET).kernel, _FLOW_MODULE.symmetrize_

    def recording(self, *args, **kwargs):
        state = real_kernel(self, *args, **kwargs)
        shapes.extend(tuple(s.shape) for s in (state.nngp, state.ntk) if s is not None)
        return state

    def refused(cov):
        raise AssertionError("an (M, M) covariance was symmetrized")

    monkeypatch.setattr(type(_DIAG_NET), "kernel", recording)
    monkeypatch.setattr(_FLOW_MODULE, "symmetrize_", refused)   # the posterior's too (subtract_gram_)
    for kernel in ("ntk", "nngp"):
        flow = predict.GradientFlow(_DIAG_NET, x, y, kernel=kernel, learning_rate=0.7)
        for when in _DIAG_TIMES:
            flow.predict(xt, compute_cov="diag", **when)
    for kernel in ("nngp", "ntkgp", "ntk"):
        predict.GPPosterior(_DIAG_NET, x, y, kernel=kernel, noise=1e-2).predict(xt, compute_cov="diag")
    assert shapes and all(40 not in s[-2:] or s in ((40, 12), (40,)) for s in shapes), sorted(set(shapes))
    monkeypatch.setattr(_FLOW_MODULE, "symmetrize_", real_symmetrize)
    assert flow.predict(xt, t=1.0).covariance.shape == (40, 40) and (40, 40) in shapes   # the recording sees one


def test_mean_and_marginal_variances_at_infinite_time_take_the_test_points_in_blocks(monkeypatch):
    """The mean and the marginal variances need each test point's rows of the test kernels alone:
    formed whole, with w = L⁻¹ Kd* beside them (and the posterior's regularized training kernel kept
    after its factorization), "diag" peaked at 4.1 N² for GPPosterior at M = N = 8000 (13 GB at
    20 000 in float64; 2.1 N² in blocks) and 7.3 N² for GradientFlow at t = None. The values are
    those of the whole covariance."""
    torch.manual_seed(4)
    x, y, xt = torch.randn(12, 3), torch.randn(12, 2), torch.randn(10, 3)
    rows = []
    real_kernel = type(_DIAG_NET).kernel

    def recording(self, x1, x2=None, **kwargs):
        if x1.shape[0] != 12:   # the test side (the training kernel is 12 x 12)
            rows.append(x1.shape[0])
        return real_kernel(self, x1, x2, **kwargs)

    predictors = [predict.GPPosterior(_DIAG_NET, x, y, kernel=kernel, noise=1e-2)
                  for kernel in ("nngp", "ntkgp", "ntk")]
    predictors += [predict.GradientFlow(_DIAG_NET, x, y, kernel=kernel, diag_reg=1e-3) for kernel in ("ntk", "nngp")]
    for predictor in predictors:
        full = predictor.predict(xt)
        monkeypatch.setattr(type(_DIAG_NET), "kernel", recording)
        for module in ("posterior", "gradient_flow"):
            monkeypatch.setattr(sys.modules[f"ntkgp.predict.{module}"], "TEST_BLOCK_ENTRIES", 4 * 12, raising=False)
        rows.clear()
        mean, diag = predictor.predict(xt, compute_cov=False), predictor.predict(xt, compute_cov="diag")
        monkeypatch.undo()
        assert sorted(set(rows)) == [2, 4], rows   # blocks of 4, 4 and 2 test points
        torch.testing.assert_close(mean.mean, full.mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(diag.mean, full.mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(diag.marginal, _diagonal(full), rtol=0, atol=1e-14 * full.scale)
        assert diag.scale == full.scale
        if isinstance(predictor, predict.GPPosterior) and predictor.kind != "ntk":
            kept = [v for v in vars(predictor).values() if isinstance(v, torch.Tensor) and v.shape == (12, 12)]
            assert len(kept) == 1   # the factor alone


def _dense_flow(x, y, xt, kind, diag_reg, learning_rate, tau=None, steps=None):
    """Lee et al. 2019, eqs. 15–16, written out densely (matrix_exp or matrix_power, solve): the test
    mean and covariance and the training outputs' marginal variances, after time ``tau = η t / m`` or
    ``steps`` discrete steps, for a GradientFlow with relative ``diag_reg``."""
    with torch.no_grad():
        k_all = _DIAG_NET.kernel(torch.cat([x, xt]))
    n, m = x.shape[0], y.numel()
    k, k_td, k_tt = k_all.nngp[:n, :n], k_all.nngp[n:, :n], k_all.nngp[n:, n:]
    g, g_td = (k_all.ntk[:n, :n], k_all.ntk[n:, :n]) if kind == "ntk" else (k, k_td)
    g = g + diag_reg * torch.diagonal(g).mean() * torch.eye(n, dtype=g.dtype)

    def decay(factor):   # e^{−G τ factor}, or (I − η G / m)^(steps factor)
        if steps is None:
            return torch.linalg.matrix_exp(-g * tau * factor)
        return torch.linalg.matrix_power(torch.eye(n, dtype=g.dtype) - learning_rate * g / m, steps * factor)

    eye = torch.eye(n, dtype=g.dtype)
    op = g_td @ torch.linalg.solve(g, eye - decay(1))                 # G*d G⁻¹ (I − e^{−Gτ})
    if kind == "nngp":   # Σ = K** − K*d K⁻¹ (I − e^{−2Kτ}) Kd*, training: K e^{−2Kτ}
        cov = k_tt - k_td @ torch.linalg.solve(g, eye - decay(2)) @ k_td.mT
        train = g @ decay(2)
    else:
        cross = op @ k_td.mT
        cov = k_tt + op @ k @ op.mT - cross - cross.mT
        train = decay(1) @ k @ decay(1)
    return op @ y, cov, torch.diagonal(train)


def _recording_test_rows(flow, rows: list):
    """A stand-in for ``type(net).kernel`` that records the rows of each test block's kernel (the
    training kernel and the covariance's whole ``K**`` aside)."""
    real_kernel = type(flow.net).kernel

    def recording(self, x1, x2=None, **kwargs):
        if x1 is not flow.x_factor and (x2 is not None or kwargs.get("diag")):
            rows.append(x1.shape[0])
        return real_kernel(self, x1, x2, **kwargs)
    return recording


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_finite_time_predictions_take_the_test_points_in_blocks(kernel, monkeypatch):
    """At finite times the whole (M, N) test kernels, K*d V, 2 Vᵀ Kd* and a time's two (N, M) products
    were formed at once: 5.2 M N for "diag" (13 GB at N = 2000, M = 200 000 in float64), 2.2 M N for the
    mean. Now the mean and the marginal variances take a block of test points at a time, and the
    covariance is formed a block of rows at a time: the values are those of the whole matrices (to
    rounding, 1e-13) and of the dense formulas, for several times and discrete steps, on test and
    training points, and the time's gradient is the same."""
    torch.manual_seed(5)
    x, y, xt = torch.randn(12, 3), torch.randn(12, 2), torch.randn(10, 3)
    x, y, xt = x.double(), y.double(), xt.double()
    flow = predict.GradientFlow(_DIAG_NET, x, y, kernel=kernel, learning_rate=0.7, diag_reg=1e-3)
    rows: list[int] = []
    recording = _recording_test_rows(flow, rows)

    t = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)
    for when, dense in ((dict(t=t), [dict(tau=0.7 * float(v) / 24) for v in t]),
                        (dict(steps=torch.tensor([1, 30])), [dict(steps=1), dict(steps=30)])):
        whole = [flow.predict(points, **when, compute_cov=cov) for points in (xt, None) for cov in (True, "diag")]
        monkeypatch.setattr(type(_DIAG_NET), "kernel", recording)
        monkeypatch.setattr(_FLOW_MODULE, "TEST_BLOCK_ENTRIES", 4 * 12)   # blocks of 4, 4 and 2 test points
        rows.clear()
        blocked = [flow.predict(points, **when, compute_cov=cov) for points in (xt, None) for cov in (True, "diag")]
        mean_alone = flow.predict(xt, **when, compute_cov=False)
        monkeypatch.undo()
        assert sorted(set(rows)) == [2, 4], rows
        scale = whole[0].scale
        for a, b in zip(whole, blocked, strict=True):
            torch.testing.assert_close(b.mean, a.mean, rtol=1e-13, atol=1e-13 * float(a.mean.abs().max()))
            assert b.scale == a.scale
            for u, v in ((a.covariance, b.covariance), (a.marginal, b.marginal)):
                if u is not None:
                    torch.testing.assert_close(v, u, rtol=0, atol=1e-13 * scale)
        assert torch.equal(blocked[0].covariance, blocked[0].covariance.mT)
        torch.testing.assert_close(mean_alone.mean, whole[0].mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(blocked[1].marginal, _diagonal(blocked[0]), rtol=0, atol=1e-14 * scale)
        for i, args in enumerate(dense):
            mean, cov, train = _dense_flow(x, y, xt, kernel, 1e-3, 0.7, **args)
            # every term is O(1) (prior variances ~1): eigh against matrix_exp rounds to ~1e-13
            torch.testing.assert_close(blocked[1].mean[i], mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(blocked[0].covariance[i], cov, rtol=0, atol=1e-10)
            torch.testing.assert_close(blocked[1].marginal[i], torch.diagonal(cov), rtol=0, atol=1e-10)
            torch.testing.assert_close(blocked[3].marginal[i], train, rtol=0, atol=1e-10)
    # the time's gradient through the blocks (autograd does not see out=: the rows concatenated instead)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, 100, dtype=torch.float64).reshape(10, 10)
    grads = []
    for entries in (1 << 24, 4 * 12):
        monkeypatch.setattr(_FLOW_MODULE, "TEST_BLOCK_ENTRIES", entries)
        out, diag = flow.predict(xt, t=t), flow.predict(xt, t=t, compute_cov="diag")
        total = (out.covariance * weights).sum() + diag.marginal.sum() + diag.mean.sum()
        grads.append(torch.autograd.grad(total, t)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)
    assert float(grads[0].abs()) > 1e-3   # the times do move the outputs


def test_test_kernels_that_overflow_are_refused_before_the_eigendecomposition(monkeypatch):
    """Test inputs whose kernels overflow (|x| ~ 1e160 in float64), or whose prior variances exceed the
    float32 outputs' range (|x| ~ 1e20 in float32, kernels computed in float64), were refused only after
    the O(N³) eigendecomposition of the training kernel (and, at finite times, the flow's functions of
    it). The first block of test kernels and the test points' prior variances (O(M)) now come first;
    the mean of the float32 points, whose covariance alone is out of range, is still given."""
    spectral = sys.modules["ntkgp.predict.spectral"]
    real_of = spectral.Eigensystem.of.__func__
    made = []

    def counted(cls, k, *args, **kwargs):
        made.append(k.shape)
        return real_of(cls, k, *args, **kwargs)

    monkeypatch.setattr(spectral.Eigensystem, "of", classmethod(counted))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 3, generator=g, dtype=torch.float64)
    net = ntkgp.mlp(1, "relu", 2.0, 0.1)
    cases = [(x, xt * 1e160, NonFiniteKernelError, "^The test kernel is not finite", (True, "diag", False)),
             (x.float(), (xt * 1e20).float(), ValueError, "^The prior kernel at the points predicted reaches .* "
                                                          "beyond the range of torch.float32", (True, "diag"))]
    for train, test, error, message, covs in cases:
        flow = predict.GradientFlow(net, train, y.to(train.dtype))
        for when in (dict(t=1.0), dict(t=torch.tensor([0.5, 2.0])), dict(steps=10)):
            for cov in covs:
                with pytest.raises(error, match=message):
                    flow.predict(test, compute_cov=cov, **when)
                with pytest.raises(error, match=message):
                    predict.gradient_flow(net, train, y.to(train.dtype), test, compute_cov=cov, **when)
        assert made == []
    mean = flow.predict(test, t=1.0, compute_cov=False).mean   # the float32 case: its mean is in range
    assert made == [(20, 20)] and mean.dtype == torch.float32 and bool(torch.isfinite(mean).all())


def test_blocked_test_points_warn_once_about_unresolved_directions(monkeypatch):
    """The unresolved-direction warning compares maxima over all test rows: accumulated over the
    blocks, it fires on the same condition as for the whole matrix, once per prediction, not once
    per block (two training points 3e-8 apart, test_edge_predict's case)."""
    gen = torch.Generator().manual_seed(0)
    net = ntkgp.serial(ntkgp.Dense(16, weight_var=2.0, bias_var=0.1), ntkgp.Erf(),
                       ntkgp.Dense(1, weight_var=1.5, bias_var=0.05))
    x, y, xt = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 3), (6,), (7, 3)))
    x[4] = x[1] + 3e-8 * torch.randn(3, generator=gen, dtype=torch.float64)
    flow = predict.GradientFlow(net, x, y)
    rows: list[int] = []
    recording = _recording_test_rows(flow, rows)

    # (times, warned): at τ = 1e6/6 the direction still trains, from 1e8 on it counts as untrained
    for when, warned in ((dict(t=1e6), False), (dict(t=[1e6, 1e10]), True), (dict(steps=10**10), True)):
        for cov in (False, "diag", True):
            said = []
            for entries in (1 << 24, 2 * 6):   # whole, then blocks of 2, 2, 2 and 1 test points
                monkeypatch.setattr(_FLOW_MODULE, "TEST_BLOCK_ENTRIES", entries)
                monkeypatch.setattr(type(net), "kernel", recording)
                rows.clear()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    flow.predict(xt, compute_cov=cov, **when)
                monkeypatch.undo()
                said.append([w for w in caught if "count as untrained, but move the test outputs" in str(w.message)])
            assert set(rows) == {1, 2}, rows
            assert [len(s) for s in said] == ([1, 1] if warned else [0, 0]), (when, cov, said)
            assert [str(w.message) for w in said[0]] == [str(w.message) for w in said[1]]
            assert all(w.filename == __file__ for s in said for w in s)


def test_flow_regularizes_the_ntk_in_place_only_when_nothing_else_holds_it(monkeypatch):
    """GradientFlow raises the training NTK's own diagonal (one N × N copy less at its setup's peak):
    where a network's NTK is the very tensor of its NNGP, or an expanded constant, it must copy, or the
    NNGP of the covariance would carry diag_reg (or the write would fail)."""
    torch.manual_seed(6)
    x, y, xt = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(5, 3).double()
    with torch.no_grad():
        k = _DIAG_NET.kernel(x).nngp
    real_kernel = type(_DIAG_NET).kernel
    for shared in (k, torch.full((), 1.5, dtype=torch.float64).expand(8, 8)):
        def aliased(self, x1, x2=None, *, shared=shared, **kwargs):
            state = real_kernel(self, x1, x2, **kwargs)
            return SimpleNamespace(nngp=shared, ntk=shared) if x2 is None and x1.shape[0] == 8 else state

        monkeypatch.setattr(type(_DIAG_NET), "kernel", aliased)
        before = shared.clone()
        flow = predict.GradientFlow(_DIAG_NET, x, y, diag_reg=0.1)
        monkeypatch.undo()
        assert torch.equal(shared, before) and torch.equal(flow.nngp_dd, before)
        reg = before + 0.1 * torch.diagonal(before).mean() * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(flow.dynamics, reg, rtol=1e-15, atol=0)
        out = flow.predict(xt, t=2.0)
        assert torch.isfinite(out.covariance).all()
    # an NTK of its own is regularized in place, to the same values
    flow = predict.GradientFlow(_DIAG_NET, x, y, diag_reg=0.1)
    with torch.no_grad():
        theta = _DIAG_NET.kernel(x).ntk
    reg = theta + 0.1 * torch.diagonal(theta).mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(flow.dynamics, reg, rtol=1e-15, atol=0)
    assert torch.equal(flow.nngp_dd, k)


def test_flow_leaves_an_ntk_served_by_a_kernel_of_its_own_unchanged(monkeypatch):
    """Only Layer.kernel builds its NTK anew for the caller: an object serving stored matrices (the
    predictors take one), or a network whose kernel method caches them, got its own NTK raised by
    diag_reg in place (1.2 at diag_reg=0.1 here), and a second GradientFlow of it regularized it again;
    a one-point NTK expanded from a held scalar (which passes is_contiguous) had that scalar raised.
    ntkgp's own networks keep the in-place saving, to the same values."""
    torch.manual_seed(7)
    x, y, xt = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.randn(4, 3).double()
    with torch.no_grad():
        stored = _DIAG_NET.kernel(x)
    reg = stored.ntk + 0.1 * torch.diagonal(stored.ntk).mean() * torch.eye(6, dtype=torch.float64)
    held = stored.ntk.clone()
    expected = predict.GradientFlow(_DIAG_NET, x, y, diag_reg=0.1).predict(xt, t=[1.0, math.inf])

    class Served:
        def kernel(self, x1, x2=None, diag=False, ntk=True):
            if x2 is None and not diag and torch.equal(x1, x):
                return SimpleNamespace(nngp=stored.nngp, ntk=stored.ntk)
            return _DIAG_NET.kernel(x1, x2, diag=diag, ntk=ntk)

    for _ in range(2):   # the second build must see the matrix as the first did
        flow = predict.GradientFlow(Served(), x, y, diag_reg=0.1)
        assert torch.equal(stored.ntk, held)
        torch.testing.assert_close(flow.dynamics, reg, rtol=1e-15, atol=0)
        out = flow.predict(xt, t=[1.0, math.inf])
        torch.testing.assert_close(out.mean, expected.mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.covariance, expected.covariance, rtol=1e-12, atol=1e-14)
    scalar = torch.tensor(2.0, dtype=torch.float64)
    one = SimpleNamespace(kernel=lambda x1, x2=None, diag=False, ntk=True: SimpleNamespace(
        nngp=torch.full((1, 1), 1.0, dtype=torch.float64), ntk=scalar.expand(1, 1)))
    predict.GradientFlow(one, x[:1], y[:1], diag_reg=0.5)
    assert float(scalar) == 2.0
    # ntkgp's own networks: the NTK is regularized in place (one N × N copy less), to the same values
    copies = []
    real_regularize = _FLOW_MODULE.regularize

    def recording(*args, copy=True, **kwargs):
        copies.append(copy)
        return real_regularize(*args, copy=copy, **kwargs)

    monkeypatch.setattr(_FLOW_MODULE, "regularize", recording)
    flow = predict.GradientFlow(_DIAG_NET, x, y, diag_reg=0.1)
    assert copies == [False]
    torch.testing.assert_close(flow.dynamics, reg, rtol=1e-15, atol=0)


def test_covariance_beyond_memory_is_refused_before_any_kernel(monkeypatch):
    """The (M, M) covariance of 3 million test points (72 TB in float64) cannot fit anywhere: it failed
    only after the training kernel and its factorization, as torch's "can't allocate memory" (or by the
    operating system killing the process), without naming compute_cov="diag", which needs O(M N)."""
    x, y = torch.randn(5, 1), torch.randn(5)
    xt = torch.zeros(1, 1).expand(3_000_000, 1)

    def refused(self, *args, **kwargs):
        raise AssertionError("a kernel was computed")

    flow = predict.GradientFlow(_DIAG_NET, x, y, diag_reg=1e-3)
    posterior = predict.GPPosterior(_DIAG_NET, x, y, noise=1e-2)
    monkeypatch.setattr(type(_DIAG_NET), "kernel", refused)
    calls = [lambda: predict.gp_posterior(_DIAG_NET, x, y, xt, noise=1e-2),
             lambda: predict.gp_posterior(_DIAG_NET, x, y, xt, kernel="ntk", noise=1e-2),
             lambda: predict.gradient_flow(_DIAG_NET, x, y, xt),
             lambda: predict.gradient_flow(_DIAG_NET, x, y, xt, t=[1.0, 2.0], kernel="nngp"),
             lambda: flow.predict(xt, steps=3), lambda: posterior.predict(xt)]
    for call in calls:
        with pytest.raises(ValueError, match=r"covariance of 3000000 test points needs .* GiB in torch.float64, more "
                                             r"than the .* \(compute_cov='diag'\)"):
            call()


def test_compute_cov_takes_true_false_or_diag():
    torch.manual_seed(3)
    x, y = torch.randn(6, 3), torch.randn(6)
    flow = predict.GradientFlow(_DIAG_NET, x, y)
    for wrong in ("full", "diagonal", "True", ("diag",)):
        with pytest.raises(ValueError, match=r"compute_cov must be True, False or 'diag' \(the marginal variances "
                                             r"alone\), got"):
            flow.predict(x, compute_cov=wrong)
        with pytest.raises(ValueError, match="compute_cov must be True, False or 'diag'"):
            predict.gp_posterior(_DIAG_NET, x, y, x, noise=0.1, compute_cov=wrong)
    assert flow.predict(x, compute_cov=np.bool_(False)).variance is None
    with pytest.raises(ValueError, match=r"no variances \(predict with compute_cov=True or 'diag'\)"):
        flow.predict(x, compute_cov=False).interval()


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_symmetrizing_in_place_by_blocks_is_the_average_with_the_transpose(monkeypatch, block):
    """symmetrize_ averages block pairs in place (two (M, M) temporaries were 1.6 GB in float64 at M = 10 000);
    it must equal (c + cᵀ)/2 bitwise, blocks that straddle the edge and batches included."""
    monkeypatch.setattr(_FLOW_MODULE, "SYMMETRIZE_BLOCK", block)
    c = torch.randn(2, 3, 7, 7)
    expected = (c + c.mT) / 2
    assert torch.equal(_FLOW_MODULE.symmetrize_(c.clone()), expected) and torch.equal(expected, expected.mT)


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_time_covariance_written_into_the_test_kernel_equals_the_stacked_one(monkeypatch, kernel, dtype):
    """One finite time writes its covariance into the test kernel itself (one (M, M) matrix fewer at
    the peak: 2.88 -> 1.88 at N = 2000, M = 10 000); a stack of times writes fresh outputs,
    so each of its times must equal the one-time call (to the rounding of the time functions,
    which are computed for the stack at once: 1 ulp), symmetric, and no call may see the test
    kernel an earlier one overwrote."""
    monkeypatch.setattr(_FLOW_MODULE, "SYMMETRIZE_BLOCK", 4)   # blocks straddling the edge
    flow = predict.GradientFlow(NET, X_TRAIN.to(dtype), Y_TRAIN.to(dtype), kernel=kernel, learning_rate=LR)
    x = X_TEST.to(dtype)
    stacked = flow.predict(x, t=torch.tensor([0.5, 7.0, math.inf])).covariance
    tolerance = dict(rtol=1e-14, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for i, t in enumerate((0.5, 7.0, math.inf)):
        one = flow.predict(x, t=t).covariance
        assert one.dtype == dtype and torch.equal(one, one.mT)
        torch.testing.assert_close(one, stacked[i], **tolerance)
    torch.testing.assert_close(flow.predict(x, steps=3).covariance, flow.predict(x, steps=[3, 4]).covariance[0],
                               **tolerance)


@pytest.mark.parametrize("net", [None, torch.nn.Linear(3, 1)])
def test_predictors_name_a_net_that_is_not_a_spec(net):
    """None or a torch module failed with "'Linear' object has no attribute 'kernel'" (a review)."""
    x, y = torch.randn(5, 3), torch.randn(5)
    for call in (lambda: predict.gp_posterior(net, x, y, x), lambda: predict.GradientFlow(net, x, y),
                 lambda: predict.gp_posterior(net, x, y, x, kernel="ntk")):
        with pytest.raises(ValueError, match="net must be an ntkgp network spec"):
            call()


@pytest.mark.parametrize("factor_dtype, size", [(torch.float64, 8), (torch.float32, 4)])
def test_the_covariance_memory_check_counts_the_bytes_of_every_entry(monkeypatch, factor_dtype, size):
    """The ``(T, M, M)`` covariance in ``factor_dtype`` takes ``T M² · size`` bytes: refused with one
    byte less memory than that, computed with exactly that much (the check's limit, not a size from
    elsewhere; an undercount by the dtype's bits / 64 passed every other test). Eight test points: the
    kernels' own check (Layer.kernel) counts the test-train NNGP and NTK, 2 M N entries, below 2 M² here."""
    torch.manual_seed(4)
    x, y, xt = torch.randn(5, 2), torch.randn(5), torch.randn(8, 2)
    need = 2 * 8 * 8 * size   # T = 2 times, M = 8 test points
    flow = predict.GradientFlow(_DIAG_NET, x, y, factor_dtype=factor_dtype)
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"\(2 x 8 x 8\) covariance of 8 test points needs"):
        flow.predict(xt, t=[1.0, 2.0])
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: need)
    assert flow.predict(xt, t=[1.0, 2.0]).covariance.shape == (2, 8, 8)


def test_the_stability_limit_of_vector_targets_counts_all_their_entries():
    """Gradient descent on ``(1/2m) ‖f − Y‖²`` with ``m = N k`` entries contracts each step by
    ``1 − ηλ/m``: stable up to ``η = 2 N k / λ_max``, so ``η = 1.5 N k / λ_max`` (``|1 − a| = 0.5``)
    must not warn, and the outputs are ``Y + (I − ηΘ/m)^s (f_0 − Y)`` (matrix powers here; the
    limit of ``N`` alone, 2x too low for k = 2, warned of instability for this stable rate)."""
    theta, y = _DD.double(), _Y2.double()
    n, k = y.shape
    eta = 1.5 * n * k / float(torch.linalg.eigvalsh(theta).max())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train = predict.gradient_descent_mse(theta, y, steps=[1, 7], learning_rate=eta)
    for i, s in enumerate((1, 7)):
        step = torch.linalg.matrix_power(torch.eye(n, dtype=theta.dtype) - eta * theta / (n * k), s)
        torch.testing.assert_close(train[i], y - step @ y, rtol=1e-12, atol=1e-12)


def test_single_network_diag_reg_is_relative_to_the_mean_diagonal_unless_absolute():
    """``diag_reg`` adds ``diag_reg · tr(Θ)/N · I`` to the training kernel (neural-tangents'
    default), or ``diag_reg · I`` with ``diag_reg_absolute_scale=True``: both against
    ``Θ*d Θ_r⁻¹ (I − e^{−Θ_r τ}) Y`` formed here by ``torch.linalg.matrix_exp`` and a solve, on a
    kernel whose mean diagonal is far from 1 (only a warning test told the two apart before)."""
    theta, theta_td = 30 * _DD.double(), 30 * _TD.double()
    y = _Y2[:, 0].double()
    n, eta, t = theta.shape[0], 0.3, 2.5
    tau = eta * t / n
    for absolute, shift in ((False, 0.1 * float(theta.diagonal().mean())), (True, 0.1)):
        reg = theta + shift * torch.eye(n, dtype=theta.dtype)
        flow = torch.linalg.solve(reg, (torch.eye(n, dtype=theta.dtype) - torch.linalg.matrix_exp(-reg * tau)) @ y)
        for time, coefficients in ((t, flow), (None, torch.linalg.solve(reg, y))):
            train, test = predict.gradient_descent_mse(theta, y, ntk_test_train=theta_td, fx_test_0=0.0, t=time,
                                                       learning_rate=eta, diag_reg=0.1,
                                                       diag_reg_absolute_scale=absolute)
            torch.testing.assert_close(test, theta_td @ coefficients, rtol=1e-11, atol=1e-12)
            if time is not None:
                torch.testing.assert_close(train, reg @ flow, rtol=1e-11, atol=1e-12)   # Y − e^{−Θ_r τ} Y


def test_the_divergence_warning_of_a_standard_spec_s_ntk_names_its_ntk_parameterized_twin():
    """A standard-parameterized spec's NTK flow is one learning rate for every parameter (limit 0.0074 here),
    whereas its networks trained with the per-layer rates (train_ensemble) follow the NTK-parameterized twin
    (limit 0.215): that rate taken from the ensemble diverged in the flow with no word on why."""
    from ntkgp.finite import ntk_parameterized

    x = torch.linspace(-2, 2, 8, dtype=torch.float64)[:, None]
    y = torch.sin(2 * x[:, 0])
    standard = ntkgp.mlp(2, "erf", 2.25, 0.0025, width=256, parameterization="standard")
    twin = ntk_parameterized(standard)
    rate = predict.GradientFlow(twin, x, y).max_learning_rate / 2
    assert predict.GradientFlow(standard, x, y).max_learning_rate < rate / 10
    with pytest.warns(RuntimeWarning, match=r"stability limit.*one learning rate for every parameter; networks "
                                            r"trained with the equivalent per-layer rates .* follow "
                                            r"ntkgp\.finite\.ntk_parameterized\(net\) instead\."):
        predict.GradientFlow(standard, x, y, learning_rate=rate).predict(x, steps=10, compute_cov=False)
    for net, kind in ((twin, "ntk"), (standard, "nngp")):   # no hint for an NTK spec, nor for the NNGP flow
        limit = predict.GradientFlow(net, x, y, kernel=kind).max_learning_rate
        flow = predict.GradientFlow(net, x, y, kernel=kind, learning_rate=2.5 * limit)
        with pytest.warns(RuntimeWarning, match="stability limit") as caught:
            flow.predict(x, steps=3, compute_cov=False)
        assert not any("ntk_parameterized" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict.GradientFlow(twin, x, y, learning_rate=rate).predict(x, steps=10, compute_cov=False)
