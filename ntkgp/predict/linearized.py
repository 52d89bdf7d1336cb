r"""Training of one (linearized) network, given its tangent kernel and its initial outputs.

For a network linearized around its initialization (exact at infinite width, Lee et al. 2019),
gradient descent on ``(1/2m) ‖f − Y‖²`` with NTK ``Θ`` gives, with ``τ = η t/m``::

    f_t(X) = Y + e^{−Θτ} (f_0(X) − Y)
    f_t(x*) = f_0(x*) − Θ*d Θ⁻¹ (I − e^{−Θτ}) (f_0(X) − Y)

and ``(I − ηΘ/m)^s`` in place of ``e^{−Θτ}`` after ``s`` discrete steps (exact for the
linearized model at any learning rate). Works with analytic or empirical kernels
(:func:`ntkgp.finite.empirical_ntk`); matches neural-tangents' ``gradient_descent_mse``.
"""

from __future__ import annotations

import functools
from typing import cast, overload

import torch
from torch import Tensor

from ntkgp._checks import NT_TRACE_AXES_KERNEL_HINT, check_flag, neural_tangents_keywords
from ntkgp._typing import Diagonal, Steps, Times
from ntkgp.layers.validation import all_finite, boolean_or_complex, refuse_meta
from ntkgp.predict.gaussian import (
    check_device,
    check_diagonal,
    check_factor_dtype,
    check_targets,
    kernel_matrix_error,
)
from ntkgp.predict.spectral import (
    Eigensystem,
    carried_dtype,
    check_semi_definite_by_cholesky,
    check_symmetric,
    cholesky,
    cholesky_solve,
    flatten_full_kernel,
    is_regular,
    make_schedule,
    matrix_function_product,
    regularize,
    rounding_eps,
    stability_limit,
    warn_if_flow_imprecise,
    warn_if_imprecise,
    warn_if_unresolved,
    warn_if_unstable,
)


@overload
def gradient_descent_mse(ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = ...,
                         ntk_test_train: None = ..., fx_test_0: None = ..., t: Times = ..., steps: Steps = ...,
                         learning_rate: float = ..., diag_reg: Diagonal = ...,
                         diag_reg_absolute_scale: bool = ..., factor_dtype: torch.dtype = ...) -> Tensor: ...


@overload
def gradient_descent_mse(ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = ...,
                         ntk_test_train: Tensor, fx_test_0: Tensor | float, t: Times = ..., steps: Steps = ...,
                         learning_rate: float = ..., diag_reg: Diagonal = ...,
                         diag_reg_absolute_scale: bool = ..., factor_dtype: torch.dtype = ...
                         ) -> tuple[Tensor, Tensor]: ...


@overload
def gradient_descent_mse(ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = ...,
                         ntk_test_train: Tensor | None = ..., fx_test_0: Tensor | float | None = ..., t: Times = ...,
                         steps: Steps = ..., learning_rate: float = ..., diag_reg: Diagonal = ...,
                         diag_reg_absolute_scale: bool = ..., factor_dtype: torch.dtype = ...
                         ) -> Tensor | tuple[Tensor, Tensor]: ...


