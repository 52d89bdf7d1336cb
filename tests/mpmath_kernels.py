"""High-precision references for the activations' Gaussian expectations, in mpmath.

``reference(name, params)`` returns ``f(k11, k12, k22) -> (T, Ṫ)`` on ``mpf`` arguments (the float64
inputs converted exactly). The formulas are the closed forms of the class docstrings and
docs/theory.md, written independently of the library's evaluation order (at 50 digits the
cancellations the library avoids cost nothing); polynomial activations go through Isserlis'
recursion for the moments ``E[u^i v^j]`` instead of the library's Hermite expansion, and the
rectified monomials through Cho & Saul's closed ``J_0 .. J_3`` instead of its recursion. Each is
checked against mpmath's own 2-D quadrature in tests/test_accuracy.py (:func:`quadrature`).
"""

from __future__ import annotations

import functools

import mpmath as mp
from mpmath import mpf

DPS = 50


def dense_pair(xs, ys, weight_var, bias_var):
    """A first ``Dense`` layer's ``k11, k12, k22`` of two inputs (lists of ``mpf``) at the working precision,
    ``σ_w² x·y / d + σ_b²``, and the magnitude of ``k12``'s terms, ``σ_w² Σ|x_i y_i| / d + σ_b²``."""
    w, c, d = mpf(weight_var), mpf(bias_var), len(xs)
    pairs = list(zip(xs, ys, strict=True))
    k12 = w * sum(u * v for u, v in pairs) / d + c
    size = w * sum(abs(u * v) for u, v in pairs) / d + c
    return w * sum(u * u for u in xs) / d + c, k12, w * sum(v * v for v in ys) / d + c, size


def _det(k11, k12, k22):
    return k11 * k22 - k12 * k12   # exact at 50 digits for float64 inputs


def _angle(k11, k12, k22):
    """``s`` and ``θ``; a rounded ``ρ = ±1`` (``|k12| > sqrt(k11 k22)`` by an ulp) clamped to ``s = 0``."""
    s = mp.sqrt(max(_det(k11, k12, k22), 0))
    if s == 0 and k12 == 0:
        return s, mp.pi / 2
    return s, mp.atan2(s, k12)


def _abrelu(a, b):
    a, b = mpf(a), mpf(b)

    def f(k11, k12, k22):
        s, theta = _angle(k11, k12, k22)
        dot = a * b + (a - b) ** 2 * (mp.pi - theta) / (2 * mp.pi)
        return (a - b) ** 2 * s / (2 * mp.pi) + dot * k12, dot
    return f


def _erf(a, b, c):
    a, b, c = mpf(a), mpf(b), mpf(c)

    def f(k11, k12, k22):
        q11, q22, r = 1 + 2 * b * b * k11, 1 + 2 * b * b * k22, 2 * b * b * k12
        t = a * a * 2 / mp.pi * mp.asin(r / mp.sqrt(q11 * q22)) + c * c
        return t, a * a * b * b * 4 / mp.pi / mp.sqrt(q11 * q22 - r * r)
    return f


def _gelu():
    def f(k11, k12, k22):
        p = (1 + k11) * (1 + k22)
        delta = mp.sqrt(p - k12 * k12)
        alpha = mp.atan2(k12, delta)
        t = k12 / 4 + (k12 * alpha + (k12 * k12 + k11 * k22 * delta**2) / (p * delta)) / (2 * mp.pi)
        dot = mpf(1) / 4 + alpha / (2 * mp.pi) + k12 * (1 / delta**2 + (1 - k11 * k22) / p + 1) / (2 * mp.pi * delta)
        return t, dot
    return f


def _sin(a, b, c, cosine=False):
    # φ = a sin(bx + c) (cosine: a cos(bx + c)); T = a²/2 (e^A − cos 2c e^B), Ṫ = a²b²/2 (e^A + cos 2c e^B)
    # with A − B = 2b²k12, written e^B (e^{A−B} ∓ cos 2c) and 1 ∓ cos 2c taken exactly from c
    a, b, c = mpf(a), mpf(b), mpf(c)
    cos2c = -mp.cos(2 * c) if cosine else mp.cos(2 * c)

    def f(k11, k12, k22):
        b2 = b * b
        eb = mp.exp(-b2 * (k12 + (k11 + k22) / 2))
        gap = mp.expm1(2 * b2 * k12)
        return a * a / 2 * eb * (gap + (1 - cos2c)), a * a * b2 / 2 * eb * (gap + (1 + cos2c))
    return f


def _rbf(gamma):
    gamma = mpf(gamma)

    def f(k11, k12, k22):
        t = mp.exp(-gamma * (k11 + k22 - 2 * k12))
        return t, 2 * gamma * t
    return f


