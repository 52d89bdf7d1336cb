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

import warnings

import torch
from torch import Tensor

from ntkgp.predict.gaussian import check_non_negative
from ntkgp.predict.spectral import Eigensystem, cholesky, make_schedule, regularize, spectral_apply


def gradient_descent_mse(ntk_train_train: Tensor, y_train: Tensor, fx_train_0: Tensor | float = 0.0,
                         ntk_test_train: Tensor | None = None, fx_test_0: Tensor | None = None, t=None, *,
                         steps=None, learning_rate: float = 1.0, diag_reg: float = 0.0,
                         diag_reg_absolute_scale: bool = False, factor_dtype: torch.dtype = torch.float64):
    """Outputs of one network after training for time ``t`` (or ``steps`` steps).

    Args:
        ntk_train_train: ``(N, N)`` tangent kernel of the training inputs.
        y_train: ``(N,)`` or ``(N, k)`` targets.
        fx_train_0: the network's initial outputs on the training inputs (same shape as
            ``y_train``, or a number).
        ntk_test_train: ``(M, N)`` tangent kernel between test and training inputs, to also
            predict test outputs (together with ``fx_test_0``).
        fx_test_0: ``(M,)`` or ``(M, k)`` initial test outputs.
        t: ``None`` (infinite time), a number or a tensor of times (leading output shape).
        steps: instead of ``t``, discrete gradient-descent step counts.
        learning_rate: ``η``; time enters as ``τ = η t / m`` with ``m = y_train.numel()``.
        diag_reg: added to ``ntk_train_train`` as ``diag_reg · trace/N · I``.
        diag_reg_absolute_scale: make ``diag_reg`` an absolute variance instead.
        factor_dtype: dtype in which the kernel is factored (results come back in the dtype of
            ``y_train``).

    Returns:
        ``fx_train_t``, or ``(fx_train_t, fx_test_t)`` when test inputs are given.
    """
    if (ntk_test_train is None) != (fx_test_0 is None):
        raise ValueError("Give both ntk_test_train and fx_test_0 to predict test outputs, or neither.")
    n = ntk_train_train.shape[-1]
    if ntk_train_train.shape != (n, n) or y_train.shape[0] != n:
        raise ValueError(f"ntk_train_train must be (N, N) and y_train (N, ...); got {tuple(ntk_train_train.shape)} "
                         f"and {tuple(y_train.shape)}.")
    if ntk_test_train is not None and ntk_test_train.shape[-1] != n:
        raise ValueError(f"ntk_test_train must be (M, {n}), got {tuple(ntk_test_train.shape)}.")
    out_dtype = y_train.dtype
    diag_reg = check_non_negative("diag_reg", diag_reg)
    y = y_train.to(factor_dtype)
    f0 = torch.as_tensor(fx_train_0, dtype=factor_dtype, device=y.device).expand_as(y)
    kernel = regularize(ntk_train_train.to(factor_dtype), diag_reg, diag_reg_absolute_scale)
    schedule = make_schedule(t, steps, learning_rate, y_train.numel(), y.device)
    residual = f0 - y
    flat = residual.reshape(n, -1)
    if schedule is None:
        train = y.clone()
        test = None
        if ntk_test_train is not None:
            coef = torch.cholesky_solve(-flat, cholesky(kernel, "training NTK"))
            test = fx_test_0.to(factor_dtype) + (ntk_test_train.to(factor_dtype) @ coef).reshape(fx_test_0.shape)
    else:
        eig = Eigensystem.of(kernel)
        if schedule.discrete and learning_rate > 2 * y_train.numel() / float(eig.values.max()):
            warnings.warn("learning_rate exceeds the stability limit 2m/λ_max: gradient descent diverges.",
                          RuntimeWarning, stacklevel=2)
        decay, flow = schedule.functions(eig)
        v = eig.vectors
        proj = v.mT @ flat                                                  # (N, k)
        train = f0 + spectral_apply(v, decay - 1, proj).reshape(-1, *y.shape)
        train = schedule.reshape(train, y.dim())
        test = None
        if ntk_test_train is not None:
            delta = spectral_apply(ntk_test_train.to(factor_dtype) @ v, flow, proj)
            test = fx_test_0.to(factor_dtype) - delta.reshape(-1, *fx_test_0.shape)
            test = schedule.reshape(test, fx_test_0.dim())
    if test is None:
        return train.to(out_dtype)
    return train.to(out_dtype), test.to(out_dtype)
