r"""Adaptive explicit Runge–Kutta integration of an autonomous ODE ``dz/dt = F(z)`` at given times.

The Dormand–Prince 5(4) pair (Dormand & Prince 1980, "A family of embedded Runge-Kutta
formulae"; the ``dopri5`` of Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.5, which
neural-tangents' ``predict.gradient_descent`` also uses): each step of size ``h`` takes the fifth-order
solution and estimates its error from the embedded fourth-order one; the step is accepted when

    ‖err‖ = RMS(err / (atol + rtol · max(|z|, |z_new|))) ≤ 1

(or a norm of the caller's) and the next size is ``h · clip(0.9 ‖err‖^{−1/5}, 0.2, 10)``. Steps
are shortened to land on each requested time exactly, so no interpolation error is added. In
torch, so the state stays on its device and in its dtype, and autograd can differentiate the
steps taken (the step-size choices are constants to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Butcher tableau (rows of a_ij), fifth-order weights and the error weights b − b̂ (seven stages,
# the seventh being F at the new point: first same as last)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

Norm = Callable[[Tensor, Tensor, Tensor], float]


class StepLimitError(RuntimeError):
    """The integration needed more steps than allowed (a stiff problem for an explicit method), or
    could not go on: ``non_finite`` when the last step tried met NaN or infinite values."""

    def __init__(self, message: str, non_finite: bool = False) -> None:
        super().__init__(message)
        self.non_finite = non_finite


def rms_norm(rtol: float, atol: float) -> Norm:
    """``‖err‖ = RMS(err / (atol + rtol · max(|z|, |z_new|)))``."""
    def norm(err: Tensor, z: Tensor, z_new: Tensor) -> float:
        scale = atol + rtol * torch.maximum(z.abs(), z_new.abs())
        return float((err / scale).square().mean().sqrt()) if err.numel() else 0.0
    return norm


def _combine(z: Tensor, h: float, weights: Sequence[float], stages: Sequence[Tensor]) -> Tensor:
    out = z
    for w, k in zip(weights, stages, strict=True):
        if w != 0.0:
            out = out + (h * w) * k
    return out


def integrate(rhs: Callable[[Tensor], Tensor], z0: Tensor, times: Sequence[float], norm: Norm, *,
              max_steps: int) -> list[Tensor]:
    """``z(t)`` for each of ``times`` (non-decreasing, from ``z(0) = z0``).

    The first step is Hairer, Nørsett & Wanner's guess, one that moves ``z`` by 1 % of its size
    (``0.01 ‖z0‖ / ‖F(z0)‖`` in the error norm), or ``1e-6`` where either is tiny; the controller
    corrects it from there.

    Raises:
        StepLimitError: after ``max_steps`` attempted steps, or when the step size the controller
            chooses falls below the rounding of the time (the error test cannot be met).
    """
    out: list[Tensor] = []
    now, z, slope = 0.0, z0, rhs(z0)
    with torch.no_grad():
        size, speed = norm(z0, z0, z0), norm(slope, z0, z0)
    h = min(next((t for t in times if t > 0), 1.0), 0.01 * size / speed if min(size, speed) > 1e-5 else 1e-6)
    attempts = 0
    error = 0.0
    for target in times:
        while now < target:
            if attempts >= max_steps:
                raise StepLimitError(f"the ODE solver reached max_steps={max_steps} steps at t = {now:.6g} of "
                                     f"{target:.6g}", non_finite=not math.isfinite(error))
            remaining = target - now
            last = h >= remaining
            step = remaining if last else h
            # a step shortened to land on a requested time is taken however short: times a few ulp apart
            # (0.3 and 0.1 * 3) are valid, and such a step changes z by about nothing
            if not last and step <= 4 * math.ulp(now):
                raise StepLimitError(f"the step size fell to {step:.3g} at t = {now:.6g}, the rounding of the time",
                                     non_finite=not math.isfinite(error))
            stages = [slope]
            for row in _A[1:]:
                z_new = _combine(z, step, row, stages)
                stages.append(rhs(z_new))
            # the tableau's last row is the fifth-order solution: its stage is F(z_new), the next slope
            error = norm(_combine(torch.zeros_like(z), step, _E, stages), z, z_new)
            attempts += 1
            accepted = error <= 1.0
            if accepted:
                now = target if last else now + step
                z, slope = z_new, stages[-1]
            if not math.isfinite(error):
                factor = 0.2
            elif error == 0.0:
                factor = 10.0
            else:
                factor = min(10.0, max(0.2, 0.9 * error ** -0.2))
            if not accepted:
                factor = min(factor, 1.0)
            # a step shortened to land on a time says nothing against the longer one
            h = max(h, step * factor) if (accepted and last) else step * factor
        out.append(z)
    return out
