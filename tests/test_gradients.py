"""Kernel gradients are the true derivatives of the kernel values, for every closed-form layer.

The kernels are differentiated by autograd through each layer's formulas, their self-pair
shortcuts (``variance``, ``dot_variance``) and the custom backward passes of the recursion; a
wrong derivative in any of them leaves the values right and only the gradients wrong (GPyTorch
marginal-likelihood training, BoTorch's acquisition optimization in the inputs). Each is checked
against central differences of the values in float64: with respect to the inputs (cross kernels,
symmetric kernels with their diagonal, and ``diag=True``), with respect to every hyperparameter,
and to second order in the inputs for the smooth activations.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ntkgp
from ntkgp.layers import base

pytestmark = pytest.mark.usefixtures("float64_default")

ACTIVATIONS = {
    "relu": ntkgp.ReLU, "leaky_relu": lambda: ntkgp.LeakyReLU(0.1), "abrelu": lambda: ntkgp.ABReLU(-0.3, 1.2),
    "abs": ntkgp.Abs, "sign": ntkgp.Sign, "erf": ntkgp.Erf, "sigmoid_like": ntkgp.SigmoidLike, "gelu": ntkgp.GELU,
    "sin": lambda: ntkgp.Sin(1.3, 0.7, 0.4), "cos": ntkgp.Cos, "rbf": lambda: ntkgp.Rbf(0.4),
    "exp": lambda: ntkgp.Exp(1.0, 0.3), "gaussian": ntkgp.Gaussian,
    "polynomial": lambda: ntkgp.Polynomial([0.3, -1.0, 0.5, 0.2]), "monomial": lambda: ntkgp.Monomial(2),
    "rectified_monomial_0": lambda: ntkgp.RectifiedMonomial(0),
    "rectified_monomial_2": lambda: ntkgp.RectifiedMonomial(2),
    "hermite": lambda: ntkgp.Hermite(3), "identity": ntkgp.Identity, "gabor": ntkgp.Gabor,
    "elementwise": lambda: ntkgp.Elementwise(torch.erf, _erf_nngp),
}
# kinks (and Sign's jump) have no second derivative where the kernel's angle formula has one
NOT_TWICE_DIFFERENTIABLE = {"relu", "leaky_relu", "abrelu", "abs", "sign", "rectified_monomial_0"}


def _erf_nngp(k12, k11, k22):
    """``Erf()``'s kernel as a user's ``nngp_fn`` (neural-tangents' argument order): its NTK factor
    then comes from autograd, not from ``Erf``'s own formula."""
    return ntkgp.Erf().pair_kernel(k11, k12, k22, False)[0]


def _two_layers(name: str) -> ntkgp.Layer:
    act = ACTIVATIONS[name]
    return ntkgp.serial(D(4, 1.7, 0.1), act(), D(4, 1.3, 0.2), act(), D(1, 1.1, 0.05))


D = ntkgp.Dense
ARCHITECTURES = {
    "standard": lambda act: ntkgp.serial(D(4, 1.7, 0.1, "standard"), act(), D(1, 1.3, 0.2, "standard")),
    "ard": lambda act: ntkgp.serial(D(4, torch.tensor([0.5, 2.0, 1.0]), 0.1, ard_num_dims=3), act(), D(1, 1.3, 0.2)),
    "layernorm": lambda act: ntkgp.serial(D(4, 1.7, 0.1), act(), ntkgp.LayerNorm(), D(1, 1.3, 0.2)),
    "residual": lambda act: ntkgp.serial(D(4, 1.7, 0.1), ntkgp.residual(ntkgp.serial(act(), D(4, 0.8, 0.1))),
                                         act(), D(1)),
    "product": lambda act: ntkgp.serial(D(4, 1.7, 0.1),
                                        ntkgp.parallel(act(), ntkgp.serial(D(4, 0.9, 0.3), act()), join="prod"), D(1)),
    "concat": lambda act: ntkgp.serial(ntkgp.parallel(ntkgp.serial(D(4, 1.7, 0.1), act()), D(4, 0.5, 0.2),
                                                      join="concat"), D(1)),
}

X1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
X2 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
MODES = ("cross", "symmetric", "diag")


def _kernels(net: ntkgp.Layer, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    k = net.kernel(x, X2) if mode == "cross" else net.kernel(x, diag=mode == "diag")
    return k.nngp, k.ntk


def _check_input_gradients(net: ntkgp.Layer, second_order: bool) -> None:
    # gradcheck's defaults (step 1e-6, atol 1e-5, rtol 1e-3) in float64: the central differences'
    # truncation error is ~1e-12 and their rounding ~1e-10 at O(1) kernels. The second order takes
    # step 1e-5 and fixed random grad_outputs: Hermite(3) twice reaches kernels of 1e8 at these
    # inputs, where step 1e-6 rounds the differences of first derivatives to 3e-4 (9 of 40 draws of
    # grad_outputs failed, 0 of 40 at 1e-5 and at 1e-4), and which draw came depended on the tests
    # that ran before
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda x, mode=mode: _kernels(net, x, mode), (X1.clone().requires_grad_(),))
        if second_order:   # the self-pair shortcuts (variance, dot_variance) included
            torch.manual_seed(0)
            assert torch.autograd.gradgradcheck(lambda x, mode=mode: _kernels(net, x, mode),
                                                (X1.clone().requires_grad_(),), eps=1e-5)


def _check_hyperparameter_gradients(net: ntkgp.Layer) -> None:
    """The gradient of a random projection of both kernels in every raw hyperparameter against
    central differences of step ``h = 1e-6``: their truncation error is ``O(h²)`` and their
    rounding ``~ε |s| / h``, allowed for beside a relative 1e-6 (hyperparameter derivatives are
    not computed by gradcheck here because the raw parameters are the module's own leaves)."""
    weights = {mode: torch.randn(shape, generator=torch.Generator().manual_seed(2))
               for mode, shape in (("cross", (3, 2)), ("symmetric", (3, 3)), ("diag", (3,)))}
    parameters = list(net.parameters())
    assert parameters
    h = 1e-6
    for mode in MODES:
        def projection(mode=mode):
            nngp, ntk = _kernels(net, X1, mode)
            return (weights[mode] * nngp).sum() + 0.7 * (weights[mode] * ntk).sum()

        grads = torch.autograd.grad(projection(), parameters)
        for parameter, grad in zip(parameters, grads, strict=True):
            flat = parameter.data.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                with torch.no_grad():
                    flat[i] = old + h
                    up = float(projection())
                    flat[i] = old - h
                    down = float(projection())
                    flat[i] = old
                difference = (up - down) / (2 * h)
                tolerance = 1e-6 * (1 + abs(difference)) + 1e-15 * (abs(up) + abs(down)) / h
                assert abs(float(grad.view(-1)[i]) - difference) <= tolerance, (mode, parameter.shape, i)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_kernel_gradients_of_every_activation_are_the_derivatives_of_its_values(name):
    net = _two_layers(name)
    _check_input_gradients(net, second_order=name not in NOT_TWICE_DIFFERENTIABLE)
    _check_hyperparameter_gradients(net)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_kernel_gradients_through_parameterizations_and_combinators(architecture, activation):
    net = ARCHITECTURES[architecture](ACTIVATIONS[activation])
    _check_input_gradients(net, second_order=activation == "erf")
    _check_hyperparameter_gradients(net)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_checkpointed_row_blocks_have_the_same_derivatives(activation, monkeypatch):
    """Large kernels with autograd are row blocks mirrored by a custom backward pass
    (``_SymmetricFromRowBlocks``); here every kernel is, in blocks of one row."""
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 1)
    net = _two_layers(activation)
    _check_input_gradients(net, second_order=activation == "gelu")
    _check_hyperparameter_gradients(net)


