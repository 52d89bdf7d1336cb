"""The kernel state that flows through the layers of an infinitely wide network.

Every layer of a fully connected network maps the NNGP kernel ``K`` and the NTK ``Θ`` of its
input to those of its output, and each map is *elementwise in the pair of points* once the
variances ``K(x, x)`` of both points are known. So the state carries, for input sets ``x1``
(``n1`` points) and ``x2`` (``n2`` points):

* ``nngp``: ``K(x1_i, x2_j)``, ``(*batch, n1, n2)``, or ``(*batch, n)`` in diagonal mode,
* ``ntk``: ``Θ(x1_i, x2_j)`` of the same shape, or ``None`` when only the NNGP is wanted,
* ``cov1``: ``K(x1_i, x1_i)``, ``(*batch, n1)``; ``cov2``: ``K(x2_j, x2_j)``, ``(*batch, n2)``,
* ``width``: the channel count of the finite twin here (the standard parameterization's NTK
  depends on it),
* ``is_gaussian``: whether the features are i.i.d. centred Gaussians with covariance ``nngp``
  (true after a ``Dense`` layer; the closed forms of activations need it),
* ``mean``: ``None`` when every feature has mean zero (after a ``Dense`` layer); after an
  activation, a function giving the features' mean ``E[φ(u)]`` at each point, which the kernel
  of a sum of branches and ``LayerNorm`` need,
* ``centred``: with a ``mean``, a function giving the kernels of the features minus their mean,
  which ``LayerNorm`` normalizes (``None`` where the mean is not known).

Before the first layer the state holds the raw inputs instead, so that a ``Dense`` layer can
form its (optionally per-feature weighted) input kernel itself.

Diagonal mode (``diag=True``) pairs ``x1_i`` with ``x2_i`` and never forms a matrix: its cost
is ``O(n · depth)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Generic, cast

import torch
from torch import Tensor
from typing_extensions import TypeVar  # default= (PEP 696) before Python 3.13

from ntkgp.layers.numerics import is_vmapped, needs_graph, straight_through, transforms_active
from ntkgp.layers.validation import broadcast_shapes

if TYPE_CHECKING:
    from ntkgp.layers.near import PairCarry

#: Entries per block of rows when :func:`_row_keys` widens bit patterns to int64.
_KEY_BLOCK_ENTRIES = 1 << 19   # a 4 MiB int64 block: few iterations (kernel launches on a GPU), bounded memory
#: Row × column comparisons per chunk of :meth:`Duplicates.pairs`.
_PAIR_BLOCK_ENTRIES = 1 << 20


def _collapse_expanded(x: Tensor) -> Tensor:
    """``x`` with every batch axis of stride 0 (an ``expand``) cut to size 1."""
    for dim in range(x.dim() - 2):
        if x.stride(dim) == 0 and x.shape[dim] > 1:
            x = x.narrow(dim, 0, 1)
    return x


def _row_keys(x: Tensor) -> Tensor:
    """The wrapping integer sum of each row's bit patterns: equal rows, equal keys.

    ``−0.0`` is keyed as ``0.0`` (``+ 0.0`` maps it there): the two are equal points with different
    bits (``torch.round(-0.3)`` gives ``−0.0``), and keyed apart they escaped the screen, and with
    it the exact diagonal (a depth-10 Sign network gave 0.19 for a pair whose value is 2.0).
    Summed in int64 a block of rows at a time: ``sum(dtype=torch.int64)`` of the whole tensor first
    casts all of it, twice the size of float32 inputs in temporaries (2.2 GiB for 1.1 GiB of
    inputs), just to screen for duplicates.
    """
    flat = x.reshape(-1, x.shape[-1])
    bits_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    keys = torch.empty(flat.shape[0], dtype=torch.int64, device=x.device)
    rows = max(1, _KEY_BLOCK_ENTRIES // max(flat.shape[-1], 1))
    for start in range(0, flat.shape[0], rows):
        bits = (flat[start:start + rows] + 0.0).view(bits_dtype)
        torch.sum(bits, -1, dtype=torch.int64, out=keys[start:start + rows])
    return keys.reshape(x.shape[:-1])


@dataclass(frozen=True)
class Duplicates:
    """Bitwise-equal input points, in the coordinates of one (block of a) kernel matrix.

    ``cov2[col_members] := cov2[col_reps]``, ``cov1[row_members] := cov2[row_reps]`` and, for
    each pair of a row and a column of one point, ``nngp[row, col] := cov2[rep]`` make every pair
    of equal points exactly a point with itself (see :meth:`KernelState.with_exact_diagonal`).
    """

    col_members: Tensor
    col_reps: Tensor
    row_members: Tensor
    row_reps: Tensor
    listed: tuple[Tensor, Tensor, Tensor] | None   # the pairs, where they fit in one chunk

    @staticmethod
    def point_ids(x1: Tensor, x2: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Ids of the rows of ``(*batch, n, d)`` inputs, ``(*batch, n)``, equal exactly for equal
        points (``None`` if no batch repeats a point).

        Batch axes of stride 0 (GPyTorch expands the training inputs over a candidate batch) are
        screened once, not once per batch.
        """
        if is_vmapped(x1) or (x2 is not None and is_vmapped(x2)):
            return None   # per-sample values under vmap: not screened
        x1 = _collapse_expanded(x1).detach()
        x2 = None if x2 is None else _collapse_expanded(x2).detach()
        d = x1.shape[-1]
        # a cheap exact screen first: the wrapping integer sum of a row's bit patterns does not
        # depend on the summation order, so equal rows have equal keys
        keys1 = _row_keys(x1)
        if x2 is None:
            keys = keys1
        else:
            keys2 = _row_keys(x2)
            batch = broadcast_shapes(keys1.shape[:-1], keys2.shape[:-1])
            keys = torch.cat([keys1.expand(*batch, keys1.shape[-1]), keys2.expand(*batch, keys2.shape[-1])], -1)
        if keys.shape[-1] < 2:
            return None
        ordered = keys.sort(-1).values
        if not bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            return None
        both = x1.reshape(-1, d) if x2 is None else torch.cat([x1.reshape(-1, d), x2.reshape(-1, d)])
        _, ids = torch.unique(both, dim=0, return_inverse=True)
        n1 = x1.shape[:-1].numel()
        ids1 = ids[:n1].reshape(x1.shape[:-1])
        return ids1, (ids1 if x2 is None else ids[n1:].reshape(x2.shape[:-1]))

    @classmethod
    def of(cls, rows: Tensor, cols: Tensor, symmetric: bool) -> Duplicates | BatchedDuplicates | None:
        """The duplicates among rows with ids ``rows`` and columns with ids ``cols`` (in a
        symmetric block the rows are the first columns)."""
        if rows.dim() > 1 or cols.dim() > 1:
            if rows.shape[:-1].numel() > 1 or cols.shape[:-1].numel() > 1:
                return BatchedDuplicates.of(rows, cols, symmetric)
            rows, cols = rows.reshape(-1), cols.reshape(-1)   # one batch: the same points everywhere
        groups = int(torch.maximum(rows.max(), cols.max())) + 1 if rows.numel() and cols.numel() else 0
        if groups == 0:
            return None
        in_rows = torch.zeros(groups, dtype=torch.bool, device=rows.device)
        in_rows[rows] = True
        count = torch.bincount(cols, minlength=groups)
        shared = in_rows & (count >= (2 if symmetric else 1))
        if not bool(shared.any()):
            return None
        positions = torch.arange(cols.numel(), device=cols.device)
        rep = torch.full((groups,), cols.numel(), dtype=torch.long, device=cols.device)
        rep = rep.scatter_reduce(0, cols, positions, "amin")
        col_members = torch.nonzero(shared[cols]).flatten()
        row_members = torch.nonzero(shared[rows]).flatten()
        members = (col_members, rep[cols[col_members]], row_members, rep[rows[row_members]])
        # a row block's pairs fit in one chunk (a block has at most 2^19 entries): listed once for all
        # its layers; a large whole kernel's are found a chunk at a time, when they are used
        small = row_members.numel() * col_members.numel() <= _PAIR_BLOCK_ENTRIES
        return cls(*members, listed=next(_pair_chunks(*members)) if small else None)

    def pairs(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(rows, cols, reps)`` of the pairs of equal points, a chunk of rows at a time.

        Listed whole, the pairs of a large kernel cost 24 bytes each: 4000 equal points held 16
        million of them, +530 MiB, twice the kernel's own peak without autograd."""
        if self.listed is not None:
            yield self.listed
        else:
            yield from _pair_chunks(self.col_members, self.col_reps, self.row_members, self.row_reps)

    def apply(self, state: KernelState) -> KernelState:
        """``state`` with equal points given the variance of one of them, their pairs exactly that
        (values only: in the inputs, derivatives stay those of the formulas, :func:`_values_only`)."""
        return _values_only(self._apply, state)

    def canonical(self, state: KernelState) -> KernelState:
        """A finished symmetric kernel whose equal points' entries (variance, diagonal, pairs; NNGP
        and NTK) are bitwise those of the first point of their group.

        :meth:`apply` makes every pair exact after each layer, but an elementwise map can still
        round a point's own diagonal an ulp away from its twin's: torch computes the tail of a
        tensor with scalar code and the rest vectorized, and separate row blocks see separate
        tensors.
        """
        return _values_only(self._canonical, state)

    def _apply(self, state: KernelState) -> KernelState:
        cov2 = state.cov2.clone()
        cov2[..., self.col_members] = cov2[..., self.col_reps]
        if state.symmetric:
            cov1 = cov2 if state.cov2 is state.cov1 else state.cov1   # re-derived from cov2 next
        else:
            # cov1 may lack batch axes that cov2 has (x1 unbatched against an expanded x2 batch)
            shape1 = broadcast_shapes(state.cov1.shape, (*cov2.shape[:-1], state.cov1.shape[-1]))
            cov1 = state.cov1.expand(shape1).clone()
            cov1[..., self.row_members] = cov2[..., self.row_reps]
        nngp = state.nngp
        for rows, cols, reps in self.pairs():
            nngp[..., rows, cols] = cov2[..., reps].expand(*nngp.shape[:-2], reps.numel())
        return state.replace(nngp=nngp, cov1=cov1, cov2=cov2)

    def _canonical(self, state: KernelState) -> KernelState:
        cov = state.cov1.clone()
        cov[..., self.col_members] = cov[..., self.col_reps]
        nngp, ntk = state.nngp, state.ntk
        batch = nngp.shape[:-2]
        for rows, cols, reps in self.pairs():   # a representative's own entries are never changed
            if ntk is not None:
                ntk[..., rows, cols] = ntk[..., reps, reps].expand(*batch, reps.numel())
            nngp[..., rows, cols] = cov[..., reps].expand(*batch, reps.numel())
        return state.replace(nngp=nngp, ntk=ntk, cov1=cov, cov2=cov)


def _pair_chunks(col_members: Tensor, col_reps: Tensor, row_members: Tensor,
                 row_reps: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The pairs of rows and columns of one point, ``_PAIR_BLOCK_ENTRIES`` comparisons at a time."""
    rows = max(1, _PAIR_BLOCK_ENTRIES // max(col_reps.numel(), 1))
    for start in range(0, max(row_reps.numel(), 1), rows):
        reps = row_reps[start:start + rows]
        r, c = torch.nonzero(reps.unsqueeze(-1) == col_reps, as_tuple=True)
        yield row_members[start + r], col_members[c], reps[r]


@dataclass(frozen=True)
class BatchedDuplicates:
    """Bitwise-equal input points of batched inputs ``(*batch, n, d)``.

    Which points repeat differs from batch to batch (a BoTorch candidate batch, each with its own
    candidate that may sit on a training point), so masks take the place of
    :class:`Duplicates`' index lists: ``same[..., i, j]`` says row ``i`` and column ``j`` are one
    point, ``col_reps[..., j]`` is the first column of column ``j``'s point, ``row_reps[..., i]``
    a column of row ``i``'s point where ``row_shared[..., i]``.
    """

    same: Tensor
    col_reps: Tensor
    row_reps: Tensor
    row_shared: Tensor

    @classmethod
    def of(cls, rows: Tensor, cols: Tensor, symmetric: bool) -> BatchedDuplicates | None:
        """The duplicates among rows with ids ``rows`` (``(*batch, n1)``) and columns with ids
        ``cols`` (``(*batch, n2)``); in a symmetric block the rows are the first columns."""
        if rows.shape[-1] == 0 or cols.shape[-1] == 0:
            return None
        same = rows.unsqueeze(-1) == cols.unsqueeze(-2)
        if symmetric:  # every row meets itself: only other pairs count
            n1, n2 = same.shape[-2:]
            own = torch.eye(n1, n2, dtype=torch.bool, device=same.device)
            if not bool((same & ~own).any()):
                return None
        elif not bool(same.any()):
            return None
        # first column of each point: sort the ids (stably), mark where a group starts, carry the
        # start forward, map back (O(n log n), not an n × n comparison per block)
        n2 = cols.shape[-1]
        order = torch.argsort(cols, dim=-1, stable=True)
        ordered = cols.gather(-1, order)
        starts = torch.ones_like(ordered, dtype=torch.bool)
        starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
        positions = torch.arange(n2, device=cols.device).expand_as(order)
        first = order.gather(-1, torch.where(starts, positions, 0).cummax(-1).values)
        col_reps = torch.empty_like(order).scatter_(-1, order, first)
        # a column of each row's point, where there is one
        batch = broadcast_shapes(rows.shape[:-1], cols.shape[:-1])
        ordered_b = ordered.expand(*batch, n2).contiguous()
        rows_b = rows.expand(*batch, rows.shape[-1]).contiguous()
        index = torch.searchsorted(ordered_b, rows_b).clamp(max=n2 - 1)
        found = ordered_b.gather(-1, index) == rows_b
        return cls(same, col_reps, first.expand(*batch, n2).gather(-1, index), found)

    def apply(self, state: KernelState) -> KernelState:
        """As :meth:`Duplicates.apply`, for batched inputs."""
        return _values_only(self._apply, state)

    def canonical(self, state: KernelState) -> KernelState:
        """As :meth:`Duplicates.canonical`, for batched inputs."""
        return _values_only(self._canonical, state)

    def _apply(self, state: KernelState) -> KernelState:
        shape2 = broadcast_shapes(state.cov2.shape, self.col_reps.shape)
        cov2 = state.cov2.expand(shape2).gather(-1, self.col_reps.expand(shape2))
        if state.symmetric:
            cov1 = cov2 if state.cov2 is state.cov1 else state.cov1   # re-derived from cov2 next
        else:
            shape1 = broadcast_shapes(state.cov1.shape, self.row_reps.shape, (*shape2[:-1], 1))
            from_cols = cov2.expand(*shape1[:-1], cov2.shape[-1]).gather(-1, self.row_reps.expand(shape1))
            cov1 = torch.where(self.row_shared, from_cols, state.cov1)
        nngp = torch.where(self.same, cov2.unsqueeze(-2), state.nngp)
        return state.replace(nngp=nngp, cov1=cov1, cov2=cov2)

    def _canonical(self, state: KernelState) -> KernelState:
        shape = broadcast_shapes(state.cov1.shape, self.col_reps.shape)
        reps = self.col_reps.expand(shape)
        cov = state.cov1.expand(shape).gather(-1, reps)
        ntk = state.ntk
        if ntk is not None:
            own = ntk.diagonal(dim1=-2, dim2=-1)
            ntk = torch.where(self.same, own.expand(shape).gather(-1, reps).unsqueeze(-2), ntk)
        return state.replace(nngp=torch.where(self.same, cov.unsqueeze(-2), state.nngp), ntk=ntk, cov1=cov, cov2=cov)


@dataclass(frozen=True)
class DiagonalDuplicates:
    """Pairs ``(x1_i, x2_i)`` of ``diag=True`` with a second input set whose two points are bitwise
    equal (``same``, ``(*batch, n)``): :meth:`apply` makes each such pair exactly a point with itself
    after every layer, as :class:`Duplicates` does for the pairs of a matrix, so that ``diag=True``
    gives the diagonal of the full kernel. Without it a pair a layer rounds an ulp off ``ρ = 1``
    (``LayerNorm``'s ``k12`` and ``k11``, a smooth activation's pair formula and its variance) met a
    later kinked activation at ``θ ~ sqrt(ulp)``: a ``GELU`` then ``Sign`` network's NNGP was 1.4 %
    off the diagonal of the full kernel in float32."""

    same: Tensor

    @classmethod
    def of(cls, x1: Tensor, x2: Tensor) -> DiagonalDuplicates | None:
        """The equal pairs of ``(*batch, n, d)`` inputs ``x1`` and ``x2`` (``None`` if there are none,
        and under ``vmap``, whose values are per sample)."""
        if is_vmapped(x1) or is_vmapped(x2) or x1.shape[-1] == 0:
            return None
        same = (x1.detach() == x2.detach()).all(-1)   # −0.0 == 0.0, as the Gram matrix sees them
        return cls(same) if bool(same.any()) else None

    def apply(self, state: KernelState) -> KernelState:
        """``state`` with each equal pair's second variance and kernel the first variance (values
        only: in the inputs, derivatives stay those of the formulas, :func:`_values_only`)."""
        return _values_only(self._apply, state)

    def _apply(self, state: KernelState) -> KernelState:
        return state.replace(nngp=torch.where(self.same, state.cov1, state.nngp),
                             cov2=torch.where(self.same, state.cov1, state.cov2))


def _values_only(fix, state: KernelState) -> KernelState:
    """``fix(state)``, which substitutes values (in place on ``nngp``/``ntk`` where it can), with
    the derivatives of ``state``'s own formulas when derivatives are being taken in the inputs.

    With fixed inputs (derivatives in the hyperparameters alone) the substituted values keep their
    own derivatives: a pair of equal points is, as a function of the hyperparameters, exactly the
    point with itself, to every order, and the pair formulas' derivatives are not well conditioned
    there. Their three partial derivatives in ``(k11, k12, k22)`` are each ``O(k^{1/2})`` (GELU) or
    cancel by ``O(k)`` (erf, Sin, Rbf) and sum to the variance's derivative only in exact
    arithmetic: with a duplicated point, float32 variance gradients were 0.4–13 % off at input
    scale 1e3 (erf, Sin, Rbf, Gaussian) and up to several times the gradient at 1e4; GELU's 3–11 %
    at 1e7, ~1e4 times at 1e12 and NaN at depth 10 from 1e13. In the inputs the derivative of
    ``K(x, y)`` at ``y = x`` differs from the
    point's own (its second derivatives ``∂²K/∂x∂y`` need the pair formula), so there they stay
    the formulas'."""
    tensors = [t for t in (state.nngp, state.ntk, state.cov1, state.cov2) if t is not None]
    if not needs_graph(*tensors):
        return fix(state)
    if state.fixed_inputs and not transforms_active():
        # clones: fix writes in place, and autograd records writes into a clone
        return fix(state.replace(nngp=state.nngp.clone(), ntk=None if state.ntk is None else state.ntk.clone()))
    cov1 = state.cov1.detach()
    fixed = fix(state.replace(nngp=state.nngp.detach().clone(),
                              ntk=None if state.ntk is None else state.ntk.detach().clone(), cov1=cov1,
                              cov2=cov1 if state.cov2 is state.cov1 else state.cov2.detach()))
    cov2 = straight_through(state.cov2, fixed.cov2)
    cov1 = cov2 if fixed.cov1 is fixed.cov2 else straight_through(state.cov1, fixed.cov1)
    ntk = None if state.ntk is None else straight_through(state.ntk, fixed.ntk)
    return state.replace(nngp=straight_through(state.nngp, fixed.nngp), ntk=ntk, cov1=cov1, cov2=cov2)


def _once(function: Callable[[], Any] | None) -> _Once | None:
    """``function`` computed at most once (a ``KernelState``'s ``mean`` and ``centred``)."""
    return function if function is None or isinstance(function, _Once) else _Once(function)


class _Once:
    """A :attr:`KernelState.mean` or ``centred`` function evaluated at most once, then dropped with
    the intermediates its closure holds (so that an evaluated one pickles: its value alone). Each
    consumer used to call it again, and a consumer's own function calls its branches': a
    concatenation of two branches that share their input (``parallel(Identity(), Identity(),
    join="concat")``, repeated ``L`` times, then a ``LayerNorm``) evaluated the first mean ``2^L``
    times (9 s at ``L = 12`` on 6 points)."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function: Callable[[], Any] | None = function
        self.value: Any = None

    def __call__(self) -> Any:
        if self.function is not None:
            self.value, self.function = self.function(), None
        return self.value


#: The type of :attr:`KernelState.ntk` (and :attr:`ntkgp.finite.KernelEstimate.ntk`): ``Tensor`` in
#: what ``kernel(..., ntk=True)`` returns, ``None`` with ``ntk=False`` (``KernelState[Tensor]``,
#: ``KernelState[None]`` to type checkers).
_NTK = TypeVar("_NTK", bound=Tensor | None, covariant=True, default=Tensor | None)


@dataclass(frozen=True)
class KernelState(Generic[_NTK]):
    """NNGP and NTK kernels of two input sets at one point of a network.

    Attributes:
        nngp: ``K(x1_i, x2_j)``: ``(*batch, n1, n2)``, or ``(*batch, n)`` when ``diag``.
        ntk: ``Θ(x1_i, x2_j)`` with the same shape, or ``None`` if it was not requested: type
            checkers read ``Layer.kernel(...)`` as ``KernelState[Tensor]``, and as
            ``KernelState[None]`` with ``ntk=False``.
        cov1: ``K(x1_i, x1_i)``, ``(*batch, n1)``.
        cov2: ``K(x2_j, x2_j)``, ``(*batch, n2)``; the very tensor ``cov1`` when the two sets
            are one and no row block is cut out.
        width: channel count of the finite-width twin at this point.
        diag: whether ``nngp``/``ntk`` hold only the pairs ``(x1_i, x2_i)``.
        symmetric: whether ``x2`` is ``x1`` (``x1`` may then be a block of rows of it).
        is_gaussian: whether features are centred Gaussians with covariance ``nngp``.
        mean: ``None`` when every feature has mean zero (after a ``Dense`` layer, and wherever
            the features are centred Gaussians). Otherwise (after an activation) a function of
            no arguments returning ``(m1, m2, uniform)``: the features' mean averaged over the
            features, ``μ(x) = E[φ(u)]`` at ``x1`` (``(*batch, n1)``) and at ``x2``, and whether
            every feature has that mean (``False`` after a concatenation of branches with
            different means); or returning ``None`` where the mean is not known. Computed only
            when asked for.
        centred: with a ``mean``, a function of no arguments returning ``(C, c1, c2)``: ``nngp``,
            ``cov1`` and ``cov2`` of the features minus their averaged mean,
            ``C = E[(φ(u) − μ1)(φ(v) − μ2)]`` (what ``LayerNorm`` normalizes), or ``None`` where
            the mean is not known. Computed only when first asked for. Without a ``mean`` the centred
            kernels are the kernels themselves. Pickling a state (``torch.save``) calls ``mean`` and
            ``centred`` and saves what they return.
        identical: whether every feature has the same distribution (``False`` after a
            concatenation of branches, until a ``Dense`` layer), which a product of branches needs.
        x1: the first raw inputs, only before any layer consumed them.
        x2: the second raw inputs (the very ``x1`` when symmetric), likewise.
        sq_norms: optionally, precomputed ``Σ_j x_j²`` of ``x1`` and ``x2`` (saves recomputing
            them for every block of rows).
        row_offset: in symmetric mode, the column holding row 0's diagonal entry (non-zero when
            a block of rows is propagated on its own).
        duplicates: the bitwise-equal input points (:class:`Duplicates`; with ``diag`` and a second
            input set, :class:`DiagonalDuplicates`), whose pairs every layer keeps exactly a point
            paired with itself; ``None`` when there are none.
        fixed_inputs: whether no derivatives are taken in the inputs (neither requires grad, and no
            forward-mode or ``torch.func`` transform is active): the pairs of equal points then take
            the derivatives of the point's own variance, not of the pair formulas
            (:func:`_values_only`).
        carry: accurate ``k11 k22 − k12²`` and ``k11 + k22 − 2 k12`` of the nearly (anti)parallel pairs
            (:class:`~ntkgp.layers.near.PairCarry`), set by a first ``Dense`` layer and passed on only by
            the layers that map them (``Dense``, the ReLU family, ``Identity``): :meth:`replace` drops
            it unless it is passed, so no layer sees values of an earlier kernel.
        pair_carry: whether a first ``Dense`` layer looks for such pairs: ``False`` for networks
            without a layer that uses them (``Layer.carries_pairs``), which the screen over every pair
            slowed by 8 % (depth 3, 2000 points).
    """

    # nngp, cov1 and cov2 are None only in the state before the first layer (from_inputs), which
    # holds the raw inputs instead and which no caller of Layer.kernel sees
    nngp: Tensor
    ntk: _NTK
    cov1: Tensor
    cov2: Tensor
    width: int
    diag: bool = False
    symmetric: bool = False
    is_gaussian: bool = False
    mean: Callable[[], tuple[Tensor, Tensor, bool] | None] | None = None
    centred: Callable[[], tuple[Tensor, Tensor, Tensor] | None] | None = None
    identical: bool = True
    x1: Tensor | None = None
    x2: Tensor | None = None
    row_offset: int = 0
    sq_norms: tuple[Tensor, Tensor] | None = None
    duplicates: Duplicates | BatchedDuplicates | DiagonalDuplicates | None = None
    fixed_inputs: bool = False
    carry: PairCarry | None = None
    pair_carry: bool = True

    def __post_init__(self) -> None:
        for name in ("mean", "centred"):
            object.__setattr__(self, name, _once(getattr(self, name)))   # frozen: setattr is refused

    @classmethod
    def from_inputs(cls: type[KernelState], x1: Tensor, x2: Tensor | None = None, diag: bool = False,
                    want_ntk: bool = True, row_offset: int = 0, symmetric: bool | None = None,
                    sq_norms: tuple[Tensor, Tensor] | None = None,
                    duplicates: Duplicates | BatchedDuplicates | DiagonalDuplicates | None = None,
                    pair_carry: bool = True) -> KernelState:
        """The state before the first layer.

        ``x2=None`` means "the same points as ``x1``". A block of rows of a symmetric kernel is
        ``x1`` = the block, ``x2`` = the columns, ``symmetric=True`` and ``row_offset`` = the
        column of the block's first diagonal entry. ``pair_carry``: whether a layer of the network
        uses a :attr:`carry` (without one, a first ``Dense`` layer does not look for nearly parallel
        pairs).
        """
        if symmetric is None:
            symmetric = x2 is None
        none = cast(Tensor, None)   # no kernels yet: x1 and x2 stand for them
        return cls(nngp=none, ntk=x1.new_zeros(()) if want_ntk else None, cov1=none, cov2=none,
                   width=x1.shape[-1], diag=diag, symmetric=symmetric, x1=x1,
                   x2=x1 if x2 is None else x2, row_offset=row_offset, sq_norms=sq_norms, duplicates=duplicates,
                   fixed_inputs=inputs_fixed(x1, x2), pair_carry=pair_carry)

    @property
    def is_input(self) -> bool:
        """True before any layer has consumed the raw inputs."""
        return self.x1 is not None

    def replace(self, **changes: Any) -> KernelState:
        """A copy with some fields changed (``dataclasses.replace``'s result, without its generic
        rebuild: every layer makes several per call, which in a depth-1000 network on a few points
        took ~15 % of the time)."""
        unknown = changes.keys() - _STATE_FIELDS
        if self.carry is not None and "carry" not in changes:   # the carried pairs' values are this kernel's
            changes["carry"] = None
        if unknown or type(self) is not KernelState:   # its errors, or a subclass's own __init__
            return replace(self, **changes)
        new = object.__new__(KernelState)
        values = new.__dict__
        values.update(self.__dict__)
        values.update(changes)
        for name in ("mean", "centred"):   # as __post_init__ wraps them
            values[name] = _once(values[name])
        return new

    def __getstate__(self) -> dict[str, Any]:
        # pickle and torch.save refused every state after an activation ("Can't pickle local object
        # 'Activation.kernel_map.<locals>.mean'"): mean and centred are closures over the layers'
        # intermediates, so they are saved as what they return, computed now (centred: three more
        # kernels' worth, as LayerNorm would compute)
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("mean", "centred"):
            if state[name] is not None:
                state[name]()   # evaluated: the _Once keeps the value and drops the closure
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():   # frozen: setattr is refused
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ input kernel
    def input_gram(self, feature_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Unnormalized input Gram ``G = Σ_j w_j x1_j x2_j`` and squared norms ``Σ_j w_j x_j²``.

        ``G`` is ``(*batch, n1, n2)`` (pairs ``(*batch, n)`` in diagonal mode; then, when
        symmetric, the very tensor of the first norms). The second norms are the very tensor of
        the first when ``x2`` is ``x1``. ``w_j = 1`` unless ``feature_weights`` (``(*batch, d)``)
        are given.
        """
        if not self.is_input:
            raise RuntimeError("input_gram() is only defined before the first layer.")
        x1, x2 = self.x1, self.x2
        assert x1 is not None and x2 is not None   # is_input: from_inputs kept both
        if feature_weights is None:
            if self.sq_norms is not None:
                g1, g2 = self.sq_norms
            else:
                g1 = torch.einsum("...nd,...nd->...n", x1, x1)
                g2 = g1 if x2 is x1 else torch.einsum("...nd,...nd->...n", x2, x2)
            weighted1 = x1
        else:
            weighted1 = x1 * feature_weights.unsqueeze(-2)
            g1 = torch.einsum("...nd,...nd->...n", weighted1, x1)
            g2 = g1 if x2 is x1 else torch.einsum("...nd,...nd->...n", x2 * feature_weights.unsqueeze(-2), x2)
        if self.diag:
            gram = g1 if self.symmetric else torch.einsum("...nd,...nd->...n", weighted1, x2)
        else:
            gram = weighted1 @ x2.mT
        return gram, g1, g2

    def input_kernel(self) -> KernelState:
        """The input kernel ``K⁰(x, x') = x·x' / d`` with ``Θ⁰ = 0``.

        ``Θ⁰`` stays the 0-dim zero the input state carries (or ``None`` when no NTK is wanted):
        layers broadcast it.
        """
        gram, g1, g2 = self.input_gram()
        d = self.width
        nngp = gram / d
        cov1 = nngp if gram is g1 else g1 / d
        cov2 = cov1 if g2 is g1 else g2 / d
        state = KernelState(nngp=nngp, ntk=self.ntk, cov1=cov1, cov2=cov2, width=d, diag=self.diag,
                            symmetric=self.symmetric, row_offset=self.row_offset, duplicates=self.duplicates,
                            fixed_inputs=self.fixed_inputs)
        return state.with_exact_diagonal()

    def materialize(self) -> KernelState:
        """This state with kernels (forms the input kernel if it still holds raw inputs)."""
        return self.input_kernel() if self.is_input else self

    # ------------------------------------------------------------------ broadcasting
    @property
    def k11(self) -> Tensor:
        """``K(x1_i, x1_i)`` broadcastable against ``nngp``."""
        return self.cov1 if self.diag else self.cov1.unsqueeze(-1)

    @property
    def k22(self) -> Tensor:
        """``K(x2_j, x2_j)`` broadcastable against ``nngp``."""
        return self.cov2 if self.diag else self.cov2.unsqueeze(-2)

    def map_covs(self, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Apply ``fn`` to ``cov1`` and ``cov2``, once when they are the same tensor."""
        cov1 = fn(self.cov1)
        return cov1, cov1 if self.cov2 is self.cov1 else fn(self.cov2)

    # ------------------------------------------------------------------ exactness
    def with_exact_diagonal(self) -> KernelState:
        """Make the diagonal of a symmetric kernel bit-identical to ``cov1``, and likewise every
        pair of equal input points (:class:`Duplicates`).

        Where a point meets itself, ``K11·K22 − K12² = 0`` must hold exactly; otherwise a
        rounding error of ``1e-16`` becomes a square-root term of ``1e-8`` in the next
        ReLU-type layer. Diagonal-mode values and the diagonal of the matrix then agree.
        """
        exact = self._exact_pairs()
        # the carried pairs are neither self pairs nor pairs of equal points: their values stand
        return exact if self.carry is None or exact is self else exact.replace(carry=self.carry)

    def _exact_pairs(self) -> KernelState:
        if self.nngp is None:
            return self
        if self.diag:   # only a second input set's pairs of equal points (DiagonalDuplicates) need it
            return self if self.duplicates is None or self.symmetric else self.duplicates.apply(self)
        state = self if self.duplicates is None else self.duplicates.apply(self)
        if not state.symmetric:
            return state
        return state._exact_self_pairs()

    def _exact_self_pairs(self) -> KernelState:
        n_rows = self.nngp.shape[-2]
        cols = slice(self.row_offset, self.row_offset + n_rows)
        cov1 = self.cov1 if self.cov2 is self.cov1 else self.cov2[..., cols]
        return self.replace(nngp=with_self_pairs(self, self.nngp, cov1), cov1=cov1)


#: The fields of :class:`KernelState`, which :meth:`KernelState.replace` may change.
_STATE_FIELDS = frozenset(f.name for f in fields(KernelState))


def inputs_fixed(x1: Tensor, x2: Tensor | None = None) -> bool:
    """Whether no derivatives are taken in the inputs: neither requires grad and no forward-mode or
    ``torch.func`` transform is active (:attr:`KernelState.fixed_inputs`)."""
    return not (x1.requires_grad or (x2 is not None and x2.requires_grad) or transforms_active())


def with_twin_derivatives(state: KernelState, matrix: Tensor, variance_map: Callable[[Tensor], Tensor]) -> Tensor:
    """``matrix``, an activation's map of the cross kernel ``state.nngp`` (``Ṫ``), whose entries between
    equal points take the derivatives of ``variance_map`` (its self-pair form, ``dot_variance``) at
    that entry, their values unchanged; ``matrix`` itself unless derivatives are taken in the
    hyperparameters alone with equal points present (:func:`_values_only`).

    With fixed inputs such an entry is, as a function of the hyperparameters, the point's own
    ``Ṫ(k, k, k)``, and the pair formula's partial derivatives cancel there (erf's NTK gradient
    7 % off in float32 at input scale 1e3). A symmetric kernel needs none of this: its twins' entries
    take their representative's diagonal at the end (:meth:`Duplicates.canonical`).
    """
    duplicates = state.duplicates
    if (duplicates is None or not state.fixed_inputs or transforms_active()
            or not needs_graph(matrix, state.nngp)):
        return matrix
    # the map at the twins' entries alone: over the whole matrix (where elsewhere) its graph held ~4
    # matrices per activation layer, +27 % saved for backward (cross kernel of 1000 points, 3 layers)
    if isinstance(duplicates, Duplicates):
        out = matrix.clone()
        for rows, cols, _ in duplicates.pairs():
            own = variance_map(state.nngp[..., rows, cols])
            out[..., rows, cols] = straight_through(own, matrix[..., rows, cols])
        return out
    shape = broadcast_shapes(matrix.shape, duplicates.same.shape)
    twins = duplicates.same.expand(shape)
    out = matrix.expand(shape).clone()
    out[twins] = straight_through(variance_map(state.nngp.expand(shape)[twins]), matrix.expand(shape)[twins])
    return out


def with_self_pairs(state: KernelState, matrix: Tensor, diagonal: Tensor) -> Tensor:
    """``matrix``, a map of the symmetric kernel ``state.nngp`` (``(*batch, n_rows, n_cols)``, rows a
    block from ``state.row_offset``), with the entry of every point with itself set to ``diagonal``
    (``(*batch, n_rows)``), as :meth:`KernelState.with_exact_diagonal` sets the NNGP's: in place
    unless derivatives are being taken.

    Pairs of equal points (:class:`Duplicates`) keep the formula's values until
    :meth:`Duplicates.canonical` copies the diagonal onto them, and, where derivatives are taken in
    the inputs, its derivatives throughout: the derivative of ``K(x, y)`` in ``x`` at ``x = y`` is
    not that of a point with itself (with fixed inputs they take the diagonal's, :func:`_values_only`).
    """
    cols = slice(state.row_offset, state.row_offset + matrix.shape[-2])
    diagonal = diagonal.expand(matrix.shape[:-1])
    if needs_graph(matrix, diagonal):
        # the self pairs are the diagonal at offset row_offset: one copy of the matrix (a scatter into the
        # block's square and a cat of the three column ranges made two, the same values)
        return torch.diagonal_scatter(matrix, diagonal, cols.start, -2, -1)
    matrix[..., :, cols].diagonal(dim1=-2, dim2=-1).copy_(diagonal)
    return matrix
