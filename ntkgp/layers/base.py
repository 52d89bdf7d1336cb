"""The layer protocol: one object, two realizations.

Every layer knows

* its infinite-width kernel map, :meth:`Layer.kernel_map` (``KernelState -> KernelState``), and
* its finite-width twin, :meth:`Layer.finite` (a ``torch.nn.Module`` with exactly the same
  parameterization).

Any layer, a single ``Dense`` or a whole ``serial(...)`` network, is a network: it offers
:meth:`Layer.kernel` (NNGP and NTK of input sets) and :meth:`Layer.build` (the finite network).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, SupportsIndex, cast, overload

import gpytorch
import torch
from gpytorch.module import RandomModuleMixin
from linear_operator.utils.errors import NanError
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ntkgp._checks import NT_GET_HINT, check_flag, integer_at_least, neural_tangents_keywords, seed_value
from ntkgp._warnings import caller_stacklevel
from ntkgp.layers.numerics import _is_compiling, transforms_active
from ntkgp.layers.state import BatchedDuplicates, DiagonalDuplicates, Duplicates, KernelState, inputs_fixed
from ntkgp.layers.validation import all_finite, broadcast_shapes, check_inputs, refuse_tracing, usable_device
from ntkgp.layers.variance import VarianceParameters

#: Target number of kernel entries per row block when evaluating kernels without autograd.
BLOCK_ENTRIES = 1 << 19

#: The same on a GPU. There no cache is to be fitted, and a block costs its few hundred kernel
#: launches and host round trips whatever its size: with CPU-sized blocks a 40000-point kernel
#: took 3077 blocks (docs/benchmarks.md). About 128 MiB per float64 intermediate.
CUDA_BLOCK_ENTRIES = 1 << 24

#: With autograd, kernels of at least this many entries are evaluated a block of rows at a time,
#: each block recomputed during the backward pass instead of keeping its intermediates
#: (docs/benchmarks.md: the whole-matrix graph held 52-87 kernel-sized matrices at depths 2-3).
CHECKPOINT_ENTRIES = 1 << 20

#: Target number of kernel entries per row block of a checkpointed kernel: the backward pass
#: holds one block's intermediates at a time (~100 at depth 3), so these blocks are smaller.
CHECKPOINT_BLOCK_ENTRIES = 1 << 18


class NonFiniteVarianceError(ValueError, NanError):
    """A variance hyperparameter is NaN or infinite.

    Raised by :meth:`Layer.kernel` (and so by the GPyTorch kernels and models built on it) before
    any kernel work when a variance is not finite in the inputs' dtype: a NaN raw parameter, or a
    value beyond that dtype's range, such as a learned ``σ_w² = 5e38`` evaluated in float32
    (largest value 3.4e38) that float64 still represents. :meth:`Layer.build` raises it too when a
    ``Dense`` layer's variances are not finite in the build's dtype.

    A ``ValueError`` for the caller, and linear_operator's ``NanError`` for optimizers: BoTorch's
    L-BFGS-B fit reads a ``NanError`` as a NaN loss and shortens its step, as it did when such a
    variance reached GPyTorch's Cholesky; a plain ``ValueError`` would end the fit.
    """


class NonFiniteKernelError(ValueError, NanError):
    """Finite inputs and variances gave a kernel that is not finite: its values overflow the dtype.

    A ``ValueError`` and a ``NanError``, as :class:`NonFiniteVarianceError`, so that an optimizer
    step into such variances is a failed step, not the end of a fit.
    """


@dataclass
class BuildContext:
    """Where and how a finite twin is built: random stream, ensemble size, dtype and device.

    Weights are drawn in float64 on the CPU from one seeded generator and then cast and moved, so
    a seed gives the same network on every device and in every precision (up to rounding).
    """

    generator: torch.Generator
    ensemble_size: int | None = None
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None

    def randn(self, *shape: int) -> Tensor:
        """Standard normal draws with the ensemble dimension in front when there is one."""
        if self.ensemble_size is not None:
            shape = (self.ensemble_size, *shape)
        if self.device is not None and torch.device(self.device).type == "meta":   # shapes only, no memory
            return torch.empty(shape, dtype=self.dtype or torch.get_default_dtype(), device="meta")
        # drawn on the CPU, where the generator lives (torch refuses a CPU generator for draws on the
        # default device when that is CUDA), then moved: the same seed gives the same network anywhere
        sample = torch.randn(shape, generator=self.generator, dtype=torch.float64, device="cpu")
        return sample.to(dtype=self.dtype or torch.get_default_dtype(), device=self.device)

    def child_seed(self) -> int:
        """A seed for a stream of its own (used by layers that draw lazily)."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device="cpu"))


