"""LoRA adapters in SCAIL2Pipeline and scail2-animate: strict loading of both file layouts, scale, merge, unload."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scail2.cli.animate import main
from scail2.data.video import read_video, write_image, write_video
from scail2.lora import LoRASpec, add_lora, lora_layers, lora_state_dict, merge_lora, read_lora, save_lora
from scail2.models import SCAIL2Transformer, scail2_config
from scail2.pipeline import LoadedLoRA, SCAIL2Pipeline, prepare_inputs
from scail2.pipeline.tiny import save_tiny_pipeline
from scail2.testing import random_scail2_batch, randomize_

RANK = 4


def make_adapter(transformer: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy of ``transformer`` with rank-4 adapters whose up-projections are non-zero (so they change outputs)."""
    model = add_lora(copy.deepcopy(transformer), LoRASpec(rank=RANK))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def save_both(model: torch.nn.Module, folder) -> dict[str, object]:
    spec = LoRASpec(rank=RANK)
    return {
        "peft": save_lora(model, spec, folder / "lora", layout="peft"),
        "comfyui": save_lora(model, spec, folder / "lora_comfyui.safetensors", layout="comfyui"),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("lora_pipe") / "model")


@pytest.fixture(scope="module")
def base_pipe(root):
    return SCAIL2Pipeline.from_pretrained(root)


@pytest.fixture(scope="module")
def source(base_pipe):
    """The 'trained' adapted transformer the files are written from."""
    return make_adapter(base_pipe.transformer)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    return save_both(source, tmp_path_factory.mktemp("lora_files"))


def fresh(base_pipe, transformer=None) -> SCAIL2Pipeline:
    """A pipeline with its own copy of the transformer (the encoders are shared: nothing here changes them)."""
    t = copy.deepcopy(base_pipe.transformer if transformer is None else transformer)
    return SCAIL2Pipeline(t, base_pipe.vae, base_pipe.text_encoder, base_pipe.image_encoder, base_pipe.scheduler)


@torch.no_grad()
def velocity(model: torch.nn.Module) -> torch.Tensor:
    inputs, cond = random_scail2_batch(model.config, batch=1, frames=2, height=4, width=4, seed=3)
    return model(**inputs.as_kwargs(), **cond).float()


@pytest.fixture(scope="module")
def base_velocity(base_pipe):
    return velocity(base_pipe.transformer)


@pytest.fixture(scope="module")
def prepared():
    rng = np.random.default_rng(0)
    return prepare_inputs(
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
        height=32,
        width=32,
    )


