"""``diag=True`` of the empirical kernels and of ``monte_carlo_kernel`` (neural-tangents'
``diagonal_axes=(0,)``): ``K̂(x1_i, x2_i)`` alone, equal to the full kernel's diagonal, in ``O(n)``
memory."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import peak_above_current
from torch import Tensor, nn
from torch.func import functional_call

import ntkgp
from ntkgp.finite import empirical_nngp, empirical_ntk, monte_carlo_kernel
from ntkgp.layers.base import NonFiniteKernelError

pytestmark = pytest.mark.usefixtures("float64_default")

#: float64: the diagonal and the full kernel sum the same products in another order (rounding only).
RTOL = 1e-12


def _net(param: str = "ntk", k: int = 2) -> ntkgp.Layer:
    """Erf, a parallel pair of Dense layers, LayerNorm and ReLU: every kind of layer the layer-by-layer
    route handles."""
    return ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1, param), ntkgp.Erf(),
                        ntkgp.parallel(ntkgp.Dense(8, 1.0, 0.2, param), ntkgp.Dense(8, 1.5, None, param)),
                        ntkgp.LayerNorm(), ntkgp.ReLU(), ntkgp.Dense(k, 1.5, 0.1, param))


def _diagonal(full: Tensor, vector_output: bool) -> Tensor:
    """The pairs ``(x1_i, x2_i)`` of a full kernel: ``(..., n)``, or ``(..., n, k, k)`` from ``(..., n, n, k, k)``."""
    if vector_output:
        return torch.diagonal(full, dim1=-4, dim2=-3).movedim(-1, -3)
    return torch.diagonal(full, dim1=-2, dim2=-1)


def _assert_diag_is_the_diagonal(model, x1, x2, rtol=RTOL, **kwargs):
    """Both kernels, per output unit and with ``vector_output``: ``diag=True`` equals the full kernel's
    diagonal (the comparison is relative to the largest entry: rounding of sums of products)."""
    for kernel in (empirical_nngp, empirical_ntk):
        extra = kwargs if kernel is empirical_ntk else {k: v for k, v in kwargs.items() if k == "params"}
        for vector_output in (False, True):
            full = kernel(model, x1, x2, vector_output=vector_output, **extra)
            diag = kernel(model, x1, x2, vector_output=vector_output, diag=True, **extra)
            expected = _diagonal(full, vector_output)
            assert diag.shape == expected.shape, (kernel.__name__, vector_output)
            assert diag.dtype == x1.dtype
            torch.testing.assert_close(diag, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))
            assert float(expected.abs().max()) > 0   # a comparison of zeros would prove nothing


def _no_jacobian(*args, **kwargs):
    raise AssertionError("the layer-by-layer route was expected")


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("members", [None, 3])
@pytest.mark.parametrize("cross", [False, True])
def test_diag_is_the_diagonal_on_the_layer_by_layer_route(monkeypatch, param, members, cross):
    import ntkgp.finite.empirical as empirical

    model = _net(param).build(in_features=3, seed=0, ensemble_size=members)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, 3, generator=g)
    x2 = torch.randn(5, 3, generator=g) if cross else None
    monkeypatch.setattr(empirical, "jacrev", _no_jacobian)   # networks built by ntkgp take the fast route
    _assert_diag_is_the_diagonal(model, x1, x2)
    lead = () if members is None else (3,)
    assert empirical_ntk(model, x1, x2, diag=True).shape == (*lead, 5)
    assert empirical_ntk(model, x1, x2, diag=True, vector_output=True).shape == (*lead, 5, 2, 2)


def test_diag_is_the_diagonal_for_batches_of_inputs():
    """Batches ``(2, n, d)`` (the layer-by-layer route takes them), against ``x2`` of one set ``(n, d)``
    (broadcast) and of a batch: ``(2, n)``; an ensemble's member axis ``(E, n, d)`` too."""
    model = _net().build(in_features=3, seed=2)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(2, 4, 3, generator=g)
    for x2 in (None, torch.randn(4, 3, generator=g), torch.randn(2, 4, 3, generator=g)):
        _assert_diag_is_the_diagonal(model, x1, x2)
        assert empirical_ntk(model, x1, x2, diag=True).shape == (2, 4)
    ensemble = _net().build(in_features=3, seed=2, ensemble_size=3)
    per_member = torch.randn(3, 4, 3, generator=g)
    _assert_diag_is_the_diagonal(ensemble, per_member, None)
    assert empirical_nngp(ensemble, per_member, diag=True).shape == (3, 4)


