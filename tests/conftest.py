import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second
    thread buys nothing there and, on a CPU shared with other jobs, every op waits for it to be
    scheduled (a 10 ms training step becomes 600 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
