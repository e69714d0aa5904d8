"""Documents from corpus files: plain text, JSON lines (plain, gzip or zstd) and Parquet.

- `.txt`: the whole file is one document.
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line; the document is its `field`.
- `.parquet`: one row per document; the document is the column `field`, read in batches.
Files are streamed, never loaded whole (a `.txt` file is one document, so it is read whole).

Bad input (invalid UTF-8, a malformed JSON line, a missing or non-text field, an empty document
or file) is counted by kind with its file and line, and either skipped or, with
`on_error="stop"`, raised as DataError naming the first one.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List

from megatron_power.errors import DataError

FORMATS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt")


def input_format(path: Path) -> str:
    for suffix in FORMATS:
        if path.name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unknown format (expected one of {', '.join(FORMATS)})")


def check_inputs(paths: Iterable[Path]) -> List[Path]:
    """Every input exists and has a known format; raised before any work."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no input files given")
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        input_format(path)
    return paths


@dataclass
class Problems:
    """Bad input met so far: counts by kind and the first examples with file and line."""

    on_error: str = "skip"  # skip | stop
    counts: Counter = field(default_factory=Counter)
    examples: List[str] = field(default_factory=list)

    def found(self, where: str, kind: str) -> None:
        if self.on_error == "stop":
            raise DataError(f"{where}: {kind} (pass --on-error skip to skip such documents)")
        self.counts[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {kind}")

    def summary(self) -> List[str]:
        if not self.counts:
            return []
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        return [f"skipped: {kinds}", *(f"  e.g. {e}" for e in self.examples)]


def documents(paths: Iterable[Path], text_field: str = "text", problems: Problems = None) -> Iterator[str]:
    """Every document of every file, in order."""
    problems = problems or Problems()
    for path in paths:
        fmt = input_format(path)
        if fmt == ".txt":
            yield from _text_file(path, problems)
        elif fmt == ".parquet":
            yield from _parquet(path, text_field, problems)
        else:
            yield from _json_lines(path, fmt, text_field, problems)


def _text_file(path: Path, problems: Problems) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        problems.found(f"{path}:{line}", "invalid UTF-8")
        return
    if text.strip():
        yield text
    else:
        problems.found(str(path), "empty file")


def _binary_lines(path: Path, fmt: str):
    if fmt == ".jsonl.gz":
        return gzip.open(path, "rb")
    if fmt == ".jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _json_lines(path: Path, fmt: str, text_field: str, problems: Problems) -> Iterator[str]:
    empty = True
    with _binary_lines(path, fmt) as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            empty = False
            where = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.found(where, "invalid UTF-8")
                continue
            except json.JSONDecodeError:
                problems.found(where, "malformed JSON")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                problems.found(where, f"no text field '{text_field}'")
            elif not text.strip():
                problems.found(where, "empty document")
            else:
                yield text
    if empty:
        problems.found(str(path), "empty file")


def _parquet(path: Path, text_field: str, problems: Problems) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        problems.found(str(path), f"no text field '{text_field}'")
        return
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                problems.found(f"{path}:row {row}", f"no text field '{text_field}'")
            elif not text.strip():
                problems.found(f"{path}:row {row}", "empty document")
            else:
                yield text
    if row == 0:
        problems.found(str(path), "empty file")
