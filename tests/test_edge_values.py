"""Exact values at the edges the closed-form and quadrature tests do not reach: equal ReLU slopes,
zero-variance inputs for Sign and LayerNorm, ARD first layers (kernel gradients: test_gradients.py),
singular kernels in discrete and infinite time, standard-parameterized ARD training.

Each test was written against a mutation of the code that the rest of the suite let through."""

from __future__ import annotations

import math
import re

import pytest
import torch

import ntkgp
from ntkgp import predict
from ntkgp.finite.train import train_ensemble
from ntkgp.layers.numerics import safe_sqrt

pytestmark = pytest.mark.usefixtures("float64_default")


def _x(n=6, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))

# ABReLU with a == b is linear: T = a² k12, Ṫ = a²
def test_abrelu_with_equal_slopes_is_linear():
    layer = ntkgp.ABReLU(0.7, 0.7)
    k11, k12, k22 = torch.tensor([1.3]), torch.tensor([-0.4]), torch.tensor([0.9])
    t, dot = layer.pair_kernel(k11, k12, k22, True)
    torch.testing.assert_close(t, 0.49 * k12)
    torch.testing.assert_close(dot, torch.tensor([0.49]))

# Sign of a zero-variance input is sign(0) = 0: its whole row and column vanish
@pytest.mark.parametrize("grad", [False, True])
def test_sign_of_a_zero_input_without_bias_is_zero(grad):
    net = ntkgp.serial(ntkgp.Dense(3, 1.0, None), ntkgp.Sign(), ntkgp.Dense(1, 1.0, None))
    x = torch.cat([torch.zeros(1, 4), _x(3)]).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        k = net.kernel(x)
    assert float(k.nngp[0].detach().abs().max()) == 0.0 and float(k.nngp[:, 0].detach().abs().max()) == 0.0
    assert float(ntkgp.Sign().variance(torch.zeros(1))) == 0.0

# the finite twin of Cos is a·cos(bx + c)
def test_cos_finite_twin_is_cos():
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(ntkgp.Cos(0.9, 1.1, -0.2).fn(x), 0.9 * torch.cos(1.1 * x - 0.2))

# a zero vector only among the *second* inputs (no bias): Sign must give it a zero column
# (for the ReLU family the angle at a zero-variance point does not matter)
def test_sign_cross_kernel_with_a_zero_vector_only_in_x2():
    net = ntkgp.serial(ntkgp.Dense(3, 1.0, None), ntkgp.Sign(), ntkgp.Dense(1, 1.0, None))
    x1, x2 = _x(3), torch.cat([torch.zeros(1, 4), _x(2, seed=1)])
    with torch.no_grad():
        a, b = net.kernel(x1, x2), net.kernel(x2, x1)
    assert float(a.nngp[:, 0].abs().max()) == 0.0
    torch.testing.assert_close(a.nngp, b.nngp.mT, rtol=1e-12, atol=0)

def test_safe_sqrt_derivative():
    x = torch.tensor([0.25, 4.0, 0.0], requires_grad=True)
    safe_sqrt(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 0.25, 0.0]))

# standard parameterization with ARD: the first-layer NTK is the *unweighted* Gram x·x' (+1)
def test_standard_ard_first_layer_ntk_is_the_plain_gram():
    w = torch.tensor([0.5, 2.0, 3.0])
    x = _x(4, 3)
    k = ntkgp.Dense(2, w, 0.2, "standard", ard_num_dims=3).kernel(x)
    torch.testing.assert_close(k.ntk, x @ x.T + 1.0)

# ARD NNGP is Σ_j σ_j² x_j x'_j / d + σ_b²
def test_ard_first_layer_nngp_formula():
    w = torch.tensor([0.5, 2.0, 3.0])
    x = _x(4, 3)
    k = ntkgp.Dense(2, w, 0.2, ard_num_dims=3).kernel(x)
    torch.testing.assert_close(k.nngp, (x * w) @ x.T / 3 + 0.2)

# the finite LayerNorm is torch's layer_norm without affine parameters
def test_layernorm_module_is_torch_layer_norm():
    model = ntkgp.LayerNorm(eps=1e-5).build(in_features=7, seed=0)
    x = _x(5, 7)
    torch.testing.assert_close(model(x), torch.nn.functional.layer_norm(x, (7,), eps=1e-5))

