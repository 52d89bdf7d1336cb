"""Time and peak memory of gradient-flow predictions (float64).

N training points, M test points, T times, a depth-2 ReLU network on 8-dimensional inputs,
NTK ensemble predictions (``kernel="ntk"``) with and without the ``(T, M, M)`` covariance.
Printed per stage: kernels, the one eigendecomposition, the predictions for all T times; the
whole ``gradient_flow`` call; and neural-tangents' ``gradient_descent_mse_ensemble`` on the same
problem when ``--nt-python`` names an interpreter that has it (timed on its second call, as the
``gradient_flow`` calls here follow the stages that already ran torch's first calls).

    python benchmarks/predict.py [--n 4000 --m 1000 --times 100] [--nt-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import timed

import ntkgp
from ntkgp import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--times", type=int, default=100)
    parser.add_argument("--nt-python", default=os.environ.get("NTKGP_NT_PYTHON"))
    args = parser.parse_args()
    torch.manual_seed(0)
    x_train = torch.randn(args.n, 8, dtype=torch.float64)
    x_test = torch.randn(args.m, 8, dtype=torch.float64)
    y_train = torch.sin(x_train.sum(1, keepdim=True))
    times = torch.logspace(-1, 4, args.times, dtype=torch.float64)
    net = ntkgp.mlp(2, "relu", 2.0, 0.01)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n}, M={args.m}, "
          f"T={args.times}, float64, kernel='ntk', diag_reg=1e-4")

    flow, t_fit, mem_fit = timed(lambda: predict.GradientFlow(net, x_train, y_train, diag_reg=1e-4))
    print(f"  training kernels (NNGP+NTK, {args.n}x{args.n})        {t_fit:8.2f} s  {mem_fit:7.0f} MiB")
    _, t_eig, mem_eig = timed(lambda: flow.eigensystem)
    print(f"  eigendecomposition (float64)                  {t_eig:8.2f} s  {mem_eig:7.0f} MiB")
    out, t_mean, mem_mean = timed(lambda: flow.predict(x_test, t=times, compute_cov=False))
    print(f"  predict mean, {args.times} times (test kernels incl.)    {t_mean:8.2f} s  {mem_mean:7.0f} MiB  "
          f"-> mean {tuple(out.mean.shape)}")
    out, t_cov, mem_cov = timed(lambda: flow.predict(x_test, t=times, compute_cov=True))
    print(f"  predict mean + covariance, {args.times} times         {t_cov:8.2f} s  {mem_cov:7.0f} MiB  "
          f"-> covariance {tuple(out.covariance.shape)}")
    del out
    results = {}
    for cov in (False, True):
        _, total, mem = timed(lambda: predict.gradient_flow(net, x_train, y_train, x_test, t=times,
                                                             diag_reg=1e-4, compute_cov=cov))  # noqa: B023
        results[cov] = (total, mem)
        print(f"  gradient_flow end to end, compute_cov={cov!s:5}   {total:8.2f} s  {mem:7.0f} MiB")
    if args.nt_python:
        script = os.path.join(os.path.dirname(__file__), "nt_predict.py")
        for cov in (False, True):
            try:
                res = subprocess.run([args.nt_python, script, str(args.n), str(args.m), str(args.times),
                                      "1" if cov else "0"], capture_output=True, text=True, timeout=3600)
            except (OSError, subprocess.SubprocessError) as err:
                print(f"  neural-tangents, compute_cov={cov}: failed ({type(err).__name__}: {err})")
                continue
            try:
                nt = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
            except (json.JSONDecodeError, IndexError):
                nt = None
            if nt is None:
                print(f"  neural-tangents, compute_cov={cov}: failed (exit status {res.returncode}: "
                      f"{res.stderr.strip().splitlines()[-1:]})")
                continue
            ratio = results[cov][0] / nt["time"]
            print(f"  neural-tangents, compute_cov={cov!s:5}            {nt['time']:8.2f} s  "
                  f"{nt['peak_mib']:7.0f} MiB   ntkgp/nt time ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
