"""Export of the trained network at the end of training, in the layout inference loads, with a record of how
it was trained (``training.json``).

``training.json`` (next to the network's ``config.json``) holds the run (name, experiment, command-line
overrides, MLflow run id), the steps trained and asked for, whether the run finished, and the video resolutions
the network saw in training (frames x height x width, with sample counts). ``${latest_export:NAME}`` uses it to
pick only finished runs of experiment NAME with its own settings; ``scail2-animate`` uses the resolutions as its
default output size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from scail2.utils.dtypes import DTYPES as _DTYPES

log = logging.getLogger("scail2.train")

TRAINING_RECORD = "training.json"
RECORD_FORMAT = 1
ENCODERS_MODES: tuple[str, ...] = ("copy", "relative")
# The Wan2.1 VAE's strides (frames, height, width): latents (T, h, w) come from 4 (T - 1) + 1 frames of 8h x 8w.
VAE_STRIDES: tuple[int, int, int] = (4, 8, 8)
# Overrides that change where a run writes and what it reports, not what it learns: a run with only these
# still has its experiment's own settings (for ${latest_export:NAME}).
NEUTRAL_OVERRIDES: tuple[str, ...] = (
    "experiment=", "paths.", "hydra.", "print_config=", "logger", "ckpt_path=", "flush_denormal=", "tags=",
    "trainer.enable_progress_bar=", "trainer.enable_model_summary=", "trainer.log_every_n_steps=",
    "callbacks.progress", "callbacks.checkpoint.", "export.encoders_mode=",
)  # fmt: skip


def pixel_resolution(latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of latents shaped (B, C, T, h, w)."""
    t, h, w = latent_shape[-3:]
    st, sh, sw = VAE_STRIDES
    return st * (t - 1) + 1, sh * h, sw * w


class ExportModel(Callback):
    """At the end of fit, write the module's network with `scail2.models.save_pretrained` to ``folder``
    (``config.json`` + safetensors; `scail2.models.load_transformer` reads it) and ``training.json``.

    With ``encoders`` (a folder with the Wan2.1-I2V encoder subfolders ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``image_encoder/``, ``image_processor/``), the folder also gets a ``model_index.json``, so it
    is a complete pipeline folder for ``SCAIL2Pipeline.from_pretrained(folder)`` and ``scail2-animate --model
    folder``. ``encoders_mode`` says how it refers to the encoders: "copy" puts them inside the folder (hard
    links where the file system allows, else copies), so the folder can be moved anywhere; "relative" names
    them by relative path, so it can be moved together with them (for encoders too large to copy).

    A LoRA export (DPO: ``lora/``, ``lora_comfyui.safetensors``, ``merged/``) gets the index in ``merged/``.

    ``run``: what ``training.json`` records about the run (run_name, experiment, overrides); the steps, the
    MLflow run id and the resolutions seen (counted over every training batch, kept in checkpoints) are added.

    Runs on every rank (a sharded network is gathered first); global rank 0 writes. ``dtype``: "bfloat16",
    "float16", "float32" or None (the training dtype). After the export (rank 0; None elsewhere): ``written``,
    the folder written; ``network_dir``, the network in it (``written`` itself, or ``merged/``); ``lora_dir``,
    the adapters (``lora/``) of a LoRA export; ``pipeline``, True when ``network_dir`` got the pipeline index.
    """

    def __init__(
        self,
        folder: str | Path,
        dtype: str | None = None,
        encoders: str | Path | None = None,
        encoders_mode: str = "copy",
        run: dict[str, Any] | None = None,
    ):
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"export.dtype={dtype!r}; use one of {sorted(_DTYPES)} or null")
        if encoders_mode not in ENCODERS_MODES:
            raise ValueError(f"export.encoders_mode={encoders_mode!r}; use one of {list(ENCODERS_MODES)}")
        self.folder = Path(folder)
        self.dtype = _DTYPES[dtype] if dtype is not None else None
        self.encoders = Path(encoders) if encoders is not None else None
        self.encoders_mode = encoders_mode
        self.run = dict(run or {})
        self.resolutions: dict[tuple[int, int, int], int] = {}
        self.written: Path | None = None
        self.network_dir: Path | None = None
        self.lora_dir: Path | None = None
        self.pipeline = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        motion = getattr(pl_module, "motion_batch", None)
        if motion is None:
            return
        latents = motion(batch).latents
        key = pixel_resolution(tuple(latents.shape))
        self.resolutions[key] = self.resolutions.get(key, 0) + int(latents.shape[0])

    def state_dict(self) -> dict[str, Any]:
        return {"resolutions": [[*key, count] for key, count in sorted(self.resolutions.items())]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resolutions = {tuple(int(v) for v in row[:3]): int(row[3]) for row in state_dict.get("resolutions", [])}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.written = pl_module.export(self.folder, self.dtype)
        if self.written is None:
            return
        log.info("exported the trained network to %s", self.written)
        lora = self.written / "lora"
        self.lora_dir = lora if lora.is_dir() else None
        self.network_dir = self.written / "merged" if self.lora_dir is not None else self.written
        if self.encoders is not None and (self.network_dir / "config.json").is_file():
            self.pipeline = write_pipeline_index(self.network_dir, self.encoders, self.encoders_mode)
        from scail2.lit.tracking import set_tag

        run_id = next((getattr(lg, "run_id", None) for lg in trainer.loggers if getattr(lg, "run_id", None)), None)
        write_training_record(self.network_dir, {
            **self.run,
            "run_id": run_id,
            "global_step": int(trainer.global_step),
            "max_steps": int(trainer.max_steps),
            "fast_dev_run": bool(trainer.fast_dev_run),
            "finished": False,  # set by the entry point when fit has returned (`mark_finished`)
            "resolutions": [{"frames": f, "height": h, "width": w, "samples": n}
                            for (f, h, w), n in sorted(self.resolutions.items(), key=lambda kv: -kv[1])],
        })  # fmt: skip
        for logger in trainer.loggers:
            set_tag(logger, "exported_model", str(self.written))


def write_training_record(folder: Path, record: dict[str, Any]) -> Path:
    """Write ``training.json`` into an exported network's folder (atomically)."""
    path = Path(folder) / TRAINING_RECORD
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"format": RECORD_FORMAT, **record}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_training_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``training.json`` of an exported network's folder, or None when it has none."""
    path = Path(folder) / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it was not written by scail2-train") from exc


