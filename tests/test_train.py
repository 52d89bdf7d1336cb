"""The ensemble training engine (ntkgp.finite.train)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from conftest import needs_cpu_half_products

import ntkgp
import ntkgp._warnings
import ntkgp.finite.fused as fused_module
import ntkgp.finite.train as train_module
from ntkgp.finite.rates import equivalent_learning_rates
from ntkgp.finite.train import layer_groups, readout_parameters, train_ensemble

X = torch.linspace(-math.pi, math.pi, 5, dtype=torch.float64).unsqueeze(-1)
Y = torch.sin(X)


def _net(param="ntk", width=24):
    return ntkgp.serial(ntkgp.Dense(width, 2.25, 0.01, param), ntkgp.Erf(), ntkgp.Dense(width, 2.0, 0.01, param),
                        ntkgp.ReLU(), ntkgp.Dense(1, 1.5, 0.01, param))


class _Autograd:
    """The plain-autograd step, to check the stacked in-place step against."""

    def __init__(self, model, trained, rates):
        self.loss_and_step = train_module._autograd_step(model, trained, rates)

    def close(self):
        pass


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("readout_only", [False, True])
def test_in_place_stacked_step_equals_plain_autograd_gradient_descent(param, readout_only, monkeypatch):
    kwargs = dict(ensemble_size=3, learning_rate=0.1, record_steps=[0, 7, 40], probe=X, readout_only=readout_only,
                  dtype=torch.float64, engine="stacked")
    fused = train_ensemble(_net(param), X, Y, **kwargs)
    monkeypatch.setattr(train_module, "_DenseStep", _Autograd)
    plain = train_ensemble(_net(param), X, Y, **kwargs)
    torch.testing.assert_close(fused.test_outputs, plain.test_outputs, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(fused.ntk_change, plain.ntk_change, rtol=1e-10, atol=1e-12)
    assert float(fused.train_loss[-1].mean()) < float(fused.train_loss[0].mean())


def test_members_are_independent_networks_trained_by_gradient_descent():
    """Each member of the stacked ensemble follows exactly its own single-network training."""
    h = train_ensemble(_net(), X, Y, ensemble_size=3, learning_rate=0.2, record_steps=[25], dtype=torch.float64)
    model = _net().build(in_features=1, seed=0, ensemble_size=3, dtype=torch.float64)
    for member in range(3):
        params = {n: p.detach()[member].clone().requires_grad_() for n, p in model.named_parameters()}
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        for _ in range(25):
            out = torch.func.functional_call(model, params, (X,))
            loss = 0.5 * ((out - Y) ** 2).sum() / Y.numel()
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: (p - 0.2 * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads,
                                                                                        strict=True)}
        with torch.no_grad():
            out = torch.func.functional_call(model, params, (X,))
        torch.testing.assert_close(h.test_outputs[0, member], out, rtol=1e-12, atol=1e-13)
        flat = lambda ps, names: torch.cat([ps[n].detach().flatten() for n in names])  # noqa: E731
        names = list(params)
        change = (flat(params, names) - flat(theta0, names)).norm() / flat(theta0, names).norm()
        assert abs(float(h.weight_change[0, member]) - float(change)) <= 1e-12 * float(change)
        for group, weights in {"input": ["0.weight"], "hidden": ["2.weight"], "readout": ["4.weight"]}.items():
            moved = (flat(params, weights) - flat(theta0, weights)).norm() / flat(theta0, weights).norm()
            assert abs(float(h.layer_change[group][0, member]) - float(moved)) <= 1e-12 * float(moved)


def test_readout_only_training_moves_only_the_last_layer():
    h = train_ensemble(_net(), X, Y, ensemble_size=2, learning_rate=0.2, record_steps=[0, 30], readout_only=True)
    assert float(h.layer_change["input"][-1].abs().max()) == 0.0
    assert float(h.layer_change["hidden"][-1].abs().max()) == 0.0
    assert float(h.layer_change["readout"][-1].min()) > 0
    model = _net().build(in_features=1, seed=0, ensemble_size=2)
    assert sorted(readout_parameters(model)) == ["4.bias", "4.weight"]
    assert layer_groups(model, X.float()) == {"input": ["0.weight"], "hidden": ["2.weight"], "readout": ["4.weight"]}


@pytest.mark.parametrize("mode", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_layer_groups_file_a_dense_layer_after_a_leading_elementwise_layer_as_reading_the_input(mode):
    """Its weights are width x d and move as width^(-1/2), as the first layer's do; it was filed
    with the width x width layers (it is not handed ``x`` itself), whose change falls as width^(-1).
    Measured with a leading Sin, widths 64/256/1024: slopes -0.51 (input), -0.97 (hidden)."""
    dense = lambda: ntkgp.Dense(8, 2.25, 0.0025)  # noqa: E731
    nets = {
        ntkgp.serial(ntkgp.Sin(), dense(), ntkgp.Erf(), dense(), ntkgp.Erf(), dense()):
            {"input": ["1.weight"], "hidden": ["3.weight"], "readout": ["5.weight"]},
        ntkgp.serial(ntkgp.parallel(dense(), ntkgp.serial(ntkgp.Cos(), dense()), join="concat"), ntkgp.Erf(),
                     dense()):
            {"input": ["0.branches.0.weight", "0.branches.1.1.weight"], "readout": ["2.weight"]},
        ntkgp.serial(ntkgp.Identity(), dense(), ntkgp.parallel(ntkgp.Identity(), dense(), join="concat"), dense()):
            {"input": ["1.weight"], "hidden": ["2.branches.1.weight"], "readout": ["3.weight"]},
    }
    for net, groups in nets.items():
        for ensemble_size in (None, 3):
            model = net.build(in_features=2, seed=0, ensemble_size=ensemble_size)
            with mode():
                assert layer_groups(model, torch.randn(5, 2)) == groups


def test_history_shapes_statistics_and_chunking():
    xt = torch.linspace(-3, 3, 11, dtype=torch.float64).unsqueeze(-1)
    h = train_ensemble(_net(), X, Y, ensemble_size=7, learning_rate=0.1, record_steps=[20, 0, 5], x_test=xt,
                       probe=xt[::3], chunk_size=3)
    assert h.steps.tolist() == [0, 5, 20]
    assert h.test_outputs.shape == (3, 7, 11, 1)
    assert h.train_loss.shape == h.weight_change.shape == h.ntk_change.shape == (3, 7)
    torch.testing.assert_close(h.mean, h.test_outputs.mean(1))
    torch.testing.assert_close(h.standard_error, (h.test_outputs.var(1) / 7).sqrt())
    assert torch.equal(h.times, 0.1 * h.steps.double())
    assert float(h.weight_change[0].abs().max()) == 0 and float(h.ntk_change[0].abs().max()) == 0
    assert h.settings["chunk_size"] == 3


def test_an_explicit_chunk_size_fixes_the_members_of_every_full_chunk():
    """The docstring promised members that depend only on the network, seed and chunk_size; a last,
    partial chunk draws its members together and so depends on its size too (as documented now)."""
    runs = {e: train_ensemble(_net(), X, Y, ensemble_size=e, learning_rate=0.1, record_steps=[0, 5], chunk_size=3,
                              dtype=torch.float64, engine="stacked") for e in (4, 6, 7)}
    for e in (4, 7):   # the full chunks they share are the same members, bitwise, and train the same
        assert torch.equal(runs[e].test_outputs[:, :3], runs[6].test_outputs[:, :3])
    assert torch.equal(runs[7].test_outputs[:, 3:6], runs[6].test_outputs[:, 3:6])
    assert not torch.equal(runs[4].test_outputs[0, 3], runs[6].test_outputs[0, 3])   # a chunk of 1 against 3


def test_a_seed_gives_the_same_members_in_float32_and_float64(monkeypatch):
    # a budget that forces several default chunks: their sizes must not depend on dtype
    monkeypatch.setattr(train_module, "CHUNK_BYTES", 200_000)
    runs = {dt: train_ensemble(_net(width=64), X, Y, ensemble_size=9, learning_rate=0.1, record_steps=[0, 10],
                               dtype=dt, device="cpu") for dt in (torch.float32, torch.float64)}
    assert runs[torch.float32].settings["chunk_size"] == runs[torch.float64].settings["chunk_size"] < 9
    torch.testing.assert_close(runs[torch.float32].test_outputs.double(), runs[torch.float64].test_outputs,
                               rtol=1e-4, atol=1e-5)


def test_divergence_is_reported_not_raised():
    h = train_ensemble(_net(), X, Y, ensemble_size=2, learning_rate=50.0, record_steps=[0, 10, 500])
    assert h.diverged_at is not None and h.diverged_at <= 500
    assert len(h.steps) < 3 and h.steps[0] == 0


def test_divergence_before_the_first_record_keeps_the_documented_shapes():
    xt = torch.zeros(7, 1, dtype=torch.float64)
    h = train_ensemble(_net(), X, Y, ensemble_size=3, learning_rate=1e4, record_steps=[50], x_test=xt, probe=X,
                       dtype=torch.float64)
    assert h.diverged_at is not None and h.diverged_at < 50 and h.steps.shape == (0,)
    assert h.test_outputs.shape == (0, 3, 7, 1) and h.mean.shape == h.variance.shape == (0, 7, 1)
    assert h.train_loss.shape == h.weight_change.shape == h.ntk_change.shape == (0, 3)
    assert {g: tuple(v.shape) for g, v in h.layer_change.items()} == {g: (0, 3) for g in ("input", "hidden", "readout")}


@pytest.mark.parametrize("variance", [1.0, torch.tensor([0.2, 1.0, 5.0]), torch.tensor([0.0, 1.0, 5.0])],
                         ids=["scalar", "ard", "ard-switched-off"])
def test_layer_changes_do_not_depend_on_the_parameterization(variance):
    """Groups of layers with different scales (and per-feature ARD scales) move alike in both
    parameterizations: the changes are measured in NTK coordinates (raw standard-parameterized
    weights differed by 4-10 %). An ARD feature of variance 0 (stored as 0 in the standard
    parameterization: its input change was 0/0 = NaN there, a number in the NTK one) is left out."""
    x = torch.cat([X, X.cos(), 3 * X.sin()], 1)
    ard = isinstance(variance, torch.Tensor)

    def net(param):
        first = ntkgp.Dense(16, variance, 0.1, param, ard_num_dims=3 if ard else None)
        return ntkgp.serial(first, ntkgp.ReLU(), ntkgp.Dense(12, 0.5, 0.1, param), ntkgp.Erf(),
                            ntkgp.Dense(20, 3.0, 0.1, param), ntkgp.ReLU(), ntkgp.Dense(1, 2.0, 0.1, param))

    ntk, std = (train_ensemble(net(p), x, Y, ensemble_size=2, learning_rate=0.3, record_steps=[0, 40],
                               dtype=torch.float64) for p in ("ntk", "standard"))
    torch.testing.assert_close(std.test_outputs, ntk.test_outputs, rtol=1e-12, atol=1e-13)
    for group in ("input", "hidden", "readout"):
        assert float(ntk.layer_change[group][-1].min()) > 1e-3
        torch.testing.assert_close(std.layer_change[group], ntk.layer_change[group], rtol=1e-10, atol=0)


def test_a_layer_of_weight_variance_zero_has_no_weight_change_in_either_parameterization():
    """``weight_var=0``: the layer's weights never move (rate η·0 standard, gradient ∝ σ_w NTK); its
    group's change is 0 in both parameterizations (the standard one read 0/0 = NaN)."""
    def net(param):
        return ntkgp.serial(ntkgp.Dense(8, 0.0, 0.1, param), ntkgp.Erf(), ntkgp.Dense(8, 1.0, 0.1, param),
                            ntkgp.Erf(), ntkgp.Dense(1, 1.0, 0.1, param))

    ntk, std = (train_ensemble(net(p), X, Y, ensemble_size=2, learning_rate=0.3, record_steps=[0, 10],
                               dtype=torch.float64) for p in ("ntk", "standard"))
    for h in (ntk, std):
        assert torch.equal(h.layer_change["input"], torch.zeros(2, 2, dtype=torch.float64))
        assert float(h.layer_change["hidden"][-1].min()) > 1e-3
    torch.testing.assert_close(std.layer_change["hidden"], ntk.layer_change["hidden"], rtol=1e-10, atol=0)


