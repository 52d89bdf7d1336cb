"""The finite-width twin (net.build) and empirical kernels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import needs_cpu_half_products
from torch import Tensor
from torch.func import functional_call

import ntkgp
from ntkgp.finite import empirical, empirical_nngp, empirical_ntk, ensemble_size
from ntkgp.finite.rates import equivalent_learning_rates

pytestmark = pytest.mark.usefixtures("float64_default")


def _net(param="ntk"):
    return ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1, param), ntkgp.Erf(),
                        ntkgp.parallel(ntkgp.Dense(8, 1.0, 0.2, param), ntkgp.Dense(8, 1.5, None, param)),
                        ntkgp.LayerNorm(), ntkgp.ReLU(), ntkgp.Dense(3, 1.5, 0.1, param))


def test_build_gives_a_module_with_the_declared_shapes():
    model = _net().build(in_features=5, seed=0)
    out = model(torch.randn(7, 5))
    assert out.shape == (7, 3)
    ens = _net().build(in_features=5, seed=0, ensemble_size=4)
    assert ens(torch.randn(7, 5)).shape == (4, 7, 3)
    assert ensemble_size(ens) == 4 and ensemble_size(model) is None


def test_build_is_reproducible_and_device_dtype_independent():
    x = torch.randn(6, 5)
    a = _net().build(in_features=5, seed=3)(x)
    b = _net().build(in_features=5, seed=3)(x)
    c = _net().build(in_features=5, seed=4)(x)
    d = _net().build(in_features=5, seed=3, dtype=torch.float32)(x.float())
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(d.double(), a, rtol=1e-4, atol=1e-5)


def test_lazy_first_layer_draws_on_first_call():
    model = ntkgp.mlp(1, "relu").build(seed=0)
    assert model[0].weight is None
    out = model(torch.randn(4, 6))
    assert out.shape == (4, 1) and model[0].weight.shape == (6, 512)
    again = ntkgp.mlp(1, "relu").build(seed=0)(torch.zeros(1, 6))
    torch.testing.assert_close(model(torch.zeros(1, 6)), again)


def test_ntk_parameterization_draws_standard_normal_weights_and_scales_in_forward():
    layer = ntkgp.Dense(2000, weight_var=3.0, bias_var=0.5)
    module = layer.build(in_features=50, seed=1)
    assert abs(float(module.weight.detach().var()) - 1.0) < 0.01
    assert abs(float(module.bias.detach().var()) - 1.0) < 0.1
    x = torch.randn(3, 50)
    expected = x @ module.weight * math.sqrt(3.0 / 50) + math.sqrt(0.5) * module.bias
    torch.testing.assert_close(module(x), expected)


def test_ard_scales_each_input_feature():
    weight_var = torch.tensor([0.5, 2.0, 0.0])
    layer = ntkgp.Dense(4, weight_var=weight_var, bias_var=None, ard_num_dims=3)
    module = layer.build(seed=0)
    x = torch.randn(5, 3)
    expected = (x * (weight_var / 3).sqrt()) @ module.weight
    torch.testing.assert_close(module(x), expected)
    std = ntkgp.Dense(4, weight_var, None, "standard", ard_num_dims=3).build(seed=0)
    torch.testing.assert_close(std(x), expected)  # same draws, scale folded into the weights


def test_standard_and_ntk_parameterizations_have_the_same_forward_pass():
    """Lecture exercise 1: W̃ = sqrt(σ_w²/n) W gives identical outputs."""
    x = torch.randn(6, 5)
    torch.testing.assert_close(_net("ntk").build(in_features=5, seed=2)(x),
                               _net("standard").build(in_features=5, seed=2)(x), rtol=1e-12, atol=1e-12)


def test_float64_networks_do_not_round_through_the_default_dtype():
    """Building float64 networks while the default dtype is float32 keeps scales exact."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        a = _net("ntk").build(in_features=5, seed=2, dtype=torch.float64)
        b = _net("standard").build(in_features=5, seed=2, dtype=torch.float64)
    finally:
        torch.set_default_dtype(previous)
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-13, atol=1e-14)


