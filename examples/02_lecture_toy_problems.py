"""The toy problems of the lecture notes on the neural tangent kernel, computed with ntkgp.

1. The tangent kernel of linear regression, f(w, b, x) = wᵀx + b, is Θ(x, x') = xᵀx' + 1 at any
   parameters (lecture exercise), for a function of parameters and for an ntkgp ``Dense`` layer.
2. The tangent kernel of the sine model f(W, x) = A sin(kx), W = {A, k}:
   Θ(x, x') = sin(kx) sin(kx') + A² x x' cos(kx) cos(kx'), from ``ntkgp.finite.empirical_ntk``
   on a function of parameters, against the formula.
3. Gradient flow of the sine model on {(1, 1), (2, 0)} in parameter space,
   dW/dt = −∇_W L with L = (1/M) Σ_a ½ (f(x_a) − y_a)², M = 2, seen in output space: the
   outputs obey df/dt = −(1/M) Θ(t) (f − y) with the tangent kernel Θ(t) = Θ(W(t)) of the
   moving parameters (integrated here on its own and compared), but not the same equation
   with the kernel frozen at t = 0 (``ntkgp.predict.gradient_descent_mse``), because this
   model is far from wide: its kernel changes during training.
4. The same comparison for f(x) = (1/√n) Σ_i v_i erf(u_i x), a one-hidden-layer network in NTK
   parameterization trained by gradient descent on the same two points: the distance between
   the trained network and its frozen-kernel (linearized) prediction, and the change of its
   tangent kernel, shrink as the width n grows (Lee et al. 2019 bound both by C/√n).

It prints the numbers and saves ``02_sine_model.png`` and ``02_wide_networks.png``.

    python examples/02_lecture_toy_problems.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.integrate import solve_ivp

import ntkgp
from ntkgp.finite import empirical_ntk
from ntkgp.predict import gradient_descent_mse, max_learning_rate

DTYPE = torch.float64
X = torch.tensor([[1.0], [2.0]], dtype=DTYPE)  # the lecture's data set {(1, 1), (2, 0)}
Y = torch.tensor([1.0, 0.0], dtype=DTYPE)
M = 2


def linear_regression() -> None:
    print("1. Linear regression f(w, b, x) = wᵀx + b")
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 3, generator=g, dtype=DTYPE), torch.randn(4, 3, generator=g, dtype=DTYPE)
    expected = x1 @ x2.T + 1

    def f(params, x):
        return x @ params["w"] + params["b"]

    worst = 0.0
    for seed in range(3):  # the kernel does not depend on where the parameters are
        gs = torch.Generator().manual_seed(seed)
        params = {"w": torch.randn(3, generator=gs, dtype=DTYPE), "b": torch.randn((), generator=gs, dtype=DTYPE)}
        worst = max(worst, float((empirical_ntk(f, x1, x2, params=params) - expected).abs().max()))
    print(f"   empirical_ntk of a function of (w, b), 3 parameter draws: max |Θ − (xᵀx' + 1)| = {worst:.1e}")
    layer = ntkgp.Dense(1, weight_var=1.7, bias_var=0.3, parameterization="standard")
    finite = empirical_ntk(layer.build(in_features=3, seed=1, dtype=DTYPE), x1, x2)
    with torch.no_grad():
        analytic = layer.kernel(x1, x2).ntk
    print(f"   Dense(1, parameterization='standard'), a built layer: max |Θ − (xᵀx' + 1)| = "
          f"{float((finite - expected).abs().max()):.1e}")
    print(f"   the same layer's analytic NTK (n·K⁰ + 1 with n = d): max |Θ − (xᵀx' + 1)| = "
          f"{float((analytic - expected).abs().max()):.1e}")
    with torch.no_grad():
        ntk_param = ntkgp.Dense(1, weight_var=1.7, bias_var=0.3).kernel(x1, x2).ntk
    print(f"   in NTK parameterization the same layer has Θ = σ_w² xᵀx'/d + σ_b²: max error "
          f"{float((ntk_param - (1.7 * x1 @ x2.T / 3 + 0.3)).abs().max()):.1e}")


def sine(params: dict, x: torch.Tensor) -> torch.Tensor:
    """The lecture's model f(W, x) = A sin(kx) as a function of its parameters."""
    return params["A"] * torch.sin(params["k"] * x[:, 0])


