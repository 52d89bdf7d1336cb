"""Numerically hard but valid input gets exact, finite answers; bad input gets a clear error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import ntkgp
from ntkgp.layers import base, numerics

ARCHS = {
    "relu": lambda: ntkgp.mlp(3, "relu", 1.7, 0.05, width=64, out_dim=2),
    "relu_nobias": lambda: ntkgp.mlp(2, "relu", 2.0, None, width=64),
    "erf_then_relu": lambda: ntkgp.serial(ntkgp.Dense(9, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(9, 2.0, 0.1),
                                          ntkgp.ReLU(), ntkgp.Dense(9, 1.3, 0.0), ntkgp.Sign(), ntkgp.Dense(1)),
    "gelu_layernorm": lambda: ntkgp.serial(ntkgp.Dense(9, 1.5, 0.1), ntkgp.GELU(), ntkgp.Dense(9, 2.0, 0.1),
                                           ntkgp.LayerNorm(), ntkgp.Abs(), ntkgp.Dense(1)),
    "residual_standard": lambda: ntkgp.serial(
        ntkgp.Dense(16, 2.0, 0.1, "standard"),
        ntkgp.residual(ntkgp.ReLU(), ntkgp.Dense(16, 1.0, 0.1, "standard")),
        ntkgp.Sin(), ntkgp.Dense(1, 1.0, 0.1, "standard")),
    "numerical_tanh": lambda: ntkgp.mlp(2, ntkgp.Numerical(torch.tanh, degree=60), 0.5, 0.1, width=8),
    # LayerNorm subtracts the activation's mean (the zero input of the bias-free ReLU has variance 0)
    "relu_layernorm_nobias": lambda: ntkgp.serial(ntkgp.Dense(9, 1.5, None), ntkgp.ReLU(), ntkgp.LayerNorm(),
                                                  ntkgp.Dense(9, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(1)),
    "cos_layernorm": lambda: ntkgp.serial(ntkgp.Dense(9, 1.2, 0.3), ntkgp.Cos(c=0.2), ntkgp.LayerNorm(),
                                          ntkgp.Dense(1, 1.0, 0.1)),
    "sum_layernorm": lambda: ntkgp.serial(ntkgp.Dense(9, 1.5, 0.1),
                                          ntkgp.parallel(ntkgp.Dense(9, 0.8, 0.1), ntkgp.GELU()),
                                          ntkgp.LayerNorm(), ntkgp.Dense(1)),
    "gaussian_exp": lambda: ntkgp.serial(ntkgp.Dense(9, 1.2, 0.1), ntkgp.Gaussian(1.3, -0.7), ntkgp.Dense(9, 0.8, 0.1),
                                         ntkgp.Exp(0.9, 0.6), ntkgp.LayerNorm(), ntkgp.Dense(1)),
    "polynomial_requ_step": lambda: ntkgp.serial(
        ntkgp.Dense(9, 1.2, 0.1), ntkgp.Polynomial([0.3, 1.0, -0.4]), ntkgp.Dense(9, 0.8, 0.1),
        ntkgp.RectifiedMonomial(2), ntkgp.Dense(9, 1.0, 0.1), ntkgp.RectifiedMonomial(0), ntkgp.Dense(1)),
    "product_gate": lambda: ntkgp.serial(
        ntkgp.Dense(9, 1.5, 0.1), ntkgp.parallel(ntkgp.Identity(), ntkgp.serial(ntkgp.Dense(9, 2.0, 0.1), ntkgp.GELU()),
                                                 join="prod"), ntkgp.LayerNorm(), ntkgp.Dense(1)),
    # a sum of branches of non-zero means (the kernel gains μ_a μ_b'), and a LayerNorm after a
    # concatenation of them (subtracting the mean over both)
    "post_activation_sums": lambda: ntkgp.serial(
        ntkgp.Dense(9, 1.5, 0.1), ntkgp.ReLU(), ntkgp.residual(ntkgp.Dense(9, 2.0, 0.1), ntkgp.Erf(c=0.4)),
        ntkgp.Dense(9), ntkgp.parallel(ntkgp.GELU(), ntkgp.serial(ntkgp.Dense(5), ntkgp.Cos(c=0.3)), join="concat"),
        ntkgp.LayerNorm(), ntkgp.Dense(1)),
}


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g, dtype=dtype)
    x[2] = 0.0          # zero vector
    x[5] = x[1]         # duplicate point
    x[7] = -3.0 * x[4]  # antiparallel point
    return x


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_diag_mode_equals_diagonal_of_full_matrix(name):
    net = ARCHS[name]()
    x = _inputs()
    with torch.no_grad():
        full = net.kernel(x)
        diag = net.kernel(x, diag=True)
    for attr in ("nngp", "ntk"):
        f, d = getattr(full, attr).diagonal(), getattr(diag, attr)
        assert d.shape == (9,)
        assert float(((f - d).abs() / f.abs().clamp_min(1e-300)).max()) <= 1e-10
    # pairs (x1_i, x2_i) equal the diagonal of the cross matrix
    x2 = torch.randn_like(x)
    with torch.no_grad():
        cross, pairs = net.kernel(x, x2), net.kernel(x, x2, diag=True)
    torch.testing.assert_close(pairs.nngp, cross.nngp.diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pairs.ntk, cross.ntk.diagonal(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diag_pairs_of_equal_points_are_the_diagonal_of_the_full_kernel(dtype):
    """``kernel(x1, x2, diag=True)`` where ``x2_i == x1_i`` (a copy that needs input gradients, or
    test points on training points) is the diagonal of the full kernel, which makes such pairs
    exactly a point with itself: the diagonal mode kept the pair formulas, a smooth activation's
    (or LayerNorm's) pair an ulp off ``ρ = 1``, and a later kinked activation turned that into
    ``sqrt(ulp)``: GELU then Sign 1.4e-2 (float32) and 9.5e-5 (float64) off, relative; ReLU's NTK
    after a LayerNorm 2.7e-4 (float32)."""
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    other = torch.randn(20, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    mixed = torch.where(torch.arange(20).unsqueeze(-1) % 2 == 0, x, other)   # every other point shared
    nets = {"gelu_sign": ntkgp.serial(ntkgp.Dense(8, 1.0, 0.1), ntkgp.GELU(), ntkgp.Dense(8, 2.0, 0.1), ntkgp.Sign(),
                                      ntkgp.Dense(8, 2.0, 0.1), ntkgp.Sign(), ntkgp.Dense(1)),
            "layernorm_relu": ntkgp.serial(*[ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.LayerNorm(), ntkgp.ReLU())
                                             for _ in range(3)], ntkgp.Dense(1))}
    rtol = 8 * torch.finfo(dtype).eps
    for name, net in nets.items():
        net = net.to(dtype)
        own = net.kernel(x, diag=True)
        for x2 in (x.clone().requires_grad_(), mixed):
            pairs, full = net.kernel(x, x2, diag=True), net.kernel(x, x2)
            for attr in ("nngp", "ntk"):
                torch.testing.assert_close(getattr(pairs, attr), getattr(full, attr).diagonal(), rtol=rtol, atol=0,
                                           msg=f"{name} {attr}")
                shared = slice(None) if x2 is not mixed else slice(None, None, 2)
                torch.testing.assert_close(getattr(pairs, attr)[shared], getattr(own, attr)[shared], rtol=rtol,
                                           atol=0, msg=f"{name} {attr}")


def test_ntk_diagonal_is_exact_against_40_digit_arithmetic():
    """Where a point meets itself the square-root term is exactly 0: the self-NTK equals an
    exact-arithmetic recursion to 1e-15 (neural-tangents: ~5e-9 per ReLU layer)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    net = ntkgp.mlp(3, "relu", 2.0, 0.05)
    x = _inputs()
    with torch.no_grad():
        ntk = net.kernel(x).ntk.diagonal()
    for i in range(x.shape[0]):
        k = sum(mpmath.mpf(float(v)) ** 2 for v in x[i]) / x.shape[1]
        theta = mpmath.mpf(0)
        for layer in range(4):
            k = 2 * k + mpmath.mpf(0.05)
            theta = k + 2 * theta
            if layer < 3:  # ReLU at a point with itself: θ = 0, T = k/2, Ṫ = 1/2
                k, theta = k / 2, theta / 2
        assert abs(float(ntk[i]) - float(theta)) <= 1e-15 * float(theta)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_symmetric_kernels_are_exactly_symmetric_and_psd(name):
    net = ARCHS[name]()
    with torch.no_grad():
        k = net.kernel(_inputs())
    for mat in (k.nngp, k.ntk):
        assert torch.equal(mat, mat.mT)
        eig = torch.linalg.eigvalsh(mat)
        assert float(eig.min()) >= -1e-10 * float(eig.max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["single", "blocks", "graph"])
def test_symmetric_kernels_are_bitwise_symmetric_at_any_size(dtype, mode, monkeypatch):
    """K(x_i, x_j) and K(x_j, x_i) were computed separately: GELU's formulas are not symmetric in
    (k11, k22) as rounded, and torch evaluates the tail of a tensor with scalar code (atan2 of the
    ReLU family), so kernels of up to ~700 points (one block) and the diagonal blocks of larger
    ones differed from their transposes by an ulp (GELU: 796 of 10⁴ NTK entries at n = 100)."""
    if mode == "blocks":
        monkeypatch.setattr(base, "BLOCK_ENTRIES", 64)
    g = torch.Generator().manual_seed(0)
    for act in ("gelu", "relu", "abs", "leaky_relu", "sign"):
        net = ntkgp.mlp(3, act, 2.0, 0.05)
        for n in (9, 13, 37, 100):
            x = torch.randn(n, 4, generator=g, dtype=dtype)
            if mode == "graph":
                k = net.kernel(x.requires_grad_())
            else:
                with torch.no_grad():
                    k = net.kernel(x)
            for mat in (k.nngp, k.ntk):
                assert torch.equal(mat, mat.mT), (act, n)
    x = torch.randn(7, 3, generator=g, dtype=dtype, requires_grad=True)
    k = ntkgp.mlp(2, "gelu").kernel(x)
    (grad,) = torch.autograd.grad(k.ntk[1, 4] + k.ntk[4, 1], x)    # both halves still differentiate
    (half,) = torch.autograd.grad(ntkgp.mlp(2, "gelu").kernel(x).ntk[1, 4], x)
    torch.testing.assert_close(grad, 2 * half)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_blocked_evaluation_equals_single_pass(name, monkeypatch):
    net = ARCHS[name]()
    x, x2 = _inputs(), torch.randn(7, 4, dtype=torch.float64)
    with torch.no_grad():
        whole_sym, whole_cross = net.kernel(x), net.kernel(x, x2)
        monkeypatch.setattr(base, "BLOCK_ENTRIES", 20)  # blocks of 2 rows
        block_sym, block_cross = net.kernel(x), net.kernel(x, x2)
    for a, b in ((whole_sym, block_sym), (whole_cross, block_cross)):
        torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-13, atol=1e-15)


def _count_calls(monkeypatch, name: str) -> list[int]:
    """Count the calls of ``ntkgp.layers.base.<name>`` (in a list, updated in place)."""
    calls, original = [0], getattr(base, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(base, name, counted)
    return calls


def _kernel_derivatives(net, x, x2, monkeypatch, checkpointed: bool) -> list[Tensor | None]:
    """Kernels, first derivatives (hyperparameters and inputs) and second derivatives (to the
    hyperparameters) of a weighted sum of both kernels."""
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1 if checkpointed else 1 << 62)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 20)   # row blocks of 2 rows (20 // 9 and 20 // 7)
    calls = _count_calls(monkeypatch, "_checkpointed_kernel")
    x = x.clone().requires_grad_()
    x2 = None if x2 is None else x2.clone().requires_grad_()
    k = net.kernel(x, x2)
    assert calls == [1] if checkpointed else calls == [0]
    w = torch.randn(k.nngp.shape, generator=torch.Generator().manual_seed(1), dtype=k.nngp.dtype)
    loss = (k.nngp * w).sum() + (k.ntk * w.mT if x2 is None else k.ntk * w).sum() ** 2 / 100
    params = list(net.parameters())
    inputs = [x] if x2 is None else [x, x2]
    grads = torch.autograd.grad(loss, params + inputs, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in grads), params, allow_unused=True)
    return [k.nngp.detach(), k.ntk.detach(), *(g.detach() for g in grads),
            *(None if g is None else g.detach() for g in second)]


