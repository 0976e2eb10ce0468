"""Export of the trained network at the end of training, in the layout inference loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("scail2.train")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportModel(Callback):
    """At the end of fit, write the module's network with `scail2.models.save_pretrained` to ``folder``
    (``config.json`` + safetensors; `scail2.models.load_transformer` reads it).

    With ``encoders`` (a folder with the Wan2.1-I2V encoder subfolders ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``image_encoder/``, ``image_processor/``), the folder also gets a ``model_index.json`` naming
    itself as the transformer and those encoders by absolute path, so it is a complete pipeline folder for
    ``SCAIL2Pipeline.from_pretrained(folder)`` and ``scail2-animate --model folder`` (nothing is copied).

    A LoRA export (DPO: ``lora/``, ``lora_comfyui.safetensors``, ``merged/``) gets the index in ``merged/``.

    Runs on every rank (a sharded network is gathered first); global rank 0 writes. ``dtype``: "bfloat16",
    "float16", "float32" or None (the training dtype). After the export (rank 0; None elsewhere): ``written``,
    the folder written; ``network_dir``, the network in it (``written`` itself, or ``merged/``); ``lora_dir``,
    the adapters (``lora/``) of a LoRA export; ``pipeline``, True when ``network_dir`` got the pipeline index.
    """

    def __init__(self, folder: str | Path, dtype: str | None = None, encoders: str | Path | None = None):
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"export.dtype={dtype!r}; use one of {sorted(_DTYPES)} or null")
        self.folder = Path(folder)
        self.dtype = _DTYPES[dtype] if dtype is not None else None
        self.encoders = Path(encoders) if encoders is not None else None
        self.written: Path | None = None
        self.network_dir: Path | None = None
        self.lora_dir: Path | None = None
        self.pipeline = False

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.written = pl_module.export(self.folder, self.dtype)
        if self.written is None:
            return
        log.info("exported the trained network to %s", self.written)
        lora = self.written / "lora"
        self.lora_dir = lora if lora.is_dir() else None
        self.network_dir = self.written / "merged" if self.lora_dir is not None else self.written
        if self.encoders is not None and (self.network_dir / "config.json").is_file():
            self.pipeline = write_pipeline_index(self.network_dir, self.encoders)
        from scail2.lit.tracking import set_tag

        for logger in trainer.loggers:
            set_tag(logger, "exported_model", str(self.written))


def write_pipeline_index(folder: Path, encoders: Path) -> bool:
    """Make a transformer folder a pipeline folder that borrows ``encoders``' components; False (with a warning
    naming what is missing) when the result would not load."""
    from scail2.pipeline.layout import COMPONENTS, check_folder, write_index

    components = {"transformer": "."}
    components.update({name: str((encoders / name).resolve()) for name in COMPONENTS if name not in ("transformer", "scheduler")})
    index = write_index(folder, components)
    try:
        check_folder(folder)
    except (FileNotFoundError, ValueError) as exc:
        index.unlink()
        log.warning("the exported network is not a pipeline folder (export.encoders=%s): %s", encoders, exc)
        return False
    return True


def latest_export(output_root: str | Path, run_name: str) -> Path:
    """The newest exported model folder of the runs named ``run_name`` under ``output_root``
    (``<output_root>/<run_name>/<run>/model`` or, from a sweep, ``.../multirun_*/<job>/model``); the config
    resolver ``${latest_export:NAME}`` (e.g. ``dpo_demo``'s ``module.init_from: ${latest_export:demo}``)."""
    root = Path(output_root) / run_name
    found = [p.parent for p in (*root.glob("*/model/config.json"), *root.glob("multirun_*/*/model/config.json"))]
    if not found:
        raise FileNotFoundError(
            f"no exported model of the run {run_name!r} under {root} (looked for */model/config.json): run "
            f"`scail2-train experiment={run_name}` first, or set module.init_from=/path/to/model"
        )
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime)
