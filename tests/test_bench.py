"""scail2-bench: end to end on the synthetic benchmark with the tiny pipeline, scoring existing videos, the
X-Dance and Studio-Bench-style loaders, GSB export and aggregation, and the judge path against a loopback
server."""

from __future__ import annotations

import csv
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from scail2.bench.cases import BenchmarkLayoutError, Case, VideoFrame
from scail2.config.bench import MetricsConfig, compose_bench_config, to_settings
from scail2.bench.gsb import GSB_COLUMNS, NOT_APPLICABLE, GSBSheetError, aggregate_gsb, export_gsb
from scail2.bench.loaders import load_studio, load_synthetic, load_xdance, select_cases
from scail2.bench.scoring import MetricUnavailable, Scorer
from scail2.bench.study import load_study
from scail2.cli.bench import main
from scail2.data.video import read_video, write_video
from scail2.eval.judge import JudgeConfig

FRAMES = 17  # synthetic clips: enough for one 16-frame FVD clip
SIZE = 64


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from scail2.data.synth import SynthOptions, generate_dataset

    root = tmp_path_factory.mktemp("bench-synth")
    generate_dataset(root, SynthOptions(pairs=6, frames=FRAMES, sizes=((SIZE, SIZE),), seed=0))
    return root


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    from scail2.pipeline.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Random LPIPS AlexNet trunk and I3D files in the formats users supply (values are meaningless)."""
    from scail2.eval.i3d import InceptionI3d
    from scail2.eval.lpips_net import alexnet_trunk

    folder = tmp_path_factory.mktemp("weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(alexnet_trunk().state_dict(), folder / "alexnet-owt-7be5be79.pth")
        torch.manual_seed(3)
        i3d = InceptionI3d()
        with torch.no_grad():  # non-trivial BatchNorm statistics, so features differ between videos
            for m in i3d.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.running_mean.copy_(torch.randn(m.num_features) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features) + 0.5)
        torch.save(i3d.state_dict(), folder / "i3d_torchscript.pt")
    return {"lpips": str(folder / "alexnet-owt-7be5be79.pth"), "i3d": str(folder / "i3d_torchscript.pt")}


def _frames(path: Path, n: int | None = None) -> torch.Tensor:
    """A video file -> float (1, F, 3, H, W) in [0, 1]."""
    video = read_video(path) if n is None else read_video(path, range(n))
    return (torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255)[None]


# ----------------------------------------------------------------------------------------------- end to end


def test_cli_generates_scores_and_reports(synth_root, tiny_pipeline, weights, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from scail2.eval.lpips_net import load_lpips
    from scail2.eval.metrics import lpips, psnr, ssim

    out = tmp_path / "run"
    rc = main([
        "benchmark=synthetic",
        f"benchmark.dataset.root={synth_root}",
        "benchmark.dataset.max_cases=2",
        f"generation.model_dir={tiny_pipeline}",
        "generation.steps=2",
        f"generation.height={SIZE}",
        f"generation.width={SIZE}",
        "generation.num_frames=9",
        f"metrics.lpips_weights={weights['lpips']}",
        f"metrics.i3d_weights={weights['i3d']}",
        f"paths.output_root={tmp_path}",
        f"out_dir={out}",
    ])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    for name in ("results.json", "results.csv", "results.md", "cases.csv", "report.html", "config.yaml",
                 "plot_per_case.png", "plot_per_frame.png"):
        assert (out / name).is_file(), name
    assert (tmp_path / "mlflow.db").is_file()
    results = json.loads((out / "results.json").read_text())
    cases = load_synthetic(synth_root, "self_driven")[:2]
    assert [c["id"] for c in results["cases"]] == [c.id for c in cases]
    assert results["generation"]["steps"] == 2
    assert results["generation"]["guidance"] == 5.0  # the pipeline's default, filled in

    # The JSON holds exactly what the metric functions give on the same videos (saved losslessly).
    generated = torch.cat([_frames(out / "videos" / f"{c.id}.mp4") for c in cases])
    target = torch.cat([_frames(c.ground_truth, 9) for c in cases])
    assert generated.shape == (2, 9, 3, SIZE, SIZE)
    metrics = results["metrics"]
    assert metrics["psnr"]["value"] == pytest.approx(psnr(generated, target).mean, rel=1e-12)
    assert metrics["ssim"]["value"] == pytest.approx(ssim(generated, target).mean, rel=1e-6)  # float32: batching changes the last bits
    net = load_lpips("alex", weights["lpips"])
    assert metrics["lpips"]["value"] == pytest.approx(lpips(generated, target, model=net).mean, rel=1e-5)
    per_case = psnr(generated, target).per_video
    assert [c["metrics"]["psnr"] for c in results["cases"]] == pytest.approx(per_case.tolist(), rel=1e-12)
    # 9 frames are too short for a 16-frame FVD clip: skipped with the reason, never faked.
    assert "fvd" not in metrics and "16" in results["skipped"]["fvd"]
    assert "judge.model" in results["skipped"]["judge"]

    with (out / "results.csv").open() as handle:
        rows = {r["metric"]: r for r in csv.DictReader(handle)}
    assert float(rows["psnr"]["value"]) == pytest.approx(metrics["psnr"]["value"])
    assert rows["psnr"]["protocol_tag"] == "ours-psnr" and "10 log10" in rows["psnr"]["protocol"]
    md = (out / "results.md").read_text()
    assert "[ours-psnr]" in md and "no published table" in md
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 and "<style>" in report and "src='http" not in report

    client = MlflowClient(tracking_uri=results["run"]["mlflow_tracking_uri"])
    run = client.get_run(results["run"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["psnr"] == pytest.approx(metrics["psnr"]["value"])
    assert run.data.params["generation.steps"] == "2"
    # The training runs' store by default (paths.mlflow), with the code version recorded.
    assert results["run"]["mlflow_tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert run.data.tags["git_sha"] and run.data.tags["version.torch"] == torch.__version__
    assert {"results.json", "report.html", "results.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_replacement_generation_with_masks(synth_root, tiny_pipeline, tmp_path):
    """Replacement cases go through the pipeline with their colour masks (the reference is a target frame)."""
    from scail2.bench.runner import run_benchmark

    overrides = [
        "benchmark=synthetic",
        "benchmark.task=replacement",
        f"benchmark.dataset.root={synth_root}",
        "benchmark.dataset.max_cases=1",
        f"generation.model_dir={tiny_pipeline}",
        "generation.steps=1",
        "generation.num_frames=5",
        f"generation.height={SIZE}",
        f"generation.width={SIZE}",
        "metrics.lpips=skip",
        "metrics.fvd=skip",
        "mlflow.enabled=false",
        f"out_dir={tmp_path / 'run'}",
    ]
    run = run_benchmark(to_settings(compose_bench_config(overrides)))
    (case,) = run.results["cases"]
    assert case["kind"] == "replacement" and case["frames"] == 5 and 0 < case["metrics"]["psnr"] < 100
    assert read_video(tmp_path / "run" / case["video"]).shape == (5, SIZE, SIZE, 3)


def test_scoring_identical_videos(synth_root, weights, tmp_path):
    """Ground-truth videos scored as generated ones: PSNR at its cap, SSIM 1, LPIPS 0, FVD 0."""
    cases = load_synthetic(synth_root, "self_driven")[:2]
    generated = tmp_path / "generated"
    generated.mkdir()
    for case in cases:
        shutil.copy(case.ground_truth, generated / f"{case.id}.mp4")
    overrides = [
        "benchmark=synthetic",
        f"benchmark.dataset.root={synth_root}",
        "benchmark.dataset.max_cases=2",
        f"generated_dir={generated}",
        f"metrics.lpips_weights={weights['lpips']}",
        f"metrics.i3d_weights={weights['i3d']}",
        "metrics.fvd=required",
        "mlflow.enabled=false",
        f"out_dir={tmp_path / 'run'}",
    ]
    from scail2.bench.runner import run_benchmark

    run = run_benchmark(to_settings(compose_bench_config(overrides)))
    metrics = run.results["metrics"]
    assert metrics["psnr"]["value"] == 100.0
    assert metrics["ssim"]["value"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["lpips"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert abs(metrics["fvd"]["value"]) < 1e-3 and metrics["fvd"]["fake_clips"] == 2
    assert "i3d_torchscript.pt sha256:" in metrics["fvd"]["protocol"]
    assert "fvd-i3d400-16f-224" in metrics["fvd"]["protocol"]
    assert run.results["run"]["source"] == "scored" and run.mlflow_run_id is None
    assert "warning" in metrics["fvd"]  # 2 clips << 400 dimensions: said next to the value


def test_generated_dir_missing_video_and_typos(synth_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [
        "benchmark=synthetic",
        f"benchmark.dataset.root={synth_root}",
        "mlflow.enabled=false",
        f"out_dir={tmp_path / 'r'}",
    ]
    assert main(base + [f"generated_dir={empty}"]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "scail_animation_00000.mp4" in err
    assert main(base + ["generation.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(base + ["+benchmark.dataset.extra=1"]) == 2
    assert "benchmark.dataset.extra" in capsys.readouterr().err
    assert main(base + ["metrics.lpips=requird"]) == 2
    assert "auto, required, skip" in capsys.readouterr().err
    assert main(base + ["benchmark=nope"]) == 2
    assert "xdance" in capsys.readouterr().err  # the available benchmarks are listed


def test_every_benchmark_config_composes():
    folder = Path(__file__).resolve().parents[1] / "conf" / "benchmark"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert {"self_driven", "cross_identity", "replacement", "xdance", "synthetic"} <= set(names)
    for name in names:
        settings = to_settings(compose_bench_config([f"benchmark={name}"]))
        assert settings.benchmark.name == name


def test_missing_weights_skip_or_fail(tmp_path):
    truth = tmp_path / "gt.mp4"  # never read: the weight checks come first
    case = Case(id="c", reference=VideoFrame(truth), driving=tmp_path / "d.mp4", ground_truth=truth)
    missing = str(tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth")
    auto = Scorer(MetricsConfig(lpips_weights=missing, fvd="skip"), JudgeConfig(model=""), [case])
    assert "alexnet-owt-7be5be79.pth" in auto.skipped["lpips"] and not auto.enabled["lpips"]
    assert auto.skipped["fvd"] == "metrics.fvd=skip"
    with pytest.raises(MetricUnavailable, match="metrics.lpips=required.*alexnet-owt-7be5be79.pth"):
        Scorer(MetricsConfig(lpips="required", lpips_weights=missing, fvd="skip"), JudgeConfig(model=""), [case])
    with pytest.raises(MetricUnavailable, match="judge.model"):
        Scorer(MetricsConfig(lpips="skip", fvd="skip", judge="required"), JudgeConfig(model=""), [case])


# ----------------------------------------------------------------------------------------------- loaders


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_xdance_by_id_and_categories(tmp_path):
    root = tmp_path / "X-Dance"
    for vid in ("00001", "00002"):
        _touch(root / "videos" / vid / "video.mp4")
        _touch(root / "videos" / vid / "pose.mp4")
        (root / "videos" / vid / "prompt.txt").write_text(f"dance {vid}\n")
        _touch(root / "images" / f"{vid}.png")
    cases = load_xdance(root)
    assert [c.id for c in cases] == ["00001", "00002"]
    assert cases[0].reference == root / "images" / "00001.png" and cases[0].driving.name == "video.mp4"
    assert cases[1].prompt == "dance 00002" and cases[0].ground_truth is None and cases[0].kind == "single"
    assert load_xdance(root, driving="pose")[0].driving.name == "pose.mp4"

    shutil.rmtree(root / "images")
    _touch(root / "Ref-Female-Whole-Body" / "a.png")
    _touch(root / "Ref-Cartoon-Movie" / "b.jpg")
    _touch(root / "assets" / "teaser.png")  # the dataset card's figures: not a reference category
    with pytest.raises(BenchmarkLayoutError, match=r"2 reference images .* do not name its clips.*pairing=cross"):
        load_xdance(root)  # no pairing defined: never every image with every clip unasked
    cases = load_xdance(root, pairing="cross")
    assert [c.id for c in cases] == [
        "Ref-Cartoon-Movie/b__00001", "Ref-Cartoon-Movie/b__00002",
        "Ref-Female-Whole-Body/a__00001", "Ref-Female-Whole-Body/a__00002",
    ]
    assert cases[0].category == "Ref-Cartoon-Movie" and cases[0].file_stem == "Ref-Cartoon-Movie__b__00001"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("reference,video\nRef-Female-Whole-Body/a.png,00002\n")
    assert [c.id for c in load_xdance(root, pairing="file", pairs_file=pairs)] == ["Ref-Female-Whole-Body/a__00002"]
    assert [c.id for c in select_cases(cases, ["Ref-Cartoon-Movie/b__00002"])] == ["Ref-Cartoon-Movie/b__00002"]
    with pytest.raises(ValueError, match="unknown case ids"):
        select_cases(cases, ["nope"])


def test_xdance_categories_pair_by_id_and_skip_non_category_folders(tmp_path):
    """The release's form: Ref-* category folders (35 references) plus assets/; each image id names its clip."""
    root = tmp_path / "X-Dance"
    layout = {"Ref-Cartoon-Movie": ["00001", "00002"], "Ref-Female-Upper-Body": ["00003"], "Ref-Male-Whole-Body": ["00004"]}
    for category, ids in layout.items():
        for vid in ids:
            _touch(root / category / f"{vid}.png")
            _touch(root / "videos" / vid / "video.mp4")
    _touch(root / "assets" / "00005.png")  # an image in a non-category folder, even with a clip id
    _touch(root / "assets" / "X-Dance.png")
    _touch(root / "videos" / "00005" / "video.mp4")
    with pytest.raises(BenchmarkLayoutError, match=r"no reference image for video 00005: expected Ref-<category>/00005"):
        load_xdance(root)
    shutil.rmtree(root / "videos" / "00005")
    cases = load_xdance(root)
    assert [(c.id, c.category, c.reference.parent.name) for c in cases] == [
        ("00001", "Ref-Cartoon-Movie", "Ref-Cartoon-Movie"),
        ("00002", "Ref-Cartoon-Movie", "Ref-Cartoon-Movie"),
        ("00003", "Ref-Female-Upper-Body", "Ref-Female-Upper-Body"),
        ("00004", "Ref-Male-Whole-Body", "Ref-Male-Whole-Body"),
    ]
    assert len(load_xdance(root, pairing="cross")) == 4 * 4  # 4 references (assets/ not counted) x 4 clips
    _touch(root / "Ref-Male-Upper-Body" / "00001.png")
    with pytest.raises(BenchmarkLayoutError, match="two reference images are named 00001"):
        load_xdance(root, pairing="by_id")


