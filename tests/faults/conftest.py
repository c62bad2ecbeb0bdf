"""What the fault tests share: one thread for in-process runs, so that the same steps give the same bits as in the
killed processes (which run with one thread too), and so that a busy CI machine does not slow them down."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