# LayerNorm of a zero-variance point (zero input, no bias) stays finite thanks to eps
def test_layernorm_of_a_zero_input_is_finite():
    net = ntkgp.serial(ntkgp.Dense(4, 1.0, None), ntkgp.LayerNorm(), ntkgp.ReLU(), ntkgp.Dense(1))
    x = torch.cat([torch.zeros(1, 3), _x(3, 3)])
    with torch.no_grad():
        k, kd = net.kernel(x), net.kernel(x, torch.flip(x, [0]))
    for t in (k.nngp, k.ntk, kd.nngp, kd.ntk):
        assert bool(torch.isfinite(t).all())

# discrete-time analogue of the zero-eigenvalue limit: flow along the null direction is s·η/m
def test_zero_eigenvalue_discrete_steps():
    """Discrete steps along an exactly singular kernel: the null direction never moves, the other
    follows (1 − (1 − ηλ/m)^s)/λ, also at ηλ/m = 1 (one step to the target)."""
    theta = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([2.0, 0.0])                  # [1, 1] along λ = 2, plus [1, −1] in the null space
    cross = torch.tensor([[0.5, 0.5]])            # in the range, as for a positive semi-definite kernel
    for lr in (0.3, 1.0):
        train, test = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, ntk_test_train=cross,
                                                   fx_test_0=torch.zeros(1), steps=3,
                                                   learning_rate=lr)
        growth = 1 - (1 - lr) ** 3                # ηλ/m = lr
        torch.testing.assert_close(train, growth * torch.ones(2))
        torch.testing.assert_close(test, growth / 2 * torch.ones(1))

