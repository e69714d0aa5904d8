"""Checkpoints with megatron.core.dist_checkpointing: atomic save, a "latest" marker, resume.

Layout under the checkpoint directory:
    iter_0000200/        a complete checkpoint (written as iter_0000200.tmp, renamed when done)
    latest               text file naming the newest complete checkpoint, replaced atomically

A crash while saving leaves at most a *.tmp directory, which is never read, and the previous
checkpoint and marker untouched. A run resumes from the newest complete checkpoint whose files are
whole (`intact`), whatever the marker says: a missing, garbled or stale marker, or a newest
checkpoint damaged by a copy or a full disk, costs the steps since the previous one, never the run.
Pruning only removes checkpoints older than the one just written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch.distributed as dist

from megatron_power.config.schema import from_yaml
from megatron_power.errors import CheckpointError

LATEST = "latest"
# Optimizer state in the canonical per-parameter form, so a checkpoint can be loaded into a
# different TP / PP / DP layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def core(model):
    """The GPTModel inside Megatron's DDP (and Float16Module) wrappers, or the model itself."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharded_state_dict(model, optimizer, state: Optional[dict], is_loading: bool) -> dict:
    model_sd = core(model).sharded_state_dict(prefix="")
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    sharded["state"] = state if state is not None else {}
    return sharded


def save(root: Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Save a complete checkpoint of `step`, then point "latest" at it and prune older ones."""
    final = path_of(root, step)
    tmp = final.with_name(final.name + TMP)
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    from megatron.core import dist_checkpointing

    dist.barrier()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dist_checkpointing.save(_sharded_state_dict(model, optimizer, state, is_loading=False), str(tmp))
    except (OSError, RuntimeError, CheckpointException) as e:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e, root):
            raise CheckpointError(f"no space left on device while saving {final} (the partial save was removed; "
                                  f"{latest(root) or 'no earlier checkpoint'} is the latest)") from None
        raise
    dist.barrier()
    if rank0:
        if final.exists():  # the same step saved before (a rerun, or a damaged copy): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        mark_latest(root, final)
        _prune(root, step, keep)
    dist.barrier()
    return final


def mark_latest(root: Path, path: Path) -> None:
    """Point the `latest` marker at `path`, atomically."""
    marker = root / (LATEST + ".tmp")
    marker.write_text(path.name + "\n")
    os.replace(marker, root / LATEST)


def _no_space(error: BaseException, root: Path) -> bool:
    """Whether a save failed for want of disk space: torch's zip writer reports a full disk only
    as "unexpected pos", so the disk itself is asked too."""
    errors = [error]
    while errors:
        error = errors.pop()
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        errors += [e for e in (error.__cause__, error.__context__) if e is not None]
        # CheckpointException: (exception, traceback) for each rank that failed
        errors += [f[0] if isinstance(f, tuple) else f for f in getattr(error, "failures", {}).values()]
    return shutil.disk_usage(root).free < 64 * 2**20


_NAME = re.compile(r"iter_(\d{7})")
TMP = ".tmp"  # a checkpoint being written


def path_of(root: Path, step: int) -> Path:
    """Where the complete checkpoint of `step` is in `root`."""
    return root / f"iter_{step:07d}"


def step_of(path: Path) -> Optional[int]:
    """The step of a checkpoint directory, complete or being written; None for any other name."""
    found = _NAME.fullmatch(path.name.removesuffix(TMP))
    return int(found.group(1)) if found else None


def complete(root: Path) -> List[Path]:
    """The complete checkpoints (renamed from .tmp, with metadata.json), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "metadata.json").is_file())


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of `step` and the keep - 1 newest before it; never touch later ones (a run
    that fell back from a damaged checkpoint writes below it until it saves that step again)."""
    older = [p for p in complete(root) if step_of(p) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def intact(path: Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be loaded, in a few words; None when its files are whole:
    metadata.json, the common state with its config, the tensor index (.metadata), and every .distcp
    file as long as the index says."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        return f"metadata.json is unreadable ({e.__class__.__name__})"
    try:
        saved_state(path)
    except CheckpointError as e:
        return str(e)
    except (Exception, CheckpointException) as e:  # damaged bytes raise anything from EOFError up
        return f"its common state is unreadable ({e.__class__.__name__})"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        return f"its tensor index .metadata is unreadable ({e.__class__.__name__})"
    short = short_file(path, metadata)
    if short:
        name, size, end = short
        return f"{name} is {'missing' if size is None else f'{size} bytes'}, its index needs {end}"
    return None


def short_file(path: Path, metadata) -> Optional[Tuple[str, Optional[int], int]]:
    """The first of a checkpoint's tensor files that is missing or shorter than its index
    (`metadata`, torch DCP's) says, as (name, size or None, bytes needed); None when all are whole."""
    ends: dict = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            return name, size, end
    return None


def newest(root: Path) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint a run in `root` resumes from (None: there is none), and one line for each
    thing passed over on the way (a missing or garbled marker, each damaged checkpoint).

    Raises CheckpointError when checkpoints exist but none is intact: a run must not silently
    start again from step 0 over them."""
    notes = []
    marker = root / LATEST
    candidates = complete(root)
    named = None
    if marker.is_file():
        named = marker.read_bytes().decode("utf-8", errors="replace").strip()
        if not (_NAME.fullmatch(named) and (root / named) in candidates):
            notes.append(f"{marker} names '{named[:40]}', which is not a complete checkpoint; "
                         f"looking for the newest one")
    elif candidates:
        notes.append(f"{marker} is missing; looking for the newest complete checkpoint")
    for path in reversed(candidates):
        problem = intact(path)
        if problem is None:
            if notes or (named and named != path.name):
                notes.append(f"resuming from {path}, the newest intact checkpoint")
            return path, notes
        notes.append(f"checkpoint {path} is damaged: {problem}; passing over it")
    if candidates:
        raise CheckpointError(f"no checkpoint in {root} is intact (" + "; ".join(notes) + "); nothing was changed")
    if named is not None:
        raise CheckpointError(f"{marker} names {named[:40]}, but {root} holds no complete checkpoint "
                              f"(expected an iter_* directory with metadata.json)")
    return None, notes


def latest(root: Path) -> Optional[Path]:
    """The newest intact checkpoint in `root`, or None when there is none."""
    return newest(root)[0]


def checkpoints_dir(path: Path) -> Path:
    """The checkpoints directory `path` names: a run folder's (its config.yaml's checkpoint.dir,
    else its checkpoints/), or `path` itself."""
    saved = path / "config.yaml"
    if saved.is_file():
        # Not the saved config's checkpoint_dir: the run folder may have been moved or copied since.
        return Path(from_yaml(saved.read_text()).checkpoint.dir or path / "checkpoints")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def resolve(path: Path) -> Path:
    """A checkpoint named by its run folder or its run's checkpoints directory (its latest), or by itself."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a run folder, its checkpoints directory "
                              f"or one of its iter_* checkpoints)")
    if (path / "metadata.json").is_file():
        return path
    found = latest(checkpoints_dir(path))
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint (expected a dist_checkpointing directory with "
                              f"metadata.json, a checkpoints directory with a '{LATEST}' marker, or a run folder)")
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
    result = core(model).load_state_dict(loaded["model"], strict=False)
    wrong = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)] + list(result.unexpected_keys)
    if wrong:
        raise CheckpointError(f"{path} does not match this model: {', '.join(wrong[:5])}")
    if optimizer is not None:
        _load_optimizer(optimizer, loaded["optimizer"], from_yaml(loaded["state"]["config"]).schedule)
    return loaded["state"]


