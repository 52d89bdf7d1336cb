r"""The point-wise checks, and how often an ensemble with no finite-width error fails them.

A comparison scores an ensemble of ``E`` members at ``M`` test points against the analytic
Gaussian ``N(μ, Σ)`` by the fraction of points where

* the ensemble mean is within ``3 SE + 0.02`` of ``μ`` (``SE = σ̂ / sqrt(E)``), and
* the ensemble variance is within ``tolerance · max(σ², floor)`` of ``σ² = diag Σ``.

Per point, 2.16 standard errors of a variance from 128 draws are exceeded ~3 % of the time.
But the test points of one function are strongly correlated, so the members' estimates err at
most points together: the fraction within is close to all or nothing, and a check that asks
for 90 % of the points fails far more often than 3 % of the time. :func:`perfect_ensemble_scores`
measures this by scoring ensembles of ``E`` exact draws from ``N(μ, Σ)`` (no finite-width error at
all) the same way, which says how surprising a trained ensemble's score is.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative variance errors are taken against max(analytic variance, floor × the larger of the
#: step's largest one and the prior's): where the analytic variance is ~0 (a test point on a
#: training point, late in training) the ensemble variance is rounding noise, and where it is ~0 at
#: every test point (a network with fewer features than training points, trained to convergence)
#: the step's largest is itself rounding, which would make rounding noise fail the check.
VARIANCE_FLOOR = 1e-6
#: Absolute slack of the mean check, on top of 3 standard errors.
MEAN_SLACK = 0.02
#: Exact ensembles drawn per comparison to calibrate the checks (one standard error of a 10 %
#: failure rate from 1000 draws: 0.95 %).
CALIBRATION_ENSEMBLES = 1000
#: Multiply-adds the draws may cost (a few seconds on a laptop CPU) before fewer ensembles are drawn.
DRAW_FLOPS = 2e10


def pointwise_scores(mean: Tensor, variance: Tensor, members: int, mu: Tensor, var: Tensor,
                     tolerance: float, prior_scale: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Fractions of test points (last axis) that pass the mean and the variance check.

    Args:
        mean: ``(..., M)`` ensemble mean ``μ̂``.
        variance: ``(..., M)`` unbiased ensemble variance ``σ̂²``.
        members: the ensemble size ``E``.
        mu: ``(..., M)`` analytic mean ``μ`` (broadcast against ``mean``).
        var: ``(..., M)`` analytic variance ``σ²``.
        tolerance: allowed ``|σ̂² − σ²| / max(σ², VARIANCE_FLOOR · max(max σ², prior_scale))``.
        prior_scale: the largest prior (NNGP) variance over the test points, the scale of the
            outputs before training.

    Returns:
        ``(mean_within, var_within, rel)``: the fractions with ``|μ̂ − μ| ≤ 3 SE + MEAN_SLACK`` and with
        ``rel ≤ tolerance``, and the relative variance errors ``rel`` themselves.
    """
    se = (variance / members).sqrt()
    mean_within = ((mean - mu).abs() <= 3 * se + MEAN_SLACK).double().mean(-1)
    # the floor from the finite variances: one inf (a run above the stability limit) made it inf
    # and every other point's error 0, "within" whatever the ensemble did
    finite = var.isfinite()
    floor = VARIANCE_FLOOR * torch.where(finite, var, 0.0).amax(-1, keepdim=True).clamp_min(prior_scale)
    rel = (variance - var).abs() / torch.maximum(var, floor).clamp_min(torch.finfo(var.dtype).tiny)
    rel = torch.where(finite, rel, torch.inf)   # an analytic variance that overflowed: no band to lie in
    return mean_within, (rel <= tolerance).double().mean(-1), rel


def simulated_share(scores: Tensor, condition: Tensor) -> Tensor:
    """Per step, the share of the simulated ensembles (``scores``, ``(T, draws)`` from
    :func:`perfect_ensemble_scores`) for which ``condition`` holds; NaN at steps not simulated."""
    return torch.where(scores.isnan().any(-1), torch.nan, condition.double().mean(-1))


