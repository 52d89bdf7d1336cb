"""Digit classification as regression with NNGP and NTK (Lee et al. 2018), offline.

scikit-learn's bundled 8×8 digits (1797 images, 10 classes): the first images train, the rest
test. Targets are one-hot vectors minus 0.1 (``ntkgp.bayes.one_hot_targets``); each test image
is assigned the argmax of the posterior mean. For ReLU networks of growing depth the script
compares the NNGP posterior with the infinite NTK ensemble trained to convergence (both by
``ntkgp.predict.gp_posterior``), prints accuracy and the AUROC of the predictive variance for
flagging misclassified images, and plots accuracy against depth next to the variance of
correctly and wrongly classified test images. Last, one linearized network started from zero
outputs is trained on the squared loss (``gradient_descent_mse``) and on cross-entropy
(``gradient_descent``) with the same kernel, and their test accuracies printed along training.

    python examples/06_digits.py [--quick] [--out DIR]
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
from sklearn.datasets import load_digits

import ntkgp
from ntkgp.bayes import accuracy, misclassification_auroc, one_hot_targets, predict_classes, predictive_moments


def cross_entropy(f: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the outputs ``f`` (N, 10) against one-hot labels, averaged over images."""
    return -(one_hot * f.log_softmax(-1)).sum(-1).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a CI smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "output")
    parser.add_argument("--diag-reg", type=float, default=1e-2,
                        help="noise variance relative to the mean diagonal of the training kernel")
    args = parser.parse_args()
    n_train, depths = (300, [1, 2]) if args.quick else (1000, [1, 2, 3, 4, 5, 6, 8])
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float64)
    labels = torch.tensor(labels)
    x_train, y_train, x_test, y_test = x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]
    if args.quick:
        x_test, y_test = x_test[:300], y_test[:300]
    targets = one_hot_targets(y_train, num_classes=10)

    results: dict[str, dict[str, list[float]]] = {k: {"accuracy": [], "auroc": []} for k in ("nngp", "ntk")}
    shown = depths[min(2, len(depths) - 1)]                             # depth of the histogram panel
    variances = {}
    print(f"{n_train} training / {len(y_test)} test digits, ReLU MLP (σ_w² = 2, σ_b² = 0.01)")
    print(f"{'depth':>5} {'kernel':>6} {'accuracy':>9} {'AUROC(var)':>11}")
    for depth in depths:
        net = ntkgp.mlp(depth, "relu", weight_var=2.0, bias_var=0.01)
        for kind in ("nngp", "ntk"):
            with torch.no_grad():
                diag = net.kernel(x_train, diag=True, ntk=kind == "ntk")
            noise = args.diag_reg * float((diag.ntk if kind == "ntk" else diag.nngp).mean())
            post = ntkgp.predict.gp_posterior(net, x_train, targets, x_test, kernel=kind, noise=noise)
            mean, var = predictive_moments(post)
            acc, auc = accuracy(mean, y_test), misclassification_auroc(mean, var, y_test)
            results[kind]["accuracy"].append(acc)
            results[kind]["auroc"].append(auc)
            print(f"{depth:>5} {kind:>6} {acc:9.4f} {auc:11.3f}")
            if depth == shown:
                variances[kind] = (var.numpy(), (predict_classes(mean) != y_test).numpy())

    # the same kernel under another loss: one linearized network from zero outputs, trained by
    # gradient flow on the squared loss (closed form) or on cross-entropy (an ODE)
    net = ntkgp.mlp(shown, "relu", weight_var=2.0, bias_var=0.01)
    with torch.no_grad():
        ntk_dd, ntk_td = net.kernel(x_train).ntk, net.kernel(x_test, x_train).ntk
    steps = [10.0, 100.0, 1000.0, 10000.0]
    _, squared = ntkgp.predict.gradient_descent_mse(ntk_dd, targets, ntk_test_train=ntk_td, fx_test_0=0.0, t=steps)
    one_hot = torch.nn.functional.one_hot(y_train, 10).to(x.dtype)
    _, xent = ntkgp.predict.gradient_descent(cross_entropy, ntk_dd, one_hot, ntk_test_train=ntk_td, fx_test_0=0.0,
                                             t=steps)
    print(f"one linearized network ({shown} hidden layers, NTK) from zero outputs, learning rate 1: test accuracy")
    print(f"{'steps':>7} {'squared':>8} {'x-entropy':>9}")
    for i, t in enumerate(steps):
        print(f"{t:7.0f} {accuracy(squared[i], y_test):8.4f} {accuracy(xent[i], y_test):9.4f}")
    print(f"({time.perf_counter() - start:.1f} s)")

    fig, (ax_acc, ax_var) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (("nngp", "NNGP posterior"), ("ntk", "NTK ensemble (t = ∞)")):
        ax_acc.plot(depths, results[kind]["accuracy"], marker="o", label=label)
    ax_acc.set(xlabel="hidden layers", ylabel="test accuracy", title="Accuracy against depth", xticks=depths)
    ax_acc.legend()
    var, wrong = variances["nngp"]
    bins = np.linspace(var.min(), var.max(), 30)
    ax_var.hist(var[~wrong], bins=bins, alpha=0.6, density=True, label=f"correct ({(~wrong).sum()})")
    ax_var.hist(var[wrong], bins=bins, alpha=0.6, density=True, label=f"misclassified ({wrong.sum()})")
    ax_var.set(xlabel="predictive variance (shared by the 10 outputs)", ylabel="density",
               title=f"NNGP, {shown} hidden layers: variance flags errors")
    ax_var.legend()
    fig.tight_layout()
    figure = args.out / "06_digits.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
