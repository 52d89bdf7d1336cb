"""GPyTorch kernels over network specs."""

from ntkgp.kernels.network_kernel import NetworkKernel
from ntkgp.kernels.nngp_kernel import NNGPKernel
from ntkgp.kernels.ntk_kernel import NTKKernel

__all__ = ["NNGPKernel", "NTKKernel", "NetworkKernel"]
