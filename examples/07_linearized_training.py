"""A network, its linearization and the kernel prediction, trained on cross-entropy with momentum.

Wide networks train like their first-order Taylor expansion in the parameters (Lee et al. 2019),
for any loss. This example trains, on a two-class problem on the unit circle, a ReLU network of
growing width with heavy-ball SGD on softmax cross-entropy, next to its linearization
(``ntkgp.finite.linearize``), and compares their test outputs with the kernel predictions
``ntkgp.predict.gradient_descent`` makes from the same initial outputs: with the network's own
empirical NTK (equal to the trained linearization, to rounding, at every width) and with the
analytic infinite-width NTK. It prints how far apart the three are, fits log-log slopes against
the width, and plots the outputs along the circle and the gaps against the width.

    python examples/07_linearized_training.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import ntkgp
from ntkgp import finite, predict

LEARNING_RATE, MOMENTUM = 0.5, 0.9


def cross_entropy(f: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    return -(one_hot * f.log_softmax(-1)).sum(-1).mean()


def circle(n: int, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on the unit circle and one-hot labels: class 1 where sin(2θ) > 0."""
    angle = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n) + offset
    labels = (torch.sin(2 * angle) > 0).long()
    return torch.stack([angle.cos(), angle.sin()], -1), torch.nn.functional.one_hot(labels, 2).to(torch.float64)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "output"),
                        help="folder for the figure (default: examples/output, wherever it is run from)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    widths, seeds, steps = ((32, 128, 512), 2, 100) if args.quick else ((64, 256, 1024), 3, 100)
    start = time.perf_counter()

    x, y = circle(12, offset=0.1)
    x_test, _ = circle(100)
    spec = lambda width: ntkgp.serial(ntkgp.Dense(width, 2.0, 0.05), ntkgp.ReLU(),   # noqa: E731
                                      ntkgp.Dense(width, 2.0, 0.05), ntkgp.ReLU(), ntkgp.Dense(2, 1.0, 0.05))
    with torch.no_grad():
        analytic_dd = spec(1).kernel(x).ntk
        analytic_td = spec(1).kernel(x_test, x).ntk
    print(f"12 training points in 2 classes on the unit circle, 100 test points; ReLU MLP, 2 hidden layers; "
          f"{steps} steps of SGD, learning rate {LEARNING_RATE}, momentum {MOMENTUM}, cross-entropy")
    print(f"{'width':>6} {'net vs linearized':>18} {'linearized vs own-NTK prediction':>33} "
          f"{'linearized vs infinite':>23}")
    gaps: dict[str, list[float]] = {"net": [], "own": [], "infinite": []}
    shown = {}
    for width in widths:
        per_seed = {key: [] for key in gaps}
        for seed in range(seeds):
            model = spec(width).build(in_features=2, seed=seed, dtype=torch.float64)
            with torch.no_grad():
                f_train, f_test = model(x), model(x_test)
            # the network's own tangent kernel and linearization, at its initial parameters
            own_dd = finite.empirical_ntk(model, x, vector_output=True)
            own_td = finite.empirical_ntk(model, x_test, x, vector_output=True)
            linear = finite.linearize(model)
            for module in (model, linear):
                opt = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
                for _ in range(steps):
                    opt.zero_grad()
                    cross_entropy(module(x), y).backward()
                    opt.step()
            with torch.no_grad():
                net_out, lin_out = model(x_test), linear(x_test)
            own = predict.gradient_descent(cross_entropy, own_dd, y, fx_train_0=f_train, ntk_test_train=own_td,
                                           fx_test_0=f_test, steps=steps, learning_rate=LEARNING_RATE,
                                           momentum=MOMENTUM)[1]
            infinite = predict.gradient_descent(
                cross_entropy, analytic_dd, y, fx_train_0=f_train, ntk_test_train=analytic_td, fx_test_0=f_test,
                steps=steps, learning_rate=LEARNING_RATE, momentum=MOMENTUM)[1]
            per_seed["net"].append(rms(net_out, lin_out))
            per_seed["own"].append(rms(lin_out, own))
            per_seed["infinite"].append(rms(lin_out, infinite))
            if seed == 0:
                shown[width] = (net_out[:, 1] - net_out[:, 0], infinite[:, 1] - infinite[:, 0])
        for key in gaps:
            gaps[key].append(float(np.mean(per_seed[key])))
        print(f"{width:6d} {gaps['net'][-1]:18.4f} {gaps['own'][-1]:33.2e} {gaps['infinite'][-1]:23.4f}")
    logs = np.log(widths)
    slopes = {key: float(np.polyfit(logs, np.log(gaps[key]), 1)[0]) for key in ("net", "infinite")}
    print(f"log-log slopes against width: net vs linearized {slopes['net']:.2f}, linearized vs infinite "
          f"{slopes['infinite']:.2f} (for the squared loss Lee et al. 2019 bound the first by C width^-1/2; the "
          f"second follows the width^-1/2 fluctuation of the empirical NTK)")
    print(f"({time.perf_counter() - start:.1f} s)")

    fig, (ax_out, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    angle = np.linspace(0, 360, 100, endpoint=False)
    for i, width in enumerate((widths[0], widths[-1])):
        net_margin, infinite_margin = shown[width]
        ax_out.plot(angle, net_margin, color=f"C{i}", label=f"network, width {width}")
        ax_out.plot(angle, infinite_margin, color=f"C{i}", ls="--", label=f"infinite-width prediction, width {width}")
    ax_out.axhline(0, color="k", lw=0.5)
    ax_out.set(xlabel="angle on the circle (degrees)", ylabel="logit difference f₁ − f₀",
               title=f"Test outputs after {steps} steps (seed 0)")
    ax_out.legend(fontsize=7)
    ax_gap.loglog(widths, gaps["net"], marker="o", label=f"network vs its linearization (slope {slopes['net']:.2f})")
    ax_gap.loglog(widths, gaps["infinite"], marker="s",
                  label=f"linearization vs infinite width (slope {slopes['infinite']:.2f})")
    ax_gap.set(xlabel="width", ylabel=f"RMS difference of test outputs ({seeds} seeds)", title="Gaps against width")
    ax_gap.legend(fontsize=8)
    fig.tight_layout()
    figure = out / "07_linearized_training.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
