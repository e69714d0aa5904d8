"""Checkpoint merging (WSM): `merge` writes the weighted sum of a run's last checkpoints, one
tensor at a time, as a checkpoint that `eval` (in another layout) and `convert to-hf` read; a
training run with checkpoint.merge logs the same merged loss while it trains."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, environment, megatron_power, records, run_train, truncate
from megatron_power import cli
from megatron_power.convert.torch_dist import TorchDistCheckpoint
from megatron_power.training import checkpoint
from megatron_power.training.merge import coefficients

STEPS = 5
# Wide enough (18M parameters, 71 MB) that a merge holding more than one tensor at once shows.
WIDE = ["model.hidden_size=512", "model.ffn_hidden_size=1536", "model.num_layers=4", "model.seq_length=64",
        "train.global_batch_size=16", "train.micro_batch_size=8", f"train.tokens={STEPS * 16 * 64}",
        "train.log_interval=1", "train.eval_interval=1000", "checkpoint.interval=1", "checkpoint.keep=4"]
# The in-run merge at the last step: checkpoints 2 to 5, WSM's linear decay.
MERGE = ["checkpoint.merge.interval=5", "checkpoint.merge.last=4", "checkpoint.merge.weights=linear"]


@pytest.fixture(scope="module")
def run(default_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge")
    run_train(out, "run", WIDE + MERGE)
    return out / "run"


# `megatron-power merge` with every memory map of a checkpoint file counted. The process's peak
# resident size is no measure of what the merge holds: between two machines of one kind it moved
# by 200 MB (shared libraries' pages, allocator arenas), more than three models of this test.
COUNTED_MERGE = """
import mmap, sys, types, weakref
from megatron_power import cli
from megatron_power.convert import torch_dist

live, peak, total, biggest = 0, 0, 0, 0

def unmapped(length):
    global live
    live -= length

def counted(fileno, length, **kwargs):
    global live, peak, total, biggest
    view = mmap.mmap(fileno, length, **kwargs)
    live, total = live + length, total + length
    peak, biggest = max(peak, live), max(biggest, length)
    weakref.finalize(view, unmapped, length)
    return view

