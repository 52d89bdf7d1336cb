"""Time of linearized training on cross-entropy (``ntkgp.predict.gradient_descent``, float64).

N training points in k classes (one-hot targets), M test points, T times (log-spaced up to
``--t-max`` steps), 8-dimensional inputs, the NTK of a depth-2 ReLU network, learning rate 1,
without and with momentum 0.9. Printed: the ODE solution at all T times (its solver steps and
loss-gradient evaluations), the same number of exact discrete steps, and neural-tangents'
``predict.gradient_descent`` on the same kernels (written to a temporary file) when
``--nt-python`` names an interpreter that has it, timed on its second call; and the largest
difference between the two ODE solutions.

    python benchmarks/descent.py [--n 1000 --m 500 --classes 10 --times 20 --t-max 1000] [--nt-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import torch

import ntkgp
from ntkgp import predict


def xent(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(y * f.log_softmax(-1)).sum(-1).mean()


class Counted:
    """``loss`` counting its gradient evaluations (one per call)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return xent(f, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--m", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument("--t-max", type=float, default=1000.0)
    parser.add_argument("--nt-python", default=os.environ.get("NTKGP_NT_PYTHON"))
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n + args.m, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    y = torch.nn.functional.one_hot(labels, args.classes).to(torch.float64)
    with torch.no_grad():
        ntk = ntkgp.mlp(2, "relu", 2.0, 0.01).kernel(x).ntk
    k_dd, k_td = ntk[:args.n, :args.n], ntk[args.n:, :args.n]
    times = torch.logspace(-1, np.log10(args.t_max), args.times, dtype=torch.float64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n}, M={args.m}, "
          f"k={args.classes}, T={args.times} times up to {args.t_max:g} steps, float64, cross-entropy")
    ours = {}
    for momentum in (None, 0.9):
        loss = Counted()
        start = time.perf_counter()
        ours[momentum] = predict.gradient_descent(loss, k_dd, y, ntk_test_train=k_td, fx_test_0=0.0, t=times,
                                                  momentum=momentum)
        elapsed = time.perf_counter() - start
        # 6 new stages per attempted step, beside the up-front check and two evaluations at the start
        print(f"  ODE, momentum={momentum!s:4}: {elapsed:8.2f} s   {loss.calls:6d} loss gradients "
              f"(~{(loss.calls - 3) // 6} solver steps)")
        start = time.perf_counter()
        predict.gradient_descent(xent, k_dd, y, ntk_test_train=k_td, fx_test_0=0.0,
                                 steps=times.round().clamp_min(1).long(), momentum=momentum)
        print(f"  {int(args.t_max)} exact steps, momentum={momentum!s:4}: {time.perf_counter() - start:8.2f} s")
    if args.nt_python:
        script = os.path.join(os.path.dirname(__file__), "nt_descent.py")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "problem.npz")
            np.savez(path, k_dd=k_dd.numpy(), k_td=k_td.numpy(), y=y.numpy(), times=times.numpy())
            for momentum in (None, 0.9):
                res = subprocess.run([args.nt_python, script, path, str(momentum)], capture_output=True, text=True,
                                     timeout=3600)
                if res.returncode != 0:
                    print(f"  neural-tangents, momentum={momentum}: failed ({res.stderr.strip().splitlines()[-1:]})")
                    continue
                nt = json.loads(res.stdout.strip().splitlines()[-1])
                theirs = np.load(nt["out"])
                train, test = ours[momentum]
                diff = max(np.abs(train.numpy() - theirs["train"]).max(), np.abs(test.numpy() - theirs["test"]).max())
                print(f"  neural-tangents, momentum={momentum!s:4}: {nt['time']:8.2f} s   "
                      f"max |ntkgp - nt| = {diff:.2e} (outputs up to {np.abs(theirs['train']).max():.1f})")


if __name__ == "__main__":
    main()
