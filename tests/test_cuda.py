"""The paths a CUDA user takes, on the GPU against the CPU (skipped without CUDA).

Every result must come back on the inputs' device and agree with the CPU's to float64 rounding:
networks and seeds are the same on every device (weights are drawn on the CPU and moved), so
only the order of floating-point operations differs. Tolerances are ~1e4 ulps of the values.
"""

from __future__ import annotations

import pytest
import torch

import ntkgp
from ntkgp import bayes, finite, predict
from ntkgp.compare.datasets import sin_dataset
from ntkgp.compare.harness import CompareConfig, run_comparison
from ntkgp.layers.base import BLOCK_ENTRIES

DEVICE = "cuda"
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("float64_default")]

CLOSE = dict(rtol=1e-10, atol=1e-12)


def _net(activation=None):
    return ntkgp.serial(ntkgp.Dense(16, 2.0, 0.1), activation or ntkgp.Erf(), ntkgp.Dense(16, 1.5, 0.1),
                        ntkgp.residual(ntkgp.serial(ntkgp.ReLU(), ntkgp.Dense(16, 1.5, 0.05))),
                        ntkgp.LayerNorm(), ntkgp.Dense(16, 1.5, 0.1), ntkgp.GELU(), ntkgp.Dense(2, 1.5, 0.1))


