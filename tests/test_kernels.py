"""NNGPKernel and NTKKernel as GPyTorch kernels."""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import pickle
import unittest
import weakref
from copy import deepcopy

import gpytorch
import numpy as np
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase

import ntkgp
from ntkgp import predict


class TestNNGPKernel(BaseKernelTestCase, unittest.TestCase):
    kernel_class = ntkgp.NNGPKernel

    def create_kernel_no_ard(self, **kwargs):
        return self.kernel_class(ntkgp.mlp(2, "relu", 1.8, 0.1), **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return self.kernel_class(ntkgp.mlp(2, "erf", 1.8, 0.1, ard_num_dims=num_dims), **kwargs)


class TestNTKKernel(TestNNGPKernel):
    kernel_class = ntkgp.NTKKernel


def test_kernels_return_the_network_kernels():
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        k = net.kernel(x1, x2)
        nngp = ntkgp.NNGPKernel(net)(x1, x2).to_dense()
        ntk = ntkgp.NTKKernel(net)(x1, x2).to_dense()
        diag = ntkgp.NTKKernel(net)(x1, diag=True)
    assert torch.equal(nngp, k.nngp) and torch.equal(ntk, k.ntk)
    torch.testing.assert_close(diag, net.kernel(x1).ntk.diagonal(), rtol=1e-12, atol=0)


def test_ntk_kernel_of_a_standard_network_is_the_standard_recursion():
    """NTKKernel's docstring gave only the NTK-parameterization step Θ ← K_new + σ_w² Θ; a standard
    Dense layer takes Θ ← n K_prev + σ_w² Θ + 1[bias] (n its finite incoming width), by hand here."""
    import math

    net = ntkgp.serial(ntkgp.Dense(7, 1.7, 0.2, parameterization="standard"), ntkgp.ReLU(),
                       ntkgp.Dense(1, 1.3, None, parameterization="standard"))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ntk = ntkgp.NTKKernel(net)(x).to_dense()
    d = x.shape[-1]
    k1 = 1.7 * x @ x.T / d + 0.2
    theta1 = d * (x @ x.T / d) + 1.0                               # n = d, with bias
    sd = k1.diagonal().sqrt()
    cos = (k1 / sd[:, None] / sd[None, :]).clamp(-1, 1)
    angle = torch.arccos(cos).fill_diagonal_(0.0)                 # exactly 0 for a point with itself
    relu = sd[:, None] * sd[None, :] * (torch.sin(angle) + (math.pi - angle) * cos) / (2 * math.pi)
    relu_dot = (math.pi - angle) / (2 * math.pi)
    theta2 = 7 * relu + 1.3 * theta1 * relu_dot                    # n = 7, no bias
    torch.testing.assert_close(ntk, theta2, rtol=1e-12, atol=1e-12)
    # and it differs from the NTK-parameterization step, which the docstring stated alone
    assert (ntk - (1.3 * relu + 1.3 * theta1 * relu_dot)).abs().max() > 1.0


def test_kernels_on_one_net_share_parameters_and_move_with_it():
    net = ntkgp.mlp(1, "erf", 1.5, 0.1)
    nngp, ntk = ntkgp.NNGPKernel(net), ntkgp.NTKKernel(net)
    names = {name for name, _ in nngp.named_parameters()}
    assert names == {"net.layers.0.raw_weight_var", "net.layers.0.raw_bias_var",
                     "net.layers.2.raw_weight_var", "net.layers.2.raw_bias_var"}
    assert {id(p) for p in nngp.parameters()} == {id(p) for p in ntk.parameters()}
    nngp.double()
    assert all(p.dtype == torch.float64 for p in ntk.parameters())


def test_hyperparameters_can_be_frozen_and_get_priors():
    net = ntkgp.serial(ntkgp.Dense(10, 2.0, 0.1, weight_var_prior=gpytorch.priors.GammaPrior(2.0, 1.0)),
                       ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))
    kernel = ntkgp.NNGPKernel(net)
    priors = list(kernel.named_priors())
    assert len(priors) == 1 and priors[0][0] == "net.layers.0.weight_var_prior"
    net[2].raw_bias_var.requires_grad_(False)
    x = torch.randn(5, 3)
    kernel(x).to_dense().sum().backward()
    assert net[2].raw_bias_var.grad is None and net[0].raw_weight_var.grad is not None


def test_a_slice_of_a_serial_network_is_the_network_of_those_layers():
    """``Serial.__getitem__`` is annotated ``-> Layer``, but a slice returned the ``ModuleList``'s own
    slice: ``net[:2].kernel(x)`` was "'ModuleList' object has no attribute 'kernel'". As torch's
    ``Sequential``, a slice is a ``Serial`` of the same layer objects (their hyperparameters shared)."""
    net = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(1, 1.5, 0.1))
    x = torch.linspace(-1, 1, 8).reshape(4, 2)
    head = net[:2]
    assert isinstance(head, ntkgp.Serial) and len(head) == 2 and head[0] is net[0] and head[1] is net[1]
    expected = ntkgp.serial(net[0], net[1]).kernel(x)
    got = head.kernel(x)
    torch.testing.assert_close(got.nngp, expected.nngp, rtol=0, atol=0)
    torch.testing.assert_close(got.ntk, expected.ntk, rtol=0, atol=0)
    assert isinstance(net[-1], ntkgp.Dense) and isinstance(net[1:], ntkgp.Serial)
    with pytest.raises(ValueError, match="at least one layer"):
        net[3:]


def test_a_network_grown_one_block_at_a_time_is_one_flat_serial():
    """``net = serial(net, ReLU(), Dense(8))`` repeated nested a Serial in a Serial per block: from a few
    hundred blocks on, the built network's forward pass, ``repr``, ``deepcopy`` and ``pickle`` raised
    ``RecursionError``, and at 1000 blocks ``kernel`` and ``build`` did too, while the same layers in one
    ``serial`` (as ``mlp`` makes them) work at any depth. A Serial among serial()'s layers is spliced in:
    the same layer objects, the same kernels (bit for bit: the same recursion in the same order)."""
    first, blocks = ntkgp.Dense(8, 1.5, 0.1), [(ntkgp.ReLU(), ntkgp.Dense(8, 1.9, 0.05)) for _ in range(1000)]
    net = first
    for block in blocks:
        net = ntkgp.serial(net, *block)
    flat = ntkgp.serial(first, *(layer for block in blocks for layer in block))
    assert len(net) == 2001 and all(a is b for a, b in zip(net, flat, strict=True))
    assert [name for name, _ in net.named_parameters()] == [name for name, _ in flat.named_parameters()]
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
    got, expected = net.kernel(x), flat.kernel(x)
    torch.testing.assert_close(got.nngp, expected.nngp, rtol=0, atol=0)
    torch.testing.assert_close(got.ntk, expected.ntk, rtol=0, atol=0)
    out = net.build(2, seed=3, dtype=torch.float64)(x)
    torch.testing.assert_close(out, flat.build(2, seed=3, dtype=torch.float64)(x), rtol=0, atol=0)
    assert torch.isfinite(out).all() and len(repr(net)) > 0
    copied = pickle.loads(pickle.dumps(deepcopy(net)))
    torch.testing.assert_close(copied.kernel(x).ntk, got.ntk, rtol=0, atol=0)
    # a Serial used as a layer is spliced by value: the block keeps its own layers, shared by both
    block = ntkgp.serial(ntkgp.Dense(8), ntkgp.Erf())
    outer = ntkgp.serial(block, ntkgp.Dense(1))
    assert len(block) == 2 and len(outer) == 3 and outer[0] is block[0] and outer[1] is block[1]


