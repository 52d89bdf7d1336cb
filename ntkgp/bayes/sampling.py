r"""Posterior-predictive draws from ntkgp's Gaussians and from finite ensembles.

Every predictor of :mod:`ntkgp.predict` returns a :class:`~ntkgp.predict.Gaussian` over the
noise-free outputs at ``M`` test points: mean ``μ`` of shape ``(*time, M)`` or
``(*time, M, k)`` and covariance ``Σ`` of shape ``(*time, M, M)`` shared by the ``k`` outputs
(the joint covariance is ``Σ ⊗ I_k``). This holds for the NNGP posterior (Lee et al. 2018),
the NTK-GP posterior (He et al. 2020), the converged NTK ensemble and the gradient-flow
ensemble at time ``t`` (Lee et al. 2019). A posterior with a noise per output has a covariance
per output instead, ``Σ_j`` ``(M, M, k)`` (:attr:`~ntkgp.predict.Gaussian.per_output`: outputs
independent, output ``j`` ``N(μ_j, Σ_j)``, at one time), which these functions take as it is, each
output drawn and checked with its own covariance (:meth:`~ntkgp.predict.Gaussian.output` picks one).
With observation noise ``σ²`` the predictive distribution of targets is ``y* ~ N(μ, Σ + σ² I)``
(Rasmussen & Williams 2006, eq. 2.22–2.24).

A finite deep ensemble (Lakshminarayanan, Pritzel & Blundell 2017) is treated as ``E`` draws of
the outputs, one per member.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from ntkgp._typing import ArrayLike, TimeIndex
from ntkgp.bayes._arrays import broadcast_per_point, finite, integer_at_least, no_booleans, seed_value
from ntkgp.bayes.inference_data import check_export, draws_to_inference_data
from ntkgp.layers.validation import all_finite
from ntkgp.predict.gaussian import Gaussian, device_memory
from ntkgp.predict.spectral import check_symmetric

_G = TypeVar("_G", bound=Gaussian)


def select_time(gaussian: _G, time_index: TimeIndex = None) -> _G:
    """The Gaussian at one training time: mean ``(M,)``/``(M, k)`` and covariance ``(M, M)`` (or
    marginal variances ``(M,)``, from ``compute_cov="diag"``).

    A Gaussian from ``gradient_flow(..., t=tensor)`` carries the time shape in front of every
    tensor; ``time_index`` (an int, or a tuple with one int per time axis; negative counts
    from the end) picks one time. Gaussians without time axes are returned as they are and need
    ``time_index=None``; so are those with a covariance per output, ``(M, M, k)`` (marginal variances
    ``(M, k)``; :attr:`~ntkgp.predict.Gaussian.per_output`), which have none.
    """
    return cast(_G, _select_time(gaussian, time_index)[0])   # covariance or variances stay None where they were


def _gpytorch_hint(value: object) -> str:
    """How to pass a GPyTorch prediction (``NetworkGP``'s ``model(x)``, a ``MultivariateNormal``):
    the refusal alone did not say that one output wraps as it is."""
    if not hasattr(value, "covariance_matrix") or not hasattr(value, "mean"):
        return ""
    # a recipe rebuilding a multitask posterior by gp_posterior took the kernel kind, the task noises and the
    # constant mean by name, and each one left out was silently another posterior (0.24 to 15 off, measured):
    # NetworkGP.gaussian reads them from GPyTorch's own prediction
    return (" For a NetworkGP pass model.gaussian(x_test) (one output or many, its kernel, noises and mean "
            "included); for another GPyTorch model of one output, ntkgp.predict.Gaussian(pred.mean, "
            "pred.covariance_matrix, scale=...), the scale the largest prior variance at x_test, pred = model(x_test) "
            "(not likelihood(model(x_test)), which holds the noise the exports add; a batch, mean (b, M), is taken "
            "one prediction at a time with time_index=i, or, for b independent models, all at once as b outputs: "
            "Gaussian(pred.mean.mT, pred.covariance_matrix.permute(1, 2, 0), scale=..., per_output=True)).")


def _select_time(gaussian: Gaussian, time_index: TimeIndex) -> tuple[Gaussian, tuple[int, ...] | None]:
    """:func:`select_time`, and the time picked as non-negative integers (``None`` without time axes)."""
    if not isinstance(gaussian, Gaussian):
        raise ValueError(f"Expected an ntkgp.predict.Gaussian, got {type(gaussian).__name__}."
                         + _gpytorch_hint(gaussian))
    marginal = gaussian.covariance is None and gaussian.marginal is not None
    # before the per-output checks: a mean alone (compute_cov=False) was told of a covariance per output and
    # sent to gaussian.output(j), which has none either
    if gaussian.covariance is None and not marginal:
        raise ValueError("This Gaussian has no covariance: predict with compute_cov=True (or 'diag', for the "
                         "marginal variances alone).")
    cov, mean = gaussian.marginal if marginal else gaussian.covariance, gaussian.mean
    what = "marginal variances" if marginal else "covariance"
    if not isinstance(cov, Tensor) or not isinstance(mean, Tensor):   # numpy's arrays failed on .device.type
        raise ValueError(f"The Gaussian's mean and {what} must be torch tensors, got {type(mean).__name__} and "
                         f"{type(cov).__name__}: convert them with torch.as_tensor.")
    if "meta" in (cov.device.type, mean.device.type):   # "Tensor.item() cannot be called on meta tensors" later
        raise ValueError(f"The Gaussian's mean or {what} is on the meta device, which holds shapes but no values.")
    if not cov.is_floating_point() or not mean.is_floating_point():   # torch.finfo failed on them later
        raise ValueError(f"The Gaussian's mean and {what} must be floating-point tensors, got {mean.dtype} "
                         f"and {cov.dtype}.")
    if gaussian.per_output:   # (M, M, k): read as (*time, M, M) its axes would mean other things
        _check_per_output(mean, cov, marginal, time_index)
        return gaussian, None
    if marginal and cov.dim() < 1:
        raise ValueError(f"marginal must have shape (*time, M), got {tuple(cov.shape)}.")
    if not marginal and (cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]):
        raise ValueError(f"covariance must have shape (*time, M, M), got {tuple(cov.shape)}.")
    time_shape = cov.shape[:-1] if marginal else cov.shape[:-2]
    m = cov.shape[-1]
    extra = mean.dim() - len(time_shape)
    if mean.shape[:len(time_shape)] != time_shape or extra not in (1, 2) or mean.shape[len(time_shape)] != m:
        raise ValueError(f"mean {tuple(mean.shape)} does not match {what} {tuple(cov.shape)}: expected "
                         f"{(*time_shape, m)} or {(*time_shape, m, 'k')}.")
    if len(time_shape) == 0:
        if time_index is not None:
            raise ValueError(f"This Gaussian has no time axis; got time_index={time_index!r}.")
        return gaussian, None
    if time_index is None:
        # a batch of GPyTorch predictions wrapped as the docs say (mean (b, M), covariance (b, M, M)) has the
        # same shapes, and was told of gradient flow alone
        raise ValueError(f"This Gaussian has leading axes of shape {tuple(time_shape)}: times (gradient flow at "
                         "several times) or a batch of GPyTorch predictions (a batched model's or fantasies' "
                         "model(x), mean (b, M)). Pick one with time_index=... (time_index=i is the batch's pred[i]); "
                         "a batch of b independent models is also taken whole, as b outputs with a covariance each: "
                         "Gaussian(pred.mean.mT, pred.covariance_matrix.permute(1, 2, 0), scale=..., "
                         "per_output=True).")
    raw = tuple(time_index) if isinstance(time_index, Sequence) else (time_index,)
    try:
        if any(isinstance(i, bool) for i in raw):
            raise TypeError
        index = tuple(operator.index(i) for i in raw)                   # ints, numpy ints, integer tensors
    except TypeError:
        index = ()
    if len(index) != len(time_shape):
        raise ValueError(f"time_index needs {len(time_shape)} integer(s) for time shape {tuple(time_shape)}, "
                         f"got {time_index!r}.")
    for i, n in zip(index, time_shape, strict=True):
        if not -n <= i < n:
            raise ValueError(f"time_index {time_index!r} is out of range for time shape {tuple(time_shape)}.")
    index = tuple(i % n for i, n in zip(index, time_shape, strict=True))
    if marginal:
        return Gaussian(mean[index], None, gaussian.scale, cov[index]), index
    return Gaussian(mean[index], cov[index], gaussian.scale), index


def _check_per_output(mean: Tensor, cov: Tensor, marginal: bool, time_index: TimeIndex) -> None:
    """The shapes of a Gaussian with a covariance per output: mean ``(M, k)``, covariance ``(M, M, k)`` or
    marginal variances ``(M, k)``. It has no time axes (:class:`~ntkgp.predict.GPPosterior` and
    ``NetworkGP.gaussian`` make it, at one time), so ``time_index`` must be ``None``."""
    m, k = (mean.shape[0], mean.shape[1]) if mean.dim() == 2 else (None, None)
    expected = (m, k) if marginal else (m, m, k)
    if mean.dim() != 2 or tuple(cov.shape) != expected:
        what, shape = ("marginal variances", "(M, k)") if marginal else ("covariance", "(M, M, k)")
        raise ValueError(f"A Gaussian with a covariance per output has mean (M, k) and {what} {shape}, got mean "
                         f"{tuple(mean.shape)} and {what} {tuple(cov.shape)}.")
    if time_index is not None:
        raise ValueError(f"This Gaussian has a covariance per output, (M, M, k), and no time axis (a GPPosterior or "
                         f"NetworkGP at its one time); got time_index={time_index!r}: pass time_index=None.")


def predictive_moments(gaussian: Gaussian, noise: float | Tensor | np.ndarray = 0.0,
                       time_index: TimeIndex = None) -> tuple[Tensor, Tensor]:
    """Predictive mean ``μ`` (``(M,)``/``(M, k)``) and marginal variances ``diag Σ + σ²`` (``(M,)``, or
    ``(M, k)`` for a noise per output) of ``y* ~ N(μ, Σ + σ² I)`` (Rasmussen & Williams 2006, eq. 2.24
    plus the noise).

    ``noise``: a scalar or one variance per test point ``(M,)``, and then the variance is shared
    by all ``k`` outputs; for ``(M, k)`` means also one per output ``(1, k)`` or per point and
    output ``(M, k)``, and then the variances are ``(M, k)``, as the ArviZ exports take the noise.
    A Gaussian with a covariance per output (:attr:`~ntkgp.predict.Gaussian.per_output`) gives
    ``(M, k)`` variances whatever the noise, output ``j``'s ``diag Σ_j`` plus its noise.
    Feed both to :mod:`ntkgp.bayes.metrics`. The Gaussian's marginal variances alone
    (``compute_cov="diag"``) suffice.
    """
    g = select_time(gaussian, time_index)
    if g.covariance is None:   # the marginal variances alone: nothing joint to check
        diagonal = _checked_marginal(g)
    else:
        g = _checked(g)
        # (M, k) per output: the diagonal over the two point axes, the output axis last (as Gaussian.variance)
        diagonal = (torch.diagonal(g.covariance, dim1=-3, dim2=-2).mT if g.per_output
                    else torch.diagonal(g.covariance, dim1=-2, dim2=-1)).detach()
        _check_diagonal(diagonal, g)
    noise_var = _noise_tensor(noise, diagonal)
    latent = g.variance
    assert latent is not None   # the covariance's diagonal or the marginal variances, as read above
    if g.per_output or (g.mean.dim() == 2 and noise_var.dim() == 2):
        # (M, k): each output's own covariance, or a noise per output, as gaussian_to_inference_data takes it
        # (refused before, so that one noise could not serve both the draws and the metrics of a multi-output
        # posterior, a multitask likelihood's)
        m, k = g.mean.shape
        column = latent if g.per_output else latent.unsqueeze(-1)
        return g.mean, column.expand(m, k) + _output_noise(noise_var, m, k)
    m = latent.numel()
    if noise_var.dim() > 1 or noise_var.numel() not in (1, m):
        hint = f", (1, {g.mean.shape[-1]}) per output or {tuple(g.mean.shape)}" if g.mean.dim() == 2 else ""
        raise ValueError(f"noise must be a scalar or one variance per test point ({m},){hint}, "
                         f"got shape {tuple(noise_var.shape)}.")
    return g.mean, latent + noise_var


def _checked_marginal(g: Gaussian) -> Tensor:
    """The marginal variances of ``g`` (one time, without a covariance), detached, with its mean checked: both
    finite, the variances not below the rounding allowance (:func:`_check_diagonal`)."""
    _check_mean(g)
    assert g.marginal is not None   # select_time refused a Gaussian with neither
    if not all_finite(g.mean.detach()) or not all_finite(g.marginal.detach()):
        raise ValueError("The Gaussian's mean or marginal variances contain NaN or infinite values.")
    diagonal = g.marginal.detach()
    _check_diagonal(diagonal, g)
    return diagonal


def _check_diagonal(diagonal: Tensor, g: Gaussian) -> None:
    """Refuse marginal variances ``diagonal`` of ``g`` below the draws' rounding allowance (a diagonal entry lies
    between the extreme eigenvalues), each output's own where it has a covariance of its own."""
    for j, column in enumerate(diagonal.unbind(-1) if g.per_output else [diagonal]):
        tolerance = torch.finfo(column.dtype).eps ** 0.5 * _magnitude(column, g.scale)
        if column.numel() and float(column.min()) < -tolerance:
            of = f" of output {j}" if g.per_output else ""
            raise ValueError(f"covariance{of} is not positive semi-definite: a diagonal entry is "
                             f"{float(column.min()):.3g} (allowed down to {-tolerance:.3g}).{_scale_hint(g.scale)}")