def _data(n=8, m=5, d=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def _on_device_and_close(gpu, cpu, **tolerance):
    assert gpu.device.type == DEVICE and gpu.dtype == cpu.dtype
    torch.testing.assert_close(gpu.cpu(), cpu, **(tolerance or CLOSE))


@pytest.mark.parametrize("activation", [ntkgp.Erf(), ntkgp.ReLU(), ntkgp.Sin(), ntkgp.Numerical(torch.tanh, degree=24),
                                        ntkgp.Exp(0.8, 0.4), ntkgp.Gaussian(), ntkgp.Polynomial([0.2, 1.0, 0.3]),
                                        ntkgp.RectifiedMonomial(2), ntkgp.Rbf(0.5), ntkgp.Hermite(3),
                                        ntkgp.Gabor()],
                         ids=["erf", "relu", "sin", "numerical", "exp", "gaussian", "polynomial", "requ", "rbf",
                              "hermite", "gabor"])
def test_kernels_full_diag_cross_and_gradients(activation):
    x, x2, _ = _data()
    net = _net(activation)
    for kwargs in ({}, {"diag": True}):
        a, b = net.kernel(x.to(DEVICE), **kwargs), net.kernel(x, **kwargs)
        _on_device_and_close(a.nngp, b.nngp)
        _on_device_and_close(a.ntk, b.ntk)
    a, b = net.kernel(x.to(DEVICE), x2.to(DEVICE)), net.kernel(x, x2)
    _on_device_and_close(a.ntk, b.ntk)
    grads = []
    for device in (DEVICE, "cpu"):
        leaf = x.to(device).requires_grad_()
        net.kernel(leaf, x2.to(device)).ntk.sum().backward()
        grads.append(leaf.grad)
    _on_device_and_close(*grads, rtol=1e-8, atol=1e-10)


def test_checkpointed_kernels_and_their_gradients(monkeypatch):
    """Kernels with autograd in checkpointed row blocks (recomputed in the backward pass on the
    GPU, the upper triangle mirrored by an autograd function): values, hyperparameter and input
    gradients, and a second derivative equal the CPU's."""
    from test_numerics import _count_calls

    from ntkgp.layers import base

    monkeypatch.setattr(base, "CHECKPOINT_ENTRIES", 1)
    monkeypatch.setattr(base, "CHECKPOINT_BLOCK_ENTRIES", 40)     # blocks of 5 rows of 8 columns
    calls = _count_calls(monkeypatch, "_checkpointed_kernel")
    x, _, _ = _data()
    x[6] = x[1]                                                    # twins in different blocks (rows 0-4, 5-7)
    results = []
    for device in (DEVICE, "cpu"):
        net = _net(ntkgp.ReLU()).to(device)
        leaf = x.to(device).requires_grad_()
        k = net.kernel(leaf)
        grads = torch.autograd.grad(k.nngp.sum() + (k.ntk ** 2).sum(), [leaf, *net.parameters()], create_graph=True)
        (second,) = torch.autograd.grad(sum((g ** 2).sum() for g in grads[1:]), leaf)
        results.append([k.nngp, k.ntk, *grads, second])
    assert calls == [2]                                            # both devices took the checkpointed path
    gpu, cpu = results
    _on_device_and_close(gpu[0], cpu[0])
    _on_device_and_close(gpu[1], cpu[1])
    for a, b in zip(gpu[2:], cpu[2:], strict=True):
        _on_device_and_close(a.detach(), b.detach(), rtol=1e-8, atol=1e-10)


def test_blocked_kernels_with_duplicates_and_batches(monkeypatch):
    """Row blocks, duplicate screening (unique, bincount, scatter_reduce on the device) and
    batched duplicates: twins' entries stay exact on the GPU."""
    from ntkgp.layers import base

    monkeypatch.setattr(base, "CUDA_BLOCK_ENTRIES", BLOCK_ENTRIES)   # the CPU's blocks, so several of them
    g = torch.Generator().manual_seed(1)
    n = BLOCK_ENTRIES // 400 + 7                         # several row blocks
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x[5], x[n - 1] = x[0], x[1]
    net = _net(ntkgp.ReLU())
    a, b = net.kernel(x.to(DEVICE)), net.kernel(x)
    _on_device_and_close(a.ntk, b.ntk)
    for k in (a.nngp, a.ntk):   # a twin's variance and its pair with its twin: bitwise those of the first
        assert k[0, 0] == k[5, 5] == k[0, 5] == k[5, 0] and k[1, 1] == k[n - 1, n - 1] == k[1, n - 1]
        assert torch.equal(k, k.mT)
    batch = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    batch[0, 4] = batch[0, 1]
    train = torch.randn(6, 3, generator=g, dtype=torch.float64)
    train[2] = batch[1, 3]
    a, b = net.kernel(batch.to(DEVICE), train.to(DEVICE)), net.kernel(batch, train)
    _on_device_and_close(a.ntk, b.ntk)


def test_kernels_on_the_gpu_take_gpu_sized_blocks(monkeypatch):
    """On a GPU a block of rows is ``CUDA_BLOCK_ENTRIES`` (no cache to fit there, and every block
    costs its kernel launches): a 3000-point kernel is one block on the GPU, 18 on the CPU, and
    the two agree."""
    from ntkgp.layers import base

    blocks = []
    run_block = base._run_block
    monkeypatch.setattr(base, "_run_block", lambda *args, **kwargs: blocks.append(1) or run_block(*args, **kwargs))
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    net = _net(ntkgp.ReLU())
    with torch.no_grad():
        gpu = net.kernel(x.to(DEVICE))
        assert len(blocks) == 1
        cpu = net.kernel(x)
    assert len(blocks) == 1 + 18
    _on_device_and_close(gpu.ntk, cpu.ntk)
    _on_device_and_close(gpu.nngp, cpu.nngp)


def test_exact_powers_of_two_without_a_dtype_view_on_the_gpu():
    """The fallback of power_of_2 under vmap in torch 2.11 (no batching rule for a dtype view there):
    exp2 of the integers of each dtype's normal range is exact on the GPU too."""
    from ntkgp.layers.numerics import _exp2_of_integers, power_of_2

    for dtype, low, high in ((torch.float64, -1022, 1023), (torch.float32, -126, 127), (torch.float16, -14, 15),
                             (torch.bfloat16, -126, 127)):
        e = torch.arange(low, high + 1)
        assert torch.equal(_exp2_of_integers(e.to(DEVICE), dtype).cpu(), power_of_2(e, dtype))


def test_gpytorch_kernels_and_network_gp():
    x, x2, y = _data()
    for kernel in (ntkgp.NNGPKernel(_net()).to(DEVICE), ntkgp.NTKKernel(_net()).to(DEVICE)):
        _on_device_and_close(kernel(x.to(DEVICE), x2.to(DEVICE)).to_dense(), kernel.cpu()(x, x2).to_dense())
    from ntkgp.models import NetworkGP, fit
    models = [NetworkGP(x.to(device), y.to(device), _net(), kernel="ntk") for device in (DEVICE, "cpu")]
    losses = [fit(model, steps=3) for model in models]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-7, atol=1e-10)
    with torch.no_grad():
        means = [model.likelihood(model(x2.to(device))).mean
                 for model, device in zip(models, (DEVICE, "cpu"), strict=True)]
    _on_device_and_close(*means, rtol=1e-7, atol=1e-10)


