"""Array conversion and validation shared by the numpy-level helpers.

Deliberately free of torch imports: :mod:`ntkgp.bayes.metrics` and
:mod:`ntkgp.bayes.inference_data` only need numpy (and ArviZ), so they can be loaded and checked
in environments without torch (e.g. ArviZ 1.x on Python 3.12+).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from ntkgp._checks import holds_a_boolean, integer_at_least, seed_value  # noqa: F401  (re-exported)
from ntkgp._typing import ArrayLike

if TYPE_CHECKING:
    from torch import Tensor


def _not_numbers(value: object) -> str | None:
    """A description of what ``value`` holds that numpy's float conversion would turn into numbers
    though it is none (``None`` when there is nothing of the kind): text (parsed), ``None`` (NaN, then
    reported as "contains NaN": ``Gaussian.variance`` is ``None`` without a covariance), dates and
    durations (days since 1970), records (their field). One conversion and a look at the dtype, not a
    walk over the elements (a list of 10⁶ numbers), except for object arrays."""
    if isinstance(value, str | bytes):
        return "text"
    if value is None:
        return "None"
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):   # left to the conversion, which names it
        return None
    if array.dtype.kind in "US":
        return "text"
    if array.dtype.kind in "mM":
        return "dates or durations"
    if array.dtype.kind == "V":
        return "records (a structured array)"
    if array.dtype.kind == "O":
        types = set(map(type, array.flat))   # at C speed, as in holds_a_boolean
        if any(issubclass(t, str | bytes) for t in types):
            return "text"
        if type(None) in types:
            return "None"
    return None


def to_numpy(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` (a torch tensor, numpy array or nested sequence) as a float64 numpy array."""
    if isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value):
        # np.asarray drops the mask: the masked entries were scored with whatever values they hide
        raise ValueError(f"{name} has masked entries, which would be read as the values under the mask: "
                         "drop those points (or fill them) first.")
    what = None if hasattr(value, "detach") else _not_numbers(value)
    if what is not None:   # noise="0.1" was read as 0.1, variance=None as NaN
        raise ValueError(f"{name} must be numeric, got {what} ({type(value).__name__}).")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        value = cast("Tensor", value)
        if value.device.type == "meta":   # torch's "Cannot copy out of meta tensor" otherwise
            raise ValueError(f"{name} is on the meta device, which holds shapes but no values.")
        value = value.detach().cpu()
        if value.is_complex():
            raise ValueError(f"{name} must be real, got a {value.dtype} tensor.")
        # float64 first: numpy has no bfloat16, and float16/32 widen exactly
        value = (value.double() if value.is_floating_point() else value).numpy()
    try:
        complex_values = np.iscomplexobj(value)
        array = None if complex_values else np.asarray(value, dtype=np.float64)
    except RuntimeError as err:   # numpy reading a list of tensors that require grad: torch's .numpy() refuses
        raise ValueError(f"{name} holds tensors that require grad: detach them (or pass one tensor).") from err
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array or tensor, got {type(value).__name__}.") from err
    if complex_values:
        raise ValueError(f"{name} must be real, got complex values.")
    assert array is not None   # None only for the complex values refused above
    return array


