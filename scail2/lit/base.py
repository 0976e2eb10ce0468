"""The LightningModule base shared by pretraining and DPO: everything but the loss.

`SCAIL2Module` owns

- building the backbone in ``configure_model`` from its geometry (``net``, the `TransformerConfig` the ``model``
  group builds; `build_network`), under the strategy's device context; activation checkpointing, compilation,
  sequence parallelism and FSDP2 sharding applied from outside the model (`scail2.models.parallelize`, called by the strategy);
  optional initialisation from weights (any layout `scail2.models.load_transformer` reads, or Wan2.1-I2V);
- the optimizer and schedule from injected factories (``optimizer(params)``, ``scheduler(optimizer)``);
- a per-replica, seeded random generator for the objective (the ranks that share a sequence draw the same
  noise), saved and restored with every checkpoint so that a resumed run draws the same noise as an
  uninterrupted one;
- the non-finite guard: before any optimizer step, a non-finite loss or gradient norm either raises an error
  naming the step and the batch's sample ids and sources (``nonfinite="error"``) or drops the step's gradients
  so the weights and optimizer state stay untouched, counted in ``train/nonfinite_skips`` (``"skip"``);
- logging (loss, learning rate, gradient norm, skips), the FLOPs and token counts the throughput monitor needs
  (from `scail2.conditioning.packing.sequence_layout`) and export of the trained network;
- attaching its evaluations as callbacks (`configure_callbacks`): validation sampling
  (`scail2.lit.validation.SampleValidation`) when ``validation`` is set.

A subclass implements :meth:`compute_loss` (one batch and a generator -> `StepOutput`). The ``objective``
object (e.g. `FlowMatchingConfig`) is handed to it unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from scail2.conditioning.packing import SequenceLayout, sequence_layout
from scail2.data.batch import MotionBatch
from scail2.lit.checkpoint import runtime_differences, runtime_settings
from scail2.lit.validation import SampleValidation, ValidationConfig
from scail2.models.config import TransformerConfig
from scail2.models.scail2 import SCAIL2Transformer
from scail2.models.wan import WanModel

log = logging.getLogger(__name__)

NONFINITE_MODES: tuple[str, ...] = ("error", "skip")


@dataclass
class StepOutput:
    """What a subclass's loss computation returns for one batch."""

    loss: torch.Tensor  # () scalar to minimise
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra scalars logged as train/<name>


