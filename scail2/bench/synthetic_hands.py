"""Hands on held-out preference pairs, measured against the synthetic ground truth: does Bias-Aware DPO put
the generated hands where the driving motion has them, better than the base model and an SFT-only run?

The pairs are `data=synthetic_preference`'s held-out set (paper Eq. 4-7 with ground-truth poses as P): the
winner x_w is the reference's character drawn at the source video's exact joints, the loser x_l at joints
re-estimated with estimation errors (P'). The true hand positions of a pair are known exactly: they are the
source video's hand joints, recomputed from the synthetic dataset's seed and the source record's index
(`scail2.data.synth.target_joints`), and checked against the winner's hand boxes (a wrong seed is an error).
The drawn hand radius is read from those boxes.

Each network samples every pair from its cached condition (the condition the DPO run measures its held-out
implicit accuracy on) with the same initial noise per pair, through the inference loop
(`scail2.pipeline.sampling.sample_latents`). Measured per pair, inside discs of ``disc`` hand radii around the
true hands (lower is better):

- **latent hand error** (primary; independent of the decoder): the mean squared difference between the
  sampled latents and the winner's latents, weighted by the discs' coverage of the latent grid
  (`scail2.data.transforms.region_to_latent`).
- **latent error** (a control): the same squared difference over the whole clip. A fall of the hand error
  with no larger fall here is specific to the hands; a fall of both is a general gain (e.g. adapting to the
  preference clips), which the SFT-only baseline on the same winners also gets.
- **pixel hand error** (with a VAE): the mean absolute difference (pixels in [0, 1]) between the decoded sample
  and the winner video inside the discs.

Reference points, scored the same way: the loser (``dispreferred``: how large the estimation bias is inside
the discs) and, in pixels, the VAE's reconstruction of the winner (``vae_reconstruction``: the floor a perfect
latent sample reaches through this decoder).

A network "beats" another when the mean per-pair difference of their errors (other minus it) exceeds twice
the standard error of those differences over the pairs (`paired_difference`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.utils import stats
from scail2.utils.stats import mean_se

HAND_DISC = 1.5  # default disc radius, in drawn hand radii
METRICS = ("latent_hand_error", "latent_error", "hand_error")


@dataclass(frozen=True)
class HandBenchmarkConfig:
    """steps / shift / scheduler / guidance_scale: the sampler (text CFG; 1 runs the conditional pass alone);
    seed: initial noise (pair batch i draws from seed + i, the same for every network); batch_size: pairs per
    sampling batch; disc: the measured disc radius in drawn hand radii."""

    steps: int = 20
    shift: float = 3.0
    scheduler: str = "unipc"
    guidance_scale: float = 1.0
    seed: int = 0
    batch_size: int = 8
    disc: float = HAND_DISC

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps {self.steps} and batch_size {self.batch_size} must be >= 1")
        if not self.disc > 0:
            raise ValueError(f"disc is {self.disc}; need a positive multiple of the hand radius (e.g. {HAND_DISC})")


@dataclass
class HandCase:
    """One held-out preference pair with its ground truth: the winner and loser videos (F, H, W, 3) uint8, the
    true hand joints (K characters, 2 hands, F frames, (x, y) pixels), their drawn radii (K,) and the measured
    discs (F, H, W) bool."""

    id: str
    source_record: str
    preferred: np.ndarray
    dispreferred: np.ndarray
    hands: np.ndarray  # (K, 2, F, 2)
    radii: np.ndarray  # (K,)
    discs: np.ndarray  # (F, H, W) bool

    def latent_discs(self, stride: int = 8) -> torch.Tensor:
        """(1, T, h, w) coverage of the discs on the latent grid."""
        from scail2.data.transforms import region_to_latent

        return region_to_latent(torch.from_numpy(self.discs), stride)


# ------------------------------------------------------------------------------------------------ ground truth


def source_index(record_id: str) -> int:
    """The index of a `scail2-data synth` record (``<source>_<index>``)."""
    try:
        return int(record_id.rsplit("_", 1)[-1])
    except ValueError:
        raise ValueError(f"{record_id!r} is not a `scail2-data synth` record id (<source>_<index>)") from None


def true_hands(synth_seed: int, record_id: str, frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """(K, 2, F, 2) the exact (x, y) pixel positions of the left and right hand of every character of the
    synthetic source video ``record_id`` (dataset seed ``synth_seed``), frame by frame."""
    from scail2.data.synth import target_joints

    cast = target_joints(synth_seed, source_index(record_id), frames, fps, height, width)
    return np.stack([np.stack([j["hand_l"], j["hand_r"]]) for _, j in cast]).astype(np.float64)


def hand_radii(
    hands: np.ndarray, boxes: Sequence[Sequence[Sequence[float]]], height: int, width: int, what: str = "pair"
) -> np.ndarray:
    """(K,) the drawn hand radius of each character, read from the winner's per-frame hand boxes, which are
    drawn about the true joints (`scail2.data.synth.joint_box`: a box of the radius, clipped to the frame, so a
    joint just outside the frame can have one).

    Each box is matched to the true joint it was drawn about: the joint for which some radius r reproduces the
    box exactly (r is the box's largest extent from the joint: one side of each axis is unclipped). A box that
    no true joint reproduces, or a character without any box, means the joints are not those the winner was
    drawn from (a wrong dataset seed): an error."""
    from scail2.data.synth import joint_box

    k, _, f, _ = hands.shape
    radii = np.zeros(k)
    for i, frame in enumerate(boxes[:f]):
        for box in frame:
            x0, y0, x1, y1 = box
            match = None
            for ck in range(k):
                for side in range(2):
                    x, y = hands[ck, side, i]
                    if not (np.isfinite(x) and np.isfinite(y)):
                        continue
                    r = max(x1 - x, x - x0, y1 - y, y - y0)
                    again = joint_box(np.array([x, y]), r, height, width)
                    if r > 0 and again is not None and np.allclose(again, box, atol=0.015):
                        match = (ck, r)
                        break
                if match is not None:
                    break
            if match is None:
                raise ValueError(
                    f"{what}: the winner's hand box {tuple(box)} in frame {i} was drawn about no true hand joint; the "
                    "source video's joints do not match it (give the seed the synthetic dataset was generated with)"
                )
            radii[match[0]] = max(radii[match[0]], match[1])
    if (radii <= 0).any():
        raise ValueError(f"{what}: the winner has no hand box for character(s) {np.flatnonzero(radii <= 0).tolist()}")
    return radii


def hand_discs(hands: np.ndarray, radii: np.ndarray, height: int, width: int, disc: float = HAND_DISC) -> np.ndarray:
    """(F, H, W) bool: pixels whose centre lies within ``disc`` x the character's radius of a true hand joint."""
    yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    k, _, f, _ = hands.shape
    out = np.zeros((f, height, width), dtype=bool)
    for c in range(k):
        r2 = (disc * radii[c]) ** 2
        for side in range(2):
            p = hands[c, side]  # (F, 2)
            out |= (xx[None] - p[:, 0, None, None]) ** 2 + (yy[None] - p[:, 1, None, None]) ** 2 <= r2
    return out


def load_hand_cases(manifest: str | Path, synth_seed: int, disc: float = HAND_DISC, ids: Sequence[str] | None = None) -> list[HandCase]:
    """The pairs of a preference manifest built from a synthetic dataset of seed ``synth_seed`` (e.g.
    ``<data.root>/heldout/pairs/manifest.jsonl`` of ``data=synthetic_preference``, whose seed is ``data_seed``)
    with their true hands; only ``ids`` (in that order) when given."""
    from scail2.data.video import read_video
    from scail2.preference.records import load_preference_manifest

    records = {r.id: r for r in load_preference_manifest(manifest)}
    wanted = list(records) if ids is None else list(ids)
    missing = [i for i in wanted if i not in records]
    if missing:
        raise ValueError(f"{manifest} has no pair {missing[0]!r} ({len(missing)} missing); give the manifest the pairs came from")
    cases = []
    for pid in wanted:
        r = records[pid]
        if r.provenance is None or not r.provenance.source_record:
            raise ValueError(f"pair {pid} of {manifest} does not name its source video (provenance.source_record)")
        preferred, dispreferred = read_video(r.preferred), read_video(r.dispreferred)
        f, h, w = preferred.shape[:3]
        hands = true_hands(synth_seed, r.provenance.source_record, f, r.fps, h, w)
        radii = hand_radii(hands, r.preferred_hands, h, w, f"pair {pid}")
        cases.append(HandCase(pid, r.provenance.source_record, preferred, dispreferred, hands, radii,
                              hand_discs(hands, radii, h, w, disc)))  # fmt: skip
    if not cases:
        raise ValueError(f"{manifest} has no preference pairs")
    return cases


# ------------------------------------------------------------------------------------------------ errors


def latent_hand_error(latents: torch.Tensor, truth: torch.Tensor, coverage: torch.Tensor) -> float:
    """Coverage-weighted mean squared error of (C, T, h, w) latents against the truth's, over the disc
    coverage (1, T, h, w): sum(cov * (z - z*)^2) / (C * sum(cov)); NaN without hands."""
    cov = coverage.double()
    total = float(cov.sum())
    if total == 0:
        return math.nan
    d = (latents.double() - truth.double()).pow(2)
    return float((cov * d).sum() / (d.shape[0] * total))


def pixel_hand_error(video: np.ndarray, case: HandCase) -> float:
    """Mean absolute error (pixels in [0, 1]) of a video (F, H, W, 3) float in [0, 1] against the winner inside
    the discs; NaN without hands."""
    if not case.discs.any():
        return math.nan
    truth = case.preferred.astype(np.float64) / 255.0
    return float(np.abs(video.astype(np.float64) - truth)[case.discs].mean())


# ------------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def sample_pairs(net: torch.nn.Module, batches: Sequence[Any], config: HandBenchmarkConfig = HandBenchmarkConfig()) -> dict[str, torch.Tensor]:
    """id -> (16, T, h, w) latents that ``net`` samples for every pair of the `PreferenceBatch` batches (from
    their shared condition); batch i starts from the noise of ``config.seed + i``, so every network sampled
    with the same batches and config starts from the same noise."""
    from scail2.pipeline.sampling import sample_latents
    from scail2.pipeline.schedulers import make_scheduler

    out: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        w = batch.winner
        z = sample_latents(
            net, w.cond, make_scheduler(config.scheduler, config.shift), negative_text=w.null_text,
            num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
            generator=torch.Generator().manual_seed(config.seed + i),
        )  # fmt: skip
        for pid, zi in zip(w.meta["ids"], z.float().cpu()):
            out[pid] = zi
    return out


@torch.no_grad()
def implicit_accuracies(
    net: torch.nn.Module, reference: torch.nn.Module, batches: Sequence[Any], draws: int = 4, seed: int = 4321
) -> dict[str, float]:
    """id -> the pair's implicit accuracy of ``net`` against ``reference`` (the pre-DPO network), averaged over
    ``draws`` noise / timestep draws: batch i, draw d uses seed + 100_003 * d + i, as
    `scail2.lit.heldout.HeldOutPreferences` (the same pairs in the same batches give its figures). The accuracy
    does not depend on beta (only the sign of the preference logits counts)."""
    from scail2.objectives.dpo import DPOConfig, dpo_loss, model_velocity

    if draws < 1:
        raise ValueError(f"draws is {draws}; need at least 1")
    out: dict[str, float] = {}
    ref = model_velocity(reference)
    for i, batch in enumerate(batches):
        acc = torch.zeros(batch.batch_size, dtype=torch.float64)
        for d in range(draws):
            res = dpo_loss(net, batch, torch.Generator().manual_seed(seed + 100_003 * d + i), DPOConfig(), reference=ref)
            acc += res.pair_accuracy.double().cpu()
        for pid, a in zip(batch.winner.meta["ids"], (acc / draws).tolist()):
            out[pid] = a
    return out


def heldout_batches(cache_dir: str | Path, num_pairs: int | None, batch_size: int, seed: int) -> list[Any]:
    """The held-out pairs of a preference cache as fixed `PreferenceBatch` batches (``num_pairs`` chosen by
    ``seed``; None: all), as `scail2.lit.heldout.HeldOutPreferences` reads them."""
    from scail2.preference.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(cache_dir=cache_dir, num_workers=0, seed=seed)
    return dm.fixed_batches(num_pairs, batch_size, seed, "held-out", setting="pairs")


def _to_unit(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) float in [0, 1]."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def score_hands(
    samples: Mapping[str, Mapping[str, torch.Tensor]],
    batches: Sequence[Any],
    cases: Sequence[HandCase],
    vae: Any = None,
    compare: Sequence[tuple[str, str]] = (),
    config: HandBenchmarkConfig = HandBenchmarkConfig(),
) -> dict[str, Any]:
    """Per-pair hand errors of every network's samples (``samples``: name -> id -> latents, `sample_pairs`),
    of the losers and (with ``vae``, a `scail2.encoders.vae.WanVAE`) of the VAE's reconstruction of the winners,
    their means and standard errors, and the paired differences of ``compare``: (better, worse) names, reported
    as ``"<worse> - <better>"`` with ``beaten`` when the mean exceeds 2 standard errors."""
    by_id = {c.id: c for c in cases}
    truth: dict[str, torch.Tensor] = {}
    losers: dict[str, torch.Tensor] = {}
    for batch in batches:
        for pid, zw, zl in zip(batch.winner.meta["ids"], batch.winner.latents, batch.loser_latents):
            truth[pid], losers[pid] = zw.float().cpu(), zl.float().cpu()
    ids = [pid for pid in truth if pid in by_id]
    if len(ids) != len(truth):
        raise ValueError(f"{len(truth) - len(ids)} held-out pair(s) have no ground-truth case; load the cases of the same manifest")
    for name, got in samples.items():
        if set(got) != set(ids):
            raise ValueError(f"the samples of {name!r} cover {len(got)} pairs, not the {len(ids)} held-out pairs")

    def decode(z: torch.Tensor) -> np.ndarray:
        return _to_unit(vae.decode(z[None].to(vae.device))[0])

    cover = {pid: by_id[pid].latent_discs() for pid in ids}
    for pid in ids:
        if tuple(cover[pid].shape[1:]) != tuple(truth[pid].shape[1:]):
            raise ValueError(
                f"pair {pid}: its video gives a {tuple(cover[pid].shape[1:])} latent grid but its cached latents are "
                f"{tuple(truth[pid].shape[1:])}; the benchmark needs caches of whole videos (synthetic pairs are)"
            )
    per: dict[str, list[dict[str, float]]] = {}
    for name, got in {**samples, "dispreferred": losers}.items():
        rows = []
        for pid in ids:
            row = {
                "latent_hand_error": latent_hand_error(got[pid], truth[pid], cover[pid]),
                "latent_error": float((got[pid].double() - truth[pid].double()).pow(2).mean()),
            }
            if vae is not None:
                video = by_id[pid].dispreferred.astype(np.float64) / 255.0 if name == "dispreferred" else decode(got[pid])
                row["hand_error"] = pixel_hand_error(video, by_id[pid])
            rows.append(row)
        per[name] = rows
    if vae is not None:
        per["vae_reconstruction"] = [{"hand_error": pixel_hand_error(decode(truth[pid]), by_id[pid])} for pid in ids]
    results: dict[str, Any] = {"pairs": len(ids), "ids": ids, "config": asdict(config), "per_pair": per, "metrics": {}}
    for metric in METRICS:
        table = {name: mean_se([r[metric] for r in rows]) for name, rows in per.items() if rows and metric in rows[0]}
        if table:
            results["metrics"][metric] = table
    results["comparisons"] = {
        metric: {f"{worse} - {better}": paired_difference(per, metric, better, worse) for better, worse in compare}
        for metric in results["metrics"]
    }
    return results


