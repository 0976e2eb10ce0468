"""Flow-matching schedulers for sampling: diffusers' UniPC (default) and Euler, configured as Wan2.1 uses them.

The model predicts the velocity ``v = eps - x0`` of ``x_s = (1 - s) x0 + s eps`` (``scail2.objectives``), which
is diffusers' ``flow_prediction`` convention (``x0 = x_s - s v``), so the schedulers step on its output as is.

- ``"unipc"``: ``UniPCMultistepScheduler`` with ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``
  and ``flow_shift=shift``; the other settings (order 2, ``bh2``, predict x0, lower-order final step, final
  sigma 0) are the library defaults, which are also the settings of the scheduler shipped in the Wan2.1
  diffusers releases and of the Wan reference ``FlowUniPCMultistepScheduler``. Its noise levels are
  ``shift(linspace(1, 1/1000, steps + 1)[:-1])`` with ``shift(s) = k s / (1 + (k - 1) s)``.
- ``"euler"``: ``FlowMatchEulerDiscreteScheduler(shift=shift)``, stepped on the same noise levels as UniPC.
  Its own ``set_timesteps(steps)`` would shift an already shifted range (its ``sigma_min`` is shifted at
  construction) and end near 0.024 instead of 0.005, so :func:`set_schedule` passes the unshifted levels.

Shift: the official SCAIL-2 pipeline defaults to 5.0 and recommends 3.0 at 480p (SPEC §8).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEDULERS: tuple[str, ...] = ("unipc", "euler")
DEFAULT_SHIFT = 5.0
NUM_TRAIN_TIMESTEPS = 1000  # the model's timestep is 1000 s
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
_CLASS_NAMES = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}


def make_scheduler(name: str = "unipc", shift: float = DEFAULT_SHIFT) -> Any:
    """A fresh flow-matching scheduler: ``"unipc"`` (default) or ``"euler"`` with time shift ``shift``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {SCHEDULERS}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift is {shift}; need a finite positive time shift (5.0 by default, 3.0 at 480p)")
    if name == "unipc":
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=float(shift),
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=float(shift))


def scheduler_name(scheduler: Any) -> str:
    """``"unipc"`` or ``"euler"`` for a scheduler made by :func:`make_scheduler` (or loaded from a folder)."""
    cls = type(scheduler).__name__
    for name, class_name in _CLASS_NAMES.items():
        if cls == class_name:
            return name
    raise ValueError(f"unsupported scheduler {cls}; use UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler")


def scheduler_shift(scheduler: Any) -> float:
    """The time shift a scheduler is configured with."""
    name = scheduler_name(scheduler)
    return float(scheduler.config.flow_shift if name == "unipc" else scheduler.config.shift)


def with_shift(scheduler: Any, shift: float | None) -> Any:
    """A fresh scheduler (no step state) with the same class and config, and time shift ``shift`` if given."""
    if shift is not None and not shift > 0:
        raise ValueError(f"shift is {shift}; need a positive time shift (5.0 by default, 3.0 at 480p)")
    key = "flow_shift" if scheduler_name(scheduler) == "unipc" else "shift"
    value = scheduler_shift(scheduler) if shift is None else float(shift)
    return type(scheduler).from_config(scheduler.config, **{key: value})


def check_flow_scheduler(scheduler: Any) -> None:
    """Raise unless ``scheduler`` steps flow-matching velocities (a UniPC config without flow sigmas would
    treat the velocity as noise and sample garbage)."""
    name = scheduler_name(scheduler)
    if name == "unipc":
        cfg = scheduler.config
        if cfg.prediction_type != "flow_prediction" or not cfg.use_flow_sigmas:
            raise ValueError(
                f"UniPCMultistepScheduler has prediction_type={cfg.prediction_type!r}, "
                f"use_flow_sigmas={cfg.use_flow_sigmas}; SCAIL-2 needs prediction_type='flow_prediction' and "
                "use_flow_sigmas=True (make one with scail2.pipeline.make_scheduler('unipc', shift))"
            )


def base_sigmas(steps: int) -> np.ndarray:
    """Unshifted noise levels ``linspace(1, 1/1000, steps + 1)[:-1]``, shared by both schedulers."""
    return np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1]


def set_schedule(scheduler: Any, steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Reset ``scheduler`` for ``steps`` denoising steps; returns its timesteps (steps,) in [0, 1000]."""
    if steps < 1:
        raise ValueError(f"num_inference_steps is {steps}; need at least 1 (40 by default)")
    if scheduler_name(scheduler) == "euler":
        scheduler.set_timesteps(steps, device=device, sigmas=base_sigmas(steps).tolist())
    else:
        scheduler.set_timesteps(steps, device=device)
    return scheduler.timesteps


def load_scheduler(folder: str | Path) -> Any:
    """Load ``scheduler_config.json`` from ``folder`` (UniPC or flow-matching Euler)."""
    folder = Path(folder)
    config_file = folder / SCHEDULER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"scheduler folder {folder} has no {SCHEDULER_CONFIG_NAME}; write one with "
            "SCAIL2Pipeline.save_pretrained or remove the folder to use UniPC with shift 5"
        )
    import json

    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name == _CLASS_NAMES["unipc"]:
        from diffusers import UniPCMultistepScheduler as cls
    elif class_name == _CLASS_NAMES["euler"]:
        from diffusers import FlowMatchEulerDiscreteScheduler as cls
    else:
        raise ValueError(
            f"{config_file} declares _class_name {class_name!r}; SCAIL-2 samples with "
            f"{_CLASS_NAMES['unipc']} or {_CLASS_NAMES['euler']}"
        )
    scheduler = cls.from_pretrained(folder, local_files_only=True)
    check_flow_scheduler(scheduler)
    return scheduler
