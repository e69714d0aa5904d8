"""`megatron-power study SPEC`: the Power scheduler paper's claims checked on a proxy.

1. Head to head at equal tokens: in every `compare` cell (token budget x batch size) WSD and cosine
   are tuned on the lr grid (seed 0), then rerun at their best grid lr with the other seeds; Power
   runs with one (a, b) at every seed.
2. Transfer: that (a, b) is fitted once (fit.py's procedure) on the WSD optima of the `fit` cells
   only; at every compare cell outside them, the gap of Power's loss to the tuned WSD's.
3. muTransfer for MoE: the WSD lr grid at several widths of an MoE proxy, with muP and with standard
   parametrization; how far the best lr moves across widths.

The runs are sweep points (science/sweep.py) in one directory, run in two stages: `tune` (the lr
grids, which need nothing) and `compare` (which needs the fitted (a, b) and the best grid lrs). Each
invocation runs what is left of the first unfinished stage, so a rerun resumes anywhere, locally
or as SLURM arrays; once both are done it writes study.md, results.csv and the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_power.config import NAME_PATTERN, RECIPES_DIR, format_count, load_yaml, omegaconf_message, parse_count
from megatron_power.errors import ConfigError, FitError
from megatron_power.science import fit, sweep

STUDIES_DIR = RECIPES_DIR / "studies"
Cell = Tuple[int, int]  # (token budget, batch size in sequences)


@dataclass
class Cells:
    """Every (token budget, batch size) pair of two lists."""

    tokens: List[Any] = field(default_factory=list)  # counts, "100K" or 1e5
    batch: List[int] = field(default_factory=list)

    def cells(self) -> List[Cell]:
        return [(parse_count(t), int(b)) for t in self.tokens for b in self.batch]


@dataclass
class MoeArm:
    overrides: List[str] = field(default_factory=list)  # on top of the study's: the experts
    widths: List[int] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    tokens: Any = "100K"
    batch: int = 16


@dataclass
class StudySpec:
    name: str = "study"
    recipe: str = "proxy"
    overrides: List[str] = field(default_factory=list)  # every run's
    lrs: List[float] = field(default_factory=list)  # the grid WSD and cosine are tuned on
    seeds: List[int] = field(default_factory=lambda: [1234])  # the first tunes; all compare
    fit: Cells = field(default_factory=Cells)  # the region (a, b) is fitted on
    compare: Cells = field(default_factory=Cells)  # where WSD, cosine and Power meet
    power_lr_max: float = 0.04  # Power's cap, the same at every cell
    best_batches: int = 3  # fit.fit_gamma's count
    moe: Optional[MoeArm] = None
    eval_sequences: Optional[int] = None
    jobs: Optional[int] = None
    threads: int = 1
    out_dir: str = "runs/studies"

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def sweep(self, overrides: List[str] = (), grid: Optional[Dict[str, List[Any]]] = None) -> sweep.SweepSpec:
        """A sweep in this study's directory: its runs share the directory, the runner and the table."""
        return sweep.SweepSpec(name=self.name, recipe=self.recipe, overrides=[*self.overrides, *overrides],
                               grid=grid or {}, jobs=self.jobs, threads=self.threads,
                               eval_sequences=self.eval_sequences, out_dir=self.out_dir)


def load_spec(spec: str) -> StudySpec:
    path = sweep.spec_path(spec, STUDIES_DIR, "study")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudySpec), load_yaml(path, "study spec"))
        s: StudySpec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"study spec {path}: {getattr(e, 'full_key', '') or ''}: {omegaconf_message(e)} (expected "
                          f"keys: {', '.join(StudySpec.__dataclass_fields__)})") from None
    problems = []
    if len(s.lrs) < 2:
        problems.append(f"lrs: expected two learning rates or more to tune WSD and cosine on, got {s.lrs}")
    if not s.seeds:
        problems.append("seeds: expected at least one seed")
    if s.best_batches < 1:
        problems.append(f"best_batches: expected at least 1 (the batch sizes per budget the fit of gamma keeps), "
                        f"got {s.best_batches}")
    try:
        fit_cells, compare_cells = s.fit.cells(), s.compare.cells()
    except ConfigError as e:
        problems.append(str(e))
    else:
        if len({t for t, _ in fit_cells}) < 2:
            problems.append(f"fit.tokens: expected two token budgets or more to fit b on, got {s.fit.tokens}")
        if not compare_cells:
            problems.append("compare: expected token budgets and batch sizes to compare the schedules at")
        elif not set(compare_cells) - set(fit_cells):
            problems.append("compare: every cell is inside the fit region; transfer needs cells outside it")
    if s.moe is not None and (len(s.moe.widths) < 2 or len(s.moe.lrs) < 2):
        problems.append(f"moe: expected two widths or more and two lrs or more, got {s.moe.widths} and {s.moe.lrs}")
    if not NAME_PATTERN.fullmatch(s.name):
        problems.append(f"name '{s.name}' must be letters, digits, '.', '_' or '-' (it names the study directory)")
    if problems:
        raise ConfigError("\n".join(f"study spec {path}: {p}" for p in problems))
    return s


