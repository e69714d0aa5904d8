"""`megatron-power submit`: fill in the repository's slurm/train.sbatch for a recipe, check it, call sbatch.

Everything is checked before sbatch runs: the recipe with its overrides validated for a world of
nodes x processes per node (parallel sizes must divide it), the planner's memory per GPU against
the GPUs' memory (for recipes that name their vocabulary), the SLURM options' formats, and that
sbatch exists. The rendered script is kept in the log directory beside the job's output.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_power.config import load_config
from megatron_power.errors import ConfigError
from megatron_power.writable import unwritable

ROOT = Path(__file__).resolve().parents[2]  # the repository: recipes, runs, logs
# A link to slurm/train.sbatch, so that the script reaches an installed package too.
TEMPLATE = Path(__file__).with_name("train.sbatch")
# SLURM's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
TIME_FORMAT = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
# --array: indices and ranges (a range with a step), comma-separated, then at most %K running at once
_ARRAY_RANGE = r"\d+(-\d+(:\d+)?)?"
ARRAY_FORMAT = re.compile(rf"{_ARRAY_RANGE}(,{_ARRAY_RANGE})*(%\d+)?")
MAX_SIGNAL_LEAD = 65535  # seconds: sbatch refuses a longer --signal time


@dataclass
class Submission:
    recipe: str
    overrides: List[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8  # processes per node: one per GPU (per CPU slot with cpu=True)
    cpu: bool = False  # a CPU partition: no GPUs requested
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    container: Optional[str] = None
    container_mounts: Optional[str] = None
    signal_lead: int = 180  # seconds before the time limit: room to save a checkpoint
    job_name: Optional[str] = None
    array: Optional[str] = None
    log_dir: Path = ROOT / "logs"
    points_file: Optional[Path] = None  # a sweep's point list (sweep.write_points_file), one per array task
    gpu_memory: float = 80.0  # GiB per GPU, for the planner's check


def time_limit_seconds(text: str) -> int:
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    return {1: lambda m: m * 60, 2: lambda m, s: m * 60 + s, 3: lambda h, m, s: h * 3600 + m * 60 + s}[len(parts)](*parts)


def check(s: Submission) -> List[str]:
    """Every problem with a submission, one line each (the recipe's own lines included)."""
    errors = []
    if s.nodes < 1:
        errors.append(f"NODES must be at least 1, got {s.nodes}")
    if s.gpus_per_node < 1:
        errors.append(f"GPUS_PER_NODE must be at least 1, got {s.gpus_per_node}")
    if not s.gpu_memory > 0:
        errors.append(f"GPU_MEMORY must be positive (GiB per GPU), got {s.gpu_memory:g}")
    if s.cpus_per_task is not None and s.cpus_per_task < 1:
        errors.append(f"--cpus-per-task must be at least 1, got {s.cpus_per_task}")
    if not 1 <= s.signal_lead <= MAX_SIGNAL_LEAD:
        errors.append(f"SIGNAL_LEAD must be 1 to {MAX_SIGNAL_LEAD} seconds (SLURM's range for --signal), "
                      f"got {s.signal_lead}")
    if s.array is not None and not ARRAY_FORMAT.fullmatch(s.array):
        errors.append(f"--array '{s.array}' is not a SLURM job array (expected indices such as 0-15, 1,3,5, "
                      f"0-15:2 or 0-15%4)")
    if s.time is not None and not TIME_FORMAT.fullmatch(s.time):
        errors.append(f"TIME '{s.time}' is not a SLURM time limit (expected minutes, HH:MM:SS or D-HH:MM:SS)")
    elif s.time is not None and time_limit_seconds(s.time) <= s.signal_lead:
        errors.append(f"TIME {s.time} leaves no room: the checkpoint signal comes {s.signal_lead} s before the limit")
    if s.container is not None and not s.container.strip():
        errors.append("CONTAINER is empty (expected an image for pyxis, e.g. nvcr.io#nvidia/pytorch:26.06-py3)")
    if s.container_mounts and not s.container:
        errors.append("CONTAINER_MOUNTS given without CONTAINER (mounts belong to a container image)")
    problem = unwritable(s.log_dir)
    if problem:
        errors.append(f"--log-dir {s.log_dir} (where the job's script and output go) cannot be written: {problem}")
    errors += [f"override '{o}' holds whitespace, which the SLURM script splits overrides on (write lists "
               f"without spaces, e.g. [1,2])" for o in s.overrides if len(o.split()) != 1]
    if errors:
        return errors
    world = s.nodes * s.gpus_per_node
    try:
        config = load_config(s.recipe, s.overrides, world_size=world)
    except ConfigError as e:
        return errors + [f"{line} (world size {s.nodes} nodes x {s.gpus_per_node} = {world})"
                         for line in str(e).splitlines()]
    if not s.cpu and config.model.vocab_size is not None:
        from megatron_power.ops import plan

        problem = plan.fit_problem(config, config.model.vocab_size, world, s.gpu_memory)
        if problem:
            errors.append(f"{problem} (or --gpu-memory / GPU_MEMORY for larger GPUs)")
    return errors


def named(s: Submission) -> bool:
    """Whether the run folder is the one the overrides name (else it is named after the job, and
    each task of an array after its index)."""
    return not s.array and any(o.startswith("name=") for o in s.overrides)


def render(s: Submission, config, job_name: str) -> str:
    """slurm/train.sbatch with this submission's #SBATCH lines in place of its defaults, and its
    settings given their values (the environment no longer changes them)."""
    array = bool(s.array)
    sbatch = [f"--job-name={job_name}", f"--nodes={s.nodes}", f"--ntasks-per-node={s.gpus_per_node}"]
    if not s.cpu:
        sbatch += [f"--gpus-per-node={s.gpus_per_node}", "--exclusive"]
    sbatch.append(f"--cpus-per-task={s.cpus_per_task or (1 if s.cpu else 8)}")
    sbatch += [f"--{key}={value}" for key, value in
               (("time", s.time), ("partition", s.partition), ("account", s.account), ("array", s.array)) if value]
    sbatch += [f"--output={s.log_dir}/%x-{'%A_%a' if array else '%j'}.out", "--open-mode=append",
               f"--signal=B:USR1@{s.signal_lead}", "--requeue"]
    # name and out_dir are the script's settings: a named run is that folder, which a later job given
    # the same name resumes (after a crash, a rewind, for a larger budget); else a new run per job.
    overrides = [o for o in s.overrides if not o.startswith(("name=", "out_dir="))]
    settings = {
        "RECIPE": s.recipe, "OVERRIDES": " ".join(overrides), "OUT_DIR": str(Path(config.out_dir).absolute()),
        "RUN": config.name, "RUN_NAME": config.name if named(s) else "",
        "POINTS_FILE": str(s.points_file.absolute()) if s.points_file else "",
        "WORKDIR": str(ROOT), "PYTHON": "python" if s.container else sys.executable,  # this command's environment
        "CONTAINER": s.container or "", "CONTAINER_MOUNTS": s.container_mounts or "",
    }
    lines, header_done, in_settings = [], False, False
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("#SBATCH"):
            if not header_done:
                lines += [_sbatch_line(option) for option in sbatch]
                header_done = True
            continue
        if line.startswith("# --- "):  # the settings block's first and last lines
            in_settings = line.startswith("# --- settings")
        key = line.split("=", 1)[0]
        if in_settings and key in settings and line.startswith(f"{key}=${{{key}:-"):
            value = f"{key}={shlex.quote(settings[key])}"
            comment = line.find("  #")
            line = value if comment < 0 else f"{value:<40} {line[comment:].lstrip()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _sbatch_line(option: str) -> str:
    """The #SBATCH line of `--key=value`: sbatch splits the line into words as a shell would, so a
    value with whitespace in it (a log folder, a job name) is double-quoted."""
    key, _, value = option.partition("=")
    return f'#SBATCH {key}="{value}"' if any(c.isspace() for c in value) else f"#SBATCH {option}"


def submit(s: Submission, dry_run: bool = False) -> int:
    errors = check(s)
    if not dry_run and not shutil.which("sbatch"):
        errors.append("sbatch is not on PATH (submit from a SLURM login node, or use DRY_RUN=1 to print the script)")
    if errors:
        raise ConfigError("\n".join(errors))
    config = load_config(s.recipe, s.overrides, world_size=s.nodes * s.gpus_per_node)
    job_name = s.job_name or config.name
    script = render(s, config, job_name)
    if dry_run:
        print(script, end="")
        return 0
    s.log_dir.mkdir(parents=True, exist_ok=True)
    path = s.log_dir / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: sbatch refused {path}: {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    runs = (f"runs under {config.out_dir}" if s.points_file else
            f"run {config.out_dir}/{config.name}{'' if named(s) else f'-{job_id}'}")
    print(f"submitted job {job_id}: script {path}, output {s.log_dir}/{job_name}-{job_id}{'_*' if s.array else ''}.out, {runs}")
    return 0
