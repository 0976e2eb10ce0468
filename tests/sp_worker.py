"""Sequence-parallel parity on CPU, run by tests/test_sequence_parallel.py under torchrun (2 processes, gloo):

    torchrun --standalone --nproc_per_node=2 -m tests.sp_worker --out OUT.json [--device cuda]

Every rank builds the same tiny SCAIL-2 model twice: a plain copy (the single-process reference, run locally)
and a copy parallelized with Ulysses sequence parallelism over both ranks (alone, with activation checkpointing,
with FSDP2 over the flattened (dp, sp) mesh, and with both). For each case and batch it records the largest
difference of the forward output and of every parameter gradient, the gradients being what the trainer's
reduction makes of them (FSDP2: the loss scaled by sp, reduce-scattered mean; otherwise the sum over ranks).
Rank 0 writes ``OUT.json``. ``--device cuda`` runs the same on one GPU per rank (NCCL; TF32 off).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist


def batches(cfg, device):
    from scail2.conditioning.packing import SCAIL2Inputs
    from scail2.testing import random_scail2_batch

    # Latent 3 x 4 x 12: 12 tokens per video frame, 3 per driving frame. Sequence lengths 57 and 69 (odd).
    found = {
        "animation": random_scail2_batch(cfg, batch=1, frames=3, height=4, width=12, modes=["animation"], seed=1),
        "replacement_extra_ref": random_scail2_batch(
            cfg, batch=1, frames=3, height=4, width=12, modes=["replacement"], num_extra_refs=1, history=True, seed=2
        ),
        "mixed_batch": random_scail2_batch(
            cfg, batch=2, frames=3, height=4, width=12, modes=["animation", "replacement"], seed=3
        ),
    }
    for name, (inputs, cond) in found.items():
        moved = SCAIL2Inputs(**{k: v.to(device) for k, v in inputs.as_kwargs().items()})
        yield name, (moved, {k: v.to(device) for k, v in cond.items()})


def full_grads(model, sharded: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if sharded:
            g = g.full_tensor()
        else:
            g = g.clone()
            dist.all_reduce(g)  # what DDP's averaging of the sp-scaled loss gives
        out[name] = g
    return out


def state_dict_round_trip(base, model, sharded: bool) -> bool:
    """The parallelized model's (gathered) state dict is the plain model's, key for key, and the plain model's
    state dict loads back into it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    full = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(model, options=full) if sharded else model.state_dict()
    plain = base.state_dict()
    same = list(state) == list(plain) and all(torch.equal(state[k].cpu(), plain[k].cpu()) for k in plain)
    if sharded:
        set_model_state_dict(model, plain, options=full)
    else:
        model.load_state_dict(plain, strict=True)
    return same


def run_case(base, cfg, case: str) -> dict[str, dict[str, float]]:
    from torch.distributed.device_mesh import init_device_mesh

    from scail2.models.parallelize import parallelize

    device = next(base.parameters()).device
    mesh = init_device_mesh(device.type, (1, 2), mesh_dim_names=("dp", "sp"))
    model = copy.deepcopy(base)
    sharded = "fsdp2" in case
    info = parallelize(
        model,
        sequence_parallel=mesh["sp"],
        activation_checkpointing="ac" in case,
        fsdp_mesh=mesh["dp", "sp"]._flatten(f"flat_{case}") if sharded else None,
    )
    assert info.sequence_parallel == 2
    names_before = [n for n, _ in base.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names_before, "parallelize renamed parameters"
    result = {"state_dict": state_dict_round_trip(base, model, sharded)}
    for name, (inputs, cond) in batches(cfg, device):
        base.zero_grad()
        model.zero_grad()
        weight = torch.randn(1, generator=torch.Generator().manual_seed(7)).to(device) + 1.0
        ref = base(**inputs.as_kwargs(), **cond)
        (ref.square().mean() * weight).backward()
        out = model(**inputs.as_kwargs(), **cond)
        (out.square().mean() * weight * 2).backward()  # x sp, as SCAIL2Module.backward does
        grads = full_grads(model, sharded)
        if not sharded:  # DDP averages: sum / 2 of the doubled loss = sum of shares
            grads = {k: v / 2 for k, v in grads.items()}
        result[name] = {
            "output": float((out - ref).detach().abs().max()),
            "grad": max(float((grads[n] - p.grad).abs().max()) for n, p in base.named_parameters()),
            "grad_scale": max(float(p.grad.abs().max()) for p in base.parameters()),
            "missing": [n for n, p in model.named_parameters() if p.grad is None],
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.device == "cuda":
        import os

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.backends.cudnn.allow_tf32 = False  # the patch convolutions in full float32, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    from scail2.models import SCAIL2Transformer, scail2_config
    from scail2.models.parallelize import parallelize
    from scail2.testing import randomize_

    torch.manual_seed(0)
    cfg = scail2_config("tiny")
    base = randomize_(SCAIL2Transformer(cfg), seed=3).to(device)
    results = {case: run_case(base, cfg, case) for case in ("sp", "sp_ac", "sp_fsdp2", "sp_ac_fsdp2")}

    # Heads that the group size does not divide are refused with the divisors.
    odd = SCAIL2Transformer(scail2_config("tiny", dim=96, num_heads=3)).to(device)
    try:
        parallelize(odd, sequence_parallel=dist.group.WORLD)
        results["heads_error"] = None
    except ValueError as exc:
        results["heads_error"] = str(exc)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
