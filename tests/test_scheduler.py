"""The Power scheduler against the paper's check values (DESIGN.md), and its phase boundaries."""

import pytest

from megatron_power.config import ScheduleConfig
from megatron_power.scheduler import DECAY_SHAPES, learning_rate, power_lr

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
    lr = lambda n: learning_rate(n, s, budget, batch)  # noqa: E731
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
