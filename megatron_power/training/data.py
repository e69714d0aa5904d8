"""Data: the default corpus build, and Megatron GPTDatasets / blends read in a resumable order."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from megatron_power.config.schema import DEFAULT_DATA_DIR
from megatron_power.errors import DataError
from tokenizer import corpus, preprocess, spm

MANIFEST = "manifest.json"
BUILDING = ".building"  # written first: a folder holding it (and no manifest) is an interrupted build, built over
DEFAULT_VOCAB_SIZE = 8192


def build_default_data(out_dir: Path = DEFAULT_DATA_DIR, vocab_size: Optional[int] = None,
                       workers: int = max(1, min(4, os.cpu_count() or 1))) -> dict:
    """The shipped standard-library corpus -> tokenizer.model, train.bin/.idx, valid.bin/.idx, manifest.json,
    with a tokenizer of `vocab_size` pieces (None: DEFAULT_VOCAB_SIZE, or whatever `out_dir` holds).

    The manifest is written last: its presence means the directory is complete, and a rerun
    returns at once. Data of another vocabulary is refused, not rebuilt: runs may be reading it;
    so is a folder holding files of its own (a user's datasets carry the same names).
    """
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if vocab_size not in (None, manifest["vocab_size"]):
            raise DataError(f"--out {out_dir} holds data built with --vocab-size {manifest['vocab_size']}, not "
                            f"{vocab_size}: give another --out, or delete {out_dir} first")
        return manifest
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    spm.check_vocab_size(vocab_size)
    building = out_dir / BUILDING
    others = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() and not building.exists() else []
    if others:
        raise DataError(f"--out {out_dir} holds files that `data` did not write ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    building.touch()
    documents = list(corpus.read_documents())
    train = [text for name, text in documents if not corpus.is_validation(name)]
    valid = [text for name, text in documents if corpus.is_validation(name)]
    print(f"corpus: {len(documents)} files of {corpus.CORPUS_FILE.name}, {len(train)} train / {len(valid)} validation")

    model_file = spm.train(spm.paragraphs(train), out_dir / "tokenizer", vocab_size)
    stats = {
        split: preprocess.write_indexed_dataset(texts, model_file, out_dir / split, workers=workers,
                                                total=len(texts), desc=f"encode {split}")["train"]
        for split, texts in (("train", train), ("valid", valid))
    }
    manifest = {
        "source": corpus.CORPUS_FILE.name,
        "vocab_size": vocab_size,
        "train": stats["train"],
        "valid": stats["valid"],
        "unigram_entropy_nats": unigram_entropy(out_dir / "train", vocab_size),
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    building.unlink()
    return manifest


def unigram_entropy(prefix: Path, vocab_size: int) -> float:
    """Entropy (nats) of the token unigram distribution: the loss of a model that ignores context."""
    tokens = np.fromfile(prefix.with_suffix(".bin"), dtype=preprocess.token_dtype(vocab_size))
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclass
class TokenizerInfo:
    """What GPTDataset reads from a tokenizer: vocabulary size and the eod / pad ids."""

    vocab_size: int
    eod: int
    pad: int
    sha256: str

    @property
    def unique_identifiers(self) -> dict:
        """Part of the key of Megatron's dataset index cache."""
        return {"class": "sentencepiece", "sha256": self.sha256}

    @classmethod
    def from_sentencepiece(cls, model_file: str) -> "TokenizerInfo":
        """Raises ValueError naming the file when it is not a sentencepiece model."""
        sp = spm.load(model_file)
        digest = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
        return cls(vocab_size=sp.vocab_size(), eod=sp.eos_id(), pad=sp.pad_id(), sha256=digest)


# Megatron's .idx (indexed_dataset.py): its header, version, dtype code, sequence and document
# counts, then int32 sequence lengths, int64 byte pointers into .bin and int64 document starts.
_IDX_FIELDS = struct.Struct("<QBQQ")
# Token ids checked against the vocabulary at the start of each .bin: a wrong tokenizer shows in
# any real text, and reading all of a terabyte corpus is not worth it.
ID_SAMPLE = 2**24


def indexed_dataset_problem(prefix: str, vocab_size: int) -> Optional[str]:
    """What is wrong with the indexed dataset PREFIX.bin/.idx for a model of `vocab_size`
    tokens, in one line; None when its index is whole, its .bin as long as the index says, and
    its first token ids are inside the vocabulary."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    size = idx.stat().st_size
    header = len(_INDEX_HEADER) + _IDX_FIELDS.size
    with open(idx, "rb") as f:
        head = f.read(header)
    if len(head) < header or not head.startswith(_INDEX_HEADER):
        return f"{idx} is not a Megatron index ({'empty' if size == 0 else 'no MMIDIDX header'}); rebuild it " \
               f"with `megatron-power preprocess`"
    version, code, sequences, documents = _IDX_FIELDS.unpack(head[len(_INDEX_HEADER):])
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:  # not a code Megatron writes
        dtype = None
    expected = header + 12 * sequences + 8 * documents
    if version != 1 or dtype is None or size != expected:
        return f"{idx} is damaged (version {version}, dtype code {code}, {size} bytes where its counts need " \
               f"{expected}); rebuild it with `megatron-power preprocess`"
    index = np.memmap(idx, mode="r", offset=header, dtype=np.uint8, shape=(12 * sequences,))
    if sequences:
        last_length = int(index[4 * (sequences - 1):4 * sequences].view(np.int32)[0])
        last_pointer = int(index[4 * sequences + 8 * (sequences - 1):].view(np.int64)[0])
        needed = last_pointer + last_length * np.dtype(dtype).itemsize
    else:
        needed = 0
    have = bin_.stat().st_size
    if have < needed:
        return f"{bin_} is {have} bytes, shorter than the {needed} its index needs (an incomplete copy?)"
    if needed:
        ids = np.memmap(bin_, mode="r", dtype=dtype, shape=(min(needed // np.dtype(dtype).itemsize, ID_SAMPLE),))
        top = int(ids.max())
        if top >= vocab_size:
            return f"{bin_} holds token id {top}, outside the model's vocabulary of {vocab_size} (was it made " \
                   f"with another tokenizer than data.tokenizer?)"
    return None


def build_datasets(config, tokenizer: TokenizerInfo, samples_read_before: Optional[dict] = None):
    """(train, valid) GPTDatasets over the recipe's blends, built by Megatron's builder; each
    training dataset starts after the samples of it that earlier stages read (continued_dataset)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from megatron_power.config.schema import parse_blend
    from megatron_power.training.continued_dataset import ContinuedDatasetConfig, ContinuedGPTDataset

    seq = config.model.seq_length
    # Samples are counted generously so that a run whose batch size changes at a resume still
    # finds enough of them.
    n_train = math.ceil(config.train.tokens / seq) + 2 * config.train.global_batch_size
    n_valid = config.train.eval_batches * config.train.global_batch_size
    dataset_config = ContinuedDatasetConfig(
        samples_read_before=samples_read_before or {},
        random_seed=config.train.seed,
        sequence_length=seq,
        blend_per_split=[
            parse_blend(config.data.train, "data.train"),
            parse_blend(config.data.valid, "data.valid"),
            None,
        ],
        path_to_cache=str(config.data.cache_dir or config.run_dir / "data_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # Attention is causal without an explicit mask (the fused kernels' fast path).
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        ContinuedGPTDataset, [n_train, n_valid, None], lambda: True, dataset_config
    ).build()
    return train, valid


def micro_batches(dataset, first_sample: int, global_batch_size: int, micro_batch_size: int,
                  dp_size: int, dp_rank: int) -> List[dict]:
    """This data-parallel rank's micro-batches of the global batch starting at `first_sample`.

    Global batch k is samples [k*B, (k+1)*B) of the dataset's (shuffled) order, whatever the
    layout, so every layout and a resumed run see the same data.
    """
    batches = []
    for i in range(global_batch_size // (micro_batch_size * dp_size)):
        start = first_sample + (i * dp_size + dp_rank) * micro_batch_size
        samples = [dataset[j] for j in range(start, start + micro_batch_size)]
        batches.append({
            key: torch.stack([s[key] for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        })
    return batches
