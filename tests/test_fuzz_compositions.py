"""Property-based audit of the layer algebra's compositions: random architectures (seeded) of
``serial``, ``parallel`` (sum, concat, prod), ``residual``, ``repeat``, ``LayerNorm``, every closed-form
activation and ``Numerical``, ``Dense`` in both parameterizations with and without bias (and
``bias_var = 0``), ARD first layers, checked for invariants that hold whatever the architecture and
against the finite networks ``build`` makes.

Single layers are checked against quadrature elsewhere (test_accuracy, test_activations); here the
compositions are: each generated network is a different nesting, so a combinator that mishandled a
state field (a mean, ``cov2``, a width, the NTK's product rule) shows up as a broken invariant or a
kernel the wide networks do not have. The default run takes a fixed set of seeds (9 s on two idle cores,
45-80 s on loaded ones); ``-m slow`` runs a larger sweep.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import ntkgp
from ntkgp.finite import monte_carlo_kernel
from ntkgp.layers.base import Layer, NonFiniteKernelError, variances

Plan = list[tuple]

#: Every closed-form activation, the polynomial ones and a quadrature one (name, factory).
ACTIVATIONS: list[tuple[str, Callable[[], Layer]]] = [
    ("relu", ntkgp.ReLU), ("leaky", lambda: ntkgp.LeakyReLU(0.2)), ("abs", ntkgp.Abs),
    ("abrelu", lambda: ntkgp.ABReLU(-0.3, 1.2)), ("erf", ntkgp.Erf), ("sigmoid_like", ntkgp.SigmoidLike),
    ("gelu", ntkgp.GELU), ("sin", ntkgp.Sin), ("cos", lambda: ntkgp.Cos(c=0.3)), ("rbf", lambda: ntkgp.Rbf(0.7)),
    ("gabor", ntkgp.Gabor), ("sign", ntkgp.Sign), ("identity", ntkgp.Identity), ("exp", lambda: ntkgp.Exp(1.0, 0.3)),
    ("gaussian", lambda: ntkgp.Gaussian(1.0, -0.5)), ("monomial2", lambda: ntkgp.Monomial(2)),
    ("hermite3", lambda: ntkgp.Hermite(3)), ("requ", lambda: ntkgp.RectifiedMonomial(2)),
    ("polynomial", lambda: ntkgp.Polynomial([0.1, 1.0, 0.5])), ("tanh", lambda: ntkgp.Numerical(torch.tanh)),
]

#: Those whose wide networks' features are light-tailed and cheap: polynomials and exp of Gaussians
#: (composed several times over) approach the Gaussian limit slowly and make Monte-Carlo standard
#: errors unreliable (a depth-6 product of Hermite and exp layers was 40x off its limit at width 128).
LIGHT = ("relu", "leaky", "abs", "abrelu", "erf", "sigmoid_like", "gelu", "sin", "cos", "rbf", "gabor", "sign",
         "identity", "gaussian")


def plan(seed: int, activations: tuple[str, ...] | None = None) -> Plan:
    """A random architecture as data: 1-6 blocks after an input ``Dense`` layer (ARD 30 % of the
    time), each a ``Dense → φ``, ``φ → Dense``, residual, parallel (1-3 branches, themselves random
    networks, joined by sum, concat or prod, sometimes followed by a ``LayerNorm``), ``φ → LayerNorm``
    or ``repeat`` block; widths are multiples (1 or 2) of a base width, so one plan builds at any
    width; one parameterization for the whole network."""
    rng = random.Random(seed)
    names = [name for name, _ in ACTIVATIONS if activations is None or name in activations]
    parameterization = rng.choice(["ntk", "ntk", "standard"])
    items = _blocks(rng, rng.randint(1, 6), True, parameterization, names)
    items.append(("dense", 0, rng.choice([0.5, 1.0, 2.0]), rng.choice([None, 0.0, 0.1]), parameterization, False))
    return items


def _blocks(rng: random.Random, depth: int, first: bool, param: str, names: list[str]) -> Plan:
    def dense(mult: int, weight_vars=(0.5, 1.0, 2.0), bias_vars=(None, 0.0, 0.1), ard: bool = False) -> tuple:
        return ("dense", mult, rng.choice(weight_vars), rng.choice(bias_vars), param, ard)

    def act() -> tuple:
        return ("act", rng.choice(names))

    width = rng.choice([1, 2])   # the current features' width multiple (sums and residuals need it)
    items = [dense(width, (0.5, 1.0, 1.7, 2.0), (None, 0.0, 0.1, 0.5), ard=first and rng.random() < 0.3)]
    for _ in range(depth):
        kind = rng.choices(["act", "dense_act", "residual", "parallel", "layernorm", "repeat"], [2, 3, 2, 2, 1, 1])[0]
        if kind == "act":
            width = rng.choice([1, 2])
            items += [act(), dense(width)]
        elif kind == "dense_act":
            items += [dense(rng.choice([1, 2])), act(), dense(width)]
        elif kind == "residual":
            inner = [dense(width, (0.5, 1.0)), act()] + ([dense(width, (0.5, 1.0))] if rng.random() < 0.5 else [])
            items += [("residual", inner), dense(width, (0.5, 1.0), (None, 0.1))]
        elif kind == "parallel":
            join = rng.choice(["sum", "concat", "prod"])
            branches = [_blocks(rng, rng.randrange(0, 2), False, param, names) for _ in range(rng.choice([1, 2, 3]))]
            if join != "concat":   # a sum or product of branches of one width, each ending in a Dense layer
                same = rng.choice([1, 2])
                branches = [[*b, ("dense", same, 1.0, 0.1, param, False)] for b in branches]
            items.append(("parallel", join, branches))
            if rng.random() < 0.3:
                items.append(("layernorm",))
            items.append(dense(width))
        elif kind == "layernorm":
            items += [act(), ("layernorm",), dense(width, (1.0,), (None, 0.1))]
        else:
            items.append(("repeat", rng.choice([2, 3]), [act(), dense(width, (0.5, 1.0, 1.5))]))
    return items


def build(items: Plan, width: int = 8, d: int = 3, out: int = 1) -> Layer:
    """The network of a plan at base width ``width`` (the last item is the readout, ``out`` wide)."""
    *body, (_, _, weight_var, bias_var, param, _) = items
    return ntkgp.serial(_layers(body, width, d), ntkgp.Dense(out, weight_var, bias_var, param))


def _layers(items: Plan, width: int, d: int) -> Layer:
    made = dict(ACTIVATIONS)
    layers: list[Layer] = []
    for item in items:
        if item[0] == "dense":
            _, mult, weight_var, bias_var, param, ard = item
            layers.append(ntkgp.Dense(width * mult, weight_var, bias_var, param, ard_num_dims=d if ard else None))
        elif item[0] == "act":
            layers.append(made[item[1]]())
        elif item[0] == "layernorm":
            layers.append(ntkgp.LayerNorm())
        elif item[0] == "residual":
            layers.append(ntkgp.residual(_layers(item[1], width, d)))
        elif item[0] == "parallel":
            layers.append(ntkgp.parallel(*[_layers(b, width, d) for b in item[2]], join=item[1]))
        else:
            layers.append(ntkgp.repeat(_layers(item[2], width, d), item[1]))
    return ntkgp.serial(*layers)


def describe(items: Plan) -> str:
    """A plan in one line, for failure messages (``D`` a Dense layer, ``DA`` with ARD, ``s`` standard)."""
    out = []
    for item in items:
        if item[0] == "dense":
            out.append(f"D{'A' if item[5] else ''}({item[2]},{item[3]}{',s' if item[4] == 'standard' else ''})")
        elif item[0] == "act":
            out.append(item[1])
        elif item[0] == "layernorm":
            out.append("LN")
        elif item[0] == "residual":
            out.append(f"res[{describe(item[1])}]")
        elif item[0] == "parallel":
            out.append(f"{item[1]}{{" + " | ".join(describe(b) for b in item[2]) + "}")
        else:
            out.append(f"repeat{item[1]}[{describe(item[2])}]")
    return " ".join(out)


def _rel(a: Tensor, b: Tensor) -> float:
    """Largest entry of ``|a − b|`` relative to ``b``'s largest."""
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def _inputs(n: int, seed: int, d: int = 3) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(autouse=True)
def _quiet_quadrature():
    # Numerical(tanh) warns where its quadrature does not settle at large variances: expected here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quadrature did not reach", category=RuntimeWarning)
        yield


