"""Contract tests of the Wan2.1 backbone and the SCAIL-2 transformer on tiny random configs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from scail2.conditioning.condition import Condition
from scail2.conditioning.packing import pack_inputs, history_mask
from scail2.models import SCAIL2Transformer, WanModel, scail2_config, wan_config
from scail2.models.attention import set_attention_backend
from scail2.models.parallelize import apply_activation_checkpointing, checkpointed_blocks
from scail2.testing import random_condition, random_scail2_batch, randomize_, tiny_wan


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


# ------------------------------------------------------------------------------ an independent reference
# SPEC §2 and §4 written out from the raw latents with nothing of ours but the weights: the token layout with
# F.conv3d, the RoPE table from its formula, and diffusers' Wan blocks, embedders and head (diffusers is checked
# against our WanModel in tests/test_weights.py) carry the sequence.


SHIFT = 120  # SPEC §4: the position shift of the replacement reference and of the driving segment


def _rope(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(L, 3) positions -> (L, head_dim / 2) complex64 factors: t, h, w get d - 4(d//6), 2(d//6), 2(d//6) dims."""
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    parts = []
    for axis, dim in enumerate(dims):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.polar(torch.ones(len(pos), dim // 2, dtype=torch.float64), pos[:, axis, None].double() * inv))
    return torch.cat(parts, dim=1)


def _grid(t: int, h: int, w: int, t0: int, h0: int, w0: int) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt + t0, hh + h0, ww + w0], dim=-1).reshape(-1, 3)


def _layout_rope(mode: str, n: int, t: int, gh: int, gw: int, head_dim: int) -> torch.Tensor:
    """The SPEC §4 table for one sample: (L, head_dim / 2) complex factors of [refs][video][driving]."""
    ref_h = SHIFT if mode == "replacement" else 0
    t_video = n + 1 if mode == "animation" else n
    refs = [_rope(_grid(1, gh, gw, i, ref_h, 0), head_dim) for i in range(n + 1)]  # extra refs i, then reference n
    video = _rope(_grid(t, gh, gw, t_video, 0, 0), head_dim)
    # Driving token (f, i, j) covers the full-resolution tokens (2i + a, 120 + 2j + b), a, b in {0, 1}: it
    # takes the mean of their complex factors (real and imaginary parts pooled 2x2, not renormalised).
    half = _grid(t, gh // 2, gw // 2, t_video, 0, 0)
    window = [
        _rope(torch.stack([half[:, 0], 2 * half[:, 1] + a, SHIFT + 2 * half[:, 2] + b], 1), head_dim)
        for a in (0, 1)
        for b in (0, 1)
    ]
    driving = torch.stack(window).mean(0)
    return torch.cat([*refs, video, driving])


def _diffusers_twin(model: SCAIL2Transformer):
    from diffusers import WanTransformer3DModel

    from scail2.models.convert import config_to_diffusers, wan_to_diffusers

    cfg = {k: v for k, v in config_to_diffusers(model.config.replace(mask_channels=0)).items() if not k.startswith("_")}
    twin = WanTransformer3DModel(**cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("patch_embedding_pose", "patch_embedding_mask"))}
    twin.load_state_dict(wan_to_diffusers(state), strict=True)
    return twin


def independent_forward(model: SCAIL2Transformer, noisy, keep, cond: Condition, timestep) -> torch.Tensor:
    """SCAIL-2 from the raw latents: tokens = patch_embedding(cat[refs, video]) + patch_embedding_mask(cat[ref
    masks, zeros]); driving = patch_embedding_pose(driving) + patch_embedding_mask(driving masks); diffusers
    blocks with the SPEC §4 RoPE table; the head on the video tokens only."""
    w = model.state_dict()
    twin = _diffusers_twin(model)
    b, _, t, h, wd = noisy.shape
    n = cond.num_extra_references
    ones = lambda x: torch.cat([x, torch.ones_like(x[:, :4])], 1)  # noqa: E731  latent + 4 mask channels of 1
    hist = torch.zeros(b, 4, t, h, wd)
    hist[keep, :, :2] = 1
    refs = [ones(cond.extra_references[:, i]) for i in range(n)] + [ones(cond.reference)]
    ref_masks = [cond.extra_reference_masks[:, i] for i in range(n)] + [cond.reference_mask]
    frames = torch.cat([*refs, torch.cat([noisy, hist], 1)], 2)  # (B, 20, n + 1 + T, h, w)
    masks = torch.cat([*ref_masks, torch.zeros(b, 28, t, h, wd)], 2)
    conv = lambda x, name: F.conv3d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride=(1, 2, 2))  # noqa: E731
    tokens = conv(frames, "patch_embedding") + conv(masks, "patch_embedding_mask")
    drive = conv(ones(cond.driving), "patch_embedding_pose") + conv(cond.driving_mask, "patch_embedding_mask")
    x = torch.cat([tokens.flatten(2).transpose(1, 2), drive.flatten(2).transpose(1, 2)], 1)  # (B, L, dim)

    gh, gw = h // 2, wd // 2
    rope = torch.stack([_layout_rope(m, n, t, gh, gw, model.config.head_dim) for m in cond.modes])  # (B, L, D/2)
    rotary = (rope.real.float().repeat_interleave(2, -1)[:, :, None], rope.imag.float().repeat_interleave(2, -1)[:, :, None])
    # diffusers splits the context at len - 512: the text is padded to 512 tokens.
    text = torch.cat([cond.text, torch.zeros(b, 512 - cond.text.shape[1], cond.text.shape[2])], 1)
    temb, proj, ctx, img = twin.condition_embedder(timestep, text, cond.clip_tokens)
    ctx = torch.cat([img, ctx], 1)
    for block in twin.blocks:
        x = block(x, ctx, proj.unflatten(1, (6, -1)), rotary)
    shift, scale = (twin.scale_shift_table + temb[:, None]).chunk(2, dim=1)
    out = twin.proj_out(twin.norm_out(x.float()) * (1 + scale) + shift)
    n_ref = (n + 1) * gh * gw
    video = out[:, n_ref : n_ref + t * gh * gw].reshape(b, t, gh, gw, 1, 2, 2, 16)
    return video.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, 16, t, h, wd)


