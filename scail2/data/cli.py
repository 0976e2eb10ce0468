"""``scail2-data``: validate a manifest, write a synthetic dataset, build the latent cache and DPO preference pairs.

    scail2-data validate MANIFEST [--full] [--buckets 81x512x896 ...] [--workers N]
    scail2-data synth OUT_DIR [--pairs 20] [--frames 17] [--size 64x64 ...] [--fps 16] [--seed 0] [--first-index 0]
        [--scene-references] [--travel 0] [--clips-per-cast 1] [--source NAME ...]
    scail2-data cache MANIFEST OUT_DIR --encoders DIR [--buckets ...] [--dtype bfloat16] [--workers N]
    scail2-data preference SOURCE_MANIFEST OUT_DIR [--components synthetic|FILE] [--pairs N] [--seed S]
    scail2-data preference-cache PREFERENCE_MANIFEST OUT_DIR --encoders DIR [--buckets ...] [--dtype bfloat16]
    scail2-data prepare VIDEOS_DIR OUT_DIR [--components synthetic|FILE] [--frames 81] [--size HxW] [--workers N] ...
    scail2-data motionpair PREPARED_DIR OUT_DIR --components FILE [--seed S] [--workers N] ...

``validate`` prints one line per bad record (``<id>: <field>: <reason>``) and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from scail2.data.buckets import PAPER_BUCKETS_512P, Bucket


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 64x64")
    return int(parts[0]), int(parts[1])


def _bucket(text: str) -> Bucket:
    try:
        return Bucket.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _validate(args: argparse.Namespace) -> int:
    from scail2.data.validate import ValidateOptions, validate_manifest

    options = ValidateOptions(
        full=args.full,
        palette_tolerance=args.palette_tolerance,
        min_frames=args.min_frames,
        buckets=tuple(args.buckets or ()),
    )
    total = bad = 0
    try:
        for report in validate_manifest(args.manifest, options, workers=args.workers):
            total += 1
            if not report.ok:
                bad += 1
                print(report.line(), flush=True)
    except (OSError, ValueError) as exc:
        print(f"scail2-data validate: cannot read {args.manifest}: {exc}", file=sys.stderr)
        return 2
    print(f"checked {total} records: {bad} bad", file=sys.stderr)
    return 1 if bad else 0


def _synth(args: argparse.Namespace) -> int:
    from scail2.data.synth import SynthOptions, generate_dataset

    options = SynthOptions(
        pairs=args.pairs,
        frames=args.frames,
        sizes=tuple(args.size or [(64, 64)]),
        fps=args.fps,
        seed=args.seed,
        lossy=args.lossy,
        first_index=args.first_index,
        scene_references=args.scene_references,
        travel=args.travel,
        clips_per_cast=args.clips_per_cast,
        **({"sources": tuple(args.source)} if args.source else {}),
    )
    manifest = generate_dataset(args.out_dir, options)
    print(f"wrote {options.pairs} pairs and {manifest}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    import torch

    from scail2.data.cache import CacheIndex, build_cache
    from scail2.data.sample import AugmentOptions
    from scail2.data.validate import ValidateOptions
    from scail2.encoders.bundle import Encoders
    from scail2.utils.dtypes import DTYPES

    dtypes = {"stored": None, **DTYPES}

    try:
        records, unparsed = _parse_manifest(args.manifest)
    except (OSError, ValueError) as exc:
        print(f"scail2-data cache: cannot read {args.manifest}: {exc}", file=sys.stderr)
        return 2
    index_file = Path(args.out_dir) / "index.json"
    known_failures = {f["id"] for f in CacheIndex.load(args.out_dir).failed} if index_file.is_file() else set()
    encoders = Encoders.from_pretrained(
        args.encoders,
        vae_path=args.vae,
        text_encoder_path=args.text_encoder,
        tokenizer_path=args.tokenizer,
        image_encoder_path=args.image_encoder,
        image_processor_path=args.image_processor,
        vae_dtype=dtypes[args.vae_dtype],
        text_dtype=dtypes[args.text_dtype],
        image_dtype=dtypes[args.image_dtype],
        device=torch.device(args.device),
    )
    report = build_cache(
        records,
        args.out_dir,
        encoders,
        buckets=args.buckets or list(PAPER_BUCKETS_512P),
        options=AugmentOptions.none() if args.no_augment else AugmentOptions(),
        seed=args.seed,
        dtype=args.dtype,
        shard_size=args.shard_size,
        num_workers=args.workers,
        encoders_name=os.path.basename(os.path.normpath(str(args.encoders or args.vae or ""))),
        progress=not args.no_progress,
        validate=ValidateOptions(palette_tolerance=args.palette_tolerance, min_frames=1),
    )
    failed = CacheIndex.load(args.out_dir).failed
    for failure in failed:
        if failure["id"] not in known_failures:  # this run's failures, one line each
            print(f"{failure['id']}: {failure['field']}: {failure['reason']}: {failure['detail']}", file=sys.stderr)
    reasons: dict[str, int] = {}
    for failure in failed:
        reasons[failure["reason"]] = reasons.get(failure["reason"], 0) + 1
    by_reason = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    print(
        f"cache {args.out_dir}: {report.cached} samples ({report.added} new, {report.skipped_done} already done), "
        f"{report.failed} failed records{f' ({by_reason}; listed in index.json)' if by_reason else ''}, "
        f"{len(unparsed)} unreadable manifest lines, {report.seconds:.1f} s"
    )
    return 0


def _parse_manifest(path: Path) -> tuple[list, list]:
    """The records of a manifest and the lines that cannot be parsed (printed, one each, and skipped) and
    duplicate ids (the first record with an id is kept): one bad line does not stop a scan."""
    from scail2.data.manifest import ManifestError, iter_manifest

    records, unparsed, seen = [], [], {}
    for line, item in iter_manifest(path):
        if isinstance(item, ManifestError):
            unparsed.append(item)
            print(f"line {line}: {item.record_id or '<no id>'}: {item.field}: {item.reason} (skipped)", file=sys.stderr)
        elif item.id in seen:
            unparsed.append(item)
            print(f"line {line}: {item.id}: id: duplicate id (first on line {seen[item.id]}; skipped)", file=sys.stderr)
        else:
            seen[item.id] = line
            records.append(item)
    if not records:
        raise ValueError("no readable records")
    return records, unparsed


def _preference(args: argparse.Namespace) -> int:
    from scail2.preference.builder import BuildOptions, MinHandDifference, build_preferences, load_components

    try:
        components = load_components(args.components)
        if args.min_hand_difference is not None:
            components.filter = MinHandDifference(args.min_hand_difference)
            components.specs = {**(components.specs or {}), "filter": f"MinHandDifference({args.min_hand_difference})"}
        options = BuildOptions(
            pairs=args.pairs,
            seed=args.seed,
            max_candidates=args.max_candidates,
            max_frames=args.max_frames,
            lossless=not args.lossy,
        )
        progress = None if args.quiet else print
        report = build_preferences(args.source_manifest, args.out_dir, components, options, progress=progress)
    except (OSError, ValueError) as exc:
        print(f"scail2-data preference: {exc}", file=sys.stderr)
        return 2
    print(
        f"{report.manifest}: {report.pairs} pairs ({report.written} new, {report.existing} already there), "
        f"{report.rejected + report.rejected_before} rejected, {report.failed} failed, "
        f"{report.candidates} candidates, {report.seconds:.1f} s"
    )
    return 0 if report.pairs >= args.pairs else 1


def _preference_cache(args: argparse.Namespace) -> int:
    import torch

    from scail2.preference.records import load_preference_manifest
    from scail2.preference.cache import build_preference_cache
    from scail2.encoders.bundle import Encoders

    records = load_preference_manifest(args.manifest)
    encoders = Encoders.from_pretrained(args.encoders, device=torch.device(args.device))
    report = build_preference_cache(
        records,
        args.out_dir,
        encoders,
        buckets=args.buckets or list(PAPER_BUCKETS_512P),
        seed=args.seed,
        dtype=args.dtype,
        shard_size=args.shard_size,
        num_workers=args.workers,
        require_masks=not args.allow_missing_masks,
        encoders_name=os.path.basename(os.path.normpath(str(args.encoders))),
    )
    print(
        f"preference cache {args.out_dir}: {report.cached} pairs ({report.added} new, {report.skipped_done} already done), "
        f"{report.failed} failed, {report.seconds:.1f} s"
    )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from scail2.data.engine.prepare import PrepareOptions, prepare_videos

    try:
        options = PrepareOptions(
            frames=args.frames,
            min_frames=args.min_frames,
            clips_per_video=args.clips_per_video,
            stride=args.stride,
            size=args.size,
            max_characters=args.max_characters,
            seed=args.seed,
            lossless=args.lossless,
            pose_aug=not args.no_pose_aug,
        )
        report = prepare_videos(
            args.videos_dir,
            args.out_dir,
            args.components,
            options,
            workers=args.workers,
            retry=args.retry or (),
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as exc:
        print(f"scail2-data prepare: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.clips else 1


def _motionpair(args: argparse.Namespace) -> int:
    from scail2.data.engine.motionpair import MotionPairOptions, synthesize_pairs

    try:
        options = MotionPairOptions(
            seed=args.seed,
            replacement_share=args.replacement_share,
            candidates=args.candidates,
            max_turns=args.max_turns,
            forward_fraction=args.forward_fraction,
            include_pose=not args.no_pose,
            lossless=args.lossless,
        )
        report = synthesize_pairs(
            args.prepared_dir,
            args.out_dir,
            args.components,
            options,
            workers=args.workers,
            retry=args.retry or (),
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as exc:
        print(f"scail2-data motionpair: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.pairs else 1


def _components_help(command: str) -> str:
    from scail2.config.components import component_presets

    presets = ", ".join(component_presets(command))
    return (f"a preset of conf/components/{command}/ ({presets}) or a YAML/JSON components file; its targets must be "
            "shipped component classes or classes your package registers (entry points scail2.config_targets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scail2-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log skipped records and decoder fallbacks")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check every record of a manifest")
    v.add_argument("manifest", type=Path)
    v.add_argument("--full", action="store_true", help="decode every frame (default: first, middle, last)")
    v.add_argument("--palette-tolerance", type=float, default=0.01, help="max fraction of off-palette mask pixels")
    v.add_argument("--min-frames", type=int, default=5, help="fewest frames at 16 fps (without --buckets)")
    v.add_argument("--buckets", type=_bucket, nargs="+", help="FRAMESxHxW buckets a record must fit, e.g. 81x512x896")
    v.add_argument("--workers", type=int, default=1, help="parallel processes")
    v.set_defaults(func=_validate)

    s = sub.add_parser("synth", help="write a small procedurally drawn dataset and its manifest")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--pairs", type=int, default=20)
    s.add_argument("--frames", type=int, default=17, help="frames per video, 4k+1")
    s.add_argument("--size", type=_size, action="append", help="HEIGHTxWIDTH, multiples of 32; repeat for several")
    s.add_argument("--fps", type=float, default=16.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lossy", action="store_true", help="4:2:0 H.264 like real data (default: RGB-lossless videos)")
    s.add_argument("--first-index", type=int, default=0, help="index of the first pair (disjoint index ranges: other characters)")
    s.add_argument("--scene-references", action="store_true", help="separate references drawn in a scene (SynthOptions.scene_references)")
    s.add_argument("--travel", type=float, default=0.0, help="characters walk across the frame, up to this many widths per second")
    s.add_argument("--clips-per-cast", type=int, default=1, help="pairs in runs of this many sharing one cast and scene, each with its own motion")
    s.add_argument(
        "--source", action="append", metavar="NAME",
        help="draw only this source kind (scail2.data.synth.SYNTH_SOURCES, e.g. mocha_replacement_single); repeat for several, in turn",
    )  # fmt: skip
    s.set_defaults(func=_synth)

    c = sub.add_parser("cache", help="encode a manifest into a latent cache (resumable)")
    c.add_argument("manifest", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--encoders", type=Path, help="Wan2.1-I2V diffusers folder (vae/, text_encoder/, tokenizer/, ...)")
    c.add_argument("--vae", type=Path, help="VAE folder or Wan2.1_VAE.pth (overrides ENCODERS/vae)")
    c.add_argument("--text-encoder", type=Path)
    c.add_argument("--tokenizer", type=Path)
    c.add_argument("--image-encoder", type=Path)
    c.add_argument("--image-processor", type=Path)
    c.add_argument("--buckets", type=_bucket, nargs="+", help="FRAMESxHxW (default: 81/65 x 512x896, portrait too)")
    c.add_argument("--seed", type=int, default=0, help="seed of the per-record pixel choices")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    c.add_argument("--shard-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=0, help="decoding processes")
    c.add_argument("--device", default="cpu", help="encoder device, e.g. cuda")
    dtypes = ["stored", "float32", "bfloat16", "float16"]
    c.add_argument("--vae-dtype", default="stored", choices=dtypes, help="(recommended: float32)")
    c.add_argument("--text-dtype", default="stored", choices=dtypes, help="umT5 (recommended: bfloat16)")
    c.add_argument("--image-dtype", default="stored", choices=dtypes, help="CLIP (recommended: float16 on GPU)")
    c.add_argument("--no-augment", action="store_true", help="no forward pairs, crops or skeleton scaling")
    c.add_argument(
        "--palette-tolerance", type=float, default=0.01,
        help="max fraction of off-palette mask pixels (as validate; records validate flags are not cached)",
    )
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_cache)

    p = sub.add_parser("preference", help="build Bias-Aware DPO preference pairs from motion videos (resumable)")
    p.add_argument("source_manifest", type=Path, help="motion manifest whose target videos are the motions x")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--components", default="synthetic", help=_components_help("preference"))
    p.add_argument("--pairs", type=int, default=100, help="accepted pairs wanted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-candidates", type=int, help="candidates tried at most (default 4 x pairs)")
    p.add_argument("--max-frames", type=int, help="use at most the first frames of each source video")
    p.add_argument("--min-hand-difference", type=float, help="reject pairs whose winner and loser differ less in the hands")
    p.add_argument("--lossy", action="store_true", help="4:2:0 H.264 (default: RGB-lossless videos)")
    p.add_argument("--quiet", action="store_true", help="no line per candidate")
    p.set_defaults(func=_preference)

    pc = sub.add_parser("preference-cache", help="encode a preference manifest into a latent cache (resumable)")
    pc.add_argument("manifest", type=Path)
    pc.add_argument("out_dir", type=Path)
    pc.add_argument("--encoders", type=Path, required=True, help="Wan2.1-I2V diffusers folder (vae/, text_encoder/, ...)")
    pc.add_argument("--buckets", type=_bucket, nargs="+", help="FRAMESxHxW (default: 81/65 x 512x896, portrait too)")
    pc.add_argument("--seed", type=int, default=0, help="seed of the per-pair clip start")
    pc.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    pc.add_argument("--shard-size", type=int, default=64)
    pc.add_argument("--workers", type=int, default=0, help="decoding processes")
    pc.add_argument("--device", default="cpu", help="encoder device, e.g. cuda")
    pc.add_argument("--allow-missing-masks", action="store_true", help="condition pairs without masks on masks without characters (the mode's backgrounds)")
    pc.set_defaults(func=_preference_cache)

    pr = sub.add_parser("prepare", help="clips, masks, keypoints, boxes, captions and pose records from videos (resumable)")
    pr.add_argument("videos_dir", type=Path, help="folder of videos (searched recursively)")
    pr.add_argument("out_dir", type=Path)
    pr.add_argument("--components", default="synthetic", help=_components_help("prepare"))
    pr.add_argument("--frames", type=int, default=81, help="clip length at 16 fps, 4k+1")
    pr.add_argument("--min-frames", type=int, help="shorter videos give one clip of at least this many frames (4k+1)")
    pr.add_argument("--clips-per-video", type=int, default=1)
    pr.add_argument("--stride", type=int, help="frames between clip starts at 16 fps (default: --frames)")
    pr.add_argument("--size", type=_size, help="HEIGHTxWIDTH to resize-to-cover (multiples of 32); default: native, cropped to multiples of 32")
    pr.add_argument("--max-characters", type=int, default=6, help="clips with more characters are skipped")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--lossless", action="store_true", help="RGB-lossless clips (default: 4:2:0 H.264 CRF 18)")
    pr.add_argument("--no-pose-aug", action="store_true", help="no scaled-skeleton swap render")
    pr.add_argument("--workers", type=int, default=1, help="processes, each with its own components")
    pr.add_argument("--retry", action="append", help="skip reason to try again (repeatable), e.g. caption_timeout")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_prepare)

    mp = sub.add_parser("motionpair", help="MotionPair-style pairs from a prepared folder (resumable)")
    mp.add_argument("prepared_dir", type=Path, help="a folder written by scail2-data prepare")
    mp.add_argument("out_dir", type=Path)
    mp.add_argument("--components", required=True, help=_components_help("motionpair"))
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--replacement-share", type=float, default=0.25, help="single-character clips sent to replacement")
    mp.add_argument("--candidates", type=int, default=4, help="character images shown to the selector")
    mp.add_argument("--max-turns", type=int, default=3, help="generate-and-check rounds of the reference loop")
    mp.add_argument("--forward-fraction", type=float, default=0.0,
                    help="pairs packaged forward (the loader already runs 5%% forward by default)")
    mp.add_argument("--no-pose", action="store_true", help="leave the prepared pose records out of the manifest")
    mp.add_argument("--lossless", action="store_true", help="RGB-lossless synthetic videos")
    mp.add_argument("--workers", type=int, default=1, help="processes, each with its own components")
    mp.add_argument("--retry", action="append", help="skip reason to try again (repeatable), e.g. discarded")
    mp.add_argument("--no-progress", action="store_true")
    mp.set_defaults(func=_motionpair)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "cache" and args.encoders is None and args.vae is None:
        print("scail2-data cache: give --encoders DIR (or every component path)", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