def _output_noise(noise_var: Tensor, m: int, k: int) -> Tensor:
    """``noise_var`` shaped to broadcast against variances ``(M, k)``: a scalar; ``(M,)`` one per point (a
    1-D value always is, also where ``M == k``); ``(1, k)`` per output, ``(M, 1)`` or ``(M, k)``."""
    if noise_var.dim() == 1 and noise_var.numel() in (1, m):
        return noise_var.unsqueeze(-1)
    if noise_var.dim() == 0 or (noise_var.dim() == 2 and noise_var.shape in ((1, k), (m, 1), (m, k))):
        return noise_var
    raise ValueError(f"noise of shape {tuple(noise_var.shape)} does not fit {m} points of {k} outputs: pass a "
                     f"scalar, ({m},) per point, (1, {k}) per output or ({m}, {k}).")


def _noise_tensor(noise, like: Tensor) -> Tensor:
    if isinstance(noise, Tensor):   # kept a tensor: a learnable noise (a likelihood's) keeps its gradient
        finite(noise.detach(), "noise", booleans=False)
        value = noise.to(dtype=like.dtype, device=like.device)
    else:
        value = torch.as_tensor(finite(noise, "noise", booleans=False), dtype=like.dtype, device=like.device)
    if bool((value < 0).any()):
        raise ValueError("noise must be a non-negative variance.")
    return value


