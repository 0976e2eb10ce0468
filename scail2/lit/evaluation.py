"""Evaluations between training steps, and the one channel through which they report their time.

An evaluation (validation sampling, `scail2.lit.validation.SampleValidation`; held-out preference pairs,
`scail2.lit.heldout.HeldOutPreferences`) is a Lightning callback deriving from `Evaluation`. It runs its
measurement inside :meth:`Evaluation.timed`, which adds the wall time to ``seconds``; `evaluation_seconds` sums
that over a trainer's evaluations. `scail2.lit.callbacks.ThroughputMonitor` subtracts what this total grew by
during a step from the step's time, so ``perf/step_time_s`` and ``perf/mfu`` count training alone, whichever
evaluation ran and in whichever hook.

The modules attach their evaluations themselves (`SCAIL2Module.configure_callbacks`), built from their
``validation`` / ``heldout`` arguments. Each evaluation keeps ``history``, one entry per evaluation of this run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class Evaluation(Callback):
    """Base of the callbacks that measure the model between training steps.

    ``seconds``: wall time spent in :meth:`timed` so far; ``history``: what each evaluation measured;
    ``last_step``: the global step of the latest evaluation (-1: none yet), so that a step is never evaluated
    twice.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.history: list[Any] = []
        self.last_step = -1

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the wall time of the block in ``seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    @staticmethod
    def one_process_only(trainer: Any, what: str) -> str | None:
        """For evaluations that sample the whole network on one rank: None in a one-process run; in a run of
        more processes, why ``what`` is not run (warned once, on rank 0), for the caller to keep and report."""
        if trainer.world_size <= 1:
            return None
        why = f"not run: it samples in one process, and this run has {trainer.world_size}"
        if trainer.global_rank == 0:
            log.warning("%s %s", what, why)
        return why

    @staticmethod
    def publish(trainer: Any, what: str, metrics: dict[str, float]) -> None:
        """On global rank 0: a log line ``<what> at step N: ...`` and ``metrics`` to every logger at this step."""
        if trainer.global_rank != 0:
            return
        step = trainer.global_step
        log.info("%s at step %d: %s", what, step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


@contextmanager
def model_in_eval(trainer: Any, net: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``net`` in eval mode under the trainer's precision (autocast for mixed precision, as the training step
    runs it); its mode is restored afterwards."""
    was_training = net.training
    net.eval()
    try:
        with trainer.precision_plugin.forward_context():
            yield net
    finally:
        net.train(was_training)


def evaluation_seconds(trainer: Any) -> float:
    """Seconds the trainer's evaluations (`Evaluation` callbacks) have spent so far, all of them together."""
    return sum(cb.seconds for cb in trainer.callbacks if isinstance(cb, Evaluation))


def evaluation_history(trainer: Any, kind: type[Evaluation]) -> list[Any]:
    """The ``history`` of the trainer's evaluation of type ``kind`` ([] when it has none)."""
    return [entry for cb in trainer.callbacks if isinstance(cb, kind) for entry in cb.history]
