"""Large inputs: temporary memory stays a small multiple of what is computed.

Peaks are read from Linux's ``VmHWM`` after resetting it (``/proc/self/clear_refs``), in a new
interpreter per test (the ``fresh_process`` marker, conftest.py) whose large tensors are each
allocated with ``mmap``: a temporary of their size shows up in it, whatever ran before.
"""

from __future__ import annotations

import pytest
import torch
from conftest import peak_above_current

import ntkgp
from ntkgp.layers import state as state_module
from ntkgp.layers.validation import all_finite


@pytest.mark.fresh_process
@pytest.mark.parametrize("diag", [False, True])
def test_input_checks_allocate_no_input_sized_temporaries(diag):
    # 64 MiB of float32 inputs, a 256 x 256 kernel (0.25 MiB per matrix). The finiteness check
    # (torch.isfinite(x).all(): |x| and two masks, 112 MiB) and the duplicate screen (an int64
    # cast of all the bit patterns, 128 MiB) each took about twice the inputs for a yes or no.
    x = torch.randn(256, 65536, generator=torch.Generator().manual_seed(0))
    net = ntkgp.mlp(1, "relu", 2.0, 0.01)
    with torch.no_grad():
        net.kernel(x[:2, :64], diag=diag)   # one-time buffers (BLAS, thread pools) before measuring
        peak = peak_above_current(lambda: net.kernel(x, diag=diag))
    assert peak < 16, peak       # a quarter of the inputs: blocks, the kernels and allocator slack


