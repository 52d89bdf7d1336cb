"""GPyTorch models with infinite-width network kernels, and a marginal-likelihood fit helper."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gpytorch
import torch
from gpytorch.lazy import LazyEvaluatedKernelTensor
from linear_operator.operators import DenseLinearOperator, IdentityLinearOperator, KroneckerProductLinearOperator
from linear_operator.utils.errors import NotPSDError
from torch import Tensor

from ntkgp._autograd import differentiates
from ntkgp._checks import integer_at_least
from ntkgp._warnings import caller_stacklevel
from ntkgp.kernels import NNGPKernel, NTKKernel
from ntkgp.kernels.network_kernel import NetworkKernel
from ntkgp.layers.base import Layer, NonFiniteKernelError, NonFiniteVarianceError
from ntkgp.layers.mlp import mlp
from ntkgp.layers.validation import all_finite, array_advice, check_points, one_point_hint, where_not_finite
from ntkgp.predict.gaussian import Gaussian, HyperparameterRecord, check_non_negative, named_kernels
from ntkgp.predict.spectral import (
    POSTERIOR_COEFFICIENTS,
    coarser_than_float64,
    kernel_entry_error,
    warn_if_imprecise,
)

__all__ = ["NetworkGP", "exact_solves", "fit"]

KERNELS = {"nngp": NNGPKernel, "ntk": NTKKernel}

#: Why NetworkGP refuses NaN targets, which GPyTorch takes under ``observation_nan_policy("mask")``.
MISSING_TARGETS_HINT = (
    " For missing targets, drop their points ({drop}): GPyTorch's observation_nan_policy"
    "('mask') leaves them out of the posterior mean but not out of its covariance, which still conditions on "
    "their inputs (0.10 off the model without them, measured with GPyTorch 1.15), so NetworkGP does not take them.")


def _missing_targets_hint(targets: Tensor, vector: bool) -> str:
    """:data:`MISSING_TARGETS_HINT` for ``targets`` with NaN, with the points to keep for their shape: ``(N,)``,
    ``(N, k)`` (``vector``: a point goes with any of its outputs) or a batch ``(..., N)``; ``""`` without NaN."""
    missing = targets.detach().isnan()
    if not bool(missing.any()):
        return ""
    # a mask of y's shape picked single entries of x for (N, k) targets: a flat tensor, or an IndexError
    drop = ("x[~y.isnan()], y[~y.isnan()]" if targets.dim() == 1 else
            "keep = ~y.isnan().any(-1); x[keep], y[keep]" if vector else
            "keep = ~y.isnan().flatten(0, -2).any(0); x[keep], y[..., keep]")
    return MISSING_TARGETS_HINT.format(drop=drop)


def _non_finite_targets(name: str, targets: Tensor, vector: bool = False) -> ValueError:
    """The error for targets with NaN or infinite values; NaN (a missing value) gets the advice to drop it."""
    return ValueError(f"{name} contains NaN or infinite values.{_missing_targets_hint(targets, vector)}")


def _nan_policy() -> str:
    """GPyTorch's ``observation_nan_policy`` in force (``"ignore"`` before GPyTorch had one)."""
    setting = getattr(gpytorch.settings, "observation_nan_policy", None)
    return "ignore" if setting is None else str(setting.value())


def exact_solves(model: gpytorch.models.GP) -> contextlib.AbstractContextManager:
    """GPyTorch's ``max_cholesky_size`` raised to ``model``'s number of training points (the
    largest of a model list's, e.g. BoTorch's ``ModelListGP``): its default (800) switches a
    kernel matrix to conjugate gradients and stochastic Lanczos beyond.
    Not to ``N k``: a multi-output covariance ``K ⊗ I_k`` above the limit takes linear_operator's
    Kronecker solves, exact too, which a dense ``N k × N k`` Cholesky made 30x slower (250 points,
    8 outputs)."""
    inputs = getattr(model, "train_inputs", None)
    if inputs is None:
        raise ValueError(f"exact_solves needs a model with training inputs (an ExactGP or a list of them), "
                         f"got {type(model).__name__}.")
    size = max(gpytorch.settings.max_cholesky_size.value(), _training_points(inputs))
    return gpytorch.settings.max_cholesky_size(size)


def _sparse_invariants_unchanged() -> contextlib.AbstractContextManager:
    """torch's sparse-tensor invariant checks, set explicitly to their current value (nothing changes).

    GPyTorch's multitask prediction (vector targets) sums with a sparse matrix that linear_operator
    builds (``left_t_interp``); torch 2.13 then warns, once per process, "Sparse invariant checks are
    implicitly disabled. Memory errors (e.g. SEGFAULT) will occur ...", unless the setting was chosen
    explicitly: a warning about linear_operator's internals that a user cannot act on."""
    checks = torch.sparse.check_sparse_tensor_invariants
    return checks(enable=checks.is_enabled())


def _check_features(net: Layer, features: int, name: str) -> None:
    """Refuse inputs of ``features`` features that ``net`` does not take (``Layer.check_input_dim``, as
    ``net.kernel`` checks them: a first layer's ``ard_num_dims``), naming them ``name``."""
    try:
        net.check_input_dim(features)
    except ValueError as error:
        raise ValueError(f"{name} with {features} feature(s) cannot enter the network: {error}") from None


def _check_fixed_noise(likelihood: object, points: int, batched: bool = True) -> None:
    """A ``FixedNoiseGaussianLikelihood`` must hold one noise variance per training point: ``(..., N)``,
    or ``(N,)`` without ``batched`` (a ``NetworkGP``'s own: a batch of noises failed at its first
    prediction with "mat2 must be a matrix, got 3-D tensor"; batched fantasies hold ``(b, N)``).

    GPyTorch leaves a noise of another length out of the posterior and of the marginal likelihood, with
    a warning that it "did not match the size ... treated as a no-op": 7 noises for 8 points (or one, as
    a shared variance) gave the noise-free posterior (means 10.7 off those with the noise) and fit maximized
    the noise-free evidence. A 0-d noise failed at the first prediction with "tuple index out of range"."""
    if not isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
        return
    noise = likelihood.noise
    if noise.dim() == 0 or noise.shape[-1] != points or (not batched and noise.dim() != 1):
        raise ValueError(f"The FixedNoiseGaussianLikelihood holds noise of shape {tuple(noise.shape)} for {points} "
                         f"training points: give one variance per point, shape ({points},), also for one shared "
                         "variance (GPyTorch leaves a noise of another length out, without a word beyond a "
                         "warning); after set_train_data, set likelihood.noise for the new points.")


def _training_points(inputs: Tensor | tuple | list) -> int:
    """The most training points among ``inputs``: an ExactGP's tuple of ``(..., N, d)`` (or
    ``(N,)``) tensors, or a model list's list of such tuples."""
    if inputs is None:   # a model of a list built without training data
        raise ValueError("exact_solves needs models with training inputs; one of the list has none.")
    if isinstance(inputs, Tensor):
        return inputs.shape[-2] if inputs.dim() >= 2 else inputs.shape[0]
    return max((_training_points(x) for x in inputs), default=0)


def _evaluated_kernel(covar: LazyEvaluatedKernelTensor) -> Any:
    """The kernel GPyTorch evaluated for ``covar`` (its cached ``evaluate_kernel``, linear_operator's memoized
    ``(name, args, kwargs)`` entry), ``None`` where it has not: never formed here, an ``N × N`` kernel at any
    ``N`` (a cache of another form reads as none: the caller forms what it needs itself)."""
    cache = getattr(covar, "_memoize_cache", None)
    if isinstance(cache, dict) and any(isinstance(key, tuple) and key[:1] == ("kernel_eval",) for key in cache):
        return covar.evaluate_kernel()
    return None


def _task_noise_covariance(likelihood: object) -> Tensor | None:
    """The ``(k, k)`` covariance of the task noises a ``MultitaskGaussianLikelihood`` adds to its global
    noise (``None`` without task noises: every output has the global noise alone): ``diag(task_noises)``
    at ``rank = 0``, ``F Fᵀ`` of its ``task_noise_covar_factor`` ``F`` at ``rank > 0`` (GPyTorch's
    ``_shaped_noise_covar``): its diagonal may differ between the outputs, and its off-diagonal entries,
    where nonzero, correlate them."""
    if not getattr(likelihood, "has_task_noise", False):
        return None
    if getattr(likelihood, "rank", 0) == 0:
        return torch.diag_embed(likelihood.task_noises.detach())   # type: ignore[attr-defined]
    return likelihood.task_noise_covar.detach()   # type: ignore[attr-defined]


