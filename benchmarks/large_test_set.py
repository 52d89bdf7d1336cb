"""Peak memory and time of predictions at many test points: the ``(M, M)`` covariance against the
marginal variances alone (``compute_cov="diag"``), and the mean alone (float64).

N training points, M test points, a depth-2 ReLU network on 8-dimensional inputs. Each row is one
``predict`` call on a predictor whose training factorization is already cached, so the figures
are those of the test side: the kernels between test and training points, and what the
covariance or its diagonal adds. One ``(M, M)`` float64 matrix is ``8 M²`` bytes (763 MiB at
M = 10 000); the diagonal path forms nothing larger than ``(M, N)``.

    python benchmarks/large_test_set.py [--n 2000 --m 10000]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import timed

import ntkgp
from ntkgp import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="training points")
    parser.add_argument("--m", type=int, default=10000, help="test points")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    x, xt = torch.randn(args.n, 8, dtype=torch.float64), torch.randn(args.m, 8, dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    matrix_mib = 8 * args.m ** 2 / 2 ** 20
    print(f"N = {args.n}, M = {args.m}, float64, {torch.get_num_threads()} threads; one (M, M) matrix is "
          f"{matrix_mib:.0f} MiB, one (M, N) {8 * args.m * args.n / 2 ** 20:.0f} MiB\n")
    print("| predictor | output | time s | peak MiB above start | in (M, M) matrices |")
    print("|---|---|---|---|---|")
    cases = [("GPPosterior nngp", predict.GPPosterior(net, x, y, noise=1e-2), {}),
             ("GradientFlow ntk, t = ∞", predict.GradientFlow(net, x, y, diag_reg=1e-4), {"t": math.inf}),
             ("GradientFlow ntk, t = 10", predict.GradientFlow(net, x, y, diag_reg=1e-4), {"t": 10.0})]
    for name, predictor, when in cases:
        predictor.predict(xt[:10], **when)   # the training factorization, cached, outside the figures
        results = {}
        for label, cov in (("mean", False), ("mean + marginal variances", "diag"), ("mean + covariance", True)):
            out, seconds, mib = timed(lambda p=predictor, c=cov, w=when: p.predict(xt, compute_cov=c, **w))
            results[label] = out
            print(f"| {name} | {label} | {seconds:.2f} | {mib:.0f} | {mib / matrix_mib:.2f} |")
            del out
        full, diag = results["mean + covariance"], results["mean + marginal variances"]
        gap = float((diag.marginal - torch.diagonal(full.covariance)).abs().max()) / full.scale
        print(f"| {name} | max difference of the variances / prior scale | {gap:.1e} | | |")
        del results, full, diag


if __name__ == "__main__":
    main()
