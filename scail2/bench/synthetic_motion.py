"""Motion transfer measured with the exact synthetic ground truth: does a model move the reference character
like the driving video, on pairs it never trained on?

Held-out pairs are `scail2.data.synth` folders (``SyntheticDataModule(heldout_pairs=N)`` writes one under
``<root>/heldout``); their ground truth is drawn again from the folder's ``synth.json`` (`pair_truth`: the
target's character silhouettes, the backgrounds of the target, the driving video and the reference, nothing read
from extra files). A network samples every pair from the same fixed noise through the inference path
(`scail2.pipeline.prepare_inputs` -> `SCAIL2Pipeline.encode_condition` -> `scail2.pipeline.sampling.sample_latents`)
and the samples are scored:

- ``latent_motion_error`` (lower is better; needs no decoder): mean squared error between the sampled latents
  and the VAE latents of the target, over the latent cells that the target's or the reference's silhouettes touch
  (`latent_region`), so background the network copies does not dilute it.
- ``motion_error`` (pixels, needs a VAE that reconstructs, ``data.vae=trained``): per frame, the soft Jaccard
  distance ``1 - sum(min(a, b)) / sum(max(a, b))`` between the sample's foreground ``a`` (where it departs from the
  target's known background as the same VAE renders it, `foreground`) and the target's silhouettes ``b``, averaged
  over frames.
- ``identity_error``: distance (RGB in [0, 1]) between the sample's mean colour inside the target's silhouettes
  and the reference character's mean colour in the reference image.
- ``environment_error`` / ``environment_other`` / ``environment_switch``: mean absolute error of the sample's
  background (outside the target's silhouettes grown by 2 px) against the background the mode keeps (animation:
  the reference's; replacement: the driving video's) and against the other one; the switch is right (1) when
  the first is smaller. Only pairs whose two backgrounds differ count.

Methods, scored the same way on the same pairs: ``trained``; the baselines (a) ``reference_still``: the
reference image repeated for every frame, through the same VAE; (b) ``shuffled_driving``: the trained network
given the driving video and mask of another held-out pair of the same mode and driving kind (a cyclic shift, so
no pair keeps its own); (c) ``untrained``: the network the run started from (the same factory and seed); and as
ceilings ``vae_reconstruction`` (the target through the VAE) and ``target``. For every metric, `summarize` gives
the mean and standard error over pairs and the per-pair differences of each baseline against ``trained``; the
trained network *beats* a baseline when that mean difference exceeds twice its standard error (`paired_difference`).
`scail2.utils.stats` holds the mean / standard-error helpers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.utils.stats import json_safe, mean_se, paired_difference

# Foreground ramp of `foreground` (largest channel distance to the known background, pixels in [0, 1]). The
# synthetic backgrounds carry N(0, 6/255) pixel noise, so distances below FG_LOW are background; body colours
# differ from the background by far more than FG_HIGH almost everywhere.
FG_LOW = 0.08
FG_HIGH = 0.2
# Backgrounds whose mean absolute difference (0-255) is below this count as the same (no switch to measure).
SAME_BACKGROUND = 8.0
BACKGROUND_MARGIN = 2  # px the silhouettes are grown by before the background is measured

BASELINES: tuple[str, ...] = ("reference_still", "shuffled_driving", "untrained")
CEILINGS: tuple[str, ...] = ("vae_reconstruction", "target")
# Metric -> True when higher is better.
METRICS: dict[str, bool] = {
    "latent_motion_error": False,
    "motion_error": False,
    "identity_error": False,
    "environment_error": False,
    "environment_other": True,
    "environment_switch": True,
}
MOTION_METRICS: tuple[str, ...] = ("latent_motion_error", "motion_error")


@dataclass
class MotionCase:
    """One held-out pair and its ground truth; frames uint8 (F, H, W, 3), colour masks uint8."""

    id: str
    mode: str
    end_to_end: bool
    caption: str
    reference: np.ndarray  # (H, W, 3)
    reference_mask: np.ndarray  # (H, W, 3)
    driving: np.ndarray  # (F, H, W, 3)
    driving_mask: np.ndarray  # (F, H, W, 3)
    target: np.ndarray  # (F, H, W, 3)
    truth: Any  # scail2.data.synth.PairTruth

    @property
    def group(self) -> tuple[str, bool]:
        """Pairs whose driving videos can stand in for each other: same mode and driving kind."""
        return self.mode, self.end_to_end


def load_cases(folder: str | Path, max_cases: int | None = None) -> list[MotionCase]:
    """The pairs of a synthetic folder (``manifest.jsonl`` + ``synth.json``), in manifest order, with their ground
    truth drawn again from the folder's settings."""
    from scail2.data.manifest import load_manifest
    from scail2.data.synth import SYNTH_SOURCES, SYNTH_STAMP, SYNTH_VERSION, pair_index, pair_truth
    from scail2.data.video import read_image, read_video

    folder = Path(folder)
    stamp_path = folder / SYNTH_STAMP
    if not stamp_path.exists():
        raise ValueError(f"{folder} has no {SYNTH_STAMP}: the ground truth of its pairs is unknown; point to a folder written by scail2.data.synth")
    stamp = json.loads(stamp_path.read_text())
    if stamp.get("version") != SYNTH_VERSION:
        raise ValueError(
            f"{folder} was drawn by synthetic data version {stamp.get('version')}, this is version {SYNTH_VERSION}: "
            "its ground truth cannot be drawn again; delete the folder (it is regenerated) or use another"
        )
    cases = []
    for record in load_manifest(folder / "manifest.jsonl"):
        if max_cases is not None and len(cases) >= max_cases:
            break
        target = read_video(record.target)
        f, h, w = target.shape[:3]
        truth = pair_truth(
            stamp["seed"], pair_index(record.id), f, stamp["fps"], h, w, stamp.get("scene_references", False),
            stamp.get("travel", 0.0), stamp.get("clips_per_cast", 1), tuple(stamp.get("sources", SYNTH_SOURCES)),
        )  # fmt: skip
        reference = target[record.reference] if isinstance(record.reference, int) else read_image(record.reference)
        cases.append(
            MotionCase(
                id=record.id, mode=record.mode, end_to_end=record.end_to_end, caption=record.caption,
                reference=reference, reference_mask=read_image(record.reference_mask), driving=read_video(record.driving),
                driving_mask=read_video(record.driving_mask), target=target, truth=truth,
            )
        )  # fmt: skip
    if not cases:
        raise ValueError(f"{folder / 'manifest.jsonl'} has no pairs")
    return cases