def test_parallel_branches_are_a_sequence_and_empty_slices_say_what_was_indexed():
    """``Parallel`` had no ``len``, iteration or indexing ("'Parallel' object is not subscriptable") while
    ``Serial`` has them; and an empty slice of a network was refused as "serial() needs at least one
    layer.", naming a call the user never wrote."""
    f = ntkgp.serial(ntkgp.Erf(), ntkgp.Dense(8, 1.5, 0.1))
    block = ntkgp.residual(*f)
    assert len(block) == 2 and list(block) == list(block.branches) and block[-1] is block.branches[1]
    assert isinstance(block[0], ntkgp.Identity) and list(block[1]) == list(f)
    concat = ntkgp.parallel(ntkgp.Dense(4), ntkgp.Dense(6), ntkgp.Dense(2), join="concat")
    tail = concat[1:]
    assert isinstance(tail, ntkgp.Parallel) and tail.join == "concat" and list(tail) == list(concat.branches)[1:]
    x = torch.linspace(-1, 1, 8).reshape(4, 2)
    expected = ntkgp.parallel(concat[1], concat[2], join="concat").kernel(x)
    torch.testing.assert_close(tail.kernel(x).ntk, expected.ntk, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[3:\] selects none of the 3 branches"):
        concat[3:]
    with pytest.raises(ValueError, match=r"\[2:0\] selects none of the 2 layers"):
        f[2:0]


@pytest.mark.parametrize("route", ["blocked", "checkpointed"])
def test_the_features_mean_is_the_same_on_every_route_of_the_kernel(route, monkeypatch):
    """``KernelState.mean`` is ``None`` only for centred features. The row-block routes (``torch.no_grad()``,
    and large kernels with autograd) dropped it, and ``identical`` with it: ``serial(Dense, ReLU).kernel(x)``
    had ``mean=None``, as if its ReLU features were centred, where the whole-matrix route gave their mean."""
    from ntkgp.layers import base

    x, y = torch.randn(7, 3), torch.randn(5, 3)
    nets = [ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.ReLU()),
            ntkgp.serial(ntkgp.Dense(8), ntkgp.parallel(ntkgp.ReLU(), ntkgp.Erf(), join="concat"))]
    calls = [(net, args) for net in nets for args in ((x,), (x, y))]
    expected = [net.kernel(*args) for net, args in calls]   # with autograd, small: the whole matrix at once
    monkeypatch.setattr(base, "BLOCK_ENTRIES", 10)                 # blocks of two rows
    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 10)
    for (net, args), want in zip(calls, expected, strict=True):
        with torch.no_grad() if route == "blocked" else contextlib.nullcontext():
            got = net.kernel(*args)
        assert got.mean is not None and got.identical == want.identical
        (m1, m2, uniform), (w1, w2, want_uniform) = got.mean(), want.mean()
        torch.testing.assert_close(m1, w1, rtol=0, atol=1e-15)
        torch.testing.assert_close(m2, w2, rtol=0, atol=1e-15)
        assert uniform == want_uniform
        for a, b in zip(got.centred(), want.centred(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    with torch.no_grad():   # centred features after a Dense layer: no mean on either route
        assert ntkgp.mlp(depth=1).kernel(x).mean is None


def test_replacing_a_variance_constraint_is_refused_before_it_breaks_the_kernel():
    """GPyTorch lets a user swap ``raw_lengthscale``'s constraint; a variance's ExactVariance
    (``anchor · exp(raw)``) cannot be swapped: an Interval was accepted and every kernel call then
    failed with an AttributeError. Refused at registration, with or without ``replace``."""
    layer = ntkgp.Dense(10, 2.0, 0.1)
    kernel, x = ntkgp.NNGPKernel(ntkgp.serial(layer, ntkgp.ReLU(), ntkgp.Dense(1))), torch.randn(4, 3)
    with torch.no_grad():
        before = kernel(x).to_dense()
    for replace in (True, False):
        with pytest.raises(ValueError, match=r"raw_weight_var of Dense.*weight_var_prior"):
            layer.register_constraint("raw_weight_var", gpytorch.constraints.Interval(0.5, 4.0), replace=replace)
    with torch.no_grad():
        assert torch.equal(kernel(x).to_dense(), before)
    assert layer.weight_var.item() == pytest.approx(2.0)


def test_setting_a_vector_where_a_scalar_variance_is_held_says_how_to_get_one():
    """A layer built with a vector weight_var names ard_num_dims and expand_batch; setting one on a
    built layer (``layer.weight_var = ...``, ``initialize``, GPyTorch's ``model.initialize(**{...})``)
    gave only "must broadcast to shape (), got shape (3,)". The setters now give the same hint, and a
    batched or per-feature variance, which holds a vector already, keeps the plain message."""
    layer = ntkgp.Dense(8, 2.0, 0.1)
    kernel = ntkgp.NTKKernel(ntkgp.serial(layer, ntkgp.ReLU(), ntkgp.Dense(1)))
    for set_it in (lambda v: setattr(layer, "weight_var", v), lambda v: layer.initialize(weight_var=v),
                   lambda v: kernel.initialize(**{"net.layers.0.weight_var": v})):
        with pytest.raises(ValueError, match=r"^weight_var must broadcast to shape \(\), got shape \(3,\) "
                                             r"\(per-feature weight variances: Dense\(\.\.\., ard_num_dims=d\) "
                                             r"on the first layer; a batch of variances: expand_batch\)\.$"):
            set_it(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"^bias_var must broadcast to shape \(\), got shape \(2,\) "
                                         r"\(a batch of variances: expand_batch\)\.$"):
        layer.bias_var = torch.tensor([0.1, 0.2])
    f64 = torch.zeros((), dtype=torch.float64)   # the refused values left the exact ones in place
    assert layer.variance_as("weight_var", f64).item() == 2.0 and layer.variance_as("bias_var", f64).item() == 0.1
    ard = ntkgp.Dense(8, 1.0, ard_num_dims=3)
    with pytest.raises(ValueError, match=r"^weight_var must broadcast to shape \(3,\), got shape \(2,\)\.$"):
        ard.weight_var = torch.tensor([1.0, 2.0])
    ard.weight_var = torch.tensor([1.0, 2.0, 3.0])   # the shapes it holds stay accepted
    assert ard.weight_var.tolist() == [1.0, 2.0, 3.0]


def test_initialize_takes_numbers_for_raw_variances_and_names_the_layers_variances():
    """GPyTorch's ``initialize`` takes "a tensor, a float, or an int", but checks a number given for a
    raw parameter through its constraint's transform, where ExactVariance's torch.exp failed with
    "argument 'input' must be Tensor, not float" (GPyTorch's softplus fails alike for an RBFKernel's
    raw_lengthscale, a limitation of GPyTorch's own). And the kernel's names are its layers':
    ``kernel.initialize(weight_var=2.0)`` said only "Unknown parameter weight_var for NTKKernel",
    ``net.0.weight_var`` (as ``kernel.net[0]`` reads) "Serial has no module 0"."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernels = [ntkgp.NTKKernel(ntkgp.mlp(1, "relu", 2.0, 0.1)).double() for _ in range(2)]
    kernels[0].initialize(**{"net.layers.0.raw_weight_var": 1.0, "net.layers.2.raw_bias_var": -2})
    kernels[1].initialize(**{"net.layers.0.raw_weight_var": torch.tensor(1.0, dtype=torch.float64),
                             "net.layers.2.raw_bias_var": torch.tensor(-2.0, dtype=torch.float64)})
    f64 = torch.zeros((), dtype=torch.float64)
    # the number gives what the same tensor gives (exactly): anchor · exp(raw)
    assert kernels[0].net[0].variance_as("weight_var", f64).item() == 2.0 * torch.tensor(1.0, dtype=torch.float64).exp()
    assert kernels[0].net[2].variance_as("bias_var", f64).item() == 0.1 * torch.tensor(-2.0, dtype=torch.float64).exp()
    with torch.no_grad():
        assert torch.equal(kernels[0](x).to_dense(), kernels[1](x).to_dense())
    with pytest.raises(RuntimeError, match="out of bounds"):   # a NaN raw value stays refused, as a NaN tensor is
        kernels[0].net[0].initialize(raw_weight_var=float("nan"))
    names = (r"\(net\.layers\.0\.weight_var, net\.layers\.0\.bias_var, "
             r"net\.layers\.2\.weight_var, net\.layers\.2\.bias_var\)")
    for wrong in ("weight_var", "raw_weight_var", "net.0.weight_var"):
        with pytest.raises(AttributeError, match=rf"NTKKernel's hyperparameters are its network's layers' variances, "
                                                 rf"initialized by their full names {names}, e\.g\. "):
            kernels[0].initialize(**{wrong: 3.0})
    assert kernels[0].net[0].variance_as("weight_var", f64).item() == 2.0 * torch.tensor(1.0, dtype=torch.float64).exp()


def test_kernels_compose_with_gpytorch_kernels():
    net = ntkgp.mlp(1, "relu")
    composite = ntkgp.NNGPKernel(net) + gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    product = ntkgp.NTKKernel(net) * gpytorch.kernels.RBFKernel()
    x = torch.randn(5, 2)
    with torch.no_grad():
        a = composite(x).to_dense()
        b = product(x).to_dense()
    assert a.shape == b.shape == (5, 5) and torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
def test_integer_inputs_are_taken_like_gpytorch_kernels_take_them(kernel_class):
    """GPyTorch's own kernels take integer inputs (RBFKernel promotes them against its float
    lengthscale); the network kernels refused them ('x1 must be a floating-point tensor', review).
    Beside a float input, an integer one takes its dtype, otherwise the kernel's."""
    kernel = kernel_class(ntkgp.mlp(2, "erf", weight_var=1.5, bias_var=0.1))
    x, z = torch.arange(6).reshape(3, 2), torch.tensor([[1, -1]])
    default = torch.get_default_dtype()
    with torch.no_grad():
        for args, floats, dtype in [((x,), (x.double(),), default), ((x, z), (x.double(), z.double()), default),
                                    ((x, z.double()), (x.double(), z.double()), torch.float64)]:
            out = kernel(*args).to_dense()
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), kernel(*floats).to_dense(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(kernel(x, diag=True), kernel(x.double(), diag=True).to(default))
        assert (gpytorch.kernels.RBFKernel()(x).to_dense().dtype == torch.get_default_dtype())
        # a float64 kernel (as in a model made .double()) takes them in float64, as RBFKernel does
        kernel.double()
        assert kernel(x).to_dense().dtype == gpytorch.kernels.RBFKernel().double()(x).to_dense().dtype == torch.float64
        with pytest.raises(ValueError, match="floating-point"):   # complex inputs stay refused
            kernel(x.to(torch.complex64)).to_dense()


def test_pickle_roundtrip_keeps_values():
    kernel = ntkgp.NTKKernel(ntkgp.mlp(2, "gelu", 1.3, 0.2))
    x = torch.randn(4, 3)
    with torch.no_grad():
        before = kernel(x).to_dense()
        after = pickle.loads(pickle.dumps(kernel))(x).to_dense()
    assert torch.equal(before, after)


def test_kernel_states_pickle_and_save_with_their_means():
    """``torch.save(net.kernel(x), f)`` raised "Can't pickle local object 'Activation.kernel_map.<locals>.mean'"
    for every network ending in an activation. The mean and centred kernels are saved as their values, and a
    ``LayerNorm`` applied to the loaded state gives the kernel of the whole network."""
    import io

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    head = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.parallel(ntkgp.ReLU(), ntkgp.Erf(), join="concat"))
    for args in ((x,), (x, y)):
        state = head.kernel(*args)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        for loaded in (pickle.loads(pickle.dumps(state)), torch.load(buffer, weights_only=False)):
            assert torch.equal(loaded.nngp, state.nngp) and torch.equal(loaded.ntk, state.ntk)
            assert (loaded.width, loaded.identical, loaded.symmetric) == (state.width, state.identical, state.symmetric)
            (m1, m2, uniform), (w1, w2, want_uniform) = loaded.mean(), state.mean()
            assert torch.equal(m1, w1) and torch.equal(m2, w2) and uniform == want_uniform
            normed = ntkgp.LayerNorm().kernel_map(loaded)
            want = ntkgp.serial(*head, ntkgp.LayerNorm()).kernel(*args)
            torch.testing.assert_close(normed.nngp, want.nngp, rtol=1e-15, atol=0)
            torch.testing.assert_close(normed.ntk, want.ntk, rtol=1e-15, atol=0)
    centred = pickle.loads(pickle.dumps(ntkgp.mlp(depth=1).kernel(x)))   # after a Dense layer: no mean
    assert centred.mean is None and centred.centred is None


