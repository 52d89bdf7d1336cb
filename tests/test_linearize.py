"""The linearized network (ntkgp.finite.linearize) against its definition and, trained, against the
kernel predictions from the same network's empirical NTK."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import ntkgp
from ntkgp import finite, predict

F64 = torch.float64


def _model(ensemble_size=None, outputs=2):
    net = ntkgp.serial(ntkgp.Dense(32, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(32, 2.0, 0.1), ntkgp.Erf(),
                       ntkgp.Dense(outputs, 1.5, 0.1))
    return net.build(in_features=3, seed=0, ensemble_size=ensemble_size, dtype=F64)


def _points(n, seed):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _params_plus(model, direction, scale):
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(moved.parameters(), direction, strict=True):
            p.add_(scale * d)
    return moved


def test_the_linearization_is_the_first_order_taylor_expansion():
    """At θ₀ the outputs are the network's; along a direction δ they change by J δ exactly (linear in
    the step: 1x and 3x agree to rounding), and the network's own change agrees to first order
    (its remainder falls as ε², measured from central differences at ε = 1e-3 and 1e-4)."""
    model = _model()
    x = _points(7, 1)
    lin = finite.linearize(model)
    with torch.no_grad():
        assert torch.equal(lin(x), model(x))
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in model.parameters()]
    changes = []
    for scale in (1.0, 3.0):
        moved = copy.deepcopy(lin)
        with torch.no_grad():
            for p, d in zip(moved.network.parameters(), direction, strict=True):
                p.add_(scale * d)
            changes.append(moved(x) - model(x))
    torch.testing.assert_close(changes[1], 3 * changes[0], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        remainders = []
        for eps in (1e-3, 1e-4):
            central = (_params_plus(model, direction, eps)(x) - _params_plus(model, direction, -eps)(x)) / (2 * eps)
            remainders.append(float((central - changes[0]).abs().max()))
    assert remainders[0] < 1e-4 and remainders[1] < remainders[0] / 50, remainders
    assert all(p.grad is None for p in model.parameters())   # the network itself is untouched


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_on_the_linearized_network_is_the_empirical_ntk_dynamics(momentum):
    """torch.optim.SGD on the linearized network's cross-entropy for 30 steps gives, to rounding, the
    outputs gradient_descent predicts from the network's full empirical NTK (vector_output=True):
    f_lin moves only along J, and J Jᵀ is that kernel."""
    model = _model()
    x, x_test = _points(8, 3), _points(4, 4)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    y = torch.nn.functional.one_hot(labels, 2).to(F64)

    def xent(f, target):
        return -(target * f.log_softmax(-1)).sum(-1).mean()

    lin = finite.linearize(model)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=momentum)
    for _ in range(30):
        opt.zero_grad()
        xent(lin(x), y).backward()
        opt.step()
    with torch.no_grad():
        trained_train, trained_test = lin(x), lin(x_test)
        f_train, f_test = model(x), model(x_test)
    ntk_dd = finite.empirical_ntk(model, x, vector_output=True)
    ntk_td = finite.empirical_ntk(model, x_test, x, vector_output=True)
    train, test = predict.gradient_descent(xent, ntk_dd, y, fx_train_0=f_train, ntk_test_train=ntk_td,
                                           fx_test_0=f_test, steps=30, learning_rate=0.5,
                                           momentum=momentum or None)
    assert float((trained_train - f_train).abs().max()) > 0.05   # it trained
    torch.testing.assert_close(trained_train, train, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trained_test, test, rtol=1e-10, atol=1e-10)


def test_ensembles_devices_copies_and_state():
    model = _model(ensemble_size=3)
    x = _points(5, 5)
    lin = finite.linearize(model)
    with torch.no_grad():
        assert torch.equal(lin(x), model(x)) and lin(x).shape == (3, 5, 2)
    trainable = [p for p in lin.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))
    lin(x).sum().backward()
    assert all(p.grad is None for p in lin.initial.parameters()) and all(p.grad is not None for p in trainable)
    with torch.no_grad():
        for p in lin.network.parameters():
            p.mul_(1.1)
        before = lin(x)
    buffer = io.BytesIO()
    torch.save(lin.state_dict(), buffer)
    buffer.seek(0)
    fresh = finite.linearize(_model(ensemble_size=3))
    fresh.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)
        single = lin.float()(x.float())
    assert single.dtype == torch.float32 and float((single.double() - before).abs().max()) < 1e-5



def test_a_linearization_made_under_inference_mode_trains():
    """Copied under a caller's ``torch.inference_mode()``, the parameters were inference tensors: once
    the mode was left the outputs carried no gradient, and the first backward pass failed with "element
    0 of tensors does not require grad". Made there, it is the one made outside: the same outputs after
    a step, and the same gradients (J(x; θ₀)ᵀ of the weighted sum: exact, so to rounding)."""
    model = _model()
    x = _points(6, 7)
    with torch.inference_mode():
        made_inside = finite.linearize(model)
    made_outside = finite.linearize(model)
    assert not any(p.is_inference() for p in made_inside.parameters())
    weights = _points(6, 8)[:, :2]
    for lin in (made_inside, made_outside):
        with torch.no_grad():
            for p in lin.network.parameters():
                p.mul_(1.1)
        (lin(x) * weights).sum().backward()
    for inside, outside in zip(made_inside.network.parameters(), made_outside.network.parameters(), strict=True):
        torch.testing.assert_close(inside.grad, outside.grad, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(made_inside(x), made_outside(x), rtol=0, atol=0)

def test_batch_norm_needs_eval_mode_and_the_mode_is_the_model_s():
    """Batch norm in training mode has no fixed expansion point: a clear error (torch.func's was about
    mutating a captured tensor), and in eval mode the expansion holds; the wrapper's own training flag
    is the model's."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2)).double()
    with torch.no_grad():
        model(torch.randn(16, 3, generator=g, dtype=F64))    # running statistics away from their start
    model.eval()
    lin = finite.linearize(model)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    assert lin.training is False
    with torch.no_grad():
        torch.testing.assert_close(lin(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Batch norm in training mode"):
        lin.train()(x)


def test_spectral_norm_in_training_mode_is_named():
    """Spectral norm's power iteration (training mode) has no forward-mode derivative: torch said only
    "Trying to use forward AD with div_out that does not support it"; in eval mode the expansion holds."""
    from torch.nn.utils.parametrizations import spectral_norm

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(spectral_norm(torch.nn.Linear(3, 8)), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    x = torch.randn(6, 3, generator=g, dtype=F64)
    with pytest.raises(ValueError, match=r"forward-mode derivative .* Spectral norm in training mode"):
        finite.linearize(model)(x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(finite.linearize(model)(x), model(x), rtol=1e-15, atol=1e-15)


def test_what_cannot_be_linearized_is_refused():
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.0))
    with pytest.raises(ValueError, match="spec"):
        finite.linearize(net)
    with pytest.raises(ValueError, match="not drawn yet"):
        finite.linearize(net.build(seed=0))          # a deferred first layer
    with pytest.raises(ValueError, match="not drawn yet"):
        finite.linearize(torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match="no parameters"):
        finite.linearize(torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        finite.linearize(lambda x: x)


@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_the_empirical_kernels_of_a_linearized_network_are_the_network_s_at_initialization(ensemble_size):
    """``Linearized`` is an ntkgp module, and ``empirical_ntk`` took its layer-by-layer route, meant for
    the networks ``build`` makes: it failed inside autograd ("One of the differentiated Tensors does not
    require grad"). At ``θ = θ₀`` its Jacobian is the network's (the frozen ``θ₀`` terms cancel)."""
    model = _model(ensemble_size)
    linearized = finite.linearize(model)
    x, y = _points(5, 1), _points(4, 2)
    for args in ((x,), (x, y)):
        torch.testing.assert_close(finite.empirical_ntk(linearized, *args), finite.empirical_ntk(model, *args),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(finite.empirical_nngp(linearized, *args), finite.empirical_nngp(model, *args),
                                   rtol=0, atol=0)
    trained = {name: p for name, p in linearized.named_parameters() if name.startswith("network.")}
    torch.testing.assert_close(finite.empirical_ntk(linearized, x, params=trained), finite.empirical_ntk(model, x),
                               rtol=1e-12, atol=1e-12)


def _trained_linearization(ensemble_size: int | None):
    """A network, its linearization after 100 SGD steps (lr 0.5) on 6 points, and the points."""
    model = _model(ensemble_size)
    linearized = finite.linearize(model)
    x, y = _points(6, 1), _points(6, 3)[:, :2]
    optimizer = torch.optim.SGD(linearized.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        (0.5 * (linearized(x) - y).square().mean()).backward()
        optimizer.step()
    return model, linearized, x


@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_the_empirical_ntk_of_a_trained_linearization_stays_the_network_s_at_initialization(ensemble_size):
    """``f_lin(x; θ) = f(x; θ₀) + J(x; θ₀)(θ − θ₀)`` is linear in ``θ``: its tangent kernel is
    ``J(θ₀) J(θ₀)ᵀ`` however far ``θ`` moves. ``empirical_ntk`` differentiated the frozen ``θ₀`` too
    (all of a module's parameters), whose gradient ``H(θ₀)(θ − θ₀)`` is 0 only at ``θ = θ₀``: after
    these steps the kernel was 241 % (one network) and 56 % (the ensemble) off in Frobenius norm. Now
    equal to rounding (kernels of order 1-10)."""
    model, linearized, x = _trained_linearization(ensemble_size)
    moved = sum((p.detach() - p0).square().sum()
                for p, p0 in zip(linearized.network.parameters(), linearized.initial.parameters(), strict=True))
    assert float(moved) > 0.1   # θ far from θ₀: the θ₀ terms are not small
    for args in ((x,), (x, _points(4, 2))):
        for kwargs in ({}, {"vector_output": True}):
            torch.testing.assert_close(finite.empirical_ntk(linearized, *args, **kwargs),
                                       finite.empirical_ntk(model, *args, **kwargs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(finite.empirical_ntk(linearized, x, diag=True),
                               finite.empirical_ntk(model, x, diag=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ensemble_size", [None, 3])
def test_a_trained_linearization_inside_a_module_of_one_s_own_keeps_the_initial_ntk(ensemble_size):
    """The expansion point ``θ₀`` (``initial.*``) is a constant wherever the linearization sits: wrapped
    in an ``nn.Sequential`` (a module of the user's around it) it was differentiated again, 241 % (one
    network) and 56 % (the ensemble; 61 % its diagonal) off in Frobenius norm after these steps, as the
    bare linearization was before. Now equal to rounding. A scale for ``θ₀`` was refused as a parameter
    "the network does not have"; it is named as held fixed."""
    model, linearized, x = _trained_linearization(ensemble_size)
    wrapped = nn.Sequential(linearized)
    expected = finite.empirical_ntk(model, x)
    torch.testing.assert_close(finite.empirical_ntk(wrapped, x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(finite.empirical_ntk(wrapped, x, diag=True), finite.empirical_ntk(model, x, diag=True),
                               rtol=1e-12, atol=1e-12)
    scales = {name: 2.0 for name, _ in wrapped.named_parameters() if name.startswith("0.network.")}
    torch.testing.assert_close(finite.empirical_ntk(wrapped, x, parameter_scales=scales), 2 * expected,
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"parameter_scales names parameters that are not differentiated: "
                                         r"\['initial\.0\.bias'\] \(held fixed"):
        finite.empirical_ntk(linearized, x, parameter_scales={"initial.0.bias": 2.0})


def test_a_linearization_s_non_finite_parameters_are_named_as_the_network_s():
    """A linearization whose ``θ`` holds a NaN (a diverged training) was refused as
    "params['network.0.weight'] contains NaN", naming an argument that was not given; as any module's,
    the refusal names the network's parameters and the remedy."""
    linearized = finite.linearize(_model())
    with torch.no_grad():
        linearized.network[0].weight[0, 0] = float("nan")
    for module in (linearized, nn.Sequential(linearized)):
        for kernel in (finite.empirical_ntk, finite.empirical_nngp):
            with pytest.raises(ValueError, match=r"^The network's parameters \['(0\.)?network\.0\.weight'\] contain "
                                                 r"NaN or infinite values: re-initialize"):
                kernel(module, _points(4, 1))


def test_inputs_of_another_dtype_than_the_parameters_are_named():
    """float32 inputs to a float64 linearization failed inside torch.func.jvp ("expected m1 and m2 to
    have the same dtype, but got: float != double"); the error now names both dtypes, as empirical_ntk's
    does, and the converted module takes them (to float32 rounding of the float64 outputs)."""
    x = _points(5, 7)
    plain = finite.linearize(nn.Sequential(nn.Linear(3, 8, dtype=F64), nn.Tanh(), nn.Linear(8, 2, dtype=F64)))
    with pytest.raises(ValueError, match=r"inputs are torch\.float32 but the linearized network's parameters are "
                                         r"torch\.float64"):
        plain(x.float())
    lin = finite.linearize(_model())
    with pytest.raises(ValueError, match=r"parameters are torch\.float64 but its inputs are torch\.float32"):
        lin(x.float())   # ntkgp's own layers name the dtypes themselves
    with torch.no_grad():
        torch.testing.assert_close(lin.float()(x.float()).double(), lin.double()(x), rtol=1e-5, atol=1e-6)


class Converting(nn.Module):
    """A float64 module that converts its inputs itself (float32 inputs are its to take)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2, dtype=F64)

    def forward(self, x):
        return self.layer(x.to(F64))


def test_inputs_of_the_wrong_number_of_features_are_not_said_to_fail_for_their_dtype():
    """A float64 module that converts its inputs itself, given float32 inputs of 5 features for its 3, was
    said to fail because "the inputs are torch.float32 but the linearized network's parameters are
    torch.float64" (torch's shape error in parentheses): converting them changed nothing. Where both are
    wrong, the dtype is named and so is the failure that remains after converting."""

    torch.manual_seed(0)
    x = torch.randn(4, 5)
    # torch's own message, passed on unchanged (torch 2.15 prefixes it with "addmm: ")
    with pytest.raises(RuntimeError, match=r"^(addmm: )?mat1 and mat2 shapes cannot be multiplied \(4x5 and 3x2\)$"):
        finite.linearize(Converting())(x)
    with pytest.raises(ValueError, match=r"inputs are torch\.float32 but the linearized network's parameters are "
                                         r"torch\.float64: .* Converted to torch\.float64, the inputs still fail: "
                                         r"(addmm: )?mat1 and mat2 shapes cannot be multiplied \(4x5 and 3x2\)$"):
        finite.linearize(nn.Linear(3, 2, dtype=F64))(x)


def test_inputs_that_the_module_takes_in_another_dtype_are_not_refused():
    """The dtype check refused, before the expansion ran, inputs that the network takes in another dtype
    than its parameters: an embedding's int64 indices and a float64 module that converts its float32
    inputs itself (both linearized before). Their expansion at θ = θ₀ is the network's outputs: the
    same operations on the same values, so equal to the last bit."""
    torch.manual_seed(0)

    embedding = nn.Sequential(nn.Embedding(10, 4, dtype=F64), nn.Flatten(), nn.Linear(8, 1, dtype=F64))
    cases = ((embedding, torch.tensor([[1, 2], [3, 4], [5, 6]])), (Converting(), torch.randn(4, 3)))
    for model, x in cases:
        with torch.no_grad():
            torch.testing.assert_close(finite.linearize(model)(x), model(x), rtol=0, atol=0)


def test_integer_inputs_to_a_module_that_cannot_read_them_are_named():
    """Integer inputs to a module without an embedding failed with torch's own "mat1 and mat2 must have
    the same dtype, but got Long and Double" (only floating-point inputs were named); they are named
    with the conversion, as the empirical kernels name them. An embedding's failure of another kind (a
    wrong number of indices) is its own, not the indices' dtype."""
    ids = torch.tensor([[1, 2, 0], [3, 4, 1]])
    for x in (ids, ids > 1):
        with pytest.raises(ValueError, match=rf"^The inputs are {x.dtype} but the linearized network's parameters "
                                             r"are torch\.float64: convert the inputs with \.to\(torch\.float64\) "
                                             r"\(integer and boolean inputs are for modules that read them"):
            finite.linearize(nn.Linear(3, 2, dtype=F64))(x)
    embedding = nn.Sequential(nn.Embedding(10, 4, dtype=F64), nn.Flatten(), nn.Linear(8, 1, dtype=F64))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        finite.linearize(embedding)(ids)   # 3 indices a row where the module takes 2