@neural_tangents_keywords(trace_axes=NT_TRACE_AXES_KERNEL_HINT)
def gradient_descent_mse(ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = 0.0,
                         ntk_test_train: Tensor | None = None, fx_test_0: Tensor | float | None = None,
                         t: Times = None, steps: Steps = None, learning_rate: float = 1.0,
                         diag_reg: Diagonal = 0.0, diag_reg_absolute_scale: bool = False,
                         factor_dtype: torch.dtype = torch.float64
                         ) -> Tensor | tuple[Tensor, Tensor]:
    r"""Outputs of one network after training for time ``t`` (or ``steps`` steps).

    The network linearized around its initialization (exact at infinite width, Lee et al. 2019)
    follows, with ``τ = η t / m``::

        f_t(X) = Y + e^{−Θτ} (f_0(X) − Y)
        f_t(x*) = f_0(x*) − Θ*d Θ⁻¹ (I − e^{−Θτ}) (f_0(X) − Y)

    with ``(I − ηΘ/m)^s`` in place of ``e^{−Θτ}`` after ``s`` discrete steps.

    Everything after ``y_train`` is keyword-only: neural-tangents' ``gradient_descent_mse(k, y,
    learning_rate)`` takes the learning rate third, where a positional ``fx_train_0`` would have
    read it as the initial outputs and returned the converged fit, ``y_train``, without a word.

    Args:
        ntk_train_train: ``(N, N)`` tangent kernel of the training inputs, or the full
            ``(N, N, k, k)`` kernel of ``k`` outputs (``empirical_ntk(..., vector_output=True)``,
            neural-tangents' ``trace_axes=()``), whose outputs then train jointly.
        y_train: ``(N,)`` or ``(N, k)`` targets (``(N, k)`` with a full kernel).
        fx_train_0: the network's initial outputs on the training inputs (the shape of
            ``y_train``, or a number).
        ntk_test_train: ``(M, N)`` (or full ``(M, N, k, k)``) tangent kernel between test and
            training inputs, to also predict test outputs (together with ``fx_test_0``).
        fx_test_0: initial test outputs, ``(M,)`` or ``(M, k)`` like ``y_train``, or a number.
        t: ``None`` (infinite time), a number or a tensor of times (leading output shape).
        steps: instead of ``t``, discrete gradient-descent step counts.
        learning_rate: ``η``; time enters as ``τ = η t / m`` with ``m = y_train.numel()``.
        diag_reg: added to ``ntk_train_train`` as ``diag_reg · trace/N · I``; or ``(N,)``, one per
            training point (a tensor, array or list), added as ``trace/N · diag(diag_reg)``, as
            :class:`~ntkgp.predict.GradientFlow` takes it (with a full kernel each point's ``k``
            outputs get its value, and ``trace/N`` is the flattened kernel's mean diagonal). A tensor
            that requires grad gets its gradient.
        diag_reg_absolute_scale: make ``diag_reg`` an absolute variance instead.
        factor_dtype: dtype in which the kernel is factored (results come back in the dtype of
            ``y_train``). A kernel given in a coarser dtype (or a float32 kernel cast up to float64,
            as :func:`~ntkgp.predict.spectral.carried_dtype` recognizes it) keeps its rounding: its null
            eigenvalues (``t = ∞``) and singular pivots (``t = None``) are judged at that dtype's
            ``ε`` (``N · ε · λ_max``), not at ``factor_dtype``'s, and a ``RuntimeWarning`` says
            where that rounding can move the test outputs by more than 1 % (docs/numerics.md,
            "Float32 predictions").

    Returns:
        ``fx_train_t``, or ``(fx_train_t, fx_test_t)`` when test inputs are given.
    """
    if (ntk_test_train is None) != (fx_test_0 is None):
        raise ValueError("Give both ntk_test_train and fx_test_0 to predict test outputs, or neither.")
    _check_kernel(ntk_train_train, "ntk_train_train")
    check_factor_dtype(factor_dtype)
    check_flag(diag_reg_absolute_scale, "diag_reg_absolute_scale")
    if ntk_train_train.dim() == 4:
        return _full_kernel(ntk_train_train, y_train, fx_train_0, ntk_test_train, fx_test_0, t, steps=steps,
                            learning_rate=learning_rate, diag_reg=diag_reg,
                            diag_reg_absolute_scale=diag_reg_absolute_scale, factor_dtype=factor_dtype)
    n = ntk_train_train.shape[-1]
    if ntk_train_train.shape != (n, n):
        raise ValueError(f"ntk_train_train must be (N, N), got {tuple(ntk_train_train.shape)}.")
    check_symmetric(ntk_train_train, "ntk_train_train")
    if isinstance(y_train, Tensor) and y_train.dim() in (1, 2) and y_train.shape[0] != n:
        raise ValueError(f"ntk_train_train is {n} x {n} but y_train has {y_train.shape[0]} rows.")
    check_targets(y_train, n, ntk_train_train.device, "ntk_train_train")
    out_dtype = y_train.dtype
    # a tensor that requires grad is kept: the regularizer's gradient flows like the kernel's
    differentiable_reg = diag_reg if isinstance(diag_reg, Tensor) and diag_reg.requires_grad else None
    # one number, or one per training point, (N,), as GradientFlow takes it (a detached copy)
    diag_reg = check_diagonal("diag_reg", diag_reg, n, ntk_train_train.device, factor_dtype)
    y = y_train.to(factor_dtype)
    f0 = _initial_outputs(fx_train_0, y.shape, "fx_train_0", y)
    if ntk_test_train is not None:
        if isinstance(ntk_test_train, Tensor):
            check_device(ntk_test_train, "ntk_test_train", ntk_train_train.device, "ntk_train_train")
        _check_kernel(ntk_test_train, "ntk_test_train")
        if ntk_test_train.dim() != 2 or ntk_test_train.shape[-1] != n:
            raise ValueError(f"ntk_test_train must be (M, {n}), got {tuple(ntk_test_train.shape)}.")
        fx_test_0 = _initial_outputs(cast("Tensor | float", fx_test_0), (ntk_test_train.shape[0], *y.shape[1:]),
                                     "fx_test_0", y)   # given with ntk_test_train (checked above)
    kernel = regularize(ntk_train_train.to(factor_dtype), diag_reg if differentiable_reg is None else
                        differentiable_reg.to(device=ntk_train_train.device, dtype=factor_dtype),
                        diag_reg_absolute_scale)
    schedule = make_schedule(t, steps, learning_rate, y_train.numel(), y.device)
    residual = f0 - y
    flat = residual.reshape(n, -1)
    # a float32 kernel cast to float64 keeps its float32 rounding: its null directions (duplicates, more
    # points than parameters) carry eigenvalues of either sign up to ~1e-7 λ_max, which a float64
    # threshold took for real ones and inverted (rank 10 of 40 points: test outputs 5.0 off at t = ∞)
    given = carried_dtype(ntk_train_train)   # float32 also for a float32 kernel its caller cast up
    if schedule is None:
        # also for the training outputs: a singular kernel cannot fit Y
        try:
            factor = cholesky(kernel, "training NTK", given=given)
        except ValueError:
            # a matrix clearly not semi-definite (-Θ: eigenvalues -7.0 to -0.86) is no tangent kernel, as finite
            # times say; cholesky's reading of it as singular advised diag_reg=1e-6, which cannot help
            check_semi_definite_by_cholesky(kernel.detach(), "ntk_train_train", given)
            raise
        train = y.clone()
        test = None
        if ntk_test_train is not None:
            assert isinstance(fx_test_0, Tensor)   # made a tensor with ntk_test_train above
            coef = cholesky_solve(-flat, factor)
            delta = ntk_test_train.to(factor_dtype) @ coef
            warn_if_imprecise(coef, delta, kernel.diagonal(), rounding_eps(kernel, given),
                              factor_eps=torch.finfo(kernel.dtype).eps)
            test = fx_test_0.to(factor_dtype) + delta.reshape(fx_test_0.shape)
    else:
        # the eigenvectors carry no graph: autograd through eigh divides by eigenvalue gaps (NaN for
        # repeated ones); matrix_function_product differentiates the matrix functions instead
        eig = Eigensystem.of(kernel.detach(), check_as=("ntk_train_train", given))
        if schedule.discrete:
            warn_if_unstable(schedule.learning_rate, stability_limit(float(eig.values.max()), y_train.numel()),
                             factor_dtype, out_dtype, covariance=False)   # one network: no covariance
        slopes: tuple[Tensor | None, Tensor | None] = (None, None)
        if kernel.requires_grad and torch.is_grad_enabled():
            slopes = schedule.slopes(eig)
        delta = matrix_function_product(kernel, eig, schedule, 1, slopes[0], flat)
        # Vᵀ y and the regularity test (a factorization, made when a warning needs it), once for the
        # warnings of both the training and the test outputs
        regular = functools.cache(lambda: is_regular(kernel, given))
        with torch.no_grad():
            right = eig.vectors.mT @ flat
            warn_if_unresolved(None, right, delta, schedule, eig, regular)
        train = f0 - delta.reshape(-1, *y.shape)
        train = schedule.reshape(train, y.dim())
        test = None
        if ntk_test_train is not None:
            assert isinstance(fx_test_0, Tensor)   # made a tensor with ntk_test_train above
            left = ntk_test_train.to(factor_dtype)
            test_eigen = left.detach() @ eig.vectors   # the product's own backward differentiates left
            delta = matrix_function_product(kernel, eig, schedule, 2, slopes[1], flat, test_eigen, left)
            with torch.no_grad():
                warn_if_unresolved(test_eigen, right, delta, schedule, eig, regular)
                warn_if_flow_imprecise(eig, None, right, delta, kernel.diagonal(), schedule)
            # the number of times, not -1: an empty test set has no entries to infer it from
            test = fx_test_0.to(factor_dtype) - delta.reshape(delta.shape[0], *fx_test_0.shape)
            test = schedule.reshape(test, fx_test_0.dim())
    if test is None:
        return train.to(out_dtype)
    return train.to(out_dtype), test.to(out_dtype)


