"""``Numerical`` kernels: the adaptive degree per kernel entry against one degree per call.

``serial(Dense(8), Numerical(tanh), Dense(1))`` on standard normal inputs in ``d`` dimensions
(pre-activation variances ~0.03–4, where the largest needs the degree cap). For each size it
prints, measured in this run, the NNGP and NTK time of

* ``per entry``: ``Numerical(torch.tanh)`` (each entry takes the degree its two variances need),
* ``per call``: ``Numerical(torch.tanh, degree=D)`` with ``D`` the largest of those degrees, which
  is the degree a rule choosing one degree per call (for the largest variance in it) would use,

their ratio, the largest relative difference between the two kernels, and the share of entries
below ``D``. Times are the fastest of ``--repeats`` calls (default 1) of the same network on the
same points, after an untimed first call.

    python benchmarks/quadrature.py [--sizes 100 300 --d 3 --repeats 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import ntkgp


def timed(net: ntkgp.Layer, x: torch.Tensor, repeats: int) -> tuple[float, ntkgp.KernelState]:
    """The fastest of ``repeats`` calls after an untimed one: the first call pays one-off costs
    (Gauss-Hermite rules built and cached, torch's first calls), which made the adaptive rule look
    slower than a fixed degree at 20 points when it was timed first. The untimed call takes two of
    the points, and each timed call a layer whose kept degree search is cleared: a ``Numerical``
    layer keeps its last search, and timed calls on the same points read it instead of searching."""
    seconds = []
    layers = [m for m in net.modules() if isinstance(m, ntkgp.Numerical)]
    with torch.no_grad():
        net.kernel(x[:2])
        for _ in range(repeats):
            for layer in layers:
                layer._degree_cache = None
            start = time.perf_counter()
            k = net.kernel(x)
            seconds.append(time.perf_counter() - start)
    return min(seconds), k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--d", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per network, the fastest counts")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float64, d = {args.d}; "
          f"fastest of {args.repeats} after a warm-up")
    print(f"{'N':>6} {'degree':>6} {'per entry s':>12} {'per call s':>11} {'ratio':>6} {'max rel diff':>13} "
          f"{'entries < D':>12}")
    for n in args.sizes:
        x = torch.randn(n, args.d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        adaptive = ntkgp.Numerical(torch.tanh)
        net = ntkgp.serial(ntkgp.Dense(8), adaptive, ntkgp.Dense(1))
        t_entry, k_entry = timed(net, x, args.repeats)
        variances = net.layers[0].kernel(x, diag=True).nngp.detach()   # what the activation sees
        degrees = adaptive.entry_degrees(variances[:, None], variances[None, :])
        top = int(degrees.max())
        fixed = ntkgp.serial(ntkgp.Dense(8), ntkgp.Numerical(torch.tanh, degree=top), ntkgp.Dense(1))
        t_call, k_call = timed(fixed, x, args.repeats)
        diff = max(float((getattr(k_entry, a) - getattr(k_call, a)).abs().max() / getattr(k_call, a).abs().max())
                   for a in ("nngp", "ntk"))
        below = float((degrees < top).double().mean())
        print(f"{n:>6} {top:>6} {t_entry:>12.2f} {t_call:>11.2f} {t_call / t_entry:>5.1f}x {diff:>13.1e} "
              f"{below:>11.0%}")


if __name__ == "__main__":
    main()
