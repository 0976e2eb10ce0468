"""What a run records besides its metrics: resolved config, code version, package versions, files.

Everything goes through the Lightning logger; only `MLFlowLogger` receives tags and artifacts (other loggers
get the metrics and hyperparameters Lightning gives them).
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path
from typing import Any

TRACKED_PACKAGES: tuple[str, ...] = (
    "torch", "lightning", "hydra-core", "omegaconf", "mlflow", "diffusers", "transformers", "deepspeed",
)


def _mlflow(logger: Any) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    return logger if isinstance(logger, MLFlowLogger) else None


def set_tag(logger: Any, key: str, value: str) -> None:
    ml = _mlflow(logger)
    if ml is not None:
        ml.experiment.set_tag(ml.run_id, key, value)


def log_artifacts(logger: Any, folder: Path, artifact_path: str) -> None:
    """Copy every file of ``folder`` to the run's artifacts under ``artifact_path``."""
    ml = _mlflow(logger)
    if ml is not None:
        ml.experiment.log_artifacts(ml.run_id, str(folder), artifact_path)


def log_artifact(logger: Any, path: Path, artifact_path: str | None = None) -> None:
    ml = _mlflow(logger)
    if ml is not None:
        ml.experiment.log_artifact(ml.run_id, str(path), artifact_path)


def git_state(folder: Path) -> dict[str, str]:
    """``git_sha`` and ``git_dirty`` ("true"/"false") of the checkout holding ``folder``; "unknown" outside git."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": "unknown", "git_dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def record_run(logger: Any, config: dict[str, Any], config_file: Path, resumed: bool) -> None:
    """Log the resolved config (flattened params + the YAML file), the git state and package versions.

    On a resumed run the params are not logged again (MLflow refuses changed values; the first run's are kept)
    and a ``resumed`` tag is added instead.
    """
    import scail2

    if not resumed:
        logger.log_hyperparams(config)
    ml = _mlflow(logger)
    if ml is None:
        return
    tags = {**git_state(Path(__file__).parent), "scail2_version": scail2.__version__}
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    if resumed:
        tags["resumed"] = "true"
    for key, value in tags.items():
        ml.experiment.set_tag(ml.run_id, key, value)
    ml.experiment.log_artifact(ml.run_id, str(config_file), "config")


def mlflow_ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"


# A last checkpoint up to this size is uploaded to the run's artifacts; larger ones are recorded by location
# (checkpoints.json, tag checkpoint.latest): artifact stores are rarely meant for tens of GB per run.
CHECKPOINT_ARTIFACT_MAX_BYTES = 64 * 2**20


def absolute_tracking_uri(uri: str) -> str:
    """A ``sqlite:///relative/path`` store made absolute (taken from the working directory), its folder created;
    other URIs (absolute sqlite paths, servers) unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = Path(uri[len(prefix):]).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return prefix + str(path)


def sha256_file(path: Path, chunk: int = 2**24) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: Path) -> list[dict[str, Any]]:
    """Every file under ``folder`` (links followed): relative path, size and sha256."""
    return [
        {"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def record_outputs(
    logger: Any,
    run_dir: Path,
    checkpoint_dir: Path | None,
    export_dir: Path | None,
    histories: dict[str, list[dict[str, Any]]],
) -> None:
    """Make the MLflow run the record of a run's outputs (global rank 0, after fit):

    - ``outputs/checkpoints.json``: every complete checkpoint (path, step, bytes) and tag ``checkpoint.dir``;
      the last one itself under ``checkpoints/`` when it is at most `CHECKPOINT_ARTIFACT_MAX_BYTES`;
    - ``outputs/export.json``: the exported folder's files (paths, sizes, sha256: model, LoRA adapters, encoder
      copies), its ``training.json``, and tags ``export.sha256`` (of export.json's file list) and, for a LoRA
      export, ``lora.sha256`` (its adapter weights);
    - ``train.log`` (the run folder's log);
    - ``<name>/history.json`` for each non-empty history (``validation``: sampling metrics; ``heldout``: DPO's
      held-out pair metrics), the figures the summary prints.
    """
    import hashlib
    import json
    import tempfile

    from scail2.lit.checkpoint import checkpoint_step, find_resume_checkpoint, is_complete

    ml = _mlflow(logger)
    if ml is None:
        return
    client, run_id = ml.experiment, ml.run_id
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)

        def dump(name: str, payload: Any, artifact_path: str) -> None:
            path = staging / artifact_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=1) + "\n")
            client.log_artifact(run_id, str(path), artifact_path)

        if checkpoint_dir is not None and checkpoint_dir.is_dir():
            found = sorted(p for p in checkpoint_dir.glob("*.ckpt") if not p.is_symlink() and is_complete(p))
            listed = [
                {"path": str(p.resolve()), "step": checkpoint_step(p),
                 "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size}
                for p in found
            ]  # fmt: skip
            dump("checkpoints.json", listed, "outputs")
            client.set_tag(run_id, "checkpoint.dir", str(checkpoint_dir.resolve()))
            last = find_resume_checkpoint([checkpoint_dir])
            if last is not None and last.is_file() and last.stat().st_size <= CHECKPOINT_ARTIFACT_MAX_BYTES:
                client.log_artifact(run_id, str(last), "checkpoints")
        if export_dir is not None and export_dir.is_dir():
            files = file_manifest(export_dir)
            dump("export.json", {"folder": str(export_dir.resolve()), "files": files}, "outputs")
            listing = "\n".join(f"{f['sha256']}  {f['path']}" for f in files)
            client.set_tag(run_id, "export.sha256", hashlib.sha256(listing.encode()).hexdigest())
            lora = next((f for f in files if f["path"] == "lora/adapter_model.safetensors"), None)
            if lora is not None:
                client.set_tag(run_id, "lora.sha256", lora["sha256"])
            for record in export_dir.glob("**/training.json"):
                inside = record.parent.relative_to(export_dir)
                client.log_artifact(run_id, str(record), "outputs" if inside == Path(".") else f"outputs/{inside}")
        log_file = run_dir / "train.log"
        if log_file.is_file():
            client.log_artifact(run_id, str(log_file))
        for name, history in histories.items():
            if history:
                dump("history.json", history, name)