def _full_kernel(ntk_train_train: Tensor, y_train: Tensor, fx_train_0, ntk_test_train, fx_test_0, t, **options):
    """:func:`gradient_descent_mse` with ``(N, N, k, k)`` kernels: the ``N k`` outputs are one
    flat vector trained by the ``(N k, N k)`` kernel of :func:`flatten_full_kernel` (so relative
    ``diag_reg`` scales by its mean diagonal, as in neural-tangents). An ``(N,)`` ``diag_reg`` gives each
    point's ``k`` outputs its value: for a kernel ``Θ ⊗ I_k`` this is the ``(N, N)`` kernel's regularization
    (``trace/(N k)`` of the flat kernel is ``trace(Θ)/N``)."""
    n, k = check_full_kernel(ntk_train_train, y_train)
    # checked against N here: the flat call would take an (N k,) vector, one per output, which no other
    # predictor takes (a vector is one value per point)
    given = options["diag_reg"]
    per_point = check_diagonal("diag_reg", given, n, ntk_train_train.device, options["factor_dtype"])
    if isinstance(per_point, Tensor):
        if isinstance(given, Tensor) and given.requires_grad:   # its gradient flows, as a number's does
            per_point = given.to(device=ntk_train_train.device, dtype=options["factor_dtype"])
        options["diag_reg"] = per_point.repeat_interleave(k)   # the flat outputs are point-major, (r, i) -> r k + i

    like = torch.empty(0, dtype=options["factor_dtype"], device=ntk_train_train.device)

    def flat_outputs(value: Tensor | float, rows: int, name: str) -> Tensor:
        # checked and stretched (size-1 axes) against (rows, k) by the (N, N) path's own rule, arrays and
        # lists included: passed on as they were, an (N, k) numpy array met the flat call's (N k,) and was
        # refused as "must have shape (8,), got (4, 2)", though the (N, N) kernel and gradient_descent take it
        return _initial_outputs(value, (rows, k), name, like).reshape(rows * k)

    test_kernel = None
    if ntk_test_train is not None:
        _check_kernel(ntk_test_train, "ntk_test_train")
        if ntk_test_train.dim() != 4 or ntk_test_train.shape[1:] != (n, k, k):
            raise ValueError(f"With a full ntk_train_train, ntk_test_train must be (M, {n}, {k}, {k}), got "
                             f"{tuple(ntk_test_train.shape)}.")
        m = ntk_test_train.shape[0]
        test_kernel, fx_test_0 = flatten_full_kernel(ntk_test_train), flat_outputs(fx_test_0, m, "fx_test_0")
    out = gradient_descent_mse(flatten_full_kernel(ntk_train_train), y_train.reshape(n * k),
                               fx_train_0=flat_outputs(fx_train_0, n, "fx_train_0"), ntk_test_train=test_kernel,
                               fx_test_0=fx_test_0, t=t, **options)
    if test_kernel is None:
        return cast(Tensor, out).unflatten(-1, (n, k))   # the training outputs alone, without test_kernel
    assert isinstance(out, tuple)   # training and test outputs, given test_kernel
    return out[0].unflatten(-1, (n, k)), out[1].unflatten(-1, (ntk_test_train.shape[0], k))


