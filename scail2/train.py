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

Exit codes: 0 done; 2 a bad command line, config, data settings or a checkpoint that cannot be resumed (one line
``error: ...`` naming the key, the value and the fix; the traceback goes to the run folder's ``train.log``);
3 the run diverged (non-finite values, or a loss above ``module.max_loss``); 143 stopped by SIGTERM after
writing a checkpoint (the message says how to resume); 1 any other failure.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scail2.config.combinations import check_combination
from scail2.config.instantiate import ConfigError, instantiate, to_container, validate_targets

log = logging.getLogger("scail2.train")

EXIT_DIVERGED = 3


# Errors that mean "bad input" (a config, data settings, a checkpoint or a path); the command line reports them
# in one line and exits with EXIT_BAD_INPUT. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError)
EXIT_BAD_INPUT = 2


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
    start_step: int = 0  # the step training started from (the checkpoint's, when resumed)
    finished: bool = True  # trained to trainer.max_steps (not stopped early, not a fast_dev_run)
    nothing_to_train: str | None = None  # why a resume trained no step (the checkpoint is already at the end)
    reports: list[str] = field(default_factory=list)  # end-of-run lines of the callbacks that have summary_lines()

    @property
    def pipeline_dir(self) -> Path | None:
        """The folder scail2-animate --model loads, when the export is a pipeline folder."""
        return self.network_dir if self.pipeline else None


def _absolute_paths(cfg: DictConfig) -> None:
    """Relative paths are taken from the working directory once, so every interpolation sees absolute ones."""
    from scail2.lit.tracking import absolute_tracking_uri

    cfg.paths.output_root = str(Path(cfg.paths.output_root).expanduser().absolute())
    cfg.paths.data_root = str(Path(cfg.paths.data_root).expanduser().absolute())
    cfg.paths.mlflow = absolute_tracking_uri(cfg.paths.mlflow)


def _check_complete(cfg: DictConfig) -> None:
    """Refuse a config with unset values (``???``) or unset ``required`` keys, naming all of them."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    missing += [k for k in cfg.required if k not in missing and OmegaConf.select(cfg, k, throw_on_missing=False) is None]
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"required config values are not set: {missing}; give them on the command line ({example})")


def _hydra_job() -> dict[str, Any]:
    """What Hydra knows of this job: the experiment chosen, the command-line overrides and, in a multirun, the
    job number and sweep folder. Empty values outside Hydra (a config built by hand)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"experiment": None, "overrides": None, "sweep": None}
    hc = HydraConfig.get()
    sweep = None
    if hc.mode == RunMode.MULTIRUN:
        folder = Path(hc.runtime.output_dir).parent
        sweep = {"num": int(hc.job.num), "name": folder.name, "dir": str(folder), "overrides": list(hc.overrides.task)}
    return {"experiment": hc.runtime.choices.get("experiment"), "overrides": list(hc.overrides.task), "sweep": sweep}


def _strategy_name(cfg: DictConfig) -> str:
    """The ``strategy`` option a config's strategy node stands for (from its target)."""
    target = cfg.strategy._target_
    names = {
        "scail2.lit.strategies.single_device": "single",
        "lightning.pytorch.strategies.DDPStrategy": "ddp",
        "scail2.lit.strategies.FSDP2Strategy": "fsdp2",
    }
    if target == "scail2.lit.strategies.deepspeed":
        return f"deepspeed_zero{cfg.strategy.stage}"
    return names.get(target, target)


