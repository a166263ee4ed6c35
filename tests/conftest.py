"""Session fixtures: tiny reference checkpoints (see refs.py)."""

from __future__ import annotations

import pytest
import torch
from refs import save_reference

# One thread: the tiny models gain nothing from two, and on a shared 2-core machine a second
# OpenMP thread spinning at every barrier made some tests 40x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mixtral_ref(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="session")
def mistral_ref(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("mistral"), "mistral")


@pytest.fixture(scope="session")
def mixtral_window_ref(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("mixtral_sw"), "mixtral", seed=1, sliding_window=8)


@pytest.fixture(scope="session")
def mistral_window_ref(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("mistral_sw"), "mistral", seed=2, sliding_window=8)


@pytest.fixture(scope="session")
def mixtral_q_ref(tmp_path_factory):
    """Widths the fused int4 kernel takes at every group size up to 128 (intermediate 128, hidden 64)."""
    return save_reference(tmp_path_factory.mktemp("mixtral_q"), "mixtral", seed=3, intermediate_size=128)


def pytest_addoption(parser):
    parser.addoption("--fake-cuda", action="store_true",
                     help="run every offload transfer through tests/fake_cuda.py's ordering checker")


@pytest.fixture(autouse=True)
def _fake_cuda(request):
    """With --fake-cuda, every engine built in the test uses CudaTransfer over the checking fake."""
    if not request.config.getoption("--fake-cuda"):
        yield None
        return
    from fake_cuda import FakeCuda

    from offload.streams import use_backend

    fake = FakeCuda()
    with use_backend(fake), fake.checking():
        yield fake