def test_rate_weighted_tangent_kernel_of_standard_parameterization_is_the_ntk_twin():
    x = torch.randn(4, 5)
    ntk_model = _net("ntk").build(in_features=5, seed=2)
    std_model = _net("standard").build(in_features=5, seed=2)
    scales = equivalent_learning_rates(std_model, 1.0)
    for params in (None, dict(std_model.named_parameters())):  # layerwise and Jacobian paths
        weighted = empirical_ntk(std_model, x, params=params, parameter_scales=scales)
        torch.testing.assert_close(weighted, empirical_ntk(ntk_model, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(empirical_ntk(std_model, x), empirical_ntk(ntk_model, x))


def test_standard_parameterization_with_layer_learning_rates_has_the_same_backward_pass():
    """Lecture exercise 2: a GD step with rate η (NTK) equals one with η σ_w²/n_{l-1} on W̃ and
    η σ_b² on b̃ (standard): the outputs after several steps agree."""
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    models = {param: _net(param).build(in_features=5, seed=2) for param in ("ntk", "standard")}
    for model in models.values():
        rates = equivalent_learning_rates(model, 0.3)
        for _ in range(5):
            loss = 0.5 * ((model(x) - y) ** 2).mean()
            names, params = zip(*model.named_parameters(), strict=True)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for name, p, g in zip(names, params, grads, strict=True):
                    p -= rates[name] * g
    torch.testing.assert_close(models["ntk"](x), models["standard"](x), rtol=1e-10, atol=1e-12)
    # with one uniform rate they would differ: the rates are what makes them equivalent
    assert equivalent_learning_rates(models["standard"], 0.3)["0.weight"] != 0.3


def _no_jacobian(*args, **kwargs):
    raise AssertionError("the layer-by-layer route was expected")


def test_empirical_ntk_layerwise_equals_jacobian_contraction(monkeypatch):
    import ntkgp.finite.empirical as empirical

    for param in ("ntk", "standard"):
        for members in (None, 3):
            model = _net(param).build(in_features=5, seed=0, ensemble_size=members)
            x1, x2 = torch.randn(4, 5), torch.randn(3, 5)
            slow = empirical_ntk(model, x1, x2, params=dict(model.named_parameters()), vector_output=True)
            with monkeypatch.context() as patch:  # built networks must take the fast route
                patch.setattr(empirical, "jacrev", _no_jacobian)
                fast = empirical_ntk(model, x1, x2, vector_output=True)
                average = empirical_ntk(model, x1, x2)
            torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
            assert fast.shape == ((4, 3, 3, 3) if members is None else (3, 4, 3, 3, 3))
            # the per-output average is contracted directly, not taken from the k x k blocks
            torch.testing.assert_close(average, slow.diagonal(dim1=-2, dim2=-1).mean(-1), rtol=1e-12, atol=1e-12)
            nngp = empirical_nngp(model, x1, x2, vector_output=True)
            torch.testing.assert_close(empirical_nngp(model, x1, x2), nngp.diagonal(dim1=-2, dim2=-1).mean(-1))


def test_empirical_ntk_takes_the_jacobian_route_where_the_layerwise_formula_is_wrong():
    """Shared layers, point-mixing wrappers, per-output scales and lazy layers inside a wrapper."""
    x1, x2 = torch.randn(4, 3), torch.randn(3, 3)

    def brute(module, scales=None):  # Σ_p s_p J1_p J2_p by jacrev over every parameter
        params = {n: p.detach() for n, p in module.named_parameters()}
        j1 = torch.func.jacrev(lambda q: functional_call(module, q, (x1,)))(params)
        j2 = torch.func.jacrev(lambda q: functional_call(module, q, (x2,)))(params)
        total = 0
        for n, p in params.items():
            s = torch.as_tensor((scales or {}).get(n, 1.0)).expand(p.shape).reshape(-1)
            total = total + torch.einsum("aip,bip->ab", j1[n].flatten(2) * s, j2[n].flatten(2)) / j1[n].shape[1]
        return total

    layer = ntkgp.serial(ntkgp.Dense(3, 1.5, 0.2)).build(in_features=3, seed=0)

    class Twice(torch.nn.Module):  # one Dense layer called twice: cross terms
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    class Centred(torch.nn.Module):  # mixes points
        def __init__(self):
            super().__init__()
            self.net = _net().build(in_features=3, seed=1)

        def forward(self, x):
            out = self.net(x)
            return out - out.mean(-2, keepdim=True)

    tied = ntkgp.mlp(2, "tanh", width=3, out_dim=2).build(in_features=3, seed=4)
    tied[2].weight = tied[0].weight   # tied weights: the layer-by-layer sum missed the cross terms (30 % off)
    for module in (Twice(), Centred(), tied):
        torch.testing.assert_close(empirical_ntk(module, x1, x2), brute(module), rtol=1e-12, atol=1e-12)
    model = _net().build(in_features=3, seed=2)
    for scales in ({"5.weight": torch.tensor([[0.5, 1.0, 2.0]])},         # per output unit
                   {"5.weight": torch.rand(8, 3)},                         # per entry
                   {"5.bias": torch.tensor([0.5, 1.0, 2.0])},              # per output unit
                   {"0.weight": torch.rand(3, 1), "0.bias": 0.3}):         # the layerwise route's forms
        torch.testing.assert_close(empirical_ntk(model, x1, x2, parameter_scales=scales), brute(model, scales),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\['5.wieght'\]"):
        empirical_ntk(model, x1, parameter_scales={"5.wieght": 1.0})
    # learning-rate ratios: NaN gave a NaN kernel, a negative one an indefinite "NTK", both silently
    for bad in (float("nan"), float("inf"), -5.0, torch.tensor([0.5, -1.0, 2.0])):
        with pytest.raises(ValueError, match=r"^parameter_scales\['5.bias'\] must be finite and non-negative"):
            empirical_ntk(model, x1, parameter_scales={"5.bias": bad})
    assert bool(empirical_ntk(model, x1, parameter_scales={"5.bias": 0.0}).isfinite().all())   # frozen: valid

    class Wrap(torch.nn.Module):  # deferred first layer: drawn before the parameters are listed
        def __init__(self):
            super().__init__()
            self.inner = _net().build(seed=3)
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.inner(x))

    wrapped = Wrap()
    first = empirical_ntk(wrapped, x1, x2)
    torch.testing.assert_close(first, brute(wrapped), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shape \\(n, d\\)"):
        empirical_ntk(wrapped, torch.randn(2, 4, 3))
    assert empirical_ntk(model, torch.randn(2, 4, 3)).shape == (2, 4, 4)   # built networks take batches


def test_a_module_registered_twice_keeps_its_parameters_through_the_empirical_kernels():
    """nn.Sequential(lin, tanh, lin): torch.func.functional_call swapped the shared slot under both
    names and put a detached copy back in place of the parameters, so the module trained no more
    (its loss had no gradient to them), silently. The kernel is the autograd one."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin, torch.nn.Tanh(), torch.nn.Linear(3, 2).double())
    params = list(model.parameters())
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)

    def jacobian(x):   # (n, k, parameters) by backward passes through the module itself
        out = model(x)
        return torch.stack([torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            out[a, i], params, retain_graph=True)]) for i in range(2)]) for a in range(len(x))])

    expected = torch.einsum("aip,bjp->abij", jacobian(x1), jacobian(x2))
    for _ in range(2):
        torch.testing.assert_close(empirical_ntk(model, x1, x2, vector_output=True), expected, rtol=1e-12, atol=1e-12)
        empirical_nngp(model, x1)
        assert model[0].weight is model[2].weight is params[0] and model[0].bias is params[1]
    linearized = ntkgp.finite.linearize(model)
    linearized(x1)
    assert isinstance(linearized.initial[0].weight, torch.nn.Parameter)
    assert linearized.initial[0].weight is linearized.initial[2].weight
    model(x1).sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


def test_empirical_ntk_is_the_lecture_definition_for_vector_outputs():
    """Θ_ij(x, x') = Σ_p ∂f_i(x)/∂θ_p ∂f_j(x')/∂θ_p, by explicit per-output gradients."""
    model = _net().build(in_features=5, seed=0)
    x1, x2 = torch.randn(2, 5), torch.randn(2, 5)
    theta = empirical_ntk(model, x1, x2, vector_output=True)
    params = list(model.parameters())

    def grad(x, i):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x[None])[0, i], params)])

    for a in range(2):
        for b in range(2):
            for i in range(3):
                for j in range(3):
                    expected = grad(x1[a], i) @ grad(x2[b], j)
                    assert abs(float(theta[a, b, i, j] - expected)) < 1e-10
    per_output = empirical_ntk(model, x1, x2)
    torch.testing.assert_close(per_output, theta.diagonal(dim1=-2, dim2=-1).mean(-1))


def test_empirical_nngp_is_the_outer_product_of_outputs():
    model = _net().build(in_features=5, seed=0, ensemble_size=2)
    x = torch.randn(4, 5)
    f = model(x)
    torch.testing.assert_close(empirical_nngp(model, x), torch.einsum("eni,emi->enm", f, f) / 3)


def test_empirical_kernels_of_plain_functions():
    def f(params, x):
        return params["A"] * torch.sin(params["k"] * x[:, 0])

    params = {"A": torch.tensor(1.3), "k": torch.tensor(0.7)}
    x = torch.tensor([[1.0], [2.0]])
    theta = empirical_ntk(f, x, params=params)
    assert theta.shape == (2, 2)
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(f, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_and_kernels_on_cuda():
    net = _net()
    x = torch.randn(6, 5, device="cuda")
    k = net.to("cuda").kernel(x)
    assert k.nngp.device.type == "cuda"
    model = net.build(in_features=5, seed=0, device="cuda")
    assert model(x).device.type == "cuda"
    cpu = _net().build(in_features=5, seed=0)(x.cpu())
    torch.testing.assert_close(model(x).cpu(), cpu)
    functional_call(model, dict(model.named_parameters()), (x,))


def test_deferred_first_layer_is_drawn_in_the_build_dtype():
    model = ntkgp.mlp(1, "relu", width=4).build(seed=0, dtype=torch.float32)
    model(torch.randn(2, 3, dtype=torch.float32))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model64 = ntkgp.mlp(1, "relu", width=4).build(seed=0, dtype=torch.float64)
    model64(torch.randn(2, 3, dtype=torch.float64))
    assert {p.dtype for p in model64.parameters()} == {torch.float64}
    torch.testing.assert_close(model64[0].weight.float(), model[0].weight)    # same draws in both


def test_deferred_first_layer_follows_a_later_to():
    """A lazily built network moved by ``.double()`` (or ``.cuda()``) before its first call draws
    its first weights where the rest of it now is: they were drawn in the build's float32 (on
    its device) and the first call failed ("expected m1 and m2 to have the same dtype")."""
    x = torch.randn(4, 3, dtype=torch.float64)
    moved = ntkgp.mlp(1, "relu", width=4).build(seed=0, dtype=torch.float32).double()
    built = ntkgp.mlp(1, "relu", width=4).build(seed=0, dtype=torch.float64)
    out, expected = moved(x), built(x)
    assert out.dtype == torch.float64
    assert torch.equal(moved[0].weight, built[0].weight)             # the first layer's draws, in float64
    # the others were drawn in float32 and then widened: equal up to float32 rounding (~6e-8)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert {p.dtype for p in moved.parameters()} == {torch.float64}
    assert "0._lazy_like" not in moved.state_dict() and moved[0]._lazy_like is None


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_a_deferred_first_layer_loads_a_saved_network_before_its_first_call(param, ensemble_size):
    """As torch's lazy modules do, a deferred first layer takes its width from the saved weight: it
    refused the state dict of a called network ("Unexpected key(s) '0.weight', '0.input_scale'")."""
    x = torch.randn(5, 3)

    def build(seed):
        return ntkgp.mlp(1, "erf", width=8, parameterization=param).build(seed=seed, ensemble_size=ensemble_size)

    saved = build(0)
    expected = saved(x)                       # drawn by the call
    fresh = build(1)                          # not called: no first-layer weights yet
    fresh.load_state_dict(saved.state_dict())
    assert fresh[0].in_features == 3 and torch.equal(fresh(x), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deferred_first_layer_follows_cuda():
    x = torch.randn(4, 3)
    model = ntkgp.mlp(1, "relu", width=4).build(seed=0).cuda()   # first weights not drawn yet
    out = model(x.cuda())
    assert out.device.type == "cuda" and model[0].weight.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ntkgp.mlp(1, "relu", width=4).build(seed=0)(x))
    assert empirical_ntk(ntkgp.mlp(1, "relu", width=4).build(seed=0).cuda(), x.cuda()).device.type == "cuda"


def test_empirical_ntk_of_an_ensemble_with_some_parameters():
    """params= naming some of an ensemble's parameters differentiates those alone, member by member,
    as parameter_scales of 0 on the others do: the others, stacked, were left to functional_call
    and every member computed all E members' outputs, read as E points ((3, 3, 3) for 4 points)."""
    model = _net().build(in_features=5, seed=0, ensemble_size=3)
    x1, x2 = torch.randn(4, 5), torch.randn(2, 5)
    everything = dict(model.named_parameters())
    chosen = {name: everything[name] for name in ("0.weight", "5.bias")}
    others = {name: 0.0 for name in everything if name not in chosen}
    for x, n2 in ((None, 4), (x2, 2)):
        for vector_output, shape in ((False, (3, 4, n2)), (True, (3, 4, n2, 3, 3))):
            subset = empirical_ntk(model, x1, x, params=chosen, vector_output=vector_output, chunk_size=2)
            assert subset.shape == shape
            torch.testing.assert_close(subset, empirical_ntk(model, x1, x, parameter_scales=others,
                                                             vector_output=vector_output), rtol=1e-12, atol=1e-12)


def test_equivalent_learning_rates_need_the_deferred_weights_drawn():
    """A first layer built without in_features has no weight before its first call: the rates left
    it out ({'0.bias', '2.bias', '2.weight'}), so training read it as missing or, with a default,
    at η instead of η σ_w²/d."""
    net = ntkgp.mlp(1, "relu", width=4, parameterization="standard")
    model = net.build(seed=0)
    with pytest.raises(ValueError, match=r"\['0'\].*in_features"):
        equivalent_learning_rates(model, 0.1)
    model(torch.randn(2, 3))
    rates = equivalent_learning_rates(model, 0.1)
    torch.testing.assert_close(rates, equivalent_learning_rates(net.build(in_features=3, seed=0), 0.1))
    assert float(rates["0.weight"]) == pytest.approx(0.1 * 2.0 / 3)


def test_build_takes_numpy_and_tensor_integer_seeds_and_refuses_others():
    """torch's manual_seed takes Python ints alone: np.int64(3) failed with "an integer is required"
    (a TypeError), 1.5 and True with torch's RuntimeError."""
    import numpy as np

    x = torch.randn(3, 5)
    expected = _net().build(in_features=5, seed=3)(x)
    for seed in (np.int64(3), torch.tensor(3)):
        assert torch.equal(_net().build(in_features=5, seed=seed)(x), expected)
    for seed in (1.5, True, "3", 2**64):
        with pytest.raises(ValueError, match="seed must be"):
            _net().build(in_features=5, seed=seed)
    _net().build(in_features=5, seed=-1)   # torch remaps negative seeds: still accepted


def test_empirical_nngp_checks_the_input_dtype_as_empirical_ntk_does():
    """float64 inputs to a float32 network: torch's "expected m1 and m2 to have the same dtype"
    (a RuntimeError from deep in the forward pass) instead of empirical_ntk's ValueError."""
    model = _net().build(in_features=5, seed=0, dtype=torch.float32)
    for kernel in (empirical_nngp, empirical_ntk):
        with pytest.raises(ValueError, match=r"x1 is torch\.float64 but the network.s parameters are torch\.float32"):
            kernel(model, torch.randn(3, 5))


def test_empirical_ntk_jacobian_route_refuses_batched_x2_as_it_does_batched_x1():
    """x2 of shape (2, 1, d) with one output was read as two points (a (4, 2) kernel), other batches
    failed in einsum ("subscript i has size 4 for operand 1 which does not broadcast")."""
    model = ntkgp.serial(ntkgp.Dense(5, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1)).build(in_features=3)
    wrapped = torch.nn.Sequential(model, torch.nn.Tanh())
    x1 = torch.randn(4, 3)
    for x2 in (torch.randn(2, 1, 3), torch.randn(2, 4, 3)):
        with pytest.raises(ValueError, match=r"x2 must have shape \(n, d\)"):
            empirical_ntk(wrapped, x1, x2)
        assert empirical_ntk(model, x1, x2).shape == (x2.shape[0], 4, x2.shape[1])   # built networks take batches


def test_empirical_nngp_of_an_ensemble_wrapped_in_a_user_module_is_one_kernel_per_member():
    """nn.Sequential(ensemble, Tanh()) returns (E, n, k): empirical_ntk gave one kernel per member,
    empirical_nngp refused it ("must return outputs (n, k) for inputs (n, d)"), and so did
    empirical_ntk's zero kernel for params={}."""
    model = ntkgp.serial(ntkgp.Dense(5, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(2, 1.0, 0.1)).build(
        in_features=3, seed=0, ensemble_size=3)
    wrapped = torch.nn.Sequential(model, torch.nn.Tanh())
    x1, x2 = torch.randn(4, 3), torch.randn(2, 3)
    with torch.no_grad():
        f1, f2 = wrapped(x1), wrapped(x2)
    torch.testing.assert_close(empirical_nngp(wrapped, x1, x2), f1 @ f2.mT / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_nngp(wrapped, x1, x2, vector_output=True),
                               torch.einsum("eni,emj->enmij", f1, f2), rtol=1e-12, atol=1e-12)
    assert empirical_ntk(wrapped, x1, x2).shape == (3, 4, 2)
    assert torch.equal(empirical_ntk(wrapped, x1, x2, params={}), torch.zeros(3, 4, 2))


class _Around(torch.nn.Module):
    """A user's module around an ensemble, its outputs passed through ``post``."""

    def __init__(self, ensemble: torch.nn.Module, post: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.ensemble, self.post = ensemble, post

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.ensemble(x))


@pytest.mark.parametrize("n", [5, 4, 1])
def test_empirical_nngp_reads_a_wrapped_ensemble_s_squeezed_outputs_per_member(n):
    """(E, n) outputs, the single output axis squeezed, were refused when n != E and read as n
    points' E outputs when n = E (one (4, 4) kernel across members, no error). Outputs that put the
    points first, (n, E) or the members' mean (n, 1), stay one kernel of the module's outputs."""
    ensemble = ntkgp.mlp(1, "erf", 2.0, 0.1).build(in_features=2, seed=0, ensemble_size=4, dtype=torch.float64)
    x = torch.randn(n, 2, dtype=torch.float64)
    per_member = empirical_nngp(ensemble, x)
    assert empirical_ntk(_Around(ensemble, lambda f: f.squeeze(-1)), x).shape == (4, n, n)
    torch.testing.assert_close(empirical_nngp(_Around(ensemble, lambda f: f.squeeze(-1)), x), per_member,
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(empirical_nngp(_Around(ensemble, lambda f: f.squeeze(-1).T), x),
                               per_member.mean(0), rtol=1e-14, atol=0)
    with torch.no_grad():
        mean = ensemble(x).mean(0)
    torch.testing.assert_close(empirical_nngp(_Around(ensemble, lambda f: f.mean(0)), x), mean @ mean.T,
                               rtol=1e-15, atol=0)



def test_empirical_nngp_of_a_wrapped_ensemble_draws_the_random_numbers_of_its_two_calls():
    """With E = n the pass at one point more that tells (E, n) outputs from (n, k) drew dropout's random numbers
    too: the outputs at x2 had other masks than the module's second call draws (7.6 apart in the kernel) and the
    caller's stream moved on. Given back, the kernel is that of the module's two calls, ``f(x1) f(x2)ᵀ`` per
    member, and the next number drawn is the one after them."""

    class Dropped(_Around):
        def __init__(self, ensemble: torch.nn.Module) -> None:
            super().__init__(ensemble, lambda f: f.squeeze(-1))
            self.dropout = torch.nn.Dropout(0.5)

        def forward(self, x: Tensor) -> Tensor:
            return self.dropout(super().forward(x))

    ensemble = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8).build(3, seed=0, ensemble_size=4, dtype=torch.float64)
    model = Dropped(ensemble)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 3))
    torch.manual_seed(1)
    with torch.no_grad():
        f1, f2 = model(x1), model(x2)
    after = torch.rand(1)
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="training mode"):
        kernel = empirical_nngp(model, x1, x2)
    torch.testing.assert_close(kernel, f1.unsqueeze(-1) * f2.unsqueeze(-2), rtol=1e-15, atol=0)
    assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("n", [5, 4, 1])
