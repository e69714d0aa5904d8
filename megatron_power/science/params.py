"""`megatron-power params`: every parameter of a recipe's model with the learning rate, weight decay,
Adam epsilon and initial standard deviation muP (and its depth rules) give it, as Megatron's
optimizer groups hold them, below the model's multipliers."""

from __future__ import annotations

from dataclasses import replace
from typing import List

from megatron_power.config import Config, model_vocab_size
from megatron_power.training import mup, runtime
from megatron_power.training.data import TokenizerInfo
from megatron_power.training.model import build_model
from megatron_power.training.optim import build_optimizer, wrap_model


def table(config: Config) -> List[str]:
    """The lines of the table on the first rank (under torchrun: its shards, its local experts);
    no lines on the others."""
    # Groups are the same with the distributed optimizer, whose groups hold shards, not parameters.
    config = replace(config, parallel=replace(config.parallel, distributed_optimizer=False))
    rt = runtime.initialize(config)
    vocab = model_vocab_size(config, TokenizerInfo.from_sentencepiece(config.data.tokenizer).vocab_size)
    model = wrap_model(config, build_model(config, vocab))
    optimizer = build_optimizer(config, model)
    group_of = {id(p): g for chained in optimizer.chained_optimizers
                for g in chained.optimizer.param_groups for p in g["params"]}
    lines = []
    if rt.rank == 0:
        lines.append(f"m_width {mup.width_mult(config):g}, m_depth {mup.depth_mult(config):g} "
                     f"(depth_alpha {config.mup.depth_alpha:g}); embedding x {mup.emb_mult(config):g}, "
                     f"each block's output x {mup.residual_mult(config):.6g}")
        lines.append(f"{'parameter':<58} {'shape':<14} {'max_lr':>10} {'weight_decay':>12} {'adam_eps':>9} {'init_std':>9}")
        for name, param in model.module.named_parameters():
            group = group_of[id(param)]
            lines.append(f"{name:<58} {'x'.join(map(str, param.shape)):<14} "
                         f"{group['max_lr'] * group['lr_mult']:>10.4g} "
                         f"{config.optim.weight_decay * group['wd_mult']:>12.4g} "
                         f"{group.get('eps', config.optim.eps):>9.3g} {param.detach().float().std():>9.4g}")
    runtime.shutdown()
    return lines
