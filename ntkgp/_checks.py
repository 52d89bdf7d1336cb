"""Argument checks shared by every subpackage, free of torch imports (see ``ntkgp.bayes._arrays``)."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import SupportsIndex, cast

import numpy as np

from ntkgp._typing import Function


def holds_a_boolean(value: object) -> bool:
    """Whether ``value`` is a boolean, a boolean array or tensor, or nests one in lists/tuples or a
    numpy object array (``[True, 3.0]`` becomes a float array, whose ``1.0`` no longer says so).

    Nested lists are read as an object array and its elements' types collected at C speed: a
    Python walk took 7 s over a list of 10⁶ numbers."""
    if isinstance(value, bool | np.bool_):
        return True
    if isinstance(value, list | tuple):
        try:
            value = np.asarray(value, dtype=object)   # the elements themselves, not converted
        except (TypeError, ValueError, RuntimeError):   # ragged, or tensors that require grad
            return any(holds_a_boolean(v) for v in value)
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    kind = getattr(dtype, "kind", None)   # a torch dtype has none: compared by name, without importing torch
    if kind == "b" or str(dtype) == "torch.bool":
        return True
    if kind != "O":
        return False
    flat = np.asarray(value).ravel()
    types = set(map(type, flat))
    if any(issubclass(t, bool | np.bool_) for t in types):
        return True
    others = tuple(t for t in types if not issubclass(t, int | float | complex | np.number))
    return bool(others) and any(holds_a_boolean(v) for v in flat if isinstance(v, others))


def integer_at_least(value: object, minimum: int, name: str) -> int:
    """``value`` as a Python int (ints, numpy integers, 0-d integer tensors), and ``>= minimum``;
    booleans are refused."""
    try:
        if isinstance(value, bool | np.bool_):
            raise TypeError
        number = operator.index(cast(SupportsIndex, value))   # anything else raises the TypeError caught below
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return number


def seed_value(value: object, minimum: int = -(2**63), name: str = "seed") -> int:
    """A seed as a Python int in ``[minimum, 2⁶⁴)``: torch's generators take ``[-2⁶³, 2⁶⁴)``, numpy's
    ``SeedSequence`` non-negative integers (``minimum=0``). Numpy and 0-d tensor integers are
    accepted (torch's ``manual_seed`` takes Python ints alone), booleans and floats refused."""
    seed = integer_at_least(value, minimum, name)
    if seed >= 2**64:
        raise ValueError(f"{name} must be below 2**64, got {value!r}.")
    return seed


NT_GET_HINT = ("neural-tangents' get argument has no counterpart here: the result holds both kernels (.nngp and "
               ".ntk; ntk=False skips the NTK).")


#: neural-tangents' trace_axes, for the predictors that take an ntkgp network spec: its analytic
#: kernels are per output unit already.
NT_TRACE_AXES_SPEC_HINT = ("the analytic kernels of an infinitely wide network are the same for every output unit and "
                           "independent across them (neural-tangents' default trace_axes=(-1,)): drop the argument; "
                           "(N, k) targets share the (N, N) kernel.")

#: neural-tangents' trace_axes, for the functions that take kernels: told apart by the kernel's shape.
NT_TRACE_AXES_KERNEL_HINT = ("the kernel's shape says it: an (N, N) kernel is shared by the output units "
                             "(neural-tangents' default trace_axes=(-1,)), a full (N, N, k, k) kernel "
                             "(ntkgp.finite.empirical_ntk(..., vector_output=True)) trains them jointly "
                             "(trace_axes=()).")

NT_KERNEL_HINT = ("pass kernel='ntk' or kernel='nngp' (neural-tangents' get names the kernel; for both, one "
                  "predictor per kernel).")




def neural_tangents_keywords(**hints: str) -> Callable[[Function], Function]:
    """Decorator: a keyword argument of the neural-tangents counterpart that the function lacks
    raises a ``TypeError`` that says what to pass instead (``hints[name]``); a port otherwise met
    Python's bare "unexpected keyword argument"."""
    # typed as returning its argument: Callable -> Callable hid the signatures of every decorated
    # function (Layer.kernel, gp_posterior, GradientFlow, ...) from type checkers and completion
    def decorate(fn: Function) -> Function:
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            ported = [name for name in hints if name in kwargs]
            if ported:
                raise TypeError(f"{fn.__qualname__.removesuffix('.__init__')} got an unexpected keyword argument "
                                f"{ported[0]!r}: {hints[ported[0]]}")
            return fn(*args, **kwargs)
        return cast(Function, checked)
    return decorate


def check_flag(value: object, name: str, hint: str = "", choices: str = "True or False") -> None:
    """Refuse anything but a boolean where a boolean flag goes: ``True``, ``False``, numpy's booleans
    and one-element boolean arrays or tensors pass. ``choices`` names what is taken, for a flag with a
    value beside the booleans (checked by the caller first).

    Python reads any object as a truth value, and each of these ran on with a setting the caller did
    not mean: ``"False"`` (true); ported neural-tangents calls that pass ``get`` (``"nngp"``,
    ``("nngp", "ntk")``) where ntkgp has a flag (``hint=NT_GET_HINT`` says so); ``None`` (false, where
    ``None`` usually means "the default", which may be ``True``); a number (``diag=2``, a count in the
    wrong place). As torch's own boolean arguments (``keepdim=1`` is a ``TypeError``) and
    ``CompareConfig``'s flags, numbers are not taken, ``0`` and ``1`` included."""
    # an array or tensor of several booleans met numpy's or torch's "truth value ... is ambiguous"
    if not _one_boolean(value):
        raise ValueError(f"{name} must be {choices}, got {value!r}." + (f" {hint}" if hint else ""))


def _one_boolean(value: object) -> bool:
    """Whether ``value`` is a Python or numpy boolean, or a boolean array or tensor of one element."""
    if isinstance(value, bool | np.bool_):
        return True
    dtype = getattr(value, "dtype", None)   # a torch dtype has no kind: compared by name, without importing torch
    boolean = dtype is not None and (getattr(dtype, "kind", None) == "b" or str(dtype) == "torch.bool")
    return boolean and math.prod(getattr(value, "shape", ())) == 1
