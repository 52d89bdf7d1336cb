"""train_ensemble's records against independent computations (found missing by mutation testing).

EnsembleHistory.ntk_change:

Expected values: plain-torch full-batch gradient descent on L = (1/2m)||f - Y||^2 (functional_call +
autograd, all parameters at rate eta) of the same members (one chunk of E members is seeded ``seed``),
and each member's empirical NTK on the probe from its own Jacobian (torch.func.jacrev), so
ntk_change = ||Theta_t - Theta_0||_F / ||Theta_0||_F per member.

A standard-parameterized spec trained with the equivalent per-layer rates follows the NTK twin's
trajectory, and its recorded kernel is the rate-weighted one (the docstring: "parameterization-
independent"), so it must give the same numbers as the NTK-parameterized hand computation.
float64 throughout: the two computations differ by rounding only (1e-9 relative is generous).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, jacrev

import ntkgp
from ntkgp.finite import train_ensemble

X = torch.linspace(-math.pi, math.pi, 6, dtype=torch.float64).unsqueeze(-1)
Y = torch.sin(X)
PROBE = torch.tensor([[-2.0], [-0.3], [0.7], [2.5]], dtype=torch.float64)
E, SEED, LR, STEPS = 2, 11, 0.5, 30


def _net(param):
    return ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1, param), ntkgp.Erf(), ntkgp.Dense(16, 1.0, 0.2, param),
                        ntkgp.Erf(), ntkgp.Dense(1, 1.5, 0.1, param))


def _member_ntks(model, params, x):
    """(E, P, P): Theta_e = J_e J_e^T, J_e the Jacobian of member e's outputs w.r.t. its own parameters."""
    jac = jacrev(lambda p: functional_call(model, p, (x,)).squeeze(-1))(params)   # name -> (E, P, E, ...)
    out = []
    for e in range(E):
        j = torch.cat([jac[n][e, :, e].reshape(x.shape[0], -1) for n in params], 1)
        out.append(j @ j.T)
    return torch.stack(out)


def _expected_ntk_change():
    model = _net("ntk").build(in_features=1, seed=SEED, ensemble_size=E, dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta0 = _member_ntks(model, params, PROBE)
    for _ in range(STEPS):
        live = {n: p.requires_grad_() for n, p in params.items()}
        out = functional_call(model, live, (X,))                      # (E, N, 1)
        loss = 0.5 * ((out - Y) ** 2).sum() / Y.numel()               # summed over members: own gradients
        grads = torch.autograd.grad(loss, list(live.values()))
        params = {n: (p - LR * g).detach() for (n, p), g in zip(live.items(), grads, strict=True)}
    theta_t = _member_ntks(model, params, PROBE)
    return (theta_t - theta0).flatten(1).norm(dim=1) / theta0.flatten(1).norm(dim=1)


@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_ntk_change_is_the_relative_frobenius_change_of_the_members_own_ntk(param):
    expected = _expected_ntk_change()
    assert float(expected.min()) > 1e-3                               # the kernel did move: a real check
    h = train_ensemble(_net(param), X, Y, ensemble_size=E, chunk_size=E, seed=SEED, learning_rate=LR,
                       record_steps=[0, STEPS], probe=PROBE, dtype=torch.float64, engine="stacked")
    assert h.ntk_change.shape == (2, E)
    assert float(h.ntk_change[0].abs().max()) == 0.0
    torch.testing.assert_close(h.ntk_change[-1], expected, rtol=1e-9, atol=0)


def test_chunk_c_is_seeded_seed_plus_1_000_003_c_and_nearby_seeds_share_no_member():
    """train_ensemble's chunk seeding: chunk c is built with seed + 1_000_003 c (documented in the
    docstring and in EnsembleHistory/SEED_STRIDE), so that runs with nearby seeds draw independent
    members. Expected members are built directly with net.build at those seeds (record step 0 is the
    untrained network, so its outputs are the built networks' outputs)."""
    x = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64).unsqueeze(-1)
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(1, 1.5, 0.1))

    def initial(seed):
        h = train_ensemble(net, x, torch.sin(x), ensemble_size=4, chunk_size=2, seed=seed, learning_rate=0.1,
                           record_steps=[0], dtype=torch.float64, engine="stacked", device="cpu")
        return h.test_outputs[0]                                          # (E, M, 1) at step 0

    got = initial(5)
    for c in range(2):
        built = net.build(in_features=1, seed=5 + 1_000_003 * c, ensemble_size=2, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(got[2 * c:2 * c + 2], built(x), rtol=0, atol=0)
    # seed 6's members are independent draws: none equals a member of seed 5 (a stride of 1 made seed 6's
    # first chunk seed 5's second one)
    other = initial(6)
    distance = (got[:, None] - other[None]).abs().flatten(2).amax(-1)   # (4, 4) member pairs
    assert float(distance.min()) > 1e-6


def test_divergence_is_flagged_at_the_first_loss_above_1e6_times_the_initial_one():
    """Divergence detection and the recorded loss on a network whose training is known in closed form.

    A constant activation (Monomial(0): features 1) makes the output affine in the readout parameters,
    with the exact tangent kernel Theta = sigma_w^2 * 1 + sigma_b^2 at any width. With constant targets
    Y = c, gradient descent on (1/2m)||f - Y||^2 gives f_s - c = (f_0 - c) r^s, r = 1 - eta Theta, so the
    loss is L_s = L_0 r^(2s) for every member. With r = -3 (eta = 4 / Theta) L_s / L_0 = 9^s:
    9^6 = 531441 < 1e6 < 9^7, so the documented rule ("a loss above 1e6 times its initial value")
    stops training at step 7, and steps 0..6 are recorded with loss L_0 9^s.
    """
    x = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64).unsqueeze(-1)
    y = torch.full((4,), 0.3, dtype=torch.float64)
    weight_var, bias_var = 1.5, 0.1
    net = ntkgp.serial(ntkgp.Dense(16, 1.3, 0.2), ntkgp.Monomial(0), ntkgp.Dense(1, weight_var, bias_var))
    h = train_ensemble(net, x, y, ensemble_size=3, learning_rate=4.0 / (weight_var + bias_var),
                       record_steps=list(range(12)), dtype=torch.float64, engine="stacked")
    assert h.diverged_at == 7
    assert h.steps.tolist() == list(range(7))
    ratio = h.train_loss / h.train_loss[0]
    expected = (9.0 ** torch.arange(7, dtype=torch.float64)).unsqueeze(-1).expand_as(ratio)
    torch.testing.assert_close(ratio, expected, rtol=1e-9, atol=0)