def resolve_checkpoint(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its run record (MLflow run to continue, strategy that wrote it; None: a
    new MLflow run).

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


def check_resume(cfg: DictConfig, checkpoint: Path, record: dict[str, Any] | None) -> int:
    """Refuse a checkpoint this run's strategy cannot load (naming the strategy that wrote it) before anything,
    MLflow included, is touched; return the step it was written at.

    Sharded FSDP2 folders load under FSDP2 (at any world size: the shards are redistributed) and, consolidated in
    memory, under single or DDP; single files (single, DDP, or FSDP2 with save_distributed_checkpoint=false) load
    under single, DDP and FSDP2. DeepSpeed reads only its own checkpoints.
    """
    from scail2.lit.checkpoint import checkpoint_step, is_sharded, read_run_record

    sharded = is_sharded(checkpoint.resolve())
    layout = "a sharded folder" if sharded else "a single file"
    # The run folder's record says which strategy wrote its checkpoints (`record` is the MLflow run to continue).
    folder_record = read_run_record(checkpoint.resolve()) or {}
    writer = folder_record.get("strategy") or (record or {}).get("strategy") or ("fsdp2" if sharded else "single or ddp")
    reader = _strategy_name(cfg)
    if reader.startswith("deepspeed") != str(writer).startswith("deepspeed"):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: {checkpoint} was written by strategy={writer} ({layout}), which "
            f"strategy={reader} cannot load; resume with strategy={'fsdp2, ddp or single' if not str(writer).startswith('deepspeed') else writer}, "
            "or drop ckpt_path to start a fresh run"
        )
    step = checkpoint_step(checkpoint.resolve())
    if writer != reader:
        how = "consolidated in memory" if sharded and reader != "fsdp2" else "resharded" if reader == "fsdp2" else "loaded"
        log.info("resuming %s written by strategy=%s (%s) under strategy=%s: %s", checkpoint, writer, layout, reader, how)
    return step


def _run_status(record: dict[str, Any] | None) -> str | None:
    """The MLflow status of the run a checkpoint belongs to (read only), or None."""
    if not record or not record.get("run_id") or not record.get("tracking_uri"):
        return None
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).info.status
    except Exception as exc:  # noqa: BLE001 - an unreachable store is reported by the logger itself
        log.warning("could not read MLflow run %s: %s", record["run_id"], exc)
        return None


def _keep_status(record: dict[str, Any], status: str, exc: BaseException) -> None:
    """A failed resume of a finished run leaves the run FINISHED (the logger marks it FAILED on the way out);
    the failure is kept as the tag ``resume.failed``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["tracking_uri"])
    client.set_terminated(record["run_id"], status)
    client.set_tag(record["run_id"], "resume.failed", f"{type(exc).__name__}: {exc}"[:4000])
    log.info("the resume failed; MLflow run %s keeps its status %s", record["run_id"], status)


def _tracking(logger: Any) -> tuple[str | None, str | None]:
    """(tracking URI, run id) of an MLflow logger; (None, None) for other loggers."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not isinstance(logger, MLFlowLogger):
        return None, None
    return logger.experiment.tracking_uri, logger.run_id


def _report_init_from(cfg: DictConfig) -> None:
    """Print which export ``module.init_from: ${latest_export:NAME}`` resolved to (path, steps, run id)."""
    if "init_from" not in cfg.module:
        return
    raw = OmegaConf.to_container(cfg.module, resolve=False).get("init_from")
    if isinstance(raw, str) and "${latest_export:" in raw:
        from scail2.lit.export import describe_export

        print(f"module.init_from = {raw} -> {describe_export(cfg.module.init_from)}", flush=True)


def _check_schedule(module: Any) -> None:
    """Build the learning-rate schedule once on a stand-in optimizer, so that its settings fail here (before
    the MLflow run exists) rather than when Lightning configures the optimizers."""
    import torch

    if module.scheduler_factory is None:
        return
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        module.scheduler_factory(probe)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config `optim.scheduler`: {exc}") from exc


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


def build_trainer(
    cfg: DictConfig, run_id: str | None = None, extra_callbacks: Sequence[Any] = (), run: dict[str, Any] | None = None
) -> Any:
    """The Lightning Trainer of ``cfg``: strategy, callbacks, logger (continuing ``run_id`` if given). ``run``:
    what the export's training.json records about the run (run_name, experiment, overrides)."""
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
        callbacks.append(ExportModel(cfg.export.dir, cfg.export.dtype, cfg.export.encoders, cfg.export.encoders_mode, run))
    logger = False
    if cfg.logger is not None:
        logger = instantiate(cfg.logger, "logger", **({"run_id": run_id} if run_id else {}))
    plugins = [] if isinstance(strategy, DeepSpeedStrategy) else [AtomicCheckpointIO()]
    return instantiate(cfg.trainer, "trainer", strategy=strategy, callbacks=callbacks, logger=logger, plugins=plugins)


