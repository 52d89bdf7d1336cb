r"""Empirical kernels of finite networks (any ``torch.nn.Module`` or function of parameters).

For a network ``f(θ, x) ∈ R^k``:

* empirical NNGP: ``K̂(x, x') = f(x) f(x')ᵀ``,
* empirical NTK (the tangent kernel; Jacot et al. 2018):
  ``Θ̂_ij(x, x') = Σ_p ∂f_i(x)/∂θ_p · ∂f_j(x')/∂θ_p``.

For networks built from ntkgp layers the NTK is assembled layer by layer (the chain rule for
``z_l = W_l u_l + c_l^{1/2} b_l``, summed over the parameters of each layer): with ``u_l`` the
input a ``Dense`` layer multiplies by its weights, ``δ_l = ∂f/∂z_l`` the backpropagated signal
at its output and ``c_l`` the squared scale of its bias,

    Θ̂_ij(x, x') = Σ_l (δ_l,i(x) · δ_l,j(x')) (u_l(x) · u_l(x') + c_l),

which costs activations and one batched backward pass instead of a Jacobian with a column per
parameter. Other modules take the Jacobian of all outputs (``torch.func.vjp``, vmapped over chunks of
``JACOBIAN_BYTES`` of cotangents, as ``torch.func.jacrev(..., chunk_size=...)``).

Both are returned per output unit, ``(1/k) Σ_i K̂_ii`` (what the infinite-width kernels
describe, since the full kernel is ``K ⊗ I_k``), or in full ``(n1, n2, k, k)`` form with
``vector_output=True``; with ``diag=True`` only the pairs ``(x1_i, x2_i)`` (neural-tangents'
``diagonal_axes=(0,)``), ``(n,)`` or ``(n, k, k)``, in ``O(n)`` memory. Modules built with
``ensemble_size=E`` give one kernel per member, ``(E, n1, n2)``: members are handled by
``torch.func.vmap``, never a Python loop. So does a module of one's own around such an ensemble
whose outputs are per member, ``(E, n, k)`` (each member's kernel in its slice of the stacked parameters and
in all of the module's own, such as a head applied to every member's outputs, or the member's row of one with
a member axis, such as a per-member output scale ``(E, 1, 1)``); one that makes its outputs
``(n, k)`` of all members' (their mean) has one kernel, in all their parameters.

A module or function maps inputs ``(n, d)`` to real outputs ``(n, k)`` (or ``(n,)``; complex ones are
refused: ``torch.view_as_real(out).flatten(-2)`` makes their parts ``2k`` real outputs), floating-point
inputs or, for one not built by ntkgp, integer ones (an embedding's indices); other output
shapes are refused, and only networks built by ntkgp take batches of inputs ``(*batch, n, d)``
(a CNN takes flattened images and unflattens them itself, ``nn.Unflatten``). The kernels are
those of the module as it is called: dropout, RReLU or batch norm in training mode make them random
or update running statistics, so that warns (call ``model.eval()`` first); the empirical NTK of
batch norm that updates its running statistics is refused (``torch.func`` cannot differentiate a
module that writes its buffers).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TypeGuard, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from ntkgp._autograd import differentiates
from ntkgp._checks import check_flag, integer_at_least
from ntkgp._typing import Function
from ntkgp.layers.activations import ActivationModule
from ntkgp.layers.base import Layer, NonFiniteKernelError, _autocast_off
from ntkgp.layers.combinators import ParallelModule
from ntkgp.layers.dense import DenseModule
from ntkgp.layers.norm import LayerNormModule
from ntkgp.layers.numerics import _is_compiling, transforms_active
from ntkgp.layers.validation import all_finite, boolean_or_complex, broadcast_shapes, check_inputs, has_non_finite
from ntkgp.predict.gaussian import refuse_beyond_memory

ParamFn = Callable[[dict[str, Tensor], Tensor], Tensor]
#: Per Dense call: the layer, its multiplied input ``u``, ``δ = ∂f/∂z`` per output, the squared bias scale.
Signals = list[tuple["DenseModule", Tensor, Tensor, Tensor | None]]

#: The torch modules that ``Layer.build`` uses besides ntkgp's own (none of them mixes points).
_BUILT_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.Identity)
#: ntkgp's own modules that ``Layer.build`` makes, the finite twins of its layers.
_TWINS = (DenseModule, ActivationModule, ParallelModule, LayerNormModule)


def _without_autocast(fn: Function) -> Function:
    """``fn(model, x1, ...)`` with a caller's ``torch.autocast`` switched off for ``x1``'s device, as
    ``net.kernel`` does: the empirical kernels of a float32 network came out in bfloat16 under CPU
    autocast, 4e-3 off, while the analytic ones they are compared with kept float32."""

    @functools.wraps(fn)
    def wrapper(model, x1, *args, **kwargs):
        with _autocast_off(x1.device if isinstance(x1, Tensor) else torch.device("cpu")):
            return fn(model, x1, *args, **kwargs)

    return cast(Function, wrapper)   # the decorated function's signature, for type checkers


def ensemble_size(model: nn.Module) -> int | None:
    """The number of stacked members of a module built by ``net.build(ensemble_size=E)``."""
    if not isinstance(model, nn.Module):   # None raised "'NoneType' object has no attribute 'modules'"
        raise ValueError(f"model must be a torch.nn.Module (a network built by net.build(...)), got "
                         f"{type(model).__name__}.")
    # ntkgp's Dense twins only (those stack members): a user module's own attribute of that name (a stored
    # setting) was read as stacked members, and every parameter mapped over its first axis (a vmap size
    # error, or slices); by isinstance, not the class's module: torch.nn.utils.parametrize makes the twin
    # a class of its own module (ParametrizedDenseModule), and a network whose Dense layers were all
    # parametrized was no ensemble (its (E, n, k) outputs refused as not (n, k))
    sizes = {m.ensemble_size for m in model.modules() if isinstance(m, DenseModule)}
    sizes -= {None}
    if len(sizes) > 1:
        raise ValueError(f"Inconsistent ensemble sizes {sorted(cast('set[int]', sizes))} in one module.")
    return sizes.pop() if sizes else None


#: Modules whose training-mode output is random (dropout, RReLU's slopes) or that update their buffers when
#: called (batch statistics): the kernel of such a module in training mode is not a function of its parameters.
#: (RReLU's kernels in training mode came out 0.19 apart between two calls, without a word.)
_TRAINING_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)


def _built_by_ntkgp(model: nn.Module | ParamFn) -> TypeGuard[nn.Module]:
    """Whether every submodule of ``model`` is an ntkgp layer's twin or a container ``build`` uses
    (no layer mixes points, and batches of inputs are taken)."""
    return isinstance(model, nn.Module) and all(
        type(m) in _BUILT_CONTAINERS or type(m).__module__.startswith("ntkgp.") for m in model.modules())


def _as_function(model: nn.Module | ParamFn, params: Mapping[str, Tensor] | None, x: Tensor
                 ) -> tuple[ParamFn, dict[str, Tensor], int | None, dict[str, Tensor]]:
    """``(fn, params, members, fixed)``: ``fn(p, x)`` the outputs at parameters ``p``, the parameters to
    differentiate (``params=`` or all of a module's, detached), the ensemble size, and a module's
    parameters that ``params=`` leaves out, detached. Those are constants: left to ``functional_call``
    the live ones kept the kernel in their graph (a gradient on every other parameter), and an
    ensemble's are stacked, so they are mapped over members with the rest (left to ``functional_call``
    they gave every member all E members' outputs, read as E points). Found by identity, not name: a
    tied parameter given under one of its names is not fixed under another.

    A linearization's (:class:`~ntkgp.finite.Linearized`) parameters are by default its trainable ``θ``
    alone, also inside a module of the user's: its frozen copy holds the expansion point ``θ₀``, a constant
    of ``f(x; θ₀) + J(x; θ₀)(θ − θ₀)``."""
    if params is not None:
        _check_params(params)
    if isinstance(model, nn.Module):
        _materialize(model, x)
        training = sorted({type(m).__name__ for m in model.modules() if m.training and isinstance(
            m, _TRAINING_DEPENDENT) and not (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0)
            and not (isinstance(m, nn.RReLU) and m.lower == m.upper)})
        if training:
            warnings.warn(f"The module is in training mode and has {training} layers: its outputs are random "
                          "(dropout, RReLU's slopes), or normalized with the statistics of the points it is called "
                          "on (batch norm), so the kernel is not that of a function of each point. Call model.eval() "
                          "first.", RuntimeWarning, stacklevel=3)
        own = dict(model.named_parameters(remove_duplicate=False))
        if params is None:
            from ntkgp.finite.linearize import Linearized  # here: that module imports this one

            # differentiated too, θ₀ added (H (θ − θ₀))(H (θ − θ₀))ᵀ to the constant J(θ₀) J(θ₀)ᵀ once θ had
            # moved: a trained linearization's tangent kernel "changed" (by 56-241 % in tests/test_linearize.py,
            # as much wrapped in an nn.Sequential). Not as params= (a NaN in θ was said to be in params)
            expansion_points = {id(p) for m in model.modules() if isinstance(m, Linearized)
                                for p in m.initial.parameters()}
            unchecked = {name: p.detach() for name, p in model.named_parameters()}
            params = {name: p for name, p in unchecked.items() if id(own[name]) not in expansion_points}
            fixed = {name: p for name, p in unchecked.items() if id(own[name]) in expansion_points}
        else:
            # a misspelt name was a parameter functional_call ignored: an all-zero NTK, and no error
            unknown = sorted(set(params) - set(own))
            if unknown:
                raise ValueError(f"params names parameters the network does not have: {unknown}.")
            wrong = [f"{name} {tuple(value.shape)} (the network's is {tuple(own[name].shape)})"
                     for name, value in params.items() if tuple(value.shape) != tuple(own[name].shape)]
            if wrong:   # a matmul error from inside the network otherwise
                raise ValueError(f"params must have the shapes of the network's parameters, got {', '.join(wrong)}.")
            for name, value in params.items():   # torch's "expected m1 and m2 to have the same dtype" otherwise
                if value.dtype != own[name].dtype:
                    raise ValueError(f"params[{name!r}] is {value.dtype} but the network's parameter (and the "
                                     f"inputs) are {own[name].dtype}: convert it with .to({own[name].dtype}).")
            first: dict[int, str] = {}
            for name, value in params.items():
                other = first.setdefault(id(own[name]), name)
                # one slot per parameter: the last value given was used, the other (no gradient) silently dropped
                if other != name and not torch.equal(value, params[other]):
                    raise ValueError(f"params gives the parameter shared as {other!r} and {name!r} two different "
                                     "values: give it under one of its names.")
            replaced = {id(own[name]) for name in params}
            fixed = {name: p.detach() for name, p in model.named_parameters() if id(p) not in replaced}
            unchecked = fixed   # (_check_params checked the values given)
        # the parameters params= does not replace enter the outputs too: a NaN there gave NaN kernels
        # (or finite, meaningless ones where ReLU's backward zeroes it), with no error
        bad = [name for name, p in unchecked.items() if has_non_finite(p)]
        if bad:
            raise ValueError(f"The network's parameters {bad} contain NaN or infinite values: re-initialize "
                             "the network (net.build(...)) or load finite parameters.")
        # params= as given (a Mapping, which fn reads as it reads a dict)
        return stateless(model), cast('dict[str, Tensor]', params), ensemble_size(model), fixed
    if params is None:
        raise ValueError("A function of parameters needs params=...")
    # inputs of another dtype than params are named once the function fails (_naming_dtype_mismatch)
    return model, cast('dict[str, Tensor]', params), None, {}   # the caller's own, for their function


def stateless(model: nn.Module) -> ParamFn:
    """``fn(p, x)``: the module's outputs at parameters ``p`` (keyed by any of a tied parameter's
    names; the others keep theirs), by ``torch.func.functional_call``, which leaves the module as it was.

    Each of the module's parameter slots (a module's attribute) is given once. A module called at two
    places (``nn.Sequential(lin, act, lin)``) has two names for one slot; ``functional_call`` swapped
    it under both and put back, last, the tensor of the first swap, so the module kept a detached
    copy of its weights in place of its parameters: training it afterwards moved nothing, silently
    (torch 2.13). A parameter shared by two modules has two slots, and both get its value.
    """
    names = dict(model.named_parameters(remove_duplicate=False))
    slots = {f"{prefix}.{name}" if prefix else name: id(t) for prefix, module in model.named_modules()
             for name, t in module._parameters.items() if t is not None}
    buffers = dict(model.named_buffers())

    def fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
        by_identity = {id(names[name]): value for name, value in p.items()}
        given = {slot: by_identity[key] for slot, key in slots.items() if key in by_identity}
        return functional_call(model, (given, buffers), (x,), tie_weights=False)

    return fn


def _check_params(params: object) -> None:
    """``params`` as the kernels take it: a dict of finite floating-point tensors by parameter name.

    A list of parameters failed as "Boolean value of Tensor ... is ambiguous", a numpy array as
    "'numpy.ndarray' object has no attribute 'detach'", and NaN values gave a finite kernel
    wherever ReLU's backward zeroes them: all from inside the Jacobian work, or with no error.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of parameter name -> tensor (like "
                         f"{{name: p for name, p in model.named_parameters()}}), got {type(params).__name__}.")
    for name, value in params.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"params[{name!r}] must be a torch.Tensor, got {type(value).__name__}: convert it "
                             "with torch.as_tensor(value, dtype=...).")
        if not value.is_floating_point():
            raise ValueError(f"params[{name!r}] must be a floating-point tensor, got {value.dtype}.")
        if has_non_finite(value):
            raise ValueError(f"params[{name!r}] contains NaN or infinite values.")