def test_empirical_ntk_of_a_module_that_combines_an_ensemble_s_members(n):
    """A module of the user's that makes its outputs of all members' (their mean (n, 1), or (n, E)) is one
    function of all their parameters, as its NNGP above: its NTK was mapped over the members, each member's
    slice called as the whole, and refused ("must return outputs (n, k) ...; got (1, 1)"). It is the kernel
    of one ``jacrev`` of the module in the stacked parameters, its diagonal that kernel's; outputs per member
    stay one kernel per member."""
    ensemble = ntkgp.mlp(1, "erf", 2.0, 0.1).build(in_features=2, seed=0, ensemble_size=4, dtype=torch.float64)
    x1, x2 = torch.randn(n, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    for post in (lambda f: f.mean(0), lambda f: f.squeeze(-1).T):
        model = _Around(ensemble, post)
        fn = empirical.stateless(model)
        params = {name: p.detach() for name, p in model.named_parameters()}
        j1, j2 = (torch.func.jacrev(lambda q, x=x, fn=fn: fn(q, x))(params) for x in (x1, x2))
        full = sum(torch.einsum("nip,mjp->nmij", j1[name].flatten(2), j2[name].flatten(2)) for name in params)
        k = full.shape[-1]
        torch.testing.assert_close(empirical_ntk(model, x1, x2), torch.einsum("nmii->nm", full) / k,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(empirical_ntk(model, x1, x2, vector_output=True), full, rtol=1e-12, atol=1e-12)
        own = empirical_ntk(model, x1)
        torch.testing.assert_close(empirical_ntk(model, x1, diag=True), own.diagonal(), rtol=1e-12, atol=1e-12)
    assert empirical_ntk(_Around(ensemble, lambda f: f.squeeze(-1)), x1, x2).shape == (4, n, 3)

class _Head(torch.nn.Module):
    """A user's linear head of its own (not stacked) applied to every member's outputs of an ensemble."""

    def __init__(self, ensemble: torch.nn.Module, k: int, outputs: int) -> None:
        super().__init__()
        self.ensemble = ensemble
        torch.manual_seed(0)
        self.head = torch.nn.Linear(k, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ensemble(x))


@pytest.mark.parametrize("outputs", [3, 4])
def test_empirical_ntk_per_member_of_a_module_with_parameters_beside_the_ensemble_s(outputs):
    """A head of the module's own on 4 members' outputs (E, n, k) was mapped over its first axis with the stacked
    parameters: vmap's "Expected all tensors to have the same size in the mapped dimension, got sizes [4, 4, 4,
    4, 3, 3]", or with 4 outputs a row of it, a 1-D weight ("Got incorrect dims for mm"). Each member's kernel
    is in its own slice of the stacked parameters and the whole head, as the blocks of one ``jacrev`` of the
    module; a scale of the head's own shape is taken (and one member's slice's for the stacked ones)."""
    ensemble = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8, out_dim=4).build(3, seed=0, ensemble_size=4,
                                                                        dtype=torch.float64)
    model = _Head(ensemble, 4, outputs)
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    fn = empirical.stateless(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    scales = {"head.weight": torch.rand(outputs, 4, dtype=torch.float64), "ensemble.0.weight": 2.0}
    j1, j2 = (torch.func.jacrev(lambda q, x=x: fn(q, x))(params) for x in (x1, x2))
    full = sum(torch.einsum("enip,emjp->enmij", j1[name].flatten(3) * torch.as_tensor(scales.get(name, 1.0)).flatten(),
                            j2[name].flatten(3)) for name in params)
    trace = torch.einsum("enmii->enm", full) / outputs
    torch.testing.assert_close(empirical_ntk(model, x1, x2, parameter_scales=scales), trace, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(model, x1, x2, parameter_scales=scales, vector_output=True), full,
                               rtol=1e-12, atol=1e-12)
    own = empirical_ntk(model, x1)
    torch.testing.assert_close(empirical_ntk(model, x1, diag=True), own.diagonal(dim1=-2, dim2=-1),
                               rtol=1e-12, atol=1e-12)


class _Scaled(torch.nn.Module):
    """A user's module around an ensemble with a parameter of its own per member, an output scale ``(E, 1, 1)``
    (``(E, 1)`` on squeezed outputs ``(E, n)``), and a head (``outputs`` of them) shared by all members."""

    def __init__(self, ensemble: torch.nn.Module, members: int, outputs: int, squeeze: bool = False) -> None:
        super().__init__()
        self.ensemble, self.squeeze = ensemble, squeeze
        torch.manual_seed(0)
        self.head = torch.nn.Linear(2, outputs, dtype=torch.float64)
        self.scale = torch.nn.Parameter(torch.rand(members, 1, *([] if squeeze else [1]), dtype=torch.float64) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.ensemble(x))
        return out.squeeze(-1) * self.scale if self.squeeze else out * self.scale


def _per_member_reference(model: torch.nn.Module, x1: Tensor, x2: Tensor, members: int, scales: dict) -> Tensor:
    """Member e's kernel from ``torch.func.jacrev`` of member e's outputs alone in all of the module's parameters,
    in a loop over the members."""
    fn = empirical.stateless(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    kernels = []
    for e in range(members):
        j1, j2 = (torch.func.jacrev(lambda q, x=x, e=e: fn(q, x)[e].reshape(x.shape[0], -1))(params) for x in (x1, x2))
        kernels.append(sum(torch.einsum("nip,mip->nm", (j1[name] * torch.as_tensor(scales.get(name, 1.0))).flatten(2),
                                        j2[name].flatten(2)) for name in params) / j1["head.bias"].shape[1])
    return torch.stack(kernels)


@pytest.mark.parametrize(("outputs", "squeeze", "n"), [(3, False, 5), (4, False, 5), (1, True, 5), (1, True, 4)])
def test_empirical_ntk_per_member_of_a_module_with_a_parameter_of_its_own_per_member(outputs, squeeze, n):
    """A parameter of the user's own module with a member axis, a per-member output scale (E, 1, 1), held whole
    beside the stacked ones (which a head needs) made every member's call return all members' outputs: refused as
    "must return outputs (n, k) ...; got (4, 5, 3)", where mapping every parameter over the members (before) took
    it. Each member's kernel is in its own row of the scale: a loop of ``jacrev`` over the members' outputs agrees
    to rounding (a head of E = 4 outputs, whose weight (4, 2) is not per member, included; n = E with squeezed
    (E, n) outputs too), so do the diagonal, a scale of the parameter's shape and the scale held as a buffer."""
    ensemble = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8, out_dim=2).build(3, seed=0, ensemble_size=4,
                                                                        dtype=torch.float64)
    model = _Scaled(ensemble, 4, outputs, squeeze)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(m, 3, generator=g, dtype=torch.float64) for m in (n, 3))
    scales = {"scale": torch.rand(model.scale.shape, generator=g, dtype=torch.float64), "ensemble.0.weight": 2.0}
    expected = _per_member_reference(model, x1, x2, 4, scales)
    torch.testing.assert_close(empirical_ntk(model, x1, x2, parameter_scales=scales), expected, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(empirical_ntk(model, x1, x2, parameter_scales=scales, chunk_size=3), expected,
                               rtol=1e-12, atol=1e-12)
    own = _per_member_reference(model, x1, x1, 4, {})
    torch.testing.assert_close(empirical_ntk(model, x1, diag=True), own.diagonal(dim1=-2, dim2=-1), rtol=1e-12,
                               atol=1e-12)
    del model.scale   # the scale as a buffer (E, 1, 1), a constant: refused the same way before
    model.register_buffer("scale", scales["scale"])
    torch.testing.assert_close(empirical_ntk(model, x1, x2), _per_member_reference(model, x1, x2, 4, {}),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [empirical_nngp, empirical_ntk])
def test_a_module_around_an_ensemble_that_returns_no_tensor_is_told_so(kernel):
    """Outputs of a module around an ensemble that are not one tensor (a tuple) were read for a member axis first:
    "'tuple' object has no attribute 'dim'", where the same module around one network is told what to return."""
    ensemble = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8).build(3, seed=0, ensemble_size=4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must return one tensor of outputs \(n, k\), got tuple"):
        kernel(_Around(ensemble, lambda f: (f, None)), torch.randn(5, 3, dtype=torch.float64))


def test_estimators_name_what_is_wrong_with_their_inputs():
    """Raw torch errors before (review): an ensemble's member axis of another size (a broadcasting
    RuntimeError), params of the wrong shape (a matmul error), a torch module given to
    monte_carlo_kernel (no attribute 'build'), parameter scales of the wrong shape (an expand
    error); and batched inputs on the Jacobian route of a network
    that ntkgp did build were refused as if it had not been."""
    from ntkgp.finite import monte_carlo_kernel

    spec = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(2))
    ensemble = spec.build(in_features=2, seed=0, ensemble_size=3)
    for x in (torch.randn(5, 4, 2), torch.randn(2, 4, 2)):
        for kernel in (empirical_ntk, empirical_nngp):
            with pytest.raises(ValueError, match=r"does not fit an ensemble of 3"):
                kernel(ensemble, x)
        with pytest.raises(ValueError, match=r"x2 of shape \(5, 4, 2\) does not fit"):
            empirical_ntk(ensemble, torch.randn(4, 2), torch.randn(5, 4, 2))
    assert empirical_ntk(ensemble, torch.randn(3, 4, 2)).shape == (3, 4, 4)    # one slice per member
    assert empirical_ntk(ensemble, torch.randn(1, 4, 2)).shape == (3, 4, 4)    # or one for all
    single = spec.build(in_features=2, seed=0)
    with pytest.raises(ValueError, match=r"0\.weight \(3, 8\) \(the network's is \(2, 8\)\)"):
        empirical_ntk(single, torch.randn(4, 2), params={"0.weight": torch.zeros(3, 8)})
    with pytest.raises(ValueError, match="layer-by-layer route only, which params="):
        empirical_ntk(single, torch.randn(2, 4, 2), params={"0.weight": single[0].weight.detach()})
    with pytest.raises(ValueError, match="an ntkgp network spec"):
        monte_carlo_kernel(torch.nn.Sequential(torch.nn.Linear(2, 1)), torch.randn(3, 2))
    for model in (single, ensemble):   # scales broadcast to one member's parameter, (in, 1) columns too
        with pytest.raises(ValueError, match=r"parameter_scales\['0\.weight'\] of shape \(5,\) does not broadcast"):
            empirical_ntk(model, torch.randn(4, 2), parameter_scales={"0.weight": torch.ones(5)})
        torch.testing.assert_close(empirical_ntk(model, torch.randn(4, 2, generator=torch.Generator().manual_seed(0)),
                                                 parameter_scales={"0.weight": torch.ones(2, 1), "0.bias": 1.0}),
                                   empirical_ntk(model, torch.randn(4, 2, generator=torch.Generator().manual_seed(0))))


def test_empirical_ntk_is_a_constant_on_both_routes():
    """Built alone, a network took the layer-by-layer route and gave a kernel without a graph; the
    same network wrapped in a user module took the Jacobian route and gave one differentiable in
    the inputs, so an objective's gradient depended on which route an internal check picked."""
    model = ntkgp.mlp(depth=2, width=16, activation="erf").build(in_features=3, seed=0)

    class Scale(torch.nn.Module):
        def forward(self, z):
            return 1.0 * z

    x = torch.randn(4, 3, requires_grad=True)
    layerwise, jacobian = empirical_ntk(model, x), empirical_ntk(torch.nn.Sequential(model, Scale()), x)
    torch.testing.assert_close(layerwise, jacobian, rtol=1e-13, atol=1e-13)
    assert not layerwise.requires_grad and not jacobian.requires_grad
    assert not empirical_ntk(torch.nn.Sequential(model, Scale()), x, x[:2] * 2).requires_grad


def test_equivalent_learning_rates_refuse_invalid_rates():
    """A string came back as every parameter's "rate", and negative or NaN rates silently (a
    negative one made the rate-weighted NTK indefinite)."""
    model = ntkgp.mlp(depth=1, width=4, parameterization="standard").build(in_features=2, seed=0)
    for bad in ("0.1", -1.0, 0.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="learning_rate must be a positive number"):
            equivalent_learning_rates(model, bad)


def test_equivalent_learning_rates_name_what_is_not_a_module():
    """None (or a function of parameters) failed as "'NoneType' object has no attribute 'named_modules'"."""
    for bad in (None, lambda params, x: x):
        with pytest.raises(ValueError, match=r"^model must be a torch\.nn\.Module .* got (NoneType|function)"):
            equivalent_learning_rates(bad, 0.1)


def test_empirical_kernels_refuse_what_they_would_get_wrong_and_warn_in_training_mode():
    """A misspelt params= name was ignored by functional_call (an all-zero NTK); (n, 2, 3) outputs
    gave 3x the NTK and a batched-matrix NNGP; a tuple output an AttributeError; images (n, 1, 8, 8)
    an NNGP with x2=None but a batch-shape error otherwise; zero points crashed the NTK; dropout and
    batch norm in training mode gave random kernels or changed the running statistics silently."""
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    model = _net().build(in_features=3, seed=0)
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"params names parameters the network does not have: \['5.Weight'\]"):
            kernel(model, x1, params={"5.Weight": model[5].weight})

    class Outputs(torch.nn.Module):
        def __init__(self, tuple_output=False):
            super().__init__()
            self.linear, self.tuple_output = torch.nn.Linear(3, 6), tuple_output

        def forward(self, x):
            out = self.linear(x)
            return (out, out) if self.tuple_output else out.unflatten(-1, (2, 3))

    for module, message in ((Outputs(), r"outputs \(n, k\) for inputs \(n, d\); got \(4, 2, 3\)"),
                            (Outputs(tuple_output=True), "one tensor of outputs")):
        for kernel in (empirical_ntk, empirical_nngp):
            with pytest.raises(ValueError, match=message):
                kernel(module, x1)
    images = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match="flatten images"):
            kernel(images, torch.randn(4, 1, 8, 8))
    flat = torch.nn.Sequential(torch.nn.Unflatten(-1, (1, 8, 8)), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    assert empirical_ntk(flat, torch.randn(4, 64), torch.randn(3, 64)).shape == (4, 3)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    for module in (model, plain):
        for kernel in (empirical_ntk, empirical_nngp):
            assert kernel(module, x1[:0], x2).shape == (0, 5)
            assert kernel(module, x1, x2[:0], vector_output=True).shape == (4, 0, *((3, 3) if module is model
                                                                                   else (2, 2)))
    for layer in (torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4)):
        noisy = torch.nn.Sequential(torch.nn.Linear(3, 4), layer, torch.nn.Linear(4, 2))
        with pytest.warns(RuntimeWarning, match="training mode"):
            empirical_nngp(noisy, x1)
        noisy.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(empirical_ntk(noisy, x1), empirical_ntk(noisy, x1), rtol=0, atol=0)
    inert = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.0), torch.nn.Linear(4, 2))
    with warnings.catch_warnings():   # dropping nothing is not random: no warning
        warnings.simplefilter("error")
        empirical_ntk(inert, x1)



