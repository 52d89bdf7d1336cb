"""Monte-Carlo estimates of NNGP and NTK kernels from many random finite networks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Literal, overload

import torch
from torch import Tensor

from ntkgp._checks import NT_GET_HINT, check_flag, integer_at_least, seed_value
from ntkgp.finite.empirical import empirical_nngp, empirical_ntk, kernel_row_blocks
from ntkgp.layers.base import Layer
from ntkgp.layers.state import _NTK
from ntkgp.layers.validation import check_inputs
from ntkgp.predict.gaussian import refuse_beyond_memory

#: Bytes of members' Jacobians held at once when estimating NTKs on the Jacobian route (the members that
#: ``empirical_ntk``'s ``chunk_size`` maps together; not ``ntkgp.finite.empirical.JACOBIAN_BYTES``, the chunk of
#: cotangents within each).
MEMBER_JACOBIAN_BYTES = 1 << 29
#: Bytes of one batch's samples of a kernel held at once (a block of rows of every member's kernel). Its
#: temporaries on the NTK's layer-by-layer route are a few times this: 16 MiB blocks were faster and smaller
#: than 64 MiB ones (3000 points, 16 members, width 64, one thread: 4.6 s / 1.0-1.2 GiB against 7-11 s / 1.4 GiB).
KERNEL_BYTES = 1 << 24


@dataclass(frozen=True)
class KernelEstimate(Generic[_NTK]):
    """Monte-Carlo kernel averages with the standard errors of the means (per entry), as
    neural-tangents' ``monte_carlo_kernel_fn`` (Novak et al. 2020) estimates the NNGP and NTK.

    Attributes:
        nngp: mean over the samples of ``(1/k) f(x)·f(x')`` (per output unit, ``k`` outputs), ``(n1, n2)``
            (``(n,)``, the pairs ``(x1_i, x2_i)``, from ``monte_carlo_kernel(..., diag=True)``).
        ntk: mean empirical NTK per output unit, ``None`` when not requested (``KernelEstimate[Tensor]`` to type
            checkers, ``KernelEstimate[None]`` from ``monte_carlo_kernel(..., ntk=False)``).
        nngp_sem, ntk_sem: their standard errors ``std / sqrt(n_samples)`` (NaN for one sample).
        n_samples: number of networks averaged.
    """

    nngp: Tensor
    ntk: _NTK
    nngp_sem: Tensor
    ntk_sem: _NTK
    n_samples: int


# the overloads tell type checkers that ntk and ntk_sem are tensors unless ntk=False was passed
@overload
def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128, seed: int = 0,
                       ntk: Literal[True] = True, ensemble_batch: int = 64,
                       diag: bool = False) -> KernelEstimate[Tensor]: ...


@overload
def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128,
                       seed: int = 0, ntk: Literal[False], ensemble_batch: int = 64,
                       diag: bool = False) -> KernelEstimate[None]: ...


@overload
def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128, seed: int = 0,
                       ntk: bool = True, ensemble_batch: int = 64,
                       diag: bool = False) -> KernelEstimate: ...


def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128,
                       seed: int = 0, ntk: bool = True, ensemble_batch: int = 64, diag: bool = False
                       ) -> KernelEstimate:
    """Average empirical kernels over ``n_samples`` random initializations of ``net.build``::

        K̄ = (1/S) Σ_s (1/k) f_s(x)·f_s(x'),   Θ̄ = (1/S) Σ_s (1/k) Σ_i ∇_θ f_s,i(x)·∇_θ f_s,i(x'),
        SEM = std_s / sqrt(S)

    per output unit (averaged over the ``k`` outputs, as :func:`empirical_nngp` and
    :func:`empirical_ntk` are): the Monte-Carlo check of the analytic kernels (as neural-tangents'
    ``monte_carlo_kernel_fn``, Novak et al. 2020).

    Members are built as stacked ensembles of up to ``ensemble_batch`` networks (vectorized,
    ``torch.func.vmap`` over members for the NTK), in the dtype and on the device of ``x1``;
    batch ``b`` is seeded ``seed + 1_000_003 b``, so nearby seeds give independent estimates. A
    batch's members are drawn together (:meth:`ntkgp.layers.Layer.build`): another ``n_samples`` or
    ``ensemble_batch`` averages other networks, except for the full batches they share.
    A batch's kernels are formed a block of rows of ``x1`` at a time (``KERNEL_BYTES`` of samples,
    16 MiB) and merged into running moments, so memory is the estimates (a mean and a sum of squares
    per kernel, refused up front where they exceed the device's memory), the batch's outputs and
    layer signals (``ensemble_batch × n × width`` values per layer, with their autograd graph while they
    are formed) and a few blocks' temporaries, not ``ensemble_batch`` whole
    kernels per estimate: 2000 points in float64 at width 256 peaked at 7.1 GiB, 2.6 GiB now.
    The averages converge to the analytic kernels: one wide network's empirical NTK is already
    close to ``Θ`` (``O(1/sqrt(width))`` fluctuations), while its ``f(x) f(x')`` is a single draw
    of the Gaussian process, ``O(1)`` off at any width, so the NNGP average needs many samples;
    the bias of both means is ``O(1/width)``. Inputs are ``(n, d)``: a leading
    axis would be read as the ensemble axis. With one sample the standard errors are NaN.
    Networks whose kernels overflow the dtype raise
    :class:`~ntkgp.layers.base.NonFiniteKernelError`, as ``net.kernel`` does.

    With ``diag=True`` only the pairs ``(x1_i, x2_i)`` are estimated (``x2`` of ``x1``'s shape, or
    ``None`` for ``K̄(x_i, x_i)`` and ``Θ̄(x_i, x_i)``), estimates and standard errors ``(n,)``, as
    ``net.kernel(x1, x2, diag=True)`` and neural-tangents' ``diagonal_axes=(0,)``: the same networks
    (same seeding), each member's :func:`empirical_nngp` and :func:`empirical_ntk` with ``diag=True``,
    so the results are the diagonals of the full estimates, in ``O(n)`` memory besides the layer signals.
    """
    if not isinstance(net, Layer):   # a torch module has no build() to draw fresh networks from
        raise ValueError(f"net must be an ntkgp network spec (a Layer), got {type(net).__name__}; for a torch module, "
                         "average ntkgp.finite.empirical_ntk over initializations of your own.")
    check_flag(ntk, "ntk", NT_GET_HINT)   # ntk="nngp" (neural-tangents' get) ran the whole NTK estimate
    check_flag(diag, "diag")
    x1, x2 = check_inputs(x1, x2, diag)
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.dim() != 2:
            raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}.")
    n_samples = integer_at_least(n_samples, 1, "n_samples")
    ensemble_batch = integer_at_least(ensemble_batch, 1, "ensemble_batch")
    seed = seed_value(seed)   # True + 1_000_003 b made a seed of a boolean
    last = (n_samples - 1) // ensemble_batch
    seed_value(seed + 1_000_003 * last, name=f"seed + 1_000_003 * {last} (the seed of the last batch)")
    d = x1.shape[-1]
    n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
    shape = (n1,) if diag else (n1, n2)
    _check_estimates_fit(shape, 2 if ntk else 1, x1)
    nngps, ntks = _Moments(shape, x1), _Moments(shape, x1) if ntk else None
    done, batch_index = 0, 0
    while done < n_samples:
        size = min(ensemble_batch, n_samples - done)
        model = net.build(in_features=d, seed=seed + 1_000_003 * batch_index, ensemble_size=size,
                          dtype=x1.dtype, device=x1.device)
        n_params = sum(p.numel() for p in model.parameters()) // size
        chunk_size = max(1, MEMBER_JACOBIAN_BYTES // max(1, (n1 + n2) * n_params * x1.element_size() * 4))
        if diag:   # the batch's (size, n) diagonals are small: formed whole
            nngps.add(empirical_nngp(model, x1, x2, diag=True), slice(None))
            if ntks is not None:
                ntks.add(empirical_ntk(model, x1, x2, diag=True, chunk_size=chunk_size), slice(None))
        else:
            # a block of rows of the batch's kernels at a time, merged (and freed) before the next is formed
            rows = max(1, KERNEL_BYTES // max(1, size * n2 * x1.element_size()))
            for block, nngp, tangent in kernel_row_blocks(model, x1, x2, rows, ntk, chunk_size=chunk_size):
                nngps.add(nngp, block)
                if ntks is not None and tangent is not None:
                    ntks.add(tangent, block)
        for moments in (nngps, ntks):
            if moments is not None:
                moments.count += size
        done += size
        batch_index += 1

    nngp, nngp_sem = nngps.mean_and_sem()
    ntk_mean, ntk_sem = ntks.mean_and_sem() if ntks is not None else (None, None)
    return KernelEstimate(nngp, ntk_mean, nngp_sem, ntk_sem, n_samples)


def _check_estimates_fit(shape: tuple[int, ...], kernels: int, like: Tensor) -> None:
    """``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``, as torch's allocators raise) before any network is
    drawn when the estimates alone, a mean and a sum of squares per kernel (in float32 at least), exceed
    the memory of ``like``'s device (``shape``: ``(n1, n2)``, or ``(n,)`` for diagonals)."""
    need = 2 * kernels * math.prod(shape) * max(like.element_size(), 4)
    what = (f"Estimating {kernels} kernel(s) of {' x '.join(map(str, shape))} points"
            f"{' (diagonals)' if len(shape) == 1 else ''} (a mean and a sum of squares each)")
    refuse_beyond_memory(need, like.device, what, "estimate blocks of the points (x1 in slices, against x2)")


class _Moments:
    """Running mean and sum of squared deviations ``M₂`` of kernel samples, merged one ensemble
    batch at a time (Chan et al.'s pairwise update): with ``n_a`` samples so far and a batch of
    ``n_b`` with mean ``m_b`` and ``M₂_b``, ``δ = m_b − m``, ``m += δ n_b/n``,
    ``M₂ += M₂_b + δ² n_a n_b / n``. A batch comes in blocks of rows (:meth:`add`, each row once per
    batch), and ``count`` grows by ``n_b`` once all its rows are in.

    Stacking every sample instead held ``n_samples`` kernels, twice (the list and its
    concatenation): 8.8 GB per kernel for 128 samples of 3000 points in float64, where the
    estimate is two matrices.

    Half-precision samples are accumulated in float32 and the results given back in their dtype:
    ``M₂`` sums squares over the samples, and in float16 (largest value 65504) it overflowed for
    kernels of a few tens, so the standard errors of finite estimates came back inf.
    """

    def __init__(self, shape: tuple[int, ...], like: Tensor) -> None:
        self.count = 0
        self.dtype = like.dtype   # the samples' (the moments are in float32 at least)
        wide = torch.promote_types(like.dtype, torch.float32)
        self.mean = torch.zeros(shape, dtype=wide, device=like.device)
        self.m2 = torch.zeros(shape, dtype=wide, device=like.device)

    def add(self, samples: Tensor, rows: slice) -> None:
        """Merge a batch's samples ``(n_b, rows, n2)`` (``(n_b, rows)`` of diagonals) of the rows ``rows``
        into the moments."""
        samples = samples.to(self.mean.dtype)
        n_b = samples.shape[0]
        mean_b = samples.mean(0)
        m2_b = samples.sub_(mean_b).square_().sum(0)     # the samples are this call's own: in place
        mean, m2 = self.mean[rows], self.m2[rows]
        if self.count == 0:
            mean.copy_(mean_b)
            m2.copy_(m2_b)
            return
        n = self.count + n_b
        delta = mean_b.sub_(mean)
        mean.add_(delta, alpha=n_b / n)
        m2.add_(m2_b).addcmul_(delta, delta, value=self.count * n_b / n)

    def mean_and_sem(self) -> tuple[Tensor, Tensor]:
        """The mean and its standard error ``sqrt(M₂ / (n − 1)) / sqrt(n)`` (NaN for one sample:
        no spread to measure)."""
        if self.count < 2:
            return self.mean.to(self.dtype), torch.full_like(self.mean, float("nan"), dtype=self.dtype)
        return self.mean.to(self.dtype), ((self.m2 / (self.count - 1)).sqrt_() / self.count ** 0.5).to(self.dtype)