class Layer(VarianceParameters, gpytorch.Module):
    """Base class of all layers (and networks) of ntkgp: each maps the kernels of its input to those
    of its output (:meth:`kernel_map`; NNGP recursion of Lee et al. 2018, NTK recursion of Jacot et
    al. 2018) and builds its finite-width twin (:meth:`finite`), as neural-tangents' ``stax``
    layers do (Novak et al. 2020)."""

    #: Whether the layer maps centred Gaussian features to centred Gaussian features.
    preserves_gaussian: bool = False

    #: Whether the layer's kernel map uses the nearly (anti)parallel pairs' carried values
    #: (:class:`~ntkgp.layers.near.PairCarry`: the ReLU family, ``Sign``, ``Sin``, ``Cos``, ``Rbf``): only
    #: then does a first ``Dense`` layer look for such pairs.
    carries_pairs: bool = False

    #: Whether each output feature depends on the input only through sums over all of its
    #: features, by weights of the layer's own (a ``Dense`` layer), so that at infinite width it
    #: is independent of every single input feature: a branch that mixes is independent of the
    #: other branches of a sum.
    mixes_features: bool = False

    if TYPE_CHECKING:   # what type checkers read: a layer without an __init__ of its own takes no arguments
        def __init__(self) -> None: ...
    else:
        def __init__(self, *args: object, **kwargs: object) -> None:
            # Gabor(-1.0), Sign(1) or Identity(3) (layers without an __init__ of their own) met GPyTorch's
            # "Module.__init__() takes 1 positional argument but 2 were given", which names neither the layer
            # nor what it takes; layers with arguments call this with none
            if args or kwargs:
                given = [f"{len(args)} positional argument(s)"] if args else []
                given += [f"keyword argument(s) {sorted(kwargs)}"] if kwargs else []
                raise TypeError(f"{type(self).__name__}() takes no arguments, got {' and '.join(given)}.")
            super().__init__()

        # inspect.signature(Gabor) stays "()", as it was
        __init__.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)],
                                                   return_annotation="None")

    # ------------------------------------------------------------------ to implement
    def kernel_map(self, state: KernelState) -> KernelState:
        """Map the kernels of this layer's input to the kernels of its output."""
        raise NotImplementedError

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        """The finite-width twin for ``in_width`` input channels and its output width."""
        raise NotImplementedError

    def check_input_dim(self, d: int) -> None:
        """Raise ``ValueError`` if inputs with ``d`` features cannot enter this layer."""

    def check_structure(self) -> None:
        """Raise ``ValueError`` if the architecture has no kernel of the form computed here (checked
        from the spec alone, before any kernel work)."""

    def check_variances(self, x1: Tensor, x2: Tensor | None = None) -> None:
        """Raise ``ValueError`` if the hyperparameters' batch shape does not broadcast with the
        inputs', or :class:`NonFiniteVarianceError` if a variance is not finite in ``x1``'s dtype
        (checked before any kernel work)."""
        _check_variances(x1, x2, list(variances(self)))

    # ------------------------------------------------------------------ public API
    # the overloads tell type checkers that ntk is a tensor unless ntk=False was passed
    @overload
    def kernel(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, ntk: Literal[True] = True,
               compile: bool = False) -> KernelState[Tensor]: ...

    @overload
    def kernel(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, *, ntk: Literal[False],
               compile: bool = False) -> KernelState[None]: ...

    @overload
    def kernel(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, ntk: bool = True,
               compile: bool = False) -> KernelState: ...

    @neural_tangents_keywords(get=NT_GET_HINT)
    def kernel(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, ntk: bool = True,
               compile: bool = False) -> KernelState:
        """NNGP kernel ``K`` and NTK ``Θ`` of this network between ``x1`` and ``x2``.

        Args:
            x1: ``(*batch, n1, d)`` inputs.
            x2: ``(*batch, n2, d)`` inputs, or ``None`` for ``x1`` itself.
            diag: if true, only ``k(x1_i, x2_i)`` (``x2`` of the same shape as ``x1``, or
                ``None`` for ``k(x1_i, x1_i)``) is computed, in ``O(n · depth)``.
            ntk: whether to compute the NTK too (the NNGP alone is cheaper).
            compile: fuse the elementwise recursion with ``torch.compile`` (no-autograd full
                matrices only). The first call for a network, dtype and device compiles (10-80 s
                on two cores); later calls of any size reuse it. The gain depends on the torch build (1.2-2x
                with an earlier one; none with torch 2.13.0's CPU wheel, whose float64 code
                generation fails for some shapes: docs/numerics.md). Where compilation fails it
                warns once and uses the eager path for that network and dtype from then on.

        Returns:
            The kernels, a :class:`KernelState` whose ``nngp`` and ``ntk`` are ``(*batch, n1, n2)``
            (``(*batch, n1)`` when ``diag``) in the dtype and on the device of ``x1``. Kernels
            are per output unit: the covariance of the ``k`` outputs is ``K ⊗ I_k`` when they are
            those of the readout ``Dense`` layer (or a sum of readouts; docs/theory.md, "What
            follows the readout", for an activation, a ``LayerNorm`` or a concatenation after it).

        A graph for autograd is recorded only when grad mode is on and an input or a
        hyperparameter requires a gradient; otherwise large kernels are evaluated in row blocks
        (and only the upper triangle when ``x2`` is ``x1``), which bounds temporary memory.
        With a graph, kernels of ``CHECKPOINT_ENTRIES`` entries or more (counted over the whole
        batch: the inputs' batch dimensions and the hyperparameters' GPyTorch ``batch_shape``) are
        evaluated in row blocks of about ``CHECKPOINT_BLOCK_ENTRIES`` entries (where that makes
        more than one block), each recomputed in the backward pass (activation checkpointing,
        Chen et al. 2016, "Training deep nets with sublinear memory cost"), so the graph keeps
        the blocks' inputs rather than every intermediate matrix of the recursion.

        Kernels whose output alone exceeds the memory of ``x1``'s device (the machine's for the CPU) are
        refused before any work with ``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``, as torch's
        allocators raise), as the empirical kernels of :mod:`ntkgp.finite` are: compute them in slices of
        ``x1``, or their diagonals alone.
        """
        refuse_tracing(f"{type(self).__name__}.kernel", "Call net.kernel itself.")
        for name, flag in (("diag", diag), ("ntk", ntk), ("compile", compile)):
            # neural-tangents' kernel_fn(x1, x2, "nngp") put its get argument where diag is, and the
            # call silently returned the diagonal alone
            check_flag(flag, name, NT_GET_HINT)
        x1, x2 = check_inputs(x1, x2, diag)
        self.check_input_dim(x1.shape[-1])
        self.check_structure()
        found = None
        if type(self).check_variances is Layer.check_variances:
            # one walk over the layers for the check and the batch size (~16 µs each, of ~650 µs for a small call)
            found = list(variances(self))
            _check_variances(x1, x2, found)
        else:
            self.check_variances(x1, x2)
        # a caller's autocast (mixed-precision training) ran the recursion's products in bfloat16 and
        # returned float32 kernels 1 % off; kernels are computed in the inputs' dtype, as documented
        with _autocast_off(x1.device):
            state = self._kernel(x1, x2, diag, ntk, compile, found)
        _check_finite(state, x1, x2)
        return state

    def _kernel(self, x1: Tensor, x2: Tensor | None, diag: bool, ntk: bool, compile: bool,
                found: list[tuple[str, VarianceParameters, str, Tensor]] | None = None) -> KernelState:
        """The kernels of checked inputs; ``found``: this layer's :func:`variances`, if read already."""
        found = list(variances(self)) if found is None else found
        needs_graph = transforms_active() or (torch.is_grad_enabled() and (
            x1.requires_grad or (x2 is not None and x2.requires_grad)
            or any(p.requires_grad for p in self.parameters())
            # sampled variances of a random module (pyro_sample_from_prior) are plain tensors, not parameters
            or any(raw.requires_grad for *_, raw in found)
        ))
        empty = x1.shape[-2] == 0 or (x2 is not None and x2.shape[-2] == 0)  # no blocks to loop over
        other = x1 if x2 is None else x2
        # a batch of kernels holds batch × n1 × n2 entries: 8 kernels of 800 points kept the whole
        # graph (41 matrices of 5.1e6 entries at the peak, 1.6 GiB for a depth-3 NTK)
        # (a diagonal's too: batched hyperparameters make (*batch, n1) diagonals of unbatched inputs)
        batch = _batch_size(found, x1, other) if not empty else 1
        if not empty:   # before any kernel work
            _check_kernel_fits(batch, x1, x2, diag, ntk)
        ids = None if diag or empty else Duplicates.point_ids(x1, x2)
        # a single block would be recomputed whole in the backward pass: one more forward pass and no
        # lower peak (a depth-3 NTK's input gradient, 1024 kernels of 1 x 1024 points: 640-800 MiB
        # checkpointed, 545-560 whole; one point against 2^20: 740-770 and 650-680 MiB)
        checkpointed = (needs_graph and not diag and not empty and not transforms_active()
                        and batch * x1.shape[-2] * other.shape[-2] >= CHECKPOINT_ENTRIES
                        and _rows_per_block(x1.shape[-2], other.shape[-2], batch, CHECKPOINT_BLOCK_ENTRIES)
                        < x1.shape[-2])
        # the whole matrix's duplicates: for the whole-matrix graph, and to make a symmetric
        # kernel's twins bitwise equal at the end (row blocks find their own)
        whole = not checkpointed and (needs_graph or diag or empty)
        # (diag with a second set: its pairs (x1_i, x2_i) of one point, made exact as in the matrix)
        duplicates = (DiagonalDuplicates.of(x1, x2) if diag and x2 is not None and not empty
                      else Duplicates.of(*ids, symmetric=x2 is None) if ids is not None and (whole or x2 is None)
                      else None)
        if checkpointed:
            state = _checkpointed_kernel(self, x1, x2, ntk, ids, batch)
        elif whole:
            state = _finalize(self.kernel_map(KernelState.from_inputs(x1, x2, diag, want_ntk=ntk,
                                                                      duplicates=duplicates,
                                                                      pair_carry=_carries_pairs(self))))
            if x2 is None and not diag:
                state = state.replace(nngp=_upper_mirrored(state.nngp),
                                      ntk=None if state.ntk is None else _upper_mirrored(state.ntk))
        else:
            with torch.no_grad():
                state = _blocked_kernel(self, x1, x2, ntk, compile, ids, batch)
        # twins' own diagonals can still differ by an ulp (rounding depends on the position)
        # (a DiagonalDuplicates only comes with an x2). The joined row blocks' state is a new one: with
        # fixed inputs the twins' entries also take the derivatives of their representative's (_values_only)
        if duplicates is None or x2 is not None:
            return state
        joined = state.replace(fixed_inputs=inputs_fixed(x1))
        return cast("Duplicates | BatchedDuplicates", duplicates).canonical(joined)

    def to_random_module(self) -> Layer:
        """GPyTorch's random copy of this module (as ``pyro_sample_from_prior`` makes it), with every
        layer of the spec random.

        GPyTorch converts the children that are GPyTorch modules, recursively, and the layers of a
        ``serial`` or ``parallel`` spec sit in a torch ``ModuleList``, which it passes over: they
        stayed plain modules, whose sampled variances were installed detached, so the marginal
        likelihood's gradient with respect to them was ``None`` (NUTS and HMC followed the priors'
        gradients alone), where an ``RBFKernel``'s reaches its sampled lengthscale. One copy,
        converted in place, so that a layer used twice in the spec stays one layer.
        """
        new = copy.deepcopy(self)
        for module in new.modules():
            if isinstance(module, gpytorch.Module) and not isinstance(module, RandomModuleMixin):
                module.__class__ = _random_class(type(module))
        return new

    def build(
        self,
        in_features: int | None = None,
        seed: SupportsIndex = 0,
        ensemble_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> nn.Module:
        """The finite-width network with exactly this parameterization.

        Any spec builds, also one whose :meth:`kernel` is refused for want of a closed form (an
        activation or a ``LayerNorm`` after a concatenation or a non-Gaussian sum, ``x + x``, a
        residual on the raw input, ``ard_num_dims`` past the first layer):
        such networks are well defined, and :func:`ntkgp.finite.monte_carlo_kernel` estimates
        their kernels.

        Args:
            in_features: input dimension ``d``; ``None`` defers the first layer's weights to
                its first call (or takes ``ard_num_dims``); they are drawn in the dtype and on
                the device the module has then (``dtype`` and ``device``, or where a ``.to()``
                moved it since), like every other parameter, so inputs must match those. Until
                then they are not among ``model.parameters()``: an optimizer made before the first
                call never trains them (a review's SGD left them unmoved, silently), so make it
                after that call, or pass ``in_features``. Loading a ``state_dict`` draws them too,
                at the saved width, as torch's lazy modules do.
            seed: seed of the weight draws (same seed, same network, on any device/dtype): an
                integer (numpy and 0-d tensor integers too) in torch's range ``[-2⁶³, 2⁶⁴)``.
                A deferred build draws its first layer's weights from a stream of their own, so
                every layer differs from the build with ``in_features`` and the same seed (the
                one ``train_ensemble`` and ``monte_carlo_kernel`` make): rebuild a member with
                ``in_features``.
            ensemble_size: if given, ``E`` independent networks with stacked weights; the
                module then maps ``(n, d)`` to ``(E, n, k)``. Each layer's weights are drawn for
                all members at once, so the members depend on ``E``: the first members of
                ``E = 4`` and ``E = 8`` with one seed are different networks.
            dtype: of the parameters (torch's default dtype by default); the variances must be finite
                in it (:class:`NonFiniteVarianceError` otherwise, as :meth:`kernel` for inputs of that dtype).
            device: of the parameters (CPU by default; ``"meta"``: shapes only, nothing drawn or
                allocated, e.g. to read a network's output size at any width).
        """
        in_features = None if in_features is None else integer_at_least(in_features, 1, "in_features")
        # torch's manual_seed takes Python ints alone: numpy seeds failed with "an integer is required"
        seed = seed_value(seed)
        ensemble_size = None if ensemble_size is None else integer_at_least(ensemble_size, 1, "ensemble_size")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                                  or dtype.is_complex):
            raise ValueError(f"dtype must be a real floating-point torch.dtype, got {dtype!r}.")
        device = None if device is None else usable_device(device)
        ctx = BuildContext(torch.Generator().manual_seed(seed), ensemble_size, dtype, device)
        # normal tensors even under a caller's torch.inference_mode(): inference tensors cannot be
        # trained or differentiated (empirical_ntk) once the mode is left, nor saved for a backward pass
        with torch.inference_mode(False):
            module, _ = self.finite(in_features, ctx)
        return module

    # ------------------------------------------------------------------ GPyTorch batches
    def expand_batch(self, batch_shape: Sequence[SupportsIndex]) -> None:
        """Give every hyperparameter in this network a leading ``batch_shape`` (in place)."""
        try:   # expand_batch(3): "'int' object is not iterable"; Size([-1]): "integer multiplication overflow"
            shape = torch.Size(integer_at_least(n, 0, "batch_shape's sizes") for n in batch_shape)
        except TypeError:
            raise ValueError(f"batch_shape must be a torch.Size or a sequence of non-negative integers, "
                             f"got {batch_shape!r}.") from None
        self._map_variances(lambda value, events: value.expand(*shape, *value.shape[value.dim() - events:]))

    def index_batch(self, index: object) -> None:
        """Index the batch dimensions of every hyperparameter (in place): any index a tensor takes
        over those dimensions (an int, slice, tensor, ``...``, or a tuple of them)."""
        if not isinstance(index, tuple):   # one index, as in kernel[0]: (*index, ...) failed on it
            index = (index,)

        def take(value: Tensor, events: int) -> Tensor:
            # torch indexes a tensor only with indices on the CPU or on its own device: a CUDA index
            # of a network on the CPU failed
            on = tuple(i.to(value.device) if isinstance(i, Tensor) else i for i in index)
            key = (*on, *[slice(None)] * events)   # (mypy reads a starred subscript as 3.11 syntax)
            return value[key]

        self._map_variances(take)

    def _map_variances(self, transform: Callable[[Tensor, int], Tensor]) -> None:
        # every new tensor first: a failure part-way (out of memory) left layers of two batch shapes
        planned = [(m, m.mapped_variances(transform)) for m in self.modules() if isinstance(m, VarianceParameters)]
        for module, values in planned:
            module.set_variances(values)