def check_full_kernel(ntk_train_train: Tensor, y_train: Tensor) -> tuple[int, int]:
    """``(N, k)`` of a full ``(N, N, k, k)`` training kernel, whose targets must be ``(N, k)``."""
    n, n2, k, k2 = ntk_train_train.shape
    if n != n2 or k != k2:
        raise ValueError(f"A full ntk_train_train must be (N, N, k, k), got {tuple(ntk_train_train.shape)}.")
    if not isinstance(y_train, Tensor) or y_train.shape != (n, k):
        shape = tuple(y_train.shape) if isinstance(y_train, Tensor) else type(y_train).__name__
        raise ValueError(f"With a full (N, N, k, k) = {tuple(ntk_train_train.shape)} kernel y_train must be "
                         f"(N, k) = {(n, k)}, got {shape}.")
    # here, not on the flattened matrix, whose refusal advised the (N, N, k, k) kernel's outputs alone transposed
    check_symmetric(ntk_train_train, "ntk_train_train", full=True)
    return n, k


def _check_kernel(kernel: Tensor, name: str) -> None:
    if not isinstance(kernel, Tensor) or not kernel.is_floating_point():
        raise kernel_matrix_error(kernel, name)
    if not all_finite(kernel, name):
        raise ValueError(f"{name} contains NaN or infinite values.")


