"""Parallel layouts over gloo reproduce the single-process losses step by step, with muP on (the
proxy recipe's default).

Weights are drawn per global parameter key (model.initialize_weights) and every layout sees the
same global batches, so the only differences are floating-point reduction orders. Tolerance:
1e-4 absolute on losses of 6 to 9 nats (seen: agreement to about 1e-6).
"""

import pytest

from conftest import SMALL, metrics, run_train

from megatron_power.config import load_config

STEPS = 10
OVERRIDES = SMALL + ["model.seq_length=128", "train.global_batch_size=16", "train.micro_batch_size=4",
                     f"train.tokens={STEPS * 16 * 128}", "schedule.warmup=0", "schedule.decay=0"]


@pytest.fixture(scope="module")
def reference(default_data, tmp_path_factory):
    assert load_config("proxy", OVERRIDES).mup.enabled
    out = tmp_path_factory.mktemp("layouts")
    run_train(out, "single", OVERRIDES)
    return metrics(out / "single")[0]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pp=2"]),
    (2, []),  # data parallel
    (2, ["parallel.distributed_optimizer=true"]),
    (4, ["parallel.tp=2", "parallel.pp=2"]),
], ids=["tp2", "tp2-sp", "pp2", "dp2", "dp2-distopt", "tp2xpp2"])
def test_layout_matches_single_process(reference, tmp_path, nproc, layout):
    run_train(tmp_path, "layout", OVERRIDES + layout, nproc=nproc)
    losses = metrics(tmp_path / "layout")[0]
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"step {step}"
    # The run learned something: the comparison is not between two flat lines.
    assert losses[STEPS] < losses[1] - 1.0
