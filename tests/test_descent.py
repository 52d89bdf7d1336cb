"""Linearized training on any loss (ntkgp.predict.gradient_descent) and its ODE solver.

References, each independent of the code under test: neural-tangents 0.6.5's own
``predict.gradient_descent`` (fixtures), the squared loss's closed form, explicit linear models
trained in parameter space by ``torch.optim.SGD`` (exact for discrete steps: a linear model is its
own linearization) and by scipy's ``solve_ivp`` (continuous time).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import torch

from ntkgp import predict
from ntkgp.predict.odeint import integrate, rms_norm

from nt_specs import FIXTURES

DATA = np.load(FIXTURES / "nt_predict.npz")
F64 = torch.float64


def xent(f, y):
    return -(y * f.log_softmax(-1)).sum(-1).mean()


def mse(f, y):
    return 0.5 * ((f - y) ** 2).mean()


def _fixture(name):
    return torch.tensor(DATA[name])


@pytest.mark.parametrize("name, momentum", [("xent", None), ("xent", 0.9), ("mse", None)])
def test_matches_neural_tangents(name, momentum):
    """Both are adaptive Dormand–Prince solutions with tolerances ~1e-8 (neural-tangents' odeint
    1.4e-8, ours 1e-8); neural-tangents' own squared-loss flow is 1.5e-8 from the closed form,
    so agreement to 5e-8 of the outputs' scale is what the two solvers allow."""
    y = _fixture("one_hot") if name == "xent" else _fixture("y_train")
    train, test = predict.gradient_descent(
        {"xent": xent, "mse": mse}[name], _fixture("ntk_dd"), y, fx_train_0=_fixture("fx_train_0"),
        ntk_test_train=_fixture("ntk_td"), fx_test_0=_fixture("fx_test_0"), t=_fixture("times"),
        learning_rate=float(DATA["learning_rate"]), momentum=momentum)
    key = f"descent/{name}/momentum{momentum}"
    for ours, theirs in ((train, DATA[key + "/train"]), (test, DATA[key + "/test"])):
        assert ours.shape == theirs.shape
        assert np.abs(ours.numpy() - theirs).max() <= 5e-8 * np.abs(theirs).max()


def _problem(n=10, m=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n + m, 6, generator=g, dtype=F64)
    kernel = feats @ feats.T / 6
    return (kernel[:n, :n], kernel[n:, :n], torch.randn(n, k, generator=g, dtype=F64),
            0.3 * torch.randn(n, k, generator=g, dtype=F64), 0.3 * torch.randn(m, k, generator=g, dtype=F64))


def test_squared_loss_flow_is_the_closed_form():
    """The squared loss's flow is gradient_descent_mse's e^{−Θ η t/m}: at default tolerances the
    global error stays at the 1e-8 local tolerance over 0 ≤ t ≤ 400 (the slowest mode relaxed by
    e^{-5}), and tightening the tolerances tightens it (the solver converges, not just runs)."""
    k_dd, k_td, y, f0, ft0 = _problem()
    times = torch.tensor([0.0, 0.5, 3.0, 40.0, 400.0], dtype=F64)
    closed = predict.gradient_descent_mse(k_dd, y, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0, t=times,
                                          learning_rate=0.7)
    errors = []
    for tol in (None, 1e-11):
        flow = predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0, t=times,
                                        learning_rate=0.7, rtol=tol, atol=tol)
        errors.append(max(float((a - b).abs().max()) for a, b in zip(flow, closed, strict=True)))
    assert errors[0] <= 5e-8 and errors[1] <= 1e-10
    assert torch.equal(flow[0][0], f0) and torch.equal(flow[1][0], ft0)   # t = 0 is the initial outputs


def test_squared_loss_steps_are_the_closed_form_steps():
    k_dd, k_td, y, f0, ft0 = _problem()
    steps = [0, 1, 7, 50]
    closed = predict.gradient_descent_mse(k_dd, y, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0, steps=steps,
                                          learning_rate=0.7)
    stepped = predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0, steps=steps,
                                       learning_rate=0.7)
    for a, b in zip(stepped, closed, strict=True):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-13


def _linear_model(full: bool, seed: int = 1, n: int = 9, m: int = 4, k: int = 3, p: int = 7):
    """A model linear in its parameters, f(x)_i = A(x)_i · θ: its NTK is A Aᵀ exactly and gradient
    descent on it is the linearized dynamics. ``full``: per-output features, a full (N, N, k, k)
    kernel; otherwise shared features and θ of shape (p, k), the kernel Θ ⊗ I."""
    g = torch.Generator().manual_seed(seed)
    if full:
        feats = torch.randn(n + m, k, p, generator=g, dtype=F64) / p ** 0.5
        theta0 = torch.randn(p, generator=g, dtype=F64)
        apply = lambda theta: feats @ theta                                        # noqa: E731
        kernel = torch.einsum("aip,bjp->abij", feats, feats)
    else:
        feats = torch.randn(n + m, p, generator=g, dtype=F64) / p ** 0.5
        theta0 = torch.randn(p, k, generator=g, dtype=F64)
        apply = lambda theta: feats @ theta                                        # noqa: E731
        kernel = feats @ feats.T
    labels = torch.randint(0, k, (n,), generator=g)
    y = torch.nn.functional.one_hot(labels, k).to(F64)
    return apply, theta0, kernel[:n, :n], kernel[n:, :n], y, n


