"""Shared test configuration: the device under test and the ``gpu`` marker.

Set ``CURVLAB_DEVICE=cuda`` to run the suite on a GPU; tests marked ``@pytest.mark.gpu`` are skipped
otherwise.
"""

import os
import sys

import pytest
import torch

# The helpers next to the tests (models.py, reference.py) import as top-level modules whatever
# pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICE = torch.device(os.environ.get("CURVLAB_DEVICE", "cpu"))

# The test models are tiny: one thread avoids most of the per-op threading overhead, which on two
# shared CPU cores makes the autograd-loop references several times faster.
if DEVICE.type == "cpu":
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CURVLAB_DEVICE=cuda (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda":
        return
    skip = pytest.mark.skip(reason="GPU-only test: set CURVLAB_DEVICE=cuda")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device models and data are put on (``CURVLAB_DEVICE``, default cpu)."""
    return DEVICE
