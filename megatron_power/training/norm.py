"""RMSNorm for the local layer spec that, unlike Megatron's WrappedTorchNorm, supports sequence
parallelism: its weight is marked so finalize_model_grads all-reduces its gradient across TP."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # With sequence parallelism each TP rank normalises its own slice of the sequence, so the
        # weight's gradient is partial on every rank.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
