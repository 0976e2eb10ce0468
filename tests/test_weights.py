"""Weights: parity with diffusers, every on-disk layout, strict key checking, I2V initialisation."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from scail2.models import (
    CheckpointError,
    SCAIL2Transformer,
    WanModel,
    load_transformer,
    save_pretrained,
    scail2_config,
    scail2_from_wan_i2v,
    wan_config,
)
from scail2.models.convert import wan_to_diffusers
from scail2.models.loading import detect_layout, read_state_dict
from scail2.testing import random_scail2_batch, randomize_


class Payload:
    """An arbitrary class: unpickling it would run code of the file's choosing."""


def tiny_diffusers(image: bool) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36 if image else 16,
        out_channels=16,
        text_dim=20,
        freq_dim=16,
        ffn_dim=40,
        num_layers=2,
        image_dim=24 if image else None,
        added_kv_proj_dim=24 if image else None,
    )
    return randomize_(model, std=0.1).eval()


def diffusers_inputs(model: WanTransformer3DModel, image: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.config.in_channels, 3, 8, 12, generator=g)
    t = torch.tensor([999.0, 17.0])
    # diffusers splits text from image tokens at len - 512, so the text must be padded to 512 tokens.
    ctx = torch.randn(2, 512, 20, generator=g)
    clip = torch.randn(2, 257, 24, generator=g) if image else None
    return x, t, ctx, clip


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_parity_with_diffusers_through_save_and_load(tmp_path, image):
    ref_model = tiny_diffusers(image)
    ref_model.save_pretrained(tmp_path / "diffusers")
    ours = load_transformer(tmp_path / "diffusers").eval()
    assert type(ours) is WanModel and ours.config.in_channels == (36 if image else 16)
    assert (ours.config.image_dim is not None) == image
    x, t, ctx, clip = diffusers_inputs(ref_model, image)
    with torch.no_grad():
        expect = ref_model(x, t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]
        got = ours(x, t, ctx, clip)
    assert (got - expect).abs().max() <= 1e-5

    # The same weights under the original Wan2.1 names and config.json load to the same model.
    wan_dir = tmp_path / "wan"
    wan_dir.mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, wan_dir / "diffusion_pytorch_model.safetensors")
    (wan_dir / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": 24, "ffn_dim": 40, "freq_dim": 16, "in_dim": ours.config.in_channels,
        "model_type": "i2v" if image else "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 16, "text_len": 512, "eps": 1e-6,
    }))
    again = load_transformer(wan_dir).eval()
    assert again.config == ours.config
    with torch.no_grad():
        assert torch.equal(again(x, t, ctx, clip), got)


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_export_to_diffusers_layout_loads_in_diffusers(tmp_path, image):
    ref_model = tiny_diffusers(image)
    ref_model.save_pretrained(tmp_path / "src")
    ours = load_transformer(tmp_path / "src")
    save_pretrained(ours, tmp_path / "out", layout="diffusers")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    for k, v in ref_model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_scail2_round_trip_sharded_and_bf16(tmp_path):
    model = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    save_pretrained(model, tmp_path / "m", max_shard_size=50_000)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
    loaded = load_transformer(tmp_path / "m")
    assert type(loaded) is SCAIL2Transformer and loaded.config == model.config
    inputs, cond = random_scail2_batch(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs.as_kwargs(), **cond), model(**inputs.as_kwargs(), **cond))
    half = load_transformer(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # Saving again over the same folder replaces the shards instead of mixing old and new ones.
    save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_official_scail2_wan_layout_single_file(tmp_path):
    """Official SCAIL-2 weights: Wan names plus pose/mask embeddings, e.g. a bare safetensors or .pt file."""
    model = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "scail2.safetensors")
    torch.save({"module": state}, tmp_path / "scail2.pt")
    cfg = json.dumps({"dim": 64, "num_heads": 2, "num_layers": 2, "ffn_dim": 128, "in_dim": 20, "out_dim": 16})
    (tmp_path / "config.json").write_text(cfg)
    for name in ("scail2.safetensors", "scail2.pt"):
        loaded = load_transformer(tmp_path / name)
        assert type(loaded) is SCAIL2Transformer
        assert loaded.config == model.config
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k])