def generate(pipe, prepared) -> torch.Tensor:
    out = pipe.generate(prepared, num_inference_steps=2, guidance_scale=1.0, seed=0, output_type="pt", progress=False)
    return out.frames


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * scale, (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("layout", ["peft", "comfyui"])
def test_every_key_loads_without_warnings_and_changes_the_output(base_pipe, source, files, base_velocity, layout):
    pipe = fresh(base_pipe)
    pipe.transformer.eval().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe.load_lora(files[layout]) is pipe
    saved, _, _ = read_lora(files[layout])
    loaded = lora_state_dict(pipe.transformer)
    assert set(loaded) == set(saved) == set(lora_state_dict(source)) and len(loaded) == 2 * 10 * 2
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert pipe.lora_loaded == LoadedLoRA(files[layout], 1.0, False, RANK, float(RANK))
    assert not pipe.transformer.training and not any(m.training for m in pipe.transformer.modules())
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    v = velocity(pipe.transformer)
    assert not torch.allclose(v, base_velocity, atol=1e-3)
    assert_close(v, velocity(source), rel=1e-6)


def test_peft_and_comfyui_files_give_identical_videos_unlike_the_base(base_pipe, files, prepared):
    base = generate(base_pipe, prepared)
    peft = generate(fresh(base_pipe).load_lora(files["peft"]), prepared)
    comfy = generate(fresh(base_pipe).load_lora(files["comfyui"]), prepared)
    assert torch.equal(peft, comfy)
    assert (peft - base).abs().mean() > 1e-3


def test_scale_zero_is_the_base_and_unload_restores_it_exactly(base_pipe, files, base_velocity):
    pipe = fresh(base_pipe).load_lora(files["peft"], scale=0.0)
    assert torch.equal(velocity(pipe.transformer), base_velocity)
    pipe.unload_lora().load_lora(files["peft"], scale=0.5)
    half = velocity(pipe.transformer)
    full = velocity(fresh(base_pipe).load_lora(files["peft"]).transformer)
    assert not torch.allclose(half, base_velocity, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)
    assert all(layer.scaling["default"] == 0.5 for layer in lora_layers(pipe.transformer).values())
    assert pipe.unload_lora() is pipe and pipe.lora_loaded is None
    assert not lora_layers(pipe.transformer)
    base_state = base_pipe.transformer.state_dict()
    state = pipe.transformer.state_dict()
    assert set(state) == set(base_state) and all(torch.equal(state[k], base_state[k]) for k in state)
    assert torch.equal(velocity(pipe.transformer), base_velocity)
    pipe.unload_lora()  # nothing loaded: a no-op


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_matches_unmerged_and_cannot_be_unloaded(base_pipe, files, scale):
    unmerged = velocity(fresh(base_pipe).load_lora(files["peft"], scale=scale).transformer)
    pipe = fresh(base_pipe).load_lora(files["comfyui"], scale=scale, merge=True)
    assert not lora_layers(pipe.transformer)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert pipe.lora_loaded.merged and pipe.lora_loaded.scale == scale
    assert_close(velocity(pipe.transformer), unmerged)
    with pytest.raises(ValueError, match="merged into the transformer's weights and cannot be removed"):
        pipe.unload_lora()
    with pytest.raises(ValueError, match="is merged into the transformer; load the pipeline again"):
        pipe.load_lora(files["peft"])


def test_adapter_equals_the_dpo_style_merged_transformer(base_pipe, source, files):
    merged = merge_lora(copy.deepcopy(source)).eval()  # what the DPO export writes to <export>/merged
    assert_close(velocity(fresh(base_pipe).load_lora(files["peft"]).transformer), velocity(merged))


def test_one_adapter_at_a_time(base_pipe, files):
    pipe = fresh(base_pipe).load_lora(files["peft"])
    with pytest.raises(ValueError, match=r"call unload_lora\(\) first"):
        pipe.load_lora(files["comfyui"])
    pipe.unload_lora().load_lora(files["comfyui"])
    assert pipe.lora_loaded.path == files["comfyui"]


def test_from_pretrained_with_lora(root, base_pipe, files):
    pipe = SCAIL2Pipeline.from_pretrained(root, lora=files["comfyui"], lora_scale=0.5)
    assert pipe.lora_loaded == LoadedLoRA(files["comfyui"], 0.5, False, RANK, float(RANK))
    reference = fresh(base_pipe).load_lora(files["peft"], scale=0.5)
    assert torch.equal(velocity(pipe.transformer), velocity(reference.transformer))


def test_save_pretrained_needs_a_merged_adapter(base_pipe, files, tmp_path):
    pipe = fresh(base_pipe).load_lora(files["peft"])
    with pytest.raises(ValueError, match="unmerged LoRA adapter"):
        pipe.save_pretrained(tmp_path / "out")
    pipe.unload_lora().load_lora(files["peft"], merge=True)
    pipe.save_pretrained(tmp_path / "out")
    reloaded = SCAIL2Pipeline.from_pretrained(tmp_path / "out")
    assert torch.equal(velocity(reloaded.transformer), velocity(pipe.transformer))


def test_dtype_and_device_follow_the_transformer(base_pipe, files, tmp_path, prepared):
    # An adapter trained on an fp32 copy of bf16 weights (bf16-mixed training) loads into the bf16 model: the base
    # check compares the weights in the dtype the adapter was trained on.
    bf16 = copy.deepcopy(base_pipe.transformer).to(torch.bfloat16)
    path = save_lora(make_adapter(copy.deepcopy(bf16).float()), LoRASpec(rank=RANK), tmp_path / "lora")
    pipe = fresh(base_pipe, bf16).load_lora(path)
    layers = lora_layers(pipe.transformer)
    assert layers and all(
        p.dtype == torch.bfloat16 and p.device.type == "cpu" for layer in layers.values() for p in layer.parameters()
    )
    # Full-precision weights rounded to bf16 are other weights as far as the hash can tell.
    pipe.unload_lora()
    with pytest.raises(ValueError, match="another dtype of it"):
        pipe.load_lora(files["peft"])
    pipe.load_lora(files["peft"], check_base=False)
    assert lora_state_dict(pipe.transformer)["blocks.0.ffn.0.lora_B.weight"].dtype == torch.bfloat16
    # The bf16 transformer with its bf16 adapter samples (the fp32 LayerNorms accept bf16 affine weights), close
    # to the fp32 pipeline with the same adapter.
    full = fresh(base_pipe).load_lora(files["peft"])
    got, want = generate(pipe, prepared), generate(full, prepared)
    assert torch.isfinite(got).all() and got.shape == want.shape
    assert (got.float() - want.float()).abs().mean() < 5e-3  # measured 8e-4 (outputs average 0.17)


# ------------------------------------------------------------------------------------------------ refusals
def _untouched(pipe, base_pipe):
    assert pipe.lora_loaded is None and not lora_layers(pipe.transformer)
    assert set(pipe.transformer.state_dict()) == set(base_pipe.transformer.state_dict())


def test_wrong_base_is_refused_unless_asked(base_pipe, files):
    other = randomize_(SCAIL2Transformer(scail2_config("tiny")), seed=5).eval().requires_grad_(False)
    pipe = fresh(base_pipe, other)
    for path in files.values():
        with pytest.raises(ValueError, match="was trained on base weights") as err:
            pipe.load_lora(path)
        assert str(path) in str(err.value)
        assert pipe.lora_loaded is None and not lora_layers(pipe.transformer)
    pipe.load_lora(files["peft"], check_base=False)
    assert pipe.lora_loaded is not None


def test_other_geometry_is_refused_with_the_mismatch(base_pipe, tmp_path):
    wide = randomize_(SCAIL2Transformer(scail2_config("tiny", dim=96, num_heads=2)))
    paths = save_both(make_adapter(wide), tmp_path / "wide")
    pipe = fresh(base_pipe)
    for path in paths.values():
        with pytest.raises(ValueError, match="does not fit this model") as err:
            pipe.load_lora(path, check_base=False)
        assert str(path) in str(err.value) and "lora_A (4, 96)" in str(err.value) and "64 -> 64" in str(err.value)
        _untouched(pipe, base_pipe)
    deep = randomize_(SCAIL2Transformer(scail2_config("tiny", num_layers=3)))
    path = save_lora(make_adapter(deep), LoRASpec(rank=RANK), tmp_path / "deep")
    with pytest.raises(ValueError, match=r"10 adapted layer\(s\) the model does not have, e\.g\. \['blocks\.2\."):
        pipe.load_lora(path)
    _untouched(pipe, base_pipe)


def test_missing_or_inconsistent_keys_are_refused(base_pipe, files, tmp_path):
    file = files["peft"] / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    pipe = fresh(base_pipe)
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    save_file(partial, tmp_path / "partial.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"no weights for 10 layer\(s\)"):
        pipe.load_lora(tmp_path / "partial.safetensors")
    _untouched(pipe, base_pipe)
    bad_rank = dict(state)
    bad_rank["blocks.0.ffn.0.lora_B.weight"] = torch.zeros(128, 8)
    save_file(bad_rank, tmp_path / "bad_rank.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0: lora_A \(4, 64\) and lora_B \(128, 8\)"):
        pipe.load_lora(tmp_path / "bad_rank.safetensors")
    _untouched(pipe, base_pipe)


def test_missing_file_names_the_path(base_pipe, tmp_path):
    pipe = fresh(base_pipe)
    for path in (tmp_path / "nothing.safetensors", tmp_path):
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            pipe.load_lora(path)
    _untouched(pipe, base_pipe)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_cli")
    rng = np.random.default_rng(0)
    write_image(folder / "ref.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    write_video(folder / "driving.mp4", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), fps=12)
    return folder


def _cli(root, media, out, *extra):
    return main(["--model", str(root), "--ref", str(media / "ref.png"), "--driving", str(media / "driving.mp4"),
                 "--height", "32", "--width", "32", "--steps", "2", "--guidance", "1", "--seed", "0",
                 "--no-progress", "--device", "cpu", "--out", str(out), *extra])


def test_cli_lora_changes_the_video(root, media, files, tmp_path, capsys):
    assert _cli(root, media, tmp_path / "base.mp4") == 0
    assert _cli(root, media, tmp_path / "lora.mp4", "--lora", str(files["peft"])) == 0
    assert "LoRA" in capsys.readouterr().out
    assert _cli(root, media, tmp_path / "merged.mp4", "--lora", str(files["comfyui"]), "--merge-lora") == 0
    base, lora, merged = (read_video(tmp_path / f"{n}.mp4").astype(np.float32) for n in ("base", "lora", "merged"))
    assert base.shape == lora.shape == (5, 32, 32, 3)
    assert np.abs(lora - base).mean() > 1.0
    assert np.abs(merged - lora).mean() < 0.5 * np.abs(lora - base).mean()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "{tmp}/missing"], "--lora {tmp}/missing does not exist"),
        (["--lora", "{tmp}"], "is a folder without adapter_model.safetensors"),
        (["--lora-scale", "0.5"], "--lora-scale needs --lora PATH"),
        (["--lora", "{wrong}"], "cannot load the LoRA adapter {wrong}: {wrong} was trained on base weights"),
    ],
)
def test_cli_lora_errors_exit_2(root, media, base_pipe, tmp_path, capsys, extra, message):
    wrong = save_lora(make_adapter(randomize_(SCAIL2Transformer(scail2_config("tiny")), seed=5)), LoRASpec(rank=RANK),
                      tmp_path / "wrong.safetensors", layout="comfyui")
    fill = {"tmp": tmp_path, "wrong": wrong}
    assert _cli(root, media, tmp_path / "out.mp4", *[e.format(**fill) for e in extra]) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------------- released and third-party files
