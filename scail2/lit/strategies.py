"""Strategy factories of the ``strategy`` config group. A strategy builds the device mesh and calls
`scail2.models.parallelize.parallelize` on the network; nothing else here touches the model.

- ``single``: one device (`single_device`).
- ``ddp``: `DDPStrategy`, Lightning's ``DDPStrategy`` (gloo on CPU, NCCL on GPU) with optional sequence
  parallelism (``sequence_parallel``).
- ``fsdp2``: `FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` with a ``(dp, sp)`` mesh: ``fully_shard``
  over all ranks, every transformer block then the root (torchtitan's recipe), and optional Ulysses sequence
  parallelism over the ``sp`` dimension. Runs on CPU (gloo) and GPU (NCCL).
- ``deepspeed_zero2`` / ``deepspeed_zero3``: Lightning's ``DeepSpeedStrategy`` (CUDA only; refused elsewhere with
  a message naming the alternatives).

With ``sequence_parallel = sp``, the ``world_size`` ranks form ``world_size / sp`` data-parallel replicas of ``sp``
ranks each; the ranks of a replica read the same batch (the sampler sees ``dp`` replicas) and draw the same noise,
and share each sequence (`scail2.models.sequence_parallel`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy, Strategy

from scail2.models.attention import DEFAULT_BACKEND
from scail2.models.parallelize import Parallelized, parallelize
from scail2.models.wan import WanModel
from scail2.utils.dtypes import DTYPES as _DTYPES


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{what}={name!r}; use one of {sorted(_DTYPES)} or null")
    return _DTYPES[name]


def single_device(accelerator: str = "auto") -> SingleDeviceStrategy:
    """One process on one device: the local CUDA device when there is one (``auto``/``gpu``), else the CPU."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer=cpu")
        return SingleDeviceStrategy(device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    if accelerator in ("cpu", "auto"):
        return SingleDeviceStrategy(device=torch.device("cpu"))
    raise ValueError(f"strategy=single supports trainer.accelerator cpu, gpu or auto; got {accelerator!r}")


class MeshStrategy:
    """What `DDPStrategy` and `FSDP2Strategy` share: the ``(dp, sp)`` mesh, the sampler's view of it, and the
    call of `parallelize`. ``self.mesh`` is None until the processes are set up (and for DDP without
    sequence parallelism)."""

    sequence_parallel: int
    mesh: Any = None

    def _check_sequence_parallel(self, world_size: int) -> int:
        """The number of data-parallel replicas; raises if ``sequence_parallel`` does not divide the world."""
        sp = self.sequence_parallel
        if sp < 1 or world_size % sp:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(
                f"strategy.sequence_parallel={sp} does not divide the world size {world_size} (trainer.num_nodes x "
                f"trainer.devices); use one of {divisors}"
            )
        return world_size // sp

    def _build_mesh(self, device_type: str, world_size: int) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        dp = self._check_sequence_parallel(world_size)
        return init_device_mesh(device_type, (dp, self.sequence_parallel), mesh_dim_names=("dp", "sp"))

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process's replica among the data-parallel replicas."""
        if self.mesh is None:
            return self.global_rank, self.world_size  # type: ignore[attr-defined]
        return self.mesh["dp"].get_local_rank(), self.mesh["dp"].size()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        rank, size = self.data_parallel
        return {"num_replicas": size, "rank": rank}

    def sequence_group(self) -> Any:
        """The 1-D mesh of the ranks sharing this rank's sequences, or None without sequence parallelism."""
        return self.mesh["sp"] if self.mesh is not None and self.sequence_parallel > 1 else None

    def fsdp_mesh(self) -> Any:
        """The mesh parameters are sharded over (None: not sharded)."""
        return None

    def parallelize(
        self,
        model: WanModel,
        activation_checkpointing: bool | int | list[int] = False,
        compile: bool = False,
        attention_backend: str = DEFAULT_BACKEND,
    ) -> Parallelized:
        """Called by the module's ``configure_model``: `scail2.models.parallelize.parallelize` on this mesh."""
        return parallelize(
            model,
            sequence_parallel=self.sequence_group(),
            activation_checkpointing=activation_checkpointing,
            compile=compile,
            attention_backend=attention_backend,
            **self._sharding(),
        )

    def _sharding(self) -> dict[str, Any]:
        return {}


def data_parallel(strategy: Strategy) -> tuple[int, int]:
    """(rank, size) among the data-parallel replicas: ranks that share sequences count as one replica."""
    if isinstance(strategy, MeshStrategy):
        return strategy.data_parallel
    return strategy.global_rank, strategy.world_size


def sequence_parallel_size(strategy: Strategy) -> int:
    """Ranks that share one sequence under ``strategy`` (1 without sequence parallelism)."""
    return strategy.sequence_parallel if isinstance(strategy, MeshStrategy) else 1


class DDPStrategy(MeshStrategy, _LightningDDPStrategy):
    """Lightning's DDP (a full model copy per process, gradients all-reduced) with optional sequence parallelism.

    Args:
        sequence_parallel: ranks that share one sequence (Ulysses); must divide the world size and the number
            of attention heads. 1 = plain data parallelism.
        find_unused_parameters, gradient_as_bucket_view: passed to ``DistributedDataParallel``.
        process_group_backend: None = NCCL on GPU, gloo on CPU.
    """

    def __init__(
        self,
        sequence_parallel: int = 1,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = True,
        process_group_backend: str | None = None,
    ):
        super().__init__(
            process_group_backend=process_group_backend,
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=gradient_as_bucket_view,
        )
        self.sequence_parallel = int(sequence_parallel)
        self.mesh = None

    def setup_environment(self) -> None:
        super().setup_environment()
        self._check_sequence_parallel(self.world_size)
        if self.sequence_parallel > 1:
            self.mesh = self._build_mesh(self.root_device.type, self.world_size)


class FSDP2Strategy(MeshStrategy, ModelParallelStrategy):
    """FSDP2 over all processes (parameters, gradients and optimizer state sharded per block), with optional
    Ulysses sequence parallelism: Lightning's ``ModelParallelStrategy`` with a ``(dp, sp)`` device mesh.

    Args:
        sequence_parallel: ranks that share one sequence; must divide the world size and the number of attention
            heads. Parameters stay sharded over all ``dp x sp`` ranks.
        data_parallel_size: data-parallel replicas; "auto" = world size / sequence_parallel (an int must equal it).
        param_dtype, reduce_dtype: FSDP mixed precision ("bfloat16", "float32", ...); null keeps fp32 parameters
            (then use trainer.precision=bf16-mixed for autocast).
        reshard_after_forward: free gathered parameters after each block's forward (saves memory; backward
            gathers them again).
        save_distributed_checkpoint: each rank writes its shard (a checkpoint folder); False gathers a single file.
        process_group_backend: None = NCCL on GPU, gloo on CPU.

    Distributed checkpoints are written to a hidden temporary folder and renamed when every rank has finished,
    so an interrupted save never looks complete.
    """

    def __init__(
        self,
        sequence_parallel: int = 1,
        data_parallel_size: int | str = "auto",
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ):
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.sequence_parallel = int(sequence_parallel)
        self.param_dtype = _dtype(param_dtype, "strategy.param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "strategy.reduce_dtype")
        self.reshard_after_forward = reshard_after_forward
        self.mesh = self._shard_mesh = None

    def setup_environment(self) -> None:
        # ModelParallelStrategy's setup with our (dp, sp) mesh instead of its (data, tensor) one.
        self._setup_distributed()
        dp = self._check_sequence_parallel(self.world_size)
        if self._data_parallel_size not in ("auto", dp):
            raise ValueError(
                f"strategy.data_parallel_size={self._data_parallel_size} but {self.world_size} processes with "
                f"sequence_parallel={self.sequence_parallel} make {dp} data-parallel replicas; leave it at auto"
            )
        self._data_parallel_size = dp
        self.mesh = self._device_mesh = self._build_mesh(self.root_device.type, self.world_size)
        # Parameters are sharded over every rank, also within a sequence group (a flattened (dp, sp) mesh).
        self._shard_mesh = self.mesh["dp"] if self.sequence_parallel == 1 else self.mesh["dp", "sp"]._flatten("dp_sp")
        # Lightning hands the mesh to the module (configure_model reads it).
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    def fsdp_mesh(self) -> Any:
        assert self.mesh is not None, "the mesh is built when the processes are set up"
        return self._shard_mesh

    def _sharding(self) -> dict[str, Any]:
        return {
            "fsdp_mesh": self.fsdp_mesh(),
            "param_dtype": self.param_dtype,
            "reduce_dtype": self.reduce_dtype,
            "reshard_after_forward": self.reshard_after_forward,
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            os.replace(partial, path)
        self.barrier()


def deepspeed(
    stage: int = 2,
    accelerator: str = "auto",
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: int = 200_000_000,
    reduce_bucket_size: int = 200_000_000,
    logging_batch_size_per_gpu: int = 1,
) -> Strategy:
    """Lightning's ``DeepSpeedStrategy`` (ZeRO ``stage`` 2 or 3). CUDA only: refused on CPU with the alternatives."""
    if stage not in (2, 3):
        raise ValueError(f"deepspeed stage {stage}; use 2 (strategy=deepspeed_zero2) or 3 (strategy=deepspeed_zero3)")
    if accelerator == "cpu" or not torch.cuda.is_available():
        raise RuntimeError(
            f"strategy=deepspeed_zero{stage} needs CUDA GPUs: Lightning's DeepSpeedStrategy does not run on CPU. "
            "On this machine use strategy=fsdp2 (FSDP2 shards on CPU with gloo) or strategy=ddp"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError(
            f"strategy=deepspeed_zero{stage} needs the deepspeed package: pip install 'scail2[deepspeed]' "
            "(or use strategy=fsdp2, which needs nothing beyond torch)"
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        allgather_bucket_size=allgather_bucket_size,
        reduce_bucket_size=reduce_bucket_size,
        logging_batch_size_per_gpu=logging_batch_size_per_gpu,
    )
