"""The full empirical NTK on the Jacobian route (modules not built by ntkgp, functions with ``params=``):
its Jacobians are formed a bounded number of cotangents at a time (``JACOBIAN_BYTES`` of backward
temporaries), where one ``jacrev`` pass backpropagated every output through all points at once."""

from __future__ import annotations

import pytest
import torch
from conftest import peak_above_current
from torch import Tensor, nn
from torch.func import functional_call

import ntkgp
from ntkgp.finite import empirical, empirical_nngp, empirical_ntk
from ntkgp.layers.base import NonFiniteKernelError

pytestmark = pytest.mark.usefixtures("float64_default")


class CenterRows(nn.Module):
    """Subtracts the mean over the points of its input: every output depends on every point."""

    def forward(self, h: Tensor) -> Tensor:
        return h - h.mean(-2, keepdim=True)


def _sequential(mix: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), *([CenterRows()] if mix else []), nn.LayerNorm(8),
                         nn.Linear(8, 2))


def _reference(f, params: dict[str, Tensor], x1: Tensor, x2: Tensor | None, vector_output: bool = False,
               scales: dict | None = None) -> Tensor:
    """``Σ_p s_p ∂f(x1)/∂θ_p ∂f(x2)/∂θ_p`` from one ``torch.func.jacrev`` of all outputs (the computation
    before chunking). Stacked parameters are flattened whole: a member's outputs depend on its own slice
    only, so the sum over all members' parameters is each member's kernel."""
    x2 = x1 if x2 is None else x2
    j1 = torch.func.jacrev(lambda q: f(q, x1))(params)
    j2 = torch.func.jacrev(lambda q: f(q, x2))(params)
    total: Tensor | float = 0.0
    for name, p in params.items():
        a, b = j1[name], j2[name]
        if scales and name in scales:
            a = a * torch.as_tensor(scales[name], dtype=a.dtype)   # broadcasts over the parameter's trailing axes
        a, b = a.flatten(a.dim() - p.dim()), b.flatten(b.dim() - p.dim())
        total = total + (torch.einsum("...nip,...mjp->...nmij", a, b) if vector_output
                         else torch.einsum("...nip,...mip->...nm", a, b) / a.shape[-2])
    assert isinstance(total, Tensor)
    return total


def _module_fn(model: nn.Module):
    return lambda q, x: functional_call(model, q, (x,))


@pytest.fixture
def passes(monkeypatch):
    """The number of chunks of cotangents backpropagated (calls of the pullback, vmapped over a chunk),
    with the byte budget cut to 20 KB: a few cotangents per pass at these sizes, a shorter last chunk."""
    monkeypatch.setattr(empirical, "JACOBIAN_BYTES", 20_000, raising=False)   # (absent before the chunks)
    calls = []
    vjp = getattr(empirical, "vjp", torch.func.vjp)

    def counted_vjp(*args, **kwargs):
        out, pullback = vjp(*args, **kwargs)

        def counted(*cotangents):
            calls.append(1)
            return pullback(*cotangents)

        return out, counted

    monkeypatch.setattr(empirical, "vjp", counted_vjp, raising=False)
    return calls


@pytest.mark.parametrize("vector_output", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("mix", [False, True])
def test_the_chunked_jacobian_route_equals_one_jacrev_pass(passes, vector_output, cross, mix):
    """A plain nn.Sequential (LayerNorm, 2 outputs), with and without a layer that subtracts the mean over
    the points (its outputs mix points: only the Jacobian of all outputs gives its kernel), x2 given or
    not, the k x k blocks or their average: the kernel of one jacrev pass to rounding (1e-12), formed
    in several passes of a few cotangents."""
    model = _sequential(mix)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) if cross else None
    params = {name: p.detach() for name, p in model.named_parameters()}
    kernel = empirical_ntk(model, x1, x2, vector_output=vector_output)
    expected = _reference(_module_fn(model), params, x1, x2, vector_output)
    torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    outputs = 2 * (7 + (5 if cross else 0))
    assert len(passes) >= 4 and len(passes) < outputs   # chunks of several cotangents, more than one