@pytest.mark.parametrize("full", [False, True], ids=["shared", "full-kernel"])
@pytest.mark.parametrize("momentum", [None, 0.8])
def test_steps_equal_sgd_on_a_linear_model(full, momentum):
    """Discrete steps are exact: torch.optim.SGD (momentum: v ← β v + g, θ ← θ − η v, dampening 0)
    on a linear model's cross-entropy gives the same outputs to rounding after 0–60 steps."""
    apply, theta0, k_dd, k_td, y, n = _linear_model(full)
    f_all = apply(theta0)
    train, test = predict.gradient_descent(xent, k_dd, y, fx_train_0=f_all[:n], ntk_test_train=k_td,
                                           fx_test_0=f_all[n:], steps=[0, 5, 60], learning_rate=0.9,
                                           momentum=momentum)
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.SGD([theta], lr=0.9, momentum=momentum or 0.0)
    for step in range(61):
        if step in (0, 5, 60):
            i = [0, 5, 60].index(step)
            with torch.no_grad():
                now = apply(theta)
            assert float((train[i] - now[:n]).abs().max()) <= 1e-12
            assert float((test[i] - now[n:]).abs().max()) <= 1e-12
        opt.zero_grad()
        xent(apply(theta)[:n], y).backward()
        opt.step()
    assert float((train[2] - train[0]).abs().max()) > 0.1   # it trained


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_flow_equals_parameter_space_ode(momentum):
    """Continuous time against scipy's DOP853 on the parameters (tolerance 1e-12): dθ/dt = −η ∇_θ L,
    or with momentum dθ/dt = w, dw/dt = −η ∇_θ L − (1 − β) w (the function-space ODE's image
    under θ − θ₀ = −Jᵀ R). Default tolerances hold the outputs to 1e-7."""
    apply, theta0, k_dd, k_td, y, n = _linear_model(False)
    eta, times = 0.9, [0.0, 2.0, 15.0, 120.0]

    def grad_theta(theta):
        theta = theta.detach().requires_grad_()
        (g,) = torch.autograd.grad(xent(apply(theta)[:n], y), theta)
        return g

    size = theta0.numel()

    def rhs(_, state):
        state = torch.from_numpy(state)
        theta = state[:size].reshape(theta0.shape)
        if momentum is None:
            return (-eta * grad_theta(theta)).reshape(-1).numpy()
        w = state[size:].reshape(theta0.shape)
        return torch.cat([w.reshape(-1), (-eta * grad_theta(theta) - (1 - momentum) * w).reshape(-1)]).numpy()

    start = theta0.reshape(-1).numpy()
    if momentum is not None:
        start = np.concatenate([start, np.zeros(size)])
    sol = scipy.integrate.solve_ivp(rhs, (0.0, times[-1]), start, method="DOP853", t_eval=times, rtol=1e-12,
                                    atol=1e-12)
    f_all = apply(theta0)
    train, test = predict.gradient_descent(xent, k_dd, y, fx_train_0=f_all[:n], ntk_test_train=k_td,
                                           fx_test_0=f_all[n:], t=times, learning_rate=eta, momentum=momentum)
    for i in range(len(times)):
        reference = apply(torch.from_numpy(sol.y[:size, i]).reshape(theta0.shape))
        assert float((train[i] - reference[:n]).abs().max()) <= 1e-7
        assert float((test[i] - reference[n:]).abs().max()) <= 1e-7


def test_times_in_any_order_and_shape():
    k_dd, k_td, y, f0, ft0 = _problem()
    times = torch.tensor([[30.0, 0.0], [2.0, 30.0]], dtype=F64)
    train, test = predict.gradient_descent(xent, k_dd, y.softmax(-1), fx_train_0=f0, ntk_test_train=k_td,
                                           fx_test_0=ft0, t=times)
    assert train.shape == (2, 2, *y.shape) and test.shape == (2, 2, *ft0.shape)
    one = predict.gradient_descent(xent, k_dd, y.softmax(-1), fx_train_0=f0, t=30.0)
    assert one.shape == y.shape
    assert torch.equal(train[0, 0], train[1, 1]) and torch.equal(train[0, 1], f0)
    assert float((train[0, 0] - one).abs().max()) <= 1e-7


