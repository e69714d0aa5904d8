"""Checkpoints with megatron.core.dist_checkpointing: atomic save, a "latest" marker, resume.

Layout under the checkpoint directory:
    iter_0000200/        a complete checkpoint (written as iter_0000200.tmp, renamed when done)
    latest               text file naming the newest complete checkpoint, replaced atomically

A crash while saving leaves at most a *.tmp directory, which is never read, and the previous
checkpoint and marker untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# Megatron-Core is imported by the functions that save and load tensors; finding a checkpoint
# and reading its saved state (all `convert to-hf` needs of this module) does without it.

LATEST = "latest"
# Optimizer state in the canonical per-parameter form, so a checkpoint can be loaded into a
# different TP / PP / DP layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    pass


def _core(model):
    """The GPTModel inside Megatron's DDP (and Float16Module) wrappers, or the model itself."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharded_state_dict(model, optimizer, state: Optional[dict], is_loading: bool) -> dict:
    model_sd = _core(model).sharded_state_dict(prefix="")
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    sharded["state"] = state if state is not None else {}
    return sharded


def save(root: Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Save a complete checkpoint of `step`, then point "latest" at it and prune old ones."""
    final = root / f"iter_{step:07d}"
    tmp = root / f"iter_{step:07d}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    from megatron.core import dist_checkpointing

    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model, optimizer, state, is_loading=False), str(tmp))
    dist.barrier()
    if rank0:
        if final.exists():  # the same step saved before (a rerun of a finished run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker = root / (LATEST + ".tmp")
        marker.write_text(final.name + "\n")
        os.replace(marker, root / LATEST)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None when there is none."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{marker} names {path}, which is not a complete checkpoint "
                              f"(expected a dist_checkpointing directory with metadata.json)")
    return path


def resolve(path: Path) -> Path:
    """A checkpoint named by its run's checkpoints directory (its latest) or by itself."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a run's checkpoints directory "
                              f"or one of its iter_* checkpoints)")
    if (path / "metadata.json").is_file():
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint (expected a dist_checkpointing directory "
                              f"with metadata.json, or a checkpoints directory with a '{LATEST}' marker)")
    return found


EXTRA_STATE = "_extra_state"  # Transformer Engine's FP8 scaling state, one per TE module


def load(path: Path, model, optimizer) -> dict:
    """Load model (and, unless `optimizer` is None, optimizer) state in place; return the saved
    state (training progress and config).

    A checkpoint written with Megatron's local layers (on a CPU, or by `convert from-hf`) has no
    Transformer Engine extra state; TE's modules then keep their fresh FP8 state, as at the start
    of a run. One written under TE loads into local layers, which ask for no extra state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    sharded = _sharded_state_dict(model, optimizer, None, is_loading=True)
    saved_keys = {v.key for v in load_sharded_metadata(str(path)).values()}
    absent = [k for k, v in sharded["model"].items() if k.endswith(EXTRA_STATE) and v.key not in saved_keys]
    for k in absent:
        del sharded["model"][k]
    loaded = dist_checkpointing.load(sharded, str(path))
    result = _core(model).load_state_dict(loaded["model"], strict=False)
    wrong = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)] + list(result.unexpected_keys)
    if wrong:
        raise CheckpointError(f"{path} does not match this model: {', '.join(wrong[:5])}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return loaded["state"]


def saved_state(path: Path) -> dict:
    """The state saved beside the tensors (training progress, config), read without loading them."""
    # Megatron's `torch` common backend keeps the non-tensor state in one torch.save file.
    common_file = path / "common.pt"
    if not common_file.is_file():
        raise CheckpointError(f"{path} has no common.pt (expected a dist_checkpointing directory saved by "
                              f"megatron-power)")
    common = torch.load(common_file, map_location="cpu")
    state = common.get("state") if isinstance(common, dict) else None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path} is not a megatron-power checkpoint (its common state holds no config)")
    return state
