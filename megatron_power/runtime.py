"""Process groups, Megatron parallel state, device choice and seeds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    dp_rank: int
    is_first_stage: bool
    is_last_stage: bool

    @property
    def is_logger(self) -> bool:
        """The rank that prints and writes TensorBoard: last pipeline stage, first of its TP/DP."""
        return self.rank == self.world_size - 1


def initialize(config) -> Runtime:
    """Start the process group (NCCL with CUDA, gloo without) and Megatron's parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_power import cpu_compat

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.install()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # torchrun and the SLURM script set MASTER_ADDR; a process started by hand gets a free port
        # of its own, not left in the environment, so that processes it starts pick their own.
        init = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=config.parallel.tp,
        pipeline_model_parallel_size=config.parallel.pp,
        expert_model_parallel_size=config.parallel.ep,
    )
    seed = config.train.seed
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Runtime(
        rank=rank,
        world_size=world_size,
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        tp=config.parallel.tp,
        pp=config.parallel.pp,
        dp=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        is_first_stage=ps.is_pipeline_first_stage(),
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
