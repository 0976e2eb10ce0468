"""The conditioning record: its operations, its place below the other layers, and one encoding for training and
inference (the same pixels give the same tensors through the latent-cache path and the pipeline)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from scail2.conditioning import Condition, MotionBatch
from scail2.conditioning.condition import MODES
from scail2.conditioning.masks import character_masks_to_colour
from scail2.conditioning.packing import SequenceLayout, sequence_layout
from scail2.conditioning.pixels import to_uint8, to_unit
from scail2.models import SCAIL2Transformer, scail2_config
from scail2.testing import random_condition, random_scail2_batch

from .data.helpers import tiny_encoders, torch_threads


# ------------------------------------------------------------------------------------------ the record
def test_repeat_select_and_to():
    cond = random_condition(scail2_config("tiny"), batch=3, modes=["animation", "replacement", "animation"],
                            num_extra_refs=2)  # fmt: skip
    two = cond.repeat(2)
    assert two.batch_size == 6 and two.modes == cond.modes * 2
    for name in ("reference", "reference_mask", "driving", "driving_mask", "text", "clip_tokens",
                 "extra_references", "extra_reference_masks"):  # fmt: skip
        a, b = getattr(cond, name), getattr(two, name)
        assert torch.equal(b[:3], a) and torch.equal(b[3:], a), name
    picked = two.select([4, 0])
    assert picked.modes == ["replacement", "animation"]
    assert torch.equal(picked.driving, torch.stack([cond.driving[1], cond.driving[0]]))
    assert torch.equal(picked.extra_reference_masks[0], cond.extra_reference_masks[1])
    assert two.select(slice(3, None)) == cond and two.select(torch.tensor([0, 1, 2])) == cond
    assert cond.select(-1).modes == ["animation"] and cond.select(-1).batch_size == 1
    assert cond.select(torch.tensor([False, True, False])) == cond.select(1)
    assert cond.select(1) != cond.select(0)
    half = cond.to("cpu", torch.bfloat16)
    assert half.reference.dtype == torch.bfloat16 and half.extra_references.dtype == torch.bfloat16
    assert half.modes == cond.modes and cond.reference.dtype == torch.float32
    with pytest.raises(ValueError, match=r"repeat\(0\)"):
        cond.repeat(0)
    with pytest.raises(IndexError):
        cond.select(3)


def test_construction_errors_name_the_field():
    cond = random_condition(scail2_config("tiny"), batch=2)
    fields = {k: getattr(cond, k) for k in ("reference", "reference_mask", "driving", "driving_mask", "text",
                                            "clip_tokens")}  # fmt: skip
    with pytest.raises(ValueError, match="got 1 modes for a batch of 2"):
        Condition(**fields, modes=["animation"])
    with pytest.raises(ValueError, match=r"unknown modes \['pose'\]"):
        Condition(**fields, modes=["animation", "pose"])
    with pytest.raises(ValueError, match=r"Condition.text has shape \(3, 7, 32\); every field needs the batch size 2"):
        Condition(**{**fields, "text": torch.zeros(3, 7, 32)}, modes=["animation"] * 2)
    with pytest.raises(ValueError, match="extra_references is given without its partner"):
        Condition(**fields, modes=["animation"] * 2, extra_references=torch.zeros(2, 1, 16, 1, 8, 8))
    with pytest.raises(ValueError, match="MotionBatch.cond has a batch of 2 for 1 latents"):
        MotionBatch(latents=torch.zeros(1, 16, 3, 8, 8), cond=cond, source=["x"], history_allowed=torch.tensor([True]))
    assert MODES == ("animation", "replacement")


def test_conditioning_imports_no_layer_above_it():
    # The conditioning package sits below data, objectives, pipeline and training: importing all of it (in a
    # fresh interpreter) loads none of them, so there is no import cycle through it. (utils is the leaf layer.)
    code = (
        "import sys, scail2.conditioning, scail2.conditioning.encode, scail2.conditioning.packing, "
        "scail2.conditioning.masks, scail2.conditioning.batch\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('scail2.') and m.count('.') >= 1}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["conditioning", "models", "utils"]  # utils: file helpers that import no other layer
    from scail2.bench import cases
    from scail2.data import batch

    assert cases.MODES is MODES and batch.MODES is MODES and batch.MotionBatch is MotionBatch


def test_pixels_round_trip_every_8bit_level():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 256, 1)
    unit = to_unit(levels)
    assert unit.dtype == torch.float32 and unit.min() == -1 and unit.max() == 1
    assert torch.equal(to_uint8(unit), levels)
    assert torch.equal(to_uint8(torch.tensor([-1.5, 1.5])), torch.tensor([0, 255], dtype=torch.uint8))  # clamped


# ---------------------------------------------------------------------- the token layout of the packing
@pytest.mark.parametrize(("frames", "height", "width", "extra", "mode"),
                         [(3, 8, 8, 0, "animation"), (5, 8, 12, 2, "replacement"), (1, 4, 16, 1, "animation")])
def test_sequence_layout_counts_the_packed_tokens(frames, height, width, extra, mode):
    # The layout that FLOP and token counts use is the one the packing builds: every segment's tokens as the
    # backbone patchifies them, the RoPE factors' length as their sum.
    config = scail2_config("tiny")
    inputs, kwargs = random_scail2_batch(config, batch=1, frames=frames, height=height, width=width, modes=[mode],
                                         num_extra_refs=extra)  # fmt: skip
    layout = sequence_layout(frames, height, width, config.patch_size, extra)
    patch = 2 * 2
    assert layout.reference == inputs.reference[0, 0].numel() // patch == (extra + 1) * (height // 2) * (width // 2)
    assert layout.video == inputs.video[0, 0].numel() // patch
    assert layout.driving == inputs.driving[0, 0].numel() // patch == layout.video // 4
    assert layout.total == inputs.rope.shape[1]
    with torch.device("meta"):
        model = SCAIL2Transformer(config)
    text_len, image_len = kwargs["context"].shape[1], kwargs["clip_tokens"].shape[1]
    assert model.flops_for_inputs(inputs, text_len, image_len) == model.flops_per_forward(
        layout.total, text_len, image_len, head_tokens=layout.video, mask_tokens=layout.mask_tokens
    )


def test_sequence_layout_at_512p():
    # 81 frames at 512x896: latents 21 x 64 x 112; 1,792 reference, 37,632 video and 9,408 driving tokens.
    assert sequence_layout(21, 64, 112) == SequenceLayout(reference=1792, video=37632, driving=9408)
    assert sequence_layout(21, 64, 112, num_extra_refs=2).reference == 3 * 1792


# ---------------------------------------------------------------------- one encoding: training == inference
H = W = 64
FRAMES = 9


def _pixels(mode: str, masks: bool, extra: int, seed: int = 0) -> dict:
    """uint8 pixels at the target size: a reference, a driving video, colour masks of two characters drawn on
    the mode's backgrounds (or None), ``extra`` further references with masks, a target video."""
    g = torch.Generator().manual_seed(seed)

    def rgb(*lead):
        return (torch.rand(*lead, 3, H, W, generator=g) * 255).to(torch.uint8)

    def boxes(frames, spans):
        out = torch.zeros(len(spans), frames, H, W, dtype=torch.bool)
        for k, (y0, y1, x0, x1) in enumerate(spans):
            out[k, :, y0:y1, x0:x1] = True
        return out

    def u8(colour):  # {-1, 1} float -> uint8
        return ((colour + 1) * 127.5).round().to(torch.uint8)

    chars = [(8, 56, 4, 24), (10, 60, 36, 60)]
    out = {"reference": rgb(), "driving": rgb(FRAMES), "target": rgb(FRAMES), "reference_mask": None, "driving_mask": None}
    if masks:
        out["reference_mask"] = u8(character_masks_to_colour(boxes(1, chars), mode, [0, 1], reference=True))[0]
        out["driving_mask"] = u8(character_masks_to_colour(boxes(FRAMES, chars[::-1]), mode, [1, 0]))
    out["extra_references"] = rgb(extra) if extra else None
    out["extra_reference_masks"] = (
        torch.stack([u8(character_masks_to_colour(boxes(1, chars[k % 2 : k % 2 + 1]), mode, [0], reference=True))[0]
                     for k in range(extra)]) if extra else None  # fmt: skip
    )
    return out