def test_fit_keeps_the_optimizers_step_counters_on_the_cpu():
    """torch 2.11, not 2.13, made Adam's step counters with ``torch.tensor(0.0)``, on torch's default device (the
    CPU here), where torch means them to be: fit's first step made them on the parameters' device, the
    GPU, and each step then read every counter back to the host (``.item()``)."""
    from ntkgp.models import NetworkGP, fit

    seen: list[str] = []

    class NotingAdam(torch.optim.Adam):
        def step(self, closure):
            loss = super().step(closure)
            seen.append(torch.tensor(0.0).device.type)   # where torch 2.11 made the counters
            return loss

    x, _, y = _data()
    model = NetworkGP(x.to(DEVICE), y.to(DEVICE), _net(), kernel="ntk")
    optimizer = NotingAdam(model.parameters(), lr=0.05)
    fit(model, steps=2, optimizer=optimizer)
    assert seen == ["cpu", "cpu"]
    assert all(state["step"].device.type == "cpu" for state in optimizer.state.values())


def test_predictors():
    x, x2, y = _data()
    net = _net()
    t = torch.tensor([0.5, 10.0, float("inf")])
    for kernel in ("ntk", "nngp"):
        out = [predict.gradient_flow(net, x.to(d), y.to(d), x2.to(d), t=t.to(d), kernel=kernel, diag_reg=1e-4)
               for d in (DEVICE, "cpu")]
        _on_device_and_close(out[0].mean, out[1].mean, rtol=1e-8, atol=1e-10)
        _on_device_and_close(out[0].covariance, out[1].covariance, rtol=1e-8, atol=1e-10)
        out = [predict.GradientFlow(net, x.to(d), y.to(d), kernel=kernel, learning_rate=0.1).predict(steps=[3])
               for d in (DEVICE, "cpu")]
        _on_device_and_close(out[0].mean, out[1].mean, rtol=1e-8, atol=1e-10)
    for kernel in ("nngp", "ntkgp", "ntk"):
        out = [predict.gp_posterior(net, x.to(d), y.to(d), x2.to(d), kernel=kernel, noise=1e-3)
               for d in (DEVICE, "cpu")]
        _on_device_and_close(out[0].mean, out[1].mean, rtol=1e-8, atol=1e-10)
        _on_device_and_close(out[0].covariance, out[1].covariance, rtol=1e-8, atol=1e-10)
    # one noise per training point, given on the CPU (as a list of fitted values would be) for CUDA inputs
    noise = torch.linspace(1e-3, 1e-1, x.shape[0], dtype=torch.float64)
    for kernel in ("nngp", "ntk"):
        out = [predict.gp_posterior(net, x.to(d), y.to(d), x2.to(d), kernel=kernel, noise=noise)
               for d in (DEVICE, "cpu")]
        _on_device_and_close(out[0].mean, out[1].mean, rtol=1e-8, atol=1e-10)
        _on_device_and_close(out[0].covariance, out[1].covariance, rtol=1e-8, atol=1e-10)