def test_networks_and_kernels_refuse_bad_build_arguments():
    net = _net()
    for kwargs, message in [(dict(in_features=0), "in_features"), (dict(in_features=2.5), "in_features"),
                            (dict(ensemble_size=0), "ensemble_size"), (dict(dtype=torch.int64), "dtype")]:
        with pytest.raises(ValueError, match=message):
            net.build(**kwargs)
    with pytest.raises(ValueError, match="no parameters"):
        train_ensemble(ntkgp.serial(ntkgp.ReLU()), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[1])
    model = net.build(in_features=1, ensemble_size=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        ntkgp.finite.empirical_ntk(model, X, chunk_size=0)
    with pytest.raises(ValueError, match=r"float32 but the network.s parameters are torch\.float64"):
        ntkgp.finite.empirical_ntk(model, X.float())


@pytest.mark.parametrize("kwargs,message", [
    (dict(ensemble_size=0), "ensemble_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=1.5), "chunk_size"),
    (dict(dtype=torch.int64), "dtype"),
    (dict(x_test=torch.zeros(2, 4, 1, dtype=torch.float64)), r"x_test must have shape \(M, 1\)"),
    (dict(x_test=torch.zeros(4, 2, dtype=torch.float64)), "x_test"),
    (dict(probe=torch.zeros(3, 3, 1, dtype=torch.float64)), "probe"),
    (dict(probe=X[:0]), "probe must hold at least one point"),        # was a NaN NTK change, silently
    (dict(y_train=torch.cat([Y, -Y], 1)), "1 output"),                  # would train towards the row means
    (dict(y_train=torch.where(X > 0, math.nan, Y)), "finite"),
    (dict(x_train=X[:0], y_train=Y[:0]), "N >= 1"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(record_steps=[1.5]), "record_steps"),
    (dict(record_steps=[-3]), "record_steps"),
])
def test_bad_arguments_raise(kwargs, message):
    args = dict(x_train=X, y_train=Y, ensemble_size=2, learning_rate=0.1, record_steps=[0, 1]) | kwargs
    with pytest.raises(ValueError, match=message):
        train_ensemble(_net(), **args)
    with pytest.raises(ValueError, match="y_train"):
        train_ensemble(_net(), X, Y[:3], ensemble_size=2, learning_rate=0.1, record_steps=[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_matches_cpu():
    kwargs = dict(ensemble_size=2, learning_rate=0.1, record_steps=[0, 20], dtype=torch.float64)
    cpu = train_ensemble(_net(), X, Y, device="cpu", **kwargs)
    gpu = train_ensemble(_net(), X, Y, device="cuda", keep_networks=True, **kwargs)
    torch.testing.assert_close(cpu.test_outputs, gpu.test_outputs, rtol=1e-9, atol=1e-10)
    # the kept members stay on the GPU; CPU inputs are moved there, the outputs come back to the CPU
    assert all(p.device.type == "cuda" for m in gpu.networks for p in m.parameters())
    outputs = gpu.outputs(X)
    assert outputs.device.type == "cpu" and torch.equal(outputs, gpu.test_outputs[-1])


def _towers(param):
    """Two towers summed: two readout layers, both trained in readout-only mode."""
    return ntkgp.parallel(ntkgp.serial(ntkgp.Dense(24, 2.0, 0.1, param), ntkgp.Erf(), ntkgp.Dense(1, 1.0, 0.1, param)),
                          ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1, param), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1, param)))


def test_readout_layers_are_every_dense_layer_that_reaches_the_output():
    model = _towers("ntk").build(in_features=1, seed=0)
    assert sorted(readout_parameters(model)) == ["branches.0.2.bias", "branches.0.2.weight", "branches.1.2.bias",
                                                 "branches.1.2.weight"]
    assert layer_groups(model, X.float())["readout"] == ["branches.0.2.weight", "branches.1.2.weight"]
    residual = ntkgp.serial(ntkgp.Dense(8), ntkgp.residual(ntkgp.ReLU(), ntkgp.Dense(8, 2.0, 0.1)), ntkgp.Dense(1),
                            ntkgp.Identity())
    assert readout_parameters(residual.build(in_features=1)) == ["2.weight"]
    with pytest.raises(ValueError, match="ends in ActivationModule"):
        readout_parameters(ntkgp.serial(ntkgp.Dense(8), ntkgp.ReLU()).build(in_features=1))


def test_readout_only_training_refuses_an_output_with_an_untrained_identity_path():
    """A residual block at the output was accepted with its inner Dense as the readout; the features its
    identity branch passes on are not trained, so the readout's tangent kernel (diagonal 0.70, 0.42, ...)
    is not the NNGP kernel the comparison uses (1.98, 1.04, ...): readout-only training did not follow
    the NNGP gradient flow."""
    ending_in_residual = ntkgp.serial(ntkgp.Dense(16), ntkgp.ReLU(), ntkgp.Dense(1),
                                      ntkgp.residual(ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1)))
    for net in (ending_in_residual, ntkgp.parallel(ntkgp.Dense(1), ntkgp.Identity())):
        with pytest.raises(ValueError, match="needs a Dense layer at the end of every path to the output"):
            readout_parameters(net.build(in_features=1))
        with pytest.raises(ValueError, match="end of every path"):
            train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[1], readout_only=True)
    # full training still groups the inner Dense as the readout
    assert layer_groups(ending_in_residual.build(in_features=1), X.float())["readout"] == ["3.branches.1.1.weight"]


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("towers", [False, True])
def test_readout_only_training_is_the_linear_model_of_each_members_own_kernel(param, towers):
    """Readout-only networks are linear in what is trained, so gradient descent on them is exactly
    ``f_s = f_0 − Θ̂ Θ̂_dd⁻¹ (I − (I − ηΘ̂_dd/m)^s)(f_0 − Y)`` with each member's own fixed readout tangent
    kernel: trainer, empirical kernel and the discrete-time predictor must agree to rounding."""
    xt = torch.linspace(-3.5, 3.5, 9, dtype=torch.float64).unsqueeze(-1)
    steps, lr, net = [0, 3, 40, 200], 0.3, (_towers(param) if towers else _net(param))
    h = train_ensemble(net, X, Y, ensemble_size=3, learning_rate=lr, record_steps=steps, x_test=xt,
                       readout_only=True, dtype=torch.float64)
    model = net.build(in_features=1, seed=0, ensemble_size=3, dtype=torch.float64)
    readouts = readout_parameters(model)
    assert len(readouts) == (4 if towers else 2)
    rates = equivalent_learning_rates(model, lr)
    scales = {name: rates[name] / lr if name in readouts else 0.0 for name in dict(model.named_parameters())}
    both = torch.cat([X, xt])
    theta = ntkgp.finite.empirical_ntk(model, both, parameter_scales=scales)          # (E, 14, 14)
    with torch.no_grad():
        f0 = model(both)                                                                # (E, 14, 1)
    for member in range(3):
        k = theta[member]
        _, test = ntkgp.predict.gradient_descent_mse(k[:5, :5], Y, fx_train_0=f0[member, :5],
                                                     ntk_test_train=k[5:, :5], fx_test_0=f0[member, 5:],
                                                     steps=torch.tensor(steps), learning_rate=lr)
        torch.testing.assert_close(h.test_outputs[:, member], test, rtol=1e-10, atol=1e-11)
    assert float((h.test_outputs[-1] - h.test_outputs[0]).abs().max()) > 0.1   # it did train


