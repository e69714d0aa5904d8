"""GPTModel from a recipe: TransformerConfig, layer spec (TE or local), layout-independent init."""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import List

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.quantization.quant_config import RecipeConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_power.config.schema import Config
from megatron_power.training import cuda_graphs, hardware, mup
from megatron_power.training.hardware import Hardware
from megatron_power.training.norm import RMSNorm

VOCAB_PAD_MULTIPLE = 128  # as Megatron-LM's --make-vocab-size-divisible-by
INIT_THREADS = 8


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def transformer_config(config, hw: Hardware = None) -> TransformerConfig:
    """Megatron's config for a recipe on the machine `hw` describes (this one by default)."""
    return TransformerConfig(**transformer_fields(config, hw or hardware.detect()))


def transformer_fields(config, hw: Hardware) -> dict:
    m, p = config.model, config.parallel
    te = hw.transformer_engine
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        bf16=hw.bf16,
        params_dtype=hw.dtype,
        pipeline_dtype=hw.dtype,
        # Megatron's own init also marks tensor-parallel weights (grad-norm and checkpoint logic
        # rely on that); `initialize_weights` then redraws them identically for every layout.
        perform_initialization=True,
        use_cpu_initialization=not hw.cuda,
        # Each fusion only where its kernel exists: Megatron imports some of them (Apex's fused
        # softmax) with no fallback once the flag is on.
        bias_activation_fusion=hw.cuda,
        masked_softmax_fusion=hw.fused_softmax,
        persist_layer_norm=hw.apex,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=hw.fused_wgrad,
        transformer_impl=hw.layer_impl,
        **mup.native_fields(config),
        **moe_fields(config, hw),
        **precision_fields(config, hw),
    )


def precision_fields(config, hw: Hardware) -> dict:
    pr = config.precision
    fields = {}
    # Selective recompute drops the attention scores; Transformer Engine's fused attention never
    # stores them, so there it has nothing left to recompute.
    if pr.recompute == "selective" and not hw.transformer_engine:
        fields.update(recompute_granularity="selective")
    elif pr.recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    # FP8 needs Transformer Engine's layers; elsewhere the recipe runs in bf16 / fp32.
    if pr.fp8 and hw.transformer_engine:
        fields.update(fp8=pr.fp8, fp8_recipe=pr.fp8_recipe, first_last_layers_bf16=pr.fp8_bf16_first_last)
        if pr.fp8_experts:
            fields.update(quant_recipe=experts_quant_recipe(pr))
    graphed = cuda_graphs.graphed_modules(config, hw)
    if graphed:
        # TE's RNG tracker is the one whose states a graph can capture.
        fields.update(cuda_graph_impl="transformer_engine", cuda_graph_modules=graphed,
                      cuda_graph_warmup_steps=pr.cuda_graph_warmup_steps, use_te_rng_tracker=True)
    return fields


# The experts' GEMMs: TEGroupedMLP's linear_fc1 and linear_fc2 (SequentialMLP's local_experts too).
EXPERT_GEMMS = "*.mlp.experts.*"


def experts_quant_recipe(pr) -> RecipeConfig:
    """Megatron-Core's per-module quantization recipe (what Megatron-LM reads from
    --te-precision-config-file) giving the experts' GEMMs `pr.fp8_experts`: bf16, or another FP8
    scaling, inside the layers' FP8 context. A layer the context leaves in bf16
    (precision.fp8_bf16_first_last) keeps its experts in bf16 too."""
    scaling = {} if pr.fp8_experts == "bf16" else {"fp8_quantization_recipe": pr.fp8_experts, "fp8_format": pr.fp8}
    return RecipeConfig.from_config_dict({
        "configs": {"experts": {"transformer_engine_config_type": "TEQuantizationParams", "training_recipe": scaling}},
        "matchers": {"experts": {"type": "glob", "pattern": EXPERT_GEMMS, "config": "experts", "enabled": True}},
    })


def precision_overrides(model: GPTModel) -> int:
    """How many of the model's modules Megatron gave a precision of their own (finish_init)."""
    return sum(getattr(module, "te_quant_params", None) is not None for module in model.modules())


def moe_fields(config, hw: Hardware) -> dict:
    m = config.model
    if m.num_experts is None:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_pre_softmax=False,  # top-k on logits, softmax over the chosen k (GraniteMoe)
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        # All-to-all under every layout, one expert group too: the dropless output size is known
        # on the host, the tokens per expert reach it on a side stream with one wait per layer,
        # and the fused permute carries the probabilities (the allgather dispatcher waits twice,
        # for a blocking copy and a masked_select). What Megatron-Bridge's MoE recipes use.
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=hw.transformer_engine,
        moe_permute_fusion=hw.transformer_engine,
        # TE's fused top-k, softmax and aux loss (it takes top-k-then-softmax too): one kernel for
        # what is a dozen small ones per MoE layer and micro-batch.
        moe_router_fusion=hw.transformer_engine,
        # The router's softmax and top-k in fp32 under bf16 too, as on the CPU.
        moe_router_dtype="fp32",
    )