def test_empirical_kernels_linearized_training_and_monte_carlo():
    x, x2, y = _data()
    net = _net(ntkgp.ReLU())
    results = []
    for d in (DEVICE, "cpu"):
        model = net.build(seed=0, device=d)                       # deferred first layer, drawn on d
        f_train, f_test = model(x.to(d)), model(x2.to(d))
        ntk_dd, ntk_td = finite.empirical_ntk(model, x.to(d)), finite.empirical_ntk(model, x2.to(d), x.to(d))
        full = finite.empirical_ntk(model, x.to(d), vector_output=True)
        with torch.no_grad():
            trained = predict.gradient_descent_mse(ntk_dd, y.to(d), fx_train_0=f_train, ntk_test_train=ntk_td,
                                                   fx_test_0=f_test, t=[1.0, 5.0],
                                                   diag_reg=1e-6)
            joint = predict.gradient_descent_mse(full, y.to(d), fx_train_0=f_train, t=2.0, diag_reg=1e-6)
            huber = lambda f, target: torch.nn.functional.huber_loss(f, target, delta=0.5)   # noqa: E731
            robust = predict.gradient_descent(huber, ntk_dd, y.to(d), fx_train_0=f_train, ntk_test_train=ntk_td,
                                              fx_test_0=f_test, t=[1.0, 5.0], momentum=0.5)
            stepped = predict.gradient_descent(huber, full, y.to(d), fx_train_0=f_train, steps=4)
        linear = finite.linearize(model)
        huber(linear(x.to(d)), y.to(d)).backward()
        moved = [p.grad for p in linear.network.parameters()]
        mc = finite.monte_carlo_kernel(net, x.to(d), x2.to(d), n_samples=6, ensemble_batch=4)
        results.append((ntk_dd, full, *trained, joint, *robust, stepped, *moved, mc.nngp, mc.ntk, mc.ntk_sem))
    for gpu, cpu in zip(*results, strict=True):
        _on_device_and_close(gpu.detach(), cpu.detach(), rtol=1e-8, atol=1e-10)
    assert predict.max_learning_rate(results[0][0]) == pytest.approx(predict.max_learning_rate(results[1][0]),
                                                                     rel=1e-10)


def test_bayes_from_a_gaussian_on_the_gpu():
    x, x2, y = _data()
    post = predict.gp_posterior(_net(), x.to(DEVICE), y[:, 0].to(DEVICE), x2.to(DEVICE), noise=1e-2)
    draws = bayes.sample_outputs(post, 2000, seed=0)
    assert draws.device.type == DEVICE and draws.dtype == torch.float64 and draws.shape == (2000, 5)
    # the draws follow N(μ, Σ) (through the symmetric root they should equal the CPU's up to the eigh's rounding,
    # but that was not run on a GPU: the distribution is what is checked)
    torch.testing.assert_close(draws.mean(0), post.mean, rtol=0, atol=5 * float(post.variance.max()) ** 0.5 / 40)
    mean, var = bayes.predictive_moments(post, noise=1e-2)
    assert mean.device.type == DEVICE and var.device.type == DEVICE
    bayes.gaussian_to_inference_data(post, y[:5, 0], noise=1e-2, num_draws=20)
    bayes.regression_metrics(mean, var, y[:5, 0].to(DEVICE))