def _initial_outputs(value: Tensor | float, shape: tuple[int, ...], name: str, like: Tensor) -> Tensor:
    """``value`` (a number, or a tensor that broadcasts to ``shape``) as a finite tensor of ``shape``."""
    refuse_meta(value, name)   # as_tensor's "Cannot copy out of meta tensor" otherwise
    if value is None:   # only fx_train_0 gets here as None (fx_test_0=None means no test inputs)
        # neural-tangents' predict_fn(t, None, fx_test_0, k_test_train) skips the training outputs and trains
        # from zero ones; the port met "must be a number or a tensor ..., got None" without the equivalent
        raise ValueError(f"{name} must be a number or a tensor of shape {tuple(shape)}, got None: neural-tangents' "
                         f"{name}=None (test outputs alone, trained from zero training outputs) is {name}=0.0 here, "
                         "whose result holds the training outputs first, (fx_train_t, fx_test_t).")
    if boolean_or_complex(value):
        # the cast to the targets' dtype dropped the imaginary part of a complex tensor or array (with
        # only torch's warning) and read True as 1, where complex and boolean targets are refused
        raise ValueError(f"{name} must hold real numbers, got {getattr(value, 'dtype', type(value).__name__)}; "
                         "pass the real part (.real) of complex values if that is meant.")
    try:   # a string or None failed in torch's conversion ("new(): invalid data type 'str'")
        tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a number or a tensor of shape {tuple(shape)}, got {value!r}.") from err
    try:
        # only size-1 axes stretch: an (M,) value against (M, k) outputs would otherwise be read
        # as one value per output unit whenever M == k
        if tensor.dim() not in (0, len(shape)):
            raise RuntimeError
        out = tensor.expand(shape)
    except RuntimeError as err:
        raise ValueError(f"{name} must be a number or have shape {tuple(shape)} (size-1 axes broadcast), got "
                         f"{tuple(tensor.shape)}.") from err
    if not all_finite(out):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return out