def has_deferred_layers(model: nn.Module) -> bool:
    """Whether ``model`` has parameters not drawn yet: an ntkgp ``Dense`` layer built without
    ``in_features`` (drawn on its first call), or a torch lazy module's."""
    return any(isinstance(m, DenseModule) and m.weight is None for m in model.modules()) or any(
        isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def _materialize(model: nn.Module, x: Tensor) -> None:
    """Draw deferred (lazily built) first layers, so that their weights are among the parameters."""
    if has_deferred_layers(model):
        with torch.no_grad():
            model(x[..., :1, :])


def _floating_parameters(model: nn.Module | ParamFn, params: object) -> list[Tensor]:
    """The floating-point parameters: ``params`` of a function as given (checked only later,
    :func:`_as_function`, where a list of them is refused by name), or a module's."""
    values = params.values() if isinstance(params, Mapping) else model.parameters() if isinstance(
        model, nn.Module) else ()
    return [p for p in values if isinstance(p, Tensor) and p.is_floating_point()]


def parameter_dtype(model: nn.Module | ParamFn, params: object = None) -> torch.dtype | None:
    """The one dtype of the floating-point parameters (a module's, or ``params`` of a function), else ``None``."""
    dtypes = {p.dtype for p in _floating_parameters(model, params)}
    return dtypes.pop() if len(dtypes) == 1 else None


def dtype_message(given: str, x: Tensor, dtype: torch.dtype, advice: str) -> str:
    """``given`` ("x1 is torch.float32 but the network's parameters are") ``dtype``, then ``advice`` for
    floating-point inputs, or for integer and boolean ones the conversion: only modules that read them
    (an embedding's indices) take them."""
    if x.is_floating_point():
        return f"{given} {dtype}: {advice}."
    return (f"{given} {dtype}: convert the inputs with .to({dtype}) (integer and boolean inputs are for modules "
            "that read them, such as an embedding's indices).")


def dtype_failure(error: RuntimeError, x: object, dtype: torch.dtype | None,
                  failure: Callable[[Tensor], BaseException | None], given: str, advice: str) -> ValueError | None:
    """The ``ValueError`` naming the dtype of the inputs ``x`` (:func:`dtype_message`) as what made ``error``,
    where it is, else ``None`` (the caller raises ``error`` itself). ``failure(x)`` is the error the network
    raises at inputs ``x`` (``None`` where it runs); the empirical kernels and
    :class:`~ntkgp.finite.Linearized` name the dtype this way, once the network failed: refused up front,
    modules that convert their inputs themselves (``x.to(self.weight.dtype)``) and modules that read
    integer inputs (an embedding's indices) had no kernel and no expansion, though they take such inputs.

    The dtype is named only where it is what fails: the network fails at ``x`` and, converted to the
    parameters' ``dtype``, does not (floating-point inputs: or fails otherwise, named beside it; integer
    inputs only where they run converted, since an embedding refuses floating-point indices and its other
    failures, a shape, are not the indices' dtype). Every ``RuntimeError`` was said to be the dtype's
    doing: wrong numbers of features ("mat1 and mat2 shapes cannot be multiplied"), and out of memory on
    the CPU (torch's allocator raises a plain ``RuntimeError``). Memory errors and ``ValueError``s, such as
    :class:`~ntkgp.layers.base.NonFiniteKernelError` (a ``RuntimeError`` too, by ``NanError``), are never
    renamed: that one had become a plain ``ValueError``, which an optimizer catching ``NanError`` missed."""
    if (isinstance(error, (ValueError, torch.cuda.OutOfMemoryError)) or not isinstance(x, Tensor) or x.is_complex()
            or dtype is None or x.dtype == dtype):
        return None
    as_given = failure(x)
    converted = None if as_given is None else failure(x.to(dtype))
    if as_given is None or (converted is not None and (not x.is_floating_point() or str(converted) == str(as_given))):
        return None
    still = "" if converted is None else f" Converted to {dtype}, the inputs still fail: {converted}"
    return ValueError(f"{dtype_message(given, x, dtype, advice)} ({error}){still}")


def _forward_failure(model: nn.Module | ParamFn, params: object, x: Tensor) -> Exception | None:
    """The error the network raises at the first two points of ``x`` (two: batch norm in training mode
    refuses one), or ``None``: without a graph, the random numbers it draws given back and the buffers
    it writes (batch norm's running statistics) restored, so that the check leaves no trace."""
    if x.dim() < 2:
        return None
    buffers = list(model.buffers()) if isinstance(model, nn.Module) else []
    saved = [b.clone() for b in buffers]
    devices = [] if x.device.type == "cpu" else [x.device]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices, device_type=x.device.type if devices else "cuda"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(model, nn.Module):
                model(x[..., :2, :])
            else:
                model(cast("dict[str, Tensor]", params), x[..., :2, :])
    except Exception as error:   # compared with the kernel's error, never raised
        return error
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
    return None


def _given(model: nn.Module | ParamFn, x: Tensor) -> str:
    return (f"x1 is {x.dtype} but the network's parameters are" if isinstance(model, nn.Module) else
            f"The inputs are {x.dtype} but params are")


def _naming_dtype_mismatch(fn: Function) -> Function:
    """``fn(model, x1, ..., params=...)``, whose ``RuntimeError`` (torch's "expected m1 and m2 to have the
    same dtype" from deep in the forward pass or the Jacobian) names the dtypes where the inputs' is what
    fails (:func:`dtype_failure`, the network run at two of the inputs)."""

    @functools.wraps(fn)
    def wrapper(model, x1, *args, **kwargs):
        try:
            return fn(model, x1, *args, **kwargs)
        except RuntimeError as error:
            params = kwargs.get("params")

            def failure(x: Tensor) -> Exception | None:
                return _forward_failure(model, params, x)

            named = dtype_failure(error, x1, parameter_dtype(model, params), failure, _given(model, x1),
                                  "convert one of them")
            if named is None:
                raise
            raise named from error

    return cast(Function, wrapper)


def _check_network_inputs(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None = None) -> None:
    """Inputs in another dtype than the parameters of a network built by ntkgp, with another number of
    features than it takes, or with a member axis of another size than its ensemble's, are a clear
    error, not torch's matmul or broadcasting one. Other modules may convert their inputs themselves
    (or read indices): a dtype is named once they fail (:func:`_naming_dtype_mismatch`)."""
    refuse_spec(model)
    if isinstance(model, nn.Module):
        dtype = parameter_dtype(model)
        if dtype is not None and x1.dtype != dtype and _built_by_ntkgp(model):
            raise ValueError(dtype_message(_given(model, x1), x1, dtype, "convert one of them"))
        members = ensemble_size(model)
        for name, x in (("x1", x1), ("x2", x2)):
            if members is not None and x is not None and x.dim() >= 3 and x.shape[-3] not in (1, members):
                raise ValueError(f"{name} of shape {tuple(x.shape)} does not fit an ensemble of {members}: inputs are "
                                 f"(n, d) for every member, or (*batch, {members}, n, d) with one slice per member.")
    if _built_by_ntkgp(model):
        features = _input_width(model)
    else:
        first = _first_called(model)
        features = first.in_features if isinstance(first, nn.Linear) and not isinstance(
            first, nn.modules.lazy.LazyModuleMixin) else None
    if features is not None and x1.shape[-1] != features:   # x2 has x1's (check_inputs)
        raise ValueError(f"The network takes inputs of {features} feature(s), got x1 of shape {tuple(x1.shape)}.")


def _kernel_dtype(x: Tensor, params: object, model: nn.Module | ParamFn) -> torch.dtype:
    """The dtype of the kernels as known before the network runs: the widest of the floating-point
    parameters' (``params``, or a module's), whose gradients the NTK multiplies, else the inputs' (a
    floating-point ``x``) or torch's default. The inputs' alone counted an embedding's int8 indices as
    kernel entries of one byte, and float32 inputs to a float64 module that converts them as four."""
    dtypes = [p.dtype for p in _floating_parameters(model, params)]
    if dtypes:
        return functools.reduce(torch.promote_types, dtypes)
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _check_kernel_fits(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None, name: str,
                       diag: bool = False, params: object = None, members: int | None = None) -> None:
    """``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``, as torch's allocators raise) before the network
    is called when the kernel alone, ``n1 × n2`` values per member and batch (``k²`` times that with
    ``vector_output``, not counted: ``k`` is known only from the outputs), exceeds the memory of
    ``x1``'s device. 100 000 points (80 GB in float64) failed in torch's allocator only after the
    outputs and layer signals were formed, and a request just above the free memory was killed by
    the operating system. With ``diag`` the kernel is its ``n1`` diagonal entries (per member and batch):
    the ``n1 × n2`` count refused diagonals that take a few MB.

    ``members``: the kernels per member, by default an ntkgp-built ensemble's size. A module of the user's around
    an ensemble may make one kernel of all members' outputs (their mean): it is checked as one kernel, and again
    with ``members`` once its outputs show one set per member. Counted per member up front, the (300, 200) kernel
    of 4 members' mean was refused as "4 x 300 x 200" (E times its size)."""
    other = x1 if x2 is None else x2
    lead = broadcast_shapes(x1.shape[:-2], other.shape[:-2])
    if members is None and _built_by_ntkgp(model):
        members = ensemble_size(model)
    copies = math.prod(lead) * (members if members is not None and (not lead or lead[-1] == 1) else 1)
    points = (x1.shape[-2],) if diag else (x1.shape[-2], other.shape[-2])
    dtype = _kernel_dtype(x1, params, model)
    need = copies * math.prod(points) * torch.empty(0, dtype=dtype).element_size()
    shape = " x ".join(str(n) for n in (*lead, *([members] if copies > math.prod(lead) else []), *points))
    what = f"The empirical {name} kernel's diagonal" if diag else f"The empirical {name} kernel"
    refuse_beyond_memory(need, x1.device, f"{what} ({shape}, in {dtype})",
                         "compute it in blocks of rows (slices of x1, against x2)")


def _input_width(model: nn.Module) -> int | None:
    """The number of input features of a network built by ntkgp: its first Dense layer's
    (activations and LayerNorm keep their width), unless a concatenation outside that layer widens
    the features before it (``serial(parallel(Identity(), ReLU(), join="concat"), Dense(...))``);
    then ``None``, and the Dense layer's own check names the width it met."""
    concatenations: list[ParallelModule] = []
    for module in model.modules():   # containers before what they contain, in the order the input flows
        if isinstance(module, DenseModule):
            if any(all(inner is not module for inner in c.modules()) for c in concatenations):
                return None
            return module.in_features
        if isinstance(module, ParallelModule) and module.join == "concat":
            concatenations.append(module)
    return None


def refuse_spec(model: object) -> None:
    """A ``ValueError`` for a network spec given where its finite twin is wanted: a spec is an
    ``nn.Module`` too, whose parameters are its variances, so it passed for a network."""
    if isinstance(model, Layer):
        raise ValueError(f"model is an ntkgp network spec ({type(model).__name__}), not a finite network: build "
                         "one with model.build(...) first.")


def _first_called(model: nn.Module | ParamFn) -> nn.Module | None:
    """The module a ``torch.nn.Sequential`` (nested ones too) applies first to its input: only there
    is the call order the order of registration."""
    while isinstance(model, nn.Sequential) and len(model) > 0:
        model = model[0]
    return model if isinstance(model, nn.Module) else None


def _outputs_2d(out: Tensor, x: Tensor | None = None) -> Tensor:
    """``out`` as ``(..., n, k)`` (one output: ``(n,)`` read as ``(n, 1)``); with the inputs ``x``
    given, anything but one output vector per point of ``x`` is a ``ValueError``."""
    if not isinstance(out, Tensor):
        raise ValueError(f"The network must return one tensor of outputs (n, k), got {type(out).__name__}.")
    if out.is_complex():
        # the NTK was that of the real parts alone (each output's real cotangent pulled back), the NNGP the
        # unconjugated f(x) f(x')ᵀ (complex, K̂(x, x) not |f(x)|²), and the diagonal a jacrev error
        raise ValueError(f"The network returns complex outputs ({out.dtype}); the kernels are of real ones: return "
                         "torch.view_as_real(out).flatten(-2), the real and imaginary parts as 2k outputs (whose "
                         "kernels per output unit are (1/2k) Re Σ_i f_i(x) conj(f_i(x'))).")
    out = out.unsqueeze(-1) if out.dim() == 1 else out
    if x is not None and (out.dim() != x.dim() or out.shape[-2] != x.shape[-2]):
        # (n, 2, 3) outputs were contracted over one axis and averaged over another: 3x the NTK
        raise ValueError(f"The network must return outputs (n, k) for inputs (n, d); got {tuple(out.shape)} for "
                         f"inputs {tuple(x.shape)}: flatten several output axes into k.")
    if out.shape[-1] == 0:   # the per-output average over k = 0 outputs was a NaN NNGP, and the NTK a reshape error
        raise ValueError(f"The network returns no outputs (shape {tuple(out.shape)}): the kernels are per output "
                         "unit, and need k >= 1 of them.")
    return out


def _checked_inputs(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None,
                    diag: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`check_inputs`, with the ``(n, d)`` shape a model not built by ntkgp needs checked first:
    images ``(5, 1, 8, 8)`` against ``(4, 1, 8, 8)`` were "batch shapes (5, 1) and (4, 1) do not broadcast".

    Integer and boolean inputs are taken by modules and functions not built by ntkgp (an embedding's
    indices, as ``linearize`` takes them); ntkgp's own layers take floating-point inputs."""
    built = _built_by_ntkgp(model)
    if not built:   # batches only: 1-D inputs keep check_inputs' unsqueeze hint
        _check_plain_inputs(*cast("tuple[Tensor | None, Tensor | None]",   # two items: x1's and x2's
                                  (x if isinstance(x, Tensor) and x.dim() > 2 else None for x in (x1, x2))))
    return check_inputs(x1, x2, diag, integers=not built)


def _check_plain_inputs(x1: Tensor | None, x2: Tensor | None, model: nn.Module | ParamFn | None = None) -> None:
    """Inputs ``(n, d)``: only networks built by ntkgp take batches ``(*batch, n, d)``, and their
    NTK only on the layer-by-layer route (``model``: one on the Jacobian route, named in the error)."""
    for name, x in (("x1", x1), ("x2", x2)):   # a batch axis of x2 was read as its points (an einsum error)
        if x is not None and x.dim() != 2:
            why = ("the NTK takes batches of inputs on its layer-by-layer route only, which params=, parameter "
                   "scales other than numbers and (in, 1) columns, and a layer used twice leave; loop over the batch"
                   if model is not None and _built_by_ntkgp(model) else "only networks built by ntkgp take "
                   "batches of inputs; flatten images, and unflatten them in the module with nn.Unflatten")
            raise ValueError(f"{name} must have shape (n, d) here ({why}), got {tuple(x.shape)}.")


@_naming_dtype_mismatch
@_without_autocast
def empirical_nngp(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None = None, *,
                   params: Mapping[str, Tensor] | None = None, vector_output: bool = False,
                   diag: bool = False) -> Tensor:
    """``K̂(x, x') = (1/k) f(x)·f(x')`` per output unit ``(n1, n2)`` (or ``f_i(x) f_j(x')`` as
    ``(n1, n2, k, k)``); ``(E, …)`` for ensembles. Over random initializations its mean is the NNGP
    kernel (Neal 1996; Lee et al. 2018). A constant: no gradient flows through it.

    With ``diag=True`` only ``K̂(x1_i, x2_i)`` (``x2`` of ``x1``'s shape, or ``None`` for
    ``K̂(x_i, x_i) = (1/k) |f(x_i)|²``), as ``net.kernel(x1, x2, diag=True)`` and neural-tangents'
    ``diagonal_axes=(0,)``: ``(n,)`` (``(n, k, k)`` with ``vector_output``, ``(E, n)`` for
    ensembles, ``(*batch, n)`` for batches), in ``O(n k)`` memory; the ``n1 × n2`` kernel is never formed.

    Raises :class:`~ntkgp.layers.base.NonFiniteKernelError` where the kernel overflows the dtype
    (the network's outputs, or their products), as ``net.kernel`` does for the analytic one, and
    ``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``) before the network runs where the kernel
    alone exceeds the device's memory."""
    kernel = _empirical_nngp(model, x1, x2, params=params, vector_output=vector_output, diag=diag)
    return _refuse_non_finite(kernel, "NNGP", model, params, x1, x2)


@_without_autocast
def _empirical_nngp(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None = None, *,
                    params: Mapping[str, Tensor] | None = None, vector_output: bool = False,
                    diag: bool = False) -> Tensor:
    """:func:`empirical_nngp`, inf and NaN included (the zero kernel of :func:`empirical_ntk` without
    points or parameters is made from it)."""
    check_flag(vector_output, "vector_output")
    check_flag(diag, "diag")
    f1, f2 = _kernel_outputs(model, x1, x2, params, diag=diag)
    if diag:   # each point's outputs against its partner's only
        if vector_output:
            return torch.einsum("...ni,...nj->...nij", f1, f2)
        return torch.einsum("...ni,...ni->...n", f1, f2).div_(f1.shape[-1])
    if vector_output:
        return torch.einsum("...ni,...mj->...nmij", f1, f2)
    return (f1 @ f2.mT).div_(f1.shape[-1])   # in place: the product is fresh, a second kernel-sized copy is not needed


def _kernel_outputs(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None,
                    params: Mapping[str, Tensor] | None = None, whole: bool = True,
                    diag: bool = False) -> tuple[Tensor, Tensor]:
    """The checked outputs ``(f(x1), f(x2))`` (``f(x2)`` is ``f(x1)`` itself without ``x2``) as
    ``(..., n, k)``, one set per member of an ensemble: the factors of :func:`empirical_nngp`, whose
    kernel (its diagonal with ``diag``) must fit the device's memory when it is formed ``whole`` (not
    in blocks of rows)."""
    x1, x2 = _checked_inputs(model, x1, x2, diag)
    _check_network_inputs(model, x1, x2)
    if whole:
        _check_kernel_fits(model, x1, x2, "NNGP", diag, params)
    # batches of inputs (per-member (E, n, d) ones too) only for ntkgp's networks (_checked_inputs); their
    # outputs are right by construction
    built = _built_by_ntkgp(model)
    fn, params, members, _ = _as_function(model, params, x1)

    def outputs(x: Tensor) -> Tensor:
        out = fn(params, x)
        if not built and members is not None and _per_member(fn, params, x, members, out):
            # a module of the user's around an ensemble: one kernel per member, as empirical_ntk gives.
            # Its (E, n, k) outputs were refused as not "(n, k) for inputs (n, d)"; (E, n), the output
            # axis squeezed, too, and when E = n read as n points' E outputs
            out = out.unsqueeze(-1) if out.dim() == x.dim() else out
            return _outputs_2d(out, x.expand(members, *x.shape))
        return _outputs_2d(out, None if built else x)

    with torch.no_grad():
        f1 = outputs(x1)
        if whole and not built and members is not None and f1.dim() == 3:   # one kernel per member after all
            _check_kernel_fits(model, x1, x2, "NNGP", diag, params, f1.shape[0])
        return f1, f1 if x2 is None else outputs(x2)


def _per_member(fn: ParamFn, params: Mapping[str, Tensor], x: Tensor, members: int, out: Tensor) -> bool:
    """Whether the outputs ``out = fn(params, x)`` of a module of the user's around an ensemble of ``members``
    are one set per member, ``(E, n, k)`` or ``(E, n)`` (the output axis squeezed), rather than outputs ``(n, k)``
    it made of all members' (their mean, say). Where ``E = n`` and ``(E, n)`` could be ``(n, k)``, which axis
    follows the points shows with one point more: a pass whose random numbers (dropout's) are given back, or the
    NNGP's outputs at ``x2`` had other dropout masks than the module's second call draws, and the caller's
    stream moved on."""
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != members:   # (a tuple: _outputs_2d names it)
        return False
    if out.dim() == x.dim() + 1:
        return True
    n = x.shape[-2]
    if out.dim() != x.dim() or out.shape[-1] != n:
        return False
    if n != members:
        return True
    devices = [] if x.device.type == "cpu" else [x.device]
    with torch.random.fork_rng(devices, device_type=x.device.type if devices else "cuda"):
        return fn(cast("dict[str, Tensor]", params), torch.cat([x, x[..., :1, :]], -2)).shape[-1] == n + 1


@_naming_dtype_mismatch
@_without_autocast
def empirical_ntk(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None = None, *,
                  params: Mapping[str, Tensor] | None = None, vector_output: bool = False,
                  chunk_size: int | None = None, parameter_scales: Mapping[str, float | Tensor] | None = None,
                  diag: bool = False) -> Tensor:
    """``Θ̂(x, x') = Σ_p s_p ∂f(x)/∂θ_p ∂f(x')/∂θ_p`` per output unit, or in full with
    ``vector_output``: the empirical neural tangent kernel, which converges to the analytic NTK as
    the width grows (Jacot et al. 2018).

    Args:
        model: a module (its parameters are ``θ``), or a function ``f(params, x)``.
        x1: ``(n1, d)`` inputs (networks built by ntkgp also take batches ``(*batch, n1, d)``, on the
            layer-by-layer route below; an ensemble's member axis is the one before ``n1``). Modules
            and functions not built by ntkgp also take integer or boolean inputs (an embedding's
            indices); the kernel then comes in the parameters' dtype.
        x2: ``(n2, d)`` inputs (batches as for ``x1``); ``None`` for ``x1`` itself.
        params: the parameters to differentiate (default: all of the module's, frozen ones
            included; of a :class:`~ntkgp.finite.Linearized` module, or one inside the module, its
            trainable ``θ``, not the expansion point ``θ₀``, so that its kernel is ``J(θ₀) J(θ₀)ᵀ``
            however far ``θ`` moved);
            a module's others are held fixed (stacked ones per member).
        vector_output: return ``Θ̂_ij(x, x')`` as ``(n1, n2, k, k)``; otherwise the per-output
            average ``(1/k) Σ_i Θ̂_ii`` is contracted directly, without the ``k × k`` blocks.
        chunk_size: members of an ensemble processed at once on the Jacobian route (bounds the
            memory of the per-member Jacobians; the layer-by-layer route forms none).
        parameter_scales: optional ``s_p`` per parameter name (a number, or a tensor that
            broadcasts to one member's parameter), default 1. With learning-rate ratios
            ``η_p/η`` this is the tangent kernel that drives training with per-parameter rates,
            e.g. :func:`ntkgp.finite.rates.equivalent_learning_rates` makes a
            standard-parameterized network's kernel equal its NTK-parameterized twin's.
        diag: only ``Θ̂(x1_i, x2_i)`` (``x2`` of ``x1``'s shape, or ``None`` for
            ``Θ̂(x_i, x_i) = (1/k) Σ_p s_p |∂f(x_i)/∂θ_p|²``), as ``net.kernel(x1, x2, diag=True)`` and
            neural-tangents' ``diagonal_axes=(0,)``: each point's gradients against its partner's
            only, in ``O(n)`` memory. Layer by layer from the signals the full kernel uses; on the
            Jacobian route from each point's own Jacobian (per-sample gradients: ``torch.func.vmap``
            over the points, ``DIAG_JACOBIAN_BYTES`` of them at a time, ``CUDA_DIAG_JACOBIAN_BYTES``
            on a GPU), where the full kernel backpropagates every output through all points
            (``O(n²)`` work). Batch norm in
            training mode (whose outputs at a point depend on the others) and modules that
            ``vmap`` cannot map over the points (Python control flow on values, ``.item()``) take
            rows of the Jacobian of all points' outputs instead: the full kernel's diagonal still,
            in ``O(n)`` memory but ``O(n²)`` time. Other modules that mix points get the diagonal
            of each point called alone.

    Returns:
        ``(n1, n2)`` (or ``(n1, n2, k, k)``; ``(n,)`` and ``(n, k, k)`` with ``diag``); with a leading
        ``E`` for ensembles. The kernel is a constant: it carries no gradient to the inputs or the
        parameters on either route. A caller's ``torch.autocast`` is switched off, as in ``net.kernel``.

    Networks built by ntkgp (every module an ntkgp layer, every ``Dense`` layer called once) take
    the layer-by-layer route of the module docstring; anything else, or scales other than numbers
    and per-input-feature columns ``(in, 1)``, takes the Jacobian route: the Jacobian of all ``n k``
    outputs, each output's cotangent backpropagated through all ``n`` points (exact for any module,
    one that mixes points included; ``O(n²)`` work), a chunk of cotangents at a time whose backward
    temporaries take ``JACOBIAN_BYTES`` (64 MiB; ``CUDA_JACOBIAN_BYTES``, 1 GiB, on a GPU): that
    route holds the Jacobians (``n k`` times the parameters), the kernel and the chunk's
    temporaries, ~250 MiB at 2000 points through width 64 on the CPU (4 GB in one ``jacrev``
    pass). The chunk is sized from the tensors that one more forward pass at ``x1`` (and at ``x2``)
    saves for its backward: the module is called once more per set of inputs (the random numbers
    that pass draws, dropout's, are given back to the generator).

    Raises :class:`~ntkgp.layers.base.NonFiniteKernelError` where the kernel overflows the dtype
    (the network's outputs, their gradients or the sums of their products: float32 inputs of
    magnitude 1e20, float16 ones of a few hundred, or a network whose training diverged), as
    ``net.kernel`` does for the analytic one, and ``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``)
    before the network runs where the ``(E, n1, n2)`` kernel alone exceeds the device's memory. The
    layer-by-layer route holds the kernel, a few blocks of its rows and the layer signals
    (``k n`` values per unit): 1.25 kernels at 2000 points through width 16.
    """
    kernel = _empirical_ntk(model, x1, x2, params=params, vector_output=vector_output, chunk_size=chunk_size,
                            parameter_scales=parameter_scales, diag=diag)
    return _refuse_non_finite(kernel, "NTK", model, params, x1, x2)


@_without_autocast
@differentiates
def _empirical_ntk(model: nn.Module | ParamFn, x1: Tensor, x2: Tensor | None = None, *,
                   params: Mapping[str, Tensor] | None = None, vector_output: bool = False,
                   chunk_size: int | None = None, parameter_scales: Mapping[str, float | Tensor] | None = None,
                   diag: bool = False) -> Tensor:
    """:func:`empirical_ntk`, inf and NaN included: :func:`ntkgp.finite.train_ensemble` records the
    kernel of members whose training is diverging (their losses still finite)."""
    check_flag(diag, "diag")
    x1, x2 = _checked_inputs(model, x1, x2, diag)
    check_flag(vector_output, "vector_output")
    chunk_size = None if chunk_size is None else integer_at_least(chunk_size, 1, "chunk_size")
    _check_network_inputs(model, x1, x2)
    _check_kernel_fits(model, x1, x2, "NTK", diag, params)
    # a list of rates failed as "cannot convert dictionary update sequence element", a tensor as "Boolean
    # value of Tensor ... is ambiguous", and one number (0, or 0.0) read as no scales at all, silently
    if parameter_scales is not None and not isinstance(parameter_scales, Mapping):
        raise ValueError(f"parameter_scales must be a dict of parameter name -> scale (like the rates of "
                         f"equivalent_learning_rates divided by η), got {type(parameter_scales).__name__}.")
    scales = dict(parameter_scales or {})
    # only on the Jacobian route (no network built by ntkgp has batch norm): torch.func refused the running
    # statistics' in-place update, "During a grad (vjp, jvp, grad, etc) transform ... would mutate a captured Tensor"
    updating = sorted({type(m).__name__ for m in (model.modules() if isinstance(model, nn.Module) else ())
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats})
    if updating:
        raise ValueError(f"The module has {updating} layers in training mode: they update their running statistics "
                         "when called, which the empirical NTK cannot differentiate (nor is the kernel a function "
                         "of the parameters). Call model.eval() first.")
    fn, all_params, members, fixed = _as_function(model, params, x1)
    complex_params = [name for name, p in all_params.items() if p.is_complex()]
    if complex_params:   # (params= of complex values are refused by _check_params; a module's own were taken)
        # torch's gradient of a complex parameter is complex: the "NTK" came out complex, its real part not the
        # kernel of the real and imaginary parts as parameters (0.081 - 0.042i for -0.011), its diagonal a jacrev error
        raise ValueError(f"The module's parameters {complex_params} are complex; the NTK is of real parameters: hold "
                         "each as the real tensor of its parts (torch.view_as_real) and make it complex in forward "
                         "(torch.view_as_complex), or leave it out of params= (held fixed).")
    per_member_dims: int | None = None
    if members is not None and x1.shape[-2] and not _built_by_ntkgp(model):
        # a module of the user's that makes its outputs of all members' (their mean, say) is one function of all
        # their parameters: mapped over the members, each member's slice of it was called as the whole ("must
        # return outputs (n, k) ...; got (2, 1)", where the NNGP took it as it is). The random numbers this pass
        # draws (dropout's) are given back, so that the kernel draws those it drew without it
        devices = [] if x1.device.type == "cpu" else [x1.device]
        with torch.no_grad(), torch.random.fork_rng(devices, device_type=x1.device.type if devices else "cuda"):
            values = {**fixed, **all_params}
            whole_outputs = fn(values, x1)
            if not _per_member(fn, values, x1, members, whole_outputs):
                members = None
            else:
                # a parameter of the module's own with a member axis (a per-member output scale, (E, 1, 1)) is not
                # mapped over the members: each member's call makes all members' outputs from it, (E, n, k) where
                # (n, k) is one member's, and its own row of them is its outputs (_own_outputs)
                per_member_dims = whole_outputs.dim() - 1
        if members is not None:   # checked as one kernel before the outputs showed one per member
            _check_kernel_fits(model, x1, x2, "NTK", diag, params, members)
    if isinstance(model, nn.Module):
        scales = _scales_by_name(model, scales, all_params, fixed)
    stacked = _stacked_names(model) if members is not None else set()
    unknown = sorted(set(scales) - set(all_params))
    aliases = dict(model.named_parameters(remove_duplicate=False)) if isinstance(model, nn.Module) else {}
    held = [name for name in unknown if name in fixed or name in aliases]
    if held:   # said to be parameters "the network does not have", of a Linearized's own initial.* too
        raise ValueError(f"parameter_scales names parameters that are not differentiated: {held} (held fixed: "
                         "params= leaves them out, or they hold a Linearized module's expansion point θ₀).")
    if unknown:
        raise ValueError(f"parameter_scales names parameters the network does not have: {unknown}.")
    for name, scale in scales.items():   # a wrong shape was torch's expand error from inside the Jacobian route
        value = _scale_tensor(name, scale)
        shape, given = tuple(all_params[name].shape[members is not None and name in stacked:]), tuple(value.shape)
        try:
            fits = tuple(broadcast_shapes(given, shape)) == shape      # one member's parameter
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"parameter_scales[{name!r}] of shape {given} does not broadcast to the parameter's "
                             f"shape {shape} (one member's).")
        # learning-rate ratios: a NaN gave a NaN kernel and a negative one an indefinite "NTK", silently
        if not (torch.isfinite(value).all() and (value >= 0).all()):
            raise ValueError(f"parameter_scales[{name!r}] must be finite and non-negative (a learning-rate ratio), "
                             f"got {scale!r}.")
    if x1.shape[-2] == 0 or (x2 is not None and x2.shape[-2] == 0) or not all_params:
        # no points, or no parameters to differentiate (a module without any, params={}): the kernel is
        # zero, of the NNGP's shape (the replicas of the layer-by-layer route cannot be unflattened from
        # zero points, and torch.func's Jacobian of no parameters was a pytree error)
        return _empirical_nngp(model, x1, x2, params=params, vector_output=vector_output, diag=diag).zero_()
    if params is None and isinstance(model, nn.Module) and _layerwise_applies(model, x1, scales):
        return _layerwise_ntk(model, x1, x2, scales, vector_output, diag)
    _check_plain_inputs(x1, x2, model)
    params = {name: p.detach() for name, p in all_params.items()}
    # no graph to the inputs either, as on the layer-by-layer route (whose signals are detached):
    # the same network wrapped in a user module gave a differentiable kernel, built alone a constant
    x1, x2 = x1.detach(), None if x2 is None else x2.detach()
    # with diag each point's Jacobian meets its partner's only: (n, k, k) or (n) values, not (n, n, ...)
    if diag:
        spec = "nip,njp->nij" if vector_output else "nip,nip->n"
    else:
        spec = "nip,mjp->nmij" if vector_output else "nip,mip->nm"
    rows = _diagonal_block_rows(fn, {**fixed, **params}, x1, x2, members, chunk_size) if diag else 0
    # the full kernel's Jacobians, a bounded number of outputs' cotangents backpropagated at a time
    passes = [0 if diag or x is None else _cotangents_per_pass(fn, fixed, params, x, members, chunk_size)
              for x in (x1, x2)]
    # batch norm in training mode (running statistics not tracked: tracked ones were refused above)
    mixes = isinstance(model, nn.Module) and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                                                 for m in model.modules())

    def contract(p: dict[str, Tensor], j1: dict[str, Tensor], j2: dict[str, Tensor]) -> Tensor:
        total = None
        for name in p:
            a = j1[name].reshape(*j1[name].shape[:2], -1)  # (n, k, parameters), scalars included
            b = j2[name].reshape(*j2[name].shape[:2], -1)
            if name in scales:
                a = a * torch.as_tensor(scales[name], dtype=a.dtype, device=a.device).expand(p[name].shape).reshape(-1)
            term = torch.einsum(spec, a, b)
            # into the running sum: a fresh sum per parameter held three kernels at once (122 MiB each at 4000
            # points). Not under a caller's vmap: a term that does not depend on the mapped inputs (a last
            # bias's) is not batched, and cannot take the others in place
            total = term if total is None else total + term if transforms_active() else total.add_(term)
            del term
        assert total is not None   # p is not empty: params={} returned zeros before
        return total if vector_output else total.div_(a.shape[1])

    def single(p: dict[str, Tensor], constants: dict[str, Tensor], member: Tensor | None = None) -> Tensor:
        f = fn if member is None or members is None or per_member_dims is None else functools.partial(
            _own_outputs, fn, member, members, per_member_dims)
        if not diag:
            # one cotangent per output, backpropagated through all n points: all at once (one jacrev pass)
            # that made (n·k) × n × width temporaries (4 GB at 2000 points through width 64); in chunks
            j1 = _jacobian(lambda q: _outputs_2d(f({**constants, **q}, x1), x1), p, passes[0])
            j2 = j1 if x2 is None else _jacobian(lambda q: _outputs_2d(f({**constants, **q}, x2), x2), p, passes[1])
            return contract(p, j1, j2)

        return _jacobian_diagonal(f, p, constants, x1, x2, rows, functools.partial(contract, p), mixes)

    if members is None:
        return single(params, fixed)
    # a module of the user's may hold parameters beside the ensemble's stacked ones (a head applied to every member's
    # outputs): each member's kernel is in those too, whole. Mapped over their first axis, they were vmap's "Expected
    # all tensors to have the same size in the mapped dimension" or a slice of them the module could not use
    dims = tuple({name: 0 if name in stacked else None for name in values} for values in (params, fixed))
    index = torch.arange(members, device=x1.device)   # each call's member, for _own_outputs
    return vmap(single, in_dims=(*dims, 0), chunk_size=chunk_size)(params, fixed, index)