# at t = inf the null directions of a singular kernel still do not move
def test_zero_eigenvalue_infinite_time():
    theta = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([1.0, -1.0])          # in the null space
    train = predict.gradient_descent_mse(theta, y, fx_train_0=0.0, t=math.inf)
    torch.testing.assert_close(train, torch.zeros(2))
    y2 = torch.tensor([1.0, 3.0])          # component 2 along the (1,1) direction, -1 along null
    v = torch.tensor([[0.5, -0.5]])
    # a test row along the null direction, which no positive semi-definite joint kernel has: said so
    with pytest.warns(RuntimeWarning, match="count as untrained, but move the test outputs"):
        train, test = predict.gradient_descent_mse(theta, y2, fx_train_0=0.0, ntk_test_train=v,
                                                   fx_test_0=torch.zeros(1), t=math.inf)
    torch.testing.assert_close(train, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(test, torch.zeros(1))   # Θ*d Θ⁺ y: no null-space flow at t = inf


# with ARD, standard-parameterized training (per-input-feature rates) follows the NTK twin
def test_standard_ard_training_follows_the_ntk_twin():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.sin(x.sum(-1))
    w = torch.tensor([0.3, 1.0, 4.0])
    out = {}
    for param in ("ntk", "standard"):
        net = ntkgp.serial(ntkgp.Dense(16, w, 0.1, param, ard_num_dims=3), ntkgp.Erf(), ntkgp.Dense(1, 1.5, 0.1, param))
        out[param] = train_ensemble(net, x, y, ensemble_size=2, learning_rate=0.5, record_steps=[0, 20],
                                    dtype=torch.float64).test_outputs
    torch.testing.assert_close(out["ntk"], out["standard"], rtol=1e-9, atol=1e-11)


def test_kernels_that_overflow_their_dtype_are_refused_by_name():
    """Finite variances near float64's largest number, or float32 inputs of ~1e20, gave kernels of
    inf and NaN with no error (a later failed Cholesky, or nothing at all); a GPyTorch kernel passed
    them on. Kernels of the same networks at ordinary scales stay finite."""
    from ntkgp.kernels import NNGPKernel
    from ntkgp.layers.base import NonFiniteKernelError

    x = _x().double()
    huge = ntkgp.serial(ntkgp.Dense(3, 1e300), ntkgp.ReLU(), ntkgp.Dense(1, 1e300))
    with pytest.raises(NonFiniteKernelError, match=r"NNGP and NTK kernels overflow torch\.float64 .*rescale"):
        huge.kernel(x)
    with pytest.raises(NonFiniteKernelError, match=r"^The NNGP kernel overflows torch\.float64"):
        huge.kernel(x, ntk=False)
    for diag in (False, True):
        with pytest.raises(NonFiniteKernelError, match=r"overflow.* torch\.float32 .*2\.\d+e\+20.*or use float64"):
            ntkgp.mlp(2, "erf").kernel(1e20 * x.float(), diag=diag)
    with pytest.raises(NonFiniteKernelError):   # a float32 kernel: a float64 one promotes the inputs, as GPyTorch's
        NNGPKernel(ntkgp.mlp(2, "erf")).float()(1e20 * x.float()).to_dense()
    for net, inputs in ((huge, 1e-300 * x), (ntkgp.mlp(2, "erf"), 1e18 * x.float())):
        state = net.kernel(inputs)
        assert torch.isfinite(state.nngp).all() and torch.isfinite(state.ntk).all()


def test_inputs_on_the_meta_device_and_built_layers_given_the_wrong_width_are_refused_by_name():
    """torch's "Tensor.item() cannot be called on meta tensors" from the input check, and "mat1 and
    mat2 shapes cannot be multiplied" from a built network's first layer."""
    with pytest.raises(ValueError, match="x1 is on the meta device"):
        ntkgp.mlp(1).kernel(torch.randn(6, 5, device="meta"))
    net = ntkgp.mlp(2).build(in_features=5)
    with pytest.raises(ValueError, match=r"takes inputs of 5 feature\(s\), got shape \(2, 6\)"):
        net(torch.randn(2, 6))
    assert net(torch.randn(2, 5)).shape == (2, 1)
    assert ntkgp.mlp(2).build(in_features=5, device="meta")(torch.empty(1, 5, device="meta")).shape == (1, 1)


def _meta(*shape):
    return torch.zeros(shape, device="meta")


def _network_gp_predict(x):
    model = ntkgp.models.NetworkGP(_x(), _x(6, 1)[:, 0]).eval()
    return model(x)


_K = torch.eye(6) + 0.1
_Y = _x(6, 1)
#: Where a meta tensor (shapes, no values) reached a value check other than the inputs': torch's
#: "Tensor.item() cannot be called on meta tensors" or "Cannot copy out of meta tensor; no data!".
META_ARGUMENTS = {
    "ntk_train_train of gradient_descent_mse": lambda: predict.gradient_descent_mse(_meta(6, 6), _Y, t=1.0),
    "ntk_train_train of gradient_descent": lambda: predict.gradient_descent(
        lambda f, y: ((f - y) ** 2).sum(), _meta(6, 6), _Y, t=1.0),
    "ntk_train_train of max_learning_rate": lambda: predict.max_learning_rate(_meta(6, 6)),
    "momentum": lambda: predict.max_learning_rate(_K, momentum=_meta()),
    "fx_train_0": lambda: predict.gradient_descent_mse(_K, _Y, fx_train_0=_meta(6, 1), t=1.0),
    "diag_reg": lambda: predict.gradient_descent_mse(_K, _Y, diag_reg=_meta(), t=1.0),
    "t": lambda: predict.gradient_flow(ntkgp.mlp(1), _x(), _Y, t=_meta(2)),
    "steps": lambda: predict.gradient_flow(ntkgp.mlp(1), _x(), _Y, steps=_meta(2)),
    "noise": lambda: predict.gp_posterior(ntkgp.mlp(1), _x(), _Y, _x(3), noise=_meta()),
    "learning_rate": lambda: predict.gradient_flow(ntkgp.mlp(1), _x(), _Y, t=1.0, learning_rate=_meta()),
    "y_train of train_ensemble": lambda: train_ensemble(ntkgp.mlp(1, width=8), _x(), _meta(6, 1), ensemble_size=2,
                                                        learning_rate=0.1, record_steps=[0, 1]),
    "record_steps": lambda: train_ensemble(ntkgp.mlp(1, width=8), _x(), _Y, ensemble_size=2, learning_rate=0.1,
                                           record_steps=_meta(2)),
    "train_y of NetworkGP": lambda: ntkgp.models.NetworkGP(_x(), _meta(6)),
    "x of NetworkGP's prediction": lambda: _network_gp_predict(_meta(3, 4)),
}


@pytest.mark.parametrize("argument", META_ARGUMENTS)
def test_values_on_the_meta_device_are_refused_by_name(argument):
    """The meta device holds shapes but no values: every check of values (finiteness, a number's
    range, times) refuses it, naming the argument, before any kernel is computed."""
    name = argument.split(" of ")[0]
    with pytest.raises(ValueError, match=rf"^{name} is on the meta device, which holds shapes but no values"):
        META_ARGUMENTS[argument]()


@pytest.mark.parametrize("ensemble_size", [None, 3])
@pytest.mark.parametrize("convert", [torch.Tensor.tolist, torch.Tensor.numpy])
def test_a_built_network_given_a_list_or_array_says_it_takes_a_tensor(convert, ensemble_size):
    """'list' object has no attribute 'shape' (or 'ndarray' ... 'dim') from the first Dense layer."""
    for in_features in (4, None):   # drawn at the build, or deferred to the first call
        net = ntkgp.mlp(2, width=8).build(in_features=in_features, ensemble_size=ensemble_size)
        with pytest.raises(ValueError, match=r"^This layer takes a torch\.Tensor of inputs \(\.\.\., n, d\), got "
                                             rf"{type(convert(_x())).__name__}\.$"):
            net(convert(_x()))


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_a_built_network_refuses_boolean_integer_and_complex_inputs_by_name(parameterization, ensemble_size):
    """In NTK parameterization the first layer's input scale promoted boolean and integer inputs (booleans
    read as 0/1, silently), in standard parameterization torch's matmul failed ("expected m1 and m2 to have
    the same dtype, but got: bool != double"); net.kernel, empirical_ntk and train_ensemble refuse such
    inputs, as torch's own Linear does."""
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    for in_features in (2, None):   # drawn at the build, or deferred to the first call
        net = ntkgp.mlp(1, "erf", 2.0, 0.1, width=8, parameterization=parameterization).build(
            in_features=in_features, ensemble_size=ensemble_size, dtype=torch.float64)
        for dtype in (torch.bool, torch.int64, torch.int32, torch.complex128):
            with pytest.raises(ValueError, match=rf"^This layer takes real floating-point inputs, got {dtype}; "
                                                 r"convert them with x\.to\(torch\.float64\)"):
                net(x.to(dtype))
        assert net(x).dtype == torch.float64   # the float inputs of the same values pass


@pytest.mark.parametrize("first", [ntkgp.Erf, ntkgp.ReLU, ntkgp.LayerNorm])
def test_a_built_network_starting_without_a_dense_layer_refuses_non_float_inputs(first):
    """An activation applied to integers returned float32 whatever the network's dtype (a float32
    network then ran on them, read as numbers, silently), and a LayerNorm failed inside torch
    ("var_mean only support floating point and complex dtypes")."""
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        net = ntkgp.serial(first(), ntkgp.Dense(4), ntkgp.Dense(1)).build(in_features=2, dtype=dtype)
        for bad in (torch.bool, torch.int64, torch.complex64):
            with pytest.raises(ValueError, match=rf"^This layer takes real floating-point inputs, got {bad}; "):
                net(x.to(bad))
        assert net(x.to(dtype)).dtype == dtype


@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_a_built_network_refuses_inputs_of_another_float_dtype_by_name(ensemble_size):
    """float32 inputs to a float64 network (``torch.randn``'s default against ``dtype=torch.float64``)
    failed inside torch's matmul, "expected m1 and m2 to have the same dtype, but got: float != double",
    from whichever layer came first (after an activation too). Under autocast: the next test."""
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    for spec in (ntkgp.mlp(1, "erf", width=8), ntkgp.serial(ntkgp.Erf(), ntkgp.Dense(4), ntkgp.Dense(1))):
        for net_dtype, bad in ((torch.float64, torch.float32), (torch.float32, torch.float64),
                               (torch.float32, torch.bfloat16)):
            for in_features in (2, None):   # drawn at the build, or deferred to the first call
                net = spec.build(in_features=in_features, ensemble_size=ensemble_size, dtype=net_dtype)
                with pytest.raises(ValueError, match=rf"^This layer's parameters are {net_dtype} but its inputs are "
                                                     rf"{bad}: convert the inputs with x\.to\({net_dtype}\)"):
                    net(x.to(bad))
                assert net(x.to(net_dtype)).dtype == net_dtype


@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_under_autocast_float64_inputs_or_parameters_of_another_dtype_are_refused_by_name(ensemble_size):
    """autocast casts float32, float16 and bfloat16 operands to its dtype, never float64 ones: a float64
    network's float32 (or bfloat16) inputs, or a float32 network's float64 inputs, failed inside torch's
    matmul there ("expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != double"). The
    casts autocast does make still run: float16 inputs to a float32 network give its float32 outputs to
    bfloat16's rounding (2^-8 relative, a few products summed)."""
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0], [-2.0, 0.5]], dtype=torch.float64)
    spec = ntkgp.mlp(1, "erf", width=8)
    for net_dtype, bad in ((torch.float64, torch.float32), (torch.float64, torch.bfloat16),
                           (torch.float32, torch.float64)):
        for in_features in (2, None):
            net = spec.build(in_features=in_features, ensemble_size=ensemble_size, dtype=net_dtype, seed=0)
            with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
                    ValueError, match=rf"^This layer's parameters are {net_dtype} but its inputs are {bad}: .*"
                                      r"\(autocast does not cast float64\)\.$"):
                net(x.to(bad))
    net = spec.build(in_features=2, ensemble_size=ensemble_size, dtype=torch.float32, seed=0)
    with torch.no_grad():
        expected = net(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x.half())
    torch.testing.assert_close(mixed.float(), expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))


