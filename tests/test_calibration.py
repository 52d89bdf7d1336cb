"""How often ensembles without finite-width error fail the point-wise checks (ntkgp.compare.calibration)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from ntkgp.compare import CompareConfig, run_comparison, sin_dataset
from ntkgp.compare.calibration import perfect_ensemble_scores, pointwise_scores
from ntkgp.compare.harness import check_details, variance_tolerance
from ntkgp.compare.report import check_notes
from ntkgp.predict import GradientFlow

DRAWS = 20_000


def _variance_fails_at_a_point(members: int, tolerance: float) -> float:
    """P(|σ̂²/σ² − 1| > tolerance): (E − 1) σ̂²/σ² is chi-square with E − 1 degrees of freedom."""
    dof = members - 1
    return stats.chi2.cdf((1 - tolerance) * dof, dof) + stats.chi2.sf((1 + tolerance) * dof, dof)


def test_independent_points_fail_as_the_binomial_law_says():
    """Uncorrelated test points: the number of points outside each check is binomial, with the
    chi-square (variance) and Student-t (mean, whose 0.02 slack is negligible at σ = 100) tails."""
    m, members, tolerance = 20, 8, 0.8
    mu = torch.zeros(1, m, dtype=torch.float64)
    cov = 1e4 * torch.eye(m, dtype=torch.float64).unsqueeze(0)
    mean_within, var_within = perfect_ensemble_scores(mu, cov, members, tolerance, draws=DRAWS, seed=3)
    assert mean_within.shape == var_within.shape == (1, DRAWS)
    p_var = _variance_fails_at_a_point(members, tolerance)
    p_mean = 2 * stats.t.sf(3, members - 1)
    expected_var = stats.binom.cdf(math.ceil(0.9 * m) - 1, m, 1 - p_var)    # fewer than 90 % within
    expected_mean = stats.binom.cdf(math.ceil(0.95 * m) - 1, m, 1 - p_mean)
    for simulated, expected in (((var_within < 0.9).double().mean(), expected_var),
                                ((mean_within < 0.95).double().mean(), expected_mean)):
        error = math.sqrt(expected * (1 - expected) / DRAWS)
        assert abs(float(simulated) - expected) < 4 * error, (float(simulated), expected)
    assert 0.05 < expected_var < 0.95 and 0.02 < expected_mean   # the comparisons can tell


def test_fully_correlated_points_fail_together():
    """Points that are one random variable pass or fail together: a check fails as often as one
    point does, far more often than the 10 % of points it tolerates would suggest."""
    m, members, tolerance = 30, 128, 0.27
    mu = torch.zeros(2, m, dtype=torch.float64)
    cov = torch.ones(2, m, m, dtype=torch.float64) * torch.tensor([1.0, 4.0], dtype=torch.float64).view(2, 1, 1)
    draws = 5000
    _, var_within = perfect_ensemble_scores(mu, cov, members, tolerance, draws=draws, seed=4)
    assert set(torch.unique(var_within).tolist()) <= {0.0, 1.0}
    expected = _variance_fails_at_a_point(members, tolerance)
    error = math.sqrt(expected * (1 - expected) / draws)
    for step in range(2):
        assert abs(float((var_within[step] < 0.9).double().mean()) - expected) < 4 * error


def test_pointwise_scores_apply_the_floor_and_the_slack():
    mu = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    var = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)    # a point with variance 0 (a training point)
    mean = torch.tensor([0.03, 0.0, 1.0 + 3 * 0.1 + 0.02 + 1e-9], dtype=torch.float64)
    ens_var = torch.tensor([1.2, 1e-7, 1.0], dtype=torch.float64)   # SE = 0.1 at E = 100 (third point)
    mean_within, var_within, rel = pointwise_scores(mean, ens_var, 100, mu, var, 0.27)
    assert float(mean_within) == pytest.approx(2 / 3)           # the third point is just outside 3 SE + 0.02
    torch.testing.assert_close(rel, torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64))  # 1e-7 / (1e-6 · 1)
    assert float(var_within) == 1.0
    # an analytic variance that overflowed (above the stability limit) is outside the band, and the
    # others keep theirs: its inf floor made every other error 0 ("within" at a ratio of 11)
    _, var_within, rel = pointwise_scores(torch.zeros(2), torch.tensor([5.0, 11.0]), 16, torch.zeros(2),
                                          torch.tensor([math.inf, 1.0]), 0.27)
    assert float(var_within) == 0.0 and rel.tolist() == [math.inf, 10.0]


def test_a_comparison_reports_how_often_exact_ensembles_score_as_low(tmp_path):
    config = CompareConfig(widths=(16, 256), ensemble_size=32, record_steps=(0, 10, 300), divergence_check=False)
    result = run_comparison(sin_dataset(), config)
    calibration = result.calibration
    assert calibration["ensembles"] == 1000
    assert len(calibration["mean_fail"]) == len(calibration["var_fail"]) == 3
    # after step 0 the variance check fails by chance well above the 3 % of one point (correlated points)
    assert all(0.03 < v < 0.3 for v in calibration["var_fail"][1:])
    # the same simulation, scored by hand, gives the recorded chances
    data = sin_dataset()
    flow = GradientFlow(config.network(16, ntk_twin=True), data.x_train, data.y_train,
                        learning_rate=result.learning_rate)
    exact = flow.predict(data.x_test, steps=torch.tensor(result.steps))
    prior = float(config.network(16, ntk_twin=True).kernel(data.x_test, diag=True, ntk=False).nngp.detach().max())
    _, var_scores = perfect_ensemble_scores(exact.mean[..., 0], exact.covariance, 32, variance_tolerance(32),
                                            seed=config.seed, prior_scale=prior)
    for width in result.widths:
        for score, chance in zip(width.var_within, width.var_within_chance, strict=True):
            assert 0 <= chance <= 1 and (chance == 1.0 or score < 1.0)   # ties count: 1.00 is never unusual
        expected = (var_scores <= torch.tensor(width.var_within, dtype=torch.float64).unsqueeze(-1) + 1e-12)
        assert width.var_within_chance == pytest.approx(expected.double().mean(-1).tolist(), abs=1e-12)
    notes = check_notes(result)
    assert any(n.startswith("calibration: ensembles of 32 exact draws from the NTK-GP itself") for n in notes)


def test_failed_checks_say_how_many_exact_ensembles_score_as_low():
    width = SimpleNamespace(width=512, steps=[0, 10], mean_within=[1.0, 0.9], var_within=[1.0, 0.76],
                            mean_within_chance=[1.0, 0.0], var_within_chance=[1.0, 0.042], diverged_at=None)
    result = SimpleNamespace(steps=[0, 10], config={"ensemble_size": 128}, widths=[width],
                             calibration={"ensembles": 1000, "mean_fail": [0.0, 0.0], "var_fail": [0.0, 0.1]})
    details = check_details(result)
    assert details == {
        "width 512, step 10: mean within 3 SE + 0.02 at >= 95% of points": "0.90 of points; 0 of 1000 exact "
                                                                           "ensembles score as low",
        "width 512, step 10: variance within 27% at >= 90% of points": "0.76 of points; 42 of 1000 exact "
                                                                       "ensembles score as low"}
    width.var_within_chance, result.calibration = [], None          # a run without calibration
    assert check_details(result)["width 512, step 10: variance within 27% at >= 90% of points"] == "0.76 of points"


# a failed score is never printed as the threshold it missed: 0.949 of 1000 points read "0.95" under ">= 95%",
# 0.8996 "0.900" under ">= 90%"
def test_failed_checks_print_their_fraction_below_the_threshold():
    width = SimpleNamespace(width=512, steps=[0, 10], mean_within=[1.0, 0.949], var_within=[1.0, 0.8996],
                            mean_within_chance=[], var_within_chance=[], diverged_at=None)
    result = SimpleNamespace(steps=[0, 10], config={"ensemble_size": 128}, widths=[width], calibration=None)
    assert check_details(result) == {
        "width 512, step 10: mean within 3 SE + 0.02 at >= 95% of points": "0.949 of points",
        "width 512, step 10: variance within 27% at >= 90% of points": "0.8996 of points"}
    width.mean_within, width.var_within = [1.0, 0.94], [1.0, 0.5]   # two decimals where they stay below
    assert list(check_details(result).values()) == ["0.94 of points", "0.50 of points"]


def test_large_test_sets_draw_fewer_ensembles_in_the_directions_that_matter(monkeypatch):
    import ntkgp.compare.calibration as calibration

    m = 50
    # eigh (10 M³) and the M × M root (M³), then 200 full-rank draws
    monkeypatch.setattr(calibration, "DRAW_FLOPS", 11 * m**3 + 200 * 16 * m * m)
    mu = torch.zeros(1, m, dtype=torch.float64)
    full = torch.eye(m, dtype=torch.float64).unsqueeze(0)
    assert perfect_ensemble_scores(mu, full, 16, 0.5)[1].shape == (1, 200)
    # rank one (up to rounding): one direction to draw, so all 1000 ensembles fit the budget
    x = torch.linspace(0.5, 1.5, m, dtype=torch.float64)
    rank_one = (torch.outer(x, x) + 1e-15 * torch.eye(m, dtype=torch.float64)).unsqueeze(0)
    _, var_within = perfect_ensemble_scores(mu, rank_one, 16, 0.5)
    assert var_within.shape == (1, 1000) and set(torch.unique(var_within).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("points", [4, 50])
def test_steps_whose_analytic_covariance_overflows_are_not_calibrated(points, tmp_path):
    """Far above the stability limit the analytic covariance overflows at late steps: those steps
    get no calibration (NaN, null in report.json), the others do, and the run is reported, not a
    crash (eigh raised on the non-finite matrices for some test sets, or returned NaN that read as
    exact ensembles failing 100 % of the time)."""
    from ntkgp.compare import Dataset, write_report

    base = sin_dataset()
    xt = torch.linspace(-3, 3, points, dtype=torch.float64).unsqueeze(-1)
    data = Dataset("sin", base.x_train, base.y_train, xt, xt.sin(), f"sin, {points} test points")
    config = CompareConfig(widths=(256,), ensemble_size=4, record_steps=(0, 10, 100, 1000), lr_fraction=20,
                           divergence_check=False, progress=False)
    with pytest.warns(RuntimeWarning):   # the predictor's warning that the flow diverges
        result = run_comparison(data, config)
    assert result.widths[0].diverged_at is not None
    fails = result.calibration["var_fail"]
    assert math.isfinite(fails[1]) and math.isnan(fails[-1])
    write_report(result, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["calibration"]["var_fail"][-1] is None
    assert not any("100.0 %" in note for note in check_notes(result))


def test_a_test_set_too_large_to_simulate_gets_no_calibration_and_a_note(monkeypatch):
    import ntkgp.compare.calibration as calibration

    m = 40
    mu, cov = torch.zeros(2, m, dtype=torch.float64), torch.eye(m, dtype=torch.float64).expand(2, m, m)
    monkeypatch.setattr(calibration, "DRAW_FLOPS", 10 * 2 * m**3)        # the eigendecompositions alone
    assert perfect_ensemble_scores(mu, cov, 16, 0.5)[1].shape == (2, 0)
    monkeypatch.setattr(calibration, "DRAW_FLOPS", 10 * 2 * m**3 + 99 * 2 * 16 * m * m)   # 99 ensembles
    assert perfect_ensemble_scores(mu, cov, 16, 0.5)[1].shape == (2, 0)
    monkeypatch.setattr(calibration, "DRAW_FLOPS", 10 * 2 * 50**3)        # the sin run's two eigh alone
    result = run_comparison(sin_dataset(), CompareConfig(widths=(256,), ensemble_size=16, record_steps=(0, 5),
                                                         divergence_check=False, progress=False))
    assert result.calibration["ensembles"] == 0 and all(math.isnan(c) for c in result.widths[0].var_within_chance)
    assert any(n.startswith("no calibration: simulating ensembles of 16 exact draws") for n in check_notes(result))


def test_pointwise_scores_follow_the_documented_bands():
    """ntkgp.compare.calibration.pointwise_scores against its documented formulas, evaluated by hand:
    mean check |mu_hat - mu| <= 3 sqrt(var_hat / E) + 0.02, variance check
    |var_hat - var| / max(var, 1e-6 * max(max var, prior_scale)) <= tolerance."""
    members = 16
    variance = torch.tensor([0.16, 0.16, 0.16, 0.16, 0.16], dtype=torch.float64)      # SE = 0.1, 3 SE = 0.3
    mu = torch.zeros(5, dtype=torch.float64)
    # offsets: inside 3 SE; between 3 SE and 3 SE + 0.02 (inside only thanks to the slack); beyond it
    mean = torch.tensor([0.1, 0.31, 0.319, 0.33, -0.25], dtype=torch.float64)
    var = torch.tensor([0.16, 0.2, 0.1, 0.16, 1e-9], dtype=torch.float64)
    mean_within, var_within, rel = pointwise_scores(mean, variance, members, mu, var, tolerance=0.3)
    se = (variance / members).sqrt()
    by_hand_mean = ((mean - mu).abs() <= 3 * se + 0.02).double().mean()
    assert float(by_hand_mean) == 0.8                                     # 4 of 5: 0.1, 0.31, 0.319, -0.25
    assert float(mean_within) == float(by_hand_mean)
    floor = 1e-6 * 0.2
    expected_rel = (variance - var).abs() / torch.maximum(var, torch.tensor(floor, dtype=torch.float64))
    torch.testing.assert_close(rel, expected_rel, rtol=1e-14, atol=0)
    assert float(var_within) == float((expected_rel <= 0.3).double().mean())
    # a prior scale above the largest variance raises the floor: 1e-6 * 1e3 = 1e-3 for the last point
    _, _, rel_prior = pointwise_scores(mean, variance, members, mu, var, tolerance=0.3, prior_scale=1e3)
    torch.testing.assert_close(rel_prior[-1], (0.16 - 1e-9) / torch.tensor(1e-3, dtype=torch.float64),
                               rtol=1e-14, atol=0)


def _circulant_covariance(m: int) -> torch.Tensor:
    """An RBF kernel on m equally spaced points of a circle: a circulant matrix whose eigenvalues come
    in equal pairs (cosine and sine of one frequency), so eigh's basis inside each pair is arbitrary."""
    theta = torch.arange(m, dtype=torch.float64) * 2 * math.pi / m
    return torch.exp(-(2 - 2 * (theta[:, None] - theta[None, :]).cos()) / 0.5).unsqueeze(0)


