"""ntkgp: infinite-width neural networks (NNGP and NTK kernels) for PyTorch and GPyTorch.

A network spec is built once and realized twice: as analytic kernels (``net.kernel``,
:class:`NNGPKernel`, :class:`NTKKernel`) and as the finite-width ``torch.nn.Module``
with the same parameterization (``net.build``).
"""

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


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"ntkgp.{name}")
    raise AttributeError(f"module 'ntkgp' has no attribute {name!r}")


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