def test_row_keys_in_blocks_equal_the_whole_sum(monkeypatch):
    # the duplicate screen's keys, summed in int64 a few rows at a time, are those of one sum
    monkeypatch.setattr(state_module, "_KEY_BLOCK_ENTRIES", 3 * 5)
    g = torch.Generator().manual_seed(1)
    for dtype, ints in ((torch.float32, torch.int32), (torch.float16, torch.int16), (torch.float64, torch.int64)):
        x = torch.randn(2, 7, 5, generator=g).to(dtype)
        x[1, 4] = x[0, 2]
        expected = x.view(ints).sum(-1, dtype=torch.int64)
        assert torch.equal(state_module._row_keys(x), expected)
    with torch.no_grad():   # duplicates across blocks of the screen are still found: exact pairs
        x = torch.randn(9, 5, generator=g, dtype=torch.float32)
        x[8] = x[0]
        k = ntkgp.mlp(2, "relu", 2.0, 0.0).kernel(x).nngp
    assert torch.equal(k[0, 8], k[0, 0]) and torch.equal(k[8, 8], k[0, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    x = torch.randn(4, 6).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3, 5] = bad
        assert not all_finite(y)
        with pytest.raises(ValueError, match="NaN or infinite"):
            ntkgp.mlp(1).kernel(y.double())
    huge = torch.full((3, 2), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(huge) and all_finite(-huge)


@pytest.mark.fresh_process
def test_layerwise_empirical_ntk_keeps_at_most_four_kernel_sized_matrices():
    # each layer's gram and term were fresh products, and the previous layer's were still bound while
    # the next were formed: 5.3 kernel-sized matrices at the peak, now 3 (the sum, a gram, a term)
    net = ntkgp.mlp(3, "relu", 2.0, 0.01, width=16)
    model = net.build(8, seed=0, dtype=torch.float64)
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ntkgp.finite.empirical_ntk(model, x[:5])                 # one-time buffers before measuring
    result = []
    peak = peak_above_current(lambda: result.append(ntkgp.finite.empirical_ntk(model, x)))
    matrix = 3000 * 3000 * 8 / 2**20
    assert peak < 4 * matrix, peak / matrix
    # the same numbers as the Jacobian route (per-parameter sums in another order: rounding only)
    sub = x[::100]
    params = dict(model.named_parameters())
    reference = ntkgp.finite.empirical_ntk(model, sub, params=params)
    assert torch.allclose(result[0][::100, ::100], reference, rtol=1e-12, atol=0)


@pytest.mark.fresh_process
def test_hyperparameter_gradients_of_large_kernels_keep_a_few_kernel_sized_matrices():
    # with autograd the whole-matrix recursion kept every intermediate for the backward pass: 85
    # kernel-sized matrices at the peak for this depth-3 NTK (2.6 GiB at N = 2000). Checkpointed
    # row blocks keep the two kernels, the incoming gradient and the blocks' mirrored gradients,
    # plus one block's intermediates while it is recomputed (~200 MiB, whatever N).
    import ctypes

    net = ntkgp.mlp(3, "relu", 2.0, 0.05).double()
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net.kernel(x[:1100]).ntk.sum().backward()         # one-time buffers on the same path
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)        # memory the warm-up freed goes back to the system
    except OSError:
        pass

    def step() -> None:
        net.kernel(x).ntk.sum().backward()

    peak = peak_above_current(step)
    matrix = 2000 * 2000 * 8 / 2**20
    assert peak < 12 * matrix, peak / matrix
    assert all(p.grad is not None and all_finite(p.grad) for p in net.parameters())


def test_kernel_grad_benchmark_runs_both_modes():
    """benchmarks/kernel_grad.py (the figures in docs/benchmarks.md) at toy size: both modes
    run in their child processes and the checkpointed one is the lighter."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_grad.py"
    out = subprocess.run([sys.executable, str(script), "--sizes", "1100", "--depth", "1", "--kind", "nngp"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peaks = {mode: float(line.split()[-2]) for line in out.stdout.splitlines()
             for mode in ("whole graph", "checkpointed") if line.strip().startswith("1100") and mode in line}
    assert set(peaks) == {"whole graph", "checkpointed"} and "ratio" in out.stdout, out.stdout
    whole, checkpointed = peaks["whole graph"], peaks["checkpointed"]
    assert checkpointed < whole, out.stdout


@pytest.mark.fresh_process
def test_monte_carlo_kernel_does_not_stack_the_samples():
    # 256 NNGP samples of 300 points: stacked (a list, then its concatenation) they took 2 x 176 MiB;
    # running moments hold one ensemble batch (64 x 0.7 MiB) besides the two result matrices
    net = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ntkgp.finite.monte_carlo_kernel(net, x[:5], n_samples=2, ntk=False)   # one-time buffers
    result = []
    peak = peak_above_current(lambda: result.append(
        ntkgp.finite.monte_carlo_kernel(net, x, n_samples=256, ntk=False, ensemble_batch=64)))
    assert peak < 100, peak


def test_monte_carlo_running_moments_equal_stacked_ones():
    # batches of unequal size (5 + 5 + 3 members), NNGP and NTK: mean and standard error as from all
    # samples stacked, to rounding
    net = ntkgp.mlp(2, "erf", 1.5, 0.1, width=16)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    est = ntkgp.finite.monte_carlo_kernel(net, x, n_samples=13, seed=7, ensemble_batch=5)
    nngps, ntks = [], []
    for b, size in enumerate((5, 5, 3)):
        model = net.build(3, seed=7 + 1_000_003 * b, ensemble_size=size, dtype=torch.float64)
        nngps.append(ntkgp.finite.empirical_nngp(model, x))
        ntks.append(ntkgp.finite.empirical_ntk(model, x))
    for samples, mean, sem in ((nngps, est.nngp, est.nngp_sem), (ntks, est.ntk, est.ntk_sem)):
        stacked = torch.cat(samples)
        assert torch.allclose(mean, stacked.mean(0), rtol=1e-12, atol=1e-15)
        assert torch.allclose(sem, stacked.std(0) / 13**0.5, rtol=1e-10, atol=1e-15)
    one = ntkgp.finite.monte_carlo_kernel(net, x, n_samples=1, ntk=False)
    assert one.nngp_sem.isnan().all() and one.nngp.isfinite().all()


@pytest.mark.fresh_process
def test_posterior_setup_and_infinite_time_fit_stay_near_two_kernel_sized_matrices():
    # torch.cholesky_solve copied the whole factor on every call, regularize formed diag_embed(...)
    # besides the sum, and check_symmetric |k| and |k - kᵀ| besides k - kᵀ: each was a third
    # kernel-sized matrix at the peak (GPPosterior's setup 3.2 N², gradient_descent_mse 3.0 N²)
    n = 3000
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.sin(x.sum(1))
    net = ntkgp.mlp(2, "relu", 2.0, 0.01)
    with torch.no_grad():
        theta = net.kernel(x).ntk
    matrix = n * n * 8 / 2**20
    _ = ntkgp.predict.GPPosterior(net, x[:20], y[:20], noise=1e-3)._cholesky   # one-time buffers
    peak = peak_above_current(lambda: ntkgp.predict.GPPosterior(net, x, y, noise=1e-3)._cholesky)
    assert peak < 2.6 * matrix, peak / matrix
    result = []
    peak = peak_above_current(lambda: result.append(
        ntkgp.predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=theta[:7], fx_test_0=0.0, t=None,
                                           diag_reg=1e-3)))
    assert peak < 2.5 * matrix, peak / matrix
    # the values: (Θ + r I)⁻¹ by torch's own Cholesky solve
    reg = theta + 1e-3 * theta.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    coef = torch.cholesky_solve(y.unsqueeze(-1), torch.linalg.cholesky(reg)).squeeze(-1)
    assert torch.allclose(result[0][1], theta[:7] @ coef, rtol=1e-9, atol=1e-12)


@pytest.mark.fresh_process
def test_carried_dtype_scans_a_sliced_kernel_without_copying_it():
    """carried_dtype reads a float64 kernel of float32 numbers in blocks; a non-contiguous one (the training
    block of a joint kernel, k[:n, :n], or a transposed view) was first copied whole by reshape(-1): 1.5-1.7
    kernel-sized matrices at its peak for N = 3000 (N = 10 000: 796 MiB and 3.4 s, now 59 MiB and 0.34 s).
    Now in blocks of rows: 0.47, a block of 2²² entries with its float32 round trip; 0.8 allowed."""
    from ntkgp.predict.spectral import carried_dtype
    n = 3000
    joint = torch.randn(n + 5, n + 5, generator=torch.Generator().manual_seed(9), dtype=torch.float32).double()
    view = joint[:n, :n]
    matrix = n * n * 8 / 2**20
    assert not view.is_contiguous()
    result = []
    peak = peak_above_current(lambda: result.append(carried_dtype(view)))
    assert result == [torch.float32]
    assert peak < 0.8 * matrix, peak / matrix


def test_cholesky_solve_equals_torchs():
    from ntkgp.predict.spectral import cholesky_solve
    g = torch.Generator().manual_seed(8)
    a = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    factor = torch.linalg.cholesky(a @ a.mT + torch.eye(6, dtype=torch.float64))
    b = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(cholesky_solve(b, factor), torch.cholesky_solve(b, factor), rtol=1e-12, atol=1e-14)


@pytest.mark.fresh_process
def test_float32_covariances_over_many_times_are_written_in_float32():
    # Factors and products run in float64; each time's (M, M) covariance used to be stacked in
    # float64 and then copied to float32: the (T, M, M) result held three halves over.
    torch.manual_seed(0)
    net = ntkgp.mlp(2, "erf", 2.25, 0.0025)
    x, xt = torch.randn(20, 3), torch.randn(600, 3)
    y = torch.sin(x.sum(-1))
    t = torch.logspace(-1, 2, 40)
    flow = ntkgp.predict.GradientFlow(net, x, y)
    flow.predict(xt[:2], t=t[:2])                        # the eigendecomposition, outside the measurement
    result = {}
    peak = peak_above_current(lambda: result.setdefault("out", flow.predict(xt, t=t)))
    stack32 = 40 * 600 * 600 * 4 / 2**20                 # 55 MiB
    assert result["out"].covariance.dtype == torch.float32
    assert peak < stack32 + 30, f"{peak:.0f} MiB for a {stack32:.0f} MiB float32 result"   # was 3 x 55 = 165 + kernels
    reference = ntkgp.predict.GradientFlow(net, x.double(), y.double()).predict(xt.double(), t=t.double())
    assert torch.equal(result["out"].covariance, reference.covariance.float())   # the same float64 numbers, rounded
