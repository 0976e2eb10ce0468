import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    from scail2.utils.cpu import flush_denormal_enabled

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # Process-wide CPU numerics change the last bits of every later test in this process: a test must leave
    # them as it found them (scail2.train.train restores both).
    assert torch.get_num_threads() == threads, f"the test left torch at {torch.get_num_threads()} threads (was {threads})"
    assert not flush_denormal_enabled(), "the test left denormal flushing on (torch.set_flush_denormal)"