def test_kernels_with_priors_pickle_and_save():
    """Priors are registered with picklable closures (GPyTorch's closures for a parameter name
    are local functions, which pickle and torch.save refused)."""
    import io

    prior = gpytorch.priors.GammaPrior(2.0, 1.0)
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1, weight_var_prior=prior, bias_var_prior=prior), ntkgp.ReLU(),
                       ntkgp.Dense(1, 1.5, 0.2, weight_var_prior=prior))
    kernel = ntkgp.NNGPKernel(net)
    buffer = io.BytesIO()
    torch.save(kernel, buffer)
    buffer.seek(0)
    for copy in (pickle.loads(pickle.dumps(kernel)), torch.load(buffer, weights_only=False)):
        priors = {name: float(p.log_prob(closure(module)).sum().detach())
                  for name, module, p, closure, _ in copy.named_priors()}
        assert priors == {name: float(p.log_prob(closure(module)).sum().detach())
                          for name, module, p, closure, _ in kernel.named_priors()} and len(priors) == 3
        layer = copy.net.layers[0]
        layer.sample_from_prior("weight_var_prior")             # the setting closure works on the copy
        assert float(layer.weight_var.detach()) != 2.0


def test_importing_ntkgp_leaves_gpytorch_settings_alone():
    import importlib

    before = (gpytorch.settings.max_cholesky_size.value(), gpytorch.settings.cholesky_jitter.value(torch.float64),
              gpytorch.settings.fast_computations.covar_root_decomposition.on(), torch.get_default_dtype())
    importlib.reload(ntkgp)
    after = (gpytorch.settings.max_cholesky_size.value(), gpytorch.settings.cholesky_jitter.value(torch.float64),
             gpytorch.settings.fast_computations.covar_root_decomposition.on(), torch.get_default_dtype())
    assert before == after


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_marginal_likelihood_gradients_are_finite_with_duplicated_points(dtype, kernel_class, activation):
    torch.manual_seed(0)
    x = torch.randn(12, 3, dtype=dtype)
    x = torch.cat([x, x[:4], torch.zeros(1, 3, dtype=dtype)])  # duplicates and a zero input
    y = torch.sin(x.sum(-1))
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    model = _GP(x, y, likelihood, kernel_class(ntkgp.mlp(2, activation, 1.7, 0.1, ard_num_dims=3))).to(dtype)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    loss = -mll(model(x), y)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert len(grads) == 7  # 3 Dense layers x (weight, bias) + noise
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name


