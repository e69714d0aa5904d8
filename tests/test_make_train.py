"""`make train` on a fresh clone: builds the default data, trains, and learns real structure."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import ROOT, metrics, records


@pytest.mark.slow
def test_make_train_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # The checkout's own environment (already installed by `make test`) stands in for the clone's,
    # with the clone's sources first on the path, so the code under test is what was committed.
    # `-o` keeps make from reinstalling the package from the clone into that shared environment
    # (the clone's files are newer than its install stamps).
    venv = os.path.dirname(os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": str(clone)}

    def make(target, *make_vars):
        installed = [arg for stamp in ("base", "torch", "plot") for arg in ("-o", f"{venv}/.installed-{stamp}")]
        return subprocess.run(["make", target, f"VENV={venv}", *make_vars, *installed], cwd=clone, env=env,
                              capture_output=True, text=True)

    # A recipe or spec that does not exist, or a batch that 3 processes cannot split, is one line
    # before the default data is built (about 20 s on a fresh clone) or torchrun starts.
    for target, make_vars, line in [
        ("train", ["RECIPE=nope"], "error: unknown recipe 'nope'; known recipes: dense1b, "),
        ("train", ["NPROC=3"], "error: train.global_batch_size (32) must be divisible by "
                               "train.micro_batch_size x data-parallel size (8 x 3)"),
        ("sweep", ["SPEC=nope"], "error: sweep spec nope not found (expected a YAML file or one of: "),
        ("study", ["STUDY=proxy", "ARGS=--jobs 0"], "error: --jobs must be at least 1, got 0"),
    ]:
        refused = make(target, *make_vars)
        assert refused.returncode != 0
        (said,) = [out for out in refused.stderr.splitlines() if not out.startswith("make")]
        assert said.startswith(line), refused.stderr
        assert not (clone / "data").exists() and not (clone / "runs").exists()

    args = "train.tokens=300K model.hidden_size=128 model.ffn_hidden_size=384 train.eval_interval=1000"
    started = time.time()
    result = make("train", f"ARGS={args}")
    wall = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The start-up, counted from the trainer process's own start, by part: in the log and in metrics.jsonl.
    (startup,) = records(clone / "runs" / "proxy", "startup_s")
    parts = startup["startup_s"]
    assert list(parts) == ["imports and checks", "distributed", "model and init", "DDP and optimizer", "resume", "data"]
    assert all(seconds >= 0 for seconds in parts.values()) and 1 < sum(parts.values()) < wall, (parts, wall)
    assert f"start-up {sum(parts.values()):.1f} s: imports and checks" in result.stdout

    manifest = json.loads((clone / "data" / "stdlib" / "manifest.json").read_text())
    # Built from the corpus shipped in the repository, not the interpreter's own standard library
    # (Python 3.12's gives 3.16M tokens): the same data on every Python, so bounds and figures hold.
    assert (manifest["train"]["tokens"], manifest["valid"]["tokens"]) == (3_346_005, 91_423), manifest
    _, valid = metrics(clone / "runs" / "proxy")
    final = valid[max(valid)]
    # Well below the loss of a model that ignores context (the corpus's unigram entropy).
    assert final < manifest["unigram_entropy_nats"] - 1.0, (final, manifest["unigram_entropy_nats"])


def _python_3_11(path):
    """An interpreter that answers as Python 3.11 does to what the Makefile asks (a version check and
    -V): the Makefile's decisions, tested on a machine that may have no 3.11 installed."""
    path.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.11.9' && exit 0\n"
                    "exit 1  # the check sys.version_info < (3, 12)\n")
    path.chmod(0o755)
    return path


def _make_setup(tmp_path, path: str, *make_vars):
    """`make setup` into a venv under tmp_path, with PATH set to `path`: what a user's machine offers."""
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "setup", f"VENV={venv}", *make_vars], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PATH": path})
    return result, venv


@pytest.mark.parametrize("offered", ["PATH", "PYTHON="])
def test_make_refuses_a_python_older_than_3_12_in_one_line_before_making_a_venv(tmp_path, offered):
    """Only an old Python on the PATH and no pyenv, or an old one named by PYTHON=: one line saying
    what to install or name, and nothing made."""
    old = tmp_path / "bin"
    old.mkdir()
    _python_3_11(old / "python3")
    for tool in ("make", "sh", "grep", "sort", "tail"):
        (old / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    if offered == "PATH":
        result, venv = _make_setup(tmp_path, str(old))
        expected = "error: no Python >= 3.12 found (looked for python3, python3.12 and python3.13 on the PATH and in pyenv)"
    else:
        result, venv = _make_setup(tmp_path, os.environ["PATH"], f"PYTHON={old / 'python3'}")
        expected = f"error: PYTHON={old / 'python3'} is not a Python >= 3.12"
    assert result.returncode != 0
    assert result.stderr.splitlines()[0].startswith(expected), result.stderr
    assert len([line for line in result.stderr.splitlines() if not line.startswith("make")]) == 1, result.stderr
    assert not venv.exists()


def test_make_refuses_a_venv_made_with_an_older_python(tmp_path):
    """A checkout whose .venv predates the move to Python 3.12 is told to remake it, not given pip's
    resolver error."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _python_3_11(venv / "bin" / "python")
    (venv / ".installed-torch").touch()
    result, _ = _make_setup(tmp_path, os.environ["PATH"])
    assert result.returncode != 0
    assert result.stderr.splitlines()[0].startswith(f"error: {venv} was made with Python 3.11"), result.stderr
    assert "make clean-venv" in result.stderr


@pytest.mark.parametrize("nproc", ["four", "0"])
def test_make_train_refuses_a_bad_nproc_in_one_line_before_installing(tmp_path, nproc):
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "train", f"NPROC={nproc}", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if not line.startswith("make")] == [
        f"error: NPROC={nproc} is not a number of processes (expected a positive whole number, e.g. NPROC=4)"]
    assert not venv.exists()