def test_a_seed_too_large_for_the_last_chunk_is_refused_before_any_training(monkeypatch):
    # chunk c is seeded seed + 1_000_003 c: the last one passed 2**64 and net.build refused it only after
    # the earlier chunks had trained
    calls = []
    monkeypatch.setattr(train_module, "_train_chunk", lambda *args: calls.append(args))
    with pytest.raises(ValueError, match="last of 2 chunks"):
        train_ensemble(_net(), X, Y, ensemble_size=4, chunk_size=2, learning_rate=0.1, record_steps=[1],
                       seed=2**64 - 2)
    assert calls == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match="seed"):
        train_ensemble(_net(), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[1], seed=1.5)
    history = train_ensemble(_net(), X, Y, ensemble_size=2, chunk_size=2, learning_rate=0.1, record_steps=[0],
                             seed=2**64 - 1)   # one chunk: the largest seed torch takes
    assert history.settings["seed"] == 2**64 - 1


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_training_and_empirical_ntks_under_a_callers_no_grad_or_inference_mode(mode):
    # both differentiate the network themselves: under no_grad training failed ("`inputs` argument to
    # grad() cannot be empty"), under inference_mode the empirical NTK did ("does not require grad")
    net = _net(width=16)
    probe = torch.linspace(-2.0, 2.0, 4, dtype=torch.float64).unsqueeze(-1)
    plain = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

    def run(x, y):
        history = train_ensemble(net, x, y, ensemble_size=3, learning_rate=0.2, record_steps=[0, 4], probe=x[:3],
                                 dtype=torch.float64, device="cpu")
        built = net.build(1, seed=3, dtype=torch.float64)
        return (history.test_outputs, history.ntk_change, ntkgp.finite.empirical_ntk(built, x, probe),
                ntkgp.finite.empirical_ntk(plain, x),                     # the Jacobian route
                ntkgp.finite.monte_carlo_kernel(net, x, n_samples=2).ntk), built

    expected, _ = run(X, Y)
    with mode():
        got, built = run(X.clone(), Y.clone())     # under inference_mode these are inference tensors
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)
    # a network built under the mode is made of normal tensors: it trains after the mode is left
    built(X).sum().backward()
    assert all(p.grad is not None for p in built.parameters())


def test_a_spec_made_inside_inference_mode_builds_and_trains():
    """A spec made (or its variances set) inside ``torch.inference_mode()`` had inference
    tensors as raw variances and anchors: every build, inside the mode or after it, failed with
    "Inference tensors cannot be saved for backward", and so did train_ensemble."""
    with torch.inference_mode():
        net = _net(width=16)
        net[0].weight_var = 1.7
        kernel = ntkgp.NNGPKernel(ntkgp.mlp(1, "erf", 1.5, 0.1))
        kernel.net[0].bias_var = 0.2
        inside = train_ensemble(net, X.clone(), Y.clone(), ensemble_size=2, learning_rate=0.2, record_steps=[0, 2],
                                dtype=torch.float64, device="cpu")
    outside = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.2, record_steps=[0, 2], dtype=torch.float64,
                             device="cpu")
    torch.testing.assert_close(inside.test_outputs, outside.test_outputs, rtol=0, atol=0)
    net.build(1, seed=0, dtype=torch.float64)(X).sum().backward()
    kernel(X).to_dense().sum().backward()   # the variances are learnable after the mode is left
    assert all(p.grad is not None for p in kernel.parameters())


def test_train_ensemble_refuses_the_meta_device():
    """device="meta" built the networks and then failed inside torch's .item()."""
    net = ntkgp.mlp(1, "erf", 2.0, 0.1, width=4)
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        train_ensemble(net, x, x[:, :1], ensemble_size=2, learning_rate=0.1, record_steps=[1],
                       device="meta", dtype=torch.float64)


@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_readout_only_training_runs_the_frozen_layers_once(param, monkeypatch):
    """The layers below the readout do not change in readout-only training: their output on the
    training inputs is computed once, not at every step, and training gives what running the whole
    network at every step gives."""
    from ntkgp.layers.dense import DenseModule

    kwargs = dict(ensemble_size=3, learning_rate=0.3, record_steps=[0, 5, 60], probe=X, readout_only=True,
                  dtype=torch.float64)
    calls = []
    forward = DenseModule.forward
    monkeypatch.setattr(DenseModule, "forward", lambda self, x: calls.append(self.weight.shape[-2]) or forward(self, x))
    cached = train_ensemble(_net(param), X, Y, **kwargs)
    runs = calls.count(1)                                   # the input layer's (1 input feature)
    assert runs < 30, runs   # the cache, and the records (outputs, empirical NTKs); not once per step (60)
    monkeypatch.setattr(train_module, "_frozen_body", lambda model: None)
    whole = train_ensemble(_net(param), X, Y, **kwargs)
    assert calls.count(1) - runs >= runs + 59
    for name in ("test_outputs", "train_loss", "weight_change", "ntk_change"):
        torch.testing.assert_close(getattr(cached, name), getattr(whole, name), rtol=1e-13, atol=1e-14)
    assert float((cached.test_outputs[-1] - cached.test_outputs[0]).abs().max()) > 0.1   # it did train