class _DeepKernelGP(_GP):
    def __init__(self, x, y, likelihood, kernel, extractor):
        super().__init__(x, y, likelihood, kernel)
        self.extractor = extractor

    def forward(self, x):
        features = self.extractor(x.to(self.extractor[0].weight.dtype))
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(features))


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
@pytest.mark.parametrize("features", [torch.float32, torch.bfloat16])
def test_a_float64_model_takes_lower_precision_features_in_float64_as_gpytorch_kernels_do(kernel_class, features):
    """Deep kernel learning with a float32 (or bfloat16) feature extractor in a float64 model: the kernel
    followed the features' dtype, so the model trained on float32 covariances and every prediction failed
    with "expected m1 and m2 to have the same dtype". GPyTorch's kernels promote inputs to their own dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, dtype=torch.float64, generator=gen)
    y, xs = torch.sin(x.sum(-1)), torch.randn(4, 2, dtype=torch.float64, generator=gen)
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(features)
    net = ntkgp.mlp(2, "relu", 1.5, 0.1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = _DeepKernelGP(x, y, likelihood, kernel_class(net).double(), extractor)
    with torch.no_grad():
        z = extractor(x.to(features)).double()
        kernel = model.covar_module(extractor(x.to(features))).to_dense()
        rbf = gpytorch.kernels.RBFKernel().double()(extractor(x.to(features))).to_dense()
    assert kernel.dtype == rbf.dtype == torch.float64
    torch.testing.assert_close(kernel, getattr(net.kernel(z), kernel_class.kind), rtol=1e-15, atol=0)

    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        assert loss.dtype == torch.float64
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()

    model.eval()
    with torch.no_grad():
        mean = model(xs).mean
        # as GPyTorch computes them: the training kernel from the training features alone, the cross
        # kernel from the features of the training and test inputs concatenated (float32 features of
        # 24 rows differ from those of 20 and 4 by an ulp, 3e-8 of the mean)
        z, joint = extractor(x.to(features)).double(), extractor(torch.cat([x, xs]).to(features)).double()
        train = getattr(net.kernel(z), kernel_class.kind) + likelihood.noise * torch.eye(20, dtype=torch.float64)
        want = getattr(net.kernel(joint[20:], joint[:20]), kernel_class.kind) @ torch.linalg.solve(train, y)
    assert mean.dtype == torch.float64
    torch.testing.assert_close(mean, want, rtol=1e-8, atol=1e-10)


def test_last_dim_is_batch_keeps_hyperparameter_batches_on_the_batch_axes():
    """Features become a batch axis placed after the hyperparameters' batch_shape (GPyTorch's
    (*batch, d, n, n)); they used to be aligned with the hyperparameter batch instead."""
    make = lambda w: ntkgp.serial(ntkgp.Dense(8, w, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))  # noqa: E731
    variances = [0.5, 2.0]
    kernel = ntkgp.NTKKernel(make(1.0), batch_shape=torch.Size([2]))
    kernel.net[0].weight_var = torch.tensor(variances)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    out = kernel(x, last_dim_is_batch=True).to_dense()
    diag = kernel(x, last_dim_is_batch=True, diag=True)
    assert out.shape == (2, 3, 5, 5) and diag.shape == (2, 3, 5)
    for b, w in enumerate(variances):
        for f in range(3):
            torch.testing.assert_close(out[b, f], make(w).kernel(x[:, f:f + 1]).ntk)
    torch.testing.assert_close(diag, out.diagonal(dim1=-2, dim2=-1))


@pytest.mark.filterwarnings("ignore:AdditiveStructureKernel is deprecated")
def test_last_dim_is_batch_refuses_a_per_feature_first_layer_by_name():
    """AdditiveStructureKernel evaluates its base kernel with last_dim_is_batch: an ARD first layer
    got one-feature inputs and failed with 'got inputs with 1 features' for 3-feature inputs."""
    ard = ntkgp.serial(ntkgp.Dense(8, torch.tensor([0.5, 2.0, 8.0]), 0.1, ard_num_dims=3), ntkgp.ReLU(), ntkgp.Dense(1))
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"last_dim_is_batch .* ard_num_dims"):
        ntkgp.NTKKernel(ard)(x, last_dim_is_batch=True).to_dense()
    with pytest.raises(ValueError, match=r"last_dim_is_batch .* ard_num_dims"):
        gpytorch.kernels.AdditiveStructureKernel(ntkgp.NNGPKernel(ard), num_dims=3)(x).to_dense()


_X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
#: What GPyTorch's Kernel.__call__ met before the network kernel's checks, and what it raised.
CALL_INPUTS = {
    "numpy": ((_X.numpy(),), {}, r"^x1 must be a torch\.Tensor .*got ndarray"),   # 'ndarray' has no 'ndimension'
    "list": ((_X, _X.tolist()), {}, r"^x2 must be a torch\.Tensor .*got list"),
    "0-d": ((torch.tensor(1.0),), {}, r"^x1 must be a torch\.Tensor .*got shape \(\)"),   # "Dimension out of range"
    # "x1_ and x2_ must have the same number of dimensions!"
    "features": ((_X, _X[:, :2]), {}, r"^x1 and x2 must have the same number of features, got 3 and 2\.$"),
    "one feature": ((_X[:, 0], _X), {}, r"^x1 and x2 must have the same number of features, got 1 and 3\.$"),
    # "INDICES element is out of DATA bounds, id=3 axis_dim=3"
    "active_dims": ((_X,), {"active_dims": [0, 3]}, r"^active_dims selects feature 3, but x1 has 3 feature\(s\)"),
}


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
@pytest.mark.parametrize("case", CALL_INPUTS)
def test_inputs_gpytorch_reads_before_the_kernel_are_refused_by_name(kernel_class, case):
    args, kwargs, message = CALL_INPUTS[case]
    kernel = kernel_class(ntkgp.mlp(1, "erf"), **kwargs)
    with pytest.raises(ValueError, match=message):
        kernel(*args).to_dense()


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
def test_active_dims_select_features_and_one_dimensional_inputs_are_one_feature(kernel_class):
    """The checks leave GPyTorch's readings alone: active_dims picks columns (integral floats too),
    its largest index may be the last feature, and (n,) inputs are n points of one feature."""
    net = ntkgp.mlp(1, "erf")
    with torch.no_grad():
        expected = kernel_class(net)(_X[:, [0, 2]], _X[:4, [0, 2]]).to_dense()
        for dims in ([0, 2], (0.0, 2.0), torch.tensor([0, 2]), np.array([0, 2])):
            got = kernel_class(deepcopy(net), active_dims=dims)(_X, _X[:4]).to_dense()
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(kernel_class(net)(_X[:, 0], _X[:4, 0]).to_dense(),
                                   kernel_class(net)(_X[:, :1], _X[:4, :1]).to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
def test_one_dimensional_inputs_are_one_feature_with_active_dims_too(kernel_class):
    """GPyTorch selects active_dims before it reads (n,) as n points of one feature, so it selected
    points: active_dims=[0] on 6 and 4 points gave the (1, 1) kernel of the first two (GPyTorch's
    RBFKernel does the same), and active_dims=[1] the kernel of the second points, silently."""
    net = ntkgp.mlp(1, "erf")
    with torch.no_grad():
        x, z = _X[:, 0], _X[:4, 0]
        kernel = kernel_class(deepcopy(net), active_dims=[0])
        torch.testing.assert_close(kernel(x, z).to_dense(), kernel_class(net)(x, z).to_dense(), rtol=0, atol=0)
        torch.testing.assert_close(kernel(x).to_dense(), kernel_class(net)(x).to_dense(), rtol=0, atol=0)
        torch.testing.assert_close(kernel(x, diag=True), kernel_class(net)(x, diag=True), rtol=0, atol=0)
        with pytest.raises(ValueError, match="active_dims selects feature 1, but x1 has 1 feature"):
            kernel_class(deepcopy(net), active_dims=[1])(x, z)


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
def test_active_dims_are_the_kernels_own_copy_and_may_be_one_index(kernel_class):
    """A numpy array of active_dims is copied, as GPyTorch's ``torch.tensor(active_dims)`` did: the
    check's ``as_tensor`` shared its memory, so ``dims[1] = 1`` afterwards moved the kernel to feature 1
    (after the check had passed). And one index alone (``active_dims=2``, 0-d), which GPyTorch's
    ``index_select`` takes as one feature, stays accepted: the check refused it as not 1-D."""
    net = ntkgp.mlp(1, "erf")
    with torch.no_grad():
        expected = kernel_class(net)(_X[:, [0, 2]], _X[:4, [0, 2]]).to_dense()
        dims = np.array([0, 2])
        kernel = kernel_class(deepcopy(net), active_dims=dims)
        dims[1] = 1
        torch.testing.assert_close(kernel(_X, _X[:4]).to_dense(), expected, rtol=0, atol=0)
        one = kernel_class(net)(_X[:, [2]], _X[:4, [2]]).to_dense()
        for index in (2, np.int64(2), torch.tensor(2)):
            got = kernel_class(deepcopy(net), active_dims=index)(_X, _X[:4]).to_dense()
            torch.testing.assert_close(got, one, rtol=0, atol=0)


@pytest.mark.parametrize("active_dims", [[0.5], [-1], [True, False], [], [[0, 1]], ["a"], [1j], [float("inf")],
                                         torch.zeros(2, dtype=torch.long, device="meta")])
def test_active_dims_that_are_not_feature_indices_are_refused_by_name(active_dims):
    """GPyTorch casts active_dims to long: [0.5] selected feature 0 and [True, False] features 1 and 0,
    silently; a negative index failed at the first call ("INDICES element is out of DATA bounds")."""
    with pytest.raises(ValueError, match=r"^active_dims (must be a sequence of feature indices|is on the meta "
                                         r"device, which holds shapes but no values)"):
        ntkgp.NNGPKernel(ntkgp.mlp(1), active_dims=active_dims)


def test_empty_inputs_give_empty_kernels():
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    with torch.no_grad():
        assert net.kernel(torch.zeros(0, 3)).nngp.shape == (0, 0)
        assert net.kernel(torch.zeros(0, 3), torch.ones(4, 3)).ntk.shape == (0, 4)
    assert ntkgp.NNGPKernel(net)(torch.ones(2, 3), torch.zeros(0, 3)).to_dense().shape == (2, 0)


def test_dense_repr_shows_the_weight_variance():
    # printing a spec showed bias_var but not weight_var, so Dense(512, weight_var=2.25) read as the default 1
    dense = ntkgp.Dense(512, weight_var=2.25, bias_var=0.01)
    assert "weight_var=2.25, bias_var=0.01" in repr(dense)
    assert "weight_var=1, bias_var=None" in repr(ntkgp.Dense(4))
    ard = ntkgp.Dense(8, weight_var=torch.tensor([1.0, 2.0, 3.0]), ard_num_dims=3)
    assert "weight_var=<shape (3,)>" in repr(ard)
    assert "weight_var=2.25" in repr(ntkgp.serial(dense, ntkgp.ReLU(), ntkgp.Dense(1)))


@pytest.mark.parametrize("join", ["sum", "concat", "prod"])
def test_parallel_repr_shows_its_join(join):
    # the three joins printed alike, so a concatenation in a printed spec read as a residual sum
    net = ntkgp.parallel(ntkgp.Dense(4), ntkgp.Dense(4), join=join)
    assert f"join={join!r}" in repr(net)
    assert f"join={join!r}" in repr(ntkgp.serial(ntkgp.Dense(4), net))


@pytest.mark.parametrize("width", [2**64, 2**70])
def test_standard_ntk_takes_widths_past_torchs_integers(width):
    # the standard NTK's n·K of a hidden width n ≥ 2⁶⁴ failed with OverflowError "int too big to convert"
    def ntk(n):
        net = ntkgp.serial(ntkgp.Dense(n, 2.0, 0.1, "standard"), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1, "standard"))
        with torch.no_grad():
            return net.kernel(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).ntk

    torch.testing.assert_close(ntk(width) / float(width), ntk(2**60) / 2.0**60, rtol=1e-15, atol=0)


def test_pyro_load_from_samples_makes_the_variances_a_batch_of_samples():
    """GPyTorch's fully Bayesian workflow loads S samples per prior with ``pyro_load_from_samples``
    (no pyro needed), turning each parameter into a batch of S; the variances' setting closure
    refused that ("weight_var must broadcast to shape (), got shape (4,)")."""
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.rand(10, 2, generator=g, dtype=dt), torch.rand(5, 2, generator=g, dtype=dt)
    y = torch.sin(5 * x.sum(-1))

    def make():   # one prior object per variance: GPyTorch loads each prior object once
        gamma = lambda: gpytorch.priors.GammaPrior(2.0, 1.0)  # noqa: E731
        return ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1, weight_var_prior=gamma(), bias_var_prior=gamma(), ard_num_dims=2),
                            ntkgp.ReLU(), ntkgp.Dense(1, 1.5, 0.2, weight_var_prior=gamma()))

    likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_prior=gpytorch.priors.GammaPrior(2.0, 10.0))
    model = _GP(x, y, likelihood, ntkgp.NNGPKernel(make())).double()
    s = 4
    samples = {name: prior.sample(torch.Size([s]) + closure(module).shape).double()
               for name, module, prior, closure, _ in model.named_priors()}
    model.pyro_load_from_samples(samples)
    assert tuple(model.covar_module.net[0].weight_var.shape) == (s, 2)
    model.eval()
    mean = model(x_test.expand(s, 5, 2)).mean
    key = "covar_module.net.layers.{}.{}_prior".format
    for i in range(s):
        net = make()
        net[0].weight_var, net[0].bias_var = samples[key(0, "weight_var")][i], samples[key(0, "bias_var")][i]
        net[2].weight_var = samples[key(2, "weight_var")][i]
        noise = samples["likelihood.noise_covar.noise_prior"][i]
        with torch.no_grad():
            k = net.kernel(x).nngp + noise * torch.eye(10, dtype=dt)
            expected = net.kernel(x_test, x).nngp @ torch.linalg.solve(k, y)
        torch.testing.assert_close(mean[i], expected, rtol=1e-10, atol=1e-12)   # two float64 solves
    with pytest.raises(ValueError, match="must broadcast"):   # outside of sample loading, shapes stay checked
        net[0].weight_var = torch.ones(3, 2)


@pytest.fixture
def pyro_sites(monkeypatch) -> dict[str, torch.Tensor]:
    """The sites ``pyro_sample_from_prior`` samples, by name: pyro only supplies ``pyro.sample`` there, so a
    stand-in draws each from its prior, as a leaf whose gradient the tests follow."""
    import sys
    import types

    sites: dict[str, torch.Tensor] = {}

    def sample(name, distribution, obs=None):
        sites[name] = distribution.sample().requires_grad_()
        return sites[name]

    monkeypatch.setitem(sys.modules, "pyro", types.SimpleNamespace(sample=sample))
    return sites


def test_pyro_sample_from_prior_keeps_the_graph_of_the_sampled_variances(pyro_sites):
    """GPyTorch's fully Bayesian workflow (NUTS on ``model.pyro_sample_from_prior()``) follows the
    log density's gradient with respect to each sampled value. GPyTorch left the layers, held in a
    ``ModuleList``, out of its random copy, and their setting closure installed the samples
    detached: the gradient was ``None`` for every variance (an ``RBFKernel``'s lengthscale has
    one). pyro only supplies ``pyro.sample`` here, so a stand-in draws from the prior."""
    dt = torch.float64
    sites = pyro_sites
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, generator=g, dtype=dt), torch.randn(12, generator=g, dtype=dt)
    gamma = gpytorch.priors.GammaPrior

    def make():
        return ntkgp.serial(ntkgp.Dense(16, 1.5, 0.1, weight_var_prior=gamma(3.0, 2.0), bias_var_prior=gamma(2.0, 10.0),
                                        ard_num_dims=2),
                            ntkgp.Erf(), ntkgp.Dense(1, 2.0, 0.05, weight_var_prior=gamma(3.0, 2.0)))

    kernel = ntkgp.NTKKernel(make()).double()
    torch.manual_seed(0)
    random_kernel = kernel.pyro_sample_from_prior()
    names = ["net.layers.0.weight_var_prior", "net.layers.0.bias_var_prior", "net.layers.2.weight_var_prior"]
    assert sorted(sites) == sorted(names) and sites[names[0]].shape == (2,)
    noise = 0.1

    def log_density(covariance):   # the zero-mean GP's log density of y, by its Cholesky factor
        chol = torch.linalg.cholesky(covariance + noise * torch.eye(12, dtype=dt))
        alpha = torch.cholesky_solve(y[:, None], chol)
        return -0.5 * (y @ alpha[:, 0]) - chol.diagonal().log().sum() - 6 * np.log(2 * np.pi)

    value = log_density(random_kernel(x).to_dense())
    grads = torch.autograd.grad(value, [sites[n] for n in names])

    def reference(values):   # the same density from net.kernel of a network holding these variances
        net = make()
        net[0].weight_var, net[0].bias_var, net[2].weight_var = values
        with torch.no_grad():
            return log_density(net.kernel(x).ntk)

    values = [sites[n].detach() for n in names]
    assert float(value.detach()) == pytest.approx(float(reference(values)), rel=1e-13)   # the samples are the kernel's
    for i, grad in enumerate(grads):
        for j in range(grad.numel()):   # central differences, step 1e-5 relative: error ~1e-10 relative
            step = 1e-5 * values[i].reshape(-1)[j]
            shifted = [[v.clone() for v in values] for _ in range(2)]
            shifted[0][i].reshape(-1)[j] += step
            shifted[1][i].reshape(-1)[j] -= step
            numeric = (reference(shifted[0]) - reference(shifted[1])) / (2 * step)
            assert float(grad.reshape(-1)[j]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)
    assert kernel.net[2].weight_var.item() == 2.0   # the random copy's samples leave the kernel as it was


def test_a_prior_registered_by_a_variances_name_pickles_and_keeps_the_graph_of_its_samples(pyro_sites):
    """``layer.register_prior("weight_var_prior", prior, "weight_var")`` (docs/api/kernels.md) took GPyTorch's
    closures, local functions: the kernel no longer pickled ("Can't pickle local object"), and the variance
    sampled by ``pyro_sample_from_prior`` was installed detached (its gradient ``None``). It now acts as
    ``Dense(weight_var_prior=...)``, whose gradient the test above checks by finite differences."""
    dt = torch.float64
    sites = pyro_sites
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=dt)
    gamma = gpytorch.priors.GammaPrior
    by_hand = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(1, 2.0, 0.05))
    by_hand[0].register_prior("weight_var_prior", gamma(3.0, 2.0), "weight_var")
    by_hand[2].register_prior("raw_bias_var_prior", gpytorch.priors.NormalPrior(0.0, 1.0), "raw_bias_var")
    given = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1, weight_var_prior=gamma(3.0, 2.0)), ntkgp.Erf(),
                         ntkgp.Dense(1, 2.0, 0.05))
    kernel = ntkgp.NTKKernel(by_hand).double()
    copied = pickle.loads(pickle.dumps(kernel))
    assert [name for name, *_ in copied.named_priors()] == ["net.layers.0.weight_var_prior",
                                                           "net.layers.2.raw_bias_var_prior"]
    torch.manual_seed(1)
    expected = [copied.net[0].weight_var_prior.sample(), copied.net[2].raw_bias_var_prior.sample()]
    torch.manual_seed(1)
    copied.net[0].sample_from_prior("weight_var_prior")   # the setting closures work after the round trip
    copied.net[2].sample_from_prior("raw_bias_var_prior")
    # the float64 sample as anchor · exp(log(sample) − log(anchor)): a few ulp
    assert float(copied.net[0].weight_var) == pytest.approx(float(expected[0]), rel=1e-15)
    assert torch.equal(copied.net[2].raw_bias_var.detach(), expected[1])
    gradients = []
    for spec in (by_hand, given):
        torch.manual_seed(0)
        random_kernel = ntkgp.NTKKernel(spec).double().pyro_sample_from_prior()
        value = random_kernel(x).to_dense().sum()
        gradients.append(torch.autograd.grad(value, sites["net.layers.0.weight_var_prior"], allow_unused=True)[0])
    assert gradients[0] is not None and torch.equal(gradients[0], gradients[1])   # one computation
    assert float(gradients[1]) != 0.0


def test_a_prior_by_name_on_a_variance_the_layer_lacks_is_refused():
    """``register_prior("bias_var_prior", prior, "bias_var")`` on ``Dense(..., bias_var=None)`` (whose ``bias_var``
    is ``None``) was taken, as ``Dense(bias_var_prior=...)`` is not: BoTorch's ``sample_all_priors`` then failed with
    "'NoneType' object has no attribute 'shape'" and the marginal likelihood with "must be real number, not
    NoneType". A name the layer lacks altogether stays GPyTorch's "Unknown parameter"."""
    gamma = gpytorch.priors.GammaPrior
    layer = ntkgp.Dense(1, 2.0)
    with pytest.raises(ValueError, match="Dense has no bias_var"):
        layer.register_prior("bias_var_prior", gamma(2.0, 1.0), "bias_var")
    assert not list(layer.named_priors())
    with pytest.raises(AttributeError, match="Unknown parameter raw_bias_var"):
        layer.register_prior("raw_bias_var_prior", gamma(2.0, 1.0), "raw_bias_var")
    with_bias = ntkgp.Dense(1, 2.0, 0.5)
    with_bias.register_prior("bias_var_prior", gamma(2.0, 1.0), "bias_var")
    assert [name for name, *_ in with_bias.named_priors()] == ["bias_var_prior"]


