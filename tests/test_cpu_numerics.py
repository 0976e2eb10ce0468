"""`scail2.utils.cpu`: a run's thread count and denormal flushing are set for its duration and restored."""

import pytest
import torch

from scail2.utils.cpu import cpu_numerics, flush_denormal_enabled


def test_flush_denormal_is_probed_set_and_restored():
    before = flush_denormal_enabled()
    tiny = torch.tensor([1e-39])  # a float32 denormal
    with cpu_numerics(flush_denormal=True):
        assert flush_denormal_enabled()
        assert (tiny * 2).item() == 0.0
        with cpu_numerics(flush_denormal=False):
            assert not flush_denormal_enabled() and (tiny * 2).item() > 0
        assert flush_denormal_enabled()  # the inner context restored the outer's setting
    assert flush_denormal_enabled() == before


def test_threads_are_set_and_restored_also_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_numerics(threads=1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="need a positive number of torch threads"):
        with cpu_numerics(threads=bad):
            pass
