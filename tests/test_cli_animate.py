"""scail2-animate: a full run on the tiny pipeline and the error messages (exit code 2) for bad inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from scail2.cli.animate import main
from scail2.conditioning.masks import COLOUR_RGB
from scail2.data.video import read_video, write_image, write_video
from scail2.pipeline import output_length
from scail2.pipeline.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    write_image(root / "ref.png", rng.integers(0, 256, (40, 32, 3), dtype=np.uint8))
    write_video(root / "driving.mp4", rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), fps=12)
    mask = np.zeros((7, 32, 32, 3), np.uint8)
    mask[:, 8:24, 10:20] = COLOUR_RGB["blue"]
    write_video(root / "mask.mp4", mask, fps=12, lossless=True)
    write_video(root / "mask_short.mp4", mask[:5], fps=12, lossless=True)
    grey = mask.copy()
    grey[:, :, :16] = 128
    write_video(root / "mask_grey.mp4", grey, fps=12, lossless=True)
    ref_mask = np.zeros((40, 32, 3), np.uint8)
    ref_mask[10:30, 8:24] = COLOUR_RGB["blue"]
    write_image(root / "ref_mask.png", ref_mask)
    (root / "not_an_image.png").write_text("hello")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("cli_model") / "model")


def _args(model, files, *extra):
    return ["--model", str(model), "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"),
            "--height", "32", "--width", "32", "--steps", "2", "--seed", "0", "--no-progress", "--device", "cpu",
            *extra]


def test_animate_writes_the_documented_number_of_frames(model, files, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(_args(model, files, "--masks", str(files / "mask.mp4"), "--ref-mask", str(files / "ref_mask.png"),
                      "--out", str(out), "--guidance", "1"))
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (output_length(7), 32, 32, 3) == (5, 32, 32, 3)  # 7 frames -> 4k+1 = 5
    printed = capsys.readouterr().out
    assert "7 driving frames -> 5 frames" in printed and "seed 0" in printed and "12 fps" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "50"], "--height 50 is not divisible by 32; use 32 or 64"),
        (["--ref", "{files}/missing.png"], "--ref {files}/missing.png does not exist"),
        (["--ref", "{files}/not_an_image.png"], "cannot read the reference image {files}/not_an_image.png"),
        (["--masks", "{files}/mask_short.mp4", "--ref-mask", "{files}/ref_mask.png"],
         "the driving mask has 5 frames but the driving video has 7"),
        (["--masks", "{files}/mask_grey.mp4", "--ref-mask", "{files}/ref_mask.png"], "not palette colours"),
        (["--masks", "{files}/mask.mp4"], "--ref-mask is missing"),
        (["--mode", "replacement"], "--mode replacement needs masks"),
        (["--guidance", "0.5"], "--guidance 0.5; need >= 1"),
        (["--frames", "9"], "num_frames is 9 but the driving video has 7"),
        (["--out", "{files}/out.gif"], "use one of"),
    ],
)
def test_bad_inputs_exit_2_with_a_message(model, files, tmp_path, capsys, extra, message):
    extra = [e.format(files=files) for e in extra]
    args = _args(model, files, "--out", str(tmp_path / "out.mp4"))
    # Later flags override earlier ones in argparse, so the bad value wins.
    assert main(args + extra) == 2
    assert message.format(files=files) in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_model_folder_missing_a_component(model, files, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(_args(broken, files, "--out", str(tmp_path / "out.mp4"))) == 2
    err = capsys.readouterr().err
    assert "VAE folder" in err and "diffusion_pytorch_model.safetensors" in err


# ---------------------------------------------------------------------------------- the official release
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from tests.release_replica import build_release_tree

    return build_release_tree(tmp_path_factory.mktemp("release") / "SCAIL-2")


def test_animate_from_the_official_release_folder(release, files, tmp_path, capsys, monkeypatch):
    """--model <release root>: SAT checkpoint, Wan2.1_VAE.pth, umT5 / CLIP .pth, umt5-xxl/ as downloaded; the
    same frames as from the pipeline-folder layout of the same weights, and nothing written into the release.

    The frames are compared as generated, before H.264 encoding: x264 now and then encodes identical frames of
    this tiny video differently (measured: 1 run in ~15 within one process, up to 21 levels on 5% of pixels)."""
    from scail2.pipeline import SCAIL2Pipeline
    from tests.test_cli_convert import _snapshot

    generated: list[np.ndarray] = []
    generate = SCAIL2Pipeline.generate

    def recording(self, *a, **kw):
        out = generate(self, *a, **kw)
        generated.append(np.array(out.frames))
        return out

    monkeypatch.setattr(SCAIL2Pipeline, "generate", recording)

    before = _snapshot(release)
    args = ["--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"), "--height", "32",
            "--width", "32", "--steps", "2", "--guidance", "2", "--seed", "0", "--no-progress", "--device", "cpu"]
    assert main(["--model", str(release), *args, "--out", str(tmp_path / "release.mp4")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _snapshot(release) == before
    folder = SCAIL2Pipeline.from_pretrained(release).save_pretrained(tmp_path / "pipeline")
    assert (folder / "image_processor" / "preprocessor_config.json").is_file()  # Wan's preprocessing, written out
    assert main(["--model", str(folder), *args, "--out", str(tmp_path / "pipeline.mp4")]) == 0
    assert read_video(tmp_path / "release.mp4").shape == (5, 32, 32, 3)
    from_release, from_folder = generated
    assert from_release.shape == (5, 32, 32, 3) and np.array_equal(from_release, from_folder)
    capsys.readouterr()

    # a component kept elsewhere: the error names the file, where it comes from and the flag; the flag fixes it
    elsewhere = tmp_path / "Wan2.1-I2V-14B-720P"
    elsewhere.mkdir()
    clip = release / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    moved = shutil.move(clip, elsewhere / clip.name)
    try:
        assert main(["--model", str(release), *args, "--out", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err
        assert f"no CLIP image encoder at {clip}" in err and "--image-encoder PATH" in err
        assert main(["--model", str(release), "--image-encoder", str(moved), *args, "--out", str(tmp_path / "y.mp4")]) == 0
        assert read_video(tmp_path / "y.mp4").shape == from_release.shape
        assert np.array_equal(generated[-1], from_release)
    finally:
        shutil.move(moved, clip)
    assert main([*args, "--vae", str(release / "Wan2.1_VAE.pth"), "--out", str(tmp_path / "z.mp4")]) == 2
    assert "no model folder given and no path for ['transformer', 'text_encoder', 'tokenizer', 'image_encoder']" in (
        capsys.readouterr().err
    )


def _exported(tmp_path, model, mode: str, resolutions=((9, 32, 32),)):
    """An export like scail2-train's: the network folder with training.json, made a pipeline folder with the
    encoders of ``model`` by ``write_pipeline_index`` (``mode``: copy or relative)."""
    from scail2.lit.export import write_pipeline_index, write_training_record

    encoders = tmp_path / "tree" / "encoders"
    shutil.copytree(model, encoders)
    network = tmp_path / "tree" / "run" / "model"
    shutil.copytree(model / "transformer", network)
    write_training_record(network, {"experiment": "demo", "finished": True, "global_step": 4, "max_steps": 4,
                                    "resolutions": [{"frames": f, "height": h, "width": w, "samples": 8} for f, h, w in resolutions]})  # fmt: skip
    assert write_pipeline_index(network, encoders, mode)
    return network


def test_animate_defaults_to_the_training_resolution(model, files, tmp_path, capsys):
    network = _exported(tmp_path, model, "copy", resolutions=((9, 32, 64), (9, 32, 32)))
    args = ["--model", str(network), "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"),
            "--steps", "1", "--guidance", "1", "--seed", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    out = tmp_path / "out.mp4"
    assert main([*args, "--out", str(out)]) == 0
    # The reference is 40x32 (portrait): of the trained 32x64 and 32x32, 32x32 is closest in aspect ratio.
    assert read_video(out).shape[1:3] == (32, 32)
    assert "--height/--width not given: 32x32, the model's training resolution (32x64, 32x32" in capsys.readouterr().out
    assert main([*args, "--height", "128", "--width", "128", "--steps", "1", "--out", str(tmp_path / "big.mp4")]) == 0
    assert "warning: 128x128 is far from the resolution(s) this model was trained at (32x64, 32x32)" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["copy", "relative"])
def test_exported_pipeline_folder_can_be_moved(model, files, tmp_path, mode):
    from scail2.pipeline import SCAIL2Pipeline
    from scail2.pipeline.layout import check_folder

    network = _exported(tmp_path, model, mode)
    if mode == "copy":  # self-contained: the folder alone moves anywhere
        moved = shutil.move(str(network), str(tmp_path / "elsewhere" / "model"))
        shutil.rmtree(tmp_path / "tree")
    else:  # relative paths: it moves together with the encoders' folder
        shutil.move(str(tmp_path / "tree"), str(tmp_path / "moved-tree"))
        moved = tmp_path / "moved-tree" / "run" / "model"
    check_folder(moved)
    assert SCAIL2Pipeline.from_pretrained(moved).transformer.num_params() > 0
    out = tmp_path / "moved.mp4"
    assert main(["--model", str(moved), "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"),
                 "--steps", "1", "--guidance", "1", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert out.exists()


def test_vae_tiling_splits_only_frames_larger_than_a_tile(model):
    import torch

    from scail2.pipeline import SCAIL2Pipeline

    pipe = SCAIL2Pipeline.from_pretrained(model)
    z = torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(0))  # 96x96 pixels
    whole = pipe.vae.decode(z)
    assert torch.equal(pipe.enable_vae_tiling(tile_size=96, stride=64).vae.decode(z), whole)  # one tile: unchanged
    tiled = pipe.enable_vae_tiling(tile_size=64, stride=48).vae.decode(z)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, whole)


def test_a_preset_fills_the_sampling_flags_not_given(model, files, tmp_path, capsys, monkeypatch):
    """--preset lightx2v-distill samples with 8 steps, guidance 1 and shift 1; a flag given explicitly wins;
    an unknown name is refused with the names there are."""
    from scail2.pipeline import SCAIL2Pipeline

    seen: list[dict] = []
    generate = SCAIL2Pipeline.generate

    def recording(self, *a, **kw):
        seen.append({k: kw.get(k) for k in ("num_inference_steps", "guidance_scale", "shift")})
        return generate(self, *a, **{**kw, "num_inference_steps": 1})  # one step is enough to see the flags

    monkeypatch.setattr(SCAIL2Pipeline, "generate", recording)
    base = ["--model", str(model), "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4"), "--height", "32",
            "--width", "32", "--seed", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main([*base, "--preset", "lightx2v-distill", "--out", str(tmp_path / "a.mp4")]) == 0
    assert main([*base, "--preset", "lightx2v-distill", "--steps", "4", "--out", str(tmp_path / "b.mp4")]) == 0
    assert seen == [{"num_inference_steps": 8, "guidance_scale": 1.0, "shift": 1.0},
                    {"num_inference_steps": 4, "guidance_scale": 1.0, "shift": 1.0}]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--preset", "turbo", "--out", str(tmp_path / "c.mp4")]) == 2
    assert "--preset turbo: no such sampling recipe; use one of ['default', 'lightx2v-distill']" in capsys.readouterr().err