def _points(sweeps: List[sweep.SweepSpec]) -> List[sweep.Point]:
    """The points of several sweeps, each once (a point is its name), numbered as one list."""
    unique: Dict[str, sweep.Point] = {}
    for s in sweeps:
        for point in sweep.points(s):
            unique.setdefault(point.name, point)
    return [sweep.Point(i, p.name, p.values, p.overrides) for i, p in enumerate(unique.values())]


def _cell_sweep(spec: StudySpec, kind: str, cells: List[Cell], overrides=(), **axes) -> List[sweep.SweepSpec]:
    """Sweeps of schedule `kind` over `cells` (which need not be a product of budgets and batch
    sizes) and `axes`: one per token budget."""
    by_tokens: Dict[int, List[int]] = {}
    for tokens, batch in cells:
        by_tokens.setdefault(tokens, []).append(batch)
    return [spec.sweep(list(overrides), {"schedule.kind": [kind], "train.tokens": [format_count(tokens)],
                                         "train.global_batch_size": sorted(set(batches)), **axes})
            for tokens, batches in by_tokens.items()]


def tune_points(spec: StudySpec) -> List[sweep.Point]:
    """Stage 1: WSD's lr grid at the fit and compare cells, cosine's at the compare cells, seed 0;
    the MoE widths' grids."""
    seed = {"train.seed": [spec.seeds[0]]}
    sweeps = _cell_sweep(spec, "wsd", spec.fit.cells() + spec.compare.cells(), **{"schedule.lr_max": spec.lrs}, **seed)
    sweeps += _cell_sweep(spec, "cosine", spec.compare.cells(), **{"schedule.lr_max": spec.lrs}, **seed)
    if spec.moe is not None:
        m = spec.moe
        sweeps.append(spec.sweep([*m.overrides, f"train.tokens={m.tokens}", f"train.global_batch_size={m.batch}"], {
            "schedule.kind": ["wsd"], "mup.enabled": [True, False], "width": m.widths, "schedule.lr_max": m.lrs,
            **seed}))
    return _points(sweeps)


@dataclass
class Tuned:
    """What stage 2 needs from stage 1."""

    law: fit.PowerLaw  # gamma = a * T**b on the fit cells' WSD optima
    optima: List[fit.Optimum]  # of every fit cell
    chosen: List[fit.Optimum]  # those that went into the fit (the best batch sizes at each T)
    best_lr: Dict[Tuple[str, Cell], float]  # (wsd | cosine, compare cell) -> best grid lr at seed 0


def _is_dense(row) -> bool:
    return row["experts"] is None


def tune_results(spec: StudySpec, rows: List[dict]) -> Tuned:
    """The fit on the fit cells' WSD grids and the best grid lrs at the compare cells, both at seed 0."""
    seed0 = [r for r in rows if _is_dense(r) and r["seed"] == spec.seeds[0] and sweep.Status(r["status"]).done]
    fit_cells = set(spec.fit.cells())
    in_fit = [r for r in seed0 if r["kind"] == "wsd" and (r["tokens"], r["batch"]) in fit_cells]
    optima = fit.optima(in_fit)
    law, chosen = fit.fit_gamma(optima, spec.best_batches)
    best = {}
    for kind in ("wsd", "cosine"):
        for cell in spec.compare.cells():
            grid = [r for r in seed0 if r["kind"] == kind and (r["tokens"], r["batch"]) == cell]
            if not grid:
                raise FitError(f"no {kind} runs at T {cell[0]:,}, batch {cell[1]} in the table")
            best[kind, cell] = min(grid, key=lambda r: math.inf if r["valid_loss"] is None else r["valid_loss"])["lr"]
    return Tuned(law, optima, chosen, best)


