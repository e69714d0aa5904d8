"""The muP coordinate check (Yang et al. 2022; the `mup` package's coord check) on Megatron-Core,
across width and, for the depth rules (Dey et al. 2025), across depth.

Width: for each width, with muP and with standard parametrization, train a few steps of the recipe
and record the RMS of the embedding output, each block's attention and MLP outputs and the logits at
every step. Under muP these stay flat across widths; under standard parametrization the logits
grow with width.

Depth: at the recipe's width, for each depth, with muP's depth rules (the recipe's
mup.depth_alpha, else CompleteP's 1, on a base of the smallest depth) and without (alpha 0), the
same record for the first and last block, and the residual stream as the final norm receives it.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from megatron_power.training import runtime
from megatron_power.training.data import TokenizerInfo, build_datasets, micro_batches
from megatron_power.training.model import build_model
from megatron_power.training.optim import build_optimizer, wrap_model
from megatron_power.training.schedule import TokenScheduler
from megatron_power.training.step import train_step


def _constant_lr(config):
    """A constant lr at the schedule's lr_max from the first step (a coordinate check measures
    updates at full lr)."""
    return replace(config.schedule, kind="constant", warmup=0.0, decay=0.0)


def at_width(config, width: int, mup_enabled: bool):
    """The recipe at another width (ModelConfig.at_width), muP on or off."""
    return replace(config, model=config.model.at_width(width), mup=replace(config.mup, enabled=mup_enabled),
                   schedule=_constant_lr(config))


def at_depth(config, depth: int, alpha: float, base_depth: int):
    """The recipe (with muP) at another depth, with the depth rules at `alpha` (0: without)."""
    mup = replace(config.mup, enabled=True, depth_alpha=alpha, base_depth=base_depth if alpha else None)
    return replace(config, model=replace(config.model, num_layers=depth), mup=mup, schedule=_constant_lr(config))


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def _record(model, values: Dict[str, float], by_depth: bool) -> List:
    """Forward hooks on the first micro-batch of each step, recording what the next layer sees:
    the logits as the loss sees them, after Megatron's muP output multiplier (applied by the model
    after its output layer). By depth, the first and last blocks and the residual stream."""
    handles = []
    logits_mult = model.config.mup_output_mult if model.config.use_mup else 1.0

    def hook(name, mult=1.0):
        def record(module, args, out):
            if name not in values:
                values[name] = _rms(out[0] if isinstance(out, tuple) else out) * mult
        return record

    handles.append(model.embedding.register_forward_hook(hook("embedding")))
    layers = model.decoder.layers
    named = {"first": layers[0], "last": layers[-1]} if by_depth else dict(enumerate(layers))
    for i, layer in named.items():
        handles.append(layer.self_attention.register_forward_hook(hook(f"attn.{i}")))
        handles.append(layer.mlp.register_forward_hook(hook(f"mlp.{i}")))
    if by_depth:
        residual = hook("residual")
        handles.append(model.decoder.final_layernorm.register_forward_pre_hook(
            lambda module, args: residual(module, args, args[0])))
    handles.append(model.output_layer.register_forward_hook(hook("logits", logits_mult)))
    return handles


def run(config, steps: int, widths: List[int] = (), depths: List[int] = ()) -> List[dict]:
    """Rows of (parametrization, width or depth, step, quantity, rms) for every width (muP and SP)
    or every depth (with and without the depth rules)."""
    rt = runtime.initialize(config)
    tokenizer = TokenizerInfo.from_sentencepiece(config.data.tokenizer)
    train_data, _ = build_datasets(config, tokenizer)
    t = config.train
    if depths:
        alpha = config.mup.depth_alpha or 1.0
        name = f"alpha={alpha:g}"
        points = [(name, "depth", d, at_depth(config, d, alpha, min(depths))) for d in depths]
        points += [("alpha=0", "depth", d, at_depth(config, d, 0.0, min(depths))) for d in depths]
    else:
        points = [("muP" if on else "SP", "width", w, at_width(config, w, on)) for on in (True, False) for w in widths]
    rows = []
    for param, axis, size, c in points:
        gpt = build_model(c, tokenizer.vocab_size)
        model = wrap_model(c, gpt)
        optimizer = build_optimizer(c, model)
        scheduler = TokenScheduler(optimizer, c.schedule, t.tokens, c.optim.weight_decay)
        for step in range(steps):
            values: Dict[str, float] = {}
            handles = _record(gpt, values, by_depth=axis == "depth")
            scheduler.step(step * c.tokens_per_step, c.tokens_per_step)
            batches = micro_batches(train_data, step * t.global_batch_size, t.global_batch_size,
                                    t.micro_batch_size, rt.dp, rt.dp_rank)
            train_step(c, model, optimizer, batches, rt)
            for handle in handles:
                handle.remove()
            rows += [{"param": param, axis: size, "step": step, "quantity": name, "rms": value}
                     for name, value in values.items()]
    runtime.shutdown()
    return rows


def axis_of(rows: List[dict]) -> str:
    return "depth" if "depth" in rows[0] else "width"


def slopes(rows: List[dict], step: int) -> Dict[tuple, float]:
    """Least-squares slope of log(rms) against log(width or depth), per (parametrization, quantity)."""
    axis = axis_of(rows)
    groups: Dict[tuple, list] = {}
    for r in rows:
        if r["step"] == step:
            groups.setdefault((r["param"], r["quantity"]), []).append((r[axis], r["rms"]))
    return {key: float(np.polyfit(np.log([w for w, _ in pts]), np.log([v for _, v in pts]), 1)[0])
            for key, pts in groups.items()}


def write(rows: List[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "coordcheck.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["param", axis_of(rows), "step", "quantity", "rms"])
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out / "coordcheck.png")


def _plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in rows})
    axis = axis_of(rows)
    params = list(dict.fromkeys(r["param"] for r in rows))
    fig, axes = plt.subplots(len(params), len(steps), figsize=(3.2 * len(steps), 6), sharex=True,
                             squeeze=False)
    quantities = sorted({r["quantity"] for r in rows}, key=lambda q: (q != "embedding", q == "logits", q))
    colors = plt.cm.viridis(np.linspace(0, 1, len(quantities)))
    for i, param in enumerate(params):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            for q, color in zip(quantities, colors):
                pts = sorted((r[axis], r["rms"]) for r in rows
                             if r["param"] == param and r["step"] == step and r["quantity"] == q)
                ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", color=color,
                        lw=2.5 if q == "logits" else 1, label=q)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{param}, step {step}")
            if j == 0:
                ax.set_ylabel("RMS of activation")
            if i == len(params) - 1:
                ax.set_xlabel(axis)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Coordinate check: activation RMS against {axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: List[dict]) -> List[str]:
    last = max(r["step"] for r in rows)
    lines = [f"slope of log RMS against log {axis_of(rows)} at step {last}:"]
    for (param, quantity), slope in sorted(slopes(rows, last).items()):
        lines.append(f"  {param:>8} {quantity:<10} {slope:+.3f}")
    return lines