def _gabor():
    def f(k11, k12, k22):
        det = _det(k11, k12, k22)
        d = 1 + 2 * (k11 + k22) + 4 * det
        g = (k11 + k22 + 4 * det) / (2 * d)
        h = k12 / d
        env = mp.exp(-g) / mp.sqrt(d)
        t = env * mp.sinh(h)
        dot = env * (4 * k12 * mp.sinh(h) * (d + 1 + k11 + k22) + mp.cosh(h) * (d + 8 * k12 * k12)) / d**2
        return t, dot
    return f


def _exp(a, b):
    a, b = mpf(a), mpf(b)

    def f(k11, k12, k22):
        t = a * a * mp.exp(b * b * (k11 + 2 * k12 + k22) / 2)
        return t, b * b * t
    return f


def _gaussian(a, b):
    a, beta = mpf(a), -mpf(b)

    def f(k11, k12, k22):
        d = 1 + 2 * beta * (k11 + k22) + 4 * beta * beta * _det(k11, k12, k22)
        return a * a / mp.sqrt(d), 4 * a * a * beta * beta * k12 / d ** mpf(1.5)
    return f


def _sign():
    def f(k11, k12, k22):
        if k11 == 0 or k22 == 0:
            return mpf(0), mpf(0)
        _, theta = _angle(k11, k12, k22)
        return 1 - 2 * theta / mp.pi, mpf(0)
    return f