def narrow_float_type(value: object) -> type | None:
    """``numpy.float32``/``float16`` for float32/float16 values (an array, a tensor, numpy scalars or a
    list of them), else ``None``: values typed in those precisions (``0.9`` is ``0.8999999762`` in
    float32) read back as typed through ``float(str(type(v)))``, numpy's shortest repr that
    round-trips in that precision. bfloat16 has no numpy type: its values are taken as they are."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(value).dtype
        except (TypeError, ValueError, RuntimeError):
            return None
    return {"float32": np.float32, "torch.float32": np.float32,
            "float16": np.float16, "torch.float16": np.float16}.get(str(dtype))


def finite(value: ArrayLike, name: str, booleans: bool = True) -> np.ndarray:
    """:func:`to_numpy`, and no NaN or infinite entries; without ``booleans``, ``True``/``False``
    (which numpy reads as 1 and 0) are refused, as for a noise or variance."""
    if not booleans and holds_a_boolean(value):
        raise ValueError(f"{name} must be a number or numbers, got booleans ({type(value).__name__}).")
    array = to_numpy(value, name)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def labels_array(value: ArrayLike, name: str = "labels") -> np.ndarray:
    """Integer class labels ``(M,)`` (integer-valued floats are accepted)."""
    array = finite(value, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must have shape (M,), got {array.shape}.")
    if not np.array_equal(array, np.round(array)):
        raise ValueError(f"{name} must hold integer class labels.")
    if array.size and np.abs(array).max() >= 2**53:   # beyond float64's exact integers (and int64's range)
        raise ValueError(f"{name} must be class indices below 2**53, got {np.abs(array).max():g}.")
    return array.astype(np.int64)


#: The hint for a leading axis ahead of ``(M[, k])``: times or ensemble members, never scored together.
LEADING_AXIS_HINT = (" If the first axis is times (gradient_flow at several t) or ensemble members, pick one time "
                     "(ntkgp.bayes.predictive_moments(..., time_index=i)) or take ntkgp.bayes.ensemble_moments first.")


def no_booleans(value: ArrayLike, name: str, targets: bool = True) -> None:
    """Refuse boolean targets or predictions, which numpy reads as 1 and 0, as ``NetworkGP`` refuses boolean
    ``train_y``: scored against a mean regressed on one-hot targets (``e_c − 1/C``, Lee et al. 2018) or on
    ``±1`` labels, 0/1 gave wrong residuals silently.

    The message names the conversion; for ``targets`` (not a mean) also the targets of classes, by the shape
    of the booleans: ``(M,)`` flags are two classes, as one output (``±1``) or as the labels of
    :func:`~ntkgp.bayes.one_hot_targets` (a mean ``(M, 2)``), and ``(M, C)`` ones a one-hot matrix. One
    recipe for every shape sent ``(M,)`` flags scored against an ``(M,)`` mean to ``one_hot_targets``, whose
    ``(M, 2)`` targets that mean does not have, and to ``accuracy``, which read the mean as labels."""
    if not holds_a_boolean(value):
        return
    fix = f"{name}.double()" if hasattr(value, "double") else f"np.asarray({name}, dtype=float)"
    try:
        shape = np.shape(cast("np.ndarray", value))
    except ValueError:   # ragged lists: the conversion alone
        shape = ()
    hint = ""
    if targets and len(shape) == 2 and shape[1] == 1:   # (M, 1) flags: no one-hot matrix
        hint = f", or {fix} * 2 - 1 for ±1 targets"
    elif targets and len(shape) == 1:
        hint = (f", or {fix} * 2 - 1 for ±1 targets; for two classes regressed on "
                f"ntkgp.bayes.one_hot_targets({name}) (a mean (M, 2)), score the mean against those targets, or use "
                f"ntkgp.bayes.accuracy(mean, {name})")
    elif targets and len(shape) == 2:
        labels = f"{name}.int().argmax(-1)" if hasattr(value, "double") else f"np.argmax({name}, -1)"
        hint = (f"; for one-hot classes, score the mean against ntkgp.bayes.one_hot_targets(labels, {shape[1]}) "
                f"(the targets e_c − 1/C it was regressed on), labels = {labels}, or use "
                "ntkgp.bayes.accuracy(mean, labels)")
    raise ValueError(f"{name} must be numbers, got booleans ({type(value).__name__}), which would be read as 1 and "
                     f"0: convert with {fix} if those are the values meant{hint}.")


def observations(mean: ArrayLike, y: ArrayLike, name_mean: str = "mean",
                 name_y: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Finite ``mean`` and ``y`` of one shape, ``(M,)`` or ``(M, k)`` with ``M, k >= 1``; not booleans
    (:func:`no_booleans`)."""
    no_booleans(mean, name_mean, targets=False)
    no_booleans(y, name_y)
    mean, y = finite(mean, name_mean), finite(y, name_y)
    if mean.ndim not in (1, 2) or 0 in mean.shape:   # (M, 0): every metric a mean of nothing, NaN
        raise ValueError(f"{name_mean} must have shape (M,) or (M, k) with M, k >= 1, got {mean.shape}."
                         + (LEADING_AXIS_HINT if mean.ndim == 3 else ""))
    if y.shape != mean.shape:
        # the shapes alone said nothing of the usual causes: gradient_flow's (T, M) means at several
        # times, and an ensemble's (M, 1) mean against (M,) targets
        hint = (" Squeeze the axis of size 1." if 1 in mean.shape[-1:] + y.shape[-1:] and mean.size == y.size
                else LEADING_AXIS_HINT if mean.ndim > 1 and mean.shape[1:] == y.shape else "")
        raise ValueError(f"{name_y} must have the shape of {name_mean}, {mean.shape}; got {y.shape}.{hint}")
    return mean, y


