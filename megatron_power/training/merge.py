"""Checkpoint merging (WSM: Tian et al. 2025, "Decay-Free Learning Rate Schedule via Checkpoint
Merging", arXiv 2507.17634): a weighted average of a run's last checkpoints stands in for a
learning-rate decay, so a stage-1 Power run, which never decays, can be judged while it trains.

WSM's duality: merging checkpoints theta_0..theta_k (oldest first) with coefficients c_j is
applying the k updates between them with weights w_i = c_i + ... + c_k, a decay of the lr over
the merge window. Each named weighting is the decay shape f (1 at the window's start, 0 at its end)
taken at the middle of each of the k intervals, w_i = f((i - 1/2) / k), and then
c_0 = 1 - w_1, c_j = w_j - w_(j+1), c_k = w_k. `uniform` is the plain mean, which is WSM's linear
decay sampled at the checkpoints themselves.

Only the model's weights are merged (the optimizer state of N points is not a state of any one),
one tensor at a time: each checkpoint's part of a tensor is a memory map of its file, added into
one float64 buffer and released before the next is read, so memory holds one model and one
tensor's buffers, never N models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

from megatron_power.errors import CheckpointError, ConfigError

# Decay shapes over the merge window (x: 0 at its oldest checkpoint, 1 at its newest).
DECAYS = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}
WEIGHTINGS = ("uniform", *DECAYS)


def coefficients(weights: str, n: int) -> List[float]:
    """The merge coefficients of `n` checkpoints, oldest first, summing to 1: a named weighting
    (`uniform`, or a decay shape by WSM's duality), or n comma-separated non-negative numbers."""
    if weights == "uniform" or (weights in DECAYS and n == 1):
        return [1.0 / n] * n
    if weights in DECAYS:
        k = n - 1
        w = [DECAYS[weights]((i - 0.5) / k) for i in range(1, k + 1)]
        return [1.0 - w[0]] + [w[i] - w[i + 1] for i in range(k - 1)] + [w[-1]]
    try:
        given = [float(x) for x in weights.split(",")]
    except ValueError:
        given = []
    if len(given) != n or min(given) < 0 or sum(given) <= 0:
        raise ConfigError(f"merge weights '{weights}': expected one of {', '.join(WEIGHTINGS)}, or {n} "
                          f"comma-separated non-negative numbers (one per checkpoint, oldest first)")
    return [x / sum(given) for x in given]


def last_checkpoints(root: Path, n: int) -> List[Path]:
    """The newest `n` complete checkpoints of a checkpoints directory, oldest first, each intact."""
    from megatron_power.training import checkpoint

    found = checkpoint.complete(root)
    if len(found) < n:
        raise CheckpointError(f"{root} holds {len(found)} complete checkpoint{'s' * (len(found) != 1)}, "
                              f"fewer than the {n} to merge")
    return _all_intact(found[-n:])


def _all_intact(paths: Sequence[Path]) -> List[Path]:
    """`paths`, once each is known to be whole."""
    from megatron_power.training import checkpoint

    for path in paths:
        problem = checkpoint.intact(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}; nothing was merged")
    return list(paths)


def fill_merged(model, paths: Sequence[Path], weights: Sequence[float]) -> None:
    """Set this rank's part of every parameter of `model` (any layout) to the weighted sum of
    that part in the checkpoints at `paths`."""
    import torch

    from megatron_power.convert.torch_dist import TorchDistCheckpoint
    from megatron_power.errors import ConversionError
    from megatron_power.training.model import sharded_tensors

    try:
        readers = [TorchDistCheckpoint(path) for path in paths]
    except ConversionError as e:
        raise CheckpointError(str(e)) from None
    with torch.no_grad():
        for sh in sharded_tensors(model):
            first = sh.global_offset
            size = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)  # prepended axes: one layer, one expert
            merged = torch.zeros(size, dtype=torch.float64)
            for reader, weight in zip(readers, weights):
                if sh.key not in reader.tensors or len(reader.shape(sh.key)) != len(first):
                    raise CheckpointError(f"{reader.path} holds no {sh.key} of this model's shape")
                merged.add_(reader.region(sh.key, first, size), alpha=weight)
            sh.data.copy_(merged.reshape(sh.data.shape))


