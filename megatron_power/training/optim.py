"""Megatron's DDP and optimizer for a recipe, and the optimizer step that skips a non-finite one."""

from __future__ import annotations

import math

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer

from megatron_power.config.schema import Config
from megatron_power.training import hardware, mup


def build_optimizer(config: Config, model):
    """Megatron's AdamW with muP's per-group learning rates (and the distributed optimizer if asked)."""
    hw = hardware.detect()
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=config.schedule.lr_max,
        min_lr=config.schedule.min_lr,
        weight_decay=config.optim.weight_decay,
        adam_beta1=config.optim.beta1,
        adam_beta2=config.optim.beta2,
        adam_eps=config.optim.eps,
        clip_grad=config.train.clip_grad,
        bf16=hw.bf16,
        params_dtype=hw.dtype,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, [model],
                                  config_overrides=mup.optimizer_overrides(config, optimizer_config))


def wrap_model(config: Config, model):
    """Megatron's DDP (and, for bf16, its Float16Module) around the GPTModel."""
    tconfig = model.config
    if tconfig.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
    )
    ddp = DistributedDataParallel(tconfig, ddp_config, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    if hardware.detect().transformer_engine and not tconfig.gradient_accumulation_fusion:
        accumulate_wgrads_in_te_gemms(ddp)
    return ddp


def accumulate_wgrads_in_te_gemms(model) -> None:
    """Let Transformer Engine's layers add each weight gradient into DDP's fp32 `main_grad` inside
    their wgrad GEMM, as Megatron's `gradient_accumulation_fusion` would.

    Megatron's flag cannot be set without Apex: its own output layer then requires Apex's wgrad
    kernel, which TE's layers do not need. Without the fusion each weight gradient of each
    micro-batch is written in bf16 and added to its buffer by a kernel of its own (the H200's
    profile: 7% of dense3b's step; 10,888 kernels per moe3b step). TE reads
    the attribute at each forward and tells DDP through `grad_added_to_main_grad`, so the output
    layer and the embedding keep DDP's own accumulation.
    """
    for module in model.modules():
        if hasattr(module, "fuse_wgrad_accumulation"):
            module.fuse_wgrad_accumulation = True


def step_unless_nonfinite(optimizer, clip_grad: float, probe=None) -> float:
    """Megatron's ChainedOptimizer.step(), with one addition: a non-finite grad norm (or a
    mixed-precision overflow) skips the update. `probe` (noise_scale.FirstMicrobatchProbe) reads
    the global batch's gradients before clipping. Returns the grad norm."""
    if optimizer.prepare_grads():
        return math.inf
    if probe is not None:
        probe.read_global_batch(optimizer)
    # With Transformer Engine's multi-tensor kernels Megatron returns the norm as a device tensor
    # (and clips with it without waiting); the skip decision needs it on the host anyway.
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return grad_norm
    if clip_grad > 0:
        for chained in optimizer.chained_optimizers:
            params = chained.get_parameters()
            if params and not getattr(chained, "is_stub_optimizer", False):
                megatron_optimizer.clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    return grad_norm
