"""Finite-width networks: empirical kernels and Monte-Carlo estimates (training lives in ntkgp.finite.train)."""

from ntkgp.finite.empirical import empirical_nngp, empirical_ntk, ensemble_size
from ntkgp.finite.monte_carlo import KernelEstimate, monte_carlo_kernel

__all__ = ["KernelEstimate", "empirical_nngp", "empirical_ntk", "ensemble_size", "monte_carlo_kernel"]
