"""`megatron-power sweep SPEC`: a grid of proxy runs, run locally or as a SLURM job array, collected
into one results table.

A spec (recipes/sweeps/*.yaml) names a base recipe, overrides common to every point and a grid of
dotted keys (plus `width`, which scales hidden size, heads and MLP together); it may extend another
spec, adding overrides and replacing axes. Each point is an ordinary training run under
runs/sweeps/<name>/<point>, named after its values, so that a rerun finds it: finished points are
skipped, interrupted ones resume from their checkpoint, diverged ones are recorded and not retried.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_power.config import (
    FINISHED,
    NAME_PATTERN,
    RECIPES_DIR,
    as_name,
    load_config,
    load_yaml,
    omegaconf_message,
    setting_changes,
    to_yaml,
)
from megatron_power.errors import ConfigError, NonFiniteError

SPECS_DIR = RECIPES_DIR / "sweeps"
DIVERGED = "diverged.json"  # written here when a point stops on non-finite losses (train's exit code 3)
# Short names for the usual axes in point names; other keys use their last component.
ABBREVIATIONS = {"schedule.lr_max": "lr", "train.global_batch_size": "bs", "train.tokens": "T",
                 "mup.enabled": "mup", "width": "w", "schedule.kind": "", "train.seed": "seed",
                 "model.num_layers": "L", "mup.depth_alpha": "alpha"}


@dataclass
class SweepSpec:
    name: str = "sweep"
    recipe: str = "proxy"
    overrides: List[str] = field(default_factory=list)  # applied to every point
    grid: Dict[str, List[Any]] = field(default_factory=dict)  # dotted key (or `width`) -> values
    jobs: Optional[int] = None  # points at once on this machine; default: GPUs, or cores / threads
    threads: int = 1  # CPU threads per point (OMP_NUM_THREADS)
    # Every point's final validation loss over the same first N validation sequences (sets
    # train.eval_batches from the point's batch size); None keeps the recipe's eval_batches.
    eval_sequences: Optional[int] = None
    out_dir: str = "runs/sweeps"

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class Point:
    index: int
    name: str
    values: Dict[str, Any]  # grid key -> value
    overrides: List[str]  # the recipe overrides of this point, grid values last
    config: Any = None  # its validated Config, once check() has made it


def spec_path(spec: str, directory: Path = SPECS_DIR, kind: str = "sweep") -> Path:
    """A spec is a name in `directory` (recipes/sweeps/ for sweeps) or a path to a YAML file."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"{kind} spec {spec} not found (expected a YAML file or one of: {known})")
    return path


def _spec_node(path: Path, seen: Tuple[Path, ...] = ()):
    """A spec file's keys over those of the spec it `extends` (another spec's name or path): its
    overrides come after the base's, its grid axes replace or join the base's."""
    node = load_yaml(path, "sweep spec")
    base = node.pop("extends", None)
    if base is None:
        return node
    name = str(base)  # a file is found beside the extending spec, a name among the specs there
    base_path = spec_path(str(path.parent / name) if Path(name).suffix in (".yaml", ".yml") else name, path.parent)
    if base_path.resolve() in seen + (path.resolve(),):
        raise ConfigError(f"sweep spec {path}: extends {base}, which extends it back")
    parent = _spec_node(base_path, seen + (path.resolve(),))
    overrides = list(parent.get("overrides", [])) + list(node.pop("overrides", []))
    merged = OmegaConf.merge(parent, node)
    merged.overrides = overrides
    return merged


