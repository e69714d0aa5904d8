"""Never lose a run: whatever happened to its checkpoints folder (a missing or garbled `latest`,
a damaged newest checkpoint, a full disk, a second job on the same run), a run either resumes
from its newest intact checkpoint or stops with one line, and deletes nothing it should keep."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import ROOT, SMALL, TOKENS_PER_STEP, command, metrics, records, run_train, truncate
from megatron_power import cli
from megatron_power.config import FINISHED, from_yaml, to_yaml
from megatron_power.errors import CheckpointError
from megatron_power.training import checkpoint, rewind, run_lock

STEPS = 6
OVERRIDES = SMALL + [f"train.tokens={STEPS * TOKENS_PER_STEP}", "checkpoint.interval=2", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def finished(default_data, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6, started outside the repository (the
    default data is found wherever a run starts)."""
    out = tmp_path_factory.mktemp("finished")
    run_train(out, "run", OVERRIDES, cwd=out)
    ckpts = out / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000002", "iter_0000004", "iter_0000006", "latest"]
    return out / "run"


def copy_run(finished, tmp_path, name="copy"):
    run = tmp_path / name
    shutil.copytree(finished, run)
    (run / ".lock").unlink(missing_ok=True)
    return run


def garble_common_state(checkpoint_dir):
    """Zero the bytes of the non-tensor state (megatron-core 0.19 keeps it in a .distcp file), leaving
    every file its full length."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(checkpoint_dir)).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn.startswith("common_state"))
    with open(checkpoint_dir / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(bytes(info.length))


DAMAGE = {
    "truncated .distcp": lambda c: truncate(sorted(c.glob("*.distcp"))[0]),
    "garbled common state": garble_common_state,
    "truncated .metadata": lambda c: truncate(c / ".metadata"),
    "empty metadata.json": lambda c: (c / "metadata.json").write_text(""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_passed_over(finished, tmp_path, damage):
    ckpts = copy_run(finished, tmp_path) / "checkpoints"
    DAMAGE[damage](ckpts / "iter_0000006")
    found, notes = checkpoint.newest(ckpts)
    assert found == ckpts / "iter_0000004"
    assert any("iter_0000006 is damaged" in n for n in notes), notes


def test_unfinished_save_is_never_read(finished, tmp_path):
    ckpts = copy_run(finished, tmp_path) / "checkpoints"
    shutil.copytree(ckpts / "iter_0000006", ckpts / "iter_0000008.tmp")  # a save cut short: never renamed
    assert checkpoint.newest(ckpts) == (ckpts / "iter_0000006", [])


def test_garbled_or_missing_marker_falls_back_to_the_newest_checkpoint(finished, tmp_path):
    ckpts = copy_run(finished, tmp_path) / "checkpoints"
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00garbage")
    found, notes = checkpoint.newest(ckpts)
    assert found == ckpts / "iter_0000006" and "not a complete checkpoint" in notes[0]
    (ckpts / "latest").unlink()
    found, notes = checkpoint.newest(ckpts)
    assert found == ckpts / "iter_0000006" and "is missing" in notes[0]


def test_no_intact_checkpoint_stops_rather_than_starting_over(finished, tmp_path):
    ckpts = copy_run(finished, tmp_path) / "checkpoints"
    for step in (2, 4, 6):
        garble_common_state(checkpoint.path_of(ckpts, step))
    with pytest.raises(CheckpointError, match="no checkpoint in .* is intact"):
        checkpoint.newest(ckpts)


# A run saved by megatron-core 0.16.1 (how: tests/data/mcore-0.16.1-run/README.md).
LEGACY = ROOT / "tests" / "data" / "mcore-0.16.1-run"
LEGACY_OVERRIDES = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2",
                    "model.num_attention_heads=1", "model.seq_length=64", "train.global_batch_size=8",
                    "train.micro_batch_size=4", "train.eval_interval=1000", "checkpoint.interval=2",
                    "checkpoint.keep=2", "train.tokens=2048"]


@pytest.mark.slow
def test_a_run_saved_by_megatron_core_0_16_resumes_to_its_uninterrupted_losses(default_data, tmp_path):
    """Weights and optimizer state of a checkpoint written by megatron-core 0.16.1 load under the
    installed engine, and the run carries on to the losses 0.16.1 reached without a stop."""
    shutil.copytree(LEGACY / "run", tmp_path / "run")
    result = run_train(tmp_path, "run", LEGACY_OVERRIDES)
    assert "resumed from" in result.stdout and "iter_0000002" in result.stdout
    (train, valid), (expected_train, expected_valid) = metrics(tmp_path / "run"), metrics(LEGACY / "uninterrupted")
    assert train == expected_train
    # 0.16.1 took the norm's square root on the host in float64; 0.19 takes it on the device in
    # float32 when the multi-tensor kernels are TE's (the CPU path takes that branch too). The
    # steps after the resume give 0.16.1's norms rounded to float32 (seen: 1.125467300415039 for
    # 1.125467309321962); the two before it are 0.16.1's own records.
    resumed = [r["grad_norm"] for r in records(tmp_path / "run", "loss")]
    uninterrupted = [r["grad_norm"] for r in records(LEGACY / "uninterrupted", "loss")]
    assert resumed[:2] == uninterrupted[:2]
    assert resumed[2:] == [float(torch.tensor(norm, dtype=torch.float32)) for norm in uninterrupted[2:]]
    # The evaluation after the last update is the one number that moves with the CPU that runs it:
    # bitwise equal on the machine that made the fixture and on an earlier CI machine, 1.2e-7 off
    # (1.3e-8 relative) on an AMD EPYC with AVX-512, where the losses and grad norms stay bitwise equal.
    assert valid.keys() == expected_valid.keys()
    assert list(valid.values()) == pytest.approx(list(expected_valid.values()), rel=1e-7)


@pytest.mark.slow
def test_run_resumes_past_a_damaged_checkpoint_to_the_same_losses(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    truncate(sorted((run / "checkpoints" / "iter_0000006").glob("*.distcp"))[0])
    result = run_train(tmp_path, "copy", OVERRIDES)
    lines = result.stdout.splitlines()
    assert any("iter_0000006 is damaged" in line for line in lines), result.stdout
    assert any(line.startswith(f"resumed from {run / 'checkpoints' / 'iter_0000004'}") for line in lines)
    # Steps 5 and 6 again, from step 4's checkpoint: the same losses, one line each in metrics.jsonl.
    assert metrics(run)[0] == metrics(finished)[0]
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == STEPS
    assert checkpoint.intact(run / "checkpoints" / "iter_0000006") is None  # saved again, whole


@pytest.mark.slow
def test_rewound_run_goes_on_from_the_chosen_checkpoint_and_keeps_the_newer_one(finished, tmp_path, capsys):
    """After a loss spike: `rewind --to 4` moves step 6's checkpoint, finished.json, the wandb run's
    id and a copy of metrics.jsonl aside, and the run trains steps 5 and 6 again from step 4, or
    passes over step 5's data (train.skip_steps)."""
    run = copy_run(finished, tmp_path)
    (run / "wandb-run-id").write_text("0123abcd")  # as a run with logging.wandb.project leaves it
    assert cli.main(["rewind", str(run)]) == 0
    losses = metrics(finished)[0]
    assert "".join(f"  step {s}: {s * TOKENS_PER_STEP:,} tokens, loss {losses[s]:.4f}\n" for s in (2, 4, 6)) \
        in capsys.readouterr().out
    run_lock.take(run)  # a job training this run
    assert cli.main(["rewind", str(run), "--to", "4"]) == 2
    run_lock.release()
    assert "is in use by a run (pid" in capsys.readouterr().err
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert cli.main(["rewind", str(run), "--to", "5"]) == 2
    assert capsys.readouterr().err == (f"error: {run / 'checkpoints'} has no complete checkpoint of step 5 "
                                       f"(it has steps: 2, 4, 6)\n")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before

    assert cli.main(["rewind", str(run), "--to", "4"]) == 0
    assert (f"{run} now resumes from step 4: iter_0000006, finished.json, wandb-run-id and a copy of metrics.jsonl "
            f"were moved to {run / 'checkpoints' / 'rewound'}") in capsys.readouterr().out
    (aside,) = (run / "checkpoints" / "rewound").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == [FINISHED, "iter_0000006", "metrics.jsonl", "wandb-run-id"]
    assert (aside / "metrics.jsonl").read_text() == (finished / "metrics.jsonl").read_text()
    assert checkpoint.newest(run / "checkpoints") == (run / "checkpoints" / "iter_0000004", [])

    result = run_train(tmp_path, "copy", OVERRIDES)
    assert f"resumed from {run / 'checkpoints' / 'iter_0000004'} at step 4" in result.stdout, result.stdout
    assert metrics(run) == metrics(finished)
    assert checkpoint.intact(aside / "iter_0000006") is None
    assert cli.main(["rewind", str(run), "--to", "6"]) == 0
    assert "step 6 is already the newest checkpoint" in capsys.readouterr().out

    # Going back again and passing over step 5's data (PaLM's remedy): step 6 trains on its own
    # data at its own lr and token count, from step 4's weights.
    assert cli.main(["rewind", str(run), "--to", "4"]) == 0
    skipping = run_train(tmp_path, "copy", OVERRIDES + ["train.skip_steps=5"])
    assert "step 5: data passed over (train.skip_steps), nothing trained" in skipping.stdout, skipping.stdout
    assert sorted(metrics(run)[0]) == [1, 2, 3, 4, 6] and metrics(run)[0][6] != losses[6]
    (lr,), (expected_lr,) = ([r["lr"] for r in records(d, "lr") if r["step"] == 6] for d in (run, finished))
    assert lr == expected_lr
    state, expected = (checkpoint.saved_state(checkpoint.path_of(d / "checkpoints", 6))["train_state"]
                       for d in (run, finished))
    assert (state["consumed_samples"], state["consumed_tokens"]) == (expected["consumed_samples"],
                                                                     expected["consumed_tokens"])
    # Trained on to 8 steps, passing over the last two: its end (step 8) is validated and saved.
    more = [f"train.tokens={8 * TOKENS_PER_STEP}", "train.skip_steps=5,7-8"]
    assert "steps 7-8: data passed over" in run_train(tmp_path, "copy", OVERRIDES + more).stdout
    assert checkpoint.latest(run / "checkpoints") == checkpoint.path_of(run / "checkpoints", 8)
    assert max(metrics(run)[0]) == 6 and max(metrics(run)[1]) == 8 and (run / FINISHED).is_file()


