"""Take a run back to one of its earlier checkpoints: the usual answer to a loss spike is to go on
from a checkpoint before it, often with a lower lr (Megatron-LM's --ckpt-step, torchtitan's
load_step).

A one-time change to the run folder rather than a recipe setting: a setting would rewind again at
every requeue of the job. The newer checkpoints, finished.json and the wandb run's id are moved,
not deleted, to checkpoints/rewound/<time>/ with a copy of metrics.jsonl, whose rows after the
chosen step the next run drops: what the abandoned steps learned stays on disk until the user
removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

from megatron_power.config.schema import FINISHED
from megatron_power.errors import CheckpointError, ConfigError
from megatron_power.training import checkpoint, run_lock
from megatron_power.training.metrics import WANDB_RUN_ID
from megatron_power.writable import unwritable

ASIDE = "rewound"


def _checkpoint_dir(run_dir: Path) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (it has no config.yaml; expected runs/<name>)")
    return checkpoint.checkpoints_dir(run_dir)


class Saved(NamedTuple):
    step: int
    tokens: int  # seen by then
    loss: Optional[float]  # the training loss of that step, from metrics.jsonl
    problem: str  # why it cannot be loaded; "" when it can


def checkpoints(run_dir: Path) -> List[Saved]:
    """The complete checkpoints of a run, oldest first, with what tells one to go back to."""
    rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    losses = {row["step"]: row["loss"] for row in map(json.loads, rows) if "loss" in row}
    found = []
    for path in checkpoint.complete(_checkpoint_dir(run_dir)):
        problem = checkpoint.intact(path)
        tokens = checkpoint.saved_state(path)["train_state"]["consumed_tokens"] if problem is None else 0
        step = checkpoint.step_of(path)
        found.append(Saved(step, tokens, losses.get(step), problem or ""))
    return found


def rewind(run_dir: Path, step: int) -> Tuple[List[str], Path]:
    """Make the checkpoint of `step` the one `run_dir` resumes from. Returns the names of what was moved
    aside and where it went. Raises ConfigError or CheckpointError, changing nothing, when the run is
    in use, cannot be written or has no intact checkpoint of that step."""
    root = _checkpoint_dir(run_dir)
    for folder in (run_dir, root):  # the lock, the run's files and the checkpoints are moved or written
        problem = unwritable(folder)
        if problem:
            raise CheckpointError(f"{run_dir} cannot be rewound: {problem}; nothing was changed")
    holder = run_lock.take(run_dir)
    if holder is not None:
        raise ConfigError(f"{run_dir} is in use by a run ({holder}); stop it before rewinding")
    try:
        target = checkpoint.path_of(root, step)
        saved = checkpoint.complete(root)
        if target not in saved:
            have = ", ".join(str(checkpoint.step_of(p)) for p in saved) or "none"
            raise CheckpointError(f"{root} has no complete checkpoint of step {step} (it has steps: {have})")
        problem = checkpoint.intact(target)
        if problem is not None:
            raise CheckpointError(f"the checkpoint of step {step} is damaged: {problem}; nothing was changed")
        newer = sorted(p for p in root.iterdir() if (s := checkpoint.step_of(p)) is not None and s > step)
        # finished.json: it has steps to train again, which a sweep or SLURM job must know.
        # The wandb run's id: wandb keeps what a run was sent, so the redone steps would stand
        # beside the abandoned ones in one chart; they go to a new wandb run of the same name.
        run_files = [run_dir / name for name in (FINISHED, WANDB_RUN_ID) if newer and (run_dir / name).is_file()]
        aside = root / ASIDE / time.strftime("%Y%m%d-%H%M%S")
        if newer:
            aside.mkdir(parents=True, exist_ok=True)
            if (run_dir / "metrics.jsonl").is_file():
                shutil.copy2(run_dir / "metrics.jsonl", aside / "metrics.jsonl")
            # The run folder's files first: with checkpoint.dir on another filesystem they are
            # copied, and a copy that fails leaves every checkpoint where it was.
            for path in run_files:
                shutil.move(path, aside / path.name)
            for path in newer:
                os.replace(path, aside / path.name)
        checkpoint.mark_latest(root, target)
        return [p.name for p in newer + run_files], aside
    finally:
        run_lock.release()
