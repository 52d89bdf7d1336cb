"""The exercises of the lecture notes (shared/lecture/ntk-lecture.md) as tests."""

from __future__ import annotations

import math

import pytest
import torch

import ntkgp
from ntkgp import predict
from ntkgp.finite import empirical_ntk

pytestmark = pytest.mark.usefixtures("float64_default")


def test_tangent_kernel_of_linear_regression_is_x_dot_x_plus_one():
    """f(w, b, x) = wᵀx + b  ⇒  Θ(x, x') = xᵀx' + 1, at any (w, b)."""
    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    expected = x1 @ x2.T + 1
    for seed in (0, 1):  # any parameter values
        model = ntkgp.Dense(1, weight_var=1.7, bias_var=0.3, parameterization="standard").build(4, seed=seed)
        torch.testing.assert_close(empirical_ntk(model, x1, x2), expected)
    # the infinite-width standard-parameterization NTK of one Dense layer is the same kernel
    analytic = ntkgp.Dense(1, 1.7, 0.3, "standard").kernel(x1, x2).ntk.detach()
    torch.testing.assert_close(analytic, expected)


def test_tangent_kernel_of_the_sine_toy_model():
    """f(W, x) = A sin(kx): Θ(x, x') = sin(kx) sin(kx') + A² x x' cos(kx) cos(kx')."""

    def f(params, x):
        return params["A"] * torch.sin(params["k"] * x[:, 0])

    A, k = torch.tensor(1.3), torch.tensor(0.7)
    x = torch.tensor([[1.0], [2.0]])  # the lecture's dataset {(1, 1), (2, 0)}
    theta = empirical_ntk(f, x, params={"A": A, "k": k})
    s, c, xs = torch.sin(k * x[:, 0]), torch.cos(k * x[:, 0]), x[:, 0]
    expected = torch.outer(s, s) + A**2 * torch.outer(xs * c, xs * c)
    torch.testing.assert_close(theta, expected)


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("act", ["relu", "erf", "gelu", "abs", "sin", "tanh"])
def test_every_tangent_kernel_is_positive_semidefinite(param, act):
    torch.manual_seed(0)
    x = torch.randn(12, 3)
    x[3] = x[7]  # a duplicate makes the kernel singular, still PSD
    net = ntkgp.mlp(2, act, 1.6, 0.1, width=32, out_dim=2, parameterization=param)
    with torch.no_grad():
        analytic = net.kernel(x).ntk
    empirical = empirical_ntk(net.build(in_features=3, seed=1), x, vector_output=True)
    # the full (n·k × n·k) empirical kernel of the vector-valued network
    full = empirical.permute(0, 2, 1, 3).reshape(24, 24)
    for mat in (analytic, full):
        eig = torch.linalg.eigvalsh(mat)
        assert float(eig.min()) >= -1e-10 * float(eig.max())


def test_kernel_depends_on_norms_and_angle_only():
    """Σ^l(x, x') is invariant under a rotation of both inputs."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    net = ntkgp.mlp(3, "relu", 2.0, None)
    with torch.no_grad():
        a, b = net.kernel(x), net.kernel(x @ q)
    torch.testing.assert_close(a.nngp, b.nngp)
    torch.testing.assert_close(a.ntk, b.ntk)


def test_infinite_width_ntk_is_block_diagonal_in_outputs():
    """Θ_ij → δ_ij Θ: the off-diagonal output blocks of the empirical NTK shrink as 1/sqrt(width)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    ratios = []
    for width in (64, 4096):
        net = ntkgp.mlp(1, "erf", 1.5, 0.1, width=width, out_dim=2)
        theta = empirical_ntk(net.build(in_features=3, seed=0, ensemble_size=16), x, vector_output=True)
        off = theta[..., 0, 1].flatten(1).norm(dim=1)
        on = theta.diagonal(dim1=-2, dim2=-1).flatten(1).norm(dim=1)
        ratios.append(float((off / on).mean()))
    assert ratios[1] < ratios[0] / 4  # 1/sqrt(width) predicts a factor 8
    assert math.isfinite(ratios[1])