def test_compare_on_the_gpu_matches_the_cpu():
    common = dict(widths=(8, 16), ensemble_size=4, record_steps=(0, 3, 10), dtype="float64", chunk_size=2,
                  divergence_check=False)
    gpu = run_comparison(sin_dataset(), CompareConfig(device=DEVICE, **common))
    cpu = run_comparison(sin_dataset(), CompareConfig(device="cpu", **common))
    assert gpu.analytic_mean == cpu.analytic_mean
    for a, b in zip(gpu.widths, cpu.widths, strict=True):
        torch.testing.assert_close(torch.tensor(a.ensemble_mean), torch.tensor(b.ensemble_mean), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(torch.tensor(a.ntk_change), torch.tensor(b.ntk_change), rtol=1e-6, atol=1e-10)


def test_a_cuda_default_device_changes_nothing_for_cpu_inputs():
    # torch.set_default_device("cuda") with CPU inputs: draws from CPU generators on the default device
    # raised "Expected a 'cuda' device type for generator" (tests/test_default_device.py checks the
    # same without a GPU, with the meta device)
    x, xt, y = _data()
    net = _net()

    def run():
        # width 256 is checked point-wise: the checks' calibration draws from a CPU generator
        calibrated = run_comparison(sin_dataset(), CompareConfig(widths=(256,), ensemble_size=4, record_steps=(0, 3),
                                                                 divergence_check=False, device="cpu"))
        return (net.build(3, seed=0, dtype=torch.float64)(x), net.kernel(x, xt).ntk,
                predict.gp_posterior(net, x, y, xt, kernel="ntk", noise=1e-3).covariance,
                predict.gradient_flow(net, x, y, xt, t=[0.5, 5.0]).mean, sin_dataset().y_train,
                torch.tensor(calibrated.calibration["var_fail"], dtype=torch.float64, device="cpu"))

    expected = run()
    with torch.device(DEVICE):
        got = run()
    for e, g in zip(expected, got, strict=True):
        assert g.device.type == "cpu"
        torch.testing.assert_close(g, e, **CLOSE)


def test_device_tensors_given_as_settings_leave_the_rest_on_its_device():
    """Three paths a CUDA user can take that mixed devices: a variance given as a CUDA tensor put
    that layer's anchor on the GPU and every kernel call failed in the variance check; a Dataset
    of CUDA tensors put the analytic side of a comparison on the GPU, next to the trainer's CPU
    records; a deferred build under a CUDA default device drew its first layer there alone."""
    from ntkgp.compare.datasets import Dataset

    x, _, _ = _data()
    net = ntkgp.serial(ntkgp.Dense(8, weight_var=torch.tensor(2.0, device=DEVICE)), ntkgp.Erf(), ntkgp.Dense(1))
    assert net.layers[0].raw_weight_var_constraint.anchor.device.type == "cpu"
    assert net.kernel(x).nngp.device.type == "cpu" and net.kernel(x.to(DEVICE)).nngp.device.type == DEVICE
    data = sin_dataset()
    on_gpu = Dataset("sin", data.x_train.to(DEVICE), data.y_train.to(DEVICE), data.x_test.to(DEVICE))
    assert on_gpu.x_train.device.type == "cpu"
    result = run_comparison(on_gpu, CompareConfig(widths=(8,), ensemble_size=4, record_steps=(0, 3),
                                                  divergence_check=False, device=DEVICE))
    assert len(result.widths[0].mean_within) == 2
    kernel = ntkgp.NTKKernel(ntkgp.mlp(1), batch_shape=torch.Size([3]))
    kernel.net.layers[0].weight_var = torch.tensor([1.0, 2.0, 3.0])
    # a CPU network indexed by a CUDA tensor: its hyperparameters were indexed with it ("indices should be
    # either on cpu or on the same device as the indexed tensor")
    picked = kernel[torch.tensor([0, 2], device=DEVICE)]
    assert picked.batch_shape == (2,)
    torch.testing.assert_close(picked.net.layers[0].weight_var, torch.tensor([1.0, 3.0]), rtol=0, atol=0)
    with torch.device(DEVICE):
        model = _net().build(seed=0, dtype=torch.float64)
    torch.testing.assert_close(model(x), _net().build(seed=0, dtype=torch.float64)(x), rtol=0, atol=0)


def test_empirical_diagonals_and_the_chunked_jacobian_route(monkeypatch):
    """``diag=True`` on both routes (layer by layer for a built network and an ensemble, per-point
    Jacobians for a plain module, rows of the all-points Jacobian for batch norm in training mode),
    Monte-Carlo diagonals, and the full kernel of a plain module from the chunked pullback: on the
    GPU as on the CPU, with chunks of a few cotangents and blocks of one point (small budgets)."""
    import torch.nn as nn

    import ntkgp.finite.empirical as empirical

    # the GPU's budgets too: with the CPU's alone the GPU took one chunk and one block (its own budgets)
    for prefix in ("", "CUDA_"):
        monkeypatch.setattr(empirical, prefix + "JACOBIAN_BYTES", 1 << 12)
        monkeypatch.setattr(empirical, prefix + "DIAG_JACOBIAN_BYTES", 1)
        monkeypatch.setattr(empirical, prefix + "DIAG_SIGNAL_BYTES", 1)
    x, x2, _ = _data()
    x2 = torch.cat([x2, x2[:3]])                                   # x's number of points, for the pairs
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2)).double()
    batch_norm = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                               nn.Linear(8, 2)).double()
    results = []
    for d in (DEVICE, "cpu"):
        model = _net(ntkgp.ReLU()).build(3, seed=0, device=d)
        ensemble = _net().build(3, seed=1, ensemble_size=3, device=d)
        xs, x2s = x.to(d), x2.to(d)
        out = []
        for m in (model, ensemble, plain.to(d)):
            for pair in (None, x2s):
                full = finite.empirical_ntk(m, xs, pair)
                diag = finite.empirical_ntk(m, xs, pair, diag=True)
                torch.testing.assert_close(diag, torch.diagonal(full, dim1=-2, dim2=-1), **CLOSE)
                out += [full, diag, finite.empirical_nngp(m, xs, pair, diag=True)]
        out.append(finite.empirical_ntk(plain, xs, x2s, vector_output=True))
        with pytest.warns(RuntimeWarning, match="training mode"):
            out.append(finite.empirical_ntk(batch_norm.to(d), xs, diag=True))
        mc = finite.monte_carlo_kernel(_net(), xs, x2s, n_samples=6, ensemble_batch=4, diag=True)
        out += [mc.nngp, mc.ntk, mc.ntk_sem]
        results.append(out)
    for gpu, cpu in zip(*results, strict=True):
        _on_device_and_close(gpu, cpu, rtol=1e-8, atol=1e-10)


