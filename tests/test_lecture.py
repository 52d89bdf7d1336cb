"""The exercises of the lecture notes (shared/lecture/ntk-lecture.md) as tests."""

from __future__ import annotations

import math

import pytest
import torch

import ntkgp
from ntkgp.finite import empirical_ntk

pytestmark = pytest.mark.usefixtures("float64_default")


def test_tangent_kernel_of_linear_regression_is_x_dot_x_plus_one():
    """f(w, b, x) = wᵀx + b  ⇒  Θ(x, x') = xᵀx' + 1, at any (w, b)."""
    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    expected = x1 @ x2.T + 1
    for seed in (0, 1):  # any parameter values
        model = ntkgp.Dense(1, weight_var=1.7, bias_var=0.3, parameterization="standard").build(4, seed=seed)
        torch.testing.assert_close(empirical_ntk(model, x1, x2), expected)
    # the infinite-width standard-parameterization NTK of one Dense layer is the same kernel
    analytic = ntkgp.Dense(1, 1.7, 0.3, "standard").kernel(x1, x2).ntk.detach()
    torch.testing.assert_close(analytic, expected)


def test_tangent_kernel_of_the_sine_toy_model():
    """f(W, x) = A sin(kx): Θ(x, x') = sin(kx) sin(kx') + A² x x' cos(kx) cos(kx')."""

    def f(params, x):
        return params["A"] * torch.sin(params["k"] * x[:, 0])

    A, k = torch.tensor(1.3), torch.tensor(0.7)
    x = torch.tensor([[1.0], [2.0]])  # the lecture's dataset {(1, 1), (2, 0)}
    theta = empirical_ntk(f, x, params={"A": A, "k": k})
    s, c, xs = torch.sin(k * x[:, 0]), torch.cos(k * x[:, 0]), x[:, 0]
    expected = torch.outer(s, s) + A**2 * torch.outer(xs * c, xs * c)
    torch.testing.assert_close(theta, expected)


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("act", ["relu", "erf", "gelu", "abs", "sin", "tanh"])
def test_every_tangent_kernel_is_positive_semidefinite(param, act):
    torch.manual_seed(0)
    x = torch.randn(12, 3)
    x[3] = x[7]  # a duplicate makes the kernel singular, still PSD
    net = ntkgp.mlp(2, act, 1.6, 0.1, width=32, out_dim=2, parameterization=param)
    with torch.no_grad():
        analytic = net.kernel(x).ntk
    empirical = empirical_ntk(net.build(in_features=3, seed=1), x, vector_output=True)
    # the full (n·k × n·k) empirical kernel of the vector-valued network
    full = empirical.permute(0, 2, 1, 3).reshape(24, 24)
    for mat in (analytic, full):
        eig = torch.linalg.eigvalsh(mat)
        assert float(eig.min()) >= -1e-10 * float(eig.max())


def test_kernel_depends_on_norms_and_angle_only():
    """Σ^l(x, x') is invariant under a rotation of both inputs."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    net = ntkgp.mlp(3, "relu", 2.0, None)
    with torch.no_grad():
        a, b = net.kernel(x), net.kernel(x @ q)
    torch.testing.assert_close(a.nngp, b.nngp)
    torch.testing.assert_close(a.ntk, b.ntk)


def test_infinite_width_ntk_is_block_diagonal_in_outputs():
    """Θ_ij → δ_ij Θ: the off-diagonal output blocks of the empirical NTK shrink as 1/sqrt(width)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    ratios = []
    for width in (64, 4096):
        net = ntkgp.mlp(1, "erf", 1.5, 0.1, width=width, out_dim=2)
        theta = empirical_ntk(net.build(in_features=3, seed=0, ensemble_size=16), x, vector_output=True)
        off = theta[..., 0, 1].flatten(1).norm(dim=1)
        on = theta.diagonal(dim1=-2, dim2=-1).flatten(1).norm(dim=1)
        ratios.append(float((off / on).mean()))
    assert ratios[1] < ratios[0] / 4  # 1/sqrt(width) predicts a factor 8
    assert math.isfinite(ratios[1])