def _normalized_gradients(net: ntkgp.Layer, kernels: tuple[torch.Tensor, torch.Tensor],
                          weights: torch.Tensor, scales: tuple[float, float]) -> list[torch.Tensor]:
    """Gradients of ``Σ weights·K / scale_K + Σ weights·Θ / scale_Θ`` in the variances (divided by
    the kernels' largest entries, as a marginal likelihood's ``K⁻¹`` would: the sums themselves
    are ~1e20 at the largest scales below)."""
    loss = sum((weights * k).sum() / s for k, s in zip(kernels, scales, strict=True))
    return [g.double() for g in torch.autograd.grad(loss, list(net.parameters()))]


@pytest.mark.parametrize("path", ["whole", "checkpointed"])
@pytest.mark.parametrize("name", ["erf", "gelu", "sin", "rbf", "gaussian"])
def test_hyperparameter_gradients_with_a_duplicated_point_at_large_inputs(name, path, monkeypatch):
    """With the inputs fixed (GPyTorch's marginal likelihood), a pair of equal points is, as a
    function of the hyperparameters, the point with itself: the kernels of ``x`` with a copy of
    its first point are those of ``x`` with that point's row (and column) counted twice, an
    independent float64 reference without any pair of equal points. Differentiated through the
    pair formulas, whose partial derivatives cancel there, the float32 gradients (largest error
    relative to the largest gradient, symmetric / cross kernel) were 0.4 / 4.6 % off at input
    scale 1e3 and 18 % / 6.9× at 1e4 (erf), 5.4 / 4.1 % and 38 % / 3.6× (Sin), 5 / 7.5 % and
    35 % / 6.9× (Rbf), 13 / 11 % (Gaussian), and GELU's 3.2 / 11 % at 1e7 and 100 / 190 % at 1e8.
    Now all are within 1.6e-7; the test allows 2e-6 (float32 rounding of sums of 4² terms)."""
    if path == "checkpointed":
        monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
        monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 1)
    points = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    twice = torch.ones(3, dtype=torch.float64)
    twice[0] = 2
    act = ACTIVATIONS[name]
    for scale in (1e7, 1e8) if name == "gelu" else (1e3, 1e4):
        torch.manual_seed(0)
        reference = ntkgp.serial(D(8, 1.5, 0.1), act(), D(8, 1.3, 0.1), act(), D(1, 1.1, 0.1))
        net = copy.deepcopy(reference).float()
        exact = reference.kernel(points * scale)
        scales = (float(exact.nngp.detach().abs().max()), float(exact.ntk.detach().abs().max()))
        x = torch.cat([points, points[:1]]).float() * scale
        symmetric, cross = net.kernel(x), net.kernel(x[:3], x)
        cases = {
            # symmetric kernel: the copy's row and column
            "symmetric": (_normalized_gradients(reference, (exact.nngp, exact.ntk), twice[:, None] * twice, scales),
                          _normalized_gradients(net, (symmetric.nngp, symmetric.ntk), torch.ones(4, 4), scales)),
        }
        exact = reference.kernel(points * scale)
        # cross kernel with the copy as a column
        cases["cross"] = (_normalized_gradients(reference, (exact.nngp, exact.ntk), twice.expand(3, 3), scales),
                          _normalized_gradients(net, (cross.nngp, cross.ntk), torch.ones(3, 4), scales))
        for case, (expected, got) in cases.items():
            largest = max(float(e.abs().max()) for e in expected)
            for g, e in zip(got, expected, strict=True):
                assert float((g - e).abs().max()) <= 2e-6 * largest, (scale, case)