def test_one_dimensional_targets_and_float32():
    """A smooth robust loss (log-cosh) on (N,) targets, integrated in float64 and in float32."""
    k_dd, k_td, y, f0, ft0 = _problem()
    loss = lambda f, y: torch.log(torch.cosh(f - y)).mean()   # noqa: E731
    ref = predict.gradient_descent(loss, k_dd, y[:, 0], fx_train_0=f0[:, 0], ntk_test_train=k_td,
                                   fx_test_0=ft0[:, 0], t=[1.0, 20.0])
    assert ref[0].shape == (2, 10) and ref[1].shape == (2, 4)
    low = predict.gradient_descent(loss, k_dd.float(), y[:, 0].float(), fx_train_0=f0[:, 0].float(),
                                   ntk_test_train=k_td.float(), fx_test_0=ft0[:, 0].float(), t=[1.0, 20.0],
                                   dtype=torch.float32)
    assert low[0].dtype == torch.float32
    # float32 at its default tolerances, 100 ε = 1.2e-5 (measured 1.2e-5 here; float64's own error is
    # below 1e-8, and within 2x of rtol = atol from 1e-4 to 1e-10 on this loss)
    for a, b in zip(low, ref, strict=True):
        assert float((a.double() - b).abs().max()) <= 5e-5


def test_differentiable_through_the_steps():
    """Gradients with respect to the kernel, targets and initial outputs: exact for discrete
    steps (gradcheck), and for the flow equal to central differences of tightly solved flows."""
    k_dd, k_td, y, f0, ft0 = _problem(n=4, m=2, k=2)
    y = y.softmax(-1)

    def stepped(k, targets, start):
        return predict.gradient_descent(xent, (k + k.T) / 2, targets, fx_train_0=start, steps=4, learning_rate=0.8)

    inputs = tuple(v.clone().requires_grad_() for v in (k_dd, y, f0))
    assert torch.autograd.gradcheck(stepped, inputs)

    def flowed(k):
        return predict.gradient_descent(xent, (k + k.T) / 2, y, fx_train_0=f0, ntk_test_train=k_td,
                                        fx_test_0=ft0, t=3.0, rtol=1e-12, atol=1e-12)[1].sum()

    k = k_dd.clone().requires_grad_()
    (grad,) = torch.autograd.grad(flowed(k), k)
    h = 1e-4
    for i, j in ((0, 0), (1, 3), (2, 1)):
        bump = torch.zeros_like(k_dd)
        bump[i, j] = h
        numeric = (flowed(k_dd + bump) - flowed(k_dd - bump)) / (2 * h)
        assert abs(float(grad[i, j]) - float(numeric)) <= 1e-6


