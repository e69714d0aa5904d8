"""The Power scheduler against the paper's check values (arXiv 2408.13359), and its phase boundaries."""

import re

import pytest

from megatron_power.config import ScheduleConfig
from megatron_power.training.schedule import DECAY_SHAPES, learning_rate, power_lr

PAPER = dict(a=4.0, b=-0.51, lr_max=0.02)


@pytest.mark.parametrize("tokens,expected", [(1e11, 1.0e-2), (1e12, 3.1e-3), (2.5e12, 1.95e-3)])
def test_power_lr_matches_the_paper_check_values(tokens, expected):
    assert power_lr(tokens, 1024, **PAPER) == pytest.approx(expected, rel=0.01)


def test_power_lr_is_capped_until_about_26_billion_tokens():
    assert power_lr(2.5e10, 1024, **PAPER) == 0.02
    assert power_lr(2.7e10, 1024, **PAPER) < 0.02
    crossover = (0.02 / (1024 * 4.0)) ** (1 / -0.51)
    assert crossover == pytest.approx(2.6e10, rel=0.02)


def test_warmup_is_linear_and_decay_reaches_zero_continuously():
    s = ScheduleConfig(kind="power", warmup=1e9, decay=2e11, decay_shape="exp_ibm", **PAPER)
    budget, batch = 10**12, 1024
    lr = lambda n: learning_rate(n, s, budget, batch * 4096)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(0.25e9) == pytest.approx(0.25 * power_lr(1e9, batch, **PAPER))
    assert lr(0.5e9) == pytest.approx(0.5 * power_lr(1e9, batch, **PAPER))
    eps = 1.0
    assert lr(1e9 - eps) == pytest.approx(lr(1e9), rel=1e-6)  # warmup -> power
    start = budget - 2e11
    assert lr(start - eps) == pytest.approx(lr(start), rel=1e-6)  # power -> decay
    assert lr(budget) == 0.0


@pytest.mark.parametrize("shape", sorted(DECAY_SHAPES))
def test_decay_shapes_run_from_one_to_zero(shape):
    f = DECAY_SHAPES[shape]
    assert f(0.0) == pytest.approx(1.0)
    assert f(1.0) == pytest.approx(0.0, abs=1e-12)
    assert all(f(r / 10) >= f((r + 1) / 10) for r in range(10))


class _Optimizer:
    """What OptimizerParamScheduler touches: param_groups."""

    def __init__(self, max_lr, min_lr):
        self.param_groups = [{"max_lr": max_lr, "min_lr": min_lr, "params": []}]


@pytest.mark.parametrize("kind,shape,megatron_style", [
    ("cosine", "cosine", ("cosine", None)),
    ("wsd", "linear", ("WSD", "linear")),
    ("wsd", "cosine", ("WSD", "cosine")),
    ("wsd", "exp_megatron", ("WSD", "exponential")),
    ("wsd", "1-sqrt", ("WSD", "minus_sqrt")),
])
def test_wsd_and_cosine_match_megatron_step_by_step(kind, shape, megatron_style):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    steps, warmup_steps, decay_steps, tokens_per_step = 200, 20, 60, 4096 * 8
    s = ScheduleConfig(kind=kind, lr_max=3e-3, min_lr=3e-5, warmup=warmup_steps * tokens_per_step,
                       decay=decay_steps * tokens_per_step if kind == "wsd" else 0, decay_shape=shape)
    style, wsd_style = megatron_style
    reference = OptimizerParamScheduler(
        _Optimizer(s.lr_max, s.min_lr), init_lr=0.0, max_lr=s.lr_max, min_lr=s.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=steps, lr_decay_style=style,
        start_wd=0.1, end_wd=0.1, wd_incr_steps=steps, wd_incr_style="constant",
        wsd_decay_steps=decay_steps if kind == "wsd" else None, lr_wsd_decay_style=wsd_style)
    for step in range(steps + 1):
        reference.num_steps = step
        expected = reference.get_lr(reference.optimizer.param_groups[0])
        ours = learning_rate(step * tokens_per_step, s, steps * tokens_per_step, tokens_per_step)
        assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15), f"step {step}"


def test_batch_size_changes_the_power_schedule_as_the_paper_prescribes():
    s = ScheduleConfig(kind="power", **PAPER)
    assert learning_rate(1e12, s, 10**13, 2048 * 4096) == pytest.approx(2 * learning_rate(1e12, s, 10**13, 1024 * 4096))