class NetworkGP(gpytorch.models.ExactGP):
    r"""Exact GP regression whose covariance is a network's NNGP or NTK kernel.

    With ``kernel="nngp"`` this is exact Bayesian inference in an infinitely wide network
    (Lee et al. 2018); with ``"ntk"`` it is the NTK-GP (He et al. 2020), the posterior that
    :func:`ntkgp.predict.gp_posterior` calls ``kernel="ntkgp"`` (its ``kernel="ntk"`` is the trained
    ensemble at ``t = ∞``: the same mean, another covariance). The weight and bias
    variances of every layer and the noise variance are learnable by maximizing the exact
    marginal likelihood (:func:`fit`).

    Vector targets ``(N, k)`` share one kernel: the prior over all outputs is ``K ⊗ I_k``
    (kernels are per output unit) with one noise variance, so GPyTorch factors ``K`` once for
    all ``k`` outputs (a Kronecker-plus-constant-diagonal solve).

    Args:
        train_x: ``(N, d)`` inputs (``N = 0`` with 1-D targets: predictions are the prior).
        train_y: ``(N,)`` or ``(N, k)`` targets.
        net: the network spec; ``None`` builds ``ntkgp.mlp(**mlp_kwargs)``.
        kernel: ``"nngp"`` or ``"ntk"``.
        likelihood: a GPyTorch likelihood (default: Gaussian, one shared noise variance); for
            ``(N, k)`` targets a multitask one with ``num_tasks=k``. A ``FixedNoiseGaussianLikelihood``
            holds one noise variance per training point, ``(N,)`` (refused otherwise, here and, after
            ``set_train_data``, at the next prediction or ``fit``: GPyTorch leaves out a noise of another
            length with only a warning).
        mean: ``"zero"`` (the prior of an infinitely wide network) or ``"constant"``.
        **mlp_kwargs: forwarded to :func:`ntkgp.mlp` when ``net`` is ``None``.

    Subclasses may wrap the network kernel (``self.covar_module = ScaleKernel(self.covar_module)``: ``net`` is
    the wrapped kernel's network, and new data are checked against its first layer as here) or map the inputs
    to features in their own ``forward`` before it (deep kernel learning): a first layer with ``ard_num_dims``
    then takes the features' number, which the kernel checks where it first sees them (the first prediction or
    ``fit``), not the raw inputs' (``__init__`` and ``set_train_data`` check these only for this class's
    ``forward``).

    Exact at every size: GPyTorch replaces Cholesky solves by conjugate gradients and stochastic
    Lanczos log-determinants above ``gpytorch.settings.max_cholesky_size`` (800 points by
    default; a review measured the marginal likelihood of 1000 points varying by ±0.09 per point
    between calls and predictive means 1.4 % off). Predictions (eval mode) and :func:`fit` raise
    that limit to the number of training points (:func:`exact_solves`); a training loop of one's
    own evaluates the marginal likelihood outside the model, so wrap it in
    ``with ntkgp.models.exact_solves(model):`` too.
    Eval-mode predictions follow hyperparameters changed in place (``model.net[0].weight_var = 5.0``,
    ``initialize``, an optimizer step, the noise, a fixed noise) and the model's conversion (``.double()``,
    ``.to(device)``): GPyTorch's ``ExactGP`` keeps the training solve of its first prediction until
    ``train()``, and so does a model of one's own with :class:`~ntkgp.NTKKernel` (call
    ``model.train(); model.eval()`` after such a change).
    A prediction under ``torch.inference_mode()`` caches that solve as inference tensors; the next
    prediction outside the mode rebuilds it (GPyTorch's ``ExactGP``, with its own kernels or an
    ``NTKKernel``, fails there with "Inference tensors cannot be saved for backward" once autograd
    is on: predict under ``torch.no_grad()`` in such models, or call ``model.train(); model.eval()``).
    Gradients of eval-mode predictions with respect to the hyperparameters need
    ``gpytorch.settings.detach_test_caches(False)``: by default GPyTorch caches the training
    solve without its graph (the mean's gradient then misses every path through it).

    Missing targets (NaN) are refused, also under GPyTorch's ``observation_nan_policy("mask")``, which
    leaves them out of the posterior mean but not out of its covariance: drop their points instead.

    Like BoTorch's models, the whole model takes the dtype and the device of ``train_x``,
    including a ``net`` or ``likelihood`` passed in (converted in place: give models of different
    dtypes or devices their own copies, ``copy.deepcopy(net)``). Variances keep their exact
    float64 anchors either way.
    With float32 data GPyTorch also solves in float32 (unlike :class:`ntkgp.predict.GPPosterior`,
    which factors in float64), so deep networks and duplicate points are less accurate here: pass
    float64 data for accuracy. A float32 model judges the first prediction of each training solve (after
    new data, hyperparameters or noise) as ``GPPosterior(..., factor_dtype=torch.float32)`` judges its
    own, and warns (``RuntimeWarning``, "the test outputs depend on the kernels' last digits") where the
    kernels' rounding, or a deep kernel's own error against float64, can move the predictive means by
    more than 1 % (docs/numerics.md): those of ``mlp(300, "relu", 2, 1)`` were 1.2e-2 to 4e-2 off the
    float64 model's, silently.

    Many test points: GPyTorch's ``ExactGP`` forms the ``(M, M)`` kernel of the test points for
    any prediction, ``.mean`` alone and ``skip_posterior_variances`` included (measured: 1.07 M²
    of peak memory at M = 8000; 20 GB for 50 000 points in float64). Call the model on slices of
    the test inputs (the same variances, 0.08 M² for slices of 1000), or use
    :class:`ntkgp.predict.GPPosterior` with ``compute_cov="diag"``. Each call also recomputes the
    training kernel and its Cholesky factor for the exact variances (GPyTorch caches the mean's
    solve alone; measured: 126 ms for 10 test points at N = 1000, the default NTK, one thread), where
    a ``GPPosterior`` factors once (9.7 ms per call there); ``gpytorch.settings.fast_pred_var()``
    caches an approximate (LOVE) covariance instead (13 ms).
    """

    prediction_strategy: Any   # GPyTorch's cached training solve (None until the first prediction)
    #: Whether the cached training solve may hold inference tensors: a prediction ran under
    #: ``torch.inference_mode()`` since it was built (a class default, so that models saved before it
    #: existed still load).
    _inference_cache: bool = False

    def __init__(self, train_x: Tensor, train_y: Tensor, net: Layer | None = None, *, kernel: str = "nngp",
                 likelihood: gpytorch.likelihoods.Likelihood | None = None, mean: str = "zero",
                 **mlp_kwargs: Any) -> None:
        if kernel not in KERNELS:
            # gp_posterior's names differ: its "ntkgp" is this "ntk" (a GP with the NTK as covariance)
            hint = (" The NTK-GP, gp_posterior's kernel='ntkgp', is kernel='ntk' here." if kernel == "ntkgp" else "")
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}.{hint}")
        if net is not None and not isinstance(net, Layer):
            # refused by the kernel built from it, which named NNGPKernel (the default kernel=), not net:
            # NetworkGP(x, y, ntkgp.NTKKernel(spec)) read "NNGPKernel needs an ntkgp network, got NTKKernel"
            hint = (f" For a kernel, pass its network and kind: NetworkGP(train_x, train_y, kernel.net, "
                    f"kernel={net.kind!r})." if isinstance(net, NetworkKernel) else "")
            raise ValueError(f"net must be an ntkgp network spec (e.g. ntkgp.mlp(...)) or None, got "
                             f"{type(net).__name__}.{hint}")
        check_points(train_x, "train_x")
        if train_x.dim() != 2:
            # batched train_x was paired with the same targets in every batch, and a (b, N) target read
            # as (N, k) when b == N
            raise ValueError(f"train_x must have shape (N, d), got {tuple(train_x.shape)}.")
        if not isinstance(train_y, Tensor) or not train_y.is_floating_point():
            # integer or boolean labels (a classification's) named no fix, where the kernels' checks of x do
            fix = ("convert it with train_y.double() or train_y.float() (for classes, regress on "
                   "ntkgp.bayes.one_hot_targets(train_y))" if isinstance(train_y, Tensor) else
                   "convert it with torch.as_tensor(train_y, dtype=train_x.dtype)")
            raise ValueError(f"train_y must be a floating-point tensor, got "
                             f"{train_y.dtype if isinstance(train_y, Tensor) else type(train_y).__name__}; {fix}.")
        low = [f"{name} is {v.dtype}" for name, v in (("train_x", train_x), ("train_y", train_y))
               if v.is_floating_point() and v.dtype not in (torch.float32, torch.float64)]
        if low:
            # the Cholesky of the marginal likelihood has no half-precision kernel: fit failed with
            # '"cholesky_cpu" not implemented for 'Half'' after the model was built
            raise ValueError(f"NetworkGP needs float32 or float64 data ({', '.join(low)}): "
                             "convert with .float() or .double().")
        if not all_finite(train_y, "train_y"):
            # GPyTorch would take them: NaN predictions everywhere, and fit's "non-finite marginal
            # likelihood" would not say why (under its "mask" policy, a covariance that ignores the mask)
            raise _non_finite_targets("train_y", train_y, vector=train_y.dim() == 2)
        # N = 0 is the prior (a cold start); with vector targets GPyTorch cannot form it (a division by zero)
        if (train_y.dim() not in (1, 2) or train_y.shape[0] != train_x.shape[-2]
                or (train_y.dim() == 2 and 0 in train_y.shape)):
            raise ValueError(f"train_y must be (N,) or (N, k) with N = {train_x.shape[-2]}, and N, k >= 1 for (N, k), "
                             f"got {tuple(train_y.shape)}.")
        if mean not in ("zero", "constant"):
            raise ValueError(f"mean must be 'zero' or 'constant', got {mean!r}.")
        self.num_outputs = 1 if train_y.dim() == 1 else train_y.shape[-1]
        if likelihood is None:
            likelihood = (gpytorch.likelihoods.GaussianLikelihood() if train_y.dim() == 1 else
                          gpytorch.likelihoods.MultitaskGaussianLikelihood(
                              num_tasks=self.num_outputs, rank=0, has_task_noise=False, has_global_noise=True))
        else:
            # the forward pass makes an (N,)-MVN for 1-D targets and an (N, k)-multitask MVN otherwise;
            # a likelihood of the other kind (or of another k) failed deep inside GPyTorch
            # ("Attempting to broadcast a dimension...", "no attribute '_interleaved'")
            tasks = getattr(likelihood, "num_tasks", None)
            expected = None if train_y.dim() == 1 else self.num_outputs
            if tasks != expected:
                want = ("a single-output likelihood (e.g. gpytorch.likelihoods.GaussianLikelihood())"
                        if expected is None else
                        f"a multitask likelihood with num_tasks={expected} (e.g. gpytorch.likelihoods."
                        f"MultitaskGaussianLikelihood(num_tasks={expected}, rank=0))")
                got = type(likelihood).__name__ + (f" with num_tasks={tasks}" if tasks is not None else "")
                raise ValueError(f"train_y of shape {tuple(train_y.shape)} needs {want}, got {got}.")
            _check_fixed_noise(likelihood, train_x.shape[-2], batched=False)
        super().__init__(train_x, train_y, likelihood)
        if net is None:
            net = mlp(**mlp_kwargs)
        elif mlp_kwargs:
            raise ValueError(f"Pass either net or mlp arguments, not both (got {sorted(mlp_kwargs)}).")
        # the kernel owns the network: registered a second time, its priors would count twice in
        # the marginal likelihood and its parameters twice in the state dict
        self.covar_module = KERNELS[kernel](net)
        # a first layer with ard_num_dims for another number of features was refused only by the first fit
        # or prediction, after the model had been set up (as set_train_data checks, only where the kernel sees
        # the inputs: a subclass's forward may give it features, deep kernel learning)
        raw = self._kernel_of_raw_inputs()
        if raw is not None:
            _check_features(raw.net, train_x.shape[-1], "train_x")
        shape = torch.Size([]) if train_y.dim() == 1 else torch.Size([self.num_outputs])
        if mean == "zero":
            self.mean_module = gpytorch.means.ZeroMean(batch_shape=shape)
        else:
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=shape)
        if train_x.is_floating_point():
            # the whole model in the data's dtype and on its device, as BoTorch's models do
            # (SingleTaskGP calls self.to(train_X)): float64 data with float32 modules trained, but
            # predicting (N, k) targets failed inside linear_operator's interpolation; CUDA data
            # with the likelihood's (1,)-shaped noise left on the CPU failed in the first forward
            self.to(device=train_x.device, dtype=train_x.dtype)

    def __call__(self, *inputs: Tensor, **kwargs) -> gpytorch.distributions.MultivariateNormal:
        if len(inputs) != len(self.train_inputs):
            # GPyTorch pairs them with the training inputs by zip(strict=True): model(x, x) and
            # model(x=x) failed with "zip() argument 2 is longer (shorter) than argument 1"
            keywords = f" and keyword(s) {sorted(kwargs)}" if kwargs else ""
            raise ValueError(f"NetworkGP is called on one positional tensor of inputs, model(x); got "
                             f"{len(inputs)} positional input(s){keywords}.")
        self._check_inputs(inputs, "x")
        # here too: data set later (set_train_data) may have left a fixed noise of the old points behind
        _check_fixed_noise(self.likelihood, _training_points(self.train_inputs))
        if self.training:
            return super().__call__(*inputs, **kwargs)
        self._drop_stale_prediction_strategy()
        rebuilt = self.prediction_strategy is None
        # what this call caches (the solve, the mean's and LOVE's caches) is made of inference tensors
        # under torch.inference_mode(); set before the call, which may fail after caching
        self._inference_cache = torch.is_inference_mode_enabled() or (self._inference_cache and not rebuilt)
        with exact_solves(self), _sparse_invariants_unchanged():   # the prediction's solves run here
            output = super().__call__(*inputs, **kwargs)
            if rebuilt:
                self._record_prediction_state()
                self._warn_if_imprecise(output)
        return output

    def _warn_if_imprecise(self, output: gpytorch.distributions.MultivariateNormal) -> None:
        """:func:`~ntkgp.predict.spectral.warn_if_imprecise` for a float32 model's predictive mean, as
        :class:`~ntkgp.predict.GPPosterior` with ``factor_dtype=torch.float32`` judges its own: GPyTorch's
        training solve ``c = (K + σ²I)⁻¹ (y − m)`` (its cached ``mean_cache``), the training variances with
        the noise, the kernels' rounding and the float32 factorization's, and where ``ε`` leaves it quiet
        the training kernel's error against float64 (a deep recursion's, many times its rounding). Once per
        training solve, at the prediction that builds it: the float32 means of ``mlp(300, "relu", 2, 1)``
        were 1.2e-2 to 4.0e-2 off the float64 model's, silently, where ``GPPosterior`` warned. Nothing is
        computed for float64 models; fantasy models (GPyTorch's update of a judged solve) and batched
        training inputs are not judged."""
        strategy, eps = self.prediction_strategy, torch.finfo(output.mean.dtype).eps
        if not coarser_than_float64(eps) or strategy is None or self.train_inputs[0].dim() != 2:
            return
        x = self.train_inputs[0]
        with torch.no_grad():
            n, k = x.shape[0], self.num_outputs
            # GPyTorch's multitask solve is interleaved, entry i k + j for point i and output j; each output
            # judged as the GP it is, by its own coefficients, variances (task noises) and size: (k, N, 1)
            coefficients = strategy.mean_cache.detach().reshape(n, k).mT.unsqueeze(-1)
            variances = strategy.lik_train_train_covar.diagonal().detach().reshape(n, k).mT   # (k, N)
            outputs = output.mean.detach().reshape(-1, k).mT.unsqueeze(-1)                        # (k, M, 1)
        measured = self._training_kernel(strategy)
        # the training variances of the kernel alone: the smallest of the outputs' (their noises differ)
        entry_eps = None if measured is None else kernel_entry_error(*measured[:2], variances.amin(0), measured[2])
        warn_if_imprecise(coefficients, outputs, variances, eps, factor_eps=eps, cause=POSTERIOR_COEFFICIENTS,
                          entry_eps=entry_eps,
                          remedy="Predict in float64 (float64 data, NetworkGP(train_x.double(), ...), or "
                                 "model.double() with float64 test inputs), or give it more noise.")

    def _training_kernel(self, strategy: Any) -> tuple[Callable[[Tensor], Tensor | None], Tensor, Tensor | None] | None:
        """GPyTorch's training kernel as :func:`~ntkgp.predict.spectral.kernel_entry_error` measures its error
        against float64: the kernel as a function of its inputs, the inputs it saw, and the ``(N, N)`` kernel it
        formed of them where it is at hand (GPyTorch's cached evaluation: only the float64 kernels are formed
        then); ``None`` where the covariance holds no network kernel or cannot be told (judged at ``ε`` alone).

        Read from the covariance (a ``LazyEvaluatedKernelTensor``, ``K ⊗ I_k`` for vector targets), not from
        ``self.net`` and ``train_inputs``: a subclass's ``forward`` may feed the kernel features (deep kernel
        learning; a 100-fold shrinking feature map made the raw inputs' measure read 25 % where the means were
        7.9e-5 off), or wrap the network kernel (a ``ScaleKernel`` around it, measured through the wrapper as
        GPyTorch evaluates it, ``s K`` with ``s`` times ``K``'s error: judged at ``ε`` alone before, the NTK-GP of
        ``mlp(300, "relu", 2, 1)`` scaled by 4 predicted means 4.3e-2 off, silently). Without a lazy covariance
        (``gpytorch.settings.lazily_evaluate_kernels(False)``) the training inputs stand for the kernel's where
        ``forward`` is this class's."""
        covar = strategy.train_prior_dist.lazy_covariance_matrix
        if isinstance(covar, KroneckerProductLinearOperator):
            covar = covar.linear_ops[0]
        if isinstance(covar, LazyEvaluatedKernelTensor):
            kernel, x, params = covar.kernel, covar.x1, dict(covar.params, last_dim_is_batch=covar.last_dim_is_batch)

            def evaluate(points: Tensor) -> Tensor:
                # GPyTorch's own evaluation of such a covariance (its inputs have been through active_dims), made
                # without a graph: it evaluates under the grad mode it was made in
                return LazyEvaluatedKernelTensor(points, points, kernel=kernel, **params).to_dense()

            evaluated = _evaluated_kernel(covar)
        elif type(self).forward is NetworkGP.forward:
            kernel, x, evaluated = self.covar_module, self.train_inputs[0], covar

            def evaluate(points: Tensor) -> Tensor:
                with gpytorch.settings.lazily_evaluate_kernels(False):
                    return kernel(points).to_dense()
        else:
            return None
        if x.dim() != 2 or not any(isinstance(m, NetworkKernel) for m in kernel.modules()):
            return None   # batched training inputs; a kernel of GPyTorch's own, rounded once

        def kernel_of(points: Tensor) -> Tensor | None:
            active = kernel.active_dims
            try:
                with torch.no_grad(), named_kernels("training"):
                    return evaluate(points)
            except RuntimeError:
                # a wrapper's own float32 tensors meeting float64 points (an InducingPointKernel's inducing points,
                # a feature map inside a kernel): "expected m1 and m2 to have the same dtype" failed the float32
                # prediction. No float64 reference: judged at ε alone, as a kernel computing in float32 is
                if points.dtype != torch.float64:
                    raise
                return None
            finally:
                # GPyTorch's evaluate_kernel sets the kernel's active_dims aside and back only where it returns:
                # left at None, the next predictions fed every feature to the kernel
                kernel.active_dims = active
        computed = evaluated.tensor.detach() if isinstance(evaluated, DenseLinearOperator) else None
        if computed is not None and (computed.shape != (x.shape[0], x.shape[0]) or computed.dtype != x.dtype):
            computed = None
        return kernel_of, x, computed

    def set_train_data(self, inputs: Tensor | Sequence[Tensor] | None = None, targets: Tensor | None = None,
                       strict: bool = True) -> None:
        """GPyTorch's ``set_train_data``, with the checks of ``__init__`` that its ``strict=False`` skips:
        finite data, of the model's dtype and device (convert the model first, ``model.to(...)``, to
        change them), and targets of the model's kind, ``(N, k)`` for its ``k`` outputs or ``(N,)``
        (with ``N`` the new inputs' points where both are given)."""
        # parameters, not buffers: the layers keep float64 anchors in a float32 model
        model = next((p for p in self.parameters() if p.is_floating_point()), None)
        raw = self._kernel_of_raw_inputs()
        for x in (inputs,) if isinstance(inputs, Tensor) else tuple(inputs or ()):
            # NaN inputs failed only at the next prediction, named "x2"; NaN targets gave NaN predictions
            # without a word (__init__ and fit refuse both)
            check_points(x.unsqueeze(-1) if isinstance(x, Tensor) and x.dim() == 1 else x, "inputs")
            self._check_model_dtype(x, "inputs", model)
            if raw is not None:   # strict=False takes any shape
                _check_features(raw.net, 1 if x.dim() == 1 else x.shape[-1], "inputs")
        if targets is not None:
            if not isinstance(targets, Tensor):
                raise ValueError(f"targets must be a tensor, got {type(targets).__name__}.")
            if targets.is_floating_point():
                if not all_finite(targets.detach()):
                    raise _non_finite_targets("targets", targets, self.vector_targets)
                self._check_model_dtype(targets, "targets", model)
            self._check_target_shape(targets, inputs)
        super().set_train_data(inputs, targets, strict)

    def _check_target_shape(self, targets: Tensor, inputs: Tensor | Sequence[Tensor] | None) -> None:
        """Targets of the kind the model was built for: ``(..., N, k)`` with its ``k`` outputs for a
        multitask model, ``(..., N)`` otherwise, ``N`` the points of ``inputs`` where given with them (given
        alone, they may precede their inputs: ``fit`` checks the two against each other). Accepted by
        ``strict=False``, targets of another kind failed only later, inside GPyTorch: ``fit`` with "The size of
        tensor a (8) must match the size of tensor b (16)", a prediction with "Flattening the training labels
        failed" or, for ``(N, 1)`` targets of a single-output model, "You must train on the training inputs!"."""
        k = self.num_outputs if self.vector_targets else None
        if k is not None and (targets.dim() < 2 or targets.shape[-1] != k):
            raise ValueError(f"targets must have shape (..., N, {k}) for this model of {k} outputs, got "
                             f"{tuple(targets.shape)}; for other outputs build a NetworkGP on them.")
        if targets.dim() == 0:   # (k is None here) GPyTorch's "tuple index out of range" at the next use
            raise ValueError("targets must have shape (..., N), one per training point, got a 0-d tensor.")
        if inputs is None:
            return
        first = inputs if isinstance(inputs, Tensor) else next(iter(inputs), None)
        if first is None:
            return
        points = _training_points(first)
        held = targets.shape[-2] if k is not None else targets.shape[-1]
        if held != points:
            shape = f"(..., {points}, {k})" if k is not None else f"(..., {points})"
            hint = (" (a model built on 1-D targets takes no (N, k) targets: build a NetworkGP on them)"
                    if k is None and targets.dim() >= 2 and targets.shape[-2] == points else "")
            raise ValueError(f"targets must have shape {shape} for inputs of {points} points, got "
                             f"{tuple(targets.shape)}{hint}.")

    @staticmethod
    def _check_model_dtype(value: Tensor, name: str, model: Tensor | None) -> None:
        # float32 data in a float64 model (strict=False) trained, but its predictions failed inside
        # GPyTorch ("Expected b and A to have the same dtype"), for inputs of either dtype
        if model is not None and (value.dtype, value.device) != (model.dtype, model.device):
            raise ValueError(f"{name} are {value.dtype} on {value.device}, the model is {model.dtype} on "
                             f"{model.device}: convert {name} ({name}.to(...)), or the model before setting "
                             f"its data (model.to(...)).")

    def _check_inputs(self, inputs: Sequence[Tensor], name: str) -> None:
        """Inputs to predict at (``name="x"``) or to fantasize at (``"inputs"``): tensors of the training
        inputs' features, not of a wider dtype, finite."""
        # GPyTorch concatenates training and test inputs before any kernel sees them: test inputs
        # with another number of features failed inside torch.cat ("Sizes of tensors must match")
        features = self.train_inputs[0].shape[-1]
        for x in inputs:   # shape, dtype and finiteness (GPyTorch promotes integer inputs)
            if not isinstance(x, Tensor):
                # in the model's dtype: a wider one is refused below
                raise ValueError(f"{name} must be a torch.Tensor of shape (..., M, {features}), "
                                 f"got {type(x).__name__}{array_advice(x, name, self.train_inputs[0].dtype)}.")
            shape = (*x.shape, 1) if x.dim() == 1 else tuple(x.shape)   # GPyTorch reads a 1-D input as (M, 1)
            if x.dim() == 0 or shape[-1] != features:   # a 0-d tensor: "tuple index out of range" from shape[-1]
                # the shape as given: "got shape (3, 1)" for one point of 3 features read as 3 points of one
                read = f" (GPyTorch reads it as {shape})" if x.dim() == 1 else ""
                raise ValueError(f"{name} must have {features} feature(s) like train_x, shape (..., M, {features}); "
                                 f"got shape {tuple(x.shape)}{read}{one_point_hint(x, features, name)}.")
            dtype = self.train_inputs[0].dtype
            if x.is_floating_point() and torch.promote_types(x.dtype, dtype) != dtype:
                # a wider dtype than the model's: GPyTorch's "expected m1 and m2 to have the same dtype",
                # from deep inside its prediction (narrower inputs are promoted, as integer ones are)
                raise ValueError(f"{name} is {x.dtype} but the model's training inputs are {dtype}: convert {name} "
                                 f"({name}.to({dtype})), or the model and its data (NetworkGP(train_x.to(...), ...)).")
            if x.is_floating_point() and not all_finite(x.detach(), name):
                # found only inside the kernel, after the training kernel's work (~1 s at N = 2000), as "x1"
                raise ValueError(f"{name} contains NaN or infinite values{where_not_finite(x.reshape(shape))}.")

    def _record_prediction_state(self) -> None:
        """Record the values GPyTorch's cached training solve was built from (the likelihood's plain
        tensors too: a fixed noise is one)."""
        self._prediction_record = HyperparameterRecord(self, attributes_of=self.likelihood)

    def _drop_stale_prediction_strategy(self) -> bool:
        """Drop GPyTorch's cached training solve if the hyperparameters changed since it was built;
        whether it was dropped. GPyTorch caches it at the first eval-mode prediction and used it after
        a change in place (a setter, ``initialize``, an optimizer step, ``.data``, the noise): the
        predictions then came from neither model (0.59 off a rebuilt one); rebuilt instead, as after
        ``train()``."""
        record = self.__dict__.get("_prediction_record")
        # a solve cached under torch.inference_mode() holds inference tensors, which autograd cannot
        # save: the next prediction outside the mode (input gradients, an acquisition function's
        # optimization) failed with "Inference tensors cannot be saved for backward", as GPyTorch's own
        # ExactGP does; rebuilt instead (inference tensors also refuse in-place updates outside the mode)
        inference = self._inference_cache and not torch.is_inference_mode_enabled()
        if self.prediction_strategy is None or (not inference and record is not None and record.matches(self)):
            return False
        self.prediction_strategy = None
        self._inference_cache = False
        return True

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> NetworkGP:
        """GPyTorch's ``_apply`` (``.double()``, ``.float()``, ``.to(...)`` convert the training data with the
        parameters), forgetting what the cached training solve was built from, so that the next prediction
        or fantasy rebuilds it: it stayed in the old dtype or on the old device, and the recorded values still
        matched (``torch.equal`` compares across dtypes), so a float32 model made ``.double()`` after a
        prediction failed at the next one with "expected m1 and m2 to have the same dtype" (GPyTorch's own
        ``ExactGP`` fails the same way)."""
        self.__dict__.pop("_prediction_record", None)
        return super()._apply(fn, *args, **kwargs)

    def get_fantasy_model(self, inputs: Tensor, targets: Tensor, **kwargs: object) -> NetworkGP:
        """GPyTorch's fantasy model (the posterior updated with new observations), for 1-D targets."""
        if self.vector_targets:
            # GPyTorch 1.15 cannot fantasize multitask models: "The size of tensor a (2) must match
            # the size of tensor b (6)" from inside its fantasy strategy, for its own MultitaskKernel too
            raise NotImplementedError("get_fantasy_model supports NetworkGP with 1-D targets only (GPyTorch "
                                      "cannot fantasize multitask models); condition on the new points by "
                                      "set_train_data with all targets, or use one model per output.")
        # the checks of __call__ and __init__, which GPyTorch's fantasy update skipped: inputs of other
        # features failed inside its torch.cat ("Sizes of tensors must match"), a float64 input or target
        # of a float32 model with "expected m1 and m2 to have the same dtype" / "Expected b and A to have
        # the same dtype", and NaN targets gave NaN predictions everywhere, without a word
        self._check_inputs(inputs if isinstance(inputs, list) else [inputs], "inputs")
        if not isinstance(targets, Tensor) or not targets.is_floating_point():   # as train_y
            raise ValueError(f"targets must be a floating-point tensor of shape (..., M), got "
                             f"{targets.dtype if isinstance(targets, Tensor) else type(targets).__name__}.")
        first = inputs[0] if isinstance(inputs, list) else inputs
        points = first.shape[0] if first.dim() == 1 else first.shape[-2]
        if targets.dim() == 0 or targets.shape[-1] != points:
            raise ValueError(f"targets must have shape (..., {points}), one per fantasy input, got "
                             f"{tuple(targets.shape)}.")
        if not all_finite(targets.detach()):
            raise _non_finite_targets("targets", targets)
        targets = targets.to(self.train_targets.dtype)   # as train_y is converted when the model is built
        if self._drop_stale_prediction_strategy():   # GPyTorch fantasizes from the cached solve: rebuilt first
            with torch.no_grad():
                self(self.train_inputs[0][..., :1, :])
        fantasy = super().get_fantasy_model(inputs, targets, **kwargs)
        fantasy._record_prediction_state()   # its solve is the updated one, for its data and (fixed) noises
        fantasy._inference_cache = fantasy._inference_cache or torch.is_inference_mode_enabled()
        return fantasy

    def gaussian(self, x_test: Tensor) -> Gaussian:
        """The posterior of the noise-free outputs at ``x_test`` (``(M, d)``) as an
        :class:`ntkgp.predict.Gaussian`, what :mod:`ntkgp.bayes`'s draws, metrics and ArviZ exports take.

        It is GPyTorch's own prediction, ``model(x_test)`` in eval mode (the fitted constant mean,
        kernel and likelihood included), computed without a graph: mean ``(M,)``, or ``(M, k)`` for
        ``(N, k)`` targets; covariance ``(M, M)`` shared by the outputs, or, where the outputs' noises
        differ (a ``MultitaskGaussianLikelihood``'s task noises: ``task_noises``, or at ``rank > 0`` the
        diagonal of ``task_noise_covar``), one per output, ``(M, M, k)``
        (:attr:`~ntkgp.predict.Gaussian.per_output`), the diagonal blocks of the multitask covariance
        ``K** ⊗ I − (K*d ⊗ I)(K ⊗ I + D)⁻¹(Kd* ⊗ I)`` (Rasmussen & Williams 2006, eq. 2.24; Bonilla et
        al. 2008); and as :attr:`~ntkgp.predict.Gaussian.scale` the largest prior variance
        ``max diag K**``, which a float32 covariance's rounding near the data is relative to (without
        it, such a covariance is refused as asymmetric or indefinite). The predictive distribution of
        targets adds the likelihood's noise, which the exports take as their ``noise``. Outputs
        correlated by their noises (a ``task_noise_covar`` with off-diagonal entries) are refused. A
        batch of ``b`` fantasy models (``get_fantasy_model`` with targets ``(b, N')``) gives their ``b``
        Gaussians in one, mean ``(b, M)``, which the exports take one at a time (``time_index=i``).
        With ``k`` outputs the ``k`` blocks ``(M, M)`` are taken from GPyTorch's lazy covariance, not its
        dense ``(M k, M k)`` one (peak 0.75 GB against 1.9 GB at ``M = 1500``, ``k = 4`` in float64).

        Rebuilding this by hand (``gp_posterior(model.net, ...)``) took the kernel kind, the task
        noises and the constants each by name; each one left out was another posterior, silently."""
        if self.training:
            raise ValueError("model.gaussian(x_test) is the posterior: call model.eval() first (in training mode "
                             "a GPyTorch model returns its prior).")
        if not isinstance(x_test, Tensor) or x_test.dim() != 2:
            shape = (tuple(x_test.shape) if isinstance(x_test, Tensor) else
                     type(x_test).__name__ + array_advice(x_test, "x_test", self.train_inputs[0].dtype))
            raise ValueError(f"x_test must be a tensor of shape (M, d), one Gaussian's points, got {shape}"
                             f"{one_point_hint(x_test, self.train_inputs[0].shape[-1], 'x_test')}.")
        self._check_inputs((x_test,), "x_test")   # named so: model(x_test)'s own checks call it x
        if x_test.shape[0] == 0:   # GPyTorch divides by the test points' number
            like = self.train_inputs[0]
            mean = like.new_zeros(0, self.num_outputs) if self.vector_targets else like.new_zeros(0)
            return Gaussian(mean, like.new_zeros(0, 0))
        with torch.no_grad():
            pred = self(x_test)
            # the prior forward gives (a subclass's features, a ScaleKernel's scale): covar_module(x_test) saw the
            # raw inputs, which a deep kernel's first layer refused ("Dense(ard_num_dims=2) got inputs with 3").
            # Lazily, for the diagonal alone: under lazily_evaluate_kernels(False) forward formed the (M, M) prior
            # kernel: 2.8 s against 1.0 s for gaussian of M = 2000 points (N = 200, mlp(20, "relu"), one thread)
            with gpytorch.settings.lazily_evaluate_kernels(True):
                prior = self.forward(x_test).lazy_covariance_matrix
                scale = float(prior.diagonal(dim1=-2, dim2=-1).max())
            mean = pred.mean
            if not self.vector_targets:
                return Gaussian(mean, pred.covariance_matrix, scale)
            k = mean.shape[-1]
            # interleaved: entry (i k + j, i' k + j') is outputs j, j' at points i, i'. Each block taken from the
            # lazy covariance: the dense (M k, M k) one first peaked at ~5.5 such matrices (1.9 GB at M = 1500,
            # k = 4), its blocks at 0.75 GB
            lazy = pred.lazy_covariance_matrix
            own = torch.stack([lazy[j::k, j::k].to_dense() for j in range(k)], -1)   # (M, M, k)
            across = lazy[0::k, 1::k].to_dense() if k > 1 else own[..., :0]   # outputs 0 and 1, a spot check
        task = _task_noise_covariance(self.likelihood)
        # read from the likelihood first: a correlated task-noise covariance (rank > 0) correlates the outputs
        # however little, and its off-blocks near the data are of the posterior's size there, far below the
        # tolerance's scale (float32, noise 1e-4: a correlation of 0.9 between the outputs was taken as none)
        diagonal, correlated = None, False
        if task is not None:
            diagonal = task.diagonal(dim1=-2, dim2=-1)
            correlated = bool((task != torch.diag_embed(diagonal)).any())
        # the off-blocks of independent outputs are exact zeros in GPyTorch's prediction (its K ⊗ I structure);
        # the check by value stands for likelihoods not read above
        if correlated or (across.numel() and float(across.abs().max()) > torch.finfo(own.dtype).eps ** 0.5 * scale):
            raise ValueError("The model's outputs are correlated in its posterior (a likelihood with correlated "
                             "task noises, rank > 0): an ntkgp Gaussian holds independent outputs (use "
                             "MultitaskGaussianLikelihood(num_tasks=k, rank=0) for a noise per output).")
        if diagonal is None or bool((diagonal == diagonal[..., :1]).all()):
            # one noise for all outputs: blocks equal up to rounding (GPyTorch's solves differ by ~1e-16)
            return Gaussian(mean, own.mean(-1), scale)
        return Gaussian(mean, own, scale, per_output=True)

    @property
    def vector_targets(self) -> bool:
        """Whether the model was built for ``(N, k)`` targets (a multitask likelihood, which
        ``__init__`` pairs with them). Not read from ``train_targets``' shape: batched fantasies of
        1-D targets are ``(b, N)`` and were taken for vector targets (a multitask distribution of
        shape ``(b, M, 1)``); nor stored, so that models saved before it existed still load."""
        return getattr(self.likelihood, "num_tasks", None) is not None

    @property
    def net(self) -> Layer:
        """The network spec (owned by ``covar_module``, or by the one network kernel it holds: a subclass's
        ``ScaleKernel(...)`` around it), with its learnable variances. An ``AttributeError`` that says why where
        ``covar_module`` holds no network kernel, or several of different networks (``hasattr(model, "net")``
        is then ``False``)."""
        kernel = self._network_kernel()
        if kernel is None:
            raise AttributeError(self._no_network_message())
        return kernel.net

    def __getattr__(self, name: str) -> Any:
        # Python calls this once the net property raises its AttributeError, and torch's Module.__getattr__ would
        # replace the message by "object has no attribute 'net'". (A ValueError kept it, but broke hasattr,
        # getattr(model, "net", None) and inspect.getmembers on models without one network kernel.)
        if name == "net" and "covar_module" in self.__dict__.get("_modules", {}) and self._network_kernel() is None:
            raise AttributeError(self._no_network_message())
        return super().__getattr__(name)

    def _no_network_message(self) -> str:
        kernels = sum(isinstance(m, NetworkKernel) for m in self.covar_module.modules())
        held = (f"{kernels} network kernels of different networks: read the network from the kernel meant (e.g. "
                "model.covar_module.kernels[0].net)" if kernels else "no network kernel")
        return (f"model.net is the network of covar_module's network kernel, but covar_module "
                f"({type(self.covar_module).__name__}) holds {held}.")

    def _network_kernel(self) -> NetworkKernel | None:
        """``covar_module`` if it is a network kernel, else the one network kernel it holds (a subclass's
        ``ScaleKernel``'s base kernel, a term of a sum; the first of several on one network, ``NNGPKernel(net) +
        NTKKernel(net)``); ``None`` for none, or several on different networks."""
        if isinstance(self.covar_module, NetworkKernel):
            return self.covar_module
        found = [m for m in self.covar_module.modules() if isinstance(m, NetworkKernel)]
        return found[0] if found and all(m.net is found[0].net for m in found) else None

    def _kernel_of_raw_inputs(self) -> NetworkKernel | None:
        """The network kernel where it is known to see the model's inputs as given, whose number of features
        its first layer then checks (``ard_num_dims``): ``forward`` is this class's and no kernel on the way
        selects features (``active_dims``). ``None`` otherwise: a subclass's ``forward`` may give it features
        (deep kernel learning), which the kernel checks when it sees them."""
        kernel = self._network_kernel()
        if kernel is None or type(self).forward is not NetworkGP.forward:
            return None
        selects = any(isinstance(m, gpytorch.kernels.Kernel) and m.active_dims is not None
                      for m in self.covar_module.modules())
        return None if selects else kernel

    def named_priors(self) -> Iterator[tuple]:
        """GPyTorch's ``named_priors``, each prior once: a layer reused in two containers of a spec
        (``parallel(d, serial(ReLU(), d))``) is one set of hyperparameters, but GPyTorch
        reaches it once per parent, and ``ExactMarginalLogLikelihood`` (which asks the model for its
        priors) would count its prior twice."""
        seen = set()
        for entry in super().named_priors():
            name, module = entry[0], entry[1]
            key = (id(module), name.rpartition(".")[2])
            if key not in seen:
                seen.add(key)
                yield entry

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        """The prior at ``x``, ``N(m(x), K(x, x))`` with ``K`` the network's NNGP or NTK (Lee et al.
        2018; He et al. 2020) and ``m`` zero or a constant; for ``(N, k)`` targets the multitask
        ``N(M, K(x, x) ⊗ I_k)`` with ``M`` of shape ``(N, k)`` (zero, or one constant per output),
        the ``k`` outputs independent with one kernel."""
        covar = self.covar_module(x)
        if not self.vector_targets:
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covar)
        # a task axis in front of the points: the means' batch_shape (k,) then broadcasts against
        # the batch axes of x, (*batch, 1, N) -> (*batch, k, N), instead of being aligned with them
        # (batched test inputs (b, n, d) crashed, or with k = 1 took b for the outputs)
        mean = self.mean_module(x.unsqueeze(-3)).mT                      # (*batch, N, k)
        identity = IdentityLinearOperator(self.num_outputs, dtype=x.dtype, device=x.device)
        return gpytorch.distributions.MultitaskMultivariateNormal(
            mean, KroneckerProductLinearOperator(covar, identity), interleaved=True)


