"""Independent 2-D Gaussian quadrature (numpy/scipy only) used as the oracle for closed forms.

``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` with ``u = L11 z1``,
``v = L21 z1 + L22 z2`` (Cholesky factor, ``z ~ N(0, I)``):

* ``cartesian``: tensor-product Gauss–Hermite in ``(z1, z2)``, exponentially convergent for
  smooth ``f, g``;
* ``polar``: for activations with a kink or jump at 0 (ReLU family, sign), where Gauss–Hermite
  converges only algebraically. In polar coordinates ``z = r(cos ψ, sin ψ)`` the integrand is
  smooth within each angular sector between the directions where ``u = 0`` or ``v = 0``: each
  sector gets Gauss–Legendre in ``ψ``, and the radial integral ``∫ f(a r) g(b r) r e^{−r²/2} dr``
  becomes Gauss–Laguerre in ``t = r²/2`` (exact for positively homogeneous ``f, g``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.special


def _cholesky(k11: float, k12: float, k22: float) -> tuple[float, float, float]:
    l11 = math.sqrt(k11)
    l21 = k12 / l11 if l11 > 0 else 0.0
    l22 = math.sqrt(max(k22 - l21 * l21, 0.0))
    return l11, l21, l22


def cartesian(f, g, k11: float, k12: float, k22: float, degree: int = 160) -> float:
    nodes, weights = scipy.special.roots_hermite(degree)
    z = nodes * math.sqrt(2.0)
    w = weights / math.sqrt(math.pi)
    l11, l21, l22 = _cholesky(k11, k12, k22)
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    return float(np.einsum("i,j,ij->", w, w, f(l11 * z1) * g(l21 * z1 + l22 * z2)))


def polar(f, g, k11: float, k12: float, k22: float, angular: int = 60, radial: int = 40) -> float:
    l11, l21, l22 = _cholesky(k11, k12, k22)
    # Directions where u = 0 (cos ψ = 0) or v = 0 (l21 cos ψ + l22 sin ψ = 0) split [0, 2π).
    cuts = {0.0, math.pi / 2, 3 * math.pi / 2, 2 * math.pi}
    if l22 > 0 or l21 != 0:
        psi = math.atan2(-l21, l22) % math.pi
        cuts |= {psi, psi + math.pi}
    cuts = sorted(c for c in cuts if 0 <= c <= 2 * math.pi)
    x, wx = scipy.special.roots_legendre(angular)
    t, wt = scipy.special.roots_laguerre(radial)
    r = np.sqrt(2 * t)
    total = 0.0
    for lo, hi in itertools.pairwise(cuts):
        if hi - lo < 1e-15:
            continue
        psi = (hi - lo) / 2 * x + (hi + lo) / 2
        a = l11 * np.cos(psi)
        b = l21 * np.cos(psi) + l22 * np.sin(psi)
        inner = (f(np.outer(a, r)) * g(np.outer(b, r))) @ wt
        total += (hi - lo) / 2 * float(inner @ wx)
    return total / (2 * math.pi)
