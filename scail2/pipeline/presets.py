"""Sampling recipes as named presets: steps, text guidance, time shift, scheduler (and the LoRA strength).

- ``"default"``: the official SCAIL-2 pipeline's defaults (``generate``: 40 steps, guidance 5, shift 5, UniPC;
  the official code advises shift 3 at 480p, and its command line uses 3 when none is given).
- ``"lightx2v-distill"``: the step-distilled recipe the official SCAIL-2 README gives for a lightx2v LoRA
  (``lightx2v_I2V_14B_480p_cfg_step_distill_rank128_bf16.safetensors``, loaded at strength 1.0): 8 steps,
  shift 1, guidance 1 (no classifier-free guidance: the LoRA distils it away, so one model pass per step),
  UniPC (the README's default solver).

Use a preset with the pipeline::

    from scail2.pipeline.presets import SAMPLING_PRESETS

    recipe = SAMPLING_PRESETS["lightx2v-distill"]
    pipe.load_lora("lightx2v_I2V_14B_480p_cfg_step_distill_rank128_bf16.safetensors", scale=recipe.lora_scale)
    out = pipe.generate(prepared, prompt=prompt, **recipe.generate_kwargs())

or from the command line with the same numbers: ``--steps 8 --shift 1 --guidance 1`` (see docs/inference.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingPreset:
    """One sampling recipe and where its numbers come from."""

    num_inference_steps: int
    guidance_scale: float
    shift: float
    scheduler: str = "unipc"
    lora_scale: float = 1.0  # strength of the LoRA the recipe is meant for (1 = as trained)
    source: str = ""

    def generate_kwargs(self) -> dict[str, float | int]:
        """The keyword arguments of ``SCAIL2Pipeline.generate`` this recipe sets."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "shift": self.shift,
        }


SAMPLING_PRESETS: dict[str, SamplingPreset] = {
    "default": SamplingPreset(
        num_inference_steps=40,
        guidance_scale=5.0,
        shift=5.0,
        source="official SCAIL-2 pipeline (wan-scail2 branch, wan/scail.py generate defaults)",
    ),
    "lightx2v-distill": SamplingPreset(
        num_inference_steps=8,
        guidance_scale=1.0,
        shift=1.0,
        lora_scale=1.0,
        source="official SCAIL-2 README (wan-scail2 branch), LoRA integration: --sample_steps 8 --sample_shift 1 "
        "--sample_guide_scale 1.0 --lora_alpha 1.0 with lightx2v_I2V_14B_480p_cfg_step_distill_rank128_bf16",
    ),
}
