"""Flow-matching pretraining (SPEC §5): the base module plus the flow-matching step."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from scail2.data.batch import MotionBatch
from scail2.lit.base import SCAIL2Module, StepOutput
from scail2.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss


class PretrainModule(SCAIL2Module):
    """``objective``: a `FlowMatchingConfig` (or its fields). Logs ``train/loss`` and ``train/sigma_mean``."""

    def setup(self, stage: str) -> None:
        if isinstance(self.objective, Mapping):
            self.objective = FlowMatchingConfig(**self.objective)
        if not isinstance(self.objective, FlowMatchingConfig):
            raise TypeError(f"PretrainModule needs a FlowMatchingConfig objective, got {type(self.objective).__name__}")
        super().setup(stage)

    def compute_loss(self, batch: MotionBatch, generator: torch.Generator) -> StepOutput:
        assert self.net is not None
        out = flow_matching_loss(self.net, batch, generator, self.objective)
        return StepOutput(out.loss, {"sigma_mean": out.sigma.mean()})


__all__ = ["PretrainModule"]