def _name_sweep_job(cfg: DictConfig, sweep: dict[str, Any] | None) -> None:
    """In a multirun, every job's MLflow run gets its own name: ``<run_name>-<job number>``."""
    if sweep is not None and cfg.logger is not None and "run_name" in cfg.logger:
        cfg.logger.run_name = f"{cfg.logger.run_name}-{sweep['num']}"


def _tag_sweep_job(logger: Any, sweep: dict[str, Any] | None) -> None:
    """Tags that group a sweep's runs in the MLflow UI: ``sweep`` (the sweep folder's name), ``sweep.job`` and
    ``sweep.overrides`` (this job's overrides, the swept values among them)."""
    from scail2.lit.tracking import set_tag

    if sweep is None:
        return
    set_tag(logger, "sweep", sweep["name"])
    set_tag(logger, "sweep.dir", sweep["dir"])
    set_tag(logger, "sweep.job", str(sweep["num"]))
    set_tag(logger, "sweep.overrides", " ".join(sweep["overrides"]))


def _nothing_to_train(cfg: DictConfig, checkpoint: Path, record: dict[str, Any] | None, step: int, start: float) -> TrainResult:
    """The result of a resume whose checkpoint is already at trainer.max_steps: nothing is built or logged."""
    run_id = (record or {}).get("run_id")
    why = (
        f"the checkpoint {checkpoint} is at step {step} and trainer.max_steps is {cfg.trainer.max_steps}"
        + (f"; MLflow run {run_id} is unchanged" if run_id else "")
        + ". To train further, raise trainer.max_steps (the schedule is restored as saved: a cosine that ended "
        "stays ended unless optim.scheduler.total_steps was set to the final length)"
    )
    return TrainResult(
        run_dir=Path(cfg.paths.run_dir), checkpoint_dir=checkpoint.parent, last_checkpoint=checkpoint, export_dir=None,
        tracking_uri=(record or {}).get("tracking_uri"), run_id=run_id, pipeline=False, resumed_from=checkpoint,
        seconds=time.perf_counter() - start, global_step=step, start_step=step, nothing_to_train=why,
    )  # fmt: skip


def train(cfg: DictConfig, extra_callbacks: Sequence[Any] = (), datamodule: Any = None) -> TrainResult:
    """Build everything from a composed config and fit; returns where the outputs are.

    Everything that can be refused (unset values, unknown keys, unsupported combinations, a schedule that does
    not fit the run, a checkpoint this strategy cannot load) is refused before the MLflow run is created or
    continued. A resume whose checkpoint is already at ``trainer.max_steps`` trains nothing and touches nothing.
    ``extra_callbacks`` are added to the configured ones; ``datamodule`` replaces ``cfg.data`` (both for use from
    Python, e.g. tests and notebooks). The run's CPU numerics (``threads``, ``flush_denormal``) are set first, before
    any parallel work, and the caller's are restored afterwards (`scail2.utils.cpu.cpu_numerics`).
    """
    from scail2.utils.cpu import cpu_numerics

    threads = cfg.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r}: need a positive number of torch threads, or null for the default")
    with cpu_numerics(threads, cfg.flush_denormal or None), _own_process_group():
        return _train(cfg, extra_callbacks, datamodule)


