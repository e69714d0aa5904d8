"""Conversion to Hugging Face against copying the same bytes on the same disk.

A randomly initialised checkpoint of dense3b's shape (all 40 layers, or fewer with --layers on a
small machine; every tensor keeps its full size) is converted with `convert to-hf --dtype bf16`.
Printed: wall time against `cp -r` of the checkpoint (both followed by sync, both with the
checkpoint in the page cache; best of --repeats runs, alternating), and the converter's peak
resident memory against the checkpoint's size.

usage: python bench/convert.py [--layers 40] [--repeats 3] [--workdir bench/convert-work]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def make_checkpoint(layers: int, root: Path) -> None:
    from megatron_power.config import load_config, to_yaml
    from megatron_power.training import checkpoint, runtime
    from megatron_power.training.model import build_model

    config = load_config("dense3b", [f"model.num_layers={layers}", "parallel.tp=1", "parallel.pp=1",
                                     "parallel.distributed_optimizer=false", "precision.recompute=none"],
                         world_size=1, check_paths=False)
    runtime.initialize(config)
    model = build_model(config, config.model.vocab_size, initialize=False)  # Megatron's own random init
    checkpoint.save(root, 0, model, None, {"config": to_yaml(config)}, keep=1)
    runtime.shutdown()


def timed(cmd) -> tuple:
    """(wall seconds including sync, peak resident GiB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    os.sync()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def size_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "convert-work")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_checkpoint:
        return make_checkpoint(args.layers, args.make_checkpoint)

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "checkpoints"
    subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--make-checkpoint", str(ckpt)],
                   cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    source = next(ckpt.glob("iter_*"))
    size = size_gib(source)
    subprocess.run(["cat", *map(str, source.iterdir())], stdout=subprocess.DEVNULL, check=True)  # page cache
    copies, converts, peaks = [], [], []
    for _ in range(args.repeats):  # alternating, so that both see the same disk and cache weather
        seconds, _ = timed(["cp", "-r", str(source), str(work / "copy")])
        copies.append(seconds)
        shutil.rmtree(work / "copy")
        seconds, peak = timed([str(BIN / "megatron-power"), "convert", "to-hf", str(ckpt), str(work / "hf"),
                               "--dtype", "bf16"])
        converts.append(seconds)
        peaks.append(peak)
        written = size_gib(work / "hf")
        shutil.rmtree(work / "hf")
        os.sync()
    copy_s, convert_s, peak = min(copies), min(converts), max(peaks)
    print(f"dense3b shape, {args.layers} layers: checkpoint {size:.2f} GiB (fp32), written {written:.2f} GiB (bf16)")
    print(f"copy {' '.join(f'{s:.1f}' for s in copies)} s, convert {' '.join(f'{s:.1f}' for s in converts)} s")
    print(f"best of {args.repeats}: copy {copy_s:.1f} s, convert {convert_s:.1f} s: "
          f"time ratio {convert_s / copy_s:.2f} (target < 2)")
    print(f"convert peak resident memory {peak:.2f} GiB: {peak / size:.2f} x the checkpoint (target < 1.5)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
