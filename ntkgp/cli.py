"""The ``ntkgp`` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def demo(args: argparse.Namespace) -> int:
    """Print the analytic NNGP/NTK of a small network next to finite-width Monte-Carlo estimates."""
    import ntkgp
    from ntkgp.finite import monte_carlo_kernel

    torch.manual_seed(args.seed)
    x = torch.randn(5, 3, dtype=torch.float64)
    net = ntkgp.serial(
        ntkgp.Dense(args.width, weight_var=2.25, bias_var=0.01), ntkgp.ReLU(),
        ntkgp.Dense(args.width, weight_var=2.25, bias_var=0.01), ntkgp.Erf(),
        ntkgp.Dense(16, weight_var=2.25, bias_var=0.01),
    )
    print(f"network: Dense({args.width}) -> ReLU -> Dense({args.width}) -> Erf -> Dense(16), "
          "weight_var=2.25, bias_var=0.01, NTK parameterization")
    print("kernels are per output unit, so each network contributes 16 draws to the averages")
    print(f"inputs: 5 points in R^3 (seed {args.seed}); Monte Carlo over {args.samples} random networks\n")
    with torch.no_grad():
        exact = net.kernel(x)
    estimate = monte_carlo_kernel(net, x, n_samples=args.samples, seed=args.seed)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=120)
    for name in ("nngp", "ntk"):
        a, b = getattr(exact, name), getattr(estimate, name)
        print(f"{name.upper()} (infinite width):\n{a}\n{name.upper()} (Monte Carlo, width {args.width}):\n{b}")
        print(f"relative Frobenius difference: {float((a - b).norm() / a.norm()):.4f}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntkgp", description="Infinite-width neural networks for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="analytic NNGP/NTK of a small network vs a finite-width Monte-Carlo estimate")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the finite networks (default 1024)")
    p.add_argument("--samples", type=int, default=256, help="number of random networks (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the networks (default 0)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