def _covariance_root(cov: Tensor, prior: float | None = None) -> tuple[Tensor, Tensor]:
    r"""``(V, √max(λ, 0))`` of ``Σ = V diag(λ) Vᵀ``: the symmetric root ``R = V diag(√λ) Vᵀ``
    (``R Rᵀ = Σ``) in factors.

    The symmetric root rather than ``V diag(√λ)``: that factor follows the eigenvectors' signs (and
    the basis eigh picks inside a degenerate eigenspace), which another BLAS, torch version or
    device picks differently, so the same seed drew other samples after a rounding-level change of
    ``Σ``; ``R`` is a continuous function of ``Σ``.

    An eigendecomposition instead of a Cholesky factor because predictive covariances are often
    singular (test points repeating training points, gradient flow at ``t = ∞`` on the training
    set) and a little indefinite from rounding. Eigenvalues below ``−√ε · max(|λ|_max, s)``
    (``ε`` of the covariance's dtype, ``s`` the Gaussian's :attr:`~ntkgp.predict.Gaussian.scale`)
    mean the matrix is not a covariance and raise a ``ValueError``. A posterior pinned at its
    training points has a covariance that is nothing but rounding, of either sign, of the prior
    kernel (``s``, which the predictors record; give it to a Gaussian built by hand). The mean's
    scale does not enter: a covariance does not depend on the targets, and with ``μ²`` in the
    tolerance a mean of 1e4 let ``[[1, 2], [2, 1]]`` (eigenvalue −1) through, its draws 49 % off.
    """
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    tolerance = torch.finfo(cov.dtype).eps ** 0.5 * _magnitude(values, prior)
    if values.numel() and float(values.min()) < -tolerance:
        raise ValueError(f"covariance is not positive semi-definite: smallest eigenvalue {float(values.min()):.3g} "
                         f"(allowed down to {-tolerance:.3g}).{_scale_hint(prior)}")
    return vectors, values.clamp_min(0).sqrt()


