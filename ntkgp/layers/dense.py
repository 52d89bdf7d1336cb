"""Fully connected layer in NTK and standard parameterization."""

from __future__ import annotations

import math
from typing import cast

import torch
from gpytorch.priors import Prior
from torch import Tensor, nn

from ntkgp._checks import integer_at_least, neural_tangents_keywords
from ntkgp.layers.base import BuildContext, Layer, NonFiniteVarianceError
from ntkgp.layers.near import carries, first_layer_carry
from ntkgp.layers.numerics import expand_param
from ntkgp.layers.state import KernelState
from ntkgp.layers.validation import all_finite, refuse_non_float_inputs

PARAMETERIZATIONS = ("ntk", "standard")


def _autocasting(x: Tensor) -> bool:
    """Whether a caller's ``torch.autocast`` runs for ``x``'s device, casting the matmul's operands
    itself (a float32 network on bfloat16 inputs is then mixed-precision training, not an error)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:   # torch < 2.4: no device argument; the CPU's flag has a function of its own
        if x.device.type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return x.device.type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:   # "unknown device type for autocast" (meta): no autocast there
        return False


class Dense(Layer):
    r"""Fully connected layer of ``width`` output channels.

    Finite width, with input ``h`` of ``n`` channels and ``W, b ~ N(0, 1)``:

    * NTK parameterization (default; Jacot et al. 2018):
      ``z = sqrt(weight_var / n) · W h + sqrt(bias_var) · b``;
    * standard parameterization (Sohl-Dickstein et al. 2020): ``z = W̃ h + b̃`` with
      ``W̃ ~ N(0, weight_var / n)``, ``b̃ ~ N(0, bias_var)``, all trained with one learning rate.

    Infinite width (Lee et al. 2018; Jacot et al. 2018), with ``σ_w² = weight_var``,
    ``σ_b² = bias_var``::

        K ← σ_w² K + σ_b²
        Θ ← K_new + σ_w² Θ                         (NTK parameterization)
        Θ ← n · K_prev + σ_w² Θ + 1[bias]          (standard; n = finite incoming width)

    The input kernel is ``K⁰ = x·x' / d`` and ``Θ⁰ = 0``, as in neural-tangents.

    Args:
        width: number of output channels (the output dimension for a readout layer; in NTK
            parameterization the infinite-width kernels do not depend on hidden widths).
        weight_var: ``σ_w²`` (a learnable GPyTorch parameter, see :mod:`ntkgp.layers.variance`):
            the square of neural-tangents' ``W_std``, so ``stax.Dense(512, 1.5, 0.05)`` is
            ``Dense(512, 2.25, 0.0025)``. A tensor gives the initial value: the layer learns its own
            parameter, and gradients do not reach the tensor passed (as GPyTorch's ``initialize``).
        bias_var: ``σ_b²`` (``b_std²``); ``None`` means no bias at all (which changes the standard
            NTK), ``0.0`` a bias of zero variance.
        parameterization: ``"ntk"`` or ``"standard"``.
        ard_num_dims: on a first layer, one weight variance per input feature (automatic
            relevance determination): ``K¹ = Σ_j σ_w,j² x_j x'_j / d + σ_b²``; the finite twin
            scales input ``j``'s weights by ``σ_w,j``.
        weight_var_prior: optional GPyTorch prior on ``weight_var``.
        bias_var_prior: optional GPyTorch prior on ``bias_var`` (needs a bias).
    """

    preserves_gaussian = True

    mixes_features = True

    @neural_tangents_keywords(s="neural-tangents' width factors of the standard parameterization have no "
                                "counterpart (ntkgp's are s = (1, 1)).")
    def __init__(
        self,
        width: int,
        weight_var: float | Tensor = 1.0,
        bias_var: float | Tensor | None = None,
        parameterization: str = "ntk",
        ard_num_dims: int | None = None,
        weight_var_prior: Prior | None = None,
        bias_var_prior: Prior | None = None,
        **unknown: object,
    ) -> None:
        super().__init__()
        if unknown:
            # a port of stax.Dense(512, W_std=1.5) met Python's bare "unexpected keyword argument"
            stds = {"W_std": "weight_var", "b_std": "bias_var"}
            hints = [f"{stds[k]}={v!r}**2" for k, v in unknown.items() if k in stds]
            raise TypeError(f"Dense got unexpected keyword argument(s) {sorted(unknown)}"
                            + (f"; it takes variances, not neural-tangents' standard deviations: {', '.join(hints)}."
                               if hints else "."))
        width = integer_at_least(width, 1, "width")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}.")
        ard_num_dims = None if ard_num_dims is None else integer_at_least(ard_num_dims, 1, "ard_num_dims")
        self.width = width
        self.parameterization = parameterization
        self.ard_num_dims = ard_num_dims
        self.has_bias = bias_var is not None
        event = torch.Size([ard_num_dims]) if ard_num_dims is not None else torch.Size([])
        self.register_variance("weight_var", weight_var, event, weight_var_prior)
        if self.has_bias:
            assert bias_var is not None   # has_bias says so
            self.register_variance("bias_var", bias_var, torch.Size([]), bias_var_prior)
        elif bias_var_prior is not None:
            raise ValueError("bias_var_prior needs a bias: pass bias_var as a number.")

    # GPyTorch-style properties -------------------------------------------------------------
    @property
    def weight_var(self) -> Tensor:
        """``σ_w²`` (one per input feature with ARD), learnable through ``raw_weight_var``."""
        return self.get_variance("weight_var")

    @weight_var.setter
    def weight_var(self, value: float | Tensor) -> None:
        self.set_variance("weight_var", value)

    @property
    def bias_var(self) -> Tensor | None:
        """``σ_b²``, learnable through ``raw_bias_var``; ``None`` for a layer without bias."""
        return self.get_variance("bias_var") if self.has_bias else None

    @bias_var.setter
    def bias_var(self, value: float | Tensor) -> None:
        if not self.has_bias:
            raise ValueError("This Dense layer was built without a bias (bias_var=None).")
        self.set_variance("bias_var", value)

    def _variance_event_dims(self, name: str) -> int:
        return 1 if (name == "weight_var" and self.ard_num_dims is not None) else 0

    def check_input_dim(self, d: int) -> None:
        if self.ard_num_dims is not None and d != self.ard_num_dims:
            raise ValueError(f"Dense(ard_num_dims={self.ard_num_dims}) got inputs with {d} features.")

    # Infinite width ------------------------------------------------------------------------
    def kernel_map(self, state: KernelState) -> KernelState:
        if state.is_input:
            return self._input_map(state)
        if self.ard_num_dims is not None:
            raise ValueError("Dense(ard_num_dims=...) must be the first layer: per-feature weight "
                             "variances act on the raw input features.")
        weight_var = self.variance_as("weight_var", state.nngp)
        bias_var = self.variance_as("bias_var", state.nngp) if self.has_bias else None
        nngp, cov1, cov2 = _affine(state, state.nngp, state.cov1, state.cov2, weight_var, bias_var)
        ntk = None
        if state.ntk is not None:
            w = _expand(weight_var, state)
            if self.parameterization == "ntk":
                ntk = torch.addcmul(nngp, w, state.ntk)
            else:
                # a Python float: a width from 2**64 on was torch's "int too big to convert"
                base = float(state.width) * state.nngp + (1.0 if self.has_bias else 0.0)
                ntk = torch.addcmul(base, w, state.ntk)
        # the nearly (anti)parallel pairs' accurate values, through k' = w k + b (scalar variances alone)
        carry = state.carry
        if carry is not None:
            carry = None if weight_var.dim() or (bias_var is not None and bias_var.dim()) else carry.affine(
                weight_var, bias_var, cov1, cov2)
        return state.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, width=self.width, is_gaussian=True,
                             mean=None, centred=None, identical=True, carry=carry)

    def _input_map(self, state: KernelState) -> KernelState:
        """First layer: ``K¹ = (σ_w²/d) x·x' + σ_b²`` (per-feature ``σ²_{w,j}`` with ARD), ``Θ¹``
        from ``Θ⁰ = 0``. The ``1/d`` is folded into the weight variance, so the input Gram
        matrix is formed once and never rescaled on its own."""
        self.check_input_dim(state.width)   # also where pass-through layers come first
        assert state.x1 is not None   # called on the raw inputs alone (state.is_input)
        weight_var = self.variance_as("weight_var", state.x1)
        bias_var = self.variance_as("bias_var", state.x1) if self.has_bias else None
        d = state.width
        if self.ard_num_dims is not None:
            gram, g1, g2 = state.input_gram(feature_weights=weight_var)
            scale = weight_var.new_tensor(1.0 / d)
        else:
            gram, g1, g2 = state.input_gram()
            scale = weight_var / d
        nngp, cov1, cov2 = _affine(state, gram, g1, g2, scale, bias_var)
        ntk = None
        if state.ntk is not None:
            if self.parameterization == "ntk":
                ntk = nngp  # Θ¹ = K¹ + σ_w² Θ⁰ = K¹
            else:
                # n · K⁰ = d · G/d: the standard NTK sees the unweighted Gram matrix.
                plain = gram if self.ard_num_dims is None else state.input_gram()[0]
                ntk = plain + 1.0 if self.has_bias else plain
        carry = None
        if state.pair_carry and self.ard_num_dims is None and carries(nngp, state.diag, state.symmetric, scale,
                                                                      bias_var):
            # the nearly (anti)parallel pairs' det and g from the inputs themselves (ntkgp/layers/near.py)
            assert state.x2 is not None   # is_input: both kept
            carry = first_layer_carry(state.x1, state.x2, g1, g2, nngp, cov1, cov2, scale, bias_var, state.diag,
                                      gram, state.row_offset if state.symmetric and not state.diag else None)
        return KernelState(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, width=self.width, diag=state.diag,
                           symmetric=state.symmetric, is_gaussian=True, row_offset=state.row_offset,
                           duplicates=state.duplicates, fixed_inputs=state.fixed_inputs, carry=carry)

    # Finite width --------------------------------------------------------------------------
    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int]:
        if self.ard_num_dims is not None:
            if in_width is not None and in_width != self.ard_num_dims:
                raise ValueError(f"Dense(ard_num_dims={self.ard_num_dims}) cannot take {in_width} inputs.")
            in_width = self.ard_num_dims
        exact = torch.empty((), dtype=torch.float64, device="cpu")   # the stored anchors, not float32-rounded values
        weight_var = self.variance_as("weight_var", exact).detach()
        bias_var = self.variance_as("bias_var", exact).detach() if self.has_bias else None
        # a batched bias alone failed in float() with "only one element tensors can be converted"
        if weight_var.dim() > (1 if self.ard_num_dims is not None else 0) or (bias_var is not None
                                                                               and bias_var.dim() > 0):
            raise ValueError("Cannot build a finite network from batched hyperparameters.")
        # in the build's dtype, as kernel() checks them in the inputs': a NaN raw parameter built a network
        # of NaN outputs, and weight_var = 1e300 in float32 one whose weight scale sqrt(σ_w²/n) was inf
        dtype = ctx.dtype or torch.get_default_dtype()
        if not all(all_finite(v.to(dtype)) for v in (weight_var, bias_var) if v is not None):
            shown = ", ".join(f"{n} = {float(v.max()):.3g}" for n, v in (("weight_var", weight_var),
                                                                         ("bias_var", bias_var)) if v is not None)
            raise NonFiniteVarianceError(f"Cannot build a finite network in {dtype} from non-finite variances "
                                         f"({shown}): set a NaN one anew (e.g. layer.weight_var = 1.0); for one "
                                         f"beyond {dtype}'s range, build in torch.float64 (dtype=torch.float64) or "
                                         "use smaller variances.")
        module = DenseModule(
            in_width, self.width,
            weight_var=weight_var,
            bias_var=None if bias_var is None else float(bias_var),
            parameterization=self.parameterization,
            ctx=ctx,
        )
        return module, self.width

    def extra_repr(self) -> str:
        def shown(v: Tensor) -> str:   # one value, or per feature (ARD) / per batch: its shape
            if v.device.type == "meta":   # no value: print(layer.to("meta")) failed in float()
                return f"<meta, shape {tuple(v.shape)}>"
            return f"{float(v):g}" if v.numel() == 1 else f"<shape {tuple(v.shape)}>"

        bias = "None" if not self.has_bias else shown(cast(Tensor, self.bias_var).detach())
        weight = shown(self.weight_var.detach())
        return (f"width={self.width}, parameterization={self.parameterization!r}, weight_var={weight}, bias_var={bias}"
                + (f", ard_num_dims={self.ard_num_dims}" if self.ard_num_dims is not None else ""))


def _expand(value: Tensor, state: KernelState, vector: bool = False) -> Tensor:
    return expand_param(value, 1 if (vector or state.diag) else 2)


def _affine(state: KernelState, nngp: Tensor, cov1: Tensor, cov2: Tensor, scale: Tensor,
            shift: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``scale · K + shift`` for the kernel and both variance vectors, keeping tensor identities
    (``cov2 is cov1``, and in symmetric diagonal mode ``nngp is cov1``)."""

    def affine(t: Tensor, vector: bool) -> Tensor:
        s = _expand(scale, state, vector)
        return s * t if shift is None else torch.addcmul(_expand(shift, state, vector), s, t)

    new_cov1 = affine(cov1, True)
    new_cov2 = new_cov1 if cov2 is cov1 else affine(cov2, True)
    new_nngp = new_cov1 if nngp is cov1 else affine(nngp, False)
    return new_nngp, new_cov1, new_cov2


def _scaled(draw: Tensor, factor: Tensor | float) -> Tensor:
    """``draw · factor``, except for a shapes-only draw (the meta device), returned as it is: arithmetic
    there runs torch's Python reference implementations, which import ``torch._dynamo`` (1-2 s, once a
    process) and leave the module being built in reference cycles with their frames."""
    return draw if draw.device.type == "meta" else draw * factor


class DenseModule(nn.Module):
    """Finite twin of :class:`Dense`: ``(..., n, in) -> (..., n, out)``.

    With an ensemble the weights carry a leading dimension ``E`` and inputs ``(n, in)`` or
    ``(E, n, in)`` map to ``(E, n, out)``; ``torch.matmul`` broadcasting makes the same code
    serve single networks, stacked ensembles and ``torch.func.vmap`` over members. In NTK
    parameterization the parameters are the standard normal draws and the scales
    ``sqrt(σ_w²/n)`` (per input feature with ARD) and ``σ_b`` are buffers applied in ``forward``.
    """

    # buffers, which nn.Module's __getattr__ types as Tensor | Module
    bias_scale: Tensor
    input_scale: Tensor | None
    _lazy_like: Tensor | None

    def __init__(self, in_features: int | None, out_features: int, weight_var: Tensor,
                 bias_var: float | None, parameterization: str, ctx: BuildContext) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.parameterization = parameterization
        self.ensemble_size = ctx.ensemble_size
        self.weight_var = weight_var  # the hyperparameters it was drawn with (float64, CPU)
        self.bias_var = bias_var
        if bias_var is None:
            self.register_parameter("bias", None)
        else:
            draw = ctx.randn(1, out_features)
            draw = draw if ctx.ensemble_size is not None else draw.reshape(out_features)
            ntk = parameterization == "ntk"
            self.bias = nn.Parameter(draw if ntk else _scaled(draw, math.sqrt(bias_var)))
            # built in the draw's dtype: a float32 detour would round σ_b by ~1e-8
            self.register_buffer("bias_scale", torch.tensor(math.sqrt(bias_var) if ntk else 1.0, dtype=draw.dtype,
                                                            device=draw.device))
        self.register_parameter("weight", None)
        self.register_buffer("input_scale", None)
        if in_features is None:
            # drawn later in the dtype and on the device the module has by then: the build's, or
            # those of a later .to()/.double()/.cuda(), which move this (non-persistent) placeholder
            # along with every other buffer (a dtype and device fixed at build time left the
            # weight in float32 / on the CPU under a .double() / .cuda() model: a failed matmul)
            self._lazy_seed = ctx.child_seed()
            # on the CPU by default, as the other layers' weights (drawn there and not moved): on torch's
            # default device (CUDA, say) this layer alone drew its weights there and the first call failed
            self.register_buffer("_lazy_like", torch.empty(0, dtype=ctx.dtype or torch.get_default_dtype(),
                                                           device=ctx.device if ctx.device is not None else "cpu"),
                                 persistent=False)
        else:
            self._init_weight(ctx)

    def fan_in_variance(self, like: Tensor) -> Tensor:
        """``σ_w²/n``, the variance of a standard-parameterized weight (and the square of the NTK
        parameterization's input scale): a scalar, or one per input feature with ARD, in
        ``like``'s dtype and device."""
        # in like's dtype, on the variances' device, then moved: not on the meta device (see _scaled)
        scale = self.weight_var.to(dtype=like.dtype) / cast(int, self.in_features)   # None only before a deferred draw
        return scale.to(like.device)

    def _init_weight(self, ctx: BuildContext) -> None:
        assert self.in_features is not None   # given to the build, or set by _materialize first
        draw = ctx.randn(self.in_features, self.out_features)
        # the root on the variances' device, then moved (see fan_in_variance)
        std = self.fan_in_variance(self.weight_var.new_empty(0, dtype=draw.dtype)).sqrt().to(draw.device)
        if self.parameterization == "ntk":
            self.weight = nn.Parameter(draw)
            self.input_scale = std
        else:
            self.weight = nn.Parameter(_scaled(draw, std.unsqueeze(-1) if std.dim() else std))

    def _materialize(self, in_features: int) -> None:
        """Draw a deferred first layer's weights for ``in_features`` inputs, from a stream of its own."""
        like = self._lazy_like
        assert like is not None   # registered for a deferred layer, dropped once it has drawn
        # 0 features drew a (0, n) weight of fan-in variance σ²/0 = inf and kept that width for good
        self.in_features = integer_at_least(in_features, 1, "the number of input features")
        with torch.inference_mode(False):   # parameters, as at build time: not inference tensors
            self._init_weight(BuildContext(torch.Generator().manual_seed(self._lazy_seed), self.ensemble_size,
                                           like.dtype, like.device))
        self._lazy_like = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a deferred layer loading a saved one takes its width from the saved weight, as torch's lazy
        # modules do ("Unexpected key(s) '0.weight', '0.input_scale'" before its first call otherwise);
        # like theirs, it stays drawn at that width if the load then fails on another shape
        weight = state_dict.get(prefix + "weight")
        if self.weight is None and isinstance(weight, Tensor) and weight.dim() >= 2:
            self._materialize(weight.shape[-2])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):   # "'list' object has no attribute 'shape'" otherwise
            raise ValueError(f"This layer takes a torch.Tensor of inputs (..., n, d), got {type(x).__name__}.")
        dtype = (self.weight if self.weight is not None else cast(Tensor, self._lazy_like)).dtype
        refuse_non_float_inputs(x, dtype)
        # autocast casts float32, float16 and bfloat16 operands, never float64 ones: a float64 network's
        # float32 inputs (or a float32 one's float64 inputs) under autocast met torch's "expected m1 and
        # m2 to have the same dtype, but got: c10::BFloat16 != double" still
        if x.dtype != dtype:
            autocasting = _autocasting(x)
            if torch.float64 in (x.dtype, dtype) or not autocasting:
                # torch's "expected m1 and m2 to have the same dtype, but got: float != double" otherwise
                raise ValueError(f"This layer's parameters are {dtype} but its inputs are {x.dtype}: convert the "
                                 f"inputs with x.to({dtype}), or build the network with dtype={x.dtype}"
                                 + (" (autocast does not cast float64)." if autocasting else "."))
        if self.weight is None:  # deferred first layer: draw now
            self._materialize(x.shape[-1])
        elif x.shape[-1] != self.in_features:   # torch's "mat1 and mat2 shapes cannot be multiplied" otherwise
            raise ValueError(f"This layer takes inputs of {self.in_features} feature(s), got shape {tuple(x.shape)}.")
        if self.ensemble_size is not None and x.dim() >= 3 and x.shape[-3] not in (1, self.ensemble_size):
            # torch's "The size of tensor a (3) must match the size of tensor b (4)" otherwise
            raise ValueError(f"This ensemble of {self.ensemble_size} members takes inputs (n, d), shared by the "
                             f"members, or (E, n, d), one set per member, with E = {self.ensemble_size}; got shape "
                             f"{tuple(x.shape)}.")
        if self.input_scale is not None:
            x = x * self.input_scale
        out = torch.matmul(x, self.weight)
        if self.bias is not None:
            out = out + self.bias_scale * self.bias
        return out

    def extra_repr(self) -> str:
        ens = f", ensemble_size={self.ensemble_size}" if self.ensemble_size is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"parameterization={self.parameterization!r}{ens}")