@pytest.mark.slow
def test_a_run_folder_names_its_checkpoints_wherever_checkpoint_dir_put_them(finished, tmp_path):
    """A cluster's runs keep checkpoints on a scratch filesystem (checkpoint.dir): eval, convert,
    merge and rewind, given the run folder, find them there, and rewind moves the run folder's
    files aside across filesystems (/dev/shm stands for the other one, where the machine has it)."""
    run = copy_run(finished, tmp_path)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path) as elsewhere:
        scratch = Path(elsewhere) / "checkpoints"
        shutil.move(run / "checkpoints", scratch)
        config = from_yaml((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(to_yaml(replace(config, checkpoint=replace(config.checkpoint, dir=str(scratch)))))
        assert checkpoint.resolve(run) == checkpoint.path_of(scratch, STEPS)
        assert checkpoint.checkpoints_dir(run) == scratch
        assert [saved.step for saved in rewind.checkpoints(run)] == [2, 4, 6]
        assert cli.main(["rewind", str(run), "--to", "4"]) == 0
        (aside,) = (scratch / "rewound").iterdir()
        assert sorted(p.name for p in aside.iterdir()) == [FINISHED, "iter_0000006", "metrics.jsonl"]
        assert not (run / FINISHED).exists()
        assert checkpoint.newest(scratch) == (checkpoint.path_of(scratch, 4), [])


@pytest.mark.parametrize("read_only", ["run folder", "checkpoints"])
def test_a_run_that_cannot_be_written_is_not_rewound_and_is_one_line(finished, tmp_path, capsys, read_only):
    """A run on a read-only mount (an archive, a finished project's share) was a traceback: the lock
    file, or the folder the newer checkpoints go to, could not be made. Read-only even for root."""
    run = copy_run(finished, tmp_path)
    folder = run if read_only == "run folder" else run / "checkpoints"
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        assert cli.main(["rewind", str(run), "--to", "4"]) == 2
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run} cannot be rewound: {folder} is not writable (Read-only file system); nothing was changed"]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


@pytest.mark.slow
def test_checkpoints_without_a_marker_resume_and_are_kept(finished, tmp_path):
    # The repro: a run's iter_* folders copied, without `latest`, into a new run's folder.
    run = tmp_path / "new"
    shutil.copytree(finished / "checkpoints", run / "checkpoints", ignore=shutil.ignore_patterns("latest"))
    result = run_train(tmp_path, "new", SMALL + [f"train.tokens={(STEPS + 2) * TOKENS_PER_STEP}",
                                                 "checkpoint.interval=2", "checkpoint.keep=3"])
    assert "latest is missing" in result.stdout and "resumed from" in result.stdout
    assert sorted(metrics(run)[0]) == [7, 8]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "iter_0000004", "iter_0000006", "iter_0000008", "latest"]


