"""Input checks shared by every public entry point (raised before any heavy work)."""

from __future__ import annotations

import math
import numbers
import sys
from typing import cast

import numpy as np
import torch
from torch import Tensor

from ntkgp._checks import holds_a_boolean
from ntkgp.layers.numerics import _is_compiling, is_vmapped


def refuse_meta(value: object, name: str) -> None:
    """``ValueError`` where ``value`` is a tensor on the meta device, which holds shapes but no values:
    the first data-dependent check then failed inside torch ("Tensor.item() cannot be called on meta
    tensors", "Cannot copy out of meta tensor")."""
    if isinstance(value, Tensor) and value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values: nothing to compute with.")


def refuse_tracing(what: str, instead: str) -> None:
    """``NotImplementedError`` under ``torch.jit.trace``: the kernels' recursion branches on the inputs' values
    (repeated points, near-parallel pairs, where to split into row blocks), which a trace freezes at the
    example's. Every way in checks: ``NetworkKernel.__call__`` alone was passed by ``ScaleKernel``, which calls
    its base kernel's ``forward``, and by ``net.kernel``; both failed inside torch ("We don't have an op for
    aten::view"). ``torch.compile`` and ``torch.func`` transforms are not tracing here."""
    if torch.jit.is_tracing():
        raise NotImplementedError(f"{what} cannot be traced by torch.jit.trace: the kernel's recursion branches on "
                                  "the inputs' values, which a trace would freeze at the example inputs' branches. "
                                  f"{instead}")


def refuse_non_float_inputs(x: Tensor, dtype: torch.dtype | None = None) -> None:
    """``ValueError`` where a finite network's layer gets boolean, integer or complex inputs: read as
    0/1 or as numbers, they were silently promoted (an activation or the NTK input scale) or failed
    inside torch (``matmul``'s dtype error, ``var_mean``'s), depending on the first layer. ``dtype``,
    if known, is the network's parameters' (named in the advice)."""
    if isinstance(x, Tensor) and (not x.is_floating_point() or x.is_complex()):
        to = f"x.to({dtype})" if dtype is not None else "x.to(dtype)"
        raise ValueError(f"This layer takes real floating-point inputs, got {x.dtype}; convert them with {to}, "
                         "the dtype of the network's parameters.")


#: Entries up to which :func:`all_finite` reads ``isfinite`` whole: 4 against 8 µs for 25 entries, 6.5 against
#: 8 at 2048; one ``aminmax`` pass wins from ~3000 (18 against 60 µs at 40 000, float64, one thread).
_SMALL = 2**11