def test_an_ensemble_of_one_member_has_a_mean_but_no_variance():
    h = train_ensemble(_net(), X, Y, ensemble_size=1, learning_rate=0.2, record_steps=[0, 5], dtype=torch.float64)
    assert h.mean.shape == (2, 5, 1) and torch.isfinite(h.mean).all()
    for name in ("variance", "standard_error"):
        with pytest.raises(ValueError, match="An ensemble of one member has no variance"):
            getattr(h, name)


def test_an_empty_test_set_has_empty_statistics_without_a_warning():
    """torch's var() over members warned about the degrees of freedom when there is no test point."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = train_ensemble(_net(), X, Y, ensemble_size=3, learning_rate=0.2, record_steps=[0, 5],
                           x_test=X[:0], dtype=torch.float64, engine="stacked")
        assert h.variance.shape == h.standard_error.shape == h.mean.shape == (2, 0, 1)
    assert (h.train_loss[-1] < h.train_loss[0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["post_activation_residual", "layernorm_after_concatenation"])
def test_architectures_with_feature_means_train_as_their_kernels_predict(name):
    """Gradient descent on the 5-point sin data (half the largest stable rate) against the exact
    discrete-time NTK predictions, for kernels that need the branches' means: 128 members at
    width 512 keep the mean within 3 standard errors + 0.02 at every test point after 10, 100 and
    2000 steps (measured: all points; the erf MLP of the compare preset likewise), and the
    variance's median ratio within [0.7, 1.3] (measured 0.79-1.08; the erf MLP 0.74-0.94).
    About 3 minutes each on 2 CPU cores."""
    width = 512
    nets = {
        "post_activation_residual": ntkgp.serial(
            ntkgp.Dense(width, 2.25, 0.0025), ntkgp.Erf(),
            ntkgp.residual(ntkgp.Dense(width, 1.0, 0.0025), ntkgp.Erf(c=0.3)), ntkgp.Dense(1, 2.25, 0.0025)),
        "layernorm_after_concatenation": ntkgp.serial(
            ntkgp.Dense(width, 2.25, 0.0025), ntkgp.parallel(ntkgp.Erf(), ntkgp.Erf(c=0.5), join="concat"),
            ntkgp.LayerNorm(), ntkgp.Dense(1, 2.25, 0.0025)),
    }
    net, y = nets[name], Y[:, 0]
    x_test = torch.linspace(-math.pi, math.pi, 25, dtype=torch.float64).unsqueeze(-1)
    lr = 0.5 * ntkgp.predict.GradientFlow(net, X, y).max_learning_rate
    steps = [10, 100, 2000]
    history = train_ensemble(net, X, y, ensemble_size=128, learning_rate=lr, record_steps=steps, x_test=x_test,
                             dtype=torch.float64, device="cpu", seed=1)
    exact = ntkgp.predict.gradient_flow(net, X, y, x_test, learning_rate=lr, steps=torch.tensor(steps))
    mean, variance = history.mean[..., 0], history.variance[..., 0]
    assert bool(((mean - exact.mean.detach()).abs() <= 3 * (variance / 128).sqrt() + 0.02).all())
    ratio = (variance / exact.variance.detach()).median(-1).values
    assert bool(((ratio > 0.7) & (ratio < 1.3)).all()), ratio


def test_readout_only_training_refuses_a_product_at_the_output():
    """A product of branches at the output is bilinear in their readouts, not the linear model of
    the NNGP kernel; all-layer training takes it."""
    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.parallel(ntkgp.Dense(1), ntkgp.Dense(1), join="prod"))
    with pytest.raises(ValueError, match="bilinear"):
        train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[1], readout_only=True)
    history = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[0, 5])
    assert torch.isfinite(history.test_outputs).all()


@pytest.mark.parametrize("engine", ["stacked", "auto"])
def test_overflowing_targets_are_refused_not_reported_as_a_divergence_at_step_0(engine):
    """A float32 loss that overflows before any step was diverged_at=0 with no records, and no word
    of what was wrong."""
    with pytest.raises(ValueError, match=r"initial training loss is not finite in torch\.float32.*float64"):
        train_ensemble(_net(), X, Y * 1e30, ensemble_size=2, learning_rate=0.1, record_steps=[0, 10],
                       dtype=torch.float32, engine=engine)
    h = train_ensemble(_net(), X, Y * 1e30, ensemble_size=2, learning_rate=1e-62, record_steps=[0, 10],
                       dtype=torch.float64, engine=engine)
    assert h.diverged_at is None and h.steps.tolist() == [0, 10]


@pytest.mark.parametrize("name", ["x_train", "y_train", "x_test", "probe"])
def test_points_beyond_the_dtypes_range_are_refused_by_name_before_building(name, monkeypatch):
    """float64 values finite as given but beyond float32: x_test's records were NaN without a word,
    and the probe's was "x1 contains NaN" from the NTK, after the ensemble was built."""
    args = dict(x_train=X, y_train=Y, x_test=X, probe=X)
    args[name] = args[name] * 1e39
    monkeypatch.setattr(ntkgp.Layer, "build", lambda *a, **k: pytest.fail("built before refusing"))
    largest = re.escape(f"{float(args[name].abs().max()):.3g}")
    message = rf"{name} holds values beyond the range of torch\.float32 \(largest magnitude {largest}\)"
    with pytest.raises(ValueError, match=message):
        train_ensemble(_net(), **args, ensemble_size=2, learning_rate=0.1, record_steps=[0, 4],
                       dtype=torch.float32)


def test_targets_are_refused_as_the_predictors_refuse_them():
    """Integer targets were trained on (cast to the networks' dtype) while every predictor the
    ensemble is compared with refused them; booleans, complex numbers and NaN were refused by one
    message that did not say which."""
    kwargs = dict(ensemble_size=2, learning_rate=0.1, record_steps=[0, 1])
    for y in (torch.arange(5), torch.ones(5, dtype=torch.bool), Y.to(torch.complex64)):
        with pytest.raises(ValueError, match=rf"y_train must be a floating-point tensor, got {y.dtype}"):
            train_ensemble(_net(), X, y, **kwargs)
        with pytest.raises(ValueError, match="y_train must be a floating-point tensor"):
            ntkgp.predict.gradient_flow(_net(), X, y, X, t=1.0)
    with pytest.raises(ValueError, match="y_train must hold finite numbers"):
        train_ensemble(_net(), X, torch.full((5,), float("nan")), **kwargs)
    assert train_ensemble(_net(), X, Y.half(), **kwargs).test_outputs.dtype == torch.float32


@pytest.mark.parametrize("param", ["ntk", "standard"])
def test_relative_changes_of_parameters_and_kernels_that_are_zero_and_stay_so_are_zero(param):
    """With every variance 0 nothing can move (standard: the rates are 0; NTK: the gradients are),
    and weight_change (standard) and ntk_change (both) read 0/0 = NaN, while layer_change read 0."""
    net = ntkgp.serial(ntkgp.Dense(1, 0.0, 0.0, parameterization=param))
    h = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.5, record_steps=[0, 10], probe=X[:2],
                       dtype=torch.float64)
    assert h.ntk_change.eq(0).all() and h.weight_change.eq(0).all()
    assert all(v.eq(0).all() for v in h.layer_change.values())


def test_targets_of_the_wrong_width_and_fused_readout_only_are_refused_before_any_build(monkeypatch):
    """Both were refused after the first chunk was built: 2.75 s and 0.9 GB at width 2000, depth 2,
    64 members in float64 for y_train with 3 columns; 1.63 s for engine='fused' with readout_only."""
    net = ntkgp.mlp(2, "erf", 2.25, 0.0025, width=40)
    _refuse_ensemble_builds(monkeypatch, net)
    kwargs = dict(ensemble_size=64, learning_rate=0.1, record_steps=[0, 10], dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match=r"The network has 1 output\(s\) but y_train has 3 column\(s\)\."):
        train_ensemble(net, X, torch.zeros(5, 3), **kwargs)
    with pytest.raises(ValueError, match=r"engine='fused' does not apply: it trains every parameter \(not the readout "
                                         r"alone\)\. Use engine='stacked' or 'auto'\."):
        train_ensemble(net, X, Y, readout_only=True, engine="fused", **kwargs)
    with pytest.raises(ValueError, match="no parameters"):
        train_ensemble(ntkgp.serial(ntkgp.ReLU()), X, Y, **kwargs)