def test_the_chunked_jacobian_route_takes_params_and_scales(passes):
    """A function f(params, x) with params=, and parameter_scales (a number and a per-input column)."""
    model = _sequential(mix=True)
    params = {name: p.detach() for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    scales = {"0.weight": torch.rand(8, 1, generator=g), "4.bias": 0.3}
    f = _module_fn(model)
    for x2_ in (None, x2):
        kernel = empirical_ntk(f, x1, x2_, params=params, parameter_scales=scales, vector_output=True)
        expected = _reference(f, params, x1, x2_, True, scales)
        torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert len(passes) > 4


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_the_chunked_jacobian_route_of_ensembles(passes, chunk_size):
    """Ensembles (members vmapped, chunk_size of them at once) on the Jacobian route: an ntkgp ensemble
    with params=, and a module of the user's around one (its outputs (E, n, k))."""
    net = ntkgp.serial(ntkgp.Dense(6, 1.5, 0.1), ntkgp.Erf(), ntkgp.Dense(2, 1.0, 0.2))
    ensemble = net.build(in_features=3, seed=0, ensemble_size=3)
    params = {name: p.detach() for name, p in ensemble.named_parameters()}
    wrapped = nn.Sequential(ensemble, nn.Tanh())
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    for x2_ in (None, x2):
        kernel = empirical_ntk(ensemble, x1, x2_, params=params, chunk_size=chunk_size)
        expected = _reference(_module_fn(ensemble), params, x1, x2_)
        assert kernel.shape == (3, 5, 5 if x2_ is None else 4)
        torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
        kernel = empirical_ntk(wrapped, x1, x2_, chunk_size=chunk_size, vector_output=True)
        expected = _reference(_module_fn(wrapped), {f"0.{name}": p for name, p in params.items()}, x1, x2_, True)
        torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert len(passes) > 8


def test_the_chunked_jacobian_route_in_float32_without_points_and_without_gradient(passes):
    """float32 (the float64 kernel of the same network to 1e-5 of its largest entry: float32 products
    summed over ~100 parameters), zero points, and a constant result though the parameters require grad."""
    model = _sequential(mix=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=g)
    kernel = empirical_ntk(model, x)
    assert kernel.requires_grad is False and kernel.grad_fn is None
    single = empirical_ntk(model.float(), x.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), kernel, rtol=0, atol=1e-5 * float(kernel.abs().max()))
    assert empirical_ntk(model.double(), x[:0], x).shape == (0, 6)
    assert passes


