"""Shared helpers: the default data (built once per machine), and runs of the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# The suite runs on the CPU in fp32, where losses are compared exactly, even on a GPU host: CUDA
# is hidden from this process and every process it starts, before anything imports torch. Tests
# marked `gpu` hand the GPUs back to the processes they start (GPU_ENV).
_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
GPU_ENV = {"CUDA_VISIBLE_DEVICES": _VISIBLE}  # None: unset, every GPU visible

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _count_gpus() -> int:
    """GPUs the processes of `gpu` tests will see (asked of a process of their own)."""
    if _VISIBLE == "" or shutil.which("nvidia-smi") is None:
        return 0
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           env=environment(GPU_ENV), capture_output=True, text=True)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def environment(env_vars) -> dict:
    """This process's environment with `env_vars` added; a None value removes the variable."""
    env = {**os.environ, **(env_vars or {})}
    return {k: v for k, v in env.items() if v is not None}


GPUS = _count_gpus()

# A proxy small enough for 2 CPU cores; the same architecture as recipes/proxy.yaml.
SEQ, BATCH = 128, 16
TOKENS_PER_STEP = SEQ * BATCH
SMALL = [
    "model.hidden_size=128", "model.ffn_hidden_size=384", "model.num_layers=4",
    f"model.seq_length={SEQ}", f"train.global_batch_size={BATCH}", "train.micro_batch_size=8",
    "train.log_interval=5", "train.eval_interval=1000", "checkpoint.interval=1000",
]


@pytest.fixture(scope="session")
def default_data():
    """The default corpus, built by the project's own `data` verb (reused when complete)."""
    subprocess.run([str(BIN / "megatron-power"), "data"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return ROOT / "data" / "stdlib"


def run_train(out_dir: Path, name: str, overrides, nproc: int = 1, check: bool = True,
              recipe: str = "proxy", flags=(), env_vars=None, cwd: Path = ROOT, **popen) -> subprocess.CompletedProcess:
    """`megatron-power train RECIPE ...` (under torchrun when nproc > 1), run from `cwd` (the
    repository by default), with `env_vars` added to the environment (None removes one)."""
    if nproc == 1:
        cmd = [str(BIN / "megatron-power")]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "megatron_power.cli"]
    cmd += ["train", recipe, *flags, f"out_dir={out_dir}", f"name={name}", *overrides]
    env = environment({"OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                        **(env_vars or {})})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def truncate(path: Path) -> None:
    """Cut a file to half its length, as an interrupted copy or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def metrics(run_dir: Path):
    """(train losses by step, validation losses by step) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    valid = {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r}
    return train, valid


# A sweep point small enough to run in seconds (seq 64, width 64, 2 layers).
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=1", "model.ffn_hidden_size=128",
        "model.seq_length=64", "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_interval=1000",
        "train.noise_scale_interval=2", "schedule.kind=wsd", "schedule.warmup=0.1", "schedule.decay=0.1",
        "checkpoint.interval=4", "train.tokens=16K"]


def write_spec(path: Path, out_dir: Path, grid: dict, name: str = "grid") -> Path:
    """A sweep spec of TINY points over `grid`, two points at a time."""
    lines = [f"name: {name}", "recipe: proxy", f"out_dir: {out_dir}", "jobs: 2", "eval_sequences: 32", "overrides:"]
    lines += [f"  - {o}" for o in TINY] + ["grid:"] + [f"  {k}: {v}" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
