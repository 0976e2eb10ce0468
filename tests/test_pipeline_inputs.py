"""Inference inputs not at the target size: the official resize-to-cover (bicubic, antialiased) and centre crop,
masks resized the same way before thresholding, per-character masks drawn on the mode's backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scail2.conditioning.masks import COLOUR_RGB, colour_to_channels
from scail2.pipeline import PipelineInputError, prepare_inputs
from scail2.pipeline.inputs import cover_size, resize_cover


def _pil_bicubic(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's antialiased bicubic of one float32 channel (H, W) to (h, w): the reference filter."""
    return np.asarray(Image.fromarray(frame.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BICUBIC))


@pytest.mark.parametrize(
    "src, out, expect",
    [
        ((1080, 1920), (512, 896), (512, 910)),  # wider than the target: the height fits, width int(1920 * 512/1080)
        ((1920, 1080), (896, 512), (910, 512)),  # taller: the width fits
        ((720, 1280), (576, 1024), (576, 1024)),  # same aspect ratio: no crop
        ((480, 640), (512, 896), (672, 896)),  # upscaling: int(480 * 896/640) = 672
        ((40, 32), (32, 32), (40, 32)),
        ((333, 500), (512, 512), (512, 768)),  # int(500 * 512/333) = 768 (768.77 floored)
    ],
)
def test_cover_size_is_the_official_rule(src, out, expect):
    assert cover_size(*src, *out) == expect


def test_resize_then_centre_crop_at_half_the_excess():
    # No resampling when one side already fits and the other is only cropped: the crop starts at delta // 2.
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(2, 3, 32, 83, generator=g) * 255).to(torch.uint8)
    out = resize_cover(frames, 32, 64)
    assert out.dtype == torch.uint8 and torch.equal(out, frames[:, :, :, 9:73])  # delta 19 -> left 9
    tall = torch.rand(1, 3, 71, 32, generator=g) * 2 - 1
    assert torch.equal(resize_cover(tall, 64, 32), tall[:, :, 3:67])
    assert resize_cover(frames[:, :, :, :64], 32, 64) is not None and torch.equal(
        resize_cover(frames[:, :, :, :64], 32, 64), frames[:, :, :, :64]
    )


@pytest.mark.parametrize("src, out", [((50, 70), (32, 32)), ((20, 24), (64, 96)), ((48, 96), (32, 32))])
def test_filter_is_antialiased_bicubic(src, out):
    g = torch.Generator().manual_seed(1)
    frame = torch.rand(1, 1, *src, generator=g) * 2 - 1
    got = resize_cover(frame, *out)[0, 0].numpy()
    rh, rw = cover_size(*src, *out)
    top, left = (rh - out[0]) // 2, (rw - out[1]) // 2
    expect = _pil_bicubic(frame[0, 0].numpy(), (rh, rw))[top : top + out[0], left : left + out[1]]
    assert np.abs(got - np.clip(expect, -1, 1)).max() < 1e-5
    # Float frames are clamped to [-1, 1], where bicubic filtering overshoots at sharp edges.
    sharp = torch.where(frame > 0, 1.0, -1.0)
    overshoot = _pil_bicubic(sharp[0, 0].numpy(), (rh, rw))[top : top + out[0], left : left + out[1]]
    got = resize_cover(sharp, *out)[0, 0].numpy()
    assert np.abs(overshoot).max() > 1 and np.abs(got - np.clip(overshoot, -1, 1)).max() < 1e-5
    # 8-bit frames: computed in float, clamped and rounded back to 8 bits.
    frame8 = ((frame + 1) * 127.5).round().to(torch.uint8)
    got8 = resize_cover(frame8, *out)[0, 0].numpy().astype(np.int64)
    ref8 = _pil_bicubic(frame8[0, 0].numpy().astype(np.float32), (rh, rw))[top : top + out[0], left : left + out[1]]
    assert np.abs(got8 - np.clip(np.round(ref8), 0, 255)).max() <= 1  # equal up to float rounding at .5


def _masks(h, w, background):
    """A driving mask video: a 3-pixel-wide blue stripe on ``background``; and a reference mask image (blue
    block on black, the replacement reference background)."""
    video = np.zeros((5, h, w, 3), np.uint8)
    video[:] = COLOUR_RGB[background]
    video[:, :, 20:23] = COLOUR_RGB["blue"]
    ref = np.zeros((h, w, 3), np.uint8)
    ref[8:40, 8:40] = COLOUR_RGB["blue"]
    return ref, video


