"""``net.kernel`` against the same recursion written straightforwardly in torch, in the same process.

The baseline holds whole ``N × N`` matrices, one fresh matrix per operation, with the textbook forms
(ReLU's angle as ``arccos`` of the clipped correlation, erf's as ``arcsin``): no row blocks, no
triangle mirrored, no in-place passes, no checks. It is what a user would write first, and a
yardstick that moves with the machine: on a shared CPU the times move by 2x between runs, the ratio
``ntkgp / baseline`` of interleaved calls far less. For each case it prints the median time of each
side over ``--repeats`` interleaved pairs after a warm-up, the median of the per-pair ratios (and
their range), the peak resident-memory increase of one call of each (``benchmarks/_memory.py``), and
the largest difference of the two NTKs relative to the largest entry (the baseline's ``arccos`` loses
digits near ``ρ = 1``: ~1e-4 in float32 for ReLU).

Modes: ``nograd`` (``net.kernel(x)`` under ``torch.no_grad()``), ``grad`` (forward and backward
of ``K.sum() + Θ.sum()`` to every layer's variances; the baseline keeps its whole graph), ``diag``
(``net.kernel(x, diag=True)`` against the recursion on the variances alone).

    python benchmarks/kernel_baseline.py                                   # depth-3 ReLU and erf MLPs
    python benchmarks/kernel_baseline.py --sizes 2000 --d 10 --modes grad --dtypes float64

Run it on two code versions (``PYTHONPATH``) for before/after figures: the ratio column is the one
to compare.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import peak_mib, start_measuring

import ntkgp


def straightforward(x: torch.Tensor, activation: str, weights: list, biases: list, ntk: bool = True,
                    diag: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NNGP and NTK of ``Dense → (φ → Dense) × depth`` (NTK parameterization), whole matrices."""
    d = x.shape[-1]
    norms = (x * x).sum(-1)
    kd = weights[0] * norms / d + biases[0]                 # variances k(x_i, x_i)
    k = kd if diag else weights[0] * (x @ x.mT) / d + biases[0]
    theta = k if ntk else None
    for w, b in zip(weights[1:], biases[1:], strict=True):
        if diag:
            if activation == "relu":
                t, t_dot, kd_next = kd / 2, torch.full_like(kd, 0.5), kd / 2
            else:
                q = 1 + 2 * kd
                t = kd_next = (2 / math.pi) * torch.arcsin(2 * kd / q)
                t_dot = (4 / math.pi) / torch.sqrt(q * q - 4 * kd * kd)
        elif activation == "relu":
            s = torch.sqrt(kd)
            outer = s[:, None] * s[None, :]
            c = (k / outer).clamp(-1, 1)
            angle = torch.arccos(c)
            t = outer / (2 * math.pi) * (torch.sqrt(1 - c * c) + (math.pi - angle) * c)
            t_dot = (math.pi - angle) / (2 * math.pi)
            kd_next = kd / 2
        else:   # erf
            q = 1 + 2 * kd
            outer = q[:, None] * q[None, :]
            t = (2 / math.pi) * torch.arcsin(2 * k / torch.sqrt(outer))
            t_dot = (4 / math.pi) / torch.sqrt(outer - 4 * k * k)
            kd_next = (2 / math.pi) * torch.arcsin(2 * kd / q)
        k = w * t + b
        theta = None if theta is None else k + w * t_dot * theta
        kd = w * kd_next + b
    return k, theta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--d", type=int, nargs="+", default=[10, 784])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--activations", nargs="+", default=["relu", "erf"], choices=["relu", "erf"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--modes", nargs="+", default=["nograd", "diag"], choices=["nograd", "grad", "diag"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs of calls after a warm-up")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock time, or the CPU time of the process (all its threads: other jobs on a "
                        "shared machine move it far less; with --threads 1 the steadiest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; depth-{args.depth} MLPs "
          f"(weight_var 2, bias_var 0.01), standard normal inputs; {args.clock} times, medians of {args.repeats} "
          "interleaved pairs")
    print(f"{'act':5} {'dtype':8} {'mode':6} {'N':>6} {'d':>4} | {'ntkgp s':>8} {'MiB':>6} | {'baseline s':>10} "
          f"{'MiB':>6} | {'ntkgp/baseline':>14} {'(range)':>11} | max rel diff NTK")
    for activation in args.activations:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for mode in args.modes:
                for n in args.sizes:
                    for d in args.d:
                        run_case(activation, dtype, mode, n, d, args.depth, args.repeats,
                                 time.perf_counter if args.clock == "wall" else time.process_time)


def run_case(activation: str, dtype: torch.dtype, mode: str, n: int, d: int, depth: int, repeats: int,
             clock: Callable[[], float] = time.perf_counter) -> None:
    net = ntkgp.mlp(depth, activation, 2.0, 0.01).to(dtype)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=dtype)
    # the baseline's hyperparameters: the network's own variances, leaves of their own with autograd
    dense = [m for m in net.modules() if isinstance(m, ntkgp.Dense)]
    weights = [m.weight_var.detach().clone().requires_grad_(mode == "grad") for m in dense]
    biases = [m.bias_var.detach().clone().requires_grad_(mode == "grad") for m in dense]
    diag = mode == "diag"

    def ours() -> torch.Tensor:
        if mode == "grad":
            state = net.kernel(x)
            (state.nngp.sum() + state.ntk.sum()).backward()
            return state.ntk.detach()
        with torch.no_grad():
            return net.kernel(x, diag=diag).ntk

    def baseline() -> torch.Tensor:
        if mode == "grad":
            k, theta = straightforward(x, activation, weights, biases)
            (k.sum() + theta.sum()).backward()
            return theta.detach()
        with torch.no_grad():
            return straightforward(x, activation, weights, biases, diag=diag)[1]

    a, b = ours(), baseline()   # warm-up
    diff = float((a - b).abs().max() / b.abs().max())
    del a, b
    times: tuple[list[float], list[float]] = ([], [])
    ratios = []
    for _ in range(repeats):
        for side, fn in enumerate((ours, baseline)):
            start = clock()
            fn()
            times[side].append(clock() - start)
        ratios.append(times[0][-1] / times[1][-1])
    mib = []
    for fn in (ours, baseline):
        base = start_measuring()
        fn()
        mib.append(peak_mib() - base)
    t_ours, t_base = statistics.median(times[0]), statistics.median(times[1])
    print(f"{activation:5} {str(dtype)[6:]:8} {mode:6} {n:6d} {d:4d} | {t_ours:8.3f} {mib[0]:6.0f} | {t_base:10.3f} "
          f"{mib[1]:6.0f} | {statistics.median(ratios):14.2f} {f'({min(ratios):.2f}-{max(ratios):.2f})':>11} | "
          f"{diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
