"""Learn a network's weight and bias variances by maximizing the marginal likelihood.

Data are drawn from the NNGP prior of a known depth-2 erf network (k independent target columns
at the same inputs, plus Gaussian noise), so the variances that generated them are known. A
:class:`ntkgp.models.NetworkGP` starts from other values and :func:`ntkgp.models.fit` (Adam on
the exact marginal likelihood) moves every layer's ``σ_w²``, ``σ_b²`` and the noise variance.
The script plots the loss (negative log marginal likelihood per target entry) and the path of
every variance, prints learned against true values, and the test NLPD (ntkgp.bayes.nlpd) of
the posterior before and after fitting. Learned values differ from the true ones by the sampling
error of a finite data set (a few tens of percent here): the marginal likelihood is maximized
for *this* sample, which is why the test NLPD, not the distance to the truth, is the score.

    python examples/03_learn_variances.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import ntkgp
from ntkgp.bayes import nlpd, predictive_moments
from ntkgp.models import NetworkGP, fit

TRUE = {"w1": 2.5, "b1": 0.3, "w2": 1.2, "b2": 0.5, "noise": 0.01}
START = {"w1": 1.0, "b1": 0.05, "w2": 1.0, "b2": 0.05}


def network(values: dict[str, float]) -> ntkgp.Serial:
    return ntkgp.serial(ntkgp.Dense(1, values["w1"], values["b1"]), ntkgp.Erf(),
                        ntkgp.Dense(1, values["w2"], values["b2"]))


def variances(net: ntkgp.Serial) -> dict[str, float]:
    first, last = net[0], net[2]
    return {name: float(value.detach()) for name, value in
            (("w1", first.weight_var), ("b1", first.bias_var), ("w2", last.weight_var), ("b2", last.bias_var))}


def sample_prior(n_train: int, n_test: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs in 3-D and k target columns drawn jointly from N(0, K_true + σ²I)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        cov = network(TRUE).kernel(x, ntk=False).nngp + TRUE["noise"] * torch.eye(len(x), dtype=torch.float64)
    y = torch.linalg.cholesky(cov) @ torch.randn(len(x), k, generator=generator, dtype=torch.float64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_nlpd(model: NetworkGP, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    noise = float(model.likelihood.noise.detach())
    post = ntkgp.predict.gp_posterior(model.net, *model.train_inputs, model.train_targets, x_test,
                                      kernel="nngp", noise=noise)
    mean, var = predictive_moments(post, noise=noise)
    return nlpd(mean, var, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a CI smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "output")
    args = parser.parse_args()
    n_train, k, steps = (60, 4, 40) if args.quick else (250, 8, 150)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    x, y, x_test, y_test = sample_prior(n_train, 200, k)
    model = NetworkGP(x, y, network(START))
    model.likelihood.noise = 0.1
    before = test_nlpd(model, x_test, y_test)
    path = {name: [] for name in (*START, "noise")}

    def record(step: int, loss: float) -> None:
        for name, value in variances(model.net).items():
            path[name].append(value)
        path["noise"].append(float(model.likelihood.noise.detach()))

    history = fit(model, steps=steps, lr=0.05, callback=record)
    after = test_nlpd(model, x_test, y_test)
    learned = {**variances(model.net), "noise": float(model.likelihood.noise.detach())}

    print(f"{n_train} training points x {k} target columns, {steps} Adam steps "
          f"({time.perf_counter() - start:.1f} s)")
    print(f"loss (−log marginal likelihood per entry): {history[0]:.4f} -> {history[-1]:.4f}")
    print(f"{'':>6} {'start':>8} {'learned':>8} {'true':>8}")
    for name in path:
        first = START.get(name, 0.1)
        print(f"{name:>6} {first:8.3f} {learned[name]:8.3f} {TRUE[name]:8.3f}")
    print(f"test NLPD: {before:.4f} at the start, {after:.4f} after fitting")

    fig, (ax_loss, ax_var) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(history)
    ax_loss.set(xlabel="Adam step", ylabel="− log marginal likelihood / entry", title="Loss")
    for i, (name, values) in enumerate(path.items()):
        color = f"C{i}"
        ax_var.plot(values, color=color, label=name)
        ax_var.axhline(TRUE[name], color=color, linestyle="--", linewidth=0.8)
    ax_var.set(xlabel="Adam step", ylabel="variance", yscale="log",
               title="Learned variances (dashed: values that generated the data)")
    ax_var.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    figure = args.out / "03_learn_variances.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
