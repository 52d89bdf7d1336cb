"""Time and peak memory of full NNGP+NTK kernel matrices (depth-3 ReLU network, d = 784).

For each size and dtype it prints, measured in this run:

* ``x@xT``: the input Gram matrix alone (a floor no kernel can beat),
* ``eager``: ``net.kernel(x)`` under ``torch.no_grad()`` (blocked, upper triangle mirrored),
* ``compiled``: ``net.kernel(x, compile=True)``, first call (compilation) and later calls,
* ``nt``: neural-tangents' jitted ``kernel_fn`` on the same data, when ``--nt-python`` names an
  interpreter that has it (it cannot share an environment with current PyTorch/JAX),

and the ratios ``eager / nt`` and ``compiled / nt`` (target: at most 0.5). Times are the minimum
of three calls (``--repeats``) after a warm-up; memory is the peak resident-set increase during those calls (on a
GPU, ``--device cuda``: the peak of torch's allocations during them, beyond what was held before).

    python benchmarks/kernels.py --nt-python /path/to/nt-venv/bin/python
    python benchmarks/kernels.py --activation gelu --normal-scale 3 --d 10 --depth 2 --no-compile
    python benchmarks/kernels.py --device cuda --sizes 4000 16000 --no-compile

With ``--empirical-diag N [N ...]`` it times instead the empirical NTK's diagonal of one finite
network (``--empirical-width`` 512, ``--empirical-d`` 10, ``--empirical-hidden`` 2 ReLU layers,
float64): ``empirical_ntk(model, x, diag=True)`` against ``torch.diagonal(empirical_ntk(model, x))``,
time and peak memory of each and their ratios (full / diag):

    python benchmarks/kernels.py --empirical-diag 2000 8000

With ``--empirical-jacobian N [N ...]`` it times the full empirical NTK on the Jacobian route: a plain
``nn.Sequential(Linear(d, 64), Tanh, Linear(64, 64), Tanh, Linear(64, 1))`` in float64 (no ntkgp
layers, so no layer-by-layer sum), time and peak memory of ``empirical_ntk(model, x)`` and of its
diagonal alone, ``empirical_ntk(model, x, diag=True)``:

    python benchmarks/kernels.py --empirical-jacobian 500 1000 2000 4000

``--empirical-bytes B [B ...]`` times either at these memory budgets in turn (``DIAG_SIGNAL_BYTES``
for ``--empirical-diag``; ``JACOBIAN_BYTES`` and ``DIAG_JACOBIAN_BYTES`` for ``--empirical-jacobian``;
their ``CUDA_`` versions too, as ``--block-entries`` sets both of the analytic kernels'):

    python benchmarks/kernels.py --device cuda --empirical-jacobian 2000 8000 --empirical-bytes 67108864 1073741824
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _memory import peak_mib, start_measuring

import ntkgp
from ntkgp.finite import empirical, empirical_ntk
from ntkgp.layers import base


def measure(fn, repeats: int = 3, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    cuda = device.type == "cuda"
    fn()  # warm-up
    if cuda:   # kernels run asynchronously: a time is only read once the GPU has finished
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = start_measuring()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_mib()
    return min(times), peak - base


def run_nt(python: str, n: int, d: int, depth: int, dtype: str) -> dict | None:
    script = os.path.join(os.path.dirname(__file__), "nt_kernel.py")
    try:
        out = subprocess.run([python, script, str(n), str(d), str(depth), dtype], capture_output=True,
                             text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"  neural-tangents run failed: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    if out.returncode == 0:
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            pass
    # the exit status alone does not say whether JAX, neural-tangents or the script failed
    tail = "\n    ".join(out.stderr.strip().splitlines()[-5:])
    print(f"  neural-tangents run failed (exit status {out.returncode}):\n    {tail}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--d", type=int, default=784)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--nt-python", default=os.environ.get("NTKGP_NT_PYTHON"),
                        help="interpreter with neural-tangents installed (optional)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    parser.add_argument("--activation", default="relu", help="of the MLP (neural-tangents' side: relu only)")
    parser.add_argument("--normal-scale", type=float, help="standard normal inputs times this scale instead of "
                        "uniform ones in [0, 1) (GELU's near-opposite pairs need inputs of both signs)")
    parser.add_argument("--device", default="cpu", help="where ntkgp's kernels run: cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (the minimum is printed)")
    parser.add_argument("--block-entries", type=int, nargs="+", help="entries per row block to time in turn "
                        "(default: ntkgp's, BLOCK_ENTRIES on the CPU and CUDA_BLOCK_ENTRIES on a GPU)")
    parser.add_argument("--empirical-diag", type=int, nargs="+", metavar="N",
                        help="time the empirical NTK's diagonal (diag=True) against the full kernel's at these sizes "
                        "instead of the analytic kernels")
    parser.add_argument("--empirical-width", type=int, default=512, help="of the --empirical-diag network")
    parser.add_argument("--empirical-d", type=int, default=10, help="input features for --empirical-diag")
    parser.add_argument("--empirical-hidden", type=int, default=2, help="hidden layers of the --empirical-diag network")
    parser.add_argument("--empirical-jacobian", type=int, nargs="+", metavar="N",
                        help="time the full empirical NTK of a plain nn.Sequential (the Jacobian route), and its "
                        "diagonal, at these sizes")
    parser.add_argument("--empirical-bytes", type=int, nargs="+", metavar="B",
                        help="memory budgets to time in turn: of a block of points' layer signals with "
                        "--empirical-diag (DIAG_SIGNAL_BYTES), of a chunk of cotangents and of a block of "
                        "per-point Jacobians with --empirical-jacobian (JACOBIAN_BYTES, DIAG_JACOBIAN_BYTES; their "
                        "CUDA_ versions too); default: ntkgp's for the device")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.repeats < 1 or any(b < 1 for b in [*(args.block_entries or ()), *(args.empirical_bytes or ())]):
        parser.error("--repeats, --block-entries and --empirical-bytes take positive numbers")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available to this torch")
    if args.nt_python and args.activation != "relu":
        print("neural-tangents' kernels are ReLU ones: its columns are left out for another activation.")
        args.nt_python = None
    if args.empirical_jacobian:
        empirical_jacobian(args.empirical_jacobian, args.empirical_d, args.repeats, device, args.empirical_bytes)
        return
    if args.empirical_diag:
        empirical_diagonals(args.empirical_diag, args.empirical_width, args.empirical_d, args.empirical_hidden,
                            args.repeats, device, args.empirical_bytes)
        return

    inputs = "uniform in [0, 1)" if args.normal_scale is None else f"{args.normal_scale:g} × standard normal"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; depth-{args.depth} {args.activation}, "
          f"d={args.d}, inputs {inputs}, NNGP+NTK, full symmetric matrix")
    blocks = args.block_entries or [None]
    header = (f"{'dtype':8} {'N':>5} {'block':>8} {'x@xT s':>8} {'eager s':>8} {'MiB':>6} {'compile 1st s':>13} "
              f"{'compiled s':>10} {'nt 1st s':>9} {'nt s':>7} {'nt MiB':>7} {'eager/nt':>8} {'compiled/nt':>11}")
    print(header)
    for dtype in (torch.float32, torch.float64):
        for n in args.sizes:
            torch.manual_seed(0)
            x = (torch.rand(n, args.d, dtype=dtype) if args.normal_scale is None
                 else args.normal_scale * torch.randn(n, args.d, dtype=dtype)).to(device)
            net = ntkgp.mlp(args.depth, args.activation, 2.0, 0.01, width=512)
            nt = run_nt(args.nt_python, n, args.d, args.depth, str(dtype).split(".")[1]) if args.nt_python else None
            nt_first, nt_time, nt_mem = (nt["first"], nt["time"], nt["peak_mib"]) if nt else (float("nan"),) * 3
            for block in blocks:
                if block is not None:
                    base.BLOCK_ENTRIES = base.CUDA_BLOCK_ENTRIES = block
                used = base.CUDA_BLOCK_ENTRIES if device.type == "cuda" else base.BLOCK_ENTRIES
                row = _time_one(net, x, device, args.no_compile, args.repeats)
                t_mm, t_eager, mem_eager, first, t_comp, failed = row
                name = str(dtype).split(".")[1]
                print(f"{name:8} {n:5d} {_entries(used):>8} {t_mm:8.3f} {t_eager:8.3f} "
                      f"{mem_eager:6.0f} {first:13.1f} {t_comp:10.3f} {nt_first:9.2f} {nt_time:7.3f} {nt_mem:7.0f} "
                      f"{t_eager / nt_time:8.2f} {t_comp / nt_time:11.2f}"
                      + ("  (torch.compile failed: eager fallback)" if failed else ""), flush=True)


def empirical_diagonals(sizes: list[int], width: int, d: int, hidden: int, repeats: int,
                        device: torch.device, budgets: list[int] | None = None) -> None:
    """The diagonal of one network's empirical NTK, ``diag=True`` (per-point products of the layer
    signals, ``O(n)``) against the diagonal of the full ``(n, n)`` kernel, in float64."""
    model = ntkgp.mlp(hidden, "relu", 2.0, 0.01, width=width).build(d, seed=0, dtype=torch.float64, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; empirical NTK of one network: {hidden} hidden ReLU layers of width "
          f"{width}, d={d}, float64, standard normal inputs")
    print(f"{'N':>6} {'budget':>7} {'diag s':>8} {'diag MiB':>9} {'full s':>8} {'full MiB':>9} {'full/diag s':>11} "
          f"{'full/diag MiB':>13} {'max |diff| / max':>16}")
    for n in sizes:
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        t_full, mem_full = measure(lambda x=x: torch.diagonal(empirical_ntk(model, x)), repeats, device)
        for budget in budgets or [None]:
            if budget is not None:   # as --block-entries sets base's: the CPU's and the GPU's at once
                empirical.DIAG_SIGNAL_BYTES = empirical.CUDA_DIAG_SIGNAL_BYTES = budget
            used = empirical.CUDA_DIAG_SIGNAL_BYTES if device.type == "cuda" else empirical.DIAG_SIGNAL_BYTES
            t_diag, mem_diag = measure(lambda x=x: empirical_ntk(model, x, diag=True), repeats, device)
            few = x[:500]   # the same values: checked where the full kernel is cheap
            diag, full = empirical_ntk(model, few, diag=True), torch.diagonal(empirical_ntk(model, few))
            error = float((diag - full).abs().max() / full.abs().max())
            print(f"{n:6d} {_entries(used):>7} {t_diag:8.3f} {mem_diag:9.1f} {t_full:8.3f} {mem_full:9.1f} "
                  f"{t_full / t_diag:11.1f} {mem_full / max(mem_diag, 1e-3):13.1f} {error:16.1e}", flush=True)


def empirical_jacobian(sizes: list[int], d: int, repeats: int, device: torch.device,
                       budgets: list[int] | None = None) -> None:
    """The full empirical NTK of a plain torch module (the Jacobian route: the Jacobian of all outputs,
    chunks of cotangents backpropagated through all points) in float64, and its diagonal alone
    (``diag=True``: per-point Jacobians)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1)).to(device, torch.float64)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; empirical NTK of nn.Sequential(Linear({d}, 64), Tanh, Linear(64, 64), "
          "Tanh, Linear(64, 1)), float64, standard normal inputs")
    print(f"{'N':>6} {'budget':>7} {'s':>8} {'MiB':>8} {'kernel MiB':>10} {'budget':>7} {'diag s':>8} {'diag MiB':>8}")
    cuda = device.type == "cuda"
    for n in sizes:
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        for budget in budgets or [None]:
            if budget is not None:   # as --block-entries sets base's: the CPU's and the GPU's at once
                empirical.JACOBIAN_BYTES = empirical.CUDA_JACOBIAN_BYTES = budget
                empirical.DIAG_JACOBIAN_BYTES = empirical.CUDA_DIAG_JACOBIAN_BYTES = budget
            full_budget = empirical.CUDA_JACOBIAN_BYTES if cuda else empirical.JACOBIAN_BYTES
            diag_budget = empirical.CUDA_DIAG_JACOBIAN_BYTES if cuda else empirical.DIAG_JACOBIAN_BYTES
            t, mem = measure(lambda x=x: empirical_ntk(model, x), repeats, device)
            t_diag, mem_diag = measure(lambda x=x: empirical_ntk(model, x, diag=True), repeats, device)
            print(f"{n:6d} {_entries(full_budget):>7} {t:8.3f} {mem:8.0f} {8 * n * n / 2**20:10.1f} "
                  f"{_entries(diag_budget):>7} {t_diag:8.3f} {mem_diag:8.0f}", flush=True)


def _entries(n: int) -> str:
    """A block size as printed: ``2^k`` for a power of two, else the number (1000 was printed as 2^9)."""
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _time_one(net, x, device: torch.device, no_compile: bool, repeats: int) -> tuple:
    with torch.no_grad():
        t_mm, _ = measure(lambda: x @ x.T, repeats, device)
        t_eager, mem_eager = measure(lambda: net.kernel(x), repeats, device)
        first = t_comp = float("nan")
        failed = False
        if not no_compile:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                net.kernel(x, compile=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            # a failed compilation falls back to the eager path: its times are not compiled ones
            failed = any("torch.compile failed" in str(w.message) for w in caught)
            if failed:
                first = float("nan")
            else:
                t_comp, _ = measure(lambda: net.kernel(x, compile=True), repeats, device)
    return t_mm, t_eager, mem_eager, first, t_comp, failed

if __name__ == "__main__":
    main()
