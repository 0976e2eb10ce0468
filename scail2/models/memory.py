"""Per-GPU memory of a training step, computed from the geometry and the parallel settings before anything is
allocated (``scail2-plan``, `scail2.cli.plan`).

Terms (bytes on one rank):

- **parameters, gradients, optimizer state**: the exact parameter count (the network built on the meta device)
  times the bytes of their dtypes; FSDP2 and ZeRO shard them over the ranks.
- **activations**: what autograd keeps for backward, per token of this rank's shard of the sequence (the packed
  in-context sequence divided by ``sequence_parallel``). Per block and token the network saves, counted from
  the saved tensors of `WanBlock` (`tests/test_plan.py` measures them again with saved-tensor hooks):

  ==================================  ==========================================  =====================
  compute precision                   tensors of width ``dim`` (bytes each)       others
  ==================================  ==========================================  =====================
  float32                             24 x 4                                      2 x ffn_dim x 4
  bf16 parameters (FSDP2 bf16)        14 x 2 + 10 x 4 (norms and modulation fp32)  2 x ffn_dim x 2
  bf16 autocast, float32 parameters   17 x 2 + 10 x 4                             2 x ffn_dim x 2
  ==================================  ==========================================  =====================

  plus 3 log-sum-exp values per head (the three attentions) and 9 per-token scalars (norm statistics) in float32;
  per block and sample the text and CLIP keys and values (``(text + image tokens) x dim x (4 x compute + 4)``);
  under autocast with float32 parameters also the block's bf16 weight copies. A checkpointed block keeps only
  its input (``tokens x dim``); its activations are recomputed in backward, one block at a time (a transient).
  Outside the blocks: the embeddings' inputs and outputs (whole sequence on every rank), the output head and the
  loss (video tokens), the text and CLIP projections, the RoPE factors.
- **transient buffers**: what exists only inside one block's backward: the recomputed block (checkpointing),
  FSDP2's gathered parameters (the root and two blocks, the next one prefetched) and one block's unsharded
  gradients, the activation gradients of one block, the sequence-parallel all-to-all buffers, and the attention
  matrix when the plain ``math`` backend is chosen (the fused kernels never build it).

Adapter training (Bias-Aware DPO with LoRA, ``Setup.adapters``): the backbone is frozen and replicated in its
stored dtype (``module.frozen_dtype``); gradients and AdamW state exist for the float32 adapters only; a
preference pair puts two samples (winner and loser) through the network with gradients. The reference
predictions (adapters disabled, no gradients) run before the policy's forward and keep nothing for backward;
the adapters' own saved tensors (each adapted layer's input again and its rank-wide projection) are not counted.

The total is persistent + transient; a job is said to fit when it leaves ``HEADROOM`` of the device free for the
CUDA context, the caching allocator's fragmentation and kernels' workspaces.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from .config import TransformerConfig

GiB = 1024**3
HEADROOM = 0.10  # fraction of the device kept free (CUDA context, allocator fragmentation, workspaces)
STRATEGIES: tuple[str, ...] = ("single", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16-autocast", "bf16-params")

# Saved tensors per block and token: (tensors of width dim in the compute dtype, of width dim in float32,
# of width ffn_dim in the compute dtype).
_BLOCK_WIDTHS = {"fp32": (24, 0, 2), "bf16-params": (14, 10, 2), "bf16-autocast": (17, 10, 2)}
_LSE_PER_HEAD = 3  # self-attention, image and text cross-attention
_TOKEN_SCALARS = 9  # layer-norm means and inverse deviations, RMS-norm factors


@dataclass(frozen=True)
class Layout:
    """The packed in-context sequence of one sample, in latent units."""

    frames: int  # latent frames T of the video (and of the driving video)
    height: int  # latent height h (pixels / 8)
    width: int  # latent width w
    extra_refs: int = 0
    text_tokens: int = 512
    image_tokens: int = 257

    @classmethod
    def from_pixels(cls, frames: int, height: int, width: int, **kw) -> "Layout":
        """``frames`` pixel frames (4k+1) of ``height`` x ``width`` pixels (multiples of 32)."""
        if (frames - 1) % 4:
            raise ValueError(f"{frames} frames: need 4k+1 (e.g. 81)")
        if height % 32 or width % 32:
            raise ValueError(f"{height}x{width}: height and width must be multiples of 32")
        return cls((frames - 1) // 4 + 1, height // 8, width // 8, **kw)

    def tokens(self, patch: tuple[int, int, int] = (1, 2, 2)) -> dict[str, int]:
        pt, ph, pw = patch
        per_frame = (self.height // ph) * (self.width // pw)
        return {
            "reference": (self.extra_refs + 1) // pt * per_frame,
            "video": self.frames // pt * per_frame,
            "driving": self.frames // pt * per_frame // 4,
        }


@dataclass(frozen=True)
class Setup:
    """How the step runs: the parallel layout, precision and checkpointing."""

    world_size: int = 1
    strategy: str = "single"
    sequence_parallel: int = 1
    batch: int = 1  # samples per rank and micro-batch (per sequence-parallel group)
    precision: str = "fp32"  # fp32 | bf16-autocast (float32 parameters) | bf16-params (FSDP2 bf16 compute)
    activation_checkpointing: bool | int | tuple[int, ...] = False
    reshard_after_forward: bool = True
    optimizer_states: int = 2  # AdamW: exp_avg and exp_avg_sq
    attention_backend: str = "sdpa"
    # Adapter training (DPO with LoRA): the adapters' parameter count (0: the whole network trains), the bytes of
    # one frozen backbone parameter (2: bf16, module.frozen_dtype), and the samples one item puts through the
    # network with gradients (2 for a preference pair: winner and loser).
    adapters: int = 0
    frozen_bytes: int = 4
    samples_per_item: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}; use one of {STRATEGIES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}; use one of {PRECISIONS}")
        if self.world_size % self.sequence_parallel:
            raise ValueError(f"sequence_parallel={self.sequence_parallel} does not divide world size {self.world_size}")
        if self.precision == "bf16-params" and self.strategy != "fsdp2":
            raise ValueError("bf16-params (bf16 compute copies of float32 parameters) is FSDP2's mixed precision")
        if self.adapters and self.strategy not in ("single", "ddp"):
            raise ValueError(f"adapter training runs with strategy single or ddp (the frozen backbone is replicated), not {self.strategy}")
        if self.frozen_bytes not in (2, 4) or self.samples_per_item < 1:
            raise ValueError(f"frozen_bytes {self.frozen_bytes} (2 or 4), samples_per_item {self.samples_per_item} (>= 1)")


@dataclass
class MemoryPlan:
    """Per-rank bytes of one training step (see the module docstring)."""

    config: TransformerConfig
    layout: Layout
    setup: Setup
    tokens_per_sample: int
    tokens_per_rank: int  # of one sample: its sequence-parallel shard
    num_params: int
    persistent: dict[str, int] = field(default_factory=dict)  # parameters, gradients, optimizer, activations
    transient: dict[str, int] = field(default_factory=dict)  # the buffers alive together in one block's backward

    @property
    def total(self) -> int:
        return sum(self.persistent.values()) + sum(self.transient.values())

    def fits(self, device_bytes: float) -> bool:
        return self.total <= (1 - HEADROOM) * device_bytes

    def table(self) -> str:
        rows = [("tokens per sample", f"{self.tokens_per_sample:,}"), ("tokens per rank", f"{self.tokens_per_rank:,}")]
        rows += [(k, _gib(v)) for k, v in self.persistent.items()]
        rows += [(f"transient: {k}", _gib(v)) for k, v in self.transient.items() if v]
        rows.append(("total per GPU", _gib(self.total)))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {k:<{width}}  {v:>12}" for k, v in rows)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _count_params(config: TransformerConfig) -> tuple[int, int, int]:
    """(all parameters, parameters of one block, weight-matrix parameters outside the blocks), exact: the model
    built on the meta device."""
    from .loading import build_model

    model = build_model(config, device="meta")
    in_blocks = {id(p) for p in model.blocks.parameters()}
    root_matrices = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks and p.ndim >= 2)
    return model.num_params(), sum(p.numel() for p in model.blocks[0].parameters()), root_matrices


def _checkpointed(n: int, blocks: bool | int | Iterable[int]) -> int:
    if blocks is True:
        return n
    if blocks is False or blocks is None:
        return 0
    if isinstance(blocks, int):
        return len(range(0, n, blocks))
    return len(set(blocks))


def plan_memory(config: TransformerConfig, layout: Layout, setup: Setup) -> MemoryPlan:
    """The per-rank memory of one training step of ``config`` on ``layout`` under ``setup``."""
    c, s = config, setup
    if c.num_heads % s.sequence_parallel:
        raise ValueError(f"sequence_parallel={s.sequence_parallel} does not divide the {c.num_heads} attention heads")
    d, f, heads, n_layers = c.dim, c.ffn_dim, c.num_heads, c.num_layers
    seg = layout.tokens(c.patch_size)
    length = sum(seg.values())
    local = math.ceil(length / s.sequence_parallel)
    b = s.batch * s.samples_per_item
    p_all, p_block, root_matrices = _count_params(c)
    p_root = p_all - n_layers * p_block
    w = s.world_size
    half = s.precision != "fp32"
    sc = 2 if half else 4  # bytes of the compute dtype
    plan = MemoryPlan(c, layout, s, length, local, p_all)

    # Parameters, gradients, optimizer state (float32 masters; AdamW's states in the parameters' dtype).
    trained = s.adapters or p_all
    if s.adapters:  # a frozen, replicated backbone; only the float32 adapters have gradients and optimizer state
        plan.persistent["parameters (frozen backbone)"] = s.frozen_bytes * p_all
        plan.persistent["parameters (adapters)"] = 4 * s.adapters
        plan.persistent["gradients"] = 4 * s.adapters
        plan.persistent["optimizer state"] = 4 * s.optimizer_states * s.adapters
    elif s.strategy in ("single", "ddp"):
        plan.persistent["parameters"] = 4 * p_all
        plan.persistent["gradients"] = 4 * p_all
        plan.persistent["optimizer state"] = 4 * s.optimizer_states * p_all
    elif s.strategy == "fsdp2":
        plan.persistent["parameters"] = 4 * p_all // w
        plan.persistent["gradients"] = 4 * p_all // w
        plan.persistent["optimizer state"] = 4 * s.optimizer_states * p_all // w
    else:  # DeepSpeed ZeRO with bf16: compute weights in bf16, fp32 masters and optimizer sharded
        full = s.strategy == "deepspeed_zero2"
        plan.persistent["parameters"] = (2 * p_all if full else 2 * p_all // w) + 4 * p_all // w
        plan.persistent["gradients"] = 2 * p_all // w
        plan.persistent["optimizer state"] = 4 * s.optimizer_states * p_all // w

    # Activations.
    cd, fd, ffn = _BLOCK_WIDTHS["fp32" if not half else s.precision]
    per_token = cd * d * sc + fd * d * 4 + ffn * f * sc + (_LSE_PER_HEAD * heads + _TOKEN_SCALARS) * 4
    context = (layout.text_tokens + layout.image_tokens) * d * (4 * sc + 4) + 3 * d * 4
    copies = s.precision == "bf16-autocast" and s.frozen_bytes == 4  # autocast's bf16 copies of float32 weights
    weights = (10 * d * d + 2 * d * f) * 2 if copies else 0
    sp_extra = d * sc if s.sequence_parallel > 1 else 0  # the o projection's input is no longer the attention output
    block = b * (local * (per_token + sp_extra) + context) + weights
    # Under autocast the residual stream stays float32 (the float32 mask-embedding bias is added to bf16 tokens).
    block_input = b * local * d * (4 if s.precision == "bf16-autocast" else sc)
    k = _checkpointed(n_layers, s.activation_checkpointing)
    plan.persistent["activations (blocks)"] = (n_layers - k) * block + k * block_input
    plan.persistent["activations (embeddings, head, loss)"] = b * _outside_blocks(c, layout, seg, local, s, sc) + (
        2 * root_matrices if copies else 0  # autocast's bf16 copies of the root's weights
    )

    # Transient buffers of one block's backward.
    if k:
        plan.transient["recomputed block"] = block
    plan.transient["activation gradients"] = b * local * (3 * d + f) * sc
    if s.strategy == "fsdp2" or s.strategy == "deepspeed_zero3":
        gathered = p_root + (2 if s.reshard_after_forward else n_layers) * p_block
        plan.transient["gathered parameters"] = gathered * sc
        plan.transient["unsharded block gradients"] = p_block * (sc + 4)
    if s.strategy in ("ddp", "deepspeed_zero2"):
        plan.transient["gradient buckets"] = min(4 * trained, 2 * 25 * 2**20 if s.strategy == "ddp" else 4 * 200_000_000)
    if s.sequence_parallel > 1:
        plan.transient["all-to-all buffers"] = b * 3 * local * d * sc * 3
    if s.attention_backend == "math":
        plan.transient["attention matrix (math backend)"] = b * (heads // s.sequence_parallel) * length * length * 4 * 2
    return plan


def _outside_blocks(c: TransformerConfig, layout: Layout, seg: dict[str, int], local: int, s: Setup, sc: int) -> int:
    """Saved bytes outside the blocks for one sample: the patch embeddings' inputs (whole sequence, on every
    rank), the text and CLIP projections, the RoPE factors, the output head (on the video tokens, or this rank's
    shard under sequence parallelism) and the loss."""
    patch = math.prod(c.patch_size)
    d = c.dim
    length = sum(seg.values())
    video = seg["video"]
    embed = (seg["reference"] + seg["video"] + seg["driving"]) * c.in_channels * patch
    embed += (seg["reference"] + seg["driving"]) * c.mask_channels * patch
    embed *= sc
    text = layout.text_tokens * (c.text_dim + 2 * d) * sc
    image = layout.image_tokens * (4 * c.image_dim + d + 4) * sc if c.image_dim else 0
    rope = length * c.head_dim * 4  # complex64 factors, shared by all blocks
    head_tokens = local if s.sequence_parallel > 1 else video
    # The head's norm keeps the last block's output: in float32 that is the whole (sliced) output, otherwise a
    # float32 copy of the head's tokens. Then the norm's output and statistics, the linear's input; the loss.
    last = (local if s.sequence_parallel > 1 else length) * d * 4 if s.precision != "bf16-params" else head_tokens * d * 4
    head = last + head_tokens * (d * 4 + d * sc + 2 * 4) + video * patch * c.out_channels * 4
    return embed + text + image + rope + head


_FIELDS = ("activation_checkpointing", "strategy", "precision", "batch")


def suggestions(config: TransformerConfig, layout: Layout, setup: Setup, device_bytes: float) -> list[tuple[str, MemoryPlan]]:
    """Single changes that make the job fit (``(override, plan)``), in this order: activation checkpointing,
    FSDP2, bf16 compute copies, sequence parallelism (the smallest degree first; divisors of the world size and
    of the heads), a smaller batch. When none does alone, all of them together with the smallest degree of
    sequence parallelism that fits."""
    s = setup
    options: list[tuple[str, Setup]] = []
    if _checkpointed(config.num_layers, s.activation_checkpointing) < config.num_layers:
        options.append(("module.activation_checkpointing=true", replace(s, activation_checkpointing=True)))
    if s.strategy in ("single", "ddp") and s.world_size > 1 and not s.adapters:
        options.append(("strategy=fsdp2", replace(s, strategy="fsdp2", precision="fp32" if s.precision == "fp32" else "bf16-params")))
    if s.strategy == "fsdp2" and s.precision != "bf16-params":
        options.append(("strategy.param_dtype=bfloat16 strategy.reduce_dtype=float32", replace(s, precision="bf16-params")))
    for sp in range(s.sequence_parallel + 1, s.world_size + 1):
        if s.world_size % sp == 0 and config.num_heads % sp == 0:
            options.append((f"strategy.sequence_parallel={sp}", replace(s, sequence_parallel=sp)))
    if s.batch > 1:
        options.append(("data.batch_size=1 (raise trainer.accumulate_grad_batches to keep the batch)", replace(s, batch=1)))
    fits = [(o, plan_memory(config, layout, st)) for o, st in options]
    fits = [(o, p) for o, p in fits if p.fits(device_bytes)]
    if fits or not options:
        return fits
    # Everything that helps at once, with the smallest sequence-parallel degree that fits.
    together = s
    names = []
    for o, st in options:
        if not o.startswith("strategy.sequence_parallel"):
            together = replace(together, **{k: getattr(st, k) for k in _FIELDS if getattr(st, k) != getattr(s, k)})
            names.append(o)
    for sp in range(s.sequence_parallel, s.world_size + 1):
        if s.world_size % sp or config.num_heads % sp:
            continue
        p = plan_memory(config, layout, replace(together, sequence_parallel=sp))
        if p.fits(device_bytes):
            extra = [f"strategy.sequence_parallel={sp}"] if sp != s.sequence_parallel else []
            return [(" ".join(names + extra), p)]
    return []


def report(plan: MemoryPlan, device_bytes: float | None = None) -> str:
    """The plan as text: the table, whether it fits ``device_bytes`` and what to change if not."""
    s = plan.setup
    c = plan.config
    lines = [
        f"{_count(plan.num_params)} parameters (dim {c.dim}, {c.num_layers} blocks, {c.num_heads} heads); "
        f"{s.strategy} on {s.world_size} GPU(s), sequence parallel {s.sequence_parallel}, batch {s.batch} per "
        f"replica, {s.precision}, activation checkpointing "
        f"{_checkpointed(c.num_layers, s.activation_checkpointing)}/{c.num_layers} blocks",
    ]
    if s.adapters:
        lines.append(
            f"adapter training: {_count(s.adapters)} adapter parameters train, the backbone is frozen "
            f"({'bf16' if s.frozen_bytes == 2 else 'fp32'}); {s.samples_per_item} samples per item with gradients"
        )
    lines.append(plan.table())
    if device_bytes is None:
        return "\n".join(lines)
    budget = (1 - HEADROOM) * device_bytes
    if plan.fits(device_bytes):
        lines.append(f"fits: {_gib(plan.total)} of {_gib(device_bytes)} per GPU ({_gib(budget)} usable, "
                     f"{HEADROOM:.0%} kept free)")
        return "\n".join(lines)
    lines.append(f"does NOT fit: {_gib(plan.total)} > {_gib(budget)} usable of {_gib(device_bytes)} per GPU")
    found = suggestions(c, plan.layout, s, device_bytes)
    if found:
        lines.append("changes that fit:")
        lines += [f"  {o}  -> {_gib(p.total)}" for o, p in found]
    else:
        lines.append("no single change here fits; use more GPUs (more FSDP2 shards, a larger sequence_parallel) "
                     "or a smaller clip")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- measurement
def saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs, counted once per storage and without the
    parameters: the measurement the planner is validated against (`tests/test_plan.py`)."""
    from torch.autograd.graph import saved_tensors_hooks

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
