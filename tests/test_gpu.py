"""The GPU path, run where a GPU is (skipped elsewhere; `make gpu-check` runs these and the benchmark).

Each test holds the GPU run against something known: the same model trained in fp32 on the CPU
from the same weights and batches, Megatron's local layers on the same weights, or Hugging Face.
The suite hides CUDA from every other test (conftest.py); these hand it back with GPU_ENV.

Tolerances, all from bf16's 8-bit mantissa (relative rounding 2^-8 = 0.4%):
- losses: step 1 (same weights, no update yet) within 0.02 nats; the next nine within 0.1 nats
  (0.15 in FP8), where rounding has compounded through the updates;
- logits of one forward pass on the same weights: mean absolute difference under 2% of the logits'
  standard deviation, and the same top token at 95% of positions or more.
Wrong muP multipliers, a wrong layer spec or a broken router move these far more.

The CPU's runs go on beside the GPU's (`beside`): most of a test's time is each process's imports.
"""

import csv
import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import GPU_ENV, GPUS
from helpers import ROOT, SMALL, command, environment, metrics, records, run_train
from megatron_power.science.coordcheck import slopes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")]
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine")

STEPS = 10
DENSE = SMALL + [f"train.tokens={STEPS * 16 * 128}", "schedule.warmup=0", "schedule.decay=0"]
MOE = DENSE + ["model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=128"]


def losses(tmp_path, name, overrides, on_gpu):
    run_train(tmp_path, name, overrides, env_vars=GPU_ENV if on_gpu else None)
    train = metrics(tmp_path / name)[0]
    assert sorted(train) == list(range(1, STEPS + 1))
    return train