@contextlib.contextmanager
def _own_process_group() -> Iterator[None]:
    """Destroy the process group that the strategy created during this run, once the run is over.

    Lightning starts ``torch.distributed`` for a multi-process strategy and leaves it running. A process that exits
    with a gloo group still alive can abort while the interpreter shuts down (its worker threads still hold tensors),
    so the run that made the group ends it. A group that existed before the run belongs to the caller and is kept.
    """
    import torch.distributed as dist

    existed = dist.is_available() and dist.is_initialized()
    yield  # a failed run leaves the group alone: a peer may still be inside a collective with it
    if not existed and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(cfg: DictConfig, extra_callbacks: Sequence[Any], datamodule: Any) -> TrainResult:
    import lightning as L
    from lightning.pytorch.trainer.states import TrainerStatus
    from lightning.pytorch.utilities import rank_zero_only

    from scail2.config.checks import check_config
    from scail2.lit.checkpoint import write_run_record
    from scail2.lit.evaluation import evaluation_history
    from scail2.lit.export import ExportModel, mark_finished
    from scail2.lit.faults import RunIdentity, StopCheckpoint
    from scail2.lit.heldout import HeldOutPreferences
    from scail2.lit.tracking import record_outputs, record_run
    from scail2.lit.validation import SampleValidation

    start = time.perf_counter()
    _absolute_paths(cfg)
    _check_complete(cfg)
    check_config(cfg)
    validate_targets(cfg)
    check_combination(cfg)
    job = _hydra_job()
    _name_sweep_job(cfg, job["sweep"])
    is_zero = rank_zero_only.rank == 0
    if cfg.print_config and is_zero:
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    if is_zero:
        _report_init_from(cfg)
    run_dir = Path(cfg.paths.run_dir)
    ckpt_path, record = resolve_checkpoint(cfg)
    start_step = 0
    if ckpt_path is not None:
        start_step = check_resume(cfg, ckpt_path, record)
        if 0 < cfg.trainer.max_steps <= start_step and not cfg.trainer.fast_dev_run:
            return _nothing_to_train(cfg, ckpt_path, record, start_step, start)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    if datamodule is None:
        datamodule = instantiate(cfg.data, "data")
    if is_zero:
        # Lightning prepares the data again inside fit (a no-op once it exists); doing it here first makes data
        # that cannot be made or read (e.g. a cache built with other settings) fail before the MLflow run exists.
        datamodule.prepare_data()
    module = build_module(cfg)
    _check_schedule(module)
    status_before = _run_status(record) if is_zero else None
    run = {"run_name": cfg.run_name, "experiment": job["experiment"], "overrides": job["overrides"]}
    identity = RunIdentity(cfg.run_name)
    stop = StopCheckpoint(run_dir / "checkpoints")
    trainer = build_trainer(cfg, record["run_id"] if record else None, [*extra_callbacks, identity, stop], run=run)
    logger = trainer.logger
    checkpoint_cb = trainer.checkpoint_callback
    ckpt_dir = Path(checkpoint_cb.dirpath) if checkpoint_cb is not None and checkpoint_cb.dirpath else None
    stop.dirpath = ckpt_dir or stop.dirpath
    tracking_uri = run_id = None
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        if is_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            if logger is not None:
                config_file = run_dir / "config.yaml"
                config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
                record_run(logger, to_container(cfg), config_file, resumed=ckpt_path is not None)
                tracking_uri, run_id = _tracking(logger)
                _tag_sweep_job(logger, job["sweep"])
            # Next to the checkpoints: which MLflow run they belong to and which strategy wrote them.
            write_run_record(run_dir, {
                "run_id": run_id, "tracking_uri": tracking_uri, "experiment_name": cfg.run_name,
                "strategy": _strategy_name(cfg), "world_size": trainer.world_size,
            })  # fmt: skip
            identity.record.update(run_id=run_id, tracking_uri=tracking_uri)
        if ckpt_path is not None and is_zero:
            log.info("resuming from %s at step %d%s", ckpt_path, start_step, f" (MLflow run {record['run_id']})" if record and record.get("run_id") else "")

        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        except SIGTERMException:
            from scail2.lit.faults import stopped

            raise stopped(trainer, stop, run_id) from None
    except BaseException as exc:
        if status_before == "FINISHED":
            _keep_status(record, status_before, exc)
        raise

    export = next((cb for cb in trainer.callbacks if isinstance(cb, ExportModel)), None)
    finished = (
        trainer.state.status == TrainerStatus.FINISHED
        and not trainer.fast_dev_run
        and (cfg.trainer.max_steps <= 0 or trainer.global_step >= cfg.trainer.max_steps)
    )
    if is_zero and finished and export is not None and export.network_dir is not None:
        mark_finished(export.network_dir)
    last = Path(checkpoint_cb.last_model_path) if checkpoint_cb is not None and checkpoint_cb.last_model_path else None
    heldout = evaluation_history(trainer, HeldOutPreferences)
    validation = evaluation_history(trainer, SampleValidation)
    if is_zero and logger is not None:
        histories = {
            "validation": [{"step": v.step, **v.metrics} for v in validation],
            "heldout": heldout,
        }
        record_outputs(logger, run_dir, ckpt_dir, export.written if export is not None else None, histories)
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
        validation=validation,
        heldout=heldout,
        network_dir=export.network_dir if export is not None else None,
        lora_dir=export.lora_dir if export is not None else None,
        start_step=start_step,
        finished=finished,
        reports=[line for cb in trainer.callbacks if callable(getattr(cb, "summary_lines", None)) for line in cb.summary_lines()],
    )


