"""Encode documents with a sentencepiece model into a Megatron indexed dataset (.bin/.idx).

Documents stream in batches: each batch is encoded by sentencepiece's own C++ thread pool (one
call, `workers` threads, no pickling between processes, ids returned as one array per document
with the end-of-document token appended) and appended through Megatron's `IndexedDatasetBuilder`.
While sentencepiece encodes one batch, with the GIL released, this thread writes the previous one
and reads the next, so parsing and writing do not leave the encoding threads waiting. Memory holds
three batches; the output is the same for any number of workers. With a validation fraction,
every document goes to one split by a hash of its text, so the split does not depend on order or
workers.

The output is written under temporary names and renamed when complete (.bin first, .idx last), so
an interrupted run never leaves files that look like a finished dataset.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

BATCH_DOCUMENTS = 512


def token_dtype(vocab_size: int):
    """Megatron's choice: uint16 while the vocabulary fits, int32 beyond."""
    return np.uint16 if vocab_size < 65500 else np.int32


def is_complete(prefix: Path) -> bool:
    return prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()


def in_validation(text: str, fraction: float) -> bool:
    return fraction > 0 and zlib.crc32(text.encode("utf-8", "surrogatepass")) < fraction * 2**32


class _Output:
    """One split's builder under a temporary name, renamed into place by `commit`."""

    def __init__(self, prefix: Path, dtype):
        self.prefix = prefix
        self.tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
        self.builder = IndexedDatasetBuilder(str(self.tmp) + ".bin", dtype=dtype)
        self.documents = self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.builder.add_document(ids, [ids.size])
        self.documents += 1
        self.tokens += ids.size

    def commit(self) -> None:
        self.builder.finalize(str(self.tmp) + ".idx")
        os.replace(str(self.tmp) + ".bin", self.prefix.with_suffix(".bin"))
        os.replace(str(self.tmp) + ".idx", self.prefix.with_suffix(".idx"))

    def discard(self) -> None:
        for suffix in (".bin", ".idx"):
            Path(str(self.tmp) + suffix).unlink(missing_ok=True)


def write_indexed_dataset(texts: Iterable[str], model_file: Path, prefix: Path, workers: int = 1,
                          total: Optional[int] = None, desc: str = "encode",
                          valid_prefix: Optional[Path] = None, valid_fraction: float = 0.0) -> Dict[str, dict]:
    """Encode `texts` (one document each) into `prefix`.bin/.idx (and a validation split into
    `valid_prefix`); return documents and tokens per split."""
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    dtype = token_dtype(processor.vocab_size())
    threads = spm.ThreadPool(workers)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    outputs = {"train": _Output(prefix, dtype)}
    if valid_prefix is not None:
        outputs["valid"] = _Output(valid_prefix, dtype)

    def encode(batch):
        return processor.encode(batch, num_threads=workers, thread_pool=threads, out_type="numpy", add_eos=True)

    def write(batch, encoding, bar):
        for text, ids in zip(batch, encoding.result()):
            split = "valid" if valid_prefix is not None and in_validation(text, valid_fraction) else "train"
            outputs[split].add(ids.astype(dtype, copy=False))
        tokens = sum(o.tokens for o in outputs.values())
        bar.update(len(batch))
        bar.set_postfix(tokens=tokens, tok_per_s=f"{tokens / max(time.time() - start, 1e-9):,.0f}", refresh=False)

    texts, start = iter(texts), time.time()
    try:
        with ThreadPoolExecutor(1) as encoder, tqdm(total=total, desc=desc, unit="doc") as bar:
            in_flight = deque()  # at most two batches: one encoding, one being written
            for batch in iter(lambda: list(islice(texts, BATCH_DOCUMENTS)), []):
                in_flight.append((batch, encoder.submit(encode, batch)))
                if len(in_flight) == 2:
                    write(*in_flight.popleft(), bar)
            for batch, encoding in in_flight:
                write(batch, encoding, bar)
        for output in outputs.values():
            output.commit()
    finally:
        for output in outputs.values():
            output.discard()
    return {split: {"documents": o.documents, "tokens": o.tokens} for split, o in outputs.items()}