def perfect_ensemble_scores(mu: Tensor, covariance: Tensor, members: int, tolerance: float,
                            draws: int = CALIBRATION_ENSEMBLES, seed: int = 0,
                            prior_scale: float = 0.0) -> tuple[Tensor, Tensor]:
    """Scores of ``draws`` ensembles of ``members`` exact samples of ``N(μ_t, Σ_t)``.

    Args:
        mu: ``(T, M)`` analytic means (one row per recorded step).
        covariance: ``(T, M, M)`` analytic covariances (positive semi-definite up to rounding).
        members: ensemble size ``E`` (at least 2).
        tolerance: the variance check's tolerance (:func:`pointwise_scores`).
        draws: number of simulated ensembles: fewer when ``draws · E · min(M², 2 M rank Σ)``
            multiply-adds per step (:func:`symmetric_root`), plus the eigendecompositions (``10 M³``)
            and, for the ``M × M`` root, its product (``M³``), would exceed :data:`DRAW_FLOPS` (a large
            test set), and none (zero columns) when that leaves fewer than 100.
        seed: of the draws (a CPU generator). The draws are a continuous function of the
            covariance (standard normals mapped by its symmetric square root, see
            :func:`symmetric_root`), so the same seed draws the same ensembles, and the same counts,
            wherever the covariance agrees to rounding (another BLAS, another torch version).
        prior_scale: as in :func:`pointwise_scores`.

    Returns:
        ``(mean_within, var_within)``, each ``(T, draws)``: what :func:`pointwise_scores` gives each
        simulated ensemble; NaN at steps whose mean or covariance is not finite (above the stability
        limit the analytic variance overflows). ``simulated_share(var_within, var_within < 0.9)`` is
        the rate at which an ensemble without finite-width error fails the variance check.
    """
    mu, covariance = mu.detach().double().cpu(), covariance.detach().double().cpu()
    steps, m = mu.shape
    rows = torch.isfinite(mu).all(-1) & torch.isfinite(covariance).flatten(1).all(-1)
    used = int(rows.sum())
    eigen_cost = 10 * used * m**3                                     # ~10 M³ multiply-adds per eigh
    # on the CPU like mu and the generator, whatever torch's default device: a CUDA default drew from the
    # CPU generator onto the GPU ("Expected a 'cuda' device type for generator") and mixed devices
    none = (torch.empty(steps, 0, dtype=torch.float64, device="cpu"),
            torch.empty(steps, 0, dtype=torch.float64, device="cpu"))
    if used == 0 or eigen_cost >= DRAW_FLOPS:
        return none
    mu_used, cov_used = mu[rows], covariance[rows]
    var = cov_used.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    left, right = symmetric_root(cov_used)
    # the M × M root's own product V_r Λ_r^{1/2} V_rᵀ (M² r ≤ M³ multiply-adds per step) is spent too:
    # uncounted, the draws took up to 10 % more than DRAW_FLOPS
    spent = eigen_cost + (used * m**3 if right is None else 0)
    draws = min(draws, int((DRAW_FLOPS - spent) // (used * members * _draw_cost(left, right))))
    if draws < 100:   # a failure rate of ~10 % from fewer draws is too rough to quote
        return none
    generator = torch.Generator().manual_seed(seed)
    batch = max(1, 2**22 // (used * members * m))                    # ~32 MiB of samples at a time
    mean_scores, var_scores = [], []
    for start in range(0, draws, batch):
        b = min(batch, draws - start)
        z = torch.randn(b, used, members, m, generator=generator, dtype=torch.float64, device="cpu")
        samples = mu_used.unsqueeze(-2) + _apply_root(z, left, right)  # (b, T', E, M)
        mean_within, var_within, _ = pointwise_scores(samples.mean(-2), samples.var(-2), members, mu_used, var,
                                                      tolerance, prior_scale)
        mean_scores.append(mean_within)
        var_scores.append(var_within)
    out = []
    for scores in (mean_scores, var_scores):
        full = torch.full((steps, draws), float("nan"), dtype=torch.float64, device="cpu")
        full[rows] = torch.cat(scores).mT
        out.append(full)
    return out[0], out[1]


def symmetric_root(covariance: Tensor) -> tuple[Tensor, Tensor | None]:
    r"""The symmetric square root ``S = V_r Λ_r^{1/2} V_rᵀ`` of ``Σ = V Λ Vᵀ`` (``(..., M, M)``), over the
    ``r`` directions whose eigenvalue exceeds 1e-12 of the largest (``r`` the most over the batch).

    ``S z`` for standard normal ``z ∈ R^M`` is ``N(0, V_r Λ_r V_rᵀ)``. Unlike the factor
    ``V_r Λ_r^{1/2}``, ``S`` does not depend on the eigenvectors' signs nor on the basis eigh picks
    inside a (near-)degenerate eigenspace, both of which change with rounding-level changes of
    ``Σ``: ``S`` is a continuous function of ``Σ``, so the same ``z`` give the same draws wherever
    ``Σ`` agrees to rounding. The directions dropped move no variance by more than 1e-12 of the
    largest, far below the checks' floor (1e-6); smooth kernels on many test points have few that matter.
    (The cut is the one discontinuity: a change of ``Σ`` that carries an eigenvalue across it moves
    the draws by about 1e-6 of their scale, not by rounding.)

    Returns:
        ``(S, None)`` when ``2 r ≥ M`` (one ``M × M`` product per draw is the cheaper), else the factors
        ``(V_r Λ_r^{1/2}, V_r)`` with ``S = V_r Λ_r^{1/2} V_rᵀ``, applied as two ``M × r`` products.
    """
    values, vectors = torch.linalg.eigh((covariance + covariance.mT) / 2)   # ascending
    rank = max(1, int((values > 1e-12 * values.amax(-1, keepdim=True)).sum(-1).max()))
    kept = vectors[..., -rank:]
    scaled = kept * values[..., -rank:].clamp_min(0).sqrt().unsqueeze(-2)       # V_r Λ_r^{1/2}
    if 2 * rank >= covariance.shape[-1]:
        return scaled @ kept.mT, None
    return scaled, kept


def _draw_cost(left: Tensor, right: Tensor | None) -> int:
    """Multiply-adds of one draw ``S z`` from the root or the factors of :func:`symmetric_root`."""
    m = left.shape[-2]
    return m * m if right is None else 2 * m * right.shape[-1]


def _apply_root(z: Tensor, left: Tensor, right: Tensor | None) -> Tensor:
    """``z Sᵀ = z S`` for draws ``z`` of shape ``(..., T, E, M)`` and roots of shape ``(T, M, M)``
    (or the factors of :func:`symmetric_root`): the rows of the result are ``S z``."""
    if right is None:
        return z @ left.mT
    return (z @ right) @ left.mT
