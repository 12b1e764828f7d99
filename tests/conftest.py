import os

import pytest
import torch

from difftilt.core.store import SQLiteFeedbackStore

# Deterministic, CPU-only, quiet; `CUDA_VISIBLE_DEVICES=0 pytest -k cuda` runs the GPU tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def store(tmp_path):
    """An empty feedback store in the test's folder."""
    s = SQLiteFeedbackStore(tmp_path / "feedback.sqlite")
    yield s
    s.close()
