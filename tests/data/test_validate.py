"""`scail2-data validate`: one line per bad record naming id, field and reason; synth output is clean."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from scail2.data.cli import main
from scail2.data.video import read_image, read_video, write_image, write_video
from tests.data.helpers import synth_dataset


def test_synth_output_validates_cleanly(capsys):
    manifest = synth_dataset(pairs=10, frames=9, sizes=((64, 64), (64, 96)))
    assert main(["validate", str(manifest), "--full", "--buckets", "9x64x64", "9x64x96"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "10 records: 0 bad" in out.err


@pytest.fixture(scope="module")
def broken_manifest(tmp_path_factory):
    """A copy of a synthetic dataset plus one bad record per kind of problem; returns (manifest, expected)."""
    root = tmp_path_factory.mktemp("validate") / "data"
    shutil.copytree(synth_dataset(pairs=10, frames=9).parent, root)
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    base = next(r for r in lines if r["mode"] == "animation" and isinstance(r["reference"], int) and r["end_to_end"])
    folder = root / "bad"
    folder.mkdir()
    target = read_video(root / base["target"])
    mask = read_video(root / base["driving_mask"])

    def video(name, frames, lossless=False, **kw):
        write_video(folder / name, frames, fps=16, lossless=lossless, **kw)
        return f"bad/{name}"

    data = (root / base["target"]).read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])
    fast = (root / video("fast.mp4", target, faststart=True)).read_bytes()
    (folder / "cut_fast.mp4").write_bytes(fast[: len(fast) // 2])
    orange = mask.copy()
    orange[:, :, :20] = (255, 165, 0)
    white_bg = mask.copy()
    white_bg[(mask < 30).all(axis=-1)] = 255
    write_image(folder / "small_mask.png", np.zeros((32, 32, 3), dtype=np.uint8))
    black_ref = read_image(root / base["reference_mask"]).copy()  # the old rule: an animation reference on black
    black_ref[(black_ref > 225).all(axis=-1)] = 0
    write_image(folder / "black_ref.png", black_ref)

    def bad(name, **changes):
        record = {**base, "id": name, **changes}
        return {k: v for k, v in record.items() if v is not None}

    cases = {
        "missing_file": (bad("missing_file", driving="bad/nope.mp4"), "driving", "missing"),
        "empty_file": (bad("empty_file", target="bad/empty.mp4"), "target", "empty"),
        "cut_file": (bad("cut_file", target="bad/cut.mp4"), "target", "unreadable"),
        "over_reported": (bad("over_reported", driving="bad/cut_fast.mp4"), "driving", "truncated"),
        "short_driving": (bad("short_driving", driving=video("short.mp4", target[:5])), "driving", "has 5 frames"),
        "wide_mask": (bad("wide_mask", driving_mask=video("wide.mp4", np.zeros((9, 64, 96, 3), np.uint8), True)), "driving_mask", "64x96"),
        "off_palette": (bad("off_palette", driving_mask=video("orange.mp4", orange, True)), "driving_mask", "palette"),
        "wrong_background": (bad("wrong_background", driving_mask=video("white.mp4", white_bg, True)), "driving_mask", "animation mode"),
        "reference_range": (bad("reference_range", reference=50), "reference", "past the end"),
        "reference_mask_size": (bad("reference_mask_size", reference_mask="bad/small_mask.png"), "reference_mask", "32x32"),
        "black_reference_mask": (bad("black_reference_mask", reference_mask="bad/black_ref.png"), "reference_mask", "drawn on white"),
        "hand_frames": (bad("hand_frames", hands=[[[1, 1, 4, 4]]] * 3), "hands", "3 frames"),
        "fps_mismatch": (bad("fps_mismatch", fps=30), "target", "fps=30"),
        "frames_meta": (bad("frames_meta", frames=81), "frames", "record says 81"),
        "wrong_type": (bad("wrong_type", fps="fast"), "fps", "positive number"),
        "unknown_key": (bad("unknown_key", colour="red"), "colour", "unknown key"),
        "too_short": (bad("too_short", target=video("t5.mp4", target[:5]), driving=video("d5.mp4", target[:5]),
                          driving_mask=video("m5.mp4", mask[:5], True), target_mask=video("tm5.mp4", mask[:5], True),
                          frames=None, reference=0, hands=None, faces=None, driving_aug=None, driving_mask_aug=None),
                      "target", "too short"),
    }  # fmt: skip
    rows = lines + [c[0] for c in cases.values()] + [{**base}]  # the last one duplicates an id
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {name: (field, words) for name, (_, field, words) in cases.items()}
    expected[base["id"]] = ("id", "duplicate id")
    return root / "manifest.jsonl", expected


def test_each_bad_record_gives_one_line(broken_manifest, capsys):
    manifest, expected = broken_manifest
    assert main(["validate", str(manifest), "--buckets", "9x64x64"]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    by_id = {}
    for line in lines:
        rid = line.split(": ", 1)[0]
        assert rid not in by_id, f"two lines for {rid}"
        by_id[rid] = line
    assert set(by_id) == set(expected), sorted(set(by_id) ^ set(expected))
    for rid, (field, words) in expected.items():
        line = by_id[rid]
        assert f"{rid}: {field}: " in line or f"; {field}: " in line, line
        assert words in line, line
    assert f"{10 + len(expected)} records: {len(expected)} bad" in out.err


def test_unreadable_manifest_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "none.jsonl")]) == 2
