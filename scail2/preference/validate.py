"""Checks every preference pair before it is cached or trained on: the motion manifest's checks
(`scail2.data.validate`) applied to the condition, the preferred and the dispreferred video.

`validate_preference_manifest` yields one `RecordReport` per record, as `scail2.data.validate.validate_manifest`
does for motion pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from scail2.data.validate import (
    RecordReport,
    ValidateOptions,
    check_boxes,
    check_pair_videos,
    check_reference,
    check_video_mask,
    probe_videos,
    validate_items,
)
from scail2.preference.records import HAND_FIELDS, PreferenceRecord, iter_preference_manifest


def validate_preference_record(record: PreferenceRecord, options: ValidateOptions = ValidateOptions()) -> RecordReport:
    """Files exist and decode; frame counts, sizes and fps agree; reference, masks and hand boxes fit."""
    report = RecordReport(record.id)
    videos = probe_videos(record.video_fields(), {"driving_mask"}, report, options)
    main = videos.get("preferred")
    if main is not None:
        check_pair_videos(record, videos, "preferred", ("preferred", "dispreferred", "driving"), report, options)
        for name in HAND_FIELDS:
            check_boxes(name, getattr(record, name), main, "preferred", report)
    mask = videos.get("driving_mask")
    if mask is not None and mask.sample is not None:
        check_video_mask(mask.sample, "driving_mask", record.mode, report, options)
    check_reference(record, main, "preferred", report, options)
    return report


def validate_preference_manifest(
    path: str | Path, options: ValidateOptions = ValidateOptions(), workers: int = 1
) -> Iterator[RecordReport]:
    """A report per record: parse errors and duplicate ids first, then every pair in manifest order."""
    return validate_items(iter_preference_manifest(path), validate_preference_record, options, workers)
