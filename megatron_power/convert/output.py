"""Output directories that appear complete or not at all, and never over the user's files."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from megatron_power.errors import ConversionError
from megatron_power.writable import unwritable


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists and holds something (unless `overwrite`), or
    one that cannot be written (it is staged beside itself)."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty (choose a new one, or pass --overwrite)")
    problem = unwritable(out.parent)
    if problem:
        raise ConversionError(f"output directory {out} cannot be written: {problem}")


@contextmanager
def staged(out: Path, overwrite: bool):
    """A sibling staging directory to write into; it becomes `out` only when the block succeeds
    and is removed when it fails, so a failed conversion leaves nothing behind."""
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
