"""Numerically safe building blocks shared by the closed-form activation kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

# Two spellings arrived after torch 2.1, the declared floor: ``torch.compiler.is_compiling`` (torch 2.1
# has ``torch._utils.is_compiling``, which its compiler folds to True in the same way) and
# ``torch._C._functorch.maybe_current_level`` (before it ``peek_interpreter_stack``, which is None
# exactly where no functorch transform is active).
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling
_maybe_functorch_level = (getattr(torch._C._functorch, "maybe_current_level", None)
                          or torch._C._functorch.peek_interpreter_stack)


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(x, 0))`` whose derivative is 0 (not ``inf``/NaN) where ``x <= 0``.

    At ``x = 0`` the kernels that use it are exactly degenerate (a point paired with itself, a
    duplicate, a zero input), and along such a degenerate set the square root stays 0, so 0 is
    the right derivative there. Reverse mode, forward mode (``jvp``) and ``torch.func``
    transforms (``vmap``, ``jacfwd``) are all supported.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(x, min=0))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return _sqrt_derivative(grad, root)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return _sqrt_derivative(tangent, root)


def _sqrt_derivative(change: Tensor, root: Tensor) -> Tensor:
    """``change / (2 root)`` where ``root > 0``, else 0."""
    positive = root > 0
    if not needs_graph(change, root) and change.shape == root.shape and change.dtype == root.dtype:
        # a backward pass without create_graph: the quotient's inf/NaN at root = 0 are discarded by the
        # selection, so the same values bit for bit come from one temporary beside the mask, without the
        # guarded copy of root and its ones (six fresh kernel-sized matrices in all: this node took ~8 % of a
        # depth-3 ReLU NTK's marginal-likelihood step at 500 points, about half of that now; docs/benchmarks.md)
        out = torch.mul(root, 2)
        return torch.where(positive, torch.div(change, out, out=out), out.new_zeros(()), out=out)
    # differentiated itself (second derivatives): the unselected quotient's derivative, 0 · inf, would be NaN
    return torch.where(positive, change / (2 * torch.where(positive, root, torch.ones_like(root))), 0)


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` with a zero gradient where ``x <= 0``."""
    if not needs_graph(x):   # its forward alone: Function.apply binds forward's signature (~8 µs) at every call
        return _SafeSqrt.forward(x)
    return _SafeSqrt.apply(x)


