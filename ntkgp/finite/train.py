r"""Training ensembles of finite-width networks by full-batch gradient descent.

All ``E`` members of an ensemble are built from one spec with stacked weights
(``net.build(ensemble_size=E)``) and trained simultaneously: one batched forward and backward
pass per step serves every member, since the sum of the members' losses has each member's own
gradient in its own slice of the weights. Each member minimizes

    L(θ) = (1 / 2m) ‖f(θ, X) − Y‖²,   m = number of target entries,

by ``θ ← θ − η_p ∇_θ L`` with ``η_p = η`` (NTK parameterization) or the per-layer rates that make
the standard parameterization follow the same trajectory
(:func:`ntkgp.finite.rates.equivalent_learning_rates`). The analytic counterpart of ``s`` steps
is ``ntkgp.predict``'s ``steps=s, learning_rate=η`` (exact discrete time), or ``t=s`` in
continuous time (``τ = η s / m``, neural-tangents' convention), on the spec in NTK
parameterization: for a standard-parameterized spec, predict with
:func:`ntkgp.finite.ntk_parameterized` of it, since the standard spec's own NTK is that of one
learning rate for every parameter (it grows with the width, and its stable rates shrink with
it; docs/conventions.md), which is not how its members are trained here.
``EnsembleHistory.times`` is the gradient-flow time ``η s`` of ``dθ/dt = −∇L``, used to label
plots: it is ``predict``'s ``t`` only at ``predict``'s default ``learning_rate=1``.

Recorded at chosen steps: test outputs of every member (hence ensemble mean and variance), the
training loss, the relative weight change ``‖θ_t − θ_0‖ / ‖θ_0‖`` and the relative change of
the empirical NTK on a probe set ``‖Θ̂_t − Θ̂_0‖_F / ‖Θ̂_0‖_F``: "lazy training" (Lee et al. 2019,
Fig. 1). In NTK parameterization the input and readout weights move as ``width^(−1/2)`` and the
width × width ones as ``width^(−1)``, which dominate the total; the NTK changes at least as fast as
``width^(−1/2)`` (Dyer & Gur-Ari 2020).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from ntkgp._autograd import differentiates
from ntkgp._checks import check_flag, integer_at_least, seed_value
from ntkgp.finite.empirical import _empirical_ntk
from ntkgp.finite.fused import forward_hooks, fused_layers, fused_steps, warn_fallback
from ntkgp.finite.rates import equivalent_learning_rates
from ntkgp.layers.base import Layer, _autocast_off
from ntkgp.layers.combinators import ParallelModule
from ntkgp.layers.dense import DenseModule
from ntkgp.layers.validation import all_finite, check_points, positive_number, usable_device
from ntkgp.predict.gaussian import refuse_beyond_memory
from ntkgp.predict.spectral import real_numbers

#: Bytes of parameters (with gradients and activations) an ensemble chunk may hold by default,
#: counted in float32: float64 chunks hold twice as much, so that the default chunks, and with them
#: the members a seed draws (chunk ``c`` is seeded ``seed + 1_000_003 c``), do not depend on dtype.
CHUNK_BYTES = 1 << 30
#: Chunk ``c`` of an ensemble is seeded ``seed + SEED_STRIDE · c``.
SEED_STRIDE = 1_000_003

#: ``engine="auto"`` takes the fused engine when the records are on average at least this many steps
#: apart (``last step >= AUTO_FUSED_STEPS × number of records after step 0``, the kernel's calls, at
#: least one).
#: Measured at width 512, 16 members, a record every 1/2/4/8 steps: fused 3.6/2.6/1.7/1.3 s,
#: stacked 2.6/2.3/1.8/1.5 s.
AUTO_FUSED_STEPS = 4


@dataclass
class EnsembleHistory:
    """What :func:`train_ensemble` recorded, one entry per recorded step (tensors on the CPU,
    whatever device trained).

    Attributes:
        learning_rate: ``η`` (the base rate; per-layer rates for the standard parameterization
            are derived from it).
        steps: ``(T,)`` recorded step counts; ``times = learning_rate · steps``.
        test_outputs: ``(T, E, M, k)`` outputs of every member on the test inputs.
        train_loss: ``(T, E)`` per-member training loss ``(1/2m)‖f − Y‖²``.
        weight_change: ``(T, E)`` relative weight change ``‖θ_t − θ_0‖ / ‖θ_0‖`` (all parameters as
            stored, biases included: a standard-parameterized network stores its weights scaled by
            ``sqrt(σ_w²/n)``, so the same trajectory gives another number; ``layer_change`` is the
            same in both parameterizations).
        layer_change: the same per layer group, ``{"input": ..., "hidden": ..., "readout": ...}``, on
            the weights in NTK coordinates (:func:`layer_groups`):
            the ``Dense`` layers that read the network's input, the width × width layers in between,
            and the readout(s). Input and readout layers hold ``O(width)`` parameters and move as
            ``width^(−1/2)``; hidden layers hold ``O(width²)`` and move as ``width^(−1)`` (Lee et al.
            2019, Fig. 1), so the total follows whichever dominates its norm.
        ntk_change: ``(T, E)`` relative empirical-NTK change on the probe set (``None`` without
            probe), for the tangent kernel weighted by the per-parameter learning rates (the kernel
            that drives training; parameterization-independent; frozen parameters have rate 0, so
            with ``readout_only`` it is the fixed random-feature kernel and its change is 0).
        diverged_at: first step at which some member's loss was not finite or exceeded
            ``1e6`` times its initial value (``None`` if training stayed stable); the chunk that diverged
            stops there (the others train on) and later records are absent.
        settings: how the ensemble was trained, for reports: ``ensemble_size``, ``readout_only``,
            ``seed``, ``dtype``, ``device``, ``chunk_size`` (the chunk actually used) and ``engine``
            (``"fused"`` or ``"stacked"``, the one that ran).
        networks: with ``keep_networks=True``, the trained members as the stacked modules that
            ``net.build(..., ensemble_size=...)`` makes, one per chunk in member order (the first
            ``settings["chunk_size"]`` members, the next, ...), on the device and in the dtype they
            trained in, with the weights of the last of ``record_steps`` (those of ``test_outputs[-1]``);
            :meth:`outputs` evaluates them on new inputs. ``None`` otherwise. After a divergence the
            chunks hold different steps, none of them a record's: a chunk that diverged stopped at its
            divergence, with the weights whose loss failed the check (the fused engine stops only the
            members that failed; the chunk's others ran on, at most to the next of ``record_steps``),
            and every other chunk trained to the last of ``record_steps``, past the records kept.
    """

    learning_rate: float
    steps: Tensor
    test_outputs: Tensor
    train_loss: Tensor
    weight_change: Tensor
    ntk_change: Tensor | None
    layer_change: dict[str, Tensor] = field(default_factory=dict)
    diverged_at: int | None = None
    settings: dict = field(default_factory=dict)
    networks: list[nn.Module] | None = None

    def outputs(self, x: Tensor) -> Tensor:
        """Outputs ``(E, M, k)`` of every trained member on the inputs ``x`` ``(M, d)`` (on the CPU, as
        ``test_outputs``; computed without gradients, in the networks' dtype and on their device): the
        ensemble's predictions at points that were not ``x_test``, without training it again. Needs
        ``train_ensemble(..., keep_networks=True)``. After a divergence a ``RuntimeWarning``: the members
        hold the weights of different steps (``networks``), not those of the last record."""
        if self.networks is None:
            raise ValueError("This ensemble kept no networks: train it with train_ensemble(..., keep_networks=True) "
                             "to evaluate its members on new inputs.")
        if self.diverged_at is not None:
            last = f"the last record's (step {int(self.steps[-1])})" if len(self.steps) else "a record's"
            warnings.warn(f"Training diverged at step {self.diverged_at}: the members' weights are those of the steps "
                          f"their chunks stopped at (a diverged chunk's at its divergence, the others' at the last of "
                          f"record_steps), not {last}.", RuntimeWarning, stacklevel=2)
        check_points(x, "x")
        if x.dim() != 2:   # a leading axis would be read as the ensemble axis, member i seeing only x[i]
            raise ValueError(f"x must have shape (M, d), got {tuple(x.shape)}.")
        first = next(self.networks[0].parameters())
        converted = x.to(device=first.device, dtype=first.dtype)
        _check_representable("x", x, converted, "rescale them")
        with torch.no_grad(), _autocast_off(first.device):
            return torch.cat([network(converted).detach().cpu() for network in self.networks], 0)

    @property
    def times(self) -> Tensor:
        """Gradient-flow times ``η s``: ``ntkgp.predict``'s ``t`` at ``learning_rate=1`` (at ``learning_rate=η``
        pass ``steps=s``, or ``t=s`` for continuous time)."""
        return self.learning_rate * self.steps.to(torch.float64)

    @property
    def mean(self) -> Tensor:
        """Ensemble mean on the test inputs, ``(T, M, k)``."""
        return self.test_outputs.mean(1)

    @property
    def variance(self) -> Tensor:
        """Ensemble variance (unbiased) on the test inputs, ``(T, M, k)``; it needs two members."""
        if self.test_outputs.shape[1] < 2:   # torch gave NaN with a warning about degrees of freedom
            raise ValueError("An ensemble of one member has no variance (unbiased, 1/(E − 1)): train "
                             "ensemble_size >= 2, or read the member's outputs from test_outputs.")
        if self.test_outputs[:, 0].numel() == 0:  # no record or no test point; var() would warn
            return self.test_outputs.sum(1)
        return self.test_outputs.var(1)

    @property
    def standard_error(self) -> Tensor:
        """Standard error of the ensemble mean, ``(T, M, k)``."""
        return (self.variance / self.test_outputs.shape[1]).sqrt()


def readout_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of the readout ``Dense`` layers (trained alone in the NNGP regime).

    The readouts are the ``Dense`` layers whose outputs reach the network's output through
    nothing but sums, concatenations and identities (one for a plain MLP, one per branch for
    ``parallel`` towers), so that the output is affine in their parameters. Every path to the
    output must end in one: a branch that passes its input through (a residual block at the
    output) is refused, since its features have no trained readout and the readout's tangent
    kernel would then miss their part of the NNGP kernel.
    """
    params = [name for name, _ in model.named_parameters()]
    names = []
    for prefix in readout_prefixes(model):
        dot = f"{prefix}." if prefix else ""
        names += [n for n in params if n.startswith(dot) and "." not in n[len(dot):]]
    return names


def readout_prefixes(model: nn.Module, prefix: str = "", through_identities: bool = False) -> list[str]:
    """Module names of the readout ``Dense`` layers of a network built by ntkgp; an identity path to
    the output is refused, or skipped with ``through_identities`` (for naming layer groups)."""
    dot = f"{prefix}." if prefix else ""
    if isinstance(model, DenseModule):
        return [prefix]
    if isinstance(model, nn.Sequential):
        for index in reversed(range(len(model))):       # identities pass the output through
            if not isinstance(model[index], nn.Identity):
                return readout_prefixes(model[index], f"{dot}{index}", through_identities)
        model = nn.Identity()                           # nothing but identities: refused below
    if isinstance(model, ParallelModule):
        if model.join == "prod" and not through_identities:
            raise ValueError(f"Readout-only training needs the output affine in the readout layers; "
                             f"{prefix or 'the network'} multiplies branches (join='prod'), which makes it "
                             "bilinear in theirs.")
        return [r for i, branch in enumerate(model.branches)
                for r in readout_prefixes(branch, f"{dot}branches.{i}", through_identities)]
    if isinstance(model, nn.Identity):
        if through_identities:
            return []
        # a residual block at the output: the features its identity branch passes on have no trained
        # readout, so the readout's tangent kernel is not the network's NNGP kernel (it missed that part)
        raise ValueError(f"Readout-only training needs a Dense layer at the end of every path to the output; "
                         f"{prefix or 'the network'} passes its input through (e.g. the identity branch of a "
                         "residual block at the output), and readout-only training of such a network does not "
                         "follow the NNGP gradient flow.")
    raise ValueError(f"Readout-only training needs a network whose output is a Dense layer (or a sum or "
                     f"concatenation of them); {prefix or 'the network'} ends in {type(model).__name__}.")


@differentiates
def train_ensemble(
    net: Layer,
    x_train: Tensor,
    y_train: Tensor,
    *,
    ensemble_size: int = 64,
    learning_rate: float,
    record_steps: int | Sequence[int] | Tensor | np.ndarray,
    x_test: Tensor | None = None,
    probe: Tensor | None = None,
    readout_only: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    engine: str = "auto",
    keep_networks: bool = False,
) -> EnsembleHistory:
    """Train ``ensemble_size`` networks built from ``net`` and record them at ``record_steps``: full-batch
    gradient descent on ``(1/2m) ‖f − Y‖²``, whose wide limit is the Gaussian of
    :class:`ntkgp.predict.GradientFlow` (Lee et al. 2019).

    Args:
        net: the network spec (its finite twin is what is trained; standard-parameterized layers
            take the equivalent per-layer rates, so the members follow the spec's NTK-parameterized
            version, the one to compare with ``ntkgp.predict``).
        x_train: ``(N, d)`` training inputs.
        y_train: ``(N,)`` or ``(N, k)`` floating-point targets (cast to ``dtype``).
        ensemble_size: number of members ``E``.
        learning_rate: ``η`` of full-batch gradient descent.
        record_steps: step counts (non-negative integers) at which to record; training runs to the
            largest.
        x_test: ``(M, d)`` points on which member outputs are recorded (default: ``x_train``).
        probe: ``(P, d)`` points, ``P >= 1``, for the empirical-NTK change (``None``: not recorded);
            where the probe's kernel overflows ``dtype`` (a member whose training diverges, before
            its loss exceeds the limit) the change is recorded as inf or NaN, not refused as
            :func:`ntkgp.finite.empirical_ntk` refuses it.
        readout_only: train only the readout ``Dense`` layer(s) (:func:`readout_parameters`): gradient
            flow with the NNGP kernel. When one readout ends a ``Sequential``, the frozen layers'
            output on ``x_train`` is computed once and each step runs the readout alone. A network
            that readout-only training cannot follow is refused before any chunk is drawn.
        seed: seed of the initialization (chunk ``c`` uses ``seed + 1_000_003 c``).
        dtype: of the networks (default float32); a caller's ``torch.autocast`` is switched off while
            they train, as in ``net.kernel``.
        device: of the networks (default CUDA when available, else CPU).
        chunk_size: members trained at once (default: as many as fit in ``CHUNK_BYTES``). The
            members a seed gives depend on the chunking (not on dtype or device). The default
            chunk depends on the network and on the numbers of training and test points, so a
            run with another ``x_test`` draws other members. A chunk's members are drawn together,
            layer by layer (:meth:`ntkgp.layers.Layer.build`), so with an explicit ``chunk_size``
            each full chunk depends only on the network, ``seed`` and ``chunk_size``: ensembles
            grown by whole chunks share their first members, while a last, partial chunk also
            depends on its size.
            A chunk that cannot fit in the device's memory (two copies of its weights), or records
            that cannot fit in the machine's, are refused before any weight is drawn
            (``torch.cuda.OutOfMemoryError``; :func:`check_memory`).
        progress: show a progress bar (tqdm).
        engine: ``"stacked"``: every member at once, one batched torch step (any architecture, any
            device). ``"fused"``: on the CPU, networks ``Dense → activation → … → Dense`` (erf or
            ReLU-type activations, all parameters trained) run in a compiled kernel one member at a
            time, while its weights stay in cache (:mod:`ntkgp.finite.fused`; 3–4× the stacked
            step at width 512, docs/benchmarks.md); the same arithmetic, equal to rounding; refused up front
            with the reason where it does not apply. ``"auto"`` (default): fused where it applies
            and compiles and the records are on average at least ``AUTO_FUSED_STEPS`` steps apart,
            else stacked (with a record every step or two the recording dominates, and the kernel
            competes with torch's idle threads, which spin between torch's operations); a kernel that
            does not compile is a ``RuntimeWarning`` (once per process and dtype) with the reason.
            ``settings["engine"]`` says which ran. Near the stability limit (``η λ̂_max/m`` close
            to 2 for a member's own NTK) training amplifies rounding, so there the engines, dtypes
            and, under ``"auto"``, the spacing of the records can give visibly different members
            (at width 128, 0.9 ``η_max``, 200 steps: up to 0.67 apart in float32, 3e-10 in float64); and
            with ReLU-type activations a pre-activation within rounding of the kink (0) can fall on
            either side of it, so the engines can take different slopes there (5e-4 apart in float32
            after one step, where the float64 pre-activation was 9e-8). Pass ``engine`` and ``dtype``
            explicitly when runs must be reproduced.
        keep_networks: keep the trained members (``EnsembleHistory.networks``, evaluated on new
            inputs by ``EnsembleHistory.outputs``). They stay on ``device``: all ``E`` members'
            weights, where training alone holds one chunk's (refused up front where they cannot fit).
    """
    if not isinstance(net, Layer):   # a module or built network failed deep inside, as an AttributeError ("build")
        built = " (a network built by net.build(...))" if isinstance(net, nn.Module) else ""
        raise ValueError(f"train_ensemble takes a network spec (ntkgp.serial(...), ntkgp.mlp(...)) and builds the "
                         f"members from it; got {type(net).__name__}{built}. To train your own torch modules, "
                         "loop over them with torch.optim.SGD.")
    check_points(x_train, "x_train")
    check_flag(readout_only, "readout_only")
    check_flag(progress, "progress")
    check_flag(keep_networks, "keep_networks")
    if x_train.dim() != 2 or x_train.shape[0] == 0:
        raise ValueError(f"x_train must have shape (N, d) with N >= 1, got {tuple(x_train.shape)}.")
    if not isinstance(y_train, Tensor) or y_train.dim() not in (1, 2) or y_train.shape[0] != x_train.shape[0]:
        raise ValueError(f"y_train must be a tensor (N,) or (N, k) with N = {x_train.shape[0]}, got "
                         f"{tuple(y_train.shape) if isinstance(y_train, Tensor) else type(y_train).__name__}.")
    if not y_train.is_floating_point():   # as the predictors it is compared with refuse them
        raise ValueError(f"y_train must be a floating-point tensor, got {y_train.dtype}; convert integer "
                         "targets with y_train.float() or .double().")
    if not all_finite(y_train, "y_train"):
        raise ValueError("y_train must hold finite numbers, without NaN or infinite values.")
    for name, points in (("x_test", x_test), ("probe", probe)):
        if points is not None:
            check_points(points, name)
            # a leading axis would be read as the ensemble axis, member i seeing only points[i]
            if points.dim() != 2 or points.shape[-1] != x_train.shape[-1]:
                raise ValueError(f"{name} must have shape (M, {x_train.shape[-1]}), got {tuple(points.shape)}.")
    if probe is not None and probe.shape[0] == 0:   # Θ̂ of no points: its relative change would be 0/0 = NaN
        raise ValueError("probe must hold at least one point (or be None: no NTK change recorded), got shape "
                         f"{tuple(probe.shape)}.")
    chunk_size = None if chunk_size is None else integer_at_least(chunk_size, 1, "chunk_size")
    if engine not in ("auto", "fused", "stacked"):
        raise ValueError(f"engine must be 'auto', 'fused' or 'stacked', got {engine!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    ensemble_size = integer_at_least(ensemble_size, 1, "ensemble_size")
    learning_rate = positive_number(learning_rate, "learning_rate")
    # booleans and strings refused (True was step 1; "5" raised torch's TypeError); beyond 2**53 float64
    # rounds the counts
    record_steps = real_numbers(record_steps, "record_steps").cpu().reshape(-1).tolist()
    if not record_steps or any(not 0 <= s <= 2**53 or not s.is_integer() for s in record_steps):
        raise ValueError(f"record_steps must be non-negative integers up to 2**53, got {record_steps!r}.")
    steps = sorted({int(s) for s in record_steps})
    # steps per kernel call; no step at all (record_steps=[0]) has nothing for the kernel to do: it was
    # built (compiled on first use), not called, and settings["engine"] said "fused"
    if engine == "auto" and steps[-1] < AUTO_FUSED_STEPS * max(1, sum(s > 0 for s in steps)):
        engine = "stacked"
    device = ensemble_device(device)
    if device.type == "meta":   # no values to train: it failed inside torch's .item() after building
        raise ValueError("device='meta' holds no values to train; use 'cpu' or 'cuda'.")
    x = x_train.to(device=device, dtype=dtype)
    y = (y_train if y_train.dim() == 2 else y_train.unsqueeze(-1)).to(device=device, dtype=dtype)
    xt = x if x_test is None else x_test.to(device=device, dtype=dtype)
    pr = None if probe is None else probe.to(device=device, dtype=dtype)
    for name, given, converted in (("x_train", x_train, x), ("y_train", y_train, y), ("x_test", x_test, xt),
                                   ("probe", probe, pr)):
        if given is not None:   # converted from given: a tensor
            _check_representable(name, given, cast(Tensor, converted), "rescale them, or train in float64")
    seed = seed_value(seed)
    chunks = ensemble_chunks(net, x.shape[-1], x.shape[0] + xt.shape[0], ensemble_size, chunk_size, seed)
    # before any weight is drawn
    check_memory(net, x.shape[-1], chunks[0], dtype, device, len(steps) * ensemble_size * xt.shape[0] * y.shape[-1],
                 kept=ensemble_size if keep_networks else 0)
    # from one member, before any chunk is built: checked on the first chunk, these came after seconds and
    # a gigabyte (width 2000, 64 members in float64). Not on the meta device: a user activation that looks
    # at its values (.item(), a data-dependent branch) cannot run there
    # stacked as the chunks are for the fused engine's check below, which takes nothing else
    member = net.build(in_features=x.shape[-1], seed=0, dtype=dtype, device=device,
                       ensemble_size=1 if engine == "fused" else None)
    if next(member.parameters(), None) is None:
        raise ValueError("The network has no parameters to train (it needs at least one Dense layer).")
    with torch.no_grad():
        outputs = member(x[:1]).shape[-1]
    if outputs != y.shape[-1]:  # (E, N, k) − (N, k') would broadcast and train towards a mean
        raise ValueError(f"The network has {outputs} output(s) but y_train has {y.shape[-1]} column(s).")
    # a network that readout-only training cannot follow (a product or an identity path at the output), and one
    # the fused engine does not apply to, were refused only once the first chunk was drawn (1.1 s at width 2000)
    trained = readout_parameters(member) if readout_only else [n for n, _ in member.named_parameters()]
    found = fused_layers(member, trained, x) if engine == "fused" else None   # the layers, or why not
    if isinstance(found, str):
        raise ValueError(f"engine='fused' does not apply: {found}. Use engine='stacked' or 'auto'.")
    del member, found   # a whole member, held through the training of every chunk before (check_memory counts none)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file would fill with \r lines)
        bar = tqdm(total=steps[-1] * len(chunks), desc="training", unit="step", leave=False, disable=None)
    results, diverged_at, used, networks = [], None, "stacked", []
    try:
        for index, size in enumerate(chunks):
            model = net.build(in_features=x.shape[-1], seed=seed + SEED_STRIDE * index, ensemble_size=size,
                              dtype=dtype, device=device)
            # a caller's autocast off, as for net.kernel and the empirical kernels: under CPU bfloat16 autocast the
            # forward passes used bf16 copies of the weights that autocast caches and in-place steps leave stale
            # (width 64, 4 members, 20 steps at η = 0.2: losses 0.11-0.63 instead of 0.002-0.018, records 1.9 off)
            with _autocast_off(device):
                out = _train_chunk(model, x, y, xt, pr, learning_rate, steps, readout_only, bar, engine)
            used = out[6]
            results.append(out)
            if keep_networks:
                for p in model.parameters():   # as net.build makes them (readout_only froze the rest to train)
                    p.requires_grad_(True)
                networks.append(model)
            del model   # not held through the next chunk's training unless kept
            if out[4] is not None:
                diverged_at = out[4] if diverged_at is None else min(diverged_at, out[4])
    finally:  # also when interrupted: a bar left open garbles the terminal's next lines
        if bar is not None:
            bar.close()
    recorded = min(len(r[0]) for r in results)  # after a divergence, only the steps all chunks reached

    def cat(parts: list[Tensor], *trailing: int) -> Tensor:
        if recorded:
            return torch.cat([p[:recorded] for p in parts], 1)
        return torch.empty(0, ensemble_size, *trailing, dtype=dtype, device="cpu")  # diverged before the first record

    groups = results[0][5].keys()
    return EnsembleHistory(
        learning_rate=float(learning_rate),
        steps=torch.tensor(steps[:recorded], dtype=torch.int64, device="cpu"),
        test_outputs=cat([r[0] for r in results], xt.shape[0], y.shape[-1]),
        train_loss=cat([r[1] for r in results]),
        weight_change=cat([r[2] for r in results]),
        ntk_change=cat([r[3] for r in results]) if pr is not None else None,
        layer_change={g: cat([r[5][g] for r in results]) for g in groups},
        diverged_at=diverged_at,
        settings={"ensemble_size": ensemble_size, "readout_only": readout_only, "seed": seed,
                  "dtype": str(dtype), "device": str(device), "chunk_size": chunks[0],
                  "engine": used},
        networks=networks if keep_networks else None,
    )


def _check_representable(name: str, given: Tensor, converted: Tensor, advice: str) -> None:
    """Values finite as given but not in the networks' dtype (float64 points beyond float32's range) are
    refused: ``x_test``'s records came back NaN without a word, and the probe's overflow was "x1 contains
    NaN" from inside the NTK, after the build."""
    if not all_finite(converted):
        raise ValueError(f"{name} holds values beyond the range of {converted.dtype} (largest magnitude "
                         f"{float(given.detach().abs().max()):.3g}): {advice}.")


def ensemble_device(device: object | None) -> torch.device:
    """Where :func:`train_ensemble` trains: ``device``, checked, or by default CUDA where available and
    the CPU elsewhere."""
    return usable_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")


def ensemble_chunks(net: Layer, in_features: int, n_points: int, ensemble_size: int, chunk_size: int | None,
                    seed: int) -> list[int]:
    """The sizes of the chunks :func:`train_ensemble` trains one after another: ``chunk_size`` members
    (default: as many as fit in ``CHUNK_BYTES`` with ``n_points`` inputs), the last one the rest.

    A ``ValueError`` when the last chunk's seed, ``seed + SEED_STRIDE (chunks − 1)``, is not below
    2**64: ``net.build`` would refuse it only after the earlier chunks trained."""
    if chunk_size is None:
        chunk_size = _default_chunk(net, in_features, n_points)
    chunks = [min(chunk_size, ensemble_size - start) for start in range(0, ensemble_size, chunk_size)]
    seed_value(seed + SEED_STRIDE * (len(chunks) - 1),
               name=f"seed + {SEED_STRIDE:_} * {len(chunks) - 1} (the seed of the last of {len(chunks)} chunks)")
    return chunks


def member_size(net: Layer, in_features: int) -> tuple[int, int, list[int]]:
    """``(P, L, widths)`` of one member of ``net`` for ``in_features`` inputs: its parameters, the entries of
    its largest weight and the widths of its ``Dense`` layers, from a shapes-only build (the meta device:
    no memory, whatever the width; float64, whose range refuses no variance a float64 ensemble takes)."""
    shapes = net.build(in_features=in_features, seed=0, dtype=torch.float64, device="meta")
    sizes = [p.numel() for p in shapes.parameters()]
    return sum(sizes), max(sizes, default=0), [m.out_features for m in shapes.modules() if isinstance(m, DenseModule)]


def training_needs(params: int, largest: int, chunk: int, dtype: torch.dtype, device: torch.device
                   ) -> list[tuple[int, torch.device]]:
    """Lower bounds, in bytes and where, of what training ``chunk`` members of ``params`` parameters
    (``largest`` in the largest weight) in ``dtype`` on ``device`` certainly allocates, ``b`` bytes a
    value: the chunk's weights and the copy of them that the weight changes are measured from,
    ``2 c P b``; drawing the largest layer, in float64 on the CPU then cast, ``c L (8 + b)`` on the CPU
    (on a CUDA device ``2 c P b`` there and the ``8 c L`` of the draw on the CPU)."""
    b = torch.empty(0, dtype=dtype).element_size()
    training, drawing, cpu = 2 * chunk * params * b, chunk * largest * 8, torch.device("cpu")
    if device.type == "cpu":
        return [(max(training, drawing + chunk * largest * b), device)]
    return [(training, device), (drawing, cpu)]


def check_memory(net: Layer, in_features: int, chunk: int, dtype: torch.dtype, device: torch.device,
                 recorded: int = 0, kept: int = 0) -> None:
    """``torch.cuda.OutOfMemoryError`` (a ``RuntimeError``, as torch's allocators raise) before any weight is
    drawn when training ``chunk`` members of ``net`` (:func:`training_needs`), or keeping ``recorded``
    recorded test outputs (on the CPU, held per chunk and then joined into one tensor: ``2 × recorded``
    values), or the weights of ``kept`` trained members (``keep_networks``, on ``device``: those of the
    earlier chunks alive while a chunk trains, ``s P b`` beside the training of a chunk after ``s``
    members, at the most of the chunks), cannot
    fit in the memory of ``device`` (the machine's for the CPU, the card's for CUDA; unchecked where
    unknown). A width no machine holds (``mlp(width=10**7)``) failed in torch's
    allocator ("can't allocate memory: you tried to allocate 800000000000000 bytes"), one that only
    just did not fit was drawn on credit until the operating system killed the process, without a
    word, and records beyond the memory failed only once every chunk had trained.
    """
    params, largest, _ = member_size(net, in_features)
    b = torch.empty(0, dtype=dtype).element_size()
    what = f"Training {chunk} member(s) of this network ({params:,} parameters each, in {dtype})"
    advice = ("train fewer members at once (a smaller chunk_size)" if chunk > 1 else
              "one member does not fit: a narrower width or fewer layers")
    needs = [(2 * recorded * b, torch.device("cpu"), f"Keeping the {recorded:,} recorded test outputs (in {dtype})",
              "record fewer steps, members or test points")]
    needs += [(need, where, what, advice) for need, where in training_needs(params, largest, chunk, dtype, device)]
    if kept:
        # the members kept from the earlier chunks are alive while a chunk trains beside them: the most of
        # (members before it) P b plus its training, which holds its own weights. The last chunk has the most
        # before it, but a last chunk smaller than half a chunk needs less than the one before it
        sizes = [min(chunk, kept - start) for start in range(0, kept, chunk)]
        alongside, most = max(((start * params * b + training_needs(params, largest, size, dtype, device)[0][0]), i)
                              for i, (start, size) in enumerate(zip(range(0, kept, chunk), sizes, strict=True)))
        needs.append((alongside, device, f"Keeping the {kept} trained members ({params:,} parameters each, in "
                      f"{dtype}), chunk {most + 1} of {len(sizes)} training beside the {most * chunk} before it,",
                      "keep_networks=False, or fewer members (ensemble_size)"))
    for need, where, what, advice in needs:
        refuse_beyond_memory(need, where, what, advice, at_least=True)


def _default_chunk(net: Layer, d: int, n_points: int) -> int:
    params, _, widths = member_size(net, d)
    per_member = (4 * params + 4 * n_points * sum(widths)) * 4
    return max(1, CHUNK_BYTES // max(per_member, 1))


@differentiates
def layer_groups(model: nn.Module, x: Tensor) -> dict[str, list[str]]:
    """Weight names of the ``Dense`` layers that read the input, of the readouts, and of the rest.

    A layer reads the input when no other ``Dense`` layer lies between it and the network's input:
    one after a leading activation or normalization reads the input as much as one that gets ``x``
    itself (``width × d`` weights that move as ``width^(−1/2)``, not as ``width^(−1)``).

    :func:`train_ensemble` measures a group's relative change on the weights in NTK coordinates
    (the standard-normal draws ``ω``: a standard-parameterized layer stores ``sqrt(σ_w²/n) ω``, per
    input feature with ARD) and leaves biases out, so that it does not depend on the
    parameterization: a standard-parameterized network trained with the equivalent rates moves
    its NTK coordinates exactly as its NTK twin does, even when a group mixes layers of
    different scales or the scales differ per input feature (ARD). Input rows of weight variance 0
    (an ARD feature switched off, or ``weight_var=0``) are left out: they never move, and the
    standard parameterization stores them as 0, from which no ``ω`` can be read.
    """
    order: list[tuple[str, bool]] = []
    names = {id(m): prefix for prefix, m in model.named_modules() if isinstance(m, DenseModule)}
    dense_outputs: set = set()

    def hook(module, inputs, output) -> None:
        order.append((names[id(module)], not _computed_from(inputs[0].grad_fn, dense_outputs)))
        dense_outputs.add(output.grad_fn)

    # One point, tracked by autograd from the input on (frozen layers included), whose graph tells
    # what each Dense layer's input was computed from.
    probe = x[..., :1, :].detach().requires_grad_()
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DenseModule)]
    try:
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
    try:
        readouts = set(readout_prefixes(model, through_identities=True))
    except ValueError:  # a network that ends in an activation: its last Dense layer
        readouts = {order[-1][0]}
    groups: dict[str, list[str]] = {"input": [], "hidden": [], "readout": []}
    for prefix, reads_input in order:
        group = "readout" if prefix in readouts else ("input" if reads_input else "hidden")
        dot = f"{prefix}." if prefix else ""
        groups[group].append(f"{dot}weight")
    return {g: ns for g, ns in groups.items() if ns}


def _computed_from(node, ends: set) -> bool:
    """Whether the autograd graph below ``node`` reaches one of the nodes ``ends``."""
    seen, stack = set(), [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in ends:
            return True
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return False


class _Changes:
    """Relative changes ``‖θ_t − θ_0‖ / ‖θ_0‖`` of all parameters and of each layer group's weights
    (in NTK coordinates, :func:`layer_groups`).

    Keeps one copy of the initial parameters and forms the change one parameter tensor at a time,
    so that a record needs one parameter tensor of scratch memory, not copies of all of them.

    The squares are summed in float32 at least: in float16 (largest value 65504) the squared norm of
    a width-512 layer's 262 144 standard-normal weights overflowed, and a network that moved recorded
    a weight change of 0 (change / inf); the ratios are given back in the parameters' dtype.
    """

    def __init__(self, model: nn.Module, groups: dict[str, list[str]]) -> None:
        self.params = dict(model.named_parameters())
        self.initial = {n: p.detach().clone() for n, p in self.params.items()}
        modules = dict(model.named_modules())
        self.group_of = {n: (g, modules[n.rpartition(".")[0]]) for g, ns in groups.items() for n in ns}
        self.groups = list(groups)
        dtype = next(iter(self.initial.values())).dtype   # a member has parameters (train_ensemble checks)
        self.dtype, self.sums = dtype, torch.promote_types(dtype, torch.float32)
        self.initial_norms = self._norms((n, t.to(self.sums).square()) for n, t in self.initial.items())

    def _norms(self, squares) -> tuple[Tensor, dict[str, Tensor]]:
        # squares: a generator of (name, elementwise squares), one tensor alive at a time. Sums,
        # not torch.norm: float32 norms of 10⁷ entries are off by ~1e-3, these by ~1e-7.
        # 0.0 until the first squares are added (every group has parameters): tensors where read
        total, per_group = cast(Tensor, 0.0), dict.fromkeys(self.groups, cast(Tensor, 0.0))
        for name, square in squares:
            if name not in self.group_of:
                total = total + square.flatten(1).sum(1)
                continue
            group, module = self.group_of[name]
            rows = square.sum(-1)                                  # (E, in): one weight scale per input row
            total = total + rows.sum(-1)
            scale = module.fan_in_variance(rows)                   # σ_w²/n, per input row with ARD
            if module.parameterization != "ntk":                   # ω = W / sqrt(σ_w²/n)
                rows = rows / torch.where(scale > 0, scale, 1)
            # rows of variance 0 never move in either parameterization (the gradient of ω carries σ_w, the
            # standard rate is η σ_w²/n), and a standard layer stores them as 0, from which no ω can be read
            # (0/0: NaN): left out of both, so that the two agree
            per_group[group] = per_group[group] + torch.where(scale > 0, rows, 0).sum(-1)
        return total.sqrt(), {g: v.sqrt() for g, v in per_group.items()}

    def relative(self) -> tuple[Tensor, dict[str, Tensor]]:
        """``(E,)`` relative change of all parameters, and ``{group: (E,)}`` of each group's weights."""
        total, per_group = self._norms((n, p.detach().sub(self.initial[n]).to(self.sums).square_())
                                       for n, p in self.params.items())
        norm0, group0 = self.initial_norms
        # a group of variance-0 rows alone holds nothing that can move (left out of both norms): 0, not 0/0
        return (_relative(total, norm0).to(self.dtype),
                {g: _relative(per_group[g], group0[g]).to(self.dtype) for g in self.groups})


def _relative(change: Tensor, initial: Tensor) -> Tensor:
    """``change / initial``, 0 where nothing was there and nothing changed (all-zero parameters that
    cannot move, an all-zero kernel that stays so), not 0/0."""
    return torch.where((initial == 0) & (change == 0), 0, change / initial)


class _DenseStep:
    """One gradient-descent step for networks whose parameters all live in ``Dense`` layers.

    Autograd supplies only the backpropagated signals ``δ_l = ∂L/∂z_l`` (activation-sized); each
    layer then updates in place, ``W ← W − η_W uᵀδ`` (one fused batched product, where ``u`` is
    what the weights multiply) and ``b ← b − η_b c Σ_n δ`` (``c`` the bias scale). No gradient
    tensor of weight size is ever allocated, which halves the memory traffic of a step: the
    step is memory-bound, since every weight is read and written once.
    """

    def __init__(self, model: nn.Module, trained: list[str], rates: dict) -> None:
        self.records: list[tuple[DenseModule, Tensor, Tensor]] = []
        self.layers = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for prefix, module in model.named_modules():
            if isinstance(module, DenseModule):
                dot = f"{prefix}." if prefix else ""
                train_w, train_b = f"{dot}weight" in trained, f"{dot}bias" in trained
                if train_w or train_b:
                    self.layers.append((module, rates[f"{dot}weight"] if train_w else None,
                                        rates.get(f"{dot}bias") if train_b else None))
                self.handles.append(module.register_forward_hook(self._hook))
        self.model = model

    def close(self) -> None:
        """Take the hooks off the model: each held this step object, which holds the model, so a trained
        chunk's weights stayed in memory until Python's cycle collector ran (32 MB per call at width 512,
        E = 32; hundreds of MB in a loop of calls)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            u = inputs[0] if module.input_scale is None else inputs[0] * module.input_scale
            self.records.append((module, u.detach(), output))

    def loss_and_step(self, x: Tensor, y: Tensor, m: int) -> tuple[Tensor, Callable[[], None]]:
        self.records.clear()
        out = self.model(x)
        per_member = 0.5 * ((out - y) ** 2).flatten(1).sum(1) / m
        captured = list(self.records)  # later forwards (recording, NTK probes) must not mix in
        self.records.clear()

        def step() -> None:
            wanted = [r for r in captured if any(r[0] is layer for layer, _, _ in self.layers)]
            # a layer feeding a constant activation (Monomial(0)) gets δ = 0, not autograd's refusal
            deltas = torch.autograd.grad(per_member.sum(), [z for _, _, z in wanted], allow_unused=True,
                                         materialize_grads=True)
            by_module = {id(mod): (u, d) for (mod, u, _), d in zip(wanted, deltas, strict=True)}
            with torch.no_grad():
                for module, rate_w, rate_b in self.layers:
                    u, delta = by_module[id(module)]
                    if rate_w is not None:
                        alpha = -1.0
                        if isinstance(rate_w, Tensor):  # per-input-feature rates (ARD, standard param.)
                            u = u * rate_w.reshape(-1)
                        else:
                            alpha = -rate_w
                        module.weight.baddbmm_(u.expand(delta.shape[0], *u.shape[-2:]).mT, delta, alpha=alpha)
                    if rate_b is not None:
                        module.bias.sub_(rate_b * module.bias_scale * delta.sum(-2, keepdim=True))

        return per_member, step


def _autograd_step(model: nn.Module, trained: list[str], rates: dict):
    params = dict(model.named_parameters())

    def loss_and_step(x: Tensor, y: Tensor, m: int):
        per_member = 0.5 * ((model(x) - y) ** 2).flatten(1).sum(1) / m

        def step() -> None:
            grads = torch.autograd.grad(per_member.sum(), [params[n] for n in trained], allow_unused=True,
                                        materialize_grads=True)
            with torch.no_grad():
                for name, grad in zip(trained, grads, strict=True):
                    params[name].sub_(rates[name] * grad)

        return per_member, step

    return loss_and_step


def _train_chunk(model, x, y, xt, probe, learning_rate, steps, readout_only, bar, engine="stacked"):
    names = [n for n, _ in model.named_parameters()]
    trained = readout_parameters(model) if readout_only else names
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    rates = equivalent_learning_rates(model, learning_rate)
    fused = None
    stepper = None
    try:   # from here on the fused engine's threads and the step's hooks are released however it ends
        if engine != "stacked":   # before the stacked step puts its hooks on the model
            built = fused_steps(model, trained, rates, x, y)
            if isinstance(built, str):   # why the engine does not apply
                if engine == "fused":
                    raise ValueError(f"engine='fused' does not apply: {built}. Use engine='stacked' or 'auto'.")
                warn_fallback(built, x.dtype)   # a kernel that failed to build: the stacked step was a silent 3x
            else:
                fused = built
        dense_params = {id(p) for mod in model.modules() if isinstance(mod, DenseModule)
                        for p in mod.parameters(False)}
        inputs, split = x, _frozen_body(model) if readout_only else None
        if split is not None:
            # the frozen layers' output on the training inputs never changes: computed once, and each
            # step runs the readout alone (O(n) per member instead of the hidden layers' O(n²))
            body, readout, dot = split
            with torch.no_grad():
                inputs = body(x)
            stepper = _DenseStep(readout, [n[len(dot):] for n in trained],
                                 {n[len(dot):]: r for n, r in rates.items() if n.startswith(dot)})
        elif all(id(p) in dense_params for p in model.parameters()):
            stepper = _DenseStep(model, trained, rates)
        loss_and_step = _autograd_step(model, trained, rates) if stepper is None else stepper.loss_and_step
        m = y.numel()
        groups = layer_groups(model, x)
        changes = _Changes(model, groups)
        # the kernel that drives training: frozen parameters (readout-only) have rate 0
        ratios = {n: rates[n] / learning_rate if n in trained else 0.0 for n in names}
        scales = {n: r for n, r in ratios.items() if not _is_one(r)}
        # unchecked, as the records: inputs that saturate the activations (float32 points of 1e30 through erf)
        # give finite outputs and losses but an overflowing kernel, a run the comparison reports, not an error
        ntk0 = _empirical_ntk(model, probe, parameter_scales=scales) if probe is not None else None
        outputs, losses, weights, ntks = [], [], [], []
        per_group: dict[str, list[Tensor]] = {g: [] for g in groups}
        initial_loss, diverged_at, step = None, None, 0

        def record(current_loss: Tensor) -> None:
            with torch.no_grad():
                outputs.append(model(xt).detach().cpu())
                losses.append(current_loss.detach().cpu())
                total, by_group = changes.relative()
                weights.append(total.cpu())
                for g in groups:
                    per_group[g].append(by_group[g].cpu())
            if probe is not None:
                assert ntk0 is not None   # computed with the probe
                # a member whose training is diverging (its loss still below the limit) may overflow the
                # kernel: recorded as an infinite (or NaN) change, as the loss check reports the divergence
                ntk = _empirical_ntk(model, probe, parameter_scales=scales)
                # the norms in float64: in float32 their squares overflow from kernel entries of ~1e19, a
                # NaN change (inf / inf) beside finite kernels; the ratio fits the kernel's dtype
                norms = [torch.linalg.vector_norm(k.flatten(1), dim=1, dtype=torch.float64) for k in (ntk - ntk0, ntk0)]
                ntks.append(_relative(*norms).to(ntk.dtype).cpu())

        targets = iter(steps)
        next_record = next(targets)
        while True:
            per_member, do_step = loss_and_step(inputs, y, m)
            if initial_loss is None:
                initial_loss = per_member.detach()
                if not bool(torch.isfinite(initial_loss).all()):   # not a divergence: no step was taken
                    raise ValueError(f"The initial training loss is not finite in {initial_loss.dtype}: the "
                                     "outputs or targets overflow it. Rescale the inputs or targets, or train "
                                     "in float64.")
                limit = 1e6 * initial_loss.clamp_min(1e-12)   # divergence: a loss above it, or not finite
            if bool((~torch.isfinite(per_member) | (per_member > limit)).any()):
                diverged_at = step
                break
            if step == next_record:
                record(per_member)
                next_record = next(targets, None)
                if next_record is None:
                    break
            if fused is not None:   # on to the next record in the kernel; its loss checked there, step by step
                done, failed = fused.advance(next_record - step, limit, bar)
                step += done
                if failed:
                    diverged_at = step
                    break
                continue
            do_step()
            step += 1
            if bar is not None:
                bar.update(1)
    finally:   # its worker threads, and the step's hooks
        if fused is not None:
            fused.close()
        if stepper is not None:
            stepper.close()
    stack = lambda xs: torch.stack(xs) if xs else torch.empty(0, device="cpu")  # noqa: E731
    return (stack(outputs), stack(losses), stack(weights), stack(ntks), diverged_at,
            {g: stack(v) for g, v in per_group.items()}, "stacked" if fused is None else "fused")


def _frozen_body(model: nn.Module) -> tuple[nn.Module, DenseModule, str] | None:
    """``(body, readout, "i.")`` when ``model`` is a ``Sequential`` whose output is its ``i``-th
    module, a single ``Dense`` readout (only identities after it), so that ``model(x) ==
    readout(body(x))``; ``None`` for other structures (parallel towers), which run whole."""
    # a forward of its own, or hooks (which readout(body(x)) would skip on the Sequential): run whole
    if type(model) is not nn.Sequential or forward_hooks(model) is not None:
        return None
    prefixes = readout_prefixes(model)
    if len(prefixes) != 1 or "." in prefixes[0]:
        return None
    index = int(prefixes[0])
    if any(type(m) is not nn.Identity for m in list(model)[index + 1:]):
        return None
    return model[:index], cast(DenseModule, model[index]), f"{index}."   # a Dense readout, as checked


def _is_one(value) -> bool:
    return bool(torch.all(torch.as_tensor(value, device="cpu") == 1))
