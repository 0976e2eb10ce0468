"""The latent stage: encode a `PixelSample`, pick the driving signal, and collate into a `MotionBatch`.

The raw-video dataset and the latent-cache writer both go through `encode_pixel_sample`, which encodes the
condition with `scail2.conditioning.encode.encode_condition`, the function ``SCAIL2Pipeline`` uses too: the
same pixels give the same conditioning tensors in training and at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from scail2.conditioning.batch import MotionBatch
from scail2.conditioning.condition import Condition
from scail2.conditioning.encode import encode_condition, encode_driving
from scail2.conditioning.pixels import to_unit
from scail2.data.buckets import Bucket
from scail2.data.sample import REGION_NAMES, PixelSample
from scail2.data.transforms import region_to_latent

if TYPE_CHECKING:
    from scail2.encoders.bundle import Encoders


@dataclass
class LatentSample:
    """One encoded sample (no batch dim). T = latent frames, h x w = latent grid of the target.

    latents: (16, T, h, w); reference: (16, 1, h, w); reference_mask: (28, 1, h, w);
    driving / driving_aug: (16, T, h/2, w/2); driving_mask / driving_mask_aug: (28, T, h/2, w/2);
    text: (L, text_dim), only the caption's real rows (padded with zeros to ``text_len`` when collated);
    clip_tokens: (257, image_dim); regions: name -> (1, T, h, w) coverage; extra_references (n, 16, 1, h, w)
    and extra_reference_masks (n, 28, 1, h, w) when the sample has further reference images.
    """

    id: str
    source: str
    mode: str
    end_to_end: bool
    history_allowed: bool
    forward: bool
    bucket: Bucket
    latents: torch.Tensor
    reference: torch.Tensor
    reference_mask: torch.Tensor
    driving: torch.Tensor
    driving_mask: torch.Tensor
    text: torch.Tensor
    text_len: int
    clip_tokens: torch.Tensor
    regions: dict[str, torch.Tensor] = field(default_factory=dict)
    driving_aug: torch.Tensor | None = None
    driving_mask_aug: torch.Tensor | None = None
    swapped: bool = False
    skips: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of samples replaced by this one
    extra_references: torch.Tensor | None = None
    extra_reference_masks: torch.Tensor | None = None

    @classmethod
    def from_cache(
        cls, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], driving: str = "driving", **flags: Any
    ) -> "LatentSample":
        """A sample from a cache index entry (id, source, mode, bucket, text_len) and its tensors ``t`` by name;
        ``driving``: the name of the driving signal used (``driving`` or ``driving_aug``, with its mask);
        ``flags``: the remaining fields (end_to_end, history_allowed, forward, regions, swapped)."""
        return cls(
            id=entry["id"],
            source=entry["source"],
            mode=entry["mode"],
            bucket=Bucket(*entry["bucket"]),
            latents=t["latents"],
            reference=t["reference"],
            reference_mask=t["reference_mask"],
            driving=t[driving],
            driving_mask=t[driving.replace("driving", "driving_mask")],
            text=t["text"],
            text_len=entry["text_len"],
            clip_tokens=t["clip_tokens"],
            **flags,
        )

    def select_driving(self, swap: bool) -> "LatentSample":
        """Keep one driving signal: the augmented one when ``swap`` (and it exists), else the original."""
        use_aug = swap and self.driving_aug is not None
        return replace(
            self,
            driving=self.driving_aug if use_aug else self.driving,
            driving_mask=self.driving_mask_aug if use_aug else self.driving_mask,
            driving_aug=None,
            driving_mask_aug=None,
            swapped=self.swapped or use_aug,
        )


def trim_text(text: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-zero rows of (L, D) umT5 embeddings (the encoder zeroes rows past the caption)."""
    nonzero = (text != 0).any(dim=-1).nonzero()
    length = int(nonzero.max().item()) + 1 if len(nonzero) else 0
    return text[:length]


def pad_text(text: torch.Tensor, length: int) -> torch.Tensor:
    """(L, D) -> (length, D) with zero rows appended."""
    if text.shape[0] > length:
        raise ValueError(f"text has {text.shape[0]} rows, more than the padded length {length}")
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])])


