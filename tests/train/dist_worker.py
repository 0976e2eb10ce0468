"""One short training with a multi-process strategy, run under torchrun by test_distributed.py:

    torchrun --standalone --nproc_per_node=2 -m tests.train.dist_worker --strategy fsdp2 --data-root D --out O \
        --init-from WEIGHTS [--ckpt-path CHECKPOINT]

Every rank writes ``<out>/rank<R>.json``: digests of its full (gathered) weights when training starts and after,
and the training loss of every step. ``--override KEY=VALUE`` (repeatable) adds config overrides (e.g.
``strategy.sequence_parallel=2``); ``--init-from none`` starts from the seeded random weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


def weight_digest(state: dict[str, Any]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}


class WeightDigest(Callback):
    """``rank<R>.json``: digests of the full weights when training starts (after a resume's restore) and ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.start: dict[str, str] = {}
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    @staticmethod
    def _state(pl_module: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if pl_module.device_mesh is not None:  # FSDP2: gather the shards on every rank
            return get_model_state_dict(pl_module.net, options=StateDictOptions(full_state_dict=True))
        return pl_module.net.state_dict()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = weight_digest(self._state(pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        digest = weight_digest(self._state(pl_module))
        record = {"step": trainer.global_step, "weights": digest, "start": self.start, "losses": self.losses}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init-from", required=True)
    parser.add_argument("--ckpt-path", type=Path, default=None, help="resume from this checkpoint")
    parser.add_argument("--override", action="append", default=[])
    args = parser.parse_args()

    from scail2.train import train

    from .conftest import compose_run

    args.out.mkdir(parents=True, exist_ok=True)
    cfg = compose_run(
        args.data_root,
        args.out,
        "logger=none",
        f"strategy={args.strategy}",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.progress=null",
        "trainer.enable_progress_bar=false",
        *([] if args.init_from == "none" else [f"module.init_from={args.init_from}"]),
        *([f"ckpt_path='{args.ckpt_path}'"] if args.ckpt_path else []),  # quoted: the name holds '='
        *args.override,
    )
    train(cfg, [WeightDigest(args.out)])
    import torch.distributed as dist

    if dist.is_initialized():  # the run created the group, so the run must end it (or the exit can abort)
        raise SystemExit("train() returned with its process group still alive")


if __name__ == "__main__":
    main()
