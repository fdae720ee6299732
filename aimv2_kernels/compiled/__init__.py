"""Backends ``"cpu"`` and ``"cuda"``: Python custom ops over the compiled ``torch.ops.aimv2`` kernels of
``aimv2_kernels._C``.

The C++ schemas (csrc/ops.cpp) are device-generic: the CPU kernels register under the CPU dispatch key
(csrc/*_cpu.cpp) and the CUDA kernels under the CUDA key (csrc/cuda/*_glue.cpp), so one Python wiring per op
serves both backends and the kernel follows the tensors' device. Which backend may run where is decided in
``aimv2_kernels._backend`` before these modules are reached.
"""
from .._backend import load_extension

# The device types the custom ops below are registered for.
DEVICE_TYPES = ("cpu", "cuda")


def require_extension() -> None:
    """Raise if ``aimv2_kernels._C`` is not built (callers have normally checked through ``_backend`` first)."""
    if load_extension() is None:
        raise RuntimeError("aimv2_kernels._C is not built; reinstall with `pip install --no-build-isolation .`")