def test_diag_is_the_diagonal_with_parameter_scales():
    """Numbers and per-input-feature columns (layer by layer) and an elementwise tensor (the Jacobian
    route), in a standard-parameterized network, where the scales are learning-rate ratios."""
    model = _net("standard").build(in_features=3, seed=4)
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    column = torch.rand(3, 1, generator=g) + 0.5             # (in, 1): one rate per input feature
    elementwise = torch.rand(3, 16, generator=g) + 0.5       # one per weight: the Jacobian route
    second = torch.rand(16, 1, generator=g) + 0.5
    for scales in ({"0.weight": 0.3, "5.bias": 2.0},
                   {"0.weight": column, "2.branches.0.weight": 0.5, "2.branches.1.weight": second},
                   {"0.weight": elementwise}):
        for x2_ in (None, x2):
            _assert_diag_is_the_diagonal(model, x1, x2_, parameter_scales=scales)
    # the scales act on the diagonal: per-feature rates on the first layer change every point's entry
    plain = empirical_ntk(model, x1, diag=True)
    scaled = empirical_ntk(model, x1, diag=True, parameter_scales={"0.weight": column})
    assert bool((scaled != plain).all())


def test_diag_is_the_diagonal_on_the_jacobian_route():
    """A plain ``nn.Sequential`` (with torch's LayerNorm), a function ``f(params, x)`` with ``params=``,
    a built ensemble given ``params=`` (vmapped members, ``chunk_size``) and a user module around an
    ensemble: ``diag`` contracts each point's Jacobian with its partner's."""
    import ntkgp.finite.empirical as empirical

    g = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2))
    params = {name: p.detach() for name, p in sequential.named_parameters()}

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(sequential, p, (x,))

    calls = []
    original = empirical.jacrev

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    empirical.jacrev = counted
    try:
        for x2_ in (None, x2):
            _assert_diag_is_the_diagonal(sequential, x1, x2_)
            _assert_diag_is_the_diagonal(f, x1, x2_, params=params)
        assert calls   # the Jacobian route ran
        ensemble = _net().build(in_features=3, seed=7, ensemble_size=3)
        members = dict(ensemble.named_parameters())
        for x2_ in (None, x2):
            _assert_diag_is_the_diagonal(ensemble, x1, x2_, params=members, chunk_size=2)
            wrapped = nn.Sequential(ensemble, nn.Tanh())
            _assert_diag_is_the_diagonal(wrapped, x1, x2_)
            assert empirical_ntk(wrapped, x1, x2_, diag=True).shape == (3, 5)
    finally:
        empirical.jacrev = original


def test_diag_is_the_diagonal_in_float32():
    """float32 on both routes: the same products summed in another order, so the difference is
    rounding of sums of ~100 float32 terms (eps 6e-8): 1e-5 of the largest entry."""
    model = _net().build(in_features=3, seed=8, dtype=torch.float32, ensemble_size=2)
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).float()
    g = torch.Generator().manual_seed(9)
    x1, x2 = torch.randn(5, 3, generator=g).float(), torch.randn(5, 3, generator=g).float()
    for m in (model, sequential):
        for x2_ in (None, x2):
            _assert_diag_is_the_diagonal(m, x1, x2_, rtol=1e-5)


