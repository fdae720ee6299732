"""Readable pure-PyTorch references of the three ops: the oracle for tests and the eager baseline."""
from .attention import prefix_attention_reference, prefix_mask
from .cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from .patch_mse import count_patches, patch_mse_loss_reference, patchify

__all__ = [
    "patch_mse_loss_reference", "patchify", "count_patches",
    "prefix_attention_reference", "prefix_mask",
    "cross_entropy_reference", "linear_cross_entropy_reference",
]
