"""The predictive distribution returned by the predictors, and target validation."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import NormalDist
from typing import Generic, cast

import numpy as np
import torch
from torch import Tensor
from typing_extensions import TypeVar  # default= (PEP 696) before Python 3.13

from ntkgp._checks import check_flag
from ntkgp._typing import Diagonal
from ntkgp.bayes._arrays import finite
from ntkgp.layers.base import Layer, NonFiniteKernelError, variance_batch_shapes
from ntkgp.layers.state import KernelState
from ntkgp.layers.validation import (
    all_finite,
    array_advice,
    check_points,
    finite_number,
    one_point_hint,
    refuse_meta,
)

#: The types of :attr:`Gaussian.covariance` and :attr:`Gaussian.variance`: each ``Tensor`` or ``None``
#: (both, by default: a Gaussian built by hand, whose constructor cannot tell the variance's type).
_Cov = TypeVar("_Cov", bound=Tensor | None, covariant=True, default=Tensor | None)
_Var = TypeVar("_Var", bound=Tensor | None, covariant=True, default=Tensor | None)


# eq=False: the generated __eq__ compared the tensors field by field, which raised torch's "Boolean value
# of Tensor with more than one value is ambiguous" for two results (and for `result in list`); compared
# by identity, as tensors are in containers
@dataclass(frozen=True, eq=False)
class Gaussian(Generic[_Cov, _Var]):
    """Mean and covariance of network outputs.

    To type checkers the predictors return ``Gaussian[Tensor, Tensor]`` (covariance and variances)
    by default, ``Gaussian[None, Tensor]`` with ``compute_cov="diag"`` (variances alone) and
    ``Gaussian[None, None]`` with ``compute_cov=False`` (the mean alone): the first argument is the
    type of :attr:`covariance`, the second that of :attr:`variance` (``Tensor | None`` each for a
    Gaussian built by hand).

    Attributes:
        mean: ``(*time, M)`` for 1-D targets, ``(*time, M, k)`` for ``k`` outputs.
        covariance: ``(*time, M, M)``, shared by every output unit (the full covariance is
            ``covariance ⊗ I_k``), or ``None`` when not computed; ``(M, M, k)``, one per output
            (``covariance[..., j]`` that of output ``j``), where ``per_output`` is set.
        scale: the largest prior variance the covariance was computed from (``max diag K**``, or
            of the training kernel for training-set outputs); set by the predictors, ``None`` for a
            Gaussian built by hand. The covariance is a difference of terms of this size, so its
            rounding error is relative to it even where the covariance itself is ~0 (test points the
            data pin): :func:`ntkgp.bayes.sample_outputs` tells rounding from indefiniteness by it.
        marginal: the marginal variances ``(*time, M)`` alone, where only those were computed
            (``compute_cov="diag"``: ``O(M N)`` memory instead of the ``(M, M)`` covariance, for
            large test sets); ``covariance`` is then ``None``. ``(M, k)``, shaped like the mean,
            where ``per_output`` is set.
        per_output: whether each of the ``k`` outputs has a covariance of its own, ``(M, M, k)``
            (marginal variances ``(M, k)``): the posterior of :class:`~ntkgp.predict.GPPosterior`
            with a noise per training point and output (``noise`` of shape ``(N, k)`` whose columns
            differ). The output axis is last, as in the mean and in neural-tangents' kernels (the
            diagonal over an output axis, ``diagonal_axes``, stays a trailing axis); GPyTorch's
            batch of ``k`` independent models holds ``covariance.permute(2, 0, 1)``.
            :meth:`output` picks one output's Gaussian.
    """

    mean: Tensor
    covariance: _Cov = None   # type: ignore[assignment]  # None: not computed
    scale: float | None = None
    marginal: Tensor | None = None
    per_output: bool = False

    @property
    def variance(self) -> _Var:
        """Marginal variances ``(*time, M)``, clamped at 0: where the data pin a test point (it
        repeats a training point, late in training) rounding leaves ``−1e-15 K**`` in place of 0.

        One per test point, shared by the ``k`` outputs: for ``(N, k)`` targets (``(N, 1)``
        included) it does not have the mean's shape, and ``mean ± 2 * variance.sqrt()`` broadcasts
        to ``(M, M)`` silently; :meth:`interval` gives bands shaped like the mean. With
        :attr:`per_output` it is ``(M, k)``, one per test point and output, shaped like the mean."""
        if self.covariance is None:
            return cast(_Var, None if self.marginal is None else self.marginal.clamp_min(0))
        if self.per_output:   # (M, M, k): the diagonal over the two point axes, output axis last
            return cast(_Var, torch.diagonal(self.covariance, dim1=-3, dim2=-2).mT.clamp_min(0))
        return cast(_Var, torch.diagonal(self.covariance, dim1=-2, dim2=-1).clamp_min(0))

    def output(self, j: int) -> Gaussian:
        """The Gaussian of output ``j`` alone (of ``(*time, M, k)`` means): mean ``(*time, M)``, and
        its own covariance ``(M, M)`` (marginal variances ``(M,)``) where :attr:`per_output` is set,
        the shared one otherwise. (:mod:`ntkgp.bayes`'s draws and exports take a Gaussian with a
        covariance per output as it is, each output drawn from its own.)"""
        if self.per_output:
            outputs = self.mean.dim() == 2
        elif self.covariance is not None:   # (*time, M, M) beside (*time, M) or (*time, M, k)
            outputs = self.mean.dim() == self.covariance.dim()
        elif self.marginal is not None:
            outputs = self.mean.dim() == self.marginal.dim() + 1
        else:   # a mean (T, M) of 1-D targets at T times would read as M points of T outputs
            raise ValueError("This Gaussian has a mean alone, which does not say which axis is the outputs': "
                             "index the mean, mean[..., j].")
        if not outputs:
            raise ValueError(f"output(j) picks one of the k outputs of a mean (*time, M, k), got mean "
                             f"{tuple(self.mean.shape)} (1-D targets).")
        k = self.mean.shape[-1]
        try:
            if isinstance(j, bool):
                raise TypeError
            index = operator.index(j)   # ints, numpy ints, integer tensors of one element
        except TypeError:
            index = k   # refused below, by name
        if not -k <= index < k:
            raise ValueError(f"j must be an integer in [-{k}, {k}) for {k} outputs, got {j!r}.")
        if not self.per_output:
            return Gaussian(self.mean[..., index], self.covariance, self.scale, self.marginal)
        cov = None if self.covariance is None else self.covariance[..., index]
        marginal = None if self.marginal is None else self.marginal[..., index]
        return Gaussian(self.mean[..., index], cov, self.scale, marginal)

    def interval(self, width: float | None = None, *, level: float | None = None) -> tuple[Tensor, Tensor]:
        """``mean ∓ width · σ``, each shaped like :attr:`mean` (``σ`` shared by the ``k`` outputs, or
        each output's own where :attr:`per_output` is set): the central band of each marginal of the
        outputs, noise-free (the band of noisy targets adds the noise variance to ``σ²``, as
        :func:`ntkgp.bayes.predictive_moments` does).

        Args:
            width: the half-width in standard deviations (a z-score), default 2 (a band that holds 95.4 %
                of each marginal); not a probability: ``interval(0.95)`` is ``mean ∓ 0.95 σ``, a 65.8 %
                band. For a coverage probability pass ``level`` instead.
            level: the probability ``p`` in (0, 1) that the band holds, as in ``scipy.stats.norm.interval(p)``:
                ``width = Φ⁻¹((1 + p) / 2)``, 1.96 for 0.95.
        """
        variance = self.variance
        if variance is None:
            raise ValueError("This Gaussian has no variances (predict with compute_cov=True or 'diag').")
        if level is not None:
            if width is not None:   # which one was meant is unknowable
                raise ValueError("Pass width (in standard deviations) or level (a probability), not both.")
            level = finite_number(level, "level", "a probability in (0, 1)")
            if not 0 < level < 1:
                raise ValueError(f"level must be a probability in (0, 1), got {level:g}.")
            # from the tail, −Φ⁻¹((1 − p)/2): 1 − p is exact for p >= 1/2, where (1 + p)/2 rounded to 1 for
            # p = 1 − 2⁻⁵³ (inv_cdf's "p must be in the range 0.0 < p < 1.0", of a p never given) and lost the
            # tail's digits near 1 (2e-6 relative at p = 1 − 1e-12, 3e-9 at 1 − 1e-9)
            width = -NormalDist().inv_cdf((1 - level) / 2)
        width = finite_number(2.0 if width is None else width, "width", "a finite number >= 0")
        if width < 0:   # the bounds would come out swapped
            raise ValueError(f"width must be a finite number >= 0, got {width:g}.")
        sd = variance.sqrt()
        sd = sd.unsqueeze(-1) if self.mean.dim() == sd.dim() + 1 else sd
        return self.mean - width * sd, self.mean + width * sd


def prior_scale(prior: Tensor) -> float:
    """:attr:`Gaussian.scale` of a covariance computed from the prior kernel ``prior``: ``max |diag|``
    (``prior`` a matrix, or its diagonal alone as a vector)."""
    diagonal = prior.detach() if prior.dim() == 1 else torch.diagonal(prior.detach(), dim1=-2, dim2=-1)
    return float(diagonal.abs().max()) if prior.numel() else 0.0


def covariance_mode(compute_cov: object) -> str | None:
    """The predictors' ``compute_cov``: ``True`` (the ``(M, M)`` covariance), ``"diag"`` (the
    marginal variances alone, :attr:`Gaussian.marginal`) or ``False`` (the mean alone); returns
    ``"full"``, ``"diag"`` or ``None``."""
    if isinstance(compute_cov, str) and compute_cov == "diag":
        return "diag"
    check_flag(compute_cov, "compute_cov", choices="True, False or 'diag' (the marginal variances alone)")
    return "full" if compute_cov else None


def check_targets(y_train: Tensor, n_train: int, device: torch.device | None = None, of: str = "x_train") -> Tensor:
    """``y_train`` must be a finite ``(N,)`` or ``(N, k)`` tensor matching the training inputs (and,
    given their ``device``, on it: otherwise the first product of the two, after the training
    kernel was computed and factored, failed with torch's "Expected all tensors to be on the same
    device")."""
    if not isinstance(y_train, Tensor):
        raise ValueError(f"y_train must be a torch.Tensor, got {type(y_train).__name__}"
                         f"{array_advice(y_train, 'y_train')}.")
    if y_train.dim() not in (1, 2):
        raise ValueError(f"y_train must have shape (N,) or (N, k), got {tuple(y_train.shape)}.")
    if y_train.shape[0] != n_train:
        size = f"has {n_train} points" if of == "x_train" else f"is {n_train} x {n_train}"   # or a kernel's
        raise ValueError(f"{of} {size} but y_train has {y_train.shape[0]} rows.")
    if y_train.numel() == 0:
        raise ValueError(f"y_train must hold at least one target, got shape {tuple(y_train.shape)}.")
    check_device(y_train, "y_train", device, of)
    if not y_train.is_floating_point():
        # integer targets (wine quality's 3..8, class labels) were told "without NaN or infinite values" too
        raise ValueError(f"y_train must be a floating-point tensor, got {y_train.dtype}; convert it with "
                         "y_train.double() or y_train.float().")
    if not all_finite(y_train, "y_train"):
        raise ValueError("y_train contains NaN or infinite values.")
    return y_train


def check_training_data(net: Layer, x_train: Tensor, y_train: Tensor) -> None:
    """``net`` must be one network (:func:`check_single_network`), ``x_train`` finite ``(N, d)``
    points and ``y_train`` targets for them on their device (:func:`check_targets`): the checks
    every predictor runs before its training kernel."""
    check_single_network(net)
    check_points(x_train, "x_train")
    if x_train.dim() != 2:
        raise ValueError(f"x_train must have shape (N, d), got {tuple(x_train.shape)}.")
    check_targets(y_train, x_train.shape[0], x_train.device)
    check_targets_range(y_train, x_train.dtype)


def check_targets_range(y_train: Tensor, out_dtype: torch.dtype) -> None:
    """``ValueError`` if ``y_train`` exceeds the range of ``out_dtype``, the training inputs' dtype in
    which the predictors return their means: float64 targets of ``1e39`` beside float32 inputs gave
    a mean of ``inf`` (the mean is of the targets' size; :func:`check_covariance_range` guards the
    covariance)."""
    if torch.finfo(y_train.dtype).max <= torch.finfo(out_dtype).max:   # a dtype no wider: nothing to overflow
        return
    low, high = torch.aminmax(y_train.detach())
    largest = max(-float(low), float(high))
    if largest > torch.finfo(out_dtype).max:
        raise ValueError(f"y_train reaches {largest:.3g}, beyond the range of {out_dtype}, the dtype of x_train in "
                         "which the predictions are returned: rescale the targets, or pass x_train in float64.")


class HyperparameterRecord:
    """The values of a network's parameters and buffers when a predictor computed its training kernel
    (or when :class:`ntkgp.models.NetworkGP` built its training solve, with its likelihood's plain
    tensors: ``attributes_of``).

    The predictors cache the training kernel and its factorization but compute the test kernels
    at each ``predict`` from the network as it is then. After a change of its variances
    (``net[0].weight_var = 5.0``, an optimizer step on a ``raw_`` parameter) the two came from
    different models, and a review's posterior mean matched neither (3.8 off a rebuilt one),
    silently. :meth:`check` refuses that; the values are scalars (a vector for per-feature
    weight variances), so recording and comparing them costs nothing beside a kernel. The
    network's printed form is compared too: it shows the layers' constants (an activation's
    ``a``, ``b``, ``gamma``, ``LayerNorm``'s ``eps``, widths), which are set at construction and
    not meant to change, to the digits it prints.
    """

    def __init__(self, net: object, attributes_of: torch.nn.Module | None = None) -> None:
        self.attributes_of = attributes_of
        self.values = {name: t.detach().clone() for name, t in self._tensors(net)}
        self.printed = repr(net)

    def _tensors(self, net: object) -> Iterator[tuple[str, Tensor]]:
        """``net``'s parameters and buffers, and the plain tensor attributes of ``attributes_of``'s
        modules (a ``FixedNoiseGaussianLikelihood`` keeps its noise in one)."""
        if not isinstance(net, torch.nn.Module):   # an object serving kernels of its own (tests use fixed matrices)
            return
        yield from net.named_parameters()
        yield from net.named_buffers()
        if self.attributes_of is not None:
            for prefix, module in self.attributes_of.named_modules():
                for name, value in vars(module).items():
                    if isinstance(value, Tensor):
                        yield f"attribute {prefix}.{name}", value

    def matches(self, net: object) -> bool:
        """Whether ``net``'s parameters and buffers (and ``attributes_of``'s tensors) hold the recorded values."""
        if repr(net) != self.printed:
            return False
        now = dict(self._tensors(net))   # compared as they are: cloning them all took a third of the time
        return now.keys() == self.values.keys() and all(
            now[name].shape == value.shape and torch.equal(now[name].detach().to(value.device), value)
            for name, value in self.values.items())

    def check(self, net: object) -> None:
        """``ValueError`` if ``net``'s parameters or buffers differ from the recorded ones."""
        if not self.matches(net):
            raise ValueError("The network's hyperparameters changed since this predictor (GradientFlow, GPPosterior) "
                             "computed its training kernel, which it caches with its factorization: build a new "
                             "one for the new values.")


def check_single_network(net: Layer) -> None:
    """An ntkgp spec ``net`` must have hyperparameters without a GPyTorch ``batch_shape``.

    A batch of hyperparameters (:meth:`~ntkgp.layers.base.Layer.expand_batch`) is a batch of
    models, whose kernels carry a leading batch dimension; the predictors factor one ``(N, N)``
    kernel and return numbers (the marginal likelihood a ``float``), so they refuse it rather than
    mix the models (a batched factor's log-determinant read ``inf``).
    """
    if not isinstance(net, Layer):   # an object serving kernels of its own (tests use fixed matrices)
        if not callable(getattr(net, "kernel", None)):   # None or a torch module: "has no attribute 'kernel'"
            hint = (" For a torch module's own (empirical) kernel see ntkgp.finite.empirical_ntk."
                    if isinstance(net, torch.nn.Module) else "")
            raise ValueError(f"net must be an ntkgp network spec (e.g. ntkgp.mlp(...)), got {type(net).__name__}."
                             + hint)
        return
    shapes = {tuple(shape) for shape in variance_batch_shapes(net) if len(shape)}
    if shapes:
        raise ValueError(f"net has hyperparameters with batch shape {sorted(shapes)[0]}: the predictors take one "
                         "network. Predict with each model's own spec, or put the kernel in a batched GPyTorch "
                         "model (ntkgp.NNGPKernel(net, batch_shape=...)).")


def check_device(t: Tensor, name: str, device: torch.device | None, of: str) -> None:
    """``ValueError`` unless ``t`` is on ``device`` (that of ``of``; ``None``: no check)."""
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {of} is on {device}: move them to one device.")


def check_test_points(x_test: Tensor, d: int, device: torch.device | None = None) -> None:
    """``x_test`` must be finite ``(M, d)`` points, ``d`` the training inputs' features (on their
    ``device``, if given)."""
    if isinstance(x_test, Tensor):
        check_device(x_test, "x_test", device, "x_train")
        if x_test.dim() == 1 and d > 1:
            # check_points' hint for 1-D inputs, x_test.unsqueeze(-1), makes M points of one feature
            raise ValueError(f"x_test must have shape (M, {d}), got shape {tuple(x_test.shape)}"
                             f"{one_point_hint(x_test, d, 'x_test')}.")
    check_points(x_test, "x_test")
    if x_test.dim() != 2 or x_test.shape[-1] != d:
        raise ValueError(f"x_test must have shape (M, {d}), got {tuple(x_test.shape)}.")


@contextmanager
def named_kernels(name: str) -> Iterator[None]:
    """Kernels that overflow inside (finite inputs can: ``|x|²`` exceeds the dtype's range from
    ``|x| ~ 1e154`` in float64, ``1e19`` in float32) say which of the predictor's kernels they are."""
    try:
        yield
    except NonFiniteKernelError as error:
        message = str(error)
        raise NonFiniteKernelError(f"The {name} kernel is not finite: {message[:1].lower()}{message[1:]}") from None


def check_covariance_range(prior: Tensor, out_dtype: torch.dtype) -> None:
    """``ValueError`` if ``prior``, the kernel at the points predicted, exceeds the range of ``out_dtype``.

    A predictive covariance is of the size of that prior, whose largest entry is on its diagonal
    (:func:`prior_scale`; a kernel is positive semi-definite). Float32 inputs have their kernels
    computed in float64, where inputs of ~1e20 give finite kernels of ~1e40; returned in float32,
    the covariance would be ``inf``. The mean, of the targets' size, is not affected.
    """
    if out_dtype == prior.dtype:
        return
    largest = prior_scale(prior)
    if largest > torch.finfo(out_dtype).max:
        raise ValueError(f"The prior kernel at the points predicted reaches {largest:.3g}, beyond the range of "
                         f"{out_dtype}, the inputs' dtype in which the predictive covariance is returned: rescale the "
                         "inputs, pass them in float64, or predict the mean alone (compute_cov=False).")


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device``: the machine's for the CPU, the card's for CUDA, ``None``
    where unknown (other devices, or an operating system that does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):   # no os.sysconf (Windows), or no such name
        return None


def refuse_beyond_memory(need: int, device: torch.device, what: str, advice: str, at_least: bool = False) -> None:
    """``torch.cuda.OutOfMemoryError`` (torch's own out-of-memory error, a ``RuntimeError``: callers that
    catch an allocation failure catch this too) where ``need`` bytes exceed :func:`device_memory` of
    ``device``: "``what`` needs ``need`` GiB on ``device``, more than its ``memory`` GiB: ``advice``."
    Checked before the work, which otherwise failed in torch's allocator only after it had begun, or,
    just above the free memory, was killed by the operating system without a word."""
    memory = device_memory(device)
    if memory is not None and need > memory:
        raise torch.cuda.OutOfMemoryError(f"{what} needs {'at least ' if at_least else ''}{need / 2**30:.3g} GiB on "
                                          f"{device}, more than its {memory / 2**30:.3g} GiB: {advice}.")


def check_covariance_fits(points: int, times: int, dtype: torch.dtype, device: torch.device) -> None:
    """``ValueError`` if the ``(times, M, M)`` covariance of ``M = points`` test points in ``dtype``
    alone exceeds the memory of ``device``, before any kernel is computed.

    Such a request cannot succeed: it failed only after the training kernel and its factorization
    (minutes at N = 20 000), as torch's "DefaultCPUAllocator: can't allocate memory" (or, between
    the free and the total memory, by the operating system killing the process), without a word
    on the marginal variances, which need ``O(M N)``."""
    memory = device_memory(device)
    need = times * points * points * torch.finfo(dtype).bits // 8
    if memory is not None and need > memory:
        raise ValueError(f"The ({times} x {points} x {points}) covariance of {points} test points needs "
                         f"{need / 2**30:.3g} GiB in {dtype}, more than the {memory / 2**30:.3g} GiB of {device}: ask "
                         "for the marginal variances alone (compute_cov='diag'), the mean alone (compute_cov=False), "
                         "or predict slices of the test points.")


def check_factor_dtype(value: object) -> torch.dtype:
    """``value`` if it is ``torch.float32`` or ``torch.float64``: the dtypes with an eigensolver and a
    Cholesky factorization on every device (half precision has neither)."""
    if value not in (torch.float32, torch.float64):
        raise ValueError(f"factor_dtype must be torch.float32 or torch.float64, got {value!r}.")
    return value


def tensor_kind(value: object) -> str:
    """What ``value`` is, for an error message: a tensor's dtype, otherwise its type's name."""
    return str(value.dtype) if isinstance(value, Tensor) else type(value).__name__


#: What to do instead of passing a network spec to a function of kernel matrices.
SPEC_FOR_KERNEL_ADVICE = ("squared-loss predictions from the spec itself are ntkgp.predict.gradient_flow "
                          "(GradientFlow) and gp_posterior")


def kernel_matrix_error(value: object, name: str, spec_advice: str = SPEC_FOR_KERNEL_ADVICE) -> ValueError:
    """The refusal of ``value`` where the kernel matrix ``name`` is expected. The two likeliest
    mistakes get a hint, since "got Serial" or "got KernelState" alone did not say which tensor
    to pass: the ``KernelState`` that ``net.kernel`` returns (pass one of its matrices), and the
    network spec, which the predictors of ``ntkgp.predict`` take but these functions do not."""
    message = f"{name} must be a floating-point tensor, got {tensor_kind(value)}."
    if isinstance(value, KernelState):
        message += " Pass one of its matrices: net.kernel(...).ntk (or .nngp)."
    elif isinstance(value, Layer):
        message += f" Pass a kernel matrix, such as net.kernel(x_train).ntk; {spec_advice}."
    return ValueError(message)


def refuse_gradient(value: object, name: str, advice: str) -> None:
    """Refuse a tensor that requires grad where the value is read as a plain number: its gradient
    was dropped silently (or autograd said only "does not require grad"). ``advice`` says what to
    do instead."""
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(f"{name} is read as a number and gets no gradient{advice}")


def check_non_negative(name: str, value: float | Tensor) -> float:
    """``value`` as a finite float ``>= 0``."""
    kind = "a finite non-negative number"
    number = finite_number(value, name, kind)
    if number < 0:
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return number


def check_diagonal(name: str, value: Diagonal, n: int, device: torch.device,
                   dtype: torch.dtype, outputs: int | None = None) -> float | Tensor:
    """``value`` for the training diagonal: a finite float ``>= 0`` (one for every point), or one per
    point, an ``(N,)`` tensor, array or list of numbers (heteroscedastic noise, as GPyTorch's
    ``FixedNoiseGaussianLikelihood``), returned as a copy on ``device`` in ``dtype``; given
    ``outputs = k`` (``(N, k)`` targets), also one per point and output, ``(N, k)``.

    A vector is always one value per point, whatever ``k``: a ``(k,)`` vector of one variance per
    output is refused (``expand(N, k)`` says that), so that with ``N == k`` nothing is guessed."""
    many = isinstance(value, list | tuple) or (isinstance(value, Tensor) and value.numel() > 1) or (
        isinstance(value, np.ndarray) and value.size > 1)
    if not many:   # a number, or a one-element tensor or array (finite_number reads those)
        return check_non_negative(name, cast(float | Tensor, value))
    if isinstance(value, list | tuple | np.ndarray):
        # read as the Bayesian helpers read per-point values (text, booleans, None, dates, tensors that
        # require grad and non-finite values refused by name), then copied: torch refuses an array with
        # negative strides (noise[::-1]) or of the other byte order, and warns for a read-only one
        value = torch.from_numpy(np.array(finite(value, name, booleans=False)))
    tensor = cast(Tensor, value)
    refuse_meta(tensor, name)
    if outputs is None and tensor.shape != (n,):
        raise ValueError(f"{name} must be a number or one value per training point, shape ({n},), got shape "
                         f"{tuple(tensor.shape)}.")
    if outputs is not None and tensor.shape not in ((n,), (n, outputs)):
        hint = (f" For one variance per output pass {name}=torch.tensor(levels, dtype=torch.float64)"
                f".expand({n}, {outputs})." if tensor.shape in ((outputs,), (1, outputs)) else "")
        raise ValueError(f"{name} must be a number, one value per training point, shape ({n},), or one per training "
                         f"point and output, shape ({n}, {outputs}), got shape {tuple(tensor.shape)}.{hint}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be real, got dtype {tensor.dtype}.")
    tensor = tensor.detach().to(device=device, dtype=dtype, copy=True)
    if not all_finite(tensor) or bool((tensor < 0).any()):
        index = tuple(int(i) for i in (~torch.isfinite(tensor) | (tensor < 0)).nonzero()[0])
        at = index[0] if len(index) == 1 else index
        raise ValueError(f"{name} must be finite and non-negative at every training point; entry {at} is "
                         f"{float(tensor[index])}.")
    return tensor
