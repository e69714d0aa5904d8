"""Do the 3B recipes' GEMM shapes gain from FP8? Each linear layer of one transformer layer of
`dense3b` and `moe3b` (one 4096-token micro-batch), forward and backward, timed through Transformer
Engine in bf16, under FP8 tensorwise current scaling (the recipes' setting) and under delayed
scaling, side by side.

Each call is timed twice: on the device, queued behind a sleep kernel that outlasts the host's
work, so the device runs it without waiting for the host (what a step gets when the host keeps
ahead); and on the host, the time to issue it (Python, TE's bookkeeping, launches), with the device
idle. A layer whose host time exceeds its device time cannot keep the device busy however its
kernels perform: that is the host's share, which CUDA graphs remove, not the GEMMs'.

FP8 weights are cast once per step and cached across its micro-batches (`is_first_microbatch`),
so the FP8 columns time a later micro-batch; "current, cast" times the first one. A ratio is bf16
device time over FP8 device time: above 1, FP8 is faster for that GEMM. Each GEMM stands alone here:
in the model the norm before qkv and fc1 fuses the input's cast (LayerNormLinear), which this
leaves out. The last rows are the whole layer's linear layers together, and a large square GEMM as
the device's ceiling in each precision.

    python bench/fp8_gemms.py [--tokens 4096] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

TOKENS = 4096
# (name, input features, output features, experts): the GEMMs of one layer, as the recipes set them.
DENSE3B = [("qkv", 2304, 3 * 2304, 0), ("attention out", 2304, 2304, 0),
           ("mlp fc1 (SwiGLU)", 2304, 2 * 9216, 0), ("mlp fc2", 9216, 2304, 0)]
# moe3b: 24 query heads and 8 kv heads of 64; 40 experts of width 512, top-8 (grouped GEMM).
MOE3B = [("qkv", 1536, 1536 + 2 * 512, 0), ("attention out", 1536, 1536, 0),
         ("experts fc1 (SwiGLU)", 1536, 2 * 512, 40), ("experts fc2", 512, 1536, 40)]
TOP_K = 8
# An upper bound on the GPU's clock (H100/H200 boost at 1.98 GHz): a sleep of n cycles lasts at
# least n / SLEEP_HZ seconds.
SLEEP_HZ = 2.0e9


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


def layer_times(te, recipes, fan_in, fan_out, experts, tokens, repeats):
    """(device, host) milliseconds of forward + backward: bf16, each FP8 recipe with cached weights,
    and the first recipe casting its weights."""
    if experts:
        layer = te.GroupedLinear(experts, fan_in, fan_out, bias=False, params_dtype=torch.bfloat16, device="cuda")
        rows = tokens * TOP_K
        # FP8 GEMMs need each expert's rows in multiples of 16; Megatron pads them so (Fp8Padding).
        base = rows // experts // 16 * 16
        splits = [base + 16 * (i < (rows - base * experts) // 16) for i in range(experts)]
        x = torch.randn(rows, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        call = lambda first: layer(x, splits, is_first_microbatch=first)  # noqa: E731
    else:
        layer = te.Linear(fan_in, fan_out, bias=False, params_dtype=torch.bfloat16, device="cuda")
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        call = lambda first: layer(x, is_first_microbatch=first)  # noqa: E731
    grad = torch.randn(x.shape[0], fan_out, device="cuda", dtype=torch.bfloat16)

    def step(recipe, first):
        with te.autocast(enabled=recipe is not None, recipe=recipe):
            out = call(first)
        out.backward(grad)

    times = [timed(lambda: step(None, None), repeats)]
    for recipe in recipes:
        step(recipe, True)  # the FP8 weights, cached for the micro-batches that follow
        times.append(timed(lambda: step(recipe, False), repeats))  # noqa: B023
    times.append(timed(lambda: step(recipes[0], True), repeats))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_gemms.py times GEMMs on a CUDA GPU; none was found")
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling
    except ImportError as error:
        sys.exit(f"bench/fp8_gemms.py needs Transformer Engine: {error}")
    recipes = [Float8CurrentScaling(), DelayedScaling()]
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens per micro-batch, forward + backward, median ms\n")
    print("| recipe | GEMM | K x N | bf16 | FP8 current | FP8 delayed | current, cast | bf16 / current "
          "| bf16 / delayed | host: bf16 | host: current | host: delayed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def row(model, name, shape, times):
        device, host = zip(*times)
        print(f"| {model} | {name} | {shape} | " + " | ".join(f"{t:.3f}" for t in device)
              + f" | {device[0] / device[1]:.2f} | {device[0] / device[2]:.2f} | "
              + " | ".join(f"{t:.3f}" for t in host[:3]) + " |")

    for model, shapes in (("dense3b", DENSE3B), ("moe3b", MOE3B)):
        totals = [(0.0, 0.0)] * 4
        for name, fan_in, fan_out, experts in shapes:
            times = layer_times(te, recipes, fan_in, fan_out, experts, args.tokens, args.repeats)
            totals = [(d + dt, h + ht) for (d, h), (dt, ht) in zip(totals, times)]
            row(model, name, f"{fan_in} x {fan_out}" + (f", {experts} grouped" if experts else ""), times)
        row(model, "one layer", "", totals)
    square = layer_times(te, recipes, 8192, 8192, 0, 8192, args.repeats)
    row("ceiling", "8192^3 GEMM", "8192 x 8192", square)
    flops = 3 * 2 * 8192**3
    print(f"\nceiling TFLOP/s on the device: bf16 {flops / square[0][0] / 1e9:.0f}, FP8 current "
          f"{flops / square[1][0] / 1e9:.0f}, delayed {flops / square[2][0] / 1e9:.0f}")


if __name__ == "__main__":
    main()
