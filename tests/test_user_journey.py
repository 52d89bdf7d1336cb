"""What a new user meets following the README and docs with data of their own: refusals that say the fix
before any work, and the documented behaviour of the workflows they try first."""

import re
import warnings

import numpy as np
import pytest
import torch

import ntkgp
import ntkgp.predict.gaussian
from ntkgp import predict
from ntkgp.models import NetworkGP


@pytest.fixture
def machine_of_one_mib(monkeypatch):
    """A device of 1 MiB: the checks read its size from device_memory."""
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2**20)


def test_kernels_beyond_memory_are_refused_before_any_work_with_what_to_do(machine_of_one_mib):
    """net.kernel refuses kernels whose output alone exceeds the device's memory, as the empirical kernels
    do: 60 000 points in float64 (53.6 GiB for the two kernels) computed row blocks for a minute under
    autograd before torch's allocator failed on a 1.7 MB block, or the operating system killed the process."""
    net = ntkgp.mlp(depth=2, activation="erf")
    x = torch.randn(300, 3, dtype=torch.float64)
    # 300² entries × 8 bytes = 0.69 MiB per kernel: the NNGP alone fits, the pair (1.37 MiB) does not
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"NNGP and NTK, 300 x 300 each, in torch.float64\) "
                                                          r"needs 0\.00134 GiB"):
        net.kernel(x)
    with pytest.raises(RuntimeError, match=r"slices of x1.*diag=True.*ntk=False"):   # torch's OOM is a RuntimeError
        net.kernel(x, x)
    assert net.kernel(x, ntk=False).nngp.shape == (300, 300)
    assert net.kernel(x, diag=True).ntk.shape == (300,)
    # a batch of kernels counts every matrix; the predictors' training kernel is refused the same way
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"the NNGP, 2 x 300 x 300, in torch.float64"):
        net.kernel(x.expand(2, 300, 3), ntk=False)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="subsample the training points"):
        predict.gp_posterior(net, torch.randn(400, 3, dtype=torch.float64), torch.randn(400, dtype=torch.float64),
                             x[:5], kernel="nngp", noise=0.1)


def test_arrays_and_lists_are_refused_with_the_conversion_that_works():
    """neural-tangents takes numpy (JAX) arrays; ntkgp takes tensors, and its refusal names the conversion,
    which is checked to run: an object array (a pandas frame of mixed columns' .values) needs its dtype first,
    since torch.as_tensor refuses numpy.object_."""
    net = ntkgp.mlp(depth=1, activation="erf")
    x = np.array([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]])
    y = np.array([0.1, -0.2, 0.3])
    cases = [(lambda a: net.kernel(a), x, "x1"), (lambda a: net.kernel(a), x.tolist(), "x1"),
             (lambda a: net.kernel(a), x.astype(object), "x1"),
             (lambda a: predict.gp_posterior(net, torch.as_tensor(x), a, torch.as_tensor(x), noise=0.1), y, "y_train"),
             (lambda a: predict.gp_posterior(net, torch.as_tensor(x), a, torch.as_tensor(x), noise=0.1),
              y.astype(object), "y_train")]
    for call, value, name in cases:
        with pytest.raises(ValueError, match=r"convert it with (torch\.as_tensor\(.*\))\.$") as error:
            call(value)
        conversion = re.search(r"convert it with (torch\.as_tensor\(.*\))\.$", str(error.value)).group(1)
        converted = eval(conversion, {"torch": torch, name: value})
        assert isinstance(converted, torch.Tensor) and converted.dtype == torch.float64
        assert torch.equal(converted, torch.as_tensor(np.asarray(value, dtype=np.float64)))
        call(converted)   # runs


def test_network_gp_refuses_class_labels_with_the_fix():
    """Integer or boolean targets were refused as "train_y must be a floating-point tensor, got torch.int64."
    without the conversion that the kernels' own checks of x name."""
    x = torch.randn(6, 2, dtype=torch.float64)
    for labels in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([True, False] * 3)):
        with pytest.raises(ValueError, match=r"got torch\.(int64|bool); convert it with train_y\.double\(\).*"
                                             r"ntkgp\.bayes\.one_hot_targets\(train_y\)"):
            NetworkGP(x, labels, depth=1)
        assert NetworkGP(x, ntkgp.bayes.one_hot_targets(labels), depth=1).num_outputs == int(labels.max()) + 1
    with pytest.raises(ValueError, match=r"got list; convert it with torch\.as_tensor\(train_y, dtype=train_x\."):
        NetworkGP(x, [0.0] * 6, depth=1)


