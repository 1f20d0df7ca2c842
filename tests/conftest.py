"""Test setup shared by the whole suite.

TRITON_INTERPRET must be set before anything imports triton: without CUDA, the Triton
kernels run on CPU tensors through Triton's interpreter, so the same kernel code is tested
on every machine.
"""

import os

# One thread per process (and per subprocess a test starts): the machine has 2 cores shared by
# the suite, and fixed threading keeps CPU float results, hence the golden losses, reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:  # torch decides; importing it does not import triton
    import torch

    _HAS_CUDA = torch.cuda.is_available()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so a failure reproduces."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