def block_spec(tconfig: TransformerConfig, config) -> TransformerBlockSubmodules:
    """This pipeline stage's layers. The local spec gets our RMSNorm (Megatron's torch norm refuses
    sequence parallelism); the TE spec keeps TE's fused norms."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = config.model.num_experts
    if tconfig.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=tconfig.moe_grouped_gemm)
        final_norm = TENorm
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        if experts:
            # The TE spec's MoE layers save their own pre-MLP norm key; the same keys here let a
            # checkpoint move between CPU and GPU (and keep conversion to one table).
            spec.submodules.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        final_norm = RMSNorm
    spec = mup.apply_to_layer_spec(spec, config)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(tconfig),
                                      layer_norm=final_norm)


def build_model(config, vocab_size: int, initialize: bool = True, hw: Hardware = None) -> GPTModel:
    """This rank's GPTModel for the machine `hw` (this one by default). `initialize=False` skips
    the weight draw (for the meta-device planner, which only counts)."""
    hw = hw or hardware.detect()
    tconfig = transformer_config(config, hw)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(tconfig, config),
        vocab_size=padded_vocab_size(vocab_size, config.parallel.tp),
        max_sequence_length=config.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=config.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=config.model.rotary_base,
    )
    if initialize:
        if hw.cuda:
            model.cuda(torch.cuda.current_device())
        initialize_weights(model, config)
    return model


def sharded_tensors(model: GPTModel):
    """This rank's parameters as dist_checkpointing ShardedTensors (global key, shape, offset;
    `data` is a view of the parameter)."""
    for value in model.sharded_state_dict(prefix="").values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from built if isinstance(built, list) else built.values()
        elif isinstance(value, ShardedTensor):
            yield value


def local_part(sh: ShardedTensor, full: torch.Tensor, skip_axes: int = 0) -> torch.Tensor:
    """This rank's part of the global tensor `full`, or of the slice of it at `sh`'s index along
    the first `skip_axes` axes (one layer; one layer's expert)."""
    offsets = sh.global_offset[skip_axes:]
    extents = ((1,) * sh.prepend_axis_num + tuple(sh.local_shape))[skip_axes:]  # prepended axes: extent 1
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, extents))].reshape(sh.data.shape)


def initialize_weights(model: GPTModel, config) -> None:
    """Fill every parameter from a generator seeded by its global checkpoint key and its layer
    (and expert) index.

    Each rank draws the whole of its layer's (expert's) tensor and keeps its own shard, so TP,
    PP, EP and DP layouts start from the same model and their losses can be compared step by
    step. Drawing per layer and expert, not per stacked key, keeps the cost at one model's worth.
    A seeded CPU generator draws on one core (about 180M numbers/s), so the tensors are drawn in
    parallel, each from its own generator: the same numbers in any order.
    """
    seed = config.train.seed

    @torch.no_grad()  # grad mode is per thread
    def draw(sh: ShardedTensor) -> None:
        std = mup.init_std(sh.key, config)
        if std == 0.0:
            sh.data.fill_(1.0)
            return
        whole = sh.prepend_axis_num  # layer and expert axes, never split within an index
        index = ".".join(map(str, sh.global_offset[:whole]))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{sh.key}@{index}".encode()))
        full = torch.randn(sh.global_shape[whole:], generator=generator, dtype=torch.float32) * std
        sh.data.copy_(local_part(sh, full, skip_axes=whole))

    # At most INIT_THREADS whole tensors in memory at once (dense3b's largest: 0.45 GB).
    with ThreadPoolExecutor(max_workers=min(INIT_THREADS, len(os.sched_getaffinity(0)))) as pool:
        list(pool.map(draw, sharded_tensors(model)))


# What a model's weights and its function depend on (not seq_length, init, aux-loss weight).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "tie_embeddings", "rotary_base", "norm_epsilon", "num_experts", "moe_topk", "moe_ffn_hidden_size")


def model_differences(expected: Config, found: Config) -> List[str]:
    """'field: expected X, found Y' for every shape field or muP multiplier in which two configs'
    models differ; empty when the same weights compute the same function in both."""
    def shape(c: Config) -> dict:
        m = c.model
        values = {f"model.{f}": getattr(m, f) for f in SHAPE_FIELDS}
        values["model.num_query_groups"] = m.num_query_groups or m.num_attention_heads
        if m.num_experts:
            del values["model.ffn_hidden_size"]  # unused by MoE layers
        else:
            for f in ("moe_topk", "moe_ffn_hidden_size"):
                del values[f"model.{f}"]
        values.update({"muP width multiplier": mup.width_mult(c), "muP embedding multiplier": mup.emb_mult(c),
                       "muP residual multiplier": mup.residual_mult(c), "attention scale": mup.softmax_scale(c)})
        return values

    a, b = shape(expected), shape(found)
    return [f"{k}: expected {a[k]}, found {b.get(k)}" for k in a if a[k] != b.get(k) and not
            (isinstance(a[k], float) and isinstance(b.get(k), float) and abs(a[k] - b[k]) <= 1e-9 * abs(a[k]))]