def _merged_velocity(base_pipe, pairs, deltas=None, lora_scale=1.0, delta_scale=1.0):
    from tests.release_replica import merged_state

    reference = copy.deepcopy(base_pipe.transformer)
    reference.load_state_dict(merged_state(reference, pairs, deltas, lora_scale, delta_scale))
    return velocity(reference)


def test_released_dpo_lora_container_loads_as_released(base_pipe, base_velocity, tmp_path, capsys, root, media):
    """bias-aware-dpo-lora.pt: SAT names, fused-projection sub-LoRAs, module wrapper, NumPy-1 RNG state; no
    conversion step, applied as W += up @ down (alpha 1)."""
    from tests.release_replica import random_lora_pairs, save_sat_dpo_lora

    pairs = random_lora_pairs(base_pipe.transformer, rank=RANK, seed=2)
    path = save_sat_dpo_lora(pairs, tmp_path / "model" / "bias-aware-dpo-lora.pt")
    pipe = fresh(base_pipe).load_lora(path)
    assert pipe.lora_loaded == LoadedLoRA(path, 1.0, False, RANK, float(RANK))
    assert len(lora_layers(pipe.transformer)) == 10 * len(pipe.transformer.blocks)
    v = velocity(pipe.transformer)
    assert not torch.allclose(v, base_velocity, atol=1e-3)
    assert_close(v, _merged_velocity(base_pipe, pairs), rel=1e-5)
    # the same factors with Wan names, without the diffusion_model. prefix and without alpha keys
    bare = {}
    for name, (down, up) in pairs.items():
        bare[f"{name}.lora_down.weight"], bare[f"{name}.lora_up.weight"] = down, up
    save_file(bare, str(tmp_path / "bare.safetensors"))
    assert_close(velocity(fresh(base_pipe).load_lora(tmp_path / "bare.safetensors").transformer), v, rel=1e-6)
    # and straight from the command line
    assert _cli(root, media, tmp_path / "dpo.mp4", "--lora", str(path)) == 0
    assert f"LoRA {path}: rank {RANK}, scale 1" in capsys.readouterr().out


