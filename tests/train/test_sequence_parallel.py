"""Training with sequence parallelism on CPU (gloo, 2 processes sharing each sequence): the losses of a short run
equal those of one process within 1e-5, with FSDP2 (parameters sharded over both ranks) and with DDP, both
ranks end with the same weights, and a run resumed from a checkpoint continues with the same losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import checkpoint_under

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _torchrun(strategy: str, data_root: Path, out: Path, *overrides: str) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "tests.train.dist_worker", "--strategy", strategy,
           "--data-root", str(data_root), "--out", str(out), "--init-from", "none"]
    for o in ("strategy.sequence_parallel=2", *overrides):
        cmd += ["--override", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory) -> list[float]:
    """The losses of the same run in one process (strategy=single)."""
    from scail2.train import train

    from .conftest import compose_run
    from .helpers import LossRecorder

    out = tmp_path_factory.mktemp("single")
    cfg = compose_run(data_root, out, "logger=none", f"trainer.max_steps={STEPS}", "callbacks.progress=null",
                      "trainer.enable_progress_bar=false", "export.enabled=false")
    losses = LossRecorder()
    train(cfg, [losses])
    return losses.losses


@pytest.fixture(scope="module")
def fsdp2(data_root, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("sp_fsdp2")
    return out, _torchrun("fsdp2", data_root, out)


# DDP with sequence parallelism is also covered by the model-level parity test (tests/test_sequence_parallel.py).
@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("ddp", marks=pytest.mark.slow)])
def test_losses_equal_one_process(strategy, single, fsdp2, data_root, tmp_path):
    ranks = fsdp2[1] if strategy == "fsdp2" else _torchrun("ddp", data_root, tmp_path, "export.enabled=false")
    assert len(single) == STEPS and ranks[0]["step"] == ranks[1]["step"] == STEPS
    for r in ranks:  # every rank of the sequence group holds the same loss
        assert max(abs(a - b) for a, b in zip(r["losses"], single)) <= 1e-5, (strategy, r["losses"], single)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert len(set(single)) == STEPS  # the losses change from step to step: a real comparison


def test_resume_continues_with_the_same_losses(fsdp2, data_root, tmp_path):
    out, ranks = fsdp2
    written = next(out.glob("demo/*/checkpoints")) / "step=0000002.ckpt"
    ckpt = checkpoint_under(tmp_path, written)
    resumed = _torchrun("fsdp2", data_root, tmp_path, f"ckpt_path='{ckpt}'", "export.enabled=false")
    assert resumed[0]["step"] == STEPS
    for r in resumed:
        assert max(abs(a - b) for a, b in zip(r["losses"], ranks[0]["losses"][2:])) <= 1e-6, r["losses"]
    assert resumed[0]["weights"] == ranks[0]["weights"]
