"""Callbacks of the ``callbacks`` config group: throughput and MFU, data skip counters, progress output."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar

from scail2.lit.evaluation import evaluation_seconds

log = logging.getLogger("scail2.train")


class ThroughputMonitor(Callback):
    """Logs ``perf/samples_per_s``, ``perf/tokens_per_s``, ``perf/step_time_s`` and, with ``peak_flops``,
    ``perf/tflops_per_device`` and ``perf/mfu``.

    Averages over the last ``window`` batches. A batch's time runs from the end of the previous batch to its own
    end (data loading included), less the time evaluations spent in between (validation sampling, held-out
    pairs: every `scail2.lit.evaluation.Evaluation` reports its time in ``seconds``). FLOPs are the
    model's own count for the batch shape (`SCAIL2Module.training_flops_per_batch`: forward + backward, 3x the
    forward for pretraining); activation recomputation is not counted (MFU, not hardware utilisation).

    Args:
        peak_flops: peak dense FLOP/s of one device in the training precision (e.g. 989e12 for an H100 SXM in
            bf16); None: no MFU.
        window: batches averaged.
    """

    def __init__(self, peak_flops: float | None = None, window: int = 20):
        if window < 1:
            raise ValueError(f"window is {window}; need at least 1")
        self.peak_flops = peak_flops
        self.window = window
        self._times: deque[tuple[float, int, int, float]] = deque(maxlen=window)
        # Clock and evaluation time at the start of the current batch, and at the end of the previous one.
        self._start: tuple[float, float] | None = None
        self._prev_end: tuple[float, float] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._times.clear()
        self._prev_end = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._prev_end is None:
            self._start = (time.perf_counter(), evaluation_seconds(trainer))
        else:
            self._start = self._prev_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        end = (time.perf_counter(), evaluation_seconds(trainer))
        assert self._start is not None
        # Evaluations between the two points (in this batch's hooks or the previous one's) are not training time.
        elapsed = (end[0] - self._start[0]) - (end[1] - self._start[1])
        world = trainer.world_size
        # Ranks that share a sequence (sequence parallelism) read the same samples: count data-parallel replicas.
        replicas = (trainer.distributed_sampler_kwargs or {"num_replicas": world})["num_replicas"]
        mb = pl_module.motion_batch(batch)
        self._times.append(
            (elapsed, mb.batch_size * replicas, pl_module.tokens_per_batch(batch) * world, pl_module.training_flops_per_batch(batch))
        )
        self._prev_end = end
        seconds = sum(t[0] for t in self._times)
        if seconds <= 0:
            return
        metrics = {
            "perf/samples_per_s": sum(t[1] for t in self._times) / seconds,
            "perf/tokens_per_s": sum(t[2] for t in self._times) / seconds,
            "perf/step_time_s": seconds / len(self._times),
        }
        flops_per_s = sum(t[3] for t in self._times) / seconds  # this device's model FLOP/s
        metrics["perf/tflops_per_device"] = flops_per_s / 1e12
        if self.peak_flops:
            metrics["perf/mfu"] = flops_per_s / self.peak_flops
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "perf/samples_per_s", batch_size=1)


class DataSkipMonitor(Callback):
    """Logs the data module's skip counters (``skip_counts()``: samples replaced because their files were
    missing, unreadable, too short ...) as ``data/skipped/<source>/<reason>`` and ``data/skipped_total`` every
    ``every_n_steps`` steps (global rank 0's loader; every rank counts its own draws)."""

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps is {every_n_steps}; need at least 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero or trainer.datamodule is None:
            return
        counts_fn = getattr(trainer.datamodule, "skip_counts", None)
        if counts_fn is None:
            return
        counts = counts_fn()
        metrics = {f"data/skipped/{src}/{reason}": float(n) for src, reasons in counts.items() for reason, n in reasons.items()}
        metrics["data/skipped_total"] = float(sum(n for reasons in counts.values() for n in reasons.values()))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class LogLineProgress(ProgressBar):
    """Progress as plain log lines (for logs, CI and batch jobs), one every ``every_n_steps`` steps:
    ``step 120/600 (20%) | train/loss 0.5123 | perf/samples_per_s 35.2 | 0:00:41 elapsed, eta 0:02:44``."""

    def __init__(self, every_n_steps: int = 10):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps is {every_n_steps}; need at least 1")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._t0 = 0.0
        self._step0 = 0
        self._last = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not self._enabled or not trainer.is_global_zero or step == self._last:
            return
        if step % self.every_n_steps and step != total:
            return
        self._last = step
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total > 0 else f"step {step}"]
        for name, value in self.get_metrics(trainer, pl_module).items():
            if name != "v_num":
                parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        timing = f"{timedelta(seconds=round(elapsed))} elapsed"
        if total > 0 and done > 0:
            timing += f", eta {timedelta(seconds=round(elapsed / done * (total - step)))}"
        parts.append(timing)
        log.info(" | ".join(parts))


def progress_bar(style: str = "auto", refresh_rate: int = 1, every_n_steps: int = 10) -> ProgressBar:
    """A rich progress bar in a terminal, plain periodic log lines otherwise (``style`` "auto"), or forced
    with ``style`` "rich" / "lines"."""
    if style not in ("auto", "rich", "lines"):
        raise ValueError(f"progress style {style!r}; use auto, rich or lines")
    if style == "rich" or (style == "auto" and sys.stdout.isatty()):
        return RichProgressBar(refresh_rate=refresh_rate)
    return LogLineProgress(every_n_steps)