def test_the_generator_covers_the_algebra():
    """The seeds the tests use reach every combinator, join, activation and Dense variant (a generator
    that stopped producing some would pass every check below vacuously)."""
    seen: set[str] = set()

    def walk(items: Plan) -> None:
        for item in items:
            if item[0] == "dense":
                seen.update({f"bias_{item[3]}", item[4], "ard" if item[5] else "plain"})
            elif item[0] == "act":
                seen.add(item[1])
            elif item[0] == "parallel":
                seen.add(item[1])
                for branch in item[2]:
                    walk(branch)
            elif item[0] in ("residual", "repeat"):
                seen.add(item[0])
                walk(item[1] if item[0] == "residual" else item[2])
            else:
                seen.add(item[0])

    for seed in INVARIANT_SEEDS:
        walk(plan(seed))
    expected = {name for name, _ in ACTIVATIONS} | {"sum", "concat", "prod", "residual", "repeat", "layernorm",
                                                     "ntk", "standard", "ard", "plain", "bias_None", "bias_0.0"}
    assert expected <= seen, expected - seen


INVARIANT_SEEDS = [*range(32), 53]   # 53: the first after 31 with a Gaussian layer


SWEEP = [pytest.param(s, marks=pytest.mark.slow) for s in range(32, 200) if s not in INVARIANT_SEEDS]


