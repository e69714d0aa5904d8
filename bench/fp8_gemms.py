"""Do the 3B recipes' GEMM shapes gain from FP8? Each linear layer of one transformer layer of
`dense3b` and `moe3b` at the recipe's micro-batch, forward and backward, timed through Transformer
Engine in bf16 and under each FP8 scaling recipe that fits an H100: tensorwise current scaling (the
recipes' setting), delayed scaling, and blockwise scaling (1x128 / 128x128 blocks, DeepSeek-V3's),
side by side. The shapes come from the recipes themselves.

An MoE layer's experts are timed twice, with the same rows in all: as one GPU holds them in the MFU
benchmark (every expert local, each getting tokens x top-k / experts rows), and as one GPU of the
recipe's own layout holds them (experts / EP local ones, each getting EP times more rows, the
tokens of every EP rank). FP8's cost per expert is mostly fixed (a scale, a cast, a launch), so
which of the two FP8 wins or loses at is what decides the recipe's precision for its experts.

Each call is timed twice: on the device, queued behind a sleep kernel that outlasts the host's
work, so the device runs it without waiting for the host (what a step gets when the host keeps
ahead); and on the host, the time to issue it (Python, TE's bookkeeping, launches), with the device
idle. A layer whose host time exceeds its device time cannot keep the device busy however its
kernels perform: that is the host's share, which CUDA graphs remove, not the GEMMs'.

FP8 weights are cast once per step and cached across its micro-batches (`is_first_microbatch`),
so the FP8 columns time a later micro-batch; "current, cast" times the first one. A ratio is bf16
device time over FP8 device time: above 1, FP8 is faster for that GEMM. Each GEMM stands alone here:
in the model the norm before qkv and fc1 fuses the input's cast (LayerNormLinear), which this
leaves out. The last rows are a layer's linear layers together, and a large square GEMM as the
device's ceiling in each precision.

    python bench/fp8_gemms.py [--recipes dense3b moe3b] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_power.config import load_config  # noqa: E402

# An upper bound on the GPU's clock (H100/H200 boost at 1.98 GHz): a sleep of n cycles lasts at
# least n / SLEEP_HZ seconds.
SLEEP_HZ = 2.0e9
NODE_GPUS = 8  # the recipes' layouts are set for nodes of 8 H100s
COLUMNS = ("bf16", "FP8 current", "FP8 delayed", "FP8 blockwise")


@dataclass(frozen=True)
class Gemm:
    name: str
    fan_in: int
    fan_out: int
    rows: int  # of the input; per expert for a grouped GEMM
    experts: int = 0  # a grouped GEMM over this many experts; 0 for a plain one


def layer_gemms(recipe: str) -> dict:
    """The GEMMs of one layer of `recipe` at its micro-batch, by layer total they add up to: the
    attention's and MLP's of a dense layer; for MoE, the attention's with the experts as one GPU
    holds all of them, and with the experts of one GPU of the recipe's expert-parallel layout."""
    config = load_config(recipe, world_size=NODE_GPUS, check_paths=False)
    m, ep = config.model, config.parallel.ep
    tokens = config.train.micro_batch_size * m.seq_length
    head = m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attention = [Gemm("qkv", m.hidden_size, (m.num_attention_heads + 2 * groups) * head, tokens),
                 Gemm("attention out", m.num_attention_heads * head, m.hidden_size, tokens)]
    if not m.num_experts:  # SwiGLU: fc1 gives the gate and the value
        return {"one layer": attention + [Gemm("mlp fc1 (SwiGLU)", m.hidden_size, 2 * m.ffn_hidden_size, tokens),
                                          Gemm("mlp fc2", m.ffn_hidden_size, m.hidden_size, tokens)]}
    width, rows = m.moe_ffn_hidden_size, tokens * m.moe_topk
    layer = {}
    for local, label in ((m.num_experts, "one layer, all experts on one GPU"),
                         (m.num_experts // ep, f"one layer, EP {ep}: {m.num_experts // ep} experts per GPU")):
        per_expert = rows // local if local == m.num_experts else rows * ep // m.num_experts
        layer[label] = attention + [
            Gemm(f"experts fc1 (SwiGLU), {local} grouped", m.hidden_size, 2 * width, per_expert, local),
            Gemm(f"experts fc2, {local} grouped", width, m.hidden_size, per_expert, local)]
    return layer


def timed(fn, repeats: int):
    """Median milliseconds of one call of fn(): (on the device, on the host)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    cycles = int(2 * max(max(host), 1e-3) * SLEEP_HZ)
    device = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # the device waits here while the host issues the whole call
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end))
    return statistics.median(device), statistics.median(host) * 1e3


def layer_times(te, recipes: dict, gemm: Gemm, repeats: int, errors: dict) -> dict:
    """(device, host) milliseconds of `gemm`'s forward + backward by column: bf16, each FP8 recipe
    with cached weights, and the first FP8 recipe casting its weights ("current, cast"). A recipe
    that fails on this GEMM has no entry; its first error line goes into `errors`."""
    if gemm.experts:
        layer = te.GroupedLinear(gemm.experts, gemm.fan_in, gemm.fan_out, bias=False, params_dtype=torch.bfloat16,
                                 device="cuda")
        # FP8 GEMMs need each expert's rows in multiples of 16: Megatron pads them up so (Fp8Padding).
        splits = [-(-gemm.rows // 16) * 16] * gemm.experts
        x = torch.randn(sum(splits), gemm.fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        call = lambda first: layer(x, splits, is_first_microbatch=first)  # noqa: E731
    else:
        layer = te.Linear(gemm.fan_in, gemm.fan_out, bias=False, params_dtype=torch.bfloat16, device="cuda")
        x = torch.randn(gemm.rows, gemm.fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        call = lambda first: layer(x, is_first_microbatch=first)  # noqa: E731
    grad = torch.randn(x.shape[0], gemm.fan_out, device="cuda", dtype=torch.bfloat16)

    def step(recipe, first):
        with te.autocast(enabled=recipe is not None, recipe=recipe):
            out = call(first)
        out.backward(grad)

    times = {"bf16": timed(lambda: step(None, None), repeats)}
    for column, recipe in recipes.items():
        try:
            step(recipe, True)  # the FP8 weights, cached for the micro-batches that follow
            times[column] = timed(lambda: step(recipe, False), repeats)  # noqa: B023
            if column == COLUMNS[1]:
                times["current, cast"] = timed(lambda: step(recipe, True), repeats)  # noqa: B023
        except Exception as error:  # one recipe TE cannot run here leaves the others' columns
            errors.setdefault(f"{column}, {gemm.name}", str(error).strip().splitlines()[0])
    return times


def markdown_row(model: str, name: str, shape: str, times: dict) -> str:
    """A row of the table: device times, bf16 over each FP8 recipe, host times; blank where absent."""
    def ms(column, which):
        return f"{times[column][which]:.3f}" if column in times else ""

    def ratio(column):
        return f"{times['bf16'][0] / times[column][0]:.2f}" if column in times else ""

    cells = ([ms(c, 0) for c in COLUMNS] + [ms("current, cast", 0)] + [ratio(c) for c in COLUMNS[1:]]
             + [ms(c, 1) for c in COLUMNS])
    return f"| {model} | {name} | {shape} | " + " | ".join(cells) + " |"


HEADER_CELLS = (["recipe", "GEMM", "K x N, rows"] + list(COLUMNS) + ["current, cast"]
                + [f"bf16 / {c[4:]}" for c in COLUMNS[1:]] + [f"host: {c}" for c in COLUMNS])
HEADER = ["| " + " | ".join(HEADER_CELLS) + " |", "|---" * len(HEADER_CELLS) + "|"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["dense3b", "moe3b"])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_gemms.py times GEMMs on a CUDA GPU; none was found")
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Float8BlockScaling, Float8CurrentScaling
    except ImportError as error:
        sys.exit(f"bench/fp8_gemms.py needs Transformer Engine: {error}")
    recipes = {COLUMNS[1]: Float8CurrentScaling(), COLUMNS[2]: DelayedScaling()}
    if te.is_fp8_block_scaling_available():
        recipes[COLUMNS[3]] = Float8BlockScaling()
    print(f"{torch.cuda.get_device_name()}, forward + backward, median ms\n")
    print("\n".join(HEADER))
    errors, measured = {}, {}  # an MoE recipe's attention GEMMs are in both of its layer totals
    for model in args.recipes:
        for total_name, gemms in layer_gemms(model).items():
            totals = {}
            for gemm in gemms:
                if gemm not in measured:
                    measured[gemm] = layer_times(te, recipes, gemm, args.repeats, errors)
                times = measured[gemm]
                shape = f"{gemm.fan_in} x {gemm.fan_out}, {gemm.rows:,}" + (" per expert" if gemm.experts else "")
                print(markdown_row(model, gemm.name, shape, times), flush=True)
                totals = {c: tuple(a + b for a, b in zip(totals.get(c, (0.0, 0.0)), t)) for c, t in times.items()
                          if c in totals or not totals}
            print(markdown_row(model, total_name, "", totals), flush=True)
    square = layer_times(te, recipes, Gemm("8192^3 GEMM", 8192, 8192, 8192), args.repeats, errors)
    print(markdown_row("ceiling", "8192^3 GEMM", "8192 x 8192, 8,192", square))
    flops = 3 * 2 * 8192**3
    print("\nceiling TFLOP/s on the device: " + ", ".join(f"{c} {flops / square[c][0] / 1e9:.0f}"
                                                         for c in COLUMNS if c in square))
    for where, error in errors.items():
        print(f"failed: {where}: {error}")


if __name__ == "__main__":
    main()