def _lightx2v_file(base_pipe, path):
    """A lightx2v-style step-distill LoRA: diffusion_model. prefix, lora_down/lora_up/alpha on the block linears
    (k_img / v_img too), diff_b for their biases, diff for norms and modulations, and a 36-channel
    patch_embedding delta meant for Wan2.1-I2V."""
    from tests.release_replica import random_lora_pairs

    t = base_pipe.transformer
    modules = ("self_attn.q", "self_attn.o", "cross_attn.k", "cross_attn.k_img", "ffn.0", "ffn.2")
    pairs = random_lora_pairs(t, rank=RANK, seed=4, modules=modules)
    g = torch.Generator().manual_seed(5)
    deltas = {}
    for i in range(len(t.blocks)):
        for name in (f"blocks.{i}.ffn.0.bias", f"blocks.{i}.cross_attn.k_img.bias", f"blocks.{i}.norm3.weight",
                     f"blocks.{i}.norm3.bias", f"blocks.{i}.modulation", f"blocks.{i}.self_attn.norm_q.weight"):
            deltas[name] = torch.randn(t.get_parameter(name).shape, generator=g) * 0.05
    deltas["head.head.bias"] = torch.randn(t.head.head.bias.shape, generator=g) * 0.05
    deltas["patch_embedding.bias"] = torch.randn(t.patch_embedding.bias.shape, generator=g) * 0.05
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"diffusion_model.{name}.lora_down.weight"] = down
        tensors[f"diffusion_model.{name}.lora_up.weight"] = up
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(float(RANK))
    for name, delta in deltas.items():
        module, _, kind = name.rpartition(".")
        if kind == "modulation":
            module, kind = name, "weight"
        suffix = "diff_b" if kind == "bias" else "diff"
        tensors[f"diffusion_model.{module}.{suffix}"] = delta
    dim = t.patch_embedding.weight.shape[0]
    tensors["diffusion_model.patch_embedding.diff"] = torch.randn(dim, 36, 1, 2, 2, generator=g)
    save_file(tensors, str(path))
    return pairs, deltas


