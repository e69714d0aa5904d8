"""One job at a time writes a run folder.

Two jobs given the same run (a resubmitted job while the first still runs, a sweep point started
twice) would write the same checkpoints and metrics. The first rank holds an exclusive lock on
RUN/.lock for the run's life; the kernel releases it when the process ends in any way, so a killed
or requeued job leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_power.errors import ConfigError

LOCK = ".lock"
_held = []  # the open lock file, kept for the life of the process


def hold(run_dir: Path, rt) -> None:
    """Take the run folder's lock on rank 0; on every rank, raise ConfigError if another process has it."""
    holder = take(run_dir) if rt.rank == 0 else None
    taken_elsewhere = torch.tensor([float(holder is not None)], device=rt.device)
    dist.all_reduce(taken_elsewhere)
    if taken_elsewhere.item():
        raise ConfigError(f"{run_dir} is in use by another run ({holder or 'see rank 0'}); wait for it to end, "
                          f"or give this run another name= or out_dir=")


def take(run_dir: Path):
    """None once this process holds the lock; else what the holder wrote (its pid and host)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that did not say which"
        f.close()
        return holder
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held.append(f)
    return None


def release() -> None:
    """Let go of the lock (at the end of a run; a process that dies lets go by itself)."""
    while _held:
        _held.pop().close()
