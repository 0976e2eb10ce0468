"""Contract tests of the Wan2.1 backbone and the SCAIL-2 transformer on tiny random configs."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scail2.conditioning.packing import pack_inputs, history_mask
from scail2.models import SCAIL2Transformer, WanModel, scail2_config, wan_config
from scail2.models.attention import set_attention_backend
from scail2.models.parallelize import apply_activation_checkpointing, checkpointed_blocks
from scail2.testing import random_scail2_batch, randomize_, tiny_wan


@pytest.fixture
def cfg():
    return scail2_config("tiny")


def run(model, inputs, cond):
    return model(**inputs.as_kwargs(), **cond)


def test_presets_have_the_published_geometry():
    big = scail2_config("wan2.1-14b")
    assert (big.dim, big.ffn_dim, big.num_heads, big.head_dim, big.num_layers) == (5120, 13824, 40, 128, 40)
    assert (big.in_channels, big.mask_channels, big.text_dim, big.image_dim, big.freq_dim) == (20, 28, 4096, 1280, 256)
    small = wan_config("wan2.1-1.3b")
    assert (small.dim, small.ffn_dim, small.num_heads, small.num_layers) == (1536, 8960, 12, 30)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        wan_config("huge")


def test_parameter_count_of_presets_matches_the_modules():
    # Build on the meta device (no memory) and compare with the closed-form count of Wan2.1-14B-I2V plus the
    # SCAIL-2 embeddings: ~16.4B for 14B (the I2V model without its 36-channel input is ~16.4B).
    with torch.device("meta"):
        model = SCAIL2Transformer(scail2_config("wan2.1-14b"))
    d, f, L = 5120, 13824, 40
    block = 4 * (d * d + d) + 2 * d  # self-attn + q/k norms
    block += 6 * (d * d + d) + 3 * d  # cross-attn q,k,v,o,k_img,v_img + norms
    block += 2 * d  # norm3 affine
    block += d * f + f + f * d + d + 6 * d  # ffn + modulation
    embed = 3 * (20 * 4 * d + d) - (20 * 4 * d + d) + (28 * 4 * d + d)  # patch, pose, mask convs
    embed += 4096 * d + d + d * d + d  # text
    embed += 256 * d + d + d * d + d + d * 6 * d + 6 * d  # time
    embed += 2 * 1280 + 1280 * 1280 + 1280 + 1280 * d + d + 2 * d  # img_emb
    head = d * 64 + 64 + 2 * d
    assert model.num_params() == L * block + embed + head


def test_forward_shapes_and_backward_reaches_every_parameter(cfg):
    model = randomize_(SCAIL2Transformer(cfg))
    inputs, cond = random_scail2_batch(cfg, batch=2, frames=3, height=8, width=12, modes=["animation", "replacement"])
    out = run(model, inputs, cond)
    assert out.shape == (2, 16, 3, 8, 12)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_plain_wan_call(cfg):
    model = randomize_(WanModel(wan_config("tiny", in_channels=36)))
    x = torch.randn(2, 36, 3, 8, 8)
    out = model(x, torch.tensor([1.0, 900.0]), torch.randn(2, 7, 32), torch.randn(2, 5, 32))
    assert out.shape == (2, 16, 3, 8, 8)
    with pytest.raises(ValueError, match="needs CLIP image tokens"):
        model(x, torch.tensor([1.0, 2.0]), torch.randn(2, 7, 32))
    t2v = WanModel(wan_config("tiny", image_dim=None))
    with pytest.raises(ValueError, match="no CLIP image branch"):
        t2v(torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 7, 32), torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, T, H, W\)"):
        t2v(torch.randn(1, 20, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 7, 32))


def reference_forward(model: SCAIL2Transformer, inputs, cond) -> torch.Tensor:
    """SPEC §2 written out literally: patch_embedding(cat[ref, x]) + patch_embedding_mask(cat[ref_mask, zeros])."""
    ref, video = inputs.reference, inputs.video
    zeros = torch.zeros(video.shape[0], 28, *video.shape[2:])
    tok = model.patch_embedding(torch.cat([ref, video], 2)) + model.patch_embedding_mask(
        torch.cat([inputs.reference_mask, zeros], 2)
    )
    drive = model.patch_embedding_pose(inputs.driving) + model.patch_embedding_mask(inputs.driving_mask)
    x = torch.cat([tok.flatten(2).transpose(1, 2), drive.flatten(2).transpose(1, 2)], 1)
    e, e0 = model.embed_time(cond["timestep"])
    ctx, img = model.embed_context(cond["context"], cond["clip_tokens"])
    for block in model.blocks:
        x = block(x, e0, ctx, img, inputs.rope)
    n_ref = ref.shape[2] * (ref.shape[3] // 2) * (ref.shape[4] // 2)
    grid = (video.shape[2], video.shape[3] // 2, video.shape[4] // 2)
    return model.unpatchify(model.head(x, e)[:, n_ref : n_ref + math.prod(grid)], grid)


@pytest.mark.parametrize("extra", [0, 2])
def test_matches_literal_in_context_layout(cfg, extra):
    model = randomize_(SCAIL2Transformer(cfg)).eval()
    inputs, cond = random_scail2_batch(cfg, num_extra_refs=extra, history=[True, False])
    with torch.no_grad():
        assert torch.allclose(run(model, inputs, cond), reference_forward(model, inputs, cond), atol=1e-5)


def test_batch_of_mixed_modes_equals_per_sample_runs(cfg):
    model = randomize_(SCAIL2Transformer(cfg)).eval()
    inputs, cond = random_scail2_batch(cfg, batch=2, modes=["animation", "replacement"])
    with torch.no_grad():
        both = run(model, inputs, cond)
        for i, mode in enumerate(["animation", "replacement"]):
            one, _ = random_scail2_batch(cfg, batch=1, modes=[mode])
            sliced = {k: v[i : i + 1] for k, v in inputs.as_kwargs().items() if k != "rope"}
            rope = inputs.rope[i : i + 1]
            out = model(**sliced, rope=rope, **{k: v[i : i + 1] for k, v in cond.items()})
            assert torch.allclose(out, both[i : i + 1], atol=1e-5)


def test_mode_changes_the_output(cfg):
    model = randomize_(SCAIL2Transformer(cfg)).eval()
    a, cond = random_scail2_batch(cfg, batch=1, modes=["animation"])
    r, _ = random_scail2_batch(cfg, batch=1, modes=["replacement"])
    with torch.no_grad():
        assert not torch.allclose(run(model, a, cond), run(model, r, cond), atol=1e-4)


def test_zero_mask_embedding_makes_masks_irrelevant(cfg):
    # A new input path that starts at zero leaves the network unchanged at initialisation.
    model = randomize_(SCAIL2Transformer(cfg)).eval()
    with torch.no_grad():
        model.patch_embedding_mask.weight.zero_()
        model.patch_embedding_mask.bias.zero_()
    inputs, cond = random_scail2_batch(cfg)
    other = type(inputs)(**{**inputs.as_kwargs(), "reference_mask": torch.rand_like(inputs.reference_mask),
                              "driving_mask": torch.rand_like(inputs.driving_mask)})
    with torch.no_grad():
        assert torch.equal(run(model, inputs, cond), run(model, other, cond))


def test_driving_and_reference_tokens_condition_the_video(cfg):
    model = randomize_(SCAIL2Transformer(cfg)).eval()
    inputs, cond = random_scail2_batch(cfg, batch=1)
    base = run(model, inputs, cond).detach()
    for field in ("driving", "reference", "driving_mask", "reference_mask"):
        changed = type(inputs)(**{**inputs.as_kwargs(), field: getattr(inputs, field) + 0.5})
        assert not torch.allclose(run(model, changed, cond).detach(), base, atol=1e-4), field


def test_activation_checkpointing_is_exact(cfg):
    model = randomize_(SCAIL2Transformer(cfg))
    inputs, cond = random_scail2_batch(cfg)
    out = run(model, inputs, cond)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert apply_activation_checkpointing(model, True) == [0, 1]
    out2 = run(model, inputs, cond)
    out2.square().mean().backward()
    assert torch.equal(out, out2)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    assert apply_activation_checkpointing(model, [1]) == [1]
    assert checkpointed_blocks(model) == [1]
    assert [n for n, _ in model.named_parameters()] == list(grads)  # names unchanged
    with pytest.raises(ValueError, match="out of range"):
        apply_activation_checkpointing(model, [5])


def test_flops_formula_matches_flop_counter(cfg):
    model = randomize_(SCAIL2Transformer(cfg.replace(dim=96, num_heads=2, ffn_dim=192, num_layers=2))).eval()
    # The plain-softmax backend: explicit matmuls, which the FLOP counter sees on every machine.
    set_attention_backend(model, "math")
    inputs, cond = random_scail2_batch(model.config, batch=1, frames=3, height=8, width=8, text_len=16, image_len=9)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run(model, inputs, cond)
    measured = counter.get_total_flops()
    assert model.flops_for_inputs(inputs, text_len=16, image_len=9) == measured


@pytest.mark.parametrize(
    "field,shape,match",
    [
        ("driving_mask", (1, 28, 2, 4, 4), r"driving_mask has shape \(1, 28, 2, 4, 4\); expected \(1, 28, 3, 4, 4\)"),
        ("driving", (1, 16, 3, 8, 8), r"driving has shape .*half resolution"),
        ("reference_mask", (1, 7, 1, 8, 8), r"reference_mask has shape .*28 channels"),
    ],
)
def test_packing_rejects_mismatched_shapes(field, shape, match):
    t, h, w = 3, 8, 8
    args = dict(
        noisy=torch.randn(1, 16, t, h, w),
        history=history_mask(1, t, False),
        reference=torch.randn(1, 16, 1, h, w),
        reference_mask=torch.rand(1, 28, 1, h, w),
        driving=torch.randn(1, 16, t, h // 2, w // 2),
        driving_mask=torch.rand(1, 28, t, h // 2, w // 2),
    )
    args[field] = torch.randn(*shape)
    with pytest.raises(ValueError, match=match):
        pack_inputs(**args, modes=["animation"], head_dim=32)


def test_packing_rejects_latent_sizes_off_the_32_pixel_grid():
    t, h, w = 1, 6, 8
    with pytest.raises(ValueError, match="latent size 6x8 must be divisible by 4"):
        pack_inputs(
            torch.randn(1, 16, t, h, w), history_mask(1, t, False), torch.randn(1, 16, 1, h, w),
            torch.rand(1, 28, 1, h, w), torch.randn(1, 16, t, 3, 4), torch.rand(1, 28, t, 3, 4),
            ["animation"], 32,
        )


def test_history_mask_channels():
    keep = torch.tensor([True, False])
    m = history_mask(2, 5, keep)
    assert m[0, 0, :, 0, 0].tolist() == [1, 1, 0, 0, 0]
    assert m[1].sum() == 0
    cfg = scail2_config("tiny")
    inputs, _ = random_scail2_batch(cfg, batch=2, frames=5, history=[True, False])
    assert torch.equal(inputs.video[0, 16:, :, 0, 0], torch.tensor([[1.0, 1, 0, 0, 0]] * 4))
    assert inputs.video[1, 16:].sum() == 0
    assert torch.all(inputs.reference[:, 16:] == 1) and torch.all(inputs.driving[:, 16:] == 1)


def test_sequence_length_at_the_paper_resolution():
    # SPEC §2: 512x896, 81 frames -> 1,792 + 37,632 + 9,408 = 48,832 tokens.
    from scail2.conditioning.packing import sequence_rope

    rope = sequence_rope(["animation"], 21, 512 // 16, 896 // 16, 128)
    assert rope.shape == (1, 48_832, 64, 2)
