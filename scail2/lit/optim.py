"""Learning-rate schedules (``optim.scheduler``): built from the optimizer, stepped once per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr factor: linear warm-up from 1/warmup to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio`` at
    ``total_steps`` (and flat after). A plain object (numbers only), so its state saves without pickling code."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Cosine schedule with linear warm-up (SPEC §5: cosine). ``total_steps``: usually ``trainer.max_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps is {total_steps}; set it to the number of optimizer steps (trainer.max_steps)")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps {warmup_steps} must be in [0, total_steps={total_steps}); for a run of {total_steps} "
            f"steps set optim.scheduler.warmup_steps below it (e.g. optim.scheduler.warmup_steps={max(0, total_steps // 10)})"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio {min_lr_ratio} must be in [0, 1] (a fraction of the peak lr)")
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio))
