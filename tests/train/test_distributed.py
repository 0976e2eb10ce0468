"""Two CPU processes (gloo): DDP and FSDP2 start from the same weights (FSDP2: built on the meta device,
sharded, loaded on rank 0 and broadcast), train, every rank ends with the same weights, and both strategies
reach the same weights as each other (same data and noise per rank, different reduction order)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import checkpoint_under

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]


def _torchrun(strategy: str, data_root: Path, out: Path, init: Path, ckpt_path: Path | None = None) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "tests.train.dist_worker",
           "--strategy", strategy, "--data-root", str(data_root), "--out", str(out), "--init-from", str(init),
           *(["--ckpt-path", str(ckpt_path)] if ckpt_path else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory) -> dict[str, Path]:
    from scail2.models import save_pretrained, scail2_config
    from scail2.models.loading import build_model
    from scail2.testing import randomize_

    init = save_pretrained(randomize_(build_model(scail2_config("tiny")), seed=5), tmp_path_factory.mktemp("init") / "tiny")
    out = {"init": init}
    for strategy in ("ddp", "fsdp2"):
        out[strategy] = tmp_path_factory.mktemp(strategy)
        _torchrun(strategy, data_root, out[strategy], init)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_end_with_the_same_weights(runs, strategy):
    ranks = [json.loads((runs[strategy] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_fsdp2_checkpoints_are_sharded_and_complete(runs):
    from scail2.lit.checkpoint import find_resume_checkpoint, is_complete

    folder = next(runs["fsdp2"].glob("demo/*/checkpoints"))
    for name in ("step=0000002.ckpt", "step=0000004.ckpt"):
        path = folder / name
        assert path.is_dir() and is_complete(path) and len(list(path.glob("*.distcp"))) == 2
    assert find_resume_checkpoint([folder]) == folder / "step=0000004.ckpt"
    assert not list(folder.glob(".*partial"))


def test_ddp_and_fsdp2_agree(runs):
    from safetensors.torch import load_file

    a = load_file(next(runs["ddp"].glob("demo/*/model")) / "diffusion_pytorch_model.safetensors")
    b = load_file(next(runs["fsdp2"].glob("demo/*/model")) / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp2_checkpoint_resumes_under_single_device(runs, data_root, tmp_path):
    """A sharded FSDP2 checkpoint, consolidated in memory, resumes under the default single-device strategy:
    weights and optimizer state at the first step are the checkpoint's, and its run record names the writer."""
    from scail2.lit.checkpoint import consolidate_sharded, read_run_record
    from scail2.train import train

    from .conftest import compose_run
    from .helpers import StateAround

    folder = next(runs["fsdp2"].glob("demo/*/checkpoints"))
    assert read_run_record(folder / "step=0000002.ckpt")["strategy"] == "fsdp2"
    full = consolidate_sharded(folder / "step=0000004.ckpt")
    from safetensors.torch import load_file

    exported = load_file(next(runs["fsdp2"].glob("demo/*/model")) / "diffusion_pytorch_model.safetensors")
    assert {k.removeprefix("net."): v for k, v in full["state_dict"].items()}.keys() == exported.keys()
    assert all(torch.equal(full["state_dict"][f"net.{k}"], v) for k, v in exported.items())

    class FirstBatch(StateAround):  # the state before the first batch this process trains (batch_idx goes on)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.index = batch_idx if self.before is None else -1
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    step2 = consolidate_sharded(folder / "step=0000002.ckpt")
    state = FirstBatch(-1)
    cfg = compose_run(data_root, tmp_path, "logger=none", "trainer.max_steps=3", f"ckpt_path='{checkpoint_under(tmp_path, folder / 'step=0000002.ckpt')}'")
    result = train(cfg, [state])
    assert result.start_step == 2 and result.global_step == 3
    assert all(torch.equal(state.before["net"][k.removeprefix("net.")], v) for k, v in step2["state_dict"].items())
    optim, saved = state.before["optim"], step2["optimizer_states"][0]
    assert optim["state"].keys() == saved["state"].keys() and len(optim["state"]) == len(list(state.module.net.parameters()))
    for i, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(optim["state"][i][name]), torch.as_tensor(value)), (i, name)


def test_single_device_checkpoint_resumes_under_fsdp2(runs, data_root, tmp_path):
    """The other way: a single-file checkpoint of a single-device run resumes under FSDP2 on 2 ranks (sharded
    on load) and both ranks start from its weights."""
    from scail2.train import train

    from .conftest import compose_run
    from .dist_worker import weight_digest

    cfg = compose_run(data_root, tmp_path / "single", "logger=none", "trainer.max_steps=2", "optim.scheduler.total_steps=4",
                      "callbacks.checkpoint.every_n_train_steps=2", f"module.init_from={runs['init']}")  # fmt: skip
    single = train(cfg)
    checkpoint = single.checkpoint_dir / "step=0000002.ckpt"
    expected = weight_digest({k.removeprefix("net."): v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items()})
    out = tmp_path / "resumed"
    out.mkdir()
    _torchrun("fsdp2", data_root, out, runs["init"], ckpt_path=checkpoint_under(out, checkpoint))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["start"] == ranks[1]["start"] == expected
    assert ranks[0]["step"] == ranks[1]["step"] == 4 and ranks[0]["weights"] == ranks[1]["weights"]