def _default_device() -> torch.device:
    """torch's default device (``torch.get_default_device`` is torch 2.3+; before, what a factory makes)."""
    get = getattr(torch, "get_default_device", None)
    return torch.device(get()) if get is not None else torch.empty(0).device


def _first_step(optimizer: torch.optim.Optimizer, closure: Callable[[], Tensor]) -> Any:
    """``optimizer.step(closure)`` with the tensors the optimizer makes for itself on the CPU.

    torch 2.11 (not 2.13) made Adam's step counters (at its first step, ``torch.tensor(0.0)``) on torch's default
    device, where torch means them to be on the CPU (its "special device hosting for step": a counter on a GPU
    costs a kernel launch and a host synchronization, ``.item()``, per parameter and step): with CUDA as the
    default, a CPU model's fit synchronized with the GPU every step, and a meta default device failed
    ("Tensor.item() cannot be called on meta tensors"). Counters on the parameters' device instead would do
    the same to a CUDA model under the usual CPU default. The closure, the model's evaluation, runs under the
    caller's default device, as at every later step. With the CPU as the default nothing is changed.
    """
    caller = _default_device()
    if caller.type == "cpu":
        return optimizer.step(closure)  # type: ignore[arg-type]

    def as_called() -> Tensor:
        with torch.device(caller):
            return closure()

    with torch.device("cpu"):
        return optimizer.step(as_called)  # type: ignore[arg-type]


