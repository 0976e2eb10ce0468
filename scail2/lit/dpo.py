"""Bias-Aware DPO post-training (SPEC §7): the base module with LoRA adapters and the DPO step.

The backbone is built (and initialised from the pretrained weights) by the base module, then frozen, and peft
LoRA adapters are injected (rank 128 on ``self_attn``/``cross_attn`` q/k/v/o and ``ffn.0``/``ffn.2`` of every
block by default). The reference model of the DPO loss is the same network with its adapters disabled, so no
second copy is held. Logged per step: ``train/loss``, ``train/dpo_loss``, ``train/sft_loss``,
``train/implicit_accuracy``, ``train/reward_margin`` and the winner/loser errors of policy and reference.

Validation measures the implicit accuracy and the DPO loss on held-out preference pairs (a fixed set drawn
from ``heldout``, a preference dataset the training run never samples), before and after training.
Export writes the adapters (peft layout and a ComfyUI file) and the merged network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.data.batch import PreferenceBatch
from scail2.lit.base import SCAIL2Module, StepOutput
from scail2.lora import LoRASpec, adapters_disabled, add_lora, merge_lora, save_lora
from scail2.objectives.dpo import DPOConfig, dpo_loss, model_velocity

log = logging.getLogger(__name__)


_FROZEN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_MIXED = ("bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class HeldOutConfig:
    """Held-out preference pairs for validation: a cache folder or a manifest (+ encoders); neither: the data
    module's own held-out set when it has one (``heldout_cache_dir``, e.g. ``data=synthetic_preference``), else
    no held-out evaluation."""

    cache_dir: str | None = None
    manifest: str | None = None
    encoders_root: str | None = None
    num_pairs: int | None = 16  # distinct pairs measured (a seeded choice); None: every pair of the set
    batch_size: int = 4
    seed: int = 4321
    # Noise / timestep draws per pair: the implicit accuracy of one draw is a coin flip weighted by a small
    # margin, so each pair is scored under several fixed draws (the same ones at every evaluation).
    draws: int = 4
    every_n_steps: int | None = None  # also evaluate every n optimizer steps (always before and after training)
    training_pairs: bool = False  # also measure num_pairs of the training pairs (``trainpairs/*``)

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"heldout.every_n_steps is {self.every_n_steps}; need at least 1 (or null)")
        for name in ("num_pairs", "batch_size", "draws"):
            if (name != "num_pairs" or self.num_pairs is not None) and getattr(self, name) < 1:
                raise ValueError(f"heldout.{name} is {getattr(self, name)}; need at least 1")


class DPOModule(SCAIL2Module):
    """``objective``: a `DPOConfig` (or its fields); ``lora``: a `LoRASpec` (or its fields); ``heldout``: a
    `HeldOutConfig` (or its fields; without a cache_dir or manifest there is no held-out evaluation);
    ``frozen_dtype``: "bfloat16" / "float16" stores the frozen backbone in half precision (with
    ``trainer.precision`` bf16-mixed / 16-mixed; None keeps the training dtype). The other arguments are
    `SCAIL2Module`'s; ``init_from`` should be the pretrained model the adapters post-train."""

    def __init__(
        self,
        *args: Any,
        lora: LoRASpec | Mapping[str, Any] = LoRASpec(),
        heldout: HeldOutConfig | Mapping[str, Any] | None = HeldOutConfig(),
        frozen_dtype: str | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("validation", None)  # the base's sampling validation needs motion data
        super().__init__(*args, **kwargs)
        self.lora = lora if isinstance(lora, LoRASpec) else LoRASpec(**lora)
        if isinstance(heldout, Mapping):
            heldout = HeldOutConfig(**heldout)
        if heldout is not None and heldout.manifest is not None and heldout.cache_dir is None and heldout.encoders_root is None:
            raise ValueError("heldout.manifest needs heldout.encoders_root (or give heldout.cache_dir, a preference cache)")
        self.heldout = heldout
        if frozen_dtype is not None and frozen_dtype not in _FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype={frozen_dtype!r}; use one of {sorted(_FROZEN_DTYPES)} or null")
        self.frozen_dtype = frozen_dtype
        self._heldout_batches: dict[str, list[PreferenceBatch]] | None = None
        self.heldout_history: list[dict[str, float]] = []
        self._last_heldout_step = -1

    def configure_model(self) -> None:
        if self.net is not None:
            return
        if self._device_mesh is not None:
            raise ValueError("DPO with LoRA runs with strategy=single or strategy=ddp (the frozen backbone is not sharded)")
        super().configure_model()
        assert self.net is not None
        for p in self.net.parameters():
            p.requires_grad_(False)
            if self.frozen_dtype is not None and p.is_floating_point():
                # The frozen backbone in half precision: half the memory of a replicated (DDP) base; the
                # adapters, added next, stay in float32 for the optimizer.
                p.data = p.data.to(_FROZEN_DTYPES[self.frozen_dtype])
        add_lora(self.net, self.lora)
        if self.frozen_dtype is not None:
            for name, p in self.net.named_parameters():
                if "lora_" in name:  # peft creates them in the base layer's dtype
                    p.data = p.data.float()

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision) if self._trainer is not None else None
        if self.frozen_dtype is not None and precision is not None and precision not in _MIXED:
            raise ValueError(
                f"module.frozen_dtype={self.frozen_dtype} needs mixed precision (trainer.precision bf16-mixed or "
                f"16-mixed: the adapters and activations meet the half-precision weights under autocast); the "
                f"trainer runs {precision}. Set trainer.precision=bf16-mixed or module.frozen_dtype=null"
            )
        if isinstance(self.objective, Mapping):
            self.objective = DPOConfig(**self.objective)
        if not isinstance(self.objective, DPOConfig):
            raise TypeError(f"DPOModule needs a DPOConfig objective, got {type(self.objective).__name__}")
        self._heldout_source()
        super().setup(stage)

    def _heldout_source(self) -> None:
        """Without a held-out cache or manifest, take the data module's held-out set if it has one (logged)."""
        h = self.heldout
        if h is None or h.cache_dir is not None or h.manifest is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        found = getattr(dm, "heldout_cache_dir", None)
        if found is None:
            log.info("no held-out preference pairs (module.heldout.cache_dir / manifest unset): no held-out metrics")
            self.heldout = None
            return
        log.info("held-out pairs: the data module's held-out set %s", found)
        self.heldout = dataclasses.replace(h, cache_dir=str(found))

    def forward_passes_per_step(self) -> int:
        return 4  # policy and reference, each on winner and loser

    def training_flops_per_batch(self, batch: Any) -> float:
        """The 4 forwards (policy and reference on winner and loser) plus the policy's backward on both, which
        computes input gradients only through the frozen weights (about 1x its forward; the adapters' weight
        gradients are negligible): 6 forward-equivalents = 1.5x the forwards."""
        return 1.5 * self.flops_per_batch(batch)

    def reference(self):
        """The reference of the DPO loss: the pre-DPO network, i.e. this network with its adapters disabled."""
        assert self.net is not None
        return model_velocity(self.net, within=adapters_disabled)

    def compute_loss(self, batch: PreferenceBatch) -> StepOutput:
        assert self.net is not None and self.generator is not None
        out = dpo_loss(self.net, batch, self.generator, self.objective, reference=self.reference())
        return StepOutput(
            out.loss,
            {
                "dpo_loss": out.dpo_loss,
                "sft_loss": out.sft_loss,
                "implicit_accuracy": out.implicit_accuracy,
                "reward_margin": out.reward_margin,
                "err_policy_w": out.err_policy_w.mean(),
                "err_policy_l": out.err_policy_l.mean(),
                "err_ref_w": out.err_ref_w.mean(),
                "err_ref_l": out.err_ref_l.mean(),
            },
        )

    # ------------------------------------------------------------------------------------------------ held-out
    def _fixed_batches(self, cache_dir: Any, manifest: Any, encoders_root: Any, what: str) -> list[PreferenceBatch]:
        """``heldout.num_pairs`` distinct pairs of a preference set (all of them when it is None), chosen once by
        a permutation seeded with ``heldout.seed``, in batches of one bucket each. A pair that cannot be read is
        an error here, not replaced by another: the measured set is exactly the named one."""
        from scail2.data.preference_data import PreferenceDataModule, collate_preferences
        from scail2.data.sampling import SampleKey

        h = self.heldout
        assert h is not None
        dataset = PreferenceDataModule(
            manifest=manifest, cache_dir=cache_dir, encoders_root=encoders_root, num_workers=0, seed=h.seed
        ).build_dataset()
        available = len(dataset)
        wanted = available if h.num_pairs is None else h.num_pairs
        if wanted > available:
            raise ValueError(
                f"module.heldout.num_pairs is {h.num_pairs} but the {what} set ({cache_dir or manifest}) has "
                f"{available} pairs; lower num_pairs (null measures all of them) or build more pairs"
            )
        chosen = np.random.default_rng(h.seed).permutation(available)[:wanted]
        by_bucket: dict[Any, list[int]] = {}
        for item in chosen.tolist():
            by_bucket.setdefault(dataset.item_buckets[item], []).append(item)
        null_text = dataset.null_text()
        batches = []
        for items in by_bucket.values():
            for start in range(0, len(items), h.batch_size):
                samples = []
                for item in items[start : start + h.batch_size]:
                    sample = dataset[SampleKey(item, h.seed)]
                    if sample.skips:
                        raise RuntimeError(
                            f"{what} pair {dataset.item_name(item)} could not be read ({sample.skips}); run "
                            "`scail2-data validate` on it or remove it from the set"
                        )
                    samples.append(sample)
                batch = collate_preferences(samples)
                batch.winner.null_text = null_text
                batches.append(batch)
        return batches

    def _evaluation_sets(self) -> dict[str, list[PreferenceBatch]]:
        if self._heldout_batches is None:
            h = self.heldout
            assert h is not None
            sets = {"heldout": self._fixed_batches(h.cache_dir, h.manifest, h.encoders_root, "held-out")}
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if h.training_pairs and dm is not None and hasattr(dm, "cache_dir") and hasattr(dm, "manifest"):
                # The same measurement on pairs the run trains on: whether the optimisation itself works.
                sets["trainpairs"] = self._fixed_batches(
                    dm.cache_dir, dm.manifest, getattr(dm, "encoders_root", None), "training"
                )
            self._heldout_batches = sets
        return self._heldout_batches

    @torch.no_grad()
    def heldout_metrics(self) -> dict[str, float]:
        """Implicit accuracy, DPO loss and reward margin on the held-out pairs (``heldout/*``; with
        ``heldout.training_pairs`` also on as many training pairs, ``trainpairs/*``), averaged over
        ``heldout.draws`` fixed noise / timestep draws per pair."""
        sets = self._evaluation_sets()
        assert self.net is not None and self.heldout is not None
        was_training = self.net.training
        self.net.eval()
        metrics: dict[str, float] = {}
        # Under the trainer's precision (autocast for mixed precision), as the training step runs.
        precision = self.trainer.precision_plugin.forward_context() if self._trainer is not None else contextlib.nullcontext()
        try:
            with precision:
                self._measure(sets, metrics)
        finally:
            self.net.train(was_training)
        return self._record(metrics)

    def _measure(self, sets: dict[str, list[PreferenceBatch]], metrics: dict[str, float]) -> None:
        assert self.net is not None and self.heldout is not None
        for name, batches in sets.items():
            acc, loss, margin, n = 0.0, 0.0, 0.0, 0
            for i, batch in enumerate(batches):
                batch = batch.to(self.device)
                for d in range(self.heldout.draws):
                    g = torch.Generator().manual_seed(self.heldout.seed + 100_003 * d + i)
                    out = dpo_loss(self.net, batch, g, self.objective, reference=self.reference())
                    b = batch.batch_size
                    acc += float(out.implicit_accuracy) * b
                    loss += float(out.dpo_loss) * b
                    margin += float(out.reward_margin) * b
                    n += b
            metrics.update({f"{name}/implicit_accuracy": acc / n, f"{name}/dpo_loss": loss / n, f"{name}/reward_margin": margin / n})

    def _record(self, metrics: dict[str, float]) -> dict[str, float]:
        self.heldout_history.append({"step": float(self.global_step), **metrics})
        self._last_heldout_step = self.global_step
        if self.global_rank == 0:
            log.info("held-out at step %d: %s", self.global_step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
        return metrics

    def on_train_start(self) -> None:
        if self.heldout is not None and not self.trainer.fast_dev_run and self.global_step == 0:
            self.heldout_metrics()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        h = self.heldout
        if h is None or h.every_n_steps is None or self.trainer.fast_dev_run:
            return
        step = self.global_step
        if step % h.every_n_steps == 0 and step != self.trainer.max_steps and self._last_heldout_step != step:
            self.heldout_metrics()

    def on_train_end(self) -> None:
        if self.heldout is not None and not self.trainer.fast_dev_run and self._last_heldout_step != self.global_step:
            self.heldout_metrics()

    # ------------------------------------------------------------------------------------------------ export
    def export(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path | None:
        """``folder/lora`` (peft layout), ``folder/lora_comfyui.safetensors`` and ``folder/merged`` (the merged
        network in the layout inference loads). Returns the folder on global rank 0."""
        import copy

        from scail2.models.loading import save_pretrained

        assert self.net is not None
        if self.global_rank != 0:
            return None
        out = Path(folder)
        save_lora(self.net, self.lora, out / "lora", layout="peft")
        save_lora(self.net, self.lora, out / "lora_comfyui.safetensors", layout="comfyui")
        merged = merge_lora(copy.deepcopy(self.net))
        save_pretrained(merged, out / "merged", dtype=dtype)
        return out


__all__ = ["DPOModule", "HeldOutConfig"]