def compare_points(spec: StudySpec, tuned: Optional[Tuned]) -> List[sweep.Point]:
    """Stage 2: Power with the fitted (a, b) at every compare cell and seed; WSD and cosine at their
    best grid lr with the other seeds. Without `tuned` (stage 1 not done), placeholders that only
    serve to validate the configs before anything runs."""
    cells = spec.compare.cells()
    a, b = (tuned.law.a, tuned.law.b) if tuned else (1.0, -0.5)
    power = [f"schedule.a={a!r}", f"schedule.b={b!r}", f"schedule.lr_max={spec.power_lr_max!r}"]
    sweeps = _cell_sweep(spec, "power", cells, power, **{"train.seed": spec.seeds})
    for kind in ("wsd", "cosine"):
        for cell in cells:
            if spec.seeds[1:]:
                lr = tuned.best_lr[kind, cell] if tuned else spec.lrs[0]
                sweeps += _cell_sweep(spec, kind, [cell], **{"schedule.lr_max": [lr], "train.seed": spec.seeds[1:]})
    return _points(sweeps)


@dataclass
class Outcome:
    """One schedule at one compare cell: its final validation loss at each seed."""

    losses: List[float]
    lr: Optional[float] = None  # the best grid lr (WSD, cosine); None for Power
    steps: int = 0
    b_simple: Optional[float] = None  # the gradient noise scale at the end of the first seed's run

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def spread(self) -> float:
        """Half the range over seeds (the standard error of the mean for two seeds)."""
        return (max(self.losses) - min(self.losses)) / 2


@dataclass
class Report:
    tuned: Tuned
    outcomes: Dict[Cell, Dict[str, Outcome]]  # compare cell -> wsd | cosine | power -> outcome
    transfer: Dict[Cell, float]  # compare cell outside the fit region -> Power's loss - tuned WSD's
    moe_rows: List[dict]

    @property
    def fit_cells(self) -> List[Cell]:
        """The cells whose optima the fitted (a, b) came from."""
        return sorted({(o.tokens, o.batch) for o in self.tuned.chosen})


def _loss(row) -> float:
    return math.inf if row["valid_loss"] is None else row["valid_loss"]


