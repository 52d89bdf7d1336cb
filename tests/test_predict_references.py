"""Prediction formulas against independent references where the other test files did not look
(found by mutation testing): the covariance on the autograd path, gradients with respect to targets
and kernels, the reported scale, exact-contraction steps, null and slightly negative eigenvalues, and
the Cholesky rank threshold. Each reference is written out densely (matrix_exp, solve, power series,
Van Loan blocks), never a snapshot of ntkgp's output."""

from __future__ import annotations

import math

import pytest
import torch

import ntkgp
from ntkgp import predict

DT = torch.float64
EPS = torch.finfo(DT).eps


# The NTK flow's covariance when t requires grad (the autograd path of _per_time) against the dense
# formula of Lee et al. 2019, eq. 16, written out with torch.linalg.matrix_exp, and its t-derivative
# against a central finite difference.


def _x(n, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _dense_ntk_covariance(net, x, xt, tau):
    """Σ_t = K** + Θ*d Θ⁻¹(I − e^{−Θτ}) K (I − e^{−Θτ})Θ⁻¹ Θd* − (Θ*d Θ⁻¹(I − e^{−Θτ}) Kd* + h.c.)."""
    with torch.no_grad():
        k_all = net.kernel(torch.cat([x, xt]))
    n = x.shape[0]
    theta, k = k_all.ntk[:n, :n], k_all.nngp[:n, :n]
    theta_td, k_td, k_tt = k_all.ntk[n:, :n], k_all.nngp[n:, :n], k_all.nngp[n:, n:]
    growth = torch.eye(n, dtype=DT) - torch.linalg.matrix_exp(-theta * tau)
    t_op = theta_td @ torch.linalg.solve(theta, growth)            # Θ*d Θ⁻¹ (I − e^{−Θτ})
    cross = t_op @ k_td.mT
    return k_tt + t_op @ k @ t_op.mT - cross - cross.mT


def test_ntk_covariance_with_t_requiring_grad_is_the_dense_formula():
    net = ntkgp.mlp(2, "erf", 1.7, 0.1)
    x, y, xt = _x(5), _x(5, 1, seed=2)[:, 0], _x(4, seed=3)
    lr, t0 = 0.7, 2.0
    flow = predict.GradientFlow(net, x, y, kernel="ntk", learning_rate=lr)
    t = torch.tensor(t0, dtype=DT, requires_grad=True)
    cov = flow.predict(xt, t=t).covariance
    expected = _dense_ntk_covariance(net, x, xt, lr * t0 / y.numel())
    # every term is O(1) (prior variances ~1): 1e-9 leaves room for eigh vs matrix_exp rounding (~1e-13)
    torch.testing.assert_close(cov.detach(), expected, rtol=1e-9, atol=1e-10)
    # the same as the path without autograd
    torch.testing.assert_close(cov.detach(), flow.predict(xt, t=t0).covariance, rtol=1e-12, atol=1e-12)
    # d trace(Σ W)/dt (W a fixed non-symmetric weight) against a central difference of the dense formula
    w = torch.arange(16, dtype=DT).reshape(4, 4) / 16
    (grad,) = torch.autograd.grad((cov * w).sum(), t)
    h = 1e-4
    fd = ((_dense_ntk_covariance(net, x, xt, lr * (t0 + h) / 5)
           - _dense_ntk_covariance(net, x, xt, lr * (t0 - h) / 5)) * w).sum() / (2 * h)
    # central difference error ~h² f''' ~1e-8
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


# Gradients of gradient_descent_mse's outputs with respect to the targets y_train and the initial
# outputs fx_train_0. The outputs are linear in both: f_t(X) = Y + e^{−Θτ}(f_0 − Y) and
# f_t(x*) = f_0(x*) − Θ*d Θ⁻¹(I − e^{−Θτ})(f_0 − Y), so the gradients of wᵀ f are explicit matrices
# (written out with torch.linalg.matrix_exp and solve), at continuous times and after discrete steps.


@pytest.mark.parametrize("discrete", [False, True])
def test_target_and_initial_output_gradients_are_the_dense_operators(discrete):
    g = torch.Generator().manual_seed(4)
    n, mt = 5, 3
    a = torch.randn(n, n, generator=g, dtype=DT)
    theta = a @ a.mT / n + 0.3 * torch.eye(n, dtype=DT)
    theta = (theta + theta.mT) / 2
    cross = torch.randn(mt, n, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    f0 = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    w_train, w_test = torch.randn(n, generator=g, dtype=DT), torch.randn(mt, generator=g, dtype=DT)
    lr = 0.8
    eye = torch.eye(n, dtype=DT)
    if discrete:
        steps = 7
        decay = torch.linalg.matrix_power(eye - lr / n * theta, steps)
        kwargs = {"steps": steps}
    else:
        t = 3.0
        decay = torch.linalg.matrix_exp(-theta * lr * t / n)
        kwargs = {"t": t}
    train, test = predict.gradient_descent_mse(theta, y, fx_train_0=f0, ntk_test_train=cross, fx_test_0=0.0,
                                               learning_rate=lr, **kwargs)
    gy, gf0 = torch.autograd.grad((train * w_train).sum() + (test * w_test).sum(), [y, f0])
    op = cross @ torch.linalg.solve(theta, eye - decay)             # Θ*d Θ⁻¹ (I − decay)
    # d/dY: (I − decay)ᵀ w_train + opᵀ w_test;  d/df_0: decayᵀ w_train − opᵀ w_test
    ref_y = (eye - decay).mT @ w_train + op.mT @ w_test
    ref_f0 = decay.mT @ w_train - op.mT @ w_test
    # O(1) operators from a 5×5 eigendecomposition vs matrix_exp/solve: rounding ~1e-14
    torch.testing.assert_close(gy, ref_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gf0, ref_f0, rtol=1e-10, atol=1e-12)


# Gaussian.scale is documented as "the largest prior variance the covariance was computed from
# (max diag K**, or of the training kernel for training-set outputs)". With test points of much larger
# norm than the training points (a ReLU network's NNGP variance grows with the squared input norm) the two differ,
# and the scale must be that of K** at the test points (computed here directly from net.kernel), for the
# full covariance and for compute_cov="diag", at finite and infinite times.


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_scale_of_test_predictions_is_max_diag_of_test_prior(kernel):
    g = torch.Generator().manual_seed(5)
    net = ntkgp.mlp(2, "relu", 1.7, 0.1)
    x = 0.1 * torch.randn(6, 2, generator=g, dtype=DT)
    y = torch.randn(6, generator=g, dtype=DT)
    xt = 10.0 * torch.randn(3, 2, generator=g, dtype=DT)
    with torch.no_grad():
        test_scale = float(net.kernel(xt, ntk=False).nngp.diagonal().max())
        train_scale = float(net.kernel(x, ntk=False).nngp.diagonal().max())
    assert test_scale > 2 * train_scale          # the two candidates are far apart
    flow = predict.GradientFlow(net, x, y, kernel=kernel, learning_rate=0.5)
    for when in ({"t": 1.0}, {"t": None}, {"steps": 4}):
        for mode in (True, "diag"):
            out = flow.predict(xt, compute_cov=mode, **when)
            assert out.scale == pytest.approx(test_scale, rel=1e-12)
        # training-set outputs: the training kernel's
        assert flow.predict(None, **when).scale == pytest.approx(train_scale, rel=1e-12)


# Discrete gradient descent at a learning rate where ηλ/m = 1 for an eigenvalue (one step to the
# target along it): step 0 is the initial output, later steps follow (I − ηΘ/m)^s exactly
# (torch.linalg.matrix_power), with no NaN from 0 · log(0).


def test_step_zero_and_later_steps_at_unit_contraction():
    theta = torch.tensor([[3.0, 1.0], [1.0, 3.0]], dtype=DT)      # eigenvalues 2 and 4
    y = torch.tensor([1.0, -0.5], dtype=DT)
    f0 = torch.tensor([0.25, 0.75], dtype=DT)
    cross = torch.tensor([[0.5, 1.5]], dtype=DT)
    m = 2
    lr = m / 4.0                                                   # ηλ_max/m = 1 exactly (0.5 and 4 exact)
    steps = torch.tensor([0, 1, 2, 5])
    train, test = predict.gradient_descent_mse(theta, y, fx_train_0=f0, ntk_test_train=cross,
                                               fx_test_0=torch.zeros(1, dtype=DT), steps=steps, learning_rate=lr)
    eye = torch.eye(2, dtype=DT)
    for i, s in enumerate(steps.tolist()):
        decay = torch.linalg.matrix_power(eye - lr / m * theta, s)
        ref_train = y + decay @ (f0 - y)
        ref_test = -cross @ torch.linalg.solve(theta, eye - decay) @ (f0 - y)
        # exact binary fractions throughout: rounding ~1e-16
        torch.testing.assert_close(train[i], ref_train, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(test[i], ref_test, rtol=1e-12, atol=1e-12)


# The gradient of gradient_descent_mse's outputs with respect to a leaf training kernel follows
# torch.linalg.eigh's convention for a symmetric argument: a symmetric matrix, equal to autograd through
# the dense eigendecomposition formula of the same outputs (an independent derivation), agreeing with a
# central finite difference along symmetric perturbations, and the same whether or not create_graph is
# set (the create_graph path differentiates through eigh).


def _setup():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 5, generator=g, dtype=DT)
    theta = a @ a.mT + 0.5 * torch.eye(5, dtype=DT)
    theta = (theta + theta.mT) / 2
    y = torch.randn(5, generator=g, dtype=DT)
    cross = torch.randn(3, 5, generator=g, dtype=DT)
    w_train = torch.randn(5, generator=g, dtype=DT)
    w_test = torch.randn(3, generator=g, dtype=DT)
    return theta, y, cross, w_train, w_test


def _loss_ntkgp(theta, y, cross, w_train, w_test, t):
    train, test = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0,
                                               t=t, learning_rate=1.0)
    return (train * w_train).sum() + (test * w_test).sum()


def _loss_dense(theta, y, cross, w_train, w_test, t):
    """f_t(X) = Y − e^{−Θτ} Y, f_t(x*) = Θ*d Θ⁻¹ (I − e^{−Θτ}) Y (f_0 = 0), τ = t/m, through eigh."""
    lam, v = torch.linalg.eigh(theta)
    tau = t / y.numel()
    growth = -torch.expm1(-lam * tau)
    train = v @ (growth * (v.mT @ y))
    test = cross @ (v @ (growth / lam * (v.mT @ y)))
    return (train * w_train).sum() + (test * w_test).sum()


def test_leaf_kernel_gradient_is_symmetric_and_matches_eigh_autograd():
    theta, y, cross, w_train, w_test = _setup()
    t = 2.5
    leaf = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_loss_ntkgp(leaf, y, cross, w_train, w_test, t), leaf)
    leaf2 = theta.clone().requires_grad_()
    (ref,) = torch.autograd.grad(_loss_dense(leaf2, y, cross, w_train, w_test, t), leaf2)
    # eigenvalues well separated (random 5×5): eigh's backward is accurate to ~1e-14 here
    torch.testing.assert_close(grad, grad.mT, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11)
    # create_graph (the differentiable backward, through eigh) gives the same first derivative
    leaf3 = theta.clone().requires_grad_()
    (grad_cg,) = torch.autograd.grad(_loss_ntkgp(leaf3, y, cross, w_train, w_test, t), leaf3, create_graph=True)
    torch.testing.assert_close(grad_cg.detach(), grad, rtol=1e-9, atol=1e-11)
    # central differences along symmetric perturbations E_ij + E_ji (E_ii): <G, E> = G_ij + G_ji
    h = 1e-5
    for i, j in [(0, 0), (1, 3), (2, 4)]:
        e = torch.zeros(5, 5, dtype=DT)
        e[i, j] = e[j, i] = 1.0
        with torch.no_grad():
            fd = (_loss_ntkgp(theta + h * e, y, cross, w_train, w_test, t)
                  - _loss_ntkgp(theta - h * e, y, cross, w_train, w_test, t)) / (2 * h)
        # truncation ~h² ≈ 1e-10 relative to O(1) third derivatives, rounding ~ε/h ≈ 2e-11
        torch.testing.assert_close((grad * e).sum(), fd, rtol=1e-7, atol=1e-8)