def test_xdance_broken_tree_lists_every_problem(tmp_path):
    root = tmp_path / "X-Dance"
    _touch(root / "videos" / "00001" / "video.mp4")
    _touch(root / "videos" / "00002" / "pose.mp4")  # no video.mp4
    _touch(root / "videos" / "00003" / "video.mp4")
    _touch(root / "images" / "00001.png")
    _touch(root / "images" / "00002.png")  # nothing for 00003
    with pytest.raises(BenchmarkLayoutError) as err:
        load_xdance(root)
    message = str(err.value)
    assert "videos/00002 has no video.mp4" in message
    assert "no reference image for video 00003: expected images/00003.png" in message
    with pytest.raises(BenchmarkLayoutError, match="no videos/ folder"):
        load_xdance(tmp_path / "X-Dance" / "images")
    with pytest.raises(BenchmarkLayoutError, match="is not a folder"):
        load_xdance(tmp_path / "missing")


def test_studio_layout(tmp_path):
    root = tmp_path / "studio"
    s = root / "self_driven"
    _touch(s / "a" / "driving.mp4")
    _touch(s / "a" / "ground_truth.mp4")
    _touch(s / "b" / "driving.mp4")
    _touch(s / "b" / "ground_truth.mp4")
    _touch(s / "b" / "reference.png")
    (s / "b" / "prompt.txt").write_text("a dancer\n")
    cases = load_studio(root, "self_driven")
    assert [c.id for c in cases] == ["a", "b"]
    assert cases[0].reference == VideoFrame(s / "a" / "ground_truth.mp4", 0)  # the clip's first frame
    assert cases[1].reference == s / "b" / "reference.png" and cases[1].prompt == "a dancer"

    c = root / "cross_driven" / "pair1"
    for name in ("reference.png", "driving.mp4", "reference_mask.png", "driving_mask.mp4"):
        _touch(c / name)
    (c / "case.json").write_text(json.dumps({"characters": 2}))
    (case,) = load_studio(root, "cross_identity")
    assert case.kind == "multi" and case.ground_truth is None and case.driving_mask == c / "driving_mask.mp4"

    r = root / "replacement" / "r1"
    _touch(r / "reference.png")
    _touch(r / "driving.mp4")
    _touch(r / "driving_mask.mp4")
    with pytest.raises(BenchmarkLayoutError) as err:
        load_studio(root, "replacement")
    assert "replacement/r1 has one mask but no reference_mask.png" in str(err.value)


