"""The compiled CPU engine of train_ensemble (ntkgp.finite.fused) against the stacked torch step."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

import ntkgp
import ntkgp.finite.fused as fused_module
from ntkgp.finite import train as train_module

X = torch.linspace(-math.pi, math.pi, 5, dtype=torch.float64).unsqueeze(-1)
Y = torch.sin(X)
X_TEST = torch.linspace(-4, 4, 9, dtype=torch.float64).unsqueeze(-1)

needs_kernel = pytest.mark.skipif(isinstance(fused_module.library(torch.float64), str),
                                  reason="no C compiler to build the fused kernel")


def train_ensemble(*args, **kwargs):
    """train_ensemble on the CPU, the fused engine's device, also where CUDA is available (and would be
    the default): there engine='auto' trains stacked on the GPU, and every check of this file missed."""
    kwargs.setdefault("device", "cpu")
    return train_module.train_ensemble(*args, **kwargs)


ARCHITECTURES = {   # name: (spec, input features, outputs)
    # the network: 2 hidden erf layers, NTK parameterization
    "erf": (lambda: ntkgp.mlp(2, "erf", 2.25, 0.0025, width=40), 1, 1),
    # standard parameterization (per-layer rates), ReLU, three hidden layers, widths not multiples of 8
    "relu-standard": (lambda: ntkgp.mlp(3, "relu", 2.0, 0.1, width=37, parameterization="standard"), 1, 1),
    # no biases, leaky ReLU, two outputs, ARD on 2 input features
    "leaky-ard": (lambda: ntkgp.mlp(1, "leaky_relu", 1.7, None, width=19, out_dim=2, ard_num_dims=2), 2, 2),
    # nested containers, a scaled erf, an Abs, two Dense layers in a row (identity between them)
    "mixed": (lambda: ntkgp.serial(ntkgp.Dense(30, 2.0, 0.05), ntkgp.serial(ntkgp.Erf(a=1.3, b=0.7, c=0.1),
                                                                           ntkgp.Dense(20, 1.5, 0.05)),
                                   ntkgp.Abs(), ntkgp.Dense(12, 1.2, 0.0), ntkgp.Dense(1, 1.0, 0.1)), 1, 1),
}


@pytest.fixture(autouse=True)
def _warn_afresh(monkeypatch):
    """engine="auto" warns once per process about a kernel it could not build: once per test here."""
    monkeypatch.setattr(fused_module, "_warned", set())


def _case(name, dtype):
    spec, d, k = ARCHITECTURES[name]
    x = torch.cat([X, torch.cos(X)], -1)[:, :d]
    y = torch.cat([Y, Y ** 2], -1)[:, :k]
    xt = torch.cat([X_TEST, X_TEST / 2], -1)[:, :d]
    return spec(), x.to(dtype), y.to(dtype), xt.to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fused_engine_trains_as_the_stacked_step(name, dtype):
    net, x, y, xt = _case(name, dtype)
    kwargs = dict(ensemble_size=5, learning_rate=0.1, record_steps=[0, 1, 9, 60], x_test=xt, probe=x[:3],
                  dtype=dtype, device="cpu", chunk_size=3)
    fused = train_ensemble(net, x, y, engine="fused", **kwargs)
    stacked = train_ensemble(net, x, y, engine="stacked", **kwargs)
    assert fused.settings["engine"] == "fused" and stacked.settings["engine"] == "stacked"
    assert float(fused.train_loss[-1].mean()) < 0.5 * float(fused.train_loss[0].mean())   # it trains
    # measured over these four networks: float64 ≤ 1.1e-14 absolute (outputs), ≤ 6e-15 relative (loss,
    # weight and NTK changes); float32 ≤ 3.8e-6 absolute (outputs), ≤ 3.9e-6 relative (the rest)
    rtol, atol = (1e-12, 1e-13) if dtype == torch.float64 else (2e-5, 1e-5)
    torch.testing.assert_close(fused.test_outputs, stacked.test_outputs, rtol=rtol, atol=atol)
    torch.testing.assert_close(fused.train_loss, stacked.train_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(fused.weight_change, stacked.weight_change, rtol=rtol, atol=atol)
    torch.testing.assert_close(fused.ntk_change, stacked.ntk_change, rtol=rtol, atol=atol)
    for group in stacked.layer_change:
        torch.testing.assert_close(fused.layer_change[group], stacked.layer_change[group], rtol=rtol, atol=atol)


@needs_kernel
def test_fused_members_follow_their_own_autograd_training():
    """One member against a hand-written autograd loop of its own network, 30 steps, float64."""
    net = ARCHITECTURES["relu-standard"][0]()
    h = train_ensemble(net, X, Y, ensemble_size=4, learning_rate=0.15, record_steps=[30], dtype=torch.float64,
                       engine="fused")
    model = net.build(in_features=1, seed=0, ensemble_size=4, dtype=torch.float64)
    rates = ntkgp.finite.equivalent_learning_rates(model, 0.15)
    params = {n: p.detach()[2].clone().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(30):
        loss = 0.5 * ((torch.func.functional_call(model, params, (X,)) - Y) ** 2).sum() / Y.numel()
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - rates[n] * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads,
                                                                                          strict=True)}
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (X,))
    torch.testing.assert_close(h.test_outputs[0, 2], out, rtol=1e-12, atol=1e-13)


@needs_kernel
def test_a_divergence_is_found_at_the_same_step_by_both_engines():
    net = ARCHITECTURES["erf"][0]()
    kwargs = dict(ensemble_size=3, learning_rate=30.0, record_steps=[0, 2, 400], dtype=torch.float64)
    fused = train_ensemble(net, X, Y, engine="fused", **kwargs)
    stacked = train_ensemble(net, X, Y, engine="stacked", **kwargs)
    assert stacked.diverged_at is not None and 2 < stacked.diverged_at < 400
    assert fused.diverged_at == stacked.diverged_at
    assert fused.steps.tolist() == stacked.steps.tolist() == [0, 2]
    torch.testing.assert_close(fused.test_outputs, stacked.test_outputs, rtol=1e-11, atol=1e-12)


@needs_kernel
def test_results_do_not_depend_on_threads_or_on_how_the_steps_are_split(monkeypatch):
    net, x, y, xt = _case("mixed", torch.float32)
    kwargs = dict(ensemble_size=5, learning_rate=0.1, record_steps=[0, 50], x_test=xt, dtype=torch.float32,
                  engine="fused")
    reference = train_ensemble(net, x, y, **kwargs).test_outputs
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = train_ensemble(net, x, y, **kwargs).test_outputs
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(fused_module, "_CALL_SECONDS", 0.0)    # one step per call into the kernel
    split = train_ensemble(net, x, y, **kwargs).test_outputs
    assert torch.equal(single, reference) and torch.equal(split, reference)


@needs_kernel
@pytest.mark.parametrize("case, reason", [
    (dict(readout_only=True), "every parameter"),
    (dict(net=ntkgp.serial(ntkgp.Dense(8), ntkgp.residual(ntkgp.ReLU(), ntkgp.Dense(8)), ntkgp.Dense(1))),
     "erf or ReLU-type"),
    (dict(net=ntkgp.mlp(1, "tanh", width=8)), "erf or ReLU-type"),
    (dict(net=ntkgp.mlp(1, "gelu", width=8)), "not GELU"),
    (dict(net=ntkgp.serial(ntkgp.Dense(8), ntkgp.ReLU(), ntkgp.Dense(1), ntkgp.ReLU())), "end in a Dense"),
    (dict(net=ntkgp.serial(ntkgp.Dense(8), ntkgp.Erf(), ntkgp.ReLU(), ntkgp.Dense(1))), "one erf or ReLU-type"),
])
def test_engine_fused_says_why_it_does_not_apply(case, reason):
    net = case.pop("net", ARCHITECTURES["erf"][0]())
    with pytest.raises(ValueError, match=reason):
        train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[3], engine="fused", **case)
    # auto falls back to the stacked step, which trains them (records far enough apart for auto to want fused)
    h = train_ensemble(net, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40], **case)
    assert h.settings["engine"] == "stacked"


def test_engine_fused_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32 and float64"):
        train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[3],
                       dtype=torch.bfloat16, engine="fused")


def test_without_a_compiler_auto_trains_stacked_and_fused_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))   # nothing cached there
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        h = train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40])
    assert h.settings["engine"] == "stacked"
    with pytest.raises(ValueError, match=r"could not be built or loaded.*no-such-compiler"):
        train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[3],
                       engine="fused")


def test_scratch_folders_of_killed_compiles_are_removed(monkeypatch, tmp_path):
    """A compile killed midway left its ntkgp-* scratch folder in the cache for good; the next
    compile removes those older than an hour (a live compile's is at most 300 s old)."""
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")   # fails at once: the clean-up comes before any compile
    stale, live = tmp_path / "ntkgp-a1b2c3d4", tmp_path / "ntkgp-e5f6g7h8"
    # a cache shared with other things: only a folder a compile can have left is removed
    others = [tmp_path / "ntkgp-dev", tmp_path / "ntkgp-x9y8z7w6"]
    for folder in (stale, live, *others):
        folder.mkdir()
        (folder / "fused_mlp_partial.so").write_bytes(b"cut short")
    (others[1] / "notes.txt").write_text("mine")
    hours_ago = time.time() - 2 * fused_module.STALE_SCRATCH_SECONDS
    for folder in (stale, *others):
        os.utime(folder, (hours_ago, hours_ago))
    assert isinstance(fused_module.library(torch.float32), str)
    assert not stale.exists() and live.is_dir() and all(folder.is_dir() for folder in others)


def test_bad_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be"):
        train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[3],
                       engine="loop")