# Gradient of the test outputs of gradient_descent_mse with respect to the training kernel at a tiny
# time (τ λ_max ~ 1e-9), where f_t(Θ) = Θ⁻¹(I − e^{−Θτ}) = Σ_k τ (−τΘ)^k/(k+1)! and the divided differences
# (f(λ_i) − f(λ_j))/(λ_i − λ_j) of Daleckii–Krein cancel catastrophically (their numerators are ~τ²Δλ
# next to rounding of ~ε τ). Reference: the exact gradient of the truncated power series, written out
# (d tr(A Θ^k) = Σ_{a+b=k−1} tr(A Θ^a dΘ Θ^b)), symmetrized as torch.linalg.eigh's convention.


def test_kernel_gradient_of_test_outputs_at_tiny_time_matches_the_power_series():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(5, 5, generator=g, dtype=DT)
    theta = a @ a.mT / 5 + 0.2 * torch.eye(5, dtype=DT)
    theta = (theta + theta.mT) / 2
    y = torch.randn(5, generator=g, dtype=DT)
    cross = torch.randn(3, 5, generator=g, dtype=DT)
    w = torch.randn(3, generator=g, dtype=DT)
    lam_max = float(torch.linalg.eigvalsh(theta)[-1])
    m, lr = 5, 1.0
    tau = 1e-9 / lam_max
    t = tau * m / lr
    leaf = theta.clone().requires_grad_()
    _, test = predict.gradient_descent_mse(leaf, y, fx_train_0=0.0, ntk_test_train=cross, fx_test_0=0.0,
                                           t=t, learning_rate=lr)
    # f_0 = 0: f_t(x*) = Θ*d F(Θ) Y, loss = wᵀ f_t(x*) = tr(A F(Θ)), A = Y wᵀ Θ*d
    (grad,) = torch.autograd.grad((test * w).sum(), leaf)
    big_a = y.unsqueeze(-1) @ (w.unsqueeze(0) @ cross)                     # (N, N)
    ref = torch.zeros(5, 5, dtype=DT)
    powers = [torch.linalg.matrix_power(theta, k) for k in range(5)]
    for k in range(1, 5):                                                  # terms beyond k = 4: ~(τλ)^4 relative
        c = tau * (-tau) ** k / math.factorial(k + 1)
        for p in range(k):
            ref += c * powers[p] @ big_a.mT @ powers[k - 1 - p]
    ref = (ref + ref.mT) / 2
    scale = float(ref.abs().max())                                         # ~τ²: 1e-18 here
    assert scale > 0
    # leading term exact to ~(τλ)² relative; rounding of the averaged slopes ~1e-15 relative
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-8 * scale)


