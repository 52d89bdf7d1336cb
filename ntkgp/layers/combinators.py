"""Composition of layers: in series, in parallel branches joined by sum or concatenation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, cast, overload

import torch
from torch import Tensor, nn

from ntkgp._checks import integer_at_least
from ntkgp.layers.activations import Identity
from ntkgp.layers.base import BuildContext, Layer
from ntkgp.layers.numerics import _is_compiling, is_vmapped
from ntkgp.layers.state import KernelState

JOINS = ("sum", "concat", "prod")

if TYPE_CHECKING:
    class _Layers(nn.ModuleList):
        """To type checkers, the ModuleList of a Serial's layers or a Parallel's branches: ntkgp layers
        (torch types its elements as any Module)."""

        def __iter__(self) -> Iterator[Layer]: ...

        @overload
        def __getitem__(self, idx: slice) -> _Layers: ...

        @overload
        def __getitem__(self, idx: int) -> Layer: ...

        def __getitem__(self, idx: int | slice) -> Layer | _Layers: ...


class Serial(Layer):
    """Layers applied one after the other: kernel maps compose, ``K_L = f_L ∘ … ∘ f_1`` (neural-tangents'
    ``stax.serial``, Novak et al. 2020).

    The same layer object may appear several times (see :func:`repeat`): its hyperparameters
    are then shared, while the finite twin draws independent weights for every occurrence.
    ``net[i]`` is a layer and ``net[i:j]`` the network of those layers (the same objects, as
    torch's ``Sequential`` slices), e.g. the kernel of a network's hidden features.

    A ``Serial`` among the layers is spliced in: ``serial(serial(a, b), c)`` is ``serial(a, b, c)``,
    the same layer objects (and hyperparameters) and the same kernels, with the flat network's
    indices and parameter names (``layers.2.weight_var``). A network grown one block at a time,
    ``net = serial(net, ReLU(), Dense(8))``, so stays one level deep: nested, every level was a
    module inside a module, and torch's recursive walks (``parameters()``, ``repr``, ``deepcopy``,
    ``pickle``, the built network's forward pass) raised ``RecursionError`` from a few hundred
    blocks on.
    """

    layers: _Layers

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        if not layers:
            raise ValueError("serial() needs at least one layer.")
        flat: list[Layer] = []
        for layer in layers:
            if not isinstance(layer, Layer):
                raise ValueError(f"serial() takes ntkgp layers, got {type(layer).__name__}.")
            # a Serial's own layers are flat (spliced when it was made): one level to splice
            flat.extend(layer.layers if isinstance(layer, Serial) else [layer])
        self.layers = cast("_Layers", nn.ModuleList(flat))

    @property
    def preserves_gaussian(self) -> bool:  # type: ignore[override]
        """Whether centred Gaussian features stay centred Gaussian: every layer in turn keeps them so."""
        return all(layer.preserves_gaussian for layer in self.layers)

    @property
    def mixes_features(self) -> bool:  # type: ignore[override]
        """Whether each output feature depends on the input only through sums over all of its features
        (:attr:`Layer.mixes_features`): one ``Dense`` layer anywhere in the chain makes it so."""
        return any(layer.mixes_features for layer in self.layers)

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

    @overload
    def __getitem__(self, index: int) -> Layer: ...

    @overload
    def __getitem__(self, index: slice) -> Serial: ...

    def __getitem__(self, index: int | slice) -> Layer | Serial:
        # a slice of the ModuleList is a ModuleList, not a Layer: net[:2].kernel(x) was an AttributeError;
        # as torch's Sequential, a slice is the network of those layers (sharing their hyperparameters)
        if isinstance(index, slice):
            return Serial(*_selected(self.layers, index, "layers"))
        return self.layers[index]


class Parallel(Layer):
    r"""Branches that all see the same input, joined by ``"sum"``, ``"concat"`` or ``"prod"``.

    * ``sum`` (residual connections; branches independent)::

          K = Σ_b K_b + Σ_{a≠b} μ_a(x) μ_b(x'),   Θ = Σ_b Θ_b

      where ``μ_b(x)`` is the mean of branch ``b``'s features (zero after a ``Dense`` layer,
      ``E[φ(u)]`` after an activation). Branches are independent when all but one contain a
      ``Dense`` layer of their own (:attr:`Layer.mixes_features`): each of its output features
      depends on the input only through a sum over all of the input's features, with weights
      drawn independently of everything else, so at infinite width it is independent of feature
      ``i`` of every other branch, and ``E[f_i(x) g_i(x')] = μ_f(x) μ_g(x')``. This covers
      ``x + D(φ(x))`` and ``x + φ(D(x))`` (post-activation blocks) alike. Sums of branches without
      one, such as ``x + x`` or ``x + LayerNorm(x)``, are refused rather than given the kernel of
      independent branches. ``Θ`` has no cross terms: a parameter in front of the sum moves a
      mixing branch's feature ``i`` only through a ``1/√n``-weighted sum over the input's
      features. The sum is Gaussian when every branch is; when one carries an activation's output
      it is not, and as after a concatenation an activation may not follow directly. A branch of
      raw inputs is refused: the sum would keep their fixed width ``d``, and the layers after it
      would not be Gaussian in the limit.

    * ``concat`` along channels, weighting each branch by its finite width ``n_b``
      (as neural-tangents' ``FanInConcat``)::

          K = Σ_b n_b K_b / Σ_b n_b,   Θ = Σ_b n_b Θ_b / Σ_b n_b

      The concatenated features of several branches are no longer identically distributed, so an
      activation may not follow directly (put a ``Dense`` layer in between; one branch is the
      branch itself, Gaussian when it is; a ``LayerNorm`` may, subtracting
      the mean ``Σ_b n_b μ_b / Σ_b n_b``); at the network's output, each output has the kernel of
      its own branch and ``K`` is their average.

    * ``prod``, the features multiplied elementwise (gating; neural-tangents' ``FanInProd``), with
      the same independence as ``sum``::

          K = Π_b K_b,   Θ = Σ_b Θ_b Π_{c≠b} K_c

      (``E[f_i g_i f'_i g'_i] = E[f_i f'_i] E[g_i g'_i]`` for independent branches, with or without
      means; the product rule for ``Θ``). The product is not Gaussian: an activation may not follow
      directly. At most one branch may be a concatenation, whose features differ in distribution
      (the average of products is the product of averages only against identical features).

    A layer instance used in several branches (or places) shares its hyperparameters; the finite
    twin draws independent weights for each use, as :func:`repeat` does. ``net[i]`` is a branch
    (``residual(f)[1]`` is ``serial(f)``), ``len(net)`` their number and ``net[i:j]`` the ``Parallel``
    of those branches with the same join.

    The three joins are those of Novak et al. 2020 (*Neural Tangents: Fast and Easy Infinite
    Neural Networks in Python*, ICLR, arXiv:1912.02803); the residual sum's
    kernel follows Yang & Schoenholz 2017 (*Mean Field Residual Networks: On the Edge of Chaos*,
    NeurIPS) and Huang et al. 2020 (*Why Do Deep Residual Networks Generalize Better than Deep
    Feedforward Networks? A Neural Tangent Kernel Perspective*, NeurIPS).
    """

    def __init__(self, *branches: Layer, join: str = "sum") -> None:
        super().__init__()
        if join not in JOINS:
            raise ValueError(f"join must be one of {JOINS}, got {join!r}.")
        if len(branches) < 1:
            raise ValueError("parallel() needs at least one branch.")
        for branch in branches:
            if isinstance(branch, str) and branch in JOINS:   # parallel(f, g, "concat"): read as a branch
                raise ValueError(f"parallel() takes ntkgp layers as branches, got the string {branch!r}: pass the "
                                 f"join by keyword, join={branch!r}.")
            if not isinstance(branch, Layer):
                raise ValueError(f"parallel() takes ntkgp layers, got {type(branch).__name__}.")
        self.branches = cast("_Layers", nn.ModuleList(branches))
        self.join = join

    @property
    def preserves_gaussian(self) -> bool:  # type: ignore[override]
        """Whether centred Gaussian features stay centred Gaussian: a sum of independent branches that each
        keep them so (the sum of independent centred Gaussians is one), or a single branch that does."""
        # one branch, whatever the join, is the branch itself
        return (self.join == "sum" or len(self.branches) == 1) and all(b.preserves_gaussian for b in self.branches)

    @property
    def mixes_features(self) -> bool:  # type: ignore[override]
        """Whether each output feature depends on the input only through sums over all of its features
        (:attr:`Layer.mixes_features`): every branch must."""
        # one branch that passes its input's features on (x + f(x)) ties the output to them
        return all(branch.mixes_features for branch in self.branches)

    def kernel_map(self, state: KernelState) -> KernelState:
        outs = [branch.kernel_map(state).with_exact_diagonal() for branch in self.branches]
        if self.join in ("sum", "prod"):
            if len(outs) > 1 and any(out.is_input for out in outs):
                # x·x'/d would be the branch's kernel, but the sum keeps the inputs' fixed width d: a
                # Dense after it is a Gaussian scale mixture, not the Gaussian its map assumes (an
                # activation after that was off by z = 14 against wide networks at d = 1)
                raise ValueError(f"A {self.join} with the raw inputs as a branch (a residual on the inputs) "
                                 "keeps their fixed width, which no kernel map describes: put a Dense layer "
                                 "before it.")
            widths = {out.width for out in outs}
            if len(widths) > 1:
                raise ValueError(f"Branches joined by {self.join} need equal widths, got {sorted(widths)}.")
            width = outs[0].width
            if self.join == "prod" and len(outs) > 1:
                return _multiplied(outs).replace(width=width)
            weights = [1.0] * len(outs)
            is_gaussian = all(out.is_gaussian for out in outs)
            combined = _with_means(_combine(outs, weights), outs)
            identical = all(out.identical for out in outs)
        else:
            # the raw inputs' features are fixed numbers, not i.i.d. draws of a known mean
            outs = [out.materialize().replace(mean=_unknown, centred=_unknown) if out.is_input else out
                    for out in outs]
            total = sum(out.width for out in outs)
            weights = [out.width / total for out in outs]
            # one branch is the branch itself; features of several are not identically distributed
            width, is_gaussian = total, len(outs) == 1 and outs[0].is_gaussian
            combined = _concatenated(_combine(outs, weights), outs, weights)
            identical = len(outs) == 1 and outs[0].identical
        return combined.replace(width=width, is_gaussian=is_gaussian, identical=identical)

    def finite(self, in_width: int | None, ctx: BuildContext) -> tuple[nn.Module, int | None]:
        modules, widths = [], []
        for branch in self.branches:
            module, width = branch.finite(in_width, ctx)
            modules.append(module)
            widths.append(width)
        if self.join in ("sum", "prod"):
            known = {w for w in widths if w is not None}
            if len(known) > 1:
                raise ValueError(f"Branches joined by {self.join} need equal widths, got {sorted(known)}.")
            out_width = known.pop() if known else None
        else:
            out_width = None if None in widths else sum(cast("list[int]", widths))
        return ParallelModule(modules, self.join), out_width

    def check_input_dim(self, d: int) -> None:
        for branch in self.branches:
            branch.check_input_dim(d)

    def __len__(self) -> int:
        return len(self.branches)

    @overload
    def __getitem__(self, index: int) -> Layer: ...

    @overload
    def __getitem__(self, index: slice) -> Parallel: ...

    def __getitem__(self, index: int | slice) -> Layer | Parallel:
        # as Serial's layers: len(), iteration and net[i] were a TypeError ("'Parallel' object is not
        # subscriptable"), so residual(f)[1], the branch f, could only be reached through .branches
        if isinstance(index, slice):
            return Parallel(*_selected(self.branches, index, "branches"), join=self.join)
        return self.branches[index]

    def extra_repr(self) -> str:
        # the printed spec was the same for sum, concat and prod: a concatenation read as a residual sum
        return f"join={self.join!r}"

    def check_structure(self) -> None:
        for branch in self.branches:
            branch.check_structure()
        if self.join in ("sum", "prod") and sum(not branch.mixes_features for branch in self.branches) > 1:
            raise ValueError(f"A {self.join} of branches needs them independent: all but one must contain a Dense "
                             "layer of their own. Branches without one, such as Identity, LayerNorm or an "
                             f"activation, are functions of the same input feature, and the kernel of their "
                             f"{self.join} is not that of independent branches.")


def _selected(modules: _Layers, index: slice, nouns: str) -> list[Layer]:
    """The layers (or branches) ``index`` selects, at least one: an empty slice, as ``net[3:]`` of a
    three-layer network, was refused with "serial() needs at least one layer.", a call never written."""
    chosen = list(modules[index])
    if not chosen:
        text = ":".join("" if v is None else str(v) for v in (index.start, index.stop))
        text += "" if index.step is None else f":{index.step}"
        raise ValueError(f"[{text}] selects none of the {len(modules)} {nouns}: a network needs at least one layer.")
    return chosen


def _unknown() -> None:
    return None


def _known_means(states: list[KernelState], centred_as_zero: bool = False
                 ) -> list[tuple[Tensor, Tensor, bool]] | None:
    """``(m1, m2, uniform)`` of the branches whose features are not centred (of every branch, zeros
    for the centred ones, with ``centred_as_zero``), or ``None`` if one of them is not known."""
    means = []
    for state in states:
        if state.mean is None:
            if centred_as_zero:
                means.append((torch.zeros_like(state.cov1), torch.zeros_like(state.cov2), True))
            continue
        mean = state.mean()
        if mean is None:
            return None
        means.append(mean)
    return means


def _centred_parts(states: list[KernelState]) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """Each branch's kernels of its features minus their mean (its own kernels when centred), or
    ``None`` if one of them is not known."""
    parts = []
    for state in states:
        part = (state.nngp, state.cov1, state.cov2) if state.mean is None else (
            None if state.centred is None else state.centred())
        if part is None:
            return None
        parts.append(part)
    return parts


def _outer(state: KernelState, m1: Tensor, m2: Tensor) -> Tensor:
    """``m1(x1_i) m2(x2_j)`` shaped like ``state.nngp``."""
    return m1 * m2 if state.diag else m1.unsqueeze(-1) * m2.unsqueeze(-2)


def _with_means(combined: KernelState, states: list[KernelState]) -> KernelState:
    r"""The sum of independent branches ``a, b, …`` given the sum of their kernels: their features'
    means add, and so do the kernels of the features minus their means; the kernel itself gains
    the products of the branches' means (``E[f_a g_b] = μ_a μ_b`` for independent features)::

        K = Σ_b K_b + Σ_{a≠b} μ_a(x) μ_b(x'),   μ = Σ_b μ_b,   K − μμ' = Σ_b (K_b − μ_b μ_b')

    ``Θ`` gains nothing: a parameter in front of the sum moves feature ``i`` of a branch that
    mixes its input's features only through the ``1/√n``-weighted sum over them. Needs every
    pair of branches with non-zero means to have one whose features all share their mean (a sum
    of two concatenations of different means would pair them feature by feature).
    """
    uncentred = [state for state in states if state.mean is not None]
    if not uncentred:
        return combined.replace(mean=None, centred=None)
    known = None
    if len(uncentred) > 1:   # the kernel itself needs the means now
        known = means = _known_means(states)
        if means is None:
            raise ValueError("A sum of two branches whose features have non-zero means needs those means "
                             "(their products enter the kernel): Elementwise needs mean_fn, and raw inputs in a "
                             "concatenation have none (put a Dense layer after the concatenation).")
        if sum(not uniform for _, _, uniform in means) > 1:
            raise ValueError("A sum of two concatenations (or LayerNorms of them) whose branches' features "
                             "have different means pairs their features one by one, which the kernel does "
                             "not track: put a Dense layer after one of the concatenations.")
        nngp, cov1, cov2 = combined.nngp, combined.cov1, combined.cov2
        for a, (m1, m2, _) in enumerate(means):
            for n1, n2, _ in means[a + 1:]:
                nngp = nngp + _outer(combined, m1, n2) + _outer(combined, n1, m2)
                cov1 = cov1 + 2 * m1 * n1
                cov2 = cov1 if combined.cov2 is combined.cov1 else cov2 + 2 * m2 * n2
        combined = combined.replace(nngp=nngp, cov1=cov1, cov2=cov2)

    def mean() -> tuple[Tensor, Tensor, bool] | None:
        means = known if known is not None else _known_means(uncentred)
        if means is None:
            return None
        ones = [1.0] * len(means)
        m1, m2, uniform = zip(*means, strict=True)
        return _weighted_sum(ones, list(m1)), _weighted_sum(ones, list(m2)), all(uniform)

    def centred() -> tuple[Tensor, Tensor, Tensor] | None:
        parts = _centred_parts(states)
        if parts is None:
            return None
        ones = [1.0] * len(parts)
        nngp, cov1, cov2 = (_weighted_sum(ones, list(terms)) for terms in zip(*parts, strict=True))
        return nngp, cov1, cov2

    return combined.replace(mean=mean, centred=centred)


def _concatenated(combined: KernelState, states: list[KernelState], weights: list[float]) -> KernelState:
    r"""A concatenation of branches with features of means ``μ_b`` and weights ``w_b = n_b / Σ n``:
    their mean is ``μ = Σ_b w_b μ_b`` and, about it, the kernel a ``LayerNorm`` normalizes is::

        K − μμ' = Σ_b w_b (K_b − μ_b μ_b') + Σ_b w_b (μ_b − μ)(μ_b − μ)'

    (the second sum is the spread of the branches' means, without the cancellation of ``K − μμ'``).
    """
    if all(state.mean is None for state in states):
        return combined.replace(mean=None, centred=None)

    def average(means: list[tuple[Tensor, Tensor, bool]]) -> tuple[Tensor, Tensor]:
        m1, m2, _ = zip(*means, strict=True)
        return _weighted_sum(weights, list(m1)), _weighted_sum(weights, list(m2))

    def mean() -> tuple[Tensor, Tensor, bool] | None:
        means = _known_means(states, centred_as_zero=True)
        if means is None:
            return None
        # every feature has the average mean when the branches' means are all the same at these
        # inputs (zero for odd activations, or copies of one branch); not decided under vmap or
        # torch.compile (values per sample or symbolic), where it stays False: that only refuses more
        first = means[0]
        uniform = not (_is_compiling() or is_vmapped(first[0])) and all(
            m[2] and torch.equal(m[0], first[0]) and torch.equal(m[1], first[1]) for m in means)
        return (*average(means), uniform)

    def centred() -> tuple[Tensor, Tensor, Tensor] | None:
        parts, means = _centred_parts(states), _known_means(states, centred_as_zero=True)
        if means is None or parts is None:
            return None
        mu1, mu2 = average(means)
        nngp, cov1, cov2 = (_weighted_sum(weights, list(terms)) for terms in zip(*parts, strict=True))
        for w, (m1, m2, _) in zip(weights, means, strict=True):
            d1, d2 = m1 - mu1, m2 - mu2
            nngp = nngp + w * _outer(combined, d1, d2)
            cov1 = cov1 + w * d1 * d1
            cov2 = cov2 + w * d2 * d2
        return nngp, cov1, cov2

    return combined.replace(mean=mean, centred=centred)


def _multiplied(states: list[KernelState]) -> KernelState:
    r"""The elementwise product of the features of independent branches::

        K = Π_b K_b,   Θ = Σ_b Θ_b Π_{c≠b} K_c,   μ = Π_b μ_b

    and, about ``μ``, the centred kernel by ``C ← C (C_b + M_b) + M C_b``, ``M ← M M_b`` over the
    branches (``C_b`` a branch's centred kernel, ``M_b = μ_b μ_b'``), without the cancellation of
    ``Π K_b − Π M_b``.
    """
    if sum(not state.identical for state in states) > 1:
        raise ValueError("A product of two concatenations (or of branches after them) averages the products "
                         "of features of different distributions, which the kernel does not track: put a "
                         "Dense layer after one of the concatenations.")
    first = states[0]
    nngp, cov1, cov2, ntk = first.nngp, first.cov1, first.cov2, first.ntk
    same = all(s.cov2 is s.cov1 for s in states)
    for state in states[1:]:
        if ntk is not None:   # then every branch's, computed with the first's
            ntk = ntk * state.nngp + nngp * cast(Tensor, state.ntk)
        nngp, cov1 = nngp * state.nngp, cov1 * state.cov1
        cov2 = cov1 if same else cov2 * state.cov2
    product = first.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False,
                            identical=all(state.identical for state in states))
    if any(state.mean is None for state in states):   # a centred factor: every product is centred
        return product.replace(mean=None, centred=None)

    def mean() -> tuple[Tensor, Tensor, bool] | None:
        means = _known_means(states)
        if means is None:
            return None
        m1, m2, uniform = means[0]
        for n1, n2, u in means[1:]:
            m1, m2, uniform = m1 * n1, m2 * n2, uniform and u
        return m1, m2, uniform

    def centred() -> tuple[Tensor, Tensor, Tensor] | None:
        parts, means = _centred_parts(states), _known_means(states)
        if parts is None or means is None:
            return None
        squares = [(_outer(product, m1, m2), m1 * m1, m2 * m2) for m1, m2, _ in means]
        c, m = list(parts[0]), list(squares[0])
        for part, square in zip(parts[1:], squares[1:], strict=True):
            c = [ci * (pi + si) + mi * pi for ci, mi, pi, si in zip(c, m, part, square, strict=True)]
            m = [mi * si for mi, si in zip(m, square, strict=True)]
        return c[0], c[1], c[2]

    return product.replace(mean=mean, centred=centred)


def _combine(states: list[KernelState], weights: list[float]) -> KernelState:
    """Weighted sum of the kernels of independent branches."""
    first = states[0]
    if first.is_input:  # every branch passed the raw inputs through
        return first
    nngp = _weighted_sum(weights, [s.nngp for s in states]) if len(states) > 1 else first.nngp
    cov1 = _weighted_sum(weights, [s.cov1 for s in states])
    same = all(s.cov2 is s.cov1 for s in states)
    cov2 = cov1 if same else _weighted_sum(weights, [s.cov2 for s in states])
    ntk = None if first.ntk is None else _weighted_sum(weights, [cast(Tensor, s.ntk) for s in states])  # every branch's
    return first.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2)


def _weighted_sum(weights: list[float], tensors: list[Tensor]) -> Tensor:
    out = weights[0] * tensors[0] if weights[0] != 1.0 else tensors[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out = out + (w * t if w != 1.0 else t)
    return out


class ParallelModule(nn.Module):
    """Finite twin of :class:`Parallel`: outputs of the branches summed, concatenated or multiplied."""

    def __init__(self, branches: list[nn.Module], join: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.join = join

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.join in ("sum", "prod"):
            widths = sorted({o.shape[-1] for o in outs})
            if len(widths) > 1:   # a deferred build learns the input width here; broadcasting would hide it
                raise ValueError(f"Branches joined by {self.join} need equal widths, got {widths}.")
            out = outs[0]
            for other in outs[1:]:
                out = out + other if self.join == "sum" else out * other
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
    """Run branches on the same input and join them: ``K = Σ_b K_b`` (``"sum"``),
    ``K = Σ_b n_b K_b / Σ_b n_b`` (``"concat"``), likewise ``Θ``, or ``K = Π_b K_b`` (``"prod"``);
    see :class:`Parallel` (neural-tangents' ``stax.parallel`` with ``FanInSum``, ``FanInConcat``,
    ``FanInProd``; Novak et al. 2020)."""
    return Parallel(*branches, join=join)


def residual(*layers: Layer) -> Parallel:
    """A residual block ``x + f(x)`` with ``f = serial(*layers)``: ``K = K_x + K_f + μ_x μ_f' + μ_f μ_x'``,
    ``Θ = Θ_x + Θ_f`` (He et al. 2016; neural-tangents' kernel when ``f`` ends in a Dense layer, whose
    mean ``μ_f`` is zero). ``f`` must contain a Dense layer of its own, so the two branches are
    independent; it may end in an activation (``x + φ(D(x))``). After a Dense layer and with ``f``
    ending in one the sum is Gaussian; otherwise it is not, and the next layer must be a Dense or a
    LayerNorm; on the raw inputs it is refused (:class:`Parallel`)."""
    if not layers:   # Serial's own message named serial(), which the caller never wrote
        raise ValueError("residual() needs at least one layer.")
    return Parallel(Identity(), Serial(*layers), join="sum")


def repeat(layer: Layer, n: int) -> Serial:
    """``layer`` applied ``n`` times, ``K ← f^n(K)``: shared hyperparameters, independent finite
    weights (neural-tangents' ``stax.repeat``, Novak et al. 2020, ICLR, arXiv:1912.02803)."""
    n = integer_at_least(n, 1, "repeat() count")
    return Serial(*([layer] * n))