@pytest.mark.fresh_process
def test_the_full_kernel_of_a_plain_module_does_not_hold_n_squared_times_width_temporaries():
    """nn.Sequential(Linear(10, 64), Tanh, Linear(64, 64), Tanh, Linear(64, 1)) at 600 points, float64: one
    jacrev pass backpropagated the 600 outputs through all 600 points at once, ~375 MiB of temporaries
    (n² x width x 8 bytes per layer; 262 MiB measured at 500 points) for a 2.7 MiB kernel. In chunks of
    JACOBIAN_BYTES (64 MiB) the peak is those, the 23 MiB Jacobian and the kernel: ~100 MiB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(600, 10)
    empirical_ntk(model, x[:20])   # warm-up: torch.func's and the kernel's one-time allocations
    peak = peak_above_current(lambda: empirical_ntk(model, x))
    assert peak < 200, f"{peak:.0f} MiB"


def test_the_chunked_jacobian_route_of_a_function_that_differentiates_and_under_a_callers_vmap(passes):
    """A function whose outputs include its input gradient (torch.func.grad inside it: torch's saved-tensor
    hooks would refuse it), and the kernel under a caller's torch.func.vmap over sets of inputs (no graph
    to read there; a last bias's Jacobian is not batched): each the kernel of one jacrev pass (1e-12)."""
    model = _sequential()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def f(q: dict[str, Tensor], x: Tensor) -> Tensor:
        slope = torch.func.vmap(torch.func.grad(lambda xi: functional_call(model, q, (xi[None],))[0, 0]))(x)
        return torch.cat([functional_call(model, q, (x,)), slope], -1)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, generator=g)
    kernel = empirical_ntk(f, x[0], params=params, vector_output=True)
    expected = _reference(f, params, x[0], None, True)
    torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    counted = len(passes)
    assert counted > 4
    mapped = torch.func.vmap(lambda xs: empirical_ntk(model, xs))(x)
    expected = torch.stack([_reference(_module_fn(model), params, xs, None) for xs in x])
    torch.testing.assert_close(mapped, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert len(passes) > counted + 1


def test_the_chunked_jacobian_route_draws_the_random_numbers_of_one_jacrev_pass(passes):
    """Dropout in training mode, seeded: the pass that measures the saved tensors (for the chunk's size)
    gives back the random numbers it drew, so the kernel is that of one jacrev pass at the same seed (its
    mask; another mask before) and the caller's random stream is where that pass leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(6))
    params = {name: p.detach() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="training mode"):
        kernel = empirical_ntk(model, x, vector_output=True)
    after = torch.rand(3)
    torch.manual_seed(1)
    j = torch.func.jacrev(lambda q: functional_call(model, q, (x,)))(params)   # one mask for both sides
    expected = sum(torch.einsum("nip,mjp->nmij", j[name].flatten(2), j[name].flatten(2)) for name in params)
    torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)
    assert len(passes) > 1


def test_the_chunk_of_cotangents_counts_the_inputs_not_the_data_set_they_are_a_view_of(passes):
    """Inputs that are the first rows of a larger data set (a view of its storage: 2.4 MB here): the
    forward pass saves 7 of its rows, and the chunks are those of a copy of them. Counted by storage,
    every pass took one cotangent (14 passes for 14 outputs; at 100 of 200 000 points 2.6x slower)."""
    model = _sequential()
    data = torch.randn(100_000, 3, generator=torch.Generator().manual_seed(7))
    kernel = empirical_ntk(model, data[:7])
    copied = len(passes)
    expected = empirical_ntk(model, data[:7].clone())
    torch.testing.assert_close(kernel, expected, rtol=0, atol=0)
    assert len(passes) - copied == copied < 14


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 2),
                    reason="torch 2.1's compile fails on any torch.func transform ('Cannot access data pointer')")
def test_the_chunked_jacobian_route_under_torch_compile():
    """torch.compile of the Jacobian of chunks (the one-hot cotangents were written by fill_diagonal_ into
    a slice: a mutation through as_strided, which compile refuses): the eager Jacobian to 1e-12."""
    model = _sequential()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(8))

    def jacobian(q: dict[str, Tensor]) -> dict[str, Tensor]:
        return empirical._jacobian(lambda r: functional_call(model, r, (x,)), q, 3)

    compiled = torch.compile(jacobian, backend="aot_eager")(params)
    expected = torch.func.jacrev(lambda q: functional_call(model, q, (x,)))(params)
    for name in params:
        torch.testing.assert_close(compiled[name], expected[name], rtol=1e-12, atol=1e-12)


class _Square(torch.autograd.Function):
    """x², saving x with ctx.save_for_backward (a node without torch's _saved_ attributes)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _Squares(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last, self.custom = nn.Linear(3, 64), nn.Linear(64, 2), custom

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        return self.last(_Square.apply(h) if self.custom else h * h)


def test_the_chunk_of_cotangents_counts_what_a_custom_autograd_function_saves(passes, monkeypatch):
    """x² as a custom autograd.Function (ctx.save_for_backward) saves what torch's x * x saves: the same
    chunks (5 passes of 3 cotangents for 14 outputs in 150 kB; its saved tensor was not counted, 4 of 4),
    and the kernel of one jacrev pass (1e-12)."""
    monkeypatch.setattr(empirical, "JACOBIAN_BYTES", 150_000)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(9))
    empirical_ntk(_Squares(custom=False), x)
    builtin = len(passes)
    model = _Squares(custom=True)
    kernel = empirical_ntk(model, x)
    expected = _reference(_module_fn(model), {name: p.detach() for name, p in model.named_parameters()}, x, None)
    torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert len(passes) - builtin == builtin == 5


class _Embedded(nn.Module):
    """Token ids ``(n, 2)`` of any integer dtype (or booleans, ids 0 and 1) through an embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embedding, self.readout = nn.Embedding(10, 4), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(torch.tanh(self.embedding(x.long()).flatten(-2)))


def test_the_empirical_kernels_take_an_embedding_s_indices():
    """A module that reads integer inputs (an embedding's token ids) was refused, "x1 must be a
    floating-point tensor ... convert it with x1.double()", which the embedding then refuses too,
    while linearize(model) of the same module takes them. Checked against one jacrev pass, in
    float64 (rounding only: 1e-13), on the full, vector and diagonal kernels, for the module and for
    a function of its parameters; ntkgp's own networks still need floating-point inputs."""
    model = _Embedded()
    x1, x2 = torch.tensor([[1, 2], [3, 4], [5, 6], [1, 9]]), torch.tensor([[0, 7], [2, 2], [8, 3]])
    params, fn = {n: p.detach() for n, p in model.named_parameters()}, _module_fn(model)

    def close(actual: Tensor, expected: Tensor) -> None:
        torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-13)

    for tokens in (x1, x1.to(torch.uint8), x1.int()):
        for other in (None, x2.to(tokens.dtype)):
            close(empirical_ntk(model, tokens, other), _reference(fn, params, tokens, other))
            close(empirical_ntk(fn, tokens, other, params=params), _reference(fn, params, tokens, other))
            close(empirical_ntk(model, tokens, other, vector_output=True),
                  _reference(fn, params, tokens, other, vector_output=True))
            with torch.no_grad():
                f1, f2 = model(tokens), model(tokens if other is None else other)
            close(empirical_nngp(model, tokens, other), f1 @ f2.T / 3)
        partners = x2[[0, 1, 2, 0]].to(tokens.dtype)
        close(empirical_ntk(model, tokens, diag=True), _reference(fn, params, tokens, None).diagonal())
        close(empirical_ntk(model, tokens, partners, diag=True), _reference(fn, params, tokens, partners).diagonal())
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    close(empirical_ntk(model, mask), _reference(fn, params, mask, None))
    # the kernel is in the parameters' dtype: 10^6 int8 indices' kernel is 8 bytes an entry, not one
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"1000000, in torch\.float64\) needs 7\.45e\+03 GiB"):
        empirical_ntk(model, torch.zeros(10**6, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="floating-point"):   # complex inputs stay refused
        empirical_ntk(model, x1.to(torch.complex128))
    built = ntkgp.mlp(depth=1, width=8).build(in_features=2, seed=0)
    for kernel in (empirical_ntk, empirical_nngp):
        with pytest.raises(ValueError, match=r"x1 must be a floating-point tensor, got torch\.int64"):
            kernel(built, x1)


class _Converting(nn.Module):
    """A float64 module that converts its inputs to its parameters' dtype itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.hidden, self.readout = nn.Linear(3, 6, dtype=torch.float64), nn.Linear(6, 2, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(torch.tanh(self.hidden(x.to(self.hidden.weight.dtype))))


def test_the_empirical_kernels_of_a_module_that_converts_its_inputs():
    """float32 inputs to a float64 module that converts them itself were refused up front, "x1 is
    torch.float32 but the network's parameters are torch.float64", though the module takes them (as
    linearize(model) does). Its kernels are now those of the converted inputs, against one jacrev pass
    (1e-13); a module or function that does not convert still names the dtypes, once it has failed, and
    a network built by ntkgp still up front."""
    model = _Converting()
    x1, x2 = torch.randn(5, 3, dtype=torch.float32), torch.randn(4, 3, dtype=torch.float32)
    params, fn = {n: p.detach() for n, p in model.named_parameters()}, _module_fn(model)

    def close(actual: Tensor, expected: Tensor) -> None:
        assert actual.dtype == torch.float64
        torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-13)

    for other in (None, x2):
        close(empirical_ntk(model, x1, other), _reference(fn, params, x1, other))
        full = _reference(fn, params, x1, other, vector_output=True)
        close(empirical_ntk(model, x1, other, vector_output=True), full)
        with torch.no_grad():
            f1, f2 = model(x1), model(x1 if other is None else other)
        close(empirical_nngp(model, x1, other), f1 @ f2.T / 2)
    close(empirical_ntk(model, x1, diag=True), _reference(fn, params, x1, None).diagonal())
    # its kernel is float64, 8 bytes an entry (not the inputs' 4)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"1000000, in torch\.float64\) needs 7\.45e\+03 GiB"):
        empirical_ntk(model, torch.zeros(10**6, 3, dtype=torch.float32))
    plain = nn.Sequential(nn.Linear(3, 2, dtype=torch.float64))
    for kernel in (empirical_ntk, empirical_nngp):
        for diag in (False, True):
            with pytest.raises(ValueError, match=r"x1 is torch\.float32 but the network.s parameters are "
                                                 r"torch\.float64: convert one of them\. \(mat1 and mat2 must"):
                kernel(plain, x1, diag=diag)


class _ConvertingLinear(nn.Module):
    """One linear layer of ``dtype`` that converts its inputs to it."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(3, 2, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