@needs_kernel
def test_the_kernel_is_compiled_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    assert not isinstance(fused_module.library(torch.float32), str)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 2 and built[0].endswith(".so") and built[1] == built[0] + ".sha256"
    monkeypatch.setattr(fused_module, "_libraries", {})

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(fused_module.subprocess, "run", no_compiler)   # a new process loads the cached one
    assert not isinstance(fused_module.library(torch.float32), str)
    assert sorted(p.name for p in tmp_path.iterdir()) == built


@needs_kernel
def test_an_unusable_cache_folder_compiles_in_a_private_folder_it_deletes(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_module, "_libraries", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(blocker / "cache"))   # cannot be created under a file
    # a temporary folder of the test's own: other processes' ntkgp-* folders came and went in the shared
    # one while this compiled (a failure under parallel test runs)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    before = set(Path(tempfile.gettempdir()).glob("ntkgp-*"))
    built = fused_module.library(torch.float32)
    assert not isinstance(built, str)
    folder = Path(built._name).parent
    # a fresh folder (mkdtemp), not a predictable shared path, and gone once the library is loaded
    assert folder.name.startswith("ntkgp-") and folder.parent == Path(tempfile.gettempdir())
    assert not folder.exists() and set(Path(tempfile.gettempdir()).glob("ntkgp-*")) == before
    h = train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40],
                       engine="fused")
    assert h.settings["engine"] == "fused"


