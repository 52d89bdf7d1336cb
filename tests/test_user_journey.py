"""What a new user meets following the README and docs with data of their own: refusals that say the fix
before any work, and the documented behaviour of the workflows they try first."""

import re

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
    with pytest.raises(ValueError, match=r"got \(3,\); one point is x_test\.unsqueeze\(0\)"):
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
