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


# SPEC section 3 (BYOL's asymmetric recipe), written out once from the SPEC table: both loaders'
# tests check their recipe and their draws against these numbers, never against the recipe object
# the loaders are built from (a wrong value there would pass a test that compares to it).
_SPEC_COMMON = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, brightness=0.4,
                    contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2, sigma=(0.1, 2.0), solarize_threshold=128)
SPEC_VIEWS = ({**_SPEC_COMMON, "blur_p": 1.0, "solarize_p": 0.0}, {**_SPEC_COMMON, "blur_p": 0.1, "solarize_p": 0.2})


@pytest.fixture
def spec_views():
    """The two views of SPEC section 3 as dicts of ViewRecipe field values (size aside)."""
    return SPEC_VIEWS