@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")   # torch's vmap fallback for RReLU
def test_empirical_kernels_of_rrelu_in_training_mode_warn():
    """RReLU draws its negative slopes at random in training mode: two calls' NTKs were 0.19 apart (width 16) with no
    warning, where dropout's warned. In eval mode (its mean slope), and with ``lower == upper`` (one slope), the
    kernels are the module's and nothing warns."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    for kernel in (empirical_ntk, empirical_nngp):
        noisy = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.RReLU(), torch.nn.Linear(16, 1))
        with pytest.warns(RuntimeWarning, match=r"training mode and has \['RReLU'\] layers"):
            kernel(noisy, x)
        noisy.eval()
        fixed = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.RReLU(0.2, 0.2), torch.nn.Linear(16, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            torch.testing.assert_close(kernel(noisy, x), kernel(noisy, x), rtol=0, atol=0)
            torch.testing.assert_close(kernel(fixed, x), kernel(fixed, x), rtol=0, atol=0)

def test_empirical_kernels_name_inputs_of_the_wrong_width_or_dtype():
    """A torch Sequential starting with a Linear layer given inputs of another width, and a function
    of params given inputs of another dtype than its params, were torch's matmul errors from inside
    the network."""
    plain = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    built = _net().build(in_features=3, seed=0)
    for module in (plain, built):
        for kernel in (empirical_ntk, empirical_nngp):
            with pytest.raises(ValueError, match=r"takes inputs of 3 feature\(s\), got x1 of shape \(5, 2\)"):
                kernel(module, torch.randn(5, 2))

    def linear(p, x):
        return x @ p["w"]

    w = torch.randn(3, 1, dtype=torch.float64)
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"inputs are torch\.float32 but params are torch\.float64"):
            kernel(linear, torch.randn(5, 3, dtype=torch.float32), params={"w": w})
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(empirical_ntk(linear, x, params={"w": w}), x @ x.T, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(empirical_nngp(linear, x, params={"w": w}), (x @ w) @ (x @ w).T, rtol=1e-14, atol=1e-14)


def test_build_refuses_batched_or_non_finite_variances_and_signed_zeros_are_zero():
    """A batched bias alone failed in float() ("only one element tensors can be converted"), and its
    repr showed the first batch entry as the value; a NaN raw variance built a network of NaN outputs
    without a word; weight_var=-0.0 was stored as -0 (repr "-0", kernel entries -0.0)."""
    from ntkgp.layers.base import NonFiniteVarianceError

    layer = ntkgp.Dense(4, 1.0, 0.1)
    layer.raw_bias_var.data = torch.zeros(3)
    layer.raw_bias_var_constraint.anchor = torch.tensor([0.1, 0.7, 0.9], dtype=torch.float64)
    with pytest.raises(ValueError, match="batched hyperparameters"):
        layer.build(2)
    assert "bias_var=<shape (3,)>" in repr(layer)
    for name in ("raw_weight_var", "raw_bias_var"):
        layer = ntkgp.Dense(4, 1.0, 0.1)
        with torch.no_grad():
            getattr(layer, name).fill_(math.nan)
        with pytest.raises(NonFiniteVarianceError, match="non-finite variances"):
            ntkgp.serial(layer, ntkgp.ReLU(), ntkgp.Dense(1)).build(2)
    zero = ntkgp.Dense(4, weight_var=-0.0, bias_var=0.1)
    assert "weight_var=0," in repr(zero)
    assert not torch.signbit(zero.kernel(torch.randn(3, 2, dtype=torch.float64)).nngp).any()


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize(("dtype", "weight_var", "bias_var"), [
    (torch.float32, 1e300, 0.1), (torch.float32, 1e39, 0.1), (torch.float32, 1.0, 1e80), (torch.bfloat16, 1e300, 0.1),
    pytest.param(torch.float16, 1e5, 0.1, marks=needs_cpu_half_products),
    pytest.param(torch.float16, 1.0, 1e12, marks=needs_cpu_half_products)])
def test_build_refuses_variances_not_finite_in_its_dtype(parameterization, deferred, dtype, weight_var, bias_var):
    """Variances finite in float64 but not in the build's dtype built a network of infinite buffers,
    every output inf or NaN, without a word, while kernel() refused them in that dtype."""
    from ntkgp.layers.base import NonFiniteVarianceError

    net = ntkgp.serial(ntkgp.Dense(4, weight_var, bias_var, parameterization), ntkgp.ReLU(), ntkgp.Dense(1))
    x = torch.randn(5, 3, dtype=dtype)
    with pytest.raises(NonFiniteVarianceError, match=f"network in {dtype}"):
        net.build(None if deferred else 3, dtype=dtype)(x)
    with pytest.raises(NonFiniteVarianceError):
        net.kernel(x)
    # the largest variances the dtype holds still build
    net[0].weight_var = net[0].bias_var = torch.finfo(dtype).max / 2
    model = net.build(None if deferred else 3, dtype=dtype)
    model(x)
    assert all(torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers()))


def test_new_checks_keep_what_worked():
    """Per-member inputs (E, n, d) of a built ensemble in empirical_nngp (refused by the output-shape
    check meant for user modules); layer groups of full training through an identity branch at the
    output (the readout group had lost the Dense beside it)."""
    from ntkgp.finite.train import layer_groups

    ensemble = _net().build(in_features=3, seed=0, ensemble_size=4)
    per_member = torch.randn(4, 5, 3)
    assert empirical_nngp(ensemble, per_member).shape == (4, 5, 5)
    net = ntkgp.serial(ntkgp.Dense(8), ntkgp.ReLU(), ntkgp.Dense(4),
                       ntkgp.parallel(ntkgp.Identity(), ntkgp.Dense(4), ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(4))))
    groups = layer_groups(net.build(in_features=3), torch.randn(5, 3))
    assert groups["readout"] == ["3.branches.1.weight", "3.branches.2.1.weight"]


def test_empirical_kernels_name_a_wrong_feature_count_of_a_built_network():
    # was torch's "mat1 and mat2 shapes cannot be multiplied" from inside the first layer
    specs = (ntkgp.mlp(2, width=16), ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(8), ntkgp.Erf(), ntkgp.Dense(1)))
    for spec in specs:
        model = spec.build(in_features=3, seed=0, ensemble_size=2)
        for kernel in (ntkgp.finite.empirical_ntk, ntkgp.finite.empirical_nngp):
            assert kernel(model, torch.randn(4, 3)).shape == (2, 4, 4)
            with pytest.raises(ValueError, match=r"takes inputs of 3 feature\(s\), got x1 of shape \(4, 5\)"):
                kernel(model, torch.randn(4, 5))


def test_a_concatenation_before_the_first_dense_layer_widens_the_inputs():
    """The width check read the first Dense layer's fan-in as the inputs' width; a concatenation of
    Identity and ReLU doubles it on the way, so correct (n, 3) inputs were refused ("takes inputs
    of 6 feature(s)"), by empirical_ntk, empirical_nngp and monte_carlo_kernel alike."""
    from ntkgp.finite import monte_carlo_kernel

    spec = ntkgp.serial(ntkgp.parallel(ntkgp.Identity(), ntkgp.ReLU(), join="concat"), ntkgp.Dense(2, 1.0, 0.1))
    model = spec.build(in_features=3, seed=0, dtype=torch.float64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: functional_call(model, p, (x,)))(params)
    brute = sum(torch.einsum("iap,jap->ij", j.reshape(4, 2, -1), j.reshape(4, 2, -1)) for j in jac.values()) / 2
    torch.testing.assert_close(empirical_ntk(model, x), brute, rtol=1e-12, atol=1e-12)
    assert empirical_nngp(model, x).shape == (4, 4)
    assert monte_carlo_kernel(spec, x, n_samples=2).ntk.shape == (4, 4)
    with pytest.raises(ValueError, match="takes inputs of 6 feature"):   # 5 features, concatenated to 10
        empirical_ntk(model, torch.randn(4, 5))


def test_a_spec_where_a_finite_network_is_wanted_is_refused_by_name():
    """A spec is an nn.Module too: empirical_ntk failed with an empty NotImplementedError (or a
    dtype complaint), and equivalent_learning_rates returned rates for its raw variances."""
    net = ntkgp.mlp(1, "relu", width=8)
    x = torch.randn(4, 3)
    for call in (lambda: empirical_ntk(net, x), lambda: empirical_nngp(net, x),
                 lambda: equivalent_learning_rates(net, 0.1)):
        with pytest.raises(ValueError, match=r"network spec \(Serial\).*build\(\.\.\.\) first"):
            call()


def test_a_deferred_first_layer_refuses_inputs_without_features():
    """build(in_features=0) is refused; a deferred layer took 0 features from its first input,
    drew a fan-in variance of σ²/0 = inf, and kept width 0 for good."""
    model = ntkgp.mlp(1, "relu", width=8, parameterization="standard").build(seed=0)
    with pytest.raises(ValueError, match="number of input features must be a positive integer, got 0"):
        model(torch.randn(4, 0))
    assert model(torch.randn(4, 3)).shape == (4, 1)   # still deferred: draws now


def test_empirical_ntk_refuses_batch_norm_that_updates_its_running_statistics():
    """The module docstring promised a warning and a kernel; torch.func raised "During a grad (vjp,
    jvp, grad, etc) transform ... would mutate a captured Tensor" from inside the Jacobian."""
    x = torch.randn(5, 3, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).double()
    with pytest.raises(ValueError, match=r"\['BatchNorm1d'\] layers in training mode: they update their running "
                                         r"statistics .* Call model\.eval\(\) first\."):
        empirical_ntk(model, x)
    assert int(model[1].num_batches_tracked) == 0
    assert torch.equal(model[1].running_mean, torch.zeros(8, dtype=torch.float64))
    batch_only = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, track_running_stats=False),
                                     torch.nn.Linear(4, 2)).double()
    with pytest.warns(RuntimeWarning, match="training mode"):   # batch statistics alone: a kernel, with a warning
        assert empirical_ntk(batch_only, x).shape == (5, 5)
    model.eval()
    assert empirical_ntk(model, x).shape == (5, 5)


