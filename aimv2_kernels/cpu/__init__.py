"""CPU backend: Python custom ops over the compiled ``torch.ops.aimv2`` CPU kernels of ``aimv2_kernels._C``."""
