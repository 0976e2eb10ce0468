"""``scail2-train``: train SCAIL-2 from Hydra configs.

    scail2-train experiment=demo                         # the CPU demo (tiny model, synthetic data)
    scail2-train experiment=pretrain_wan14b data.cache_dir=... module.init_from=...
    scail2-train experiment=demo trainer.max_steps=50 optim.optimizer.lr=3e-3
    scail2-train experiment=demo ckpt_path=last           # resume the newest complete checkpoint, same MLflow run
    scail2-train -m experiment=demo optim.optimizer.lr=1e-3,3e-3   # a sweep, one run per value
    python -m scail2.train ...                           # the same

The configs are ``conf/`` (one group per axis) and ``experiments/`` (the ``experiment`` group); see
docs/training.md. The resolved config is printed first; the outputs (run folder, MLflow store and how to view
it, validation samples, checkpoints, exported model) are printed at the end.

Exit codes: 0 done; 2 a bad command line or config (one line naming the key, the value and the fix);
3 the run diverged (non-finite values, or a loss above ``module.max_loss``); 143 stopped by SIGTERM after
writing a checkpoint (the message says how to resume); 1 any other failure.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scail2.config.instantiate import ConfigError, instantiate, to_container, validate_targets

log = logging.getLogger("scail2.train")

EXIT_CONFIG = 2
EXIT_DIVERGED = 3


@dataclass
class TrainResult:
    """Where a run's outputs are (global rank 0; other ranks get the same paths)."""

    run_dir: Path
    checkpoint_dir: Path | None
    last_checkpoint: Path | None
    export_dir: Path | None
    tracking_uri: str | None
    run_id: str | None
    pipeline: bool  # network_dir is a complete pipeline folder (export.encoders)
    resumed_from: Path | None
    seconds: float
    global_step: int
    validation: list[Any] = field(default_factory=list)  # scail2.lit.validation.ValidationResult
    heldout: list[dict[str, float]] = field(default_factory=list)  # DPO: held-out pair metrics ("step" + values)
    network_dir: Path | None = None  # the exported network: export_dir, or its merged/ for a LoRA export
    lora_dir: Path | None = None  # DPO: the adapters (peft layout)

    @property
    def pipeline_dir(self) -> Path | None:
        """The folder scail2-animate --model loads, when the export is a pipeline folder."""
        return self.network_dir if self.pipeline else None


def _absolute_paths(cfg: DictConfig) -> None:
    """Relative paths are taken from the working directory once, so every interpolation sees absolute ones."""
    cfg.paths.output_root = str(Path(cfg.paths.output_root).expanduser().absolute())
    cfg.paths.data_root = str(Path(cfg.paths.data_root).expanduser().absolute())


def _check_complete(cfg: DictConfig) -> None:
    """Refuse a config with unset values (``???``) or unset ``required`` keys, naming all of them."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    missing += [k for k in cfg.required if k not in missing and OmegaConf.select(cfg, k, throw_on_missing=False) is None]
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"required config values are not set: {missing}; give them on the command line ({example})")


def resolve_checkpoint(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and the MLflow run record to continue (None: a new MLflow run).

    ``ckpt_path``: None (fresh run), "last" (the newest complete checkpoint of ``run_name``; an error if there is
    none), "auto" (the same, or a fresh run if there is none: for jobs that are requeued), or a path inside
    ``paths.output_root``. A checkpoint that cannot be read is passed over ("last") or refused (a path). The
    MLflow run is continued only when the checkpoint belongs to this ``run_name`` (`scail2.lit.faults.resume_record`).
    """
    from scail2.config.checks import inside_root
    from scail2.lit.checkpoint import find_resume_checkpoint, is_complete
    from scail2.lit.faults import inspect_checkpoint, resume_record

    if cfg.ckpt_path is None:
        return None, None
    if cfg.ckpt_path in ("last", "auto"):
        root = Path(cfg.paths.output_root) / cfg.run_name
        folders = sorted(root.glob("*/checkpoints")) + sorted(root.glob("multirun_*/*/checkpoints"))
        found = find_resume_checkpoint(folders)
        if found is None and cfg.ckpt_path == "auto":
            return None, None
        if found is None:
            raise ConfigError(
                f"ckpt_path=last: no complete checkpoint under {root}/*/checkpoints for run_name={cfg.run_name}; "
                "drop ckpt_path to start a fresh run, or pass ckpt_path=/path/to/step=NNNNNNN.ckpt"
            )
    else:
        found = inside_root(cfg.ckpt_path, cfg.paths.output_root, "ckpt_path")
        if not found.exists() or not is_complete(found):
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no complete checkpoint there (a file or a folder with meta.pt)")
        problem = inspect_checkpoint(found)
        if problem is not None:
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {problem}; give another checkpoint, or ckpt_path=last")
    tracking_uri = cfg.logger.get("tracking_uri") if isinstance(cfg.logger, DictConfig) else None
    return found, resume_record(found, cfg.run_name, tracking_uri)


