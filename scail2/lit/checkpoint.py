"""Checkpoints: periodic saving, atomic writes, finding the newest complete checkpoint, the MLflow run record.

A checkpoint is written under a hidden temporary name (``.NAME.partial``) and renamed when complete (files by
`AtomicCheckpointIO`, sharded folders by `scail2.lit.strategies.FSDP2Strategy`), so an interrupted save never
carries a checkpoint's name. `find_resume_checkpoint` picks the newest complete one. The MLflow run id is stored
next to the checkpoint folder (``<run_dir>/mlflow_run.json``) so that ``ckpt_path=last`` continues the same run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("scail2.train")

PARTIAL_SUFFIX = ".partial"
RUN_RECORD = "mlflow_run.json"
# The file Lightning writes last into a distributed (sharded) checkpoint folder.
SHARDED_META = "meta.pt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.NAME.partial`` in the target folder, fsync, then rename onto ``NAME``.

    A checkpoint whose weights or optimizer state hold a non-finite value is not written (`NonFiniteCheckpoint`):
    resuming from it could only reproduce the failure, and the previous checkpoints stay the newest ones.

    Loading also reads a sharded FSDP2 checkpoint folder, consolidated in memory (`consolidate_sharded`), so a
    single-device or DDP run resumes a checkpoint written under FSDP2.
    """

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if is_sharded(Path(path)):
            return consolidate_sharded(Path(path))
        return super().load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from scail2.lit.faults import nonfinite_tensors

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint)
        if bad:
            raise NonFiniteCheckpoint(
                f"not writing checkpoint {path.name} (step {checkpoint.get('global_step')}): {'; '.join(bad)}. The run "
                "has diverged; the checkpoints already written are kept. Resume from one of them with a lower learning "
                "rate (optim.optimizer.lr) or gradient clipping (trainer.gradient_clip_val)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
        with open(partial, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)


class NonFiniteCheckpoint(FloatingPointError):
    """A checkpoint that would hold non-finite weights or optimizer state; it is not written."""


class PeriodicCheckpoint(ModelCheckpoint):
    """Step-based checkpoints ``step=NNNNNNN.ckpt`` every ``every_n_train_steps`` plus ``last.ckpt``.

    Args:
        dirpath: the checkpoint folder (``<run_dir>/checkpoints``).
        every_n_train_steps: optimizer steps between checkpoints.
        keep_last: keep only the newest k periodic checkpoints (-1: keep all).
        save_last: "link" (``last.ckpt`` is a symlink to the newest, no extra write), True (a copy) or False.
        filename: the periodic checkpoints' name pattern.
    The latest checkpoint path is also recorded on the MLflow run (tag ``checkpoint.latest``).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 500,
        keep_last: int = -1,
        save_last: bool | str = "link",
        filename: str = "step={step:07d}",
    ):
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps is {every_n_train_steps}; need at least 1")
        if keep_last == 0 or keep_last < -1:
            raise ValueError(f"keep_last is {keep_last}; use -1 (keep all) or a positive count")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            # Monitoring the step with mode max makes "top k" the k newest checkpoints.
            monitor="step" if keep_last > 0 else None,
            mode="max",
            save_top_k=keep_last,
            save_last=save_last,
            every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
        )

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            from scail2.lit.tracking import set_tag

            for logger in trainer.loggers:
                set_tag(logger, "checkpoint.latest", str(Path(filepath).resolve()))


def is_complete(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder whose metadata was written, not under a temporary name."""
    if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIX):
        return False
    if path.is_dir():
        return (path / SHARDED_META).is_file() and (path / ".metadata").is_file()
    return path.is_file() and path.stat().st_size > 0


def find_resume_checkpoint(folders: list[Path]) -> Path | None:
    """The newest checkpoint (``*.ckpt``, by modification time) in ``folders`` that can be resumed from; links
    are followed to their target, temporary names are ignored. None when there is none.

    Candidates are opened newest first (`scail2.lit.faults.inspect_checkpoint`): a truncated or unreadable one
    is passed over with a warning naming it and the one chosen instead.
    """
    from scail2.lit.faults import inspect_checkpoint

    found: set[Path] = set()
    for folder in folders:
        if folder.is_dir():
            for p in folder.glob("*.ckpt"):
                target = p.resolve() if p.is_symlink() else p
                if target.exists() and is_complete(target):
                    found.add(target)

    def mtime(p: Path) -> tuple[int, str]:
        return ((p / SHARDED_META).stat().st_mtime_ns if p.is_dir() else p.stat().st_mtime_ns, str(p))

    skipped: list[tuple[Path, str]] = []
    for candidate in sorted(found, key=mtime, reverse=True):
        problem = inspect_checkpoint(candidate)
        if problem is None:
            for path, why in skipped:
                log.warning("not resuming from %s: %s; using the newest complete checkpoint, %s", path, why, candidate)
            return candidate
        skipped.append((candidate, problem))
    for path, why in skipped:
        log.warning("not resuming from %s: %s", path, why)
    return None


