"""Training tokens/s and MFU of `dense3b` and `moe3b` on one GPU, in bf16 and in FP8 (moe3b also
in FP8 with its experts' GEMMs in bf16, precision.fp8_experts).

Each recipe runs through `megatron-power train` as it is, except for what one GPU forces: every
parallel size 1, `--accumulation` micro-batches per step instead of 1024 sequences, and the depth
cut to the most layers the planner says fit in the GPU's memory (`plan.memory_per_gpu`, with the
recipe's micro-batch and recompute; `--layers` sets it by hand). Tokens/s is taken over the steps
after `--warmup`; start-up is the run's own count of its seconds before the first step.

On one GPU every expert of an MoE recipe is local, so each expert's grouped-GEMM rows per
micro-batch are seq x micro-batch x top-k / experts, an EP-th of what the recipe's own layout gives
it (there each rank's experts receive the tokens of all EP ranks), and the host launches the work
of all experts for one rank's tokens. `--micro-batch-size` sets the micro-batch (the recipe's by
default); each row states its micro-batch and, for MoE, the rows per expert.

FLOPs per token are the planner's, counted on the model built on the meta device (what `megatron-power
plan` prints), with causal attention counted as half, as Megatron-LM does. MFU is against the exact
device's dense bf16 peak (hardware.BF16_PEAK_TFLOPS), for FP8 runs too, as Megatron-LM reports it,
so that the two precisions compare. FP8 needs Transformer Engine; without it the FP8 rows are
skipped rather than measured as bf16. Peak memory (the training process's max_memory_allocated) is
set beside the planner's estimate for the same layout.
With --profile DIR each run goes on past its timed steps: --profiled-steps profiled steps, one whose
host synchronisations are counted, and a last one, which also evaluates (profile.start_step,
training/probes/profile.py); each run's summary is copied to DIR/<recipe>-<precision>.md and .json.
With --cuda-graphs each run goes on past its eager timed steps: each layer's static part is
captured in CUDA graphs (precision.cuda_graphs, training/cuda_graphs.py) before the next step, which
is not timed, and the same number of steps after it are timed again, as a second row ("bf16, CUDA
graphs") measured in the same process, so that a run's start-up is paid once for both (a capture
that fails, e.g. out of memory, fails its row and leaves the eager one); a profile then comes from
graphed steps.

Reference: Megatron-Core's published 41% MFU for a 1.7B model in bf16 on H100.

    .venv/bin/python bench/gpu_mfu.py [--recipes dense3b moe3b] [--precisions bf16 fp8 fp8-bf16-experts]
                                      [--steps 30] [--warmup 10] [--accumulation 16] [--layers N]
                                      [--micro-batch-size N] [--json table.json] [--profile DIR]
                                      [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_power.config import load_config  # noqa: E402
from megatron_power.ops import plan  # noqa: E402
from megatron_power.training import hardware  # noqa: E402

ONE_GPU = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.sequence_parallel=false"]
# The 3B recipes name their FP8 setting; the third keeps an MoE recipe's experts in bf16 inside it.
PRECISION = {"bf16": ["precision.fp8=null"], "fp8": [], "fp8-bf16-experts": ["precision.fp8_experts=bf16"]}


def bf16_peak(gpu_name: str, override_tflops: float) -> float:
    tflops = override_tflops or hardware.bf16_peak_tflops(gpu_name)
    if not tflops:
        sys.exit(f"unknown GPU '{gpu_name}': give its dense bf16 peak with --peak-tflops")
    return tflops * 1e12


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


def measure(recipe: str, overrides: list, windows: list, profile_to: Path = None):
    """For each window (first step, last step) of a `megatron-power train` run, its tokens/s and the
    peak GPU memory (GiB) up to its last step, or None where the run ended before that step (its
    output above says why); the run's start-up (seconds by part); whether the run ended well.
    `profile_to`: a path stem the run's profile summary is copied to (.md, .json)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "megatron_power.cli", "train", recipe, f"out_dir={out}", "name=bench", *overrides]
        ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
        run = Path(out) / "bench"
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
        rows = [json.loads(line) for line in lines]
        if profile_to and ok:
            for suffix in (".md", ".json"):
                shutil.copy(run / "profile" / f"rank0{suffix}", profile_to.with_suffix(suffix))
    startup = next((r["startup_s"] for r in rows if "startup_s" in r), None)
    steps = [r for r in rows if "loss" in r]
    measured = []
    for first, last in windows:  # timed from the end of the step before the first
        if len(steps) < last:  # e.g. the eager steps measured, then the capture ran out of memory
            measured.append(None)
            continue
        start, end = steps[first - 2], steps[last - 1]
        measured.append(((end["tokens"] - start["tokens"]) / (end["time"] - start["time"]),
                         max(r["max_memory_gib"] for r in steps[:last])))
    return measured, startup, ok


