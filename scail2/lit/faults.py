"""Faults that end a run: a stop signal, a checkpoint that cannot be trusted, the run a checkpoint belongs to.

- `StopCheckpoint`: on SIGTERM (what schedulers send before a kill) Lightning lets the running optimizer step
  finish and raises `SIGTERMException` before the next one; this callback then writes one complete checkpoint
  of that step (``step=NNNNNNN.ckpt`` beside the periodic ones, so ``ckpt_path=last`` picks it).
  `scail2.train.train` marks the MLflow run KILLED, prints where to resume and raises `TrainingStopped`;
  the command line exits with `EXIT_SIGTERM` (143, the shell's code for a SIGTERM death).
- `RunIdentity`: every checkpoint records the run name and the MLflow run id it belongs to, so that a resumed
  run appends only to that MLflow run (a run folder copied under another ``run_name`` starts a new one).
- `inspect_checkpoint`: opens a checkpoint (``torch.load(weights_only=True)``, memory-mapped: tensors are not
  read) and says why it cannot be resumed from, if it cannot (truncated, not a checkpoint, no step).
- `nonfinite_tensors`: the non-finite floating tensors of a checkpoint's weights and optimizer state, which
  `scail2.lit.checkpoint.AtomicCheckpointIO` refuses to write.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("scail2.train")

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM
RUN_KEY = "scail2_run"  # the checkpoint entry naming the run: {"run_name", "run_id", "tracking_uri"}


class TrainingStopped(RuntimeError):
    """Training stopped by a signal after writing ``checkpoint`` (None when no step had been taken)."""

    def __init__(self, message: str, checkpoint: Path | None, global_step: int, exit_code: int = EXIT_SIGTERM):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.global_step = global_step
        self.exit_code = exit_code


class RunIdentity(Callback):
    """Records ``run_name`` and the MLflow run (id and store) in every checkpoint, under `RUN_KEY`."""

    def __init__(self, run_name: str, run_id: str | None = None, tracking_uri: str | None = None):
        self.record = {"run_name": run_name, "run_id": run_id, "tracking_uri": tracking_uri}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_KEY] = dict(self.record)


class StopCheckpoint(Callback):
    """Writes one checkpoint of the last finished step when Lightning stops training on SIGTERM.

    ``dirpath``: the checkpoint folder (the periodic checkpoints'); the file is ``step=NNNNNNN.ckpt`` and
    ``last.ckpt`` (when it is a link) is pointed at it. ``written`` is its path afterwards (None before a
    signal, or when no optimizer step had been taken: there is nothing to resume then).
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.written: Path | None = None
        self.stopped = False

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):
            return
        self.stopped = True
        step = trainer.global_step
        if step == 0:
            return
        from scail2.lit.checkpoint import NonFiniteCheckpoint

        path = self.dirpath / f"step={step:07d}.ckpt"
        if not (path.exists() and inspect_checkpoint(path) is None):  # a periodic save of this step is reused
            try:
                trainer.save_checkpoint(str(path), weights_only=False)
            except NonFiniteCheckpoint as exc:
                log.error("%s", exc)
                return
        if trainer.is_global_zero:
            last = self.dirpath / "last.ckpt"
            if last.is_symlink() or not last.exists():
                tmp = self.dirpath / f".last.ckpt.{os.getpid()}.link"
                tmp.unlink(missing_ok=True)
                os.symlink(path.name, tmp)
                os.replace(tmp, last)
        self.written = path


