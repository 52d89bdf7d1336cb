r"""Bayesian workflows on top of ntkgp's predictions.

* **Posterior-predictive draws and ArviZ export** (:mod:`~ntkgp.bayes.sampling`,
  :mod:`~ntkgp.bayes.inference_data`): :func:`gaussian_to_inference_data` for any
  :class:`~ntkgp.predict.Gaussian` (NNGP / NTK-GP posteriors, gradient flow at a chosen time)
  plus a noise variance; :func:`ensemble_to_inference_data` for the members of a finite
  ensemble; :func:`draws_to_inference_data` for draws from anywhere. The result has groups
  ``posterior``, ``posterior_predictive``, ``log_likelihood`` and ``observed_data`` for
  ``az.loo``, ``az.plot_ppc``, ``az.plot_loo_pit``; it is an ``InferenceData`` on ArviZ 0.x and
  an ``xarray.DataTree`` on ArviZ ≥ 1.
* **Metrics** (:mod:`~ntkgp.bayes.metrics`): :func:`rmse`, :func:`nlpd`, :func:`crps`,
  :func:`interval_coverage`, :func:`calibration_error`, :func:`regression_metrics`,
  :func:`auroc`.
* **Classification as regression** (:mod:`~ntkgp.bayes.classification`, Lee et al. 2018):
  :func:`one_hot_targets`, :func:`predict_classes`, :func:`accuracy`,
  :func:`misclassification_auroc`.

Example:
    >>> post = ntkgp.predict.gp_posterior(net, x_train, y_train, x_test, kernel="nngp", noise=0.01)
    >>> mean, var = ntkgp.bayes.predictive_moments(post, noise=0.01)
    >>> ntkgp.bayes.regression_metrics(mean, var, y_test)        # rmse, nlpd, crps, coverage, ...
    >>> idata = ntkgp.bayes.gaussian_to_inference_data(post, y_test, noise=0.01, num_draws=2000)
"""

from ntkgp.bayes.classification import accuracy, misclassification_auroc, one_hot_targets, predict_classes
from ntkgp.bayes.inference_data import arviz_major_version, draws_to_inference_data, gaussian_log_density
from ntkgp.bayes.metrics import (
    auroc,
    calibration_error,
    crps,
    interval_coverage,
    nlpd,
    regression_metrics,
    rmse,
)
from ntkgp.bayes.sampling import (
    ensemble_moments,
    ensemble_to_inference_data,
    gaussian_to_inference_data,
    predictive_moments,
    sample_outputs,
    select_time,
)

__all__ = [
    "accuracy",
    "arviz_major_version",
    "auroc",
    "calibration_error",
    "crps",
    "draws_to_inference_data",
    "ensemble_moments",
    "ensemble_to_inference_data",
    "gaussian_log_density",
    "gaussian_to_inference_data",
    "interval_coverage",
    "misclassification_auroc",
    "nlpd",
    "one_hot_targets",
    "predict_classes",
    "predictive_moments",
    "regression_metrics",
    "rmse",
    "sample_outputs",
    "select_time",
]
