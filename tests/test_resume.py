"""Checkpoints: a run killed hard, again and again, resumes to the same losses; non-finite steps are
skipped, then stop."""

import random
import signal
import subprocess
import time

import psutil
import pytest
from megatron.core.dist_checkpointing.serialization import load_common_state_dict

from helpers import ROOT, SMALL, TOKENS_PER_STEP, command, metrics, records, run_train, signal_after
from megatron_power.config import FINISHED
from megatron_power.training import checkpoint

STEPS = 24
OVERRIDES = SMALL + [f"train.tokens={STEPS * TOKENS_PER_STEP}", "train.eval_interval=6"]


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _freeze_mid_save(pid, checkpoints) -> bool:
    """Stop the trainer while a save has written part of its tensor files, so the kill lands mid-save.
    (megatron-core 0.19 writes from threads of the trainer, so there is no writer process to stop.)"""
    if not any(checkpoints.glob("iter_*.tmp/*.distcp")):
        return False
    trainer = psutil.Process(pid)
    trainer.suspend()
    if any(checkpoints.glob("iter_*.tmp/*.distcp")):
        return True
    trainer.resume()  # the save finished between the two looks
    return False


@pytest.mark.slow
def test_run_killed_again_and_again_ends_with_the_uninterrupted_losses(default_data, tmp_path):
    """Chaos: the run is killed with SIGKILL four times at seeded random moments, every other time
    while a checkpoint's tensor files are half written, and restarted each time. It
    ends with exactly the uninterrupted run's losses, and no process of a killed attempt outlives it."""
    run_train(tmp_path, "whole", OVERRIDES)
    expected_train, expected_valid = metrics(tmp_path / "whole")

    cmd = command("train", "proxy", f"out_dir={tmp_path}", "name=chaos",
           *OVERRIDES, "checkpoint.interval=2")
    run, rng = tmp_path / "chaos", random.Random(2026_11_23)
    kills = 0
    while kills < 4:
        done = len(metrics(run)[0]) if (run / "metrics.jsonl").is_file() else 0
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        during_save = kills % 2 == 1
        delay = rng.uniform(0.0, 2.0)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            stepped = (run / "metrics.jsonl").is_file() and len(metrics(run)[0]) > done
            if during_save and stepped and _freeze_mid_save(proc.pid, run / "checkpoints"):
                break
            if not during_save and stepped:
                time.sleep(delay)
                break
            time.sleep(0.001 if during_save else 0.005)
        if proc.poll() is not None:
            break  # finished before this kill
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        gone, alive = psutil.wait_procs(children, timeout=20)
        for leftover in alive:
            leftover.kill()
        assert not alive, f"kill {kills}: {[p.cmdline() for p in alive]} outlived the run"
    assert kills == 4, "the run finished before it was killed four times"

    resumed = run_train(tmp_path, "chaos", OVERRIDES + ["checkpoint.interval=2"])
    assert "resumed from" in resumed.stdout and "settings changed" not in resumed.stdout, resumed.stdout
    train, valid = metrics(run)
    # Exactly equal on CPU: same data order, same weights and optimizer state, same arithmetic.
    assert train == expected_train
    assert valid == expected_valid
    # One line per step in metrics.jsonl, however often steps were redone.
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == STEPS

    # A finished run started again says so and changes nothing.
    again = run_train(tmp_path, "whole", OVERRIDES)
    assert f"nothing to train: whole has seen {STEPS * TOKENS_PER_STEP:,} tokens" in again.stdout, again.stdout
    assert metrics(tmp_path / "whole") == (expected_train, expected_valid)

    # Trained on with a larger budget, another peak lr and beta2 (meant, or a mistyped override), and
    # stopped by a signal (SLURM's warning) a step in: it loaded (Megatron pairs optimizer groups by
    # their lr range, and failed on a new one), says what changed, runs the new settings (Megatron
    # keeps the checkpoint's betas), and is no longer finished (a SLURM job would not requeue it).
    longer = [f"train.tokens={(STEPS + 8) * TOKENS_PER_STEP}", "schedule.lr_max=0.03", "optim.beta2=0.98"]
    more = signal_after(command("train", "proxy", f"out_dir={tmp_path}", "name=whole", *OVERRIDES, *longer),
                        tmp_path / "whole", STEPS + 1, signal.SIGTERM)
    assert (f"settings changed since the checkpoint of step {STEPS}, this run uses the new ones: train.tokens: "
            f"{STEPS * TOKENS_PER_STEP} -> {(STEPS + 8) * TOKENS_PER_STEP}; optim.beta2: 0.95 -> 0.98; "
            f"schedule.lr_max: 0.04 -> 0.03\n") in more, more
    # It had decayed to the end of its budget: the warning names the lr it now trains at again.
    warning = more.split(f"warning: train.tokens {STEPS * TOKENS_PER_STEP:,} -> ")[1].splitlines()[0]
    after = float(warning.split("back up to ")[1].split()[0])
    (step_after,) = [r["lr"] for r in records(tmp_path / "whole", "lr") if r["step"] == STEPS + 1]
    assert after == pytest.approx(step_after, rel=1e-3) and "rewind" in warning
    assert "stop requested: checkpoint saved" in more, more
    assert not (tmp_path / "whole" / FINISHED).exists()
    stopped = checkpoint.latest(tmp_path / "whole" / "checkpoints")
    (last_lr,) = [r["lr"] for r in records(tmp_path / "whole", "lr") if r["step"] == checkpoint.step_of(stopped)]
    groups = load_common_state_dict(str(stopped))["optimizer"]["param_groups"]
    assert {(g["max_lr"], g["betas"]) for g in groups} == {(0.03, (0.9, 0.98))}, groups
    assert [g["lr"] for g in groups] == pytest.approx([last_lr * g["lr_mult"] for g in groups], rel=1e-12)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(default_data, tmp_path):
    # An absurd learning rate makes the weights overflow after the first update.
    result = run_train(tmp_path, "diverge", SMALL + [f"train.tokens={20 * TOKENS_PER_STEP}", "schedule.lr_max=1e30",
                                                     "schedule.warmup=0", "checkpoint.interval=1",
                                                     "train.max_nonfinite_steps=3"], check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 consecutive steps" in errors[0], result.stderr[-2000:]
    assert f"`megatron-power rewind {tmp_path / 'diverge'}` lists earlier ones" in errors[0]
    assert "update skipped" in result.stdout
    ckpts = tmp_path / "diverge" / "checkpoints"
    # Only the step before the first bad one was saved; it is intact and still the latest.
    assert checkpoint.latest(ckpts) == ckpts / "iter_0000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000001", "latest"]


def test_benchmark_runs_without_checkpoints_save_nothing(default_data, tmp_path):
    run_train(tmp_path, "bench", SMALL + [f"train.tokens={2 * TOKENS_PER_STEP}", "checkpoint.save=false"])
    assert sorted(metrics(tmp_path / "bench")[0]) == [1, 2]
    assert not (tmp_path / "bench" / "checkpoints").exists()
    run_train(tmp_path, "saved", SMALL + [f"train.tokens={2 * TOKENS_PER_STEP}"])
    assert checkpoint.latest(tmp_path / "saved" / "checkpoints") is not None
