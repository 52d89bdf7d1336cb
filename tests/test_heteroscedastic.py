"""Per-point observation noise (one variance per training point) in the posteriors and gradient flow:
``K + diag(σ²)`` for ``K + σ²I``, checked against the dense formulas in numpy/scipy, against GPyTorch's
``FixedNoiseGaussianLikelihood`` and against refits with a point left out."""

from __future__ import annotations

import warnings

import gpytorch
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

import ntkgp
from ntkgp import predict
from ntkgp.models import NetworkGP

N, M = 12, 7


def _data(k: int | None = None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(M, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=k is not None)) if k is None else torch.randn(N, k, generator=g,
                                                                                   dtype=torch.float64)
    noise = 0.01 + 0.5 * torch.rand(N, generator=g, dtype=torch.float64)
    return x, y, xt, noise


def _net():
    return ntkgp.mlp(2, "erf", weight_var=2.0, bias_var=0.1)


def _kernels(net, x, xt, ntk: bool):
    with torch.no_grad():
        kdd, ktd, ktt = net.kernel(x, ntk=True), net.kernel(xt, x, ntk=True), net.kernel(xt, ntk=True)
    pick = (lambda s: s.ntk.numpy()) if ntk else (lambda s: s.nngp.numpy())
    return (pick(kdd), pick(ktd), pick(ktt)), (kdd.nngp.numpy(), ktd.nngp.numpy(), ktt.nngp.numpy())


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp"])
@pytest.mark.parametrize("k", [None, 2], ids=["1-D targets", "2 outputs"])
def test_gp_posterior_with_a_noise_per_point_is_the_dense_formula(kernel, k):
    """``μ = K*d (K + diag σ²)⁻¹ Y``, ``Σ = K** − K*d (K + diag σ²)⁻¹ Kd*`` by numpy's solve; the
    noises span 0.01–0.51, so a scalar noise (any one of them) is far off."""
    x, y, xt, noise = _data(k)
    net = _net()
    (kdd, ktd, ktt), _ = _kernels(net, x, xt, kernel == "ntkgp")
    c = kdd + np.diag(noise.numpy())
    mean = ktd @ np.linalg.solve(c, y.numpy())
    cov = ktt - ktd @ np.linalg.solve(c, ktd.T)
    out = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=noise)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.covariance.numpy(), cov, rtol=1e-10, atol=1e-12)
    diag = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=noise, compute_cov="diag")
    np.testing.assert_allclose(diag.variance.numpy(), np.diag(cov), rtol=1e-10, atol=1e-12)
    scalar = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=float(noise.mean()))
    assert float((scalar.mean - out.mean).abs().max()) > 1e-3   # the per-point values were used


def test_converged_ntk_ensemble_with_a_noise_per_point_is_the_dense_formula():
    """``"ntk"``: ``μ = Θ*d Θr⁻¹ Y``, ``Σ = K** + Θ*d Θr⁻¹ K Θr⁻¹ Θd* − (Θ*d Θr⁻¹ Kd* + h.c.)`` with
    ``Θr = Θ + diag(σ²)`` (Lee et al. 2019 with the regularized kernel)."""
    x, y, xt, noise = _data()
    net = _net()
    (tdd, ttd, _), (kdd, ktd, ktt) = _kernels(net, x, xt, ntk=True)
    a = ttd @ np.linalg.inv(tdd + np.diag(noise.numpy()))
    mean = a @ y.numpy()
    cov = ktt + a @ kdd @ a.T - (a @ ktd.T + ktd @ a.T)
    out = predict.gp_posterior(net, x, y, xt, kernel="ntk", noise=noise)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out.covariance.numpy(), cov, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
