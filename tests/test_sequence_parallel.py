"""Ulysses sequence parallelism on CPU (gloo, 2 processes): the model's output and every parameter gradient
equal the single-process run, for animation and replacement batches (with an extra reference) whose sequence
lengths are odd, alone and composed with activation checkpointing and FSDP2 over the (dp, sp) mesh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = ("sp", "sp_ac", "sp_fsdp2", "sp_ac_fsdp2")
BATCHES = ("animation", "replacement_extra_ref", "mixed_batch")


def torchrun(module: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp") / "parity.json"
    torchrun("tests.sp_worker", "--out", str(out))
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_output_and_gradients_equal_single_process(parity, case):
    for batch in BATCHES:
        r = parity[case][batch]
        assert r["missing"] == [], (case, batch)
        assert r["output"] <= 1e-5, (case, batch, r)
        assert r["grad"] <= 1e-5 and r["grad_scale"] > 1e-3, (case, batch, r)  # gradients are not vanishing


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_parameter_names_and_state_dict_unchanged(parity, case):
    assert parity[case]["state_dict"] is True


@pytest.mark.multiprocess
def test_heads_not_divisible_by_the_group_are_refused(parity):
    assert parity["heads_error"] == "sequence_parallel=2: the model's 3 attention heads are not divisible by 2; use one of [1, 3]"


@pytest.mark.parametrize("cls", ["DDPStrategy", "FSDP2Strategy"])
def test_world_size_must_be_a_multiple_of_sequence_parallel(cls):
    from scail2.lit import strategies

    strategy = getattr(strategies, cls)(sequence_parallel=3)
    with pytest.raises(ValueError, match=r"sequence_parallel=3 does not divide the world size 4 .*use one of \[1, 2, 4\]"):
        strategy._check_sequence_parallel(4)
    assert strategy._check_sequence_parallel(6) == 2