def write_run_record(folder: Path, record: dict[str, Any]) -> Path:
    """Store the MLflow run of a run folder's checkpoints (``run_id``, ``tracking_uri``, ``experiment_name``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_RECORD
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_run_record(checkpoint: Path) -> dict[str, Any] | None:
    """The MLflow run record of ``checkpoint`` (a file or sharded folder in ``<run_dir>/checkpoints``), or None."""
    path = Path(checkpoint).parent.parent / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def is_sharded(path: Path) -> bool:
    """A distributed (FSDP2) checkpoint folder: one ``.distcp`` file per rank, ``.metadata`` and ``meta.pt``."""
    return path.is_dir() and (path / ".metadata").is_file()


def consolidate_sharded(path: Path) -> dict[str, Any]:
    """A sharded FSDP2 checkpoint folder as the single checkpoint dict a single-device or DDP run loads.

    The shards are read whole in this process (no process group: every tensor at full size, on the CPU), the
    optimizer state is re-keyed from parameter names (FSDP2) to positions (``torch.optim``: parameters numbered
    in param-group order, as ``Optimizer.state_dict`` numbers them), and the rest of the checkpoint comes from
    ``meta.pt``. Memory: the full weights and optimizer state, so this is for models that fit one device.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    tensors: dict[str, Any] = {}
    _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    if "state_dict" not in tensors:
        raise ValueError(f"{path} is a distributed checkpoint without a state_dict (keys {sorted(tensors)}); it was not written by scail2-train")
    checkpoint["state_dict"] = tensors["state_dict"]
    optimizers = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_positional_optimizer_state(tensors[k]) for k in optimizers]
    return checkpoint


def _positional_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names -> keyed by position (``torch.optim.Optimizer`` layout)."""
    ids: dict[Any, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            ids.setdefault(name, len(ids))
            params.append(ids[name])
        groups.append({**group, "params": params})
    return {"state": {ids[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def checkpoint_step(path: Path) -> int:
    """The optimizer step a complete checkpoint was written at (read without loading its tensors)."""
    if is_sharded(path):
        meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    else:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(meta["global_step"])
# ---------------------------------------------------------------------------------------------- reproducibility
# What a resumed run needs to be equal, bit for bit, to an uninterrupted one, beyond the state a checkpoint holds
# (weights, optimizer, schedule, data position, noise generators) and the config: the numerical environment.
# The number of intra-op threads decides how CPU kernels split their reductions (matrix products, sums over a
# batch), so the same step computed with 1 and with 2 threads differs in the last bits; on GPU, non-deterministic
# kernels (atomics, cuBLAS workspaces) do the same unless `trainer.deterministic` is on.
RUNTIME_FORMAT = 1


def runtime_settings(trainer: Any) -> dict[str, Any]:
    """The settings of this process that a bit-exact resume depends on (stored with every checkpoint)."""
    device = trainer.strategy.root_device
    return {
        "format": RUNTIME_FORMAT,
        "torch": str(torch.__version__),  # a plain str: TorchVersion does not load with weights_only
        "device": device.type,
        "cuda": str(torch.version.cuda) if device.type == "cuda" else None,
        "intra_op_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "precision": str(trainer.precision),
        "world_size": int(trainer.world_size),
    }


# How to make each setting equal on resume.
_RUNTIME_FIX = {
    "torch": "install the torch version the checkpoint was written with",
    "device": "resume on the same kind of device",
    "cuda": "resume with the same CUDA build of torch",
    "intra_op_threads": "set threads={saved} or OMP_NUM_THREADS={saved}",
    "deterministic_algorithms": "set trainer.deterministic={saved}",
    "precision": "set trainer.precision={saved}",
}  # world_size is compared, with its own consequence (re-seeded noise streams), by the module


def runtime_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One message per setting that differs between the checkpoint's process and this one (empty if none)."""
    out = []
    for key, fix in _RUNTIME_FIX.items():
        if key in saved and saved[key] != current.get(key):
            out.append(f"{key}: checkpoint {saved[key]!r}, now {current.get(key)!r} ({fix.format(saved=saved[key])})")
    return out