def _training_condition(pixels: dict, mode: str, caption: str) -> Condition:
    """The latent-cache path: a `PixelSample` -> `encode_pixel_sample` -> `collate_samples` -> ``batch.cond``."""
    from scail2.data.buckets import Bucket
    from scail2.data.latents import collate_samples, encode_pixel_sample
    from scail2.data.sample import PixelSample

    sample = PixelSample(
        id="s0", source="test", mode=mode, end_to_end=True, history_allowed=True, caption=caption, forward=False,
        bucket=Bucket(FRAMES, H, W), target=pixels["target"], reference=pixels["reference"],
        reference_mask=pixels["reference_mask"], drivings={"driving": (pixels["driving"], pixels["driving_mask"])},
        extra_references=pixels["extra_references"], extra_reference_masks=pixels["extra_reference_masks"],
    )  # fmt: skip
    return collate_samples([encode_pixel_sample(sample, tiny_encoders())]).cond


def _inference_condition(pixels: dict, mode: str, caption: str) -> Condition:
    """The pipeline path: `prepare_inputs` (the user's arrays) -> ``SCAIL2Pipeline.encode_condition``."""
    from scail2.models import SCAIL2Transformer
    from scail2.pipeline import SCAIL2Pipeline, prepare_inputs

    enc = tiny_encoders()
    pipe = SCAIL2Pipeline(SCAIL2Transformer(scail2_config("tiny")), enc.vae, enc.text, enc.image)
    hwc = lambda x: None if x is None else np.ascontiguousarray(x.movedim(-3, -1).numpy())  # noqa: E731
    extra = pixels["extra_references"]
    prepared = prepare_inputs(
        hwc(pixels["reference"]), hwc(pixels["driving"]), mode=mode, reference_mask=hwc(pixels["reference_mask"]),
        driving_mask=hwc(pixels["driving_mask"]), height=H, width=W,
        extra_reference_images=None if extra is None else [hwc(x) for x in extra],
        extra_reference_masks=None if extra is None else [hwc(x) for x in pixels["extra_reference_masks"]],
    )  # fmt: skip
    return pipe.encode_condition(prepared, prompt=caption)