def all_finite(x: Tensor, name: str | None = None) -> bool:
    """Whether no entry of the real tensor ``x`` is ``±inf`` or NaN (the shared check of inputs, targets and kernels).
    A tensor on the meta device has no entries to judge: a ``ValueError`` (naming it ``name``, if given).

    ``torch.isfinite(x).all()`` allocates ``|x|`` and two masks on the way, 1.75 times the size of
    a float32 ``x`` (2 GiB for 1.1 GiB of inputs), for a yes or no. The smallest and the largest
    entry decide it as well: both are finite exactly when every entry is (``aminmax`` propagates
    NaN), and one reduction finds them without temporaries.
    """
    # torch's "Could not run 'aten::aminmax' with arguments from the 'SparseCPU' backend" otherwise
    if x.layout != torch.strided:
        raise ValueError(f"A {x.layout} tensor of shape {tuple(x.shape)} was given where dense values are "
                         "needed (inputs, targets and kernels are dense); pass it with .to_dense().")
    refuse_meta(x, name or f"A tensor of shape {tuple(x.shape)} given where values are needed")
    if x.numel() == 0:
        return True
    if x.numel() <= _SMALL and x.is_floating_point():
        # the same answer in two operations instead of four, where temporaries cost nothing: a small
        # kernel's call makes several of these checks
        return bool(torch.isfinite(x.detach()).all())
    try:
        low, high = torch.aminmax(x.detach())
    except (RuntimeError, NotImplementedError) as error:
        # torch 2.1 has no CPU aminmax for float16 ('"aminmax_cpu" not implemented for 'Half''); the
        # answer is the same, only the temporaries are not spared
        if "not implemented" not in str(error):
            raise
        return bool(torch.isfinite(x).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def has_non_finite(value: Tensor) -> bool:
    """Whether ``value`` holds NaN or inf (:func:`all_finite`; per-sample values under vmap are not
    inspected)."""
    return not is_vmapped(value) and not all_finite(value)


def refuse_overflow(value: Tensor, name: str, growth: str, inputs: tuple[Tensor, ...]) -> Tensor:
    """``value``, or a ``ValueError`` where it overflowed its dtype although ``inputs`` are finite: an
    activation's kernel that grows as ``growth`` in the variance (an ``inf`` became NaN after a
    ``LayerNorm``, silently). Skipped while torch.compile traces."""
    if _is_compiling() or not has_non_finite(value) or not all(all_finite(t) for t in inputs):
        return value
    raise ValueError(f"{name}: the kernel, which grows as {growth}, overflows {value.dtype}; scale the inputs "
                     "down" + ("" if value.dtype == torch.float64 else " or use float64") + ".")


def boolean_or_complex(value: object) -> bool:
    """Whether ``value`` (a number, nested sequences, an array or a tensor) holds booleans or
    complex numbers, which a cast to a real float silently turns into ``1``/``0`` and the real part.
    Booleans nested in a list (``[True, 3.0]``, a float array) count too; what no array can hold
    (strings, ragged lists) is left to the caller's conversion, which says what is wrong."""
    if isinstance(value, Tensor):
        return value.dtype == torch.bool or value.is_complex()
    try:
        return np.asarray(value).dtype.kind in "bc" or holds_a_boolean(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return False


def usable_device(device: object) -> torch.device:
    """``device`` as a ``torch.device`` this torch can use: an invalid name raised torch's
    ``RuntimeError``, and CUDA without CUDA an ``AssertionError`` ("Torch not compiled with CUDA
    enabled") from inside the first tensor made there."""
    try:
        resolved = torch.device(cast("str | torch.device | int", device))   # anything else: the TypeError below
    except (RuntimeError, TypeError) as error:
        # the first line: a TypeError lists torch.device's signatures after it
        raise ValueError(f"device {device!r} is not a torch device: {str(error).splitlines()[0]}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but CUDA is not available to this torch.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return resolved


def finite_constants(**constants: object) -> tuple[float, ...]:
    """The constants of a layer as floats; NaN or infinite ones would give NaN kernels."""
    return tuple(finite_number(value, name) for name, value in constants.items())


def squarable_constants(**constants: object) -> tuple[float, ...]:
    """:func:`finite_constants` whose squares, which the kernels take as Python floats, are finite:
    ``1e200 ** 2`` raises OverflowError (34, 'Numerical result out of range') in the kernel."""
    values = finite_constants(**constants)
    for name, value in zip(constants, values, strict=True):
        if abs(value) > math.sqrt(sys.float_info.max):
            raise ValueError(f"{name} = {value:g}: its square, which the kernel takes, overflows a float; "
                             "use constants of a sensible size.")
    return values


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` in plain Python (raising its ``RuntimeError``): ~4 µs against
    torch's ~10 µs per call, whose first call also imports ``torch._refs`` (~0.3 s)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, n in enumerate(shape, ndim - len(shape)):
            if n != 1:
                if out[i] not in (1, n):
                    raise RuntimeError(f"Shapes {[tuple(s) for s in shapes]} do not broadcast.")
                out[i] = n
    return torch.Size(out)


def one_point_hint(x: object, features: int, name: str) -> str:
    """``"; one point of d features is name.unsqueeze(0)"`` for a vector ``x`` of ``d = features > 1`` entries,
    else ``""``: 1-D inputs are otherwise told ``unsqueeze(-1)`` (points of one feature), which makes ``d``
    points of one feature out of one point, refused next."""
    if isinstance(x, Tensor) and x.dim() == 1 and x.shape[0] == features > 1:
        return f"; one point of {features} features is {name}.unsqueeze(0)"
    return ""


def array_advice(x: object, name: str, dtype: torch.dtype = torch.float64) -> str:
    """How to pass ``x`` as a tensor of ``dtype``, where it is an array or a sequence (numpy's, JAX's, a list, a
    pandas frame), which neural-tangents takes and ntkgp refuses: ``""`` otherwise (a scalar is no points).

    ``torch.as_tensor`` takes numeric numpy arrays and nested lists of numbers alone: object and string
    arrays (a pandas frame of mixed columns' ``.values``) need their numeric dtype named, a list of tensors
    is stacked ("only one element tensors can be converted to Python scalars"), and other arrays (a pandas
    frame itself, JAX's, anything with ``__array__``) go through a copy by numpy ("could not determine the shape
    of object type 'DataFrame'"; JAX's were read one element at a time, as a sequence; ``numpy.asarray`` of a
    pandas frame is read-only, which torch warns is undefined behaviour for the tensor sharing it)."""
    numpy_name = str(dtype).removeprefix("torch.")
    if isinstance(x, (list, tuple)):
        if any(isinstance(v, Tensor) for v in x):
            return f": stack its tensors with torch.stack({name}).to(torch.{numpy_name})"
        return f": convert it with torch.as_tensor({name}, dtype=torch.{numpy_name})"
    if not hasattr(x, "__array__") or getattr(x, "ndim", None) == 0:   # numpy's scalars have __array__
        return ""
    if hasattr(x, "__cuda_array_interface__"):   # CuPy's, which torch reads on the card (and numpy refuses)
        return f": convert it with torch.as_tensor({name}, dtype=torch.{numpy_name})"
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "OSU":   # torch.as_tensor refuses numpy.object_ and numpy.str_
            return f": convert it with torch.as_tensor({name}.astype('{numpy_name}'))"
        if not x.flags.writeable:
            # a pandas frame's .values (pandas 3), np.load(..., mmap_mode="r"): torch.as_tensor shares the
            # read-only memory and warns that writing to the tensor is undefined behaviour; torch.tensor copies
            return f": convert it with torch.tensor({name}, dtype=torch.{numpy_name})"
        return f": convert it with torch.as_tensor({name}, dtype=torch.{numpy_name})"
    return f": convert it with torch.as_tensor(numpy.array({name}, dtype='{numpy_name}'))"


def check_points(x: Tensor, name: str, integers: bool = False) -> Tensor:
    """``x`` must be a finite floating tensor of shape ``(*batch, n, d)``; with ``integers``, an integer
    or boolean one too (indices, such as an embedding's, for a module that reads them itself)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (..., n, d), got {type(x).__name__}"
                         f"{array_advice(x, name)}.")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, d), got shape {tuple(x.shape)}; "
                         f"for scalar features use {name}.unsqueeze(-1).")
    if not x.is_floating_point() and (not integers or x.is_complex()):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}; "
                         f"convert it with {name}.double() or {name}.float().")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}).")
    # torch's "Could not run 'aten::aminmax' with arguments from the 'SparseCPU' backend" otherwise
    if x.layout != torch.strided:
        raise ValueError(f"{name} is a {x.layout} tensor; kernels need dense points: pass {name}.to_dense().")
    refuse_meta(x, name)
    # under vmap the values are per-sample: no data-dependent check can run there (integers are all finite)
    if x.is_floating_point() and not is_vmapped(x) and not all_finite(x):
        raise ValueError(f"{name} contains NaN or infinite values{where_not_finite(x)}.")
    return x


def _columns(columns: Tensor) -> str:
    """Column indices for a message, the first ten of them."""
    shown = ", ".join(map(str, columns[:10].tolist()))
    return shown + (f", ... ({columns.numel()} columns)" if columns.numel() > 10 else "")


def where_not_finite(x: Tensor) -> str:
    """Where the points ``x`` (``(..., n, d)``) are not finite, for an error message: how many entries, in
    which feature columns, and the columns NaN in every row. The message said only "contains NaN or infinite
    values", where the usual cause on real data is a constant feature standardized by its standard deviation,
    0 (NaN throughout: naval's column 8 of 16), and nothing named the column."""
    values = x.detach().reshape(-1, x.shape[-1])
    bad = ~torch.isfinite(values)
    text = f" ({int(bad.sum())} of {bad.numel()} entries, in feature column(s) {_columns(bad.any(0).nonzero()[:, 0])}"
    nan_columns = values.isnan().all(0).nonzero()[:, 0]
    if values.shape[0] > 1 and nan_columns.numel():
        text += (f"; column(s) {_columns(nan_columns)} NaN in every row, as a constant feature divided by its "
                 "standard deviation, 0, is: divide such columns by 1 instead")
    return text + ")"


def check_inputs(x1: Tensor, x2: Tensor | None, diag: bool = False,
                 integers: bool = False) -> tuple[Tensor, Tensor | None]:
    """Validate a pair of input sets (integer or boolean ones too with ``integers``,
    :func:`check_points`); returns ``x2 = None`` when it is ``x1`` itself.

    ``x2`` equal to ``x1`` (the same object, or equal values with no gradient wanted) is reported
    as ``None`` so the symmetric structure (exact diagonal, one triangle) is used.
    """
    check_points(x1, "x1", integers)
    if x2 is None:
        return x1, None
    features = x1.shape[-1]
    if isinstance(x2, Tensor) and x2.dim() == 1 and features > 1:
        # check_points' hint for 1-D inputs, x2.unsqueeze(-1), makes n2 points of one feature
        raise ValueError(f"x2 must have shape (..., n2, {features}) like x1, got shape {tuple(x2.shape)}"
                         f"{one_point_hint(x2, features, 'x2')}.")
    check_points(x2, "x2", integers)
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"x1 and x2 must have the same number of features, got {x1.shape[-1]} "
                         f"and {x2.shape[-1]}.")
    if x1.dtype != x2.dtype:
        raise ValueError(f"x1 and x2 must have the same dtype, got {x1.dtype} and {x2.dtype}.")
    if x1.device != x2.device:
        raise ValueError(f"x1 and x2 must be on the same device, got {x1.device} and {x2.device}.")
    try:
        broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    except RuntimeError as err:
        raise ValueError(f"Batch shapes of x1 {tuple(x1.shape[:-2])} and x2 {tuple(x2.shape[:-2])} "
                         "do not broadcast.") from err
    if diag and x1.shape[-2] != x2.shape[-2]:
        raise ValueError(f"diag=True pairs x1[i] with x2[i]: both need the same number of points, got x1 of "
                         f"shape {tuple(x1.shape)} and x2 of shape {tuple(x2.shape)}.")
    # not compared under vmap, whose per-sample values torch.equal refuses ("Batching rule not implemented
    # for aten::equal": every vmapped kernel(x, x2) with as many points in x2 as in x failed)
    if x2 is x1 or (not x1.requires_grad and not x2.requires_grad and x1.shape == x2.shape
                    and not is_vmapped(x1) and not is_vmapped(x2) and torch.equal(x1, x2)):
        return x1, None
    return x1, x2


def finite_number(value: object, name: str, kind: str = "a finite real number") -> float:
    """``value`` (a Python or numpy real, or a one-element real tensor or array) as a finite float;
    ``kind`` names what was expected in the error."""
    refuse_meta(value, name)   # float() of it raised torch's "Tensor.item() cannot be called on meta tensors"
    number = None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        number = float(value.detach())   # a tensor that requires grad warns in float()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        number = float(value.reshape(()))
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return number


def positive_number(value: object, name: str) -> float:
    """``value`` (a Python or numpy real, or a one-element real tensor) as a finite positive float."""
    number = finite_number(value, name, "a positive number")
    if not number > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return number
