"""Kernels with autograd: time and peak memory of one hyperparameter-gradient evaluation.

What GPyTorch does in every training iteration: ``K = kernel(X, X)`` with grad mode on, then a
backward pass to the weight/bias variances. Each configuration runs in a child process of its
own (so that memory one freed stays out of the next one's figure) and is timed as the minimum
of three forward+backward passes after a warm-up. Compared, on the same data:

* ``whole graph``: the full-matrix recursion with every intermediate kept for the backward
  pass (what ``net.kernel`` did before checkpointing; forced with ``CHECKPOINT_ENTRIES`` above
  the kernel's size),
* ``checkpointed``: the default, row blocks recomputed in the backward pass. Kernels below
  ``CHECKPOINT_ENTRIES`` entries (``N < 1024`` symmetric), or that fit in one row block, keep the
  whole graph by default, so their two rows measure the same path (a note says so);
  ``--checkpoint-entries`` lowers the threshold in this mode's child to time checkpointing there.

Printed: seconds forward, seconds forward+backward, peak resident memory above the start (MiB)
and in kernel-sized matrices (N² values), and the ratios.

With ``--gpytorch`` each size is instead a GPyTorch ``ExactGP`` with ``NTKKernel`` (or
``NNGPKernel``) and a constant mean, trained by Adam on the exact marginal likelihood (GPyTorch's
defaults: conjugate gradients above 800 points): seconds and peak memory per iteration over five
iterations after one, and the loss after them (same seed in both modes).

    python benchmarks/kernel_grad.py [--sizes 1024 2000 4000 --depth 3 --activation relu]
    python benchmarks/kernel_grad.py --sizes 724 900 --checkpoint-entries 1
    python benchmarks/kernel_grad.py --gpytorch --sizes 3000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(__file__))
from _memory import peak_mib, start_measuring

import ntkgp
from ntkgp.layers import base


def _setup(mode: str, block_entries: int | None, checkpoint_entries: int | None) -> None:
    if mode == "whole graph":
        base.CHECKPOINT_ENTRIES = 1 << 62
    elif checkpoint_entries is not None:
        base.CHECKPOINT_ENTRIES = checkpoint_entries
    if block_entries:
        base.CHECKPOINT_BLOCK_ENTRIES = block_entries


def not_checkpointed(n: int, checkpoint_entries: int | None, block_entries: int | None) -> str | None:
    """Why the checkpointed mode's child keeps the whole graph for a symmetric kernel of ``n``
    points (the conditions of ``Layer.kernel``, with the thresholds that child uses), or None."""
    threshold = base.CHECKPOINT_ENTRIES if checkpoint_entries is None else checkpoint_entries
    block = block_entries or base.CHECKPOINT_BLOCK_ENTRIES
    if n * n < threshold:
        return f"N² < CHECKPOINT_ENTRIES = {threshold} (--checkpoint-entries lowers it)"
    if base._rows_per_block(n, n, 1, block) >= n:
        return f"the kernel fits in one row block of {block} entries (--block-entries lowers it)"
    return None


def child(n: int, depth: int, activation: str, kind: str, dt: torch.dtype) -> dict:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0), dtype=dt)
    net = ntkgp.mlp(depth, activation, 2.0, 0.05).to(dt)

    def run(points: Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        k = getattr(net.kernel(points, ntk=kind == "ntk"), kind)
        t1 = time.perf_counter()
        k.sum().backward()
        return t1 - t0, time.perf_counter() - t0

    run(x[:min(n, 1100)])   # warm-up on the same code path (checkpointing starts at 2^20 entries)
    start = start_measuring()
    runs = [run(x) for _ in range(3)]
    return {"forward": min(r[0] for r in runs), "total": min(r[1] for r in runs), "peak": peak_mib() - start,
            "matrix": n * n * dt.itemsize / 2**20}


def gpytorch_child(n: int, depth: int, activation: str, kind: str, dt: torch.dtype) -> dict:
    import gpytorch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g, dtype=dt)
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dt)
    kernel_class = ntkgp.NTKKernel if kind == "ntk" else ntkgp.NNGPKernel

    class Model(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean = gpytorch.means.ConstantMean()
            self.covar = kernel_class(ntkgp.mlp(depth, activation, 2.0, 0.05))

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covar(z))

    model = Model().to(dt)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()

    def iteration() -> float:
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    torch.manual_seed(0)    # GPyTorch's stochastic log-determinant probes
    iteration()
    start = start_measuring()
    t0 = time.perf_counter()
    losses = [iteration() for _ in range(5)]
    return {"iteration": (time.perf_counter() - t0) / 5, "peak": peak_mib() - start, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2000, 4000])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--kind", choices=["nngp", "ntk"], default="ntk")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--block-entries", type=int, help="entries per checkpointed row block "
                        "(default: ntkgp.layers.base.CHECKPOINT_BLOCK_ENTRIES)")
    parser.add_argument("--checkpoint-entries", type=int, help="kernel entries from which the checkpointed "
                        "mode checkpoints (default: ntkgp.layers.base.CHECKPOINT_ENTRIES)")
    parser.add_argument("--gpytorch", action="store_true", help="time ExactGP training iterations instead")
    parser.add_argument("--child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    measure = gpytorch_child if args.gpytorch else child
    if args.child:
        _setup(args.child[1], args.block_entries, args.checkpoint_entries)
        dtype = getattr(torch, args.dtype)
        print(json.dumps(measure(int(args.child[0]), args.depth, args.activation, args.kind, dtype)))
        return

    def in_child(n: int, mode: str) -> dict | None:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(n), mode]   # the same options
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n:>6} {mode:>13} failed: {out.stderr.strip().splitlines()[-1:]}")
            return None
        return json.loads(out.stdout)

    for n in args.sizes:
        if (why := not_checkpointed(n, args.checkpoint_entries, args.block_entries)) is not None:
            print(f"note: N = {n} is not checkpointed, {why}: its checkpointed row runs the whole-graph path")
    setting = f"depth-{args.depth} {args.activation} {args.kind}, d = 8, {args.dtype}"
    if args.gpytorch:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPyTorch ExactGP, {setting}, "
              "Adam on the exact marginal likelihood")
        print(f"{'N':>6} {'mode':>13} {'s/iteration':>12} {'peak MiB':>9} {'loss after 6':>13}")
        for n in args.sizes:
            for mode in ("whole graph", "checkpointed"):
                if (r := in_child(n, mode)) is not None:
                    print(f"{n:>6} {mode:>13} {r['iteration']:>12.2f} {r['peak']:>9.0f} {r['loss']:>13.6f}")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {setting}, "
          "gradient to the weight/bias variances")
    print(f"{'N':>6} {'mode':>13} {'forward s':>10} {'fwd+bwd s':>10} {'peak MiB':>9} {'matrices':>9}")
    for n in args.sizes:
        results = {}
        for mode in ("whole graph", "checkpointed"):
            if (r := in_child(n, mode)) is not None:
                results[mode] = r
                print(f"{n:>6} {mode:>13} {r['forward']:>10.3f} {r['total']:>10.3f} {r['peak']:>9.0f} "
                      f"{r['peak'] / r['matrix']:>9.1f}")
        if len(results) == 2:
            w, c = results["whole graph"], results["checkpointed"]
            print(f"{n:>6} {'ratio':>13} {c['forward'] / w['forward']:>10.2f} {c['total'] / w['total']:>10.2f} "
                  f"{c['peak'] / w['peak']:>9.2f}")


if __name__ == "__main__":
    main()
