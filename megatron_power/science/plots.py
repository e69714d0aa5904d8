"""Figures: the learning-rate schedule against tokens, and a sweep's fits (science/fit.py)."""

from __future__ import annotations

import numpy as np

from megatron_power.config import format_count
from megatron_power.training.schedule import learning_rate, phase_tokens


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_schedule(config, path: str) -> None:
    """lr against tokens; with a batch schedule, the global batch against tokens below it (for a
    batch grown by the noise scale, the lr at the floor and at the ceiling batch, its bounds)."""
    from megatron_power.training.batch_schedule import NOISE_SCALE, scheduled_batch

    plt = _pyplot()
    s, t, seq = config.schedule, config.train, config.model.seq_length
    budget = t.tokens
    warmup, decay = phase_tokens(s.warmup, budget), phase_tokens(s.decay, budget)
    tokens = np.unique(np.concatenate([
        np.geomspace(max(1.0, budget * 1e-6), budget, 2000),
        np.linspace(budget - decay, budget, 500) if decay else [],
    ]))
    if t.batch_schedule == NOISE_SCALE:
        curves = {f"batch {b}": [b] * len(tokens) for b in (t.global_batch_size, t.batch_growth.ceiling)}
    else:
        curves = {"batch": [scheduled_batch(t, seq, n) for n in tokens]}
    scheduled = t.batch_schedule is not None
    fig, axes = plt.subplots(2 if scheduled else 1, 1, figsize=(8, 7 if scheduled else 4.5), sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    for i, (label, batches) in enumerate(curves.items()):
        lrs = [learning_rate(n, s, budget, b * seq) for n, b in zip(tokens, batches)]
        name = label if len(curves) > 1 else f"batch {t.global_batch_size}" if not scheduled else "scheduled batch"
        ax.plot(tokens, lrs, color=f"C{3 * i}", label=f"{s.kind} ({name} x {seq})")
    if warmup:
        ax.axvspan(tokens[0], warmup, color="C1", alpha=0.15, label="warmup")
    if decay:
        ax.axvspan(budget - decay, budget, color="C2", alpha=0.15, label=f"decay ({s.decay_shape})")
    ax.set_xscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{config.name}: lr{' and batch' if scheduled else ''} against tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if scheduled:
        below = axes[1][0]
        for i, batches in enumerate(curves.values()):
            below.plot(tokens, batches, color=f"C{3 * i}", drawstyle="steps-post")
        if t.batch_schedule == NOISE_SCALE:
            below.set_title(f"grows with the measured noise scale, between {t.global_batch_size} and "
                            f"{t.batch_growth.ceiling}", fontsize=9)
        below.set_yscale("log", base=2)
        below.set_ylabel("global batch (sequences)")
        below.grid(True, which="both", alpha=0.3)
    axes[-1][0].set_xlabel("tokens seen")
    _save(fig, path)


def _lr_axis(ax, lrs) -> None:
    """A log lr axis labelled at the grid's own values."""
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(lrs)))
    ax.set_xticklabels([f"{lr:g}" for lr in sorted(set(lrs))], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("learning rate")


def plot_lr_sweep(rows, optima, path, label: str) -> None:
    """Final validation loss against lr, a panel per token budget and a line per batch size."""
    plt = _pyplot()
    budgets = sorted({o.tokens for o in optima})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), sharey=True, squeeze=False)
    batches = sorted({r["batch"] for r in rows})
    for ax, tokens in zip(axes[0], budgets):
        for i, batch in enumerate(batches):
            run = sorted((r["lr"], r["valid_loss"]) for r in rows if (r["tokens"], r["batch"]) == (tokens, batch)
                         and r["valid_loss"] is not None and np.isfinite(r["valid_loss"]))
            if run:
                ax.plot(*zip(*run), "o-", color=f"C{i}", label=f"batch {batch}")
            for o in optima:
                if (o.tokens, o.batch) == (tokens, batch):
                    ax.plot(o.lr, o.loss, "*", color=f"C{i}", markersize=14, markeredgecolor="k")
        _lr_axis(ax, [r["lr"] for r in rows])
        ax.set_title(f"T = {format_count(tokens)} tokens")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("final validation loss")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{label}: loss against lr (stars: fitted optima)")
    _save(fig, path)


