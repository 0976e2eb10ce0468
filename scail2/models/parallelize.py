"""Everything applied to a model from outside, in one place and in one order (torchtitan's).

    parallelize(model, sequence_parallel=sp, activation_checkpointing=True, compile=True,
                fsdp_mesh=mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

1. **sequence parallelism** (Ulysses, `scail2.models.sequence_parallel`): the sequence-parallel variants of the
   model and of its self-attention modules are swapped in;
2. **activation checkpointing** per block, every block or every k-th: the block's class becomes a
   checkpointed subclass whose ``forward`` recomputes the block in backward;
3. **torch.compile** per block, in place (``nn.Module.compile``; one compiled graph serves every block);
4. **FSDP2** ``fully_shard`` per block, then the root (embeddings, head, what is left), with the
   mixed-precision policy (e.g. bf16 parameters for compute and all-gathers, fp32 gradient reduction). Inputs
   are not cast by FSDP: the model casts token inputs to its parameters' dtype and keeps the timestep, RoPE
   factors, norms and modulation in float32 as it does on one device.

Every step leaves parameter names unchanged (no wrapper modules), so checkpoints, LoRA target names and
sharding plans do not depend on the settings. The Lightning strategies (`scail2.lit.strategies`) only build
the device mesh and call :func:`parallelize`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .attention import DEFAULT_BACKEND, set_attention_backend
from .sequence_parallel import SequenceParallel, apply_sequence_parallel
from .wan import WanModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parallelized:
    """What :func:`parallelize` applied."""

    sequence_parallel: int  # ranks sharing one sequence (1 = none)
    checkpointed_blocks: tuple[int, ...]
    compiled: bool
    sharded: bool  # FSDP2
    attention_backend: str


# ----------------------------------------------------------------------------------------------- checkpointing
class _Checkpointed:
    """Mixin of a checkpointed block: under autograd, its activations are recomputed in backward."""

    def forward(self, *args: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False)
        return super().forward(*args)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"__module__": cls.__module__})


def _chosen_blocks(n: int, blocks: bool | int | Iterable[int]) -> set[int]:
    if blocks is True:
        return set(range(n))
    if blocks is False or blocks is None:
        return set()
    if isinstance(blocks, int):
        if blocks < 1:
            raise ValueError(f"checkpoint every {blocks}-th block: need a positive integer (or true / false)")
        return set(range(0, n, blocks))
    chosen = {int(i) for i in blocks}
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise ValueError(f"block indices {bad} out of range for a model with {n} blocks")
    return chosen


def apply_activation_checkpointing(model: WanModel, blocks: bool | int | Iterable[int] = True) -> list[int]:
    """Recompute the chosen blocks' activations in backward instead of storing them.

    ``blocks``: True = every block, False = none, an int k = every k-th block (0, k, 2k, ...; selective
    checkpointing), or explicit block indices. Applying it again replaces the previous choice (before sharding).
    Returns the indices now checkpointed. Parameter names are unchanged.
    """
    from torch.distributed.fsdp import FSDPModule

    chosen = _chosen_blocks(len(model.blocks), blocks)
    for i, block in enumerate(model.blocks):
        if isinstance(block, FSDPModule):
            raise ValueError("apply activation checkpointing before FSDP sharding (parallelize does it in that order)")
        base = type(block).__mro__[2] if isinstance(block, _Checkpointed) else type(block)
        block.__class__ = _checkpointed_class(base) if i in chosen else base
    return sorted(chosen)


def checkpointed_blocks(model: WanModel) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    return [i for i, block in enumerate(model.blocks) if isinstance(block, _Checkpointed)]


# ----------------------------------------------------------------------------------------------- compile
def compile_blocks(model: WanModel, **options: Any) -> None:
    """``torch.compile`` every block in place (``options`` go to ``torch.compile``, e.g. ``mode``).

    Compilation happens at the first call. The blocks share their code, so one graph serves all of them; a
    sequence-parallel block is split into graphs around its all-to-alls.
    """
    for block in model.blocks:
        block.compile(**options)


def compiled(model: WanModel) -> bool:
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks)


# ----------------------------------------------------------------------------------------------- FSDP2
def fully_shard_model(
    model: WanModel,
    mesh: Any,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, head and what is left).

    One block is one all-gather unit, so at most a block or two of full parameters exist at a time. The last
    block is not resharded after forward: backward starts with it, so resharding would gather it again at once.
    ``param_dtype`` / ``reduce_dtype``: FSDP mixed precision (e.g. bf16 compute and all-gathers, fp32 gradient
    reduction, fp32 sharded master weights); None keeps the parameters' dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The model casts what it needs itself; FSDP casting every floating input would quantise the timestep and
    # the RoPE factors to bf16.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


# ----------------------------------------------------------------------------------------------- all of it
def parallelize(
    model: WanModel,
    *,
    sequence_parallel: SequenceParallel | Any = None,
    activation_checkpointing: bool | int | Iterable[int] = False,
    compile: bool = False,
    fsdp_mesh: Any = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    attention_backend: str = DEFAULT_BACKEND,
) -> Parallelized:
    """Apply (in place, in this order) sequence parallelism, activation checkpointing, compilation and FSDP2.

    Args:
        sequence_parallel: a `SequenceParallel`, or the process group (or 1-D device mesh) of the ranks that share
            one sequence; None = none.
        activation_checkpointing: True (every block), False, k (every k-th block) or block indices.
        compile: ``torch.compile`` every block.
        fsdp_mesh: 1-D device mesh to shard parameters, gradients and optimizer state over (all ranks, also
            those of one sequence-parallel group); None = no sharding.
        param_dtype, reduce_dtype, reshard_after_forward: FSDP2 settings (see `fully_shard_model`).
        attention_backend: the attention kernel (`scail2.models.attention.BACKENDS`), logged once.
    """
    if not isinstance(model, WanModel):
        raise TypeError(f"parallelize takes a WanModel / SCAIL2Transformer, got {type(model).__name__}")
    if fsdp_mesh is None and (param_dtype is not None or reduce_dtype is not None):
        raise ValueError("param_dtype / reduce_dtype are FSDP2 mixed-precision settings: they need fsdp_mesh")
    set_attention_backend(model, attention_backend)
    sp = None
    if sequence_parallel is not None:
        sp = sequence_parallel if isinstance(sequence_parallel, SequenceParallel) else SequenceParallel(_group(sequence_parallel))
        apply_sequence_parallel(model, sp)
    chosen = apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        compile_blocks(model)
    if fsdp_mesh is not None:
        fully_shard_model(model, fsdp_mesh, param_dtype, reduce_dtype, reshard_after_forward)
    done = Parallelized(
        sequence_parallel=sp.size if sp is not None else 1,
        checkpointed_blocks=tuple(chosen),
        compiled=bool(compile),
        sharded=fsdp_mesh is not None,
        attention_backend=attention_backend,
    )
    log.info(
        "parallelized %s: sequence parallel %d, activation checkpointing on %d of %d blocks, compile %s, FSDP2 %s",
        type(model).__name__, done.sequence_parallel, len(chosen), len(model.blocks), done.compiled,
        f"over {fsdp_mesh.size()} ranks" if done.sharded else "off",
    )
    return done


def _group(obj: Any) -> Any:
    """The process group of a 1-D device mesh, or ``obj`` itself."""
    get_group = getattr(obj, "get_group", None)
    return get_group() if callable(get_group) else obj
