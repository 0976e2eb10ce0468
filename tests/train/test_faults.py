"""Faults end loudly: SIGTERM writes one checkpoint and exits 143, truncated checkpoints are passed over,
non-finite weights are never checkpointed, divergence ends the run non-zero, and a copied run folder never
appends to the MLflow run it was copied from."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from scail2.config import ConfigError
from scail2.lit.checkpoint import AtomicCheckpointIO, NonFiniteCheckpoint, find_resume_checkpoint
from scail2.lit.faults import EXIT_SIGTERM, RUN_KEY, TrainingStopped, inspect_checkpoint
from scail2.train import EXIT_DIVERGED, _task, train

from .conftest import compose_run, train_overrides

pytestmark = pytest.mark.hostile
QUIET = ("callbacks.progress=null", "trainer.enable_progress_bar=false", "export.enabled=false")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


class SendSignal(Callback):
    """Sends ``signum`` to this process at the end of batch ``at`` (as a scheduler would, mid-run)."""

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = at, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at:
            os.kill(os.getpid(), self.signum)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ----------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_checkpoints_the_finished_step_and_resume_is_exact(data_root, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    common = (*QUIET, "optim.scheduler.total_steps=6", "callbacks.checkpoint.every_n_train_steps=100",
              f"logger.tracking_uri={mlflow_uri}")
    straight = train(compose_run(data_root, tmp_path / "a", *common, "trainer.max_steps=6", "run_name=straight"))
    cfg = compose_run(data_root, tmp_path / "b", *common, "trainer.max_steps=6", "run_name=stopped")
    with pytest.raises(TrainingStopped) as info:
        train(cfg, [SendSignal(at=2)])  # the signal arrives during step 3; that step finishes, then the run stops
    stopped = info.value
    assert stopped.exit_code == EXIT_SIGTERM == 143 and stopped.global_step == 3
    assert stopped.checkpoint == tmp_path / "b" / "stopped" / "run" / "checkpoints" / "step=0000003.ckpt"
    assert inspect_checkpoint(stopped.checkpoint) is None
    assert (stopped.checkpoint.parent / "last.ckpt").resolve() == stopped.checkpoint
    message = str(stopped)
    assert "stopped by SIGTERM after step 3" in message and str(stopped.checkpoint) in message
    assert "Resume with: scail2-train" in message and "ckpt_path=last" in message
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(client.get_experiment_by_name("stopped").experiment_id)
    assert run.info.status == "KILLED" and "marked KILLED" in message

    resumed = train(compose_run(data_root, tmp_path / "b", *common, "trainer.max_steps=6", "run_name=stopped",
                                "ckpt_path=last", run="resumed"))
    assert resumed.resumed_from == stopped.checkpoint and resumed.global_step == 6
    assert resumed.run_id == run.info.run_id  # the same MLflow run continues

    def losses(run_id):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))

    assert losses(resumed.run_id) == losses(straight.run_id)  # the same six steps, bit-exact, no step twice
    a, b = _weights(straight.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_at_the_start_finishes_the_first_step_and_checkpoints_it(data_root, tmp_path):
    class Early(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = compose_run(data_root, tmp_path, *QUIET, "logger=none", "trainer.max_steps=4")
    with pytest.raises(TrainingStopped, match="after step 1") as info:
        train(cfg, [Early()])
    # Lightning finishes the running step before it stops: one step, one checkpoint.
    assert info.value.checkpoint is not None and info.value.checkpoint.name == "step=0000001.ckpt"


def _read_until(proc: subprocess.Popen, needle: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return
    raise AssertionError("the run ended before: " + "".join(lines[-40:]))


@pytest.mark.slow
def test_sigterm_from_outside_exits_143_with_where_to_resume(data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = train_overrides(
        data_root, tmp_path, "trainer.max_steps=100000", "optim.scheduler.total_steps=100000",
        "callbacks.checkpoint.every_n_train_steps=100000", "callbacks.progress.style=lines",
        "callbacks.progress.every_n_steps=1", f"logger.tracking_uri={uri}", "export.enabled=false",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scail2.train", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    killer = threading.Timer(600, proc.kill)  # a hang fails the test instead of blocking the suite
    killer.start()
    try:
        _read_until(proc, "step 3/", lines)
        proc.send_signal(signal.SIGTERM)
        lines += proc.stdout.readlines()
        code = proc.wait()
    finally:
        killer.cancel()
        proc.kill()
    out = "".join(lines)
    assert code == 143, out[-3000:]
    assert "Training stopped by SIGTERM after step" in out and "Training finished" not in out
    (ckpt,) = (tmp_path / "demo").glob("*/checkpoints/step=*.ckpt")
    assert f"Checkpoint of step {int(ckpt.stem.split('=')[1])}: {ckpt}" in out
    assert inspect_checkpoint(ckpt) is None and "Resume with: scail2-train" in out and "ckpt_path=last" in out
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("demo").experiment_id)
    assert run.info.status == "KILLED"


# ----------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(data_root, tmp_path_factory):
    """A run folder with step=0000002.ckpt and step=0000004.ckpt."""
    out = tmp_path_factory.mktemp("ckpts")
    cfg = compose_run(data_root, out, *QUIET, "logger=none", "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2")
    train(cfg)
    folder = out / "demo" / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step=*.ckpt")) == ["step=0000002.ckpt", "step=0000004.ckpt"]
    return out


def _damage(kind: str, path: Path, tmp_path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "cut_at_the_end":
        path.write_bytes(data[:-100])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
    elif kind == "pickle_payload":
        path.write_bytes(pickle.dumps(_Touch(str(tmp_path / "MARKER"))))
    os.utime(path, None)  # still the newest


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["truncated", "cut_at_the_end", "garbage", "not_a_checkpoint", "pickle_payload"])
def test_a_damaged_newest_checkpoint_is_passed_over_saying_so(two_checkpoints, tmp_path, caplog, kind, data_root):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    folder = out / "demo" / "run" / "checkpoints"
    _damage(kind, folder / "step=0000004.ckpt", tmp_path)
    with caplog.at_level(logging.WARNING, logger="scail2.train"):
        assert find_resume_checkpoint([folder]) == folder / "step=0000002.ckpt"
    assert "step=0000004.ckpt" in caplog.text and "newest complete checkpoint" in caplog.text
    assert not (tmp_path / "MARKER").exists()
    cfg = compose_run(data_root, out, *QUIET, "logger=none", "trainer.max_steps=3", "ckpt_path=last", run="again")
    result = train(cfg)
    assert result.resumed_from == folder / "step=0000002.ckpt" and result.global_step == 3
    # Named explicitly, the damaged checkpoint is refused in one line.
    cfg = compose_run(data_root, out, *QUIET, "logger=none", run="named")
    cfg.ckpt_path = str(folder / "step=0000004.ckpt")
    with pytest.raises(ConfigError, match=r"step=0000004\.ckpt.*(cannot be read|not a training checkpoint)") as info:
        train(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "MARKER").exists()


def test_no_resumable_checkpoint_is_a_one_line_error(tmp_path, data_root):
    folder = tmp_path / "demo" / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step=0000002.ckpt").write_bytes(b"\x00" * 64)
    cfg = compose_run(data_root, tmp_path, *QUIET, "logger=none", "ckpt_path=last", run="again")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(cfg)


@pytest.mark.parametrize("where", ["state_dict", "optimizer_states"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_or_optimizer_state_are_never_checkpointed(tmp_path, where, value):
    state = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}]}
    if where == "state_dict":
        state["state_dict"]["w"][1] = value
    else:
        state["optimizer_states"][0]["state"][0]["exp_avg"][2] = value
    path = tmp_path / "step=0000005.ckpt"
    with pytest.raises(NonFiniteCheckpoint, match=rf"not writing checkpoint step=0000005\.ckpt.*{where}"):
        AtomicCheckpointIO().save_checkpoint({**state, "global_step": 5}, path)
    assert list(tmp_path.iterdir()) == []


class Corrupt(Callback):
    """Puts a NaN into one weight at the end of batch ``at`` (as an overflow in low precision would), before
    the checkpoint callback runs."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")