def _scale_hint(scale: float | None) -> str:
    """How to pass the scale a covariance's rounding is relative to, for a Gaussian without one.

    A float32 GPyTorch posterior near its data (a NetworkGP's ``model(x_test)`` with the default noise
    floor 1e-4, wrapped as the docs say) was refused as asymmetric, and symmetrized as not positive
    semi-definite: its rounding, ~1e-6 relative to a prior of ~7, is large beside its own entries (~1e-4),
    and neither refusal named the scale that tells the two apart."""
    if scale is not None:
        return ""
    return (" Rounding relative to the prior variances the covariance was computed from (a float32 posterior near "
            "its data) is allowed for a Gaussian given their largest, Gaussian(mean, covariance, scale=...): a "
            "NetworkGP's model.gaussian(x_test) has it.")


def _magnitude(values: Tensor, prior: float | None) -> float:
    """``max(|values|_max, |s|)``: the scale that rounding in a covariance is relative to."""
    scale = float(values.detach().abs().max()) if values.numel() else 0.0
    return max(scale, abs(prior)) if prior is not None else scale


def _check_mean(g: Gaussian) -> None:
    if g.mean.dim() == 2 and g.mean.shape[-1] == 0:   # torch's "cannot reshape tensor of 0 elements" in the draws
        raise ValueError(f"The Gaussian's mean must have k >= 1 outputs, got shape {tuple(g.mean.shape)}.")


def _checked(g: Gaussian) -> Gaussian[Tensor, Tensor]:
    """``g`` (one time) with a finite mean and a finite symmetric covariance: the draws read one
    triangle of ``Σ`` (``eigh``), so a hand-built asymmetric one would be used half-silently."""
    if g.covariance is None:   # select_time let the marginal variances through
        raise ValueError("This Gaussian holds the marginal variances alone (compute_cov='diag'): joint draws need "
                         "the covariance, predict with compute_cov=True. (gaussian_to_inference_data takes the "
                         "marginal variances, with draws independent across points, for az.loo, az.waic and "
                         "az.loo_pit.)")
    _check_mean(g)
    if not all_finite(g.mean.detach()) or not all_finite(g.covariance.detach()):
        raise ValueError("The Gaussian's mean or covariance contains NaN or infinite values.")
    # rounding relative to the scale the PSD check uses: near the data a posterior covariance is tiny
    # beside the prior it was computed from, and its float32 asymmetry large beside its own entries
    # (each output's own, where it has one: as output(j)'s Gaussian is checked)
    for covariance, name in _covariances(g):
        try:
            check_symmetric(covariance, name, _magnitude(covariance, g.scale))
        except ValueError as err:
            raise ValueError(f"{err}{_scale_hint(g.scale)}") from None
    return cast("Gaussian[Tensor, Tensor]", g)   # the covariance checked above, the variances its diagonal


def _covariances(g: Gaussian) -> list[tuple[Tensor, str]]:
    """The ``(M, M)`` covariances of ``g`` (one time, with a covariance) and their names: the one shared by the
    outputs, or output ``j``'s, ``covariance[..., j]``, for each ``j`` where
    :attr:`~ntkgp.predict.Gaussian.per_output`."""
    cov = g.covariance
    assert cov is not None   # refused before, by name
    if not g.per_output:
        return [(cov, "The Gaussian's covariance")]
    return [(cov[..., j], f"The covariance of output {j}") for j in range(cov.shape[-1])]


#: Arrays of the draws' size held at once: by :func:`sample_outputs`, the standard normals ``z`` and
#: ``R z``; by the ArviZ export, the latent draws, the predictive draws and the log likelihood.
SAMPLING_ARRAYS, EXPORT_ARRAYS = 2, 3


def _too_many(num_draws: int, shape: torch.Size, reason: str, arrays: int = 1) -> str:
    """Why ``num_draws`` draws of outputs of ``shape`` (``(M,)`` or ``(M, k)``) are refused, ``arrays``
    arrays of their size being needed at once."""
    m, k = shape[0], 1 if len(shape) == 1 else shape[-1]
    size = num_draws * m * k * 8 / 2**30
    held = f" ({arrays} arrays of that size at once: {arrays * size:.3g} GiB)" if arrays > 1 else ""
    return (f"num_draws={num_draws} draws of {m} x {k} outputs need {size:.3g} GiB in float64{held}, {reason}: "
            "draw fewer (in batches, each with its own seed).")