# both routes differentiate the same quadrature: its accuracy at degree 60 (Numerical's warning) is not at issue
@pytest.mark.filterwarnings("ignore:Numerical\\(tanh, degree=60\\).*gradients may be:RuntimeWarning")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_checkpointed_graph_equals_whole_graph(name, symmetric, monkeypatch):
    """With autograd, large kernels are built from row blocks recomputed in the backward pass
    (the upper triangle mirrored when symmetric): values, gradients to hyperparameters and
    inputs, and second derivatives equal those of the whole-matrix graph.

    Tolerance: the kernels to 1e-13 as in the no-autograd blocks. Derivatives to 1e-9 of each
    tensor's largest entry: at the antiparallel pair of ``_inputs`` (angle π) the ReLU-family
    derivatives divide two vanishing factors, which turns last-bit differences of the blocks'
    Gram entries into 7e-11 relative differences of the input gradient (exact in every other
    row); and to 1e-12 of the largest derivative for the variance before ``Sign``, whose exact
    derivative is 0 (both give rounding noise around it). A block mirrored or joined wrongly
    is off by O(1)."""
    net = ARCHS[name]().double()   # float64 hyperparameters: their gradients are not rounded to float32
    x, x2 = _inputs(), None if symmetric else torch.randn(7, 4, dtype=torch.float64)
    whole = _kernel_derivatives(net, x, x2, monkeypatch, checkpointed=False)
    blocked = _kernel_derivatives(net, x, x2, monkeypatch, checkpointed=True)
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-13, atol=1e-15)
    if symmetric:
        assert torch.equal(blocked[0], blocked[0].mT) and torch.equal(blocked[1], blocked[1].mT)
    scale = max(float(t.abs().max()) for t in whole[2:] if t is not None)
    for b, w in zip(blocked[2:], whole[2:], strict=True):
        assert (b is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(b, w, rtol=0, atol=1e-9 * float(w.abs().max()) + 1e-12 * scale)


def test_checkpointed_graph_with_batched_hyperparameters_in_gpytorch(monkeypatch):
    """A batch of two GPyTorch kernels with their own variances: the marginal likelihood's
    gradients are those of the whole-matrix graph."""
    import gpytorch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 30, generator=g, dtype=torch.float64)
    grads = []
    for entries in (1 << 62, 1):
        monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", entries)
        monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 200)   # row blocks of 3 rows (2 kernels of 30 columns)
        torch.manual_seed(0)
        kernel = ntkgp.NTKKernel(ntkgp.mlp(2, "erf", 1.7, 0.1), batch_shape=torch.Size([2])).double()
        with torch.no_grad():
            for p in kernel.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                         dtype=p.dtype))
        cov = kernel(x).to_dense() + 0.1 * torch.eye(30, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(torch.zeros_like(y), cov)
        loss = -dist.log_prob(y).sum()
        grads.append(torch.autograd.grad(loss, list(kernel.parameters())))
        assert isinstance(kernel, gpytorch.kernels.Kernel)
    for a, b in zip(*grads, strict=True):
        assert a.shape[0] == 2
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


def _batch_of_four(batch_from: str, activation: str, seed: int) -> tuple[Tensor, ntkgp.layers.Layer]:
    """Inputs and a network that make a batch of 4 kernels of 12 points: batched ``(4, 12, 3)``
    inputs, or ``(12, 3)`` inputs and hyperparameters with GPyTorch batch shape ``(4,)`` (each
    kernel with variances of its own)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 12, 3, generator=g, dtype=torch.float64)
    net = ntkgp.mlp(2, activation, 1.7, 0.1).double()
    if batch_from == "hyperparameters":
        x = x[0]
        net.expand_batch(torch.Size([4]))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return x, net


@pytest.mark.parametrize("batch_from", ["inputs", "hyperparameters"])
def test_checkpointed_blocks_count_every_kernel_of_a_batch(batch_from, monkeypatch):
    """A batch of ``b`` kernels of ``n`` points holds ``b n²`` entries: it is checkpointed from
    ``CHECKPOINT_ENTRIES`` of them on, in row blocks of ``CHECKPOINT_BLOCK_ENTRIES`` entries over
    the whole batch. Counting ``n²`` alone kept the whole graph of 8 kernels of 800 points (41
    kernel-sized matrices, 1.6 GiB for a depth-3 NTK) and gave blocks ``b`` times too large.

    Here ``b = 4``, ``n = 12``: 576 entries >= 400 (but 144 < 400 per kernel), and blocks of
    ``100 // (4 · 12) = 2`` rows, 6 of them; values and gradients equal the whole graph's."""
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 100)
    x, net = _batch_of_four(batch_from, "erf", seed=5)
    results = []
    for entries in (1 << 62, 400):
        monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", entries)
        blocks = _count_calls(monkeypatch, "_checked_block")
        leaf = x.clone().requires_grad_()
        k = net.kernel(leaf)
        assert k.ntk.shape == (4, 12, 12)
        assert blocks == [0 if entries > 400 else 6]
        grads = torch.autograd.grad(k.nngp.sum() + (k.ntk ** 2).sum(), [leaf, *net.parameters()])
        results.append([k.nngp.detach(), k.ntk.detach(), *grads])
    for a, b in zip(*results, strict=True):   # tolerances of test_checkpointed_graph_equals_whole_graph
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13 * float(a.abs().max()))


@pytest.mark.parametrize(("n1", "batch", "blocks"), [(1, (), 0), (3, (), 3), (1, (4,), 0), (2, (4,), 2), (6, (4,), 6)])
def test_a_single_checkpointed_block_keeps_the_whole_graph(n1, batch, blocks, monkeypatch):
    """Where one row block would hold all rows (a few rows against many columns, or a batch of
    them, as an acquisition function's candidates against the training points), checkpointing
    would only recompute the whole forward pass in the backward pass, with no lower peak: the
    whole graph is kept. Here 50 columns and blocks of 20 entries: one row per block (a row of 4
    kernels, 200 entries, cannot be split either), so a single row stays whole and 2 or 3 rows
    make 2 or 3 blocks; 6 rows of 4 kernels in blocks of 200 entries make 6 blocks."""
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 40)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 20 if n1 < 6 else 200)
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(*batch, n1, 3, generator=g, dtype=torch.float64).requires_grad_()
    x2 = torch.randn(50, 3, generator=g, dtype=torch.float64)
    net = ntkgp.mlp(2, "relu", 1.7, 0.1).double()
    calls = _count_calls(monkeypatch, "_block")
    k = net.kernel(x1, x2)
    assert k.ntk.shape == (*batch, n1, 50)
    assert calls == [blocks]
    grad = torch.autograd.grad(k.ntk.sum(), x1)[0]
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1 << 62)
    whole = net.kernel(x1, x2)
    torch.testing.assert_close(k.ntk, whole.ntk, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, torch.autograd.grad(whole.ntk.sum(), x1)[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("batch1", "batch2", "variance_batch"), [
    ((), (3,), ()), ((), (1,), ()), ((), (3, 1), ()), ((1,), (3,), ()), ((3, 1), (2,), ()), ((), (3, 1), (2,)),
])
def test_checkpointed_cross_kernel_with_a_duplicate_in_one_block(batch1, batch2, variance_batch, monkeypatch):
    """Candidates with batch axes the training inputs lack, one of them on a training point (a
    BoTorch candidate batch against its training set): the row block holding that point
    broadcasts its variances to the candidates' batch axes, the other blocks keep the training
    inputs' own; joining them crashed ("Tensors must have same number of dimensions"). Values
    and derivatives equal the whole graph's (tolerances of
    test_checkpointed_graph_equals_whole_graph)."""
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(*batch1, 9, 4, generator=g, dtype=torch.float64)
    x2 = torch.randn(*batch2, 7, 4, generator=g, dtype=torch.float64)
    x2.view(-1, 7, 4)[-1, 5] = x1.reshape(-1, 9, 4)[0, 6]   # in one batch only, in the last row block
    net = ntkgp.mlp(2, "relu", 1.7, 0.1).double()
    if variance_batch:
        net.expand_batch(torch.Size(variance_batch))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    whole = _kernel_derivatives(net, x1, x2, monkeypatch, checkpointed=False)
    blocked = _kernel_derivatives(net, x1, x2, monkeypatch, checkpointed=True)
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-13, atol=1e-15)
    scale = max(float(t.abs().max()) for t in whole[2:] if t is not None)
    for b, w in zip(blocked[2:], whole[2:], strict=True):
        assert (b is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(b, w, rtol=0, atol=1e-9 * float(w.abs().max()) + 1e-12 * scale)


@pytest.mark.parametrize("change", ["set_variance", "optimizer_step"])
def test_checkpointed_kernel_refuses_hyperparameters_changed_before_backward(change, monkeypatch):
    """The blocks are recomputed in the backward pass from the hyperparameters as they are then.
    Changed in place between the forward and the backward pass, they gave derivatives at the new
    values for the kernel of the old ones, silently (set_variance: raw gradients -0.79, 6.15, 8.96
    where the whole graph, which differentiates at the old values, gives -4.60, 9.83, 9.48): refused."""
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 20)
    net = ntkgp.mlp(2, "erf", 1.5, 0.1).double()
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net.kernel(x).ntk.sum().backward()          # unchanged: fine, and again
    net.kernel(x).ntk.sum().backward()
    k = net.kernel(x)
    if change == "set_variance":
        net.layers[0].set_variance("weight_var", 3.0)
    else:
        torch.optim.SGD(net.parameters(), lr=0.1).step()   # the gradients of the calls above
    with pytest.raises(RuntimeError, match="changed in place after the kernel was computed"):
        k.ntk.sum().backward()


class _NTKModule(torch.nn.Module):
    def __init__(self, net: ntkgp.layers.Layer) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.kernel(x).ntk


@pytest.mark.parametrize("swap", ["functional_call", "expand_batch"])
def test_checkpointed_kernel_differentiates_at_the_tensors_of_the_forward_pass(swap, monkeypatch):
    """``torch.func.functional_call`` puts the module's own parameters back when it returns,
    before the backward pass recomputes the blocks: they were recomputed with those, and the
    gradients to the parameters passed in were the derivatives at the module's (raw gradients
    -4.60, 9.83, ... instead of -7.48, 15.52, ...). Likewise parameters replaced by
    ``expand_batch`` after the forward pass. The recomputation uses the forward pass's tensors,
    as the whole graph does: same values and gradients (to 1e-12 of the largest, as in
    test_checkpointed_graph_equals_whole_graph; the blocks' rounding differs)."""
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 20)
    net = ntkgp.mlp(2, "erf", 1.5, 0.1).double()
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = {n: (p.detach() + 0.3).requires_grad_() for n, p in net.named_parameters()}
    results = []
    for entries in (1 << 62, 1):
        monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", entries)
        calls = _count_calls(monkeypatch, "_checkpointed_kernel")
        if swap == "functional_call":
            # functional_call calls forward: a module whose forward is the kernel (GPyTorch's are lazy)
            ntk = torch.func.functional_call(_NTKModule(net), {"net." + n: p for n, p in params.items()}, (x,))
            leaves = list(params.values())
        else:
            leaves = list(net.parameters())
            ntk = net.kernel(x).ntk
            net.expand_batch(torch.Size([1]))
        assert calls == [0 if entries > 1 else 1]
        results.append([ntk.detach(), *torch.autograd.grad((ntk ** 2).sum(), leaves)])
        if swap == "expand_batch":
            net.index_batch((0,))
    scale = float(results[0][0].abs().max())
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12 * max(scale, float(a.abs().max())))