def _moments(k11, k12, k22, n):
    """``E[u^i v^j]`` for ``i, j ≤ n`` by Isserlis:
    ``E[u^i v^j] = (i−1) k11 E[u^{i−2} v^j] + j k12 E[u^{i−1} v^{j−1}]``."""
    m = {}
    for i in range(n + 1):
        for j in range(n + 1):
            if i == 0:
                m[i, j] = (mp.fac2(j - 1) * k22 ** (j // 2)) if j % 2 == 0 else mpf(0)
            else:
                m[i, j] = ((i - 1) * k11 * m[i - 2, j] if i >= 2 else 0) + (j * k12 * m[i - 1, j - 1] if j else 0)
    return m


def _poly_pair(c, k11, k12, k22):
    m = _moments(k11, k12, k22, len(c) - 1)
    return mp.fsum(ci * cj * m[i, j] for i, ci in enumerate(c) for j, cj in enumerate(c) if ci and cj)


def _polynomial(coefficients):
    c = [mpf(x) for x in coefficients]
    d = [i * x for i, x in enumerate(c)][1:] or [mpf(0)]

    def f(k11, k12, k22):
        return _poly_pair(c, k11, k12, k22), _poly_pair(d, k11, k12, k22)
    return f


def _hermite_coefficients(n):
    """``He_n(x)/sqrt(n!)``, lowest power first (``He_{n+1} = x He_n − n He_{n−1}``)."""
    prev, cur = [mpf(1)], [mpf(0), mpf(1)]
    if n == 0:
        return prev
    for k in range(1, n):
        nxt = [mpf(0), *cur]
        for i, x in enumerate(prev):
            nxt[i] -= k * x
        prev, cur = cur, nxt
    return [x / mp.sqrt(mp.factorial(n)) for x in cur]


def _hermite(n):
    return _polynomial(_hermite_coefficients(n))


def _j(n, theta):
    """Cho & Saul's ``J_n(θ)`` for ``n ≤ 3`` (their eq. 7 and its higher-degree forms)."""
    s, c, rest = mp.sin(theta), mp.cos(theta), mp.pi - theta
    if n == 0:
        return rest
    if n == 1:
        return s + rest * c
    if n == 2:
        return 3 * s * c + rest * (1 + 2 * c * c)
    if n == 3:
        return 4 * s**3 + 15 * s * c * c + rest * (9 * s * s * c + 15 * c**3)
    raise ValueError(f"no closed form here for degree {n} (> 3): check it by quadrature instead")


def _rectified(n):
    def t(m, k11, k12, k22):
        _, theta = _angle(k11, k12, k22)
        return mp.sqrt(k11 * k22) ** m * _j(m, theta) / (2 * mp.pi)

    def f(k11, k12, k22):
        # J_n ≈ δ^{2n+1} near θ = π: 100 digits keep ~40 of them at a correlation of −1 + 1e-12
        with mp.workdps(100):
            value = t(n, k11, k12, k22)
            dot = n * n * t(n - 1, k11, k12, k22) if n else mpf(0)
        return +value, +dot
    return f


FACTORIES = {
    "ABReLU": _abrelu, "Erf": _erf, "GELU": _gelu, "Sin": _sin, "Rbf": _rbf, "Gabor": _gabor, "Exp": _exp,
    "Gaussian": _gaussian, "Sign": _sign, "Polynomial": _polynomial, "Hermite": _hermite,
    "RectifiedMonomial": _rectified,
}


@functools.cache
def reference(kind: str, params: tuple):
    """``(k11, k12, k22) -> (T, Ṫ)`` in mpmath for the activation ``kind`` with constants ``params``,
    built and evaluated at :data:`DPS` digits whatever the caller's precision."""
    with mp.workdps(DPS):
        f = _sin(*params, cosine=True) if kind == "Cos" else FACTORIES[kind](*params)

    @functools.cache
    def evaluate(k11, k12, k22):
        with mp.workdps(DPS):
            return f(mpf(k11), mpf(k12), mpf(k22))
    return evaluate


def phi(kind: str, params: tuple):
    """``φ`` and ``φ'`` in mpmath, for :func:`quadrature`."""
    p = [mpf(x) for x in params] if kind not in ("Polynomial", "Hermite", "RectifiedMonomial") else []
    if kind == "ABReLU":
        a, b = p
        return (lambda x: a * x if x < 0 else b * x), (lambda x: a if x < 0 else b)
    if kind == "Erf":
        a, b, c = p
        return (lambda x: a * mp.erf(b * x) + c), (lambda x: a * b * 2 / mp.sqrt(mp.pi) * mp.exp(-(b * x) ** 2))
    if kind == "GELU":
        return (lambda x: x * mp.ncdf(x)), (lambda x: mp.ncdf(x) + x * mp.npdf(x))
    if kind in ("Sin", "Cos"):
        a, b, c = p
        if kind == "Cos":
            c = c + mp.pi / 2
        return (lambda x: a * mp.sin(b * x + c)), (lambda x: a * b * mp.cos(b * x + c))
    if kind == "Rbf":
        w = mp.sqrt(2 * p[0])
        return ((lambda x: mp.sqrt(2) * mp.sin(w * x + mp.pi / 4)),
                (lambda x: mp.sqrt(2) * w * mp.cos(w * x + mp.pi / 4)))
    if kind == "Gabor":
        return (lambda x: mp.exp(-x * x) * mp.sin(x)), (lambda x: mp.exp(-x * x) * (mp.cos(x) - 2 * x * mp.sin(x)))
    if kind == "Exp":
        a, b = p
        return (lambda x: a * mp.exp(b * x)), (lambda x: a * b * mp.exp(b * x))
    if kind == "Gaussian":
        a, b = p
        return (lambda x: a * mp.exp(b * x * x)), (lambda x: 2 * a * b * x * mp.exp(b * x * x))
    if kind == "Sign":
        return mp.sign, (lambda x: mpf(0))
    if kind in ("Polynomial", "Hermite"):
        c = [mpf(x) for x in params[0]] if kind == "Polynomial" else _hermite_coefficients(params[0])
        d = [i * x for i, x in enumerate(c)][1:] or [mpf(0)]
        return (lambda x: mp.polyval(c[::-1], x)), (lambda x: mp.polyval(d[::-1], x))
    if kind == "RectifiedMonomial":
        n = params[0]
        if n == 0:
            return (lambda x: mpf(1) if x > 0 else mpf(0)), (lambda x: mpf(0))
        return (lambda x: x**n if x > 0 else mpf(0)), (lambda x: n * x ** (n - 1) if x > 0 else mpf(0))
    raise KeyError(kind)


def quadrature(g, k11, k12, k22):
    """``E[g(u) g(v)]`` over ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` for a smooth ``g`` by nested
    ``mp.quad`` over the standard normals ``u = sqrt(k11) z1``, ``v = (k12/sqrt(k11)) z1 + σ z2``."""
    k11, k12, k22 = mpf(k11), mpf(k12), mpf(k22)
    r1 = mp.sqrt(k11)
    slope = k12 / r1
    sigma = mp.sqrt(_det(k11, k12, k22) / k11)

    def inner(z1):
        gu = g(r1 * z1)
        if gu == 0:
            return mpf(0)
        return gu * mp.quad(lambda z2: g(slope * z1 + sigma * z2) * mp.npdf(z2), cuts)

    # standard normals truncated at ±10 (a tail of 1.5e-23), split for tanh-sinh's sake
    cuts = [-10, 0, 10]
    return mp.quad(lambda z1: inner(z1) * mp.npdf(z1), cuts)


def polar_quadrature(g, degree, k11, k12, k22):
    """``E[g(u) g(v)]`` for ``g`` positively homogeneous of ``degree`` (``g(rx) = r^degree g(x)``): with
    ``(u, v) = L (r cos t, r sin t)``, ``L`` the Cholesky factor, ``E[r^{2n}] = 2^n n!`` leaves the 1-D
    ``2^n n!/(2π) ∫ g(u(t)) g(v(t)) dt`` by ``mp.quad``, split where ``u`` or ``v`` changes sign."""
    k11, k12, k22 = mpf(k11), mpf(k12), mpf(k22)
    r1 = mp.sqrt(k11)
    slope, sigma = k12 / r1, mp.sqrt(_det(k11, k12, k22) / k11)
    kinks = {(mp.atan2(-slope, sigma) + j * mp.pi) % (2 * mp.pi) for j in (0, 1)}   # v = 0
    cuts = sorted({mpf(0), mp.pi / 2, 3 * mp.pi / 2, 2 * mp.pi} | kinks)
    integral = mp.quad(lambda t: g(r1 * mp.cos(t)) * g(slope * mp.cos(t) + sigma * mp.sin(t)), cuts)
    return 2**degree * mp.factorial(degree) / (2 * mp.pi) * integral


# ------------------------------------------------------------------ means and centred kernels
def _mean_polynomial(c, k):
    """``Σ_i c_i E[u^i]``, ``E[u^{2m}] = (2m − 1)!! k^m``."""
    return mp.fsum(ci * mp.fac2(i - 1) * k ** (i // 2) for i, ci in enumerate(c) if ci and i % 2 == 0)


def _mean(kind: str, params: tuple):
    """``k -> E[φ(u)]``, ``u ~ N(0, k)``, from the closed Gaussian integrals (each checked against
    ``mp.quad`` over the normal density in tests/test_accuracy_float32.py)."""
    p = [mpf(x) for x in params] if kind not in ("Polynomial", "Hermite", "RectifiedMonomial") else []
    if kind == "ABReLU":   # E[max(u, 0)] = −E[min(u, 0)] = sqrt(k/(2π))
        a, b = p
        return lambda k: (b - a) * mp.sqrt(k / (2 * mp.pi))
    if kind == "Erf":       # erf is odd
        return lambda k: p[2]
    if kind == "GELU":      # E[u Φ(u)] = k E[ϕ(u)] = k/sqrt(2π(1 + k)) (Stein)
        return lambda k: k / mp.sqrt(2 * mp.pi * (1 + k))
    if kind in ("Sin", "Cos"):   # E[sin(bu + c)] = sin(c) e^{−b²k/2}
        a, b, c = p
        phase = mp.cos(c) if kind == "Cos" else mp.sin(c)
        return lambda k: a * phase * mp.exp(-b * b * k / 2)
    if kind == "Rbf":       # √2 sin(π/4) = 1
        return lambda k: mp.exp(-p[0] * k)
    if kind in ("Gabor", "Sign"):   # odd
        return lambda k: mpf(0)
    if kind == "Exp":
        a, b = p
        return lambda k: a * mp.exp(b * b * k / 2)
    if kind == "Gaussian":  # E[e^{b u²}] = (1 − 2bk)^{−1/2}
        a, b = p
        return lambda k: a / mp.sqrt(1 - 2 * b * k)
    if kind in ("Polynomial", "Hermite"):
        c = [mpf(x) for x in params[0]] if kind == "Polynomial" else _hermite_coefficients(params[0])
        return lambda k: _mean_polynomial(c, k)
    if kind == "RectifiedMonomial":   # E[max(u, 0)^n] = k^{n/2} 2^{n/2} Γ((n + 1)/2) / (2 sqrt(π))
        n = params[0]
        return lambda k: k ** (mpf(n) / 2) * 2 ** (mpf(n) / 2) * mp.gamma(mpf(n + 1) / 2) / (2 * mp.sqrt(mp.pi))
    raise KeyError(kind)


#: digits of the centred kernels: ``T − μ1μ2`` cancels to ``~ρ`` of ``T`` (``1e-9`` at the grid's smallest
#: correlation) and ``~b²k`` at small variances (``1e-12``), a loss of up to ~21 of the 50 digits
CENTRED_DPS = 90


@functools.cache
def mean_reference(kind: str, params: tuple):
    """``k -> E[φ(u)]`` in mpmath at :data:`DPS` digits, ``k`` converted exactly."""
    with mp.workdps(DPS):
        m = _mean(kind, params)

    @functools.cache
    def evaluate(k):
        with mp.workdps(DPS):
            return +m(mpf(k))
    return evaluate


@functools.cache
def centred_reference(kind: str, params: tuple):
    """``(k11, k12, k22) -> (T − μ(k11) μ(k22),)``, the covariance of ``φ(u)`` and ``φ(v)``: the
    difference taken at :data:`CENTRED_DPS` digits, then rounded to :data:`DPS`."""
    with mp.workdps(CENTRED_DPS):
        f = _sin(*params, cosine=True) if kind == "Cos" else FACTORIES[kind](*params)
        m = _mean(kind, params)

    @functools.cache
    def evaluate(k11, k12, k22):
        k11, k12, k22 = mpf(k11), mpf(k12), mpf(k22)
        with mp.workdps(CENTRED_DPS):
            value = f(k11, k12, k22)[0] - m(k11) * m(k22)
        with mp.workdps(DPS):
            return (+value,)
    return evaluate
