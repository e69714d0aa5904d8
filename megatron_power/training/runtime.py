"""Process groups, Megatron parallel state, this process's device and seeds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_power.errors import DeviceError
from megatron_power.training import hardware
from megatron_power.training.hardware import Hardware


@dataclass
class Runtime:
    rank: int
    world_size: int
    hardware: Hardware
    device: torch.device
    dp: int
    dp_rank: int
    is_last_stage: bool

    @property
    def is_logger(self) -> bool:
        """The rank that prints and writes TensorBoard: the last rank, which is on the last
        pipeline stage (where the loss is)."""
        return self.rank == self.world_size - 1


def initialize(config, hw: Hardware = None, alone: bool = False) -> Runtime:
    """Start the process group (NCCL on GPUs, gloo on CPUs) and Megatron's parallel state.

    `hw` (default: this machine) says where the model will live; `alone=True` starts a private
    single-process group whatever the launcher set, for a model that is only counted.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_power.training import cpu_compat

    hw = hw or hardware.detect()
    cpu_compat.install(hardware.detect())  # bridges for what this machine lacks, whatever `hw` plans
    rank = 0 if alone else int(os.environ.get("RANK", "0"))
    world_size = 1 if alone else int(os.environ.get("WORLD_SIZE", "1"))
    if hw.cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"process {local_rank} on this node has no GPU of its own ({torch.cuda.device_count()} visible): "
                f"start one process per GPU, or hide CUDA (CUDA_VISIBLE_DEVICES='') to run on the CPU")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torchrun and the SLURM script set MASTER_ADDR; a process started by hand gets a free port
        # of its own, not left in the environment, so that processes it starts pick their own.
        shared = "MASTER_ADDR" in os.environ and not alone
        init = "env://" if shared else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group("nccl" if hw.cuda else "gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=config.parallel.tp,
        pipeline_model_parallel_size=config.parallel.pp,
        expert_model_parallel_size=config.parallel.ep,
    )
    seed = config.train.seed
    torch.manual_seed(seed)
    from megatron_power.training.cuda_graphs import graphed_modules

    tensor_parallel.model_parallel_cuda_manual_seed(seed, te_rng_tracker=bool(graphed_modules(config, hw)))
    return Runtime(
        rank=rank,
        world_size=world_size,
        hardware=hw,
        device=torch.device("cuda", torch.cuda.current_device()) if hw.cuda else torch.device("cpu"),
        dp=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        is_last_stage=ps.is_pipeline_last_stage(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