def _check_draws_fit(num_draws: int, shape: torch.Size, arrays: int, device: torch.device) -> None:
    """Refuse draws of outputs of ``shape`` whose ``arrays`` arrays of their size, held at once in this machine's
    memory, would not fit there, or, for a covariance on another ``device`` (a GPU), whose
    :data:`SAMPLING_ARRAYS` made there would not fit in its memory, where these are known: the draws alone
    fitting let requests through that were killed by the operating system (or swapped for minutes) when the
    2nd or 3rd array came, and a CUDA covariance's draws were checked against the machine's memory alone
    (often many times the card's), to fail in torch's allocator after the eigendecomposition."""
    size = num_draws * math.prod(shape) * 8
    memory = device_memory(torch.device("cpu"))
    if memory is not None and arrays * size > memory:
        raise ValueError(_too_many(num_draws, shape, f"more than this machine's {memory / 2**30:.3g} GiB of memory",
                                   arrays))
    if device.type == "cpu":
        return
    memory = device_memory(device)
    if memory is not None and SAMPLING_ARRAYS * size > memory:
        raise ValueError(_too_many(num_draws, shape, f"more than the {memory / 2**30:.3g} GiB of {device}, where the "
                                   "covariance is and the draws are made", SAMPLING_ARRAYS))


#: A seed of the draws: a non-negative integer, a numpy ``Generator`` or ``SeedSequence``, or ``None``.
Seed = int | np.random.Generator | np.random.SeedSequence | None


def _seeds(seed: Seed) -> tuple[int | None, int | np.random.Generator | None]:
    """The seed of the latent draws' normals (:func:`_standard_normals`) and that of the noise draws.

    An integer seeds both (the noise through ``SeedSequence(seed)``, another stream); a numpy
    ``Generator`` or ``SeedSequence`` gives the latent seed from its stream and draws the noise from
    it after that (a ``Generator`` advances, as numpy's own functions advance it: the same one
    passed twice gives new draws, the same ``SeedSequence`` the same draws). ``None``: fresh entropy.
    """
    if isinstance(seed, np.random.Generator | np.random.SeedSequence):
        rng = np.random.default_rng(seed)   # the Generator itself, or a new one from the SeedSequence
        return int(rng.integers(2**63)), rng
    if seed is None:
        return None, None
    latent_seed = seed_value(seed, 0)   # numpy's generators take it (non-negative)
    return latent_seed, int(np.random.SeedSequence(latent_seed).generate_state(1)[0])


def sample_outputs(gaussian: Gaussian, num_draws: int = 1000, *, time_index: TimeIndex = None,
                   seed: Seed = 0) -> Tensor:
    r"""``num_draws`` joint draws ``f⁽ˢ⁾ = μ + R z⁽ˢ⁾``, ``z ~ N(0, I)``, ``R Rᵀ = Σ``.

    Each of the ``k`` outputs gets its own ``z`` (the joint covariance is ``Σ ⊗ I_k``). With a
    covariance per output (:attr:`~ntkgp.predict.Gaussian.per_output`) output ``j`` is drawn as
    ``μ_j + R_j z_j``, ``R_j`` the symmetric root of its own ``Σ_j`` (checked, symmetric and positive
    semi-definite, as that of :meth:`~ntkgp.predict.Gaussian.output` is; a refusal names the output),
    ``z_j`` the normals a shared covariance gives output ``j``: equal covariances draw as a shared
    one does for the same seed. ``seed``: a
    non-negative integer, a numpy ``Generator`` (advanced by one integer, the seed of the normals) or
    ``SeedSequence``, or ``None`` (fresh entropy).

    The normals are drawn draw by draw, so the first ``S`` of more draws are the ``S`` draws of the same
    seed (``sample_outputs(g, 100, seed=0)[:50]`` is ``sample_outputs(g, 50, seed=0)``, to rounding of
    the products): asking for more draws adds to those already seen.

    Returns:
        ``(num_draws, M)`` or ``(num_draws, M, k)`` in float64.
    """
    num_draws = integer_at_least(num_draws, 1, "num_draws")
    latent_seed = _seeds(seed)[0]
    g = _checked(select_time(gaussian, time_index))
    if g.per_output and g.mean.shape[-1] == 1:   # one output is drawn as a shared covariance is: the draws
        g = Gaussian(g.mean, g.covariance[..., 0], g.scale)   # written over z needed 1 + 2/k = 3 arrays for it
    mean = g.mean.detach().to(torch.float64)
    k = 1 if mean.dim() == 1 else mean.shape[-1]
    z = _standard_normals(num_draws, g.mean.shape, g.covariance.device, latent_seed)
    if g.per_output:
        draws = _per_output_draws(g, z.to(g.covariance.device))   # on the covariance's, as below
        draws += mean
        return draws
    vectors, roots = _covariance_root(g.covariance.detach(), g.scale)
    normals = [z.to(vectors.device).view(num_draws * k, -1)]
    del z   # held by normals alone, which _root_product empties: two arrays of the draws' size at most, not three
    draws = _root_product(vectors, roots, normals)
    draws = draws.view(num_draws, k, -1).permute(0, 2, 1)            # (S, M, k)
    draws += mean if mean.dim() == 2 else mean.unsqueeze(-1)
    return draws if mean.dim() == 2 else draws.squeeze(-1)


