"""LightningModules, callbacks and strategies of ``scail2-train``.

- `SCAIL2Module` (`base`): what pretraining and DPO share; `PretrainModule` (`pretrain`): the flow-matching step;
  `DPOModule` (`dpo`): LoRA adapters and the DPO step.
- `evaluation`: the base of the callbacks that measure between steps and report their time; `validation`:
  validation sampling (`SampleValidation`); `heldout`: DPO's held-out preference pairs (`HeldOutPreferences`);
  `benchmark`: the motion benchmark on held-out synthetic pairs at the end of a run (`MotionBenchmark`).
- `callbacks`: throughput/MFU, data skips, progress; `checkpoint`: periodic, atomic checkpoints and resume;
  `strategies`: single / FSDP2 / DeepSpeed factories; `data`: the synthetic data modules; `tracking`: run
  metadata for MLflow.

Importing this package imports Lightning but builds nothing.
"""

from scail2.lit.base import SCAIL2Module, StepOutput
from scail2.lit.pretrain import PretrainModule
from scail2.lit.validation import ValidationConfig

__all__ = ["PretrainModule", "SCAIL2Module", "StepOutput", "ValidationConfig"]
