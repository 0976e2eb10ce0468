"""Colour-coded masks: thresholding, temporal packing, latent resampling, drawing characters, errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from scail2.conditioning.masks import (
    BINDING_PALETTE,
    COLOUR_RGB,
    MASK_BACKGROUNDS,
    MASK_CHANNELS,
    background_mask,
    character_colours,
    character_masks_to_colour,
    character_order,
    check_frame_count,
    check_spatial_size,
    colour_to_channels,
    driving_mask_to_latent,
    mask_background,
    pack_temporal,
    palette_violation_fraction,
    reference_mask_to_latent,
    video_mask_to_reference,
)

# Channel indices, written out rather than looked up, so a reordered MASK_CHANNELS fails the tests.
WHITE, RED, GREEN, BLUE, YELLOW, MAGENTA, CYAN = range(7)


def to_unit(rgb8: torch.Tensor) -> torch.Tensor:
    """8-bit values -> [-1, 1] the way a data loader maps them."""
    return rgb8.to(torch.float32) / 127.5 - 1


def canvas(frames: int, h: int, w: int) -> torch.Tensor:
    """Black (F, 3, H, W) canvas in 8-bit units."""
    return torch.zeros(frames, 3, h, w)


def paint(video8: torch.Tensor, f: int, rows: slice, cols: slice, rgb: tuple[int, int, int]) -> None:
    video8[f, :, rows, cols] = torch.tensor(rgb, dtype=video8.dtype).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Palette and thresholding
# ----------------------------------------------------------------------------------------------------


def test_palette_constants():
    assert MASK_CHANNELS == ("white", "red", "green", "blue", "yellow", "magenta", "cyan")
    assert BINDING_PALETTE == ("blue", "red", "green", "magenta", "cyan", "yellow")
    assert COLOUR_RGB["yellow"] == (255, 255, 0)
    assert COLOUR_RGB["magenta"] == (255, 0, 255)
    assert COLOUR_RGB["cyan"] == (0, 255, 255)
    assert COLOUR_RGB["black"] == (0, 0, 0)


def test_each_colour_lights_exactly_its_channel():
    # One row of 8 pixels: black, white, red, green, blue, yellow, magenta, cyan.
    pixels = [
        (0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)
    ]  # fmt: skip
    image = to_unit(torch.tensor(pixels).T.reshape(1, 3, 1, 8))
    expected = torch.tensor(
        [
            # blk wht red grn blu yel mag cyn   (pixel)
            [0, 1, 0, 0, 0, 0, 0, 0],  # white
            [0, 0, 1, 0, 0, 0, 0, 0],  # red
            [0, 0, 0, 1, 0, 0, 0, 0],  # green
            [0, 0, 0, 0, 1, 0, 0, 0],  # blue
            [0, 0, 0, 0, 0, 1, 0, 0],  # yellow
            [0, 0, 0, 0, 0, 0, 1, 0],  # magenta
            [0, 0, 0, 0, 0, 0, 0, 1],  # cyan
        ],
        dtype=torch.float32,
    ).reshape(1, 7, 1, 8)
    out = colour_to_channels(image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mapping",
    [
        lambda u: u.float() / 127.5 - 1,
        lambda u: (u.float() / 255 - 0.5) / 0.5,
        lambda u: u.float() * (2 / 255) - 1,  # rounds 225 to one float32 step above the threshold
        lambda u: u.double() / 127.5 - 1,
    ],
)
def test_threshold_is_strictly_above_225(mapping):
    # (R, G, B) per pixel; 225 is off, 226 is on, whatever float mapping produced [-1, 1].
    pixels = torch.tensor([(225, 0, 0), (226, 0, 0), (226, 225, 0), (255, 226, 0), (226, 226, 226), (225, 255, 255)])
    image = mapping(pixels.T.reshape(1, 3, 1, 6))
    out = colour_to_channels(image)[0, :, 0]  # (7, 6)
    expected = torch.zeros(7, 6)
    expected[RED, 1] = 1  # 226 red
    expected[RED, 2] = 1  # G at 225 is off
    expected[YELLOW, 3] = 1
    expected[WHITE, 4] = 1
    expected[CYAN, 5] = 1  # R at 225 is off
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_half_precision_input_is_thresholded_in_float32():
    image = to_unit(torch.tensor([(255, 0, 0), (0, 0, 0)]).T.reshape(1, 3, 1, 2)).to(torch.bfloat16)
    out = colour_to_channels(image)
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [0, 1, 0, 0, 0, 0, 0]
    assert out[0, :, 0, 1].tolist() == [0] * 7


# ----------------------------------------------------------------------------------------------------
# Temporal packing
# ----------------------------------------------------------------------------------------------------


def test_pack_temporal_channel_layout():
    # x[f, c] = 10 f + c, so every value names its frame and colour.
    x = (10 * torch.arange(5).view(5, 1) + torch.arange(7).view(1, 7)).float().view(5, 7, 1, 1)
    out = pack_temporal(x)
    assert out.shape == (28, 2, 1, 1)
    t0 = [0, 1, 2, 3, 4, 5, 6] * 4  # frame 0 repeated in all four sub-frames
    t1 = [
        10, 11, 12, 13, 14, 15, 16,  # j = 0: frame 1
        20, 21, 22, 23, 24, 25, 26,  # j = 1: frame 2
        30, 31, 32, 33, 34, 35, 36,  # j = 2: frame 3
        40, 41, 42, 43, 44, 45, 46,  # j = 3: frame 4
    ]  # fmt: skip
    assert out[:, 0, 0, 0].tolist() == t0
    assert out[:, 1, 0, 0].tolist() == t1


def test_pack_temporal_single_frame_gives_four_identical_blocks():
    x = torch.rand(1, 7, 3, 2)
    out = pack_temporal(x)
    assert out.shape == (28, 1, 3, 2)
    for j in range(4):
        torch.testing.assert_close(out[7 * j : 7 * j + 7, 0], x[0], rtol=0, atol=0)


def test_pack_temporal_keeps_batch_dim():
    x = torch.rand(2, 9, 7, 2, 3)
    out = pack_temporal(x)
    assert out.shape == (2, 28, 3, 2, 3)
    torch.testing.assert_close(out[1], pack_temporal(x[1]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Mask video -> latent masks
# ----------------------------------------------------------------------------------------------------


def test_driving_mask_hand_case():
    # 5 frames of 32x32 -> half res 16x16 -> latent grid 2x2 (one cell = a 16x16 pixel block), T = 2.
    v = canvas(5, 32, 32)
    paint(v, 0, slice(0, 16), slice(0, 16), (255, 0, 0))  # red, cell (0, 0)
    paint(v, 1, slice(0, 16), slice(16, 32), (0, 255, 0))  # green, cell (0, 1)
    paint(v, 2, slice(16, 32), slice(0, 16), (0, 0, 255))  # blue, cell (1, 0)
    paint(v, 3, slice(16, 32), slice(16, 32), (255, 255, 0))  # yellow, cell (1, 1)
    paint(v, 3, slice(0, 16), slice(0, 16), (255, 255, 255))  # white, cell (0, 0)
    paint(v, 4, slice(0, 8), slice(0, 16), (0, 255, 255))  # cyan, top half of cell (0, 0)
    paint(v, 4, slice(16, 32), slice(20, 28), (255, 0, 255))  # magenta, middle half of cell (1, 1)
    out = driving_mask_to_latent(to_unit(v))

    expected = torch.zeros(28, 2, 2, 2)
    # Latent frame 0 = frame 0 repeated: red (c = 1) in all four sub-frame blocks.
    expected[1, 0, 0, 0] = 1
    expected[8, 0, 0, 0] = 1
    expected[15, 0, 0, 0] = 1
    expected[22, 0, 0, 0] = 1
    # Latent frame 1 = frames 1..4 as sub-frames j = 0..3, channel 7 j + c.
    expected[2, 1, 0, 1] = 1  # j 0, green
    expected[10, 1, 1, 0] = 1  # j 1, blue
    expected[18, 1, 1, 1] = 1  # j 2, yellow
    expected[14, 1, 0, 0] = 1  # j 2, white
    expected[27, 1, 0, 0] = 0.5  # j 3, cyan covers half the cell
    expected[26, 1, 1, 1] = 0.5  # j 3, magenta covers half the cell
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_reference_mask_area_coverage():
    # 32x32 -> latent 4x4, each cell an 8x8 pixel block.
    v = canvas(1, 32, 32)
    paint(v, 0, slice(0, 4), slice(0, 8), (255, 0, 0))  # red: 32 of 64 pixels of cell (0, 0)
    paint(v, 0, slice(8, 11), slice(16, 21), (0, 0, 255))  # blue: 3x5 = 15 pixels of cell (1, 2)
    paint(v, 0, slice(24, 32), slice(24, 32), (255, 255, 255))  # white: all of cell (3, 3)
    paint(v, 0, slice(7, 9), slice(7, 9), (0, 255, 0))  # green 2x2 straddling four cells: 1 pixel each
    image = to_unit(v[0])
    out = reference_mask_to_latent(image)
    assert out.shape == (28, 1, 4, 4)

    block = torch.zeros(7, 4, 4)
    block[RED, 0, 0] = 32 / 64
    block[BLUE, 1, 2] = 15 / 64
    block[WHITE, 3, 3] = 1
    block[GREEN, 0, 0] = block[GREEN, 0, 1] = block[GREEN, 1, 0] = block[GREEN, 1, 1] = 1 / 64
    expected = block.repeat(4, 1, 1).unsqueeze(1)  # four identical sub-frame blocks
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference_mask_to_latent(image[None]), expected, rtol=0, atol=0)


def test_driving_downsamples_before_thresholding():
    # Red channel patterns where thresholding at full resolution would give a different answer.
    v = canvas(1, 32, 32)
    # Left half: every 2x2 block has three 255s and one 0 -> bilinear 0.5x gives 191.25: off everywhere.
    v[0, 0, :, :16] = 255
    v[0, 0, 1::2, 1:16:2] = 0
    # Right half: rows alternate 255 / 200 -> bilinear 0.5x gives 227.5: on everywhere.
    v[0, 0, 0::2, 16:] = 255
    v[0, 0, 1::2, 16:] = 200
    video = to_unit(v)
    out = driving_mask_to_latent(video)  # (28, 1, 2, 2)
    red = out[RED, 0]
    torch.testing.assert_close(red, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), rtol=0, atol=0)
    assert out[[c for c in range(28) if c % 7 != RED]].abs().sum() == 0

    # Thresholding first would give 3/4 and 1/2 coverage: the order matters for this input.
    wrong = F.interpolate(colour_to_channels(video)[:, :, :, :], size=(2, 2), mode="area")[0, RED]
    torch.testing.assert_close(wrong, torch.tensor([[0.75, 0.5], [0.75, 0.5]]), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (512, 896)])
def test_half_resolution_by_size_equals_scale_factor(size):
    x = torch.rand(1, 3, *size) * 2 - 1
    by_size = F.interpolate(x, size=(size[0] // 2, size[1] // 2), mode="bilinear", align_corners=False)
    by_scale = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(by_size, by_scale, rtol=0, atol=0)


def test_latent_shapes_and_batch_dim():
    video = to_unit((torch.rand(9, 3, 64, 96) > 0.5).float() * 255)
    out = driving_mask_to_latent(video)
    assert out.shape == (28, 3, 4, 6)
    batch = torch.stack([video, video.flip(-1)])
    out_b = driving_mask_to_latent(batch)
    assert out_b.shape == (2, 28, 3, 4, 6)
    torch.testing.assert_close(out_b[0], out, rtol=0, atol=0)
    torch.testing.assert_close(out_b[1], driving_mask_to_latent(video.flip(-1)), rtol=0, atol=0)

    image = video[0]
    ref = reference_mask_to_latent(image)
    assert ref.shape == (28, 1, 8, 12)
    ref_b = reference_mask_to_latent(torch.stack([image, image.flip(-2)])[:, None])
    assert ref_b.shape == (2, 28, 1, 8, 12)
    torch.testing.assert_close(ref_b[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(ref_b[1], reference_mask_to_latent(image.flip(-2)), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Palette violations
# ----------------------------------------------------------------------------------------------------


def test_palette_violation_fraction():
    pixels = [
        (240, 10, 20),  # compressed red: fine
        (255, 255, 255),
        (30, 230, 250),  # compressed cyan: fine
        (0, 0, 0),
        (63, 0, 0),  # just below the low band: fine
        (226, 0, 0),  # just above the threshold: fine
        (128, 128, 128),  # mid-grey: violation
        (255, 165, 0),  # orange: violation
        (200, 0, 0),  # faded red the threshold would read as black: violation
        (64, 0, 0),  # low edge of the band: violation
        (225, 0, 0),  # threshold itself reads off: violation
    ] + [(0, 0, 0)] * 5
    image = to_unit(torch.tensor(pixels).T.reshape(1, 3, 4, 4))
    assert palette_violation_fraction(image) == 5 / 16
    # Raising the low edge above 128 makes mid-grey and (64, 0, 0) count as black: orange, 200, 225 remain.
    assert palette_violation_fraction(image, low=129) == 3 / 16
    assert palette_violation_fraction(to_unit(torch.tensor([(0, 0, 255)] * 4).T.reshape(3, 2, 2))) == 0.0


# ----------------------------------------------------------------------------------------------------
# Per-character masks -> colour video
# ----------------------------------------------------------------------------------------------------


def boxes(spec: list[list[tuple[int, int, int, int]]], frames: int, h: int, w: int) -> torch.Tensor:
    """spec[k][f] = (top, bottom, left, right) box of character k in frame f -> (K, F, H, W) bool."""
    masks = torch.zeros(len(spec), frames, h, w, dtype=torch.bool)
    for k, per_frame in enumerate(spec):
        for f, (t, b, l, r) in enumerate(per_frame):
            masks[k, f, t:b, l:r] = True
    return masks


def pixel_rgb8(video: torch.Tensor, f: int, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in ((video[f, :, y, x] + 1) * 127.5).tolist())


def test_character_order_by_x_and_area_uses_the_first_frame():
    masks = boxes(
        [
            [(0, 8, 10, 14), (0, 8, 0, 4)],  # char 0: centre x 11.5, area 32
            [(0, 2, 0, 2), (0, 2, 14, 16)],  # char 1: centre x 0.5, area 4 (moves right in frame 1)
            [(0, 4, 4, 10), (0, 4, 4, 10)],  # char 2: centre x 6.5, area 24
        ],
        frames=2,
        h=8,
        w=16,
    )
    assert character_order(masks, "x") == [1, 2, 0]
    assert character_order(masks, "area") == [0, 2, 1]
    assert character_colours([1, 2, 0]) == ["green", "blue", "red"]

    video = character_masks_to_colour(masks, "animation")  # order="x" by default
    assert video.shape == (2, 3, 8, 16)
    assert pixel_rgb8(video, 0, 0, 0) == COLOUR_RGB["blue"]  # char 1
    assert pixel_rgb8(video, 0, 0, 5) == COLOUR_RGB["red"]  # char 2
    assert pixel_rgb8(video, 0, 0, 12) == COLOUR_RGB["green"]  # char 0
    assert pixel_rgb8(video, 1, 0, 15) == COLOUR_RGB["blue"]  # char 1 keeps its colour after moving
    by_area = character_masks_to_colour(masks, "animation", order="area")
    assert pixel_rgb8(by_area, 0, 0, 12) == COLOUR_RGB["blue"]  # char 0, the largest


def test_character_order_uses_bounding_box_centre_not_centroid():
    masks = torch.zeros(2, 1, 4, 16, dtype=torch.bool)
    masks[0, 0, :, 0:6] = True  # char 0: big blob on the left ...
    masks[0, 0, 0, 15] = True  # ... plus one stray pixel: bbox centre 7.5, centroid about 2.9
    masks[1, 0, :, 6:9] = True  # char 1: bbox centre 7
    assert character_order(masks, "x") == [1, 0]


def test_character_order_ties_and_absent_characters():
    masks = torch.zeros(3, 2, 4, 8, dtype=torch.bool)
    masks[0, 1, :, 0:2] = True  # char 0 absent from the first frame -> last
    masks[1, 0, :, 4:6] = True
    masks[2, 0, :, 4:6] = True  # same box as char 1 -> index order
    assert character_order(masks, "x") == [1, 2, 0]
    assert character_order(masks, "area") == [1, 2, 0]


def test_seventh_character_reuses_blue():
    spec = [[(0, 4, 2 * k, 2 * k + 1)] for k in range(7)]  # seven thin columns left to right
    masks = boxes(spec, frames=1, h=4, w=16)
    order = character_order(masks, "x")
    assert order == list(range(7))
    assert character_colours(order) == ["blue", "red", "green", "magenta", "cyan", "yellow", "blue"]
    video = character_masks_to_colour(masks, "animation")
    assert [pixel_rgb8(video, 0, 0, 2 * k) for k in range(7)] == [
        COLOUR_RGB[c] for c in ("blue", "red", "green", "magenta", "cyan", "yellow", "blue")
    ]


def test_background_colour_per_mode_and_reference():
    # The official backgrounds: white marks the side whose environment is kept.
    masks = boxes([[(0, 2, 0, 2)]], frames=1, h=4, w=4)
    drawn = {
        ("animation", False): (0, 0, 0),
        ("animation", True): (255, 255, 255),
        ("replacement", False): (255, 255, 255),
        ("replacement", True): (0, 0, 0),
    }
    for (mode, reference), rgb in drawn.items():
        video = character_masks_to_colour(masks, mode, reference=reference)
        assert pixel_rgb8(video, 0, 3, 3) == rgb, (mode, reference)
        assert pixel_rgb8(video, 0, 0, 0) == COLOUR_RGB["blue"]
        assert set(video.unique().tolist()) <= {-1.0, 1.0}
        assert COLOUR_RGB[mask_background(mode, reference)] == rgb
        empty = background_mask(mode, reference, 4, 8, frames=2)
        assert empty.shape == (2, 3, 4, 8) and pixel_rgb8(empty, 1, 3, 7) == rgb
        # With no characters the drawing is the background mask.
        assert torch.equal(character_masks_to_colour(torch.zeros(0, 2, 4, 8, dtype=torch.bool), mode, reference=reference), empty)
    assert MASK_BACKGROUNDS == {"animation": ("white", "black"), "replacement": ("black", "white")}


def test_animation_reference_mask_lights_the_white_channel():
    # An animation-mode reference mask (character on white) reaches the latent mask as given: the background
    # is the white channel (channels 0, 7, 14, 21), the character its colour.
    masks = boxes([[(0, 16, 0, 8)]], frames=1, h=32, w=32)
    ref = character_masks_to_colour(masks, "animation", reference=True)[0]
    latent = reference_mask_to_latent(ref)  # (28, 1, 4, 4)
    for j in range(4):
        assert latent[7 * j + WHITE].mean().item() == pytest.approx(1 - 16 * 8 / 32**2)
        assert latent[7 * j + BLUE].mean().item() == pytest.approx(16 * 8 / 32**2)


@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_video_mask_to_reference_swaps_the_background_per_mode(dtype):
    masks = boxes([[(0, 2, 0, 2)], [(2, 4, 2, 4)]], frames=1, h=4, w=4)
    for mode in ("animation", "replacement"):
        video = character_masks_to_colour(masks, mode, order=[0, 1])  # the driving side
        expected = character_masks_to_colour(masks, mode, order=[0, 1], reference=True)
        if dtype == "uint8":
            got = video_mask_to_reference(((video + 1) * 127.5).round().to(torch.uint8), mode)
            assert got.dtype == torch.uint8 and torch.equal(got.float() / 127.5 - 1, expected), mode
        else:
            assert torch.equal(video_mask_to_reference(video, mode), expected), mode
    # Only pixels with every channel on (white) or none (black) count as background; colours stay.
    cyan = torch.tensor([[200, 250, 250]], dtype=torch.uint8).T.reshape(3, 1, 1)  # G and B on, R off
    assert torch.equal(video_mask_to_reference(cyan, "replacement"), cyan)
    assert torch.equal(video_mask_to_reference(cyan, "animation"), cyan)


def test_explicit_order_keeps_colours_between_reference_and_driving():
    # In the reference image char 0 is on the left; in the driving video char 1 is.
    ref_masks = boxes([[(0, 4, 0, 4)], [(0, 4, 8, 12)]], frames=1, h=4, w=16)
    drv_masks = boxes([[(0, 4, 8, 12)], [(0, 4, 0, 4)]], frames=1, h=4, w=16)
    order = character_order(drv_masks, "x")
    assert order == [1, 0]
    drv = character_masks_to_colour(drv_masks, "animation", order=order)
    ref = character_masks_to_colour(ref_masks, "animation", order=torch.tensor(order), reference=True)
    assert pixel_rgb8(drv, 0, 0, 9) == pixel_rgb8(ref, 0, 0, 1) == COLOUR_RGB["red"]  # char 0
    assert pixel_rgb8(drv, 0, 0, 1) == pixel_rgb8(ref, 0, 0, 9) == COLOUR_RGB["blue"]  # char 1
    # Without the shared order the reference would swap the colours.
    assert pixel_rgb8(character_masks_to_colour(ref_masks, "animation", reference=True), 0, 0, 1) == COLOUR_RGB["blue"]


def test_overlap_highest_index_wins():
    masks = boxes([[(0, 4, 0, 6)], [(0, 4, 4, 10)]], frames=1, h=4, w=12)  # overlap in columns 4, 5
    video = character_masks_to_colour(masks, "animation", order=[0, 1])  # char 0 blue, char 1 red
    assert pixel_rgb8(video, 0, 0, 3) == COLOUR_RGB["blue"]
    assert pixel_rgb8(video, 0, 0, 4) == COLOUR_RGB["red"]
    assert pixel_rgb8(video, 0, 0, 5) == COLOUR_RGB["red"]
    video = character_masks_to_colour(masks.flip(0), "animation", order=[1, 0])  # same colours, reversed
    assert pixel_rgb8(video, 0, 0, 4) == COLOUR_RGB["blue"]


@pytest.mark.parametrize("reference", [False, True], ids=["driving", "reference"])
@pytest.mark.parametrize("mode", ["animation", "replacement"])
def test_round_trip_recovers_per_colour_masks(mode, reference):
    generator = torch.Generator().manual_seed(1)
    k, frames, h, w = 8, 3, 16, 32
    masks = torch.rand(k, frames, h, w, generator=generator) > 0.8
    masks &= torch.arange(k).view(k, 1, 1, 1) == torch.randint(0, k, (1, frames, h, w), generator=generator)
    assert (masks.sum(0) <= 1).all()  # disjoint characters
    order = torch.randperm(k, generator=generator).tolist()
    video = character_masks_to_colour(masks, mode, order=order, reference=reference)
    channels = colour_to_channels(video).bool()  # (F, 7, H, W)

    colours = character_colours(order)
    white_background = (mode == "replacement") != reference  # animation references and replacement drivings
    for c, name in enumerate(MASK_CHANNELS):
        if name == "white":
            expected = ~masks.any(0) if white_background else torch.zeros(frames, h, w, dtype=torch.bool)
        else:
            expected = torch.zeros(frames, h, w, dtype=torch.bool)
            for character in range(k):
                if colours[character] == name:
                    expected |= masks[character]
        assert torch.equal(channels[:, c], expected), name

    # Overlapping masks: each colour channel holds exactly the pixels its characters won.
    overlapping = torch.rand(3, 1, h, w, generator=generator) > 0.5
    channels = colour_to_channels(character_masks_to_colour(overlapping, mode, order=[0, 1, 2], reference=reference)).bool()
    assert torch.equal(channels[0, BLUE], overlapping[0, 0] & ~overlapping[1, 0] & ~overlapping[2, 0])
    assert torch.equal(channels[0, RED], overlapping[1, 0] & ~overlapping[2, 0])
    assert torch.equal(channels[0, GREEN], overlapping[2, 0])


def test_character_masks_accept_zero_one_integers():
    masks = boxes([[(0, 2, 0, 2)]], frames=1, h=4, w=4)
    torch.testing.assert_close(
        character_masks_to_colour(masks.to(torch.uint8), "animation"), character_masks_to_colour(masks, "animation")
    )


# ----------------------------------------------------------------------------------------------------
# Errors name the value and the fix
# ----------------------------------------------------------------------------------------------------


def raises(*parts: str):
    """pytest.raises(ValueError) whose message contains the literal ``parts`` in order."""
    return pytest.raises(ValueError, match=".*".join(re.escape(p) for p in parts))


def test_check_frame_count():
    assert check_frame_count(1) == 1
    assert check_frame_count(37) == 10
    assert check_frame_count(81) == 21
    with raises("driving mask has 38 frames; need 4k+1 (e.g. 37 or 41)"):
        check_frame_count(38, "driving mask")
    with raises("has 0 frames; need 4k+1 (e.g. 1)"):
        check_frame_count(0)


def test_check_spatial_size():
    check_spatial_size(512, 896)
    with raises("mask height 500 is not divisible by 32; resize or crop to 480 or 512"):
        check_spatial_size(500, 512)
    with raises("driving mask width 900 is not divisible by 32; resize or crop to 896 or 928"):
        check_spatial_size(512, 900, "driving mask")
    with raises("mask width 16 is not divisible by 32; resize or crop to 32"):
        check_spatial_size(32, 16)


def test_latent_functions_reject_bad_frames_and_sizes():
    with raises("driving mask has 6 frames; need 4k+1 (e.g. 5 or 9)"):
        driving_mask_to_latent(torch.zeros(6, 3, 32, 32))
    with raises("driving mask height 48 is not divisible by 32; resize or crop to 32 or 64"):
        driving_mask_to_latent(torch.zeros(5, 3, 48, 32))
    with raises("reference mask width 40 is not divisible by 32; resize or crop to 32 or 64"):
        reference_mask_to_latent(torch.zeros(3, 32, 40))
    with raises("reference mask has 5 frames; need a single image", "use (B, 1, 3, H, W)"):
        reference_mask_to_latent(torch.zeros(5, 3, 32, 32))
    with raises("mask video has 6 frames; need 4k+1 (e.g. 5 or 9)"):
        pack_temporal(torch.zeros(6, 7, 2, 2))
    with raises("pack_temporal got shape (5, 3, 2, 2); need (F, 7, h, w) or (B, F, 7, h, w)"):
        pack_temporal(torch.zeros(5, 3, 2, 2))


def test_bad_values_dtype_and_channels():
    eight_bit = torch.full((1, 3, 2, 2), 255.0).index_fill_(-1, torch.tensor([0]), 0.0)
    with raises("mask video values span [0, 255]; expected [-1, 1]: map 8-bit values with x / 127.5 - 1"):
        colour_to_channels(eight_bit)
    with raises("driving mask values span [-2, 1]; expected [-1, 1]"):
        driving_mask_to_latent(torch.full((5, 3, 32, 32), -2.0).index_fill_(-1, torch.tensor([0]), 1.0))
    with raises("dtype torch.uint8; need float values in [-1, 1]: map 8-bit values with x / 127.5 - 1"):
        colour_to_channels(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with raises("has 4 channels at dim -3 (shape (1, 4, 2, 2)); need 3 (RGB)", "drop an alpha channel"):
        colour_to_channels(torch.zeros(1, 4, 2, 2))
    with raises("shape (1, 8, 8, 3), which looks channels-last", "x.movedim(-1, -3)"):
        reference_mask_to_latent(torch.zeros(1, 8, 8, 3))
    with raises("contains NaN or inf; need finite values in [-1, 1]"):
        colour_to_channels(torch.full((1, 3, 2, 2), float("nan")))
    with raises("palette_violation_fraction low=0; need an 8-bit level in (0, 225], e.g. 64"):
        palette_violation_fraction(torch.zeros(1, 3, 2, 2), low=0)


def test_bad_character_masks_mode_and_order():
    masks = boxes([[(0, 2, 0, 2)], [(0, 2, 2, 4)]], frames=1, h=4, w=4)
    with raises("unknown mask mode 'pose'; use one of ('animation', 'replacement')"):
        character_masks_to_colour(masks, "pose")
    with raises("order [0, 0] is not a permutation of range(2)", "character indices exactly once, e.g. [0, 1]"):
        character_masks_to_colour(masks, "animation", order=[0, 0])
    with raises("unknown character order 'y'; use 'x' (left to right), 'area' (largest first)"):
        character_order(masks, "y")
    with raises("character masks have shape (2, 4, 4); need (K, F, H, W)", "masks[:, None]"):
        character_masks_to_colour(masks[:, 0], "animation")
    with raises("values other than 0 and 1; need boolean masks: threshold soft masks first, e.g. masks > 0.5"):
        character_masks_to_colour(masks.float() * 0.7, "animation")