@pytest.mark.parametrize("bytes_", [1, 3000])
def test_diag_in_blocks_of_points_is_the_diagonal(monkeypatch, bytes_):
    """Both routes form the diagonal a block of points at a time (``DIAG_SIGNAL_BYTES`` of layer signals,
    ``DIAG_JACOBIAN_BYTES`` of per-point Jacobians): blocks of one point, and of a few with a shorter
    last one, give the full kernel's diagonal, for batches, ensembles, ``x2`` and ``vector_output``."""
    import ntkgp.finite.empirical as empirical

    monkeypatch.setattr(empirical, "DIAG_SIGNAL_BYTES", bytes_)
    monkeypatch.setattr(empirical, "DIAG_JACOBIAN_BYTES", 100 * bytes_)
    g = torch.Generator().manual_seed(15)
    x1, x2 = torch.randn(2, 7, 3, generator=g), torch.randn(7, 3, generator=g)
    model = _net().build(in_features=3, seed=16)
    for x2_ in (None, x2):
        _assert_diag_is_the_diagonal(model, x1, x2_)
    ensemble = _net().build(in_features=3, seed=16, ensemble_size=3)
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    for x2_ in (None, x2):
        _assert_diag_is_the_diagonal(ensemble, x1[0], x2_)
        _assert_diag_is_the_diagonal(ensemble, x1[0], x2_, params=dict(ensemble.named_parameters()))
        _assert_diag_is_the_diagonal(sequential, x1[0], x2_)


class _CheckedTanh(nn.Module):
    """tanh of inputs up to 1e3, refusing others with Python control flow on their values (what
    ``torch.func.vmap`` cannot map: "vmap: It looks like you're ... using a Tensor in some data-dependent
    control flow"); each point's outputs are its own."""

    def forward(self, x: Tensor) -> Tensor:
        if bool((x.abs() > 1e3).any()):
            raise ValueError("inputs out of range")
        return torch.tanh(x)


@pytest.mark.parametrize("bytes_", [1, 1 << 26])
def test_diag_on_the_jacobian_route_of_modules_that_cannot_be_vmapped_over_points(monkeypatch, bytes_):
    """Modules whose full kernel the Jacobian route forms (``jacrev`` maps the cotangents, never the
    module's calls) but that a per-point ``vmap`` cannot map failed with ``diag=True`` only: Python
    control flow on the values (vmap's "data-dependent control flow" error), and batch norm in training
    mode without running statistics (torch's "Expected more than 1 value per channel when training", for
    a point called alone; the full kernel's warning is kept). Both give the full kernel's diagonal, in
    blocks of rows of one point (``bytes_`` = 1) and of all of them."""
    import ntkgp.finite.empirical as empirical

    monkeypatch.setattr(empirical, "DIAG_JACOBIAN_BYTES", bytes_)
    g = torch.Generator().manual_seed(21)
    x1, x2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.manual_seed(0)
    checked = nn.Sequential(nn.Linear(3, 8), _CheckedTanh(), nn.Linear(8, 2))
    batch_norm = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                               nn.Linear(8, 2))
    for x2_ in (None, x2):
        _assert_diag_is_the_diagonal(checked, x1, x2_)
        with pytest.warns(RuntimeWarning, match="training mode"):   # batch statistics, as for the full kernel
            _assert_diag_is_the_diagonal(batch_norm, x1, x2_)
    with pytest.raises(ValueError, match=r"^inputs out of range$"):   # the module's own errors still come through
        empirical_ntk(checked, x1 * 1e6, diag=True)


def test_diag_without_points_or_parameters_is_zeros_of_the_diagonal_s_shape():
    model = _net().build(in_features=3, seed=10, ensemble_size=2)
    x = torch.randn(4, 3)
    assert torch.equal(empirical_ntk(model, x, diag=True, params={}), torch.zeros(2, 4))
    assert torch.equal(empirical_ntk(model, x, diag=True, params={}, vector_output=True), torch.zeros(2, 4, 2, 2))
    assert torch.equal(empirical_ntk(model, x[:0], diag=True), torch.zeros(2, 0))
    assert torch.equal(empirical_nngp(model, x[:0], x[:0], diag=True), torch.zeros(2, 0))
    frozen = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3,)))   # no parameters at all
    assert torch.equal(empirical_ntk(frozen, x, diag=True), torch.zeros(4))