def _standard_normals(num_draws: int, shape: torch.Size, device: torch.device, seed: int | None) -> Tensor:
    """The standard normals ``z`` ``(S, k, M)`` of ``S = num_draws`` draws of outputs of ``shape``, drawn on the
    CPU (the same draws on every device) from ``seed`` (``None``: fresh entropy), once the arrays of the draws'
    size that sampling holds fit (:func:`_check_draws_fit`; ``device`` the covariance's, where the draws are
    made): checked before the eigendecomposition, after which ``num_draws=1e12`` failed in torch's allocator
    (seconds at ``M ~ 2000``).

    Draw-major and from numpy's generator, which fills its output in order, so that the normals of the first
    ``S`` draws do not depend on how many are asked for: ``torch.randn(M, S k)`` gave point ``i`` the ``i``-th
    run of ``S k`` values (each draw's normals moved with ``S``), and torch recomputes the last 16 values of
    a fill that is no multiple of 16 (``randn(50)`` is ``randn(100)[:50]`` in its first 34 values alone)."""
    m, k = shape[0], 1 if len(shape) == 1 else shape[-1]
    # on another device the CPU holds the normals alone, until they are moved there
    _check_draws_fit(num_draws, shape, SAMPLING_ARRAYS if device.type == "cpu" else 1, device)
    try:
        z = torch.empty(num_draws, k, m, dtype=torch.float64, device="cpu")
    except (RuntimeError, OverflowError, TypeError) as err:   # "can't allocate memory", "Storage size ... overflowed",
        # beyond int64: "Overflow when unpacking long long" (a TypeError)
        raise ValueError(_too_many(num_draws, shape, "which cannot be allocated")) from err
    np.random.default_rng(seed).standard_normal(out=z.numpy())   # in place: no second array
    return z


def _marginal_draws(g: Gaussian, num_draws: int, seed: int | None) -> Tensor:
    """``S = num_draws`` draws ``f_i⁽ˢ⁾ = μ_i + σ_i z_i⁽ˢ⁾`` of a Gaussian (one time) that holds its marginal
    variances ``σ_i²`` alone (``compute_cov="diag"``): independent across points, ``(S, M)`` or ``(S, M, k)``.

    Each point's draws are distributed as joint draws would be; the normals are those :func:`sample_outputs`
    takes, so these are its draws of ``Gaussian(mean, diag(σ²))`` (per output, ``σ_j²`` of output ``j``,
    where :attr:`~ntkgp.predict.Gaussian.per_output`) for the same seed."""
    # made on the CPU whatever the Gaussian's device: the export reads the draws there, and elementwise
    # products are the same on every device
    variance = _checked_marginal(g).to("cpu", torch.float64)
    mean = g.mean.detach().to("cpu", torch.float64)
    z = _standard_normals(num_draws, g.mean.shape, torch.device("cpu"), seed)   # (S, k, M)
    roots = variance.clamp_min(0).sqrt()
    z *= roots.mT if g.per_output else roots
    draws = z.permute(0, 2, 1)   # (S, M, k)
    draws += mean if mean.dim() == 2 else mean.unsqueeze(-1)
    return draws if mean.dim() == 2 else draws.squeeze(-1)


def _per_output_draws(g: Gaussian[Tensor, Tensor], z: Tensor) -> Tensor:
    """``R_j z_j`` for each output ``j``, ``(S, M, k)``: ``R_j`` the symmetric root of output ``j``'s
    covariance, ``z_j`` the standard normals the shared path gives output ``j`` (``z[:, j]`` of ``z``,
    ``(S, k, M)``), so that outputs of equal covariances are drawn as a shared covariance draws them.

    Each product is written back over the normals it used: ``z`` and two arrays of one output's draws
    at once (``1 + 2/k`` arrays of the draws' size, at most :data:`SAMPLING_ARRAYS` for ``k >= 2``)."""
    for j, (covariance, _) in enumerate(_covariances(g)):
        try:
            vectors, roots = _covariance_root(covariance.detach(), g.scale)
        except ValueError as err:   # named: the message said "covariance", not whose
            raise ValueError(f"Output {j}: {err}") from None
        z[:, j] = _root_product(vectors, roots, [z[:, j].contiguous()])   # (S, M), a copy
    return z.permute(0, 2, 1)   # (S, M, k), a view of z


def _root_product(vectors: Tensor, roots: Tensor, normals: list[Tensor]) -> Tensor:
    """``R z`` of each row ``z`` of the normals ``(S, M)``, ``z Rᵀ``, for the symmetric root ``R = V diag(√λ) Vᵀ``
    (:func:`_covariance_root`'s ``V``, ``√λ``), the normals taken out of ``normals`` (its caller's only hold on
    them, so that their array is freed as the projection takes its place): ``R = Rᵀ`` formed (``M³``) and one
    product where ``S ≥ M``; otherwise ``((z V) ⊙ √λ) Vᵀ``, two ``S M²`` products and no ``M³``."""
    z = normals.pop()
    if z.shape[0] >= z.shape[1]:
        return z @ (vectors @ (vectors * roots).mT)
    z = z @ vectors
    return z.mul_(roots) @ vectors.mT