# A training kernel that is positive semi-definite up to a small negative eigenvalue (allowed: above
# −sqrt(ε)·λ_max, e.g. an empirical kernel with more points than parameters) counts as clipped at 0: its
# null direction never moves (Eigensystem clips λ at 0). Limit identity: once every positive
# eigen-direction has converged (λ τ ≫ 1), f_t(X) = Y + u uᵀ (f_0 − Y) for the null vector u, and it
# agrees with the dense matrix_exp formula on the PSD kernel. The time is kept below the point where the
# direction is declared untrained (τ · N ε λ_max < sqrt(ε)), so the clipping alone is tested.


def _problem():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 3, generator=g, dtype=DT)
    theta = a @ a.mT
    theta = (theta + theta.mT) / 2                         # PSD, rank 3
    values, vectors = torch.linalg.eigh(theta)
    u = vectors[:, :1]                                     # null vector (λ ~ 1e-16 λ_max)
    lam_max = float(values[-1])
    delta = 1e-8 * lam_max                                 # within the accepted −sqrt(ε) λ_max ≈ −1.5e-8 λ_max
    indefinite = theta - delta * (u @ u.mT)
    indefinite = (indefinite + indefinite.mT) / 2
    y = torch.randn(4, generator=g, dtype=DT)
    f0 = torch.randn(4, generator=g, dtype=DT)
    return theta, indefinite, u, lam_max, y, f0, float(values[1])


