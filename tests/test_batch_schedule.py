"""A global batch that changes during a run (training/batch_schedule.py): by tokens seen or with the
measured noise scale, the Power lr following the batch in force, a resume at a change giving the
uninterrupted run's losses, and bad schedules refused before any work. (Layouts with a schedule:
test_parallel.py runs every layout with one.)"""

import pytest

from helpers import SMALL, command, megatron_power, records, run_train, signal_after
from megatron_power.config import load_config
from megatron_power.errors import ConfigError
from megatron_power.training.batch_schedule import grown_batch

SEQ = 128
SHALLOW = SMALL + ["model.num_layers=2"]  # half the proxy's depth: what is tested is the batch, not the model
# Six steps of 16 sequences, then six of 32; a checkpoint at step 6, where the batch changes.
CHANGE = 6 * 16 * SEQ
TOKEN_SCHEDULE = SHALLOW + [f"train.batch_schedule=[[0,16],[{CHANGE},32]]", f"train.tokens={CHANGE + 6 * 32 * SEQ}",
                          "schedule.a=0.32", "schedule.b=-0.51", "schedule.lr_max=0.01", "schedule.warmup=0",
                          "schedule.decay=0",
                          "checkpoint.interval=6"]
# Measured every second step; the batch may double twice, from 16 to 64.
NOISE_SCALE = SHALLOW + ["train.batch_schedule=noise_scale", "train.noise_scale_interval=2",
                       "train.batch_growth.ceiling=64", "train.batch_growth.factor=2", f"train.tokens={20 * 16 * SEQ}",
                       "checkpoint.interval=2"]


def steps(run_dir):
    """The last attempt of each step (a resumed step overwrites its first)."""
    return {row["step"]: row for row in records(run_dir, "loss")}


def test_token_schedule_follows_the_power_lr_and_resumes_exactly_at_the_change(default_data, tmp_path):
    run_train(tmp_path, "whole", TOKEN_SCHEDULE)
    signal_after(command("train", "proxy", f"out_dir={tmp_path}", "name=cut", *TOKEN_SCHEDULE), tmp_path / "cut", 7)
    resumed = run_train(tmp_path, "cut", TOKEN_SCHEDULE)
    assert "at step 6 " in resumed.stdout  # the checkpoint written just before the first step at 32

    whole, cut = steps(tmp_path / "whole"), steps(tmp_path / "cut")
    assert [r["batch"] for r in whole.values()] == [16] * 6 + [32] * 6
    assert whole[12]["tokens"] == CHANGE + 6 * 32 * SEQ  # the budget, exactly
    assert {k: r["loss"] for k, r in cut.items()} == {k: r["loss"] for k, r in whole.items()}
    # lr = min(lr_max, beta * a * n**b), beta the batch in force in 4096-token sequences, n the
    # tokens seen before the step.
    before = 0
    for row in whole.values():
        beta = row["batch"] * SEQ / 4096
        expected = 0.01 if before == 0 else min(0.01, beta * 0.32 * before ** -0.51)
        assert row["lr"] == pytest.approx(expected, rel=1e-12)
        before = row["tokens"]
    assert whole[7]["lr"] == pytest.approx(2 * whole[6]["lr"] * (CHANGE / (CHANGE - 16 * SEQ)) ** -0.51, rel=1e-12)


@pytest.mark.slow
def test_noise_scale_growth_makes_the_same_decisions_when_resumed(default_data, tmp_path):
    first = run_train(tmp_path, "whole", NOISE_SCALE)
    signal_after(command("train", "proxy", f"out_dir={tmp_path}", "name=cut", *NOISE_SCALE), tmp_path / "cut", 4)
    resumed = run_train(tmp_path, "cut", NOISE_SCALE)
    assert "resumed from" in resumed.stdout

    whole, cut = steps(tmp_path / "whole"), steps(tmp_path / "cut")
    assert cut == {k: {**r, "time": cut[k]["time"]} for k, r in whole.items()}  # losses, lr, batch: all equal
    batches = [r["batch"] for r in whole.values()]
    assert batches[0] == 16 < batches[-1] and batches == sorted(batches)  # grew, never shrank
    measured = {r["step"] for r in records(tmp_path / "whole", "b_simple")}
    for step in range(2, len(batches) + 1):
        if batches[step - 1] != batches[step - 2]:
            assert step - 1 in measured  # changes only right after a measurement
            assert (whole[step - 1]["tokens"]) % (batches[step - 1] * SEQ) == 0  # on its own step boundary
    assert sum(r["tokens"] - whole.get(k - 1, {"tokens": 0})["tokens"] for k, r in whole.items()) == 20 * 16 * SEQ
    assert "global batch 16 -> " in first.stdout and "(B_simple " in first.stdout  # one line per change


