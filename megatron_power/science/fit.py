"""`megatron-power fit RESULTS`: the Power scheduler paper's procedure on a sweep's results table.

1. For each token budget T and batch size, the optimal learning rate: a parabola in log(lr) through
   the best grid point and its neighbours (the best grid point itself where it lies on the grid's
   edge, flagged, or where the curve is not convex there).
2. gamma = lr_opt / beta for the best batch sizes at each T (the paper takes the best 3), beta the
   batch in sequences of `schedule.reference_seq_length` tokens, as the scheduler counts it, so the
   fitted a and b go into a recipe unchanged at any sequence length.
3. A least-squares line log(gamma) = log(a) + b log(T), with standard errors from its residuals.
Besides, each with its power law in T and standard errors, as Time Transfer (arXiv 2410.05838)
reports them: the optimal batch size B*(T) (a parabola in log batch through the optimum losses of
the batch sizes at each T); the lr sensitivity, the curvature of the loss in log lr at the optimum
(which that paper finds shrinking with T); and the gradient noise scale B_simple at each optimum.
And how far the optimum moves across widths with and without muP, and across depths with and
without depth scaling (grid steps).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_power.errors import FitError
from megatron_power.science.sweep import Status

AXES = {"grid.train.tokens", "grid.train.global_batch_size", "grid.schedule.lr_max", "grid.width", "grid.mup.enabled"}


@dataclass
class Optimum:
    tokens: int
    batch: int
    lr: float
    loss: float
    at_edge: bool  # the best lr is the smallest or largest of the grid: the true optimum may lie outside
    grid_index: int  # of the best grid point, in the sorted learning rates
    beta: float  # the batch in reference-length sequences (training/schedule.reference_batch)
    curvature: float = math.nan  # d2 loss / d(ln lr)2 at the optimum; nan at the grid's edge or not convex

    @property
    def gamma(self) -> float:
        return self.lr / self.beta


@dataclass
class PowerLaw:
    """y = a * x**b from a line in log-log space; sigmas are standard errors (nan with 2 points)."""

    a: float
    b: float
    sigma_a: float
    sigma_b: float
    points: int


def read_results(path: Path) -> List[dict]:
    if not path.is_file():
        raise FitError(f"{path}: no such results table (expected the results.csv of a sweep)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"tokens", "batch", "lr", "width", "mup", "seq_length", "reference_seq_length", "valid_loss"}
    missing = need - set(rows[0] if rows else need)
    if not rows or missing:
        raise FitError(f"{path}: expected a sweep's results table with columns {sorted(need)}"
                       + (f"; missing {sorted(missing)}" if rows else "; it has no rows"))
    for row in rows:
        for key in ("tokens", "batch", "width", "seq_length", "reference_seq_length"):
            row[key] = int(row[key])
        row["lr"] = float(row["lr"])
        row["experts"] = int(row["experts"]) if row.get("experts") else None  # None: dense
        if row.get("seed"):
            row["seed"] = int(row["seed"])
        row["mup"] = row["mup"] == "True"
        row["depth"] = int(row["depth"]) if row.get("depth") else None
        row["depth_alpha"] = float(row["depth_alpha"]) if row.get("depth_alpha") else None
        for key in ("valid_loss", "b_simple"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
    return rows


def family(row: dict) -> Tuple:
    """What besides T, batch and lr tells runs apart: width, muP and any other grid axis."""
    others = tuple(sorted((k, row[k]) for k in row if k.startswith("grid.") and k not in AXES))
    return (row["width"], row["mup"]) + others


def family_label(key: Tuple) -> str:
    width, mup, *others = key
    return ", ".join([f"width {width}", "muP" if mup else "SP"] + [f"{k[5:]}={v}" for k, v in others])


def optimal_lr(lrs: List[float], losses: List[Optional[float]]) -> Tuple[float, float, bool, int]:
    """(lr_opt, loss there, at the grid's edge, index of the best grid point) over a lr grid; a
    diverged run (loss inf or missing) counts as worse than any finite one."""
    lr, loss, at_edge, best, _ = _parabola_optimum(lrs, losses)
    return lr, loss, at_edge, best


def _parabola_optimum(lrs, losses):
    """optimal_lr's answer and the parabola's curvature in log x there (nan where none is fitted):
    for any quantity swept on a doubling grid, the lr or the batch size."""
    order = np.argsort(lrs)
    grid = np.asarray(lrs, dtype=float)[order]
    x = np.log(grid)
    y = np.array([math.inf if v is None else v for v in np.asarray(losses, dtype=object)[order]], dtype=float)
    if not np.isfinite(y).any():
        raise FitError(f"no run finished with a finite loss at learning rates {sorted(lrs)}")
    best = int(np.nanargmin(np.where(np.isfinite(y), y, np.inf)))
    at_edge = best in (0, len(x) - 1)
    window = [i for i in range(best - 2, best + 3) if 0 <= i < len(x) and np.isfinite(y[i])]
    if at_edge or len(window) < 3:
        return float(grid[best]), float(y[best]), at_edge, best, math.nan
    c2, c1, c0 = np.polyfit(x[window], y[window], 2)
    if c2 <= 0:
        return float(grid[best]), float(y[best]), False, best, math.nan
    vertex = float(np.clip(-c1 / (2 * c2), x[best - 1], x[best + 1]))
    return math.exp(vertex), float(np.polyval([c2, c1, c0], vertex)), False, best, 2 * float(c2)


def optima(rows: List[dict]) -> List[Optimum]:
    """The optimum of every (T, batch) group of one family."""
    groups: Dict[Tuple[int, int], List[dict]] = defaultdict(list)
    for row in rows:
        if Status(row["status"]).done:
            groups[(row["tokens"], row["batch"])].append(row)
    result = []
    for (tokens, batch), group in sorted(groups.items()):
        if len({r["lr"] for r in group}) < 2:
            continue
        lr, loss, at_edge, index, curvature = _parabola_optimum([r["lr"] for r in group],
                                                                 [r["valid_loss"] for r in group])
        beta = batch * group[0]["seq_length"] / group[0]["reference_seq_length"]
        result.append(Optimum(tokens, batch, lr, loss, at_edge, index, beta, curvature))
    return result


def optimal_batches(opts: List[Optimum]) -> List[Tuple[int, float, bool]]:
    """(T, B*, at the batch grid's edge) for each T with three batch sizes or more: the batch that
    minimises the optimum loss, from a parabola in log batch as optimal_lr does in log lr."""
    by_tokens: Dict[int, List[Optimum]] = defaultdict(list)
    for o in opts:
        by_tokens[o.tokens].append(o)
    result = []
    for tokens, group in sorted(by_tokens.items()):
        if len(group) >= 3:
            batch, _, at_edge, _ = optimal_lr([o.batch for o in group], [o.loss for o in group])
            result.append((tokens, batch, at_edge))
    return result


def lr_sensitivity(opts: List[Optimum], count: int) -> List[Tuple[int, float]]:
    """(T, mean curvature of the loss in ln lr at the optimum over the best `count` batch sizes)."""
    by_tokens: Dict[int, List[float]] = defaultdict(list)
    for o in best_batches(opts, count):
        if math.isfinite(o.curvature):
            by_tokens[o.tokens].append(o.curvature)
    return [(t, float(np.mean(c))) for t, c in sorted(by_tokens.items())]


def power_law(x: List[float], y: List[float]) -> PowerLaw:
    """Least squares of log y = log a + b log x."""
    if len(set(x)) < 2:
        raise FitError(f"a power law needs at least two distinct x values, got {sorted(set(x))}")
    X = np.column_stack([np.ones(len(x)), np.log(x)])
    Y = np.log(y)
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    n = len(x)
    if n > 2:
        residual = Y - X @ coef
        cov = residual @ residual / (n - 2) * np.linalg.inv(X.T @ X)
        sigma_log_a, sigma_b = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    else:
        sigma_log_a = sigma_b = math.nan
    a = math.exp(coef[0])
    return PowerLaw(a=a, b=float(coef[1]), sigma_a=a * sigma_log_a, sigma_b=sigma_b, points=n)


def slope_within_batches(opts: List[Optimum]) -> Tuple[float, float]:
    """b of gamma ~ T**b with its own intercept per batch size, and its standard error: the trend
    in T alone, where lr_opt does not scale linearly with batch (small proxies) and pooling the
    batch sizes mixes that in."""
    batches = sorted({o.batch for o in opts})
    X = np.array([[float(o.batch == b) for b in batches] + [math.log(o.tokens)] for o in opts])
    Y = np.log([o.gamma for o in opts])
    dof = len(opts) - X.shape[1]
    if dof < 1 or np.linalg.matrix_rank(X) < X.shape[1]:
        return math.nan, math.nan
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    residual = Y - X @ coef
    cov = residual @ residual / dof * np.linalg.inv(X.T @ X)
    return float(coef[-1]), math.sqrt(cov[-1, -1])


def best_batches(opts: List[Optimum], count: int) -> List[Optimum]:
    """At each T, the optima of the `count` batch sizes with the lowest loss."""
    by_tokens: Dict[int, List[Optimum]] = defaultdict(list)
    for o in opts:
        by_tokens[o.tokens].append(o)
    return [o for group in by_tokens.values() for o in sorted(group, key=lambda o: o.loss)[:count]]


def fit_gamma(opts: List[Optimum], count: int = 3) -> Tuple[PowerLaw, List[Optimum]]:
    """gamma = lr_opt / beta against T over the best `count` batch sizes at each T."""
    chosen = best_batches(opts, count)
    return power_law([o.tokens for o in chosen], [o.gamma for o in chosen]), chosen


@dataclass(frozen=True)
class Transfer:
    """A hyperparameter-transfer check: the lr grid at several values of `axis`, once per value
    of the parametrization `switch` that should keep the optimum in place."""

    axis: str  # results column swept across: width or depth
    switch: str  # results column of the parametrization: mup or depth_alpha
    title: str
    figure: str

    def label(self, value) -> str:
        if self.switch == "mup":
            return "muP" if value else "SP"
        return f"depth_alpha {value:g}" + {1.0: " (CompleteP)", 0.5: " (depth-muP)", 0.0: " (no depth scaling)"}.get(value, "")


WIDTH = Transfer("width", "mup", "muTransfer", "mutransfer.png")
DEPTH = Transfer("depth", "depth_alpha", "depth transfer", "depth_transfer.png")
TRANSFERS = (WIDTH, DEPTH)


def transfer_rows(rows: List[dict], transfer: Transfer) -> List[dict]:
    """The runs of the (T, batch, the other transfers' axes) with the most (axis, switch)
    combinations, if they hold two values of the axis or more."""
    held = [c for t in TRANSFERS if t != transfer for c in (t.axis, t.switch)]
    groups: Dict[Tuple, List[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["tokens"], row["batch"], *(row.get(c) for c in held))].append(row)
    best = max(groups.values(), key=lambda g: len({(r[transfer.axis], r[transfer.switch]) for r in g}))
    return best if len({r[transfer.axis] for r in best}) >= 2 else []


def transfer_shift(rows: List[dict], transfer: Transfer) -> Dict[object, Dict[int, Tuple[int, bool]]]:
    """Each parametrization: axis value -> (grid index of its best learning rate, whether at the grid's edge)."""
    by_kind: Dict[object, Dict[int, List[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_kind[row[transfer.switch]][row[transfer.axis]].append(row)
    result = {}
    for kind, values in by_kind.items():
        best = {}
        for value, runs in sorted(values.items()):
            if len(runs) >= 2:
                _, _, at_edge, index = optimal_lr([r["lr"] for r in runs], [r["valid_loss"] for r in runs])
                best[value] = (index, at_edge)
        if len(best) >= 2:
            result[kind] = best
    return result


def yaml_fragment(law: PowerLaw, source: Path, reference_seq_length: int, runs: int) -> str:
    return (f"# Fitted by `megatron-power fit {source}` from {runs} runs: lr_opt / beta = a * T**b,\n"
            f"# beta the batch in sequences of {reference_seq_length} tokens (at any model.seq_length), T in tokens.\n"
            f"# a = {law.a:.4g} +- {law.sigma_a:.2g}, b = {law.b:.4f} +- {law.sigma_b:.2g} (standard errors).\n"
            f"schedule:\n  kind: power\n  a: {law.a:.6g}\n  b: {law.b:.6g}\n"
            f"  reference_seq_length: {reference_seq_length}\n")


def noise_scale_points(rows: List[dict], opts: List[Optimum]) -> List[Tuple[int, int, float]]:
    """(T, batch, B_simple) of the run nearest each optimum."""
    result = []
    for o in opts:
        group = sorted((r for r in rows if (r["tokens"], r["batch"]) == (o.tokens, o.batch)), key=lambda r: r["lr"])
        value = group[o.grid_index]["b_simple"] if o.grid_index < len(group) else None
        if value is not None and value > 0 and math.isfinite(value):
            result.append((o.tokens, o.batch, value))
    return result


def run(results: Path, out: Path, count: int = 3) -> List[str]:
    """Every analysis the table supports, as report lines; figures and fit*.yaml written to `out`."""
    from megatron_power.science import plots

    rows = read_results(results)
    done = [r for r in rows if Status(r["status"]).done]
    if not done:
        raise FitError(f"{results}: no finished runs yet (statuses: {sorted({r['status'] for r in rows})})")
    out.mkdir(parents=True, exist_ok=True)
    families: Dict[Tuple, List[dict]] = defaultdict(list)
    for row in done:
        families[family(row)].append(row)
    lines = [f"{len(done)} of {len(rows)} runs finished or diverged, in {len(families)} famil"
             f"{'y' if len(families) == 1 else 'ies'}"]
    for key, members in families.items():
        label = family_label(key)
        suffix = "" if len(families) == 1 else "-" + label.replace(", ", "-").replace(" ", "")
        opts = optima(members)
        if not opts:
            lines.append(f"[{label}] no (T, batch) group has two or more learning rates: nothing to fit")
            continue
        lines.append(f"[{label}] optimal learning rate per token budget and batch size:")
        for o in opts:
            lines.append(f"  T {o.tokens:>12,}  batch {o.batch:>5}  lr_opt {o.lr:.4g}  loss {o.loss:.4f}"
                         + ("  (at the grid's edge: widen the lr range)" if o.at_edge else ""))
        plots.plot_lr_sweep(members, opts, out / f"lr_sweep{suffix}.png", label)
        if len({o.tokens for o in opts}) < 2:
            lines.append(f"[{label}] one token budget only: a and b need two or more")
            continue
        law, chosen = fit_gamma(opts, count)
        lines.append(f"[{label}] gamma = lr_opt / beta = a * T**b over the best {count} batch sizes at each T "
                     f"({law.points} points): a = {law.a:.4g} +- {law.sigma_a:.2g}, b = {law.b:.4f} +- {law.sigma_b:.2g}")
        b_within, sigma_within = slope_within_batches(opts)
        if math.isfinite(b_within):
            lines.append(f"[{label}] b with an intercept per batch size (the trend in T alone): "
                         f"{b_within:.4f} +- {sigma_within:.2g}")
        fragment = out / f"fit{suffix}.yaml"
        fragment.write_text(yaml_fragment(law, results, members[0]["reference_seq_length"], len(members)))
        plots.plot_gamma_fit(opts, chosen, law, out / f"gamma_fit{suffix}.png", label)
        lines.append(f"[{label}] wrote {fragment}")
        b_star = optimal_batches(opts)
        if len(b_star) >= 2:
            batch_law = power_law([t for t, _, _ in b_star], [b for _, b, _ in b_star])
            edge = [f"{t:,}" for t, _, at_edge in b_star if at_edge]
            lines.append(f"[{label}] optimal batch size B*(T) = {batch_law.a:.3g} +- {batch_law.sigma_a:.2g} * T**"
                         f"{batch_law.b:.3f} +- {batch_law.sigma_b:.2g} sequences ("
                         + ", ".join(f"T {t:,}: {b:.0f}" for t, b, _ in b_star) + ")"
                         + (f"; at the batch grid's edge at T {', '.join(edge)}: widen the batch range" if edge else ""))
        sensitivity = lr_sensitivity(opts, count)
        if len(sensitivity) >= 2:
            law_k = power_law([t for t, _ in sensitivity], [k for _, k in sensitivity])
            lines.append(f"[{label}] lr sensitivity, d2 loss / d(ln lr)2 at the optimum (best {count} batch sizes): "
                         f"{law_k.a:.3g} +- {law_k.sigma_a:.2g} * T**{law_k.b:.3f} +- {law_k.sigma_b:.2g} ("
                         + ", ".join(f"T {t:,}: {k:.3g}" for t, k in sensitivity) + ")")
        noise = noise_scale_points(members, opts)
        if len({t for t, _, _ in noise}) >= 2:
            noise_law = power_law([t for t, _, _ in noise], [b for _, _, b in noise])
            plots.plot_noise_scale(noise, noise_law, out / f"noise_scale{suffix}.png", label)
            lines.append(f"[{label}] gradient noise scale at each optimum: B_simple = {noise_law.a:.3g} +- "
                         f"{noise_law.sigma_a:.2g} * T**{noise_law.b:.2f} +- {noise_law.sigma_b:.2f} sequences "
                         f"(Time Transfer: B_crit grows like T)")
    for transfer in TRANSFERS:
        chosen = transfer_rows(done, transfer)
        if not chosen:
            continue
        tokens, batch = chosen[0]["tokens"], chosen[0]["batch"]
        held = f"width {chosen[0]['width']}, " if transfer.axis == "depth" else ""
        for kind, by_value in sorted(transfer_shift(chosen, transfer).items(), reverse=True):
            indices = {v: i for v, (i, _) in by_value.items()}
            moved = max(indices.values()) - min(indices.values())
            edge = [v for v, (_, at_edge) in by_value.items() if at_edge]
            lines.append(f"{transfer.title} at T {tokens:,}, batch {batch}, {held}{transfer.label(kind)}: best lr grid "
                         f"index by {transfer.axis} {indices}: the optimum moves {moved} grid step{'s' if moved != 1 else ''}"
                         + (f" (at the grid's edge for {transfer.axis}s {edge}: widen the lr range)" if edge else ""))
        plots.plot_transfer(chosen, transfer, out / transfer.figure, f"T = {tokens:,} tokens, batch {batch}")
    lines.append(f"figures in {out}")
    return lines