def plot_gamma_fit(optima, chosen, law, path, label: str) -> None:
    """gamma = lr_opt / beta against T, log-log, with the fitted power law."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    batches = sorted({o.batch for o in optima})
    for i, batch in enumerate(batches):
        mine = [o for o in optima if o.batch == batch]
        ax.plot([o.tokens for o in mine], [o.gamma for o in mine], "o", mfc="none", color=f"C{i}")
        picked = [o for o in chosen if o.batch == batch]
        ax.plot([o.tokens for o in picked], [o.gamma for o in picked], "o", color=f"C{i}", label=f"batch {batch}")
    _finish_power_law(fig, ax, [o.tokens for o in optima], law, f"fit: {law.a:.3g} T^{law.b:.3f} (b +- {law.sigma_b:.2g})",
                      "gamma = lr_opt / beta (batch in reference sequences)", f"{label}: filled points are the best batch sizes at each T", path)


def _finish_power_law(fig, ax, tokens, law, fit_label: str, ylabel: str, title: str, path) -> None:
    """The fitted line over the data's range, log-log axes against T, and the file."""
    t = np.geomspace(min(tokens), max(tokens), 50)
    ax.plot(t, law.a * t ** law.b, "k--", label=fit_label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token budget T")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_noise_scale(points, law, path, label: str) -> None:
    """B_simple at each (T, batch) optimum against T, with its power law."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, batch in enumerate(sorted({b for _, b, _ in points})):
        mine = [(t, v) for t, b, v in points if b == batch]
        ax.plot(*zip(*mine), "o", color=f"C{i}", label=f"batch {batch}")
    _finish_power_law(fig, ax, [p[0] for p in points], law, f"fit: B_simple ~ T^{law.b:.2f}",
                      "gradient noise scale B_simple (sequences)", f"{label}: critical batch size estimate", path)


def plot_transfer(rows, transfer, path, title: str) -> None:
    """Loss against lr for each value of the transfer's axis, a panel per parametrization."""
    plt = _pyplot()
    kinds = sorted({r[transfer.switch] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, value in enumerate(sorted({r[transfer.axis] for r in rows})):
            run = sorted((r["lr"], r["valid_loss"]) for r in rows if r[transfer.switch] == kind
                         and r[transfer.axis] == value and r["valid_loss"] is not None and np.isfinite(r["valid_loss"]))
            if run:
                ax.plot(*zip(*run), "o-", color=f"C{i}", label=f"{transfer.axis} {value}")
                best = min(run, key=lambda p: p[1])
                ax.plot(*best, "*", color=f"C{i}", markersize=14, markeredgecolor="k")
        _lr_axis(ax, [r["lr"] for r in rows])
        ax.set_title("standard parametrization" if transfer.label(kind) == "SP" else transfer.label(kind))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final validation loss")
    fig.suptitle(f"{transfer.title}: {title} (stars: best grid point)")
    _save(fig, path)


def plot_head_to_head(outcomes, outside, path, name: str) -> None:
    """Each schedule's final loss minus tuned WSD's against T, a panel per batch size, error bars
    the spread over seeds; Power's points outside the fit region drawn hollow."""
    plt = _pyplot()
    batches = sorted({b for _, b in outcomes})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.8 * len(batches), 4.0), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        cells = sorted(c for c in outcomes if c[1] == batch)
        tokens = [t for t, _ in cells]
        for i, kind in enumerate(("wsd", "cosine", "power")):
            gap = [outcomes[c][kind].mean - outcomes[c]["wsd"].mean for c in cells]
            spread = [outcomes[c][kind].spread for c in cells]
            label = {"wsd": "WSD, tuned lr", "cosine": "cosine, tuned lr", "power": "Power, one (a, b)"}[kind]
            ax.errorbar(tokens, gap, yerr=spread, color=f"C{i}", label=label, capsize=3, marker="o",
                        mfc="none" if kind == "power" else None, linestyle="-")
            if kind == "power":
                inside = [(t, g) for (t, b), g in zip(cells, gap) if (t, b) not in outside]
                if inside:
                    ax.plot(*zip(*inside), "o", color=f"C{i}", label="Power, cell in the fit region")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xticks(tokens)
        ax.set_xticklabels([format_count(t) for t in tokens])
        ax.minorticks_off()
        ax.set_xlabel("token budget T")
        ax.set_title(f"batch {batch}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final validation loss - tuned WSD's")
    fig.suptitle(f"{name}: head to head at equal tokens (error bars: spread over seeds)")
    _save(fig, path)
