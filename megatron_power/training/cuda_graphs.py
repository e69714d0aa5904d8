"""Transformer Engine's CUDA graphs of each layer's static part (`precision.cuda_graphs`).

The H200's profile found the 3B recipes' steps waiting on the host: hundreds of kernel launches per
layer and micro-batch, each issued from Python. A CUDA graph issues a layer's captured kernels in
one launch. Megatron-Core captures them (`TECudaGraphHelper`, Transformer Engine's
`make_graphed_callables`) and its layers replay them in training forwards; what is left to the loop
is when to capture and when to free, as Megatron-LM's training loop does: after a few eager steps
(the kernels' autotuning and the allocator settle; `precision.cuda_graph_warmup_steps`), once, and
at the end.

Only parts whose shapes are the same at every step can be captured, as Megatron-Bridge scopes
them: a dense layer whole (attention and MLP); of an MoE layer, attention, the router and the
dispatcher's preprocessing, while the experts run eagerly (their token counts change with the
routing). Evaluation runs eagerly (Megatron replays only in training mode).
"""

from __future__ import annotations

import functools

import torch


def graphed_modules(config, hw) -> list:
    """Megatron's `cuda_graph_modules` for a recipe on the machine `hw`; empty when off (the
    setting needs Transformer Engine, as FP8 does)."""
    if not (config.precision.cuda_graphs and hw.transformer_engine):
        return []
    return ["attn", "moe_router", "moe_preprocess"] if config.model.num_experts else ["attn", "mlp"]


class LayerGraphs:
    """Captures the graphs after precision.cuda_graph_warmup_steps eager steps of this process, and
    frees them at the end."""

    def __init__(self, config, model, optimizer, dp: int):
        from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

        self.config, self.dp, self.steps_started = config, dp, 0
        self.helper = TECudaGraphHelper(model=[model], config=model.config, seq_length=config.model.seq_length,
                                        micro_batch_size=config.train.micro_batch_size,
                                        optimizers=[optimizer])

    def before_step(self, global_batch_size: int) -> bool:
        """Whether the graphs were captured now. The capture's own forward and backward passes (on
        sample inputs) reach Megatron's router statistics, which it then clears, and ours."""
        self.steps_started += 1
        if self.steps_started != self.config.precision.cuda_graph_warmup_steps + 1:
            return False
        from megatron.core import num_microbatches_calculator as calculator

        # The helper sizes its own warm-up by Megatron's micro-batch count, which this loop
        # otherwise does not use (the batch may grow during a run).
        calculator.destroy_num_microbatches_calculator()
        calculator.init_num_microbatches_calculator(0, None, global_batch_size, self.config.train.micro_batch_size,
                                                    self.dp)
        self.helper.create_cudagraphs()
        return True

    def close(self) -> None:
        if self.helper.graphs_created():
            self.helper.delete_cuda_graphs()


def attention_mask(model, tokens: torch.Tensor):
    """What a training forward passes as the attention mask: None, or where the layers replay
    graphs, the causal mask they were captured with (Megatron captures an attention-mask input, as
    its data loader makes one by default, and a replay needs a tensor there). Transformer Engine's
    causal attention does not read its values."""
    if getattr(model.config, "cuda_graph_impl", "none") != "transformer_engine":
        return None
    return _causal_mask(tokens.shape[1], tokens.device)


@functools.cache
def _causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s], True where a position may not attend (Megatron's convention)."""
    allowed = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).tril()
    return ~allowed.view(1, 1, seq_length, seq_length)
