"""`make train` on a fresh clone: builds the default data, trains, and learns real structure."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, metrics


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
    args = "train.tokens=300K model.hidden_size=128 model.ffn_hidden_size=384 train.eval_interval=1000"
    result = subprocess.run(["make", "train", f"VENV={venv}", f"ARGS={args}", "-o", f"{venv}/.installed-base",
                             "-o", f"{venv}/.installed-torch"], cwd=clone, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    manifest = json.loads((clone / "data" / "stdlib" / "manifest.json").read_text())
    # Built from the corpus shipped in the repository, not the interpreter's own standard library
    # (Python 3.12's gives 3.16M tokens): the same data on every Python, so bounds and figures hold.
    assert (manifest["train"]["tokens"], manifest["valid"]["tokens"]) == (3_346_005, 91_423), manifest
    _, valid = metrics(clone / "runs" / "proxy")
    final = valid[max(valid)]
    # Well below the loss of a model that ignores context (the corpus's unigram entropy).
    assert final < manifest["unigram_entropy_nats"] - 1.0, (final, manifest["unigram_entropy_nats"])