@pytest.mark.parametrize("extra", [0, 2])
def test_matches_an_independent_reference(cfg, extra):
    # The text must be 512 tokens for diffusers' image/text split, so it is padded with zeros (as umT5 does).
    model = randomize_(SCAIL2Transformer(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    b, t, h, w = 2, 3, 8, 12
    cond = random_condition(cfg, b, t, h, w, ["animation", "replacement"], extra, text_len=512, image_len=5, generator=g)
    noisy = torch.randn(b, 16, t, h, w, generator=g)
    keep = torch.tensor([True, False])
    timestep = torch.tensor([999.0, 17.0])
    with torch.no_grad():
        packed = pack_inputs(noisy, history_mask(b, t, keep), cond, cfg.head_dim, cfg.patch_size)
        ours = model(**packed.as_kwargs(), timestep=timestep, context=cond.text, clip_tokens=cond.clip_tokens)
        theirs = independent_forward(model, noisy, keep, cond, timestep)
    assert (ours - theirs).abs().max() <= 1e-5
    # Not a tautology: a layout the model does not use (replacement's reference shift in animation) differs.
    wrong = dataclasses.replace(cond, modes=["replacement"] * 2)
    with torch.no_grad():
        assert (independent_forward(model, noisy, keep, wrong, timestep)[0] - ours[0]).abs().max() > 1e-3


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


def test_the_mask_path_starts_at_zero_as_built(cfg):
    # A new input path that starts at zero leaves the network unchanged at initialisation: the model as built
    # does not depend on the masks. The head starts at zero too, so it is perturbed to see anything.
    torch.manual_seed(0)
    model = SCAIL2Transformer(cfg).eval()
    assert not model.patch_embedding_mask.weight.any() and not model.patch_embedding_mask.bias.any()
    assert model.patch_embedding_pose.weight.abs().sum() > 0  # the driving tokens' own embedding is not zero
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.05)
    inputs, cond = random_scail2_batch(cfg)
    other = type(inputs)(**{**inputs.as_kwargs(), "reference_mask": torch.rand_like(inputs.reference_mask),
                              "driving_mask": torch.rand_like(inputs.driving_mask)})
    with torch.no_grad():
        base = run(model, inputs, cond)
        assert base.abs().sum() > 0
        assert torch.equal(base, run(model, other, cond))
    # A trained (non-zero) mask path does condition the output.
    randomize_(model.patch_embedding_mask)
    with torch.no_grad():
        assert not torch.allclose(run(model, inputs, cond), run(model, other, cond), atol=1e-4)


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
    cond = random_condition(scail2_config("tiny"), 1, t, h, w)
    setattr(cond, field, torch.randn(*shape))
    with pytest.raises(ValueError, match=match):
        pack_inputs(torch.randn(1, 16, t, h, w), history_mask(1, t, False), cond, head_dim=32)


def test_packing_rejects_latent_sizes_off_the_32_pixel_grid():
    t, h, w = 1, 6, 8
    cond = random_condition(scail2_config("tiny"), 1, t, h, w)
    with pytest.raises(ValueError, match="latent size 6x8 must be divisible by 4"):
        pack_inputs(torch.randn(1, 16, t, h, w), history_mask(1, t, False), cond, 32)


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