def _autocast_off(device: torch.device):
    """Autocast disabled for ``device``'s type (CPU and CUDA, the types every supported torch has)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


_RANDOM_CLASSES: dict[type, type] = {}


def _random_class(cls: type) -> type:
    """GPyTorch's random-module class of ``cls`` (``RandomModuleMixin`` first), one per class."""
    if cls not in _RANDOM_CLASSES:
        _RANDOM_CLASSES[cls] = type("_Random" + cls.__name__, (RandomModuleMixin, cls), {})
    return _RANDOM_CLASSES[cls]


def variances(layer: Layer) -> Iterator[tuple[str, VarianceParameters, str, Tensor]]:
    """Every variance hyperparameter of ``layer``: ``(path, module, name, raw parameter)``, the path
    as ``named_modules`` spells it (``layers.0.weight_var``)."""
    for prefix, module in layer.named_modules():
        if isinstance(module, VarianceParameters):
            for key, raw in module.raw_variances():
                yield f"{prefix or type(layer).__name__}.{key[4:]}", module, key[4:], raw


def _check_variances(x1: Tensor, x2: Tensor | None, found: list[tuple[str, VarianceParameters, str, Tensor]]) -> None:
    """:meth:`Layer.check_variances` of the layer whose :func:`variances` are ``found``."""
    inputs = [x1.shape[:-2]] + ([] if x2 is None else [x2.shape[:-2]])
    shapes = [_batch_shape(module, name, raw) for _, module, name, raw in found]
    try:
        broadcast_shapes(*inputs, *shapes)
    except RuntimeError:   # was torch's "The size of tensor a (2) must match ..." from inside a layer
        raise ValueError(f"The inputs' batch shapes {[tuple(s) for s in inputs]} do not broadcast with the "
                         f"hyperparameters' batch shape(s) {sorted({tuple(s) for s in shapes})} "
                         "(GPyTorch's batch_shape).") from None
    if not found or transforms_active() or _is_compiling():   # values are per-sample or symbolic there
        return
    # a raw variance set to NaN, or an optimizer step that overflowed exp(raw) in x1's dtype, gave an
    # all-NaN kernel and a later, obscure PSD error in GPyTorch; one reduction for all (one sync)
    with torch.no_grad():
        if not all_finite(_variance_values(found, x1)):
            bad = [path for path, module, name, _ in found if not all_finite(module.variance_as(name, x1))]
            raise NonFiniteVarianceError(f"Variance(s) {bad} are not finite (a NaN raw parameter, or exp(raw) "
                                         f"overflowing {x1.dtype}); set them anew, e.g. layer.weight_var = 1.0.")


