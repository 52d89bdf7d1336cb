"""Finite-width networks: empirical kernels, Monte-Carlo estimates, ensemble training."""

from ntkgp.finite.empirical import empirical_nngp, empirical_ntk, ensemble_size
from ntkgp.finite.linearize import Linearized, linearize
from ntkgp.finite.monte_carlo import KernelEstimate, monte_carlo_kernel
from ntkgp.finite.rates import equivalent_learning_rates, ntk_parameterized
from ntkgp.finite.train import EnsembleHistory, train_ensemble

__all__ = ["EnsembleHistory", "KernelEstimate", "Linearized", "empirical_nngp", "empirical_ntk", "ensemble_size",
           "equivalent_learning_rates", "linearize", "monte_carlo_kernel", "ntk_parameterized", "train_ensemble"]