def as_params(w) -> dict:
    return {"A": torch.as_tensor(w[0], dtype=DTYPE), "k": torch.as_tensor(w[1], dtype=DTYPE)}


def sine_kernel_formula(w, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    a, k = float(w[0]), float(w[1])
    u, v = x1[:, 0], x2[:, 0]
    return torch.outer(torch.sin(k * u), torch.sin(k * v)) + a**2 * torch.outer(u * torch.cos(k * u),
                                                                                   v * torch.cos(k * v))


def sine_tangent_kernel(w0) -> None:
    print(f"\n2. Tangent kernel of f = A sin(kx) at (A, k) = ({w0[0]}, {w0[1]})")
    theta = empirical_ntk(sine, X, params=as_params(w0))
    print(f"   on the training inputs x = 1, 2:\n{theta}")
    grid = torch.linspace(-3, 3, 13, dtype=DTYPE).unsqueeze(-1)
    err = (empirical_ntk(sine, grid, params=as_params(w0)) - sine_kernel_formula(w0, grid, grid)).abs().max()
    print(f"   on 13 points of [-3, 3]: max |empirical_ntk − formula| = {float(err):.1e}")
    eigenvalues = ", ".join(f"{v:.4f}" for v in torch.linalg.eigvalsh(theta).tolist())
    print(f"   its eigenvalues on the training inputs: {eigenvalues} (positive semi-definite)")


def loss_gradient(w: np.ndarray) -> np.ndarray:
    """∇_W L for L = (1/M) Σ_a ½ (f(W, x_a) − y_a)², by autograd."""
    params = {name: value.requires_grad_() for name, value in as_params(w).items()}
    loss = 0.5 * ((sine(params, X) - Y) ** 2).sum() / M
    grads = torch.autograd.grad(loss, [params["A"], params["k"]])
    return np.array([float(g) for g in grads])


def sine_dynamics(w0, horizon: float, n_times: int, rtol: float, out: pathlib.Path) -> None:
    print(f"\n3. Gradient flow of A sin(kx) on {{(1, 1), (2, 0)}} from (A, k) = ({w0[0]}, {w0[1]}), "
          f"t ∈ [0, {horizon:g}]")
    times = np.linspace(0.0, horizon, n_times)
    ode = {"rtol": rtol, "atol": rtol * 1e-1, "method": "DOP853"}
    # Parameter space: dW/dt = −∇_W L(W).
    params_path = solve_ivp(lambda t, w: -loss_gradient(w), (0, horizon), np.asarray(w0, float), t_eval=times,
                            dense_output=True, **ode)
    f_param = np.stack([sine(as_params(w), X).numpy() for w in params_path.y.T])
    y = Y.numpy()

    # Output space with the moving kernel Θ(t) = Θ(W(t)): df/dt = −(1/M) Θ(t) (f − y).
    def kernel_at(t: float) -> np.ndarray:
        return empirical_ntk(sine, X, params=as_params(params_path.sol(t))).numpy()

    moving = solve_ivp(lambda t, f: -kernel_at(t) @ (f - y) / M, (0, horizon), f_param[0], t_eval=times, **ode)
    f_moving = moving.y.T
    # Output space with the kernel frozen at t = 0: f(t) = y + exp(−Θ₀ t/M)(f(0) − y), i.e. the
    # linearized model; gradient_descent_mse uses τ = η t/m with m = y.numel() = M (η = 1).
    theta0 = empirical_ntk(sine, X, params=as_params(w0))
    f_frozen = gradient_descent_mse(theta0, Y, fx_train_0=torch.from_numpy(f_param[0]),
                                    t=torch.from_numpy(times)).numpy()
    # "Naive" functional gradient descent (Θ = I): f(t) = y + e^{−t/M} (f(0) − y).
    f_naive = y + np.exp(-times / M)[:, None] * (f_param[0] - y)

    loss = 0.5 * ((f_param - y) ** 2).sum(-1) / M
    print("       t      A       k     f(1)     f(2)   |   Θ(t) ODE: f(1)  f(2)  |  frozen Θ(0): f(1)  f(2)    loss")
    for t in (0.0, 1.0, 2.0, 5.0, 10.0, horizon):
        i = int(np.argmin(np.abs(times - t)))
        a, k = params_path.y[:, i]
        print(f"   {times[i]:5.1f}  {a:6.3f}  {k:6.3f}  {f_param[i, 0]:7.4f}  {f_param[i, 1]:7.4f}   |   "
              f"{f_moving[i, 0]:7.4f}  {f_moving[i, 1]:7.4f}  |  {f_frozen[i, 0]:7.4f}  {f_frozen[i, 1]:7.4f}  "
              f"{loss[i]:.2e}")
    print(f"   max |f_parameter-GD − f_ODE with Θ(t)| over the path: {np.abs(f_param - f_moving).max():.1e}")
    print(f"   max |f_parameter-GD − f_ODE with Θ(0)| over the path: {np.abs(f_param - f_frozen).max():.3f}")
    theta_end = kernel_at(horizon)
    rounded_end = (np.round(theta_end, 4) + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0
    print(f"   Θ(0) = {np.round(theta0.numpy(), 4).tolist()},  Θ({horizon:g}) = {rounded_end}")
    print(f"   relative change ‖Θ({horizon:g}) − Θ(0)‖/‖Θ(0)‖ = "
          f"{np.linalg.norm(theta_end - theta0.numpy()) / np.linalg.norm(theta0.numpy()):.3f}")

    kernels = np.stack([kernel_at(t) for t in times])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for a, colour in ((0, "C0"), (1, "C1")):
        axes[0].plot(times, f_param[:, a], color=colour, label=f"f(x={a + 1}), parameter GD")
        axes[0].plot(times[::max(1, n_times // 25)], f_moving[::max(1, n_times // 25), a], "o", color=colour, ms=3,
                     label=f"f(x={a + 1}), ODE with Θ(t)")
        axes[0].plot(times, f_frozen[:, a], "--", color=colour, label=f"f(x={a + 1}), ODE with Θ(0)")
    axes[0].set_xlabel("t")
    axes[0].set_title("outputs on the training points", fontsize=9)
    axes[0].legend(fontsize=6)
    for (i, j), name in (((0, 0), "Θ(1, 1)"), ((0, 1), "Θ(1, 2)"), ((1, 1), "Θ(2, 2)")):
        axes[1].plot(times, kernels[:, i, j], label=name)
    axes[1].set_xlabel("t")
    axes[1].set_title("tangent kernel along the path", fontsize=9)
    axes[1].legend(fontsize=7)
    axes[2].plot(f_param[:, 0], f_param[:, 1], color="k", label="parameter GD = ODE with Θ(t)")
    axes[2].plot(f_frozen[:, 0], f_frozen[:, 1], "--", color="C2", label="ODE with Θ(0)")
    axes[2].plot(f_naive[:, 0], f_naive[:, 1], ":", color="C3", label="functional GD (Θ = I)")
    axes[2].plot(*f_param[0], "o", color="k", ms=4)
    axes[2].plot(*y, "*", color="C3", ms=10, label="target y")
    axes[2].set_xlabel("f(x=1)")
    axes[2].set_ylabel("f(x=2)")
    axes[2].set_title("trajectories in output space", fontsize=9)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "02_sine_model.png", dpi=80)
    plt.close(fig)


def train_network(model: torch.nn.Module, learning_rate: float, steps: int) -> torch.Tensor:
    """Full-batch gradient descent on L = (1/M) Σ ½ (f − y)²; the training outputs after every step."""
    params = list(model.parameters())
    outputs = []
    for step in range(steps + 1):
        f = model(X)[:, 0]
        outputs.append(f.detach())
        if step == steps:
            break
        grads = torch.autograd.grad(0.5 * ((f - Y) ** 2).sum() / M, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= learning_rate * g
    return torch.stack(outputs)


def one_hidden_layer(n: int) -> ntkgp.Serial:
    """f(x) = (1/√n) Σ_i v_i erf(u_i x): NTK parameterization, σ_w² = 1, no biases (input dimension 1)."""
    return ntkgp.serial(ntkgp.Dense(n, weight_var=1.0), ntkgp.Erf(), ntkgp.Dense(1, weight_var=1.0))


def wide_networks(widths: list[int], seeds: int, steps: int, out: pathlib.Path) -> None:
    print("\n4. f(x) = (1/√n) Σ v_i erf(u_i x) trained by gradient descent on the same data, against the"
          " prediction of its frozen initial kernel")
    learning_rate = 0.5
    with torch.no_grad():
        analytic = one_hidden_layer(widths[-1]).kernel(X).ntk  # in NTK parameterization, the same for any n
    print(f"   infinite-width NTK on x = 1, 2: {np.round(analytic.numpy(), 4).tolist()}; learning rate {learning_rate},"
          f" {steps} steps (stable below 2m/λ_max = {max_learning_rate(analytic, M):.2f})")
    print("   width   max |f_GD − f_frozen|   ‖Θ̂_end − Θ̂_0‖/‖Θ̂_0‖   ‖Θ̂_0 − Θ‖/‖Θ‖   (means over seeds)")
    rows = []
    for n in widths:
        spec = one_hidden_layer(n)
        dev, change, init = [], [], []
        for seed in range(seeds):
            model = spec.build(in_features=1, seed=seed, dtype=DTYPE)
            theta0 = empirical_ntk(model, X)
            f_gd = train_network(model, learning_rate, steps)
            f_lin = gradient_descent_mse(theta0, Y, fx_train_0=f_gd[0], steps=torch.arange(steps + 1),
                                         learning_rate=learning_rate)
            theta_end = empirical_ntk(model, X)
            dev.append(float((f_gd - f_lin).abs().max()))
            change.append(float((theta_end - theta0).norm() / theta0.norm()))
            init.append(float((theta0 - analytic).norm() / analytic.norm()))
        rows.append((n, np.mean(dev), np.mean(change), np.mean(init)))
        print(f"   {n:5d}   {rows[-1][1]:20.2e}   {rows[-1][2]:21.2e}   {rows[-1][3]:15.2e}")
    w = np.array([r[0] for r in rows], float)
    first = 1 if len(w) > 2 else 0  # the narrowest network is far from the asymptotic regime
    for col, name in ((1, "max |f_GD − f_frozen|"), (2, "kernel change")):
        slope = np.polyfit(np.log(w[first:]), np.log([r[col] for r in rows[first:]]), 1)[0]
        print(f"   least-squares slope of log({name}) against log(n), n ≥ {int(w[first])}: {slope:.2f}")
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    ax.loglog(w, [r[1] for r in rows], "o-", label="max |f_GD − f_frozen Θ̂₀|")
    ax.loglog(w, [r[2] for r in rows], "s-", label="‖Θ̂_end − Θ̂₀‖ / ‖Θ̂₀‖")
    ax.loglog(w, rows[0][1] * np.sqrt(w[0] / w), "k:", label="∝ 1/√n")
    ax.loglog(w, rows[0][1] * w[0] / w, "k-.", lw=0.8, label="∝ 1/n")
    ax.set_xlabel("hidden width n")
    ax.set_title(f"{steps} steps of gradient descent, mean of {seeds} seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "02_wide_networks.png", dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="much smaller sizes (a smoke test)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "output"),
                        help="folder for the figures (default: examples/output, wherever it is run from)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_printoptions(precision=4, sci_mode=False)
    w0 = (0.5, 1.0)
    linear_regression()
    sine_tangent_kernel(w0)
    sine_dynamics(w0, horizon=20.0, n_times=81 if args.quick else 401, rtol=1e-8 if args.quick else 1e-11, out=out)
    wide_networks([16, 256] if args.quick else [16, 64, 256, 1024, 4096], seeds=2 if args.quick else 8,
                  steps=100 if args.quick else 400, out=out)
    print(f"\nfigures: {out / '02_sine_model.png'}, {out / '02_wide_networks.png'}   "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
