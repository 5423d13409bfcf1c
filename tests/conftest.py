"""Project-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The suite is many small tensor ops: on a 2-core machine, torch's intra-op threads
    # cost more in synchronization than they buy (measured 25 s vs 278 s under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
