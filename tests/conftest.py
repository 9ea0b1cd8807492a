import os
import random

import numpy as np
import pytest
import torch

# The real PanopticSports basketball capture (ims/, seg/, train_meta.json, test_meta.json), for the
# tests marked realdata: FOURLEGS_BASKETBALL=/path/to/basketball make test
BASKETBALL = os.environ.get("FOURLEGS_BASKETBALL", "")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_data = pytest.mark.skip(reason="needs the real basketball capture: set FOURLEGS_BASKETBALL=/path/to/basketball")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "realdata" in item.keywords and not os.path.isdir(BASKETBALL):
            item.add_marker(no_data)


@pytest.fixture
def basketball():
    """The folder of the real basketball capture (tests using it are marked realdata)."""
    return BASKETBALL


@pytest.fixture(autouse=True)
def fixed_seeds():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
