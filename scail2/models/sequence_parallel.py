"""Ulysses sequence parallelism: one packed sequence spread over the ranks of a process group.

SCAIL-2's in-context sequence is long (48,832 tokens at 512x896, ~96k at 704x1280), so one sample can be split
over ``sp`` ranks. Every rank of a sequence-parallel group holds the same sample; after the embeddings (which
every rank computes for the whole sequence: they are per token and cheap) the packed sequence, whatever its
layout (extra references, reference, video, driving), is

1. padded at its end to a multiple of ``sp`` and split into ``sp`` equal contiguous shards (`SequenceParallel.shard`);
2. run through the blocks on the local shard. Cross-attention (the text and CLIP context is on every rank), the
   FFN, norms and modulation are per token. Self-attention (`UlyssesSelfAttention`) computes q, k, v of the local
   tokens with their own RoPE factors (the factors are split with the tokens), then an all-to-all turns
   "all heads of L/sp tokens" into "H/sp heads of all L tokens"; attention runs over the whole sequence for
   those heads with the padding tokens left out of the keys (exactly what masking them does); a second
   all-to-all turns the result back;
3. the output head runs on the local shard, and the shards are gathered (`SequenceParallel.gather`), the
   padding dropped. Every rank ends with the full output, so the loss (or the sampler) runs unchanged.

Gradients: every rank of a group computes the same loss from the gathered output; the backward of the gather
hands each rank only its own shard's gradient, so each rank's parameter gradients are its shard's share and
the group's sum is the full gradient. The trainer's gradient averaging over all ranks therefore needs the loss
scaled by ``sp`` (`scail2.lit.base.SCAIL2Module.backward`).

The variants are swapped in from outside by `apply_sequence_parallel` (parameter names are unchanged); the
model code stays single-device.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import attention
from .wan import SelfAttention, WanModel


class SequenceParallel:
    """The process group that shares one sequence, and the collectives Ulysses needs."""

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "sequence parallelism needs an initialised process group: start the processes with torchrun "
                "(or a Lightning strategy) before applying it"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def __deepcopy__(self, memo: dict) -> "SequenceParallel":
        return self  # a process group is not copyable; copies of a model share its group

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    def local_length(self, length: int) -> int:
        """Tokens per rank for a sequence of ``length`` tokens (padded up to a multiple of the group size)."""
        return math.ceil(length / self.size)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice along dim 1 of ``x`` (B, L, ...), zero-padded at the end to ``size`` equal shards."""
        n = self.local_length(x.shape[1])
        pad = n * self.size - x.shape[1]
        if pad:
            x = F.pad(x, [0, 0] * (x.ndim - 2) + [0, pad])
        return x[:, self.rank * n : (self.rank + 1) * n]

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Every rank's shard (B, L/sp, ...) concatenated along dim 1, padding dropped: (B, length, ...).

        Backward: this rank's slice of the gradient (every rank holds the same loss, see the module docstring).
        """
        return _gather(x, self)[:, :length]

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L/sp, H, D) local tokens, all heads -> (..., L, H/sp, D) all tokens, this rank's heads."""
        return _seq_to_heads(x, self)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `seq_to_heads`: (..., L, H/sp, D) -> (..., L/sp, H, D)."""
        return _heads_to_seq(x, self)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Copy the group's first rank's values into ``tensors`` on every rank (in place)."""
        src = dist.get_global_rank(self.group, 0)
        for t in tensors:
            buf = t if t.is_contiguous() else t.contiguous()
            dist.broadcast(buf, src=src, group=self.group)
            if buf is not t:
                t.copy_(buf)


