"""The process group that a run's strategy creates ends with the run; a group the caller made is left alone."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from scail2.train import _own_process_group


def _start_group(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


@pytest.fixture(autouse=True)
def _no_group_left():
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_group_made_during_the_run_is_destroyed(tmp_path):
    with _own_process_group():
        _start_group(tmp_path)
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_group_of_the_caller_is_kept(tmp_path):
    _start_group(tmp_path)
    with _own_process_group():
        pass
    assert dist.is_initialized()
    dist.all_reduce(__import__("torch").ones(1))  # still usable


def test_failed_run_leaves_the_group(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), _own_process_group():
        _start_group(tmp_path)
        raise RuntimeError("boom")
    assert dist.is_initialized()