@needs_kernel
def test_a_read_only_cache_still_serves_the_library_built_before(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    first = fused_module.library(torch.float64)
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setattr(fused_module, "_writable", lambda folder: False)

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(fused_module.subprocess, "run", no_compiler)
    assert fused_module.library(torch.float64)._name == first._name


@needs_kernel
def test_a_read_only_cache_compiles_a_library_without_its_digest_again(monkeypatch, tmp_path):
    """Such a library (from before digests, or whose digest was lost) was loaded as it was where the
    cache is read-only: cut short, it killed the process with a bus error, in every later process."""
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    first = Path(fused_module.library(torch.float64)._name)
    Path(f"{first}.sha256").unlink()
    cut = tmp_path / "cut"
    cut.write_bytes(first.read_bytes()[:1000])
    os.replace(cut, first)   # a new file: truncating the one this process has mapped would crash it
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setattr(fused_module, "_writable", lambda folder: False)
    real_load = fused_module._load

    def careful_load(path):
        if Path(path) == first:
            raise AssertionError("a library without its digest was loaded")
        return real_load(path)

    monkeypatch.setattr(fused_module, "_load", careful_load)
    again = fused_module.library(torch.float64)
    assert not isinstance(again, str), again
    assert Path(again._name) != first and Path(again._name).name == first.name   # built in a scratch folder


@needs_kernel
def test_an_empty_cache_variable_is_unset_and_cc_may_carry_arguments(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NTKGP_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -std=gnu11")   # program and flag
    built = fused_module.library(torch.float32)
    assert not isinstance(built, str), built
    assert Path(built._name).is_absolute() and Path(built._name).parent == tmp_path / "xdg" / "ntkgp"
    assert not list(tmp_path.glob("*.so"))   # nothing left in the working folder


@needs_kernel
@pytest.mark.parametrize("records, engine", [
    ([0, 10, 100], "fused"),
    (list(range(0, 41, 4)), "fused"),    # 10 kernel calls of 4 steps: the measured crossover
    (list(range(4, 41, 4)), "fused"),
    (list(range(0, 30, 3)), "stacked"),
    ([0, 3], "stacked"),
])
def test_auto_takes_the_fused_engine_unless_records_come_every_few_steps(records, engine):
    h = train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=records)
    assert h.settings["engine"] == engine


class _Residual(torch.nn.Sequential):
    def forward(self, z):
        return z + super().forward(z)


def _modified(kind):
    model = ntkgp.mlp(2, "relu", 2.0, 0.1, width=8).build(in_features=1, seed=0, ensemble_size=3,
                                                           dtype=torch.float64)
    if kind == "Sequential subclass":
        model.__class__ = _Residual
    elif kind == "forward hook":
        model[1].register_forward_hook(lambda module, inputs, output: 3 * output)
    elif kind == "forward pre-hook":
        model[2].register_forward_pre_hook(lambda module, inputs: (0.5 * inputs[0],))
    elif kind == "Dense used twice":
        model[4] = model[2]
    elif kind == "shared storage":
        model[4].weight = torch.nn.Parameter(model[2].weight.data)
    elif kind == "weight as a buffer":
        weight = model[2].weight.data
        del model[2].weight
        model[2].register_buffer("weight", weight)
    return model


@needs_kernel
@pytest.mark.parametrize("kind, reason", [
    ("unchanged", None),
    ("Sequential subclass", "not _Residual"),
    ("forward hook", "forward hooks"),
    ("forward pre-hook", "forward hooks"),
    ("Dense used twice", "used once"),
    ("shared storage", "of its own"),
    ("weight as a buffer", "trained parameters"),
])
def test_networks_the_kernel_would_compute_differently_are_refused(kind, reason):
    """The kernel computes the plain modules' formulas: a custom Layer.finite could build others."""
    model = _modified(kind)
    names = [n for n, _ in model.named_parameters()]
    got = fused_module.fused_steps(model, names, dict.fromkeys(names, 0.1), X, Y)
    if reason is None:
        assert isinstance(got, fused_module.FusedSteps)
    else:
        assert isinstance(got, str) and reason in got, got


def test_a_missing_source_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setattr(fused_module, "SOURCE", tmp_path / "gone.c")
    assert "source is missing" in fused_module.library(torch.float64)
    with pytest.warns(RuntimeWarning, match="source is missing"):
        h = train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40],
                           dtype=torch.float64)
    assert h.settings["engine"] == "stacked"


