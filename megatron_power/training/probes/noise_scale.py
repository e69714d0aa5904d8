"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A), the
standard online estimate of the critical batch size.

A gradient averaged over B samples has E|g_B|^2 = |G|^2 + tr(Sigma) / B, so its squared norm at two
batch sizes of the same step gives unbiased estimates of |G|^2 and tr(Sigma). Here the small batch is
each rank's first micro-batch, read from Megatron's gradient buffers once its backward is done,
and the big batch is the global batch, whose norm the optimizer computes anyway. Single estimates are very noisy (|G|^2 can come out negative), so, as McCandlish
et al. do, both are averaged over steps before taking the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.utils import get_attr_wrapped_model


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

    Any TP / PP / EP layout: each stage reads its gradient buffers once micro-batch 1's backward is
    done, which in Megatron's 1F1B schedule is just before the forward of micro-batch W + 2, W being
    the stage's warm-up forwards (config.validate asks for pp + 1 micro-batches per rank). The
    gradient is then not yet whole where Megatron defers a sum to the end of the step
    (finalize_model_grads): sequence-parallel norm weights hold one part per TP rank, and a tied
    embedding one part on the first and one on the last pipeline stage. Those are summed into
    copies; every other gradient is read in place and counted once, as Megatron's grad norm counts
    it (TP shards summed; TP duplicates and the last stage's copy of the embedding skipped).
    """

    def __init__(self, ddp_model, micro_batch_size: int, global_batch_size: int, num_microbatches: int,
                 ep: int, device):
        self.model, self.device = ddp_model, device
        self.num_microbatches = num_microbatches
        self.b_small = {"dense": micro_batch_size, "expert": micro_batch_size * ep}
        self.b_big = global_batch_size
        # An expert's gradient buffer sums the mean-loss gradients of the EP ranks whose tokens it
        # took; Megatron divides by them only at the gradient sync. Before it the gradient of the
        # mean over those EP micro-batches is 1/EP of the buffer: its square, 1/EP^2.
        self.expert_scale = 1.0 / ep**2
        warmup = ps.get_pipeline_model_parallel_world_size() - ps.get_pipeline_model_parallel_rank() - 1
        self.read_before_forward = min(warmup, num_microbatches) + 2
        # Replicas of the whole dense and the whole expert gradient; each saw its own micro-batch 1.
        self.replicas = (ps.get_data_parallel_world_size(), ps.get_expert_data_parallel_world_size())
        gpt = get_attr_wrapped_model(ddp_model, "pre_process", return_model_obj=True)
        split_over_stages = gpt.share_embeddings_and_output_weights and ps.get_pipeline_model_parallel_world_size() > 1
        self.tied = gpt.shared_embedding_or_output_weight() if split_over_stages else None
        self.count_tied = gpt.pre_process  # the first stage's copy stands for both
        self.sequence_parallel = ddp_model.config.sequence_parallel
        self.small_sq = self.big_sq = None

    def wrap(self, forward_step):
        calls = 0

        def forward_step_with_probe(data_iterator, model):
            nonlocal calls
            calls += 1
            if calls == self.read_before_forward:
                self.small_sq = self._first_microbatch_sq()
            return forward_step(data_iterator, model)

        return forward_step_with_probe

    def _first_microbatch_sq(self) -> dict:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # dense, expert
        tp_parts = []
        for param in self.model.parameters():
            if not param.requires_grad or param is self.tied:
                continue
            if self.sequence_parallel and getattr(param, "sequence_parallel", False):
                tp_parts.append(param.main_grad)
            elif param_is_not_tensor_parallel_duplicate(param):
                sums[0 if getattr(param, "allreduce", True) else 1] += param.main_grad.double().square().sum()
        if tp_parts:
            whole = torch.cat([g.flatten() for g in tp_parts]).double()
            dist.all_reduce(whole, group=ps.get_tensor_model_parallel_group())
            if ps.get_tensor_model_parallel_rank() == 0:
                sums[0] += whole.square().sum()
        if self.tied is not None:
            whole = self.tied.main_grad.clone()
            dist.all_reduce(whole, group=ps.get_embedding_group())
            if self.count_tied:
                sums[0] += whole.square_().sum(dtype=torch.float64)
        dist.all_reduce(sums)
        # The schedule scales each micro-batch's loss by 1/num_microbatches before backward.
        scale = float(self.num_microbatches) ** 2
        return {"dense": float(sums[0]) * scale / self.replicas[0],
                "expert": float(sums[1]) * scale * self.expert_scale / self.replicas[1]}

    def read_global_batch(self, optimizer) -> None:
        """After optimizer.prepare_grads(): the global batch's squared norms, from the gradients and
        groups Megatron's grad norm uses, summed in fp64 (its fp32 norm is off by about 1e-4 on CPU,
        which the difference of the two norms would amplify)."""
        big = {"dense": 0.0, "expert": 0.0}
        for chained in optimizer.chained_optimizers:
            if getattr(chained, "is_stub_optimizer", False) or not chained.optimizer.param_groups:
                continue
            kind = "expert" if chained.optimizer.param_groups[0]["is_expert_parallel"] else "dense"
            sq = torch.zeros(1, dtype=torch.float64, device=self.device)
            for grad in chained.get_grads_for_grad_norm():
                sq += grad.double().square().sum()
            dist.all_reduce(sq, group=chained.get_grad_stats_parallel_group())
            big[kind] += float(sq)
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
