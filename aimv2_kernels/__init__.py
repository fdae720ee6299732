"""aimv2-kernels: fused kernels for AIMv2 pre-training (patch MSE, prefix attention, linear cross-entropy).

Importing this package touches neither Triton, the compiled extension, nor ``torch.cuda``: backends load
lazily on first use. See :func:`aimv2_kernels.available_backends` and the README for the ``"auto"`` rule.
"""
from ._backend import BACKENDS, BackendUnavailableError, available_backends
from .attention import prefix_attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .patch_mse import patch_mse_loss

__all__ = [
    "patch_mse_loss", "prefix_attention", "linear_cross_entropy", "cross_entropy",
    "available_backends", "BACKENDS", "BackendUnavailableError",
]
__version__ = "0.1.0"
