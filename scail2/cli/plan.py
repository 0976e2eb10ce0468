"""``scail2-plan``: per-GPU memory of a training configuration, before anything is allocated.

    scail2-plan experiment=pretrain_wan14b --clip 81x512x896 --gpu-memory 80
    scail2-plan experiment=pretrain_wan14b strategy.sequence_parallel=2 --clip 81x704x1280 --gpu-memory 80
    scail2-plan experiment=demo                                  # the clip of data=synthetic
    python -m scail2.cli.plan ...                                # the same

The arguments without ``--`` are the Hydra overrides ``scail2-train`` takes; the world size, strategy, sequence
parallelism, precision, activation checkpointing and batch come from the composed config. The clip is
``--clip FRAMESxHEIGHTxWIDTH`` in pixels (default: the data config's frames/height/width when it has them).
Prints parameters, gradients, optimizer state, activations and transient buffers per GPU, and with
``--gpu-memory`` whether the job fits and what to change if not (exit code 1 when it does not fit). The
estimate and its validation are described in `scail2.models.memory`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scail2-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for scail2-train (experiment=..., key=value)")
    p.add_argument("--clip", default=None, help="FRAMESxHEIGHTxWIDTH in pixels, e.g. 81x512x896")
    p.add_argument("--extra-refs", type=int, default=0, help="extra reference images per sample")
    p.add_argument("--text-tokens", type=int, default=512, help="umT5 tokens (512)")
    p.add_argument("--image-tokens", type=int, default=257, help="CLIP tokens (257)")
    p.add_argument("--devices", type=int, default=None, help="processes per node when trainer.devices is auto")
    p.add_argument("--gpu-memory", type=float, default=None, help="memory of one GPU in GiB (e.g. 80)")
    return p


def _strategy(node: Any) -> str:
    target = str(node["_target_"])
    if target.endswith("single_device"):
        return "single"
    if target.endswith("DDPStrategy"):
        return "ddp"
    if target.endswith("FSDP2Strategy"):
        return "fsdp2"
    if target.endswith("deepspeed"):
        return f"deepspeed_zero{node['stage']}"
    raise ValueError(f"strategy {target} is not one the planner knows; use strategy=single, ddp, fsdp2 or deepspeed_zero2/3")


def _precision(trainer_precision: Any, strategy: str, strategy_node: Any) -> str:
    precision = str(trainer_precision)
    fsdp_bf16 = strategy == "fsdp2" and strategy_node["param_dtype"] in ("bfloat16", "float16")
    if fsdp_bf16:
        return "bf16-params"
    if precision in ("32", "32-true"):
        return "fp32"
    if precision in ("bf16-mixed", "16-mixed"):
        return "bf16-autocast"
    raise ValueError(f"trainer.precision={precision}: the planner knows 32-true and bf16-mixed")


def setup_from_config(cfg: Any, devices: int | None = None):
    """(model config, `Setup`, the data config's clip or None) of a composed ``scail2-train`` config."""
    from dataclasses import replace

    import torch
    from omegaconf import OmegaConf

    from scail2.config.instantiate import instantiate
    from scail2.lit.base import build_network
    from scail2.models.memory import Setup

    with torch.device("meta"):
        net = build_network(instantiate(cfg.model, "model"))
    trainer_devices = cfg.trainer.devices
    if trainer_devices in ("auto", -1, "-1"):
        if devices is None:
            raise ValueError("trainer.devices is auto: pass --devices N (processes per node) or trainer.devices=N")
        trainer_devices = devices
    world = int(cfg.trainer.num_nodes) * int(trainer_devices)
    strategy = _strategy(cfg.strategy)
    sp = int(cfg.strategy["sequence_parallel"]) if "sequence_parallel" in cfg.strategy else 1
    setup = Setup(
        world_size=world,
        strategy=strategy,
        sequence_parallel=sp,
        batch=int(cfg.data.batch_size),
        precision=_precision(cfg.trainer.precision, strategy, cfg.strategy),
        activation_checkpointing=cfg.module.activation_checkpointing,
        reshard_after_forward=bool(cfg.strategy["reshard_after_forward"]) if "reshard_after_forward" in cfg.strategy else True,
        attention_backend=str(cfg.module.attention_backend),
    )
    if "lora" in cfg.module:  # adapter training (DPO): only the adapters train, the backbone is frozen
        from scail2.lora import LoRASpec, lora_parameter_count

        spec = LoRASpec(**OmegaConf.to_container(cfg.module.lora, resolve=True))
        from scail2.utils.dtypes import DTYPES

        frozen = str(cfg.module.get("frozen_dtype") or "float32").removeprefix("torch.")
        if frozen not in DTYPES:
            raise ValueError(f"module.frozen_dtype={frozen}: the planner knows {sorted(DTYPES)}")
        setup = replace(
            setup,
            adapters=lora_parameter_count(net, spec),
            frozen_bytes=DTYPES[frozen].itemsize,
            samples_per_item=2,
        )
    clip = None
    if all(k in cfg.data for k in ("frames", "height", "width")):
        clip = (int(cfg.data.frames), int(cfg.data.height), int(cfg.data.width))
    return net.config, setup, clip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from omegaconf import OmegaConf

    from scail2.config.schema import compose_config
    from scail2.models.memory import GiB, Layout, plan_memory, report

    try:
        cfg = compose_config(args.overrides)
        OmegaConf.set_struct(cfg, False)
        config, setup, data_clip = setup_from_config(cfg, args.devices)
        if args.clip is not None:
            try:
                clip = tuple(int(v) for v in args.clip.lower().split("x"))
                assert len(clip) == 3
            except (ValueError, AssertionError):
                raise ValueError(f"--clip {args.clip}: write FRAMESxHEIGHTxWIDTH in pixels, e.g. 81x512x896") from None
        elif data_clip is not None:
            clip = data_clip
        else:
            raise ValueError("this data config has no frames/height/width: pass --clip FRAMESxHEIGHTxWIDTH (e.g. 81x512x896)")
        layout = Layout.from_pixels(*clip, extra_refs=args.extra_refs, text_tokens=args.text_tokens,
                                    image_tokens=args.image_tokens)
        plan = plan_memory(config, layout, setup)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    device = args.gpu_memory * GiB if args.gpu_memory is not None else None
    print(f"clip {clip[0]}x{clip[1]}x{clip[2]} (frames x height x width), {args.extra_refs} extra references")
    print(report(plan, device))
    return EXIT_DOES_NOT_FIT if device is not None and not plan.fits(device) else 0


if __name__ == "__main__":
    raise SystemExit(main())
