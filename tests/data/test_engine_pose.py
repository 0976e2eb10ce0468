"""Skeleton rendering from hand-made keypoints (exact pixels), skeleton scaling, mask backgrounds and matching."""

from __future__ import annotations

import numpy as np
import pytest

from scail2.data.engine.masks import colour_masks, mask_background, match_masks, match_persons, mode_masks
from scail2.data.engine.pose import (
    FACE_COLOUR,
    HAND_EDGE_COLOURS,
    HAND_POINT_COLOUR,
    OPENPOSE_BODY18,
    OPENPOSE_BODY25,
    random_skeleton_scale,
    render_poses,
    scale_skeleton,
    skeleton_for,
)
from scail2.data.engine.clips import COCO_WHOLEBODY, KeypointLayout, PoseTrack

RED, ORANGE, CYAN, GREY = (255, 0, 0), (255, 85, 0), (0, 255, 255), (150, 150, 150)


def _track(layout, points: dict[str, tuple[float, float]], size=(48, 64), persons=1) -> PoseTrack:
    index = {n: i for i, n in enumerate(layout.joints)}
    kp = np.full((persons, 1, len(layout.joints), 2), np.nan)
    for name, xy in points.items():
        kp[0, 0, index[name]] = xy
    return PoseTrack(kp, layout, size[0], size[1], 16.0)


def test_openpose18_limbs_have_scail_colours_at_exact_pixels():
    track = _track(OPENPOSE_BODY18, {"neck": (10.5, 10.5), "right_shoulder": (20.5, 10.5), "right_elbow": (20.5, 20.5)})
    out = render_poses(track, limb_radius=0.5, mask_margin=0)
    frame = out.frames[0]
    assert tuple(frame[10, 15]) == RED  # neck -> right shoulder
    assert tuple(frame[15, 20]) == ORANGE  # right shoulder -> right elbow
    assert tuple(frame[10, 20]) == ORANGE  # the shared joint: the outer limb is drawn last
    assert tuple(frame[10, 10]) == RED and tuple(frame[20, 20]) == ORANGE  # both ends are covered
    assert tuple(frame[11, 15]) == (0, 0, 0) and tuple(frame[10, 9]) == (0, 0, 0)  # a 1-pixel wide line
    covered = (frame != 0).any(-1)
    assert covered.sum() == 11 + 10  # row 10 cols 10..20, col 20 rows 11..20
    # The left shoulder is undetected (NaN): none of its colours appear.
    assert not (frame == CYAN).all(-1).any()
    assert (out.masks[0, 0] == covered).all()


def test_coco_wholebody_neck_hands_and_face():
    points = {"left_shoulder": (30.5, 10.5), "right_shoulder": (10.5, 10.5), "nose": (20.5, 2.5),
              "left_hand_0": (40.5, 40.5), "left_hand_1": (44.5, 40.5), "face_17": (50.5, 5.5), "face_0": (56.5, 5.5)}  # fmt: skip
    out = render_poses(_track(COCO_WHOLEBODY, points), limb_radius=0.5, hand_radius=0.5, face_radius=0.5, mask_margin=0)
    frame = out.frames[0]
    # The neck is the shoulders' midpoint (20.5, 10.5): neck -> right shoulder red, -> left shoulder cyan, -> nose grey.
    assert tuple(frame[10, 12]) == RED and tuple(frame[10, 28]) == CYAN
    assert tuple(frame[6, 20]) == GREY
    # Hand: the first edge (wrist -> thumb) in the first hue, keypoints as blue dots on top.
    assert tuple(frame[40, 42]) == HAND_EDGE_COLOURS[0] == (255, 0, 0)
    assert tuple(frame[40, 40]) == HAND_POINT_COLOUR and tuple(frame[40, 44]) == HAND_POINT_COLOUR
    # Face: eyebrow landmark 17 is drawn white; jaw landmark 0 is not drawn (SCAIL-Pose's reduced face).
    assert tuple(frame[5, 50]) == FACE_COLOUR
    assert tuple(frame[5, 56]) == (0, 0, 0)


def test_body25_and_hand_less_drawing():
    points = {"neck": (10.5, 10.5), "right_shoulder": (20.5, 10.5)}
    out = render_poses(_track(OPENPOSE_BODY25, points), limb_radius=0.5, mask_margin=0)
    assert tuple(out.frames[0, 10, 15]) == RED
    with pytest.raises(ValueError, match="no skeleton for the keypoint layout"):
        skeleton_for(KeypointLayout("mine", ("a", "b"), ()))