@pytest.mark.parametrize("seed", [*INVARIANT_SEEDS, *SWEEP])
def test_invariants_of_random_compositions(seed):
    """Whatever the architecture, in float64:

    * ``diag=True`` is the full kernel's diagonal (with ``x2``, that of ``kernel(x1, x2)``), ``x2 = x1``
      is ``x2 = None``, and ``kernel(x1, x2)`` is the off-diagonal block of ``kernel(cat[x1, x2])``: the
      same recursion on the same numbers (5e-14 of the largest entry; measured ≤ 1.2e-15 over 200 seeds);
    * the symmetric kernels are exactly symmetric and positive semi-definite (smallest eigenvalue
      ≥ −1e-12 of the largest; measured −2e-16);
    * a batch of input sets is the loop over them (1e-12: measured 1.4e-14, polynomial layers
      amplify the ulps of the batched matmul);
    * float32 agrees with float64 to 1e-4 of the largest entry (measured ≤ 5e-6, a depth-6 NTK
      through Gaussian and Hermite layers), where float32 does not refuse an overflow;
    * GPyTorch's ``NNGPKernel`` and ``NTKKernel`` give ``net.kernel``'s values (1e-9: ``Numerical``
      chooses its degree for ``T`` alone when no NTK is asked, 4e-12 off; others exactly).
    """
    items = plan(seed)
    net = build(items)
    x1, x2 = _inputs(5, 100 + seed), _inputs(4, 200 + seed)
    where = f"seed {seed}: {describe(items)}"
    with torch.no_grad():
        full = net.kernel(x1)
        for name in ("nngp", "ntk"):
            k = getattr(full, name)
            assert torch.equal(k, k.mT), where
            assert _rel(getattr(net.kernel(x1, diag=True), name), k.diagonal()) <= 5e-14, where
            assert _rel(getattr(net.kernel(x1, x1), name), k) <= 5e-14, where
        joined, cross = net.kernel(torch.cat([x1, x2])), net.kernel(x1, x2)
        pairs = net.kernel(x1[:4], x2, diag=True)
        for name in ("nngp", "ntk"):
            whole = getattr(joined, name)
            assert _rel(getattr(cross, name), whole[:5, 5:]) <= 5e-14, where
            assert _rel(getattr(pairs, name), getattr(cross, name)[:4].diagonal()) <= 5e-14, where
            eigenvalues = torch.linalg.eigvalsh(whole)
            assert float(eigenvalues.min()) >= -1e-12 * float(eigenvalues.abs().max()), where
        batch = torch.stack([x1, 0.5 * x1.flip(0), 2 * x1])
        batched = net.kernel(batch, x2.expand(3, 4, 3))
        for i in range(3):
            alone = net.kernel(batch[i], x2)
            for name in ("nngp", "ntk"):
                assert _rel(getattr(batched, name)[i], getattr(alone, name)) <= 1e-12, where
        try:
            single = net.kernel(x1.float())
        except ValueError as err:   # a polynomial's or exp's kernel overflowing float32, said so
            assert "overflows torch.float32" in str(err), where
        else:
            for name in ("nngp", "ntk"):
                assert getattr(single, name).dtype == torch.float32
                assert _rel(getattr(single, name).double(), getattr(full, name)) <= 1e-4, where
        for name, kernel_class in (("nngp", ntkgp.NNGPKernel), ("ntk", ntkgp.NTKKernel)):
            covariance = kernel_class(net)
            assert _rel(covariance(x1, x2).to_dense(), getattr(cross, name)) <= 1e-9, where
            assert _rel(covariance(x1, x1, diag=True), getattr(full, name).diagonal()) <= 1e-9, where


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_batched_hyperparameters_of_random_compositions(seed):
    """GPyTorch's ``batch_shape`` through every combinator: a network whose variances are batched
    (``expand_batch((2,))``) with each batch member's own values gives, per member, the kernels of
    the unbatched network with those values (1e-13 of the largest entry; measured 1.8e-15)."""
    items = plan(seed)
    members = [build(items).double() for _ in range(2)]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for member in members:
            for *_, raw in variances(member):
                raw.add_(0.3 * torch.randn(raw.shape, generator=generator, dtype=raw.dtype))
        batched = build(items).double()
        batched.expand_batch((2,))
        for (*_, raw), (*_, first), (*_, second) in zip(*(variances(n) for n in (batched, *members)), strict=True):
            raw.copy_(torch.stack([first, second]))
        x1, x2 = _inputs(5, 700 + seed), _inputs(4, 800 + seed)
        together = batched.kernel(x1, x2)
        for i, member in enumerate(members):
            alone = member.kernel(x1, x2)
            for name in ("nngp", "ntk"):
                assert _rel(getattr(together, name)[i], getattr(alone, name)) <= 1e-13, f"{seed}: {describe(items)}"