def test_vector_outputs_with_a_summed_loss_train_through_the_full_tangent_kernel():
    """Exercise "for vector-valued f = (f_i), if L(f) = Σ_i L(f_i), then df_i/dt = −(1/M) Σ_a Θ_ij(x, x_a)
    ∇l(f_j(x_a), y_a)", with Θ_ij from empirical_ntk(..., vector_output=True).

    (1) Instantaneous velocity under parameter gradient flow dW/dt = −∇_W L, for a convex non-quadratic
    l(ŷ, y) = log cosh(ŷ − y) (∇l = tanh), at training and test inputs: df/dt = J·(−∇_W L) by a JVP.
    Both sides are the same chain rule summed in a different order over ~400 parameters: rounding
    ~1e-15, asserted to rtol 1e-10. At width 8 the off-diagonal blocks Θ_{i≠j} are not small; dropping
    them is asserted to be off by > 1%, so the test sees the coupling.
    (2) Quadratic loss (library convention ½ Σ (f − y)²/m, m = N·k): the first-order Taylor expansion of
    the network trained for s steps of GD equals gradient_descent_mse with the full (N, N, k, k) kernel,
    (I − ηΘ/m)^s: exact linear algebra, 1e-10 absolute (outputs O(1), 40 steps of rounding)."""
    net = ntkgp.mlp(2, "erf", 1.6, 0.1, width=8, out_dim=3)
    model = net.build(in_features=4, seed=0)
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.randn(5, 3, generator=g)
    names, params0 = zip(*[(n, p.detach().clone()) for n, p in model.named_parameters()], strict=True)

    def f(params, inputs):
        return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (inputs,))

    m_points = x.shape[0]

    def loss(p):
        return torch.log(torch.cosh(f(p, x) - y)).sum() / m_points

    grad = torch.func.grad(loss)(params0)
    direction = tuple(-gr for gr in grad)
    x_all = torch.cat([x, xt])
    _, velocity = torch.func.jvp(lambda p: f(p, x_all), (params0,), (direction,))
    theta = empirical_ntk(model, x_all, x, vector_output=True)               # (8, 5, 3, 3)
    with torch.no_grad():
        dl = torch.tanh(model(x) - y)                                          # ∇_ŷ l at the training points
    expected = -torch.einsum("xaij,aj->xi", theta, dl) / m_points
    torch.testing.assert_close(velocity, expected, rtol=1e-10, atol=1e-12)
    diag_only = -torch.einsum("xaii,ai->xi", theta, dl) / m_points
    assert float((diag_only - velocity).norm() / velocity.norm()) > 1e-2

    # (2) quadratic loss: the linear model in parameters, trained by GD, is linear in output space
    def f_lin(params, inputs):
        delta = tuple(p - p0 for p, p0 in zip(params, params0, strict=True))
        out, tangent = torch.func.jvp(lambda p: f(p, inputs), (params0,), (delta,))
        return out + tangent

    lr, steps = 0.4, 40

    def quad(p):
        return 0.5 * ((f_lin(p, x) - y) ** 2).sum() / y.numel()

    params = params0
    for _ in range(steps):
        grads = torch.func.grad(quad)(params)
        params = tuple(p - lr * gr for p, gr in zip(params, grads, strict=True))
    with torch.no_grad():
        f0, ft0 = model(x), model(xt)
    train, test = predict.gradient_descent_mse(theta[:5], y, fx_train_0=f0, ntk_test_train=theta[5:], fx_test_0=ft0,
                                               steps=steps, learning_rate=lr)
    torch.testing.assert_close(f_lin(params, x).detach(), train, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_lin(params, xt).detach(), test, rtol=0, atol=1e-10)
    assert float((train - f0).norm()) > 0.1   # the outputs moved: the check is not trivial


