"""Transformers: the Wan2.1 backbone, SCAIL-2 on top of it, presets, weights I/O."""

from .config import PRESETS, TransformerConfig, scail2_config, wan_config
from .loading import CheckpointError, convert_checkpoint, load_transformer, save_pretrained, scail2_from_wan_i2v
from .scail2 import SCAIL2Transformer
from .wan import WanModel

__all__ = [
    "PRESETS",
    "CheckpointError",
    "SCAIL2Transformer",
    "TransformerConfig",
    "WanModel",
    "convert_checkpoint",
    "load_transformer",
    "save_pretrained",
    "scail2_config",
    "scail2_from_wan_i2v",
    "wan_config",
]
