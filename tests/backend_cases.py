"""What the per-op test files parametrised over kernel backends share (the ``backend`` fixture is in conftest.py).

Every test runs for the backends it names (``for_backends``; the backend leads the test id, ``[cpu-...]`` or
``[triton-...]``): ``cpu`` is the compiled extension ``aimv2_kernels._C`` (skipped when it is not built),
``triton`` runs on CUDA tensors on a GPU and on CPU tensors through Triton's interpreter elsewhere
(TRITON_INTERPRET=1, set by conftest.py; triton is a test dependency: missing, its tests fail instead of
skipping). The ``cuda`` backend is tested in test_cuda_kernels.py. Tests of one backend's internals name only
that backend.
"""
import pytest
import torch

BACKENDS = ("cpu", "triton")


def for_backends(*backends: str):
    """Run the test once per backend (the ``backend`` fixture, parametrised indirectly). Apply it last (just
    above the ``def``) so that the backend leads the test id."""
    return pytest.mark.parametrize("backend", backends or BACKENDS, indirect=True)


def case_id(value: object) -> str | None:
    """Readable test ids: dtypes without ``torch.``, tuples joined with ``x``."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None
