"""Triton kernels (GPU, or CPU tensors under TRITON_INTERPRET=1); imported lazily by the backend registry."""