def test_bad_input_is_refused_before_integrating():
    k_dd, k_td, y, f0, _ = _problem()
    call = lambda **kw: predict.gradient_descent(kw.pop("loss", xent), k_dd, y, fx_train_0=f0, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="t = ∞"):
        call()
    with pytest.raises(ValueError, match="Give finite times"):
        call(t=[1.0, math.inf])
    with pytest.raises(ValueError, match="no gradient"):
        call(t=torch.tensor(1.0, dtype=F64, requires_grad=True))
    with pytest.raises(ValueError, match="steps is read as step counts here and gets no gradient"):
        call(steps=torch.tensor(3.0, dtype=F64, requires_grad=True))
    with torch.no_grad():   # nothing is differentiated there: counts as any tensor's
        call(steps=torch.tensor(3.0, dtype=F64, requires_grad=True))
    with pytest.raises(ValueError, match="momentum is read as a number"):
        call(t=1.0, momentum=torch.tensor(0.5, requires_grad=True))
    # not make_schedule's hint to differentiate with respect to t, which is refused here too
    with pytest.raises(ValueError, match="learning_rate is read as a number and gets no gradient: pass a plain"):
        call(t=1.0, learning_rate=torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match="momentum must be in"):
        call(t=1.0, momentum=1.0)
    with pytest.raises(ValueError, match="scalar"):
        call(t=1.0, loss=lambda f, y: (f - y) ** 2)
    with pytest.raises(ValueError, match="does not depend on f"):
        call(t=1.0, loss=lambda f, y: torch.tensor(float(((f - y) ** 2).sum().detach())))
    with pytest.raises(ValueError, match="not finite"):
        call(t=1.0, loss=lambda f, y: f.sqrt().sum() + (f * 0).sum())
    with pytest.raises(ValueError, match="loss must be a function"):
        predict.gradient_descent("xent", k_dd, y, t=1.0)
    with pytest.raises(ValueError, match="ntk_test_train and fx_test_0"):
        call(t=1.0, ntk_test_train=k_td)
    with pytest.raises(ValueError, match=r"ntk_test_train must be \(M, N\)"):
        call(t=1.0, ntk_test_train=k_td.T, fx_test_0=0.0)
    with pytest.raises(ValueError, match="rtol"):
        call(t=1.0, rtol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        call(t=1.0, max_steps=0)
    for tolerance in ("rtol", "atol"):   # exact steps have none: it was ignored
        with pytest.raises(ValueError, match="rtol and atol are the ODE solver's tolerances, for times t"):
            call(steps=3, **{tolerance: 1e-3})
    with pytest.raises(ValueError, match="not both"):   # the first mistake named, not the tolerance
        call(t=1.0, steps=3, rtol=1e-3)
    # the argument named, not "Times" (steps are counts)
    with pytest.raises(ValueError, match=r"^steps must be non-negative, got -1"):
        call(steps=-1)
    with pytest.raises(ValueError, match=r"^t must not be NaN"):
        call(t=[1.0, math.nan])
    with pytest.raises(ValueError, match="symmetric"):
        predict.gradient_descent(xent, k_dd + torch.triu(torch.ones_like(k_dd), 1), y, t=1.0)
    with pytest.raises(ValueError, match="dtype must be"):
        call(t=1.0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"ntk_train_train is 10 x 10 but y_train has 9 rows"):
        predict.gradient_descent(xent, k_dd, y[:-1], t=1.0)
    with pytest.raises(ValueError, match=r"ntk_train_train is 10 x 10 but y_train has 9 rows"):   # the same check
        predict.gradient_descent_mse(k_dd, y[:-1], t=1.0)
    with pytest.raises(ValueError, match="in place"):
        call(t=1.0, loss=lambda f, y: (f.mul_(2) - y).square().mean())
    with pytest.raises(ValueError, match="exceed max_steps=100"):
        call(steps=[1, 10**12], max_steps=np.int64(100))
    with pytest.raises(ValueError, match="NaN"):
        predict.gradient_descent(xent, k_dd.masked_fill(k_dd > 1, math.nan), y, t=1.0)


def test_a_stiff_problem_says_what_to_do():
    k_dd, _, y, f0, _ = _problem()
    with pytest.raises(RuntimeError, match="steps=") as info:
        predict.gradient_descent(mse, 1e4 * k_dd, y, fx_train_0=f0, t=1e3, max_steps=200)
    assert "max_steps=200" in str(info.value)


def test_solver_order_on_a_known_solution():
    """dz/dt = −z² from z(0) = 1 is z = 1/(1 + t): the error at t = 10 falls like rtol (an
    error-per-step controller on a fifth-order method), and the tableau's stages are consistent
    (a wrong coefficient leaves a first-order method, whose error would not fall below 1e-6)."""
    errors = []
    for tol in (1e-6, 1e-9, 1e-12):
        (z,) = integrate(lambda z: -z * z, torch.ones(3, dtype=F64), [10.0], rms_norm(tol, tol), max_steps=10_000)
        errors.append(float((z - 1 / 11).abs().max()))
    assert errors[0] <= 1e-6 and errors[1] <= 1e-9 and errors[2] <= 5e-12


def test_overloads_keep_the_implementation_s_parameters():
    """Type checkers read the overloads (a tuple with test inputs, one tensor without): each keeps the
    implementation's names, kinds, hints and which have defaults, but for the narrowed test arguments."""
    import inspect
    import typing

    if not hasattr(typing, "get_overloads"):
        pytest.skip("typing.get_overloads needs Python 3.11")
    implementation = inspect.signature(predict.gradient_descent)
    overloads = typing.get_overloads(predict.gradient_descent)
    assert len(overloads) == 3
    for overload in overloads:
        signature = inspect.signature(overload)
        assert list(signature.parameters) == list(implementation.parameters)
        for parameter, original in zip(signature.parameters.values(), implementation.parameters.values(),
                                       strict=True):
            assert parameter.kind == original.kind
            if parameter.name not in ("ntk_test_train", "fx_test_0"):   # overloads write defaults as ...
                assert (parameter.default is inspect.Parameter.empty) == (original.default is inspect.Parameter.empty)
                assert parameter.annotation == original.annotation
    k_dd, k_td, y, _, ft0 = _problem()
    assert isinstance(predict.gradient_descent(xent, k_dd, y, t=1.0), torch.Tensor)
    assert isinstance(predict.gradient_descent(xent, k_dd, y, ntk_test_train=k_td, fx_test_0=ft0, t=1.0), tuple)


def test_fixes_from_review():
    """What a review of the first version found: the loss gets a copy of the targets (one that wrote to
    y changed the caller's), the kernel's gradient is symmetric (the squared loss's equals
    gradient_descent_mse's), diverging steps warn, and numpy integers are taken for max_steps."""
    k_dd, _, y, f0, _ = _problem()
    kept = y.clone()

    def writes_to_targets(f, target):
        target.mul_(2)
        return mse(f, target)

    predict.gradient_descent(writes_to_targets, k_dd, y, fx_train_0=f0, steps=2)
    assert torch.equal(y, kept)
    leaf = k_dd.clone().requires_grad_()
    (ours,) = torch.autograd.grad(predict.gradient_descent(mse, leaf, y, fx_train_0=f0, steps=[3, 8]).sum(), leaf)
    (closed,) = torch.autograd.grad(predict.gradient_descent_mse(leaf, y, fx_train_0=f0, steps=[3, 8]).sum(), leaf)
    assert torch.equal(ours, ours.mT)
    torch.testing.assert_close(ours, closed, rtol=1e-10, atol=1e-12)
    limit = predict.max_learning_rate(k_dd, y.numel())
    with pytest.warns(RuntimeWarning, match="diverged: the training outputs overflowed at step"):
        out = predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, steps=[2000], learning_rate=30 * limit)
    assert not bool(torch.isfinite(out).all())
    # with momentum the limit is max_learning_rate(..., momentum=β), (1 + β) times the one the warning named alone
    with pytest.warns(RuntimeWarning, match=r"max_learning_rate\(\.\.\., momentum=0\.9\), \(1 \+ momentum\) times"):
        predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, steps=[2000], momentum=0.9,
                                 learning_rate=30 * predict.max_learning_rate(k_dd, y.numel(), momentum=0.9))
    stable = predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, steps=np.int64(5), max_steps=np.int64(5))
    assert stable.shape == y.shape


