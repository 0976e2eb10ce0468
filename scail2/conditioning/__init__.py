"""Conditioning: the `Condition` record, its encoding from pixels, the colour masks and the in-context packing.

- `condition`: `Condition` (reference, masks, driving, text, CLIP tokens, modes, extra references) and `MODES`;
- `batch`: the training batches built on it (`MotionBatch`, `PreferenceBatch`);
- `encode`: pixels + masks + caption -> `Condition` (`encode_condition`), shared by training and inference;
- `masks`: colour-coded mask videos <-> the 28-channel latent masks;
- `packing`: `Condition` + noisy latents -> the model's inputs and RoPE factors (`pack_inputs`).

This package sits below the data, objective and pipeline layers and imports none of them.
"""

from scail2.conditioning.batch import MotionBatch, PreferenceBatch
from scail2.conditioning.condition import MODES, Condition, Mode

__all__ = ["MODES", "Condition", "Mode", "MotionBatch", "PreferenceBatch"]
