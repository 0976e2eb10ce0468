"""Callbacks, loggers and data modules the training tests inject from Python."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger


class LossRecorder(Callback):
    """The training loss of every batch, as Python floats."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]) if outputs is not None else float("nan"))


class StateAround(Callback):
    """Copies of the network and optimizer state just before and just after batch ``index``."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.module: Any = None

    def _state(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        return copy.deepcopy({"net": pl_module.net.state_dict(), "optim": trainer.optimizers[0].state_dict()})

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.module = pl_module
        if batch_idx == self.index:
            self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.index:
            self.after = self._state(trainer, pl_module)


class FixedBatches(L.LightningDataModule):
    """The first batch of ``inner`` repeated ``count`` times; with ``poison_at``, that batch's latents are
    replaced by ``poison`` (NaN or inf)."""

    def __init__(self, inner: L.LightningDataModule, count: int, poison_at: int | None = None, poison: float = float("nan")):
        super().__init__()
        self.inner, self.count, self.poison_at, self.poison = inner, count, poison_at, poison

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str) -> None:
        self.inner.setup(stage)

    def train_dataloader(self) -> "_Batches":
        first = next(iter(self.inner.train_dataloader()))
        batches = [first] * self.count
        if self.poison_at is not None:
            batches[self.poison_at] = replace(first, latents=torch.full_like(first.latents, self.poison))
        return _Batches(batches)


class _Batches:
    """One iterable of batches (Lightning reads a plain list as a list of data loaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical network weights and optimizer state."""
    assert a["net"].keys() == b["net"].keys()
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name, value in sa[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[i][name])), (i, name)


class FakeClock:
    """Stands for ``time.perf_counter``: advanced only by `ChargeForwards`, so durations are exact numbers."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ChargeForwards(Callback):
    """Every forward of the network advances the clock: 1 s in training mode, ``eval_seconds`` in eval mode
    (evaluations run the network in eval mode), so a step's true time is known and an evaluation is slow."""

    def __init__(self, clock: FakeClock, eval_seconds: float) -> None:
        self.clock, self.eval_seconds = clock, eval_seconds

    def on_train_start(self, trainer, pl_module) -> None:
        def charge(module, args, kwargs):
            self.clock.now += 1.0 if module.training else self.eval_seconds

        pl_module.net.register_forward_pre_hook(charge, with_kwargs=True)


class MemoryLogger(Logger):
    """Keeps every logged metric: {name: [(step, value), ...]}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))