def test_growth_rule():
    train = load_config("proxy", ["train.batch_schedule=noise_scale", "train.noise_scale_interval=1",
                                  "train.batch_growth.ceiling=256", "train.batch_growth.factor=2",
                                  "train.batch_growth.min_interval=1M", "train.tokens=4194304"],
                        check_paths=False).train
    step = 32 * 256

    def grow(current, b_simple, tokens, last_change=0):
        return grown_batch(current, b_simple, tokens, last_change, train, 256)

    assert grow(32, 40.0, 2**20) == 64  # 2 x 40 = 80: nearest allowed size 64 (sizes 32, 64, 128, 256)
    assert grow(32, 50.0, 2**20) == 128  # 100: nearest on a log scale 128
    assert grow(32, 10_000.0, 2**20) == 256  # capped at the ceiling
    assert grow(128, 20.0, 2**20) == 128  # never shrinks
    assert grow(32, 50.0, 2**19) == 32  # too soon after the start (min_interval 1M tokens)
    assert grow(64, 200.0, 2**21, last_change=2**21 - 2**19) == 64  # too soon after the last change
    assert grow(32, 50.0, 2**20 + 2 * step) == 64  # 128's step does not divide the tokens seen; 64's does
    assert grow(32, float("nan"), 2**20) == 32  # no estimate yet


BAD = [
    ("[[0,16],[1000,32]]", "train.batch_schedule: the last batch (32, 4,096 tokens per step) from 2,048 tokens does "
                           "not end on the budget train.tokens (65,536); nearest budgets reached exactly: 63,488 or "
                           "67,584"),
    ("[[0,16],[8192,20]]", "train.batch_schedule[1]: batch 20 must be divisible by train.micro_batch_size x "
                           "data-parallel size (8)"),
    ("[[8192,32],[4096,64]]", "train.batch_schedule[1]: tokens must increase from one change to the next"),
    ("[[0,16],[1T,32]]", "train.batch_schedule[1]: a change at 1T tokens comes at or after the budget"),
    ("[[0,16],[8192]]", "train.batch_schedule[1] must be a [tokens, batch] pair, got [8192]"),
    ("[[0,16],[lots,32]]", "train.batch_schedule[1]: 'lots' is not a count"),
    ("grow", "train.batch_schedule must be null, 'noise_scale' or a list of [tokens, batch] pairs, got 'grow'"),
    ("noise_scale", "train.batch_schedule=noise_scale needs train.noise_scale_interval > 0"),
]


@pytest.mark.parametrize("schedule,message", BAD, ids=[b[0] for b in BAD])
def test_bad_batch_schedule_is_refused_in_one_line(schedule, message):
    with pytest.raises(ConfigError) as err:
        load_config("proxy", SMALL + [f"train.batch_schedule={schedule}", "train.tokens=65536"], check_paths=False)
    lines = str(err.value).splitlines()  # one line per problem, each naming its key
    assert any(message in line for line in lines) and all(line.startswith("train.") for line in lines)


def test_bad_growth_settings_are_each_named(default_data, tmp_path):
    result = megatron_power("train", "proxy", f"out_dir={tmp_path}", *SMALL, "train.batch_schedule=noise_scale",
                            "train.noise_scale_interval=2", "train.batch_growth.ceiling=48",
                            "train.batch_growth.factor=0", "train.batch_growth.min_interval=-1", check=False)
    assert result.returncode != 0 and not (tmp_path / "proxy").exists()
    for message in ("train.batch_growth.ceiling (48) must be train.global_batch_size (16) times a power of two",
                    "train.batch_growth.factor must be a positive number, got 0",
                    "train.batch_growth.min_interval must be >= 0 tokens, got -1"):
        assert message in result.stderr