# 38, 71: Numerical(tanh) meets a 1e-150 input paired with a 1e150 one (0/0 in its quadrature before);
# 90: a product of 1e150 inputs' kernels overflows, a LayerNorm makes it NaN, and Numerical(tanh) took it
HARD_SEEDS = [*range(0, 60, 3), 38, 71, 90]


@pytest.mark.parametrize("seed", HARD_SEEDS)
def test_hard_inputs_through_random_compositions(seed):
    """Zero vectors, duplicates (and their negatives), inputs of norm 1e-150 and 1e150 alone and
    together: finite kernels, or a refusal that says the kernel overflows (products of kernels of
    1e150 inputs exceed float64: ``NonFiniteKernelError``; polynomial and exp layers: their own
    ``ValueError``). The huge points of ``tiny_and_huge`` are among those of ``huge``, and its other
    entries are no larger (``|k12| ≤ sqrt(k11 k22)``): it is refused only where ``huge`` is. Before,
    ``Numerical`` quadrature of a 1e-150 input paired with a 1e150 one was 0/0 and raised "the
    activation gave NaN or infinite values ..., or its Gaussian expectation overflows" (seeds 38
    and 71), and an overflowed kernel reaching ``Numerical`` (seed 90: a product of branches, then
    ``LayerNorm``) an ``IndexError``."""
    items = plan(seed)
    net = build(items)
    base = _inputs(4, 300 + seed)
    zero = torch.zeros(1, 3, dtype=torch.float64)
    cases = {"zero_and_duplicates": torch.cat([zero, base[:2], base[:1], -base[:1], zero]),
             "tiny": torch.cat([base * 1e-150, zero]), "huge": base * 1e150,
             "tiny_and_huge": torch.cat([base[:2] * 1e-150, base[2:] * 1e150, zero])}
    refused: set[tuple[str, bool]] = set()
    with torch.no_grad():
        for case, x in cases.items():
            for diag in (False, True):
                where = f"seed {seed}, {case}, diag={diag}: {describe(items)}"
                allowed = case == "huge" or (case == "tiny_and_huge" and ("huge", diag) in refused)
                try:
                    k = net.kernel(x, diag=diag)
                except NonFiniteKernelError:
                    assert allowed, where
                    refused.add((case, diag))
                    continue
                except ValueError as err:   # a closed-form layer's own refusal (not Numerical's "activation gave NaN")
                    assert allowed and "the kernel, which grows as" in str(err), f"{where}: {err}"
                    refused.add((case, diag))
                    continue
                assert bool(torch.isfinite(k.nngp).all()) and bool(torch.isfinite(k.ntk).all()), where


@pytest.mark.parametrize("name", [name for name, _ in ACTIVATIONS])
def test_depth_50_through_repeat_is_finite(name):
    """``repeat(serial(Dense, φ), 50)`` after a first layer, on zero, duplicate, tiny and ordinary
    inputs: finite NNGP and NTK for every activation (variances kept near a stable fixed point of
    their map, so the polynomial and exp layers' growth is not what is tested), and
    the diagonal equal to ``diag=True``'s (5e-14)."""
    act = dict(ACTIVATIONS)[name]()
    # polynomials and exp grow superexponentially above an unstable fixed point of the variance map
    # (Monomial(2) after Dense(σ_w² = 0.5, σ_b² = 0.1): 0.54): their inputs start below it
    growing = name in ("exp", "monomial2", "hermite3", "requ", "polynomial")
    first, weight_var = (ntkgp.Dense(4, 0.1, 0.01), 0.5) if growing else (ntkgp.Dense(4, 1.0, 0.1), 1.0)
    net = ntkgp.serial(first, ntkgp.repeat(ntkgp.serial(act, ntkgp.Dense(4, weight_var, 0.1)), 50),
                       ntkgp.Dense(1, 1.0, 0.0))
    base = _inputs(3, 7)
    x = torch.cat([torch.zeros(1, 3, dtype=torch.float64), base, base[:1], 1e-150 * base[1:]])
    with torch.no_grad():
        k = net.kernel(x)
        for value in (k.nngp, k.ntk):
            assert bool(torch.isfinite(value).all()), name
        assert _rel(net.kernel(x, diag=True).ntk, k.ntk.diagonal()) <= 5e-14, name


