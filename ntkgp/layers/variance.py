"""Learnable, exactly represented variance hyperparameters.

A layer's weight and bias variances are GPyTorch parameters: ``raw_<name>`` with a registered
constraint, a ``<name>`` property and a setter, priors registrable on the property. The
transform is

    value = anchor · exp(raw),

where ``anchor`` is the value last *set* (kept in float64 whatever the module's dtype, and moved
but never down-cast by ``.to()``/``.float()``) and ``raw`` is a learnable log-ratio in the
module's dtype, zero right after setting. Hence:

* a variance of ``0.01`` enters float64 kernels as exactly ``0.01`` even when the module lives in
  float32 (GPyTorch modules take the default dtype, usually float32);
* learning happens in log space (scale-free steps, the value stays positive);
* a variance set to ``0`` is pinned there: its gradient w.r.t. ``raw`` is exactly 0 and ``raw``
  stays finite (no ``-inf`` as with a softplus constraint at 0). To learn a variance, start it at
  a small positive value;
* the anchor is a buffer (``raw_<name>_constraint.anchor``), part of the ``state_dict`` (a strict
  load without it fails): copy values between kernels by ``state_dict``, or by setting the
  variances, not by copying parameters alone, which leaves each kernel its own anchor;
* a value sampled from a prior (``sample_from_prior``, BoTorch's ``sample_all_priors``) moves
  ``raw`` alone, ``raw = log(sample) − log(anchor)`` (:func:`_sample_into_raw`), so that restoring the
  raw parameters restores such a variance (not one pinned at 0, whose anchor a positive sample moves);
* the constraint cannot be replaced (``register_constraint`` raises): bound a variance softly by
  a prior instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.module import RandomModuleMixin
from gpytorch.priors import Prior
from torch import Tensor

from ntkgp._autograd import outside_inference_mode
from ntkgp.layers.validation import all_finite, boolean_or_complex

if TYPE_CHECKING:   # to type checkers, the gpytorch.Module the mixin is mixed into (whose methods it calls)
    from gpytorch import Module as _MixedInto
else:
    _MixedInto = object


#: What the meta device is for with layers, told where a layer's variances are on it.
META_BUILD = "net.build(..., device='meta') gives a finite network of shapes only."


class ExactVariance(GreaterThan):
    """GPyTorch constraint ``value = anchor · exp(raw)`` with a float64 ``anchor``."""

    anchor: Tensor   # a buffer

    def __init__(self, anchor: Tensor) -> None:
        super().__init__(0.0, transform=torch.exp, inv_transform=torch.log)
        self.register_buffer("anchor", anchor.detach().to(torch.float64).clone())

    def transform(self, tensor: Tensor | float) -> Tensor:
        if not isinstance(tensor, Tensor):
            # GPyTorch's initialize checks a raw value given as a number (initialize(raw_weight_var=0.0))
            # by check_raw(number), where torch.exp failed with "argument 'input' must be Tensor, not
            # float" (as GPyTorch's softplus fails for an RBFKernel's raw_lengthscale)
            tensor = torch.as_tensor(tensor, dtype=self.anchor.dtype, device=self.anchor.device)
        return self.anchor.to(tensor) * torch.exp(tensor)

    def inverse_transform(self, transformed_tensor: Tensor) -> Tensor:
        if transformed_tensor.dim() == 0 and bool((transformed_tensor == 0) | torch.isinf(transformed_tensor)):
            # a bound, as BoTorch's optimizers ask for them (inverse_transform(lower_bound)): raw runs
            # over (−inf, inf) whatever the anchor, and a scalar bound must stay a scalar for batches
            return torch.log(transformed_tensor)
        anchor = self.anchor.to(transformed_tensor)
        ratio = transformed_tensor / torch.where(anchor > 0, anchor, torch.ones_like(anchor))
        if bool(((anchor == 0) & (transformed_tensor != 0)).any()):
            raise ValueError("A variance pinned at 0 cannot be moved by inverse_transform; set it instead.")
        return torch.where(anchor > 0, torch.log(ratio), torch.zeros_like(ratio))

    def value_as(self, raw: Tensor, like: Tensor) -> Tensor:
        """The variance in ``like``'s dtype and device (float64-exact when ``like`` is float64)."""
        raw = raw.to(device=like.device, dtype=like.dtype if like.is_floating_point() else raw.dtype)
        return self.anchor.to(device=like.device, dtype=raw.dtype) * torch.exp(raw)

    def _apply(self, fn, *args, **kwargs):
        # .float()/.half() would round the anchor; keep it float64 and only follow the device.
        anchor = self.anchor
        super()._apply(fn, *args, **kwargs)
        self.anchor = anchor.to(device=self.lower_bound.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # GPyTorch's load_strict_shapes(False) (a model of S loaded samples saved and reloaded) lets
        # each gpytorch.Module take its parameters' saved shapes; a constraint is a plain torch module
        # without that hook, so the anchor follows its raw parameter here
        key = prefix + "anchor"
        if strict and key not in state_dict:
            # GPyTorch's Interval loads non-strictly (old state dicts lack its bounds), which left a
            # strict load without the anchor silently keeping the stale one: the anchor is half the value
            missing_keys.append(key)
        if not getattr(self, "_load_strict_shapes", True) and key in state_dict:
            self.anchor = state_dict[key].detach().to(device=self.anchor.device, dtype=torch.float64).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __repr__(self) -> str:
        return f"{self._get_name()}(anchor shape={tuple(self.anchor.shape)})"


def check_variance(name: str, value: float | Tensor) -> Tensor:
    """Validate a variance given by the user and return it as a float64 tensor."""
    # the cast to float64 took a complex tensor's (or numpy array's) real part and True as 1.0, where a
    # Python complex and noise=True are refused
    if boolean_or_complex(value):
        raise ValueError(f"{name} must be a non-negative real number, got {value!r}.")
    if isinstance(value, Tensor):
        tensor = value.detach().to(torch.float64)
    else:
        try:
            # on the CPU, whatever the default device: under torch.device("meta") the checks below failed with
            # torch's "Tensor.item() cannot be called on meta tensors" (register_variance moves it to the layer's)
            tensor = torch.as_tensor(value, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}.") from err
    if tensor.device.type == "meta":   # torch's "Tensor.item() cannot be called on meta tensors" otherwise
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values; pass a number.")
    if not all_finite(tensor):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if bool((tensor < 0).any()):
        raise ValueError(f"{name} must be non-negative (it is a variance), got {value!r}.")
    return tensor + 0.0   # -0.0 as 0.0: a signed zero printed as -0 and gave kernel entries of -0.0


def _shape_hint(name: str, shape: torch.Size, anchor: Tensor) -> str:
    """How to get a vector of variances where a scalar one is held: per-feature weight variances
    (ARD) or a batch. Given when a layer is built, and when a variance is set (``layer.weight_var =``,
    ``initialize``), whose message gave only the shapes."""
    if shape or not anchor.dim():
        return ""
    ard = "per-feature weight variances: Dense(..., ard_num_dims=d) on the first layer; "
    return f" ({ard if name == 'weight_var' else ''}a batch of variances: expand_batch)"


def _variance_of(name: str, module: VarianceParameters) -> Tensor:
    # in the module's dtype, which is the prior's too (torch.distributions casts values to it): a
    # float32 module's prior sees 1e-50 as 0, however exactly its float64 kernels use the variance
    return getattr(module, name)


def _initialize_variance(name: str, module: VarianceParameters, value: float | Tensor) -> None:
    """The setting closure of a variance's prior: what ``sample_from_prior``, BoTorch's ``sample_all_priors``
    and GPyTorch's ``pyro_`` methods install a sample by.

    A prior with a batch of one (``GammaPrior(torch.tensor([2.0]), torch.tensor([1.0]))``) samples ``(1,)``
    for a scalar variance: GPyTorch's ``initialize`` views such a value as its parameter's shape (an
    ``outputscale_prior`` of that kind samples), where ``sample_all_priors`` failed here with "weight_var
    must broadcast to shape ()". Leading dimensions of one are dropped, except while GPyTorch loads ``S``
    samples (``pyro_load_from_samples``), where ``S = 1`` makes a batch of one."""
    if isinstance(module, RandomModuleMixin):
        if isinstance(value, Tensor) and value.requires_grad:
            _sample_variance(name, module, value)
        else:
            module.initialize(**{name: value})
        return
    if isinstance(value, Tensor) and getattr(module, "_strict_init", True):
        extra = value.dim() - getattr(module, f"raw_{name}").dim()
        if extra > 0 and all(n == 1 for n in value.shape[:extra]):
            value = value.reshape(value.shape[extra:])
    if not _sample_into_raw(name, module, value):
        module.initialize(**{name: value})


#: A raw log-ratio whose ``exp`` is exactly 0 in every floating dtype (float64's underflows from −745.2), finite
#: in all of them (float16's range ends at −65504): a variance sampled as 0 beside a positive anchor.
_UNDERFLOW_RAW = -1000.0


def _sample_into_raw(name: str, module: VarianceParameters, value: float | Tensor) -> bool:
    """Install a sample by the raw parameter alone, ``raw = log(value) − log(anchor)`` (in float64), keeping
    the anchor; whether it could: a value of the raw parameter's shape (or broadcasting to it), positive
    where the anchor is (a sample of ``S`` values per variance, ``pyro_load_from_samples``, or a positive
    one beside a variance pinned at 0 is set as the setter sets it, which restoring ``raw`` does not undo).
    A sample of 0 beside a positive anchor takes ``raw = _UNDERFLOW_RAW``: the value is exactly 0 and its
    gradient with respect to ``raw`` exactly 0, as a variance pinned at 0 (GPyTorch's softplus takes
    ``raw = −inf`` there); through the setter it became the anchor, and a frozen variance of 1.5 came back
    from BoTorch's rollback as 0.

    BoTorch's ``fit_gpytorch_mll`` resamples the priors between attempts and rolls the frozen parameters
    back by their raw values alone (``parameter_rollback_ctx``): a sample installed as the setter installs a
    value (a new anchor, ``raw = 0``) left a frozen variance at ``sample · exp(raw)`` (a readout's
    ``weight_var`` frozen at 1.5 came back as 1.32), where GPyTorch's own frozen hyperparameters come back
    as they were. A sample then enters the kernels as ``anchor · exp(raw)``, to the raw parameter's
    rounding: relative errors up to ``|raw| · 2⁻⁵³`` in float64 and ``|raw| · 2⁻²⁴`` in float32 (measured in float32:
    1.1e-7 for a sample 1e-3 beside an anchor of 1.5, 1.7e-7 for 1e6, 1.6e-6 for 1e-20).
    """
    sample = check_variance(name, value)
    raw = getattr(module, f"raw_{name}")
    anchor = getattr(module, f"raw_{name}_constraint").anchor
    if (not isinstance(raw, torch.nn.Parameter) or anchor.shape != raw.shape or sample.dim() > raw.dim()
            or anchor.device.type == "meta"):   # no values to compare: as the setter handles it
        return False
    try:
        sample = sample.to(anchor.device).expand(raw.shape)
    except RuntimeError:
        return False
    positive = sample > 0
    if bool((positive & (anchor == 0)).any()):   # a pinned variance moves by its anchor alone
        return False
    # log(0) = −inf, not selected: a 0 beside a positive anchor underflows, beside a pinned one keeps raw = 0
    stay = torch.where(anchor > 0, torch.full_like(anchor, _UNDERFLOW_RAW), torch.zeros_like(anchor))
    with torch.no_grad():
        raw.copy_(torch.where(positive, torch.log(sample) - torch.log(anchor), stay))
    return True


def _initialize_named(name: str, module: VarianceParameters, value: float | Tensor) -> None:
    # GPyTorch's setting closure for a prior registered by a parameter's name, at module level (picklable)
    module.initialize(**{name: value})


def _sample_variance(name: str, module: VarianceParameters, value: Tensor) -> None:
    """Install a sampled variance with its graph, in one of GPyTorch's random modules
    (``pyro_sample_from_prior``, whose samples carry the gradient that NUTS and HMC follow).

    GPyTorch's own kernels keep that graph: their setters write the raw parameter through
    ``initialize``, which a random module replaces by the plain tensor given. The variances' setter
    stores the value as the anchor, detached, so the marginal likelihood's gradient with respect
    to the sampled variances was ``None`` (only the prior's reached the sampler). Here the anchor
    still becomes the value (exact in float64) and ``raw = log(value) - log(anchor)`` replaces the
    parameter: zero, so the kernel sees the value exactly, with ``∂raw/∂value = 1/value``.
    """
    module.set_variance(name, value.detach())   # the anchor, validated and exact in float64
    raw = getattr(module, f"raw_{name}")
    anchor = getattr(module, f"raw_{name}_constraint").anchor.to(device=raw.device, dtype=raw.dtype)
    sampled = value.to(device=raw.device, dtype=raw.dtype).expand(raw.shape)
    # a zero variance (pinned) keeps raw = 0 without the log's infinite derivative at 0
    positive, ones = anchor > 0, torch.ones_like(sampled)
    log_ratio = torch.log(torch.where(positive, sampled, ones)) - torch.log(torch.where(positive, anchor, ones))
    module.initialize(**{f"raw_{name}": log_ratio})


class VarianceParameters(_MixedInto):
    """Mixin for ``gpytorch.Module`` layers that own variance hyperparameters."""

    @outside_inference_mode
    def register_variance(self, name: str, value: float | Tensor, event_shape: torch.Size = torch.Size([]),
                          prior: Prior | None = None) -> None:
        """Register ``raw_<name>`` with an :class:`ExactVariance` constraint and optional prior."""
        if prior is not None and not isinstance(prior, Prior):   # torch's "str is not a Module subclass"
            raise ValueError(f"{name}_prior must be a gpytorch.priors.Prior (e.g. GammaPrior(2.0, 1.0)) or None, "
                             f"got {prior!r}.")
        anchor = check_variance(name, value)
        shape = torch.Size(event_shape)
        if anchor.shape != shape:
            try:
                anchor = anchor.expand(shape).clone()
            except RuntimeError as err:
                raise ValueError(f"{name} must be a scalar or have shape {tuple(shape)}, "
                                 f"got shape {tuple(anchor.shape)}{_shape_hint(name, shape, anchor)}.") from err
        raw = torch.nn.Parameter(torch.zeros(shape))
        if raw.device.type == "meta":   # GPyTorch's constraint failed: "Tensor.item() cannot be called on meta tensors"
            raise ValueError(f"{type(self).__name__} cannot be built under torch.device('meta'): its variances "
                             f"need values (GPyTorch's constraints read them). Build the layer on a real device; "
                             f"{META_BUILD}")
        self.register_parameter(f"raw_{name}", raw)
        # where raw is (the module's device): a variance given as a CUDA tensor put this anchor there
        # while the layer stayed on the CPU, and every kernel call failed on the mixed devices
        self.register_constraint(f"raw_{name}", ExactVariance(anchor.to(raw.device)))
        if prior is not None:
            # partials of module-level functions, not GPyTorch's closures for a parameter name:
            # those are local functions, which pickle and torch.save cannot store
            self.register_prior(f"{name}_prior", prior, partial(_variance_of, name),
                                partial(_initialize_variance, name))

    def register_prior(self, name: str, prior: Prior, param_or_closure: str | Callable,
                       setting_closure: Callable | None = None) -> None:
        """GPyTorch's ``register_prior``; by a parameter's name (``"weight_var"``, ``"raw_bias_var"``) with the
        closures of a prior given to the layer (``Dense(weight_var_prior=...)``) in place of GPyTorch's.

        GPyTorch's are local functions, which pickle and ``torch.save`` cannot store: a kernel or model
        with such a prior failed to pickle ("Can't pickle local object 'Module.register_prior.<locals>
        .closure_new'"), and its setting closure installed a variance sampled by ``pyro_sample_from_prior``
        detached, so the marginal likelihood's gradient with respect to that sample was ``None``
        (:func:`_sample_variance` keeps it).

        A variance the layer does not have (``"bias_var"`` of ``Dense(..., bias_var=None)``, whose property is
        ``None``) is refused, as ``Dense(bias_var_prior=...)`` refuses it: GPyTorch took it, and
        ``sample_all_priors`` then failed with "'NoneType' object has no attribute 'shape'", the marginal
        likelihood with "must be real number, not NoneType".
        """
        if (isinstance(param_or_closure, str) and param_or_closure not in self._parameters
                and hasattr(self, param_or_closure) and getattr(self, param_or_closure) is None):
            raise ValueError(f"{type(self).__name__} has no {param_or_closure} (it is None): a prior on it needs one "
                             f"({param_or_closure}=<a number> when building the layer).")
        super().register_prior(name, prior, param_or_closure, setting_closure)   # its checks of the name
        if isinstance(param_or_closure, str):
            variance = f"raw_{param_or_closure}" in dict(self.raw_variances())
            self._priors[name] = (prior, partial(_variance_of, param_or_closure),
                                  partial(_initialize_variance if variance else _initialize_named, param_or_closure))

    def register_constraint(self, param_name: str, constraint: Interval, replace: bool = True) -> None:
        """GPyTorch's ``register_constraint``, refusing to replace a variance's :class:`ExactVariance`.

        The kernels read a variance as ``anchor · exp(raw)`` (exact in float64 whatever the module's
        dtype), and ``set_variance``, batching and state dicts keep that anchor: under another
        constraint the value was reported but every kernel call failed with an ``AttributeError``.
        """
        current = self._constraints.get(f"{param_name}_constraint")
        if isinstance(current, ExactVariance) and not isinstance(constraint, ExactVariance):
            name = param_name.removeprefix("raw_")
            raise ValueError(
                f"{param_name} of {type(self).__name__} has ntkgp's own constraint ({name} = anchor·exp(raw), "
                f"positive and exact in float64), which its kernels rely on; it cannot be replaced by "
                f"{type(constraint).__name__}. To keep {name} in a range, give it a prior "
                f"({type(self).__name__}({name}_prior=...)), or set it (layer.{name} = value).")
        super().register_constraint(param_name, constraint, replace)

    def get_variance(self, name: str) -> Tensor:
        """The current value in the module's dtype (with gradient to ``raw_<name>``)."""
        raw = getattr(self, f"raw_{name}")
        return getattr(self, f"raw_{name}_constraint").transform(raw)

    def variance_as(self, name: str, like: Tensor) -> Tensor:
        """The current value in ``like``'s dtype and device; exact in float64."""
        raw = getattr(self, f"raw_{name}")
        constraint = getattr(self, f"raw_{name}_constraint")
        if "meta" in (raw.device.type, constraint.anchor.device.type) and like.device.type != "meta":
            # a layer moved with .to("meta") failed every kernel and build with torch's "Cannot copy out of
            # meta tensor; no data!"
            raise ValueError(f"{type(self).__name__}'s {name} is on the meta device, which holds shapes but no "
                             f"values: nothing to compute with. Keep the layer on a real device (not .to('meta')); "
                             f"{META_BUILD}")
        return constraint.value_as(raw, like)

    @outside_inference_mode
    def set_variance(self, name: str, value: float | Tensor) -> None:
        """Set a variance exactly: the anchor becomes ``value`` and ``raw`` returns to 0.

        ``value`` must broadcast to the current shape, except while GPyTorch loads samples
        (``pyro_load_from_samples``), where ``(S, *shape)`` makes the variance a batch of ``S``.
        """
        raw = getattr(self, f"raw_{name}")
        anchor = check_variance(name, value)
        try:
            anchor = anchor.expand(raw.shape).clone()
        except RuntimeError as err:
            event_dims = self._variance_event_dims(name)
            event = raw.shape[raw.dim() - event_dims:]
            if getattr(self, "_strict_init", True) or anchor.shape[anchor.dim() - event_dims:] != event:
                raise ValueError(f"{name} must broadcast to shape {tuple(raw.shape)}, "
                                 f"got shape {tuple(anchor.shape)}{_shape_hint(name, raw.shape, anchor)}.") from err
            # GPyTorch's pyro_load_from_samples (non-strict mode) loads S samples of shape (S, *shape):
            # the variance becomes a batch of S, as GPyTorch's own parameters do (`.data = value`)
            raw.data = raw.new_zeros(anchor.shape)
            anchor = anchor.clone()
        constraint = getattr(self, f"raw_{name}_constraint")
        constraint.anchor = anchor.to(constraint.anchor.device)
        with torch.no_grad():
            raw.zero_()

    @outside_inference_mode
    def mapped_variances(self, transform: Callable[[Tensor, int], Tensor]) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, raw, anchor)`` of every variance of this module with ``transform(value,
        event_dims)`` applied to its raw parameter and anchor (a batch expansion or index), to be
        installed by :meth:`set_variances`: computed first, so that a network whose expansion fails
        part-way (out of memory) is left as it was."""
        out = []
        for name, raw in list(self._parameters.items()):
            if name.startswith("raw_"):
                events = self._variance_event_dims(name[4:])
                anchor = getattr(self, f"{name}_constraint").anchor
                out.append((name, transform(raw.detach(), events).clone(), transform(anchor, events).clone()))
        return out

    @outside_inference_mode
    def set_variances(self, values: list[tuple[str, Tensor, Tensor]]) -> None:
        """Install ``(name, raw, anchor)`` triples as new parameters (keeping ``requires_grad``)."""
        for name, raw, anchor in values:
            self._parameters[name] = torch.nn.Parameter(raw, requires_grad=self._parameters[name].requires_grad)
            getattr(self, f"{name}_constraint").anchor = anchor

    def raw_variances(self) -> Iterator[tuple[str, Tensor]]:
        """``(raw_<name>, raw)`` for each variance of this module: its raw parameter, or in one of
        GPyTorch's random modules (``pyro_sample_from_prior``) the plain tensor of a sampled value that
        replaced it (which ``_parameters`` no longer holds)."""
        for key, constraint in self._constraints.items():
            if isinstance(constraint, ExactVariance):
                raw = getattr(self, key.removesuffix("_constraint"), None)
                if raw is not None:
                    yield key.removesuffix("_constraint"), raw

    def _variance_event_dims(self, name: str) -> int:
        return 0