class _StraightThrough(torch.autograd.Function):
    """``replaced`` forward; backward and forward-mode derivatives those of ``original``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(original: Tensor, replaced: Tensor) -> Tensor:
        return replaced.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.shape = output.shape

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None   # autograd sums it down to ``original``'s shape where that broadcasts

    @staticmethod
    def jvp(ctx, tangent: Tensor, _: Tensor) -> Tensor:
        return tangent.expand(ctx.shape).clone()


def straight_through(original: Tensor, replaced: Tensor) -> Tensor:
    """The values of ``replaced`` (computed from ``original``'s, e.g. made exact by substitution)
    with the derivatives of ``original``.

    Substituting an equal point's value for a duplicate's is exact for the value, but its
    derivative would follow the other point's input: ``∂K(x, y)/∂x`` at a candidate ``x`` that
    sits on a training point read 0 instead of −0.46, and entries against *other* points lost
    the candidate's own-variance term.
    """
    if not needs_graph(original):   # its forward alone, without Function.apply's signature binding
        return _StraightThrough.forward(original, replaced.detach())
    return _StraightThrough.apply(original, replaced.detach())


def needs_graph(*tensors: Tensor) -> bool:
    """Whether derivatives are being taken through any of ``tensors``: reverse mode recording a
    graph, or forward mode / a ``torch.func`` transform carrying tangents on them (where the
    in-place fast paths would differentiate ``sqrt`` at 0)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or transforms_active()


def is_vmapped(x: Tensor) -> bool:
    """Whether ``x`` is being mapped over by ``torch.func.vmap`` (its values are per-sample, so no
    data-dependent branch may look at them)."""
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.is_batchedtensor(x)


def horner(x: Tensor, coefficients: Sequence[float]) -> Tensor:
    """``Σ_i c_i x^i`` (lowest degree first) by Horner's rule: for polynomial activations and the
    truncated series that replace cancelling differences at small arguments."""
    out = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * x + c
    return out


def transforms_active() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``) or a ``torch.func`` transform
    (``jacfwd``, ``vmap``, ...) is active."""
    return forward_ad._current_level >= 0 or _maybe_functorch_level() is not None


def product_range(dtype: torch.dtype) -> tuple[float, float]:
    """``[16 sqrt(tiny), sqrt(max)/16]`` of ``dtype``: variances in it have products of two (and small
    multiples of those) that are normal numbers, neither ``inf`` nor subnormal."""
    info = torch.finfo(dtype)
    return 16 * info.tiny ** 0.5, info.max ** 0.5 / 16


def overflow_scale(k11: Tensor, k22: Tensor) -> float | Tensor | None:
    """A power of 4, ``c``, such that products of the variances scaled by ``c`` cannot overflow;
    ``None`` when none is needed (the usual case: variances below ``sqrt(max)/16``, 1.15e18 in
    float32). Powers of 4 keep ``sqrt(c·k11 · c·k22) == c k`` exact where ``k11 = k22 = k``, and
    ``sqrt(c)`` exact. Under ``torch.compile`` ``c`` is a tensor (no data-dependent branch).

    The erf, GELU and Gaussian forms add ``O(1)`` terms to the scaled products and take a scale per
    pair (:func:`scaled_for_products`), :func:`gaussian_angle` scales each point by its own power
    of 4, and ``Elementwise`` quadrature, whose products are homogeneous in the variances, each pair
    by a power of 4 near ``1/sqrt(k11 k22)`` (one scale for all points underflowed a tiny variance
    paired with a huge one)."""
    limit = product_range(k11.dtype)[1]
    big: Tensor | float
    if _is_compiling() or transforms_active():
        big = torch.maximum(k11.detach().amax(), k22.detach().amax()).clamp(min=limit)
        return torch.pow(4.0, -torch.ceil(torch.log(big / limit) / math.log(4.0)))
    if k11.numel() == 0 or k22.numel() == 0:
        return None
    big = float(torch.maximum(k11.detach().amax(), k22.detach().amax()))   # one host synchronization, not two
    if not (limit < big < math.inf):
        return None
    return 4.0 ** -math.ceil(math.log(big / limit, 4) + 1e-9)


def scaled_for_products(k11: Tensor, k12: Tensor, k22: Tensor
                        ) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``(c, c·k11, c·k12, c·k22)`` with ``c`` a power of 4 per pair, the largest that keeps
    ``c·max(k11, k22)`` within :func:`overflow_scale`'s limit (``c = 1`` for the pairs that need no
    scaling, which keep their bits), or ``(None, k11, k12, k22)`` unchanged when no pair needs any.

    Per pair, not :func:`overflow_scale`'s one scale for all points: the erf, GELU and Gaussian forms
    add ``c²`` and ``c·k`` to the scaled products, and beside a variance of 1e38 in float32 one scale
    of ~1e-20 made ``c² ~ 1e-40`` subnormal, the dominant term of an ordinary pair's determinant:
    those pairs lost 10–60 times float32's rounding, and the derivative of ``1/sqrt`` there,
    ``~1/c³``, overflowed to ``inf``, which a zero upstream gradient turned into NaN for every
    input. Per pair, ``c·kmax ≥ limit/4``, so the ``c·k`` terms of the huge pairs dominate and their
    ``c²`` may underflow harmlessly."""
    if overflow_scale(k11, k22) is None:
        return None, k11, k12, k22
    limit = product_range(k11.dtype)[1]
    # as overflow_scale's, per pair: exactly 1 at and below the limit; a logarithm rounded the wrong way
    # leaves c·k up to 4·limit, still in range. Not frexp, which inductor fails to compile in float64
    big = torch.maximum(k11, k22).detach().clamp(min=limit)
    c = torch.pow(4.0, -torch.ceil(torch.log(big / limit) / math.log(4.0)))
    return c, k11 * c, k12 * c, k22 * c


