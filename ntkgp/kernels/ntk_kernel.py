"""The neural tangent kernel of an infinitely wide network as a GPyTorch kernel."""

from __future__ import annotations

from ntkgp.kernels.network_kernel import NetworkKernel


class NTKKernel(NetworkKernel):
    r"""Neural tangent kernel ``Θ(x, x')`` of a network spec (Jacot et al. 2018).

    Under gradient flow on the squared loss, an infinitely wide network evolves as kernel
    regression with this fixed kernel (Lee et al. 2019). As a GP covariance it gives the
    "NTK-GP" used in the literature as a Bayesian surrogate of trained networks. Values are the
    recursion ``Θ ← K_new + σ_w² Θ`` (Dense in NTK parameterization; ``Θ ← n K_prev + σ_w² Θ +
    1[bias]`` in the standard one, :class:`ntkgp.Dense`), ``Θ ← Θ · Ṫ`` (activations) of
    :meth:`ntkgp.Layer.kernel`.

    Args:
        net: the network spec (its hyperparameters become this kernel's parameters).
        batch_shape: GPyTorch batch shape of the hyperparameters, given to ``net``'s variances in
            place (kernels sharing a network, or some of its layers, share its batch shape).
        active_dims: input columns the kernel acts on (non-negative integer indices).
        **kwargs: refused with a hint where they belong: ``ard_num_dims`` and priors are the
            layers' (``Dense(..., ard_num_dims=d, weight_var_prior=...)``); GPyTorch's ``Kernel``
            would drop them silently.
    """

    kind = "ntk"
