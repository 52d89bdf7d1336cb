"""What type checkers read: the py.typed marker (PEP 561) and the overloads that narrow the
``Optional`` results of ``Layer.kernel`` and ``monte_carlo_kernel`` (``ntk``) and of the predictors
(``covariance``, ``variance``)."""

from __future__ import annotations

import inspect
import pathlib
import typing

import pytest
import torch
from torch import Tensor

import ntkgp
from ntkgp import predict
from ntkgp.finite import KernelEstimate, monte_carlo_kernel
from ntkgp.layers.state import KernelState
from ntkgp.predict.gaussian import Gaussian

ROOT = pathlib.Path(__file__).parents[1]


def test_the_package_ships_its_py_typed_marker():
    """Without the marker mypy skips ntkgp ("module is installed, but missing library stubs or py.typed
    marker") and reads every ntkgp object as Any."""
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["ntkgp"]
    assert (pathlib.Path(ntkgp.__file__).parent / "py.typed").is_file()


def _net():
    return ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(1, 1.5, 0.1))


def _overloaded():
    """Each overloaded public callable, a call of it with the narrowed keyword set to a value, and the
    keyword's name."""
    net = _net()
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
    y = torch.sin(x.sum(-1))
    return {
        "Layer.kernel": (ntkgp.Layer.kernel, lambda v: net.kernel(x, ntk=v), "ntk"),
        "monte_carlo_kernel": (monte_carlo_kernel, lambda v: monte_carlo_kernel(net, x, n_samples=2, ntk=v), "ntk"),
        "gradient_flow": (predict.gradient_flow, lambda v: predict.gradient_flow(net, x, y, x, t=1.0, compute_cov=v),
                          "compute_cov"),
        "GradientFlow.predict": (predict.GradientFlow.predict,
                                 lambda v: predict.GradientFlow(net, x, y).predict(x, t=1.0, compute_cov=v),
                                 "compute_cov"),
        "gp_posterior": (predict.gp_posterior, lambda v: predict.gp_posterior(net, x, y, x, noise=0.1, compute_cov=v),
                         "compute_cov"),
        "GPPosterior.predict": (predict.GPPosterior.predict,
                                lambda v: predict.GPPosterior(net, x, y, noise=0.1).predict(x, compute_cov=v),
                                "compute_cov"),
    }


def _literal_value(hint):
    """The one value of ``Literal[value]``, or ``None`` for the fallback overload's plain hint."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Literal else None


@pytest.mark.parametrize("name", list(_overloaded()))
def test_overloads_have_the_implementation_s_parameters_and_tell_the_truth(name):
    """The overloads are written out beside the implementation: each must keep its parameters (names,
    defaults, order; a narrowed one may be keyword-only without a default), and the types it returns
    must be what the call returns: ``None`` exactly where the result holds ``None``."""
    if not hasattr(typing, "get_overloads"):
        pytest.skip("typing.get_overloads needs Python 3.11")
    function, call, keyword = _overloaded()[name]
    overloads = typing.get_overloads(getattr(function, "__wrapped__", function))
    implementation = inspect.signature(function)
    assert len(overloads) >= 3
    fallback = 0
    for overload in overloads:
        signature = inspect.signature(overload)
        assert list(signature.parameters) == list(implementation.parameters), name
        for parameter, original in zip(signature.parameters.values(), implementation.parameters.values(), strict=True):
            if parameter.default is not inspect.Parameter.empty or parameter.name != keyword:
                assert parameter.default == original.default, (name, parameter.name)
        hints = typing.get_type_hints(overload)
        value = _literal_value(hints[keyword])
        if value is None:   # the fallback: the implementation's hints, for a value known at run time only
            fallback += 1
            assert hints == typing.get_type_hints(function), name
            continue
        result = call(value)
        declared = typing.get_args(hints["return"])
        if name == "Layer.kernel":
            assert isinstance(result, KernelState)
            assert (result.ntk is None) == (declared == (type(None),)), (name, value)
            assert isinstance(result.nngp, Tensor) and isinstance(result.cov1, Tensor)
        elif name == "monte_carlo_kernel":
            assert isinstance(result, KernelEstimate)
            expected = declared == (type(None),)
            assert (result.ntk is None) == (result.ntk_sem is None) == expected, (name, value)
        else:
            assert isinstance(result, Gaussian)
            assert [result.covariance is None, result.variance is None] == [d is type(None) for d in declared], \
                (name, value)
            assert isinstance(result.mean, Tensor)
    assert fallback == 1, name
