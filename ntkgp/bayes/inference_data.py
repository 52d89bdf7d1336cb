r"""Export of predictive draws to ArviZ (``InferenceData`` on ArviZ 0.x, ``DataTree`` on 1.x).

Given ``S`` draws ``f⁽ˢ⁾`` of the noise-free outputs at ``M`` points (``(M,)`` or ``(M, k)``
each), observed targets ``y`` and a Gaussian observation-noise variance ``σ²``, the exported
groups are

* ``posterior``: ``f`` with dims ``(chain, draw, obs_id[, output])``, the latent draws;
* ``posterior_predictive``: ``y`` with the same dims, ``y_rep⁽ˢ⁾ = f⁽ˢ⁾ + σ ε⁽ˢ⁾``,
  ``ε ~ N(0, I)`` (Rasmussen & Williams 2006, eq. 2.22–2.24: the predictive distribution of a
  noisy target adds the noise variance to the latent one);
* ``log_likelihood``: ``y`` with the same dims, the pointwise log density of each observed
  entry under each draw::

      log p(y_i | f_i⁽ˢ⁾) = −½ log(2π σ_i²) − (y_i − f_i⁽ˢ⁾)² / (2 σ_i²)

* ``observed_data``: ``y`` with dims ``(obs_id[, output])``.

The ``S`` draws are independent, so they are split into ``num_chains`` equal chains only for
the ``(chain, draw)`` layout ArviZ expects; with one chain ArviZ's PSIS-LOO takes the relative
efficiency ``r_eff = 1``, which is exact for independent draws. This is what ``az.loo``
(Vehtari, Gelman & Gabry 2017, PSIS-LOO), ``az.plot_ppc`` (``az.plot_ppc_dist`` on ArviZ 1.x),
``az.loo_pit`` / ``az.plot_loo_pit`` (Gelman et al. 2013, §6.3; Säilynoja, Bürkner & Vehtari
2022) and calibration checks read. With ``(M, k)``
targets every entry ``(i, c)`` is one pointwise term; sum ``log_likelihood["y"]`` over
``output`` to treat rows as observations.

Only numpy and ArviZ are needed here (no torch). The ArviZ major version decides the
constructor: ``arviz.from_dict(posterior=..., ...)`` (0.x) or ``arviz_base.from_dict({group:
...})`` (1.x, the ``arviz-base`` package, returning an ``xarray.DataTree``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from ntkgp._typing import ArrayLike
from ntkgp.bayes._arrays import broadcast_per_point, finite, integer_at_least, no_booleans, observations

#: Names of the dimensions of the exported variables (after ``chain`` and ``draw``).
OBS_DIM, OUTPUT_DIM = "obs_id", "output"


def gaussian_log_density(y: ArrayLike, mean: ArrayLike, variance: ArrayLike) -> np.ndarray | float:
    r"""Elementwise ``log N(y | mean, variance) = −½ log(2π variance) − (y − mean)² / (2 variance)``.

    Arguments broadcast against each other (numpy rules); ``variance`` must be positive. An array,
    or a float (``numpy.float64``) when all three are scalars.

    A 1-D argument against ``(M, k)`` values is ambiguous when ``M == k``, and refused there: numpy
    aligns it with the ``k`` outputs, while the ``(M,)`` variance of
    :func:`~ntkgp.bayes.predictive_moments` (and of :mod:`ntkgp.bayes.metrics`) is one per point,
    and with ``M ≠ k`` such a variance is refused by numpy rather than read per output. Pass
    ``(M, 1)`` for one value per point, ``(1, k)`` for one per output.
    """
    no_booleans(y, "y")
    no_booleans(mean, "mean", targets=False)
    y, mean = finite(y, "y"), finite(mean, "mean")
    variance = finite(variance, "variance", booleans=False)
    if not (variance > 0).all():
        raise ValueError("variance must be positive.")
    try:
        shape = np.broadcast_shapes(y.shape, mean.shape, variance.shape)
    except ValueError:   # numpy's "operands could not be broadcast together" named no argument
        raise ValueError(f"y, mean and variance must broadcast against each other, got shapes {y.shape}, "
                         f"{mean.shape} and {variance.shape}.") from None
    for name, value in (("y", y), ("mean", mean), ("variance", variance)):
        # (M,) predictive variances against (M, k) targets: an error for M != k, but read per output,
        # silently, for M == k (log densities of the wrong variances)
        if value.ndim == 1 and len(shape) >= 2 and shape[-2] == shape[-1] == value.shape[0] > 1:
            n = value.shape[0]
            raise ValueError(f"A 1-D {name} of length {n} against values of shape {shape} ({n} points of {n} "
                             f"outputs) is ambiguous: pass shape ({n}, 1) for one value per point, or (1, {n}) for "
                             "one per output.")
    return log_density(y, mean, variance)[()]   # numpy's float for scalars, not log_density's 0-d array


def log_density(y: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """:func:`gaussian_log_density` of arrays already checked (finite, positive variances).

    One array of the result's size is allocated, and worked on in place: the expression
    allocated five (r, r/σ, its square, the sum, its half) and, for a broadcast variance
    (:func:`compact` undoes that), two more, its logarithm and root at the result's size.
    """
    # the shape before compact: a variance broadcast (stride 0) over an axis that y and mean lack
    # gives the result that axis, which the compacted variance no longer has
    result = np.empty(np.broadcast_shapes(y.shape, mean.shape, variance.shape))
    variance = compact(variance)
    np.subtract(y, mean, out=result)
    # log 2π + log σ² and (r/σ)²: 2π σ² overflows beyond ~3e307 and r² beyond ~1e154
    result /= np.sqrt(variance)
    np.square(result, out=result)
    result += math.log(2 * math.pi) + np.log(variance)
    result *= -0.5
    return result


def compact(array: np.ndarray) -> np.ndarray:
    """``array`` without the axes that broadcasting repeats (stride 0), kept with length 1: the
    values ``np.broadcast_to`` was given. Elementwise functions of it cost its own size, not the
    broadcast one (a noise variance per point, broadcast over ``S`` draws)."""
    return array[tuple(slice(None) if stride else slice(0, 1) for stride in array.strides)]


def import_arviz() -> ModuleType:
    """Import ArviZ, silencing the 0.2x announcement of its 1.0 refactor (handled here)."""
    with warnings.catch_warnings():
        # the message starts with a newline, and the filter's pattern is matched from its start: without the
        # \s* it never matched, and the announcement (made once a day) reached users and the test summary
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
        import arviz
    return arviz


def arviz_major_version() -> int:
    """Major version of the installed ArviZ (``0`` for the ``InferenceData`` line)."""
    return int(import_arviz().__version__.split(".")[0])


def draws_to_inference_data(f_draws: ArrayLike, y_obs: ArrayLike, noise: ArrayLike, *, num_chains: int = 1,
                            y_draws: ArrayLike | None = None,
                            seed: int | np.random.Generator | np.random.SeedSequence | None = 0,
                            attrs: dict[str, Any] | None = None) -> Any:
    r"""ArviZ data from ``S`` latent draws ``f_draws`` of shape ``(S, M)`` or ``(S, M, k)``.

    Args:
        f_draws: draws of the noise-free outputs (ensemble members, or samples of a Gaussian).
        y_obs: observed targets, ``(M,)`` or ``(M, k)`` like one draw.
        noise: observation-noise variance ``σ²``: a positive scalar, ``(M,)`` (one per point, shared
            by the ``k`` outputs), or an array broadcastable to ``(S, M[, k])`` (one per draw, such as
            per ensemble member: ``(S, 1)`` for ``(S, M)`` draws, ``(S, 1, 1)`` for ``(S, M, k)``).
        num_chains: how many chains the draws are split into; must divide ``S``.
        y_draws: posterior-predictive draws ``(S, M[, k])`` to store instead of drawing
            ``f + σ ε`` here.
        seed: seed of the noise draws ``ε``: a non-negative integer, a numpy ``Generator`` or
            ``SeedSequence`` (``None``: fresh entropy).
        attrs: extra attributes for the ``posterior_predictive`` and ``log_likelihood`` groups:
            string keys, values of ``str``, ``int`` or ``float`` (what netCDF stores), and none of the
            keys ntkgp writes (``source``, ``noise_variance``, ``noise_variance_mean``).

    Returns:
        ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ ≥ 1) with groups
        ``posterior``, ``posterior_predictive``, ``log_likelihood`` and ``observed_data``.
    """
    if seed is not None and not isinstance(seed, np.random.Generator | np.random.SeedSequence):
        seed = integer_at_least(seed, 0, "seed")   # any size numpy takes; booleans and floats refused
    attrs = _checked_attrs(attrs)
    no_booleans(f_draws, "f_draws", targets=False)   # read as 1 and 0, as a boolean mean would be in the metrics
    f = finite(f_draws, "f_draws")
    if f.ndim not in (2, 3) or f.shape[0] == 0:
        raise ValueError(f"f_draws must have shape (S, M) or (S, M, k) with S >= 1, got {f.shape}.")
    y, noise_var, num_chains = check_export(f.shape, y_obs, noise, num_chains, "one draw of f_draws")
    num_draws = f.shape[0]
    if y_draws is None:
        rng = np.random.default_rng(seed)
        # f + σ ε in the array of ε: the draws' size once, not four times (σ broadcast, σ ε, the sum)
        y_rep = rng.standard_normal(f.shape)
        y_rep *= np.sqrt(compact(noise_var))
        y_rep += f
    else:
        no_booleans(y_draws, "y_draws", targets=False)
        y_rep = finite(y_draws, "y_draws")
        if y_rep.shape != f.shape:
            raise ValueError(f"y_draws must have the shape of f_draws, {f.shape}; got {y_rep.shape}.")
    log_lik = log_density(y, f, noise_var)   # all three checked above (check_export: positive noise)

    def chains(a: np.ndarray) -> np.ndarray:
        return a.reshape(num_chains, num_draws // num_chains, *a.shape[1:])

    obs_dims = [OBS_DIM] if y.ndim == 1 else [OBS_DIM, OUTPUT_DIM]
    coords = {OBS_DIM: np.arange(y.shape[0])}
    if y.ndim == 2:
        coords[OUTPUT_DIM] = np.arange(y.shape[1])
    groups = {
        "posterior": {"f": chains(f)},
        "posterior_predictive": {"y": chains(y_rep)},
        "log_likelihood": {"y": chains(log_lik)},
        "observed_data": {"y": y},
    }
    dims = {"f": obs_dims, "y": obs_dims}
    data = _from_dict(groups, coords, dims)
    # Attributes stay str/int/float so that the data can be written to netCDF.
    noise_var = compact(noise_var)
    constant = bool(np.all(noise_var == noise_var.flat[0]))
    group_attrs = {"source": "ntkgp",
                   ("noise_variance" if constant else "noise_variance_mean"):
                       float(noise_var.flat[0] if constant else noise_var.mean()), **attrs}
    for group in ("posterior_predictive", "log_likelihood"):
        data[group].attrs.update(group_attrs)
    return data


#: The attributes :func:`draws_to_inference_data` writes itself.
RESERVED_ATTRS = ("source", "noise_variance", "noise_variance_mean")


def _checked_attrs(attrs: object) -> dict[str, str | int | float]:
    """``attrs`` as a dict, or a ``ValueError`` before any work: a bool or ``None`` failed only in
    ``to_netcdf``, long after, and ``noise_variance`` silently replaced the noise the log likelihood
    used."""
    if attrs is None:
        return {}
    if not isinstance(attrs, Mapping):
        raise ValueError(f"attrs must be a dict, got {type(attrs).__name__}.")
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise ValueError(f"attrs keys must be strings, got {key!r}.")
        if key in RESERVED_ATTRS:
            raise ValueError(f"attrs may not set {key!r}: ntkgp writes it ({', '.join(RESERVED_ATTRS)} describe "
                             "the noise the log likelihood used).")
        if isinstance(value, bool | np.bool_) or not isinstance(value, str | int | float | np.integer | np.floating):
            raise ValueError(f"attrs[{key!r}] must be a str, int or float, which netCDF stores; got "
                             f"{type(value).__name__} (write it as a string, e.g. str(value)).")
    return dict(attrs)


def check_export(shape: tuple[int, ...], y_obs: ArrayLike, noise: ArrayLike, num_chains: int,
                 name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Targets ``y_obs`` (the shape of one draw, ``shape[1:]``), the positive noise variance
    broadcast to the draws' ``shape`` ``(S, M[, k])``, and ``num_chains`` (dividing ``S``).

    Separate from :func:`draws_to_inference_data` so that callers who still have to make the
    draws (:func:`ntkgp.bayes.gaussian_to_inference_data`) refuse bad arguments before that work.
    """
    _, y = observations(np.zeros(shape[1:]), y_obs, name, "y_obs")
    noise_var = finite(noise, "noise", booleans=False)
    noise_var = broadcast_per_point(noise_var, shape, has_outputs=len(shape) == 3, name="noise")
    if not (compact(noise_var) > 0).all():
        raise ValueError("noise must be a positive variance: the log likelihood of a noise-free "
                         "observation model is degenerate.")
    num_chains = integer_at_least(num_chains, 1, "num_chains")
    if shape[0] % num_chains:
        raise ValueError(f"num_chains={num_chains} must divide the number of draws, {shape[0]}.")
    return y, noise_var, num_chains


def _from_dict(groups: dict[str, dict[str, np.ndarray]], coords: dict, dims: dict):
    arviz = import_arviz()
    if arviz_major_version() >= 1:
        # ArviZ 1.x: converters live in arviz-base; groups are passed as one nested mapping and
        # the result is an xarray.DataTree.
        from arviz_base import from_dict

        return from_dict(groups, coords=coords, dims=dims)
    return arviz.from_dict(**groups, coords=coords, dims=dims)
