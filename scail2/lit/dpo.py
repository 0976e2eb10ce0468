"""Bias-Aware DPO post-training (SPEC §7): the base module with LoRA adapters and the DPO step.

The backbone is built (and initialised from the pretrained weights) by the base module, then frozen, and peft
LoRA adapters are injected (rank 128 on ``self_attn``/``cross_attn`` q/k/v/o and ``ffn.0``/``ffn.2`` of every
block by default). The reference model of the DPO loss is the same network with its adapters disabled, so no
second copy is held. Logged per step: ``train/loss``, ``train/dpo_loss``, ``train/sft_loss``,
``train/implicit_accuracy``, ``train/reward_margin`` and the winner/loser errors of policy and reference.

Validation measures the implicit accuracy and the DPO loss on held-out preference pairs (a fixed set drawn
from ``heldout``, a preference dataset the training run never samples), before and after training: the
`scail2.lit.heldout.HeldOutPreferences` callback, which the module attaches. Export writes the adapters (peft
layout and a ComfyUI file) and the merged network.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from scail2.data.batch import PreferenceBatch
from scail2.lit.base import SCAIL2Module, StepOutput
from scail2.lit.heldout import HeldOutConfig, HeldOutPreferences
from scail2.lit.validation import ValidationConfig
from scail2.lora import LoRASpec, adapters_disabled, add_lora, merge_lora, save_lora
from scail2.models.config import TransformerConfig
from scail2.models.wan import WanModel
from scail2.objectives.dpo import DPOConfig, DPOOutput, dpo_loss, model_velocity
from scail2.utils.dtypes import HALF_DTYPES as _FROZEN_DTYPES

log = logging.getLogger(__name__)

_MIXED = ("bf16-mixed", "16-mixed")


class DPOModule(SCAIL2Module):
    """``objective``: a `DPOConfig` (or its fields); ``lora``: a `LoRASpec` (or its fields); ``heldout``: a
    `HeldOutConfig` (or its fields; without a cache_dir or manifest, the data module's own held-out set if it
    has one, else no held-out evaluation);
    ``frozen_dtype``: "bfloat16" / "float16" stores the frozen backbone in half precision (with
    ``trainer.precision`` bf16-mixed / 16-mixed; None keeps the training dtype). The other arguments are
    `SCAIL2Module`'s, with the same defaults except ``validation`` (None: the base's sampling validation needs
    motion pairs; DPO measures held-out pairs instead); ``init_from`` should be the pretrained model the adapters
    post-train."""

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
        validation: ValidationConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        lora: LoRASpec | Mapping[str, Any] = LoRASpec(),
        heldout: HeldOutConfig | Mapping[str, Any] | None = HeldOutConfig(),
        frozen_dtype: str | None = None,
    ):
        # validation: None by default (the base's sampling validation needs motion pairs).
        super().__init__(
            net, objective, optimizer, scheduler, init_from=init_from,
            activation_checkpointing=activation_checkpointing, compile=compile,
            attention_backend=attention_backend, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
            max_loss=max_loss, validation=validation, seed=seed,
        )  # fmt: skip
        self.lora = lora if isinstance(lora, LoRASpec) else LoRASpec(**lora)
        if isinstance(heldout, Mapping):
            heldout = HeldOutConfig(**heldout)
        if heldout is not None and heldout.manifest is not None and heldout.cache_dir is None and heldout.encoders_root is None:
            raise ValueError("heldout.manifest needs heldout.encoders_root (or give heldout.cache_dir, a preference cache)")
        self.heldout = heldout
        if frozen_dtype is not None and frozen_dtype not in _FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype={frozen_dtype!r}; use one of {sorted(_FROZEN_DTYPES)} or null")
        self.frozen_dtype = frozen_dtype

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
        super().setup(stage)

    def _heldout_source(self) -> None:
        """Without a held-out cache or manifest, take the data module's held-out set if it has one (logged)."""
        h = self.heldout
        if h is None or h.configured:
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

    def preference_loss(self, batch: PreferenceBatch, generator: torch.Generator) -> DPOOutput:
        """The DPO loss of the adapted network against the pre-DPO one: the same network with its adapters
        disabled (no second copy)."""
        assert self.net is not None
        reference = model_velocity(self.net, within=adapters_disabled)
        return dpo_loss(self.net, batch, generator, self.objective, reference=reference)

    def compute_loss(self, batch: PreferenceBatch, generator: torch.Generator) -> StepOutput:
        out = self.preference_loss(batch, generator)
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

    def configure_callbacks(self) -> list[Callback]:
        """The base's evaluations, and the held-out preference pairs when ``heldout`` names a set (or the data
        module has a held-out set of its own). Lightning calls this once the data module is attached."""
        self._heldout_source()
        callbacks = list(super().configure_callbacks())
        if self.heldout is not None:
            callbacks.append(HeldOutPreferences(self.heldout))
        return callbacks

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
