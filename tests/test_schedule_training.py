"""The schedule in real runs: it follows tokens from stage 1 into stage 2 (batch sizes that change:
test_batch_schedule.py)."""

import pytest

from helpers import BATCH, SMALL, TOKENS_PER_STEP, records, run_train
from megatron_power.config import load_config
from megatron_power.training.schedule import learning_rate

TPS = TOKENS_PER_STEP
# A small `a` puts the Power law below its cap, so the lr depends on tokens and batch size.
POWER = ["schedule.a=0.32", "schedule.b=-0.51", "schedule.lr_max=0.01", "schedule.warmup=0"]


@pytest.mark.slow
def test_stage_two_starts_at_stage_one_lr_and_decays_to_zero(default_data, tmp_path):
    stage1_tokens, stage2_tokens = 6 * TPS, 6 * TPS
    stage1 = SMALL + POWER + [f"train.tokens={stage1_tokens}", "schedule.decay=0"]  # no decay
    run_train(tmp_path, "stage1", stage1)
    stage2 = SMALL + POWER + [
        "train.stage=2", f"checkpoint.init_from={tmp_path / 'stage1' / 'checkpoints'}",
        f"train.tokens={stage1_tokens + stage2_tokens}", f"schedule.decay={stage2_tokens}",
        # Stage 2 adds data to the stage-1 mix (here: the validation split, as a stand-in).
        "data.train=[0.7,data/stdlib/train,0.3,data/stdlib/valid]",
    ]
    result = run_train(tmp_path, "stage2", stage2)
    assert "stage 2 from" in result.stdout

    s1 = load_config("proxy", stage1, check_paths=False)
    s2 = load_config("proxy", stage2, check_paths=False)
    reached = learning_rate(stage1_tokens, s1.schedule, stage1_tokens, TPS)  # where stage 1 left off
    lrs = [r["lr"] for r in records(tmp_path / "stage2", "loss")]
    assert records(tmp_path / "stage2", "loss")[0]["tokens"] == stage1_tokens + TPS  # continues the token count
    assert lrs[0] == pytest.approx(reached, rel=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(stage1_tokens + stage2_tokens, s2.schedule, s2.train.tokens, TPS) == 0.0
    # Stage 2 reads the stage-1 corpus past the samples stage 1 read (test_data_pipeline checks
    # that these are exactly the ones stage 1 did not read), and a resume of stage 2 keeps that.
    from megatron_power.training.checkpoint import saved_state
    from megatron_power.training.continued_dataset import dataset_key

    state = saved_state(tmp_path / "stage2" / "checkpoints" / "iter_0000012")["train_state"]
    assert state["samples_read_before"] == {dataset_key(s1.data.train[0]): 6 * BATCH}
    assert state["consumed_samples"] == 6 * BATCH
    # The stage-1 run's checkpoints are read, never written.
    assert sorted(p.name for p in (tmp_path / "stage1" / "checkpoints").iterdir()) == ["iter_0000006", "latest"]
