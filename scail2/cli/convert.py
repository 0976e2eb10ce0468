"""``scail2-convert``: convert transformer weights between layouts.

Examples::

    # the official SCAIL-2 release folder (finds model/<iteration>/fsdp2_rank_0000_checkpoint.pt) -> our
    # safetensors folder in bf16, streamed tensor by tensor
    scail2-convert SCAIL-2 ckpt/scail2-14b --dtype bf16
    # diffusers Wan2.1-I2V transformer -> SCAIL-2 initialisation for pretraining
    scail2-convert Wan2.1-I2V-14B-720P-Diffusers/transformer ckpt/scail2-init --init-scail2-from-i2v
    # our folder -> diffusers layout (plain Wan models only)
    scail2-convert ckpt/wan ckpt/wan-diffusers --to diffusers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scail2.utils.dtypes import SHORT_DTYPES as DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scail2-convert",
        description="Convert Wan2.1 / SCAIL-2 transformer weights (diffusers, original Wan, SCAIL-2, SAT) "
        "to the scail2 safetensors layout or to diffusers.",
    )
    p.add_argument(
        "src",
        type=Path,
        help="weights file or folder (layout detected automatically), or the official SCAIL-2 release folder",
    )
    p.add_argument("dst", type=Path, help="output folder (never inside the source folder)")
    p.add_argument("--to", choices=["scail2", "diffusers"], default="scail2", help="output layout")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of the safetensors files (e.g. 5GB)")
    p.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="head count when the source records none (default: width / 128, as in every Wan2.1 model); "
        "nothing is written next to the source",
    )
    p.add_argument(
        "--init-scail2-from-i2v",
        action="store_true",
        help="the source is Wan2.1-I2V: write a SCAIL-2 model initialised from it (see docs/weights.md)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from scail2.models.loading import (
        CheckpointError,
        build_model,
        convert_checkpoint,
        ensure_outside_source,
        load_transformer,
        save_pretrained,
        scail2_from_wan_i2v,
    )

    dtype = DTYPES.get(args.dtype) if args.dtype else None
    try:
        if args.init_scail2_from_i2v:
            ensure_outside_source(args.src, args.dst)
            # Builds the model in memory: the I2V -> SCAIL-2 initialisation edits the patch embedding.
            model = scail2_from_wan_i2v(load_transformer(args.src, dtype=dtype, num_heads=args.num_heads))
            out = save_pretrained(model, args.dst, layout=args.to, max_shard_size=args.max_shard_size)
            config = model.config
            params = model.num_params()
        else:
            out, config = convert_checkpoint(
                args.src,
                args.dst,
                layout=args.to,
                dtype=dtype,
                max_shard_size=args.max_shard_size,
                num_heads=args.num_heads,
            )
            params = build_model(config, device="meta").num_params()
    except (CheckpointError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
    c = config
    kind = "SCAIL2Transformer" if c.is_scail2 else "WanModel"
    print(
        f"wrote {kind} ({params / 1e9:.3f}B parameters, dim {c.dim}, {c.num_layers} layers, "
        f"in_channels {c.in_channels}) to {out} in the {args.to} layout"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