def test_empirical_kernels_refuse_non_finite_parameters():
    """A NaN in params= gave a finite, meaningless NTK (ReLU's backward zeroes it), and a NaN in the
    module's own parameters NaN kernels: neither was refused, though NaN variances and inputs are."""
    x = torch.randn(4, 3)
    model = ntkgp.mlp(1, "relu", width=8).build(in_features=3, seed=0)
    nan = torch.full_like(model[0].weight, math.nan)
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"params\['0.weight'\] contains NaN or infinite values"):
            kernel(model, x, params={"0.weight": nan})
        with pytest.raises(ValueError, match=r"params\['w'\] contains NaN or infinite values"):
            kernel(lambda p, z: z @ p["w"], x, params={"w": torch.full((3, 2), math.inf)})
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"parameters \['2.weight'\] contain NaN or infinite values"):
            kernel(model, x)
        # a non-finite parameter that params= replaces does not enter the kernel
        assert kernel(model, x, params={"2.weight": torch.ones_like(model[2].weight)}).isfinite().all()


def test_empirical_ntk_with_params_carries_no_gradient_to_the_other_parameters():
    """For a single module the parameters left out of params= were the live ones: the "constant"
    kernel had a graph into them (a gradient of 48.7 on the readout), unlike an ensemble's."""
    x = torch.randn(4, 3)
    for size in (None, 2):
        model = ntkgp.mlp(1, "relu", width=8).build(in_features=3, seed=0, ensemble_size=size)
        ntk = empirical_ntk(model, x, params={"0.weight": model[0].weight.detach()})
        assert not ntk.requires_grad
    model = ntkgp.mlp(1, "relu", width=8).build(in_features=3, seed=0)
    full = empirical_ntk(model, x)
    torch.testing.assert_close(empirical_ntk(model, x, params=dict(model.named_parameters())), full)