def test_a_built_ensemble_given_inputs_for_another_number_of_members_is_refused_by_name():
    # torch's "The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 0"
    ensemble = ntkgp.mlp(2).build(in_features=5, ensemble_size=4)
    with pytest.raises(ValueError, match=r"ensemble of 4 members takes inputs .* got shape \(3, 2, 5\)"):
        ensemble(torch.randn(3, 2, 5))
    for shape in ((2, 5), (4, 2, 5), (1, 2, 5), (6, 4, 2, 5)):   # shared, per member, broadcast, batched
        assert ensemble(torch.randn(shape)).shape == (*shape[:-3], 4, 2, 1)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")   # torch's, on making one
@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr"])
def test_sparse_inputs_targets_and_kernels_are_refused_by_name(layout):
    """torch's "Could not run 'aten::aminmax' with arguments from the 'SparseCPU' backend" (or, for
    CSR, "Only batched sparse compressed (non-block) tensors are supported") from the finiteness
    check, with no word of which argument or what to do."""
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    net = ntkgp.mlp(1)
    ntk = net.kernel(x).ntk
    sparse = lambda t: getattr(t, layout)()  # noqa: E731
    for call, match in [
        (lambda: net.kernel(sparse(x)), "x1 is a torch.sparse_c.. tensor; .*x1.to_dense"),
        (lambda: net.kernel(x, sparse(x)), "x2 is a torch.sparse_c.. tensor"),
        (lambda: ntkgp.NTKKernel(net)(sparse(x)).to_dense(), "x1 is a torch.sparse"),
        (lambda: ntkgp.predict.gradient_flow(net, sparse(x), y, x, t=1.0), "x_train is a torch.sparse"),
        (lambda: ntkgp.predict.gradient_descent_mse(sparse(ntk), y, t=1.0),
         r"sparse_c.. tensor of shape \(6, 6\).*to_dense"),
        (lambda: ntkgp.predict.gradient_descent_mse(ntk, sparse(y), t=1.0), r"sparse_c.. tensor of shape \(6, 1\)"),
        (lambda: ntkgp.predict.max_learning_rate(sparse(ntk)), "sparse_c.. tensor"),
        (lambda: ntkgp.models.NetworkGP(sparse(x), y[:, 0]), "train_x is a torch.sparse"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_polynomial_constructors_refuse_what_they_cannot_represent():
    """RectifiedMonomial(n ≥ 151) had an infinite T(k, k, k) coefficient (≥ 152: inf polynomial
    coefficients too; NaN kernels) and from n = 169 a bare OverflowError; Polynomial took a dict's
    keys as its coefficients (φ(x) = x for {0: 1, 1: 2})."""
    assert ntkgp.RectifiedMonomial(150).degree == 150
    for degree in (151, 152, 170, 400):
        with pytest.raises(ValueError, match=r"overflow a float; the largest degree .* is 150"):
            ntkgp.RectifiedMonomial(degree)
    for coefficients in ({0: 1.0, 1: 2.0}, {1.0, 2.0}):
        with pytest.raises(ValueError, match="needs a sequence of coefficients"):
            ntkgp.Polynomial(coefficients)
    assert ntkgp.Polynomial((0.0, 1.0)).coefficients == (0.0, 1.0)


# (degree, dtype, variance): T(k, k, k) = (2n − 1)!! k^n / 2 within the dtype's range, at k up to its edge
@pytest.mark.parametrize(("degree", "dtype", "k"), [
    (1, torch.float32, 3e38), (1, torch.float64, 1.7e308), (2, torch.float32, 1.4e19), (2, torch.float64, 1.0e154),
    (3, torch.float32, 3.5e12), (3, torch.float64, 2.5e102)])
def test_rectified_monomial_kernels_near_the_largest_float_are_computed_not_refused(degree, dtype, k):
    """The arc-cosine terms of ``RectifiedMonomial(n)`` reach ``S·k^n`` (``(π − θ)·k12 + s`` for ``n = 1``, up
    to ``π k``) before they cancel to ``T``: at ``ρ = 1`` and ``1/2`` a representable ``T`` (ReLU's ``k/2``
    in float32 from ``k ≈ 1.1e38``; degree 2 at ``1.4e19``: ``T = 2.9e38``) overflowed on the way and was
    refused as "the kernel overflows". Now the pairs that overflowed are evaluated at ``4^{−e}·k``
    (``T`` and ``Ṫ`` are homogeneous): ``T`` and ``Ṫ`` within 4 ulps of the 50-digit reference (the
    inherent error at these correlations, ``(cond + 1)·ε`` with ``cond ≤ 2``; measured ≤ 0.8 ulps), and
    ``∂T/∂k12 = Ṫ`` (Price) finite."""
    import mpmath as mp
    from mpmath_kernels import reference

    layer, eps = ntkgp.RectifiedMonomial(degree), torch.finfo(dtype).eps
    f = reference("RectifiedMonomial", (degree,))
    for rho in (1.0, 0.5):
        k11 = torch.tensor([k], dtype=dtype)
        k12 = (k11 * rho).requires_grad_()
        t, dot = layer.pair_kernel(k11, k12, k11, True)
        exact = f(float(k11), float(k12.detach()), float(k11))
        for value, ref in zip((t.detach(), dot.detach()), exact, strict=True):
            assert abs(mp.mpf(float(value)) / ref - 1) <= 4 * eps, (rho, float(value), float(ref))
        (grad,) = torch.autograd.grad(t.sum(), k12)
        assert abs(float(grad) / float(exact[1]) - 1) <= 4 * eps


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float64, 340), (torch.float32, 42)])
def test_rectified_monomial_gradients_where_the_discarded_arc_cosine_form_overflows(dtype, scale):
    """For ``k12 ≤ 0`` degree 3 takes ``T`` from its series; the arc-cosine form beside it, discarded
    there, has terms up to ``S·p^n`` that overflow (``Σ_A → −inf``, clamped to 0) where ``T`` does not
    (``T = 2.9e302`` at ``k = 2^340``, ``ρ = −0.95``, float64): ``where``'s zero gradient times that
    ``inf`` made ``∂T/∂k`` NaN. ``T`` is homogeneous of degree 3, its gradient of degree 2, and every
    step of its evaluation scales exactly by powers of 2: the gradient at ``2^e·k`` is ``4^e`` times
    the one at unit scale, bit for bit (as it was, below the overflow); at ``ρ = −0.5``,
    ``∂T/∂k12 = Ṫ`` (Price) within 4 ulps of the 50-digit reference (measured 3)."""
    import mpmath as mp
    from mpmath_kernels import reference

    layer, big = ntkgp.RectifiedMonomial(3), 2.0**scale

    def gradients(rho: float, k: float) -> tuple[torch.Tensor, ...]:
        k11 = torch.tensor([1.1 * k], dtype=dtype, requires_grad=True)
        k22 = torch.tensor([1.2 * k], dtype=dtype, requires_grad=True)
        k12 = (rho * k11.detach().sqrt() * k22.detach().sqrt()).requires_grad_()
        t, _ = layer.pair_kernel(k11, k12, k22, False)
        assert torch.isfinite(t).all()
        return (k11.detach(), k12.detach(), k22.detach(), *torch.autograd.grad(t.sum(), (k11, k12, k22)))

    for rho in (-0.95, -0.999, -0.5):   # the last for Ṫ below
        *_, g11, g12, g22 = gradients(rho, 1.0)
        a, b, c, *scaled = gradients(rho, big)
        for got, unit in zip(scaled, (g11, g12, g22), strict=True):
            assert torch.equal(got, unit * big * big), (rho, float(got), float(unit * big * big))
    dot = reference("RectifiedMonomial", (3,))(float(a), float(b), float(c))[1]
    assert abs(mp.mpf(float(scaled[1])) / dot - 1) <= 4 * torch.finfo(dtype).eps