# ----------------------------------------------------------------------------------------------- collectives
def _all_to_all(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Exchange chunk j of dim 0 with rank j: out[j] = rank j's x[rank]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=sp.group)
    return out


def _split_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    *lead, n, h, d = x.shape
    if h % sp.size:
        raise ValueError(f"{h} attention heads cannot be split over {sp.size} sequence-parallel ranks")
    x = x.reshape(*lead, n, sp.size, h // sp.size, d).movedim(-3, 0)  # (sp, ..., L/sp, H/sp, D)
    out = _all_to_all(x, sp)  # out[j]: rank j's tokens, this rank's heads
    return out.movedim(0, -4).reshape(*lead, sp.size * n, h // sp.size, d)


def _merge_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    *lead, length, h, d = x.shape
    n = length // sp.size
    x = x.reshape(*lead, sp.size, n, h, d).movedim(-4, 0)  # (sp, ..., L/sp, H/sp, D): chunk j = rank j's tokens
    out = _all_to_all(x, sp)  # out[j]: rank j's heads of this rank's tokens
    return out.movedim(0, -3).reshape(*lead, n, sp.size * h, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return _split_heads(x, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _merge_heads(grad, ctx.sp), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return _merge_heads(x, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split_heads(grad, ctx.sp), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp, ctx.n = sp, x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x, group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r, n = ctx.sp.rank, ctx.n
        return grad[:, r * n : (r + 1) * n], None


# Collectives are opaque to torch.compile: a compiled block is split around them (graph breaks), which keeps
# the process-group calls in eager mode on every backend.
@torch.compiler.disable
def _seq_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    return _SeqToHeads.apply(x, sp)


@torch.compiler.disable
def _heads_to_seq(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    return _HeadsToSeq.apply(x, sp)


@torch.compiler.disable
def _gather(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    return _Gather.apply(x, sp)


# ----------------------------------------------------------------------------------------------- the variants
class UlyssesSelfAttention(SelfAttention):
    """Self-attention of a sequence shard: ``x`` (B, L/sp, dim) is this rank's shard (padded), ``rope``
    (B | 1, L, head_dim/2, 2) covers the whole unpadded sequence. Same parameters as `SelfAttention`."""

    sequence_parallel: SequenceParallel

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        sp = self.sequence_parallel
        length = rope.shape[1]
        q, k, v = self.qkv(x, sp.shard(rope))  # (B, L/sp, H, D) each, RoPE of this rank's tokens
        q, k, v = sp.seq_to_heads(torch.stack([q, k, v]))  # (B, L_pad, H/sp, D) each
        # The padding tokens (at the end) are left out of the keys and values: masked out of every query.
        out = attention(q, k[:, :length], v[:, :length], self.attention_backend)
        return self.o(sp.heads_to_seq(out).flatten(2))  # (B, L/sp, dim)


class _SequenceParallelModel:
    """Mixin of the model variant: the blocks and the head run on this rank's shard of the sequence."""

    sequence_parallel: SequenceParallel

    def run_sequence(self, x, e, e0, context, context_img, rope, keep):
        sp = self.sequence_parallel
        out = super().run_sequence(sp.shard(x), e, e0, context, context_img, rope, slice(None))
        return sp.gather(out, x.shape[1])[:, keep]


@functools.cache
def _sequence_parallel_class(cls: type) -> type:
    return type(f"SequenceParallel{cls.__name__}", (_SequenceParallelModel, cls), {"__module__": cls.__module__})


def apply_sequence_parallel(model: WanModel, sp: SequenceParallel) -> None:
    """Turn ``model`` (in place) into its sequence-parallel variant over ``sp``'s group.

    Must come before FSDP sharding (see `scail2.models.parallelize.parallelize`). A group of one rank leaves the
    model as it is.
    """
    heads = model.config.num_heads
    if heads % sp.size:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(
            f"sequence_parallel={sp.size}: the model's {heads} attention heads are not divisible by {sp.size}; "
            f"use one of {divisors}"
        )
    if isinstance(model, _SequenceParallelModel):
        raise ValueError("the model is already sequence parallel")
    if sp.size == 1:
        return
    for block in model.blocks:
        if type(block.self_attn) is not SelfAttention:
            raise TypeError(f"sequence parallelism needs plain SelfAttention modules, found {type(block.self_attn).__name__}")
        block.self_attn.__class__ = UlyssesSelfAttention
        block.self_attn.sequence_parallel = sp
    model.__class__ = _sequence_parallel_class(type(model))
    model.sequence_parallel = sp


def sequence_parallel_of(model: torch.nn.Module) -> SequenceParallel | None:
    """The group ``model`` is sequence parallel over, or None."""
    return model.sequence_parallel if isinstance(model, _SequenceParallelModel) else None