def test_checkpointing_steps_aside_under_function_transforms(monkeypatch):
    """torch.func transforms and forward-mode AD take the whole-matrix graph (checkpointing
    does not compose with them): jacfwd and a dual-number directional derivative work, and equal
    reverse mode through the checkpointed blocks."""
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 20)
    net = ntkgp.mlp(2, "gelu", 1.5, 0.1)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def total(z):
        k = net.kernel(z)
        return k.nngp.sum() + k.ntk.sum()

    calls = _count_calls(monkeypatch, "_checkpointed_kernel")
    leaf = x.clone().requires_grad_()
    reverse = torch.autograd.grad(total(leaf), leaf)[0]
    assert calls == [1]
    forward = torch.func.jacfwd(total)(x)
    torch.testing.assert_close(forward, reverse, rtol=1e-12, atol=1e-12)
    direction = torch.randn_like(x)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        tangent = fwad.unpack_dual(total(fwad.make_dual(x, direction))).tangent
    assert calls == [1]
    torch.testing.assert_close(tangent, (reverse * direction).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_from", ["inputs", "hyperparameters"])
def test_blocks_without_autograd_count_every_kernel_of_a_batch(batch_from, monkeypatch):
    """Without autograd a row block holds about ``BLOCK_ENTRIES`` entries over all ``b`` kernels
    of a batch (they were ``b`` times larger: 8 kernels of 3000 points in blocks of 174 rows held
    8 × 2¹⁹ entries per intermediate). Here ``b = 4``, ``n = 12``, blocks of ``100 // 48 = 2``
    rows: 6 blocks in the upper triangle (3 rows with the per-kernel count); the values equal the
    single pass's."""
    x, net = _batch_of_four(batch_from, "gelu", seed=7)
    with torch.no_grad():
        whole = net.kernel(x)
        monkeypatch.setattr(base, "BLOCK_ENTRIES", 100)
        blocks = _count_calls(monkeypatch, "_run_block")
        blocked = net.kernel(x)
    assert blocks == [6]
    assert blocked.ntk.shape == (4, 12, 12)
    torch.testing.assert_close(blocked.nngp, whole.nngp, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(blocked.ntk, whole.ntk, rtol=1e-13, atol=1e-15)


def test_adaptive_quadrature_depends_on_each_entrys_own_points(monkeypatch):
    """The adaptive degree is chosen per entry from its two variances, so whole and blocked kernels,
    and a pair of points alone, agree to rounding (with one degree per call, set by the largest
    variance the call saw, they differed by up to the rule's rtol, 1e-7)."""
    net = ntkgp.mlp(2, "tanh", 0.5, 0.1, width=8)
    x = _inputs() / 2
    x[4] *= 4                                                # one point of large variance
    with torch.no_grad():
        whole = net.kernel(x)
        pair = net.kernel(x[[0, 1]])
        monkeypatch.setattr(base, "BLOCK_ENTRIES", 20)
        blocked = net.kernel(x)
    for attr in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(blocked, attr), getattr(whole, attr), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(getattr(pair, attr), getattr(whole, attr)[:2, :2], rtol=1e-13, atol=1e-15)


def test_adaptive_quadrature_spends_its_degree_where_the_variance_needs_it():
    # tanh at variance 0.05 converges by degree 24-36, at variance 4 it needs ~200: the entries of the
    # small variance keep the small degree, those paired with the large one take the large one
    act = ntkgp.Numerical(torch.tanh)
    k = torch.tensor([0.05, 4.0], dtype=torch.float64)
    degrees = act.entry_degrees(k[:, None], k[None, :])
    assert degrees[0, 0] <= 36 and degrees[1, 1] >= 122 and degrees[0, 1] == degrees[1, 0] == degrees[1, 1]
    nngp, dot = act.pair_kernel(k[:, None], torch.tensor([[0.05, 0.2], [0.2, 4.0]], dtype=torch.float64),
                                k[None, :], True)
    assert act.last_degree == int(degrees.max())
    fixed = ntkgp.Numerical(torch.tanh, degree=400)
    ref_nngp, ref_dot = fixed.pair_kernel(k[:, None], torch.tensor([[0.05, 0.2], [0.2, 4.0]], dtype=torch.float64),
                                          k[None, :], True)
    torch.testing.assert_close(nngp, ref_nngp, rtol=1e-7, atol=0)
    torch.testing.assert_close(dot, ref_dot, rtol=1e-6, atol=0)


def test_zero_inputs_give_finite_kernels_and_gradients():
    for bias in (None, 0.0, 0.1):
        net = ntkgp.mlp(3, "relu", 2.0, bias, width=8)
        x = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
        k = net.kernel(x, torch.randn(2, 5, dtype=torch.float64))
        assert torch.isfinite(k.nngp).all() and torch.isfinite(k.ntk).all()
        k2 = net.kernel(x)
        (k2.nngp.sum() + k2.ntk.sum()).backward()
        assert torch.isfinite(x.grad).all()
        for p in net.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()


def test_gradients_are_finite_at_duplicates_and_self_pairs():
    net = ARCHS["erf_then_relu"]()
    x = _inputs().requires_grad_()
    k = net.kernel(x)
    loss = k.nngp.sum() + k.ntk.logsumexp((0, 1))
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["relu", "erf", "gelu"])
def test_depth_100_is_finite(dtype, act):
    net = ntkgp.mlp(100, act, 2.0 if act == "relu" else 1.5, 0.05, width=8)
    x = _inputs(dtype)
    with torch.no_grad():
        k = net.kernel(x)
    assert torch.isfinite(k.nngp).all() and torch.isfinite(k.ntk).all()
    assert float(k.ntk.diagonal().min()) > 0


def test_float64_inputs_are_exact_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        layer = ntkgp.Dense(1, weight_var=2.25, bias_var=0.01)
        assert layer.raw_weight_var.dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)
    # small inputs: the bias dominates, so a float32 round trip of 0.01 (2e-9 relative) would show
    x = torch.tensor([[0.003, -0.011], [0.02, 0.007]], dtype=torch.float64)
    k = layer.kernel(x)
    expected = 2.25 * (x @ x.T) / 2 + 0.01
    assert k.nngp.dtype == torch.float64
    torch.testing.assert_close(k.nngp.detach(), expected, rtol=4e-16, atol=0)
    rounded = 2.25 * (x @ x.T) / 2 + torch.tensor(0.01, dtype=torch.float32).double()
    assert float(((rounded - expected) / expected).abs().max()) > 1e-10
    # .float() on the module does not round the stored values either
    layer.float()
    torch.testing.assert_close(layer.kernel(x).nngp.detach(), expected, rtol=4e-16, atol=0)


def test_float32_inputs_give_float32_results():
    net = ntkgp.mlp(2, "erf", 1.5, 0.1)
    k = net.kernel(_inputs(torch.float32), diag=False)
    assert k.nngp.dtype == torch.float32 and k.ntk.dtype == torch.float32


def test_batched_inputs_match_per_batch_evaluation():
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    x1 = torch.randn(3, 5, 4, dtype=torch.float64)
    x2 = torch.randn(3, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        batched = net.kernel(x1, x2)
        for i in range(3):
            single = net.kernel(x1[i], x2[i])
            torch.testing.assert_close(batched.nngp[i], single.nngp, rtol=1e-14, atol=0)
            torch.testing.assert_close(batched.ntk[i], single.ntk, rtol=1e-14, atol=0)


def test_equal_second_input_uses_symmetric_path():
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    x = _inputs()
    with torch.no_grad():
        a, b = net.kernel(x), net.kernel(x, x.clone())
    assert torch.equal(a.nngp, b.nngp) and torch.equal(a.ntk, b.ntk)


def test_zero_variances_stay_usable():
    layer = ntkgp.Dense(3, weight_var=1.0, bias_var=0.0)
    assert float(layer.raw_bias_var.detach()) == 0.0 and float(layer.bias_var.detach()) == 0.0
    net = ntkgp.serial(layer, ntkgp.ReLU(), ntkgp.Dense(1, 2.0, 0.0))
    x = _inputs()
    k = net.kernel(x)
    k.nngp.sum().backward()
    assert float(layer.raw_bias_var.grad) == 0.0          # pinned at zero: no gradient
    assert torch.isfinite(layer.raw_weight_var.grad).all()
    layer.bias_var = 0.5                                   # setting it again makes it learnable
    assert float(layer.bias_var.detach()) == 0.5 and float(layer.raw_bias_var.detach()) == 0.0


def test_variances_are_exact_after_setting_and_learnable_in_log_space():
    layer = ntkgp.Dense(3, weight_var=0.37)
    assert float(layer.variance_as("weight_var", torch.zeros((), dtype=torch.float64)).detach()) == 0.37
    with torch.no_grad():
        layer.raw_weight_var.add_(math.log(2.0))
    assert abs(float(layer.weight_var.detach()) - 0.74) < 1e-6


BAD_INPUTS = [
    (lambda: torch.randn(5), "shape"),
    (lambda: torch.tensor([[1.0, float("nan")]]), "NaN"),
    (lambda: torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
    (lambda: torch.ones(3, 2, dtype=torch.int64), "floating-point"),
    (lambda: torch.ones(3, 0), "no features"),
]


@pytest.mark.parametrize("make,message", BAD_INPUTS)
def test_bad_inputs_raise_value_error(make, message):
    net = ntkgp.mlp(1, "relu")
    with pytest.raises(ValueError, match=message):
        net.kernel(make())


def test_mismatched_inputs_raise_value_error():
    net = ntkgp.mlp(1, "relu")
    with pytest.raises(ValueError, match="same number of features"):
        net.kernel(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="same dtype"):
        net.kernel(torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same number of points"):
        net.kernel(torch.randn(3, 2), torch.randn(4, 2), diag=True)
    with pytest.raises(ValueError, match="ard_num_dims=3"):
        ntkgp.mlp(1, "relu", ard_num_dims=3).kernel(torch.randn(4, 2))


@pytest.mark.parametrize("make,message", [
    (lambda: ntkgp.Dense(3, weight_var=-1.0), "non-negative"),
    (lambda: ntkgp.Dense(3, bias_var=float("nan")), "finite"),
    (lambda: ntkgp.Dense(0), "positive integer"),
    (lambda: ntkgp.Dense(3, parameterization="mean_field"), "parameterization"),
    (lambda: ntkgp.Dense(3, weight_var=[1.0, 2.0]), "scalar"),
    (lambda: ntkgp.mlp(1, "swish"), r"Unknown activation 'swish'; .* or pass a layer\.$"),
    # a torch function or module: "pass a layer" did not say that Numerical takes it
    (lambda: ntkgp.mlp(1, torch.nn.functional.elu), r"or pass a layer: wrap a torch function .* as ntkgp\.Numerical"),
    (lambda: ntkgp.mlp(1, torch.nn.ELU()), r"Unknown activation ELU\(.*\); .* as ntkgp\.Numerical\(fn\)"),
    # a torch function or module the names cover: the name, not a generic Numerical (which warned at tanh's)
    (lambda: ntkgp.mlp(1, torch.tanh), r"or pass a layer: for this one pass its name, activation='tanh'\.$"),
    (lambda: ntkgp.mlp(1, torch.nn.SiLU()), r"for this one pass its name, activation='silu'\.$"),
    (lambda: ntkgp.mlp(1, ntkgp.ReLU), r"got the class ReLU: pass an instance, ReLU\(\)\.$"),
    (lambda: ntkgp.repeat(ntkgp.ReLU(), 0), "positive integer"),
    (lambda: ntkgp.residual(), r"residual\(\) needs at least one layer"),   # named serial(), unseen by the caller
    (lambda: ntkgp.Numerical(torch.tanh, degree=0), "positive integer"),
])
def test_invalid_hyperparameters_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mlp_names_the_new_closed_form_activations():
    """``mlp(..., "rbf")`` and ``"sigmoid_like"`` (and so ``ntkgp compare --activation``) are the layers'
    defaults, the same kernels bit for bit."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for name, layer in (("rbf", ntkgp.Rbf()), ("sigmoid_like", ntkgp.SigmoidLike()), ("gabor", ntkgp.Gabor())):
        by_name = ntkgp.mlp(2, name, 1.5, 0.1).kernel(x)
        explicit = ntkgp.mlp(2, layer, 1.5, 0.1).kernel(x)
        assert torch.equal(by_name.nngp, explicit.nngp) and torch.equal(by_name.ntk, explicit.ntk)


def test_setting_invalid_variance_raises():
    layer = ntkgp.Dense(3, 1.0, 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        layer.bias_var = -0.1
    with pytest.raises(ValueError, match="without a bias"):
        ntkgp.Dense(3).bias_var = 0.1


@pytest.mark.parametrize("raw", [math.nan, 800.0])
def test_non_finite_learned_variances_raise_before_work(raw):
    """A raw variance set to NaN, or an optimizer step that overflowed exp(raw), gave an all-NaN
    kernel without an error (GPyTorch failed later with an obscure PSD/NaN error)."""
    x = torch.randn(4, 3)
    kernel = ntkgp.NNGPKernel(ntkgp.mlp(depth=1))
    with torch.no_grad():
        kernel.net.layers[2].raw_bias_var.fill_(raw)
    for call in (lambda: kernel(x).to_dense(), lambda: kernel.net.kernel(x.double(), diag=True)):
        with pytest.raises(ValueError, match=r"Variance\(s\) \['layers.2.bias_var'\] are not finite"):
            call()
    kernel.net.layers[2].bias_var = 0.1
    assert torch.isfinite(kernel(x).to_dense()).all()


def test_variances_of_several_dtypes_are_checked_together_in_the_dtype_of_the_inputs():
    """The check computes every variance at once (raw values joined); a layer whose raw values are
    float64 beside float32 ones is still checked in the inputs' dtype and named alone."""
    net = ntkgp.mlp(depth=2, activation="erf")
    net.layers[2].double()
    with torch.no_grad():
        net.layers[2].raw_bias_var.fill_(100.0)   # exp(100) · 0.05: beyond float32, not float64
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.isfinite(net.kernel(x).nngp).all()
    with pytest.raises(ValueError, match=r"Variance\(s\) \['layers.2.bias_var'\] are not finite"):
        net.kernel(x.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_variance_range_screen_in_one_reduction_agrees_with_the_full_one(dtype):
    """_variance_range decides the usual case (every variance in [16 sqrt(tiny), sqrt(max)/16]) from
    one min/max and asks for the smallest positive variance and for zeros only otherwise: the same
    answers at and beyond those bounds, with zeros, NaN and inf, for a symmetric kernel's one
    vector of variances (read once) and for two."""
    info = torch.finfo(dtype)
    low, high = 16 * info.tiny ** 0.5, info.max ** 0.5 / 16
    values = [1.0, low, low * 0.99, high, high * 1.01, 0.0, math.nan, math.inf, info.tiny]
    for first in values:
        for second in values:
            k = torch.tensor([0.5, first, 2.0], dtype=dtype)
            other = torch.tensor([second, 3.0], dtype=dtype)
            for k11, k22 in ((k.unsqueeze(-1), other.unsqueeze(-2)), (k.unsqueeze(-1), k.unsqueeze(-2))):
                both = torch.cat([k11.reshape(-1), k22.reshape(-1)]).double()
                positive = both[both > 0]
                representable = (not bool(both.isnan().any()) and float(both.max()) <= high
                                 and (positive.numel() == 0 or float(positive.min()) >= low))
                assert numerics._variance_range(k11, k22) == (representable, bool((both == 0).any())), (first, second)


def test_kernel_state_replace_is_dataclasses_replace():
    """KernelState.replace copies the fields without dataclasses.replace's generic rebuild: the same
    fields, mean and centred wrapped to be evaluated once, and the same errors for unknown fields."""
    import dataclasses

    from ntkgp.layers.state import KernelState, _Once
    state = KernelState(nngp=torch.ones(2, 2), ntk=None, cov1=torch.ones(2), cov2=torch.ones(2), width=3)
    calls = []
    changes = {"width": 5, "symmetric": True, "mean": lambda: calls.append(1) or (torch.zeros(2),) * 2 + (True,)}
    fast, slow = state.replace(**changes), dataclasses.replace(state, **changes)
    for field in dataclasses.fields(KernelState):
        a, b = getattr(fast, field.name), getattr(slow, field.name)
        assert type(a) is type(b) and (a is b or isinstance(a, _Once)), field.name
    assert fast.mean() is fast.mean() and calls == [1] and fast.centred is None
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        state.replace(foo=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.width = 1


def test_variances_are_checked_in_the_dtype_of_the_inputs():
    """exp(100) overflows float32 but not float64: the kernel of float64 inputs is fine. A variance
    whose anchor does not have its raw parameter's shape (GPyTorch's _strict(False)) broadcasts as
    the transform does, instead of failing in the check."""
    net = ntkgp.mlp(depth=1, activation="erf")
    with torch.no_grad():
        net.layers[0].raw_weight_var.fill_(100.0)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.isfinite(net.kernel(x).nngp).all()
    with pytest.raises(ValueError, match=r"\['layers.0.weight_var'\] are not finite"):
        net.kernel(x.float())
    layer = ntkgp.mlp(depth=1, activation="erf").layers[0]
    layer._strict(False)
    layer.initialize(raw_weight_var=torch.zeros(2))
    layer._strict(True)
    assert ntkgp.serial(layer, ntkgp.Erf(), ntkgp.Dense(1)).kernel(x).nngp.shape == (2, 4, 4)


def test_broadcast_shapes_is_torchs():
    from ntkgp.layers.validation import broadcast_shapes
    rng = np.random.default_rng(0)
    for _ in range(3000):
        shapes = [tuple(int(n) for n in rng.integers(0, 4, rng.integers(0, 4))) for _ in range(rng.integers(0, 4))]
        try:
            expected = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            with pytest.raises(RuntimeError, match="do not broadcast"):
                broadcast_shapes(*shapes)
        else:
            assert broadcast_shapes(*shapes) == expected


def test_a_non_finite_variance_is_a_nan_loss_to_botorch():
    """BoTorch's L-BFGS-B fit reads linear_operator's NanError as a NaN loss and shortens its step
    (what happened when such a variance reached GPyTorch's Cholesky); the new error must not end
    the fit instead."""
    botorch_utils = pytest.importorskip("botorch.optim.utils")
    kernel = ntkgp.NNGPKernel(ntkgp.mlp(depth=1))
    with torch.no_grad():
        kernel.net.layers[0].raw_weight_var.fill_(800.0)
    with pytest.raises(RuntimeError) as error:
        kernel(torch.randn(4, 3)).to_dense()
    assert isinstance(error.value, ValueError)
    value, grads = botorch_utils._handle_numerical_errors(error.value, x=np.zeros(3))
    assert np.isnan(value) and np.isnan(grads).all()


def test_hyperparameter_batches_that_do_not_broadcast_with_the_inputs_raise():
    """A batch of 2 hyperparameters against inputs batched by 3 surfaced as torch's "The size of
    tensor a (2) must match the size of tensor b (3)" from inside a layer."""
    net = ntkgp.mlp(depth=1)
    net.expand_batch(torch.Size([2]))
    with pytest.raises(ValueError, match=r"batch shapes \[\(3,\)\] do not broadcast with the hyperparameters' "
                                         r"batch shape\(s\) \[\(2,\)\]"):
        net.kernel(torch.randn(3, 4, 3))
    assert net.kernel(torch.randn(2, 4, 3)).nngp.shape == net.kernel(torch.randn(4, 3)).nngp.shape == (2, 4, 4)


@pytest.mark.parametrize("net,message", [
    (lambda: ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(1)), "Gaussian inputs"),
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.Dense(3, ard_num_dims=3)), "first layer"),
    # a sum with an activation's branch is not Gaussian: no activation directly after it
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.parallel(ntkgp.Dense(3), ntkgp.ReLU()), ntkgp.Erf()),
     "Gaussian inputs"),
    # a concatenation of Dense branches: "put a Dense layer before it" alone misled, one was there
    (lambda: ntkgp.serial(ntkgp.parallel(ntkgp.Dense(3), ntkgp.Dense(3), join="concat"), ntkgp.ReLU()),
     r"Gaussian inputs .* a concatenation of several branches are not\. Put a Dense layer right before it\.$"),
    # a residual on the raw inputs keeps their fixed width: a Dense after it is not Gaussian in the limit
    (lambda: ntkgp.serial(ntkgp.residual(ntkgp.Dense(3)), ntkgp.Dense(3), ntkgp.ReLU()), "raw inputs"),
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.parallel(ntkgp.ReLU(), ntkgp.Identity())), "independent"),
    (lambda: ntkgp.serial(ntkgp.parallel(ntkgp.Dense(3), ntkgp.Dense(4))), "equal widths"),
    # the raw inputs' features are fixed numbers, whose mean a LayerNorm would subtract
    (lambda: ntkgp.serial(ntkgp.parallel(ntkgp.Identity(), ntkgp.Dense(3), join="concat"), ntkgp.LayerNorm()),
     "known mean.*raw inputs, alone or in a concatenation, have none"),
    # two branches of non-zero means need them known (Elementwise without mean_fn)
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.parallel(
        ntkgp.serial(ntkgp.Dense(3), ntkgp.ReLU()),
        ntkgp.serial(ntkgp.Dense(3), ntkgp.Elementwise(torch.relu, nngp_fn=lambda k12, k11, k22: k12)))),
     "mean_fn"),
    # products: of the raw inputs, of dependent branches, of two concatenations
    (lambda: ntkgp.serial(ntkgp.parallel(ntkgp.Identity(), ntkgp.Dense(3), join="prod"), ntkgp.Dense(1)), "raw inputs"),
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.parallel(ntkgp.Identity(), ntkgp.ReLU(), join="prod")), "independent"),
    (lambda: ntkgp.serial(ntkgp.Dense(4), ntkgp.parallel(
        *[ntkgp.parallel(ntkgp.Dense(2), ntkgp.Dense(2, 2.0), join="concat")] * 2, join="prod")), "two concatenations"),
    # raw inputs in a concatenation have no mean a sum could pair with another branch's
    (lambda: ntkgp.serial(ntkgp.parallel(ntkgp.parallel(ntkgp.Identity(), ntkgp.Dense(3), join="concat"),
                                         ntkgp.serial(ntkgp.Dense(6), ntkgp.ReLU()))), "raw inputs in a concatenation"),
    # two concatenations of different means pair their features one by one
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.parallel(
        *[ntkgp.parallel(ntkgp.serial(ntkgp.Dense(3), ntkgp.ReLU()), ntkgp.Dense(3), join="concat")] * 2)),
     "two concatenations"),
    # correlated branches: x + x is 2x (4K), not 2K, and x + LayerNorm(x) has cross terms
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.residual(ntkgp.Identity())), "independent"),
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.parallel(ntkgp.Identity(), ntkgp.Identity())), "independent"),
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.residual(ntkgp.LayerNorm())), "independent"),
    (lambda: ntkgp.serial(ntkgp.Dense(3), ntkgp.residual(ntkgp.residual(ntkgp.ReLU(), ntkgp.Dense(3)))), "independent"),
])
def test_invalid_architectures_raise_before_work(net, message):
    with pytest.raises(ValueError, match=message):
        net().kernel(torch.randn(4, 3))