def evaluate_merged(model, paths: Sequence[Path], weights: Sequence[float], evaluate) -> float:
    """`evaluate()` with the model's weights replaced by the merge of `paths` for its duration:
    each rank keeps a copy of its own parameters and puts them back, bit for bit."""
    import torch

    from megatron_power.training.checkpoint import core

    parameters = list(core(model).parameters())
    kept = [p.detach().clone() for p in parameters]
    try:
        fill_merged(core(model), paths, weights)
        return evaluate()
    finally:
        with torch.no_grad():
            for p, original in zip(parameters, kept):
                p.copy_(original)


def _sources(given: Sequence[Path], last: int) -> List[Path]:
    """The checkpoints to merge: the last `last` of a run folder or checkpoints directory, or the
    iter_* directories given (all of them when `last` is 0)."""
    from megatron_power.training import checkpoint

    if last < 0:
        raise ConfigError(f"--last must be 0 (every checkpoint given) or more, got {last}")
    if len(given) == 1 and not (given[0] / "metadata.json").is_file():
        root = checkpoint.checkpoints_dir(given[0])
        if not root.is_dir():
            raise CheckpointError(f"{given[0]} is not a directory (expected a run folder, its checkpoints "
                                  f"directory, or iter_* checkpoints)")
        if last < 1:
            raise ConfigError(f"merging from {root} needs --last N (how many of its newest checkpoints)")
        return last_checkpoints(root, last)
    for path in given:
        if not (path / "metadata.json").is_file():
            raise CheckpointError(f"{path} is not a checkpoint (expected an iter_* directory with metadata.json)")
    if last > len(given):
        raise CheckpointError(f"{len(given)} checkpoints given, fewer than --last {last}")
    return _all_intact(given[-last:] if last else given)


def write_merged(given: Sequence[Path], last: int, weights: str, out: Path, overwrite: bool = False) -> List[float]:
    """Write the checkpoints directory `out` (`latest` -> iter_<newest step>) holding the merge of
    the chosen checkpoints: weights only, with the newest one's config. Every problem is raised
    before anything is written; a failure leaves nothing behind."""
    from megatron_power.config.schema import from_yaml, to_yaml
    from megatron_power.convert.output import check_writable, staged
    from megatron_power.convert.to_hf import single_process
    from megatron_power.training import checkpoint, runtime
    from megatron_power.training.model import build_model, model_differences

    paths = _sources(list(given), last)
    c = coefficients(weights, len(paths))
    saved = [checkpoint.saved_state(p) for p in paths]
    configs = [from_yaml(s["config"]) for s in saved]
    for path, config in zip(paths[:-1], configs[:-1]):
        problems = model_differences(configs[-1], config)
        if problems:
            raise CheckpointError(f"{path} holds a different model than {paths[-1]}: {'; '.join(problems)}")
    check_writable(out, overwrite)
    from megatron_power.convert.torch_dist import TorchDistCheckpoint

    # The saved embedding's rows: the vocabulary as the run padded it.
    padded_vocab = TorchDistCheckpoint(paths[-1]).shape("embedding.word_embeddings.weight")[0]
    built = single_process(configs[-1])
    runtime.initialize(built)
    try:
        with staged(out, overwrite) as staging:
            model = build_model(built, padded_vocab, initialize=False)
            fill_merged(model, paths, c)
            step = saved[-1].get("train_state", {}).get("step", 0)
            checkpoint.save(staging, step, model, None, {
                "config": to_yaml(configs[-1]), "merged_from": [str(p) for p in paths], "merge_weights": c}, keep=1)
    finally:
        runtime.shutdown()
    return c
