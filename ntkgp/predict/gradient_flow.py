r"""Closed-form predictions of an infinite ensemble of infinitely wide networks trained by
gradient descent on the squared loss (Lee et al. 2019, "Wide neural networks of any depth evolve
as linear models under gradient descent", eqs. 15–16).

With ``τ = η t / m``, training-set kernels ``K`` (NNGP), ``Θ`` (NTK) and ``*`` the test points,
the outputs at time ``t`` are Gaussian with

* ``kernel="ntk"`` (all layers trained)::

      μ_t = Θ*d Θ⁻¹ (I − e^{−Θτ}) Y
      Σ_t = K** + Θ*d Θ⁻¹(I − e^{−Θτ}) K (I − e^{−Θτ})Θ⁻¹ Θd* − (Θ*d Θ⁻¹(I − e^{−Θτ}) Kd* + h.c.)

* ``kernel="nngp"`` (only the readout layer trained, whose tangent kernel is ``K`` in the NTK
  parameterization, or in the standard one with the equivalent per-layer rates)::

      μ_t = K*d K⁻¹ (I − e^{−Kτ}) Y,    Σ_t = K** − K*d K⁻¹ (I − e^{−2Kτ}) Kd*

Discrete full-batch gradient descent replaces ``e^{−Θτ}`` by ``(I − ηΘ/m)^s`` after ``s``
steps, which is exact for the linearized network at any stable learning rate. Conventions
(time scaling, relative ``diag_reg``, training-set outputs for ``x_test=None``) are those of
neural-tangents' ``gradient_descent_mse_ensemble``, and values agree with it to 1e-10.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, cast, overload

import torch
from torch import Tensor

from ntkgp._autograd import outside_inference_mode
from ntkgp._checks import NT_KERNEL_HINT, NT_TRACE_AXES_SPEC_HINT, check_flag, neural_tangents_keywords
from ntkgp._typing import Diagonal, Steps, Times
from ntkgp.layers.base import Layer
from ntkgp.layers.dense import Dense
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
from ntkgp.predict.spectral import (
    Eigensystem,
    Schedule,
    UnresolvedCheck,
    cholesky,
    cholesky_solve,
    learning_rate_number,
    make_schedule,
    max_learning_rate,
    regularize,
    spectral_apply,
    stability_limit,
    training_kernel_error,
    warn_if_flow_imprecise,
    warn_if_imprecise,
    warn_if_unstable,
)

KINDS = ("ntk", "nngp")

#: Test-by-training entries of the cross kernels formed at a time for the mean and the marginal
#: variances (:class:`GradientFlow` at any time, :class:`~ntkgp.predict.GPPosterior`), and rows of the
#: products that make :class:`GradientFlow`'s covariance at finite times (2²⁴: 128 MiB in float64).
TEST_BLOCK_ENTRIES = 1 << 24


def block_rows(columns: int) -> int:
    """Rows of ``columns`` entries each that make a block of about :data:`TEST_BLOCK_ENTRIES` (at least one)."""
    return max(1, TEST_BLOCK_ENTRIES // max(1, columns))


@dataclass(frozen=True)
class _FlowTerms:
    """What the finite-time formulas need besides the test kernels, once per prediction: the
    :meth:`~ntkgp.predict.spectral.Schedule.functions` ``(T, N)`` of the eigenvalues (``flow2``: the
    flow at twice the times, for the NNGP flow's covariance) and the accumulated test of
    :func:`~ntkgp.predict.spectral.warn_if_unresolved` (one warning for all blocks)."""

    decay: Tensor
    growth: Tensor
    flow: Tensor
    flow2: Tensor | None
    check: UnresolvedCheck


class GradientFlow:
    r"""Mean and covariance of an infinite ensemble of infinitely wide networks trained by gradient
    descent for time ``t`` (Lee et al. 2019, eqs. 15–16). With ``τ = η t / m``::

        kernel="ntk":   μ_t = Θ*d Θ⁻¹ (I − e^{−Θτ}) Y
                        Σ_t = K** + Θ*d Θ⁻¹(I − e^{−Θτ}) K (I − e^{−Θτ})Θ⁻¹ Θd*
                              − (Θ*d Θ⁻¹(I − e^{−Θτ}) Kd* + h.c.)
        kernel="nngp":  μ_t = K*d K⁻¹ (I − e^{−Kτ}) Y,   Σ_t = K** − K*d K⁻¹ (I − e^{−2Kτ}) Kd*

    and ``(I − ηΘ/m)^s`` (resp. ``K``) in place of ``e^{−Θτ}`` after ``s`` discrete steps.

    Fit once, predict many: training kernels and their factorizations are cached.

    The training kernels are computed here, from the network's variances at construction; after
    changing those (e.g. by fitting a marginal likelihood), build a new ``GradientFlow``
    (:meth:`predict` refuses to mix the two). The
    training data are copied, so later in-place changes to them do not reach the predictions.
    Kernels are computed without autograd, so predictions carry no gradient with respect to the
    inputs, the targets or the variances (they do with respect to ``t``; a ``learning_rate`` or
    ``diag_reg`` that requires grad is refused): for differentiable
    predictions, pass kernels from ``net.kernel`` to :func:`~ntkgp.predict.gradient_descent_mse`.

    Args:
        net: the network spec.
        x_train: ``(N, d)`` training inputs.
        y_train: ``(N,)`` or ``(N, k)`` targets (``k`` outputs share one factorization).
        kernel: ``"ntk"`` (train all layers) or ``"nngp"`` (train the readout only). With
            standard-parameterized layers, ``"ntk"`` is the NTK of one learning rate for every
            parameter; networks trained with the equivalent per-layer rates
            (:func:`ntkgp.finite.train_ensemble`) follow the spec in NTK parameterization instead
            (:func:`ntkgp.finite.ntk_parameterized`).
        learning_rate: ``η``; time enters as ``τ = η t / m`` with ``m = y_train.numel()``.
        diag_reg: added to the training kernel as ``diag_reg · trace/N · I``; or ``(N,)``, one per
            training point, added as ``trace/N · diag(diag_reg)``.
        diag_reg_absolute_scale: make ``diag_reg`` an absolute variance instead.
        factor_dtype: dtype in which kernels are computed and factored (float64 by default, also
            for float32 inputs, whose results are returned in float32: float32 kernels of nearly
            parallel inputs carry ~3e-4 relative error and are often indefinite by more than any
            sensible ``diag_reg``, see docs/numerics.md; with float32 a ``RuntimeWarning`` says where
            the kernels' rounding can move the test outputs by more than 1 %, judged by the error of the
            float32 kernel against a float64 one where that decides it).

    Example:
        >>> flow = ntkgp.predict.GradientFlow(net, x_train, y_train, learning_rate=1.0)
        >>> out = flow.predict(x_test, t=torch.logspace(-1, 3, 50))   # one eigendecomposition
        >>> out.mean.shape, out.covariance.shape                       # (50, M, k), (50, M, M)
    """

    @neural_tangents_keywords(get=NT_KERNEL_HINT, trace_axes=NT_TRACE_AXES_SPEC_HINT)
    @outside_inference_mode
    def __init__(self, net: Layer, x_train: Tensor, y_train: Tensor, *, kernel: str = "ntk",
                 learning_rate: float = 1.0, diag_reg: Diagonal = 0.0, diag_reg_absolute_scale: bool = False,
                 factor_dtype: torch.dtype = torch.float64) -> None:
        if kernel not in KINDS:
            hints = {"ntkgp": " The NTK-GP posterior is GPPosterior(..., kernel='ntkgp').",
                     None: " For both kernels (neural-tangents' get=None) build one GradientFlow per kernel."}
            hint = hints.get(kernel, "") if isinstance(kernel, str | None) else ""   # a list is unhashable
            raise ValueError(f"kernel must be one of {KINDS}, got {kernel!r}.{hint}")
        check_training_data(net, x_train, y_train)
        check_flag(diag_reg_absolute_scale, "diag_reg_absolute_scale")
        self.net, self.x_train, self.kind = net, x_train, kernel
        # a tensor that requires grad is refused, not read as a number: make_schedule, which refuses such a
        # learning rate, only ever saw the float, and autograd said only "does not require grad"
        self.learning_rate = learning_rate_number(learning_rate)
        refuse_gradient(diag_reg, "diag_reg", " here (the kernels are computed without autograd): pass kernels from "
                        "net.kernel to gradient_descent_mse, which differentiates with respect to diag_reg.")
        self.dtype, self.factor_dtype = x_train.dtype, check_factor_dtype(factor_dtype)
        self.diag_reg = check_diagonal("diag_reg", diag_reg, x_train.shape[0], x_train.device, self.factor_dtype)
        self.diag_reg_absolute_scale = diag_reg_absolute_scale
        self.vector_targets = y_train.dim() == 2
        # detached: the cached projections of y would keep its graph, and a second prediction's
        # backward would run through the freed graph of the first
        self.y = (y_train if self.vector_targets else y_train.unsqueeze(-1)).detach().to(factor_dtype, copy=True)
        self.m = y_train.numel()
        # copies (of y too): a caller's later in-place edit must not reach a cached factorization
        self.x_factor = x_train.detach().to(factor_dtype, copy=True)
        self._hyperparameters = HyperparameterRecord(net)
        with torch.no_grad(), named_kernels("training"):
            k = net.kernel(self.x_factor, ntk=kernel == "ntk")
        self.nngp_dd = k.nngp
        train_kernel = cast(Tensor, k.ntk) if kernel == "ntk" else k.nngp   # asked for
        # the NTK is kept only regularized: raising its own diagonal, not a copy's, saves one N × N matrix
        # at the setup's peak (3 -> 2 N², the NNGP beside it), unless it shares memory with the NNGP
        # (a network whose NTK is its NNGP), which must stay as it is, or is not a plain matrix (an
        # expanded constant, whose entries share memory), or comes from a kernel method other than
        # Layer.kernel, which builds its result anew: an object serving stored matrices (or a Layer
        # caching its kernels) had its own NTK raised by diag_reg in place, and every later
        # GradientFlow of it regularized it again
        alone = (kernel == "ntk" and getattr(net.kernel, "__func__", None) is Layer.kernel
                 and train_kernel.is_contiguous()
                 and train_kernel.untyped_storage().data_ptr() != k.nngp.untyped_storage().data_ptr())
        self.dynamics = regularize(train_kernel, self.diag_reg, diag_reg_absolute_scale, copy=not alone)

    # ------------------------------------------------------------------ cached factorizations
    @property
    def eigensystem(self) -> Eigensystem:
        """Eigendecomposition of the (regularized) training kernel that drives the flow (computed once;
        refused once the network's hyperparameters changed, as :meth:`predict` is)."""
        self._hyperparameters.check(self.net)
        return self._eigensystem

    @cached_property
    @outside_inference_mode
    def _eigensystem(self) -> Eigensystem:
        return Eigensystem.of(self.dynamics)

    @cached_property
    @outside_inference_mode
    def _cholesky(self) -> Tensor:
        return cholesky(self.dynamics, "training NTK" if self.kind == "ntk" else "training NNGP kernel")

    @cached_property
    @outside_inference_mode
    def _regular(self) -> bool:
        """Whether the training kernel passes ``t=None``'s test (:func:`is_regular`), from its
        cached factor when there is one."""
        try:
            self._cholesky  # noqa: B018
        except ValueError:
            return False
        return True

    def _real_below_rounding(self, directions: Tensor) -> bool:
        """Whether the eigen-directions ``directions`` ``(N,)`` of a training kernel carrying float32
        rounding, which count as a duplicate's, hold real ones
        (:class:`~ntkgp.predict.spectral.UnresolvedCheck`'s ``real_below``): the largest eigenvalue of the
        float64 kernel restricted to their span, ``μ = λ_max(Vᵀ K V)``, above ``100 N ε² λ_max``.

        A float32 eigenvector of an exact null space (duplicates, or the rank-2 kernel of a bias-free ReLU
        network in d = 1, whose inputs of one sign are parallel) strays from it by angles of order ``ε``
        (backward error ``ε λ_max`` over gaps of order ``λ_max``), so ``μ`` is of order ``N ε² λ_max``:
        measured at most ``0.4 N ε² λ_max`` (N = 10 to 500). Real directions show their eigenvalue: at
        least ``0.02 ε λ_max`` where dropping them put the outputs 1 % to 2x off (``ε`` float32's). The
        float64 kernel (one ``N × N`` matrix, as the float32 one) is formed only where this decides a
        warning."""
        eig = self._eigensystem
        with torch.no_grad():
            v = eig.vectors[:, directions].to(torch.float64)
            largest = torch.linalg.eigvalsh(v.mT @ self._exact_dynamics() @ v).max()
        n = eig.values.shape[-1]
        return float(largest) > 100 * n * eig.eps ** 2 * float(eig.values.max())

    def _exact_dynamics(self) -> Tensor:
        """The regularized training kernel computed in float64 (one more ``N × N`` matrix, formed anew for
        each use: only where a float32 kernel's warning depends on it)."""
        with torch.no_grad(), named_kernels("training"):
            k = self.net.kernel(self.x_factor.to(torch.float64), ntk=self.kind == "ntk")
            # a copy: a net serving stored kernels holds k
            return regularize(cast(Tensor, k.ntk) if self.kind == "ntk" else k.nngp, self.diag_reg,
                              self.diag_reg_absolute_scale)

    @cached_property
    def _entry_error(self) -> Callable[[int], float]:
        """The float32 training kernel's error against float64 on a number of its points
        (:func:`~ntkgp.predict.spectral.training_kernel_error`), asked by :func:`warn_if_imprecise`."""
        return training_kernel_error(self.net, self.x_factor, self.kind == "ntk", self.dynamics.diagonal())

    @cached_property
    @outside_inference_mode
    def _dual(self) -> Tensor:
        """``Θ⁻¹ Y`` (``K⁻¹ Y`` for the NNGP flow), the dual coefficients at ``t = None``."""
        return cholesky_solve(self.y, self._cholesky)

    @cached_property
    @outside_inference_mode
    def _y_eigen(self) -> Tensor:
        return self._eigensystem.vectors.mT @ self.y

    @cached_property
    @outside_inference_mode
    def _nngp_eigen(self) -> Tensor:
        """``Vᵀ K V``, a block of :data:`TEST_BLOCK_ENTRIES` entries of rows at a time: the whole ``Vᵀ K``
        beside the result was one ``N × N`` matrix more at the peak (the products are the same)."""
        v = self._eigensystem.vectors
        n = v.shape[-1]
        out = v.new_empty((n, n))
        rows = block_rows(n)
        for start in range(0, n, rows):
            torch.mm(v[:, start:start + rows].mT @ self.nngp_dd, v, out=out[start:start + rows])
        return out

    @property
    def max_learning_rate(self) -> float:
        """``2m / λ_max``: discrete gradient descent diverges above it (of the network's variances at
        construction: refused once they changed, as :meth:`predict` is; a stale rate would diverge)."""
        return stability_limit(float(self.eigensystem.values.max()), self.m)

    # ------------------------------------------------------------------ prediction
    # the overloads tell type checkers which of the covariance and the variances compute_cov leaves None
    @overload
    def predict(self, x_test: Tensor | None = None, *, t: Times = None, steps: Steps = None,
                compute_cov: Literal[True] = True) -> Gaussian[Tensor, Tensor]: ...

    @overload
    def predict(self, x_test: Tensor | None = None, *, t: Times = None, steps: Steps = None,
                compute_cov: Literal["diag"]) -> Gaussian[None, Tensor]: ...

    @overload
    def predict(self, x_test: Tensor | None = None, *, t: Times = None, steps: Steps = None,
                compute_cov: Literal[False]) -> Gaussian[None, None]: ...

    @overload
    def predict(self, x_test: Tensor | None = None, *, t: Times = None, steps: Steps = None,
                compute_cov: bool | str = True) -> Gaussian: ...

    @neural_tangents_keywords(get="the kernel is chosen when the GradientFlow is built: GradientFlow(..., "
                                  "kernel='ntk' or 'nngp'), one per kernel.")
    def predict(self, x_test: Tensor | None = None, *, t: Times = None, steps: Steps = None,
                compute_cov: bool | str = True) -> Gaussian:
        """Mean and covariance of the ensemble's outputs at times ``t`` (or after ``steps``).

        Args:
            x_test: ``(M, d)`` test inputs; ``None`` predicts the training points.
            t: ``None`` (infinite time, by Cholesky), a number (``inf`` allowed) or a tensor of
                times of any shape, which becomes the leading shape of the outputs.
            steps: instead of ``t``, numbers of discrete full-batch gradient-descent steps.
            compute_cov: also compute the ``(M, M)`` covariance (shared by all outputs);
                ``"diag"``: the marginal variances ``(*time, M)`` alone (:attr:`Gaussian.marginal`,
                the diagonals of the formulas above as sums over the training points), in
                ``O(M N)`` memory instead of ``O(M²)`` per time.

        ``t``, ``steps`` and ``compute_cov`` are keyword-only: neural-tangents' ``predict_fn(t, x_test)``
        takes the time first, and a ported ``predict(None, x_test)`` read the test points as times
        (the training points' outputs, at the test inputs' values as times, without an error).
        """
        self._hyperparameters.check(self.net)
        mode = covariance_mode(compute_cov)
        if x_test is not None:  # before the stability check, which factors the training kernel
            check_test_points(x_test, self.x_train.shape[-1], self.x_train.device)
        schedule = make_schedule(t, steps, self.learning_rate, self.m, self.x_train.device)
        if x_test is not None and mode == "full":   # before the training factorization and the test kernels
            check_covariance_fits(x_test.shape[0], 1 if schedule is None else schedule.values.numel(),
                                  self.factor_dtype, self.x_train.device)
        if x_test is not None and mode is not None:
            # the test points' prior variances (O(M)), which every covariance holds, before the O(N³)
            # eigendecomposition and the test kernels: their overflow was refused only after both
            # (in the blocks of rows the test kernels take, as everything on the test side)
            rows = block_rows(self.x_factor.shape[0])
            for start in range(0, x_test.shape[0], rows):
                self._prior_test_kernel(x_test[start:start + rows], "diag")
        if x_test is None and mode is not None:
            check_covariance_range(self.nngp_dd, self.dtype)
        if x_test is not None and mode != "full":
            mean, cov, scale = self._by_test_blocks(x_test, mode, schedule)
            if schedule is not None:
                mean = schedule.reshape(mean, 2)
                cov = None if cov is None else schedule.reshape(cov, 1)
        else:
            if x_test is None:
                kernels = None
            else:
                kernels = self._test_kernels(x_test, mode) if schedule is None else self._test_projections(x_test, mode)
            # every term of Σ_t is of the size of the NNGP at the points predicted
            scale = None if mode is None else prior_scale(self.nngp_dd if kernels is None else kernels["nngp_tt"])
            if schedule is None:
                mean, cov = self._infinite(kernels, mode)
                if kernels is not None:
                    self._warn_if_imprecise(mean, None)
            else:
                mean, cov = self._finite(schedule, kernels, mode)
                mean = schedule.reshape(mean, 2)
                cov = None if cov is None else schedule.reshape(cov, 2 if mode == "full" else 1)
        if not self.vector_targets:
            mean = mean.squeeze(-1)
        if cov is None:
            return Gaussian(mean.to(self.dtype))
        if mode == "diag":
            return Gaussian(mean.to(self.dtype), None, scale, cov.to(self.dtype))
        return Gaussian(mean.to(self.dtype), cov.to(self.dtype), scale)

    def _test_kernels(self, x_test: Tensor, mode: str | None, prior: bool = True) -> dict[str, Tensor]:
        """The test kernels ``mode`` needs: ``nngp_td`` only for the NNGP flow's mean or any
        covariance (the NTK flow's mean is ``Θ*d``'s alone, and an unused ``(M, N)`` matrix held
        on doubled the memory of a mean-only prediction), ``nngp_tt`` a matrix or its diagonal
        (not with ``prior=False``: the cross kernels alone)."""
        x_test = x_test.to(self.factor_dtype)
        with torch.no_grad(), named_kernels("test"):
            cross = self.net.kernel(x_test, self.x_factor, ntk=self.kind == "ntk")
            out = {"nngp_td": cross.nngp} if self.kind == "nngp" or mode is not None else {}
            if self.kind == "ntk":
                out["ntk_td"] = cast(Tensor, cross.ntk)   # asked for
            del cross
        if mode is not None and prior:
            out["nngp_tt"] = self._prior_test_kernel(x_test, mode)
        return out

    def _test_projections(self, x_test: Tensor, mode: str | None) -> dict[str, Tensor]:
        """What the finite-time formulas read of the test kernels (:meth:`_finite_test`): ``a = G*d V``
        ``(M, N)`` (``G`` the flow's kernel), for the NTK flow's covariance ``r2 = 2 Vᵀ Kd*`` ``(N, M)``,
        and ``nngp_tt`` as :meth:`_test_kernels` gives it. The cross kernels are formed a block of
        about :data:`TEST_BLOCK_ENTRIES` entries at a time and projected into ``a`` and ``r2``: whole, the
        two ``(M, N)`` kernels stood beside ``a`` (and ``r2`` and its double beside the NNGP's), so the
        covariance of ``M = N`` test points peaked at 5.2 N² at one time, ``K**`` and these included."""
        n, m = self.x_factor.shape[0], x_test.shape[0]
        rows = block_rows(n)
        # the first block's kernels (all of them up to TEST_BLOCK_ENTRIES) before the eigendecomposition
        # (O(N³), once per GradientFlow): test inputs whose kernels overflow are refused before it
        first = self._test_kernels(x_test[:rows], mode, prior=False)
        v = self._eigensystem.vectors
        a = v.new_empty((m, n))
        r2 = v.new_empty((n, m)) if self.kind == "ntk" and mode is not None else None
        for start in range(0, max(m, 1), rows):
            kernels = first if start == 0 else self._test_kernels(x_test[start:start + rows], mode, prior=False)
            stop = start + kernels["nngp_td" if self.kind == "nngp" else "ntk_td"].shape[0]
            torch.mm(kernels.pop("ntk_td" if self.kind == "ntk" else "nngp_td"), v, out=a[start:stop])
            if r2 is not None:   # doubling is exact
                r2[:, start:stop] = torch.mm(v.mT, kernels.pop("nngp_td").mT).mul_(2)
            del kernels
        out = {"a": a} if r2 is None else {"a": a, "r2": r2}
        if mode is not None:
            out["nngp_tt"] = self._prior_test_kernel(x_test, mode)
        return out

    def _prior_test_kernel(self, x_test: Tensor, mode: str) -> Tensor:
        """``K**`` (``mode="full"``) or its diagonal, checked against the range of the output dtype (a
        kernel's largest entries are on its diagonal: the diagonal alone refuses what ``K**`` would)."""
        with torch.no_grad(), named_kernels("test"):
            k_tt = self.net.kernel(x_test.to(self.factor_dtype), ntk=False, diag=mode == "diag").nngp
        check_covariance_range(k_tt, self.dtype)
        return k_tt

    def _by_test_blocks(self, x_test: Tensor, mode: str | None,
                        schedule: Schedule | None) -> tuple[Tensor, Tensor | None, float | None]:
        """The mean alone or with the marginal variances, at ``t = None`` (:meth:`_infinite`, ``(M, k)``
        and ``(M,)``) or at the ``schedule``'s times (:meth:`_finite_test`, ``(T, M, k)`` and ``(T, M)``),
        a block of about :data:`TEST_BLOCK_ENTRIES` test-by-training entries at a time, and
        :attr:`Gaussian.scale`: each test point's mean and variance need its own rows of the test
        kernels alone. The whole ``(M, N)`` kernels with ``Θ⁻¹ Θd*`` and ``K T − 2 Kd*`` beside them set
        the peak at ``t = None`` (7.3 N² in all for "diag" at M = N, 5.5 N² for the mean, where the
        training side holds 3 N²), and at finite times ``K*d V``, ``2 Vᵀ Kd*`` and a time's two products
        beside the kernels (5.2 M N for "diag", 2.2 M N for the mean, at N = 2000 and M = 20 000). The
        unresolved-direction warning reads maxima over the test rows, accumulated over the blocks
        (:class:`~ntkgp.predict.spectral.UnresolvedCheck`): it fires as for the whole matrix, once."""
        rows = block_rows(self.x_factor.shape[0])
        terms = None
        means, marginals, scale = [], [], 0.0
        for start in range(0, max(x_test.shape[0], 1), rows):
            block = x_test[start:start + rows]
            kernels = self._test_kernels(block, mode) if schedule is None else self._test_projections(block, mode)
            if schedule is not None and terms is None:   # after the first block's kernels (_test_projections)
                terms = self._flow_terms(schedule, mode)
            if mode is not None:   # before _infinite adds into the test kernel in place
                scale = max(scale, prior_scale(kernels["nngp_tt"]))
            mean, marginal = self._infinite(kernels, mode) if terms is None else self._finite_test(terms, kernels, mode)
            means.append(mean)
            marginals.append(marginal)
        if terms is not None:
            terms.check.warn(self._y_eigen)
        # the test points are the mean's second-to-last axis and the variances' last, with times or without
        mean = torch.cat(means, dim=-2)
        self._warn_if_imprecise(mean, terms)
        if mode is None:
            return mean, None, None
        return mean, torch.cat(cast("list[Tensor]", marginals), dim=-1), scale

    def _warn_if_imprecise(self, mean: Tensor, terms: _FlowTerms | None) -> None:
        """:func:`~ntkgp.predict.spectral.warn_if_imprecise` for the whole test ``mean``, with the dual
        coefficients ``Θ⁻¹ Y`` at ``t = None`` (``terms=None``), else ``V diag(flow) Vᵀ Y`` at each time."""
        if terms is None:
            eps = torch.finfo(self.factor_dtype).eps   # the kernel's rounding and its factorization's
            warn_if_imprecise(self._dual, mean, self.dynamics.diagonal(), eps, factor_eps=eps,
                              entry_eps=self._entry_error)
            return
        warn_if_flow_imprecise(self._eigensystem, terms.flow, self._y_eigen, mean, self.dynamics.diagonal(),
                               terms.check.schedule, entry_eps=self._entry_error)

    def _infinite(self, kernels: dict | None, mode: str | None) -> tuple[Tensor, Tensor | None]:
        if kernels is None:  # the training outputs converge to the targets, if the kernel can fit them
            self._cholesky  # noqa: B018  (a singular kernel raises, as for test points; t=inf handles it)
            n = self.y.shape[0]
            return self.y.clone(), (None if mode is None else self.y.new_zeros((n, n) if mode == "full" else n))
        chol = self._cholesky
        g_td = kernels.pop("ntk_td" if self.kind == "ntk" else "nngp_td")
        mean = g_td @ self._dual
        if mode is None:
            return mean, None
        k_tt = kernels.pop("nngp_tt")
        if self.kind == "nngp":   # Σ = K** − wᵀw, w = L⁻¹ Kd*
            w = torch.linalg.solve_triangular(chol, g_td.mT, upper=False)
            del g_td
            return mean, subtract_gram_(k_tt, w, mode)
        # Σ = K** + Tᵀ K T − Tᵀ Kd* − (Tᵀ Kd*)ᵀ with T = Θ⁻¹ Θd*: symmetrized, the last two terms are
        # −2 Tᵀ Kd* (their difference is antisymmetric), so Σ = sym(K** + Tᵀ (K T − 2 Kd*))
        term = cholesky_solve(g_td.mT, chol)                     # Θ⁻¹ Θd*  (N, M)
        del g_td
        inner = torch.addmm(kernels.pop("nngp_td").mT, self.nngp_dd, term, beta=-2)   # K T − 2 Kd*
        if mode == "diag":
            return mean, k_tt.add_(inner.mul_(term).sum(-2))
        return mean, symmetrize_(k_tt.addmm_(term.mT, inner))

    def _standard_hint(self) -> str:
        """For a standard-parameterized spec's NTK, which of two dynamics this flow is: its limit is that of one
        learning rate for every parameter, and a learning rate taken from train_ensemble (per-layer rates, the
        NTK-parameterized spec's limit: 0.215 where this one's was 0.0074) diverged here without a word on why."""
        standard = any(isinstance(m, Dense) and m.parameterization == "standard" for m in self.net.modules())
        if self.kind != "ntk" or not standard:
            return ""
        return (" This standard-parameterized spec's NTK is that of one learning rate for every parameter; "
                "networks trained with the equivalent per-layer rates (ntkgp.finite.train_ensemble) follow "
                "ntkgp.finite.ntk_parameterized(net) instead.")

    def _flow_terms(self, schedule: Schedule, mode: str | None) -> _FlowTerms:
        """The :class:`_FlowTerms` of a prediction (once each), after the warning that discrete steps
        are past the stability limit: both need the eigendecomposition, made after the first block's
        test kernels (:meth:`_test_projections`)."""
        if schedule.discrete:
            warn_if_unstable(self.learning_rate, self.max_learning_rate, self.factor_dtype, self.dtype,
                             hint=self._standard_hint())
        eig = self._eigensystem
        decay, growth, flow = schedule.functions(eig)                    # (T, N)
        flow2 = schedule.doubled().functions(eig)[2] if self.kind == "nngp" and mode is not None else None
        return _FlowTerms(decay, growth, flow, flow2, UnresolvedCheck(schedule, eig, lambda: self._regular,
                                                                       self._real_below_rounding))

    def _finite(self, schedule: Schedule, kernels: dict | None, mode: str | None) -> tuple[Tensor, Tensor | None]:
        """The training outputs (``kernels=None``) or, with the covariance, the test outputs at the
        ``schedule``'s times: ``(T, M, k)`` and ``(T, M, M)`` (or ``(T, M)``)."""
        terms = self._flow_terms(schedule, mode)
        if kernels is not None:
            return self._finite_test(terms, kernels, mode, warn=True)
        eig = self._eigensystem
        v, lam = eig.vectors, eig.values
        decay = terms.decay
        mean = spectral_apply(v, terms.growth, self._y_eigen)
        terms.check.add_training(mean)
        terms.check.warn(self._y_eigen)
        if mode is None:
            return mean, None
        if mode == "diag":   # diag(V D Vᵀ)_n = Σ_a V_na² D_aa
            if self.kind == "nngp":
                return mean, (lam * decay.square()) @ v.square().mT
            return mean, torch.stack([_training_marginal(v, decay[i], self._nngp_eigen) for i in range(decay.shape[0])])

        def train_cov(i: int, out: Tensor | None) -> Tensor:
            if self.kind == "nngp":          # K e^{−2Kτ}
                return torch.mm(v * (lam * decay[i] ** 2), v.mT, out=out)
            inner = decay[i].unsqueeze(-1) * self._nngp_eigen * decay[i].unsqueeze(-2)
            return torch.mm(v @ inner, v.mT, out=out)  # e^{−Θτ} K e^{−Θτ}

        return mean, _per_time(train_cov, decay.shape[0], v, decay.requires_grad, self.dtype)

    def _finite_test(self, terms: _FlowTerms, kernels: dict, mode: str | None,
                     warn: bool = False) -> tuple[Tensor, Tensor | None]:
        """The test points' mean ``(T, M, k)`` and covariance ``(T, M, M)`` (or marginal variances
        ``(T, M)``) from their test kernels' projections (:meth:`_test_projections`); the
        unresolved-direction test is accumulated into ``terms.check``, and its warning given here if
        ``warn`` (else by the caller, after all blocks).

        The covariance is formed a block of rows at a time (:data:`TEST_BLOCK_ENTRIES`): its rows
        ``I`` need the columns ``I`` of the ``(N, M)`` products alone, which held two more ``M × N``
        matrices at once (a time's ``P`` and ``Kv P − 2R`` below)."""
        flow = terms.flow
        v = self._eigensystem.vectors
        a = kernels.pop("a")                                            # G*d V  (M, N)
        mean = spectral_apply(a, flow, self._y_eigen)
        terms.check.add(a, mean)
        if warn:
            terms.check.warn(self._y_eigen)
            self._warn_if_imprecise(mean, terms)
        if mode is None:
            return mean, None
        k_tt = kernels.pop("nngp_tt")
        rows = block_rows(v.shape[0])
        if self.kind == "nngp":
            flow2 = cast(Tensor, terms.flow2)   # made for a covariance
            if mode == "diag":   # diag(A F Aᵀ)_m = Σ_a A_ma² F_a, every time at once
                return mean, k_tt - flow2 @ a.square().mT

            def test_cov(i: int, out: Tensor | None) -> Tensor:   # K** − A diag(F₂) Aᵀ, its rows I at a time
                return _by_rows(lambda r, o: torch.addmm(k_tt[r], a[r] * flow2[i], a.mT, alpha=-1, out=o),
                                k_tt.shape[0], rows, out)
        else:
            # With P = diag(F) Vᵀ Θd* and R = Vᵀ Kd*: Σ = K** + Pᵀ Kv P − PᵀR − RᵀP. The last two
            # terms equal −2PᵀR up to an antisymmetric part, which symmetrizing removes, so one
            # product Pᵀ(Kv P − 2R) per time suffices.
            r2 = kernels.pop("r2")                                       # 2 Vᵀ Kd*  (N, M)
            if mode == "diag":   # diag(Pᵀ B)_m = Σ_a P_am B_am
                def marginal(i: int) -> Tensor:
                    p = flow[i].unsqueeze(-1) * a.mT
                    return k_tt + (p * torch.addmm(r2, self._nngp_eigen, p, beta=-1)).sum(-2)

                return mean, torch.stack([marginal(i) for i in range(flow.shape[0])])

            def test_cov(i: int, out: Tensor | None) -> Tensor:
                # rows I of Bᵀ P with B = Kv P − 2R, whose symmetrized sum is that of Pᵀ B: (B_I ∘ F)ᵀ Aᵀ
                # with B_I = Kv P_I − 2R_I, P_I = diag(F) A_Iᵀ, so that no (N, M) product is formed whole
                f = flow[i].unsqueeze(-1)
                return _by_rows(lambda r, o: torch.addmm(k_tt[r], (f * torch.addmm(r2[:, r], self._nngp_eigen,
                                                                                  f * a[r].mT, beta=-1)).mT,
                                                         a.mT, out=o),
                                k_tt.shape[0], rows, out)
        return mean, _per_time(test_cov, flow.shape[0], k_tt, flow.requires_grad, self.dtype, spare=k_tt)


def _training_marginal(v: Tensor, decay: Tensor, nngp_eigen: Tensor) -> Tensor:
    """``diag(V D E D Vᵀ)`` with ``D = diag(decay)``, ``E = Vᵀ K V``: the NTK flow's marginal variances
    at the training points, ``Σ_ab (VD)_na E_ab (VD)_nb``, a block of :data:`TEST_BLOCK_ENTRIES`
    entries of rows at a time: ``V (D E D)`` and its product with ``V`` held two ``N × N``
    temporaries beside the four the training side keeps (6.4 GB more at N = 20 000 in float64)."""
    rows = block_rows(v.shape[-1])
    out = []
    for start in range(0, max(v.shape[0], 1), rows):
        w = v[start:start + rows] * decay
        product = w @ nngp_eigen
        # in place where autograd does not follow (t without gradient): two blocks at a time, not three
        product = product * w if product.requires_grad else product.mul_(w)
        out.append(product.sum(-1))
    return torch.cat(out)


def _by_rows(block: Callable[[slice, Tensor | None], Tensor], count: int, rows: int, out: Tensor | None) -> Tensor:
    """A ``(count, ·)`` matrix whose rows ``r`` (``rows`` at a time) are ``block(r, out[r])``: written
    into ``out`` where given (``block`` may read those rows of ``out`` before it writes them), else
    concatenated (autograd follows)."""
    if out is not None:
        for start in range(0, count, rows):
            block(slice(start, start + rows), out[start:start + rows])
        return out
    return torch.cat([block(slice(start, start + rows), None) for start in range(0, max(count, 1), rows)])


def _per_time(cov: Callable[[int, Tensor | None], Tensor], count: int, like: Tensor, differentiable: bool,
              dtype: torch.dtype | None = None, spare: Tensor | None = None) -> Tensor:
    """The symmetrized ``cov(i, out)`` for ``i < count``, stacked: written in place into one
    buffer of ``dtype`` (default ``like``'s), unless autograd must see the products (``t`` with
    ``requires_grad``), which ``out=`` does not support.

    A narrower ``dtype`` (float32 inputs, float64 factors) gets each time's matrix through one
    scratch matrix of ``like``'s dtype: a float64 stack converted afterwards held the ``(T, M, M)``
    covariance three halves over (the stack and its copy). ``spare``, a matrix of ``like``'s shape
    and dtype that nothing needs after (the test kernel), takes a single time's result in place:
    a fresh output beside it held one ``(M, M)`` matrix more at the peak (2.88 against 1.88 at
    N = 2000, M = 10 000; the products are the same)."""
    if differentiable and torch.is_grad_enabled():
        return torch.stack([(c + c.mT) / 2 for c in (cov(i, None) for i in range(count))])
    dtype = like.dtype if dtype is None else dtype
    if spare is not None and count == 1:
        return symmetrize_(cov(0, spare)).unsqueeze(0).to(dtype)
    out = like.new_empty((count, *like.shape), dtype=dtype)
    scratch = None if dtype == like.dtype else like.new_empty(like.shape)
    for i in range(count):
        target = out[i] if scratch is None else scratch
        cov(i, target)
        symmetrize_(target)   # before the rounding: equal entries round alike, so out[i] stays symmetric
        if scratch is not None:
            out[i].copy_(scratch)
    return out


#: Side of the blocks :func:`symmetrize_` averages at a time.
SYMMETRIZE_BLOCK = 1024


def symmetrize_(cov: Tensor) -> Tensor:
    """``cov ← (cov + covᵀ)/2`` in place, block pair by block pair: ``(cov + cov.mT) / 2`` held two
    more ``(M, M)`` matrices (1.6 GB in float64 at 10 000 test points), the blocks 8 MB. Equal to it bitwise
    (``a + b = b + a`` in floating point), and exactly symmetric."""
    n = cov.shape[-1]
    for i in range(0, n, SYMMETRIZE_BLOCK):
        for j in range(i, n, SYMMETRIZE_BLOCK):
            upper = cov[..., i:i + SYMMETRIZE_BLOCK, j:j + SYMMETRIZE_BLOCK]
            lower = cov[..., j:j + SYMMETRIZE_BLOCK, i:i + SYMMETRIZE_BLOCK]
            average = (upper + lower.mT) / 2
            upper.copy_(average)
            lower.copy_(average.mT)
    return cov


def subtract_gram_(k_tt: Tensor, w: Tensor, mode: str) -> Tensor:
    """The GP posterior's ``Σ = K** − wᵀw`` with ``w = L⁻¹ Kd*`` (Rasmussen & Williams 2006, eq.
    2.24), in place in ``k_tt`` and symmetrized (``mode="full"``); or its diagonal
    ``diag K** − Σ_j w_jm²`` where ``k_tt`` holds the diagonal alone (``"diag"``, squaring ``w`` in
    place). Shared by the NNGP posterior and the NNGP flow at ``t = None``."""
    if mode == "diag":
        return k_tt.sub_(w.square_().sum(-2))
    return symmetrize_(k_tt.addmm_(w.mT, w, alpha=-1))


@overload
def gradient_flow(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None, t: Times = None,
                  learning_rate: float = 1.0, diag_reg: Diagonal = 0.0, kernel: str = "ntk",
                  compute_cov: Literal[True] = True, diag_reg_absolute_scale: bool = False,
                  steps: Steps = None, factor_dtype: torch.dtype = torch.float64) -> Gaussian[Tensor, Tensor]: ...


@overload
def gradient_flow(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None, t: Times = None,
                  learning_rate: float = 1.0, diag_reg: Diagonal = 0.0, kernel: str = "ntk", *,
                  compute_cov: Literal["diag"], diag_reg_absolute_scale: bool = False,
                  steps: Steps = None, factor_dtype: torch.dtype = torch.float64) -> Gaussian[None, Tensor]: ...


@overload
def gradient_flow(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None, t: Times = None,
                  learning_rate: float = 1.0, diag_reg: Diagonal = 0.0, kernel: str = "ntk", *,
                  compute_cov: Literal[False], diag_reg_absolute_scale: bool = False,
                  steps: Steps = None, factor_dtype: torch.dtype = torch.float64) -> Gaussian[None, None]: ...


@overload
def gradient_flow(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None, t: Times = None,
                  learning_rate: float = 1.0, diag_reg: Diagonal = 0.0, kernel: str = "ntk",
                  compute_cov: bool | str = True, diag_reg_absolute_scale: bool = False,
                  steps: Steps = None, factor_dtype: torch.dtype = torch.float64) -> Gaussian: ...


@neural_tangents_keywords(get=NT_KERNEL_HINT, trace_axes=NT_TRACE_AXES_SPEC_HINT)
def gradient_flow(net: Layer, x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None, t: Times = None,
                  learning_rate: float = 1.0, diag_reg: Diagonal = 0.0, kernel: str = "ntk",
                  compute_cov: bool | str = True, diag_reg_absolute_scale: bool = False,
                  steps: Steps = None, factor_dtype: torch.dtype = torch.float64) -> Gaussian:
    """One-shot :class:`GradientFlow` prediction: with ``τ = η t / m``, for ``kernel="ntk"``
    ``μ_t = Θ*d Θ⁻¹ (I − e^{−Θτ}) Y`` (see there for the covariance, the NNGP and the arguments; Lee
    et al. 2019, eqs. 15–16)."""
    # the cheap arguments first: GradientFlow computes the training kernel before predict reads them
    check_training_data(net, x_train, y_train)
    mode = covariance_mode(compute_cov)
    check_flag(diag_reg_absolute_scale, "diag_reg_absolute_scale")
    if x_test is not None:
        check_test_points(x_test, x_train.shape[-1], x_train.device)
    schedule = make_schedule(t, steps, learning_rate, y_train.numel(), x_train.device)
    if x_test is not None and mode == "full":   # before the training kernel
        check_covariance_fits(x_test.shape[0], 1 if schedule is None else schedule.values.numel(),
                              check_factor_dtype(factor_dtype), x_train.device)
    flow = GradientFlow(net, x_train, y_train, kernel=kernel, learning_rate=learning_rate, diag_reg=diag_reg,
                        diag_reg_absolute_scale=diag_reg_absolute_scale, factor_dtype=factor_dtype)
    return flow.predict(x_test, t=t, steps=steps, compute_cov=compute_cov)


__all__ = ["GradientFlow", "gradient_flow", "max_learning_rate"]
