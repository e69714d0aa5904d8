"""Tokens routed to each expert of each MoE layer: what the load-balancing loss evens out.

A forward hook on every router of this rank counts the routing map's columns in training
forwards (evaluation runs without grad; a fully recomputed layer counts once, in its backward
recompute). Under sequence parallelism each TP rank routes its own part of the sequence, so the
counts summed over all ranks count every token once. Written to TensorBoard at each log step
(train.log_interval), summed over the steps since the last:
  moe/tokens_routed/layer_i   tokens x top-k routed in layer i (all of them: routing is dropless)
  moe/max_load/layer_i        the busiest expert's tokens over the mean (1 is perfectly even)
  moe/expert_load/layer_i     histogram of every expert's tokens over the mean
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist


class ExpertLoad:
    def __init__(self, gpt_model, num_layers: int, num_experts: int, device):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        for layer in gpt_model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                router.register_forward_hook(partial(self._count, layer.layer_number - 1))

    def _count(self, index: int, module, args, output) -> None:
        if torch.is_grad_enabled():
            _, routing_map = output
            self.counts[index] += routing_map.sum(dim=0).to(self.counts.dtype)

    def write(self, writer, step: int) -> None:
        """Sum over all ranks (every rank takes part); the logging rank writes; then restart."""
        dist.all_reduce(self.counts)
        if writer is not None:
            for i, tokens in enumerate(self.counts.cpu()):
                relative = tokens / tokens.mean()
                writer.add_scalar(f"moe/tokens_routed/layer_{i}", float(tokens.sum()), step)
                writer.add_scalar(f"moe/max_load/layer_{i}", float(relative.max()), step)
                writer.add_histogram(f"moe/expert_load/layer_{i}", relative, step)
        self.restart()

    def restart(self) -> None:
        """Count from zero again (after a report, or after passes that routed no real tokens)."""
        self.counts.zero_()
