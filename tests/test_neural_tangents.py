"""Kernel values against neural-tangents 0.6.5 (fixtures made by fixtures/make_nt_kernel_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nt_specs import build, load

SPECS, ARRAYS = load("nt_kernels.npz")
X1 = torch.tensor(ARRAYS["x1"], dtype=torch.float64)
X2 = torch.tensor(ARRAYS["x2"], dtype=torch.float64)


def _rel(a: torch.Tensor, b: np.ndarray, x2: str = "x1") -> float:
    """Relative Frobenius error over the entries where neural-tangents is finite; ours must be finite
    everywhere, and neural-tangents may be NaN only between equal inputs (rows of x1, columns of ``x2``)."""
    a = a.numpy()
    assert np.isfinite(a).all()
    missing = np.isnan(b)
    if missing.any():
        rows, cols = np.nonzero(missing)
        assert (ARRAYS["x1"][rows] == ARRAYS[x2][cols]).all()
    return float(np.linalg.norm(np.where(missing, 0.0, a - b)) / np.linalg.norm(np.where(missing, 0.0, b)))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernels_match_neural_tangents(name):
    """Relative Frobenius error ≤ 1e-8 in float64 (the inputs include a zero vector, a duplicate
    and a parallel pair; neural-tangents' ReLU NTK is itself only good to ~1e-9 at the latter).
    neural-tangents' RectifiedMonomial(2) is NaN between a point and itself (the derivative of its
    arccos at θ = 0) and is compared elsewhere; ntkgp's is finite there (and against quadrature in
    tests/test_activations.py)."""
    net = build(SPECS[name])
    with torch.no_grad():
        cross = net.kernel(X1, X2)
        self_ = net.kernel(X1)
    assert _rel(cross.nngp, ARRAYS[f"{name}/nngp"], "x2") <= 1e-8
    assert _rel(cross.ntk, ARRAYS[f"{name}/ntk"], "x2") <= 1e-8
    assert _rel(self_.nngp, ARRAYS[f"{name}/nngp11"]) <= 1e-8
    assert _rel(self_.ntk, ARRAYS[f"{name}/ntk11"]) <= 1e-8


def test_fixtures_cover_the_required_grid():
    for act in ("relu", "erf"):
        for depth in (1, 2, 3):
            for param in ("ntk", "standard"):
                for bias in ("bias", "nobias"):
                    assert f"{act}_depth{depth}_{param}_{bias}" in SPECS


@pytest.mark.parametrize("name", ["relu_depth3_ntk_bias", "erf_depth2_standard_nobias", "residual_relu", "rbf",
                                  "hermite3", "sigmoid_like", "gabor"])
def test_float32_inputs_stay_close_to_float64_reference(name):
    """Float32 in, float32 out, within float32 accuracy of the float64 reference."""
    net = build(SPECS[name])
    with torch.no_grad():
        k = net.kernel(X1.float(), X2.float())
    assert k.nngp.dtype == torch.float32 and k.ntk.dtype == torch.float32
    assert _rel(k.nngp.double(), ARRAYS[f"{name}/nngp"], "x2") <= 1e-5
    assert _rel(k.ntk.double(), ARRAYS[f"{name}/ntk"], "x2") <= 1e-5