def test_multi_person_masks_take_binding_colours_and_margin_grows_them():
    kp = np.full((2, 1, 18, 2), np.nan)
    kp[0, 0, 1], kp[0, 0, 2] = (40.5, 10.5), (50.5, 10.5)  # person 0 on the right
    kp[1, 0, 1], kp[1, 0, 2] = (5.5, 20.5), (15.5, 20.5)  # person 1 on the left
    track = PoseTrack(kp, OPENPOSE_BODY18, 32, 64, 16.0)
    out = render_poses(track, limb_radius=0.5, mask_margin=1)
    assert out.masks.shape == (2, 1, 32, 64)
    assert out.masks[0, 0, 10, 45] and not out.masks[1, 0, 10, 45]
    assert out.masks[0, 0, 9, 45] and out.masks[0, 0, 11, 45] and not out.masks[0, 0, 12, 45]  # grown by 1 pixel
    # Slots go left to right: the left person (1) is blue, the right one (0) red; the driving mask is on black.
    from scail2.data.engine.masks import binding_order

    video = mode_masks(out.masks, "animation", "driving", binding_order(out.masks))
    assert tuple(video[0, 20, 10]) == (0, 0, 255) and tuple(video[0, 10, 45]) == (255, 0, 0)
    assert tuple(video[0, 0, 0]) == (0, 0, 0)


def test_scale_skeleton_about_the_box_centre():
    kp = np.array([[[[10.0, 10.0], [20.0, 10.0], [np.nan, np.nan]]]])  # (1, 1, 3, 2)
    layout = KeypointLayout("three", ("a", "b", "c"), ())
    scaled = scale_skeleton(PoseTrack(kp, layout, 32, 32, 16.0), [(2.0, 3.0)])
    np.testing.assert_allclose(scaled.keypoints[0, 0, :2], [[5.0, 10.0], [25.0, 10.0]])
    assert np.isnan(scaled.keypoints[0, 0, 2]).all()
    with pytest.raises(ValueError, match="one \\(sx, sy\\) per person"):
        scale_skeleton(PoseTrack(kp, layout, 32, 32, 16.0), [])
    track = PoseTrack(np.random.default_rng(0).uniform(0, 30, (3, 2, 3, 2)), layout, 32, 32, 16.0)
    a, fa = random_skeleton_scale(track, np.random.default_rng(5), (0.8, 1.2))
    b, fb = random_skeleton_scale(track, np.random.default_rng(5), (0.8, 1.2))
    assert fa == fb and all(0.8 <= sx <= 1.2 and sx == sy for sx, sy in fa)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    # Each person's box grows by its factor (width of the per-frame box).
    width = lambda t: np.ptp(t.keypoints[..., 0], axis=-1)  # noqa: E731
    np.testing.assert_allclose(width(a), width(track) * np.array([f[0] for f in fa])[:, None])


def test_mask_backgrounds_follow_the_environment_switch():
    assert mask_background("animation", "reference") == "white"
    assert mask_background("animation", "driving") == "black"
    assert mask_background("replacement", "reference") == "black"
    assert mask_background("replacement", "driving") == "white"
    masks = np.zeros((2, 1, 8, 8), dtype=bool)
    masks[0, 0, 2:4, 5:7] = True  # right
    masks[1, 0, 2:4, 0:2] = True  # left
    order = [1, 0]
    white = colour_masks(masks, "white", order)
    assert tuple(white[0, 7, 7]) == (255, 255, 255)
    assert tuple(white[0, 2, 0]) == (0, 0, 255) and tuple(white[0, 2, 5]) == (255, 0, 0)
    black = mode_masks(masks, "replacement", "reference", order)
    assert tuple(black[0, 7, 7]) == (0, 0, 0) and tuple(black[0, 2, 0]) == (0, 0, 255)


def test_match_persons_and_masks():
    masks = np.zeros((2, 1, 16, 16), dtype=bool)
    masks[0, 0, :, :8] = True
    masks[1, 0, :, 8:] = True
    layout = KeypointLayout("two", ("a", "b"), ())
    kp = np.array([[[[12.0, 3.0], [13.0, 5.0]]], [[[2.0, 3.0], [np.nan, np.nan]]]])  # person 0 right, 1 left
    assert match_persons(PoseTrack(kp, layout, 16, 16, 16.0), masks) == [1, 0]
    assert match_persons(PoseTrack(kp[:1], layout, 16, 16, 16.0), masks) is None  # 1 person, 2 characters
    far = kp.copy()
    far[1] = np.nan  # person 1 detected nowhere
    assert match_persons(PoseTrack(far, layout, 16, 16, 16.0), masks) is None
    assert match_masks(masks[::-1], masks) == [1, 0]
    assert match_masks(masks[:1], masks) is None