def test_masks_are_resized_bicubic_before_thresholding():
    # 64x96 -> 32x32: resize to 32x48 (0.5x, antialiased bicubic), crop columns 8..40. The blue stripe at columns
    # 20..22 covers [2, 3.5) of the crop: column 2 fully (R, G 5), column 3 half (R, G 125, under the threshold,
    # so still blue), column 1 a ringing (238, 238, 255) that reads white. Nearest resizing keeps 0/255 colours.
    ref, video = _masks(64, 96, "white")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    prepared = prepare_inputs(
        rgb, np.stack([rgb] * 5), mode="replacement", reference_mask=ref, driving_mask=video, height=32, width=32
    )
    assert prepared.driving_mask.dtype == torch.uint8
    assert prepared.driving_mask[0, :, 16, :5].T.tolist() == [[255] * 3, [238, 238, 255], [5, 5, 255], [125, 125, 255], [255] * 3]
    channels = colour_to_channels(prepared.driving_mask[:1].float() / 127.5 - 1)[0]  # (7, 32, 32)
    assert channels[3][:, [2, 3]].all() and not channels[3][:, [0, 1, 4, 5]].any()  # blue
    assert channels[0][:, [0, 1, 4, 5]].all() and not channels[0][:, [2, 3]].any()  # white
    # The reference mask goes through the float path (as the official code reads images) and is clamped to
    # [-1, 1]; a NumPy bicubic through PIL gives the same picture.
    rh, rw = cover_size(64, 96, 32, 32)
    pil = np.stack([_pil_bicubic(ref[..., c] / 127.5 - 1, (rh, rw)) for c in range(3)])[:, :, 8:40]
    got = prepared.reference_mask.numpy()
    assert prepared.reference_mask.dtype == torch.float32 and np.abs(got - np.clip(pil, -1, 1)).max() < 1e-5
    assert got.min() >= -1 and got.max() <= 1


def test_reference_image_is_resized_in_float_and_the_driving_video_in_8_bit():
    g = torch.Generator().manual_seed(2)
    ref = (torch.rand(50, 70, 3, generator=g) * 255).to(torch.uint8).numpy()
    drive = (torch.rand(5, 40, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    prepared = prepare_inputs(ref, drive, height=32, width=32)
    ref_unit = torch.from_numpy(ref).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(prepared.reference, resize_cover(ref_unit[None], 32, 32)[0])
    assert prepared.driving.dtype == torch.uint8
    assert torch.equal(prepared.driving, resize_cover(torch.from_numpy(drive).permute(0, 3, 1, 2), 32, 32))
    # No masks: None (the mode's backgrounds are drawn at encoding).
    assert prepared.reference_mask is None and prepared.driving_mask is None


def test_per_character_masks_are_drawn_at_the_input_size_on_the_mode_backgrounds():
    # Two characters in a 64x64 driving video and a 64x48 reference, output 32x32.
    drive = torch.zeros(2, 5, 64, 64, dtype=torch.bool)
    drive[0, :, 8:56, 40:60] = True  # right -> red (slot 1)
    drive[1, :, 8:56, 4:24] = True  # left -> blue (slot 0)
    ref = torch.zeros(2, 64, 48, dtype=torch.bool)
    ref[0, 10:60, 2:20] = True
    ref[1, 10:60, 26:46] = True
    rgb = np.zeros((64, 64, 3), np.uint8)
    for mode, (ref_bg, drive_bg) in {"animation": ("white", "black"), "replacement": ("black", "white")}.items():
        prepared = prepare_inputs(
            np.zeros((64, 48, 3), np.uint8), np.stack([rgb] * 5), mode=mode, character_masks=drive,
            reference_character_masks=ref, height=32, width=32,
        )  # fmt: skip
        assert prepared.character_order == [1, 0]
        ref_rgb = tuple(((prepared.reference_mask[:, 1, 16] + 1) * 127.5).round().int().tolist())  # top row
        drive_rgb = tuple(prepared.driving_mask[0, :, 1, 16].tolist())
        assert ref_rgb == COLOUR_RGB[ref_bg] and drive_rgb == COLOUR_RGB[drive_bg], mode
        # The same as drawing the colour masks at the input size and giving them as colour masks.
        from scail2.conditioning.masks import character_masks_to_colour

        u8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
        given = prepare_inputs(
            np.zeros((64, 48, 3), np.uint8), np.stack([rgb] * 5), mode=mode,
            reference_mask=u8(character_masks_to_colour(ref[:, None], mode, [1, 0], reference=True))[0].permute(1, 2, 0).numpy(),
            driving_mask=u8(character_masks_to_colour(drive, mode, [1, 0])).permute(0, 2, 3, 1).numpy(),
            height=32, width=32,
        )  # fmt: skip
        assert torch.equal(given.driving_mask, prepared.driving_mask)
        torch.testing.assert_close(given.reference_mask, prepared.reference_mask, rtol=0, atol=1e-6)


def test_extra_references_and_their_errors():
    g = torch.Generator().manual_seed(3)
    img = lambda h, w: (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()  # noqa: E731
    video = np.stack([img(32, 32)] * 5)
    prepared = prepare_inputs(img(32, 32), video, extra_reference_images=[img(48, 32), img(32, 32)], height=32, width=32)
    assert prepared.extra_references.shape == (2, 3, 32, 32) and prepared.extra_reference_masks is None
    mask = np.zeros((48, 32, 3), np.uint8)
    with pytest.raises(PipelineInputError, match="got 1 extra reference masks for 2 extra reference images"):
        prepare_inputs(img(32, 32), video, extra_reference_images=[img(48, 32), img(32, 32)],
                       extra_reference_masks=[mask], height=32, width=32)  # fmt: skip
    with pytest.raises(PipelineInputError, match="extra reference mask 0 is 48x32 but the extra reference image 0"):
        prepare_inputs(img(32, 32), video, extra_reference_images=[img(32, 32)], extra_reference_masks=[mask],
                       height=32, width=32)  # fmt: skip
    with pytest.raises(PipelineInputError, match="extra_reference_masks need extra_reference_images"):
        prepare_inputs(img(32, 32), video, extra_reference_masks=[mask], height=32, width=32)