def test_gradient_flow_with_a_regularizer_per_point_at_finite_times(absolute):
    """``μ_t = Θ*d Θr⁻¹ (I − e^{−Θr τ}) Y`` with ``Θr = Θ + s·diag(r)`` (``s = 1`` or ``trace(Θ)/N``)
    and ``τ = η t / m``, by scipy's ``expm``; and ``r`` constant equals the scalar ``diag_reg``."""
    x, y, xt, reg = _data()
    net = _net()
    (tdd, ttd, _), _ = _kernels(net, x, xt, ntk=True)
    s = 1.0 if absolute else np.trace(tdd) / N
    theta = tdd + s * np.diag(reg.numpy())
    t, lr = 7.0, 0.5
    mean = ttd @ np.linalg.solve(theta, (np.eye(N) - scipy.linalg.expm(-theta * lr * t / N)) @ y.numpy())
    out = predict.gradient_flow(net, x, y, xt, t=t, learning_rate=lr, diag_reg=reg,
                                diag_reg_absolute_scale=absolute, compute_cov=False)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-9, atol=1e-11)
    same = torch.full((N,), 0.3, dtype=torch.float64)
    kwargs = dict(t=t, learning_rate=lr, diag_reg_absolute_scale=absolute)
    torch.testing.assert_close(predict.gradient_flow(net, x, y, xt, diag_reg=same, **kwargs).covariance,
                               predict.gradient_flow(net, x, y, xt, diag_reg=0.3, **kwargs).covariance,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t", [7.0, float("inf"), None], ids=["t=7", "t=inf", "t=None"])
@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_gradient_flow_covariance_with_a_regularizer_per_point(kernel, t):
    """The covariances with ``Gr = G + diag(r)`` (absolute) driving the flow, ``E = e^{−Gr τ}``:
    ``"ntk"``: ``K** + B K Bᵀ − (B Kd* + h.c.)``, ``B = Θ*d Θr⁻¹ (I − E)`` (the unregularized ``K`` in
    the middle); ``"nngp"``: ``K** − K*d Kr⁻¹ (I − E²) Kd*`` (the regularized ``K``, as neural-tangents);
    ``E = 0`` at ``t = inf`` and ``None``, and the marginal variances the diagonal."""
    x, y, xt, reg = _data()
    net = _net()
    (tdd, ttd, _), (kdd, ktd, ktt) = _kernels(net, x, xt, ntk=True)
    lr = 0.5
    g, gd = (tdd, ttd) if kernel == "ntk" else (kdd, ktd)
    gr = g + np.diag(reg.numpy())
    e = np.zeros((N, N)) if t is None or np.isinf(t) else scipy.linalg.expm(-gr * lr * t / N)
    if kernel == "ntk":
        b = gd @ np.linalg.solve(gr, np.eye(N) - e)
        cov = ktt + b @ kdd @ b.T - (b @ ktd.T + ktd @ b.T)
    else:
        cov = ktt - ktd @ np.linalg.solve(gr, (np.eye(N) - e @ e) @ ktd.T)
    kwargs = dict(t=t, learning_rate=lr, kernel=kernel, diag_reg=reg, diag_reg_absolute_scale=True)
    np.testing.assert_allclose(predict.gradient_flow(net, x, y, xt, **kwargs).covariance.numpy(), cov,
                               rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(predict.gradient_flow(net, x, y, xt, compute_cov="diag", **kwargs).variance.numpy(),
                               np.diag(cov), rtol=1e-9, atol=1e-11)


def test_agrees_with_gpytorch_fixed_noise_likelihood():
    """The same posterior from GPyTorch's exact GP with ``FixedNoiseGaussianLikelihood(σ²)``, its own
    solves (an independent implementation of the noise)."""
    x, y, xt, noise = _data()
    model = NetworkGP(x, y, kernel="nngp", depth=2, activation="erf",
                      likelihood=gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise)).eval()
    with torch.no_grad(), gpytorch.settings.fast_computations(False, False, False):
        theirs = model(xt)
    ours = predict.gp_posterior(model.net, x, y, xt, kernel="nngp", noise=noise)
    torch.testing.assert_close(ours.mean, theirs.mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours.covariance, theirs.covariance_matrix, rtol=1e-9, atol=1e-11)


def test_evidence_and_leave_one_out_with_a_noise_per_point():
    """``log p(Y)`` is scipy's ``multivariate_normal.logpdf`` with covariance ``K + diag(σ²)``; leaving
    point ``i`` out is a refit on the others, predicting ``y_i`` with its own noise ``σ_i²`` added."""
    x, y, _, noise = _data()
    net = _net()
    post = predict.GPPosterior(net, x, y, kernel="nngp", noise=noise)
    c = net.kernel(x).nngp.detach().numpy() + np.diag(noise.numpy())
    expected = scipy.stats.multivariate_normal(np.zeros(N), c).logpdf(y.numpy())
    assert post.log_marginal_likelihood() == pytest.approx(expected, rel=1e-12)
    mean, variance = post.leave_one_out()
    for i in (0, 5, N - 1):
        keep = torch.arange(N) != i
        refit = predict.gp_posterior(net, x[keep], y[keep], x[i:i + 1], kernel="nngp", noise=noise[keep])
        assert float(mean[i]) == pytest.approx(float(refit.mean[0]), rel=1e-9, abs=1e-12)
        assert float(variance[i]) == pytest.approx(float(refit.covariance[0, 0] + noise[i]), rel=1e-9)


def test_noise_per_point_given_as_a_list_or_array_or_float32_tensor():
    """The same float64 values, bit for bit: a list, an array, and a float32 tensor (widened exactly:
    its reference is the float64 tensor of its values)."""
    x, y, xt, noise = _data()
    net = _net()
    reference = predict.gp_posterior(net, x, y, xt, noise=noise).mean
    for given in (noise.tolist(), noise.numpy()):
        torch.testing.assert_close(predict.gp_posterior(net, x, y, xt, noise=given).mean, reference, rtol=0, atol=0)
    torch.testing.assert_close(predict.gp_posterior(net, x, y, xt, noise=noise.float()).mean,
                               predict.gp_posterior(net, x, y, xt, noise=noise.float().double()).mean, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_noise_per_point_from_arrays_torch_cannot_wrap(kernel):
    """Arrays that torch.as_tensor refuses or warns about hold the same values: reversed (negative
    strides: "At least one stride in the given numpy array is negative"), big-endian ("byte order
    different from the native"), read-only (np.broadcast_to's, pandas' under copy-on-write: a
    UserWarning, "The given NumPy array is not writable")."""
    x, y, xt, noise = _data()
    net = _net()
    flipped = noise.flip(0)
    reference = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=flipped)
    read_only = noise.numpy()[::-1].copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # torch's "not writable" warning
        for given in (noise.numpy()[::-1], noise.numpy()[::-1].astype(">f8"), read_only):
            got = predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=given)
            torch.testing.assert_close(got.mean, reference.mean, rtol=0, atol=0)
            torch.testing.assert_close(got.covariance, reference.covariance, rtol=0, atol=0)
    # integer arrays (unsigned too, which torch before 2.3 did not wrap) and numbers in an object array
    # (torch.as_tensor's "can't convert np.ndarray of type numpy.object_") hold their values
    counts = torch.arange(1, N + 1, dtype=torch.float64)
    for given in (counts.numpy().astype(np.int32), counts.numpy().astype(np.uint16), counts.numpy().astype(object)):
        torch.testing.assert_close(predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=given).mean,
                                   predict.gp_posterior(net, x, y, xt, kernel=kernel, noise=counts).mean,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["nngp", "ntkgp", "ntk"])