@pytest.mark.parametrize("discrete", [False, True])
def test_negative_rounding_eigenvalue_does_not_move_its_direction(discrete):
    theta, indefinite, u, lam_max, y, f0, lam_min_pos = _problem()
    m = y.numel()
    tau = 1e7 / lam_max                  # τ N ε λ_max = 4·2.2e-16·1e7 ≈ 9e-9 < sqrt(ε) ≈ 1.5e-8: not "late"
    assert lam_min_pos * tau > 1e3       # every positive direction has converged (e^{-1000} = 0)
    if discrete:
        lr = 0.5 * m / lam_max           # stable: ηλ/m ≤ 0.5
        kwargs = {"steps": round(tau * m / lr), "learning_rate": lr}
    else:
        kwargs = {"t": tau * m, "learning_rate": 1.0}
    out = predict.gradient_descent_mse(indefinite, y, fx_train_0=f0, **kwargs)
    expected = y + (u @ (u.mT @ (f0 - y).unsqueeze(-1))).squeeze(-1)
    dense = y + torch.linalg.matrix_exp(-theta * tau) @ (f0 - y)     # the PSD kernel's dynamics
    # both references agree to rounding of λ τ-sized exponents (~1e-9 relative); the clipping
    # matters at the 1e-1 level (e^{δτ} − 1 = e^{0.1} − 1 for a negative eigenvalue −δ left in)
    torch.testing.assert_close(expected, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


# t=None (Cholesky) refuses a training kernel whose smallest eigenvalue, scaled to unit diagonal, is
# below numpy's rank threshold N·ε (spectral.cholesky's documented criterion), also where it is well
# above ε: solving with it would amplify rounding by ~1/(N ε). The scaled smallest eigenvalue is
# measured independently with torch.linalg.eigvalsh as a precondition; a kernel just above the threshold
# (100 N ε) is accepted.


def _kernel(n, smallest, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    values = torch.linspace(0.5, 2.0, n, dtype=DT)
    values[0] = smallest
    k = q @ torch.diag(values) @ q.mT
    return (k + k.mT) / 2


def _scaled_smallest(k):
    d = k.diagonal().rsqrt()
    return float(torch.linalg.eigvalsh(d.unsqueeze(-1) * k * d)[0])


def test_kernel_below_n_eps_is_refused_and_above_is_accepted():
    n = 32
    y = torch.linspace(-1, 1, n, dtype=DT)
    below = _kernel(n, 8 * EPS)
    lam = _scaled_smallest(below)
    assert 2 * EPS < lam < n * EPS / 2, lam        # between ε and N ε, away from both (rounding ~ few ε)
    with pytest.raises(ValueError, match="singular"):
        predict.gradient_descent_mse(below, y, fx_train_0=0.0, t=None)
    above = _kernel(n, 100 * n * EPS)
    assert _scaled_smallest(above) > 10 * n * EPS
    out = predict.gradient_descent_mse(above, y, fx_train_0=0.0, t=None)
    torch.testing.assert_close(out, y)


# At finite times an exactly zero eigenvalue of the training kernel takes the flow's limit τ
# (spectral.py: "flow takes its limit (τ, or s η/m) where λ = 0"), not 0: test outputs whose kernel row
# has a component along that direction move by τ · Θ*d u uᵀ (f_0 − Y) while it is not yet "late".
# Reference: f_t(x*) = f_0(x*) − Θ*d ∫₀^τ e^{−Θu} du (f_0 − Y), the integral as the upper right block of
# exp([[−Θτ, τI], [0, 0]]) (Van Loan 1978), which needs no Θ⁻¹; for s steps a Σ_{j<s} (I − aΘ)^j.


@pytest.mark.parametrize("discrete", [False, True])
def test_exact_null_direction_flows_linearly_at_finite_time(discrete):
    theta = torch.diag(torch.tensor([2.0, 0.0], dtype=DT))       # eigenvalues exactly 2 and 0
    y = torch.tensor([1.0, -1.0], dtype=DT)
    f0 = torch.tensor([0.25, 0.5], dtype=DT)
    cross = torch.tensor([[0.5, 0.5]], dtype=DT)                  # a row along both directions
    f0_test = torch.tensor([0.1], dtype=DT)
    lr, m, n = 0.6, 2, 2
    if discrete:
        steps = 3
        a = lr / m
        integral = sum(torch.linalg.matrix_power(torch.eye(n, dtype=DT) - a * theta, j) for j in range(steps)) * a
        kwargs = {"steps": steps}
    else:
        t = 1.5
        tau = lr * t / m
        block = torch.zeros(2 * n, 2 * n, dtype=DT)
        block[:n, :n], block[:n, n:] = -tau * theta, tau * torch.eye(n, dtype=DT)
        integral = torch.linalg.matrix_exp(block)[:n, n:]
        kwargs = {"t": t}
    expected = f0_test - cross @ integral @ (f0 - y)
    _, test = predict.gradient_descent_mse(theta, y, fx_train_0=f0, ntk_test_train=cross, fx_test_0=f0_test,
                                           learning_rate=lr, **kwargs)
    # O(1) quantities from a 4×4 matrix_exp / 3 matrix powers: rounding ~1e-15
    torch.testing.assert_close(test, expected, rtol=1e-12, atol=1e-12)