class _OutOfMemory(_Converting):
    """:class:`_Converting`, out of memory on the CPU beyond two points: torch's allocator raises a plain
    ``RuntimeError``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 140737488355328 bytes.")
        return super().forward(x)


def test_a_dtype_is_named_only_where_it_is_what_fails():
    """Once inputs of another dtype than the parameters had failed, every RuntimeError was said to be the
    dtype's doing: a module that converts its inputs itself, given the wrong number of features ("mat1
    and mat2 shapes cannot be multiplied"), or out of memory on the CPU, became "x1 is torch.float32 but the
    network's parameters are torch.float64", and a float16 module's overflowing kernel a plain ValueError
    (no longer the NonFiniteKernelError, a NanError, that an optimizer catches). Integer inputs to a
    module that does not read them, refused by name up front before the embedding's inputs were taken,
    gave torch's "mat1 and mat2 must have the same dtype, but got Long and Double". The dtype is named
    where the forward pass fails at the inputs and not at them converted (or differently: both named);
    a batch norm's running statistics are left as they were."""
    x = torch.randn(5, 4, dtype=torch.float32)
    for kernel in (empirical_ntk, empirical_nngp):
        for diag in (False, True):
            with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied \([25]x4 and 3x6\)$"):
                kernel(_Converting(), x, diag=diag)
        with pytest.raises(RuntimeError, match=r"^\[enforce fail .* DefaultCPUAllocator: can't allocate memory"):
            kernel(_OutOfMemory(), x[:, :3])
        with pytest.raises(NonFiniteKernelError, match=r"not finite in torch\.float16"):
            kernel(_ConvertingLinear(torch.float16), torch.full((3, 3), 3e4, dtype=torch.float32))
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        fn, params = _module_fn(plain), {n: p.detach() for n, p in plain.named_parameters()}
        for tokens in (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[True, False, True]])):
            with pytest.raises(ValueError, match=rf"^x1 is {tokens.dtype} but the network's parameters are "
                                                 r"torch\.float64: convert the inputs with \.to\(torch\.float64\) "
                                                 r"\(integer and boolean inputs are for modules that read them"):
                kernel(plain, tokens)
            with pytest.raises(ValueError, match=rf"^The inputs are {tokens.dtype} but params are torch\.float64"):
                kernel(fn, tokens, params=params)
        # an embedding's indices of the wrong number of features: the shapes, not the dtype (which the
        # embedding takes; converted to float64 it refuses them, but that is no cause)
        embedded = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
        with pytest.raises(RuntimeError, match=r"^mat1 and mat2 shapes cannot be multiplied \(\dx12 and 8x3\)$"):
            kernel(embedded, torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
        # both causes: the dtype, and the features that the inputs converted still fail on
        with pytest.raises(ValueError, match=r"^The inputs are torch\.float32 but params are torch\.float64: convert "
                                             r"one of them\. \(.*\) Converted to torch\.float64, the inputs still "
                                             r"fail: mat1 and mat2 shapes cannot be multiplied \(2x4 and 3x6\)$"):
            kernel(fn, x, params=params)
    # (the NTK refuses batch norm in training mode up front)
    normed = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = [b.clone() for b in normed.buffers()]
    with pytest.raises(ValueError, match=r"^x1 is torch\.float32 but the network's parameters are torch\.float64"), \
            pytest.warns(RuntimeWarning, match="training mode"):
        empirical_nngp(normed, x[:, :3])
    assert all(torch.equal(a, b) for a, b in zip(normed.buffers(), before, strict=True))


class _ComplexOutputs(nn.Module):
    """Two complex outputs ``a + i a²`` of a linear layer ``a``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.linear(x)
        return torch.complex(a, a.square())


def test_complex_outputs_are_refused_with_the_real_and_imaginary_parts_as_the_remedy():
    """The NTK of complex outputs was that of their real parts alone (each output's real cotangent pulled
    back: up to 8.9 off the kernel of both parts here), the NNGP the unconjugated ``f(x) f(x')ᵀ`` (complex, its
    diagonal ``0.22 - 1.06i``, ...) and the NTK's diagonal torch's "jacrev: Expected all outputs to be real".
    The remedy the error names, ``torch.view_as_real(out).flatten(-2)``, gives kernels of ``2k`` real outputs:
    the NNGP ``(1/2k) Re Σ_i f_i(x) conj(f_i(x'))`` and the NTK of both parts, as one ``jacrev`` of each."""
    model = _ComplexOutputs()
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    for kernel in (empirical_nngp, empirical_ntk):
        for kwargs in ({}, {"diag": True}, {"vector_output": True}):
            with pytest.raises(ValueError, match=r"complex outputs \(torch.complex128\).*view_as_real"):
                kernel(model, x1, None if kwargs.get("diag") else x2, **kwargs)

    class RealAndImaginary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            return torch.view_as_real(self.inner(x)).flatten(-2)

    split = RealAndImaginary()
    f1, f2 = model(x1).detach(), model(x2).detach()
    torch.testing.assert_close(empirical_nngp(split, x1, x2), (f1 @ f2.conj().mT).real / 4, rtol=1e-12, atol=1e-12)
    params = dict(model.named_parameters())
    parts = [lambda q, x, part=part: part(functional_call(model, q, (x,))) for part in (torch.real, torch.imag)]
    both = sum(_reference(part, params, x1, x2) for part in parts) / 2   # the average over 2k outputs, not k
    torch.testing.assert_close(empirical_ntk(split, x1, x2), both, rtol=1e-12, atol=1e-12)


def _shared_layer_network() -> nn.Module:
    """One ``nn.Linear`` applied twice: its weight is named ``2.weight`` and ``4.weight``."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 2))


def test_a_shared_parameter_takes_its_scale_under_any_of_its_names():
    """A scale for the shared weight under its second name, ``4.weight``, was refused as "parameter_scales names
    parameters the network does not have: ['4.weight']", and under its first one once ``params=`` named it by its
    second. Under either name it is the one parameter's, as one ``jacrev`` of the weight shared by both uses
    (``stateless`` gives the layer its value once); two scales for it are refused."""
    model = _shared_layer_network()
    x1, x2 = torch.randn(5, 3), torch.randn(4, 3)
    weight = model[2].weight.detach()
    fn = empirical.stateless(model)
    expected = _reference(fn, {name: p.detach() for name, p in model.named_parameters()}, x1, x2,
                          scales={"2.weight": 2.5})
    for name in ("2.weight", "4.weight"):
        torch.testing.assert_close(empirical_ntk(model, x1, x2, parameter_scales={name: 2.5}), expected,
                                   rtol=1e-12, atol=1e-12)
    alone = _reference(fn, {"4.weight": weight}, x1, x2)   # the shared weight's own term (scale 1)
    for name in ("2.weight", "4.weight"):
        torch.testing.assert_close(empirical_ntk(model, x1, x2, params={"4.weight": weight},
                                                 parameter_scales={name: 2.5}), 2.5 * alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"two scales, under '2\.weight' and '4\.weight'"):
        empirical_ntk(model, x1, x2, parameter_scales={"2.weight": 2.5, "4.weight": 1.0})


def test_a_shared_parameter_given_two_different_values_is_refused():
    """``params`` naming the shared weight twice with two values used the last alone (the layer has one slot
    for it), silently: the kernel at one of them, the other ignored. The same value under
    both names (``named_parameters(remove_duplicate=False)``) is the one parameter, counted once."""
    model = _shared_layer_network()
    x = torch.randn(5, 3)
    weight = model[2].weight.detach()
    with pytest.raises(ValueError, match=r"shared as '2\.weight' and '4\.weight' two different values"):
        empirical_ntk(model, x, params={"2.weight": weight + 1, "4.weight": weight})
    with pytest.raises(ValueError, match="two different values"):
        empirical_nngp(model, x, params={"2.weight": weight + 1, "4.weight": weight})
    every_name = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    torch.testing.assert_close(empirical_ntk(model, x, params=every_name), empirical_ntk(model, x),
                               rtol=1e-12, atol=1e-12)


class _ComplexWeights(nn.Module):
    """Real outputs ``|W x|`` of a complex weight ``W`` (2 x 3), held as complex (``parts=False``) or as the real
    tensor of its real and imaginary parts (2, 3, 2), made complex in ``forward``."""

    def __init__(self, weight: Tensor, parts: bool) -> None:
        super().__init__()
        self.parts = parts
        self.weight = nn.Parameter(torch.view_as_real(weight).clone() if parts else weight.clone())

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.view_as_complex(self.weight) if self.parts else self.weight
        return (x.to(weight.dtype) @ weight.T).abs()


def test_the_ntk_of_complex_parameters_is_refused_with_their_real_parts_as_the_remedy():
    """A module's own complex parameter (real outputs) gave a complex "NTK", silently: torch's gradient of a complex
    parameter is complex, and its real part was not the kernel of the parameter's real and imaginary parts
    (0.081 - 0.042i where that is -0.011), the diagonal jacrev's "Expected all inputs to be real". The remedy the
    error names, the parts as one real parameter, gives the kernel of ``jacrev`` in those parts; the NNGP (of the
    real outputs) stays."""
    torch.manual_seed(0)
    weight = torch.randn(2, 3, dtype=torch.complex128)
    model, split = _ComplexWeights(weight, parts=False), _ComplexWeights(weight, parts=True)
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    for kwargs in ({}, {"diag": True}, {"vector_output": True}):
        with pytest.raises(ValueError, match=r"parameters \['weight'\] are complex.*torch\.view_as_real"):
            empirical_ntk(model, x1, None if kwargs.get("diag") else x2, **kwargs)
    held = empirical_ntk(model, x1, x2, params={})   # nothing differentiated: the zero kernel
    torch.testing.assert_close(held, torch.zeros(4, 5), rtol=0, atol=0)
    expected = _reference(_module_fn(split), {"weight": split.weight.detach()}, x1, x2)
    torch.testing.assert_close(empirical_ntk(split, x1, x2), expected, rtol=1e-12, atol=1e-12)
    assert torch.linalg.eigvalsh(empirical_ntk(split, x1)).min() > -1e-12   # a real, positive semi-definite kernel
    torch.testing.assert_close(empirical_nngp(model, x1, x2), empirical_nngp(split, x1, x2), rtol=1e-14, atol=0)


def test_a_held_shared_parameter_s_scale_is_refused_under_the_name_given():
    """A scale for a held parameter (``params=`` leaves it out, or a linearization's expansion point) given under
    its second name was refused under its first: "not differentiated: ['2.weight']" for ``{'4.weight': ...}``, and
    ``['initial.2.weight']`` for ``initial.4.weight``, names the caller had not written."""
    model = _shared_layer_network()
    x = torch.randn(5, 3)
    first = {"0.weight": model[0].weight.detach()}
    for name in ("2.weight", "4.weight"):
        with pytest.raises(ValueError, match=rf"not differentiated: \['{name}'\] \(held fixed"):
            empirical_ntk(model, x, params=first, parameter_scales={name: 2.0})
    linearized = ntkgp.finite.linearize(model)
    with pytest.raises(ValueError, match=r"not differentiated: \['initial\.4\.weight'\]"):
        empirical_ntk(linearized, x, parameter_scales={"initial.4.weight": 2.0})
    alone = _reference(empirical.stateless(model), {"4.weight": model[2].weight.detach()}, x, None)
    # its differentiated copy's scale under its second name: the shared weight's term counted twice, once more
    torch.testing.assert_close(empirical_ntk(linearized, x, parameter_scales={"network.4.weight": 2.0})
                               - empirical_ntk(linearized, x), alone, rtol=1e-12, atol=1e-12)