def test_diag_refuses_kernels_that_overflow():
    """The non-finite check applies to the diagonal as to the kernel (float32 inputs of magnitude 1e20)."""
    model = ntkgp.serial(ntkgp.Dense(64, 2.0), ntkgp.ReLU(), ntkgp.Dense(1, 1.5)).build(
        in_features=3, seed=0, dtype=torch.float32)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for kernel, name in ((empirical_nngp, "NNGP"), (empirical_ntk, "NTK")):
        message = rf"^The empirical {name} kernel is not finite in torch\.float32"
        with pytest.raises(NonFiniteKernelError, match=message):
            kernel(model, x * 1e20, diag=True)


def test_diag_refuses_a_second_set_of_other_points_or_features_before_the_network_runs(monkeypatch):
    """``x1[i]`` pairs with ``x2[i]``: another number of points is a ValueError naming both shapes, another
    number of features the one of ``net.kernel`` (not a broadcasting or matmul error, nor a kernel of the
    wrong pairs), and a flag
    that is not a boolean (``diag="yes"``) the flag error of ``net.kernel``."""
    net = _net()
    model = net.build(in_features=3, seed=11)
    x = torch.randn(5, 3)
    monkeypatch.setattr(type(model), "forward", lambda *args: pytest.fail("the network ran"))
    for kernel in (empirical_nngp, empirical_ntk):
        with pytest.raises(ValueError, match=r"^diag=True pairs x1\[i\] with x2\[i\].*x1 of shape \(5, 3\) "
                                             r"and x2 of shape \(4, 3\)"):
            kernel(model, x, torch.randn(4, 3), diag=True)
        with pytest.raises(ValueError, match=r"^x1 and x2 must have the same number of features, got 3 and 2"):
            kernel(model, x, torch.randn(5, 2), diag=True)   # as net.kernel says it (check_inputs, shared)
        for flag in ("yes", 1, None):
            with pytest.raises(ValueError, match=r"^diag must be True or False, got"):
                kernel(model, x, diag=flag)
    monkeypatch.undo()
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for m in (model, sequential):   # numpy's and torch's booleans are flags too, on both routes
        for flag in (np.bool_(True), torch.tensor(True)):
            for kernel in (empirical_nngp, empirical_ntk):
                torch.testing.assert_close(kernel(m, x, diag=flag, vector_output=flag),
                                           kernel(m, x, diag=True, vector_output=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x1 of shape \(5, 3\) and x2 of shape \(4, 3\)"):
        monte_carlo_kernel(net, x, torch.randn(4, 3), diag=True, n_samples=2)
    with pytest.raises(ValueError, match=r"^diag must be True or False, got 'yes'"):
        monte_carlo_kernel(net, x, diag="yes", n_samples=2)


@pytest.mark.fresh_process
def test_diag_at_many_points_is_linear_in_memory(monkeypatch):
    """20 000 points: one full float64 kernel is 3.2 GB (2980 MiB). With the device's memory read as
    64 MiB the full kernels are refused up front, while the diagonals (160 kB) are sized as such and
    computed on both routes, in well under a second each. Their peak resident memory above the start
    (where Linux lets the peak be reset) is the layer signals or Jacobians, O(n · width): a few MiB,
    64 allowed, where one n × n matrix would add 2980."""
    n = 20_000
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(12))
    layerwise = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(),
                             ntkgp.Dense(1, 1.0, 0.1)).build(in_features=2, seed=0)
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 64 << 20)
    for model in (layerwise, sequential):
        for kernel in (empirical_nngp, empirical_ntk):
            with pytest.raises(torch.cuda.OutOfMemoryError, match=r"20000 x 20000"):
                kernel(model, x)
            kernel(model, x[:10], diag=True)   # one-time buffers before measuring
            start, out = time.perf_counter(), {}
            peak = peak_above_current(lambda k=kernel, m=model, o=out: o.update(diag=k(m, x, diag=True)))
            seconds, diag = time.perf_counter() - start, out["diag"]
            assert diag.shape == (n,) and bool((diag > 0).all())
            assert seconds < 3, seconds
            assert peak < 64, (kernel.__name__, peak)
            # the pairs are those of the full kernel, here of a slice of the points
            torch.testing.assert_close(diag[:7], torch.diagonal(kernel(model, x[:7])), rtol=RTOL, atol=0)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"diagonal \(20000, in torch\.float64\)"):
        monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 100 << 10)
        empirical_ntk(layerwise, x, diag=True)


