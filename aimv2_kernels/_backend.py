"""Backend names, availability, the lazy extension loader and the ``"auto"`` rule."""
from __future__ import annotations

import os
import types
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

# The kernel entry point of each (op, backend) pair. Each loader holds a plain import statement: backends
# load on first use, and torch.compile (Dynamo) traces import statements but not importlib. A backend that
# is installed but has no entry for an op is "unavailable" for that op, with a message that says so.
# Signatures: patch_mse_loss kernels return the per-row loss (see aimv2_kernels.patch_mse); the others take
# the public op's arguments (without ``backend``).
def _compiled_patch_mse():
    from .compiled.patch_mse import patch_mse_rows
    return patch_mse_rows


def _compiled_prefix_attention():
    from .compiled.attention import prefix_attention_compiled
    return prefix_attention_compiled


def _compiled_cross_entropy():
    from .compiled.cross_entropy import cross_entropy_compiled
    return cross_entropy_compiled


def _compiled_linear_cross_entropy():
    from .compiled.linear_cross_entropy import linear_cross_entropy_compiled
    return linear_cross_entropy_compiled


def _triton_patch_mse():
    from .triton.patch_mse import patch_mse_rows
    return patch_mse_rows


def _triton_prefix_attention():
    from .triton.attention import prefix_attention_triton
    return prefix_attention_triton


def _triton_cross_entropy():
    from .triton.cross_entropy import cross_entropy_triton
    return cross_entropy_triton


def _triton_linear_cross_entropy():
    from .triton.linear_cross_entropy import linear_cross_entropy_triton
    return linear_cross_entropy_triton


KERNELS: dict[tuple[str, str], Callable[[], Callable]] = {
    # "cpu" and "cuda" are the compiled extension: one Python wiring whose ops dispatch on the tensors' device.
    ("patch_mse_loss", "cpu"): _compiled_patch_mse,
    ("patch_mse_loss", "cuda"): _compiled_patch_mse,
    ("cross_entropy", "cpu"): _compiled_cross_entropy,
    ("cross_entropy", "cuda"): _compiled_cross_entropy,
    ("linear_cross_entropy", "cpu"): _compiled_linear_cross_entropy,
    ("linear_cross_entropy", "cuda"): _compiled_linear_cross_entropy,
    ("prefix_attention", "cpu"): _compiled_prefix_attention,
    ("prefix_attention", "cuda"): _compiled_prefix_attention,
    ("patch_mse_loss", "triton"): _triton_patch_mse,
    ("prefix_attention", "triton"): _triton_prefix_attention,
    ("cross_entropy", "triton"): _triton_cross_entropy,
    ("linear_cross_entropy", "triton"): _triton_linear_cross_entropy,
}


# "auto" on CUDA tensors: per op, whichever of "cuda" and "triton" measured faster, with the measurement it
# rests on (bench/gpu_check.sh writes the figures to bench/results/). The CUDA kernels of csrc/cuda/ are
# compile-checked (tools/cuda_compile_check.py) but have not yet run on a GPU, so until they pass the GPU tests
# they are no candidate for "auto" (explicit backend="cuda" only) and the entries below record no comparison.
CUDA_KERNELS_VERIFIED = False
CUDA_AUTO: dict[str, tuple[str, str]] = {
    "patch_mse_loss": ("triton", "no GPU measurement yet: the CUDA kernel has not run on a GPU"),
    "prefix_attention": ("triton", "no GPU measurement yet: the CUDA kernels have not run on a GPU; on Hopper the "
                         "Triton kernels use wgmma and TMA, the CUDA ones mma.sync (README, prefix attention on "
                         "Hopper)"),
    "cross_entropy": ("triton", "no GPU measurement yet: the CUDA kernel has not run on a GPU"),
    "linear_cross_entropy": ("triton", "no GPU measurement yet: the CUDA kernel has not run on a GPU"),
}


def kernel(op: str, backend: str) -> Callable:
    """The entry point registered in :data:`KERNELS` for ``op`` on ``backend`` (imported on first use)."""
    return KERNELS[(op, backend)]()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on these tensors."""


_extension_missing = False  # remembered, so a missing extension costs one failed import, not one per call


def load_extension() -> types.ModuleType | None:
    """Import ``aimv2_kernels._C`` (registers the ``torch.ops.aimv2`` ops); return None if it is not built."""
    global _extension_missing
    if _extension_missing:
        return None
    try:
        from . import _C
    except ImportError:
        _extension_missing = True
        return None
    return _C


def extension_available() -> bool:
    return load_extension() is not None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (imported only to learn whether it is installed)
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else a sentence saying why not."""
    if backend == "reference":
        return None
    if (op, backend) not in KERNELS:
        return f"backend={backend!r} has no {op} kernel in this version of aimv2-kernels"
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' needs CPU tensors, got {device.type} tensors"
        if not extension_available():
            return ("the compiled extension aimv2_kernels._C is not built; "
                    "reinstall with `pip install --no-build-isolation .` (needs a C++ compiler)")
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got {device.type} tensors"
        ext = load_extension()
        if ext is None or not getattr(ext, "WITH_CUDA", False):
            return "aimv2_kernels._C was built without CUDA (needs a CUDA build of torch and nvcc)"
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed (pip install triton)"
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            return (f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
                    f"got {device.type} tensors")
        return None
    raise AssertionError(backend)


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run ``op`` on ``device`` in this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _unavailable_reason(op, b, device) is None]


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Turn ``backend`` into a concrete backend for ``op`` on ``device``.

    Rule for ``"auto"`` (documented in the README): on CPU tensors, ``"cpu"`` when the compiled extension
    implements the op, else ``"reference"``; on CUDA tensors, the backend :data:`CUDA_AUTO` records as the
    faster one for the op when it is available, else ``"reference"``. ``"cuda"`` is not a candidate until its
    kernels have passed on a GPU (:data:`CUDA_KERNELS_VERIFIED`).
    float64 inputs run on ``"reference"`` only (they exist for gradcheck and oracles).
    An explicit backend that cannot run raises :class:`BackendUnavailableError`; it never falls back.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype == torch.float64:
        if backend not in ("auto", "reference"):
            raise TypeError(f"{op}: float64 inputs are supported by backend='reference' only, "
                            f"not backend={backend!r}; use float32, bfloat16 or float16")
        return "reference"
    if backend != "auto":
        reason = _unavailable_reason(op, backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: {reason}")
        return backend
    if device.type == "cpu":
        candidates = ["cpu"]
    elif device.type == "cuda":  # the recorded winner first, then the other; unverified CUDA kernels never
        order = dict.fromkeys((CUDA_AUTO.get(op, ("triton", ""))[0], "triton", "cuda"))
        candidates = [b for b in order if b != "cuda" or CUDA_KERNELS_VERIFIED]
    else:
        candidates = []
    for candidate in candidates:
        if _unavailable_reason(op, candidate, device) is None:
            return candidate
    return "reference"
