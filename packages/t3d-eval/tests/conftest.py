"""Root test configuration: no network, ever (the Hugging Face hub is unreachable here)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread in this package's tests, restored afterwards.

    The suite shares a few cores with other suites; with tiny tensors, oversubscribed thread
    pools made single tests 10x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