def test_resume_with_another_model_is_refused_in_one_line(finished, tmp_path):
    copy_run(finished, tmp_path)
    result = run_train(tmp_path, "copy", OVERRIDES + ["model.num_layers=2"], check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        "holds a different model than this recipe: model.num_layers: expected 2, found 4 (to train this model, "
        "give it another name=; this run's checkpoints stay as they are)"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_second_job_is_refused_and_ctrl_c_saves_and_exits(default_data, tmp_path):
    first = subprocess.Popen(command("train", "proxy", f"out_dir={tmp_path}", "name=busy",
                              *SMALL, f"train.tokens={200 * TOKENS_PER_STEP}"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "busy" / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = run_train(tmp_path, "busy", SMALL + [f"train.tokens={200 * TOKENS_PER_STEP}"], check=False)
        assert second.returncode == 2
        assert f"{tmp_path / 'busy'} is in use by another run (pid {first.pid} on " in second.stderr, second.stderr
        # Ctrl-C (SIGINT) stops the first as SIGTERM would: a checkpoint of the step it was on, exit 0.
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stderr[-2000:]
    assert "Ctrl-C: saving a checkpoint" in stderr and "stop requested: checkpoint saved at step" in stdout
    stopped_at = max(metrics(tmp_path / "busy")[0])
    ckpts = tmp_path / "busy" / "checkpoints"
    assert checkpoint.latest(ckpts) == checkpoint.path_of(ckpts, stopped_at)


@pytest.mark.slow
def test_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(default_data, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    # Room for one checkpoint of this model (about 17 MB), not two.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], check=True)
    try:
        result = run_train(tmp_path, "full", SMALL + [f"train.tokens={4 * TOKENS_PER_STEP}", "checkpoint.interval=2",
                                                      f"checkpoint.dir={disk}"], check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"no space left on device while saving {disk / 'iter_0000004'}" in errors[0], \
            result.stderr[-3000:]
        assert sorted(p.name for p in disk.iterdir()) == ["iter_0000002", "latest"]
        assert checkpoint.latest(disk) == disk / "iter_0000002"
    finally:
        subprocess.run(["umount", str(disk)], check=True)