# ------------------------------------------------------------------------------------------------ statistics


def paired_difference(per: Mapping[str, Sequence[Mapping[str, float]]], metric: str, better: str, worse: str) -> dict[str, Any]:
    """Per pair ``worse - better`` of ``metric`` (pairs where either is missing or NaN left out): mean, SE, n, and
    ``beaten``: the mean exceeds twice the SE (``better`` has the lower error beyond noise)."""
    for name in (better, worse):
        if name not in per:
            raise ValueError(f"no per-pair results for {name!r}; have {sorted(per)}")
    out = stats.paired_difference([b.get(metric, math.nan) for b in per[better]], [w.get(metric, math.nan) for w in per[worse]])
    out["beaten"] = out.pop("beats")
    return out


_NAMES = {"latent_hand_error": "latent hand error", "latent_error": "latent error (clip)", "hand_error": "pixel hand error"}


def format_hand_report(results: Mapping[str, Any], title: str = "Held-out preference pairs: hands") -> list[str]:
    """Readable lines: per metric each network's mean +- SE, then the comparisons."""
    lines = [f"{title} ({results['pairs']} pairs; error inside discs around the true hands, mean +- SE, lower is better):"]
    for metric, table in results["metrics"].items():
        cells = [f"{name} {e['mean']:.4f}+-{e['se']:.4f}" for name, e in table.items() if e["n"]]
        lines.append(f"  {_NAMES.get(metric, metric):<18} " + " | ".join(cells))
    for metric, table in results.get("comparisons", {}).items():
        for name, d in table.items():
            verdict = "beaten by > 2 SE" if d["beaten"] else "NOT beaten by > 2 SE"
            lines.append(f"  {_NAMES.get(metric, metric)}, {name}: {d['mean']:+.4f} +- {d['se']:.4f}  ({verdict})")
    return lines
