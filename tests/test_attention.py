"""Attention backends: every backend available here matches the plain softmax reference (float64), forward and
backward; one setting chooses the kernel of every attention module and is logged once; unavailable backends
fail with what to install."""

from __future__ import annotations

import logging

import pytest
import torch

from scail2.models.attention import BACKENDS, attention, backend_available, check_backend, set_attention_backend


def reference(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    w = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5, dim=-1)
    return torch.einsum("bhlm,bmhd->blhd", w, v)


def qkv(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Different query and key lengths (as in cross-attention and sequence-parallel self-attention).
    shapes = [(2, 13, 3, 16), (2, 9, 3, 16), (2, 9, 3, 16)]
    return [torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


CPU_BACKENDS = [b for b in BACKENDS if b not in ("flash2", "flash3")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_match_the_softmax_reference(backend):
    q, k, v = qkv()
    out = attention(q, k, v, backend)
    ref = reference(q, k, v)
    assert out.shape == (2, 13, 3, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = [g.double() for g in torch.autograd.grad(ref.square().sum(), (q, k, v))]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backends_match_the_softmax_reference_in_bf16(backend):
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    q, k, v = qkv("cuda", torch.bfloat16)
    out = attention(q, k, v, backend)
    # bf16 inputs: 8 bits of mantissa; the kernels accumulate in float32.
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-2, rtol=2e-2)


def test_one_setting_sets_every_attention_module_and_logs_once(caplog):
    from scail2.models import SCAIL2Transformer, scail2_config
    from scail2.testing import random_scail2_batch, randomize_

    model = randomize_(SCAIL2Transformer(scail2_config("tiny"))).eval()
    inputs, cond = random_scail2_batch(model.config)
    with torch.no_grad():
        sdpa = model(**inputs.as_kwargs(), **cond)
    with caplog.at_level(logging.INFO, logger="scail2.models.attention"):
        assert set_attention_backend(model, "math") == 4  # 2 blocks x (self, cross)
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend: math (plain softmax reference (slow, float32)) in 4 attention modules"
    ]
    assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"math"}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs.as_kwargs(), **cond), sdpa, atol=1e-5, rtol=1e-5)


def test_unknown_and_missing_backends_are_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'flash4'"):
        backend_available("flash4")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        attention(q, k, v, "xformers")
    for name in ("flash2", "flash3"):
        if not backend_available(name):
            with pytest.raises(RuntimeError, match=rf"attention backend {name} needs .*or use attention_backend=sdpa|needs a CUDA device"):
                check_backend(name)
