"""Whether a command can write where it was told to, asked before any work starts."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from megatron_power.errors import ConfigError


def unwritable(folder: Path) -> Optional[str]:
    """Why `folder` cannot be created or written to; None when it can. The nearest folder that
    exists is tried with a probe folder of its own, removed at once: permissions alone say nothing
    for root, a read-only mount or a pseudo file system such as /proc."""
    folder = folder.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e.__class__.__name__})"
    return None


def require_writable(folder: Path, option: str, error: type = ConfigError) -> None:
    """Raises `error` with one line naming the option (or setting) whose `folder` cannot be written."""
    problem = unwritable(folder)
    if problem:
        raise error(f"{option}: cannot write to {folder}: {problem}")