def test_the_batch_counts_sequences_of_the_reference_length():
    """The paper's a and b were fitted on 4096-token sequences: its 3B recipe's lr (1024 x 4096)
    holds for any split of the same tokens per step into sequences, and the unit is explicit."""
    s = ScheduleConfig(kind="power", **PAPER)
    for sequences, length in ((1024, 4096), (512, 8192), (32768, 128)):
        assert learning_rate(1e12, s, 10**13, sequences * length) == pytest.approx(3.1e-3, rel=0.01)
    halved = ScheduleConfig(kind="power", a=PAPER["a"] / 2, b=PAPER["b"], lr_max=PAPER["lr_max"],
                            reference_seq_length=2048)
    assert learning_rate(1e12, halved, 10**13, 1024 * 4096) == pytest.approx(learning_rate(1e12, s, 10**13, 1024 * 4096))


def test_schedule_command_prints_each_requested_point(tmp_path):
    import subprocess

    from helpers import ROOT, command

    png = tmp_path / "schedule.png"
    result = subprocess.run(
        command("schedule", "proxy", "train.global_batch_size=1024",
         "train.micro_batch_size=1", "model.seq_length=4096", "train.tokens=1.25T", "schedule.a=4", "schedule.b=-0.51",
         "schedule.lr_max=0.02",
         "schedule.warmup=0", "schedule.decay=250B", "--world-size", "1024",
         "--at", "1e11", "1T", "1.25T", "--plot", str(png)),
        cwd=ROOT, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("note: the lr holds at lr_max 0.02 from the end of the warmup (0 tokens)")
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == ["100,000,000,000", "1,000,000,000,000", "1,250,000,000,000"]
    assert [r[1] for r in rows] == ["1024"] * 3
    assert float(rows[0][2]) == pytest.approx(1.0e-2, rel=0.01)
    assert float(rows[1][2]) == pytest.approx(3.1e-3, rel=0.01)
    assert float(rows[2][2]) == 0.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cap_that_hides_the_power_law_is_reported():
    from megatron_power.config import load_config
    from megatron_power.training.schedule import power_law_note

    def note(recipe, *overrides, world_size=1):
        c = load_config(recipe, list(overrides), world_size, check_paths=False)
        return power_law_note(c.schedule, c.train.tokens, c.tokens_per_step)

    # The proxy's default run is below its cap from the end of its warmup on.
    assert note("proxy") is None
    # Counting its batch in its own 256-token sequences (32, not 2 of 4096) would cap all of it.
    assert note("proxy", "schedule.reference_seq_length=256").startswith("warning: the power law never acts")
    # The paper's 3B run: capped until about 2.6e10 tokens (its check value), well past the warmup.
    dense3b = note("dense3b", world_size=8)
    assert dense3b.startswith("note: the lr holds at lr_max 0.02")
    cap_end = int(re.search(r"to ([\d,]+) tokens", dense3b).group(1).replace(",", ""))
    assert cap_end == pytest.approx(2.6e10, rel=0.01)
    assert note("proxy", "schedule.a=0.05") is None  # below the cap from the first token
    assert note("proxy", "schedule.kind=wsd") is None


def test_a_larger_budget_after_the_decay_began_is_a_warning_that_the_lr_goes_back_up():
    """Raising train.tokens of a run that has begun to decay raises its lr again: the steps trained
    in the decay stay decayed, so the run is not the longer run it seems."""
    from megatron_power.config import load_config
    from megatron_power.training.schedule import decay_undone_warning, learning_rate

    def config(tokens, *overrides):
        return load_config("proxy", [f"train.tokens={tokens}", *overrides], 1, check_paths=False)

    step = 8192  # the proxy's tokens per step; decay is its last 20%
    old, longer = config(100 * step), config(200 * step)
    assert decay_undone_warning(old, longer, 70 * step, step) is None  # still on the power law: nothing undone
    assert decay_undone_warning(old, old, 90 * step, step) is None
    assert decay_undone_warning(old, config(90 * step), 85 * step, step) is None  # a shorter budget lowers the lr
    warning = decay_undone_warning(old, longer, 90 * step, step)
    before = learning_rate(90 * step, old.schedule, old.train.tokens, step)
    after = learning_rate(90 * step, longer.schedule, longer.train.tokens, step)
    assert after > 2 * before
    assert warning == (
        f"warning: train.tokens 819,200 -> 1,638,400: this run has decayed since 655,360 tokens, and the new "
        f"schedule takes its lr at 737,280 tokens from {before:.3g} back up to {after:.3g} (the steps trained in "
        f"the decay stay decayed); to train it as planned for 1,638,400 tokens, go on from a checkpoint before "
        f"the decay (`megatron-power rewind {longer.run_dir}` lists them)")
    # A cosine run decays from the end of its warmup.
    cosine = ["schedule.kind=cosine"]
    assert "has decayed since 40,960 tokens" in decay_undone_warning(config(100 * step, *cosine),
                                                                      config(200 * step, *cosine), 50 * step, step)
