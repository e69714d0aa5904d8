"""Training tokens/s and MFU of `dense3b` and `moe3b` on one GPU, in bf16 and in FP8.

Each recipe runs through `megatron-power train` as it is, except for what one GPU forces: every
parallel size 1, `--accumulation` micro-batches per step instead of 1024 sequences, and the depth
cut to the most layers the planner says fit in the GPU's memory (`plan.memory_per_gpu`, with the
recipe's micro-batch and recompute; `--layers` sets it by hand). Tokens/s is taken over the steps
after `--warmup`. FLOPs per token are the planner's, counted on the model built on the meta device (what `megatron-power plan`
prints), and MFU is against the GPU's dense bf16 peak for FP8 runs too, as Megatron-LM reports it,
so that the two precisions compare. FP8 needs Transformer Engine; without it the FP8 rows are
skipped rather than measured as bf16.

Reference: Megatron-Core's published 41% MFU for a 1.7B model in bf16 on H100.

    .venv/bin/python bench/gpu_mfu.py [--recipes dense3b moe3b] [--precisions bf16 fp8]
                                      [--steps 30] [--warmup 10] [--accumulation 16] [--layers N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_power import plan  # noqa: E402
from megatron_power.config import load_config  # noqa: E402

# Dense bf16 tensor-core peak, FLOP/s (SXM parts; H200 has H100's compute).
BF16_PEAK = {"H100": 989e12, "H200": 989e12}
ONE_GPU = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.sequence_parallel=false"]
PRECISION = {"bf16": ["precision.fp8=null"], "fp8": []}  # the 3B recipes name their FP8 setting


def bf16_peak(override_tflops: float) -> float:
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name()
    for model, peak in BF16_PEAK.items():
        if model in name:
            return peak
    sys.exit(f"unknown GPU '{name}': give its dense bf16 peak with --peak-tflops")


def fitting_depth(recipe: str, overrides: list, capacity_gib: float) -> int:
    """The most layers whose planned memory stays under 90% of one GPU, as `plan` judges a fit."""
    config = load_config(recipe, overrides, 1, check_paths=False)
    full = plan.count_parameters(config, config.model.vocab_size)
    layers = config.model.num_layers
    for depth in range(layers, 0, -1):
        expert, dense = full.expert * depth // layers, full.dense_layers * depth // layers
        counts = replace(full, expert=expert, dense_layers=dense, total=full.embedding + full.output + expert + dense)
        shallow = replace(config, model=replace(config.model, num_layers=depth))
        if plan.memory_per_gpu(shallow, counts, 1).total / plan.GIB <= 0.9 * capacity_gib:
            return depth
    sys.exit(f"{recipe}: not even one layer fits in {capacity_gib:.0f} GiB by the planner")


def measure(recipe: str, overrides: list, steps: int, warmup: int) -> float:
    """Tokens/s of `megatron-power train` over its steps after the warm-up."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).parent / "megatron-power"), "train", recipe, f"out_dir={out}", "name=bench",
               *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True)
        rows = [json.loads(line) for line in (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    start, end = rows[warmup - 1], rows[-1]
    return (end["tokens"] - start["tokens"]) / (end["time"] - start["time"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["dense3b", "moe3b"])
    p.add_argument("--precisions", nargs="+", choices=sorted(PRECISION), default=["bf16", "fp8"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--accumulation", type=int, default=16, help="micro-batches per step")
    p.add_argument("--layers", type=int, default=0, help="depth to run (default: the most the planner fits)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak, if not an H100/H200")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_mfu.py measures GPU throughput and needs a CUDA GPU; none was found")
    if args.warmup >= args.steps:
        sys.exit(f"--warmup ({args.warmup}) must be less than --steps ({args.steps})")
    subprocess.run([str(Path(sys.executable).parent / "megatron-power"), "data"], cwd=ROOT, check=True)
    peak = bf16_peak(args.peak_tflops)
    capacity = torch.cuda.get_device_properties(0).total_memory / plan.GIB
    has_te = importlib.util.find_spec("transformer_engine") is not None
    rows = []
    for recipe in args.recipes:
        base = load_config(recipe, ONE_GPU, 1, check_paths=False)
        batch = base.train.micro_batch_size * args.accumulation
        common = ONE_GPU + [f"train.global_batch_size={batch}",
                            f"train.tokens={args.steps * batch * base.model.seq_length}",
                            "train.eval_interval=1000000", "train.eval_batches=1", "checkpoint.save=false"]
        depth = args.layers or fitting_depth(recipe, common, capacity)
        common.append(f"model.num_layers={depth}")
        config = load_config(recipe, common, 1, check_paths=False)
        flops = plan.flops_per_token(config, plan.count_parameters(config, config.model.vocab_size))
        for precision in args.precisions:
            if precision == "fp8" and not has_te:
                print(f"{recipe} fp8: skipped, Transformer Engine is not installed")
                continue
            tokens_per_s = measure(recipe, common + PRECISION[precision], args.steps, args.warmup)
            rows.append({"recipe": recipe, "layers": f"{depth}/{base.model.num_layers}", "precision": precision,
                         "tokens_per_s": round(tokens_per_s), "tflops": round(tokens_per_s * flops / 1e12, 1),
                         "mfu": round(tokens_per_s * flops / peak, 3)})
    print(f"\n{torch.cuda.get_device_name()}, bf16 peak {peak / 1e12:.0f} TFLOP/s; "
          f"reference: Megatron-Core 41% MFU (1.7B, bf16, H100)")
    print(f"{'recipe':<9} {'layers':<7} {'precision':<9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['recipe']:<9} {r['layers']:<7} {r['precision']:<9} {r['tokens_per_s']:>10,} {r['tflops']:>8} "
              f"{r['mfu']:>6.1%}")


if __name__ == "__main__":
    main()