def test_user_activations_that_look_at_their_values_train():
    """The output width is checked on one real member, not on the meta device, where a user
    activation with a data-dependent branch failed ("Tensor.item() cannot be called on meta tensors")."""
    def clipped_tanh(x):
        return x if bool((x.abs() > 1e6).any()) else torch.tanh(x)

    net = ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1), ntkgp.Elementwise(clipped_tanh, None), ntkgp.Dense(1, 1.0, 0.1))
    h = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[0, 3], dtype=torch.float64)
    assert h.train_loss.shape[0] == 2 and bool(h.train_loss[-1].lt(h.train_loss[0]).all())


def test_a_module_instead_of_a_spec_is_named():
    """A torch module, or a network built from a spec, failed deep inside the chunking as
    "'Sequential' object has no attribute 'build'"."""
    for model in (torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
                  _net().build(in_features=1)):
        with pytest.raises(ValueError, match=r"train_ensemble takes a network spec .* got Sequential \(a network "
                                             r"built by net\.build\(\.\.\.\)\)"):
            train_ensemble(model, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[0, 1])


@pytest.mark.parametrize("activation", [ntkgp.Monomial(0), ntkgp.Hermite(0), ntkgp.Polynomial([0.7])],
                         ids=["monomial0", "hermite0", "constant_polynomial"])
@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("step", ["stacked", "autograd"])
def test_a_layer_feeding_a_constant_activation_trains_with_zero_gradient(activation, param, step, monkeypatch):
    """A constant activation leaves the layer before it unused by the output: autograd refused to
    return its gradient ("appears to not have been used in the graph"), and training, the empirical
    NTK and Monte-Carlo kernels crashed on a network whose kernels are fine. Its gradient is 0,
    the features are the constant ``c``, so the model is linear with the exact tangent kernel
    ``Θ = σ_w² c² + σ_b²`` at any width, and every member follows ``f_s = ȳ + (f_0 − ȳ)(1 − ηΘ)^s``."""
    if step == "autograd":
        monkeypatch.setattr(train_module, "_DenseStep", _Autograd)
    def network(param):
        return ntkgp.serial(ntkgp.Dense(16, 1.3, 0.2, param), activation, ntkgp.Dense(1, 1.5, 0.1, param))

    net = network(param)
    theta = float(network("ntk").kernel(X[:1]).ntk.detach())   # the kernel the equivalent rates train with
    lr, steps = 0.3, 9
    history = train_ensemble(net, X, Y, x_test=X, probe=X, ensemble_size=3, learning_rate=lr,
                             record_steps=[0, steps], dtype=torch.float64, engine="stacked")
    f0, fs = history.test_outputs[0], history.test_outputs[-1]
    expected = Y.mean() + (f0 - Y.mean()) * (1 - lr * theta) ** steps
    torch.testing.assert_close(fs, expected, rtol=1e-12, atol=1e-13)
    assert float(history.ntk_change.abs().max()) < 1e-12 and float(history.layer_change["input"].abs().max()) == 0.0


@pytest.mark.parametrize("engine, readout_only", [("stacked", False), ("stacked", True), ("fused", False)])
def test_a_trained_chunk_is_freed_when_train_ensemble_returns(engine, readout_only):
    """The stacked step's forward hooks held the step object, which held the model: every chunk's
    weights formed a reference cycle and stayed in memory until Python's cycle collector ran
    (a review measured 32 MB per call at width 512, E = 32, and RSS 249 -> 600 MB over 40 calls)."""
    import gc

    from ntkgp.layers.dense import DenseModule

    if engine == "fused" and isinstance(ntkgp.finite.fused.library(torch.float64), str):
        pytest.skip("no C compiler to build the fused kernel")
    net = ntkgp.serial(ntkgp.Dense(16), ntkgp.Erf(), ntkgp.Dense(1))
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).unsqueeze(-1)

    def alive() -> int:
        # isinstance reads __class__ of every object alive, torch's deprecated module aliases included
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return sum(isinstance(o, DenseModule) for o in gc.get_objects())

    gc.collect()
    before = alive()
    gc.disable()
    try:
        for _ in range(3):
            train_ensemble(net, x, torch.sin(x), x_test=x, ensemble_size=4, chunk_size=2, learning_rate=0.5,
                           record_steps=[0, 3], readout_only=readout_only, engine=engine, progress=False,
                           dtype=torch.float64, device="cpu")
        assert alive() == before
    finally:
        gc.enable()


def test_a_chunk_that_fails_before_training_takes_its_hooks_off(monkeypatch):
    """The step's hooks went on before the try whose finally takes them off: an error in between
    (the probe's first empirical NTK running out of memory, say) left them on the model, which they
    keep in a reference cycle."""
    models = []

    def out_of_memory(model, *args, **kwargs):
        models.append(model)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_module, "_empirical_ntk", out_of_memory)
    net = ntkgp.serial(ntkgp.Dense(16), ntkgp.Erf(), ntkgp.Dense(1))
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).unsqueeze(-1)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_ensemble(net, x, torch.sin(x), probe=x, ensemble_size=2, learning_rate=0.5, record_steps=[0, 3],
                       engine="stacked", dtype=torch.float64, device="cpu")
    assert [len(m._forward_hooks) for m in models[0].modules()] == [0] * len(list(models[0].modules()))


@pytest.mark.parametrize("engine", ["stacked", "fused"])
def test_a_callers_autocast_does_not_change_the_training(engine):
    """Under a caller's CPU bfloat16 autocast the forward passes used the bfloat16 copies of the weights
    that autocast caches, which the in-place steps left stale: after 20 steps at width 64 the stacked
    engine's losses were 0.11-0.63 instead of 0.002-0.018, and the records of both engines up to 1.9 and
    2.7 off (the fused kernel trained right, but the losses and outputs were read through the initial
    weights). Training switches autocast off, as net.kernel and the empirical kernels do: the same bits
    as without it."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.sin(x.sum(-1))
    net = ntkgp.mlp(2, "erf", 2.0, 0.1, width=64, out_dim=1)
    kwargs = dict(ensemble_size=4, learning_rate=0.2, record_steps=[0, 20], probe=x[:2], engine=engine,
                  dtype=torch.float32, device="cpu")
    expected = train_ensemble(net, x, y, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = train_ensemble(net, x, y, **kwargs)
    assert got.settings["engine"] == engine
    for name in ("test_outputs", "train_loss", "weight_change", "ntk_change"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@needs_cpu_half_products
def test_weight_changes_of_float16_networks_are_summed_without_overflow():
    """The squared norm of a width-512 layer's 262 144 standard-normal weights (about 262 144) is
    beyond float16's largest value, 65504: summed in float16 it was inf, and a network that moved
    recorded a total and hidden-layer weight change of 0 (change / inf). Against float64 sums of the
    same float16 tensors: each difference is rounded to float16 (2⁻¹¹ relative) and so is the ratio
    returned, hence rtol 2e-3."""
    torch.manual_seed(0)
    model = ntkgp.mlp(2, "relu", 2.0, 0.1, width=512).build(in_features=3, seed=0, ensemble_size=2,
                                                            dtype=torch.float16)
    groups = layer_groups(model, torch.randn(4, 3, dtype=torch.float16))
    changes = train_module._Changes(model, groups)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    total, per_group = changes.relative()
    assert total.dtype == torch.float16 and all(v.dtype == torch.float16 for v in per_group.values())

    def expected(names):
        moved = sum(model.get_parameter(n).double().sub(changes.initial[n].double()).square().flatten(1).sum(1)
                    for n in names)
        return (moved / sum(changes.initial[n].double().square().flatten(1).sum(1) for n in names)).sqrt()

    torch.testing.assert_close(total.double(), expected(list(changes.initial)), rtol=2e-3, atol=0)
    for group, names in groups.items():   # NTK parameterization: the stored weights are the ω
        torch.testing.assert_close(per_group[group].double(), expected(names), rtol=2e-3, atol=0)


@needs_cpu_half_products
def test_a_diverging_member_whose_probe_kernel_overflows_is_recorded_not_refused():
    """empirical_ntk refuses kernels that overflow; the records of training must not: a member whose
    training diverges overflows its probe kernel while its loss is still below the divergence limit
    (float16, 4x the stability limit, probe points 80x the training ones: member 1 at step 2, loss
    78, kernel 1.08e5 in float32 > 65504; the largest before, 4.3e4). That change is recorded as
    infinite and the run reports its divergence at step 3 (float32's losses there reach 5.8e5,
    beyond float16), not a NonFiniteKernelError."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.sin(x[:, :1])
    net = ntkgp.serial(ntkgp.Dense(64, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))
    rate = 4 * float(ntkgp.predict.max_learning_rate(net.kernel(x).ntk))
    history = train_ensemble(net, x, y, ensemble_size=4, learning_rate=rate, record_steps=range(10), probe=x[:4] * 80,
                             dtype=torch.float16, seed=0, engine="stacked", device="cpu")
    assert history.diverged_at == 3 and history.steps.tolist() == [0, 1, 2]
    assert history.ntk_change[:2].isfinite().all() and history.ntk_change[2, 1] == math.inf
    assert history.train_loss[2].isfinite().all()