def _wide_checks(seed: int, width: int, samples: int) -> None:
    items = plan(seed, LIGHT)
    where = f"seed {seed}: {describe(items)}"
    x = _inputs(4, 400 + seed)
    net = build(items, width=width, out=32)
    with torch.no_grad():
        exact = net.kernel(x)
    # The 32 outputs of each network are draws given its last hidden layer. Averages within 5 standard
    # errors plus the O(1/width) bias of finite networks, 0.1 of the largest entry at width 128: a plain
    # ReLU MLP (depth 2) used 0.11-0.17 of that bound (entries 1.7-5 % off), the generated networks up
    # to 0.37 over the first 40 light seeds (NNGP) and 0.27 (NTK).
    # One network's empirical NTK alone strays O(depth/sqrt(width)): 0.43 of the largest entry at
    # width 512 for seed 0 (eight nonlinear layers), whose 64-network average is within 1.3
    # standard errors, hence the averages.
    estimate = monte_carlo_kernel(net, x, n_samples=samples, seed=seed, ensemble_batch=samples)
    for name in ("nngp", "ntk"):
        error = (getattr(estimate, name) - getattr(exact, name)).abs()
        bound = 5 * getattr(estimate, f"{name}_sem") + 0.1 * getattr(exact, name).abs().max()
        assert bool((error <= bound).all()), f"{where}: {name} off by {float((error / bound).max()):.2f} of the bound"


WIDE_SEEDS = [0, 2, 5, 8, 13, 21]


@pytest.mark.parametrize("seed", WIDE_SEEDS)
def test_random_compositions_match_wide_networks(seed):
    """The analytic kernels are those of ``net.build``'s wide networks (Monte-Carlo NNGP, empirical NTK)."""
    _wide_checks(seed, width=128, samples=64)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 160))
def test_random_compositions_match_wide_networks_sweep(seed):
    _wide_checks(seed, width=128, samples=64)


GRADIENT_SEEDS = [1, 4, 6, 9, 12]


@pytest.mark.parametrize("seed", [*GRADIENT_SEEDS, *(pytest.param(s, marks=pytest.mark.slow) for s in range(20, 200))])
def test_variance_gradients_of_random_compositions(seed):
    """Derivatives of the NNGP and NTK with respect to every raw variance hyperparameter (weights,
    biases, ARD weights) agree with central differences (``torch.autograd.gradcheck`` in float64).
    Networks without ``Numerical``, whose gradients are quadratures of the activation's higher
    derivatives (they drift from the values' differences at large variances, which it warns of)."""
    items = plan(seed, tuple(name for name, _ in ACTIVATIONS if name != "tanh"))
    net = build(items).double()   # the raw variances in float64 too, for the differences' precision
    x1, x2 = _inputs(3, 500 + seed), _inputs(2, 600 + seed)
    names = [name for name, _ in net.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for _, p in net.named_parameters())

    with torch.no_grad():   # per unit of the largest entry: the tolerances are relative (polynomial layers'
        state = net.kernel(x1, x2)   # kernels reach 1e13, whose differences keep no digits below 1e-3)
        # (or 1 for a kernel of zeros: Sin after variances of 1e3 gives exp(-1e3) = 0 between distinct points)
        scales = (float(state.nngp.abs().max()) or 1.0, float(state.ntk.abs().max()) or 1.0)

    def kernels(*raw: Tensor) -> tuple[Tensor, ...]:
        values = torch.func.functional_call(_Kernels(net), {f"net.{n}": v for n, v in zip(names, raw, strict=True)},
                                            (x1, x2))
        return tuple(value / scale for value, scale in zip(values, scales, strict=True))

    assert torch.autograd.gradcheck(kernels, values, eps=1e-6, atol=1e-7, rtol=1e-5), describe(items)


class _Kernels(torch.nn.Module):
    def __init__(self, net: Layer) -> None:
        super().__init__()
        self.net = net

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        state = self.net.kernel(x1, x2)
        return state.nngp, state.ntk