def gaussian_to_inference_data(gaussian: Gaussian, y_obs: ArrayLike, noise: float | Tensor | np.ndarray, *,
                               num_draws: int = 1000,
                               num_chains: int = 1, time_index: TimeIndex = None,
                               seed: Seed = 0) -> Any:
    r"""Posterior-predictive draws of an ntkgp Gaussian, exported for ArviZ.

    Draws ``f⁽ˢ⁾ ~ N(μ, Σ)`` (:func:`sample_outputs`), ``y_rep⁽ˢ⁾ = f⁽ˢ⁾ + σ ε⁽ˢ⁾`` and the
    pointwise log likelihood ``log N(y_obs,i | f_i⁽ˢ⁾, σ²)``; see
    :mod:`ntkgp.bayes.inference_data` for the groups.

    A Gaussian that holds its marginal variances ``σ_i²`` alone (``compute_cov="diag"``: ``O(M N)``
    memory, for many points) is drawn point by point, ``f_i⁽ˢ⁾ = μ_i + σ_i z_i⁽ˢ⁾``, *independent across
    points* (the draws of ``Gaussian(mean, diag(σ²))`` for the same seed; the attribute ``draws`` of the
    ``posterior_predictive`` and ``log_likelihood`` groups says so). Each point's draws, and so its
    ``log_likelihood`` column, are distributed as joint draws would be, and PSIS-LOO, WAIC and LOO-PIT
    (``az.loo``, ``az.waic``, ``az.loo_pit``) read one point's draws at a time:
    ``p(y_i | y_{−i}) = 1 / E[1 / p(y_i | f_i)]`` over the posterior involves ``f_i``'s marginal alone.
    What reads a draw across points (``az.plot_ppc``'s curves, a draw's sum over the points) sees the
    product of the marginals, not the joint posterior: predict ``compute_cov=True`` for that.

    For ``az.loo`` use the posterior at the *training* inputs with the training targets
    (``x_test = x_train``): PSIS-LOO (Vehtari, Gelman & Gabry 2017) then estimates
    ``Σ_i log p(y_i | y_{−i})``. It needs many draws (hundreds; ArviZ fails on one), and it is
    unreliable where the posterior nearly interpolates its data. Measured with 20 000 draws (seed 0)
    of the NNGP posterior of ``mlp(2, "erf", 2.0, 0.1)`` at 30 standard-normal points in 2-D (a
    ``torch`` generator of seed 0, which then draws the noise), ``y = sin(2 x₁) + x₂²/2`` plus the
    noise (``tests/test_bayes_inputs.py``): with noise 0.01 it gave −112.4 against an exact −250.8
    (Pareto k up to 2.76, above 0.7 at 18 of the points, which ArviZ warns about); with noise 0.5,
    −66.47 against −67.17. For a GP posterior the exact value is
    :meth:`ntkgp.predict.GPPosterior.leave_one_out_log_density`. At held-out
    inputs the pointwise ``log_likelihood`` and ``az.plot_ppc``/``az.plot_loo_pit`` still check
    the predictive distribution, but "leave one out" has no meaning there.

    Args:
        gaussian: from :func:`ntkgp.predict.gp_posterior`, :func:`ntkgp.predict.gradient_flow`
            (``compute_cov=True``, or ``"diag"`` for draws independent across points, above), or a
            ``Gaussian`` you built; with a covariance per output
            (:attr:`~ntkgp.predict.Gaussian.per_output`) each output is drawn from its own
            (:func:`sample_outputs`), the groups' dims those of any ``(M, k)`` targets.
        y_obs: observed targets at the same points, ``(M,)`` or ``(M, k)`` like the mean.
        noise: Gaussian observation-noise variance ``σ²``: positive scalar, per point ``(M,)``, or
            ``(1, k)`` per output, or any other shape broadcastable to ``(S, M[, k])`` (a 1-D value is
            always per point).
        num_draws: ``S``, draws in total (all chains).
        num_chains: chains the independent draws are split into (must divide ``num_draws``).
        time_index: which training time, if the Gaussian has time axes.
        seed: seed of the draws and their noise: a non-negative integer, a numpy ``Generator``
            (advanced: passed again, it gives new draws) or ``SeedSequence`` (``None``: fresh
            entropy).

    Returns:
        ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ ≥ 1).
    """
    # every argument is checked before the eigendecomposition and the draws (seconds at M ~ 2000)
    num_draws = integer_at_least(num_draws, 1, "num_draws")
    latent_seed, noise_seed = _seeds(seed)
    g, index = _select_time(gaussian, time_index)
    # before check_export, whose noise check failed in numpy ("Unable to allocate"); the export holds three
    # arrays of the draws' size at once (sample_outputs' z is freed before the other two come)
    # marginal draws are made on the CPU (_marginal_draws); a covariance's where it is
    device = g.covariance.device if g.covariance is not None else torch.device("cpu")
    _check_draws_fit(num_draws, g.mean.shape, EXPORT_ARRAYS, device)
    check_export((num_draws, *g.mean.shape), y_obs, noise, num_chains, "one draw (the Gaussian's mean)")
    draws = (sample_outputs(g, num_draws, seed=latent_seed) if g.covariance is not None
             else _marginal_draws(g, num_draws, latent_seed))
    attrs: dict[str, str | int | float] = {"kind": "gaussian", "time_index": _time_label(index)}
    if g.covariance is None:   # told apart from joint draws in the data, which outlive this call
        attrs["draws"] = "independent across points (marginal variances alone)"
    return draws_to_inference_data(draws.cpu().numpy(), y_obs, noise, num_chains=num_chains, seed=noise_seed,
                                   attrs=attrs)


