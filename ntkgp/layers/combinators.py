"""Composition of layers: in series, in parallel branches joined by sum or concatenation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ntkgp._checks import integer_at_least
from ntkgp.layers.activations import Identity
from ntkgp.layers.base import BuildContext, Layer
from ntkgp.layers.state import KernelState

JOINS = ("sum", "concat")


class Serial(Layer):
    """Layers applied one after the other: kernel maps compose, ``K_L = f_L ∘ … ∘ f_1``.

    The same layer object may appear several times (see :func:`repeat`): its hyperparameters
    are then shared, while the finite twin draws independent weights for every occurrence.
    """

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        if not layers:
            raise ValueError("serial() needs at least one layer.")
        for layer in layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"serial() takes ntkgp layers, got {type(layer).__name__}.")
        self.layers = nn.ModuleList(layers)

    @property
    def preserves_gaussian(self) -> bool:  # type: ignore[override]
        return all(layer.preserves_gaussian for layer in self.layers)

    def draws_own_output(self, input_drawn: bool = False) -> bool:
        for layer in self.layers:
            input_drawn = layer.draws_own_output(input_drawn)
        return input_drawn

    def kernel_map(self, state: KernelState) -> KernelState:
        for layer in self.layers:
            state = layer.kernel_map(state).with_exact_diagonal()
        return state

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        modules, width = [], in_width
        for layer in self.layers:
            module, width = layer.finite(width, ctx)
            modules.append(module)
        return nn.Sequential(*modules), width

    def check_input_dim(self, d: int) -> None:
        self.layers[0].check_input_dim(d)

    def check_structure(self) -> None:
        for layer in self.layers:
            layer.check_structure()

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]


class Parallel(Layer):
    r"""Branches that all see the same input, joined by ``"sum"`` or ``"concat"``.

    * ``sum`` (residual connections; branches independent)::

          K = Σ_b K_b,   Θ = Σ_b Θ_b

      The branches' cross-covariances vanish when all but one end in a ``Dense`` layer of
      their own (:meth:`Layer.draws_own_output`): its centred weights, drawn independently of
      everything else, make ``E[f_b(x)_i g(x')_i] = 0`` whatever the other branch ``g`` carries.
      Other sums, such as ``x + x`` or ``x + LayerNorm(x)``, are refused rather than given the
      kernel of independent branches. The sum is Gaussian when every branch is; when one carries
      an activation's output (``x + f(x)`` after a ``ReLU``) it is not, and as after a
      concatenation an activation may not follow directly. A branch of raw inputs is refused: the
      sum would keep their fixed width ``d``, and the layers after it would not be Gaussian in
      the limit.

    * ``concat`` along channels, weighting each branch by its finite width ``n_b``
      (as neural-tangents' ``FanInConcat``)::

          K = Σ_b n_b K_b / Σ_b n_b,   Θ = Σ_b n_b Θ_b / Σ_b n_b

      The concatenated features are no longer identically distributed, so an activation may
      not follow directly (put a ``Dense`` layer in between); at the network's output, each
      output has the kernel of its own branch and ``K`` is their average.

    A layer instance used in several branches (or places) shares its hyperparameters; the finite
    twin draws independent weights for each use, as :func:`repeat` does.
    """

    def __init__(self, *branches: Layer, join: str = "sum") -> None:
        super().__init__()
        if join not in JOINS:
            raise ValueError(f"join must be one of {JOINS}, got {join!r}.")
        if len(branches) < 1:
            raise ValueError("parallel() needs at least one branch.")
        for branch in branches:
            if not isinstance(branch, Layer):
                raise ValueError(f"parallel() takes ntkgp layers, got {type(branch).__name__}.")
        self.branches = nn.ModuleList(branches)
        self.join = join

    @property
    def preserves_gaussian(self) -> bool:  # type: ignore[override]
        return self.join == "sum" and all(b.preserves_gaussian for b in self.branches)

    def draws_own_output(self, input_drawn: bool = False) -> bool:
        # a sum is centred given everything outside it when every branch is (linearity), e.g. the
        # inner block of x + (h + D(relu(h))) with h = D'(relu(x)): h comes from the outer branch's
        # own Dense layer, so the outer sum stays a sum of uncorrelated branches
        return self.join == "sum" and all(branch.draws_own_output(input_drawn) for branch in self.branches)

    def kernel_map(self, state: KernelState) -> KernelState:
        outs = [branch.kernel_map(state).with_exact_diagonal() for branch in self.branches]
        if self.join == "sum":
            if len(outs) > 1 and any(out.is_input for out in outs):
                # x·x'/d would be the branch's kernel, but the sum keeps the inputs' fixed width d: a
                # Dense after it is a Gaussian scale mixture, not the Gaussian its map assumes (an
                # activation after that was off by z = 14 against wide networks at d = 1)
                raise ValueError("A sum with the raw inputs as a branch (a residual on the inputs) keeps "
                                 "their fixed width, which no kernel map describes: put a Dense layer "
                                 "before the residual.")
            widths = {out.width for out in outs}
            if len(widths) > 1:
                raise ValueError(f"Branches joined by sum need equal widths, got {sorted(widths)}.")
            weights = [1.0] * len(outs)
            width = outs[0].width
            is_gaussian = all(out.is_gaussian for out in outs)
        else:
            outs = [out.materialize() for out in outs]
            total = sum(out.width for out in outs)
            weights = [out.width / total for out in outs]
            width, is_gaussian = total, False
        centred = _centred_sum(outs) if self.join == "sum" and not is_gaussian else None
        return _combine(outs, weights).replace(width=width, is_gaussian=is_gaussian, centred=centred)

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        modules, widths = [], []
        for branch in self.branches:
            module, width = branch.finite(in_width, ctx)
            modules.append(module)
            widths.append(width)
        if self.join == "sum":
            known = {w for w in widths if w is not None}
            if len(known) > 1:
                raise ValueError(f"Branches joined by sum need equal widths, got {sorted(known)}.")
            out_width = known.pop() if known else None
        else:
            out_width = None if None in widths else sum(widths)
        return ParallelModule(modules, self.join), out_width

    def check_input_dim(self, d: int) -> None:
        for branch in self.branches:
            branch.check_input_dim(d)

    def check_structure(self) -> None:
        for branch in self.branches:
            branch.check_structure()
        if self.join == "sum" and sum(not branch.draws_own_output(False) for branch in self.branches) > 1:
            raise ValueError("A sum of branches needs them independent: all but one must end in a Dense "
                             "layer of their own (followed by nothing but Identity or LayerNorm). Branches "
                             "without one, such as Identity and LayerNorm, share their input's randomness, "
                             "and the kernel of their sum is not the sum of their kernels.")


def _centred_sum(states: list[KernelState]) -> Callable[[], tuple[Tensor, Tensor, Tensor] | None]:
    """The centred kernels of a sum of independent branches (for a ``LayerNorm`` after it): the sum
    of theirs, a Gaussian branch's being its own kernels; ``None`` if a branch's mean is unknown.
    A concatenation's features would have different means per branch: not tracked (refused)."""
    def centred() -> tuple[Tensor, Tensor, Tensor] | None:
        parts = []
        for state in states:
            part = (state.nngp, state.cov1, state.cov2) if state.is_gaussian else (
                None if state.centred is None else state.centred())
            if part is None:
                return None
            parts.append(part)
        ones = [1.0] * len(parts)
        nngp, cov1, cov2 = (_weighted_sum(ones, list(terms)) for terms in zip(*parts, strict=True))
        return nngp, cov1, cov2

    return centred


def _combine(states: list[KernelState], weights: list[float]) -> KernelState:
    """Weighted sum of the kernels of independent branches."""
    first = states[0]
    if first.is_input:  # every branch passed the raw inputs through
        return first
    nngp = _weighted_sum(weights, [s.nngp for s in states]) if len(states) > 1 else first.nngp
    cov1 = _weighted_sum(weights, [s.cov1 for s in states])
    same = all(s.cov2 is s.cov1 for s in states)
    cov2 = cov1 if same else _weighted_sum(weights, [s.cov2 for s in states])
    ntk = None if first.ntk is None else _weighted_sum(weights, [s.ntk for s in states])
    return first.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)


def _weighted_sum(weights: list[float], tensors: list[Tensor]) -> Tensor:
    out = weights[0] * tensors[0] if weights[0] != 1.0 else tensors[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out = out + (w * t if w != 1.0 else t)
    return out


class ParallelModule(nn.Module):
    """Finite twin of :class:`Parallel`: outputs of the branches summed or concatenated."""

    def __init__(self, branches: list[nn.Module], join: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.join = join

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.join == "sum":
            widths = sorted({o.shape[-1] for o in outs})
            if len(widths) > 1:   # a deferred build learns the input width here; broadcasting would hide it
                raise ValueError(f"Branches joined by sum need equal widths, got {widths}.")
            out = outs[0]
            for other in outs[1:]:
                out = out + other
            return out
        # An identity branch is (n, d) while ensemble branches are (E, n, k): align leading dims.
        leading = torch.broadcast_shapes(*(o.shape[:-1] for o in outs))
        return torch.cat([o.expand(*leading, o.shape[-1]) for o in outs], -1)

    def extra_repr(self) -> str:
        return f"join={self.join!r}"


def serial(*layers: Layer) -> Serial:
    """Compose layers in series, ``K_L = f_L ∘ … ∘ f_1`` (neural-tangents' ``stax.serial``, Novak
    et al. 2020); see :class:`Serial`."""
    return Serial(*layers)


def parallel(*branches: Layer, join: str = "sum") -> Parallel:
    """Run branches on the same input and join them: ``K = Σ_b K_b`` (``"sum"``) or
    ``K = Σ_b n_b K_b / Σ_b n_b`` (``"concat"``), likewise ``Θ``; see :class:`Parallel`."""
    return Parallel(*branches, join=join)


def residual(*layers: Layer) -> Parallel:
    """A residual block ``x + f(x)`` with ``f = serial(*layers)``: ``K = K_x + K_f``, ``Θ = Θ_x + Θ_f``
    (He et al. 2016; the infinite-width kernel as in neural-tangents). ``f`` must end in a Dense layer
    of its own, so the two branches are independent. After a Dense the sum is Gaussian; after an
    activation it is not, and the next layer must be a Dense; on the raw inputs it is refused
    (:class:`Parallel`)."""
    if not layers:   # Serial's own message named serial(), which the caller never wrote
        raise ValueError("residual() needs at least one layer.")
    return Parallel(Identity(), Serial(*layers), join="sum")


def repeat(layer: Layer, n: int) -> Serial:
    """``layer`` applied ``n`` times, ``K ← f^n(K)``: shared hyperparameters, independent finite
    weights (neural-tangents' ``stax.repeat``)."""
    n = integer_at_least(n, 1, "repeat() count")
    return Serial(*([layer] * n))
