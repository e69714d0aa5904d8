"""`make gpu-check`: the whole GPU check in one command, written to one report folder.

On a GPU machine with the packages installed it runs, in order:
1. the machine and versions (GPU, driver, torch, CUDA, Transformer Engine, megatron-core, and the
   policy hardware.py decided);
2. the GPU tests (tests/test_gpu.py: bf16 and FP8 against fp32 on the CPU, TE layers against local
   ones, grouped-GEMM experts, checkpoints across GPU and CPU and to Hugging Face, coordinate check),
   each in a pytest process of its own under `--test-timeout`, `--test-jobs` of them side by side
   (their models are small; most of their time is the imports of the processes they start), so
   that a check cut short still has the failure text of every test that ended;
3. part `gemms` (bench/fp8_gemms.py): each GEMM of one layer of both recipes at their micro-batch
   (moe3b's experts also as one GPU of the recipe's EP layout holds them) in bf16 and each FP8
   scaling, its time on the device and the host's time to issue it;
4. the MFU benchmark (bench/gpu_mfu.py: dense3b and moe3b, bf16 and FP8, moe3b last also FP8 with
   its experts in bf16, depth cut to fit, at the recipes' micro-batch), with peak memory against the
   planner's estimate and each run's start-up;
   with part `cuda-graphs`, each run then times as many steps again with each layer's static part
   replayed from CUDA graphs (precision.cuda_graphs), a second row beside the eager one;
   part `micro-batch-1` (not run unless named): the same at one sequence per micro-batch, the
   baseline the recipes' micro-batch was chosen against;
5. the profile (part `profile`, in the same runs, after their timed steps): per recipe and
   precision, the step's time by kind of kernel, device idle time, the most expensive kernels,
   launches and host synchronisations per step with the Python lines that make them;
6. part `coordcheck` (not run unless named: the GPU tests hold the same run to its bound): the
   coordinate check on the GPU path, as a plot.

    python bench/gpu_check.py [--out runs/gpu-check] [--steps 8] [--warmup 3] [--accumulation 4]
                              [--parts tests mfu profile gemms coordcheck cuda-graphs
                                       micro-batch-1] [--test-jobs 4] [--time-limit SECONDS]

Each part's full output is kept beside report.md, which is rewritten after each part; a part that
fails is reported and the rest run. `--time-limit` bounds the whole check (a lent GPU's minutes are
counted): what is running then is stopped with its processes, what has not started is not, and the
report keeps what ended, the MFU rows measured so far included.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_mfu import markdown_table  # noqa: E402

from megatron_power.training import hardware  # noqa: E402

PARTS = ("tests", "mfu", "profile", "gemms", "coordcheck", "cuda-graphs", "micro-batch-1")
DEFAULT_PARTS = ("tests", "mfu", "profile", "gemms", "cuda-graphs")
GPU_TESTS = "tests/test_gpu.py"
RESULT = {0: "ok", 124: "stopped at its time limit"}  # by exit code; any other is a failure


def run(name: str, cmd: list, out: Path, limit: float = None, jobs: int = 1, deadline: float = None) -> dict:
    """Run one part: a command, or a list of them `jobs` at a time, each within `limit` seconds and
    none past `deadline` (a time.time(); one not started by then is not started); how it went and
    how long it took. A single command's output goes to OUT/NAME.log as it comes; a list's to
    OUT/NAME/<k>.log each, and OUT/NAME.log holds those of the commands that have ended, in the
    list's order, rewritten as each ends (so that a check cut short keeps them)."""
    start = time.time()
    commands = cmd if isinstance(cmd[0], list) else [cmd]
    if len(commands) == 1:
        logs = [out / f"{name}.log"]
    else:
        (out / name).mkdir(exist_ok=True)
        logs = [out / name / f"{k}.log" for k in range(len(commands))]
    codes = [None] * len(commands)
    with ThreadPoolExecutor(jobs) as pool:
        running = {pool.submit(run_command, one, log, limit, deadline): k for k, (one, log) in enumerate(zip(commands, logs))}
        for done in as_completed(running):
            codes[running[done]] = done.result()
            if len(commands) > 1:
                ended = [log.read_text() for log, code in zip(logs, codes) if code is not None]
                (out / f"{name}.log").write_text("".join(ended))
    code = next((c for c in codes if c), 0)
    seconds = time.time() - start
    print(f"{name}: {RESULT.get(code, f'FAILED ({code})')} in {seconds:.0f} s -> {out / (name + '.log')}", flush=True)
    return {"part": name, "exit_code": code, "seconds": round(seconds, 1)}


def run_command(cmd: list, log_path: Path, limit: float = None, deadline: float = None) -> int:
    """`cmd`'s exit code (124 when stopped after `limit` seconds or at `deadline`, or not started
    because `deadline` had passed), its output in LOG_PATH."""
    if deadline is not None:
        limit = min(limit or math.inf, deadline - time.time())
    what = cmd[-1] if str(cmd[-1]).startswith(GPU_TESTS) else "this part"  # a GPU test's line, as pytest names it
    with open(log_path, "w") as log:
        if limit is not None and limit <= 0:
            log.write(f"{what} TIMEOUT: not started, the check's --time-limit had passed\n")
            return 124
        # A session of its own, so that a command over its limit goes with the training processes
        # it started (they hold the GPU).
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log.write(f"\n{what} TIMEOUT after {limit:.0f} s\n")
            return 124