# The parameter-group settings a recipe decides (lr and weight decay are set by the schedule at every step).
RECIPE_GROUP_SETTINGS = ("max_lr", "min_lr", "betas", "eps")


def _load_optimizer(optimizer, state_dict, saved_schedule) -> None:
    """Adam's state from a checkpoint, under this run's settings. Megatron pairs the saved parameter
    groups with the current ones by their settings, max_lr and min_lr among them, and then keeps the
    saved groups' settings: a run resumed with another schedule.lr_max would not load, and one with
    another optim.beta2 would keep the old one unsaid. So the groups are paired under the
    checkpoint's lr range, and then given this run's settings back."""
    groups = optimizer.param_groups
    settings = [{k: g[k] for k in RECIPE_GROUP_SETTINGS if k in g} for g in groups]
    for group in groups:
        group["max_lr"], group["min_lr"] = saved_schedule.lr_max, saved_schedule.min_lr
    optimizer.load_state_dict(state_dict)
    # Megatron returns the loaded groups in the order of the current ones.
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def saved_state(path: Path) -> dict:
    """The state saved beside the tensors (training progress, config), read without loading them."""
    # megatron-core 0.19 keeps the non-tensor state inside the .distcp files (a ShardedObject);
    # 0.16 kept it in common.pt. Megatron's reader finds either.
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    common = load_common_state_dict(str(path))
    state = common.get("state") if isinstance(common, dict) else None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path} is not a megatron-power checkpoint (its common state holds no config)")
    return state