def test_runs_under_a_callers_inference_mode():
    """gradient_descent differentiates the loss itself: under torch.inference_mode() autograd found no
    gradient, and the ValueError blamed a valid loss ("does not depend on f through torch operations"),
    where the same call under torch.no_grad() ran. The outputs are those outside either mode, bit for bit."""
    k_dd, k_td, y, f0, ft0 = _problem()
    one_hot = torch.nn.functional.one_hot(y.argmax(-1), 3).to(F64)
    for loss, targets, time in ((xent, one_hot, {"t": [0.5, 2.0]}), (mse, y, {"steps": [1, 4]}),
                                (xent, one_hot, {"t": 1.0, "momentum": 0.9})):
        expected = predict.gradient_descent(loss, k_dd, targets, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0,
                                            **time)
        with torch.inference_mode():
            inside = predict.gradient_descent(loss, k_dd, targets, fx_train_0=f0, ntk_test_train=k_td,
                                              fx_test_0=ft0, **time)
        for ours, reference in zip(inside, expected, strict=True):
            assert torch.equal(ours, reference)
    # leaving inference mode adds a frame: the divergence warning still names the caller's line
    limit = predict.max_learning_rate(k_dd, y.numel())
    with pytest.warns(RuntimeWarning, match="diverged") as record:
        predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, steps=[2000], learning_rate=30 * limit)
    assert record[0].filename == __file__


def test_a_loss_that_leaves_its_domain_is_named_not_called_stiff():
    """sqrt(f) is fine at the initial outputs, but descending it drives outputs to 0 (at t = 8.9 here),
    where its gradient is infinite and beyond which it is NaN: the solver cannot step on, and the error
    says the loss left its domain, not that the problem is stiff."""
    k_dd, _, y, _, _ = _problem()
    loss = lambda f, target: f.sqrt().mean() + 0 * target.sum()   # noqa: E731
    with pytest.raises(RuntimeError, match="became NaN or infinite") as info:
        predict.gradient_descent(loss, k_dd, y, fx_train_0=1.0, t=50.0, max_steps=2000)
    assert "stiff" not in str(info.value)


def test_times_a_few_ulp_apart_are_both_reached():
    """0.3 and 0.1 * 3 are one ulp apart: the step from one to the other, shortened to land on the
    requested time, was taken for a collapsed step size ("the step size fell to 5.55e-17 ... stiff").
    Both times give the squared loss's closed form to the solver's 5e-8 (as over 0 ≤ t ≤ 400 above)."""
    k_dd, k_td, y, f0, ft0 = _problem()
    times = [0.3, 0.1 * 3, 5e-324]
    flow = predict.gradient_descent(mse, k_dd, y, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0, t=times,
                                    learning_rate=0.7)
    closed = predict.gradient_descent_mse(k_dd, y, fx_train_0=f0, ntk_test_train=k_td, fx_test_0=ft0, t=times,
                                          learning_rate=0.7)
    for a, b in zip(flow, closed, strict=True):
        assert float((a - b).abs().max()) <= 5e-8
    assert float((flow[0][1] - flow[0][0]).abs().max()) <= 1e-15   # 5.6e-17 of time apart


