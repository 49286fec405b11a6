import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    """A fresh numpy generator per test: new inputs every run; the seed is printed, so a failure's
    captured output says how to reproduce it (``DMMH_TEST_SEED=<seed> pytest ...`` reruns with it)."""
    import numpy as np

    seed = int(os.environ.get("DMMH_TEST_SEED") or np.random.SeedSequence().entropy % 2**63)
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