def _variance_values(found: list[tuple[str, VarianceParameters, str, Tensor]], like: Tensor) -> Tensor:
    """``module.variance_as(name, like)`` of each of ``found`` (:func:`variances`), flattened and joined.

    Computed together, ``anchor · exp(raw)`` over all the raw values joined, where every raw value
    and anchor is already on ``like``'s device with the anchor's shape (always, but in GPyTorch's
    random modules): the same elementwise arithmetic in six operations for all, instead of about five
    per variance (a depth-1000 MLP's ``diag=True`` call spent a quarter of its time in this check).
    """
    anchors = [getattr(module, f"raw_{name}_constraint").anchor for _, module, name, _ in found]
    raws = [raw for *_, raw in found]
    if not like.is_floating_point() or any(r.device != like.device or a.device != like.device or r.shape != a.shape
                                           for r, a in zip(raws, anchors, strict=True)):
        # one at a time, with variance_as's errors (a variance on the meta device)
        return torch.cat([module.variance_as(name, like).reshape(-1) for _, module, name, _ in found])
    # raw values of several dtypes are joined in the widest, which converts to like's dtype exactly as
    # each would have been (the anchors are float64). Only finiteness is read from these values
    raw = torch.cat([r.reshape(-1) for r in raws]).to(like.dtype)
    return torch.cat([a.reshape(-1) for a in anchors]).to(like.dtype) * torch.exp(raw)


