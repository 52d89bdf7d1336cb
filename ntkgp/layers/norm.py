"""Layer normalization over features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ntkgp.layers.base import BuildContext, Layer
from ntkgp.layers.numerics import clamp_passing
from ntkgp.layers.state import KernelState
from ntkgp.layers.validation import positive_number, refuse_non_float_inputs


class LayerNorm(Layer):
    r"""``(z − mean(z)) / sqrt(var(z) + eps)`` over the features of each input.

    For infinitely many i.i.d. features the mean and the variance over the features are their
    expectations (law of large numbers; Yang 2019, "Tensor programs I"). After a ``Dense`` layer
    the features are centred Gaussians of variance ``K(x, x)``, and (as neural-tangents'
    ``stax.LayerNorm``, Novak et al. 2020)::

        K ← K / sqrt((eps + k11)(eps + k22)),   Θ ← Θ / sqrt((eps + k11)(eps + k22))

    After an activation ``φ`` the features ``φ(u)`` have mean ``μ = E[φ(u)]`` (``sqrt(k/2π)``
    for ReLU), which the layer subtracts, and variance ``T(k, k, k) − μ²``::

        K ← (T − μ1 μ2) / sqrt((eps + T11 − μ1²)(eps + T22 − μ2²)),   Θ ← Θ / sqrt(…)

    The NTK has no term from the mean and variance themselves: their gradients are averages
    over the features, whose contraction with the next layer's weights vanishes as ``1/n``.
    ``T − μ1μ2`` comes from the activation (:meth:`~ntkgp.layers.Activation.centred_pair_kernel`),
    without the cancellation a plain difference has at small variances, which the division by up
    to ``1/eps`` would magnify. (The first form after an activation, which neural-tangents 0.6.5
    refuses, would give ReLU features of two orthogonal inputs of equal norm the correlation
    ``1/π``, where wide networks give 0.) After a sum of independent branches the centred kernels add;
    after a concatenation the mean is the branches' means weighted by their widths, and the
    spread of those means adds to the centred kernel; after a product it is accumulated factor by
    factor (:class:`~ntkgp.layers.Parallel`).
    Activations without a known mean (``Elementwise`` without ``mean_fn``) and the raw inputs are
    refused. After the readout it normalizes over the network's ``k`` outputs, a finite number:
    the kernel is then the ``k → ∞`` limit. A finite twin normalizing a single feature (after
    ``Dense(1)``), which it would map to 0 for every input, is refused by ``build``.
    """

    preserves_gaussian = True

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        # eps = 0 would make a zero-variance input (a zero vector without bias) 0/0
        self.eps = positive_number(eps, "eps")

    def kernel_map(self, state: KernelState) -> KernelState:
        has_mean = state.mean is not None   # the features are not centred already
        centred = state.centred() if has_mean and state.centred is not None else None
        if state.is_input or (has_mean and centred is None):
            raise ValueError("LayerNorm needs features of known mean: put it after a Dense layer, an "
                             "activation (Elementwise needs mean_fn) or sums, concatenations and products of "
                             "such branches; raw inputs, alone or in a concatenation, have none (put a Dense "
                             "layer before the LayerNorm).")
        nngp, cov1, cov2 = (state.nngp, state.cov1, state.cov2) if centred is None else centred
        if centred is not None:
            # T − μ² ≥ 0 (Jensen); rounding below 0 would be a NaN square root after eps
            cov1 = clamp_passing(cov1, min=0)
            cov2 = cov1 if state.cov2 is state.cov1 else clamp_passing(cov2, min=0)
        if state.diag and state.symmetric:
            norm = self._self_scale(cov1)
            cov = cov1 * norm
            ntk = None if state.ntk is None else state.ntk * norm
            out = state.replace(nngp=cov, ntk=ntk, cov1=cov, cov2=cov)
        else:
            k11, k22 = (cov1, cov2) if state.diag else (cov1.unsqueeze(-1), cov2.unsqueeze(-2))
            # two square roots, not one of the product: (eps + k11)(eps + k22) overflows for variances
            # near sqrt(max) (float32 inputs ~1e10), and rsqrt(inf) = 0 erased the kernel
            scale = torch.rsqrt(self.eps + k11) * torch.rsqrt(self.eps + k22)
            out1 = cov1 * self._self_scale(cov1)
            out2 = out1 if cov2 is cov1 else cov2 * self._self_scale(cov2)
            ntk = None if state.ntk is None else state.ntk * scale
            out = state.replace(nngp=nngp * scale, ntk=ntk, cov1=out1, cov2=out2)
        if centred is None:
            return out

        def mean() -> tuple[Tensor, Tensor, bool] | None:
            # zero averaged over the features; after a concatenation each branch's features keep
            # their own mean (what a sum with another branch of non-zero mean needs to know)
            assert state.mean is not None   # centred was computed, from a known mean
            features = state.mean()
            return None if features is None else (torch.zeros_like(out.cov1), torch.zeros_like(out.cov2),
                                                  features[2])

        # the output is centred exactly (a second LayerNorm normalizes it as it is)
        return out.replace(mean=mean, centred=lambda: (out.nngp, out.cov1, out.cov2))

    def _self_scale(self, c: Tensor) -> Tensor:
        """``1/(eps + c)`` as the pairs' ``rsqrt(eps + k11) · rsqrt(eps + k22)`` at ``k11 = k22 = c``, bit for
        bit: a pair of exactly parallel or opposite inputs (``x2 = −x1``) then keeps ``|K12| = K11``
        exactly. As ``c/(eps + c)`` the variance was rounded otherwise than the pair, and where the
        layers after expand correlations near ``ρ = ±1`` (a deep stack with ``LayerNorm`` in the chaotic
        phase) that ulp grew each layer: Gabor at depth 30 gave ``K12 = −0.08 K11`` for ``−K11``, an
        indefinite kernel."""
        root = torch.rsqrt(self.eps + c)
        return root * root

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        # one feature minus its own mean is 0 for every input: a constant network (the kernel, a limit
        # of many features as for every hidden width, is not its kernel)
        if in_width == 1:
            raise ValueError("LayerNorm over a single feature (after Dense(1)) outputs 0 for every input: build "
                             "the layer before it wider, or drop the LayerNorm.")
        return LayerNormModule(self.eps), in_width

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class LayerNormModule(nn.Module):
    """Finite twin of :class:`LayerNorm` (no affine parameters)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        refuse_non_float_inputs(x)   # torch's "var_mean only support floating point and complex dtypes" otherwise
        if x.numel() == 0:   # no points: var_mean warns of zero degrees of freedom
            return x.clone()
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) / torch.sqrt(var + self.eps)