def test_correlated_sums_are_refused_from_the_spec_before_any_kernel_work(monkeypatch):
    """The independence of summed branches is a property of the spec: it is checked before the
    layers in front of the sum compute anything (it used to come after the whole prefix)."""
    net = ntkgp.serial(ntkgp.Dense(3), ntkgp.ReLU(), ntkgp.Dense(3), ntkgp.residual(ntkgp.LayerNorm()))

    def fail(*args, **kwargs):
        raise AssertionError("kernel work before the structural check")

    monkeypatch.setattr(ntkgp.Dense, "kernel_map", fail)
    for kernel in (lambda x: net.kernel(x), lambda x: ntkgp.NNGPKernel(net)(x).to_dense()):
        with pytest.raises(ValueError, match="independent"):
            kernel(torch.randn(4, 3))


def test_sums_of_independent_branches_match_monte_carlo():
    """All but one branch contain a Dense layer of their own, here at their ends (a LayerNorm after
    it keeps them centred): the sum's kernel is the sum of the branches', as wide networks confirm.
    250 networks x 32 outputs (conditionally independent given the last hidden layer; each network's
    average one sample of the standard error): standard errors 0.51-0.57x those of the 2000 one-output
    networks used before (largest 0.033 and 0.011 against 0.056 and 0.022), at an eighth of the time."""
    net = ntkgp.serial(ntkgp.Dense(256, 1.5, 0.1), ntkgp.parallel(
        ntkgp.Identity(), ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(256, 2.0, 0.1), ntkgp.LayerNorm()),
        ntkgp.serial(ntkgp.Erf(), ntkgp.Dense(256, 1.0, 0.2))), ntkgp.ReLU(), ntkgp.Dense(32))
    nested = ntkgp.serial(ntkgp.Dense(256, 1.5, 0.1), ntkgp.residual(           # x + (h + D(relu(h))), h = D(relu(x))
        ntkgp.ReLU(), ntkgp.Dense(256, 1.2, 0.1), ntkgp.residual(ntkgp.ReLU(), ntkgp.Dense(256, 0.8, 0.1))),
        ntkgp.Erf(), ntkgp.Dense(32))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for spec in (net, nested):
        exact = spec.kernel(x).nngp.detach()
        est = ntkgp.finite.monte_carlo_kernel(spec, x, n_samples=250, ntk=False)
        z = (est.nngp - exact) / est.nngp_sem
        assert float(z.abs().max()) < 4.5, z