def test_studio_broken_tree(tmp_path):
    root = tmp_path / "studio"
    _touch(root / "self_driven" / "a" / "ground_truth.mp4")  # no driving video
    _touch(root / "self_driven" / "b" / "driving.mp4")  # no ground truth, no reference
    _touch(root / "cross_driven" / "c" / "driving.mp4")  # no reference image
    with pytest.raises(BenchmarkLayoutError) as err:
        load_studio(root, "self_driven")
    message = str(err.value)
    assert "self_driven/a has no driving video (driving.mp4)" in message
    assert "self_driven/b has no ground_truth.mp4" in message
    with pytest.raises(BenchmarkLayoutError, match="cross_driven/c has no reference image"):
        load_studio(root, "cross_identity")
    found = r"no replacement/ split folder \(found: \['cross_driven', 'self_driven'\]\)"
    with pytest.raises(BenchmarkLayoutError, match=found):
        load_studio(root, "replacement")


def test_synthetic_tasks(synth_root):
    self_driven = load_synthetic(synth_root, "self_driven")
    assert all(c.ground_truth is not None and c.mode == "animation" for c in self_driven)
    assert self_driven[0].reference == VideoFrame(self_driven[0].ground_truth, 0)
    replacement = load_synthetic(synth_root, "replacement")
    assert replacement and all(c.mode == "replacement" and c.driving_mask is not None for c in replacement)
    cross = load_synthetic(synth_root, "cross_identity")
    assert all(c.ground_truth is None and "__" in c.id for c in cross)


