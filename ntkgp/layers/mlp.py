"""The multilayer perceptron shortcut."""

from __future__ import annotations

import torch

from ntkgp._checks import integer_at_least
from ntkgp.layers.activations import (
    GELU,
    Abs,
    Cos,
    Erf,
    Gabor,
    Identity,
    LeakyReLU,
    Rbf,
    ReLU,
    SigmoidLike,
    Sign,
    Sin,
)
from ntkgp.layers.base import Layer
from ntkgp.layers.combinators import Serial
from ntkgp.layers.dense import Dense
from ntkgp.layers.elementwise import Numerical

#: Activations by name; the last four have no closed form and use quadrature.
ACTIVATIONS = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "abs": Abs,
    "erf": Erf,
    "sigmoid_like": SigmoidLike,
    "gelu": GELU,
    "sin": Sin,
    "cos": Cos,
    "rbf": Rbf,
    "gabor": Gabor,
    "sign": Sign,
    "identity": Identity,
    "tanh": lambda: Numerical(torch.tanh),
    "sigmoid": lambda: Numerical(torch.sigmoid),
    "softplus": lambda: Numerical(torch.nn.functional.softplus),
    "silu": lambda: Numerical(torch.nn.functional.silu),
}


def make_activation(name: str | Layer) -> Layer:
    """An activation layer from its name (see :data:`ACTIVATIONS`) or the layer itself."""
    if isinstance(name, Layer):
        if any(isinstance(m, Dense) for m in name.modules()):   # built a different network silently
            raise ValueError(f"activation must be an activation layer (ntkgp.ReLU(), ntkgp.Numerical(fn), ...), "
                             f"not one with Dense layers ({type(name).__name__}); compose other architectures "
                             "with ntkgp.serial.")
        return name
    if isinstance(name, type) and issubclass(name, Layer):   # was "Unknown activation <class ...>"
        raise ValueError(f"activation must be a layer or a name, got the class {name.__name__}: pass an instance, "
                         f"{name.__name__}().")
    try:
        return ACTIVATIONS[name.lower()]()
    except (KeyError, AttributeError):
        # torch.tanh or nn.Tanh() is the natural first try; "pass a layer" did not say which one takes it
        known = getattr(name, "__name__", type(name).__name__).lower()
        hint = ""
        if known in ACTIVATIONS:   # its closed form or tuned quadrature, not a generic Numerical
            hint = f": for this one pass its name, activation={known!r}"
        elif callable(name):
            hint = (": wrap a torch function or module as ntkgp.Numerical(fn), e.g. "
                    "activation=ntkgp.Numerical(torch.nn.functional.elu) (its kernel by quadrature)")
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)} "
                         f"or pass a layer{hint}.") from None


def mlp(
    depth: int = 2,
    activation: str | Layer = "relu",
    weight_var: float = 2.0,
    bias_var: float | None = 0.01,
    width: int = 512,
    out_dim: int = 1,
    parameterization: str = "ntk",
    ard_num_dims: int | None = None,
) -> Serial:
    """``depth`` hidden ``Dense(width) → activation`` blocks and a ``Dense(out_dim)`` readout.

    Its kernels are the multilayer recursion of Lee et al. 2018 (NNGP) and Jacot et al. 2018
    (NTK), with ``T``, ``Ṫ`` those of the activation (NTK parameterization; the standard one's
    NTK is in :class:`ntkgp.Dense`)::

        K₁ = σ_w² x·x'/d + σ_b²,   K_{l+1} = σ_w² T(K_l) + σ_b²
        Θ₁ = K₁,                   Θ_{l+1} = K_{l+1} + σ_w² Ṫ(K_l) Θ_l

    Every ``Dense`` layer gets its own learnable ``weight_var`` and ``bias_var`` (starting at
    the given values).

    Args:
        depth: number of hidden layers (0: a linear model).
        activation: an activation layer, or its name: ``"relu"``, ``"leaky_relu"``, ``"abs"``,
            ``"erf"``, ``"sigmoid_like"``, ``"gelu"``, ``"sin"``, ``"cos"``, ``"rbf"`` (``γ = 1``),
            ``"gabor"``, ``"sign"``, ``"identity"`` (closed forms),
            ``"tanh"``, ``"sigmoid"``, ``"softplus"``, ``"silu"`` (:class:`ntkgp.Numerical`).
        weight_var: ``σ_w²`` of every layer.
        bias_var: ``σ_b²`` of every layer; ``None`` for layers without bias.
        width: hidden width of the finite twin (``net.build``). The NNGP does not depend on it,
            nor does the NTK in NTK parameterization; the standard parameterization's NTK does
            (``Θ ← n · K_prev + …``, :class:`ntkgp.Dense`).
        out_dim: number of outputs.
        parameterization: ``"ntk"`` or ``"standard"`` (:class:`ntkgp.Dense`).
        ard_num_dims: per-feature weight variances on the first layer (``d`` of them).
    """
    depth = integer_at_least(depth, 0, "depth")
    # named here: Dense's own message said "width" for a bad out_dim
    width, out_dim = integer_at_least(width, 1, "width"), integer_at_least(out_dim, 1, "out_dim")
    act = make_activation(activation)
    layers: list[Layer] = []
    for i in range(depth):
        layers.append(Dense(width, weight_var, bias_var, parameterization,
                            ard_num_dims=ard_num_dims if i == 0 else None))
        layers.append(act)
    layers.append(Dense(out_dim, weight_var, bias_var, parameterization,
                        ard_num_dims=ard_num_dims if depth == 0 else None))
    return Serial(*layers)