# ------------------------------------------------------------------------------------------------ checks
def inspect_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it can.

    A file must load with ``torch.load(weights_only=True)`` (memory-mapped: a truncated file fails at once, the
    tensors themselves are not read) and hold a ``global_step``; a sharded folder needs its metadata (``meta.pt``
    that loads the same way, and ``.metadata``).
    """
    from scail2.lit.checkpoint import SHARDED_META

    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return f"sharded checkpoint folder {path} has no .metadata (an interrupted save)"
        target = path / SHARDED_META
        if not target.is_file():
            return f"sharded checkpoint folder {path} has no {SHARDED_META} (an interrupted save)"
    else:
        target = path
    if not target.is_file() or target.stat().st_size == 0:
        return f"{target} is missing or empty"
    try:
        data = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, pickled objects, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{target} cannot be read as a checkpoint ({type(exc).__name__}: {first[:200]})"
    if not isinstance(data, Mapping) or "global_step" not in data:
        return f"{target} is not a training checkpoint (no global_step)"
    return None


def checkpoint_run(path: str | Path) -> dict[str, Any] | None:
    """The run record (`RUN_KEY`) a checkpoint holds, or None (older checkpoints, unreadable ones)."""
    from scail2.lit.checkpoint import SHARDED_META

    path = Path(path)
    target = path / SHARDED_META if path.is_dir() else path
    try:
        data = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - checked by inspect_checkpoint before
        return None
    record = data.get(RUN_KEY) if isinstance(data, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def _float_tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield where, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _float_tensors(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _float_tensors(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        yield where, torch.tensor(value)


def nonfinite_tensors(checkpoint: Mapping[str, Any], limit: int = 3) -> list[str]:
    """Up to ``limit`` descriptions (``state_dict['net.x']: 12 of 4096 values non-finite``) of non-finite
    tensors in the weights (``state_dict``) and optimizer state (``optimizer_states``) of a checkpoint."""
    found: list[str] = []
    for key in ("state_dict", "optimizer_states"):
        for where, tensor in _float_tensors(checkpoint.get(key), key):
            local = getattr(tensor, "to_local", None)  # a DTensor: this rank's shard
            data = local() if callable(local) else tensor
            bad = int((~torch.isfinite(data.detach())).sum())
            if bad:
                found.append(f"{where}: {bad} of {data.numel()} values non-finite")
                if len(found) >= limit:
                    return found
    return found


# ------------------------------------------------------------------------------------------------ the MLflow run
def resume_record(checkpoint: Path, run_name: str, tracking_uri: str | None) -> dict[str, Any] | None:
    """The MLflow run a resumed run continues: the one the checkpoint records, if it is of ``run_name``, in the
    same store and still there; else None (a new MLflow run), with a warning saying why.

    The checkpoint's own record (`RUN_KEY`) decides; checkpoints written before it existed fall back to the
    ``mlflow_run.json`` of their run folder. A run folder copied under another ``run_name`` thus never appends
    to the original run.
    """
    from scail2.lit.checkpoint import read_run_record

    own = checkpoint_run(checkpoint)
    if own is None:
        folder = read_run_record(checkpoint) or {}
        own = {"run_name": folder.get("experiment_name"), "run_id": folder.get("run_id"), "tracking_uri": folder.get("tracking_uri")}
    name, run_id, uri = own.get("run_name"), own.get("run_id"), own.get("tracking_uri")
    if run_id is None:
        return None
    if name != run_name:
        log.warning(
            "the checkpoint %s belongs to run_name=%s (MLflow run %s), not to run_name=%s: starting a new MLflow run "
            "(the original run is left as it is)", checkpoint, name, run_id, run_name,
        )
        return None
    if tracking_uri is not None and uri is not None and uri != tracking_uri:
        log.warning(
            "the checkpoint's MLflow run %s is in the store %s, not in %s: starting a new MLflow run", run_id, uri, tracking_uri
        )
        return None
    if tracking_uri is not None:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
        except Exception as exc:  # noqa: BLE001 - a deleted run, another store, an unreachable server
            log.warning("the checkpoint's MLflow run %s cannot be continued (%s): starting a new MLflow run", run_id, exc)
            return None
        if experiment != run_name:
            log.warning(
                "the checkpoint's MLflow run %s is in the experiment %r, not %r: starting a new MLflow run",
                run_id, experiment, run_name,
            )
            return None
    return {"run_id": run_id, "tracking_uri": uri, "experiment_name": name}


def resume_command(ckpt: str = "last") -> str:
    """The command line that continues this run: its overrides (when Hydra started it) with ``ckpt_path``."""
    import shlex

    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not started by Hydra (train() from Python)
        return f"the same config with ckpt_path={ckpt}"
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return "scail2-train " + " ".join(shlex.quote(o) for o in [*kept, f"ckpt_path={ckpt}"])


def stopped(trainer: Any, stop: StopCheckpoint, run_id: str | None) -> TrainingStopped:
    """After Lightning stopped on SIGTERM: mark the MLflow run KILLED; the error saying where to resume."""
    from lightning.pytorch.loggers import MLFlowLogger

    step = trainer.global_step
    lines = [f"Training stopped by SIGTERM after step {step}."]
    if trainer.is_global_zero and run_id is not None and isinstance(trainer.logger, MLFlowLogger):
        try:
            trainer.logger.experiment.set_terminated(run_id, "KILLED")
            lines.append(f"MLflow run {run_id} marked KILLED.")
        except Exception as exc:  # noqa: BLE001 - a server that went away must not hide the checkpoint's path
            lines.append(f"MLflow run {run_id} could not be marked KILLED ({exc}).")
    if stop.written is not None:
        lines.append(f"Checkpoint of step {step}: {stop.written}")
        lines.append(f"Resume with: {resume_command()}")
    else:
        lines.append("No optimizer step had been taken, so there is nothing to resume: run the same command again.")
    return TrainingStopped("\n".join(lines), stop.written, step)
