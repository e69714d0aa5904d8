"""Learning rate as a pure function of tokens seen, and its adapter to Megatron's optimizer.

Power scheduler (Shen et al. 2024, arXiv 2408.13359, eq. 7-8):
    lr(n) = min(lr_max, beta * a * n**b)      n: tokens seen, beta: global batch in sequences
The paper fitted a = 4, b = -0.51 with sequences of 4096 tokens, so beta here counts the batch's
tokens in units of `schedule.reference_seq_length` (4096 by default): beta = batch tokens / 4096.
A model with shorter or longer sequences then gets the same lr for the same tokens per step, and
(a, b) fitted at one sequence length (`fit` uses the same unit) apply at any other.

A linear warmup to lr(N_warmup) and, in the last N_decay tokens of the budget N, a decay
f(r) * lr(N - N_decay) towards min_lr, r the fraction of the decay done.

Because the schedule reads tokens, not steps, a change of batch size (after a resume, or under a
ramp) keeps the run on the same lr-versus-tokens curve.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

# f(r): 1 at the start of the decay (r = 0), 0 at its end (r = 1).
DECAY_SHAPES: Dict[str, Callable[[float], float]] = {
    # IBM's implementation of the paper's exponential decay.
    "exp_ibm": lambda r: (math.exp(1.0 - r) - 1.0) / (math.e - 1.0),
    # Megatron-Core's WSD "exponential" decay.
    "exp_megatron": lambda r: 2.0 * 0.5**r - 1.0,
    "linear": lambda r: 1.0 - r,
    "1-sqrt": lambda r: 1.0 - math.sqrt(r),
    "cosine": lambda r: 0.5 * (1.0 + math.cos(math.pi * r)),
}
KINDS = ("power", "wsd", "cosine", "constant")


def power_lr(tokens: float, batch: float, a: float, b: float, lr_max: float) -> float:
    """The Power scheduler's lr at `tokens` for a global batch of `batch` reference-length sequences."""
    if tokens <= 0:
        return lr_max
    return min(lr_max, batch * a * tokens**b)


def reference_batch(schedule, batch_tokens: int) -> float:
    """beta of the Power formula: a batch of `batch_tokens` tokens in reference-length sequences."""
    return batch_tokens / schedule.reference_seq_length


def learning_rate(tokens: float, schedule, budget: int, batch_tokens: int) -> float:
    """The base learning rate after `tokens` of a `budget`-token run whose optimizer steps take
    `batch_tokens` tokens each (schedule: ScheduleConfig)."""
    s = schedule
    warmup, decay = phase_tokens(s.warmup, budget), phase_tokens(s.decay, budget)

    if s.kind == "cosine":
        # Megatron's cosine: warmup to lr_max, then a half cosine to min_lr over the rest.
        if warmup > 0 and tokens < warmup:
            return s.lr_max * tokens / warmup
        r = min(1.0, (tokens - warmup) / max(1, budget - warmup))
        return s.min_lr + DECAY_SHAPES["cosine"](r) * (s.lr_max - s.min_lr)

    def plateau(n: float) -> float:
        return power_lr(n, reference_batch(s, batch_tokens), s.a, s.b, s.lr_max) if s.kind == "power" else s.lr_max

    if warmup > 0 and tokens < warmup:
        return plateau(warmup) * tokens / warmup
    decay_start = budget - decay
    if decay > 0 and tokens >= decay_start:
        r = min(1.0, (tokens - decay_start) / decay)
        start = plateau(decay_start)
        return s.min_lr + DECAY_SHAPES[s.decay_shape](r) * (start - s.min_lr)
    return plateau(tokens)


def power_law_note(schedule, budget: int, batch_tokens: int):
    """One line when a Power schedule's cap hides its power law, else None: the cap lasting until
    the decay (the run is a constant-lr run with a decay), or outlasting the warmup."""
    s = schedule
    if s.kind != "power":
        return None
    batch = reference_batch(s, batch_tokens)
    cap_end = (s.lr_max / (batch * s.a)) ** (1.0 / s.b)  # where batch * a * n**b falls to lr_max
    warmup, decay = phase_tokens(s.warmup, budget), phase_tokens(s.decay, budget)
    decay_start = budget - decay
    if cap_end >= decay_start:
        return (f"warning: the power law never acts in this run: beta {batch:g} x a {s.a:g} x n^{s.b:g} stays "
                f"above lr_max {s.lr_max:g} until {cap_end:,.0f} tokens, past the {decay_start:,} where "
                f"{'the decay starts' if decay else 'the run ends'} (lower schedule.a or schedule.lr_max, or train longer)")
    if cap_end > warmup:
        return (f"note: the lr holds at lr_max {s.lr_max:g} from the end of the warmup ({warmup:,} tokens) to "
                f"{cap_end:,.0f} tokens, where the power law takes over")
    return None


