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
    Identity,
    KernelState,
    Layer,
    LayerNorm,
    LeakyReLU,
    Numerical,
    Parallel,
    ReLU,
    Serial,
    Sign,
    Sin,
    parallel,
    repeat,
    residual,
    serial,
)
from ntkgp.layers.mlp import mlp

__version__ = "0.1.0"

__all__ = [
    "GELU",
    "ABReLU",
    "Abs",
    "Cos",
    "Dense",
    "Elementwise",
    "Erf",
    "Identity",
    "KernelState",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "NNGPKernel",
    "NTKKernel",
    "Numerical",
    "Parallel",
    "ReLU",
    "Serial",
    "Sign",
    "Sin",
    "bayes",
    "finite",
    "mlp",
    "parallel",
    "predict",
    "repeat",
    "residual",
    "serial",
]
