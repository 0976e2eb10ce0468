"""The command line: ``python -m scail2.train`` prints the resolved config and the outputs; ``-m`` sweeps; the
DDP launch from the command line (Lightning starts the second process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import train_overrides


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "scail2.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_sweep_prints_config_and_summary_per_job(data_root, tmp_path):
    """A two-job sweep: the resolved config and summary of each job; one MLflow run per job, named apart and
    tagged with the sweep and the job's overrides."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    quick = ("trainer.max_steps=1", "optim.scheduler.warmup_steps=0", "export.enabled=false", "callbacks.checkpoint=null",
             "trainer.enable_checkpointing=false", f"paths.mlflow={store}")  # fmt: skip
    args = [a for a in train_overrides(data_root, tmp_path, *quick) if a != "print_config=false"]
    proc = _run(["-m", *args, "optim.optimizer.lr=1e-3,2e-3"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Training finished: 1 steps") == 2
    assert "lr: 0.001" in proc.stdout and "lr: 0.002" in proc.stdout  # the resolved config of each job
    sweep = next((tmp_path / "demo").glob("multirun_*"))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    by_name = {r.info.run_name: r.data.tags for r in runs}
    assert sorted(by_name) == ["demo-0", "demo-1"]
    assert {t["sweep"] for t in by_name.values()} == {sweep.name}
    assert "optim.optimizer.lr=0.001" in by_name["demo-0"]["sweep.overrides"]
    assert "optim.optimizer.lr=0.002" in by_name["demo-1"]["sweep.overrides"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["module.nonfinit=skip"], "error: `module.nonfinit` is not a config key; did you mean `module.nonfinite`?"),
        (["experiment=dem"], "error: experiment=dem: no such option; did you mean experiment=demo?"),
        (["trainer.max_step=3"], "error: `trainer.max_step` is not a config key; did you mean `trainer.max_steps`?"),
    ],
)
def test_composition_errors_are_one_line_with_the_closest_key(tmp_path, monkeypatch, capsys, argv, message):
    from scail2.train import main

    monkeypatch.setattr(sys, "argv", ["scail2-train"])
    with pytest.raises(SystemExit) as exit_info:
        main([f"paths.output_root={tmp_path}", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_job_errors_are_one_line_with_the_fix(tmp_path):
    """Errors of the job (unset required values, a `+key` typo, data made with other settings) print one line,
    exit 2 before any MLflow run exists, and leave the traceback in train.log."""
    import json

    # Tiny encoders of another kind where the data module will look for its own.
    stale = tmp_path / "data" / "synthetic-2p-5x32x32-s0-random" / "encoders"
    (stale / "vae").mkdir(parents=True)
    (stale / "vae" / "config.json").write_text("{}")
    (stale / "tiny_encoders.json").write_text(json.dumps({"version": 0, "seed": 0}))
    small = ["data.pairs=2", "data.frames=5", "data.height=32", "data.width=32", f"paths.data_root={tmp_path / 'data'}"]
    for argv, message in (
        (["experiment=pretrain_wan14b"], "error: required config values are not set: ['data.cache_dir', 'module.init_from']"),
        (["experiment=demo", "+module.nonfinit=skip"], "error: config `module.nonfinit`: scail2.lit.pretrain.PretrainModule has no parameter `nonfinit`; did you mean `nonfinite`?"),
        (["experiment=demo", *small], f"error: {stale} holds tiny encoders of another kind (version 0, seed 0, random VAE;"),
    ):  # fmt: skip
        proc = _run([f"paths.output_root={tmp_path}", "print_config=false", *argv], tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(message) and " (traceback in " in last, proc.stderr[-3000:]
        assert "Traceback" in Path(last.rsplit(" (traceback in ", 1)[1].rstrip(")")).read_text()
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was created


@pytest.mark.multiprocess
def test_ddp_from_the_command_line(data_root, tmp_path):
    args = train_overrides(data_root, tmp_path, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=4", "logger=none")
    proc = _run(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Training finished: 4 steps" in out
    (model,) = (tmp_path / "demo").glob("*/model")
    assert (model / "config.json").exists()