def check_heldout(folder: str | Path, max_cases: int | None = None) -> None:
    """Raise unless ``folder`` is a synthetic folder whose first ``max_cases`` pairs give every baseline its
    pairs (two or more per `MotionCase.group`), reading only the manifest."""
    from scail2.data.manifest import load_manifest

    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.exists():
        raise ValueError(f"{manifest} does not exist: no held-out synthetic pairs to benchmark (set data.heldout_pairs)")
    records = load_manifest(manifest)[:max_cases]
    shuffled_donors([MotionCase(r.id, r.mode, r.end_to_end, "", *([None] * 6)) for r in records])


# ------------------------------------------------------------------------------------------------ statistics


# ------------------------------------------------------------------------------------------------ metrics


def foreground(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Soft foreground (F, H, W) in [0, 1] of frames (F, H, W, 3) in [0, 1] against a background (H, W, 3) or
    (F, H, W, 3) in [0, 1]: a ramp from FG_LOW to FG_HIGH of the largest channel distance."""
    d = np.abs(frames - background).max(axis=-1)
    return np.clip((d - FG_LOW) / (FG_HIGH - FG_LOW), 0.0, 1.0)


def soft_jaccard_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per frame ``1 - sum(min(a, b)) / sum(max(a, b))`` of (F, H, W) maps in [0, 1] (0 where both are empty)."""
    inter = np.minimum(a, b).sum(axis=(1, 2))
    union = np.maximum(a, b).sum(axis=(1, 2))
    return np.where(union > 0, 1.0 - inter / np.maximum(union, 1e-12), 0.0)


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation of (..., H, W) masks by a (2p+1)^2 square (nothing wraps around the borders)."""
    if pixels <= 0:
        return mask.copy()
    h, w = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(pixels, pixels), (pixels, pixels)])
    out = np.zeros_like(mask)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out |= padded[..., dy : dy + h, dx : dx + w]
    return out


def latent_region(masks: np.ndarray, grow_cells: int = 1, stride: int = 8, temporal: int = 4) -> np.ndarray:
    """(T, h, w) bool: the latent cells (``stride`` x ``stride`` pixels; latent frame 0 is frame 0, latent frame
    t >= 1 frames ``temporal*(t-1)+1 .. temporal*t``, as Wan's causal VAE groups them) that any of the (F, H, W)
    masks touches, grown by ``grow_cells``."""
    f, h, w = masks.shape
    if (f - 1) % temporal or h % stride or w % stride:
        raise ValueError(f"masks of {f} frames at {h}x{w}; need {temporal}k+1 frames and sizes divisible by {stride}")
    groups = [masks[:1]] + [masks[temporal * (t - 1) + 1 : temporal * t + 1] for t in range(1, (f - 1) // temporal + 1)]
    cells = np.stack([g.any(axis=0).reshape(h // stride, stride, w // stride, stride).any(axis=(1, 3)) for g in groups])
    return grow(cells, grow_cells)


def latent_motion_error(latents: torch.Tensor, target: torch.Tensor, region: np.ndarray) -> float:
    """Mean squared error of (1, C, T, h, w) latents against the target's inside ``region`` (T, h, w)."""
    sq = (latents.float().cpu() - target.float().cpu()).pow(2).mean(dim=1)[0].numpy()
    return float(sq[region].mean()) if region.any() else math.nan


def _mean_colour(frames: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    pixels = frames[mask]
    return pixels.mean(axis=0) if len(pixels) else None


def pixel_metrics(video: np.ndarray, case: MotionCase, seen_background: np.ndarray | None = None) -> dict[str, float]:
    """Pixel scores of one video (F, H, W, 3) in [0, 1] against its pair's ground truth (module docstring).
    ``seen_background``: the target's background as the video's decoder renders it ((H, W, 3) or (F, H, W, 3)
    in [0, 1]; default the exact one), against which the foreground is found. NaN where a score does not apply."""
    truth = case.truth
    silhouette = truth.masks.any(axis=0)  # (F, H, W)
    seen = truth.target_background / 255.0 if seen_background is None else seen_background
    out = {"motion_error": float(soft_jaccard_distance(foreground(video, seen), silhouette.astype(np.float64)).mean())}
    ref_colour = _mean_colour(case.reference.astype(np.float64) / 255.0, truth.reference_masks.any(axis=0))
    gen_colour = _mean_colour(video, silhouette)
    ok = ref_colour is not None and gen_colour is not None
    out["identity_error"] = float(np.linalg.norm(gen_colour - ref_colour)) if ok else math.nan
    kept, other = truth.kept_background, truth.other_background
    background = ~grow(silhouette, BACKGROUND_MARGIN)
    if np.abs(kept - other).mean() > SAME_BACKGROUND and background.any():
        pixels = video[background]
        right = float(np.abs(pixels - np.broadcast_to(kept / 255.0, video.shape)[background]).mean())
        wrong = float(np.abs(pixels - np.broadcast_to(other / 255.0, video.shape)[background]).mean())
        out.update(environment_error=right, environment_other=wrong, environment_switch=float(right < wrong))
    else:
        out.update(environment_error=math.nan, environment_other=math.nan, environment_switch=math.nan)
    return out


# ------------------------------------------------------------------------------------------------ sampling


def encode_cases(pipe: Any, cases: Sequence[MotionCase]) -> Any:
    """The batched `scail2.conditioning.Condition` of ``cases`` (one size and length), through the inference input
    path (`prepare_inputs` -> `SCAIL2Pipeline.encode_condition`)."""
    from scail2.pipeline.inputs import prepare_inputs

    conds = []
    for case in cases:
        f, h, w = case.target.shape[:3]
        prepared = prepare_inputs(
            case.reference, case.driving, mode=case.mode, reference_mask=case.reference_mask,
            driving_mask=case.driving_mask, height=h, width=w,
        )  # fmt: skip
        if len(prepared.plan.segments) != 1:
            raise ValueError(f"{case.id}: {f} frames need {len(prepared.plan.segments)} segments; the benchmark samples one")
        conds.append(pipe.encode_condition(prepared, prompt=case.caption))
    return concat_conditions(conds)


def concat_conditions(conds: Sequence[Any]) -> Any:
    """One `Condition` of the batches ``conds`` (same shapes)."""
    first = conds[0]
    fields = {k: torch.cat([getattr(c, k) for c in conds]) for k, v in vars(first).items() if isinstance(v, torch.Tensor)}
    modes = [m for c in conds for m in c.modes]
    return replace(first, **fields, modes=modes)


def shuffled_donors(cases: Sequence[MotionCase]) -> list[int]:
    """For every pair, the pair whose driving video it gets in the shuffled-driving baseline: the next pair of
    its group (`MotionCase.group`), cyclically, so no pair keeps its own."""
    donors = list(range(len(cases)))
    for group in sorted({c.group for c in cases}):
        members = [i for i, c in enumerate(cases) if c.group == group]
        if len(members) < 2:
            mode, e2e = group
            raise ValueError(
                f"the shuffled-driving baseline needs at least 2 held-out {mode} pairs with "
                f"{'end-to-end' if e2e else 'pose'} driving; got {len(members)} (raise data.heldout_pairs: pairs "
                "cycle through the 5 synthetic sources, so 8 or more give every group two)"
            )
        for k, i in enumerate(members):
            donors[i] = members[(k + 1) % len(members)]
    return donors


def with_driving_of(cond: Any, donors: Sequence[int]) -> Any:
    """``cond`` with every pair's driving latents and mask taken from pair ``donors[i]``."""
    index = torch.tensor(list(donors))
    return replace(cond, driving=cond.driving[index], driving_mask=cond.driving_mask[index])


@torch.no_grad()
def sample(net: torch.nn.Module, cond: Any, *, steps: int, shift: float, scheduler: str, seed: int, batch: int) -> torch.Tensor:
    """(N, 16, T, h, w) latents of every pair, sampled from noise seeded by ``seed`` (the same for every network:
    drawn once for the whole set), guidance 1."""
    from scail2.pipeline.sampling import initial_noise, sample_latents
    from scail2.pipeline.schedulers import make_scheduler

    noise = initial_noise(cond.latent_shape, torch.Generator().manual_seed(seed), "cpu")
    was_training = net.training
    net.eval()
    out = []
    try:
        n = noise.shape[0]
        for start in range(0, n, batch):
            part = slice(start, min(n, start + batch))
            sub = replace(cond, **{k: v[part] for k, v in vars(cond).items() if isinstance(v, torch.Tensor)}, modes=cond.modes[part])
            z = sample_latents(net, sub, make_scheduler(scheduler, shift), num_inference_steps=steps, guidance_scale=1.0, latents=noise[part].clone())
            out.append(z.float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(out)


def _unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> (1, 3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]


@torch.no_grad()
def encode_frames(vae: Any, frames: np.ndarray) -> torch.Tensor:
    """Normalised VAE latents (1, 16, T, h, w) of uint8 frames (F, H, W, 3)."""
    return vae.encode(_unit(frames)).float().cpu()


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """(N, 16, T, h, w) -> (N, F, H, W, 3) float in [0, 1], one video at a time."""
    from scail2.lit.validation import decode_videos

    return decode_videos(vae, latents).permute(0, 1, 3, 4, 2).numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class MotionBenchmarkConfig:
    """steps / shift / scheduler: the sampler (guidance 1); seed: the initial noise (the same for every network);
    batch: pairs sampled at once; pixels: also decode and score pixels (needs a VAE that reconstructs:
    ``data.vae=trained``; without it only the latent measure means anything); grid_cases / grid_frames: what
    the sample grid shows."""

    steps: int = 20
    shift: float = 3.0
    scheduler: str = "unipc"
    seed: int = 0
    batch: int = 8
    pixels: bool = True
    grid_cases: int = 6
    grid_frames: int = 3


def run_motion_benchmark(
    pipe: Any,
    cases: Sequence[MotionCase],
    trained: torch.nn.Module,
    untrained: torch.nn.Module | None,
    config: MotionBenchmarkConfig = MotionBenchmarkConfig(),
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``trained``, the baselines and the ceilings on ``cases`` (module docstring); ``pipe`` supplies the
    encoders (its transformer is not used). Writes ``results.json`` and ``grid.png`` (reference | driving |
    target | sample, labelled) to ``out_dir`` when given. Returns the `summarize` dict."""
    vae = pipe.vae
    cond = encode_cases(pipe, cases)
    donors = shuffled_donors(cases)
    kwargs = dict(steps=config.steps, shift=config.shift, scheduler=config.scheduler, seed=config.seed, batch=config.batch)
    targets = [encode_frames(vae, c.target) for c in cases]
    regions = [latent_region(c.truth.masks.any(axis=0) | c.truth.reference_masks.any(axis=0)[None]) for c in cases]
    latents = {"trained": sample(trained, cond, **kwargs), "shuffled_driving": sample(trained, with_driving_of(cond, donors), **kwargs)}
    if untrained is not None:
        latents["untrained"] = sample(untrained, cond, **kwargs)
    latents["reference_still"] = torch.cat([encode_frames(vae, np.broadcast_to(c.reference, c.target.shape)) for c in cases])
    latents["vae_reconstruction"] = torch.cat(targets)
    per: dict[str, list[dict[str, float]]] = {
        name: [{"latent_motion_error": latent_motion_error(z[i : i + 1], targets[i], regions[i])} for i in range(len(cases))]
        for name, z in latents.items()
    }
    videos = None
    if config.pixels:
        # The foreground is found against the target's background as this VAE renders it, so its own error on
        # the background does not count as motion.
        seen = [decode(vae, encode_frames(vae, np.broadcast_to(c.truth.target_background.round().clip(0, 255).astype(np.uint8), c.target.shape)))[0] for c in cases]
        for name, z in latents.items():
            decoded = decode(vae, z)
            if name == "trained":
                videos = decoded
            for row, v, c, s in zip(per[name], decoded, cases, seen):
                row.update(pixel_metrics(v, c, s))
        per["target"] = [pixel_metrics(c.target.astype(np.float64) / 255.0, c) for c in cases]
    results = summarize(per, [c.id for c in cases], [c.mode for c in cases])
    results["shuffled_donors"] = [cases[d].id for d in donors]
    results["config"] = {k: getattr(config, k) for k in config.__dataclass_fields__}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if videos is None:
            videos = decode(vae, latents["trained"])
        grid = write_grid(out / "grid.png", cases[: config.grid_cases], videos[: config.grid_cases], config.grid_frames)
        results["files"] = {"results": str(out / "results.json"), "grid": str(grid)}
        (out / "results.json").write_text(json.dumps(json_safe(results), indent=1) + "\n")
    return results


def summarize(per: dict[str, list[dict[str, float]]], ids: Sequence[str], modes: Sequence[str]) -> dict[str, Any]:
    """Per metric and method: mean +- SE over pairs (also per mode); per metric and baseline: the paired
    improvement of ``trained`` over it (`paired_difference`); ``follows_driving``: the trained network beats every
    baseline present on the first motion metric that has them all (pixels when scored, else latents)."""
    out: dict[str, Any] = {"pairs": len(ids), "ids": list(ids), "modes": list(modes), "metrics": {}, "vs_baselines": {}, "per_pair": per}
    for metric, higher in METRICS.items():
        table = {}
        for method, rows in per.items():
            values = [r.get(metric, math.nan) for r in rows]
            if not any(math.isfinite(v) for v in values):
                continue
            entry: dict[str, Any] = mean_se(values)
            entry["by_mode"] = {m: mean_se([v for v, mm in zip(values, modes) if mm == m]) for m in sorted(set(modes))}
            table[method] = entry
        if not table:
            continue
        out["metrics"][metric] = table
        if "trained" in table:
            ours = [r.get(metric, math.nan) for r in per["trained"]]
            out["vs_baselines"][metric] = {
                b: paired_difference(ours, [r.get(metric, math.nan) for r in per[b]], higher) for b in BASELINES if b in table
            }
    decided = [m for m in ("motion_error", "latent_motion_error") if len(out["vs_baselines"].get(m, {})) == len([b for b in BASELINES if b in per])]
    out["deciding_metric"] = decided[0] if decided else None
    out["follows_driving"] = bool(decided) and all(v["beats"] for v in out["vs_baselines"][decided[0]].values())
    return out


_NAMES = {
    "latent_motion_error": "latent motion error",
    "motion_error": "motion error (pixels)",
    "identity_error": "identity error",
    "environment_error": "environment error (kept bg)",
    "environment_other": "  vs the other bg (higher)",
    "environment_switch": "environment switch right (higher)",
}


def format_report(results: dict[str, Any], title: str = "Held-out synthetic pairs: motion transfer") -> list[str]:
    """Readable lines: per metric ``before -> after`` (the untrained network -> the trained one) and every other
    method's mean +- SE, then the trained network's paired improvement over each baseline."""
    lines = [f"{title} ({results['pairs']} pairs, mean +- standard error; lower is better unless noted):"]
    for metric, table in results["metrics"].items():
        cells = []
        if "untrained" in table and "trained" in table:
            b, a = table["untrained"], table["trained"]
            cells.append(f"before {b['mean']:.4f} -> after {a['mean']:.4f}+-{a['se']:.4f}")
        cells += [f"{m} {e['mean']:.4f}+-{e['se']:.4f}" for m, e in table.items() if e["n"] and m not in ("trained", "untrained")]
        lines.append(f"  {_NAMES.get(metric, metric):<34} " + " | ".join(cells))
    for metric in (*MOTION_METRICS, "identity_error", "environment_switch"):
        for baseline, s in results["vs_baselines"].get(metric, {}).items():
            verdict = "beats" if s["beats"] else "does NOT beat"
            lines.append(f"  {_NAMES[metric].strip()}: trained {verdict} {baseline} (improvement {s['mean']:+.4f} +- {s['se']:.4f}, n={s['n']})")
    lines.append(f"  follows the driving video (beats every baseline by > 2 SE on {results.get('deciding_metric')}): {'yes' if results.get('follows_driving') else 'no'}")
    return lines


# ------------------------------------------------------------------------------------------------ the grid


def write_grid(path: Path, cases: Sequence[MotionCase], videos: np.ndarray, frames: int = 3) -> Path:
    """A labelled PNG: per pair a row of reference | driving | target | sample, ``frames`` frames each (videos
    (N, F, H, W, 3) in [0, 1])."""
    from PIL import Image, ImageDraw

    f, h, w = videos.shape[1:4]
    picks = sorted({round(k * (f - 1) / max(1, frames - 1)) for k in range(frames)})
    gap, label_h, side = 4, 14, 210
    columns = ["reference"] + [f"{name} {j}" for name in ("driving", "target", "sample") for j in picks]
    canvas = Image.new("RGB", (side + len(columns) * (w + gap), label_h + len(cases) * (max(h, 28) + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((side + c * (w + gap) + 1, 1), name, fill=(0, 0, 0))
    for r, (case, video) in enumerate(zip(cases, videos)):
        y = label_h + r * (max(h, 28) + gap)
        draw.text((2, y + 2), case.id, fill=(0, 0, 0))
        draw.text((2, y + 14), case.mode, fill=(90, 90, 90))
        tiles = [case.reference] + [case.driving[j] for j in picks] + [case.target[j] for j in picks]
        tiles += [(video[j] * 255).round().clip(0, 255).astype(np.uint8) for j in picks]
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (side + c * (w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def untrained_like(factory: Any, seed: int) -> torch.nn.Module:
    """The network a run with this factory and ``module.seed`` starts from (`SCAIL2Module.configure_model` builds
    it under ``torch.manual_seed(seed)``); the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()