def _own_outputs(fn: ParamFn, member: Tensor, members: int, dims: int, p: dict[str, Tensor], x: Tensor) -> Tensor:
    """Member ``member``'s outputs of a module of the user's around an ensemble, called (mapped over the members)
    with that member's slice of the stacked parameters and all of its own: ``dims``-dimensional, ``(n, k)`` or
    ``(n,)``, unless a parameter of its own has a member axis (a per-member scale ``(E, 1, 1)``, held whole), which
    makes them ``(E, ...)``: then the member's row, whose Jacobian in that parameter is in its own slice alone.
    Mapped over its first axis as a stacked one, a parameter (E, ...) that is not per member (a head's weight
    (E, k) with E outputs) was cut into rows; held whole, a per-member one gave (E, n, k) outputs, refused."""
    out = fn(p, x)
    if isinstance(out, Tensor) and out.dim() == dims + 1 and out.shape[0] == members:
        return out.index_select(0, member.view(1)).squeeze(0)
    return out


def _stacked_names(model: nn.Module | ParamFn) -> set[str]:
    """The names (all of each, :meth:`~torch.nn.Module.named_parameters` with duplicates) of an ensemble's
    stacked parameters, members first: those of ntkgp's Dense twins built with ``ensemble_size``."""
    if not isinstance(model, nn.Module):
        return set()
    stacked = {id(p) for m in model.modules() if isinstance(m, DenseModule) and m.ensemble_size is not None
               for p in m.parameters()}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in stacked}