def summary(result: TrainResult) -> str:
    """The end-of-run report: what was learned and where everything is."""
    from scail2.lit.tracking import mlflow_ui_command

    took = timedelta(seconds=round(result.seconds))
    if result.nothing_to_train is not None:
        return f"\nNothing to train: {result.nothing_to_train}."
    if result.resumed_from is not None:
        trained = result.global_step - result.start_step
        lines = [f"\nTraining finished: {trained} steps (step {result.start_step} -> {result.global_step}, resumed from "
                 f"{result.resumed_from}) in {took}."]  # fmt: skip
    else:
        lines = [f"\nTraining finished: {result.global_step} steps in {took}."]
    if not result.finished:
        lines.append("  (the run stopped before trainer.max_steps or was a fast_dev_run: its export is not marked finished)")
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
    lines += result.reports
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


def _traceback_to_log_file(exc: BaseException) -> str | None:
    """Write ``exc``'s traceback to the log file of this job (Hydra's ``train.log``) only; its path, or None."""
    files = [
        h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull
    ]
    for handler in files:
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "the run stopped:", (), (type(exc), exc, exc.__traceback__)))
    return files[0].baseFilename if files else None


def _task(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities import rank_zero_only

    from scail2.lit.faults import TrainingStopped
    from scail2.models.loading import CheckpointError

    try:
        result = train(cfg)
    except (ConfigError, CheckpointError, *USER_ERRORS) as exc:
        where = _traceback_to_log_file(exc)
        print(f"error: {exc}" + (f" (traceback in {where})" if where else ""), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
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


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def composition_error(exc: BaseException, overrides: Sequence[str]) -> str:
    """A one-line message for a Hydra composition error: the key or option, the closest valid one, the fix."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:  # a misspelt option: experiment=dem
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        close = _closest(option, options)
        hint = f"; did you mean {group}={close}?" if close else ""
        return f"{group}={option}: no such option{hint} (options: {', '.join(options)})"
    key = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text)
    if key is None:
        return " ".join(line.strip() for line in text.strip().splitlines())
    key_name = key.group(1)
    parent, _, leaf = key_name.rpartition(".")
    rest = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key_name and not o.startswith("-")]
    valid: list[str] = []
    try:
        from hydra.core.global_hydra import GlobalHydra

        from scail2.config.schema import compose_config

        GlobalHydra.instance().clear()
        base = compose_config(rest)
        node = OmegaConf.select(base, parent) if parent else base
        valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - no suggestion then; the message stands on its own
        pass
    close = _closest(leaf, valid)
    hint = f"; did you mean `{parent + '.' if parent else ''}{close}`?" if close else ""
    return f"`{key_name}` is not a config key{hint} ({first.rstrip('.')}; `--cfg job` prints every key)"


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``scail2-train``); ``argv`` replaces the command-line arguments when given."""
    import hydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from scail2.config.checks import prepare_command_line
    from scail2.config.schema import config_dir, register_configs

    try:
        register_configs()
        overrides = prepare_command_line(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    sys.argv = [sys.argv[0], *overrides]
    # Hydra prints composition errors itself unless asked to raise them; raised, they are reported below in one
    # line with the closest valid key. (Errors of the job itself are handled in _task.)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_task)()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as exc:
        print(f"error: {composition_error(exc, overrides)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    main()
