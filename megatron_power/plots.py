"""Figures: the learning-rate schedule against tokens."""

from __future__ import annotations

import numpy as np

from megatron_power.scheduler import learning_rate, phase_tokens


def plot_schedule(config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, budget, batch = config.schedule, config.train.tokens, config.train.global_batch_size
    warmup, decay = phase_tokens(s.warmup, budget), phase_tokens(s.decay, budget)
    tokens = np.unique(np.concatenate([
        np.geomspace(max(1.0, budget * 1e-6), budget, 2000),
        np.linspace(budget - decay, budget, 500) if decay else [],
    ]))
    lrs = [learning_rate(n, s, budget, batch) for n in tokens]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(tokens, lrs, color="C0", label=f"{s.kind} (batch {batch})")
    if warmup:
        ax.axvspan(tokens[0], warmup, color="C1", alpha=0.15, label="warmup")
    if decay:
        ax.axvspan(budget - decay, budget, color="C2", alpha=0.15, label=f"decay ({s.decay_shape})")
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{config.name}: lr against tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
