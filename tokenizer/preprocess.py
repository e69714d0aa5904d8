"""Encode documents with a sentencepiece model into a Megatron indexed dataset (.bin/.idx).

The output is written under temporary names and renamed when complete (.bin first, .idx last), so
an interrupted run never leaves files that look like a finished dataset.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

_processor: Optional[spm.SentencePieceProcessor] = None


def _init_worker(model_file: str) -> None:
    global _processor
    _processor = spm.SentencePieceProcessor(model_file=model_file)


def _encode(text: str) -> np.ndarray:
    ids = _processor.encode(text)
    ids.append(_processor.eos_id())  # end of document
    return np.asarray(ids, dtype=np.int32)


def token_dtype(vocab_size: int):
    """Megatron's choice: uint16 while the vocabulary fits, int32 beyond."""
    return np.uint16 if vocab_size < 65500 else np.int32


def is_complete(prefix: Path) -> bool:
    return prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()


def write_indexed_dataset(texts: Iterable[str], model_file: Path, prefix: Path, workers: int = 1,
                          total: Optional[int] = None, desc: str = "encode") -> dict:
    """Encode `texts` (one document each) into `prefix`.bin/.idx; return counts."""
    vocab_size = spm.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + f".tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=token_dtype(vocab_size))
    documents = tokens = 0
    try:
        with _pool(workers, str(model_file)) as pool, tqdm(total=total, desc=desc, unit="doc") as bar:
            encoded = pool.imap(_encode, texts, chunksize=8) if pool else map(_encode, texts)
            for ids in encoded:
                builder.add_document(ids, [ids.size])
                documents += 1
                tokens += ids.size
                bar.update(1)
                bar.set_postfix(tokens=tokens, refresh=False)
        builder.finalize(str(tmp) + ".idx")
        os.replace(str(tmp) + ".bin", prefix.with_suffix(".bin"))
        os.replace(str(tmp) + ".idx", prefix.with_suffix(".idx"))
    finally:
        for suffix in (".bin", ".idx"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
    return {"documents": documents, "tokens": tokens}


class _pool:
    """A worker pool for workers > 1; in-process encoding otherwise."""

    def __init__(self, workers: int, model_file: str):
        self.workers, self.model_file, self.pool = workers, model_file, None

    def __enter__(self):
        _init_worker(self.model_file)
        if self.workers > 1:
            self.pool = mp.get_context("spawn").Pool(self.workers, _init_worker, (self.model_file,))
        return self.pool

    def __exit__(self, *exc):
        if self.pool:
            self.pool.terminate()