@differentiates
def fit(model: gpytorch.models.ExactGP, *, steps: int = 200, lr: float = 0.05,
        optimizer: torch.optim.Optimizer | None = None,
        callback: Callable[[int, float], object] | None = None) -> list[float]:
    """Maximize the exact marginal log likelihood of ``model`` on its training data.

    For a zero-mean GP with kernel ``K`` and noise ``σ²`` on ``N`` targets ``y`` that is
    ``log p(y) = −½ yᵀ (K + σ²I)⁻¹ y − ½ log|K + σ²I| − (N/2) log 2π``, maximized over the layers'
    variances and ``σ²`` (type-II maximum likelihood, Rasmussen & Williams 2006, §5.4.1).

    With priors registered (``Dense(..., weight_var_prior=...)``, GPyTorch priors on the likelihood)
    the objective is GPyTorch's ``ExactMarginalLogLikelihood``, which adds their log densities:
    ``log p(Y) + Σ log p(hyperparameters)``, a maximum a posteriori fit.

    Standardize the targets (zero mean, unit variance, as docs/uci.md does). GPyTorch's default
    Gaussian likelihood keeps its noise variance above 1e-4 and parameterizes it by a softplus,
    which above ~1 moves by about ``lr`` per step in absolute units: measured on 100 points,
    targets scaled by 1e-6 were fitted as almost pure noise (noise at the 1e-4 floor), and
    targets scaled by 1e6 ended 200 steps with the noise at 1.0 and a loss of 5.6e9 per entry
    where 13.5 was reachable.

    NaN targets of a model of one's own are taken under GPyTorch's
    ``observation_nan_policy("mask")`` (its marginal likelihood leaves them out; all of them missing
    leave no data, refused as none is), refused otherwise.

    Args:
        model: an ``ExactGP`` (e.g. :class:`NetworkGP`, or a BoTorch model; a batched model, such
            as a multi-output ``SingleTaskGP``, maximizes the mean of its batch's likelihoods).
            Constraints without a transform (BoTorch's noise, ``GreaterThan(1e-4, transform=None)``)
            are bounds: every step ends clamped to them, as in BoTorch's torch fitting. For
            BoTorch models use ``fit_gpytorch_mll`` (L-BFGS-B within those bounds): their noise
            is its own raw parameter, which Adam moves by about ``lr`` per step in absolute units,
            far past a noise of ~1e-2 (a review's 12-point ``SingleTaskGP``: Adam's loss rose from
            0.504 at step 0, so ``fit`` kept the starting values and warned; ``fit_gpytorch_mll``
            reached 0.097; GPyTorch's Matérn kernel fares the same).
        steps: optimizer steps.
        lr: Adam learning rate (the layers' variances, log-parameterized, move by about a factor
            ``e^lr`` per step; the likelihood's noise as above).
        optimizer: a ready optimizer over ``model.parameters()`` instead of Adam; its ``step`` is
            given the loss closure, so optimizers that need one (``torch.optim.LBFGS``) work too.
        callback: called as ``callback(step, loss)`` after every step.

    Returns:
        The negative marginal log likelihood (plus the negative log prior densities, if any) per
        target entry (per data point for 1-D targets) at every step, before that step's update
        (for LBFGS: at the start of the step). The model is left in eval mode, with the trained
        parameters at which the loss was lowest: every loss the optimizer evaluated, and the
        final parameters' (evaluated once more). An optimizer that ends far above its best (an
        L-BFGS line search into overflow ended at a loss of 2735 after 0.95) warns.

    Raises:
        ValueError: if a parameter (trained or frozen) is not finite before the first step, or the
            model has no training data, non-finite data, or inputs and targets with different
            numbers of points (``set_train_data(..., strict=False)`` does not check), or the
            optimizer given holds none of the model's trainable parameters.
        FloatingPointError: if the loss, a gradient or (after a step) a parameter is not finite,
            or the kernel plus noise is not positive definite (linear_operator's ``NotPSDError``);
            the model is then left with the best parameters seen before, in eval mode.

    For models with an ntkgp kernel the marginal likelihood is exact at every size
    (``max_cholesky_size`` is lifted, see :class:`NetworkGP`); other models keep GPyTorch's
    settings (structured kernels rely on its iterative solves).
    """
    if not isinstance(model, gpytorch.models.ExactGP):   # an AttributeError ('train_targets') otherwise
        hint = ("; for a network spec, build the model around it: NetworkGP(train_x, train_y, net)"
                if isinstance(model, Layer) else "")
        raise ValueError(f"model must be a GPyTorch ExactGP (e.g. ntkgp.models.NetworkGP), got "
                         f"{type(model).__name__}{hint}.")
    steps = integer_at_least(steps, 0, "steps")
    # "adam" failed with an AttributeError; read by what fit calls, so wrappers that are not subclasses pass
    if optimizer is not None and (isinstance(optimizer, type)   # a class: "no attribute '_optimizer_step_pre_hooks'"
                                  or not all(callable(getattr(optimizer, m, None)) for m in ("step", "zero_grad"))):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer made over model.parameters() (e.g. "
                         f"torch.optim.LBFGS(model.parameters())), or None for Adam; got {optimizer!r}.")
    if callback is not None and not callable(callback):   # a TypeError after the first step
        raise ValueError(f"callback must be callable as callback(step, loss), got {callback!r}.")
    # a string failed inside Adam ("'<=' not supported"), inf as non-finite parameters after a step;
    # 0 stays allowed: fit(model, steps=1, lr=0.0) evaluates the objective without moving
    check_non_negative("lr", lr)
    # no targets: "Non-finite marginal likelihood" at step 0; an ExactGP built on None: an AttributeError
    if model.train_targets is None or model.train_inputs is None or model.train_targets.numel() == 0:
        raise ValueError("The model has no training data to fit to.")
    # data set later (set_train_data) skip NetworkGP's checks: "non-finite marginal likelihood" did not say why
    # under GPyTorch's "mask" policy NaN targets are missing values, which its marginal likelihood leaves out
    targets = model.train_targets.detach()
    masked = _nan_policy() == "mask" and not isinstance(model, NetworkGP)
    data = [targets.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf) if masked else targets,
            *(x for x in model.train_inputs if x.is_floating_point())]
    if not all(all_finite(value) for value in data):
        hint = _missing_targets_hint(targets, model.vector_targets) if isinstance(model, NetworkGP) else ""
        raise ValueError(f"The model's training inputs or targets contain NaN or infinite values.{hint}")
    if masked:
        # all of them missing: the masked likelihood is 0 at any hyperparameters, and 200 steps returned a
        # history of -0.0 with nothing moved. GPyTorch masks an output (an (N, k) entry of a multitask
        # model's) missing in any batch member in all of them
        event = 2 if getattr(model.likelihood, "num_tasks", None) is not None and targets.dim() >= 2 else 1
        if not bool((~targets.isnan()).reshape(-1, *targets.shape[targets.dim() - event:]).all(0).any()):
            raise ValueError("The model has no training data to fit to: every target is missing (NaN), which "
                             "GPyTorch's observation_nan_policy('mask') leaves out (for a batched model, an output "
                             "missing in one batch member in all of them).")
    # set_train_data(..., strict=False) skips the length check too: torch's "The size of tensor a (5)
    # must match the size of tensor b (20)" came from inside GPyTorch. The targets hold the points
    # on their second last axis for a multitask likelihood ((N, k)), else on their last (batched
    # single-output models, BoTorch's (m, N))
    points = {_training_points(x) for x in model.train_inputs}
    targets = model.train_targets.shape
    axis = -2 if getattr(model.likelihood, "num_tasks", None) is not None and len(targets) >= 2 else -1
    if len(points) != 1 or next(iter(points)) != targets[axis]:
        raise ValueError(f"The model's training inputs (shapes {[tuple(x.shape) for x in model.train_inputs]}) "
                         f"and targets (shape {tuple(targets)}) do not hold the same number of points.")
    _check_fixed_noise(model.likelihood, next(iter(points)))
    # a NaN raw noise surfaced as linear_operator's NanError from inside the Cholesky, not as
    # this function's error
    bad = [name for name, p in model.named_parameters() if not all_finite(p)]   # frozen ones too
    if bad:
        # GPyTorch's constraints map a value set exactly at the bound to an infinite raw value
        # (likelihood.noise = 1e-4 under its default GreaterThan(1e-4)), which did not say why
        at_bound = [name for name, p in model.named_parameters()
                    if name in bad and name.rsplit(".", 1)[-1].startswith("raw_") and not p.isnan().any()]
        hint = (f" {at_bound} are infinite: a value set exactly at its constraint's bound (e.g. likelihood.noise = "
                "1e-4 under GPyTorch's default GreaterThan(1e-4)) has no raw value; set it inside the bound, or "
                "give the module a lower bound (e.g. GaussianLikelihood(noise_constraint="
                "gpytorch.constraints.GreaterThan(1e-6)))." if at_bound else "")
        raise ValueError(f"Parameters {bad} are not finite: nothing to fit from.{hint}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:   # torch's "optimizer got an empty parameter list" (or, with an optimizer given, "element 0 ...")
        raise ValueError("Every parameter of the model is frozen (requires_grad=False): there is nothing to fit. "
                         "Unfreeze the hyperparameters to fit (e.g. model.likelihood.requires_grad_(True)).")
    if any(p.is_inference() for p in params):   # torch's "element 0 of tensors does not require grad" otherwise
        raise ValueError("The model was made inside torch.inference_mode(): its parameters are inference tensors, "
                         "which autograd cannot train. Make the model outside inference mode to fit it.")
    trained = {id(p) for p in params}
    groups = getattr(optimizer, "param_groups", None)   # wrappers without them are taken on trust
    if isinstance(groups, list) and not any(id(p) in trained for g in groups for p in g.get("params", ())):
        # an optimizer made over another model's (or a copy's) parameters stepped those: the history was
        # flat and the model unchanged, without a word
        raise ValueError("The optimizer holds none of the model's trainable parameters: make it over "
                         "model.parameters() of this model (not of a copy or of another model).")
    # before train mode: a failed construction left the model in it, and its next prediction failed
    optimizer = optimizer or torch.optim.Adam(params, lr=lr)
    model.train()
    model.likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    # constraints without a transform (BoTorch's noise: GreaterThan(1e-4, transform=None)) are
    # bounds for the optimizer, not part of the parameterization: an unbounded step can leave
    # them (a negative noise variance, then a failed Cholesky), so each step ends clamped, as in
    # BoTorch's own torch fitting
    bounded = [(p, c) for _, p, c in model.named_parameters_and_constraints()
               if c is not None and not c.enforced and id(p) in trained]
    history: list[float] = []
    step = 0
    best: list = [math.inf, None]   # the lowest loss evaluated and the parameters it was evaluated at
    first: list[Tensor] = []        # the loss of a step's first evaluation

    def objective(when: str) -> Tensor:
        # ExactMarginalLogLikelihood is per target entry of each batch member: a batched model
        # (one per output) gives one value per member, and their mean is per entry of all targets
        try:
            loss = -mll(model(*model.train_inputs), model.train_targets).mean()
        except (NonFiniteVarianceError, NonFiniteKernelError) as error:   # a step (LBFGS's, say) overflowed
            raise FloatingPointError(f"Non-finite hyperparameters {when}: {error}") from error
        except NotPSDError as error:               # a noise stepped to ~0 with a singular kernel
            raise FloatingPointError(f"The kernel plus noise is not positive definite {when}: "
                                     f"{error}") from error
        return loss

    def remember(loss: Tensor) -> None:
        value = float(loss.detach())
        if value < best[0]:
            best[:] = [value, [p.detach().clone() for p in params]]

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(f"at step {step}")
        loss.backward()
        # the loss and every gradient in one check: one synchronization per step on a GPU, not one per parameter
        checked = [loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in params if p.grad is not None]
        if not all_finite(torch.cat(checked)):
            raise FloatingPointError(f"Non-finite marginal likelihood or gradient at step {step}.")
        remember(loss)
        if not first:
            first.append(loss.detach())
        return loss

    # dense network kernels are solved exactly at every size; other models (structured kernels, SKI)
    # keep GPyTorch's settings, which a dense Cholesky would make 40x slower
    exact = any(isinstance(module, NetworkKernel) for module in model.modules())
    try:
        with exact_solves(model) if exact else contextlib.nullcontext():
            for step in range(steps):
                first.clear()
                # Optimizer.step returns an optional float: torch's own return the closure's loss tensor at
                # the start of the step, others a number or None (loss.detach() was an AttributeError)
                # (torch hints the closure as returning a float; its optimizers take the loss tensor, as documented)
                returned = (_first_step(optimizer, closure) if step == 0
                            else optimizer.step(closure))  # type: ignore[arg-type]
                if returned is None and not first:
                    raise ValueError("The optimizer's step neither evaluated the loss closure nor returned a loss: "
                                     "fit needs an optimizer whose step(closure) calls the closure.")
                loss = first[0] if returned is None else returned
                with torch.no_grad():
                    for p, constraint in bounded:
                        p.clamp_(constraint.lower_bound.to(p), constraint.upper_bound.to(p))
                # the last step's update is checked too (it was read only by the next closure)
                if not all_finite(torch.cat([p.detach().reshape(-1) for p in params])):
                    raise FloatingPointError(f"Non-finite parameters after step {step}.")
                history.append(float(loss.detach() if isinstance(loss, Tensor) else loss))
                if callback is not None:
                    callback(step, history[-1])
            if steps:
                with torch.no_grad():
                    final = objective("after the last step")
                if all_finite(final.reshape(1)):
                    remember(final)
                if not all_finite(final.reshape(1)) or float(final) - best[0] > 1e-3 * max(1.0, abs(best[0])):
                    warnings.warn(f"fit: the optimizer ended at a loss of {float(final):.6g}, above the "
                                  f"{best[0]:.6g} it reached before; the model keeps the parameters of the "
                                  "lowest loss (a smaller learning rate, or LBFGS with "
                                  "line_search_fn='strong_wolfe', may converge).", RuntimeWarning,
                                  stacklevel=caller_stacklevel())
    finally:
        if best[1] is not None:
            with torch.no_grad():
                for p, value in zip(params, best[1], strict=True):
                    p.copy_(value)
        model.eval()
        model.likelihood.eval()
    return history