def mark_finished(folder: Path) -> None:
    """Record in ``training.json`` that the run which exported ``folder`` finished (fit returned)."""
    record = read_training_record(folder)
    if record is not None:
        record.pop("format", None)
        write_training_record(folder, {**record, "finished": True})


def write_pipeline_index(folder: Path, encoders: Path, mode: str = "copy") -> bool:
    """Make a transformer folder a pipeline folder with ``encoders``' components (``mode``: "copy" them in, hard
    links where possible; "relative": name them by relative path); False (with a warning naming what is missing)
    when the result would not load."""
    from scail2.pipeline.layout import COMPONENTS, check_folder, write_index

    components = {"transformer": "."}
    names = [name for name in COMPONENTS if name not in ("transformer", "scheduler")]
    missing = [name for name in names if not (encoders / name).exists()]
    if missing:
        log.warning("the exported network is not a pipeline folder: export.encoders=%s has no %s", encoders, missing)
        return False
    for name in names:
        source = (encoders / name).resolve()
        if mode == "copy":
            _link_or_copy(source, folder / name)
            components[name] = name
        else:
            components[name] = os.path.relpath(source, folder.resolve())
    index = write_index(folder, components)
    try:
        check_folder(folder)
    except (FileNotFoundError, ValueError) as exc:
        index.unlink()
        log.warning("the exported network is not a pipeline folder (export.encoders=%s): %s", encoders, exc)
        return False
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    """A copy of ``source`` (a file or a folder) at ``target`` whose files are hard links where possible."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed: a real copy
            shutil.copy2(src, dst)

    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if source.is_dir():
        shutil.copytree(source, target, copy_function=link)
    else:
        link(str(source), str(target))


def _neutral(override: str) -> bool:
    key = override.lstrip("+~")
    return any(key.startswith(prefix) for prefix in NEUTRAL_OVERRIDES)


def export_problem(record: dict[str, Any] | None, experiment: str) -> str | None:
    """Why an export with ``record`` (its training.json) is not a finished run of ``experiment`` with the
    experiment's own settings, or None when it is."""
    if record is None:
        return "no training.json (not exported by this version of scail2-train)"
    if record.get("experiment") != experiment:
        return f"a run of experiment={record.get('experiment')}, not {experiment}"
    if record.get("fast_dev_run"):
        return "a fast_dev_run"
    step, total = record.get("global_step"), record.get("max_steps")
    if total is not None and total > 0 and (step is None or step < total):
        return f"stopped at step {step} of {total}"
    if not record.get("finished"):
        return "the run did not finish (it stopped or failed after the export)"
    overrides = record.get("overrides")
    if overrides is None:
        return "its overrides are unknown (built outside Hydra)"
    changed = [o for o in overrides if not _neutral(o)]
    if changed:
        return f"run with other settings: {' '.join(changed)}"
    return None


def latest_export(output_root: str | Path, run_name: str) -> Path:
    """The newest exported model of a finished ``experiment=run_name`` run with that experiment's own settings
    (only overrides of paths, logging and checkpoint cadence, `NEUTRAL_OVERRIDES`), under ``output_root``
    (``<output_root>/<run_name>/<run>/model`` or, from a sweep, ``.../multirun_*/<job>/model``); the config
    resolver ``${latest_export:NAME}`` (e.g. ``dpo_demo``'s ``module.init_from: ${latest_export:demo}``).

    Newest by the time its ``training.json`` was written (SLURM / torchrun run folder names do not sort by
    time). Exports that do not qualify are listed, each with the reason, when none does.
    """
    root = Path(output_root) / run_name
    found = [p.parent for p in (*root.glob("*/model/config.json"), *root.glob("multirun_*/*/model/config.json"))]
    usable, skipped = [], []
    for folder in found:
        problem = export_problem(read_training_record(folder), run_name)
        (skipped.append(f"{folder}: {problem}") if problem else usable.append(folder))
    if not usable:
        detail = "".join(f"\n  - {s}" for s in sorted(skipped))
        what = f"none of the {len(found)} export(s) there qualifies:{detail}\n" if found else "there is none (looked for */model/config.json); "
        raise FileNotFoundError(
            f"no exported model of a finished `experiment={run_name}` run with its own settings under {root}: "
            f"{what}run `scail2-train experiment={run_name}` first, or set module.init_from=/path/to/model"
        )
    return max(usable, key=lambda p: ((p / TRAINING_RECORD).stat().st_mtime_ns, str(p)))


def describe_export(folder: str | Path) -> str:
    """One line about an export: its path, steps, run id and experiment (from training.json)."""
    record = read_training_record(folder) or {}
    steps = record.get("global_step")
    return (
        f"{folder} ({steps if steps is not None else '?'} steps, MLflow run {record.get('run_id') or 'none'}, "
        f"experiment={record.get('experiment')}, {'finished' if record.get('finished') else 'not finished'})"
    )
