"""Monte-Carlo estimates of NNGP and NTK kernels from many random finite networks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, overload

import torch
from torch import Tensor

from ntkgp._checks import NT_GET_HINT, check_flag, integer_at_least, seed_value
from ntkgp.finite.empirical import empirical_nngp, empirical_ntk
from ntkgp.layers.base import Layer
from ntkgp.layers.state import _NTK
from ntkgp.layers.validation import check_inputs

#: Bytes of Jacobian held at once when estimating NTKs.
JACOBIAN_BYTES = 1 << 29


@dataclass(frozen=True)
class KernelEstimate(Generic[_NTK]):
    """Monte-Carlo kernel averages with the standard errors of the means (per entry), as
    neural-tangents' ``monte_carlo_kernel_fn`` (Novak et al. 2020) estimates the NNGP and NTK.

    Attributes:
        nngp: mean over the samples of ``(1/k) f(x)·f(x')`` (per output unit, ``k`` outputs).
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
                       ntk: Literal[True] = True, ensemble_batch: int = 64) -> KernelEstimate[Tensor]: ...


@overload
def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128,
                       seed: int = 0, ntk: Literal[False], ensemble_batch: int = 64) -> KernelEstimate[None]: ...


@overload
def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128, seed: int = 0,
                       ntk: bool = True, ensemble_batch: int = 64) -> KernelEstimate: ...


def monte_carlo_kernel(net: Layer, x1: Tensor, x2: Tensor | None = None, *, n_samples: int = 128,
                       seed: int = 0, ntk: bool = True, ensemble_batch: int = 64) -> KernelEstimate:
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
    The averages converge to the analytic kernels: one wide network's empirical NTK is already
    close to ``Θ`` (``O(1/sqrt(width))`` fluctuations), while its ``f(x) f(x')`` is a single draw
    of the Gaussian process, ``O(1)`` off at any width, so the NNGP average needs many samples;
    the bias of both means is ``O(1/width)``. Inputs are ``(n, d)``: a leading
    axis would be read as the ensemble axis. With one sample the standard errors are NaN.
    Networks whose kernels overflow the dtype raise
    :class:`~ntkgp.layers.base.NonFiniteKernelError`, as ``net.kernel`` does.
    """
    if not isinstance(net, Layer):   # a torch module has no build() to draw fresh networks from
        raise ValueError(f"net must be an ntkgp network spec (a Layer), got {type(net).__name__}; for a torch module, "
                         "average ntkgp.finite.empirical_ntk over initializations of your own.")
    check_flag(ntk, "ntk", NT_GET_HINT)   # ntk="nngp" (neural-tangents' get) ran the whole NTK estimate
    x1, x2 = check_inputs(x1, x2)
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.dim() != 2:
            raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}.")
    n_samples = integer_at_least(n_samples, 1, "n_samples")
    ensemble_batch = integer_at_least(ensemble_batch, 1, "ensemble_batch")
    seed = seed_value(seed)   # True + 1_000_003 b made a seed of a boolean
    last = (n_samples - 1) // ensemble_batch
    seed_value(seed + 1_000_003 * last, name=f"seed + 1_000_003 * {last} (the seed of the last batch)")
    d = x1.shape[-1]
    nngps, ntks = _Moments(), _Moments()
    done, batch_index = 0, 0
    while done < n_samples:
        size = min(ensemble_batch, n_samples - done)
        model = net.build(in_features=d, seed=seed + 1_000_003 * batch_index, ensemble_size=size,
                          dtype=x1.dtype, device=x1.device)
        # each batch added (and freed) before the next kernel is formed: one batch of samples at a time
        nngps.add(empirical_nngp(model, x1, x2))
        if ntk:
            n_params = sum(p.numel() for p in model.parameters()) // size
            n_out = x1.shape[-2] + (0 if x2 is None else x2.shape[-2])
            per_member = max(1, n_out * n_params * x1.element_size() * 4)
            ntks.add(empirical_ntk(model, x1, x2, chunk_size=max(1, JACOBIAN_BYTES // per_member)))
        done += size
        batch_index += 1

    nngp, nngp_sem = nngps.mean_and_sem()
    ntk_mean, ntk_sem = ntks.mean_and_sem() if ntk else (None, None)
    return KernelEstimate(nngp, ntk_mean, nngp_sem, ntk_sem, n_samples)


class _Moments:
    """Running mean and sum of squared deviations ``M₂`` of kernel samples, merged one ensemble
    batch at a time (Chan et al.'s pairwise update): with ``n_a`` samples so far and a batch of
    ``n_b`` with mean ``m_b`` and ``M₂_b``, ``δ = m_b − m``, ``m += δ n_b/n``,
    ``M₂ += M₂_b + δ² n_a n_b / n``.

    Stacking every sample instead held ``n_samples`` kernels, twice (the list and its
    concatenation): 8.8 GB per kernel for 128 samples of 3000 points in float64, where the
    estimate is two matrices.

    Half-precision samples are accumulated in float32 and the results given back in their dtype:
    ``M₂`` sums squares over the samples, and in float16 (largest value 65504) it overflowed for
    kernels of a few tens, so the standard errors of finite estimates came back inf.
    """

    mean: Tensor | None
    m2: Tensor | None

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None
        self.dtype: torch.dtype | None = None   # the samples' (the moments are in float32 at least)

    def add(self, samples: Tensor) -> None:
        self.dtype = samples.dtype
        samples = samples.to(torch.promote_types(samples.dtype, torch.float32))
        n_b = samples.shape[0]
        mean_b = samples.mean(0)
        m2_b = samples.sub_(mean_b).square_().sum(0)     # the samples are this call's own: in place
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        assert self.m2 is not None   # set with the mean
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean.add_(delta, alpha=n_b / n)
        self.m2.add_(m2_b).addcmul_(delta, delta, value=self.count * n_b / n)
        self.count = n

    def mean_and_sem(self) -> tuple[Tensor, Tensor]:
        """The mean and its standard error ``sqrt(M₂ / (n − 1)) / sqrt(n)`` (NaN for one sample:
        no spread to measure)."""
        assert self.mean is not None and self.m2 is not None   # monte_carlo_kernel adds n_samples >= 1 first
        if self.count < 2:
            return self.mean.to(self.dtype), torch.full_like(self.mean, float("nan"), dtype=self.dtype)
        return self.mean.to(self.dtype), ((self.m2 / (self.count - 1)).sqrt_() / self.count ** 0.5).to(self.dtype)
