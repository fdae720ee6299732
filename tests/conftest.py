"""Shared fixtures: a fixed seed for every test, and NaN-poisoned kernel outputs (AIMV2_POISON_OUTPUTS=1)."""
import os
import shutil
import tempfile

import pytest
import torch

# Launchers allocate their outputs through aimv2_kernels._alloc.new_output, which fills them with NaN when
# this is set, so an element a kernel forgets to write fails the test instead of passing by luck.
os.environ["AIMV2_POISON_OUTPUTS"] = "1"
# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. It must be set before triton
# is imported. Tests pick their device with the `device` fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# TarShards caches shard indexes (default ~/.cache/aimv2/tar-index): keep the suite's out of the user's home.
_INDEX_CACHE = tempfile.mkdtemp(prefix="aimv2-test-index-")
os.environ["AIMV2_INDEX_CACHE"] = _INDEX_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_INDEX_CACHE, ignore_errors=True)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton through its interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def backend(request, device):
    """The kernel backend under test, for tests parametrised with ``backend`` (indirectly, see
    ``backend_cases.for_backends``): skipped, with the reason, where one of the test module's ``OPS`` cannot run
    on it here. A missing triton fails: it is a test dependency."""
    from aimv2_kernels._backend import _unavailable_reason, triton_available

    name = request.param
    if name == "triton" and not triton_available():
        pytest.fail("triton is not installed; it is a test dependency (pip install -e '.[test]')")
    where = torch.device("cpu") if name == "cpu" else device
    for op in request.module.OPS:
        reason = _unavailable_reason(op, name, where)
        if reason is not None:
            pytest.skip(reason)
    return name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