@needs_kernel
def test_a_corrupt_cached_library_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """dlopen of a truncated library killed the process with a bus error (in every later process
    too, until the file was deleted by hand): the cache now keeps each library's digest."""
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    first = Path(fused_module.library(torch.float32)._name)
    good = first.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(good[:1000])
    os.replace(cut, first)   # a new file: truncating the one this process has mapped would crash it
    monkeypatch.setattr(fused_module, "_libraries", {})
    real_load = fused_module._load

    def careful_load(path):
        if Path(path).read_bytes() != good:
            raise AssertionError(f"a corrupt library was loaded: {path}")
        return real_load(path)

    monkeypatch.setattr(fused_module, "_load", careful_load)
    again = fused_module.library(torch.float32)
    assert Path(again._name) == first and first.read_bytes() == good


@pytest.mark.parametrize("cc", ["gcc '", "true"])
def test_a_broken_cc_is_a_reason_and_auto_trains_stacked(monkeypatch, tmp_path, cc):
    # an unbalanced quote raised ValueError from shlex; a "compiler" exiting 0 without output, FileNotFoundError
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", cc)
    assert isinstance(fused_module.library(torch.float64), str)
    with pytest.warns(RuntimeWarning, match="fused kernel is unavailable"):
        h = train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40])
    assert h.settings["engine"] == "stacked"


