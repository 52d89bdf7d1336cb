"""Learning rates that make the standard parameterization train like the NTK parameterization."""

from __future__ import annotations

import copy
from typing import cast

from torch import Tensor, nn

from ntkgp.finite.empirical import refuse_spec
from ntkgp.layers.base import Layer
from ntkgp.layers.dense import Dense, DenseModule
from ntkgp.layers.validation import positive_number


def equivalent_learning_rates(model: nn.Module, learning_rate: float) -> dict[str, float | Tensor]:
    r"""Per-parameter learning rates for gradient descent on ``model``.

    A standard-parameterized weight ``W̃ = sqrt(σ_w²/n) W`` trained with rate
    ``η σ_w²/n`` (per input feature with ARD) moves exactly as the NTK-parameterized ``W``
    trained with rate ``η``, and a standard bias ``b̃ = σ_b b`` with rate ``η σ_b²``
    (M. Velikanov's lecture notes *Infinitely wide networks. Neural Tangent Kernel*, "NTK vs
    standard parameterization"; Sohl-Dickstein et al. 2020, *On the infinite width limit of neural
    networks with a standard parameterization*, arXiv:2001.07301). So with
    these rates both parameterizations follow the same trajectory and the same NTK. Parameters
    of NTK-parameterized layers (and any others) get ``η``.

    Returns:
        ``{parameter name: rate}``; a rate is a float or a tensor broadcastable to the parameter.

    Raises:
        ValueError: if ``model`` is not a module, if ``learning_rate`` is not a positive finite
            number, or if a deferred first layer (``build()`` without ``in_features``) has not drawn
            its weights yet: they are not a parameter yet, and their rate needs their fan-in.
    """
    refuse_spec(model)   # its raw variances got η: rates for parameters no network trains
    if not isinstance(model, nn.Module):   # None failed as "'NoneType' object has no attribute 'named_modules'"
        raise ValueError(f"model must be a torch.nn.Module (a network built by net.build(...)), got "
                         f"{type(model).__name__}.")
    learning_rate = positive_number(learning_rate, "learning_rate")
    deferred = [prefix or "<model>" for prefix, module in model.named_modules()
                if isinstance(module, DenseModule) and module.weight is None]
    if deferred:   # its weight would be missing from the rates, or trained at η if read with a default
        raise ValueError(f"The Dense layer(s) {deferred} have not drawn their weights yet (built without "
                         "in_features): call the model on an input first, or build it with in_features.")
    rates: dict[str, float | Tensor] = {name: learning_rate for name, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        if not isinstance(module, DenseModule) or module.parameterization != "standard":
            continue
        dot = f"{prefix}." if prefix else ""
        if module.weight is not None:
            scale = module.fan_in_variance(module.weight)
            rates[f"{dot}weight"] = learning_rate * (scale.unsqueeze(-1) if scale.dim() else scale)
        if module.bias is not None:
            rates[f"{dot}bias"] = learning_rate * cast(float, module.bias_var)   # a bias is drawn with its variance
    return rates


def ntk_parameterized(net: Layer) -> Layer:
    r"""A copy of the spec ``net`` with every ``Dense`` layer in NTK parameterization (Jacot et al.
    2018; the standard one's equivalence with per-layer rates: Sohl-Dickstein et al. 2020).

    Its kernels are what a standard-parameterized network built from ``net`` follows when trained
    with :func:`equivalent_learning_rates` (as :func:`ntkgp.finite.train_ensemble` trains it): the
    NNGP is the same in both parameterizations, and the NTK of the equivalent rates is the NTK
    parameterization's ``Θ ← K_new + σ_w² Θ`` (docs/theory.md), not the standard spec's own
    one-rate ``Θ ← n K_prev + σ_w² Θ + 1``. The ``Dense`` layers (variances, priors) and the
    containers holding them are copied, keeping the sharing of reused layers; the layers without a
    ``Dense`` (activations, ``LayerNorm``), which hold no hyperparameters, are shared with ``net``,
    so that a user's activation need not be copyable. ``net`` itself is left unchanged.
    """
    if not isinstance(net, Layer):
        raise ValueError(f"net must be an ntkgp layer (a spec), got {type(net).__name__}.")
    shared = {id(m): m for m in net.modules()
              if isinstance(m, Layer) and not any(isinstance(d, Dense) for d in m.modules())}
    twin = copy.deepcopy(net, memo=shared)
    for module in twin.modules():
        if isinstance(module, Dense):
            module.parameterization = "ntk"
    return twin
