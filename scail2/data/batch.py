"""The batch types, re-exported where the data layer has always offered them.

They live in `scail2.conditioning` (`Condition`, `MotionBatch`, `PreferenceBatch`, `MODES`), below the data
layer, so that the conditioning and packing code never imports `scail2.data`.
"""

from scail2.conditioning.batch import MotionBatch, PreferenceBatch
from scail2.conditioning.condition import MODES, Condition, Mode

__all__ = ["MODES", "Condition", "Mode", "MotionBatch", "PreferenceBatch"]