def _tracking(logger: Any) -> tuple[str | None, str | None]:
    """(tracking URI, run id) of an MLflow logger; (None, None) for other loggers."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not isinstance(logger, MLFlowLogger):
        return None, None
    return logger.experiment.tracking_uri, logger.run_id


def build_module(cfg: DictConfig) -> Any:
    """The LightningModule of ``cfg`` with its injected network, objective, optimizer and schedule factories."""
    scheduler = cfg.optim.scheduler if "scheduler" in cfg.optim else None
    return instantiate(
        cfg.module,
        "module",
        net=instantiate(cfg.model, "model"),
        objective=instantiate(cfg.objective, "objective"),
        optimizer=instantiate(cfg.optim.optimizer, "optim.optimizer"),
        scheduler=instantiate(scheduler, "optim.scheduler") if scheduler is not None else None,
    )


def build_trainer(cfg: DictConfig, run_id: str | None = None, extra_callbacks: Sequence[Any] = ()) -> Any:
    """The Lightning Trainer of ``cfg``: strategy, callbacks, logger (continuing ``run_id`` if given)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from scail2.lit.checkpoint import AtomicCheckpointIO
    from scail2.lit.export import ExportModel

    strategy = instantiate(cfg.strategy, "strategy")
    callbacks = []
    for name, node in cfg.callbacks.items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(
                f"config `callbacks.{name}` sets {sorted(node)} but names no callback (`_target_`): the chosen "
                f"callbacks option has no `{name}` (an experiment may set it); choose an option with it or add "
                f"callbacks.{name}=null"
            )
        callbacks.append(instantiate(node, f"callbacks.{name}"))
    callbacks += list(extra_callbacks)
    if cfg.export.enabled:
        # Last, so that weight averaging has copied its average into the model before the export.
        callbacks.append(ExportModel(cfg.export.dir, cfg.export.dtype, cfg.export.encoders))
    logger = False
    if cfg.logger is not None:
        logger = instantiate(cfg.logger, "logger", **({"run_id": run_id} if run_id else {}))
    plugins = [] if isinstance(strategy, DeepSpeedStrategy) else [AtomicCheckpointIO()]
    return instantiate(cfg.trainer, "trainer", strategy=strategy, callbacks=callbacks, logger=logger, plugins=plugins)


def train(cfg: DictConfig, extra_callbacks: Sequence[Any] = (), datamodule: Any = None) -> TrainResult:
    """Build everything from a composed config and fit; returns where the outputs are.

    ``extra_callbacks`` are added to the configured ones; ``datamodule`` replaces ``cfg.data`` (both for use from
    Python, e.g. tests and notebooks). The run's CPU numerics (``threads``, ``flush_denormal``) are set first, before
    any parallel work, and the caller's are restored afterwards (`scail2.utils.cpu.cpu_numerics`).
    """
    from scail2.utils.cpu import cpu_numerics

    threads = cfg.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r}: need a positive number of torch threads, or null for the default")
    with cpu_numerics(threads, cfg.flush_denormal or None):
        return _train(cfg, extra_callbacks, datamodule)


def _train(cfg: DictConfig, extra_callbacks: Sequence[Any], datamodule: Any) -> TrainResult:
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    from scail2.config.checks import check_config
    from scail2.lit.checkpoint import write_run_record
    from scail2.lit.export import ExportModel
    from scail2.lit.faults import RunIdentity, StopCheckpoint
    from scail2.lit.tracking import record_run

    start = time.perf_counter()
    _absolute_paths(cfg)
    _check_complete(cfg)
    check_config(cfg)
    validate_targets(cfg)
    is_zero = rank_zero_only.rank == 0
    if cfg.print_config and is_zero:
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    run_dir = Path(cfg.paths.run_dir)
    ckpt_path, record = resolve_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    if datamodule is None:
        datamodule = instantiate(cfg.data, "data")
    module = build_module(cfg)
    identity = RunIdentity(cfg.run_name)
    stop = StopCheckpoint(run_dir / "checkpoints")
    trainer = build_trainer(cfg, record["run_id"] if record else None, [*extra_callbacks, identity, stop])
    logger = trainer.logger
    checkpoint_cb = trainer.checkpoint_callback
    ckpt_dir = Path(checkpoint_cb.dirpath) if checkpoint_cb is not None and checkpoint_cb.dirpath else None
    stop.dirpath = ckpt_dir or stop.dirpath
    tracking_uri = run_id = None
    if logger is not None and is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        record_run(logger, to_container(cfg), config_file, resumed=ckpt_path is not None)
        tracking_uri, run_id = _tracking(logger)
        if run_id is not None:
            write_run_record(run_dir, {"run_id": run_id, "tracking_uri": tracking_uri, "experiment_name": cfg.run_name})
        identity.record.update(run_id=run_id, tracking_uri=tracking_uri)
    if ckpt_path is not None and is_zero:
        log.info("resuming from %s%s", ckpt_path, f" (MLflow run {record['run_id']})" if record else "")

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except SIGTERMException:
        from scail2.lit.faults import stopped

        raise stopped(trainer, stop, run_id) from None

    export = next((cb for cb in trainer.callbacks if isinstance(cb, ExportModel)), None)
    last = Path(checkpoint_cb.last_model_path) if checkpoint_cb is not None and checkpoint_cb.last_model_path else None
    return TrainResult(
        run_dir=run_dir,
        checkpoint_dir=ckpt_dir,
        last_checkpoint=last,
        export_dir=export.written if export is not None else None,
        tracking_uri=tracking_uri,
        run_id=run_id,
        pipeline=export.pipeline if export is not None else False,
        resumed_from=ckpt_path,
        seconds=time.perf_counter() - start,
        global_step=trainer.global_step,
        validation=list(module.validation_history),
        heldout=list(getattr(module, "heldout_history", [])),
        network_dir=export.network_dir if export is not None else None,
        lora_dir=export.lora_dir if export is not None else None,
    )


