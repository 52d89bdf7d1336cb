"""What type checkers read: the py.typed marker (PEP 561) and the overloads that narrow the
``Optional`` results of ``Layer.kernel`` and ``monte_carlo_kernel`` (``ntk``) and of the predictors
(``covariance``, ``variance``)."""

from __future__ import annotations

import inspect
import pathlib
import sys
import types
import typing

import numpy as np
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
    # Python 3.11+; on 3.10 its twin tomli, which pytest itself requires there
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
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
            # the same kind, or keyword-only behind a narrowed keyword; the same hint but for the narrowed one
            assert parameter.kind in (original.kind, inspect.Parameter.KEYWORD_ONLY), (name, parameter.name)
            if parameter.name != keyword:
                assert parameter.annotation == original.annotation, (name, parameter.name)
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


def _admits(hint, value) -> bool:
    """Whether ``value`` passes ``hint`` at the top level (a union's members, a generic's origin)."""
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(member, value) for member in typing.get_args(hint))
    if hint is float:   # the numeric tower: ints, numpy floats
        return isinstance(value, int | float)
    return isinstance(value, origin if origin is not None else hint)


def _documented_values():
    """Calls the docstrings document and run time accepts, which the hints refused (a type-checker
    audit): ``(object, parameter, value)``."""
    from ntkgp.bayes import (
        draws_to_inference_data,
        ensemble_to_inference_data,
        gaussian_to_inference_data,
        predictive_moments,
        sample_outputs,
        select_time,
    )
    from ntkgp.compare import CompareConfig, loglog_slope
    from ntkgp.finite import empirical_ntk, train_ensemble
    from ntkgp.predict import gradient_descent_mse

    return [
        (ntkgp.Layer.build, "seed", np.int64(3)),
        (ntkgp.Layer.build, "seed", torch.tensor(3)),
        (ntkgp.Layer.expand_batch, "batch_shape", (2,)),
        (draws_to_inference_data, "seed", np.random.default_rng(0)),
        (ensemble_to_inference_data, "seed", np.random.SeedSequence(1)),
        (gaussian_to_inference_data, "seed", np.random.default_rng(0)),
        (sample_outputs, "seed", np.random.SeedSequence(1)),
        (predictive_moments, "noise", np.full(4, 0.1)),
        (predictive_moments, "time_index", np.intp(2)),
        (select_time, "time_index", torch.tensor(2)),
        (loglog_slope, "values", np.ones(3)),
        (CompareConfig, "device", torch.device("cpu")),
        (CompareConfig, "activation", ntkgp.Erf(a=2.0)),   # "as ntkgp.mlp takes them": a name or a layer
        (CompareConfig, "widths", [32, 64]),
        (train_ensemble, "record_steps", np.arange(3)),
        (gradient_descent_mse, "diag_reg", torch.tensor(0.1, requires_grad=True)),
        (empirical_ntk, "params", {"weight": torch.nn.Parameter(torch.zeros(1))}),
        (predict.GradientFlow.predict, "steps", np.int64(10)),
        # kernel="ntk" predicts the training points for x_test=None, as GradientFlow.predict does
        (predict.gp_posterior, "x_test", None),
        (predict.GPPosterior.predict, "x_test", None),
        (ntkgp.Polynomial.__init__, "coefficients", np.array([0.0, 1.0, 0.5])),
        (ntkgp.Polynomial.__init__, "coefficients", torch.tensor([0.0, 1.0, 0.5])),
        (predict.gradient_descent, "t", np.array([1.0, 2.0])),
        (predict.gradient_descent, "steps", np.arange(3)),
        # one noise (diag_reg) per training point, "an (N,) tensor, array or list"
        (predict.gp_posterior, "noise", np.full(4, 0.1)),
        (predict.GPPosterior.__init__, "noise", [0.1, 0.2]),
        (predict.gradient_flow, "diag_reg", [0.1, 0.2]),
        (predict.GradientFlow.__init__, "diag_reg", np.full(4, 0.1)),
        (gradient_descent_mse, "diag_reg", [0.1, 0.2]),
    ]


def test_hints_admit_what_the_docstrings_document():
    """With py.typed shipped, a hint narrower than the documented inputs makes users' type checkers
    refuse correct calls (seed=np.int64(3), noise as a numpy array, a numpy time index, ...)."""
    for function, name, value in _documented_values():
        hint = typing.get_type_hints(function, localns={"Tensor": Tensor})[name]   # ntkgp.bayes: torch-free
        assert _admits(hint, value), (function.__qualname__, name, hint, type(value))
    assert typing.get_type_hints(ntkgp.finite.empirical_ntk)["return"] is Tensor   # the decorator keeps its type
