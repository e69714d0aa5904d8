"""SLURM: `make submit` against a real slurmctld/slurmd on this machine (installed by the test
setup when missing). A job warned before its time limit checkpoints, requeues itself, resumes and
finishes with the losses of an uninterrupted local run."""

import os
import re
import subprocess

import pytest
import slurm_cluster

from helpers import BIN, ROOT, SMALL, command, metrics, run_train, write_spec
from megatron_power import cli

STEPS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.install()
    if reason:
        pytest.skip(reason)
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def make_submit(env, *variables):
    return subprocess.run(["make", "--no-print-directory", "submit", *variables], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_job_warned_before_its_time_limit_requeues_and_matches_a_local_run(cluster, default_data, tmp_path):
    # Half the tokens at 16 sequences per step, half at 32: the requeue resumes across a batch change.
    overrides = SMALL + [f"train.tokens={STEPS * 2048}", f"train.batch_schedule=[[0,16],[{STEPS // 2 * 2048},32]]",
                         "train.log_interval=1", f"train.eval_interval={STEPS // 2}", "checkpoint.interval=1000"]
    steps = STEPS // 2 + STEPS // 4
    result = make_submit(cluster.env, "RECIPE=proxy", "NODES=1", "GPUS_PER_NODE=2", "CPU=1", "TIME=30",
                         "SIGNAL_LEAD=60",
                         f"ARGS=--log-dir {tmp_path} out_dir={tmp_path} name=slurm {' '.join(overrides)}")
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert "#SBATCH --signal=B:USR1@60" in next(tmp_path.glob("slurm-*.sbatch")).read_text()
    # The warning that --signal=B:USR1@60 makes SLURM send to the batch shell 60 s before the time
    # limit, sent the same way a few steps into the run: SLURM's own timer may fire up to a minute
    # early, which made this test requeue three times and take up to 7 minutes.
    log = tmp_path / f"slurm-{job_id}.out"
    cluster.wait_for_text(log, "step 6/", timeout=300)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=cluster.env, check=True)
    run_train(tmp_path, "local", overrides, nproc=2)  # the uninterrupted reference, meanwhile

    job = cluster.wait(job_id, timeout=600)
    log = log.read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert int(job["Restarts"]) == 1, log[-3000:]
    assert "stop requested: checkpoint saved at step" in log
    assert log.count("requeueing") == int(job["Restarts"])  # a finished job does not requeue again
    assert log.rstrip().endswith("run finished")

    # Named by name=: the run folder is that name (a job submitted again with it would resume it).
    assert f"run {tmp_path}/slurm\n" in result.stdout, result.stdout
    train, valid = metrics(tmp_path / "slurm")
    expected_train, expected_valid = metrics(tmp_path / "local")
    assert sorted(train) == list(range(1, steps + 1))
    assert train == pytest.approx(expected_train, abs=1e-6)
    assert valid == pytest.approx(expected_valid, abs=1e-6)