def test_one_point_as_a_vector_is_told_to_unsqueeze_its_first_axis():
    """A single test point of d > 1 features passed as ``x[0]``, shape (d,), was told "for scalar features use
    x_test.unsqueeze(-1)", which makes d points of one feature and is refused next; NetworkGP named the
    shape GPyTorch reads, (d, 1), not the one given. The hint now is unsqueeze(0), and following it works."""
    net = ntkgp.mlp(depth=1, activation="erf")
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    hint = r"got shape \(3,\).*one point of 3 features is {}\.unsqueeze\(0\)"
    with pytest.raises(ValueError, match=hint.format("x_test")):
        predict.gp_posterior(net, x, y, x[0], noise=0.1)
    with pytest.raises(ValueError, match=hint.format("x_test")):
        predict.gradient_flow(net, x, y, x[0], t=1.0)
    with pytest.raises(ValueError, match=hint.format("x2")):
        net.kernel(x, x[0])
    model = NetworkGP(x, y, net)
    model.eval()
    with pytest.raises(ValueError, match=r"got shape \(3,\) \(GPyTorch reads it as \(3, 1\)\); one point of 3 "
                                         r"features is x\.unsqueeze\(0\)"):
        model(x[0])
    with pytest.raises(ValueError, match=r"got \(3,\); one point of 3 features is x_test\.unsqueeze\(0\)"):
        model.gaussian(x[0])
    # the fix gives the first point's prediction, as part of the whole set (the same training solve: to rounding)
    whole = predict.gp_posterior(net, x, y, x, noise=0.1)
    torch.testing.assert_close(predict.gp_posterior(net, x, y, x[0].unsqueeze(0), noise=0.1).mean, whole.mean[:1],
                               rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(net.kernel(x, x[0].unsqueeze(0)).ntk[:, 0], net.kernel(x).ntk[:, 0],
                                   rtol=1e-12, atol=1e-12)
    # with one feature, (M,) is still M points, as before
    with pytest.raises(ValueError, match=r"for scalar features use x_test\.unsqueeze\(-1\)"):
        predict.gp_posterior(net, x[:, :1], y, x[:, 0], noise=0.1)


def _advised_slice(error: pytest.ExceptionInfo) -> str:
    """The call named after "compute them in slices of x1 (" in a refusal."""
    return re.search(r"slices of x1 \((net\.kernel\(.*?\))\)", str(error.value)).group(1)


def test_the_slices_advised_beyond_memory_are_rows_of_the_refused_kernel(monkeypatch):
    """The refusal named net.kernel(x1[i:j], x2) whatever the call: without x2 that is the slice's own square
    kernel (x2 = None), with batched inputs x1[i:j] slices the batch (x2's then did not broadcast: "Batch
    shapes of x1 (2,) and x2 (4,)"), and diag=True was offered for x2 of another size, which it refuses. Each
    advised call here is evaluated on slices and joined: it gives the refused kernel (the same recursion on the
    same pairs: to 1e-12)."""
    net = ntkgp.mlp(depth=2, activation="erf")
    gen = torch.Generator().manual_seed(3)
    x, z = torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    xb, zb = x.reshape(2, 6, 3), torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    cases = [((x, None), {}), ((x, z), {}), ((xb, zb), {}), ((x, x.flip(0)), {"diag": True}),
             ((xb, None), {"diag": True}),
             # an unbatched x1 paired with a batched x2: x2[i:j] sliced x2's batch ("both need the same number
             # of points, got x1 of shape (2, 3) and x2 of shape (2, 12, 3)"), not its points
             ((x, torch.stack([x.flip(0), x])), {"diag": True})]
    with torch.no_grad():
        expected = [net.kernel(*args, **kw).ntk for args, kw in cases]
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 8)   # one float64 entry
    for ((x1, x2), kw), want in zip(cases, expected, strict=True):
        with pytest.raises(torch.cuda.OutOfMemoryError) as error:
            net.kernel(x1, x2, **kw)
        call = _advised_slice(error)
        assert ("diag=True" in str(error.value)) == (x2 is None or x2.shape == x1.shape or "diag" in kw)
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: 2**30)
            n = x1.shape[-2]
            parts = [eval(call, {"net": net, "x1": x1, "x2": x2, "i": i, "j": i + 2}).ntk for i in range(0, n, 2)]
        got = torch.cat(parts, dim=-1 if "diag" in kw else -2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_diagonals_of_batched_hyperparameters_count_every_batch(monkeypatch):
    """A diagonal's batch was its inputs' alone: with a batch of 4 hyperparameters (GPyTorch's batch_shape) the
    (4, n) diagonals were counted as one (n,) and not refused at memory between the two."""
    net = ntkgp.mlp(depth=2, activation="erf")
    net.expand_batch([4])
    x = torch.randn(300, 3, dtype=torch.float64)
    with torch.no_grad():
        assert net.kernel(x, diag=True).ntk.shape == (4, 300)
    need = 2 * 4 * 300 * 8   # NNGP and NTK diagonals, 4 x 300 float64 entries each
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: need - 1)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"NNGP and NTK diagonals, 4 x 300 each"):
        net.kernel(x, diag=True)
    monkeypatch.setattr(ntkgp.predict.gaussian, "device_memory", lambda device: need)
    assert net.kernel(x, diag=True).nngp.shape == (4, 300)