def test_a_prior_with_a_batch_of_one_samples_a_scalar_variance():
    """BoTorch's ``sample_all_priors`` draws ``(1,)`` from a univariate prior given with a batch of one
    (``GammaPrior(torch.tensor([2.0]), torch.tensor([1.0]))``); GPyTorch's own parameters take it (a
    ``ScaleKernel``'s ``outputscale``), the variances refused it ("weight_var must broadcast to shape ()").
    ``pyro_load_from_samples`` of one sample still makes a batch of one."""
    from botorch.optim.utils import sample_all_priors

    one = torch.tensor([1.0], dtype=torch.float64)
    layer = ntkgp.Dense(1, 1.5, 0.2, weight_var_prior=gpytorch.priors.GammaPrior(2.0 * one, one)).double()
    torch.manual_seed(0)
    expected = layer.weight_var_prior.sample()
    torch.manual_seed(0)
    sample_all_priors(layer)
    assert layer.weight_var.shape == () and expected.shape == (1,)
    # anchor · exp(log(sample) − log(anchor)) in float64: a few ulp
    assert float(layer.weight_var) == pytest.approx(float(expected), rel=1e-15)
    layer.pyro_load_from_samples({"weight_var_prior": 3.0 * one})
    assert layer.weight_var.shape == (1,) and float(layer.weight_var) == 3.0


def _torch_refuses_a_batch_for_a_scalar() -> bool:
    """Whether a strict load of a 1-D state into a 0-D parameter fails: torch 2.1 reads it as its first
    entry (a rule kept from torch 0.3's checkpoints, later narrowed to one-entry states)."""
    plain = torch.nn.Module()
    plain.p = torch.nn.Parameter(torch.zeros(()))
    try:
        plain.load_state_dict({"p": torch.zeros(4)})
    except RuntimeError:
        return True
    return False


def test_models_of_loaded_samples_reload_with_load_strict_shapes_false():
    """GPyTorch reloads a model of S loaded samples into a fresh one with load_strict_shapes(False),
    which lets parameters take their saved shapes; the variances' float64 anchors live in their
    constraints, plain torch modules, and kept their old shape ("size mismatch for
    ...raw_weight_var_constraint.anchor: torch.Size([4]) ... torch.Size([])")."""
    dt = torch.float64
    g = torch.Generator().manual_seed(1)
    x, x_test = torch.rand(10, 2, generator=g, dtype=dt), torch.rand(4, 5, 2, generator=g, dtype=dt)
    y = torch.sin(5 * x.sum(-1))

    def make():
        gamma = lambda: gpytorch.priors.GammaPrior(2.0, 1.0)  # noqa: E731
        net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1, weight_var_prior=gamma(), bias_var_prior=gamma()), ntkgp.ReLU(),
                           ntkgp.Dense(1, 1.5, 0.2, weight_var_prior=gamma()))
        return _GP(x, y, gpytorch.likelihoods.GaussianLikelihood(), ntkgp.NTKKernel(net)).double()

    model = make()
    samples = {name: prior.sample(torch.Size([4]) + closure(module).shape).double()
               for name, module, prior, closure, _ in model.named_priors()}
    model.pyro_load_from_samples(samples)
    model.eval()
    expected = model(x_test).mean
    state = model.state_dict()
    if _torch_refuses_a_batch_for_a_scalar():   # strict shapes by default, as GPyTorch's
        with pytest.raises(RuntimeError, match="size mismatch"):
            make().load_state_dict(state)
    fresh = make()
    fresh.load_strict_shapes(False)
    fresh.load_state_dict(state)
    # pyro_load_from_samples also prepends S to the kernel's batch_shape, which no state dict holds:
    # GPyTorch's own kernels (RBFKernel alike) need it set again after reloading
    fresh.covar_module.batch_shape = model.covar_module.batch_shape
    fresh.eval()
    assert torch.equal(fresh.covar_module.net[0].weight_var, model.covar_module.net[0].weight_var)
    torch.testing.assert_close(fresh(x_test).mean, expected, rtol=1e-12, atol=1e-12)   # same float64 solve