def beside(function, *args, **kwargs):
    """`function(*args, **kwargs)` started in a thread of its own; `.result()` waits for it."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def assert_close(gpu, cpu, later_tolerance, first=1):
    assert gpu[first] == pytest.approx(cpu[first], abs=0.02)
    for step in range(first + 1, STEPS + 1):
        assert gpu[step] == pytest.approx(cpu[step], abs=later_tolerance), f"step {step}"
    assert gpu[STEPS] < gpu[1] - 1.0


def logits(ckpt, out, on_gpu, local=False):
    cmd = [sys.executable, str(ROOT / "tests" / "logits_of_checkpoint.py"), str(ckpt), str(out)]
    done = subprocess.run(cmd + (["--local"] if local else []), cwd=ROOT, capture_output=True, text=True,
                          env=environment(GPU_ENV if on_gpu else None))
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def assert_same_logits(a, b):
    assert (a - b).abs().mean() < 0.02 * b.std()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_bf16_trains_like_fp32_on_cpu(default_data, tmp_path, model):
    cpu = beside(losses, tmp_path, "cpu", model, on_gpu=False)
    graphed = beside(run_train, tmp_path, "graphed", model + ["precision.fp8=null", "precision.cuda_graphs=true"],
                     env_vars=GPU_ENV)
    gpu = losses(tmp_path, "gpu", model + ["precision.fp8=null"], on_gpu=True)
    assert_close(gpu, cpu.result(), 0.1)
    # The first step's gradient, summed over two micro-batches by Transformer Engine's wgrad GEMMs
    # into the fp32 buffers: one micro-batch lost or counted twice moves its norm by a third or more,
    # which Adam's normalised step would hide from the losses.
    first_grad_norm = [records(tmp_path / run, "loss")[0]["grad_norm"] for run in ("gpu", "cpu")]
    assert first_grad_norm[0] == pytest.approx(first_grad_norm[1], rel=0.05)
    # From step 4 each layer's static part replays from CUDA graphs (with TE): the same kernels,
    # so the eager run's losses; a replay on stale inputs or weights would leave them far behind.
    replayed = graphed.result()
    if importlib.util.find_spec("transformer_engine"):
        assert "captured before step 4" in replayed.stdout
    assert_close(metrics(tmp_path / "graphed")[0], gpu, 0.05)


@needs_te
@pytest.mark.parametrize("model,said", [
    (DENSE, None),
    # The experts' fc1 and fc2 in each of the 4 layers given bf16 by Megatron's per-module recipe
    # (precision.fp8_experts); in layers 2 and 3, the FP8 ones, beside attention in FP8.
    (MOE + ["precision.fp8_experts=bf16"], "precision.fp8_experts=bf16: the experts' 8 GEMM modules run in bf16"),
], ids=["dense", "moe-bf16-experts"])
def test_fp8_trains_like_fp32_on_cpu(default_data, tmp_path, model, said):
    cpu = beside(losses, tmp_path, "cpu", model, on_gpu=False)
    done = run_train(tmp_path, "gpu", model + ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"],
                     env_vars=GPU_ENV)
    assert_close(metrics(tmp_path / "gpu")[0], cpu.result(), 0.15)
    assert said is None or said in done.stdout


@needs_te
@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe-grouped-gemm"])
def test_transformer_engine_layers_compute_the_local_layers_function(default_data, tmp_path, model):
    # One muP checkpoint; its logits under TE's layers (fused attention and norms; grouped-GEMM
    # experts for MoE) against Megatron's local layers (sequential experts) on the same GPU, and
    # against fp32 on the CPU.
    run_train(tmp_path, "weights", model + [f"train.tokens={2 * 16 * 128}"])
    ckpt = tmp_path / "weights" / "checkpoints"
    cpu = beside(logits, ckpt, tmp_path / "cpu.pt", on_gpu=False)
    local = beside(logits, ckpt, tmp_path / "local.pt", on_gpu=True, local=True)
    te = logits(ckpt, tmp_path / "te.pt", on_gpu=True)
    assert_same_logits(te, local.result())
    assert_same_logits(te, cpu.result())


def test_checkpoints_cross_between_gpu_and_cpu(default_data, tmp_path):
    # Saved on the GPU (TE's layers and their FP8 extra state where TE is installed): loads on
    # the CPU and converts to Hugging Face with logits parity.
    cpu = beside(losses, tmp_path, "cpu", MOE, on_gpu=False)
    stopped = beside(run_train, tmp_path, "moved", MOE + [f"train.tokens={5 * 16 * 128}"])
    run_train(tmp_path, "gpu", MOE + ["precision.fp8=hybrid", f"train.tokens={2 * 16 * 128}"], env_vars=GPU_ENV)
    done = subprocess.run(command("convert", "to-hf", str(tmp_path / "gpu" / "checkpoints"), str(tmp_path / "hf"),
                                  "--dtype", "fp32", "--verify"), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    # Saved on the CPU (no extra state): trains on under the GPU's layers from where it stopped.
    stopped.result()
    resumed = run_train(tmp_path, "moved", MOE, env_vars=GPU_ENV)
    assert "resumed from" in resumed.stdout
    moved = metrics(tmp_path / "moved")[0]
    assert_close(moved, cpu.result(), 0.1, first=6)


def test_coordinate_check_is_flat_on_the_gpu(default_data, tmp_path):
    done = subprocess.run(command("coordcheck", "proxy", "--widths", "128,256,512,1024", "--steps", "7",
                                  "--out", str(tmp_path), "model.num_layers=2", "model.seq_length=128",
                                  "train.global_batch_size=8", "train.micro_batch_size=8", "schedule.lr_max=0.02",
                                  f"out_dir={tmp_path}"), cwd=ROOT, capture_output=True, text=True,
                          env=environment(GPU_ENV))
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [dict(r, width=int(r["width"]), step=int(r["step"]), rms=float(r["rms"]))
            for r in csv.DictReader(open(tmp_path / "coordcheck.csv"))]
    last = slopes(rows, 6)
    for (parametrization, quantity), slope in last.items():
        if parametrization == "muP":  # as on the CPU (tests/test_mup.py), bf16 adding little
            assert abs(slope) <= 0.25, (quantity, slope)