def test_lightx2v_lora_with_weight_deltas(base_pipe, base_velocity, tmp_path, caplog, prepared):
    pairs, deltas = _lightx2v_file(base_pipe, tmp_path / "lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors")
    path = tmp_path / "lightx2v_I2V_14B_480p_cfg_step_distill_rank4_bf16.safetensors"
    with caplog.at_level("WARNING"):
        pipe = fresh(base_pipe).load_lora(path)
    assert "patch_embedding.weight (the file's patch embedding reads 36 input channels, this model 20" in caplog.text
    assert pipe.lora_loaded.deltas == len(deltas) and pipe.lora_loaded.rank == RANK
    assert_close(velocity(pipe.transformer), _merged_velocity(base_pipe, pairs, deltas), rel=1e-5)
    pipe.unload_lora()
    assert torch.equal(velocity(pipe.transformer), base_velocity)  # the stored weights come back bit for bit
    half = fresh(base_pipe).load_lora(path, scale=0.5)
    assert_close(velocity(half.transformer), _merged_velocity(base_pipe, pairs, deltas, 0.5, 0.5), rel=1e-5)
    merged = fresh(base_pipe).load_lora(path, merge=True)
    assert not any(".parametrizations." in n for n, _ in merged.transformer.named_parameters())
    assert_close(velocity(merged.transformer), _merged_velocity(base_pipe, pairs, deltas), rel=1e-5)
    with pytest.raises(ValueError, match="unmerged LoRA adapter"):
        fresh(base_pipe).load_lora(path).save_pretrained(tmp_path / "saved")
    # a delta for a tensor the model lacks, or of another shape, is refused before anything changes
    from safetensors.torch import load_file

    broken = load_file(str(path))
    broken["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    pipe = fresh(base_pipe)
    with pytest.raises(ValueError, match=r"blocks.0.norm3.weight: delta \(3,\) vs model \(64,\)"):
        pipe.load_lora(tmp_path / "broken.safetensors")
    _untouched(pipe, base_pipe)


def test_distilled_lora_preset_is_the_documented_recipe():
    from scail2.pipeline.presets import SAMPLING_PRESETS

    distill = SAMPLING_PRESETS["lightx2v-distill"]
    assert distill.generate_kwargs() == {"num_inference_steps": 8, "guidance_scale": 1.0, "shift": 1.0}
    assert distill.lora_scale == 1.0 and distill.scheduler == "unipc"
    default = SAMPLING_PRESETS["default"]
    assert default.generate_kwargs() == {"num_inference_steps": 40, "guidance_scale": 5.0, "shift": 5.0}
