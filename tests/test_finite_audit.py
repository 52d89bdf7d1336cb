"""Audit of ntkgp.finite (session 49, H10): what a demanding user of neural-tangents would do with it."""

from __future__ import annotations

import math

import pytest
import torch

import ntkgp
import ntkgp.finite.fused as fused_module
from ntkgp.finite import train_ensemble

X = torch.linspace(-math.pi, math.pi, 5, dtype=torch.float64).unsqueeze(-1)
Y = torch.sin(X)

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