def test_sums_with_an_activation_branch():
    """x + D(x) with x an activation's output: the Dense branch's centred weights make the cross term
    vanish whatever x is, so K = K_x + K_D(x) and Θ = Θ_x + Θ_D(x); the sum is not Gaussian, so a
    Dense must follow. It was refused ("every branch must end Gaussian"). On the raw inputs it still
    is: the sum keeps their fixed width d, and an activation after the next Dense was off by z = 14
    against wide networks at d = 1."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="raw inputs as a branch"):
        ntkgp.serial(ntkgp.residual(ntkgp.Dense(3, 2.0, 0.1)), ntkgp.Dense(1, 1.5, 0.2)).kernel(x)
    # after a ReLU: the sum of the branches' kernels, and what wide networks give
    after_relu = ntkgp.serial(ntkgp.Dense(512, 2.0, 0.1), ntkgp.ReLU(), ntkgp.residual(ntkgp.Dense(512, 1.2, 0.1)),
                              ntkgp.Dense(1, 1.0, 0.1))
    plain = ntkgp.serial(ntkgp.Dense(512, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.0))
    branch = ntkgp.serial(ntkgp.Dense(512, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(512, 1.2, 0.1),
                          ntkgp.Dense(1, 1.0, 0.1))
    exact, parts = after_relu.kernel(x), [plain.kernel(x), branch.kernel(x)]
    torch.testing.assert_close(exact.nngp, parts[0].nngp + parts[1].nngp, rtol=1e-13, atol=0)
    for spec in (after_relu,):
        est = ntkgp.finite.monte_carlo_kernel(spec, x, n_samples=1000)
        for name in ("nngp", "ntk"):
            z = (getattr(est, name) - getattr(spec.kernel(x), name).detach()) / getattr(est, f"{name}_sem")
            assert float(z.abs().max()) < 4.5, (name, z)


def test_a_deferred_build_of_a_sum_checks_the_widths_it_learns_at_the_first_call():
    """An eager build refuses a residual on 1-D inputs around a 5-wide Dense; deferred, the input
    width is known only at the call, where (3, 1) + (3, 5) broadcast silently to (3, 5)."""
    net = ntkgp.serial(ntkgp.residual(ntkgp.Dense(5)), ntkgp.Dense(2))
    with pytest.raises(ValueError, match=r"equal widths, got \[1, 5\]"):
        net.build(in_features=1, seed=0)
    with pytest.raises(ValueError, match=r"equal widths, got \[1, 5\]"):
        net.build(seed=0)(torch.randn(3, 1))
    assert net.build(seed=0)(torch.randn(3, 5)).shape == (3, 2)


def test_elementwise_without_dot_fn_refuses_an_infinite_derivative():
    """An arc-cosine NNGP map has ∂T/∂k12 = ∞ at k12² = k11·k22 (the diagonal): autograd gives NaN
    or ±inf there, so the NTK raises instead of returning them; with dot_fn it equals ReLU's. (The
    map clamps with torch.where: torch 2.15's clamp has derivative 0 at its bound, which hides the
    infinity behind a finite, wrong Ṫ; the class docstring says so.)"""
    def relu_nngp(k12, k11, k22):
        det = k11 * k22 - k12**2
        s = torch.sqrt(torch.where(det < 0, 0.0, det))
        return (s + (math.pi - torch.atan2(s, k12)) * k12) / (2 * math.pi)

    def relu_dot(k12, k11, k22):
        return (math.pi - torch.atan2(torch.sqrt(torch.clamp(k11 * k22 - k12**2, min=0)), k12)) / (2 * math.pi)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    net = lambda act: ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), act, ntkgp.Dense(1))  # noqa: E731
    with pytest.raises(ValueError, match="dot_fn"):
        net(ntkgp.Elementwise(torch.relu, relu_nngp)).kernel(x)
    torch.testing.assert_close(net(ntkgp.Elementwise(torch.relu, relu_nngp)).kernel(x, x[:2] + 1).ntk,
                               net(ntkgp.ReLU()).kernel(x, x[:2] + 1).ntk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net(ntkgp.Elementwise(torch.relu, relu_nngp, relu_dot)).kernel(x).ntk,
                               net(ntkgp.ReLU()).kernel(x).ntk, rtol=1e-12, atol=1e-12)


def test_forward_and_reverse_mode_hyperparameter_derivatives_agree():
    """The safe square root (ReLU's angle, Erf's and GELU's determinant) supports forward mode and
    vmap: ``jacfwd`` of an NTK in its raw variances equals ``jacrev``, duplicates and zero inputs included."""
    x = torch.cat([torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 3)])
    x = torch.cat([x, x[:1]]).double()

    class Ntk(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return self.net.kernel(inputs).ntk

    for act in (ntkgp.ReLU(), ntkgp.Erf(), ntkgp.GELU()):
        module = Ntk(ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), act, ntkgp.Dense(1, 1.2, None))).double()
        params = {n: p.detach() for n, p in module.named_parameters()}
        ntk = lambda ps, module=module: torch.func.functional_call(module, ps, (x,))  # noqa: E731
        forward, reverse = torch.func.jacfwd(ntk)(params), torch.func.jacrev(ntk)(params)
        for name in params:
            assert bool(torch.isfinite(forward[name]).all())
            torch.testing.assert_close(forward[name], reverse[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [ntkgp.ReLU, ntkgp.Erf, ntkgp.GELU, ntkgp.Sign, ntkgp.Abs, ntkgp.Gabor,
                                  lambda: ntkgp.Numerical(torch.tanh, degree=30)])
def test_variances_whose_products_overflow_are_scaled_not_lost(make):
    """k11 k22 overflows float32 above k ≈ 1.8e19 (inputs of size ~1e10): off-diagonal entries
    read 0 or inf before. Float32 must agree with float64 (where nothing overflows) to float32
    precision, and saturating activations must give the same kernel at scale 1e10 and 1e12."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, 0.1), make(), ntkgp.Dense(1, 1.0, 0.1))
    with torch.no_grad():
        for scale in (1e10, 1e12):
            k64, k32 = net.kernel(scale * x), net.kernel((scale * x).float())
            for a, b in ((k32.nngp, k64.nngp), (k32.ntk, k64.ntk)):
                assert bool(torch.isfinite(a).all())
                torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=0)
        if make in (ntkgp.Erf, ntkgp.Sign):   # bounded: the kernel no longer depends on the scale
            torch.testing.assert_close(net.kernel(1e150 * x).nngp, net.kernel(1e12 * x).nngp, rtol=1e-9, atol=0)



@pytest.mark.parametrize("make", [ntkgp.GELU, ntkgp.Erf, ntkgp.SigmoidLike, lambda: ntkgp.Erf(1.3, 0.7, 0.2),
                                  ntkgp.Gaussian, ntkgp.Gabor],
                         ids=["gelu", "erf", "sigmoid_like", "erf_shifted", "gaussian", "gabor"])
