"""Checkpoints: a run killed hard resumes to the same losses; non-finite steps are skipped, then stop."""

import os
import signal
import subprocess
import time

import pytest

from conftest import BIN, ROOT, SMALL, TOKENS_PER_STEP, metrics, run_train

from megatron_power import checkpoint

STEPS = 24
OVERRIDES = SMALL + [f"train.tokens={STEPS * TOKENS_PER_STEP}", "train.eval_interval=6"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_losses(default_data, tmp_path):
    run_train(tmp_path, "whole", OVERRIDES)
    expected_train, expected_valid = metrics(tmp_path / "whole")

    cmd = [str(BIN / "megatron-power"), "train", "proxy", f"out_dir={tmp_path}", "name=killed",
           *OVERRIDES, "checkpoint.interval=3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(metrics(tmp_path / "killed")[0]) >= 8:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(metrics(tmp_path / "killed")[0])
    assert killed_at < STEPS

    resumed = run_train(tmp_path, "killed", OVERRIDES + ["checkpoint.interval=3"])
    assert "resumed from" in resumed.stdout
    train, valid = metrics(tmp_path / "killed")
    # Exactly equal on CPU: same data order, same weights and optimizer state, same arithmetic.
    assert train == expected_train
    assert valid == expected_valid


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(default_data, tmp_path):
    # An absurd learning rate makes the weights overflow after the first update.
    result = run_train(tmp_path, "diverge", SMALL + [f"train.tokens={20 * TOKENS_PER_STEP}", "schedule.lr_max=1e30",
                                                     "schedule.warmup=0", "checkpoint.interval=1",
                                                     "train.max_nonfinite_steps=3"], check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 consecutive steps" in errors[0], result.stderr[-2000:]
    assert "update skipped" in result.stdout
    ckpts = tmp_path / "diverge" / "checkpoints"
    # Only the step before the first bad one was saved; it is intact and still the latest.
    assert checkpoint.latest(ckpts) == ckpts / "iter_0000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000001", "latest"]


def test_unfinished_checkpoint_is_never_read(tmp_path):
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "metadata.json").write_text("{}")
    (tmp_path / "latest").write_text("iter_0000004\n")
    (tmp_path / "iter_0000008.tmp").mkdir()  # a save that crashed half-way
    assert checkpoint.latest(tmp_path) == tmp_path / "iter_0000004"
    (tmp_path / "latest").write_text("iter_0000008\n")  # a marker pointing at nothing complete
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.latest(tmp_path)


def test_benchmark_runs_without_checkpoints_save_nothing(default_data, tmp_path):
    run_train(tmp_path, "bench", SMALL + [f"train.tokens={2 * TOKENS_PER_STEP}", "checkpoint.save=false"])
    assert sorted(metrics(tmp_path / "bench")[0]) == [1, 2]
    assert not (tmp_path / "bench" / "checkpoints").exists()
    run_train(tmp_path, "saved", SMALL + [f"train.tokens={2 * TOKENS_PER_STEP}"])
    assert checkpoint.latest(tmp_path / "saved" / "checkpoints") is not None