def _batch_shape(module: VarianceParameters, name: str, raw: Tensor) -> torch.Size:
    return raw.shape[:raw.dim() - module._variance_event_dims(name)]


def variance_batch_shapes(layer: Layer) -> list[torch.Size]:
    """The batch shape (GPyTorch's ``batch_shape``: the leading dimensions) of each hyperparameter."""
    return [_batch_shape(module, name, raw) for _, module, name, raw in variances(layer)]


def _batch_size(found: list[tuple[str, VarianceParameters, str, Tensor]], x1: Tensor, x2: Tensor) -> int:
    """How many kernel matrices a call returns: the product of the broadcast batch shape of the
    inputs and of the hyperparameters (GPyTorch's ``batch_shape``, their leading dimensions) of
    a layer whose :func:`variances` are ``found``."""
    shapes = [x1.shape[:-2], x2.shape[:-2], *(_batch_shape(module, name, raw) for _, module, name, raw in found)]
    try:
        return math.prod(broadcast_shapes(*shapes))
    except RuntimeError:   # the kernel recursion reports mismatched batches itself
        return math.prod(broadcast_shapes(*shapes[:2]))


def _check_kernel_fits(batch: int, x1: Tensor, x2: Tensor | None, diag: bool, ntk: bool) -> None:
    """``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``, as torch's allocators raise) before any kernel work
    when the kernels returned alone, ``batch`` matrices of ``n1 × n2`` entries (vectors of ``n1`` with
    ``diag``), one or two of them, exceed the memory of ``x1``'s device.

    Such a call cannot succeed. With autograd on (the default: the variances are learnable) 60 000 points
    in float64 computed their row blocks for a minute before torch's allocator failed on a block of 1.7 MB,
    and a request between the free and the total memory was killed by the operating system.

    The alternatives named are calls that run as written: rows of the kernel against ``x1`` itself where
    ``x2`` is ``None`` (``net.kernel(x1[i:j])`` is the slice's own square kernel), the points' axis of batched
    inputs (``x1[i:j]`` slices their batch), and the diagonals only where ``x1`` and ``x2`` pair up."""
    from ntkgp.predict.gaussian import device_memory, refuse_beyond_memory  # ntkgp.predict imports this module

    other = x1 if x2 is None else x2
    points = x1.shape[-2] if diag else x1.shape[-2] * other.shape[-2]
    need = (2 if ntk else 1) * batch * points * x1.element_size()
    memory = device_memory(x1.device)
    if memory is None or need <= memory:   # every call comes here: the message only where it is needed
        return
    size = " x ".join(str(n) for n in ((batch,) if batch != 1 else ()) + ((x1.shape[-2],) if diag else
                                                                        (x1.shape[-2], other.shape[-2])))
    what = (f"The kernels' output ({'NNGP and NTK' if ntk else 'the NNGP'}{' diagonals' if diag else ''}, {size}"
            f"{' each' if ntk else ''}, in {x1.dtype})")
    def rows(x: Tensor) -> str:   # each input's own points' axis: x1 (n, d) beside a batched x2 (b, n, d)
        return "[i:j]" if x.dim() == 2 else "[..., i:j, :]"

    if diag:
        sliced = f"net.kernel(x1{rows(x1)}{'' if x2 is None else f', x2{rows(x2)}'}, diag=True)"
    else:
        sliced = f"net.kernel(x1{rows(x1)}, {'x1' if x2 is None else 'x2'})"
    pairs = x2 is None or x2.shape[-2] == x1.shape[-2]   # diag=True pairs x1[i] with x2[i]
    ways = [f"compute them in slices of x1 ({sliced})", *([] if diag or not pairs else ["the diagonals alone "
            "(diag=True)"]), *(["the NNGP alone (ntk=False)"] if ntk else [])]
    advice = (", ".join(ways[:-1]) + " or " + ways[-1] if len(ways) > 1 else ways[0]) + (
        "; a GP posterior or gradient flow needs its whole training kernel: subsample the training points")
    refuse_beyond_memory(need, x1.device, what, advice)