def decay_undone_warning(saved, config, tokens: int, batch_tokens: int) -> Optional[str]:
    """A warning when a run resumed at `tokens` under another train.tokens than its `saved` config
    had begun to decay, and `config`'s schedule takes its lr back up (saved, config: Config)."""
    old, new = saved.train.tokens, config.train.tokens
    if new == old:
        return None
    s = saved.schedule
    decay_start = phase_tokens(s.warmup, old) if s.kind == "cosine" else old - phase_tokens(s.decay, old)
    before = learning_rate(tokens, s, old, batch_tokens)
    after = learning_rate(tokens, config.schedule, new, batch_tokens)
    if tokens <= decay_start or after <= before:
        return None
    return (f"warning: train.tokens {old:,} -> {new:,}: this run has decayed since {decay_start:,} tokens, and the "
            f"new schedule takes its lr at {tokens:,} tokens from {before:.3g} back up to {after:.3g} (the steps "
            f"trained in the decay stay decayed); to train it as planned for {new:,} tokens, go on from a checkpoint "
            f"before the decay (`megatron-power rewind {config.run_dir}` lists them)")


def phase_tokens(length: float, budget: int) -> int:
    """A warmup or decay length: tokens, or a fraction of the budget when below 1."""
    return int(round(length * budget)) if length < 1 else int(length)


def validate(s, budget: int) -> List[str]:
    """Problems with a ScheduleConfig for a run of `budget` tokens, one line each."""
    errors = []
    if s.kind not in KINDS:
        errors.append(f"schedule.kind '{s.kind}' is unknown; expected one of {', '.join(KINDS)}")
    if s.decay_shape not in DECAY_SHAPES:
        errors.append(f"schedule.decay_shape '{s.decay_shape}' is unknown; expected one of "
                      f"{', '.join(DECAY_SHAPES)}")
    numbers = {name: getattr(s, name) for name in ("a", "b", "lr_max", "min_lr", "warmup", "decay")}
    bad = [f"schedule.{name} must be a finite number, got {value}" for name, value in numbers.items()
           if not math.isfinite(value)]
    if bad:
        return errors + bad
    if s.kind == "power":
        if s.a <= 0:
            errors.append(f"schedule.a must be positive, got {s.a}")
        if s.b >= 0:
            errors.append(f"schedule.b must be negative (lr falls with tokens), got {s.b}")
        if s.reference_seq_length <= 0:
            errors.append(f"schedule.reference_seq_length must be a positive number of tokens, got "
                          f"{s.reference_seq_length}")
    if s.lr_max <= 0:
        errors.append(f"schedule.lr_max must be positive, got {s.lr_max}")
    elif not 0 <= s.min_lr < s.lr_max:
        errors.append(f"schedule.min_lr must be in [0, lr_max), got {s.min_lr}")
    if s.warmup < 0 or s.decay < 0:
        errors.append(f"schedule.warmup and schedule.decay must not be negative, got {s.warmup}, {s.decay}")
    else:
        warmup, decay = phase_tokens(s.warmup, budget), phase_tokens(s.decay, budget)
        if warmup + decay > budget:
            errors.append(f"schedule.warmup + schedule.decay ({warmup:,} + {decay:,} tokens) exceed "
                          f"the token budget train.tokens ({budget:,})")
    return errors


class TokenScheduler:
    """Sets every parameter group of a Megatron optimizer from the schedule at a token count.

    Each group keeps its own base (`max_lr x lr_mult`; muP sets lr_mult = 1/m_width for hidden
    matrices); the schedule's shape multiplies it. Weight decay is applied as `weight_decay * wd_mult`, which is how Megatron's
    groups switch it off for norms and biases.
    """

    def __init__(self, optimizer, schedule, budget: int, weight_decay: float):
        self.optimizer = optimizer
        self.schedule = schedule
        self.budget = budget
        self.weight_decay = weight_decay

    def step(self, tokens: int, batch_tokens: int) -> float:
        lr = learning_rate(tokens, self.schedule, self.budget, batch_tokens)
        factor = lr / self.schedule.lr_max
        for group in self.optimizer.param_groups:
            group["lr"] = factor * group["max_lr"] * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        return lr


def schedule_table(config, token_counts: List[int]) -> List[str]:
    """One line per token count: the global batch in force, the base lr and the lr of each
    parameter group. A batch grown by the noise scale is not known in advance: there, the lines
    are at the floor batch (a larger batch raises the Power lr in proportion, up to lr_max)."""
    from megatron_power.training.batch_schedule import NOISE_SCALE, scheduled_batch
    from megatron_power.training.mup import group_base_lrs

    t, seq = config.train, config.model.seq_length
    bases = group_base_lrs(config)
    lines = [f"{'tokens':>18}  {'batch':>6}  {'lr':>10}  " + "  ".join(f"{name:>16}" for name in bases)]
    for n in token_counts:
        batch = t.global_batch_size if t.batch_schedule == NOISE_SCALE else scheduled_batch(t, seq, n)
        lr = learning_rate(n, config.schedule, t.tokens, batch * seq)
        factor = lr / config.schedule.lr_max
        lines.append(f"{n:>18,}  {batch:>6}  {lr:>10.4e}  " + "  ".join(f"{factor * b:>16.4e}" for b in bases.values()))
    return lines
