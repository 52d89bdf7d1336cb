"""Layer normalization over features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ntkgp.layers.base import BuildContext, Layer
from ntkgp.layers.state import KernelState
from ntkgp.layers.validation import positive_number


class LayerNorm(Layer):
    r"""``(z − mean(z)) / sqrt(var(z) + eps)`` over the features of each input.

    For infinitely many i.i.d. centred Gaussian features the mean vanishes and the variance is
    ``K(x, x)`` (law of large numbers over the features; Yang 2019, "Tensor programs I"), so (as
    neural-tangents' ``stax.LayerNorm``, Novak et al. 2020)::

        K ← K / sqrt((eps + k11)(eps + k22)),   Θ ← Θ / sqrt((eps + k11)(eps + k22))

    The input must be Gaussian (follow a ``Dense`` layer). After the readout it normalizes over
    the network's ``k`` outputs, a finite number: the kernel is then the ``k → ∞`` limit.
    """

    preserves_gaussian = True

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        # eps = 0 would make a zero-variance input (a zero vector without bias) 0/0
        self.eps = positive_number(eps, "eps")

    def kernel_map(self, state: KernelState) -> KernelState:
        if not state.is_gaussian:
            raise ValueError("LayerNorm needs Gaussian inputs: put a Dense layer before it.")
        if state.diag and state.symmetric:
            norm = self.eps + state.cov1
            cov = state.cov1 / norm
            ntk = None if state.ntk is None else state.ntk / norm
            return state.replace(nngp=cov, ntk=ntk, cov1=cov, cov2=cov)
        # two square roots, not one of the product: (eps + k11)(eps + k22) overflows for variances
        # near sqrt(max) (float32 inputs ~1e10), and rsqrt(inf) = 0 erased the kernel
        scale = torch.rsqrt(self.eps + state.k11) * torch.rsqrt(self.eps + state.k22)
        cov1, cov2 = state.map_covs(lambda c: c / (self.eps + c))
        ntk = None if state.ntk is None else state.ntk * scale
        return state.replace(nngp=state.nngp * scale, ntk=ntk, cov1=cov1, cov2=cov2)

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        return LayerNormModule(self.eps), in_width

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class LayerNormModule(nn.Module):
    """Finite twin of :class:`LayerNorm` (no affine parameters)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:   # no points: var_mean warns of zero degrees of freedom
            return x.clone()
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) / torch.sqrt(var + self.eps)