def test_rectified_monomial_pickled_before_its_overflow_rescue_still_rescues():
    """A ``RectifiedMonomial`` pickled before ``_log_sizes`` existed (``torch.save`` of a network) failed
    with "'RectifiedMonomial' object has no attribute '_log_sizes'" where its terms overflowed (ReLU's
    ``T`` at ``k = 2e38``, ``ρ = 0.9`` in float32); unpickled, it gives the fresh layer's kernels bit for bit."""
    import pickle

    fresh = ntkgp.RectifiedMonomial(1)
    old = ntkgp.RectifiedMonomial(1)
    del old.__dict__["_log_sizes"]   # what the previous version pickled
    loaded = pickle.loads(pickle.dumps(old))
    k = torch.tensor([2e38], dtype=torch.float32)
    for got, want in zip(loaded.pair_kernel(k, 0.9 * k, k, True), fresh.pair_kernel(k, 0.9 * k, k, True), strict=True):
        assert torch.isfinite(want).all() and torch.equal(got, want)


def test_numerical_quadrature_that_does_not_settle_says_by_how_much_it_moved():
    """tanh at variance 1e3 (inputs on a pixel scale) ran to degree 300 with E[tanh'(u)] 93 % off
    (0.0019 for 2/sqrt(2π·1000) = 0.0252), and the warning said only that rtol was not reached."""
    layer = ntkgp.Numerical(torch.tanh)
    k = torch.tensor([1e-3, 1e3])
    with pytest.warns(RuntimeWarning, match=r"last step moved them by up to 0\.\d+\).*scale the inputs down"):
        _, dot = layer.pair_kernel(k[:1], torch.zeros(1), k[1:], True)
    assert abs(float(dot) / (2 / math.sqrt(2 * math.pi * 1e3)) - 1) > 0.5   # what the warning is about