def test_empirical_kernels_name_params_of_the_wrong_type_or_dtype():
    """Float64 params for a float32 network failed in the matmul ("expected m1 and m2 to have the same
    dtype"), a numpy array with "no attribute 'detach'", a list of parameters with "Boolean value of
    Tensor ... is ambiguous"."""
    model = ntkgp.mlp(1, "relu", width=8).build(in_features=3, seed=0, dtype=torch.float32)
    x = torch.randn(4, 3, dtype=torch.float32)
    weight = model[0].weight.detach()
    cases = [({"0.weight": weight.double()}, r"params\['0.weight'\] is torch.float64 but the network's parameter "
                                             r"\(and the inputs\) are torch.float32: convert it with "
                                             r"\.to\(torch.float32\)"),
             ({"0.weight": weight.numpy()}, r"params\['0.weight'\] must be a torch.Tensor, got ndarray"),
             ({"0.weight": weight.int()}, r"params\['0.weight'\] must be a floating-point tensor"),
             (list(model.parameters()), "params must be a dict of parameter name -> tensor")]
    for params, message in cases:
        for kernel in (empirical_ntk, empirical_nngp):
            with pytest.raises(ValueError, match=message):
                kernel(model, x, params=params)


def test_empirical_ntk_refuses_parameter_scales_that_are_not_real_numbers():
    """A complex scale failed in torch's comparison ("ge_cpu" not implemented for 'ComplexFloat'), a
    string or None inside torch's conversion."""
    model = ntkgp.mlp(1, "relu", width=8).build(in_features=3, seed=0)
    x = torch.randn(4, 3)
    for scale in (1 + 1j, torch.tensor(2 + 1j), "2", None, True):
        with pytest.raises(ValueError, match=r"parameter_scales\['0.weight'\] must be a non-negative real number"):
            empirical_ntk(model, x, parameter_scales={"0.weight": scale})
    assert empirical_ntk(model, x, parameter_scales={"0.weight": 2}).shape == (4, 4)



def test_empirical_ntk_refuses_parameter_scales_that_are_not_a_dict():
    """One number for all parameters failed as "'float' object is not iterable", a list of rates as
    "cannot convert dictionary update sequence element", a tensor as "Boolean value of Tensor ... is
    ambiguous", and 0 was read as no scales at all (the plain NTK, silently)."""
    model = ntkgp.mlp(1, "relu", width=8).build(in_features=3, seed=0)
    x = torch.randn(4, 3)
    for scales in (0.5, 0, [1.0, 2.0], torch.ones(3), "0.weight"):
        with pytest.raises(ValueError, match=r"^parameter_scales must be a dict of parameter name -> scale"):
            empirical_ntk(model, x, parameter_scales=scales)
    plain = empirical_ntk(model, x)
    torch.testing.assert_close(empirical_ntk(model, x, parameter_scales={}), plain, rtol=0, atol=0)
    torch.testing.assert_close(empirical_ntk(model, x, parameter_scales=None), plain, rtol=0, atol=0)


def test_empirical_kernels_refuse_a_network_without_outputs():
    """A module or function with k = 0 outputs (n, 0): the NNGP's average over no outputs was all NaN,
    silently, and the NTK failed in a reshape ("cannot reshape tensor of 0 elements")."""
    x = torch.randn(5, 3)
    with warnings.catch_warnings():   # torch: "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 0))

    def fn(params, x):
        return x @ params["w"]

    for model, params in ((module, None), (fn, {"w": torch.zeros(3, 0)})):
        for kernel, options in ((empirical_nngp, {}), (empirical_ntk, {}), (empirical_ntk, {"vector_output": True})):
            with pytest.raises(ValueError, match=r"^The network returns no outputs \(shape \(5, 0\)\)"):
                kernel(model, x, params=params, **options)

def test_ensemble_size_names_what_is_not_a_module():
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module .* got NoneType"):
        ensemble_size(None)


def test_a_user_modules_own_ensemble_size_attribute_is_not_read_as_stacked_members():
    """``ensemble_size`` read the attribute of any submodule: a user module storing a setting of that
    name had every parameter mapped over its first axis (a vmap size error, or a matmul one when
    every first axis happened to be 3)."""
    class Configured(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.ensemble_size = 3   # the user's own setting, nothing stacked
            self.l1, self.l2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, out)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    torch.manual_seed(0)
    x1, x2 = torch.randn(6, 4), torch.randn(3, 4)
    for out in (2, 3):
        model = Configured(out).double()
        assert ensemble_size(model) is None
        params = {n: p.detach() for n, p in model.named_parameters()}
        j1 = torch.func.jacrev(lambda q, m=model: functional_call(m, q, (x1,)))(params)
        j2 = torch.func.jacrev(lambda q, m=model: functional_call(m, q, (x2,)))(params)
        reference = sum(torch.einsum("nip,mjp->nmij", j1[n].flatten(2), j2[n].flatten(2)) for n in params)
        torch.testing.assert_close(empirical_ntk(model, x1, x2, vector_output=True), reference, rtol=1e-12, atol=0)
        assert empirical_nngp(model, x1, x2).shape == (6, 3)
    built = ntkgp.mlp(1, "relu", width=8).build(in_features=4, ensemble_size=2, seed=0)
    assert ensemble_size(torch.nn.Sequential(built)) == 2   # ntkgp's members, wrapped, still count