def test_strict_loading_lists_missing_unexpected_and_mismatched(tmp_path):
    model = SCAIL2Transformer(scail2_config("tiny"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["blocks.1.ffn.2.bias"]
    state["blocks.0.self_attn.extra.weight"] = torch.zeros(1)
    state["head.modulation"] = torch.zeros(1, 3, 64)
    save_file(state, tmp_path / "bad.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}))
    with pytest.raises(CheckpointError) as err:
        load_transformer(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1): ['blocks.1.ffn.2.bias']" in msg
    assert "unexpected keys (1): ['blocks.0.self_attn.extra.weight']" in msg
    assert "head.modulation: checkpoint (1, 3, 64) vs model (1, 2, 64)" in msg


def test_unsafe_and_unknown_files_are_refused(tmp_path):
    # Any object outside the weights_only allow-list must be refused, never unpickled.
    torch.save({"weights": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_transformer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected diffusion_pytorch_model.safetensors"):
        load_transformer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="unrecognised transformer weights"):
        detect_layout({"encoder.layer.0.weight"})


def test_scail2_from_wan_i2v():
    i2v = randomize_(WanModel(wan_config("tiny", in_channels=36)))
    model = scail2_from_wan_i2v(i2v).eval()
    assert model.config.in_channels == 20 and model.config.mask_channels == 28
    w = i2v.patch_embedding.weight
    assert torch.equal(model.patch_embedding.weight, w[:, :20])
    assert torch.equal(model.patch_embedding_pose.weight, w[:, :20])
    assert model.patch_embedding_mask.weight.abs().sum() == 0 and model.patch_embedding_mask.bias.abs().sum() == 0
    shared = [k for k in i2v.state_dict() if k != "patch_embedding.weight"]
    for k in shared:
        assert torch.equal(model.state_dict()[k], i2v.state_dict()[k]), k
    # With the zero mask embedding, the masks do not change the output at initialisation.
    inputs, cond = random_scail2_batch(model.config)
    inputs2 = type(inputs)(**{**inputs.as_kwargs(), "driving_mask": torch.rand_like(inputs.driving_mask)})
    with torch.no_grad():
        assert torch.equal(model(**inputs.as_kwargs(), **cond), model(**inputs2.as_kwargs(), **cond))
    with pytest.raises(ValueError, match="expected a Wan2.1-I2V model"):
        scail2_from_wan_i2v(WanModel(wan_config("tiny", image_dim=None)))


def test_diffusers_keys_without_config_are_detected(tmp_path):
    ref_model = tiny_diffusers(True)
    save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, tmp_path / "d.safetensors")
    # No config: heads default to head_dim 128, which a 24-wide model cannot have -> clear error, or
    # a config.json next to the file resolves it.
    with pytest.raises(ValueError, match='cannot infer the head count of a dim=24 model.*"num_heads"'):
        load_transformer(tmp_path / "d.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(ref_model.config)))
    assert load_transformer(tmp_path / "d.safetensors").config.num_heads == 2


def test_wan_to_diffusers_is_inverse():
    model = WanModel(wan_config("tiny", in_channels=36))
    from scail2.models.convert import diffusers_to_wan

    state = model.state_dict()
    assert diffusers_to_wan(wan_to_diffusers(state)).keys() == state.keys()
    with pytest.raises(KeyError, match="cannot be written in diffusers layout"):
        wan_to_diffusers(SCAIL2Transformer(scail2_config("tiny")).state_dict())


def test_released_sat_training_checkpoint(tmp_path):
    """The SCAIL-2 release: a torch.save dict with 'module' (SAT names, fused qkv) and RNG states."""
    import numpy as np

    from scail2.models.convert_sat import wan_to_sat

    model = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    ckpt = {
        "iteration": 3500,
        "module": wan_to_sat(model.state_dict()),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    folder = tmp_path / "model" / "1"
    folder.mkdir(parents=True)
    torch.save(ckpt, folder / "fsdp2_rank_0000_checkpoint.pt")
    (folder / "config.json").write_text(json.dumps({"num_heads": 2}))
    loaded = load_transformer(folder / "fsdp2_rank_0000_checkpoint.pt")
    assert type(loaded) is SCAIL2Transformer and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ------------------------------------------------------------------------------- the official release files
def _release_sat(tmp_path):
    from tests.release_replica import mt19937_key, release_config, save_sat_checkpoint

    model = randomize_(SCAIL2Transformer(release_config()))
    root = tmp_path / "SCAIL-2"
    path = save_sat_checkpoint(model, root, iteration=1, rng_key=mt19937_key(3))
    return model, root, path


def test_sat_checkpoint_pickled_under_numpy1_loads(tmp_path):
    """The NumPy RNG state is written with NumPy 1's module paths (numpy.core.multiarray._reconstruct, ...),
    as in the released file; the narrow allow-list admits exactly what it needs."""
    import zipfile

    import numpy as np

    from scail2.utils.torch_files import load_torch_file
    from tests.release_replica import mt19937_key

    model, root, path = _release_sat(tmp_path)
    with zipfile.ZipFile(path) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in pkl and b"numpy._core" not in pkl
    with pytest.raises(Exception, match="_reconstruct"):  # plain weights_only loading refuses it
        torch.load(path, weights_only=True)
    loaded = load_transformer(path)
    assert type(loaded) is SCAIL2Transformer and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    state = load_torch_file(path)["np_rng_state"]
    assert state[0] == "MT19937" and state[2:] == (624, 0, 0.0)
    assert state[1].dtype == np.uint32 and state[1].tolist() == mt19937_key(3)
    # the release root and its model/ folder resolve to model/<latest>/fsdp2_rank_0000_checkpoint.pt
    for where in (root, root / "model", path.parent):
        assert torch.equal(load_transformer(where).head.head.weight, model.head.head.weight)


def test_sat_checkpoint_without_numpy_skips_the_rng_state(tmp_path, monkeypatch, caplog):
    from scail2.utils import torch_files

    model, _, path = _release_sat(tmp_path)
    monkeypatch.setattr(torch_files, "_import_numpy", lambda: None)  # as if NumPy were not installed
    with caplog.at_level("WARNING"):
        obj = torch_files.load_torch_file(path)
    assert isinstance(obj["np_rng_state"][1], torch_files.SkippedNumpyObject)
    assert "without NumPy" in caplog.text and "np_rng_state" in caplog.text
    assert torch.equal(load_transformer(path).blocks[0].self_attn.q.weight, model.blocks[0].self_attn.q.weight)


@pytest.mark.parametrize("numpy_installed", [True, False])
def test_pickles_that_run_code_are_still_refused(tmp_path, monkeypatch, numpy_installed):
    from scail2.utils import torch_files
    from tests.release_replica import Raw, numpy1_array, op_global, op_str, save_with_raw

    if not numpy_installed:
        monkeypatch.setattr(torch_files, "_import_numpy", lambda: None)
    sentinel = tmp_path / "ran"
    object_array = numpy1_array([1, 2], "u4").replace(op_str("u4"), op_str("O"))
    payloads = {
        "os.system": op_global("os", "system") + op_str(f"touch {sentinel}") + b"\x85R",
        "posix.system": op_global("posix", "system") + op_str(f"touch {sentinel}") + b"\x85R",
        "builtins.exec": op_global("builtins", "exec") + op_str(f"open({str(sentinel)!r}, 'w')") + b"\x85R",
        "numpy runstring": op_global("numpy.testing._private.utils", "runstring")
        + op_str(f"open({str(sentinel)!r}, 'w')") + b"}\x86R",
    }
    if numpy_installed:  # without NumPy nothing of it is built: the placeholder skips it like any NumPy object
        payloads["numpy object dtype"] = object_array
    for name, opcodes in payloads.items():
        path = save_with_raw({"module": {"w": torch.ones(1)}, "np_rng_state": Raw(opcodes)}, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        message = str(err.value)
        assert str(path) in message and "zip-format torch.save file" in message and "What loads" in message, name
        assert not sentinel.exists(), name


def test_refused_files_name_the_format_found(tmp_path):
    lfs = tmp_path / "fsdp2_rank_0000_checkpoint.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 65000000000\n")
    with pytest.raises(CheckpointError, match=r"Git LFS pointer.*git lfs pull"):
        load_transformer(lfs)
    html = tmp_path / "weights.pth"
    html.write_text("<!DOCTYPE html><html>Sign in</html>")
    with pytest.raises(CheckpointError, match=r"weights.pth should hold transformer weights but is an HTML"):
        load_transformer(html)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_transformer(empty)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"a GGUF file.*load from \.safetensors"):
        load_transformer(gguf)
    (tmp_path / "release" / "model" / "1").mkdir(parents=True)
    (tmp_path / "release" / "model" / "latest").write_text("1")
    with pytest.raises(CheckpointError, match=r"latest names iteration '1' but .* holds none of"):
        load_transformer(tmp_path / "release")


def test_broken_safetensors_are_named(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors \(a Git LFS pointer"):
        load_transformer(folder)
    with pytest.raises(CheckpointError, match=r"cannot be read as safetensors"):
        read_state_dict(folder)
