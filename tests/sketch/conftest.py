"""Fixtures for tests/sketch."""

import pytest
import torch

from pinnsketch.sketch import OPERATORS


@pytest.fixture(params=sorted(OPERATORS))
def operator_name(request):
    """Every registered test operator."""
    return request.param


@pytest.fixture(autouse=True)
def _single_thread():
    """These matrices are tiny: one intra-op thread avoids OpenMP spin contention on a busy
    machine (measured: 64 s with 2 threads under load against 5 s with 1). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
