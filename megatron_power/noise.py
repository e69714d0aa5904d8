"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A), the
standard online estimate of the critical batch size.

A gradient averaged over B samples has E|g_B|^2 = |G|^2 + tr(Sigma) / B, so its squared norm at two
batch sizes of the same step gives unbiased estimates of |G|^2 and tr(Sigma). Here the small batch is
each rank's first micro-batch, read from Megatron's gradient buffers between micro-batches 1 and 2
of its non-pipelined schedule, and the big batch is the global batch, whose norm the optimizer
computes anyway. Single estimates are very noisy (|G|^2 can come out negative), so, as McCandlish
et al. do, both are averaged over steps before taking the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def two_batch_estimates(small_sq: float, b_small: float, big_sq: float, b_big: float):
    """Unbiased (|G|^2, tr(Sigma)) from squared gradient norms at batch sizes b_small < b_big."""
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


@dataclass
class NoiseScaleAverage:
    """Bias-corrected exponential averages of |G|^2 and tr(Sigma); part of a run's saved state."""

    grad_sq: float = 0.0
    trace: float = 0.0
    weight: float = 0.0

    def update(self, grad_sq: float, trace: float, decay: float) -> None:
        self.grad_sq = decay * self.grad_sq + (1 - decay) * grad_sq
        self.trace = decay * self.trace + (1 - decay) * trace
        self.weight = decay * self.weight + (1 - decay)

    @property
    def b_simple(self) -> float:
        """In samples (sequences); nan until the averaged |G|^2 is positive."""
        return self.trace / self.grad_sq if self.grad_sq > 0 else float("nan")


class FirstMicrobatchProbe:
    """Measures, for one step, the squared gradient norms of the first micro-batch and of the
    global batch, split into dense and expert parameters (experts see the first micro-batch of all
    ranks of their expert-parallel group, so their small batch is EP times larger).

    Needs parallel.tp = parallel.pp = 1 (config.validate checks it): every rank then holds whole
    dense parameters, and forward_step for micro-batch 2 runs after micro-batch 1's backward.
    """

    def __init__(self, ddp_model, micro_batch_size: int, global_batch_size: int, num_microbatches: int,
                 ep: int, device):
        self.model, self.device = ddp_model, device
        self.num_microbatches = num_microbatches
        self.b_small = {"dense": micro_batch_size, "expert": micro_batch_size * ep}
        self.b_big = global_batch_size
        self.ep = ep
        self.small_sq = self.big_sq = None

    def wrap(self, forward_step):
        calls = 0

        def forward_step_with_probe(data_iterator, model):
            nonlocal calls
            calls += 1
            if calls == 2:
                self.small_sq = self._first_microbatch_sq()
            return forward_step(data_iterator, model)

        return forward_step_with_probe

    def _first_microbatch_sq(self) -> dict:
        # The schedule scales each micro-batch's loss by 1/num_microbatches before backward.
        scale = float(self.num_microbatches) ** 2
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, buffers in enumerate((self.model.buffers, self.model.expert_parallel_buffers)):
            for buffer in buffers:
                local[i] += buffer.grad_data.double().square().sum()
        dist.all_reduce(local)
        world = dist.get_world_size()
        # Mean over the ranks' first micro-batches (dense) and over the expert groups' (expert).
        return {"dense": float(local[0]) * scale / world, "expert": float(local[1]) * scale * self.ep / world}

    def read_global_batch(self, optimizer) -> None:
        """After optimizer.prepare_grads(): the global batch's squared norms from the optimizer."""
        big = {"dense": 0.0, "expert": 0.0}
        for chained in optimizer.chained_optimizers:
            if getattr(chained, "is_stub_optimizer", False) or not chained.optimizer.param_groups:
                continue
            kind = "expert" if chained.optimizer.param_groups[0]["is_expert_parallel"] else "dense"
            big[kind] += chained.get_grad_norm() ** 2
        self.big_sq = big

    def estimates(self):
        """(|G|^2, tr(Sigma)) of this step, summed over dense and expert parameters."""
        grad_sq = trace = 0.0
        for kind, b_small in self.b_small.items():
            if self.small_sq[kind] == 0 and self.big_sq[kind] == 0:
                continue  # no parameters of this kind
            g, tr = two_batch_estimates(self.small_sq[kind], b_small, self.big_sq[kind], self.b_big)
            grad_sq, trace = grad_sq + g, trace + tr
        self.small_sq = self.big_sq = None
        return grad_sq, trace