def test_a_run_whose_weights_turn_non_finite_keeps_its_last_good_checkpoint(data_root, tmp_path):
    cfg = compose_run(data_root, tmp_path, *QUIET, "logger=none", "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=1")
    with pytest.raises(NonFiniteCheckpoint, match=r"not writing checkpoint step=0000002\.ckpt.*state_dict\['net\.") as info:
        train(cfg, [Corrupt(at=1)])
    assert isinstance(info.value, FloatingPointError)  # the command line ends with EXIT_DIVERGED
    folder = tmp_path / "demo" / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=0000001.ckpt"]
    assert (folder / "last.ckpt").resolve().name == "step=0000001.ckpt"
    assert find_resume_checkpoint([folder]) == folder / "step=0000001.ckpt"


def test_a_loss_above_max_loss_ends_the_run_non_zero(data_root, tmp_path, capsys):
    cfg = compose_run(data_root, tmp_path, *QUIET, "logger=none", "trainer.max_steps=4", "module.max_loss=1e-6")
    with pytest.raises(SystemExit) as info:
        _task(cfg)
    assert info.value.code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "the run diverged" in err and "above module.max_loss=1e-06" in err and "at step 0" in err


# ----------------------------------------------------------------------------------------------- MLflow runs
def test_a_copied_run_folder_does_not_append_to_the_original_run(data_root, tmp_path, mlflow_uri, caplog):
    from mlflow.tracking import MlflowClient

    common = (*QUIET, "trainer.max_steps=2", "optim.scheduler.warmup_steps=0", "callbacks.checkpoint.every_n_train_steps=2",
              f"logger.tracking_uri={mlflow_uri}")
    original = train(compose_run(data_root, tmp_path, *common, "run_name=original"))
    client = MlflowClient(mlflow_uri)
    before = client.get_metric_history(original.run_id, "train/loss")
    shutil.copytree(tmp_path / "original", tmp_path / "copy", symlinks=True)
    cfg = compose_run(data_root, tmp_path, *QUIET, "trainer.max_steps=3", "optim.scheduler.warmup_steps=0",
                      f"logger.tracking_uri={mlflow_uri}", "run_name=copy", "ckpt_path=last", run="resumed")
    with caplog.at_level(logging.WARNING, logger="scail2.train"):
        resumed = train(cfg)
    assert resumed.resumed_from.is_relative_to(tmp_path / "copy") and resumed.global_step == 3
    assert resumed.run_id != original.run_id and "belongs to run_name=original" in caplog.text
    assert client.get_metric_history(original.run_id, "train/loss") == before  # the original is untouched
    ckpt = torch.load(resumed.last_checkpoint, weights_only=True)
    assert ckpt[RUN_KEY] == {"run_name": "copy", "run_id": resumed.run_id, "tracking_uri": mlflow_uri}