def _upper_mirrored(m: Tensor) -> Tensor:
    """``m`` with its strict lower triangle replaced by the transposed upper one (a selection, no
    arithmetic: the upper triangle keeps every bit, ``-0.0`` included).

    The entries ``(i, j)`` and ``(j, i)`` of a symmetric kernel are computed separately, and
    elementwise maps round them differently where they are not symmetric formulas of
    ``(k11, k22)`` (GELU) or where torch evaluates a tensor's tail with scalar code and the rest
    vectorized (``atan2``): kernels of up to ~700 points differed from their transpose by an ulp.
    """
    n = m.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=m.device).triu()
    return torch.where(upper, m, m.mT)


def _check_finite(state: KernelState, x1: Tensor, x2: Tensor | None) -> None:
    """:class:`NonFiniteKernelError` where the kernels overflowed their dtype (the squared norms of
    inputs from ~1e19 in float32, or variances near the dtype's largest number): they were returned
    as inf and NaN, and failed later in a Cholesky factor or not at all."""
    if transforms_active() or _is_compiling():   # values are per-sample or symbolic there
        return
    kernels = {"NNGP": state.nngp, "NTK": state.ntk}
    bad = [name for name, k in kernels.items() if k is not None and not all_finite(k)]
    if bad:
        largest = max(float(x.detach().abs().max()) for x in (x1, x2) if x is not None and x.numel())
        what = f"{bad[0]} kernel overflows" if len(bad) == 1 else "NNGP and NTK kernels overflow"
        raise NonFiniteKernelError(
            f"The {what} {x1.dtype} (inputs of magnitude up to {largest:.3g}): rescale the inputs or the "
            "variances" + ("" if x1.dtype == torch.float64 else ", or use float64") + ".")


def _finalize(state: KernelState) -> KernelState:
    """Turn the last state into the user-facing result (raw inputs become kernels, Θ full-size)."""
    state = state.materialize().with_exact_diagonal()
    if state.ntk is not None and (state.ntk.shape != state.nngp.shape or state.ntk is state.nngp):
        state = state.replace(ntk=state.ntk.expand_as(state.nngp).clone())  # a tensor of its own
    return state.replace(x1=None, x2=None, sq_norms=None)


def _block(layer: Layer, x1: Tensor, x2: Tensor, norms: tuple[Tensor, Tensor], want_ntk: bool,
           symmetric: bool, duplicates: Duplicates | BatchedDuplicates | None = None
           ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, tuple[int, bool, bool, bool]]:
    """Kernels of one block of rows (``x1``) against columns ``x2``, and the state's other fields
    (:func:`_joined_state`): its width, ``is_gaussian``, whether it has a ``mean``, ``identical``."""
    state = _finalize(layer.kernel_map(KernelState.from_inputs(
        x1, x2, False, want_ntk=want_ntk, row_offset=0, symmetric=symmetric, sq_norms=norms,
        duplicates=duplicates, pair_carry=not _is_compiling() and _carries_pairs(layer))))
    return (state.nngp, state.ntk, state.cov1, state.cov2,
            (state.width, state.is_gaussian, state.mean is not None, state.identical))


def _carries_pairs(layer: Layer) -> bool:
    """Whether a layer of ``layer`` uses the nearly (anti)parallel pairs' carry (:attr:`Layer.carries_pairs`)."""
    return any(getattr(module, "carries_pairs", False) for module in layer.modules())


def _joined_state(layer: Layer, x1: Tensor, x2: Tensor | None, nngp: Tensor, ntk: Tensor | None, cov1: Tensor,
                  cov2: Tensor, fields: tuple[int, bool, bool, bool]) -> KernelState:
    """The state of kernels joined from row blocks, with the fields of the blocks' states.

    The blocks' ``mean`` and ``centred`` cover their own rows only, and are not kept (their closures
    would hold every block's tensors): the joined state's recompute them, from the whole kernel in
    one piece, when first asked for. The row-block routes (``torch.no_grad()``, frozen variances,
    large kernels with autograd) returned ``mean=None`` and ``identical=True`` whatever the network:
    ``serial(Dense(8), ReLU()).kernel(x)`` said its features were centred, which it says with
    autograd only after a ``Dense`` layer, and a concatenation's features identically distributed.
    """
    width, is_gaussian, has_mean, identical = fields
    state = KernelState(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, width=width, symmetric=x2 is None,
                        is_gaussian=is_gaussian, identical=identical)
    if not has_mean:
        return state
    grad = torch.is_grad_enabled()   # the route's mode: the blocked one's no_grad, the checkpointed one's graph
    whole: list[KernelState] = []

    def recomputed() -> KernelState:
        if not whole:
            with torch.set_grad_enabled(grad), _autocast_off(x1.device):
                whole.append(_finalize(layer.kernel_map(KernelState.from_inputs(
                    x1, x2, want_ntk=False, pair_carry=_carries_pairs(layer)))))
        return whole[0]

    def mean() -> tuple[Tensor, Tensor, bool] | None:
        found = recomputed().mean
        return None if found is None else found()

    def centred() -> tuple[Tensor, Tensor, Tensor] | None:
        found = recomputed().centred
        return None if found is None else found()

    return state.replace(mean=mean, centred=centred)


_COMPILED_BLOCK = None


def _compiled_block():
    global _COMPILED_BLOCK
    if _COMPILED_BLOCK is None:
        _COMPILED_BLOCK = torch.compile(_block)
    return _COMPILED_BLOCK


#: (dtype, device type) pairs for which compiling a network's block failed, per network: later
#: calls go straight to the eager path instead of paying a failed compilation (~10 s) every time.
_COMPILE_FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run_block(layer, x1, x2, norms, want_ntk, symmetric, compile, duplicates=None):
    key = (x1.dtype, x1.device.type)
    if not compile or duplicates is not None or key in _COMPILE_FAILED.get(layer, ()):
        # blocks with duplicates are rare: eager, not recompiled
        return _block(layer, x1, x2, norms, want_ntk, symmetric, duplicates)
    for t in (x1, x2, *norms):  # one compilation serves every block shape
        torch._dynamo.mark_dynamic(t, t.dim() - (2 if t is x1 or t is x2 else 1))
    try:
        return _compiled_block()(layer, x1, x2, norms, want_ntk, symmetric)
    except Exception as err:  # no compiler toolchain, unsupported layer, ...
        _COMPILE_FAILED.setdefault(layer, set()).add(key)
        # the first line only: a failed C++ build's message holds the whole compiler log (~2800 lines)
        first = next((line for line in str(err).splitlines() if line.strip()), "")[:300]
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {first}); using the eager path for this "
                      f"network in {x1.dtype} from now on.", RuntimeWarning, stacklevel=caller_stacklevel())
        return _block(layer, x1, x2, norms, want_ntk, symmetric)


