r"""Training of one linearized network on any loss, with or without momentum, from its tangent kernel.

A network linearized around its initialization (exact at infinite width, Lee et al. 2019) moves
its parameters only along the rows of its Jacobian ``J`` at the training inputs, so after any
amount of gradient descent ``θ − θ_0 = −J(X)ᵀ R`` for dual coefficients ``R`` shaped like the
targets, and its outputs anywhere are

    f(x) = f_0(x) − Θ(x, X) R.

The squared loss has closed forms (:func:`ntkgp.predict.gradient_descent_mse`); any other loss
(cross-entropy on one-hot targets, a robust loss) is integrated here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import cast, overload

import torch
from torch import Tensor

from ntkgp._autograd import outside_inference_mode
from ntkgp._checks import NT_TRACE_AXES_KERNEL_HINT, integer_at_least, neural_tangents_keywords
from ntkgp._typing import Steps, Times
from ntkgp._warnings import caller_stacklevel
from ntkgp.layers.validation import finite_number, positive_number
from ntkgp.predict.gaussian import check_device, check_targets, kernel_matrix_error, refuse_gradient, tensor_kind
from ntkgp.predict.linearized import _check_kernel, _initial_outputs, check_full_kernel
from ntkgp.predict.odeint import StepLimitError, integrate, rms_norm
from ntkgp.predict.spectral import (
    carried_dtype,
    check_semi_definite_by_cholesky,
    check_symmetric,
    flatten_full_kernel,
    make_schedule,
    rounding_eps,
    warn_if_imprecise,
)

Loss = Callable[[Tensor, Tensor], Tensor]


@overload
def gradient_descent(loss: Loss, ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = ...,
                     ntk_test_train: None = ..., fx_test_0: None = ..., t: Times = ..., steps: Steps = ...,
                     learning_rate: float = ..., momentum: float | None = ..., rtol: float | None = ...,
                     atol: float | None = ..., max_steps: int = ..., dtype: torch.dtype = ...) -> Tensor: ...


@overload
def gradient_descent(loss: Loss, ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = ...,
                     ntk_test_train: Tensor, fx_test_0: Tensor | float, t: Times = ..., steps: Steps = ...,
                     learning_rate: float = ..., momentum: float | None = ..., rtol: float | None = ...,
                     atol: float | None = ..., max_steps: int = ..., dtype: torch.dtype = ...
                     ) -> tuple[Tensor, Tensor]: ...


@overload
def gradient_descent(loss: Loss, ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = ...,
                     ntk_test_train: Tensor | None = ..., fx_test_0: Tensor | float | None = ..., t: Times = ...,
                     steps: Steps = ..., learning_rate: float = ..., momentum: float | None = ...,
                     rtol: float | None = ..., atol: float | None = ..., max_steps: int = ...,
                     dtype: torch.dtype = ...) -> Tensor | tuple[Tensor, Tensor]: ...


# it differentiates the loss itself: under a caller's torch.inference_mode() autograd found no gradient,
# and the ValueError blamed a valid loss (torch.enable_grad() does not lift inference mode)
@neural_tangents_keywords(trace_axes=NT_TRACE_AXES_KERNEL_HINT)
@outside_inference_mode
def gradient_descent(loss: Loss, ntk_train_train: Tensor, y_train: Tensor, *, fx_train_0: Tensor | float = 0.0,
                     ntk_test_train: Tensor | None = None, fx_test_0: Tensor | float | None = None,
                     t: Times = None, steps: Steps = None, learning_rate: float = 1.0,
                     momentum: float | None = None, rtol: float | None = None, atol: float | None = None,
                     max_steps: int = 100_000, dtype: torch.dtype = torch.float64
                     ) -> Tensor | tuple[Tensor, Tensor]:
    r"""Outputs of one linearized network trained on any ``loss`` for time ``t`` (or ``steps`` steps).

    With ``f = f_0 − Θ R`` (module docstring), a gradient step on ``L(f(X), Y)`` adds
    ``η ∇_f L`` to ``R``; with heavy-ball momentum ``β`` the step ``p ← β p + η ∇_f L`` is added
    instead. ``steps`` iterates these maps exactly (``R_0 = p_0 = 0``). Continuous ``t``, in units
    of steps, integrates their limits (Lee et al. 2019, §2.2; neural-tangents'
    ``predict.gradient_descent``)::

        dR/dt = η ∇L(f_0(X) − Θ R)                                   (gradient flow)
        dR/dt = p,   dp/dt = η ∇L(f_0(X) − Θ R) − (1 − β) p         (momentum β)

    by an adaptive Dormand–Prince method (:mod:`ntkgp.predict.odeint`) whose local error on the
    training outputs ``f_0 − Θ R`` (and on their rate ``Θ p``) stays within ``atol + rtol |f|``.
    With momentum this is the limit of small steps at fixed ``(1 − β)/√η`` in time ``√η t``,
    neural-tangents' convention: there ``t`` counts steps too. So ``momentum=0.0`` is not
    ``momentum=None`` in continuous time (a second-order flow with damping ``1`` against the
    gradient flow: on a squared loss they start and converge together and differ in between),
    though their ``steps`` are the same. For the squared loss ``0.5 * ((f - y) ** 2).mean()`` the flow is
    :func:`gradient_descent_mse`'s ``e^{−Θ η t/m}``. On smooth losses the outputs' global error
    is about the tolerance (cross-entropy, log-cosh: within 2x of ``rtol = atol`` from ``1e-4``
    to ``1e-10``; with momentum ``0.9``, whose oscillations accumulate the local errors, 4–15x);
    a loss with kinks (Huber, hinge, L1) has a jumping ``∇²L`` where outputs cross them, the method's
    order drops there, and errors exceed the tolerance (Huber: ``9e-5`` at ``1e-6``). Explicit
    steps need ``η t λ_max(Θ ∇²L)`` of order their number: a stiff problem (a large kernel
    eigenvalue, long times) is cheaper in ``steps``, which are exact.

    The state (``f`` and ``R``, with momentum also ``p``) is summed in float64 whatever ``dtype``
    (which sets the kernel products and the loss), for the solver and for ``steps`` alike: the
    training outputs are the carried ``f`` (float64 ``steps``: ``f_0 − Θ R``, as exact), and the test
    outputs ``f_0* − Θ* R`` are formed in float64. So float32 integration keeps its tolerance on
    ill-conditioned kernels over long times (eigenvalues down to ``2e-8 λ_max``, ``t = 1e4``:
    ``8e-6`` against ``100 ε = 1.2e-5``; it was ``6e-3`` when the outputs came from a float32
    ``R``), and float32 steps stay well inside what
    rounding the kernel to float32 costs (10 000 steps: ``1.9e-6`` against ``6.8e-5``; ``2.4e-4``
    before; docs/numerics.md). A kernel's own float32 rounding is another matter: where it can move
    the test outputs by more than 1 % (estimated from ``R`` as :func:`gradient_descent_mse` does) a
    ``RuntimeWarning`` says so.

    Everything after ``y_train`` is keyword-only, as in :func:`gradient_descent_mse`.

    Args:
        loss: ``loss(f, y) -> `` a scalar tensor, differentiable in ``f`` by autograd, with
            ``f`` shaped like ``y_train``, e.g.
            ``lambda f, y: -(y * f.log_softmax(-1)).sum(-1).mean()`` on one-hot targets.
        ntk_train_train: ``(N, N)`` tangent kernel of the training inputs (``Θ ⊗ I`` across
            output units), or the full ``(N, N, k, k)`` kernel of ``k`` outputs; symmetric and
            positive semi-definite up to rounding (a ``ValueError`` otherwise).
        y_train: ``(N,)`` or ``(N, k)`` targets (``(N, k)`` with a full kernel), passed to
            ``loss`` in ``dtype``.
        fx_train_0: the network's initial outputs on the training inputs (``y_train``'s shape,
            or a number).
        ntk_test_train: ``(M, N)`` (or full ``(M, N, k, k)``) tangent kernel between test and
            training inputs, to also predict test outputs (together with ``fx_test_0``).
        fx_test_0: initial test outputs, ``(M,)`` or ``(M, k)`` like ``y_train``, or a number.
        t: a non-negative number or tensor of times, in units of steps (leading output shape);
            finite: an ODE has no closed form at ``t = ∞``.
        steps: instead of ``t``, discrete step counts (exact for the linearized network; a
            ``RuntimeWarning`` if the outputs overflow, as above the stability limit); counts, without
            a gradient (a tensor that requires grad is refused, as for ``t``).
        learning_rate: ``η``.
        momentum: ``None`` (plain gradient descent) or heavy-ball momentum ``β`` in ``[0, 1)``.
        rtol: the ODE solver's relative tolerance on the outputs (default ``1e-8`` in float64,
            ``100 ε`` of ``dtype`` otherwise); refused with ``steps``, which are exact.
        atol: its absolute tolerance, in the outputs' units (the same default).
        max_steps: most solver steps before a ``RuntimeError`` (a stiff problem), and the largest
            ``steps`` taken (each is a product with the kernel).
        dtype: ``torch.float64`` or ``torch.float32``, the dtype of the integration (results
            come back in the dtype of ``y_train``).

    Returns:
        ``fx_train_t``, or ``(fx_train_t, fx_test_t)`` when test inputs are given, with the
        shape of ``t`` (or ``steps``) in front. Differentiable with respect to the kernels,
        targets and initial outputs when one of them requires grad (through the steps taken,
        whose graph grows with their number; under ``torch.no_grad()`` none is kept).
    """
    if not callable(loss):
        raise ValueError(f"loss must be a function loss(f, y) returning a scalar tensor, got {type(loss).__name__}.")
    if (ntk_test_train is None) != (fx_test_0 is None):
        raise ValueError("Give both ntk_test_train and fx_test_0 to predict test outputs, or neither.")
    if dtype not in (torch.float32, torch.float64):   # half precision's ε made tolerances of 0.1 and more
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}.")
    max_steps = integer_at_least(max_steps, 1, "max_steps")
    refuse_gradient(momentum, "momentum", ": pass a plain number.")
    # before make_schedule, whose refusal suggests differentiating with respect to t, refused here too
    refuse_gradient(learning_rate, "learning_rate", ": pass a plain number.")
    beta = None if momentum is None else finite_number(momentum, "momentum", "a number in [0, 1)")
    if beta is not None and not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum must be in [0, 1) (heavy-ball momentum), got {momentum!r}.")
    if steps is not None and t is None and (rtol is not None or atol is not None):   # both: make_schedule says
        # exact steps have no tolerance: rtol=1e-3 with steps=3 was ignored without a word
        raise ValueError("rtol and atol are the ODE solver's tolerances, for times t; steps are taken exactly.")
    eps = torch.finfo(dtype).eps
    tolerances = [positive_number(v, name) if v is not None else max(1e-8, 100 * eps)
                  for v, name in ((rtol, "rtol"), (atol, "atol"))]
    _check_kernel(ntk_train_train, "ntk_train_train")
    kernel, test_kernel, y_shape = _kernels(ntk_train_train, y_train, ntk_test_train)
    out_dtype = y_train.dtype
    y = y_train.to(dtype, copy=True)   # the loss gets a copy: one that wrote to y changed the caller's targets
    f0 = _initial_outputs(fx_train_0, y.shape, "fx_train_0", y)
    if test_kernel is not None:   # given with ntk_test_train and fx_test_0 (checked above)
        rows = cast(Tensor, ntk_test_train).shape[0]
        fx_test_0 = _initial_outputs(cast("Tensor | float", fx_test_0), (rows, *y.shape[1:]), "fx_test_0", y)
        test_kernel = test_kernel.to(dtype)
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        # read as numbers, the times got no gradient, without a word
        raise ValueError("t is read as numbers here and gets no gradient; the rate of the outputs at time t is "
                         "−η Θ ∇L(f_t) (with momentum, the state's velocity), which can be evaluated at the result.")
    if isinstance(steps, Tensor) and steps.requires_grad and torch.is_grad_enabled():
        # as t: autograd said only that the outputs do "not require grad"
        raise ValueError("steps is read as step counts here and gets no gradient (the iteration is discrete); "
                         "differentiate with respect to the kernels, the targets or the initial outputs.")
    schedule = make_schedule(t, steps, learning_rate, y.numel(), y.device)
    if schedule is None or bool(torch.isinf(schedule.values).any()):   # t=None means t = ∞ elsewhere
        raise ValueError("Give finite times t or step counts steps: an ODE cannot be integrated to t = ∞ (for "
                         "the squared loss, gradient_descent_mse has the limit in closed form).")
    if schedule.discrete and int(schedule.values.max()) > max_steps:
        # one kernel product each, in a Python loop: 10**12 of them never returned
        raise ValueError(f"steps up to {int(schedule.values.max())} exceed max_steps={max_steps}: each step is a "
                         "product with the kernel; raise max_steps, or give times t for the ODE solver.")
    # symmetrized (exactly the same values for a symmetric kernel): the gradient with respect to it is then
    # symmetric, as gradient_descent_mse's (eigh's convention), and a step along it keeps it a kernel
    kernel = kernel.to(dtype)
    kernel = (kernel + kernel.mT) / 2
    given = carried_dtype(ntk_train_train)   # float32 also for a float32 kernel its caller cast up
    check_semi_definite_by_cholesky(kernel, "ntk_train_train", given)
    differentiable = torch.is_grad_enabled() and any(
        isinstance(v, Tensor) and v.requires_grad for v in (kernel, test_kernel, y, f0, fx_test_0))
    gradient = _loss_gradient(loss, y, f0, differentiable)

    eta = schedule.learning_rate
    descent, pull = _step(gradient, kernel, eta, y_shape)
    with torch.set_grad_enabled(differentiable):
        # the training outputs as the integrators carry them, not f_0 − Θ R from a float32 R: R grows like t
        # (its slow modes like r/λ), and a float32 product moves Θ R by ε‖Θ‖‖R‖ (a depth-50 erf kernel, t = 1e4:
        # 1.2e-2 off against the solver's 8e-6 on f itself; 10 000 discrete steps: 2.4e-4 against 1.9e-6)
        if schedule.discrete:
            fits, duals = _iterate(descent, pull, f0, eta, beta, schedule.values, kernel.dtype == torch.float64)
        else:
            fits, duals = _flow(descent, pull, f0, beta, schedule.values, *cast("tuple[float, float]", tolerances),
                                max_steps)   # rtol, atol
        train = schedule.reshape(torch.stack(fits), y.dim()).to(out_dtype)
        if test_kernel is None:
            return train
        assert isinstance(fx_test_0, Tensor)   # made a tensor with test_kernel above
        # in float64 after a float32 integration too (one product per time): R, rounded back to float32,
        # moved the outputs by ε‖Θ*‖‖R‖ (depth-50 erf kernel, t = 1e4: 2.6e-4; 3e-6 in float64)
        dual = torch.stack(duals)
        delta = _test_times(test_kernel, dual, fx_test_0.shape)
        # the kernels' rounding in dtype (or their own, if coarser) moves the test outputs as it moves
        # gradient_descent_mse's, through R: by about 2 ε max(d) ‖d ∘ R‖ (the test and the training kernel's)
        rounding = max(rounding_eps(kernel, given),
                       rounding_eps(test_kernel, carried_dtype(cast(Tensor, ntk_test_train))))
        warn_if_imprecise(dual.reshape(len(duals), kernel.shape[1], -1), delta, kernel.diagonal(),
                          rounding, schedule, remedy=_IMPRECISE_REMEDY)
        test = fx_test_0 - delta
        return train, schedule.reshape(test, fx_test_0.dim()).to(out_dtype)


_IMPRECISE_REMEDY = ("Compute the kernels in float64 (float64 inputs to net.kernel) and integrate in float64 "
                     "(dtype=torch.float64, the default).")


def _kernels(ntk_train_train: Tensor, y_train: Tensor, ntk_test_train: Tensor | None
             ) -> tuple[Tensor, Tensor | None, torch.Size]:
    """The training and test kernels as matrices acting on flattened outputs (a full ``(N, N, k, k)``
    kernel flattened to ``(N k, N k)``), after checking their shapes against the targets."""
    n = ntk_train_train.shape[0] if ntk_train_train.dim() else 0
    full = ntk_train_train.dim() == 4
    if full:
        n, _ = check_full_kernel(ntk_train_train, y_train)
    elif ntk_train_train.shape != (n, n):
        raise ValueError(f"ntk_train_train must be (N, N) or (N, N, k, k), got {tuple(ntk_train_train.shape)}.")
    check_targets(y_train, n, ntk_train_train.device, "ntk_train_train")
    kernel = flatten_full_kernel(ntk_train_train) if full else ntk_train_train
    check_symmetric(kernel, "ntk_train_train")   # a test–train kernel passed in its place, say
    test_kernel = None
    if ntk_test_train is not None:
        if not isinstance(ntk_test_train, Tensor):
            raise kernel_matrix_error(ntk_test_train, "ntk_test_train")
        check_device(ntk_test_train, "ntk_test_train", ntk_train_train.device, "ntk_train_train")
        _check_kernel(ntk_test_train, "ntk_test_train")
        expected = "(M, N, k, k)" if full else "(M, N)"
        if ntk_test_train.dim() != ntk_train_train.dim() or ntk_test_train.shape[1:] != ntk_train_train.shape[1:]:
            raise ValueError(f"ntk_test_train must be {expected} with (N, k) of ntk_train_train "
                             f"{tuple(ntk_train_train.shape)}, got {tuple(ntk_test_train.shape)}.")
        test_kernel = flatten_full_kernel(ntk_test_train) if full else ntk_test_train
    return kernel, test_kernel, y_train.shape


def _times(kernel: Tensor, dual: Tensor, shape: torch.Size) -> Tensor:
    """``Θ R`` for ``R`` shaped like the targets (``shape``), with any leading axes (the momentum
    state's): ``(*lead, rows, *shape[1:])``."""
    lead = dual.shape[:dual.dim() - len(shape)]
    columns = dual.reshape(*lead, kernel.shape[1], -1)
    return (kernel @ columns).reshape(*lead, -1, *shape[1:])


def _test_times(test_kernel: Tensor, duals: Tensor, shape: torch.Size) -> Tensor:
    """``Θ* R`` in float64 for float64 ``R`` ``(T, *y_shape)`` (from :func:`_flow` or
    :func:`_iterate`): ``(T, *shape)``. A float32 test kernel is widened in row blocks of at most
    ``2**22`` entries, so no float64 copy of a large one is made whole."""
    columns = duals.reshape(duals.shape[0], test_kernel.shape[1], -1)
    block = max(1, 2 ** 22 // max(1, test_kernel.shape[1]))
    if test_kernel.dtype == torch.float64 or test_kernel.shape[0] <= block:
        product = test_kernel.to(torch.float64) @ columns
    else:
        product = torch.cat([test_kernel[start:start + block].to(torch.float64) @ columns
                             for start in range(0, test_kernel.shape[0], block)], dim=1)
    return product.reshape(duals.shape[0], *shape)


def _loss_gradient(loss: Loss, y: Tensor, f0: Tensor, differentiable: bool) -> Callable[[Tensor], Tensor]:
    """``f ↦ ∇_f loss(f, y)``, after checking once, at ``f_0``, that ``loss`` gives a finite real
    scalar that depends on ``f`` (before any integration step)."""

    def gradient(f: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = f if (differentiable and f.requires_grad) else f.detach().requires_grad_()
            value = loss(leaf, y)
            if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"loss(f, y) must return a scalar floating-point tensor, got {tensor_kind(value)}"
                                 + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "") + ".")
            if not value.requires_grad:
                raise ValueError("loss(f, y) does not depend on f through torch operations (autograd found no "
                                 "gradient): write it with torch functions of f.")
            (grad,) = torch.autograd.grad(value.reshape(()), leaf, create_graph=differentiable, allow_unused=True)
        return torch.zeros_like(f) if grad is None else grad

    try:
        first = gradient(f0)
    except RuntimeError as err:   # torch's own words ("a leaf Variable ... in-place operation") did not name loss
        raise ValueError(f"loss(f, y) failed at the initial outputs: {err} (a loss must compute a new tensor from "
                         "f and y with torch operations, without changing either in place).") from err
    if not bool(torch.isfinite(first).all()):
        raise ValueError("The loss's gradient at the initial outputs fx_train_0 is not finite.")
    return gradient


def _step(gradient, kernel: Tensor, eta: float, y_shape: torch.Size
          ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``f ↦ g = η ∇L(f)`` and ``v ↦ Θ v``, both in float64: a step's change of ``R`` and (``−Θ g``,
    or ``−Θ p`` with momentum) of the training outputs, for :func:`_iterate` and :func:`_flow`, whose
    states are summed in float64 whatever ``dtype``; one product with ``Θ`` per step (or solver stage).

    The loss and the product stay in the kernel's dtype (O(N² k) against the sums' O(N k)); the sums
    do not: in float32, ``R`` (a sum of thousands of steps, growing like ``t``) took a rounding of
    ``ε|R|`` at each step and drifted (nothing in ``R ← R + η∇L`` pulls it back), and ``f_0 − Θ R``
    from it was off by ``ε‖Θ‖‖R‖``, growing with the number of steps (docs/numerics.md). Rounding
    the small increments ``Θ g`` instead moves ``f`` by ``ε‖Θ‖|g|`` per step, which shrinks as
    training converges and, in the directions the loss trains, is pulled back.
    """
    # (the casts are skipped, not made no-ops, in float64: a few µs each per stage showed on small kernels)
    work, wide = kernel.dtype, kernel.dtype == torch.float64

    def descent(f: Tensor) -> Tensor:
        g = eta * gradient(f if wide else f.to(work))
        return g if wide else g.to(torch.float64)

    def pull(v: Tensor) -> Tensor:
        product = _times(kernel, v if wide else v.to(work), y_shape)
        return product if wide else product.to(torch.float64)

    return descent, pull


def _iterate(descent, pull, f0: Tensor, eta: float, beta: float | None, steps: Tensor, exact_products: bool
             ) -> tuple[list[Tensor], list[Tensor]]:
    """The training outputs ``f_s`` and ``R_s`` at each of ``steps``, in float64: ``R ← R + g`` or,
    with momentum, ``p ← β p + g, R ← R + p``, for ``g = η ∇L(f)`` (:func:`_step`), with
    ``f = f_0 − Θ R``: one product with ``Θ`` per step.

    With ``exact_products`` (a float64 kernel: products as precise as the sums) ``f = f_0 − Θ R``
    is formed from ``R``, so rounding errors of ``R`` feed back through the loss and are trained
    away; carried as ``f ← f − Θ p`` instead, ``f`` and ``R`` drifted apart (float64 test outputs,
    which read ``R``, 1.1e-11 off the closed form after 10 000 heavy-ball steps at ``β = 0.9``;
    2e-14 from ``R``). A float32 product of the large ``R`` is off by ``ε‖Θ‖‖R‖``, growing with the
    steps, so there ``f`` is carried along by the same updates, ``f ← f − Θ g`` (or ``− Θ p``),
    whose rounding shrinks as training converges."""
    wanted = [int(s) for s in steps.tolist()]
    recorded, last = set(wanted), max(wanted)
    at: dict[int, tuple[Tensor, Tensor]] = {}
    f = start = f0.to(torch.float64)
    dual = velocity = torch.zeros_like(f)   # R and, with momentum, p
    warned = False
    for number in range(last + 1):
        if number in recorded:
            at[number] = (f, dual)
        if number == last:
            break
        g = descent(f)
        if beta is not None:
            velocity = beta * velocity + g
            g = velocity
        dual = dual + g
        f = start - pull(dual) if exact_products else f - pull(g)
        if not warned and not bool(torch.isfinite(f).all()):
            # the outputs overflowed: what follows is inf and NaN, which came back without a word
            warnings.warn(f"gradient_descent diverged: the training outputs overflowed at step {number + 1} "
                          f"(learning_rate={eta:g} is too large for this loss and kernel; for the squared loss the "
                          "stability limit is ntkgp.predict.max_learning_rate"
                          + ("" if beta is None else f"(..., momentum={beta:g}), (1 + momentum) times that without")
                          + ").", RuntimeWarning,
                          stacklevel=caller_stacklevel())
            warned = True
    return [at[s][0] for s in wanted], [at[s][1] for s in wanted]


def _flow(descent, pull, f0: Tensor, beta: float | None, times: Tensor, rtol: float, atol: float,
          max_steps: int) -> tuple[list[Tensor], list[Tensor]]:
    """The training outputs ``f(t)`` and ``R(t)`` at each of ``times`` from the gradient-flow (or
    momentum) ODE, in float64.

    The state carries the training outputs ``f`` beside ``R`` (and their rates ``v = −Θ p``
    beside ``p``): one product with ``Θ`` per stage (:func:`_step`), and the error test reads ``f``
    (and ``v``) directly. Runge–Kutta steps keep linear invariants, so ``f = f_0 − Θ R`` holds to
    rounding.
    """
    if beta is None:
        def rhs(z: Tensor) -> Tensor:   # z = (f, R)
            g = descent(z[0])
            return torch.stack([-pull(g), g])
        z0 = torch.stack([f0, torch.zeros_like(f0)])
        watched = [0]
    else:
        def rhs(z: Tensor) -> Tensor:   # z = (f, R, v, p)
            g = descent(z[0])
            return torch.stack([z[2], z[3], -pull(g) - (1 - beta) * z[2], g - (1 - beta) * z[3]])
        z0 = torch.stack([f0] + [torch.zeros_like(f0)] * 3)
        watched = [0, 2]
    z0 = z0.to(torch.float64)
    base = rms_norm(rtol, atol)

    def norm(err: Tensor, z: Tensor, z_new: Tensor) -> float:
        with torch.no_grad():
            return base(err[watched], z[watched], z_new[watched])

    values = times.tolist()
    order = sorted(range(len(values)), key=values.__getitem__)
    try:
        states = integrate(rhs, z0, [values[i] for i in order], norm, max_steps=max_steps)
    except StepLimitError as err:
        if err.non_finite:   # not stiffness: no step, however short, stays finite
            raise RuntimeError(f"gradient_descent: {err}, where the loss's gradient or the outputs became NaN or "
                               "infinite: the loss is not defined (or overflows) along the training path.") from None
        raise RuntimeError(f"gradient_descent: {err}. The problem is stiff for an explicit solver (a large "
                           "eigenvalue of Θ times the loss's curvature, or long times): take discrete steps "
                           "(steps=...), which are exact, raise max_steps, or loosen rtol/atol.") from None
    fits: list[Tensor] = [torch.empty(0)] * len(values)
    duals: list[Tensor] = [torch.empty(0)] * len(values)
    for i, state in zip(order, states, strict=True):
        fits[i], duals[i] = state[0], state[1]   # in float64: see gradient_descent's test outputs
    return fits, duals

