"""Inference with sequence parallelism: `SCAIL2Pipeline.enable_sequence_parallel` and
``scail2-animate --sequence-parallel 2`` under torchrun with 2 CPU processes give the same video as one
process (within 1e-4), on a sequence of odd length (19 tokens: 1 reference + 3 video frames of 4 tokens, 3
driving tokens), with text guidance (two passes per step) and a colour mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_sequence_parallel import torchrun

SAMPLING = dict(height=32, width=32, num_inference_steps=3, guidance_scale=4.0, seed=0, output_type="pt", progress=False)


def cli_args(model, files) -> list[str]:
    return ["--model", str(model), "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"),
            "--masks", str(files / "mask.mp4"), "--ref-mask", str(files / "ref_mask.png"), "--height", "32",
            "--width", "32", "--steps", "3", "--guidance", "4", "--seed", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny pipeline folder and its inputs."""
    from scail2.conditioning.masks import COLOUR_RGB
    from scail2.data.video import write_image, write_video
    from scail2.pipeline.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("sp_pipeline")
    rng = np.random.default_rng(0)
    write_image(root / "ref.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    write_video(root / "driving.mp4", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), fps=8)
    mask = np.zeros((9, 32, 32, 3), np.uint8)
    mask[:, 8:24, 10:20] = COLOUR_RGB["blue"]
    write_video(root / "mask.mp4", mask, fps=8, lossless=True)
    ref_mask = np.zeros((32, 32, 3), np.uint8)
    ref_mask[8:24, 8:24] = COLOUR_RGB["blue"]
    write_image(root / "ref_mask.png", ref_mask)
    return save_tiny_pipeline(root / "model"), root


@pytest.fixture(scope="module")
def setup(inputs):
    """The outputs of the 2-process run (tests.pipeline_sp_worker)."""
    model, root = inputs
    out = root / "out"
    out.mkdir()
    torchrun("tests.pipeline_sp_worker", "--model", str(model), "--files", str(root), "--out", str(out))
    return model, root, out


@pytest.mark.multiprocess
def test_pipeline_gives_the_single_process_video(setup):
    from scail2.pipeline.pipeline import SCAIL2Pipeline

    model, files, out = setup
    single = SCAIL2Pipeline.from_pretrained(model)(str(files / "ref.png"), str(files / "driving.mp4"), **SAMPLING)
    parallel = torch.load(out / "frames_sp.pt", weights_only=True)
    assert parallel.shape == single.frames.shape == (9, 3, 32, 32)
    assert (parallel - single.frames).abs().max() <= 1e-4
    assert single.frames.std() > 0.05  # a real video, not a constant


@pytest.mark.multiprocess
def test_cli_writes_the_single_process_video(setup, tmp_path):
    from scail2.cli.animate import main
    from scail2.data.video import read_video

    model, files, out = setup
    assert main([*cli_args(model, files), "--out", str(tmp_path / "single.mp4")]) == 0
    a, b = read_video(tmp_path / "single.mp4"), read_video(out / "cli_sp.mp4")
    assert a.shape == b.shape == (9, 32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_cli_refuses_a_process_count_that_does_not_match(inputs, monkeypatch, capsys):
    from scail2.cli.animate import main

    model, files = inputs
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*cli_args(model, files), "--out", str(files / "x.mp4")]) == 2
    assert "pass --sequence-parallel 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([*cli_args(model, files), "--sequence-parallel", "2", "--out", str(files / "x.mp4")]) == 2
    assert "torchrun --nproc_per_node 2 -m scail2.cli.animate" in capsys.readouterr().err
