import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to gain from threads, and on a shared CPU OpenMP threads
    spinning against another process's make each step tens of times slower. Restored afterwards: the
    rest of the suite keeps torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
