"""The global batch size through a run: fixed, stepped by tokens seen, or grown with the measured
gradient noise scale.

Time Transfer (arXiv 2410.05838) finds the critical batch size growing with the tokens seen, so a
batch fixed for a whole run is too large early and too small late. The Power scheduler reads the
batch in force at each step (lr = min(lr_max, beta(n) * a * n**b)), so the lr follows a batch
that changes mid-run without retuning.

`train.batch_schedule` is one of
- null: `train.global_batch_size` throughout;
- a list of [tokens, batch] pairs: from `tokens` seen on (rounded up to the next step boundary),
  `batch` sequences per step (before the first pair, `train.global_batch_size`); the last batch
  must end on the budget exactly;
- `noise_scale`: starting at `train.global_batch_size` (the floor), the batch grows to the allowed
  size nearest `train.batch_growth.factor` x the measured B_simple (probes/noise_scale.py), never
  shrinks, changes only right after a measurement and no sooner than `batch_growth.min_interval`
  tokens after the last change. Allowed sizes are the floor times powers of two up to the ceiling;
  a size is taken only where the tokens seen are a multiple of its step, so the budget (a multiple
  of the ceiling's step) is still reached exactly.

The batch in force and every change are part of the training state saved in checkpoints, so a
resumed run continues with the same batch and makes the same decisions. The data order does not
depend on the batch: step k reads the next `batch` samples of one fixed sample order.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from megatron_power.config.schema import format_count, parse_count

NOISE_SCALE = "noise_scale"


def token_steps(train, seq_length: int) -> List[Tuple[int, int]]:
    """A token schedule as (tokens from which, batch) pairs, the first at 0 tokens; one pair for a
    fixed batch. A change takes effect at the first step boundary at or after its token count.
    (Call only for a validated config that is not `noise_scale`.)"""
    asked = [(parse_count(tokens), int(batch)) for tokens, batch in (train.batch_schedule or [])]
    pairs = [(0, asked.pop(0)[1] if asked and asked[0][0] == 0 else train.global_batch_size)]
    for tokens, batch in asked:
        start, current = pairs[-1]
        step = current * seq_length
        pairs.append((start + -(-(tokens - start) // step) * step, batch))
    return pairs


def scheduled_batch(train, seq_length: int, tokens: int) -> int:
    """The batch in force after `tokens` under a fixed or token-stepped schedule."""
    return [batch for start, batch in token_steps(train, seq_length) if start <= tokens][-1]


def batch_sizes(train, seq_length: int) -> List[int]:
    """Every batch size the schedule may use, smallest first."""
    if train.batch_schedule == NOISE_SCALE:
        return growth_sizes(train.global_batch_size, train.batch_growth.ceiling)
    return sorted({batch for _, batch in token_steps(train, seq_length)})


def growth_sizes(floor: int, ceiling: int) -> List[int]:
    sizes = [floor]
    while sizes[-1] * 2 <= ceiling:
        sizes.append(sizes[-1] * 2)
    return sizes


def grown_batch(current: int, b_simple: float, tokens: int, last_change: int, train, seq_length: int) -> int:
    """The batch to use from the next step, after a noise-scale measurement at `tokens` seen."""
    g = train.batch_growth
    if not math.isfinite(b_simple) or b_simple <= 0 or tokens - last_change < g.min_interval:
        return current
    sizes = growth_sizes(train.global_batch_size, g.ceiling)
    # The nearest allowed size on a log scale; the sizes are a doubling ladder.
    rung = min(len(sizes) - 1, max(0, round(math.log2(g.factor * b_simple / sizes[0]))))
    aligned = [s for s in sizes if current < s <= sizes[rung] and tokens % (s * seq_length) == 0]
    return max(aligned, default=current)


def steps_left(train, seq_length: int, tokens: int, batch: int) -> int:
    """Steps from `tokens` seen to the budget: exact for a token schedule, at the batch in force
    for `noise_scale` (whose later batches are not known yet)."""
    if train.batch_schedule == NOISE_SCALE:
        return (train.tokens - tokens) // (batch * seq_length)
    steps, pairs = 0, token_steps(train, seq_length)
    for (start, size), end in zip(pairs, [p[0] for p in pairs[1:]] + [train.tokens]):
        steps += max(0, end - max(start, tokens)) // (size * seq_length)
    return steps


def validate(train, seq_length: int, per_step_unit: int, probe_minimum: int) -> List[str]:
    """Problems with `train.batch_schedule`, one line each. `per_step_unit`: micro-batch x
    data-parallel size, which every batch must be a multiple of; `probe_minimum`: the smallest
    batch the noise-scale probe can measure (0 when it is off)."""
    schedule, budget = train.batch_schedule, train.tokens
    if schedule is None:
        return []
    if schedule == NOISE_SCALE:
        return _validate_growth(train, seq_length)
    if isinstance(schedule, str) or not isinstance(schedule, (list, tuple)) or not schedule:
        return [f"train.batch_schedule must be null, '{NOISE_SCALE}' or a list of [tokens, batch] pairs, "
                f"got {schedule!r}"]
    errors, pairs = [], []
    for i, entry in enumerate(schedule):
        where = f"train.batch_schedule[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            errors.append(f"{where} must be a [tokens, batch] pair, got {entry!r}")
            continue
        try:
            tokens = parse_count(entry[0])
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        batch = entry[1]
        if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
            errors.append(f"{where}: the batch must be a positive whole number of sequences, got {batch!r}")
        elif batch % per_step_unit:
            errors.append(f"{where}: batch {batch} must be divisible by train.micro_batch_size x data-parallel "
                          f"size ({per_step_unit})")
        elif batch < probe_minimum:
            errors.append(f"{where}: batch {batch} is under the {probe_minimum} sequences the noise-scale probe "
                          f"needs (train.noise_scale_interval)")
        if tokens >= budget:
            errors.append(f"{where}: a change at {format_count(tokens)} tokens comes at or after the budget "
                          f"train.tokens ({format_count(budget)})")
        if pairs and tokens <= pairs[-1][0]:
            errors.append(f"{where}: tokens must increase from one change to the next, got {format_count(tokens)} "
                          f"after {format_count(pairs[-1][0])}")
        pairs.append((tokens, batch))
    if errors:
        return errors
    realized = token_steps(train, seq_length)
    start, batch = realized[-1]
    step = batch * seq_length
    if start >= budget:
        errors.append(f"train.batch_schedule: its last change, rounded up to a step boundary, lands at {start:,} "
                      f"tokens, at or past the budget train.tokens ({budget:,})")
    elif (budget - start) % step:
        below = start + (budget - start) // step * step
        errors.append(f"train.batch_schedule: the last batch ({batch}, {step:,} tokens per step) from {start:,} "
                      f"tokens does not end on the budget train.tokens ({budget:,}); nearest budgets reached "
                      f"exactly: {below:,} or {below + step:,}")
    return errors


def _validate_growth(train, seq_length: int) -> List[str]:
    g, floor = train.batch_growth, train.global_batch_size
    errors = []
    if train.noise_scale_interval <= 0:
        errors.append(f"train.batch_schedule={NOISE_SCALE} needs train.noise_scale_interval > 0 (the steps between "
                      f"measurements, where the batch may grow)")
    if not (math.isfinite(g.factor) and g.factor > 0):
        errors.append(f"train.batch_growth.factor must be a positive number, got {g.factor}")
    if g.min_interval < 0:
        errors.append(f"train.batch_growth.min_interval must be >= 0 tokens, got {g.min_interval}")
    if g.ceiling < floor or g.ceiling != growth_sizes(floor, g.ceiling)[-1]:
        errors.append(f"train.batch_growth.ceiling ({g.ceiling}) must be train.global_batch_size ({floor}) times a "
                      f"power of two")
    elif train.tokens % (g.ceiling * seq_length):
        errors.append(f"train.tokens ({train.tokens:,}) must be a multiple of the ceiling's step "
                      f"({g.ceiling} x {seq_length} = {g.ceiling * seq_length:,} tokens) so that every batch the "
                      f"run may grow to ends on the budget exactly")
    return errors


def change_line(step: int, tokens: int, old: int, new: int, b_simple: Optional[float] = None) -> str:
    why = f" (B_simple {b_simple:,.0f})" if b_simple is not None else ""
    return f"step {step}: global batch {old} -> {new} sequences at {format_count(tokens, '.4g')} tokens{why}"