def build_network(config: TransformerConfig) -> WanModel:
    """A randomly initialised network of ``config``: a `SCAIL2Transformer` (mask channels), else a `WanModel`.
    Only constructs, under whatever device context the caller sets (the meta device for sharded starts)."""
    return SCAIL2Transformer(config) if config.is_scail2 else WanModel(config)


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for (seed, rank): ranks get unrelated streams from one config seed."""
    digest = hashlib.sha256(f"scail2:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SCAIL2Module(L.LightningModule):
    """Base module; see the module docstring.

    Args:
        net: the backbone's geometry, a `TransformerConfig` (or its fields; the ``model`` group builds one with
            `scail2.models.config.scail2_config`), built in configure_model as a `SCAIL2Transformer` (a `WanModel`
            when it has no mask channels); or a zero-argument factory of a `WanModel` / `SCAIL2Transformer`.
        objective: the loss settings, passed to :meth:`compute_loss` (e.g. `FlowMatchingConfig`).
        optimizer: ``optimizer(params) -> Optimizer`` (e.g. a partial of `torch.optim.AdamW`).
        scheduler: ``scheduler(optimizer) -> LRScheduler`` stepped every optimizer step, or None.
        init_from: weights to start from: a scail2 / Wan / diffusers / SAT checkpoint of the same geometry, or a
            Wan2.1-I2V checkpoint (converted with `scail2_from_wan_i2v`). None: random initialisation.
        activation_checkpointing: True (every block), False, k (every k-th block) or a list of block indices.
        compile: ``torch.compile`` every transformer block (inductor; on CPU it needs a C++ compiler).
        attention_backend: the attention kernel, "sdpa" (default), "flash3", "flash2" or "math"
            (`scail2.models.attention`).
        nonfinite: "error" (raise before the optimizer step) or "skip" (drop the step; weights untouched).
        max_consecutive_skips: in skip mode, raise after this many skipped steps in a row (diverged run).
        max_loss: a training loss above this counts as divergence, like a non-finite one (None: no bound).
        validation: when and how to draw validation samples (`ValidationConfig` or its fields); None: never.
        seed: seed of the initial weights and of the objective's per-rank generator (ranks derive their own).
    """

    def __init__(
        self,
        net: TransformerConfig | Mapping[str, Any] | Callable[[], WanModel],
        objective: Any,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer],
        scheduler: Callable[[Optimizer], Any] | None = None,
        init_from: str | None = None,
        activation_checkpointing: bool | int | list[int] = False,
        compile: bool = False,
        attention_backend: str = "sdpa",
        nonfinite: str = "error",
        max_consecutive_skips: int = 10,
        max_loss: float | None = None,
        validation: ValidationConfig | Mapping[str, Any] | None = ValidationConfig(),
        seed: int = 0,
    ):
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r}; use one of {NONFINITE_MODES}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips is {max_consecutive_skips}; need at least 1")
        if max_loss is not None and not (math.isfinite(max_loss) and max_loss > 0):
            raise ValueError(f"max_loss is {max_loss}; need a finite bound > 0, or None for no bound")
        if isinstance(net, Mapping):
            net = TransformerConfig.from_dict(dict(net))
        if not isinstance(net, TransformerConfig) and not callable(net):
            raise TypeError(f"net is a {type(net).__name__}; give a TransformerConfig or a zero-argument network factory")
        self.net_config = net if isinstance(net, TransformerConfig) else None
        self.net_factory = net if self.net_config is None else partial(build_network, net)
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.init_from = init_from
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self.attention_backend = attention_backend
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.max_loss = max_loss
        if isinstance(validation, Mapping):
            validation = ValidationConfig(**validation)
        self.validation = validation
        self.seed = seed
        # Built in configure_model, under the strategy's device / sharding context.
        self.net: WanModel | None = None
        self.generator: torch.Generator | None = None
        self.nonfinite_skips = 0
        self._consecutive_skips = 0
        self._step_batches: list[dict[str, Any]] = []  # loss and sample ids of the micro-batches of this step
        self._flops_cache: dict[tuple, float] = {}

    # ------------------------------------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the backbone and parallelize it: the strategy's mesh (sequence parallelism, FSDP2) with this
        module's activation checkpointing, compilation and attention kernel."""
        if self.net is not None:  # Lightning may call this more than once (e.g. with weight averaging)
            return
        from scail2.lit.strategies import MeshStrategy
        from scail2.models.parallelize import parallelize

        mesh = self._device_mesh
        # Sharded start from weights: build on the meta device, shard, then load; never a full copy per rank.
        meta = mesh is not None and self.init_from is not None
        # The initial weights are a function of the seed alone (not of whatever drew random numbers before, e.g.
        # data preparation), and the same on every rank.
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), torch.device("meta") if meta else contextlib.nullcontext():
            torch.manual_seed(self.seed)
            net = self.net_factory()
        if not isinstance(net, WanModel):
            raise TypeError(f"the net factory returned a {type(net).__name__}; it must build a WanModel / SCAIL2Transformer")
        settings = dict(
            activation_checkpointing=self.activation_checkpointing,
            compile=self.compile,
            attention_backend=self.attention_backend,
        )
        strategy = self.trainer.strategy
        if isinstance(strategy, MeshStrategy):
            strategy.parallelize(net, **settings)
        elif mesh is not None:
            raise TypeError(
                f"{type(strategy).__name__} hands the module a device mesh, but only scail2's strategies know how to "
                "shard SCAIL-2: use strategy=fsdp2 (scail2.lit.strategies.FSDP2Strategy)"
            )
        else:
            parallelize(net, **settings)
        if meta:
            net.to_empty(device=self.trainer.strategy.root_device)
        if self.init_from is not None:
            self._load_initial_weights(net, sharded=mesh is not None)
        self.net = net

    def _load_initial_weights(self, net: WanModel, sharded: bool) -> None:
        from scail2.lit.init import initial_state_dict

        if not sharded:
            from scail2.models.loading import load_into

            load_into(net, initial_state_dict(self.init_from, net.config))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Only global rank 0 reads the file; the shards are broadcast from it.
        state = initial_state_dict(self.init_from, net.config) if self.global_rank == 0 else {}
        set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def setup(self, stage: str) -> None:
        if stage == "fit":
            from lightning.pytorch.callbacks import WeightAveraging
            from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

            strategy = self.trainer.strategy
            sharded = isinstance(strategy, (ModelParallelStrategy, DeepSpeedStrategy))
            if sharded and any(isinstance(cb, WeightAveraging) for cb in self.trainer.callbacks):
                raise ValueError(
                    f"weight averaging (callbacks=ema) keeps a full unsharded copy of the model and does not work "
                    f"with {type(strategy).__name__}; use strategy=single or strategy=ddp, or drop the EMA callback"
                )
            if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and self.init_from is not None:
                raise ValueError(
                    "module.init_from with strategy=deepspeed_zero3: the parameters are partitioned while the "
                    "network is built, so full weights cannot be loaded into it here; use strategy=fsdp2 (which "
                    "loads on rank 0 and broadcasts the shards) or deepspeed_zero2"
                )
            if isinstance(strategy, DeepSpeedStrategy) and self.nonfinite == "skip":
                raise ValueError(
                    "module.nonfinite=skip drops gradients before the optimizer step, which DeepSpeed performs "
                    "itself; with a DeepSpeed strategy use module.nonfinite=error"
                )
        self.generator = torch.Generator().manual_seed(rank_seed(self.seed, self.data_parallel_rank))

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel replica: the ranks sharing a sequence read the same batch and noise."""
        from scail2.lit.strategies import data_parallel

        return data_parallel(self.trainer.strategy)[0]

    @property
    def sequence_parallel(self) -> int:
        """Ranks sharing each sequence (1 without sequence parallelism)."""
        from scail2.lit.strategies import sequence_parallel_size

        return sequence_parallel_size(self.trainer.strategy) if self._trainer is not None else 1

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        # The ranks of a sequence-parallel group hold the same loss and each computes its shard's share of the
        # gradients; the strategy averages gradients over all ranks, so the group's sum needs the factor sp
        # (scail2.models.sequence_parallel).
        sp = self.sequence_parallel
        super().backward(loss * sp if sp > 1 else loss, *args, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        assert self.net is not None, "configure_model runs before configure_optimizers"
        optimizer = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_callbacks(self) -> list[Callback]:
        """The evaluations this module runs between training steps (Lightning adds them to the trainer's)."""
        return [SampleValidation(self.validation)] if self.validation is not None else []

    # ------------------------------------------------------------------------------------------------ the step
    def compute_loss(self, batch: Any, generator: torch.Generator) -> StepOutput:
        """The objective on one batch with ``self.net`` and ``self.objective``, drawing its noise from
        ``generator`` (the training step passes ``self.generator``; evaluations pass fixed ones)."""
        raise NotImplementedError

    @staticmethod
    def motion_batch(batch: Any) -> MotionBatch:
        """The `MotionBatch` that carries shapes and sample ids (a preference batch's winner)."""
        return batch if isinstance(batch, MotionBatch) else batch.winner

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.generator is not None, "setup runs before training"
        out = self.compute_loss(batch, self.generator)
        mb = self.motion_batch(batch)
        self._step_batches.append(
            {"loss": out.loss.detach(), "ids": list(mb.meta.get("ids", [])) if mb.meta else [], "sources": list(mb.source)}
        )
        self.log("train/loss", out.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=mb.batch_size)
        for name, value in out.metrics.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, batch_size=mb.batch_size)
        return out.loss

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip by global norm (logged as ``train/grad_norm``) and run the non-finite guard.

        Runs after backward and before the optimizer step on every rank; the gradient norm is global (DDP
        averaged, FSDP2 reduced), and the local losses' finiteness is reduced across ranks, so every rank
        takes the same decision.
        """
        records, self._step_batches = self._step_batches, []
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=1)
        if gradient_clip_algorithm not in (None, "norm"):
            # Value clipping: Lightning's implementation, and the guard on the losses alone.
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            norm = torch.zeros((), device=self.device)
        else:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            max_norm = float(gradient_clip_val) if gradient_clip_val else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros((), device=self.device)
            norm = _full(norm)
            self.log("train/grad_norm", norm.detach(), on_step=True, on_epoch=False, batch_size=1)
        local_bad = any(self._bad_loss(r["loss"]) for r in records)
        bad = torch.tensor(float(local_bad), device=self.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() == 0 and torch.isfinite(norm).item():
            self._consecutive_skips = 0
            self.log("train/nonfinite_skips", float(self.nonfinite_skips), on_step=True, on_epoch=False, batch_size=1)
            return
        what = self._describe_nonfinite(records, norm)
        if self.nonfinite == "error":
            raise FloatingPointError(
                f"{what}. The optimizer step was not taken, so the weights are those of step {self.global_step}. "
                "Check these samples (scail2-data validate), lower the learning rate, or set module.nonfinite=skip "
                "to skip such steps (counted in train/nonfinite_skips)"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer skips parameters without gradients: no update, no state change
        self.nonfinite_skips += 1
        self._consecutive_skips += 1
        log.warning("skipping the optimizer step: %s (skips so far: %d)", what, self.nonfinite_skips)
        self.log("train/nonfinite_skips", float(self.nonfinite_skips), on_step=True, on_epoch=False, batch_size=1)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._consecutive_skips} optimizer steps in a row had non-finite values (last: {what}); the run "
                "has diverged. Resume from an earlier checkpoint with a lower learning rate"
            )

    def _bad_loss(self, loss: torch.Tensor) -> bool:
        """Non-finite, or above ``max_loss``."""
        value = float(loss)
        return not math.isfinite(value) or (self.max_loss is not None and value > self.max_loss)

    def _describe_nonfinite(self, records: list[dict[str, Any]], norm: torch.Tensor) -> str:
        step = self.global_step
        bad = [r for r in records if self._bad_loss(r["loss"])]
        if bad:
            losses = ", ".join(f"{float(r['loss']):g}" for r in bad)
            ids = [i for r in bad for i in r["ids"]]
            sources = sorted({s for r in bad for s in r["sources"]})
            finite = all(math.isfinite(float(r["loss"])) for r in bad)
            what = f"training loss above module.max_loss={self.max_loss:g}" if finite else "non-finite training loss"
            return (
                f"{what} ({losses}) at step {step} on rank {self.global_rank}; "
                f"batch sample ids {ids or 'unknown'}, sources {sources}"
            )
        ids = [i for r in records for i in r["ids"]]
        return (
            f"non-finite gradient norm ({float(norm):g}) at step {step} (this rank's losses were finite; "
            f"rank {self.global_rank} batch sample ids {ids or 'unknown'})"
        )

    # ------------------------------------------------------------------------------------------------ accounting
    def sequence_layout(self, batch: Any) -> SequenceLayout:
        """Tokens per sample of this batch's packed sequence, by segment."""
        mb = self.motion_batch(batch)
        assert self.net is not None
        _, _, t, h, w = mb.latents.shape
        return sequence_layout(t, h, w, self.net.config.patch_size, mb.cond.num_extra_references)

    def flops_per_batch(self, batch: Any) -> float:
        """Matmul FLOPs of the forward passes of one training step on this rank's batch (the model's own count;
        forward + backward is about 3x this); with sequence parallelism, this rank's share."""
        mb = self.motion_batch(batch)
        text_len, image_len = mb.cond.text.shape[1], mb.cond.clip_tokens.shape[1]
        key = (*mb.latents.shape, mb.cond.num_extra_references, text_len, image_len, type(batch).__name__)
        if key not in self._flops_cache:
            assert self.net is not None
            layout = self.sequence_layout(batch)
            flops = self.net.flops_per_forward(
                layout.total, text_len, image_len, batch=mb.batch_size, head_tokens=layout.video, mask_tokens=layout.mask_tokens
            )
            self._flops_cache[key] = flops * self.forward_passes_per_step() / self.sequence_parallel
        return self._flops_cache[key]

    def training_flops_per_batch(self, batch: Any) -> float:
        """Matmul FLOPs of one training step on this rank's batch, forward and backward: 3x the forward (the
        backward computes input and weight gradients, 2x the forward each)."""
        return 3.0 * self.flops_per_batch(batch)

    def forward_passes_per_step(self) -> int:
        """Model forward passes per batch in one training step (1; DPO runs policy and reference twice)."""
        return 1

    def tokens_per_batch(self, batch: Any) -> float:
        """Sequence tokens the backbone processes for this rank's batch (reference, video and driving); with
        sequence parallelism, this rank's share."""
        return self.motion_batch(batch).batch_size * self.sequence_layout(batch).total / self.sequence_parallel

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's generator state (gathered: only rank 0 writes the file) and the skip counter."""
        assert self.generator is not None
        state = self.generator.get_state().to(torch.int32)  # gather-friendly dtype; the bytes are unchanged
        world = self.trainer.world_size
        if world > 1:
            states = self.all_gather(state.to(self.device)).reshape(world, -1).cpu()
        else:
            states = state[None]
        checkpoint["scail2"] = {
            "format": 1,
            "generator_states": states,  # (world_size, N) int32
            "world_size": world,
            "sequence_parallel": self.sequence_parallel,
            "seed": self.seed,
            "nonfinite_skips": self.nonfinite_skips,
            "runtime": runtime_settings(self.trainer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "scail2" not in checkpoint:
            log.warning("the checkpoint has no scail2 state (generator, skip counter): the noise stream restarts")
            return
        info = checkpoint["scail2"]
        self.nonfinite_skips = int(info["nonfinite_skips"])
        self._check_runtime(info.get("runtime"))
        world = self.trainer.world_size
        same_layout = int(info["world_size"]) == world and int(info.get("sequence_parallel", 1)) == self.sequence_parallel
        if same_layout:
            state = info["generator_states"][self.global_rank].to(torch.uint8)
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state)
        else:
            # Another world size or sequence-parallel layout: per-rank streams cannot continue (and the ranks of a
            # sequence group must agree); derive new ones per replica from the step.
            step = int(checkpoint["global_step"])
            seed = rank_seed(self.seed * 1_000_003 + step, self.data_parallel_rank)
            self.generator = torch.Generator().manual_seed(seed)
            log.warning(
                "checkpoint written with world size %s and sequence parallel %s, resuming with %s and %s: the "
                "objective's noise streams are re-seeded from the step, so losses differ from an uninterrupted run",
                info["world_size"],
                info.get("sequence_parallel", 1),
                world,
                self.sequence_parallel,
            )

    def _check_runtime(self, saved: dict[str, Any] | None) -> None:
        """Warn, naming both values, for every setting that makes this resume differ from an uninterrupted run."""
        if saved is None:
            log.warning("the checkpoint does not record its process settings (thread count, precision, ...): "
                        "whether this resume is bit-exact cannot be checked")
            return
        differences = runtime_differences(saved, runtime_settings(self.trainer))
        if differences and self.global_rank == 0:
            log.warning(
                "resuming with other settings than the checkpoint was written with; the run continues, but its "
                "losses and weights will differ (in the last bits or more) from an uninterrupted run:\n  %s",
                "\n  ".join(differences),
            )

    # ------------------------------------------------------------------------------------------------ export
    def export(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path | None:
        """Write the trained network with `scail2.models.save_pretrained` (the layout inference loads).

        Call on every rank: a sharded network is gathered first. Returns the folder on global rank 0, else None.
        """
        from scail2.models.loading import build_model, save_pretrained

        assert self.net is not None
        if self._device_mesh is None:
            return save_pretrained(self.net, folder, dtype=dtype) if self.global_rank == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return None
        plain = build_model(self.net.config, device="meta")
        # The gathered tensors can be views into one flat buffer; safetensors needs each to own its storage.
        plain.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
        return save_pretrained(plain, folder, dtype=dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (FSDP2's global gradient norm) as a plain tensor."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
