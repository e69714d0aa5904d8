"""The default corpus: CPython 3.11.7's standard library sources, shipped with the repository.

The corpus is a file in the repository rather than whatever standard library the running
interpreter has, so `make data` builds the same tokenizer and datasets on every Python version and
machine, and the losses, bounds and figures measured on it hold everywhere. `python -m
tokenizer.corpus` writes it again from the running interpreter's standard library (how the shipped
file was made, on CPython 3.11.7); the licence is in `data/PYTHON-LICENSE.txt`.
"""

from __future__ import annotations

import io
import json
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator, List, Tuple

import zstandard

CORPUS_FILE = Path(__file__).parent / "data" / "stdlib-3.11.7.jsonl.zst"

# Test suites are mostly generated data and fixtures; site-packages is not the standard library.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def is_validation(name: str, every: int = 20) -> bool:
    """About 1 in `every` documents is held out, chosen by a stable hash of its name."""
    return zlib.crc32(name.encode()) % every == 0


def read_documents(path: Path = CORPUS_FILE) -> Iterator[Tuple[str, str]]:
    """(name, text) for each document of the shipped corpus, in its order."""
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            document = json.loads(line)
            yield document["name"], document["text"]


def _stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def write_corpus(path: Path) -> int:
    """The running interpreter's standard library (readable, non-empty UTF-8 files) as the corpus file."""
    lines = []
    for file in _stdlib_files():
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            name = file.name if file.parent.name == "" else f"{file.parent.name}/{file.name}"
            lines.append(json.dumps({"name": name, "text": text}) + "\n")
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress("".join(lines).encode()))
    return len(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS_FILE
    print(f"{out}: {write_corpus(out)} documents from Python {sys.version.split()[0]}")