def shifted_det(k11: Tensor, k12: Tensor, k22: Tensor, g: float = 1.0
                ) -> tuple[float | Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(c, c·k11, c·k12, c·k22, c²·det(I + gΣ))`` with ``det(I + gΣ) = 1 + g(k11 + k22) +
    g²(k11 k22 − k12²)`` (:func:`gaussian_det`, no cancellation), from the variances scaled by ``c``
    (:func:`scaled_for_products`; ``c = 1`` where ``k²`` cannot overflow): the determinant in GELU's
    and the Gaussian activation's kernels."""
    c, s11, s12, s22 = scaled_for_products(k11, k12, k22)
    if c is None:
        if not needs_graph(k11, k12, k22):
            # the same operations in place on the determinant's own temporary, bit for bit: about
            # half the time of a fresh matrix per operation (erf's, GELU's and Gaussian's kernels without autograd)
            det = gaussian_det(k11, k12, k22).mul_(g * g)
            return 1.0, k11, k12, k22, det.add_(torch.add(k11, k22).mul_(g).add_(1))   # (a sum commutes)
        return 1.0, k11, k12, k22, 1 + g * (k11 + k22) + g * g * gaussian_det(k11, k12, k22)
    return c, s11, s12, s22, c * c + g * c * (s11 + s22) + g * g * gaussian_det(s11, s12, s22)


def clamp_passing(x: Tensor, min: float | None = None, max: float | None = None) -> Tensor:
    """``x.clamp(min, max)``, bitwise, whose derivative is 1 at the bounds themselves (0 only beyond them).

    For clamps that guard rounding of a quantity that is mathematically within its bound and sits on it
    exactly where points coincide: ``k11 k22 − k12² ≥ 0`` at its minimum 0 when ``x1 == x2``, an exponent
    ``≤ 0`` that is 0 there. The quantity's own derivatives must pass there (they carry the second input
    derivatives at a training point). torch ≤ 2.14's clamp passed them; torch 2.15's gives 0 at the bound,
    and the erf NNGP's mixed input Hessian at ``x1 == x2`` read 0.023 for 0.129. ``torch.where`` keeps
    NaN and ``−0.0`` as clamp does.

    Where no derivative is taken through ``x`` (:func:`needs_graph`), it is ``x.clamp(min, max)`` itself:
    one pass over ``x`` where the comparison and the selection of ``torch.where`` are two per bound (3x
    the time of a clamp of 4M float64 entries; the no-grad kernels of two Sin layers 9-33% slower).
    """
    if not needs_graph(x):
        return x.clamp(min=min, max=max)
    if min is not None:
        x = torch.where(x < min, min, x)
    if max is not None:
        x = torch.where(x > max, max, x)
    return x


def gaussian_det(k11: Tensor, k12: Tensor, k22: Tensor) -> Tensor:
    """``k11 k22 − k12² ≥ 0``, formed as ``(p − k12)(p + k12)`` with ``p = sqrt(k11 k22)``.

    Subtracting ``k12²`` from ``k11 k22`` directly loses everything where the two agree to more
    digits than the dtype holds (a point with itself, or nearly parallel inputs of large
    variance), and the kernels that add it to ``O(k)`` terms then read 0 instead of ``O(k)``.
    Callers whose variances may be large pass them through :func:`scaled_for_products` first.
    """
    if not needs_graph(k11, k12, k22):
        # in place, the same operations (safe_sqrt is sqrt(clamp(x, 0))): a fresh matrix per pass took
        # about twice as long. p in place only where it has the determinant's shape and dtype (variances
        # of a smaller shape than k12's; a wider k12, whose sum p + k12 written into p rounded to p's dtype)
        p = torch.mul(k11, k22).clamp_(min=0).sqrt_()
        det = torch.sub(p, k12)
        in_place = p.shape == det.shape and p.dtype == det.dtype
        return det.mul_(p.add_(k12) if in_place else p + k12).clamp_(min=0)
    p = safe_sqrt(k11 * k22)
    return clamp_passing((p - k12) * (p + k12), min=0)


def gaussian_angle(k11: Tensor, k12: Tensor, k22: Tensor, supplement: bool = False,
                   complement: bool = False, steep: bool = False) -> tuple[Tensor, Tensor]:
    """``s = sqrt(k11 k22 − k12²)`` and the angle ``θ = atan2(s, k12)`` between two Gaussians, or
    with ``supplement`` its supplement ``π − θ = atan2(s, −k12)``, or with ``complement`` its
    complement ``π/2 − θ = atan2(k12, s) = arcsin ρ`` (0 where a variance is 0).

    Kernels that vanish at ``θ = π`` (ReLU's ``(s − (π − θ)|k12|)/(2π) ≈ δ³/(6π)`` at ``δ = π − θ``,
    unit variances) need the supplement straight from ``atan2``: ``π − θ`` subtracted afterwards carries θ's
    absolute rounding (4e-16), which their cancellation amplifies by ``1/δ²`` (ReLU's kernel at
    a correlation of ``−1 + 1e-8`` was 3e-4 off, relative; from ``atan2``, ``ε/δ²`` as the inputs').
    Kernels that vanish at ``θ = π/2`` (``Sign``'s ``1 − 2θ/π``, ``Abs``'s ``Ṫ``) need the complement
    likewise: ``π/2 − θ`` subtracted afterwards is ``ε/|ρ|`` off, relative (1.5e-7 at ``ρ = 1e-9``).

    ``k11 k22 − k12²`` is formed as ``(p − k12)(p + k12)`` with ``p = sqrt(k11 k22)``: where a
    point meets itself (``k11 = k12 = k22`` bitwise) this is exactly 0, because
    ``sqrt(c·c) == c`` in IEEE arithmetic, even when the compiler fuses multiply-adds. The angle
    is never taken as ``arccos`` of a clipped ratio, and ``θ = π/2`` where a variance is 0 (a zero
    vector without bias, as in neural-tangents, or one whose squared norm underflows where its products
    with other inputs do not: the Gaussian that is the constant 0 is uncorrelated with every other,
    ``|k12| ≤ sqrt(k11 k22) = 0``, whatever ``k12`` the rounding left).

    Without autograd the same formula runs in place on its temporaries, and the ``π/2`` fill
    is applied only when a zero variance is present (it can only occur there). Where ``k11 k22``
    could overflow or underflow (variances beyond ``sqrt(max)/16`` or below ``16 sqrt(tiny)``:
    1.15e18 and 1.7e-18 in float32) every point's variance is first scaled by its own power of 4
    (:func:`power_of_4_exponents`), which changes no bit of the result elsewhere.

    ``steep``: the caller's kernel grows faster than the variances (``RectifiedMonomial``'s ``T ~ k^n``),
    so the gradient reaching the angle does too; ``atan2``'s derivative multiplies it by ``s`` (and
    ``k12``) before dividing by ``s² + k12²``, which overflowed float32 from ``k^{n+1} ~ 3e38`` (``k ≈ 4e9``
    for ``n = 3``), far below the products' limit. Where derivatives are taken the variances are then
    always scaled as above.
    """
    kind = "supplement" if supplement else "complement" if complement else "angle"
    s, (theta,) = _angles(k11, k12, k22, (kind,), steep)
    return s, theta


def gaussian_angles(k11: Tensor, k12: Tensor, k22: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, π/2 − θ, π − θ)``: :func:`gaussian_angle`'s complement and supplement, both from the
    same scaled ``s`` and ``k12``.

    Taking ``atan2(s, −k12)`` afterwards from the returned ``s`` and the caller's ``k12`` gives the
    same value, but not where a variance needed the rescaling: ``atan2``'s derivative forms
    ``grad · x`` and ``x² + y²``, which overflow float32 beside variances of ~1e19, and the ReLU
    family's ``T = … + Ṫ·k12`` sends it a gradient of ``k12``'s size (ABReLU(−0.4, 1.3) at variances
    of 1e20: every gradient NaN)."""
    s, (complement, supplement) = _angles(k11, k12, k22, ("complement", "supplement"))
    return s, complement, supplement


def _angles(k11: Tensor, k12: Tensor, k22: Tensor, kinds: Sequence[str], steep: bool = False
            ) -> tuple[Tensor, list[Tensor]]:
    """``s`` and, for each of ``kinds`` ("angle", "supplement", "complement"), that angle (``steep``:
    :func:`gaussian_angle`'s)."""
    rescale = None
    compiling = _is_compiling()
    # where neither applies, one host synchronization says both whether the products are
    # representable and whether a variance is 0 (on a GPU each costs a round trip, per layer and block)
    representable, has_zero = (True, True) if compiling or transforms_active() else _variance_range(k11, k22)
    graph = needs_graph(k11, k12, k22)
    if not representable or compiling or transforms_active() or (steep and graph):
        h1, h2 = power_of_4_exponents(k11), power_of_4_exponents(k22)
        k11, k22 = k11 * power_of_2(-2 * h1, k11.dtype), k22 * power_of_2(-2 * h2, k22.dtype)
        k12 = k12 * power_of_2(-h1, k12.dtype) * power_of_2(-h2, k12.dtype)
        rescale = power_of_2(h1, k11.dtype), power_of_2(h2, k22.dtype)
    if graph:
        p = safe_sqrt(k11 * k22)
        s = safe_sqrt((p - k12) * (p + k12))
        # atan2(0, 0)'s derivative is NaN: the origin (a variance of 0, see below) takes 1s in, its
        # angle by torch.where. Without a zero variance (has_zero is True under torch.compile and
        # transforms) those passes and their backward copied the matrices unchanged
        if has_zero:
            origin = (k11 == 0) | (k22 == 0)
            y, x = torch.where(origin, 1.0, s), torch.where(origin, 1.0, k12)
            angles = [torch.where(origin, 0.0, torch.atan2(x, y)) if kind == "complement" else
                      torch.where(origin, math.pi / 2, torch.atan2(y, -x if kind == "supplement" else x))
                      for kind in kinds]
        else:
            angles = [torch.atan2(k12, s) if kind == "complement" else
                      torch.atan2(s, -k12 if kind == "supplement" else k12) for kind in kinds]
    else:
        p = torch.mul(k11, k22).sqrt_()
        difference = p - k12
        # p in place only where it has k12's shape: variances of a smaller shape (0-d, or without k12's
        # batch dimensions) made add_ raise
        s = difference.mul_(p.add_(k12) if p.shape == difference.shape else p + k12).clamp_(min=0).sqrt_()
        angles = [torch.atan2(k12, s) if kind == "complement" else torch.atan2(s, k12.neg() if kind == "supplement"
                                                                               else k12) for kind in kinds]
        if has_zero:   # θ = π/2 (complement 0) where a variance is 0; under torch.compile always, no
            # data-dependent branch. Not only where k12 = 0 too: the squared norm of an input of 1e-300
            # underflows to 0 where its products with others do not, and atan2(k12, 0) read ρ = ±1 there
            # (Sign's kernel [[0, 1], [1, 1]], not positive semi-definite)
            origin = (k11 == 0) | (k22 == 0)
            angles = [torch.where(origin, 0.0 if kind == "complement" else math.pi / 2, a)
                      for kind, a in zip(kinds, angles, strict=True)]
    if rescale is not None:
        s = s * rescale[0] * rescale[1]
    return s, angles


def power_of_4_exponents(k: Tensor) -> Tensor:
    """Integers ``h`` with ``k · 4^−h`` in ``[1/2, 2)`` (``h = 0`` for ``k = 0``), clamped so that
    ``2^±2h`` stays a normal number."""
    limit = (_FLOAT_BITS[k.dtype][2] - 1) // 2
    exponent = torch.frexp(k.detach()).exponent
    return torch.div(exponent, 2, rounding_mode="floor").clamp(-limit, limit)


_FLOAT_BITS = {torch.float64: (torch.int64, 52, 1023), torch.float32: (torch.int32, 23, 127),
               torch.float16: (torch.int16, 10, 15), torch.bfloat16: (torch.int16, 7, 127)}


def power_of_2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^e`` for integers ``e`` in the normal range of ``dtype``, exact (assembled from its bits:
    a multiplication by it is an exact rescaling)."""
    ints, mantissa_bits, bias = _FLOAT_BITS[dtype]
    bits = torch.bitwise_left_shift(e.to(ints) + bias, mantissa_bits)
    try:
        return bits.view(dtype)
    except RuntimeError:
        # under torch.func.vmap in torch 2.11 (2.13 has one) a dtype view has no batching rule ("Batching rule not
        # implemented for aten::view.dtype"): every kernel under vmap failed there. exp2 of an integer is
        # exact too (its polynomial part is exactly 1), only slower
        return _exp2_of_integers(e, dtype)


def _exp2_of_integers(e: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^e`` for integers ``e`` in the normal range of ``dtype`` by ``torch.exp2``."""
    return torch.exp2(e.to(dtype))


def _variance_range(k11: Tensor, k22: Tensor) -> tuple[bool, bool]:
    """Whether every product of two positive variances is a normal number (and not ``inf``), and
    whether some variance is 0."""
    low, high = product_range(k11.dtype)
    ks = [k.detach().reshape(-1) for k in (k11, k22) if k.numel()]
    if not ks:
        return True, False
    # a symmetric kernel's whole matrix has k22 = k11 = cov1 (as a column and as a row): read once
    k = ks[0] if len(ks) == 1 or _same_values(*ks) else torch.cat(ks)
    # the usual case in one reduction and one host synchronization (on a GPU each costs a round trip):
    # every variance in [low, high] is positive and representable; else (a zero, a tiny or huge
    # variance, NaN) the three figures below. Per layer on small kernels the three took ~9 operations
    # (deep networks: Python overhead per layer)
    smallest, largest = torch.aminmax(k)
    bounds = torch.stack([smallest, largest]).tolist()
    if bounds[0] >= low and bounds[1] <= high:
        return True, False
    largest, smallest, zeros = torch.stack([k.amax(), torch.where(k > 0, k, high).amin(),
                                            (k == 0).any().to(k.dtype)]).tolist()
    return largest <= high and smallest >= low, zeros > 0


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of the same elements (same memory, shape and strides)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def expand_param(value: Tensor, extra_dims: int) -> Tensor:
    """Append ``extra_dims`` singleton dimensions so a batch-shaped hyperparameter broadcasts."""
    return value.reshape(*value.shape, *([1] * extra_dims))
