"""Predictions of infinitely wide networks: gradient-flow dynamics and exact GP posteriors."""

from ntkgp.predict.descent import gradient_descent
from ntkgp.predict.gaussian import Gaussian
from ntkgp.predict.gradient_flow import GradientFlow, gradient_flow
from ntkgp.predict.linearized import gradient_descent_mse
from ntkgp.predict.posterior import GPPosterior, gp_posterior
from ntkgp.predict.spectral import max_learning_rate

__all__ = ["GPPosterior", "Gaussian", "GradientFlow", "gp_posterior", "gradient_descent", "gradient_descent_mse",
           "gradient_flow", "max_learning_rate"]
