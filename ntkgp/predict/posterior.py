r"""Exact Gaussian-process posteriors of infinitely wide networks.

* ``"nngp"``: the posterior of an infinitely wide Bayesian network (Lee et al. 2018)::

      μ = K*d (K + σ²I)⁻¹ Y,   Σ = K** − K*d (K + σ²I)⁻¹ Kd*

* ``"ntkgp"``: the same with the NTK as prior covariance (He et al. 2020, "Bayesian deep
  ensembles via the neural tangent kernel")::

      μ = Θ*d (Θ + σ²I)⁻¹ Y,   Σ = Θ** − Θ*d (Θ + σ²I)⁻¹ Θd*

* ``"ntk"``: the distribution of an infinite ensemble trained by gradient flow to convergence,
  i.e. :class:`~ntkgp.predict.GradientFlow` at ``t = ∞`` (Lee et al. 2019).

``σ²`` (``noise``) is an absolute observation-noise variance on the training diagonal, one for all
points or one per point (``σ²I`` is then ``diag(σ²)``), or, for ``(N, k)`` targets, one per point
and output (output ``j`` then has ``K + diag(σ²[:, j])``, a factorization of its own). The
factorization is a Cholesky decomposition in float64 (by default), cached for repeated
predictions; a singular kernel without noise raises a ``ValueError`` suggesting ``noise``.
Values agree with neural-tangents' ``gp_inference`` (absolute ``diag_reg``) to 1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property
from typing import Literal, NoReturn, cast, overload

import torch
from torch import Tensor

from ntkgp._autograd import outside_inference_mode
from ntkgp._checks import NT_TRACE_AXES_SPEC_HINT, neural_tangents_keywords
from ntkgp._typing import Diagonal
from ntkgp.layers.base import Layer
from ntkgp.predict.gaussian import (
    Gaussian,
    HyperparameterRecord,
    check_covariance_fits,
    check_covariance_range,
    check_diagonal,
    check_factor_dtype,
    check_test_points,
    check_training_data,
    covariance_mode,
    named_kernels,
    prior_scale,
    refuse_gradient,
)
from ntkgp.predict.gradient_flow import GradientFlow, block_rows, subtract_gram_
from ntkgp.predict.spectral import (
    POSTERIOR_COEFFICIENTS,
    cholesky,
    cholesky_solve,
    regularize,
    training_kernel_error,
    warn_if_imprecise,
)

#: neural-tangents' keywords of ``gp_inference`` and what to pass here instead.
PORTED_KEYWORDS = {"get": "pass kernel='nngp', 'ntkgp' or 'ntk' (neural-tangents' get).",
                   "diag_reg": "noise is an absolute variance: neural-tangents' diag_reg is "
                               "noise = diag_reg * trace(K_train) / N (docs/conventions.md).",
                   "diag_reg_absolute_scale": "noise is always an absolute variance (neural-tangents' "
                                              "diag_reg_absolute_scale=True); pass noise=diag_reg.",
                   "trace_axes": NT_TRACE_AXES_SPEC_HINT}

POSTERIORS = ("nngp", "ntk", "ntkgp")


class GPPosterior:
    """Exact posterior of an NNGP / NTK-GP / converged-NTK model; the Cholesky factor is cached.

    ``"nngp"``: ``μ = K*d (K + σ²I)⁻¹ Y``, ``Σ = K** − K*d (K + σ²I)⁻¹ Kd*`` (Lee et al. 2018);
    ``"ntkgp"``: the same with ``Θ`` for ``K`` (He et al. 2020); ``"ntk"``: gradient flow at
    ``t = ∞``, ``μ = Θ*d Θ⁻¹ Y``, ``Σ = K** + Θ*d Θ⁻¹ K Θ⁻¹ Θd* − (Θ*d Θ⁻¹ Kd* + h.c.)`` with
    ``Θ + σ²I`` for ``Θ`` (Lee et al. 2019).

    The training kernel is computed here, from the network's variances at construction: after
    changing those, build a new ``GPPosterior`` (:meth:`predict` refuses to mix the two, and the
    marginal likelihood and leave-one-out values refuse to report the old model's).
    The training data are copied and the kernels computed without autograd: predictions carry no
    gradient with respect to the inputs, the targets, the variances or ``noise`` (which is read as
    a number: a tensor that requires grad is refused).
    For a differentiable posterior and a trainable marginal likelihood use
    :class:`ntkgp.models.NetworkGP` (its predictions' gradients with respect to the
    hyperparameters under ``gpytorch.settings.detach_test_caches(False)``).

    Args:
        net: the network spec.
        x_train: ``(N, d)`` inputs.
        y_train: ``(N,)`` or ``(N, k)`` targets (one factorization serves all ``k`` outputs, unless
            their noises differ).
        kernel: ``"nngp"``, ``"ntkgp"`` or ``"ntk"``.
        noise: absolute observation-noise variance added to the training diagonal: a number, or
            ``(N,)``, one per training point (heteroscedastic noise of known variances, as GPyTorch's
            ``FixedNoiseGaussianLikelihood``: ``K + diag(σ²)`` in the formulas), shared by the ``k``
            outputs; or, for ``(N, k)`` targets, ``(N, k)``, one per training point and output:
            output ``j`` is then an independent GP with ``K + diag(σ²[:, j])`` (GPyTorch's batch of
            ``k`` independent models, ``batch_shape=[k]``, each with its ``FixedNoiseGaussianLikelihood``).
            A vector is always one value per point, also where ``N == k``; one level per output is
            ``torch.tensor(levels, dtype=torch.float64).expand(N, k)``. Columns that differ cost ``k``
            factorizations and ``k`` training matrices (``k N²`` memory), and :meth:`predict` returns a
            covariance per output (:attr:`Gaussian.per_output`); equal columns are the one
            factorization of ``(N,)`` noise, bit for bit. ``kernel="ntk"`` (gradient flow, one
            regularizer per point) takes equal columns only.
        factor_dtype: dtype in which kernels are computed and factored (results come back in the
            inputs' dtype; with float32 a ``RuntimeWarning`` says where the kernels' rounding, or their
            error against a float64 kernel where that decides it, can move the test means by more than 1 %,
            see docs/numerics.md).
    """

    @neural_tangents_keywords(**PORTED_KEYWORDS)
    @outside_inference_mode
    def __init__(self, net: Layer, x_train: Tensor, y_train: Tensor, *, kernel: str = "nngp",
                 noise: Diagonal = 0.0, factor_dtype: torch.dtype = torch.float64) -> None:
        if kernel not in POSTERIORS:
            raise ValueError(f"kernel must be one of {POSTERIORS}, got {kernel!r}.")
        refuse_gradient(noise, "noise", " here (the kernels are computed without autograd): for a differentiable "
                        "posterior use ntkgp.models.NetworkGP; for its value pass noise.detach() (a fitted "
                        "NetworkGP's: model.likelihood.noise.detach()).")
        self.kind = kernel
        check_training_data(net, x_train, y_train)
        self.factor_dtype = check_factor_dtype(factor_dtype)
        # here for "ntk" too, under the name it was passed as: its flow's check refused noise=-1 as
        # "diag_reg must be a finite non-negative number"
        outputs = y_train.shape[-1] if y_train.dim() == 2 else None
        self.noise = _shared_columns(check_diagonal("noise", noise, x_train.shape[0], x_train.device,
                                                    self.factor_dtype, outputs=outputs))
        #: whether each output has a training covariance (factor, posterior covariance) of its own
        self.per_output = isinstance(self.noise, Tensor) and self.noise.dim() == 2
        if kernel == "ntk" and self.per_output:
            raise ValueError("noise of one value per training point and output, (N, k) with columns that differ, is "
                             "for kernel='nngp' and 'ntkgp': the converged NTK ensemble's gradient flow takes one "
                             "regularizer per training point, a number or (N,).")
        if kernel == "ntk":   # its GradientFlow records the hyperparameters and checks them
            self._flow = GradientFlow(net, x_train, y_train, kernel="ntk", diag_reg=self.noise,
                                      diag_reg_absolute_scale=True, factor_dtype=factor_dtype)
            return
        self.net, self.x_train, self.dtype = net, x_train, x_train.dtype
        self._hyperparameters = HyperparameterRecord(net)
        self.vector_targets = y_train.dim() == 2
        self.y = (y_train if self.vector_targets else y_train.unsqueeze(-1)).detach().to(factor_dtype, copy=True)
        # copies (of y too), as in GradientFlow: a caller's later in-place edit must not reach them
        self.x_factor = x_train.detach().to(factor_dtype, copy=True)
        with torch.no_grad(), named_kernels("training"):
            k = net.kernel(self.x_factor, ntk=kernel == "ntkgp")
        prior = cast(Tensor, k.ntk) if kernel == "ntkgp" else k.nngp   # asked for
        del k   # the NTK-GP's NNGP beside Θ and its regularized copy: 3 N² at the setup's peak, not 2
        if self.per_output:   # (k, N, N): K + diag(σ²[:, j]) for output j, factored as a batch
            levels = cast(Tensor, self.noise)
            self._prior_dd: Tensor | None = prior.expand(levels.shape[-1], *prior.shape).clone()
            self._prior_dd.diagonal(dim1=-2, dim2=-1).add_(levels.mT)
            del prior
            # (k, N): each output's training variances, the scale of the rounding of its entries
            self._variances = self._prior_dd.diagonal(dim1=-2, dim2=-1).clone()
            return
        self._prior_dd = regularize(prior, self.noise, absolute=True)
        # the training variances, the scale of each entry's rounding (warn_if_imprecise)
        self._variances = self._prior_dd.diagonal().clone()

    @cached_property
    @outside_inference_mode
    def _cholesky(self) -> Tensor:
        assert self._prior_dd is not None   # dropped below only once the factor is cached in its place
        # the NTK-GP's prior covariance is the NTK ("training NTKGP kernel" named no kernel)
        name = "training NTK" if self.kind == "ntkgp" else "training NNGP kernel"
        if self.per_output:   # one output at a time, so that a refusal names the output whose noise is too small
            factor = torch.empty_like(self._prior_dd)
            for j, kernel in enumerate(self._prior_dd):
                factor[j] = cholesky(kernel, f"{name} with the noise of output {j}")
        else:
            factor = cholesky(self._prior_dd, name)
        # nothing reads the regularized kernel once it is factored (a singular one, refused above, is
        # kept for the next attempt to refuse again): held on, it was an N × N matrix beside the factor
        # at every prediction's peak (3.2 GB of 13.6 at N = M = 20 000, "diag", float64)
        self._prior_dd = None
        return factor

    @cached_property
    @outside_inference_mode
    def _alpha(self) -> Tensor:
        """``(K + σ²I)⁻¹ Y``, the dual coefficients of the posterior mean (column ``j`` with output
        ``j``'s own factor where :attr:`per_output`)."""
        if self.per_output:   # (k, N, 1) right-hand sides against the (k, N, N) factors
            return cholesky_solve(self.y.mT.unsqueeze(-1), self._cholesky).squeeze(-1).mT
        return cholesky_solve(self.y, self._cholesky)

    def _per_output_covariance(self, c_tt: Tensor, c_td: Tensor, mode: str) -> Tensor:
        """:func:`subtract_gram_` with each output's factor: ``(M, M, k)`` (``mode="full"``) or
        ``(M, k)`` (``"diag"``), the output axis last. One output at a time: one ``(N, M)`` ``w`` at
        the peak, not ``k``."""
        chol = self._cholesky
        out = c_tt.new_empty(*c_tt.shape, chol.shape[0])
        for j, factor in enumerate(chol):
            w = torch.linalg.solve_triangular(factor, c_td.mT, upper=False)
            out[..., j] = subtract_gram_(c_tt.clone(), w, mode)
        return out

    def _warn_if_imprecise(self, mean: Tensor) -> None:
        """:func:`~ntkgp.predict.spectral.warn_if_imprecise` for the test ``mean``: the kernels' rounding
        and their factorization's, both in ``factor_dtype``. With a noise per output each output is
        judged as the GP it is, by its own coefficients, training variances and size (``k`` "times"
        of one output): judged together, an output 2.5e-2 off (relative) beside one 100 times its
        size, which its larger noise kept exact, was silent where it alone warned
        (tests/test_noise_per_output.py)."""
        eps = torch.finfo(self.factor_dtype).eps
        if self.per_output:
            warn_if_imprecise(self._alpha.mT.unsqueeze(-1), mean.mT.unsqueeze(-1), self._variances, eps,
                              factor_eps=eps, cause=POSTERIOR_COEFFICIENTS, entry_eps=self._entry_error)
            return
        warn_if_imprecise(self._alpha, mean, self._variances, eps, factor_eps=eps, cause=POSTERIOR_COEFFICIENTS,
                          entry_eps=self._entry_error)

    @cached_property
    def _entry_error(self) -> Callable[[int], float]:
        """The training kernel's error against float64 on a number of its points, relative to ``d_i d_j``
        (``d²`` the training variances with the noise; with a noise per output the smallest):
        :func:`~ntkgp.predict.spectral.training_kernel_error`, asked by :func:`warn_if_imprecise`."""
        variances = self._variances.amin(0) if self.per_output else self._variances
        return training_kernel_error(self.net, self.x_factor, self.kind == "ntkgp", variances)

    # the overloads tell type checkers which of the covariance and the variances compute_cov leaves None
    @overload
    def predict(self, x_test: Tensor | None, compute_cov: Literal[True] = True) -> Gaussian[Tensor, Tensor]: ...

    @overload
    def predict(self, x_test: Tensor | None, compute_cov: Literal["diag"]) -> Gaussian[None, Tensor]: ...

    @overload
    def predict(self, x_test: Tensor | None, compute_cov: Literal[False]) -> Gaussian[None, None]: ...

    @overload
    def predict(self, x_test: Tensor | None, compute_cov: bool | str = True) -> Gaussian: ...

    @neural_tangents_keywords(get="the kernel is chosen when the GPPosterior is built: GPPosterior(..., "
                                  "kernel='nngp', 'ntkgp' or 'ntk'), one per kernel.")
    def predict(self, x_test: Tensor | None, compute_cov: bool | str = True) -> Gaussian:
        """Posterior mean ``(M,)``/``(M, k)`` and covariance ``(M, M)`` at ``x_test``; with a noise
        per output (:attr:`Gaussian.per_output`) one covariance per output, ``(M, M, k)``
        (``covariance[..., j]`` is output ``j``'s: ``K** − K*d (K + diag σ²[:, j])⁻¹ Kd*``).

        ``compute_cov="diag"`` computes the marginal variances ``(M,)`` (``(M, k)`` per output) alone
        (:attr:`Gaussian.marginal`, ``diag K** − Σ_j w_jm²`` with ``w = L⁻¹ Kd*``): memory
        ``O(M N)``, where the covariance of 50 000 test points needs 20 GB in float64.
        ``x_test=None`` predicts the training points, for ``kernel="ntk"`` only (as
        :class:`~ntkgp.predict.GradientFlow`).
        """
        mode = covariance_mode(compute_cov)
        if self.kind == "ntk":
            return self._flow.predict(x_test, t=None, compute_cov=compute_cov)
        self._hyperparameters.check(self.net)
        if x_test is None:   # the generic "must be a torch.Tensor, got NoneType" did not say why
            _refuse_training_points(self.kind)
        check_test_points(x_test, self.x_train.shape[-1], self.x_train.device)
        if mode == "full":   # before the training factorization and the test kernels
            outputs = self.y.shape[-1] if self.per_output else 1   # (M, M, k)
            check_covariance_fits(x_test.shape[0], outputs, self.factor_dtype, self.x_train.device)
        want_ntk = self.kind == "ntkgp"
        x_test = x_test.to(self.factor_dtype)
        cov, marginal, scale = None, None, None
        if mode != "full":
            mean, marginal, scale = self._by_test_blocks(x_test, mode)
            self._warn_if_imprecise(mean)
            if not self.vector_targets:
                mean = mean.squeeze(-1)
            return Gaussian(mean.to(self.dtype), None, scale, marginal, self.per_output)
        with torch.no_grad(), named_kernels("test"):
            cross = self.net.kernel(x_test, self.x_factor, ntk=want_ntk)
            c_td = cast(Tensor, cross.ntk) if want_ntk else cross.nngp   # asked for
            del cross   # the NNGP beside the NTK-GP's Θ*d is not needed: one (M, N) matrix less
            mean = c_td @ self._alpha
            self._warn_if_imprecise(mean)
            if mode is not None:
                test = self.net.kernel(x_test, ntk=want_ntk, diag=mode == "diag")
                c_tt = cast(Tensor, test.ntk) if want_ntk else test.nngp
                del test
                check_covariance_range(c_tt, self.dtype)
                scale = prior_scale(c_tt)
                if self.per_output:
                    result = self._per_output_covariance(c_tt, c_td, mode).to(self.dtype)
                else:
                    w = torch.linalg.solve_triangular(self._cholesky, c_td.mT, upper=False)
                    del c_td
                    # in place: c_tt, the product and the result were 3 (M, M) matrices, with the mirror 4
                    result = subtract_gram_(c_tt, w, mode).to(self.dtype)
                cov, marginal = (None, result) if mode == "diag" else (result, None)
        if not self.vector_targets:
            mean = mean.squeeze(-1)
        return Gaussian(mean.to(self.dtype), cov, scale, marginal, self.per_output)

    def _by_test_blocks(self, x_test: Tensor, mode: str | None) -> tuple[Tensor, Tensor | None, float | None]:
        """The mean ``(M, k)`` and, for ``mode="diag"``, the marginal variances ``(M,)`` (``(M, k)``
        per output; in ``factor_dtype``) and :attr:`Gaussian.scale`, a block of about :data:`TEST_BLOCK_ENTRIES`
        test-by-training entries at a time: each test point's mean and variance need its own row of
        ``K*d`` alone, and the whole ``(M, N)`` cross kernel with ``w = L⁻¹ Kd*`` beside it were
        two ``M × N`` matrices at the peak (6.4 GB at N = M = 20 000 in float64, over the factor's 3.2)."""
        want_ntk = self.kind == "ntkgp"
        chol = self._cholesky
        alpha = self._alpha
        rows = block_rows(chol.shape[-1])
        means, marginals, scale = [], [], 0.0
        with torch.no_grad(), named_kernels("test"):
            for start in range(0, max(x_test.shape[0], 1), rows):
                block = x_test[start:start + rows]
                cross = self.net.kernel(block, self.x_factor, ntk=want_ntk)
                c_td = cast(Tensor, cross.ntk) if want_ntk else cross.nngp   # asked for
                del cross
                means.append(c_td @ alpha)
                if mode is None:
                    continue
                test = self.net.kernel(block, ntk=want_ntk, diag=True)
                c_tt = cast(Tensor, test.ntk) if want_ntk else test.nngp
                del test
                check_covariance_range(c_tt, self.dtype)
                scale = max(scale, prior_scale(c_tt))
                if self.per_output:
                    marginals.append(self._per_output_covariance(c_tt, c_td, mode))
                    continue
                w = torch.linalg.solve_triangular(chol, c_td.mT, upper=False)
                del c_td
                marginals.append(subtract_gram_(c_tt, w, mode))
        mean = torch.cat(means)
        if mode is None:
            return mean, None, None
        return mean, torch.cat(marginals).to(self.dtype), scale

    def log_marginal_likelihood(self) -> float:
        """``log p(Y) = Σ_outputs [−½ yᵀ C⁻¹ y − ½ log|C| − (N/2) log 2π]`` (``C`` = prior + noise;
        Rasmussen & Williams 2006, eq. 2.30): the outputs are independent GPs, each with its own
        ``C_j = K + diag(σ²[:, j])`` for a noise per output."""
        if self.kind == "ntk":
            raise ValueError("The converged-NTK ensemble is not a GP posterior of Y; use 'ntkgp' or 'nngp'.")
        # the cached factor is of the variances at construction: after net[0].weight_var = w (a grid
        # search over the evidence) it returned the old model's value for every w, silently
        self._hyperparameters.check(self.net)
        chol, alpha = self._cholesky, self._alpha
        n, k = self.y.shape
        # per output the sum of the k log-determinants; otherwise one, shared by the k outputs
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum()
        shared = 1 if self.per_output else k
        return float(-0.5 * (self.y * alpha).sum() - 0.5 * shared * logdet - 0.5 * n * k * math.log(2 * math.pi))

    def leave_one_out(self) -> tuple[Tensor, Tensor]:
        """Predictive mean ``(N,)``/``(N, k)`` and variance ``(N,)`` (``(N, k)`` with a noise per
        output, each output's from its own ``C``) of each training target given the others, from
        the cached factor of ``C`` = prior + noise (Rasmussen & Williams 2006, eq. 5.12)::

            μ_{−i} = y_i − [C⁻¹ y]_i / [C⁻¹]_ii,   σ²_{−i} = 1 / [C⁻¹]_ii

        Exact, and ``O(N³)`` once rather than ``N`` refits. The variance is that of a noisy target
        (``C`` holds the noise). ``az.loo`` on draws of the posterior at the training inputs
        estimates the same by importance sampling, unreliably where the posterior nearly
        interpolates the data (small noise; its Pareto-k diagnostic warns).
        """
        mean, variance = self._leave_one_out()
        return (mean if self.vector_targets else mean.squeeze(-1)).to(self.dtype), variance.to(self.dtype)

    def leave_one_out_log_density(self) -> float:
        """``Σ_i log p(y_i | y_{−i})`` summed over outputs (Rasmussen & Williams 2006, eq. 5.10–5.12):
        the exact leave-one-out log predictive density, the quantity PSIS-LOO (``az.loo``'s
        ``elpd_loo``) estimates."""
        mean, variance = self._leave_one_out()
        var = variance if self.per_output else variance.unsqueeze(-1)
        return float((-0.5 * torch.log(2 * math.pi * var) - (self.y - mean) ** 2 / (2 * var)).sum())

    def _leave_one_out(self) -> tuple[Tensor, Tensor]:
        """``(N, k)`` means and ``(N,)`` variances (``(N, k)`` per output) in ``factor_dtype``."""
        if self.kind == "ntk":
            raise ValueError("The converged-NTK ensemble is not a GP posterior of Y; use 'ntkgp' or 'nngp'.")
        self._hyperparameters.check(self.net)   # as log_marginal_likelihood: the factor is the old model's
        chol = self._cholesky
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        precision = torch.linalg.solve_triangular(chol, eye, upper=False).square().sum(-2)   # [C⁻¹]_ii = ‖L⁻¹ e_i‖²
        if self.per_output:   # (k, N) from the (k, N, N) factors: output j's [C_j⁻¹]_ii in column j
            precision = precision.mT
            return self.y - self._alpha / precision, precision.reciprocal()
        return self.y - self._alpha / precision.unsqueeze(-1), precision.reciprocal()


def _shared_columns(noise: float | Tensor) -> float | Tensor:
    """An ``(N, k)`` noise whose columns are all equal as its first column, ``(N,)``: the one
    factorization that serves all outputs (the same numbers as that ``(N,)`` noise, bit for bit)."""
    if isinstance(noise, Tensor) and noise.dim() == 2 and torch.equal(noise, noise[:, :1].expand_as(noise)):
        return noise[:, 0].clone()
    return noise


def _covariances(kernel: str, noise: Diagonal, x_train: Tensor, y_train: Tensor, dtype: torch.dtype) -> int:
    """How many ``(M, M)`` covariances :meth:`GPPosterior.predict` returns: ``k`` for a noise per output
    whose columns differ, else one. gp_posterior's check before the training kernel counted one, and
    a covariance per output beyond the memory was refused only after that kernel (minutes at large N)."""
    if kernel not in ("nngp", "ntkgp") or y_train.dim() != 2:   # GPPosterior refuses the others, by name
        return 1
    levels = _shared_columns(check_diagonal("noise", noise, x_train.shape[0], x_train.device, dtype,
                                            outputs=y_train.shape[-1]))
    return y_train.shape[-1] if isinstance(levels, Tensor) and levels.dim() == 2 else 1


def _refuse_training_points(kind: str) -> NoReturn:
    """``x_test=None`` predicts the training points of the converged NTK ensemble only."""
    raise ValueError(f"x_test=None (the training points) is for kernel='ntk' only; for the {kind!r} "
                     "posterior at the training points pass them as x_test.")


@overload
def gp_posterior(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None, kernel: str = "nngp",
                 noise: Diagonal = 0.0, compute_cov: Literal[True] = True,
                 factor_dtype: torch.dtype = torch.float64) -> Gaussian[Tensor, Tensor]: ...


@overload
def gp_posterior(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None, kernel: str = "nngp",
                 noise: Diagonal = 0.0, *, compute_cov: Literal["diag"],
                 factor_dtype: torch.dtype = torch.float64) -> Gaussian[None, Tensor]: ...


@overload
def gp_posterior(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None, kernel: str = "nngp",
                 noise: Diagonal = 0.0, *, compute_cov: Literal[False],
                 factor_dtype: torch.dtype = torch.float64) -> Gaussian[None, None]: ...


@overload
def gp_posterior(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None, kernel: str = "nngp",
                 noise: Diagonal = 0.0, compute_cov: bool | str = True,
                 factor_dtype: torch.dtype = torch.float64) -> Gaussian: ...


@neural_tangents_keywords(**PORTED_KEYWORDS)
def gp_posterior(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None, kernel: str = "nngp",
                 noise: Diagonal = 0.0, compute_cov: bool | str = True,
                 factor_dtype: torch.dtype = torch.float64) -> Gaussian:
    """One-shot :class:`GPPosterior` prediction: for ``kernel="nngp"`` ``μ = K*d (K + σ²I)⁻¹ Y``,
    ``Σ = K** − K*d (K + σ²I)⁻¹ Kd*``, with ``σ² = noise`` (a number, ``(N,)`` or, for ``(N, k)``
    targets, ``(N, k)``: one per point and output, a covariance ``(M, M, k)`` per output; see there
    for that and for ``"ntkgp"`` and ``"ntk"``:
    Lee et al. 2018, He et al. 2020, Lee et al. 2019; ``compute_cov="diag"`` for the marginal
    variances alone; ``x_test=None`` for the training points, with ``kernel="ntk"`` only)."""
    check_training_data(net, x_train, y_train)   # the cheap checks before the training kernel is computed
    mode = covariance_mode(compute_cov)
    if x_test is not None:   # "ntk" predicts the training points for None, as GradientFlow does
        check_test_points(x_test, x_train.shape[-1], x_train.device)
        if mode == "full":   # before the training kernel
            dtype = check_factor_dtype(factor_dtype)
            check_covariance_fits(x_test.shape[0], _covariances(kernel, noise, x_train, y_train, dtype), dtype,
                                  x_train.device)
    elif kernel in POSTERIORS and kernel != "ntk":
        # before the training kernel, which GPPosterior computed for predict to refuse it (measured at
        # N = 4000, a depth-2 mlp: the ValueError came after 0.34 s for "nngp", 0.46 s for "ntkgp"; now at once)
        _refuse_training_points(kernel)
    return GPPosterior(net, x_train, y_train, kernel=kernel, noise=noise, factor_dtype=factor_dtype).predict(
        x_test, compute_cov)