@pytest.mark.parametrize(("make", "name"), [
    (lambda: ntkgp.LeakyReLU(1e200), "a"), (lambda: ntkgp.Erf(b=1e200), "b"), (lambda: ntkgp.Exp(a=1e200), "a"),
    (lambda: ntkgp.ABReLU(-1e154, 1e154), "a - b"), (lambda: ntkgp.Gaussian(b=-1e160), "b"),
    (lambda: ntkgp.Erf(c=1e200), "c")], ids=["leaky_relu", "erf", "exp", "abrelu", "gaussian", "erf_c"])
def test_activation_constants_whose_squares_overflow_are_refused_at_construction(make, name):
    """Finite constants whose square (or a − b's, ABReLU) overflows a Python float failed in the kernel
    with OverflowError (34, 'Numerical result out of range'), naming neither the layer nor the
    constant; they are refused when the layer is built. (1.3e154 is the largest whose square is finite.)"""
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} = .*e\+\d+: its square, which the kernel takes, "
                                         "overflows a float"):
        make()
    assert ntkgp.ABReLU(-6e153, 6e153).a == -6e153   # squares just below the largest float: accepted
    net = ntkgp.serial(ntkgp.Dense(2), ntkgp.Sin(c=1e200), ntkgp.Dense(1))   # a phase is never squared
    assert bool(torch.isfinite(net.kernel(torch.randn(3, 2)).nngp).all())