def _saved_for_backward(compute) -> int:
    """Bytes of the distinct storages that autograd saves for the backward pass of ``compute()``."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute()
    return sum(sizes.values())


def test_cross_kernel_twins_take_their_own_derivatives_without_saving_whole_matrices():
    """With fixed inputs, the entries of a cross kernel between equal points take the derivatives of
    the point's own ``dot_variance``. That map was evaluated over the whole matrix (1 where no
    twins sit) and selected by ``torch.where``: its graph held about four float64 matrices per
    activation layer, 7.4 MB more for a cross kernel of 300 × 300 points with 3 shared ones (31.2
    against 23.8 MB saved for backward; +14.7 MB for a batch of 2), and +27 % at 1000 points. Now it
    is evaluated at the twins' entries alone: at most 2 bytes per kernel entry more than without
    shared points (the batched twins' boolean masks, shared by the layers; measured 408 bytes and
    265 kB). The gradients stay within float32 rounding of a float64 reference without any pair of
    equal points, in the batched (mask) route too (largest error relative to the largest gradient:
    1.4e-7 measured, 2e-6 allowed as above; 2.4e-2 through the pair formulas, before the twins took their own)."""
    torch.manual_seed(0)
    net = ntkgp.serial(D(8, 2.0, 0.1), ntkgp.Erf(), D(8, 1.5, 0.2), ntkgp.GELU(), D(1, 1.3, 0.1))
    n = 300
    x1, other = torch.randn(n, 3), torch.randn(2, n, 3)
    shared = other.clone()
    shared[0, :3] = x1[:3]
    shared[1, 5] = x1[7]
    for plain, twins in ((other[0], shared[0]), (other, shared)):
        extra = _saved_for_backward(lambda x2=twins: net.kernel(x1, x2))
        extra -= _saved_for_backward(lambda x2=plain: net.kernel(x1, x2))
        assert extra <= 2 * x1.shape[0] * plain[..., 0].numel(), extra

    # the batched route's derivatives, against float64 kernels of the distinct points at input scale 300
    points = torch.randn(5, 3) * 300
    ids = [torch.tensor([0, 1, 2, 3, 4, 0, 2]), torch.tensor([3, 1, 4, 1, 1, 0, 2])]
    weights = torch.randn(5, 7)
    exact = net.kernel(points)
    scales = (float(exact.nngp.detach().abs().max()), float(exact.ntk.detach().abs().max()))
    columns = [torch.stack([k[:, i] for i in ids]) for k in (exact.nngp, exact.ntk)]
    expected = _normalized_gradients(net, (columns[0], columns[1]), weights, scales)
    low = copy.deepcopy(net).float()
    batched = low.kernel(points.float(), torch.stack([points[i] for i in ids]).float())
    got = _normalized_gradients(low, (batched.nngp, batched.ntk), weights.float(), scales)
    largest = max(float(e.abs().max()) for e in expected)
    for g, e in zip(got, expected, strict=True):
        assert float((g - e).abs().max()) <= 2e-6 * largest


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_kernel_twins_found_in_chunks_take_the_same_derivatives(dtype, monkeypatch):
    """A large cross kernel's pairs of equal points are found a chunk at a time (Duplicates.pairs),
    and the twins' own derivatives are written into the map chunk by chunk (one indexed assignment
    each). Chunks of 7 comparisons (several per kernel) must give the kernels and the variances'
    gradients of one chunk: every entry is computed by the same elementwise arithmetic (Erf's
    self-pair factor is a square root, rounded alike in any chunk) and reaches each variance
    through the same sums, so bitwise, not within a tolerance."""
    g = torch.Generator().manual_seed(2)
    x1 = (30 * torch.randn(12, 3, generator=g, dtype=torch.float64)).to(dtype)
    x2 = torch.cat([x1[[3, 7, 7, 11, 0]], (30 * torch.randn(6, 3, generator=g, dtype=torch.float64)).to(dtype)])
    results = []
    for chunk in (1 << 20, 7):
        monkeypatch.setattr(ntkgp.layers.state, "_PAIR_BLOCK_ENTRIES", chunk)
        net = ntkgp.serial(D(8, 2.0, 0.1), ntkgp.Erf(), D(8, 1.5, 0.2), ntkgp.Erf(), D(1, 1.3, 0.1)).to(dtype)
        k = net.kernel(x1, x2)
        grads = torch.autograd.grad((1.1 * k.nngp).sum() + k.ntk.sum(), list(net.parameters()))
        results.append((k.nngp.detach(), k.ntk.detach(), *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