@pytest.mark.parametrize("cross", [False, True])
def test_monte_carlo_diag_is_the_full_estimate_s_diagonal(cross):
    """The same networks (same seeds; batches of 4 + 4 + 2 members): the estimates and their standard
    errors are the diagonals of the full ones, to rounding; without the NTK it is ``None``."""
    net = ntkgp.serial(ntkgp.Dense(16, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(16, 1.5, 0.1), ntkgp.GELU(),
                       ntkgp.Dense(2, 1.0, 0.1, "standard"))
    g = torch.Generator().manual_seed(13)
    x1 = torch.randn(6, 3, generator=g)
    x2 = torch.randn(6, 3, generator=g) if cross else None
    full = monte_carlo_kernel(net, x1, x2, n_samples=10, seed=5, ensemble_batch=4)
    diag = monte_carlo_kernel(net, x1, x2, n_samples=10, seed=5, ensemble_batch=4, diag=True)
    for name in ("nngp", "ntk", "nngp_sem", "ntk_sem"):
        value, expected = getattr(diag, name), torch.diagonal(getattr(full, name))
        assert value.shape == (6,)
        torch.testing.assert_close(value, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))
    assert diag.n_samples == 10
    alone = monte_carlo_kernel(net, x1, x2, n_samples=10, seed=5, ensemble_batch=4, diag=True, ntk=False)
    assert alone.ntk is None and alone.ntk_sem is None
    torch.testing.assert_close(alone.nngp, diag.nngp, rtol=0, atol=0)


def test_diag_of_wide_networks_converges_to_the_analytic_diagonal():
    """``net.kernel(x, diag=True)`` is the limit. Monte Carlo (NNGP: 32 networks of width 1024 with
    64 outputs, each network 64 conditionally independent draws; NTK: 16 networks with one output):
    within 4 standard errors (3-4 % of the NNGP, 1.5 % of the NTK here; measured |z| ≤ 2.1) plus
    the O(1/width) bias of the finite width (1e-3 of the value: 1/1024). One network of width
    2048: its NTK concentrates, O(1/sqrt(width)) fluctuations, 3-5 % (one standard deviation over
    10 seeds) here; 20 % allowed (4 of the largest)."""

    def net(width: int, k: int) -> ntkgp.Layer:
        return ntkgp.serial(ntkgp.Dense(width, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(width, 2.0, 0.1), ntkgp.ReLU(),
                            ntkgp.Dense(k, 1.5, 0.1))

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        exact = net(1024, 64).kernel(x, diag=True)   # the limit does not depend on the widths
    nngp = monte_carlo_kernel(net(1024, 64), x, n_samples=32, seed=1, ensemble_batch=8, diag=True, ntk=False)
    ntk = monte_carlo_kernel(net(1024, 1), x, n_samples=16, seed=1, ensemble_batch=8, diag=True)
    for mean, sem, limit in ((nngp.nngp, nngp.nngp_sem, exact.nngp), (ntk.ntk, ntk.ntk_sem, exact.ntk)):
        assert mean.shape == limit.shape == (4,)
        assert bool(((mean - limit).abs() <= 4 * sem + 1e-3 * limit.abs()).all()), (mean, limit, sem)
    one = empirical_ntk(net(2048, 1).build(in_features=3, seed=2), x, diag=True)
    assert float(((one - exact.ntk) / exact.ntk).abs().max()) < 0.2
