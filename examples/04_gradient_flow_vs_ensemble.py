"""Gradient-flow predictions over time vs a trained finite ensemble.

An infinite ensemble of infinitely wide networks trained by gradient descent is a Gaussian
process at every time t (Lee et al. 2019). This example trains finite ensembles of two widths on
5 noisy samples of sin with ntkgp's comparison harness and plots, at three times, the NTK-GP
mean ± 2σ next to the ensembles' mean ± 2σ, then prints how far apart they are.

    python examples/04_gradient_flow_vs_ensemble.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ntkgp.compare import CompareConfig, run_comparison, sin_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "output"),
                        help="folder for the figure (default: examples/output, wherever it is run from)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config = CompareConfig(widths=(16, 64) if args.quick else (64, 512), ensemble_size=16 if args.quick else 64,
                           record_steps=(0, 5, 50) if args.quick else (0, 10, 100, 1000), divergence_check=False)
    data = sin_dataset()
    result = run_comparison(data, config)
    print(f"learning rate {result.learning_rate:.3f} = 0.5 x 2m/lambda_max; NTK eigenvalues "
          f"{[round(v, 3) for v in result.eigenvalues]}")
    for w in result.widths:
        for i, step in enumerate(w.steps):
            print(f"width {w.width:4d}, step {step:5d}: loss {w.train_loss[i]:.2e}, mean RMSE vs NTK-GP "
                  f"{w.mean_rmse[i]:.3f} (bias {w.mean_bias[i]:.3f}), variance rel. error {w.var_rel_error[i]:.2f}")

    x = np.asarray(result.plot_x)
    shown = [i for i, s in enumerate(result.steps) if s > 0]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.5), squeeze=False)
    for ax, i in zip(axes[0], shown, strict=True):
        mu, sd = np.asarray(result.analytic_mean[i]), np.asarray(result.analytic_std[i])
        ax.fill_between(x, mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.2, label="NTK-GP ±2σ")
        ax.plot(x, mu, color="C0", label="NTK-GP mean")
        for j, w in enumerate(result.widths):
            m, s = np.asarray(w.ensemble_mean[i]), np.asarray(w.ensemble_std[i])
            ax.plot(x, m, "--", color=f"C{j + 2}", label=f"width {w.width} mean")
            ax.plot(x, m + 2 * s, ":", color=f"C{j + 2}", lw=1)
            ax.plot(x, m - 2 * s, ":", color=f"C{j + 2}", lw=1)
        ax.scatter(data.x_train[:, 0], data.y_train[:, 0], color="k", zorder=5, s=15)
        ax.set_title(f"step {result.steps[i]} (t = {result.times[i]:.3g})")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "04_gradient_flow_vs_ensemble.png", dpi=110)
    print(f"figure: {out / '04_gradient_flow_vs_ensemble.png'}")


if __name__ == "__main__":
    main()
