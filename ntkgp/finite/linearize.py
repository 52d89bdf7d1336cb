r"""A network's first-order Taylor expansion in its parameters, trainable like the network.

The linearized network (Lee et al. 2019, §2.2; neural-tangents' ``nt.linearize``)

    f_lin(x; θ) = f(x; θ₀) + J(x; θ₀) (θ − θ₀),   J = ∂f/∂θ at θ₀,

is what wide networks follow under gradient descent, and what
:func:`ntkgp.predict.gradient_descent_mse` and :func:`ntkgp.predict.gradient_descent` predict
from the network's empirical NTK ``Θ̂ = J Jᵀ``. As a ``torch.nn.Module`` it trains with any
torch optimizer, beside the network it came from, to see at a finite width how far the two part.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn
from torch.func import jvp

from ntkgp.finite.empirical import dtype_failure, has_deferred_layers, parameter_dtype, refuse_spec, stateless


class Linearized(nn.Module):
    r"""``f_lin(x; θ) = f(x; θ₀) + J(x; θ₀)(θ − θ₀)`` of a module ``f`` at its parameters ``θ₀``
    now (Lee et al. 2019, §2.2).

    ``network`` is a copy of the module whose parameters are the trainable ``θ`` (they start at
    ``θ₀``); ``initial`` is a second copy holding ``θ₀`` (and the buffers the expansion uses), its
    parameters frozen (``requires_grad=False``: ``parameters()`` lists them, but they get no
    gradient, so optimizers leave them), so that ``.to()``, ``state_dict`` and ``copy.deepcopy``
    carry both. A forward pass is one ``torch.func.jvp`` of the initial network in the direction
    ``θ − θ₀``; gradients flow to ``θ``. A training step (forward and backward) of a 2-hidden-layer
    ReLU network on 12 points cost 1.9x the network's own at width 2048 and 6x at width 64, where
    forward-mode dispatch dominates (2 CPU threads, 2026-12-02).
    Its empirical NTK (:func:`ntkgp.finite.empirical_ntk`) is by default that of ``θ``, ``J(θ₀) J(θ₀)ᵀ``
    however far ``θ`` moved, inside a module of one's own too: ``θ₀`` is the expansion point, not a
    parameter of the expansion.
    Modules built with ``ensemble_size=E`` linearize every member at once. Batch norm must be in
    eval mode (running statistics): in training mode it normalizes by the batch, so the network
    has no fixed expansion point, and the forward pass says so.

    Args:
        model: the network (``net.build(...)`` or any module of its parameters). It is copied:
            training the linearization leaves it as it is.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        refuse_spec(model)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if has_deferred_layers(model):
            raise ValueError("The module has parameters that are not drawn yet (a deferred first layer): call it "
                             "once on inputs, or build it with in_features=..., before linearizing.")
        if not any(True for _ in model.parameters()):
            raise ValueError("The module has no parameters to linearize in.")
        # normal tensors even under a caller's torch.inference_mode(), as net.build makes: copied there,
        # the parameters were inference tensors, and once the mode was left the outputs carried no
        # gradient (training failed with "element 0 of tensors does not require grad")
        with torch.inference_mode(False):
            self.network = copy.deepcopy(model)
            self.initial = copy.deepcopy(model).requires_grad_(False)
        self.training = model.training   # the copies keep the modes they had; this flag said True regardless

    def forward(self, x: Tensor) -> Tensor:
        """``f(x; θ₀) + J(x; θ₀)(θ − θ₀)``, by one ``torch.func.jvp`` of :attr:`initial` at ``x`` in the
        direction ``θ − θ₀`` (Lee et al. 2019, §2.2); gradients reach ``θ``, the parameters of
        :attr:`network`."""
        for module in self.initial.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
                # torch.func's "attempted to call in-place operation ... that would mutate a captured Tensor"
                raise ValueError("Batch norm in training mode normalizes by the batch and updates its running "
                                 "statistics, so the network has no fixed expansion point: call .eval() on the "
                                 "linearized module (its batch norm then uses the running statistics).")
        try:
            return self._expansion(x)
        except NotImplementedError as error:
            if "forward AD" not in str(error):
                raise
            # spectral norm in training mode (its power iteration's out= division) said only this
            raise ValueError(f"The expansion's J (θ − θ₀) is a forward-mode derivative (torch.func.jvp), which an "
                             f"operation of the network does not support ({error}). Spectral norm in training mode "
                             "(its power iteration) is one: call .eval() on the linearized module.") from error
        except RuntimeError as error:
            # torch's "expected m1 and m2 to have the same dtype, but got: float != double" from inside the jvp
            named = dtype_failure(error, x, parameter_dtype(self.initial), self._failure,
                                  f"The inputs are {x.dtype} but the linearized network's parameters are",
                                  "convert the inputs, or the module (.to(dtype))")
            if named is None:
                raise
            raise named from error

    def _failure(self, x: Tensor) -> RuntimeError | None:
        """The ``RuntimeError`` the expansion at ``x`` raises, or ``None`` (evaluated without a graph)."""
        try:
            with torch.no_grad():
                self._expansion(x)
        except RuntimeError as error:
            return error
        return None

    def _expansion(self, x: Tensor) -> Tensor:
        initial = self.initial
        theta0 = dict(initial.named_parameters())
        direction = {name: p - theta0[name] for name, p in self.network.named_parameters()}

        at = stateless(initial)
        # torch.func.jvp is hinted a 2- or 3-tuple whatever has_aux; two without aux
        outputs, change = cast("tuple[Tensor, Tensor]", jvp(lambda params: at(params, x), (theta0,), (direction,)))
        return outputs + change


def linearize(model: nn.Module) -> Linearized:
    r"""The linearization ``f(x; θ₀) + J(x; θ₀)(θ − θ₀)`` of ``model`` at its current parameters, as a
    trainable module (:class:`Linearized`; neural-tangents' ``nt.linearize``, Lee et al. 2019)."""
    return Linearized(model)
