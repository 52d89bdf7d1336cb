"""Shared machinery of the GPyTorch kernels built on a network spec."""

from __future__ import annotations

import functools
import gc
import itertools
import weakref
from collections.abc import Sequence
from copy import deepcopy
from typing import TypeVar, cast

import torch
from gpytorch.kernels import Kernel
from gpytorch.lazy import LazyEvaluatedKernelTensor
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkgp.layers.base import Layer, _batch_shape, variance_batch_shapes, variances
from ntkgp.layers.numerics import transforms_active
from ntkgp.layers.validation import (
    array_advice,
    boolean_or_complex,
    broadcast_shapes,
    refuse_meta,
    refuse_tracing,
)
from ntkgp.layers.variance import VarianceParameters

#: The live kernels built on each network and on each of its layers that hold variances, or copied
#: with them (a copy of a network alone has none): kernels that share a network, or only some of its
#: layers (a slice ``net[:2]``, a network spliced into a bigger one), must share their batch shape,
#: which ``batch_shape`` sets on those layers in place.
_KERNELS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_T = TypeVar("_T")


def _shared_modules(net: Layer) -> list[torch.nn.Module]:
    """``net`` and its modules that hold variances: what ``batch_shape`` reshapes in place, and so what
    two kernels that share one of them hold in common (a layer without variances, a ``ReLU`` used in
    two networks, is shared harmlessly)."""
    held = [m for m in net.modules() if isinstance(m, VarianceParameters) and next(m.raw_variances(), None) is not None]
    return list({id(m): m for m in (net, *held)}.values())


def _register(kernel: NetworkKernel) -> None:
    for module in _shared_modules(kernel.net):
        _KERNELS_OF.setdefault(module, weakref.WeakSet()).add(kernel)


def _other_batch_shapes(modules: list[torch.nn.Module], batch_shape: torch.Size) -> set[tuple[int, ...]]:
    """The batch shapes, other than ``batch_shape``, of the live kernels registered on ``modules``.

    Each kernel is read once: it is registered on every layer of its network that holds variances,
    and its batch shape walks them, so reading it per layer made building a kernel on a shared
    network cost (layers x live kernels) such reads: 6-9 ms a kernel beside 20 live ones on an
    11-layer ``mlp(10)``, against 0.6 ms when only the network was registered (0.8 ms read once).
    """
    kernels = set().union(*(_KERNELS_OF.get(m, ()) for m in modules))
    return {tuple(k.batch_shape) for k in kernels} - {tuple(batch_shape)}


def _refuse_kernel_arguments(kernel: str, kwargs: dict) -> None:
    """``ValueError`` for any other keyword: GPyTorch's ``Kernel`` drops unknown ones, so a prior given
    to the kernel (``weight_var_prior=``, as GPyTorch's kernels take ``lengthscale_prior=``) was
    silently no prior at all, and a fit became plain maximum likelihood."""
    if not kwargs:
        return
    name = sorted(kwargs)[0]
    if name.endswith(("_prior", "_constraint")):
        raise ValueError(f"{kernel} got {name}=: priors and constraints belong to the layers, whose variances are "
                         "the kernel's hyperparameters: ntkgp.Dense(width, weight_var, bias_var, "
                         "weight_var_prior=..., bias_var_prior=...); the variances' constraint is fixed (positive "
                         "by construction): bound one softly by a prior.")
    raise ValueError(f"{kernel} got an unexpected keyword argument {name!r}: it takes the network, batch_shape "
                     "and active_dims.")


