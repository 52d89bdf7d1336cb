"""Nearly parallel and nearly antiparallel pairs, carried accurately from the inputs.

The ReLU family's kernels take the angle ``θ`` between two Gaussians from ``s² = k11 k22 − k12²``.
Recovered from the rounded kernels this is a cancellation where ``1 − |ρ|`` is small: ``s²`` is then
known to ``ε k²`` absolute only, ``θ`` to ``ε/θ`` absolute, and ``Ṫ = (π − θ)/(2π)`` (and every NTK
after it) is ``ε/θ`` off (float32 ReLU NTKs of nearly parallel inputs were hundreds to 1e4 ulps off).
The inputs, exact floats, fix ``θ`` to ``~ε``: so for the pairs a first ``Dense`` layer finds with
``1 − |ρ| < NEAR`` a :class:`PairCarry` keeps, per pair, ``det = k11 k22 − k12²`` and
``g = k11 + k22 − 2 k12 = E|u1 − u2|²`` computed without that cancellation:

* first ``Dense`` (``k = w x·x' + b``, ``w = σ_w²/d``): ``g = w |x − x'|²`` and
  ``det = w² |x|²|x'|² sin²α + w b |x − x'|²``, from the Gram entries where the inputs are not nearly
  parallel (:func:`first_layer_carry`), else by direct differences: ``|x|²|x'|² sin²α = |x|²|e|² sin²β``
  (the Gram determinant of ``x`` and ``e``, the same for every ``q``) with ``e = x' ∓ q·x``, ``q = 1`` where
  ``|x'|/|x| ∈ [1/2, 2]``, else the power of two nearest ``|x'|/|x|`` (``q x_i`` exact, each ``x'_i ∓ q x_i`` one
  rounding, ``ε`` of itself: exact by Sterbenz's lemma where the two are within a factor 2, as where ``x'_i`` is
  near ``±q x_i``; ``e`` is then ``ε|e| ≲ ε|x'|`` off, where ``e = x' ∓ x`` kept ``x``'s rounding
  where ``|x'| < |x|/2``, and the angle was up to ``ε |x|/|x'|`` off), and ``β`` the angle between ``x`` and
  ``e``, as ``|x|²|e|² − (x·e)²``, or where ``sin²β < 1/4`` by Kahan's ``sin β = |x̂ − ê| |x̂ + ê| / 2``
  (``x̂ = x/|x|``: ``2 sin(β/2) · 2 cos(β/2) / 2``, ``ε`` off absolutely); inputs at an angle below ``2ε`` (a rounded
  multiple ``fl(c·x)``) count as parallel, as the kernels' own angle counts them;
* later ``Dense`` (``k' = w k + b``): ``g' = w g``, ``det' = w² det + w b g``;
* ``ABReLU(a, b)`` (:func:`abrelu_carried`): ``T12 = ab k12 + (a − b)² p J(θ)/(2π)``, ``p = sqrt(k11 k22)``,
  ``J(θ) = sin θ + (π − θ) cos θ = S(π − θ)``, ``S(x) = sin x − x cos x``; with ``A = (a² + b²)/2``,
  ``det' = (A p − T12)(A p + T12)``, ``A p − T12 = ab (p − k12) + (a − b)² p (π − J)/(2π)``,
  ``A p + T12 = ab (p + k12) + (a − b)² p (π + J)/(2π)``, ``π − J = π (p − k12)/p − S(θ)`` (for
  ``ab < 0`` forms without cancellation, from ``A = −ab + (a + b)²/2``),
  ``g' = A (sqrt k11 − sqrt k22)² + 2 (A p − T12)``; ``p ∓ k12`` as ``det/(p ± k12)`` where it cancels.

``Sin``, ``Cos`` and ``Rbf`` take their gaps ``k11 + k22 ∓ 2k12`` from the carry (:func:`carried_gaps`)
and pass it on: ``Rbf`` as ``g' = −2 expm1(−γ g)``, ``det' = −expm1(−2γ g)`` (``T12 = e^{−γ g}``, ``T11 = T22 = 1``),
``Sin`` and ``Cos`` as sums of products of ``expm1`` of the two gaps (``Sin._carried_after``). ``Sign`` takes its
angle from the carried ``det`` and passes it on (:func:`sign_carried`).

Every other layer drops the carry (:meth:`KernelState.replace` does unless it is passed on), so a
later ReLU-type layer takes the kernels' own angle. Where the carried pairs are not near (any more)
the ReLU family's kernels keep every bit (a choice per pair, the same in every block of rows); ``Sign``,
``Sin``, ``Cos`` and ``Rbf`` take every carried pair from the carry, as accurate there as the kernels' own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ntkgp.layers.numerics import (
    _FLOAT_BITS,
    _is_compiling,
    clamp_passing,
    horner,
    needs_graph,
    power_of_2,
    product_range,
    safe_sqrt,
    transforms_active,
)

#: ``1 − |ρ|`` below which a pair's angle is carried (:func:`first_layer_carry`) and the carried values
#: are used (:func:`abrelu_carried`). The kernels' own angle is ``ε/θ`` off, ``θ ≈ sqrt(2(1 − |ρ|))``:
#: at 1e-2, 7ε at most where the carry stops, a few ulps of a float64 ReLU NTK.
NEAR = 1e-2

#: Gathered input entries per chunk of carried pairs (:func:`first_layer_carry`): 2 MiB in float64.
_CHUNK_ENTRIES = 1 << 18
#: Kernel entries per block of rows of the first layer's screen (:func:`_near`).
_SCREEN_ENTRIES = 1 << 15
#: The same on a GPU, where each block costs its kernel launches: the CPU's size screened a 40 000-point
#: kernel's GPU row blocks (``CUDA_BLOCK_ENTRIES``) one row at a time, 40 000 passes of three launches.
_CUDA_SCREEN_ENTRIES = 1 << 24

#: ``S(x) = sin x − x cos x`` by its series below this argument, where ``sin x − x cos x`` loses ``3/x²``
#: of its digits (10 ulps at 0.55). Above it only pairs that are not near (``1 − |ρ| > 0.045``) have their
#: smaller angle, and their ``S`` enters ``π − J`` beside ``π (1 − cos θ)``, 15 times larger there.
_S_SERIES_BELOW = 0.3
#: ``S(x)/x³ = Σ_{k≥1} (−1)^{k+1} 2k/(2k+1)! · x^{2(k−1)}``, as coefficients of ``x²``: 7 terms, the first
#: left off 2e-20 of the sum at ``x = 0.3``.
_S_TERMS = [(-1) ** (k + 1) * 2 * k / math.factorial(2 * k + 1) for k in range(1, 8)]


@dataclass(frozen=True)
class PairCarry:
    """Accurate ``det = k11 k22 − k12²`` and ``g = k11 + k22 − 2 k12`` of some pairs of a kernel.

    ``index``: ``(rows, cols)`` of the pairs in the matrix, or ``(positions,)`` in diagonal mode;
    ``det`` and ``g`` one value per pair, ``(m,)``.
    """

    index: tuple[Tensor, ...]
    det: Tensor
    g: Tensor

    def affine(self, weight_var: Tensor, bias_var: Tensor | None, cov1: Tensor, cov2: Tensor) -> PairCarry | None:
        """The carry through ``k' = w k + b``: ``det' = w² det + w b g``, ``g' = w g``, for the pairs whose
        new variances (``cov1``, ``cov2``) stay in :func:`representable`'s range (``None`` if none does)."""
        carry = self.within(cov1[self.index[0]], cov2[self.index[-1]])
        if carry is None:
            return None
        det = weight_var * weight_var * carry.det
        if bias_var is not None:
            det = det + weight_var * bias_var * carry.g
        return PairCarry(carry.index, det, weight_var * carry.g)

    def gathered(self, nngp: Tensor, cov1: Tensor, cov2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(k11, k12, k22)`` of the carried pairs."""
        first = self.index[0]
        second = self.index[-1]
        return cov1[first], nngp[self.index], cov2[second]

    def kept_pairs(self, nngp: Tensor, cov1: Tensor, cov2: Tensor, scale: float | None = None
                   ) -> tuple[PairCarry, Tensor, Tensor, Tensor] | None:
        """The carry of the pairs whose variances (and, with ``scale``, those times ``scale``: the variances
        after a layer that multiplies them by it) are :func:`representable`, with their :meth:`gathered`
        ``(k11, k12, k22)``; ``None`` if none is. What an activation reads of the carry before using it."""
        k11, k12, k22 = self.gathered(nngp, cov1, cov2)
        kept = self.within(k11, k22, *(() if scale is None else (scale * k11, scale * k22)))
        if kept is None:
            return None
        if kept is not self:
            k11, k12, k22 = kept.gathered(nngp, cov1, cov2)
        return kept, k11, k12, k22

    def within(self, *variances: Tensor) -> PairCarry | None:
        """The pairs whose ``variances`` (one value a pair each) are all :func:`representable`, or ``None``
        if none is. Dropped before any arithmetic, not masked after it: products of variances that
        overflow (a deep ReLU net of weight variance 4 doubles them each layer) gave NaN gradients through
        the masked entries (``0 · inf``)."""
        with torch.no_grad():
            keep = representable(*variances)
            if bool(keep.all()):
                return self
            if not bool(keep.any()):
                return None
        return PairCarry(tuple(i[keep] for i in self.index), self.det[keep], self.g[keep])


def representable(*variances: Tensor) -> Tensor:
    """Where every one of ``variances`` lies in :func:`~ntkgp.layers.numerics.product_range`, so that
    products of two of them and ``det ≤ k11 k22`` are normal numbers."""
    low, high = product_range(variances[0].dtype)
    first, *others = variances
    if others and all(v.shape == first.shape and v.dtype == first.dtype and v.device == first.device
                      for v in others):
        # one stack and one reduction, instead of five operations a variance: with the four of a ReLU
        # layer's pairs this screen was an eighth of the operations of a small kernel with carried pairs
        joined = torch.stack(variances).detach()
        return ((joined >= low) & (joined <= high)).all(0)
    keep = (first.detach() >= low) & (first.detach() <= high)   # the first one's mask, not an all-true start
    for v in others:
        keep &= (v.detach() >= low) & (v.detach() <= high)
    return keep


def carries(nngp: Tensor, diag: bool, symmetric: bool, *variances: Tensor | None) -> bool:
    """Whether a first ``Dense`` layer can carry pairs: an unbatched kernel of two sets (or a matrix),
    scalar variances, and no ``torch.compile`` or ``torch.func`` transform (the pairs are found by a
    data-dependent ``nonzero``)."""
    if diag and symmetric:
        return False
    if nngp.dim() != (1 if diag else 2) or any(v is not None and v.dim() for v in variances):
        return False
    return not (_is_compiling() or transforms_active())


def _near(k11: Tensor, k12: Tensor, k22: Tensor, self_pairs: int | None) -> Tensor:
    """``1 − |ρ| < NEAR``, as ``k12² − (1 − NEAR)² k11 k22 > 0``, a block of rows at a time in one small
    buffer: the screen runs on every first layer, and two fresh matrices of the kernel's size cost it as
    much again as its arithmetic (N = 1000, one thread). ``self_pairs``: in a symmetric matrix, the column
    of row 0's own entry; only the pairs above the diagonal are screened in (the diagonal would make every
    symmetric kernel gather them, and the entries below it are not kept)."""
    near = torch.empty(k12.shape, dtype=torch.bool, device=k12.device)
    rows = _screen_rows(k12)
    if rows >= k12.shape[0]:
        blocks = [(slice(None), k11, k12)]
    else:
        blocks = [(slice(i, i + rows), k11[i:i + rows], k12[i:i + rows]) for i in range(0, k12.shape[0], rows)]
    buffer = None
    for rows_at, k11_rows, k12_rows in blocks:
        gap = torch.mul(k12_rows, k12_rows, out=None if buffer is None else buffer[:k12_rows.shape[0]])
        buffer = gap if buffer is None else buffer
        torch.gt(gap.addcmul_(k11_rows, k22, value=-((1 - NEAR) ** 2)), 0, out=near[rows_at])
    if self_pairs is not None:
        # the upper triangle alone, above the diagonal: a symmetric kernel keeps only those entries (the
        # whole matrix mirrors them, row blocks place them), and carrying both halves doubled the work
        # where every pair is near (the NTK of 1000 points 100 + randn with autograd: 6 s, 2.1 s without)
        near.triu_(self_pairs + 1)
    return near


def _screen_rows(k12: Tensor) -> int:
    """Rows per block of :func:`_near`'s screen: ``_SCREEN_ENTRIES`` of ``k12`` (``_CUDA_SCREEN_ENTRIES`` on a
    GPU, where a 40 000-point kernel took 1.95 s with the CPU's blocks and 0.45 s with these on an H200),
    all of a diagonal's."""
    entries = _CUDA_SCREEN_ENTRIES if k12.device.type == "cuda" else _SCREEN_ENTRIES
    if k12.dim() == 1 or k12.numel() <= entries:
        return k12.shape[0]
    return max(1, entries // k12.shape[-1])


def first_layer_carry(x1: Tensor, x2: Tensor, sq1: Tensor, sq2: Tensor, nngp: Tensor, cov1: Tensor,
                      cov2: Tensor, scale: Tensor, bias_var: Tensor | None, diag: bool,
                      gram: Tensor, self_pairs: int | None = None) -> PairCarry | None:
    """The carry of a first ``Dense`` layer's kernel ``k = scale · x·x' + bias_var`` (``sq1``, ``sq2``:
    the squared norms ``|x|²``, ``gram``: the products ``x·x'``), or ``None`` where no pair is near.

    Where the inputs themselves are not nearly parallel (``cos²α ≤ 3/4``: the pair is near only because
    the bias dominates) ``|x|²|x'|² − (x·x')²`` and ``|x|² + |x'|² − 2x·x'`` from the Gram entries lose at
    most a factor 8 to cancellation; only the others gather their inputs (``O(d)`` a pair).

    A pair of a zero input and a nonzero one (``x̂`` undefined) takes the Gram formulas, exact for it
    (``x·x' = 0``: ``det = w b |x'|²``, ``g = w |x'|²``). Pairs of bitwise equal inputs (the diagonal and
    duplicates, exact already: ``det = 0``) and of variances whose products leave the normal range are
    not carried.
    ``self_pairs``: as :func:`_near`'s.
    """
    k11, k22 = (cov1, cov2) if diag else (cov1.unsqueeze(-1), cov2.unsqueeze(-2))
    with torch.no_grad():
        near = _near(k11.detach(), nngp.detach(), k22.detach(), self_pairs)
        if not bool(near.any()):
            return None
        index = torch.nonzero(near, as_tuple=True)
        first, second = index[0], index[-1]
        # a zero input beside a nonzero one takes the Gram formulas, exact there (x·x' = 0: det = w b |x'|²);
        # two zero inputs are equal (exact already)
        keep = (representable(cov1[first], cov2[second])
                & ((sq1.detach()[first] > 0) | (sq2.detach()[second] > 0)))
        if not bool(keep.all()):
            index = tuple(i[keep] for i in index)
            first, second = index[0], index[-1]
        if first.numel() == 0:
            return None
    n1, n2, uv = sq1[first], sq2[second], gram[index]
    det = (scale * scale) * (n1 * n2 - uv * uv)
    g = scale * (n1 + n2 - 2 * uv)
    if bias_var is not None:
        det = det + bias_var * g
    with torch.no_grad():
        # a zero |x|² (a zero input, or one whose square underflows) never: x̂ would be 0/0
        parallel = torch.nonzero((uv * uv > 0.75 * (n1 * n2)) & (n1 > 0) & (n2 > 0)).flatten()
    if parallel.numel():
        exact = _parallel_pairs(x1, x2, sq1, sq2, first[parallel], second[parallel], scale, bias_var)
        if exact is None:   # all bitwise equal inputs (duplicates): exact already, and their derivatives too
            keep = torch.ones_like(first, dtype=torch.bool).index_fill_(0, parallel, False)
            index, det, g = tuple(i[keep] for i in index), det[keep], g[keep]
        else:
            det, g = det.index_put((parallel,), exact[0]), g.index_put((parallel,), exact[1])
            if exact[2] is not None:
                keep = torch.ones_like(first, dtype=torch.bool).index_put_((parallel,), exact[2])
                index, det, g = tuple(i[keep] for i in index), det[keep], g[keep]
        if index[0].numel() == 0:
            return None
    return PairCarry(index, det, g)


def _parallel_pairs(x1: Tensor, x2: Tensor, sq1: Tensor, sq2: Tensor, first: Tensor, second: Tensor, scale: Tensor,
                    bias_var: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """:func:`_pair_values` of the pairs ``(x1[first], x2[second])``, a chunk at a time, and which of them
    differ (``None``: all; the whole ``None``: none)."""
    # each chunk a few MiB of gathered inputs; with autograd recomputed in the backward pass (checkpointed),
    # not kept: the graph held ~6 gathered copies of the inputs per pair
    rows = max(1, _CHUNK_ENTRIES // max(x1.shape[-1], 1))
    graph = needs_graph(x1, x2, scale) or (bias_var is not None and needs_graph(bias_var))
    parts = []
    for start in range(0, first.numel(), rows):
        args = (x1, x2, sq1, sq2, first[start:start + rows], second[start:start + rows], scale, bias_var)
        parts.append(checkpoint(_pair_values, *args, use_reentrant=False) if graph and first.numel() > rows
                     else _pair_values(*args))
    det, g, apart = (parts[0] if len(parts) == 1 else [torch.cat([p[i] for p in parts]) for i in range(3)])
    if bool(apart.all()):
        return det, g, None
    return None if not bool(apart.any()) else (det, g, apart)


def _pair_values(x1: Tensor, x2: Tensor, sq1: Tensor, sq2: Tensor, first: Tensor, second: Tensor, scale: Tensor,
                 bias_var: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``det`` and ``g`` of a first ``Dense`` layer's pairs ``(x1[first], x2[second])`` (module docstring),
    and whether the two inputs differ (``|x − x'|² > 0``)."""
    u, v = x1[first], x2[second]
    n1, n2 = sq1[first], sq2[second]
    uv = torch.sum(u * v, -1)
    # |x|²|x'|² sin²α = |x|²|e|² sin²β with e = x' ∓ q·x (the sign of x·x'), β the angle between x and e, of
    # order one unless x' is nearly a multiple of x: the Gram determinant of (x, e), the same for every q.
    # q = 1 where |x'|/|x| ∈ [1/2, 2], else the power of two nearest it: q x_i exact, each x'_i ∓ q x_i one rounding,
    # ε of itself (none where the two are within a factor 2, Sterbenz; not so of an entry x_i ≈ 0 beside x'_i = δ_i),
    # so e is ε|e| ≲ ε|x'| off. With q = 1 at x' = 1e-3 x + δ, e ≈ −x kept its rounding, ε|x|: the angle was
    # ε |x|/|x'| off, a float32 Sign kernel 430 ε
    sign = torch.where(uv >= 0, 1.0, -1.0).to(u.dtype)
    with torch.no_grad():   # q a constant of the pair; no host synchronization to skip it where all are 1
        log_ratio = torch.log2(n2) - torch.log2(n1)   # log2 (|x'|/|x|)², n1, n2 > 0
        far = log_ratio.abs() > 2
        limit = _FLOAT_BITS[u.dtype][2] - 1   # 2^±limit normal; passed only where |x|² < 2^-1020 (float64)
        exponent = torch.where(far, torch.round(log_ratio / 2), 0.0).clamp(-limit, limit)
        multiple = sign * power_of_2(exponent, u.dtype)   # q = 2^0 = 1 exactly: the same bits where not far
    e = torch.addcmul(v, u, -multiple.unsqueeze(-1))
    sq_e, ue = torch.sum(e * e, -1), torch.sum(u * e, -1)
    # |x|²|e|² − (x·e)², no worse than a factor 4 of cancellation where sin²β ≥ 1/4; below, Kahan's
    # sin β = |x̂ − ê| |x̂ + ê| / 2 (ε off absolutely, 2 sin(β/2) · 2 cos(β/2) / 2)
    spread = n1 * sq_e - ue * ue
    narrow = spread < n1 * sq_e / 4
    if bool(narrow.any()):
        at = torch.nonzero(narrow).flatten()
        spread = spread.index_put((at,), _kahan_spread(u[at], e[at], n1[at], sq_e[at]))
    # |x − x'|²: |e|² where e = x' − x, |x|² + |x'|² + 2|x·x'| for antiparallel pairs (a sum), and for parallel
    # ones whose e took q ≠ 1 from their own difference x' − x (each entry ε off: |x − x'|² ~2ε), not from
    # |x|² + |x'|² − 2x·x', which cancels up to 9× the rounding of three sums of d products (|x − x'|² 9ε off
    # at d = 10, 15ε off in Rbf kernels at d = 100)
    difference = torch.where(uv >= 0, sq_e, n1 + n2 - 2 * uv)
    direct = far & (uv >= 0)
    if bool(direct.any()):
        at = torch.nonzero(direct).flatten()
        step = v[at] - u[at]
        difference = difference.index_put((at,), torch.sum(step * step, -1))
    # inputs at an angle below 2ε (x' = fl(c·x): ε/2 at most) are taken as parallel (antiparallel): s = 0
    # there, and its derivative 0, the mean of the one-sided slopes at the cone's kink (docs/numerics.md)
    rounded_multiple = spread < (2 * torch.finfo(u.dtype).eps) ** 2 * n1 * n2
    det = torch.where(rounded_multiple, 0.0, (scale * scale) * spread)
    g = scale * difference
    if bias_var is not None:
        det = det + bias_var * g
    return det, g, difference.detach() > 0


def _kahan_spread(u: Tensor, e: Tensor, n1: Tensor, sq_e: Tensor) -> Tensor:
    """``|u|²|e|² sin²β`` from the unit vectors: ``sin β = |û − ê| |û + ê| / 2``."""
    # |u| summed as |e| is, not the Gram entry n1 (summed in another order): e = ±2^k u exactly (x' = 2x, x/2)
    # then gives ê = ±û exactly; n1's last bits read such multiples of 1000 entries as 2ε from parallel
    sq_u = torch.sum(u * u, -1)
    unit_u = u / torch.sqrt(torch.where(sq_u > 0, sq_u, n1)).unsqueeze(-1)
    root_e = safe_sqrt(sq_e)   # 0 where x' = −x exactly: a zero derivative, not 0 · inf
    unit_e = e / torch.where(root_e > 0, root_e, 1.0).unsqueeze(-1)   # e = 0: the term is 0
    sin2 = torch.sum((unit_u - unit_e) ** 2, -1) * torch.sum((unit_u + unit_e) ** 2, -1) / 4
    return n1 * sq_e * sin2


def _s_series(x: Tensor) -> Tensor:
    """``S(x) = sin x − x cos x`` by its series, for ``0 ≤ x <`` :data:`_S_SERIES_BELOW` (clamped there)."""
    y = x.clamp(max=_S_SERIES_BELOW)
    y2 = y * y
    return y2 * y * horner(y2, _S_TERMS)


def _s_both(s: Tensor, k12: Tensor, p: Tensor, theta: Tensor, supplement: Tensor) -> tuple[Tensor, Tensor]:
    """``S(θ)`` and ``J = S(π − θ)`` from the two angles: the smaller, ``α ≤ π/2``, by the series below
    :data:`_S_SERIES_BELOW` (else ``(s − α|k12|)/p``, with ``sin α = s/p`` and ``cos α = |k12|/p``); the
    larger, ``β ≥ π/2``, as ``sin β − β cos β``, a sum. One series a pair, not one per angle (two were half
    the time of a layer whose every pair is near). ``J`` of the larger angle is not ``π cos α + S(α)``
    with ``cos α = |k12|/p``: ``T`` then took ``k12``'s derivatives, those of a rounded Gram entry, where
    through ``p`` and the carried angle they are exact (a first weight variance's gradient at inputs of
    1e-4 beside a bias was 1.4e-3 off in float32)."""
    parallel = k12 >= 0   # θ ≤ π/2: θ the smaller angle
    small = torch.where(parallel, theta, supplement)
    large = torch.where(parallel, supplement, theta)
    s_small = torch.where(small < _S_SERIES_BELOW, _s_series(small), (s - small * k12.abs()) / p)
    s_large = torch.sin(large) - large * torch.cos(large)
    return torch.where(parallel, s_small, s_large), torch.where(parallel, s_large, s_small)


def abrelu_dot(a: float, b: float, k12: Tensor, complement: Tensor | None, supplement: Tensor | None) -> Tensor:
    """``Ṫ`` of ``ABReLU(a, b)`` from the complement ``π/2 − θ`` and the supplement ``π − θ`` of the angle
    (the complement is needed where ``ab < 0``, the supplement unless ``a + b = 0``): ``ab + (a − b)² (π − θ)/(2π)``,
    or for slopes of opposite signs ``(a + b)²/4 + (a − b)²/4 · (π/2 − θ)/(π/2)`` where ``k12 ≥ 0`` (a sum
    there; :meth:`ABReLU._dot_kernel <ntkgp.layers.activations.ABReLU._dot_kernel>` says why)."""
    factor = (a - b) ** 2 / (2 * math.pi)
    if a * b < 0:
        assert complement is not None
        dot = complement / (math.pi / 2) * ((a - b) ** 2 / 4)
        if not a + b:
            return dot
        assert supplement is not None
        return torch.where(k12 < 0, torch.add(supplement * factor, a * b), dot + (a + b) ** 2 / 4)
    assert supplement is not None
    return torch.add(supplement * factor, a * b) if a * b else supplement * factor


def abrelu_carried(a: float, b: float, carry: PairCarry, k11: Tensor, k12: Tensor, k22: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, PairCarry]:
    """At the carried pairs (``k11, k12, k22`` gathered there): whether each is near now, ``s``, ``Ṫ``
    and ``T`` of ``ABReLU(a, b)`` from the carried ``det``, and the carry after the activation
    (module docstring)."""
    det = clamp_passing(carry.det, min=0)
    s = safe_sqrt(det)
    p = torch.sqrt(k11 * k22)
    near = torch.abs(k12) > (1 - NEAR) * p
    theta, supplement = torch.atan2(s, k12), torch.atan2(s, -k12)
    factor = (a - b) ** 2 / (2 * math.pi)
    dot = abrelu_dot(a, b, k12, torch.atan2(k12, s) if a * b < 0 else None, supplement)
    s_theta, j = _s_both(s, k12, p, theta, supplement)   # J(θ) = S(π − θ) ≥ 0
    nngp = a * b * k12 + factor * p * j
    # p ∓ k12 from det where they cancel: p − k12 = det/(p + k12) for k12 ≥ 0, p + k12 = det/(p − k12) else
    positive = k12 >= 0
    minus = torch.where(positive, det / torch.where(positive, p + k12, 1.0), p - k12)
    plus = torch.where(positive, p + k12, det / torch.where(positive, 1.0, p - k12))
    pi_minus_j = math.pi * minus / p - s_theta
    big = (a * a + b * b) / 2
    lower = a * b * minus + factor * p * pi_minus_j
    upper = a * b * plus + factor * p * (math.pi + j)
    if a * b < 0:
        # with A = −ab + (a + b)²/2 the forms whose terms share a sign: A p + T12 = −ab (p − k12) +
        # (a + b)² p/2 + (a − b)² p J/(2π) always, A p − T12 = −ab (p + k12) + p ((a + b)²/2 − (a − b)² J/(2π))
        # for k12 < 0, where the form above cancels (Abs maps antiparallel pairs to parallel ones)
        half_sum = (a + b) ** 2 / 2
        upper = -a * b * minus + p * (half_sum + factor * j)
        lower = torch.where(positive, lower, -a * b * plus + p * (half_sum - factor * j))
    root_gap = torch.sqrt(k11) - torch.sqrt(k22)
    after = PairCarry(carry.index, clamp_passing(lower * upper, min=0), big * root_gap * root_gap + 2 * lower)
    return near, s, dot, nngp, after


def sign_carried(carry: PairCarry, k12: Tensor) -> tuple[Tensor, PairCarry]:
    """``Sign``'s ``T = (π/2 − θ)/(π/2)`` at the carried pairs (``k12`` gathered there), its angle from the
    carried ``det``, and the carry after it: with ``T11 = T22 = 1``, ``1 − T = 2θ/π`` and ``1 + T = 2(π − θ)/π``,
    so ``g' = 4θ/π`` and ``det' = 4θ(π − θ)/π²``, each angle straight from ``atan2``. From the rounded kernels
    ``1 − T`` keeps ``T``'s rounding, and a deep ``Sign`` network (which takes a square root of the angle
    each layer) read 2 for 0.15 (float32, depth 10, inputs 1e-5 from parallel)."""
    s = safe_sqrt(clamp_passing(carry.det, min=0))
    theta, supplement = torch.atan2(s, k12), torch.atan2(s, -k12)
    nngp = torch.atan2(k12, s) / (math.pi / 2)
    after = PairCarry(carry.index, theta * supplement * (4 / math.pi**2), theta * (4 / math.pi))
    return nngp, after


def carried_gaps(carry: PairCarry, k11: Tensor, k12: Tensor, k22: Tensor) -> tuple[Tensor, Tensor]:
    """``k11 + k22 ∓ 2 k12`` (``E|u1 ∓ u2|²``) of the carried pairs (``k11, k12, k22`` gathered there),
    for the Gaussian-kernel activations (``Sin``, ``Cos``, ``Rbf``: ``e^{−b²(k11 + k22 ∓ 2k12)/2}``).

    From the rounded kernels each keeps ``k12``'s rounding, ``ε k`` absolute, which is all of it for
    nearly parallel (``−``) or antiparallel (``+``) pairs of large variance: float32 ``Sin`` kernels of
    inputs of scale 1e3 a unit apart were 0.14 off. The carried ``g`` is the first; the second is
    ``((k11 − k22)² + 4 det)/g``, from ``(k11 + k22)² − 4k12² = (k11 − k22)² + 4(k11 k22 − k12²)``,
    a sum (``k11 − k22``'s rounding, ``ε k``, is within the inputs' own there: it is at most
    ``sqrt(g (k11 + k22 + 2k12))``). Each replaces the plain difference only on its own side
    (``k12 ≥ 0``: the first; ``k12 < 0``: the second), where the other is a sum."""
    plain_minus = (k11 - k12) + (k22 - k12)
    plain_plus = (k11 + k12) + (k22 + k12)
    parallel = k12 >= 0
    # the second's quotient only where it is used (g, nearly 4k there, is not 0), 1 elsewhere: no 0/0
    opposite = (~parallel) & (carry.g > 0)
    gap = k11 - k22
    det = clamp_passing(carry.det, min=0)
    plus = (gap * gap + 4 * det) / torch.where(opposite, carry.g, 1.0)
    return torch.where(parallel, carry.g, plain_minus), torch.where(opposite, plus, plain_plus)


def patched(t: Tensor, index: tuple[Tensor, ...], near: Tensor, values: Tensor) -> Tensor:
    """``t`` with ``values`` at ``index`` where ``near`` (in place unless derivatives are taken)."""
    if near.all():
        chosen = values
    else:
        chosen = torch.where(near, values, t[index])
    if torch.is_grad_enabled() and (t.requires_grad or chosen.requires_grad):
        return t.index_put(index, chosen.to(t.dtype))
    return t.index_put_(index, chosen.to(t.dtype))