def test_an_ensemble_with_parametrized_dense_layers_is_still_an_ensemble():
    """torch.nn.utils.parametrize makes a DenseModule a class of torch's module (ParametrizedDenseModule):
    with every Dense layer parametrized ensemble_size said None, and both kernels refused the (E, n, k)
    outputs ("must return outputs (n, k) for inputs (n, d)")."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    net = ntkgp.serial(ntkgp.Dense(4, 1.0, 0.1), ntkgp.Erf(), ntkgp.Dense(2, 1.0, 0.1))
    model, plain = net.build(in_features=3, seed=0, ensemble_size=2), net.build(in_features=3, seed=0, ensemble_size=2)
    for i in (0, 2):
        parametrize.register_parametrization(model[i], "weight", Double())
        with torch.no_grad():
            plain[i].weight.mul_(2)
    assert ensemble_size(model) == 2
    x1, x2 = torch.randn(5, 3), torch.randn(4, 3)
    torch.testing.assert_close(empirical_nngp(model, x1, x2), empirical_nngp(plain, x1, x2), rtol=1e-12, atol=1e-12)
    # d/d original = 2 d/d weight: the weights' terms 4x
    reference = empirical_ntk(plain, x1, x2, parameter_scales={"0.weight": 4.0, "2.weight": 4.0})
    torch.testing.assert_close(empirical_ntk(model, x1, x2), reference, rtol=1e-12, atol=1e-12)


def test_no_parameters_to_differentiate_give_a_zero_kernel():
    """A module without parameters, or params={}, has the NTK 0; torch.func's Jacobian of no
    parameters was a pytree error ("'leaves' has length 0 but the spec refers to ... 1 items")."""
    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    linear = torch.nn.Linear(4, 2).double()
    cases = [(torch.nn.Tanh(), {}), (lambda p, x: x.sum(-1, keepdim=True), {"params": {}}), (linear, {"params": {}})]
    for model, kwargs in cases:
        theta = empirical_ntk(model, x1, x2, **kwargs)
        assert theta.shape == (5, 3) and theta.eq(0).all()
        assert empirical_ntk(model, x1, x2, vector_output=True, **kwargs).shape[:2] == (5, 3)
    assert empirical_ntk(linear, x1, vector_output=True, params={}).shape == (5, 5, 2, 2)


def test_a_user_module_named_its_input_shape_before_the_batch_shapes():
    """Images of a user module (only ntkgp's networks take batches) with different point counts were
    "Batch shapes of x1 (5, 1) and x2 (4, 1) do not broadcast", not the (n, d) advice."""
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1)).double()
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"x1 must have shape \(n, d\) here .*nn\.Unflatten"):
            kernel(cnn, torch.randn(5, 1, 8, 8), torch.randn(4, 1, 8, 8))


def test_one_dimensional_inputs_of_a_user_module_keep_the_unsqueeze_hint():
    """The (n, d) advice for batches of a user module's inputs must not take over 1-D inputs, whose
    fix is x.unsqueeze(-1), not flattening images."""
    linear = torch.nn.Linear(3, 1).double()
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"x1 must have shape \(\.\.\., n, d\), got shape \(3,\); for scalar "
                                             r"features use x1\.unsqueeze\(-1\)"):
            kernel(linear, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("activation", [ntkgp.Monomial(0), ntkgp.Hermite(0), ntkgp.Polynomial([0.7])],
                         ids=["monomial0", "hermite0", "constant_polynomial"])
def test_empirical_and_monte_carlo_kernels_of_a_network_with_a_constant_activation(activation):
    """The layer before a constant activation has zero gradient (autograd refused to return it:
    "appears to not have been used in the graph"); the empirical NTK is then the readout's alone,
    ``σ_w² c² + σ_b²`` for the constant ``c``, at any width, equal to the analytic one."""
    from ntkgp.finite.monte_carlo import monte_carlo_kernel

    net = ntkgp.serial(ntkgp.Dense(16, 1.3, 0.2), activation, ntkgp.Dense(1, 1.5, 0.1))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    analytic = net.kernel(x)
    for model in (net.build(2), net.build(2, ensemble_size=2)):
        ntk = empirical_ntk(model.to(torch.float64), x)
        torch.testing.assert_close(ntk, analytic.ntk.expand_as(ntk), rtol=1e-14, atol=0)
    mc = monte_carlo_kernel(net, x, n_samples=4)
    torch.testing.assert_close(mc.ntk, analytic.ntk, rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", ["built", "user"])
def test_empirical_kernels_ignore_a_callers_autocast_as_the_analytic_ones_do(kind):
    """Under CPU bfloat16 autocast the empirical kernels of a float32 network came out in bfloat16,
    4e-3 (NTK) and 9e-3 (NNGP) off their float32 values, while ``net.kernel`` switches autocast off:
    a width sweep compared bfloat16 estimates with float32 limits."""
    net = ntkgp.serial(ntkgp.Dense(64, 1.5, 0.1), ntkgp.ReLU(), ntkgp.Dense(1))
    with torch.random.fork_rng():   # the module's draws leave the global seed as it was
        torch.manual_seed(0)
        model = (net.build(3, dtype=torch.float32) if kind == "built" else
                 torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).float())
    x = torch.randn(5, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    for kernel in (empirical_ntk, empirical_nngp):
        expected = kernel(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = kernel(model, x)
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_vector_output_nngp_is_the_outer_product_of_the_outputs_in_i_j_order():
    """empirical_nngp(vector_output=True) is K[n, m, i, j] = f_i(x_n) f_j(x'_m) (module docstring), checked
    against the network's own outputs on two different input sets (where the (i, j) order matters), and
    its per-output form against (1/k) sum_i K[n, m, i, i]."""
    net = ntkgp.serial(ntkgp.Dense(12, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(3, 1.5, 0.1))
    model = net.build(in_features=2, seed=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    x2 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f1, f2 = model(x1), model(x2)                                   # (4, 3), (5, 3)
    expected = f1[:, None, :, None] * f2[None, :, None, :]              # [n, m, i, j] = f_i(x_n) f_j(x'_m)
    got = empirical_nngp(model, x1, x2, vector_output=True)
    assert got.shape == (4, 5, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(empirical_nngp(model, x1, x2), (f1 @ f2.T) / 3, rtol=1e-14, atol=1e-15)
    # an ensemble: one kernel per member, each the outer product of that member's outputs
    ens = net.build(in_features=2, seed=4, ensemble_size=2, dtype=torch.float64)
    with torch.no_grad():
        e1, e2 = ens(x1), ens(x2)                                       # (2, 4, 3), (2, 5, 3)
    torch.testing.assert_close(empirical_nngp(ens, x1, x2, vector_output=True),
                               e1[:, :, None, :, None] * e2[:, None, :, None, :], rtol=1e-14, atol=1e-15)


def test_empirical_ntk_of_a_torch_lazy_module_draws_it_first():
    """A LazyLinear's parameters were passed on uninitialized ("Attempted to use an uninitialized
    parameter"); they are drawn first, as ntkgp's deferred Dense layers are, and the kernel is J Jᵀ."""
    model = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = empirical_ntk(model, x)
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: functional_call(model, p, (x,)).squeeze(-1))(params)
    j = torch.cat([v.reshape(4, -1) for v in jac.values()], 1)
    torch.testing.assert_close(kernel, j @ j.T, rtol=1e-12, atol=1e-12)


def test_empirical_kernels_refuse_kernels_that_overflow_as_net_kernel_does():
    """float32 inputs of magnitude 1e20 (squared norms near 1e40 > 3.4e38) or float16 ones of a few
    hundred overflow the kernels: net.kernel and monte_carlo_kernel raised NonFiniteKernelError,
    and the empirical kernels returned inf and NaN, silently, on either NTK route and for ensembles.
    The error says what overflowed. At 1e15 (kernels near 1e30) they are finite, and the ReLU
    network without biases is homogeneous, so both kernels are 1e30 times those of the unscaled
    inputs, to float32 rounding through the network: 8e-7 of the largest entry seen, 1e-5 allowed."""
    from ntkgp.layers.base import NonFiniteKernelError

    net = ntkgp.serial(ntkgp.Dense(64, 2.0), ntkgp.ReLU(), ntkgp.Dense(1, 1.5))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    torch_net = torch.nn.Sequential(torch.nn.Linear(3, 64, bias=False), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1, bias=False)).float()
    with torch.no_grad():   # standard normal weights: outputs of ~10 |x|
        for layer in (torch_net[0], torch_net[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(1)))
    models = [net.build(in_features=3, seed=0, dtype=torch.float32), torch_net,   # layer by layer, Jacobian
              net.build(in_features=3, seed=0, dtype=torch.float32, ensemble_size=2)]
    for model in models:
        for kernel, name, what in ((empirical_nngp, "NNGP", "their products"),
                                   (empirical_ntk, "NTK", "their gradients or the sums of their products")):
            message = (rf"^The empirical {name} kernel is not finite in torch\.float32: the network's outputs are "
                       rf"finite, {what} overflow it \(inputs of magnitude up to 2\.\d+e\+20\)\..*or use float64")
            with pytest.raises(NonFiniteKernelError, match=message):
                kernel(model, x * 1e20)
            unscaled = kernel(model, x)
            torch.testing.assert_close(kernel(model, x * 1e15) / 1e30, unscaled, rtol=0,
                                       atol=1e-5 * float(unscaled.abs().max()))
    with pytest.raises(NonFiniteKernelError, match=r"NTK kernel is not finite in torch\.float32"):
        empirical_ntk(models[0], x * 1e20, vector_output=True)
    with pytest.raises(NonFiniteKernelError, match=r"in torch\.float64: .*Scale the inputs down; a network") as info:
        empirical_nngp(net.build(in_features=3, seed=0, dtype=torch.float64), x.double() * 1e160)
    assert "use float64" not in str(info.value)


