"""Before launch: parameters, FLOPs per token and memory per GPU for a recipe's layout.

Parameter counts come from the real GPTModel built on the meta device (no memory, no init), so
they cannot drift from what trains. Memory follows Megatron's accounting: bf16 weights, fp32
gradient buffers, fp32 master weights and Adam moments (sharded over data parallelism with the
distributed optimizer), and activations per Korthikanti et al. 2022 (arXiv 2205.05198).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from megatron_power.training.batch_schedule import batch_sizes

GIB = 2**30


@dataclass
class ParamCounts:
    total: int
    embedding: int  # word embeddings (tied: also the output layer)
    output: int  # an untied output layer; 0 when tied
    expert: int  # all experts of all layers
    dense_layers: int  # everything in the transformer layers that is not an expert

    def active(self, config) -> int:
        """Parameters a token passes through, embeddings excluded (the paper's "active")."""
        m = config.model
        experts = self.expert * m.moe_topk // m.num_experts if m.num_experts else 0
        return self.dense_layers + experts


def count_parameters(config, vocab_size: int) -> ParamCounts:
    """Build the whole model (no parallelism) on the meta device and count its parameters.

    The build is the CPU's (Megatron's local layers, which have the same parameters as Transformer
    Engine's) in a private single-process group, so that it allocates nothing on a GPU and can run
    inside a launched job before its own process group starts."""
    from megatron_power.training import hardware, runtime
    from megatron_power.training.model import build_model

    whole = replace(config, parallel=replace(config.parallel, tp=1, pp=1, ep=1, sequence_parallel=False))
    # Megatron's advice on kernels and recompute is for training; a build that only counts keeps quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime.initialize(whole, hw=hardware.CPU, alone=True)
        with torch.device("meta"):
            model = build_model(whole, vocab_size, initialize=False, hw=hardware.CPU)
    counts = {"embedding": 0, "output": 0, "expert": 0, "dense_layers": 0}
    for name, p in model.named_parameters():
        if name.startswith("embedding."):
            counts["embedding"] += p.numel()
        elif name.startswith("output_layer."):
            counts["output"] += p.numel()
        elif ".experts." in name:
            counts["expert"] += p.numel()
        else:
            counts["dense_layers"] += p.numel()
    runtime.shutdown()
    return ParamCounts(total=sum(counts.values()), **counts)


def flops_per_token(config, counts: ParamCounts) -> float:
    """Training FLOPs per token: 6 x (active parameters + output layer) + causal attention's 6 x L x h x s.

    Attention's two matmuls (scores and their product with the values) cost 2 x 2 x s x h per
    token and layer forward, 3x that with the backward; a causal mask halves the work, as
    Megatron-LM counts it (and as fused attention kernels skip it)."""
    m = config.model
    # The logits matmul has the embedding's shape, tied or not.
    return 6.0 * (counts.active(config) + counts.embedding) + 6.0 * m.num_layers * m.hidden_size * m.seq_length


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_no_recompute: float
    logits: float  # the output layer's logits and the cross-entropy's fp32 buffers

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


# Per logit of the micro-batch in flight: the bf16 logits, the cross-entropy's fp32 copy, and the
# fp32 softmax it keeps for the backward pass (Megatron's vocab-parallel cross-entropy).
LOGIT_BYTES = 2 + 4 + 4


def memory_per_gpu(config, counts: ParamCounts, gpus: int) -> Memory:
    """Bytes on the busiest GPU (the first pipeline stage, which holds the embedding)."""
    m, p, t = config.model, config.parallel, config.train
    dp = gpus // (p.tp * p.pp)
    expert_dp = gpus // (p.tp * p.ep * p.pp)
    dense = (counts.dense_layers / p.pp + counts.embedding) / p.tp
    expert = counts.expert / (p.pp * p.ep * p.tp)
    params = dense + expert
    weights = params * 2  # bf16, as on the GPUs this plans for
    if config.precision.fp8:
        # Transformer Engine also keeps each layer weight in FP8, and its transpose for backward.
        weights += 2 * (params - counts.embedding / p.tp - (expert if config.precision.fp8_experts == "bf16" else 0))
    gradients = params * 4  # Megatron reduces gradients in fp32
    state = 12  # fp32 master weights, exp_avg, exp_avg_sq
    if p.distributed_optimizer:
        optimizer = state * (dense / dp + expert / expert_dp)
    else:
        optimizer = state * params
    s, b, h, a = m.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    layers = m.num_layers / p.pp
    # In-flight micro-batches on the first stage under 1F1B: as many as there are stages.
    in_flight = min(p.pp, max(batch_sizes(t, s)) // (b * dp))
    sp = p.tp if p.sequence_parallel else 1
    # Bytes per token and layer (Korthikanti's 34 h): the attention block with its norm 13 h, the
    # MLP block with its norm 21 h, of which 5 h each (norm and block inputs, dropout mask) are not
    # split by TP; attention scores 5 a s / tp more unless recomputed.
    attention = h * (5 / sp + 8 / p.tp)
    if m.num_experts:
        # Korthikanti's 16 h of MLP intermediates are for one dense MLP 4 h wide. Each of a token's
        # top-k expert copies keeps instead its own input (2 h), its fc1 output, SwiGLU's two
        # halves (4 f), and the SwiGLU output (2 f), at the expert's width f.
        mlp = 5 * h / sp + m.moe_topk * (2 * h + 6 * m.moe_ffn_hidden_size / p.tp)
    else:
        mlp = h * (5 / sp + 16 / p.tp)
    per_layer_full = s * b * (attention + mlp + 5 * a * s / p.tp)
    per_layer = {"none": per_layer_full,
                 "selective": s * b * (attention + mlp),  # attention scores recomputed
                 "full": 2 * s * b * h / sp}[config.precision.recompute]
    activations = per_layer * layers * in_flight
    # The busiest GPU is the first stage; it is also the last (with the logits) without pipelining.
    logits = s * b * counts.embedding / h / p.tp * LOGIT_BYTES if p.pp == 1 else 0.0
    return Memory(weights, gradients, optimizer, activations, per_layer_full * layers * in_flight, logits)


FIT_FRACTION = 0.9  # of a GPU's memory: the rest is for the CUDA context, NCCL and fragmentation


def fits(mem: Memory, capacity_gib: float) -> bool:
    return mem.total / GIB <= FIT_FRACTION * capacity_gib


def fit_problem(config, vocab_size: int, gpus: int, capacity_gib: float):
    """One line saying why the layout does not fit in GPU memory, or None when it does."""
    mem = memory_per_gpu(config, count_parameters(config, vocab_size), gpus)
    if fits(mem, capacity_gib):
        return None
    parts = ", ".join(f"{name} {getattr(mem, name) / GIB:.1f}"
                      for name in ("weights", "gradients", "optimizer", "activations", "logits"))
    remedies = ["a smaller train.micro_batch_size", "larger parallel.tp / parallel.pp"]
    if config.precision.recompute != "full":
        remedies.insert(0, "precision.recompute=full")
    if not config.parallel.distributed_optimizer:
        remedies.append("parallel.distributed_optimizer=true")
    return (f"{config.name} on {gpus} GPU{'s' if gpus > 1 else ''} needs {mem.total / GIB:.1f} GiB per GPU ({parts}), "
            f"over {FIT_FRACTION:.0%} of {capacity_gib:.0f} GiB; try {', '.join(remedies)}")


def training_refusal(config, vocab_size: int, hw, world_size: int):
    """Why `train` must not start this layout on the machine `hw`, or None: on GPUs, the
    planner's memory per GPU over what the GPU has (unless train.check_memory is off)."""
    if not hw.cuda or not config.train.check_memory:
        return None
    problem = fit_problem(config, vocab_size, world_size, hw.gpu_memory_gib)
    return problem and f"{problem}; or train.check_memory=false to start anyway"


def report(config, counts: ParamCounts, gpus: int, capacity_gib: float = 80.0) -> list:
    mem = memory_per_gpu(config, counts, gpus)
    p = config.parallel
    fit = fits(mem, capacity_gib)
    lines = [
        f"recipe {config.name}: {gpus} GPUs as TP {p.tp} x PP {p.pp} x EP {p.ep} x DP {gpus // (p.tp * p.pp)}",
        f"parameters        {counts.total / 1e9:8.3f} B total, {counts.active(config) / 1e9:.3f} B active "
        f"(embeddings excluded), {counts.embedding / 1e6:.1f} M embedding",
        f"  exactly         {counts.total:,} total, {counts.active(config):,} active",
        f"FLOPs per token   {flops_per_token(config, counts) / 1e9:8.2f} GFLOP (training)",
        "memory per GPU (GiB):",
        f"  weights         {mem.weights / GIB:8.2f}",
        f"  gradients       {mem.gradients / GIB:8.2f}",
        f"  optimizer       {mem.optimizer / GIB:8.2f}"
        + ("  (sharded over data parallelism)" if p.distributed_optimizer else ""),
        f"  activations     {mem.activations / GIB:8.2f}  with recompute={config.precision.recompute}; "
        f"{mem.activations_no_recompute / GIB:.2f} without",
        f"  logits          {mem.logits / GIB:8.2f}  (output layer and cross-entropy"
        + (": held by the last pipeline stage, not this one)" if p.pp > 1 else ")"),
        f"  total           {mem.total / GIB:8.2f} of {capacity_gib:.0f}: "
        + (f"fits (under {FIT_FRACTION:.0%})" if fit else f"DOES NOT FIT (over {FIT_FRACTION:.0%})"),
    ]
    return lines