def load_spec(spec: str) -> SweepSpec:
    path = spec_path(spec)
    node = _spec_node(path)
    if "grid" in node and not OmegaConf.is_dict(node.grid):  # OmegaConf's merge raises a TypeError
        raise ConfigError(f"sweep spec {path}: grid: expected keys, each with a list of values "
                          f"(e.g. schedule.lr_max: [0.005, 0.01]), got {OmegaConf.to_container(node)['grid']!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepSpec), node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"sweep spec {path}: {getattr(e, 'full_key', '') or ''}: {omegaconf_message(e)} "
                          f"(expected keys: extends, name, recipe, overrides, grid, jobs, threads, eval_sequences, "
                          f"out_dir)") from None
    s: SweepSpec = OmegaConf.to_object(merged)
    problems = [f"grid.{k}: expected a non-empty list of values, got {v!r}"
                for k, v in s.grid.items() if not isinstance(v, list) or not v]
    if not s.grid:
        problems.append("grid is empty (expected e.g. schedule.lr_max: [0.005, 0.01, 0.02])")
    if not NAME_PATTERN.fullmatch(s.name):
        problems.append(f"name '{s.name}' must be letters, digits, '.', '_' or '-' (it names the sweep directory)")
    if s.eval_sequences is not None and s.eval_sequences < 1:
        problems.append(f"eval_sequences must be positive, got {s.eval_sequences}")
    if s.threads < 1 or (s.jobs is not None and s.jobs < 1):
        problems.append(f"jobs and threads must be at least 1, got jobs={s.jobs} threads={s.threads}")
    if problems:
        raise ConfigError("\n".join(f"sweep spec {path}: {p}" for p in problems))
    return s


def _format(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _width_overrides(spec: SweepSpec, width: int) -> List[str]:
    """Hidden size `width` with the base recipe's head size and MLP ratio."""
    try:
        m = load_config(spec.recipe, spec.overrides, check_paths=False).model.at_width(width)
    except ConfigError as e:
        raise ConfigError(f"grid.width: {e}") from None
    names = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "moe_ffn_hidden_size")
    return [f"model.{name}={getattr(m, name)}" for name in names if getattr(m, name) is not None]


