"""Results follow the inputs' device, not torch's default device (``torch.set_default_device``).

A user who sets the default device to CUDA and passes CPU tensors (or the reverse) must get
the same numbers as without it. Here the default device is ``meta`` while the inputs are on
the CPU: a tensor the code makes on the default device instead of the inputs' is a meta tensor,
and adding it to a CPU tensor, reading it (``bool``, ``float``) or copying it raises. That finds,
without a GPU, what ``set_default_device("cuda")`` breaks: random draws from a CPU generator on
the default device ("Expected a 'cuda' device type for generator") failed ``net.build``, every
Cholesky-based prediction and ``sample_outputs``.

Networks and GPyTorch objects are built before the default device is changed: GPyTorch's
constraints put their bounds on the default device (its convention for modules, as torch's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ntkgp
from ntkgp import bayes, finite, predict
from ntkgp.compare.datasets import circle_dataset, sin_dataset
from ntkgp.compare.harness import CompareConfig, run_comparison
from ntkgp.models import NetworkGP, fit

g = torch.Generator().manual_seed(0)
X = torch.randn(12, 3, generator=g, dtype=torch.float64)
Y = torch.sin(X.sum(-1))
XT = torch.randn(7, 3, generator=g, dtype=torch.float64)
NET = ntkgp.serial(ntkgp.Dense(32, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(32, 1.5, 0.1),
                   ntkgp.residual(ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(32, 1.5, 0.05))),
                   ntkgp.LayerNorm(), ntkgp.Dense(1, 1.5, 0.1)).double()
K, KT = NET.kernel(X).ntk, NET.kernel(XT, X).ntk
GP_KERNEL = ntkgp.NTKKernel(NET)
POSTERIOR = predict.gp_posterior(NET, X, Y, XT, kernel="nngp", noise=1e-3)
TIMES = torch.tensor([0.5, 5.0], dtype=torch.float64)
DENSE = ntkgp.Dense(1, 1.0, 0.1).double()


def _set_variance():
    # a number set as a variance became a tensor on the default device: "Tensor.item() cannot be called
    # on meta tensors"
    DENSE.weight_var = 2.5
    return DENSE.kernel(X).nngp


def _fit_network_gp():
    with torch.device("cpu"):   # GPyTorch's constraints are built on the default device
        model = NetworkGP(X, Y, ntkgp.mlp(1, "relu", 2.0, 0.1).double(), kernel="ntk")
    fit(model, steps=3)
    model.eval()
    return model(XT).mean


def _compare(widths=(8, 16)):
    result = run_comparison(sin_dataset(), CompareConfig(widths=widths, ensemble_size=4, record_steps=(0, 3),
                                                         dtype="float64", chunk_size=2, divergence_check=False,
                                                         device="cpu"))
    values = torch.tensor([w.ensemble_mean for w in result.widths] + [result.analytic_mean], dtype=torch.float64,
                          device="cpu")
    if result.calibration is None:
        return values
    return values, torch.tensor([result.calibration["mean_fail"], result.calibration["var_fail"]],
                                dtype=torch.float64, device="cpu")


CALLS = {
    "kernel": lambda: NET.kernel(X, XT).ntk,
    "kernel diag": lambda: NET.kernel(X, diag=True).nngp,
    "kernel gradient": lambda: torch.autograd.grad(NET.kernel(X).ntk.sum(), list(NET.parameters())),
    "NTKKernel": lambda: GP_KERNEL(X, XT).to_dense(),
    "gradient_flow t list": lambda: predict.gradient_flow(NET, X, Y, XT, t=[0.5, 5.0]).covariance,
    "gradient_flow steps": lambda: predict.gradient_flow(NET, X, Y, XT, steps=3, learning_rate=0.1).mean,
    "gradient_flow converged": lambda: predict.gradient_flow(NET, X, Y, XT).mean,
    "GradientFlow": lambda: predict.GradientFlow(NET, X, Y, kernel="nngp").predict(XT, t=TIMES).covariance,
    "gp_posterior": lambda: predict.gp_posterior(NET, X, Y, XT, kernel="ntk", noise=1e-3).covariance,
    "gradient_descent_mse": lambda: predict.gradient_descent_mse(K, Y, fx_train_0=0.0, ntk_test_train=KT,
                                                                 fx_test_0=0.0, t=[1.0, 2.0], diag_reg=1e-4)[1],
    "max_learning_rate": lambda: torch.tensor(predict.max_learning_rate(K, Y.numel()), dtype=torch.float64,
                                              device="cpu"),
    "build": lambda: NET.build(3, seed=0, dtype=torch.float64)(X),
    # a deferred first layer drew its weights on the default device, the other layers on the CPU
    "build deferred": lambda: NET.build(seed=0, dtype=torch.float64)(X),
    "build ensemble": lambda: NET.build(3, seed=1, ensemble_size=3, dtype=torch.float64)(X),
    "empirical_ntk": lambda: finite.empirical_ntk(NET.build(3, seed=2, dtype=torch.float64), X, XT),
    "monte_carlo_kernel": lambda: finite.monte_carlo_kernel(NET, X, n_samples=4).ntk,
    "train_ensemble": lambda: finite.train_ensemble(NET, X, Y, ensemble_size=4, learning_rate=0.1, record_steps=[0, 5],
                                                    x_test=XT, probe=X[:3], device="cpu",
                                                    dtype=torch.float64).test_outputs,
    "sin_dataset": lambda: sin_dataset().y_train,
    "circle_dataset": lambda: circle_dataset().x_test,
    "sample_outputs": lambda: torch.as_tensor(np.asarray(bayes.sample_outputs(POSTERIOR, num_draws=5, seed=0)),
                                              device="cpu"),
    "one_hot_targets": lambda: bayes.one_hot_targets(torch.tensor([0, 2, 1, 2], device="cpu")),
    "NetworkGP fit": _fit_network_gp,
    "set a variance": _set_variance,
    "compare": _compare,
    # a width checked point-wise: the checks' calibration draws exact ensembles from a CPU generator
    "compare calibrated": lambda: _compare(widths=(256,)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_the_default_device_is_not_used(name):
    expected = CALLS[name]()
    with torch.device("meta"):
        got = CALLS[name]()
    for e, r in zip(*(x if isinstance(x, tuple) else (x,) for x in (expected, got)), strict=True):
        assert r.device.type == "cpu", r.device
        # the same computation on the same device; a few ulps of room for BLAS kernels that round by alignment
        torch.testing.assert_close(r, e, rtol=1e-12, atol=1e-13)


def test_a_network_on_the_meta_device_is_refused_by_name():
    """A network moved with .to("meta") holds its variances' shapes but no values: its kernels and
    builds failed with torch's "Cannot copy out of meta tensor; no data!", printing it and building
    one under torch.device("meta") (or with a meta variance) with "Tensor.item() cannot be called on
    meta tensors". A network on the CPU still builds on the meta device (shapes only)."""
    net = ntkgp.mlp(1, "erf", 2.0, 0.1).double().to("meta")
    for call in (lambda: net.kernel(X), lambda: net.build(3, seed=0), lambda: net.build(3, seed=0, device="meta"),
                 lambda: ntkgp.NTKKernel(net)(X, XT).to_dense()):
        with pytest.raises(ValueError, match=r"^Dense's weight_var is on the meta device, .* a real device"):
            call()
    assert "weight_var=<meta, shape ()>, bias_var=<meta, shape ()>" in repr(net)
    with torch.device("meta"), pytest.raises(ValueError, match=r"^Dense cannot be built under torch\.device\('meta'\)"):
        ntkgp.Dense(3, 2.0)
    with pytest.raises(ValueError, match=r"^weight_var is on the meta device"):
        ntkgp.Dense(3, torch.tensor(2.0, device="meta"))
    assert NET.build(3, seed=0, device="meta", dtype=X.dtype)(X.to("meta")).shape == (12, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_build_names_a_device_this_torch_cannot_use():
    """net.build(device="cuda") without CUDA raised torch's AssertionError from inside the first draw,
    an invalid name a RuntimeError; train_ensemble and ntkgp compare already said so by name."""
    net = ntkgp.mlp(1, "erf")
    with pytest.raises(ValueError, match="CUDA is not available"):
        net.build(in_features=2, device="cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        net.build(in_features=2, device="cuda:x")
    assert next(net.build(in_features=2, device=torch.device("cpu")).parameters()).device.type == "cpu"