def test_no_folder_to_compile_in_is_a_reason_and_auto_trains_stacked(monkeypatch, tmp_path):
    """With neither the cache nor the temp folder usable, TemporaryDirectory's NotADirectoryError
    escaped through library(): train_ensemble(engine="auto") aborted instead of training stacked."""
    # torch's first meta operation imports torch._dynamo, which needs the temp folder: imported before it goes
    import torch._dynamo

    monkeypatch.setattr(fused_module, "_libraries", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(blocker / "cache"))   # cannot be created under a file
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))          # nor a folder made in the temp folder
    monkeypatch.setenv("CC", "cc")   # never run: the folder to compile in is missing first
    reason = fused_module.library(torch.float64)
    assert isinstance(reason, str) and "no folder to compile in" in reason and "Not a directory" in reason
    with pytest.warns(RuntimeWarning, match="no folder to compile in"):
        h = train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40],
                           dtype=torch.float64)
    assert h.settings["engine"] == "stacked"
    with pytest.raises(ValueError, match=r"engine='fused' does not apply: .*no folder to compile in"):
        train_ensemble(ARCHITECTURES["erf"][0](), X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40],
                       dtype=torch.float64, engine="fused")


def test_auto_warns_once_per_dtype_when_the_kernel_cannot_be_built(monkeypatch, tmp_path):
    """The stacked fallback (3-4x slower) was silent, its reason only in fused._libraries; an
    architecture the kernel does not take stays silent."""
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    erf = ARCHITECTURES["erf"][0]()
    with pytest.warns(RuntimeWarning, match=r"stacked step .*no-such-compiler.*engine='stacked' to silence") as got:
        h = train_ensemble(erf, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40], dtype=torch.float64)
    assert h.settings["engine"] == "stacked" and len(got) == 1 and got[0].filename == __file__   # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in (dict(), dict(engine="stacked"), dict(readout_only=True)):   # once; not for readout_only
            train_ensemble(erf, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40], dtype=torch.float64,
                           **kwargs)
        monkeypatch.setattr(fused_module, "_warned", set())
        # the library failed for float64, but a network the kernel does not take is no news (the Sin layer)
        other = ntkgp.serial(ntkgp.Dense(8, 1.5, 0.1), ntkgp.Sin(), ntkgp.Dense(1, 1.0, 0.1))
        assert train_ensemble(other, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40],
                              dtype=torch.float64).settings["engine"] == "stacked"
    with pytest.warns(RuntimeWarning, match=r"torch\.float32 networks"):
        train_ensemble(erf, X, Y, ensemble_size=2, learning_rate=0.1, record_steps=[40], dtype=torch.float32)


@needs_kernel
def test_a_whole_cached_library_that_does_not_load_is_built_again(monkeypatch, tmp_path):
    """Such a library (its digest matching) was skipped by every process, each loading the next
    flag set's library instead (without libmvec: 1.5x slower erf networks), and never rebuilt."""
    monkeypatch.setattr(fused_module, "_libraries", {})
    monkeypatch.setenv("NTKGP_CACHE_DIR", str(tmp_path))
    first = Path(fused_module.library(torch.float64)._name)
    good = first.read_bytes()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"garbage\n")
    os.replace(garbage, first)   # a new file: overwriting the one this process has mapped would crash it
    Path(f"{first}.sha256").write_text(fused_module._digest(first) + "\n")
    monkeypatch.setattr(fused_module, "_libraries", {})
    real_load = fused_module._load

    def fresh_load(path):   # as a new process would: this one's dlopen returns the handle it has for the path
        if Path(path).read_bytes() == b"garbage\n":
            raise OSError(f"{path}: invalid ELF header")
        return real_load(path)

    monkeypatch.setattr(fused_module, "_load", fresh_load)
    again = fused_module.library(torch.float64)
    assert not isinstance(again, str), again
    assert Path(again._name) == first and first.read_bytes()[:4] == good[:4] == b"\x7fELF"
    assert fused_module._intact(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, f"{first.name}.sha256"])
