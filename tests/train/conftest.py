"""Fixtures of the training tests: one small synthetic dataset per session, composed configs around it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# The dataset every training test reads: 6 pairs of 9 frames at 32x32 (latents 3 x 4 x 4), ~15 s to make.
# No held-out pairs: the motion benchmark of experiment=demo is skipped unless a test sets data.heldout_pairs.
DATA_OVERRIDES = ["data.pairs=6", "data.frames=9", "data.height=32", "data.width=32", "data.batch_size=2", "data.heldout_pairs=0"]


def make_data_root(root: Path) -> Path:
    """Write the test dataset (synthetic pairs, tiny encoders, latent cache) under ``root``."""
    from scail2.config import compose_config, instantiate

    cfg = compose_config(["experiment=demo", f"paths.data_root={root}", *DATA_OVERRIDES])
    instantiate(cfg.data, "data").prepare_data()
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """``paths.data_root`` holding the synthetic dataset, tiny encoders and latent cache (made once)."""
    return make_data_root(tmp_path_factory.mktemp("scail2-data"))


def train_overrides(data_root: Path, out: Path, *extra: str) -> list[str]:
    """Overrides of a quick CPU run of the tiny model on the session dataset, writing under ``out``."""
    return [
        "experiment=demo",
        f"paths.data_root={data_root}",
        f"paths.output_root={out}",
        *DATA_OVERRIDES,
        "print_config=false",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "optim.scheduler.warmup_steps=2",
        # Validation sampling off unless the test configures it.
        *([] if any(e.startswith(("module.validation.", "+module.validation.")) for e in extra) else ["module.validation=null"]),
        *extra,
    ]


def compose_run(data_root: Path, out: Path, *extra: str, run: str = "run"):
    """A composed config whose run folder is ``out/<run_name>/<run>``, where Hydra would put it on the command
    line (``ckpt_path=last`` searches ``out/<run_name>/*/checkpoints``)."""
    from scail2.config import compose_config

    cfg = compose_config(train_overrides(data_root, out, *extra))
    cfg.paths.run_dir = str(out / cfg.run_name / run)
    return cfg


def checkpoint_under(root: Path, checkpoint: Path) -> Path:
    """A copy of ``checkpoint`` (file or sharded folder) under ``root``: a run resumes only from a checkpoint under
    its output root."""
    copy = root / "given" / "checkpoints" / checkpoint.name
    copy.parent.mkdir(parents=True)
    (shutil.copytree if checkpoint.is_dir() else shutil.copy2)(checkpoint, copy)
    return copy