@needs_cpu_half_products
def test_empirical_kernels_refuse_float16_kernels_that_overflow():
    """The float16 half of the test above: inputs of a few hundred overflow the kernel, of 3e4 the outputs."""
    from ntkgp.layers.base import NonFiniteKernelError

    net = ntkgp.serial(ntkgp.Dense(64, 2.0), ntkgp.ReLU(), ntkgp.Dense(1, 1.5))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    half = net.build(in_features=3, seed=0, dtype=torch.float16)
    with pytest.raises(NonFiniteKernelError, match=r"NTK kernel is not finite in torch\.float16"):
        empirical_ntk(half, x.half() * 250)
    for kernel in (empirical_nngp, empirical_ntk):
        with pytest.raises(NonFiniteKernelError, match=r"float16: the network's outputs overflow it"):
            kernel(half, x.half() * 3e4)


def test_a_shapes_only_build_does_no_arithmetic_on_the_meta_device():
    """train_ensemble and the comparison harness build networks on the meta device for their shapes.
    Arithmetic there (σ_w²/n, its root, a standard-parameterized draw times σ) ran torch's Python
    reference implementations, which imported torch._dynamo (0.5-1.6 s, once a process) and left the
    modules in reference cycles with their frames. In a fresh interpreter: neither, and the shapes are
    those of the real build."""
    import subprocess
    import sys

    code = (
        "import gc, sys, torch, ntkgp\n"
        "from ntkgp.layers.dense import DenseModule\n"
        "nets = [ntkgp.mlp(2, 'relu', 2.0, 0.1, width=16, parameterization=p) for p in ('ntk', 'standard')]\n"
        "nets.append(ntkgp.serial(ntkgp.Dense(8, ard_num_dims=3, parameterization='standard'), ntkgp.LayerNorm(),\n"
        "                         ntkgp.GELU(), ntkgp.Dense(2)))\n"
        "gc.collect(); gc.disable()\n"
        "for net in nets:\n"
        "    meta = net.build(in_features=3, seed=0, dtype=torch.float64, device='meta')\n"
        "    real = net.build(in_features=3, seed=0, dtype=torch.float64)\n"
        "    assert [p.shape for p in meta.parameters()] == [p.shape for p in real.parameters()]\n"
        "    del meta, real\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "assert not any(type(o) is DenseModule for o in gc.get_objects())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_equivalent_learning_rates_of_an_ard_layer_scale_each_input_row():
    """With per-feature variances ``σ_j²`` the standard weight ``W̃_jk ~ N(0, σ_j²/n)`` trains at
    ``η σ_j²/n``: row ``j`` of the rate (the weight is ``(in, out)``), here with ``in = out`` so that
    a rate broadcast along the output axis instead has the right shape and the wrong values; the
    bias trains at ``η σ_b²``. By hand, and the rate-weighted tangent kernel is the NTK twin's."""
    variances = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    net = ntkgp.serial(ntkgp.Dense(3, variances, 0.3, parameterization="standard", ard_num_dims=3), ntkgp.Erf(),
                       ntkgp.Dense(1, 1.5, None, parameterization="standard"))
    model = net.build(in_features=3, seed=1, dtype=torch.float64)
    rates = equivalent_learning_rates(model, 0.2)
    expected = (0.2 * variances / 3).unsqueeze(-1).expand(3, 3)
    torch.testing.assert_close(torch.as_tensor(rates["0.weight"]).expand(3, 3), expected, rtol=1e-15, atol=0)
    assert rates["0.bias"] == pytest.approx(0.2 * 0.3, rel=1e-15)
    assert float(rates["2.weight"]) == pytest.approx(0.2 * 1.5 / 3, rel=1e-15)
    twin = ntkgp.finite.ntk_parameterized(net).build(in_features=3, seed=1, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(empirical_ntk(model, x, parameter_scales=equivalent_learning_rates(model, 1.0)),
                               empirical_ntk(twin, x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_kernels_larger_than_the_memory_are_refused_before_the_network_runs(monkeypatch, kernel):
    """An ensemble's kernel of more values than the device holds (4 members x 300 x 200 float64 values,
    1.8 MiB, against 1 MiB here; 100 000 points need 149 GiB in float32 for such an ensemble) is
    refused with the sizes before the network is called: it failed in torch's allocator only after
    the outputs and layer signals were formed, or (just above the free memory) was killed by the
    operating system. A kernel that fits is computed as before."""
    from ntkgp.layers.dense import DenseModule

    model = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8).build(3, seed=0, ensemble_size=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (300, 200))
    fn = empirical_nngp if kernel == "nngp" else empirical_ntk
    expected = fn(model, x1[:150], x2)
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 1 << 20)
    forward = DenseModule.forward
    monkeypatch.setattr(DenseModule, "forward", lambda *args: pytest.fail("the network ran"))
    with pytest.raises(torch.cuda.OutOfMemoryError, match=rf"empirical {kernel.upper()} kernel \(4 x 300 x 200, in "
                                                          r"torch\.float64\) needs 0\.00179 GiB on cpu"):
        fn(model, x1, x2)
    monkeypatch.setattr(DenseModule, "forward", forward)
    torch.testing.assert_close(fn(model, x1[:150], x2), expected, rtol=0, atol=0)   # 0.9 MiB: computed


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_a_module_that_combines_an_ensemble_s_members_is_checked_for_memory_as_one_kernel(monkeypatch, kernel):
    """A module of the user's that makes its outputs of 4 members' (their mean) has one (300, 200) kernel, 0.46 MiB:
    counted per member before the outputs were seen, it was refused as "4 x 300 x 200 ... needs 0.00179 GiB"
    against 1 MiB. It is computed, as without the limit; outputs per member are still refused, as 4 kernels."""
    model = ntkgp.mlp(1, "relu", 2.0, 0.01, width=8).build(3, seed=0, ensemble_size=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (300, 200))
    fn = empirical_nngp if kernel == "nngp" else empirical_ntk
    mean = _Around(model, lambda f: f.mean(0))
    expected = fn(mean, x1, x2)
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 1 << 20)
    torch.testing.assert_close(fn(mean, x1, x2), expected, rtol=0, atol=0)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=rf"empirical {kernel.upper()} kernel \(4 x 300 x 200, in "
                                                          r"torch\.float64\) needs 0\.00179 GiB on cpu"):
        fn(_Around(model, lambda f: f.squeeze(-1)), x1, x2)


def _jacobian_reference(model, x1, x2, vector_output):
    """Σ_p ∂f(x1)/∂θ_p ∂f(x2)/∂θ_p over every (stacked) parameter by torch.func.jacrev: a member's outputs
    depend on its own slice of the stacked parameters only, so the sum is each member's kernel."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    j1 = torch.func.jacrev(lambda q: functional_call(model, q, (x1,)))(params)
    j2 = torch.func.jacrev(lambda q: functional_call(model, q, (x2,)))(params)
    total = 0
    for name, p in params.items():
        a, b = j1[name].flatten(j1[name].dim() - p.dim()), j2[name].flatten(j2[name].dim() - p.dim())
        total = total + (torch.einsum("...nip,...mjp->...nmij", a, b) if vector_output
                         else torch.einsum("...nip,...mip->...nm", a, b) / a.shape[-2])
    return total


@pytest.mark.parametrize("ensemble", [None, 3])
def test_the_layer_by_layer_sum_in_blocks_of_rows_is_the_jacobian_s(monkeypatch, ensemble):
    """Blocks of 2 rows (5 points: a shorter last block) for x1 = x2, x1 != x2 and the full k x k
    kernel, LayerNorm, GELU and a standard-parameterized readout of 3 outputs: the Σ_p J Jᵀ of jacrev
    over every parameter to rounding (1e-13 relative; one piece agrees to 3e-16)."""
    from ntkgp.finite import empirical

    monkeypatch.setattr(empirical, "_BLOCK_ROWS", 2, raising=False)
    net = ntkgp.serial(ntkgp.Dense(16, 1.5, 0.1), ntkgp.LayerNorm(), ntkgp.GELU(), ntkgp.Dense(16, 2.0),
                       ntkgp.Erf(), ntkgp.Dense(3, 1.0, 0.2, "standard"))
    model = net.build(4, seed=1, ensemble_size=ensemble, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    for a, b in ((x1, None), (x1, x2), (x2, x1)):
        for vector_output in (False, True):
            expected = _jacobian_reference(model, a, a if b is None else b, vector_output)
            got = empirical_ntk(model, a, b, vector_output=vector_output)
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13 * float(expected.abs().max()))


@pytest.mark.fresh_process
def test_the_layer_by_layer_ntk_holds_the_kernel_and_a_few_blocks():
    """Each layer's u·u' and δ·δ' and the running sum were three kernel-sized matrices at once: 92.8 MiB
    above the start for the 30.5 MiB kernel of 2000 points (float64, width 16: signals of 0.25 MiB a
    layer); in blocks of an eighth of the rows, 38.0 MiB."""
    from conftest import peak_above_current

    model = ntkgp.mlp(2, "relu", 2.0, 0.01, width=16).build(3, seed=0, dtype=torch.float64)
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    empirical_ntk(model, x[:5])   # one-time buffers
    result = []
    peak = peak_above_current(lambda: result.append(empirical_ntk(model, x)))
    kernel = 2000 * 2000 * 8 / 2**20
    assert peak < 1.6 * kernel, peak / kernel
