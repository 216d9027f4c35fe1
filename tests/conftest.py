"""Test settings: offline, seeded, and thread counts sized for a 2-core CI machine."""

import os

# Set before transformers / huggingface_hub / datasets are imported anywhere in the session:
# anything that tries to reach the Hub fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import random

import numpy as np
import pytest
import torch

# One intra-op thread: the tests' models are tiny, so threads only wait for a core, and on a busy
# 2-core machine backward passes of tiny models ran 10-30x slower with 2 threads.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - seeds the legacy global state other libraries use
    torch.manual_seed(0)
    yield