def test_a_strict_load_without_the_anchors_fails():
    """Each variance is anchor · exp(raw). GPyTorch's constraints load non-strictly, so a strict
    load of a state dict without the anchors reported success and kept the stale anchors: a kernel
    whose weight_var was 5 loaded into one at 2 stayed at 2 (kernel values 7.7 apart)."""
    source, target = ntkgp.NTKKernel(ntkgp.mlp(1, "relu", 2.0, 0.1)), ntkgp.NTKKernel(ntkgp.mlp(1, "relu", 2.0, 0.1))
    source.net[0].weight_var = 5.0
    state = source.state_dict()
    without = {name: value for name, value in state.items() if not name.endswith("anchor")}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*raw_weight_var_constraint\.anchor"):
        target.load_state_dict(without)
    assert target.load_state_dict(without, strict=False).missing_keys   # said, not silent
    target.load_state_dict(state)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(target.double()(x).to_dense(), source.double()(x).to_dense())


def test_a_network_without_variances_still_has_the_kernels_batch_shape():
    """The variances carry batch_shape into the kernel: with none (Identity) the output was (n, n),
    which GPyTorch took for a bug of its own ("expected shape [2, 5, 5], but got [5, 5]")."""
    kernel = ntkgp.NNGPKernel(ntkgp.serial(ntkgp.Identity()), batch_shape=torch.Size([2]))
    linear = gpytorch.kernels.LinearKernel(batch_shape=torch.Size([2]))
    linear.variance = 1.0
    x = torch.randn(5, 3)
    torch.testing.assert_close(kernel(x).to_dense(), linear(x).to_dense() / 3)   # x xᵀ / d
    assert kernel(x, diag=True).shape == (2, 5)
    assert kernel(torch.randn(3, 1, 5, 3)).to_dense().shape == (3, 2, 5, 5)
    assert kernel(x, last_dim_is_batch=True).to_dense().shape == (2, 3, 5, 5)


def test_kernels_that_share_a_network_share_its_batch_shape():
    """batch_shape expands the network's variances in place: a second kernel with another batch
    shape broke the first (GPyTorch: "expected shape [4, 4], got [3, 4, 4]"); now it is refused."""
    net = ntkgp.mlp(1, "relu", 2.0, 0.1)
    plain = ntkgp.NTKKernel(net)
    x = torch.randn(4, 2)
    for other in (torch.Size([3]), torch.Size([2, 1])):
        with pytest.raises(ValueError, match=r"already serves batch shape \(\).*build on a copy"):
            ntkgp.NTKKernel(net, batch_shape=other)
    assert plain(x).to_dense().shape == (4, 4) and plain(x, diag=True).shape == (4,)
    twin = ntkgp.NNGPKernel(net)                                        # the same (empty) batch shape: shared
    assert {id(p) for p in twin.parameters()} == {id(p) for p in plain.parameters()}

    shared = ntkgp.mlp(1, "relu", 2.0, 0.1)
    first = ntkgp.NTKKernel(shared, batch_shape=torch.Size([3]))
    second = ntkgp.NNGPKernel(shared, batch_shape=torch.Size([3]))      # the same batch shape: shared
    assert first(x).to_dense().shape == second(x).to_dense().shape == (3, 4, 4)
    for other in (torch.Size([]), torch.Size([2])):
        with pytest.raises(ValueError, match=r"already serves batch shape \(3,\)"):
            ntkgp.NTKKernel(shared, batch_shape=other)
    expanded = ntkgp.mlp(1, "relu", 2.0, 0.1)
    expanded.expand_batch(torch.Size([2]))                              # by hand, no kernel yet
    with pytest.raises(ValueError, match=r"already serves batch shape \(2,\)"):
        ntkgp.NTKKernel(expanded)
    assert ntkgp.NTKKernel(expanded, batch_shape=torch.Size([2]))(x).to_dense().shape == (2, 4, 4)

    copied = ntkgp.NTKKernel(deepcopy(net), batch_shape=torch.Size([2]))
    assert copied(x).to_dense().shape == (2, 4, 4) and plain(x).to_dense().shape == (4, 4)
    # kernels derived by GPyTorch's batch operations own copies of the network with their shapes
    wide, single = first.expand_batch(2, 3), first[1]
    assert wide(x).to_dense().shape == (2, 3, 4, 4) and single(x).to_dense().shape == (4, 4)
    assert ntkgp.NNGPKernel(single.net)(x).to_dense().shape == (4, 4)
    assert ntkgp.NNGPKernel(wide.net, batch_shape=torch.Size([2, 3]))(x).to_dense().shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"already serves batch shape \(\)"):
        ntkgp.NNGPKernel(single.net, batch_shape=torch.Size([5]))
    # copies of a kernel (GPyTorch's get_fantasy_model and BoTorch's fantasize deep-copy whole models)
    # own their copied networks as well
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    for duplicate in (deepcopy(plain), pickle.loads(pickle.dumps(plain)), torch.load(buffer, weights_only=False)):
        with pytest.raises(ValueError, match=r"already serves batch shape \(\)"):
            ntkgp.NNGPKernel(duplicate.net, batch_shape=torch.Size([3]))
        assert duplicate(x).to_dense().shape == (4, 4)


def test_kernels_that_share_layers_share_their_batch_shape():
    """A slice net[:2], or a network spliced into a bigger one, shares the layers, whose variances
    batch_shape expands in place: NTKKernel(net) silently became a batch of 3 ((3, 4, 4), batch_shape
    (3,)) once NNGPKernel(net[:2], batch_shape=[3]) was built, and a kernel of a network's first layers
    became a batch when a kernel of the whole was; now both are refused, as for a shared network."""
    x = torch.randn(4, 2, dtype=torch.float64)
    net = ntkgp.mlp(1, "relu", 2.0, 0.1)
    whole = ntkgp.NTKKernel(net)
    expected = whole(x).to_dense()
    for spec in (net[:2], net[:1]):
        with pytest.raises(ValueError, match=r"already serves batch shape \(\).*net\[:2\].*build on a copy"):
            ntkgp.NNGPKernel(spec, batch_shape=torch.Size([3]))
    assert whole.batch_shape == torch.Size([]) and torch.equal(whole(x).to_dense(), expected)
    # the same batch shape shares the layers, and a copy takes another one
    first = ntkgp.NNGPKernel(net[:2])
    assert torch.equal(first(x).to_dense(), net[:2].kernel(x, ntk=False).nngp)
    assert ntkgp.NNGPKernel(deepcopy(net[:2]), batch_shape=torch.Size([3]))(x).to_dense().shape == (3, 4, 4)
    # the other order: the kernel of the first layers, then one of a network that takes them in
    body = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.ReLU())
    features = ntkgp.NNGPKernel(body)
    with pytest.raises(ValueError, match=r"already serves batch shape \(\)"):
        ntkgp.NTKKernel(ntkgp.serial(body, ntkgp.Dense(1, 1.0, 0.1)), batch_shape=torch.Size([2]))
    assert features.batch_shape == torch.Size([]) and features(x).to_dense().shape == (4, 4)
    # copies of a kernel own their copied layers as well
    duplicate = deepcopy(whole)
    with pytest.raises(ValueError, match=r"already serves batch shape \(\)"):
        ntkgp.NNGPKernel(duplicate.net[:2], batch_shape=torch.Size([3]))
    # a layer without variances (one ReLU in two networks) is shared harmlessly
    relu = ntkgp.ReLU()
    plain = ntkgp.NTKKernel(ntkgp.serial(ntkgp.Dense(8, 1.0, 0.1), relu, ntkgp.Dense(1, 1.0, 0.1)))
    batched = ntkgp.NTKKernel(ntkgp.serial(ntkgp.Dense(8, 1.0, 0.1), relu, ntkgp.Dense(1, 1.0, 0.1)),
                              batch_shape=torch.Size([2]))
    assert plain(x).to_dense().shape == (4, 4) and batched(x).to_dense().shape == (2, 4, 4)


def test_kernels_dropped_but_not_yet_collected_do_not_hold_their_layers():
    """A GPyTorch kernel is in a reference cycle (its load_state_dict hook is a method bound to it),
    so a kernel or model that its user dropped stays registered until the cycle collector runs. Once
    kernels were registered on every layer, a batched kernel of a slice of the network of a dropped
    model (or of a deep copy used in passing) was refused ("already serves batch shape ()"), though
    nothing live used those layers. Refusal waits for a collection; live kernels still refuse."""
    x = torch.randn(6, 2, dtype=torch.float64)
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    gc.collect()
    gc.disable()   # the automatic collector could otherwise free the dropped model before the check
    try:
        model = ntkgp.models.NetworkGP(x, torch.randn(6, dtype=torch.float64), net)
        dropped = weakref.ref(model.covar_module)
        del model
        assert dropped() is not None   # the cycle keeps it until a collection
        sliced = ntkgp.NNGPKernel(net[:2], batch_shape=torch.Size([3]))
    finally:
        gc.enable()
    assert sliced(x).to_dense().shape == (3, 6, 6)
    with pytest.raises(ValueError, match=r"already serves batch shape \(3,\)"):   # sliced is live
        ntkgp.NTKKernel(net)


