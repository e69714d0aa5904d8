"""Parallel layouts over gloo reproduce the single-process losses step by step, with muP on (the
proxy recipe's default) and its depth rules (depth-muP: 4 layers on a base of 2, so each rule's
factor differs from 1) and a global batch that doubles for the last two steps, and, where each rank sees the whole global batch (TP, PP), the gradient
noise scale's per-step estimates too: the first micro-batch's gradient is then the same one,
assembled from TP shards, sequence-parallel parts and the tied embedding's two pipeline copies.

The distributed optimizer's run is also interrupted: its torchrun launcher is SIGKILLed after a
few steps, the workers it leaves save a checkpoint and exit, and the run resumes from it in another
layout (TP=2 instead of DP=2); its Adam state, sharded over DP when saved and over TP when loaded
(the checkpoint's `fully_reshardable` format), must come back exactly for the losses to match.

Weights are drawn per global parameter key (model.initialize_weights) and every layout sees the
same global batches, so the only differences are floating-point reduction orders. Tolerance:
1e-4 absolute on losses of 6 to 9 nats (seen: agreement to about 1e-6).
"""

import os
import signal
import subprocess
import time

import psutil
import pytest

from helpers import BIN, ROOT, SMALL, metrics, records, run_train
from megatron_power.config import load_config
from megatron_power.training import checkpoint

STEPS = 10
# Eight steps of 16 sequences, then two of 32 (training/batch_schedule.py).
OVERRIDES = SMALL + ["model.seq_length=128", "train.global_batch_size=16", "train.micro_batch_size=4",
                     f"train.batch_schedule=[[0,16],[{8 * 16 * 128},32]]", f"train.tokens={(8 * 16 + 2 * 32) * 128}",
                     "schedule.warmup=0", "schedule.decay=0", "train.noise_scale_interval=1",
                     "mup.depth_alpha=0.5", "mup.base_depth=2"]


def noise_estimates(run_dir):
    return {r["step"]: (r["grad_sq"], r["trace"]) for r in records(run_dir, "trace")}


@pytest.fixture(scope="module")
def reference(default_data, tmp_path_factory):
    assert load_config("proxy", OVERRIDES).mup.enabled and load_config("proxy", OVERRIDES).model.num_layers == 4
    out = tmp_path_factory.mktemp("layouts")
    run_train(out, "single", OVERRIDES)
    return metrics(out / "single")[0], noise_estimates(out / "single")


def kill_launcher_mid_run(out_dir, overrides, nproc):
    """Start torchrun, SIGKILL the launcher alone after a few steps; its workers, told by the kernel
    (signals.py), save a checkpoint and exit. Returns the step they stopped at."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "megatron_power.cli", "train",
           "proxy", f"out_dir={out_dir}", "name=layout", *overrides]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            (out_dir / "layout" / "metrics.jsonl").is_file() and len(metrics(out_dir / "layout")[0]) >= 3):
        time.sleep(0.1)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, "workers outlived their launcher"
    return int(checkpoint.latest(out_dir / "layout" / "checkpoints").name.split("_")[1])


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout,data_parallel,resumed_layout", [
    (2, ["parallel.tp=2"], False, None),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], False, None),
    (2, ["parallel.pp=2"], False, None),
    (2, [], True, None),
    (2, ["parallel.distributed_optimizer=true"], True, ["parallel.distributed_optimizer=true", "parallel.tp=2"]),
    (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], False, None),
], ids=["tp2", "tp2-sp", "pp2", "dp2", "dp2-distopt-launcher-killed-resumed-as-tp2", "tp2xpp2-sp"])
def test_layout_matches_single_process(reference, tmp_path, nproc, layout, data_parallel, resumed_layout):
    reference_losses, reference_noise = reference
    if resumed_layout:
        assert 3 <= kill_launcher_mid_run(tmp_path, OVERRIDES + layout, nproc) < STEPS
        layout = resumed_layout
    result = run_train(tmp_path, "layout", OVERRIDES + layout, nproc=nproc)
    assert ("resumed from" in result.stdout) == bool(resumed_layout)
    losses = metrics(tmp_path / "layout")[0]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [r["batch"] for r in records(tmp_path / "layout", "loss")][-STEPS:] == [16] * 8 + [32] * 2
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference_losses[step], abs=1e-4), f"step {step}"
    # The run learned something: the comparison is not between two flat lines.
    assert losses[STEPS] < losses[1] - 1.0
    noise = noise_estimates(tmp_path / "layout")
    assert sorted(noise) == list(range(1, STEPS + 1))
    if not data_parallel:  # with DP each rank's first micro-batch is another one
        for step in range(1, STEPS + 1):
            assert noise[step] == pytest.approx(reference_noise[step], rel=5e-4), f"step {step}"