def test_the_kernel_change_of_float32_kernels_near_float32s_limit_is_finite():
    """Inputs of 1e9 (probe points of 1.6e10, kernels of ~1e21: finite in float32) made the Frobenius
    norms' squares overflow float32, and the recorded NTK change was inf / inf = NaN from step 1.
    The norms are now taken in float64: the change matches the float64 run's (same draws) to the
    float32 rounding of kernels whose change is 1.7e-3 of their size at step 5 (7e-5 relative
    measured, 1e-3 allowed)."""
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).unsqueeze(-1)
    net = ntkgp.serial(ntkgp.Dense(32, 2.0, 0.1), ntkgp.ReLU(), ntkgp.Dense(1, 1.0, 0.1))
    changes = [train_ensemble(net, x * 1e9, torch.sin(3 * x), ensemble_size=2, learning_rate=0.5e-18,
                              record_steps=[0, 5, 20], probe=x[:3] * 1.6e10, dtype=dtype, seed=0, engine="stacked",
                              device="cpu").ntk_change for dtype in (torch.float32, torch.float64)]
    assert changes[0].dtype == torch.float32 and changes[0].isfinite().all()
    torch.testing.assert_close(changes[0].double(), changes[1], rtol=1e-3, atol=0)
    assert changes[1][1:].min() > 1e-3   # the changes compared are not rounding


def test_a_network_too_large_for_the_memory_is_refused_before_any_weight_is_drawn(monkeypatch):
    """A width no machine holds failed in torch's allocator after the meta build ("can't allocate
    memory: you tried to allocate 800000000000000 bytes"), and one that only just did not fit was
    drawn on credit until the operating system killed the process. The lower bound ``2 c P b`` (a
    chunk's weights and their initial copy) is checked first, with the shapes alone, and refused with
    torch's out-of-memory error (a RuntimeError, as the allocator's)."""
    huge = ntkgp.mlp(2, "relu", width=10**7)   # P = 4 · 10⁷ + 10¹⁴ + 1 with d = 1
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"1 member\(s\) of this network \(100,000,040,000,001 "
                                                          r"parameters each, in torch\.float32\) needs at least .* "
                                                          r"one member does not fit"):
        train_ensemble(huge, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[0, 1], device="cpu")

    net = ntkgp.mlp(2, "relu", width=128)   # P = 128 + 128 + 128² + 128 + 128 + 1 = 16 897 parameters
    params = 16_897
    builds = []
    original = net.build

    def build(*args, **kwargs):
        builds.append(str(kwargs.get("device")))
        return original(*args, **kwargs)

    monkeypatch.setattr(net, "build", build)
    # 4 members in float64 need 2 · 4 · P · 8 = 1 081 408 bytes, 1 member 270 352
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2 * 4 * params * 8 - 1)
    kwargs = dict(ensemble_size=4, learning_rate=0.1, record_steps=[0, 1], dtype=torch.float64, device="cpu")
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"Training 4 member\(s\) .* needs at least 0\.00101 GiB on "
                                                          r"cpu, more than its 0\.00101 GiB: train fewer members at "
                                                          r"once \(a smaller chunk_size\)"):
        train_ensemble(net, X, Y, **kwargs)
    assert set(builds) == {"meta"}   # shapes only: nothing drawn
    h = train_ensemble(net, X, Y, chunk_size=2, **kwargs)   # 2 · 2 · P · 8 bytes fit
    assert h.train_loss.shape == (2, 4)
    # float32 halves what a member needs: the 4 members fit in one chunk
    assert train_ensemble(net, X, Y, **{**kwargs, "dtype": torch.float32}).settings["chunk_size"] == 4


def test_the_member_built_to_check_the_outputs_is_freed_before_training():
    """The one member built to check the network's output width stayed alive through the training of
    every chunk: memory of a whole member for nothing (check_memory counts none)."""
    import gc

    from ntkgp.layers.dense import DenseModule

    alive, training = [], []

    def tanh(x):
        if training and torch.is_grad_enabled() and not alive:   # the first forward of training
            gc.collect()
            with warnings.catch_warnings():   # isinstance reads every object's __class__, deprecated aliases too
                warnings.simplefilter("ignore", FutureWarning)
                alive.append(sum(isinstance(o, DenseModule) for o in gc.get_objects()))
        return torch.tanh(x)

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        before = sum(isinstance(o, DenseModule) for o in gc.get_objects())
    net = ntkgp.serial(ntkgp.Dense(8, 1.0, 0.1), ntkgp.Elementwise(tanh, None), ntkgp.Dense(1, 1.0, 0.1))
    training.append(True)   # Elementwise calls the function on sample values when the spec is made
    train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[0, 1], dtype=torch.float64,
                   device="cpu", engine="stacked")
    assert alive == [before + 2]   # the chunk's two Dense layers, not the checked member's too


def test_records_too_large_for_the_memory_are_refused_before_any_training(monkeypatch):
    """The recorded test outputs, ``(T, E, M, k)``, are kept on the CPU per chunk and then joined:
    beyond the memory they failed only once every chunk had trained."""
    builds = []
    net = ntkgp.mlp(2, "relu", width=8)
    original = net.build
    monkeypatch.setattr(net, "build", lambda *a, **k: builds.append(str(k.get("device"))) or original(*a, **k))
    # 50 steps x 4 members x 1000 test points x 1 output, twice, in float64: 3.2 MB
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2 * 50 * 4 * 1000 * 8 - 1)
    x_test = torch.linspace(-1, 1, 1000, dtype=torch.float64).unsqueeze(-1)
    kwargs = dict(ensemble_size=4, learning_rate=0.1, x_test=x_test, dtype=torch.float64, device="cpu")
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"Keeping the 200,000 recorded test outputs \(in "
                                                          r"torch\.float64\) needs at least 0\.00298 GiB on cpu.*"
                                                          r"record fewer steps, members or test points"):
        train_ensemble(net, X, Y, record_steps=range(50), **kwargs)
    assert set(builds) == {"meta"}
    assert train_ensemble(net, X, Y, record_steps=range(49), **kwargs).test_outputs.shape == (49, 4, 1000, 1)


def test_auto_takes_the_stacked_step_when_no_step_is_taken(monkeypatch):
    """With ``record_steps=[0]`` nothing is trained, yet ``engine="auto"`` built the fused kernel (compiling
    it on first use) and reported ``settings["engine"] == "fused"``."""
    monkeypatch.setattr(train_module, "fused_steps", lambda *args: pytest.fail("the fused kernel was built"))
    net = ntkgp.mlp(2, "relu", width=16)
    h = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[0], dtype=torch.float64,
                       device="cpu")
    assert h.settings["engine"] == "stacked" and h.steps.tolist() == [0]
    torch.testing.assert_close(h.test_outputs[0], net.build(in_features=1, ensemble_size=2, dtype=torch.float64)(X),
                               rtol=0, atol=0)


_NOTICE = "Attempting to run cuBLAS, but there was no current CUDA context! Attempting to set the primary context..."


def _net_warning(message):
    """A network whose activation warns ``message`` in passes with autograd (as torch's notice comes from
    the backward passes on a GPU)."""
    def erf_with_a_notice(z):
        if torch.is_grad_enabled():
            warnings.warn(message, UserWarning, stacklevel=1)
        return torch.erf(z)

    return ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.Numerical(erf_with_a_notice), ntkgp.Dense(1, 1.5, 0.1))