@torch.no_grad()
def encode_pixel_sample(sample: PixelSample, encoders: "Encoders") -> LatentSample:
    """Run the frozen encoders on one `PixelSample`; every output is float32 on the CPU.

    The condition (reference, masks, the main driving signal, caption, extra references) goes through
    `encode_condition`; the augmented driving signal, when the sample has both, through its `encode_driving`.
    """
    target = to_unit(sample.target).permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
    latents = encoders.vae.encode(target)[0].float().cpu()  # (16, T, h, w)
    main = "driving" if "driving" in sample.drivings else "driving_aug"
    video, mask = sample.drivings[main]
    cond = encode_condition(
        encoders,
        reference=sample.reference,
        reference_mask=sample.reference_mask,
        driving=video,
        driving_mask=mask,
        caption=sample.caption,
        mode=sample.mode,
        extra_references=sample.extra_references,
        extra_reference_masks=sample.extra_reference_masks,
    )
    aug = None
    if main == "driving" and "driving_aug" in sample.drivings:
        aug = encode_driving(encoders, *sample.drivings["driving_aug"], sample.mode)  # (1, 16 | 28, T, h/2, w/2)
    regions = {name: region_to_latent(mask) for name, mask in sample.regions.items()}
    extra = cond.extra_references
    return LatentSample(
        id=sample.id,
        source=sample.source,
        mode=sample.mode,
        end_to_end=sample.end_to_end,
        history_allowed=sample.history_allowed,
        forward=sample.forward,
        bucket=sample.bucket,
        latents=latents,
        reference=cond.reference[0],
        reference_mask=cond.reference_mask[0],
        driving=cond.driving[0],
        driving_mask=cond.driving_mask[0],
        text=trim_text(cond.text[0]),
        text_len=cond.text.shape[1],
        clip_tokens=cond.clip_tokens[0],
        regions=regions,
        driving_aug=None if aug is None else aug[0][0],
        driving_mask_aug=None if aug is None else aug[1][0],
        swapped=main != "driving",
        extra_references=None if extra is None else extra[0],
        extra_reference_masks=None if extra is None else cond.extra_reference_masks[0],
    )


def _count_skips(samples: Sequence[LatentSample]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        for source, reason in s.skips:
            out.setdefault(source, {}).setdefault(reason, 0)
            out[source][reason] += 1
    return out


def collate_samples(samples: Sequence[LatentSample]) -> MotionBatch:
    """Stack samples of one bucket into a `MotionBatch`.

    Region masks: a field is None when no sample has it; otherwise samples without it get zeros.
    ``meta`` carries ids, bucket, orientation, swap flags and the skip counts of this batch
    (``meta["skips"] = {source: {reason: count}}``).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    buckets = {s.bucket for s in samples}
    if len(buckets) > 1:
        raise ValueError(f"a batch mixes buckets {sorted(b.name for b in buckets)}; batch samples of one bucket only")
    text_len = max(s.text_len for s in samples)

    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(s, name) for s in samples])

    extra_counts = {0 if s.extra_references is None else s.extra_references.shape[0] for s in samples}
    if len(extra_counts) > 1:
        raise ValueError(
            f"a batch mixes samples with {sorted(extra_counts)} extra references; batch samples with the same number"
        )
    extra = extra_masks = None
    if extra_counts != {0}:
        extra, extra_masks = stack("extra_references"), stack("extra_reference_masks")  # (B, n, 16 | 28, 1, h, w)

    regions: dict[str, torch.Tensor | None] = {}
    grid = samples[0].latents.shape[1:]  # (T, h, w)
    for name in REGION_NAMES:
        if any(name in s.regions for s in samples):
            regions[name] = torch.stack([s.regions.get(name, torch.zeros(1, *grid)) for s in samples])
        else:
            regions[name] = None
    cond = Condition(
        reference=stack("reference"),
        reference_mask=stack("reference_mask"),
        driving=stack("driving"),
        driving_mask=stack("driving_mask"),
        text=torch.stack([pad_text(s.text, text_len) for s in samples]),
        clip_tokens=stack("clip_tokens"),
        modes=[s.mode for s in samples],
        extra_references=extra,
        extra_reference_masks=extra_masks,
    )
    return MotionBatch(
        latents=stack("latents"),
        cond=cond,
        source=[s.source for s in samples],
        history_allowed=torch.tensor([s.history_allowed for s in samples]),
        hand_mask=regions["hands"],
        face_mask=regions["faces"],
        ocr_mask=regions["ocr"],
        end_to_end=torch.tensor([s.end_to_end for s in samples]),
        meta={
            "ids": [s.id for s in samples],
            "bucket": samples[0].bucket,
            "forward": [s.forward for s in samples],
            "swapped": [s.swapped for s in samples],
            "skips": _count_skips(samples),
        },
    )


def merge_skip_counts(into: dict[str, dict[str, int]], counts: Mapping[str, Mapping[str, int]]) -> None:
    """Add ``{source: {reason: n}}`` counts into ``into`` (in place)."""
    for source, reasons in counts.items():
        for reason, n in reasons.items():
            into.setdefault(source, {}).setdefault(reason, 0)
            into[source][reason] += n


def describe_batch(batch: MotionBatch) -> dict[str, Any]:
    """Shapes and per-sample labels of a batch (for logs and the CLI)."""
    return {
        "bucket": batch.meta.get("bucket").name if batch.meta.get("bucket") else None,
        "latents": tuple(batch.latents.shape),
        "driving": tuple(batch.cond.driving.shape),
        "text": tuple(batch.cond.text.shape),
        "source": batch.source,
        "mode": batch.cond.modes,
    }