def _time_label(index: tuple[int, ...] | None) -> str:
    """The time picked, one spelling however it was given (``-1``, ``np.int64(2)``, ``tensor(2)`` and
    ``(2,)`` were stored as four different strings): ``"2"`` for one time axis, ``"(1, 0)"`` for
    several, ``"None"`` without time axes."""
    if index is None:
        return "None"
    return str(index[0]) if len(index) == 1 else str(index)


def _stack_members(predictions) -> np.ndarray:
    if hasattr(predictions, "test_outputs") and hasattr(predictions, "steps"):   # an EnsembleHistory
        raise ValueError("predictions are the members' outputs at one time: pass history.test_outputs[i], the "
                         "(E, M, k) outputs at record i (history.steps[i]), with .squeeze(-1) for (M,) targets; "
                         f"got the whole {type(predictions).__name__}.")
    if isinstance(predictions, Sequence) and not isinstance(predictions, str | bytes):
        if len(predictions) == 0:
            raise ValueError("predictions must hold at least one ensemble member.")
        for i, p in enumerate(predictions):   # read as 1 and 0, as a boolean mean would be in the metrics
            no_booleans(p, f"predictions[{i}]", targets=False)
        members = [finite(p, f"predictions[{i}]") for i, p in enumerate(predictions)]
        if len({m.shape for m in members}) != 1:
            raise ValueError(f"All members must predict the same shape, got {sorted({m.shape for m in members})}.")
        stacked = np.stack(members)
    else:
        no_booleans(predictions, "predictions", targets=False)
        stacked = finite(predictions, "predictions")
    if stacked.ndim not in (2, 3) or stacked.shape[0] == 0 or stacked.shape[1] == 0:
        raise ValueError(f"predictions must be (E, M) or (E, M, k) (or a list of E (M,)/(M, k) tensors), "
                         f"got shape {stacked.shape}.")
    return stacked


def ensemble_moments(predictions: ArrayLike, noise: float | Tensor | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and variance of the equal-weight mixture of ``E`` members ``N(μ_e, σ_e²)``::

        μ = (1/E) Σ_e μ_e,   σ² = (1/E) Σ_e (σ_e² + μ_e²) − μ²

    i.e. the mean noise variance plus the (biased, 1/E) spread of the member means
    (Lakshminarayanan et al. 2017, §2.4).

    Args:
        predictions: ``(E, M)``/``(E, M, k)`` member outputs, or a list of ``E`` tensors.
        noise: ``σ_e²``: scalar, per point ``(M,)``, or broadcastable to ``(E, M[, k])`` (one fitted
            noise per member: ``(E, 1)`` for ``(E, M)`` predictions, ``(E, 1, 1)`` for ``(E, M, k)``).

    Returns:
        numpy ``mean`` and ``variance`` of shape ``(M,)`` or ``(M, k)``.
    """
    members = _stack_members(predictions)
    noise_var = finite(noise, "noise", booleans=False)
    if (noise_var < 0).any():
        raise ValueError("noise must be a non-negative variance.")
    noise_var = broadcast_per_point(noise_var, members.shape, has_outputs=members.ndim == 3, name="noise")
    mean = members.mean(0)
    return mean, noise_var.mean(0) + members.var(0)


def ensemble_to_inference_data(predictions: ArrayLike, y_obs: ArrayLike, noise: float | Tensor | np.ndarray,
                               *, num_chains: int = 1,
                               seed: int | np.random.Generator | np.random.SeedSequence | None = 0) -> Any:
    r"""A finite ensemble's predictions exported for ArviZ: the ``E`` members are the draws.

    Member ``e``'s outputs ``f⁽ᵉ⁾`` are one posterior draw (the deep-ensemble reading of
    Lakshminarayanan et al. 2017, and exactly so for the NTK-GP "Bayesian deep ensembles" of He
    et al. 2020); ``y_rep⁽ᵉ⁾ = f⁽ᵉ⁾ + σ_e ε⁽ᵉ⁾`` and ``log N(y_obs,i | f_i⁽ᵉ⁾, σ_e²)`` as in
    :func:`ntkgp.bayes.inference_data.draws_to_inference_data`. With a handful of members,
    PSIS-LOO's Pareto-k diagnostics will rightly warn that ``E`` draws are few; with one member
    ``az.loo`` fails inside ArviZ (``IndexError``), as for one draw of a Gaussian.

    Args:
        predictions: ``(E, M)``/``(E, M, k)``, e.g. ``net.build(ensemble_size=E)(x)`` (squeeze a
            trailing output axis of size 1 to match ``(M,)`` targets), or a list of ``E`` tensors.
        y_obs: observed targets ``(M,)``/``(M, k)``.
        noise: observation-noise variance: positive scalar, per point ``(M,)``, or broadcastable
            to ``(E, M[, k])`` (one fitted noise per member: ``(E, 1)`` for ``(E, M)`` predictions,
            ``(E, 1, 1)`` for ``(E, M, k)``).
        num_chains: must divide ``E``.
        seed: seed of the noise draws.
    """
    members = _stack_members(predictions)
    return draws_to_inference_data(members, y_obs, noise, num_chains=num_chains, seed=seed,
                                   attrs={"kind": "ensemble", "ensemble_size": int(members.shape[0])})