def test_a_copied_numerical_layer_keeps_its_output_check():
    """deepcopy and pickle rebuilt Numerical without the runtime check that fn keeps its input's
    shape and dtype: a copy of a float32 network whose fn returns float64 (which the float64
    construction probe cannot see) failed inside einsum with torch's dtype message."""
    import copy
    import pickle

    x = torch.randn(5, 3, dtype=torch.float32)
    net = ntkgp.serial(ntkgp.Dense(4), ntkgp.Numerical(lambda t: torch.tanh(t).double()), ntkgp.Dense(1)).float()
    for candidate in (net, copy.deepcopy(net)):
        with pytest.raises(ValueError, match="act elementwise and keep the dtype"):
            candidate.kernel(x)
    plain = ntkgp.serial(ntkgp.Dense(4), ntkgp.Numerical(torch.tanh), ntkgp.Dense(1))
    for copied in (copy.deepcopy(plain), pickle.loads(pickle.dumps(plain))):
        assert torch.equal(copied.kernel(x.double()).ntk, plain.kernel(x.double()).ntk)


def test_user_activations_that_are_not_elementwise_torch_functions_are_refused_when_built():
    """A fn mixing the features but keeping the shape gave a wrong kernel (NNGP = the bias only)
    with only a quadrature warning; math.sin and np.sin failed inside the kernel or the finite
    twin with torch's messages."""
    import numpy as np

    for fn in (lambda t: t - t.mean(-1, keepdim=True), lambda t: t.sum(-1, keepdim=True).expand_as(t)):
        for layer in (ntkgp.Numerical, lambda f: ntkgp.Elementwise(f, lambda k12, k11, k22: k12)):
            with pytest.raises(ValueError, match="must act elementwise"):
                layer(fn)
    for fn in (math.sin, np.sin):
        with pytest.raises(ValueError, match="fails on a float64 tensor"):
            ntkgp.Numerical(fn)
    for fn in (torch.tanh, torch.sign, lambda t: t.tanh_(), torch.log):   # elementwise, NaN included
        ntkgp.Numerical(fn)