def test_inputs_of_another_dtype_are_named_and_autocast_is_left_to_torch():
    """float32 points into a float64 network are refused by name on the GPU too; under CUDA's
    autocast a float32 network takes float32 and bfloat16 inputs (mixed precision, as torch's own
    layers), and float64 ones, which autocast never casts, are refused."""
    x, _, _ = _data()
    net = _net(ntkgp.ReLU())
    wide = net.build(3, seed=0, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"parameters are torch.float64 but its inputs are torch.float32"):
        wide(x.float().to(DEVICE))
    single = net.build(3, seed=0, dtype=torch.float32, device=DEVICE)
    exact = single(x.float().to(DEVICE))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for inputs in (x.float(), x.bfloat16()):
            mixed = single(inputs.to(DEVICE))
            assert mixed.device.type == DEVICE
            torch.testing.assert_close(mixed.float(), exact, rtol=0.05, atol=0.05)   # bfloat16: 8 bits of mantissa
        with pytest.raises(ValueError, match=r"autocast does not cast float64"):
            single(x.to(DEVICE))


def test_empirical_kernels_on_the_gpu_take_gpu_sized_chunks(monkeypatch):
    """On a GPU the empirical kernels' chunks and blocks are ``CUDA_JACOBIAN_BYTES``,
    ``CUDA_DIAG_JACOBIAN_BYTES`` and ``CUDA_DIAG_SIGNAL_BYTES`` (each chunk costs its kernel launches:
    the CPU's 64 MiB made the full kernel of 8000 points 36 times slower on an H200). With the CPU's
    budgets cut to one byte, the CPU takes a chunk per cotangent and a block per point, the GPU one
    chunk and one block, and the two agree."""
    import torch.nn as nn

    import ntkgp.finite.empirical as empirical

    for name in ("JACOBIAN_BYTES", "DIAG_JACOBIAN_BYTES", "DIAG_SIGNAL_BYTES"):
        monkeypatch.setattr(empirical, name, 1)
    sizes = {}
    for name in ("_cotangents_per_pass", "_diagonal_block_rows"):
        original = getattr(empirical, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            sizes.setdefault(_name, []).append(_original(*args, **kwargs))
            return sizes[_name][-1]

        monkeypatch.setattr(empirical, name, recorded)
    signals = []
    original_signals = empirical._signals
    monkeypatch.setattr(empirical, "_signals",
                        lambda model, x: signals.append(x.shape[-2]) or original_signals(model, x))
    x, _, _ = _data(n=40)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    model = _net(ntkgp.ReLU()).build(3, seed=0)
    results = []
    for d in (DEVICE, "cpu"):
        sizes.clear()
        signals.clear()
        xd = x.to(d)
        results.append([finite.empirical_ntk(plain.to(d), xd), finite.empirical_ntk(plain.to(d), xd, diag=True),
                        finite.empirical_ntk(model.to(d), xd, diag=True)])
        if d == DEVICE:
            (chunk,), (rows,) = sizes["_cotangents_per_pass"], sizes["_diagonal_block_rows"]
            assert chunk >= 80 and rows >= 40 and signals == [40]   # all 40 x 2 outputs at once, all 40 points
        else:
            assert sizes == {"_cotangents_per_pass": [1], "_diagonal_block_rows": [1]} and signals == [1] * 40
    for gpu, cpu in zip(*results, strict=True):
        _on_device_and_close(gpu, cpu)


def test_the_first_layer_s_screen_takes_gpu_sized_blocks(monkeypatch):
    """The screen for nearly parallel pairs (``layers/near.py``) took the CPU's blocks of 2^15 entries on
    the GPU too: a row at a time in a 40 000-point kernel's row blocks, 40 000 passes of three launches
    (1.95 s against 0.45 s for the whole kernel on an H200). On the GPU a 3000-point kernel is screened in
    one block, on the CPU in many; the kernels agree, and the GPU's equals its own with the CPU's blocks
    bit for bit (elementwise arithmetic)."""
    from ntkgp.layers import near

    sizes = []
    screen_rows = near._screen_rows
    monkeypatch.setattr(near, "_screen_rows", lambda k12: sizes.append((k12.device.type, screen_rows(k12), k12.shape))
                        or sizes[-1][1])
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = _net(ntkgp.ReLU())
    with torch.no_grad():
        gpu, cpu = net.kernel(x.to(DEVICE)), net.kernel(x)
        assert sizes[0] == (DEVICE, 3000, (3000, 3000))     # one row block (CUDA_BLOCK_ENTRIES), one screen
        cpu_screens = sizes[1:]                               # the CPU's row blocks, screened 2^15 entries at a time
        assert all(d == "cpu" and (rows * shape[1] <= 1 << 15 or (rows == shape[0] and shape.numel() <= 1 << 15))
                   for d, rows, shape in cpu_screens)
        assert sum(shape[0] > rows for _, rows, shape in cpu_screens) > 10   # row blocks screened in parts
        monkeypatch.setattr(near, "_CUDA_SCREEN_ENTRIES", near._SCREEN_ENTRIES)
        small = net.kernel(x.to(DEVICE))
    _on_device_and_close(gpu.ntk, cpu.ntk)
    assert torch.equal(gpu.ntk, small.ntk) and torch.equal(gpu.nngp, small.nngp)
