r"""Linear algebra shared by the predictors: regularization, factorizations, functions of time.

Gradient descent on the squared loss ``(1/2m) ‖f(X) − Y‖²`` (``m`` = number of target entries)
moves the training outputs by ``df/dt = −(η/m) Θ (f − Y)`` (Jacot et al. 2018; Lee et al. 2019).
In the eigenbasis ``Θ = V diag(λ) Vᵀ`` everything is a function of ``λ`` and the time:

* continuous time, ``τ = η t / m`` (neural-tangents' convention):
  ``decay = e^{−λτ}``, ``flow = (1 − e^{−λτ}) / λ``;
* discrete full-batch gradient descent, ``s`` steps of rate ``η``:
  ``decay = (1 − ηλ/m)^s``, ``flow = (1 − decay) / λ``.

``1 − decay`` and ``flow`` are computed from ``expm1``/``log1p``, and ``flow`` takes its limit
(``τ``, or ``s η/m``) where ``λ = 0``, so zero or tiny eigenvalues give the exact finite answer
instead of ``0/0`` (neural-tangents returns NaN there). Eigenvalues below ``N · ε · λ_max``
(``ε`` of the dtype the kernel came in: a float32 kernel factored in float64 keeps float32
rounding) count as exactly zero at ``t = ∞``, and at finite times once ``τ · N ε λ_max`` exceeds
``sqrt(ε)``: their directions never move and, the kernel being positive semi-definite, test
points have no component along them beyond rounding noise, which ``τ`` would otherwise amplify.
That holds for exact null directions (duplicated points); directions that are merely below what
the digits resolve (nearly duplicate points, a smooth kernel far from its data) do have
components, and :func:`warn_if_unresolved` says so where dropping them changes the answer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ntkgp._autograd import outside_inference_mode
from ntkgp._checks import integer_at_least, neural_tangents_keywords
from ntkgp._typing import Steps, Times
from ntkgp._warnings import caller_stacklevel
from ntkgp.layers.base import Layer
from ntkgp.layers.numerics import horner
from ntkgp.layers.validation import all_finite, boolean_or_complex, finite_number, positive_number, refuse_meta
from ntkgp.predict.gaussian import kernel_matrix_error, named_kernels, refuse_gradient


def regularize(k: Tensor, diag_reg: float | Tensor, absolute: bool = False, copy: bool = True) -> Tensor:
    """``k + diag_reg · s · I`` with ``s = trace(k)/N`` (neural-tangents' default) or ``s = 1``;
    ``diag_reg`` a number, or ``(N,)``, one per point (``k + s · diag(diag_reg)``).

    ``copy=False`` raises the diagonal of ``k`` itself, for a kernel that nothing else holds (one
    ``N × N`` matrix less at the caller's peak; the values are the same bit for bit)."""
    if (not isinstance(diag_reg, Tensor) and diag_reg == 0) or (
            isinstance(diag_reg, Tensor) and not diag_reg.requires_grad and not bool(diag_reg.any())):
        return k   # (a zero that requires grad still gets its one-sided gradient)
    n = k.shape[-1]
    scale = diag_reg if absolute else diag_reg * torch.diagonal(k, dim1=-2, dim2=-1).sum(-1, keepdim=True) / n
    # a copy with its diagonal raised in place (autograd follows both): k + diag_embed(...) formed an
    # N × N diagonal matrix besides the sum, which set the peak of a posterior's setup (3 N², not 2)
    out = k.clone() if copy else k
    out.diagonal(dim1=-2, dim2=-1).add_(scale)
    return out


#: Entries per pass of :func:`carried_dtype`'s scan (32 MiB of float64 with its float32 round trip).
_CARRIED_BLOCK = 1 << 22


def carried_dtype(k: Tensor) -> torch.dtype:
    """The dtype whose rounding the entries of ``k`` carry: float32 for a float64 tensor whose every entry
    is a float32 number, not all of them whole, and at least half of its nonzero entries with one of the
    last 4 of float32's 24 significand bits set (a float32 kernel cast up by its caller, as
    ``empirical_ntk(model, x).double()`` of a float32 network), else ``k.dtype``.

    Given as float32, such a kernel is factored in float64 with float32's thresholds (:func:`rounding_eps`);
    cast up first, it took float64's, which read the float32 rounding in its null directions as real
    eigenvalues and inverted them (rank 10 of 40 points: outputs 5.0 off at ``t = ∞``). Rounding to
    float32 leaves the low bits of a result's significand random (all of the last 4 zero for 1 in 16;
    float32 NTKs, empirical and analytic, and RBF kernels: 6 to 11 %), while exact numbers of few bits leave
    them zero: whole numbers (``diag(1, 4)``) and dyadic fractions, such as linear kernels of dyadic inputs
    (``x xᵀ + 1`` of inputs in steps of 1/8, a linear model's NTK: all of them; ``Dense(1, 1, 1)`` of
    ``(1, 0)``, ``(1, 2⁻¹¹)``, ``(0, 1)``: 8 of 9, whose ``t = ∞`` answer read as float32 was 0.5 off), are
    exact float64 kernels and keep float64's."""
    if k.dtype != torch.float64 or not k.numel():
        return k.dtype
    # in blocks of rows: a non-contiguous kernel (a transposed or sliced view) is not copied whole
    rows = k.detach().reshape(-1, k.shape[-1]) if k.dim() else k.detach().reshape(1, 1)
    step = max(1, _CARRIED_BLOCK // rows.shape[1])
    fractional, nonzero, full = False, 0, 0
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        single = block.float()
        if not torch.equal(single.double(), block):
            return k.dtype
        fractional = fractional or not torch.equal(block.round(), block)
        nonzero += int(torch.count_nonzero(single))
        full += int(torch.count_nonzero(single.view(torch.int32) & 0xF))   # the significand's last 4 bits
    return torch.float32 if fractional and 2 * full >= nonzero else k.dtype


def rounding_eps(k: Tensor, given: torch.dtype | None = None) -> float:
    """Relative rounding level of the entries of ``k``: ``ε`` of its dtype, or of ``given`` (the
    dtype the matrix came in before it was cast up for factoring) when that is coarser. A float32
    kernel cast to float64 still carries float32 rounding (~1e-7 of its largest entries)."""
    eps = torch.finfo(k.dtype).eps
    return eps if given is None else max(eps, torch.finfo(given).eps)


def cholesky(k: Tensor, what: str, given: torch.dtype | None = None) -> Tensor:
    """Lower Cholesky factor, or a ``ValueError`` that says how to regularize.

    A matrix counts as singular when the factorization fails or, scaled to unit diagonal
    (``S = D⁻¹ k D⁻¹``, ``D = diag(k)^½``), its smallest eigenvalue falls below ``N · ε`` (numpy's
    rank threshold; ``ε`` the rounding level of the entries, :func:`rounding_eps`: that of ``k``'s
    dtype, or of ``given``, the dtype the kernel came in, if coarser): duplicated points pass a
    plain Cholesky on rounding-level pivots, and solving with them would silently amplify noise
    by ~1e16 (by ~1e7 for a float32 kernel factored in float64). The scaling is what the solve's
    accuracy depends on: Cholesky's backward error in entry ``ij`` is ``~ε sqrt(k_ii k_jj)``
    (Demmel 1989), so its solution is accurate to ``cond(S)``, not ``cond(k)`` (van der Sluis
    1969), and a kernel of training inputs whose norms span decades (``cond(k) = 2e19`` from the
    scales alone for a bias-free ReLU network, ``cond(S) = 1e2``) is not refused. The pivots
    ``L_ii² / k_ii`` bound that eigenvalue only loosely (the last one is about ``λ_min / v_N²`` for
    the null vector ``v``, so a singular matrix whose null vector barely touches the last row
    passed them), so below them :func:`_smallest_eigenvalue_bound` checks it by inverse iteration.

    Relative rounding holds down to the smallest normal number ``tiny`` only: below it (float32
    Jacobian rows of norm 1e-21, float64 inputs of norm 1e-155) entries round absolutely, and a
    singular kernel of such rows scaled to unit diagonal looked regular (test outputs of 1e20
    where the pseudo-inverse gives 0.3). So diagonal entries count as at least ``tiny/ε`` in
    ``D``, and pivots below ``N · tiny`` as zero.
    """
    factor, info = torch.linalg.cholesky_ex(k)
    n = k.shape[-1]
    eps = rounding_eps(k, given)
    tiny = max(torch.finfo(k.dtype).tiny, torch.finfo(given).tiny if given is not None else 0.0)
    diagonal = torch.diagonal(k, dim1=-2, dim2=-1)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1) ** 2
    # a zero diagonal entry has a zero pivot and is caught here, before the scaling divides by it
    singular = bool((info > 0).any()) or bool((pivots <= n * (eps * diagonal + tiny)).any())
    if not singular:
        scale = diagonal.clamp_min(tiny / eps).sqrt()
        singular = bool((_smallest_eigenvalue_bound(factor, scale) <= n * eps).any())
    if singular:
        coarse = (f" A kernel given in lower precision carries rounding of ~{eps:.1e} of its largest entries: "
                  "compute it in float64, or regularize above that level."
                  if eps > torch.finfo(k.dtype).eps else "")
        raise ValueError(f"The {what} is singular or not positive definite to working precision "
                         f"({n} points); duplicate or nearly dependent training points do this. Add a "
                         "diagonal regularizer: diag_reg=1e-6 (relative to the mean diagonal) for "
                         "gradient_flow, or noise=... (absolute variance) for gp_posterior." + coarse)
    return factor


def cholesky_solve(b: Tensor, factor: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ b`` for the lower Cholesky factor ``L``: ``Lᵀ \\ (L \\ b)``, two triangular solves.

    LAPACK's ``potrs`` does the same two solves, but ``torch.cholesky_solve`` first copies the
    whole ``N × N`` factor on the CPU, for every call: that copy was the peak of a posterior's
    setup (the factor, its copy and the regularized kernel: 3 N²), for a few ``N``-vectors.
    """
    return torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, b, upper=False),
                                         upper=True)


def _smallest_eigenvalue_bound(factor: Tensor, scale: Tensor, iterations: int = 3) -> Tensor:
    """An upper bound on ``λ_min`` of ``S = D⁻¹ L Lᵀ D⁻¹`` (``D = diag(scale)``) from ``iterations``
    steps of inverse iteration.

    For a unit vector ``x``, ``‖S⁻¹ x‖ ≤ 1/λ_min``, so ``1/‖S⁻¹ x‖ ≥ λ_min``, and it converges to
    ``λ_min`` at the rate ``λ_min/λ_2``: an isolated rounding-level eigenvalue is found in one step.
    ``S⁻¹ x = D (L Lᵀ)⁻¹ D x``: ``O(N²)`` per step with the factor, against the ``O(N³)``
    factorization, and no scaled copy of it (a third kernel-sized matrix at the peak). A fixed
    start vector keeps the check deterministic.
    """
    n = factor.shape[-1]
    start = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    x = start.to(factor).expand(*factor.shape[:-2], n, 1)
    d = scale.unsqueeze(-1)
    bound = None
    for _ in range(iterations):
        x = d * cholesky_solve(d * x / torch.linalg.vector_norm(x, dim=-2, keepdim=True), factor)
        bound = torch.linalg.vector_norm(x, dim=-2).squeeze(-1).reciprocal()
    assert bound is not None   # iterations >= 1 (the one caller takes the default, 3)
    return bound


def coarser_than_float64(eps: float) -> bool:
    """Whether a kernel of rounding level ``eps`` (:func:`rounding_eps`) carries a coarser rounding than
    float64's (float32 or half precision): the kernels the float32 rules and warnings judge."""
    return eps > torch.finfo(torch.float64).eps


def is_flat(k: Tensor, eps: float) -> bool:
    r"""Whether the entries of the ``N × N`` kernel ``k`` differ only in their last digits: all within
    ``N · ε · max|k|`` of each other (``ε`` their rounding level, :func:`rounding_eps`), but not all
    equal.

    Such a kernel is, to its digits, that of one point repeated: ``‖k − μ 11ᵀ‖₂ ≤ N · spread``, so every
    direction but the mean lies below the null tolerance ``N ε λ_max`` (``λ_max ≈ N μ``), and the
    directions that tell its points apart are rounding. From the digits they look like duplicates'
    (null eigenvalues, test columns at rounding level); for distinct inputs they are real, and a float64
    kernel trains them: the float32 NNGP of the depth-50 erf network ``mlp(50, "erf", 1.76, 1)`` holds two
    values among its 900 entries (3 ulps apart, its float64 entries 1e-7 apart), and its ``t = ∞``
    predictions were 0.99 off float64's (of size 0.90). A kernel whose entries are all equal is left out:
    nothing in it differs from that of copies of one point, whose answer (the targets' mean) it gives.
    """
    if k.shape[-1] < 2 or k.numel() == 0:
        return False
    spread = float(k.amax() - k.amin())
    return 0 < spread <= k.shape[-1] * eps * float(k.abs().amax())


@dataclass(frozen=True)
class Eigensystem:
    """``k = V diag(λ) Vᵀ`` of a positive semi-definite matrix, with ``λ`` clipped at 0.

    ``eps`` is the relative rounding level of ``k``'s entries (:func:`rounding_eps`): that of the
    dtype the kernel came in, which for a float32 kernel factored in float64 is float32's. ``flat``:
    the entries of a kernel carrying a coarser rounding than float64's differ only in their last
    digits (:func:`is_flat`).
    """

    values: Tensor
    vectors: Tensor
    eps: float
    flat: bool = False

    @classmethod
    def of(cls, k: Tensor, check_as: tuple[str, torch.dtype] | None = None) -> Eigensystem:
        """The eigensystem of ``k``; with ``check_as = (name, dtype)`` a ``ValueError`` if ``k`` is
        clearly not positive semi-definite (an eigenvalue below ``−sqrt(ε) · max|λ|``, with ``ε``
        of the dtype the kernel came in: more than rounding can explain), and that ``ε`` is the
        rounding level of ``k`` (its null directions carry eigenvalues of either sign up to
        ~``ε λ_max``, not the ``1e-16 λ_max`` of the float64 it is factored in)."""
        values, vectors = torch.linalg.eigh(k)
        if check_as is not None:
            check_semi_definite(values, *check_as)
        eps = rounding_eps(k, None if check_as is None else check_as[1])
        # float64's: a deep ordered-phase kernel of two values an ulp apart moves its outputs by ~ε λ_max t / N
        # (4.5e-8 at t = 1e8, depth 120), which the training outputs' flat rule took for a warning
        flat = coarser_than_float64(eps) and is_flat(k, eps)
        return cls(values.clamp_min(0), vectors, eps, flat)

    @property
    def rounding_floor(self) -> float:
        """``ε λ_max / N``, about the rounding ``ε K_ii`` of the entries: where a direction counted as
        untrained may be real (a flat kernel's, or one read as a duplicate's), its eigenvalue lies
        anywhere below this, and the warnings take it no smaller."""
        return self.eps * float(self.values.max()) / self.values.shape[-1]

    @property
    def null_tolerance(self) -> Tensor:
        """``N ε λ_max`` (per batch entry, shape ``(..., 1)``): eigenvalues at or below it are rounding
        of zero, the untrained (null) directions at late times (:meth:`Schedule.untrained`)."""
        n = self.values.shape[-1]
        return n * self.eps * self.values.amax(-1, keepdim=True)


@dataclass(frozen=True)
class Schedule:
    """Training times: continuous ``t`` (``τ = η t/m``) or discrete step counts ``s``.

    ``values`` is flat (``T`` entries); ``shape`` is the user's shape (``()`` for a scalar).
    """

    values: Tensor
    shape: torch.Size
    discrete: bool
    learning_rate: float
    m: int

    def doubled(self) -> Schedule:
        """The schedule at twice the time (the NNGP covariance needs ``(1 − decay²)/λ``)."""
        return Schedule(2 * self.values, self.shape, self.discrete, self.learning_rate, self.m)

    def functions(self, eig: Eigensystem) -> tuple[Tensor, Tensor, Tensor]:
        """``decay``, ``growth = 1 − decay`` (from ``expm1``: accurate at tiny times, where
        ``1 − decay`` loses every digit) and ``flow = growth / λ``, each ``(T, N)``.

        Eigenvalues below ``tol = N · ε · λ_max`` are indistinguishable from zero. Up to
        ``τ · tol = sqrt(ε)`` they follow the formulas (``flow ≈ τ``: a small but real eigenvalue
        of a smooth kernel contributes, and rounding noise along a true null direction gains at
        most ``sqrt(ε)/N``); beyond, they count as exactly zero, as at ``t = ∞`` (decay 1, growth
        and flow 0), so that huge times approach ``t = ∞`` instead of multiplying that noise by
        ``τ`` (``t = 1e16`` with duplicated training points had drifted by 7 %).
        """
        lam = eig.values.unsqueeze(-2)                           # (1, N)
        rate = self.learning_rate / self.m
        times = self.values.to(lam.dtype).unsqueeze(-1)           # (T, 1)
        tau = self.tau(lam.dtype).unsqueeze(-1)                   # s steps: the τ of s·η/m
        null = self.untrained(eig)                                               # (T, N)
        safe_lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        if not self.discrete:
            finite = torch.isfinite(tau)
            x = torch.where(finite, tau, 0.0) * lam
            decay = torch.where(finite, torch.exp(-x), 0.0)
            growth = torch.where(finite, -torch.expm1(-x), 1.0)
        else:
            a = rate * lam                                        # per-step contraction ηλ/m
            stable = a < 1
            exponent = times * torch.log1p(-torch.where(stable, a, torch.zeros_like(a)))
            # (1 − a)^s for a ≥ 1: a negative base (a > 1: oscillating below the limit a = 2, diverging above)
            # to a whole power is (−1)^s |1 − a|^s, the sign held constant in s; torch.pow's gradient in s,
            # b^s log b, was NaN there for step counts that require grad
            base = 1 - a
            negative = base < 0
            sign = torch.where(negative & (times.detach().remainder(2) == 1), -1.0, 1.0)
            decay_big = torch.where(negative, sign * torch.pow(torch.where(negative, -base, 1.0), times),
                                    torch.pow(torch.where(negative, 1.0, base), times))
            decay = torch.where(stable, torch.exp(exponent), decay_big)
            growth = torch.where(stable, -torch.expm1(exponent), 1 - decay_big)
        # at λ = 0 the flow is its limit τ (s steps: s·η/m), not 0/0
        flow = torch.where(lam > 0, growth / safe_lam, tau)
        decay, growth = torch.where(null, 1.0, decay), torch.where(null, 0.0, growth)
        return decay, growth, torch.where(null, 0.0, flow)

    def slopes(self, eig: Eigensystem) -> tuple[Tensor, Tensor]:
        """``d/dλ`` of ``growth`` and ``flow`` (:meth:`functions`), each ``(T, N)``; 0 along
        untrained directions, without a graph (second derivatives through
        :func:`matrix_function_product` take :meth:`weight_function` instead).

        With ``x = λτ`` (continuous) ``growth' = τ e^{−x}`` and ``flow' = τ² φ'(x)``, ``φ(x) =
        (1 − e^{−x})/x``; ``φ'`` cancels to ``ε/x²`` for small ``x``, where its series is used
        (:func:`_scaled_phi_slope`). After
        ``s`` stable steps (``a = ηλ/m < 1``, ``u = −s log(1 − a)``, ``ℓ = u/(λτ)``) ``growth' =
        s (η/m) e^{−u}/(1 − a)`` and ``flow' = τ² ℓ² φ'(u) + τ (η/m) e^{−u} N(a)/((1 − a) a²)`` with
        ``N(a) = a − (1 − a)(−log(1 − a)) = Σ_{k≥2} a^k/(k(k−1))`` (series for small ``a``).
        """
        lam = eig.values.detach().unsqueeze(-2)                                  # (1, N)
        tau = self.tau(lam.dtype).detach().unsqueeze(-1)                         # (T, 1)
        rate = self.learning_rate / self.m
        safe_lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        if not self.discrete:
            finite = torch.isfinite(tau)
            x = torch.where(finite, tau, 0.0) * lam
            growth = torch.where(finite, torch.where(finite, tau, 0.0) * torch.exp(-x), 0.0)
            flow = torch.where(finite, _scaled_phi_slope(torch.where(finite, tau, 0.0), lam), -1 / safe_lam ** 2)
        else:
            a = rate * lam
            stable = a < 1
            a_s = torch.where(stable, a, torch.zeros_like(a))
            log_term = -torch.log1p(-a_s)                                        # −log(1 − a) = a ℓ
            ell = torch.where(a_s > 0, log_term / torch.where(a_s > 0, a_s, 1.0), 1.0)
            u = self.values.detach().to(lam.dtype).unsqueeze(-1) * log_term       # (T, N)
            decay = torch.exp(-u)
            steps = self.values.detach().to(lam.dtype).unsqueeze(-1)
            growth_stable = decay * steps * rate / (1 - a_s)
            flow_stable = (_scaled_phi_slope(tau * ell, lam)
                           + tau * rate * decay * _n_over_a2(a_s) / (1 - a_s))
            # beyond the stability limit (a ≥ 1, so λ > 0): no cancellation; no step, no slope
            # ((1 − a)^(s − 1) is 0^(−1) at a = 1, s = 0, and 0 · inf was NaN)
            growth_big = torch.where(steps > 0, steps * rate * torch.pow(1 - a, steps - 1), 0.0)
            flow_big = (growth_big * lam - (1 - torch.pow(1 - a, steps))) / safe_lam ** 2
            growth = torch.where(stable, growth_stable, growth_big)
            flow = torch.where(stable, flow_stable, flow_big)
        null = self.untrained(eig)
        return torch.where(null, 0.0, growth), torch.where(null, 0.0, flow)

    def weight_function(self, eig: Eigensystem, index: int) -> WeightFunction:
        """``(λ, times) ↦`` :meth:`functions` ``[index]`` (1: growth, 2: flow), differentiable in
        both, for :func:`matrix_function_product`."""
        return WeightFunction(self, eig.eps, index)

    def tau(self, dtype: torch.dtype) -> Tensor:
        """``(T,)`` scaled times ``τ = η t / m`` (``s η / m`` for ``s`` steps)."""
        return (self.learning_rate / self.m) * self.values.to(dtype)

    def untrained(self, eig: Eigensystem) -> Tensor:
        """``(T, N)``: the directions that count as exactly null at each time (:meth:`functions`)."""
        lam = eig.values.unsqueeze(-2)
        tau = self.tau(lam.dtype).unsqueeze(-1)
        tol = eig.null_tolerance.unsqueeze(-2)
        # τ = ∞ also where a finite η t/m overflows: then tol = 0 (a zero kernel) gave τ·tol = NaN,
        # not late, and such a time moved the null directions (all of them) as if they trained
        late = torch.isinf(tau) | (tau * tol > eig.eps ** 0.5)
        return (lam <= tol) & late

    def reshape(self, out: Tensor, trailing: int) -> Tensor:
        """``(T, *rest)`` → ``(*shape, *rest)`` (``rest`` has ``trailing`` dimensions)."""
        return out.reshape(*self.shape, *out.shape[out.dim() - trailing:])


@dataclass(frozen=True)
class WeightFunction:
    """:meth:`Schedule.functions` ``[index]`` (1: growth, 2: flow) of the eigenvalues, as a
    function of ``(λ, times)``, and (:meth:`matrices`) of the matrix itself."""

    schedule: Schedule
    eps: float
    index: int

    def at(self, times: Tensor) -> Schedule:
        """This function's schedule at other ``times`` (same kind, learning rate and ``m``)."""
        s = self.schedule
        return Schedule(times, s.shape, s.discrete, s.learning_rate, s.m)

    def __call__(self, values: Tensor, times: Tensor) -> Tensor:
        return self.at(times).functions(Eigensystem(values, values.new_empty(0), self.eps))[self.index]

    def matrices(self, kernel: Tensor, times: Tensor) -> Tensor:
        """``f_t(Θ)`` for every time, ``(T, N, N)``, without an eigendecomposition: growth
        ``I − e^{−Θτ}`` and flow ``Θ⁻¹(I − e^{−Θτ}) = ∫₀^τ e^{−Θu} du``, the upper right block of
        ``exp([[−Θτ, τI], [0, 0]])`` (Van Loan 1978); after ``s`` steps of ``B = I − aΘ``
        (``a = η/m``) ``I − B^s`` and ``a Σ_{j<s} B^j``, the block of ``[[B, aI], [0, I]]^s``; at
        ``t = ∞`` ``I`` and ``Θ⁻¹``. Differentiable to any order through ``matrix_exp``,
        ``matrix_power`` and ``inv``, whose derivatives do not divide by eigenvalue gaps, so
        second derivatives stay exact where eigenvalues tie; the null directions' convention of
        :meth:`Schedule.functions` is not followed (callers use it only where there are none)."""
        n = kernel.shape[-1]
        eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
        zero = torch.zeros_like(eye)
        rate = self.schedule.learning_rate / self.schedule.m
        out = []
        for time in times.unbind(0):
            if not self.schedule.discrete and bool(torch.isinf(time)):
                out.append(eye if self.index == 1 else torch.linalg.inv(kernel))
                continue
            if self.schedule.discrete:
                steps = int(time)
                block = torch.cat([torch.cat([eye - rate * kernel, rate * eye], -1), torch.cat([zero, eye], -1)], -2)
                power = torch.linalg.matrix_power(block, steps)
            else:
                tau = rate * time.to(kernel.dtype)
                block = torch.cat([torch.cat([-tau * kernel, tau * eye], -1), torch.cat([zero, zero], -1)], -2)
                power = torch.linalg.matrix_exp(block)
            out.append(eye - power[:n, :n] if self.index == 1 else power[:n, n:])
        return torch.stack(out)


def _scaled_phi_slope(scale: Tensor, lam: Tensor) -> Tensor:
    """``scale² φ'(x)`` at ``x = scale · λ ≥ 0``, for ``φ(x) = (1 − e^{−x})/x``: the derivative in
    ``λ`` of ``scale · φ(scale λ)``. Below ``x = 0.1``, where ``(x e^{−x} + expm1(−x))/x²`` cancels,
    ``scale²`` times its series ``Σ_{k≥1} (−1)^k k x^{k−1}/(k+1)!`` (16 terms: < ε); above,
    ``(x e^{−x} + expm1(−x))/λ²``, which does not square ``scale`` (``τ²`` overflowed from
    ``τ ≈ 1e154``, and ``inf · 0`` was NaN)."""
    x = scale * lam
    small = x < 0.1
    xs = torch.where(small, x, torch.zeros_like(x))
    series = horner(xs, [(-1) ** k * k / math.factorial(k + 1) for k in range(1, 17)])
    xb = torch.where(small, torch.ones_like(x), x)
    lam_b = torch.where(small, torch.ones_like(x), lam.expand_as(x))
    direct = (xb * torch.exp(-xb) + torch.expm1(-xb)) / lam_b ** 2
    return torch.where(small, torch.where(small, scale, 0.0) ** 2 * series, direct)


def _n_over_a2(a: Tensor) -> Tensor:
    """``(a − (1 − a)(−log(1 − a)))/a² = Σ_{k≥2} a^{k−2}/(k(k−1))`` for ``0 ≤ a < 1`` (the series
    below 0.1, where the difference cancels)."""
    small = a < 0.1
    as_ = torch.where(small, a, torch.zeros_like(a))
    series = horner(as_, [1 / (k * (k - 1)) for k in range(2, 19)])
    ab = torch.where(small, torch.full_like(a, 0.5), a)
    direct = (ab + (1 - ab) * torch.log1p(-ab)) / ab ** 2
    return torch.where(small, series, direct)


def learning_rate_number(learning_rate: object) -> float:
    """``learning_rate`` as a positive float, refusing a tensor that requires grad: read as a number,
    it had no gradient, and autograd said only "does not require grad"."""
    refuse_gradient(learning_rate, "learning_rate", "; differentiate with respect to the time t instead (the "
                    "continuous-time dynamics depend on τ = η t / m only; discrete steps read η as a number).")
    return positive_number(learning_rate, "learning_rate")


def make_schedule(t: Times, steps: Steps, learning_rate: float, m: int, device: torch.device) -> Schedule | None:
    """Validate ``t``/``steps``; ``None`` when both are ``None`` (infinite time, Cholesky path)."""
    learning_rate = learning_rate_number(learning_rate)
    if t is not None and steps is not None:
        raise ValueError("Give either continuous times t or discrete step counts steps, not both.")
    if t is None and steps is None:
        return None
    discrete = steps is not None
    name = "steps" if discrete else "t"
    raw = real_numbers(steps if discrete else t, name)
    if raw.numel() == 0:
        raise ValueError(f"{name} is empty: give at least one time.")
    if bool(torch.isnan(raw).any()):
        raise ValueError(f"{name} must not be NaN.")
    if bool((raw < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {raw.min().item():g}.")
    if discrete and (bool(torch.isinf(raw).any()) or not bool((raw == raw.round()).all())):
        raise ValueError("steps must be finite non-negative integers.")
    return Schedule(raw.reshape(-1).to(device), raw.shape, discrete, learning_rate, m)


def real_numbers(value: object, name: str) -> Tensor:
    """``value`` (a number, nested sequences of numbers, an array or a real tensor) as a float64
    tensor. Booleans and complex numbers are refused: cast to float64 they silently became times
    ``1``/``0`` and the real part (``t=True`` trained for one unit of time, like ``steps=True``)."""
    kind = "a real number, a sequence of real numbers or a real tensor"
    refuse_meta(value, name)   # torch's "Tensor.item() cannot be called on meta tensors" in the first check
    if boolean_or_complex(value):
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    if isinstance(value, Tensor):   # stays where it is (as_tensor would move it to the default device)
        return value.to(torch.float64)
    if torch.is_grad_enabled() and _holds_gradient(value):
        # as_tensor reads them as numbers, with torch's warning alone: t=[t1, 2.0] lost the gradient that
        # t=torch.stack([t1, t2]) gets (and a refusal of t that requires grad was passed by)
        raise ValueError(f"{name} is a sequence holding tensors that require grad, which its conversion to numbers "
                         "drops: pass one tensor (torch.stack([...])), which keeps the gradient where the "
                         "predictor differentiates with respect to it, or detach them.")
    try:   # numbers are checked on the CPU, whatever torch's default device
        return torch.as_tensor(value, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:   # strings, ragged lists, ints beyond float
        raise ValueError(f"{name} must be {kind}, got {value!r} ({err}).") from err


def _holds_gradient(value: object) -> bool:
    """Whether ``value``, nested lists and tuples, holds a tensor that requires grad (each level's
    types collected at C speed first: a list of numbers alone is not walked element by element)."""
    if isinstance(value, Tensor):
        return value.requires_grad
    if not isinstance(value, list | tuple) or not any(issubclass(kind, Tensor | list | tuple)
                                                      for kind in set(map(type, value))):
        return False
    return any(_holds_gradient(v) for v in value)


def spectral_apply(left: Tensor, weights: Tensor, right: Tensor) -> Tensor:
    """``out[t] = left · diag(weights[t]) · right`` for every time ``t``: ``(T, M, k)``.

    ``left`` is ``(M, N)``, ``weights`` ``(T, N)``, ``right`` ``(N, k)``. Done as one ``(M, N) ×
    (N, T·k)`` product: an ``einsum`` would materialize a ``(T, M, N)`` intermediate (3.2 GB for
    N = 4000, M = 1000, T = 100 in float64).
    """
    n_times, n = weights.shape
    k = right.shape[-1]
    scaled = weights.mT.unsqueeze(-1) * right.unsqueeze(-2)                # (N, T, k)
    return (left @ scaled.reshape(n, n_times * k)).reshape(-1, n_times, k).movedim(1, 0)


def matrix_function_product(kernel: Tensor, eig: Eigensystem, schedule: Schedule, index: int,
                            slopes: Tensor | None, right: Tensor, left_eigen: Tensor | None = None,
                            left: Tensor | None = None) -> Tensor:
    r"""``out[t] = L · f_t(Θ) · R`` with ``f_t(Θ) = V diag(f_t(λ)) Vᵀ``, ``(T, M, k)`` (``L = I``
    when ``left`` is ``None``; ``left_eigen`` is ``L V`` if already computed), ``f_t`` the
    ``schedule``'s growth (``index`` 1) or flow (2) at each of its times.

    ``eig`` is the eigensystem of ``kernel`` (``Θ``) without a graph, ``slopes`` the derivatives
    ``f_t'(λ)`` (:meth:`Schedule.slopes`; ``None`` if ``kernel`` needs no gradient). The gradient
    with respect to ``Θ`` is the Daleckii–Krein formula (Higham 2008, "Functions of Matrices",
    Thm. 3.11), ``V (F_t ∘ (Vᵀ Lᵀ G_t Rᵀ V)) Vᵀ`` summed over times, with the divided differences
    ``F_t[i, j] = (f_t(λ_i) − f_t(λ_j)) / (λ_i − λ_j)``, and ``(f_t'(λ_i) + f_t'(λ_j)) / 2`` where
    ``|λ_i − λ_j| ≤ ε^{1/3} max(λ_i, λ_j, 1/τ_t)`` (rounding and truncation errors both
    ``~ε^{2/3}``). Autograd through ``torch.linalg.eigh`` divides by ``λ_i − λ_j`` instead: NaN
    for repeated eigenvalues (one-hot or symmetric inputs, ``Θ ⊗ I``), though ``f_t(Θ)`` is smooth.
    The times' gradient (``t`` that requires grad) is autograd's, through ``f_t(λ)``.

    That backward is not itself differentiable; under ``create_graph=True`` (second derivatives)
    it differentiates the product through ``torch.linalg.eigh`` and ``f_t(λ)`` in both ``λ`` and
    the times instead, exact where eigenvalues are well apart. Where two lie within a relative
    ``ε^{1/3}`` (:func:`_tied`), eigh's derivative divides by their gap (off by 1e14 at a tie),
    so the product is differentiated through ``f_t(Θ)`` formed without eigenvectors
    (:meth:`WeightFunction.matrices`: ``matrix_exp``, ``matrix_power``, ``inv``), up to
    :data:`EXACT_TIES_BUDGET` times × ``N³`` (it costs ~1000× the eigh path). Where the kernel
    also has null directions at those times (duplicated points, late), which that form does not
    treat as :meth:`Schedule.functions` does, for step counts that require grad, and above the
    budget, eigh it stays for the second derivatives, with a ``RuntimeWarning``
    (:func:`warn_if_tied`), while the first derivatives' values stay Daleckii–Krein's.
    """
    if left_eigen is None and left is not None:
        left_eigen = left @ eig.vectors
    weight_fn = schedule.weight_function(eig, index)
    with torch.no_grad():
        weights = weight_fn(eig.values.detach(), schedule.values.detach())
    tau = schedule.tau(eig.values.dtype).detach()
    return _MatrixFunctionProduct.apply(kernel, left, right, schedule.values, weights, slopes, tau,
                                        eig.values.detach(), eig.vectors.detach(), left_eigen, weight_fn)


class _MatrixFunctionProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, left, right, times, weights, slopes, tau, values, vectors, left_eigen, weight_fn):
        a = vectors if left is None else left_eigen                         # (M, N)
        p = vectors.mT @ right                                              # (N, k)
        ctx.save_for_backward(a, p, weights, slopes, tau, values, vectors, kernel, left, right, times)
        ctx.has_left, ctx.weight_fn = left is not None, weight_fn
        return spectral_apply(a, weights, p)

    @staticmethod
    def backward(ctx, grad):
        a, p, weights, slopes, tau, values, vectors, kernel, left, right, times = ctx.saved_tensors
        need_kernel, need_left, need_right, need_times = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():   # create_graph: a graph of the backward itself is wanted
            return _differentiable_backward(ctx, grad, kernel, left, right, times)
        h = a.mT @ grad                                                    # Aᵀ G_t: (T, N, k)
        g_kernel = g_left = g_right = g_times = None
        if need_times:
            with torch.enable_grad():
                leaf = times.detach().requires_grad_()
                (g_times,) = torch.autograd.grad(ctx.weight_fn(values, leaf), leaf, (h * p).sum(-1))
        if need_right:
            g_right = vectors @ (weights.unsqueeze(-1) * h).sum(0)
        if need_left and ctx.has_left:
            q = weights.unsqueeze(-1) * p                                  # (T, N, k)
            n_times, m, k = grad.shape
            g_left = (grad.movedim(0, 1).reshape(m, n_times * k) @ q.mT.reshape(n_times * k, -1)) @ vectors.mT
        if need_kernel:
            lam_i, lam_j = values.unsqueeze(-1), values.unsqueeze(-2)
            diff = lam_i - lam_j
            gap = diff.abs()
            cube_root_eps = torch.finfo(values.dtype).eps ** (1 / 3)
            # close at every time: |Δλ| ≤ ε^{1/3} max(λ_i, λ_j); at time t also |Δλ| τ_t ≤ ε^{1/3}
            close_always = gap <= cube_root_eps * torch.maximum(lam_i.abs(), lam_j.abs())
            inverse = torch.where(close_always, 0.0, 1 / torch.where(close_always, 1.0, diff))
            tau = tau.to(values.dtype)
            inner = torch.zeros_like(diff)
            for t in range(weights.shape[0]):
                w, s = weights[t], slopes[t]
                close = close_always | (gap * tau[t] <= cube_root_eps)
                divided = torch.where(close, (s.unsqueeze(-1) + s.unsqueeze(-2)) / 2,
                                      (w.unsqueeze(-1) - w.unsqueeze(-2)) * inverse)
                inner.addcmul_(divided, h[t] @ p.mT)
            g_kernel = vectors @ ((inner + inner.mT) / 2) @ vectors.mT
        return g_kernel, g_left, g_right, g_times, *([None] * 7)


def _differentiable_backward(ctx, grad: Tensor, kernel: Tensor, left: Tensor | None, right: Tensor,
                             times: Tensor) -> tuple:
    """The backward of :class:`_MatrixFunctionProduct` as a graph: autograd through ``eigh`` (whose
    own backward is twice differentiable) and through the weights ``f_t(λ)`` in ``λ`` and the
    times together (their mixed second derivatives included)."""
    # only tensors need a gradient (left is None for the training outputs)
    inputs = cast("dict[int, Tensor]",
                  {i: t for i, t in enumerate((kernel, left, right, times)) if ctx.needs_input_grad[i]})
    values, vectors = torch.linalg.eigh(kernel)
    weight_fn: WeightFunction = ctx.weight_fn
    pairs = _tied(values.detach())
    tied = ctx.needs_input_grad[0] and bool(pairs.any())
    if tied:
        eig = Eigensystem(values.detach().clamp_min(0), vectors.detach(), weight_fn.eps)
        n, n_times = kernel.shape[-1], times.shape[0]
        # not for step counts that want a gradient (matrix_power takes an integer: none would come back);
        # nor where it costs too much: each time differentiates a (2N)² matrix_exp twice, 0.6 s + 0.5 s
        # at N = 100 and 16 s + 103 s at N = 200 with 20 times (one thread), against 0.1 s through eigh
        if (not weight_fn.at(times.detach()).untrained(eig).any() and n_times * n**3 <= EXACT_TIES_BUDGET
                and not (weight_fn.schedule.discrete and ctx.needs_input_grad[3])):
            # through eigh the second derivatives divided by the gap: off by 1e14 at a tie (inputs ±e_i)
            functions = weight_fn.matrices(kernel, times)                          # (T, N, N)
            out = functions @ right if left is None else left @ (functions @ right)  # no (T, M, N) product
            grads = (torch.autograd.grad(out, list(inputs.values()), grad, create_graph=True, allow_unused=True)
                     if out.requires_grad else [None] * len(inputs))   # growth at t = ∞ is I: no graph
            return _per_input(inputs, grads)
        warn_if_tied(values.detach(), pairs)
    weights = weight_fn(values.clamp_min(0), times)
    a = vectors if left is None else left @ vectors
    out = spectral_apply(a, weights, vectors.mT @ right)
    result = _per_input(inputs, torch.autograd.grad(out, list(inputs.values()), grad, create_graph=True,
                                                    allow_unused=True))
    if tied:
        # the first derivatives' values through eigh were wrong at the tie too (NaN where it is exact):
        # Daleckii–Krein's values, carrying eigh's graph for the second derivatives the warning is about
        with torch.no_grad():
            values_dk = _MatrixFunctionProduct.backward(ctx, grad)
        result = tuple(g if g is None else values_dk[i] + (g - g.detach()).nan_to_num(0.0, 0.0, 0.0)
                       for i, g in enumerate(result))
    return result


def _per_input(inputs: dict[int, Tensor], grads: Sequence[Tensor | None]) -> tuple:
    """The backward's 11 gradients: ``grads`` at the positions of ``inputs``, ``None`` elsewhere."""
    result: list[Tensor | None] = [None] * 11
    for i, g in zip(inputs, grads, strict=True):
        result[i] = g
    return tuple(result)


#: Second derivatives at tied eigenvalues take the eigendecomposition-free matrix functions up to this
#: many (number of times) × N³ (N = 100 at 10 times: about 10 s on one thread); beyond, eigh, with a warning.
EXACT_TIES_BUDGET = 10**7


def _tied(values: Tensor) -> Tensor:
    """Which neighbours of the ascending eigenvalues above the null tolerance ``N ε λ_max`` lie
    within a relative ``ε^{1/3}`` of each other, ``(N − 1,)``."""
    eps = torch.finfo(values.dtype).eps
    upper, lower = values[..., 1:], values[..., :-1]
    return (lower > values.shape[-1] * eps * values[..., -1:].abs()) & (upper - lower <= eps ** (1 / 3) * upper)


def warn_if_tied(values: Tensor, tied: Tensor) -> None:
    """Warn where second derivatives through ``torch.linalg.eigh`` lose their digits: two of the
    ascending eigenvalues ``values`` above the null tolerance ``N ε λ_max`` lie within a relative
    ``ε^{1/3}`` of each other (``tied``, from :func:`_tied`). Its backward divides by their gap, so the second
    derivatives lose about ``ε/δ²`` at a relative gap ``δ`` (3 % at 1.5e-7) and are wrong at a
    tie, by 1e14 for the NTK of inputs ±e_i (the eigenvalue 1.9 repeated to 4e-16), though
    finite. Eigenvalues below the tolerance tie freely without harm: their directions carry
    almost nothing of the kernel's derivative (a smooth 1-D kernel of 100 points, gaps of 1e-17
    there: exact)."""
    if bool(tied.any()):
        upper, lower = values[..., 1:], values[..., :-1]
        where = tied.nonzero()[0].tolist()
        a, b = float(lower[tuple(where)]), float(upper[tuple(where)])
        warnings.warn(f"Second derivatives of the training dynamics differentiate torch.linalg.eigh, whose "
                      f"derivative divides by eigenvalue gaps: the training kernel has eigenvalues {a:.6g} and "
                      f"{b:.6g} within {(b - a) / b:.1e} of each other ({int(tied.sum())} such pair(s)), where "
                      "the eigendecomposition-free form does not apply (null directions, duplicated points, at "
                      "these times; step counts that require grad; or more than EXACT_TIES_BUDGET = "
                      f"{EXACT_TIES_BUDGET:.0e} times × N³); so they lose about eps/gap² of their digits and are "
                      "wrong at a tie. First derivatives are exact there.",
                      RuntimeWarning, stacklevel=caller_stacklevel(skip=("ntkgp.", "torch.")))


def flatten_full_kernel(kernel: Tensor) -> Tensor:
    """A full ``(R, C, k, k)`` kernel as the ``(R k, C k)`` kernel of the flattened outputs,
    ``Θ[(r, i), (c, j)] = Θ_rc,ij`` (the layout neural-tangents flattens to as well)."""
    rows, cols, k1, k2 = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(rows * k1, cols * k2)


@neural_tangents_keywords(eps="no guard against a zero divisor is needed: a kernel whose largest eigenvalue is 0 "
                               "never moves the outputs, and its limit is inf.")
def max_learning_rate(ntk_train_train: Tensor, y_train_size: int | None = None, momentum: float = 0.0) -> float:
    """Largest stable full-batch learning rate, ``2 (1 + momentum) m / λ_max(Θ)``.

    Gradient descent on ``(1/2m) ‖f − Y‖²`` contracts iff ``|1 − ηλ/m| < 1`` for all
    eigenvalues: a step multiplies the residual's eigen-component of ``λ`` by ``1 − ηλ/m``
    (the linearized dynamics of Lee et al. 2019; neural-tangents' ``max_learning_rate``; ``m``
    defaults to ``N``). A zero kernel
    never moves the outputs, so every rate is stable: ``inf``. ``momentum`` is heavy-ball
    momentum in ``[0, 1)``. A full ``(N, N, k, k)`` kernel (as :func:`gradient_descent_mse` takes)
    is the ``(N k, N k)`` kernel of the flattened outputs, and ``m`` defaults to ``N k``.
    """
    if not isinstance(ntk_train_train, Tensor) or not ntk_train_train.is_floating_point():
        # the spec itself is the likeliest mistake: every other function of ntkgp.predict takes it
        raise kernel_matrix_error(ntk_train_train, "ntk_train_train",
                                  "for the spec itself, ntkgp.predict.GradientFlow(net, x_train, y_train)"
                                  ".max_learning_rate is this limit")
    k = ntk_train_train.detach()
    shape = tuple(k.shape)
    if k.dim() == 4 and shape[0] == shape[1] and shape[2] == shape[3]:
        k = flatten_full_kernel(k)
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0 or not all_finite(k, "ntk_train_train"):
        raise ValueError(f"ntk_train_train must be a finite square (N, N) or full (N, N, k, k) kernel with N >= 1, "
                         f"got shape {shape}.")
    # eigvalsh reads one triangle: an asymmetric matrix would pass with half of it ignored (checked in
    # the given dtype, whose rounding the tolerance allows for)
    check_symmetric(k, "ntk_train_train")
    k = k.to(torch.float64)
    m = k.shape[-1] if y_train_size is None else integer_at_least(y_train_size, 1, "y_train_size")
    kind = "a number in [0, 1)"
    beta = finite_number(momentum, "momentum", kind)
    if not 0 <= beta < 1:
        raise ValueError(f"momentum must be {kind}, got {momentum!r}.")
    values = torch.linalg.eigvalsh(k)
    # judged as gradient_descent_mse and gradient_descent judge it: a float32 kernel cast up keeps float32's
    # rounding, whose null eigenvalues (-2.2e-6 of 83: a rank-10 J Jᵀ of 40 points) refused it here alone
    check_semi_definite(values, "ntk_train_train", carried_dtype(ntk_train_train))
    # the float, not momentum: a tensor momentum made the limit a 0-d tensor, where a float is promised
    return stability_limit(float(values[-1]), m, beta)


#: Why a kernel that is not positive semi-definite is refused.
NOT_A_TANGENT_KERNEL = "a tangent kernel is a Gram matrix of Jacobians"


def check_semi_definite(values: Tensor, name: str, dtype: torch.dtype) -> None:
    """``ValueError`` unless the eigenvalues ``values`` are those of a positive semi-definite
    matrix given in ``dtype``, up to rounding (``λ_min ≥ −sqrt(ε) · max|λ|``)."""
    if values.numel() == 0:
        return
    values = values.detach()   # eigenvalues of a kernel computed with gradients on: the check needs no graph
    scale = float(values.abs().max())
    if float(values.min()) < -torch.finfo(dtype).eps ** 0.5 * scale:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalues from {float(values.min()):.3g} to "
                         f"{float(values.max()):.3g}): {NOT_A_TANGENT_KERNEL}.")


def check_semi_definite_by_cholesky(kernel: Tensor, name: str, given: torch.dtype) -> None:
    """``ValueError`` unless ``kernel`` is positive semi-definite up to rounding, by one Cholesky
    factorization (``N³/3`` flops, a fraction of the eigendecomposition :func:`check_semi_definite`
    reads), for callers that have no eigenvalues to hand (:func:`~ntkgp.predict.gradient_descent`).

    A non-PSD kernel is no tangent kernel, and along a negative eigenvalue the flow grows
    exponentially instead of converging: the outputs came back finite but meaningless (2.6e32 for
    the squared loss at ``t = 1000``, one eigenvalue of -1.8 against 3.5), or after a long
    integration as an overflow blamed on the loss.
    Scaled to largest entry 1, ``Θ + δ I`` with ``δ = 2 sqrt(ε) ‖Θ‖_F`` (``ε`` of the coarser of
    ``given``, the dtype the kernel came in, and the integration's) factors whenever
    ``λ_min ≥ −sqrt(ε) max|λ|``, what :func:`check_semi_definite` accepts (``‖Θ‖_F ≥ max|λ|``), and
    is refused only below ``−2 sqrt(ε) ‖Θ‖_F``, at most ``2 sqrt(N)`` times that bound.
    """
    with torch.no_grad():
        largest = _largest_magnitude(kernel) if kernel.numel() else 0.0
        if largest == 0.0:   # the zero kernel: nothing moves, as in gradient_descent_mse
            return
        unit = kernel.detach() / largest   # one copy, shifted in place: the factor is the only other
        shift = 2 * rounding_eps(unit, given) ** 0.5 * float(torch.linalg.matrix_norm(unit))
        unit.diagonal().add_(shift)
        _, info = torch.linalg.cholesky_ex(unit)
        if int(info) != 0:
            raise ValueError(f"{name} is not positive semi-definite (Cholesky fails even with a shift of "
                             f"{shift * largest:.3g}): {NOT_A_TANGENT_KERNEL}, and along a negative eigenvalue "
                             "the outputs would grow without bound.")


def check_symmetric(k: Tensor, name: str, scale: float = 0.0, full: bool = False) -> None:
    """``ValueError`` unless ``k`` is symmetric up to ``sqrt(ε)`` of its largest entry, or of ``scale``
    where that is larger (the scale ``k`` was computed at: a posterior covariance near the data is
    small beside its prior); only one triangle would be used otherwise. ``full``: ``k`` is a full
    ``(N, N, k, k)`` kernel, whose transpose is ``Θ_ji,ba`` (that of :func:`flatten_full_kernel`'s matrix)."""
    if not k.numel():
        return
    k = k.detach()   # a kernel computed with gradients on: the check needs no graph
    # the full kernel's: k.mT swaps the outputs alone, and the advice below (k + k.mT) / 2 was refused again
    transpose, written = (k.permute(1, 0, 3, 2), "k.permute(1, 0, 3, 2)") if full else (k.mT, "k.mT")
    # largest magnitudes from aminmax: .abs() would add an N × N copy to each operand
    scale, asymmetry = max(_largest_magnitude(k), scale), _largest_magnitude(k - transpose)
    # a float32 kernel cast up carries float32's rounding (2.4e-7 apart on some BLAS): judged by it
    if asymmetry > torch.finfo(k.dtype).eps ** 0.5 * scale and (
            asymmetry > torch.finfo(carried_dtype(k)).eps ** 0.5 * scale):
        raise ValueError(f"{name} must be symmetric: it differs from its transpose by {asymmetry:.3g} "
                         f"(scale {scale:.3g}); if that is rounding (a kernel computed in a lower precision, "
                         f"then cast), pass (k + {written}) / 2.")


def _largest_magnitude(k: Tensor) -> float:
    """``max |k_ij|`` of a non-empty tensor, without forming ``|k|``."""
    low, high = torch.aminmax(k)
    return max(-float(low), float(high))


def stability_limit(lambda_max: float, m: int, momentum: float = 0.0) -> float:
    """``2 (1 + momentum) m / λ_max``, ``inf`` when ``λ_max ≤ 0``."""
    return 2 * (1 + momentum) * m / lambda_max if lambda_max > 0 else math.inf


def is_regular(k: Tensor, given: torch.dtype | None = None) -> bool:
    """Whether :func:`cholesky` accepts ``k``: nonsingular to working precision once scaled to unit
    diagonal, so that none of its directions is an exact null direction."""
    try:
        cholesky(k.detach(), "kernel", given)
    except ValueError:
        return False
    return True


def warn_if_unresolved(test_eigen: Tensor | None, right: Tensor, result: Tensor, schedule: Schedule,
                       eig: Eigensystem, regular: Callable[[], bool]) -> None:
    """Warn where :meth:`Schedule.functions` sets untrained a direction that moves the test outputs
    (``test_eigen = None``: the training outputs, whose ``K V = V Λ``).

    ``result[t] = test_eigen · diag(flow[t]) · right`` is what was computed, ``(T, M, k)``.
    A direction of eigenvalue below ``N ε λ_max`` is an exact null direction (a duplicated point)
    only if the test–train kernel has no component along it beyond rounding; its column of
    ``test_eigen = K*d V`` then holds ~``ε`` of the largest entry (measured: 6e-17 for a duplicate),
    and ``100 N ε`` separates it. Two training points ``δ`` apart instead give a column of
    ~``δ``: the direction is real but its eigenvalue (~``δ²``) is below what the kernel's digits
    resolve. Such a direction, trained, adds at most ``min(τ, 1/λ) |K*d v| |vᵀ right|`` (the flow's
    bound); where that exceeds ``sqrt(ε)`` of the result, setting it untrained changed the answer, and
    no answer from these digits is reliable: a regularizer makes it well defined.

    The converse also happens: an eigenvalue above ``sqrt(N) ε λ_max`` (rounding the entries moves an
    exact null direction's by ~``ε λ_max``) is resolved, so its direction is real, while its column of
    the test kernel is at rounding level. A depth-50 erf NTK in float32 (ordered phase: ``λ_max = 57``,
    the rest from 3e-3 to 2e-6, columns of ~1e-6 beside 10) dropped such directions at ``t = 1e6`` as a
    duplicate's, and its test outputs were 0.68 off the float64 kernels' (of size 0.82) without a
    word; these directions count as real now, and the warning says to compute in float64 where the
    kernel carries float32 rounding.

    That comparison with the largest column misses real directions when the training inputs'
    norms span decades: a point of norm 1e-6 beside one of 1e6 (bias-free ReLU) has a column of
    2e-7 under the 8e-7 that the large point's column sets, and ``t = inf`` read 0.5 where the
    answer is 1.6e5, without a word. ``regular()`` (evaluated only here, when some direction is
    dropped: one more factorization) says whether the kernel scaled to unit diagonal is
    nonsingular to working precision (:func:`is_regular`, the test ``t = None`` applies): then it
    has no exact null directions, and every dropped one is real.
    """
    check = UnresolvedCheck(schedule, eig, regular)
    if test_eigen is None:
        check.add_training(result)
    else:
        check.add(test_eigen, result)
    check.warn(right)


class UnresolvedCheck:
    """:func:`warn_if_unresolved` for test points taken in blocks: :meth:`add` each block's
    ``test_eigen = K*d V`` and result, then :meth:`warn` once. The warning reads two maxima over
    the test rows alone (each direction's largest ``|K*d v|``, each time's largest output), which
    accumulate block by block exactly (a maximum of maxima), so it fires on the same condition as
    for the whole matrix, once. Nothing is accumulated where no direction is untrained at any time
    (the usual case: no ``(M, N)`` absolute value is formed then)."""

    def __init__(self, schedule: Schedule, eig: Eigensystem, regular: Callable[[], bool],
                 real_below: Callable[[Tensor], bool] | None = None) -> None:
        self.schedule, self.eig, self.regular, self.real_below = schedule, eig, regular, real_below
        self.untrained = schedule.untrained(eig)                                 # (T, N)
        self.active = bool(self.untrained.any())
        self.seen: Tensor | None = None       # (N,): max over the rows so far of |test_eigen|
        self.largest: Tensor | None = None    # (T,): max over the rows so far of |result[t]|
        self.outputs = "test"

    def add(self, test_eigen: Tensor, result: Tensor) -> None:
        """Take in the rows ``test_eigen`` ``(M_b, N)`` and their outputs ``result`` ``(T, M_b, k)``."""
        if not self.active or test_eigen.shape[-2] == 0:
            return
        with torch.no_grad():   # maxima to compare, no graph (t may require grad)
            seen = test_eigen.abs().amax(-2)
            largest = result.detach().abs().flatten(1).amax(-1)
        self.seen = seen if self.seen is None else torch.maximum(self.seen, seen)
        self.largest = largest if self.largest is None else torch.maximum(self.largest, largest)

    def add_training(self, result: Tensor) -> None:
        """The training outputs ``result`` ``(T, N, k)``, whose ``K V = V Λ``: the columns of ``V Λ``,
        without forming it (a regularized duplicate left the training outputs off Y by 0.83 at
        t = inf, silently, while t = None fitted them)."""
        if not self.active:
            return
        eig = self.eig
        values = eig.values
        if eig.flat:   # its dropped eigenvalues are rounding, the real ones anywhere below the rounding floor
            values = values.clamp_min(eig.rounding_floor)
        self.seen = values * torch.linalg.vector_norm(eig.vectors, ord=math.inf, dim=-2)
        self.largest = result.detach().abs().flatten(1).amax(-1)
        self.outputs = "training"

    def warn(self, right: Tensor) -> None:
        """Warn (once) if a dropped direction moves the outputs added (see :func:`warn_if_unresolved`)."""
        if self.seen is None or self.largest is None:   # nothing untrained, or no test points
            return
        _warn_unresolved(self.seen, self.largest, right, self.untrained, self.schedule, self.eig, self.regular,
                         self.outputs, self.real_below)


def _warn_unresolved(seen: Tensor, largest: Tensor, right: Tensor, untrained: Tensor, schedule: Schedule,
                     eig: Eigensystem, regular: Callable[[], bool], outputs: str,
                     real_below: Callable[[Tensor], bool] | None = None) -> None:
    """:func:`warn_if_unresolved` from its maxima: ``seen`` ``(N,)`` the largest ``|K*d v|`` of each
    direction, ``largest`` ``(T,)`` the largest output at each time.

    ``real_below(directions)`` (for a kernel that carries a coarser rounding than float64's and is not
    flat, asked only where it decides a warning): whether the directions ``(N,)`` that count as a
    duplicate's hold real ones, which a float64 kernel resolves. Below float32's null tolerance a smooth
    kernel of distinct inputs has such directions, whose test columns float32 rounds to a duplicate's size
    (``mlp(2, "erf", 2, 0)`` on 30 inputs of scale 0.1 in d = 1, NTK at ``t = inf`` with float32 factors:
    0.83 off float64's, silently). Their columns being rounding, the flow's bound on them (``λ`` no smaller
    than ``ε λ_max / N``, as for a flat kernel) is an estimate, and it warns as :func:`warn_if_imprecise`
    does, above :data:`IMPRECISE` (1 %) of the outputs, not ``sqrt(ε)``."""
    n = seen.shape[-1]
    # an eigenvalue above sqrt(N) ε λ_max is one the kernel's digits resolve: rounding the entries moves an
    # exact null direction's by ~ε λ_max (30 null eigenvalues of ±2e-6 beside λ_max = 95 for a float32 J Jᵀ
    # of rank 10), so such a direction is real whatever its test column, which rounding may have swamped
    # (a depth-50 erf NTK in float32, eigenvalues 57 and ~1e-4: columns of ~1e-6 beside 10, read as a
    # duplicate's and dropped at t = 1e6 without a word, test outputs 0.68 off float64's)
    resolved = eig.values > math.sqrt(n) * eig.eps * eig.values.amax(-1, keepdim=True)
    real = (seen > 100 * n * eig.eps * seen.max()) | resolved
    # a flat kernel (is_flat) drops the directions its rounding erased, not duplicates': the training outputs
    # miss the targets' part along them, which float64 fits (the float32 NNGP of mlp(50, "erf", 1.76, 1):
    # 1.09 off at t = inf, silently). The test outputs' share is warn_if_flow_imprecise's
    flat = eig.flat and outputs == "training"
    real = real | flat
    if bool((untrained & ~real).any()) and regular():
        real = seen > 0
    dropped = untrained & real
    # directions counted as a duplicate's that may be real (a flat kernel's test outputs are
    # warn_if_flow_imprecise's, as above); judged below, where they would decide a warning
    possible = untrained & ~real
    if real_below is None or not coarser_than_float64(eig.eps) or eig.flat:
        possible = torch.zeros_like(possible)
    if not bool((dropped | possible).any()):
        return
    tau = schedule.tau(seen.dtype).unsqueeze(-1)                                 # (T, 1)
    # trained, a direction of eigenvalue λ adds flow · (its column) · (its target component), with flow at
    # most min(τ, 1/λ) (continuous time and stable steps alike)
    lam = eig.values.unsqueeze(-2)
    flow = torch.where(lam > 0, torch.minimum(tau, 1 / torch.where(lam > 0, lam, 1.0)), tau)   # (T, N)
    per_direction = seen * right.abs().amax(-1)
    # the possible directions' eigenvalues are rounding: real ones lie anywhere below the rounding floor
    guessed = torch.minimum(tau, 1 / lam.clamp_min(eig.rounding_floor)) * per_direction

    def total(mask: Tensor, each: Tensor) -> Tensor:
        return torch.where(mask & (per_direction > 0), each, 0.0).sum(-1)

    hit = total(dropped, flow * per_direction) > eig.eps ** 0.5 * largest
    maybe = total(possible, guessed) > IMPRECISE * largest
    if bool((maybe & ~hit).any()) and real_below is not None and real_below(possible.any(0)):
        hit, dropped = hit | maybe, dropped | possible
    if bool(hit.any()):
        first = float(schedule.values[hit].min().detach())   # t may require grad
        when = f"after {first:g} steps and more" if schedule.discrete else f"at t = {first:g}"
        when += "" if schedule.discrete or math.isinf(first) else " and later"
        warnings.warn(f"{when.capitalize()}, {int(dropped[hit].any(0).sum())} direction(s) of the training kernel "
                      "with eigenvalues below its rounding level (N·ε·λ_max) count as untrained, but move the "
                      f"{outputs} outputs ("
                      + ("a kernel whose entries differ only in their last digits, as if its points were copies of "
                         "one point; " if flat else "")
                      + "nearly duplicate training points, training inputs whose norms span decades, "
                      "or points far from the training inputs of a smooth kernel): from then on the predictions "
                      f"depend on digits the kernel does not hold. {_regularizer_hint(eig)} (t=None solves a kernel "
                      "that is only badly scaled exactly)." + _precision_hint(eig.eps),
                      RuntimeWarning, stacklevel=caller_stacklevel())


def _regularizer_hint(eig: Eigensystem) -> str:
    """The ``diag_reg`` that lifts every eigenvalue of this kernel to twice its null tolerance
    ``N ε λ_max``, relative to ``trace/N`` (the default scale) and absolute. A fixed "1e-6" fell short
    where the kernel carries float32 rounding or ``λ_max`` is many times ``trace/N``: a float32
    erf kernel of 300 points with ``diag_reg=1e-3`` still dropped directions at ``t = inf``, 5 % off,
    where this asks for 8e-3 (1e-2: 8e-5 off, no warning)."""
    n = eig.values.shape[-1]
    lift = 2 * n * eig.eps * float(eig.values.max())
    mean_variance = float(eig.values.sum()) / n
    if mean_variance == 0:   # a zero training kernel (bias-free ReLU of zero inputs): any regularizer
        return "Add diag_reg for a well-defined answer"
    return (f"Add diag_reg, or raise it, to about {lift / mean_variance:.1g} or more (relative to trace/N, the "
            f"default scale; {lift:.1g} with diag_reg_absolute_scale=True) for a well-defined answer")


def _precision_hint(eps: float) -> str:
    """The advice for kernels that carry a coarser rounding ``eps`` than float64's: compute them in float64."""
    if not coarser_than_float64(eps):
        return ""
    return (f" The kernel carries rounding of ~{eps:.1e} (float32 or coarser): computed and factored in float64 "
            "(float64 inputs to net.kernel; factor_dtype=torch.float64, the predictors' default) it resolves "
            "these directions.")


#: Estimated rounding error of the test outputs, relative to their size, above which :func:`warn_if_imprecise`
#: warns.
IMPRECISE = 1e-2

#: :func:`warn_if_imprecise`'s explanation of the estimate where no other is given.
LARGE_COEFFICIENTS = "through dual coefficients Θ⁻¹(I − e^{−Θτ})Y that this ill-conditioned kernel makes large"

#: The same for a GP posterior (``GPPosterior``, ``NetworkGP``): its coefficients are no flow's, and the flow's
#: ``Θ⁻¹(I − e^{−Θτ})Y`` named a time the posterior does not have.
POSTERIOR_COEFFICIENTS = "through dual coefficients (K + σ²I)⁻¹Y that this ill-conditioned kernel makes large"


#: The training points of :func:`warn_if_imprecise`'s probe of a network's float32 kernel (evenly spaced): its
#: :func:`entry_error` there, twice, decides whether the error is measured on :data:`ENTRY_POINTS`. No bound known
#: beforehand serves: the root mean square grows with depth without limit (float32 NTKs on 100 standard-normal
#: points in d = 3: 8.3 ulps for ``mlp(50, "erf", 2.25, 1)``, 72 for ``mlp(100, "relu")``, 210 at depth 150,
#: 5 200 for ``mlp(300, "relu", 2, 0.5)``), and an allowance of 100 ulps left the latter's ``t = None`` flow 3.6e-2
#: off, silently. On 16 points it read 0.83 to 1.8 times the measure on 100 (NNGPs and NTKs of nine networks,
#: depths 1 to 300, three seeds), at the cost of two ``16 × 16`` kernels (one, the float64, where the float32
#: training kernel is at hand: a ``NetworkGP``'s).
ENTRY_PROBE = 16


#: The training points :func:`sampled_entry_error` measures at most (evenly spaced): the measure is a mean
#: square over ``n²`` entries of one kind, which ``256² = 65 536`` of them estimate to a few percent, and a
#: float32 user's ``N × N`` kernel formed again in float64 could be what float32 was chosen to avoid.
ENTRY_POINTS = 256


def sampled_entry_error(kernel_of: Callable[[Tensor], Tensor | None], x: Tensor, variances: Tensor,
                        points: int = ENTRY_POINTS, computed: Tensor | None = None) -> float:
    """:func:`entry_error` of the kernel ``kernel_of(x)`` (in ``x``'s dtype) against ``kernel_of`` of ``x`` in
    float64, on at most ``points`` evenly spaced training points, ``variances`` ``(N,)`` the training
    variances of all ``N`` (the scale ``d_i d_j`` of each entry). ``computed``, the ``(N, N)`` kernel of ``x``
    already computed (a GP's training kernel, the very one factored), gives the sampled entries in place of
    ``kernel_of`` of the sample: only the float64 kernel is formed. A ``kernel_of`` that does not compute in
    float64 (a kernel of one's own in its parameters' dtype; ``None`` for one that cannot take float64 points) has
    no reference to measure against: ``0``."""
    n = x.shape[0]
    index = torch.linspace(0, n - 1, min(n, points), device=x.device).round().long()
    sample = x[index]
    exact = kernel_of(sample.to(torch.float64))   # first: without it the sample's own kernel is not needed
    if exact is None or exact.dtype != torch.float64:
        return 0.0
    kernel = kernel_of(sample) if computed is None else computed[index.unsqueeze(-1), index]
    if kernel is None:
        return 0.0
    return entry_error(kernel, exact, variances[index])


def kernel_entry_error(kernel_of: Callable[[Tensor], Tensor | None], x: Tensor, variances: Tensor,
                       computed: Tensor | None = None) -> Callable[[int], float]:
    """:func:`warn_if_imprecise`'s ``entry_eps`` for a predictor whose training kernel is ``kernel_of(x)`` (``x``
    in the factoring dtype): ``points ->`` :func:`sampled_entry_error` (``computed`` as there), ``variances``
    ``(N,)`` the training variances it is factored with, measured once for each number of points (the probe
    and the measure are each asked again at every prediction)."""
    measured: dict[int, float] = {}

    @outside_inference_mode
    def entry_eps(points: int) -> float:
        points = min(points, x.shape[0])
        if points not in measured:
            measured[points] = sampled_entry_error(kernel_of, x, variances.to(torch.float64), points, computed)
        return measured[points]

    return entry_eps


def training_kernel_error(net: Layer, x: Tensor, ntk: bool, variances: Tensor) -> Callable[[int], float]:
    """:func:`kernel_entry_error` of ``net``'s training NTK (``ntk``) or NNGP at ``x``."""

    def kernel_of(points: Tensor) -> Tensor:
        with torch.no_grad(), named_kernels("training"):
            k = net.kernel(points, ntk=ntk)
        return cast(Tensor, k.ntk) if ntk else k.nngp

    return kernel_entry_error(kernel_of, x, variances)


def entry_error(kernel: Tensor, exact: Tensor, variances: Tensor | None = None) -> float:
    """The error of the entries of ``kernel`` against ``exact`` (the same kernel in float64) as
    :func:`warn_if_imprecise` models it, ``|E_ij| ≈ ε d_i d_j`` with random signs (``d = sqrt(variances)``, by
    default ``exact``'s diagonal): the root mean square of ``E_ij / (d_i d_j)`` once its part proportional
    to the kernel is taken out.

    That part (``E = α K``: a deep recursion's fixed point rounded the same way at every layer) scales the
    kernel, and moves the outputs by ``α`` at most (``K* K⁻¹`` not at all where the test kernel shares it),
    not by the estimate's ``α max(d) ‖d ∘ c‖``; and the estimate sums errors of random signs, so the mean
    square is its measure, not the largest entry, which reads a kernel's few worst entries as all of them.
    Measured (float32 NTKs on 100 standard-normal points in d = 3): 0.24 ulps for ``mlp(1, "relu")``, whose
    entries are rounded once; 3.4 for ``mlp(20, "erf", 2, 1)``, 8.3 for ``mlp(50, "erf", 2.25, 1)`` (the
    largest entry's 58, the proportional part 32), where the ``t = None`` outputs were 3.8 to 13 times the
    estimate at ``ε`` off (30 and 100 points, three seeds)."""
    variances = exact.diagonal(dim1=-2, dim2=-1) if variances is None else variances.to(torch.float64)
    d = variances.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    scale = d.unsqueeze(-1) * d.unsqueeze(-2)
    exact = exact.detach()
    error, shape = (kernel.detach().to(torch.float64) - exact) / scale, exact / scale
    if not error.numel():
        return 0.0
    norm = float((shape * shape).sum())
    alpha = float((error * shape).sum()) / norm if norm > 0 else 0.0
    return float((error - alpha * shape).square().mean().sqrt())


def warn_if_imprecise(coefficients: Tensor, outputs: Tensor, variances: Tensor, eps: float,
                      schedule: Schedule | None = None, remedy: str | None = None, factor_eps: float = 0.0,
                      cause: str | None = None, entry_eps: Callable[[int], float] | None = None) -> None:
    r"""Warn where rounding of kernels given or factored in float32 can move the test outputs
    ``K*d c`` by more than :data:`IMPRECISE` (1 %) of their size, ``c`` being the dual coefficients
    ``Θ⁻¹(I − e^{−Θτ}) Y`` (``Θ⁻¹ Y`` at ``t = None``; ``(K + σ²I)⁻¹ Y`` for a GP posterior).

    Entries rounded relatively, ``|E_ij| ≲ ε d_i d_j`` with ``d_i = sqrt(K_ii)`` (``variances`` the
    training kernel's diagonal; :func:`rounding_eps`'s ``ε``), move the outputs, to first order, by
    ``E*d c + K*d Θ⁻¹ E c``; with rounding errors of random signs each term is about
    ``ε max(d) ‖d ∘ c‖₂`` (the second for test points among the training inputs, where ``K*d Θ⁻¹``
    selects rows; ``max(d)`` stands for the test points' own ``d``). A factorization in a dtype of
    rounding ``ε_f`` (``factor_eps``: float32 factors) adds a third term of the same form, its
    backward error ``|ΔK_ij| ≲ ε_f d_i d_j`` (Demmel 1989); the estimate is the sum,
    ``(2ε + ε_f) max(d) ‖d ∘ c‖₂``. That is the conditioning of this particular answer rather than
    ``cond(Θ) ε``, which a smooth target can be far from. Measured against float64 (docs/numerics.md):
    for the posteriors of a depth-50 erf network on 30 points with ``noise = 1e-4`` and float32 factors
    (whose float32-computed entries are also up to 17 ulps off) 0.94 to 2.8 times the errors where these
    are large (1.9e-2 to 0.18); for a two-layer ReLU network on 50 points at most 1.0e-3 (errors up to
    1e-4), so 1 % warns on the former and none of the latter. One term alone (the estimate until then)
    read 5.8e-3 for the NTK-GP of ``mlp(50, "erf", 1, 0.1)``, whose float32 mean was 1.9e-2 off, silently.

    Float64 kernels are left to :func:`cholesky` and :func:`warn_if_unresolved`: there the estimate
    passes 1 % only for coefficients ~1e13 times the outputs over the kernel's scale, and ``max(d)``
    overstates it where the test points' variances are far below the largest training variance
    (inputs whose norms span decades, exact to 1e-10: 1.5e4 % with the largest variance for all ``d``).
    Outputs that are exactly 0, or not finite (above the stability limit), are not judged.

    ``coefficients`` ``(T, N, k)`` (or ``(N, k)`` for one time), ``outputs`` the matching
    ``(T, M, k)`` (or ``(M, k)``); ``variances`` ``(N,)``, or ``(T, N)``, a row for each (a posterior's
    outputs with a noise each, passed as ``T`` one-output problems); ``schedule`` names the times;
    ``remedy`` replaces the advice (factoring in float64) where the coefficients' own rounding is the
    cause (:func:`gradient_descent`'s float32 integration: ``ε`` relative errors of ``c`` move the
    outputs by the same estimate), and ``cause`` the explanation of large coefficients
    (:func:`warn_if_flow_imprecise`'s flat kernels, a posterior's :data:`POSTERIOR_COEFFICIENTS`).

    ``entry_eps(points)`` (a predictor that computes its kernels in float32 from a network, which can form the
    float64 kernel: :func:`sampled_entry_error` on at most ``points`` training points) measures the entries' own
    error, which a deep recursion makes many times their rounding: the float32 NTK of ``mlp(50, "erf", 2.25, 1)``
    on 100 standard-normal points is 8.3 ulps off as :func:`entry_error` measures it (58 at its worst entry), and
    ``GradientFlow(..., factor_dtype=torch.float32)``'s ``t = None`` outputs were 1.4e-2 off float64's where the
    estimate at ``ε`` read 3.7e-3, silently. Where ``ε`` does not warn, a probe on :data:`ENTRY_PROBE` points
    says whether the error can decide (twice the probe's, in place of ``ε``, reaches the line); only then is it
    measured on :data:`ENTRY_POINTS` and replaces ``ε`` where larger.
    """
    if not coarser_than_float64(eps) or outputs.numel() == 0 or coefficients.numel() == 0:
        return
    with torch.no_grad():
        d = variances.detach().clamp_min(0).sqrt().to(coefficients.dtype)
        c = coefficients.detach().reshape(-1, *coefficients.shape[-2:])
        # each output against its own size where the outputs' last axis is the coefficients' (T, M, k): judged
        # together, the largest coefficients against the largest output, an output 2.7e-2 off beside one 100
        # times its size was silent (a GPPosterior of two outputs with one noise, float32)
        k = c.shape[-1] if c.shape[-1] > 1 and outputs.shape[-1] == c.shape[-1] else 1
        out = outputs.detach().reshape(c.shape[0], -1, k)
        norms = torch.linalg.vector_norm(d.unsqueeze(-1) * c, dim=-2)                            # (T, k)
        norms = norms if k > 1 else norms.amax(-1, keepdim=True)
        largest = d.amax(-1, keepdim=True) if d.dim() > 1 else float(d.max())                 # (T, 1) or a number
        estimate, size = (2 * eps + factor_eps) * largest * norms, out.abs().amax(-2)         # (T, k) each
        judged = torch.isfinite(estimate) & torch.isfinite(size) & (size > 0)
        hit = judged & (estimate > IMPRECISE * size)
        source = "rounding"   # "their rounding (1.2e-07 of each entry)"
        if entry_eps is not None and not bool(hit.any()):
            # a deep kernel's error has no bound known beforehand: the probe, which read at least 0.83 times the
            # measure, tells whether it can reach the line (ENTRY_PROBE); the measure on more points decides
            probe = 2 * entry_eps(ENTRY_PROBE)
            if probe > eps and bool((judged & ((2 * probe + factor_eps) * largest * norms > IMPRECISE * size)).any()):
                measured = entry_eps(ENTRY_POINTS)
                if measured > eps:
                    eps, source = measured, "error against float64, root mean square"
                    estimate = (2 * eps + factor_eps) * largest * norms
                    hit = judged & (estimate > IMPRECISE * size)
        if not bool(hit.any()):
            return
        relative = float((estimate[hit] / size[hit]).max())
    when = "T"
    if schedule is not None:
        first = float(schedule.values[hit.any(-1)].min().detach())   # the times need not be sorted
        when = f"After {first:g} steps" if schedule.discrete else f"At t = {first:g}"
        when += (" and more" if schedule.discrete else "" if math.isinf(first) else " and later") + ", t"
    if remedy is None:
        remedy = ("Compute and factor the kernels in float64 (float64 inputs to net.kernel; "
                  "factor_dtype=torch.float64, the predictors' default), or regularize more (diag_reg, noise).")
    warnings.warn(f"{when}he test outputs depend on the kernels' last digits: their {source} ({eps:.1e} of each "
                  f"entry) can move them by about {100 * relative:.2g} % of their size, "
                  f"{cause or LARGE_COEFFICIENTS}. {remedy}", RuntimeWarning,
                  stacklevel=caller_stacklevel())


def warn_if_flow_imprecise(eig: Eigensystem, flow: Tensor | None, right: Tensor, outputs: Tensor, variances: Tensor,
                           schedule: Schedule, entry_eps: Callable[[int], float] | None = None) -> None:
    """:func:`warn_if_imprecise` at the ``schedule``'s times, with the flow's dual coefficients
    ``V diag(flow[t]) Vᵀ Y`` (``right = Vᵀ Y``; ``flow=None``: the schedule's, computed here), formed
    only for a kernel that carries a coarser rounding than float64's (``eig.eps``; the only kernels
    judged); ``ε_f`` that of the dtype it was factored in.

    A flat kernel (:func:`is_flat`: its entries differ only in their last digits) is judged with the
    directions that count as untrained (:meth:`Schedule.untrained`) trained: they are not duplicates'
    but directions its rounding erased, which a float64 kernel trains, moving the outputs by the
    coefficients they take then, ``flow ≤ min(τ, 1/λ)`` (the flow's bound), ``λ`` taken no smaller than
    the entries' rounding (:attr:`Eigensystem.rounding_floor`), below which eigenvalues are noise. Dropped, their
    coefficients are 0, and the float32 NNGP of ``mlp(50, "erf", 1.76, 1)`` (entries 3 ulps apart) gave
    ``t = ∞`` outputs 0.99 off float64's (of size 0.90) without a word; now the estimate reads 30 to 52
    times the outputs there, and 7.2 % at ``t = 1e5`` (outputs 1.3 % off; quiet up to ``t = 1e4``,
    1.3e-3 off). At finite times it is a bound: the directions' real columns are at most the rounding,
    and may be far below it (the float64 NNGP of ``(1.5, 1)`` spans 3.5e-10 of its entries, its float32
    one 1 ulp: estimate 6.5 % at ``t = 1e5``, error 4e-5). ``entry_eps``: :func:`warn_if_imprecise`'s (a deep
    kernel's own error moves the outputs at every time: ``mlp(300, "relu", 2, 1)``'s float32 flow on 30 points
    was 4.3e-2 off at ``t = 1`` as at ``t = ∞``)."""
    if not coarser_than_float64(eig.eps):
        return
    if flow is None:
        flow = schedule.functions(eig)[2]
    cause = None
    if eig.flat:
        untrained = schedule.untrained(eig)
        if bool(untrained.any()):
            lam = eig.values.detach().clamp_min(eig.rounding_floor).unsqueeze(-2)               # (1, N)
            tau = schedule.tau(lam.dtype).unsqueeze(-1)                                        # (T, 1)
            flow = torch.where(untrained, torch.minimum(tau, 1 / lam), flow)
            cause = ("through the directions that tell the training points apart: the training kernel's entries "
                     f"all lie within N·ε (N = {eig.values.shape[-1]}) of its largest, so to its digits its points are "
                     "copies of one point, and these directions, which count as untrained here, are its rounding; "
                     "a kernel that holds them trains them")
    warn_if_imprecise(spectral_apply(eig.vectors, flow.detach(), right), outputs, variances, eig.eps, schedule,
                      factor_eps=torch.finfo(eig.values.dtype).eps, cause=cause, entry_eps=entry_eps)


def warn_if_unstable(learning_rate: float, limit: float, *dtypes: torch.dtype, covariance: bool = True,
                     hint: str = "") -> None:
    """Discrete gradient descent at ``η ≥ 2m/λ_max`` does not converge: the top mode oscillates
    with factor ``1 − ηλ_max/m ≤ −1`` (and grows above the limit). ``hint``, where given, ends the message.

    Above the limit the mode grows by ``g = 2η/limit − 1`` per step, so the covariance (``∝ g^{2s}``)
    overflows the narrowest of ``dtypes`` (the dtypes the values pass through) after about
    ``ln(max)/(2 ln g)`` steps and the mean after twice as many; the warning says when (for one
    network's outputs, ``covariance=False``, only the latter).
    """
    if learning_rate < limit:
        return
    message = (f"learning_rate={learning_rate:g} is at or above the stability limit 2m/λ_max = {limit:g}: "
               "discrete gradient descent does not converge.")
    growth = 2 * learning_rate / limit - 1
    if growth > 1 + 1e-9 and dtypes:   # at the limit itself (up to rounding) nothing grows
        largest = min(torch.finfo(dtype).max for dtype in dtypes)
        steps = math.log(largest) / math.log(growth)
        narrowest = min(dtypes, key=lambda d: torch.finfo(d).max)
        when = (f"the covariance overflows {narrowest} (inf, then NaN) after about {round(steps / 2)} steps, the "
                f"mean after about {round(steps)} steps" if covariance else
                f"the outputs overflow {narrowest} (inf, then NaN) after about {round(steps)} steps")
        message += f" The top mode grows by {growth:.4g}x per step: {when}."
    warnings.warn(message + hint, RuntimeWarning, stacklevel=caller_stacklevel())