def _active_dims(value: Sequence[int] | Tensor | None) -> Tensor | None:
    """``active_dims`` as a tensor of feature indices (1-D, or 0-D for one), checked: GPyTorch casts it to ``long``
    (``[0.5]`` became feature 0, ``[True]`` feature 1, silently) and met a negative or too large index
    only at the first call, as torch's "INDICES element is out of DATA bounds"."""
    if value is None:
        return None
    kind = "a sequence of feature indices (non-negative integers)"
    refuse_meta(value, "active_dims")
    if boolean_or_complex(value):
        raise ValueError(f"active_dims must be {kind}, got {value!r}.")
    try:
        # a tensor where it is (GPyTorch keeps the given tensor's device); anything else copied:
        # as_tensor shared a numpy array's memory, so changing the array later changed the kernel
        dims = value.detach() if isinstance(value, Tensor) else torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:   # strings, ragged lists
        raise ValueError(f"active_dims must be {kind}, got {value!r}.") from err
    # one index alone (0-d, active_dims=1) is GPyTorch's too: index_select takes it as one feature
    if (dims.dim() > 1 or dims.numel() == 0 or bool((dims < 0).any())
            or (dims.is_floating_point() and not bool((torch.isfinite(dims) & (dims == dims.round())).all()))):
        raise ValueError(f"active_dims must be {kind}, at least one, got {value!r}.")
    return dims.long()


def _one_feature(x: _T) -> _T:
    """A 1-D tensor ``(n,)`` as ``(n, 1)``, GPyTorch's reading of it; anything else as it is."""
    return cast(_T, x.unsqueeze(-1)) if isinstance(x, Tensor) and x.dim() == 1 else x


def _one_matrix(x: Tensor) -> Tensor:
    """The one ``(n, d)`` matrix of inputs whose batch axes only repeat it (stride 0, as ``expand`` makes them, or
    size 1); ``x`` itself otherwise (and under ``torch.func`` transforms, whose per-sample strides say nothing of
    the batch).

    Also ``x`` itself where it takes part in autograd and repeats its matrix (a repeated axis of size > 1): autograd
    gives each copy its own gradient, that of its own batch's kernel, while the kernel of one matrix expanded gave
    copy 0 the gradients of all and the others none (``x.expand(3, n, d).requires_grad_()``: 15.6 off gradients of
    at most 9.4). Such inputs are a batch again, without the near-parallel carry; the base tensor's gradient, the
    sum over the copies, was right and still is."""
    lead = x.dim() - 2
    if (lead <= 0 or x.layout != torch.strided or x.shape[:-2].numel() == 0 or transforms_active()
            or any(size != 1 and stride != 0 for size, stride in zip(x.shape[:-2], x.stride()[:-2], strict=True))
            or (x.requires_grad and torch.is_grad_enabled() and any(size != 1 for size in x.shape[:-2]))):
        return x
    return x[(0,) * lead]


def _check_call_inputs(x1: object, x2: object, last_active: int | None) -> None:
    """What GPyTorch's ``Kernel.__call__`` meets before :meth:`NetworkKernel.forward` checks the
    inputs: a non-tensor failed with "'list' object has no attribute 'ndimension'", an ``active_dims``
    beyond the features with torch's "INDICES element is out of DATA bounds", and inputs with unequal
    numbers of features with "x1_ and x2_ must have the same number of dimensions!"."""
    features = {}
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.dim() == 0:
            # the conversion that runs, as net.kernel names it
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__ + array_advice(x, name)
            raise ValueError(f"{name} must be a torch.Tensor of shape (..., n, d) (or (n,) for one feature), "
                             f"got {got}.")
        features[name] = x.shape[-1] if x.dim() > 1 else 1   # GPyTorch reads (n,) as n points of one feature
        if last_active is not None and x.dim() > 1 and last_active >= x.shape[-1]:
            raise ValueError(f"active_dims selects feature {last_active}, but {name} has {x.shape[-1]} "
                             f"feature(s) (shape {tuple(x.shape)}).")
    if last_active is None and len(set(features.values())) > 1:
        raise ValueError(f"x1 and x2 must have the same number of features, got {features['x1']} and "
                         f"{features['x2']}.")