def test_bad_noise_per_point_is_refused_before_the_kernels(kernel, monkeypatch):
    x, y, _, noise = _data()
    net = _net()

    def fail(*args, **kwargs):
        raise AssertionError("the kernel was computed before the noise was checked")

    monkeypatch.setattr(net, "kernel", fail)
    for bad, message in [(torch.ones(N + 1), rf"^noise must be a number or one value per training point, "
                                             rf"shape \({N},\), got shape \({N + 1},\)"),
                         # the converged ensemble's flow named these "diag_reg", its own name for it
                         (-1.0, r"^noise must be a finite non-negative number, got -1\.0\.$"),
                         (float("nan"), r"^noise must be a finite non-negative number"),
                         (torch.ones(N, 1), r"got shape \(12, 1\)"),
                         (torch.cat([noise[:3], torch.tensor([-0.1], dtype=torch.float64), noise[4:]]),
                          "entry 3 is -0.1"),
                         (torch.cat([noise[:-1], torch.tensor([float("nan")], dtype=torch.float64)]),
                          f"entry {N - 1} is nan"),
                         (torch.ones(N, dtype=torch.complex64), "must be real"),
                         ([[0.1, 0.2]] * 6, r"got shape \(6, 2\)"),
                         # numpy parsed text, read booleans as 0/1 and None as NaN; torch refused an array of
                         # text with a raw TypeError, numpy a list of tensors that require grad with a RuntimeError
                         (["a"] * N, r"^noise must be numeric, got text \(list\)"),
                         (["0.1"] * N, r"^noise must be numeric, got text \(list\)\.$"),
                         (np.array(["0.1"] * N), "got text"),
                         ([True] + [0.5] * (N - 1), "got booleans"),
                         (np.ones(N, dtype=bool), "got booleans"),
                         ([None] * N, "got None"),
                         (np.array([0.1, "0.2"] * (N // 2), dtype=object), "got text"),
                         ([0.1] * (N - 1) + [float("inf")], "^noise contains NaN or infinite values"),
                         ([torch.tensor(0.1, requires_grad=True)] * N, "^noise holds tensors that require grad")]:
        with pytest.raises(ValueError, match=message):
            predict.GPPosterior(net, x, y, kernel=kernel, noise=bad)
    with pytest.raises(ValueError, match="read as a number and gets no gradient"):
        predict.GPPosterior(net, x, y, kernel=kernel, noise=noise.clone().requires_grad_())


def test_the_noise_per_point_is_a_copy():
    """A caller's later in-place edit of the noise must not reach the posterior (the converged
    ensemble's flow reads its regularizer again where float32 rounding needs a float64 kernel)."""
    x, y, _, noise = _data()
    kept = noise.clone()
    posts = [predict.GPPosterior(_net(), x, y, kernel=kernel, noise=noise) for kernel in ("nngp", "ntk")]
    flow = predict.GradientFlow(_net(), x, y, diag_reg=noise)
    noise.mul_(10)
    for held in [post.noise for post in posts] + [flow.diag_reg]:
        torch.testing.assert_close(held, kept, rtol=0, atol=0)


# ------------------------------------------------------------------ gradient_descent_mse's diag_reg per point
TIMES = {"t=7": dict(t=7.0), "t=inf": dict(t=float("inf")), "t=None": dict(t=None), "steps=5": dict(steps=5)}


def _ntk_matrices(k: int | None = None):
    x, y, xt, reg = _data(k)
    with torch.no_grad():
        net = _net()
        return net, x, y, xt, reg, net.kernel(x).ntk, net.kernel(xt, x).ntk


def _dense_descent(theta, cross, y, f0, ft0, lr, time):
    """``f_t(X) = Y + E (f_0 − Y)``, ``f_t(x*) = f_0(x*) − Θ*d Θr⁻¹ (I − E)(f_0 − Y)`` for the regularized
    ``theta`` (numpy), ``E = e^{−Θr η t/m}`` by scipy's expm, ``(I − ηΘr/m)^s``, or 0 at ``t = inf, None``."""
    n, m = theta.shape[0], y.size
    if "steps" in time:
        e = np.linalg.matrix_power(np.eye(n) - lr * theta / m, time["steps"])
    elif time["t"] is None or np.isinf(time["t"]):
        e = np.zeros((n, n))
    else:
        e = scipy.linalg.expm(-theta * lr * time["t"] / m)
    r = (f0 - y).reshape(n, -1)
    train = y + (e @ r).reshape(y.shape)
    test = ft0 - (cross @ np.linalg.solve(theta, (np.eye(n) - e) @ r)).reshape(ft0.shape)
    return train, test


@pytest.mark.parametrize("time", TIMES)
@pytest.mark.parametrize("k", [None, 2], ids=["1-D targets", "2 outputs"])
@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
def test_gradient_descent_mse_with_a_regularizer_per_point_is_gradient_flow(absolute, k, time):
    """An ``(N,)`` ``diag_reg`` (refused before, "must be a finite non-negative number") gives
    ``Θ + s·diag(r)``, ``s = 1`` or ``trace(Θ)/N``, as GradientFlow: from net.kernel's matrices and zero
    initial outputs its outputs are GradientFlow's means, training and test (the same factorizations: 1e-12
    allows rounding); with random initial outputs they are the dense formulas (expm, solve: rtol 1e-9 as
    above); and the values per point matter (their mean as a scalar is 1e-3 off or more)."""
    net, x, y, xt, reg, theta, cross = _ntk_matrices(k)
    lr = 0.5
    options = dict(learning_rate=lr, diag_reg_absolute_scale=absolute, **TIMES[time])
    train, test = predict.gradient_descent_mse(theta, y, ntk_test_train=cross, fx_test_0=0.0, diag_reg=reg,
                                               **options)
    flow = predict.GradientFlow(net, x, y, learning_rate=lr, diag_reg=reg, diag_reg_absolute_scale=absolute)
    torch.testing.assert_close(train, flow.predict(None, compute_cov=False, **TIMES[time]).mean, rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(test, flow.predict(xt, compute_cov=False, **TIMES[time]).mean, rtol=1e-12,
                               atol=1e-14)
    g = torch.Generator().manual_seed(5)
    f0, ft0 = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(M, *y.shape[1:], generator=g,
                                                                                  dtype=torch.float64)
    train, test = predict.gradient_descent_mse(theta, y, fx_train_0=f0, ntk_test_train=cross, fx_test_0=ft0,
                                               diag_reg=reg.numpy(), **options)   # an array too
    s = 1.0 if absolute else float(theta.trace()) / N
    dense = _dense_descent(theta.numpy() + s * np.diag(reg.numpy()), cross.numpy(), y.numpy(), f0.numpy(),
                           ft0.numpy(), lr, TIMES[time])
    np.testing.assert_allclose(train.numpy(), dense[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(test.numpy(), dense[1], rtol=1e-9, atol=1e-11)
    scalar = predict.gradient_descent_mse(theta, y, fx_train_0=f0, ntk_test_train=cross, fx_test_0=ft0,
                                          diag_reg=float(reg.mean()), **options)[1]
    assert float((scalar - test).abs().max()) > 1e-3


@pytest.mark.parametrize("time", TIMES)
@pytest.mark.parametrize("full", [False, True], ids=["(N, N) kernel", "(N, N, k, k) kernel"])
def test_gradient_descent_mse_differentiates_a_regularizer_per_point(full, time):
    """The gradient of the outputs in an ``(N,)`` ``diag_reg`` that requires grad flows, as a scalar's
    does: central differences (h = 1e-6, truncation ~h² of outputs of order 1) agree to 1e-6 relative,
    for every point's value."""
    _, _, y, _, reg, theta, cross = _ntk_matrices(2)
    eye = torch.eye(2, dtype=torch.float64)
    if full:
        theta, cross = torch.einsum("ab,ij->abij", theta, eye), torch.einsum("ab,ij->abij", cross, eye)
    g = torch.Generator().manual_seed(6)
    weights = torch.randn(N, 2, generator=g, dtype=torch.float64), torch.randn(M, 2, generator=g,
                                                                                dtype=torch.float64)

    def outputs(r):
        train, test = predict.gradient_descent_mse(theta, y, ntk_test_train=cross, fx_test_0=0.0, learning_rate=0.5,
                                                   diag_reg=r, **TIMES[time])
        return (weights[0] * train).sum() + (weights[1] * test).sum()

    leaf = reg.clone().requires_grad_()
    (grad,) = torch.autograd.grad(outputs(leaf), leaf)
    h = 1e-6
    step = torch.eye(N, dtype=torch.float64) * h
    numeric = torch.stack([(outputs(reg + step[i]) - outputs(reg - step[i])) / (2 * h) for i in range(N)])
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    assert float(grad.abs().min()) > 1e-4   # every value reaches the outputs


@pytest.mark.parametrize("time", TIMES)
def test_gradient_descent_mse_full_kernel_regularizer_per_point(time):
    """With a full ``(N, N, k, k)`` kernel an ``(N,)`` ``diag_reg`` regularizes each point's ``k`` outputs with
    its value: for ``Θ ⊗ I_k`` the outputs are those of the ``(N, N)`` kernel with ``(N, k)`` targets (1e-12),
    and for a kernel coupling the outputs the dense formulas of the flat ``(N k, N k)`` kernel (point-major,
    as flatten_full_kernel) with ``s·diag(r ⊗ 1_k)``, ``s`` its mean diagonal."""
    _, _, y, _, reg, theta, cross = _ntk_matrices(2)
    k, lr = 2, 0.5
    eye = torch.eye(k, dtype=torch.float64)
    options = dict(ntk_test_train=cross, fx_test_0=0.0, learning_rate=0.5, diag_reg=reg, **TIMES[time])
    plain = predict.gradient_descent_mse(theta, y, **options)
    options["ntk_test_train"] = torch.einsum("ab,ij->abij", cross, eye)
    joint = predict.gradient_descent_mse(torch.einsum("ab,ij->abij", theta, eye), y, **options)
    for a, b in zip(joint, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(N * k, N * k + 3, generator=g, dtype=torch.float64)
    flat = a @ a.T / N
    flat_cross = torch.randn(M * k, N * k, generator=g, dtype=torch.float64)
    full, full_cross = flat.reshape(N, k, N, k).permute(0, 2, 1, 3), flat_cross.reshape(M, k, N, k).permute(0, 2, 1, 3)
    f0 = torch.randn(N, k, generator=g, dtype=torch.float64)
    options.update(ntk_test_train=full_cross, fx_test_0=0.0)
    train, test = predict.gradient_descent_mse(full, y, fx_train_0=f0, **options)
    s = float(flat.trace()) / (N * k)
    dense = _dense_descent(flat.numpy() + s * np.diag(np.repeat(reg.numpy(), k)), flat_cross.numpy(), y.numpy(),
                           f0.numpy(), np.zeros((M, k)), lr, TIMES[time])
    np.testing.assert_allclose(train.numpy(), dense[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(test.numpy(), dense[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("full", [False, True], ids=["(N, N) kernel", "(N, N, k, k) kernel"])
def test_gradient_descent_mse_refuses_a_bad_regularizer_per_point_before_the_factorization(full, monkeypatch):
    """Shapes other than ``(N,)`` (also ``(N k,)`` of a full kernel's flat outputs, and ``(k,)``), NaN,
    negative, complex and boolean values are refused by name before the kernel is regularized."""
    _, _, y, _, reg, theta, _ = _ntk_matrices(3)
    if full:
        theta = torch.einsum("ab,ij->abij", theta, torch.eye(3, dtype=torch.float64))
    from ntkgp.predict import linearized

    def fail(*args, **kwargs):
        raise AssertionError("the kernel was regularized before diag_reg was checked")

    monkeypatch.setattr(linearized, "regularize", fail)
    monkeypatch.setattr(linearized, "flatten_full_kernel", fail)
    shape = rf"^diag_reg must be a number or one value per training point, shape \({N},\), got shape "
    for bad, message in [(torch.ones(N + 1), shape + rf"\({N + 1},\)\.$"),
                         (torch.ones(N, 1), shape + rf"\({N}, 1\)\.$"),
                         (torch.ones(3), shape + r"\(3,\)\.$"),
                         (torch.ones(N, 3), shape + rf"\({N}, 3\)\.$"),
                         (torch.ones(3 * N), shape + rf"\({3 * N},\)\.$"),
                         (torch.cat([reg[:4], torch.tensor([float("nan")], dtype=torch.float64), reg[5:]]),
                          "^diag_reg must be finite and non-negative at every training point; entry 4 is nan"),
                         (torch.cat([reg[:2], torch.tensor([-0.1], dtype=torch.float64), reg[3:]]), "entry 2 is -0.1"),
                         (reg.to(torch.complex128), "^diag_reg must be real, got dtype torch.complex128"),
                         (torch.ones(N, dtype=torch.bool), "^diag_reg must be real, got dtype torch.bool"),
                         ([True] * N, "got booleans"),
                         (-1.0, r"^diag_reg must be a finite non-negative number, got -1\.0\.$"),
                         (float("nan"), "^diag_reg must be a finite non-negative number")]:
        with pytest.raises(ValueError, match=message):
            predict.gradient_descent_mse(theta, y, t=1.0, diag_reg=bad)


def test_gradient_descent_mse_float32_kernel_with_a_regularizer_per_point():
    """A float32 kernel is factored in float64 with its float32 rounding kept: its outputs are those of the
    kernel cast up, bit for bit, and the dense formulas of those numbers (rtol 1e-9); a float32 ``diag_reg``
    is its exact float64 widening; float32 targets give the float64 outputs of their values, rounded."""
    _, _, y, _, reg, theta, cross = _ntk_matrices()
    theta32, cross32 = theta.float(), cross.float()
    options = dict(ntk_test_train=cross32, fx_test_0=0.0, t=7.0, learning_rate=0.5)
    out = predict.gradient_descent_mse(theta32, y, diag_reg=reg, **options)
    for a, b in zip(out, predict.gradient_descent_mse(theta32.double(), y, diag_reg=reg,
                                                      **{**options, "ntk_test_train": cross32.double()}), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    s = float(theta32.double().trace()) / N
    dense = _dense_descent(theta32.double().numpy() + s * np.diag(reg.numpy()), cross32.double().numpy(), y.numpy(),
                           np.zeros(N), np.zeros(M), 0.5, {"t": 7.0})
    np.testing.assert_allclose(out[0].numpy(), dense[0], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out[1].numpy(), dense[1], rtol=1e-9, atol=1e-11)
    for a, b in zip(predict.gradient_descent_mse(theta32, y, diag_reg=reg.float(), **options),
                    predict.gradient_descent_mse(theta32, y, diag_reg=reg.float().double(), **options), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    single = predict.gradient_descent_mse(theta32, y.float(), diag_reg=reg, **options)
    assert all(part.dtype == torch.float32 for part in single)
    # computed in float64 from the float32 targets' values, rounded once
    for a, b in zip(single, predict.gradient_descent_mse(theta32, y.float().double(), diag_reg=reg, **options),
                    strict=True):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)