def test_a_huge_input_costs_the_other_pairs_neither_digits_nor_gradients(make):
    """One input of variance 9e37 beside ordinary ones, in float32. GELU's, erf's and the Gaussian's
    determinants were formed in one scale for all points, ~1e-20 here, whose square (the dominant
    term of an ordinary pair's determinant) is subnormal: the ordinary pairs lost 10–60 times
    float32's rounding (1e-6 to 7e-6 relative), and the derivative of ``1/sqrt`` at it, ``~1/c³``,
    overflowed, so the gradients of every input were NaN (Gabor's ``rsqrt`` did the same from
    variances of 1e30, and its self-pair ``sqrt(1/D)`` for the huge input's own row). With a scale
    per pair the ordinary pairs are unscaled: their kernels are bitwise those without the huge input
    (erf's ``Ṫ`` took ``(constant · c)/root``, an ulp from the unscaled path's ``constant · (1/root)``),
    and so are their gradients to 1e-6 (measured 3.6e-7: autograd sums a point's contributions in
    another order). The huge input's rows agree
    with float64 at the same inputs (values to 3e-6, measured 1e-6; gradients to 2e-6, measured
    1.5e-7), except Gabor's gradients, which are only
    finite: they are ``~1e-31`` of cross entries that float32 holds only as subnormal products, and
    its ``Θ``'s diagonal gradient through ``k Ṫ'(k)``, ``~k^{−3/2}`` times ``k``, is 16% off."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x[5] = torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64) * 1e19
    net = ntkgp.serial(ntkgp.Dense(1, 2.0, 0.1), make(), ntkgp.Dense(1, 1.0, 0.1))
    x = x.float().double()   # float32's inputs, so that the comparison sees the kernels' rounding only

    def kernels_and_gradients(x):
        x = x.clone().requires_grad_()
        k = net.kernel(x)
        ordinary = torch.autograd.grad(k.nngp[:5, :5].sum() + k.ntk[:5, :5].sum(), x, retain_graph=True)[0]
        huge = torch.autograd.grad(k.nngp[-1].sum() + k.ntk[-1].sum(), x)[0] if len(x) == 6 else None
        return k.nngp.detach(), k.ntk.detach(), ordinary, huge

    nngp32, ntk32, ordinary32, huge32 = kernels_and_gradients(x.float())
    alone = kernels_and_gradients(x[:5].float())
    assert torch.equal(nngp32[:5, :5], alone[0]) and torch.equal(ntk32[:5, :5], alone[1])
    assert float((ordinary32[:5] - alone[2]).norm() / alone[2].norm()) < 1e-6
    assert bool(torch.isfinite(huge32).all())
    nngp64, ntk64, _, huge64 = kernels_and_gradients(x)
    torch.testing.assert_close(nngp32[5].double(), nngp64[5], rtol=3e-6, atol=1000 * torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(ntk32[5].double(), ntk64[5], rtol=3e-6, atol=1000 * torch.finfo(torch.float32).tiny)
    if make is not ntkgp.Gabor:
        assert float((huge32.double() - huge64).norm() / huge64.norm()) < 2e-6

@pytest.mark.parametrize("make", [lambda: ntkgp.ABReLU(-0.4, 1.3), lambda: ntkgp.ABReLU(1.3, -0.05), ntkgp.Abs,
                                  ntkgp.ReLU, lambda: ntkgp.ABReLU(0.2, 1.0)],
                         ids=["abrelu_opposite", "abrelu_opposite_swapped", "abs", "relu", "abrelu_same_sign"])
def test_the_relu_family_s_float32_gradients_do_not_depend_on_the_variances_scale(make):
    """``T`` is homogeneous of degree 1 and ``Ṫ`` of degree 0, so at variances scaled by ``S = 4^e``
    their gradients (of ``T`` and of ``S Ṫ``, as ``Θ = Θ_prev Ṫ`` sends it) are those at ``S = 1``.
    Beside variances of ~1e20 in float32 the angle is taken from variances scaled by powers of 4;
    slopes of opposite signs and ``a + b ≠ 0`` took the supplement again, as ``atan2(s, −k12)`` of
    the unscaled ones, whose derivative's ``grad · k12`` overflowed: every gradient was NaN. Values
    are bitwise those at ``S = 1``, gradients within 2e-7 (measured 1.6e-7, at ``ρ = −0.999``:
    autograd's rounding of the scaled path); ``S = 4^62 ≈ 2e37`` still overflows inside ``Ṫ``'s
    gradient near ``ρ = −1`` (Abs too)."""
    layer = make()
    k11, k22 = torch.tensor([0.7, 2.0] * 4), torch.tensor([2.0, 0.7] * 4)
    k12 = torch.tensor([-0.3, -0.9, 0.5, -0.999, 0.2, -1e-3, 0.0, 0.99]) * (k11 * k22).sqrt()

    def kernels_and_gradients(scale):
        args = [(k * scale).requires_grad_() for k in (k11, k12, k22)]
        nngp, dot = layer.pair_kernel(*args, True)
        return nngp.detach() / scale, dot.detach(), torch.autograd.grad(nngp.sum() + (dot * scale).sum(), args)

    nngp, dot, gradients = kernels_and_gradients(1.0)
    for e in (35, 50):
        got_nngp, got_dot, got_gradients = kernels_and_gradients(4.0**e)
        assert torch.equal(got_nngp, nngp) and torch.equal(got_dot, dot)
        for got, want in zip(got_gradients, gradients, strict=True):
            torch.testing.assert_close(got, want, rtol=2e-7, atol=0)



@pytest.mark.parametrize(("degree", "e"), [(2, 25), (3, 17)])
def test_rectified_monomial_float32_gradients_at_large_variances_are_those_of_the_scaled_kernel(degree, e):
    """``T`` is homogeneous of degree ``n`` and ``Ṫ`` of degree ``n − 1``, so at variances scaled by
    ``S = 4^e`` their gradients are ``S^{n−1}`` and ``S^{n−2}`` times those at ``S = 1``. The gradient
    reaching the angle is ``~k^n``, and ``atan2``'s derivative multiplies it by ``s ~ k`` before dividing
    by ``s² + k12²``: in float32 that overflowed from ``k^{n+1} ~ 3e38`` (``k ≈ 4e9`` for ``n = 3``,
    inputs of size ~1e5; ``7e12`` for ``n = 2``), below the ``1.15e18`` from which the angle's variances
    were scaled, and the gradients by ``k12`` (so by every input) were ``inf`` beside finite kernels.
    Values are bitwise those at ``S = 1`` (powers of 2), and so are the gradients (measured; 2e-6
    leaves room for autograd summing a tensor's contributions in another order)."""
    layer = ntkgp.RectifiedMonomial(degree)
    k11, k22 = torch.tensor([0.7, 2.0] * 4), torch.tensor([2.0, 0.7] * 4)
    k12 = torch.tensor([-0.3, -0.9, 0.5, -0.999, 0.2, -1e-3, 0.0, 0.99]) * (k11 * k22).sqrt()

    def kernels_and_gradients(scale):
        args = [(k * scale).requires_grad_() for k in (k11, k12, k22)]
        nngp, dot = layer.pair_kernel(*args, True)
        by_nngp = torch.autograd.grad(nngp.sum(), args, retain_graph=True)
        by_dot = torch.autograd.grad(dot.sum(), args)
        return (nngp.detach() / scale**degree, dot.detach() / scale ** (degree - 1),
                [g / scale ** (degree - 1) for g in by_nngp] + [g / scale ** (degree - 2) for g in by_dot])

    nngp, dot, gradients = kernels_and_gradients(1.0)
    got_nngp, got_dot, got_gradients = kernels_and_gradients(4.0**e)
    assert torch.equal(got_nngp, nngp) and torch.equal(got_dot, dot)
    for got, want in zip(got_gradients, gradients, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def _kernels_on_every_path(net, x, monkeypatch):
    """``net.kernel(x)`` as one block, in blocks of 7 rows, and on the graph-building path."""
    with torch.no_grad():
        results = [net.kernel(x)]
        monkeypatch.setattr(base, "BLOCK_ENTRIES", 7 * x.shape[-2])
        results.append(net.kernel(x))
        monkeypatch.undo()
    results.append(net.kernel(x.clone().requires_grad_()))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicate_points_are_exactly_the_same_point(dtype, monkeypatch):
    """x_i == x_j (i ≠ j) must give K_ij = K_ii bitwise, as a point with itself does: the cross Gram
    entry and the squared norms round differently, and the square roots of the angle turned that
    ulp into errors of 1e-4 (Sign, depth 2, float64) up to 73 % (depth 10) before."""
    y = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = torch.cat([y, y[:25]])                        # x[40 + i] == x[i]
    pairs = (torch.arange(25), 40 + torch.arange(25))
    for act, depth in (("sign", 10), ("relu", 10), ("erf", 4)):
        net = ntkgp.mlp(depth, act, 2.0 if act == "relu" else 1.0, 0.1)
        results = _kernels_on_every_path(net, x, monkeypatch)
        for k in results:
            for name in ("nngp", "ntk"):
                matrix = getattr(k, name)
                assert torch.equal(matrix[pairs], matrix.diagonal()[:25]), (act, name)
        with torch.no_grad():  # a test set that shares points with the training set
            cross = net.kernel(x[:10], x[30:])
        assert torch.equal(cross.nngp[torch.arange(10), 10 + torch.arange(10)], results[0].nngp.diagonal()[:10])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicate_points_in_batched_inputs(dtype, monkeypatch):
    """Batched inputs (a batch GP; BoTorch's candidate batches, whose candidates may sit on training
    points) repeat different points in different batches: each batch's equal points are exactly
    the same point. Before, Sign at depth 10 was off by 0.8 between a batch and its own
    unbatched kernel."""
    y = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x = torch.cat([y, y[:, :6]], 1)                   # x[b, 20 + i] == x[b, i]
    x[1, 25] = x[1, 3]                                # and in batch 1 only, x[1, 25] == x[1, 3]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for act, depth in (("sign", 10), ("relu", 10), ("erf", 4)):
        net = ntkgp.mlp(depth, act, 2.0 if act == "relu" else 1.0, 0.1)
        results = _kernels_on_every_path(net, x, monkeypatch)
        for k in results:
            for name in ("nngp", "ntk"):
                m = getattr(k, name).detach()
                diagonal = m.diagonal(dim1=-2, dim2=-1)
                for b in range(3):
                    i = torch.arange(5 if b == 1 else 6)
                    assert torch.equal(m[b, i, 20 + i], diagonal[b, i]), (act, name, b)
                    assert torch.equal(diagonal[b, 20 + i], diagonal[b, i]), (act, name, b)
                assert torch.equal(m[1, [3, 25, 25], [25, 3, 25]], diagonal[1, [3, 3, 3]]), (act, name)
                assert m[0, 3, 25] != diagonal[0, 3]              # not the same point in batch 0
                for b in range(3):
                    with torch.no_grad():
                        single = getattr(net.kernel(x[b]), name)
                    torch.testing.assert_close(m[b], single, rtol=rtol, atol=0)
        with torch.no_grad():  # candidates on training points; batched against batched or shared
            cross = net.kernel(x[:, :4], x[:, 18:]).nngp                     # x[:, 20:24] == x[:, :4]
            shared = net.kernel(x[:, :4], y[0]).nngp
        own = results[0].nngp.diagonal(dim1=-2, dim2=-1)[:, :4]
        i = torch.arange(4)
        torch.testing.assert_close(cross[:, i, 2 + i], own, rtol=16 * torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(shared[0, i, i], own[0], rtol=16 * torch.finfo(dtype).eps, atol=0)
        # unbatched candidates against training inputs expanded over a batch (as GPyTorch does),
        # sharing a point: crashed ("value tensor of shape [4, 2] cannot be broadcast") when the
        # expanded axis was screened once
        with torch.no_grad():
            expanded = net.kernel(y[0, [0, 3]], y[0].expand(4, 20, 8))
            plain = net.kernel(y[0, [0, 3]], y[0].expand(4, 20, 8).contiguous())
        torch.testing.assert_close(expanded.nngp, plain.nngp, rtol=0, atol=0)
        torch.testing.assert_close(expanded.ntk, plain.ntk, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_duplicates_differing_only_in_the_sign_of_a_zero_are_the_same_point(dtype, monkeypatch):
    """``0.0 == −0.0`` (``torch.round(-0.3)`` gives ``−0.0``), but their bits differ: keyed by bits,
    such twins escaped the duplicate screen unless some other pair set it off, and a depth-10 Sign
    network gave 0.19 for a pair whose value is 2.0."""
    x = torch.randn(60, 64, generator=torch.Generator().manual_seed(5)).to(dtype) * 3
    x[:, 0] = 0.0
    x[21] = x[13]
    x[21, 0] = -0.0
    assert bool((x[21] == x[13]).all()) and not torch.equal(x[21].view(torch.int8), x[13].view(torch.int8))
    net = ntkgp.mlp(10, "sign", 2.0, None)
    if dtype == torch.float16:   # the kernel runs in float32 or float64; the screen sees the half bits
        with torch.no_grad():
            k = net.kernel(x.double())
        assert bool((k.nngp[13, 21] == k.nngp[13, 13]) & (k.nngp[21, 21] == k.nngp[13, 13]))
        from ntkgp.layers.state import _row_keys
        assert _row_keys(x)[21] == _row_keys(x)[13]
        return
    for k in _kernels_on_every_path(net, x, monkeypatch):
        for name in ("nngp", "ntk"):
            matrix = getattr(k, name).detach()
            assert matrix[13, 21] == matrix[13, 13] == matrix[21, 21], name


@pytest.mark.parametrize("seed", [17, 18, 19])
def test_duplicates_have_bitwise_equal_diagonals_across_blocks(seed, monkeypatch):
    """Elementwise maps round the scalar-coded tail of a tensor differently from its vectorized
    body, and row blocks are separate tensors: a point's diagonal came out up to 4 ulps away from
    its twin's (float32 erf and GELU, NNGP and NTK) before the finished kernel was made canonical."""
    g = torch.Generator().manual_seed(seed)
    n = 17 + 3 * seed
    y = torch.randn(n, 5, generator=g)
    twins = torch.randint(0, n, (n // 2,), generator=g)
    x = torch.cat([y, y[twins]])
    i = torch.arange(n // 2)
    for act in ("erf", "gelu", "relu"):
        net = ntkgp.mlp(3, act, 1.5, 0.1)
        for entries in (None, 5 * x.shape[0]):
            if entries is not None:
                monkeypatch.setattr(base, "BLOCK_ENTRIES", entries)
            with torch.no_grad():
                k = net.kernel(x)
            monkeypatch.undo()
            for m in (k.nngp, k.ntk):
                assert torch.equal(m.diagonal()[n + i], m.diagonal()[twins]), (act, entries)
                assert torch.equal(m[twins, n + i], m.diagonal()[twins]), (act, entries)


@pytest.mark.parametrize("grad", [False, True])
def test_pairs_of_equal_points_found_in_chunks_change_nothing(grad, monkeypatch):
    """A large kernel's pairs of equal points are found a chunk of ``_PAIR_BLOCK_ENTRIES`` row ×
    column comparisons at a time (listed whole, 4000 equal points held 16 million pairs, +530
    MiB). Chunks of 7 comparisons (1–2 rows) give bitwise the kernels of one chunk, whole-matrix
    graph and row blocks alike, and a point's twins keep its diagonal."""
    g = torch.Generator().manual_seed(4)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    x = torch.cat([y, y[[0, 0, 2, 5, 5, 5]], y[:1]])      # groups of 4, 2 and 4 points
    net = ntkgp.mlp(3, "sign", 1.5, 0.1).double()
    monkeypatch.setattr(base, "BLOCK_ENTRIES", 40)
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1 << 62)   # the whole graph with autograd
    results = []
    for chunk in (1 << 20, 7):
        monkeypatch.setattr(ntkgp.layers.state, "_PAIR_BLOCK_ENTRIES", chunk)
        with torch.set_grad_enabled(grad):
            k = net.kernel(x)
        results.append((k.nngp.detach(), k.ntk.detach()))
        for m in results[-1]:
            d = m.diagonal()
            assert torch.equal(d[[9, 10, 15]], d[[0, 0, 0]]) and torch.equal(m[0, [9, 10, 15]], d[[0, 0, 0]])
            assert torch.equal(m[[12, 13, 14], 5], d[[5, 5, 5]]) and torch.equal(m[11, 2], d[2])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-12), (torch.float64, 1e-80)])
def test_tiny_variances_keep_their_angles(dtype, scale):
    """k11·k22 of variances ~1e-24 (float32) underflowed to 0, so every angle read 0 or π: Sign
    gave 1 instead of 0.41 and ReLU was off by 1.3× its scale. Each point's variance is now
    scaled by its own power of 4. Without biases the kernels are homogeneous, K(c·x) = c² K(x)
    (Sign: K(c·x) = K(x)), which is the reference."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x[5] = -x[0]
    for act, power in ((ntkgp.ReLU(), 2), (ntkgp.Abs(), 2), (ntkgp.LeakyReLU(0.1), 2), (ntkgp.Sign(), 0)):
        net = ntkgp.serial(ntkgp.Dense(8, 2.0, None), act, ntkgp.Dense(8, 2.0, None), act, ntkgp.Dense(1, 1.0, None))
        with torch.no_grad():
            small, unit = net.kernel(scale * x), net.kernel(x)
        for name in ("nngp", "ntk"):
            expected = getattr(unit, name) * scale**power
            torch.testing.assert_close(getattr(small, name), expected, rtol=64 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-300), (torch.float32, 1e-23)])
@pytest.mark.parametrize("grad", [False, True])
def test_an_underflowing_squared_norm_is_a_zero_variance(dtype, scale, grad):
    """The squared norm of x = 1e-300·u (float64; 1e-23·u in float32) underflows to 0 where its
    products with other inputs do not, and the angle atan2(k12, 0) read a correlation of ±1 against
    a variance of 0: Sign's NNGP of (x, u) was [[0, 1], [1, 1]], not positive semi-definite, and a
    LayerNorm after it read 1e6 (1/sqrt(eps)) off the diagonal. A variance of 0 is the constant
    feature 0, uncorrelated with every other (|k12| <= sqrt(k11 k22) = 0): the kernels are those of
    the zero vector, the reference (Sign: a zero row; the step: H(0) E[H(v)] = 1/4)."""
    u = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x, zero = torch.cat([scale * u[:1], u]), torch.cat([torch.zeros_like(u[:1]), u])
    for act in (ntkgp.Sign(), ntkgp.RectifiedMonomial(0)):
        first = ntkgp.serial(ntkgp.Dense(1, 1.0, 0.0), act)
        with torch.set_grad_enabled(grad):
            k = first.kernel(x)
        expected = 0.0 if isinstance(act, ntkgp.Sign) else 0.25
        torch.testing.assert_close(k.nngp[0, 1:].detach(), torch.full((4,), expected, dtype=dtype), rtol=0, atol=0)
        assert float(torch.linalg.eigvalsh(k.nngp.detach().double()).min()) >= -1e-15
        for net in (ntkgp.serial(ntkgp.Dense(8, 2.0, None), act, ntkgp.Dense(8, 1.5, 0.1), ntkgp.ReLU(),
                                 ntkgp.Dense(1, 1.0, None)),
                    ntkgp.serial(ntkgp.Dense(8, 2.0, 0.0), act, ntkgp.LayerNorm(), ntkgp.Dense(1, 1.0, 0.1))):
            with torch.set_grad_enabled(grad):
                tiny, reference = net.kernel(x), net.kernel(zero)
            for name in ("nngp", "ntk"):
                torch.testing.assert_close(getattr(tiny, name).detach(), getattr(reference, name).detach(),
                                           rtol=0, atol=0)


def test_layernorm_of_huge_variances_keeps_the_kernel():
    """(eps + k11)(eps + k22) overflowed for float32 inputs ~1e10 and rsqrt(inf) = 0 erased the
    kernel (NNGP 0.26 for 0.44, NTK 0.26 for 0.65). After a bias-free Dense layer LayerNorm makes
    the kernel scale-invariant: K(1e10·x) = K(x)."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, None), ntkgp.LayerNorm(), ntkgp.Dense(8, 1.5, 0.1), ntkgp.Erf(),
                       ntkgp.Dense(1, 1.0, 0.1))
    for scale in (1e10, 1e12):
        with torch.no_grad():
            big, unit = net.kernel(scale * x), net.kernel(x)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(big, name), getattr(unit, name), rtol=1e-5, atol=0)
    torch.testing.assert_close(net.kernel(1e10 * x, diag=True).ntk, big.ntk.diagonal(), rtol=1e-6, atol=0)


def test_sin_and_cos_stay_finite_for_nearly_parallel_inputs_of_large_variance():
    """b²(k12 − (k11+k22)/2) ≤ 0, but for nearly (anti)parallel inputs of variance ~1e10 rounding
    made it positive by ulp(k) and exp returned inf (31 of 200 random float32 pairs at scale 1e5).
    The exponents are clamped at 0; the kernels then stay within their bounds |T| ≤ a²."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 1, 3, generator=g)
    pairs = torch.cat([base, base * (1 + 1e-7), -base * (1 + 1e-7)], 1) * 1e5       # (200, 3, 3)
    for act in (ntkgp.Sin(), ntkgp.Cos(2.0)):
        net = ntkgp.serial(ntkgp.Dense(8, 1.0, None), act, ntkgp.Dense(1, 1.0, None))
        with torch.no_grad():
            k = net.kernel(pairs)
        bound = act.a**2
        for m in (k.nngp, k.ntk):
            assert bool(torch.isfinite(m).all())
        assert float(k.nngp.abs().max()) <= bound * (1 + 1e-6)


@pytest.mark.parametrize("make", [ntkgp.Sin, ntkgp.Cos, lambda: ntkgp.Sin(1.1, 0.9, 0.3)],
                         ids=["sin", "cos", "sin_abc"])
def test_sin_and_cos_of_near_duplicates_keep_an_exact_gram_matrix_exact(make):
    """The exponent b²(k12 − (k11 + k22)/2) rounded the half sum to float32's grid, ulp(k) = 1 at
    variances of 1e7, however exact the kernels: integer inputs (2236, 2236) and (2236, 2237) have an
    exact float32 Gram matrix (products below 2^24, σ²/d = 1) with ‖x − x'‖² σ²/d = 1, and Sin's
    cross NNGP was 0.5 for a²/2 e^{−1/2} = 0.303 (65 % off; the opposite pair likewise), as if the
    points were equal. From the differences (k11 ∓ k12) + (k22 ∓ k12), exact here (Sterbenz), as
    Rbf's, float32 agrees with float64 on the same inputs to its rounding (measured 9e-8)."""
    x = torch.tensor([[2236.0, 2236.0], [2236.0, 2237.0], [-2236.0, -2237.0]], dtype=torch.float32)
    net = ntkgp.serial(ntkgp.Dense(1, 2.0, None), make(), ntkgp.Dense(1, 1.0, 0.1))
    with torch.no_grad():
        k32, k64 = net.kernel(x), net.kernel(x.double())
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(k32, name).double(), getattr(k64, name), rtol=1e-6, atol=1e-6)




@pytest.mark.parametrize("make", [lambda: ntkgp.Sin(1.1, 0.9, 0.3), ntkgp.Sin, ntkgp.Cos,
                                  lambda: ntkgp.Cos(0.8, 1.2, 0.4)],
                         ids=["sin", "sin_default", "cos", "cos_shifted"])
def test_sin_and_cos_of_a_point_with_itself_near_float32s_largest_variance(make):
    """``(k11 + k22)/2`` overflowed float32 from variances of 1.7e38 (inputs of size ~1e19), and
    ``e^{b²(k12 − (k11 + k22)/2)}`` read ``e^{−∞} = 0``: a point with itself had ``T = Ṫ = 0`` by the pair
    formula, and the NTK of a pair of equal inputs given apart (``kernel(x1, x2)``) with autograd on lost
    its ``Θ Ṫ`` (``Sin(1.1, 0.9, 0.3)``: 0.605 for 8.93e37). The pair formula at ``k11 = k12 = k22`` is the variance
    and ``Ṫ``'s own closed form (measured: equal), and the network agrees with float64 (where nothing
    overflows) to float32's rounding (measured 5e-8)."""
    act = make()
    k = torch.tensor([2e38, 3e38])
    nngp, dot = act.pair_kernel(k, k, k, True)
    torch.testing.assert_close(nngp, act.variance(k), rtol=1e-6, atol=0)
    torch.testing.assert_close(dot, act.dot_variance(k), rtol=1e-6, atol=0)
    net = ntkgp.serial(ntkgp.Dense(1, 1.0, 0.0), act, ntkgp.Dense(1, 1.0, 0.0))
    x = torch.tensor([[1.35e19], [-0.5]])
    for grad in (False, True):
        k32, k64 = net.kernel(x.clone().requires_grad_(grad), x), net.kernel(x.double(), x.double().clone())
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(getattr(k32, name).detach().double(), getattr(k64, name), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("scale", [1e-12, 1e11])
def test_float32_gradients_stay_finite_at_extreme_input_scales(scale):
    """Values were right but gradients NaN in float32 at input scales 1e-10 and 1e11 (ReLU family,
    Sign: the overflow scaling covered the forward pass only) and from 1e10 (GELU) or 1e13 (erf
    NTK: atan2's derivative squares both arguments)."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * scale
    for act in ("relu", "abs", "leaky_relu", "sign", "erf", "gelu", "gabor"):
        net = ntkgp.mlp(2, act, 2.0, None)
        xc = x.clone().requires_grad_()
        k = net.kernel(xc)
        grads = torch.autograd.grad(k.nngp.sum() + k.ntk.sum(), [xc, *net.parameters()])
        assert all(bool(torch.isfinite(g).all()) for g in grads), act


@pytest.mark.parametrize("batched", [False, True])
def test_derivatives_at_duplicates_follow_the_formula_not_the_substitute(batched):
    """Equal points get one point's values substituted (exact), but the derivatives must stay those
    of the kernel formula: with the substitute's, ∂K(x, y₂)/∂x at a candidate x sitting on the
    training point y₂ read 0 instead of −0.46, and ∂K(x, y₀)/∂x lost the candidate's own-variance
    term (−0.16 for −0.57). Reference: central differences (the kernels are smooth there along
    these directions but for the |x − y| kink, which a central difference cancels like the code;
    its |h|·h terms leave O(h) = 4e-7 at h = 1e-4)."""
    g = torch.Generator().manual_seed(0)
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    train = torch.randn(5, 3, generator=g, dtype=torch.float64)
    direction = torch.randn(3, generator=g, dtype=torch.float64)
    shape = (1, 1, 3) if batched else (1, 3)
    h = 1e-4   # smaller steps meet the NTK's ill-conditioning next to θ = 0 (rounding-level angles)
    for column in (2, 0):
        x = train[2].clone().reshape(shape).requires_grad_()
        for name in ("nngp", "ntk"):
            value = getattr(net.kernel(x, train), name)[..., 0, column].sum()
            (grad,) = torch.autograd.grad(value, x)
            with torch.no_grad():
                def f(s, name=name, column=column):
                    moved = (train[2] + s * direction).reshape(shape)
                    return getattr(net.kernel(moved, train), name)[..., 0, column].sum()
                fd = (f(h) - f(-h)) / (2 * h)
            assert abs(float((grad.reshape(-1) * direction).sum()) - float(fd)) < 2e-6 * max(1.0, abs(float(fd)))
    # in a symmetric kernel: the entry (0, 5) of two equal points, differentiated in point 0 alone
    x = torch.cat([train, train[:1]]).reshape(1, 6, 3) if batched else torch.cat([train, train[:1]])
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(net.kernel(x).ntk[..., 0, 5].sum(), x)
    with torch.no_grad():
        def f(s):
            moved = x.detach().clone()
            moved[..., 0, :] += s * direction
            return net.kernel(moved).ntk[..., 0, 5].sum()
        fd = (f(h) - f(-h)) / (2 * h)
    assert abs(float((grad[..., 0, :].reshape(-1) * direction).sum()) - float(fd)) < 2e-6 * max(1.0, abs(float(fd)))


def test_vmap_over_kernel_inputs_matches_a_loop():
    """torch.func.vmap over sets of inputs: the input checks and the duplicate screen branched on
    the values (vmap refuses data-dependent control flow), so it failed at the first check.
    Per-sample values are not screened for duplicates; Numerical layers are not supported."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    x2 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    nets = [ntkgp.mlp(2, act, 1.7, 0.1) for act in ("relu", "erf", "gelu", "sign", "sin")]
    nets.append(ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.LayerNorm(),
                             ntkgp.residual(ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(8, 1.0, 0.1))), ntkgp.Dense(1)))
    for net in nets:
        for call in (lambda x: net.kernel(x).ntk, lambda x: net.kernel(x, x2).ntk,  # noqa: B023
                     lambda x: net.kernel(x, diag=True).nngp):  # noqa: B023
            mapped = torch.func.vmap(call)(xs)
            looped = torch.stack([call(x) for x in xs])
            torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-14)