class NetworkKernel(Kernel):
    """A GPyTorch kernel whose values are one of a network's infinite-width kernels.

    ``k(x, x') = net.kernel(x, x').nngp`` (:class:`~ntkgp.NNGPKernel`, the covariance ``K`` of Neal
    1996; Lee et al. 2018) or ``.ntk`` (:class:`~ntkgp.NTKKernel`, the ``Θ`` of Jacot et al. 2018),
    from the layer-by-layer recursion of :meth:`ntkgp.Layer.kernel` starting at ``x·x'/d``.

    The network is a registered submodule (``kernel.net``): ``.double()``, ``.to(device)`` and
    ``named_parameters()`` reach its layers' ``raw_weight_var``/``raw_bias_var``, and two
    kernels built on the same network share those parameters. With ``batch_shape`` every
    hyperparameter of the network gains that leading shape (in place), so kernels that share a
    network, or layers of it (a slice ``net[:2]``, a network spliced into a bigger one by ``serial``),
    must share its batch shape (a ``ValueError`` otherwise; build on ``copy.deepcopy(net)``).
    As for any GPyTorch module reached twice, a prior on a shared network is counted once per
    kernel by ``ExactMarginalLogLikelihood`` (``NTKKernel(net) + NNGPKernel(net)``: twice), and
    so is a prior on a layer reused in two containers of one spec
    (``parallel(d, serial(ReLU(), d))``; reuse within one ``serial``, also through nested ``serial``
    calls, which splice into one, or through ``repeat`` counts once). :class:`ntkgp.models.NetworkGP`
    counts each prior once.

    The kernel is computed in the inputs' dtype promoted with the hyperparameters', as GPyTorch's
    own kernels compute: a kernel made ``.double()`` gives float64 on float32 inputs, one in
    float32 follows float64 inputs (``net.kernel`` itself follows its inputs alone).

    In a model of one's own (an ``ExactGP``, a BoTorch model) GPyTorch replaces Cholesky solves by
    conjugate gradients and stochastic Lanczos above ``gpytorch.settings.max_cholesky_size``
    (800 points): the marginal likelihood of 1000 points then varied between identical calls
    (−0.323, −0.359, −0.336 for an exact −0.279) and predictive means were 1.4 % off. Wrap
    training and prediction in ``with ntkgp.models.exact_solves(model):`` for exact solves
    (:class:`ntkgp.models.NetworkGP` and :func:`ntkgp.models.fit` do it themselves).
    """

    has_lengthscale = False
    is_stationary = False
    #: Which kernel of :meth:`Layer.kernel` this class returns: ``"nngp"`` or ``"ntk"``.
    kind: str = ""

    def __init__(self, net: Layer, batch_shape: torch.Size = torch.Size([]),
                 active_dims: Sequence[int] | Tensor | None = None,
                 **kwargs: object) -> None:
        if not isinstance(net, Layer):
            raise ValueError(f"{type(self).__name__} needs an ntkgp network (e.g. ntkgp.serial(...)), "
                             f"got {type(net).__name__}.")
        # a spec with no kernel of this form (a sum of branches that share their input feature) was
        # accepted here and refused at the first evaluation, inside a model's fit or a BoTorch loop
        net.check_structure()
        if kwargs.get("ard_num_dims") is not None:
            # a Kernel-level ard_num_dims would be reported but act on nothing
            raise ValueError("Per-feature weight variances belong to the first layer: use "
                             "ntkgp.Dense(width, ..., ard_num_dims=d) instead of ard_num_dims on the kernel.")
        _refuse_kernel_arguments(type(self).__name__, {k: v for k, v in kwargs.items() if k != "ard_num_dims"})
        super().__init__(batch_shape=batch_shape, active_dims=_active_dims(active_dims))
        # expanding in place would change the shapes under another kernel that shares the network,
        # which then failed inside GPyTorch ("expected shape [4, 4], got [3, 4, 4]"); or that shares some
        # of its layers: NTKKernel(net) turned into a batch of 3 when NNGPKernel(net[:2], batch_shape=[3])
        # expanded net's first layer, without a word
        modules = _shared_modules(net)
        owners = _other_batch_shapes(modules, self._batch_shape)
        if owners:
            # a GPyTorch kernel is in a reference cycle (its load_state_dict hook is a method bound to it),
            # so one its user dropped (del, a model reassigned, a deep copy used in passing) stays in the
            # registry until the cycle collector runs, and refused layers that nothing live used
            gc.collect()
            owners = _other_batch_shapes(modules, self._batch_shape)
        batched = {tuple(s) for s in variance_batch_shapes(net) if len(s) > 0} - {tuple(self._batch_shape)}
        if owners or batched:
            held = ", ".join(map(str, sorted(owners | batched)))
            raise ValueError(f"This network already serves batch shape {held} (a kernel built on it or on a "
                             f"network sharing its layers, such as a slice net[:2], or expand_batch), but this "
                             f"kernel has batch_shape={tuple(self._batch_shape)}. Kernels that share layers share "
                             f"their batch shape, since batch_shape reshapes the layers' variances in place; for "
                             f"another one, build on a copy: {type(self).__name__}(copy.deepcopy(net), "
                             f"batch_shape=...).")
        self.net = net
        if len(self._batch_shape) > 0:
            net.expand_batch(self._batch_shape)
        _register(self)

    def __call__(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False, last_dim_is_batch: bool = False,
                 **params: object) -> LazyEvaluatedKernelTensor | LinearOperator | Tensor:
        """GPyTorch's ``Kernel.__call__``, after checking what it reads of the inputs itself
        (:func:`_check_call_inputs`); :meth:`forward` checks their values."""
        # torch.jit.trace of a GPyTorch model (its fast_pred_var + trace_mode recipe) failed with "x1 and x2 must
        # have the same number of features, got 2 and 2", or inside torch with "We don't have an op for aten::view"
        refuse_tracing(type(self).__name__, "Call the model itself.")
        # read at each call: GPyTorch's lazy kernel tensor calls again with active_dims set to None
        dims = self.active_dims
        if dims is not None:
            # (n,) is n points of one feature, but GPyTorch selects active_dims before it reads it so: it
            # selected points, and active_dims=[0] on 5 points gave the (1, 1) kernel of the first point
            same = x2 is x1
            x1 = _one_feature(x1)
            x2 = x1 if same else _one_feature(x2)
        _check_call_inputs(x1, x2, None if dims is None or not dims.numel() else self._largest_active(dims))
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)

    def _largest_active(self, dims: Tensor) -> int:
        """``int(dims.max())``, read once per ``active_dims`` tensor (and its version): on a GPU each read
        waits for the device, and a kernel is called many times (an acquisition function's optimizer).

        An inference tensor (a kernel built, unpickled or given ``active_dims`` inside ``torch.inference_mode()``,
        as BoTorch's ``MultiTaskGP`` sets them) keeps no version counter, so an in-place change could not be
        seen: it is read at each call. Reading its ``_version`` failed every call of such a kernel with "Inference
        tensors do not track version counter"."""
        if dims.is_inference():
            return int(dims.max())
        cached = self.__dict__.get("_active_max")
        if cached is None or cached[0] is not dims or cached[1] != dims._version:
            cached = (dims, dims._version, int(dims.max()))
            self.__dict__["_active_max"] = cached   # not a module attribute: no buffer, no state_dict entry
        return cached[2]

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False,
                **params: object) -> Tensor:
        """``k(x1, x2)`` of shape ``(*batch, n1, n2)`` (``diag``: ``k(x1_i, x2_i)``, ``(*batch, n)``); with
        ``last_dim_is_batch`` the kernel of each input feature alone, ``(*batch, d, n1, n2)`` (``diag``:
        ``(*batch, d, n)``)."""
        refuse_tracing(type(self).__name__, "Call the model itself.")   # ScaleKernel calls forward, not __call__
        # In the inputs' dtypes promoted with the hyperparameters', as GPyTorch's own kernels compute (a
        # float64 RBFKernel gives float64 on float32 inputs, and takes integer and bool inputs). Following
        # the inputs alone, a float64 model fed float32 features (deep kernel learning with a float32
        # extractor) trained on float32 covariances beside its float64 mean and noise, and then failed to
        # predict with "expected m1 and m2 to have the same dtype". Complex inputs stay complex: refused.
        # (the variances too: sampled ones in a random module, pyro_sample_from_prior, are plain tensors)
        held = next((p.dtype for p in itertools.chain(self.parameters(), (raw for *_, raw in variances(self.net)))
                     if p.is_floating_point()), torch.get_default_dtype())
        dtype = functools.reduce(torch.promote_types, (x1.dtype, x2.dtype), held)
        same = x2 is x1    # x2 stays the very x1: the symmetric path
        inputs_batch = torch.Size()
        if not last_dim_is_batch:
            # BoTorch's multi-output SingleTaskGP (and a batch GP on shared inputs) expands one set of training
            # inputs over its outputs, x.expand(m, n, d): that matrix's kernel is computed once and expanded back.
            # Per batch it cost m kernels, and batched inputs drop the near-parallel carry (docs/numerics.md): an
            # mlp(3, "sign") training NNGP was 2.9e-3 (relative) off the same points' kernel unbatched. (Before
            # the dtype conversion, which makes an expanded tensor contiguous.)
            one1 = _one_matrix(x1)
            one2 = one1 if same else _one_matrix(x2)
            if one1 is not x1 or one2 is not x2:
                try:
                    inputs_batch = broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
                    x1, x2 = one1, one2
                except RuntimeError:   # left to net.kernel, which names the batch shapes that do not broadcast
                    pass
        x1 = x1.to(dtype)
        x2 = x1 if same else x2.to(dtype)
        if last_dim_is_batch:
            if any(getattr(m, "ard_num_dims", None) is not None for m in self.net.modules()):
                # the first layer would get one-feature inputs and fail with "got inputs with 1 features"
                raise ValueError("last_dim_is_batch (AdditiveStructureKernel, ...) makes each input feature a "
                                 "one-dimensional input of its own, which a Dense(ard_num_dims=...) first layer, "
                                 "with one weight variance per feature, cannot take: use a first layer without "
                                 "ard_num_dims (one weight variance shared by the features' kernels).")
            # each feature becomes a one-dimensional input of its own. The feature axis goes in
            # front of the batch axes, which must stay aligned with the hyperparameters' batch_shape,
            # and comes back to GPyTorch's place, (*batch, d, n1, n2), afterwards.
            batch = broadcast_shapes(x1.shape[:-2], x2.shape[:-2], self.batch_shape)
            same = x2 is x1
            x1 = x1.expand(*batch, *x1.shape[-2:]).movedim(-1, 0).unsqueeze(-1)
            x2 = x1 if same else x2.expand(*batch, *x2.shape[-2:]).movedim(-1, 0).unsqueeze(-1)
        result = getattr(self.net.kernel(x1, x2, diag=diag, ntk=self.kind == "ntk"), self.kind)
        if last_dim_is_batch:
            result = result.movedim(0, -2 if diag else -3)
        # the variances carry the batch shape into the kernel, and inputs that only repeat one matrix give theirs
        # back here; a network without variances (serial(Identity())) returned (n, m) where GPyTorch expects
        # (*batch_shape, n, m). Expanded over the inputs' batch as a copy: a view with stride 0 made a write into
        # one batch's kernel (K[0].add_(1)) change every batch's, and refused writes into its diagonal
        tail = (1 if diag else 2) + last_dim_is_batch
        batch = broadcast_shapes(result.shape[:-tail], inputs_batch, self.batch_shape)
        if result.shape[:-tail] != batch:
            result = result.expand(*batch, *result.shape[-tail:])
            if inputs_batch.numel() > 1:
                result = result.contiguous()
        return result

    def initialize(self, **kwargs: object) -> NetworkKernel:
        """GPyTorch's ``initialize``, whose names reach the layers' variances through the network:
        ``kernel.initialize(**{"net.layers.0.weight_var": 2.0})``. A name that is not the kernel's
        (``weight_var``, or ``net.0.weight_var`` after ``kernel.net[0]``) is an ``AttributeError``
        that lists the kernel's names; GPyTorch's said only "Unknown parameter weight_var for
        NTKKernel", or "Serial has no module 0"."""
        try:
            return super().initialize(**kwargs)
        except AttributeError as err:
            names = [name.replace("raw_", "") for name, _ in self.named_parameters()]
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            raise AttributeError(f"{err}. {type(self).__name__}'s hyperparameters are its network's layers' "
                                 f"variances, initialized by their full names ({shown or 'none'}), e.g. "
                                 f"kernel.initialize(**{{'net.layers.0.weight_var': 2.0}}), or set on the "
                                 f"layer: kernel.net[0].weight_var = 2.0.") from err

    @property
    def batch_shape(self) -> torch.Size:
        """The hyperparameters' batch shape (the one given where the network has none): BoTorch's
        ``subset_output`` indexes the variances and left a kernel of the full batch shape, whose
        posterior then failed with "x1 and x2 were not broadcastable with kernel of batch_shape"."""
        net = self._modules.get("net")   # absent while GPyTorch's __init__ runs
        # the first variance's: all share one batch shape (expand_batch, index_batch and subset_output
        # map them together), and GPyTorch reads this many times a call (walking them all took 28 µs)
        first = next(variances(net), None) if net is not None else None
        return self._batch_shape if first is None else _batch_shape(*first[1:])

    @batch_shape.setter
    def batch_shape(self, value: torch.Size) -> None:
        self._batch_shape = torch.Size(value)

    def subset_batch_dict(self, prefix: str = "covar_module") -> dict[str, int]:
        """The entries of BoTorch's ``_subset_batch_dict`` for this kernel in a batched multi-output
        model (``SingleTaskGP`` with ``m`` outputs and ``batch_shape=torch.Size([m])``): each raw
        variance and its constraint's anchor by name, with the dimension that runs over the outputs.

        BoTorch's ``subset_output`` needs that dictionary for a ``covar_module`` of one's own, as
        for any custom GPyTorch kernel; ``prefix`` is this kernel's path in the model::

            model._subset_batch_dict = {"mean_module.raw_constant": -1,
                                        "likelihood.noise_covar.raw_noise": -2,
                                        **model.covar_module.subset_batch_dict("covar_module")}
            model.subset_output([0])
        """
        if not len(self.batch_shape):
            return {}
        entries = {}
        for path, module in self.net.named_modules():
            if not isinstance(module, VarianceParameters):
                continue
            for key, raw in module._parameters.items():
                if key.startswith("raw_") and raw is not None:
                    name = ".".join(filter(None, (prefix, "net", path, key)))
                    dim = -1 - module._variance_event_dims(key[4:])   # the last batch dimension
                    entries[name] = dim
                    if getattr(module, f"{key}_constraint").anchor.shape == raw.shape:
                        entries[f"{name}_constraint.anchor"] = dim
        return entries

    def expand_batch(self, *sizes: int | torch.Size) -> Kernel:
        new_shape = torch.Size(sizes[0] if len(sizes) == 1 and not isinstance(sizes[0], int)
                               else cast('tuple[int, ...]', sizes))   # ints, or one Size
        if new_shape == self.batch_shape:
            return self
        try:
            broadcast_shapes(new_shape, self.batch_shape)
        except RuntimeError as err:
            raise RuntimeError(f"Cannot expand a kernel with batch shape {self.batch_shape} to "
                               f"{new_shape}.") from err
        new_kernel = deepcopy(self)
        new_kernel._batch_shape = new_shape
        new_kernel.net.expand_batch(new_shape)
        return new_kernel

    def __getitem__(self, index) -> Kernel:
        if len(self.batch_shape) == 0:
            return self
        index = index if isinstance(index, tuple) else (index,)
        new_kernel = deepcopy(self)
        new_kernel.net.index_batch(index)
        # tensor indices on the CPU: a CUDA index cannot index this meta placeholder
        cpu_index = tuple(i.cpu() if isinstance(i, torch.Tensor) else i for i in index)
        new_kernel._batch_shape = torch.empty(self.batch_shape, device="meta")[cpu_index].shape
        return new_kernel

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # a copy (deepcopy, pickle, torch.load; GPyTorch's get_fantasy_model and BoTorch's fantasize
        # deep-copy whole models, expand_batch and indexing copy this kernel) owns its copied network
        # as the original owns its own
        _register(self)