def markdown_table(table: dict) -> list:
    """The MFU table's lines, as the report and the console show it."""
    lines = [f"Against the dense bf16 peak of {table['device']}: {table['bf16_peak_tflops']:.0f} TFLOP/s (causal "
             "attention counted as half). Reference: Megatron-Core's 41% MFU for 1.7B in bf16 on H100.", "",
             "| recipe | layers | precision | micro-batch | rows per expert | tokens/s | TFLOP/s | MFU | start-up s "
             "| peak GiB | planned GiB | peak/plan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        head = (f"| {r['recipe']} | {r['layers']} | {r['precision']} | {r.get('micro_batch', '')} | "
                f"{r.get('expert_rows', '')} |")
        if r.get("failed"):
            lines.append(f"{head} failed | | | | | {r['planned_gib']:.2f} | |")
        else:
            startup = f"{sum(r['startup_s'].values()):.0f}" if "startup_s" in r else ""
            lines.append(f"{head} {r['tokens_per_s']:,} | {r['tflops']} | {r['mfu']:.1%} | {startup} | "
                         f"{r['peak_gib']:.2f} | {r['planned_gib']:.2f} | {r['peak_vs_plan']:.2f} |")
    lines += ["", "Start-up, seconds by part:"] + [
        f"- {r['recipe']} {r['precision']}, micro-batch {r['micro_batch']}: "
        + ", ".join(f"{part} {s:.0f}" for part, s in r["startup_s"].items())
        for r in table["rows"] if "startup_s" in r]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["dense3b", "moe3b"])
    p.add_argument("--precisions", nargs="+", choices=list(PRECISION), default=list(PRECISION),
                   help="fp8-bf16-experts: FP8 with the experts' GEMMs in bf16 (MoE recipes only)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--accumulation", type=int, default=16, help="micro-batches per step")
    p.add_argument("--layers", type=int, default=0, help="depth to run (default: the most the planner fits)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="sequences per micro-batch (default: the recipe's)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak, if not an H100/H200")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--profile", type=Path, help="profile each run after its timed steps; summaries to this folder")
    p.add_argument("--profiled-steps", type=int, default=2, help="steps inside the profiler (their export grows with each)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="then time as many steps again with each layer's static part replayed from CUDA graphs")
    args = p.parse_args()
    hw = hardware.detect()
    if not hw.cuda:
        sys.exit("bench/gpu_mfu.py measures GPU throughput and needs a CUDA GPU; none was found")
    if args.warmup >= args.steps:
        sys.exit(f"--warmup ({args.warmup}) must be less than --steps ({args.steps})")
    subprocess.run([sys.executable, "-m", "megatron_power.cli", "data"], cwd=ROOT, check=True)
    peak = bf16_peak(hw.gpu_name, args.peak_tflops)
    capacity = hw.gpu_memory_gib
    windows = [(args.warmup + 1, args.steps)]
    if args.cuda_graphs:  # captured before step steps + 1, timed from the step after it
        timed = args.steps - args.warmup
        windows.append((args.steps + 2, args.steps + 1 + timed))
    run_steps = windows[-1][1]
    profiling = []
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profiling = [f"profile.start_step={run_steps + 1}", f"profile.steps={args.profiled_steps}"]
        run_steps += args.profiled_steps + 2  # the counted step, and a last one (it also evaluates) after it
    rows, failed_runs = [], 0
    table = {"device": hw.gpu_name, "bf16_peak_tflops": peak / 1e12, "rows": rows}
    for recipe in args.recipes:
        base = load_config(recipe, ONE_GPU, 1, check_paths=False)
        precisions = [p for p in args.precisions if base.model.num_experts or p != "fp8-bf16-experts"]
        micro_batch = args.micro_batch_size or base.train.micro_batch_size
        batch = micro_batch * args.accumulation
        common = ONE_GPU + [f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={batch}",
                            f"train.tokens={run_steps * batch * base.model.seq_length}",
                            "train.eval_interval=1000000", "train.eval_batches=1", "checkpoint.save=false"]
        if args.cuda_graphs:
            common += ["precision.cuda_graphs=true", f"precision.cuda_graph_warmup_steps={args.steps}"]
        # One depth for both precisions, the one that fits in FP8 (its weight copies take more),
        # so that their tokens/s compare.
        depth = args.layers or min(fitting_depth(recipe, common + PRECISION[precision], capacity)
                                   for precision in precisions)
        common.append(f"model.num_layers={depth}")
        for precision in precisions:
            if precision != "bf16" and not hw.transformer_engine:
                print(f"{recipe} {precision}: skipped, Transformer Engine is not usable here")
                continue
            config = load_config(recipe, common + PRECISION[precision], 1, check_paths=False)
            counts = plan.count_parameters(config, config.model.vocab_size)
            flops = plan.flops_per_token(config, counts)
            planned = plan.memory_per_gpu(config, counts, 1).total / plan.GIB
            m = config.model
            head = {"recipe": recipe, "layers": f"{depth}/{m.num_layers}", "micro_batch": micro_batch,
                    "planned_gib": round(planned, 2)}
            if m.num_experts:
                head["expert_rows"] = round(micro_batch * m.seq_length * m.moe_topk / m.num_experts)
            labels = [precision, f"{precision}, CUDA graphs"][:len(windows)]
            measured, startup, ok = measure(recipe, common + PRECISION[precision] + profiling, windows,
                                            args.profile / f"{recipe}-{precision}" if args.profile else None)
            failed_runs += not ok
            for window, label in zip(measured, labels):
                if window is None:
                    rows.append({**head, "precision": label, "failed": True})
                    continue
                tokens_per_s, peak_gib = window
                rows.append({**head, "precision": label, "tokens_per_s": round(tokens_per_s),
                             "tflops": round(tokens_per_s * flops / 1e12, 1),
                             "mfu": round(tokens_per_s * flops / peak, 3), "peak_gib": peak_gib,
                             "peak_vs_plan": round(peak_gib / planned, 3), "startup_s": startup})
            if args.json:  # as each row comes, so that a later failure or a time limit keeps it
                args.json.write_text(json.dumps(table, indent=1))
    print("\n" + "\n".join(markdown_table(table)))
    sys.exit(1 if failed_runs else 0)


if __name__ == "__main__":
    main()