def analyse(spec: StudySpec, rows: List[dict]) -> Report:
    tuned = tune_results(spec, rows)
    dense = [r for r in rows if _is_dense(r) and sweep.Status(r["status"]).done]
    outcomes: Dict[Cell, Dict[str, Outcome]] = {}
    for cell in spec.compare.cells():
        outcomes[cell] = {}
        for kind in ("wsd", "cosine", "power"):
            lr = tuned.best_lr.get((kind, cell))
            runs = {r["seed"]: r for r in dense if r["kind"] == kind and (r["tokens"], r["batch"]) == cell
                    and (lr is None or r["lr"] == lr)}
            missing = [seed for seed in spec.seeds if seed not in runs]
            if missing:
                raise FitError(f"{kind} at T {cell[0]:,}, batch {cell[1]}: no finished run with seed(s) {missing}")
            first = runs[spec.seeds[0]]
            outcomes[cell][kind] = Outcome([_loss(runs[seed]) for seed in spec.seeds], lr,
                                           cell[0] // (cell[1] * first["seq_length"]), first["b_simple"])
    outside = [c for c in spec.compare.cells() if c not in set(spec.fit.cells())]
    used = set((o.tokens, o.batch) for o in tuned.chosen)
    if used & set(outside):  # cannot happen by construction; the transfer claim rests on it
        raise FitError(f"cells {sorted(used & set(outside))} are both in the fit and counted as transfer")
    transfer = {c: outcomes[c]["power"].mean - outcomes[c]["wsd"].mean for c in outside}
    moe_rows = [r for r in rows if not _is_dense(r) and sweep.Status(r["status"]).done]
    return Report(tuned, outcomes, transfer, moe_rows)


def _cell(cell: Cell) -> str:
    return f"| {format_count(cell[0])} | {cell[1]} |"


def markdown(spec: StudySpec, report: Report) -> str:
    """study.md: the fit, the head-to-head table, the transfer table and the MoE widths."""
    law, seeds = report.tuned.law, len(spec.seeds)
    fit_region = (f"T {', '.join(format_count(t) for t in sorted({t for t, _ in spec.fit.cells()}))} x batch "
                  f"{', '.join(str(b) for b in sorted({b for _, b in spec.fit.cells()}))}")
    lines = [f"# Study {spec.name}", "",
             f"(a, b) fitted once on the WSD optima of the fit region ({fit_region}; {law.points} optima): "
             f"a = {law.a:.4g} +- {law.sigma_a:.2g}, b = {law.b:.3f} +- {law.sigma_b:.2g}; Power's lr capped at "
             f"{spec.power_lr_max:g}.", "",
             f"## Head to head: final validation loss, mean +- half range over {seeds} seed{'s' * (seeds > 1)}", "",
             "WSD and cosine at their best lr of the grid " + ", ".join(f"{lr:g}" for lr in spec.lrs)
             + " (tuned at the first seed); Power at the one fitted (a, b). Steps per run, and the gradient noise "
             "scale B_simple (sequences) at the end of tuned WSD's run.", "",
             "| T | batch | steps | B_simple | WSD (best lr) | cosine (best lr) | Power | Power - WSD | Power - cosine | cell |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell, o in report.outcomes.items():
        where = "outside the fit region" if cell in report.transfer else "in the fit region"
        noise = "" if o["wsd"].b_simple is None else f"{o['wsd'].b_simple:.3g}"
        lines.append(f"{_cell(cell)} {o['wsd'].steps} | {noise} | {o['wsd'].mean:.4f} +- {o['wsd'].spread:.4f} ({o['wsd'].lr:g}) | "
                     f"{o['cosine'].mean:.4f} +- {o['cosine'].spread:.4f} ({o['cosine'].lr:g}) | "
                     f"{o['power'].mean:.4f} +- {o['power'].spread:.4f} | {o['power'].mean - o['wsd'].mean:+.4f} | "
                     f"{o['power'].mean - o['cosine'].mean:+.4f} | {where} |")
    gaps = list(report.transfer.values())
    lines += ["", "## Transfer: Power's (a, b) at cells outside the fit region", "",
              "| T | batch | Power - tuned WSD | seed spread (WSD, Power) |", "|---|---|---|---|"]
    for cell, gap in report.transfer.items():
        o = report.outcomes[cell]
        lines.append(f"{_cell(cell)} {gap:+.4f} | {o['wsd'].spread:.4f}, {o['power'].spread:.4f} |")
    lines += ["", f"Mean gap {np.mean(gaps):+.4f}, largest {max(gaps):+.4f}, over {len(gaps)} cells; "
              f"none of them is among the {len(report.fit_cells)} cells the fit used."]
    if report.moe_rows:
        lines += ["", "## muTransfer for MoE: the best lr across widths", "",
                  "| parametrization | width | best grid lr | fitted optimum | loss there |", "|---|---|---|---|---|"]
        for mup, by_width in sorted(fit.transfer_shift(report.moe_rows, fit.WIDTH).items(), reverse=True):
            for width, (index, at_edge) in by_width.items():
                runs = [r for r in report.moe_rows if r["mup"] == mup and r["width"] == width]
                lr, loss, _, _ = fit.optimal_lr([r["lr"] for r in runs], [r["valid_loss"] for r in runs])
                grid = sorted({r["lr"] for r in runs})
                lines.append(f"| {'muP' if mup else 'SP'} | {width} | {grid[index]:g}{' (edge)' if at_edge else ''} "
                             f"| {lr:.4g} | {loss:.4f} |")
            moved = max(i for i, _ in by_width.values()) - min(i for i, _ in by_width.values())
            lines.append(f"| {'muP' if mup else 'SP'}: the best lr moves {moved} grid step{'s' * (moved != 1)} "
                         f"across widths | | | | |")
    return "\n".join(lines) + "\n"


def write_report(spec: StudySpec, report: Report, out: Path) -> Path:
    from megatron_power.science import plots

    plots.plot_head_to_head(report.outcomes, set(report.transfer), out / "head_to_head.png", spec.name)
    plots.plot_gamma_fit(report.tuned.optima, report.tuned.chosen, report.tuned.law, out / "gamma_fit.png",
                         f"{spec.name}: WSD optima of the fit region")
    if report.moe_rows:
        m = spec.moe
        plots.plot_transfer(report.moe_rows, fit.WIDTH, out / "moe_mutransfer.png",
                            f"MoE proxy, T = {format_count(parse_count(m.tokens))} tokens, batch {m.batch}")
    path = out / "study.md"
    path.write_text(markdown(spec, report))
    return path