def gpu_test_commands(scratch: Path) -> list:
    """One pytest command per GPU test, without xdist (its workers lost the GPU on the first lent
    machine), each with its own temporary folder under SCRATCH so that they can run side by side."""
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", GPU_TESTS]
    listed = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    tests = [test for test in listed if test.startswith(GPU_TESTS + "::")]
    if not tests:  # the collection again, so that the part fails with pytest's reason in its log
        return [collect]
    return [[sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-v", "-rA",
             "--basetemp", str(scratch / str(k)), test] for k, test in enumerate(tests)]


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("torch", "megatron-core", "transformer-engine", "transformer-engine-cu13", "transformer_engine_torch"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    import torch

    found["cuda"] = torch.version.cuda
    try:  # a second cuDNN loaded first (one Transformer Engine found) makes torch refuse its own
        found["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except RuntimeError as error:
        found["cudnn"] = str(error).split(".")[0]
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    p.add_argument("--test-timeout", type=int, default=150, help="seconds for each GPU test")
    p.add_argument("--test-jobs", type=int, default=4, help="GPU tests run side by side (their models are small)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds for the whole check (0: none); what runs then is stopped, what has not started is "
                        "not, and the report keeps what ended (the MFU rows measured so far included)")
    args = p.parse_args()
    hw = hardware.detect()
    if not hw.cuda:
        sys.exit("make gpu-check needs a CUDA GPU; none was found")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    machine = {"policy": hw.describe(), "gpu": hw.gpu_name, "gpu_memory_gib": round(hw.gpu_memory_gib, 1),
               "bf16_peak_tflops": hardware.bf16_peak_tflops(hw.gpu_name), **versions()}
    if shutil.which("nvidia-smi"):
        machine["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    (out / "machine.json").write_text(json.dumps(machine, indent=1))
    print(json.dumps(machine, indent=1), flush=True)

    mfu = [sys.executable, "bench/gpu_mfu.py", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--accumulation", str(args.accumulation)]
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    commands = {
        "tests": gpu_test_commands(scratch) if "tests" in args.parts else [],
        # Before the MFU runs: short and bounded, where the MFU part's last run is the one a time limit cuts.
        "gemms": [sys.executable, "bench/fp8_gemms.py", "--repeats", "10"],
        "mfu": mfu + ["--json", str(out / "mfu.json")]
        + (["--profile", str(out / "profile"), "--profiled-steps", "1"] if "profile" in args.parts else [])
        + (["--cuda-graphs"] if "cuda-graphs" in args.parts else []),
        "coordcheck": [sys.executable, "-m", "megatron_power.cli", "coordcheck", "proxy", "--widths",
                       "128,256,512,1024", "--steps", "7", "--out", str(out / "coordcheck"),
                       "model.num_layers=2", "model.seq_length=128", "train.global_batch_size=8",
                       "train.micro_batch_size=8", "schedule.lr_max=0.02", f"out_dir={out}"],
        "micro-batch-1": mfu + ["--micro-batch-size", "1", "--json", str(out / "micro-batch-1.json")],
    }
    # The profile and the graphed rows come from the MFU runs: one run per recipe and precision.
    names = [name for name in commands
             if name in args.parts or (name == "mfu" and {"profile", "cuda-graphs"} & set(args.parts))]
    # The default data, built once before tests that would each build it side by side.
    subprocess.run([sys.executable, "-m", "megatron_power.cli", "data"], cwd=ROOT, check=True)
    deadline = start + args.time_limit if args.time_limit else None
    parts = []
    for name in names:  # the report after each part, so that a check cut short keeps what it found
        limit, jobs = (args.test_timeout, args.test_jobs) if name == "tests" else (None, 1)
        parts.append(run(name, commands[name], out, limit, jobs, deadline))
        write_report(out, machine, parts, time.time() - start)
    shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(0 if all(part["exit_code"] == 0 for part in parts) else 1)


def write_report(out: Path, machine: dict, parts: list, seconds: float) -> None:
    lines = ["# GPU check", "", f"{machine['policy']}", "",
             "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in machine.items() if k != "policy"]
    lines += ["", f"Total {seconds / 60:.1f} min.", "", "| part | result | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {RESULT.get(p['exit_code'], 'FAILED')} | {p['seconds']} |" for p in parts]
    tests_log = (out / "tests.log").read_text() if (out / "tests.log").is_file() else ""
    summary = [line for line in tests_log.splitlines() if line.startswith(GPU_TESTS + "::")
               and any(word in line for word in (" PASSED", " FAILED", " SKIPPED", " ERROR", " TIMEOUT"))]
    lines += ["", "## Tests", ""] + [f"    {line}" for line in summary]
    tables = [json.loads((out / name).read_text()) for name in ("mfu.json", "micro-batch-1.json")
              if (out / name).is_file()]
    if tables:
        rows = [row for table in tables for row in table["rows"]]
        lines += ["", "## MFU", ""] + markdown_table({**tables[0], "rows": rows})
    profiles = sorted((out / "profile").glob("*.md")) if (out / "profile").is_dir() else []
    if profiles:
        lines += ["", "## Profile", ""] + [p.read_text().replace("### steps", f"### {p.stem}: steps", 1) for p in profiles]
    gemms = out / "gemms.log"
    if gemms.is_file():
        lines += ["", "## GEMMs, bf16 and FP8 (ms, forward + backward)", ""] + [
            line for line in gemms.read_text().splitlines() if line.startswith(("|", "ceiling", "failed"))]
    coord = out / "coordcheck.log"
    if coord.is_file():
        lines += ["", "## Coordinate check (GPU)", ""] + [f"    {line}" for line in coord.read_text().splitlines()
                                                          if line.startswith(("slope", "   "))]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