@pytest.mark.parametrize("message, hidden", [(_NOTICE, True), ("another notice", False)])
def test_torchs_cuda_context_notice_is_hidden_from_the_caller(message, hidden, monkeypatch):
    """torch warns "Attempting to run cuBLAS, but there was no current CUDA context!" at the first
    backward pass on a GPU, then sets the context itself (harmless): ``ntkgp compare`` printed it, and
    code run with warnings as errors failed. Raised here by the activation in the training steps'
    forward passes (the GPU raised it in their backward passes), on a machine taken to have CUDA (only
    there is it hidden); any other warning still reaches the caller."""
    monkeypatch.setattr(ntkgp._warnings, "_cuda_available", lambda: True)
    net = _net_warning(message)
    x = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64).unsqueeze(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if hidden:
            h = train_ensemble(net, x, torch.sin(x), ensemble_size=2, learning_rate=0.1, record_steps=[0, 3],
                               dtype=torch.float64, device="cpu")
            assert h.steps.tolist() == [0, 3]
        else:
            with pytest.raises(UserWarning, match="another notice"):
                train_ensemble(net, x, torch.sin(x), ensemble_size=2, learning_rate=0.1, record_steps=[0, 3],
                               dtype=torch.float64, device="cpu")


def _empirical_ntk(net, x):
    model = net.build(in_features=1, seed=0, dtype=torch.float64)
    return ntkgp.finite.empirical_ntk(model, x)


def _monte_carlo(net, x):
    return ntkgp.finite.monte_carlo_kernel(net, x, n_samples=2, ensemble_batch=2).ntk


def _fit(net, x):
    from ntkgp.models import NetworkGP, fit

    return torch.tensor(fit(NetworkGP(x, torch.sin(x[:, 0]), net.double(), kernel="nngp"), steps=2))


@pytest.mark.filterwarnings("ignore:Numerical.erf_with_a_notice:RuntimeWarning")   # fit's gradient quadrature
@pytest.mark.parametrize("run", [_empirical_ntk, _monte_carlo, _fit], ids=["empirical_ntk", "monte_carlo", "fit"])
def test_every_backward_pass_ntkgp_runs_for_the_caller_hides_torchs_cuda_context_notice(run, monkeypatch):
    """The notice comes with the process's first backward pass on a GPU, whichever runs it: the empirical
    kernels, their Monte-Carlo average and ``fit`` differentiate for the caller as training does (all
    through ``ntkgp._autograd.differentiates``), and raised it into code with warnings as errors."""
    monkeypatch.setattr(ntkgp._warnings, "_cuda_available", lambda: True)
    x = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64).unsqueeze(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(run(_net_warning(_NOTICE), x)).all()


def test_without_cuda_training_sets_no_filter_for_the_notice(monkeypatch):
    """Where torch has no CUDA it cannot print the notice: training sets no filter for it (entering
    ``warnings.catch_warnings`` swaps the process's filters, makes every module forget the warnings it has
    shown, and is not thread-safe before Python 3.14)."""
    monkeypatch.setattr(ntkgp._warnings, "_cuda_available", lambda: False)
    filters: list[list] = []

    def erf_noting_the_filters(z):
        filters.append(list(warnings.filters))
        return torch.erf(z)

    net = ntkgp.serial(ntkgp.Dense(8, 2.0, 0.1), ntkgp.Numerical(erf_noting_the_filters), ntkgp.Dense(1, 1.5, 0.1))
    x = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64).unsqueeze(-1)
    train_ensemble(net, x, torch.sin(x), ensemble_size=2, learning_rate=0.1, record_steps=[0, 3],
                   dtype=torch.float64, device="cpu")
    patterns = {f[1].pattern for seen in filters for f in seen if f[1] is not None}
    assert filters and not any("cuBLAS" in pattern for pattern in patterns), patterns


@pytest.mark.parametrize(("engine", "readout_only"), [("stacked", False), ("fused", False), ("stacked", True)],
                         ids=["stacked", "fused", "readout only"])   # the fused engine trains every parameter
def test_kept_networks_give_the_members_outputs_on_new_inputs(engine, readout_only):
    """``keep_networks=True`` keeps the trained members (one stacked module per chunk, in member order), and
    ``outputs(x)`` evaluates them on new inputs: on the test inputs it gives the last record exactly, and
    on new points what a run recording there gives (the same seed, chunks and engine: the same members)."""
    net = ntkgp.mlp(2, "relu", 2.0, 0.05, width=16)
    x_new = torch.linspace(-4.0, 4.0, 9, dtype=torch.float64).unsqueeze(-1)
    lr = 0.5 * ntkgp.predict.GradientFlow(net, X, Y).max_learning_rate
    kwargs = dict(ensemble_size=7, chunk_size=3, learning_rate=lr, record_steps=[0, 8, 20], dtype=torch.float64,
                  device="cpu", engine=engine, seed=5, readout_only=readout_only)
    kept = train_ensemble(net, X, Y, keep_networks=True, **kwargs)
    assert kept.settings["engine"] == engine and kept.diverged_at is None
    assert [ntkgp.finite.ensemble_size(m) for m in kept.networks] == [3, 3, 1]
    assert all(p.requires_grad for m in kept.networks for p in m.parameters())   # as net.build makes them
    assert torch.equal(kept.outputs(X), kept.test_outputs[-1])
    assert kept.outputs(X.float()).dtype == torch.float64   # in the networks' dtype
    elsewhere = train_ensemble(net, X, Y, x_test=x_new, **kwargs)
    assert elsewhere.networks is None
    torch.testing.assert_close(kept.outputs(x_new), elsewhere.test_outputs[-1], rtol=1e-12, atol=1e-12)
    assert float((kept.outputs(x_new) - elsewhere.test_outputs[0]).abs().max()) > 0.05   # trained, not initial
    with pytest.raises(ValueError, match=r"kept no networks: train it with train_ensemble\(\.\.\., keep_networks=True"):
        elsewhere.outputs(x_new)
    with pytest.raises(ValueError, match=r"^x must have shape \(M, d\), got \(2, 9, 1\)"):
        kept.outputs(x_new.expand(2, 9, 1))
    with pytest.raises(ValueError, match="x contains NaN"):
        kept.outputs(x_new * math.nan)


def test_keeping_networks_beyond_the_memory_is_refused_before_training(monkeypatch):
    """All ``E`` members' weights are kept on the device with ``keep_networks``, where training holds one
    chunk's: refused up front with the sizes, before any weight is drawn."""
    net = ntkgp.mlp(2, "relu", width=128)   # P = 16 897 parameters (above)
    params, builds = 16_897, []
    original = net.build
    monkeypatch.setattr(net, "build", lambda *a, **k: builds.append(str(k.get("device"))) or original(*a, **k))
    # 2 members a chunk need 2 · 2 · P · 8 bytes to train; keeping all 8 members, 8 · P · 8
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 8 * params * 8 - 1)
    kwargs = dict(ensemble_size=8, chunk_size=2, learning_rate=0.1, record_steps=[0, 1], dtype=torch.float64,
                  device="cpu")
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"Keeping the 8 trained members \(16,897 parameters each, "
                                                          r"in torch\.float64\), chunk 4 of 4 training beside the "
                                                          r"6 before it, needs at least .* GiB on cpu.*: "
                                                          r"keep_networks=False, or fewer members"):
        train_ensemble(net, X, Y, keep_networks=True, **kwargs)
    assert set(builds) == {"meta"}
    assert train_ensemble(net, X, Y, **kwargs).networks is None
    with pytest.raises(ValueError, match="keep_networks"):
        train_ensemble(net, X, Y, keep_networks="yes", **kwargs)


@pytest.mark.parametrize(("ensemble_size", "chunk_size"), [(8, 2), (8, 3), (7, 3)])
def test_kept_members_are_counted_beside_the_training_chunk(monkeypatch, ensemble_size, chunk_size):
    """The members kept from the earlier chunks are alive while a chunk trains: ``s P b`` beside the
    chunk's ``2 c P b`` (its weights and the copy the changes are measured from), at the most of the
    chunks: the last (8 members in chunks of 2: 6 + 2·2 = 10 P b; of 3: 6 + 2·2 = 10), or the one before
    a small last chunk (7 in chunks of 3: 3 + 2·3 = 9, where the last needs 6 + 2·1 = 8). Each was
    checked alone (``E P b`` and ``2 c P b``), and a run that cannot fit passed."""
    net = ntkgp.mlp(2, "relu", width=128)   # P = 16 897 parameters (above)
    params = 16_897
    starts = range(0, ensemble_size, chunk_size)
    peak, chunk = max((start + 2 * min(chunk_size, ensemble_size - start), i) for i, start in enumerate(starts))
    need = peak * params * 8
    kwargs = dict(ensemble_size=ensemble_size, chunk_size=chunk_size, learning_rate=0.1, record_steps=[0, 1],
                  dtype=torch.float64, device="cpu", keep_networks=True)
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: need - 1)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=rf"chunk {chunk + 1} of {len(starts)} training beside the "
                                                          rf"{chunk * chunk_size} before it, needs at least "
                                                          rf"{need / 2**30:.3g} GiB on cpu"):
        train_ensemble(net, X, Y, **kwargs)
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: need)
    assert len(train_ensemble(net, X, Y, **kwargs).networks) == len(starts)


