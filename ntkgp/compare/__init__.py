"""Finite-width ensembles compared with infinite-width predictions (the ``ntkgp compare`` harness)."""

from ntkgp.compare.datasets import Dataset, circle_dataset, load_dataset, sin_dataset
from ntkgp.compare.harness import CompareConfig, ComparisonResult, loglog_slope, run_comparison
from ntkgp.compare.report import write_report

__all__ = ["CompareConfig", "ComparisonResult", "Dataset", "circle_dataset", "load_dataset", "loglog_slope",
           "run_comparison", "sin_dataset", "write_report"]
