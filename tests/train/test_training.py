"""Training runs of the tiny model on CPU: fast_dev_run, overfitting, the golden loss curve, the non-finite guard,
checkpoints, MLflow records and bit-exact resume in a new process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scail2.config import instantiate
from scail2.lit.base import build_network
from scail2.train import train

from .conftest import checkpoint_under, compose_run, train_overrides
from .helpers import ChargeForwards, FakeClock, FixedBatches, LossRecorder, MemoryLogger, StateAround, assert_same_state

GOLDEN = Path(__file__).with_name("golden_loss.json")
QUIET = (
    "logger=none",
    "callbacks.checkpoint=null",
    "trainer.enable_checkpointing=false",
    "callbacks.progress=null",
    "trainer.enable_progress_bar=false",
    "export.enabled=false",
)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    # One store for the module: creating an MLflow SQLite store runs its migrations (seconds).
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def test_fast_dev_run(data_root, tmp_path):
    result = train(compose_run(data_root, tmp_path, "debug=fast_dev_run"))
    assert result.global_step == 1


def test_overfit_one_batch_drives_the_loss_down(data_root, tmp_path):
    steps = 500
    cfg = compose_run(
        data_root, tmp_path, *QUIET, f"trainer.max_steps={steps}", "optim.optimizer.lr=1e-2",
        "optim.scheduler.warmup_steps=10", "objective.text_dropout=0.0",
    )
    losses = LossRecorder()
    train(cfg, [losses], datamodule=FixedBatches(instantiate(cfg.data, "data"), steps))
    # The loss is noisy (a new noise level every step), so compare window means.
    first, last = sum(losses.losses[:10]) / 10, sum(losses.losses[-20:]) / 20
    assert last < 0.4 * first, (first, last)


def golden_losses(data_root: Path, out: Path) -> list[float]:
    """The per-step losses of 20 tiny steps (the golden curve's recipe)."""
    cfg = compose_run(data_root, out, *QUIET, "trainer.max_steps=20", "optim.optimizer.lr=1e-3")
    losses = LossRecorder()
    train(cfg, [losses])
    return losses.losses


def test_golden_loss_curve(data_root, tmp_path):
    """Regenerate after an intended change with: HF_HUB_OFFLINE=1 python -m tests.train.golden"""
    expected = json.loads(GOLDEN.read_text())["losses"]
    got = golden_losses(data_root, tmp_path)
    assert len(got) == len(expected) == 20
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_nonfinite_loss_raises_before_the_step(data_root, tmp_path):
    cfg = compose_run(data_root, tmp_path, *QUIET, "trainer.max_steps=5")
    state = StateAround(2)
    data = FixedBatches(instantiate(cfg.data, "data"), 5, poison_at=2)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 2 .*sample ids \['.+'\], sources \['.+'\].*weights are those of step 2"):
        train(cfg, [state], datamodule=data)
    now = {"net": state.module.net.state_dict(), "optim": state.module.trainer.optimizers[0].state_dict()}
    assert_same_state(state.before, now)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_skip_mode_counts_and_leaves_weights_untouched(data_root, tmp_path, poison):
    cfg = compose_run(data_root, tmp_path, *QUIET, "trainer.max_steps=5", "module.nonfinite=skip")
    state, losses = StateAround(2), LossRecorder()
    result = train(cfg, [state, losses], datamodule=FixedBatches(instantiate(cfg.data, "data"), 5, poison_at=2, poison=poison))
    assert result.global_step == 5
    assert state.module.nonfinite_skips == 1
    assert not math.isfinite(losses.losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses.losses) if i != 2)
    assert_same_state(state.before, state.after)


def test_validation_sampling_does_not_count_as_training_time(data_root, tmp_path, monkeypatch):
    """perf/step_time_s counts the training steps alone: validations (at steps 0, 2 and 4, 100x slower per
    forward than training) add nothing to it."""
    import time

    from scail2.lit.evaluation import evaluation_history
    from scail2.lit.validation import SampleValidation
    from scail2.train import build_module, build_trainer

    cfg = compose_run(data_root, tmp_path, *QUIET, "trainer.max_steps=4", "module.validation.num_samples=1",
                      "module.validation.num_inference_steps=1", "module.validation.every_n_steps=2",
                      "callbacks.throughput.window=1")  # fmt: skip
    clock, logger = FakeClock(), MemoryLogger()
    trainer = build_trainer(cfg, extra_callbacks=[ChargeForwards(clock, eval_seconds=100.0)])
    trainer.loggers = [logger]
    monkeypatch.setattr(time, "perf_counter", clock)
    trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data, "data"))
    assert [v.step for v in evaluation_history(trainer, SampleValidation)] == [0, 2, 4]
    assert [v for _, v in logger.metrics["perf/step_time_s"]] == [1.0] * 4  # one training forward per step


