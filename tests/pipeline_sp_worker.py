"""Sequence-parallel sampling on CPU, run by tests/test_pipeline_sequence_parallel.py under torchrun:

    torchrun --standalone --nproc_per_node=2 -m tests.pipeline_sp_worker --model DIR --files DIR --out DIR

Both ranks run `SCAIL2Pipeline` with sequence parallelism enabled (frames as a float tensor, rank 0 saves
``frames_sp.pt``) and then ``scail2-animate --sequence-parallel 2`` (rank 0 writes ``cli_sp.mp4``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from tests.test_pipeline_sequence_parallel import SAMPLING, cli_args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--files", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    from scail2.cli.animate import main as animate
    from scail2.pipeline.pipeline import SCAIL2Pipeline

    pipe = SCAIL2Pipeline.from_pretrained(args.model).enable_sequence_parallel()
    assert pipe.sequence_parallel.size == 2
    out = pipe(str(args.files / "ref.png"), str(args.files / "driving.mp4"), **SAMPLING)
    if dist.get_rank() == 0:
        torch.save(out.frames, args.out / "frames_sp.pt")
    code = animate([*cli_args(args.model, args.files), "--sequence-parallel", "2", "--out", str(args.out / "cli_sp.mp4")])
    assert code == 0
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
