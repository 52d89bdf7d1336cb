"""The layer algebra: each layer carries its infinite-width kernel map and its finite twin."""

from ntkgp.layers.activations import (
    GELU,
    ABReLU,
    Abs,
    Activation,
    Cos,
    Erf,
    Exp,
    Gabor,
    Gaussian,
    Identity,
    LeakyReLU,
    Rbf,
    ReLU,
    SigmoidLike,
    Sign,
    Sin,
)
from ntkgp.layers.base import BuildContext, Layer, NonFiniteVarianceError
from ntkgp.layers.combinators import Parallel, Serial, parallel, repeat, residual, serial
from ntkgp.layers.dense import Dense
from ntkgp.layers.elementwise import Elementwise, Numerical, gauss_hermite_expectation
from ntkgp.layers.norm import LayerNorm
from ntkgp.layers.polynomial import Hermite, Monomial, Polynomial, RectifiedMonomial
from ntkgp.layers.state import KernelState
from ntkgp.layers.variance import ExactVariance

__all__ = [
    "GELU",
    "ABReLU",
    "Abs",
    "Activation",
    "BuildContext",
    "Cos",
    "Dense",
    "Elementwise",
    "Erf",
    "ExactVariance",
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
    "NonFiniteVarianceError",
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
    "gauss_hermite_expectation",
    "parallel",
    "repeat",
    "residual",
    "serial",
]