def test_the_checkpoint_not_the_folder_record_names_the_run(data_root, tmp_path, mlflow_uri, caplog):
    import json

    from mlflow.tracking import MlflowClient

    common = (*QUIET, "trainer.max_steps=2", "optim.scheduler.warmup_steps=0", "callbacks.checkpoint.every_n_train_steps=2",
              f"logger.tracking_uri={mlflow_uri}")
    victim = train(compose_run(data_root, tmp_path, *common, "run_name=victim"))
    mine = train(compose_run(data_root, tmp_path, *common, "run_name=mine"))
    # A folder record pointed at another run (edited, or copied over) does not redirect the metrics there.
    record = tmp_path / "mine" / "run" / "mlflow_run.json"
    record.write_text(json.dumps({"run_id": victim.run_id, "tracking_uri": mlflow_uri, "experiment_name": "mine"}))
    client = MlflowClient(mlflow_uri)
    before = client.get_metric_history(victim.run_id, "train/loss")
    resumed = train(compose_run(data_root, tmp_path, *QUIET, "trainer.max_steps=3", "optim.scheduler.warmup_steps=0",
                                f"logger.tracking_uri={mlflow_uri}", "run_name=mine", "ckpt_path=last", run="resumed"))
    assert resumed.run_id == mine.run_id
    assert client.get_metric_history(victim.run_id, "train/loss") == before
