"""The default corpus: the Python standard library's own sources, present wherever Python is."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Iterator, List, Tuple

# Test suites are mostly generated data and fixtures; site-packages is not the standard library.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(name: str, every: int = 20) -> bool:
    """About 1 in `every` documents is held out, chosen by a stable hash of its name."""
    return zlib.crc32(name.encode()) % every == 0


def read_documents(files: List[Path]) -> Iterator[Tuple[str, str]]:
    """(name, text) for each readable, non-empty UTF-8 file."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield path.name if path.parent.name == "" else f"{path.parent.name}/{path.name}", text