def _jacobian(f: Callable[[dict[str, Tensor]], Tensor], p: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """``∂f(p)/∂p`` per parameter, ``(*f's shape, *p's shape)``, as ``torch.func.jacrev(f, chunk_size=rows)``:
    one forward pass, then the vector-Jacobian products of ``rows`` outputs' cotangents at a time
    (``vmap`` over the pullback), written into Jacobians allocated before the first. ``jacrev`` kept
    every chunk's rows and concatenated them: the small rows it kept between the large freed
    temporaries fragmented the heap, and the resident memory grew as if nothing were freed (1.1 GB
    at 1000 points with one cotangent at a time, 47 MiB preallocated)."""
    out, pullback = vjp(f, p)[:2]   # (no auxiliary outputs)
    total = out.numel()
    jac: dict[str, Tensor] = {}
    for start in range(0, total, rows):
        count = min(rows, total - start)
        # output start + i in row i. Indexed, not fill_diagonal_ of a slice: torch.compile refuses mutating
        # that slice (a view of a view through as_strided, which it cannot functionalize)
        basis = torch.zeros(count, total, dtype=out.dtype, device=out.device)
        rows_at = torch.arange(count, device=out.device)
        basis[rows_at, rows_at + start] = 1
        (grads,) = vmap(pullback)(basis.view(count, *out.shape))
        for name, grad in grads.items():
            if name not in jac:   # from the gradient: under a caller's vmap over the inputs it is batched
                jac[name] = grad.new_empty((total, *grad.shape[1:]))
            jac[name][start:start + count].copy_(grad)
    return {name: j.view(*out.shape, *p[name].shape) for name, j in jac.items()}


#: Bytes of temporaries that the Jacobian route's full kernel forms at a time: the gradients, for a chunk of
#: cotangents (outputs), of every tensor the network's forward pass over all points saved for its backward.
JACOBIAN_BYTES = 1 << 26
#: The same on a GPU, where each chunk costs its kernel launches rather than cache misses: on an H200,
#: 8000 points through width 64 took 9.3 s at 64 MiB, 1.5 s at 256 MiB and 0.26 s at 1 GiB, at the same
#: peak (1277 MiB: the Jacobians, the kernel and one parameter's term of it; docs/benchmarks.md).
CUDA_JACOBIAN_BYTES = 1 << 30


def _cotangents_per_pass(fn: ParamFn, fixed: dict[str, Tensor], params: dict[str, Tensor], x: Tensor,
                         members: int | None, chunk_size: int | None) -> int:
    """The chunk of cotangents of :func:`_jacobian` for the outputs at ``x``: ``JACOBIAN_BYTES`` of
    temporaries. Each cotangent's backward pass through all ``n`` points forms a gradient of every
    tensor the forward pass saved for it (``n`` times the widths for a dense network, whatever the
    module: :func:`_saved_bytes`) and of every parameter (a row of the Jacobian); both are counted
    4 times (the products' temporaries beside the gradients: 4x keeps the measured peak within the
    budget), for each member of an ensemble processed at once.
    Under a caller's ``torch.func`` transform, where no graph can be read, every point's saved
    tensors are taken to be as large as the parameters (a dense layer's activations are a fraction)."""
    weights = sum(p.numel() * p.element_size() for p in params.values())
    saved = _saved_bytes(fn, fixed, params, x)
    if saved is None:
        saved = x.shape[-2] * weights
    per_cotangent = 4 * (saved + weights) // (members or 1) * _members_at_once(members, chunk_size)
    budget = CUDA_JACOBIAN_BYTES if x.device.type == "cuda" else JACOBIAN_BYTES
    return max(1, budget // max(1, per_cotangent))


def _members_at_once(members: int | None, chunk_size: int | None) -> int:
    """Members of an ensemble whose Jacobians are formed together (``vmap`` with ``chunk_size``)."""
    return 1 if members is None else min(members, chunk_size or members)


def _saved_bytes(fn: ParamFn, fixed: dict[str, Tensor], params: dict[str, Tensor], x: Tensor) -> int | None:
    """Bytes of the distinct tensors that autograd saves for the backward pass in one forward pass of
    ``fn`` at ``x`` (its graph's saved tensors: :func:`_saved_names`); ``None`` under ``torch.func`` transforms or
    ``torch.compile`` (no parameter can require grad there). Read from the graph, not by
    ``saved_tensors_hooks``: those refused a function that calls ``torch.func.grad`` itself."""
    if transforms_active() or _is_compiling():
        return None
    variables = {name: p.detach().requires_grad_() for name, p in params.items()}
    # this forward pass only measures: the random numbers it draws (dropout in training mode) are given
    # back, or the kernel's own pass drew others than one jacrev pass did, and the caller's stream moved on
    devices = [] if x.device.type == "cpu" else [x.device]
    with torch.random.fork_rng(devices, device_type=x.device.type if devices else "cuda"), torch.enable_grad():
        out = fn({**fixed, **variables}, x)
    # each saved tensor's own bytes (its gradient's), once however many nodes saved it. Not its storage's:
    # inputs x = data[:n] counted all of data, and one cotangent per pass (2.6x slower at 100 of 200 000 points)
    tensors: dict[tuple, int] = {}
    nodes = [out.grad_fn] if isinstance(out, Tensor) and out.grad_fn is not None else []
    seen: dict[int, object] = {}   # the nodes kept, so that an id is not reused by another
    while nodes:
        node = nodes.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        for name in _saved_names(node):
            try:
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, Tensor):
                        tensors[t.data_ptr(), t.dtype, tuple(t.shape), t.stride()] = t.numel() * t.element_size()
            except RuntimeError:   # freed, or a torch.func wrapper's (no storage of its own): none of ours
                continue
        nodes.extend(child for child, _ in node.next_functions if child is not None)
    return sum(tensors.values())


#: The attributes of each type of autograd node that hold its saved tensors.
_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _saved_names(node: object) -> tuple[str, ...]:
    """The attributes of ``node`` that hold tensors saved for its backward: torch's ``_saved_*``, and a
    custom ``torch.autograd.Function``'s ``saved_tensors`` (``ctx.save_for_backward``, which has no
    ``_saved_`` name: its tensors were not counted). Per type, once: ``dir`` of every node was a quarter of the
    cost of reading the graph."""
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = tuple(name for name in dir(node) if name.startswith("_saved_") or name == "saved_tensors")
        _SAVED_NAMES[type(node)] = names
    return names


def _jacobian_diagonal(fn: ParamFn, p: dict[str, Tensor], constants: dict[str, Tensor], x1: Tensor,
                       x2: Tensor | None, rows: int, contract: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
                       mixes: bool) -> Tensor:
    """The Jacobian route's diagonal ``contract(J(x1_a), J(x2_a))`` for each pair ``a``, a block of
    points at a time, in ``O(n)`` memory: the Jacobian of all outputs at once backpropagates ``n·k``
    cotangents through all ``n`` points, ``(n·k) × n × width`` values (25.6 GB at 20 000 points, width 8).

    Each point's own Jacobian (per-sample gradients: the module called on that point alone, vmapped
    over the points, ``rows`` of them at a time) unless the outputs at a point depend on the others
    (``mixes``: batch norm in training mode, which refused single points, "Expected more than 1 value
    per channel when training") or ``torch.func.vmap`` cannot map the module over the points (Python
    control flow on values, ``.item()``: "vmap: It looks like you're ... calling .item()", where the
    full kernel has no such limit). There the rows ``a`` of the Jacobian of all points' outputs are
    taken, as many as the Jacobians of ``rows`` single points hold with every point in each row's
    backward pass: the full kernel's diagonal still, in ``O(n)`` memory and ``O(n²)`` time."""

    def alone(x: Tensor) -> dict[str, Tensor]:
        return jacrev(lambda q: _outputs_2d(fn({**constants, **q}, x[None]), x[None])[0])(p)

    def among_all(x: Tensor, block: slice) -> dict[str, Tensor]:
        return jacrev(lambda q: _outputs_2d(fn({**constants, **q}, x), x)[block])(p)

    def blocks(jacobians: Callable[[Tensor, slice], dict[str, Tensor]], size: int) -> Tensor:
        parts: list[Tensor] = []
        for start in range(0, x1.shape[-2], size):
            block = slice(start, start + size)
            j1 = jacobians(x1, block)
            parts.append(contract(j1, j1 if x2 is None else jacobians(x2, block)))
            if len(parts) == 64:   # joined: thousands of one-row results held between the backward passes'
                parts = [torch.cat(parts)]   # large buffers kept the allocator from reusing them (1.2 GB at 3000)
        return torch.cat(parts)

    if not mixes:
        per_point = vmap(alone, randomness="different")   # dropout in training mode: warned, as without diag
        try:
            return blocks(lambda x, block: per_point(x[block]), rows)
        except RuntimeError as error:
            if isinstance(error, torch.cuda.OutOfMemoryError) or "vmap" not in str(error):
                raise
    return blocks(among_all, max(1, rows // (x1.shape[-2] + 1)))


#: Bytes of per-point Jacobians (of ``x1``'s block and ``x2``'s, all members processed at once) that the
#: Jacobian route's diagonal holds at a time.
DIAG_JACOBIAN_BYTES = 1 << 26
#: The same on a GPU (on an H200, 8000 points: 0.018 s at 64 MiB, 0.008 s at 256 MiB; docs/benchmarks.md).
CUDA_DIAG_JACOBIAN_BYTES = 1 << 28


def _diagonal_block_rows(fn: ParamFn, params: dict[str, Tensor], x1: Tensor, x2: Tensor | None,
                         members: int | None, chunk_size: int | None) -> int:
    """Points per block of the Jacobian route's diagonal: ``DIAG_JACOBIAN_BYTES`` of Jacobians, ``k``
    outputs (from one point's) by the parameters of a member, for each set and member processed at once."""
    with torch.no_grad():
        # two points: batch norm in training mode refuses one ("Expected more than 1 value per channel")
        k = _outputs_2d(fn(params, x1[..., :2, :])).shape[-1]
    per_member = sum(p.numel() for p in params.values()) // (members or 1)
    itemsize = torch.empty(0, dtype=_kernel_dtype(x1, params, fn)).element_size()   # indices as inputs: not x1's
    per_point = k * per_member * itemsize * _members_at_once(members, chunk_size) * (1 if x2 is None else 2)
    budget = CUDA_DIAG_JACOBIAN_BYTES if x1.device.type == "cuda" else DIAG_JACOBIAN_BYTES
    return max(1, budget // max(1, per_point))


def kernel_row_blocks(model: nn.Module, x1: Tensor, x2: Tensor | None, rows: int, ntk: bool = True,
                      chunk_size: int | None = None) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
    """``(block, K̂, Θ̂)`` for blocks of ``rows`` rows of ``x1`` ``(n1, d)``: :func:`empirical_nngp` and
    (with ``ntk``, else ``None``) :func:`empirical_ntk` of ``model`` between ``x1[block]`` and ``x2``
    (``x1`` without it), ``(E, rows, n2)`` for an ensemble, each refused where not finite as there.

    The outputs and, on the layer-by-layer route, the layer signals of all points are formed once;
    only the kernels are formed a block of rows at a time. An ensemble's kernels are ``E`` matrices
    (64 ``n × n`` ones in a batch of :func:`ntkgp.finite.monte_carlo_kernel`), where their running
    mean needs one: held whole, they took 7.1 GiB beside a 31 MiB estimate at 2000 points.
    """
    other = x1 if x2 is None else x2
    with _autocast_off(x1.device):
        f1, f2 = _kernel_outputs(model, x1, x2, whole=False)
    signals = _layerwise_signals(model, x1, x2) if ntk else None
    for start in range(0, x1.shape[-2], rows):
        block = slice(start, start + rows)
        with _autocast_off(x1.device):
            nngp = _refuse_non_finite((f1[..., block, :] @ f2.mT).div_(f1.shape[-1]), "NNGP", model, None,
                                      x1[block], other)
            if signals is not None:
                s1, s2 = signals
                rows_of_s1 = [(m, u[..., block, :], delta[..., block, :], c) for m, u, delta, c in s1]
                tangent: Tensor | None = _refuse_non_finite(_layerwise_sum(model, rows_of_s1, s2, vector_output=False),
                                                            "NTK", model, None, x1[block], other)
            else:
                tangent = empirical_ntk(model, x1[block], other, chunk_size=chunk_size) if ntk else None
        yield block, nngp, tangent


@_without_autocast
@differentiates
def _layerwise_signals(model: nn.Module, x1: Tensor, x2: Tensor | None) -> tuple[Signals, Signals] | None:
    """The layer signals of ``x1`` and ``x2`` (``x1``'s twice without it) where the layer-by-layer route
    applies to all of the module's parameters, unscaled, and there are points to unflatten; else ``None``."""
    if x1.shape[-2] == 0 or (x2 is not None and x2.shape[-2] == 0) or not _layerwise_applies(model, x1, {}):
        return None
    s1 = _signals(model, x1)
    return s1, s1 if x2 is None else _signals(model, x2)


def _refuse_non_finite(kernel: Tensor, name: str, model: nn.Module | ParamFn, params: Mapping[str, Tensor] | None,
                       x1: Tensor, x2: Tensor | None) -> Tensor:
    """``kernel``, or :class:`~ntkgp.layers.base.NonFiniteKernelError` where it is not finite, naming
    what overflowed (the network's outputs, or what the kernel makes of finite ones), the dtype and
    the remedy, as ``net.kernel`` and ``monte_carlo_kernel`` do. Skipped under ``torch.func``
    transforms and ``torch.compile`` (values per sample, or symbolic), as there."""
    if transforms_active() or _is_compiling() or all_finite(kernel):
        return kernel
    points = [x for x in (x1, x2) if x is not None and x.numel()]
    # which overflowed, from the outputs: not for batch norm that updates its running statistics when called
    outputs_finite = None
    if not (isinstance(model, nn.Module) and any(m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 and m.track_running_stats for m in model.modules())):
        with torch.no_grad(), warnings.catch_warnings():   # the training-mode warning came with the kernel
            warnings.simplefilter("ignore")
            fn, values, _, fixed = _as_function(model, params, x1)
            outputs_finite = all(all_finite(_outputs_2d(fn({**fixed, **values}, x))) for x in points)
    what = ("the network's outputs overflow it" if outputs_finite is False else
            "the network's outputs or what the kernel makes of them overflow it" if outputs_finite is None else
            "the network's outputs are finite, their products overflow it" if name == "NNGP" else
            "the network's outputs are finite, their gradients or the sums of their products overflow it")
    largest = max(float(x.detach().abs().max() if x.is_floating_point() else x.detach().double().abs().max())
                  for x in points)   # (torch has no abs of booleans)
    raise NonFiniteKernelError(
        f"The empirical {name} kernel is not finite in {kernel.dtype}: {what} (inputs of magnitude up to "
        f"{largest:.3g}). Scale the inputs down" + ("" if kernel.dtype == torch.float64 else
                                                   ", or use float64 (the network's parameters and the inputs)")
        + "; a network whose weights grew without bound (a diverged training) has no finite kernel.")


def _scales_by_name(model: nn.Module, scales: dict, differentiated: Mapping[str, Tensor],
                    fixed: Mapping[str, Tensor]) -> dict:
    """``parameter_scales`` keyed by the names under which the parameters are differentiated (a held one's by the
    name given, which the error refusing it names):
    a parameter shared by two layers (``nn.Sequential(lin, act, lin)``) has a name per use, and its scale
    given under another than ``named_parameters()`` lists was refused as "a parameter the network does not
    have". Two scales for one parameter, under two of its names, are refused."""
    own = dict(model.named_parameters(remove_duplicate=False))
    names = {id(own[name]): name for name in fixed if name in own}
    names.update({id(own[name]): name for name in differentiated if name in own})
    given: dict[str, str] = {}
    by_name = {}
    for name, scale in scales.items():
        target = names.get(id(own[name]), name) if name in own else name
        if target in given:
            raise ValueError(f"parameter_scales gives one parameter two scales, under {given[target]!r} and {name!r} "
                             "(names of one parameter shared by several layers): give it one.")
        given[target] = name
        # (that error named the held parameter's other name, one the caller had not written)
        by_name[target if target in differentiated else name] = scale
    return by_name


def _scale_tensor(name: str, scale: object) -> Tensor:
    """``parameter_scales[name]`` as a real tensor: a string or None failed inside torch's conversion
    ("new(): invalid data type 'str'"), a complex scale in its comparison ("ge_cpu" not implemented)."""
    kind = "a non-negative real number or a real tensor"
    if boolean_or_complex(scale):
        raise ValueError(f"parameter_scales[{name!r}] must be {kind}, got {scale!r}.")
    try:
        return scale if isinstance(scale, Tensor) else torch.as_tensor(scale)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"parameter_scales[{name!r}] must be {kind}, got {scale!r}.") from err


def _layerwise_applies(model: nn.Module, x: Tensor, scales: dict) -> bool:
    """Whether the layer-by-layer formula is exact for ``model``: an ntkgp-built network (so no
    layer mixes points and all parameters live in ``Dense`` layers), each ``Dense`` called once,
    and scales it can apply (numbers, or one per input feature of a weight)."""
    modules = list(model.modules())
    # the twins alone: ntkgp.finite.Linearized is an ntkgp module too, but it calls its copies through
    # torch.func, and on this route empirical_ntk(linearize(model), x) failed inside autograd ("One of
    # the differentiated Tensors does not require grad")
    if not all(type(m) in _BUILT_CONTAINERS or isinstance(m, _TWINS) for m in modules):
        return False
    owned = [(id(p), (prefix, name, m)) for prefix, m in model.named_modules() if isinstance(m, DenseModule)
             for name, p in m.named_parameters(recurse=False)]
    dense = dict(owned)
    if len(dense) != len(owned):   # tied weights: the per-layer sum would miss the terms between their uses
        return False
    params = list(model.named_parameters())
    if not params or any(id(p) not in dense for _, p in params):
        return False
    for full_name, p in params:
        if full_name not in scales:
            continue
        scale = torch.as_tensor(scales[full_name])
        _, name, module = dense[id(p)]
        per_input = (name == "weight" and scale.dim() >= 2 and scale.shape[-1] == 1
                     and scale.numel() == module.weight.shape[-2])
        if scale.numel() != 1 and not per_input:
            return False
    calls: dict[int, int] = {}

    def count(module, inputs, output) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    handles = [m.register_forward_hook(count) for m in modules if isinstance(m, DenseModule)]
    try:
        with torch.no_grad():
            model(x[..., :1, :])
    finally:
        for handle in handles:
            handle.remove()
    return all(c == 1 for c in calls.values())


def _signals(model: nn.Module, x: Tensor) -> Signals:
    """For every Dense call: (the layer, its multiplied input ``u``, ``δ_i = ∂f_i/∂z`` stacked over outputs
    ``i`` in front, the squared bias scale or ``None``).

    The ``n`` points are replicated once per output unit ``i`` along the point axis and the
    cotangent selects output ``i`` in replica ``i``, so one ordinary backward pass through plain
    (batched) matrix products yields every ``δ_l,i``.
    """
    n = x.shape[-2]
    with torch.no_grad():
        k = _outputs_2d(model(x[..., :1, :])).shape[-1]
    records: list[tuple[DenseModule, Tensor, Tensor]] = []

    def hook(module: DenseModule, inputs: tuple[Tensor], output: Tensor) -> None:
        u = inputs[0] if module.input_scale is None else inputs[0] * module.input_scale
        records.append((module, u[..., :n, :].detach(), output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DenseModule)]
    try:
        with torch.enable_grad():
            leaf = x.detach().repeat(*([1] * (x.dim() - 2)), k, 1).requires_grad_()
            out = _outputs_2d(model(leaf))                              # (..., k·n, k)
            selector = torch.eye(k, dtype=out.dtype, device=out.device).repeat_interleave(n, 0)
            # materialized: a layer whose output nothing uses (a constant activation such as
            # Monomial(0) after it) has δ = 0, which autograd otherwise refuses to return
            deltas = torch.autograd.grad(out, [z for _, _, z in records], selector.expand(out.shape),
                                         allow_unused=True, materialize_grads=True)
    finally:
        for handle in handles:
            handle.remove()
    signals: Signals = []
    for (m, u, _), delta in zip(records, deltas, strict=True):
        delta = delta.unflatten(-2, (k, n)).movedim(-3, 0)             # (k, ..., n, width)
        signals.append((m, u, delta, m.bias_scale**2 if m.bias is not None else None))
    return signals


def _layerwise_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None, scales: dict | None = None,
                   vector_output: bool = True, diag: bool = False) -> Tensor:
    """Empirical NTK of a network of ``DenseModule`` layers: ``(..., n1, n2, k, k)``, or the
    per-output average ``(..., n1, n2)`` without ``vector_output``; with ``diag`` the pairs
    ``(x1_i, x2_i)`` alone, ``(..., n, k, k)`` or ``(..., n)``."""
    if diag:
        return _layerwise_diagonal(model, x1, x2, scales, vector_output)
    s1 = _signals(model, x1)
    return _layerwise_sum(model, s1, s1 if x2 is None else _signals(model, x2), scales, vector_output)


#: Bytes of layer signals (and their autograd graph, counted as 4x) that the layer-by-layer diagonal
#: forms at a time: a block of points, since no layer of such a network mixes points.
DIAG_SIGNAL_BYTES = 1 << 24
#: The same on a GPU (on an H200, 32 000 points through two layers of width 512: 0.34 s at 16 MiB, slower
#: than the full kernel's 0.14 s; 0.023 s at 256 MiB; docs/benchmarks.md).
CUDA_DIAG_SIGNAL_BYTES = 1 << 28


def _layerwise_diagonal(model: nn.Module, x1: Tensor, x2: Tensor | None, scales: dict | None,
                        vector_output: bool) -> Tensor:
    """:func:`_layerwise_ntk` with ``diag``, a block of points at a time: the signals of all points were
    ``n`` times every layer's width per output unit (180 MiB beside a 0.015 MiB diagonal at 2000 points,
    width 512), where the diagonal of each point needs its own signals only."""
    with torch.no_grad():   # per point: every output unit of every member and batch, through every layer
        copies = max(_outputs_2d(model(x[..., :1, :])).numel() for x in (x1, x2) if x is not None)
    widths = sum(m.weight.shape[-2] + m.weight.shape[-1] for m in model.modules()
                 if isinstance(m, DenseModule) and m.weight is not None)
    per_point = 4 * copies * widths * x1.element_size() * (1 if x2 is None else 2)
    budget = CUDA_DIAG_SIGNAL_BYTES if x1.device.type == "cuda" else DIAG_SIGNAL_BYTES
    rows = max(1, budget // max(1, per_point))
    parts = []
    for start in range(0, x1.shape[-2], rows):
        block = slice(start, start + rows)
        s1 = _signals(model, x1[..., block, :])
        s2 = s1 if x2 is None else _signals(model, x2[..., block, :])
        parts.append(_layerwise_rows(model, s1, s2, scales, vector_output, diag=True))
        del s1, s2
    return torch.cat(parts, -3 if vector_output else -1)


#: The layer-by-layer sum is formed in up to this many blocks of rows, of at least ``_BLOCK_ROWS`` rows each.
_ROW_BLOCKS, _BLOCK_ROWS = 8, 256


def _layerwise_sum(model: nn.Module, s1: Signals, s2: Signals, scales: dict | None = None,
                   vector_output: bool = True) -> Tensor:
    """``Σ_l (δ_l,i(x) · δ_l,j(x')) (u_l(x) · u_l(x') + c_l)`` from the layer signals of
    :func:`_signals` (of ``x1``, or of a block of its rows, and of ``x2``), written into the kernel a
    block of rows at a time: each layer's two products (``u·u'`` and ``δ·δ'``) and the running sum
    were three kernel-sized matrices at the peak (3.8 kernels at 3000 points), where blocks of an
    eighth of the rows hold the kernel and a few blocks (1.5 kernels)."""
    n1 = s1[0][1].shape[-2]
    rows = max(_BLOCK_ROWS, -(-n1 // _ROW_BLOCKS))
    if rows >= n1:
        return _layerwise_rows(model, s1, s2, scales, vector_output)
    axis = -4 if vector_output else -2   # the rows of (..., n1, n2, k, k) or of (..., n1, n2)
    out: Tensor | None = None
    for start in range(0, n1, rows):
        block = slice(start, start + rows)
        part = _layerwise_rows(model, [(m, u[..., block, :], delta[..., block, :], c) for m, u, delta, c in s1],
                               s2, scales, vector_output)
        if out is None:
            shape = list(part.shape)
            shape[axis] = n1
            out = part.new_empty(shape)
        out.narrow(axis, start, part.shape[axis]).copy_(part)
        del part
    assert out is not None   # n1 > rows >= 1: at least one block
    return out


def _layerwise_rows(model: nn.Module, s1: Signals, s2: Signals, scales: dict | None = None,
                    vector_output: bool = True, diag: bool = False) -> Tensor:
    """:func:`_layerwise_sum` in one piece; with ``diag`` (``s1`` and ``s2`` of as many points)
    ``Σ_l (δ_l,i(x_a) · δ_l,j(x'_a)) (u_l(x_a) · u_l(x'_a) + c_l)`` for each pair ``a`` alone."""
    names = {id(m): prefix for prefix, m in model.named_modules() if isinstance(m, DenseModule)}
    scales = scales or {}
    if diag:
        spec, gram_spec = ("i...aw,j...aw->...aij" if vector_output else "i...aw,i...aw->...a"), "...ap,...ap->...a"
    else:
        spec, gram_spec = ("i...aw,j...bw->...abij" if vector_output else "i...aw,i...bw->...ab"), "...ap,...bp->...ab"
    total = None
    for (module, u1, d1, c), (_, u2, d2, _) in zip(s1, s2, strict=True):
        dot = f"{names[id(module)]}." if names[id(module)] else ""
        w_scale = scales.get(f"{dot}weight")
        if w_scale is not None:  # per input feature (a column (in, 1) of rates) or one number
            w_scale = torch.as_tensor(w_scale, dtype=u1.dtype, device=u1.device)
            u1 = u1 * (w_scale.reshape(-1) if w_scale.numel() > 1 else w_scale.reshape(()))
        gram = torch.einsum(gram_spec, u1, u2)
        if c is not None:
            gram.add_(c * torch.as_tensor(scales.get(f"{dot}bias", 1.0), dtype=gram.dtype,
                                          device=gram.device).reshape(()))
        # in place where the shapes allow (nothing here is differentiated: u and δ are detached),
        # and the layer's matrices freed before the next layer's are formed: a fresh product and
        # sum per layer, and the previous layer's gram and term still bound, made 5.3 kernel-sized
        # matrices the peak (1451 MiB for a 275 MiB kernel)
        term = _mul_into(torch.einsum(spec, d1, d2), gram[..., None, None] if vector_output else gram)
        total = term if total is None else _add_into(total, term)
        del gram, term
    assert total is not None   # _layerwise_applies: the network has parameters, all in Dense layers
    return total if vector_output else total.div_(s1[0][2].shape[0])


def _mul_into(a: Tensor, b: Tensor) -> Tensor:
    """``a * b``, written into ``a`` when ``a`` already has the broadcast shape."""
    return a.mul_(b) if torch.broadcast_shapes(a.shape, b.shape) == a.shape else a * b


def _add_into(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, written into ``a`` when ``a`` already has the broadcast shape."""
    return a.add_(b) if torch.broadcast_shapes(a.shape, b.shape) == a.shape else a + b