def test_a_trained_chunk_is_freed_before_the_next_is_drawn(monkeypatch):
    """A chunk's trained members stayed alive while the next chunk was drawn (the loop's variable still
    held them until the new chunk replaced it): two chunks' weights at once, where training holds one."""
    import gc

    from ntkgp.layers.dense import DenseModule

    def alive() -> int:
        gc.collect()
        with warnings.catch_warnings():   # isinstance reads every object's __class__, deprecated aliases too
            warnings.simplefilter("ignore", FutureWarning)
            return sum(isinstance(o, DenseModule) for o in gc.get_objects())

    net = ntkgp.mlp(1, "erf", width=8)
    original, seen = net.build, []

    def build(*args, **kwargs):
        if kwargs.get("ensemble_size") is not None:   # a chunk, not the member that checks the outputs
            seen.append(alive())
        return original(*args, **kwargs)

    monkeypatch.setattr(net, "build", build)
    before = alive()
    train_ensemble(net, X, Y, ensemble_size=6, chunk_size=2, learning_rate=0.1, record_steps=[0, 1],
                   dtype=torch.float64, device="cpu", engine="stacked")
    assert seen == [before] * 3   # no earlier chunk's two Dense layers alive as the next is drawn
    kept = train_ensemble(net, X, Y, ensemble_size=6, chunk_size=2, learning_rate=0.1, record_steps=[0, 1],
                          dtype=torch.float64, device="cpu", engine="stacked", keep_networks=True)
    assert seen[3:] == [before, before + 2, before + 4] and len(kept.networks) == 3   # kept ones stay


def test_kept_networks_after_a_divergence_hold_the_steps_their_chunks_stopped_at():
    """After a divergence the records stop before it, while the chunk that diverged stopped at its divergence
    and the other chunks trained on to the last of ``record_steps``: ``outputs`` says so (a mix of steps that is
    no record's), and the stable chunks hold exactly the members of a run of their own (seeds by chunk)."""
    net = ntkgp.serial(ntkgp.Dense(16, 2.0, 0.05), ntkgp.Erf(), ntkgp.Dense(16, 2.0, 0.05), ntkgp.ReLU(),
                       ntkgp.Dense(1, 1.0, 0.05))
    lr = 2.0 * ntkgp.predict.GradientFlow(net, X, Y).max_learning_rate
    kwargs = dict(chunk_size=2, learning_rate=lr, record_steps=[0, 10, 50, 200], dtype=torch.float64, device="cpu",
                  engine="stacked", keep_networks=True)
    history = train_ensemble(net, X, Y, ensemble_size=6, seed=1, **kwargs)
    assert history.diverged_at == 6 and history.steps.tolist() == [0]   # member 1, in the first chunk
    with pytest.warns(RuntimeWarning, match=r"^Training diverged at step 6: the members' weights are those of the "
                                            r"steps their chunks stopped at .* not the last record's \(step 0\)\.$"):
        outputs = history.outputs(X)
    # the second and third chunks: the first two chunks of a run seeded where they were (no divergence there)
    rest = train_ensemble(net, X, Y, ensemble_size=4, seed=1 + train_module.SEED_STRIDE, **kwargs)
    assert rest.diverged_at is None and rest.steps.tolist() == [0, 10, 50, 200]
    torch.testing.assert_close(outputs[2:], rest.test_outputs[-1], rtol=1e-12, atol=1e-12)
    assert float(outputs[1].abs().max()) > 1e3   # the diverged member's weights, those that failed the check
    with warnings.catch_warnings():   # a run that stayed stable warns of nothing
        warnings.simplefilter("error")
        assert torch.equal(rest.outputs(X), rest.test_outputs[-1])


needs_kernel = pytest.mark.skipif(isinstance(fused_module.library(torch.float64), str),
                                  reason="no C compiler to build the fused kernel")


def _refuse_ensemble_builds(monkeypatch, net):
    """``net.build`` of an ensemble (a chunk) fails the test: only the one checked member may be drawn."""
    real_build = type(net).build

    def member_only(self, *args, ensemble_size=None, **kwargs):
        if ensemble_size not in (None, 1):
            raise AssertionError("a chunk was built before the arguments were checked")
        return real_build(self, *args, ensemble_size=ensemble_size, **kwargs)

    monkeypatch.setattr(type(net), "build", member_only)


@pytest.mark.parametrize("net, message", [
    # a product of readouts is bilinear in them, not the NNGP's linear model
    (ntkgp.serial(ntkgp.Dense(40, 2.0, 0.1), ntkgp.Erf(), ntkgp.parallel(ntkgp.Dense(1), ntkgp.Dense(1), join="prod")),
     "bilinear"),
    # a residual block at the output passes features on that no trained readout weighs
    (ntkgp.serial(ntkgp.Dense(1, 2.0, 0.1), ntkgp.residual(ntkgp.Erf(), ntkgp.Dense(1))), "passes its input through"),
])
def test_readout_only_training_of_a_network_it_cannot_follow_is_refused_before_any_chunk_is_drawn(
        net, message, monkeypatch):
    """Refused only once the first chunk was drawn (1.1 s at width 2000, 64 members in float64)."""
    _refuse_ensemble_builds(monkeypatch, net)
    with pytest.raises(ValueError, match=message):
        train_ensemble(net, X, Y, ensemble_size=64, learning_rate=0.1, record_steps=[0, 10], readout_only=True,
                       dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("net, dtype, reason", [   # reasons found before the kernel is compiled: no compiler needed
    (ntkgp.serial(ntkgp.Dense(40, 2.0, 0.1), ntkgp.ReLU(), ntkgp.LayerNorm(), ntkgp.Dense(1)), torch.float64,
     r"one erf or ReLU-type activation between them \(not LayerNormModule\)"),
    (ntkgp.mlp(2, "erf", 2.25, 0.0025, width=40), torch.float16, r"compiled for float32 and float64"),
    (ntkgp.serial(ntkgp.Dense(40, 2.0, 0.1), ntkgp.Erf(), ntkgp.Dense(1), ntkgp.Erf()), torch.float64,
     "end in a Dense layer"),
])
def test_engine_fused_that_does_not_apply_is_refused_before_any_chunk_is_drawn(net, dtype, reason, monkeypatch):
    """engine='fused' on a network (or dtype) the kernel does not take was refused only once the first chunk
    was drawn (1.1 s at width 2000, 64 members in float64)."""
    _refuse_ensemble_builds(monkeypatch, net)
    with pytest.raises(ValueError, match=rf"engine='fused' does not apply: [^.]*{reason}"):
        train_ensemble(net, X, Y.to(dtype), ensemble_size=64, learning_rate=0.1, record_steps=[0, 10], dtype=dtype,
                       device="cpu", engine="fused")


@needs_kernel
def test_engine_fused_where_it_applies_still_trains_as_the_stacked_step():
    """The up-front check of one stacked member passes what the chunks then train, readout-only refusal aside."""
    net = ntkgp.mlp(2, "erf", 2.25, 0.0025, width=40)
    kwargs = dict(ensemble_size=3, learning_rate=0.5, record_steps=[0, 7, 30], dtype=torch.float64, device="cpu",
                  probe=X)
    fused = train_ensemble(net, X, Y, engine="fused", **kwargs)
    stacked = train_ensemble(net, X, Y, engine="stacked", **kwargs)
    assert fused.settings["engine"] == "fused"
    # the same arithmetic in another order: float64 rounding, amplified by 30 steps at most a few hundred ulps
    torch.testing.assert_close(fused.test_outputs, stacked.test_outputs, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match=r"engine='fused' does not apply: it trains every parameter"):
        train_ensemble(net, X, Y, engine="fused", readout_only=True, **kwargs)
