"""Input gradients of the kernels at the points a BoTorch acquisition optimizer meets.

BoTorch optimizes acquisition functions by gradients in the candidate ``x``, through the posterior
mean and variance, i.e. through ``K(x, X_train)``, ``K(x, x)`` and their NTK counterparts. Here the
autograd gradient of each (random projection of a) kernel is compared with central differences at
the special candidates: a generic point, ``x`` equal to a training point bitwise, ``x = 0``, ``x``
parallel (``2.5 X[2]``) and antiparallel (``−X[2]``) to a training point, a tiny (``1e-8 X[2]``) and
a huge (``1e4 ·`` generic) input, for every closed-form activation and the combinators, with and
without bias.

Measured (float64, Richardson-extrapolated central differences, 3 random directions): wherever the
kernels are differentiable, autograd and the differences agree to < 1e-6 relative (typically
1e-9; ``Numerical(tanh)`` 5e-5, its quadrature). What is left are genuine non-differentiable points,
documented and checked separately below:

* **cone kinks at ``x ∥ X[i]``** (``x == X[i]``; without bias also ``c·X[i]``, ``c ≠ 0``): the ReLU
  family's ``Ṫ ∝ π − θ`` (NTK) and the step-like activations' ``T ∝ arcsin`` (``Sign``,
  ``RectifiedMonomial(0)``, NNGP and NTK) grow as ``|δ⊥|`` away from the line through ``X[i]``.
  The one-sided slopes differ by O(1); autograd returns their average (``safe_sqrt``'s zero
  derivative at ``s = 0``: the ``|δ⊥|`` term contributes nothing), which is what a central difference
  converges to, with an O(h) error (measured 2.5e-3 at h = 1e-5 for ``Sign``, 3e-6 for ReLU's NTK).
* **``x = 0`` without bias**: the kernels of homogeneous activations are homogeneous in ``x``
  (``ReLU``: degree 1; ``Sign``: degree 0), not linear, so no gradient exists; autograd returns a
  finite value (the one at ``θ = π/2``). Only finiteness is asserted. ``LayerNorm`` without bias at
  ``x = 0`` is differentiable only thanks to ``eps = 1e-12``: its kernels change on the scale
  ``|x| ~ sqrt(eps) = 1e-6``, so the differences there take a step of 1e-9 (with 1e-5 they read
  0.15–0.85 off, a secant, not an error of autograd).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import ntkgp

pytestmark = pytest.mark.usefixtures("float64_default")

D = ntkgp.Dense
ACTIVATIONS = {
    "relu": ntkgp.ReLU, "leaky_relu": lambda: ntkgp.LeakyReLU(0.2), "abrelu": lambda: ntkgp.ABReLU(-0.4, 1.3),
    "abs": ntkgp.Abs, "erf": ntkgp.Erf, "erf_shifted": lambda: ntkgp.Erf(1.3, 0.7, 0.2),
    "sigmoid_like": ntkgp.SigmoidLike, "gelu": ntkgp.GELU, "sin": lambda: ntkgp.Sin(1.2, 0.8, 0.3),
    "cos": ntkgp.Cos, "rbf": lambda: ntkgp.Rbf(0.7), "gabor": ntkgp.Gabor, "exp": lambda: ntkgp.Exp(1.0, 0.3),
    "gaussian": ntkgp.Gaussian, "sign": ntkgp.Sign, "polynomial": lambda: ntkgp.Polynomial([0.3, -1, 0.5, 0.2]),
    "monomial": lambda: ntkgp.Monomial(2), "hermite": lambda: ntkgp.Hermite(3),
    **{f"rectified_monomial_{n}": (lambda n=n: ntkgp.RectifiedMonomial(n)) for n in range(4)},
    "identity": ntkgp.Identity,
}


def _network(name: str, b: float | None) -> ntkgp.Layer:
    if name in ACTIVATIONS:
        act = ACTIVATIONS[name]
        return ntkgp.serial(D(8, 1.5, b), act(), D(8, 1.5, b), act(), D(1, 1.5, b))
    return {
        "layernorm_after_dense": lambda: ntkgp.serial(D(8, 1.5, b), ntkgp.LayerNorm(), ntkgp.ReLU(), D(8, 1.5, b),
                                                      ntkgp.ReLU(), D(1, 1.5, b)),
        "layernorm_after_erf": lambda: ntkgp.serial(D(8, 1.5, b), ntkgp.Erf(), ntkgp.LayerNorm(), D(8, 1.5, b),
                                                    ntkgp.Erf(), D(1, 1.5, b)),
        "layernorm_after_relu": lambda: ntkgp.serial(D(8, 1.5, b), ntkgp.ReLU(), ntkgp.LayerNorm(), D(1, 1.5, b)),
        "residual_relu": lambda: ntkgp.serial(D(8, 1.5, b), ntkgp.residual(ntkgp.serial(ntkgp.ReLU(), D(8, 1.5, b))),
                                              ntkgp.ReLU(), D(1, 1.5, b)),
        "residual_erf": lambda: ntkgp.serial(D(8, 1.5, b), ntkgp.residual(ntkgp.serial(ntkgp.Erf(), D(8, 1.5, b))),
                                             ntkgp.Erf(), D(1, 1.5, b)),
        "product": lambda: ntkgp.serial(D(8, 1.5, b), ntkgp.parallel(ntkgp.ReLU(), ntkgp.serial(D(8, 0.9, b),
                                                                                                ntkgp.Erf()),
                                                                     join="prod"), D(1, 1.5, b)),
    }[name]()


STRUCTURES = ("layernorm_after_dense", "layernorm_after_erf", "layernorm_after_relu", "residual_relu",
              "residual_erf", "product")
#: ``Ṫ ∝ π − θ`` (ReLU family) or ``T ∝ arcsin`` (step-like): cone kinks along the line through a training point.
CONE_KINKED = {"relu", "leaky_relu", "abrelu", "abs", "sign", "rectified_monomial_0", "rectified_monomial_1",
               "layernorm_after_dense", "layernorm_after_relu", "residual_relu", "product"}
#: Without bias, kernels homogeneous of degree ≤ 1 in ``x`` and not odd: no gradient at ``x = 0``.
NOT_DIFFERENTIABLE_AT_ZERO = {"relu", "leaky_relu", "abrelu", "sign", "rectified_monomial_0", "rectified_monomial_1",
                              "layernorm_after_dense", "layernorm_after_relu", "residual_relu", "product"}

_g = torch.Generator().manual_seed(0)
X = torch.randn(5, 3, generator=_g, dtype=torch.float64)
GENERIC = torch.randn(3, generator=_g, dtype=torch.float64)
DIRECTIONS = torch.nn.functional.normalize(torch.randn(2, 3, generator=_g, dtype=torch.float64), dim=1)
WEIGHTS = torch.randn(2, 5, generator=_g, dtype=torch.float64)
POINTS = {"generic": GENERIC, "training_point": X[2].clone(), "zero": torch.zeros(3, dtype=torch.float64),
          "parallel": 2.5 * X[2], "antiparallel": -X[2], "tiny": 1e-8 * X[2], "huge": 1e4 * GENERIC}
#: points on the line through X[2]: where CONE_KINKED kernels have their kink (with a bias only X[2] itself)
ON_THE_LINE = {"training_point", "parallel", "antiparallel", "tiny"}


def _projections(net: ntkgp.Layer) -> dict[str, callable]:
    """Scalar functions of one candidate ``x``: random projections of the cross kernels against the
    training points (what the posterior mean and variance contract them with) and the diagonal."""
    def cross(x):   # NNGP and NTK in one projection (each alone: the same results, twice the time)
        k = net.kernel(x.unsqueeze(0), X)
        return (k.nngp[0] * WEIGHTS[0]).sum() + (k.ntk[0] * WEIGHTS[1]).sum()

    def diag(x):
        k = net.kernel(x.unsqueeze(0), diag=True)
        return (k.nngp + 0.7 * k.ntk).sum()

    return {"cross": cross, "diag": diag}


def _step(x: torch.Tensor, point: str, name: str, b: float | None, kink: bool) -> float:
    norm = float(x.norm())
    if point == "zero" and b is None and name.startswith("layernorm"):
        return 1e-10   # LayerNorm's eps = 1e-12 sets a scale |x| ~ 1e-6 (module docstring)
    # without bias the kernels vary on the scale of |x| itself. At a kink a larger step: autograd's
    # average of the one-sided slopes (which differ by O(1)) is approached by central differences with
    # an O(h) error, while the values near the line round as ε/θ ~ ε/h (θ from 1 − cos θ): at
    # h = 1e-7 that noise alone read 5e-3, at h = 1e-5 both stay below 2.5e-3 (Sign, measured)
    return (1e-5 if kink else 1e-6) * (norm if 0 < norm < 1e-3 else max(1.0, norm))


def _compare_size(f, x: torch.Tensor, h: float) -> float:
    with torch.no_grad():
        return max(abs(float(f(x + s * h * v))) for v in DIRECTIONS for s in (1, -1))


def _compare(f, x: torch.Tensor, h: float, rtol: float = 1e-6) -> tuple[float, float]:
    """(largest |autograd − central difference| over the directions, its tolerance: ``rtol`` of the
    largest difference plus the differences' rounding ``~ε|f|/h``)."""
    xg = x.clone().requires_grad_(True)
    value = f(xg)
    (grad,) = torch.autograd.grad(value, xg)
    assert torch.isfinite(grad).all(), grad
    worst, scale, size = 0.0, 0.0, abs(float(value.detach()))
    with torch.no_grad():
        for v in DIRECTIONS:
            up, down = float(f(x + h * v)), float(f(x - h * v))
            difference = (up - down) / (2 * h)
            worst = max(worst, abs(float(grad @ v) - difference))
            scale, size = max(scale, abs(difference)), max(size, abs(up), abs(down))
    # truncation O(h²) ~ 1e-12 relative; rounding of values that pass through tens of operations,
    # ~100 ε |f| / h (kernels of 1e-58 at tiny inputs without bias, exact zeros at x = 0)
    return worst, rtol * scale + 1e-12 * size / h


@pytest.mark.parametrize("b", [0.1, None], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", [*ACTIVATIONS, *STRUCTURES])
def test_input_gradients_match_differences_at_special_points(name, b):
    net = _network(name, b)
    failures = []
    for point, x in POINTS.items():
        if name == "exp" and point == "huge":
            continue   # refused with a ValueError: exp(b²k) overflows float64 (test_edge_values)
        for label, f in _projections(net).items():
            kink = name in CONE_KINKED and (point == "training_point" or (b is None and point in ON_THE_LINE))
            h = _step(x, point, name, b, kink)
            if point == "zero" and b is None and name in NOT_DIFFERENTIABLE_AT_ZERO:
                xg = x.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(f(xg), xg)
                assert torch.isfinite(grad).all(), (point, label)   # no gradient exists; a finite value is returned
                continue
            # kinks: the one-sided slopes differ by 40–2000 times the gradient (measured), the O(h) error of
            # the central difference is ≤ 2.4e-2 relative (Sign without bias, its arcsin cone; ReLU's 3e-6)
            error, tolerance = _compare(f, x, h, rtol=5e-2 if kink else 1e-6)
            if point == "zero" and b is None:
                # kernels homogeneous of degree ≥ 2 in x (RectifiedMonomial(2), Monomial): gradient 0,
                # central differences (g(v) − g(−v)) h/2 = O(|f(±h)|/h)
                tolerance += _compare_size(f, x, h) / h
            if not error <= tolerance:
                failures.append((point, label, error, tolerance))
    assert not failures, failures


def test_relu_ntk_at_a_training_point_is_a_kink_whose_gradient_is_the_average_slope():
    """The documented kink: along a direction off the line through ``X[2]`` the NTK's one-sided
    slopes at ``x = X[2]`` differ by O(1), and autograd returns their mean."""
    net = _network("relu", 0.1)
    x, v, h = X[2].clone(), DIRECTIONS[0], 1e-5

    def ntk(y):
        return net.kernel(y.unsqueeze(0), X).ntk[0, 2]

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ntk(xg), xg)
    with torch.no_grad():
        forward = float(ntk(x + h * v) - ntk(x)) / h
        backward = float(ntk(x) - ntk(x - h * v)) / h
    assert abs(forward - backward) > 0.1 * max(abs(forward), abs(backward))
    # O(h) from the kink, as in the sweep above (3e-6 measured)
    assert float(grad @ v) == pytest.approx((forward + backward) / 2, rel=1e-3)


def test_numerical_activation_input_gradients_to_quadrature_accuracy():
    """``Numerical(tanh)``: its gradients are quadratures of ``φ'``, ``φ''`` (Price's theorem), of the
    same adaptive degree as the values but not their exact derivatives: measured 5e-5 relative at
    most over the special points (1e-6 for the NNGP), hence 1e-3 here."""
    net = ntkgp.serial(D(8, 1.5, 0.1), ntkgp.Numerical(torch.tanh), D(1, 1.5, 0.1))
    for point in ("generic", "training_point"):
        x = POINTS[point]
        for label, f in _projections(net).items():
            error, tolerance = _compare(f, x, 1e-5, rtol=1e-3)
            assert error <= tolerance, (point, label, error, tolerance)


def _botorch_model(act, b):
    botorch = pytest.importorskip("botorch")
    from botorch.models.transforms import Standardize

    g = torch.Generator().manual_seed(1)
    train_x = torch.rand(8, 3, generator=g, dtype=torch.float64)
    train_y = torch.sin(3 * train_x).sum(-1, keepdim=True) + 0.05 * torch.randn(8, 1, generator=g, dtype=torch.float64)
    net = ntkgp.serial(D(8, 1.5, b), act(), D(8, 1.5, b), act(), D(1, 1.5, b))
    model = botorch.models.SingleTaskGP(train_x, train_y, covar_module=ntkgp.NTKKernel(net),
                                        outcome_transform=Standardize(1))
    model.likelihood.noise = 1e-3
    return model.eval(), train_x, train_y


@pytest.mark.parametrize("activation", ["erf", "gelu", "relu"])
def test_botorch_posterior_gradients_at_a_training_point(activation):
    """End to end: ``posterior(x).mean`` and ``.variance`` of a ``SingleTaskGP`` with an NTK kernel,
    differentiated in ``x`` at a training point and a generic point. Smooth activations agree
    with central differences to 1e-6 (measured < 1e-8); ReLU has the NTK's cone kink at a training
    point, where autograd returns the average slope (central differences: 3e-5 and 1.2e-3 off at
    h = 1e-5, O(h) plus the values' rounding near the kink; hence 1e-2, while the one-sided slopes
    differ by 40–140 times the gradient there)."""
    model, train_x, _ = _botorch_model(ACTIVATIONS[activation], 0.1)
    for x, kinked in ((train_x[2].clone(), activation == "relu"), (torch.full((3,), 0.37, dtype=torch.float64), False)):
        for what in ("mean", "variance"):
            def f(y, what=what):
                return getattr(model.posterior(y.reshape(1, 3)), what).sum()

            error, tolerance = _compare(f, x, 1e-5, rtol=1e-2 if kinked else 1e-6)
            assert error <= tolerance, (what, error, tolerance)


def test_botorch_optimize_acqf_returns_finite_candidates_without_nan_warnings():
    botorch = pytest.importorskip("botorch")
    model, train_x, train_y = _botorch_model(ntkgp.Erf, 0.1)
    acquisition = botorch.acquisition.LogExpectedImprovement(model, best_f=model.outcome_transform(train_y)[0].max())
    bounds = torch.stack([torch.zeros(3), torch.ones(3)]).to(torch.float64)
    # two of the starting points are training points, where the posterior variance has its minimum
    start = torch.cat([train_x[:2].unsqueeze(1), torch.rand(2, 1, 3, generator=torch.Generator().manual_seed(3),
                                                             dtype=torch.float64)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        candidate, value = botorch.optim.optimize_acqf(acquisition, bounds, q=1, num_restarts=4, raw_samples=32,
                                                       batch_initial_conditions=start)
    assert torch.isfinite(candidate).all() and math.isfinite(float(value))
    assert not [w for w in caught if "nan" in str(w.message).lower()], [str(w.message) for w in caught]
