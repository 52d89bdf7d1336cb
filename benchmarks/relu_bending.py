"""Where ReLU networks on the 1-D ``sin`` data lose the NTK's bending directions (docs/compare.md).

The compare MLP with ReLU (weight_var 2.25, bias_var 0.0025), trained in float64 by plain
full-batch gradient descent at half the stability limit. ``v`` is the analytic NTK's first bending
direction on the five training points (its second-smallest eigenvector, λ ≈ 0.145). Printed:

- at chosen steps, each parameter tensor's part of ``vᵀΘ̂v = Σ_p (vᵀ ∂f(X)/∂θ_p)²`` (the mean over
  members), which sums to the value along ``v`` that ``variance_deficit.py`` reports;
- the number of units per member, in each hidden layer, whose pre-activation changes sign at
  π/2 < |x| < π (where ``v`` bends the function, between the outer training points) and at
  0.3 < |x| < π/2 (on a grid of 4001 points);
- the same parts for the initial networks moved by a random change of every parameter tensor as
  large (in norm) as the change training made: whether any change of that size removes them.

    python benchmarks/relu_bending.py [--width 512] [--members 8] [--steps 1000]   # ~30 s at width 512
"""

from __future__ import annotations

import argparse

import torch

from ntkgp.compare import CompareConfig, sin_dataset
from ntkgp.predict import GradientFlow

RECORDS = (0, 1, 3, 10, 100, 1000)


def parts(model: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Each parameter tensor's part of vᵀΘ̂v, averaged over members (whose gradients are separate)."""
    members = next(model.parameters()).shape[0]
    grads = torch.autograd.grad((model(x)[..., 0] * v).sum(), list(model.parameters()))
    return {name: float(g.square().sum()) / members for (name, _), g in zip(model.named_parameters(), grads,
                                                                                strict=True)}


def bending_units(model: torch.nn.Module, low: float, high: float) -> tuple[float, float]:
    """Units per member, in each hidden layer, with a sign change of their pre-activation at
    ``low < |x| < high``."""
    grid = torch.linspace(-torch.pi, torch.pi, 4001, dtype=torch.float64).unsqueeze(-1)
    where = ((grid[1:, 0].abs() > low) & (grid[1:, 0].abs() < high)).view(1, -1, 1)
    with torch.no_grad():
        z1 = model[0](grid)
        z2 = model[2](model[1](z1))
    counts = []
    for z in (z1, z2):
        flips = ((z[:, 1:] > 0) != (z[:, :-1] > 0)) & where
        counts.append(float(flips.any(1).double().sum(-1).mean()))
    return counts[0], counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    data = sin_dataset()
    x, y = data.x_train, data.y_train[:, 0]
    spec = CompareConfig(activation="relu").network   # the compare MLP: weight_var 2.25, bias_var 0.0025
    lam, vectors = torch.linalg.eigh(spec(8).kernel(x).ntk.detach())
    v = vectors[:, 1]
    lr = 0.5 * GradientFlow(spec(8), x, y).max_learning_rate
    print(f"ReLU MLP, width {args.width}, {args.members} members, η = {lr:.4f}; v: λ = {float(lam[1]):.4f}")
    model = spec(args.width).build(in_features=1, seed=0, ensemble_size=args.members, dtype=torch.float64)
    params = list(model.parameters())
    for step in range(args.steps + 1):
        if step in RECORDS or step == args.steps:
            shares = parts(model, x, v)
            outer, inner = bending_units(model, torch.pi / 2, torch.pi), bending_units(model, 0.3, torch.pi / 2)
            print(f"  step {step:5d}: vᵀΘ̂v = {sum(shares.values()):.4f} = "
                  + " + ".join(f"{value:.4f} ({name})" for name, value in shares.items())
                  + f"; units per member bending at π/2 < |x| < π: {outer[0]:.1f}, {outer[1]:.1f} (layers 1, 2), "
                  f"at 0.3 < |x| < π/2: {inner[0]:.1f}, {inner[1]:.1f}")
        if step == args.steps:
            break
        loss = ((model(x)[..., 0] - y) ** 2).sum() / (2 * y.numel())   # members are independent
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
    moved = spec(args.width).build(in_features=1, seed=0, ensemble_size=args.members, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p, trained in zip(moved.parameters(), params, strict=True):
            change = trained - p
            noise = torch.randn(change.shape, generator=generator, dtype=change.dtype)
            p.add_(noise * change.norm() / noise.norm())
    shares = parts(moved, x, v)
    print(f"  initial networks moved at random by as much as training moved them: vᵀΘ̂v = "
          f"{sum(shares.values()):.4f} = " + " + ".join(f"{value:.4f} ({name})" for name, value in shares.items()))


if __name__ == "__main__":
    main()
