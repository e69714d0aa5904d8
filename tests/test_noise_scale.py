"""The gradient noise scale estimator against linear regression, where B_simple has a closed form."""

import math

import torch

from megatron_power.training.probes.noise_scale import NoiseScaleAverage, two_batch_estimates


def test_two_batch_estimator_matches_linear_regression_closed_form():
    # loss = (x.w - y)^2 / 2 with y = x.w* + eps, x ~ N(0, I_D), eps ~ N(0, s^2). At w = w* + d the
    # per-sample gradient is x (x.d - eps): G = d and, by Isserlis' theorem,
    # tr(Sigma) = (D + 1) |d|^2 + D s^2.
    torch.manual_seed(0)
    D, s, b_small, b_big, steps = 16, 0.5, 4, 32, 8000
    d = torch.randn(D, dtype=torch.float64) * 0.3
    x = torch.randn(steps, b_big, D, dtype=torch.float64)
    eps = torch.randn(steps, b_big, dtype=torch.float64) * s
    per_sample = x * ((x @ d) - eps).unsqueeze(-1)
    small_sq = per_sample[:, :b_small].mean(1).square().sum(-1)
    big_sq = per_sample.mean(1).square().sum(-1)

    average = NoiseScaleAverage()
    for small, big in zip(small_sq.tolist(), big_sq.tolist()):
        average.update(*two_batch_estimates(small, b_small, big, b_big), decay=0.9995)

    grad_sq, trace = d.square().sum().item(), (D + 1) * d.square().sum().item() + D * s**2
    assert math.isclose(average.grad_sq / average.weight, grad_sq, rel_tol=0.1)
    assert math.isclose(average.trace / average.weight, trace, rel_tol=0.05)
    assert math.isclose(average.b_simple, trace / grad_sq, rel_tol=0.1)
    # A single step's estimate is far noisier than the average: the reason for averaging.
    single = [two_batch_estimates(a, b_small, b, b_big)[0] for a, b in zip(small_sq[:200].tolist(), big_sq[:200].tolist())]
    assert min(single) < 0 < max(single)