def summary(result: TrainResult) -> str:
    """The end-of-run report: what was learned and where everything is."""
    from scail2.lit.tracking import mlflow_ui_command

    lines = [f"\nTraining finished: {result.global_step} steps in {timedelta(seconds=round(result.seconds))}."]
    if len(result.validation) >= 2:
        first, final = result.validation[0], result.validation[-1]
        lines.append(f"Validation (fixed batch and noise), step {first.step} -> step {final.step}:")
        for key in first.metrics:
            if key in final.metrics:
                better = "higher is better" if key == "val/psnr" else "lower is better"
                lines.append(f"  {key:<16} {first.metrics[key]:10.4f} -> {final.metrics[key]:10.4f}   ({better})")
    if len(result.heldout) >= 2:
        first, final = result.heldout[0], result.heldout[-1]
        lines.append(f"Preference pairs (held-out; trainpairs: seen in training), fixed draws, step {first['step']:.0f} -> step {final['step']:.0f}:")
        for key in first:
            if key != "step" and key in final:
                better = "lower is better" if key.endswith("dpo_loss") else "higher is better"
                lines.append(f"  {key:<30} {first[key]:10.4f} -> {final[key]:10.4f}   ({better})")
    lines.append("Outputs:")
    lines.append(f"  run folder      {result.run_dir}")
    if result.tracking_uri:
        lines.append(f"  MLflow store    {result.tracking_uri}   (run {result.run_id})")
        lines.append(f"      view it:    {mlflow_ui_command(result.tracking_uri)}")
    media = [v.folder for v in result.validation if v.folder is not None]
    if media:
        lines.append(f"  samples         {media[-1]}  (grid.png, sample_*.mp4: target | sample)")
        if len(media) > 1:
            lines.append(f"    before        {media[0]}")
    if result.checkpoint_dir is not None:
        lines.append(f"  checkpoints     {result.checkpoint_dir}" + (f"  (last: {result.last_checkpoint.name})" if result.last_checkpoint else ""))
    if result.export_dir is not None:
        network = result.network_dir or result.export_dir
        lines.append(f"  exported model  {result.export_dir}")
        if result.lora_dir is not None:
            lines.append(f"      adapters:   {result.lora_dir}  (peft layout; lora_comfyui.safetensors next to it)")
        lines.append(f"      load it:    scail2.models.load_transformer('{network}')")
        if result.pipeline:
            lines.append(f"      run it:     scail2-animate --model {network} --ref REF.png --driving VIDEO.mp4 --out OUT.mp4")
        if result.lora_dir is not None:
            lines.append(f"      or:         scail2-animate --model BASE_PIPELINE --lora {result.lora_dir} ...")
    return "\n".join(lines)


def _task(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities import rank_zero_only

    from scail2.lit.faults import TrainingStopped
    from scail2.models.loading import CheckpointError

    try:
        result = train(cfg)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except FloatingPointError as exc:
        print(f"error: the run diverged: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DIVERGED) from None
    if rank_zero_only.rank == 0:
        print(summary(result), flush=True)
    # Returned to Hydra (sweepers can optimise it): the last validation's latent MSE, or for DPO the last held-out
    # DPO loss.
    final = result.validation[-1].metrics if result.validation else {}
    if "val/latent_mse" in final:
        return final["val/latent_mse"]
    return result.heldout[-1]["heldout/dpo_loss"] if result.heldout else None


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``scail2-train``); ``argv`` replaces the command-line arguments when given."""
    import hydra

    from scail2.config.checks import prepare_command_line
    from scail2.config.schema import config_dir, register_configs

    try:
        register_configs()
        args = prepare_command_line(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG) from None
    sys.argv = [sys.argv[0], *args]
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_task)()


if __name__ == "__main__":
    main()
