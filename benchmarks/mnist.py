"""MNIST classification as regression with NNGP and NTK (Lee et al. 2018; Lee et al. 2019).

Only the 10k MNIST *test* images are available offline, so they are split: the first
``--n-train`` images train, the last ``--n-test`` images test (disjoint while their sum is at
most 10000). Pixels are scaled to [0, 1]; targets are one-hot vectors minus 0.1
(:func:`ntkgp.bayes.one_hot_targets`). For every depth (hidden ReLU layers) and weight variance
``σ_w²`` (bias variance ``--bias-var``) two predictors are scored:

* ``NNGP``: the exact posterior of the infinitely wide Bayesian network,
  ``ntkgp.predict.gp_posterior(kernel="nngp")``;
* ``NTK``: the infinite ensemble trained to convergence by gradient flow on the squared loss,
  ``gp_posterior(kernel="ntk")``, whose mean is ``Θ*d (Θ + σ²I)⁻¹ Y``.

The regularizer is relative, ``σ² = diag_reg · mean(diag K_train)`` (with ``K`` the NNGP or the
NTK), so it does not change with the kernel's overall scale. Unless ``--diag-reg`` is given it is
chosen once from ``--reg-grid`` by the accuracy of the NNGP (depth 3, ``σ_w² = 2``) on validation
images ``n_train … n_train + n_val − 1``, which are neither training nor test images (ties go to
the larger, numerically safer regularizer). Reported: test accuracy (argmax of
the posterior mean) and the AUROC of the predictive variance (one per test point; the 10
outputs share it) for detecting misclassified test images.

    python benchmarks/mnist.py --data /path/to/mnist --n-train 7000 --depths 1 2 3 5 8 --threads 1 --out docs/mnist.md

(the configuration of ``docs/mnist.md``, about 7 minutes on one thread; the defaults, 5000 training
images and depths 1, 2, 3, 5, give a smaller sweep).
"""

from __future__ import annotations

import argparse
import gzip
import math
import pathlib
import platform
import struct
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

import ntkgp
from ntkgp.bayes import accuracy, misclassification_auroc, one_hot_targets, predictive_moments

IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    """An IDX file (big-endian header: magic, then one uint32 per dimension; uint8 data)."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:  # not gzip, or truncated: gzip's message does not name the file
        raise ValueError(f"{path} is not a complete gzip file: {err}") from None
    if len(raw) < 4:
        raise ValueError(f"{path} holds {len(raw)} bytes, too few for an IDX header.")
    found, = struct.unpack(">i", raw[:4])
    if found != magic:
        raise ValueError(f"{path} has magic number {found}, expected {magic}.")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values.")
    return data.reshape(shape)


def load(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, rows·cols)`` in [0, 1] and labels ``(N,)``."""
    images = read_idx(folder / IMAGES, 2051)
    labels = read_idx(folder / LABELS, 2049).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
    return images.reshape(images.shape[0], -1) / 255.0, labels


def evaluate(net, kind: str, x_train, targets, x_test, y_test, diag_reg: float) -> dict[str, float]:
    start = time.perf_counter()
    with torch.no_grad():
        diag = net.kernel(x_train, diag=True, ntk=kind == "ntk")
    noise = diag_reg * float((diag.ntk if kind == "ntk" else diag.nngp).mean())
    post = ntkgp.predict.gp_posterior(net, x_train, targets, x_test, kernel=kind, noise=noise)
    mean, var = predictive_moments(post)
    result = {"accuracy": accuracy(mean, y_test), "seconds": time.perf_counter() - start}
    try:
        result["auroc"] = misclassification_auroc(mean, var, y_test)
    except ValueError:  # no error at all (or no correct prediction): the AUROC is undefined
        result["auroc"] = float("nan")
    return result