def test_a_kernel_that_is_not_positive_semi_definite_is_refused():
    """A kernel with a negative eigenvalue (-1.8 here, λ_max 3.5) is no tangent kernel, and the
    outputs grow along it: they came back finite and meaningless (2.6e32 for the squared loss at
    t = 1000, where gradient_descent_mse refuses the kernel), for t = 1e5 only after 20 s as an
    overflow blamed on the loss. Rounding-level negative eigenvalues, which gradient_descent_mse
    accepts (up to −sqrt(ε) λ_max), and the singular kernel of _problem (rank 6 of 10) still pass."""
    k_dd, _, y, f0, _ = _problem()
    values, vectors = torch.linalg.eigh(k_dd)
    top = vectors[:, -1:] @ vectors[:, -1:].T
    bad = k_dd - 1.5 * values[-1] * top
    for time in ({"t": 1000.0}, {"t": 1.0, "momentum": 0.5}, {"steps": 3}):
        with pytest.raises(ValueError, match="not positive semi-definite"):
            predict.gradient_descent(mse, bad, y, fx_train_0=f0, **time)
    with pytest.raises(ValueError, match="not positive semi-definite"):   # the same verdict
        predict.gradient_descent_mse(bad, y, fx_train_0=f0, t=1000.0)
    full = torch.einsum("ab,ij->abij", bad, torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        predict.gradient_descent(mse, full, y, fx_train_0=f0, t=1.0)
    rounding = k_dd - 0.5 * torch.finfo(F64).eps ** 0.5 * values[-1] * vectors[:, :1] @ vectors[:, :1].T
    for kernel in (k_dd, rounding):
        flow = predict.gradient_descent(mse, kernel, y, fx_train_0=f0, t=3.0)
        closed = predict.gradient_descent_mse(kernel, y, fx_train_0=f0, t=3.0)
        assert float((flow - closed).abs().max()) <= 5e-8


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_float32_integration_of_a_stiff_kernel_keeps_its_tolerance(momentum):
    """Float32 integration over long times of an ill-conditioned kernel (depth-50 erf network, 30 points
    in d = 3: eigenvalues from 2.4e-8 λ_max) is as accurate as its tolerance. Both runs get the same
    kernel rounded to float32 (given in float64), so only the integration differs: the reference is the
    float64 solver at 1e-9 (with momentum 1.1e-8 from the solver at 1e-12, which took 3.4x as many steps,
    and 1e-4 of the error measured against it). Not gradient_descent_mse's closed form, which reads a
    float64 kernel of float32 numbers as the float32 kernel it is (``carried_dtype``) and leaves its 10
    directions below float32's rounding untrained, where the solvers train them (6.8e-3 apart).

    Before, the outputs were formed as f_0 − Θ R from a float32 R summed over hundreds of steps to
    |R| ≈ 180: its rounding moved them by about ε‖Θ‖‖R‖, 1.0e-3 (training) and 9.9e-4 (test), 80x the
    tolerance 100 ε = 1.2e-5 (momentum 0.9: 7.6e-3). Now the state is summed in float64: 4.1e-6 and
    3.7e-6 from the float64 solver (which is 7e-10 from itself at 1e-12; momentum: 9.3e-5). Bounds: 3e-5,
    2.5x the tolerance (the global error is within 2x of it on smooth losses), and with momentum, whose
    oscillations accumulate local errors to 4-15x of it (docstring; float64 at 1e-8 is 1.2e-7 off here),
    2e-4, 17x.
    """
    import ntkgp

    torch.manual_seed(0)
    x, x_test = torch.randn(30, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    y = torch.randn(30, 1, dtype=F64)
    net = ntkgp.mlp(50, "erf", 1.0, 0.1).double()
    k_dd = net.kernel(x).ntk.detach().float().double()
    k_td = net.kernel(x_test, x).ntk.detach().float().double()
    times = [1e2, 1e3]
    ref = predict.gradient_descent(mse, k_dd, y, ntk_test_train=k_td, fx_test_0=0.0, t=times,
                                   momentum=momentum, rtol=1e-9, atol=1e-9)
    low = predict.gradient_descent(mse, k_dd, y, ntk_test_train=k_td, fx_test_0=0.0, t=times, momentum=momentum,
                                   dtype=torch.float32)
    bound = 3e-5 if momentum is None else 2e-4
    for a, b in zip(low, ref, strict=True):
        assert float((a - b).abs().max()) <= bound


def _heavy_ball_closed_form(kernel, test_kernel, y, eta, beta, steps):
    """``s`` heavy-ball steps (β = 0: plain gradient descent) on ``0.5 * ((f - y) ** 2).mean()`` from
    ``f_0 = 0``, in closed form: in the eigenbasis of Θ each mode λ's residual ``a = f − y``, velocity
    ``q`` and dual sum ``R`` follow the fixed linear map ``q' = β q + (η/m) a``, ``a' = a − λ q'``,
    ``R' = R + q'``, raised to the power ``s`` (float64; β = 0 is gradient_descent_mse's
    ``(1 − ηλ/m)^s``). Returns the training outputs ``y + V a`` and test outputs ``−Θ* V R``."""
    lam, vec = torch.linalg.eigh(kernel)
    c, one, zero = eta / y.numel(), torch.ones_like(lam), torch.zeros_like(lam)
    step = torch.stack([torch.stack([1 - c * lam, -beta * lam, zero], -1),
                        torch.stack([c * one, beta * one, zero], -1),
                        torch.stack([c * one, beta * one, one], -1)], -2)            # (N, 3, 3), rows a', q', R'
    start = torch.stack([vec.T @ -y, torch.zeros_like(y), torch.zeros_like(y)], 1)   # (N, 3, k)
    train, test = [], []
    for s in steps:
        residual, _, dual = (torch.linalg.matrix_power(step, s) @ start).unbind(1)
        train.append(y + vec @ residual)
        test.append(-test_kernel @ (vec @ dual))
    return torch.stack(train), torch.stack(test)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_float32_steps_add_less_than_the_kernel_s_rounding(momentum):
    """Discrete steps in float32 on an ill-conditioned kernel (depth-50 erf network, 30 points in d = 3,
    eigenvalues from 2.4e-8 λ_max) at half the largest stable learning rate, against the float64 closed
    form on the same float32 kernel. What float32 cannot avoid is the kernel's own rounding: the closed
    form on the float64 kernel differs from that on its float32 rounding by D (training outputs 5.7e-6
    and 5.7e-5 after 1000 and 10 000 steps, test outputs 6.8e-6 and 7.0e-5; momentum 0.9: 1.1e-4 and
    8.6e-4, 1.3e-4 and 1.4e-3). The integration must stay well inside that, at a third of D.

    Before, the outputs were formed as f_0 − Θ R from a float32 R, whose product's rounding ε‖Θ‖‖R‖ grew
    with R, linearly in the step count: the training outputs 4.1x and 4.4x D off (momentum 4.2x, 3.9x),
    the test outputs 0.33x and 0.36x (1.3x, 0.42x). Now the state is summed in float64 and the training
    outputs are carried along with it, as in the ODE path: 0.11x and 0.06x (momentum 0.11x, 0.04x), test
    outputs within 0.006x. Over seeds 0-3 at most 0.15x D, before at least 3.2x (training outputs).
    """
    import ntkgp

    torch.manual_seed(0)
    x, x_test = torch.randn(30, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    y = torch.randn(30, 1).double()   # float32 targets, exact in float64
    net = ntkgp.mlp(50, "erf", 1.0, 0.1).double()
    k_dd, k_td = net.kernel(x).ntk.detach(), net.kernel(x_test, x).ntk.detach()
    low_dd, low_td = k_dd.float(), k_td.float()
    eta = 0.5 * predict.max_learning_rate(low_dd, y.numel(), momentum=momentum or 0.0)
    steps = [1000, 10_000]
    exact = _heavy_ball_closed_form(k_dd, k_td, y, eta, momentum or 0.0, steps)
    rounded = _heavy_ball_closed_form(low_dd.double(), low_td.double(), y, eta, momentum or 0.0, steps)
    if momentum is None:   # the closed form is gradient_descent_mse's (to its 1e-12 rounding), on the float64
        # kernel: given its float32 rounding, gradient_descent_mse reads it as float32 (carried_dtype) and leaves
        # the directions below float32's rounding untrained, where the float32 steps below train them
        closed = predict.gradient_descent_mse(k_dd, y, ntk_test_train=k_td, fx_test_0=0.0, steps=steps,
                                              learning_rate=eta)
        for a, b in zip(closed, exact, strict=True):
            assert float((a - b).abs().max()) <= 1e-10
    low = predict.gradient_descent(mse, low_dd, y.float(), ntk_test_train=low_td, fx_test_0=0.0, steps=steps,
                                   learning_rate=eta, momentum=momentum, max_steps=10_000, dtype=torch.float32)
    for ours, reference, unavoidable in zip(low, rounded, exact, strict=True):
        assert ours.dtype == torch.float32
        for i in range(len(steps)):
            kernel_rounding = float((unavoidable[i] - reference[i]).abs().max())
            assert float((ours[i].double() - reference[i]).abs().max()) <= kernel_rounding / 3


def test_test_outputs_warn_where_float32_kernel_rounding_moves_them():
    """A float32 kernel's rounding moves gradient_descent's test outputs as it moves
    gradient_descent_mse's (through the dual coefficients R, by about 2 ε max(d) ‖d ∘ R‖), and the
    same 1 % warning (warn_if_imprecise) now says so; before, nothing did. Depth-50 erf network,
    (σ_w², σ_b²) = (1.76, 1), 30 points in d = 3, centred targets, t = 100, squared loss: the kernel is
    nearly constant, so with the constant mode out of the targets the outputs come from modes 1e-6 of
    λ_max, which its float32 rounding moves: the float32 NTK puts the test outputs 2.9e-5 off those of
    the float64 NTK (19 % of their size 1.5e-4; the estimate reads 27 %). Uncentred targets show the same
    only after long training (2 % at t = 1e4, through R growing like t, but 24 000 solver steps: 20-40 s).
    Ordinary float32 use (a two-layer ReLU network on 50 points, t up to 1e3) stays quiet (the estimate
    4e-5, as at t = 1e4 and beyond: the slowest mode is two-thirds trained at t = 1e3) and within 2e-5 of
    float64 to the solver's tolerance (measured up to 2.1e-5, 1.5x of atol + rtol |f|,
    rtol = atol = 1.2e-5; the documented 2x of smooth losses is the bound; the kernel is the same in both runs)."""
    import warnings

    import ntkgp

    torch.manual_seed(0)
    x, x_test, y = torch.randn(30, 3), torch.randn(5, 3), torch.randn(30, 1)
    y = y - y.mean()
    net = ntkgp.mlp(50, "erf", 1.76, 1.0)
    k_dd, k_td = net.kernel(x).ntk.detach(), net.kernel(x_test, x).ntk.detach()
    with pytest.warns(RuntimeWarning, match="kernels' last digits"):
        _, test = predict.gradient_descent(mse, k_dd, y, ntk_test_train=k_td, fx_test_0=0.0, t=1e2)
    net64 = net.double()
    _, exact = predict.gradient_descent_mse(net64.kernel(x.double()).ntk.detach(), y.double(),
                                            ntk_test_train=net64.kernel(x_test.double(), x.double()).ntk.detach(),
                                            fx_test_0=0.0, t=1e2)
    # the warning is about a real error: within the estimate's 3.3x of 1 % (numerics.md)
    assert float((test.double() - exact).abs().max()) >= 0.01 / 3.3 * float(exact.abs().max())

    x, x_test, y = torch.randn(50, 3), torch.randn(10, 3), torch.randn(50, 1)
    relu = ntkgp.mlp(2, "relu")
    k_dd, k_td = relu.kernel(x).ntk.detach(), relu.kernel(x_test, x).ntk.detach()
    times = [1.0, 1e2, 1e3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = predict.gradient_descent(mse, k_dd, y, ntk_test_train=k_td, fx_test_0=0.0, t=times,
                                       dtype=torch.float32)
    ref = predict.gradient_descent_mse(k_dd.double(), y.double(), ntk_test_train=k_td.double(), fx_test_0=0.0,
                                       t=times)
    # the solver's documented accuracy: within 2x of its tolerance atol + rtol |f| (rtol = atol = 100 ε
    # in float32) for smooth losses; measured 1.5x of it
    tolerance = 100 * torch.finfo(torch.float32).eps
    for a, b in zip(low, ref, strict=True):
        assert bool(((a.double() - b).abs() <= 2 * tolerance * (1 + b.abs())).all())


def test_float64_heavy_ball_steps_keep_the_outputs_and_r_together():
    """A float64 kernel's steps form f = f_0 − Θ R from R, whose rounding then feeds back through the loss:
    carrying f along separately (f ← f − Θ p) let it and R drift apart, and the test outputs, which read R,
    were 1.1e-11 off the closed form after 10 000 heavy-ball steps (β = 0.9) of a two-layer ReLU network's
    NTK on 50 points; 1.8e-14 from R (float64 sums of 10 000 steps: a bound of 1e-12 is 50x that)."""
    import ntkgp

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64, generator=gen)
    xt = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(50, 1, dtype=torch.float64, generator=gen)
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    with torch.no_grad():
        k_dd, k_td = net.kernel(x).ntk, net.kernel(xt, x).ntk
    eta = 0.5 * predict.max_learning_rate(k_dd, y.numel(), momentum=0.9)
    train, test = predict.gradient_descent(lambda f, target: 0.5 * ((f - target) ** 2).mean(), k_dd, y,
                                           ntk_test_train=k_td, fx_test_0=0.0, steps=[10_000], learning_rate=eta,
                                           momentum=0.9)
    exact_train, exact_test = _heavy_ball_closed_form(k_dd, k_td, y, eta, 0.9, [10_000])
    for got, want in ((train, exact_train), (test, exact_test)):
        assert float((got - want).abs().max()) < 1e-12 * float(want.abs().max())