def test_a_mask_video_frame_is_redrawn_as_a_reference_mask(synth_root):
    # Self-driven cases take the target mask's first frame (drawn on the driving background, black in animation
    # mode) as the reference mask: it reaches the pipeline on the reference background (white).
    from scail2.bench.runner import _reference_mask_input

    case = next(c for c in load_synthetic(synth_root, "self_driven") if isinstance(c.reference_mask, VideoFrame))
    frame = read_video(case.reference_mask.video, [0])[0]
    mask = _reference_mask_input(case.reference_mask, case.mode)
    background = (frame <= 225).all(axis=-1)
    assert background.mean() > 0.3 and (mask[background] == 255).all()
    assert np.array_equal(mask[~background], frame[~background])  # the character colours stay
    assert _reference_mask_input(Path("m.png"), "animation") == "m.png"  # an image is used as it is


# ----------------------------------------------------------------------------------------------- GSB


def _solid(colour: tuple[int, int, int], frames: int = 5, h: int = 32, w: int = 32) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (frames, h, w, 3)).copy()


def test_gsb_export_and_aggregate_round_trip(tmp_path):
    cases = [
        Case(id="single", reference=tmp_path / "r.png", driving=tmp_path / "d.mp4"),
        Case(id="multi", reference=tmp_path / "r.png", driving=tmp_path / "d.mp4", characters=2),
        Case(id="swap", reference=tmp_path / "r.png", driving=tmp_path / "d.mp4", mode="replacement",
             reference_mask=tmp_path / "m.png", driving_mask=tmp_path / "m.mp4"),
    ]
    ours, base = tmp_path / "ours", tmp_path / "base"
    pairs = []
    for case in cases:
        pairs.append((case, write_video(ours / f"{case.id}.mp4", _solid((230, 30, 30)), 8)))
        write_video(base / f"{case.id}.mp4", _solid((30, 30, 230), frames=7, h=48, w=40), 8)  # other size: aligned
    export = export_gsb(pairs, base, tmp_path / "gsb", ours_name="ours", baseline_name="wan", seed=3, gap=8,
                        study=False)  # the sheet study alone (the cases here have no reference files)
    key = json.loads(export.key.read_text())
    assert sorted(p["case_id"] for p in key["pairs"]) == ["multi", "single", "swap"]
    assert not (export.folder / "key.json").exists()  # raters never get the key
    for p in key["pairs"]:
        video = read_video(export.folder / "pairs" / f"{p['pair']}.mp4")
        assert video.shape == (5, 32, 72, 3)
        left_red = video[:, :, :32, 0].mean() > video[:, :, :32, 2].mean()
        assert left_red == (p["left"] == "ours")
    with export.sheet.open() as handle:
        rows = {r["pair"]: r for r in csv.DictReader(handle)}
    columns = {p["case_id"]: [c for c in GSB_COLUMNS if rows[p["pair"]][c] != NOT_APPLICABLE] for p in key["pairs"]}
    assert columns == {
        "single": ["Motion Accuracy", "Identity Consistency", "Physical Plausibility"],
        "multi": ["Motion Accuracy", "Identity Consistency", "Identity Isolation"],
        "swap": ["Motion Accuracy", "Identity Consistency", "Environment Integration"],
    }

    # Hand-made sheets: the intended outcome (G = ours better) per rater, case and column, blinded with the key.
    intended = {
        "r1": {"single": {"Motion Accuracy": "G", "Identity Consistency": "G", "Physical Plausibility": "S"},
               "multi": {"Motion Accuracy": "B", "Identity Consistency": "G", "Identity Isolation": "G"},
               "swap": {"Motion Accuracy": "G", "Identity Consistency": "S", "Environment Integration": "B"}},
        "r2": {"single": {"Motion Accuracy": "S", "Identity Consistency": "", "Physical Plausibility": "G"},
               "multi": {"Motion Accuracy": "G", "Identity Consistency": "B", "Identity Isolation": "G"},
               "swap": {"Motion Accuracy": "G", "Identity Consistency": "G", "Environment Integration": "G"}},
    }
    by_case = {p["case_id"]: p for p in key["pairs"]}

    def blind(outcome: str, left: str) -> str:
        if outcome in ("", "S"):
            return outcome
        ours_wins = outcome == "G"
        return "L" if ours_wins == (left == "ours") else "R"

    sheets = []
    for rater, answers in intended.items():
        path = tmp_path / f"{rater}.csv"
        with export.sheet.open() as src, path.open("w", newline="") as dst:
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, reader.fieldnames)
            writer.writeheader()
            for row in reader:
                pair = next(p for p in key["pairs"] if p["pair"] == row["pair"])
                for column, outcome in answers[pair["case_id"]].items():
                    answer = blind(outcome, pair["left"])
                    row[column] = answer.lower() if rater == "r2" else answer  # answers are case-insensitive
                writer.writerow(row)
        sheets.append(path)
    summary = aggregate_gsb(export.key, sheets)
    ma = summary.columns["Motion Accuracy"]
    assert (ma.good, ma.same, ma.bad, ma.unrated) == (4, 1, 1, 0)
    assert ma.rates() == {"G": 4 / 6, "S": 1 / 6, "B": 1 / 6} and ma.score == pytest.approx(0.5)
    ic = summary.columns["Identity Consistency"]
    assert (ic.good, ic.same, ic.bad, ic.unrated) == (3, 1, 1, 1) and ic.rates()["G"] == 3 / 5
    assert (summary.columns["Identity Isolation"].good, summary.columns["Identity Isolation"].rated) == (2, 2)
    env = summary.columns["Environment Integration"]
    assert (env.good, env.bad) == (1, 1)
    plausibility = summary.by_kind["single"]["Physical Plausibility"]
    assert (plausibility.good, plausibility.same, plausibility.bad) == (1, 1, 0)

    # The CLI writes the same rates, a chart, and refuses bad cells with the fix.
    assert main(["gsb", "--key", str(export.key), "--sheets", *map(str, sheets), "--out", str(tmp_path / "agg")]) == 0
    saved = json.loads((tmp_path / "agg" / "gsb_results.json").read_text())
    assert saved["columns"]["Motion Accuracy"]["rates"]["G"] == pytest.approx(4 / 6)
    assert (tmp_path / "agg" / "gsb_rates.png").stat().st_size > 0

    def edited(case_id: str, column: str, value: str) -> Path:
        path = tmp_path / "edited.csv"
        with sheets[0].open() as src:
            reader = csv.DictReader(src)
            rows = list(reader)
        for row in rows:
            if row["pair"] == by_case[case_id]["pair"]:
                row[column] = value
        with path.open("w", newline="") as dst:
            writer = csv.DictWriter(dst, reader.fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        return path

    with pytest.raises(GSBSheetError, match="'X' is not an answer; write L"):
        aggregate_gsb(export.key, [edited("multi", "Motion Accuracy", "X")])
    with pytest.raises(GSBSheetError, match="does not apply to a single case"):
        aggregate_gsb(export.key, [edited("single", "Identity Isolation", "L")])
    with pytest.raises(GSBSheetError, match="not in the key"):
        aggregate_gsb(export.key, [edited("single", "pair", "P999")])


# ----------------------------------------------------------------------------------------------- judge


class _JudgeServer(ThreadingHTTPServer):
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1: Motion Smoothness gets 3, the rest 4."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.requests: list[dict] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _JudgeHandler(BaseHTTPRequestHandler):
    server: _JudgeServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        system = body["messages"][0]["content"]
        title = system.split("Grade exactly one dimension: ", 1)[1].split(".", 1)[0]
        score = 3 if title == "Motion Smoothness" else 4
        reply = {"choices": [{"message": {"role": "assistant", "content": f"{title}: {score}\nReason: fine"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def judge_server():
    server = _JudgeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_cross_identity_judge_gsb_and_published(synth_root, judge_server, tmp_path):
    from scail2.bench.runner import run_benchmark
    from scail2.eval.judge import DIMENSIONS

    cases = load_synthetic(synth_root, "cross_identity")[:2]
    ours, base = tmp_path / "ours", tmp_path / "base"
    ours.mkdir()
    base.mkdir()
    for case in cases:  # stand-ins for generated videos: the driving clips and their reversal
        shutil.copy(case.driving, ours / f"{case.file_stem}.mp4")
        write_video(base / f"{case.file_stem}.mp4", read_video(case.driving)[::-1].copy(), 16)
    overrides = [
        "benchmark=synthetic_cross",
        f"benchmark.dataset.root={synth_root}",
        "benchmark.dataset.max_cases=2",
        "benchmark.published=[table3]",
        f"generated_dir={ours}",
        "metrics.judge=required",
        "judge.model=judge-test",
        f"judge.base_url={judge_server.base_url}",
        "judge.api_key=secret-test-key",
        f"gsb.baseline_dir={base}",
        "gsb.baseline_name=reversed",
        "mlflow.enabled=false",  # MLflow logging is covered end to end above
        f"out_dir={tmp_path / 'run'}",
    ]
    run = run_benchmark(to_settings(compose_bench_config(overrides)))
    results = run.results
    assert len(judge_server.requests) == 2 * len(DIMENSIONS)
    assert judge_server.requests[0]["model"] == "judge-test" and judge_server.requests[0]["temperature"] == 0
    # Motion Smoothness gets 3 from the scripted judge, every other dimension 4.
    expected = {d.name: (3.0 if d.name == "motion_smoothness" else 4.0) for d in DIMENSIONS}
    assert {k: results["metrics"][k]["value"] for k in expected} == expected
    assert "prompts v1" in results["metrics"]["imaging_quality"]["protocol"]
    assert "ground truth" in results["skipped"]["psnr"] and "ground truth" in results["skipped"]["fvd"]
    assert (tmp_path / "run" / "judge_answers.jsonl").read_text().count("\n") == 2 * len(DIMENSIONS)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "4.43 [paper-T3]" in md and "4.00 [ours-imaging_quality]" in md and "published" in md
    assert (tmp_path / "run" / "plot_comparison.png").is_file()
    assert len(results["gsb"]["pairs"]) == 2 and Path(results["gsb"]["sheet"]).is_file()
    assert [p.pair for p in load_study(Path(results["gsb"]["study"]).parents[1]).pairs] == results["gsb"]["pairs"]
    # The API key never reaches the outputs or the tracking store.
    for name in ("results.json", "config.yaml", "report.html"):
        assert "secret-test-key" not in (tmp_path / "run" / name).read_text()
    assert math.isfinite(results["metrics"]["imaging_quality"]["std"])


def test_benchmark_records_mark_uncommitted_code(tmp_path):
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    assert common.versions(repo=tmp_path)["scail2_git"] is None  # not a checkout: nothing claimed
    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "lib.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}")
    git("add", "-A")
    git("commit", "-qm", "init")
    clean = common.versions(repo=tmp_path)
    assert clean["scail2_git"] and clean["scail2_git_dirty"] is False
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"new": 1}')  # a result being written: still clean
    assert common.versions(repo=tmp_path)["scail2_git_dirty"] is False
    (tmp_path / "lib.py").write_text("x = 2\n")
    dirty = common.versions(repo=tmp_path)
    assert dirty["scail2_git"] == clean["scail2_git"] and dirty["scail2_git_dirty"] is True
