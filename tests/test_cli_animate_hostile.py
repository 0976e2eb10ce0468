"""scail2-animate with hostile inputs: impossible numbers, outputs the writer refuses, adapters and weights that
are not safetensors, decompression bombs; a writer failure after sampling keeps the frames."""

from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scail2.cli.animate import EXIT_OUTPUT, main
from scail2.data.video import write_image, write_video
from scail2.pipeline.tiny import save_tiny_pipeline

pytestmark = pytest.mark.hostile


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_cli")
    rng = np.random.default_rng(0)
    write_image(root / "ref.png", rng.integers(0, 256, (40, 32, 3), dtype=np.uint8))
    write_image(root / "tall.png", rng.integers(0, 256, (4000, 3, 3), dtype=np.uint8))
    write_video(root / "driving.mp4", rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=12)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("hostile_model") / "model")


def _args(model, files, out, *extra, size=True):
    sized = ["--height", "32", "--width", "32"] if size else []
    return ["--model", str(model), "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"), *sized,
            "--steps", "1", "--seed", "0", "--no-progress", "--device", "cpu", "--guidance", "1", "--out", str(out), *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--guidance", "nan"], "--guidance nan; need >= 1, a finite number"),
        (["--guidance", "inf"], "--guidance inf; need >= 1, a finite number"),
        (["--shift", "inf"], "--shift inf; need a finite positive value"),
        (["--shift", "nan"], "--shift nan; need a finite positive value"),
        (["--fps", "-5"], "--fps -5.0; need a frame rate in (0, 1000]"),
        (["--fps", "nan"], "--fps nan; need a frame rate"),
        (["--fps", "0"], "--fps 0.0; need a frame rate"),
        (["--seed", "-1"], "--seed -1; need an integer in [0, 2**64 - 1]"),
        (["--palette-tolerance", "2"], "--palette-tolerance 2.0; need a fraction in [0, 1]"),
        (["--lora", "{files}/ref.png", "--lora-scale", "nan"], "--lora-scale nan; need a finite strength"),
    ],
)
def test_impossible_numbers_exit_2_before_loading_the_model(model, files, tmp_path, capsys, extra, words):
    extra = [e.format(files=files) for e in extra]
    assert main(_args(model, files, tmp_path / "out.mp4", *extra)) == 2
    assert words in _error_line(capsys)
    assert not (tmp_path / "out.mp4").exists()


def test_an_output_the_writer_refuses_is_found_before_sampling(model, files, tmp_path, capsys, monkeypatch):
    import scail2.pipeline.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for an output that cannot be written")

    monkeypatch.setattr(pipeline.SCAIL2Pipeline, "from_pretrained", never)
    # A 4000x3 reference: the default size follows its aspect ratio (24736x32); resizing the inputs to cover it
    # would take all memory, and H.264 cannot encode it.
    args = _args(model, files, tmp_path / "out.mp4", size=False)
    args[args.index("--ref") + 1] = str(files / "tall.png")
    assert main(args) == 2
    line = _error_line(capsys)
    assert "the output would be 24736x32" in line and "--height and --width" in line
    assert main(_args(model, files, tmp_path / "out.mp4", "--height", "4096", "--width", "32")) == 2
    assert "the output would be 4096x32" in _error_line(capsys)
    # A container the encoder cannot go into (.webm is an accepted suffix, but not with H.264).
    assert main(_args(model, files, tmp_path / "out.webm")) == 2
    line = _error_line(capsys)
    assert "cannot write --out" in line and "webm" in line and "libx264" in line
    # A folder that cannot be created (its parent is a file).
    assert main(_args(model, files, files / "ref.png" / "out.mp4")) == 2
    assert "cannot write --out" in _error_line(capsys)
    assert not list(tmp_path.iterdir())  # the probe frame is removed


def test_a_writer_failure_after_sampling_keeps_the_frames(model, files, tmp_path, capsys, monkeypatch):
    import scail2.pipeline.pipeline as pipeline

    def full_disk(self, path, fps=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.SCAIL2Output, "save", full_disk)
    out = tmp_path / "out.mp4"
    assert main(_args(model, files, out)) == EXIT_OUTPUT
    line = _error_line(capsys)
    kept = tmp_path / "out.unsaved.safetensors"
    assert "No space left on device" in line and str(kept) in line
    tensors = load_file(kept)
    assert tensors["frames"].shape == (5, 32, 32, 3) and tensors["frames"].dtype == torch.uint8
    assert "latents.0" in tensors and tensors["latents.0"].shape[:2] == (1, 16)


# ----------------------------------------------------------------------------------------------- files
class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_lora_is_refused_without_unpickling(model, files, tmp_path, capsys):
    evil = tmp_path / "x.pt"
    evil.write_bytes(pickle.dumps(_Touch(str(tmp_path / "MARKER"))))
    torch.save({"lora": torch.zeros(2)}, tmp_path / "plain.pt")
    for adapter in (evil, tmp_path / "plain.pt"):
        assert main(_args(model, files, tmp_path / "out.mp4", "--lora", str(adapter))) == 2
        line = _error_line(capsys)
        assert line.startswith(f"error: cannot load the LoRA adapter {adapter}: ") and str(adapter.name) in line[40:]
    assert not (tmp_path / "MARKER").exists()


def test_truncated_and_non_finite_loras_are_refused(model, files, tmp_path, capsys):
    key = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{key}.lora_down.weight": torch.full((4, 8), float("nan")), f"{key}.lora_up.weight": torch.zeros(8, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(tmp_path / "nan.safetensors"))
    assert main(_args(model, files, tmp_path / "out.mp4", "--lora", str(tmp_path / "nan.safetensors"))) == 2
    assert "non-finite values" in _error_line(capsys)
    data = (tmp_path / "nan.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert main(_args(model, files, tmp_path / "out.mp4", "--lora", str(tmp_path / "cut.safetensors"))) == 2
    assert "not a readable safetensors file" in _error_line(capsys)


def test_a_truncated_transformer_file_is_one_line(model, files, tmp_path, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    (weights,) = (broken / "transformer").glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert main(_args(broken, files, tmp_path / "out.mp4")) == 2
    line = _error_line(capsys)
    assert "cannot load the model" in line and "safetensors" in line and weights.name in line


def test_a_decompression_bomb_reference_is_refused(model, files, tmp_path, capsys):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    args = _args(model, files, tmp_path / "out.mp4")
    args[args.index("--ref") + 1] = str(bomb)
    assert main(args) == 2
    assert "decompression bomb" in _error_line(capsys)
