"""Colour masks as the engine writes them (SPEC §3), and matching persons of a pose track to segmented characters.

Backgrounds: the white environment switch marks the side whose environment is kept, so

| mode | reference mask | driving mask (and target mask) |
|---|---|---|
| animation | white | black |
| replacement | black | white |

The binding order is `scail2.conditioning.masks.character_order` of the real clip's characters (left to right by
the first-frame box centre), computed once and used for every mask of a record, so each character has one colour.
"""

from __future__ import annotations

import numpy as np
import torch

from scail2.conditioning.masks import character_masks_to_colour, character_order
from scail2.data.batch import MODES
from scail2.data.engine.clips import PoseTrack

ROLES = ("reference", "driving")


def mask_background(mode: str, role: str) -> str:
    """"white" or "black": the background of a ``role`` ("reference" | "driving") mask in ``mode`` (SPEC §3)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if role not in ROLES:
        raise ValueError(f"unknown mask role {role!r}; use one of {ROLES}")
    white = (mode == "animation") == (role == "reference")
    return "white" if white else "black"


def binding_order(masks: np.ndarray) -> list[int]:
    """perm[i] = the character that gets binding slot i (left to right by the first-frame box centre)."""
    return character_order(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)), "x")


def colour_masks(masks: np.ndarray, background: str, order: list[int]) -> np.ndarray:
    """(K, F, H, W) bool -> (F, H, W, 3) uint8 colour-coded mask video on a ``background`` ("black" | "white").

    A thin wrapper of `character_masks_to_colour` (which draws the palette, the order and the overlaps): its
    driving-mask background is black in animation mode and white in replacement mode, so the background is chosen
    through the mode argument (the colours do not depend on the mode).
    """
    if background not in ("black", "white"):
        raise ValueError(f"background {background!r}; use 'black' or 'white'")
    mode = "replacement" if background == "white" else "animation"
    video = character_masks_to_colour(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)), mode, order)
    return np.where(video.numpy() > 0, 255, 0).astype(np.uint8).transpose(0, 2, 3, 1).copy()  # values are exactly +-1


def mode_masks(masks: np.ndarray, mode: str, role: str, order: list[int]) -> np.ndarray:
    """Colour masks for a role in a mode (the table above)."""
    return colour_masks(masks, mask_background(mode, role), order)


def match_persons(track: PoseTrack, masks: np.ndarray) -> list[int] | None:
    """character index of each person of ``track``, or None when persons and characters do not pair up one to one.

    Score of (person p, character k): the number of p's detected keypoints, over all frames, that fall inside
    k's mask. Pairs are taken greedily by score (highest first, each person and character once); a person whose
    best remaining score is 0 is unmatched. Needs as many persons as characters.
    """
    k_count, f_count, h, w = masks.shape
    if track.persons != k_count or track.frames != f_count:
        return None
    kp = np.asarray(track.keypoints, dtype=np.float64)  # (P, F, J, 2)
    score = np.zeros((track.persons, k_count), dtype=np.int64)
    for p in range(track.persons):
        ok = np.isfinite(kp[p]).all(axis=-1)  # (F, J)
        fi, ji = np.nonzero(ok)
        xs = np.clip(np.floor(kp[p, fi, ji, 0]).astype(int), 0, w - 1)
        ys = np.clip(np.floor(kp[p, fi, ji, 1]).astype(int), 0, h - 1)
        inside = (kp[p, fi, ji, 0] >= 0) & (kp[p, fi, ji, 0] < w) & (kp[p, fi, ji, 1] >= 0) & (kp[p, fi, ji, 1] < h)
        for k in range(k_count):
            score[p, k] = int((masks[k, fi, ys, xs] & inside).sum())
    assignment = [-1] * track.persons
    taken: set[int] = set()
    for flat in np.argsort(-score, axis=None, kind="stable"):
        p, k = divmod(int(flat), k_count)
        if assignment[p] >= 0 or k in taken or score[p, k] == 0:
            continue
        assignment[p] = k
        taken.add(k)
    return assignment if all(a >= 0 for a in assignment) else None


def match_masks(synthetic: np.ndarray, real: np.ndarray) -> list[int] | None:
    """For each synthetic character, the real character it stands for (greedy by IoU over the whole clip), or None
    when the counts differ or a synthetic character overlaps no real one."""
    if synthetic.shape[0] != real.shape[0] or synthetic.shape[1:] != real.shape[1:]:
        return None
    k = real.shape[0]
    iou = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            inter = np.logical_and(synthetic[i], real[j]).sum()
            union = np.logical_or(synthetic[i], real[j]).sum()
            iou[i, j] = inter / union if union else 0.0
    assignment = [-1] * k
    taken: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if assignment[i] >= 0 or j in taken or iou[i, j] == 0:
            continue
        assignment[i] = j
        taken.add(j)
    return assignment if all(a >= 0 for a in assignment) else None
