"""Inference: ``SCAIL2Pipeline`` and the pieces it is built from.

- `pipeline`: `SCAIL2Pipeline` (``from_pretrained`` / ``save_pretrained`` / ``__call__`` / ``generate`` /
  ``sample_latents`` / ``load_lora``), `SCAIL2Output` and `LoadedLoRA`;
- `sampling`: `sample_latents`, the denoising loop on encoded conditioning (a `scail2.conditioning.Condition`,
  re-exported here; shared with validation during training);
- `schedulers`: `make_scheduler` (UniPC or Euler, flow matching with a time shift);
- `inputs`: `prepare_inputs` (loading, resizing, mask building and checks) and `PipelineInputError`;
- `segments`: `plan_segments` / `output_length` (long videos);
- `layout`: the folder layouts (pipeline folder, the official release folder) and their checks;
- `presets`: `SAMPLING_PRESETS`, named sampling recipes (the official defaults, the lightx2v distilled LoRA's);
- `tiny`: `save_tiny_pipeline` for tests.

Importing this package loads no model and imports neither diffusers nor transformers.
"""

from scail2.conditioning.condition import Condition
from scail2.pipeline.inputs import PipelineInputError, PreparedInputs, prepare_inputs
from scail2.pipeline.pipeline import LoadedLoRA, SCAIL2Output, SCAIL2Pipeline
from scail2.pipeline.sampling import sample_latents
from scail2.pipeline.schedulers import SCHEDULERS, make_scheduler
from scail2.pipeline.segments import SegmentPlan, output_length, plan_segments

__all__ = [
    "Condition",
    "LoadedLoRA",
    "PipelineInputError",
    "PreparedInputs",
    "SCAIL2Output",
    "SCAIL2Pipeline",
    "SCHEDULERS",
    "SegmentPlan",
    "make_scheduler",
    "output_length",
    "plan_segments",
    "prepare_inputs",
    "sample_latents",
]
