"""What the tests share: the repository, the CLI run as a user runs it, the small proxy every
end-to-end test trains, and readers of a run's metrics.jsonl. (conftest.py hides CUDA from the suite
before anything imports torch, and builds the default data once.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Real text for the data and tokenizer tests (source and licence: tests/data/README.md).
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"
BIN = Path(sys.executable).parent


def environment(env_vars) -> dict:
    """This process's environment with `env_vars` added; a None value removes the variable."""
    env = {**os.environ, **(env_vars or {})}
    return {k: v for k, v in env.items() if v is not None}


def command(*args, nproc: int = 1) -> list:
    """`megatron-power ARGS`, under torchrun when nproc > 1."""
    if nproc == 1:
        return [str(BIN / "megatron-power"), *map(str, args)]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "megatron_power.cli",
            *map(str, args)]


def megatron_power(*args, nproc: int = 1, check: bool = True, env_vars=None, cwd: Path = ROOT,
                   **popen) -> subprocess.CompletedProcess:
    """Run the CLI as a user does, from `cwd` (the repository by default), with `env_vars` added to
    the environment (None removes one); output captured as text."""
    env = environment({"OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                       **(env_vars or {})})
    cmd = command(*args, nproc=nproc)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


# A proxy small enough for 2 CPU cores; the same architecture as recipes/proxy.yaml.
SEQ, BATCH = 128, 16
TOKENS_PER_STEP = SEQ * BATCH
SMALL = [
    "model.hidden_size=128", "model.ffn_hidden_size=384", "model.num_layers=4",
    f"model.seq_length={SEQ}", f"train.global_batch_size={BATCH}", "train.micro_batch_size=8",
    "train.log_interval=5", "train.eval_interval=1000", "checkpoint.interval=1000",
]


def run_train(out_dir: Path, name: str, overrides, nproc: int = 1, check: bool = True,
              recipe: str = "proxy", flags=(), env_vars=None, cwd: Path = ROOT, **popen) -> subprocess.CompletedProcess:
    """`megatron-power train RECIPE ...` into OUT_DIR/NAME."""
    return megatron_power("train", recipe, *flags, f"out_dir={out_dir}", f"name={name}", *overrides, nproc=nproc,
                          check=check, env_vars=env_vars, cwd=cwd, **popen)


def signal_after(cmd, log_dir, steps, sig=signal.SIGKILL) -> str:
    """Start `cmd`, send its whole process group `sig` once LOG_DIR/metrics.jsonl holds `steps`
    steps, and wait for it to end; its output (stdout and stderr)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (log_dir / "metrics.jsonl").is_file() and len(records(log_dir, "loss")) >= steps:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be signalled"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=300)
        out.seek(0)
        return out.read()


def records(run_dir: Path, key: str) -> list:
    """The lines of a run's metrics.jsonl that hold `key` ("loss": a step; "trace": a noise-scale
    measurement; "valid_loss": an evaluation), in order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if key in row]


def metrics(run_dir: Path):
    """(train losses by step, validation losses by step) from a run's metrics.jsonl."""
    return ({r["step"]: r["loss"] for r in records(run_dir, "loss")},
            {r["step"]: r["valid_loss"] for r in records(run_dir, "valid_loss")})


def truncate(path: Path) -> None:
    """Cut a file to half its length, as an interrupted copy or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


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