def test_elementwise_nngp_independent_of_the_correlation_has_zero_ntk_factor():
    """An nngp_fn that does not use k12 (a constant φ: T = E[φ]², Ṫ = 0) failed with torch's
    "appears to not have been used in the graph"."""
    def constant(k12, k11, k22):   # through the variances, so it has a graph, but not through k12
        return 0 * (k11 * k22) + 0 * k12.detach() + 0.09

    const = ntkgp.serial(ntkgp.Dense(4, 1.5, 0.1), ntkgp.Elementwise(nngp_fn=constant), ntkgp.Dense(1, 1.2, 0.2))
    k = const.kernel(torch.randn(5, 3))
    torch.testing.assert_close(k.nngp, torch.full((5, 5), 1.2 * 0.09 + 0.2))
    torch.testing.assert_close(k.ntk, k.nngp)   # the readout's own kernel only: Ṫ = 0 below it


def test_layernorm_over_a_single_feature_is_refused_when_built():
    """After Dense(1) the finite twin subtracts a feature's own mean: 0 for every input, while the
    kernel (the many-feature limit, as for every hidden width) reads correlations such as 0.87."""
    net = ntkgp.serial(ntkgp.Dense(8), ntkgp.ReLU(), ntkgp.Dense(1), ntkgp.LayerNorm())
    for build in (lambda: net.build(seed=0), lambda: net.build(in_features=3, seed=0)):
        with pytest.raises(ValueError, match="LayerNorm over a single feature"):
            build()
    assert net.kernel(torch.randn(4, 3)).nngp.shape == (4, 4)
    wide = ntkgp.serial(ntkgp.Dense(8), ntkgp.ReLU(), ntkgp.Dense(2), ntkgp.LayerNorm()).build(in_features=3, seed=0)
    assert wide(torch.randn(4, 3)).shape == (4, 2)


def test_per_feature_weight_variances_without_ard_say_how_to_get_them():
    """Dense(5, tensor of 3 variances) is refused (one variance per layer unless ard_num_dims is
    given); the message now names ard_num_dims and expand_batch, where it only gave the shape."""
    with pytest.raises(ValueError, match=r"got shape \(3,\) \(per-feature weight variances: "
                                         r"Dense\(\.\.\., ard_num_dims=d\) on the first layer"):
        ntkgp.Dense(5, torch.tensor([1.0, 2.0, 3.0]))
    assert ntkgp.Dense(5, torch.tensor([1.0, 2.0, 3.0]), ard_num_dims=3).weight_var.shape == (3,)
    # a vector of bias variances is a batch's: the hint named expand_batch for weight_var only
    with pytest.raises(ValueError, match=r"^bias_var .* got shape \(2,\) \(a batch of variances: expand_batch\)\.$"):
        ntkgp.Dense(5, bias_var=torch.tensor([0.1, 0.2]))


def test_complex_and_boolean_variances_are_refused_like_python_complex_numbers():
    """A 0-d complex tensor variance lost its imaginary part (torch's warning only) and True became
    1.0, where a Python complex and noise=True are refused."""
    for value in (torch.tensor(2 + 1j), 2 + 1j, True, torch.tensor(True)):
        for name in ("weight_var", "bias_var"):
            with pytest.raises(ValueError, match=f"{name} must be a non-negative real number"):
                ntkgp.Dense(1, **{name: value})
    layer = ntkgp.Dense(1)
    with pytest.raises(ValueError, match="weight_var must be a non-negative real number"):
        layer.weight_var = torch.tensor(2 + 0j)
    assert ntkgp.Dense(1, weight_var=torch.tensor(2.0)).weight_var.item() == 2.0
    with pytest.raises(ValueError, match="weight_var must be a non-negative real number"):   # a float array
        ntkgp.Dense(1, weight_var=[True, 2.0, 3.0], ard_num_dims=3)
    assert ntkgp.Dense(1, weight_var=[1.0, 2.0, 3.0], ard_num_dims=3).weight_var.shape == (3,)