def test_vmap_over_kernels_against_a_second_set_of_as_many_points():
    """vmap over ``kernel(x, x2)`` (and ``diag=True``) with ``x2`` of ``x``'s shape, mapped or not: the
    check for ``x2`` equal to ``x`` called ``torch.equal``, which vmap refuses ("Batching rule not
    implemented for aten::equal"), so every such call failed."""
    g = torch.Generator().manual_seed(0)
    xs, x2s = (torch.randn(4, 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.GELU(), ntkgp.LayerNorm(), ntkgp.Dense(1))
    for diag in (False, True):
        def call(x, x2, diag=diag):
            return net.kernel(x, x2, diag=diag).ntk
        mapped = torch.func.vmap(call)(xs, x2s)
        torch.testing.assert_close(mapped, torch.stack([call(x, x2) for x, x2 in zip(xs, x2s, strict=True)]),
                                   rtol=1e-12, atol=1e-14)
        shared = torch.func.vmap(call, in_dims=(0, None))(xs, x2s[0])
        torch.testing.assert_close(shared, torch.stack([call(x, x2s[0]) for x in xs]), rtol=1e-12, atol=1e-14)


def test_elementwise_ntk_without_dot_fn_under_function_transforms_and_numerical_refused_there():
    """Elementwise without dot_fn made an autograd leaf for Ṫ = ∂T/∂k12, which vmap and jacfwd refuse
    ("You are attempting to call Tensor.requires_grad_() ... inside of a function being transformed");
    it takes a jvp there now and matches Erf. Numerical failed with torch's internals (dynamic
    shapes, setup_context, jvp); it names the limit."""
    import torch.autograd.forward_ad as fwAD

    def erf_map(k12, k11, k22):
        return (2 / math.pi) * torch.asin(2 * k12 / torch.sqrt((1 + 2 * k11) * (1 + 2 * k22)))

    xs = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward_mode(net):
        with fwAD.dual_level():
            return fwAD.unpack_dual(net.kernel(fwAD.make_dual(xs[0], torch.ones_like(xs[0]))).ntk).tangent

    runs = {"vmap": lambda net: torch.func.vmap(lambda x: net.kernel(x).ntk)(xs),
            "jacfwd": lambda net: torch.func.jacfwd(lambda x: net.kernel(x).ntk.sum())(xs[0]),
            "jacrev": lambda net: torch.func.jacrev(lambda x: net.kernel(x).ntk.sum())(xs[0]),
            "forward mode": forward_mode}

    def network(activation):
        return ntkgp.serial(ntkgp.Dense(4, 2.0, 0.1), activation, ntkgp.Dense(1, 1.5, 0.1))

    closed, user = network(ntkgp.Erf()), network(ntkgp.Elementwise(torch.erf, erf_map))
    for run in runs.values():
        torch.testing.assert_close(run(user), run(closed), rtol=1e-13, atol=1e-14)
    for degree in (None, 30):
        numerical = network(ntkgp.Numerical(torch.tanh, degree=degree))
        for run in runs.values():
            with pytest.raises(ValueError, match="Numerical layers work with reverse-mode autograd only"):
                run(numerical)


def test_a_failed_compilation_is_not_retried_for_the_same_network_and_dtype(monkeypatch):
    """Where torch.compile fails (no toolchain; float64 code generation on some CPUs), the kernel
    falls back to the eager path once with a warning, then stays there (each retry cost ~10 s)."""
    import ntkgp.layers.base as base

    attempts = []

    def failing():
        attempts.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(base, "_compiled_block", failing)
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        eager = net.kernel(x)
        with pytest.warns(RuntimeWarning, match="torch.compile failed") as caught:
            first = net.kernel(x, compile=True)
        second = net.kernel(x, compile=True)
    assert len(attempts) == 1
    assert [w.filename for w in caught] == [__file__]   # the caller's line, not the library's
    torch.testing.assert_close(first.ntk, eager.ntk, rtol=0, atol=0)
    torch.testing.assert_close(second.nngp, eager.nngp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-14), (torch.float32, 2e-6)])
def test_sin_and_cos_keep_their_digits_at_small_variances(dtype, rtol):
    """Sin's T (and Cos's Ṫ) was a difference e^A − e^B of exponentials that agree to ``b²k``: at
    variances k it lost ε/k of its digits (float64, k = 1e-8: 1e-8; float32 input scale 1e-3:
    8 %; k ~ 1e-300: every digit, T = 0). Reference, for c = 0 with m = (k11 + k22)/2:
    e^A − e^B = 2 e^{−b²m} sinh(b² k12), e^A + e^B = 2 e^{−b²m} cosh(b² k12), in float64."""
    g = torch.Generator().manual_seed(0)
    k11 = 10 ** (torch.rand(400, generator=g, dtype=torch.float64) * 12 - 13)
    k22 = k11 * 10 ** (torch.rand(400, generator=g, dtype=torch.float64) * 2 - 1)
    k12 = (2 * torch.rand(400, generator=g, dtype=torch.float64) - 1) * (k11 * k22).sqrt()
    a, b = 1.3, 0.7
    decay = torch.exp(-b**2 * (k11 + k22) / 2)
    odd, even = a**2 * decay * torch.sinh(b**2 * k12), a**2 * decay * torch.cosh(b**2 * k12)
    k11_, k12_, k22_ = (t.to(dtype) for t in (k11, k12, k22))
    for act, (t_ref, dot_ref) in ((ntkgp.Sin(a, b), (odd, b**2 * even)), (ntkgp.Cos(a, b), (even, b**2 * odd))):
        t, dot = act.pair_kernel(k11_, k12_, k22_, True)
        assert t.dtype == dot.dtype == dtype
        # relative to the value of the float-rounded arguments (the reference is exact for the float64 ones)
        torch.testing.assert_close(t.double(), t_ref, rtol=rtol, atol=0)
        torch.testing.assert_close(dot.double(), dot_ref, rtol=rtol, atol=0)
    sin_var = ntkgp.Sin(a, b).variance(k11_).double()
    torch.testing.assert_close(sin_var, a**2 * torch.exp(-b**2 * k11) * torch.sinh(b**2 * k11), rtol=rtol, atol=0)
    # a network on small inputs: a float32 kernel agrees with the float64 one to float32 precision
    # (of its largest entry: nearly orthogonal pairs lose digits in the input Gram itself)
    x = 1e-3 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(8, 1.0, None), ntkgp.Sin(), ntkgp.Dense(8, 1.5, None), ntkgp.Sin(),
                       ntkgp.Dense(1, 1.0, None))
    with torch.no_grad():
        low, high = net.kernel(x.to(dtype)), net.kernel(x)
    for name in ("nngp", "ntk"):
        expected = getattr(high, name)
        torch.testing.assert_close(getattr(low, name).double(), expected, rtol=0,
                                   atol=max(rtol, 1e-6) * float(expected.abs().max()))


