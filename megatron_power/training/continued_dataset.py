"""Stage 2 reading a stage-1 dataset past what stage 1 read, in the order stage 1 read it.

Megatron's GPTDataset shuffles one epoch of a dataset with the run's seed; that order does not
depend on how many samples are asked for as long as they fit in one epoch. A stage-2 dataset that
asks for the stage-1 samples plus its own, and starts after the stage-1 ones, therefore reads
exactly the samples stage 1 did not. Beyond one epoch Megatron shuffles all epochs together and
the order changes with the size asked for: stage 2 then says so in its log (`epochs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split


def dataset_key(prefix: str) -> str:
    """One name per dataset however a recipe spells its path."""
    return str(Path(prefix).resolve())


@dataclass
class ContinuedDatasetConfig(GPTDatasetConfig):
    # Training samples of each dataset (by dataset_key) that earlier stages read.
    samples_read_before: Dict[str, int] = field(default_factory=dict)


class ContinuedGPTDataset(GPTDataset):
    """A GPTDataset whose training split starts after the samples earlier stages read of it."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        self.skip = config.samples_read_before.get(dataset_key(dataset_path), 0) if index_split == Split.train else 0
        super().__init__(indexed_dataset, dataset_path, indexed_indices,
                         None if num_samples is None else num_samples + self.skip, index_split, config)
        self.num_samples = num_samples  # what the blend asked of this stage

    @property
    def epochs(self) -> int:
        """Epochs of the built index, earlier stages' samples included: its document order holds
        each document once per epoch."""
        return len(self.document_index) // len(self.indices)

    def __len__(self) -> int:
        return super().__len__() - self.skip

    def __getitem__(self, idx: Optional[int]):
        return super().__getitem__(None if idx is None else idx + self.skip)


def samples_read(blend, consumed_samples: int, before: Dict[str, int]) -> Dict[str, int]:
    """Samples of each dataset of a training blend (prefixes, weights) read after the blend's first
    `consumed_samples` samples, added to what earlier stages had read (`before`).

    Megatron's blending assigns each next sample to the dataset furthest behind its weight, so the
    split of the first n samples does not depend on the blend's total size."""
    from megatron.core.datasets import helpers

    prefixes, weights = blend
    counts: List[int] = [consumed_samples]
    if len(prefixes) > 1:
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        dataset_index = np.zeros(consumed_samples, dtype=np.int16)
        sample_index = np.zeros(consumed_samples, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, sample_index, w, len(prefixes), consumed_samples, False)
        counts = np.bincount(dataset_index, minlength=len(prefixes)).tolist()
    result = dict(before)
    for prefix, count in zip(prefixes, counts):
        key = dataset_key(prefix)
        result[key] = result.get(key, 0) + int(count)
    return result


def reordered(dataset) -> List[str]:
    """The continued datasets of a training set (a blend or one dataset) that span more than one
    epoch: their samples past the earlier stages' are not a continuation of the earlier order."""
    parts = getattr(dataset, "datasets", [dataset])
    return [d.dataset_path for d in parts if isinstance(d, ContinuedGPTDataset) and d.skip and d.epochs > 1]
