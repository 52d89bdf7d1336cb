"""Why trained ensembles have less late-time variance than the NTK-GP (docs/compare.md).

For each width, the members of ``ntkgp compare --preset acceptance`` (same spec, seed and
chunking as ``train_ensemble``, so the same networks) are followed in float64 through plain
full-batch gradient descent, next to three linear models of each member:

- ``lin-analytic``: linearized with the analytic NTK Θ (and the member's own f₀): the
  infinite-width prediction, up to Monte-Carlo error;
- ``lin-own-init``: linearized at the member's own initial empirical NTK Θ̂₀;
- ``lin-moving``: linear dynamics f ← f − (η/m) Θ̂_s(·, X)(f(X) − Y) with the member's
  *current* empirical NTK, re-evaluated every ``--every`` steps along its real trajectory.

Printed per step: the median over the outer test points (|x| ≥ 1.9, where the data pin the
function; all of them on the circle) of ensemble variance / NTK-GP variance, and the fraction of
all test points within 27 %; the distance of each trained member from its own linearization
(RMS over the test points, averaged over members: the part of training that is not the linear
model of Lee et al. 2019) and of the ensemble mean from the NTK-GP mean; then how the empirical
NTK on the training points moves along the analytic eigenvectors.

    python benchmarks/variance_deficit.py [--widths 256 512] [--every 5]   # ~1 min at width 256, ~5 min at 512
    python benchmarks/variance_deficit.py --activation relu --members 8 --widths 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import time

import torch

from ntkgp.compare import CompareConfig, circle_dataset, sin_dataset
from ntkgp.finite.empirical import empirical_ntk
from ntkgp.finite.train import _default_chunk
from ntkgp.predict import GradientFlow, gradient_descent_mse

STEPS = (10, 100, 1000)
OUTER = 1.9


def linearized(theta_dd, theta_td, f0_d, f0_t, y, lr, steps):
    """(T, E, M) test outputs of linear models trained for ``steps`` discrete steps from f₀.

    ``theta_*`` are one kernel for all members or one per member (leading ``E`` axis).
    """
    members = f0_d.shape[0]
    per_member = theta_dd.dim() == 3
    return torch.stack([
        gradient_descent_mse(theta_dd[e] if per_member else theta_dd, y, fx_train_0=f0_d[e],
                             ntk_test_train=theta_td[e] if per_member else theta_td, fx_test_0=f0_t[e],
                             steps=torch.tensor(steps), learning_rate=lr)[1]
        for e in range(members)], 1)


def run_chunk(net, seed, size, x_all, n, y, lr, theta, every):
    model = net.build(in_features=x_all.shape[-1], seed=seed, ensemble_size=size, dtype=torch.float64)
    params = list(model.parameters())
    d, t, m = slice(0, n), slice(n, None), y.numel()
    with torch.no_grad():
        f0 = model(x_all)[..., 0]
    ntk0 = empirical_ntk(model, x_all)
    out = {"lin-analytic": linearized(theta[d, d], theta[t, d], f0[:, d], f0[:, t], y, lr, STEPS),
           "lin-own-init": linearized(ntk0[:, d, d], ntk0[:, t, d], f0[:, d], f0[:, t], y, lr, STEPS)}
    trained, moving, f_lin, ntk = [], [], f0.clone(), ntk0
    for s in range(STEPS[-1] + 1):
        if s in STEPS:
            with torch.no_grad():
                trained.append(model(x_all)[:, t, 0])
            moving.append(f_lin[:, t].clone())
        if s == STEPS[-1]:
            break
        if s > 0 and s % every == 0:
            ntk = empirical_ntk(model, x_all)
        f_lin = f_lin - (lr / m) * (ntk[:, :, d] @ (f_lin[:, d] - y).unsqueeze(-1))[..., 0]
        loss = 0.5 * ((model(x_all[d])[..., 0] - y) ** 2).sum() / m  # members are independent
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
    out["trained"], out["lin-moving"] = torch.stack(trained), torch.stack(moving)
    return out, ntk0[:, d, d], empirical_ntk(model, x_all[d])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256])
    parser.add_argument("--members", type=int, default=128)
    parser.add_argument("--every", type=int, default=5, help="steps between NTK re-evaluations (lin-moving)")
    parser.add_argument("--activation", default="erf", help="of the compare MLP (default erf)")
    parser.add_argument("--bias-var", type=float, default=0.0025, help="of every layer (default 0.0025)")
    parser.add_argument("--dataset", choices=("sin", "circle"), default="sin")
    args = parser.parse_args()
    data = sin_dataset() if args.dataset == "sin" else circle_dataset()
    n, d = data.x_train.shape
    x_all = torch.cat([data.x_train, data.x_test]).double()
    y = data.y_train[:, 0].double()
    outer = data.x_test[:, 0].abs() >= OUTER if d == 1 else torch.ones(data.x_test.shape[0], dtype=torch.bool)
    for width in args.widths:
        start = time.perf_counter()
        config = CompareConfig(widths=(width,), ensemble_size=args.members, activation=args.activation,
                               bias_var=args.bias_var)
        net = config.network(width)
        lr = config.lr_fraction * GradientFlow(net, data.x_train, data.y_train).max_learning_rate
        gp = GradientFlow(net, data.x_train, data.y_train, learning_rate=lr).predict(
            data.x_test, steps=torch.tensor(STEPS))
        var_gp = gp.variance.double().clamp_min(1e-30)
        with torch.no_grad():
            theta = net.kernel(x_all).ntk.double()
        chunk = _default_chunk(net, d, x_all.shape[0])  # as train_ensemble: the same members
        parts, first, last = [], [], []
        for index, begin in enumerate(range(0, args.members, chunk)):
            out, ntk_first, ntk_last = run_chunk(net, config.seed + 1_000_003 * index,
                                                 min(chunk, args.members - begin), x_all, n, y, lr, theta, args.every)
            parts.append(out)
            first.append(ntk_first)
            last.append(ntk_last)
        where = f"|x| >= {OUTER}" if d == 1 else "all points"
        print(f"width {width}, {args.members} members, {args.activation}, bias_var {args.bias_var}, {args.dataset}, "
              f"η = {lr:.4f}; cells: median var/var_NTK-GP over {where} ({int(outer.sum())} points), fraction of "
              f"all points within 27 %")
        print(f"  {'model':14s}" + "".join(f"| step {s:<14d}" for s in STEPS))
        for name in ("trained", "lin-analytic", "lin-own-init", "lin-moving"):
            outputs = torch.cat([p[name] for p in parts], 1)              # (T, E, M)
            ratio = outputs.var(1) / var_gp
            cells = [(float(r[outer].median()), float(((r - 1).abs() <= 0.27).double().mean())) for r in ratio]
            print(f"  {name:14s}" + "".join(f"| {med:5.2f}  {within:5.2f}      " for med, within in cells))
        trained, own = (torch.cat([p[name] for p in parts], 1) for name in ("trained", "lin-own-init"))
        gap = (trained - own).square().mean(-1).sqrt().mean(-1)                   # (T,)
        bias = (trained.mean(1) - gp.mean.double().reshape(len(STEPS), -1)).square().mean(-1).sqrt()
        print("  RMS of (member − its own linearization), mean over members: "
              + ", ".join(f"{float(g):.4f}" for g in gap)
              + "; of (ensemble mean − NTK-GP mean): " + ", ".join(f"{float(b):.4f}" for b in bias))
        lam, v = torch.linalg.eigh(theta[:n, :n])
        ntk0, ntk1 = torch.cat(first), torch.cat(last)
        print(f"  NTK on the training points along the analytic eigenvectors v (vᵀΘ̂v, mean ± sd), "
              f"step 0 -> {STEPS[-1]}:")
        for i in range(n):
            q0 = torch.einsum("p,epq,q->e", v[:, i], ntk0, v[:, i])
            q1 = torch.einsum("p,epq,q->e", v[:, i], ntk1, v[:, i])
            change = (q1 - q0) / lam[i]
            print(f"    λ = {float(lam[i]):8.4f}: {float(q0.mean()):8.4f} ± {float(q0.std()):.4f} -> "
                  f"{float(q1.mean()):8.4f} ± {float(q1.std()):.4f}  ({float(change.mean()):+.0%} ± "
                  f"{float(change.std()):.0%} of λ)")
        print(f"  {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