def markdown(results: dict, args, seconds: float) -> str:
    def grid(kind: str, metric: str, digits: int) -> list[str]:
        head = "| depth | " + " | ".join(f"σ_w² = {w:g}" for w in args.weight_vars) + " |"
        lines = [head, "|---|" + "---|" * len(args.weight_vars)]
        for depth in args.depths:
            cells = []
            for w in args.weight_vars:
                value = results[(depth, w, kind)][metric]
                cells.append("—" if np.isnan(value) else f"{value:.{digits}f}")
            lines.append(f"| {depth} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    best = max(results.items(), key=lambda item: item[1]["accuracy"])
    (b_depth, b_w, b_kind), b_res = best
    lines = [
        "# MNIST: NNGP and NTK classification as regression",
        "",
        "Generated by `benchmarks/mnist.py` (see its docstring). Only the 10k MNIST test images are "
        f"available offline: images 0..{args.n_train - 1} train, images {args.n_images - args.n_test}.."
        f"{args.n_images - 1} test "
        f"({args.n_test}). ReLU MLP, bias variance σ_b² = {args.bias_var:g}, relative regularizer "
        f"σ² = {args.diag_reg:g} · mean diag of the training kernel, one-hot targets minus 0.1, float64.",
        "",
        *([f"The regularizer was chosen by NNGP (depth 3, σ_w² = 2) accuracy on validation images "
           f"{args.n_train}..{args.n_train + args.n_val - 1}: "
           + ", ".join(f"{reg:g} → {acc:.4f}" for reg, acc in args.validation.items())
           + " (ties go to the larger regularizer).", ""]
          if args.validation else []),
        "Command: `python benchmarks/mnist.py " + " ".join(args.argv) + "`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; total wall time {seconds / 60:.1f} min.",
        "",
        f"Best: {b_kind.upper()} depth {b_depth}, σ_w² = {b_w:g}: accuracy {b_res['accuracy']:.4f}.",
        "",
        "## Test accuracy, NNGP posterior mean", "", *grid("nngp", "accuracy", 4),
        "## Test accuracy, NTK (infinite ensemble trained to convergence)", "", *grid("ntk", "accuracy", 4),
        "## AUROC of the predictive variance for flagging misclassified images, NNGP", "",
        *grid("nngp", "auroc", 3),
        "## AUROC of the predictive variance for flagging misclassified images, NTK", "",
        *grid("ntk", "auroc", 3),
        "## Seconds per fit (kernels, factorization, prediction with covariance), NNGP / NTK", "",
    ]
    head = "| depth | " + " | ".join(f"σ_w² = {w:g}" for w in args.weight_vars) + " |"
    lines += [head, "|---|" + "---|" * len(args.weight_vars)]
    for depth in args.depths:
        cells = [f"{results[(depth, w, 'nngp')]['seconds']:.1f} / {results[(depth, w, 'ntk')]['seconds']:.1f}"
                 for w in args.weight_vars]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, required=True, help=f"folder with {IMAGES} and {LABELS}")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--weight-vars", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--bias-var", type=float, default=0.01)
    parser.add_argument("--diag-reg", type=float, default=None, help="fixed relative regularizer (skips selection)")
    parser.add_argument("--reg-grid", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--n-val", type=int, default=1000, help="validation images for choosing the regularizer")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 avoids thread thrashing on a shared machine)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    for name in (IMAGES, LABELS):
        if not (args.data / name).is_file():
            parser.error(f"{args.data / name} does not exist")
    if args.n_train < 1 or args.n_test < 1 or args.n_val < 1:
        parser.error("--n-train, --n-test and --n-val must be positive")
    # NaN fails the chained comparison (it passed "min(grid) <= 0" and was refused only by the first fit)
    if not all(0 < reg < math.inf for reg in [*args.reg_grid, *([] if args.diag_reg is None else [args.diag_reg])]):
        parser.error("regularizers must be finite and positive")
    # Every network is built now: a bad depth or variance failed only after the regularizer search
    # (four fits on the training images).
    for depth in args.depths:
        for w in args.weight_vars:
            try:
                ntkgp.mlp(depth, "relu", weight_var=w, bias_var=args.bias_var)
            except ValueError as err:
                parser.error(f"--depths {depth}, --weight-vars {w:g}, --bias-var {args.bias_var:g}: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the sweep; returns ``{(depth, weight_var, kind): {"accuracy", "auroc", "seconds"}}``."""
    args = parse_args(argv)
    x, labels = load(args.data)
    n_val = 0 if args.diag_reg is not None else args.n_val
    if args.n_train + n_val + args.n_test > x.shape[0]:
        raise ValueError(f"{args.n_train} training + {n_val} validation + {args.n_test} test images exceed the "
                         f"{x.shape[0]} available.")
    x = torch.as_tensor(x, dtype=torch.float64)
    args.n_images = x.shape[0]
    x_train, x_test = x[:args.n_train], x[x.shape[0] - args.n_test:]
    y_train, y_test = labels[:args.n_train], labels[x.shape[0] - args.n_test:]
    targets = one_hot_targets(y_train, num_classes=10)
    start = time.perf_counter()
    args.validation = {}
    if args.diag_reg is None:
        x_val, y_val = x[args.n_train:args.n_train + n_val], labels[args.n_train:args.n_train + n_val]
        reference = ntkgp.mlp(3, "relu", weight_var=2.0, bias_var=args.bias_var)
        for reg in args.reg_grid:
            args.validation[reg] = evaluate(reference, "nngp", x_train, targets, x_val, y_val, reg)["accuracy"]
            print(f"validation: diag_reg {reg:g}: accuracy {args.validation[reg]:.4f}", flush=True)
        args.diag_reg = max(args.reg_grid, key=lambda reg: (args.validation[reg], reg))
    results = {}
    for depth in args.depths:
        for w in args.weight_vars:
            net = ntkgp.mlp(depth, "relu", weight_var=w, bias_var=args.bias_var)
            for kind in ("nngp", "ntk"):
                results[(depth, w, kind)] = evaluate(net, kind, x_train, targets, x_test, y_test, args.diag_reg)
                r = results[(depth, w, kind)]
                print(f"depth {depth} σ_w² {w:g} {kind:>4}: accuracy {r['accuracy']:.4f} AUROC {r['auroc']:.3f} "
                      f"({r['seconds']:.1f} s)", flush=True)
    report = markdown(results, args, time.perf_counter() - start)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return results


if __name__ == "__main__":
    main()