def test_building_a_kernel_reads_each_live_kernel_batch_shape_once(monkeypatch):
    """Kernels are registered on every layer that holds variances, and the check of a new kernel read
    the batch shape of each live kernel once per shared layer (each read walks the network): 50 reads
    for 10 kernels of a 4-layer network; 6-9 ms a kernel beside 20 live ones on an 11-layer mlp(10),
    against 0.6 ms when only the network was registered (0.8 ms now). Each live kernel is read once."""
    from ntkgp.kernels.network_kernel import NetworkKernel

    net = ntkgp.mlp(3, "relu", 2.0, 0.1)   # 4 Dense layers with variances, and the network
    live = [ntkgp.NNGPKernel(net) for _ in range(10)]
    reads: list[int] = []
    shape = NetworkKernel.batch_shape

    def counted(kernel: NetworkKernel) -> torch.Size:
        reads.append(id(kernel))
        return shape.fget(kernel)

    monkeypatch.setattr(NetworkKernel, "batch_shape", property(counted, shape.fset))
    ntkgp.NTKKernel(net)
    assert sorted(reads) == sorted(map(id, live))


def test_neural_tangents_style_arguments_are_refused_with_the_translation():
    """kernel_fn(x1, x2, "nngp") ported as net.kernel(x1, x2, "nngp") put the string where diag is:
    true, so the call silently returned the (n,) diagonal; stax.Dense(512, W_std=1.5) met Python's
    bare "unexpected keyword argument"."""
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    x = torch.randn(4, 2, dtype=torch.float64)
    for get in ("nngp", ("nngp", "ntk")):
        with pytest.raises(ValueError, match=r"diag must be True or False.*get argument has no counterpart.*\.nngp"):
            net.kernel(x, x, get)
    with pytest.raises(ValueError, match=r"ntk must be True or False, got 'nngp'"):
        net.kernel(x, ntk="nngp")
    assert net.kernel(x, x, True).nngp.shape == (4,)
    assert net.kernel(x, diag=np.True_).nngp.shape == net.kernel(x, diag=torch.tensor(True)).nngp.shape == (4,)
    assert net.kernel(x, diag=torch.tensor([True])).nngp.shape == (4,)
    with pytest.raises(TypeError, match=r"\['W_std', 'b_std'\].*weight_var=1\.5\*\*2, bias_var=0\.05\*\*2"):
        ntkgp.Dense(512, W_std=1.5, b_std=0.05)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['weight_vr'\]\.$"):
        ntkgp.Dense(512, weight_vr=2.0)


@pytest.mark.parametrize("flag", [torch.tensor([True, False]), np.array([True, True]), torch.ones(0, dtype=torch.bool)])
@pytest.mark.parametrize("name", ["diag", "ntk"])
def test_kernel_flags_refuse_arrays_of_booleans(flag, name):
    # torch's "Boolean value of Tensor with more than one value is ambiguous" (and numpy's) from inside
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        net.kernel(torch.randn(4, 2, dtype=torch.float64), **{name: flag})


@pytest.mark.parametrize("join", ["sum", "concat", "prod"])
def test_parallel_join_passed_as_a_branch_names_the_keyword(join):
    # parallel(f, g, "concat") was "parallel() takes ntkgp layers, got str."
    with pytest.raises(ValueError, match=f"pass the join by keyword, join='{join}'"):
        ntkgp.parallel(ntkgp.Dense(4), ntkgp.Dense(4), join)


def test_neural_tangents_keywords_name_their_ntkgp_counterparts():
    """Review (a port from neural-tangents): get=, diag_reg=, alpha=, approximate= and s= met Python's
    bare "unexpected keyword argument" (GELU's naming torch.nn.Module), GradientFlow(kernel="ntkgp")
    did not point to GPPosterior, and gradient_descent_mse(k, y, 0.5), neural-tangents' learning rate
    third, read 0.5 as the initial outputs and returned the converged fit, y, without a word."""
    net = ntkgp.mlp(1, "erf", 2.0, 0.1)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    kernel_hint = r"pass kernel='ntk' or kernel='nngp' \(neural-tangents' get"
    for call, message in [
        (lambda: net.kernel(x, x, get="ntk"), r"^Layer\.kernel got an unexpected keyword argument 'get': .*\.nngp"),
        (lambda: predict.gradient_flow(net, x, y, x, t=1.0, get="ntk"), "^gradient_flow got .*'get': " + kernel_hint),
        (lambda: predict.GradientFlow(net, x, y, get="nngp"), "^GradientFlow got .*'get': " + kernel_hint),
        (lambda: predict.GradientFlow(net, x, y).predict(x, t=1.0, get="ntk"),
         r"^GradientFlow\.predict got .*'get': the kernel is chosen when the GradientFlow is built"),
        (lambda: predict.gp_posterior(net, x, y, x, diag_reg=1e-3),
         r"^gp_posterior got .*'diag_reg': noise is an absolute variance: .* diag_reg \* trace\(K_train\) / N"),
        (lambda: predict.GPPosterior(net, x, y, get="nngp"), r"^GPPosterior got .*'get': pass kernel='nngp', 'ntkgp'"),
        # neural-tangents' gp_inference(...) takes get where predict is called: a bare TypeError here
        (lambda: predict.GPPosterior(net, x, y).predict(x, get="nngp"),
         r"^GPPosterior\.predict got .*'get': the kernel is chosen when the GPPosterior is built"),
        (lambda: ntkgp.LeakyReLU(alpha=0.1), r"^LeakyReLU got .*'alpha': pass negative_slope=alpha"),
        (lambda: ntkgp.GELU(approximate=True), r"^GELU got .*'approximate': ntkgp\.GELU is the exact GELU"),
        (lambda: ntkgp.Dense(3, s=(1, 2)), r"^Dense got .*'s': neural-tangents' width factors .* no counterpart"),
        (lambda: predict.gradient_descent_mse(torch.eye(4, dtype=torch.float64), y, 0.5),
         r"takes 2 positional arguments but 3 were given"),
    ]:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match=r"got 'ntkgp'\. The NTK-GP posterior is GPPosterior\(.*kernel='ntkgp'\)"):
        predict.GradientFlow(net, x, y, kernel="ntkgp")
    with pytest.raises(ValueError, match=r"got None\. For both kernels .* one GradientFlow per kernel"):
        predict.GradientFlow(net, x, y, kernel=None)
    with pytest.raises(ValueError, match=r"got \['ntk'\]\.$"):
        predict.GradientFlow(net, x, y, kernel=["ntk"])
    # the ntkgp spellings work, and the wrapped signatures are the functions' own
    assert ntkgp.LeakyReLU(negative_slope=0.1).a == 0.1 and isinstance(ntkgp.GELU(), ntkgp.GELU)
    assert list(inspect.signature(ntkgp.Layer.kernel).parameters) == ["self", "x1", "x2", "diag", "ntk", "compile"]
    assert "noise" in inspect.signature(predict.gp_posterior).parameters


def test_batch_shapes_and_indices_of_a_spec_are_checked_and_one_index_is_an_index():
    """expand_batch(3) failed with "'int' object is not iterable", Size([-1]) with "integer
    multiplication overflow", and index_batch(1) with "Value after * must be an iterable"."""
    net = ntkgp.mlp(1, "relu", 2.0, 0.1)
    for bad in (3, torch.Size([-1]), [2, -1], (2.5,)):
        with pytest.raises(ValueError, match="batch_shape"):
            net.expand_batch(bad)
    net.expand_batch([3])
    net[0].weight_var = torch.tensor([1.0, 2.0, 3.0])
    net.index_batch(1)
    assert float(net[0].weight_var.detach()) == 2.0 and net[0].raw_weight_var.shape == ()
    with pytest.raises(ValueError, match=r"weight_var_prior must be a gpytorch\.priors\.Prior"):
        ntkgp.Dense(4, weight_var_prior="gamma")   # torch's "str is not a Module subclass"


def test_a_batch_expansion_that_fails_part_way_leaves_the_network_as_it_was(monkeypatch):
    """An allocation that failed in the second layer left the spec with batch shapes (3,) and ():
    a later plain kernel on it was refused, and net.kernel returned (3, n, n) kernels."""
    from ntkgp.layers.base import variance_batch_shapes
    from ntkgp.layers.variance import VarianceParameters

    net = ntkgp.serial(ntkgp.Dense(8), ntkgp.Erf(), ntkgp.Dense(1))
    mapped = VarianceParameters.mapped_variances
    calls = []

    def fail_on_the_second_layer(self, transform):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory (simulated)")
        return mapped(self, transform)

    monkeypatch.setattr(VarianceParameters, "mapped_variances", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="not enough memory"):
        ntkgp.NNGPKernel(net, batch_shape=torch.Size([3]))
    monkeypatch.undo()
    assert {tuple(s) for s in variance_batch_shapes(net)} == {()}
    assert ntkgp.NNGPKernel(net)(torch.randn(4, 2)).to_dense().shape == (4, 4)