torch_dist.mmap = types.SimpleNamespace(**{**vars(mmap), "mmap": counted})
code = cli.main(sys.argv[1:])
print("mapped", peak, biggest, total)
sys.exit(code)
"""


def merge_mapped(*args) -> tuple:
    """`megatron-power merge ARGS` in a process of its own: the most bytes of checkpoint files it
    held mapped at once, the largest single map, and the bytes it mapped in all."""
    result = subprocess.run([sys.executable, "-c", COUNTED_MERGE, "merge", *map(str, args)], cwd=ROOT,
                            env=environment({"OMP_NUM_THREADS": "2"}), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(int(n) for n in result.stdout.split("mapped")[-1].split())


def model_tensors(path):
    reader = TorchDistCheckpoint(path)
    return {key: reader.read(key).clone() for key in reader.tensors if not key.startswith("optimizer.")}


def test_linear_weighting_is_wsm_trapezoid_and_named_weightings_sum_to_one():
    # WSM's duality with the linear decay taken at the middle of each of the 3 intervals.
    assert coefficients("linear", 4) == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 6])
    assert coefficients("uniform", 4) == [0.25] * 4
    assert coefficients("2,1,1", 3) == [0.5, 0.25, 0.25]
    for name in ("linear", "cosine", "1-sqrt"):
        for n in (1, 2, 5):
            c = coefficients(name, n)
            assert len(c) == n and min(c) >= 0 and math.isclose(sum(c), 1.0)
    # A faster decay leans on the oldest checkpoint: 1-sqrt falls fastest at the window's start.
    assert coefficients("1-sqrt", 4)[0] > coefficients("linear", 4)[0] > coefficients("cosine", 4)[0]


@pytest.mark.slow
def test_merge_is_the_weighted_sum_in_bounded_memory_and_reads_in_any_layout(run, tmp_path):
    checkpoints = sorted((run / "checkpoints").glob("iter_*"))
    assert [p.name for p in checkpoints] == [f"iter_000000{s}" for s in (2, 3, 4, 5)]

    # Two identical checkpoints merge to that checkpoint, bit for bit.
    same = tmp_path / "same"
    megatron_power("merge", checkpoints[-1], checkpoints[-1], same)
    newest = model_tensors(checkpoints[-1])
    merged_same = model_tensors(same / "iter_0000005")
    assert merged_same.keys() == newest.keys() and len(newest) == 8
    assert all(torch.equal(merged_same[k], newest[k]) for k in newest)

    # The last four with WSM's linear weighting: each tensor is the weighted sum computed here.
    out = tmp_path / "merged"
    peak, biggest, total = merge_mapped(run, "--last", "4", "--weights", "linear", out)
    weights = coefficients("linear", 4)
    merged = model_tensors(out / "iter_0000005")
    sources = [model_tensors(p) for p in checkpoints]
    for key in newest:
        expected = sum(w * s[key].double() for w, s in zip(weights, sources)).float()
        torch.testing.assert_close(merged[key], expected, rtol=2e-7, atol=0)

    # Memory: every byte of the four models was read through memory maps of the files, one map
    # at a time, none larger than a tensor (with the page alignment and zip header before it).
    # Reading the sources whole, or a tensor of all four before summing, holds several at once.
    model_bytes = sum(t.numel() * t.element_size() for t in newest.values())
    largest = max(t.numel() * t.element_size() for t in newest.values())
    assert total >= 4 * model_bytes, (total, model_bytes)
    assert peak == biggest < largest + 2**20, (peak, biggest, largest)

    # Evaluated under TP=2, the merged checkpoint gives the loss the run logged for its in-run merge.
    logged = records(run, "valid_loss_merged")
    assert [r["step"] for r in logged] == [STEPS]
    result = megatron_power("eval", run / "config.yaml", f"checkpoint.init_from={out}", "parallel.tp=2", nproc=2)
    loss = float(result.stdout.split("validation loss")[1].split()[0])
    assert f"({checkpoint.path_of(out, STEPS)}, " in result.stdout, result.stdout  # the checkpoint it read
    assert loss == pytest.approx(logged[0]["valid_loss_merged"], abs=1e-5)
    assert loss < records(run, "valid_loss")[-1]["valid_loss"] + 1.0  # a model, not noise

    # Hugging Face reads it, to the same logits.
    converted = megatron_power("convert", "to-hf", out, tmp_path / "hf", "--dtype", "fp32", "--verify")
    assert "verify: largest logit difference" in converted.stdout


def _merge(capsys, *args):
    code = cli.main(["merge", *map(str, args)])
    return code, capsys.readouterr().err


def test_bad_merges_fail_with_one_line_and_write_nothing(run, tmp_path, capsys):
    out = tmp_path / "out"
    checkpoints = sorted((run / "checkpoints").glob("iter_*"))

    code, err = _merge(capsys, run, "--last", "9", out)
    assert code == 2 and "holds 4 complete checkpoints, fewer than the 9 to merge" in err and not out.exists()

    legacy = ROOT / "tests" / "data" / "mcore-0.16.1-run" / "run" / "checkpoints" / "iter_0000002"
    code, err = _merge(capsys, legacy, checkpoints[-1], out)
    assert code == 2 and "holds a different model than" in err and "model.hidden_size" in err and not out.exists()

    code, err = _merge(capsys, "--last", "-1", *checkpoints[-3:], out)  # merged the newest two, silently
    assert code == 2 and err == "error: --last must be 0 (every checkpoint given) or more, got -1\n"

    code, err = _merge(capsys, run, "--last", "2", "--weights", "1,2,3", out)
    assert code == 2 and "expected one of uniform, linear, cosine, 1-sqrt, or 2 comma-separated" in err

    damaged = tmp_path / "damaged"
    shutil.copytree(run / "checkpoints", damaged)
    truncate(sorted((damaged / "iter_0000005").glob("*.distcp"))[0])
    code, err = _merge(capsys, damaged, "--last", "2", out)
    assert code == 2 and "iter_0000005 is damaged" in err and "nothing was merged" in err and not out.exists()
    assert len(err.strip().splitlines()) == 1

