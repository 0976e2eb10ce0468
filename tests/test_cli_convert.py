import pytest
import torch

from scail2.cli.convert import main
from scail2.models import SCAIL2Transformer, WanModel, load_transformer, save_pretrained, scail2_config, wan_config
from scail2.models.convert_sat import wan_to_sat
from scail2.testing import randomize_


def test_convert_sat_to_scail2_bf16(tmp_path, capsys):
    model = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    torch.save({"module": wan_to_sat(model.state_dict())}, tmp_path / "ckpt.pt")
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--dtype", "bf16", "--num-heads", "2"]) == 0
    assert "wrote SCAIL2Transformer" in capsys.readouterr().out
    loaded = load_transformer(tmp_path / "out")
    assert loaded.patch_embedding_mask.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.head.modulation, model.head.modulation.to(torch.bfloat16))


def test_convert_i2v_to_scail2_init_and_to_diffusers(tmp_path):
    save_pretrained(randomize_(WanModel(wan_config("tiny", in_channels=36))), tmp_path / "i2v")
    assert main([str(tmp_path / "i2v"), str(tmp_path / "init"), "--init-scail2-from-i2v"]) == 0
    assert type(load_transformer(tmp_path / "init")) is SCAIL2Transformer
    assert main([str(tmp_path / "i2v"), str(tmp_path / "diff"), "--to", "diffusers"]) == 0
    from diffusers import WanTransformer3DModel

    assert WanTransformer3DModel.from_pretrained(tmp_path / "diff").config.in_channels == 36


def test_convert_errors_are_reported(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    save_pretrained(SCAIL2Transformer(scail2_config("tiny")), tmp_path / "s")
    assert main([str(tmp_path / "s"), str(tmp_path / "d"), "--to", "diffusers"]) == 1
    assert "no diffusers layout" in capsys.readouterr().err


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_convert_release_root_streams_and_never_writes_into_the_source(tmp_path, capsys):
    from scail2.models.loading import convert_checkpoint
    from tests.release_replica import release_config, save_sat_checkpoint

    model = randomize_(SCAIL2Transformer(release_config()))
    root = tmp_path / "SCAIL-2"
    save_sat_checkpoint(model, root)
    (root / "Wan2.1_VAE.pth").write_bytes(b"vae")
    before = _snapshot(root)
    assert main([str(root), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    assert "wrote SCAIL2Transformer" in capsys.readouterr().out
    assert _snapshot(root) == before  # nothing added, changed or removed in the release
    loaded = load_transformer(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k
    # small shards: several files + an index, identical tensors to the in-memory path, fp32 kept
    out, cfg = convert_checkpoint(root, tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert cfg == model.config
    sharded = load_transformer(out)
    for k, v in model.state_dict().items():
        assert torch.equal(sharded.state_dict()[k], v), k
    # the output may not go into the release
    assert main([str(root), str(root / "converted")]) == 1
    assert "never writes into the source" in capsys.readouterr().err
    assert _snapshot(root) == before


def test_num_heads_is_an_option_not_a_file(tmp_path, capsys):
    model = randomize_(SCAIL2Transformer(scail2_config("tiny")))  # dim 64: the head count is not dim / 128
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"module": wan_to_sat(model.state_dict())}, src / "ckpt.pt")
    assert main([str(src / "ckpt.pt"), str(tmp_path / "out")]) == 1
    assert "cannot infer the head count" in capsys.readouterr().err
    assert main([str(src / "ckpt.pt"), str(tmp_path / "out"), "--num-heads", "2"]) == 0
    assert sorted(p.name for p in src.iterdir()) == ["ckpt.pt"]  # no config.json written next to the source
    assert load_transformer(tmp_path / "out").config.num_heads == 2
    assert main([str(src / "ckpt.pt"), str(src), "--num-heads", "2"]) == 1  # the source file's own folder
    assert "never writes into the source" in capsys.readouterr().err
