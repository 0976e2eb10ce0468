"""SCAIL2Pipeline on a tiny random model: end-to-end runs, the sampling loop, CFG, long videos, save/load."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from scail2.conditioning import Condition
from scail2.conditioning.masks import COLOUR_RGB, driving_mask_to_latent, reference_mask_to_latent
from scail2.conditioning.packing import pack_inputs
from scail2.models import scail2_config
from scail2.pipeline import (
    PipelineInputError,
    SCAIL2Pipeline,
    make_scheduler,
    output_length,
    plan_segments,
    prepare_inputs,
    sample_latents,
)
from scail2.pipeline.schedulers import base_sigmas
from scail2.pipeline.tiny import save_tiny_pipeline

H, W = 32, 32  # pixels: latent 4x4, driving latent 2x2 (the smallest valid size keeps the VAE cheap)
STEPS = 2


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipe(tiny_root):
    return SCAIL2Pipeline.from_pretrained(tiny_root)


# ---------------------------------------------------------------------------------------------- inputs
def _image(h=40, w=32, seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()


def _video(frames=5, h=H, w=W, seed=1) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(frames, h, w, 3, generator=g) * 255).to(torch.uint8).numpy()


def _skeleton(frames=5, h=H, w=W) -> np.ndarray:
    """A rendered-pose driving video: coloured limbs on black that move a pixel per frame."""
    video = np.zeros((frames, h, w, 3), np.uint8)
    for f in range(frames):
        video[f, 5:25, 15 + f // 2 : 16 + f // 2] = (255, 0, 0)  # torso
        video[f, 10:11, 8 + f : 22 + f] = (0, 255, 0)  # arms
        video[f, 25:30, 12 : 14 + f] = (0, 0, 255)  # a leg
    return video


def _boxes(frames, h, w, boxes) -> torch.Tensor:
    """(K, F, H, W) bool masks of axis-aligned boxes (y0, y1, x0, x1) per character."""
    out = torch.zeros(len(boxes), frames, h, w, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        out[k, :, y0:y1, x0:x1] = True
    return out


def _colour_masks(frames, h, w, background="white"):
    """A driving mask video (one blue character on ``background``) and a black reference mask with it (the
    replacement-mode backgrounds)."""
    video = np.zeros((frames, h, w, 3), np.uint8)
    video[:] = COLOUR_RGB[background]
    video[:, 8:24, 10:20] = COLOUR_RGB["blue"]
    ref = np.zeros((40, 32, 3), np.uint8)
    ref[10:30, 8:24] = COLOUR_RGB["blue"]
    return ref, video


class _Capture:
    """Records the keyword inputs of every transformer forward (forward pre-hook)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: v.detach().clone() for k, v in kwargs.items()})

    def close(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------- end to end
def test_single_character_animation_without_masks_uses_the_mode_backgrounds(pipe):
    cap = _Capture(pipe.transformer)
    try:
        out = pipe(_image(), _video(), height=H, width=W, num_inference_steps=STEPS, seed=0, progress=False)
    finally:
        cap.close()
    assert out.frames.shape == (5, H, W, 3) and out.frames.dtype == np.uint8
    assert len(cap.calls) == 2 * STEPS  # guidance 5: conditional and unconditional pass per step
    white = torch.zeros(28, dtype=torch.bool)
    white[[0, 7, 14, 21]] = True  # the white channel of each of the 4 sub-frames
    for call in cap.calls:
        # No characters: the animation backgrounds, an all-white reference mask and an all-black driving mask.
        assert (call["reference_mask"][0, white] == 1).all() and not call["reference_mask"][0, ~white].any()
        assert not call["driving_mask"].any()
        assert call["video"].shape == (1, 20, 2, H // 8, W // 8)
        assert call["driving"].shape == (1, 20, 2, H // 16, W // 16)


def test_replacement_with_colour_masks_non_square(pipe):
    h, w = 32, 64
    ref_mask, drive_mask = _colour_masks(5, h, w, background="white")
    cap = _Capture(pipe.transformer)
    try:
        out = pipe(
            _image(),
            _video(5, h, w),
            mode="replacement",
            reference_mask=ref_mask,
            driving_mask=drive_mask,
            height=h,
            width=w,
            num_inference_steps=STEPS,
            seed=0,
            progress=False,
            output_type="pt",
        )
    finally:
        cap.close()
    assert out.frames.shape == (5, 3, h, w) and out.frames.dtype == torch.float32
    expected_drive = driving_mask_to_latent(torch.from_numpy(drive_mask).permute(0, 3, 1, 2).float() / 127.5 - 1)
    ref_resized = prepare_inputs(
        _image(), _video(5, h, w), mode="replacement", reference_mask=ref_mask, driving_mask=drive_mask,
        height=h, width=w,
    ).reference_mask
    torch.testing.assert_close(cap.calls[0]["driving_mask"][0], expected_drive)
    torch.testing.assert_close(cap.calls[0]["reference_mask"][0], reference_mask_to_latent(ref_resized))
    assert cap.calls[0]["driving_mask"][:, 0].mean() > 0.5  # white (environment switch) covers the background


def test_per_character_masks_give_each_character_one_colour(pipe):
    # Driving: character 0 on the right, character 1 on the left -> character 1 is blue (slot 0), 0 is red.
    drive = _boxes(5, H, W, [(4, 28, 20, 30), (4, 28, 2, 12)])
    # Reference (40x32 pixels, cropped to 32x32 from rows 4..36): the two characters stand the other way round.
    ref = _boxes(1, 40, 32, [(10, 30, 2, 12), (10, 30, 20, 30)])[:, 0]
    prepared = prepare_inputs(
        _image(), _video(), mode="replacement", character_masks=drive, reference_character_masks=ref, height=H, width=W
    )
    assert prepared.character_order == [1, 0]

    def colour_at(img, y, x):
        rgb = tuple(((img[:, y, x].float() + 1) * 127.5).round().int().tolist())
        return next(name for name, value in COLOUR_RGB.items() if value == rgb)

    ref_mask = prepared.reference_mask
    drive_mask = prepared.driving_mask[0].float() / 127.5 - 1
    assert colour_at(ref_mask, 15, 5) == colour_at(drive_mask, 15, 25) == "red"  # character 0
    assert colour_at(ref_mask, 15, 25) == colour_at(drive_mask, 15, 5) == "blue"  # character 1
    assert colour_at(ref_mask, 1, 1) == "black" and colour_at(drive_mask, 1, 15) == "white"

    out = pipe.generate(prepared, num_inference_steps=STEPS, seed=0, progress=False)
    assert out.frames.shape == (5, H, W, 3)
    animated = pipe(
        _image(), _video(), character_masks=drive, reference_character_masks=ref, height=H, width=W,
        num_inference_steps=STEPS, seed=0, progress=False,
    )
    assert animated.frames.shape == (5, H, W, 3)


def test_pose_driven_from_a_rendered_skeleton(pipe):
    out = pipe(_image(), _skeleton(5), height=H, width=W, num_inference_steps=STEPS, seed=0, progress=False)
    assert out.frames.shape == (5, H, W, 3)
    assert out.fps == 16.0


def test_same_seed_same_video_other_seed_other_video(pipe):
    kwargs = dict(height=H, width=W, num_inference_steps=STEPS, progress=False, output_type="pt")
    a = pipe(_image(), _video(5), seed=3, **kwargs)
    b = pipe(_image(), _video(5), seed=3, **kwargs)
    c = pipe(_image(), _video(5), seed=4, **kwargs)
    d = pipe(_image(), _video(5), generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.frames, d.frames)
    assert not torch.equal(a.frames, c.frames)
    assert a.seed == 3 and d.seed is None


def test_cpu_offload_moves_models_only_while_used(pipe):
    kwargs = dict(height=H, width=W, num_inference_steps=STEPS, seed=2, progress=False, output_type="pt")
    plain = pipe(_image(), _video(5), **kwargs)
    seen = []
    try:
        pipe.enable_model_cpu_offload("cpu")
        offloaded = pipe(
            _image(), _video(5),
            callback_on_step_end=lambda p, i, t, z: seen.append(next(p.transformer.parameters()).device.type),
            **kwargs,
        )
        assert pipe.device == torch.device("cpu") and seen == ["cpu"] * STEPS
    finally:
        pipe.to("cpu")
    assert torch.equal(plain.frames, offloaded.frames)


# ------------------------------------------------------------------------------------- sampling loop
def _random_cond(config, t=3, h=8, w=8, text_len=12, seed=0) -> tuple[Condition, torch.Tensor]:
    """A random condition and a negative-prompt embedding."""
    g = torch.Generator().manual_seed(seed)
    cond = Condition(
        reference=torch.randn(1, 16, 1, h, w, generator=g),
        reference_mask=torch.rand(1, 28, 1, h, w, generator=g),
        driving=torch.randn(1, 16, t, h // 2, w // 2, generator=g),
        driving_mask=torch.rand(1, 28, t, h // 2, w // 2, generator=g),
        text=torch.randn(1, text_len, config.text_dim, generator=g),
        clip_tokens=torch.randn(1, 17, config.image_dim, generator=g),
        modes=["animation"],
    )
    return cond, torch.randn(1, text_len, config.text_dim, generator=g)


@pytest.mark.parametrize("solver, with_history", [("unipc", False), ("euler", True)])
def test_sampling_loop_matches_manual_diffusers_loop(pipe, solver, with_history):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    model, steps, g = pipe.transformer, 3, 5.0
    history = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(9)) if with_history else None
    cond, negative = _random_cond(model.config)
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample_latents(
        model, cond, make_scheduler(solver, shift=3.0), negative_text=negative, history=history,
        num_inference_steps=steps, guidance_scale=g, latents=noise,
    )

    # The same loop written directly against diffusers.
    if solver == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        sched.set_timesteps(steps)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(steps, sigmas=list(np.linspace(1.0, 1e-3, steps + 1)[:-1]))
    hist = torch.zeros(1, 1, 3, 1, 1)
    x = noise.clone()
    if with_history:
        hist[:, :, :2] = 1
    for t in sched.timesteps:
        if with_history:
            x = torch.cat([history, x[:, :, 2:]], dim=2)
        packed = pack_inputs(x, hist, cond, model.config.head_dim)
        ts = t.float().reshape(1)
        v_c = model(**packed.as_kwargs(), timestep=ts, context=cond.text, clip_tokens=cond.clip_tokens)
        v_u = model(**packed.as_kwargs(), timestep=ts, context=negative, clip_tokens=cond.clip_tokens)
        x = sched.step(v_u + g * (v_c - v_u), t, x).prev_sample
        if with_history:
            x = torch.cat([history, x[:, :, 2:]], dim=2)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    if with_history:
        assert torch.equal(ours[:, :, :2], history)


class _StubTransformer(torch.nn.Module):
    """Velocity = mean of the text context everywhere; counts calls and keeps their inputs."""

    def __init__(self):
        super().__init__()
        self.config = scail2_config("tiny")
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the pipeline a device and dtype
        self.calls = []

    def forward(self, video, reference, reference_mask, driving, driving_mask, timestep, context, clip_tokens, rope):
        self.calls.append(dict(video=video, reference=reference, reference_mask=reference_mask, driving=driving,
                               driving_mask=driving_mask, timestep=timestep, context=context, clip_tokens=clip_tokens,
                               rope=rope))
        b, _, t, h, w = video.shape
        return context.mean(dim=(1, 2)).view(b, 1, 1, 1, 1).expand(b, 16, t, h, w) + 0 * self.anchor


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_guidance_passes_and_combination(guidance):
    stub, steps = _StubTransformer(), 3
    cond, negative = _random_cond(stub.config)
    c, u = cond.text.mean(), negative.mean()
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = make_scheduler("euler", shift=5.0)
    out = sample_latents(
        stub, cond, scheduler, negative_text=negative, num_inference_steps=steps, guidance_scale=guidance, latents=noise
    )

    passes = 1 if guidance == 1.0 else 2
    assert len(stub.calls) == passes * steps
    velocity = c if guidance == 1.0 else u + guidance * (c - u)
    # Euler with a constant velocity: x_end = x_start + (0 - sigma_0) v.
    sigma0 = scheduler.sigmas[0]
    torch.testing.assert_close(out, noise - sigma0 * velocity, rtol=1e-5, atol=1e-5)
    if passes == 2:
        for cond_call, uncond_call in zip(stub.calls[::2], stub.calls[1::2]):
            assert torch.equal(cond_call["context"], cond.text)
            assert torch.equal(uncond_call["context"], negative)
            for key in ("video", "reference", "reference_mask", "driving", "driving_mask", "timestep"):
                assert torch.equal(cond_call[key], uncond_call[key]), key
            assert torch.equal(cond_call["clip_tokens"], uncond_call["clip_tokens"])
            assert torch.equal(cond_call["rope"], uncond_call["rope"])
    # The RoPE factors are computed once and reused at every step.
    assert all(call["rope"].data_ptr() == stub.calls[0]["rope"].data_ptr() for call in stub.calls)


def test_conditioning_from_a_training_batch():
    from scail2.conditioning import MotionBatch

    stub = _StubTransformer()
    c, negative = _random_cond(stub.config)
    c = Condition(**{**{k: getattr(c, k) for k in ("reference", "reference_mask", "driving", "driving_mask", "text",
                                                    "clip_tokens")}, "modes": ["replacement"]})
    latents = torch.randn(1, 16, 3, 8, 8)
    batch = MotionBatch(latents=latents, cond=c, source=["x"], history_allowed=torch.tensor([True]), null_text=negative)
    out = sample_latents(
        stub, batch.cond, make_scheduler(), negative_text=batch.null_text, history=latents[:, :, :2],
        num_inference_steps=2, guidance_scale=5.0,
    )
    assert out.shape == latents.shape and torch.equal(out[:, :, :2], latents[:, :, :2])
    assert torch.equal(stub.calls[1]["context"], negative)
    assert torch.equal(stub.calls[0]["driving_mask"], c.driving_mask)


def test_guidance_below_one_and_missing_negative_are_errors():
    stub = _StubTransformer()
    cond, negative = _random_cond(stub.config)
    with pytest.raises(ValueError, match="guidance_scale is 0.5; need a finite number >= 1"):
        sample_latents(stub, cond, make_scheduler(), negative_text=negative, num_inference_steps=1, guidance_scale=0.5)
    with pytest.raises(ValueError, match="negative_text"):
        sample_latents(stub, cond, make_scheduler(), num_inference_steps=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"history has shape \(1, 16, 3, 8, 8\); need .*0 < T_h < T = 3"):
        sample_latents(stub, cond, make_scheduler(), history=torch.zeros(1, 16, 3, 8, 8), guidance_scale=1.0)


def test_euler_schedule_is_the_unipc_schedule():
    unipc, euler = make_scheduler("unipc", 3.0), make_scheduler("euler", 3.0)
    from scail2.pipeline.schedulers import set_schedule

    set_schedule(unipc, 10)
    set_schedule(euler, 10)
    torch.testing.assert_close(euler.sigmas[:-1], unipc.sigmas[:-1], atol=2e-6, rtol=0)
    assert len(base_sigmas(10)) == 10


# ------------------------------------------------------------------------------------------ long video
@pytest.mark.parametrize(
    "frames, segment, overlap, expected",
    [(81, 81, 5, 81), (83, 81, 5, 81), (100, 81, 5, 81), (157, 81, 5, 157), (200, 81, 5, 157), (233, 81, 5, 233),
     (8, 81, 5, 5), (1, 81, 5, 1), (13, 9, 5, 13), (16, 9, 5, 13), (17, 9, 5, 17)],
)
def test_output_length_rule(frames, segment, overlap, expected):
    assert output_length(frames, segment, overlap) == expected
    plan = plan_segments(frames, segment, overlap)
    assert all(s.frames == plan.segments[0].frames for s in plan.segments)
    assert plan.segments[-1].stop <= frames


def test_trimming_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="scail2.pipeline.inputs"):
        prepared = prepare_inputs(_image(), _video(8), height=H, width=W)
    assert prepared.output_frames == 5 and prepared.driving.shape[0] == 5
    assert "generating 5" in caplog.text and "4k+1" in caplog.text


def test_long_video_history_is_the_reencoded_overlap_and_stays_fixed(pipe):
    steps, latents_seen = STEPS, []
    cap = _Capture(pipe.transformer)
    try:
        out = pipe(
            _image(), _video(15), height=H, width=W, num_inference_steps=steps, seed=0, progress=False,
            output_type="pt", segment_frames=9, overlap_frames=5, guidance_scale=1.0,
            callback_on_step_end=lambda p, i, t, z: latents_seen.append((i, z.clone())),
        )
    finally:
        cap.close()
    assert out.frames.shape[0] == output_length(15, 9, 5) == 13  # 2 segments, the last 2 frames dropped
    assert [s.start for s in out.plan.segments] == [0, 4]
    assert [i for i, _ in latents_seen] == list(range(2 * steps))

    # The second segment's history is the VAE encoding of the first segment's last 5 decoded frames.
    history = pipe.encode_video(out.frames[4:9])
    assert history.shape == (1, 16, 2, H // 8, W // 8)
    for i, z in latents_seen[steps:]:
        assert torch.equal(z[:, :, :2], history), i
    second = cap.calls[steps:]
    assert len(second) == steps
    for call in second:
        assert torch.equal(call["video"][:, :16, :2], history)
        assert (call["video"][:, 16:, :2] == 1).all() and (call["video"][:, 16:, 2:] == 0).all()
    assert all((call["video"][:, 16:] == 0).all() for call in cap.calls[:steps])  # no history in segment 1
    assert torch.equal(out.latents[1][:, :, :2], history)
    # Output = segment 1 (9 frames) + segment 2 without its 5 overlap frames.
    torch.testing.assert_close(out.frames[9:], pipe.decode(out.latents[1])[5:])


# ---------------------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trip_gives_identical_outputs(pipe, tmp_path):
    kwargs = dict(height=H, width=W, num_inference_steps=STEPS, seed=5, progress=False, output_type="pt")
    before = pipe(_image(), _video(5), prompt="a man dancing", **kwargs)
    pipe.save_pretrained(tmp_path / "copy")
    loaded = SCAIL2Pipeline.from_pretrained(tmp_path / "copy")
    after = loaded(_image(), _video(5), prompt="a man dancing", **kwargs)
    assert torch.equal(before.frames, after.frames)
    assert type(loaded.scheduler).__name__ == "UniPCMultistepScheduler"
    euler = SCAIL2Pipeline.from_pretrained(tmp_path / "copy", scheduler="euler")
    assert type(euler.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.scheduler.config.shift == 5.0


def test_missing_components_are_named(tiny_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root, broken)
    (broken / "tokenizer" / "tokenizer_config.json").unlink()
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(broken / "image_processor")
    with pytest.raises(FileNotFoundError) as info:
        SCAIL2Pipeline.from_pretrained(broken)
    message = str(info.value)
    assert "tokenizer_config.json" in message
    assert "diffusion_pytorch_model.safetensors" in message and "scail2-convert" in message
    assert "preprocessor_config.json" in message
    with pytest.raises(FileNotFoundError, match="no model folder"):
        SCAIL2Pipeline.from_pretrained(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- bad inputs
def test_input_errors_name_the_value_and_the_fix():
    with pytest.raises(PipelineInputError, match="output height 50 is not divisible by 32; resize or crop to 32 or 64"):
        prepare_inputs(_image(), _video(), height=50, width=32)
    ref_mask, drive_mask = _colour_masks(7, H, W)
    with pytest.raises(PipelineInputError, match="driving mask has 7 frames but the driving video has 5"):
        prepare_inputs(_image(), _video(), reference_mask=ref_mask, driving_mask=drive_mask, height=H, width=W)
    ref_mask, drive_mask = _colour_masks(5, H, W)
    drive_mask[:, :, :16] = (128, 128, 128)  # half of every frame grey
    with pytest.raises(PipelineInputError, match="not palette colours"):
        prepare_inputs(_image(), _video(), reference_mask=ref_mask, driving_mask=drive_mask, height=H, width=W)
    with pytest.raises(PipelineInputError, match="replacement mode needs masks"):
        prepare_inputs(_image(), _video(), mode="replacement", height=H, width=W)
    with pytest.raises(PipelineInputError, match="driving_mask is missing"):
        prepare_inputs(_image(), _video(), reference_mask=ref_mask, height=H, width=W)
    with pytest.raises(PipelineInputError, match="num_frames is 12 but the driving video has 5"):
        prepare_inputs(_image(), _video(), num_frames=12, height=H, width=W)
    with pytest.raises(PipelineInputError, match=r"spans \[0, 255\]"):
        prepare_inputs(torch.linspace(0, 255, 3 * H * W).view(3, H, W), _video(), height=H, width=W)