@pytest.mark.parametrize(
    "mode, masks, extra",
    [("animation", True, 0), ("animation", True, 2), ("replacement", True, 0), ("replacement", True, 1),
     ("animation", False, 1)],
    ids=["animation", "animation-extra", "replacement", "replacement-extra", "animation-no-masks"],
)
def test_training_and_inference_encode_the_same_conditioning(mode, masks, extra):
    pixels = _pixels(mode, masks, extra)
    caption = "a red character dancing in a room"
    with torch_threads(1):
        train = _training_condition(pixels, mode, caption)
        infer = _inference_condition(pixels, mode, caption)
    for name in ("reference", "reference_mask", "driving", "driving_mask", "text", "clip_tokens", "extra_references",
                 "extra_reference_masks"):  # fmt: skip
        a, b = getattr(train, name), getattr(infer, name)
        assert (a is None) == (b is None) == (extra == 0 and name.startswith("extra")), name
        if a is not None:
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
            assert torch.equal(a, b), name
    assert train.modes == infer.modes == [mode]
    assert train.reference.shape == (1, 16, 1, H // 8, W // 8) and train.driving.shape == (1, 16, 3, H // 16, W // 16)
    if extra:
        assert train.extra_references.shape == (1, extra, 16, 1, H // 8, W // 8)
        assert train.extra_reference_masks.shape == (1, extra, 28, 1, H // 8, W // 8)
    # The reference mask reaches the packing as drawn: in animation mode its white background lights the white
    # channel (channels 0, 7, 14, 21), in replacement mode it is black; the driving mask the other way round.
    ref_white = train.reference_mask[0, [0, 7, 14, 21]].mean().item()
    drive_white = train.driving_mask[0, [0, 7, 14, 21]].mean().item()
    background = 1 - (48 * 20 + 50 * 24) / (H * W) if masks else 1.0  # outside the two characters
    if mode == "animation":
        assert ref_white == pytest.approx(background) and drive_white == 0
    else:
        assert ref_white == 0 and drive_white == pytest.approx(background)
    if not masks:
        assert not train.driving_mask.any() and not train.reference_mask[0, 1:7].any()  # no characters


def test_encoding_errors_name_the_input():
    from scail2.conditioning.encode import encode_condition, encode_driving, encode_images

    enc = tiny_encoders()
    video = torch.zeros(FRAMES, 3, H, W, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"driving mask \(5, 3, 64, 64\) does not match the driving video \(9, 3, 64, 64\)"):
        encode_driving(enc, video, video[:5], "animation")
    with pytest.raises(ValueError, match=r"reference masks \(2, 3, 64, 64\) do not match the images \(1, 3, 64, 64\)"):
        encode_images(enc, video[:1], video[:2], "animation")
    with pytest.raises(ValueError, match=r"reference image has shape \(64, 64, 3\); need \(3, H, W\)"):
        encode_condition(enc, reference=video[0].permute(1, 2, 0), driving=video, caption="", mode="animation")
    with pytest.raises(ValueError, match="unknown mode 'pose'"):
        encode_condition(enc, reference=video[0], driving=video, caption="", mode="pose")
    with pytest.raises(ValueError, match="extra_reference_masks given without extra_references"):
        encode_condition(enc, reference=video[0], driving=video, caption="", mode="animation",
                         extra_reference_masks=video[:1])  # fmt: skip
