"""Cost of the exact centred kernels that ``LayerNorm`` normalizes (docs/benchmarks.md).

``LayerNorm`` after an activation needs the covariance ``T − μ1μ2`` of its features. The ReLU
family, GELU and ``RectifiedMonomial`` take it in forms of their own that keep its digits near
independent inputs (docs/numerics.md, "Each layer to its last digit"); the baseline, run in the
same process, is the plain difference ``T − μ(k11) μ(k22)`` (``Activation``'s default, which those
layers used before). For ``serial(Dense, φ, LayerNorm, Dense, φ, LayerNorm, Dense)`` on ``N``
standard-normal points in ``d = 20`` it prints the NNGP + NTK time under ``torch.no_grad()`` (best
of ``--repeats`` after a warm-up), the ratio exact / baseline, and the largest relative difference
of the NTKs (the baseline's rounding near ``ρ = 0``).

    python benchmarks/layernorm.py [--sizes 1000 3000] [--dtype float64]
"""

from __future__ import annotations

import argparse
import time

import torch

import ntkgp
from ntkgp.layers.activations import Activation

ACTIVATIONS = {"relu": ntkgp.ReLU, "gelu": ntkgp.GELU, "rectified_monomial_2": lambda: ntkgp.RectifiedMonomial(2)}


def plain_difference(layer: Activation) -> Activation:
    """``layer`` with ``Activation``'s own centred kernel, ``T − μ1μ2``."""
    layer.centred_pair_kernel = lambda k11, k12, k22, nngp: Activation.centred_pair_kernel(layer, k11, k12, k22, nngp)
    return layer


def network(make, baseline: bool) -> ntkgp.Layer:
    def act():
        return plain_difference(make()) if baseline else make()
    return ntkgp.serial(ntkgp.Dense(1, 2.0, 0.1), act(), ntkgp.LayerNorm(), ntkgp.Dense(1, 2.0, 0.1), act(),
                        ntkgp.LayerNorm(), ntkgp.Dense(1))


def best_time(net: ntkgp.Layer, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = net.kernel(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            net.kernel(x)
            times.append(time.perf_counter() - start)
    return min(times), out.ntk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000], help="numbers of points N")
    parser.add_argument("--d", type=int, default=20, help="input dimension")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the best counts)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, d = {args.d}, {torch.get_num_threads()} threads")
    print("| activation | N | exact s | T − μ1μ2 s | exact / T − μ1μ2 | max rel diff of the NTKs |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        x = torch.randn(n, args.d, dtype=dtype, generator=torch.Generator().manual_seed(0))
        for name, make in ACTIVATIONS.items():
            exact, k_exact = best_time(network(make, False), x, args.repeats)
            plain, k_plain = best_time(network(make, True), x, args.repeats)
            diff = float(((k_exact - k_plain).abs() / k_exact.abs()).max())
            print(f"| {name} | {n} | {exact:.3f} | {plain:.3f} | {exact / plain:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