class _VariationalGP(gpytorch.models.ApproximateGP):
    """SVGP (Hensman et al. 2013) with learnable inducing inputs: GPyTorch's pattern, any kernel."""

    def __init__(self, inducing: torch.Tensor, kernel: gpytorch.kernels.Kernel, tasks: int | None = None):
        batch = torch.Size([tasks]) if tasks else torch.Size()
        distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing.size(-2), batch_shape=batch)
        strategy = gpytorch.variational.VariationalStrategy(self, inducing, distribution, learn_inducing_locations=True)
        if tasks:
            strategy = gpytorch.variational.IndependentMultitaskVariationalStrategy(strategy, num_tasks=tasks)
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _fit_variational(model, likelihood, x, y, steps, lr=0.03):
    elbo = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(x))
    optimizer = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=lr)
    model.train(), likelihood.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -elbo(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval(), likelihood.eval()
    return elbo


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_sparse_variational_gp_learns_inducing_points_and_variances(kernel):
    """A drop-in kernel must serve GPyTorch's approximate GPs too, which evaluate it at learnable
    inducing inputs ``Z`` (``K(Z, Z)``, ``K(Z, X)`` and ``diag K(X, X)``) and differentiate the ELBO
    through them. The ELBO's gradient in ``Z`` and in the variances equals central differences
    (float64, to 1e-6 relative), and 30 inducing points fit 200 noisy samples of ``sin(2x₁) cos(x₂)``
    on ``[−2, 2]²`` (noise 0.05): held-out RMSE against the function below half its RMS, 0.38
    (measured after 200 Adam steps: NNGP 0.141, NTK 0.138)."""
    torch.manual_seed(0)
    x = torch.rand(260, 2, dtype=torch.float64) * 4 - 2
    f = torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1])
    y = f + 0.05 * torch.randn(260, dtype=torch.float64)
    make = ntkgp.NNGPKernel if kernel == "nngp" else ntkgp.NTKKernel
    model = _VariationalGP(x[:30].clone(), gpytorch.kernels.ScaleKernel(make(ntkgp.mlp(2, "relu", 2.0, 0.1))))
    model, likelihood = model.double(), gpytorch.likelihoods.GaussianLikelihood().double()
    elbo = _fit_variational(model, likelihood, x[:200], y[:200], steps=200, lr=0.1)
    with torch.no_grad():
        rmse = float((likelihood(model(x[200:])).mean - f[200:]).pow(2).mean().sqrt())
    assert rmse < 0.5 * float(f[200:].pow(2).mean().sqrt()), rmse

    model.train(), likelihood.train()
    inducing = model.variational_strategy.inducing_points
    weight = model.covar_module.base_kernel.net.layers[0].raw_weight_var

    def loss():
        return -elbo(model(x[:200]), y[:200])

    grads = torch.autograd.grad(loss(), [inducing, weight])
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    h = 1e-5
    for param, grad, index in ((inducing, grads[0], (3, 1)), (inducing, grads[0], (17, 0)), (weight, grads[1], ())):
        with torch.no_grad():
            param[index] += h
            up = float(loss())
            param[index] -= 2 * h
            down = float(loss())
            param[index] += h
        assert abs((up - down) / (2 * h) - float(grad[index])) <= 1e-6 * max(1.0, abs(float(grad[index])))


def test_independent_multitask_variational_gp_with_batched_variances_in_float32():
    """Two outputs, each with its own variances (``batch_shape=[2]``) and inducing points, through
    ``IndependentMultitaskVariationalStrategy``, in float32: the variances keep their batch shape,
    predictions have shape ``(n, 2)``, and both outputs fit (RMSE below 0.1 against the noise-free
    functions, noise 0.05; measured 0.052 and 0.028)."""
    torch.manual_seed(0)
    x = torch.rand(260, 2) * 4 - 2
    f = torch.stack([torch.sin(2 * x[:, 0]), torch.cos(x[:, 1])], -1)
    y = f + 0.05 * torch.randn(260, 2)
    batch = torch.Size([2])
    kernel = gpytorch.kernels.ScaleKernel(ntkgp.NTKKernel(ntkgp.mlp(2, "erf", 2.0, 0.1), batch_shape=batch),
                                          batch_shape=batch)
    model = _VariationalGP(torch.stack([x[:20].clone()] * 2), kernel, tasks=2)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2)
    _fit_variational(model, likelihood, x[:200], y[:200], steps=150)
    with torch.no_grad():
        mean = likelihood(model(x[200:])).mean
    assert mean.shape == (60, 2) and mean.dtype == torch.float32
    assert kernel.base_kernel.net.layers[0].weight_var.shape == batch
    rmse = (mean - f[200:]).pow(2).mean(0).sqrt()
    assert bool((rmse < 0.1).all()), rmse


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_an_ard_first_layer_weighs_each_feature_by_its_variance_over_d(parameterization):
    """``Dense(ard_num_dims=d)`` first: ``K¹ = Σ_j σ_j² x_j x'_j / d + σ_b²`` by hand, the NTK its
    ``K¹`` in NTK parameterization and the unweighted ``x·x' + 1`` in the standard one (the
    gradient of ``W̃ x + b̃`` is ``(x, 1)``, whatever variance ``W̃`` was drawn with). Other tests
    fit ARD variances or compare kernels with each other, which a missing ``1/d`` passes."""
    weights = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    layer = ntkgp.Dense(4, weights, 0.1, parameterization=parameterization, ard_num_dims=3)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x2 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    nngp = (x * weights) @ x2.T / 3 + 0.1
    ntk = nngp if parameterization == "ntk" else x @ x2.T + 1.0
    with torch.no_grad():
        torch.testing.assert_close(ntkgp.NNGPKernel(layer)(x, x2).to_dense(), nngp, rtol=1e-14, atol=0)
        torch.testing.assert_close(ntkgp.NTKKernel(layer)(x, x2).to_dense(), ntk, rtol=1e-14, atol=0)
        diag = layer.kernel(x, diag=True)
    torch.testing.assert_close(diag.nngp, ((x * weights) * x).sum(-1) / 3 + 0.1, rtol=1e-14, atol=0)


def test_a_variances_constraint_inverts_its_transform():
    """GPyTorch's constraint contract, ``inverse_transform(transform(raw)) == raw``: with
    ``value = anchor · exp(raw)`` the inverse is ``log(value / anchor)`` (per feature with ARD), and
    a variance pinned at 0 keeps ``raw = 0``. Only the bounds 0 and inf were checked before."""
    layer = ntkgp.Dense(3, torch.tensor([0.5, 2.0]), 0.0, ard_num_dims=2)
    weights = layer.raw_weight_var_constraint
    raw = torch.tensor([0.3, -1.2], dtype=torch.float64)
    value = weights.transform(raw)
    torch.testing.assert_close(value, torch.tensor([0.5 * np.exp(0.3), 2.0 * np.exp(-1.2)], dtype=torch.float64),
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(weights.inverse_transform(value), raw, rtol=1e-15, atol=1e-16)
    torch.testing.assert_close(weights.inverse_transform(torch.tensor([1.0, 1.0], dtype=torch.float64)),
                               torch.tensor([np.log(2.0), -np.log(2.0)], dtype=torch.float64), rtol=1e-15, atol=0)
    assert float(layer.raw_bias_var_constraint.inverse_transform(torch.zeros(1, dtype=torch.float64))) == 0.0


def test_setting_a_variance_after_its_raw_parameter_moved_gives_exactly_the_value_set():
    """``layer.weight_var = v`` makes ``v`` the anchor and returns ``raw`` to 0 (module docstring of
    ``ntkgp.layers.variance``): after an optimizer moved ``raw`` to 0.5 the layer must hold ``v``,
    not ``v · e^0.5``, in its value and in its kernel ``K = v x·x'/d + σ_b²``."""
    layer = ntkgp.Dense(2, 1.0, 0.1)
    with torch.no_grad():
        layer.raw_weight_var.fill_(0.5)   # as an optimizer step leaves it
    layer.weight_var = 2.0
    assert float(layer.raw_weight_var.detach()) == 0.0
    assert layer.variance_as("weight_var", torch.zeros((), dtype=torch.float64)).item() == 2.0
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer.kernel(x).nngp, 2.0 * x @ x.T / 3 + 0.1, rtol=1e-15, atol=0)


def test_the_largest_active_dim_is_read_once_per_active_dims_tensor(monkeypatch):
    """The input check reads ``active_dims.max()``, a wait for the device where ``active_dims`` is on a
    GPU: once per tensor (and in-place change), not at every call of an acquisition function's kernel."""
    kernel = ntkgp.NTKKernel(ntkgp.mlp(1), active_dims=[0, 2])
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reads = []
    real_max = torch.Tensor.max
    monkeypatch.setattr(torch.Tensor, "max", lambda self, *a, **k: reads.append(1) or real_max(self, *a, **k))
    first = kernel(x).to_dense()
    for _ in range(3):
        assert torch.equal(kernel(x).to_dense(), first)
    assert len(reads) == 1
    kernel.active_dims[1] = 4   # changed in place: read again, and refused
    with pytest.raises(ValueError, match="active_dims selects feature 4, but x1 has 3 feature"):
        kernel(x)
    assert len(reads) == 2


@pytest.mark.parametrize("kernel_class", [ntkgp.NNGPKernel, ntkgp.NTKKernel])
def test_a_spec_without_such_a_kernel_is_refused_when_the_kernel_is_built(kernel_class):
    """A sum of two branches that are functions of the same input feature has no kernel of the
    independent-branches form; the GPyTorch kernel refused it only at its first evaluation."""
    shared = ntkgp.serial(ntkgp.Dense(8), ntkgp.parallel(ntkgp.Identity(), ntkgp.Erf(), join="sum"), ntkgp.Dense(1))
    with pytest.raises(ValueError, match="sum of branches needs them independent"):
        kernel_class(shared)
    independent = ntkgp.serial(ntkgp.Dense(8), ntkgp.parallel(ntkgp.Identity(), ntkgp.Dense(8), join="sum"),
                               ntkgp.Dense(1))
    with torch.no_grad():
        assert torch.isfinite(kernel_class(independent)(torch.randn(3, 2)).to_dense()).all()