def _blocked_kernel(layer: Layer, x1: Tensor, x2: Tensor | None, want_ntk: bool,
                    compile: bool = False, ids: tuple[Tensor, Tensor] | None = None, batch: int = 1) -> KernelState:
    """Full kernel matrices computed a block of rows at a time (no autograd).

    Blocks of about ``BLOCK_ENTRIES`` entries, counted over the ``batch`` kernels computed
    together, stay in cache through the whole recursion (2¹⁹ was fastest at N = 1000 and tied
    with 2²⁰ at N = 3000 on the benchmark: smaller blocks pay Python overhead per block, larger
    ones miss cache); on a GPU, blocks of ``CUDA_BLOCK_ENTRIES``. When ``x2`` is ``x1`` only the
    blocks on and above the diagonal are computed and then mirrored.
    """
    symmetric = x2 is None
    n1, n2 = x1.shape[-2], (x1 if symmetric else cast(Tensor, x2)).shape[-2]
    rows = _rows_per_block(n1, n2, batch, CUDA_BLOCK_ENTRIES if x1.device.type == "cuda" else BLOCK_ENTRIES)
    nngp: Tensor | None = None
    ntk: Tensor | None = None
    cov1: Tensor | None = None
    cov2: Tensor | None = None
    for start, rows1, cols2, norms, duplicates in _row_blocks(x1, x2, rows, ids):
        block_nngp, block_ntk, block_cov1, block_cov2, fields = _run_block(
            layer, rows1, cols2, norms, want_ntk, symmetric, compile, duplicates)
        if symmetric:
            block_nngp, block_ntk = _symmetric_square(block_nngp), _symmetric_square(block_ntk)
        if rows >= n1:
            nngp, ntk, cov1, cov2 = block_nngp, block_ntk, block_cov1, (block_cov1 if symmetric else block_cov2)
            break
        if nngp is None or cov1 is None:   # the first block (set together; both named for type checkers)
            batch_shape = block_nngp.shape[:-2]
            nngp = block_nngp.new_empty((*batch_shape, n1, n2))
            ntk = block_nngp.new_empty((*batch_shape, n1, n2)) if want_ntk else None
            cov1 = block_nngp.new_empty((*batch_shape, n1))
            cov2 = cov1 if symmetric else block_cov2
        stop = start + rows1.shape[-2]
        cov1[..., start:stop] = block_cov1
        for out, block in ((nngp, block_nngp), (cast(Tensor, ntk), block_ntk)):   # ntk None: block_ntk None
            if block is None:
                continue
            if symmetric:
                _place_upper_block(out, block, start)
            else:
                out[..., start:stop, :] = block
    assert nngp is not None and cov1 is not None and cov2 is not None   # set by the first block (n1 > 0)
    return _joined_state(layer, x1, x2, nngp, ntk, cov1, cov2, fields)


