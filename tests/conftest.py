"""Shared fixtures: a fixed seed for every test, and NaN-poisoned kernel outputs (AIMV2_POISON_OUTPUTS=1)."""
import os

import pytest
import torch

# Launchers allocate their outputs through aimv2_kernels._alloc.new_output, which fills them with NaN when
# this is set, so an element a kernel forgets to write fails the test instead of passing by luck.
os.environ["AIMV2_POISON_OUTPUTS"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
