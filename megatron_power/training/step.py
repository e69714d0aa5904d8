"""One training step and one evaluation pass: micro-batches through Megatron's pipeline schedule
for the layout, the loss reduced over micro-batches and data-parallel ranks. The training loop, the
coordinate check and the benchmarks all step through `train_step`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_power.config.schema import Config
from megatron_power.training import cuda_graphs
from megatron_power.training.data import micro_batches
from megatron_power.training.optim import step_unless_nonfinite
from megatron_power.training.runtime import Runtime


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: float  # nan when the loss was not finite (no backward result worth a norm)
    stop: bool  # some rank was asked to stop: every rank stops after this step

    @property
    def finite(self) -> bool:
        """False when the update was skipped."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    if device.type == "cuda":  # from pinned memory the copies queue behind the GPU's work, not hold up the host
        batch = {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}
    per_token_loss = model(batch["tokens"], batch["position_ids"], cuda_graphs.attention_mask(model, batch["tokens"]),
                           labels=batch["labels"])
    return per_token_loss, partial(_masked_mean, batch["loss_mask"])


def _masked_mean(loss_mask, per_token_loss):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.float().view(-1) * mask) / mask.sum()
    # A copy: the schedule divides the returned loss by the number of micro-batches in place.
    return loss, {"lm loss": loss.detach().clone()}


def run_microbatches(config: Config, model, batches, forward_only: bool, step_func=forward_step):
    """One global batch through Megatron's schedule for this layout; the last stage gets the losses."""
    return get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=config.model.seq_length,
        micro_batch_size=config.train.micro_batch_size, forward_only=forward_only)


def global_mean_loss(losses, rt: Runtime, stop: bool = False):
    """The loss averaged over micro-batches and data-parallel ranks, known to every rank.

    One all-reduce also carries the stop request, so that every rank stops at the same step, and
    the host reads the result once: the step's one wait for the GPU besides the grad norm's.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0 and losses:
        totals[0] = torch.stack([x["lm loss"] for x in losses]).double().sum() / len(losses)
        totals[1] = 1.0
    totals[2] = float(stop)
    dist.all_reduce(totals)
    loss_sum, last_stages, stops = totals.tolist()
    return loss_sum / last_stages, stops > 0


def train_step(config: Config, model, optimizer, batches, rt: Runtime, stop_requested: bool = False,
               probe=None) -> StepResult:
    """Forward and backward over this rank's micro-batches, then the optimizer step unless the loss
    or the grad norm is not finite. `probe` measures the gradient noise scale on this step."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_microbatches(config, model, batches, forward_only=False,
                              step_func=probe.wrap(forward_step) if probe else forward_step)
    loss, stop = global_mean_loss(losses, rt, stop_requested)
    grad_norm = step_unless_nonfinite(optimizer, config.train.clip_grad, probe) if math.isfinite(loss) else math.nan
    return StepResult(loss, grad_norm, stop)


def evaluate(config: Config, model, dataset, rt: Runtime) -> float:
    """The mean loss over the first `train.eval_batches` global batches of `dataset`."""
    model.eval()
    t = config.train
    losses = []
    with torch.no_grad():
        for k in range(t.eval_batches):
            batches = micro_batches(dataset, k * t.global_batch_size, t.global_batch_size,
                                    t.micro_batch_size, rt.dp, rt.dp_rank)
            losses.append(global_mean_loss(run_microbatches(config, model, batches, True), rt)[0])
    model.train()
    return sum(losses) / len(losses)