def _rows_per_block(n1: int, n2: int, batch: int, entries: int) -> int:
    """Rows of a block of about ``entries`` kernel entries, counted over the ``batch`` kernels of
    ``n2`` columns computed together (at least one row, at most ``n1``)."""
    return max(1, min(n1, entries // max(batch * n2, 1)))


def _row_blocks(x1: Tensor, x2: Tensor | None, rows: int, ids: tuple[Tensor, Tensor] | None):
    """The blocks of ``rows`` rows of the kernel between ``x1`` and ``x2``: ``(start, rows of x1,
    columns of x2, their squared norms, the duplicates among them)``. With ``x2 = None`` (``x1``
    itself) a block has only the columns from ``start`` on: the rest mirrors earlier blocks."""
    symmetric = x2 is None
    other = x1 if symmetric else cast(Tensor, x2)
    n1, n2 = x1.shape[-2], other.shape[-2]
    norms1 = torch.einsum("...nd,...nd->...n", x1, x1)
    norms2 = norms1 if symmetric else torch.einsum("...nd,...nd->...n", x2, x2)
    for start in range(0, n1, rows):
        stop = min(start + rows, n1)
        cols = slice(start, n2) if symmetric else slice(0, n2)
        duplicates = None if ids is None else Duplicates.of(ids[0][..., start:stop], ids[1][..., cols], symmetric)
        norms = (norms1[..., start:stop], norms2[..., cols])
        yield start, x1[..., start:stop, :], other[..., cols, :], norms, duplicates


@overload
def _symmetric_square(block: Tensor) -> Tensor: ...


@overload
def _symmetric_square(block: None) -> None: ...


def _symmetric_square(block: Tensor | None) -> Tensor | None:
    """A symmetric kernel's row block (its rows are its first columns) with the leading square,
    where entries ``(i, j)`` and ``(j, i)`` were both computed, made exactly symmetric."""
    if block is None:
        return None
    square = block.shape[-2]
    if block.requires_grad and torch.is_grad_enabled():
        return torch.cat([_upper_mirrored(block[..., :, :square]), block[..., :, square:]], -1)
    block[..., :, :square] = _upper_mirrored(block[..., :, :square])   # no graph: in place, no copy of the block
    return block


def _place_upper_block(out: Tensor, block: Tensor, start: int) -> None:
    """Write a symmetric kernel's row block (rows and columns from ``start`` on) into ``out``, and
    its transpose below the diagonal."""
    stop = start + block.shape[-2]
    out[..., start:stop, start:] = block
    out[..., stop:, start:stop] = block[..., :, stop - start:].mT


class _Snapshot:
    """The parameters and buffers a layer's kernel was computed with, and their version counters.

    Checkpointed blocks are recomputed in the backward pass from the layer as it is *then*, while
    the whole graph differentiates at the tensors of the forward pass. Tensors swapped since
    (``torch.func.functional_call``, which puts its own back on return; ``expand_batch``;
    ``.to()``) gave derivatives at the layer's current hyperparameters for the kernel of the
    others, silently: the recomputation puts the forward pass's tensors back in place while it
    runs. Values changed in place (``set_variance``, an optimizer step) cannot be restored: they
    are refused, as autograd refuses an input modified in place.
    """

    def __init__(self, layer: Layer) -> None:
        self.slots = [(table, name, t) for module in layer.modules()
                      for table in (module._parameters, module._buffers) for name, t in table.items()
                      if t is not None]
        self.versions = [self._version(t) for _, _, t in self.slots]

    @staticmethod
    def _version(t: Tensor) -> int | None:
        return None if t.is_inference() else t._version   # inference tensors keep no version counter

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The forward pass's tensors in their places while the block runs (no change in the
        forward pass itself)."""
        if any(self._version(t) != v for (_, _, t), v in zip(self.slots, self.versions, strict=True)):
            raise RuntimeError("A hyperparameter of this network was changed in place after the kernel was "
                               "computed, and the backward pass recomputes the kernel's row blocks from it "
                               "(activation checkpointing): compute the kernel again after changing "
                               "hyperparameters, or run the backward pass before.")
        missing = object()
        swapped = [(table, name, table.get(name, missing)) for table, name, t in self.slots
                   if table.get(name, missing) is not t]
        for table, name, t in self.slots:
            table[name] = t
        try:
            yield
        finally:
            for table, name, current in reversed(swapped):
                if current is missing:
                    del table[name]
                else:
                    table[name] = current


def _checked_block(snapshot: _Snapshot, symmetric: bool, layer: Layer, x1: Tensor, x2: Tensor,
                   norms: tuple[Tensor, Tensor], want_ntk: bool,
                   duplicates: Duplicates | BatchedDuplicates | None) -> tuple:
    """One checkpointed block, computed, and recomputed, with the hyperparameters of the forward pass."""
    with snapshot.installed():
        nngp, ntk, cov1, cov2, fields = _block(layer, x1, x2, norms, want_ntk, symmetric, duplicates)
    if symmetric:
        nngp, ntk = _symmetric_square(nngp), _symmetric_square(ntk)
    return nngp, ntk, cov1, cov2, fields


def _checkpointed_kernel(layer: Layer, x1: Tensor, x2: Tensor | None, want_ntk: bool,
                         ids: tuple[Tensor, Tensor] | None, batch: int = 1) -> KernelState:
    """Full kernel matrices with autograd, in row blocks of about ``CHECKPOINT_BLOCK_ENTRIES``
    entries over the ``batch`` kernels computed together (``rows = CHECKPOINT_BLOCK_ENTRIES //
    (batch · n2)``, at least one row).

    Each block runs under ``torch.utils.checkpoint``: its intermediates are freed after the
    forward pass and recomputed, one block at a time, in the backward pass. For a symmetric
    kernel the blocks hold the upper triangle and :class:`_SymmetricFromRowBlocks` mirrors it.
    """
    symmetric = x2 is None
    n1, n2 = x1.shape[-2], (x1 if symmetric else cast(Tensor, x2)).shape[-2]
    snapshot = _Snapshot(layer)
    starts, blocks = [], []
    for start, rows1, cols2, norms, duplicates in _row_blocks(
            x1, x2, _rows_per_block(n1, n2, batch, CHECKPOINT_BLOCK_ENTRIES), ids):
        starts.append(start)
        blocks.append(checkpoint(_checked_block, snapshot, symmetric, layer, rows1, cols2, norms, want_ntk, duplicates,
                                 use_reentrant=False, preserve_rng_state=False))

    def joined(index: int) -> Tensor:
        parts = [b[index] for b in blocks]
        return _SymmetricFromRowBlocks.apply(starts, n1, *parts) if symmetric else torch.cat(parts, -2)

    _, _, _, cov2, fields = blocks[-1]
    # a block with a duplicate broadcasts its cov1 to x2's batch axes, one without keeps x1's
    shape = broadcast_shapes(*(b[2].shape[:-1] for b in blocks))
    cov1 = torch.cat([b[2].expand(*shape, b[2].shape[-1]) for b in blocks], -1)
    return _joined_state(layer, x1, x2, joined(0), joined(1) if want_ntk else None, cov1,
                         cov1 if symmetric else cov2, fields)


class _SymmetricFromRowBlocks(torch.autograd.Function):
    """The symmetric ``n × n`` matrix whose upper triangle comes in row blocks: block ``i`` holds
    rows ``starts[i]`` to ``starts[i] + rᵢ`` from column ``starts[i]`` on, its leading ``rᵢ × rᵢ``
    square already symmetric; the lower triangle is the transpose.

    Its backward pass hands block ``i`` the gradient of its own entries plus the transposed
    gradient of their mirror images, ``O(n²)`` in all (slices of the blocks joined with
    ``torch.cat`` instead would send every block a zero-padded gradient per use, ``O(n³/r)``).
    """

    @staticmethod
    def forward(ctx, starts: list[int], n: int, *blocks: Tensor) -> Tensor:
        ctx.starts = starts
        out = blocks[0].new_empty((*blocks[0].shape[:-2], n, n))
        for start, block in zip(starts, blocks, strict=True):
            _place_upper_block(out, block, start)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        grads = []
        for i, start in enumerate(ctx.starts):
            stop = ctx.starts[i + 1] if i + 1 < len(ctx.starts) else grad.shape[-1]
            grads.append(torch.cat([grad[..., start:stop, start:stop],
                                    grad[..., start:stop, stop:] + grad[..., stop:, start:stop].mT], -1))
        return (None, None, *grads)