def points(spec: SweepSpec) -> List[Point]:
    keys = list(spec.grid)
    result = []
    widths = {int(w): _width_overrides(spec, int(w)) for w in spec.grid.get("width", [])}
    for index, combo in enumerate(itertools.product(*(spec.grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        overrides = list(spec.overrides)
        for key, value in values.items():
            if key == "width":
                overrides += widths[int(value)]
            else:
                text = _format(value) if not isinstance(value, bool) else str(value).lower()
                if re.search(r"\s", text):
                    raise ConfigError(f"grid.{key}: value '{text}' contains whitespace")
                overrides.append(f"{key}={text}")
        if spec.eval_sequences:
            try:
                batch = int(values["train.global_batch_size"]) if "train.global_batch_size" in values else \
                    load_config(spec.recipe, overrides, check_paths=False).train.global_batch_size
            except (ConfigError, ValueError):
                batch = 0
            if batch > 0:  # else the point is refused by check(), with its problem
                if spec.eval_sequences % batch:
                    raise ConfigError(f"sweep eval_sequences ({spec.eval_sequences}) must be a multiple of every "
                                      f"batch size; {batch} does not divide it")
                overrides.append(f"train.eval_batches={spec.eval_sequences // batch}")
        name = "_".join(f"{ABBREVIATIONS.get(k, k.split('.')[-1])}{_format(v)}" for k, v in values.items())
        result.append(Point(index, as_name(name), values, overrides))
    return result


def point_config(spec: SweepSpec, point: Point, world_size: int = 1, check_paths: bool = True):
    return load_config(spec.recipe, point.overrides + [f"out_dir={spec.dir}", f"name={point.name}"],
                       world_size, check_paths=check_paths)


def check(spec: SweepSpec, world_size: int = 1, check_paths: bool = True, grid: Optional[List[Point]] = None,
          compare_saved: bool = True) -> List[Point]:
    """Every point's config validated (the spec's grid, or `grid`: points run in `spec`'s directory),
    and, with `compare_saved`, every existing point directory made by the same config; a ConfigError
    names each problem (once, with how many points have it) before any run starts."""
    problems: Dict[str, List[str]] = {}
    grid = points(spec) if grid is None else grid
    for point in grid:
        try:
            config = point.config = point_config(spec, point, world_size, check_paths)
        except ConfigError as e:
            for line in str(e).splitlines():
                problems.setdefault(line, []).append(point.name)
            continue
        saved = config.run_dir / "config.yaml"
        if compare_saved and saved.is_file():
            # out_dir may be spelled absolute (a SLURM job's) or relative (here): the directory is the same.
            changed = setting_changes(saved.read_text(), to_yaml(config), ignore=("out_dir",))
            if changed:
                problems.setdefault(
                    f"{config.run_dir} was run with another config ({'; '.join(changed[:3])}); "
                    f"give the sweep a new name, or move that directory away", []).append(point.name)
    if problems:
        raise ConfigError("\n".join(f"{line} ({names[0]}" + (f" and {len(names) - 1} more points)" if len(names) > 1 else ")")
                                    for line, names in problems.items()))
    return grid


@dataclass
class ComputePlan:
    """What a sweep costs on GPUs before anything is submitted, from the planner's FLOPs per token."""

    runs: int
    tokens: int  # summed over the runs
    flops: float  # summed over the runs: each run's tokens x its model's training FLOPs per token
    peak_tflops: float
    mfu: float  # assumed

    @property
    def gpu_hours(self) -> float:
        return self.flops / (self.peak_tflops * 1e12 * self.mfu) / 3600


def compute_plan(grid: List[Point], peak_tflops: float, mfu: float) -> ComputePlan:
    """GPU-hours = sum over runs of tokens x FLOPs per token / (peak x MFU), for a checked grid."""
    from megatron_power.ops import plan

    per_model: Dict[str, float] = {}  # FLOPs per token of each distinct model shape, counted once
    tokens = flops = 0
    for point in grid:
        config = point.config
        key = repr(config.model)
        if key not in per_model:
            vocab = config.model.vocab_size
            if vocab is None:
                raise ConfigError(f"sweep --plan needs model.vocab_size in the spec's overrides (point {point.name})")
            per_model[key] = plan.flops_per_token(config, plan.count_parameters(config, vocab))
        tokens += config.train.tokens
        flops += config.train.tokens * per_model[key]
    return ComputePlan(len(grid), tokens, flops, peak_tflops, mfu)


class Status(str, Enum):
    """Where a point's run stands, read from its run directory."""

    PENDING = "pending"
    STARTED = "started"  # interrupted: a rerun resumes it from its checkpoint
    FINISHED = "finished"
    DIVERGED = "diverged"  # stopped on non-finite losses: not retried, worse than any finite loss

    @property
    def done(self) -> bool:
        return self in (Status.FINISHED, Status.DIVERGED)


def status(run_dir: Path) -> Status:
    if (run_dir / FINISHED).is_file():
        return Status.FINISHED
    if (run_dir / DIVERGED).is_file():
        return Status.DIVERGED
    return Status.STARTED if (run_dir / "config.yaml").is_file() else Status.PENDING


class LocalRunner:
    """Runs points as `megatron-power train` processes, `jobs` at a time, each pinned to its own
    GPU where there are GPUs. SIGINT or SIGTERM asks every running point to checkpoint and stop."""

    def __init__(self, spec: SweepSpec, jobs: int, threads: int, gpus: int):
        self.spec, self.jobs, self.threads = spec, jobs, threads
        self.free_slots = list(range(jobs))
        self.lock = threading.Lock()
        self.running: Dict[int, subprocess.Popen] = {}
        self.gpus = gpus
        self.stopping = False

    def _stop(self, signum, frame):
        self.stopping = True
        with self.lock:
            for process in self.running.values():
                process.send_signal(signal.SIGTERM)  # train saves a checkpoint and exits

    def _run(self, point: Point) -> str:
        if self.stopping:
            return Status.PENDING.value
        run_dir = self.spec.dir / point.name
        run_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            slot = self.free_slots.pop()
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        env.pop("WORLD_SIZE", None), env.pop("RANK", None)
        env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus) if self.gpus else ""
        command = [sys.executable, "-m", "megatron_power.cli", "train", self.spec.recipe, *point.overrides,
                   f"out_dir={self.spec.dir}", f"name={point.name}"]
        try:
            with open(run_dir / "train.log", "a") as log:
                # Its own session: a Ctrl-C reaches the sweep, which asks the point to save and stop.
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
                with self.lock:
                    self.running[point.index] = process
                    if self.stopping:  # the stop came while this point was starting
                        process.send_signal(signal.SIGTERM)
                rc = process.wait()
        finally:
            with self.lock:
                self.running.pop(point.index, None)
                self.free_slots.append(slot)
        if rc == NonFiniteError.exit_code:
            (run_dir / DIVERGED).write_text(json.dumps({"exit_code": rc}))
        return status(run_dir).value if rc in (0, NonFiniteError.exit_code) else \
            f"failed (exit {rc}, see {run_dir}/train.log)"

    def run(self, todo: List[Point]) -> Dict[str, str]:
        from tqdm import tqdm

        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        outcomes = {}
        try:
            with ThreadPoolExecutor(self.jobs) as pool, tqdm(total=len(todo), unit="point", desc=self.spec.name) as bar:
                for point, outcome in zip(todo, pool.map(self._run, todo)):
                    outcomes[point.name] = outcome
                    bar.update()
                    if outcome.startswith("failed"):
                        bar.write(f"{point.name}: {outcome}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return outcomes


def _last(rows: List[dict], key: str):
    for row in reversed(rows):
        if key in row:
            return row[key]
    return None


def collect(spec: SweepSpec, grid: List[Point]) -> Path:
    """results.csv: one row per point with its resolved axes and final losses."""
    out = spec.dir / "results.csv"
    rows = []
    for point in grid:
        config = point_config(spec, point, check_paths=False)
        metrics_file = config.run_dir / "metrics.jsonl"
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
        state = status(config.run_dir)
        valid = _last(metrics, "valid_loss") if state == Status.FINISHED else None
        rows.append({
            "point": point.name, "status": state.value,
            "tokens": config.train.tokens, "batch": config.train.global_batch_size, "lr": config.schedule.lr_max,
            "width": config.model.hidden_size, "mup": config.mup.enabled, "seq_length": config.model.seq_length,
            "depth": config.model.num_layers, "depth_alpha": config.mup.depth_alpha,
            "kind": config.schedule.kind, "seed": config.train.seed, "experts": config.model.num_experts or "",
            "reference_seq_length": config.schedule.reference_seq_length,
            **{f"grid.{k}": v for k, v in point.values.items()},
            "valid_loss": math.inf if state == Status.DIVERGED else valid,
            "train_loss": _last(metrics, "loss"), "b_simple": _last(metrics, "b_simple"),
            "steps": _last(metrics, "step"),
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # points of several grids differ in grid.*
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    return out


def run_local(spec: SweepSpec, grid: List[Point], cpu_only: bool = False) -> Dict[str, str]:
    import torch

    gpus = 0 if cpu_only or not torch.cuda.is_available() else torch.cuda.device_count()
    jobs = spec.jobs or gpus or max(1, (os.cpu_count() or 1) // spec.threads)
    todo = [p for p in grid if not status(spec.dir / p.name).done]
    print(f"sweep {spec.name}: {len(grid)} points, {len(grid) - len(todo)} done, {len(todo)} to run, "
          f"{jobs} at a time ({spec.threads} thread(s) each{f', {gpus} GPU(s)' if gpus else ''}); runs in {spec.dir}")
    return LocalRunner(spec, jobs, spec.threads, gpus).run(todo)


def array_indices(indices: List[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (SLURM's --array syntax)."""
    runs: List[List[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def write_points_file(spec: SweepSpec, grid: List[Point]) -> Path:
    """One line per point, `<name> <override> ...`: a job array's task i runs line i + 1."""
    path = spec.dir / "points.txt"
    spec.dir.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join([p.name, *p.overrides[len(spec.overrides):]]) + "\n" for p in grid))
    return path
