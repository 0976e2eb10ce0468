"""`scail2.models.parallelize` on one process: parameter names are unchanged by every transform (a checkpoint
saved without it loads with it and the other way round), activation checkpointing every k-th block, and
``torch.compile`` (slow: inductor on CPU) gives eager's outputs and gradients. Sequence parallelism and FSDP2
are checked with 2 processes in tests/test_sequence_parallel.py."""

from __future__ import annotations

import copy

import pytest
import torch

from scail2.models import SCAIL2Transformer, load_transformer, save_pretrained, scail2_config
from scail2.models.parallelize import apply_activation_checkpointing, checkpointed_blocks, compiled, parallelize
from scail2.testing import random_scail2_batch, randomize_

TRANSFORMS = {
    "checkpoint_all": dict(activation_checkpointing=True),
    "checkpoint_every_2nd": dict(activation_checkpointing=2),
    "compile": dict(compile=True),
    "math_attention": dict(attention_backend="math"),
    "all": dict(activation_checkpointing=True, compile=True, attention_backend="math"),
}


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return randomize_(SCAIL2Transformer(scail2_config("tiny", num_layers=4)), seed=1)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_checkpoints_load_with_and_without_each_transform(plain, name, tmp_path):
    saved_plain = save_pretrained(plain, tmp_path / "plain")
    model = load_transformer(saved_plain)
    parallelize(model, **TRANSFORMS[name])
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict(), strict=True)  # a checkpoint of the plain model loads
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    back = load_transformer(save_pretrained(model, tmp_path / name))  # and the transformed one loads plainly
    for (n, a), b in zip(back.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n


def test_checkpointing_every_kth_block_is_exact(plain):
    model = copy.deepcopy(plain)
    assert apply_activation_checkpointing(model, 2) == [0, 2] == checkpointed_blocks(model)
    inputs, cond = random_scail2_batch(model.config, batch=2, modes=["animation", "replacement"])
    out = model(**inputs.as_kwargs(), **cond)
    ref = plain(**inputs.as_kwargs(), **cond)
    out.square().mean().backward()
    ref.square().mean().backward()
    assert torch.equal(out, ref)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-6, msg=n)
    plain.zero_grad()
    assert apply_activation_checkpointing(model, False) == [] == checkpointed_blocks(model)
    with pytest.raises(ValueError, match="every 0-th block"):
        apply_activation_checkpointing(model, 0)


def test_mixed_precision_settings_need_a_mesh(plain):
    with pytest.raises(ValueError, match="need fsdp_mesh"):
        parallelize(copy.deepcopy(plain), param_dtype=torch.bfloat16)


@pytest.mark.slow
def test_compiled_blocks_match_eager(plain):
    """Inductor on CPU (a C++ compiler compiles the kernels; the first run takes a minute or more)."""
    model = copy.deepcopy(plain)
    info = parallelize(model, compile=True, activation_checkpointing=True)
    assert info.compiled and compiled(model)
    inputs, cond = random_scail2_batch(model.config, batch=2, modes=["animation", "replacement"], num_extra_refs=1)
    out = model(**inputs.as_kwargs(), **cond)
    ref = plain(**inputs.as_kwargs(), **cond)
    out.square().mean().backward()
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    plain.zero_grad()