def broadcast_per_point(var: np.ndarray, shape: tuple[int, ...], has_outputs: bool, name: str) -> np.ndarray:
    """``var`` broadcast to ``shape``, where a 1-D ``var`` always means one value per point.

    ``shape`` ends in ``(M, k)`` when ``has_outputs`` (then an ``(M,)`` value is shared by the
    ``k`` outputs, as the shared-covariance posteriors of ntkgp are; one value per output is
    ``(1, k)``) and in ``(M,)`` otherwise. A ``(k,)`` value is refused: numpy would broadcast it
    per output, except when ``M == k``, where it would read per point. With draws or members
    ahead, ``shape = (S, M, k)``, an ``(S, 1)`` value is refused when ``S == M``: numpy reads it per
    point (as ``(M, 1)``), while it may be meant per draw, which is ``(S, 1, 1)``; so is ``(S, k)``
    (per point and output for numpy, ``(S, 1, k)`` per draw and output).
    """
    if has_outputs and len(shape) == 3 and var.shape == (shape[0], 1) and shape[0] == shape[1] > 1:
        raise ValueError(f"A {name} of shape {var.shape} with {shape[0]} draws of {shape[1]} points is ambiguous: "
                         f"pass shape ({shape[0]}, 1, 1) for one value per draw or member, or ({shape[1]},) for one "
                         "per point.")
    if has_outputs and len(shape) == 3 and var.shape == (shape[0], shape[2]) and shape[0] == shape[1] > 1:
        raise ValueError(f"A {name} of shape {var.shape} with {shape[0]} draws of {shape[1]} points is ambiguous: "
                         f"pass shape ({shape[0]}, 1, {shape[2]}) for one value per draw or member and output, or "
                         f"(1, {shape[1]}, {shape[2]}) for one per point and output.")
    points = shape[-2] if has_outputs else shape[-1]
    if var.ndim == 1 and var.shape[0] not in (1, points):
        # one fitted noise per ensemble member, as a list, is the likeliest 1-D value here: numpy's refusal
        # named no shape to pass, and with outputs the hint named the outputs' (1, k) alone
        hints = []
        if len(shape) == (3 if has_outputs else 2) and var.shape[0] == shape[0]:
            hints.append(f"for one value per draw or member pass shape ({shape[0]}, 1{', 1' if has_outputs else ''})")
        if has_outputs:
            hints.append(f"for one value per output pass shape (1, {shape[-1]})")
        if hints:   # otherwise numpy's refusal below, which names both shapes
            hint = "; ".join(hints)
            raise ValueError(f"A 1-D {name} holds one value per point, length {points}; got length {var.shape[0]}. "
                             f"{hint[:1].upper()}{hint[1:]}.")
    if var.ndim == 1 and has_outputs:
        var = var[:, None]
    try:
        return np.broadcast_to(var, shape)
    except ValueError as err:
        raise ValueError(f"{name} of shape {var.shape} does not fit (broadcast to) shape {shape}.") from err


def variances(variance: ArrayLike, shape: tuple[int, ...], name: str = "variance") -> np.ndarray:
    """Positive finite variances broadcast to ``shape`` (``(M,)`` or ``(M, k)``).

    A scalar, an array of ``shape``, or ``(M,)`` for ``(M, k)`` observations (one variance per
    point shared by all ``k`` outputs, as in the shared-covariance posteriors of ntkgp).
    """
    var = broadcast_per_point(finite(variance, name, booleans=False), shape, has_outputs=len(shape) == 2, name=name)
    if not (var > 0).all():
        raise ValueError(f"{name} must be positive (predictive variances include the noise); "
                         f"got minimum {var.min():g}.")
    return var