@pytest.mark.slow
def test_the_script_submitted_by_hand_trains(cluster, default_data, tmp_path):
    """slurm/train.sbatch as a user submits it, with sbatch alone: settings from the environment,
    sbatch's options in place of the script's GPU defaults."""
    overrides = SMALL + ["model.num_layers=2", f"train.tokens={4 * 2048}"]
    env = {**cluster.env, "RECIPE": "proxy", "OVERRIDES": " ".join(overrides), "OUT_DIR": str(tmp_path),
           "PYTHON": str(BIN / "python")}
    submitted = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                                f"--output={tmp_path}/%j.out", "slurm/train.sbatch"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    job = cluster.wait(job_id, timeout=300)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert log.rstrip().endswith("run finished")
    assert sorted(metrics(tmp_path / f"proxy-{job_id}")[0]) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sweep_runs_as_a_job_array(cluster, default_data, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "sweeps", {"schedule.lr_max": [0.005, 0.02]}, name="array")
    logs = tmp_path / "job logs"  # a space: sbatch reads #SBATCH lines as words
    submitted = subprocess.run(command("sweep", str(spec), "--slurm", "--cpu", "--time", "10",
                                "--log-dir", str(logs)), cwd=ROOT, env=cluster.env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    for task in (0, 1):
        job = cluster.wait(f"{job_id}_{task}", timeout=300)
        assert job["JobState"] == "COMPLETED", (logs / f"array-{job_id}_{task}.out").read_text()[-3000:]

    again = subprocess.run(command("sweep", str(spec), "--slurm", "--cpu"), cwd=ROOT,
                           env=cluster.env, capture_output=True, text=True)
    assert again.returncode == 0 and "every point of array is done" in again.stdout, again.stderr
    rows = (tmp_path / "sweeps" / "array" / "results.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["lr0.005", "finished"], ["lr0.02", "finished"]]


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An sbatch that records being called, first on PATH."""
    called = tmp_path / "sbatch-called"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {called}\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return called


@pytest.mark.parametrize("args,message", [
    (["proxy", "--nodes", "1", "--gpus-per-node", "3", "parallel.tp=2"], "world size 1 nodes x 3 = 3"),
    (["proxi", "--nodes", "2"], "unknown recipe 'proxi' (did you mean 'proxy'?)"),
    (["proxy", "--container", ""], "CONTAINER is empty"),
    (["proxy", "--container-mounts", "/data:/data"], "CONTAINER_MOUNTS given without CONTAINER"),
    (["proxy", "--time", "90 minutes"], "TIME '90 minutes' is not a SLURM time limit"),
    (["proxy", "--time", "2", "--signal-lead", "180"], "TIME 2 leaves no room"),
    (["dense3b", "--nodes", "1", "--gpus-per-node", "1", "train.micro_batch_size=8"],
     "dense3b on 1 GPU needs"),
    (["proxy", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1, got 0"),  # was 8, silently
    (["proxy", "--signal-lead", "-1"], "SIGNAL_LEAD must be 1 to 65535 seconds (SLURM's range for --signal), got -1"),
    (["proxy", "--signal-lead", "70000"], "SIGNAL_LEAD must be 1 to 65535 seconds"),
    (["proxy", "--array", "1-x"], "--array '1-x' is not a SLURM job array (expected indices such as 0-15, 1,3,5, "
     "0-15:2 or 0-15%4)"),
], ids=["layout", "recipe", "container", "mounts", "time", "signal", "memory", "cpus", "lead-negative", "lead-large",
        "array"])
def test_bad_submission_fails_before_sbatch(fake_sbatch, capsys, args, message):
    assert cli.main(["submit", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ")
    assert not fake_sbatch.exists()


def test_make_submit_with_an_empty_container_fails_before_sbatch(fake_sbatch):
    result = make_submit(os.environ, "RECIPE=proxy", "CONTAINER=")
    assert result.returncode != 0 and "CONTAINER is empty" in result.stderr
    assert not fake_sbatch.exists()


def test_dry_run_renders_a_multi_node_gpu_script(default_data, tmp_path, capsys):
    assert cli.main(["submit", "dense3b", "--nodes", "16", "--time", "2-00:00:00",
                     "--container", "nvcr.io#nvidia/pytorch:26.06-py3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    result = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr  # the script parses
    for line in ["#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=B:USR1@180", "#SBATCH --requeue", "CONTAINER='nvcr.io#nvidia/pytorch:26.06-py3'",
                 "RECIPE=dense3b", "CUDA_DEVICE_MAX_CONNECTIONS"]:
        assert line in out
    # Run with srun and scontrol stubbed, the script starts the trainer on a run of its own per job,
    # or on the run its name= names, which a later job then resumes.
    trainer = _trainer_command(out, tmp_path)
    assert "-m megatron_power.cli train dense3b" in trainer and "name=dense3b-1234 " in trainer, trainer
    assert cli.main(["submit", "dense3b", "--nodes", "16", "--dry-run", "name=my3b"]) == 0
    assert "name=my3b " in _trainer_command(capsys.readouterr().out, tmp_path)
    assert cli.main(["submit", "dense3b", "--nodes", "16", "--dry-run", "--array", "0-1", "name=my3b"]) == 0
    assert "\nRUN_NAME='' " in capsys.readouterr().out  # an array's tasks: a folder each, my3b-<job>_<task>


def _trainer_command(script: str, tmp_path) -> str:
    """What a rendered job script hands srun (job 1234), with srun and scontrol stubbed."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, body in (("srun", 'echo "$@"'), ("scontrol", "echo node1")):
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node1"}
    return subprocess.run(["bash"], input=script, env=env, text=True, capture_output=True, check=True).stdout + " "