def test_loss_changes_as_minus_gradient_kernel_gradient_for_a_parametric_model():
    """Exercise "for a parametric model f trained on {(x_a, y_a)}, show that dL/dt = −(1/M²) Σ_ab
    ∇l(f_a, y_a) Θ(x_a, x_b) ∇l(f_b, y_b)", under parameter gradient flow dW/dt = −∇_W L.

    A finite ReLU network, convex non-quadratic l (logistic loss on ±1 labels, ∇l = −y σ(−y ŷ)), Θ from
    empirical_ntk. dL/dt is computed without Θ, as the directional derivative of L along −∇_W L (a JVP,
    exact to rounding). Same sum in a different order: rtol 1e-10 (rounding ~1e-15); a 1% error in Θ
    fails it. Checked in both parameterizations and for an ensemble of two members."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g)
    y = torch.sign(torch.randn(7, generator=g))
    m_points = x.shape[0]
    for param in ("ntk", "standard"):
        model = ntkgp.mlp(2, "relu", 2.0, 0.1, width=16, parameterization=param).build(in_features=3, seed=3)
        names, params0 = zip(*[(n, p.detach().clone()) for n, p in model.named_parameters()], strict=True)

        def loss(p, model=model, names=names):
            out = torch.func.functional_call(model, dict(zip(names, p, strict=True)), (x,))[:, 0]
            return torch.nn.functional.softplus(-y * out).sum() / m_points

        direction = tuple(-gr for gr in torch.func.grad(loss)(params0))
        _, dl_dt = torch.func.jvp(loss, (params0,), (direction,))
        with torch.no_grad():
            out = model(x)[:, 0]
        dl = -y * torch.sigmoid(-y * out)
        theta = empirical_ntk(model, x)
        expected = -(dl @ theta @ dl) / m_points**2
        assert float(dl_dt) < 0
        torch.testing.assert_close(dl_dt, expected, rtol=1e-10, atol=0)


def test_loss_gradient_in_output_space_is_in_the_tangent_kernel_null_space_at_a_spurious_minimum():
    """Exercise "if l(ŷ, y) is convex, then TK has a non-trivial null space at all spurious minima of
    L(W)": at a minimum with L > 0, ∇_f L = (f − y)/M ≠ 0 and Θ ∇_f L = 0.

    (a) Linear regression f = wᵀx + b (a one-layer standard-parameterized network) fitted by least
    squares to targets it cannot fit: the residual is orthogonal to [X, 1], so Θ r = 0 to rounding,
    asserted as |Θ r| ≤ 1e-10 |Θ| |r| (the lstsq solve leaves ~1e-15).
    (b) A nonlinear network f = v erf(wx + b) (3 parameters, 10 points) driven by Levenberg-Marquardt
    to a strict local minimum (Hessian eigenvalues > 1e-3) with L > 1e-3. Θ ∇_f L = J ∇_W L, so
    |Θ ∇_f L| ≤ |J| |∇_W L|; with |∇_W L| < 1e-10 reached (|J| ≈ 2.9, |∇_f L| ≈ 0.044, |Θ| ≈ 8.3: the
    bound is ~5e-10), the relative residual |Θ ∇_f L| / (|Θ| |∇_f L|) is asserted < 1e-8 (measured:
    1e-10); a Θ evaluated at the wrong parameters (e.g. the initialization) gives ~0.2."""
    # (a)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=g)
    y = torch.sin(x.sum(1)) + x[:, 0] ** 2
    model = ntkgp.Dense(1, 1.0, 1.0, "standard").build(3, seed=0)
    design = torch.cat([x, torch.ones(8, 1)], 1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution
    with torch.no_grad():
        model.weight.copy_(coef[:3])
        model.bias.copy_(coef[3])
        r = model(x)[:, 0] - y
    theta = empirical_ntk(model, x)
    assert float(r.norm()) > 0.5                     # L > 0: not a global minimum of the loss
    assert float((theta @ r).norm()) <= 1e-10 * float(torch.linalg.matrix_norm(theta, 2)) * float(r.norm())

    # (b)
    x = torch.linspace(-2, 2, 10)[:, None]
    y = 1.2 * torch.erf(0.8 * x[:, 0] + 0.3) + 0.2 * torch.cos(5 * x[:, 0])   # no f = v erf(wx + b) fits it
    model = ntkgp.serial(ntkgp.Dense(1, 1.0, 1.0), ntkgp.Erf(), ntkgp.Dense(1, 1.0, None)).build(1, seed=0)
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()], strict=True)

    def loss(v):
        params = dict(zip(names, (c.reshape(s) for c, s in zip(v.split(1), shapes, strict=True)), strict=True))
        return 0.5 * ((torch.func.functional_call(model, params, (x,))[:, 0] - y) ** 2).mean()

    v, damping = torch.cat([p.detach().reshape(-1) for p in model.parameters()]), 1.0
    for _ in range(60):                               # Levenberg-Marquardt on the 3 parameters
        grad = torch.func.grad(loss)(v)
        if float(grad.norm()) < 1e-10:
            break
        step = torch.linalg.solve(torch.func.hessian(loss)(v) + damping * torch.eye(3), grad)
        if loss(v - step) < loss(v):
            v, damping = v - step, damping / 3
        else:
            damping *= 4
    assert float(torch.func.grad(loss)(v).norm()) < 1e-10 and float(loss(v)) > 1e-3
    assert float(torch.linalg.eigvalsh(torch.func.hessian(loss)(v)).min()) > 1e-3   # a strict local minimum
    with torch.no_grad():
        for p, value in zip(model.parameters(), v, strict=True):
            p.fill_(value)
        grad_f = (model(x)[:, 0] - y) / 10
    theta = empirical_ntk(model, x)
    rel = (theta @ grad_f).norm() / (torch.linalg.matrix_norm(theta, 2) * grad_f.norm())
    assert float(rel) < 1e-8


def test_ntk_parameterization_normalizes_the_backward_pass():
    """"Normalizing backward pass ... To prove later: NTK parametrization normalizes backward pass in the
    limit n_l → ∞, so that NTK's of all layers have the same magnitude."

    ReLU, σ_w² = 2, σ_b² = 0.1, two hidden layers: at infinite width the contribution of Dense layer l
    (its weights and bias, via parameter_scales) to Θ(x, x) is its pre-activation variance
    q^l = q^{l−1} + σ_b² (σ_w² E[φ'²] = 1 per layer above), q^1 = σ_w² |x|²/n_0 + σ_b²: all O(1). At width
    1024, mean of 8 members, each contribution is asserted within 15% of q^l at each of 4 inputs: the
    empirical kernel fluctuates as O(1/sqrt(n)) (worst of 12 over 4 seeds: 9.6%; this seed: 6.7%).
    The standard parameterization trained with one rate for all layers is not normalized: its hidden
    layers' contributions are ~n/σ_w² = 512 times the NTK ones (asserted > 100×), while its first layer's,
    with the fixed fan-in n_0 = 3, stays O(1) (asserted < 3×)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    q = [2.0 * (x**2).sum(1) / 3 + 0.1 + 0.1 * layer for layer in range(3)]
    contributions = {}
    for param in ("ntk", "standard"):
        model = ntkgp.mlp(2, "relu", 2.0, 0.1, width=1024, parameterization=param)
        model = model.build(in_features=3, seed=0, ensemble_size=8)
        names = [n for n, _ in model.named_parameters()]
        contributions[param] = [
            empirical_ntk(model, x, parameter_scales={n: float(n.split(".")[0] == layer) for n in names})
            .mean(0).diagonal() for layer in ("0", "2", "4")]
    for theta_l, q_l in zip(contributions["ntk"], q, strict=True):
        torch.testing.assert_close(theta_l, q_l, rtol=0.15, atol=0)
    ratio = [float((s / n).min()) for s, n in zip(contributions["standard"], contributions["ntk"], strict=True)]
    assert ratio[0] < 3 and min(ratio[1:]) > 100


def _shallow(width: int) -> ntkgp.Layer:
    """The lecture's shallow network f(x) = n^{-1/2} Σ_i v_i φ(u_i x) (slide 20), φ = erf, no biases."""
    return ntkgp.serial(ntkgp.Dense(width, 1.0, None), ntkgp.Erf(), ntkgp.Dense(1, 1.0, None))


def test_shallow_network_ntk_is_the_lecture_formula_and_converges_as_one_over_sqrt_width():
    """Slide 20: Θ̂(x, x') = (1/n) Σ_i [φ(u_i x) φ(u_i x') + v_i² x x' φ'(u_i x) φ'(u_i x')], against the
    empirical NTK by autograd (to rounding), and "NTK at initialization is deterministic as n → ∞":
    its distance from the analytic Θ falls as n^{-1/2}, so by sqrt(4096/64) = 8 from width 64 to
    4096 (mean of 8 seeds: 8.2; asserted within [4, 16])."""
    x = torch.tensor([[-1.5], [0.3], [1.0], [2.0]], dtype=torch.float64)
    with torch.no_grad():
        limit = _shallow(1).kernel(x).ntk
    distance = {}
    for width in (64, 4096):
        errors = []
        for seed in range(8):
            model = _shallow(width).build(in_features=1, seed=seed, dtype=torch.float64)
            u, v = model[0].weight.detach()[0], model[2].weight.detach()[:, 0]
            phi, dphi = torch.erf(u * x), 2 / math.sqrt(math.pi) * torch.exp(-(u * x) ** 2)
            with torch.no_grad():
                torch.testing.assert_close(model(x)[:, 0], (v * phi).sum(1) / math.sqrt(width), rtol=1e-12, atol=1e-13)
            formula = (phi @ phi.T + (x @ x.T) * ((v**2 * dphi) @ dphi.T)) / width
            theta = empirical_ntk(model, x)
            torch.testing.assert_close(theta, formula, rtol=1e-12, atol=1e-13)
            errors.append(float((theta - limit).norm() / limit.norm()))
        distance[width] = sum(errors) / len(errors)
    assert 4 < distance[64] / distance[4096] < 16, distance


def test_kernel_moves_less_during_training_as_width_grows():
    """Slides 20–21: sup_t ‖Θ̂_t − Θ̂_0‖ ≤ C/sqrt(n) along gradient descent, and one step moves Θ̂ by at
    most O(1/sqrt(n)). The shallow erf network on two points (y = 1, 0), η = 0.5, 200 steps, 8
    seeds per width 64 … 4096: the log–log slope of the largest relative change is −0.74 (−0.71 to
    −0.75 over other seeds; asserted ≤ −0.5, the bound), and of the first step's change −1.0 (−0.97
    to −1.02: O(1/n), inside the lecture's bound; asserted within [−1.25, −0.75])."""
    x, y = torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    widths = (64, 256, 1024, 4096)
    first, largest = [], []
    for width in widths:
        one, sup = [], []
        for seed in range(8):
            model = _shallow(width).build(in_features=1, seed=seed, dtype=torch.float64)
            theta0, moved = empirical_ntk(model, x), 0.0
            for step in range(200):
                loss = ((model(x) - y) ** 2).sum() / 4            # (1/2m) ‖f − y‖², m = 2
                grads = torch.autograd.grad(loss, list(model.parameters()))
                with torch.no_grad():
                    for p, g in zip(model.parameters(), grads, strict=True):
                        p -= 0.5 * g
                if step == 0 or step % 20 == 19:
                    change = float((empirical_ntk(model, x) - theta0).norm() / theta0.norm())
                    one += [change] if step == 0 else []
                    moved = max(moved, change)
            sup.append(moved)
        first.append(sum(one) / len(one))
        largest.append(sum(sup) / len(sup))
    log_n = torch.tensor(widths, dtype=torch.float64).log()

    def slope(values):
        log_v = torch.tensor(values, dtype=torch.float64).log()
        centred = log_n - log_n.mean()
        return float((centred * (log_v - log_v.mean())).sum() / (centred**2).sum())

    assert slope(largest) <= -0.5, largest
    assert -1.25 <= slope(first) <= -0.75, first