def test_mlflow_run_checkpoints_and_media(data_root, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from scail2.lit.checkpoint import RUN_RECORD

    cfg = compose_run(
        data_root,
        tmp_path,
        "trainer.max_steps=4",
        "callbacks.checkpoint.every_n_train_steps=2",
        "module.validation.num_samples=2",
        "module.validation.num_inference_steps=2",
        f"module.validation.vae={data_root}/synthetic-6p-9x32x32-s0-random/encoders",
        f"export.encoders={data_root}/synthetic-6p-9x32x32-s0-random/encoders",
        "module.validation.every_n_steps=100",
        f"logger.tracking_uri={mlflow_uri}",
    )
    result = train(cfg)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["trainer/max_steps"] == "4" and params["model/preset"] == "tiny"
    assert params["optim/optimizer/lr"] == str(cfg.optim.optimizer.lr)
    for key in ("train/loss", "train/grad_norm", "train/nonfinite_skips", "train/lr", "perf/samples_per_s",
                "perf/tokens_per_s", "perf/tflops_per_device", "val/latent_mse", "val/psnr", "val/fm_loss", "data/skipped_total"):
        assert key in metrics, key
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 4
    assert [m.step for m in client.get_metric_history(result.run_id, "val/latent_mse")] == [0, 4]
    assert tags["git_sha"] and tags["version.torch"] == torch.__version__
    assert tags["checkpoint.latest"].endswith("step=0000004.ckpt") and tags["exported_model"] == str(result.export_dir)

    def artifacts(path: str = "") -> set[str]:
        out = set()
        for f in client.list_artifacts(result.run_id, path):
            out |= artifacts(f.path) if f.is_dir else {f.path}
        return out

    files = artifacts()
    assert "config/config.yaml" in files
    for step in ("0000000", "0000004"):
        assert {f"validation/step_{step}/grid.png", f"validation/step_{step}/sample_0.mp4"} <= files
    # The run is the record of its outputs: checkpoints (the small last one uploaded), the export's files with
    # their hashes, how it was trained, the validation figures.
    assert {"outputs/checkpoints.json", "outputs/export.json", "outputs/training.json", "checkpoints/step=0000004.ckpt",
            "validation/history.json"} <= files  # fmt: skip
    local = Path(client.download_artifacts(result.run_id, "outputs", str(tmp_path / "downloaded")))
    listed = json.loads((local / "checkpoints.json").read_text())
    assert [(Path(c["path"]).name, c["step"]) for c in listed] == [("step=0000002.ckpt", 2), ("step=0000004.ckpt", 4)]
    export = json.loads((local / "export.json").read_text())
    from scail2.lit.tracking import sha256_file

    weights = next(f for f in export["files"] if f["path"] == "diffusion_pytorch_model.safetensors")
    assert weights["sha256"] == sha256_file(result.export_dir / "diffusion_pytorch_model.safetensors")
    assert {"vae/config.json", "model_index.json", "training.json"} <= {f["path"] for f in export["files"]}
    assert tags["checkpoint.dir"] == str(result.checkpoint_dir) and len(tags["export.sha256"]) == 64
    record = json.loads((result.export_dir / "training.json").read_text())
    assert record["finished"] and record["global_step"] == record["max_steps"] == 4 and record["run_id"] == result.run_id
    assert record["resolutions"] == [{"frames": 9, "height": 32, "width": 32, "samples": 8}]  # 4 steps x 2

    # Checkpoints: plain containers only, the run record next to them, every rank's generator state.
    assert json.loads((result.run_dir / RUN_RECORD).read_text())["run_id"] == result.run_id
    for name in ("step=0000002.ckpt", "step=0000004.ckpt", "last.ckpt"):
        ckpt = torch.load(result.checkpoint_dir / name, weights_only=True)
        assert ckpt["scail2"]["generator_states"].shape[0] == 1
        assert all(k.startswith("net.") for k in ckpt["state_dict"])  # the network only (no validation decoder)
        assert "hyper_parameters" not in ckpt
    assert (result.checkpoint_dir / "last.ckpt").resolve().name == "step=0000004.ckpt"

    # The export: the network in the save_pretrained layout, and (export.encoders) a complete pipeline folder.
    from scail2.models import load_transformer
    from scail2.pipeline import SCAIL2Pipeline

    assert load_transformer(result.export_dir).num_params() == result_params(cfg)
    assert result.pipeline
    assert SCAIL2Pipeline.from_pretrained(result.export_dir).transformer.num_params() == result_params(cfg)


def result_params(cfg) -> int:
    return build_network(instantiate(cfg.model, "model")).num_params()


# Resume is bit-exact for a fixed torch thread count (docs/training.md, "What a resume reproduces"). Every run here
# sets it (`threads=1`), so the result depends neither on the pytest process's threads nor on the machine's load.
RESUME = ("optim.scheduler.total_steps=8", "callbacks.checkpoint.every_n_train_steps=4", "threads=1")
OTHER_SETTINGS = "resuming with other settings than the checkpoint was written with"


@pytest.fixture(scope="module")
def resume_runs(data_root, tmp_path_factory, mlflow_uri) -> dict:
    """8 steps straight and the first 4 steps of the same run (checkpoint at step 4), both in this process."""
    out = tmp_path_factory.mktemp("resume")
    straight_losses = LossRecorder()
    straight = train(
        compose_run(data_root, out / "a", *RESUME, f"logger.tracking_uri={mlflow_uri}", "trainer.max_steps=8", "run_name=straight"),
        extra_callbacks=[straight_losses],
    )
    first = train(compose_run(data_root, out / "b", *RESUME, f"logger.tracking_uri={mlflow_uri}", "trainer.max_steps=4", "run_name=resumed"))
    return {"out": out, "straight": straight, "losses": straight_losses.losses, "first": first}


def _resume_here(data_root, out: Path, ckpt: Path, *extra: str) -> list[float]:
    """The losses of steps 5-8 resumed from ``ckpt`` in this process. A run resumes only from a checkpoint under
    its output root, so ``ckpt`` is copied there first."""
    given = checkpoint_under(out, ckpt)
    losses = LossRecorder()
    cfg = compose_run(data_root, out, *RESUME, *QUIET, "trainer.max_steps=8", *extra)
    cfg.ckpt_path = str(given)  # set after composing: the file name's "=" would need quoting on a command line
    train(cfg, extra_callbacks=[losses])
    return losses.losses


def test_resume_in_a_new_process_is_bit_exact(data_root, resume_runs, mlflow_uri):
    """``ckpt_path=last`` in a new process gives the losses and weights of the uninterrupted run bit for bit, and
    continues the same MLflow run. The new process is told another thread count by its environment, which
    `threads=1` overrides: the setting, not the environment, decides."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    out = resume_runs["out"]
    straight, first = resume_runs["straight"], resume_runs["first"]
    overrides = train_overrides(data_root, out / "b", *RESUME, f"logger.tracking_uri={mlflow_uri}", "trainer.max_steps=8",
                                "run_name=resumed", "ckpt_path=last")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "scail2.train", *overrides], capture_output=True, text=True, env=env, cwd=out, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "resuming from" in log
    assert OTHER_SETTINGS not in log  # the checkpoint's recorded settings equal the resumed process's

    client = MlflowClient(mlflow_uri)

    def history(run_id: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))

    assert len(history(straight.run_id)) == 8
    assert history(first.run_id) == history(straight.run_id)  # steps 5-8 were added to the same run, bit-exact
    resumed_dirs = [p for p in (out / "b" / "resumed").glob("*/model") if p.parent.name != "run"]
    assert len(resumed_dirs) == 1  # the new process's run folder
    a = load_file(straight.export_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed_dirs[0] / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_record_the_settings_resume_depends_on(resume_runs):
    ckpt = torch.load(resume_runs["first"].checkpoint_dir / "step=0000004.ckpt", weights_only=True)
    runtime = ckpt["scail2"]["runtime"]
    assert runtime["intra_op_threads"] == 1  # `threads=1`, whatever the pytest process uses
    assert runtime["torch"] == torch.__version__ and runtime["device"] == "cpu" and runtime["world_size"] == 1
    assert runtime["deterministic_algorithms"] is False and runtime["precision"] == "32-true"


def test_train_restores_the_callers_cpu_numerics(data_root, tmp_path):
    """A run sets its thread count and denormal flushing and gives the process back as it was."""
    from scail2.utils.cpu import flush_denormal_enabled

    before = torch.get_num_threads()
    torch.set_num_threads(2 if before != 2 else 3)
    try:
        expected = torch.get_num_threads()
        assert not flush_denormal_enabled()
        train(compose_run(data_root, tmp_path, *QUIET, "debug=fast_dev_run", "threads=1", "flush_denormal=true"))
        assert torch.get_num_threads() == expected and not flush_denormal_enabled()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_threads_must_be_positive(data_root, tmp_path, bad):
    from scail2.config.instantiate import ConfigError

    with pytest.raises(ConfigError, match=rf"threads={bad}: need a positive number"):
        train(compose_run(data_root, tmp_path, *QUIET, "debug=fast_dev_run", f"threads={bad}"))


def test_resume_with_another_thread_count_is_close_and_warned(data_root, resume_runs, tmp_path, caplog):
    """With 2 threads instead of the checkpoint's 1 the resume is not bit-exact, but stays within a tolerance
    of the uninterrupted run, and a warning names the setting and both values."""
    ckpt = resume_runs["first"].checkpoint_dir / "step=0000004.ckpt"
    with caplog.at_level("WARNING", logger="scail2"):
        losses = _resume_here(data_root, tmp_path, ckpt, "threads=2")
    assert OTHER_SETTINGS in caplog.text and "intra_op_threads: checkpoint 1, now 2 (set threads=1 or OMP_NUM_THREADS=1)" in caplog.text
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(resume_runs["losses"][4:]), rtol=1e-4, atol=0)


def _tampered(ckpt: Path, folder: Path, change) -> Path:
    data = torch.load(ckpt, weights_only=True)
    change(data)
    path = folder / "checkpoints" / ckpt.name
    path.parent.mkdir(parents=True)
    torch.save(data, path)
    return path


def _drop_optimizer_state(c):
    c["optimizer_states"][0]["state"] = {}


def _rewind_data(c):
    c["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] = 0


def _reseed_noise(c):
    c["scail2"]["generator_states"] = torch.Generator().manual_seed(123).get_state().to(torch.int32)[None]


@pytest.mark.parametrize("change", [None, _drop_optimizer_state, _rewind_data, _reseed_noise],
                         ids=["intact", "optimizer", "data-order", "noise"])
def test_the_comparison_catches_a_wrong_resume(data_root, resume_runs, tmp_path, change):
    """The bit-exact comparison is sensitive: an intact checkpoint resumed in this process equals the uninterrupted
    run, and one whose optimizer state, data position or noise generator is not restored does not."""
    ckpt = resume_runs["first"].checkpoint_dir / "step=0000004.ckpt"
    if change is not None:
        ckpt = _tampered(ckpt, tmp_path / "tampered", change)
    losses = _resume_here(data_root, tmp_path / "run", ckpt)
    expected = resume_runs["losses"][4:]
    assert len(losses) == len(expected) == 4
    if change is None:
        assert losses == expected
    else:
        assert losses != expected


def test_interrupted_checkpoint_is_never_picked(tmp_path):
    from scail2.lit.checkpoint import AtomicCheckpointIO, find_resume_checkpoint

    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 2}, folder / "step=0000002.ckpt")
    # A save killed mid-write leaves only its temporary name; a sharded one without its metadata is incomplete.
    (folder / ".step=0000004.ckpt.partial").write_bytes(b"\x00" * 10)
    (folder / "step=0000006.ckpt").mkdir()
    (folder / "step=0000006.ckpt" / "__0_0.distcp").write_bytes(b"\x00")
    (folder / "last.ckpt").symlink_to("step=0000002.ckpt")
    assert find_resume_checkpoint([folder]) == folder / "step=0000002.ckpt"
    assert torch.load(folder / "step=0000002.ckpt", weights_only=True) == {"global_step": 2}


def test_ema_weights_are_checkpointed_and_exported(data_root, tmp_path):
    cfg = compose_run(
        data_root, tmp_path, "logger=none", "callbacks=ema", "callbacks.ema.update_starting_at_step=1",
        "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3",
    )
    result = train(cfg)
    ckpt = torch.load(result.checkpoint_dir / "step=0000006.ckpt", weights_only=True)
    assert {"averaging_state", "current_model_state"} <= ckpt.keys()
    ema = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    raw = {k.removeprefix("net."): v for k, v in ckpt["current_model_state"].items()}
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)

    from scail2.models import load_transformer

    exported = load_transformer(result.export_dir).state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in exported)


@pytest.mark.parametrize("source", ["scail2", "wan_i2v"])
def test_init_from_weights(data_root, tmp_path, source):
    from scail2.models import save_pretrained, scail2_config, wan_config
    from scail2.models.loading import build_model, scail2_from_wan_i2v
    from scail2.testing import randomize_

    if source == "scail2":
        model = randomize_(build_model(scail2_config("tiny")), seed=3)
        expected = model.state_dict()
    else:  # a Wan2.1-I2V network (36 input channels): converted on load
        model = randomize_(build_model(wan_config("tiny", in_channels=36)), seed=3)
        expected = scail2_from_wan_i2v(model).state_dict()
    save_pretrained(model, tmp_path / "init")
    cfg = compose_run(data_root, tmp_path, *QUIET, "trainer.max_steps=1", "optim.scheduler.warmup_steps=0", f"module.init_from={tmp_path / 'init'}")
    state = StateAround(0)
    train(cfg, [state])
    assert all(torch.equal(state.before["net"][k], expected[k]) for k in expected)


def test_dpo_run_logs_exports_and_resumes(tmp_path, mlflow_uri):
    """experiment=dpo_demo on a few tiny pairs from a random base: DPO metrics and held-out metrics reach MLflow,
    the export holds the adapters (both layouts) and the merged network as a pipeline folder."""
    from mlflow.tracking import MlflowClient

    from scail2.config import compose_config
    from scail2.lora import read_lora
    from scail2.pipeline import SCAIL2Pipeline

    cfg = compose_config([
        "experiment=dpo_demo", f"paths.output_root={tmp_path}/out", f"paths.data_root={tmp_path}/data", "print_config=false",
        "module.init_from=null", "data.videos=4", "data.frames=5", "data.height=32", "data.width=32", "data.pairs=3",
        "data.heldout_pairs=2", "module.heldout.num_pairs=2", "module.heldout.draws=2", "module.heldout.every_n_steps=2",
        "module.lora.rank=4", "trainer.max_steps=4", "optim.scheduler.warmup_steps=1", "trainer.log_every_n_steps=1", f"logger.tracking_uri={mlflow_uri}",
        "callbacks.checkpoint.every_n_train_steps=2", "trainer.enable_model_summary=false",
    ])  # fmt: skip
    cfg.paths.run_dir = str(tmp_path / "out" / "dpo_demo" / "run")
    result = train(cfg)
    assert [h["step"] for h in result.heldout] == [0, 2, 4]
    assert {"heldout/implicit_accuracy", "trainpairs/implicit_accuracy"} <= set(result.heldout[-1])

    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(result.run_id).data.metrics
    for key in ("train/loss", "train/dpo_loss", "train/sft_loss", "train/implicit_accuracy", "train/reward_margin",
                "train/err_policy_w", "train/err_ref_l", "heldout/implicit_accuracy", "trainpairs/dpo_loss", "perf/tflops_per_device"):
        assert key in metrics, key  # fmt: skip
    assert [m.step for m in client.get_metric_history(result.run_id, "heldout/dpo_loss")] == [0, 2, 4]
    # The held-out hands after training: the adapted network against the base, from the same noise.
    assert "heldout/implicit_accuracy_se" in metrics and "hands/latent_hand_error/dpo" in metrics and "hands/latent_hand_error/base" in metrics
    hands = json.loads((Path(cfg.paths.run_dir) / "hands" / "results.json").read_text())
    assert hands["pairs"] == 2 and set(hands["metrics"]["latent_hand_error"]) == {"dpo", "base", "dispreferred"}
    assert any(line.startswith("Held-out preference pairs: hands (2 pairs") for line in result.reports)
    # The held-out figures and the adapters' hash are on the run, as pretraining's validation figures are.
    from scail2.lit.tracking import sha256_file

    assert client.get_run(result.run_id).data.tags["lora.sha256"] == sha256_file(result.lora_dir / "adapter_model.safetensors")
    history = json.loads(Path(client.download_artifacts(result.run_id, "heldout/history.json", str(tmp_path / "dl"))).read_text())
    assert [h["step"] for h in history] == [0, 2, 4] and history[-1] == pytest.approx(result.heldout[-1])

    state, spec, meta = read_lora(result.lora_dir)
    assert spec.rank == 4 and len(state) == 2 * 10 * 2  # A and B of 10 modules in each of the tiny model's 2 blocks
    assert read_lora(result.export_dir / "lora_comfyui.safetensors")[0].keys() == state.keys()
    assert result.pipeline and result.pipeline_dir == result.export_dir / "merged"
    assert SCAIL2Pipeline.from_pretrained(result.pipeline_dir).transformer.config.is_scail2

    # Resume from the step-2 checkpoint in this process: the same held-out figures at step 4.
    from omegaconf import OmegaConf

    again = OmegaConf.merge(cfg, {"ckpt_path": str(result.checkpoint_dir / "step=0000002.ckpt"), "logger": None, "export": {"enabled": False}})
    again.paths.run_dir = str(tmp_path / "out" / "dpo_demo" / "resumed")
    resumed = train(again)
    assert resumed.heldout[-1] == pytest.approx(result.heldout[-1], rel=1e-5)


def _finished_run(data_root: Path, out: Path, mlflow_uri: str, steps: int = 2):
    common = (f"logger.tracking_uri={mlflow_uri}", "callbacks.checkpoint.every_n_train_steps=2", "optim.scheduler.warmup_steps=0")
    return common, train(compose_run(data_root, out, *common, f"trainer.max_steps={steps}"))


def test_resume_of_a_finished_run_trains_nothing_and_says_so(data_root, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from scail2.train import summary

    common, first = _finished_run(data_root, tmp_path, mlflow_uri)
    client = MlflowClient(mlflow_uri)
    before = client.get_run(first.run_id)
    again = train(compose_run(data_root, tmp_path, *common, "trainer.max_steps=2", "ckpt_path=last", run="again"))
    assert again.nothing_to_train is not None and again.global_step == again.start_step == 2
    text = summary(again)
    assert text.strip().startswith("Nothing to train: the checkpoint") and "is at step 2 and trainer.max_steps is 2" in text
    assert f"MLflow run {first.run_id} is unchanged" in text and "raise trainer.max_steps" in text
    after = client.get_run(first.run_id)
    assert after.info.status == "FINISHED" and after.data.tags == before.data.tags and after.data.metrics == before.data.metrics
    assert not (tmp_path / "demo" / "again").exists()  # nothing was built or written


class _Fail(LossRecorder):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("the machine went away")


def test_failed_resume_keeps_the_finished_run_finished(data_root, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from scail2.config import ConfigError

    common, first = _finished_run(data_root, tmp_path, mlflow_uri)
    client = MlflowClient(mlflow_uri)
    # Refused before MLflow is touched: a checkpoint DeepSpeed cannot read, named with the strategy that wrote it.
    cfg = compose_run(data_root, tmp_path, *common, "trainer.max_steps=4", "ckpt_path=last", "strategy=deepspeed_zero2", run="ds")
    with pytest.raises(ConfigError, match=r"written by strategy=single \(a single file\), which strategy=deepspeed_zero2 cannot load"):
        train(cfg)
    assert "resumed" not in client.get_run(first.run_id).data.tags
    # A resume that fails while training leaves the finished run FINISHED, with the failure as a tag.
    cfg = compose_run(data_root, tmp_path, *common, "trainer.max_steps=4", "ckpt_path=last", run="crash")
    with pytest.raises(RuntimeError, match="the machine went away"):
        train(cfg, [_Fail()])
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.failed"] == "RuntimeError: the machine went away"
