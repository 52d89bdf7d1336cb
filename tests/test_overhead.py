"""Small kernel calls (benchmarks/overhead.py): the shortcuts that cut their fixed cost change no
value, gradient or error, and nothing about the network is kept from one call to the next."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import ntkgp
from ntkgp.layers import base, numerics, validation


def _inputs(n: int = 6, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_kernel_calls_without_autograd_skip_function_apply(monkeypatch):
    """torch's ``Function.apply`` binds ``forward``'s signature (``inspect.signature``, ~8 µs) at every
    call of a function with a ``setup_context``. Where no derivative is taken ``safe_sqrt`` and
    ``straight_through`` run their ``forward`` alone; with a graph they still go through ``apply``."""
    applied = []
    for function in (numerics._SafeSqrt, numerics._StraightThrough):
        real = function.apply
        monkeypatch.setattr(function, "apply", lambda *args, _real=real, _name=function.__name__:
                            applied.append(_name) or _real(*args))
    net = ntkgp.mlp(3, "relu", 2.0, 0.1).double()
    # in [0, 1]³, as BoTorch's Normalize leaves inputs: nearly parallel pairs take the carried path, whose
    # square roots run without autograd too (3 here; standard-normal points take none)
    x = _inputs().abs().clamp(max=1)
    x2 = _inputs(4).abs().clamp(max=1)
    with torch.no_grad():
        net.kernel(x, x2)
    assert applied == []
    x2[0] = x[1]   # equal points: their entries take straight_through's values
    state = net.kernel(x.requires_grad_(True), x2)
    (state.nngp.sum() + state.ntk.sum()).backward()
    assert set(applied) == {"_SafeSqrt", "_StraightThrough"}


def test_safe_sqrt_and_straight_through_without_a_graph_match_function_apply_bitwise():
    """Their ``forward`` alone gives ``Function.apply``'s values; with a derivative taken (reverse,
    forward mode, ``torch.func`` transforms) they are ``Function.apply`` itself."""
    x = torch.tensor([-1.0, 0.0, -0.0, 1e-300, 0.3, 2.0, math.inf, math.nan], dtype=torch.float64)
    with torch.no_grad():
        for fast, plain in [(numerics.safe_sqrt(x), numerics._SafeSqrt.apply(x)),
                            (numerics.straight_through(x * 2, x ** 2), numerics._StraightThrough.apply(x * 2, x ** 2))]:
            assert fast.shape == plain.shape and fast.dtype == plain.dtype
            assert torch.equal(fast.nan_to_num(7.0), plain.nan_to_num(7.0))
            assert torch.equal(fast.signbit(), plain.signbit())
    weights = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    x = x[:6].clone().requires_grad_(True)
    assert torch.autograd.grad((numerics.safe_sqrt(x) * weights[:6]).sum(), x)[0].isfinite().all()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), weights[:6])
        tangent = torch.autograd.forward_ad.unpack_dual(numerics.safe_sqrt(dual)).tangent
    root = x.detach().clamp(min=0).sqrt()
    assert torch.equal(tangent, torch.where(root > 0, weights[:6] / (2 * torch.where(root > 0, root, 1.0)), 0.0))
    unit = torch.where(root > 0, 1 / (2 * torch.where(root > 0, root, 1.0)), 0.0)
    assert torch.equal(torch.func.jacfwd(numerics.safe_sqrt)(x.detach()), torch.diag(unit))


def test_a_kernel_call_walks_the_layers_variances_once(monkeypatch):
    """The check of the variances and the batch size read one walk over the layers (each took
    ~16 µs on a depth-3 ``mlp``, against ~700 µs for the whole call)."""
    walks = []
    real = base.variances
    monkeypatch.setattr(base, "variances", lambda layer: walks.append(layer) or real(layer))
    net = ntkgp.mlp(3, "relu", 2.0, 0.1).double()
    net.kernel(_inputs())
    assert len(walks) == 1


def test_a_layer_that_checks_its_variances_itself_is_still_asked():
    """The shared walk is the base class's check; a layer's own ``check_variances`` runs as before."""
    class Checked(ntkgp.Dense):
        def check_variances(self, x1, x2=None):
            raise ValueError("checked by the layer")

    with pytest.raises(ValueError, match="checked by the layer"):
        Checked(4, 2.0, 0.1).kernel(_inputs())


@pytest.mark.parametrize("change", ["initialize", "raw data", "set", "tree", "double", "state_dict"])
def test_kernels_follow_every_change_of_the_network(change):
    """Nothing read from the network is kept between calls: after each way of changing it (GPyTorch's
    ``initialize``, which writes ``raw.data`` in place without a version bump; a new value; a
    replaced layer; ``.double()``; ``load_state_dict``) a kernel equals, bitwise, that of a network
    built with the new settings from the start, and a NaN written into ``raw.data`` is refused."""
    x = _inputs()
    net = ntkgp.mlp(2, "relu", 2.0, 0.1)
    kernel = ntkgp.NTKKernel(net)
    net.kernel(x.float())   # a first call, as if anything were kept from it
    kernel(x.float()).to_dense()
    expected = ntkgp.mlp(2, "relu", 2.0, 0.1)   # changed as net is, but never called before
    if change == "initialize":
        for k in (kernel, ntkgp.NTKKernel(expected)):
            k.initialize(**{"net.layers.0.raw_weight_var": 0.5})
    elif change == "raw data":
        net[2].raw_bias_var.data.fill_(float("nan"))
        with pytest.raises(base.NonFiniteVarianceError, match=r"layers\.2\.bias_var"):
            net.kernel(x.float())
        with pytest.raises(base.NonFiniteVarianceError):
            kernel(x.float()).to_dense()
        return
    elif change == "set":
        net[0].weight_var = expected[0].weight_var = 3.0
    elif change == "tree":
        net.layers[1] = ntkgp.Erf()
        expected.layers[1] = ntkgp.Erf()
        assert not torch.equal(net.kernel(x).ntk, ntkgp.mlp(2, "relu", 2.0, 0.1).kernel(x).ntk)
    elif change == "double":
        kernel.double()
        expected.double()
        assert net.kernel(x).ntk.dtype == torch.float64
    else:
        expected = ntkgp.mlp(2, "relu", 1.3, 0.4)
        net.load_state_dict(expected.state_dict())
    for inputs in (x, x.float()):
        assert torch.equal(net.kernel(inputs).ntk, expected.kernel(inputs).ntk)
        assert torch.equal(kernel(inputs).to_dense(), ntkgp.NTKKernel(expected)(inputs).to_dense())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_all_finite_reads_small_tensors_as_large_ones(dtype, bad):
    """Up to ``_SMALL`` entries ``isfinite(x).all()`` answers (two operations); beyond, the smallest
    and largest entry (``aminmax``, no temporaries): the same answer for every value and dtype."""
    for n in (1, 7, validation._SMALL, validation._SMALL + 1):
        x = torch.linspace(-3, 3, n, dtype=dtype)
        if bad is not None:
            x[n // 2] = bad
        assert validation.all_finite(x) is (bad is None)
        assert validation.all_finite(x.requires_grad_(True)) is (bad is None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_representable_screens_variances_stacked_as_one_at_a_time(dtype):
    """The screen of the carried pairs' variances (one stack and one reduction where they share a shape
    and dtype, one mask at a time otherwise) keeps a pair exactly when every variance is in
    ``[16 sqrt(tiny), sqrt(max)/16]``: bounds themselves kept, just outside, 0, inf and NaN dropped."""
    from ntkgp.layers import near

    low, high = numerics.product_range(dtype)
    info = torch.finfo(dtype)
    values = torch.tensor([1.0, low, high, 0.0, float("inf"), float("nan"), 2.0, 3.0], dtype=dtype)
    values = torch.cat([values, torch.tensor([low, high], dtype=dtype) * torch.tensor([1 - info.eps, 1 + info.eps],
                                                                                      dtype=dtype)])
    inside = (values >= low) & (values <= high)
    assert inside.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 2
    shuffled = values.flip(0)
    expected = inside & inside.flip(0)
    for variances in [(values,), (values, shuffled), (values, shuffled, values.roll(1), values.roll(2))]:
        masks = [(v >= low) & (v <= high) for v in variances]
        want = masks[0]
        for mask in masks[1:]:
            want = want & mask
        assert torch.equal(near.representable(*variances), want)
    assert torch.equal(near.representable(values, shuffled), expected)
    # unlike shapes (a scalar beside the pairs): broadcast into the first one's mask, as before
    assert torch.equal(near.representable(values, torch.tensor(1.0, dtype=dtype)), inside)


def _guarded_sqrt_derivative(change: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``safe_sqrt``'s derivative as it was always formed (the guarded quotient): the reference."""
    positive = root > 0
    return torch.where(positive, change / (2 * torch.where(positive, root, torch.ones_like(root))), 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_safe_sqrt_backward_skips_the_guard_only_where_it_is_not_differentiated(monkeypatch, dtype):
    """A backward pass without ``create_graph`` forms ``safe_sqrt``'s derivative as the plain quotient
    selected where ``root > 0``, in one temporary (no guarded copy of ``root`` and its ones: that node
    took ~8 % of a depth-3 NTK's marginal-likelihood step at 500 points), which changes no bit;
    differentiated itself (second derivatives) it keeps the guard, without which the unselected
    quotient's derivative is NaN."""
    x = torch.tensor([-1.0, 0.0, -0.0, 1e-300, 0.3, 2.0, math.inf, math.nan], dtype=torch.float64).to(dtype)
    change = torch.tensor([1.5, -2.0, 3.0, 0.7, -0.4, 1e30, 2.0, 1.0], dtype=dtype)
    root = x.clamp(min=0).sqrt()
    fast = numerics._sqrt_derivative(change, root)
    reference = _guarded_sqrt_derivative(change, root)
    assert torch.equal(fast.nan_to_num(7.0), reference.nan_to_num(7.0))
    assert torch.equal(fast.signbit(), reference.signbit())
    spread = torch.tensor(1.5, dtype=dtype).expand(8)   # the gradient of a sum reaches a node expanded
    assert torch.equal(numerics._sqrt_derivative(spread, root), _guarded_sqrt_derivative(spread, root))

    # the derivatives of a kernel to every variance and to both inputs, bitwise against the guarded form
    net = ntkgp.mlp(3, "relu", 2.0, 0.1).to(dtype)
    x1 = _inputs(12, dtype)
    x1[3] = 0.0      # a zero input: its angle's square roots are 0
    x1[5] = x1[2]    # a duplicate: the self pairs' determinant is exactly 0

    def gradients() -> list[torch.Tensor]:
        inputs = x1.clone().requires_grad_(True)
        state = net.kernel(inputs, inputs[:7].detach().clone().requires_grad_(True))
        weights = torch.linspace(0.5, 1.5, state.nngp.numel(), dtype=dtype).reshape(state.nngp.shape)
        return list(torch.autograd.grad((state.nngp * weights).sum() + (state.ntk * weights.flip(0)).sum(),
                                        [inputs, *net.parameters()]))

    guards = []
    real_ones_like = torch.ones_like

    def ones_like(*args, **kwargs):
        guards.append(sys._getframe(1).f_code.co_name == "_sqrt_derivative")
        return real_ones_like(*args, **kwargs)

    monkeypatch.setattr(torch, "ones_like", ones_like)
    new = gradients()
    assert not any(guards)   # the guard is not formed in a plain backward pass
    monkeypatch.setattr(numerics, "_sqrt_derivative", _guarded_sqrt_derivative)
    old = gradients()
    assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))

    # second derivatives still go through the guard: finite at root = 0
    monkeypatch.undo()
    point = torch.tensor([0.0, 0.25], dtype=dtype, requires_grad=True)
    (first,) = torch.autograd.grad((numerics.safe_sqrt(point) * torch.tensor([1.0, 3.0], dtype=dtype)).sum(), point,
                                   create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), point)
    assert first.tolist() == [0.0, 3.0] and second[0] == 0 and second[1] == -6.0   # d²/dx² 3 sqrt(x) = -3/(4 x^1.5)
