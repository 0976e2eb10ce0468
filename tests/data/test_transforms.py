"""Masks and boxes stay aligned with the frames through crop, stretch, resize and scaling; time resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scail2.data.transforms import (
    CropBox,
    clip_indices,
    cover_box,
    crop_resize,
    random_crop_stretch,
    rasterize_boxes,
    region_to_latent,
    resampled_length,
    transform_boxes,
)


def _scene(h=90, w=160, seed=0):
    """Frames with white rectangles on a grey background, the same rectangles as a red mask, and their boxes."""
    rng = np.random.default_rng(seed)
    frames = torch.full((3, 3, h, w), 60, dtype=torch.uint8)
    masks = torch.zeros(3, 3, h, w, dtype=torch.uint8)
    boxes = []
    for f in range(3):
        x0, y0 = int(rng.integers(w // 2 - 40, w // 2)), int(rng.integers(h // 2 - 25, h // 2 - 5))
        bw, bh = int(rng.integers(16, 40)), int(rng.integers(12, 30))
        frames[f, :, y0 : y0 + bh, x0 : x0 + bw] = 255
        masks[f, 0, y0 : y0 + bh, x0 : x0 + bw] = 255
        boxes.append(np.array([[x0, y0, x0 + bw, y0 + bh]], dtype=float))
    return frames, masks, boxes


@pytest.mark.parametrize("seed", range(6))
def test_crop_stretch_resize_keep_frames_masks_boxes_aligned(seed):
    frames, masks, boxes = _scene(seed=seed)
    rng = np.random.default_rng(100 + seed)
    size = (64, 96) if seed % 2 else (96, 64)  # landscape and portrait buckets
    box = cover_box(90, 160, *size).inner(*random_crop_stretch(rng, (0.6, 1.0), (0.7, 1.4)))
    if seed >= 3:  # zoom about a point, reaching outside the frame when shrinking
        box = box.scaled_about(float(rng.uniform(0.7, 1.3)), 45.0, 80.0)
    out = crop_resize(frames, box, size)
    out_mask = crop_resize(masks, box, size, mode="nearest")
    raster = rasterize_boxes([transform_boxes(b, box, size) for b in boxes], size)
    assert out.shape == (3, 3, *size) and out_mask.shape == (3, 3, *size)
    bright = out[:, 0] > 157  # the rectangle after bilinear resampling (midpoint threshold)
    red = out_mask[:, 0] == 255
    assert set(torch.unique(out_mask).tolist()) <= {0, 255}  # nearest keeps mask values exact
    for f in range(3):
        # Everything disagrees at most along a one-pixel border of the rectangle.
        for a, b in ((bright[f], red[f]), (red[f], raster[f]), (bright[f], raster[f])):
            diff = (a ^ b).float()
            edge = torch.nn.functional.max_pool2d(raster[f][None, None].float(), 3, 1, 1)[0, 0] - (
                -torch.nn.functional.max_pool2d(-raster[f][None, None].float(), 3, 1, 1)[0, 0]
            )
            assert (diff * (1 - edge)).sum() == 0, f"frame {f}: {int(diff.sum())} misaligned pixels"
    assert raster.sum() > 0


def test_crop_outside_frame_is_filled():
    frames = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    out = crop_resize(frames, CropBox(-4, -4, 16, 16), (16, 16), mode="nearest", fill=(255, 0, 0))
    assert out[0, :, 0, 0].tolist() == [255, 0, 0]
    assert out[0, :, 8, 8].tolist() == [200, 200, 200]


def test_cover_box_keeps_aspect_and_centres():
    box = cover_box(720, 1280, 512, 896)  # 16:9 is wider than 512:896: crop columns
    assert box.height == pytest.approx(720) and box.width == pytest.approx(720 * 896 / 512)
    assert box.left == pytest.approx((1280 - box.width) / 2) and box.top == pytest.approx(0)
    box = cover_box(1280, 720, 512, 896)  # portrait video into a landscape bucket: crop rows
    assert box.width == pytest.approx(720) and box.left == pytest.approx(0)


def test_scaled_about_keeps_the_centre_fixed():
    box = CropBox(0, 0, 64, 64)
    scaled = box.scaled_about(1.25, 20.0, 30.0)
    # The centre maps to the same output position before and after scaling.
    for b in (box, scaled):
        assert (30.0 - b.left) / b.width * 64 == pytest.approx(30.0)
    assert scaled.width == pytest.approx(64 / 1.25)


def test_time_resampling():
    assert resampled_length(81, 16) == 81
    assert resampled_length(33, 32) == 17
    assert resampled_length(151, 30) == 81  # 5 s at 30 fps
    assert clip_indices(33, 32, 5, 0) == [0, 2, 4, 6, 8]
    assert clip_indices(100, 30, 5, 2) == [4, 6, 8, 9, 11]  # round(k * 30 / 16), k = 2..6
    assert clip_indices(10, 8, 5, 0) == [0, 1, 1, 2, 2]  # slower source repeats frames
    with pytest.raises(ValueError, match="does not fit"):
        clip_indices(20, 16, 17, 4)


def test_region_to_latent_groups_frames_like_the_vae():
    mask = torch.zeros(9, 16, 16, dtype=torch.bool)
    mask[0, :8, :8] = True  # latent frame 0
    mask[3, 8:, 8:] = True  # latent frame 1 (pixel frames 1-4)
    out = region_to_latent(mask)
    assert out.shape == (1, 3, 2, 2)
    assert out[0, 0].tolist() == [[1, 0], [0, 0]]
    assert out[0, 1].tolist() == [[0, 0], [0, 1]]
    assert out[0, 2].sum() == 0
    with pytest.raises(ValueError, match="4k\\+1"):
        region_to_latent(torch.zeros(8, 16, 16))


def test_crop_resize_keeps_float_and_bool():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 3, 48, 80), generator=g, dtype=torch.uint8)
    box = cover_box(48, 80, 32, 32)
    as_float = crop_resize(frames.float(), box, (32, 32))
    assert as_float.dtype == torch.float32
    # The float path is the uint8 path before rounding.
    assert torch.equal(as_float.round().clamp(0, 255).to(torch.uint8), crop_resize(frames, box, (32, 32)))
    masks = frames[:, :1] > 128
    out = crop_resize(masks, box, (32, 32), mode="nearest")
    assert out.dtype == torch.bool and torch.equal(out, crop_resize(masks.to(torch.uint8), box, (32, 32), mode="nearest").bool())
    with pytest.raises(ValueError, match="nearest"):
        crop_resize(masks, box, (32, 32))
    # Inference fits its inputs another way on purpose (the official bicubic resize-then-crop,
    # docs/inference.md): the same centred window, another filter.
    from scail2.pipeline.inputs import resize_cover

    inference = resize_cover(frames, 32, 32)
    assert not torch.equal(inference, crop_resize(frames, box, (32, 32)))
    assert (inference.float() - crop_resize(frames, box, (32, 32)).float()).abs().mean() < 40