class _ArrayLike:
    """An array by numpy's protocol alone (as xarray's, or JAX's without its sequence protocol)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)


def test_frames_arrays_and_lists_of_tensors_are_told_a_conversion_that_runs():
    """torch.as_tensor(x, dtype=torch.float64), named for every array, failed on a pandas DataFrame ("could not
    determine the shape of object type 'DataFrame'"), on an object with __array__ alone ("must be real number"),
    and on a list of row tensors ("only one element tensors can be converted to Python scalars"); a numpy
    scalar was told a conversion that the shape check refused next. NetworkGP's predictions named none, and
    float64 would be refused by a float32 model: its conversion is to the model's dtype."""
    pd = pytest.importorskip("pandas")
    net = ntkgp.mlp(depth=1, activation="erf")
    x = np.array([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]])
    values = [pd.DataFrame(x, columns=["a", "b"]), pd.DataFrame({"a": x[:, 0], "b": [-1, 0, 1]}).astype(object),
              _ArrayLike(x), [torch.as_tensor(row) for row in x], np.array(x.astype(str)),
              # read-only: torch.as_tensor shared it with "The given NumPy array is not writable" (pandas 3's .values)
              np.broadcast_to(x, x.shape), pd.DataFrame(x, columns=["a", "b"]).values]
    pattern = r"(?:convert it|stack its tensors) with (torch\..*)\.$"
    for value in values:
        with pytest.raises(ValueError, match=pattern) as error:
            net.kernel(value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # torch's "The given NumPy array is not writable": a copy is made
            converted = eval(re.search(pattern, str(error.value)).group(1), {"torch": torch, "numpy": np, "x1": value})
        assert converted.dtype == torch.float64
        assert torch.equal(converted, torch.tensor(np.array(value, dtype=np.float64)))
        if isinstance(value, np.ndarray) and not value.flags.writeable:   # torch warns once per process: a copy
            assert not np.shares_memory(converted.numpy(), value)
        net.kernel(converted)   # runs
    with pytest.raises(ValueError, match=r"got float64\.$"):
        net.kernel(np.float64(1.0))
    model = NetworkGP(torch.as_tensor(x, dtype=torch.float32), torch.randn(3), net)
    model.eval()
    points = x[:2] / 2
    for call, name in ((model, "x"), (model.gaussian, "x_test")):
        with pytest.raises(ValueError, match=pattern) as error:
            call(points)
        converted = eval(re.search(pattern, str(error.value)).group(1), {"torch": torch, "numpy": np, name: points})
        assert converted.dtype == torch.float32
        with torch.no_grad():
            call(converted)   # runs


def test_a_gpytorch_kernel_called_on_arrays_is_told_the_conversion_that_runs():
    """NTKKernel(net)(x) on a numpy array or a list said only "got ndarray", where net.kernel(x) names the
    conversion: the advised call gives the kernel of the tensor (the same recursion on the same points)."""
    net = ntkgp.mlp(depth=1, activation="erf")
    kernel = ntkgp.NTKKernel(net)
    x = np.array([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]])
    pattern = r"(?:convert it|stack its tensors) with (torch\..*)\.$"
    for value in (x, x.tolist(), [torch.as_tensor(row) for row in x]):
        with pytest.raises(ValueError, match=pattern) as error:
            kernel(value)
        converted = eval(re.search(pattern, str(error.value)).group(1), {"torch": torch, "numpy": np, "x1": value})
        with torch.no_grad():
            torch.testing.assert_close(kernel(converted).to_dense(), net.kernel(torch.as_tensor(x)).ntk,
                                       rtol=1e-12, atol=1e-12)
