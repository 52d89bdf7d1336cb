"""The NNGP kernel of an infinitely wide network as a GPyTorch kernel."""

from __future__ import annotations

from ntkgp.kernels.network_kernel import NetworkKernel


class NNGPKernel(NetworkKernel):
    r"""Neural network Gaussian process kernel ``K(x, x')`` of a network spec.

    The output of an infinitely wide network at initialisation is a centred Gaussian process
    with this covariance (Neal 1996; Lee et al. 2018; Matthews et al. 2018); it is also the
    kernel of gradient flow when only the readout layer is trained, in NTK parameterization (a
    standard-parameterized readout trained with one learning rate has the tangent kernel
    ``n K_h + 1[bias]``, ``K_h`` the kernel of its ``n`` input features; with the per-layer rates of
    :func:`ntkgp.finite.rates.equivalent_learning_rates` it is ``K`` again). Values are the
    layer-by-layer recursion of :meth:`ntkgp.Layer.kernel`: ``K ← σ_w² K + σ_b²`` (Dense),
    ``K ← T(K) = E[φ(u)φ(v)]`` (activations), from ``K⁰ = x·x'/d``.

    Example:
        >>> net = ntkgp.mlp(depth=2, activation="relu")
        >>> covar_module = ntkgp.NNGPKernel(net)           # learnable weight/bias variances
        >>> K = covar_module(x1, x2).to_dense()

    Args:
        net: the network spec (its hyperparameters become this kernel's parameters).
        batch_shape: GPyTorch batch shape of the hyperparameters, given to ``net``'s variances in
            place (kernels sharing a network, or some of its layers, share its batch shape).
        active_dims: input columns the kernel acts on (non-negative integer indices).
        **kwargs: refused with a hint where they belong: ``ard_num_dims`` and priors are the
            layers' (``Dense(..., ard_num_dims=d, weight_var_prior=...)``); GPyTorch's ``Kernel``
            would drop them silently.
    """

    kind = "nngp"
