"""Uncertainty metrics on Monte Carlo samples: pure numpy/scipy functions, samples axis first.

* :mod:`~mcu.metrics.classification`: ``(T, N, C)`` samples, ``from_logits=False`` by default - predictive
  and expected entropy, mutual information (BALD), variation ratio, margin, confidence, variances.
* :mod:`~mcu.metrics.regression`: ``(T, N, ...)`` samples - mean, epistemic/aleatoric/total variance,
  Gaussian and quantile intervals, split-conformal recalibration, coverage and width.
* :mod:`~mcu.metrics.calibration`: ECE and reliability diagrams, Brier score, NLL, AUROC/AUPR,
  risk-coverage curves and AURC.
* :mod:`~mcu.metrics.convergence`: how many samples are enough - convergence curves with bootstrap
  standard errors, per-example Monte Carlo standard errors.
* :mod:`~mcu.metrics.streaming`: O(N * C) accumulators that give the same numbers chunk by chunk.
"""

from mcu.metrics.calibration import (
    ReliabilityDiagram,
    aupr,
    aurc,
    auroc,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_diagram,
    risk_coverage_curve,
)
from mcu.metrics.classification import (
    classification_summary,
    confidence,
    expected_entropy,
    margin,
    max_probability,
    mean_probabilities,
    mutual_information,
    predictive_entropy,
    predictive_variance,
    variation_ratio,
)
from mcu.metrics.convergence import (
    DEFAULT_TS,
    ConvergenceCurve,
    convergence_curve,
    mc_standard_errors,
    smallest_sufficient_t,
)
from mcu.metrics.regression import (
    ConformalIntervalCalibrator,
    aleatoric_variance,
    conformal_interval,
    conformal_scale,
    epistemic_std,
    epistemic_variance,
    gaussian_interval,
    interval_coverage,
    mean_interval_width,
    predictive_mean,
    predictive_mean_standard_error,
    quantile_interval,
    total_std,
    total_variance,
)
from mcu.metrics.streaming import ClassificationAccumulator, RegressionAccumulator

__all__ = [
    "DEFAULT_TS",
    "ClassificationAccumulator",
    "ConformalIntervalCalibrator",
    "ConvergenceCurve",
    "RegressionAccumulator",
    "ReliabilityDiagram",
    "aleatoric_variance",
    "aupr",
    "aurc",
    "auroc",
    "brier_score",
    "classification_summary",
    "confidence",
    "conformal_interval",
    "conformal_scale",
    "convergence_curve",
    "epistemic_std",
    "epistemic_variance",
    "expected_calibration_error",
    "expected_entropy",
    "gaussian_interval",
    "interval_coverage",
    "margin",
    "max_probability",
    "mc_standard_errors",
    "mean_interval_width",
    "mean_probabilities",
    "mutual_information",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "predictive_entropy",
    "predictive_mean",
    "predictive_mean_standard_error",
    "predictive_variance",
    "quantile_interval",
    "reliability_diagram",
    "risk_coverage_curve",
    "smallest_sufficient_t",
    "total_std",
    "total_variance",
    "variation_ratio",
]
