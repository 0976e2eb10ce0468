"""What needs a CUDA device, in one command: ``pytest -m gpu`` (skipped without one; the 2-GPU test without two).

- bf16 parity: the backbone in bf16 (FSDP2-style bf16 parameters, and bf16 autocast over float32 parameters)
  against float32 on the same inputs: relative error of the output below ``BF16_RTOL`` (2%);
- SDPA's flash kernel (and every attention backend installed) against the plain softmax reference
  (tests/test_attention.py, also marked gpu);
- FSDP2 + Ulysses sequence parallelism on 2 GPUs (NCCL) against one GPU (the CPU test's worker with --device cuda);
- torch.compile of the blocks against eager, forward and backward.

Throughput (MFU) of the 1.3B and 14B steps at 480p is a benchmark: ``python benchmarks/bench_train.py --device cuda``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from scail2.models import SCAIL2Transformer, scail2_config
from scail2.testing import random_scail2_batch, randomize_

pytestmark = pytest.mark.gpu

BF16_RTOL = 2e-2  # relative L2 error of the bf16 output against float32 (bf16 keeps 8 bits of mantissa)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _model_and_inputs(**overrides):
    cfg = scail2_config("tiny", dim=256, ffn_dim=1024, num_heads=4, num_layers=4, **overrides)
    torch.manual_seed(0)
    model = randomize_(SCAIL2Transformer(cfg), std=0.02).cuda()
    inputs, cond = random_scail2_batch(cfg, batch=2, frames=5, height=16, width=16, modes=["animation", "replacement"])
    inputs = type(inputs)(**{k: v.cuda() for k, v in inputs.as_kwargs().items()})
    return model, inputs, {k: v.cuda() for k, v in cond.items()}


@pytest.mark.parametrize("mode", ["bf16-params", "bf16-autocast"])
def test_bf16_backbone_matches_float32(mode):
    model, inputs, cond = _model_and_inputs()
    with torch.no_grad():
        ref = model(**inputs.as_kwargs(), **cond)
        if mode == "bf16-params":
            out = copy.deepcopy(model).to(torch.bfloat16)(**inputs.as_kwargs(), **cond)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**inputs.as_kwargs(), **cond)
    assert _relative_error(out, ref) < BF16_RTOL


def test_sdpa_flash_kernel_matches_the_reference():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scail2.models.attention import attention
    from tests.test_attention import qkv, reference

    q, k, v = qkv("cuda", torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = attention(q, k, v, "sdpa")
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-2, rtol=2e-2)


def test_compiled_blocks_match_eager_on_gpu():
    from scail2.models.parallelize import parallelize

    model, inputs, cond = _model_and_inputs()
    compiled = copy.deepcopy(model)
    parallelize(compiled, compile=True, activation_checkpointing=True)
    out = compiled(**inputs.as_kwargs(), **cond)
    ref = model(**inputs.as_kwargs(), **cond)
    out.square().mean().backward()
    ref.square().mean().backward()
    assert _relative_error(out, ref) < 1e-4
    for (n, p), q in zip(compiled.named_parameters(), model.parameters()):
        assert _relative_error(p.grad, q.grad) < 1e-3, n


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_and_sequence_parallel_on_two_gpus(tmp_path):
    from tests.test_sequence_parallel import BATCHES, CASES, torchrun

    out = tmp_path / "parity.json"
    torchrun("tests.sp_worker", "--out", str(out), "--device", "cuda")
    result = json.loads(out.read_text())
    for case in CASES:
        assert result[case]["state_dict"] is True
        for batch in BATCHES:
            r = result[case][batch]
            assert r["missing"] == [] and r["output"] <= 1e-4 and r["grad"] <= 1e-4, (case, batch, r)


def test_tiny_vae_training_on_cuda_resumes_on_the_cpu(tmp_path):
    """The VAE script's ``--device cuda``: a run stopped on the GPU and finished on the CPU makes the same
    updates as a run done on the CPU throughout (same batches)."""
    from safetensors.torch import load_file

    from scail2.encoders.tiny_vae_training import TrainSettings, build_vae, train

    settings = TrainSettings(
        steps=4, batch=2, crop=32, clip_frames=5, warmup=1, base_dim=8,
        train_sets=((2, 5, 32, 11),), heldout_sets=((1, 5, 32, 12),),
    )  # fmt: skip
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions: the runs differ in summation order only
    torch.cuda.reset_peak_memory_stats()
    try:
        train(tmp_path / "mixed", settings, eval_every=2, stop_at=2, device="cuda")
        assert torch.cuda.max_memory_allocated() > 0  # the steps really ran on the GPU
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    train(tmp_path / "mixed", settings, eval_every=2, device="cpu")
    train(tmp_path / "cpu", settings, eval_every=2, device="cpu")
    torch.manual_seed(settings.seed)
    start = build_vae(settings).state_dict()
    mixed = load_file(str(tmp_path / "mixed" / "checkpoint" / "model.safetensors"))
    cpu = load_file(str(tmp_path / "cpu" / "checkpoint" / "model.safetensors"))
    assert mixed.keys() == cpu.keys() == start.keys()
    changed = [k for k in cpu if not torch.equal(cpu[k], start[k])]
    assert len(changed) > len(cpu) // 2  # the steps moved most tensors
    moved_mixed = torch.cat([(mixed[k] - start[k]).flatten() for k in changed])
    moved_cpu = torch.cat([(cpu[k] - start[k]).flatten() for k in changed])
    assert _relative_error(moved_mixed, moved_cpu) < 5e-2