def _fail_counts(mean_within: torch.Tensor, var_within: torch.Tensor) -> tuple[int, int]:
    return int((mean_within < 0.95).sum()), int((var_within < 0.9).sum())


def test_the_draws_do_not_move_with_rounding_of_the_covariance():
    """A 1e-13 relative perturbation of Σ (another BLAS, another torch version) draws the same
    ensembles from the same seed. Drawn along eigh's eigenvectors, it rotated the basis inside the
    degenerate pairs and drew other ensembles: 147 vs 170 of 1000 failed the variance check."""
    m = 30
    cov = _circulant_covariance(m)
    noise = torch.randn(1, m, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    perturbed = cov * (1 + 1e-13 * (noise + noise.mT) / 2)
    mu = torch.zeros(1, m, dtype=torch.float64)
    mean_a, var_a = perfect_ensemble_scores(mu, cov, 32, 0.48)
    mean_b, var_b = perfect_ensemble_scores(mu, perturbed, 32, 0.48)
    # the draws move by ~1e-13 relative: a score changes only if a variance lies that close to the
    # band's edge (a fraction ~1e-12 of the 30 000 point-draws), so all 1000 scores agree
    assert int((var_a != var_b).sum()) == 0 and int((mean_a != mean_b).sum()) == 0
    mean_fails, var_fails = _fail_counts(mean_a, var_a)
    assert 50 < var_fails < 500 and mean_fails > 10      # the checks fail often enough to tell


def test_the_draws_do_not_depend_on_the_eigenvectors_signs_or_basis(monkeypatch):
    """Another eigh may return any sign of each eigenvector and any orthonormal basis of a degenerate
    eigenspace: the draws (standard normals mapped by the symmetric square root) are the same."""
    import ntkgp.compare.calibration as calibration

    m = 30
    cov = _circulant_covariance(m)
    mu = torch.zeros(1, m, dtype=torch.float64)
    expected = perfect_ensemble_scores(mu, cov, 32, 0.48)
    eigh = torch.linalg.eigh

    def another_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = eigh(a)
        signs = torch.where(torch.arange(m) % 3 == 0, -1.0, 1.0).to(vectors)
        vectors = vectors * signs                               # flip every third eigenvector
        # rotate the top pair (equal eigenvalues up to rounding) by 40 degrees within its plane
        assert abs(float(values[0, -2] - values[0, -3])) < 1e-12 * float(values[0, -1])
        c, s = math.cos(0.7), math.sin(0.7)
        u, v = vectors[..., -3].clone(), vectors[..., -2].clone()
        vectors[..., -3], vectors[..., -2] = c * u + s * v, c * v - s * u
        return values, vectors

    monkeypatch.setattr(calibration.torch.linalg, "eigh", another_eigh)
    got = perfect_ensemble_scores(mu, cov, 32, 0.48)
    for a, b in zip(expected, got, strict=True):
        assert int((a != b).sum()) == 0


@pytest.mark.parametrize("rank", [3, 40])
def test_the_symmetric_root_is_symmetric_and_squares_to_the_covariance(rank):
    """Both forms of symmetric_root (the M × M root when the rank is at least M/2, else its factors)
    give S = Sᵀ with S Sᵀ = Σ to rounding (relative to the largest entry)."""
    from ntkgp.compare.calibration import symmetric_root

    m = 50
    factor = torch.randn(2, m, rank, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = factor @ factor.mT
    left, right = symmetric_root(cov)
    root = left if right is None else left @ right.mT
    assert (right is None) == (2 * rank >= m)
    torch.testing.assert_close(root, root.mT, rtol=0, atol=1e-12 * float(root.abs().max()))
    torch.testing.assert_close(root @ root.mT, cov, rtol=0, atol=1e-12 * float(cov.abs().max()))


def test_the_eigendecompositions_roots_and_draws_stay_within_the_budget(monkeypatch):
    """Every multiply-add of the simulation is counted against DRAW_FLOPS: per step ~10 M³ for eigh, at
    most M³ for the product V_r Λ_r^{1/2} V_rᵀ of an M × M root, and E · M² per ensemble drawn through
    it. The root's product went uncounted, and 152 ensembles were drawn where the budget holds 150."""
    import ntkgp.compare.calibration as calibration

    m, members, steps = 40, 16, 2
    budget = steps * 11 * m**3 + 150 * steps * members * m * m
    monkeypatch.setattr(calibration, "DRAW_FLOPS", budget)
    mu, cov = torch.zeros(steps, m, dtype=torch.float64), torch.eye(m, dtype=torch.float64).expand(steps, m, m)
    draws = perfect_ensemble_scores(mu, cov, members, 0.5)[1].shape[-1]
    assert steps * (11 * m**3 + draws * members * m * m) <= budget
    assert draws == 150


@pytest.mark.parametrize("full_rank_step", [True, False])
def test_the_batched_root_squares_to_each_steps_covariance_whatever_its_own_rank(full_rank_step):
    """symmetric_root keeps the most directions any step needs (the rank is the batch's largest): a step of
    lower rank, one scaled by 1e-30 and an all-zero one still get S Sᵀ = Σ to rounding of their own scale,
    in the M × M form (a full-rank step in the batch) and in the factored one."""
    from ntkgp.compare.calibration import _apply_root, symmetric_root

    m = 40
    generator = torch.Generator().manual_seed(3)

    def of_rank(r: int, scale: float = 1.0) -> torch.Tensor:
        factor = torch.randn(m, r, generator=generator, dtype=torch.float64)
        return scale * factor @ factor.mT / r

    steps = [of_rank(5), of_rank(2), of_rank(1, 1e-30), torch.zeros(m, m, dtype=torch.float64)]
    cov = torch.stack(([of_rank(60)] if full_rank_step else []) + steps)
    left, right = symmetric_root(cov)
    assert (right is None) == full_rank_step
    root = _apply_root(torch.eye(m, dtype=torch.float64).expand(cov.shape[0], m, m), left, right)   # rows S e_i
    for s, c in zip(root, cov, strict=True):
        torch.testing.assert_close(s @ s.mT, c, rtol=0, atol=1e-12 * float(c.abs().max()))
