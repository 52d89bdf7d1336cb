"""ntkgp: infinite-width neural networks (NNGP and NTK kernels) for PyTorch and GPyTorch.

A network spec is built once and realized twice: as analytic kernels (``net.kernel``,
:class:`NNGPKernel`, :class:`NTKKernel`) and as the finite-width ``torch.nn.Module``
with the same parameterization (``net.build``).
"""

from typing import TYPE_CHECKING

from ntkgp import bayes, finite, predict
from ntkgp.kernels import NNGPKernel, NTKKernel
from ntkgp.layers import (
    GELU,
    ABReLU,
    Abs,
    Cos,
    Dense,
    Elementwise,
    Erf,
    Exp,
    Gabor,
    Gaussian,
    Hermite,
    Identity,
    KernelState,
    Layer,
    LayerNorm,
    LeakyReLU,
    Monomial,
    Numerical,
    Parallel,
    Polynomial,
    Rbf,
    RectifiedMonomial,
    ReLU,
    Serial,
    SigmoidLike,
    Sign,
    Sin,
    parallel,
    repeat,
    residual,
    serial,
)
from ntkgp.layers.mlp import mlp

__version__ = "0.1.0"

#: Subpackages imported on first use: ``ntkgp.models`` and ``ntkgp.compare`` work after a plain
#: ``import ntkgp`` without every import paying for them (``compare`` loads matplotlib, which is
#: also why ``from ntkgp import *`` leaves it out).
_LAZY_SUBPACKAGES = ("compare", "models")


#: neural-tangents' ``stax`` names that ntkgp spells otherwise (docs/conventions.md, "Layers"): a port
#: that kept them met a bare AttributeError.
_NEURAL_TANGENTS_NAMES = {
    "Relu": "ntkgp.ReLU()",
    "LeakyRelu": "ntkgp.LeakyReLU(negative_slope=alpha)",
    "ABRelu": "ntkgp.ABReLU(a, b)",
    "Gelu": "ntkgp.GELU()",
    "Sigmoid_like": "ntkgp.SigmoidLike()",
    "ElementwiseNumerical": "ntkgp.Numerical(fn, degree=deg)",
    "FanOut": "ntkgp.parallel(f, g, join=...): no FanOut or FanIn layers",
    "FanInSum": 'ntkgp.parallel(f, g, join="sum")',
    "FanInProd": 'ntkgp.parallel(f, g, join="prod")',
    "FanInConcat": 'ntkgp.parallel(f, g, join="concat")',
}

#: neural-tangents' ``stax`` layers without a counterpart (docs/conventions.md, "Not supported"), and why.
_NEURAL_TANGENTS_UNSUPPORTED = {
    **dict.fromkeys(("Conv", "ConvTranspose", "ConvLocal", "AvgPool", "SumPool", "GlobalAvgPool", "GlobalSumPool",
                     "Flatten", "GlobalSelfAttention", "ImageResize", "Aggregate", "Index", "DotGeneral"),
                    "ntkgp's architectures are fully connected (flatten images yourself: x.flatten(1))"),
    "ExpNormalized": "it is a kernel map without a finite network, and every ntkgp layer has both",
    "Dropout": "its kernels describe networks at initialization, without dropout",
}

#: neural-tangents' top-level functions (``import neural_tangents as nt``) and where ntkgp has them.
_NEURAL_TANGENTS_FUNCTIONS = {
    "linearize": "ntkgp.finite.linearize(model), a trainable module",
    "empirical_ntk_fn": "ntkgp.finite.empirical_ntk(model, x1, x2), which computes the kernel directly",
    "empirical_nngp_fn": "ntkgp.finite.empirical_nngp(model, x1, x2), which computes the kernel directly",
    "empirical_kernel_fn": "ntkgp.finite.empirical_nngp and ntkgp.finite.empirical_ntk",
    "monte_carlo_kernel_fn": "ntkgp.finite.monte_carlo_kernel(net, x1, x2, n_samples=...)",
    "batch": "not needed: ntkgp computes large kernels in row blocks",
    "taylor_expand": "without a counterpart; ntkgp.finite.linearize(model) is the first order",
    "stax": "ntkgp itself: layers and combinators are top-level names (ntkgp.Dense, ntkgp.ReLU, ntkgp.serial)",
}


if TYPE_CHECKING:   # what the lazy imports below give, for type checkers (which then flag misspelled names)
    from ntkgp import compare as compare
    from ntkgp import models as models
else:
    def __getattr__(name: str) -> object:
        import importlib
        import sys

        if name in _LAZY_SUBPACKAGES:
            return importlib.import_module(f"ntkgp.{name}")
        message = f"module 'ntkgp' has no attribute {name!r}"
        if name in _NEURAL_TANGENTS_NAMES:
            message += f": neural-tangents' stax.{name} is {_NEURAL_TANGENTS_NAMES[name]} (docs/conventions.md)"
        elif name in _NEURAL_TANGENTS_UNSUPPORTED:
            message += (f": neural-tangents' stax.{name} has no counterpart, {_NEURAL_TANGENTS_UNSUPPORTED[name]} "
                        "(docs/conventions.md)")
        elif name in _NEURAL_TANGENTS_FUNCTIONS:
            message += f": neural-tangents' nt.{name} is {_NEURAL_TANGENTS_FUNCTIONS[name]} (docs/conventions.md)"
        # name and obj let Python suggest a close name ("Did you mean: 'Rbf'?") for other misspellings
        raise AttributeError(message, name=name, obj=sys.modules[__name__])


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBPACKAGES})

__all__ = [
    "GELU",
    "ABReLU",
    "Abs",
    "Cos",
    "Dense",
    "Elementwise",
    "Erf",
    "Exp",
    "Gabor",
    "Gaussian",
    "Hermite",
    "Identity",
    "KernelState",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "Monomial",
    "NNGPKernel",
    "NTKKernel",
    "Numerical",
    "Parallel",
    "Polynomial",
    "Rbf",
    "ReLU",
    "RectifiedMonomial",
    "Serial",
    "SigmoidLike",
    "Sign",
    "Sin",
    "bayes",
    "finite",
    "mlp",
    "models",
    "parallel",
    "predict",
    "repeat",
    "residual",
    "serial",
]