def _scalar_reads(net, x) -> int:
    """How often ``net.kernel(x)`` reads a tensor value back to Python (``bool``/``float``/``item``:
    on a GPU each one waits for the device to finish all work queued before it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        net.kernel(x)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


@pytest.mark.parametrize("activation", [ntkgp.ReLU(), ntkgp.Erf()], ids=["relu", "erf"])
def test_activation_layers_read_at_most_one_scalar_per_block(activation):
    """The ReLU family read three scalars per layer and row block (the range of the variances, then
    ``(k11 == 0).any()`` and ``(k22 == 0).any()`` one by one), erf/GELU/Sin two (``float(k11.amax())``,
    ``float(k22.amax())``): on a GPU every one of them stalls the pipeline. Now the ReLU family
    gets both answers from one ``tolist`` and the others take one maximum."""
    x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def net(depth):
        return ntkgp.serial(*[m for _ in range(depth) for m in (ntkgp.Dense(8, 2.0, 0.1), activation)], ntkgp.Dense(1))

    per_layer = (_scalar_reads(net(3), x) - _scalar_reads(net(1), x)) / 2
    assert per_layer <= 1


@pytest.mark.parametrize("path", ["blocked", "whole graph", "checkpointed", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_callers_autocast_does_not_lower_the_kernels_precision(monkeypatch, path, dtype):
    # under torch.autocast("cpu", bfloat16) the recursion's products ran in bfloat16: float32 kernels
    # came back 1 % off, still labelled float32
    monkeypatch.setattr(base, "BLOCK_ENTRIES", 64)
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1 if path == "checkpointed" else 1 << 62)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 40)
    net = ntkgp.mlp(2, "erf", 2.25, 0.01).to(dtype)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(3)).to(dtype)

    def kernels():
        if path == "diag":
            return (net.kernel(x, diag=True).ntk,)
        if path == "blocked":
            return (net.kernel(x).ntk,)
        k = net.kernel(x).ntk
        return (k, *torch.autograd.grad(k.square().sum(), list(net.parameters())))

    expected = kernels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels()
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, rtol=1e-12, atol=0)   # the same float computation


def test_library_warnings_name_the_callers_line():
    """Warnings raised deep in a kernel recursion named a line of ntkgp with a fixed stacklevel
    (the quadrature's warning: wherever the Numerical layer sat in the network), which Python's
    default filters then show once per library line instead of once per caller's line."""
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for depth in (1, 3):
        net = ntkgp.serial(*[layer for _ in range(depth) for layer in
                             (ntkgp.Dense(8, 4.0, 0.1), ntkgp.Numerical(torch.tanh, rtol=1e-15, max_degree=24))],
                           ntkgp.Dense(1))
        with pytest.warns(RuntimeWarning, match="quadrature did not reach") as caught:
            net.kernel(x)
        assert {w.filename for w in caught} == {__file__}


def _clamp_of_torch_2_15(original):
    """torch 2.15's clamp: the same values, derivative 0 at the bounds (torch <= 2.14: 1 there)."""
    def clamp(x, min=None, max=None):
        value = original(x.detach(), min=min, max=max)
        inside = torch.ones_like(x, dtype=torch.bool)
        inside = inside if min is None else inside & (x > min)
        inside = inside if max is None else inside & (x < max)
        return torch.where(inside, x, value)
    return clamp


@pytest.mark.parametrize("clamp", ["torch's", "torch 2.15's"])
@pytest.mark.parametrize("activation", [ntkgp.Erf(), ntkgp.GELU(), ntkgp.Rbf(0.7), ntkgp.Sin(1.0, 1.3, 0.2)],
                         ids=["erf", "gelu", "rbf", "sin"])
def test_input_hessians_where_the_two_inputs_are_equal(activation, clamp, monkeypatch):
    # ∂²K(x1, x2)/∂x1∂x2 at x1 == x2 (the covariance of derivative observations, the Hessian of a
    # posterior mean at a training input): k11 k22 − k12² is 0 there, at its minimum, and its second
    # derivative is not; the exponents of Rbf and Sin are 0 there, at their maximum. Masking the
    # determinant's derivative where it is 0 (to remove the rounding that its first derivative carries)
    # made the erf entry 0.023 instead of 0.129, and so did torch 2.15's clamp, whose derivative at the
    # bound itself is 0 (1 before): the kernels' rounding guards no longer use it.
    if clamp != "torch's":
        strict = _clamp_of_torch_2_15(torch.clamp)
        for owner in (torch, torch.Tensor):
            monkeypatch.setattr(owner, "clamp", strict)
        monkeypatch.setattr(torch.Tensor, "clamp_min", lambda x, low: strict(x, min=low))
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.5), activation, ntkgp.Dense(1, 1.0, 0.1)).double()
    x0 = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def k(a, b):
        return net.kernel(a.reshape(1, 3), b.reshape(1, 3)).nngp[0, 0]

    def grad_in_x1(b):
        a = x0.clone().requires_grad_()
        return torch.autograd.grad(k(a, b), a)[0]

    step = 1e-5   # central differences of the exact first derivative: error ~step², ~1e-10
    reference = torch.stack([(grad_in_x1(x0 + step * e) - grad_in_x1(x0 - step * e)) / (2 * step)
                             for e in torch.eye(3, dtype=torch.float64)], 1)
    mixed = torch.func.jacrev(torch.func.jacrev(k, argnums=0), argnums=1)(x0, x0.clone())
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-8)
    same = torch.func.hessian(k, argnums=0)(x0, x0.clone())
    grad = torch.func.grad(k)
    reference = torch.stack([(grad(x0 + step * e, x0) - grad(x0 - step * e, x0)) / (2 * step)
                             for e in torch.eye(3, dtype=torch.float64)], 1)
    torch.testing.assert_close(same, reference, rtol=1e-6, atol=1e-8)


_CLAMP_EDGES = [float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-320, -1e-320, 1.0, -1.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bounds", [{"min": 0}, {"max": 0}, {"min": -0.0}, {"max": -0.0}, {"min": -1.0, "max": 1.0}])
@pytest.mark.parametrize("graph", [False, True])
def test_clamp_passing_has_clamps_values_bit_for_bit(dtype, bounds, graph):
    # NaN stays NaN, the sign of a zero is clamp's, ±inf are clamped; with and without a graph
    x = torch.tensor(_CLAMP_EDGES, dtype=dtype, requires_grad=graph)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    passed, clamped = numerics.clamp_passing(x, **bounds), x.detach().clamp(**bounds)
    assert passed.dtype == dtype
    assert torch.equal(passed.detach().view(bits), clamped.view(bits))


def test_clamp_passing_passes_derivatives_at_its_bounds_and_stops_them_beyond():
    # 1 inside and at the bounds themselves (torch 2.15's clamp: 0 at the bounds), 0 beyond them;
    # reverse and forward mode
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(numerics.clamp_passing(leaf, min=-1.0, max=1.0).sum(), leaf)
    assert torch.equal(grad, expected)
    _, tangent = torch.func.jvp(lambda v: numerics.clamp_passing(v, min=-1.0, max=1.0), (x,), (torch.ones_like(x),))
    assert torch.equal(tangent, expected)


def test_clamp_passing_is_one_clamp_where_no_derivative_is_taken():
    # the no-grad kernels (every prediction) clamp each pair's determinant and exponents: torch.where's
    # comparison and selection, two passes per bound, made a clamp of 4M float64 entries 3x slower
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    with Ops() as ops:
        numerics.clamp_passing(x, min=-1.0, max=1.0)
    assert ops.names == ["clamp"]
    with Ops() as ops:   # a graph: derivatives of 1 at the bounds need the torch.where form
        numerics.clamp_passing(x.clone().requires_grad_(), min=-1.0, max=1.0)
    assert "clamp" not in ops.names


def test_all_finite_answers_where_aminmax_has_no_kernel_and_passes_on_other_errors(monkeypatch):
    # torch 2.1 has no CPU aminmax for float16 ('"aminmax_cpu" not implemented for 'Half''): every
    # float16 input check raised; the fallback gives the same answer. Other errors are not hidden.
    # (aminmax reads tensors of more than _SMALL entries; smaller ones are read by isfinite whole)
    from ntkgp.layers import validation

    def no_kernel(x):
        raise RuntimeError("\"aminmax_cpu\" not implemented for 'Half'")

    def values(*entries: float, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(entries, dtype=dtype).repeat(validation._SMALL)

    monkeypatch.setattr(torch, "aminmax", no_kernel)
    for dtype in (torch.float16, torch.float32):
        for bad in (float("nan"), float("inf"), -float("inf")):
            assert not validation.all_finite(values(1.0, bad, 2.0, dtype=dtype))
        assert validation.all_finite(values(1.0, -65504.0, 2.0, dtype=dtype))

    def other(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "aminmax", other)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        validation.all_finite(values(1.0, 1.0))


def test_quadrature_pairs_a_tiny_variance_with_a_huge_one():
    """``Elementwise`` quadrature scaled every pair by one power of 4 sized by the largest variance
    (1e-148 beside a variance of 1e300), which underflowed a variance of 1e-300 to 0: its pairs with
    the huge input were ``0/0``, and ``Numerical(tanh)`` on inputs of norms 1e-150 and 1e150 together
    raised "the activation gave NaN or infinite values at the quadrature nodes". With a scale per pair
    (near ``1/sqrt(k11 k22)``) the rule is exact where it should be: for ``φ(u) = u`` and ``u³``,
    polynomials of degree 1 and 3, ``E[uv] = k12`` and ``E[u³v³] = 9 k11 k22 k12 + 6 k12³`` to
    rounding (1e-15 relative, measured 1e-16)."""
    k11 = torch.tensor([1e-300, 1e-300, 1e-200, 1e-30], dtype=torch.float64)
    k22 = torch.tensor([1e300, 1e-30, 1e100, 1e200], dtype=torch.float64)
    k12 = torch.tensor([0.3, -0.4, 0.9, 0.7], dtype=torch.float64) * (k11.sqrt() * k22.sqrt())
    identity = lambda u: u  # noqa: E731
    torch.testing.assert_close(ntkgp.layers.gauss_hermite_expectation(identity, identity, k11, k12, k22, 4), k12,
                               rtol=1e-15, atol=0)
    cube = lambda u: u**3  # noqa: E731
    a, c, b = k11[1:3], k12[1:3], k22[1:3]   # u³v³ of the others overflows; these keep it in range
    torch.testing.assert_close(ntkgp.layers.gauss_hermite_expectation(cube, cube, a, c, b, 4),
                               9 * a * b * c + 6 * c**3, rtol=1e-14, atol=0)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.cat([x[:1] * 1e-150, x[1:] * 1e150, torch.zeros(1, 3, dtype=torch.float64)])
    net = ntkgp.serial(ntkgp.Dense(4, 1.7, 0.0), ntkgp.Numerical(torch.tanh), ntkgp.Dense(1))
    with pytest.warns(RuntimeWarning, match="did not reach"):   # tanh is a step at the huge input's scale
        k = net.kernel(x)
    assert bool(torch.isfinite(k.nngp).all()) and bool(torch.isfinite(k.ntk).all())
    # tanh(u) ≈ u at the tiny input, sign(v) at the huge one: E[u sign(v)] = sqrt(2/π) k12 / sqrt(k22), which
    # Gauss-Hermite nodes reach to 1 % only (a step; measured 0.3 %)
    k12, k22 = 1.7 * float(x[0] @ x[1]) / 3, 1.7 * float(x[1] @ x[1]) / 3
    assert math.isclose(float(k.nngp.detach()[0, 1]), math.sqrt(2 / math.pi) * k12 / math.sqrt(k22), rel_tol=1e-2)


@pytest.mark.parametrize("layernorm", [True, False], ids=["layernorm", "dense"])
@pytest.mark.parametrize("degree", [None, 30], ids=["adaptive", "fixed"])
def test_numerical_after_an_overflowed_kernel_says_it_overflows(layernorm, degree):
    """A product of two kernels of inputs of norm 1e150 overflows (1e600), and a ``LayerNorm`` after
    it makes the ``inf`` NaN. The closed-form activations pass that on to the kernel's final check,
    ``NonFiniteKernelError``; ``Numerical`` looked the NaN variance up past the end of its degree
    table (``IndexError: index 6 is out of bounds``), or, with a fixed degree or an ``inf`` variance,
    said the activation gave NaN values ("a function undefined for some real inputs, such as log
    or sqrt?") of ``tanh``."""
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e150
    net = ntkgp.serial(ntkgp.Dense(4, 1.0, 0.1), ntkgp.parallel(ntkgp.Dense(4), ntkgp.Dense(4), join="prod"),
                       *([ntkgp.LayerNorm()] if layernorm else []), ntkgp.Dense(4),
                       ntkgp.Numerical(torch.tanh, degree=degree), ntkgp.Dense(1))
    with pytest.raises(base.NonFiniteKernelError, match=r"reaching Numerical\(tanh\) overflow torch.float64"):
        net.kernel(x)
    with pytest.raises(base.NonFiniteKernelError, match="overflow"):   # as with a closed-form activation there
        ntkgp.serial(*net[:-2], ntkgp.Erf(), ntkgp.Dense(1)).kernel(x)
